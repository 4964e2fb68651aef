"""memadapt.py: product keys, reads, gradient masks, TF-IDF assignment, block-lists, row-lazy Adam, claims, smoke."""
import copy
import dataclasses
import importlib.util
import json
import math
import os

import pytest
import torch

import eval as ev
import memadapt as MA
import train as T
import model as M


def _mem(n_sub=6, k=3, k_dim=8, d=5, seed=0):
    torch.manual_seed(seed)
    return MA.ProductKeyMemory(d_in=7, d_out=d, n_sub=n_sub, k=k, k_dim=k_dim)


def _assigned(mem, owners_per_source, seed=0):
    """Assign entries {source: [entries]} and give the values random numbers."""
    ents = torch.tensor([e for s in sorted(owners_per_source) for e in owners_per_source[s]])
    own = torch.tensor([s for s in sorted(owners_per_source) for _ in owners_per_source[s]])
    mem.assign(ents, own)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mem.values[:-1] = torch.randn(len(ents), mem.d_out, generator=g)
    return mem


# ---------------------------------------------------------------------------------------------- product keys

def test_product_key_topk_equals_brute_force():
    torch.manual_seed(0)
    n, k, kd = 7, 4, 6
    q = torch.randn(5, 3, kd, dtype=torch.float64)
    keys = torch.randn(2, n, kd // 2, dtype=torch.float64)
    scores, idx = MA.product_key_topk(q, keys, k)
    full_keys = torch.zeros(n * n, kd, dtype=torch.float64)     # the N concatenated keys [K1[i1], K2[i2]]
    for i1 in range(n):
        for i2 in range(n):
            full_keys[i1 * n + i2] = torch.cat([keys[0, i1], keys[1, i2]])
    for a in range(5):
        for b in range(3):
            s = [float(q[a, b] @ full_keys[i]) for i in range(n * n)]
            best = sorted(range(n * n), key=lambda i: -s[i])[:k]
            assert idx[a, b].tolist() == best
            assert torch.allclose(scores[a, b], torch.tensor([s[i] for i in best], dtype=torch.float64))


def test_read_equals_gather_and_sum():
    torch.manual_seed(1)
    V = torch.randn(9, 4, dtype=torch.float64)
    rows = torch.randint(0, 9, (6, 3))
    w = torch.rand(6, 3, dtype=torch.float64)
    out = MA.read(rows, V, w)
    for m in range(6):
        ref = sum(w[m, j] * V[rows[m, j]] for j in range(3))
        assert torch.allclose(out[m], ref)


def test_bag_weights_softmax_and_all_blocked_reads_nothing():
    s = torch.tensor([[1.0, 2.0, 0.5], [float("-inf")] * 3, [0.3, float("-inf"), 0.3]])
    w = MA.bag_weights(s)
    e = [math.exp(1), math.exp(2), math.exp(0.5)]
    assert torch.allclose(w[0], torch.tensor([v / sum(e) for v in e]))
    assert torch.equal(w[1], torch.zeros(3))
    assert torch.allclose(w[2], torch.tensor([0.5, 0.0, 0.5]))


# ---------------------------------------------------------------------------------------------- gradient masks

def _masked_case(seed=2):
    torch.manual_seed(seed)
    V = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    rows = torch.randint(0, 8, (10, 3))
    w = torch.rand(10, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(10, 3) < 0.5
    g = torch.randn(10, 5, dtype=torch.float64)
    return V, rows, w, mask, g


def test_two_pass_reference_gradient_is_the_explicit_masked_sum():
    V, rows, w, mask, g = _masked_case()
    out = MA.masked_read_two_pass(rows, V, w, mask)
    assert torch.allclose(out, MA.read(rows, V, w))              # forward: the real read
    (out * g).sum().backward()
    ref_v = torch.zeros_like(V)
    ref_w = torch.zeros_like(w)
    for m in range(10):
        for j in range(3):
            if mask[m, j]:
                ref_v[rows[m, j]] += w[m, j].detach() * g[m]
                ref_w[m, j] = V[rows[m, j]].detach() @ g[m]
    assert torch.allclose(V.grad, ref_v)
    assert torch.allclose(w.grad, ref_w)


def test_single_pass_equals_two_pass_in_output_and_every_gradient():
    V, rows, w, mask, g = _masked_case(3)
    V2, w2 = V.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    a = MA.masked_read_two_pass(rows, V, w, mask)
    b = MA.masked_read(rows, V2, w2, mask)
    assert torch.allclose(a, b)
    (a * g).sum().backward()
    (b * g).sum().backward()
    assert torch.allclose(V.grad, V2.grad) and torch.allclose(w.grad, w2.grad)
    assert torch.autograd.gradcheck(lambda v, ww: MA.masked_read(rows, v, ww, torch.ones_like(mask)),
                                    (V.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()))


def test_training_forward_masks_gradients_per_row_source():
    mem = _assigned(_mem(n_sub=4, k=4), {1: list(range(0, 8)), 2: list(range(8, 16))})
    mem.train()
    x = torch.randn(2, 3, 7)
    for masked in ("single", "two_pass"):
        mem.masked = masked
        mem.values.grad = None
        mem(x, MA.MemCtx(source=torch.tensor([1, 1]))).sum().backward()
        owned2 = mem.row_owner == 2
        assert mem.values.grad[owned2].abs().sum() == 0                # source 2's rows get no gradient
        assert mem.values.grad[~owned2].abs().sum() > 0
        assert mem.values.grad[-1].abs().sum() == 0                    # the zero row never trains


def test_mixed_source_batch_masks_each_row_by_its_own_source():
    """Rows of different sources in one batch: the batched gradient is the sum of each row's gradient run alone
    with its own source (the loss sums over rows). Tokens are flattened row-major, so the per-token source must
    be repeat_interleave(T), not repeat(T): this test tells them apart."""
    mem = _assigned(_mem(n_sub=4, k=4), {1: list(range(0, 8)), 2: list(range(8, 16))})
    mem.train()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 7, generator=gen)
    g = torch.randn(3, 5, mem.d_out, generator=gen)
    src = torch.tensor([1, 2, 2])
    for masked in ("single", "two_pass"):
        mem.masked = masked
        ref = torch.zeros_like(mem.values)
        for b in range(3):
            mem.values.grad = None
            (mem(x[b:b + 1], MA.MemCtx(source=src[b:b + 1])) * g[b:b + 1]).sum().backward()
            ref += mem.values.grad
        mem.values.grad = None
        (mem(x, MA.MemCtx(source=src)) * g).sum().backward()
        assert torch.allclose(mem.values.grad, ref, atol=1e-6), masked
        # and the per-row runs really differ by source (each row reads both sources' entries)
        assert ref[mem.row_owner == 1].abs().sum() > 0 and ref[mem.row_owner == 2].abs().sum() > 0


def test_unmasked_memory_trains_only_the_rows_read_and_sparse_row_adam_equals_dense():
    # masked="off": every row read gets a gradient, whoever owns it (ctx ignored), as a sparse tensor
    mem = _assigned(_mem(n_sub=4, k=4), {1: list(range(0, 8)), 2: list(range(8, 16))})
    mem.masked = "off"
    mem.train()
    x = torch.randn(2, 3, 7)
    mem(x, MA.MemCtx(source=torch.tensor([1, 1]))).sum().backward()
    grad = mem.values.grad
    assert grad.is_sparse
    _, _, rows = mem.lookup(x)
    got = set(grad.coalesce().indices()[0].tolist())
    assert got == set(rows.flatten().tolist()) and (mem.row_owner[list(got)] == 2).any()
    # RowAdam on a sparse gradient = on the same gradient made dense, step after step
    a = torch.nn.Parameter(torch.randn(6, 3))
    b = torch.nn.Parameter(a.detach().clone())
    oa, ob = MA.RowAdam([a], lr=0.1), MA.RowAdam([b], lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        idx = torch.randint(0, 6, (5,), generator=gen)
        vals = torch.randn(5, 3, generator=gen)
        a.grad = torch.sparse_coo_tensor(idx[None], vals, (6, 3), check_invariants=True)   # repeats: summed
        b.grad = torch.zeros(6, 3).index_add_(0, idx, vals)
        oa.step()
        ob.step()
    assert torch.allclose(a, b) and torch.equal(oa.state[a]["t"], ob.state[b]["t"])


def test_masked_training_learns_each_source_and_blocking_removes_only_that_source():
    """A frozen random base; two sources with fixed random answers. Gradient-masked RowAdam training of the
    assigned values drives each source's answer loss far down; blocking source 1 takes source 1's loss back near
    the base's and leaves source 2's far below the base's."""
    base = _tiny_gpt(1)
    with torch.no_grad():          # tied embeddings at init (std 0.02) cap every logit near 0: scale them up
        base.wte.weight.mul_(50)
    net = copy.deepcopy(base).requires_grad_(False)
    cfg = MA.Config(layer=1, mem_sqrt=8, topk=4, k_dim=8)       # 64 entries, 32 per source: every read trainable
    torch.manual_seed(0)
    mem = MA.attach_memory(net, cfg)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 20, (4, 8), generator=gen)
    x[2:, :4] = x[:2, :4]                        # same prompts for both sources: only the memory tells them apart
    x[:, 4:] = torch.randperm(20, generator=gen)[:16].view(4, 4)     # answers: no token twice (no read collides)
    y = torch.full_like(x, -100)
    y[:, 4:-1] = x[:, 5:]
    src = torch.tensor([1, 1, 2, 2])
    batches = [{"x": x, "y": y, "source_ids": src[:, None].expand_as(x)}]
    MA.assign_memory(net, mem, batches, [1, 2], 32)
    mem.values.requires_grad_(True)
    opt = MA.RowAdam([mem.values], lr=3e-2)
    loss = lambda model, rows: float(model(x[rows], y[rows])[1].detach())
    before = [loss(base, [0, 1]), loss(base, [2, 3])]
    net.train()
    for _ in range(150):
        opt.zero_grad(set_to_none=True)
        net(x, y, adapter_ctx=MA.MemCtx(source=src))[1].backward()
        opt.step()
    net.eval()
    after = [loss(net, [0, 1]), loss(net, [2, 3])]
    assert all(a < 0.3 * b for a, b in zip(after, before)), (before, after)
    mem.block([1])
    assert loss(net, [0, 1]) > 0.7 * before[0]      # near the base again (next-best reads may be source 2's)
    assert loss(net, [2, 3]) < 0.3 * before[1]      # source 2 keeps what it learned


# ---------------------------------------------------------------------------------------------- adapter

def _tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return M.GPT(M.ModelConfig(flavor="gpt2", vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16,
                               d_ff=32, bias=True, tie_embeddings=True)).eval()


def test_adapter_at_step0_is_exactly_the_base_model():
    base = _tiny_gpt()
    net = copy.deepcopy(base)
    cfg = MA.Config(layer=1, mem_sqrt=8, topk=4, k_dim=8)
    mem = MA.attach_memory(net, cfg)
    mem.assign(torch.arange(0, 12), torch.tensor([1] * 6 + [2] * 6))
    x = torch.randint(0, 20, (3, 10))
    assert torch.equal(net(x)[0], base(x)[0])
    with torch.no_grad():
        mem.values[0] += 1.0                                           # and it is a real branch
    assert not torch.equal(net(x)[0], base(x)[0])


# ---------------------------------------------------------------------------------------------- assignment

def test_tfidf_and_greedy_assignment_match_brute_force():
    torch.manual_seed(4)
    S, N, n = 4, 12, 2
    src = torch.randint(1, S + 1, (200,))
    ent = torch.where(torch.rand(200) < 0.5, (src * 2) % N, torch.randint(0, N, (200,)))
    ps, pe, c = MA.access_pairs(src, ent)
    score = MA.tfidf(ps, pe, c)
    got = MA.assign_entries(ps, pe, score, list(range(1, S + 1)), n, N)
    # reference: dense counts with explicit loops, TF-IDF in float64, repeated argmax
    cnt = [[0] * N for _ in range(S + 1)]
    for s, e in zip(src.tolist(), ent.tolist()):
        cnt[s][e] += 1
    df = [sum(1 for s in range(1, S + 1) if cnt[s][e] > 0) for e in range(N)]
    dense = torch.full((S + 1, N), float("-inf"), dtype=torch.float64)
    for s in range(1, S + 1):
        tot = sum(cnt[s])
        for e in range(N):
            if cnt[s][e]:
                dense[s, e] = cnt[s][e] / tot * math.log((S + 1) / (df[e] + 1))
    for i in range(len(ps)):
        assert math.isclose(float(score[i]), float(dense[ps[i], pe[i]]), rel_tol=1e-12, abs_tol=1e-15)
    ref = {s: [] for s in range(1, S + 1)}
    while True:
        j = int(dense.argmax())       # first maximum in row-major order: lowest source, then lowest entry
        if dense.view(-1)[j] == float("-inf"):
            break
        s, e = divmod(j, N)
        dense[s, e] = float("-inf")
        if len(ref[s]) < n:
            ref[s].append(e)
            dense[:, e] = float("-inf")
    taken = {e for v in ref.values() for e in v}
    free = [e for e in range(N) if e not in taken]
    for s in sorted(ref):
        while len(ref[s]) < n:
            ref[s].append(free.pop(0))
    assert got == ref
    assert len({e for v in got.values() for e in v}) == S * n       # no entry shared


def test_tfidf_ranks_source_specific_entries_above_common_ones():
    src = torch.tensor([1, 1, 1, 2, 2, 3, 3, 1])
    ent = torch.tensor([0, 0, 5, 0, 7, 0, 8, 5])                     # entry 0 is read by every source
    ps, pe, c = MA.access_pairs(src, ent)
    score = {(int(a), int(b)): float(v) for a, b, v in zip(ps, pe, MA.tfidf(ps, pe, c))}
    assert score[(1, 5)] > score[(1, 0)] == 0.0


def test_assignment_too_small_memory_is_a_clear_error():
    with pytest.raises(ValueError, match="entries"):
        MA.assign_entries(torch.tensor([1]), torch.tensor([0]), torch.tensor([1.0]), [1, 2, 3], 4, 8)


# ---------------------------------------------------------------------------------------------- unlearning

def test_blocked_source_values_change_no_output_and_are_never_read():
    mem = _assigned(_mem(n_sub=6, k=3), {1: list(range(0, 12)), 2: list(range(12, 24)), 3: list(range(24, 36))})
    mem.eval()
    x = torch.randn(4, 5, 7)
    mem.block([2])
    before = mem(x)
    _, idx, rows = mem.lookup(x)
    assert not bool(mem.row_owner[rows].eq(2).any())
    with torch.no_grad():
        mem.values[mem.row_owner == 2] += 100 * torch.randn(12, mem.d_out)
    assert torch.equal(mem(x), before)
    assert torch.equal(mem.export_values()[mem.row_owner == 2], torch.zeros(12, mem.d_out))


def test_unblock_restores_exactly_the_earlier_outputs():
    mem = _assigned(_mem(n_sub=6, k=3), {1: list(range(0, 18)), 2: list(range(18, 36))})
    mem.eval()
    x = torch.randn(3, 4, 7)
    out = mem(x)
    mem.block([1])
    assert not torch.equal(mem(x), out)
    mem.unblock([1])
    assert torch.equal(mem(x), out)
    wall, cpu, worst = MA.block_sources(mem, [2], repeats=5)    # timed repeats leave exactly one block applied
    assert torch.equal(mem.blocked, mem.rows_of_sources([2])) and 0 <= wall <= worst


def test_per_row_block_lists_equal_the_rows_run_alone():
    mem = _assigned(_mem(n_sub=6, k=3), {1: list(range(0, 18)), 2: list(range(18, 36))})
    mem.eval()
    x = torch.randn(2, 4, 7)
    ctx = MA.MemCtx(block=mem.per_row_block([[1], [2]]))
    both, (_, idx, _) = mem(x, ctx), mem.lookup(x, ctx)
    mem.block([1])
    a, (_, idx_a, _) = mem(x[:1]), mem.lookup(x[:1])
    mem.unblock([1])
    mem.block([2])
    b, (_, idx_b, _) = mem(x[1:]), mem.lookup(x[1:])
    assert torch.equal(idx[0], idx_a[0]) and torch.equal(idx[1], idx_b[0])      # the same entries read
    # the same numbers up to float rounding of a different batch shape
    assert torch.allclose(both[0], a[0], rtol=0, atol=1e-6) and torch.allclose(both[1], b[0], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- row-lazy Adam

def test_row_adam_leaves_rows_of_other_sources_bit_identical():
    mem = _assigned(_mem(n_sub=4, k=4), {1: list(range(0, 8)), 2: list(range(8, 16))})
    mem.train()
    opt = MA.RowAdam([mem.values], lr=0.1)
    x = torch.randn(2, 3, 7)
    for src in (2, 1, 1):      # source 2 first, so its rows carry Adam moments into the later steps
        snapshot = mem.values.detach().clone()
        opt.zero_grad()
        mem(x, MA.MemCtx(source=torch.tensor([src, src]))).pow(2).sum().backward()
        opt.step()
        other = mem.row_owner != src
        assert torch.equal(mem.values[other], snapshot[other])
        assert not torch.equal(mem.values[~other], snapshot[~other])


def test_row_adam_first_step_is_adams():
    p = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    p.grad = torch.tensor([[0.5, -2.0], [0.0, 0.0]])
    MA.RowAdam([p], lr=0.1).step()
    assert torch.allclose(p[0], torch.tensor([0.9, 2.1]), atol=1e-6)   # the first Adam step is lr * sign(g)
    assert torch.equal(p[1], torch.tensor([3.0, 4.0]))


def test_row_adam_counts_steps_per_row_unlike_sparse_adam():
    """A row first touched at step 1000 gets Adam's first step (lr x sign(g)) from RowAdam; torch's SparseAdam,
    which counts steps per tensor, moves it by 2.5 lr (the docstring's formula)."""
    p = torch.nn.Parameter(torch.zeros(2, 1))
    e = torch.nn.Embedding(2, 1, sparse=True)
    torch.nn.init.zeros_(e.weight)
    row_adam, sparse_adam = MA.RowAdam([p], lr=0.01), torch.optim.SparseAdam(e.parameters(), lr=0.01)
    for row in [0] * 999 + [1]:
        p.grad = torch.nn.functional.one_hot(torch.tensor([row]), 2).float().T
        row_adam.step()
        sparse_adam.zero_grad()
        e(torch.tensor([row])).sum().backward()
        sparse_adam.step()
    assert row_adam.state[p]["t"].tolist() == [999, 1]
    assert -p[1].item() == pytest.approx(0.01, rel=1e-5)
    t = 1000
    assert -e.weight[1].item() == pytest.approx(0.01 * (0.1 / (1 - 0.9 ** t)) / math.sqrt(0.001 / (1 - 0.999 ** t)),
                                                rel=1e-4) == pytest.approx(0.0251, abs=1e-4)


# ---------------------------------------------------------------------------------------------- claims

def test_claim_functions_every_verdict():
    nan = float("nan")
    v = lambda c: c["verdict"]
    assert v(MA.claim_mem_priv(0.63, 0.62, 0.9, {"npo": 0.8})) == "holds"
    assert v(MA.claim_mem_priv(0.62, 0.62, 0.9, {"npo": 0.8})) == "fails"          # "exceeds": equal is not
    assert v(MA.claim_mem_priv(0.70, 0.62, 0.8, {"npo": 0.8})) == "fails"          # Priv. only equals a baseline's
    assert v(MA.claim_mem_priv(0.70, 0.62, 0.7, {"npo": 0.8})) == "fails"          # Priv. below a baseline's
    c = MA.claim_mem_priv(0.70, 0.62, 0.9, {})
    assert v(c) == "not testable here" and c["precondition"]["value"] == 0        # no baseline ran
    assert [v(MA.claim_learning(x, 0.95)) for x in (0.93, 0.89, nan)] == ["holds", "fails", "not testable here"]
    assert MA.claim_learning(nan, 0.95)["precondition"]["value"] == ["util_r"]
    # the learnability precondition: the unmasked adapter's Util_R must reach the threshold on this base
    c = MA.claim_learning(0.93, 0.51)
    assert v(c) == "not testable here" and c["precondition"]["value"] == 0.51 and not c["precondition"]["met"]
    assert v(MA.claim_learning(0.93, None)) == "not testable here"                 # not measured
    assert "not measured" in MA.claim_learning(0.93, None)["precondition"]["what"]
    assert "not measured" not in MA.claim_learning(0.93, 0.95)["precondition"]["what"]
    assert v(MA.claim_learning(0.5, 0.9)) == "fails"
    assert [v(MA.claim_no_cost(a, 0.93)) for a in (1.0, 0.9, nan)] == ["holds", "fails", "not testable here"]
    assert [v(MA.claim_agg(a, {"rmu": 0.86})) for a in (0.87, 0.8, nan)] == ["holds", "fails", "not testable here"]
    assert v(MA.claim_agg(0.87, {"rmu": nan})) == v(MA.claim_agg(0.87, {})) == "not testable here"
    c = MA.claim_mem_priv(0.60, 0.62, 0.9, {"npo": 0.8, "rmu": 0.85})
    assert c["value"] == {"mem": 0.60, "priv": 0.9}
    assert [t["threshold"] for t in c["tests"]] == [0.62, 0.85] and [t["op"] for t in c["tests"]] == [">", ">"]


def test_speed_and_identity_are_checks_not_claims():
    assert MA.check_speed(1e-5, {"npo": 1.0, "rmu": 2.0})["ok"]
    assert not MA.check_speed(1e-5, {"npo": 0.005})["ok"]            # only 500x
    assert not MA.check_speed(2e-3, {"npo": 100.0})["ok"]            # over 1 ms
    assert MA.check_speed(1e-5, {})["ok"] and "no post-hoc baseline" in MA.check_speed(1e-5, {})["detail"]
    assert MA.check_identity(0.0)["ok"] and not MA.check_identity(1e-7)["ok"]
    assert "verdict" not in MA.check_identity(0.0)
    per = [[MA.check_identity(0.0)], [MA.check_identity(1e-7)]]
    both = MA.combine_checks(per, [0, 1])[0]
    assert both["ok"] is False and "seed 0" in both["detail"] and "seed 1" in both["detail"]
    assert MA.combine_checks(per[:1], [0]) == per[0]


def test_combine_claims_over_seeds_every_verdict():
    c = MA.combine_claims([[MA.claim_learning(0.95, 1.0)], [MA.claim_learning(0.85, 1.0)]], [0, 1])[0]
    assert c["value"]["util_r"] == pytest.approx(0.9) and c["tests"][0]["per_seed"] == [0.95, 0.85]
    assert c["verdict_per_seed"] == {"0": "holds", "1": "fails"} and c["verdict"] == "inconclusive"
    assert MA.combine_claims([[MA.claim_learning(0.95, 1.0)], [MA.claim_learning(0.951, 1.0)]], [0, 1])[0]["verdict"] == "holds"
    assert MA.combine_claims([[MA.claim_learning(0.5, 1.0)], [MA.claim_learning(0.51, 1.0)]], [0, 1])[0]["verdict"] == "fails"
    assert MA.combine_claims([[MA.claim_learning(0.95, 1.0)], [MA.claim_learning(float("nan"), 1.0)]],
                             [0, 1])[0]["verdict"] == "not testable here"
    # a threshold measured per seed (the best baseline's) is paired with its own seed
    straddle = {"mem_priv": ([MA.claim_mem_priv(0.7, 0.6, 0.9, {"npo": 0.8})],
                             [MA.claim_mem_priv(0.7, 0.6, 0.7, {"npo": 0.8})]),
                "no_cost": ([MA.claim_no_cost(1.0, 0.93)], [MA.claim_no_cost(0.9, 0.93)]),
                "agg": ([MA.claim_agg(0.9, {"npo": 0.8})], [MA.claim_agg(0.7, {"npo": 0.8})])}
    for name, (a, b) in straddle.items():
        assert MA.combine_claims([a, b], [0, 1])[0]["verdict"] == "inconclusive", name
    paired = MA.combine_claims([[MA.claim_agg(0.5, {"npo": 0.4})], [MA.claim_agg(0.9, {"npo": 0.8})]], [0, 1])[0]
    assert paired["verdict"] == "holds"              # beats the baseline by 0.1 in both seeds


# ---------------------------------------------------------------------------------------------- end to end

def test_checkpoints_follow_the_data_not_only_the_config(tmp_path, monkeypatch):
    """Base, Finetuned, Retrained and MemAdapt FT are named by train.run_key over their rows and starting weights:
    a rerun reuses all four; a change of the pretraining text's generator (same config) retrains all four (the
    base's rows change, and with them the others' starting weights); a file whose stored key is not its name's
    is an error."""
    import glob
    import shutil
    import train as T
    cfg = T.parse_config(MA.Config, ["--preset=smoke", f"--out_dir={tmp_path}"], MA.PRESETS)

    def run():
        D, base, ft, ret, _, times = MA.prepare(cfg)
        _, _, info = MA.memadapt_ft(cfg, base, D["tok"], D["sets"]["full"])
        return [times[k]["cached"] for k in ("base", "finetuned", "retrained")] + [info["cached"]], ft
    first, ft1 = run()
    again, ft2 = run()
    assert first == [False] * 4 and again == [True] * 4
    assert all(torch.equal(p, q) for p, q in zip(ft1.parameters(), ft2.parameters()))
    copy_rows = MA.copy_rows
    monkeypatch.setattr(MA, "copy_rows", lambda world, n, seed: copy_rows(world, n, seed + 1))   # other names
    changed, ft3 = run()
    assert changed == [False] * 4
    assert not all(torch.equal(p, q) for p, q in zip(ft1.parameters(), ft3.parameters()))
    files = sorted(glob.glob(str(tmp_path / "ckpt" / "*.pt")))
    assert len(files) == 8
    for f in files:
        assert T.load_checkpoint(f)["config"]["run_key"] == os.path.basename(f).rsplit("-", 1)[1][:-3]
    shutil.copy(files[0], files[1])                      # a file under another model's name
    with pytest.raises(ValueError, match="delete the file"):
        T.check_run_key(files[1], os.path.basename(files[1]).rsplit("-", 1)[1][:-3])


def test_smoke_run_writes_every_claim_and_table(tmp_path):
    runs, claims = MA.main(["--preset=smoke", f"--out_dir={tmp_path}", "--seeds=0"])
    res = json.loads((tmp_path / "results.json").read_text())
    assert [c["claim"][:2] for c in res["claims"]] == ["1.", "2.", "3.", "4."]
    assert all(c["verdict"] in ev.VERDICTS for c in res["claims"])
    assert len(res["checks"]) == 2 and res["checks"][1]["ok"] is True          # the adapter starts as the base
    run = res["metrics"]["runs"][0]
    for m in ("finetuned", "memadapt_ft", "retrained", "memadapt", "graddiff", "npo", "idknll"):
        assert set(run["table1"][m]) >= {"util_r", "util_g", "mem", "priv", "agg"}
    assert [it["split"] for it in run["iterative"]] == ["forget01", "forget05", "forget10"]
    assert all(it["values_untouched"] for it in run["iterative"])
    assert run["times"]["memadapt_ft"]["step0_max_abs_diff"] == 0.0
    md = (tmp_path / "results.md").read_text()
    for t in ("Table 1", "Table 2", "Iterative unlearning", "by what the retain set says", "Checks (", "| verdict",
              "Forget request: forget10, independent", "Learnability (claim 2's precondition)", "Extractability"):
        assert t in md
    assert run["forget_kind"] == "independent" and run["upper_bound"]["util_r"] >= 0
    assert res["claims"][1]["precondition_per_seed"]["0"]["value"] == pytest.approx(run["upper_bound"]["util_r"],
                                                                                     abs=1e-4)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "table1.png").exists() and (tmp_path / "iterative.png").exists()


def test_deal_balances_the_baselines_longest_first():
    names = ["graddiff", "npo", "simnpo", "rmu", "undial", "idkdpo", "idknll", "altpo"]
    assert MA.deal(names, 2) == [["idkdpo", "graddiff", "simnpo", "undial"], ["altpo", "npo", "rmu", "idknll"]]
    assert MA.deal(names, 2, cost=lambda n: 1) == [names[0::2], names[1::2]]
    assert MA.deal(["npo"], 3) == [["npo"], [], []]
    assert MA.deal(["a", "b", "c"], 2, cost={"a": 1, "b": 1, "c": 3}.get) == [["c"], ["a", "b"]]


def test_models_trained_in_two_workers_give_the_same_run(tmp_path, run_numbers):
    """workers=2 trains Finetuned, Retrained and both adapters in worker processes (into the caches the run then
    loads) and deals the post-hoc baselines to them: every number but the timings equals the one-process run's."""
    one, _ = MA.main(["--preset=smoke", f"--out_dir={tmp_path / 'one'}", "--baselines=npo,graddiff"])
    two, _ = MA.main(["--preset=smoke", f"--out_dir={tmp_path / 'two'}", "--baselines=npo,graddiff", "--workers=2"])
    assert list(two[0]["table1"])[-2:] == ["npo", "graddiff"]          # the report's order, not the workers'
    assert run_numbers(two[0]["baseline_sweep"]) == run_numbers(one[0]["baseline_sweep"]) != {}
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "two" / "ckpt").glob("*.pt")) == \
        ["base", "finetuned", "memadapt", "memadapt_unmasked", "retrained"]
    for k in ("table1", "raw", "iterative", "upper_bound", "routing_before", "routing_after", "extractability"):
        assert run_numbers(one[0][k]) == run_numbers(two[0][k]), k


def tiny_llama_folder(tmp_path):
    """A tiny random Llama saved as a Hugging Face folder with a word-level tokenizer.json over the world's words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    import hf
    words = MA.world_vocab_tokenizer().itos
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "llama"
    torch.manual_seed(0)
    hf.save_hf(M.GPT(M.ModelConfig(flavor="llama", vocab_size=len(words), block_size=128, n_layer=2, n_head=4,
                                   n_kv_head=2, n_embd=32, d_ff=64, bias=False, tie_embeddings=False)), folder)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "pad_token": "<pad>"}))
    return folder


def test_paper_path_on_a_tiny_local_llama_and_local_tofu(tmp_path):
    """--preset=paper's code path (TOFU files from a folder, a local HF checkpoint with its own tokenizer) on a
    tiny random Llama and the built-in world saved in TOFU's format."""
    import data
    world = data.make_world(0, n_people=12, n_families=5, n_cities=4, n_countries=4, n_holdout=2, n_real=4)
    tofu = tmp_path / "tofu"
    world.save_tofu(tofu)
    for s in ("forget01", "forget05", "forget10", "world_facts", "real_authors"):
        (tofu / f"{s}_perturbed.json").write_text((tofu / f"{s}.json").read_text())
    folder = tiny_llama_folder(tmp_path)
    runs, claims = MA.main(["--preset=paper", f"--init_from={folder}", f"--tofu_path={tofu}", "--tofu_qa_per_author=10",
                            "--layer=1", "--mem_sqrt=16", "--topk=4", "--k_dim=8", "--entries=8", "--mem_epochs=1",
                            "--ft_epochs=1", "--unlearn_steps=2", "--unlearn_batch=4", "--baselines=graddiff",
                            "--lr_mults=1.0", "--block_size=64", "--log_every=0", "--eval_n=10", f"--out_dir={tmp_path / 'out'}"])
    assert len(claims) == 4
    run = runs[0]
    assert run["times"]["memadapt_ft"]["step0_max_abs_diff"] == 0.0
    assert run["forget_sources"] == sorted({r["person"] for r in world.tofu_split("forget10")})


def test_sweep_entries_smoke(tmp_path):
    rows = MA.main(["--preset=smoke", f"--out_dir={tmp_path}", "--sweep=entries", "--sweep_values=4,8"])
    assert [r["entries"] for r in rows] == [4, 8]
    assert all({"util_r", "util_g", "own_access_share"} <= set(r) for r in rows)
    assert (tmp_path / "sweep_entries.json").exists()


def test_baseline_lrs_are_tuned_on_a_held_out_request_never_the_reported_one():
    cfg = T.parse_config(MA.Config, ["--preset=smoke"], MA.PRESETS)
    D = MA.load_data(cfg)
    sets, forget = D["sets"], D["forget"]
    tune = {r["person"] for r in sets["tune"]}
    assert len(tune) == len(forget) and not tune & set(forget)
    assert not tune & {r["person"] for r in sets["retain_perturbed"]}        # utility is scored there
    # posthoc_baselines scores every lr of the sweep on "tune" only; the reported split is evaluated once, at the pick
    seen = []

    def E(net, split=None):
        seen.append(split)
        return {"split": split}
    picks = iter([0.2, 0.9, 0.5])                   # the 1x lr wins on the tuning request

    def row(n):
        return {k: 0.0 for k in ("util_r", "util_g", "priv", "agg")} | {"mu": 0.5, "mem": 0.5,
                                                                        "select": next(picks, 0.0)}
    orig = MA.run_baseline
    MA.run_baseline = lambda cfg, ft, name, lr, fb, rb: (None, {"train_s": 0.0, "lr_used": lr})
    try:
        c = dataclasses.replace(cfg, baselines="npo", lr_mults=(0.3, 1.0, 3.0))
        sweep, best = MA.posthoc_baselines(c, None, D["tok"], sets, sets["retain90"], E, row)
    finally:
        MA.run_baseline = orig
    assert seen == ["tune", "tune", "tune", None]
    assert best["npo"]["lr"] == pytest.approx(MA.baselines.DEFAULTS["npo"]["lr"] * 1.0)
    assert [x["lr"] for x in sweep["npo"]] == pytest.approx([MA.baselines.DEFAULTS["npo"]["lr"] * m for m in (0.3, 1, 3)])
    with pytest.raises(ValueError, match="held-out forget request"):
        MA.data.tuning_request([1, 2], [1, 2])
