"""nulls.py --workers: the three models trained in worker processes side by side give the numbers of one process."""
import json
import os

import nulls
import train

TIMING = ("time", "wall", "cpu", "_s", "load", "threads", "workers", "out_dir")


def _leaves(x, path=""):
    """{path: leaf} of a results.json, without how the run ran (keys naming timings, threads, workers, out_dir)."""
    if isinstance(x, dict):
        return {p: v for k, v in x.items() if not any(t in k for t in TIMING)
                for p, v in _leaves(v, f"{path}/{k}").items()}
    if isinstance(x, list):
        return {p: v for i, v in enumerate(x) for p, v in _leaves(v, f"{path}[{i}]").items()}
    return {path: x}


def test_two_workers_give_the_numbers_of_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    nulls.main(["--preset=smoke", "--workers=1", f"--out_dir={one}"])
    metrics, _ = nulls.main(["--preset=smoke", "--workers=2", f"--out_dir={two}"])
    assert metrics["times"]["workers"] == 2
    assert set(metrics["times"]["trained_by_workers"]) == set(nulls.MODELS)
    assert not any(m["cached"] for m in metrics["times"]["models"].values())
    assert "baselines" in metrics["times"]["worker_evaluated"]
    a, b = (_leaves(json.loads((d / "results.json").read_text())) for d in (one, two))
    assert len(a) > 1000 and a == b
    # the workers filled exactly the caches the one-process run trained (same run keys), and a rerun starts none
    pts = lambda d: sorted(f for f in os.listdir(d) if f.endswith(".pt"))
    assert pts(one) == pts(two)
    cfg = train.parse_config(nulls.Config, ["--preset=smoke", "--workers=2", f"--out_dir={two}"])
    assert nulls.worker_plan(cfg, nulls.load_sources(cfg)) == []


def test_worker_plan_standard_with_the_baselines_beside_nulls_and_retrained(tmp_path, monkeypatch):
    cfg = train.parse_config(nulls.Config, ["--preset=smoke", "--workers=2", f"--out_dir={tmp_path}"])
    src = nulls.load_sources(cfg)

    def plan(todo, **env):
        monkeypatch.setattr(nulls, "trained", lambda c, s: {n: n not in todo for n in nulls.MODELS})
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        return nulls.worker_plan(cfg, src)
    assert plan(nulls.MODELS) == [(["standard"], True), (["nulls", "retrained"], False)]
    assert plan(("nulls", "retrained")) == [(["retrained"], True), (["nulls"], False)]
    assert plan(("retrained",)) == [([], True), (["retrained"], False)]        # a new n_forget: Retrained alone
    assert plan(("standard", "nulls")) == [(["standard"], True), (["nulls"], False)]
    assert plan(("standard",)) == [] and plan(()) == []                          # nothing to do side by side
    cfg = train.parse_config(nulls.Config, ["--preset=smoke", "--workers=1", f"--out_dir={tmp_path}"])
    assert plan(nulls.MODELS) == []
    cfg = train.parse_config(nulls.Config, ["--preset=smoke", "--workers=2", f"--out_dir={tmp_path}"])
    monkeypatch.setattr(nulls.T, "pick_device", lambda name: "cuda")
    assert plan(nulls.MODELS) == []                                              # a GPU: one process
    monkeypatch.setattr(nulls.T, "pick_device", lambda name: "cpu")
    assert plan(nulls.MODELS, WORLD_SIZE="2") == []                              # torchrun: data-parallel ranks


def test_trained_reads_finished_checkpoints_only(tmp_path):
    cfg = train.parse_config(nulls.Config, ["--preset=smoke", f"--out_dir={tmp_path}", "--epochs=1"])
    src = nulls.load_sources(cfg)
    assert nulls.trained(cfg, src) == {"nulls": False, "retrained": False, "standard": False}
    nulls.train_models(cfg, src, ["retrained"])
    assert nulls.trained(cfg, src) == {"nulls": False, "retrained": True, "standard": False}
    # a checkpoint of an interrupted run (fewer steps than the run needs) still has to train
    longer = train.parse_config(nulls.Config, ["--preset=smoke", f"--out_dir={tmp_path}", "--epochs=2"])
    sinks, retr = nulls.make_sinks(longer, src)
    path = nulls.lm_run(longer, src["tok"], src["docs"], retr.sources, retr, "retrained")[2].ckpt_path
    os.replace(nulls.lm_run(cfg, src["tok"], src["docs"], retr.sources, retr, "retrained")[2].ckpt_path, path)
    assert nulls.trained(longer, src)["retrained"] is False
    (tmp_path / os.path.basename(path)).write_bytes(b"damaged")
    assert nulls.trained(longer, src)["retrained"] is False


def test_first_worker_evaluates_nulls_once_the_other_finished_it(tmp_path):
    """worker_job (called here in-process): after the baselines, the worker with the standard model evaluates what
    needs NULLs but not Retrained when NULLs is finished, with the values the main process would compute."""
    import torch
    cfg = train.parse_config(nulls.Config, ["--preset=smoke", "--workers=2", f"--out_dir={tmp_path}"])
    src = nulls.load_sources(cfg)
    n = torch.get_num_threads()
    try:
        out, _ = nulls.worker_job(cfg, ["standard"], True, "")
        assert set(out) == {"baselines"}                     # NULLs not trained yet: left to the main process
        nets = {k: net for k, (net, _) in nulls.train_models(cfg, src, ["nulls", "standard"]).items()}
        out, _ = nulls.worker_job(cfg, [], True, "")
    finally:
        torch.set_num_threads(n)
    assert set(out) == {"baselines", "nulls_relearning", "capacity"}
    sinks = nulls.make_sinks(cfg, src)[0]
    want = nulls.capacity_ratios(src["world"], src["tok"], nets["nulls"], nets["standard"], sinks)
    assert all(torch.equal(out["capacity"][w][m], want[w][m]) for w in want for m in want[w])
    _, nearest = nulls.routing(cfg, src, nets["nulls"], sinks)
    assert out["nulls_relearning"] == nulls.nulls_relearning(cfg, src, nets["nulls"], sinks, nearest)
    grad = nulls.baseline_runs(cfg, src, nets["standard"])
    for name in ("npo", "ga"):
        assert out["baselines"][name]["trajectory"] == grad[name]["trajectory"]
        assert out["baselines"][name]["relearning"] == grad[name]["relearning"]
    # GA's step 0 is NPO's: both start from the same copy of the standard model
    assert grad["ga"]["trajectory"][0] == grad["npo"]["trajectory"][0]
