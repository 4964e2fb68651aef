"""
Every metric the five papers report, as small functions on tensors plus thin wrappers on (model, items).

Conventions
- A QA item is a question and an answer, each a list of token ids (already tokenized, chat template and any
  EOS included by the caller: every answer token is scored). `qa_batch` right-pads them into (x, y) with
  y = -100 on the question and the padding, so y's kept entries are exactly the answer tokens.
- Mean log-probability over the answer tokens, ell(a|q) = (1/|a|) sum_t log p(a_t | q, a_<t), is the
  building block: p̄(a|q) = exp(ell) = P(a|q)^(1/|a|) is the length-normalized answer probability.
- Wrappers accept the model's forward kwargs (**fwd: mlp_mask=..., adapter_ctx=...) and pass them on, because
  NULLs and MemSinks evaluate one model under several masks. A per-row tensor (ndim >= 2 whose leading dim
  equals the number of items, e.g. an mlp_mask of shape (N, 1, d_ff)) is split with the items when the
  wrapper batches them, and repeated for every prefix of its item in the generating metrics; any other
  value (a (1, 1, d_ff) or (d_ff,) mask, a list of per-layer masks of those shapes, adapter_ctx objects) is
  passed unchanged and must broadcast over any batch. Per-token masks (B, T, d_ff) cannot be used here
  because the wrappers choose T. Generation accepts only mlp_mask and adapter_ctx.
- Scores that compare a model with the retrained one (forget quality, privleak, privacy score) take the
  retrained model's numbers as inputs; nothing reads logs from disk here.

Where the project differs on purpose from a reference implementation, the docstring says so (ES = 0 when
nothing matches; no 300-item cap in forget quality; EL generations never stop early; MA on unpadded rows).
"""
import copy
import json
import math
import os
import zlib
from contextlib import contextmanager

import numpy as np
import torch
from scipy import stats

from model import GPT, KVCache


# -------------------------------------------------------------------------------------------------
# Batching (eval.py must not import data.py: items arrive as token lists)
# -------------------------------------------------------------------------------------------------

def qa_batch(questions, answers, pad_id=0, device="cpu"):
    """Right-padded (x, y) for teacher forcing: x = (q + a)[:-1], y = (q + a)[1:] with -100 on question tokens."""
    _check_qa(questions, answers)
    T = max(len(q) + len(a) for q, a in zip(questions, answers)) - 1
    x = torch.full((len(questions), T), pad_id, dtype=torch.long)
    y = torch.full((len(questions), T), -100, dtype=torch.long)
    for i, (q, a) in enumerate(zip(questions, answers)):
        s = list(q) + list(a)
        x[i, :len(s) - 1] = torch.tensor(s[:-1])
        y[i, len(q) - 1:len(s) - 1] = torch.tensor(list(a))   # position t predicts s[t + 1]
    return x.to(device), y.to(device)


def _check_qa(questions, answers):
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    if not questions:
        raise ValueError("no QA items")
    if any(len(q) == 0 for q in questions) or any(len(a) == 0 for a in answers):
        raise ValueError("every question and every answer needs at least one token")


def lm_batch(seqs, pad_id=0, device="cpu"):
    """Right-padded (x, y) for whole sequences: every token after the first is a target."""
    if not seqs:
        raise ValueError("no sequences")
    if any(len(s) < 2 for s in seqs):
        raise ValueError("every sequence needs at least two tokens")
    return qa_batch([list(s[:1]) for s in seqs], [list(s[1:]) for s in seqs], pad_id, device)


def _device(model):
    return next(model.parameters()).device


@contextmanager
def evaluating(model):
    """Eval mode (no dropout) and no grad for the duration; the model's training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def take_rows(fwd, index, n):
    """fwd with every per-row tensor (ndim >= 2, leading dim n) indexed by `index`; other values unchanged."""
    def take(v):
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == n:
            return v.index_select(0, index.to(v.device))
        if isinstance(v, (list, tuple)):
            return type(v)(take(u) for u in v)
        return v
    return {k: take(v) for k, v in fwd.items()}


def _chunks(n, batch_size):
    step = batch_size or n
    for i in range(0, n, step):
        yield torch.arange(i, min(n, i + step))


def _generate_kwargs(fwd):
    bad = set(fwd) - {"mlp_mask", "adapter_ctx"}
    if bad:
        raise ValueError(f"generation accepts only mlp_mask and adapter_ctx, got {sorted(bad)}")
    return fwd


# -------------------------------------------------------------------------------------------------
# Answer probability and truth ratios (TOFU, NULLs)
# -------------------------------------------------------------------------------------------------

def mean_logprob(token_lp, y):
    """(B,) float64 mean log-prob over the kept targets of each row: ell(a|q) = log P(a|q) / |a|."""
    keep = y != -100
    n = keep.sum(1)
    if bool((n == 0).any()):
        raise ValueError("a row has no target tokens")
    return (token_lp.double() * keep).sum(1) / n


def _answer_logits(model, x, y, **fwd):
    """(M, V) logits at the M scored positions (y != -100) of a teacher-forced batch, and that (B, T) mask.
    Nothing reads the question's positions, and on a real vocabulary (SmolLM2: 49k) the softmax there costs as much
    as the answer's, so only the scored rows go on; log_softmax works row by row, so the values are the same."""
    logits, _ = model(x, **fwd)
    keep = y != -100
    rows = keep.flatten().nonzero().squeeze(1)       # index_select: a boolean index of (B, T, V) is far slower
    return _upcast(logits.flatten(0, 1).index_select(0, rows)), keep


def _upcast(logits):
    """bf16 / fp16 logits (autocast) as float32 for the softmax; float32 and float64 as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _at(values, keep):
    """(M,) values of the kept positions back in (B, T) (0 elsewhere): the shape the per-row metrics take."""
    out = values.new_zeros(keep.shape)
    out[keep] = values
    return out


def _target_logprobs(logp, y, keep):
    """(B, T) log p of each kept target from the kept positions' log-probs (M, V); 0 elsewhere (as token_logprobs)."""
    return _at(logp.gather(-1, y[keep][:, None]).squeeze(-1), keep)


SCORES = ("ell", "es", "em", "loss", "min_k", "min_k_pp")


def _scores(names, k):
    """The metrics of answer_scores: {name: (B,)} for the requested names of SCORES from the scored positions'
    logits. Each costs a pass over the (M, V) logits or more (Min-K%++: the softmax moments, several), so only
    what a caller asks for is computed."""
    bad = set(names) - set(SCORES)
    if bad or not names:
        raise ValueError(f"unknown scores {sorted(bad)}; valid: {', '.join(SCORES)}" if bad else "no scores asked for")

    def metrics(logits, keep, y):
        logp = torch.log_softmax(logits, -1)
        lp = _target_logprobs(logp, y, keep)
        out = {"ell": mean_logprob(lp, y)}
        out["loss"] = -out["ell"]
        if "es" in names or "em" in names:
            preds = _at(logits.argmax(-1), keep)
            out.update(es=extraction_strength_from_preds(preds, y), em=argmax_accuracy(preds, y))
        if "min_k" in names:
            out["min_k"] = min_k_score(lp, y, k)
        if "min_k_pp" in names:
            out["min_k_pp"] = min_k_score(_at(_min_k_pp_z(logp, y[keep]), keep), y, k)
        return {n: out[n] for n in names}
    return metrics


def _qa_rows(model, questions, answers, metrics, batch_size, pad_id, fwd):
    """{name: (N,)} from one teacher-forced forward per batch of question + answer: metrics(logits (M, V), keep,
    y) -> {name: (B,)} sees the logits of the answer positions only (_answer_logits)."""
    dev, N, parts = _device(model), len(questions), []
    with evaluating(model):
        for idx in _chunks(N, batch_size):
            x, y = qa_batch([questions[i] for i in idx], [answers[i] for i in idx], pad_id, dev)
            logits, keep = _answer_logits(model, x, y, **take_rows(fwd, idx, N))
            parts.append({k: v.cpu() for k, v in metrics(logits, keep, y).items()})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def answer_logprob(model, questions, answers, *, batch_size=None, pad_id=0, **fwd):
    """(N,) float64 ell(a|q), the mean log-prob of each answer given its question."""
    return _qa_rows(model, questions, answers, _scores(("ell",), None), batch_size, pad_id, fwd)["ell"]


def answer_scores(model, questions, answers, *, k=0.4, scores=SCORES, batch_size=None, pad_id=0, **fwd):
    """Per-item numbers of one teacher-forced forward of question + answer, as {name: (N,) float64} for the names
    in `scores`: ell (answer_logprob; exp(ell) is answer_prob), es (extraction_strength), em (exact_memorization),
    and the attack scores of mia_scores: loss (= -ell), min_k, min_k_pp (Min-K% / Min-K%++ at k). One forward
    instead of one per metric: TOFU scores Prob, ES and the MIA on the same forget items. With other answers to
    score on the same questions (a paraphrase, perturbed answers), candidate_scores computes each question once."""
    return _qa_rows(model, questions, answers, _scores(scores, k), batch_size, pad_id, fwd)


def answer_prob(model, questions, answers, **kw):
    """(N,) length-normalized answer probability p̄(a|q) = P(a|q)^(1/|a|) (TOFU "Prob")."""
    return answer_logprob(model, questions, answers, **kw).exp()


def mc_prob(lp_true, lp_options):
    """p̄(a) / (p̄(a) + sum_j p̄(o_j)) per item, from mean log-probs lp_true (N,) and lp_options (N, K).

    TOFU's normalized probability for real-author / world-fact questions. A softmax over the log-probs is the
    same ratio without underflow; OU's +1e-10 in the denominator is left out (it only guards that underflow).
    """
    lp = torch.cat([lp_true.double()[:, None], lp_options.double()], 1)   # (N, 1 + K)
    return torch.softmax(lp, 1)[:, 0]


def _check_options(questions, options):
    """K, the number of alternative answers every item has (the same non-zero number for all)."""
    K = {len(o) for o in options}
    if len(options) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(options)} lists of alternative answers")
    if len(K) != 1 or 0 in K:
        raise ValueError(f"every item needs the same, non-zero number of alternative answers, got {sorted(K)}")
    return K.pop()


def candidate_logprobs(model, questions, candidates, *, batch_size=None, pad_id=0, **fwd):
    """(N, K) float64 ell(c_j|q) of K candidate answers per question (the true or paraphrased answer and the
    perturbed ones, multiple-choice options), each question computed once for all of its candidates
    (_prefix_rows) where that path can take the call (_prefix_ok); otherwise one full-sequence forward per
    candidate index, whose rows are the items. Both compute the same numbers (tests/test_eval_prefix.py)."""
    return _candidates(model, questions, candidates, _scores(("ell",), None), batch_size, pad_id, fwd)["ell"]


def candidate_scores(model, questions, candidates, *, k=0.4, scores=SCORES, batch_size=None, pad_id=0, **fwd):
    """answer_scores of K candidate answers per question as {name: (N, K) float64}, each question computed once
    for all of them (as candidate_logprobs): a TOFU suite scores Prob, ES and the MIA of the answer and the truth
    ratio of the paraphrase and the perturbed answers, all on the same question, from one prefix."""
    return _candidates(model, questions, candidates, _scores(scores, k), batch_size, pad_id, fwd)


def _candidates(model, questions, candidates, metrics, batch_size, pad_id, fwd):
    K = _check_options(questions, candidates)
    for j in range(K):
        _check_qa(questions, [c[j] for c in candidates])
    if _prefix_ok(model, questions, candidates, fwd):
        return _prefix_rows(model, questions, candidates, metrics, batch_size, pad_id, fwd)
    cols = [_qa_rows(model, questions, [c[j] for c in candidates], metrics, batch_size, pad_id, fwd)
            for j in range(K)]
    return {name: torch.stack([c[name] for c in cols], 1) for name in cols[0]}


def _prefix_ok(model, questions, candidates, fwd):
    """Whether the prefix-shared path computes exactly what the full sequences do. It needs a model.GPT (a wrapper
    such as compare.Routed picks its masks from the whole row) and no forward keyword but an mlp_mask of tensors
    that are the same at every position ((d_ff,), (1 or N, 1, d_ff), per-layer lists of those): adapter_ctx,
    mask objects and per-token masks take the full-sequence path, as does a batch whose longest question plus
    longest candidate would pass the model's block (a padded candidate row would; its own sequence need not)."""
    if not isinstance(model, GPT) or set(fwd) - {"mlp_mask"}:
        return False
    m = fwd.get("mlp_mask")
    if not all(v is None or (isinstance(v, torch.Tensor) and (v.dim() == 1 or v.shape[-2] == 1))
               for v in (m if isinstance(m, (list, tuple)) else [m])):
        return False
    longest = max(len(q) for q in questions) + max(len(c) for cs in candidates for c in cs) - 1
    return longest <= model.cfg.block_size


def _prefill(model, prefixes, pad_id, dev, fwd):
    """A KVCache of the prefixes, left-padded (document -1: invisible to the tokens after it, as in generation),
    with each row's next position = its prefix's length, the position the next token has in the full sequence."""
    cache, L = KVCache(model.cfg.n_layer), max(len(p) for p in prefixes)
    if L:    # all prefixes empty (one-token questions): the candidates start at position 0 on an empty cache
        ids = torch.tensor([[pad_id] * (L - len(p)) + list(p) for p in prefixes], device=dev)
        doc = torch.tensor([[-1] * (L - len(p)) + [0] * len(p) for p in prefixes], device=dev)
        model(ids, doc_ids=doc, cache=cache, **fwd)
    cache.next_pos = torch.tensor([len(p) for p in prefixes], device=dev)
    return cache


def _prefix_rows(model, questions, candidates, metrics, batch_size, pad_id, fwd):
    """{name: (N, K)} metrics of every candidate with each question run once. The question but its last token goes
    into a KV cache (_prefill); each candidate c is then a row [q_last] + c[:-1] with targets c on a copy of its
    question's cache rows: the tokens, positions and attention of q + c as one sequence, and logits only where c
    is scored. Up to batch_size questions share a prefill, in order of length (little left padding); their
    candidates go in batches of batch_size rows in order of length (little right padding)."""
    dev, N, K = _device(model), len(questions), len(candidates[0])
    order = torch.tensor(sorted(range(N), key=lambda i: len(questions[i])))
    out = {}
    with evaluating(model):
        for qs in order.split(batch_size or N):
            cache = _prefill(model, [questions[i][:-1] for i in qs.tolist()], pad_id, dev, take_rows(fwd, qs, N))
            lens = [len(candidates[i][j]) for i in qs.tolist() for j in range(K)]
            rows = sorted(range(len(lens)), key=lens.__getitem__)
            for r in torch.tensor(rows).split(batch_size or len(rows)):   # question r // K here, candidate r % K
                items, j = qs[r // K], r % K
                x, y = qa_batch([questions[i][-1:] for i in items.tolist()],
                                [candidates[i][c] for i, c in zip(items.tolist(), j.tolist())], pad_id, dev)
                logits, keep = _answer_logits(model, x, y, cache=cache.select((r // K).to(dev)),
                                              **take_rows(fwd, items, N))
                for name, v in metrics(logits, keep, y).items():
                    out.setdefault(name, torch.empty(N, K, dtype=torch.float64))[items, j] = v.cpu().double()
    return out


def mc_answer_prob(model, questions, answers, options, **kw):
    """(N,) normalized multiple-choice probability of the answer among itself and its wrong options."""
    _check_options(questions, options)
    _check_qa(questions, answers)
    lp = candidate_logprobs(model, questions, [[a] + list(o) for a, o in zip(answers, options)], **kw)
    return mc_prob(lp[:, 0], lp[:, 1:])


def truth_ratio_tofu(lp_true, lp_pert):
    """TOFU's per-item R = (geometric mean of the perturbed answers' p̄) / p̄(true answer).

    lp_true (N,), lp_pert (N, K) are mean log-probs; the geometric mean of the p̄'s is exp(mean_j ell_j).
    R < 1 means the model prefers the true answer. The true answer is the paraphrase for forget/retain and the
    answer itself for real authors / world facts (no paraphrase there). OU's +1e-10 is unnecessary in log space.
    """
    return (lp_pert.double().mean(1) - lp_true.double()).exp()


def truth_ratio_forget(R):
    """Forget-set aggregate ("closer to 1 is better"): mean_i min(R_i, 1/R_i), in (0, 1]."""
    R = torch.as_tensor(R, dtype=torch.float64)
    return float(torch.minimum(R, 1 / R).mean())


def truth_ratio_utility(R):
    """Utility aggregate ("true better"): mean_i max(0, 1 - R_i), in [0, 1]."""
    R = torch.as_tensor(R, dtype=torch.float64)
    return float((1 - R).clamp(min=0).mean())


def truth_ratio_prob_mean(lp_true, lp_pert):
    """OU's "prob_mean" truth ratio TR' = p_true / (p_true + p_false), p_false = geometric mean (used in Mem.)."""
    lp_false = lp_pert.double().mean(1)
    return torch.sigmoid(lp_true.double() - lp_false)   # p/(p+q) = sigmoid(log p - log q)


def truth_ratio_nulls(lp_true, lp_pert):
    """NULLs' TR = p̄(true) / ((1/|A|) sum_j p̄(perturbed_j)): an arithmetic mean below. TR > 1 = fact recalled."""
    lp_pert = lp_pert.double()
    log_am = torch.logsumexp(lp_pert, 1) - math.log(lp_pert.shape[1])
    return (lp_true.double() - log_am).exp()


TRUTH_RATIOS = {"tofu": truth_ratio_tofu, "nulls": truth_ratio_nulls, "prob_mean": truth_ratio_prob_mean}


def truth_ratio(model, questions, true_answers, perturbed_answers, form="tofu", **kw):
    """(N,) per-item truth ratios in one of the forms of TRUTH_RATIOS ("tofu": R, "nulls": TR, "prob_mean": TR')."""
    if form not in TRUTH_RATIOS:
        raise ValueError(f"unknown truth-ratio form {form!r}; valid: {', '.join(TRUTH_RATIOS)}")
    _check_options(questions, perturbed_answers)
    _check_qa(questions, true_answers)
    lp = candidate_logprobs(model, questions, [[a] + list(p) for a, p in zip(true_answers, perturbed_answers)], **kw)
    return TRUTH_RATIOS[form](lp[:, 0], lp[:, 1:])


# -------------------------------------------------------------------------------------------------
# ROUGE-L recall of greedy generations (TOFU)
# -------------------------------------------------------------------------------------------------

_SCORER = None


def rouge_l_recall(predictions, references):
    """ROUGE-L recall (LCS / reference tokens) per pair, by Google's rouge_score with the Porter stemmer.

    Its tokenizer is TOFU's: lowercase, every char outside [a-z0-9] becomes a space (accented letters vanish),
    tokens longer than 3 chars are stemmed.
    """
    global _SCORER
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if _SCORER is None:
        from rouge_score import rouge_scorer
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [_SCORER.score(target=r, prediction=p)["rougeL"].recall for p, r in zip(predictions, references)]


def _cut_at(tokens, eos_id):
    return tokens[:tokens.index(eos_id)] if eos_id is not None and eos_id in tokens else tokens


def rouge_recall(model, questions, answers, tokenizer, *, max_new_tokens=200, eos_id=None, batch_size=None,
                 pad_id=0, **fwd):
    """Greedy generation from each question, scored by ROUGE-L recall against the answer.

    tokenizer: anything with decode(list[int]) -> str. Generations are cut at the first eos_id (as OU does), and
    so is the reference answer. max_new_tokens (OU: 200) is capped by the room left in the model's block.
    Returns (recalls: list[float], generations: list[str]).
    """
    room = model.cfg.block_size - max(len(q) for q in questions)
    if room < 1:
        raise ValueError("a question fills the whole block; nothing can be generated")
    new, N, gens = min(max_new_tokens, room), len(questions), []
    with evaluating(model):
        for idx in _chunks(N, batch_size):
            out = model.generate([list(questions[i]) for i in idx], new, eos_id=eos_id, pad_id=pad_id,
                                 **_generate_kwargs(take_rows(fwd, idx, N)))
            gens += [tokenizer.decode(_cut_at(row, eos_id)) for row in out.tolist()]
    refs = [tokenizer.decode(_cut_at(list(a), eos_id)) for a in answers]
    return rouge_l_recall(gens, refs), gens


# -------------------------------------------------------------------------------------------------
# Forget quality and model utility (TOFU)
# -------------------------------------------------------------------------------------------------

def forget_quality(tr_model, tr_retrained):
    """Two-sided two-sample KS test p-value between forget-set truth ratios of a model and of the retrained one.

    Exact for the sizes TOFU uses (scipy's exact method up to 10000 items per side). KS depends only on ranks,
    so R and 1/R give the same value. Every item is used (legacy TOFU evaluated only the first 300).
    """
    a, b = np.asarray(tr_model, dtype=np.float64), np.asarray(tr_retrained, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("forget quality needs truth ratios on both sides")
    method = "exact" if max(a.size, b.size) <= 10000 else "asymp"
    return float(stats.ks_2samp(a, b, alternative="two-sided", method=method).pvalue)


def harmonic_mean(values):
    """n / sum(1/x); any zero gives 0 (as scipy.stats.hmean). Negative values are an error."""
    v = np.asarray(list(values.values()) if isinstance(values, dict) else values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("harmonic mean of nothing")
    if (v < 0).any() or np.isnan(v).any():
        raise ValueError(f"harmonic mean needs non-negative numbers, got {v.tolist()}")
    return 0.0 if (v == 0).any() else float(v.size / np.sum(1 / v))


def model_utility(values):
    """TOFU model utility: harmonic mean of {Prob, ROUGE-L recall, truth ratio (true better)} x {retain, real
    authors, world facts} = 9 numbers (a dict or a sequence; fewer when a data set lacks a split)."""
    return harmonic_mean(values)


# -------------------------------------------------------------------------------------------------
# Extraction strength, exact memorization (OU / Carlini et al.), MA and EL_n (Jang et al.)
# -------------------------------------------------------------------------------------------------

def extraction_strength_from_preds(preds, y):
    """(B,) ES = 1 - k*/N from teacher-forced argmax predictions preds (B, T) and targets y (B, T).

    k* = min{k : greedy decoding from (q, a_<k) reproduces a_>=k}. Greedy decoding reproduces the suffix
    exactly when every teacher-forced argmax from position k on is right (each correct step feeds back the
    very token teacher forcing uses), so N - k* is the length of the trailing run of correct predictions.
    When nothing matches k* = N and ES = 0; OU's loop stops at k = N - 1 and returns 1/N there (a bug).
    """
    keep = y != -100
    N = keep.sum(1)
    if bool((N == 0).any()):
        raise ValueError("a row has no answer tokens")
    t = torch.arange(y.shape[1], device=y.device).expand_as(y)
    wrong = keep & (preds != y)
    last_wrong = torch.where(wrong, t, torch.full_like(t, -1)).max(1).values   # (B,) -1 when all right
    run = (keep & (t > last_wrong[:, None])).sum(1)                               # correct answer tokens after it
    return run.double() / N


def argmax_accuracy(preds, y):
    """(B,) fraction of kept targets whose teacher-forced argmax is right (EM on answers, MA on sequences)."""
    keep = y != -100
    n = keep.sum(1)
    if bool((n == 0).any()):
        raise ValueError("a row has no target tokens")
    return ((preds == y) & keep).sum(1).double() / n


def _argmax_rows(model, x_y_fn, N, batch_size, fwd, metric):
    dev, out = _device(model), []
    with evaluating(model):
        for idx in _chunks(N, batch_size):
            x, y = x_y_fn(idx, dev)
            logits, _ = model(x, **take_rows(fwd, idx, N))
            out.append(metric(logits.argmax(-1), y).cpu())
    return torch.cat(out)


def extraction_strength(model, questions, answers, *, batch_size=None, pad_id=0, **fwd):
    """(N,) ES per item in one teacher-forced forward pass (see extraction_strength_from_preds).

    Every answer token counts; OU drops the final EOS label, so pass answers without EOS to match it.
    """
    xy = lambda idx, dev: qa_batch([questions[i] for i in idx], [answers[i] for i in idx], pad_id, dev)
    return _argmax_rows(model, xy, len(questions), batch_size, fwd, extraction_strength_from_preds)


def extraction_strength_generate(model, questions, answers, **fwd):
    """Slow reference for ES: greedy-generate from (q, a_<k) for k = 0, 1, ... and stop at the first k whose
    generation equals a_>=k. Tests and bench.py check the one-pass extraction_strength against it."""
    N, dev, out = len(questions), _device(model), []
    with evaluating(model):
        for i, (q, a) in enumerate(zip(questions, answers)):
            kw = _generate_kwargs(take_rows(fwd, torch.tensor([i]), N))
            k = 0
            while k < len(a):
                prompt = torch.tensor([list(q) + list(a[:k])], device=dev)
                if model.generate(prompt, len(a) - k, **kw)[0].tolist() == list(a[k:]):
                    break
                k += 1
            out.append(1 - k / len(a))
    return torch.tensor(out, dtype=torch.float64)


def exact_memorization(model, questions, answers, *, batch_size=None, pad_id=0, **fwd):
    """(N,) EM: fraction of answer tokens whose teacher-forced argmax is right (OU drops the EOS label)."""
    xy = lambda idx, dev: qa_batch([questions[i] for i in idx], [answers[i] for i in idx], pad_id, dev)
    return _argmax_rows(model, xy, len(questions), batch_size, fwd, argmax_accuracy)


def memorization_accuracy(model, seqs, *, batch_size=None, pad_id=0, **fwd):
    """(N,) MA (Jang et al. Eq. / NeuMuter Eq. 15) = (1/(T-1)) sum_{t=1}^{T-1} 1[argmax p(.|x_<t) = x_t].

    Greedy one-token generation from x_<t is the teacher-forced argmax, so one forward pass suffices. Rows are
    unpadded sequences of any length; Jang's code scores its pad tokens too when a sequence is shorter than 200.
    """
    xy = lambda idx, dev: lm_batch([seqs[i] for i in idx], pad_id, dev)
    return _argmax_rows(model, xy, len(seqs), batch_size, fwd, argmax_accuracy)


def ngram_overlap(pred, ref, n):
    """OVERLAP_n(pred, ref): the share of pred's n-grams (counted with multiplicity) found among ref's n-grams."""
    grams = [tuple(pred[i:i + n]) for i in range(len(pred) - n + 1)]
    if not grams:
        raise ValueError(f"no {n}-grams in a prediction of {len(pred)} tokens")
    ref_set = {tuple(ref[i:i + n]) for i in range(len(ref) - n + 1)}
    return sum(g in ref_set for g in grams) / len(grams)


def extraction_likelihood(model, seqs, n=10, *, batch_size=64, pad_id=0, **fwd):
    """(N,) EL_n(x) = sum_{t=1}^{T-n} OVERLAP_n(f(x_<t), x_>=t) / (T - n), f = greedy continuation to length T.

    Jang et al.'s definition; generation cannot be replaced by teacher forcing here (the continuation feeds on
    its own tokens). Generations never stop at EOS, so |pred| = |ref| and the paper's denominator (pred's
    n-grams) equals the code's (ref's n-grams). Shortcut, exact up to argmax ties: where the greedy token after
    x_<t is x_t itself (one teacher-forced pass tells), f(x_<t) = [x_t] + f(x_<t+1), so only the other
    prefixes (and the last) are generated, in batches of batch_size grouped by length. A memorized sequence
    needs almost no generation. extraction_likelihood_reference generates every prefix (tests compare them).
    """
    _check_el(seqs, n)
    _generate_kwargs(fwd)
    N = len(seqs)
    hits = _greedy_hits(model, seqs, batch_size, pad_id, fwd)
    anchors = [(i, t) for i, s in enumerate(seqs) for t in range(1, len(s) - n + 1)
               if t == len(s) - n or not hits[i][t - 1]]
    gen = _generate_prefixes(model, seqs, anchors, batch_size, pad_id, fwd)
    total = torch.zeros(N, dtype=torch.float64)
    for i, s in enumerate(seqs):
        cont = None
        for t in range(len(s) - n, 0, -1):     # f(x_<t) from f(x_<t+1), right to left
            cont = gen[(i, t)] if (i, t) in gen else [s[t]] + cont
            total[i] += ngram_overlap(cont, list(s[t:]), n)
    return total / torch.tensor([len(s) - n for s in seqs], dtype=torch.float64)


def _greedy_hits(model, seqs, batch_size, pad_id, fwd):
    """hits[i][t-1]: the greedy token after seqs[i][:t] is seqs[i][t], t = 1..T-1 (one teacher-forced pass)."""
    N, dev, hits = len(seqs), _device(model), []
    with evaluating(model):
        for idx in _chunks(N, batch_size):
            x, y = lm_batch([seqs[i] for i in idx.tolist()], pad_id, dev)
            logits, _ = model(x, **take_rows(fwd, idx, N))
            ok = (logits.argmax(-1) == y).cpu()
            hits += [ok[j, :len(seqs[i]) - 1].tolist() for j, i in enumerate(idx.tolist())]
    return hits


def extraction_likelihood_lower_bound(model, seqs, n=10, *, batch_size=64, pad_id=0, **fwd):
    """(N,) a lower bound on EL_n from one teacher-forced pass, no generation. If the greedy token is the text's
    for k positions in a row from x_t on, f(x_<t) starts with x_t..x_t+k-1, so at least k-n+1 of its
    T-t-n+1 n-grams are the text's: OVERLAP_n >= max(0, k-n+1) / (T-t-n+1). A bound above a threshold settles
    "not forgotten" without generating (exact up to argmax ties, as extraction_likelihood's shortcut)."""
    _check_el(seqs, n)
    _generate_kwargs(fwd)
    hits = _greedy_hits(model, seqs, batch_size, pad_id, fwd)
    out = torch.zeros(len(seqs), dtype=torch.float64)
    for i, s in enumerate(seqs):
        T, run = len(s), 0
        for t in range(T - 1, 0, -1):          # run: greedy hits in a row from hits[t-1] on
            run = run + 1 if hits[i][t - 1] else 0
            if t <= T - n:
                out[i] += max(0, min(run, T - t) - n + 1) / (T - t - n + 1)
        out[i] /= T - n
    return out


def extraction_likelihood_reference(model, seqs, n=10, *, batch_size=64, pad_id=0, **fwd):
    """EL_n with every prefix generated (the slow reference of extraction_likelihood)."""
    _check_el(seqs, n)
    jobs = [(i, t) for i, s in enumerate(seqs) for t in range(1, len(s) - n + 1)]
    gen = _generate_prefixes(model, seqs, jobs, batch_size, pad_id, fwd)
    total = torch.zeros(len(seqs), dtype=torch.float64)
    for (i, t), g in gen.items():
        total[i] += ngram_overlap(g, list(seqs[i][t:]), n)
    return total / torch.tensor([len(s) - n for s in seqs], dtype=torch.float64)


def _check_el(seqs, n):
    if n < 1:
        raise ValueError("n must be >= 1")
    if len(seqs) == 0:
        raise ValueError("no sequences")
    if any(len(s) <= n for s in seqs):
        raise ValueError(f"EL_{n} needs sequences longer than {n} tokens")


def _generate_prefixes(model, seqs, jobs, batch_size, pad_id, fwd):
    """{(i, t): greedy continuation of seqs[i][:t] to the length of seqs[i]}. Longest continuations first so a
    batch needs similar lengths; a batch generates its longest continuation for every row, so a row joins only
    if its prefix plus that length stays within the model's positions."""
    jobs = sorted(jobs, key=lambda j: len(seqs[j[0]]) - j[1], reverse=True)
    limit = getattr(getattr(model, "cfg", None), "block_size", None) or float("inf")
    N, out = len(seqs), {}
    with evaluating(model):
        while jobs:
            new = len(seqs[jobs[0][0]]) - jobs[0][1]
            chunk, rest = [], []
            for j in jobs:
                (chunk if len(chunk) < batch_size and j[1] + new - 1 <= limit else rest).append(j)
            if not chunk:
                raise ValueError(f"a sequence of {len(seqs[jobs[0][0]])} tokens needs more than the model's "
                                 f"{limit} positions")
            jobs = rest
            rows = torch.tensor([i for i, _ in chunk])
            gen = model.generate([list(seqs[i][:t]) for i, t in chunk], new, pad_id=pad_id,
                                 **_generate_kwargs(take_rows(fwd, rows, N))).tolist()
            for (i, t), g in zip(chunk, gen):
                out[(i, t)] = g[:len(seqs[i]) - t]
    return out


def forgetting_thresholds(model, unseen_seqs, n=10, **kw):
    """Jang et al.'s forgetting thresholds: mean MA and mean EL_n on data the model never saw (NeuMuter Eq. 17)."""
    return dict(ma=float(memorization_accuracy(model, unseen_seqs, **kw).mean()),
                el=float(extraction_likelihood(model, unseen_seqs, n, **kw).mean()))


def is_forgotten(ma, el, thresholds):
    """(N,) bool: MA(x) <= threshold MA and EL_n(x) <= threshold EL (NeuMuter Eq. 17)."""
    return (torch.as_tensor(ma) <= thresholds["ma"]) & (torch.as_tensor(el) <= thresholds["el"])


# -------------------------------------------------------------------------------------------------
# Membership inference: LOSS, zlib, Min-K%, Min-K%++, AUC, privleak; NeuMuter's loss distance
# -------------------------------------------------------------------------------------------------
# Every score is oriented like a loss: higher = less likely a member.

def min_k_score(token_lp, y, k=0.4):
    """(B,) Min-K%: -mean of the lowest floor(k * n) (at least 1) target log-probs of each row."""
    if not 0 < k <= 1:
        raise ValueError("k must be in (0, 1]")
    keep = y != -100
    n = keep.sum(1)
    if bool((n == 0).any()):
        raise ValueError("a row has no target tokens")
    m = (k * n).floor().clamp(min=1)                                               # (B,)
    lp = torch.where(keep, token_lp.double(), torch.full_like(token_lp, float("inf"), dtype=torch.float64))
    low = lp.sort(1).values                                                        # ignored positions sort last
    take = torch.arange(lp.shape[1], device=lp.device)[None, :] < m[:, None]
    return -(torch.where(take, low, 0.0)).sum(1) / m


def min_k_plus_plus_score(logits, y, k=0.4):
    """(B,) Min-K%++: -mean of the lowest k fraction of z_t = (log p(x_t) - mu_t) / sigma_t, where mu_t and
    sigma_t^2 are the mean and variance of log p(v) under p(.|x_<t); sigma^2 is clamped at 1e-6 (as OU does)."""
    keep = y != -100
    rows = keep.flatten().nonzero().squeeze(1)
    logp = torch.log_softmax(_upcast(logits.flatten(0, 1).index_select(0, rows)), -1)
    return min_k_score(_at(_min_k_pp_z(logp, y[keep]), keep), y, k)


def _min_k_pp_z(logp, targets):
    """(M,) Min-K%++'s z of each target from the log-probs (M, V) of its position."""
    p = logp.exp()
    mu = (p * logp).sum(-1)                                                        # (M,)
    var = (p * logp.square()).sum(-1) - mu.square()
    tok = logp.gather(-1, targets[:, None]).squeeze(-1)
    return (tok - mu) / var.clamp(min=1e-6).sqrt()


def zlib_score(loss, texts):
    """(N,) zlib attack: mean NLL / length of the zlib-compressed UTF-8 text."""
    if len(texts) != len(loss):
        raise ValueError(f"{len(loss)} losses but {len(texts)} texts")
    sizes = torch.tensor([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=torch.float64)
    return torch.as_tensor(loss, dtype=torch.float64) / sizes


def mia_scores(model, questions, answers, *, texts=None, k=0.4, batch_size=None, pad_id=0, **fwd):
    """Per-item attack scores on the answer tokens: dict(loss, min_k, min_k_pp[, zlib when texts are given]).

    k = 0.4 is TOFU's Min-K setting. Every answer token counts (OU drops EOS for Min-K and Min-K++ only).
    answer_scores gives these with Prob, ES and EM from the same forward.
    """
    out = answer_scores(model, questions, answers, k=k, scores=("loss", "min_k", "min_k_pp"), batch_size=batch_size,
                        pad_id=pad_id, **fwd)
    if texts is not None:
        out["zlib"] = zlib_score(out["loss"], texts)
    return out


def _midranks(v):
    """1-based ranks with ties given the mean of the ranks they span."""
    order = np.argsort(v, kind="stable")
    s = v[order]
    ranks = np.empty(len(v))
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def mia_auc(forget_scores, holdout_scores):
    """ROC AUC of loss-like scores with forget = 0, holdout = 1 (OU's labels):
    P(holdout score > forget score) + P(tie) / 2, via the Mann-Whitney U with midranks.
    ~1: forget items look like members (memorized); 0.5: indistinguishable; < 0.5: over-unlearned."""
    f, h = np.asarray(forget_scores, np.float64), np.asarray(holdout_scores, np.float64)
    if f.size == 0 or h.size == 0:
        raise ValueError("AUC needs scores on both sides")
    r = _midranks(np.concatenate([f, h]))
    u = r[f.size:].sum() - h.size * (h.size + 1) / 2
    return float(u / (f.size * h.size))


def privleak(auc, auc_retrained):
    """MUSE-style privleak relative to the retrained model: ((1-AUC) - (1-AUC_ret)) / (1-AUC_ret) x 100.
    0 = as the retrained model, towards -100 = under-unlearned, large positive = over-unlearned."""
    if auc_retrained >= 1:
        raise ValueError("privleak is undefined when the retrained model's AUC is 1")
    return ((1 - auc) - (1 - auc_retrained)) / (1 - auc_retrained) * 100


def sequence_loss(model, seqs, *, batch_size=None, pad_id=0, **fwd):
    """(N,) mean next-token NLL of each whole sequence."""
    dev, N, out = _device(model), len(seqs), []
    with evaluating(model):
        for idx in _chunks(N, batch_size):
            x, y = lm_batch([seqs[i] for i in idx], pad_id, dev)
            out.append(-mean_logprob(model.token_logprobs(x, y, **take_rows(fwd, idx, N)), y).cpu())
    return torch.cat(out)


def loss_distance(losses, val_losses):
    """NeuMuter's loss-based MIA (after Barbulescu & Triantafillou): |loss(x) - mean validation loss| per
    forgotten sample; small = the sample looks unseen. The paper says "distance", we take the absolute value
    (over-unlearned samples, with losses far above validation, count as far too)."""
    v = torch.as_tensor(val_losses, dtype=torch.float64)
    if v.numel() == 0:
        raise ValueError("no validation losses")
    return (torch.as_tensor(losses, dtype=torch.float64) - v.mean()).abs()


def perplexity(model, tokens, *, block_size=None, batch_size=16, **fwd):
    """exp(mean NLL) of every token after the first of a 1-D token stream.

    The stream is cut into windows of block_size inputs that overlap by one token, so each token is predicted
    exactly once, from the tokens of its own window. fwd must broadcast over windows.
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    L = block_size or model.cfg.block_size
    if tokens.numel() < 2:
        raise ValueError("perplexity needs at least two tokens")
    starts = list(range(0, tokens.numel() - 1, L))
    dev, nll, count = _device(model), 0.0, 0
    with evaluating(model):
        for b in range(0, len(starts), batch_size):
            x = torch.zeros(len(starts[b:b + batch_size]), L, dtype=torch.long)
            y = torch.full_like(x, -100)
            for r, s in enumerate(starts[b:b + batch_size]):
                w = tokens[s:s + L + 1]
                x[r, :len(w) - 1], y[r, :len(w) - 1] = w[:-1], w[1:]
            lp = model.token_logprobs(x.to(dev), y.to(dev), **fwd)
            nll -= float(lp.double().sum())
            count += int((y != -100).sum())
    return math.exp(nll / count)


# -------------------------------------------------------------------------------------------------
# Memory Adapters' Table 1 aggregates (retain / general utility, Mem., Priv., Agg.)
# -------------------------------------------------------------------------------------------------

def retain_utility(numbers, finetuned_numbers):
    """Util_R: harmonic mean of the retain-set numbers (Prob, ROUGE-L, truth ratio) divided by the same for the
    fully finetuned model ("we normalize the former by the finetuned model's score")."""
    return harmonic_mean(numbers) / harmonic_mean(finetuned_numbers)


def general_utility(numbers, base_numbers):
    """Util_G: harmonic mean of the real-author / world-fact numbers divided by the same for the base model."""
    return harmonic_mean(numbers) / harmonic_mean(base_numbers)


def memorization_score(es, em, para_prob, tr_prob_mean):
    """Mem. (Dorna et al., as re-implemented in public): HM(1 - ES, 1 - EM, 1 - ParaProb, 1 - TR'), all on the
    forget set, with TR' the "prob_mean" truth ratio. Higher = more forgotten."""
    return harmonic_mean([1 - es, 1 - em, 1 - para_prob, 1 - tr_prob_mean])


def mia_closeness(auc, auc_retrained):
    """s = 1 - |AUC - AUC_ret| / max(AUC_ret, 1 - AUC_ret), in [0, 1].

    The paper does not give this transform (nor does OU; see notes). Our choice: the distance to the retrained
    model's AUC divided by the largest distance possible on [0, 1], so s = 1 exactly at the retrained AUC and
    s = 0 only at the worst AUC reachable. It is unchanged when both AUCs flip (AUC -> 1 - AUC), so it does not
    depend on which side is labelled positive.
    """
    for a in (auc, auc_retrained):
        if not 0 <= a <= 1:
            raise ValueError(f"AUC must be in [0, 1], got {a}")
    return 1 - abs(auc - auc_retrained) / max(auc_retrained, 1 - auc_retrained)


def privacy_score(aucs, retrained_aucs):
    """Priv.: harmonic mean of mia_closeness over the attacks (dicts keyed by attack: loss, zlib, min_k, min_k_pp)."""
    if set(aucs) != set(retrained_aucs):
        raise ValueError(f"attacks differ: {sorted(aucs)} vs retrained {sorted(retrained_aucs)}")
    return harmonic_mean([mia_closeness(aucs[a], retrained_aucs[a]) for a in sorted(aucs)])


def aggregate_score(util_r, util_g, mem, priv):
    """Agg.: harmonic mean of the four Table 1 scores."""
    return harmonic_mean([util_r, util_g, mem, priv])


# -------------------------------------------------------------------------------------------------
# Model mixing, AUES, MU95 and their significance tests (localization paper, App. B and D)
# -------------------------------------------------------------------------------------------------

def mix_state_dicts(sd_original, sd_unlearned, alpha):
    """(1 - alpha) * theta_o + alpha * theta (App. B); non-float entries are taken from theta_o."""
    if sd_original.keys() != sd_unlearned.keys():
        raise ValueError("the two models have different parameters")
    out = {}
    for k, a in sd_original.items():
        b = sd_unlearned[k]
        if a.shape != b.shape:
            raise ValueError(f"{k}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
        out[k] = torch.lerp(a, b.to(a.dtype), alpha) if a.is_floating_point() else a.clone()
    return out


def mix_models(model_original, model_unlearned, alpha):
    """A new model with the mixed weights (the inputs are left alone)."""
    m = copy.deepcopy(model_original)
    m.load_state_dict(mix_state_dicts(model_original.state_dict(), model_unlearned.state_dict(), alpha))
    return m


def mixing_sweep(model_original, model_unlearned, alphas, evaluate):
    """[evaluate(theta(alpha)) for alpha in alphas], reusing one scratch model; the paper sweeps 0..1 by 0.05."""
    scratch = copy.deepcopy(model_original)
    sd_o, sd_u = model_original.state_dict(), model_unlearned.state_dict()
    results = []
    for a in alphas:
        scratch.load_state_dict(mix_state_dicts(sd_o, sd_u, float(a)))
        results.append(evaluate(scratch))
    return results


def strengths(es_forget, es_retain):
    """(FS, RS) of one model (App. B): Forget Strength 1 - mean ES on the forget set, Retain Strength mean ES on
    the retain set; both higher = better."""
    f, r = torch.as_tensor(es_forget, dtype=torch.float64), torch.as_tensor(es_retain, dtype=torch.float64)
    if f.numel() == 0 or r.numel() == 0:
        raise ValueError("FS and RS need ES values on both sets")
    return 1 - float(f.mean()), float(r.mean())


def _aues_rows(fs, rs):
    """Batched AUES: fs, rs (R, n) -> (R,) trapezoid areas under RS as a function of FS."""
    order = np.argsort(fs, axis=1, kind="stable")
    x, y = np.take_along_axis(fs, order, 1), np.take_along_axis(rs, order, 1)
    return ((x[:, 1:] - x[:, :-1]) * (y[:, 1:] + y[:, :-1]) / 2).sum(1)


def aues(fs, rs):
    """Area under the FS-RS curve: RS = mean retain ES against FS = 1 - mean forget ES over the mixing sweep.

    Our reading of App. B (the code is not public): the points are sorted by FS and joined by straight lines
    (trapezoid rule) over the FS range they span, with no extrapolation to FS = 0 or 1; higher is better.
    """
    fs, rs = np.asarray(fs, np.float64), np.asarray(rs, np.float64)
    if fs.shape != rs.shape or fs.ndim != 1 or fs.size < 2:
        raise ValueError("AUES needs at least two (FS, RS) points")
    return float(_aues_rows(fs[None], rs[None])[0])


def aues_permutation_test(fs_a, rs_a, fs_b, rs_b, *, n_perm=10000, seed=0):
    """App. D: |AUES_a - AUES_b| against a null made by swapping the two scenarios' (FS, RS) points at each
    mixing coefficient with probability 1/2. Both curves must be on the same alpha grid. A Monte Carlo test over
    n_perm random swap patterns: p = (k + 1) / (n_perm + 1), k of them giving a difference >= the observed one
    (Phipson & Smyth 2010: the observed split counts as one of the null's draws, so p is never 0; its smallest
    value is 1 / (n_perm + 1)). Returns (observed, p)."""
    fa, ra, fb, rb = (np.asarray(v, np.float64) for v in (fs_a, rs_a, fs_b, rs_b))
    if not fa.shape == ra.shape == fb.shape == rb.shape:
        raise ValueError("both curves need (FS, RS) at the same mixing coefficients")
    swap = np.random.default_rng(seed).random((n_perm, fa.size)) < 0.5
    return aues_permutation_null(fa, ra, fb, rb, swap, monte_carlo=True)


def aues_permutation_null(fs_a, rs_a, fs_b, rs_b, swap, monte_carlo=False):
    """(observed, p) for given swap patterns swap (R, n) bool, vectorized over the R patterns: p = k / R, the
    share of the patterns whose difference is >= the observed one (the exact p when swap lists all 2^n patterns),
    or with monte_carlo=True (k + 1) / (R + 1) for R random patterns."""
    observed = abs(aues(fs_a, rs_a) - aues(fs_b, rs_b))
    pa_f, pb_f = np.where(swap, fs_b, fs_a), np.where(swap, fs_a, fs_b)
    pa_r, pb_r = np.where(swap, rs_b, rs_a), np.where(swap, rs_a, rs_b)
    null = np.abs(_aues_rows(pa_f, pa_r) - _aues_rows(pb_f, pb_r))
    # a tiny tolerance so that a permutation equal to the observed curve counts as "equals" despite rounding
    k, R = int(np.sum(null >= observed - 1e-12)), len(null)
    return observed, (k + 1) / (R + 1) if monte_carlo else k / R


def mu95(mu, fq, mu_original, level=0.95):
    """FQ where MU falls to level x MU(theta_o), by linear interpolation of the MU-FQ curve (App. B).

    The paper reports FQ as log10 p-values (its MU95 are about -15), so pass log10 FQ to match. Points are
    ordered by MU (equal MU values averaged), which also makes the bootstrap's shuffled point sets well defined.
    If MU never falls that low the FQ of the lowest-utility point is returned (the most-unlearned model already
    keeps 95% utility); if every point is below it, the FQ of the highest-utility point.
    """
    mu, fq = np.asarray(mu, np.float64), np.asarray(fq, np.float64)
    if mu.shape != fq.shape or mu.size == 0:
        raise ValueError("MU95 needs matching, non-empty MU and FQ")
    u, inv = np.unique(mu, return_inverse=True)
    f = np.bincount(inv, weights=fq) / np.bincount(inv)
    return float(np.interp(level * mu_original, u, f))


def mu95_bootstrap_test(mu_a, fq_a, mu_b, fq_b, mu_original, *, n_boot=10000, level=0.95, seed=0):
    """App. D: |MU95_a - MU95_b| against a null made by pooling both scenarios' (MU, FQ) points, shuffling
    them and splitting into groups of the original sizes (the paper calls this a bootstrap; it resamples
    without replacement). A Monte Carlo test over n_boot random splits: p = (k + 1) / (n_boot + 1), k of them
    giving a difference >= the observed one (never 0, as aues_permutation_test). Returns (observed, p)."""
    mu = np.concatenate([np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)])
    fq = np.concatenate([np.asarray(fq_a, np.float64), np.asarray(fq_b, np.float64)])
    n_a = len(mu_a)
    observed = abs(mu95(mu_a, fq_a, mu_original, level) - mu95(mu_b, fq_b, mu_original, level))
    rng = np.random.default_rng(seed)
    null = np.empty(n_boot)
    for r in range(n_boot):
        p = rng.permutation(mu.size)
        a, b = p[:n_a], p[n_a:]
        null[r] = abs(mu95(mu[a], fq[a], mu_original, level) - mu95(mu[b], fq[b], mu_original, level))
    return observed, (int(np.sum(null >= observed - 1e-12)) + 1) / (n_boot + 1)



# AUES over a range the compared curves share, MU95 that says when it is not a crossing, and an lr picked by a
# reach rule on held-out seeds (locprobe.py)

def common_fs_range(curves):
    """(lo, hi): the FS range every curve spans, lo = the largest of the curves' smallest FS, hi = the smallest of
    their largest FS. curves: iterable of FS lists. hi < lo when some two curves do not overlap."""
    fss = [np.asarray(f, np.float64) for f in curves]
    if not fss or any(f.size < 2 for f in fss):
        raise ValueError("common_fs_range needs at least one curve of at least two FS values")
    return float(max(f.min() for f in fss)), float(min(f.max() for f in fss))


def aues_over(fs, rs, lo, hi):
    """Area under RS(FS) between FS = lo and FS = hi: the curve of aues() (points sorted by FS, stable, joined by
    straight lines) clipped to [lo, hi], RS at lo and hi read off the line through them. aues(fs, rs) ==
    aues_over(fs, rs, min(fs), max(fs)). The curve must span [lo, hi] (no extrapolation); 0 when lo == hi."""
    fs, rs = np.asarray(fs, np.float64), np.asarray(rs, np.float64)
    if fs.shape != rs.shape or fs.ndim != 1 or fs.size < 2:
        raise ValueError("AUES needs at least two (FS, RS) points")
    if not hi >= lo:
        raise ValueError(f"aues_over: hi must be >= lo, got lo={lo}, hi={hi}")
    if lo < fs.min() - 1e-12 or hi > fs.max() + 1e-12:
        raise ValueError(f"aues_over: [{lo}, {hi}] is outside the curve's FS range [{fs.min()}, {fs.max()}]")
    order = np.argsort(fs, kind="stable")
    x, y = fs[order], rs[order]
    area = 0.0
    for x0, x1, y0, y1 in zip(x[:-1], x[1:], y[:-1], y[1:]):
        a, b = max(x0, lo), min(x1, hi)
        if b <= a:                       # outside the range, or a vertical step (equal FS): no width
            continue
        at = lambda v: y0 + (y1 - y0) * (v - x0) / (x1 - x0)
        area += (b - a) * (at(a) + at(b)) / 2
    return float(area)


def mu95_checked(mu, fq, mu_original, level=0.95):
    """mu95() and whether it is a crossing: {"mu95": mu95(...), "fallback": None | "never_falls" | "always_below",
    "target": level x mu_original, "mu_range": [min MU, max MU]}. "never_falls": MU stays above the target at
    every point, so mu95 returned the lowest-utility point's FQ; "always_below": every point is below it (the
    highest-utility point's FQ). A claim that reads a MU95 with a fallback is `not testable here`."""
    mu = np.asarray(mu, np.float64)
    value = mu95(mu, fq, mu_original, level)
    target = level * float(mu_original)
    fb = "never_falls" if mu.min() > target else "always_below" if mu.max() < target else None
    return {"mu95": value, "fallback": fb, "target": target, "mu_range": [float(mu.min()), float(mu.max())]}


def tune_first(grid, check, *, tuned_on, reported, what):
    """The first value of `grid`, in its order, whose check(value) -> {"ok": bool, ...measured} passes, measured
    on `tuned_on` (held-out seeds or data) that must not share an id with `reported` (as tune()). With the grid in
    ascending order this is "the smallest value that meets the rule"; the scan stops there. Returns {"what",
    "value" (None when no value passes: the caller must say so), "reached", "grid", "tried": [{"value", ...check's
    record}], "tuned_on", "rule": "first"}."""
    grid = _held_out(grid, tuned_on, reported, what)
    tried = []
    for g in grid:
        rec = dict(check(g))
        if "ok" not in rec:
            raise ValueError(f"{what}: check must return a dict with an 'ok' key")
        tried.append({"value": g, **rec})
        if rec["ok"]:
            return {"what": what, "value": g, "reached": True, "grid": grid, "tried": tried,
                    "tuned_on": list(tuned_on), "rule": "first"}
    return {"what": what, "value": None, "reached": False, "grid": grid, "tried": tried, "tuned_on": list(tuned_on),
            "rule": "first"}

# -------------------------------------------------------------------------------------------------
# Claims: one verdict vocabulary for every script
# -------------------------------------------------------------------------------------------------

# A claim is the paper's statement as a conjunction of tests, each `value op threshold` with the threshold fixed
# in code before any run. Its verdict is one of VERDICTS:
#   holds / fails      every test on its holding side / some test on its failing side, every precondition met;
#   not testable here  a precondition of the paper's setting is measured and not met at this scale, so the
#                      claim says nothing about the method (the record names the precondition and its value);
#   inconclusive       the 95% interval of some test straddles its threshold (over seeds, or within one run for
#                      a test that carries its own interval) and no test is clearly failed.
VERDICTS = ("holds", "fails", "not testable here", "inconclusive")
OPS = (">=", ">", "<=", "<", "within")


def condition(quantity, value, op, threshold, ci=None, counts=None):
    """One condition of a claim: `value op threshold`; op "within" takes threshold = [lo, hi] (inclusive).
    value must be a finite number (a claim whose measurement is missing is `not testable here`, with the
    precondition that says why). ci = (lo, hi): an interval this run measured for the value (then the test's
    side is the interval's, not the point's); counts: a paired-proportion test's 2x2 counts (paired_proportion),
    pooled over seeds instead of averaging the seeds' values."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if op == "within" and not (len(threshold) == 2 and threshold[0] <= threshold[1]):
        raise ValueError(f"op 'within' needs threshold [lo, hi] with lo <= hi, got {threshold!r}")
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        raise ValueError(f"test {quantity!r}: value must be a finite number, got {value!r}")
    t = {"quantity": quantity, "value": float(value), "op": op,
         "threshold": [float(x) for x in threshold] if op == "within" else float(threshold)}
    if ci is not None:
        t["ci"] = [float(ci[0]), float(ci[1])]
    if counts is not None:
        t["counts"] = dict(counts)
    return t


def precondition(what, value, met):
    """A precondition of the paper's setting, measured: what it is (with the bar it must pass), its value here,
    and whether it is met. An unmet precondition makes the claim `not testable here`."""
    return {"what": what, "value": value, "met": bool(met)}


def margin(value, op, threshold):
    """Signed distance to the threshold, positive on the holding side (0 on the line: holds for >=, <=, within)."""
    if op in (">=", ">"):
        return value - threshold
    if op in ("<=", "<"):
        return threshold - value
    return min(value - threshold[0], threshold[1] - value)


def side(lo, hi, op, threshold):
    """Where an interval [lo, hi] of a value lies: "holds" (all of it passes), "fails" (none of it), "straddles"."""
    m_lo, m_hi = sorted((margin(lo, op, threshold), margin(hi, op, threshold)))
    if op == "within":       # the margin of a band is not monotone in the value: test both ends and the band
        inside = lambda v: threshold[0] <= v <= threshold[1]
        if inside(lo) and inside(hi):
            return "holds"
        return "fails" if hi < threshold[0] or lo > threshold[1] else "straddles"
    strict = op in (">", "<")
    if m_lo > 0 or (m_lo == 0 and not strict):
        return "holds"
    return "fails" if (m_hi < 0 or (m_hi == 0 and strict)) else "straddles"


def _verdict(sides):
    return "fails" if "fails" in sides else "holds" if all(s == "holds" for s in sides) else "inconclusive"


def test_side(t):
    lo, hi = t.get("ci", (t["value"], t["value"]))
    return side(lo, hi, t["op"], t["threshold"])


def claim(name, tests, detail="", precondition=None):
    """One headline claim as measured: {"claim", "verdict", "tests", "value", "threshold", "precondition",
    "detail"}. tests: condition(...) records (all must hold); precondition: precondition(...) or None (none needed).
    With the precondition unmet the tests may be [] (nothing could be measured) and the verdict is
    `not testable here` whatever they say."""
    tests = list(tests)
    if precondition is not None and not precondition["met"]:
        verdict = "not testable here"
    elif not tests:
        raise ValueError(f"claim {name!r} has no test and no unmet precondition: nothing decides its verdict")
    else:
        verdict = _verdict([test_side(t) for t in tests])
    return {"claim": name, "verdict": verdict, "tests": tests,
            "value": {t["quantity"]: t["value"] for t in tests},
            "threshold": {t["quantity"]: _threshold_text(t) for t in tests},
            "precondition": precondition, "detail": detail}


def sanity(name, ok, detail=""):
    """A check of the code's own arithmetic that cannot fail for a reason about the method (the adapter starts
    equal to its base, a timing against seconds): printed under "checks", never as a claim."""
    return {"check": name, "ok": bool(ok), "detail": detail}


def paired_proportion(x, y, threshold=0.10, quantity="frac_diff", z=1.959964):
    """Paired difference of two proportions over the same items (x, y: 0/1 per item): mean(x) - mean(y) with a 95%
    interval by Agresti & Min's adjusted Wald (2005; 0.5 added to every cell of the 2x2 table), so that a few items
    give a wide interval even when they all agree. Returns condition(...) of |diff| within [-threshold, threshold]."""
    x, y = [bool(v) for v in x], [bool(v) for v in y]
    if len(x) != len(y) or not x:
        raise ValueError("paired_proportion needs two 0/1 lists of the same, non-zero length")
    n10 = sum(a and not b for a, b in zip(x, y))
    n01 = sum(b and not a for a, b in zip(x, y))
    return _paired_test({"n": len(x), "n10": n10, "n01": n01}, threshold, quantity, z)


def _paired_test(counts, threshold, quantity, z=1.959964):
    n, n10, n01 = counts["n"], counts["n10"], counts["n01"]
    d = (n10 - n01) / n
    a10, a01, a = n10 + 0.5, n01 + 0.5, n + 2
    da = (a10 - a01) / a
    se = math.sqrt(max(0.0, (a10 + a01) - (a10 - a01) ** 2 / a)) / a
    return condition(quantity, d, "within", [-threshold, threshold], ci=(da - z * se, da + z * se), counts=counts)


def t_interval(xs, level=0.95):
    """(mean, std (n - 1), lo, hi) of the values of several seeds: Student's t interval of the mean."""
    xs = np.asarray(xs, np.float64)
    mu = float(xs.mean())
    if xs.size < 2:
        return mu, 0.0, mu, mu
    sd = float(xs.std(ddof=1))
    h = float(stats.t.ppf(0.5 + level / 2, xs.size - 1)) * sd / math.sqrt(xs.size)
    return mu, sd, mu - h, mu + h


def fmt(x, spec=".3f"):
    """x formatted with spec; '-' for None (a quantity this run did not measure)."""
    return "-" if x is None else format(x, spec)


def mean_std(values):
    """(mean, sample std with n - 1; 0 for one value) of the finite numbers among values (None, NaN and non-numbers
    are skipped: a seed that did not measure a quantity); (None, None) when there are none. The one over-seeds
    summary every script prints."""
    xs = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not xs:
        return None, None
    mu = math.fsum(xs) / len(xs)
    return mu, (math.sqrt(math.fsum((x - mu) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def fmt_pm(pair, spec=".3f"):
    """A (mean, std) pair already computed (mean_std's result) as 'mean ± std'; '-' when the mean is None."""
    mu, sd = pair
    return "-" if mu is None else f"{mu:{spec}} ± {sd:{spec}}"


def fmt_mean_std(values, spec=".3f"):
    """'mean ± std' of mean_std(values) ('mean' alone for one value, '-' for none), each formatted with spec."""
    xs = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    mu, sd = mean_std(xs)
    if mu is None:
        return "-"
    return fmt_pm((mu, sd), spec) if len(xs) > 1 else format(mu, spec)


def over_seeds(per_seed):
    """per_seed: {seed: [claim records]} (the same claims in the same order) -> one record per claim over the seeds.
    Each test's margin (value minus threshold, positive = holds; margin()) is paired within a seed, so thresholds
    that are themselves measured (another model's number) move with their seed; the overall verdict comes from the
    95% t interval of the margins over the seeds (a test with counts pools its items over the seeds instead).
    `not testable here` if any seed's precondition is unmet: the setting does not reliably support the claim."""
    seeds = list(per_seed)
    lists = [per_seed[s] for s in seeds]
    if any([c["claim"] for c in cs] != [c["claim"] for c in lists[0]] for cs in lists):
        raise ValueError("the seeds produced different claims; cannot combine them")
    out = []
    for i, c0 in enumerate(lists[0]):
        cs = [cs[i] for cs in lists]
        per = {str(s): c["verdict"] for s, c in zip(seeds, cs)}
        tests = []
        if all(c["verdict"] != "not testable here" for c in cs):
            for j, t0 in enumerate(c0["tests"]):
                ts = [c["tests"][j] for c in cs]
                if all("counts" in t for t in ts):
                    pooled = {k: sum(t["counts"][k] for t in ts) for k in ("n", "n10", "n01")}
                    p = _paired_test(pooled, t0["threshold"][1], t0["quantity"])
                    row = {"side": test_side(p), "ci": p["ci"], "pooled": pooled}
                else:
                    m = [margin(t["value"], t["op"], t["threshold"]) for t in ts]
                    mu, sd, lo, hi = t_interval(m)
                    row = {"margin_mean": mu, "margin_std": sd, "margin_ci": [lo, hi],
                           "side": side(lo, hi, ">=" if t0["op"] not in (">", "<") else ">", 0.0)}
                    if len(ts) == 1:
                        row["side"] = test_side(t0)
                vals = [t["value"] for t in ts]
                mu, sd, _, _ = t_interval(vals)
                tests.append({"quantity": t0["quantity"], "op": t0["op"], "threshold": t0["threshold"],
                              "threshold_per_seed": [t["threshold"] for t in ts],
                              "mean": mu, "std": sd, "n": len(ts), "per_seed": vals, **row})
            verdict = _verdict([t["side"] for t in tests])
        else:
            verdict = "not testable here"
        out.append({"claim": c0["claim"], "verdict": verdict, "verdict_per_seed": per, "tests": tests,
                    "value": {t["quantity"]: t["mean"] for t in tests},
                    "threshold": {t0["quantity"]: _threshold_text(t0, [c["tests"][j]["threshold"] for c in cs
                                                                        if len(c["tests"]) > j])
                                  for j, t0 in enumerate(c0["tests"])},
                    "precondition_per_seed": {str(s): c["precondition"] for s, c in zip(seeds, cs)},
                    "detail": "; ".join(f"seed {s}: {c['detail']}" for s, c in zip(seeds, cs) if c["detail"])})
    return out


def _num(x):
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_num(v) for v in x) + "]"
    return format(x, ".4g") if isinstance(x, float) else str(x)


def _threshold_text(t, per_seed=()):
    """'op threshold'; over seeds whose thresholds differ (measured ones, e.g. another model's number), each
    seed's in seed order, not the first seed's alone."""
    if any(p != t["threshold"] for p in per_seed):
        return f"{t['op']} {' / '.join(_num(p) for p in per_seed)} (per seed)"
    return f"{t['op']} {_num(t['threshold'])}"


def _value_text(c):
    if c.get("verdict_per_seed") is None:
        return ", ".join(f"{t['quantity']} {_num(t['value'])}" + (f" [{_num(t['ci'][0])}, {_num(t['ci'][1])}]"
                                                                  if "ci" in t else "") for t in c["tests"]) or "-"
    return ", ".join(f"{t['quantity']} {_num(t['mean'])} ± {_num(t['std'])}"
                     + (f" (margin 95% CI [{_num(t['margin_ci'][0])}, {_num(t['margin_ci'][1])}])" if "margin_ci" in t
                        else f" (pooled 95% CI [{_num(t['ci'][0])}, {_num(t['ci'][1])}])") for t in c["tests"]) or "-"


def _precondition_text(c):
    pres = [c.get("precondition")] if "precondition_per_seed" not in c else \
        [p for p in c["precondition_per_seed"].values()]
    bad = [p for p in pres if p is not None and not p["met"]]
    if not bad:
        return ""
    return f"precondition not met: {bad[0]['what']} (measured {_num(bad[0]['value'])}" + \
        (f"; {len(bad)} of {len(pres)} seeds" if len(pres) > 1 else "") + ")"


def _cell(text):
    """Text safe inside one markdown table cell: a literal | (as in |x - y|) escaped, line breaks as spaces."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def claims_markdown(claims, checks=()):
    """The claims table every script prints (one run, or combined over seeds by over_seeds), then the sanity
    checks. Verdicts are VERDICTS' words; an unmet precondition is named with its value."""
    seeds = "verdict_per_seed" in claims[0] if claims else False
    L = ["| claim | value" + (" (mean ± std over seeds)" if seeds else "") + " | threshold | verdict"
         + (" (per seed)" if seeds else "") + " | detail |", "| --- | --- | --- | --- | --- |"]
    for c in claims:
        thr = "; ".join(f"{k} {v}" for k, v in c["threshold"].items()) or "-"
        per = (" (" + ", ".join(f"{s}: {v}" for s, v in c["verdict_per_seed"].items()) + ")") if seeds else ""
        detail = "; ".join(x for x in (_precondition_text(c), c.get("detail", "")) if x)
        L.append(f"| {_cell(c['claim'])} | {_cell(_value_text(c))} | {_cell(thr)} | **{c['verdict']}**{per} | "
                 f"{_cell(detail)} |")
    if checks:
        L += ["", "Checks (the code's own arithmetic; they cannot fail for a reason about the method):", ""]
        L += [f"- {'ok' if k['ok'] else 'FAILED'}: {k['check']}" + (f" ({k['detail']})" if k["detail"] else "")
              for k in checks]
    return L


def json_safe(x):
    """x with every nan / infinity as None (JSON null): a score with nothing to normalize by (Util_R when the
    reference model's utility is 0) is a number the tables print as nan and results.json holds as null."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def write_results(out_dir, title, config, metrics, claims, text, checks=()):
    """out_dir/results.md (the printed table) and out_dir/results.json ({config, metrics, claims, checks}: strict
    JSON; nan metrics as null, a nan in a claim is an error: conditions must be finite), the json written
    atomically. Returns the json path."""
    import os
    from dataclasses import asdict, is_dataclass
    for c in claims:
        if c.get("verdict") not in VERDICTS:
            raise ValueError(f"claim {c.get('claim')!r} has verdict {c.get('verdict')!r}, not one of {VERDICTS}")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(f"# {title}\n\n{text}\n")
    path = os.path.join(out_dir, "results.json")
    cfg = asdict(config) if is_dataclass(config) else config
    with open(path + ".tmp", "w") as f:
        json.dump({"config": cfg, "metrics": json_safe(metrics), "claims": claims, "checks": list(checks)}, f, indent=1,
                  default=float, allow_nan=False)
    os.replace(path + ".tmp", path)
    return path


def publish(out_dir, title, config, metrics, claims, lines, plot=None, checks=()):
    """The end of every script's report: print the lines, write results.md and results.json (write_results), then
    the figures (plot(), when given). Returns the printed text."""
    text = "\n".join(lines)
    print(text)
    path = write_results(out_dir, title, config, metrics, claims, text, checks)
    if plot is not None:
        plot()
    print(f"wrote {path}")
    return text


# -------------------------------------------------------------------------------------------------
# Tuning on what the report never uses
# -------------------------------------------------------------------------------------------------

def _held_out(grid, tuned_on, reported, what):
    """The grid as a list, after refusing a tuning set that shares an id with what the report uses."""
    overlap = set(map(str, tuned_on)) & set(map(str, reported))
    if overlap:
        raise ValueError(f"{what} would be tuned on {sorted(overlap)}, which the report also uses: tune on held-out "
                         "data or seeds")
    grid = list(grid)
    if not grid:
        raise ValueError(f"{what}: empty grid")
    return grid


def tune(grid, score, *, tuned_on, reported, what, minimize=True, extend=0):
    """Pick the value of `grid` with the best score(value), where score is measured on `tuned_on` (held-out seeds,
    a held-out forget request or a held-out half of each source's probes: any collection of ids) and the report
    uses `reported`; the two must not share an id. Returns {"what", "value", "grid", "scores", "tuned_on",
    "extended"}, the record a report prints ("what was tuned, on what, over which grid"). Ties go to the first
    grid value. extend > 0 (a grid of positive numbers in ascending order, e.g. lrs): while the best value is an
    end of the grid, one more value is scored past that end, in the grid's own geometric step there (the end
    value squared over its neighbour), at most `extend` values in all: a best value at an edge says the optimum
    may lie beyond it (a grid of one value has no step: it is used as given). The rule is fixed before any score
    is seen and sees only the held-out data."""
    grid = _held_out(grid, tuned_on, reported, what)
    scores = [float(score(g)) for g in grid]
    pick = lambda: (min if minimize else max)(range(len(grid)), key=lambda i: scores[i])
    if extend and (grid[0] <= 0 or any(not a < b for a, b in zip(grid, grid[1:]))):
        raise ValueError(f"{what}: extend needs an ascending grid of positive values, got {grid}")
    n_ext, best = 0, pick()
    while n_ext < extend and len(grid) > 1 and best in (0, len(grid) - 1):    # one value: no step to take
        i, v = (0, grid[0] ** 2 / grid[1]) if best == 0 else (len(grid), grid[-1] ** 2 / grid[-2])
        grid.insert(i, v)
        scores.insert(i, float(score(v)))
        n_ext, best = n_ext + 1, pick()
    return {"what": what, "value": grid[best], "grid": grid, "scores": scores, "tuned_on": list(tuned_on),
            "rule": "lowest" if minimize else "highest", "extended": n_ext}


def load_average():
    """The 1-minute load average as text ('n/a' where the OS has none): how busy the machine was, measured
    rather than asserted, for the run-time lines of the reports."""
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


def pyplot():
    """matplotlib.pyplot with a file backend. matplotlib is a regular dependency (requirements.txt): every
    script writes its figures, so a missing install is an error, not a run without plots."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the figures need matplotlib: pip install -r requirements.txt") from e
    return plt
