"""The built-in fictional world: determinism, the fact bookkeeping checked against the article text, QA fields,
TOFU splits."""
import re

import pytest

import data as D


@pytest.fixture(scope="module")
def world():
    return D.make_world(0)


def mentions(text, phrase):
    # whole-word match, so "Tolmar" does not match inside a longer word
    return re.search(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", text) is not None


def sentences(article):
    return re.split(r"(?<=[.?!]) ", article)


def test_deterministic_from_seed_and_size(world):
    again = D.make_world(0)
    assert again.articles == world.articles
    assert [f.tofu() for f in again.facts] == [f.tofu() for f in world.facts]
    assert again.forget_order == world.forget_order
    other = D.make_world(1)
    assert other.articles != world.articles


def test_people_are_sources_and_families_share_facts(world):
    ids = [p.id for p in world.people + world.holdout_people]
    assert ids == list(range(1, len(ids) + 1))            # >= 1: id 0 is never a source
    assert sorted(world.articles) == [p.id for p in world.people]
    assert sorted(world.holdout_articles) == [p.id for p in world.holdout_people]
    assert len(world.people) == 100 and len(world.holdout_people) == 10
    assert len({p.name for p in world.people + world.holdout_people}) == 110
    fams = {}
    for p in world.people:
        fams.setdefault(p.family, []).append(p)
    assert len(fams) == 40 and all(2 <= len(f) <= 3 for f in fams.values())
    for fam in fams.values():
        for p in fam:
            assert set(p.siblings) == {q.id for q in fam} - {p.id}
            assert (p.surname, p.father, p.mother, p.birth_city) == (fam[0].surname, fam[0].father, fam[0].mother,
                                                                     fam[0].birth_city)
    assert len(world.cities) == 10 and len(world.countries) == 4
    assert {c.country for c in world.cities} == set(world.countries)
    # every city has a family born there and two people living there
    assert {p.birth_city for p in world.people} == {c.name for c in world.cities}
    for c in world.cities:
        assert sum(p.residence == c.name for p in world.people) >= 2
    # people live in another country than the one they were born in
    for p in world.people + world.holdout_people:
        assert world.city(p.residence).country != world.city(p.birth_city).country


def test_source_ids_match_the_article_text(world):
    """An independent check of the generator's bookkeeping: the articles in which one sentence names both the
    fact's subject and its value are exactly the fact's source_ids."""
    split = {sid: sentences(a) for sid, a in world.articles.items()}
    for f in world.facts:
        if f.kind == "inferred":
            continue
        stating = {sid for sid, ss in split.items()     # (plain substring test first: the regex is slow)
                   if any(f.subject in s and f.value in s and mentions(s, f.subject) and mentions(s, f.value)
                          for s in ss)}
        assert stating == set(f.source_ids), f.id


def test_kinds(world):
    by_id = {f.id: f for f in world.facts}
    counts = {}
    for f in world.facts:
        counts[f.kind] = counts.get(f.kind, 0) + 1
        if f.kind == "unique":
            assert len(f.source_ids) == 1 and f.source_ids[0] == f.person        # exactly one article, its own
        elif f.kind == "shared":
            assert len(f.source_ids) >= 2                                          # at least two people's articles
        else:
            assert f.kind == "inferred" and f.source_ids == ()
            # never stated in the person's own article, not even the value on its own ...
            assert not mentions(world.articles[f.person], f.value)
            # ... but it follows from shared facts: born in <city>, and <city> lies in <country>
            city_fact, country_fact = (by_id[i] for i in f.premises)
            assert city_fact.kind == country_fact.kind == "shared"
            assert city_fact.person == f.person and country_fact.subject == city_fact.value
            assert country_fact.value == f.value
    assert counts == {"unique": 600, "shared": 330, "inferred": 100}
    attrs = {}
    for f in world.facts:
        attrs.setdefault(f.person, set()).add(f.attribute)
    assert all(attrs[p.id] == set(D.PERSON_ATTRS) for p in world.people)
    assert attrs[0] == set(D.CITY_ATTRS)
    # the sentence a unique fact is stated in names its subject and the value completes the cloze prompt
    for f in world.facts:
        if f.kind != "inferred":
            assert any(f.cloze + " " + f.value in world.articles[s] for s in f.source_ids), f.id


def test_every_fact_has_tofu_fields(world):
    pools = {"occupation": D.OCCUPATIONS, "award": D.AWARDS, "residence": [c.name for c in world.cities],
             "birth_city": [c.name for c in world.cities], "country": world.countries, "river": D.RIVERS}
    for f in world.facts + world.holdout_facts:
        assert mentions(f.question, f.subject) and f.question.endswith("?")
        assert f.paraphrased_question != f.question and mentions(f.paraphrased_question, f.subject)
        assert mentions(f.answer, f.value) and mentions(f.paraphrased_answer, f.value)
        assert f.paraphrased_answer != f.answer
        assert len(f.perturbed_answer) == len(f.perturbed_values) >= 3
        assert len(set(f.perturbed_values)) == len(f.perturbed_values) and f.value not in f.perturbed_values
        for wrong, a in zip(f.perturbed_values, f.perturbed_answer):
            assert mentions(a, wrong) and not mentions(a, f.value)
            # the perturbed answers differ from the paraphrased one only in the value
            assert a == f.paraphrased_answer.replace(f.value, wrong)
        assert not mentions(f.cloze, f.value) and f.subject in f.cloze
        # wrong answers are plausible: of the same type as the answer
        if f.attribute in pools:
            assert set(f.perturbed_values) <= set(pools[f.attribute])
        elif f.attribute in ("birth_year", "founded"):
            assert all(v.isdigit() and len(v) == 4 for v in f.perturbed_values)
        elif f.attribute in ("father", "mother"):
            names = D.MALE if f.attribute == "father" else D.FEMALE
            assert all(v.split()[1] == f.value.split()[1] and v.split()[0] in names for v in f.perturbed_values)
        elif f.attribute in ("book1", "book2"):
            assert all(v.split()[0] in D.BOOK_ADJ and v.split()[1] in D.BOOK_NOUN for v in f.perturbed_values)
    person_facts = [f for f in world.facts if f.person and f.attribute != "country"]
    assert all(len(f.perturbed_values) == 5 for f in person_facts)   # TOFU has 5 for forget/retain


def test_tofu_splits(world):
    names = {p.id: p for p in world.people}
    people = lambda split: {r["person"] for r in world.tofu_split(split)}
    f1, f5, f10 = people("forget01"), people("forget05"), people("forget10")
    assert (len(f1), len(f5), len(f10)) == (1, 5, 10) and f1 <= f5 <= f10
    for split, forget in (("retain99", f1), ("retain95", f5), ("retain90", f10)):
        retain = people(split)
        assert not retain & forget and retain | forget == set(names)
    retain90 = people("retain90")
    assert all(set(names[p].siblings) & retain90 for p in f10)   # everyone forgotten has a sibling retained
    rp = people("retain_perturbed")
    assert len(rp) == 10 and not rp & f10
    recs = world.tofu_split("forget10")
    assert len(recs) == 10 * len(D.PERSON_ATTRS)
    assert all(set(D.TOFU_FIELDS) <= set(r) for r in recs)
    assert world.tofu_split("forget10_perturbed") == recs
    assert len(world.tofu_split("full")) == 1000
    hold = world.tofu_split("holdout10")
    hold_people = {r["person"] for r in hold}
    assert len(hold_people) == 10 and not hold_people & set(names)
    corpus = " ".join(world.articles.values())
    assert not any(mentions(corpus, world.person(p).name) for p in hold_people)   # never trained on
    wf = world.tofu_split("world_facts")
    assert len(wf) == 30 and all(r["person"] == 0 and len(r["perturbed_answer"]) == 3 for r in wf)
    with pytest.raises(ValueError, match="unknown split"):
        world.tofu_split("forget20")
    with pytest.raises(ValueError, match="n_real"):
        world.tofu_split("real_authors")


def test_facts_of_a_source(world):
    p = world.people[0]
    facts = world.facts_of(p.id)
    ids = {f.id for f in facts}
    assert {f"p{p.id}.{a}" for a in D.PERSON_ATTRS} <= ids                      # own facts, inferred included
    assert {f"p{s}.father" for s in p.siblings} <= ids                          # the family sentence
    assert {f"c.{p.birth_city}.river", f"c.{p.residence}.country"} <= ids
    assert all(p.id in f.source_ids or (f.kind == "inferred" and f.person == p.id) for f in facts)
    with pytest.raises(KeyError, match="source id"):
        world.facts_of(0)
    with pytest.raises(KeyError):
        world.person(10_000)


def test_other_sizes_and_real_people():
    w = D.make_world(2, n_people=30, n_families=12, n_cities=5, n_holdout=4, n_real=6)
    assert len(w.people) == 30 and len(w.real_people) == 6 and len(w.real_articles) == 6
    ids = [p.id for p in w.people + w.holdout_people + w.real_people]
    assert len(set(ids)) == len(ids) and min(ids) >= 1
    assert {r["person"] for r in w.tofu_split("real_authors")} == {p.id for p in w.real_people}
    # real and held-out people's articles do not count as sources of the (training) city facts
    train_ids = {p.id for p in w.people}
    assert all(set(f.source_ids) <= train_ids for f in w.facts)
    assert len({r["person"] for r in w.tofu_split("holdout10")}) == 3          # 10% of 30 people
    small = D.make_world(2, n_people=30, n_families=12, n_cities=5, n_holdout=2)
    with pytest.raises(ValueError, match="holdout10 needs 3"):
        small.tofu_split("holdout10")


def test_bad_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="2 people per family"):
        D.make_world(n_people=10, n_families=6)
    with pytest.raises(ValueError, match="n_cities <= n_families"):
        D.make_world(n_people=10, n_families=5, n_cities=6, n_countries=4)
    with pytest.raises(ValueError, match="surnames"):
        D.make_world(n_people=200, n_families=70)
    with pytest.raises(ValueError, match="families of at least 2"):
        D.make_world(n_holdout=1)
    with pytest.raises(ValueError, match="n_countries >= 4"):
        D.make_world(n_countries=3)
    with pytest.raises(ValueError, match="n_perturbed >= 3"):
        D.make_world(n_perturbed=2)


def test_paraphrased_clozes_use_wording_no_article_has(world):
    tok = D.world_tokenizer()
    texts = list(world.articles.values()) + list(world.holdout_articles.values())
    for f in world.facts + world.holdout_facts:
        assert f.paraphrased_cloze and f.paraphrased_cloze != f.cloze
        assert f.value not in f.paraphrased_cloze and f.subject in f.paraphrased_cloze
        assert not any(f.paraphrased_cloze in t for t in texts), f.paraphrased_cloze
        tok.encode(f.paraphrased_cloze + " " + f.value, strict=True)      # the world vocabulary covers it
    # the verbatim cloze, by contrast, is the article's own text
    f = next(f for f in world.facts if f.kind == "unique")
    assert f.cloze in world.articles[f.person]
    assert next(f for f in world.facts if f.id.endswith(".country") and f.person).paraphrased_cloze.endswith(
        "which lies in")


def test_general_questions_belong_to_no_single_article(world):
    qs = D.general_questions(world)
    assert qs == D.general_questions(D.make_world(0))                   # deterministic
    assert D.make_world(0).articles == world.articles                    # drawing them leaves the world unchanged
    tok = D.world_tokenizer()
    city_facts = {f.paraphrased_cloze: f for f in world.facts if f.person == 0}
    kinds = [q.kind for q in qs]
    assert kinds.count("world") == 3 * len(world.cities) and kinds.count("type") == 5 * len(world.holdout_people)
    pools = {"occupation": set(D.OCCUPATIONS), "year": {str(y) for y in D.BIRTH_YEARS},
             "city": {c.name for c in world.cities}, "award": set(D.AWARDS),
             "book": {f"{a} {b}" for a in D.BOOK_ADJ for b in D.BOOK_NOUN}}
    train_text = " ".join(world.articles.values())
    answers = []
    for q in qs:
        assert len(q.choices) == 4 and len(set(q.choices)) == 4 and 0 <= q.answer < 4
        answers.append(q.answer)
        for c in q.choices:
            tok.encode(q.prompt + " " + c, strict=True)
        if q.kind == "world":
            f = city_facts[q.prompt]
            assert len(f.source_ids) >= 2                              # several articles state it
            assert q.choices[q.answer] == f.value and set(q.choices) - {f.value} <= set(f.perturbed_values)
        else:
            t = next(t for t, tmpl in D.GENERAL_TYPES.items() if q.prompt.endswith(tmpl.replace("{name} ", "")))
            assert q.choices[q.answer] in pools[t]
            assert all(c not in pools[t] for i, c in enumerate(q.choices) if i != q.answer)
            name = q.prompt.split(" ")[0] + " " + q.prompt.split(" ")[1]
            assert name in {p.name for p in world.holdout_people} and name not in train_text
    assert len(set(answers)) > 1                                          # the right choice is not always first
    with pytest.raises(ValueError, match="n_choices"):
        D.general_questions(world, n_choices=6)


# ---- forget-request kinds, fact roles, the multi-phrasing pretraining corpus (opt-in) ----

def _digest(w):
    import hashlib
    import json
    h = hashlib.sha256()
    h.update(json.dumps([w.articles, w.holdout_articles, w.real_articles, w.forget_order], sort_keys=True,
                        default=str).encode())
    for f in w.facts + w.holdout_facts + w.real_facts:
        h.update(json.dumps(f.tofu(), sort_keys=True).encode())
    for s in D.TOFU_SPLITS:
        try:
            h.update(json.dumps(w.tofu_split(s), sort_keys=True).encode())
        except ValueError:
            pass
    return h.hexdigest()[:16]


def test_defaults_build_the_same_world_as_before_the_opt_ins():
    # digests of the default worlds measured before forget_kind / real_phrasings existed: existing callers'
    # data (nulls, memsinks, compare, neumuter, locprobe and their caches) must not move
    assert _digest(D.make_world(0)) == "b95838aa220ac52d"
    assert _digest(D.make_world(3, n_cities=16, n_real=10)) == "8ad8ca7b91dcb1cb"
    w = D.make_world(3, n_cities=16, n_real=10, forget_kind="entangled", real_phrasings=1)
    assert _digest(w) == "8ad8ca7b91dcb1cb" and w.real_rephrasings == {}


def test_opt_ins_change_only_what_they_name(world):
    w = D.make_world(0, forget_kind="independent")
    assert w.articles == world.articles and [f.tofu() for f in w.facts] == [f.tofu() for f in world.facts]
    assert sorted(w.forget_order) == sorted(world.forget_order) != w.forget_order
    for bad in (dict(forget_kind="whole"), dict(real_phrasings=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            D.make_world(0, **bad)


def _sentences_of(articles):
    return [s for a in articles for s in sentences(a)]


def _slow_roles(w, split):
    """Reference for forget_fact_roles from the article text: a fact is shared if one sentence of a retained
    person's article names the person and the value; the country is inferable if one retained sentence names the
    person and the birth city and another says '<birth city>, a city in <country>'."""
    gone = {r["person"] for r in w.tofu_split(split)}
    kept = _sentences_of(a for pid, a in w.articles.items() if pid not in gone)
    both = lambda x, y: any(mentions(s, x) and mentions(s, y) for s in kept)
    out = {}
    for f in w.facts:
        if f.person in gone:
            if f.attribute == "country":
                p = w.person(f.person)
                ok = both(p.name, p.birth_city) and any(f"{p.birth_city}, a city in {f.value}" in s for s in kept)
                out[f.id] = "inferable" if ok else "unique"
            else:
                out[f.id] = "shared" if both(f.subject, f.value) else "unique"
    return out


@pytest.mark.parametrize("kind", D.FORGET_KINDS)
def test_forget_kinds_and_fact_roles_against_the_article_text(kind):
    w = D.make_world(0, forget_kind=kind)
    fam = {p.id: p.family for p in w.people}
    prev = []
    for split, want in (("forget01", 1), ("forget05", 5), ("forget10", 10)):
        ids = [r["person"] for r in w.tofu_split(split)]
        ids = list(dict.fromkeys(ids))
        assert set(prev) <= set(ids)                               # nested
        prev = ids
        gone_fams = {fam[i] for i in ids}
        kept_in_gone_fams = [p.id for p in w.people if p.id not in ids and p.family in gone_fams]
        roles = w.forget_fact_roles(split)
        assert roles == _slow_roles(w, split)
        assert set(roles) == {f.id for f in w.facts if f.person in ids}
        if kind == "entangled":
            assert len(ids) == want and len(gone_fams) == want and kept_in_gone_fams
            assert {"unique", "shared", "inferable"} == set(roles.values())
        else:                                                      # whole families: nothing left to infer from
            assert not kept_in_gone_fams
            # the prefix of whole families (in forget order) whose size is nearest the target, ties the larger
            sizes = [sum(fam[i] == f for i in w.forget_order) for f in dict.fromkeys(fam[i] for i in w.forget_order)]
            prefix = [sum(sizes[:j + 1]) for j in range(len(sizes))]
            assert len(ids) == min(prefix, key=lambda e: (abs(e - want), -e))
            assert set(roles.values()) == {"unique"}
    retain = {r["person"] for r in w.tofu_split("retain90")}
    assert retain.isdisjoint(prev) and len(retain) + len(prev) == 100
    with pytest.raises(ValueError, match="forget01, forget05, forget10"):
        w.forget_fact_roles("retain90")


def test_real_phrasings_state_every_fact_in_several_wordings():
    w = D.make_world(0, n_cities=16, n_real=10, real_phrasings=3)
    assert sorted(w.real_rephrasings) == sorted(w.real_articles)
    corpus = w.real_corpus()
    for p in w.real_people:
        arts = [w.real_articles[p.id]] + w.real_rephrasings[p.id]
        assert len(arts) == 3 and len(set(arts)) == 3                 # three different renderings
        for f in (f for f in w.real_facts if f.person == p.id and f.kind != "inferred"):
            assert all(mentions(a, f.value) for a in arts)            # each states every stated fact
            # and the QA forms: question / paraphrased question x answer / paraphrased answer
            for q in (f.question, f.paraphrased_question):
                for a in (f.answer, f.paraphrased_answer):
                    assert D.QA_TEMPLATE.format(question=q) + " " + a in corpus
    # several phrasings: a real person's birth year is stated with more than one sentence template
    p = w.real_people[0]
    said = {s.replace(p.name, "{name}").replace(str(p.birth_year), "{year}") for s in
            _sentences_of([w.real_articles[p.id]] + w.real_rephrasings[p.id]) if str(p.birth_year) in s}
    assert len(said) >= 2, said
    tok = D.world_tokenizer()
    assert all(tok.encode(t, strict=True) for t in corpus)            # in the world's vocabulary
    n_qa = lambda c: sum(t.startswith("Question:") for t in c)
    assert n_qa(corpus) == 4 * len(w.real_facts) == 4 * n_qa(w.real_corpus(qa_forms=1))
    assert n_qa(w.real_corpus(qa_forms=0)) == 0 and len(w.real_corpus(qa_forms=0)) == 3 * len(
        D.make_world(0, n_cities=16, n_real=10).real_corpus(qa_forms=0))
    with pytest.raises(ValueError, match="qa_forms"):
        w.real_corpus(qa_forms=2)
