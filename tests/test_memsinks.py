"""memsinks.py: ids, id noise, eval modes, gradient masking, the post-hoc localizers, claims, and the smoke run.
References are slow and explicit (float64, Python loops, worked examples); fast paths are checked against them."""
import copy
import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import data as D
import memsinks as ms
import model as M
import train as T


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread and lose a lot to it on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(flavor="gpt2", d_ff=10, n_layer=2, seed=0):
    cfg = M.ModelConfig(flavor=flavor, vocab_size=23, block_size=16, n_layer=n_layer, n_head=2, n_embd=8, d_ff=d_ff,
                        bias=flavor == "gpt2")
    torch.manual_seed(seed)
    net = M.GPT(cfg)
    with torch.no_grad():            # larger weights than GPT-2's init, so every path carries real signal
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return net


# -------------------------------------------------------------------------------------------------
# sequence ids for packed rows, id noise
# -------------------------------------------------------------------------------------------------

def test_token_sequence_ids_equal_each_document_hashed_alone():
    docs = [[5, 6, 7], [9], [5, 6, 7], [1, 2, 3, 4], [8, 8]]
    # packed: row 0 = doc0 + doc1 + doc3 piece, row 1 = doc2 (same tokens as doc0) + doc4 + padding
    x = torch.tensor([[5, 6, 7, 9, 1, 2, 3, 4], [5, 6, 7, 8, 8, 0, 0, 0]])
    doc = torch.tensor([[0, 0, 0, 1, 3, 3, 3, 3], [2, 2, 2, 4, 4, -1, -1, -1]])
    got = ms.token_sequence_ids(x, doc)
    alone = {d: ms.sequence_ids(torch.tensor([docs[d]])).item() for d in range(5)}
    for r in range(2):
        for t in range(8):
            if doc[r, t] >= 0:
                assert got[r, t].item() == alone[doc[r, t].item()], (r, t)
    assert got[0, 0] == got[1, 0]                    # the same text gets the same id wherever it stands
    # one document per row: the row's sequence_ids over its valid tokens, on every token
    rows = D.one_per_row(docs, eos_id=1, pad_id=0)
    ids = ms.token_sequence_ids(rows["x"], rows["doc_ids"])
    ref = ms.sequence_ids(rows["x"], rows["doc_ids"] >= 0)
    valid = rows["doc_ids"] >= 0
    assert torch.equal(ids[valid], ref[:, None].expand_as(ids)[valid])
    assert (ids > 0).all()


def test_noisy_ids_flip_whole_occurrences_of_repeated_sequences_only():
    B, T, d = 4000, 5, 0.3
    ids = torch.arange(1, B + 1)[:, None].expand(B, T).clone()
    repeated = (torch.arange(B) % 2 == 0)[:, None].expand(B, T).clone()
    g = torch.Generator().manual_seed(0)
    out = ms.noisy_ids(ids, repeated, d, g)
    changed = out != ids
    assert not changed[~repeated].any()                                 # singles keep their ids
    assert torch.equal(changed.all(1), changed.any(1))                  # a whole row flips or none of it
    assert (out[changed] >= 2**62).all()                                # fresh ids never collide with data ids
    assert (out[changed].view(-1, T) == out[changed].view(-1, T)[:, :1]).all()   # one fresh id per occurrence
    frac = changed[repeated[:, 0], 0].float().mean().item()
    assert abs(frac - d) < 0.04                                         # binomial sd ~ 0.01
    assert len(set(out[changed.all(1), 0].tolist())) == int(changed.all(1).sum())   # fresh ids are distinct
    # deterministic in the generator; d = 0 is the identity; d outside [0, 1] is an error
    assert torch.equal(out, ms.noisy_ids(ids, repeated, d, torch.Generator().manual_seed(0)))
    assert ms.noisy_ids(ids, repeated, 0.0) is ids
    assert torch.equal(ms.noisy_ids(ids, repeated, 1.0, g)[repeated] >= 2**62, torch.ones(int(repeated.sum()), dtype=torch.bool))
    with pytest.raises(ValueError):
        ms.noisy_ids(ids, repeated, 1.5)


def test_noisy_ids_packed_rows_flip_each_document_on_its_own():
    ids = torch.tensor([[7, 7, 7, 9, 9, 9]]).expand(3000, 6).clone()
    doc = torch.tensor([[0, 0, 0, 1, 1, 1]]).expand(3000, 6)
    rep = torch.ones(3000, 6, dtype=torch.bool)
    out = ms.noisy_ids(ids, rep, 0.5, torch.Generator().manual_seed(1), doc)
    a, b = out[:, 0] != 7, out[:, 3] != 9
    assert (out[:, :3] == out[:, :1]).all() and (out[:, 3:] == out[:, 3:4]).all()
    assert abs(a.float().mean().item() - 0.5) < 0.05 and abs(b.float().mean().item() - 0.5) < 0.05
    assert abs((a & b).float().mean().item() - 0.25) < 0.04           # independent draws per document


# -------------------------------------------------------------------------------------------------
# the sink layer and the evaluation modes
# -------------------------------------------------------------------------------------------------

def test_split_and_drop_scale_worked_examples():
    assert ms.split_neurons(512, 0.7) == (358, 154)                    # the prototype's split
    assert ms.split_neurons(10, 0.7) == (7, 3)                         # 0.7 * 10 = 6.999... in floating point
    for g in (0.0, 1.0):
        with pytest.raises(ValueError):
            ms.split_neurons(10, g)
    # g = 3/5, p = 0.3: authors (g + p) / g = 1.5; expected mass (g + (1 - g) p) / g = 0.72 / 0.6 = 1.2
    assert ms.drop_scale(3, 2, 0.3, "authors") == pytest.approx(1.5)
    assert ms.drop_scale(3, 2, 0.3, "mass") == pytest.approx(1.2)
    assert ms.drop_scale(3, 2, 0.3, "none") == 1.0
    with pytest.raises(ValueError):
        ms.drop_scale(3, 2, 0.3, "other")
    assert ms.eval_mask("dropped", 3, 2, 0.3).tolist() == pytest.approx([1.5, 1.5, 1.5, 0, 0])
    assert ms.eval_mask("expected", 3, 2, 0.3).tolist() == pytest.approx([1, 1, 1, 0.3, 0.3])
    with pytest.raises(ValueError):
        ms.eval_mask("own", 3, 2, 0.3)
    with pytest.raises(ValueError):
        ms.eval_mask("nope", 3, 2, 0.3)


def test_expected_mode_is_the_average_of_the_own_masks():
    n_shared, n_sink, p = 4, 300, 0.3
    own = ms.eval_mask("own", n_shared, n_sink, p, ids=torch.arange(1, 4001)[:, None])[:, 0]    # (4000, d_ff)
    exp = ms.eval_mask("expected", n_shared, n_sink, p)
    assert (own.mean(0) - exp).abs().max() < 0.03                      # per-neuron mean over ids ~ p (sd 0.007)
    assert torch.equal(own[:, :n_shared], torch.ones(4000, n_shared))


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_eval_modes_equal_editing_the_down_projection(flavor):
    """A mask after the nonlinearity (after gating) and before the down projection is the same as scaling the
    down projection's columns: dropped = sink columns 0 and shared columns x (g+p)/g; own = the sequence's
    training mask, also what the model trains with."""
    net = tiny(flavor, d_ff=30)
    n_shared, n_sink = ms.split_neurons(30, 0.7)
    x = torch.randint(0, 23, (3, 9))
    for mode in ("dropped", "expected"):
        ref = copy.deepcopy(net)
        col = ms.eval_mask(mode, n_shared, n_sink, 0.3)
        with torch.no_grad():
            for blk in ref.blocks:
                blk.mlp.down.weight.mul_(col)
        assert torch.allclose(net(x, mlp_mask=col)[0], ref(x)[0], atol=1e-5)
    ids = torch.tensor([11, 12, 11])[:, None].expand(3, 9)
    cfg = ms.Config(d_ff=30, g=0.7, p=0.3)
    own = ms.eval_modes(cfg, "memsinks")["own"]({"x": x, "ids": ids})
    assert torch.equal(own, ms.train_mask(cfg, "memsinks", {"ids": ids}).mask.expand_as(own))
    for r in range(3):            # per row: the same as scaling the columns by that sequence's mask
        ref = copy.deepcopy(net)
        with torch.no_grad():
            for blk in ref.blocks:
                blk.mlp.down.weight.mul_(own[r, 0])
        assert torch.allclose(net(x, mlp_mask=own)[0][r], ref(x[r:r + 1])[0][0], atol=1e-5)
    assert not torch.allclose(own[0, 0], own[1, 0])                   # different sequences, different sinks


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_training_mask_object_equals_the_dense_mask(flavor):
    """The in-place SinkMask fast path against the dense per-token tensor: outputs and every gradient."""
    n_shared, n_sink = 14, 16
    x = torch.randint(0, 23, (3, 8))
    y = torch.roll(x, -1, 1)
    for ids in (torch.tensor([5, 9, 5])[:, None].expand(3, 8),                      # one sequence per row
                torch.tensor([[5] * 3 + [7] * 5, [9] * 8, [7] * 6 + [5] * 2])):     # packed rows
        out = []
        for mask in (ms.sink_mask(ids, n_shared, n_sink, 0.3), ms.training_mask(ids, n_shared, n_sink, 0.3)):
            net = tiny(flavor, d_ff=30)
            logits, loss = net(x, y, mlp_mask=mask)
            loss.backward()
            out.append((logits.detach(), [p.grad.clone() for p in net.parameters()]))
        assert torch.allclose(out[0][0], out[1][0], atol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(out[0][1], out[1][1]))
    assert ms.training_mask(torch.tensor([5, 9])[:, None].expand(2, 8), n_shared, n_sink, 0.3).mask.shape == (2, 1, 30)


def test_memsinks_training_mask_keeps_gradients_off_inactive_sinks():
    net = tiny("gpt2", d_ff=40)
    cfg = ms.Config(d_ff=40, g=0.5, p=0.3)
    x = torch.randint(0, 23, (2, 7))
    ids = torch.full((2, 7), 1234)
    mask = ms.sink_mask(ids, 20, 20, 0.3)[0, 0]
    _, loss = net(x, torch.roll(x, -1, 1), mlp_mask=ms.train_mask(cfg, "memsinks", {"ids": ids}))
    loss.backward()
    for blk in net.blocks:
        row = blk.mlp.up.weight.grad.abs().sum(1)
        col = blk.mlp.down.weight.grad.abs().sum(0)
        assert (row[mask == 0] == 0).all() and (col[mask == 0] == 0).all()
        assert (row[mask == 1] > 0).all() and (col[mask == 1] > 0).all()


# -------------------------------------------------------------------------------------------------
# gradient masking: forward unchanged, gradients routed (float64 explicit reference)
# -------------------------------------------------------------------------------------------------

def _gelu_tanh_and_grad(u):
    k = math.sqrt(2 / math.pi)
    th = math.tanh(k * (u + 0.044715 * u ** 3))
    return 0.5 * u * (1 + th), 0.5 * (1 + th) + 0.5 * u * (1 - th * th) * k * (1 + 3 * 0.044715 * u * u)


def _gelu_erf_and_grad(u):
    phi = 0.5 * (1 + math.erf(u / math.sqrt(2)))                     # the normal CDF; its density below
    return u * phi, phi + u * math.exp(-u * u / 2) / math.sqrt(2 * math.pi)


def _silu_and_grad(z):
    s = 1 / (1 + math.exp(-z))
    return z * s, s * (1 + z * (1 - s))


@pytest.mark.parametrize("flavor,gelu", [("gpt2", "tanh"), ("gpt2", "exact"), ("llama", "exact")])
def test_gradient_route_matches_explicit_float64_reference(flavor, gelu):
    torch.manual_seed(1)
    cfg = M.ModelConfig(flavor=flavor, n_embd=4, d_ff=6, n_head=1, bias=flavor == "gpt2", gelu=gelu)
    mlp = M.MLP(cfg).double()
    x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(1, 5, 4, dtype=torch.float64)
    route = (torch.rand(1, 5, 6) < 0.5).double()
    y = ms.GradientRoute(route).mlp_forward(mlp, x)
    assert torch.allclose(y, mlp(x), atol=1e-12)                       # forward unchanged
    (y * c).sum().backward()
    W_up, W_down = mlp.up.weight.detach(), mlp.down.weight.detach()
    b_up = mlp.up.bias.detach() if mlp.up.bias is not None else torch.zeros(6, dtype=torch.float64)
    W_g = mlp.gate.weight.detach() if flavor == "llama" else None
    g_up, g_down, g_x = torch.zeros_like(W_up), torch.zeros_like(W_down), torch.zeros(5, 4, dtype=torch.float64)
    g_bup, g_gate = torch.zeros(6, dtype=torch.float64), torch.zeros(6, 4, dtype=torch.float64)
    for t in range(5):
        xt, ct = x[0, t].detach(), c[0, t]
        for i in range(6):
            u = float(W_up[i] @ xt + b_up[i])
            if flavor == "gpt2":
                h, dh_du = (_gelu_tanh_and_grad if gelu == "tanh" else _gelu_erf_and_grad)(u)
                dh_dg = 0.0
            else:
                z = float(W_g[i] @ xt)
                s, ds = _silu_and_grad(z)
                h, dh_du, dh_dg = s * u, s, ds * u
            m = float(route[0, t, i])
            g_down[:, i] += m * ct * h                                  # value vector: only routed tokens
            gh = m * float(W_down[:, i] @ ct)                            # dL/dh, blocked where m = 0
            g_up[i] += gh * dh_du * xt
            g_bup[i] += gh * dh_du
            g_x[t] += gh * dh_du * W_up[i]
            if flavor == "llama":
                g_gate[i] += gh * dh_dg * xt
                g_x[t] += gh * dh_dg * W_g[i]
    assert torch.allclose(mlp.down.weight.grad, g_down, atol=1e-10)
    assert torch.allclose(mlp.up.weight.grad, g_up, atol=1e-10)
    assert torch.allclose(x.grad[0], g_x, atol=1e-10)
    if flavor == "gpt2":
        assert torch.allclose(mlp.up.bias.grad, g_bup, atol=1e-10)
        assert torch.allclose(mlp.down.bias.grad, c[0].sum(0), atol=1e-10)   # the bias is no neuron's: all tokens
    else:
        assert torch.allclose(mlp.gate.weight.grad, g_gate, atol=1e-10)


def test_gradient_masking_routes_repeated_to_memorization_neurons_in_the_whole_model():
    cfg = ms.Config(d_ff=10, g=0.7)
    n_shared, _ = ms.split_neurons(10, 0.7)
    x = torch.randint(0, 23, (4, 8))
    y = torch.roll(x, -1, 1)
    rep = torch.tensor([True, False, True, False])[:, None].expand(4, 8)
    grads, logits = {}, {}
    for name, rows in (("rep", [0, 2]), ("single", [1, 3]), ("mixed", [0, 1, 2, 3])):
        net = tiny("gpt2")
        b = {"repeated": rep[rows]}
        lg, _ = net(x[rows], mlp_mask=ms.train_mask(cfg, "gradmask", b))
        logits[name] = lg.detach()
        F.cross_entropy(lg.flatten(0, 1), y[rows].flatten(), reduction="sum").backward()
        grads[name] = {k: p.grad.clone() for k, p in net.named_parameters()}
    plain, _ = tiny("gpt2")(x)
    assert torch.allclose(logits["mixed"], plain.detach(), atol=1e-6)  # the forward is the plain model's
    for l in range(2):
        up, down = f"blocks.{l}.mlp.up.weight", f"blocks.{l}.mlp.down.weight"
        assert (grads["rep"][up][:n_shared] == 0).all() and (grads["rep"][down][:, :n_shared] == 0).all()
        assert (grads["single"][up][n_shared:] == 0).all() and (grads["single"][down][:, n_shared:] == 0).all()
        assert grads["rep"][up][n_shared:].abs().sum() > 0 and grads["single"][up][:n_shared].abs().sum() > 0
    for k in grads["mixed"]:                   # routing is per token: a mixed batch is the sum of its parts
        assert torch.allclose(grads["mixed"][k], grads["rep"][k] + grads["single"][k], atol=1e-5), k




# -------------------------------------------------------------------------------------------------
# data, losses, claims, and the runs end to end
# -------------------------------------------------------------------------------------------------

def test_mean_loss_is_token_weighted_cross_entropy():
    net = tiny("gpt2")
    x = torch.randint(0, 23, (5, 7))
    y = torch.roll(x, -1, 1)
    y[1, 3:] = -100
    y[4, 1:] = -100
    rows = {"x": x, "y": y, "ids": torch.ones_like(x)}
    ref = F.cross_entropy(net(x)[0].flatten(0, 1), y.flatten(), ignore_index=-100).item()
    assert ms.mean_loss(net, rows, batch_size=2) == pytest.approx(ref, rel=1e-5)


def test_sets_ids_and_canary_targets():
    cfg = ms.Config(setting="canary", n_rep=3, rep=4, n_single=10, n_val=5, canary_len=6)
    sets = ms.make_sets(cfg)
    tok, rs = sets.tok, sets.rs
    assert len(sets.train["x"]) == 3 * 4 + 10 and len(sets.dedup["x"]) == 3 + 10
    # hash ids: every copy of a repeated sequence has the id of its row in the repeated set
    train_ids = {tuple(r[(r != 0)].tolist()): i for r, i in zip(sets.train["x"], sets.train["ids"][:, 0].tolist())}
    for r, i in zip(sets.rep["x"], sets.rep["ids"][:, 0].tolist()):
        assert train_ids[tuple(r[(r != 0)].tolist())] == i
    assert sets.train["repeated"][:, 0].sum() == 12 and not sets.val["repeated"].any()
    for i, c in enumerate(rs.canaries):   # the canary targets are exactly the canary's tokens
        cy = sets.rep["canary_y"][i]
        assert tok.decode(cy[cy != -100].tolist()) == c
    data_ids = ms.make_sets(ms.Config(n_rep=3, rep=4, n_single=10, n_val=5, ids="data"))
    assert sorted(set(data_ids.rep["ids"][:, 0].tolist())) == [1, 2, 3]
    # packed rows: several stories per row, each token carrying its own story's id
    packed = ms.make_sets(ms.Config(n_rep=3, rep=4, n_single=10, n_val=5, pack=True, block_size=256)).train
    assert len(packed["x"]) < 22 and max(len(set(r.tolist())) for r in packed["ids"]) >= 2
    rep_ids = set(ms.make_sets(ms.Config(n_rep=3, rep=4, n_single=10, n_val=5)).rep["ids"][:, 0].tolist())
    assert set(packed["ids"][packed["repeated"]].tolist()) == rep_ids


def _metrics(std_val, std_rep, ms_val, ms_rep, dedup_val, gm_val, posthoc, dedup_epochs_val=1.5):
    fin = lambda **kw: {"final": kw, "steps": 10}
    return {"models": {"standard": fin(**{"plain/val": std_val, "plain/rep": std_rep}),
                       "dedup_epochs": fin(**{"plain/val": dedup_epochs_val, "plain/rep": 1.0}),
                       "dedup_steps": fin(**{"plain/val": dedup_val, "plain/rep": 1.0}),
                       "memsinks": fin(**{"dropped/val": ms_val, "dropped/rep": ms_rep}),
                       "gradmask": fin(**{"keep/val": gm_val, "dropped/val": gm_val + 0.1})},
            "gap_closure": {"memsinks_dropped": (ms_rep - std_rep) / (std_val - std_rep)},
            "tradeoff": {"memsinks": {"forgetting": ms_rep - std_rep, "degradation": ms_val - std_val}},
            "posthoc": {"hard_concrete": posthoc, "integrated_gradients": []}}


V = lambda cs: [c["verdict"] for c in cs]


def test_main_claims_reach_every_verdict_on_constructed_numbers():
    """Every main claim on numbers where the verdict is known: all hold, all fail, each boundary, and each
    precondition unmet (not testable here)."""
    pts = [{"forgetting": 0.1, "degradation": 0.01}, {"forgetting": 0.5, "degradation": 0.3}]
    good = ms.main_claims(ms.Config(), _metrics(1.0, 0.3, 1.01, 0.72, 1.1, 1.2, pts))
    assert V(good) == ["holds"] * 6
    assert [list(c["value"].values())[0] for c in good] == pytest.approx([0.3, 0.6, 0.01, 1.01 - 1.1, 0.2, 0.3 - 0.01])
    assert "tuned on held-out seed 100" in good[2]["detail"]
    # 1 L_rep/L_val 0.8; 2 closure 0.25; 3a +5%; 3b repetition helps (standard 1.0 < dedup 1.04) but MemSinks 1.05
    # is not below dedup; 4 gradmask better; 5 a post-hoc point forgets as much at less degradation
    bad = ms.main_claims(ms.Config(), _metrics(1.0, 0.8, 1.05, 0.85, 1.04, 0.9, [{"forgetting": 0.2, "degradation": 0.0}]))
    assert V(bad) == ["fails"] * 6
    # boundaries: ratio exactly 0.5 holds, closure exactly 0.5 holds, +2.9% holds and +3.1% fails, equal validation
    # losses fail 4 (strict) and make 3b not testable (standard = deduplicated: repetition does not help)
    edge = ms.main_claims(ms.Config(), _metrics(1.0, 0.5, 1.029, 0.75, 1.0, 1.0, pts))
    assert V(edge[:5]) == ["holds", "holds", "holds", "not testable here", "fails"]
    assert ms.main_claims(ms.Config(), _metrics(1.0, 0.5, 1.031, 0.75, 1.1, 1.0, pts))[2]["verdict"] == "fails"
    # 3b not testable: fresh stories help at least as much as repetition (deduplicated 0.98 below standard 1.0)
    nt = ms.main_claims(ms.Config(), _metrics(1.0, 0.3, 0.99, 0.72, 0.98, 1.2, pts))[3]
    assert nt["verdict"] == "not testable here" and nt["precondition"]["value"] == pytest.approx(0.02)
    # 5 not testable: no post-hoc point forgets as much as MemSinks (no vacuous "holds")
    none = ms.main_claims(ms.Config(), _metrics(1.0, 0.3, 1.01, 0.72, 1.1, 1.2, [{"forgetting": 0.1, "degradation": 0.0}]))
    assert none[5]["verdict"] == "not testable here" and none[5]["tests"] == []
    assert none[5]["precondition"]["value"] == pytest.approx(0.1 - 0.42)
    worse = ms.main_claims(ms.Config(), _metrics(1.0, 0.3, 1.01, 0.72, 1.1, 1.2, [{"forgetting": 0.42, "degradation": 0.005}]))
    assert worse[5]["verdict"] == "fails"                                # as much forgetting, less harm
    # 2 not testable: no memorization gap (L_rep >= L_val)
    assert ms.main_claims(ms.Config(), _metrics(1.0, 1.05, 1.01, 1.0, 1.1, 1.2, pts))[1]["verdict"] == "not testable here"
    assert "set by hand" in ms.main_claims(ms.Config(p=0.2), _metrics(1.0, 0.3, 1.01, 0.72, 1.1, 1.2, pts))[2]["detail"]


def test_main_claims_over_seeds_reach_inconclusive():
    """Over seeds the verdict comes from the paired interval of the margins: 3a at +1%, +2%, +5.5% straddles 3%."""
    import eval as ev
    pts = [{"forgetting": 0.5, "degradation": 0.3}]
    per = {s: ms.main_claims(ms.Config(), _metrics(1.0, 0.3, v, 0.72, 1.1, 1.2, pts))
           for s, v in ((0, 1.01), (1, 1.02), (2, 1.055))}
    agg = ev.over_seeds(per)
    assert agg[2]["verdict"] == "inconclusive" and agg[2]["verdict_per_seed"] == {"0": "holds", "1": "holds", "2": "fails"}
    assert agg[0]["verdict"] == "holds"                                  # identical on every seed: no spread


def _row(**kw):
    base = dict(std_val=1.0, std_rep=0.2, val=1.0, rep=0.7, rep_mass=0.7, val_mass=1.0, rep_authors=0.7,
                val_authors=1.0, degradation=0.0, forgetting=0.5)
    base.update(kw)
    base["residual_gap"] = base["val"] - base["rep"]
    base["closure"] = (base["rep"] - base["std_rep"]) / (base["std_val"] - base["std_rep"])
    return base


def test_sweep_claims_reach_every_verdict_on_constructed_rows():
    # 5a, the repeated-set loss with sinks dropped: lower at p=0.7 than at p=0.3 holds, higher fails
    rows = [_row(p=0.1, rep=0.8), _row(p=0.3, rep=0.75), _row(p=0.7, rep=0.5, rep_mass=0.8)]
    c = ms.sweep_claims("p", rows)
    assert len(c) == 1 and c[0]["verdict"] == "holds" and c[0]["tests"][0]["value"] == pytest.approx(-0.25)
    assert "with drop_rescale=mass: L_rep 0.8000 vs 0.7000" in c[0]["detail"]
    # the measure is the repeated loss, not the residual gap: p=0.7 keeps a small gap (it degraded) yet isolation fails
    c = ms.sweep_claims("p", [_row(p=0.3, rep=0.5, val=1.0), _row(p=0.7, rep=0.6, val=0.65)])
    assert c[0]["verdict"] == "fails" and c[0]["tests"][0]["value"] == pytest.approx(0.1)
    one = ms.sweep_claims("p", [_row(p=0.7)])[0]
    assert one["verdict"] == "not testable here" and one["precondition"]["value"] == 1
    # 5c: robust at d=0.1 iff L_rep >= L_rep,std + (L_val,std - L_rep,std) / 2 = 0.6 here; broken at d=0.5 iff below d=0
    ok = ms.sweep_claims("noise", [_row(id_noise=0.0, rep=0.7), _row(id_noise=0.1, rep=0.61), _row(id_noise=0.5, rep=0.4)])
    assert V(ok) == ["holds", "holds"] and ok[0]["tests"][0]["threshold"] == pytest.approx(0.6)
    no = ms.sweep_claims("noise", [_row(id_noise=0.0, rep=0.5), _row(id_noise=0.1, rep=0.59), _row(id_noise=0.5, rep=0.6)])
    assert V(no) == ["fails", "fails"]
    assert V(ms.sweep_claims("noise", [_row(id_noise=0.1, rep=0.7)])) == ["holds", "not testable here"]
    # 5b: degradation at the largest size below the smallest
    assert ms.sweep_claims("size", [_row(n_embd=32, degradation=0.1), _row(n_embd=64, degradation=0.05)])[0]["verdict"] == "holds"
    assert ms.sweep_claims("size", [_row(n_embd=64, degradation=0.05), _row(n_embd=32, degradation=0.01)])[0]["verdict"] == "fails"
    assert ms.sweep_claims("size", [_row(n_embd=64)])[0]["verdict"] == "not testable here"
    with pytest.raises(ValueError):
        ms.sweep_claims("dynamics", [])


def test_dynamics_claims_hold_and_fail():
    r = lambda kind, amp, loss: {"kind": kind, "amplitude": amp, "mean_loss_second_half": loss}
    assert V(ms.dynamics_claims([r("standard", 1.0, 0.5), r("memsinks", 0.4, 0.2)])) == ["holds", "holds"]
    assert V(ms.dynamics_claims([r("standard", 0.4, 0.2), r("memsinks", 1.0, 0.5)])) == ["fails", "fails"]


def test_reported_seeds_exclude_the_seed_p_was_tuned_on(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ms.main(["--preset=smoke", f"--out_dir={tmp_path}", "--seeds=0,100"])
    assert e.value.code == 2 and "tuned" in capsys.readouterr().err.strip().splitlines()[-1]
    assert ms.P_TUNED == ms.Config().p and not set(ms.P_TUNE_SEEDS) & set(ms.REPORTED_SEEDS)


def test_compute_matched_dedup_fills_the_budget_with_fresh_stories():
    cfg = ms.Config(n_rep=3, rep=4, n_single=10, n_val=5, epochs=1.5)
    sets = ms.make_sets(cfg)
    assert ms.n_fresh(cfg) == math.ceil(1.5 * 22) - 13
    assert len(sets.dedup_fresh["x"]) == 13 + ms.n_fresh(cfg)
    key = lambda r: tuple(r[r != 0].tolist())
    assert [key(r) for r in sets.dedup_fresh["x"][:13]] == [key(r) for r in sets.dedup["x"]]
    seen = {key(r) for rows in (sets.train, sets.val) for r in rows["x"]}
    fresh = [key(r) for r in sets.dedup_fresh["x"][13:]]
    assert len(set(fresh)) == len(fresh) and not set(fresh) & seen      # new, distinct, none trained or validated on
    assert int(sets.dedup_fresh["repeated"][:, 0].sum()) == 3


def test_hard_concrete_grid_is_appendix_c_scaled_to_the_model():
    # default: 4 x 512 gated neurons of GPT-2 medium's 23 x 4096, lr 0.05 vs 1e-2
    g = ms.hc_grid(ms.Config())
    assert [(lp, it, cap) for lp, _, it, cap in g] == [(lp, it, it // 5) for lp in (100, 500, 1000)
                                                       for it in (1000, 2000, 4000)]
    assert [lam for _, lam, _, _ in g[::3]] == pytest.approx([100 * 2048 / 94208, 500 * 2048 / 94208, 1000 * 2048 / 94208])
    paper = T.parse_config(ms.Config, ["--preset=paper"], ms.PRESETS)
    assert [(lam, cap) for _, lam, _, cap in ms.hc_grid(paper)] == [(lp, it) for lp in (100, 500, 1000)
                                                                     for it in (1000, 2000, 4000)]
    assert ms.pick_hc([{"val_after_drop": 1.2}, {"val_after_drop": 1.1}, {"val_after_drop": 1.1}]) == 1


def test_smoke_run_end_to_end(tmp_path):
    out = str(tmp_path / "run")
    metrics, claims = ms.main(["--preset=smoke", f"--out_dir={out}", "--threads=1"])
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["config"]["preset"] == "smoke" and os.path.exists(os.path.join(out, "results.md"))
    assert [c["claim"][:2] for c in res["claims"]] == ["1 ", "2 ", "3a", "3b", "4 ", "5 "]
    assert all(set(c) >= {"claim", "value", "threshold", "verdict", "tests", "precondition"} for c in res["claims"])
    assert all(c["verdict"] in ("holds", "fails", "not testable here", "inconclusive") for c in res["claims"])
    # the claims read the right models (their verdicts are tested on constructed numbers above)
    f = res["metrics"]["models"]
    sv, sr = f["standard"]["final"]["plain/val"], f["standard"]["final"]["plain/rep"]
    closure = (f["memsinks"]["final"]["dropped/rep"] - sr) / (sv - sr)
    assert res["claims"][1]["value"] == {"gap closed": pytest.approx(closure)}
    assert res["claims"][3]["value"] == {"L_val MemSinks - deduplicated": pytest.approx(
        f["memsinks"]["final"]["dropped/val"] - f["dedup_steps"]["final"]["plain/val"])}   # compute-matched
    # hard concrete tuned over the (scaled) grid: 2 lambdas x 2 iteration caps, the lowest validation loss chosen
    post = res["metrics"]["posthoc"]
    assert [(t["lambda_paper"], t["iterations_paper"], t["cap"]) for t in post["hc_tuning"]] == \
        [(100.0, 10, 2), (100.0, 20, 4), (1000.0, 10, 2), (1000.0, 20, 4)]
    assert all(t["val_after_drop"] == pytest.approx(sum(t["val"]) / 2) for t in post["hc_tuning"])
    best = min(post["hc_tuning"], key=lambda t: t["val_after_drop"])
    assert (post["hc_choice"]["lambda_paper"], post["hc_choice"]["cap"]) == (best["lambda_paper"], best["cap"])
    assert "one seed (0)" in open(os.path.join(out, "results.md")).read()
    assert set(f["memsinks"]["final"]) == {f"{m}/{s}" for m in ("dropped", "expected", "own") for s in ("val", "rep")}
    assert f["dedup_epochs"]["steps"] < f["standard"]["steps"] == f["dedup_steps"]["steps"]
    assert len(res["metrics"]["posthoc"]["hard_concrete"]) == 2
    assert {"fig3_gradient_masking.png", "fig4a_val_loss.png", "fig4b_repeated_loss.png",
            "fig4c_tradeoff.png"} <= set(os.listdir(out))
    # a rerun that changes only post-hoc settings reuses the five finished models (train.run_key), untouched,
    # and reports the same numbers
    ckpts = {f: os.stat(os.path.join(out, "ckpt", f)).st_mtime_ns for f in os.listdir(os.path.join(out, "ckpt"))}
    assert len([f for f in ckpts if f.endswith(".pt")]) == 5       # (each with its .time.json side file)
    metrics2, _ = ms.main(["--preset=smoke", f"--out_dir={out}", "--threads=1", "--drop_ratios=0.1", "--hc_iters=15"])
    assert {f: os.stat(os.path.join(out, "ckpt", f)).st_mtime_ns for f in os.listdir(os.path.join(out, "ckpt"))} == ckpts
    assert metrics2["models"]["memsinks"]["final"] == metrics["models"]["memsinks"]["final"]
    # --seeds: the whole experiment per seed (seed 0's models are reused), each seed's results in seed_<s>/, and
    # every claim as mean ± std over the seeds with each seed's verdict
    agg, claims = ms.main(["--preset=smoke", f"--out_dir={out}", "--threads=1", "--seeds=0,1"])
    per = [json.load(open(os.path.join(out, f"seed_{s}", "results.json"))) for s in (0, 1)]
    assert agg["seeds"] == [0, 1] and [p["config"]["seed"] for p in per] == [0, 1]
    assert per[0]["metrics"]["models"]["memsinks"]["final"] == metrics["models"]["memsinks"]["final"]
    assert per[1]["metrics"]["models"]["standard"]["final"] != metrics["models"]["standard"]["final"]
    for i, c in enumerate(json.load(open(os.path.join(out, "results.json")))["claims"]):
        assert list(c["verdict_per_seed"].values()) == [p["claims"][i]["verdict"] for p in per]
        for j, t in enumerate(c["tests"]):
            vals = [p["claims"][i]["tests"][j]["value"] for p in per]
            assert t["mean"] == pytest.approx(sum(vals) / 2) and t["std"] == pytest.approx(abs(vals[0] - vals[1]) / 2 ** 0.5)
    assert "(mean ± std over seeds)" in open(os.path.join(out, "results.md")).read()


def test_two_workers_give_the_numbers_of_one_process(tmp_path, capsys, run_numbers):
    """--workers=2: the five models and the two post-hoc localizers run in two processes side by side, then this
    process loads every model from its cache; results.json equals the one-process run's, leaf by leaf."""
    args = ["--preset=smoke", "--threads=1"]
    ms.main(args + ["--workers=1", f"--out_dir={tmp_path / 'one'}"])
    capsys.readouterr()
    m2, _ = ms.main(args + ["--workers=2", f"--out_dir={tmp_path / 'two'}"])
    said = capsys.readouterr().out                            # this process's lines (the workers write their own)
    for name in ("standard", "dedup_epochs", "dedup_steps", "memsinks", "gradmask"):
        assert f"[{name}] resumed from" in said and f"[{name}] no checkpoint" not in said, name
    assert "hard_concrete r=" not in said and m2["env"]["workers"] == 2 and m2["worker_cpu_s"] > 0
    one, two = run_numbers(tmp_path / "one" / "results.json"), run_numbers(tmp_path / "two" / "results.json")
    assert len(one) > 200 and one == two


def test_workers_get_only_what_is_not_cached(tmp_path, monkeypatch):
    smoke = dataclasses.replace(ms.Config(), **{**ms.PRESETS["smoke"], "out_dir": str(tmp_path), "workers": 2})
    sets = ms.make_sets(smoke)
    calls = []

    def run_jobs(fn, jobs, n):
        calls.append(([job[2] for job in jobs], n))
        return [(None, 1.0)] * len(jobs)
    monkeypatch.setattr(T, "run_jobs", run_jobs)
    parts, cpu = ms.in_workers(sets, [(smoke, n) for n in ms.MAIN_JOBS])
    assert calls == [(list(ms.MAIN_JOBS), 2)] and set(parts) == set(ms.POSTHOC) and cpu == 7.0
    ms.train_named(smoke, sets, "standard", log=None)
    ms.train_named(smoke, sets, "memsinks", log=None)
    ms.in_workers(sets, [(smoke, n) for n in ms.MAIN_JOBS])
    assert calls[-1] == (["gradmask", "hard_concrete", "dedup_steps", "integrated_gradients", "dedup_epochs"], 2)
    # --sweep=p: the standard model is the same file for every p (and cached here): only the MemSinks models
    ms.in_workers(sets, [(dataclasses.replace(smoke, p=p), n) for p in (0.3, 0.5) for n in ("memsinks", "standard")])
    assert calls[-1] == (["memsinks", "memsinks"], 2)
    n = len(calls)                      # one job left (the same file twice): this process trains it, no workers
    assert ms.in_workers(sets, [(dataclasses.replace(smoke, n_embd=16), "standard")] * 2) == ({}, 0.0)
    # one worker, or a torchrun launch: nothing leaves this process
    assert ms.in_workers(sets, [(dataclasses.replace(smoke, workers=1), m) for m in ms.MAIN_JOBS]) == ({}, 0.0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert ms.T.side_by_side(smoke.workers, smoke.device) == 1 and ms.in_workers(sets, [(smoke, m) for m in ms.MAIN_JOBS]) == ({}, 0.0)
    assert len(calls) == n


def test_hard_concrete_tuning_does_not_rerun_a_larger_cap_after_a_run_that_ended_on_the_penalty(monkeypatch):
    cfg = dataclasses.replace(ms.Config(), **{**ms.PRESETS["smoke"], "hc_iters": (10, 20, 40)})
    sets = ms.make_sets(cfg)
    torch.manual_seed(0)
    net = M.GPT(ms.model_config(cfg, sets.tok.vocab_size))
    runs, real = [], ms.hard_concrete_scores
    monkeypatch.setattr(ms, "hard_concrete_scores", lambda *a, **k: runs.append(k["steps"]) or real(*a, **k))
    rows = ms.tune_hard_concrete(dataclasses.replace(cfg, hc_stop=0.0), sets, net, log=lambda s: None)
    assert runs == [2, 4, 8] * 2 and not any(r["stopped"] for r in rows)      # never ends early: every cap runs
    runs.clear()
    rows = ms.tune_hard_concrete(dataclasses.replace(cfg, hc_stop=2.0), sets, net, log=lambda s: None)
    assert runs == [2, 2] and all(r["stopped"] for r in rows)                 # ends at its first step: one run
    full = real(net, {k: sets.rep[k][:cfg.hc_tune_n] for k in ("x", "y")}, steps=8, lr=cfg.hc_lr, lam=rows[-1]["lambda"],
                beta=cfg.hc_beta, mask_p=cfg.hc_init, stop=2.0, batch_size=cfg.hc_batch, seed=cfg.seed)
    assert all(torch.equal(a, b) for a, b in zip(rows[-1]["scores"], full))


def _ckpt_names(cfg):
    """{kind: checkpoint file name} of the main run's standard, MemSinks and gradient-masked models."""
    sets = ms.make_sets(cfg)
    S = ms.steps_for(cfg, len(sets.train["x"]))
    return {k: f"{k}-{ms.train_key(cfg, sets, k, sets.train, S)}.pt" for k in ms.KINDS}


def test_checkpoints_are_keyed_on_what_training_sees():
    smoke = dataclasses.replace(ms.Config(), **ms.PRESETS["smoke"])
    base = _ckpt_names(smoke)
    for change in (dict(drop_ratios=(0.2,)), dict(hc_iters=(5,)), dict(hc_lambdas=(1.0,)), dict(hc_tune_n=3), dict(seeds=(0, 1)), dict(ig_steps=3),
                   dict(ig_positions="each"), dict(posthoc_first_layer=1), dict(eval_batch_size=7), dict(device="cpu"),
                   dict(log_every=3), dict(threads=1), dict(workers=1), dict(workers=3), dict(sweep="p"),
                   dict(out_dir="elsewhere")):
        assert _ckpt_names(dataclasses.replace(smoke, **change)) == base, change
    every = set(ms.KINDS)
    for change, differ in ((dict(lr=1e-2), every), (dict(seed=1), every), (dict(n_embd=16), every),
                           (dict(batch_size=4), every), (dict(n_single=30), every), (dict(epochs=2.0), every),
                           (dict(eval_points=3), every),           # the checkpoint holds the learning curve
                           (dict(p=0.3), {"memsinks"}), (dict(drop_rescale="mass"), {"memsinks"}),
                           (dict(id_noise=0.1), {"memsinks"}), (dict(ids="data"), {"memsinks"}),
                           (dict(g=0.5), {"memsinks", "gradmask"})):
        names = _ckpt_names(dataclasses.replace(smoke, **change))
        assert {k for k in names if names[k] != base[k]} == differ, change


@pytest.mark.parametrize("arg,msg", [("--p=1.5", "p=1.5 is out of range: p must be in (0, 1]"),
                                     ("--p=0", "p must be in (0, 1]"), ("--g=1", "g must be in (0, 1)"),
                                     ("--n_rep=0", "n_rep must be in [1, inf)"),
                                     ("--drop_ratios=0.1,1.5", "drop_ratios must be in (0, 1]"),
                                     ("--posthoc_first_layer=2", "posthoc_first_layer must be in [0, n_layer) = [0, 2)"),
                                     ("--setting=canaries", "setting must be one of 'repetition', 'canary'"),
                                     ("--g=0.01", "leaves no shared or no sink neurons"),
                                     ("--workers=0", "workers must be in [1, inf)")])
def test_bad_settings_exit_2_naming_the_field_and_range(tmp_path, capsys, arg, msg):
    with pytest.raises(SystemExit) as e:
        ms.main(["--preset=smoke", arg, f"--out_dir={tmp_path}"])
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_smoke_sweeps_and_canary(tmp_path):
    _, claims = ms.main(["--preset=smoke", f"--out_dir={tmp_path}", "--sweep=dynamics", "--threads=1"])
    res = json.load(open(tmp_path / "sweep_dynamics" / "results.json"))
    assert [r["kind"] for r in res["metrics"]["rows"]] == ["standard", "memsinks"]
    assert len(res["metrics"]["rows"][0]["trace"]) == 7 and [c["claim"][:2] for c in claims] == ["7 ", "7 "]
    m, claims = ms.main(["--preset=smoke", f"--out_dir={tmp_path}", "--sweep=noise", "--sweep_values=0,0.5",
                         "--threads=1"])
    by = {r["id_noise"]: r for r in m["rows"]}      # no d=0.1 here: only the "ids break isolation" claim
    assert len(claims) == 1 and claims[0]["tests"][0]["value"] == pytest.approx(by[0.5]["rep"] - by[0.0]["rep"])
    m, claims = ms.main(["--preset=smoke", f"--out_dir={tmp_path}", "--sweep=p", "--sweep_values=0.3,0.7",
                         "--threads=1"])
    by = {r["p"]: r for r in m["rows"]}             # one measure: the repeated loss with the sinks dropped
    assert claims[0]["tests"][0]["value"] == pytest.approx(by[0.7]["rep"] - by[0.3]["rep"])
    for r in m["rows"]:                             # both rescales evaluated on the same model, no retraining
        assert r["rep_authors"] == pytest.approx(r["rep"], abs=1e-6) and r["rep_mass"] != pytest.approx(r["rep"])
        assert r["residual_gap"] == pytest.approx(r["val"] - r["rep"])
    m, claims = ms.main(["--preset=smoke", f"--out_dir={tmp_path}", "--sweep=size", "--sweep_values=16,32",
                         "--threads=1"])
    assert [r["n_embd"] for r in m["rows"]] == [16, 32] and m["rows"][0]["params"] < m["rows"][1]["params"]
    assert claims[0]["tests"][0]["value"] == pytest.approx(m["rows"][1]["degradation"] - m["rows"][0]["degradation"])
    # TS-Canary with packed rows (per-token ids, document attention)
    m, _ = ms.main(["--preset=smoke", f"--out_dir={tmp_path / 'c'}", "--setting=canary", "--pack=true", "--threads=1"])
    assert "dropped/canary" in m["models"]["memsinks"]["final"]


GPT2_RANKS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gpt2.tiktoken")


@pytest.mark.skipif(not os.path.exists(GPT2_RANKS), reason="needs a gpt2.tiktoken GPT-2 BPE ranks file beside the repository")
def test_real_data_path_with_gpt2_bpe(tmp_path):
    """The --preset=paper data path (a text data set through `datasets`, GPT-2 BPE) on a local jsonl file."""
    path = tmp_path / "stories.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in D.make_stories(80, seed=5)))
    small = ["--preset=smoke", f"--gpt2_ranks={GPT2_RANKS}", "--n_embd=16", "--n_head=2", "--d_ff=32",
             "--block_size=24", "--rep=2", "--n_single=6", "--n_val=3", "--eval_points=1", "--drop_ratios=0.3",
             "--hc_iters=5", "--ig_steps=1", "--threads=1"]
    m, claims = ms.main(small + [f"--dataset={path}", f"--out_dir={tmp_path / 'out'}"])
    assert m["params"] > 50257 * 16 and len(claims) == 6
    with pytest.raises(FileNotFoundError):             # a missing file fails fast and says so
        ms.main(small + [f"--dataset={tmp_path / 'missing.jsonl'}", f"--out_dir={tmp_path / 'o2'}"])
