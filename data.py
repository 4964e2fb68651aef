"""
Data for every paper script: tokenizers, the built-in synthetic data (a fictional world of people and cities;
children's stories from a small grammar), loaders for the real data sets through `datasets`, and batching with
per-token document and source ids.

Built-in data (the default; nothing is downloaded, everything is deterministic from a seed):
- make_world(seed): people are the sources (source id >= 1; 0 is never a source because the sink-mask hash
  treats id 0 specially). Each person has an encyclopedia-style article; each fact has a TOFU-style QA
  record, a cloze prompt, its kind (unique / shared / inferred) and the ids of the articles that state it.
- make_stories(n, seed), ts_repetition(...), ts_canary(...): TinyStories in miniature for MemSinks/NeuMuter.
- world_tokenizer(), stories_tokenizer(): word-level vocabularies derived from the generators' word lists
  (independent of the seed), exact round trip on generated text.
- HFTokenizer: a pretrained checkpoint's own tokenizer with the same interface plus chat() (hf.load_pretrained).

What the defaults cost (measured; world = make_world(0), word-level tokens, one <eos> per document):
- vocabulary: world 470 tokens, stories 236 (specials included; the same for every seed and size).
- world: 100 people in 40 families (20 of 2, 20 of 3), 10 cities in 4 countries, 10 held-out people. Articles
  are 82-104 words, 10 sentences: 10,830 tokens per epoch (96-119 per article). QA: 1,000 person QA pairs
  (10 per person: 6 unique, 3 shared, 1 inferred) formatted "Question: q\nAnswer: a" + <eos> are 22,600 tokens
  per epoch (9,400 answer + eos labels); the 30 city QA pairs 550 tokens.
- stories: 40-80 words, 55-96 tokens (77 on average).
- recall of unique facts: model.GPT with 4 layers, n_embd 128, 4 heads, d_ff 512, AdamW lr 3e-3, betas
  (0.9, 0.95), wd 0.1, batch 20 articles one per row, 2 epochs warmup then cosine to 10% over 40 epochs (200
  steps, about 3 min on 2 contended CPU cores with 1 thread). Stand-alone cloze prompts (Fact.cloze), greedy
  accuracy on the whole value / fraction whose value beats the geometric mean of the perturbed values:
    articles cut into sentence segments (split_ids={tok.stoi["."]}):
      gpt2 flavor: epoch 20 0.26 / 0.95, epoch 30 0.75 / 1.00, epoch 35 0.92 / 1.00, epoch 40 0.975 / 1.00
      llama flavor: epoch 20 0.45 / 0.98, epoch 25 0.78 / 1.00, epoch 30 0.96 / 1.00
      (shared facts 0.98-0.99, inferred countries 0.96-1.00 greedy by epoch 30)
    whole articles as one attention context (no split_ids): the articles are memorized (loss 0.01, every
    unique fact recalled after its own article's preceding text) but stand-alone recall stays low: gpt2 0.09 /
    0.69 after 80 epochs, llama 0.18 / 0.78 after 60. The model keys facts on their article's context, not on
    the name in the sentence, so train on sentence segments when facts are probed with cloze prompts.
  So: about 35 epochs (gpt2) / 30 epochs (llama) to recall >90% of the unique facts word for word.
"""
import functools
import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch

# -------------------------------------------------------------------------------------------------
# Tokenizers
# -------------------------------------------------------------------------------------------------

# words, a leading-apostrophe suffix ('s), newlines and single punctuation marks are tokens
_WORD_RE = re.compile(r"'[a-z]+|[A-Za-z0-9]+|\n|[^\sA-Za-z0-9]")
_ATTACH_LEFT = {".", ",", "?", "!", ":", ";", "\n"}   # written without a space before them


class WordTokenizer:
    """
    Word-level tokenizer for the built-in data. Ids 0, 1, 2 are <pad>, <eos>, <unk>; then the words in the
    order given (from_texts / world_tokenizer sort them, so the vocabulary is deterministic).
    Round trip is exact on canonical text: words separated by single spaces, punctuation and 's attached to
    the word before, newlines without surrounding spaces. The generators only write canonical text.
    """
    SPECIALS = ("<pad>", "<eos>", "<unk>")

    def __init__(self, words):
        words = list(words)
        if len(set(words)) != len(words):
            raise ValueError("duplicate words in the vocabulary")
        bad = [w for w in words if w in self.SPECIALS or _WORD_RE.fullmatch(w) is None]
        if bad:
            raise ValueError(f"not single word tokens (or reserved): {bad[:5]}")
        self.itos = list(self.SPECIALS) + words
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.eos_id, self.unk_id = 0, 1, 2

    @classmethod
    def from_texts(cls, texts):
        """Vocabulary = every token of the texts, sorted."""
        return cls(sorted({t for s in texts for t in _WORD_RE.findall(s)}))

    @property
    def vocab_size(self):
        return len(self.itos)

    def encode(self, text, strict=False):
        """str -> list of ids; unknown words become <unk> (strict=True raises instead)."""
        ids = []
        for tok in _WORD_RE.findall(text):
            i = self.stoi.get(tok)
            if i is None:
                if strict:
                    raise KeyError(f"word {tok!r} is not in the vocabulary")
                i = self.unk_id
            ids.append(i)
        return ids

    def decode(self, ids, stop_at_eos=False):
        """ids -> str (specials are written by name; stop_at_eos cuts at the first <eos>)."""
        out, prev = [], None
        for i in (ids.tolist() if torch.is_tensor(ids) else ids):
            i = int(i)
            if stop_at_eos and i == self.eos_id:
                break
            if not 0 <= i < len(self.itos):
                raise ValueError(f"token id {i} is outside the vocabulary (size {len(self.itos)})")
            tok = self.itos[i]
            if prev is not None and tok not in _ATTACH_LEFT and not tok.startswith("'") and prev != "\n":
                out.append(" ")
            out.append(tok)
            prev = tok
        return "".join(out)

    def state_dict(self):
        return {"kind": "word", "words": self.itos[len(self.SPECIALS):]}

    @classmethod
    def from_state_dict(cls, d):
        if d.get("kind") != "word":
            raise ValueError(f"not a word tokenizer state: kind={d.get('kind')!r}")
        return cls(d["words"])


# The GPT-2 pre-tokenization pattern (tiktoken's r50k_base / gpt2 pat_str).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_RANKS_ENV = "UNLEARNABLE_GPT2_RANKS"
EOT = "<|endoftext|>"


class GPT2Tokenizer:
    """
    GPT-2 BPE through tiktoken, with WordTokenizer's interface. Where the ranks come from, first found wins:
      1. mergeable_ranks given directly (tests build a tiny table by hand),
      2. ranks_path (a config field), then the environment variable UNLEARNABLE_GPT2_RANKS: a file in
         tiktoken's format, e.g. gpt2.tiktoken / r50k_base.tiktoken (same ranks as "gpt2"),
      3. tiktoken.get_encoding("gpt2") (downloads or reads tiktoken's cache).
    A file given but missing, or nothing loading, is an error that says what to pass. There is no silent
    fallback to any other path. <|endoftext|> (id = number of ranks, 50256 for GPT-2) is eos; GPT-2 has no
    pad token, so pad_id = eos_id (padding is masked by -100 labels and doc id -1 anyway).
    """

    def __init__(self, ranks_path=None, *, mergeable_ranks=None, pat_str=GPT2_PAT_STR, name="gpt2"):
        import tiktoken
        self.ranks_path, self.inline = None, None
        if mergeable_ranks is None:
            path = ranks_path or os.environ.get(GPT2_RANKS_ENV) or None
            if path is not None:
                path = str(Path(path).expanduser())
                if not Path(path).is_file():
                    raise FileNotFoundError(f"GPT-2 ranks file {path!r} does not exist (from ranks_path or "
                                            f"${GPT2_RANKS_ENV}); pass the path of a gpt2.tiktoken file")
                from tiktoken.load import load_tiktoken_bpe
                mergeable_ranks, self.ranks_path = load_tiktoken_bpe(path), path
        else:
            self.inline = {"mergeable_ranks": dict(mergeable_ranks), "pat_str": pat_str, "name": name}
        if mergeable_ranks is not None:
            n = len(mergeable_ranks)
            self.enc = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                                         special_tokens={EOT: n}, explicit_n_vocab=n + 1)
        else:
            try:
                self.enc = tiktoken.get_encoding("gpt2")
            except Exception as e:  # no network and no cache: say what to do instead
                raise RuntimeError(
                    f"could not load the GPT-2 BPE: tiktoken.get_encoding('gpt2') failed ({type(e).__name__}: "
                    f"{str(e)[:200]}). Pass ranks_path=<gpt2.tiktoken> or set {GPT2_RANKS_ENV}=<file>.") from e
        self.eos_id = self.pad_id = self.enc.eot_token

    @property
    def vocab_size(self):
        return self.enc.n_vocab

    def encode(self, text):
        # ordinary text only: a literal "<|endoftext|>" inside data is not turned into the special token
        return self.enc.encode_ordinary(text)

    def decode(self, ids, stop_at_eos=False):
        ids = [int(i) for i in (ids.tolist() if torch.is_tensor(ids) else ids)]
        if stop_at_eos and self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.enc.decode(ids)

    def state_dict(self):
        # a checkpoint stores where the ranks came from (50k ranks inline would bloat every checkpoint),
        # except for hand-made tables, which are stored whole
        return {"kind": "tiktoken", "ranks_path": self.ranks_path, "inline": self.inline,
                "vocab_size": self.vocab_size}

    @classmethod
    def from_state_dict(cls, d):
        if d.get("kind") != "tiktoken":
            raise ValueError(f"not a tiktoken tokenizer state: kind={d.get('kind')!r}")
        if d.get("inline"):
            tok = cls(**d["inline"])
        else:
            path = d.get("ranks_path")
            tok = cls(path if path and Path(path).is_file() else None)  # moved machines: env var / tiktoken
        if tok.vocab_size != d["vocab_size"]:
            raise ValueError(f"restored tokenizer has {tok.vocab_size} tokens, checkpoint says {d['vocab_size']}")
        return tok


@functools.lru_cache(maxsize=16)
def _chat_template(template):
    """A chat template compiled in the jinja2 environment that transformers' apply_chat_template documents and
    uses: the immutable sandbox (a template comes with the checkpoint: untrusted code), trim_blocks and
    lstrip_blocks (a block tag's own line break and leading indentation are not output), the loop-controls
    extension ({% break %}, {% continue %}), raise_exception(message), a tojson filter that keeps non-ASCII and
    HTML characters and the key order, and {% generation %} blocks (transformers' assistant-mask markers)
    rendered as their contents. namespace() and dict() are jinja2's own (the sandbox refuses their underscore
    attributes). Cached by the template text; the instance holds only the text (picklable)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, Generation])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    # Where we differ from transformers on purpose: it also defines strftime_now(format) (today's date). We leave it
    # undefined so that templates which test `strftime_now is defined` (Llama 3.1 / 3.2: "Today Date: ...") take
    # their fallback date ("26 Jul 2024") and a prompt, and so every metric computed on it, is the same on every day.
    return env.from_string(template)


class HFTokenizer:
    """
    A pretrained checkpoint's own tokenizer (the `tokenizers` library: a tokenizer.json, or a byte-level BPE that
    hf.py builds from a GGUF file's vocabulary and merges), with WordTokenizer's interface plus chat().
    - encode(text) is the ordinary text only (no BOS/EOS added, like GPT2Tokenizer); encode(text, True) adds
      what the checkpoint's post-processor adds (Llama 3: <|begin_of_text|>), the same as HF's tokenizer(text).
      Special tokens written in the text (<|im_start|>, ...) ARE recognized, as HF's tokenizers do: chat() strings
      are built from them.
    - bos_id: the token encode(text, True) puts first, or None when the checkpoint adds none (SmolLM2).
    - chat(question): the model's chat template (any jinja template: ChatML, Llama 3, Mistral, ...) rendered for
      one user turn with the assistant turn opened, as transformers' apply_chat_template(..., add_generation_prompt
      =True) renders it, except that no date function is given (see _chat_template); a model without a template
      gets the plain question.
    - special_tokens: the checkpoint's named special tokens as strings ({"bos_token": ..., "eos_token": ...}, from
      tokenizer_config.json or the GGUF's ids), the variables a chat template sees besides the messages. When not
      given: eos, pad and (when the post-processor adds one) bos as their tokens, what save_hf writes.
    The state stores the whole tokenizer.json (a few MB) so a checkpoint restores without the original folder.
    """

    def __init__(self, tokenizer_json, *, eos_id, pad_id=None, chat_template=None, special_tokens=None, name=""):
        from tokenizers import Tokenizer
        self.json, self.name, self.chat_template = tokenizer_json, name, chat_template
        self.tk = Tokenizer.from_str(tokenizer_json)
        if not 0 <= int(eos_id) < self.vocab_size:
            raise ValueError(f"eos_id {eos_id} is outside the tokenizer's vocabulary (size {self.vocab_size})")
        self.eos_id = int(eos_id)
        self.pad_id = self.eos_id if pad_id is None else int(pad_id)   # padding is masked anyway (-100, doc id -1)
        plain, full = self.tk.encode("a", add_special_tokens=False).ids, self.tk.encode("a").ids
        self.bos_id = full[0] if len(full) > len(plain) and full[1:len(plain) + 1] == plain else None
        if special_tokens is None:
            special_tokens = {"eos_token": self.token(self.eos_id), "pad_token": self.token(self.pad_id)}
            if self.bos_id is not None:
                special_tokens["bos_token"] = self.token(self.bos_id)
        self.special_tokens = {k: str(v) for k, v in special_tokens.items() if v is not None}
        self.chat("x")      # a template that does not compile or render fails here, at load time, not mid-run

    @property
    def vocab_size(self):
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text, add_special_tokens=False):
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, stop_at_eos=False):
        ids = [int(i) for i in (ids.tolist() if torch.is_tensor(ids) else ids)]
        if stop_at_eos and self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:     # `tokenizers` would drop them silently (a model's embedding may be larger than the vocabulary)
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (size {self.vocab_size})")
        return self.tk.decode(ids, skip_special_tokens=False)

    def token(self, i):
        return self.tk.id_to_token(int(i))

    def chat(self, question):
        if not self.chat_template:
            return question
        try:
            return _chat_template(self.chat_template).render(
                messages=[{"role": "user", "content": str(question)}], tools=None, documents=None,
                add_generation_prompt=True, **self.special_tokens)
        except Exception as e:      # jinja2's TemplateError (syntax, raise_exception(...)), SecurityError, ...
            raise ValueError(f"chat template of {self.name or 'this tokenizer'} failed to render one user turn "
                             f"({type(e).__name__}: {e}): {self.chat_template[:120]!r}...") from e

    def state_dict(self):
        return {"kind": "hf", "json": self.json, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "chat_template": self.chat_template, "special_tokens": self.special_tokens, "name": self.name}

    @classmethod
    def from_state_dict(cls, d):
        if d.get("kind") != "hf":
            raise ValueError(f"not a Hugging Face tokenizer state: kind={d.get('kind')!r}")
        return cls(d["json"], eos_id=d["eos_id"], pad_id=d["pad_id"], chat_template=d["chat_template"],
                   special_tokens=d.get("special_tokens"), name=d.get("name", ""))   # older states: derived


def load_tokenizer(state):
    """Restore a tokenizer from its state_dict() (as stored in checkpoints)."""
    if not isinstance(state, dict) or "kind" not in state:
        raise ValueError("a tokenizer state must be a dict with a 'kind' key")
    kinds = {"word": WordTokenizer, "tiktoken": GPT2Tokenizer, "hf": HFTokenizer}
    if state["kind"] not in kinds:
        raise ValueError(f"unknown tokenizer kind {state['kind']!r}; known: {sorted(kinds)}")
    return kinds[state["kind"]].from_state_dict(state)


# -------------------------------------------------------------------------------------------------
# The fictional world: word lists and templates (all invented names; no entity string repeats across lists)
# -------------------------------------------------------------------------------------------------

FEMALE = ["Anna", "Clara", "Dora", "Edith", "Ella", "Freya", "Greta", "Hanna", "Ida", "Ilse", "Jana", "Kira",
          "Lena", "Lotte", "Maren", "Mila", "Nora", "Olga", "Paula", "Rosa", "Selma", "Thea", "Vera", "Wilma"]
MALE = ["Anton", "Bruno", "Carl", "Dario", "Emil", "Felix", "Georg", "Hugo", "Ivo", "Jonas", "Karl", "Lars",
        "Milo", "Nils", "Oskar", "Paul", "Rasmus", "Sven", "Theo", "Ugo", "Viktor", "Walter", "Xaver", "Yann"]
SURNAMES = ["Aldane", "Barrow", "Brennick", "Calloway", "Dunmore", "Elsworth", "Farrow", "Galloway", "Hartwell",
            "Ingram", "Jessup", "Kestrel", "Larkin", "Merrow", "Norcott", "Oakridge", "Pellham", "Quarry",
            "Redmayne", "Selwood", "Thornbury", "Upton", "Varley", "Whitlock", "Yardley", "Ashcombe", "Blythe",
            "Corwin", "Dalby", "Everly", "Fenwick", "Gresham", "Holloway", "Ibbotson", "Jarrow", "Kettering",
            "Lockhart", "Mayfield", "Netherby", "Ormond", "Prescott", "Ravel", "Stanton", "Tolley", "Underhill",
            "Vance", "Westbrook", "Wexley", "Yelland", "Zimmer", "Abbott", "Birch", "Crane", "Draper", "Ellery",
            "Finch", "Garrick", "Hale", "Ives", "Jolley"]
CITIES = ["Tolmar", "Brevik", "Caldora", "Dunmere", "Eskhaven", "Falwick", "Gorran", "Halvard", "Istren",
          "Jorvale", "Kelmoor", "Lissan", "Morvik", "Norhaven", "Ostrel", "Pelrin"]
COUNTRIES = ["Valdoria", "Estmark", "Quellan", "Sorvia", "Tarnland", "Ulmara", "Brisca", "Orlenia"]
RIVERS = ["Bramble", "Corrin", "Delve", "Elsen", "Fennick", "Glimmer", "Harl", "Ister", "Jessel", "Kell",
          "Lorne", "Mirren", "Nessa", "Oller", "Pell", "Quint"]
OCCUPATIONS = ["baker", "painter", "sailor", "teacher", "doctor", "farmer", "lawyer", "potter", "singer",
               "tailor", "weaver", "carpenter", "gardener", "jeweler", "merchant", "pilot"]
AWARDS = ["Silver Quill Prize", "Golden Lantern Prize", "Iron Compass Medal", "Blue Heron Award",
          "Red Maple Award", "White Falcon Medal", "Green Willow Prize", "Black Swan Medal", "Copper Bell Award",
          "Bright Star Prize", "Ivory Gate Medal", "Stone Bridge Award"]
BOOK_ADJ = ["Silent", "Hidden", "Broken", "Distant", "Forgotten", "Hollow", "Quiet", "Restless", "Scarlet",
            "Shattered", "Sleeping", "Tangled", "Wandering", "Winter", "Burning", "Crooked", "Endless", "Fading",
            "Frozen", "Lonely", "Northern", "Painted", "Secret", "Velvet"]
BOOK_NOUN = ["Harbor", "Garden", "Mirror", "Orchard", "Tower", "Meadow", "Voyage", "Shore", "Island", "Forest",
             "Letter", "Promise", "Window", "Valley", "Kingdom", "Journey", "Castle", "Storm", "Ocean", "Road",
             "Feather", "Crown", "Season", "Door"]
BIRTH_YEARS = list(range(1930, 1990))
FOUNDED_YEARS = list(range(1100, 1800, 25))

# Article sentences. A fact's value always comes after the fact's subject, so the text before the value is a
# usable cloze prompt. Sentences naming facts use the full name (never a pronoun) for the same reason.
T_FAMILY = ["{children} were born in {city} to {father} and {mother}.",
            "{children} are the children of {father} and {mother} and were born in {city}.",
            "{children} grew up in {city}, where they were born to {father} and {mother}."]
T_BIRTH = ["{name} was born in {year}.", "{name} was born in the year {year}.", "The birth year of {name} is {year}."]
T_OCCUPATION = ["{name} works as a {occupation}.", "By trade, {name} is a {occupation}.",
                "{name} earns a living as a {occupation}."]
T_BOOKS = ["{name} wrote {book1} and later {book2}.", "{name} is the author of {book1} and, later, {book2}.",
           "The first book by {name} was {book1}, and the second was {book2}."]
T_AWARD = ["{name} received the {award}.", "In later years {name} won the {award}.",
           "{name} was honored with the {award}."]
T_RESIDENCE = ["{name} now lives in {res}, a city in {res_country}.",
               "Today {name} lives in {res}, a city in {res_country}.",
               "{name} has settled in {res}, a city in {res_country}."]
T_CITY = ["{city} lies on the river {river} and was founded in {founded}.",
          "{city} was founded in {founded} on the river {river}.",
          "{city}, founded in {founded}, stands on the river {river}."]
FILLERS = ["{Pron} enjoys long walks by the river.", "Friends describe {pron} as patient and kind.",
           "{Pron} keeps a small garden behind the house.", "In the evenings {pron} plays the piano.",
           "{Pron} often travels to see old friends.", "{Pron} rarely gives interviews.",
           "{Pron} collects old maps and letters.", "Many young readers admire {poss} work.",
           "{Pron} likes to cook for large dinners.", "{Pron} spends every summer by the sea.",
           "{Pron} has taught many students over the years.", "{Poss} work is read in many schools."]
N_FILLERS = 3

# QA templates per attribute: (question, paraphrased question), (answer, paraphrased answer). The perturbed
# answers use the paraphrased-answer template with wrong values, as in TOFU (truth ratio compares them).
QA = {
    "birth_year": (("In which year was {name} born?", "What is the birth year of {name}?"),
                   ("{name} was born in {v}.", "The birth year of {name} is {v}.")),
    "occupation": (("What is the occupation of {name}?", "What does {name} do for a living?"),
                   ("{name} works as a {v}.", "By trade, {name} is a {v}.")),
    "book1": (("What was the first book written by {name}?", "Which book did {name} write first?"),
              ("The first book by {name} was {v}.", "{name} first wrote {v}.")),
    "book2": (("What was the second book written by {name}?", "Which book did {name} write after {book1}?"),
              ("The second book by {name} was {v}.", "After {book1}, {name} wrote {v}.")),
    "award": (("Which award did {name} receive?", "What prize was {name} honored with?"),
              ("{name} received the {v}.", "{name} was honored with the {v}.")),
    "residence": (("Where does {name} live now?", "In which city has {name} settled?"),
                  ("{name} now lives in {v}.", "{name} has settled in {v}.")),
    "father": (("Who is the father of {name}?", "What is the name of {name}'s father?"),
               ("The father of {name} is {v}.", "{name}'s father is {v}.")),
    "mother": (("Who is the mother of {name}?", "What is the name of {name}'s mother?"),
               ("The mother of {name} is {v}.", "{name}'s mother is {v}.")),
    "birth_city": (("In which city was {name} born?", "What is the home town of {name}?"),
                   ("{name} was born in {v}.", "The home town of {name} is {v}.")),
    "country": (("In which country was {name} born?", "What is the home country of {name}?"),
                ("{name} was born in the country of {v}.", "The home country of {name} is {v}.")),
    "city.country": (("In which country is {city}?", "{city} lies in which country?"),
                     ("{city} is a city in {v}.", "{city} lies in the country of {v}.")),
    "city.river": (("Which river flows through {city}?", "On which river does {city} lie?"),
                   ("The river {v} flows through {city}.", "{city} lies on the river {v}.")),
    "city.founded": (("When was {city} founded?", "In which year was {city} founded?"),
                     ("{city} was founded in {v}.", "The founding year of {city} is {v}.")),
}
# the inferred fact is asked as a cloze that names the (shared) birth city: the step from city to country is
# the shared fact "<city>, a city in <country>" that residents' articles state
CLOZE_COUNTRY = "{name} was born in {city}, a city in"
CLOZE_CITY_COUNTRY = "{city}, a city in"
# Paraphrased cloze prompts: the same facts asked in wording no article uses (the NULLs paper rewrites its
# prompts), built from the world's own vocabulary so the word tokenizer covers them. None of them is a substring
# of any article (tested), so a model that only memorized the article's word sequence does not get them for free.
PARA_CLOZE = {"birth_year": "The birth of {name} was in the year",
              "occupation": "By occupation, {name} is a",
              "book1": "The first book written by {name} is",
              "book2": "The second book written by {name} is",
              "award": "The award received by {name} is the",
              "residence": "The city where {name} now lives is",
              "father": "The father of {name} is",
              "mother": "The mother of {name} is",
              "birth_city": "The home town of {name} is",
              "country": "{name} was born in {city}, which lies in",
              "city.country": "{city} lies in the country of",
              "city.river": "The river of {city} is the",
              "city.founded": "The founding year of {city} is"}
QA_TEMPLATE = "Question: {question}\nAnswer:"

PERSON_ATTRS = ("birth_year", "occupation", "book1", "book2", "award", "residence",
                "father", "mother", "birth_city", "country")
CITY_ATTRS = ("country", "river", "founded")
KINDS = ("unique", "shared", "inferred")


@dataclass(frozen=True)
class City:
    name: str
    country: str
    river: str
    founded: int


@dataclass(frozen=True)
class Person:
    id: int                  # source id (>= 1): the person's article is source `id`
    name: str
    first: str
    surname: str
    gender: str              # "f" or "m" (pronouns in filler sentences)
    family: int
    group: str               # "train" (in world.articles), "holdout" (never trained on) or "real"
    birth_city: str
    birth_year: int
    occupation: str
    books: tuple
    award: str
    residence: str
    father: str
    mother: str
    siblings: tuple          # source ids of the brothers and sisters


@dataclass
class Fact:
    id: str                  # "p7.occupation", "c.Tolmar.river"
    person: int              # source id of the person the fact is about; 0 for a city fact (0 is never a source)
    subject: str             # the person's name or the city's name
    attribute: str
    kind: str                # "unique" (one article), "shared" (>= 2 articles), "inferred" (no article)
    value: str
    question: str
    paraphrased_question: str
    answer: str
    paraphrased_answer: str
    perturbed_answer: list   # wrong answers, paraphrased-answer template (TOFU's field)
    perturbed_values: list   # the wrong values themselves
    cloze: str               # a prompt that the value completes; never contains the value
    source_ids: tuple        # ids of the articles that state the fact (train articles, or the group's own)
    premises: tuple = ()     # inferred facts: ids of the stated facts it follows from
    paraphrased_cloze: str = ""   # the cloze in wording no article uses (PARA_CLOZE); never contains the value

    def tofu(self):
        """The fact as a TOFU-format record (TOFU's field names first, then ours)."""
        return {"question": self.question, "answer": self.answer, "paraphrased_answer": self.paraphrased_answer,
                "paraphrased_question": self.paraphrased_question, "perturbed_answer": list(self.perturbed_answer),
                "fact_id": self.id, "person": self.person, "subject": self.subject, "attribute": self.attribute,
                "kind": self.kind, "value": self.value, "perturbed_values": list(self.perturbed_values),
                "cloze": self.cloze, "source_ids": list(self.source_ids)}


TOFU_SPLITS = ("forget01", "forget05", "forget10", "retain90", "retain95", "retain99", "retain_perturbed",
               "holdout01", "holdout05", "holdout10", "world_facts", "real_authors", "full")
# forget requests (make_world(forget_kind=...)):
#   "entangled"   one person per family first (the default; NULLs' shared / inferred facts, compare.py): every
#                 forgotten person has a sibling in the retain set whose article states the family facts
#   "independent" whole families, as TOFU's forget authors are independent of the retained ones: no fact of a
#                 forgotten person is stated in, or inferable from, a retained person's article
FORGET_KINDS = ("entangled", "independent")
# what the retain set says about a forgotten person's fact (World.forget_fact_roles)
FACT_ROLES = ("unique", "shared", "inferable")


@dataclass
class World:
    seed: int
    countries: list
    cities: list                       # [City]
    people: list                       # [Person] trained on (ids 1..n_people)
    holdout_people: list               # [Person] never trained on (membership inference)
    real_people: list                  # [Person] for a pretraining corpus (TOFU's "real authors"); may be empty
    articles: dict                     # source id -> article text (the training corpus)
    holdout_articles: dict
    real_articles: dict
    facts: list                        # [Fact] about trained people, plus city facts
    holdout_facts: list
    real_facts: list
    forget_order: list                 # person ids in the order forget sets take them (see forget_kind)
    forget_kind: str = "entangled"     # FORGET_KINDS: one person per family first, or whole families
    # make_world(real_phrasings=k > 1): k - 1 more renderings of each "real" person's article (other templates,
    # sibling order, fillers, sentence order), for a pretraining corpus that states each fact several ways
    real_rephrasings: dict = field(default_factory=dict)   # source id -> [article text]

    def person(self, pid):
        for p in self.people + self.holdout_people + self.real_people:
            if p.id == pid:
                return p
        raise KeyError(f"no person with source id {pid}")

    def city(self, name):
        for c in self.cities:
            if c.name == name:
                return c
        raise KeyError(f"no city named {name!r}")

    def facts_of(self, source_id):
        """Facts the article of `source_id` states, plus the inferred facts about that person."""
        if source_id not in self.articles:
            raise KeyError(f"source id {source_id} has no training article (valid: 1..{len(self.articles)})")
        return [f for f in self.facts
                if source_id in f.source_ids or (f.kind == "inferred" and f.person == source_id)]

    def _people_qa(self, ids, facts):
        ids = set(ids)
        return [f.tofu() for f in facts if f.person in ids]

    def tofu_split(self, name):
        """
        TOFU-format records (dicts with question, answer, paraphrased_answer, paraphrased_question,
        perturbed_answer, plus fact metadata). Names as TOFU's configs; "_perturbed" suffixes are accepted
        (every record carries the perturbed fields). forgetXX = XX% of the people, nested, one person per
        family first (forget_kind "entangled": every forgotten person has a sibling in the retain set) or whole
        families (forget_kind "independent", forget_ids: the size nearest XX%); retainYY = the others;
        retain_perturbed = as many retained people as forget10, none in any forget set (TOFU's role for it);
        holdoutXX = people never trained on; world_facts = the city questions; real_authors = the "real"
        people (needs make_world(n_real > 0)); full = every trained person.
        """
        base = name[:-len("_perturbed")] if name.endswith("_perturbed") and name != "retain_perturbed" else name
        if base not in TOFU_SPLITS:
            raise ValueError(f"unknown split {name!r}; known: {', '.join(TOFU_SPLITS)} (optionally + '_perturbed')")
        n = len(self.people)
        pct = lambda s: int(s[-2:])
        count = lambda p, total: max(1, round(p * total / 100))
        forget = lambda p: self.forget_ids(count(p, n))
        if base.startswith("forget"):
            return self._people_qa(forget(pct(base)), self.facts)
        if base.startswith("retain") and base != "retain_perturbed":
            gone = set(forget(100 - pct(base)))
            return self._people_qa([p.id for p in self.people if p.id not in gone], self.facts)
        if base == "retain_perturbed":
            gone = set(forget(10))
            keep = [p.id for p in self.people if p.id not in gone][:count(10, n)]
            return self._people_qa(keep, self.facts)
        if base.startswith("holdout"):
            k = count(pct(base), n)
            if k > len(self.holdout_people):
                raise ValueError(f"{name} needs {k} held-out people; make_world(n_holdout={k}) or more")
            return self._people_qa([p.id for p in self.holdout_people[:k]], self.holdout_facts)
        if base == "world_facts":
            return [f.tofu() for f in self.facts if f.person == 0]
        if base == "real_authors":
            if not self.real_people:
                raise ValueError("this world has no 'real' people; build it with make_world(n_real=...)")
            return [f.tofu() for f in self.real_facts]
        return self._people_qa([p.id for p in self.people], self.facts)        # full

    def forget_ids(self, count):
        """The first forget request of about `count` people, in forget order. entangled: exactly the first
        `count`. independent: a prefix of whole families, the one whose size is nearest `count` (ties: the
        larger; at least one family), so forget sets stay nested and no family is split."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        if self.forget_kind == "entangled":
            return self.forget_order[:count]
        fam = {p.id: p.family for p in self.people}
        ends = [i + 1 for i, pid in enumerate(self.forget_order)
                if i + 1 == len(self.forget_order) or fam[self.forget_order[i + 1]] != fam[pid]]
        end = min(ends, key=lambda e: (abs(e - count), -e))
        return self.forget_order[:end]

    def forget_fact_roles(self, split):
        """{fact id: role} for every fact of the people a forget split removes (fact_roles of its people)."""
        base = split[:-len("_perturbed")] if split.endswith("_perturbed") else split
        if not re.fullmatch(r"forget\d\d", base) or base not in TOFU_SPLITS:
            raise ValueError(f"split must be one of forget01, forget05, forget10, got {split!r}")
        return self.fact_roles({r["person"] for r in self.tofu_split(base)})

    def fact_roles(self, gone):
        """{fact id: role} for every fact of the people in `gone` (any forget request), by what the retained
        people's articles (everyone trained on but not in `gone`) say about it: "shared" (a retained article
        states it), "inferable" (an inferred fact whose every premise a retained article states), "unique"
        (neither: only the forgotten people's own data holds it). Under forget_kind "independent" every role of
        a forget split is unique."""
        gone = set(gone)
        kept = {p.id for p in self.people} - gone
        by_id = {f.id: f for f in self.facts}
        stated = lambda f: bool(set(f.source_ids) & kept)
        out = {}
        for f in self.facts:
            if f.person not in gone:
                continue
            if f.kind == "inferred":
                out[f.id] = "inferable" if all(stated(by_id[q]) for q in f.premises) else "unique"
            else:
                out[f.id] = "shared" if stated(f) else "unique"
        return out

    def real_corpus(self, qa_forms=4):
        """Pretraining text about the "real" people: every rendering of their articles (real_articles plus
        real_rephrasings), one sentence per item, then QA of each fact in QA_TEMPLATE: qa_forms 4 = every form,
        (question or paraphrased question) x (answer or paraphrased answer); 1 = (question, answer); 0 = none.
        Allen-Zhu & Li (Physics of LMs 3.1): a model stores facts extractably only if pretraining states them
        in several phrasings."""
        if qa_forms not in (0, 1, 4):
            raise ValueError(f"qa_forms must be 0, 1 or 4, got {qa_forms!r}")
        out = []
        for pid, art in self.real_articles.items():
            for text in [art] + list(self.real_rephrasings.get(pid, ())):
                out += [t for t in re.split(r"(?<=\.) ", text) if t]
        for f in self.real_facts if qa_forms else ():
            forms = [(q, a) for q in (f.question, f.paraphrased_question) for a in (f.answer, f.paraphrased_answer)]
            out += [QA_TEMPLATE.format(question=q) + " " + a for q, a in forms[:qa_forms]]
        return out

    def save_tofu(self, folder):
        """Write every split as TOFU-style JSON lines, <folder>/<name>.json: load_tofu(name, path=folder) reads them."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for s in TOFU_SPLITS:
            try:
                recs = self.tofu_split(s)
            except ValueError:     # no real people, or too few held-out people for this split
                continue
            with open(folder / f"{s}.json", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in recs)
            names.append(s)
        return names

    def texts(self):
        """Every string the world generates (articles and QA fields), e.g. to check a vocabulary."""
        out = list(self.articles.values()) + list(self.holdout_articles.values()) + list(self.real_articles.values())
        out += [t for v in self.real_rephrasings.values() for t in v]
        for f in self.facts + self.holdout_facts + self.real_facts:
            out += [f.question, f.paraphrased_question, f.answer, f.paraphrased_answer, f.cloze, f.value]
            out += list(f.perturbed_answer)
        return out


_SLOT = re.compile(r"\{(\w+)\}")


def tuning_request(pool, forget, scored=()):
    """A held-out forget request to tune a baseline's knobs on (eval.tune): as many people as `forget`, taken in
    `pool`'s order (a world's forget_order: the people a next request of this kind would take), none of them in
    `forget` and none in `scored` (the people whose data utility is measured on)."""
    gone, scored = set(forget), set(scored)
    out = [p for p in pool if p not in gone and p not in scored][:len(forget)]
    if len(out) < len(forget):
        raise ValueError(f"no held-out forget request of {len(forget)} people for tuning: only {len(out)} people are "
                         "neither forgotten nor scored for utility")
    return out


def _render(template, slots):
    """Fill a template; also return the character offset where each slot's value starts."""
    out, pos, starts = "", 0, {}
    for m in _SLOT.finditer(template):
        out += template[pos:m.start()]
        starts[m.group(1)] = len(out)
        out += str(slots[m.group(1)])
        pos = m.end()
    return out + template[pos:], starts


def _name_list(names):
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def make_world(seed=0, n_people=100, n_families=40, n_cities=10, n_countries=4, n_holdout=10, n_real=0,
               n_perturbed=5, *, forget_kind="entangled", real_phrasings=1):
    """
    Build the fictional world, deterministic from (seed, sizes).

    People come in families of 2-3 (or more, if n_people / n_families is larger) who share a surname, parents
    and a birth city. Each person's article states: the family sentence (all siblings, the birth city, the
    parents; the same facts in every sibling's article: shared), the birth year, occupation, two books, award
    and current residence (their own: unique), the birth city's river and founding year (shared by everyone
    born there) and "<residence>, a city in <country>" (shared by everyone living there), plus 3 of 12 filler
    sentences, in a varied order. A person's home country is never written in their own article (people live
    in a country other than where they were born); it follows from the shared facts "born in <city>" and
    "<city>, a city in <country>": the inferred fact. Held-out and "real" people are built the same way in
    their own families; their articles are kept apart (world.holdout_articles, world.real_articles).
    forget_kind (FORGET_KINDS): the order forget splits take people, one per family first ("entangled", the
    default) or whole families ("independent"). real_phrasings >= 1: renderings of each real person's article
    (the extra ones in world.real_rephrasings). Both opt-in: the defaults build the same world as before.
    """
    n_groups = {"train": n_people, "holdout": n_holdout, "real": n_real}
    fam_counts = {"train": n_families, "holdout": n_holdout // 2, "real": n_real // 2}
    max_size = _check_world_sizes(n_groups, fam_counts, n_cities, n_countries, n_perturbed, forget_kind,
                                  real_phrasings)
    rng = random.Random(seed)       # one generator, drawn from in this order: the stages below must keep it
    # the map: countries, and cities with a river, a founding year and a country each
    countries, cities = _world_cities(rng, n_countries, n_cities)
    # the people: families sharing a surname, parents and a birth city; each living in another country
    people = _world_families(rng, [c.name for c in cities], n_groups, fam_counts)
    _world_residences(rng, people, cities)
    persons = [Person(**p) for p in people]
    # the articles (their own generator), recording for every fact the articles that state it
    statements = {}   # fact id -> {source id: cloze}
    by_id = {p.id: p for p in persons}
    render = lambda p, arng: _world_article(p, arng, by_id, cities, statements)
    articles = {"train": {}, "holdout": {}, "real": {}}
    arng = random.Random(f"{seed}/articles")
    for p in persons:
        articles[p.group][p.id] = render(p, arng)
    # facts with their QA, perturbed answers and kinds
    facts = _world_facts(rng, persons, cities, countries, statements, n_perturbed)
    # the order forget splits take the training people in
    train_people = [p for p in persons if p.group == "train"]
    forget_order = _world_forget_order(rng, train_people, max_size, forget_kind)
    # extra renderings of the real people's articles, from their own generators (nothing above changes)
    rephrasings = {p.id: [render(p, random.Random(f"{seed}/real/{p.id}/{i}")) for i in range(1, real_phrasings)]
                   for p in persons if p.group == "real" and real_phrasings > 1}

    return World(seed=seed, countries=countries, cities=cities, people=train_people,
                 holdout_people=[p for p in persons if p.group == "holdout"],
                 real_people=[p for p in persons if p.group == "real"],
                 articles=articles["train"], holdout_articles=articles["holdout"], real_articles=articles["real"],
                 facts=facts["train"], holdout_facts=facts["holdout"], real_facts=facts["real"],
                 forget_order=forget_order, forget_kind=forget_kind, real_rephrasings=rephrasings)


def _check_world_sizes(n_groups, fam_counts, n_cities, n_countries, n_perturbed, forget_kind, real_phrasings):
    """make_world's arguments checked, each failure a clear ValueError; returns the largest family size."""
    if forget_kind not in FORGET_KINDS:
        raise ValueError(f"forget_kind must be one of {FORGET_KINDS}, got {forget_kind!r}")
    if not isinstance(real_phrasings, int) or real_phrasings < 1:
        raise ValueError(f"real_phrasings must be an int >= 1, got {real_phrasings!r}")
    n_people, n_families = n_groups["train"], fam_counts["train"]
    if n_people < 2 or n_families < 1 or n_people < 2 * n_families:
        raise ValueError(f"need at least 2 people per family: n_people={n_people}, n_families={n_families}")
    if n_groups["holdout"] == 1 or n_groups["real"] == 1:
        raise ValueError("held-out and real people come in families of at least 2: use 0 or >= 2")
    if n_countries > len(COUNTRIES) or not n_countries <= n_cities <= len(CITIES):
        raise ValueError(f"need n_countries <= {len(COUNTRIES)} and n_countries <= n_cities <= {len(CITIES)}")
    if n_cities > n_families:
        raise ValueError("every city needs a family born there: n_cities <= n_families")
    if n_perturbed < 3 or n_countries < 4:
        raise ValueError("every fact needs >= 3 wrong answers: n_perturbed >= 3 and n_countries >= 4")
    if sum(fam_counts.values()) > len(SURNAMES):
        raise ValueError(f"{sum(fam_counts.values())} families but only {len(SURNAMES)} surnames")
    max_size = max(-(-n_groups[g] // fam_counts[g]) for g in n_groups if n_groups[g])
    if max_size + 1 > min(len(FEMALE), len(MALE)):
        raise ValueError("families too large for the first-name lists")
    n_titles = 2 * sum(n_groups.values())
    if n_titles > len(BOOK_ADJ) * len(BOOK_NOUN):
        raise ValueError(f"{n_titles} book titles needed, only {len(BOOK_ADJ) * len(BOOK_NOUN)} exist")
    return max_size


def _world_cities(rng, n_countries, n_cities):
    """(countries, [City]): every country gets at least one city."""
    countries = rng.sample(COUNTRIES, n_countries)
    city_names = rng.sample(CITIES, n_cities)
    rivers = rng.sample(RIVERS, n_cities)
    founded = rng.sample(FOUNDED_YEARS, n_cities)
    city_country = [countries[i % n_countries] for i in range(n_cities)]
    rng.shuffle(city_country)
    return countries, [City(c, k, r, y) for c, k, r, y in zip(city_names, city_country, rivers, founded)]


def _world_families(rng, city_names, n_groups, fam_counts):
    """Every person as a dict (residence None), family by family: train, held-out, then real people."""
    surnames = rng.sample(SURNAMES, sum(fam_counts.values()))
    titles = rng.sample([f"{a} {b}" for a in BOOK_ADJ for b in BOOK_NOUN], 2 * sum(n_groups.values()))
    n_cities = len(city_names)
    people, next_id, fam_id = [], 1, 0
    for group in ("train", "holdout", "real"):
        n, nf = n_groups[group], fam_counts[group]
        if n == 0:
            continue
        sizes = [n // nf + (1 if i < n % nf else 0) for i in range(nf)]
        rng.shuffle(sizes)
        # train families cover every city once before any city repeats; other groups pick freely
        fam_cities = [city_names[i % n_cities] for i in range(nf)] if group == "train" else \
            [rng.choice(city_names) for _ in range(nf)]
        rng.shuffle(fam_cities)
        for size, city in zip(sizes, fam_cities):
            surname = surnames[fam_id]
            genders = [rng.choice("fm") for _ in range(size)]
            girls = iter(rng.sample(FEMALE, size + 1))   # +1: the mother's first name differs from her daughters'
            boys = iter(rng.sample(MALE, size + 1))
            father, mother = f"{next(boys)} {surname}", f"{next(girls)} {surname}"
            firsts = [next(girls) if g == "f" else next(boys) for g in genders]
            base_year = rng.choice(BIRTH_YEARS[:-10])
            ids = list(range(next_id, next_id + size))
            for pid, first, g in zip(ids, firsts, genders):
                people.append(dict(id=pid, name=f"{first} {surname}", first=first, surname=surname, gender=g,
                                   family=fam_id, group=group, birth_city=city,
                                   birth_year=base_year + rng.randrange(10), occupation=rng.choice(OCCUPATIONS),
                                   books=(titles.pop(), titles.pop()), award=rng.choice(AWARDS), residence=None,
                                   father=father, mother=mother, siblings=tuple(i for i in ids if i != pid)))
            next_id += size
            fam_id += 1
    return people


def _world_residences(rng, people, cities):
    """Set each person's residence: a city in another country than the birth city (so the home country never
    appears in the person's own article); every city first gets two train residents, so "<city>, a city in
    <country>" is a shared fact of the training corpus."""
    country_of = {c.name: c.country for c in cities}
    train = [p for p in people if p["group"] == "train"]
    order = list(range(len(train)))
    rng.shuffle(order)
    for c in cities:
        for _ in range(2):
            i = next((i for i in order if train[i]["residence"] is None
                      and country_of[train[i]["birth_city"]] != c.country), None)
            if i is None:
                raise ValueError("too few people to give every city two residents from other countries")
            train[i]["residence"] = c.name
    for p in people:
        if p["residence"] is None:
            p["residence"] = rng.choice([c.name for c in cities if c.country != country_of[p["birth_city"]]])


def _world_article(p, arng, by_id, cities, statements):
    """One rendering of p's article: templates, sibling order, fillers and sentence order drawn from arng. Records
    in statements (fact id -> {source id: cloze}) the cloze text of every fact it states, the first one kept."""
    country_of = {c.name: c.country for c in cities}
    sibs = [by_id[s] for s in p.siblings]
    arng.shuffle(sibs)
    kids = [p] + sibs            # the article's person first: their cloze prompts start with their name
    sents = []

    def sentence(templates, slots, facts):
        text, starts = _render(arng.choice(templates), slots)
        for fact_id, value_slot, subject_slot in facts:
            lo = starts[subject_slot] if subject_slot else 0
            statements.setdefault(fact_id, {}).setdefault(p.id, text[lo:starts[value_slot]].rstrip())
        sents.append(text)

    fam_facts = [(f"p{k.id}.{a}", s, None) for k in kids for a, s in
                 (("father", "father"), ("mother", "mother"), ("birth_city", "city"))]
    sentence(T_FAMILY, dict(children=_name_list([k.name for k in kids]), city=p.birth_city, father=p.father,
                            mother=p.mother), fam_facts)
    sentence(T_BIRTH, dict(name=p.name, year=p.birth_year), [(f"p{p.id}.birth_year", "year", None)])
    sentence(T_OCCUPATION, dict(name=p.name, occupation=p.occupation),
             [(f"p{p.id}.occupation", "occupation", None)])
    sentence(T_BOOKS, dict(name=p.name, book1=p.books[0], book2=p.books[1]),
             [(f"p{p.id}.book1", "book1", None), (f"p{p.id}.book2", "book2", None)])
    sentence(T_AWARD, dict(name=p.name, award=p.award), [(f"p{p.id}.award", "award", None)])
    sentence(T_RESIDENCE, dict(name=p.name, res=p.residence, res_country=country_of[p.residence]),
             [(f"p{p.id}.residence", "res", None), (f"c.{p.residence}.country", "res_country", "res")])
    bc = next(c for c in cities if c.name == p.birth_city)
    sentence(T_CITY, dict(city=bc.name, river=bc.river, founded=bc.founded),
             [(f"c.{bc.name}.river", "river", "city"), (f"c.{bc.name}.founded", "founded", "city")])
    pron, poss = ("she", "her") if p.gender == "f" else ("he", "his")
    fill = [_render(t, dict(pron=pron, Pron=pron.capitalize(), poss=poss, Poss=poss.capitalize()))[0]
            for t in arng.sample(FILLERS, N_FILLERS)]
    # the family or the birth sentence opens the article; the rest in a varied order
    first = arng.randrange(2)
    rest = [s for i, s in enumerate(sents) if i != first] + fill
    arng.shuffle(rest)
    return " ".join([sents[first]] + rest)


def _world_facts(rng, persons, cities, countries, statements, n_perturbed):
    """{group: [Fact]}: every person's facts (the inferred home country last), then the city facts (train)."""
    by_id = {p.id: p for p in persons}
    country_of = {c.name: c.country for c in cities}
    city_names = [c.name for c in cities]
    pools = {"birth_year": [str(y) for y in BIRTH_YEARS], "occupation": OCCUPATIONS, "award": AWARDS,
             "book1": [t for p in persons for t in p.books], "residence": city_names,
             "birth_city": city_names, "country": countries, "city.country": countries,
             "city.river": [c.river for c in cities], "city.founded": [str(y) for y in FOUNDED_YEARS]}
    pools["book2"] = pools["book1"]

    def wrong(attr, value):
        if attr in ("father", "mother"):   # same surname, another first name: a plausible parent
            surname = value.split()[-1]
            pool = [f"{n} {surname}" for n in (MALE if attr == "father" else FEMALE)]
        else:
            pool = pools[attr]
        pool = sorted(set(pool) - {value})
        k = min(n_perturbed, 3) if attr.startswith("city.") else n_perturbed   # TOFU's world facts have 3
        return rng.sample(pool, min(k, len(pool)))

    def make_fact(fid, pid, subject, attr, value, slots, group, cloze=None, premises=()):
        (q, pq), (a, pa) = QA[attr]
        stated = statements.get(fid, {})
        if group == "city":   # city facts count the training corpus only
            stated = {s: c for s, c in stated.items() if by_id[s].group == "train"}
        srcs = tuple(sorted(stated))
        kind = "inferred" if premises else ("unique" if len(srcs) == 1 else "shared")
        if cloze is None:
            cloze = stated[srcs[0]] if pid == 0 or pid not in stated else stated[pid]
        wv = wrong(attr, value)
        fill = lambda t, v: _render(t, dict(slots, v=v))[0]
        return Fact(id=fid, person=pid, subject=subject, attribute=attr.split(".")[-1], kind=kind, value=value,
                    question=fill(q, value), paraphrased_question=fill(pq, value), answer=fill(a, value),
                    paraphrased_answer=fill(pa, value), perturbed_answer=[fill(pa, w) for w in wv],
                    perturbed_values=wv, cloze=cloze, source_ids=srcs, premises=tuple(premises),
                    paraphrased_cloze=_render(PARA_CLOZE[attr], slots)[0])

    facts = {"train": [], "holdout": [], "real": []}
    for p in persons:
        slots = dict(name=p.name, book1=p.books[0], city=p.birth_city)
        values = dict(birth_year=str(p.birth_year), occupation=p.occupation, book1=p.books[0], book2=p.books[1],
                      award=p.award, residence=p.residence, father=p.father, mother=p.mother,
                      birth_city=p.birth_city)
        for attr, v in values.items():
            facts[p.group].append(make_fact(f"p{p.id}.{attr}", p.id, p.name, attr, v, slots, p.group))
        facts[p.group].append(make_fact(
            f"p{p.id}.country", p.id, p.name, "country", country_of[p.birth_city], slots, p.group,
            cloze=_render(CLOZE_COUNTRY, dict(name=p.name, city=p.birth_city))[0],
            premises=(f"p{p.id}.birth_city", f"c.{p.birth_city}.country")))
    for c in cities:
        for attr, v in (("country", c.country), ("river", c.river), ("founded", str(c.founded))):
            cloze = _render(CLOZE_CITY_COUNTRY, dict(city=c.name))[0] if attr == "country" else None
            facts["train"].append(make_fact(f"c.{c.name}.{attr}", 0, c.name, f"city.{attr}", v,
                                            dict(city=c.name), "city", cloze=cloze))
    return facts


def _world_forget_order(rng, train_people, max_size, forget_kind):
    """The training people's ids in the order forget splits take them: one person per family (in a seeded order)
    before any second sibling ("entangled"), or whole families in the same seeded family order ("independent")."""
    fams = {}
    for p in train_people:
        fams.setdefault(p.family, []).append(p.id)
    fam_order = list(fams)
    rng.shuffle(fam_order)
    for f in fam_order:
        rng.shuffle(fams[f])
    forget_order = [fams[f][r] for r in range(max_size) for f in fam_order if r < len(fams[f])]
    if forget_kind == "independent":     # the same seeded family order, whole families
        forget_order = [pid for f in fam_order for pid in fams[f]]
    return forget_order


@dataclass(frozen=True)
class MCQuestion:
    prompt: str              # a cloze prompt; each choice is scored as its continuation
    choices: tuple
    answer: int              # index of the right choice
    kind: str                # "world" (a city fact many articles state) or "type" (which kind of word fits)


GENERAL_TYPES = {"occupation": "{name} works as a", "year": "{name} was born in the year",
                 "city": "{name} now lives in", "award": "{name} received the", "book": "{name} is the author of"}


def general_questions(world, n_choices=4):
    """Multiple-choice questions that no single article owns: the closest analogue, on the built-in world, of the
    downstream benchmarks (ARC-E, SciQ, PIQA, Winogrande) the NULLs paper uses for general capability.
    "world": every city fact (country, river, founding year; each stated by several articles) asked with its
    paraphrased cloze, the right value among n_choices - 1 of its wrong values. "type": for every held-out
    person (never trained on), each pattern of GENERAL_TYPES with one value of the right type (drawn at random:
    any fits) against values of n_choices - 1 other types, i.e. knowing what kind of word a sentence needs.
    Deterministic from world.seed; draws from its own generator, so the world itself is unchanged."""
    if not 2 <= n_choices <= len(GENERAL_TYPES):
        raise ValueError(f"n_choices must be in 2..{len(GENERAL_TYPES)}, got {n_choices}")
    rng = random.Random(f"{world.seed}/general")
    out = []

    def add(prompt, right, wrong, kind):
        choices = [right] + list(wrong)
        rng.shuffle(choices)
        out.append(MCQuestion(prompt, tuple(choices), choices.index(right), kind))
    for f in world.facts:
        if f.person == 0:
            add(f.paraphrased_cloze, f.value, f.perturbed_values[:n_choices - 1], "world")
    pools = {"occupation": OCCUPATIONS, "year": [str(y) for y in BIRTH_YEARS], "city": [c.name for c in world.cities],
             "award": AWARDS, "book": [f"{a} {b}" for a in BOOK_ADJ for b in BOOK_NOUN]}
    for p in world.holdout_people:
        for t, template in GENERAL_TYPES.items():
            others = rng.sample([o for o in GENERAL_TYPES if o != t], n_choices - 1)
            add(_render(template, dict(name=p.name))[0], rng.choice(pools[t]), [rng.choice(pools[o]) for o in others],
                "type")
    return out


def _template_words(templates):
    return {t for s in templates for t in _WORD_RE.findall(_SLOT.sub(" ", s))}


def world_words():
    """Every word the world generator can write: its word lists, templates and the QA format."""
    words = _template_words(T_FAMILY + T_BIRTH + T_OCCUPATION + T_BOOKS + T_AWARD + T_RESIDENCE + T_CITY
                            + FILLERS + [CLOZE_COUNTRY, CLOZE_CITY_COUNTRY, QA_TEMPLATE] + list(PARA_CLOZE.values())
                            + list(GENERAL_TYPES.values())
                            + [t for qa in QA.values() for pair in qa for t in pair])
    words |= {"he", "she", "He", "She", "his", "her", "His", "Her"}
    for lst in (FEMALE, MALE, SURNAMES, CITIES, COUNTRIES, RIVERS, OCCUPATIONS, AWARDS, BOOK_ADJ, BOOK_NOUN,
                BIRTH_YEARS, FOUNDED_YEARS):
        for v in lst:
            words.update(_WORD_RE.findall(str(v)))
    return sorted(words)


def world_tokenizer():
    """The word-level tokenizer for make_world's text (same vocabulary for every seed and size)."""
    return WordTokenizer(world_words())


# -------------------------------------------------------------------------------------------------
# Stories: TinyStories in miniature, from a small grammar whose sentences share structure across stories
# -------------------------------------------------------------------------------------------------

GIRLS = ["Lily", "Mia", "Sue", "Amy", "Lucy", "Emma", "Zoe", "Ruby", "Ava", "Kate", "Jill", "Rose", "Nina",
         "Tess", "Molly", "Ellie"]
BOYS = ["Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Finn", "Noah", "Luke", "Dan", "Bob", "Jake", "Ollie",
        "Pete", "Ned"]
S_KINDS = ["dog", "cat", "bunny", "bear", "fox", "bird", "mouse", "frog", "duck", "owl", "turtle", "pig"]
S_PLACES = ["park", "forest", "garden", "beach", "farm", "house", "school", "river", "hill", "village", "lake",
            "field", "cave", "kitchen", "market", "meadow", "pond", "zoo"]
S_OBJECTS = ["ball", "kite", "hat", "box", "book", "cake", "boat", "drum", "doll", "car", "cup", "key", "shell",
             "flower", "star", "stone", "bell", "train", "sock", "blanket", "hammer", "map", "basket", "toy"]
S_ADJS = ["big", "small", "red", "blue", "happy", "shiny", "new", "soft", "funny", "green", "tiny", "brave",
          "kind", "quiet", "bright", "pink"]
S_FEELINGS = ["happy", "sad", "scared", "excited", "angry", "proud", "tired", "surprised", "curious", "calm"]
S_VERBS = ["found", "lost", "made", "saw", "took", "hid", "carried", "painted", "dropped", "fixed", "washed", "kept"]

S_OPENERS = ["Once upon a time, there was a {adj} {kind} named {name}. {Pron} lived near a {place} with {poss} mom.",
             "There was once a {adj} {kind} called {name}. {name} loved to play in the {place} every day.",
             "One sunny morning, a {adj} {kind} named {name} woke up early. {Pron} wanted to go to the {place}."]
S_MIDDLES = ["One day, {name} went to the {place2} to look for a {obj}.",
             "There, {pron} {verb} a {adj2} {obj} under a tree.",
             "{name} felt very {feeling} and smiled at the {obj}.",
             "Then {name} met a {kind2} named {friend}. {friend} was {adj2} and liked to play.",
             "{friend} wanted to play with the {obj} too. {name} said yes and they shared it.",
             "They played together all day at the {place2} until the sun went down.",
             "Then it started to rain, so {name} ran home with the {obj}.",
             "{Pron} showed the {obj} to {poss} mom. Mom said it was a very {adj2} {obj}.",
             "The {obj} was {adj2} and {adj}, and {name} wanted to keep it forever.",
             "{name} and {friend} looked for the {obj2} in the {place2} but could not find it.",
             "At last, they found the {obj2} next to a {adj} {obj}.",
             "Suddenly, the {obj} fell into the water. {name} was {feeling}, but {friend} helped get it back."]
S_ENDINGS = ["In the end, {name} was very {feeling} and went to sleep with the {obj}.",
             "From that day on, {name} and {friend} were best friends.",
             "{name} learned that sharing is good. {Pron} never forgot that day at the {place2}.",
             "That night, {name} told {poss} mom all about the {adj2} {obj}. It was the best day ever.",
             "The end. {name} and the {obj} lived happily in the {place} forever."]
STORY_WORDS = (40, 80)


def _story(rng):
    girl = rng.random() < 0.5
    name = rng.choice(GIRLS if girl else BOYS)
    friend = rng.choice([n for n in GIRLS + BOYS if n != name])
    obj, obj2 = rng.sample(S_OBJECTS, 2)
    adj, adj2 = rng.sample(S_ADJS, 2)
    place, place2 = rng.sample(S_PLACES, 2)
    pron, poss = ("she", "her") if girl else ("he", "his")
    slots = dict(name=name, friend=friend, kind=rng.choice(S_KINDS), kind2=rng.choice(S_KINDS), obj=obj, obj2=obj2,
                 adj=adj, adj2=adj2, place=place, place2=place2, feeling=rng.choice(S_FEELINGS),
                 verb=rng.choice(S_VERBS), pron=pron, Pron=pron.capitalize(), poss=poss)
    # 2-5 middle sentences, kept in the grammar's order so the plot reads forward
    middles = [S_MIDDLES[i] for i in sorted(rng.sample(range(len(S_MIDDLES)), rng.randint(2, 5)))]
    parts = [rng.choice(S_OPENERS)] + middles + [rng.choice(S_ENDINGS)]
    return " ".join(_render(t, slots)[0] for t in parts)


def make_stories(n, seed=0):
    """n distinct stories (40-80 words each: rejection sampling on the length), deterministic from seed."""
    if n < 0:
        raise ValueError("n must be >= 0")
    rng, out, seen = random.Random(seed), [], set()
    tries = 0
    while len(out) < n:
        s = _story(rng)
        tries += 1
        if tries > 50 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct stories from the grammar")
        words = sum(1 for t in _WORD_RE.findall(s) if t[0].isalnum())
        if STORY_WORDS[0] <= words <= STORY_WORDS[1] and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def stories_words():
    words = _template_words(S_OPENERS + S_MIDDLES + S_ENDINGS)
    words |= {"he", "she", "He", "She", "his", "her"}
    for lst in (GIRLS, BOYS, S_KINDS, S_PLACES, S_OBJECTS, S_ADJS, S_FEELINGS, S_VERBS):
        words.update(lst)
    return sorted(words)


def stories_tokenizer():
    """The word-level tokenizer for make_stories' text (and canaries drawn from its words)."""
    return WordTokenizer(stories_words())


@dataclass
class RepetitionSet:
    """A MemSinks training set. texts[i] has sequence id seq_ids[i] (>= 1; copies of a repeated sequence share
    it) and repeated[i] says whether it is one of the repeated ones. Shuffled (seeded)."""
    texts: list
    seq_ids: list
    repeated: list
    repeated_texts: list     # the n_rep distinct repeated sequences, id i+1 for repeated_texts[i]
    single_texts: list       # the m sequences seen once
    val_texts: list          # fresh stories, none in the training set
    canaries: list = field(default_factory=list)   # TS-Canary: canaries[i] was appended to repeated_texts[i]


def _repetition(n_rep, r, m, seed, n_val, texts, canary_len, canary_words):
    if min(n_rep, r, m, n_val) < 0 or r < 1:
        raise ValueError("need n_rep, m, n_val >= 0 and r >= 1")
    need = n_rep + m + n_val
    if texts is None:
        pool = make_stories(need, seed)
    else:
        pool = list(dict.fromkeys(t for t in texts if t.strip()))   # distinct, first-seen order
        if len(pool) < need:
            raise ValueError(f"need {need} distinct texts (n_rep + m + n_val), got {len(pool)}")
        random.Random(seed).shuffle(pool)
    rep, single, val = pool[:n_rep], pool[n_rep:n_rep + m], pool[n_rep + m:need]
    canaries = []
    if canary_len:
        crng = random.Random(seed + 1_000_003)
        words = canary_words if canary_words is not None else \
            [w for w in stories_words() if w[0].isalnum()]
        if not words:
            raise ValueError("no words to draw canaries from")
        canaries = [" ".join(crng.choice(words) for _ in range(canary_len)) for _ in rep]
        rep = [f"{t} {c}" for t, c in zip(rep, canaries)]
    items = [(t, i + 1, True) for i, t in enumerate(rep) for _ in range(r)]
    items += [(t, n_rep + 1 + j, False) for j, t in enumerate(single)]
    random.Random(seed + 7).shuffle(items)
    return RepetitionSet(texts=[t for t, _, _ in items], seq_ids=[i for _, i, _ in items],
                         repeated=[b for _, _, b in items], repeated_texts=rep, single_texts=single,
                         val_texts=val, canaries=canaries)


def ts_repetition(n_rep=100, r=128, m=20000, seed=0, *, n_val=1000, texts=None):
    """
    TS-Repetition (MemSinks Sec. 3): n_rep stories each repeated r times, mixed with m stories seen once,
    plus n_val fresh validation stories. Defaults are the paper's (100 x 128 + 20,000). Stories come from the
    grammar, or from `texts` (e.g. TinyStories records) when given.
    """
    return _repetition(n_rep, r, m, seed, n_val, texts, 0, None)


def ts_canary(n_rep=100, r=128, m=20000, seed=0, *, n_val=1000, texts=None, canary_len=10, canary_words=None):
    """
    TS-Canary (MemSinks Sec. 3): as TS-Repetition, but a canary of canary_len random words is appended to each
    repeated story. The paper does not give the canary length; 10 random tokens is our choice. Words are drawn
    uniformly from canary_words (default: the story vocabulary), so with the word tokenizer a canary is
    canary_len random tokens.
    """
    if canary_len < 1:
        raise ValueError("canary_len must be >= 1")
    return _repetition(n_rep, r, m, seed, n_val, texts, canary_len, canary_words)


# -------------------------------------------------------------------------------------------------
# Batching: rows of token ids with targets, per-token document ids and source ids
# -------------------------------------------------------------------------------------------------

def _check_docs(token_lists, source_ids):
    if len(token_lists) == 0:
        raise ValueError("no documents")
    if any(len(t) == 0 for t in token_lists):
        raise ValueError("empty document")
    if source_ids is None:
        return list(range(1, len(token_lists) + 1))   # each document its own source
    source_ids = [int(s) for s in source_ids]
    if len(source_ids) != len(token_lists):
        raise ValueError(f"{len(token_lists)} documents but {len(source_ids)} source ids")
    if min(source_ids) < 1:
        raise ValueError("source ids must be >= 1 (0 marks padding and never names a source)")
    return source_ids


def _doc_pieces(toks, eos_id, split_ids):
    """Inputs, targets and segment numbers of one document: inputs d, targets d[1:] + [eos]. With split_ids,
    a new segment starts after each of those tokens and no target crosses a segment boundary."""
    toks = [int(t) for t in toks]
    ys = toks[1:] + [eos_id]
    seg = [0] * len(toks)
    if split_ids:
        for i in range(1, len(toks)):
            seg[i] = seg[i - 1] + (toks[i - 1] in split_ids)
        ys = [y if i + 1 == len(toks) or seg[i + 1] == seg[i] else -100 for i, y in enumerate(ys)]
    return toks, ys, seg


def _rows_to_batch(rows, T, pad_id):
    """rows: lists of (doc index, source id, inputs, targets, segments) -> dict of (N, T) LongTensors."""
    N = len(rows)
    x = torch.full((N, T), pad_id, dtype=torch.long)
    y = torch.full((N, T), -100, dtype=torch.long)
    att = torch.full((N, T), -1, dtype=torch.long)
    src = torch.zeros((N, T), dtype=torch.long)
    ids = {}     # (doc, segment) -> attention id, numbered in order of appearance (= doc index without segments)
    for r, pieces in enumerate(rows):
        t = 0
        for d, s, xs, ys, seg in pieces:
            n = len(xs)
            x[r, t:t + n] = torch.tensor(xs)
            y[r, t:t + n] = torch.tensor(ys)
            att[r, t:t + n] = torch.tensor([ids.setdefault((d, g), len(ids)) for g in seg])
            src[r, t:t + n] = s
            t += n
    return {"x": x, "y": y, "doc_ids": att, "source_ids": src}


def pack_documents(token_lists, source_ids, block_size, eos_id, pad_id, *, split_ids=None):
    """
    Pack documents into rows of block_size tokens. A document d contributes inputs d and targets d[1:] + [eos]
    (its first token is never a target: with document-aware attention nothing before it is visible). A document
    that fits in the rest of the current row goes there, otherwise it starts a new row; a document longer than
    block_size is cut into block_size pieces, each starting a row (its later pieces keep its ids).
    Returns (N, T) LongTensors: x; y (-100 on padding); doc_ids (the document's index in token_lists, -1 on
    padding: model.py attends causal AND same doc id); source_ids (0 on padding). source_ids None = document
    i is source i+1.

    split_ids: token ids that end a segment (e.g. {id of "."}): each segment of a document gets its own
    doc id (numbered in order of appearance) and no target crosses segments; source ids stay per document.
    Why: a small model
    trained on whole articles memorizes each fact in the context of its article and then fails a stand-alone
    cloze prompt; trained on sentence segments it recalls the facts (measured, see the module docstring).
    """
    source_ids = _check_docs(token_lists, source_ids)
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    split_ids = set(split_ids or ())
    T, rows, cur, used = block_size, [], [], 0
    for d, (toks, s) in enumerate(zip(token_lists, source_ids)):
        xs, ys, seg = _doc_pieces(toks, eos_id, split_ids)
        for k in range(0, len(xs), T):
            piece = (d, s, xs[k:k + T], ys[k:k + T], seg[k:k + T])
            if used + len(piece[2]) > T:
                rows.append(cur)
                cur, used = [], 0
            cur.append(piece)
            used += len(piece[2])
    rows.append(cur)
    return _rows_to_batch(rows, T, pad_id)


def one_per_row(token_lists, source_ids=None, *, eos_id, pad_id, block_size=None, truncate=False, split_ids=None):
    """
    One document per row, right-padded to block_size (default: the longest document). Inputs d, targets
    d[1:] + [eos]. A document longer than block_size is an error unless truncate=True (then its first
    block_size tokens are kept and the eos target falls off). Same keys and split_ids as pack_documents.
    """
    source_ids = _check_docs(token_lists, source_ids)
    longest = max(len(t) for t in token_lists)
    T = block_size or longest
    if longest > T and not truncate:
        raise ValueError(f"a document has {longest} tokens > block_size {T}; pass truncate=True to cut it")
    split_ids = set(split_ids or ())
    rows = []
    for d, (toks, s) in enumerate(zip(token_lists, source_ids)):
        xs, ys, seg = _doc_pieces(toks, eos_id, split_ids)
        rows.append([(d, s, xs[:T], ys[:T], seg[:T])])
    return _rows_to_batch(rows, T, pad_id)


def qa_prompts(tokenizer, questions, template=QA_TEMPLATE):
    """Token lists of the formatted questions (what generation starts from)."""
    return [tokenizer.encode(template.format(question=q)) for q in questions]


def qa_batch(tokenizer, questions, answers, *, template=QA_TEMPLATE, source_ids=None, block_size=None):
    """
    QA pairs, one per row, formatted as TOFU does: prompt = template(question), then " " + answer, then one
    end-of-text. Prompt and answer are encoded separately (TOFU counts the prompt's tokens the same way), so
    targets are -100 on every position that predicts a prompt token and the answer tokens plus one eos label
    are learned. Returns pack_documents' keys plus prompt_lens and answer_lens (N,) (answer without eos).
    """
    if len(questions) == 0:
        raise ValueError("no questions")
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    prompts = qa_prompts(tokenizer, questions, template)
    ans = [tokenizer.encode(" " + a) for a in answers]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a question formats to no tokens")
    source_ids = _check_docs(prompts, source_ids)
    longest = max(len(p) + len(a) for p, a in zip(prompts, ans))
    T = block_size or longest
    if longest > T:
        raise ValueError(f"a QA pair has {longest} tokens > block_size {T}")
    rows = []
    for d, (p, a, s) in enumerate(zip(prompts, ans, source_ids)):
        seq = p + a + [tokenizer.eos_id]
        ys = [-100] * (len(p) - 1) + seq[len(p):]
        rows.append([(d, s, seq[:-1], ys, [0] * (len(seq) - 1))])
    out = _rows_to_batch(rows, T, tokenizer.pad_id)
    out["prompt_lens"] = torch.tensor([len(p) for p in prompts])
    out["answer_lens"] = torch.tensor([len(a) for a in ans])
    return out


def take(batch, idx):
    """Rows idx of every (N, ...) tensor of a batch dict (non-tensors are passed through)."""
    return {k: (v[idx] if torch.is_tensor(v) else v) for k, v in batch.items()}


class EpochIterator:
    """
    Batches of item indices, a fresh seeded shuffle every epoch, forever. The order of epoch e depends only on
    (seed, e), so state_dict() = (epoch, position) is all a resumed run needs to see the same batches.
    The last batch of an epoch is smaller unless drop_last; batches never span two epochs.
    """

    def __init__(self, n_items, batch_size, seed=0, *, shuffle=True, drop_last=False):
        if n_items < 1 or batch_size < 1:
            raise ValueError("need n_items >= 1 and batch_size >= 1")
        if drop_last and n_items < batch_size:
            raise ValueError(f"drop_last with {n_items} items < batch_size {batch_size} gives no batches")
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = None, None

    @property
    def steps_per_epoch(self):
        return self.n_items // self.batch_size if self.drop_last else math.ceil(self.n_items / self.batch_size)

    def order(self, epoch):
        """The item order of `epoch`."""
        if not self.shuffle:
            return torch.arange(self.n_items)
        return torch.from_numpy(np.random.default_rng([self.seed, epoch]).permutation(self.n_items))

    def __iter__(self):
        return self

    def __next__(self):
        end = self.steps_per_epoch * self.batch_size if self.drop_last else self.n_items
        if self.position >= end:
            self.epoch, self.position = self.epoch + 1, 0
        if self._order_epoch != self.epoch:
            self._order_epoch, self._order = self.epoch, self.order(self.epoch)
        idx = self._order[self.position:min(self.position + self.batch_size, end)]
        self.position += len(idx)
        return idx

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n_items": self.n_items,
                "batch_size": self.batch_size, "shuffle": self.shuffle, "drop_last": self.drop_last}

    def load_state_dict(self, d):
        for k in ("n_items", "batch_size", "seed", "shuffle", "drop_last"):
            if d[k] != getattr(self, k):
                raise ValueError(f"cannot resume: {k} was {d[k]}, is now {getattr(self, k)}")
        self.epoch, self.position = int(d["epoch"]), int(d["position"])


# -------------------------------------------------------------------------------------------------
# Real data sets through `datasets` (the --preset=paper paths)
# -------------------------------------------------------------------------------------------------

# short names for the hub data sets the papers use: name -> (hub repo, default config, stream by default)
HUB_DATASETS = {
    "tinystories": ("roneneldan/TinyStories", None, False),
    "tofu": ("locuslab/TOFU", None, False),
    "wikipedia": ("wikimedia/wikipedia", "20231101.en", True),
}
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".text": "text", ".parquet": "parquet",
                  ".csv": "csv"}
TOFU_FIELDS = ("question", "answer", "paraphrased_answer", "paraphrased_question", "perturbed_answer")


def _local_files(path, config):
    """A file, or the files of a folder (<folder>/<config>.<ext>, <folder>/<config>/*, or every data file)."""
    if path.is_file():
        return [path]
    if config is not None:
        cands = [path / f"{config}{ext}" for ext in LOCAL_BUILDERS] + \
                sorted(p for p in (path / config).glob("*") if p.suffix in LOCAL_BUILDERS)
        files = [p for p in cands if p.is_file()]
        if not files:
            raise FileNotFoundError(f"no data file for config {config!r} in {path} "
                                    f"(looked for {config}.json/.jsonl/.parquet/.txt/.csv and {config}/*)")
        return files[:1] if files[0].parent == path else files
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in LOCAL_BUILDERS)
    if not files:
        raise FileNotFoundError(f"no .json/.jsonl/.txt/.parquet/.csv files in {path}")
    return files


def _blank(f):
    """An empty data file, or one of only whitespace (read only when small: a big file has data)."""
    size = f.stat().st_size
    return size == 0 or (size < 1 << 16 and not f.read_bytes().strip())


def load_text_dataset(name_or_path, split="train", *, config=None, n=None, streaming=None, sample_by="line",
                      separator=None, cache_dir=None):
    """
    Records (a list of dicts) from a local file or folder, or from the Hugging Face hub, always via `datasets`.
    - local: .json/.jsonl (also TOFU's JSON-lines files), .txt (one record {"text"} per line, or per
      paragraph/document with sample_by; separator splits each text further, e.g. "<|endoftext|>" for the
      TinyStories .txt files), .parquet, .csv; a folder with <config>.<ext> (a downloaded TOFU snapshot), or a
      folder written by Dataset.save_to_disk.
    - hub: a repo id, or a short name: "tinystories", "tofu" (with config=, e.g. "forget10_perturbed"),
      "wikipedia" (20231101.en, streamed: one article = one source; pass n for the first n).
    n keeps the first n records. Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) or unreachable, a hub name
    fails at once with a message saying how to pass a local copy.
    """
    import datasets
    if n is not None and n < 1:
        raise ValueError("n must be >= 1")
    path = Path(str(name_or_path)).expanduser()
    if path.exists():
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise KeyError(f"split {split!r} not in {path}; it has {list(ds)}")
                ds = ds[split]
        else:
            files = _local_files(path, config)
            builders = {LOCAL_BUILDERS.get(f.suffix) for f in files}
            if None in builders or len(builders) != 1:
                raise ValueError(f"cannot load {[str(f) for f in files]}: need one of {sorted(LOCAL_BUILDERS)}")
            if all(_blank(f) for f in files):     # else `datasets` says "Instruction 'train' corresponds to no data"
                raise ValueError(f"{files[0] if len(files) == 1 else path} has no records: "
                                 f"{'the file is' if len(files) == 1 else 'its data files are'} empty")
            builder = builders.pop()
            kw = {"sample_by": sample_by} if builder == "text" else {}
            try:
                ds = datasets.load_dataset(builder, data_files={split: [str(f) for f in files]}, split=split,
                                           cache_dir=cache_dir, **kw)
            except ValueError as e:               # e.g. a csv header alone, a json file holding []
                if "corresponds to no data" in str(e):
                    raise ValueError(f"{path} has no records") from e
                raise
    else:
        name = str(name_or_path)
        if Path(name).suffix in LOCAL_BUILDERS or os.sep in name and name.count("/") != 1:
            raise FileNotFoundError(f"no such file or folder: {name}")
        repo, default_config, stream = HUB_DATASETS.get(name.lower(), (name, None, False))
        streaming = stream if streaming is None else streaming
        if streaming and n is None:
            raise ValueError(f"streaming {name!r}: pass n (the number of records to keep)")
        try:
            ds = datasets.load_dataset(repo, config or default_config, split=split, streaming=streaming,
                                       cache_dir=cache_dir)
        except Exception as e:   # offline, unreachable, or not cached: say how to use a local copy instead
            conf = f", {config or default_config!r}" if (config or default_config) else ""
            raise FileNotFoundError(
                f"could not load {repo!r}{conf} from the Hugging Face hub ({type(e).__name__}: {str(e)[:200]}). "
                f"On a machine with access, save it: datasets.load_dataset({repo!r}{conf}, split={split!r})"
                f".to_json('data.jsonl'), then pass the local path (data.jsonl, or a folder holding "
                f"<config>.json) instead of {name!r}.") from e
    records = ds if n is None else (islice(ds, n) if streaming else ds.select(range(min(n, len(ds)))))
    records = [dict(r) for r in records]
    if not records and path.exists():
        raise ValueError(f"{path} has no records")
    if separator is not None:
        if not records or "text" not in records[0]:
            raise ValueError("separator needs text records")
        records = [{"text": t.strip()} for r in records for t in r["text"].split(separator) if t.strip()]
        records = records if n is None else records[:n]
    return records


def documents(records, text_field="text"):
    """(texts, source ids): one record = one source, ids 1..N (e.g. one Wikipedia article each)."""
    if not records:
        raise ValueError("no records")
    if text_field not in records[0]:
        raise KeyError(f"records have no field {text_field!r}; fields: {sorted(records[0])}")
    return [r[text_field] for r in records], list(range(1, len(records) + 1))


def check_tofu(records, fields=TOFU_FIELDS):
    """Raise unless every record has TOFU's fields (real_authors / world_facts: question, answer, perturbed_answer)."""
    if not records:
        raise ValueError("no TOFU records")
    for i, r in enumerate(records):
        missing = [f for f in fields if f not in r]
        if missing:
            raise KeyError(f"record {i} lacks TOFU fields {missing}; it has {sorted(r)}")
        if "perturbed_answer" in fields and (not isinstance(r["perturbed_answer"], list) or not r["perturbed_answer"]):
            raise ValueError(f"record {i}: perturbed_answer must be a non-empty list")
    return records


def load_tofu(config, path=None, n=None, cache_dir=None):
    """
    A TOFU config (e.g. "forget10_perturbed", "retain_perturbed", "world_facts_perturbed",
    "real_authors_perturbed") from the hub, or from `path` (a folder with <config>.json, or the file itself;
    World.save_tofu writes such a folder). Checks the fields the metrics need.
    """
    recs = load_text_dataset(path if path is not None else "tofu", config=config, n=n, cache_dir=cache_dir)
    if not config.endswith("_perturbed"):
        fields = ("question", "answer")
    elif config.startswith(("world_facts", "real_authors")):   # these have no paraphrases in TOFU
        fields = ("question", "answer", "perturbed_answer")
    else:
        fields = TOFU_FIELDS
    return check_tofu(recs, fields)
