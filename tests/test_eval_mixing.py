"""eval.py: model mixing (localization paper App. B: (1 - alpha) theta_o + alpha theta), AUES (area under the
FS-RS curve), MU95 (FQ where MU falls to 95% of the original), and App. D's AUES permutation test and MU95
bootstrap test, each against a slow reference, a worked example or exact enumeration."""
import itertools

import numpy as np
import pytest
import torch

import eval as ev
from model import GPT, ModelConfig


def tiny(seed):
    torch.manual_seed(seed)
    return GPT(ModelConfig(flavor="llama", vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=16, d_ff=32,
                           bias=False)).eval()


# --- model mixing --------------------------------------------------------------------------------

def test_mix_state_dicts_elementwise():
    a, b = tiny(0), tiny(1)
    mixed = ev.mix_state_dicts(a.state_dict(), b.state_dict(), 0.3)
    for k, v in a.state_dict().items():
        want = 0.7 * v.double() + 0.3 * b.state_dict()[k].double()
        assert torch.allclose(mixed[k].double(), want, atol=1e-6), k
    with pytest.raises(ValueError):
        ev.mix_state_dicts(a.state_dict(), {k: v for k, v in b.state_dict().items() if "blocks.1" not in k}, 0.5)
    other = GPT(ModelConfig(flavor="llama", vocab_size=30, block_size=16, n_layer=2, n_head=2, n_embd=16, d_ff=48,
                            bias=False))
    with pytest.raises(ValueError):
        ev.mix_state_dicts(a.state_dict(), other.state_dict(), 0.5)


def test_mix_models_endpoints_and_sweep():
    a, b = tiny(0), tiny(1)
    x = torch.randint(0, 30, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a(x)[0], b(x)[0]
        assert torch.allclose(ev.mix_models(a, b, 0.0)(x)[0], la, atol=1e-6)   # alpha = 0: the original
        assert torch.allclose(ev.mix_models(a, b, 1.0)(x)[0], lb, atol=1e-6)   # alpha = 1: the unlearned
        mid = ev.mix_models(a, b, 0.5)(x)[0]
    assert not torch.allclose(mid, la) and not torch.allclose(mid, lb)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    alphas = [0.0, 0.25, 1.0]
    out = ev.mixing_sweep(a, b, alphas, lambda m: m.blocks[0].mlp.down.weight[0, 0].item())
    w_a, w_b = a.blocks[0].mlp.down.weight[0, 0].item(), b.blocks[0].mlp.down.weight[0, 0].item()
    assert out == pytest.approx([(1 - t) * w_a + t * w_b for t in alphas], abs=1e-6)
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in before.items())     # inputs untouched


# --- AUES ----------------------------------------------------------------------------------------

def test_forget_and_retain_strength():
    assert ev.strengths([1.0, 0.5, 0.0, 0.5], [0.25, 0.75]) == (0.5, 0.5)
    assert ev.strengths(torch.tensor([0.2, 0.4]), [1.0]) == pytest.approx((0.7, 1.0))
    with pytest.raises(ValueError):
        ev.strengths([], [1.0])


def aues_reference(fs, rs):
    pts = sorted(zip(fs, rs), key=lambda p: p[0])
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(pts, pts[1:]))


def test_aues_worked_example_and_reference():
    # RS = 1 up to FS = 0.5, then falling linearly to 0 at FS = 1: area 0.5 + 0.25
    assert ev.aues([0.0, 0.5, 1.0], [1.0, 1.0, 0.0]) == pytest.approx(0.75)
    assert ev.aues([1.0, 0.0, 0.5], [0.0, 1.0, 1.0]) == pytest.approx(0.75)        # order of points is irrelevant
    rng = np.random.default_rng(0)
    for _ in range(5):
        fs, rs = rng.random(21), rng.random(21)
        assert ev.aues(fs, rs) == pytest.approx(aues_reference(fs, rs))
    with pytest.raises(ValueError):
        ev.aues([0.5], [0.5])


def curves(rng, n=12, gap=0.0):
    alpha = np.linspace(0, 1, n)
    # FS nearly the same at each alpha for both (alpha = 0 is theta_o for both), RS noisier
    fs_a = 0.1 + 0.8 * alpha + 0.002 * rng.standard_normal(n)
    rs_a = 0.95 - 0.5 * alpha ** 2 + 0.02 * rng.standard_normal(n)
    fs_b = 0.1 + 0.8 * alpha + 0.002 * rng.standard_normal(n)
    rs_b = 0.95 - 0.5 * alpha ** 2 - gap + 0.02 * rng.standard_normal(n)
    return fs_a, rs_a, fs_b, rs_b


def test_aues_permutation_null_matches_loop():
    fa, ra, fb, rb = curves(np.random.default_rng(1))
    swap = np.random.default_rng(2).random((200, fa.size)) < 0.5
    obs, p = ev.aues_permutation_null(fa, ra, fb, rb, swap)
    hits = 0
    for s in swap:   # App. D, one permutation at a time: swap the two scenarios' points at the chosen alphas
        pa = ([fb[i] if s[i] else fa[i] for i in range(fa.size)], [rb[i] if s[i] else ra[i] for i in range(fa.size)])
        pb = ([fa[i] if s[i] else fb[i] for i in range(fa.size)], [ra[i] if s[i] else rb[i] for i in range(fa.size)])
        hits += abs(aues_reference(*pa) - aues_reference(*pb)) >= obs - 1e-12
    assert obs == pytest.approx(abs(aues_reference(fa, ra) - aues_reference(fb, rb)))
    assert p == hits / len(swap)


@pytest.mark.parametrize("gap", [0.0, 0.05])
def test_aues_permutation_p_approaches_exact_enumeration(gap):
    fa, ra, fb, rb = curves(np.random.default_rng(3), gap=gap)
    every = np.array(list(itertools.product([False, True], repeat=fa.size)))     # all 2^12 swap patterns
    _, p_exact = ev.aues_permutation_null(fa, ra, fb, rb, every)
    obs, p = ev.aues_permutation_test(fa, ra, fb, rb, n_perm=20000, seed=0)
    assert p == pytest.approx(p_exact, abs=0.015)
    if gap:
        assert p < 0.01            # a retain gap at every alpha is rare under swapping
    assert ev.aues_permutation_test(fa, ra, fa, ra, n_perm=100)[1] == 1.0    # identical curves
    with pytest.raises(ValueError):
        ev.aues_permutation_test(fa, ra, fb[:-1], rb[:-1])


# --- MU95 and its bootstrap test -------------------------------------------------------------------

def test_mu95_worked_example():
    mu = [1.0, 0.97, 0.93, 0.90]
    fq = [-20.0, -15.0, -10.0, -5.0]                  # log10 forget quality along the sweep
    # 95% of MU 1.0 = 0.95 lies halfway between 0.97 and 0.93 -> FQ halfway between -15 and -10
    assert ev.mu95(mu, fq, mu_original=1.0) == pytest.approx(-12.5)
    assert ev.mu95(mu[::-1], fq[::-1], mu_original=1.0) == pytest.approx(-12.5)
    assert ev.mu95(mu, fq, mu_original=1.0, level=0.9) == pytest.approx(-5.0)
    assert ev.mu95([1.0, 0.99, 0.98], [-20, -10, -4], 1.0) == -4      # never falls to 95%: the lowest-MU point
    assert ev.mu95([1.0, 0.96, 0.96, 0.9], [-20, -12, -8, -2], 1.0) == pytest.approx(-10 + (0.01 / 0.06) * 8)
    with pytest.raises(ValueError):
        ev.mu95([], [], 1.0)


def mu95_exact(mu_a, fq_a, mu_b, fq_b, mu0):
    mu, fq = np.concatenate([mu_a, mu_b]), np.concatenate([fq_a, fq_b])
    obs = abs(ev.mu95(mu_a, fq_a, mu0) - ev.mu95(mu_b, fq_b, mu0))
    hits = total = 0
    for idx in itertools.combinations(range(mu.size), len(mu_a)):
        rest = [i for i in range(mu.size) if i not in idx]
        d = abs(ev.mu95(mu[list(idx)], fq[list(idx)], mu0) - ev.mu95(mu[rest], fq[rest], mu0))
        hits += d >= obs - 1e-12
        total += 1
    return obs, hits / total


@pytest.mark.parametrize("shift", [0.0, 6.0])
def test_mu95_bootstrap_p_approaches_exact_enumeration(shift):
    rng = np.random.default_rng(4)
    mu_a = np.sort(rng.uniform(0.85, 1.0, 5))[::-1]
    mu_b = np.sort(rng.uniform(0.85, 1.0, 5))[::-1]
    fq_a = -20 + 100 * (1 - mu_a) + rng.normal(0, 1, 5)
    fq_b = -20 + shift + 100 * (1 - mu_b) + rng.normal(0, 1, 5)
    obs_exact, p_exact = mu95_exact(mu_a, fq_a, mu_b, fq_b, 1.0)             # all C(10, 5) = 252 splits
    obs, p = ev.mu95_bootstrap_test(mu_a, fq_a, mu_b, fq_b, 1.0, n_boot=4000, seed=0)
    assert obs == pytest.approx(obs_exact)
    assert p == pytest.approx(p_exact, abs=0.03)
    assert ev.mu95_bootstrap_test(mu_a, fq_a, mu_a, fq_a, 1.0, n_boot=200)[1] == 1.0   # identical scenarios


def test_monte_carlo_p_values_are_never_zero():
    """A Monte Carlo p counts the observed split among the draws: (k + 1) / (R + 1) (Phipson & Smyth 2010), so
    curves no random swap / split comes near give 1 / (R + 1), not 0."""
    fa, ra, fb, rb = curves(np.random.default_rng(5), gap=0.5)
    swap = np.random.default_rng(0).random((300, fa.size)) < 0.5
    _, p_share = ev.aues_permutation_null(fa, ra, fb, rb, swap)               # k / R over the same draws
    _, p = ev.aues_permutation_test(fa, ra, fb, rb, n_perm=300, seed=0)
    assert p == (round(p_share * 300) + 1) / 301
    assert p == 1 / 301                                                       # no draw reaches the gap
    mu_a, mu_b = np.linspace(1.0, 0.9, 5), np.linspace(0.99, 0.91, 5)
    fq_a, fq_b = -20 + 100 * (1 - mu_a), 10 + 100 * (1 - mu_b)
    obs, p = ev.mu95_bootstrap_test(mu_a, fq_a, mu_b, fq_b, 1.0, n_boot=50, seed=0)
    mu, fq, rng, k = np.concatenate([mu_a, mu_b]), np.concatenate([fq_a, fq_b]), np.random.default_rng(0), 0
    for _ in range(50):                                                       # the same 50 splits, one at a time
        a, b = np.split(rng.permutation(10), 2)
        k += abs(ev.mu95(mu[a], fq[a], 1.0) - ev.mu95(mu[b], fq[b], 1.0)) >= obs - 1e-12
    assert p == (k + 1) / 51 and 0 < p < 1
