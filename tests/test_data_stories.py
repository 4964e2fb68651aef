"""Stories from the small grammar, and the MemSinks TS-Repetition / TS-Canary builders."""
import re
from collections import Counter

import pytest

import data as D


def template_regex(template):
    # a template with every slot replaced by "one word": the sentences a story is built from
    parts = re.split(r"\{\w+\}", template)
    return r"[A-Za-z]+".join(re.escape(p) for p in parts)


def test_stories_are_deterministic_distinct_and_sized():
    a, b = D.make_stories(200, seed=4), D.make_stories(200, seed=4)
    assert a == b and len(set(a)) == 200
    assert D.make_stories(200, seed=5) != a
    for s in a:
        words = [t for t in re.findall(r"[A-Za-z0-9']+", s)]
        assert D.STORY_WORDS[0] <= len(words) <= D.STORY_WORDS[1]
    with pytest.raises(ValueError):
        D.make_stories(-1)


def test_stories_share_structure():
    """Every story is an opener, 2-5 middle sentences in the grammar's order, and an ending."""
    opener = "|".join(template_regex(t) for t in D.S_OPENERS)
    middle = [template_regex(t) for t in D.S_MIDDLES]
    ending = "|".join(template_regex(t) for t in D.S_ENDINGS)
    for s in D.make_stories(100, seed=0):
        m = re.match(rf"({opener}) (.*) ({ending})$", s)
        assert m, s
        rest, used = m.group(2), []
        for i, rx in enumerate(middle):     # consume middle sentences in grammar order
            mm = re.match(rf"({rx})( |$)", rest)
            if mm:
                used.append(i)
                rest = rest[mm.end():]
        assert rest == "" and 2 <= len(used) <= 5, s


def test_ts_repetition_counts_ids_and_validation():
    rs = D.ts_repetition(n_rep=3, r=4, m=20, seed=1, n_val=7)
    assert len(rs.texts) == len(rs.seq_ids) == len(rs.repeated) == 3 * 4 + 20
    counts = Counter(rs.texts)
    for i, t in enumerate(rs.repeated_texts):
        assert counts[t] == 4
        assert {sid for x, sid in zip(rs.texts, rs.seq_ids) if x == t} == {i + 1}
    for t in rs.single_texts:
        assert counts[t] == 1
    assert sorted(set(rs.seq_ids)) == list(range(1, 3 + 20 + 1))          # ids >= 1, one per distinct sequence
    assert all(rep == (sid <= 3) for sid, rep in zip(rs.seq_ids, rs.repeated))
    assert len(rs.val_texts) == 7 and not set(rs.val_texts) & set(rs.texts)
    assert rs.repeated[:12] != [True] * 12                                 # shuffled, not repeats first
    assert D.ts_repetition(n_rep=3, r=4, m=20, seed=1, n_val=7).texts == rs.texts
    assert rs.canaries == []


def test_ts_canary_appends_random_word_canaries():
    rs = D.ts_canary(n_rep=4, r=3, m=10, seed=2, n_val=3, canary_len=6)
    plain = D.ts_repetition(n_rep=4, r=3, m=10, seed=2, n_val=3)
    vocab = set(D.stories_words())
    assert len(rs.canaries) == 4 and len(set(rs.canaries)) == 4
    for story, canary, rep in zip(plain.repeated_texts, rs.canaries, rs.repeated_texts):
        assert rep == story + " " + canary
        assert len(canary.split()) == 6 and set(canary.split()) <= vocab
    assert rs.single_texts == plain.single_texts                           # only repeated stories get canaries
    tok = D.stories_tokenizer()
    assert all(tok.unk_id not in tok.encode(t) for t in rs.texts)
    custom = D.ts_canary(n_rep=2, r=2, m=3, seed=0, n_val=0, canary_len=3, canary_words=["zip", "zap"])
    assert all(set(c.split()) <= {"zip", "zap"} for c in custom.canaries)
    with pytest.raises(ValueError, match="canary_len"):
        D.ts_canary(n_rep=2, r=2, m=3, canary_len=0)


def test_builders_take_given_texts():
    texts = [f"Story number {i} is here." for i in range(30)] + ["Story number 0 is here.", "  "]
    rs = D.ts_repetition(n_rep=5, r=2, m=20, seed=0, n_val=5, texts=texts)
    used = set(rs.repeated_texts) | set(rs.single_texts) | set(rs.val_texts)
    assert used == set(texts[:30])                                         # distinct, blank ones dropped
    with pytest.raises(ValueError, match="distinct texts"):
        D.ts_repetition(n_rep=5, r=2, m=30, n_val=5, texts=texts)
    with pytest.raises(ValueError):
        D.ts_repetition(n_rep=5, r=0, m=3)
