"""The repository's layout promises: a compact model.py holding only the model, no file pointing outside the
repository, figures as a regular part of every run."""
import pathlib
import re
import sys

import pytest

import eval as ev

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_model_py_is_the_model_only():
    src = (ROOT / "model.py").read_text()
    assert len(src.splitlines()) <= 450
    for sign in ("def train(", "def parse_config(", "def save_checkpoint(", "def load_checkpoint(", "torch.load(",
                 "torch.save(", "def load_hf(", "safetensors", "sys.argv", "import train", "import hf"):
        assert sign not in src, sign


def test_no_file_refers_outside_the_repository():
    pattern = re.compile(r"\.\./shared|shared/(notes|papers|data)/|the issue")
    hits = [f"{p.relative_to(ROOT)}:{i + 1}" for p in [*ROOT.glob("*.py"), *ROOT.glob("tests/*.py")]
            if p.name != "test_layout.py" for i, line in enumerate(p.read_text().splitlines()) if pattern.search(line)]
    assert hits == []


def test_figures_need_matplotlib_and_say_how_to_get_it(monkeypatch):
    assert ev.pyplot() is not None                                 # a regular dependency: installed with the rest
    monkeypatch.setitem(sys.modules, "matplotlib", None)           # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install -r requirements.txt"):
        ev.pyplot()
