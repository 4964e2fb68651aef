"""eval.py's fast TOFU paths against the full-sequence computation they replace: candidate answers scored on their
question's KV cache (eval.candidate_logprobs, used by truth_ratio and mc_answer_prob) and every per-item metric of
one forward (eval.answer_scores). In float64, on tiny random models of both flavors, with ragged questions and
answers (one-token questions: empty prefixes), padding, batches smaller than the items and than the candidates,
and mlp_masks; and a check that the comparison sees an off-by-one."""
import random

import pytest
import torch

import eval as ev
from model import GPT, ModelConfig

TOL = dict(rtol=0, atol=1e-9)     # float64 throughout: the two paths differ only in the order of the sums


def tiny(flavor, seed=0):
    torch.manual_seed(seed)
    extra = dict(bias=False, tie_embeddings=False, n_kv_head=1) if flavor == "llama" else {}
    m = GPT(ModelConfig(flavor=flavor, vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=32, d_ff=64,
                        **extra)).double().eval()
    with torch.no_grad():     # sharper distributions than the init, so that a wrong position shows
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(3)
    return m


def ragged(seed, n=7, K=4):
    """Questions of 1..8 tokens (two of one token), candidates of 1..7 tokens, K per question."""
    rng = random.Random(seed)
    qs = [[rng.randrange(40) for _ in range(L)] for L in [1, 1] + [rng.randrange(2, 9) for _ in range(n - 2)]]
    rng.shuffle(qs)
    cands = [[[rng.randrange(40) for _ in range(rng.randrange(1, 8))] for _ in range(K)] for _ in range(n)]
    return qs, cands


def full_sequences(model, qs, cands, **kw):
    """The slow path: one full-sequence forward of q + c per candidate index (the rows are the items)."""
    return torch.stack([ev.answer_logprob(model, qs, [c[j] for c in cands], **kw) for j in range(len(cands[0]))], 1)


def explicit(model, q, a, mask=None):
    """ell(a|q) by an explicit loop over the answer tokens of one unpadded sequence."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([q + a]), **({} if mask is None else dict(mlp_mask=mask)))
    return sum(float(torch.log_softmax(logits[0, len(q) - 1 + t], -1)[tok]) for t, tok in enumerate(a)) / len(a)


@pytest.fixture
def prefix_calls(monkeypatch):
    """How many calls took the prefix-shared path (so that no test compares the fallback with itself)."""
    calls = []
    real = ev._prefix_rows
    monkeypatch.setattr(ev, "_prefix_rows", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
@pytest.mark.parametrize("batch_size", [None, 1, 3, 5, 64])
def test_candidates_on_the_cached_question_equal_full_sequences(flavor, batch_size, prefix_calls):
    model = tiny(flavor)
    qs, cands = ragged(0)
    got = ev.candidate_logprobs(model, qs, cands, batch_size=batch_size, pad_id=7)
    assert prefix_calls == [1]
    torch.testing.assert_close(got, full_sequences(model, qs, cands, pad_id=7), **TOL)
    for i in (0, 3):
        for j in range(4):
            assert got[i, j].item() == pytest.approx(explicit(model, qs[i], cands[i][j]), abs=1e-9)


def test_every_prefix_empty():
    """One-token questions only: no prefill at all, the candidates start at position 0."""
    model = tiny("gpt2")
    qs, cands = [[5], [9], [2]], [[[1, 2], [3]], [[4], [5, 6, 7]], [[8, 9, 1], [2]]]
    torch.testing.assert_close(ev.candidate_logprobs(model, qs, cands, batch_size=4), full_sequences(model, qs, cands),
                               **TOL)


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_masks_go_through_the_cached_path(flavor, prefix_calls):
    model = tiny(flavor)
    qs, cands = ragged(1)
    g = torch.Generator().manual_seed(0)
    per_row = (torch.rand(len(qs), 1, 64, generator=g) < 0.5).double()
    shared = (torch.rand(64, generator=g) < 0.5).double()
    for mask in (per_row, shared, [None, per_row], [shared[None, None], None]):
        got = ev.candidate_logprobs(model, qs, cands, batch_size=3, mlp_mask=mask)
        torch.testing.assert_close(got, full_sequences(model, qs, cands, batch_size=3, mlp_mask=mask), **TOL)
        assert not torch.allclose(got, ev.candidate_logprobs(model, qs, cands), atol=1e-3)    # the mask acted
    assert len(prefix_calls) == 8
    assert ev.candidate_logprobs(model, qs, cands, mlp_mask=per_row)[2, 1].item() == pytest.approx(
        explicit(model, qs[2], cands[2][1], per_row[2:3]), abs=1e-9)


class Wrapped(torch.nn.Module):
    """Not a model.GPT (as compare.Routed): eval.py cannot know it computes a row without looking at all of it."""
    def __init__(self, net):
        super().__init__()
        self.net, self.cfg = net, net.cfg

    def forward(self, idx, targets=None, **kw):
        return self.net(idx, targets, **kw)


def test_what_the_cached_path_cannot_take_falls_back_to_full_sequences(prefix_calls):
    model = tiny("gpt2")
    qs, cands = ragged(2)
    want = full_sequences(model, qs, cands, batch_size=2)
    per_token = torch.ones(len(qs), 5, 64, dtype=torch.float64)
    for kw in (dict(adapter_ctx=object()), dict(mlp_mask=per_token)):
        assert not ev._prefix_ok(model, qs, cands, kw)
    got = ev.candidate_logprobs(Wrapped(model), qs, cands, batch_size=2)
    assert prefix_calls == []
    assert torch.equal(got, want)         # the fallback is the full-sequence path itself
    # a padded candidate row would pass the block where its own sequence does not: full sequences
    long_q = [[1] * 28, [2]]
    long_c = [[[3] * 2, [4]], [[5] * 6, [6] * 6]]
    assert not ev._prefix_ok(model, long_q, long_c, {})
    torch.testing.assert_close(ev.candidate_logprobs(model, long_q, long_c), full_sequences(model, long_q, long_c),
                               **TOL)


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_the_comparison_sees_an_off_by_one_position(flavor, monkeypatch):
    """The candidates one position too far from their cached question: the test above would fail."""
    model = tiny(flavor)
    qs, cands = ragged(3)
    want = full_sequences(model, qs, cands)
    real = ev._prefill

    def shifted(*a):
        cache = real(*a)
        cache.next_pos = cache.next_pos + 1
        return cache
    monkeypatch.setattr(ev, "_prefill", shifted)
    assert (ev.candidate_logprobs(model, qs, cands) - want).abs().max() > 1e-4


def test_truth_ratio_and_mc_answer_prob_use_the_cached_path(prefix_calls):
    model = tiny("llama")
    qs, cands = ragged(4)
    true, pert = [c[0] for c in cands], [c[1:] for c in cands]
    lp_true, lp_pert = ev.answer_logprob(model, qs, true), full_sequences(model, qs, pert)
    for form, fn in ev.TRUTH_RATIOS.items():
        torch.testing.assert_close(ev.truth_ratio(model, qs, true, pert, form, batch_size=4), fn(lp_true, lp_pert),
                                   rtol=1e-9, atol=0)
    torch.testing.assert_close(ev.mc_answer_prob(model, qs, true, pert, batch_size=4), ev.mc_prob(lp_true, lp_pert),
                               rtol=1e-9, atol=0)
    assert len(prefix_calls) == len(ev.TRUTH_RATIOS) + 1
    with pytest.raises(ValueError):
        ev.truth_ratio(model, qs, true[:-1], pert)                 # one true answer short
    with pytest.raises(ValueError):
        ev.mc_answer_prob(model, qs, true, [p[:1] for p in pert[:-1]] + [pert[-1]])   # different numbers of options
    with pytest.raises(ValueError):
        ev.candidate_logprobs(model, qs, [c[:1] + [[]] for c in cands])                # an empty candidate


def old_path(model, qs, ans, k=0.4):
    """The per-metric computation the one-forward answer_scores replaces: full logits at every position."""
    x, y = ev.qa_batch(qs, ans, pad_id=3)
    with torch.no_grad():
        logits, _ = model(x)
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)   # model.token_logprobs
    lp = logp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y != -100)                  # in float64 too
    ell = ev.mean_logprob(lp, y)
    return dict(ell=ell, es=ev.extraction_strength_from_preds(logits.argmax(-1), y),
                em=ev.argmax_accuracy(logits.argmax(-1), y), loss=-ell, min_k=ev.min_k_score(lp, y, k),
                min_k_pp=ev.min_k_plus_plus_score(logits, y, k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_answer_scores_equal_the_metrics_one_at_a_time(dtype):
    model = tiny("llama").to(dtype)
    qs, cands = ragged(5, n=9)
    ans = [c[0] for c in cands]
    ans[0] = model.generate([qs[0]], 6).tolist()[0]       # an answer the model reproduces: ES 1, EM 1
    want = old_path(model, qs, ans)
    got = ev.answer_scores(model, qs, ans, k=0.4, pad_id=3)
    for key in want:      # the same batch and the same arithmetic row by row: bitwise equal, float32 included
        assert torch.equal(got[key], want[key].double()), key
    assert got["es"][0] == 1 and got["em"][0] == 1
    if dtype == torch.float64:     # in batches of 4 (other padding): equal up to the order of the sums
        for key, v in ev.answer_scores(model, qs, ans, k=0.4, batch_size=4, pad_id=3).items():
            torch.testing.assert_close(v, want[key], **TOL, msg=key)
    mia = ev.mia_scores(model, qs, ans, pad_id=3)
    assert sorted(mia) == ["loss", "min_k", "min_k_pp"] and all(torch.equal(mia[k], got[k]) for k in mia)
    assert torch.equal(ev.answer_logprob(model, qs, ans, pad_id=3), got["ell"])
    assert torch.equal(ev.extraction_strength(model, qs, ans, pad_id=3), got["es"])
    assert torch.equal(ev.exact_memorization(model, qs, ans, pad_id=3), got["em"])


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
@pytest.mark.parametrize("batch_size", [None, 2, 5])
def test_candidate_scores_equal_answer_scores_of_each_candidate(flavor, batch_size, prefix_calls):
    """Every metric of answer_scores on the cached question: ES and EM from the candidates' argmax, Min-K% and
    Min-K%++ from their log-probs; a candidate the model reproduces has ES 1."""
    model = tiny(flavor)
    qs, cands = ragged(6)
    cands[2][1] = model.generate([qs[2]], 5).tolist()[0]
    cands[4][0] = model.generate([qs[4]], 1).tolist()[0]        # a one-token answer the model reproduces
    got = ev.candidate_scores(model, qs, cands, k=0.5, batch_size=batch_size, pad_id=7)
    assert prefix_calls == [1] and sorted(got) == sorted(ev.SCORES)
    cols = [ev.answer_scores(model, qs, [c[j] for c in cands], k=0.5, pad_id=7) for j in range(4)]
    for name in ev.SCORES:
        torch.testing.assert_close(got[name], torch.stack([c[name] for c in cols], 1), **TOL, msg=name)
    assert got["es"][2, 1] == 1 and got["em"][2, 1] == 1 and got["es"][4, 0] == 1
    assert 0 < (got["es"] < 1).sum()                              # and random candidates are not


def test_candidate_scores_fall_back_to_answer_scores_per_candidate(prefix_calls):
    model = tiny("gpt2")
    qs, cands = ragged(7)
    got = ev.candidate_scores(Wrapped(model), qs, cands, scores=("ell", "es", "min_k"), batch_size=3)
    assert prefix_calls == [] and sorted(got) == ["ell", "es", "min_k"]
    for j in range(4):
        col = ev.answer_scores(model, qs, [c[j] for c in cands], scores=("ell", "es", "min_k"), batch_size=3)
        assert all(torch.equal(got[name][:, j], col[name]) for name in col)


def test_answer_scores_computes_what_is_asked():
    model = tiny("llama")
    qs, cands = ragged(8)
    ans = [c[0] for c in cands]
    every = ev.answer_scores(model, qs, ans)
    assert sorted(every) == sorted(ev.SCORES) and torch.equal(every["loss"], -every["ell"])
    some = ev.answer_scores(model, qs, ans, scores=("min_k", "em"))
    assert sorted(some) == ["em", "min_k"] and all(torch.equal(some[k], every[k]) for k in some)
    for bad in (("min_k", "rouge"), (), "ell"):
        with pytest.raises(ValueError):
            ev.answer_scores(model, qs, ans, scores=bad)
