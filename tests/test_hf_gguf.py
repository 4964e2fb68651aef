"""
hf.load_pretrained on .gguf files the test writes itself (gguf.GGUFWriter, llama.cpp's layout: q/k rows permuted to
interleaved RoPE, tensors quantized by the gguf package), checked against transformers' own GGUF loader
(from_pretrained(gguf_file=...)) and against the float model the file was made from; the GGUF tokenizer against
transformers' GGUF tokenizer; the metadata parser against gguf.GGUFReader.
"""
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import accelerate  # noqa: F401  (requirements-test.txt: transformers needs it to load a GGUF file)
import gguf
import jinja2

import hf as hf_io

hf_logging.set_verbosity_error()

TEXTS = ["The river flows past the old mill, and the miller's children play on its banks.",
         "Question: Where was she born?\nAnswer: She was born in a small town by the sea.",
         "Tabs\tand  double  spaces, punctuation!? (brackets) and 'quotes' -- all kept."]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
          "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")   # SmolLM2's own template


def tiny_bpe():
    """(tokens, merges) of a byte-level BPE trained on TEXTS: specials first (control tokens), then 256 bytes."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TEXTS * 3, trainers.BpeTrainer(vocab_size=330, special_tokens=SPECIALS,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = tk.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))) and tokens[:3] == SPECIALS
    merges = [m if isinstance(m, str) else " ".join(m) for m in json_model(tk)["merges"]]   # "a b" before 0.20
    return tokens, merges


def json_model(tk):
    import json
    return json.loads(tk.to_str())["model"]


def llamacpp_permute(w, n_head):
    """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute): rotate-half rows -> interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama(vocab, tie, seed=0):
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=None, eos_token_id=2, pad_token_id=2)
    m = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # O(1) weights: HF's init gives near-zero logits that would match even a wrong conversion
        for n, p in m.named_parameters():
            p.copy_((1 + 0.2 * torch.randn(p.shape, generator=g)) if "norm" in n else 0.3 * torch.randn(p.shape, generator=g))
    return m.eval()


def write_gguf(path, hf, tokens, merges, qtype, pre="gpt-2"):
    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(merges)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def put(name, t, quantize=True):
        a = t.detach().float().numpy()
        if quantize and a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a)

    sd = hf.state_dict()
    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", llamacpp_permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        put(f"blk.{i}.attn_k.weight", llamacpp_permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def bpe():
    return tiny_bpe()


def logits(m, idx):
    with torch.no_grad():
        out = m(idx)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("qtype,tie", [(Q.F32, False), (Q.F16, True), (Q.Q8_0, False), (Q.Q4_0, True),
                                       (Q.Q4_1, False)])
def test_gguf_model_equals_transformers_gguf_loader(tmp_path, bpe, qtype, tie):
    tokens, merges = bpe
    src = tiny_llama(len(tokens), tie)
    write_gguf(tmp_path / "tiny.gguf", src, tokens, merges, qtype)
    ours, tok = hf_io.load_pretrained(tmp_path / "tiny.gguf")
    assert ours.cfg.flavor == "llama" and ours.cfg.n_kv_head == 2 and ours.cfg.tie_embeddings == tie
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    idx = torch.randint(0, len(tokens), (2, 40), generator=torch.Generator().manual_seed(1))
    want = logits(ref, idx)
    assert want.abs().max() > 1.0
    assert (logits(ours, idx) - want).abs().max().item() < 1e-4
    if qtype == Q.F32:   # unquantized: the float model the file was written from, independent of transformers' GGUF code
        assert (logits(ours, idx) - logits(src, idx)).abs().max().item() < 1e-4


def test_gguf_without_unpermute_differs(tmp_path, bpe):
    """The negative control: keeping llama.cpp's q/k order (skipping llamacpp_unpermute) changes the logits."""
    tokens, merges = bpe
    src = tiny_llama(len(tokens), False)
    write_gguf(tmp_path / "tiny.gguf", src, tokens, merges, Q.F32)
    ours, _ = hf_io.load_pretrained(tmp_path / "tiny.gguf")
    c, hd = ours.cfg, ours.cfg.head_dim
    idx = torch.randint(0, len(tokens), (1, 40), generator=torch.Generator().manual_seed(2))
    good = logits(ours, idx)
    with torch.no_grad():
        for b in ours.blocks:
            W = b.attn.qkv.weight
            nq, nk = c.n_head * hd, c.n_kv_head * hd
            W[:nq] = llamacpp_permute(W[:nq].clone(), c.n_head)
            W[nq:nq + nk] = llamacpp_permute(W[nq:nq + nk].clone(), c.n_kv_head)
    assert (logits(ours, idx) - good).abs().max().item() > 0.1


def test_unpermute_inverts_llamacpp_permute():
    w = torch.randn(4 * 16, 8, dtype=torch.float64)
    assert torch.equal(hf_io.llamacpp_unpermute(llamacpp_permute(w, 4), 4), w)
    # worked example, one head of dim 4: rotate-half pairs rows (0, 2) and (1, 3); llama.cpp puts pairs adjacent
    assert llamacpp_permute(torch.arange(4.0)[:, None], 1).flatten().tolist() == [0, 2, 1, 3]


def test_gguf_tokenizer_equals_transformers(tmp_path, bpe):
    tokens, merges = bpe
    write_gguf(tmp_path / "tiny.gguf", tiny_llama(len(tokens), True), tokens, merges, Q.F32)
    meta, _ = hf_io.read_gguf(tmp_path / "tiny.gguf")
    tok = hf_io.gguf_tokenizer(meta)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in TEXTS + ["unseen words: zebra quantum", "<|im_start|>user\nhi<|im_end|>\n"]:
        ids = tok.encode(text)
        assert ids == ref(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
    assert tok.encode("<|im_start|>")[0] == 1 and tok.eos_id == 2 and tok.pad_id == 2 and tok.bos_id is None
    assert tok.vocab_size == len(tokens)


def test_chatml_equals_jinja_render(tmp_path, bpe):
    tokens, merges = bpe
    write_gguf(tmp_path / "tiny.gguf", tiny_llama(len(tokens), True), tokens, merges, Q.F32)
    tok = hf_io.gguf_tokenizer(hf_io.read_gguf(tmp_path / "tiny.gguf")[0])
    q = "Where was Ana Vell born?"
    want = jinja2.Template(CHATML).render(messages=[{"role": "user", "content": q}], add_generation_prompt=True)
    assert tok.chat(q) == want
    assert tok.chat(q).endswith("<|im_start|>assistant\n")


def test_read_gguf_equals_gguf_reader(tmp_path, bpe):
    tokens, merges = bpe
    write_gguf(tmp_path / "tiny.gguf", tiny_llama(len(tokens), False), tokens, merges, Q.Q8_0)
    meta, tensors = hf_io.read_gguf(tmp_path / "tiny.gguf")
    r = gguf.GGUFReader(str(tmp_path / "tiny.gguf"))
    want = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert meta == want
    for t in r.tensors:
        qtype, shape, data = tensors[t.name]
        assert qtype == t.tensor_type and shape == tuple(int(n) for n in t.shape[::-1])
        assert np.array_equal(np.asarray(data).reshape(-1), np.ascontiguousarray(t.data).view(np.uint8).reshape(-1))


def test_gguf_errors(tmp_path, bpe):
    tokens, merges = bpe
    write_gguf(tmp_path / "tiny.gguf", tiny_llama(len(tokens), True), tokens, merges, Q.F32)
    whole = (tmp_path / "tiny.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[:-1000])
    with pytest.raises(ValueError, match="truncated"):
        hf_io.load_pretrained(tmp_path / "cut.gguf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf_io.load_pretrained(tmp_path / "missing.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"NOPE" + bytes(40))
    with pytest.raises(ValueError, match="not a GGUF file"):
        hf_io.load_pretrained(tmp_path / "bad.gguf")
