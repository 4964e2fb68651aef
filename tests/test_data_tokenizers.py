"""data.py tokenizers: the word-level tokenizer of the built-in data and the tiktoken GPT-2 wrapper."""
import base64
from pathlib import Path

import pytest
import torch

import data as D

GPT2_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2.tiktoken"


# --- word-level tokenizer -------------------------------------------------------------------------

def test_word_tokenizer_worked_example():
    tok = D.WordTokenizer.from_texts(["Anna Berg's father is Karl, a baker.\nQuestion: who?"])
    text = "Anna Berg's father is Karl, a baker.\nQuestion: who?"
    words = [tok.itos[i] for i in tok.encode(text)]
    assert words == ["Anna", "Berg", "'s", "father", "is", "Karl", ",", "a", "baker", ".", "\n", "Question", ":",
                     "who", "?"]
    assert tok.decode(tok.encode(text)) == text
    # specials first, then the sorted words: the vocabulary is a function of the word set only
    assert tok.itos[:3] == ["<pad>", "<eos>", "<unk>"] and (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert tok.itos[3:] == sorted(tok.itos[3:])


def test_word_tokenizer_unknown_words_and_bad_ids():
    tok = D.WordTokenizer(["a", "b"])
    assert tok.encode("a zebra b") == [3, 2, 4]
    with pytest.raises(KeyError, match="zebra"):
        tok.encode("a zebra", strict=True)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([99])
    assert tok.decode(torch.tensor([3, 4, 1, 3])) == "a b <eos> a"
    assert tok.decode([3, 4, 1, 3], stop_at_eos=True) == "a b"
    with pytest.raises(ValueError, match="duplicate"):
        D.WordTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="single word"):
        D.WordTokenizer(["two words"])
    with pytest.raises(ValueError, match="reserved"):
        D.WordTokenizer(["<eos>"])


def test_generator_vocabularies_round_trip_exactly():
    wt, st = D.world_tokenizer(), D.stories_tokenizer()
    # the vocabulary comes from the generators' word lists: the same for every seed and size
    assert wt.itos == D.world_tokenizer().itos
    assert 200 <= wt.vocab_size <= 2000 and 150 <= st.vocab_size <= 2000
    worlds = [D.make_world(0), D.make_world(5, n_people=30, n_families=12, n_cities=5, n_holdout=4, n_real=6)]
    for w in worlds:
        for text in w.texts():
            ids = wt.encode(text)
            assert wt.unk_id not in ids, text
            assert wt.decode(ids) == text
    for text in D.make_stories(300, seed=3):
        ids = st.encode(text)
        assert st.unk_id not in ids and st.decode(ids) == text


def test_word_tokenizer_state_dict_round_trip():
    tok = D.world_tokenizer()
    back = D.load_tokenizer(tok.state_dict())
    assert isinstance(back, D.WordTokenizer) and back.itos == tok.itos
    text = D.make_world(0).articles[1]
    assert back.encode(text) == tok.encode(text)
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        D.load_tokenizer({"kind": "sentencepiece"})
    with pytest.raises(ValueError, match="'kind'"):
        D.load_tokenizer({"words": []})


# --- GPT-2 BPE through tiktoken ---------------------------------------------------------------------

def tiny_ranks():
    # every byte, then merges he, ll, hell, hello (lower rank = merged first, as in BPE)
    ranks = {bytes([i]): i for i in range(256)}
    for j, m in enumerate([b"he", b"ll", b"hell", b"hello"]):
        ranks[m] = 256 + j
    return ranks


def test_gpt2_wrapper_on_a_hand_made_rank_table():
    tok = D.GPT2Tokenizer(mergeable_ranks=tiny_ranks())
    # worked BPE: h e l l o -> he l l o -> he ll o -> hell o -> hello
    assert tok.encode("hello") == [259]
    # GPT-2's pre-tokenizer keeps the leading space with the word: " hello" = " " + "hello"? no merge " h"
    assert tok.encode(" hello") == [32, 259]
    assert tok.encode("hi") == [104, 105]
    assert tok.eos_id == tok.pad_id == 260 and tok.vocab_size == 261
    assert tok.decode(tok.encode("hello world, hell!")) == "hello world, hell!"
    assert tok.decode([259, 260, 104]) == "hello<|endoftext|>h"
    assert tok.decode([259, 260, 104], stop_at_eos=True) == "hello"
    # the special token is not produced from ordinary text
    assert 260 not in tok.encode("<|endoftext|>")
    back = D.load_tokenizer(tok.state_dict())
    assert back.encode("hello hell") == tok.encode("hello hell") and back.eos_id == 260


def write_tiktoken_file(path, ranks):
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))


def test_gpt2_ranks_from_a_file_an_env_var_and_clear_errors(tmp_path, monkeypatch):
    f = tmp_path / "tiny.tiktoken"
    write_tiktoken_file(f, tiny_ranks())
    monkeypatch.delenv(D.GPT2_RANKS_ENV, raising=False)
    tok = D.GPT2Tokenizer(str(f))
    assert tok.encode("hello") == [259]
    state = tok.state_dict()
    assert state["ranks_path"] == str(f) and state["inline"] is None
    assert D.load_tokenizer(state).encode("hello") == [259]

    monkeypatch.setenv(D.GPT2_RANKS_ENV, str(f))
    assert D.GPT2Tokenizer().encode(" hello") == [32, 259]

    monkeypatch.setenv(D.GPT2_RANKS_ENV, str(tmp_path / "nope.tiktoken"))
    with pytest.raises(FileNotFoundError, match="nope.tiktoken"):
        D.GPT2Tokenizer()
    with pytest.raises(FileNotFoundError, match="missing.tiktoken"):
        D.GPT2Tokenizer(str(tmp_path / "missing.tiktoken"))


def test_gpt2_nothing_loads_is_a_clear_error(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.delenv(D.GPT2_RANKS_ENV, raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match=D.GPT2_RANKS_ENV):
        D.GPT2Tokenizer()


def test_gpt2_restored_with_a_different_vocabulary_is_refused(tmp_path):
    tok = D.GPT2Tokenizer(mergeable_ranks=tiny_ranks())
    state = dict(tok.state_dict(), vocab_size=50257)
    with pytest.raises(ValueError, match="50257"):
        D.load_tokenizer(state)


@pytest.mark.skipif(not GPT2_FILE.is_file(), reason="no gpt2.tiktoken ranks file beside the repository")
def test_gpt2_real_ranks_hello_world():
    tok = D.GPT2Tokenizer(str(GPT2_FILE))
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.vocab_size == 50257 and tok.eos_id == 50256
    assert tok.decode(tok.encode("Hello world, it's me.")) == "Hello world, it's me."
