"""eval.common_fs_range / aues_over (AUES over a shared FS range) against a fine-grid integral and hand-made
curves, eval.mu95_checked's fallback flags, eval.tune_first's rule and its refusal to tune on reported seeds."""
import numpy as np
import pytest

import eval as ev


def fine_area(fs, rs, lo, hi, n=200_001):
    """The slow, obvious reference: the piecewise-linear RS(FS) sampled on a fine grid, trapezoid-summed."""
    o = np.argsort(fs, kind="stable")
    x = np.linspace(lo, hi, n)
    y = np.interp(x, np.asarray(fs, float)[o], np.asarray(rs, float)[o])
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def test_aues_over_hand_made_curves():
    # RS = 1 on FS [0, 0.3] then a line down to 0 at FS 0.9: area on [0, 0.3] is 0.3; on [0, 0.6] 0.3 + 0.225
    fs, rs = [0.0, 0.3, 0.9], [1.0, 1.0, 0.0]
    assert ev.aues_over(fs, rs, 0.0, 0.3) == pytest.approx(0.3)
    assert ev.aues_over(fs, rs, 0.0, 0.6) == pytest.approx(0.3 + 0.3 * (1 + 0.5) / 2)
    assert ev.aues_over(fs, rs, 0.2, 0.2) == 0.0
    # the whole range is eval.aues; unsorted points and a vertical step (equal FS) agree with the fine grid
    rng = np.random.default_rng(0)
    for _ in range(5):
        f, r = rng.random(9), rng.random(9)
        assert ev.aues_over(f, r, f.min(), f.max()) == pytest.approx(ev.aues(f, r))
        lo, hi = np.sort(rng.uniform(f.min(), f.max(), 2))
        assert ev.aues_over(f, r, lo, hi) == pytest.approx(fine_area(f, r, lo, hi), abs=1e-6)
    f, r = [0.0, 0.2, 0.2, 0.5], [1.0, 1.0, 0.5, 0.5]
    assert ev.aues_over(f, r, 0.0, 0.5) == pytest.approx(ev.aues(f, r)) == pytest.approx(0.2 + 0.15)


def test_common_range_compares_like_with_like():
    # Random reaches FS 0.3 with RS near 1, a localizer FS 0.8 with RS falling. Over each
    # curve's own range the localizer "wins" by reach; over the shared range [0, 0.3] Random is higher.
    rnd = ([0.0, 0.1, 0.2, 0.3], [1.0, 0.98, 0.96, 0.95])
    locz = ([0.0, 0.2, 0.4, 0.8], [1.0, 0.9, 0.7, 0.3])
    assert ev.aues(*locz) > ev.aues(*rnd)
    lo, hi = ev.common_fs_range([rnd[0], locz[0]])
    assert (lo, hi) == (0.0, 0.3)
    assert ev.aues_over(*rnd, lo, hi) > ev.aues_over(*locz, lo, hi)
    assert ev.aues_over(*locz, lo, hi) == pytest.approx(fine_area(*locz, lo, hi), abs=1e-6)
    lo, hi = ev.common_fs_range([[0.5, 0.6], [0.0, 0.4]])      # curves that do not overlap
    assert hi < lo
    with pytest.raises(ValueError, match="outside the curve's FS range"):
        ev.aues_over(*rnd, 0.0, 0.5)
    with pytest.raises(ValueError, match="hi must be >= lo"):
        ev.aues_over(*rnd, 0.2, 0.1)
    with pytest.raises(ValueError, match="at least one curve"):
        ev.common_fs_range([[0.1]])


def test_mu95_checked_flags_both_fallbacks():
    fq = [-3.0, -2.0, -1.0]
    c = ev.mu95_checked([0.8, 0.78, 0.77], fq, 0.8)         # never below 0.76: the lowest-MU point's FQ
    assert c["fallback"] == "never_falls" and c["mu95"] == -1.0 == ev.mu95([0.8, 0.78, 0.77], fq, 0.8)
    c = ev.mu95_checked([0.8, 0.78, 0.70], fq, 0.8)         # a crossing between the last two points
    assert c["fallback"] is None and c["mu95"] == pytest.approx(-2.0 + (0.78 - 0.76) / (0.78 - 0.70))
    assert c["target"] == pytest.approx(0.76) and c["mu_range"] == [0.70, 0.8]
    c = ev.mu95_checked([0.5, 0.4, 0.3], fq, 0.8)           # every point below: the highest-MU point's FQ
    assert c["fallback"] == "always_below" and c["mu95"] == -3.0


def test_tune_first_picks_the_smallest_reaching_value_on_held_out_seeds():
    # a constructed reach curve: FS at the endpoint rises with lr, RS collapses at the largest lr
    fs = {1: 0.5, 2: 0.7, 4: 0.85, 8: 0.99}
    rs = {1: 0.9, 2: 0.8, 4: 0.6, 8: 0.0}
    seen = []

    def check(lr):
        seen.append(lr)
        return {"ok": fs[lr] >= 0.8 and rs[lr] >= 0.1, "fs": fs[lr], "rs": rs[lr]}
    t = ev.tune_first([1, 2, 4, 8], check, tuned_on=[101], reported=[7, 19], what="lr")
    assert t["value"] == 4 and t["reached"] and seen == [1, 2, 4] and [r["value"] for r in t["tried"]] == [1, 2, 4]
    assert t["tried"][-1]["fs"] == 0.85
    t = ev.tune_first([1, 2, 8], check, tuned_on=[101], reported=[7], what="lr")   # 8 collapses RS: none passes
    assert t["value"] is None and not t["reached"] and len(t["tried"]) == 3
    with pytest.raises(ValueError, match=r"\['7'\]"):
        ev.tune_first([1], check, tuned_on=[7], reported=["7", 19], what="lr")
    with pytest.raises(ValueError, match="'ok'"):
        ev.tune_first([1], lambda g: {"fs": 1}, tuned_on=[1], reported=[2], what="lr")
