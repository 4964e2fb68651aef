"""
Parameter attribution shared by the paper scripts: which neurons or value vectors hold what a set of
sequences made the model learn. memsinks.py compares its sinks with these post-hoc localizers,
neumuter.py learns hard-concrete neuron gates, locprobe.py asks whether any localizer beats a random region.

- Hard-concrete gates (Louizos, Welling, Kingma 2018, "Learning Sparse Neural Networks through L0
  Regularization", arXiv:1712.01312) and Chang et al.'s hard-concrete localizer (2024, "Do Localization
  Methods Actually Localize Memorized Data in LLMs?", arXiv:2311.09060).
- Integrated gradients over MLP neurons (Sundararajan et al. 2017; the knowledge-neuron form of Dai et al.).
- Value-vector regions: value vector i of layer l is column i of that layer's down projection (Geva et al.);
  a region maps parameter names to bool masks, and baselines.unlearn moves only the masked entries.
- top_fraction: the top r of a score, per layer or over all layers.
"""
import math
import re
from contextlib import contextmanager

import torch

# -------------------------------------------------------------------------------------------------
# Post-hoc neuron localizers (MemSinks Section 3 / Appendix C use them; Chang et al. 2024)
# -------------------------------------------------------------------------------------------------
# Both localizers score every MLP neuron of layers >= first_layer on the repeated set, and the top r fraction
# of each layer is dropped (Appendix C). Chang et al. localize one example at a time; we localize the whole
# repeated set at once: that is the unlearning target MemSinks removes in one go, and per-example
# localization of 100 sequences would cost 100 times as much. Chang et al. skip layer 0; first_layer=1 does.

HC_GAMMA, HC_ZETA = -0.1, 1.1      # the hard concrete's stretch interval (Louizos et al.), as in Chang et al.


def hc_init_log_alpha(mask_p):
    """log_alpha that gives a deterministic gate of mask_p: logit((mask_p - gamma) / (zeta - gamma))."""
    q = (mask_p - HC_GAMMA) / (HC_ZETA - HC_GAMMA)
    return math.log(q / (1 - q))


def hc_gate(log_alpha, beta, u=None):
    """Hard-concrete gate in [0, 1]. With uniform noise u (training):
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta); without (evaluation): s = sigmoid(log_alpha).
    Then gate = clamp(s (zeta - gamma) + gamma, 0, 1)."""
    z = log_alpha if u is None else (torch.log(u) - torch.log1p(-u) + log_alpha) / beta
    return (torch.sigmoid(z) * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0, 1)


def hc_open_prob(log_alpha, beta):
    """P(gate != 0) = sigmoid(log_alpha - beta log(-gamma / zeta)), the expected L0 norm per gate."""
    return torch.sigmoid(log_alpha - beta * math.log(-HC_GAMMA / HC_ZETA))


@contextmanager
def _frozen(model):
    """Eval mode with every parameter frozen for the duration (localizers differentiate only their masks)."""
    state, was = [(p, p.requires_grad) for p in model.parameters()], model.training
    for p, _ in state:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, r in state:
            p.requires_grad_(r)
        model.train(was)


def hard_concrete_scores(model, rows, *, steps=150, lr=0.05, lam=5.0, beta=0.33, mask_p=0.9, stop=0.4,
                         batch_size=32, first_layer=0, seed=0, log=None):
    """Chang et al.'s Hard Concrete localizer: a gate per MLP neuron (one noise draw per neuron per forward,
    shared by every token), trained with Adam to keep the repeated sequences' loss low while an L0 penalty
    closes gates: loss = LM loss + lam * mean over layers of mean P(gate != 0). Stops after `steps` or once
    the penalty is below `stop`. Score = sigmoid(log_alpha): the gates the memorized text needs stay open.
    rows: dict with x, y (and optional doc_ids). Returns a list of (d_ff,) scores, None for skipped layers."""
    if len(rows["x"]) == 0:
        raise ValueError("no sequences to localize")
    L, d_ff = model.cfg.n_layer, model.cfg.d_ff
    dev = next(model.parameters()).device
    log_alpha = torch.full((L - first_layer, d_ff), hc_init_log_alpha(mask_p), device=dev, requires_grad=True)
    opt = torch.optim.Adam([log_alpha], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    N = len(rows["x"])
    with _frozen(model):
        for step in range(steps):
            idx = torch.randint(0, N, (min(batch_size, N),), generator=gen)
            b = batch_rows(rows, idx, dev)
            u = torch.rand(log_alpha.shape, generator=gen).clamp(1e-6, 1 - 1e-6).to(dev)
            gates = hc_gate(log_alpha, beta, u)
            _, lm = model(b["x"], b["y"], mlp_mask=[None] * first_layer + list(gates), doc_ids=b.get("doc_ids"))
            reg = hc_open_prob(log_alpha, beta).mean(1).mean()
            (lm + lam * reg).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if log and (step % 25 == 0 or step == steps - 1):
                log(f"hard concrete {step}: lm {lm.item():.3f} open {reg.item():.3f}")
            if reg.item() < stop:
                break
    scores = torch.sigmoid(log_alpha.detach())
    return [None] * first_layer + list(scores)


def _true_token_prob(model, b, masks):
    """(B, T) probability of each target token (0 where y = -100) under per-layer masks."""
    logits, _ = model(b["x"], mlp_mask=masks, doc_ids=b.get("doc_ids"))
    keep = b["y"] != -100
    p = torch.softmax(logits.float(), -1).gather(-1, b["y"].clamp(min=0)[..., None])[..., 0]
    return p * keep


def ig_alphas(steps):
    """Midpoint rule on [0, 1]: alpha_k = (k + 1/2) / steps. Chang et al.'s code averages linspace(0, 1, m)
    (end points included); both approximate the same integral, the midpoint rule to O(1/m^2)."""
    return [(k + 0.5) / steps for k in range(steps)]


def integrated_gradients_scores(model, rows, *, steps=16, first_layer=0, positions="all", batch_size=64):
    """Integrated gradients (baseline 0) of the true-token probability with respect to each layer's MLP hidden
    activations a, one layer at a time: IG_i = a_i * integral_0^1 dF(alpha a)/d a_i d alpha, summed over the
    sequences' positions. The gradient of F with respect to a per-neuron scale s on the activations is exactly
    sum_t a_t,i dF/da_t,i, so each alpha costs one forward and backward with mlp_mask = alpha * ones.
    positions="all": F = sum over targets of p(true token), the whole layer scaled along the path (one path per
               layer and batch; the default, cheap).
    positions="each": Chang et al.'s knowledge-neuron form: for every target position t separately only a_t is
               scaled and F = p_t; attributions are averaged over positions. T times as costly.
    Returns a list of (d_ff,) scores (None for skipped layers)."""
    if positions not in ("all", "each"):
        raise ValueError(f"positions must be 'all' or 'each', got {positions!r}")
    N = len(rows["x"])
    if N == 0:
        raise ValueError("no sequences to localize")
    L, d_ff = model.cfg.n_layer, model.cfg.d_ff
    dev = next(model.parameters()).device
    out = [None] * first_layer
    with _frozen(model):
        for layer in range(first_layer, L):
            total = torch.zeros(d_ff, dtype=torch.float64, device=dev)
            for i in range(0, N, batch_size):
                b = batch_rows(rows, torch.arange(i, min(N, i + batch_size)), dev)
                for alpha in ig_alphas(steps):
                    if positions == "all":
                        s = torch.full((d_ff,), alpha, device=dev, requires_grad=True)
                        masks = [None] * L
                        masks[layer] = s
                        _true_token_prob(model, b, masks).sum().backward()
                        total += s.grad.double()
                    else:
                        total += _ig_each_position(model, b, layer, alpha)
            n_pos = int((rows["y"] != -100).sum()) if positions == "each" else 1
            out.append((total / steps / n_pos).float())
    return out


def _ig_each_position(model, b, layer, alpha):
    """Sum over the batch's target positions t of dp_t/ds_t, where only position t's activation is scaled by
    alpha (a copy of each row per target position; causal attention keeps p_t blind to later positions)."""
    L, d_ff = model.cfg.n_layer, model.cfg.d_ff
    r, t = (b["y"] != -100).nonzero(as_tuple=True)                       # one copy per target (row r, position t)
    T = b["x"].shape[1]
    s = torch.ones(len(r), T, d_ff, device=b["x"].device)
    s[torch.arange(len(r)), t] = alpha
    s.requires_grad_(True)
    masks = [None] * L
    masks[layer] = s
    rep = {k: v[r] for k, v in b.items()}
    p = _true_token_prob(model, rep, masks)                              # (R, T)
    p[torch.arange(len(r)), t].sum().backward()
    return s.grad[torch.arange(len(r)), t].double().sum(0)


def drop_top(scores, r):
    """Per-layer masks that zero the top round(r * d_ff) neurons of each scored layer (None elsewhere)."""
    if not 0 <= r <= 1:
        raise ValueError(f"drop ratio must be in [0, 1], got {r}")
    masks = []
    for s in scores:
        if s is None:
            masks.append(None)
            continue
        m = torch.ones_like(s)
        m[torch.topk(s, int(round(r * len(s)))).indices] = 0.0
        masks.append(m)
    return masks


def batch_rows(rows, idx, device):
    """Rows idx of the per-row tensors, trailing columns without targets cut, on device."""
    y = rows["y"][idx]
    T = int((y != -100).any(0).nonzero().max()) + 1 if bool((y != -100).any()) else y.shape[1]
    return {k: v[idx][:, :T].to(device) for k, v in rows.items() if torch.is_tensor(v) and v.dim() == 2}


# -------------------------------------------------------------------------------------------------
# Config


# -------------------------------------------------------------------------------------------------
# Parameter regions
# -------------------------------------------------------------------------------------------------

def value_vector_region(model, selection, include_up_gate=False):
    """
    {layer: [value-vector indices]} -> {parameter name: bool mask}. Value vector i of layer l is column i of
    blocks[l].mlp.down.weight (Geva et al.); include_up_gate also frees its key: row i of mlp.up.weight
    (and mlp.gate.weight for llama) and entry i of their biases. The down bias is shared by all value
    vectors, so it is never in the region.
    """
    if not selection:
        raise ValueError("empty value-vector selection")
    region = {}
    for layer, idx in selection.items():
        if not 0 <= layer < len(model.blocks):
            raise ValueError(f"layer {layer} out of range (model has {len(model.blocks)})")
        mlp = model.blocks[layer].mlp
        d_ff = mlp.down.weight.shape[1]
        idx = torch.as_tensor(list(idx), dtype=torch.long)
        if idx.numel() == 0:
            raise ValueError(f"no value vectors selected in layer {layer}")
        if int(idx.min()) < 0 or int(idx.max()) >= d_ff:
            raise ValueError(f"value-vector index out of range [0, {d_ff}) in layer {layer}")
        col = torch.zeros(d_ff, dtype=torch.bool)
        col[idx] = True
        pre = f"blocks.{layer}.mlp."
        region[pre + "down.weight"] = col[None, :].expand_as(mlp.down.weight).clone()
        if include_up_gate:
            for lin in ("up", "gate"):
                mod = getattr(mlp, lin, None)
                if mod is None:
                    continue
                region[pre + lin + ".weight"] = col[:, None].expand_as(mod.weight).clone()
                if mod.bias is not None:
                    region[pre + lin + ".bias"] = col.clone()
    return region


def named_region(model, pattern):
    """Whole parameters whose names match the regular expression `pattern` -> {name: True}."""
    region = {n: True for n, _ in model.named_parameters() if re.search(pattern, n)}
    if not region:
        raise ValueError(f"no parameter name matches {pattern!r}")
    return region


def resolve_region(model, region):
    """
    region -> list of (name, parameter, bool mask or None = whole parameter). A region maps parameter names
    (or the parameters themselves) to a bool mask of the parameter's shape, or True for the whole tensor.
    """
    params = dict(model.named_parameters())
    by_id = {id(p): n for n, p in params.items()}
    out = []
    for key, mask in region.items():
        name = key if isinstance(key, str) else by_id.get(id(key))
        if name not in params:
            raise ValueError(f"region names a parameter the model does not have: {key if isinstance(key, str) else 'tensor'}")
        p = params[name]
        if mask is True:
            out.append((name, p, None))
            continue
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool or mask.shape != p.shape:
            raise ValueError(f"mask for {name} must be a bool tensor of shape {tuple(p.shape)}")
        if bool(mask.any()):
            out.append((name, p, mask.to(p.device)))
    if not out:
        raise ValueError("the region is empty")
    return out


def region_size(model, region):
    """Number of parameter entries the region lets move."""
    return sum(p.numel() if m is None else int(m.sum()) for _, p, m in resolve_region(model, region))
