"""
Natively Unlearnable Large Language Models (NULLs; Ghosal, Maini, Raghunathan; arXiv 2606.13873). Every MLP has
N_gen shared backbone neurons, always on, beside a pool of N_pool sinks of which each data source switches on a
fixed N_source, so what is specific to a source collects in its sinks; a source is unlearned by never switching
its sinks on again, with no gradient step and no access to the retained data.

Run: `python nulls.py` (the built-in world, people as sources; CPU, minutes); `--preset=smoke` (seconds);
`--preset=paper` (Wikipedia articles as sources, long ones in block-size pieces; a SmolLM-shaped model, one GPU);
`--seeds=0,1,2` (every claim as mean +- std, verdict per seed); `--sweep=overlap|n_source|capacity` (Figure 8);
`torchrun --nproc_per_node=N nulls.py ...` trains data-parallel, rank 0 evaluates. It trains NULLs, Retrained
(NULLs without the forgotten sources) and a standard transformer of the same size (cached in out_dir, named by
train.run_key; on CPU in --workers=2 processes side by side, with the numbers of --workers=1), unlearns n_forget
people, probes their facts by truth ratio with verbatim and paraphrased cloze prompts (Figures 3-4), tracks NPO
and gradient ascent on the standard model against related facts of other articles (3c), runs the relearning
attack (7b), knowledge capacity (8c) and general multiple-choice capability (Table 1), prints the tables and
claims, and writes out_dir/results.json, results.md and the figures. Measured numbers: docs/nulls.md. The sink
masks come from memsinks.py's generator.

Where we deliberately differ from the authors' released code, and why:
- exactly N_source active sinks per source (the release draws Bernoulli(p_mem), 75-130 for a target of 100): the
  paper describes "a subset of size N_source";
- the generator is memsinks.py's exact, scrambled-seed LCG (the release's wraps and correlates ids);
- packed rows use causal AND same-document attention (model.py's doc_ids); the release masks only (j > i) AND
  same document, which leaks other documents' future tokens.
"""
import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, asdict

import torch

import baselines
import data
import eval as ev
import model as M
import train as T
from memsinks import lcg_uniforms


# -------------------------------------------------------------------------------------------------
# The method: per-source sink masks (memsinks.py's generator) and the fast path over active neurons
# -------------------------------------------------------------------------------------------------

# Source s switches on the N_source pool neurons with the smallest uniforms u_j(s) of memsinks.py's generator, the
# same mask in every layer; two sources share N_source / N_pool of their sinks on average (the "overlap ratio").

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
    gets its sink rows of up/gate and columns of down, and its tokens run through one batched matmul.
    Equal, in outputs and gradients, to source_mask() used densely (tested), and bit for bit to slicing
    the backbone and indexing each source's sinks separately (nulls.py's published runs; tested)."""

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
        self.max_count = int(counts.max())
        self.slot = inv * self.max_count + rank       # (N,) the token's row of the (U max_count, C) grouped tokens
        # every hidden row a step reads, the backbone's then each source's sinks: one gather per weight, so its
        # gradient is one scatter (index_add) into one zero tensor, not a backbone slice's plus the sinks' plus a sum
        self.rows = torch.cat([torch.arange(n_gen, device=flat.device), self.sinks.flatten()])

    def mlp_forward(self, mlp, x):
        B, T, C = x.shape
        g, (U, n) = self.n_gen, self.sinks.shape
        # the gathered rows; each matmul below gets its operand in the layout the separate slices had (down's
        # backbone a column slice, its sinks contiguous), so the numbers are those of slicing the weights
        # (split, not two slices: the backward is one cat, not two zero-filled tensors and their sum)
        w = {name: lin.weight.index_select(0, self.rows).split([g, U * n])
             for name, lin in (("up", mlp.up), ("gate", getattr(mlp, "gate", None))) if lin is not None}
        down_gen, down_sinks = mlp.down.weight.index_select(1, self.rows).split([g, U * n], dim=1)   # (C, g), (C, U n)
        # shared backbone: dense over the first N_gen neurons
        h_gen = _hidden(mlp, x, slice(0, g), {k: v[0] for k, v in w.items()})   # (B, T, g)
        out = h_gen @ down_gen.t()
        if mlp.down.bias is not None:
            out = out + mlp.down.bias
        # sinks: tokens scattered into (U, max_count, C) groups, one weight slice per source
        xf = x.reshape(-1, C)
        grouped = xf.new_zeros(U * self.max_count, C).index_copy(0, self.slot, xf).view(U, self.max_count, C)
        h = _hidden(mlp, grouped, self.sinks, {k: v[1].view(U, n, C) for k, v in w.items()})   # (U, max_count, n)
        if self.keep is not None:
            h = h * self.keep[:, None, :]
        y = torch.bmm(h, down_sinks.t().reshape(U, n, C).contiguous())   # (U, max_count, C)
        return out + y.view(-1, C).index_select(0, self.slot).view(B, T, C)


def _hidden(mlp, x, cols, weights):
    """The MLP hidden activation restricted to neurons `cols` (a slice, or (U, n) per-group indices with x
    grouped as (U, L, C)) whose up (and gate) rows are weights["up"] (["gate"]): (n, C), or (U, n, C) per
    group; same nonlinearity and gating as model.MLP.hidden."""
    def proj(lin, w):
        if isinstance(cols, slice):
            y = x @ w.t()
            return y + lin.bias[cols] if lin.bias is not None else y
        y = torch.bmm(x, w.transpose(1, 2))                              # (U, L, n)
        return y + lin.bias[cols][:, None, :] if lin.bias is not None else y
    if mlp.flavor == "llama":
        return torch.nn.functional.silu(proj(mlp.gate, weights["gate"])) * proj(mlp.up, weights["up"])
    return torch.nn.functional.gelu(proj(mlp.up, weights["up"]), approximate=mlp.approximate)


# -------------------------------------------------------------------------------------------------
# The NULLs model state: which sources exist and which are forgotten; permanent removal
# -------------------------------------------------------------------------------------------------

class Sinks:
    """What a NULLs model needs beside its weights: the sink layout, the sources it was trained on, and the
    persistent forget list (saved with the checkpoint). A forgotten source is never activated: its sink
    neurons stay 0 under any routing, and routing never picks it."""

    def __init__(self, n_gen, n_pool, n_source, sources, forgotten=()):
        if not 0 < n_source <= n_pool:
            raise ValueError(f"need 0 < n_source <= n_pool, got n_source={n_source}, n_pool={n_pool}")
        self.n_gen, self.n_pool, self.n_source = n_gen, n_pool, n_source
        self.sources = sorted(int(s) for s in sources)
        self.forgotten = set()
        for s in forgotten:
            self.forget(s)

    def forget(self, source_id):
        """Unlearning without gradients: add the source to the forget list. Forgetting twice is harmless."""
        if int(source_id) not in set(self.sources):
            raise KeyError(f"source {source_id} does not exist (this model knows {len(self.sources)} sources, "
                           f"ids {self.sources[0]}..{self.sources[-1]})")
        self.forgotten.add(int(source_id))

    def mask(self, src_ids, fast=True):
        """The training / inference mask for per-token source ids (B, T)."""
        make = ActiveSinks if fast else source_mask
        return make(src_ids, self.n_gen, self.n_pool, self.n_source, forget=self.forgotten)

    def row_mask(self, src_ids, also_forget=None):
        """Dense (N, 1, d_ff) masks, one source per row (what eval.py's batched metrics take).
        also_forget: (N,) a source per row whose sinks are excluded too (Sink-Off for that row's target), so
        each row is evaluated with only its own target forgotten, as when one source is unlearned."""
        m = source_mask(torch.as_tensor(src_ids, dtype=torch.long)[:, None], self.n_gen, self.n_pool,
                        self.n_source, forget=self.forgotten)
        if also_forget is not None:
            own = source_mask(torch.as_tensor(also_forget, dtype=torch.long)[:, None], 0, self.n_pool, self.n_source)
            m[..., self.n_gen:] *= 1 - own
        return m

    def expected_mask(self):
        """(d_ff,) backbone 1, every sink at its activation probability N_source / N_pool (no source known)."""
        return torch.cat([torch.ones(self.n_gen), torch.full((self.n_pool,), self.n_source / self.n_pool)])

    def backbone_mask(self):
        """(d_ff,) backbone only, every sink off: a diagnostic state the model never trained in."""
        return torch.cat([torch.ones(self.n_gen), torch.zeros(self.n_pool)])

    def state_dict(self):
        return {"n_gen": self.n_gen, "n_pool": self.n_pool, "n_source": self.n_source,
                "sources": self.sources, "forgotten": sorted(self.forgotten)}

    @classmethod
    def from_state_dict(cls, d):
        return cls(d["n_gen"], d["n_pool"], d["n_source"], d["sources"], d["forgotten"])


def save_nulls(path, net, sinks, tok=None, config=None):
    """A NULLs model with its sink layout and forget list (the forget list persists with the weights)."""
    T.save_checkpoint(path, net, config=config, tokenizer=None if tok is None else tok.state_dict(),
                      extra={"sinks": sinks.state_dict()})


def load_nulls(path, device="cpu"):
    """-> (model, Sinks) from save_nulls; the forgotten sources stay forgotten."""
    ck = T.load_checkpoint(path, device)
    if not (ck.get("extra") or {}).get("sinks"):
        raise ValueError(f"{path} holds no NULLs sink state (was it written by save_nulls?)")
    return T.model_from_checkpoint(ck, device).eval(), Sinks.from_state_dict(ck["extra"]["sinks"])


@torch.no_grad()
def remove_permanently(model, sinks, source_id):
    """Permanent removal: zero, in every layer, the parameters of the sink neurons active in the source's mask
    (their rows of up/gate, biases included, and their value vectors, the columns of down), and forget it.
    Any other source whose mask shares some of those neurons (N_source^2 / N_pool of them on average) loses
    them too: its sink-on behaviour degrades a little, which routing-based forgetting avoids."""
    sinks.forget(source_id)
    cols = sinks.n_gen + source_sinks(torch.tensor([int(source_id)]), sinks.n_pool, sinks.n_source)[0]
    for block in model.blocks:
        mlp = block.mlp
        for lin in [mlp.up] + ([mlp.gate] if hasattr(mlp, "gate") else []):
            lin.weight[cols.to(lin.weight.device)] = 0
            if lin.bias is not None:
                lin.bias[cols.to(lin.bias.device)] = 0
        mlp.down.weight[:, cols.to(mlp.down.weight.device)] = 0


# -------------------------------------------------------------------------------------------------
# The experiment's settings: the CPU default, presets for smoke tests and the paper's GPU run
# -------------------------------------------------------------------------------------------------

@dataclass
class Config:
    # data: "world" = the built-in fictional world (people are the sources); otherwise a hub name or local
    # path of documents for data.load_text_dataset, one document = one source (e.g. "wikipedia")
    data: str = "world"
    n_people: int = 100
    n_families: int = 40
    n_cities: int = 10
    n_countries: int = 4
    n_docs: int = 2000                 # real data: number of documents (sources) to train on
    text_field: str = "text"
    tokenizer: str = "gpt2"            # real data: "gpt2" (BPE) or "word" (a word vocabulary built from the data)
    gpt2_ranks: str = ""               # real data: a gpt2.tiktoken file (default: tiktoken's own)
    n_forget: int = 10                 # sources to forget (world: forget_order, one per family first)
    split_sentences: bool = True       # world: each sentence its own attention context (same source, same mask)
    # model: MLP hidden = n_gen backbone + n_pool sinks; each source activates n_source of the pool
    flavor: str = "llama"
    gelu: str = "exact"                # with flavor gpt2: "exact" (erf, as nanoGPT) or "tanh" (GPT-2's gelu_new)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0
    n_embd: int = 128
    n_gen: int = 64
    n_pool: int = 1024
    n_source: int = 64
    block_size: int = 160
    fast_path: bool = True             # compute only the active neurons (tested equal to the dense mask,
                                       # so not part of the checkpoint key)
    # training (the same for NULLs, Retrained and Standard)
    # "lazy": sink rows move only on steps whose sources switch them on (train.LazyRowAdamW; faster at the paper's
    # sparsity, and an inactive sink neither decays nor drifts); "adamw": every row every step, as the paper trains
    optimizer: str = "adamw"
    epochs: int = 40
    batch_size: int = 20
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    warmup_steps: int = 30
    grad_clip: float = 1.0
    # post-hoc baselines on the standard transformer (Figure 3c) and the relearning attack (Figure 7b)
    unlearn_epochs: int = 5
    unlearn_batch: int = 2
    npo_beta: float = 0.5
    npo_lr: float = 1e-3
    ga_lr: float = 1e-3
    relearn_steps: int = 20
    relearn_lr: float = 1e-3
    # evaluation: rows (of at most block_size tokens) per forward pass in every corpus-wide pass; related facts
    # (other people's article-specific facts, claim 3) at most n_related, as the paper's 200 facts per category
    eval_batch: int = 64
    n_related: int = 200
    # 0,1,2: run the whole experiment once per seed (out_dir/seed<k>) and report each claim as mean +- std with
    # a verdict per seed and overall; empty = the one run of `seed`
    seeds: tuple[int, ...] = ()
    # sweeps behind a flag: "overlap" (Fig 8a), "n_source" (8b), "capacity" (8c); "" = none
    sweep: str = ""
    sweep_values: tuple = ()
    device: str = "auto"
    threads: int = 1                   # torch CPU threads per process (README tables: 1); 0 = torch's default
    workers: int = 2                   # processes training the models side by side, one per core; 1 = one after
                                       # another: the same numbers (CPU only; not part of any checkpoint key)
    seed: int = 0
    out_dir: str = "out/nulls"
    log_every: int = 50

    def __post_init__(self):        # valid ranges: train.parse_config turns a violation into exit status 2
        T.check(self, gelu=("exact", "tanh"))
        T.check(self, tokenizer=("gpt2", "word"), flavor=("gpt2", "llama"), optimizer=("adamw", "lazy"),
                sweep=("", "overlap", "n_source", "capacity"), n_people="[2, inf)", n_families="[1, inf)",
                n_cities="[1, inf)", n_countries="[1, inf)", n_docs="[2, inf)",
                n_forget="[1, n_people)" if self.data == "world" else "[1, n_docs)",
                n_layer="[1, inf)", n_head="[1, inf)", n_kv_head="[0, n_head]", n_embd="[1, inf)", n_gen="[1, inf)",
                n_pool="[1, inf)", n_source="[1, n_pool]", block_size="[2, inf)", epochs="[1, inf)",
                batch_size="[1, inf)", lr="(0, inf)", min_lr="[0, lr]", weight_decay="[0, inf)",
                warmup_steps="[0, inf)", grad_clip="[0, inf)", unlearn_epochs="[1, inf)", unlearn_batch="[1, inf)",
                npo_beta="(0, inf)", npo_lr="(0, inf)", ga_lr="(0, inf)", relearn_steps="[1, inf)",
                relearn_lr="(0, inf)", log_every="[0, inf)", eval_batch="[1, inf)", n_related="[1, inf)",
                seeds="[0, inf)", threads="[0, inf)", workers="[1, inf)")
        T.pick_device(self.device)             # names the devices that exist if this one does not


PRESETS = {
    # seconds, for the tests; one process (starting worker processes would take longer than the training)
    "smoke": dict(n_people=12, n_families=5, n_cities=4, n_countries=4, n_forget=2, n_layer=2, n_embd=32, n_head=2, n_gen=16, n_pool=64,
                  n_source=8, epochs=2, batch_size=6, warmup_steps=1, unlearn_epochs=1, relearn_steps=2,
                  n_related=40, log_every=0, workers=1),
    # one GPU: Wikipedia articles as sources, a SmolLM-135M-shaped model with the MLP widened as in the paper
    # (N_gen 500, N_source ~ 0.013 N_pool), GPT-2 BPE
    "paper": dict(data="wikipedia", n_docs=200_000, n_forget=100, flavor="llama", n_layer=30, n_head=9,
                  n_kv_head=3, n_embd=576, n_gen=500, n_pool=7692, n_source=100, block_size=1024, epochs=3,
                  batch_size=32, lr=5e-4, min_lr=5e-5, warmup_steps=1000, npo_lr=1e-5, ga_lr=1e-5,
                  relearn_lr=1e-5, unlearn_batch=8, eval_batch=8, log_every=100),
}


# -------------------------------------------------------------------------------------------------
# Data: sources, their token lists, and the facts to probe
# -------------------------------------------------------------------------------------------------

def load_sources(cfg):
    """-> dict(tok, docs {source id: token list}, forget [ids], world (None for real data), holdout [token lists])."""
    if cfg.data == "world":
        world = data.make_world(cfg.seed, n_people=cfg.n_people, n_families=cfg.n_families,
                               n_cities=cfg.n_cities, n_countries=cfg.n_countries)
        tok = data.world_tokenizer()
        docs = {s: tok.encode(t, strict=True) for s, t in world.articles.items()}
        holdout = [tok.encode(t, strict=True) for t in world.holdout_articles.values()]
        forget = list(world.forget_order[:cfg.n_forget])
    else:
        recs = data.load_text_dataset(cfg.data, n=cfg.n_docs + max(10, cfg.n_docs // 50))
        if recs and cfg.text_field not in recs[0]:
            raise KeyError(f"records have no field {cfg.text_field!r} (fields: {sorted(recs[0])}); pass --text_field=")
        texts = [r[cfg.text_field] for r in recs if r.get(cfg.text_field)]
        if cfg.tokenizer not in ("gpt2", "word"):
            raise ValueError(f"tokenizer must be 'gpt2' or 'word', got {cfg.tokenizer!r}")
        tok = data.GPT2Tokenizer(cfg.gpt2_ranks or None) if cfg.tokenizer == "gpt2" else data.WordTokenizer.from_texts(texts)
        # whole documents: a document longer than block_size is trained on (and evaluated) in block-size pieces
        # that keep its source id, so a long article is still one source
        enc = [e for e in (tok.encode(t) for t in texts) if len(e) >= 8]
        docs = {i + 1: e for i, e in enumerate(enc[:cfg.n_docs])}
        holdout = enc[cfg.n_docs:]
        world = None
        forget = list(range(1, len(docs) + 1, max(1, len(docs) // cfg.n_forget)))[:cfg.n_forget]
    if not 0 < cfg.n_forget < len(docs):
        raise ValueError(f"n_forget must be in 1..{len(docs) - 1}, got {cfg.n_forget}")
    if world is not None and max(len(d) for d in docs.values()) > cfg.block_size:
        raise ValueError(f"block_size must be >= the longest article ({max(len(d) for d in docs.values())} tokens), "
                         f"got {cfg.block_size}")
    return dict(tok=tok, docs=docs, forget=forget, world=world, holdout=holdout)


class _Stop(Exception):
    pass


def split_pieces(seqs, size):
    """Token lists -> (pieces of at most `size` tokens, owner index of each piece, is-last-piece flags): long
    documents are cut into block-size pieces that keep their document (and so their source)."""
    pieces, owner, last = [], [], []
    for i, s in enumerate(seqs):
        if len(s) == 0:
            raise ValueError(f"sequence {i} is empty")
        for k in range(0, len(s), size):
            pieces.append(s[k:k + size])
            owner.append(i)
            last.append(k + size >= len(s))
    return pieces, torch.tensor(owner, dtype=torch.long), last


def segments(cfg, tok, seqs, last=None):
    """Token lists (each at most block_size) -> one row each (x, y, doc_ids), cut into sentence segments for the
    world (see Config). last: per row, False for a piece that a longer document continues: its final target is
    the next piece's first token, which this row cannot see, so it is ignored (-100) rather than set to eos."""
    split = {tok.stoi["."]} if cfg.split_sentences and cfg.data == "world" else None
    rows = data.one_per_row(seqs, None, eos_id=tok.eos_id, pad_id=tok.pad_id, split_ids=split)
    if last is not None:
        for i, (s, end) in enumerate(zip(seqs, last)):
            if not end:
                rows["y"][i, len(s) - 1] = -100
    return rows


def _chunks(cfg, seqs):
    """Yield (rows, owner) for batches of cfg.eval_batch block-size pieces of `seqs`: every corpus-wide pass
    goes through here, so its memory depends on eval_batch and block_size, not on the corpus."""
    pieces, owner, last = split_pieces(seqs, cfg.block_size)
    for i in range(0, len(pieces), cfg.eval_batch):
        yield i, pieces[i:i + cfg.eval_batch], owner[i:i + cfg.eval_batch], last[i:i + cfg.eval_batch]


def probe_facts(world, forget):
    """The facts of each forgotten person's article, with the routes that state them. Returns a list of
    (fact, person) and, per fact, the 'stating' route: a retained source whose article states the fact (a
    sibling for family facts, a same-city person for city facts, a resident of the birth city for the inferred
    country); unique facts have none, so they go to a retained sibling."""
    gone, items = set(forget), []
    by_id = {f.id: f for f in world.facts}
    for p in forget:
        person = world.person(p)
        sibling = next((s for s in person.siblings if s not in gone), None)
        for f in world.facts_of(p):
            if f.kind == "inferred":
                stating = [s for prem in f.premises for s in by_id[prem].source_ids if s not in gone]
                # prefer a source stating the city -> country premise: the step the model must take
                city_prem = [s for s in by_id[f.premises[-1]].source_ids if s not in gone]
                stating = city_prem or stating
            elif f.kind == "shared":
                stating = [s for s in f.source_ids if s not in gone]
            else:
                stating = []
            route = stating[0] if stating else sibling
            if route is None:
                raise ValueError(f"person {p} has no retained sibling or stating source to route to")
            items.append((f, p, route))
    return items


# -------------------------------------------------------------------------------------------------
# Training: NULLs, Retrained (NULLs without the forgotten sources) and a standard transformer
# -------------------------------------------------------------------------------------------------

def model_config(cfg, vocab_size):
    # the standard transformer gets the same MLP width, so the same parameter count, with every neuron on
    return M.ModelConfig(flavor=cfg.flavor, vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                         n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd, d_ff=cfg.n_gen + cfg.n_pool,
                         bias=cfg.flavor == "gpt2", tie_embeddings=True, gelu=cfg.gelu)


def lm_rows(cfg, tok, docs, source_ids):
    """One row per block-size piece of each source document (x, y, doc_ids, per-token source_ids): a long document
    becomes several rows that keep its source id; a world article (shorter than block_size) is one row, in
    sentence segments."""
    split = {tok.stoi["."]} if cfg.split_sentences and cfg.data == "world" else None
    pieces, owner, last = split_pieces([docs[s] for s in source_ids], cfg.block_size)
    rows = data.one_per_row(pieces, torch.tensor(source_ids, dtype=torch.long)[owner].tolist(), eos_id=tok.eos_id,
                            pad_id=tok.pad_id, block_size=cfg.block_size, split_ids=split)
    for i, (p, end) in enumerate(zip(pieces, last)):
        if not end:          # the next token is in the next piece: no target here (see segments)
            rows["y"][i, len(p) - 1] = -100
    return rows


def train_config(cfg, steps):
    """The loop's settings, the same for NULLs, Retrained and Standard."""
    return T.TrainConfig(lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                         max_steps=steps, grad_clip=cfg.grad_clip, log_every=cfg.log_every, device=cfg.device,
                         seed=cfg.seed, ckpt_every=max(50, steps // 4))


def train_key(cfg, tok, rows, steps, sinks):
    """The train.run_key a model is cached by (out_dir/<name>-<key>.pt), of what training receives: the model and
    loop settings, the rows (with source ids only where sink masks use them), the batch size and the sink layout.
    Everything after training (unlearning, probing, the baselines, relearning, --fast_path) reuses the finished
    model, and the NULLs and standard models survive a change of n_forget."""
    keys = ("x", "y", "doc_ids") + (() if sinks is None else ("source_ids",))
    layout = None if sinks is None else {k: v for k, v in sinks.state_dict().items() if k != "sources"}
    lazy = {"optimizer": "lazy"} if sinks is not None and cfg.optimizer == "lazy" else {}   # adamw keys unchanged
    key = T.run_key(model_config(cfg, tok.vocab_size), train_config(cfg, steps), data={k: rows[k] for k in keys},
                    batch_size=cfg.batch_size, sinks=layout, **lazy)
    return key


def lm_run(cfg, tok, docs, source_ids, sinks, name):
    """What training one model hands the loop: (rows, the epoch order, the TrainConfig with its checkpoint
    out_dir/<name>-<key>.pt, the key)."""
    rows = lm_rows(cfg, tok, docs, source_ids)
    order = data.EpochIterator(len(rows["x"]), cfg.batch_size, seed=cfg.seed)
    steps = cfg.epochs * order.steps_per_epoch
    key = train_key(cfg, tok, rows, steps, sinks)
    tc = dataclasses.replace(train_config(cfg, steps), ckpt_path=os.path.join(cfg.out_dir, f"{name}-{key}.pt"))
    return rows, order, tc, key


def train_lm(cfg, tok, docs, source_ids, sinks, name):
    """Train a fresh model on the documents of `source_ids` (one document per row) with the sink masks of `sinks`
    (None = a standard transformer), or reuse the finished checkpoint; an interrupted run resumes. Under
    torchrun the ranks split every batch (data-parallel)."""
    torch.manual_seed(cfg.seed)
    net = M.GPT(model_config(cfg, tok.vocab_size))
    rows, order, tc, key = lm_run(cfg, tok, docs, source_ids, sinks, name)
    steps = tc.max_steps

    def batch_at(step):
        b = {k: rows[k][T.epoch_batch(order, step)] for k in ("x", "y", "doc_ids", "source_ids")}
        if sinks is not None:   # a function of this rank's rows, called on the training device (train.train)
            b["mlp_mask"] = mask
        return b

    def mask(local):
        m = sinks.mask(local["source_ids"], fast=cfg.fast_path)
        if expect:              # the lazy optimizer reads only the rows these masks switch on (one process only:
            opt.expect_rows(m.rows)   # under DDP the other ranks' masks switch on rows of the summed gradient)
        return m
    if T.is_main_process():
        print(f"== training {name}: {len(source_ids)} sources, {steps} steps, {net.num_params() / 1e6:.2f}M params")
    opt = None
    if sinks is not None and cfg.optimizer == "lazy":         # the MLP tensors' d_ff slices are the sink rows
        rows_of = {}
        for blk in net.blocks:
            for lin, d in [(blk.mlp.up, 0), (getattr(blk.mlp, "gate", None), 0), (blk.mlp.down, 1)]:
                if lin is not None:
                    rows_of[lin.weight] = d
                    if lin.bias is not None and d == 0:
                        rows_of[lin.bias] = 0
        opt = T.make_optimizer(net, tc.lr, tc.weight_decay, tc.betas, row_dims=rows_of)
    expect = opt is not None and cfg.fast_path and int(os.environ.get("WORLD_SIZE", "1")) == 1
    hist, info = T.train_cached(net, batch_at, tc, key, optimizer=opt, tokenizer=tok.state_dict())
    hist["run"] = info            # wall_s, cpu_s of the run that trained it; cached: reused from out_dir
    net.eval()
    return net, hist


def make_sinks(cfg, src):
    """The sink layouts of NULLs (every source) and of Retrained (the retained sources only)."""
    gone = set(src["forget"])
    return (Sinks(cfg.n_gen, cfg.n_pool, cfg.n_source, sorted(src["docs"])),
            Sinks(cfg.n_gen, cfg.n_pool, cfg.n_source, [s for s in sorted(src["docs"]) if s not in gone]))


MODELS = ("nulls", "retrained", "standard")


def model_runs(cfg, src):
    """{model: (its sink layout or None, the source ids it trains on)} of the three models."""
    sinks, retr_sinks = make_sinks(cfg, src)
    return {"nulls": (sinks, sinks.sources), "retrained": (retr_sinks, retr_sinks.sources),
            "standard": (None, sinks.sources)}


def train_models(cfg, src, names):
    """{name: (model, history)} of the models `names` (of MODELS), trained or reused from out_dir, in order."""
    runs = model_runs(cfg, src)
    return {n: train_lm(cfg, src["tok"], src["docs"], runs[n][1], runs[n][0], n) for n in names}


def train_three(cfg, src, sinks, retr_sinks):
    """NULLs on every source, Retrained without the forgotten ones, and the standard transformer."""
    t0 = time.time()
    out = train_models(cfg, src, MODELS)
    h_nulls, h_std = out["nulls"][1], out["standard"][1]
    times = {"train_s": time.time() - t0, "nulls_final_loss": h_nulls["loss"][-1] if h_nulls["loss"] else None,
             "standard_final_loss": h_std["loss"][-1] if h_std["loss"] else None,
             "models": {n: {k: h["run"][k] for k in ("wall_s", "cpu_s", "cached")} for n, (_, h) in out.items()}}
    return {n: net for n, (net, _) in out.items()}, times


def trained(cfg, src):
    """{model: is its finished checkpoint in out_dir?} (read without loading the weights)."""
    done = {}
    for name, (s, ids) in model_runs(cfg, src).items():
        tc = lm_run(cfg, src["tok"], src["docs"], ids, s, name)[2]
        try:
            ck = torch.load(tc.ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            done[name] = int(ck.get("step", 0)) >= tc.max_steps
        except Exception:        # missing, or damaged: train_lm trains it, or says what to do about it
            done[name] = False
    return done


def worker_plan(cfg, src):
    """The jobs of the worker processes that train the models side by side, [] for one process. A job is (models
    to train in order, whether to run the gradient baselines after them). One worker trains the standard
    transformer (the slowest) and then runs the baselines on it (baseline_runs: all that needs only that model),
    the other NULLs and Retrained; models already in out_dir are skipped (if NULLs and Retrained both remain
    without the standard one, Retrained goes before the baselines). Each model trains alone in one process as
    in train_three, so the numbers equal workers=1's."""
    if T.side_by_side(cfg.workers, cfg.device) < 2:        # CPU only: see train.side_by_side
        return []
    todo = [n for n, done in trained(cfg, src).items() if not done]
    other = [n for n in todo if n != "standard"]
    first = ["standard"] if "standard" in todo else other[1:]
    other = [n for n in other if n not in first]
    return [(first, True), (other, False)] if other else []


def worker_job(cfg, names, baselines, prefix):
    """One worker process of worker_plan: train (or reuse) the models `names` into out_dir's caches, then with
    `baselines` run baseline_runs on the standard transformer and, if the other worker has finished NULLs by
    then, what needs NULLs but not Retrained. Its output lines start with `prefix`. Returns ({"baselines",
    "nulls_relearning", "capacity"} as far as computed, the worker's CPU seconds)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    c0 = time.process_time()
    with contextlib.redirect_stdout(T.Prefixed(sys.stdout, prefix)):
        src = load_sources(cfg)
        nets = {n: net for n, (net, _) in train_models(cfg, src, names).items()}
        out = {}
        if baselines:
            std = nets["standard"] if "standard" in nets else finished_model(cfg, src, "standard")
            out["baselines"] = baseline_runs(cfg, src, std)
            if trained(cfg, src)["nulls"]:      # the other worker finished NULLs: what needs no Retrained
                world = src["world"]
                print("== NULLs finished: its relearning curves"
                      + (" and knowledge capacity" if world is not None else ""))
                nulls_net, sinks = finished_model(cfg, src, "nulls"), make_sinks(cfg, src)[0]
                out["nulls_relearning"] = nulls_relearning(cfg, src, nulls_net, sinks,
                                                           routing(cfg, src, nulls_net, sinks)[1])
                if world is not None:
                    out["capacity"] = capacity_ratios(world, src["tok"], nulls_net, std, sinks)
    return out, time.process_time() - c0


def finished_model(cfg, src, name):
    """A model of MODELS from its finished checkpoint in out_dir (the weights only: read while another worker
    may still be training the next model)."""
    s, ids = model_runs(cfg, src)[name]
    _, _, tc, key = lm_run(cfg, src["tok"], src["docs"], ids, s, name)
    T.check_run_key(tc.ckpt_path, key)
    return T.model_from_checkpoint(tc.ckpt_path).eval()


def train_in_workers(cfg, src):
    """Run worker_plan's jobs side by side (train.run_jobs: Ctrl-C or SIGTERM stops them; their checkpoints resume
    a rerun). -> (what the first worker computed beyond training: {"baselines", and if NULLs was finished by
    then "nulls_relearning", "capacity"}; {} without workers, {workers, worker_cpu_s, trained_by_workers})."""
    jobs = worker_plan(cfg, src)
    if not jobs:
        return {}, {"workers": 1}
    print(f"== {len(jobs)} workers side by side: " + "; ".join(" then ".join(names + ["npo, ga"] * bl)
                                                              for names, bl in jobs))
    done = T.run_jobs(worker_job, [(cfg, names, bl, f"[{', '.join(names + ['npo, ga'] * bl)}] ")
                                   for names, bl in jobs], len(jobs))
    return done[0][0], {"workers": len(jobs), "worker_cpu_s": sum(c for _, c in done),
                        "trained_by_workers": [n for names, _ in jobs for n in names],
                        "worker_evaluated": sorted(done[0][0])}


# -------------------------------------------------------------------------------------------------
# Unlearning: the forget list and nearest-source routing; post-hoc gradient baselines (Figure 3c)
# -------------------------------------------------------------------------------------------------

@torch.no_grad()
def embed(cfg, model, tok, seqs, mask):
    """(len(seqs), n_embd) mean-pooled final hidden states (after the last norm) over every token of each
    sequence, under one mask: the paper's "mean-pooled token representations" used for nearest-source routing
    (Appendix A.2). Batched over block-size pieces; the forward stops before the logits."""
    dev = next(model.parameters()).device
    sums, counts = torch.zeros(len(seqs), model.cfg.n_embd, dtype=torch.float64), torch.zeros(len(seqs))
    captured = []

    def grab(m, i, o):
        captured.append(o)
        raise _Stop
    hook = model.ln_f.register_forward_hook(grab)
    try:
        with ev.evaluating(model):
            for _, pieces, owner, last in _chunks(cfg, seqs):
                rows = segments(cfg, tok, pieces, last)
                try:
                    model(rows["x"].to(dev), doc_ids=rows["doc_ids"].to(dev),
                          mlp_mask=None if mask is None else mask.to(dev))
                except _Stop:
                    pass
                valid = (rows["doc_ids"] >= 0).float().to(dev)[..., None]              # (N, T, 1)
                sums.index_add_(0, owner, (captured.pop().float() * valid).sum(1).double().cpu())
                counts.index_add_(0, owner, valid.sum((1, 2)).cpu())
    finally:
        hook.remove()
    return (sums / counts[:, None]).float()


@torch.no_grad()
def seq_losses(cfg, net, tok, seqs, sinks=None, route=None, forgotten=None, fixed_mask=None):
    """(len(seqs),) mean next-token NLL over each sequence's targets, batched over block-size pieces. Masks as
    truth_ratios: route (per sequence, a source whose sinks are on; forgotten: a source per sequence whose
    sinks are excluded too), or one fixed_mask, or none (the standard transformer)."""
    dev = next(net.parameters()).device
    nll, count = torch.zeros(len(seqs), dtype=torch.float64), torch.zeros(len(seqs), dtype=torch.float64)
    with ev.evaluating(net):
        for _, pieces, owner, last in _chunks(cfg, seqs):
            rows = segments(cfg, tok, pieces, last)
            mask = fixed_mask
            if route is not None:
                mask = sinks.row_mask([int(route[o]) for o in owner],
                                      None if forgotten is None else [int(forgotten[o]) for o in owner])
            lp = net.token_logprobs(rows["x"].to(dev), rows["y"].to(dev), doc_ids=rows["doc_ids"].to(dev),
                                    mlp_mask=None if mask is None else mask.to(dev))
            keep = (rows["y"] != -100).to(dev)
            nll.index_add_(0, owner, -(lp.double() * keep).sum(1).cpu())
            count.index_add_(0, owner, keep.sum(1).double().cpu())
    return nll / count


def routing(cfg, src, nulls_net, sinks):
    """Nearest-source routing (Appendix A.2): mean-pooled final hidden states of each source's text. No source is
    known for a query, so both sides are embedded under the expected mask (every sink at N_source / N_pool).
    -> (source embeddings in sorted-id order, {forgotten source: its nearest retained source})."""
    all_ids, forget = sorted(src["docs"]), src["forget"]
    emb = embed(cfg, nulls_net, src["tok"], [src["docs"][s] for s in all_ids], sinks.expected_mask())
    return emb, dict(zip(forget, nearest_sources(emb[[all_ids.index(s) for s in forget]], emb, all_ids,
                                                 exclude=set(forget)).tolist()))


def nearest_sources(queries, source_emb, source_ids, exclude=(), chunk=1024):
    """For each query embedding (Q, C), the id of the source whose embedding (S, C) has the highest cosine
    similarity, never one in `exclude` (the forgotten sources). Queries go `chunk` at a time (a Q x S matrix of
    similarities would not fit for a large corpus)."""
    keys = torch.nn.functional.normalize(source_emb, dim=-1).t()
    ids = torch.as_tensor(source_ids, dtype=torch.long)
    banned = torch.isin(ids, torch.tensor(sorted(exclude), dtype=torch.long))
    out = []
    for i in range(0, len(queries), chunk):
        sim = torch.nn.functional.normalize(queries[i:i + chunk], dim=-1) @ keys
        sim[:, banned] = float("-inf")
        out.append(ids[sim.argmax(1)])
    return torch.cat(out) if out else ids[:0]


def forget_batches(cfg, tok, docs, forget):
    pieces, _, last = split_pieces([docs[s] for s in forget], cfg.block_size)
    out = []
    for i in range(0, len(pieces), cfg.unlearn_batch):
        rows = segments(cfg, tok, pieces[i:i + cfg.unlearn_batch], last[i:i + cfg.unlearn_batch])
        out.append({k: rows[k] for k in ("x", "y", "doc_ids")})
    return out


def gradient_baseline(cfg, name, std_net, batches, metrics_fn=None):
    """NPO or gradient ascent on a copy of the standard transformer for cfg.unlearn_epochs epochs over the
    forgotten sources, metrics after every step (the paper tracks the whole trajectory). Neither uses retained
    data (as NULLs does not)."""
    net = copy.deepcopy(std_net)
    if name == "npo":          # the frozen reference is the model before unlearning
        ref = copy.deepcopy(std_net).eval().requires_grad_(False)
        objective, lr = (lambda model, forget, retain=None: baselines.npo_loss(
            model, ref, forget, beta=cfg.npo_beta, retain_weight=0.0)), cfg.npo_lr
    elif name == "ga":
        objective, lr = (lambda model, forget, retain=None: baselines.ga_loss(model, forget)), cfg.ga_lr
    else:
        raise ValueError(f"gradient baseline must be npo or ga, got {name!r}")
    res = baselines.unlearn(net, objective, batches, epochs=cfg.unlearn_epochs, lr=lr, metrics_fn=metrics_fn,
                            eval_every=1)
    net.eval()
    return net, res


def baseline_runs(cfg, src, std_net):
    """NPO and gradient ascent on copies of the standard transformer (gradient_baseline), each then attacked by
    relearning (Figure 7b): everything the run does that needs only the standard model, so a worker runs it
    beside the NULLs training. On the built-in world every step tracks the forgotten people's article-specific
    facts, related facts in other articles and general accuracy (Figure 3c; probe_selectivity reads it).
    -> {name: {"trajectory", "train_time_s", "relearning": the held-out loss curve}}."""
    tok, docs, forget, world = src["tok"], src["docs"], src["forget"], src["world"]
    batches = forget_batches(cfg, tok, docs, forget)
    train_part, test_part = relearn_parts(cfg, tok, [docs[s] for s in forget])
    total, metrics_fn = cfg.unlearn_epochs * len(batches), None
    if world is not None:
        uniq = [f for f, _, _ in probe_facts(world, forget) if f.kind == "unique"]
        rel_facts = [f for f, _, _ in related_facts(world, forget, cfg.n_related)]
        questions = data.general_questions(world)
        t0, start = [time.time()], {}

        def metrics_fn(net, step):
            if step == 0 and start:       # every baseline starts from the same copy of the standard model
                return dict(start)
            out = {"specific": frac_gt1(truth_ratios(net, tok, uniq)),
                   "related": frac_gt1(truth_ratios(net, tok, rel_facts)),
                   "general_acc": mc_accuracy(net, tok, questions)}
            if step == 0:
                t0[0] = time.time()
                start.update(out)
            elif step % max(1, total // 5) == 0 or step == total:
                eta = (time.time() - t0[0]) / step * (total - step)
                print(f"  step {step}/{total}: article-specific {out['specific']:.2f}, related {out['related']:.2f} "
                      f"(eta {eta:.0f} s)")
            return out
    out = {}
    for name in ("npo", "ga"):
        print(f"== {name} on the standard transformer, {total} steps" + (", tracked after each" if metrics_fn else "")
              + f", then {cfg.relearn_steps} relearning steps")
        net, res = gradient_baseline(cfg, name, std_net, batches, metrics_fn)
        out[name] = {"trajectory": res.trajectory, "train_time_s": res.train_time,
                     "relearning": relearn(cfg, net, tok, train_part, test_part)}
    return out


# -------------------------------------------------------------------------------------------------
# Evaluation: losses, the NULLs truth ratio of cloze prompts under a chosen source's mask, relearning
# -------------------------------------------------------------------------------------------------

def truth_ratios(net, tok, facts, route=None, sinks=None, fixed_mask=None, forgotten=None, wording="verbatim"):
    """(N,) NULLs truth ratio TR = p̄(value | cloze) / mean_j p̄(wrong value_j | cloze) of each fact.
    route: (N,) source ids whose sink masks are applied (with `sinks`' forget list, and each row's
    `forgotten` source excluded: Sink-Off); fixed_mask: one mask for every item (e.g. backbone only);
    neither: no mask (the standard transformer). wording: "verbatim" (the cloze is the article's own text) or
    "paraphrased" (the same fact in wording no article uses)."""
    if wording not in WORDINGS:
        raise ValueError(f"wording must be one of {WORDINGS}, got {wording!r}")
    out = torch.empty(len(facts), dtype=torch.float64)
    by_k = {}
    for i, f in enumerate(facts):              # eval.truth_ratio needs the same number of wrong answers per call
        by_k.setdefault(len(f.perturbed_values), []).append(i)
    for idx in by_k.values():
        fwd = {}
        if route is not None:
            fwd["mlp_mask"] = sinks.row_mask([int(route[i]) for i in idx], None if forgotten is None else
                                             [int(forgotten[i]) for i in idx]).to(next(net.parameters()).device)
        elif fixed_mask is not None:
            fwd["mlp_mask"] = fixed_mask.to(next(net.parameters()).device)
        q = [tok.encode(facts[i].cloze if wording == "verbatim" else facts[i].paraphrased_cloze) for i in idx]
        a = [tok.encode(facts[i].value) for i in idx]
        p = [[tok.encode(v) for v in facts[i].perturbed_values] for i in idx]
        out[idx] = ev.truth_ratio(net, q, a, p, form="nulls", batch_size=256, pad_id=tok.pad_id, **fwd)
    return out


WORDINGS = ("verbatim", "paraphrased")


def frac_gt1(tr):
    return summarize(tr)["frac_gt1"]


def summarize(tr):
    """Truth ratios are heavy-tailed (one fact can reach 1e6): the geometric mean and the fraction above 1."""
    tr = torch.as_tensor(tr, dtype=torch.float64)
    if len(tr) == 0:
        return {"n": 0, "geomean": None, "frac_gt1": None}
    return {"n": len(tr), "geomean": float(tr.log().mean().exp()), "frac_gt1": float((tr > 1).double().mean())}


def mc_accuracy(net, tok, questions, route=None, sinks=None):
    return float(mc_correct(net, tok, questions, route, sinks).double().mean())


def mc_correct(net, tok, questions, route=None, sinks=None):
    """(N,) bool: is each question answered right? The choice with the highest mean log-prob per token as the prompt's continuation
    (length-normalized, as the paper's benchmarks are usually scored). route: per question, the source whose
    sinks are on (NULLs); None = the standard transformer."""
    q = [tok.encode(x.prompt) for x in questions]
    fwd = {}
    if route is not None:
        fwd["mlp_mask"] = sinks.row_mask([int(r) for r in route]).to(next(net.parameters()).device)
    K = len(questions[0].choices)
    lp = torch.stack([ev.answer_logprob(net, q, [tok.encode(x.choices[j]) for x in questions], batch_size=256,
                                        pad_id=tok.pad_id, **fwd) for j in range(K)], 1)
    return lp.argmax(1) == torch.tensor([x.answer for x in questions])


def related_facts(world, forget, n_max):
    """Facts in semantically similar OTHER articles (the paper's Figure 3c "shared" curve): the article-specific
    facts of the retained siblings of each forgotten person, then of retained people born in the same city.
    Returns [(fact, its person, the forgotten person it is related to)], at most n_max facts, taken round-robin
    over the forgotten people; each related person counts once."""
    gone, seen, queues = set(forget), set(), []
    for p in forget:
        me = world.person(p)
        sibs = [s for s in me.siblings if s not in gone]
        town = [q.id for q in world.people if q.birth_city == me.birth_city and q.id not in gone
                and q.id != p and q.id not in sibs]
        queues.append([(q, p) for q in sibs + town])
    order = []
    for k in range(max(len(q) for q in queues)):
        for q in queues:
            if k < len(q) and q[k][0] not in seen:
                seen.add(q[k][0])
                order.append(q[k])
    out = []
    for q, p in order:
        for f in world.facts_of(q):
            if f.kind == "unique" and len(out) < n_max:
                out.append((f, q, p))
    return out


def relearn_split(cfg, tok, seq):
    """The relearning protocol's two parts of one forgotten source: a reserved part the attacker fine-tunes on
    and a held-out part whose loss is tracked. World articles split at the sentence end nearest the middle;
    other documents at the middle token."""
    cut = len(seq) // 2
    if cfg.data == "world":
        ends = [i + 1 for i, t in enumerate(seq[:-1]) if t == tok.stoi["."]]
        cut = min(ends, key=lambda e: abs(e - cut)) if ends else cut
    return seq[:cut], seq[cut:]


def relearn_parts(cfg, tok, seqs):
    """(reserved parts, held-out parts) of the forgotten sources' documents (relearn_split)."""
    parts = [relearn_split(cfg, tok, d) for d in seqs]
    return [a for a, _ in parts], [b for _, b in parts]


def nulls_relearning(cfg, src, nulls_net, sinks, nearest):
    """The relearning curves of NULLs (claim 4b): Sink-Off (each forgotten source routed to its nearest retained
    one, its own sinks off) and its negative control Sink-On (each routed to its own sinks, never forgotten)."""
    forget = src["forget"]
    train_part, test_part = relearn_parts(cfg, src["tok"], [src["docs"][s] for s in forget])
    route_near = torch.tensor([nearest[s] for s in forget])
    return {"sink_off": relearn(cfg, nulls_net, src["tok"], train_part, test_part, sinks, route_near, forget),
            "sink_on": relearn(cfg, nulls_net, src["tok"], train_part, test_part, sinks, torch.tensor(forget))}


def relearn(cfg, net, tok, train_seqs, test_seqs, sinks=None, route=None, forgotten=None):
    """Fine-tune on the reserved parts of the forgotten sources (one AdamW step per pass over all of them,
    accumulated over eval_batch-row chunks) and track the mean loss of the held-out parts after every step.
    NULLs and Retrained run as deployed: each row under its route's sinks, its own source's excluded."""
    net = copy.deepcopy(net)
    dev = next(net.parameters()).device
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.relearn_lr, weight_decay=0.0)
    chunks = list(_chunks(cfg, train_seqs))
    n_targets = sum(int((segments(cfg, tok, p, l)["y"] != -100).sum()) for _, p, _, l in chunks)

    def held_out():
        return float(seq_losses(cfg, net, tok, test_seqs, sinks, route, forgotten).mean())
    curve = [held_out()]
    for _ in range(cfg.relearn_steps):
        net.train()
        for _, pieces, owner, last in chunks:
            rows = segments(cfg, tok, pieces, last)
            kw = {"doc_ids": rows["doc_ids"].to(dev)}
            if route is not None:
                kw["mlp_mask"] = sinks.row_mask([int(route[o]) for o in owner], None if forgotten is None else
                                                [int(forgotten[o]) for o in owner]).to(dev)
            _, loss = net(rows["x"].to(dev), rows["y"].to(dev), **kw)
            (loss * int((rows["y"] != -100).sum()) / n_targets).backward()   # = the mean over every target
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append(held_out())
    return curve


# -------------------------------------------------------------------------------------------------
# The experiment
# -------------------------------------------------------------------------------------------------

def run(cfg):
    """Train (or reuse) the three models, unlearn, evaluate -> (metrics, claims); (None, None) on the ranks > 0
    of a torchrun launch, which only help train."""
    torch.manual_seed(cfg.seed)
    t_start, c_start = time.time(), time.process_time()
    src = load_sources(cfg)
    tok, docs, forget, world = src["tok"], src["docs"], src["forget"], src["world"]
    all_ids = sorted(docs)
    sinks, retr_sinks = make_sinks(cfg, src)                                        # Sink-On: nothing forgotten yet
    # with workers: they fill the model caches side by side (and run the gradient baselines and what else they
    # can, `ahead`), and train_three loads the models
    t_train = time.time()
    ahead, run_info = train_in_workers(cfg, src)
    nets, times = train_three(cfg, src, sinks, retr_sinks)
    times["train_s"] = time.time() - t_train
    for name in run_info.get("trained_by_workers", ()):
        times["models"][name]["cached"] = False                  # trained by this run's workers
    times.update(run_info)
    if not T.is_main_process():
        return None, None
    os.makedirs(cfg.out_dir, exist_ok=True)
    nulls_net, retr_net, std_net = nets["nulls"], nets["retrained"], nets["standard"]
    metrics = {"times": times, "n_sources": len(all_ids), "forget": forget,
               "params": {"nulls": nulls_net.num_params(), "standard": std_net.num_params()}}
    t_eval = time.time()
    # NPO and GA on the standard model, and relearning them (unless a worker did)
    grad = ahead.get("baselines") or baseline_runs(cfg, src, std_net)

    emb, nearest = routing(cfg, src, nulls_net, sinks)          # nearest-source routing (Appendix A.2)
    # Unlearning = putting a source on the forget list; no weight changes. Sink-Off is evaluated one target
    # source at a time (the paper unlearns one article): each row excludes its own target's sinks. Forgetting
    # all n_forget sources at once would switch off the union of their sinks (1 - (1 - N_source/N_pool)^10,
    # ~48% of the pool at the default overlap 1/16) and so half of every routed source's sinks as well.
    # The Retrained model is trained once without all of them (a slightly stronger removal than one at a time).
    unlearned = Sinks.from_state_dict(sinks.state_dict())
    t = time.perf_counter()
    for s in forget:
        unlearned.forget(s)
    metrics["times"]["forget_list_s"] = time.perf_counter() - t
    save_nulls(os.path.join(cfg.out_dir, "nulls_unlearned.pt"), nulls_net, unlearned, tok, cfg)

    # held-out text (a diagnostic now; claim 5 is measured as the paper does, below): NULLs routed to the
    # nearest source, vs the standard transformer; then no routing (every sink at its expected value), backbone only
    hold = src["holdout"]
    hold_route = nearest_sources(embed(cfg, nulls_net, tok, hold, sinks.expected_mask()), emb, all_ids,
                                 exclude=set(forget))
    metrics["val_loss"] = {
        "nulls": float(seq_losses(cfg, nulls_net, tok, hold, sinks, hold_route).mean()),
        "standard": float(seq_losses(cfg, std_net, tok, hold).mean()),
        "nulls_expected_mask": float(seq_losses(cfg, nulls_net, tok, hold, fixed_mask=sinks.expected_mask()).mean()),
        "nulls_backbone_only": float(seq_losses(cfg, nulls_net, tok, hold, fixed_mask=sinks.backbone_mask()).mean())}

    # loss on the forgotten sources themselves, per mode (the Harry Potter study's Figure 5a measure)
    fseqs = [docs[s] for s in forget]
    route_near = torch.tensor([nearest[s] for s in forget])
    metrics["forget_loss"] = {
        "sink_on": float(seq_losses(cfg, nulls_net, tok, fseqs, sinks, forget).mean()),
        "sink_off": float(seq_losses(cfg, nulls_net, tok, fseqs, sinks, route_near, forget).mean()),
        "retrained": float(seq_losses(cfg, retr_net, tok, fseqs, retr_sinks, route_near).mean()),
        "standard": float(seq_losses(cfg, std_net, tok, fseqs).mean())}

    if world is not None:
        claims = probe_world(cfg, metrics, world, tok, src, nulls_net, retr_net, std_net, sinks, retr_sinks,
                             unlearned, nearest, emb, all_ids, grad, ahead.get("capacity"))
    else:
        none = ev.precondition("the data comes with facts and questions about each source (the built-in world)",
                               0, False)
        claims = [ev.claim(c, [], "", none)
                  for c in ("1 unique facts removed like retraining", "2 shared/inferred facts kept like retraining",
                            "3 gradient unlearning not selective", "5 knowledge capacity", "5 general capability")]

    # relearning (claim 4, Figure 7b): the attacker fine-tunes on a reserved part of every forgotten source and
    # the loss on the held-out rest is tracked; every curve is compared with Retrained's, step by step (the
    # gradient-unlearned models' curves came with baseline_runs)
    train_part, test_part = relearn_parts(cfg, tok, fseqs)
    print(f"== relearning attack: {cfg.relearn_steps} steps on Retrained"
          + ("" if "nulls_relearning" in ahead else " and NULLs (Sink-Off, Sink-On)"))
    own = ahead.get("nulls_relearning") or nulls_relearning(cfg, src, nulls_net, sinks, nearest)
    curves = {"sink_off": own["sink_off"],
              "retrained": relearn(cfg, retr_net, tok, train_part, test_part, retr_sinks, route_near),
              "sink_on": own["sink_on"]}                  # the negative control of claim 4b (nulls_relearning)
    for name, g in grad.items():
        curves[name] = g["relearning"]
    metrics["relearning"] = curves
    claims.append(claim_reversed(curves["npo"], curves["retrained"], "npo"))
    claims.append(claim_tracks(curves["sink_off"], curves["retrained"], curves["sink_on"]))
    claims.sort(key=lambda c: c["claim"][0])            # 1, 1p, 2, 2p, 3 (NPO, GA, NULLs), 4, 5 (stable)
    metrics["times"]["eval_s"] = time.time() - t_eval
    metrics["wall_time_s"] = time.time() - t_start
    metrics["cpu_time_s"] = time.process_time() - c_start + times.get("worker_cpu_s", 0.0)   # workers' included
    return metrics, claims


def probe_world(cfg, metrics, world, tok, src, nulls_net, retr_net, std_net, sinks, retr_sinks, unlearned,
                nearest, emb, all_ids, grad, cap_tr=None):
    """Truth ratios of the forgotten people's facts in every mode and both wordings (Figures 3a, 3b, 4), the
    gradient baselines' trajectories (grad: baseline_runs) against related facts in other articles (Figure 3c),
    knowledge capacity (Figure 8c; cap_tr: capacity_ratios if a worker computed them) and general capability
    (Table 1): claims 1, 2, 3 and 5."""
    gone = set(src["forget"])
    route = dict(emb=emb, all_ids=all_ids, gone=gone)
    # claims 1, 2: the forgotten people's facts, Sink-Off vs Retrained under three routings, both wordings
    claims, tables = probe_forgotten(cfg, metrics, world, tok, src["forget"], nulls_net, retr_net, std_net, sinks,
                                     retr_sinks, nearest, route)
    # Table 1's analogue: general multiple-choice questions, NULLs routed as deployed vs the standard model
    correct = probe_general(cfg, metrics, world, tok, nulls_net, std_net, sinks, unlearned, route)
    # claim 3 (Figure 3c): NPO and GA on the standard model vs NULLs, on related facts of other articles
    sel_claims = probe_selectivity(cfg, metrics, world, tok, src["forget"], nulls_net, retr_net, sinks, retr_sinks,
                                   tables, grad, route)
    # claim 5 (Figure 8c and Table 1): knowledge capacity and general capability
    cap_claim = probe_capacity(metrics, cap_tr or capacity_ratios(world, tok, nulls_net, std_net, sinks))
    return claims + sel_claims + [cap_claim, claim_general(correct["nulls"], correct["standard"])]


def probe_forgotten(cfg, metrics, world, tok, forget, nulls_net, retr_net, std_net, sinks, retr_sinks, nearest,
                    route):
    """Truth ratios of the forgotten people's facts by kind, in every mode, both wordings: claims 1, 1p, 2, 2p and
    the tables (metrics truth_ratio, routing, per_fact)."""
    gone, emb, all_ids = route["gone"], route["emb"], route["all_ids"]
    items = probe_facts(world, forget)
    facts = [f for f, _, _ in items]
    own = torch.tensor([p for _, p, _ in items])
    stating = torch.tensor([r for _, _, r in items])
    near = torch.tensor([nearest[p] for _, p, _ in items])
    kinds = [f.kind for f in facts]
    tables, trs, claims = {}, {}, []
    for wording in WORDINGS:
        # per-prompt routing of an unlabelled cloze prompt (Appendix A.2)
        prompts = [tok.encode(f.cloze if wording == "verbatim" else f.paraphrased_cloze) for f in facts]
        prompt = nearest_sources(embed(cfg, nulls_net, tok, prompts, sinks.expected_mask()), emb, all_ids, exclude=gone)
        kw = {"wording": wording}
        tr = {"sink_on": truth_ratios(nulls_net, tok, facts, own, sinks, **kw),
              "all_sinks_off": truth_ratios(nulls_net, tok, facts, fixed_mask=sinks.backbone_mask(), **kw),
              "standard": truth_ratios(std_net, tok, facts, **kw)}
        for rname, r in (("nearest", near), ("stating", stating), ("prompt", prompt)):
            tr[f"sink_off/{rname}"] = truth_ratios(nulls_net, tok, facts, r, sinks, forgotten=own, **kw)
            tr[f"retrained/{rname}"] = truth_ratios(retr_net, tok, facts, r, retr_sinks, **kw)
        # the paper's split of article-specific facts: "inferred" = ones the retrained model still gets right
        # (under nearest routing, the paper's Sink-Off), "unique" = the rest
        retr_ok = tr["retrained/nearest"] > 1
        paper_cat = ["shared" if k == "shared" else ("inferred*" if ok else "unique*") for k, ok in zip(kinds, retr_ok)]
        table = {}
        for mode, v in tr.items():
            table[mode] = {}
            for cat in ("unique", "shared", "inferred", "unique*", "inferred*"):
                sel = [i for i in range(len(facts)) if (kinds[i] == cat or paper_cat[i] == cat)]
                table[mode][cat] = summarize(v[sel])
        tables[wording], trs[wording] = table, tr
        tag = "" if wording == "verbatim" else "p"
        of = lambda mode, cat: tr[mode][[i for i in range(len(facts)) if kinds[i] == cat]]
        claims.append(claim_unique_removed(*(of(m, "unique") for m in ("sink_on", "sink_off/nearest",
                                                                       "retrained/nearest")), tag=tag))
        claims.append(claim_kept({c: of("sink_off/nearest", c) for c in ("shared", "inferred")},
                                 {c: of("retrained/nearest", c) for c in ("shared", "inferred")},
                                 oracle_off=table["sink_off/stating"], tag=tag))
        metrics["routing_" + wording] = {"prompt_routed_to_stating_source": float(
            sum(int(prompt[i]) in facts[i].source_ids for i in range(len(facts))) / len(facts))}
    claims.sort(key=lambda c: c["claim"][:2])               # 1, 1p, 2, 2p
    metrics["truth_ratio"] = tables
    metrics["routing"] = {
        "nearest_is_sibling": float(sum(nearest[p] in world.person(p).siblings for p in forget) / len(forget)),
        "nearest_same_birth_city": float(sum(world.person(nearest[p]).birth_city == world.person(p).birth_city
                                             for p in forget) / len(forget))}
    metrics["per_fact"] = [{"fact": f.id, "kind": f.kind, "person": p, "route_stating": r, "route_nearest": nearest[p],
                            **{f"{w}/{m}": float(v[i]) for w in WORDINGS for m, v in trs[w].items()}}
                           for i, (f, p, r) in enumerate(items)]
    return claims, tables


def probe_general(cfg, metrics, world, tok, nulls_net, std_net, sinks, unlearned, route):
    """General capability (Table 1's analogue): multiple-choice questions no single article owns, NULLs under the
    routing it would use at deployment (each prompt to its nearest source), vs the standard transformer.
    Returns {model: per-question correctness}."""
    emb, all_ids = route["emb"], route["all_ids"]
    questions = data.general_questions(world)
    q_emb = embed(cfg, nulls_net, tok, [tok.encode(q.prompt) for q in questions], sinks.expected_mask())
    correct = {"nulls": mc_correct(nulls_net, tok, questions, nearest_sources(q_emb, emb, all_ids), sinks),
               "standard": mc_correct(std_net, tok, questions)}
    metrics["general_accuracy"] = {
        "nulls": float(correct["nulls"].double().mean()),
        # the deployed model after all n_forget requests (their sinks off everywhere): a utility diagnostic
        "nulls_after_forgetting": mc_accuracy(nulls_net, tok, questions,
                                              nearest_sources(q_emb, emb, all_ids, exclude=route["gone"]), unlearned),
        "standard": float(correct["standard"].double().mean()), "n": len(questions)}
    return correct


def probe_selectivity(cfg, metrics, world, tok, forget, nulls_net, retr_net, sinks, retr_sinks, tables, grad, route):
    """Figure 3c: NPO and gradient ascent on the standard transformer (grad: baseline_runs' trajectories, every
    step tracking the article-specific facts of the forgotten people against the article-specific facts of
    semantically similar OTHER articles: siblings, people of the same city); NULLs' Sink-On -> Sink-Off point
    beside them. Returns claims 3."""
    emb, all_ids, gone = route["emb"], route["all_ids"], route["gone"]
    uniq = [f for f, _, _ in probe_facts(world, forget) if f.kind == "unique"]
    rel = related_facts(world, forget, cfg.n_related)
    rel_facts = [f for f, _, _ in rel]
    rel_owner, rel_to = torch.tensor([q for _, q, _ in rel]), torch.tensor([p for _, _, p in rel])
    # related facts are probed as deployed: each cloze routed to its nearest source by prompt (Appendix A.2),
    # before the request among every source, after it among the retained ones with the target's sinks off; the
    # oracle routing to the fact's owner is reported beside it (it can lose at most the owner's overlap sinks)
    rel_emb = embed(cfg, nulls_net, tok, [tok.encode(f.cloze) for f in rel_facts], sinks.expected_mask())
    route_on = nearest_sources(rel_emb, emb, all_ids)
    route_off = nearest_sources(rel_emb, emb, all_ids, exclude=gone)
    nulls_point = {
        "on": {"specific": table_frac(tables, "sink_on"),
               "related": frac_gt1(truth_ratios(nulls_net, tok, rel_facts, route_on, sinks)),
               "related_oracle": frac_gt1(truth_ratios(nulls_net, tok, rel_facts, rel_owner, sinks))},
        "off": {"specific": table_frac(tables, "sink_off/nearest"),
                "related": frac_gt1(truth_ratios(nulls_net, tok, rel_facts, route_off, sinks, forgotten=rel_to)),
                "related_oracle": frac_gt1(truth_ratios(nulls_net, tok, rel_facts, rel_owner, sinks,
                                                        forgotten=rel_to))},
        "retrained": {"specific": table_frac(tables, "retrained/nearest"),
                      "related": frac_gt1(truth_ratios(retr_net, tok, rel_facts, route_off, retr_sinks))}}
    metrics["selectivity"] = {"n_specific": len(uniq), "n_related": len(rel_facts), "nulls": nulls_point,
                              "general_accuracy_nulls_after_forgetting":
                                  metrics["general_accuracy"]["nulls_after_forgetting"]}
    claims, metrics["gradient_baselines"] = [], {}
    for name in ("npo", "ga"):
        traj = grad[name]["trajectory"]
        metrics["gradient_baselines"][name] = {"trajectory": traj, "train_time_s": grad[name]["train_time_s"],
                                               "matched": matched_point(traj, nulls_point["off"]["specific"])}
        claims.append(claim_not_selective(name, traj, nulls_point["off"]["specific"]))
    claims.append(claim_selective(nulls_point["on"], nulls_point["off"]))
    return claims


def capacity_ratios(world, tok, nulls_net, std_net, sinks):
    """Knowledge capacity's truth ratios (Figure 8c): Sink-On NULLs vs the standard transformer (and NULLs'
    backbone alone, the control) on every person's unique facts, both wordings. -> {wording: {model: (N,)}}."""
    all_uniq = [f for f in world.facts if f.kind == "unique"]
    owners = torch.tensor([f.person for f in all_uniq])
    return {w: {"nulls_sink_on": truth_ratios(nulls_net, tok, all_uniq, owners, sinks, wording=w),
                "standard": truth_ratios(std_net, tok, all_uniq, wording=w),
                "nulls_backbone_only": truth_ratios(nulls_net, tok, all_uniq, fixed_mask=sinks.backbone_mask(),
                                                    wording=w)} for w in WORDINGS}


def probe_capacity(metrics, cap_tr):
    """Knowledge capacity (capacity_ratios): summaries into metrics, and claim 5a on the paraphrased prompts."""
    cap = {w: {k: summarize(v) for k, v in d.items()} for w, d in cap_tr.items()}
    metrics["capacity"] = cap
    p = cap_tr["paraphrased"]
    return claim_capacity(p["nulls_sink_on"], p["standard"], p["nulls_backbone_only"],
                          (cap["verbatim"]["nulls_sink_on"], cap["verbatim"]["standard"]))


def table_frac(tables, mode):
    return tables["verbatim"][mode]["unique"]["frac_gt1"]


# -------------------------------------------------------------------------------------------------
# Claims: each measured as the paper measures it, thresholds fixed here before any run; tested both ways
# -------------------------------------------------------------------------------------------------

def claim_unique_removed(on, off, retr, tag=""):
    """Claim 1 (Figures 3b, 4): under nearest routing, Sink-Off removes article-specific (unique) facts as
    retraining does. on/off/retr: per-fact truth ratios of the unique facts (the same facts, in order). The
    fraction difference is paired over facts with its 95% interval (eval.paired_proportion)."""
    on, off, retr = (torch.as_tensor(v, dtype=torch.float64) for v in (on, off, retr))
    fold = float((on.log().mean() - off.log().mean()).exp())
    return ev.claim(f"1{tag} Sink-Off removes unique facts like retraining (nearest routing, {WORDING_TAG[tag]}): "
                    "|frac TR>1 Sink-Off - Retrained| <= 0.15 and geomean TR Sink-On / Sink-Off >= 100",
                    [ev.paired_proportion((off > 1).tolist(), (retr > 1).tolist(), 0.15, "frac_diff"),
                     ev.condition("geomean_fold", fold, ">=", 100.0)],
                    f"frac TR>1: on {float((on > 1).double().mean()):.2f}, off {float((off > 1).double().mean()):.2f}, "
                    f"retrained {float((retr > 1).double().mean()):.2f} ({len(on)} facts)")


WORDING_TAG = {"": "verbatim cloze", "p": "paraphrased cloze"}


def claim_kept(off, retr, oracle_off=None, tag=""):
    """Claim 2 (Figure 4): under the paper's Sink-Off (the next-closest source by embedding similarity), shared
    and inferred facts match Retrained: for each, |frac TR>1 difference| <= 0.10, paired over the facts with its
    95% interval (a category of 10 facts cannot resolve 0.10: it is `inconclusive` unless Sink-Off and Retrained
    disagree on many), and the geometric means within a factor of 2. off/retr: {category: per-fact truth ratios};
    oracle_off: {category: summarize()} under routing to a source that states the fact (an upper bound no deployed
    router has), reported only."""
    tests, parts = [], []
    for cat in ("shared", "inferred"):
        o, r = (torch.as_tensor(v[cat], dtype=torch.float64) for v in (off, retr))
        tests.append(ev.paired_proportion((o > 1).tolist(), (r > 1).tolist(), 0.10, f"{cat} frac_diff"))
        tests.append(ev.condition(f"{cat} geomean_ratio", float((o.log().mean() - r.log().mean()).exp()), "within",
                                  [0.5, 2.0]))
        parts.append(f"{cat} ({len(o)} facts): frac TR>1 Sink-Off {float((o > 1).double().mean()):.2f} vs Retrained "
                     f"{float((r > 1).double().mean()):.2f}")
    detail = "; ".join(parts)
    if oracle_off is not None:
        detail += ("; oracle routing to a stating source (reported, not the claim): frac TR>1 shared "
                   f"{oracle_off['shared']['frac_gt1']:.2f}, inferred {oracle_off['inferred']['frac_gt1']:.2f}")
    return ev.claim(f"2{tag} Sink-Off keeps shared and inferred facts like Retrained (nearest routing, "
                    f"{WORDING_TAG[tag]}): |frac TR>1 diff| <= 0.10 and geomean ratio in [0.5, 2]", tests, detail)


def matched_point(traj, level):
    """Where a trajectory [{"specific", "related", ...}] (fractions of facts with TR > 1, step by step) first
    brings the article-specific fraction down to `level`: every key linearly interpolated between the two
    evaluations around the crossing. None if it never gets there."""
    for a, b in zip(traj, traj[1:]):
        if a["specific"] > level >= b["specific"]:
            w = (a["specific"] - level) / (a["specific"] - b["specific"])
            return {k: a[k] + w * (b[k] - a[k]) for k in a if isinstance(a[k], (int, float)) and k in b}
    return dict(traj[0]) if traj and traj[0]["specific"] <= level else None


def claim_not_selective(name, traj, level):
    """Claim 3 (Figure 3c), gradient side: at matched removal of article-specific facts (down to `level`, the
    fraction NULLs' Sink-Off leaves), facts in semantically similar other articles have fallen at least half as
    much (slope = related drop / article-specific drop >= 0.5; the paper's near-diagonal trajectory is ~1).
    Precondition: the gradient method starts above the level and reaches it."""
    title = f"3 {name.upper()} is not selective: at matched removal, related facts in other articles fall >= 0.5x as much"
    start, m = traj[0], matched_point(traj, level)
    low = min(r["specific"] for r in traj)
    pre = ev.precondition(f"{name} brings article-specific frac TR>1 from above the matched level {level:.2f} down to "
                          f"it within {traj[-1]['step']} steps (start, lowest)", [start["specific"], low],
                          start["specific"] > level and m is not None)
    if not pre["met"]:
        return ev.claim(title, [], "", pre)
    slope = (start["related"] - m["related"]) / (start["specific"] - m["specific"])
    return ev.claim(title, [ev.condition("slope", slope, ">=", 0.5)],
                    f"matched at step {m['step']:.1f}: article-specific {start['specific']:.2f} -> {m['specific']:.2f}, "
                    f"related {start['related']:.2f} -> {m['related']:.2f}, general accuracy "
                    f"{start['general_acc']:.2f} -> {m['general_acc']:.2f}", pre)


def claim_selective(on, off):
    """Claim 3, NULLs side: Sink-Off removes article-specific facts without degrading related facts in other
    articles: slope = related drop / article-specific drop <= 0.2. on/off: {"specific", "related"} fractions, the
    related facts probed as deployed (each cloze routed to its nearest source; after the request the forgotten
    sources are never routed to and their sinks are off). Precondition: Sink-Off removed some specific facts."""
    title = "3 NULLs is selective: related facts fall <= 0.2x as much as article-specific ones under Sink-Off"
    d_spec, d_rel = on["specific"] - off["specific"], on["related"] - off["related"]
    pre = ev.precondition("Sink-Off removes article-specific facts: frac TR>1 Sink-On - Sink-Off > 0", d_spec, d_spec > 0)
    if not pre["met"]:
        return ev.claim(title, [], "", pre)
    return ev.claim(title, [ev.condition("slope", d_rel / d_spec, "<=", 0.2)],
                    f"article-specific {on['specific']:.2f} -> {off['specific']:.2f}, related {on['related']:.2f} -> "
                    f"{off['related']:.2f}", pre)


def claim_reversed(curve, retr, name="npo", within=10):
    """Claim 4a (Figure 7b): gradient unlearning is reversed by relearning in fewer than `within` (10) steps:
    the held-out loss of the gradient-unlearned model falls below Retrained's at the same step (Retrained was
    also fine-tuned the same way; it never saw the source). Both curves start at step 0 (before fine-tuning).
    A curve that never gets below counts as step max(len(curve), within + 1) (censored: a fail)."""
    title = f"4 relearning reverses {name.upper()} within {within} steps (held-out loss below Retrained's at the same step)"
    pre = ev.precondition(f"{name} starts at or above Retrained's held-out loss before relearning (difference)",
                          curve[0] - retr[0], curve[0] >= retr[0])
    k = next((k for k in range(1, len(curve)) if curve[k] < retr[k]), None)
    steps = k if k is not None else max(len(curve), within + 1)
    return ev.claim(title, [ev.condition("steps to reverse", steps, "<=", within)],
                    f"held-out loss {name} {curve[0]:.3f} -> {curve[-1]:.3f}, Retrained {retr[0]:.3f} -> {retr[-1]:.3f}"
                    + ("" if k is not None else f"; never below Retrained in {len(curve) - 1} steps"), pre)


def relative_gap(curve, retr):
    return max(abs(a - b) / b for a, b in zip(curve, retr))


def claim_tracks(off, retr, on, tol=0.10):
    """Claim 4b (Figure 7b): under relearning, NULLs with Sink-Off follows Retrained: at every step the held-out
    loss is within 10% of Retrained's (max over steps of |off - retr| / retr). Negative control: Sink-On (the
    source never forgotten) must NOT track Retrained, or the measure cannot tell forgetting from not forgetting."""
    control = relative_gap(on, retr)
    return ev.claim("4 relearning: Sink-Off stays within 10% of Retrained's held-out loss at every step",
                    [ev.condition("max relative gap", relative_gap(off, retr), "<=", tol)],
                    f"Sink-Off {off[0]:.3f} -> {off[-1]:.3f}, Retrained {retr[0]:.3f} -> {retr[-1]:.3f}, Sink-On "
                    f"{on[0]:.3f} -> {on[-1]:.3f}",
                    ev.precondition(f"the measure separates a model that never forgot: Sink-On's max relative gap "
                                    f"> {tol}", control, control > tol))


def claim_capacity(nulls_on, std, control, verbatim=None):
    """Claim 5a (Figure 8c: the mean truth ratio on article-specific cloze prompts): knowledge capacity. Sink-On
    NULLs matches a parameter-matched standard transformer on every article's unique facts asked in wording no
    article uses (paraphrased cloze: verbatim prompts saturate, frac TR>1 = 1.00 for both): geometric-mean truth
    ratio NULLs / standard >= 0.5. nulls_on/std/control: per-fact truth ratios; control = NULLs with every sink
    off (backbone only), which holds none of the sources' knowledge: it must fail the same test, or the measure
    cannot separate the models. verbatim: (nulls, standard) summarize() of the verbatim prompts, reported."""
    g = lambda v: float(torch.as_tensor(v, dtype=torch.float64).log().mean().exp())
    ratio, ctrl = g(nulls_on) / g(std), g(control) / g(std)
    detail = (f"paraphrased cloze: geomean TR NULLs {ev.fmt(g(nulls_on), '.3g')}, standard {ev.fmt(g(std), '.3g')}, "
              f"backbone only {ev.fmt(g(control), '.3g')}")
    if verbatim is not None:
        detail += (f"; verbatim cloze (reported): frac TR>1 {verbatim[0]['frac_gt1']:.2f} vs "
                   f"{verbatim[1]['frac_gt1']:.2f}, geomean {ev.fmt(verbatim[0]['geomean'], '.3g')} vs "
                   f"{ev.fmt(verbatim[1]['geomean'], '.3g')}")
    return ev.claim("5 knowledge capacity: Sink-On NULLs vs a standard transformer (same params) on every article's "
                    "unique facts, paraphrased cloze: geomean TR ratio >= 0.5",
                    [ev.condition("geomean_ratio", ratio, ">=", 0.5)], detail,
                    ev.precondition("the measure separates a model without the sources' sinks: backbone-only / "
                                    "standard geomean TR ratio < 0.5", ctrl, ctrl < 0.5))


def claim_general(correct_nulls, correct_std):
    """Claim 5b (Table 1): general capability. NULLs' multiple-choice accuracy under deployment routing is within
    one standard deviation of the standard transformer's, where the standard deviation is the standard error of
    the difference paired over the same questions: mean(d) >= -sd(d) / sqrt(n), d = correct_nulls - correct_std
    per question. One-sided: being better is no cost."""
    a, b = (torch.as_tensor(v, dtype=torch.float64) for v in (correct_nulls, correct_std))
    d = a - b
    se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return ev.claim("5 general capability: NULLs multiple-choice accuracy on general questions (deployment routing) "
                    ">= standard - 1 standard error of the paired difference",
                    [ev.condition("accuracy difference", float(d.mean()), ">=", -se)],
                    f"accuracy NULLs {float(a.mean()):.3f}, standard {float(b.mean()):.3f}, {len(d)} questions")


# -------------------------------------------------------------------------------------------------
# Seeds: the whole experiment once per seed; every claim as mean +- std with a verdict per seed and overall
# -------------------------------------------------------------------------------------------------

# -------------------------------------------------------------------------------------------------
# Report: the printed tables, results.json / results.md, plots
# -------------------------------------------------------------------------------------------------


def report(cfg, metrics, claims, seeds_note=""):
    lines = []
    for wording, table in metrics.get("truth_ratio", {}).items():
        lines += [f"Truth ratio of the forgotten people's facts, {wording} cloze (geometric mean / fraction with "
                  "TR > 1); unique*, inferred* = the paper's split of article-specific facts by the retrained model "
                  "(nearest routing)", "",
                  "| mode | unique | shared | inferred | unique* | inferred* |", "| --- | --- | --- | --- | --- | --- |"]
        for mode, row in table.items():
            cells = [f"{ev.fmt(row[c]['geomean'], '.3g')} / {ev.fmt(row[c]['frac_gt1'], '.2f')} (n={row[c]['n']})" for c in
                     ("unique", "shared", "inferred", "unique*", "inferred*")]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    if "routing" in metrics:
        lines += ["routing: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics["routing"].items()) + "; prompt routed "
                  "to a stating source: " + ", ".join(f"{w} {metrics['routing_' + w]['prompt_routed_to_stating_source']:.2f}"
                                                      for w in WORDINGS), ""]
    if "selectivity" in metrics:
        sel = metrics["selectivity"]
        lines += [f"Selectivity (Figure 3c): fraction with TR > 1 of the forgotten people's article-specific facts "
                  f"(n={sel['n_specific']}) and of related facts in other articles (n={sel['n_related']}: siblings, "
                  "same birth city), with general multiple-choice accuracy as utility", "",
                  "| model | step | article-specific | related | general acc |", "| --- | --- | --- | --- | --- |"]
        for name, g in metrics["gradient_baselines"].items():
            t, m = g["trajectory"], g["matched"]
            for r in t[:1] + [r for r in t[1:] if r["step"] % max(1, len(t) // 5) == 0 or r is t[-1]]:
                lines.append(f"| {name} | {r['step']} | {r['specific']:.2f} | {r['related']:.2f} | {r['general_acc']:.2f} |")
            if m is not None:
                lines.append(f"| {name} at matched removal | {m['step']:.1f} | {m['specific']:.2f} | {m['related']:.2f} "
                             f"| {m['general_acc']:.2f} |")
        ga = metrics["general_accuracy"]
        for k, name in (("on", "NULLs Sink-On"), ("off", "NULLs Sink-Off"), ("retrained", "Retrained")):
            p = sel["nulls"][k]
            acc = ga["nulls"] if k == "on" else ga["nulls_after_forgetting"] if k == "off" else None
            lines.append(f"| {name} | - | {p['specific']:.2f} | {p['related']:.2f} | {ev.fmt(acc, '.2f')} |")
        cap = metrics["capacity"]
        lines += ["", f"General capability: multiple-choice accuracy on {ga['n']} general questions: NULLs (deployment "
                  f"routing) {ga['nulls']:.3f}, after forgetting all {len(metrics['forget'])} sources "
                  f"{ga['nulls_after_forgetting']:.3f}, standard {ga['standard']:.3f}",
                  "Knowledge capacity (every person's unique facts, geomean TR / frac TR>1): " +
                  "; ".join(f"{w}: NULLs Sink-On {ev.fmt(c['nulls_sink_on']['geomean'], '.3g')} / "
                            f"{c['nulls_sink_on']['frac_gt1']:.2f}, standard {ev.fmt(c['standard']['geomean'], '.3g')} / "
                            f"{c['standard']['frac_gt1']:.2f}, backbone only "
                            f"{ev.fmt(c['nulls_backbone_only']['geomean'], '.3g')} / "
                            f"{c['nulls_backbone_only']['frac_gt1']:.2f}" for w, c in cap.items()), ""]
    fl, vl = metrics["forget_loss"], metrics["val_loss"]
    rl = metrics["relearning"]
    lines += ["Loss on the forgotten sources: " + ", ".join(f"{k} {v:.3f}" for k, v in fl.items()),
              f"Held-out loss (diagnostic): NULLs {vl['nulls']:.4f} (routed to the nearest source; expected mask "
              f"{vl['nulls_expected_mask']:.4f}, backbone only {vl['nulls_backbone_only']:.4f}), standard "
              f"{vl['standard']:.4f} (params {metrics['params']['nulls'] / 1e6:.2f}M each)", "",
              "Relearning (Figure 7b): held-out loss of the forgotten sources while fine-tuning on their reserved parts",
              "", "| step | " + " | ".join(rl) + " |", "|" + " --- |" * (len(rl) + 1)]
    for k in range(len(rl["retrained"])):
        lines.append(f"| {k} | " + " | ".join(f"{c[k]:.3f}" for c in rl.values()) + " |")
    lines += [""] + ev.claims_markdown(claims)
    tm = metrics["times"]
    per_model = ", ".join(f"{n} {m['cpu_s']:.0f}" + (" (cached)" if m["cached"] else "")
                          for n, m in tm.get("models", {}).items())
    workers = (f" in {tm['workers']} worker processes side by side (with NPO and GA)" if tm.get("workers", 1) > 1
               else "")
    lines.append(f"\n{seeds_note}wall time {metrics['wall_time_s']:.0f} s, CPU time {metrics['cpu_time_s']:.0f} s "
                 f"({torch.get_num_threads()} torch threads a process; training {tm['train_s']:.0f} s wall{workers}, "
                 f"CPU s per model: {per_model}; evaluation {tm['eval_s']:.0f} s wall)")
    ev.publish(cfg.out_dir, "nulls.py results", cfg, metrics, claims, lines, lambda: plot(cfg, metrics))


def report_seeds(cfg, seeds, per_seed_metrics, per_seed_claims):
    """The claims over seeds: mean +- std of each value, verdict per seed and overall; out_dir/results.json."""
    agg = ev.over_seeds(per_seed_claims)
    lines = [f"nulls.py over {len(seeds)} seeds ({', '.join(map(str, seeds))}); per-seed tables in "
             f"{cfg.out_dir}/seed<k>/results.md; each verdict from the 95% interval over the seeds", ""]
    lines += ev.claims_markdown(agg)
    cpu = sum(m["cpu_time_s"] for m in per_seed_metrics.values())
    wall = sum(m["wall_time_s"] for m in per_seed_metrics.values())
    lines.append(f"\nwall time {wall:.0f} s, process CPU time {cpu:.0f} s over {len(seeds)} seeds")
    text = "\n".join(lines)
    print(text)
    summary = {"seeds": seeds, "per_seed": {s: {k: m[k] for k in ("truth_ratio", "general_accuracy", "capacity",
                                                                  "selectivity", "relearning", "val_loss", "wall_time_s",
                                                                  "cpu_time_s") if k in m}
                                            for s, m in per_seed_metrics.items()}}
    path = ev.write_results(cfg.out_dir, "nulls.py results over seeds", cfg, summary, agg, text)
    print(f"wrote {path}")
    return agg


def plot(cfg, metrics):
    plt = ev.pyplot()
    if "per_fact" in metrics:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))          # Figures 3a, 3b
        for ax, kind in zip(axes, ("shared", "unique")):
            for mode in ("sink_on", "sink_off/nearest", "retrained/nearest"):
                v = [math.log10(max(r["verbatim/" + mode], 1e-12)) for r in metrics["per_fact"] if r["kind"] == kind]
                ax.hist(v, bins=20, alpha=0.5, label=mode)
            ax.axvline(0, color="k", lw=0.8)
            ax.set(title=f"{kind} facts", xlabel="log10 truth ratio", ylabel="facts")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(cfg.out_dir, "fig3ab_truth_ratio.png"), dpi=120)
        fig, ax = plt.subplots(figsize=(4.5, 4))                  # Figure 3c, NULLs on the same axes
        for name, g in metrics["gradient_baselines"].items():
            t = g["trajectory"]
            ax.plot([r["specific"] for r in t], [r["related"] for r in t], "o-", ms=3, label=name)
        p = metrics["selectivity"]["nulls"]
        ax.annotate("", (p["off"]["specific"], p["off"]["related"]), (p["on"]["specific"], p["on"]["related"]),
                    arrowprops=dict(arrowstyle="->", color="k"))
        ax.plot([p["off"]["specific"]], [p["off"]["related"]], "k*", ms=10, label="NULLs Sink-Off")
        ax.plot([p["retrained"]["specific"]], [p["retrained"]["related"]], "gs", label="Retrained")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set(xlabel="article-specific: frac TR > 1", ylabel="related, other articles: frac TR > 1",
               title="unlearning selectivity")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(cfg.out_dir, "fig3c_gradient_baselines.png"), dpi=120)
    fig, ax = plt.subplots(figsize=(4.5, 3.5))                    # Figure 7b
    for name, c in metrics["relearning"].items():
        ax.plot(c, label=name)
    ax.set(xlabel="fine-tuning step", ylabel="held-out loss of forgotten sources", title="relearning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out_dir, "fig7b_relearning.png"), dpi=120)
    plt.close("all")


# -------------------------------------------------------------------------------------------------
# Sweeps behind --sweep (Figure 8): each point trains its own models, so they are slow
# -------------------------------------------------------------------------------------------------

SWEEP_DEFAULTS = {"overlap": (0.25, 0.125, 0.0625, 0.03125),      # N_source / N_pool at fixed N_source
                  "n_source": (16, 32, 64, 128),                   # N_source at fixed overlap ratio
                  "capacity": (64, 128)}                           # n_embd: NULLs vs standard, same params


def sweep_point(cfg, src):
    """Unique-fact truth ratios of the forgotten people (Sink-On, Sink-Off, Retrained; nearest routing) and,
    for the capacity sweep, Sink-On NULLs vs the standard transformer on every person's unique facts. None on
    the ranks > 0 of a torchrun launch."""
    tok, docs, forget, world = src["tok"], src["docs"], src["forget"], src["world"]
    all_ids = sorted(docs)
    sinks, retr_sinks = make_sinks(cfg, src)
    nulls_net, _ = train_lm(cfg, tok, docs, all_ids, sinks, "nulls")
    if cfg.sweep == "capacity":
        std_net, _ = train_lm(cfg, tok, docs, all_ids, None, "standard")
        if not T.is_main_process():
            return None
        uniq = [f for f in world.facts if f.kind == "unique"]
        return {"nulls_sink_on": summarize(truth_ratios(nulls_net, tok, uniq, torch.tensor([f.person for f in uniq]), sinks)),
                "standard": summarize(truth_ratios(std_net, tok, uniq))}
    retr_net, _ = train_lm(cfg, tok, docs, retr_sinks.sources, retr_sinks, "retrained")
    if not T.is_main_process():
        return None
    _, nearest = routing(cfg, src, nulls_net, sinks)
    items = [(f, p) for f, p, _ in probe_facts(world, forget) if f.kind == "unique"]
    facts = [f for f, _ in items]
    own, near = torch.tensor([p for _, p in items]), torch.tensor([nearest[p] for _, p in items])
    return {"sink_on": summarize(truth_ratios(nulls_net, tok, facts, own, sinks)),
            "sink_off": summarize(truth_ratios(nulls_net, tok, facts, near, sinks, forgotten=own)),
            "retrained": summarize(truth_ratios(retr_net, tok, facts, near, retr_sinks))}


def run_sweep(cfg):
    if cfg.sweep not in SWEEP_DEFAULTS:
        raise SystemExit(f"unknown sweep {cfg.sweep!r}; valid: {', '.join(SWEEP_DEFAULTS)}")
    if cfg.data != "world":
        raise SystemExit("the sweeps probe facts, which only the built-in world has (--data=world)")
    src = load_sources(cfg)
    rows = []
    for v in cfg.sweep_values or SWEEP_DEFAULTS[cfg.sweep]:
        if cfg.sweep == "overlap":
            point = dataclasses.replace(cfg, n_pool=round(cfg.n_source / v))
        elif cfg.sweep == "n_source":
            point = dataclasses.replace(cfg, n_source=int(v), n_pool=round(int(v) * cfg.n_pool / cfg.n_source))
        else:
            point = dataclasses.replace(cfg, n_embd=int(v))
        res = sweep_point(point, src)
        if res is None:                # a rank > 0 of a torchrun launch: it only helped train
            continue
        rows.append({"value": v, "n_pool": point.n_pool, "n_source": point.n_source, "n_embd": point.n_embd, **res})
        print(f"{cfg.sweep}={v}: " + ", ".join(f"{k} {ev.fmt(r['geomean'], '.3g')} / {ev.fmt(r['frac_gt1'], '.2f')}"
                                              for k, r in res.items()))
    if not T.is_main_process():
        return None
    os.makedirs(cfg.out_dir, exist_ok=True)
    path = os.path.join(cfg.out_dir, f"sweep_{cfg.sweep}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"config": asdict(cfg), "rows": rows}, f, indent=1, default=float)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return rows


def main(argv=None):
    cfg = T.parse_config(Config, argv, PRESETS)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    T.init_distributed(cfg.device)          # under torchrun: one process group for every model trained
    with T.out_dir_lock(cfg.out_dir):   # one run at a time writes here
        try:
            if cfg.sweep:
                return run_sweep(cfg)
            if not cfg.seeds:
                metrics, claims = run(cfg)
                if metrics is not None:         # rank 0 (or the only process) evaluates and writes
                    report(cfg, metrics, claims, seeds_note=f"one seed ({cfg.seed}); --seeds=0,1,2 reports every claim "
                                                            "over three seeds. ")
                return metrics, claims
            per_metrics, per_claims = {}, {}
            for k in cfg.seeds:                 # the whole experiment per seed: another world, other initial weights
                c = T.seed_config(cfg, k, seeds=(), out_dir=os.path.join(cfg.out_dir, f"seed{k}"))
                if T.is_main_process():
                    print(f"==== seed {k} ({len(per_metrics) + 1}/{len(cfg.seeds)})")
                m, cl = run(c)
                if m is not None:
                    per_metrics[k], per_claims[k] = m, cl
                    report(c, m, cl, seeds_note=f"seed {k} of {list(cfg.seeds)}. ")
            if not per_metrics:
                return None, None
            return per_metrics, report_seeds(cfg, list(cfg.seeds), per_metrics, per_claims)
        finally:
            T.end_distributed()


if __name__ == "__main__":
    T.cli(main)
