"""
hf.load_hf against Hugging Face transformers itself (litgpt's pattern): build tiny random HF models, save them
to a folder the way the hub ships them, load with our loader, and require the same logits in float32.
transformers is a test-only dependency; no run-time module imports it.
"""
import json
import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import model as M
import hf as hf_io

hf_logging.set_verbosity_error()   # tiny vocabularies make transformers warn about the default bos/eos ids
V = 97


def randomize(hf, seed):
    # HF's init (std 0.02) gives near-zero logits that would match even a wrong conversion; O(1) weights do not
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n or "ln_" in n:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return hf.eval()


def tiny_gpt2(seed=0):
    return randomize(GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=V, n_positions=64)), seed)


def tiny_llama(seed=0, **kw):
    cfg = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg.update(kw)
    return randomize(LlamaForCausalLM(LlamaConfig(**cfg)), seed)


LLAMA3 = dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=16), rope_theta=500000.0)


def max_logit_diff(hf, ours, T=40, B=2):
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits.float()
        got, _ = ours(idx)
    assert ref.abs().max() > 1.0          # the comparison means something only if logits are not all ~0
    return (ref - got).abs().max().item()


def save_bin(hf, folder, *, gpt2_hub_layout=False):
    """pytorch_model.bin as older checkpoints ship it (transformers 5 always writes safetensors)."""
    hf.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    sd = dict(hf.state_dict())
    if gpt2_hub_layout:   # the hub's original gpt2: no "transformer." prefix, causal-mask buffers saved as weights
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
        for i in range(hf.config.n_layer):
            sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
            sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, folder / "pytorch_model.bin")


def test_gpt2_safetensors(tmp_path):
    hf = tiny_gpt2()
    hf.save_pretrained(tmp_path)
    ours = hf_io.load_hf(tmp_path)
    assert ours.cfg.flavor == "gpt2" and ours.cfg.d_ff == 4 * 32 and ours.cfg.tie_embeddings
    assert ours.lm_head.weight is ours.wte.weight
    assert max_logit_diff(hf, ours) < 1e-4


def test_gpt2_exact_gelu_checkpoint(tmp_path):
    # activation_function "gelu" is the erf GELU: loaded as gelu="exact" (the tanh form would differ visibly)
    hf = randomize(GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=V, n_positions=64,
                                              activation_function="gelu")), 5)
    hf.save_pretrained(tmp_path)
    ours = hf_io.load_hf(tmp_path)
    assert ours.cfg.gelu == "exact" and max_logit_diff(hf, ours) < 1e-4


def test_gpt2_bin_hub_layout(tmp_path):
    hf = tiny_gpt2(seed=3)
    save_bin(hf, tmp_path, gpt2_hub_layout=True)
    ours = hf_io.load_hf(tmp_path)
    assert max_logit_diff(hf, ours) < 1e-4


@pytest.mark.parametrize("kw", [dict(num_key_value_heads=2, tie_word_embeddings=False),
                                dict(num_key_value_heads=4, tie_word_embeddings=True),
                                dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True),
                                dict(num_key_value_heads=1, **LLAMA3)],
                         ids=["gqa-untied", "mha-tied", "bias", "llama3-rope"])
def test_llama_safetensors(tmp_path, kw):
    hf = tiny_llama(**kw)
    hf.save_pretrained(tmp_path)
    ours = hf_io.load_hf(tmp_path)
    assert ours.cfg.n_kv_head == kw["num_key_value_heads"]
    assert (ours.lm_head.weight is ours.wte.weight) == kw.get("tie_word_embeddings", False)
    assert max_logit_diff(hf, ours) < 1e-4


def test_llama3_scaling_is_used(tmp_path):
    """The llama3 case above can only catch a scaling bug if dropping the scaling changes the logits."""
    hf = tiny_llama(**LLAMA3)
    hf.save_pretrained(tmp_path)
    ours = hf_io.load_hf(tmp_path)
    assert ours.cfg.rope_scaling == (8.0, 1.0, 4.0, 16.0) and ours.cfg.rope_theta == 500000.0
    ours.inv_freq = M.rope_inv_freq(M.ModelConfig(**{**ours.cfg.__dict__, "rope_scaling": ()}))
    assert max_logit_diff(hf, ours) > 1e-2


def test_llama_bin_and_sharded(tmp_path):
    hf = tiny_llama(seed=5)
    save_bin(hf, tmp_path / "bin")
    assert max_logit_diff(hf, hf_io.load_hf(tmp_path / "bin")) < 1e-4
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert max_logit_diff(hf, hf_io.load_hf(tmp_path / "sharded")) < 1e-4
    # a sharded .bin with its index, as older multi-file checkpoints ship
    sd, d = hf.state_dict(), tmp_path / "binshards"
    hf.save_pretrained(d, max_shard_size="20KB")
    for f in d.glob("*.safetensors*"):
        f.unlink()
    names = sorted(sd)
    weight_map = {n: f"pytorch_model-{i % 3}.bin" for i, n in enumerate(names)}
    for j in range(3):
        torch.save({n: sd[n] for n in names if weight_map[n] == f"pytorch_model-{j}.bin"}, d / f"pytorch_model-{j}.bin")
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert max_logit_diff(hf, hf_io.load_hf(d)) < 1e-4


def test_bf16_load_keeps_rope_in_float32(tmp_path):
    hf = tiny_llama(tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    ours = hf_io.load_hf(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert ours.inv_freq.dtype == torch.float32 and ours.lm_head.weight is ours.wte.weight
    assert torch.equal(ours.inv_freq, M.rope_inv_freq(ours.cfg))
    assert torch.equal(ours.blocks[0].mlp.down.weight, hf.model.layers[0].mlp.down_proj.weight.bfloat16())


def test_config_from_hf_formats():
    # transformers < 5 wrote rope_theta at the top level and rope_scaling beside it; >= 5 writes rope_parameters
    base = dict(model_type="llama", vocab_size=10, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32)
    old = hf_io.config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": dict(rope_type="llama3", factor=32.0,
                            low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)})
    new = hf_io.config_from_hf({**base, "rope_parameters": dict(rope_type="llama3", rope_theta=5e5, factor=32.0,
                            low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)})
    assert old == new and new.rope_scaling == (32.0, 1.0, 4.0, 8192.0) and new.rope_theta == 5e5
    plain = hf_io.config_from_hf(base)
    assert plain.rope_scaling == () and plain.rope_theta == 10000.0 and plain.n_kv_head == 2
    assert not plain.tie_embeddings and not plain.bias
    g = hf_io.config_from_hf(dict(model_type="gpt2", vocab_size=10, n_positions=16, n_layer=1, n_head=2, n_embd=8,
                              n_inner=None, layer_norm_epsilon=1e-5))
    assert g.d_ff == 32 and g.block_size == 16 and g.tie_embeddings and g.gelu == "tanh"
    for act, gelu in [("gelu_new", "tanh"), ("gelu_pytorch_tanh", "tanh"), ("gelu", "exact")]:
        assert hf_io.config_from_hf(dict(model_type="gpt2", vocab_size=10, n_positions=16, n_layer=1, n_head=2,
                                         n_embd=8, activation_function=act)).gelu == gelu
    with pytest.raises(ValueError, match="activation_function 'relu'"):
        hf_io.config_from_hf(dict(model_type="gpt2", vocab_size=10, n_positions=16, n_layer=1, n_head=2, n_embd=8,
                                  activation_function="relu"))
    for bad in [dict(base, model_type="mistral"), dict(base, hidden_act="gelu"),
                dict(base, rope_scaling=dict(type="linear", factor=2.0)), dict(base, head_dim=4),
                dict(base, attention_bias=True)]:
        with pytest.raises(ValueError):
            hf_io.config_from_hf(bad)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf_io.load_hf(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_io.load_hf(tmp_path)
    hf = tiny_llama()
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        hf_io.load_hf(tmp_path)
    hf.save_pretrained(tmp_path / "sh", max_shard_size="20KB")
    next((tmp_path / "sh").glob("model-0000*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        hf_io.load_hf(tmp_path / "sh")


def test_missing_and_unexpected_tensors(tmp_path):
    hf = tiny_llama()
    sd = dict(hf.state_dict())
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    dropped = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    torch.save(dropped, tmp_path / "pytorch_model.bin")
    with pytest.raises(KeyError, match=r"blocks\.1\.mlp\.up\.weight"):
        hf_io.load_hf(tmp_path)
    torch.save({k: v for k, v in sd.items() if k != "model.layers.0.self_attn.k_proj.weight"},
               tmp_path / "pytorch_model.bin")
    with pytest.raises(KeyError, match=r"k_proj"):
        hf_io.load_hf(tmp_path)
    torch.save({**sd, "model.layers.0.mlp.extra.weight": torch.zeros(3)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(KeyError, match=r"mlp\.extra"):
        hf_io.load_hf(tmp_path)
    torch.save({**sd, "model.layers.2.mlp.up_proj.weight": torch.zeros(48, 32)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(KeyError, match=r"unexpected \['blocks\.2\.mlp\.up\.weight'\]"):
        hf_io.load_hf(tmp_path)
    torch.save({**sd, "model.layers.0.mlp.up_proj.weight": torch.zeros(40, 32)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="shape"):
        hf_io.load_hf(tmp_path)


def test_a_damaged_safetensors_file_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(hf_io.CheckpointFileError, match=re.escape(str(tmp_path / "model.safetensors"))):
        hf_io.read_hf_tensors(tmp_path)
