"""
Memorization Sinks (Ghosal, Maini, Raghunathan, ICML 2025): sequence-tied dropout over MLP sink neurons.

Each MLP hidden layer is split into a fraction g of shared (generalization) neurons, always on, and a pool
of sink neurons. Every training sequence gets an id; sink neuron j is on for that sequence when a
deterministic uniform draw u_j(id) is below p. Repeats of a sequence always use the same sinks, so what is
specific to it (memorization) collects there, while shared neurons see every sequence and learn what
generalizes. Dropping the sinks at evaluation removes the memorized sequences.

This part of the file holds the mask machinery (nulls.py builds on it):
- sequence_ids: a deterministic hash of each sequence's tokens, on tensors, for a whole batch.
- lcg_uniforms: a tensorized Lehmer (multiplicative congruential) generator seeded by the id and evaluated
  for every neuron index at once by jump-ahead x_j = x_0 * a^j mod M; no Python loop over sequences or
  neurons, so masks are built on the fly per token and any batch can mix ids.
- sink_mask: shared neurons on, sink j on iff u_j < p.

Where we deliberately differ from the authors' released code (../shared/notes/sinks-nulls-neumuter.md):
- Their power table a^j is computed with wrapping int64 `torch.pow`, so from j = 3 on it is not the LCG
  sequence at all; we compute a^j mod M exactly (16-bit split multiplication keeps int64 from overflowing).
- Their seed x_0 = id * 2^16 makes ids in small integer ratio correlated (u(2s) ~ 2 u(s) mod 1) and id 0
  degenerate (every sink on). We scramble the id with a 64-bit mixer first and map it into [1, M-1], so
  neighbouring or multiple ids give unrelated masks and no id means "all sinks on".
The constants a and M are theirs (M = 2^32 - 5, the largest prime below 2^32).
"""
import torch

LCG_A = 1588635695
LCG_M = 4294967291          # 2^32 - 5, prime
_HASH_BASE = 1000003        # polynomial base of the token hash


def mulmod(x, y, m=LCG_M):
    """(x * y) mod m for int64 tensors with 0 <= x, y < m < 2^32, without int64 overflow.
    Split y into 16-bit halves: x*y = (x*y_hi) * 2^16 + x*y_lo, each partial product < 2^48."""
    y_hi, y_lo = y >> 16, y & 0xFFFF
    r = (x * y_hi) % m
    return ((r << 16) + x * y_lo) % m


def _mix64(z):
    """SplitMix64's finalizer on int64 tensors (wrapping arithmetic), giving well-spread seeds."""
    z = z + (-7046029254386353131)                      # 0x9E3779B97F4A7C15 as a signed int64
    z = (z ^ ((z >> 30) & 0x3FFFFFFFF)) * (-4658895280553007687)   # 0xBF58476D1CE4E5B9
    z = (z ^ ((z >> 27) & 0x1FFFFFFFFF)) * (-7723592293110705685)  # 0x94D049BB133111EB
    return z ^ ((z >> 31) & 0x1FFFFFFFF)                # logical shifts: mask off the sign extension


def lcg_seed(ids):
    """id (int64, any value) -> LCG state x_0 in [1, M-1]."""
    return _mix64(ids.long()) % (LCG_M - 1) + 1


_POW_CACHE = {}


def mod_powers(base, n, device):
    """base^j mod M for j = 0..n-1 (int64, exact), by square-and-multiply over the bits of j; cached."""
    key = (base, n, str(device))
    if key not in _POW_CACHE:
        j = torch.arange(n, dtype=torch.long)
        result = torch.ones(n, dtype=torch.long)
        b = torch.full((n,), base % LCG_M, dtype=torch.long)
        while bool((j > 0).any()):
            result = torch.where(j & 1 == 1, mulmod(result, b), result)
            b = mulmod(b, b)
            j = j >> 1
        _POW_CACHE[key] = result.to(device)
    return _POW_CACHE[key]


def lcg_uniforms(ids, n):
    """ids (...) int64 -> (..., n) float32 uniforms in (0, 1): u_j = (x_0 * a^j mod M) / M.
    Identical to stepping x_{j+1} = a * x_j mod M sequentially from x_0 = lcg_seed(id)."""
    x0 = lcg_seed(ids)[..., None]                                    # (..., 1)
    x = mulmod(x0, mod_powers(LCG_A, n, ids.device))                        # (..., n)
    return (x.double() / LCG_M).float()


def sequence_ids(tokens, valid=None):
    """A deterministic int64 hash of each row's tokens: h = sum_t tok_t * B^t mod M over valid positions,
    mapped to [1, M-1] (never 0). tokens: (N, T) int; valid: (N, T) bool (e.g. not padding) or None."""
    tokens = tokens.long()
    if valid is None:
        valid = torch.ones_like(tokens, dtype=torch.bool)
    powers = mod_powers(_HASH_BASE, tokens.shape[1], tokens.device)          # (T,)
    terms = mulmod((tokens + 1) % LCG_M * valid, powers.expand_as(tokens))   # +1 so token 0 counts too
    h = terms.sum(dim=1) % LCG_M        # T * M < 2^63 for any realistic T
    return h % (LCG_M - 1) + 1


def sink_mask(ids, n_shared, n_sink, p):
    """Per-token MemSinks mask. ids (B, T) int64 -> (B, T, n_shared + n_sink) float:
    shared neurons 1, sink neuron j 1 iff u_j(id) < p."""
    uniq, inv = torch.unique(ids, return_inverse=True)   # draw once per distinct id, index per token
    sinks = (lcg_uniforms(uniq, n_sink) < p).float()[inv]
    shared = torch.ones(*ids.shape, n_shared, device=ids.device)
    return torch.cat([shared, sinks], dim=-1)
