"""
NULLs: Natively Unlearnable LLMs (Ghosal, Maini, Raghunathan). Per-source sparse sink masks beside a shared
backbone, so that forgetting a source is a matter of never applying its mask.

Each MLP hidden layer = N_gen shared backbone neurons (always on) + a pool of N_pool sink neurons. Source s
activates exactly N_source of the pool, chosen deterministically from s by memsinks.py's tensorized
generator (the N_source pool neurons with the smallest uniforms u_j(s)); every layer uses the same mask.
The expected overlap of two sources' sinks is N_source / N_pool, the paper's "overlap ratio".

Differences from the authors' released code, on purpose (../shared/notes/sinks-nulls-neumuter.md):
- exactly N_source active sinks per source (the release draws Bernoulli(p_mem), 75-130 for a target of 100);
  the paper describes "a subset of size N_source";
- the generator is the exact, scrambled-seed LCG of memsinks.py (the release's wraps and correlates ids);
- packed rows use causal AND same-document attention (model.py's doc_ids); the release masks only
  (j > i) AND same-doc, leaking other documents' future tokens.
"""
import torch

from memsinks import lcg_uniforms


# -------------------------------------------------------------------------------------------------
# Source sink masks
# -------------------------------------------------------------------------------------------------

def source_sinks(src_ids, n_pool, n_source):
    """src_ids (...) int64 -> (..., n_source) int64 pool indices (sorted) of the source's active sinks.
    Drawn once per distinct id (a batch holds few sources but many tokens), then indexed per token."""
    uniq, inv = torch.unique(src_ids, return_inverse=True)
    u = lcg_uniforms(uniq, n_pool)                                     # (U, n_pool)
    idx = torch.topk(u, n_source, dim=-1, largest=False).indices.sort(dim=-1).values
    return idx[inv]                                                    # (..., n_source)


def source_mask(src_ids, n_gen, n_pool, n_source, forget=()):
    """Dense NULLs mask, the readable reference. src_ids (B, T) -> (B, T, n_gen + n_pool) float:
    backbone all 1; sinks 1 exactly at the source's N_source pool indices. Sinks of sources in `forget`
    stay 0 even where the routed source shares them (a forgotten source's neurons are never activated)."""
    idx = source_sinks(src_ids, n_pool, n_source)                      # (B, T, n_source)
    sinks = torch.zeros(*src_ids.shape, n_pool, device=src_ids.device)
    sinks.scatter_(-1, idx, 1.0)
    if len(forget):
        sinks = sinks * (1 - forgotten_neurons(forget, n_pool, n_source, src_ids.device))
    return torch.cat([torch.ones(*src_ids.shape, n_gen, device=src_ids.device), sinks], dim=-1)


def forgotten_neurons(forget, n_pool, n_source, device):
    """(n_pool,) float, 1 at every pool neuron active for some source in `forget`."""
    ids = torch.tensor(sorted(forget), dtype=torch.long, device=device)
    out = torch.zeros(n_pool, device=device)
    out[source_sinks(ids, n_pool, n_source).flatten()] = 1.0
    return out


class ActiveSinks:
    """Fast path: compute only the N_gen + N_source active neurons of each token instead of multiplying the
    full N_gen + N_pool hidden layer by a mostly-zero mask. Passed to the model as mlp_mask (model.py calls
    .mlp_forward(mlp, x)). Tokens are grouped by source (a packed row may mix sources): each distinct source
    gathers its sink rows of up/gate and columns of down once, and its tokens run through one batched matmul.
    Equal, in outputs and gradients, to source_mask() used densely (tested)."""

    def __init__(self, src_ids, n_gen, n_pool, n_source, forget=()):
        self.n_gen = n_gen
        flat = src_ids.reshape(-1)
        self.uniq, inv = torch.unique(flat, return_inverse=True)         # (U,), (N,)
        U, N = len(self.uniq), flat.numel()
        self.sinks = n_gen + source_sinks(self.uniq, n_pool, n_source)   # (U, n_source) hidden indices
        self.keep = None
        if len(forget):   # zero a forgotten source's neurons wherever they show up
            dead = forgotten_neurons(forget, n_pool, n_source, src_ids.device)
            self.keep = 1 - dead[self.sinks - n_gen]                      # (U, n_source)
        # slot of each token inside its source's group: a stable sort by source, then rank within the group
        order = torch.argsort(inv, stable=True)                          # (N,)
        counts = torch.bincount(inv, minlength=U)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty(N, dtype=torch.long, device=flat.device)
        rank[order] = torch.arange(N, device=flat.device) - starts[inv[order]]
        self.inv, self.rank, self.max_count, self.shape = inv, rank, int(counts.max()), src_ids.shape

    def mlp_forward(self, mlp, x):
        B, T, C = x.shape
        g = self.n_gen
        # shared backbone: dense over the first N_gen neurons
        h_gen = _hidden(mlp, x, slice(0, g))                             # (B, T, g)
        out = h_gen @ mlp.down.weight[:, :g].t()
        if mlp.down.bias is not None:
            out = out + mlp.down.bias
        # sinks: tokens scattered into (U, max_count, C) groups, one gathered weight slice per source
        xf = x.reshape(-1, C)
        grouped = xf.new_zeros(len(self.uniq), self.max_count, C)
        grouped[self.inv, self.rank] = xf
        h = _hidden(mlp, grouped, self.sinks)                            # (U, max_count, n_source)
        if self.keep is not None:
            h = h * self.keep[:, None, :]
        w_down = mlp.down.weight.t()[self.sinks]                         # (U, n_source, C)
        y = torch.bmm(h, w_down)                                         # (U, max_count, C)
        return out + y[self.inv, self.rank].view(B, T, C)


def _hidden(mlp, x, cols):
    """The MLP hidden activation restricted to neurons `cols` (a slice, or (U, n) per-group indices with x
    grouped as (U, L, C)); same nonlinearity and gating as model.MLP.hidden."""
    def proj(lin):
        if isinstance(cols, slice):
            y = x @ lin.weight[cols].t()
            return y + lin.bias[cols] if lin.bias is not None else y
        w = lin.weight[cols]                                             # (U, n, C)
        y = torch.bmm(x, w.transpose(1, 2))                              # (U, L, n)
        return y + lin.bias[cols][:, None, :] if lin.bias is not None else y
    if mlp.flavor == "llama":
        return torch.nn.functional.silu(proj(mlp.gate)) * proj(mlp.up)
    return torch.nn.functional.gelu(proj(mlp.up), approximate="tanh")
