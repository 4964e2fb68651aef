"""localize.py: hard-concrete gates (Louizos et al. equations in float64), Chang et al.'s hard-concrete
localizer, integrated gradients against an explicit per-alpha reference, top-r selection."""
import math

import pytest
import torch

import localize as loc
from test_memsinks import tiny     # the same tiny random GPT the memsinks tests use


# -------------------------------------------------------------------------------------------------
# hard concrete (Chang et al. / Louizos et al.)
# -------------------------------------------------------------------------------------------------

def test_hard_concrete_gate_formulas():
    # init: the deterministic gate equals mask_p; NeuMuter's mask_p = 1 gives log 11
    for mp in (0.5, 0.9, 1.0):
        la = loc.hc_init_log_alpha(mp)
        assert loc.hc_gate(torch.tensor(la, dtype=torch.float64), 0.33).item() == pytest.approx(mp)
    assert loc.hc_init_log_alpha(1.0) == pytest.approx(math.log(11))
    # stochastic gate against the scalar formula
    for la in (-2.0, 0.0, 1.3):
        for beta in (0.33, 2 / 3):
            for u in (1e-4, 0.1, 0.5, 0.77, 0.9999):
                s = 1 / (1 + math.exp(-(math.log(u) - math.log(1 - u) + la) / beta))
                ref = min(1.0, max(0.0, s * 1.2 - 0.1))
                got = loc.hc_gate(torch.tensor(la, dtype=torch.float64), beta, torch.tensor(u, dtype=torch.float64))
                assert got.item() == pytest.approx(ref, abs=1e-12)


def test_hard_concrete_open_probability_against_monte_carlo():
    g = torch.Generator().manual_seed(0)
    u = torch.rand(400_000, generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    for la in (-1.5, 0.0, 2.0):
        for beta in (0.33, 2 / 3):
            mc = (loc.hc_gate(torch.tensor(la, dtype=torch.float64), beta, u) > 0).double().mean().item()
            assert loc.hc_open_prob(torch.tensor(la, dtype=torch.float64), beta).item() == pytest.approx(mc, abs=0.003)


def test_hard_concrete_scores_train_only_the_gates():
    net = tiny("gpt2", d_ff=12, n_layer=3)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randint(0, 23, (6, 9))
    rows = {"x": x, "y": torch.roll(x, -1, 1)}
    s1 = loc.hard_concrete_scores(net, rows, steps=15, lr=0.1, lam=5.0, batch_size=4, first_layer=1, stop=0.0, seed=3)
    assert s1[0] is None and len(s1) == 3 and all(s.shape == (12,) for s in s1[1:])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())       # the model is untouched
    assert all(p.requires_grad for p in net.parameters()) and net.training           # and restored
    init = torch.sigmoid(torch.tensor(loc.hc_init_log_alpha(0.9)))
    assert torch.cat(s1[1:]).mean() < init                             # the L0 penalty closed gates
    s2 = loc.hard_concrete_scores(net, rows, steps=15, lr=0.1, lam=5.0, batch_size=4, first_layer=1, stop=0.0, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(s1[1:], s2[1:]))     # seeded
    # the stopping rule: a penalty threshold above the initial penalty stops after the first step
    s3 = loc.hard_concrete_scores(net, rows, steps=15, lr=0.1, lam=5.0, batch_size=4, stop=1.0)
    assert (torch.cat(s3) - init).abs().max() < 0.05
    with pytest.raises(ValueError):
        loc.hard_concrete_scores(net, {"x": x[:0], "y": x[:0]})


# -------------------------------------------------------------------------------------------------
# integrated gradients against a hook-based float64 reference
# -------------------------------------------------------------------------------------------------

def _true_probs(net, x, y):
    p = torch.softmax(net(x)[0], -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    return p * (y != -100)


def _ig_reference(net, x, y, layer, steps, positions):
    """The definition, directly: replace the activations a of `layer` (all positions, or position t only) by
    alpha * a through a hook on the down projection's input, differentiate F with respect to the replaced
    values, multiply by a, average over alpha, sum over positions (each: average over positions)."""
    down = net.blocks[layer].mlp.down
    total, n_pos = torch.zeros(net.cfg.d_ff, dtype=torch.float64), 0
    targets = [(None, None)] if positions == "all" else [(r, t) for r in range(x.shape[0]) for t in range(x.shape[1])
                                                         if y[r, t] != -100]
    for r, t in targets:
        for alpha in loc.ig_alphas(steps):
            store = {}

            def hook(mod, inp):
                a = inp[0].detach()
                leaf = (alpha * a).requires_grad_(True) if positions == "all" else (alpha * a[r, t]).requires_grad_(True)
                store.update(a=a, leaf=leaf)
                if positions == "all":
                    return (leaf,)
                h = a.clone()
                h[r, t] = leaf
                return (h,)
            hd = down.register_forward_pre_hook(hook)
            p = _true_probs(net, x, y)
            hd.remove()
            F_ = p.sum() if positions == "all" else p[r, t]
            (g,) = torch.autograd.grad(F_, store["leaf"])
            a = store["a"] if positions == "all" else store["a"][r, t]
            total += (a * g).reshape(-1, net.cfg.d_ff).sum(0)
        n_pos += 1
    return total / steps / (n_pos if positions == "each" else 1)


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_integrated_gradients_all_positions_equal_reference_and_complete(flavor):
    net = tiny(flavor, d_ff=10, n_layer=2).double()
    x = torch.randint(0, 23, (3, 6))
    y = torch.roll(x, -1, 1)
    y[0, 4:] = -100                                                     # padding is not scored
    got = loc.integrated_gradients_scores(net, {"x": x, "y": y}, steps=4, batch_size=2)
    for layer in range(2):
        ref = _ig_reference(net, x, y, layer, 4, "all")
        assert torch.allclose(got[layer].double(), ref, rtol=1e-4, atol=1e-6), layer
    # completeness: the attributions sum to F(a) - F(0) (64-point midpoint rule, O(1/m^2))
    fine = loc.integrated_gradients_scores(net, {"x": x, "y": y}, steps=64, first_layer=1)
    assert fine[0] is None
    with torch.no_grad():
        F1 = _true_probs(net, x, y).sum()
        zero = [None, torch.zeros(10, dtype=torch.float64)]
        p0 = torch.softmax(net(x, mlp_mask=zero)[0], -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
        F0 = (p0 * (y != -100)).sum()
    assert fine[1].double().sum().item() == pytest.approx((F1 - F0).item(), rel=2e-3, abs=1e-5)


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_integrated_gradients_lower_layers_once_is_bit_identical_to_the_whole_forward(flavor):
    """The fast path computes everything below the attributed MLP once per batch; in float32 every attribution
    must equal, bit for bit, the one from a whole forward per alpha (documents packed in rows included)."""
    net = tiny(flavor, d_ff=10, n_layer=3)
    x = torch.randint(0, 23, (3, 7))
    y = torch.roll(x, -1, 1)
    y[0, 5:] = -100
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1]] * 3)
    for rows in ({"x": x, "y": y}, {"x": x, "y": y, "doc_ids": doc}):
        got = loc.integrated_gradients_scores(net, rows, steps=3, batch_size=2)
        b = loc.batch_rows(rows, torch.arange(3), "cpu")
        for layer in range(3):
            fast = loc._scaled_from(net, b, layer)
            whole = torch.zeros(10, dtype=torch.float64)
            for i in range(0, 3, 2):                                      # the slow path, as the code was
                bb = loc.batch_rows(rows, torch.arange(i, min(3, i + 2)), "cpu")
                for alpha in loc.ig_alphas(3):
                    s = torch.full((10,), alpha, requires_grad=True)
                    masks = [None] * 3
                    masks[layer] = s
                    loc._true_token_prob(net, bb, masks).sum().backward()
                    whole += s.grad.double()
            assert torch.equal(got[layer], (whole / 3).float()), layer
            s = torch.full((10,), 0.3)
            assert torch.equal(fast(s), net(b["x"], mlp_mask=[s if l == layer else None for l in range(3)],
                                            doc_ids=b.get("doc_ids"))[0])


def test_integrated_gradients_each_position_equals_reference():
    net = tiny("gpt2", d_ff=8, n_layer=2).double()
    x = torch.randint(0, 23, (2, 5))
    y = torch.roll(x, -1, 1)
    y[1, 3:] = -100
    got = loc.integrated_gradients_scores(net, {"x": x, "y": y}, steps=3, positions="each", batch_size=1)
    for layer in range(2):
        assert torch.allclose(got[layer].double(), _ig_reference(net, x, y, layer, 3, "each"), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError):
        loc.integrated_gradients_scores(net, {"x": x, "y": y}, positions="some")


def test_drop_top_zeroes_the_highest_scores_per_layer():
    scores = [None, torch.tensor([0.1, 0.5, 0.3, 0.9]), torch.tensor([4.0, 3.0, 2.0, 1.0])]
    m = loc.drop_top(scores, 0.5)
    assert m[0] is None
    assert m[1].tolist() == [1, 0, 1, 0] and m[2].tolist() == [0, 0, 1, 1]
    assert loc.drop_top(scores, 0.0)[1].tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError):
        loc.drop_top(scores, 1.5)


# -------------------------------------------------------------------------------------------------
# NeuMuter's use of the gates: R(M) (Eq. 12), the 5%-energy threshold, selection and muting (Eq. 14)
# -------------------------------------------------------------------------------------------------

def test_closed_penalty_equals_eq12():
    g = torch.Generator().manual_seed(0)
    la = torch.randn(3, 7, generator=g, dtype=torch.float64) * 2
    beta, gamma, zeta = 1 / 3, -0.1, 1.1
    total = 0.0
    for l in range(3):
        for i in range(7):
            total += 1 / (1 + math.exp(-(la[l, i].item() - beta * math.log(-gamma / zeta))))
    assert loc.hc_closed_penalty(la, beta).item() == pytest.approx(1 - total / 21, abs=1e-12)


def test_sampled_gate_follows_eqs_10_11_for_fixed_draws_and_eval_gate_has_no_noise():
    u = loc.hc_uniform((4, 5), torch.Generator().manual_seed(1))
    assert u.min() >= 1e-4 and u.max() <= 1 - 1e-4 and u.shape == (4, 5)
    la = torch.linspace(-3, 3, 20, dtype=torch.float64).view(4, 5)
    got = loc.hc_gate(la, 0.3, u.double())
    for l in range(4):
        for i in range(5):
            s = 1 / (1 + math.exp(-(math.log(u[l, i].item() / (1 - u[l, i].item())) + la[l, i].item()) / 0.3))
            assert got[l, i].item() == pytest.approx(min(1.0, max(0.0, s * 1.2 - 0.1)), abs=1e-9)
    det = loc.hc_gate(la, 0.3)
    ref = (torch.sigmoid(la) * 1.2 - 0.1).clamp(0, 1)            # no beta, no noise
    assert torch.allclose(det, ref)


def test_energy_threshold_worked_example():
    # sorted |m| = 0, 0, 0.1, 0.2, 0.7, 1, 1, 1, 1 (total 5.0); 5% = 0.25: 0 + 0 + 0.1 = 0.1 <= 0.25, + 0.2 = 0.3 > 0.25
    m = torch.tensor([1.0, 0.2, 1.0, 0.0, 0.7, 1.0, 0.1, 0.0, 1.0])
    assert loc.energy_threshold(m, 0.05) == pytest.approx(0.1)
    assert loc.energy_threshold(m, 0.3) == pytest.approx(0.7)     # 1.5: 0 + 0 + 0.1 + 0.2 + 0.7 = 1.0, + 1 = 2.0
    assert loc.energy_threshold(torch.ones(10), 0.05) == 1.0       # nothing moved: degenerate at the open value
    assert loc.energy_threshold(torch.tensor([2.0, 3.0]), 0.05) == 2.0   # even the smallest is over
    with pytest.raises(ValueError, match="energy"):
        loc.energy_threshold(m, 0.0)


def test_select_and_mute_eq14():
    gates = torch.tensor([[1.0, 0.0, 0.05, 1.0], [0.5, 1.0, 1.0, 1.0]])
    la = torch.logit(((gates + 0.1) / 1.2).clamp(1e-6, 1 - 1e-6)).double()      # log_alpha whose eval gate is `gates`
    assert torch.allclose(loc.hc_gate(la, 1 / 3), gates.double(), atol=1e-5)
    sel = loc.select_neurons(la, "energy", 0.05)                    # total 6.55, 5% = 0.33: 0, 0.05 -> eps 0.05
    assert sel.tolist() == [[False, True, False, False], [False, False, False, False]]
    sel = loc.select_neurons(la, "energy", 0.2)                     # 1.31: 0 + 0.05 + 0.5 -> eps 0.5, strict
    assert sel.tolist() == [[False, True, True, False], [False, False, False, False]]
    sel_all = loc.select_neurons(la, "energy", 0.5)                 # 3.28: eps lands on 1.0; strict: moved gates only
    assert sel_all.tolist() == [[False, True, True, False], [True, False, False, False]]
    fixed = loc.select_neurons(la, "fixed", fixed=0.15)             # sigmoid(log_alpha) < 0.15 <=> gate < 0.08
    assert fixed.tolist() == [[False, True, True, False], [False, False, False, False]]
    muted = loc.mute_masks(la, sel_all)
    for l in range(2):
        for i in range(4):                                          # Eq. 14, entry by entry
            want = gates[l, i].item() if sel_all[l, i] else 1.0
            assert muted[l, i].item() == pytest.approx(want, abs=1e-5)
    assert loc.effective_neurons(la) == 3
    with pytest.raises(ValueError, match="rule"):
        loc.select_neurons(la, "top")
