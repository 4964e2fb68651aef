"""nulls.py: the unlearning operations, routing, and the smoke run end to end."""
import dataclasses
import json
import os

import pytest
import torch

import model
import nulls
import train


def _tiny(n_gen=4, n_pool=40):
    cfg = model.ModelConfig(flavor="llama", vocab_size=30, n_layer=2, n_head=2, n_embd=16, d_ff=n_gen + n_pool,
                            bias=False, block_size=16)
    torch.manual_seed(0)
    return model.GPT(cfg).eval()


def test_forget_list_errors_idempotence_and_state():
    s = nulls.Sinks(4, 40, 6, sources=[1, 2, 3])
    with pytest.raises(KeyError, match="does not exist"):
        s.forget(7)
    s.forget(2)
    s.forget(2)                                   # forgetting twice is harmless
    assert s.forgotten == {2}
    r = nulls.Sinks.from_state_dict(s.state_dict())
    assert r.forgotten == {2} and r.sources == [1, 2, 3]
    m = r.row_mask([2, 1])                        # a forgotten source is never activated
    assert m[0, 0, 4:].sum() == 0 and m[0, 0, :4].eq(1).all()
    with pytest.raises(ValueError):
        nulls.Sinks(4, 40, 41, sources=[1])


def test_remove_permanently_zeroes_exactly_the_sources_neurons():
    net = _tiny()
    s = nulls.Sinks(4, 40, 6, sources=[1, 2, 3])
    x = torch.randint(0, 30, (1, 10))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    backbone = net(x, mlp_mask=s.backbone_mask())[0]
    other = net(x, mlp_mask=s.row_mask([3]))[0]
    nulls.remove_permanently(net, s, 2)
    assert s.forgotten == {2}
    cols = 4 + nulls.source_sinks(torch.tensor([2]), 40, 6)[0]
    for l, b in enumerate(net.blocks):
        for name, w, dim in (("up", b.mlp.up.weight, 0), ("gate", b.mlp.gate.weight, 0), ("down", b.mlp.down.weight, 1)):
            key = f"blocks.{l}.mlp.{name}.weight"
            zeroed = w.index_select(dim, cols)
            assert zeroed.eq(0).all()
            keep = torch.ones(w.shape[dim], dtype=torch.bool)
            keep[cols] = False
            assert torch.equal(w.index_select(dim, keep.nonzero()[:, 0]), before[key].index_select(dim, keep.nonzero()[:, 0]))
    # the backbone is untouched; another source loses exactly the neurons it shared with source 2
    assert torch.allclose(net(x, mlp_mask=s.backbone_mask())[0], backbone)
    shared = set(cols.tolist()) & set((4 + nulls.source_sinks(torch.tensor([3]), 40, 6)[0]).tolist())
    after_other = net(x, mlp_mask=nulls.source_mask(torch.tensor([[3]]), 4, 40, 6))[0]
    assert torch.allclose(after_other, other) == (len(shared) == 0)


def test_nearest_sources_cosine_and_exclusion():
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    ids = [5, 6, 7, 8]
    q = torch.tensor([[1.0, 0.05], [0.1, 1.0]])
    assert nulls.nearest_sources(q, emb, ids).tolist() == [5, 7]
    assert nulls.nearest_sources(q, emb, ids, exclude={5, 7}).tolist() == [6, 6]


def _ckpt_names(cfg, docs_edit=None):
    """{model: checkpoint file name} of the three models a run trains (names only: out_dir is not the key)."""
    src = nulls.load_sources(cfg)
    if docs_edit is not None:
        docs_edit(src["docs"])
    sinks, retr = nulls.make_sinks(cfg, src)
    return {name: os.path.basename(nulls.lm_run(cfg, src["tok"], src["docs"], s.sources, None if name == "standard"
                                                else s, name)[2].ckpt_path)
            for name, s in (("nulls", sinks), ("retrained", retr), ("standard", sinks))}


def test_checkpoints_are_keyed_on_what_training_sees():
    smoke = dataclasses.replace(nulls.Config(), **nulls.PRESETS["smoke"])
    base = _ckpt_names(smoke)
    assert len(set(base.values())) == 3
    # evaluation, unlearning, relearning and the fast path (equal to the dense mask, tested) retrain nothing
    for change in (dict(relearn_steps=5), dict(npo_lr=2e-3), dict(ga_lr=2e-3), dict(unlearn_epochs=3),
                   dict(unlearn_batch=3), dict(npo_beta=0.2), dict(relearn_lr=1e-2), dict(fast_path=False),
                   dict(device="cpu"), dict(log_every=7), dict(out_dir="elsewhere"), dict(sweep="capacity"),
                   dict(eval_batch=3), dict(n_related=5), dict(seeds=(0, 1)), dict(workers=2)):
        assert _ckpt_names(dataclasses.replace(smoke, **change)) == base, change
    # anything training sees does; forgetting other sources changes only the retrained model
    every = {"nulls", "retrained", "standard"}
    for change, differ in ((dict(lr=1e-2), every), (dict(epochs=3), every), (dict(seed=1), every),
                           (dict(batch_size=4), every), (dict(n_embd=16), every), (dict(split_sentences=False), every),
                           (dict(n_people=13), every), (dict(n_source=4), {"nulls", "retrained"}),
                           (dict(n_pool=80), every), (dict(n_forget=3), {"retrained"})):
        names = _ckpt_names(dataclasses.replace(smoke, **change))
        assert {k for k in names if names[k] != base[k]} == differ, change
    # so does one token of one training document
    names = _ckpt_names(smoke, docs_edit=lambda docs: docs[max(docs)].__setitem__(0, docs[max(docs)][1]))
    assert {k for k in names if names[k] != base[k]} == every


@pytest.mark.parametrize("arg,msg", [
    ("--n_sources=3", "unknown key 'n_sources'"),
    ("--n_forget=0", "n_forget=0 is out of range: n_forget must be in [1, n_people) = [1, 12)"),
    ("--n_forget=12", "n_forget must be in [1, n_people) = [1, 12)"),        # smoke has 12 people
    ("--n_source=65", "n_source must be in [1, n_pool] = [1, 64]"),
    ("--lr=0", "lr must be in (0, inf)"),
    ("--tokenizer=bpe", "tokenizer must be one of 'gpt2', 'word'"),
    ("--sweep=size", "sweep must be one of"),
    ("--eval_batch=0", "eval_batch must be in [1, inf)"),
    ("--seeds=0,-1", "seeds must be in [0, inf)"),
    ("--seeds=1,1", "seeds must be distinct"),
    ("--workers=0", "workers must be in [1, inf)"),
])
def test_bad_settings_exit_2_naming_the_field_and_range(tmp_path, capsys, arg, msg):
    with pytest.raises(SystemExit) as e:
        nulls.main(["--preset=smoke", arg, f"--out_dir={tmp_path}"])
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "results.json")


CLAIM_IDS = ["1", "1p", "2", "2p", "3", "3", "3", "4", "4", "5", "5"]


def test_smoke_run_over_two_seeds_writes_per_seed_and_aggregate_results(tmp_path):
    """The run's plumbing end to end. A smoke model is too small to decide any claim, so no verdict is checked
    here: each claim function is tested on constructed inputs, both ways, in test_nulls_claims.py."""
    per_metrics, agg = nulls.main(["--preset=smoke", "--seeds=0,1", f"--out_dir={tmp_path}"])
    res = json.loads((tmp_path / "results.json").read_text())
    names = [c["claim"] for c in res["claims"]]
    assert [n.split()[0] for n in names] == CLAIM_IDS
    for c in res["claims"]:
        assert set(c["verdict_per_seed"]) == {"0", "1"} and set(c["precondition_per_seed"]) == {"0", "1"}
        assert c["verdict"] in ("holds", "fails", "not testable here", "inconclusive")
    for k in (0, 1):
        seed_res = json.loads((tmp_path / f"seed{k}" / "results.json").read_text())
        assert seed_res["config"]["seed"] == k
        assert [c["claim"] for c in seed_res["claims"]] == names
        for c in seed_res["claims"]:
            assert set(c) == {"claim", "verdict", "tests", "value", "threshold", "precondition", "detail"}
        m = seed_res["metrics"]
        assert set(m["truth_ratio"]) == {"verbatim", "paraphrased"}
        assert {"sink_on", "sink_off/nearest", "retrained/nearest", "sink_off/stating", "standard",
                "all_sinks_off"} <= set(m["truth_ratio"]["paraphrased"])
        assert len(m["relearning"]["npo"]) == 3 and set(m["relearning"]) == {"sink_off", "retrained", "sink_on", "npo", "ga"}
        assert len(m["gradient_baselines"]["npo"]["trajectory"]) >= 2
        assert {"fig3ab_truth_ratio.png", "fig3c_gradient_baselines.png", "fig7b_relearning.png",
                "results.md"} <= set(os.listdir(tmp_path / f"seed{k}"))
    # each seed is its own experiment (another world, other initial weights)
    assert per_metrics[0]["truth_ratio"] != per_metrics[1]["truth_ratio"]
    # a rerun that changes only what happens after training reuses the three finished models, untouched
    out = tmp_path / "seed0"
    ckpts = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out) if f.endswith(".pt")
             and f != "nulls_unlearned.pt"}
    assert len(ckpts) == 3
    cfg = train.parse_config(nulls.Config, ["--preset=smoke", f"--out_dir={out}", "--relearn_steps=3",
                                            "--npo_lr=2e-3", "--unlearn_epochs=2", "--fast_path=false",
                                            "--eval_batch=3", "--n_related=7"])
    src = nulls.load_sources(cfg)
    nets, _ = nulls.train_three(cfg, src, *nulls.make_sinks(cfg, src))
    assert {f: os.stat(out / f).st_mtime_ns for f in ckpts} == ckpts
    assert sorted(f for f in os.listdir(out) if f.endswith(".pt")) == sorted([*ckpts, "nulls_unlearned.pt"])
    # (eval_batch changes only how the corpus-wide passes are batched)
    assert float(nulls.seq_losses(cfg, nets["standard"], src["tok"], src["holdout"]).mean()) == pytest.approx(
        per_metrics[0]["val_loss"]["standard"], rel=1e-6)

def test_forget_list_persists_with_the_model(tmp_path):
    net = _tiny()
    s = nulls.Sinks(4, 40, 6, sources=[1, 2, 3])
    s.forget(3)
    nulls.save_nulls(tmp_path / "m.pt", net, s)
    net2, s2 = nulls.load_nulls(tmp_path / "m.pt")
    assert s2.forgotten == {3} and s2.sources == [1, 2, 3]
    x = torch.randint(0, 30, (2, 8))
    assert torch.equal(net(x, mlp_mask=s.row_mask([3, 1]))[0], net2(x, mlp_mask=s2.row_mask([3, 1]))[0])
    import train as T
    T.save_checkpoint(tmp_path / "plain.pt", net)
    with pytest.raises(ValueError, match="no NULLs sink state"):
        nulls.load_nulls(tmp_path / "plain.pt")


def test_real_data_path_on_a_local_file(tmp_path):
    """The --preset=paper code path (documents as sources, no facts) on a small local jsonl file."""
    import random
    rng = random.Random(0)
    words = "the a cat dog river city old new red blue walked saw found lived near far".split()
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(10, 20)))}) + "\n")
    out = tmp_path / "out"
    metrics, claims = nulls.main(["--preset=smoke", f"--data={tmp_path / 'docs.jsonl'}", "--tokenizer=word",
                                  "--n_docs=20", "--n_forget=2", f"--out_dir={out}"])
    assert metrics["n_sources"] == 20 and len(metrics["forget"]) == 2
    assert [c["verdict"] for c in claims[:3]] == ["not testable here"] * 3   # no facts: honestly not measured
    assert json.loads((out / "results.json").read_text())["claims"][0]["precondition"]["met"] is False
    with pytest.raises(KeyError, match="no field"):
        nulls.main(["--preset=smoke", f"--data={tmp_path / 'docs.jsonl'}", "--tokenizer=word",
                    "--text_field=body", f"--out_dir={out}"])


def test_a_missing_device_exits_2_naming_the_devices_that_exist(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        nulls.main(["--preset=smoke", "--device=cuda", f"--out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "device 'cuda' is not available" in err and "devices here: cpu (or auto)" in err


def test_lazy_optimizer_leaves_sinks_no_trained_source_uses_exactly_at_init(tmp_path):
    """Retrained never sees the forgotten sources: their exclusive sinks get no gradient. With --optimizer=lazy
    they stay bit-identical to the initial weights; dense AdamW decays them. The lazy model has its own key."""
    cfg = train.parse_config(nulls.Config, ["--preset=smoke", f"--out_dir={tmp_path}", "--epochs=1",
                                            "--weight_decay=0.5"])
    src = nulls.load_sources(cfg)
    _, retr = nulls.make_sinks(cfg, src)
    used = set()
    for s in retr.sources:
        used |= set(nulls.source_sinks(torch.tensor([s]), cfg.n_pool, cfg.n_source)[0].tolist())
    unused = torch.tensor(sorted(set(range(cfg.n_pool)) - used)) + cfg.n_gen
    assert len(unused) > 0
    torch.manual_seed(cfg.seed)
    init = nulls.M.GPT(nulls.model_config(cfg, src["tok"].vocab_size)).blocks[0].mlp.up.weight.detach().clone()
    nets = {}
    for opt in ("lazy", "adamw"):
        c = dataclasses.replace(cfg, optimizer=opt)
        nets[opt], _ = nulls.train_lm(c, src["tok"], src["docs"], retr.sources, retr, "retrained")
    lazy_w, dense_w = nets["lazy"].blocks[0].mlp.up.weight, nets["adamw"].blocks[0].mlp.up.weight
    assert torch.equal(lazy_w[unused], init[unused])
    assert not torch.equal(dense_w[unused], init[unused])
    assert not torch.equal(lazy_w[:cfg.n_gen], init[:cfg.n_gen])              # the backbone trained
    assert len([f for f in os.listdir(tmp_path) if f.startswith("retrained-") and f.endswith(".pt")]) == 2


def _sliced_mlp(act, mlp, x):
    """ActiveSinks.mlp_forward as nulls.py's published runs trained with it: the backbone sliced off each weight
    and every source's sinks indexed out separately (three uses of a weight, three gradient tensors summed)."""
    B, T, C = x.shape
    g, inv, rank = act.n_gen, act.slot // act.max_count, act.slot % act.max_count
    F = torch.nn.functional

    def hidden(z, cols):
        def proj(lin):
            if isinstance(cols, slice):
                y = z @ lin.weight[cols].t()
                return y + lin.bias[cols] if lin.bias is not None else y
            y = torch.bmm(z, lin.weight[cols].transpose(1, 2))
            return y + lin.bias[cols][:, None, :] if lin.bias is not None else y
        if mlp.flavor == "llama":
            return F.silu(proj(mlp.gate)) * proj(mlp.up)
        return F.gelu(proj(mlp.up), approximate=mlp.approximate)
    out = hidden(x, slice(0, g)) @ mlp.down.weight[:, :g].t()
    if mlp.down.bias is not None:
        out = out + mlp.down.bias
    grouped = x.new_zeros(len(act.uniq), act.max_count, C)
    grouped[inv, rank] = x.reshape(-1, C)
    h = hidden(grouped, act.sinks)
    if act.keep is not None:
        h = h * act.keep[:, None, :]
    return out + torch.bmm(h, mlp.down.weight.t()[act.sinks])[inv, rank].view(B, T, C)


@pytest.mark.parametrize("flavor", ["llama", "gpt2"])
def test_fast_path_bit_identical_to_slicing_each_source(flavor, monkeypatch):
    """The published runs' numbers: one gather per weight gives the same bits, outputs and gradients, as slicing
    the backbone and indexing each source's sinks (sinks shared by 3+ sources: the gradient sums in the same order)."""
    n_gen, n_pool, n_source = 6, 40, 10
    cfg = model.ModelConfig(flavor=flavor, vocab_size=30, n_layer=2, n_head=2, n_embd=16, d_ff=n_gen + n_pool,
                            bias=flavor == "gpt2", block_size=16)
    torch.manual_seed(0)
    net = model.GPT(cfg)
    x, y = torch.randint(0, 30, (5, 12)), torch.randint(0, 30, (5, 12))
    src = torch.tensor([[7] * 5 + [11] * 7, [2] * 12, [11] * 3 + [4] * 9, [0] * 4 + [3] * 8, [5] * 12])
    for forget in [(), (4,)]:
        act = nulls.ActiveSinks(src, n_gen, n_pool, n_source, forget)
        assert torch.bincount(act.sinks.flatten()).max() >= 3           # some sink in three sources
        runs = []
        for fast in (True, False):
            if not fast:
                monkeypatch.setattr(act, "mlp_forward", lambda mlp, h: _sliced_mlp(act, mlp, h))
            net.zero_grad(set_to_none=True)
            logits, loss = net(x, y, mlp_mask=act)
            loss.backward()
            runs.append([logits.detach()] + [p.grad.clone() for p in net.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*runs)), (flavor, forget)
