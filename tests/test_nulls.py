"""nulls.py: the unlearning operations, routing, and the smoke run end to end."""
import json

import pytest
import torch

import model
import nulls


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


def test_checkpoint_names_depend_on_settings():
    a = nulls.Config()
    b = nulls.Config(n_source=32)
    assert nulls.checkpoint_path(a, "nulls", [1, 2]) != nulls.checkpoint_path(b, "nulls", [1, 2])
    assert nulls.checkpoint_path(a, "nulls", [1, 2]) != nulls.checkpoint_path(a, "nulls", [1])
    assert nulls.checkpoint_path(a, "nulls", [1, 2]) == nulls.checkpoint_path(nulls.Config(device="cpu"), "nulls", [1, 2])


def test_bad_settings_are_errors(tmp_path):
    with pytest.raises(SystemExit):
        nulls.main(["--preset=smoke", "--n_sources=3"])           # unknown key
    with pytest.raises(ValueError, match="n_forget"):
        nulls.main(["--preset=smoke", "--n_forget=0", f"--out_dir={tmp_path}"])


def test_smoke_run_writes_results_with_claims(tmp_path):
    metrics, claims = nulls.main(["--preset=smoke", f"--out_dir={tmp_path}"])
    res = json.loads((tmp_path / "results.json").read_text())
    assert [c["claim"][0] for c in res["claims"]] == ["1", "2", "3", "3", "4", "5"]
    for c in res["claims"]:
        assert set(c) == {"claim", "value", "threshold", "held", "detail"} and c["held"] in (True, False, None)
    tr = res["metrics"]["truth_ratio"]
    assert {"sink_on", "sink_off/nearest", "retrained/nearest", "standard", "all_sinks_off"} <= set(tr)
    assert (tmp_path / "results.md").exists()
    # the claims are computed from the measured numbers, e.g. claim 5 is the loss ratio printed beside it
    vl = res["metrics"]["val_loss"]
    assert res["claims"][-1]["value"] == pytest.approx(vl["nulls"] / vl["standard"])


def test_checkpoint_names_depend_on_the_training_tokens():
    a = nulls.Config()
    d1 = nulls.docs_digest({1: [3, 4], 2: [5]}, [1, 2])
    d2 = nulls.docs_digest({1: [3, 4], 2: [6]}, [1, 2])
    assert d1 != d2
    assert nulls.checkpoint_path(a, "nulls", [1, 2], d1) != nulls.checkpoint_path(a, "nulls", [1, 2], d2)


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
    assert [c["held"] for c in claims[:3]] == [None, None, None]          # no facts: honestly not measured
    assert json.loads((out / "results.json").read_text())["claims"][0]["detail"].startswith("not measured")
    with pytest.raises(KeyError, match="no field"):
        nulls.main(["--preset=smoke", f"--data={tmp_path / 'docs.jsonl'}", "--tokenizer=word",
                    "--text_field=body", f"--out_dir={out}"])
