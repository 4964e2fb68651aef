"""
model.py's core against slow, obviously-right references (float64, explicit loops over rows, heads and positions),
and its hook points (MLP masks, adapters, document ids, KV cache, padding) against their plain equivalents.
Every model is tiny and has O(1) random weights, so a wrong path changes the logits visibly.
"""
import math

import pytest
import torch
import torch.nn as nn

from model import GPT, ModelConfig, rope_inv_freq, rotate_half

FLAVORS = ["gpt2", "llama"]


def make(flavor="gpt2", seed=0, **kw):
    base = dict(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32, d_ff=48)
    if flavor == "llama":
        base.update(n_kv_head=2, bias=False, tie_embeddings=False)
    base.update(kw)
    torch.manual_seed(seed)
    m = GPT(ModelConfig(flavor=flavor, **base))
    with torch.no_grad():   # GPT's init gives near-zero logits, which would hide many bugs
        for n, p in m.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if ".ln_" in n or n.startswith("ln_") else 0.3 * torch.randn_like(p))
    return m.eval()


def randint(shape, high=61, seed=0):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


# --- the slow reference --------------------------------------------------------------------------------------

def slow_inv_freq(cfg, j):
    """theta^(-2j/hd) for pair j, then Llama 3's rule: keep high frequencies, divide low ones by `factor`, and
    interpolate smoothly in between (by wavelength against the original context)."""
    f = cfg.rope_theta ** (-2 * j / cfg.head_dim)
    if cfg.rope_scaling:
        factor, lo, hi, old = cfg.rope_scaling
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            return f
        if wavelen > old / lo:
            return f / factor
        s = (old / wavelen - lo) / (hi - lo)
        return (1 - s) * f / factor + s * f
    return f


def slow_rope(x, pos, cfg):
    """Rotate each pair (x_j, x_{j+hd/2}) of row t by the angle pos_t * inv_freq_j. x: (T, hd)."""
    hd, out = cfg.head_dim, x.clone()
    for t, p in enumerate(pos):
        for j in range(hd // 2):
            a = p * slow_inv_freq(cfg, j)
            x1, x2 = x[t, j].item(), x[t, j + hd // 2].item()
            out[t, j] = x1 * math.cos(a) - x2 * math.sin(a)
            out[t, j + hd // 2] = x1 * math.sin(a) + x2 * math.cos(a)
    return out


def slow_forward(model, idx, doc_ids=None, masks=None):
    """Logits in float64, one row, layer, head and query position at a time. masks: list of per-layer masks."""
    cfg = model.cfg
    P = {k: v.detach().double() for k, v in model.state_dict().items()}
    nh, nkv, hd, (B, T) = cfg.n_head, cfg.n_kv_head, cfg.head_dim, idx.shape

    def lin(x, name):
        y = x @ P[name + ".weight"].T
        return y + P[name + ".bias"] if name + ".bias" in P else y

    def norm(x, name):
        if cfg.flavor == "llama":
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * P[name + ".weight"]
        mu = x.mean(-1, keepdim=True)
        y = (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + cfg.norm_eps) * P[name + ".weight"]
        return y + P[name + ".bias"] if name + ".bias" in P else y

    out = torch.zeros(B, T, cfg.vocab_size, dtype=torch.float64)
    for b in range(B):
        docs = [0] * T if doc_ids is None else doc_ids[b].tolist()
        pos = []
        for t in range(T):   # positions count from each document's start
            pos.append(pos[-1] + 1 if t and docs[t] == docs[t - 1] else 0)
        x = P["wte.weight"][idx[b]]
        if cfg.flavor == "gpt2":
            x = x + P["wpe.weight"][pos]
        for l in range(cfg.n_layer):
            pre = f"blocks.{l}."
            qkv = lin(norm(x, pre + "ln_1"), pre + "attn.qkv")
            q, k, v = qkv[:, :nh * hd], qkv[:, nh * hd:(nh + nkv) * hd], qkv[:, (nh + nkv) * hd:]
            y = torch.zeros(T, nh * hd, dtype=torch.float64)
            for h in range(nh):
                g = h // (nh // nkv)     # query head h reads kv head g: heads are grouped consecutively
                qh, kh, vh = q[:, h * hd:(h + 1) * hd], k[:, g * hd:(g + 1) * hd], v[:, g * hd:(g + 1) * hd]
                if cfg.flavor == "llama":
                    qh, kh = slow_rope(qh, pos, cfg), slow_rope(kh, pos, cfg)
                for t in range(T):
                    keys = [s for s in range(t + 1) if docs[s] == docs[t]]
                    w = torch.softmax(torch.stack([qh[t] @ kh[s] for s in keys]) / math.sqrt(hd), 0)
                    y[t, h * hd:(h + 1) * hd] = sum(w[i] * vh[s] for i, s in enumerate(keys))
            x = x + lin(y, pre + "attn.proj")
            hn = norm(x, pre + "ln_2")
            if cfg.flavor == "llama":
                z = lin(hn, pre + "mlp.gate")
                a = z / (1 + torch.exp(-z)) * lin(hn, pre + "mlp.up")
            else:
                u = lin(hn, pre + "mlp.up")
                if cfg.gelu == "tanh":      # GPT-2's gelu_new
                    a = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
                else:                       # x * Phi(x), Phi the standard normal CDF
                    a = u * 0.5 * (1 + torch.erf(u / math.sqrt(2)))
            if masks is not None and masks[l] is not None:
                a = a * torch.broadcast_to(masks[l], (B, T, cfg.d_ff))[b].double()
            x = x + lin(a, pre + "mlp.down")
        out[b] = norm(x, "ln_f") @ P["lm_head.weight"].T
    return out


CASES = {"gpt2": dict(flavor="gpt2"), "gpt2-exact-gelu": dict(flavor="gpt2", gelu="exact"),
         "llama-gqa": dict(flavor="llama"),
         "llama-mha-bias-tied": dict(flavor="llama", n_kv_head=4, bias=True, tie_embeddings=True),
         "llama-mqa-llama3": dict(flavor="llama", n_kv_head=1, rope_theta=500000.0, rope_scaling=(8.0, 1.0, 4.0, 16.0))}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_slow_reference(case):
    m = make(**CASES[case])
    idx = randint((2, 9))
    doc_ids = torch.tensor([[0] * 9, [3, 3, 3, 5, 5, 5, 5, 7, 7]])
    mask = (torch.rand(2, 9, 48, generator=torch.Generator().manual_seed(2)) > 0.3).float()
    with torch.no_grad():
        assert torch.allclose(m(idx)[0].double(), slow_forward(m, idx), atol=2e-5)
        assert torch.allclose(m(idx, doc_ids=doc_ids)[0].double(), slow_forward(m, idx, doc_ids), atol=2e-5)
        got = m(idx, mlp_mask=[mask, None])[0].double()
        assert torch.allclose(got, slow_forward(m, idx, masks=[mask, None]), atol=2e-5)


def test_gelu_forms_differ_and_a_bad_one_is_named():
    # the slow-reference comparison (atol 2e-5) tells the two forms apart only if they differ by more here
    idx = randint((2, 9))
    with torch.no_grad():
        assert (make(gelu="tanh")(idx)[0] - make(gelu="exact")(idx)[0]).abs().max() > 1e-4    # tolerance: 2e-5
    with pytest.raises(ValueError, match="gelu"):
        ModelConfig(gelu="erf")


def test_rope_inv_freq_and_rotation_match_slow_reference():
    cfg = ModelConfig(flavor="llama", n_embd=64, n_head=2, rope_theta=500000.0, rope_scaling=(8.0, 1.0, 4.0, 64.0))
    inv = rope_inv_freq(cfg)
    ref = torch.tensor([slow_inv_freq(cfg, j) for j in range(cfg.head_dim // 2)], dtype=torch.float64)
    assert torch.allclose(inv.double(), ref, rtol=1e-6)
    # the three regimes of the Llama 3 rule all occur here, so each branch is checked
    wl = 2 * math.pi / (cfg.rope_theta ** (-2 * torch.arange(16.0, dtype=torch.float64) / 32))
    assert (wl < 16).any() and (wl > 64).any() and ((wl >= 16) & (wl <= 64)).any()
    # x * cos + rotate_half(x) * sin (what Attention computes) == rotating each (j, j + hd/2) pair
    x, pos = torch.randn(7, 32, dtype=torch.float64), list(range(3, 10))
    freqs = torch.tensor(pos, dtype=torch.float64)[:, None] * inv.double()
    emb = torch.cat([freqs, freqs], -1)
    fast = x * emb.cos() + rotate_half(x) * emb.sin()
    assert torch.allclose(fast, slow_rope(x, pos, cfg), atol=1e-9)


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = make("llama", n_kv_head=2, bias=True)
    mha = make("llama", n_kv_head=4, bias=True, seed=1)
    hd, d = 8, 32
    sd = dict(gqa.state_dict())
    for l in range(2):
        for kind in ("weight", "bias"):
            t = sd[f"blocks.{l}.attn.qkv.{kind}"]
            q, k, v = t[:4 * hd], t[4 * hd:6 * hd], t[6 * hd:]
            rep = lambda z: z.reshape(2, hd, *z.shape[1:]).repeat_interleave(2, 0).reshape(4 * hd, *z.shape[1:])
            sd[f"blocks.{l}.attn.qkv.{kind}"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(sd)
    idx = randint((2, 11))
    with torch.no_grad():
        assert torch.allclose(gqa(idx)[0], mha(idx)[0], atol=1e-5)


@pytest.mark.parametrize("kw", [dict(n_kv_head=2), dict(n_kv_head=1, attention_layers=("local", "global"),
                                                           local_window=3)])
def test_native_gqa_equals_repeated_kv_heads(kw, monkeypatch):
    """torch >= 2.5's enable_gqa path against the repeat_interleave copy (SDPA_GQA = False): forward with and
    without document ids, every gradient, and KV-cached generation (left padding: document ids and a mask)."""
    import model as M
    assert M.SDPA_GQA, "requirements.txt's torch >= 2.6 has SDPA's enable_gqa: the native path must be on"
    m = make("llama", **kw)
    idx, doc = randint((2, 13)), torch.tensor([[0] * 6 + [1] * 7, [3] * 13])
    prompts = [randint((n,), seed=n).tolist() for n in (2, 7, 4)]
    sdpa, calls = torch.nn.functional.scaled_dot_product_attention, []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(k.get("enable_gqa", False)) or sdpa(*a, **k))

    def run():
        out = {"plain": m(idx)[0], "docs": m(idx, doc_ids=doc)[0]}
        m.zero_grad()
        (m(idx, idx, doc_ids=doc)[1] + m(idx, idx)[1]).backward()
        out.update({n: p.grad.clone() for n, p in m.named_parameters()})
        cache, steps = M.KVCache(m.cfg.n_layer), []
        for t in range(0, 13, 4):                  # prefill in chunks, then one token at a time
            steps.append(m(idx[:, t:t + 4], doc_ids=doc[:, t:t + 4], cache=cache)[0])
        out["cached"] = torch.cat(steps, 1)
        with torch.no_grad():
            out["generated"] = m.generate(prompts, 8, pad_id=5).float()
        return out
    native = run()
    assert calls and all(calls)                    # every attention call shared the kv heads (on this torch)
    calls.clear()
    monkeypatch.setattr(M, "SDPA_GQA", False)
    copied = run()
    assert calls and not any(calls)
    for k in native:
        assert torch.allclose(native[k], copied[k], rtol=1e-5, atol=1e-6), k
    assert torch.allclose(native["cached"], native["docs"], atol=1e-5)


# --- generation ----------------------------------------------------------------------------------------------


def test_kv_cache_layer_equals_concatenation_and_grows_in_place():
    """KVCache.Layer keeps keys/values in a buffer it doubles when full: each append equals torch.cat of
    everything appended so far, bit for bit, and an append that fits writes into the same buffer (no copy of the
    cache); a selected cache (index_select) continues from its own copy; under autograd it concatenates."""
    import model as M
    g = torch.Generator().manual_seed(0)
    layer, ks, vs, bufs = M.KVCache.Layer(), [], [], []
    for T in (5, 1, 1, 3, 1, 1, 1, 20, 1):
        k, v = torch.randn(2, 3, T, 4, generator=g), torch.randn(2, 3, T, 4, generator=g)
        ks.append(k), vs.append(v)
        out_k, out_v = layer.append(k.transpose(2, 3).contiguous().transpose(2, 3), v)   # a strided input too
        assert torch.equal(out_k, torch.cat(ks, 2)) and torch.equal(out_v, torch.cat(vs, 2))
        bufs.append(layer.buf[0])                   # kept alive: a new buffer cannot reuse an old one's memory
    assert len({b.data_ptr() for b in bufs}) == 3   # room for 10 (5 tokens), 22 (11), 66 (33): 3 buffers, 9 appends
    cache = M.KVCache(1)
    cache.layers[0] = layer
    sel = cache.select(torch.tensor([1, 1, 0]))
    k = torch.randn(3, 3, 1, 4, generator=g)
    out_k, _ = sel.layers[0].append(k, k)
    assert torch.equal(out_k, torch.cat([torch.cat(ks, 2)[[1, 1, 0]], k], 2))
    assert torch.equal(layer.k, torch.cat(ks, 2))   # the original is unchanged
    w = torch.randn(2, 3, 2, 4, requires_grad=True)
    grad_layer = M.KVCache.Layer()
    grad_layer.append(w, w)
    out_k, _ = grad_layer.append(w * 2, w)
    out_k.sum().backward()
    assert grad_layer.buf is None and torch.equal(w.grad, torch.full_like(w, 3.0))


@pytest.mark.parametrize("flavor", FLAVORS)
def test_kv_cache_select_continues_the_chosen_rows(flavor):
    """KVCache.select: rows of a prefilled cache, repeated and reordered, continue as their full sequences do (with
    left padding: document ids and positions go with the rows); the original cache is left as it was."""
    import model as M
    m = make(flavor).double().eval()
    idx = randint((2, 6))
    doc = torch.tensor([[-1, -1, 0, 0, 0, 0], [0] * 6])          # row 0 left-padded by two
    cache = M.KVCache(m.cfg.n_layer)
    with torch.no_grad():
        m(idx[:, :4], doc_ids=doc[:, :4], cache=cache)
        rows = torch.tensor([1, 0, 1])
        picked = cache.select(rows)
        step, _ = m(idx[rows, 4:], cache=picked)
        full, _ = m(idx[rows], doc_ids=doc[rows])
    torch.testing.assert_close(step, full[:, 4:], rtol=0, atol=1e-12)
    assert len(cache) == 4 and cache.layers[0].k.shape[0] == 2 and cache.next_pos.tolist() == [2, 4]
    assert len(picked) == 6 and picked.next_pos.tolist() == [6, 4, 6]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_kv_cache_generation_equals_recomputation(flavor):
    m = make(flavor)
    prompts = randint((3, 5))
    greedy = m.generate(prompts, 12)
    assert torch.equal(greedy, m.generate(prompts, 12, use_cache=False))
    # and both equal the plainest loop: argmax of a full forward over everything so far
    seq = prompts.clone()
    for _ in range(12):
        seq = torch.cat([seq, m(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, seq[:, 5:])
    kw = dict(temperature=1.0, top_k=10)
    a = m.generate(prompts, 12, generator=torch.Generator().manual_seed(7), **kw)
    b = m.generate(prompts, 12, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    assert torch.equal(a, b) and not torch.equal(a, greedy)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_left_padded_batch_equals_each_prompt_alone(flavor):
    m = make(flavor)
    prompts = [randint((n,), seed=n).tolist() for n in (2, 7, 4)]
    batched = m.generate(prompts, 8, pad_id=5)
    for i, p in enumerate(prompts):
        assert torch.equal(batched[i], m.generate([p], 8)[0])
        assert torch.equal(batched[i], m.generate(torch.tensor([p]), 8, use_cache=False)[0])


def test_generation_stops_at_eos_and_fills_it():
    m = make("llama")
    prompts = randint((2, 4))
    free = m.generate(prompts, 6)
    eos = free[0, 2].item()
    out = m.generate(prompts, 6, eos_id=eos)
    for row in range(2):    # each row follows the free run up to its first eos, then holds eos
        hit = (free[row] == eos).nonzero()
        first = hit[0].item() if len(hit) else 6
        assert torch.equal(out[row, :first + 1], free[row, :first + 1]) and (out[row, first:] == eos).all()


def test_position_overflow_raises():
    m = make("gpt2", block_size=8)
    with pytest.raises(ValueError, match="block_size"):
        m(randint((1, 9)))
    with pytest.raises(ValueError, match="block_size"):
        m.generate(randint((1, 6)), 4)     # positions 6..9: the cache path must check too
    # positions restart per document, so a packed row may be longer than block_size
    m(randint((1, 12)), doc_ids=torch.tensor([[0] * 6 + [1] * 6]))


# --- documents -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flavor", FLAVORS)
def test_packed_documents_equal_documents_alone(flavor):
    m = make(flavor)
    A, Bd = randint((1, 5), seed=1), randint((1, 7), seed=2)
    with torch.no_grad():
        alone_a, alone_b = m(A)[0], m(Bd)[0]
        for first, second, la, lb in ((A, Bd, alone_a, alone_b), (Bd, A, alone_b, alone_a)):
            n = first.shape[1]
            row = torch.cat([first, second], 1)
            doc = torch.tensor([[1] * n + [2] * second.shape[1]])
            packed = m(row, doc_ids=doc)[0]
            assert torch.allclose(packed[:, :n], la, atol=1e-5) and torch.allclose(packed[:, n:], lb, atol=1e-5)
            # no leak: changing one document's tokens leaves the other document's logits unchanged
            for lo, hi in ((0, n), (n, row.shape[1])):
                other = torch.ones(row.shape[1], dtype=torch.bool)
                other[lo:hi] = False
                changed = row.clone()
                changed[:, lo:hi] = (changed[:, lo:hi] + 1) % 61
                moved = m(changed, doc_ids=doc)[0]
                assert torch.allclose(moved[:, other], packed[:, other], atol=1e-5)
                assert not torch.allclose(moved[:, ~other], packed[:, ~other], atol=1e-3)


# --- MLP masks and value vectors -----------------------------------------------------------------------------

@pytest.mark.parametrize("flavor", FLAVORS)
def test_mlp_mask_forms(flavor):
    m = make(flavor, bias=True)
    idx = randint((2, 6))
    mask = (torch.rand(2, 6, 48, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    with torch.no_grad():
        plain = m(idx)[0]
        assert torch.equal(m(idx, mlp_mask=torch.ones(48))[0], plain)
        assert torch.equal(m(idx, mlp_mask=[None, None])[0], plain)
        single = m(idx, mlp_mask=mask)[0]
        assert torch.equal(m(idx, mlp_mask=[mask, mask])[0], single)
        assert not torch.allclose(single, plain, atol=1e-3)
        with pytest.raises(ValueError, match="per-layer"):
            m(idx, mlp_mask=[mask])
        with pytest.raises(ValueError, match="per-layer"):
            m(idx, mlp_mask=[mask, mask, mask])


@pytest.mark.parametrize("flavor", FLAVORS)
def test_masking_neuron_equals_zeroing_its_value_vector(flavor):
    m = make(flavor, bias=True)     # a down-projection bias: masking neuron i must leave it in place
    idx, i, layer = randint((2, 6)), 17, 1
    mask = torch.ones(48)
    mask[i] = 0
    with torch.no_grad():
        masked = m(idx, mlp_mask=[None, mask])[0]
        assert not torch.allclose(masked, m(idx)[0], atol=1e-3)
        assert m.value_vector(layer, i).data_ptr() == m.blocks[layer].mlp.down.weight[:, i].data_ptr()
        m.value_vector(layer, i).zero_()       # a view: writes reach down.weight[:, i]
        assert (m.blocks[layer].mlp.down.weight[:, i] == 0).all() and (m.blocks[layer].mlp.down.bias != 0).all()
        assert torch.allclose(m(idx)[0], masked, atol=1e-5)


# --- adapters ------------------------------------------------------------------------------------------------

class Recorder(nn.Module):
    """Adds a fixed vector and remembers what it was called with."""
    def __init__(self, c):
        super().__init__()
        self.c = nn.Parameter(c)

    def forward(self, x, ctx):
        self.seen = (x.detach().clone(), ctx)
        return self.c.expand_as(x)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_adapter_output_is_added_to_the_residual(flavor):
    m = make(flavor)
    idx = randint((2, 6))
    final_in = {}
    m.ln_f.register_forward_pre_hook(lambda mod, args: final_in.__setitem__("x", args[0].detach().clone()))
    ln2_out = {}
    m.blocks[1].ln_2.register_forward_hook(lambda mod, a, out: ln2_out.__setitem__("h", out.detach().clone()))
    with torch.no_grad():
        plain = m(idx)[0]
        x0, h0 = final_in["x"], ln2_out["h"]
        zero = m.attach_adapter(1, Recorder(torch.zeros(32)))
        assert any(p is zero.c for p in m.parameters())
        assert torch.equal(m(idx, adapter_ctx="ctx")[0], plain)
        assert torch.equal(zero.seen[0], h0) and zero.seen[1] == "ctx"   # adapter sees the normed MLP input
        c = torch.randn(32)
        m.attach_adapter(1, Recorder(c))
        shifted = m(idx)[0]
        assert torch.allclose(final_in["x"], x0 + c, atol=1e-5)          # last block: residual + c, nothing else
        assert torch.allclose(shifted, m.lm_head(m.ln_f(x0 + c)), atol=1e-5)


# --- log-probabilities and loss ------------------------------------------------------------------------------

@pytest.mark.parametrize("flavor", FLAVORS)
def test_token_logprobs_and_loss_match_explicit_loops(flavor):
    m = make(flavor)
    idx, targets = randint((2, 7)), randint((2, 7), seed=4)
    targets[0, :3] = -100
    targets[1, 5] = -100
    with torch.no_grad():
        logits, loss = m(idx, targets)
        lp = m.token_logprobs(idx, targets)
    assert lp.dtype == torch.float32 and lp.shape == (2, 7)
    ref = torch.zeros(2, 7, dtype=torch.float64)
    total, count = 0.0, 0
    for b in range(2):
        for t in range(7):
            if targets[b, t] == -100:
                continue
            row = logits[b, t].double()
            ref[b, t] = row[targets[b, t]] - torch.log(torch.exp(row).sum())
            total, count = total - ref[b, t].item(), count + 1
    assert torch.allclose(lp.double(), ref, atol=1e-5)
    assert (lp[targets == -100] == 0).all()
    assert abs(loss.item() - total / count) < 1e-5


def test_each_script_trains_from_scratch_with_its_gelu_form():
    # from scratch: the erf GELU (as nanoGPT) in every script; whatever the value, the Config's field reaches the
    # model, and a bad value is named with its choices
    from dataclasses import replace
    import compare, locprobe, memadapt, memsinks, neumuter, nulls
    import train as T
    assert ModelConfig().gelu == "exact"
    for mod in (memsinks, memadapt, locprobe, nulls, neumuter, compare):
        assert mod.Config().gelu == "exact", mod.__name__
        with pytest.raises(SystemExit) as e:
            T.parse_config(mod.Config, ["--gelu=erf"], {})
        assert e.value.code == 2
    for g in ("exact", "tanh"):
        for mod in (memsinks, memadapt, locprobe, nulls):
            assert mod.model_config(replace(mod.Config(), flavor="gpt2", gelu=g), 64).gelu == g, mod.__name__
        assert neumuter.model_config(replace(neumuter.Config(), gelu=g), 64, 32).gelu == g
        assert memadapt.model_config(compare.ma_config(replace(compare.Config(), gelu=g)), 64).gelu == g
