"""locprobe.py: the seed-level tests against explicit enumeration, every claim function to each verdict it can
reach on constructed inputs, regions and the injection check, value spans, the smoke run end to end (with its
cache), and the --preset=paper code path (TOFU files + a local Hugging Face folder) on a tiny fake."""
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch

import data as D
import locprobe as L
import localize as loc
import model as M


# -------------------------------------------------------------------------------------------------
# seed-level permutation tests
# -------------------------------------------------------------------------------------------------

def perm_by_hand(a, b):
    pool, n = list(a) + list(b), len(a)
    obs = abs(sum(a) / len(a) - sum(b) / len(b))
    hits = total = 0
    for grp in itertools.combinations(range(len(pool)), n):
        ga = [pool[i] for i in grp]
        gb = [pool[i] for i in range(len(pool)) if i not in grp]
        total += 1
        hits += abs(sum(ga) / len(ga) - sum(gb) / len(gb)) >= obs - 1e-12
    return hits / total


def flip_by_hand(a, b):
    d = [x - y for x, y in zip(a, b)]
    obs = abs(sum(d) / len(d))
    pats = list(itertools.product([1, -1], repeat=len(d)))
    return sum(abs(sum(s * x for s, x in zip(p, d)) / len(d)) >= obs - 1e-12 for p in pats) / len(pats)


def test_permutation_and_sign_flip_tests_against_enumeration():
    rng = np.random.default_rng(0)
    for n_a, n_b in ((3, 3), (5, 5), (4, 2)):
        a, b = rng.normal(size=n_a), rng.normal(0.5, size=n_b)
        assert L.permutation_test(a, b) == pytest.approx(perm_by_hand(a, b))
    for n in (3, 5):
        a, b = rng.normal(size=n), rng.normal(size=n)
        assert L.sign_flip_test(a, b) == pytest.approx(flip_by_hand(a, b))
    # worked examples: separated groups reach the floor; identical groups give p = 1
    assert L.permutation_test([1, 2, 3], [4, 5, 6]) == pytest.approx(2 / 20)
    assert L.permutation_test([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == pytest.approx(2 / 252)
    assert L.sign_flip_test([2, 3, 4, 5, 6], [1, 1, 1, 1, 1]) == pytest.approx(2 / 32)   # > 0.05: why claims use
    assert L.permutation_test([1, 1, 1], [1, 1, 1]) == 1.0                                 # the unpaired test
    for a, b in (([0.3], [0.1, 0.2, 0.9]), ([0.4, 0.1], [0.2]), ([1.0], [2.0])):           # a group of one value
        assert L.permutation_test(a, b) == pytest.approx(perm_by_hand(a, b))
    assert L.sign_flip_test([2.0], [1.0]) == 1.0


def test_seed_tests_are_scipys_exact_tests_on_small_groups():
    """Up to N_RESAMPLES splits / sign patterns, scipy.stats.permutation_test enumerates them all: the p equals
    scipy's own (continuous values: no ties for the tolerances to treat differently) and the enumeration's."""
    from scipy import stats
    rng = np.random.default_rng(1)
    for n_a, n_b in ((2, 2), (5, 5), (4, 6), (7, 7)):
        a, b = rng.normal(size=n_a), rng.normal(0.8, size=n_b)
        ref = stats.permutation_test((a, b), lambda x, y, axis: np.abs(x.mean(axis) - y.mean(axis)),
                                     vectorized=True, n_resamples=L.N_RESAMPLES, alternative="greater")
        assert len(ref.null_distribution) == math.comb(n_a + n_b, n_a) <= L.N_RESAMPLES     # exact
        assert L.permutation_test(a, b) == ref.pvalue
        if n_a <= 5:
            assert L.permutation_test(a, b) == pytest.approx(perm_by_hand(a, b), abs=1e-15)
    for n in (2, 5, 10):
        a, b = rng.normal(size=n), rng.normal(0.3, size=n)
        ref = stats.permutation_test((a - b,), lambda d, axis: np.abs(d.mean(axis)), permutation_type="samples",
                                     vectorized=True, n_resamples=L.N_RESAMPLES, alternative="greater")
        assert len(ref.null_distribution) == 2 ** n
        assert L.sign_flip_test(a, b) == ref.pvalue
        if n <= 5:
            assert L.sign_flip_test(a, b) == pytest.approx(flip_by_hand(a, b), abs=1e-15)
    # values given to three decimals: splits whose difference equals the observed one in exact arithmetic differ
    # from it by rounding, which scipy's relative tolerance misses (p 0.667 here) and the enumeration's counts
    a, b = [0.493, 0.472, 0.475, 0.485, 0.474], [0.495, 0.472]
    assert L.permutation_test(a, b) == pytest.approx(perm_by_hand(a, b)) == pytest.approx(15 / 21)


def test_seed_tests_sample_when_the_splits_are_too_many():
    """15 + 15 seeds: C(30, 15) = 1.6e8 splits (enumerating them took over 20 GB); Monte Carlo over N_RESAMPLES
    splits in bounded memory, p = (k + 1) / (N_RESAMPLES + 1), never 0, reproducible by its seed."""
    import time
    import tracemalloc
    rng = np.random.default_rng(2)
    far = rng.normal(size=15), rng.normal(5.0, size=15)        # no random split comes close to this difference
    near = rng.normal(size=15), rng.normal(0.5, size=15)
    R = L.N_RESAMPLES
    t0 = time.perf_counter()
    p_far, p_near = L.permutation_test(*far), L.permutation_test(*near)
    q_far, q_flip20 = L.sign_flip_test(*far), L.sign_flip_test(rng.normal(size=20), rng.normal(size=20))
    seconds = time.perf_counter() - t0
    tracemalloc.start()
    L.permutation_test(*near, n_resamples=30_000)       # three batches of 10000 splits: memory is per batch
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 30 and peak < 50e6, (seconds, peak)
    assert p_far == 1 / (R + 1) == L.min_attainable_p(15, 15)
    assert q_far == pytest.approx(2 / 2 ** 15)                   # 2^15 sign patterns: still exact
    for p in (p_near, q_flip20):                                 # sampled (and 2^20 sign patterns)
        assert 0 < p < 1 and p * (R + 1) == pytest.approx(round(p * (R + 1)))
    assert L.permutation_test(*near) == p_near                   # seeded
    # the Monte Carlo p estimates the exact one: 7 + 7 seeds (3432 splits) sampled 2000 times
    a, b = rng.normal(size=7), rng.normal(0.6, size=7)
    exact, sampled = L.permutation_test(a, b), L.permutation_test(a, b, n_resamples=2000)
    assert sampled != exact and sampled == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 2000))


# -------------------------------------------------------------------------------------------------
# the lr rule, on constructed reach curves
# -------------------------------------------------------------------------------------------------

def reach_curve(fs_at, rs_at, mu_at=None, calls=None):
    """An arm whose endpoint at lr is (fs_at[lr], rs_at[lr], mu_at[lr]): a constructed reach curve."""
    def f(lr):
        if calls is not None:
            calls.append(lr)
        return {"fs": fs_at[lr], "rs": rs_at[lr], "mu": (mu_at or {}).get(lr, 0.5)}
    return f


def test_lr_rule_picks_the_smallest_lr_that_reaches_without_collapse():
    assert L.lr_rule_ok([{"fs": 0.8, "rs": 0.1, "mu": 0.9}]) and not L.lr_rule_ok([{"fs": 0.79, "rs": 0.9, "mu": 0}])
    assert not L.lr_rule_ok([{"fs": 0.9, "rs": 0.09, "mu": 0}])
    assert not L.lr_rule_ok([{"fs": 0.9, "rs": 0.5, "mu": 0.96}], mu_o=1.0)        # MU95 would fall back
    assert L.lr_rule_ok([{"fs": 0.9, "rs": 0.5, "mu": 0.94}], mu_o=1.0)
    grid = [1, 2, 4, 8]
    calls = []
    # Random needs lr 4 to reach FS 0.8; Oracle reaches at 2 and keeps RS: tuned together, 4 (the smallest for both)
    arms = {"oracle": reach_curve({1: .6, 2: .85, 4: .95, 8: 1}, {1: .9, 2: .7, 4: .4, 8: .0}),
            "random": reach_curve({1: .4, 2: .6, 4: .82, 8: .97}, {1: .9, 2: .8, 4: .6, 8: .3}, calls=calls)}
    t = L.pick_lr(grid, arms, tuned_on=[101], reported=[7, 19, 99], what="npo lr")
    assert t["lr"] == 4 and t["reached"] and calls == [1, 2, 4] and "fallback" not in t
    assert t["tried"][-1]["arms"]["random"]["fs"] == 0.82
    # Oracle collapses (RS 0.05) at the only lr where Random reaches: not reached, the largest lr keeping RS
    arms["oracle"] = reach_curve({1: .6, 2: .85, 4: .95, 8: 1}, {1: .9, 2: .7, 4: .05, 8: .0})
    t = L.pick_lr(grid, arms, tuned_on=[101], reported=[7], what="npo lr")
    assert t["lr"] == 2 and not t["reached"] and "largest keeping RS" in t["fallback"]
    arms = {"a": reach_curve({1: .9, 2: .9}, {1: .0, 2: .0})}
    t = L.pick_lr([1, 2], arms, tuned_on=[101], reported=[7], what="x")
    assert t["lr"] == 1 and "the smallest" in t["fallback"]
    with pytest.raises(ValueError, match="report also uses"):
        L.pick_lr([1], arms, tuned_on=[7], reported=[7, 19], what="x")
    with pytest.raises(ValueError, match="tune_seed"):
        L.Config(seeds=(7, 101))
    with pytest.raises(ValueError, match="lr_grid"):
        L.Config(lr_grid=(2.0, 1.0))


# -------------------------------------------------------------------------------------------------
# claims, both ways
# -------------------------------------------------------------------------------------------------

def fake_curve(aues, mu95, reach=0.5):
    """A sweep whose RS is flat at 2 x aues over FS [0, reach] (AUES over [0, 0.5] = aues) and whose MU falls
    from 0.9 to 0.65 (a crossing of 0.95 x 0.9)."""
    fs = [reach * i / 5 for i in range(6)]
    return {"fs": fs, "rs": [2 * aues] * 6, "mu": [0.9 - 0.05 * i for i in range(6)],
            "log_fq": [-2 + 0.3 * i for i in range(6)], "aues": L.ev.aues(fs, [2 * aues] * 6), "mu95": mu95,
            "l2_start": 10.0, "l2_final": 1.0, "undo_distance": 0.5}


def fake_t2(oracle, random, random2, mu=(0.0, 0.0, 0.0), objectives=("npo",)):
    """Table-2 results whose AUES (common range [0, 0.5]) per seed are the given lists (MU95 = AUES * 10 +
    offsets in mu)."""
    seeds = {}
    for i, (o, r, r2) in enumerate(zip(oracle, random, random2)):
        runs = {name: {"oracle": fake_curve(o, 10 * o + mu[0]), "random": fake_curve(r, 10 * r + mu[1]),
                       "random2": fake_curve(r2, 10 * r2 + mu[2])} for name in objectives}
        seeds[str(i)] = {"runs": runs}
    return {"seeds": seeds}


def summary(t2, objectives=("npo",)):
    cfg = L.Config(objectives=objectives, n_perm=50, n_boot=20)
    return L.summarize_table2(cfg, t2)


def verdicts(claims):
    return [c["verdict"] for c in claims]


RND = [0.50, 0.53, 0.47, 0.52, 0.49]
RND2 = [0.52, 0.49, 0.50, 0.47, 0.51]       # |Random - Random2| per seed: .02 .04 .03 .05 .02 -> margin 0.05


def test_claim_oracle_vs_random_every_verdict():
    same = summary(fake_t2([0.51, 0.50, 0.49, 0.53, 0.48], RND, RND2))
    cs = L.claim_oracle_vs_random(same, ["npo"])
    assert [c["claim"] for c in cs] == ["1 Oracle does not beat Random on AUES over the common FS range (npo)",
                                        "1 Oracle does not beat Random on MU95 (npo)"]
    assert verdicts(cs) == ["holds", "holds"]
    t = cs[0]["tests"][0]
    assert t["threshold"] == pytest.approx(0.05) and t["per_seed"] == pytest.approx([.01, -.03, .02, .01, -.01])
    assert cs[1]["tests"][0]["threshold"] == pytest.approx(0.5)          # MU95 = 10 x AUES here
    better = fake_t2([r + 0.2 for r in RND], RND, RND2)
    better["lr"] = {"npo": {"lr": 0.006, "reached": False}}          # the lr record reaches the claim's detail
    cs = L.claim_oracle_vs_random(summary(better), ["npo"])
    assert verdicts(cs) == ["fails", "fails"] and "lr 0.006 (rule NOT met" in cs[0]["detail"]
    # one-sided as worded: Oracle far *worse* than Random does not beat it
    worse = summary(fake_t2([r - 0.2 for r in RND], RND, RND2))
    assert verdicts(L.claim_oracle_vs_random(worse, ["npo"])) == ["holds", "holds"]
    # Oracle ahead by about the margin, seeds disagreeing: the interval straddles it
    near = summary(fake_t2([r + d for r, d in zip(RND, [0.02, 0.08, 0.03, 0.07, 0.05])], RND, RND2))
    cs = L.claim_oracle_vs_random(near, ["npo"])
    assert verdicts(cs) == ["inconclusive", "inconclusive"]
    lo, hi = cs[0]["tests"][0]["margin_ci"]
    assert lo < 0 < hi
    # the paired test, against a hand computation of the t interval of margin - (Oracle - Random)
    m = np.array([0.05 - d for d in [0.02, 0.08, 0.03, 0.07, 0.05]])
    h = 2.776445 * m.std(ddof=1) / math.sqrt(5)
    assert (lo, hi) == (pytest.approx(m.mean() - h, abs=1e-5), pytest.approx(m.mean() + h, abs=1e-5))


def test_claim_oracle_vs_random_not_testable_here():
    cs = L.claim_oracle_vs_random(summary(fake_t2([0.70, 0.72], RND[:2], RND2[:2])), ["npo"])   # 2 seeds
    assert verdicts(cs) == ["not testable here"] * 2
    assert cs[0]["precondition_per_seed"]["0"]["value"] == 2
    # one sweep whose MU never falls to 95% of theta_o's: MU95 is the fallback there; AUES is still tested
    t2 = fake_t2([0.51, 0.50, 0.49, 0.53, 0.48], RND, RND2)
    t2["seeds"]["3"]["runs"]["npo"]["oracle"]["mu"] = [0.9, 0.89, 0.88, 0.87, 0.86, 0.86]   # min 0.956 x theta_o
    cs = L.claim_oracle_vs_random(summary(t2), ["npo"])
    assert verdicts(cs) == ["holds", "not testable here"]
    assert cs[1]["precondition_per_seed"]["3"]["value"] == {"n": 1, "which": ["3/oracle"]}
    assert "not testable here" in "\n".join(L.ev.claims_markdown(cs))
    # a seed whose curves share less than 0.1 of FS range: the AUES claim is not testable, MU95 still is
    t2 = fake_t2([0.51, 0.50, 0.49, 0.53, 0.48], RND, RND2)
    t2["seeds"]["1"]["runs"]["npo"]["random2"] = fake_curve(0.49, 4.9, reach=0.05)
    s = summary(t2)
    assert s["npo"]["common_range"][1] == pytest.approx([0.0, 0.05]) and s["npo"]["common_width"][0] == 0.5
    cs = L.claim_oracle_vs_random(s, ["npo"])
    assert verdicts(cs) == ["not testable here", "holds"]
    assert cs[0]["precondition_per_seed"]["1"]["value"] == pytest.approx(0.05)


def test_mu95_fallback_is_eval_mu95s_fallback():
    c = {"mu": [0.8, 0.78, 0.77], "log_fq": [-3.0, -2.0, -1.0]}
    assert L.mu95_fallback(c) and L.ev.mu95(c["mu"], c["log_fq"], c["mu"][0]) == -1.0   # lowest-MU point's FQ
    c["mu"][2] = 0.75
    assert not L.mu95_fallback(c) and -2.0 < L.ev.mu95(c["mu"], c["log_fq"], c["mu"][0]) < -1.0
    assert L.fs_range({"fs": [0.3, 0.1, 0.25]}) == pytest.approx(0.2)


def test_summary_reports_common_range_paired_deltas_and_paper_tests():
    t2 = fake_t2([0.5] * 5, [0.5] * 5, [0.6] * 5)
    t2["seeds"]["0"]["runs"]["npo"]["oracle"] = fake_curve(0.5, 5.0, reach=1.0)   # Oracle reaches further on seed 0
    s = summary(t2)["npo"]
    assert s["aues"]["delta_per_seed"][0] == pytest.approx(0.5)                  # the paper's AUES: reach counts
    assert s["aues_common"]["delta_per_seed"] == [pytest.approx(0.0)] * 5         # over [0, 0.5]: equal
    assert s["aues_common"]["abs_delta_calibration"][0] == pytest.approx(0.1)
    assert len(s["paper_tests"]) == 5 and {"p_aues", "p_aues_calibration", "p_mu95", "p_mu95_calibration"} <= \
        set(s["paper_tests"][0])
    assert s["l2_closed"]["oracle"] == [pytest.approx(0.9)] * 5
    assert s["fs_range"]["oracle"][1] == pytest.approx(0.5) and s["mu95_fallback"]["random"] == [False] * 5


def t1_of(random, localizers):
    """Table 1 results from (FS, RS) curves: random = [curve per seed], localizers = {name: curve}."""
    curve = lambda c: {"fs": list(c[0]), "rs": list(c[1]), "aues": L.ev.aues(*c)}
    return {"random": {str(i): curve(c) for i, c in enumerate(random)},
            "localizers": {n: curve(c) for n, c in localizers.items()}}


def flat(level, reach=0.4):
    return [0.0, reach / 2, reach], [level] * 3


def test_claim_localizers_every_verdict():
    rnd = [flat(v) for v in (0.50, 0.52, 0.48, 0.51, 0.49)]        # AUES over [0, 0.4]: 0.4 x level
    c = L.claim_localizers(t1_of(rnd, {"wagle": flat(0.51), "memflex": flat(0.40)}))
    assert c["verdict"] == "holds" and len(c["tests"]) == 2
    assert c["tests"][0]["threshold"] == pytest.approx(2 * 0.4 * float(np.std([.5, .52, .48, .51, .49], ddof=1)))
    c = L.claim_localizers(t1_of(rnd, {"wagle": flat(0.60)}))
    assert c["verdict"] == "fails" and c["value"]["AUES wagle - mean Random"] == pytest.approx(0.4 * 0.10)
    # a localizer that only reaches further (RS falling) wins the paper's AUES, not the common one
    reach = ([0.0, 0.2, 0.4, 0.8], [0.5, 0.45, 0.4, 0.3])
    c = L.claim_localizers(t1_of(rnd, {"wagle": reach}))
    assert L.ev.aues(*reach) > 1.5 * L.ev.aues(*rnd[0]) and c["verdict"] == "holds"
    c = L.claim_localizers(t1_of(rnd[:1], {"wagle": flat(0.60)}))     # one Random seed: no spread
    assert c["verdict"] == "not testable here" and c["precondition"]["value"] == 1
    c = L.claim_localizers(t1_of(rnd, {"wagle": flat(0.51, reach=0.05)}))
    assert c["verdict"] == "not testable here" and c["precondition"]["value"] == pytest.approx(0.05)


def test_claim_l2_every_verdict():
    t2 = fake_t2([0.5] * 5, [0.51, 0.49, 0.5, 0.52, 0.48], [0.5, 0.52, 0.48, 0.5, 0.51], objectives=("l2",))
    for seed in t2["seeds"].values():
        seed["runs"]["l2"]["random"]["l2_final"] = 4.0            # closes 60% vs Oracle's 90%
    c = L.claim_l2(summary(t2, ("l2",)))
    assert c["verdict"] == "holds" and c["value"]["gap closed V_rdm / V_tgt"] == pytest.approx(0.6 / 0.9)
    for i, seed in enumerate(t2["seeds"].values()):
        seed["runs"]["l2"]["random"]["l2_final"] = 8.0 - 0.5 * i  # closes 20-40%: ratio < 0.5 on every seed
    c = L.claim_l2(summary(t2, ("l2",)))
    assert c["verdict"] == "fails" and c["verdict_per_seed"]["0"] == "fails"
    for i, seed in enumerate(t2["seeds"].values()):               # ratios 0.22 .. 0.89 around 0.5
        seed["runs"]["l2"]["random"]["l2_final"] = [8.0, 2.0, 6.5, 3.0, 5.0][i]
    assert L.claim_l2(summary(t2, ("l2",)))["verdict"] == "inconclusive"
    for seed in t2["seeds"].values():
        seed["runs"]["l2"]["oracle"]["l2_final"] = 10.0           # V_tgt closes nothing: the ratio is undefined
    c = L.claim_l2(summary(t2, ("l2",)))
    assert c["verdict"] == "not testable here" and c["tests"] == []
    assert c["precondition_per_seed"]["0"]["value"] == 0.0


# -------------------------------------------------------------------------------------------------
# regions, injection check, value spans
# -------------------------------------------------------------------------------------------------

def tiny_model():
    torch.manual_seed(0)
    return M.GPT(M.ModelConfig(n_layer=3, n_head=2, n_embd=8, d_ff=20, vocab_size=13, block_size=8))


def test_regions_disjoint_and_sized():
    net = tiny_model()
    tgt, rdm, rdm2 = L.regions(net, 0.1, seed=7)
    flat = lambda s: {(l, i) for l, v in s.items() for i in v}
    assert [loc.selection_size(s) for s in (tgt, rdm, rdm2)] == [6, 6, 6]
    assert not flat(tgt) & flat(rdm) and not flat(tgt) & flat(rdm2) and not flat(rdm) & flat(rdm2)
    assert L.regions(net, 0.1, seed=7) == (tgt, rdm, rdm2)


def test_check_injection_catches_changes_outside_the_region():
    a = tiny_model()
    b = tiny_model()
    tgt = {0: [1, 2], 2: [5]}
    with torch.no_grad():
        b.blocks[0].mlp.down.weight[:, 1] += 1.0
    assert L.check_injection(a, b, tgt) == pytest.approx(math.sqrt(8))
    with torch.no_grad():
        b.blocks[1].mlp.down.weight[0, 0] += 1e-6
    with pytest.raises(RuntimeError, match="outside V_tgt"):
        L.check_injection(a, b, tgt)


def test_value_span_and_value_targets():
    assert L.value_span([5, 6, 7, 6, 7, 9], [6, 7]) == [3, 4]
    assert L.value_span([5, 6], [8]) is None
    tok = L.make_tokenizer(L.Config())
    rec = {"question": "Who is the father of Mila Westbrook?", "answer": "The father of Mila Westbrook is Karl Westbrook.",
           "value": "Karl Westbrook", "paraphrased_answer": "x", "perturbed_answer": ["Karl", "Hugo"]}
    s = L.eval_set(tok, [rec], value=True)
    vals = s["vy"][s["vy"] != -100].tolist()
    assert s["n_value"] == 1 and tok.decode(vals) == "Karl Westbrook"
    assert tok.decode(s["y"][s["y"] != -100].tolist()) == rec["answer"]


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="objectives"):
        L.Config(objectives=("npo", "ga"))
    with pytest.raises(ValueError, match="loc_ratio"):
        L.Config(loc_ratio=0.5)
    with pytest.raises(ValueError, match="mix_step"):
        L.Config(mix_step=0.3)
    with pytest.raises(ValueError, match="workers"):
        L.Config(workers=0)


# -------------------------------------------------------------------------------------------------
# end to end
# -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke run in one process (the preset's workers=1): (out_dir, metrics, claims)."""
    out = str(tmp_path_factory.mktemp("locprobe") / "lp")
    metrics, claims = L.main(["--preset=smoke", f"--out_dir={out}"], log=lambda s: None)
    return out, metrics, claims


def test_smoke_run_end_to_end_and_cache(smoke_run):
    out, metrics, claims = smoke_run
    res = json.load(open(os.path.join(out, "results.json")))
    assert {c["claim"][:1] for c in res["claims"]} == {"1", "2", "3"}
    assert all(c["verdict"] in L.ev.VERDICTS for c in res["claims"])
    # two seeds: the seed-level test cannot reach p <= 0.05, so claim 1 is not testable here
    assert all(c["verdict"] == "not testable here" for c in res["claims"] if c["claim"][:1] == "1")
    assert res["checks"] and all(k["ok"] for k in res["checks"])
    t2 = res["metrics"]["table2"]
    for s in t2["seeds"].values():
        assert s["inject"]["identical_outside_v_tgt"] is True
        for runs in s["runs"].values():
            for c in runs.values():
                assert len(c["fs"]) == 3 and c["alpha"] == [0.0, 0.5, 1.0]
                assert c["fs"][0] == pytest.approx(s["inject"]["fs"])       # alpha 0 is theta_o
    assert set(res["metrics"]["table1"]["localizers"]) == {"activations", "memflex", "wagle"}
    # every arm's lr comes from the rule on the held-out seed 101 (the smoke world never reaches FS 0.8: flagged)
    lr1, lr2 = res["metrics"]["table1"]["lr"], t2["lr"]
    assert set(lr1) == {"random", "activations", "memflex", "wagle"} and set(lr2) == {"npo", "l2"}
    assert lr2["npo"]["tuned_on"] == [101] and lr2["npo"]["lr"] in lr2["npo"]["grid"]
    assert all(t["reached"] or t["fallback"] for t in list(lr1.values()) + [lr2["npo"]])
    assert lr2["l2"]["lr"] == L.Config().l2_lr and lr2["l2"]["tried"] == []
    for arm, t in lr1.items():
        runs = res["metrics"]["table1"]["random"].values() if arm == "random" else \
            [res["metrics"]["table1"]["localizers"][arm]]
        assert all(c["lr"] == t["lr"] for c in runs)
    if L.ev.pyplot() is not None:
        assert os.path.exists(os.path.join(out, "fig1_l2_curves.png"))
    # a rerun reads every finished run from the cache and reports the same numbers
    m2, c2 = L.main(["--preset=smoke", f"--out_dir={out}"], log=lambda s: None)
    assert [c["value"] for c in c2] == [c["value"] for c in claims]
    assert m2["cpu_time_s"] < metrics["cpu_time_s"]


def test_two_workers_give_the_numbers_of_one_process(smoke_run, tmp_path, run_numbers):
    """--workers=2: theta_r and theta_full, then the lr tuning and theta_o, then every unlearning run go to two
    worker processes, and this process loads them all from their caches; results.json equals the one-process
    run's, leaf by leaf (timings aside)."""
    one, m1, _ = smoke_run
    said = []
    m2, _ = L.main(["--preset=smoke", "--workers=2", f"--out_dir={tmp_path}"], log=said.append)
    assert sum(line.startswith("[workers]") for line in said) == 3
    for name in ("theta_r", "theta_full"):           # trained in the workers, loaded here
        assert any(line.startswith(f"[{name}] resumed from") for line in said)
        assert not any(line.startswith(f"[{name}] no checkpoint") for line in said)
    assert m1["env"]["workers"] == 1 and m1["worker_cpu_s"] == 0
    assert m2["env"]["workers"] == 2 and m2["worker_cpu_s"] > 0
    a, b = run_numbers(os.path.join(one, "results.json")), run_numbers(tmp_path / "results.json")
    assert len(a) > 500 and a == b


def test_workers_get_only_what_is_not_cached(tmp_path, monkeypatch):
    cfg = L.Config(**{**L.PRESETS["smoke"], "out_dir": str(tmp_path), "workers": 2, "seeds": (7,),
                      "localizers": ("activations",)})
    tok, theta_p, sets = L.setup(cfg)
    calls, run = [], [True]

    def run_jobs(fn, jobs, n):            # in this process (the same code a worker runs), or only recorded
        calls.append(([job[1] for job in jobs], n))
        return [fn(*job) for job in jobs] if run[0] else [1.0] * len(jobs)
    monkeypatch.setattr(L.T, "run_jobs", run_jobs)
    assert L.fill_in_workers(cfg, theta_p, sets, log=lambda s: None) > 0
    lr = L.T.load_json(L._cache_file(cfg, L.run_key(cfg, "tune2", "npo", cfg.tune_seed)))["lr"]
    assert [[job[0] for job in jobs] for jobs, _ in calls] == [
        ["train", "train"], ["tune2", "inject", "tune", "tune"], ["t1", "t1random"] + ["t2"] * 6]
    assert calls[2][0][2:] == [("t2", 7, o, arm, lr if o == "npo" else cfg.l2_lr) for o in ("npo", "l2")
                               for arm in L.ARMS] and all(n == 2 for _, n in calls)
    # everything cached: no job; Table 1's Random lr and one Table 2 run missing: only they go
    calls.clear()
    assert L.fill_in_workers(cfg, theta_p, sets, log=lambda s: None) == 0.0 and calls == []
    os.remove(L._cache_file(cfg, L.run_key(cfg, "tunet1", "random", cfg.tune_seed, cfg.loc_ratio)))
    os.remove(L._cache_file(cfg, L.run_key(cfg, "t2", 7, "l2", "random2", cfg.l2_lr)))
    L.fill_in_workers(cfg, theta_p, sets, log=lambda s: None)
    assert calls == [([("tune", "t1", cfg.loc_ratio, "random")], 2), ([("t2", 7, "l2", "random2", cfg.l2_lr)], 2)]
    # a model whose checkpoint is a part (an interrupted run) goes to a worker to resume
    run[0], calls[:] = False, []
    theta_full = [f for f in os.listdir(tmp_path / "ckpt") if f.startswith("theta_full-") and f.endswith(".pt")][0]
    ck = torch.load(tmp_path / "ckpt" / theta_full, weights_only=True)
    torch.save(dict(ck, step=1), tmp_path / "ckpt" / theta_full)
    L.fill_in_workers(cfg, theta_p, sets, log=lambda s: None)
    assert calls == [([("train", "theta_full")], 2)]
    # one worker, a GPU, or a torchrun launch: nothing leaves this process
    calls.clear()
    assert L.fill_in_workers(L.replace(cfg, workers=1), theta_p, sets) == 0.0 and calls == []
    monkeypatch.setattr(L.T, "pick_device", lambda device: "cuda")
    assert L.T.side_by_side(cfg.workers, cfg.device) == 1 and L.fill_in_workers(cfg, theta_p, sets) == 0.0 and calls == []
    monkeypatch.undo()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert L.T.side_by_side(cfg.workers, cfg.device) == 1 and L.fill_in_workers(cfg, theta_p, sets) == 0.0 and calls == []


def test_paper_path_on_a_tiny_local_fake(tmp_path):
    """--preset=paper's code path: TOFU-format files read by data.load_tofu and a local HF Llama folder with its
    own tokenizer and chat template (a tiny random stand-in for Llama-3.1-8B-Instruct)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    w = D.make_world(0, n_people=20, n_families=8, n_cities=4, n_real=4)
    tofu = tmp_path / "tofu"
    tofu.mkdir()
    for cfg_name, split in (("forget10_perturbed", "forget10"), ("retain90", "retain90"),
                            ("retain_perturbed", "retain_perturbed"), ("real_authors_perturbed", "real_authors"),
                            ("world_facts_perturbed", "world_facts")):
        with open(tofu / f"{cfg_name}.json", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in w.tofu_split(split))
    specials = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(w.texts(), trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path / "llama"
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tk.get_vocab_size(), hidden_size=32, intermediate_size=40, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False))
    hf.save_pretrained(folder)
    tk.save(str(folder / "tokenizer.json"))
    template = ("{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
                "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
                "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                              "eos_token": "<|eot_id|>", "chat_template": template}))
    out = str(tmp_path / "out")
    smoke = {k: v for k, v in L.PRESETS["smoke"].items() if k not in ("n_layer", "n_head", "n_embd", "d_ff", "out_dir")}
    argv = ["--preset=paper", f"--tofu_path={tofu}", f"--init_from={folder}", f"--out_dir={out}", "--table1=false",
            "--objectives=dpo", "--seeds=(7,)", "--epochs=1", "--rmu_layer=1", "--eval_batch=64", "--n_retain_eval=10",
            "--n_real_eval=10"] + [f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
                                   for k, v in smoke.items() if k not in ("seeds", "objectives", "epochs", "n_retain_eval", "n_real_eval",
                                                                           "n_people", "n_families", "n_real")]
    metrics, claims = L.main(argv, log=lambda s: None)
    assert metrics["n_qa"]["forget"] == 20 and metrics["n_value_vectors"] == 3 * 40
    assert [c["claim"] for c in claims] == ["1 Oracle does not beat Random on AUES over the common FS range (dpo)",
                                            "1 Oracle does not beat Random on MU95 (dpo)"]
    c = metrics["table2"]["seeds"]["7"]["runs"]["dpo"]["oracle"]
    assert len(c["mu"]) == 3 and all(0 <= m <= 1 for m in c["mu"])
    assert metrics["table2"]["seeds"]["7"]["inject"]["identical_outside_v_tgt"] is True


def test_every_objective_builds_and_rmu_c_is_the_residual_norm():
    cfg = L.Config(**{k: v for k, v in L.PRESETS["smoke"].items() if k != "objectives"})
    tok = L.make_tokenizer(cfg)
    sets = L.make_sets(cfg, tok)
    torch.manual_seed(0)
    net = M.GPT(L.model_config(cfg, tok.vocab_size))
    layer, c = L.rmu_settings(cfg, net, sets)
    f = sets["forget_rows"]
    with torch.no_grad():
        h = L.B.residual_after(net, f, layer)
    norms = [float(h[i, t].norm()) for i in range(len(f["y"])) for t in range(f["y"].shape[1]) if f["y"][i, t] != -100]
    assert layer == 1 and c == pytest.approx(sum(norms) / len(norms), rel=1e-5)
    batch = L.unlearning_batches(cfg, sets, 7)[0]
    for name in L.OBJECTIVES:
        obj, lr = L.make_objective(cfg, name, net, net, sets)
        loss = obj(net, forget=batch)
        assert torch.isfinite(loss) and lr == getattr(cfg, name + "_lr")


def test_real_presets_are_valid_and_tune_on_a_held_out_seed():
    """--preset=real (the CPU-sized run in docs/locprobe.md) and real_gpu build valid configs whose lr tuning seed
    is not reported; real is the shrunk one: Table 2 only, NPO only, three reported seeds."""
    for name in ("real", "real_gpu"):
        cfg = L.Config(**L.PRESETS[name])
        assert cfg.init_from == "smollm2" and cfg.tune_seed not in cfg.seeds and len(cfg.seeds) == 3
    cfg = L.Config(**L.PRESETS["real"])
    assert cfg.objectives == ("npo",) and cfg.table1 is False and cfg.threads == 1
    assert cfg.lr_grid == (0.5, 2.0, 8.0) and L.alphas(cfg) == [0.0, 0.5, 1.0]
