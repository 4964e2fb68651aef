"""
hf.save_hf: our models written as Hugging Face folders that transformers' AutoModelForCausalLM loads with the same
logits (gpt2, GPT-Neo, llama with GQA, tied and untied, biases, Llama 3 RoPE scaling), that hf.load_hf reads back
exactly, and the checkpoint tokenizer written so that AutoTokenizer encodes and chat-templates like ours.
"""
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import data
import hf as hf_io
import model as M

hf_logging.set_verbosity_error()
V = 97
CONFIGS = {
    "gpt2_tied": dict(flavor="gpt2"),
    "gpt2_untied_nobias": dict(flavor="gpt2", tie_embeddings=False, bias=False),
    "gpt2_exact_gelu": dict(flavor="gpt2", gelu="exact"),
    "gpt_neo": dict(flavor="gpt2", attn_scale=False, attention_layers=("global", "local"), local_window=6),
    "llama_gqa_untied": dict(flavor="llama", n_kv_head=2, tie_embeddings=False, bias=False),
    "llama_tied_bias": dict(flavor="llama", tie_embeddings=True, bias=True),
    "llama3_rope": dict(flavor="llama", n_kv_head=1, bias=False, rope_theta=500000.0,
                        rope_scaling=(8.0, 1.0, 4.0, 16)),
}


def ours(kind, seed=0):
    cfg = M.ModelConfig(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=32, d_ff=48, **CONFIGS[kind])
    torch.manual_seed(seed)
    m = M.GPT(cfg).eval()
    with torch.no_grad():    # O(1) weights: a wrong layout would still match with near-zero logits
        for n, p in m.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if ("ln_" in n and n.endswith("weight")) else 0.3 * torch.randn_like(p))
        if kind == "gpt_neo":
            for b in m.blocks:
                b.attn.qkv.bias.zero_()      # GPT-Neo's q/k/v have no bias
    return m


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_save_hf_loads_in_transformers_with_equal_logits(tmp_path, kind):
    m = ours(kind)
    hf_io.save_hf(m, tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    idx = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = m(idx)[0], ref(idx).logits
    assert want.abs().max() > 1.0
    assert (got - want).abs().max().item() < 1e-4
    back = hf_io.load_hf(tmp_path)           # and our own loader reads it back exactly
    assert back.cfg.tie_embeddings == m.cfg.tie_embeddings
    with torch.no_grad():
        assert torch.equal(back(idx)[0], got)


def test_save_hf_refuses_what_it_cannot_export(tmp_path):
    m = ours("llama_gqa_untied")
    m.attach_adapter(0, torch.nn.Linear(32, 32))
    with pytest.raises(ValueError, match="adapters"):
        hf_io.save_hf(m, tmp_path)
    with pytest.raises(ValueError, match="HFTokenizer"):
        hf_io.save_hf(ours("gpt2_tied"), tmp_path, tokenizer=data.WordTokenizer(["a", "b"]))
    neo = ours("gpt_neo")
    with torch.no_grad():
        neo.blocks[0].attn.qkv.bias.fill_(0.1)
    with pytest.raises(ValueError, match="qkv bias"):
        hf_io.save_hf(neo, tmp_path)
    gqa_gpt2 = M.GPT(M.ModelConfig(flavor="gpt2", n_head=4, n_kv_head=2, n_embd=32, vocab_size=V))
    with pytest.raises(ValueError, match="grouped-query"):
        hf_io.save_hf(gqa_gpt2, tmp_path)


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_hf_tokenizer():
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    texts = ["The cat sat on the mat.", "Question: who?\nAnswer: the cat."] * 3
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                                      "<|im_end|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return data.HFTokenizer(tk.to_str(), eos_id=2, pad_id=0, chat_template=CHATML, name="tiny")


def test_save_hf_tokenizer_round_trip(tmp_path):
    tok = tiny_hf_tokenizer()
    m = M.GPT(M.ModelConfig(flavor="llama", vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, d_ff=32))
    hf_io.save_hf(m, tmp_path, tokenizer=tok)
    ref = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["The cat sat.", "Question: where is the mat?\nAnswer: here", "unseen zebra 123"]
    for t in texts:
        assert tok.encode(t) == ref(t, add_special_tokens=False).input_ids
        assert tok.encode(t, add_special_tokens=True) == ref(t).input_ids
    q = "Who sat on the mat?"
    want = ref.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
    assert tok.chat(q) == want
    assert ref.eos_token == "<|im_end|>" and ref.pad_token == "<|endoftext|>"
    _, back = hf_io.load_pretrained(tmp_path)              # our loader reads the folder's tokenizer back
    assert back.encode(texts[1]) == tok.encode(texts[1]) and back.eos_id == 2 and back.pad_id == 0
    assert back.chat(q) == tok.chat(q)


def test_save_hf_writes_bos_null_without_a_bos_and_usual_permissions(tmp_path):
    import json
    import os
    tok = tiny_hf_tokenizer()
    assert tok.bos_id is None                                             # the case: a tokenizer without BOS
    m = M.GPT(M.ModelConfig(flavor="gpt2", vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, d_ff=32))
    hf_io.save_hf(m, tmp_path, tokenizer=tok)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert "bos_token_id" in conf and conf["bos_token_id"] == tok.bos_id    # never left to GPT-2's 50256
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
