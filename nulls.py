"""
Natively Unlearnable Large Language Models (NULLs; Ghosal, Maini, Raghunathan; arXiv 2606.13873). Every MLP has
N_gen shared backbone neurons, always on, beside a pool of N_pool sinks of which each data source switches on a
fixed N_source, so what is specific to a source collects in its sinks; a source is unlearned by never switching
its sinks on again, with no gradient step and no access to the retained data.

Run: `python nulls.py` (the built-in world, people as sources; CPU, minutes); `--preset=smoke` (seconds);
`--preset=paper` (Wikipedia articles as sources, a SmolLM-shaped model, one GPU); `--sweep=overlap|n_source|
capacity` (Figure 8); `torchrun --nproc_per_node=N nulls.py ...` trains data-parallel, rank 0 evaluates. It trains
NULLs, Retrained (NULLs without the forgotten sources) and a standard transformer of the same size (cached in
out_dir, named by train.run_key), unlearns n_forget people, probes their facts by truth ratio (Figures 3-4), runs
NPO and gradient ascent on the standard model (3c), the relearning attack (7b) and the capability check, prints
the tables and claims, and writes out_dir/results.json, results.md and the figures. Measured numbers: README.md.
The sink masks come from memsinks.py's generator.

Where we deliberately differ from the authors' released code, and why:
- exactly N_source active sinks per source (the release draws Bernoulli(p_mem), 75-130 for a target of 100): the
  paper describes "a subset of size N_source";
- the generator is memsinks.py's exact, scrambled-seed LCG (the release's wraps and correlates ids);
- packed rows use causal AND same-document attention (model.py's doc_ids); the release masks only (j > i) AND
  same document, which leaks other documents' future tokens.
"""
import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, asdict

import torch

import baselines
import data
import eval as ev
import model as M
import train as T
from memsinks import lcg_uniforms


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
    # sweeps behind a flag: "overlap" (Fig 8a), "n_source" (8b), "capacity" (8c); "" = none
    sweep: str = ""
    sweep_values: tuple = ()
    device: str = "auto"
    seed: int = 0
    out_dir: str = "out/nulls"
    log_every: int = 50

    def __post_init__(self):        # valid ranges: train.parse_config turns a violation into exit status 2
        T.check(self, tokenizer=("gpt2", "word"), flavor=("gpt2", "llama"),
                sweep=("", "overlap", "n_source", "capacity"), n_people="[2, inf)", n_families="[1, inf)",
                n_cities="[1, inf)", n_countries="[1, inf)", n_docs="[2, inf)",
                n_forget="[1, n_people)" if self.data == "world" else "[1, n_docs)",
                n_layer="[1, inf)", n_head="[1, inf)", n_kv_head="[0, n_head]", n_embd="[1, inf)", n_gen="[1, inf)",
                n_pool="[1, inf)", n_source="[1, n_pool]", block_size="[2, inf)", epochs="[1, inf)",
                batch_size="[1, inf)", lr="(0, inf)", min_lr="[0, lr]", weight_decay="[0, inf)",
                warmup_steps="[0, inf)", grad_clip="[0, inf)", unlearn_epochs="[1, inf)", unlearn_batch="[1, inf)",
                npo_beta="(0, inf)", npo_lr="(0, inf)", ga_lr="(0, inf)", relearn_steps="[1, inf)",
                relearn_lr="(0, inf)", log_every="[0, inf)")
        T.pick_device(self.device)             # names the devices that exist if this one does not


PRESETS = {
    # seconds, for the tests
    "smoke": dict(n_people=12, n_families=5, n_cities=4, n_countries=4, n_forget=2, n_layer=2, n_embd=32, n_head=2, n_gen=16, n_pool=64,
                  n_source=8, epochs=2, batch_size=6, warmup_steps=1, unlearn_epochs=1, relearn_steps=2,
                  log_every=0),
    # one GPU: Wikipedia articles as sources, a SmolLM-135M-shaped model with the MLP widened as in the paper
    # (N_gen 500, N_source ~ 0.013 N_pool), GPT-2 BPE
    "paper": dict(data="wikipedia", n_docs=200_000, n_forget=100, flavor="llama", n_layer=30, n_head=9,
                  n_kv_head=3, n_embd=576, n_gen=500, n_pool=7692, n_source=100, block_size=1024, epochs=3,
                  batch_size=32, lr=5e-4, min_lr=5e-5, warmup_steps=1000, npo_lr=1e-5, ga_lr=1e-5,
                  relearn_lr=1e-5, unlearn_batch=8, log_every=100),
}


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
        enc = [tok.encode(t)[:cfg.block_size] for t in texts]
        enc = [e for e in enc if len(e) >= 8]
        docs = {i + 1: e for i, e in enumerate(enc[:cfg.n_docs])}
        holdout = enc[cfg.n_docs:]
        world = None
        forget = list(range(1, len(docs) + 1, max(1, len(docs) // cfg.n_forget)))[:cfg.n_forget]
    if not 0 < cfg.n_forget < len(docs):
        raise ValueError(f"n_forget must be in 1..{len(docs) - 1}, got {cfg.n_forget}")
    longest = max(len(d) for d in docs.values())
    if longest >= cfg.block_size:
        raise ValueError(f"a source has {longest} tokens; raise block_size above it (now {cfg.block_size})")
    return dict(tok=tok, docs=docs, forget=forget, world=world, holdout=holdout)


def segments(cfg, tok, seqs):
    """Token lists -> one row each (x, y, doc_ids), cut into sentence segments for the world (see Config)."""
    split = {tok.stoi["."]} if cfg.split_sentences and cfg.data == "world" else None
    return data.one_per_row(seqs, None, eos_id=tok.eos_id, pad_id=tok.pad_id, split_ids=split)


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
                         bias=cfg.flavor == "gpt2", tie_embeddings=True)


def lm_rows(cfg, tok, docs, source_ids):
    """One row per source document (x, y, doc_ids, per-token source_ids); world articles in sentence segments."""
    split = {tok.stoi["."]} if cfg.split_sentences and cfg.data == "world" else None
    return data.one_per_row([docs[s] for s in source_ids], source_ids, eos_id=tok.eos_id, pad_id=tok.pad_id,
                            block_size=cfg.block_size, split_ids=split)


def train_config(cfg, steps):
    """The loop's settings, the same for NULLs, Retrained and Standard."""
    return T.TrainConfig(lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                         max_steps=steps, grad_clip=cfg.grad_clip, log_every=cfg.log_every, device=cfg.device,
                         seed=cfg.seed, ckpt_every=max(50, steps // 4))


def checkpoint_path(cfg, name, tok, rows, steps, sinks):
    """out_dir/<name>-<train.run_key>.pt, keyed on what training receives: the model and loop settings, the rows
    (with source ids only where sink masks use them), the batch size and the sink layout. Everything after
    training (unlearning, probing, the baselines, relearning, --fast_path) reuses the finished model, and the
    NULLs and standard models survive a change of n_forget."""
    keys = ("x", "y", "doc_ids") + (() if sinks is None else ("source_ids",))
    layout = None if sinks is None else {k: v for k, v in sinks.state_dict().items() if k != "sources"}
    key = T.run_key(model_config(cfg, tok.vocab_size), train_config(cfg, steps), data={k: rows[k] for k in keys},
                    batch_size=cfg.batch_size, sinks=layout)
    return os.path.join(cfg.out_dir, f"{name}-{key}.pt")


def lm_run(cfg, tok, docs, source_ids, sinks, name):
    """What training one model hands the loop: (rows, the epoch order, the TrainConfig with its checkpoint)."""
    rows = lm_rows(cfg, tok, docs, source_ids)
    order = data.EpochIterator(len(source_ids), cfg.batch_size, seed=cfg.seed)
    steps = cfg.epochs * order.steps_per_epoch
    tc = dataclasses.replace(train_config(cfg, steps), resume=True,
                             ckpt_path=checkpoint_path(cfg, name, tok, rows, steps, sinks))
    return rows, order, tc


def train_lm(cfg, tok, docs, source_ids, sinks, name):
    """Train a fresh model on the documents of `source_ids` (one document per row) with the sink masks of `sinks`
    (None = a standard transformer), or reuse the finished checkpoint; an interrupted run resumes. Under
    torchrun the ranks split every batch (data-parallel)."""
    torch.manual_seed(cfg.seed)
    net = M.GPT(model_config(cfg, tok.vocab_size))
    rows, order, tc = lm_run(cfg, tok, docs, source_ids, sinks, name)
    steps = tc.max_steps

    def batch_at(step):
        b = {k: rows[k][T.epoch_batch(order, step)] for k in ("x", "y", "doc_ids", "source_ids")}
        if sinks is not None:   # a function of this rank's rows, called on the training device (train.train)
            b["mlp_mask"] = lambda local: sinks.mask(local["source_ids"], fast=cfg.fast_path)
        return b
    if T.is_main_process():
        print(f"== training {name}: {len(source_ids)} sources, {steps} steps, {net.num_params() / 1e6:.2f}M params")
    hist = T.train(net, batch_at, tc, tokenizer=tok.state_dict())
    net.eval()
    return net, hist


def make_sinks(cfg, src):
    """The sink layouts of NULLs (every source) and of Retrained (the retained sources only)."""
    gone = set(src["forget"])
    return (Sinks(cfg.n_gen, cfg.n_pool, cfg.n_source, sorted(src["docs"])),
            Sinks(cfg.n_gen, cfg.n_pool, cfg.n_source, [s for s in sorted(src["docs"]) if s not in gone]))


def train_three(cfg, src, sinks, retr_sinks):
    """NULLs on every source, Retrained without the forgotten ones, and the standard transformer."""
    tok, docs = src["tok"], src["docs"]
    t0 = time.time()
    nulls_net, h_nulls = train_lm(cfg, tok, docs, sinks.sources, sinks, "nulls")
    retr_net, _ = train_lm(cfg, tok, docs, retr_sinks.sources, retr_sinks, "retrained")
    std_net, h_std = train_lm(cfg, tok, docs, sinks.sources, None, "standard")
    times = {"train_s": time.time() - t0, "nulls_final_loss": h_nulls["loss"][-1] if h_nulls["loss"] else None,
             "standard_final_loss": h_std["loss"][-1] if h_std["loss"] else None}
    return {"nulls": nulls_net, "retrained": retr_net, "standard": std_net}, times


# -------------------------------------------------------------------------------------------------
# Unlearning: the forget list and nearest-source routing; post-hoc gradient baselines (Figure 3c)
# -------------------------------------------------------------------------------------------------

@torch.no_grad()
def embed(model, rows, mask):
    """(N, n_embd) mean-pooled final hidden states (after the last norm) of each row of `rows` (x, doc_ids as
    made by segments()), under one mask: the paper's "mean-pooled token representations" used for
    nearest-source routing (Appendix A.2)."""
    dev = next(model.parameters()).device
    captured = []
    hook = model.ln_f.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        model(rows["x"].to(dev), doc_ids=rows["doc_ids"].to(dev), mlp_mask=None if mask is None else mask.to(dev))
    finally:
        hook.remove()
    valid = (rows["doc_ids"] >= 0).float().to(dev)[..., None]                   # (N, T, 1)
    return ((captured[-1].float() * valid).sum(1) / valid.sum(1)).cpu()


def nearest_sources(queries, source_emb, source_ids, exclude=()):
    """For each query embedding (Q, C), the id of the source whose embedding (S, C) has the highest cosine
    similarity, never one in `exclude` (the forgotten sources)."""
    sim = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(source_emb, dim=-1).t()
    ids = torch.as_tensor(source_ids, dtype=torch.long)
    sim[:, torch.isin(ids, torch.tensor(sorted(exclude), dtype=torch.long))] = float("-inf")
    return ids[sim.argmax(1)]


def forget_batches(cfg, tok, docs, forget):
    rows = segments(cfg, tok, [docs[s] for s in forget])
    return [{k: rows[k][i:i + cfg.unlearn_batch] for k in ("x", "y", "doc_ids")}
            for i in range(0, len(forget), cfg.unlearn_batch)]


def gradient_baseline(cfg, name, std_net, batches, metrics_fn):
    """NPO or gradient ascent on a copy of the standard transformer for cfg.unlearn_epochs epochs over the
    forgotten sources, metrics every epoch. Neither uses retained data (as NULLs does not)."""
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
                            eval_every=len(batches))
    net.eval()
    return net, res


# -------------------------------------------------------------------------------------------------
# Evaluation: losses, the NULLs truth ratio of cloze prompts under a chosen source's mask, relearning
# -------------------------------------------------------------------------------------------------

@torch.no_grad()
def row_losses(net, rows, mask=None):
    """(N,) mean next-token NLL of each row (targets -100 ignored), with the rows' segments as documents."""
    dev = next(net.parameters()).device
    with ev.evaluating(net):
        lp = net.token_logprobs(rows["x"].to(dev), rows["y"].to(dev), doc_ids=rows["doc_ids"].to(dev),
                                mlp_mask=None if mask is None else mask.to(dev))
    return -ev.mean_logprob(lp, rows["y"].to(dev)).cpu()


def truth_ratios(net, tok, facts, route=None, sinks=None, fixed_mask=None, forgotten=None):
    """(N,) NULLs truth ratio TR = p̄(value | cloze) / mean_j p̄(wrong value_j | cloze) of each fact.
    route: (N,) source ids whose sink masks are applied (with `sinks`' forget list, and each row's
    `forgotten` source excluded: Sink-Off); fixed_mask: one mask for every item (e.g. backbone only);
    neither: no mask (the standard transformer)."""
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
        q = [tok.encode(facts[i].cloze) for i in idx]
        a = [tok.encode(facts[i].value) for i in idx]
        p = [[tok.encode(v) for v in facts[i].perturbed_values] for i in idx]
        out[idx] = ev.truth_ratio(net, q, a, p, form="nulls", batch_size=256, pad_id=tok.pad_id, **fwd)
    return out


def summarize(tr):
    """Truth ratios are heavy-tailed (one fact can reach 1e6): the geometric mean and the fraction above 1."""
    tr = torch.as_tensor(tr, dtype=torch.float64)
    if len(tr) == 0:
        return {"n": 0, "geomean": None, "frac_gt1": None}
    return {"n": len(tr), "geomean": float(tr.log().mean().exp()), "frac_gt1": float((tr > 1).double().mean())}


def probe_world(cfg, world, tok, forget, nets, sinks, retr_sinks, nearest, emb, all_ids):
    """Truth ratios of the forgotten people's facts in every mode (Figures 3a, 3b, 4) -> (table, routing stats,
    per-fact rows)."""
    nulls_net, retr_net, std_net = nets["nulls"], nets["retrained"], nets["standard"]
    items = probe_facts(world, forget)
    facts = [f for f, _, _ in items]
    own = torch.tensor([p for _, p, _ in items])
    stating = torch.tensor([r for _, _, r in items])
    near = torch.tensor([nearest[p] for _, p, _ in items])
    # per-prompt routing of an unlabelled cloze prompt (Appendix A.2)
    prompt_emb = embed(nulls_net, segments(cfg, tok, [tok.encode(f.cloze) for f in facts]), sinks.expected_mask())
    prompt = nearest_sources(prompt_emb, emb, all_ids, exclude=set(forget))
    tr = {"sink_on": truth_ratios(nulls_net, tok, facts, own, sinks),
          "all_sinks_off": truth_ratios(nulls_net, tok, facts, fixed_mask=sinks.backbone_mask()),
          "standard": truth_ratios(std_net, tok, facts)}
    for rname, route in (("nearest", near), ("stating", stating), ("prompt", prompt)):
        tr[f"sink_off/{rname}"] = truth_ratios(nulls_net, tok, facts, route, sinks, forgotten=own)
        tr[f"retrained/{rname}"] = truth_ratios(retr_net, tok, facts, route, retr_sinks)
    kinds = [f.kind for f in facts]
    # the paper's split of article-specific facts: "inferred" = ones the retrained model still gets right
    # (under the routing to a stating source / sibling), "unique" = the rest
    retr_ok = tr["retrained/stating"] > 1
    paper_cat = ["shared" if k == "shared" else ("inferred*" if ok else "unique*") for k, ok in zip(kinds, retr_ok)]
    table = {}
    for mode, v in tr.items():
        table[mode] = {}
        for cat in ("unique", "shared", "inferred", "unique*", "inferred*"):
            sel = [i for i in range(len(facts)) if (kinds[i] == cat or paper_cat[i] == cat)]
            table[mode][cat] = summarize(v[sel])
    routing = {
        "nearest_is_sibling": float(sum(nearest[p] in world.person(p).siblings for p in forget) / len(forget)),
        "nearest_same_birth_city": float(sum(world.person(nearest[p]).birth_city == world.person(p).birth_city
                                             for p in forget) / len(forget)),
        "prompt_routed_to_stating_source": float(sum(int(prompt[i]) in facts[i].source_ids for i in range(len(facts)))
                                                 / len(facts))}
    per_fact = [{"fact": f.id, "kind": f.kind, "person": p, "route_stating": r, "route_nearest": nearest[p],
                 **{m: float(v[i]) for m, v in tr.items()}} for i, (f, p, r) in enumerate(items)]
    return table, routing, per_fact


def fact_trajectory(tok, world, forget):
    """metrics_fn for the gradient baselines (Figure 3c): truth ratios of the forgotten people's unique and
    shared facts on the unmasked model."""
    facts = [f for f, _, _ in probe_facts(world, forget)]
    uniq = [f for f in facts if f.kind == "unique"]
    shared = [f for f in facts if f.kind == "shared"]

    def metrics_fn(net, step):
        u, s = summarize(truth_ratios(net, tok, uniq)), summarize(truth_ratios(net, tok, shared))
        return {"unique_frac_gt1": u["frac_gt1"], "shared_frac_gt1": s["frac_gt1"],
                "unique_geomean": u["geomean"], "shared_geomean": s["geomean"]}
    return metrics_fn


def relearn(cfg, net, tok, train_seqs, test_seqs, mask_rows=None):
    """Fine-tune on part of each forgotten source (train_seqs) and track the loss on the rest (test_seqs).
    mask_rows: (N, 1, d_ff) per-source masks (NULLs / Retrained as deployed) or None (standard)."""
    net = copy.deepcopy(net)
    dev = next(net.parameters()).device
    train_rows, test_rows = segments(cfg, tok, train_seqs), segments(cfg, tok, test_seqs)
    kw = {"doc_ids": train_rows["doc_ids"].to(dev)}
    if mask_rows is not None:
        kw["mlp_mask"] = mask_rows.to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.relearn_lr, weight_decay=0.0)
    curve = [float(row_losses(net, test_rows, mask_rows).mean())]
    for _ in range(cfg.relearn_steps):
        net.train()
        _, loss = net(train_rows["x"].to(dev), train_rows["y"].to(dev), **kw)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append(float(row_losses(net, test_rows, mask_rows).mean()))
    return curve


# -------------------------------------------------------------------------------------------------
# The experiment
# -------------------------------------------------------------------------------------------------

def run(cfg):
    """Train (or reuse) the three models, unlearn, evaluate -> (metrics, claims); (None, None) on the ranks > 0
    of a torchrun launch, which only help train."""
    torch.manual_seed(cfg.seed)
    t_start = time.time()
    src = load_sources(cfg)
    tok, docs, forget, world = src["tok"], src["docs"], src["forget"], src["world"]
    all_ids = sorted(docs)
    sinks, retr_sinks = make_sinks(cfg, src)                                        # Sink-On: nothing forgotten yet
    nets, times = train_three(cfg, src, sinks, retr_sinks)
    if not T.is_main_process():
        return None, None
    os.makedirs(cfg.out_dir, exist_ok=True)
    nulls_net, retr_net, std_net = nets["nulls"], nets["retrained"], nets["standard"]
    metrics = {"times": times, "n_sources": len(all_ids), "forget": forget,
               "params": {"nulls": nulls_net.num_params(), "standard": std_net.num_params()}}

    # routing (Appendix A.2): mean-pooled final hidden states of each source's text. No source is known for a
    # query, so both sides are embedded under the expected mask (every sink at N_source / N_pool).
    emb = embed(nulls_net, segments(cfg, tok, [docs[s] for s in all_ids]), sinks.expected_mask())
    nearest = dict(zip(forget, nearest_sources(emb[[all_ids.index(s) for s in forget]], emb, all_ids,
                                               exclude=set(forget)).tolist()))
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

    # capability (claim 5): held-out text, NULLs routed to the nearest source, vs the standard transformer
    hold = segments(cfg, tok, src["holdout"])
    hold_route = nearest_sources(embed(nulls_net, hold, sinks.expected_mask()), emb, all_ids, exclude=set(forget))
    metrics["val_loss"] = {
        "nulls": float(row_losses(nulls_net, hold, sinks.row_mask(hold_route)).mean()),
        "standard": float(row_losses(std_net, hold).mean()),
        # diagnostics: no routing, every sink at its expected value; the backbone alone
        "nulls_expected_mask": float(row_losses(nulls_net, hold, sinks.expected_mask()).mean()),
        "nulls_backbone_only": float(row_losses(nulls_net, hold, sinks.backbone_mask()).mean())}

    # loss on the forgotten sources themselves, per mode (the Harry Potter study's Figure 5a measure)
    fseqs = [docs[s] for s in forget]
    frows = segments(cfg, tok, fseqs)
    route_near = torch.tensor([nearest[s] for s in forget])
    metrics["forget_loss"] = {
        "sink_on": float(row_losses(nulls_net, frows, sinks.row_mask(forget)).mean()),
        "sink_off": float(row_losses(nulls_net, frows, sinks.row_mask(route_near, forget)).mean()),
        "retrained": float(row_losses(retr_net, frows, retr_sinks.row_mask(route_near)).mean()),
        "standard": float(row_losses(std_net, frows).mean())}

    claims = {}
    if world is not None:
        table, metrics["routing"], metrics["per_fact"] = probe_world(cfg, world, tok, forget, nets, sinks,
                                                                     retr_sinks, nearest, emb, all_ids)
        metrics["truth_ratio"] = table
        claims["unique_removed"] = claim_unique_removed(table)
        claims["shared_kept"] = claim_shared_kept(table)
    else:
        for name, text in (("unique_removed", "1 unique facts removed like retraining"),
                           ("shared_kept", "2 shared and inferred facts kept"),
                           ("gradient_not_selective", "3 gradient unlearning not selective")):
            claims[name] = ev.claim(text, None, None, None, "not measured: real documents come without facts")

    # Figure 3c: NPO and gradient ascent on the standard transformer over the forgotten articles (GA only where
    # facts are probed); the NPO model also faces the relearning attack
    batches = forget_batches(cfg, tok, docs, forget)
    metrics_fn = None if world is None else fact_trajectory(tok, world, forget)
    unlearned_nets = {}
    if world is not None:
        metrics["gradient_baselines"] = {}
    for name in ("npo", "ga") if world is not None else ("npo",):
        unlearned_nets[name], res = gradient_baseline(cfg, name, std_net, batches, metrics_fn)
        if world is not None:
            metrics["gradient_baselines"][name] = {"trajectory": res.trajectory, "train_time_s": res.train_time}
            claims[f"{name}_not_selective"] = claim_not_selective(name, res.trajectory, cfg.unlearn_epochs)

    # relearning (claim 4): fine-tune on the first half of each forgotten source, loss on the second half
    half = [(d[:len(d) // 2], d[len(d) // 2:]) for d in fseqs]
    train_half, test_half = [a for a, _ in half], [b for _, b in half]
    metrics["relearning"] = {
        "sink_off": relearn(cfg, nulls_net, tok, train_half, test_half, sinks.row_mask(route_near, forget)),
        "retrained": relearn(cfg, retr_net, tok, train_half, test_half, retr_sinks.row_mask(route_near)),
        "npo": relearn(cfg, unlearned_nets["npo"], tok, train_half, test_half)}
    claims["relearning"] = claim_relearning(metrics["relearning"])
    claims["capability"] = claim_capability(metrics["val_loss"])
    metrics["wall_time_s"] = time.time() - t_start
    return metrics, list(claims.values())


# -------------------------------------------------------------------------------------------------
# Claims, from this run's numbers (thresholds fixed in code)
# -------------------------------------------------------------------------------------------------

def claim_unique_removed(table):
    """Claim 1, unique facts under the paper's nearest-source routing: Sink-Off forgets like Retrained."""
    on, off, re_ = (table[m]["unique"] for m in ("sink_on", "sink_off/nearest", "retrained/nearest"))
    fold = on["geomean"] / off["geomean"]
    diff = abs(off["frac_gt1"] - re_["frac_gt1"])
    return ev.claim("1 Sink-Off removes unique facts like retraining (nearest routing): |frac TR>1 "
                    "Sink-Off - Retrained| <= 0.15 and geomean TR Sink-On / Sink-Off >= 100",
                    {"frac_diff": diff, "geomean_fold": fold}, {"frac_diff": 0.15, "geomean_fold": 100},
                    bool(diff <= 0.15 and fold >= 100),
                    f"frac TR>1: on {on['frac_gt1']:.2f}, off {off['frac_gt1']:.2f}, retrained {re_['frac_gt1']:.2f}")


def claim_shared_kept(table):
    """Claim 2, shared and inferred facts, routed to a source that states them: Sink-Off keeps them."""
    vals, ok = {}, True
    for cat in ("shared", "inferred"):
        o, r = table["sink_off/stating"][cat], table["retrained/stating"][cat]
        vals[cat] = {"sink_off_frac": o["frac_gt1"], "retrained_frac": r["frac_gt1"]}
        ok &= o["frac_gt1"] >= 0.9 and abs(o["frac_gt1"] - r["frac_gt1"]) <= 0.1
    return ev.claim("2 Sink-Off keeps shared and inferred facts (routed to a stating source): frac TR>1 "
                    ">= 0.9 and within 0.1 of Retrained", vals, {"frac": 0.9, "diff": 0.1}, bool(ok))


def claim_not_selective(name, traj, epochs):
    """Claim 3 for one gradient baseline: shared facts fall at least half as fast as article-specific ones."""
    d_u = traj[0]["unique_frac_gt1"] - traj[-1]["unique_frac_gt1"]
    d_s = traj[0]["shared_frac_gt1"] - traj[-1]["shared_frac_gt1"]
    ratio = d_s / d_u if d_u > 0 else None
    return ev.claim(f"3 {name.upper()} is not selective: shared facts (frac TR>1) fall at least half as "
                    "fast as article-specific ones", ratio, 0.5, None if ratio is None else bool(ratio >= 0.5),
                    f"drop unique {d_u:.3f}, drop shared {d_s:.3f} over {epochs} epochs"
                    + ("" if d_u > 0 else "; unique facts did not fall, ratio undefined"))


def claim_relearning(curves):
    """Claim 4: NPO's forgetting is undone faster by fine-tuning than NULLs' Sink-Off, which ends near Retrained."""
    rec = {k: c[0] - c[-1] for k, c in curves.items()}
    gap = abs(curves["sink_off"][-1] - curves["retrained"][-1]) / curves["retrained"][-1]
    return ev.claim("4 relearning: NPO recovers markedly faster than Sink-Off (>= 2x the loss drop), "
                    "Sink-Off ends within 10% of Retrained",
                    {"drop_npo": rec["npo"], "drop_sink_off": rec["sink_off"], "rel_gap_to_retrained": gap},
                    {"drop_ratio": 2.0, "rel_gap": 0.10},
                    bool(rec["npo"] >= 2 * max(rec["sink_off"], 0.0) and rec["npo"] > 0 and gap <= 0.10))


def claim_capability(vl):
    """Claim 5: NULLs (routed to the nearest source) matches a standard transformer of the same size."""
    ratio = vl["nulls"] / vl["standard"]
    return ev.claim("5 capability: NULLs held-out loss within 3% of a standard transformer (same params)",
                    ratio, 1.03, bool(ratio <= 1.03),
                    f"NULLs routed to the nearest source {vl['nulls']:.4f} vs standard {vl['standard']:.4f}; for "
                    f"reference (not the claim's measure), the ratio under the expected mask is "
                    f"{vl['nulls_expected_mask'] / vl['standard']:.3f} and with the backbone alone "
                    f"{vl['nulls_backbone_only'] / vl['standard']:.3f}")


# -------------------------------------------------------------------------------------------------
# Report: the printed table, results.json / results.md, plots
# -------------------------------------------------------------------------------------------------

def fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def report(cfg, metrics, claims):
    lines = []
    if "truth_ratio" in metrics:
        lines += ["Truth ratio of the forgotten people's facts (geometric mean / fraction with TR > 1); "
                  "unique*, inferred* = the paper's split of article-specific facts by the retrained model", "",
                  "| mode | unique | shared | inferred | unique* | inferred* |", "| --- | --- | --- | --- | --- | --- |"]
        for mode, row in metrics["truth_ratio"].items():
            cells = [f"{fmt(row[c]['geomean'])} / {fmt(row[c]['frac_gt1'], '.2f')} (n={row[c]['n']})" for c in
                     ("unique", "shared", "inferred", "unique*", "inferred*")]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        lines += ["", "routing: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics["routing"].items()), "",
                  "Gradient unlearning on the standard transformer (fraction of facts with TR > 1, per epoch)", "",
                  "| method | step | unique | shared |", "| --- | --- | --- | --- |"]
        for name, g in metrics["gradient_baselines"].items():
            for r in g["trajectory"]:
                lines.append(f"| {name} | {r['step']} | {fmt(r['unique_frac_gt1'], '.2f')} | {fmt(r['shared_frac_gt1'], '.2f')} |")
    fl, vl = metrics["forget_loss"], metrics["val_loss"]
    lines += ["", "Loss on the forgotten sources: " + ", ".join(f"{k} {v:.3f}" for k, v in fl.items()),
              f"Held-out loss: NULLs {vl['nulls']:.4f} (routed to the nearest source; expected mask "
              f"{vl['nulls_expected_mask']:.4f}, backbone only {vl['nulls_backbone_only']:.4f}), standard {vl['standard']:.4f} "
              f"(params {metrics['params']['nulls'] / 1e6:.2f}M each)",
              "Relearning, held-out half of the forgotten sources (loss at step 0 -> end): " +
              ", ".join(f"{k} {c[0]:.3f} -> {c[-1]:.3f}" for k, c in metrics["relearning"].items()), "",
              "| claim | value | threshold | held |", "| --- | --- | --- | --- |"]
    for c in claims:
        lines.append(f"| {c['claim']} | {json.dumps(c['value'], default=float)} | {json.dumps(c['threshold'])} | "
                     f"{c['held']} |" + (f" {c['detail']}" if c["detail"] else ""))
    lines.append(f"\nwall time {metrics['wall_time_s']:.0f} s")
    text = "\n".join(lines)
    print(text)
    path = ev.write_results(cfg.out_dir, "nulls.py results", cfg, metrics, claims, text)
    plot(cfg, metrics)
    print(f"wrote {path}")


def plot(cfg, metrics):
    plt = ev.pyplot()
    if "per_fact" in metrics:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))          # Figures 3a, 3b
        for ax, kind in zip(axes, ("shared", "unique")):
            for mode in ("sink_on", "sink_off/nearest", "retrained/nearest"):
                v = [math.log10(max(r[mode], 1e-12)) for r in metrics["per_fact"] if r["kind"] == kind]
                ax.hist(v, bins=20, alpha=0.5, label=mode)
            ax.axvline(0, color="k", lw=0.8)
            ax.set(title=f"{kind} facts", xlabel="log10 truth ratio")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(cfg.out_dir, "fig3ab_truth_ratio.png"), dpi=120)
        fig, ax = plt.subplots(figsize=(4.5, 4))                  # Figure 3c
        for name, g in metrics["gradient_baselines"].items():
            t = g["trajectory"]
            ax.plot([r["unique_frac_gt1"] for r in t], [r["shared_frac_gt1"] for r in t], "o-", label=name)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set(xlabel="article-specific: frac TR > 1", ylabel="shared: frac TR > 1", title="gradient unlearning")
        ax.legend()
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
    emb = embed(nulls_net, segments(cfg, tok, [docs[s] for s in all_ids]), sinks.expected_mask())
    nearest = dict(zip(forget, nearest_sources(emb[[all_ids.index(s) for s in forget]], emb, all_ids,
                                               exclude=set(forget)).tolist()))
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
        print(f"{cfg.sweep}={v}: " + ", ".join(f"{k} {fmt(r['geomean'])} / {fmt(r['frac_gt1'], '.2f')}"
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
    T.init_distributed(cfg.device)          # under torchrun: one process group for every model trained
    try:
        if cfg.sweep:
            return run_sweep(cfg)
        metrics, claims = run(cfg)
        if metrics is not None:             # rank 0 (or the only process) evaluates and writes
            report(cfg, metrics, claims)
        return metrics, claims
    finally:
        T.end_distributed()


if __name__ == "__main__":
    main()
