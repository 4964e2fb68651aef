"""compare.py: widening, sink layouts, routing, gate folding, fact recall per fact kind and D against explicit
references, tuning on the held-out request only, the attacks (relearning, quantization) against explicit loops,
claims to each verdict (one seed and over seeds), combining runs, and the smoke run end to end."""
import copy
import json
import math
import os
import shutil

import pytest
import torch

import compare as C
import eval as ev
import model as M
import train as T


def tiny(flavor="gpt2", d_ff=10, n_layer=2, seed=0, vocab=23):
    cfg = M.ModelConfig(flavor=flavor, vocab_size=vocab, block_size=16, n_layer=n_layer, n_head=2, n_embd=8,
                        d_ff=d_ff, bias=flavor == "gpt2")
    torch.manual_seed(seed)
    net = M.GPT(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return net


def rows(n=4, T_=7, vocab=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (n, T_), generator=g)
    y = torch.randint(1, vocab, (n, T_), generator=g)
    y[:, :2] = -100
    return {"x": x, "y": y}


# ---------------------------------------------------------------------------------------------- by construction

@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_widened_model_is_the_base_until_trained(flavor):
    base = tiny(flavor)
    net = C.widen(base, 6, seed=1)
    assert net.cfg.d_ff == 16
    x = rows()["x"]
    assert torch.equal(net(x)[0], base(x)[0]) or torch.allclose(net(x)[0], base(x)[0], atol=1e-6)
    # the new neurons are live: their keys are nonzero, so training can move their value vectors
    assert float(net.blocks[0].mlp.up.weight[10:].detach().abs().sum()) > 0


def test_nulls_layout_exact_sinks_and_forget_list():
    lay = C.Layout("nulls", 5, 40, 6, 0.1)
    on = lay.on([3, 7])
    assert on.sum(1).tolist() == [6, 6]
    m = lay.row_mask([3, 7])
    assert m.shape == (2, 1, 45) and torch.equal(m[:, 0, :5], torch.ones(2, 5))
    lay.forgotten = [3]
    m2 = lay.row_mask([3, 7])
    assert m2[0, 0, 5:].sum() == 0                           # a forgotten source's sinks never switch on
    shared = on[0] & on[1]
    assert torch.equal(m2[1, 0, 5:].bool(), on[1] & ~shared)  # others lose only the sinks they share with it


def test_memsinks_layout_is_memsinks_bernoulli_masks():
    import memsinks as MS
    lay = C.Layout("memsinks", 4, 50, 1, 0.3)
    dense = MS.sink_mask(torch.tensor([[11, 11]]), 4, 50, 0.3)[0, 0]
    assert torch.equal(lay.row_mask([11])[0, 0], dense)


@pytest.mark.parametrize("kind", ["nulls", "memsinks"])
def test_training_mask_equals_the_dense_row_mask(kind):
    net = tiny("llama", d_ff=24)
    lay = C.Layout(kind, 8, 16, 4, 0.3)
    b = rows()
    ids = torch.tensor([2, 5, 2, 9])
    out = net(b["x"], mlp_mask=lay.train_mask(ids, b["x"].shape[1]))[0]
    ref = net(b["x"], mlp_mask=lay.row_mask(ids))[0]
    assert torch.allclose(out, ref, atol=1e-5)


def _routed(net, lay, marker=(21, 22)):
    r = C.Routed(net, lay, list(marker), pad_id=0)
    prompts = {s: [(s, s + 1, 21, 22), (s + 2, s, 21, 22)] for s in (2, 5, 9)}
    r.fit_router(prompts)
    return r


def test_routing_prefix_nearest_and_never_forgotten():
    net = tiny("gpt2", d_ff=20)
    lay = C.Layout("nulls", 10, 10, 3, 0.1)
    r = _routed(net, lay)
    assert r.prefix([4, 5, 21, 22, 7, 8, 0, 0]) == (4, 5, 21, 22)
    assert r.prefix([4, 5, 6, 0, 0]) == (4, 5, 6)
    # a source's own training prompt routes to it (its embedding is its own mean)
    emb = r.embed([(5, 6, 21, 22)])
    sims = torch.nn.functional.normalize(emb, dim=-1) @ torch.nn.functional.normalize(r.keys, dim=-1).t()
    assert int(r.route([(5, 6, 21, 22)])[0]) == r.key_ids[int(sims.argmax())]
    r.forget([r.key_ids[int(sims.argmax())]])
    assert int(r.route([(5, 6, 21, 22)])[0]) not in lay.forgotten
    # scoring and generation use the same route: the prompt's
    x = torch.tensor([[5, 6, 21, 22, 3, 4]])
    lp = r.token_logprobs(x, torch.tensor([[-100, -100, -100, 3, 4, 1]]))
    assert torch.isfinite(lp).all()
    assert r.generate([[5, 6, 21, 22]], 2).shape == (1, 2)


def test_fold_gates_equals_the_masked_forward():
    net = tiny("gpt2", d_ff=12, n_layer=3)
    g = torch.Generator().manual_seed(3)
    masks = [None] + [torch.rand(12, generator=g) for _ in range(2)]
    x = rows()["x"]
    folded = C.fold_gates(net, masks)
    assert torch.allclose(folded(x)[0], net(x, mlp_mask=masks)[0], atol=1e-5)


def test_one_source_at_a_time_replaces_the_forget_list_and_memsinks_drops_every_sink():
    net = tiny("gpt2", d_ff=30)
    lay = C.Layout("nulls", 10, 20, 4, 0.1)
    r = _routed(net, lay)
    r.forget([2, 5])
    assert r.layout.forgotten == [2, 5]
    r.forget([9], only=True)
    assert r.layout.forgotten == [9] and r.cache == {}
    base = tiny("gpt2", d_ff=10)
    wide = C.widen(base, 20)
    with torch.no_grad():
        for b in wide.blocks:                      # sinks that learned something: the deployment must drop them
            b.mlp.down.weight[:, 10:] = torch.randn(8, 20)      # (a constant column would vanish in the norm)
            b.mlp.up.weight[10:] = 0.5
    off = C.SinksOff(wide, C.Layout("memsinks", 10, 20, 1, 0.3))
    x = rows()["x"]
    assert torch.allclose(off(x)[0], base(x)[0], atol=1e-5)
    assert not torch.allclose(wide(x)[0], base(x)[0], atol=1e-3)


# ---------------------------------------------------------------------------------------------- the score

def _tok():
    import memadapt as MA
    return MA.world_vocab_tokenizer()


def test_fact_items_cut_at_the_value_and_recall_is_the_value_tokens_probability():
    tok = _tok()
    recs = [{"question": "Where does Ann live?", "answer": "Ann lives in Tolmar.", "value": "Tolmar"},
            {"question": "What does Ann do?", "answer": "Ann works as a baker.", "value": "baker"}]
    P, V = C.fact_items(tok, recs)
    import memadapt as MA
    qs, ans = MA.encode_qa(tok, recs)
    for p, v, q, a, r in zip(P, V, qs, ans, recs):
        assert v == tok.encode(" " + r["value"]) and p[:len(q)] == q and p[len(q):] + v == a[:len(p) - len(q) + len(v)]
    net = tiny("gpt2", vocab=tok.vocab_size, d_ff=16)
    net.cfg.block_size = 64
    got = C.fact_recall(net, (P, V), 8, tok.pad_id)
    for i, (p, v) in enumerate(zip(P, V)):                     # explicit: one forward per value token, float64
        lp = 0.0
        for j, t in enumerate(v):
            logits = net(torch.tensor([p + v[:j]]))[0][0, -1].detach().double()
            lp += float(torch.log_softmax(logits, -1)[t])
        assert float(got[i]) == pytest.approx(math.exp(lp / len(v)), rel=1e-4)
    with pytest.raises(ValueError, match="not a span"):
        C.fact_items(tok, [{"question": "Who?", "answer": "Ann.", "value": "Tolmar", "fact_id": "p1.city"}])


def test_value_span_takes_the_last_occurrence():
    assert C.value_span([1, 2, 3, 2, 3], [2, 3]) == (3, 5)
    assert C.value_span([1, 2], [3]) is None


def test_distance_worked_example_and_groups_by_role():
    ret = {"forget_unique": 0.1, "forget_entailed": 0.6, "retain": 0.8, "general": 0.5}
    ft = {"forget_unique": 0.9, "forget_entailed": 0.9, "retain": 0.9, "general": 0.6}
    m = {"forget_unique": 0.3, "forget_entailed": 0.2, "retain": 0.7, "general": 0.6}
    # forget groups against Retrained (0.2, 0.4), the others against Finetuned (0.2, 0.0): mean 0.2
    assert C.distance(m, ret, ft) == pytest.approx(0.2)
    m2 = {k: v for k, v in m.items() if k != "forget_entailed"}        # an independent request has no such facts
    assert C.distance(m2, ret, ft) == pytest.approx(0.4 / 3)
    assert C.distance(dict(ret, retain=0.9, general=0.6), ret, ft) == 0.0
    tok = _tok()
    mk = lambda role, v: {"question": "Where?", "answer": f"In {v}.", "value": v, "role": role}
    sets = {"retain_perturbed": [mk("unique", "Tolmar")], "real_authors": [mk("unique", "Tolmar")], "world_facts": []}
    g = C.groups_of(tok, [mk("unique", "Tolmar"), mk("shared", "Tolmar"), mk("inferable", "Tolmar")], sets)
    assert [len(g[k][0]) for k in C.GROUPS] == [1, 2, 1, 1]


def test_world_fact_roles_of_a_constructed_request():
    """The world's ground truth: a forgotten person's family facts are shared while a sibling is retained, and
    every fact is unique once the whole family is forgotten."""
    import data
    w = data.make_world(0, n_people=20, n_families=8, n_cities=4, n_holdout=2)
    fam = {}
    for p in w.people:
        fam.setdefault(p.family, []).append(p.id)
    kin = next(ids for ids in fam.values() if len(ids) >= 2)
    one = w.fact_roles([kin[0]])
    assert set(one.values()) >= {"unique", "shared"}
    wi = data.make_world(0, n_people=20, n_families=8, n_cities=4, n_holdout=2, forget_kind="independent")
    assert set(wi.forget_fact_roles("forget10").values()) == {"unique"}       # whole families: nothing kept
    for fid, role in one.items():
        f = next(x for x in w.facts if x.id == fid)
        kept = {p.id for p in w.people} - {kin[0]}
        if f.kind != "inferred":
            assert (role == "shared") == bool(set(f.source_ids) & kept)
    assert w.forget_fact_roles("forget10") == w.fact_roles({r["person"] for r in w.tofu_split("forget10")})


# ---------------------------------------------------------------------------------------------- tuning

class _R:
    kind, mcfg = "entangled", None

    def __init__(self, forget_ids, tune_ids):
        self.forget_ids, self.tune_ids = forget_ids, tune_ids
        self.forget, self.tune = ["reported"], ["held-out"]
        self.retain, self.tune_retain = ["retain"], ["tune-retain"]
        self.retrained_tune, self.retrained = "ret_tune", "ret"
        self.tune_groups, self.tune_ref = "tune_groups", None


def test_tuning_runs_only_on_the_held_out_request(monkeypatch):
    cfg = T.parse_config(C.Config, ["--preset=smoke", "--posthoc=ga", "--lr_mults=0.1,1,10"], C.PRESETS)
    seen = []

    def fake_unlearn(cfg_, S, R, name, value, start, forget_recs, retain_recs, steps=None):
        seen.append((value, forget_recs, retain_recs))
        return {"lr": value}, 0.0
    monkeypatch.setattr(C, "unlearn_with", fake_unlearn)
    # D on the held-out request is |lr - 1e-4| (lowest at the middle grid value)
    score = lambda net, groups: ({"retain": 0.0} if isinstance(net, str) or net == "ft" else
                                 {"retain": abs(net["lr"] - 1e-4)})
    net, rec = C.tune_row(cfg, {"ft": "ft"}, _R([1, 2], [3, 4]), "ga", score)
    assert rec["value"] == pytest.approx(1e-4) and net == {"lr": pytest.approx(1e-4)}
    assert [s[1] for s in seen] == [["held-out"]] * 3 + [["reported"]]          # the grid on held-out data only
    assert [s[2] for s in seen] == [["tune-retain"]] * 3 + [["retain"]]
    with pytest.raises(ValueError, match="report also uses"):
        C.tune_row(cfg, {"ft": "ft"}, _R([1, 2], [2, 5]), "ga", score)
    # a pick at the grid's low end scores grid_extend more lrs below it, still on the held-out request only
    seen.clear()
    low = C.baselines.DEFAULTS["ga"]["lr"] * 0.1 / 50          # below the grid: D falls toward it
    score = lambda net, groups: ({"retain": 0.0} if isinstance(net, str) or net == "ft" else
                                 {"retain": abs(net["lr"] - low)})
    net, rec = C.tune_row(cfg, {"ft": "ft"}, _R([1, 2], [3, 4]), "ga", score)
    lr0 = C.baselines.DEFAULTS["ga"]["lr"] * 0.1
    assert rec["extended"] == cfg.grid_extend == 2 and rec["grid"][:2] == pytest.approx([lr0 / 100, lr0 / 10])
    assert rec["value"] == pytest.approx(lr0 / 100) and [s[1] for s in seen] == [["held-out"]] * 5 + [["reported"]]


def test_every_row_gets_a_grid_of_the_same_size():
    cfg = T.parse_config(C.Config, [], C.PRESETS)
    sizes = {n: len(C.grid_of(cfg, n)) for n in cfg.posthoc.split(",")}
    assert set(sizes.values()) == {len(cfg.lr_mults)}
    assert C.grid_of(cfg, "neumuter")[-1] == cfg.mask_epochs


# ---------------------------------------------------------------------------------------------- attacks

def test_quantize_is_round_to_nearest_per_output_row():
    net = tiny("gpt2", d_ff=12)
    for bits in (8, 4):
        q = C.quantize(net, bits)
        qmax = 2 ** (bits - 1) - 1
        for (n, m), (_, mq) in zip(net.named_modules(), q.named_modules()):
            if not isinstance(m, torch.nn.Linear):
                continue
            W = m.weight.detach().double()
            for i in range(W.shape[0]):                          # explicit, one row at a time
                s = max(abs(float(w)) for w in W[i]) / qmax
                want = [max(-qmax, min(qmax, round(float(w) / s))) * s for w in W[i]]
                assert torch.allclose(mq.weight[i].double(), torch.tensor(want, dtype=torch.float64), atol=1e-6), n
            assert len(torch.unique(mq.weight[0])) <= 2 * qmax + 1
    # an exactly representable model does not move
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randint(-7, 8, m.weight.shape).float() * 0.25)
                m.weight[:, 0] = 7 * 0.25
    q = C.quantize(net, 4)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), q.parameters()))


def test_relearn_curve_equals_explicit_adam_steps():
    # llama flavor: no attention-key bias, whose exact gradient is 0 (softmax shift invariance) and whose Adam step
    # g / (|g| + eps) on rounding noise differs between any two implementations
    net = tiny("llama")
    b = rows()
    lr, steps = 1e-2, 3
    snaps = C.relearn_curve(net, b, lr, [1, steps], lambda m: copy.deepcopy(m))
    assert len(snaps) == 2
    got = snaps[-1]
    ref = copy.deepcopy(net)
    params = list(ref.parameters())
    m = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    v = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(1, steps + 1):
        for p in params:
            p.grad = None
        ref.train()
        _, loss = ref(b["x"], b["y"])
        loss.backward()
        with torch.no_grad():
            for i, p in enumerate(params):
                g = p.grad.double()
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                step = lr * (m[i] / (1 - b1 ** t)) / ((v[i] / (1 - b2 ** t)).sqrt() + eps)
                p -= step.to(p.dtype)
    # atol: 1% of one step (a coordinate whose gradient is ~eps moves by g / (|g| + eps): float32 vs float64 shows
    # there); a wrong lr, step count or bias correction moves coordinates by several steps' worth
    for (n, a), r in zip(got.named_parameters(), params):
        assert torch.allclose(a, r, atol=1e-2 * lr), n
    assert not any(torch.equal(a, b_) for a, b_ in zip(got.parameters(), net.parameters()) if a.dim() == 2)


def test_sink_models_retrain_when_the_data_changes(tmp_path):
    """train_sinks' checkpoints are named by train.run_key over the rows (and the widened base, the sinks): the
    same QA reuses the model, one changed answer trains a new one; each file holds its key."""
    import glob
    import memadapt as MA
    cfg = T.parse_config(C.Config, ["--preset=smoke", f"--out_dir={tmp_path}", "--ft_epochs=1"], C.PRESETS)
    mcfg = C.ma_config(cfg)
    D = MA.load_data(mcfg)
    tok, recs = D["tok"], D["sets"]["full"]
    torch.manual_seed(0)
    base = M.GPT(MA.model_config(mcfg, tok.vocab_size))
    cached = lambda recs: C.train_sinks(cfg, mcfg, base, tok, recs, "nulls")[2]["cached"]
    assert not cached(recs) and cached(recs)
    other = [dict(r) for r in recs]
    other[0]["answer"] = recs[1]["answer"]
    assert not cached(other) and cached(other)
    files = sorted(glob.glob(str(tmp_path / "ckpt" / "nulls-*.pt")))
    assert len(files) == 2
    for f in files:
        assert T.load_checkpoint(f)["config"]["run_key"] == os.path.basename(f)[len("nulls-"):-len(".pt")]


def test_relearn_split_alternates_within_each_person():
    recs = [{"person": p, "i": i} for i, p in enumerate([1, 1, 2, 1, 2, 2, 3])]
    a, b = C.relearn_split(recs)
    # person 1 at 0, 1, 3 -> a, b, a; person 2 at 2, 4, 5 -> a, b, a; person 3 at 6 -> a
    assert [r["i"] for r in a] == [0, 2, 3, 5, 6] and [r["i"] for r in b] == [1, 4]


# ---------------------------------------------------------------------------------------------- claims

def _M(d, gaps=None, drop=0.0):
    """A request's metrics with D per row and relearning / quantization gaps (Retrained's are 0)."""
    gaps = gaps or {}
    att = {n: {"relearn": {"0.001": {"held": [0.0, g], "retain": [0.5, 0.5]}},
               "quant": {"4": {"unique": g, "retain": 0.5}}, "retain_before": 0.5} for n, g in gaps.items()}
    att["retrained"] = {"relearn": {"0.001": {"held": [0.0, 0.0], "retain": [0.5, 0.5 - drop]}},
                        "quant": {"4": {"unique": 0.0, "retain": 0.5}}, "retain_before": 0.5}
    return {"d": d, "attacks": att}


def test_claim_closer_and_beats_finetuned_every_verdict():
    M = _M({"nulls_all": 0.05, "npo": 0.08, "ga": 0.12, "finetuned": 0.2})
    c = C.claim_closer("entangled", "nulls_all", M, ["npo", "ga"])
    assert c["verdict"] == "holds" and "npo" in c["detail"] and c["tests"][0]["threshold"] == 0.08
    M["d"]["nulls_all"] = 0.09
    assert C.claim_closer("entangled", "nulls_all", M, ["npo", "ga"])["verdict"] == "fails"
    assert C.claim_beats_finetuned("entangled", "nulls_all", M)["verdict"] == "holds"
    M["d"]["nulls_all"] = 0.3
    assert C.claim_beats_finetuned("entangled", "nulls_all", M)["verdict"] == "fails"


def test_claim_attack_every_verdict():
    M = _M({"memadapt": 0.05, "npo": 0.08}, {"memadapt": 0.01, "npo": 0.2})
    for attack in ("relearn", "quant"):
        assert C.claim_attack("independent", "memadapt", M, ["npo"], attack)["verdict"] == "holds"
    M["attacks"]["memadapt"]["relearn"]["0.001"]["held"][-1] = 0.3
    assert C.claim_attack("independent", "memadapt", M, ["npo"], "relearn")["verdict"] == "fails"
    hurt = _M({"memadapt": 0.05, "npo": 0.08}, {"memadapt": 0.01, "npo": 0.2}, drop=0.05)
    c = C.claim_attack("independent", "memadapt", hurt, ["npo"], "relearn")
    assert c["verdict"] == "not testable here" and c["precondition"]["value"] == {"0.001": pytest.approx(0.05)}
    assert C.attack_gap(hurt, "memadapt", "relearn") is None
    # the claims' lr: the largest that keeps Retrained's drop <= RETRAINED_HARM, from Retrained's numbers alone
    r = M["attacks"]["retrained"]
    r["relearn"]["0.01"] = {"held": [0.0, 0.0], "retain": [0.4, 0.3]}          # hurts Retrained by 0.2
    r["relearn"]["0.0001"] = {"held": [0.0, 0.0], "retain": [0.5, 0.5]}
    assert C.attack_lr(M) == "0.001"
    assert C.claim_attack("independent", "memadapt", hurt, ["npo"], "quant")["verdict"] == "holds"


def test_paired_interval_over_seeds_both_ways():
    """The threshold (the closest post-hoc row's D) moves with the seed; the margin pairs within each seed."""
    def seeds(pairs):
        return {s: [C.claim_closer("independent", "memsinks", _M({"memsinks": a, "npo": b}), ["npo"])]
                for s, (a, b) in enumerate(pairs)}
    (c,) = ev.over_seeds(seeds([(0.05, 0.10), (0.30, 0.36), (0.12, 0.16)]))     # always lower by 0.04-0.06
    assert c["verdict"] == "holds"
    (c,) = ev.over_seeds(seeds([(0.10, 0.05), (0.36, 0.30), (0.16, 0.12)]))     # always higher
    assert c["verdict"] == "fails"
    (c,) = ev.over_seeds(seeds([(0.05, 0.10), (0.36, 0.30), (0.12, 0.16)]))     # one seed the other way
    assert c["verdict"] == "inconclusive" and c["verdict_per_seed"]["1"] == "fails"
    assert "| independent: memsinks D < the closest post-hoc row's |" in "\n".join(ev.claims_markdown([c]))


def test_json_safe_writes_nan_as_null():
    got = ev.json_safe({"a": [1.0, float("nan")], "b": (float("inf"), 2), "c": {"d": -float("inf"), "e": "x"}})
    assert got == {"a": [1.0, None], "b": [None, 2], "c": {"d": None, "e": "x"}}
    json.dumps(got, allow_nan=False)


def test_config_range_errors_name_the_field():
    with pytest.raises(SystemExit) as e:
        T.parse_config(C.Config, ["--p=1.5"], C.PRESETS)
    assert e.value.code == 2
    with pytest.raises(ValueError, match="posthoc"):
        C.Config(posthoc="npo,nonsense")
    with pytest.raises(ValueError, match="forget_kinds"):
        C.Config(forget_kinds=("entangled", "entangled"))
    with pytest.raises(ValueError, match="relearn_at"):
        C.Config(relearn_at=(4, 2))
    with pytest.raises(ValueError, match="relearn_lrs"):
        C.Config(relearn_lrs=(1e-4, 1e-5))


# ---------------------------------------------------------------------------------------------- end to end

def test_smoke_run_writes_every_row_and_column_and_combines(tmp_path):
    out = str(tmp_path / "cmp")
    runs, claims = C.main(["--preset=smoke", f"--out_dir={out}", f"--ma_out_dir={out}/ma"])
    for f in ("results.json", "results.md", "scatter.png", "relearn.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    res = json.load(open(os.path.join(out, "results.json")))
    run = res["metrics"]["runs"][0]
    posthoc = ["ga", "npo", "neumuter", "npo_loc", "npo_rand"]
    for kind in ("independent", "entangled"):
        M = run["requests"][kind]
        assert set(M["scores"]) == set(C.REFERENCES) | set(C.METHODS_BC) | set(posthoc)
        assert set(M["tune_sources"]).isdisjoint(M["forget_sources"])
        for n in C.METHODS_BC + tuple(posthoc) + ("finetuned",):
            assert math.isfinite(M["d"][n]), (kind, n)
        for n in ("nulls_all", "memsinks", "memadapt", *posthoc):
            assert 0 <= M["openunlearning"][n]["agg"] <= 1 and set(M["attacks"][n]["quant"]) == {"8", "4"}
        assert M["d"]["retrained"] == pytest.approx(C.distance(M["scores"]["retrained"], M["scores"]["retrained"],
                                                               M["scores"]["finetuned"]))
        assert M["cost"]["memadapt"]["params_touched"] == 0 and M["cost"]["npo"]["params_touched"] > 0
        assert M["cost"]["npo_loc"]["params_touched"] < M["cost"]["npo"]["params_touched"]
    assert run["requests"]["entangled"]["roles"]["forget_entailed"] > 0
    assert run["requests"]["independent"]["roles"]["forget_entailed"] == 0
    assert set(run["requests"]["independent"]["sequential"]) == {"nulls_all", "memsinks", "memadapt", *posthoc}
    assert all(c["verdict"] in ev.VERDICTS for c in res["claims"])
    # the requests ran in two worker processes; one process, one request after the other, gives the same numbers
    assert run["workers"] == 2
    # each request's own models trained beside the shared ones (request_model_job), so the request loaded them
    assert all(t["cached"] for M in run["requests"].values() for t in M["times"].values())
    shutil.copytree(out, out + "_w1", ignore=shutil.ignore_patterns("results.*", "*.png", ".lock"))
    one, _ = C.main(["--preset=smoke", f"--out_dir={out}_w1", f"--ma_out_dir={out}/ma", "--workers=1"])
    for kind in ("independent", "entangled"):
        for k in ("scores", "d", "openunlearning", "attacks", "sequential"):
            assert one[0]["requests"][kind][k] == run["requests"][kind][k], (kind, k)
    # a second seed run elsewhere, then one report of both
    out1 = str(tmp_path / "cmp1")
    C.main(["--preset=smoke", f"--out_dir={out1}", f"--ma_out_dir={out}/ma", "--seeds=1"])
    runs, claims = C.main(["--preset=smoke", f"--out_dir={tmp_path / 'both'}", f"--combine={out},{out1}"])
    assert [r["seed"] for r in runs] == [0, 1] and all(set(c["verdict_per_seed"]) == {"0", "1"} for c in claims)
    with pytest.raises(ValueError, match="another config"):
        C.main(["--preset=smoke", "--p=0.5", f"--out_dir={tmp_path / 'x'}", f"--combine={out}"])
    with pytest.raises(ValueError, match="distinct seeds"):
        C.main(["--preset=smoke", f"--out_dir={tmp_path / 'y'}", f"--combine={out},{out}"])


def test_real_preset_builds_memadapts_real_setting():
    """--preset=real is only built and checked here (a full run loads SmolLM2-135M): its memadapt.py settings are
    memadapt.py's real preset, so the same checkpoints serve both; the sink pool widens a llama MLP (tested above)."""
    import memadapt as MA
    cfg = T.parse_config(C.Config, ["--preset=real"], C.PRESETS)
    want = T.parse_config(MA.Config, ["--preset=real"], MA.PRESETS)
    got = C.ma_config(cfg)
    for k in MA.MEM_FIELDS + MA.FT_FIELDS:
        assert getattr(got, k) == getattr(want, k), k
    assert got.out_dir == want.out_dir and cfg.init_from == "smollm2"


def test_prompt_marker_of_the_world_template_and_of_a_bare_template():
    import memadapt as MA
    tok = MA.world_vocab_tokenizer()
    assert [tok.itos[i] for i in C.prompt_marker(tok)] == ["Answer", ":"]

    class Bare:                 # a chat() that returns the bare question: nothing marks the prompt's end
        def __init__(self, t):
            self.t = t

        def chat(self, q):
            return q

        def encode(self, s):
            return self.t.encode(s)
    assert C.prompt_marker(Bare(tok)) == []
    r = C.Routed(tiny(), C.Layout("nulls", 10, 10, 2, 0.1), [], pad_id=0)
    assert r.prefix([4, 5, 6, 0]) == (4, 5, 6)


def test_real_path_on_a_tiny_local_llama(tmp_path):
    """--preset=real's code path (a local HF checkpoint with its own tokenizer as the base, the sink pool on a llama
    MLP) on a tiny random Llama: every row comes out."""
    from test_memadapt import tiny_llama_folder
    folder = tiny_llama_folder(tmp_path)
    out = tmp_path / "out"
    runs, claims = C.main(["--preset=real", f"--init_from={folder}", "--n_people=12", "--n_families=5",
                           "--n_holdout=2", "--layer=1", "--mem_sqrt=16", "--topk=4", "--k_dim=8", "--entries=8",
                           "--mem_epochs=1", "--ft_epochs=1", "--unlearn_steps=2", "--unlearn_batch=4",
                           "--posthoc=npo,neumuter", "--block_size=64", "--eval_n=8", "--n_pool=16", "--n_source=4",
                           "--mask_epochs=1", "--relearn_at=1", "--eval_batch=64", "--lr_mults=1",
                           f"--out_dir={out}", f"--ma_out_dir={out / 'ma'}"])
    M = runs[0]["requests"]["independent"]
    assert {"npo", "neumuter", *C.METHODS_BC} <= set(M["d"])
    assert all(c["verdict"] in ev.VERDICTS for c in claims)


def test_smoke_keeps_memadapt_models_inside_out_dir(tmp_path):
    cfg = T.parse_config(C.Config, ["--preset=smoke", f"--out_dir={tmp_path}"], C.PRESETS)
    assert C.ma_config(cfg).out_dir == str(tmp_path / "memadapt")           # not ./out/... of the working dir
    assert C.ma_config(C.Config()).out_dir == C.MA.Config().out_dir         # the default shares memadapt.py's
