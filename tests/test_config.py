"""--key=value config parsing, presets, errors that name the field (last line, exit 2), device picking."""
import os
import typing
from dataclasses import dataclass, field

import pytest
import torch

from model import ModelConfig
from train import check, parse_config, pick_device


@dataclass
class Cfg:
    n_layer: int = 2
    lr: float = 3e-3
    name: str = "run"
    compile: bool = False
    betas: tuple = (0.9, 0.95)
    sizes: tuple[int, ...] = (1, 2)
    pair: tuple[int, float] = (1, 0.5)
    widths: list[int] = field(default_factory=lambda: [4, 8])
    data: typing.Optional[str] = None      # Optional annotation
    limit: typing.Optional[int] = 10       # Optional with a non-None default
    anything: object = None                # default None, no usable type: parse sensibly
    preset: str = "default"


PRESETS = {"smoke": {"n_layer": 1, "lr": 1e-2, "name": "smoke"}, "paper": {"n_layer": 12, "data": "wiki"}}


def parse(*argv, presets=PRESETS):
    return parse_config(Cfg, list(argv), presets)


def test_defaults_without_args():
    assert parse() == Cfg()


def test_scalar_types():
    c = parse("--n_layer=4", "--lr=3e-4", "--name=hello world", "--compile=true")
    assert (c.n_layer, c.lr, c.name, c.compile) == (4, 3e-4, "hello world", True)
    assert type(c.n_layer) is int and type(c.lr) is float
    assert parse("--lr=1").lr == 1.0 and type(parse("--lr=1").lr) is float   # int-looking float stays float
    assert parse("--n_layer=1e3").n_layer == 1000                             # integral scientific notation


@pytest.mark.parametrize("text,val", [("true", True), ("True", True), ("1", True), ("yes", True),
                                      ("false", False), ("FALSE", False), ("0", False), ("no", False)])
def test_bool_spellings(text, val):
    assert parse(f"--compile={text}").compile is val


def test_tuples_and_lists():
    assert parse("--betas=0.8,0.99").betas == (0.8, 0.99)
    assert parse("--betas=(0.8,0.99)").betas == (0.8, 0.99)
    assert parse("--betas=(0.8, 1)").betas == (0.8, 1.0)                 # element types follow the default
    assert type(parse("--betas=(0.8, 1)").betas[1]) is float
    assert parse("--sizes=3,4,5").sizes == (3, 4, 5)                     # tuple[int, ...]: any length
    assert parse("--sizes=(7,)").sizes == (7,)
    assert parse("--sizes=()").sizes == ()
    assert parse("--pair=2,0.25").pair == (2, 0.25)                      # tuple[int, float]: fixed
    assert parse("--widths=[16,32]").widths == [16, 32]


def test_none_handling():
    assert parse("--data=None").data is None
    assert parse("--data=wiki").data == "wiki"
    assert parse("--limit=None").limit is None                           # Optional[int] with default 10
    assert parse("--limit=5").limit == 5
    # a None-default field with no usable type takes int, then float, then str
    assert parse("--anything=3").anything == 3 and type(parse("--anything=3").anything) is int
    assert parse("--anything=0.5").anything == 0.5
    assert parse("--anything=abc").anything == "abc"
    assert parse("--anything=None").anything is None


def test_presets_apply_first_then_overrides():
    c = parse("--lr=5e-4", "--preset=smoke")          # preset is applied first wherever it stands
    assert (c.n_layer, c.lr, c.name, c.preset) == (1, 5e-4, "smoke", "smoke")
    assert parse("--preset=paper").data == "wiki"
    assert parse("--preset=paper").preset == "paper"


def test_presets_default_to_module_PRESETS():
    # parse_config finds PRESETS in the module that defines the Config class (this test module)
    assert parse_config(Cfg, ["--preset=smoke"]).n_layer == 1


def test_dash_spelling_of_keys():
    assert parse("--n-layer=3").n_layer == 3


def _fails(capsys, *argv, presets=PRESETS):
    """The run exits 2 and the error is the last line on screen: one line, no key list or traceback after it."""
    with pytest.raises(SystemExit) as e:
        parse(*argv, presets=presets)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("usage:") and "--help" in lines[0]
    assert lines[-1].startswith("error: ")
    return lines[-1]


@pytest.mark.parametrize("argv,msg", [
    (["--nlayer=3"], "unknown key 'nlayer'"),
    (["--preset=huge"], "unknown preset 'huge'"),
    (["n_layer=3"], "malformed"),
    (["--n_layer"], "malformed"),
    (["--n_layer=three"], "bad value for --n_layer"),
    (["--n_layer=1.5"], "bad value for --n_layer"),
    (["--lr=fast"], "bad value for --lr"),
    (["--compile=maybe"], "bad value for --compile"),
    (["--n_layer=None"], "bad value for --n_layer"),                 # not Optional
    (["--pair=1,2,3"], "bad value for --pair"),                      # fixed-length tuple
    (["--betas=a,b"], "bad value for --betas"),
    (["--widths=16,,32"], "empty element"),                           # a typo, not 16,32
    (["--n_layer=1", "--n_layer=2"], "given twice"),
    (["--preset=smoke", "--preset=paper"], "given twice"),
])
def test_errors_exit_2_with_the_error_last(capsys, argv, msg):
    assert msg in _fails(capsys, *argv)


def test_unknown_key_suggests_and_lists_the_valid_keys(capsys):
    err = _fails(capsys, "--nlayer=3")
    assert "did you mean --n_layer?" in err
    for key in ("n_layer", "lr", "betas", "data", "widths"):
        assert key in err


def test_preset_with_unknown_key_fails(capsys):
    assert "unknown keys" in _fails(capsys, "--preset=bad", presets={"bad": {"nope": 1}})


def test_post_init_errors_exit(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(ModelConfig, ["--flavor=bert"], {})
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "flavor must be" in err[-1]
    # and the real model config parses its bare `tuple` field element-wise
    assert parse_config(ModelConfig, ["--rope_scaling=8,1,4,8192"], {}).rope_scaling == (8, 1, 4, 8192)


def test_help_lists_keys_with_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        parse("--help")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--lr" in out and "0.003" in out and "(0.9, 0.95)" in out and "smoke" in out


def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto") == "cpu"
    assert pick_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == "cuda:1" and pick_device("cuda") == "cuda"


def test_missing_devices_name_the_ones_that_exist(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name in ("cuda", "cuda:0", "mps"):
        with pytest.raises(ValueError, match=rf"device '{name}' is not available: .*devices here: cpu \(or auto\)"):
            pick_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="there are 2 GPUs; devices here: cpu, cuda, cuda:0, cuda:1"):
        pick_device("cuda:2")


@dataclass
class Ranged:
    p: float = 0.5
    n_pool: int = 8
    n_source: int = 4
    ratios: tuple = (0.1, 0.3)
    mode: str = "a"
    steps: int = 3

    def __post_init__(self):
        check(self, p="(0, 1]", n_source="[1, n_pool]", ratios="(0, 1)", mode=("a", "b"), steps="[0, inf)")


@pytest.mark.parametrize("kw,ok", [
    (dict(p=1.0), True), (dict(p=1e-9), True), (dict(p=0.0), False), (dict(p=1.5), False), (dict(p=-0.1), False),
    (dict(p=float("nan")), False), (dict(n_source=8), True), (dict(n_source=1), True), (dict(n_source=9), False),
    (dict(n_source=0), False), (dict(n_pool=3), False), (dict(ratios=()), True), (dict(ratios=(0.5, 0.99)), True),
    (dict(ratios=(0.5, 1.0)), False), (dict(mode="b"), True), (dict(mode="c"), False), (dict(steps=0), True),
    (dict(steps=10**9), True), (dict(steps=-1), False), (dict(steps=True), False), (dict(p="0.5"), False)])
def test_check_ranges_worked_cases(kw, ok):
    if ok:
        Ranged(**kw)
    else:
        with pytest.raises(ValueError, match=f"{next(iter(kw)) if 'n_pool' not in kw else 'n_source'}"):
            Ranged(**kw)


def test_range_errors_name_field_and_range_and_exit_2(capsys):
    for argv, msg in ((["--p=1.5"], "p=1.5 is out of range: p must be in (0, 1]"),
                      (["--n_source=9"], "n_source=9 is out of range: n_source must be in [1, n_pool] = [1, 8]"),
                      (["--ratios=0.5,2"], "ratios=(0.5, 2.0) is out of range: ratios must be in (0, 1)"),
                      (["--mode=c"], "mode='c' is not valid: mode must be one of 'a', 'b'")):
        with pytest.raises(SystemExit) as e:
            parse_config(Ranged, argv, {})
        assert e.value.code == 2
        assert msg in capsys.readouterr().err
    with pytest.raises(ValueError, match="bad rule"):
        check(Ranged(), p="0 < p <= 1")


def test_help_shows_each_fields_comment(capsys):
    with pytest.raises(SystemExit):
        parse("--help")
    out = capsys.readouterr().out
    assert "--data" in out and "Optional annotation" in out             # the comment on the field's line
    assert "parse sensibly" in out


@dataclass
class RunCfg:
    seed: int = 0
    seeds: tuple = ()
    out_dir: str = "out/x"


@pytest.mark.parametrize("argv,msg", [
    (["--seeds=0,0"], "seeds must be distinct (repeated: [0])"),
    (["--seeds=0,-1"], "seeds must be non-negative integers"),
    (["--seeds=0,,1"], "empty element"),
    (["--seed=-1"], "seed must be in [0, inf)"),
])
def test_seed_rules_are_checked_at_parse_time(capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        parse_config(RunCfg, argv, {})
    assert e.value.code == 2
    assert msg in capsys.readouterr().err.strip().splitlines()[-1]
    assert parse_config(RunCfg, ["--seeds=2,0,1"], {}).seeds == (2, 0, 1)


def test_out_dir_that_is_a_file_or_unwritable_fails_before_any_work(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for bad, msg in ((f, "it is a file"), (f / "sub", "is a file, not a directory")):
        with pytest.raises(SystemExit) as e:
            parse_config(RunCfg, [f"--out_dir={bad}"], {})
        assert e.value.code == 2 and msg in capsys.readouterr().err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):                                 # root may write anywhere
            with pytest.raises(SystemExit):
                parse_config(RunCfg, [f"--out_dir={ro / 'new'}"], {})
            assert "not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)
    assert parse_config(RunCfg, [f"--out_dir={tmp_path / 'a' / 'b'}"], {}).out_dir.endswith("b")
    assert not (tmp_path / "a").exists()                                # checking creates nothing
