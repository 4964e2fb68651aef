"""bench.py: the row machinery on a fake clock (alternation, ratios, spread, verdicts), and rows end to end."""
import json

import pytest

import bench


class FakeClock:
    """Each call of a side advances the clock by its cost; records the order of calls."""
    def __init__(self):
        self.t, self.calls = 0.0, []

    def __call__(self):
        return self.t

    def side(self, name, costs):
        it = iter(costs)

        def fn():
            self.calls.append(name)
            self.t += next(it)
        return fn


def _measure(pair, measure="speed", rounds=4, warmup=1):
    r = bench.Row("fake", None, anchor="B", measure=measure)
    return bench.measure(pair, r, rounds=rounds, warmup=warmup, min_time=0.0, clock=pair.clock, cpu_clock=pair.clock)


def _pair(a_costs, b_costs, **kw):
    clock = FakeClock()
    p = bench.Pair("A", clock.side("a", a_costs), "B", clock.side("b", b_costs), work=10, unit="tok/s", **kw)
    p.clock = clock
    return p


def test_alternating_rounds_and_ratios():
    p = _pair([1.0] * 5, [2.0] * 5)
    res = _measure(p)
    # one warm-up call each, then A B, B A, A B, B A
    assert p.clock.calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert res["ratio"] == pytest.approx(2.0) and res["spread"] == pytest.approx([2.0, 2.0])
    assert res["a_rate"] == pytest.approx(10.0) and res["b_rate"] == pytest.approx(5.0)
    assert res["cpu_ratio"] == pytest.approx(2.0)
    assert _measure(_pair([1.0] * 5, [2.0] * 5), measure="time")["ratio"] == pytest.approx(0.5)


def test_spread_is_the_median_confidence_interval_and_iqr_is_kept():
    # warm-up, then per-round B/A ratios 1, 2, 3, 4, 5 (B costs vary, A costs 1)
    res = _measure(_pair([1.0] * 6, [9.0, 1.0, 2.0, 3.0, 4.0, 5.0]), rounds=5)
    assert res["round_ratios"] == pytest.approx([1, 2, 3, 4, 5])
    assert res["ratio"] == pytest.approx(3.0) and res["iqr"] == pytest.approx([2.0, 4.0])
    # 5 rounds: only min-max reaches 95% (coverage 1 - 2 / 32); [x2, x4] would cover 1 - 2 * 6 / 32 = 62.5%
    assert res["spread"] == pytest.approx([1.0, 5.0]) and res["spread_coverage"] == pytest.approx(30 / 32)
    assert res["min_max"] == pytest.approx([1.0, 5.0])


def test_median_ci_by_hand():
    # 15 rounds: P(Bin(15, 1/2) <= 3) = (1 + 15 + 105 + 455) / 2^15 = 576 / 32768 <= 2.5%, <= 4 is 5.9%: [x4, x12]
    lo, hi, cov = bench.median_ci([float(x) for x in range(15, 0, -1)])
    assert (lo, hi) == (4.0, 12.0) and cov == pytest.approx(1 - 2 * 576 / 32768)
    # a slow explicit check of the coverage: enumerate all 2^n sign patterns of the rounds around the true median
    import itertools
    n, j = 9, None
    for jj in range(1, 6):
        below = sum(1 for s in itertools.product((0, 1), repeat=n) if sum(s) <= jj - 1) / 2 ** n
        if 1 - 2 * below >= 0.95:
            j = jj
    lo, hi, cov = bench.median_ci(list(range(1, n + 1)))
    assert (lo, hi) == (j, n + 1 - j)
    assert bench.median_ci([2.0]) == (2.0, 2.0, 0.0)


def test_fixed_rate_anchor():
    clock = FakeClock()
    p = bench.Pair("A", clock.side("a", [0.5] * 4), "peak", None, work=100.0, b_rate=400.0)
    r = bench.Row("mfu", None, anchor="peak")
    res = bench.measure(p, r, rounds=3, warmup=1, min_time=0.0, clock=clock, cpu_clock=clock)
    assert res["ratio"] == pytest.approx(0.5)          # 200 per second of a 400 peak
    assert res["b_rate"] == 400.0 and res["b_ms"] is None


def test_short_calls_are_repeated_to_min_time():
    clock = FakeClock()
    p = bench.Pair("A", clock.side("a", [2**-7] * 100), "B", clock.side("b", [2**-6] * 100))
    res = bench.measure(p, bench.Row("x", None, anchor="B"), rounds=2, warmup=1, min_time=0.125, clock=clock,
                        cpu_clock=clock)
    assert res["calls_per_timing"] == {"a": 16, "b": 8}
    assert res["a_ms"] == pytest.approx(1e3 / 128) and res["ratio"] == pytest.approx(2.0)


def test_verdict_both_ways_and_inconclusive():
    assert bench.verdict(">= 0.95", 0.97, 1.02) == "met"
    assert bench.verdict(">= 0.95", 0.90, 0.94) == "NOT met"
    assert bench.verdict(">= 0.95", 0.92, 1.01) == "inconclusive: spread"
    assert bench.verdict("<= 1.0", 0.9, 0.99) == "met"
    assert bench.verdict("<= 1.0", 1.01, 1.1) == "NOT met"
    assert bench.verdict("<= 1.0", 0.99, 1.01) == "inconclusive: spread"
    assert bench.verdict(None, 1, 2) is None


def test_registration_errors():
    with pytest.raises(ValueError, match="target"):
        bench.row("bad_target", anchor="x", target="> 1")
    with pytest.raises(ValueError, match="measure"):
        bench.row("bad_measure", anchor="x", measure="rate")
    with pytest.raises(ValueError, match="twice"):
        bench.row("train_nanogpt", anchor="x")


def test_skip_is_reported_not_raised():
    def fn(cfg, device):
        raise bench.Skip("no GPU here")
    res = bench.run_row(bench.Row("gpu_x", fn, anchor="peak"), bench.Config(), bench.torch.device("cpu"))
    assert res["skipped"] == "no GPU here"


def test_main_runs_a_row_end_to_end(tmp_path):
    """A tiny row registered the way paper files register theirs, run through main() and results.json."""
    from model import GPT, ModelConfig

    @bench.row("test_tiny_train", anchor="the same step", target=">= 0.01")
    def tiny(cfg, device):
        m = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, d_ff=32, vocab_size=32, block_size=8))
        x = bench.torch.randint(0, 32, (2, 8))
        step = bench._train_step(m, bench._adamw(m), x, x, device)

        def counted():
            calls.append(1)
            step()
        return bench.Pair("step", counted, "step again", counted, work=x.numel(), unit="tokens/s", what="tiny")
    calls = []
    try:
        out = bench.main(["--preset=smoke", "--rows=test_tiny_train", f"--out_dir={tmp_path / 'smoke'}"])
        # smoke: one call of each side, no warm-up, and no verdict from one round
        assert len(calls) == 2 and out[0]["rounds"] == 1 and out[0]["verdict"] == "inconclusive: 1 round"
        out = bench.main(["--preset=smoke", "--rounds=2", "--max_rounds=2", "--rows=test_tiny_train",
                          f"--out_dir={tmp_path}"])
    finally:
        del bench.ROWS["test_tiny_train"]
    assert [r["name"] for r in out] == ["test_tiny_train"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["machine"]["threads"] == 1 and saved["machine"]["torch"] and saved["machine"]["cpu"]
    r = saved["rows"][0]
    assert r["rounds"] == 2 and r["ratio"] > 0 and len(r["spread"]) == 2 and r["anchor"] == "the same step"
    assert r["verdict"] == "inconclusive: 2 rounds"        # min-max of 2 rounds covers the median only 50%
    assert r["spread_coverage"] == pytest.approx(0.5)
    md = (tmp_path / "results.md").read_text()
    assert "| test_tiny_train | step | step again |" in md and "min-max, 50% coverage" in md
    assert (tmp_path / "ratios.png").stat().st_size > 1000
    with pytest.raises(SystemExit) as e:
        bench.main(["--rows=no_such_row", f"--out_dir={tmp_path}"])
    assert e.value.code == 2


def test_profile_gap_names_the_costlier_op():
    import torch
    x = torch.randn(64, 64)
    p = bench.Pair("A", lambda: [x @ x for _ in range(20)], "B", lambda: x + 1)
    gap = bench.profile_gap(p, torch.device("cpu"), reps=2)
    assert gap[0]["op"] == "aten::mm" and gap[0]["a_ms"] > gap[0]["b_ms"] == 0.0


def test_train_flops_by_hand():
    from model import ModelConfig
    m = ModelConfig(n_layer=2, n_head=2, n_embd=8, d_ff=16, vocab_size=10, block_size=4)
    # 3 tokens: 6 * 1000 params + 12 * 2 layers * 8 * T=4 per token
    assert bench.train_flops(m, tokens=3, T=4, n_params=1000) == 3 * (6000 + 12 * 2 * 8 * 4)


def test_gpu_rows_skip_without_cuda_and_mfu_pair_runs_on_cpu():
    import torch
    import nulls
    from model import ModelConfig
    cpu = torch.device("cpu")
    for name in ("gpu_nulls_dense_limit", "gpu_nulls_fast_path", "gpu_memadapt_read"):
        assert "no CUDA" in bench.run_row(bench.ROWS[name], bench.Config(), cpu)["skipped"]
    # the GPU rows' measurement on a tiny NULLs model, against a made-up peak
    m = ModelConfig(flavor="llama", bias=False, n_layer=1, n_head=2, n_embd=16, d_ff=8 + 32, vocab_size=32, block_size=8)
    p = bench._mfu_pair(m, 2, cpu, peak=1e12, mask_fn=lambda s: nulls.ActiveSinks(s, 8, 32, 4), n_active=1000)
    res = bench.measure(p, bench.Row("mfu", None, anchor="peak"), rounds=1, warmup=1, min_time=0.0)
    assert p.extra["flops_per_step"] == 16 * (6 * 1000 + 12 * 1 * 16 * 8)
    assert res["ratio"] == pytest.approx(res["a_rate"] / 1e12)


def test_memadapt_read_pair_runs_on_cpu():
    import torch
    p = bench._memread_pair(torch.device("cpu"), peak=1e12, d=16, n_sub=8, k=2, k_dim=8, sources=3, per_source=4,
                            batch=2, T=4)
    res = bench.measure(p, bench.Row("mem", None, anchor="peak"), rounds=1, warmup=1, min_time=0.0)
    assert p.extra["flops_per_step"] == 8 * (2 * 16 * 8 + 2 * 8 * 8 + 4 * 2 * 16) and res["ratio"] > 0


def test_nanogpt_anchor_is_the_same_gpt2():
    """With model.py's weights and GPT-2's tanh GELU, the anchor computes exactly what model.py computes, so the
    train_nanogpt rows compare like with like."""
    import torch
    from model import GPT, ModelConfig
    ours = GPT(ModelConfig(flavor="gpt2", n_layer=2, n_head=2, n_embd=16, d_ff=64, vocab_size=32, block_size=8))
    ref = bench.NanoGPT(32, 8, 2, 2, 16, gelu="tanh")
    names = {"ln_1": "ln_1", "attn.qkv": "c_attn", "attn.proj": "c_proj", "ln_2": "ln_2", "mlp.up": "c_fc",
             "mlp.down": "mlp_proj"}
    sd = {}
    for k, v in ours.state_dict().items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            mod, kind = rest.rsplit(".", 1)
            sd[f"h.{i}.{names[mod]}.{kind}"] = v
        else:
            sd[k] = v
    ref.load_state_dict(sd)
    x = torch.randint(0, 32, (3, 8))
    (lo, loss_o), (lr, loss_r) = ours(x, x), ref(x, x)
    assert torch.allclose(lo, lr, atol=1e-5) and torch.allclose(loss_o, loss_r, atol=1e-6)


def test_bench_blocks_store_only_assigned_rows():
    small = bench.train_step_case(16, k=4, entries=4, sources=10, d=8, B=2, T=3)
    big = bench.train_step_case(64, k=4, entries=4, sources=10, d=8, B=2, T=3)
    assert small[0].values.shape == big[0].values.shape == (41, 8)    # 10 x 4 rows + the zero row, whatever N
    assert big[2] - small[2] == (64 * 64 - 16 * 16) * 8                 # only the int64 index map grows with N
    for kind in ("single", "two_pass", "plain"):
        assert bench.read_step(kind, *bench.read_case(6, 3, 4, 10)).shape == (10, 4)


def test_every_cpu_row_builds_a_pair_that_runs_once():
    """Each registered row's pair is built and each side called once (a row whose callee changed signature, as
    neumuter.mask_step's did, fails here rather than in a bench run). Rows that need a GPU or a download skip;
    quick=True, as --preset=smoke: rows whose reference side takes seconds run on fewer items."""
    import torch
    cfg = bench.Config(quick=True)
    for name, r in bench.ROWS.items():
        try:
            pair = r.fn(cfg, torch.device("cpu"))
        except bench.Skip:
            continue
        pair.a()
        pair.b()


def test_tofu_suites_agree_on_a_tiny_llama():
    """The tofu_eval_vs_transformers row's two sides on a tiny random Llama (transformers' LlamaForCausalLM and
    model.GPT holding its weights) and the built-in world's word tokenizer: the same Prob, truth ratios, Min-K%
    scores and AUC, ES and ROUGE-L per item. Batches of 4 over 6 items: padding and a partial last batch on both
    sides. Three answers are made to exercise ES: the model's own greedy continuation (ES 1), the same with one
    token changed (a trailing run only) and a 1-token continuation."""
    pytest.importorskip("transformers")
    import torch
    import data as D
    tok = D.world_tokenizer()
    torch.manual_seed(0)
    shape = dict(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, d_ff=64, block_size=64)
    theirs, ours = bench.llama_twins(shape, initializer_range=0.2)   # peaked logits: no argmax near-ties
    w = D.make_world(0, n_people=20, n_families=8, n_cities=8, n_countries=4, n_holdout=2)
    forget = w.tofu_split("forget10")[:6]
    holdout = [r for r in w.tofu_split("retain90") if r["person"] not in {f["person"] for f in forget}][:6]
    items = bench.tofu_items(tok, forget, holdout)
    own = [row.tolist() for row in ours.generate(items["q"][:3], 6)]
    own[1][2] = (own[1][2] + 1) % tok.vocab_size
    items["a"][:3] = [own[0], own[1], own[2][:1]]
    a = bench.ours_tofu_suite(ours, items, tok, max_new_tokens=8, batch_size=4)
    b = bench.hf_tofu_suite(theirs, items, tok, max_new_tokens=8, batch_size=4)
    agree = bench.tofu_agreement(a, b)
    bench.check_tofu_agreement(agree)
    assert agree["rouge_agree"] == agree["gens_agree"] == 1.0
    assert a["es"][0] == b["es"][0] == 1.0 and a["es"][2] == b["es"][2] == 1.0
    assert 0 < b["es"][1] < 1 and a["es"][1] == pytest.approx(b["es"][1], abs=1e-12)
    assert a["rouge"][0] == b["rouge"][0] > 0
    assert min(agree[k] for k in ("prob_max_rel", "tr_max_rel", "min_k_max_rel")) >= 0
    assert max(agree["prob_max_rel"], agree["tr_max_rel"], agree["min_k_max_rel"]) < 1e-5   # small vocab: tight
    assert 0 <= a["auc"] <= 1 and len(a["min_k_holdout"]) == 6 and len(a["prob"]) == len(b["tr"]) == 6
