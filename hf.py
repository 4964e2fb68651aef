"""
Hugging Face checkpoints in and out, without `transformers` at run time: local GPT-2 and LLaMA-family
folders (safetensors or .bin, sharded or not) load into model.GPT.
"""
import json
import re
from pathlib import Path

import torch

from model import GPT, ModelConfig, rope_inv_freq


def config_from_hf(hf):
    """Our ModelConfig from a Hugging Face config.json dict (model_type gpt2 or llama; SmolLM and Llama 3 are llama).
    Anything our model cannot compute exactly (another activation, another RoPE scaling, ...) is an error rather
    than a silently different model. Dropout is 0: the loaded model is for evaluation and unlearning runs."""
    mt = hf.get("model_type")
    if mt == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):        # both are the tanh approximation we compute
            raise ValueError(f"gpt2 activation_function {act!r} is not supported (only gelu_new)")
        if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
            raise ValueError("gpt2 checkpoints with non-standard attention scaling are not supported")
        n_embd = hf["n_embd"]
        return ModelConfig(flavor="gpt2", vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", hf.get("n_ctx")),
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=n_embd,
                           d_ff=hf.get("n_inner") or 4 * n_embd,          # n_inner None means 4 * n_embd
                           bias=True, tie_embeddings=hf.get("tie_word_embeddings", True),
                           norm_eps=hf.get("layer_norm_epsilon", 1e-5), dropout=0.0)
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
    raise ValueError(f"model_type {mt!r} is not supported; supported: 'gpt2', 'llama' (incl. SmolLM, Llama 3)")


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
        part = load_file(str(f), device="cpu") if ext == "safetensors" else \
            torch.load(f, map_location="cpu", weights_only=True)
        if sd.keys() & part.keys():
            raise ValueError(f"tensors {sorted(sd.keys() & part.keys())[:5]} appear in more than one shard of {folder}")
        sd.update(part)
    return sd


def convert_hf_state_dict(hf_sd, cfg):
    """HF tensor names and layouts -> ours, {our_name: tensor}. Unknown HF names raise; see load_hf for the
    check that every one of our parameters is filled.
    gpt2: HF's Conv1D stores weights (in, out), nn.Linear wants (out, in), so c_attn, c_proj, c_fc are transposed;
          c_attn is already q|k|v along its outputs, which is our fused qkv.
    llama: q_proj, k_proj, v_proj are concatenated (in that order) into qkv. HF's llama weights are already
          permuted for rotate-half RoPE, which we use too, so no permutation here."""
    out, unexpected, parts = {}, [], {}
    tied = cfg.tie_embeddings
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
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()))
    sd = convert_hf_state_dict(read_hf_tensors(folder), cfg)
    # build on the meta device: no time and memory spent on a random init that is overwritten anyway
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device).to(dtype)
    if cfg.tie_embeddings:              # to_empty makes new tensors per module, which unties them: tie again
        model.lm_head.weight = model.wte.weight
    if cfg.flavor == "llama":           # non-persistent buffer: recompute, in float32 as the model expects
        model.inv_freq = rope_inv_freq(cfg).to(device)
    params = {n: p for n, p in model.named_parameters() if ".adapter." not in n}   # tied lm_head appears once
    missing, extra = sorted(params.keys() - sd.keys()), sorted(sd.keys() - params.keys())
    if missing or extra:
        raise KeyError(f"checkpoint in {folder} does not fit the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for n, p in params.items():
            if sd[n].shape != p.shape:
                raise ValueError(f"{n}: checkpoint shape {tuple(sd[n].shape)} != model shape {tuple(p.shape)}")
            p.copy_(sd[n])
    return model.eval()
