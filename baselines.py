"""
Post-hoc unlearning baselines: the objectives the five papers compare against, and one loop that runs any of
them for a number of epochs/steps or until a stopping rule, optionally restricted to an exact parameter region.

Batches. A batch is a dict with x (B, T) token ids and y (B, T) next-token targets (y[:, t] follows x[:, t];
-100 = ignored, i.e. prompt/question and padding), plus optional model kwargs (doc_ids, mlp_mask,
adapter_ctx) that go to every forward of the model *and* of its reference model. Other keys are not model
kwargs: the paired objectives read their second batch from the forget batch in the loop ("winner" for DPO,
"idk" for IdkDPO/IdkNLL, "alt" for AltPO), so pairs stay aligned however batches are ordered.
log pi(y|x) of a row is the SUM of its target-token log-probs; |y| is its number of target tokens.

Reductions (each docstring says which; chosen per paper and the reference benchmarks' code):
- token mean over every target token of the batch: GA, NLL (retain), GradDiff, IdkNLL, KL, UNDIAL, SGA, L2
- per sequence, then the mean over rows:           NPO, SimNPO, DPO / IdkDPO / AltPO, WGA, RMU

Objectives are plain functions returning a scalar loss to MINIMIZE. Every one adds
retain_weight * (NLL or KL on the retain batch) when a retain batch is given. make_objective(name, ref, **hp)
binds one into the loop's form f(model, forget=..., retain=...).
"""
import copy
import inspect
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from localize import resolve_region

MODEL_KWARGS = ("doc_ids", "mlp_mask", "adapter_ctx")


# -------------------------------------------------------------------------------------------------
# Batches and log-probabilities
# -------------------------------------------------------------------------------------------------

def _unpack(model, batch):
    """batch dict -> (x, y, model kwargs) on the model's device, with clear errors for malformed batches."""
    if not isinstance(batch, dict) or "x" not in batch or "y" not in batch:
        raise ValueError("a batch must be a dict with 'x' (B, T) token ids and 'y' (B, T) targets")
    x, y = batch["x"], batch["y"]
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must both be (B, T); got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError("empty batch")
    if bool(((y != -100).sum(1) == 0).any()):
        raise ValueError("a batch row has no target tokens (all of y is -100)")
    dev = next(model.parameters()).device
    kw = {k: (batch[k].to(dev) if torch.is_tensor(batch[k]) else batch[k]) for k in MODEL_KWARGS if k in batch}
    return x.to(dev), y.to(dev), kw


def token_logprobs(model, batch):
    """(B, T) float32 log p(y_t | x_<=t); 0 where y == -100. Also returns the (B, T) bool target mask."""
    x, y, kw = _unpack(model, batch)
    return model.token_logprobs(x, y, **kw), y != -100


def sequence_logprob(model, batch):
    """(B,) log pi(y|x) = sum of the row's target-token log-probs, and (B,) |y| = its number of targets."""
    lp, m = token_logprobs(model, batch)
    return lp.sum(1), m.sum(1)


def nll_loss(model, batch):
    """Mean NLL over all target tokens of the batch (token-weighted, as Hugging Face's outputs.loss)."""
    lp, m = token_logprobs(model, batch)
    return -lp.sum() / m.sum()


def kl_loss(model, ref_model, batch, all_positions=False):
    """
    KL(p_ref || p_theta) summed over the vocabulary, averaged over the target positions (y != -100).
    open-unlearning/TOFU average over ALL B*T positions ('batchmean' on flattened logits), which lets padding
    and prompt positions count; we average over target positions by default and all_positions=True gives
    theirs.
    """
    x, y, kw = _unpack(model, batch)
    logp = torch.log_softmax(model(x, **kw)[0].float(), -1)                     # (B, T, V)
    with torch.no_grad():
        logq = torch.log_softmax(ref_model(x, **kw)[0].float(), -1)            # (B, T, V)
    kl = (logq.exp() * (logq - logp)).sum(-1)                                   # (B, T)
    if all_positions:
        return kl.mean()
    m = y != -100
    return (kl * m).sum() / m.sum()


def retain_loss(model, retain, ref_model=None, kind="nll"):
    """The retain term: 'nll' (mean token NLL) or 'kl' (KL to the reference model on the retain batch)."""
    if kind == "nll":
        return nll_loss(model, retain)
    if kind == "kl":
        if ref_model is None:
            raise ValueError("retain_kind='kl' needs a reference model")
        return kl_loss(model, ref_model, retain)
    raise ValueError(f"retain_kind must be 'nll' or 'kl', got {kind!r}")


def _with_retain(loss, model, retain, retain_weight, ref_model=None, retain_kind="nll"):
    if retain is None or retain_weight == 0:
        return loss
    return loss + retain_weight * retain_loss(model, retain, ref_model, retain_kind)


@torch.no_grad()
def _ref_sequence_logprob(ref_model, batch):
    return sequence_logprob(ref_model, batch)[0]


# -------------------------------------------------------------------------------------------------
# Gradient ascent family
# -------------------------------------------------------------------------------------------------

def ga_loss(model, forget, retain=None, *, retain_weight=0.0):
    """Gradient ascent (Jang et al. 2023): L = -NLL_forget, token mean. No retain term unless retain_weight > 0."""
    return _with_retain(-nll_loss(model, forget), model, retain, retain_weight)


def graddiff_loss(model, forget, retain, *, forget_weight=1.0, retain_weight=1.0):
    """Gradient difference: L = forget_weight * (-NLL_forget) + retain_weight * NLL_retain (token means)."""
    if retain is None:
        raise ValueError("GradDiff needs a retain batch")
    return -forget_weight * nll_loss(model, forget) + retain_weight * nll_loss(model, retain)


def ga_kl_loss(model, ref_model, forget, retain, *, forget_weight=1.0, retain_weight=1.0):
    """
    'KL minimization' (TOFU's KL baseline): gradient ascent on the forget set while minimizing
    KL(p_ref || p_theta) on the retain set: L = forget_weight * (-NLL_forget) + retain_weight * KL_retain.
    """
    if retain is None:
        raise ValueError("the KL objective needs a retain batch")
    return -forget_weight * nll_loss(model, forget) + retain_weight * kl_loss(model, ref_model, retain)


def wga_loss(model, forget, retain=None, *, alpha=0.1, retain_weight=1.0, ref_model=None, retain_kind="nll"):
    """
    Weighted gradient ascent (Wang et al. 2025; localization paper App. A), per sequence:
        L = E_rows[ sum_t w_t * log p_t ],  w_t = p_t^alpha, detached (a weight, not a path for gradients).
    Minimizing it lowers log p_t, most for the tokens the model is confident about. The localization paper
    prints the loss with a leading minus, which would *raise* the likelihood (learning, not unlearning); we
    take the ascent direction its text describes. open-unlearning uses a token mean instead of the
    per-sequence sum; alpha is the paper's exponent (0.1 there; OU calls it beta).
    """
    lp, m = token_logprobs(model, forget)
    w = lp.detach().exp().pow(alpha) * m                                        # (B, T)
    return _with_retain((w * lp).sum(1).mean(), model, retain, retain_weight, ref_model, retain_kind)


@torch.no_grad()
def teacher_forced_accuracy(model, batch):
    """
    (B,) fraction of target tokens the model predicts by greedy argmax from the true prefix: the per-sequence
    memorization accuracy MA of Jang et al. (their T-1 one-token generations equal one teacher-forced pass).
    eval.py owns the metric; SGA needs it here to select sequences.
    """
    x, y, kw = _unpack(model, batch)
    pred = model(x, **kw)[0].argmax(-1)                                         # (B, T)
    m = y != -100
    return ((pred == y) & m).sum(1).float() / m.sum(1)


def sga_loss(model, forget, retain=None, *, threshold=0.7, top_k=1, scores=None, retain_weight=0.0):
    """
    Selective gradient ascent (Barbulescu & Triantafillou 2024, as NeuMuter compares against it): ascend only
    on the rows whose memorization score is above `threshold` (default: MA from teacher_forced_accuracy,
    recomputed on the current model every call, so the target set shrinks as unlearning proceeds); when none
    is above, ascend on the top_k most memorized rows (NeuMuter: threshold 70%, k = 1).
    L = -NLL over the selected rows' target tokens (token mean).
    """
    if scores is None:
        scores = teacher_forced_accuracy(model, forget)
    scores = torch.as_tensor(scores, device=forget["x"].device)
    if scores.shape != (forget["x"].shape[0],):
        raise ValueError(f"scores must have one entry per row, got shape {tuple(scores.shape)}")
    sel = scores > threshold                                                    # (B,)
    if not bool(sel.any()) and top_k > 0:
        sel[torch.topk(scores, min(top_k, len(scores))).indices] = True
    lp, m = token_logprobs(model, forget)
    m = m & sel.to(m.device)[:, None]
    # no row selected: a zero that still has a graph, so the loop's backward works and nothing moves
    loss = -(-lp * m).sum() / m.sum().clamp(min=1)
    return _with_retain(loss, model, retain, retain_weight)


# -------------------------------------------------------------------------------------------------
# Preference-optimization family
# -------------------------------------------------------------------------------------------------

def npo_loss(model, ref_model, forget, retain=None, *, beta=0.5, retain_weight=1.0, retain_kind="nll"):
    """
    Negative preference optimization (Zhang et al. 2024; localization paper App. A), per sequence:
        L = -(2/beta) * mean_rows log sigmoid(-beta * [log pi_theta(y|x) - log pi_ref(y|x)])
    with summed (not length-normalized) log-probs. At theta = ref every row contributes (2/beta) log 2.
    """
    lp = sequence_logprob(model, forget)[0]                                     # (B,)
    ratio = lp - _ref_sequence_logprob(ref_model, forget)
    loss = -(2.0 / beta) * F.logsigmoid(-beta * ratio).mean()
    return _with_retain(loss, model, retain, retain_weight, ref_model, retain_kind)


def simnpo_loss(model, forget, retain=None, *, beta=2.5, margin=0.0, retain_weight=1.0, ref_model=None,
                retain_kind="nll"):
    """
    SimNPO (Fan et al. 2024), reference-free and length-normalized, per sequence:
        L = -(2/beta) * mean_rows log sigmoid(-(beta/|y|) log pi_theta(y|x) - margin)
    `margin` is the paper's gamma; open-unlearning's delta enters as beta*delta, so margin = beta*delta.
    beta = 2.5 with margin 0 is our default (open-unlearning's TOFU config uses beta 4.5).
    """
    lp, n = sequence_logprob(model, forget)
    loss = -(2.0 / beta) * F.logsigmoid(-(beta / n) * lp - margin).mean()
    return _with_retain(loss, model, retain, retain_weight, ref_model, retain_kind)


def dpo_loss(model, ref_model, forget, winner, retain=None, *, beta=0.5, retain_weight=1.0, retain_kind="nll"):
    """
    DPO for unlearning (localization paper App. A): the forget answer loses to `winner` (same questions):
        L = -(1/beta) * mean_rows log sigmoid(beta * [(log pi_theta(y_w) - log pi_ref(y_w))
                                                     - (log pi_theta(y_l) - log pi_ref(y_l))])
    summed log-probs. We follow the paper's 1/beta; open-unlearning uses 2/beta (the same gradient at twice
    the learning rate). At theta = ref every row contributes (1/beta) log 2.
    """
    if winner["x"].shape[0] != forget["x"].shape[0]:
        raise ValueError("winner and forget batches must have the same rows (one winner per forget answer)")
    lose = sequence_logprob(model, forget)[0] - _ref_sequence_logprob(ref_model, forget)      # (B,)
    win = sequence_logprob(model, winner)[0] - _ref_sequence_logprob(ref_model, winner)       # (B,)
    loss = -(1.0 / beta) * F.logsigmoid(beta * (win - lose)).mean()
    return _with_retain(loss, model, retain, retain_weight, ref_model, retain_kind)


def idkdpo_loss(model, ref_model, forget, idk, retain=None, *, beta=0.5, retain_weight=1.0, retain_kind="nll"):
    """IdkDPO (Maini et al. 2024): DPO where the winner is an "I don't know" answer to the same question."""
    return dpo_loss(model, ref_model, forget, idk, retain, beta=beta, retain_weight=retain_weight,
                    retain_kind=retain_kind)


def altpo_loss(model, ref_model, forget, alternates, retain=None, *, beta=0.5, retain_weight=1.0,
               retain_kind="nll"):
    """
    AltPO (Mekala et al. 2024): DPO where the winner is a plausible alternative (false) answer. `alternates` is
    one batch or a list of them (several alternatives per question); the loss is the mean of the DPO losses
    against each. The authors' code pairs one sampled alternative per step; averaging over all given
    alternatives is our choice, the same in expectation.
    """
    alts = alternates if isinstance(alternates, (list, tuple)) else [alternates]
    if not alts:
        raise ValueError("AltPO needs at least one alternative-answer batch")
    loss = sum(dpo_loss(model, ref_model, forget, a, beta=beta, retain_weight=0.0) for a in alts) / len(alts)
    return _with_retain(loss, model, retain, retain_weight, ref_model, retain_kind)


def idknll_loss(model, idk, retain=None, *, retain_weight=1.0):
    """IdkNLL (TOFU's 'idk'): learn the "I don't know" answers to the forget questions: NLL_idk + w * NLL_retain."""
    return _with_retain(nll_loss(model, idk), model, retain, retain_weight)


# -------------------------------------------------------------------------------------------------
# Distillation and representation objectives
# -------------------------------------------------------------------------------------------------

def undial_loss(model, ref_model, forget, retain=None, *, beta=8.0, retain_weight=0.0):
    """
    UNDIAL / Deliberate Imagination (Dong et al. 2024): self-distillation towards the frozen teacher's
    logits with the true token's logit lowered by beta:
        target_t = softmax(z_ref_t - beta * onehot(y_t)),  L = mean_t CE(target_t, p_theta_t)
    over the target tokens. The open-unlearning code has no -100 mask: it distills at prompt/pad positions
    and its onehot(-100) writes into vocabulary slot V-100; we use target positions only.
    (NeuMuter sets the strength to 8; open-unlearning's default is 10.)
    """
    x, y, kw = _unpack(model, forget)
    m = y != -100
    logp = torch.log_softmax(model(x, **kw)[0].float(), -1)                     # (B, T, V)
    with torch.no_grad():
        z = ref_model(x, **kw)[0].float()                                       # (B, T, V)
        z = z - beta * F.one_hot(y.clamp(min=0), z.size(-1)).float()
        target = torch.softmax(z, -1)
    ce = -(target * logp).sum(-1)                                               # (B, T)
    return _with_retain((ce * m).sum() / m.sum(), model, retain, retain_weight)


class _StopForward(Exception):
    pass


@contextmanager
def capture_outputs(modules, stop_after=None):
    """
    Forward hooks that store each module's output in a list (in the order given). If stop_after is one of
    the modules, the forward is aborted right after it (nothing later is needed, e.g. the LM head); the
    caller runs the forward inside `run_until_captured`.
    """
    outs = [None] * len(modules)

    def hook(i, mod):
        def fn(_m, _inp, out):
            outs[i] = out
            if mod is stop_after:
                raise _StopForward
        return fn

    handles = [mod.register_forward_hook(hook(i, mod)) for i, mod in enumerate(modules)]
    try:
        yield outs
    finally:
        for h in handles:
            h.remove()


def _run(model, x, kw):
    try:
        model(x, **kw)
    except _StopForward:
        pass


def residual_after(model, batch, layer):
    """(B, T, d) residual stream after block `layer` (the output of model.blocks[layer]), via a forward hook."""
    x, _, kw = _unpack(model, batch)
    blk = model.blocks[layer]
    with capture_outputs([blk], stop_after=blk) as outs:
        _run(model, x, kw)
    return outs[0]


def mlp_outputs(model, batch, layers):
    """List of (B, T, d) MLP outputs (model.blocks[l].mlp, before any adapter) for the given layers."""
    x, _, kw = _unpack(model, batch)
    mods = [model.blocks[l].mlp for l in layers]
    with capture_outputs(mods, stop_after=mods[max(range(len(layers)), key=lambda i: layers[i])]) as outs:
        _run(model, x, kw)
    return outs


def rmu_control_vector(n_embd, seed=0):
    """RMU's fixed random direction u: uniform [0, 1) entries, scaled to unit L2 norm, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n_embd, generator=g, dtype=torch.float64)
    return (u / u.norm()).float()


def rmu_loss(model, ref_model, forget, retain=None, *, layer, c=2.0, retain_weight=1.0, u=None, seed=0):
    """
    Representation misdirection (Li et al. 2024; localization paper App. A), per sequence:
        forget: mean_rows (1/|y|) sum_t || h_theta(t) - c*u ||_2^2
        retain: mean_rows (1/|y|) sum_t || h_theta(t) - h_frozen(t) ||_2^2      (frozen = ref_model)
    h = residual stream after block `layer`, over the target tokens (y != -100; open-unlearning's choice,
    WMDP's original uses every token). The paper writes the squared L2 norm; WMDP and open-unlearning use
    an MSE (the same divided by d). u is fixed: rmu_control_vector(d, seed) unless given. c = 2 is the paper's
    (an 8B model); c must be of the order of the layer's activation norm, see DEFAULTS. Which parameters
    move is the loop's `region` (WMDP: the MLP down projections of layers layer-2..layer).
    """
    if u is None:
        u = rmu_control_vector(model.cfg.n_embd, seed)
    _, y, _ = _unpack(model, forget)
    h = residual_after(model, forget, layer).float()                            # (B, T, d)
    m = (y != -100).float()
    d2 = (h - c * u.to(h.device)).pow(2).sum(-1)                                # (B, T)
    loss = ((d2 * m).sum(1) / m.sum(1)).mean()
    if retain is not None and retain_weight != 0:
        _, yr, _ = _unpack(model, retain)
        hr = residual_after(model, retain, layer).float()
        with torch.no_grad():
            hf = residual_after(ref_model, retain, layer).float()
        mr = (yr != -100).float()
        loss = loss + retain_weight * (((hr - hf).pow(2).sum(-1) * mr).sum(1) / mr.sum(1)).mean()
    return loss


def l2_mlp_loss(model, target_model, forget, retain=None, *, layers=None, retain_weight=0.0):
    """
    The localization paper's direct objective (Sec. 4, Fig. 1): make every layer's MLP output match the
    target model's (theta_r, never trained on the forget set) on the forget inputs:
        L = sum_layers mean_t || m_theta^l(t) - m_target^l(t) ||_2^2
    over the target tokens (token mean over the batch; the paper gives no reduction). layers=None = all.
    """
    layers = list(range(model.cfg.n_layer)) if layers is None else list(layers)
    if not layers:
        raise ValueError("l2_mlp_loss needs at least one layer")
    _, y, _ = _unpack(model, forget)
    m = (y != -100).float()
    cur = mlp_outputs(model, forget, layers)
    with torch.no_grad():
        tgt = mlp_outputs(target_model, forget, layers)
    loss = sum(((a.float() - b.float()).pow(2).sum(-1) * m).sum() for a, b in zip(cur, tgt)) / m.sum()
    return _with_retain(loss, model, retain, retain_weight)


# -------------------------------------------------------------------------------------------------
# The loop
# -------------------------------------------------------------------------------------------------

@dataclass
class UnlearnResult:
    trajectory: list        # [{"step", "loss" (mean since the previous record; None at step 0), **metrics}]
    losses: list            # the objective at every step
    steps: int              # optimizer steps taken
    stopped: bool           # True if stop_fn ended the run
    wall_time: float        # seconds for the whole call, metrics and stop checks included
    train_time: float       # seconds in objective, backward and optimizer steps only (the runtime tables)
    info: dict = field(default_factory=dict)


def unlearn(model, objective, forget_batches, retain_batches=None, *, epochs=None, steps=None, lr=1e-4,
            optimizer="adamw", weight_decay=0.0, betas=(0.9, 0.999), momentum=0.0, grad_clip=None,
            warmup_steps=0, region=None, stop_fn=None, metrics_fn=None, eval_every=10, amp=False):
    """
    Run objective(model, forget=f, retain=r) -> loss for `epochs` passes over forget_batches or `steps`
    optimizer steps, pairing forget batch i with retain batch i mod len(retain_batches).

    Every eval_every steps (and before the first and after the last) metrics_fn(model, step) -> dict is
    recorded into the trajectory and stop_fn(model, step) -> bool may end the run (e.g. MA and EL below their
    thresholds); both run in eval mode without gradients.

    region (see value_vector_region, named_region, resolve_region): only those entries move, EXACTLY.
    Parameters outside it get requires_grad False for the run (restored after); inside a masked
    parameter, the masked-out entries' gradients are zeroed AND their saved values are written back after
    every optimizer step, because AdamW's decoupled weight decay (and any momentum) would otherwise move
    entries whose gradient is zero. region=None trains every parameter that currently requires grad.
    AdamW decays only matrices (dim >= 2), as nanoGPT. Returns an UnlearnResult.
    """
    forget_batches, retain_batches, total = _unlearn_schedule(forget_batches, retain_batches, epochs, steps,
                                                              eval_every)
    t_start = time.perf_counter()
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    # what moves: the region's parameters (requires_grad), with saved copies of the masked ones
    params, frozen = _train_only(model, region)
    opt, sched = _unlearn_optimizer(params, optimizer, lr, weight_decay, betas, momentum, warmup_steps)
    use_amp = amp and params[0].device.type == "cuda"

    trajectory, losses, train_time, stopped, since = [], [], 0.0, False, []

    def checkpoint(step):       # metrics and the stop check, in eval mode without gradients
        model.eval()
        with torch.no_grad():
            rec = {"step": step, "loss": sum(since) / len(since) if since else None}
            if metrics_fn is not None:
                rec.update(metrics_fn(model, step))
            stop = bool(stop_fn(model, step)) if stop_fn is not None else False
        trajectory.append(rec)
        since.clear()
        return stop

    step = 0
    try:
        stopped = checkpoint(0)
        while step < total and not stopped:
            t0 = time.perf_counter()
            model.train()
            fb = forget_batches[step % len(forget_batches)]
            rb = retain_batches[step % len(retain_batches)] if retain_batches else None
            loss = _unlearn_step(model, objective, fb, rb, opt, sched, params, frozen, grad_clip, use_amp, step)
            step += 1
            losses.append(loss.item())
            since.append(losses[-1])
            train_time += time.perf_counter() - t0
            if step % eval_every == 0 or step == total:
                stopped = checkpoint(step)
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)
    return UnlearnResult(trajectory, losses, step, stopped, time.perf_counter() - t_start, train_time)


def _unlearn_schedule(forget_batches, retain_batches, epochs, steps, eval_every):
    """unlearn's batches as lists (a single dict is one batch) and its number of steps; bad arguments raise."""
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs or steps")
    if isinstance(forget_batches, dict):
        forget_batches = [forget_batches]
    forget_batches = list(forget_batches)
    if not forget_batches:
        raise ValueError("no forget batches")
    if retain_batches is not None:
        retain_batches = [retain_batches] if isinstance(retain_batches, dict) else list(retain_batches)
        if not retain_batches:
            raise ValueError("retain_batches is empty; pass None for no retain set")
    total = steps if steps is not None else epochs * len(forget_batches)
    if total < 0 or eval_every < 1:
        raise ValueError("steps/epochs must be >= 0 and eval_every >= 1")
    return forget_batches, retain_batches, total


def _train_only(model, region):
    """Set requires_grad on the region's parameters only (every trainable one when region is None); returns
    (params, frozen): frozen = (parameter, mask, full copy) of each partially-frozen parameter, of which only the
    masked-out entries are ever read back."""
    if region is None:
        entries = [(n, p, None) for n, p in model.named_parameters() if p.requires_grad]
        if not entries:
            raise ValueError("no trainable parameters")
    else:
        entries = resolve_region(model, region)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p, _ in entries:
        p.requires_grad_(True)
    params = [p for _, p, _ in entries]
    frozen = [(p, m, p.detach().clone()) for _, p, m in entries if m is not None]
    return params, frozen


def _unlearn_optimizer(params, optimizer, lr, weight_decay, betas, momentum, warmup_steps):
    """(optimizer, linear-warmup scheduler): AdamW decays matrices only (dim >= 2), as nanoGPT; or SGD."""
    if optimizer == "adamw":
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0)
    return opt, sched


def _unlearn_step(model, objective, fb, rb, opt, sched, params, frozen, grad_clip, use_amp, step):
    """One optimizer step on objective(model, forget=fb, retain=rb); the masked-out entries of the frozen
    parameters get no gradient and their saved values back (weight decay and momentum move them otherwise).
    Returns the loss (a tensor)."""
    with torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else nullcontext():
        loss = objective(model, forget=fb, retain=rb)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"objective is {loss.item()} at step {step}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for p, m, _ in frozen:
        if p.grad is not None:
            p.grad.mul_(m)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()
    with torch.no_grad():
        for p, m, orig in frozen:
            p.copy_(torch.where(m, p, orig))
    return loss


# -------------------------------------------------------------------------------------------------
# Task arithmetic
# -------------------------------------------------------------------------------------------------

@torch.no_grad()
def negate_task_vector(model, finetuned, tau):
    """In place: theta <- theta - tau * (theta_ft - theta) for every parameter (Ilharco et al. 2023)."""
    ft = dict(finetuned.named_parameters())
    for name, p in model.named_parameters():
        if name not in ft or ft[name].shape != p.shape:
            raise ValueError(f"fine-tuned model does not match the model at parameter {name}")
        p.sub_(tau * (ft[name] - p))
    return model


def task_arithmetic(model, forget_batches, *, tau=3.0, lr=1e-3, epochs=None, steps=None, optimizer="adamw",
                    weight_decay=0.0, region=None, metrics_fn=None, **loop_kw):
    """
    Task arithmetic unlearning (TA, Ilharco et al. 2023, as NeuMuter compares against it with tau = 3):
    fine-tune a copy on the forget set (NLL, with the loop, so `region` restricts the task vector exactly),
    then subtract tau times the task vector from the model in place. metrics_fn is recorded once, on the
    final model. info["finetuned"] holds the fine-tuned copy (for sweeps over tau).
    """
    t0 = time.perf_counter()
    ft = copy.deepcopy(model)
    res = unlearn(ft, lambda m, forget, retain: nll_loss(m, forget), forget_batches, epochs=epochs, steps=steps,
                  lr=lr, optimizer=optimizer, weight_decay=weight_decay, region=region, **loop_kw)
    negate_task_vector(model, ft, tau)
    traj = [{"step": res.steps, "loss": None}]
    if metrics_fn is not None:
        was = model.training
        model.eval()
        with torch.no_grad():
            traj[0].update(metrics_fn(model, res.steps))
        model.train(was)
    return UnlearnResult(traj, res.losses, res.steps, False, time.perf_counter() - t0, res.train_time,
                         {"finetuned": ft})


# -------------------------------------------------------------------------------------------------
# Objectives by name, with the defaults chosen for the built-in data
# -------------------------------------------------------------------------------------------------

def _needs(forget, key, name):
    if key not in forget:
        raise KeyError(f"objective {name!r} needs the paired batch under forget[{key!r}]")
    return forget[key]


def make_objective(name, ref_model=None, **hp):
    """
    Bind objective `name` into the loop's form f(model, forget=..., retain=...). ref_model is the frozen
    reference (NPO, DPO family, KL, UNDIAL, RMU's frozen model) or the target model theta_r (l2); it is put
    in eval mode with gradients off. Paired batches ride in the forget batch: "winner" (dpo), "idk"
    (idkdpo, idknll), "alt" (altpo: a batch or a list of batches). Unknown names and hyperparameters are errors.
    """
    needs_ref = {"kl", "npo", "dpo", "idkdpo", "altpo", "undial", "rmu", "l2"}
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    if name in needs_ref and ref_model is None:
        raise ValueError(f"objective {name!r} needs a reference model")
    if ref_model is not None:
        ref_model.eval()
        ref_model.requires_grad_(False)
    fn = OBJECTIVES[name]
    if name == "rmu":
        hp.setdefault("layer", (2 * ref_model.cfg.n_layer) // 3)
        hp.setdefault("u", rmu_control_vector(ref_model.cfg.n_embd, hp.pop("seed", 0)))
    allowed = {p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY}
    bad = set(hp) - allowed
    if bad:
        raise ValueError(f"unknown hyperparameters {sorted(bad)} for {name!r}; valid: {sorted(allowed)}")
    if name == "simnpo" or name == "wga":
        hp.setdefault("ref_model", ref_model)

    def objective(model, forget, retain=None):
        if ref_model is model:
            raise ValueError("the reference model must be a separate (frozen) copy")
        if name in ("ga", "graddiff", "simnpo", "wga", "sga"):
            return fn(model, forget, retain, **hp)
        if name == "idknll":
            return fn(model, _needs(forget, "idk", name), retain, **hp)
        if name == "dpo":
            return fn(model, ref_model, forget, _needs(forget, "winner", name), retain, **hp)
        if name == "idkdpo":
            return fn(model, ref_model, forget, _needs(forget, "idk", name), retain, **hp)
        if name == "altpo":
            return fn(model, ref_model, forget, _needs(forget, "alt", name), retain, **hp)
        return fn(model, ref_model, forget, retain, **hp)          # kl, npo, undial, rmu, l2
    objective.__name__ = f"{name}_objective"
    return objective


# Defaults for the built-in data: the word-level world's QA (vocabulary ~470), a 4-layer d=128 GPT that has
# memorized it, forget10 (100 QA), batches of 20 forget (+ 20 retain) QA, full-parameter AdamW without weight
# decay, 50 steps. Chosen from a small lr sweep on 2 CPU threads (a throwaway calibration, not in the repo);
# the comment gives teacher-forced accuracy on the value tokens (forget unique facts / retain) after 50 steps,
# from 0.99 / 1.00 before. The ascent family (ga, wga, sga, graddiff, kl) keeps degrading the model with more
# steps: run it with a stop rule (stop_fn). hp are make_objective's keyword arguments; "ta" is task_arithmetic.
DEFAULTS = {
    "ga":       dict(lr=1e-4, hp={}),                                   # 0.72 / 0.92, retain NLL 2.7 (collapsing)
    "graddiff": dict(lr=3e-4, hp=dict(forget_weight=1.0, retain_weight=1.0)),   # ~0.5 / 0.91
    "kl":       dict(lr=3e-4, hp=dict(forget_weight=1.0, retain_weight=1.0)),   # ~0.5 / 0.85
    "npo":      dict(lr=3e-3, hp=dict(beta=0.5, retain_weight=1.0)),    # 0.29 / 0.90
    "simnpo":   dict(lr=3e-3, hp=dict(beta=2.5, margin=0.0, retain_weight=1.0)),  # 0.22 / 0.93
    "dpo":      dict(lr=1e-2, hp=dict(beta=0.5, retain_weight=1.0)),    # as idkdpo
    "idkdpo":   dict(lr=1e-2, hp=dict(beta=0.5, retain_weight=1.0)),    # 0.23 / 0.66 (at 3e-3 it barely forgets)
    "altpo":    dict(lr=1e-2, hp=dict(beta=0.5, retain_weight=1.0)),    # 0.25 / 0.60 (at 3e-3: 0.82 / 0.99)
    "idknll":   dict(lr=1e-3, hp=dict(retain_weight=1.0)),              # 0.90 / 1.00: the values survive teacher forcing
    "wga":      dict(lr=1e-4, hp=dict(alpha=0.1, retain_weight=1.0)),   # 0.60 / 0.92, retain NLL 2.0
    "undial":   dict(lr=1e-3, hp=dict(beta=8.0)),                       # 0.28 / 0.87
    "sga":      dict(lr=1e-4, hp=dict(threshold=0.7, top_k=1)),         # 0.68 / 0.93
    # c ~ the typical residual-stream norm at the hooked layer (~120 at layer 2 of this model), all parameters
    "rmu":      dict(lr=3e-3, hp=dict(layer=2, c=120.0, retain_weight=1.0)),      # 0.10 / 0.85
    "l2":       dict(lr=1e-2, hp=dict()),      # restricted to 10% random value vectors: L2 7821 -> 3138 in 50 steps
    "ta":       dict(lr=3e-4, hp=dict(tau=3.0)),                        # 0.44 / 0.78 (50 fine-tuning steps)
}

OBJECTIVES = {
    "ga": ga_loss, "graddiff": graddiff_loss, "kl": ga_kl_loss, "wga": wga_loss, "sga": sga_loss,
    "npo": npo_loss, "simnpo": simnpo_loss, "dpo": dpo_loss, "idkdpo": idkdpo_loss, "altpo": altpo_loss,
    "idknll": idknll_loss, "undial": undial_loss, "rmu": rmu_loss, "l2": l2_mlp_loss,
}
