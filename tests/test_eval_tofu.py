"""eval.py: TOFU's answer probability, normalized multiple-choice probability, truth ratios (TOFU R with its forget
and utility aggregates, OU's prob_mean, the NULLs TR), ROUGE-L recall, forget quality (KS p-value) and model
utility (harmonic mean), each against a slow reference or a worked example."""
import itertools
import math
import random

import numpy as np
import pytest
import torch

import eval as ev
from model import GPT, ModelConfig


def tiny(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(flavor="llama", vocab_size=40, block_size=48, n_layer=2, n_head=2, n_embd=32, d_ff=64,
                      bias=False, tie_embeddings=False)
    m = GPT(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(3)
    return m


def mean_logprob_reference(model, q, a, mask=None):
    """float64, one unpadded item at a time, an explicit loop over the answer tokens."""
    m = GPT(model.cfg).double()
    m.load_state_dict(model.state_dict())
    kw = {} if mask is None else dict(mlp_mask=mask.double())
    with torch.no_grad():
        logits, _ = m(torch.tensor([q + a]), **kw)
    total = 0.0
    for t, tok in enumerate(a):
        row = logits[0, len(q) - 1 + t]
        total += float(row[tok] - torch.logsumexp(row, 0))
    return total / len(a)


def items(rng, n=5, K=3):
    qs = [[rng.randrange(40) for _ in range(rng.randrange(1, 6))] for _ in range(n)]
    ans = [[rng.randrange(40) for _ in range(rng.randrange(1, 7))] for _ in range(n)]
    pert = [[[rng.randrange(40) for _ in range(rng.randrange(1, 7))] for _ in range(K)] for _ in range(n)]
    return qs, ans, pert


# --- batching ----------------------------------------------------------------------------------

def test_qa_batch_masks_question_and_padding():
    x, y = ev.qa_batch([[1, 2], [3]], [[4, 5, 6], [7]], pad_id=9)
    assert x.tolist() == [[1, 2, 4, 5], [3, 9, 9, 9]]
    assert y.tolist() == [[-100, 4, 5, 6], [7, -100, -100, -100]]
    with pytest.raises(ValueError):
        ev.qa_batch([[1]], [[]])
    with pytest.raises(ValueError):
        ev.qa_batch([], [])
    with pytest.raises(ValueError):
        ev.qa_batch([[1]], [[2], [3]])


# --- answer probability: p̄(a|q) = P(a|q)^(1/|a|) ---------------------------------------------------

def test_answer_prob_is_length_normalized_probability():
    model = tiny()
    qs, ans, _ = items(random.Random(0))
    p = ev.answer_prob(model, qs, ans)
    for i, (q, a) in enumerate(zip(qs, ans)):
        assert p[i].item() == pytest.approx(math.exp(mean_logprob_reference(model, q, a)), rel=1e-5)
    assert torch.allclose(ev.answer_prob(model, qs, ans, batch_size=2), p)


def test_mc_prob_against_explicit_ratio():
    g = torch.Generator().manual_seed(0)
    lp_true, lp_opt = -3 * torch.rand(6, generator=g), -3 * torch.rand(6, 3, generator=g)
    got = ev.mc_prob(lp_true, lp_opt)
    for i in range(6):
        pt = math.exp(lp_true[i])
        assert got[i].item() == pytest.approx(pt / (pt + sum(math.exp(v) for v in lp_opt[i])), rel=1e-12)
    # far below float underflow the ratio is still defined
    assert ev.mc_prob(torch.tensor([-2000.0]), torch.tensor([[-2001.0, -2001.0]])).item() == \
        pytest.approx(1 / (1 + 2 * math.exp(-1)))


def test_mc_answer_prob_on_model():
    model = tiny()
    qs, ans, pert = items(random.Random(1))
    got = ev.mc_answer_prob(model, qs, ans, pert)
    for i in range(len(qs)):
        pt = math.exp(mean_logprob_reference(model, qs[i], ans[i]))
        po = [math.exp(mean_logprob_reference(model, qs[i], o)) for o in pert[i]]
        assert got[i].item() == pytest.approx(pt / (pt + sum(po)), rel=1e-5)


# --- truth ratios --------------------------------------------------------------------------------

def test_tofu_truth_ratio_and_aggregates_worked_example():
    # p̄(true) = 0.5, perturbed p̄ = 0.1 and 0.4: geometric mean 0.2, R = 0.4
    lp_true = torch.tensor([math.log(0.5), math.log(0.1)])
    lp_pert = torch.tensor([[math.log(0.1), math.log(0.4)], [math.log(0.2), math.log(0.2)]])
    R = ev.truth_ratio_tofu(lp_true, lp_pert)
    assert R.tolist() == pytest.approx([0.4, 2.0])
    assert ev.truth_ratio_forget(R) == pytest.approx((0.4 + 0.5) / 2)        # mean min(R, 1/R)
    assert ev.truth_ratio_utility(R) == pytest.approx((0.6 + 0.0) / 2)      # mean max(0, 1 - R)
    # OU's prob_mean: p_true / (p_true + p_false) with the geometric mean
    assert ev.truth_ratio_prob_mean(lp_true, lp_pert).tolist() == pytest.approx([0.5 / 0.7, 0.1 / 0.3])


def test_nulls_truth_ratio_uses_arithmetic_mean():
    # NULLs: p̄(true) / mean_j p̄(pert_j): 0.5 / ((0.1 + 0.4) / 2) = 2 (the geometric mean would give 2.5)
    lp_true = torch.tensor([math.log(0.5), math.log(0.01)])
    lp_pert = torch.tensor([[math.log(0.1), math.log(0.4)], [math.log(0.3), math.log(0.1)]])
    tr = ev.truth_ratio_nulls(lp_true, lp_pert)
    assert tr.tolist() == pytest.approx([2.0, 0.01 / 0.2])
    assert (tr > 1).tolist() == [True, False]                    # TR > 1: the fact is recalled


@pytest.mark.parametrize("form", ["tofu", "nulls", "prob_mean"])
def test_truth_ratio_wrapper_against_reference(form):
    model = tiny()
    qs, ans, pert = items(random.Random(2))
    got = ev.truth_ratio(model, qs, ans, pert, form=form, batch_size=3)
    for i in range(len(qs)):
        pt = math.exp(mean_logprob_reference(model, qs[i], ans[i]))
        po = [math.exp(mean_logprob_reference(model, qs[i], o)) for o in pert[i]]
        gm = math.prod(po) ** (1 / len(po))
        want = {"tofu": gm / pt, "nulls": pt / (sum(po) / len(po)), "prob_mean": pt / (pt + gm)}[form]
        assert got[i].item() == pytest.approx(want, rel=1e-4)


def test_truth_ratio_with_per_row_masks_matches_one_item_at_a_time():
    model = tiny()
    qs, ans, pert = items(random.Random(3), n=4)
    mask = (torch.rand(4, 1, 64, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    got = ev.truth_ratio(model, qs, ans, pert, form="nulls", mlp_mask=mask, batch_size=3)
    for i in range(4):
        pt = math.exp(mean_logprob_reference(model, qs[i], ans[i], mask[i:i + 1]))
        po = [math.exp(mean_logprob_reference(model, qs[i], o, mask[i:i + 1])) for o in pert[i]]
        assert got[i].item() == pytest.approx(pt / (sum(po) / len(po)), rel=1e-4)
    assert not torch.allclose(got, ev.truth_ratio(model, qs, ans, pert, form="nulls"))


def test_truth_ratio_bad_input():
    model = tiny()
    qs, ans, pert = items(random.Random(4), n=2)
    with pytest.raises(ValueError):
        ev.truth_ratio(model, qs, ans, pert, form="geometric")
    with pytest.raises(ValueError):
        ev.truth_ratio(model, qs, ans, [pert[0], pert[1][:1]])        # different numbers of perturbed answers
    with pytest.raises(ValueError):
        ev.truth_ratio(model, qs, ans, [[], []])


# --- ROUGE-L recall (rouge_score, stemming) --------------------------------------------------------

def lcs(a, b):
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, j in itertools.product(range(len(a)), range(len(b))):
        t[i + 1][j + 1] = t[i][j] + 1 if a[i] == b[j] else max(t[i][j + 1], t[i + 1][j])
    return t[-1][-1]


def test_rouge_l_recall_hand_computed():
    cases = [
        # reference, prediction, hand tokenization (lowercase, [^a-z0-9] -> space, Porter stem if > 3 chars)
        ("The cats were running quickly!", "cat runs quick, the end",
         ["the", "cat", "were", "run", "quickli"], ["cat", "run", "quick", "the", "end"]),
        ("Hello, WORLD!!", "hello world", ["hello", "world"], ["hello", "world"]),
        ("He was born in 1952 in Paris.", "Born: Paris (1952)",
         ["he", "wa", "born", "in", "1952", "in", "pari"], ["born", "pari", "1952"]),
        ("Café Über", "cafe uber", ["caf", "ber"], ["cafe", "uber"]),          # accented letters vanish
    ]
    got = ev.rouge_l_recall([c[1] for c in cases], [c[0] for c in cases])
    want = [lcs(ref, pred) / len(ref) for _, _, ref, pred in cases]
    assert want == [2 / 5, 1.0, 2 / 7, 0.0]
    assert got == pytest.approx(want)
    with pytest.raises(ValueError):
        ev.rouge_l_recall(["a"], [])


class WordTokenizer:
    def decode(self, ids):
        return " ".join(f"w{i}" if i % 3 else f"run{i}ning" for i in ids)


def test_rouge_recall_scores_greedy_generations():
    model = tiny()
    rng = random.Random(5)
    qs = [[rng.randrange(40) for _ in range(3)] for _ in range(4)]
    own = model.generate(qs, 6).tolist()
    eos = 39
    ans = [own[0], own[1][:3] + [rng.randrange(39) for _ in range(3)], [rng.randrange(39) for _ in range(6)],
           own[3] + [eos]]
    recalls, gens = ev.rouge_recall(model, qs, ans, WordTokenizer(), max_new_tokens=6, eos_id=eos, batch_size=3)
    tok = WordTokenizer()
    for i in range(4):
        g = model.generate([qs[i]], 6, eos_id=eos)[0].tolist()
        g = g[:g.index(eos)] if eos in g else g
        assert gens[i] == tok.decode(g)
        ref = ans[i][:-1] if ans[i][-1] == eos else ans[i]
        assert recalls[i] == pytest.approx(ev.rouge_l_recall([tok.decode(g)], [tok.decode(ref)])[0])
    assert recalls[0] == 1.0 and recalls[3] == 1.0 and recalls[2] < 1.0


# --- forget quality: two-sided two-sample KS p-value (exact) ------------------------------------------

def ks_exact_reference(a, b):
    """Exact two-sided p-value by enumerating every way to split the pooled values into groups of the sizes."""
    pooled = sorted(a + b)

    def D(x, y):
        return max(abs(sum(v <= t for v in x) / len(x) - sum(v <= t for v in y) / len(y)) for t in pooled)
    d_obs, hits, total = D(a, b), 0, 0
    for idx in itertools.combinations(range(len(pooled)), len(a)):
        x = [pooled[i] for i in idx]
        y = [pooled[i] for i in range(len(pooled)) if i not in idx]
        hits += D(x, y) >= d_obs - 1e-12
        total += 1
    return hits / total


def test_forget_quality_is_exact_ks_p_value():
    rng = np.random.default_rng(0)
    for shift in (0.0, 0.8, 3.0):
        a = rng.normal(0, 1, 5).tolist()
        b = rng.normal(shift, 1, 6).tolist()
        assert ev.forget_quality(a, b) == pytest.approx(ks_exact_reference(a, b), abs=1e-9)
    R = rng.lognormal(size=8)
    R_ret = rng.lognormal(size=7)
    assert ev.forget_quality(R, R_ret) == pytest.approx(ev.forget_quality(1 / R, 1 / R_ret))   # ranks only
    assert ev.forget_quality(R, R) == 1.0
    with pytest.raises(ValueError):
        ev.forget_quality([], [1.0])


# --- model utility: harmonic mean of 9 numbers -----------------------------------------------------

def test_model_utility_harmonic_mean():
    nine = [0.5, 0.25, 1.0, 0.8, 0.4, 0.9, 0.6, 0.3, 0.7]
    assert ev.model_utility(nine) == pytest.approx(9 / sum(1 / v for v in nine))
    assert ev.harmonic_mean([0.5, 0.25, 1.0]) == pytest.approx(3 / 7)
    assert ev.model_utility(dict(zip("abcdefghi", nine))) == pytest.approx(ev.model_utility(nine))
    assert ev.model_utility(nine[:-1] + [0.0]) == 0.0                # any zero gives zero
    with pytest.raises(ValueError):
        ev.model_utility([0.5, -0.1])
    with pytest.raises(ValueError):
        ev.model_utility([])
