"""eval.py's reporting helpers: the claims record and the results files every script writes."""
import json
from dataclasses import dataclass

import eval as ev


@dataclass
class Cfg:
    lr: float = 0.1


def test_claim_and_results_files(tmp_path):
    c = ev.claim("1 something holds", 0.7, 0.5, True, "measured")
    assert c == {"claim": "1 something holds", "value": 0.7, "threshold": 0.5, "held": True, "detail": "measured"}
    path = ev.write_results(tmp_path / "out", "x.py results", Cfg(), {"loss": 1.5}, [c], "| table |")
    got = json.loads(open(path).read())
    assert got == {"config": {"lr": 0.1}, "metrics": {"loss": 1.5}, "claims": [c]}
    assert (tmp_path / "out" / "results.md").read_text() == "# x.py results\n\n| table |\n"
    assert not (tmp_path / "out" / "results.json.tmp").exists()


def test_claims_markdown_rows_and_not_reproduced_line():
    import eval as ev
    held = dict(ev.claim("a holds", {"x": 1.5}, "x >= 1", True, "seed 0: fine"), held_per_seed={"0": True})
    failed = dict(ev.claim("b fails", 0.25, ">= 0.5", False), held_per_seed={"0": False})
    rows = ev.claims_markdown([held, failed])
    assert rows[:2] == ["| claim | value | threshold | held (per seed) |", "| --- | --- | --- | --- |"]
    assert rows[2] == '| a holds | {"x": 1.5} | x >= 1 | True ({\'0\': True}) | seed 0: fine'
    assert rows[3] == "| b fails | 0.25 | >= 0.5 | False ({'0': False}) |"
    assert rows[4] == "|  | not reproduced here (see value) | | |" and len(rows) == 5


def test_publish_prints_writes_then_plots(tmp_path, capsys):
    out = tmp_path / "out"
    seen = []
    text = ev.publish(out, "x.py results", Cfg(), {"loss": 1.5}, [], ["| a |", "| b |"],
                      lambda: seen.append((out / "results.json").exists()))
    assert text == "| a |\n| b |" and seen == [True]          # the figures come after the results files
    assert (out / "results.md").read_text() == "# x.py results\n\n| a |\n| b |\n"
    printed = capsys.readouterr().out
    assert printed.startswith("| a |\n| b |\n") and printed.rstrip().endswith(f"wrote {out / 'results.json'}")
    assert ev.publish(out, "t", Cfg(), {}, [], ["only text"]) == "only text"
