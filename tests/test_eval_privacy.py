"""eval.py: membership inference (LOSS, zlib, Min-K%, Min-K%++ scores; ROC AUC; MUSE/OU privleak), NeuMuter's
loss distance (App. B.3), perplexity on a token stream, and Memory Adapters' Table 1 aggregates (Util_R,
Util_G, Mem., Priv., Agg.), each against a slow reference or a worked example."""
import math
import random
import zlib

import numpy as np
import pytest
import torch

import eval as ev
from model import GPT, ModelConfig


def tiny(seed=0, block_size=16):
    torch.manual_seed(seed)
    cfg = ModelConfig(flavor="gpt2", vocab_size=50, block_size=block_size, n_layer=2, n_head=2, n_embd=32, d_ff=64,
                      tie_embeddings=False)
    m = GPT(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(3)
    return m


def double_copy(model):
    m = GPT(model.cfg).double().eval()
    m.load_state_dict(model.state_dict())
    return m


# --- Min-K%, Min-K%++, zlib, LOSS ------------------------------------------------------------------

def test_min_k_against_loop_reference():
    g = torch.Generator().manual_seed(0)
    lp = -5 * torch.rand(7, 9, generator=g)
    y = torch.randint(0, 5, (7, 9), generator=g)
    for b in range(7):
        y[b, :b % 3] = -100
        y[b, 9 - b:] = -100 if b > 1 else y[b, 9 - b:]
    for k in (0.2, 0.4, 1.0):
        got = ev.min_k_score(lp, y, k)
        for b in range(7):
            vals = sorted(float(lp[b, t]) for t in range(9) if y[b, t] != -100)
            m = max(1, math.floor(k * len(vals)))
            assert got[b].item() == pytest.approx(-sum(vals[:m]) / m)
    # worked example: log-probs -1, -4, -2, -3, -0.5 with k = 0.4 -> the two lowest, -4 and -3 -> 3.5
    assert ev.min_k_score(torch.tensor([[-1.0, -4, -2, -3, -0.5]]), torch.zeros(1, 5, dtype=torch.long)).item() == 3.5
    with pytest.raises(ValueError):
        ev.min_k_score(lp, y, 0.0)


def test_min_k_plus_plus_against_float64_loop():
    g = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(3, 6, 11, generator=g)
    y = torch.randint(0, 11, (3, 6), generator=g)
    y[0, :2] = -100
    y[2, 4:] = -100
    got = ev.min_k_plus_plus_score(logits, y, k=0.5)
    for b in range(3):
        z = []
        for t in range(6):
            if y[b, t] == -100:
                continue
            row = [float(v) for v in logits[b, t]]
            lse = math.log(sum(math.exp(v) for v in row))
            logp = [v - lse for v in row]
            mu = sum(math.exp(l) * l for l in logp)
            var = sum(math.exp(l) * l * l for l in logp) - mu * mu
            z.append((logp[int(y[b, t])] - mu) / math.sqrt(var))
        z.sort()
        m = max(1, math.floor(0.5 * len(z)))
        assert got[b].item() == pytest.approx(-sum(z[:m]) / m, rel=1e-4)


def test_zlib_score():
    texts = ["aaaaaaaaaaaaaaaaaaaaaaaa", "The quick brown fox jumps over the lazy dog"]
    got = ev.zlib_score(torch.tensor([2.0, 3.0]), texts)
    assert got.tolist() == pytest.approx([2.0 / len(zlib.compress(texts[0].encode())),
                                          3.0 / len(zlib.compress(texts[1].encode()))])
    with pytest.raises(ValueError):
        ev.zlib_score(torch.tensor([1.0]), texts)


def test_mia_scores_on_model():
    model = tiny()
    rng = random.Random(0)
    qs = [[rng.randrange(50) for _ in range(rng.randrange(1, 4))] for _ in range(5)]
    ans = [[rng.randrange(50) for _ in range(rng.randrange(2, 8))] for _ in range(5)]
    texts = [f"answer number {i}" * (i + 1) for i in range(5)]
    s = ev.mia_scores(model, qs, ans, texts=texts, k=0.4, batch_size=2)
    m64 = double_copy(model)
    for i, (q, a) in enumerate(zip(qs, ans)):
        with torch.no_grad():
            logits, _ = m64(torch.tensor([q + a]))
        logits = logits[0, len(q) - 1:len(q) - 1 + len(a)]
        lp = [float(torch.log_softmax(logits[t], 0)[tok]) for t, tok in enumerate(a)]
        assert s["loss"][i].item() == pytest.approx(-sum(lp) / len(a), rel=1e-5)
        low = sorted(lp)[:max(1, math.floor(0.4 * len(a)))]
        assert s["min_k"][i].item() == pytest.approx(-sum(low) / len(low), rel=1e-5)
        ypp = torch.tensor([a])
        assert s["min_k_pp"][i].item() == pytest.approx(ev.min_k_plus_plus_score(logits[None], ypp, 0.4).item(),
                                                        rel=1e-4)
        assert s["zlib"][i].item() == pytest.approx(s["loss"][i].item() / len(zlib.compress(texts[i].encode())))
    assert "zlib" not in ev.mia_scores(model, qs, ans)


# --- AUC (Mann-Whitney with ties) and privleak ------------------------------------------------------

def auc_pairwise(forget, holdout):
    wins = sum((h > f) + 0.5 * (h == f) for f in forget for h in holdout)
    return wins / (len(forget) * len(holdout))


def test_mia_auc_against_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        f = rng.integers(0, 6, rng.integers(1, 12)).astype(float)      # small integers: many ties
        h = rng.integers(1, 8, rng.integers(1, 12)).astype(float)
        assert ev.mia_auc(f, h) == pytest.approx(auc_pairwise(f, h))
    assert ev.mia_auc([0.1, 0.2], [0.5, 0.9]) == 1.0        # forget losses all lower: fully "member-like"
    assert ev.mia_auc([1.0, 1.0], [1.0]) == 0.5
    with pytest.raises(ValueError):
        ev.mia_auc([], [1.0])


def test_privleak_worked_examples():
    # OU issue #167: a finetuned model with Min-K AUC 0.981 against a 0.5 reference gives about -96
    assert ev.privleak(0.981, 0.5) == pytest.approx(-96.2)
    assert ev.privleak(0.63, 0.63) == 0.0
    assert ev.privleak(0.2, 0.5) == pytest.approx(60.0)        # over-unlearned: forget looks less member than holdout
    with pytest.raises(ValueError):
        ev.privleak(0.5, 1.0)


# --- NeuMuter's loss distance, sequence loss, perplexity -------------------------------------------

def test_sequence_loss_and_loss_distance():
    model = tiny()
    rng = random.Random(1)
    seqs = [[rng.randrange(50) for _ in range(rng.randrange(2, 12))] for _ in range(4)]
    got = ev.sequence_loss(model, seqs, batch_size=3)
    m64 = double_copy(model)
    for i, s in enumerate(seqs):
        with torch.no_grad():
            logits, _ = m64(torch.tensor([s]))
        nll = -sum(float(torch.log_softmax(logits[0, t], 0)[s[t + 1]]) for t in range(len(s) - 1))
        assert got[i].item() == pytest.approx(nll / (len(s) - 1), rel=1e-5)
    d = ev.loss_distance(torch.tensor([3.0, 1.0, 2.5]), [2.0, 3.0])       # validation mean 2.5
    assert d.tolist() == [0.5, 1.5, 0.0]
    with pytest.raises(ValueError):
        ev.loss_distance([1.0], [])


def test_perplexity_against_window_loop():
    model = tiny(block_size=8)
    stream = torch.randint(0, 50, (30,), generator=torch.Generator().manual_seed(0))
    got = ev.perplexity(model, stream, batch_size=2)
    m64, nll, n = double_copy(model), 0.0, 0
    for s in range(0, 29, 8):                                    # windows of 8 inputs overlapping by one token
        w = stream[s:s + 9]
        with torch.no_grad():
            logits, _ = m64(w[None, :-1])
        for t in range(len(w) - 1):
            nll -= float(torch.log_softmax(logits[0, t], 0)[w[t + 1]])
            n += 1
    assert n == 29                                               # every token after the first, once
    assert got == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert ev.perplexity(model, stream, block_size=5) != pytest.approx(got)   # shorter context, other value
    with pytest.raises(ValueError):
        ev.perplexity(model, [3])


def test_perplexity_of_uniform_model_is_vocab_size():
    model = tiny()
    with torch.no_grad():
        model.lm_head.weight.zero_()                             # every logit 0: uniform over 50 tokens
    assert ev.perplexity(model, list(range(40))) == pytest.approx(50.0, rel=1e-5)


# --- Memory Adapters' Table 1 aggregates -----------------------------------------------------------

def test_table1_utilities_are_normalized_harmonic_means():
    ft = [0.9, 0.6, 0.5]                                         # Prob, ROUGE, TR of the finetuned model (retain)
    model = [0.8, 0.5, 0.5]
    assert ev.retain_utility(model, ft) == pytest.approx((3 / (1 / 0.8 + 2 + 2)) / (3 / (1 / 0.9 + 1 / 0.6 + 2)))
    assert ev.retain_utility(ft, ft) == 1.0
    base = [0.4, 0.5, 0.6, 0.4, 0.5, 0.6]                         # real authors + world facts of the base model
    assert ev.general_utility([0.44, 0.55, 0.66, 0.44, 0.55, 0.66], base) == pytest.approx(1.1)   # can exceed 1


def test_memorization_score_worked_example():
    # HM(1 - 0.5, 1 - 0.75, 1 - 0.5, 1 - 0.5) = 4 / (2 + 4 + 2 + 2)
    assert ev.memorization_score(es=0.5, em=0.75, para_prob=0.5, tr_prob_mean=0.5) == pytest.approx(0.4)
    assert ev.memorization_score(es=1.0, em=0.2, para_prob=0.1, tr_prob_mean=0.5) == 0.0   # fully extractable


def test_privacy_transform_and_score():
    assert ev.mia_closeness(0.63, 0.63) == 1.0
    assert ev.mia_closeness(1.0, 0.4) == 0.0                     # the worst reachable AUC on that side
    assert ev.mia_closeness(0.0, 0.7) == 0.0
    assert ev.mia_closeness(0.8, 0.4) == pytest.approx(1 - 0.4 / 0.6)
    assert ev.mia_closeness(0.5, 0.5) == 1.0 and ev.mia_closeness(0.75, 0.5) == pytest.approx(0.5)
    # unchanged when both AUCs flip (the other labelling of forget vs holdout)
    assert ev.mia_closeness(0.8, 0.4) == pytest.approx(ev.mia_closeness(0.2, 0.6))
    with pytest.raises(ValueError):
        ev.mia_closeness(1.2, 0.5)
    ret = dict(loss=0.4, zlib=0.45, min_k=0.4, min_k_pp=0.5)
    assert ev.privacy_score(ret, ret) == 1.0                     # the retrained model scores 1 (Table 1: 1.00)
    aucs = dict(loss=0.8, zlib=0.7, min_k=0.9, min_k_pp=0.75)
    s = [1 - 0.4 / 0.6, 1 - 0.25 / 0.55, 1 - 0.5 / 0.6, 1 - 0.25 / 0.5]
    assert ev.privacy_score(aucs, ret) == pytest.approx(4 / sum(1 / v for v in s))
    with pytest.raises(ValueError):
        ev.privacy_score(dict(loss=0.5), ret)


TABLE1 = {  # Util_R, Util_G, Mem., Priv., Agg. (memory-adapters.txt, Table 1)
    "Finetuned": (1.00, 1.14, 0.07, 0.38, 0.21), "MemAdapt FT": (0.93, 1.05, 0.18, 0.39, 0.40),
    "Retrained": (1.00, 1.11, 0.58, 1.00, 0.87), "MemAdapt": (1.00, 1.06, 0.62, 0.98, 0.87),
    "RMU": (0.96, 1.12, 0.82, 0.68, 0.86), "GradDiff": (0.78, 1.26, 0.98, 0.63, 0.85),
    "UNDIAL": (0.95, 1.16, 0.63, 0.65, 0.79), "SimNPO": (0.78, 1.11, 0.56, 0.88, 0.78),
    "NPO": (0.73, 1.16, 0.66, 0.62, 0.75), "IdkDPO": (0.74, 0.98, 0.62, 0.69, 0.74),
    "AltPO": (0.55, 0.96, 0.52, 0.61, 0.62), "IdkNLL": (0.60, 0.92, 0.51, 0.56, 0.62)}


def test_aggregate_is_harmonic_mean_of_four_table1_rows():
    # the table prints two decimals; HM rises in every argument, so the true Agg. lies between the HMs of the
    # inputs rounded down and up (+-0.005), and the printed Agg. within 0.005 of that
    for name, (*four, agg) in TABLE1.items():
        lo = ev.aggregate_score(*(v - 0.005 for v in four))
        hi = ev.aggregate_score(*(v + 0.005 for v in four))
        assert lo - 0.005 <= agg <= hi + 0.005, name
        assert lo <= ev.aggregate_score(*four) <= hi
    assert ev.aggregate_score(1.0, 1.0, 0.5, 0.25) == pytest.approx(4 / (1 + 1 + 2 + 4))
