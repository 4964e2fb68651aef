"""The shared training loop, its optimizer groups and schedule, checkpoints and exact resume (all on CPU)."""
import copy
import dataclasses
import math
import os
import re
import zipfile
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import train as TR
from model import GPT, ModelConfig
from train import (TrainConfig, load_checkpoint, lr_at, make_optimizer, model_from_checkpoint, save_checkpoint,
                   set_rng_state, train)

V, T = 48, 12


def tiny(flavor="gpt2", seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return GPT(ModelConfig(flavor=flavor, vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32, d_ff=64,
                           bias=flavor == "gpt2", dropout=dropout))


SEQS = torch.randint(0, V, (6, T + 1), generator=torch.Generator().manual_seed(123))


def batches(step, B=4):
    """The data order is a function of the step alone: exact resume needs nothing else."""
    g = torch.Generator().manual_seed(1000 + step)
    rows = SEQS[torch.randint(0, len(SEQS), (B,), generator=g)]
    return {"x": rows[:, :-1], "y": rows[:, 1:]}


class SeqIter:
    """An iterator feeding the same kind of batches, resumable through its state_dict."""
    def __init__(self, seed=7):
        self.g = torch.Generator().manual_seed(seed)
        self.n = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.n += 1
        rows = SEQS[torch.randint(0, len(SEQS), (4,), generator=self.g)]
        return {"x": rows[:, :-1], "y": rows[:, 1:]}

    def state_dict(self):
        return {"g": self.g.get_state(), "n": self.n}

    def load_state_dict(self, s):
        self.g.set_state(s["g"])
        self.n = s["n"]


def cfg(**kw):
    base = dict(lr=1e-2, warmup_steps=2, max_steps=10, device="cpu", log_every=0, seed=3)
    return TrainConfig(**{**base, **kw})


# --- schedule ------------------------------------------------------------------------------------

def lr_reference(step, max_lr, warmup, total, min_lr):
    # written out separately, in float64: linear warmup (step+1)/warmup, then half a cosine to min_lr at `total`
    if step < warmup:
        return max_lr * (step + 1.0) / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / float(total - warmup)
    return min_lr + (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress)) / 2.0


def test_lr_schedule_matches_formula():
    for warmup, total in [(0, 10), (3, 10), (10, 10), (5, 100)]:
        for step in range(total + 3):
            assert lr_at(step, 3e-3, warmup, total, 3e-4) == pytest.approx(lr_reference(step, 3e-3, warmup, total, 3e-4),
                                                                           rel=1e-12)


def test_lr_schedule_worked_values():
    assert lr_at(0, 1.0, 4, 104, 0.1) == 0.25                 # first warmup step
    assert lr_at(3, 1.0, 4, 104, 0.1) == 1.0                  # end of warmup
    assert lr_at(4, 1.0, 4, 104, 0.1) == 1.0                  # cosine starts at the top
    assert lr_at(54, 1.0, 4, 104, 0.1) == pytest.approx(0.55)  # halfway: the mean of max and min
    assert lr_at(104, 1.0, 4, 104, 0.1) == 0.1 and lr_at(500, 1.0, 4, 104, 0.1) == 0.1
    with pytest.raises(ValueError):
        lr_at(0, 1.0, 11, 10, 0.1)
    with pytest.raises(ValueError):
        lr_at(0, 1.0, 0, 0, 0.1)


# --- optimizer groups ----------------------------------------------------------------------------

def _names(model, group):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in group["params"]}


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_weight_decay_only_on_2d_weights(flavor):
    m = tiny(flavor)
    opt = make_optimizer(m, 1e-3, 0.1, (0.9, 0.95))
    groups = {g["name"]: g for g in opt.param_groups}
    decay, no_decay = _names(m, groups["decay"]), _names(m, groups["no_decay"])
    assert decay == {n for n, p in m.named_parameters() if p.dim() == 2}
    assert no_decay == {n for n, p in m.named_parameters() if p.dim() == 1}
    assert "wte.weight" in decay                               # embeddings decay, as in nanoGPT
    assert not any(n.endswith(".bias") or "ln" in n for n in decay)
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == m.num_params()                             # the tied lm_head counted once, nothing lost


def test_extra_groups_are_taken_out_and_frozen_params_left_out():
    m = tiny()
    values = m.blocks[1].mlp.down.weight
    m.blocks[0].attn.qkv.weight.requires_grad_(False)
    opt = make_optimizer(m, 1e-3, 0.1, (0.9, 0.95),
                         extra_groups=[{"params": [values], "lr": 1e-2, "weight_decay": 0.0, "constant_lr": True,
                                        "name": "values"}])
    groups = {g["name"]: g for g in opt.param_groups}
    assert _names(m, groups["values"]) == {"blocks.1.mlp.down.weight"}
    assert "blocks.1.mlp.down.weight" not in _names(m, groups["decay"])
    assert "blocks.0.attn.qkv.weight" not in set().union(*(_names(m, g) for g in opt.param_groups))
    g = groups["values"]
    assert (g["lr"], g["base_lr"], g["weight_decay"], g["constant_lr"]) == (1e-2, 1e-2, 0.0, True)
    assert groups["decay"]["constant_lr"] is False and groups["decay"]["base_lr"] == 1e-3


def test_duplicate_params_raise():
    m = tiny()
    w = m.blocks[0].mlp.up.weight
    with pytest.raises(ValueError, match="two optimizer groups"):
        make_optimizer(m, 1e-3, 0.1, (0.9, 0.95), extra_groups=[{"params": [w]}, {"params": [w]}])
    with pytest.raises(ValueError, match="two optimizer groups"):
        make_optimizer(m, 1e-3, 0.1, (0.9, 0.95), extra_groups=[{"params": [w, w]}])
    for p in m.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        make_optimizer(m, 1e-3, 0.1)


# --- checkpoints ---------------------------------------------------------------------------------

@dataclass
class RunCfg:
    lr: float = 1e-2
    name: str = "unit"
    betas: tuple = (0.9, 0.95)


def _trained_pair():
    m = tiny()
    opt = make_optimizer(m, 1e-2, 0.1)
    for step in range(3):
        b = batches(step)
        m(b["x"], b["y"])[1].backward()
        opt.step()
        opt.zero_grad()
    return m, opt


def test_checkpoint_round_trip(tmp_path):
    m, opt = _trained_pair()
    tok = {"kind": "word", "vocab": ["<pad>", "the", "cat"], "eos_id": 2}
    path = save_checkpoint(tmp_path / "sub" / "ckpt.pt", m, opt, step=3, config=RunCfg(), tokenizer=tok,
                           extra={"note": "hi"})
    draw = torch.rand(3)                                       # the RNG state was saved before this draw
    ck = load_checkpoint(path)
    assert ck["step"] == 3 and ck["config"] == {"lr": 1e-2, "name": "unit", "betas": (0.9, 0.95)}
    assert ck["tokenizer"] == tok and ck["extra"] == {"note": "hi"}
    assert ck["model_config"]["n_embd"] == 32
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    m2 = model_from_checkpoint(ck)
    for (n1, p1), (n2, p2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert m2.lm_head.weight is m2.wte.weight                  # tying survives the round trip
    opt2 = make_optimizer(m2, 1e-2, 0.1)
    opt2.load_state_dict(ck["optimizer"])
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"]) for k in s1)
    set_rng_state(ck["rng"])
    assert torch.equal(torch.rand(3), draw)


def test_checkpoint_keeps_the_gelu_form():
    # a model_config saved before ModelConfig.gelu existed was trained with GPT-2's tanh GELU, whatever the default
    m = tiny()
    ck = {"model": m.state_dict(), "model_config": dataclasses.asdict(m.cfg)}
    for saved, want in [(None, "tanh"), ("tanh", "tanh"), ("exact", "exact")]:
        cfg = {k: v for k, v in ck["model_config"].items() if k != "gelu"}
        assert model_from_checkpoint({**ck, "model_config": cfg if saved is None else {**cfg, "gelu": saved}}
                                     ).cfg.gelu == want


def test_run_key_of_the_tanh_gelu_is_the_key_from_before_the_field():
    cfg = dataclasses.replace(tiny().cfg, gelu="tanh")
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "gelu"}
    assert TR.run_key(cfg, TrainConfig()) == TR.run_key(old, TrainConfig())
    assert TR.run_key(dataclasses.replace(cfg, gelu="exact"), TrainConfig()) != TR.run_key(cfg, TrainConfig())


def test_checkpoint_strips_wrapper_prefixes(tmp_path):
    m = tiny()

    class Wrapped(nn.Module):                                  # what torch.compile returns: the model in _orig_mod
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner
    assert all(k.startswith("_orig_mod.") for k in Wrapped(m).state_dict())
    save_checkpoint(tmp_path / "c.pt", Wrapped(m), step=1)
    ck = load_checkpoint(tmp_path / "c.pt")
    assert set(ck["model"]) == set(m.state_dict()) and ck["optimizer"] is None


def test_interrupted_write_keeps_old_checkpoint(tmp_path, monkeypatch):
    m, opt = _trained_pair()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, m, opt, step=3)
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):                          # dies half way through writing
        f.write(b"\x80\x02half a pickle")
        raise KeyboardInterrupt

    with torch.no_grad():
        m.wte.weight.add_(1.0)
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, m, opt, step=4)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt.pt"]                 # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask       # the temp file's 0600 is not what lands
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 3


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError):
        model_from_checkpoint(str(tmp_path / "nope.pt"))


# --- the loop ------------------------------------------------------------------------------------

def test_training_memorizes_a_tiny_set():
    m = tiny()
    h = train(m, batches, cfg(lr=1e-2, max_steps=80, warmup_steps=5))
    assert len(h["loss"]) == 80 and h["steps"] == 80 and h["tokens_per_s"] > 0 and h["wall_time"] > 0
    assert h["loss"][0] > 3.0                                  # ~ log(48) = 3.87 at the start
    assert sum(h["loss"][-5:]) / 5 < 0.5                       # 6 sequences memorized
    with torch.no_grad():
        b = batches(999)
        assert (m(b["x"])[0].argmax(-1)[:, 2:] == b["y"][:, 2:]).float().mean() > 0.9


def _crash_at(k, feed):
    def crashing(step):
        if step == k:
            raise RuntimeError("power cut")
        return feed(step)
    return crashing


@pytest.mark.parametrize("feed", ["callable", "iterator"])
def test_exact_resume_is_bit_identical(tmp_path, feed):
    c = cfg(max_steps=12, warmup_steps=3, ckpt_every=5)
    evals = lambda model, step: {"probe": torch.rand(()).item()}   # uses the global RNG in between steps
    full = train(tiny(dropout=0.1), batches if feed == "callable" else SeqIter(), c, eval_fn=evals)
    ref = tiny(dropout=0.1)
    train(ref, batches if feed == "callable" else SeqIter(), c)

    path = str(tmp_path / "run.pt")
    c2 = cfg(max_steps=12, warmup_steps=3, ckpt_every=5, ckpt_path=path, resume=True)
    if feed == "callable":
        first = _crash_at(7, batches)
    else:
        class Crashing(SeqIter):
            def __next__(self):
                if self.n == 7:
                    raise RuntimeError("power cut")
                return super().__next__()
        first = Crashing()
    with pytest.raises(RuntimeError, match="power cut"):
        train(tiny(dropout=0.1), first, c2, eval_fn=evals)
    assert load_checkpoint(path)["step"] == 5
    torch.rand(100)                                            # the world moves on between the two runs
    resumed = tiny(seed=99, dropout=0.1)                       # a different init: everything must come from disk
    lines = []
    h = train(resumed, batches if feed == "callable" else SeqIter(seed=12345), c2, eval_fn=evals, log=lines.append)
    assert any("resumed from" in l and "step 5" in l for l in lines)
    assert h["start_step"] == 5 and h["loss"] == full["loss"] and len(h["loss"]) == 12
    for (n, p), q in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), n
    assert load_checkpoint(path)["step"] == 12


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    lines = []
    h = train(tiny(), batches, cfg(max_steps=2, ckpt_path=str(tmp_path / "x.pt"), resume=True), log=lines.append)
    assert h["start_step"] == 0 and any("starting from step 0" in l for l in lines)


def test_resume_needs_optimizer_state(tmp_path):
    path = save_checkpoint(tmp_path / "bare.pt", tiny(), step=4)     # saved by hand, without an optimizer
    with pytest.raises(ValueError, match="exact resume"):
        train(tiny(), batches, cfg(ckpt_path=str(path), resume=True))


def test_iterator_without_state_cannot_checkpoint(tmp_path):
    with pytest.raises(TypeError, match="state_dict"):
        train(tiny(), iter([batches(0)]), cfg(ckpt_path=str(tmp_path / "x.pt")))


def test_checkpoints_hold_run_config_and_tokenizer(tmp_path, monkeypatch):
    @dataclass
    class ScriptConfig:                                        # a script's Config, read by field name
        lr: float = 1e-2
        max_steps: int = 6
        ckpt_every: int = 4
        ckpt_path: str = str(tmp_path / "s.pt")
        device: str = "cpu"
        log_every: int = 0
        hidden: int = 7                                        # not a TrainConfig field: ignored by train
    saved, real = [], TR.save_checkpoint
    monkeypatch.setattr(TR, "save_checkpoint", lambda *a, **k: saved.append(k["extra"]["history"]["loss"][:]) or real(*a, **k))
    train(tiny(), batches, ScriptConfig(), tokenizer={"vocab": ["a", "b"]})
    assert [len(s) for s in saved] == [4, 6]                   # every 4 steps and at the end
    ck = load_checkpoint(tmp_path / "s.pt")
    assert ck["step"] == 6 and ck["config"]["hidden"] == 7 and ck["tokenizer"] == {"vocab": ["a", "b"]}


def test_eval_callback_and_progress_lines():
    seen = []

    def eval_fn(model, step):
        seen.append((step, model.training))
        return {"ppl": torch.tensor(2.5), "n": 3}
    lines = []
    h = train(tiny(), batches, cfg(max_steps=10, eval_every=4, log_every=3), eval_fn=eval_fn, log=lines.append)
    assert seen == [(4, False), (8, False), (10, False)]       # in eval mode, every 4 steps and at the end
    assert h["eval"] == [{"step": s, "ppl": 2.5, "n": 3} for s in (4, 8, 10)]
    progress = [l for l in lines if l.startswith("step ")]
    assert [l.split()[1] for l in progress] == ["3/10", "6/10", "9/10", "10/10"]
    pat = r"^step \d+/10 \| loss \d+\.\d{3} \| lr \d\.\de-\d\d \| [\d.]+[kM]? tok/s \| eta \d+:\d\d$"
    assert all(re.match(pat, l) for l in progress), progress
    assert float(progress[-1].split("|")[1].split()[1]) == pytest.approx(h["loss"][-1], abs=5e-4)
    assert TR._hms(42) == "0:42" and TR._hms(3725) == "1:02:05" and TR._human(10_500) == "10.5k"


def test_schedule_in_the_loop_and_constant_groups():
    m = tiny()
    opt = make_optimizer(m, 1e-2, 0.0, extra_groups=[{"params": m.blocks[1].mlp.down.parameters(), "lr": 5e-3,
                                                        "constant_lr": True, "name": "values"}])
    c = cfg(max_steps=7, warmup_steps=2, min_lr=1e-3)
    h = train(m, batches, c, optimizer=opt)
    assert h["lr"] == pytest.approx([lr_reference(s, 1e-2, 2, 7, 1e-3) for s in range(7)], rel=1e-12)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["values"]["lr"] == 5e-3                      # left alone by the schedule
    assert groups["decay"]["lr"] == pytest.approx(lr_reference(6, 1e-2, 2, 7, 1e-3), rel=1e-12)


def test_grad_clip_bounds_the_update():
    m = tiny()
    before = [p.detach().clone() for p in m.parameters()]
    sgd = torch.optim.SGD(m.parameters(), lr=0.5)
    train(m, batches, cfg(max_steps=1, warmup_steps=0, grad_clip=1e-3), optimizer=sgd)
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(m.parameters(), before)))
    assert step.item() == pytest.approx(0.5 * 1e-3, rel=1e-4)  # lr * clipped grad norm


def test_model_kwargs_reach_the_model_and_frozen_params_stay():
    m = tiny()
    up0 = m.blocks[0].mlp.up.weight.detach().clone()
    emb0 = m.wte.weight.detach().clone()
    masked = lambda s: {**batches(s), "mlp_mask": torch.zeros(64)}     # every MLP hidden unit off
    train(m, masked, cfg(max_steps=3, weight_decay=0.0), param_filter=lambda n, p: n != "wte.weight")
    assert torch.equal(m.blocks[0].mlp.up.weight, up0)         # no gradient through a zero mask, no decay
    assert torch.equal(m.wte.weight, emb0) and not m.wte.weight.requires_grad
    assert not torch.equal(m.blocks[0].attn.qkv.weight, tiny().blocks[0].attn.qkv.weight)


def test_custom_loss_fn_and_unknown_batch_keys():
    def weighted(model, b):                                    # e.g. a per-token weight from source ids
        logits, _ = model(b["x"])
        nll = nn.functional.cross_entropy(logits.flatten(0, 1), b["y"].flatten(), reduction="none")
        return (nll * b["w"].flatten()).sum() / b["w"].sum()
    feed = lambda s: {**batches(s), "w": (torch.arange(T) % 2).float().expand(4, T)}
    m = tiny()
    with torch.no_grad():
        expect = weighted(m, feed(0)).item()
    h = train(m, feed, cfg(max_steps=2), loss_fn=weighted)
    assert h["loss"][0] == pytest.approx(expect, rel=1e-6)
    with pytest.raises(ValueError, match="not model inputs"):
        train(tiny(), feed, cfg(max_steps=1, warmup_steps=0))
    # data.py's source ids ride along as labels; the default loss does not need them
    with_src = lambda s: {**batches(s), "source_ids": torch.ones(4, T, dtype=torch.long)}
    assert train(tiny(), with_src, cfg(max_steps=2))["loss"] == train(tiny(), batches, cfg(max_steps=2))["loss"]


def test_bad_train_input():
    with pytest.raises(ValueError, match="max_steps > 0"):
        train(tiny(), batches, cfg(max_steps=0))
    with pytest.raises(ValueError, match="warmup_steps <= max_steps"):
        train(tiny(), batches, cfg(max_steps=5, warmup_steps=6))
    with pytest.raises(TypeError):
        train(tiny(), 42, cfg())


def test_a_damaged_checkpoint_is_named_with_what_to_do(tmp_path):
    m, opt = _trained_pair()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, m, opt, step=3)
    whole = path.read_bytes()
    for damaged in (whole[:len(whole) // 2], whole[:100], b"", whole[:-30]):       # truncated: disk full, cut copy
        path.write_bytes(damaged)
        with pytest.raises(TR.CheckpointError, match=re.escape(str(path)) + r" is damaged .*Delete it"):
            load_checkpoint(path)
        with pytest.raises(TR.CheckpointError, match="is damaged"):                # what a resuming run meets
            train(tiny(), batches, cfg(ckpt_path=str(path), resume=True))
    path.write_bytes(whole)                                                       # and the intact file still loads
    assert load_checkpoint(path)["step"] == 3


def test_a_flipped_byte_inside_a_tensor_is_caught_before_resuming(tmp_path):
    """torch.load does not check the zip's CRCs: without the check a flipped byte resumes silently."""
    m, opt = _trained_pair()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, m, opt, step=3)
    whole = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:                        # a byte in the middle of the largest tensor's data
        # (tensors are the archive's data/ members; the pickle, which holds the randomly seeded python RNG
        # state, is sometimes the largest member, and a flipped byte there already fails torch.load)
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    whole[start + info.compress_size // 2] ^= 0x10
    path.write_bytes(bytes(whole))
    torch.load(path, weights_only=True)                     # what would happen without the check: no error
    with pytest.raises(TR.CheckpointError, match=re.escape(str(path)) + r" is damaged \(member .* CRC-32"):
        load_checkpoint(path)
    with pytest.raises(TR.CheckpointError, match="is damaged"):
        train(tiny(), batches, cfg(ckpt_path=str(path), resume=True))


def test_a_refused_but_intact_checkpoint_is_not_called_damaged(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, tiny(), step=1, extra={"obj": RunCfg})                  # a class: weights_only refuses it
    with pytest.raises(Exception) as e:
        load_checkpoint(path)
    assert not isinstance(e.value, TR.CheckpointError)
    assert load_checkpoint(path, weights_only=False)["extra"]["obj"] is RunCfg


# --- run_key: when a finished checkpoint may be reused ---------------------------------------------

def test_digest_is_stable_and_sees_every_byte():
    a = {"x": torch.arange(6).view(2, 3), "ids": [[1, 2], [3]], "p": 0.1, "name": "run"}
    assert TR.digest(a) == TR.digest({"name": "run", "p": 0.1, "ids": [[1, 2], [3]], "x": torch.arange(6).view(2, 3)})
    assert TR.digest(a) == "3bcc6df0c131d8f5"   # pinned: the same in every process (no hash seed), so caches survive
    for b in ({**a, "x": torch.arange(6).view(3, 2)}, {**a, "x": torch.arange(6).view(2, 3).int()},
              {**a, "x": torch.arange(6).view(2, 3) * (torch.arange(6).view(2, 3) != 5)},
              {**a, "ids": [[1], [2, 3]]}, {**a, "p": 0.10000001}, {**a, "name": "run "}, {**a, "q": None}):
        assert TR.digest(b) != TR.digest(a)
    assert TR.digest(1) != TR.digest(1.0) != TR.digest(True) and TR.digest("1") != TR.digest(1)
    assert TR.digest({3, 1, 2}) == TR.digest({2, 3, 1})


def test_run_key_follows_what_training_receives():
    mcfg = ModelConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32, d_ff=64)
    data = {"x": SEQS}
    key = TR.run_key(mcfg, cfg(), data, batch_size=4, p=0.1)
    # how the run logs, checkpoints and where it runs do not change the weights
    for tc in (cfg(log_every=5), cfg(ckpt_every=2), cfg(ckpt_path="elsewhere.pt"), cfg(resume=True),
               cfg(device="cuda")):
        assert TR.run_key(mcfg, tc, data, batch_size=4, p=0.1) == key
    # a script Config read by field name gives the same key as the TrainConfig it stands for
    assert TR.run_key(mcfg, RunCfgLoop(), data, batch_size=4, p=0.1) == \
        TR.run_key(mcfg, TR.as_train_config(RunCfgLoop()), data, batch_size=4, p=0.1)
    # everything training sees does
    changed = [TR.run_key(mcfg, cfg(**kw), data, batch_size=4, p=0.1) for kw in
               (dict(lr=2e-2), dict(min_lr=0.0), dict(weight_decay=0.0), dict(betas=(0.9, 0.99)),
                dict(warmup_steps=3), dict(max_steps=11), dict(grad_clip=0.5), dict(seed=4), dict(eval_every=5))]
    changed += [TR.run_key(ModelConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32, d_ff=32),
                           cfg(), data, batch_size=4, p=0.1),
                TR.run_key(mcfg, cfg(), {"x": SEQS[:, :-1]}, batch_size=4, p=0.1),
                TR.run_key(mcfg, cfg(), data, batch_size=5, p=0.1),
                TR.run_key(mcfg, cfg(), data, batch_size=4, p=0.3),
                TR.run_key(mcfg, cfg(), data, batch_size=4)]
    assert key not in changed and len(set(changed)) == len(changed)


@dataclass
class RunCfgLoop:                  # a script's Config: loop fields among others
    lr: float = 1e-2
    warmup_steps: int = 2
    max_steps: int = 10
    seed: int = 3
    relearn_steps: int = 20


def test_finished_checkpoint_is_reused_only_when_training_is_the_same(tmp_path):
    """The behaviour scripts rely on: a checkpoint named by run_key is picked up again (no step is trained) when
    only an evaluation setting changes, and a new one is trained when anything training sees changes."""
    mcfg = tiny().cfg

    def run(tc, eval_tag):
        tc = TR.dataclasses.replace(tc, ckpt_path=str(tmp_path / f"m-{TR.run_key(mcfg, tc, SEQS)}.pt"), resume=True)
        m = tiny()
        h = train(m, batches, tc, eval_fn=lambda net, step: {"tag": eval_tag}, log=None)
        return h, m, tc.ckpt_path

    h1, m1, p1 = run(cfg(max_steps=4), "a")
    h2, m2, p2 = run(cfg(max_steps=4, log_every=1), "b")      # evaluation-only change: nothing retrained
    assert p2 == p1 and h2["start_step"] == 4 and h2["loss"] == h1["loss"]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    h3, _, p3 = run(cfg(max_steps=4, lr=2e-2), "a")             # a training change: trained from step 0
    assert p3 != p1 and h3["start_step"] == 0 and h3["loss"] != h1["loss"]
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in (p1, p3))


def test_train_cached_reuses_reports_and_checks_its_key(tmp_path):
    """train_cached: the key goes into the file, a reuse trains nothing and reports the run that trained the model
    (its .time.json side file), a file under another key's name is refused, a file without a key is taken."""
    key = TR.run_key(tiny().cfg, cfg(max_steps=4), SEQS)
    tc = cfg(max_steps=4, ckpt_path=TR.ckpt_path(str(tmp_path), "m", key))
    assert tc.ckpt_path == str(tmp_path / "ckpt" / f"m-{key}.pt")
    h1, info1 = TR.train_cached(tiny(), batches, tc, key, log=None)
    h2, info2 = TR.train_cached(tiny(), batches, tc, key, log=None)
    assert h1["start_step"] == 0 and h2["start_step"] == 4 and not info1["cached"] and info2["cached"]
    assert info2 == dict(info1, cached=True) and info1["steps"] == 4 and info1["final_loss"] == h1["loss"][-1]
    assert load_checkpoint(tc.ckpt_path)["config"]["run_key"] == key
    with pytest.raises(ValueError, match="delete the file"):
        TR.check_run_key(tc.ckpt_path, "0" * 16)
    save_checkpoint(str(tmp_path / "old.pt"), tiny())          # written before keys were stored: taken
    TR.check_run_key(str(tmp_path / "old.pt"), key)
    TR.check_run_key(str(tmp_path / "absent.pt"), key)


def test_cached_json_is_computed_once(tmp_path):
    calls = []
    fn = lambda: calls.append(1) or {"x": 1.5}
    assert TR.cached(str(tmp_path), "k", fn) == TR.cached(str(tmp_path), "k", fn) == {"x": 1.5}
    assert calls == [1] and os.listdir(tmp_path / "cache") == ["k.json"]


def test_a_model_kwarg_given_as_a_function_is_built_from_the_local_batch():
    seen = []

    def mask_of(local):                      # e.g. a per-row mask object built from this rank's source ids
        seen.append(local["x"].shape)
        return torch.zeros(64)
    m1, m2 = tiny(), tiny()
    h1 = train(m1, lambda s: {**batches(s), "mlp_mask": mask_of}, cfg(max_steps=3), log=None)
    h2 = train(m2, lambda s: {**batches(s), "mlp_mask": torch.zeros(64)}, cfg(max_steps=3), log=None)
    assert seen == [(4, T)] * 3 and h1["loss"] == h2["loss"]


def test_epoch_batch_walks_the_epochs_of_an_order():
    import data as D
    order = D.EpochIterator(10, 4, seed=1)
    it = D.EpochIterator(10, 4, seed=1)
    for step in range(9):                     # 3 steps per epoch, the last one short: the iterator's batches
        assert torch.equal(TR.epoch_batch(order, step), next(it))


def test_a_damaged_cache_json_is_named(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"wall_s": 1.5, "cpu')
    with pytest.raises(TR.CheckpointError, match=re.escape(str(path)) + r" is damaged \(not valid JSON"):
        TR.load_json(path)
    path.write_text('{"wall_s": 1.5}')
    assert TR.load_json(path) == {"wall_s": 1.5}


def test_out_dir_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path):
    import json as _json
    out = tmp_path / "run"
    with TR.out_dir_lock(str(out)):
        held = _json.loads((out / ".lock").read_text())
        assert held["pid"] == os.getpid()
        with pytest.raises(TR.OutDirInUse, match=f"pid {os.getpid()}"):
            with TR.out_dir_lock(str(out)):
                pass
    assert not (out / ".lock").exists()                             # released on exit
    (out / ".lock").write_text(_json.dumps({"pid": 2 ** 22 + 12345, "host": __import__("socket").gethostname()}))
    with TR.out_dir_lock(str(out)):                                 # the holder is gone: taken over
        assert _json.loads((out / ".lock").read_text())["pid"] == os.getpid()


# --- LazyRowAdamW: NULLs' sparse sink rows ----------------------------------------------------------

def _adamw_pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)
    b = torch.randn(4, 6, generator=g, dtype=torch.float64)
    return w, b


def test_lazy_adamw_with_every_row_active_is_adamw():
    w, b = _adamw_pair()
    pa = [nn.Parameter(w.clone()), nn.Parameter(b.clone())]
    pb = [nn.Parameter(w.clone()), nn.Parameter(b.clone())]
    ref = torch.optim.AdamW(pa, lr=0.1, betas=(0.9, 0.95), weight_decay=0.1)
    lazy = TR.LazyRowAdamW([{"params": [pb[0]], "row_dim": 0}, {"params": [pb[1]], "row_dim": 1}], lr=0.1,
                           betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        grads = [torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)]
        for p, q, gr in zip(pa, pb, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        ref.step()
        lazy.step()
    for p, q in zip(pa, pb):
        assert torch.allclose(p, q, rtol=0, atol=1e-12)


def test_lazy_adamw_leaves_rows_without_gradient_bit_identical_and_moves_active_rows_like_adamw():
    w, b = _adamw_pair()
    lazy_w, lazy_b, ref_w = nn.Parameter(w.clone()), nn.Parameter(b.clone()), nn.Parameter(w.clone())
    lazy = TR.LazyRowAdamW([{"params": [lazy_w], "row_dim": 0}, {"params": [lazy_b], "row_dim": 1}], lr=0.1,
                           weight_decay=0.1)
    ref = torch.optim.AdamW([ref_w], lr=0.1, weight_decay=0.1)
    active = torch.tensor([0, 2, 5])                          # sink rows 0, 2, 5 switched on every step
    g = torch.Generator().manual_seed(2)
    for step in range(4):
        gw = torch.zeros(6, 4, dtype=torch.float64)
        gw[active] = torch.randn(3, 4, generator=g, dtype=torch.float64)
        gb = torch.zeros(4, 6, dtype=torch.float64)
        gb[:, active] = torch.randn(4, 3, generator=g, dtype=torch.float64)
        lazy_w.grad, lazy_b.grad, ref_w.grad = gw, gb, gw.clone()
        lazy.step()
        ref.step()
        off = torch.tensor([1, 3, 4])
        assert torch.equal(lazy_w[off], w[off]) and torch.equal(lazy_b[:, off], b[:, off])   # not a bit moved
        assert torch.allclose(lazy_w[active], ref_w[active], rtol=0, atol=1e-12)        # AdamW's update
    # dense AdamW moves the inactive rows too (weight decay): the difference the docstring states
    assert not torch.equal(ref_w[off], w[off])
    assert lazy.state[lazy_w]["step"].tolist() == [4, 0, 4, 0, 0, 4]



def _neuron_grads(g, active, shapes=((6, 4), (6, 3), (5, 6))):
    """Gradients of an up-like, a gate-like (rows along dim 0) and a down-like tensor (rows along dim 1) in
    which only the `active` rows (neurons) are nonzero."""
    out = []
    for shape in shapes:
        x = torch.zeros(shape, dtype=torch.float64)
        if shape[0] == 6:
            x[active] = torch.randn(len(active), shape[1], generator=g, dtype=torch.float64)
        else:
            x[:, active] = torch.randn(shape[0], len(active), generator=g, dtype=torch.float64)
        out.append(x)
    return out


def test_lazy_adamw_row_groups_move_a_neuron_in_every_tensor_or_not_at_all():
    """A neuron's rows in several tensors (up, gate: dim 0; down: dim 1) share one moments buffer and one step
    count; the neurons a step leaves without gradient stay bit-identical (no decay, no drift), the others get
    dense AdamW's update; the optimizer's state survives a state_dict round trip."""
    torch.manual_seed(0)
    init = [torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64),
            torch.randn(5, 6, dtype=torch.float64)]
    lazy_ps, ref_ps = [nn.Parameter(x.clone()) for x in init], [nn.Parameter(x.clone()) for x in init]
    groups = lambda ps: [{"params": ps[:2], "row_dim": 0}, {"params": ps[2:], "row_dim": 1}]
    lazy = TR.LazyRowAdamW(groups(lazy_ps), lr=0.1, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_ps, lr=0.1, weight_decay=0.1)
    g = torch.Generator().manual_seed(3)
    active, off = [0, 2, 5], [1, 3, 4]
    for step in range(3):
        grads = _neuron_grads(g, active)
        for p, q, gr in zip(lazy_ps, ref_ps, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        lazy.step()
        ref.step()
        for p, q, x in zip(lazy_ps, ref_ps, init):
            rows = (lambda t, r: t[r]) if p.shape[0] == 6 else (lambda t, r: t[:, r])
            assert torch.equal(rows(p, off), rows(x, off))                         # not a bit moved
            assert torch.allclose(rows(p, active), rows(q, active), rtol=0, atol=1e-12)
    assert lazy.state[lazy_ps[0]]["step"].tolist() == [3, 0, 3, 0, 0, 3]
    # neuron 1 switched on at step 4 starts its own bias correction; a checkpoint's state continues exactly
    again = TR.LazyRowAdamW(groups([nn.Parameter(p.detach().clone()) for p in lazy_ps]), lr=0.1, weight_decay=0.1)
    again.load_state_dict(copy.deepcopy(lazy.state_dict()))     # as from a checkpoint file
    grads = _neuron_grads(g, [1, 2])
    for opt in (lazy, again):
        for p, gr in zip(opt.param_groups[0]["params"] + opt.param_groups[1]["params"], grads):
            p.grad = gr.clone()
        opt.step()
    assert lazy.state[lazy_ps[0]]["step"].tolist() == [3, 1, 4, 0, 0, 3]
    for p, q in zip(lazy_ps, again.param_groups[0]["params"] + again.param_groups[1]["params"]):
        assert torch.equal(p, q)



def test_lazy_adamw_expect_rows_reads_only_the_promised_rows_with_the_same_update():
    """expect_rows(rows): step() reads only those rows' gradients; the update is the scanning step's, bit for bit,
    promised rows without gradient stay as they are, and the promise holds for one step."""
    torch.manual_seed(0)
    init = [torch.randn(6, 4), torch.randn(6, 3), torch.randn(5, 6)]
    runs = []
    for promise in (False, True):
        ps = [nn.Parameter(x.clone()) for x in init]
        opt = TR.LazyRowAdamW([{"params": ps[:2], "row_dim": 0}, {"params": ps[2:], "row_dim": 1}], lr=0.1,
                              weight_decay=0.1)
        g = torch.Generator().manual_seed(4)
        for active in ([0, 2, 5], [2, 3], [1, 2]):
            for p, gr in zip(ps, _neuron_grads(g, active, shapes=[tuple(x.shape) for x in init])):
                p.grad = gr.float()
            if promise and active != [1, 2]:                          # the last step scans again
                opt.expect_rows(torch.tensor(active))
                opt.expect_rows(torch.tensor([4, 2]))                 # row 4: promised, no gradient
            opt.step()
            assert opt._expected is None
        runs.append(([p.detach().clone() for p in ps], opt.state[ps[0]]["step"].clone(),
                     opt.state[ps[2]]["exp_avg"].clone()))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    assert torch.equal(runs[0][1], runs[1][1]) and runs[1][1][4] == 0 and torch.equal(runs[0][2], runs[1][2])
    assert torch.equal(runs[1][0][0][4], init[0][4]) and torch.equal(runs[1][0][2][:, 4], init[2][:, 4])


def _torch_and_ours_adamw(dtype=torch.float32, **kw):
    """Two identical parameter sets, one under torch.optim.AdamW (its CPU for-loop) and one under train.AdamW."""
    g = torch.Generator().manual_seed(0)
    shapes = [(40, 16), (16,), (8, 8, 4)]
    a = [nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in shapes]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    groups = lambda ps: [{"params": ps[:1], "weight_decay": 0.1}, {"params": ps[1:], "weight_decay": 0.0}]
    return a, b, torch.optim.AdamW(groups(a), **kw), TR.AdamW(groups(b), **kw)


def _bits(x):
    return x.detach().contiguous().view(torch.int16 if x.element_size() == 2 else
                                        torch.int32 if x.element_size() == 4 else torch.int64)


@pytest.mark.parametrize("dtype,kw", [(torch.float32, dict(lr=3e-3, betas=(0.9, 0.95))),
                                      (torch.float32, dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6)),
                                      (torch.float32, dict(lr=1e-3, eps=0.0)),         # no eps: the plain sqrt
                                      (torch.bfloat16, dict(lr=3e-3, betas=(0.9, 0.95))),
                                      (torch.float64, dict(lr=3e-3, betas=(0.9, 0.95)))])
def test_adamw_is_torchs_adamw_bit_for_bit_with_zero_and_denormal_moments(dtype, kw):
    a, b, oa, ob = _torch_and_ours_adamw(dtype, **kw)
    g = torch.Generator().manual_seed(1)
    tiny = torch.finfo(torch.float32).tiny
    for step in range(30):
        for pa, pb in zip(a, b):
            grad = torch.randn(pa.shape, generator=g, dtype=torch.float64)
            grad[: pa.shape[0] // 2] = 0                      # rows that never get a gradient: moments stay 0
            if step >= 10 and pa.dim() > 1:
                grad[pa.shape[0] // 2:][::3] = 0              # rows whose gradient stops: moments decay
            if step == 20:                                    # moments at the edges: denormals, tiny, 1e-36, ...
                for p, o in ((pa, oa), (pb, ob)):
                    v = o.state[p]["exp_avg_sq"].view(-1)
                    vals = torch.tensor([0.0, tiny / 64, tiny / 2, tiny, 1e-37, 1e-36, 1.01e-36, 1e-30, 1e-12],
                                        dtype=torch.float64).to(dtype)
                    v[: len(vals)] = vals
                    o.state[p]["exp_avg"].view(-1)[: len(vals)] = 1e-6     # a step that shows the denominator
            pa.grad, pb.grad = grad.to(dtype), grad.to(dtype)
        oa.step()
        ob.step()
        for pa, pb in zip(a, b):
            assert torch.equal(_bits(pa), _bits(pb)), f"step {step}: parameters differ"
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(_bits(oa.state[pa][k]), _bits(ob.state[pb][k]))
    assert ob.state_dict()["state"][0]["step"] == oa.state_dict()["state"][0]["step"] == 30
    assert type(TR.make_optimizer(nn.Linear(3, 3), 1e-3, 0.1)) is TR.AdamW


def test_adamw_state_dicts_load_both_ways():
    a, b, oa, ob = _torch_and_ours_adamw()
    for p in a + b:
        p.grad = torch.ones_like(p)
    oa.step()
    ob.step()
    a2, b2, oa2, ob2 = _torch_and_ours_adamw()
    oa2.load_state_dict(ob.state_dict())                      # checkpoints written before the class read as before
    ob2.load_state_dict(oa.state_dict())
    assert oa2.state_dict()["state"][0]["step"] == ob2.state_dict()["state"][0]["step"] == 1


def test_adamw_never_takes_the_sqrt_of_a_zero_or_denormal_moment():
    # the point of the class: exact zeros and denormals take a slow sqrt on this repo's CPUs (~6x, ~40x)
    from torch.overrides import TorchFunctionMode
    seen = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("sqrt", "sqrt_"):
                seen.append(float(args[0].min()))          # (the mode is off inside its own handler)
            return func(*args, **(kwargs or {}))
    for make in (TR.AdamW, torch.optim.AdamW):
        p = nn.Parameter(torch.zeros(1000))
        opt = make([p], lr=1e-3)
        p.grad = torch.zeros_like(p)                       # no gradient ever: the moments stay exactly 0
        seen.clear()
        with Watch():
            opt.step()
            opt.step()
        assert len(seen) == 2 and (min(seen) >= TR.AdamW.TINY) == (make is TR.AdamW)   # torch's does take it


def test_make_optimizer_row_groups_by_dim_and_row_count():
    a, b, c = nn.Linear(4, 6, bias=False), nn.Linear(6, 4, bias=False), nn.Linear(4, 5, bias=False)
    net = nn.Sequential(a, b, c)
    opt = TR.make_optimizer(net, 1e-3, 0.1, row_dims={a.weight: 0, b.weight: 1, c.weight: 0})
    rows = {g["name"]: [tuple(p.shape) for p in g["params"]] for g in opt.param_groups if g["row_dim"] is not None}
    assert rows == {"decay/rows0:5": [(5, 4)], "decay/rows0:6": [(6, 4)], "decay/rows1:6": [(4, 6)]}
    with pytest.raises(ValueError, match="as long there"):
        TR.LazyRowAdamW([{"params": [a.weight, c.weight], "row_dim": 0}])


def test_prefixed_stream_prefixes_whole_lines_only():
    import io
    buf = io.StringIO()
    p = TR.Prefixed(buf, "[w] ")
    p.write("a\nb")
    assert buf.getvalue() == "[w] a\n"          # "b" waits for its end of line
    p.write("c\n\nd\n")
    assert buf.getvalue() == "[w] a\n[w] bc\n[w] \n[w] d\n"


def test_side_by_side_only_on_a_cpu_and_outside_torchrun(monkeypatch):
    assert TR.side_by_side(2, "cpu") == 2 and TR.side_by_side(1, "cpu") == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert TR.side_by_side(2, "cpu") == 1
    monkeypatch.setattr(TR, "pick_device", lambda device: "cuda")
    monkeypatch.delenv("WORLD_SIZE")
    assert TR.side_by_side(2, "auto") == 1


def test_cpu_seconds_counts_the_workers_of_run_jobs():
    import math
    import time
    c0, p0 = TR.cpu_seconds(), time.process_time()
    out = TR.run_jobs(math.factorial, [(60000,), (60000,)], 2)
    assert out[0] == out[1] == math.factorial(60000)
    assert TR.cpu_seconds() - c0 > time.process_time() - p0        # the two workers' CPU is in there


def test_jobs_in_background_let_this_process_work_meanwhile():
    import math
    import time
    with TR.jobs_in_background(math.factorial, [(3,), (4,), (5,)], 2) as results:
        here = math.factorial(6)                    # this process, while the workers run
        assert results() == [6, 24, 120] and here == 720
    with TR.jobs_in_background(math.factorial, [(3,)], 1) as results:      # one worker: run here when asked
        assert results() == [6]
    with pytest.raises(ValueError):                 # a job's error surfaces at the end of a block that never asked
        with TR.jobs_in_background(math.factorial, [(-1,), (3,)], 2):
            time.sleep(0)
    with pytest.raises(KeyError):                   # an error in the block stops the workers and propagates
        with TR.jobs_in_background(time.sleep, [(30,), (30,)], 2):
            t0 = time.time()
            raise KeyError("here")
    assert time.time() - t0 < 20
    import multiprocessing       # ... every one of them, also one the error came before: none runs its job on
    while multiprocessing.active_children() and time.time() - t0 < 10:     # (holding up this process's exit)
        time.sleep(0.05)
    assert not multiprocessing.active_children()


def _timed_sleep(seconds):
    """(start, end) of a sleep, in a worker process."""
    import time
    t0 = time.time()
    time.sleep(seconds)
    return t0, time.time()


def test_run_jobs_starts_a_job_once_the_jobs_it_needs_are_done():
    out = TR.run_jobs(_timed_sleep, [(0.6,), (0.0,), (0.0,), (0.0,)], 2, after={2: [0], 3: [1]})
    assert out[2][0] >= out[0][1]                  # job 2 waited for job 0 ...
    assert out[3][0] < out[0][1]                   # ... while job 3 ran as soon as job 1 was done
    with pytest.raises(ValueError, match="before it"):
        TR.run_jobs(_timed_sleep, [(0.0,), (0.0,)], 2, after={0: [1]})
