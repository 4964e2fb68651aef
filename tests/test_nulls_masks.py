"""NULLs source masks and the active-neuron fast path against the dense masked reference."""
import torch

import model
import nulls


def test_exactly_n_source_sinks_deterministic_and_overlap():
    n_pool, n_source = 1024, 64
    ids = torch.arange(1, 301)
    idx = nulls.source_sinks(ids, n_pool, n_source)
    assert idx.shape == (300, n_source)
    assert all(len(set(r)) == n_source for r in idx.tolist())           # distinct neurons, exact count
    assert torch.equal(idx, nulls.source_sinks(ids, n_pool, n_source))   # deterministic
    m = nulls.source_mask(ids[:, None], 8, n_pool, n_source)[:, 0]       # (300, 8 + n_pool)
    assert m[:, :8].eq(1).all() and m[:, 8:].sum(1).eq(n_source).all()
    # expected overlap of two sources' sinks = n_source / n_pool (the overlap ratio)
    s = m[:, 8:]
    ov = (s[:-1] * s[1:]).sum(1) / n_source
    assert abs(ov.mean().item() - n_source / n_pool) < 0.01


def test_forgotten_sinks_never_on():
    n_gen, n_pool, n_source = 4, 256, 32
    m = nulls.source_mask(torch.tensor([[3, 5, 9]]), n_gen, n_pool, n_source, forget={5})
    dead = nulls.forgotten_neurons({5}, n_pool, n_source, "cpu")
    assert m[0, 1, n_gen:].sum() == 0                                   # the forgotten source itself
    assert (m[0, :, n_gen:] * dead).sum() == 0                          # nor its neurons via others
    assert m[0, 0, n_gen:].sum() == n_source - (dead * nulls.source_mask(torch.tensor([[3]]), n_gen, n_pool, n_source)[0, 0, n_gen:]).sum()


def _tiny(flavor):
    cfg = model.ModelConfig(flavor=flavor, vocab_size=40, n_layer=2, n_head=2, n_embd=16, d_ff=6 + 48,
                            bias=flavor == "gpt2", block_size=32)
    torch.manual_seed(0)
    return model.GPT(cfg)


def test_fast_path_equals_dense_mask_outputs_and_grads():
    n_gen, n_pool, n_source = 6, 48, 8
    for flavor in ["gpt2", "llama"]:
        for forget in [(), (7,)]:
            m = _tiny(flavor)
            x = torch.randint(0, 40, (3, 12))
            y = torch.randint(0, 40, (3, 12))
            # a packed row mixing sources, a row of one source, a row sharing a source with row 0
            src = torch.tensor([[7] * 5 + [11] * 7, [2] * 12, [11] * 3 + [4] * 9])
            doc = torch.tensor([[0] * 5 + [1] * 7, [0] * 12, [0] * 3 + [1] * 9])
            results = []
            for mask in [nulls.source_mask(src, n_gen, n_pool, n_source, forget),
                         nulls.ActiveSinks(src, n_gen, n_pool, n_source, forget)]:
                m.zero_grad()
                logits, loss = m(x, y, doc_ids=doc, mlp_mask=mask)
                loss.backward()
                results.append((logits.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}))
            (l0, g0), (l1, g1) = results
            assert torch.allclose(l0, l1, atol=1e-5), (flavor, forget)
            for k in g0:
                assert torch.allclose(g0[k], g1[k], atol=1e-5), (flavor, forget, k)
