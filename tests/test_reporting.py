"""eval.py's claims machinery (the one verdict vocabulary, intervals over seeds, paired proportions, tuning on
held-out data) and the results files every script writes."""
import json
import math
import re
from dataclasses import dataclass

import pytest
from scipy import stats

import eval as ev


@dataclass
class Cfg:
    lr: float = 0.1


def test_claim_and_results_files(tmp_path):
    c = ev.claim("1 something holds", [ev.condition("x", 0.7, ">=", 0.5)], "measured")
    assert c == {"claim": "1 something holds", "verdict": "holds", "detail": "measured", "precondition": None,
                 "tests": [{"quantity": "x", "value": 0.7, "op": ">=", "threshold": 0.5}],
                 "value": {"x": 0.7}, "threshold": {"x": ">= 0.5"}}
    chk = ev.sanity("starts equal", True, "max diff 0")
    path = ev.write_results(tmp_path / "out", "x.py results", Cfg(), {"loss": 1.5, "u": float("nan")}, [c],
                            "| table |", [chk])
    got = json.loads(open(path).read())
    assert got == {"config": {"lr": 0.1}, "metrics": {"loss": 1.5, "u": None}, "claims": [c], "checks": [chk]}
    assert (tmp_path / "out" / "results.md").read_text() == "# x.py results\n\n| table |\n"
    assert not (tmp_path / "out" / "results.json.tmp").exists()
    with pytest.raises(ValueError, match="verdict"):              # only the four words reach results.json
        ev.write_results(tmp_path / "out", "t", Cfg(), {}, [{**c, "verdict": "yes"}], "")


def test_every_verdict_from_conditions_and_preconditions():
    C, cond, pre = ev.claim, ev.condition, ev.precondition
    assert C("a", [cond("x", 0.5, ">=", 0.5), cond("y", 1.0, "<", 2.0)])["verdict"] == "holds"   # boundary holds
    assert C("a", [cond("x", 0.5, ">", 0.5)])["verdict"] == "fails"                              # strict
    assert C("a", [cond("x", 0.6, ">=", 0.5), cond("y", 3.0, "<=", 2.0)])["verdict"] == "fails"  # one part fails
    assert C("a", [cond("x", 1.5, "within", [0.5, 2.0])])["verdict"] == "holds"
    assert C("a", [cond("x", 2.5, "within", [0.5, 2.0])])["verdict"] == "fails"
    assert C("a", [cond("x", 0.6, ">=", 0.5, ci=(0.4, 0.8))])["verdict"] == "inconclusive"       # its own interval
    assert C("a", [cond("x", 0.6, ">=", 0.5, ci=(0.4, 0.8)), cond("y", 3, "<=", 2)])["verdict"] == "fails"
    nt = C("a", [cond("x", 0.9, ">=", 0.5)], "", pre("a gap to close > 0", -0.1, False))
    assert nt["verdict"] == "not testable here" and nt["precondition"]["value"] == -0.1        # never a vacuous hold
    assert C("a", [], "", pre("p", 0, False))["verdict"] == "not testable here"
    with pytest.raises(ValueError, match="nothing decides"):
        C("a", [])
    for bad in (float("nan"), None, float("inf"), True):
        with pytest.raises(ValueError, match="finite number"):
            cond("x", bad, ">=", 0)
    with pytest.raises(ValueError, match="op"):
        cond("x", 1.0, "=>", 0)


def test_paired_proportion_interval_is_agresti_min_by_hand():
    """Agresti & Min (2005): add 0.5 to each cell; d = (n10 - n01) / (n + 2), se = sqrt((n10 + n01) - (n10 -
    n01)^2 / (n + 2)) / (n + 2) on the adjusted counts. Worked example: n = 10, n10 = 3, n01 = 1."""
    x = [1, 1, 1, 0, 1, 0, 0, 0, 1, 1]
    y = [0, 0, 0, 1, 1, 0, 0, 0, 1, 1]
    t = ev.paired_proportion(x, y, 0.10)
    a10, a01, a = 3.5, 1.5, 12.0
    d = (a10 - a01) / a
    se = math.sqrt((a10 + a01) - (a10 - a01) ** 2 / a) / a
    assert t["value"] == pytest.approx(0.2) and t["counts"] == {"n": 10, "n10": 3, "n01": 1}
    assert t["ci"] == pytest.approx([d - 1.959964 * se, d + 1.959964 * se])
    assert ev.claim("c", [t])["verdict"] == "inconclusive"
    # 10 agreeing items cannot resolve a 0.10 band; 40 can
    assert ev.claim("c", [ev.paired_proportion([1] * 10, [1] * 10)])["verdict"] == "inconclusive"
    assert ev.claim("c", [ev.paired_proportion([1] * 40, [1] * 40)])["verdict"] == "holds"
    assert ev.claim("c", [ev.paired_proportion([1] * 30, [0] * 30)])["verdict"] == "fails"


def _seed_claims(values, op=">=", thr=0.5, pre=None):
    return {s: [ev.claim("c", [ev.condition("x", v, op, thr)], f"v {v}", pre)] for s, v in enumerate(values)}


def test_over_seeds_t_interval_against_scipy():
    vals = [0.6, 0.7, 0.95]
    out = ev.over_seeds(_seed_claims(vals))[0]
    m = [v - 0.5 for v in vals]
    lo, hi = stats.t.interval(0.95, 2, loc=sum(m) / 3, scale=stats.sem(m))
    t = out["tests"][0]
    assert t["margin_ci"] == pytest.approx([lo, hi]) and t["per_seed"] == vals
    assert t["mean"] == pytest.approx(0.75) and t["std"] == pytest.approx(stats.tstd(vals))
    assert lo < 0 < hi                               # every seed holds, but 3 seeds this spread cannot be sure
    assert out["verdict"] == "inconclusive" and out["verdict_per_seed"] == {"0": "holds", "1": "holds", "2": "holds"}


def test_over_seeds_reaches_every_verdict():
    assert ev.over_seeds(_seed_claims([0.8, 0.85, 0.9]))[0]["verdict"] == "holds"
    assert ev.over_seeds(_seed_claims([0.1, 0.2, 0.3]))[0]["verdict"] == "fails"
    # two seeds hold and one fails: the interval straddles the threshold; "all seeds held" is not the rule
    mixed = ev.over_seeds(_seed_claims([0.55, 0.7, 0.4]))[0]
    assert mixed["verdict"] == "inconclusive" and list(mixed["verdict_per_seed"].values()) == ["holds", "holds", "fails"]
    # every seed holds, yet the spread is too wide to be sure
    assert ev.over_seeds(_seed_claims([0.51, 0.52, 1.5]))[0]["verdict"] == "inconclusive"
    nt = {0: _seed_claims([0.9])[0], 1: _seed_claims([0.9], pre=ev.precondition("p", 0, False))[0]}
    out = ev.over_seeds(nt)[0]
    assert out["verdict"] == "not testable here" and out["precondition_per_seed"]["1"]["met"] is False
    assert ev.over_seeds(_seed_claims([0.9]))[0]["verdict"] == "holds"                       # one seed
    # a measured threshold moves with its seed: margins are paired within the seed
    per = {s: [ev.claim("c", [ev.condition("x", v, ">", t)])] for s, (v, t) in enumerate([(1.1, 1.0), (2.1, 2.0),
                                                                                           (3.1, 3.0)])}
    assert ev.over_seeds(per)[0]["verdict"] == "holds"
    with pytest.raises(ValueError, match="different claims"):
        ev.over_seeds({0: [ev.claim("a", [ev.condition("x", 1, ">", 0)])],
                       1: [ev.claim("b", [ev.condition("x", 1, ">", 0)])]})


def test_over_seeds_threshold_text_names_each_seeds_measured_threshold():
    per = {s: [ev.claim("c", [ev.condition("x", v, "<=", t), ev.condition("y", 1.0, ">=", 0.5)])]
           for s, (v, t) in enumerate([(0.7, 0.8064), (0.6, 0.79), (0.75, 0.81)])}
    out = ev.over_seeds(per)[0]
    assert out["threshold"] == {"x": "<= 0.8064 / 0.79 / 0.81 (per seed)", "y": ">= 0.5"}   # y: one threshold
    assert out["tests"][0]["threshold_per_seed"] == [0.8064, 0.79, 0.81]
    assert out["tests"][1]["threshold_per_seed"] == [0.5, 0.5, 0.5]
    assert "x <= 0.8064 / 0.79 / 0.81 (per seed)" in ev.claims_markdown([out])[2]
    one = ev.over_seeds({0: per[0]})[0]                                                       # one seed: as before
    assert one["threshold"] == {"x": "<= 0.8064", "y": ">= 0.5"}


def test_over_seeds_pools_paired_proportions():
    per = {s: [ev.claim("c", [ev.paired_proportion([1] * 10, [1] * 10)])] for s in range(3)}
    assert [c["verdict"] for c in per[0]] == ["inconclusive"]                                 # 10 items a seed
    out = ev.over_seeds(per)[0]
    assert out["verdict"] == "holds" and out["tests"][0]["pooled"] == {"n": 30, "n10": 0, "n01": 0}


def test_claims_markdown_names_verdicts_preconditions_and_checks():
    held = ev.claim("a holds", [ev.condition("x", 1.5, ">=", 1.0)], "fine")
    nt = ev.claim("b", [], "", ev.precondition("a post-hoc point reaches it", 0.25, False))
    rows = ev.claims_markdown([held, nt], [ev.sanity("adapter starts equal", False, "diff 1e-3")])
    assert rows[:2] == ["| claim | value | threshold | verdict | detail |", "| --- | --- | --- | --- | --- |"]
    assert rows[2] == "| a holds | x 1.5 | x >= 1 | **holds** | fine |"
    assert rows[3] == "| b | - | - | **not testable here** | precondition not met: a post-hoc point reaches it (measured 0.25) |"
    assert rows[-1] == "- FAILED: adapter starts equal (diff 1e-3)"
    agg = ev.claims_markdown(ev.over_seeds(_seed_claims([0.8, 0.85, 0.9])))
    assert "(mean ± std over seeds)" in agg[0] and "**holds** (0: holds, 1: holds, 2: holds)" in agg[2]


def test_tune_refuses_reported_data_and_picks_the_best():
    pick = ev.tune([0.1, 0.3, 0.5], lambda p: (p - 0.3) ** 2, tuned_on=[100], reported=[0, 1, 2], what="p")
    assert pick["value"] == 0.3 and pick["scores"] == pytest.approx([0.04, 0.0, 0.04]) and pick["tuned_on"] == [100]
    assert ev.tune([1, 2], lambda v: v, tuned_on=["a"], reported=["b"], what="x", minimize=False)["value"] == 2
    with pytest.raises(ValueError, match="also uses"):
        ev.tune([0.1], lambda p: p, tuned_on=[0, 100], reported=[0, 1, 2], what="p")


def test_tune_extends_past_an_edge_pick_in_the_grids_geometric_step():
    import math
    seen = []
    loss = lambda lr: (math.log10(lr) + 5.2) ** 2          # optimum at lr = 10^-5.2, below the grid's 1e-4
    score = lambda lr: seen.append(lr) or loss(lr)
    pick = ev.tune([1e-4, 1e-3, 1e-2], score, tuned_on=["h"], reported=["r"], what="lr", extend=3)
    # 1e-4 is the grid's best: 1e-5 is scored (1e-4 squared over 1e-3), then 1e-5 is best: 1e-6; 1e-5 stays best
    assert pick["grid"] == pytest.approx([1e-6, 1e-5, 1e-4, 1e-3, 1e-2]) and pick["extended"] == 2
    assert pick["value"] == pytest.approx(1e-5) and seen == pytest.approx([1e-4, 1e-3, 1e-2, 1e-5, 1e-6])
    assert pick["scores"] == pytest.approx([loss(v) for v in pick["grid"]])
    # at most `extend` values, and upward as well
    up = ev.tune([1, 2], lambda v: -v, tuned_on=["h"], reported=["r"], what="x", extend=2)
    assert up["grid"] == [1, 2, 4, 8] and up["value"] == 8 and up["extended"] == 2
    inner = ev.tune([1, 2, 4], lambda v: (v - 2) ** 2, tuned_on=["h"], reported=["r"], what="x", extend=5)
    assert inner["grid"] == [1, 2, 4] and inner["extended"] == 0           # an inner best extends nothing
    with pytest.raises(ValueError, match="ascending grid"):
        ev.tune([3, 1], lambda v: v, tuned_on=["h"], reported=["r"], what="x", extend=1)


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


def test_mean_std_matches_statistics_and_skips_missing():
    import statistics
    xs = [0.3, 1.7, 2.25, -0.5]
    mu, sd = ev.mean_std(xs + [None, float("nan"), True])
    assert mu == pytest.approx(statistics.fmean(xs), abs=1e-15)
    assert sd == pytest.approx(statistics.stdev(xs), abs=1e-15)
    assert ev.mean_std([4.0]) == (4.0, 0.0)
    assert ev.mean_std([None]) == (None, None)
    assert ev.fmt_mean_std([1.0, 3.0], ".2f") == "2.00 ± 1.41"
    assert ev.fmt_mean_std([1.0, None], ".2f") == "1.00"
    assert ev.fmt_mean_std([], ".2f") == "-"
    # a pair computed earlier (locprobe keeps mean_std's result in results.json) prints the same way
    assert ev.fmt_pm(ev.mean_std([1.0, 3.0]), ".2f") == "2.00 ± 1.41"
    assert ev.fmt_pm((4.0, 0.0), ".1f") == "4.0 ± 0.0"
    assert ev.fmt_pm((None, None)) == "-"


def test_claims_table_escapes_bars_so_every_row_has_five_cells():
    c = ev.claim("1 |x - y| <= 0.15", [ev.condition("|diff|", 0.1, "<=", 0.15)], "a | b\nc")
    row = ev.claims_markdown([c])[2]
    cells = [x for x in re.split(r"(?<!\\)\|", row)[1:-1]]
    assert len(cells) == 5, row
    assert "\\|x - y\\|" in row and "\n" not in row
