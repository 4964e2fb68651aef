"""eval.py: extraction strength (localization paper App. B / Carlini et al.; OU), exact memorization, and Jang et
al.'s MA (NeuMuter Eq. 15), EL_n (Eq. 16) and forgetting thresholds (Eq. 17), each against a slow reference."""
import random

import pytest
import torch

import eval as ev
from model import GPT, ModelConfig


def tiny(flavor="gpt2", seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(flavor=flavor, vocab_size=48, block_size=64, n_layer=2, n_head=2, n_embd=32, d_ff=64,
                      bias=flavor == "gpt2", tie_embeddings=False)
    m = GPT(cfg).eval()
    with torch.no_grad():   # larger weights than the init: wider logit gaps, so greedy paths are far from ties
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(3)
    return m


def greedy(model, prompt, n, **kw):
    """Plain greedy decoding by full recomputation: the slowest, most obvious reference."""
    seq = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([seq]), **kw)
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


# --- ES on tensors -------------------------------------------------------------------------------

def es_reference(preds, y):
    """ES = 1 - k*/N with k* = min{k : preds[k:] == answer[k:]}, scanning k = 0..N (k = N always matches)."""
    out = []
    for p_row, y_row in zip(preds.tolist(), y.tolist()):
        pairs = [(p, t) for p, t in zip(p_row, y_row) if t != -100]
        N = len(pairs)
        k = next(k for k in range(N + 1) if all(p == t for p, t in pairs[k:]))
        out.append(1 - k / N)
    return torch.tensor(out, dtype=torch.float64)


def test_es_from_preds_hand_examples():
    # answer tokens at positions 1..4 of each row; padding after
    y = torch.tensor([[-100, 5, 6, 7, 8, -100]] * 4)
    preds = torch.tensor([[9, 5, 6, 7, 8, 0],     # all right: k* = 0, ES = 1
                          [9, 1, 6, 7, 8, 0],     # first wrong: k* = 1, ES = 3/4
                          [9, 5, 1, 7, 8, 0],     # k* = 2, ES = 1/2
                          [9, 5, 6, 7, 1, 0]])    # last wrong: nothing matches, ES = 0 (OU would report 1/4)
    es = ev.extraction_strength_from_preds(preds, y)
    assert es.tolist() == [1.0, 0.75, 0.5, 0.0]


def test_es_from_preds_matches_reference_on_random_rows():
    g = torch.Generator().manual_seed(1)
    B, T = 64, 12
    y = torch.randint(0, 3, (B, T), generator=g)
    preds = torch.where(torch.rand(B, T, generator=g) < 0.7, y, torch.randint(0, 3, (B, T), generator=g))
    for b in range(B):   # question of random length before, padding of random length after
        q = int(torch.randint(0, 4, (1,), generator=g))
        pad = int(torch.randint(0, 4, (1,), generator=g))
        y[b, :q] = -100
        if pad:
            y[b, T - pad:] = -100
    es = ev.extraction_strength_from_preds(preds, y)
    assert torch.allclose(es, es_reference(preds, y), rtol=0, atol=1e-12)   # run/N vs 1 - k/N: same up to rounding
    assert 0 < float(es.mean()) < 1 and (es == 0).any() and (es == 1).any()


def test_es_from_preds_rejects_empty_answer():
    with pytest.raises(ValueError):
        ev.extraction_strength_from_preds(torch.zeros(1, 3, dtype=torch.long), torch.full((1, 3), -100))


# --- ES on a model: one pass == generating from every prefix --------------------------------------

def constructed_items(model, rng, n_items=6, N=8):
    """Answers with a known ES: the greedy continuation of the question with token j replaced, then greedy again
    from there. Positions before j are the model's own choices but j breaks them, positions after j are the
    model's argmax, so the trailing correct run has N - j - 1 tokens and ES = (N - j - 1) / N. j = -1: the
    model's own answer (ES = 1). Plus fully random answers (ES usually 0)."""
    qs, ans, expected = [], [], []
    for i in range(n_items):
        q = [rng.randrange(48) for _ in range(rng.randrange(1, 5))]
        j = i - 1 if i < N else rng.randrange(N)
        if j < 0:
            a = greedy(model, q, N)
        else:
            head = greedy(model, q, j)
            own = greedy(model, q + head, 1)[0]
            wrong = (own + 1 + rng.randrange(47)) % 48
            a = head + [wrong] + greedy(model, q + head + [wrong], N - j - 1)
        qs.append(q), ans.append(a), expected.append((N - j - 1) / N if j >= 0 else 1.0)
    for _ in range(2):
        qs.append([rng.randrange(48) for _ in range(3)])
        ans.append([rng.randrange(48) for _ in range(N)])
        expected.append(None)
    return qs, ans, expected


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_extraction_strength_one_pass_equals_generation(flavor):
    model = tiny(flavor)
    qs, ans, expected = constructed_items(model, random.Random(0))
    fast = ev.extraction_strength(model, qs, ans)
    slow = ev.extraction_strength_generate(model, qs, ans)
    assert torch.allclose(fast, slow, rtol=0, atol=1e-12)
    for e, v in zip(expected, fast.tolist()):
        if e is not None:
            assert v == pytest.approx(e)
    assert len(set(fast.tolist())) >= 5                 # the check covers many different ES values
    assert torch.equal(ev.extraction_strength(model, qs, ans, batch_size=3), fast)


def test_extraction_strength_with_per_row_masks():
    model = tiny()
    qs, ans, _ = constructed_items(model, random.Random(1), n_items=4)
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(len(qs), 1, 64, generator=g) < 0.7).float()      # one MLP mask per item
    fast = ev.extraction_strength(model, qs, ans, mlp_mask=mask, batch_size=2)
    one_by_one = torch.cat([ev.extraction_strength(model, [q], [a], mlp_mask=mask[i:i + 1])
                            for i, (q, a) in enumerate(zip(qs, ans))])
    assert torch.equal(fast, one_by_one)
    assert torch.allclose(fast, ev.extraction_strength_generate(model, qs, ans, mlp_mask=mask), rtol=0, atol=1e-12)
    assert not torch.equal(fast, ev.extraction_strength(model, qs, ans))   # the mask mattered


def test_exact_memorization_matches_per_token_reference():
    model = tiny()
    qs, ans, _ = constructed_items(model, random.Random(2))
    em = ev.exact_memorization(model, qs, ans)
    for i, (q, a) in enumerate(zip(qs, ans)):
        right = sum(greedy(model, q + a[:t], 1)[0] == a[t] for t in range(len(a)))
        assert em[i].item() == pytest.approx(right / len(a))


# --- MA and EL_n (Jang et al.; NeuMuter Eq. 15-17) ------------------------------------------------

def sequences(model, rng):
    """Model-made sequences (the model's own greedy text, as if memorized), random ones, and half-and-half."""
    seqs = []
    for L in (14, 17, 12):
        p = [rng.randrange(48) for _ in range(2)]
        seqs.append(p + greedy(model, p, L - 2))
    for L in (13, 16):
        seqs.append([rng.randrange(48) for _ in range(L)])
    p = [rng.randrange(48) for _ in range(2)]
    seqs.append(p + greedy(model, p, 6) + [rng.randrange(48) for _ in range(7)])
    return seqs


def test_memorization_accuracy_eq15_against_one_token_generation():
    model = tiny()
    seqs = sequences(model, random.Random(3))
    ma = ev.memorization_accuracy(model, seqs, batch_size=4)
    for i, s in enumerate(seqs):
        right = sum(model.generate(torch.tensor([s[:t]]), 1)[0, 0].item() == s[t] for t in range(1, len(s)))
        assert ma[i].item() == pytest.approx(right / (len(s) - 1))
    assert ma[0] >= 12 / 13 and ma[3] < 0.5   # seqs[0]: 2 random prompt tokens, then the model's own greedy text


def overlap_reference(pred, ref, n):
    ref_grams = [ref[i:i + n] for i in range(len(ref) - n + 1)]
    hits = 0
    for i in range(len(pred) - n + 1):
        hits += any(pred[i:i + n] == r for r in ref_grams)
    return hits / (len(pred) - n + 1)


def test_ngram_overlap_hand_example():
    # pred 2-grams (1,2) (2,3) (3,1) (1,2); ref 2-grams {(1,2), (2,4), (4,1)}: (1,2) counts twice -> 2/4
    assert ev.ngram_overlap([1, 2, 3, 1, 2], [1, 2, 4, 1, 2], 2) == 0.5
    assert ev.ngram_overlap([1, 2, 3], [1, 2, 3], 3) == 1.0
    with pytest.raises(ValueError):
        ev.ngram_overlap([1, 2], [1, 2], 3)


@pytest.mark.parametrize("n", [3, 5])
def test_extraction_likelihood_eq16_against_per_prefix_generation(n):
    model = tiny()
    seqs = sequences(model, random.Random(4))
    el = ev.extraction_likelihood(model, seqs, n, batch_size=16)
    for i, s in enumerate(seqs):
        T = len(s)
        terms = [overlap_reference(model.generate(torch.tensor([s[:t]]), T - t, use_cache=False)[0].tolist(),
                                   s[t:], n) for t in range(1, T - n + 1)]
        assert el[i].item() == pytest.approx(sum(terms) / (T - n))
    assert el[0] > 0.8 and el[3] < 0.2 and 0 < el[5] < el[0]
    assert torch.allclose(el, ev.extraction_likelihood_reference(model, seqs, n, batch_size=16))


def test_extraction_likelihood_shortcut_generates_only_where_greedy_leaves_the_text(monkeypatch):
    """On the model's own greedy text every prefix continues the text, so only the last prefix is generated;
    the result still equals generating every prefix."""
    model = tiny()
    own = [3, 7] + model.generate(torch.tensor([[3, 7]]), 14)[0].tolist()
    seqs = [own, sequences(model, random.Random(4))[3]]
    calls = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda p, *a, **k: calls.append(len(p)) or real(p, *a, **k))
    el = ev.extraction_likelihood(model, seqs, 3, batch_size=64)
    fast_rows = sum(calls)
    calls.clear()
    ref = ev.extraction_likelihood_reference(model, seqs, 3, batch_size=64)
    assert torch.allclose(el, ref) and el[0] > 0.9
    assert sum(calls) == (len(own) - 3) + (len(seqs[1]) - 3)          # the reference generates every prefix
    with pytest.raises(ValueError, match="block_size|positions"):   # an error, not an endless loop
        ev.extraction_likelihood(model, [list(range(1, model.cfg.block_size + 3))], 3)
    assert fast_rows < sum(calls)
    # own text alone: the one-token prefix [3] (not the [3, 7] it was generated from) and the last prefix at most,
    # against the reference's 14 rows
    calls.clear()
    assert torch.allclose(ev.extraction_likelihood(model, [own], 3), ev.extraction_likelihood_reference(model, [own], 3))
    own_fast = calls[0]
    assert len(calls) == 2 and 1 <= own_fast <= 2 and calls[1] == len(own) - 3


def test_extraction_likelihood_per_row_masks_and_errors():
    model = tiny()
    seqs = sequences(model, random.Random(5))[:3]
    mask = (torch.rand(3, 1, 64, generator=torch.Generator().manual_seed(2)) < 0.6).float()
    el = ev.extraction_likelihood(model, seqs, 4, batch_size=5, mlp_mask=mask)
    one = torch.cat([ev.extraction_likelihood(model, [s], 4, mlp_mask=mask[i:i + 1]) for i, s in enumerate(seqs)])
    assert torch.allclose(el, one)
    with pytest.raises(ValueError):
        ev.extraction_likelihood(model, [[1, 2, 3]], 3)
    with pytest.raises(ValueError):
        ev.extraction_likelihood(model, seqs, 4, doc_ids=torch.zeros(3, 5))


def test_forgetting_thresholds_eq17():
    model = tiny()
    seqs = sequences(model, random.Random(6))
    thr = ev.forgetting_thresholds(model, seqs[3:5], n=4)
    assert thr["ma"] == pytest.approx(float(ev.memorization_accuracy(model, seqs[3:5]).mean()))
    assert thr["el"] == pytest.approx(float(ev.extraction_likelihood(model, seqs[3:5], 4).mean()))
    ma = torch.tensor([0.1, 0.3, 0.3, 0.1])
    el = torch.tensor([0.01, 0.01, 0.05, 0.06])
    # thresholds are inclusive ("<=" in Eq. 17)
    assert ev.is_forgotten(ma, el, dict(ma=0.3, el=0.05)).tolist() == [True, True, True, False]


def test_extraction_likelihood_lower_bound_worked_example_and_below_el(monkeypatch):
    # worked example: T = 6, n = 2, greedy hits after prefixes t = 1..5: yes yes no yes yes. Runs from t = 1..4:
    # 2, 1, 0, 2 -> OVERLAP >= (2-1)/(5-1), 0, 0, (2-1)/(2-1) -> EL >= (1/4 + 1) / 4 = 0.3125
    model = tiny()
    monkeypatch.setattr(ev, "_greedy_hits", lambda *a: [[True, True, False, True, True]])
    lb = ev.extraction_likelihood_lower_bound(model, [[1, 2, 3, 4, 5, 6]], 2)
    assert lb.dtype == torch.float64 and lb.tolist() == [0.3125]
    monkeypatch.undo()
    # the model's own greedy text (generated from [3, 7]: every prefix but [3] continues it, bound close to 1),
    # corrupted copies and random text: the bound never exceeds EL generated for every prefix
    own = [3, 7] + model.generate(torch.tensor([[3, 7]]), 20)[0].tolist()
    seqs = [own] + [own[:m] + [own[m] % 47 + 1] + own[m + 1:] for m in (5, 12, 17)] + \
        sequences(model, random.Random(6))[:4]
    for n in (2, 3, 5):
        lb = ev.extraction_likelihood_lower_bound(model, seqs, n)
        el = ev.extraction_likelihood_reference(model, seqs, n)
        assert lb[0] > 0.9
        assert bool((lb <= el + 1e-12).all()), (n, lb, el)
        assert bool((lb[1:4] > 0).all())          # the corrupted copies still keep long runs of the text
