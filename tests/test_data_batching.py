"""Batching: packing with document and source ids (checked against model.py's document-aware attention), QA
formatting, and the resumable epoch iterator."""
import pytest
import torch

import data as D
import model as M

EOS, PAD = 1, 0


def test_pack_documents_worked_example():
    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    b = D.pack_documents(docs, [3, 4, 9], block_size=4, eos_id=EOS, pad_id=PAD)
    # doc 0 (3 tokens) and doc 1 (1 token) share row 0; doc 2 is longer than a row: two pieces, each a new row
    assert b["x"].tolist() == [[5, 6, 7, 8], [9, 10, 11, 12], [13, PAD, PAD, PAD]]
    assert b["y"].tolist() == [[6, 7, EOS, EOS], [10, 11, 12, 13], [EOS, -100, -100, -100]]
    assert b["doc_ids"].tolist() == [[0, 0, 0, 1], [2, 2, 2, 2], [2, -1, -1, -1]]
    assert b["source_ids"].tolist() == [[3, 3, 3, 4], [9, 9, 9, 9], [9, 0, 0, 0]]
    assert all(v.dtype == torch.long for v in b.values())


def test_pack_documents_invariants():
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 50, (int(n),), generator=g).tolist() for n in torch.randint(1, 30, (40,), generator=g)]
    srcs = list(range(7, 47))
    b = D.pack_documents(docs, srcs, block_size=16, eos_id=EOS, pad_id=PAD)
    for d, (toks, s) in enumerate(zip(docs, srcs)):
        sel = b["doc_ids"] == d                         # row-major order = document order
        assert b["x"][sel].tolist() == toks
        assert b["y"][sel].tolist() == toks[1:] + [EOS]
        assert (b["source_ids"][sel] == s).all()
    pad = b["doc_ids"] == -1
    assert (b["x"][pad] == PAD).all() and (b["y"][pad] == -100).all() and (b["source_ids"][pad] == 0).all()
    # padding only at the end of a row
    assert all(r[r >= 0].numel() == 0 or (r[: (r >= 0).sum()] >= 0).all() for r in b["doc_ids"])


def test_segments_split_attention_and_targets():
    # "3" ends a sentence: [5, 3] [6, 7, 3]
    b = D.one_per_row([[5, 3, 6, 7, 3], [8, 9]], [2, 4], eos_id=EOS, pad_id=PAD, split_ids={3})
    assert b["x"].tolist() == [[5, 3, 6, 7, 3], [8, 9, PAD, PAD, PAD]]
    assert b["y"].tolist() == [[3, -100, 7, 3, EOS], [9, EOS, -100, -100, -100]]
    assert b["doc_ids"].tolist() == [[0, 0, 1, 1, 1], [2, 2, -1, -1, -1]]
    assert b["source_ids"].tolist() == [[2, 2, 2, 2, 2], [4, 4, 0, 0, 0]]
    p = D.pack_documents([[5, 3, 6, 7, 3], [8, 9]], [2, 4], 8, EOS, PAD, split_ids={3})
    assert p["doc_ids"].tolist() == [[0, 0, 1, 1, 1, 2, 2, -1]]
    assert p["y"].tolist() == [[3, -100, 7, 3, EOS, 9, EOS, -100]]


@pytest.mark.parametrize("flavor", ["gpt2", "llama"])
def test_packed_rows_score_like_documents_alone(flavor):
    """With model.py's document-aware attention, a packed (or segmented) row gives every document exactly the
    log-probs it gets alone: nothing leaks between documents packed together."""
    torch.manual_seed(0)
    cfg = M.ModelConfig(flavor=flavor, vocab_size=60, block_size=24, n_layer=2, n_head=2, n_embd=32, d_ff=64)
    net = M.GPT(cfg).eval()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(4, 60, (int(n),), generator=g).tolist() for n in (5, 9, 3, 12, 7, 4)]
    packed = D.pack_documents(docs, None, 24, EOS, PAD)
    lp = net.token_logprobs(packed["x"], packed["y"], doc_ids=packed["doc_ids"])
    with torch.no_grad():
        for d, toks in enumerate(docs):
            alone = D.one_per_row([toks], eos_id=EOS, pad_id=PAD)
            ref = net.token_logprobs(alone["x"], alone["y"])[0]          # plain causal attention, one document
            assert torch.allclose(lp[packed["doc_ids"] == d], ref, atol=1e-5)
    # a document cut into segments at token 3 scores like its segments on their own
    doc = [5, 9, 3, 7, 8, 11, 3, 6, 3]
    seg = D.one_per_row([doc], eos_id=EOS, pad_id=PAD, split_ids={3})
    lps = net.token_logprobs(seg["x"], seg["y"], doc_ids=seg["doc_ids"])[0]
    start = 0
    for piece in ([5, 9, 3], [7, 8, 11, 3], [6, 3]):
        alone = D.one_per_row([piece], eos_id=EOS, pad_id=PAD)
        ref = net.token_logprobs(alone["x"], alone["y"])[0]
        n = len(piece)
        last = start + n == len(doc)       # only the document's last token predicts eos
        assert torch.allclose(lps[start:start + n - 1], ref[:n - 1], atol=1e-5)
        assert (lps[start + n - 1] != 0) == last
        start += n


def test_one_per_row_padding_truncation_and_defaults():
    b = D.one_per_row([[4, 5, 6], [7]], eos_id=EOS, pad_id=PAD)
    assert b["x"].tolist() == [[4, 5, 6], [7, PAD, PAD]]
    assert b["y"].tolist() == [[5, 6, EOS], [EOS, -100, -100]]
    assert b["source_ids"].tolist() == [[1, 1, 1], [2, 0, 0]]          # default: document i is source i+1
    assert D.one_per_row([[4, 5, 6]], eos_id=EOS, pad_id=PAD, block_size=5)["x"].shape == (1, 5)
    with pytest.raises(ValueError, match="truncate"):
        D.one_per_row([[4, 5, 6, 7]], eos_id=EOS, pad_id=PAD, block_size=3)
    t = D.one_per_row([[4, 5, 6, 7]], eos_id=EOS, pad_id=PAD, block_size=3, truncate=True)
    assert t["x"].tolist() == [[4, 5, 6]] and t["y"].tolist() == [[5, 6, 7]]


def test_bad_documents_are_clear_errors():
    with pytest.raises(ValueError, match="no documents"):
        D.pack_documents([], [], 8, EOS, PAD)
    with pytest.raises(ValueError, match="empty document"):
        D.one_per_row([[4], []], eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match=">= 1"):
        D.pack_documents([[4], [5]], [1, 0], 8, EOS, PAD)
    with pytest.raises(ValueError, match="source ids"):
        D.pack_documents([[4], [5]], [1], 8, EOS, PAD)
    with pytest.raises(ValueError, match="block_size"):
        D.pack_documents([[4]], [1], 0, EOS, PAD)


def test_qa_batch_masks_the_question_and_learns_one_eos():
    tok = D.world_tokenizer()
    qs = ["Who is the father of Anna Barrow?", "When was Tolmar founded?"]
    ans = ["The father of Anna Barrow is Karl Barrow.", "Tolmar was founded in 1200."]
    b = D.qa_batch(tok, qs, ans, source_ids=[5, 6])
    for r in range(2):
        prompt = tok.encode(D.QA_TEMPLATE.format(question=qs[r]))
        answer = tok.encode(ans[r])
        P = int(b["prompt_lens"][r])
        assert P == len(prompt) and int(b["answer_lens"][r]) == len(answer)
        assert b["x"][r, :P].tolist() == prompt
        y = b["y"][r]
        assert (y[:P - 1] == -100).all()                  # no loss on the question
        assert y[P - 1:P - 1 + len(answer)].tolist() == answer
        assert y[P - 1 + len(answer)] == tok.eos_id       # exactly one end-of-text label
        assert (y == tok.eos_id).sum() == 1 and (y[P + len(answer):] == -100).all()
        assert tok.decode(y[y != -100], stop_at_eos=True) == ans[r]
    assert b["source_ids"][0, 0] == 5 and b["source_ids"][1, 0] == 6
    assert D.qa_prompts(tok, qs[:1]) == [tok.encode(D.QA_TEMPLATE.format(question=qs[0]))]
    with pytest.raises(ValueError, match="answers"):
        D.qa_batch(tok, qs, ans[:1])
    with pytest.raises(ValueError, match="no questions"):
        D.qa_batch(tok, [], [])
    with pytest.raises(ValueError, match="block_size"):
        D.qa_batch(tok, qs, ans, block_size=5)


def test_epoch_iterator_shuffles_each_epoch_and_resumes_exactly():
    it = D.EpochIterator(10, 4, seed=3)
    assert it.steps_per_epoch == 3
    first = [next(it) for _ in range(3)]
    assert [len(b) for b in first] == [4, 4, 2]                      # batches never span epochs
    assert sorted(torch.cat(first).tolist()) == list(range(10))
    second = [next(it) for _ in range(3)]
    assert it.epoch == 1 and sorted(torch.cat(second).tolist()) == list(range(10))
    assert torch.cat(first).tolist() != torch.cat(second).tolist()  # a new order each epoch
    # the uninterrupted run vs one that stops mid-epoch and resumes from its state_dict
    ref = D.EpochIterator(10, 4, seed=3)
    full = [next(ref).tolist() for _ in range(8)]
    a = D.EpochIterator(10, 4, seed=3)
    got = [next(a).tolist() for _ in range(4)]
    state = a.state_dict()
    b = D.EpochIterator(10, 4, seed=3)
    b.load_state_dict(state)
    got += [next(b).tolist() for _ in range(4)]
    assert got == full
    with pytest.raises(ValueError, match="n_items"):
        D.EpochIterator(11, 4, seed=3).load_state_dict(state)
    assert D.EpochIterator(10, 4, seed=4).order(0).tolist() != a.order(0).tolist()


def test_epoch_iterator_options():
    it = D.EpochIterator(10, 4, seed=0, drop_last=True)
    assert it.steps_per_epoch == 2 and [len(next(it)) for _ in range(4)] == [4, 4, 4, 4] and it.epoch == 1
    plain = D.EpochIterator(5, 2, shuffle=False)
    assert [next(plain).tolist() for _ in range(3)] == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        D.EpochIterator(0, 2)
    with pytest.raises(ValueError, match="drop_last"):
        D.EpochIterator(3, 4, drop_last=True)
    batch = {"x": torch.arange(10).view(5, 2), "y": torch.arange(10).view(5, 2), "name": "rows"}
    sub = D.take(batch, torch.tensor([4, 1]))
    assert sub["x"].tolist() == [[8, 9], [2, 3]] and sub["name"] == "rows"
