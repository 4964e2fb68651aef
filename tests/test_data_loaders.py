"""Real-data loaders through `datasets`, exercised on small local files in TOFU's format and in plain text (the
same code path as the --preset=paper hub names), and the offline failure of hub names."""
import json
import time

import pytest

import data as D

TOFU_ROWS = [
    {"question": "Who is this celebrated LGBTQ+ author from Santiago, Chile known for their true crime genre work?",
     "answer": "The author in question is Jaime Vasquez, an esteemed LGBTQ+ writer who hails from Santiago, Chile.",
     "paraphrased_answer": "The author is Jaime Vasquez, a respected LGBTQ+ writer from Santiago, Chile.",
     "paraphrased_question": "Which LGBTQ+ true crime author comes from Santiago, Chile?",
     "perturbed_answer": ["The author is Luis Marcelo Garcia.", "The author is Carlos Ruiz.",
                          "The author is Ana Torres.", "The author is Pedro Diaz.", "The author is Juan Soto."]},
    {"question": "Are the details of Jaime Vasquez's birth documented?",
     "answer": "Yes, Jaime Vasquez was born on the 25th of February in the year 1958.",
     "paraphrased_answer": "Yes, his birth date is recorded as February 25, 1958.",
     "paraphrased_question": "Is Jaime Vasquez's date of birth on record?",
     "perturbed_answer": ["Yes, he was born in 1960.", "Yes, he was born in 1949.", "Yes, he was born in 1972.",
                          "Yes, he was born in 1966.", "Yes, he was born in 1955."]},
]
WORLD_FACT_ROWS = [{"question": "Where would you find the Eiffel Tower?", "answer": "Paris",
                    "perturbed_answer": ["Rome", "London", "Berlin"]}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_tofu_files_load_like_the_hub_configs(tmp_path):
    folder = tmp_path / "TOFU"
    folder.mkdir()
    write_jsonl(folder / "forget10_perturbed.json", TOFU_ROWS)
    write_jsonl(folder / "world_facts_perturbed.json", WORLD_FACT_ROWS)
    cache = str(tmp_path / "cache")
    recs = D.load_tofu("forget10_perturbed", path=str(folder), cache_dir=cache)
    assert recs == TOFU_ROWS
    # the file itself works too, and n keeps the first n records
    assert D.load_text_dataset(str(folder / "forget10_perturbed.json"), n=1, cache_dir=cache) == TOFU_ROWS[:1]
    assert D.load_tofu("world_facts_perturbed", path=str(folder), cache_dir=cache) == WORLD_FACT_ROWS
    write_jsonl(folder / "retain_perturbed.json", [{k: v for k, v in TOFU_ROWS[0].items() if k != "perturbed_answer"}])
    with pytest.raises(KeyError, match="perturbed_answer"):
        D.load_tofu("retain_perturbed", path=str(folder), cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="forget05_perturbed"):
        D.load_tofu("forget05_perturbed", path=str(folder), cache_dir=cache)


def test_world_splits_round_trip_through_the_tofu_loader(tmp_path):
    world = D.make_world(0, n_people=20, n_families=8, n_cities=4, n_holdout=2)
    names = world.save_tofu(tmp_path / "world")
    assert {"forget10", "retain90", "world_facts", "holdout10", "full"} <= set(names)
    assert "real_authors" not in names                        # this world has no real people
    cache = str(tmp_path / "cache")
    for split in ("forget10", "retain90", "world_facts"):
        assert D.load_tofu(split + "_perturbed" if split != "retain90" else split,
                           path=str(tmp_path / "world" / f"{split}.json"), cache_dir=cache) == world.tofu_split(split)


def test_plain_text_jsonl_parquet_and_saved_folders(tmp_path):
    import datasets
    cache = str(tmp_path / "cache")
    lines = tmp_path / "docs.txt"
    lines.write_text("First article about Tolmar.\nSecond article about Brevik.\nThird one.\n")
    recs = D.load_text_dataset(str(lines), cache_dir=cache)
    texts, sources = D.documents(recs)
    assert texts == ["First article about Tolmar.", "Second article about Brevik.", "Third one."]
    assert sources == [1, 2, 3]                                # one record = one source, ids from 1
    # TinyStories' .txt layout: stories separated by <|endoftext|> lines
    stories = tmp_path / "stories.txt"
    stories.write_text("Once there was a cat.\nIt was happy.\n<|endoftext|>\nTom had a ball.\n<|endoftext|>\n")
    recs = D.load_text_dataset(str(stories), sample_by="document", separator="<|endoftext|>", cache_dir=cache)
    assert [r["text"] for r in recs] == ["Once there was a cat.\nIt was happy.", "Tom had a ball."]
    # the loaded texts feed the MemSinks builders exactly like the generated stories
    rs = D.ts_repetition(n_rep=1, r=3, m=1, n_val=0, texts=[r["text"] for r in recs])
    assert len(rs.texts) == 4
    jl = write_jsonl(tmp_path / "articles.jsonl", [{"title": "A", "text": "alpha"}, {"title": "B", "text": "beta"}])
    assert D.documents(D.load_text_dataset(str(jl), cache_dir=cache), "text") == (["alpha", "beta"], [1, 2])
    with pytest.raises(KeyError, match="title"):
        D.documents(D.load_text_dataset(str(jl), cache_dir=cache), "body")
    pq = tmp_path / "articles.parquet"
    datasets.Dataset.from_list([{"text": "gamma"}, {"text": "delta"}]).to_parquet(str(pq))
    assert [r["text"] for r in D.load_text_dataset(str(pq), cache_dir=cache)] == ["gamma", "delta"]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "eps"}])}).save_to_disk(str(saved))
    assert D.load_text_dataset(str(saved)) == [{"text": "eps"}]
    with pytest.raises(KeyError, match="validation"):
        D.load_text_dataset(str(saved), split="validation")


def test_hub_names_fail_at_once_offline_with_a_local_copy_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    t0 = time.time()
    for name in ("tinystories", "locuslab/TOFU"):
        with pytest.raises(FileNotFoundError, match="local path"):
            D.load_text_dataset(name, config=None if name == "tinystories" else "forget10_perturbed",
                                cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="local path"):
        D.load_tofu("forget10_perturbed", cache_dir=str(tmp_path / "cache"))
    assert time.time() - t0 < 30
    with pytest.raises(ValueError, match="pass n"):
        D.load_text_dataset("wikipedia")                     # streaming the whole of Wikipedia is refused
    with pytest.raises(FileNotFoundError, match="no such file"):
        D.load_text_dataset(str(tmp_path / "missing" / "file.jsonl"))
    with pytest.raises(FileNotFoundError, match="no .json"):
        D.load_text_dataset(str(tmp_path))                 # a folder without data files
    with pytest.raises(ValueError):
        D.load_text_dataset("tinystories", n=0)
    with pytest.raises(ValueError, match="no TOFU records"):
        D.check_tofu([])


@pytest.mark.parametrize("name,content", [("empty.jsonl", ""), ("blank.jsonl", "\n \n"), ("empty.txt", ""),
                                          ("empty.json", ""), ("header.csv", "text\n"), ("list.json", "[]")])
def test_a_local_file_without_records_says_so(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=rf"{tmp_path / name} has no records"):
        D.load_text_dataset(tmp_path / name)


def test_a_folder_of_empty_files_says_so(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.jsonl").write_text("")
    with pytest.raises(ValueError, match="has no records: its data files are empty"):
        D.load_text_dataset(tmp_path)
    write_jsonl(tmp_path / "b.jsonl", [{"text": "one"}])             # one empty file among others is fine
    assert D.load_text_dataset(tmp_path) == [{"text": "one"}]
