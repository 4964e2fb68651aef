"""localize.py's value-vector localizers (Lee et al., App. C): Activations, MemFlex, WAGLE and Random, each
against a direct float64 computation of its formula (explicit loops over items, positions and columns), and the
top-r / random selections."""
import math

import pytest
import torch

import localize as loc
import model as M


def tiny(flavor="gpt2", seed=0):
    cfg = M.ModelConfig(flavor=flavor, vocab_size=19, block_size=16, n_layer=2, n_head=2, n_embd=8, d_ff=10,
                        bias=flavor == "gpt2")
    torch.manual_seed(seed)
    net = M.GPT(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return net.double()


def qa_rows(n=5, T=9, seed=0, V=19):
    """Rows like data.qa_batch: a prompt of 3-4 tokens, an answer of 2-4 tokens, right padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, V, (n, T), generator=g)
    y = torch.full((n, T), -100)
    for r in range(n):
        p = 3 + r % 2
        a = 2 + r % 3
        seq = torch.randint(3, V, (p + a,), generator=g)
        x[r] = 0
        x[r, :p + a - 1] = seq[:-1]
        y[r, p - 1:p + a - 1] = seq[p:]
    return {"x": x, "y": y}


def hidden_by_hand(net, x):
    """Per-layer MLP hidden activations of one unpadded row, block by block (no hooks), float64."""
    T = len(x)
    h = net.wte(x[None])
    pos = torch.arange(T)[None]
    rope = None
    if net.cfg.flavor == "gpt2":
        h = h + net.wpe(pos)
    else:
        f = pos[..., None].float() * net.inv_freq          # the model keeps RoPE angles in float32
        e = torch.cat([f, f], -1)[:, None]
        rope = (e.cos().to(h.dtype), e.sin().to(h.dtype))
    out = []
    for b in net.blocks:
        h = h + b.attn(b.ln_1(h), rope, None, None)
        a = b.mlp.hidden(b.ln_2(h))
        out.append(a[0])
        h = h + b.mlp.down(a)
    return out


def answer_positions(y_row):
    return [t for t in range(len(y_row)) if int(y_row[t]) != -100]


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_activation_scores_against_loops(flavor):
    net = tiny(flavor)
    rows = qa_rows()
    ref = [[0.0] * 10 for _ in range(2)]
    count = 0
    with torch.no_grad():
        for x, y in zip(rows["x"], rows["y"]):
            pos = answer_positions(y)
            hs = hidden_by_hand(net, x[:pos[-1] + 1])
            for t in pos:
                count += 1
                for l in range(2):
                    for i in range(10):
                        ref[l][i] += abs(float(hs[l][t, i]))
        for l in range(2):
            for i in range(10):
                v = net.blocks[l].mlp.down.weight[:, i]
                ref[l][i] = ref[l][i] / count * math.sqrt(sum(float(c) ** 2 for c in v))
    raw = loc.activation_scores(net, rows, batch_size=2, normalize=False)
    for l in range(2):
        assert torch.allclose(raw[l], torch.tensor(ref[l], dtype=torch.float64), rtol=1e-10, atol=1e-12)
        z = loc.activation_scores(net, rows, normalize=True)[l]
        m = sum(ref[l]) / 10
        sd = math.sqrt(sum((r - m) ** 2 for r in ref[l]) / 9)
        assert torch.allclose(z, torch.tensor([(r - m) / sd for r in ref[l]], dtype=torch.float64), atol=1e-9)


def nll_grad_by_hand(net, rows, labels, sign=1.0):
    """Per-layer (n_embd, d_ff) gradients of sign * token-mean NLL, one item at a time (float64)."""
    total = int((rows["y"] != -100).sum())
    acc = [torch.zeros_like(b.mlp.down.weight) for b in net.blocks]
    downs = [b.mlp.down.weight for b in net.blocks]
    for x, y in zip(rows["x"], labels):
        pos = answer_positions(y)
        logits, _ = net(x[None, :pos[-1] + 1])
        lp = torch.log_softmax(logits[0], -1)
        nll = -sum(lp[t, int(y[t])] for t in pos)
        for a, g in zip(acc, torch.autograd.grad(sign * nll / total, downs)):
            a += g
    return acc


def test_memflex_against_loops():
    net = tiny("llama")
    fr, rr = qa_rows(4, seed=1), qa_rows(6, seed=2)
    g_unl, g_ret = loc.memflex_gradients(net, fr, rr, n_repeats=3, seed=5, batch_size=4)
    gen = torch.Generator().manual_seed(5)     # the same label draws, in the same order: forget, then retain
    ref = []
    for rows in (fr, rr):
        gs = [nll_grad_by_hand(net, rows, loc.random_answer_labels(rows, 19, gen)) for _ in range(3)]
        ref.append([(gs[0][l] + gs[1][l] + gs[2][l]) / 3 for l in range(2)])
    for got, want in zip((g_unl, g_ret), ref):
        for l in range(2):
            assert torch.allclose(got[l], want[l], atol=1e-12)
    # the attribution formula with explicit cosines and norms
    mu, sigma = 0.5, 0.0
    for l in range(2):
        u, r = ref[0][l], ref[1][l]
        sel = loc.memflex_select(g_unl, g_ret, mu, sigma)[l]
        for i in range(10):
            dot = sum(float(u[j, i]) * float(r[j, i]) for j in range(8))
            nu = math.sqrt(sum(float(u[j, i]) ** 2 for j in range(8)))
            nr = math.sqrt(sum(float(r[j, i]) ** 2 for j in range(8)))
            assert bool(sel[i]) == (dot / (nu * nr) < mu and nu > sigma)
    # ranking by memflex_scores == the indicator with sigma tuned to select exactly k vectors
    scores = loc.memflex_scores(g_unl, g_ret, mu)
    finite = sorted((float(s[i]) for s in scores for i in range(10) if math.isfinite(float(s[i]))), reverse=True)
    k = min(3, len(finite))
    assert k >= 2
    sigma = (finite[k - 1] + finite[k]) / 2 if k < len(finite) else finite[-1] / 2
    want = {l: sorted(int(i) for i in torch.nonzero(m).flatten()) for l, m in
            enumerate(loc.memflex_select(g_unl, g_ret, mu, sigma)) if bool(m.any())}
    assert loc.top_fraction(scores, k / 20) == want


def test_down_grads_rejects_misplaced_labels():
    net = tiny()
    rows = qa_rows()
    bad = rows["y"].clone()
    bad[0, 0] = 3                                   # a label where y is -100
    with pytest.raises(ValueError, match="-100"):
        loc.down_grads(net, rows, labels=bad)


def test_hessian_diag_mean_against_explicit_hessian():
    net = tiny("gpt2", seed=3)
    rows = qa_rows(3, seed=4)
    downs = [b.mlp.down.weight for b in net.blocks]
    shapes = [w.shape for w in downs]
    flat0 = torch.cat([w.detach().flatten() for w in downs])
    total = int((rows["y"] != -100).sum())

    def loss_of(flat):
        ws, o = [], 0
        for s in shapes:
            ws.append(flat[o:o + s.numel()].view(s))
            o += s.numel()
        saved = [b.mlp.down.weight for b in net.blocks]
        for b, w in zip(net.blocks, ws):
            del b.mlp.down.weight
            b.mlp.down.weight = w
        try:
            nll = 0.0
            for x, y in zip(rows["x"], rows["y"]):
                pos = answer_positions(y)
                lp = torch.log_softmax(net(x[None, :pos[-1] + 1])[0][0], -1)
                nll = nll - sum(lp[t, int(y[t])] for t in pos)
            return nll / total
        finally:
            for b, w in zip(net.blocks, saved):
                del b.mlp.down.weight
                b.mlp.down.weight = w

    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):                     # fused attention kernels have no double backward
        H = torch.autograd.functional.hessian(loss_of, flat0)
    n = flat0.numel()
    g = torch.Generator().manual_seed(0)
    zs = [(torch.randint(0, 2, (n,), generator=g) * 2 - 1).double() for _ in range(3)]
    split = lambda z: [z[sum(s.numel() for s in shapes[:l]):sum(s.numel() for s in shapes[:l + 1])].view(shapes[l])
                       for l in range(len(shapes))]
    want = sum(float(z @ H @ z) for z in zs) / (3 * n)
    got = loc.hessian_diag_mean(net, rows, z=[split(z) for z in zs], batch_size=2)
    assert got == pytest.approx(want, rel=1e-9)
    # Hutchinson is unbiased: many random samples approach the true mean of the diagonal
    # (Var z^T H z = 2 sum_{i != j} H_ij^2 for Rademacher z: a 4-sigma band around the true mean of the diagonal)
    S = 60
    est = loc.hessian_diag_mean(net, rows, n_samples=S, seed=1)
    off = H - torch.diag(torch.diagonal(H))
    sd = math.sqrt(2 * float((off ** 2).sum())) / n / math.sqrt(S)
    assert abs(est - float(torch.diagonal(H).mean())) < 4 * sd


def test_wagle_against_loops():
    net = tiny("gpt2", seed=2)
    fr, rr = qa_rows(4, seed=6), qa_rows(5, seed=7)
    scores, gamma = loc.wagle_scores(net, fr, rr, gamma=0.37, batch_size=3)
    assert gamma == 0.37
    g_f = nll_grad_by_hand(net, fr, fr["y"], sign=-1.0)      # L_f = -NLL (gradient ascent's forget loss)
    g_r = nll_grad_by_hand(net, rr, rr["y"])
    for l in range(2):
        W = net.blocks[l].mlp.down.weight
        for i in range(10):
            ref = sum(float(W[j, i].detach()) * float(g_f[l][j, i]) - float(g_r[l][j, i]) * float(g_f[l][j, i]) / 0.37
                      for j in range(8)) / 8
            assert float(scores[l][i]) == pytest.approx(ref, rel=1e-9, abs=1e-14)
    with pytest.raises(ValueError, match="gamma"):
        loc.wagle_scores(net, fr, rr, gamma=-1.0)
    # gamma estimated on the retain rows when not given (a random model's Hessian may be indefinite: then an error)
    g_est = loc.hessian_diag_mean(net, rr, n_samples=2, seed=0)
    if g_est > 0:
        s2, g2 = loc.wagle_scores(net, fr, rr, n_samples=2, seed=0)
        assert g2 == g_est and torch.equal(s2[0], loc.wagle_scores(net, fr, rr, gamma=g_est)[0][0])
    else:
        with pytest.raises(ValueError, match="gamma"):
            loc.wagle_scores(net, fr, rr, n_samples=2, seed=0)


def test_localizers_leave_the_model_untouched():
    net = tiny("llama")
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [p.requires_grad for p in net.parameters()]
    fr, rr = qa_rows(3, seed=1), qa_rows(3, seed=2)
    loc.activation_scores(net, fr)
    loc.memflex_gradients(net, fr, rr, n_repeats=1)
    loc.wagle_scores(net, fr, rr, gamma=1.0)
    loc.hessian_diag_mean(net, rr, n_samples=1)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert flags == [p.requires_grad for p in net.parameters()] and net.training
    assert all(p.grad is None for p in net.parameters())


def test_top_fraction_global_per_layer_exclude():
    s = [torch.tensor([0.1, 0.9, 0.5, 0.3], dtype=torch.float64), torch.tensor([0.8, 0.2, 0.7, 0.6], dtype=torch.float64)]
    assert loc.top_fraction(s, 0.25) == {0: [1], 1: [0]}                     # top 2 of 8 over all layers
    assert loc.top_fraction(s, 0.5, per_layer=True) == {0: [1, 2], 1: [0, 2]}
    assert loc.top_fraction(s, 0.25, exclude={0: [1], 1: [0]}) == {1: [2, 3]}
    ties = [torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]
    assert loc.top_fraction(ties, 0.5) == {0: [0, 1, 2]}                      # ties: lower (layer, index) first
    with pytest.raises(ValueError, match="only"):
        loc.top_fraction(s, 0.75, exclude={0: [0, 1, 2], 1: [0]})
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        loc.top_fraction(s, 0.0)


def test_random_selection_size_disjoint_uniform():
    net = M.GPT(M.ModelConfig(n_layer=3, n_embd=8, n_head=2, d_ff=40, vocab_size=11, block_size=8))
    a = loc.random_selection(net, 0.1, seed=7)
    b = loc.random_selection(net, 0.1, seed=11, exclude=a)
    assert loc.selection_size(a) == loc.selection_size(b) == 12
    flat = lambda s: {(l, i) for l, v in s.items() for i in v}
    assert not flat(a) & flat(b)
    assert loc.random_selection(net, 0.1, seed=7) == a and a != loc.random_selection(net, 0.1, seed=8)
    # every vector is equally likely: over many seeds each layer gets about a third
    counts = torch.zeros(3)
    for seed in range(200):
        for l, v in loc.random_selection(net, 0.1, seed=seed).items():
            counts[l] += len(v)
    assert torch.allclose(counts / counts.sum(), torch.full((3,), 1 / 3), atol=0.04)
    # the region it makes moves exactly those columns
    region = loc.value_vector_region(net, a)
    assert loc.region_size(net, region) == 12 * 8
