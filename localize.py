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


# NeuMuter (Hou et al., ACL Findings 2025, "Decoupling Memories, Muting Neurons") uses the same gates the other way
# round: gates close on the neurons that carry the forget set, an L0 term keeps the rest open, the closed ones are muted.

def hc_uniform(shape, generator=None, device="cpu", eps=1e-4):
    """The uniform draws u of Eq. 10, clamped to [eps, 1 - eps] as the authors' code does (keeps log u finite).
    One draw per gate, shared by every row and token of the forward (as both reference codes)."""
    return torch.rand(shape, generator=generator).clamp(eps, 1 - eps).to(device)


def hc_closed_penalty(log_alpha, beta):
    """NeuMuter's R(M) (Eq. 12) = 1 - (1/N_m) sum_i P(gate_i != 0): the expected fraction of closed gates.
    Minimizing it keeps gates open (Chang et al. minimize the open fraction instead). log_alpha: any shape."""
    return 1 - hc_open_prob(log_alpha, beta).mean()


def energy_threshold(values, energy=0.05):
    """NeuMuter's threshold epsilon: sort the mask values ascending, accumulate |m| while the running sum stays
    within `energy` of the total; epsilon is the value at that point (the smallest value when even it is over)."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    v = torch.sort(torch.as_tensor(values).detach().flatten().double()).values
    if v.numel() == 0:
        raise ValueError("no mask values")
    within = (torch.cumsum(v.abs(), 0) <= energy * v.abs().sum()).nonzero()
    return float(v[int(within[-1])] if len(within) else v[0])


def select_neurons(log_alpha, rule="energy", energy=0.05, fixed=0.15):
    """Bool selection of the gated neurons to mute, from the learned log_alpha (any shape).
    energy: mask value m = hc_gate(log_alpha) strictly below energy_threshold(m) (the paper's 5% rule; strict,
            so when few gates move and epsilon lands on the open value 1, only moved gates count);
    fixed:  sigmoid(log_alpha) < fixed (the authors' code, r = 0.15; their released code has no energy rule)."""
    if rule == "energy":
        m = hc_gate(log_alpha.detach(), 1.0)          # beta is unused without noise
        return m < energy_threshold(m, energy)
    if rule == "fixed":
        return torch.sigmoid(log_alpha.detach()) < fixed
    raise ValueError(f"threshold rule must be 'energy' or 'fixed', got {rule!r}")


def mute_masks(log_alpha, selected):
    """Eq. 14: a selected neuron keeps its learned deterministic gate, every other neuron gets 1."""
    m = hc_gate(log_alpha.detach(), 1.0)
    return torch.where(selected, m, torch.ones_like(m))


def effective_neurons(log_alpha, below=0.99):
    """How many deterministic gates sit below `below`: the neurons the mask actually changes."""
    return int((hc_gate(log_alpha.detach(), 1.0) < below).sum())


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


def _true_token_prob(model, b, masks, logits=None):
    """(B, T) probability of each target token (0 where y = -100) under per-layer masks (or of given logits)."""
    if logits is None:
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
                upper = _scaled_from(model, b, layer) if positions == "all" else None
                for alpha in ig_alphas(steps):
                    if positions == "all":
                        s = torch.full((d_ff,), alpha, device=dev, requires_grad=True)
                        _true_token_prob(model, b, None, upper(s)).sum().backward()
                        total += s.grad.double()
                    else:
                        total += _ig_each_position(model, b, layer, alpha)
            n_pos = int((rows["y"] != -100).sum()) if positions == "each" else 1
            out.append((total / steps / n_pos).float())
    return out


def _scaled_from(model, b, layer):
    """f(s) -> the logits model(b["x"], mlp_mask=[None, .., s at `layer`, .., None]) gives, with everything up to
    `layer`'s MLP hidden activation computed once: it does not depend on s, and only the blocks above feel the
    scale (the same ops on the same values as the whole forward, so the same bits). Mirrors Block.forward's MLP half
    and GPT.forward's tail; tests hold it to the whole forward."""
    blk, got = model.blocks[layer], {}
    hooks = [b_.register_forward_pre_hook(lambda m, a, i=i: got.__setitem__(i, a))
             for i, b_ in enumerate(model.blocks) if i >= layer]       # (x, rope, attn_mask, mlp_mask, ctx, cache)
    hooks.append(blk.ln_2.register_forward_pre_hook(lambda m, a: got.__setitem__("mid", a[0])))
    hooks.append(blk.mlp.down.register_forward_pre_hook(lambda m, a: got.__setitem__("h", a[0])))
    try:
        with torch.no_grad():
            model(b["x"], doc_ids=b.get("doc_ids"))
    finally:
        for h in hooks:
            h.remove()
    h, mid, ctx = got["h"], got["mid"], got[layer][4]

    def f(s):
        out = blk.mlp.down(h * s.to(h.dtype))
        if blk.adapter is not None:
            out = out + blk.adapter(blk.ln_2(mid), ctx)
        x = mid + blk.drop(out)
        for i in range(layer + 1, len(model.blocks)):
            x = model.blocks[i](x, *got[i][1:])
        return model.lm_head(model.ln_f(x))
    return f


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


# -------------------------------------------------------------------------------------------------
# Value-vector localizers and selections (Lee et al., "Does Localization Inform Unlearning?",
# arXiv:2505.16252, App. C). Each scores every value vector v_i^l (column i of layer l's down projection);
# scores are lists of (d_ff,) float64 tensors, one per layer. rows: dict with x, y (y = -100 off the answer).
# -------------------------------------------------------------------------------------------------

def _downs(model):
    return [b.mlp.down.weight for b in model.blocks]


def _mlp_hidden(model, x):
    """Per-layer MLP hidden activations h^l = f(W_K x^l) (B, T, d_ff): the input of each down projection."""
    outs = [None] * len(model.blocks)
    hooks = [b.mlp.down.register_forward_hook(lambda m, i, o, l=l: outs.__setitem__(l, i[0]))
             for l, b in enumerate(model.blocks)]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return outs


def activation_scores(model, rows, *, batch_size=64, normalize=True):
    """Activations (Chang et al. 2024): A^l(i) = (1/T) sum_t |h_{i,t}^l| * ||v_i^l||, the mean over every answer
    position t of the rows (positions whose target is an answer token, i.e. the input is [p, s_<t]) of the
    absolute memory coefficient times the value vector's norm. normalize=True standardizes each layer's scores
    (zero mean, unit std): the paper normalizes within each layer "to enable localization across layers"
    without saying how; a z-score is our choice."""
    N = len(rows["x"])
    if N == 0:
        raise ValueError("no sequences to localize")
    dev = next(model.parameters()).device
    sums = [torch.zeros(model.cfg.d_ff, dtype=torch.float64, device=dev) for _ in model.blocks]
    count = 0
    with _frozen(model), torch.no_grad():
        for i in range(0, N, batch_size):
            b = batch_rows(rows, torch.arange(i, min(N, i + batch_size)), dev)
            keep = b["y"] != -100
            count += int(keep.sum())
            for l, h in enumerate(_mlp_hidden(model, b["x"])):
                sums[l] += h.abs().double()[keep].sum(0)
        out = [s / count * w.double().norm(dim=0) for s, w in zip(sums, _downs(model))]
    return [standardize(s) for s in out] if normalize else out


def standardize(s):
    """(s - mean) / std within one layer (std with n - 1); a constant layer becomes all zeros."""
    sd = s.std()
    return (s - s.mean()) / sd if float(sd) > 0 else torch.zeros_like(s)


def down_grads(model, rows, *, labels=None, sign=1.0, batch_size=64):
    """Per-layer gradients (n_embd, d_ff) float64 of sign * (token-mean NLL over every answer token of the rows)
    with respect to the down projections; column i is the gradient of value vector i. labels replaces y
    (same shape, -100 where y is -100), e.g. MemFlex's random labels. The model is left unchanged."""
    N = len(rows["x"])
    if N == 0:
        raise ValueError("no sequences to localize")
    y_all = rows["y"] if labels is None else labels
    if y_all.shape != rows["y"].shape or bool(((y_all == -100) != (rows["y"] == -100)).any()):
        raise ValueError("labels must have y's shape and -100 exactly where y has it")
    dev = next(model.parameters()).device
    total = int((rows["y"] != -100).sum())
    downs = _downs(model)
    acc = [torch.zeros(w.shape, dtype=torch.float64, device=dev) for w in downs]
    with _frozen(model):
        for w in downs:
            w.requires_grad_(True)
        for i in range(0, N, batch_size):
            idx = torch.arange(i, min(N, i + batch_size))
            b = batch_rows({"x": rows["x"], "y": y_all}, idx, dev)
            logits, _ = model(b["x"])
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["y"].flatten(), ignore_index=-100, reduction="sum")
            for a, g in zip(acc, torch.autograd.grad(sign * nll / total, downs)):
                a += g.double()
    return acc


def random_answer_labels(rows, vocab_size, generator):
    """y with every answer token replaced by a uniformly random token (MemFlex's perturbed labels y*)."""
    y = rows["y"]
    rand = torch.randint(0, vocab_size, y.shape, generator=generator)
    return torch.where(y != -100, rand, y)


def memflex_gradients(model, forget_rows, retain_rows, *, n_repeats=5, seed=0, batch_size=64):
    """MemFlex's (Tian et al. 2024) gradients, as Lee et al. apply them to value vectors: the forget set's answers
    are replaced by random labels n_repeats times and the NLL gradients averaged (g_unl); the same procedure on
    the retain set gives g_ret. Returns (g_unl, g_ret), per-layer (n_embd, d_ff) float64."""
    if n_repeats < 1:
        raise ValueError(f"n_repeats must be >= 1, got {n_repeats}")
    gen = torch.Generator().manual_seed(seed)
    V = model.cfg.vocab_size

    def averaged(rows):
        gs = [down_grads(model, rows, labels=random_answer_labels(rows, V, gen), batch_size=batch_size)
              for _ in range(n_repeats)]
        return [sum(g[l] for g in gs) / n_repeats for l in range(len(gs[0]))]
    return averaged(forget_rows), averaged(retain_rows)


def column_cosine(a, b):
    """(d_ff,) cosine similarity of matching columns of two (n_embd, d_ff) matrices (0 where a column is 0)."""
    num = (a * b).sum(0)
    den = a.norm(dim=0) * b.norm(dim=0)
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))


def memflex_select(g_unl, g_ret, mu, sigma):
    """The MemFlex attribution as printed (App. C): A^l(i) = 1[cos(g_i^unl, g_i^ret) < mu and ||g_i^unl|| > sigma],
    per layer, as (d_ff,) bool tensors."""
    return [(column_cosine(u, r) < mu) & (u.norm(dim=0) > sigma) for u, r in zip(g_unl, g_ret)]


def memflex_scores(g_unl, g_ret, mu=0.95):
    """Scores whose top k are exactly memflex_select with sigma tuned to select k vectors: ||g_i^unl|| where
    cos < mu, -inf elsewhere. Lee et al. tune sigma (mu = 0.95) until about 10% are selected; ranking by the
    norm among the vectors that pass the cosine test is that tuning done exactly. If fewer than k pass, top_fraction
    fills the rest arbitrarily from the -inf ones: check how many are finite."""
    return [torch.where(column_cosine(u, r) < mu, u.norm(dim=0), torch.full_like(u[0], float("-inf")))
            for u, r in zip(g_unl, g_ret)]


def hessian_diag_mean(model, rows, *, n_samples=8, seed=0, batch_size=64, z=None):
    """gamma for WAGLE: the mean of the diagonal of the Hessian of the rows' token-mean NLL with respect to the
    value-vector parameters (every down-projection weight), by Hutchinson's estimator
    mean_j diag(H)_j ~ (1/S) sum_s (1/n) z_s^T H z_s with Rademacher z_s (E[z z^T] = I). One Hessian-vector
    product per sample (double backward). z (optional): a list of S lists of per-layer tensors to use instead of
    random draws (tests). Lee et al. estimate gamma as "the average diagonal Hessian value over the retain set";
    which parameters they average over is not said, ours are the ones being localized."""
    N = len(rows["x"])
    if N == 0:
        raise ValueError("no sequences")
    dev = next(model.parameters()).device
    downs = _downs(model)
    n = sum(w.numel() for w in downs)
    gen = torch.Generator().manual_seed(seed)
    if z is None:
        z = [[(torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).to(dev, w.dtype) for w in downs]
             for _ in range(n_samples)]
    total = int((rows["y"] != -100).sum())
    est = 0.0
    # double backward needs attention made of differentiable ops: the fused CPU/GPU kernels have no
    # derivative of their backward, the math backend does
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with _frozen(model), sdpa_kernel(SDPBackend.MATH):
        for w in downs:
            w.requires_grad_(True)
        for zs in z:
            for i in range(0, N, batch_size):
                b = batch_rows(rows, torch.arange(i, min(N, i + batch_size)), dev)
                logits, _ = model(b["x"])
                nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["y"].flatten(), ignore_index=-100,
                                      reduction="sum") / total
                g = torch.autograd.grad(nll, downs, create_graph=True)
                gz = sum((gi * zi).sum() for gi, zi in zip(g, zs))
                hz = torch.autograd.grad(gz, downs)
                est += float(sum((zi.double() * hi.double()).sum() for zi, hi in zip(zs, hz)))
    return est / (n * len(z))


def wagle_scores(model, forget_rows, retain_rows, *, gamma=None, n_samples=8, seed=0, batch_size=64):
    """WAGLE (Jia et al. 2024) averaged over each value vector's parameters, as Lee et al. App. C:
        A^l(i) = (1/|v_i|) sum_{j in v_i} ( [theta]_j [grad L_f]_j - (1/gamma) [grad L_r]_j [grad L_f]_j ),
    theta = the model's weights, L_f the forget objective, L_r the retain loss, gamma the mean diagonal Hessian over
    the retain set (hessian_diag_mean unless given). L_f is gradient ascent's unlearning loss, -NLL on the forget
    set (WAGLE attributes the unlearning objective's forget term), L_r the retain NLL. The paper's formula has no
    absolute value (WAGLE's code ranks |score| per weight); we follow the paper. Returns (scores, gamma)."""
    g_f = down_grads(model, forget_rows, sign=-1.0, batch_size=batch_size)
    g_r = down_grads(model, retain_rows, batch_size=batch_size)
    if gamma is None:
        gamma = hessian_diag_mean(model, retain_rows, n_samples=n_samples, seed=seed, batch_size=batch_size)
    if not gamma > 0:
        raise ValueError(f"WAGLE needs a positive Hessian scale gamma, got {gamma}")
    scores = [(w.detach().double() * gf - gr * gf / gamma).mean(0) for w, gf, gr in zip(_downs(model), g_f, g_r)]
    return scores, gamma


def random_scores(model, seed=0):
    """The Random localizer: i.i.d. uniform scores, so its top r is a uniformly random r of all value vectors."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(model.cfg.d_ff, generator=gen, dtype=torch.float64) for _ in model.blocks]


def top_fraction(scores, r, *, per_layer=False, exclude=None):
    """{layer: sorted indices} of the top round(r * n) value vectors by score over all layers (per_layer=True:
    the top round(r * d_ff) of each layer). exclude: a selection whose vectors may not be chosen (Random must
    be disjoint from V_tgt). Ties go to the lower (layer, index)."""
    if not 0 < r <= 1:
        raise ValueError(f"localization ratio r must be in (0, 1], got {r}")
    flat = torch.cat([s.double().flatten() for s in scores])
    sizes = [s.numel() for s in scores]
    offsets = [sum(sizes[:l]) for l in range(len(sizes))]
    banned = torch.zeros(flat.numel(), dtype=torch.bool)
    for l, idx in (exclude or {}).items():
        banned[offsets[l] + torch.as_tensor(list(idx), dtype=torch.long)] = True
    flat = torch.where(banned, torch.full_like(flat, float("nan")), flat)
    picked = []
    groups = [(offsets[l], sizes[l]) for l in range(len(sizes))] if per_layer else [(0, flat.numel())]
    for start, n in groups:
        k = int(round(r * n))
        part = flat[start:start + n]
        avail = int((~torch.isnan(part)).sum())
        if k > avail:
            raise ValueError(f"cannot select {k} value vectors: only {avail} are left outside the excluded ones")
        # stable descending sort, NaN (excluded) last: ties keep the lower index
        key = torch.where(torch.isnan(part), torch.full_like(part, float("-inf")), part)
        order = torch.sort(-key, stable=True).indices
        order = order[~torch.isnan(part[order])][:k]
        picked.append(start + order)
    picked = torch.cat(picked)
    out = {}
    for l in range(len(sizes)):
        sel = picked[(picked >= offsets[l]) & (picked < offsets[l] + sizes[l])] - offsets[l]
        if sel.numel():
            out[l] = sorted(int(i) for i in sel)
    return out


def random_selection(model, r, seed=0, exclude=None):
    """A uniformly random r of all value vectors (not matched per layer, as Lee et al. select "from the entire
    model"), disjoint from `exclude`."""
    return top_fraction(random_scores(model, seed), r, exclude=exclude)


def selection_size(selection):
    return sum(len(v) for v in selection.values())
