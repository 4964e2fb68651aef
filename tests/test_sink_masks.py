"""The MemSinks mask machinery against slow, obviously-right Python-integer references."""
import torch

import memsinks as ms

MASK64 = (1 << 64) - 1


def ref_seed(i):
    """SplitMix64's finalizer in Python integers, then into [1, M-1]."""
    z = (i + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    z = z - (1 << 64) if z >= 1 << 63 else z        # read as a signed int64, as torch holds it
    return z % (ms.LCG_M - 1) + 1


def ref_uniforms(i, n):
    """Step the Lehmer generator one neuron at a time."""
    x, out = ref_seed(i), []
    for _ in range(n):
        out.append(x / ms.LCG_M)
        x = (ms.LCG_A * x) % ms.LCG_M
    return out


def test_mulmod_matches_python_on_extremes():
    vals = [0, 1, 2, 65535, 65536, 2**31, ms.LCG_M - 2, ms.LCG_M - 1, 123456789, 3999999999]
    x = torch.tensor([a for a in vals for _ in vals])
    y = torch.tensor([b for _ in vals for b in vals])
    got = ms.mulmod(x, y).tolist()
    assert got == [(a * b) % ms.LCG_M for a in vals for b in vals]


def test_powers_are_the_lcg_sequence_not_the_wrapped_pow():
    p = ms.mod_powers(ms.LCG_A, 40, "cpu").tolist()
    assert p == [pow(ms.LCG_A, j, ms.LCG_M) for j in range(40)]
    # the authors' wrapping torch.pow diverges from j = 3 (notes: 221140205 vs the true 1359842614)
    assert p[3] == 1359842614


def test_jump_ahead_equals_sequential_generator():
    ids = torch.tensor([1, 2, 3, 17, 65536, 65537, 2**40 + 5, -3, 0])
    u = ms.lcg_uniforms(ids, 300).double()
    for k, i in enumerate(ids.tolist()):
        ref = torch.tensor(ref_uniforms(i, 300), dtype=torch.float64)
        assert torch.allclose(u[k], ref, atol=1e-7), i


def test_same_mask_on_any_batch_layout():
    torch.manual_seed(0)
    ids = torch.randint(1, 10**9, (3, 7))
    full = ms.sink_mask(ids, 5, 64, 0.3)
    # each token alone, a transposed layout and a flat layout give the same per-token mask
    for b in range(3):
        for t in range(7):
            assert torch.equal(full[b, t], ms.sink_mask(ids[b:b + 1, t:t + 1], 5, 64, 0.3)[0, 0])
    assert torch.equal(full.transpose(0, 1), ms.sink_mask(ids.t(), 5, 64, 0.3))
    assert torch.equal(full.reshape(21, 1, -1), ms.sink_mask(ids.reshape(21, 1), 5, 64, 0.3))


def test_on_fraction_close_to_p_and_ids_nearly_independent():
    n_sink, p = 4000, 0.3
    ids = torch.arange(1, 201)
    m = ms.sink_mask(ids[:, None], 0, n_sink, p)[:, 0]            # (200, n_sink)
    frac = m.mean(dim=1)
    assert (frac - p).abs().max() < 0.035                         # binomial sd ~ 0.007
    # overlap of two ids' sinks ~ p^2 for independent masks, for neighbours and for multiples alike
    for a, b in [(1, 2), (5, 10), (7, 21), (100, 101), (3, 6)]:
        ov = (m[a - 1] * m[b - 1]).mean().item()
        assert abs(ov - p * p) < 0.03, (a, b, ov)
    # id 0 is not "all sinks on"
    z = ms.sink_mask(torch.zeros(1, 1, dtype=torch.long), 3, n_sink, p)[0, 0]
    assert z[:3].eq(1).all() and abs(z[3:].mean().item() - p) < 0.035


def test_sequence_ids_hash():
    toks = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 0], [5, 6, 7, 0, 0], [0, 0, 0, 0, 0]])
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    h = ms.sequence_ids(toks, valid)
    # reference: explicit polynomial with Python integers
    for r in range(4):
        acc = 0
        for t in range(5):
            if valid[r, t]:
                acc = (acc + (int(toks[r, t]) + 1) * pow(ms._HASH_BASE, t, ms.LCG_M)) % ms.LCG_M
        assert h[r].item() == acc % (ms.LCG_M - 1) + 1
    assert h[0] == h[2] and h[0] != h[1] and (h > 0).all()
    # padding beyond the valid length does not change the id
    assert ms.sequence_ids(toks[:1, :3]).item() == h[0].item()
