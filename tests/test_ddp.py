"""Data-parallel training on CPU: 2 processes with gloo, as torchrun would launch them."""
import faulthandler
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import train as TR
from model import GPT, ModelConfig
from train import TrainConfig, load_checkpoint, train

V, T, B, STEPS = 40, 10, 4, 6


def tiny():
    # bias=False: a key bias gets only round-off gradient (softmax ignores a shift shared by all keys), and Adam
    # scales that noise up to lr-sized steps, so it could not match a single-process run to 1e-5 anyway
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32, d_ff=64, bias=False))


def batches(step):
    """A global batch of 4 rows whose two halves count different numbers of targets (-100s only in the first
    rows), with per-token document ids and a per-row MLP mask, so sharding and loss weighting both matter."""
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, V, (B, T), generator=g)
    y = torch.roll(x, -1, 1)
    y[0, :6] = -100
    y[1, :3] = -100
    doc = (torch.arange(T) >= 4).long().expand(B, T)
    mask = (torch.rand(B, 1, 64, generator=g) > 0.3).float()          # (B, 1, d_ff)
    return {"x": x, "y": y, "doc_ids": doc, "mlp_mask": mask}


def mean_ce(model, b):                                                 # a custom objective through loss_fn
    logits, _ = model(b["x"], doc_ids=b["doc_ids"])
    return F.cross_entropy(logits.flatten(0, 1), torch.roll(b["x"], -1, 1).flatten())


def cfg(ckpt_path=None):
    return TrainConfig(lr=1e-2, warmup_steps=1, max_steps=STEPS, device="cpu", log_every=2, ckpt_path=ckpt_path)


LINES, SAVED = [], []


def _worker(rank, world, port, out_dir):
    faulthandler.dump_traceback_later(HANG_S, exit=True)   # a hung rank prints its stacks and exits, failing the test
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TEST_CKPT=os.path.join(out_dir, "ckpt.pt"))
    torch.set_num_threads(1)
    real = TR.save_checkpoint
    TR.save_checkpoint = lambda *a, **k: SAVED.append(a[3]) or real(*a, **k)
    # the first train() call finds no process group and makes (and ends) its own, as under torchrun;
    # the second runs inside a group the caller set up
    m1 = tiny()
    h1 = train(m1, batches, cfg(ckpt_path=os.environ["TEST_CKPT"]), log=LINES.append)
    assert not dist.is_initialized()
    # a file store, not a second TCP port: nothing to collide with on a busy CI machine
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=HANG_S))
    m2 = tiny()
    h2 = train(m2, batches, cfg(), loss_fn=mean_ce, log=LINES.append)
    dist.destroy_process_group()
    torch.save({"m1": m1.state_dict(), "h1": h1, "m2": m2.state_dict(), "h2": h2, "lines": LINES, "saved": SAVED},
               os.path.join(out_dir, f"rank{rank}.pt"))


HANG_S = 240   # far above a healthy run (seconds), far below torch's default 30-minute rendezvous timeout


def _run_ranks(fn, args, nprocs=2):
    """Fork `nprocs` ranks of fn(rank, *args) and wait for them, failing (not hanging) if one stalls."""
    # fork, not spawn: re-importing torch in two fresh processes takes longer than the whole test on 2 cores
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="fork")
    deadline = time.time() + HANG_S + 30
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{nprocs} ranks still running after {HANG_S + 30} s")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_match_single_process(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:   # the single-process runs first: they also warm up lazy imports the forked ranks then inherit
        s1 = tiny()
        h1 = train(s1, batches, cfg(), log=None)
        s2 = tiny()
        h2 = train(s2, batches, cfg(), loss_fn=mean_ce, log=None)
    finally:
        torch.set_num_threads(n)
    _run_ranks(_worker, (2, _free_port(), str(tmp_path)))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    for key, single, hist in (("m1", s1, h1), ("m2", s2, h2)):
        for name, p in single.state_dict().items():
            assert torch.equal(r0[key][name], r1[key][name]), name       # both ranks hold the same weights
            assert torch.allclose(r0[key][name], p, atol=1e-5, rtol=0), name
        h = "h" + key[1]
        assert r0[h]["loss"] == r1[h]["loss"]                            # the logged loss is the global one
        assert r0[h]["loss"] == pytest.approx(hist["loss"], abs=1e-5)

    # only rank 0 logs and writes checkpoints, and its checkpoint has no DDP `module.` prefix
    assert r1["lines"] == [] and r1["saved"] == []
    assert r0["saved"] == [STEPS] and any(l.startswith(f"step {STEPS}/{STEPS}") for l in r0["lines"])
    assert any("x 2 ranks" in l for l in r0["lines"])
    ck = load_checkpoint(tmp_path / "ckpt.pt")
    assert set(ck["model"]) == set(s1.state_dict())


def test_batch_must_divide_by_ranks(monkeypatch):
    # checked before any communication, so a fake 3-rank world inside an existing 1-process group is enough
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="does not divide"):
            train(tiny(), batches, cfg(), log=None)
    finally:
        dist.destroy_process_group()


def _nulls_rank(rank, world, port, out_dir):
    """One rank of `torchrun --nproc_per_node=2 nulls.py --preset=smoke`: the env torchrun sets, then main()."""
    import nulls
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    metrics, claims = nulls.main(["--preset=smoke", f"--out_dir={out_dir}"])
    torch.save({"metrics": metrics, "claims": claims, "initialized": dist.is_initialized()},
               os.path.join(os.path.dirname(out_dir), f"nulls_rank{rank}.pt"))


def _close(a, b, path=""):
    """Equal structure and strings/ints/bools, floats within 1e-4 relative (rounding of the sharded sums)."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not path.endswith(("_s", "wall_time_s")) and "times" not in path:
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6), path
    elif not isinstance(a, float):
        assert a == b, path


def test_nulls_under_torchrun_matches_the_single_process_run(tmp_path):
    """torchrun --nproc_per_node=2 nulls.py --preset=smoke on CPU (gloo): the ranks train data-parallel, only
    rank 0 evaluates and writes, and its results.json equals the single-process run's within float rounding."""
    import json
    import nulls
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        nulls.main(["--preset=smoke", f"--out_dir={tmp_path / 'single'}"])
    finally:
        torch.set_num_threads(n)
    (tmp_path / "ddp").mkdir()
    _run_ranks(_nulls_rank, (2, _free_port(), str(tmp_path / "ddp")))
    r0, r1 = (torch.load(tmp_path / f"nulls_rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r1["metrics"] is None and r1["claims"] is None                       # rank 1 only trained
    assert not r0["initialized"] and not r1["initialized"]                      # main() left no process group
    single = json.loads((tmp_path / "single" / "results.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    _close(single["metrics"], ddp["metrics"])
    _close(single["claims"], ddp["claims"])
    assert [c["verdict"] for c in ddp["claims"]] == [c["verdict"] for c in single["claims"]]
    # the three checkpoints (written by rank 0 alone) hold the same training keys as the single run's
    pts = lambda d: sorted(f for f in os.listdir(d) if f.endswith(".pt"))
    assert pts(tmp_path / "ddp") == pts(tmp_path / "single")
