"""nulls.py's claims, each on constructed inputs where the verdict is known both ways; the corpus-wide passes
(batched over block-size pieces) against their one-pass reference; the paper preset on long local documents."""
import json
import random

import pytest
import torch

import data
import model
import nulls


V = lambda c: c["verdict"]


def tr(n_gt1, n, high=10.0, low=0.1):
    """n per-fact truth ratios, the first n_gt1 of them above 1."""
    return [high] * n_gt1 + [low] * (n - n_gt1)


def test_claim_unique_removed_reaches_every_verdict():
    on = [1e4] * 60
    assert V(nulls.claim_unique_removed(on, tr(18, 60, 2.0, 0.2), tr(18, 60, 2.0, 0.2))) == "holds"
    c = nulls.claim_unique_removed(on, tr(40, 60, 2.0, 0.2), tr(18, 60, 2.0, 0.2))           # frac 0.67 vs 0.30
    assert V(c) == "fails" and c["value"]["frac_diff"] == pytest.approx(22 / 60)
    assert V(nulls.claim_unique_removed([10.0] * 60, tr(18, 60, 2.0, 0.2), tr(18, 60, 2.0, 0.2))) == "fails"  # fold < 100
    # a difference of 0.10 on 60 facts: the paired interval reaches past 0.15
    assert V(nulls.claim_unique_removed(on, tr(24, 60, 2.0, 0.2), tr(18, 60, 2.0, 0.2))) == "inconclusive"


def test_claim_kept_reaches_every_verdict():
    retr = {"shared": tr(27, 30, 50.0, 0.5), "inferred": tr(5, 10, 2.0, 0.5)}
    same = {"shared": tr(27, 30, 50.0, 0.5), "inferred": tr(5, 10, 2.0, 0.5)}
    # 10 inferred facts cannot resolve a 0.10 difference: inconclusive even when every fact agrees
    c = nulls.claim_kept(same, retr, oracle_off={"shared": {"frac_gt1": 0.9}, "inferred": {"frac_gt1": 0.5}})
    assert V(c) == "inconclusive" and c["value"]["shared frac_diff"] == 0.0 and "oracle" in c["detail"]
    big = {"shared": tr(90, 100, 50.0, 0.5), "inferred": tr(15, 30, 2.0, 0.5)}
    assert V(nulls.claim_kept(big, big)) == "holds"                                      # 30+ agreeing facts
    lost = nulls.claim_kept({**same, "inferred": tr(0, 10, 2.0, 0.9)}, {**retr, "inferred": tr(8, 10, 2.0, 0.9)})
    assert V(lost) == "fails"                                                            # 8 of 10 facts lost
    assert 0.5 <= lost["value"]["inferred geomean_ratio"] <= 2                           # by the fraction alone
    geo = nulls.claim_kept({**big, "shared": tr(90, 100, 5.0, 0.5)}, big)                  # same facts, TR 10x lower
    assert V(geo) == "fails" and geo["value"]["shared frac_diff"] == 0.0


def traj(points):
    return [{"step": i, "specific": a, "related": b, "general_acc": 0.8 - 0.01 * i} for i, (a, b) in enumerate(points)]


def test_matched_point_interpolates_at_the_crossing():
    t = traj([(1.0, 1.0), (0.8, 0.9), (0.4, 0.5)])
    m = nulls.matched_point(t, 0.6)                 # halfway between steps 1 and 2
    assert m["step"] == pytest.approx(1.5) and m["related"] == pytest.approx(0.7)
    assert m["general_acc"] == pytest.approx(0.785)
    assert nulls.matched_point(t, 0.3) is None


def test_claim_not_selective_reaches_every_verdict():
    diagonal = traj([(1.0, 1.0), (0.7, 0.75), (0.2, 0.3)])
    c = nulls.claim_not_selective("npo", diagonal, 0.4)
    assert V(c) == "holds" and c["value"]["slope"] == pytest.approx((1.0 - 0.48) / 0.6)
    selective = traj([(1.0, 1.0), (0.7, 0.98), (0.2, 0.95)])
    assert V(nulls.claim_not_selective("ga", selective, 0.4)) == "fails"
    short = nulls.claim_not_selective("ga", traj([(1.0, 1.0), (0.8, 0.9)]), 0.4)
    assert V(short) == "not testable here" and short["precondition"]["value"] == [1.0, 0.8]
    assert V(nulls.claim_not_selective("ga", traj([(0.3, 1.0), (0.2, 0.9)]), 0.4)) == "not testable here"


def test_claim_selective_reaches_every_verdict():
    assert V(nulls.claim_selective({"specific": 1.0, "related": 0.9}, {"specific": 0.3, "related": 0.88})) == "holds"
    assert V(nulls.claim_selective({"specific": 1.0, "related": 0.9}, {"specific": 0.3, "related": 0.5})) == "fails"
    assert V(nulls.claim_selective({"specific": 0.5, "related": 0.9}, {"specific": 0.5, "related": 0.9})) == \
        "not testable here"


def test_claim_reversed_reaches_every_verdict():
    retr = [3.0, 2.9, 2.8, 2.7, 2.6, 2.5]
    c = nulls.claim_reversed([5.0, 4.0, 3.0, 2.6, 2.0, 1.5], retr)
    assert V(c) == "holds" and c["value"]["steps to reverse"] == 3
    never = nulls.claim_reversed([5.0, 4.9, 4.8, 4.7, 4.6, 4.5], retr)
    assert V(never) == "fails" and never["value"]["steps to reverse"] == 11      # censored past the bar
    slow = nulls.claim_reversed([5.0] * 12 + [1.0], [3.0] * 13, within=10)
    assert V(slow) == "fails" and slow["value"]["steps to reverse"] == 12       # reversed too late
    assert V(nulls.claim_reversed([2.0, 1.9, 1.8, 1.7, 1.6, 1.5], retr)) == "not testable here"   # nothing unlearned


def test_claim_tracks_reaches_every_verdict():
    retr, on = [3.0, 2.9, 2.8], [1.0, 1.0, 1.0]                      # Sink-On far below: the measure can fail
    assert V(nulls.claim_tracks([3.1, 3.0, 2.9], retr, on)) == "holds"
    c = nulls.claim_tracks([3.1, 2.4, 2.9], retr, on)                 # one step 17% off
    assert V(c) == "fails" and c["value"]["max relative gap"] == pytest.approx(0.5 / 2.9)
    ctrl = nulls.claim_tracks([3.1, 3.0, 2.9], retr, [3.0, 2.95, 2.85])   # Sink-On tracks Retrained too
    assert V(ctrl) == "not testable here" and ctrl["precondition"]["value"] == pytest.approx(0.05 / 2.8)


def test_claim_capacity_reaches_every_verdict():
    std, ctrl = [40.0] * 20, [0.5] * 20
    assert V(nulls.claim_capacity([30.0] * 20, std, ctrl)) == "holds"
    c = nulls.claim_capacity([15.0] * 20, std, ctrl)                                    # geomean 0.375x
    assert V(c) == "fails" and c["value"]["geomean_ratio"] == pytest.approx(0.375)
    # the backbone without sinks scores as well as the standard model: the measure cannot separate them
    assert V(nulls.claim_capacity([30.0] * 20, std, [35.0] * 20)) == "not testable here"


def test_claim_general_uses_the_paired_standard_error():
    a = [1] * 80 + [0] * 20
    c = nulls.claim_general(a, a)
    assert V(c) == "holds" and c["tests"][0]["threshold"] == 0.0                         # identical answers
    b = [1] * 78 + [0] * 22                                                               # 2 more wrong
    d = torch.tensor(b, dtype=torch.float64) - torch.tensor(a, dtype=torch.float64)
    c = nulls.claim_general(b, a)
    se = float(d.std() / 10)                                                              # by hand: sd(d) / sqrt(n)
    assert c["tests"][0]["threshold"] == pytest.approx(-se) and c["value"]["accuracy difference"] == pytest.approx(-0.02)
    assert se == pytest.approx((1.96 / 99) ** 0.5 / 10) and V(c) == "fails"               # -0.02 < -0.0141
    mixed = [0, 0] + a[2:99] + [1]                                                        # 2 worse, 1 better
    assert V(nulls.claim_general(mixed, a)) == "holds"                                    # -0.01 >= -0.0174
    assert V(nulls.claim_general([0] * 30 + [1] * 70, a)) == "fails"                      # 10 points worse
    assert V(nulls.claim_general([1] * 95 + [0] * 5, a)) == "holds"                       # better is no cost


def test_claims_over_seeds_reach_inconclusive():
    import eval as ev
    retr, on = [3.0, 2.9, 2.8], [1.0, 1.0, 1.0]
    per = {s: [nulls.claim_tracks([3.0 * (1 + g), 2.9, 2.8], retr, on)] for s, g in ((0, 0.02), (1, 0.05), (2, 0.16))}
    agg = ev.over_seeds(per)[0]
    assert agg["verdict"] == "inconclusive" and list(agg["verdict_per_seed"].values()) == ["holds", "holds", "fails"]
    agg = ev.over_seeds({s: [nulls.claim_tracks([3.0 * (1 + g), 2.9, 2.8], retr, on)] for s, g in ((0, 0.02), (1, 0.03), (2, 0.04))})[0]
    assert agg["verdict"] == "holds"


def test_related_facts_come_from_other_retained_articles():
    world = data.make_world(0)
    forget = world.forget_order[:5]
    rel = nulls.related_facts(world, forget, 60)
    assert len(rel) == 60
    for f, q, p in rel:
        assert f.kind == "unique" and f.person == q and q not in forget and p in forget
        me, them = world.person(p), world.person(q)
        assert q in me.siblings or them.birth_city == me.birth_city
    assert rel[0][1] in world.person(forget[0]).siblings                     # siblings first, round-robin
    assert len({p for _, _, p in rel[:30]}) == 5


def _tiny(vocab=40, n_gen=8, n_pool=32):
    cfg = model.ModelConfig(flavor="llama", vocab_size=vocab, n_layer=2, n_head=2, n_embd=16, d_ff=n_gen + n_pool,
                            bias=False, block_size=8)
    torch.manual_seed(0)
    return model.GPT(cfg).eval()


class _Tok:
    eos_id, pad_id, stoi = 1, 0, {".": 2}


def test_long_documents_are_cut_into_pieces_that_keep_their_source():
    seqs = [list(range(3, 23)), [5, 6, 7]]                                   # 20 tokens and 3, block size 8
    pieces, owner, last = nulls.split_pieces(seqs, 8)
    assert [len(p) for p in pieces] == [8, 8, 4, 3] and owner.tolist() == [0, 0, 0, 1]
    assert last == [False, False, True, True] and sum(pieces[:3], []) == seqs[0]
    cfg = nulls.Config(data="x", block_size=8)
    rows = nulls.segments(cfg, _Tok, pieces, last)
    assert rows["y"][0, :7].tolist() == pieces[0][1:] and rows["y"][0, 7] == -100      # no false eos mid-document
    assert rows["y"][2, 3] == _Tok.eos_id


def test_batched_passes_equal_the_one_pass_reference():
    """embed and seq_losses over block-size pieces, eval_batch rows at a time, equal a direct computation."""
    net = _tiny()
    sinks = nulls.Sinks(8, 32, 4, sources=[1, 2, 3])
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 40, (n,), generator=g).tolist() for n in (5, 20, 8)]
    cfg = nulls.Config(data="x", block_size=8, eval_batch=2)
    calls = []
    hook = net.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    route = torch.tensor([2, 3, 1])
    loss = nulls.seq_losses(cfg, net, _Tok, seqs, sinks, route, forgotten=[3, 1, 2])
    emb = nulls.embed(cfg, net, _Tok, seqs, sinks.expected_mask())
    hook.remove()
    assert max(calls) <= 2                                                   # never more than eval_batch rows
    for i, s in enumerate(seqs):
        mask = sinks.row_mask([int(route[i])], [[3, 1, 2][i]])
        nll, n, hsum = 0.0, 0, torch.zeros(16, dtype=torch.float64)
        torch.set_grad_enabled(False)
        for k in range(0, len(s), 8):                                        # slow reference: piece by piece
            piece = s[k:k + 8]
            x = torch.tensor([piece])
            y = torch.tensor([piece[1:] + ([s[k + 8]] if k + 8 < len(s) else [1])])
            if k + 8 < len(s):
                y[0, -1] = -100
            keep = y != -100
            lp = net.token_logprobs(x, y, mlp_mask=mask)
            nll -= float((lp.double() * keep).sum())
            n += int(keep.sum())
            h = []
            hk = net.ln_f.register_forward_hook(lambda m, a, o: h.append(o))
            net(x, mlp_mask=sinks.expected_mask())
            hk.remove()
            hsum += h[0][0].double().sum(0)
        torch.set_grad_enabled(True)
        assert float(loss[i]) == pytest.approx(nll / n, rel=1e-5)
        assert torch.allclose(emb[i], (hsum / len(s)).float(), atol=1e-5)


def test_mc_accuracy_equals_a_question_by_question_reference():
    world = data.make_world(0, n_people=12, n_families=5, n_cities=4, n_countries=4)
    tok = data.world_tokenizer()
    cfg = model.ModelConfig(flavor="llama", vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, d_ff=40,
                            bias=False, block_size=64)
    torch.manual_seed(1)
    net = model.GPT(cfg).eval()
    sinks = nulls.Sinks(8, 32, 4, sources=range(1, 13))
    qs = data.general_questions(world)[:20]
    route = torch.arange(len(qs)) % 12 + 1
    right = 0
    for q, r in zip(qs, route):
        scores = []
        for c in q.choices:
            p, a = tok.encode(q.prompt), tok.encode(c)
            x = torch.tensor([p + a[:-1]])
            y = torch.tensor([[-100] * (len(p) - 1) + a])
            lp = net.token_logprobs(x, y, mlp_mask=sinks.row_mask([int(r)]))
            scores.append(float(lp.detach().sum()) / len(a))
        right += max(range(len(scores)), key=scores.__getitem__) == q.answer
    assert nulls.mc_accuracy(net, tok, qs, route, sinks) == pytest.approx(right / len(qs))


def test_paper_preset_end_to_end_on_long_local_documents(tmp_path):
    """--preset=paper (documents as sources) at tiny sizes on a local jsonl whose documents are 4-6x block_size."""
    rng = random.Random(0)
    words = "the a cat dog river city old new red blue walked saw found lived near far".split()
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i in range(16):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(130, 190)))}) + "\n")
    out = tmp_path / "out"
    metrics, claims = nulls.main(["--preset=paper", f"--data={tmp_path / 'docs.jsonl'}", "--tokenizer=word",
                                  "--n_docs=12", "--n_forget=2", "--n_layer=2", "--n_head=2", "--n_kv_head=1",
                                  "--n_embd=32", "--n_gen=16", "--n_pool=64", "--n_source=8", "--block_size=32",
                                  "--epochs=1", "--batch_size=8", "--warmup_steps=1", "--unlearn_epochs=1",
                                  "--relearn_steps=2", "--eval_batch=4", "--device=cpu", "--log_every=0",
                                  "--workers=1", f"--out_dir={out}"])
    assert metrics["n_sources"] == 12 and len(metrics["forget"]) == 2
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["block_size"] == 32 and len(res["metrics"]["relearning"]["npo"]) == 3
    assert all(c["verdict"] == "not testable here" and "facts and questions" in c["precondition"]["what"]
               for c in claims if c["claim"][0] in "1235")                   # no facts in real documents
    assert {c["claim"][:1] for c in claims} == {"1", "2", "3", "4", "5"}
