"""README.md stays in step with the code: every `python <script>.py --key=value` it shows names a real script, a
Config field of that script and, for --preset, one of its presets; the front door stays short."""
import importlib
import pathlib
import re

import train as T

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _commands():
    text = (ROOT / "README.md").read_text()
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            for m in re.finditer(r"(?:python|torchrun [^ ]*) (\w+)\.py((?: --[\w-]+(?:=[^ ]*)?)*)", line):
                yield m.group(1), re.findall(r"--([\w-]+)(?:=([^ ]*))?", m.group(2))


def test_readme_commands_use_real_scripts_fields_and_presets():
    """Each README command line parses with its script's own parse_config: real keys, presets and valid values."""
    seen = set()
    for script, flags in _commands():
        assert (ROOT / f"{script}.py").exists(), script
        mod = importlib.import_module(script)
        argv = [f"--{k}={v}" if v else f"--{k}" for k, v in flags if k != "help"]
        try:
            T.parse_config(mod.Config, argv, getattr(mod, "PRESETS", None))
        except SystemExit as e:
            raise AssertionError(f"README: python {script}.py {' '.join(argv)} does not parse (exit {e.code})")
        seen.add(script)
    assert {"nulls", "memsinks", "memadapt", "neumuter", "locprobe", "compare", "bench"} <= seen   # one line each


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 260
    for doc in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / doc).exists(), doc
