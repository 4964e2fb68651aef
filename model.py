"""
The one GPT / LLaMA definition every paper script shares, in the spirit of nanoGPT's model.py.

Two flavors, one class:
- gpt2:  LayerNorm, GELU MLP, learned absolute positions, tied embeddings, biases.
- llama: RMSNorm, SwiGLU MLP, RoPE (Hugging Face rotate-half convention), grouped-query attention,
         no biases, optional tied embeddings.

Hook points the five papers need (see ../shared/DESIGN.md), all given per forward call, never as
global state:
- mlp_mask:    multiplies the MLP hidden activation (after the nonlinearity, after gating for SwiGLU,
               before the down projection). One tensor broadcastable to (B, T, d_ff) used in every
               layer, or a list with one entry per layer (None = no mask in that layer). Instead of a
               tensor, an object with .mlp_forward(mlp, x) may compute the masked MLP itself (fast paths).
- adapters:    attach_adapter(layer, module) adds module(x_normed, ctx) to that block's MLP output;
               ctx is the `adapter_ctx` object passed to forward (per-row ids, block-lists, ...).
- doc_ids:     (B, T) int per-token document ids; a token attends to earlier tokens of its own document
               only (causal AND same document). Packed rows cannot leak between sources.
- value vectors: column i of layer l's down projection, model.value_vector(l, i) (Geva et al.).

Conventions: targets are already shifted (targets[:, t] is the token that follows idx[:, t]), and
-100 marks a position that is ignored by the loss and by token_logprobs.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    flavor: str = "gpt2"          # "gpt2" or "llama"
    vocab_size: int = 512
    block_size: int = 256         # longest sequence (learned positions need it; RoPE is computed up to it)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0            # llama GQA: key/value heads; 0 means = n_head
    n_embd: int = 128
    d_ff: int = 512               # MLP hidden width, explicit (NULLs needs N_gen + N_pool)
    bias: bool = True             # linear-layer biases (gpt2: True; llama checkpoints: False)
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()      # Llama 3.x: (factor, low_freq_factor, high_freq_factor, original_max_pos); () = none
    dropout: float = 0.0

    def __post_init__(self):
        if self.flavor not in ("gpt2", "llama"):
            raise ValueError(f"flavor must be 'gpt2' or 'llama', got {self.flavor!r}")
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError("n_embd must divide by n_head and n_head by n_kv_head")
        self.rope_scaling = tuple(self.rope_scaling or ())

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # upcast for the statistics, as the LLaMA reference does, then cast back and scale
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


def rope_inv_freq(cfg):
    """inv_freq_j = theta^(-2j/d_head), with Llama 3's piecewise frequency scaling when configured."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if cfg.rope_scaling:
        factor, low_ff, high_ff, old_ctx = cfg.rope_scaling
        wavelen = 2 * math.pi / inv_freq
        low_wavelen, high_wavelen = old_ctx / low_ff, old_ctx / high_ff
        smooth = (old_ctx / wavelen - low_ff) / (high_ff - low_ff)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq.float()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        # one fused projection for q, k, v (n_head + 2 * n_kv_head heads); checkpoints are split/joined on load
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * hd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_head * hd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x, rope, attn_mask, cache_layer):
        B, T, _ = x.shape
        cfg, hd = self.cfg, self.cfg.head_dim
        q, k, v = self.qkv(x).split([cfg.n_head * hd, cfg.n_kv_head * hd, cfg.n_kv_head * hd], dim=-1)
        q = q.view(B, T, cfg.n_head, hd).transpose(1, 2)     # (B, nh, T, hd)
        k = k.view(B, T, cfg.n_kv_head, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, cfg.n_kv_head, hd).transpose(1, 2)
        if rope is not None:
            cos, sin = rope                                  # (B, 1, T, hd)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if cache_layer is not None:                          # append this step's keys/values
            k, v = cache_layer.append(k, v)
        if cfg.n_kv_head != cfg.n_head:                      # GQA: share each kv head across a group
            rep = cfg.n_head // cfg.n_kv_head
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        # attn_mask None = plain causal attention (the fast path when there are no documents or cache)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, cfg.n_head * hd)
        return self.proj(y)


class MLP(nn.Module):
    """up/gate/down. The hidden activation h (B, T, d_ff) is where masks act; down.weight[:, i] is value vector i."""
    def __init__(self, cfg):
        super().__init__()
        self.flavor = cfg.flavor
        self.up = nn.Linear(cfg.n_embd, cfg.d_ff, bias=cfg.bias)
        if cfg.flavor == "llama":
            self.gate = nn.Linear(cfg.n_embd, cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.n_embd, bias=cfg.bias)

    def hidden(self, x):
        if self.flavor == "llama":
            return F.silu(self.gate(x)) * self.up(x)         # SwiGLU
        return F.gelu(self.up(x), approximate="tanh")         # GPT-2's gelu_new

    def forward(self, x, mask=None):
        if mask is not None and not isinstance(mask, torch.Tensor):
            # a mask object computes the masked MLP itself (e.g. NULLs' fast path, which evaluates only the
            # active neurons); it must equal down(hidden(x) * its_dense_mask)
            return mask.mlp_forward(self, x)
        h = self.hidden(x)                                   # (B, T, d_ff)
        if mask is not None:
            h = h * mask.to(h.dtype)
        return self.down(h)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        Norm = (lambda d: RMSNorm(d, cfg.norm_eps)) if cfg.flavor == "llama" else \
               (lambda d: nn.LayerNorm(d, eps=cfg.norm_eps, bias=cfg.bias))
        self.ln_1, self.attn = Norm(cfg.n_embd), Attention(cfg)
        self.ln_2, self.mlp = Norm(cfg.n_embd), MLP(cfg)
        self.adapter = None      # optional module(x_normed, ctx) -> (B, T, n_embd), added to the MLP output
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, attn_mask, mlp_mask, adapter_ctx, cache_layer):
        x = x + self.drop(self.attn(self.ln_1(x), rope, attn_mask, cache_layer))
        h = self.ln_2(x)
        out = self.mlp(h, mlp_mask)
        if self.adapter is not None:
            out = out + self.adapter(h, adapter_ctx)
        return x + self.drop(out)


class KVCache:
    """Per-layer keys/values plus the document ids and positions of the cached tokens."""
    class Layer:
        def __init__(self):
            self.k = self.v = None

        def append(self, k, v):
            self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
            self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
            return self.k, self.v

    def __init__(self, n_layer):
        self.layers = [KVCache.Layer() for _ in range(n_layer)]
        self.doc_ids = None      # (B, T_cached)
        self.next_pos = None     # (B,) position of the next token in each row

    def __len__(self):
        return 0 if self.doc_ids is None else self.doc_ids.shape[1]


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.flavor == "gpt2":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        else:
            self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = RMSNorm(cfg.n_embd, cfg.norm_eps) if cfg.flavor == "llama" else \
            nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections (attention out, MLP down)
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.down.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _apply(self, fn, *args, **kwargs):
        # .to(bfloat16)/.half() would also round the RoPE frequencies; keep them float32 whatever the weights are
        out = super()._apply(fn, *args, **kwargs)
        if self.cfg.flavor == "llama":
            self.inv_freq = rope_inv_freq(self.cfg).to(self.inv_freq.device)
        return out

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    # --- hook points -------------------------------------------------------------------------
    def attach_adapter(self, layer, module):
        """Add module(x_normed, ctx) to block `layer`'s MLP output. Its parameters become the model's."""
        self.blocks[layer].adapter = module
        return module

    def value_vector(self, layer, i):
        """Value vector i of `layer`: column i of the down projection, a view of shape (n_embd,)."""
        return self.blocks[layer].mlp.down.weight[:, i]

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    # --- forward -----------------------------------------------------------------------------
    def forward(self, idx, targets=None, *, doc_ids=None, mlp_mask=None, adapter_ctx=None, cache=None):
        """
        idx: (B, T) token ids. targets: (B, T) next tokens, -100 = ignore.
        doc_ids: (B, T) per-token document ids (causal AND same document).
        mlp_mask: tensor broadcastable to (B, T, d_ff), or a list of n_layer such tensors / None.
        cache: a KVCache to read from and append to (generation).
        Returns (logits (B, T, V), mean loss over non-ignored targets or None).
        """
        B, T = idx.shape
        dev = idx.device
        plain_causal = doc_ids is None and cache is None
        if doc_ids is None:
            doc_ids = torch.zeros(B, T, dtype=torch.long, device=dev)
        past = len(cache) if cache is not None else 0
        # positions restart at 0 with every document, so a document packed into a row is computed exactly as
        # if it stood alone (left padding has doc id -1 and is its own "document"). With a cache, the new
        # tokens continue the last cached document.
        t = torch.arange(T, device=dev).expand(B, T)
        if cache is not None and cache.next_pos is not None:
            pos = cache.next_pos[:, None] + t
        else:
            new_doc = torch.ones(B, T, dtype=torch.bool, device=dev)
            new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
            pos = t - torch.cummax(t * new_doc, dim=1).values                       # (B, T)
        if pos.max().item() >= self.cfg.block_size:
            raise ValueError(f"sequence position {pos.max().item()} exceeds block_size {self.cfg.block_size}")

        # attention mask over all keys (cached + new): causal AND same document
        keys_doc = doc_ids if past == 0 else torch.cat([cache.doc_ids, doc_ids], dim=1)   # (B, past+T)
        attn_mask = None
        if not plain_causal:
            q_abs = torch.arange(past, past + T, device=dev)
            k_abs = torch.arange(past + T, device=dev)
            causal = k_abs[None, :] <= q_abs[:, None]                                   # (T, past+T)
            attn_mask = (causal[None] & (doc_ids[:, :, None] == keys_doc[:, None, :]))[:, None]  # (B,1,T,past+T)
        if cache is not None:
            cache.doc_ids, cache.next_pos = keys_doc, pos[:, -1] + 1

        x = self.wte(idx)
        rope = None
        if self.cfg.flavor == "gpt2":
            x = x + self.wpe(pos)
        else:
            freqs = pos[..., None].float() * self.inv_freq                              # (B, T, hd/2)
            emb = torch.cat([freqs, freqs], dim=-1)[:, None]                            # (B, 1, T, hd)
            rope = (emb.cos().to(x.dtype), emb.sin().to(x.dtype))
        x = self.drop(x)
        masks = mlp_mask if isinstance(mlp_mask, (list, tuple)) else [mlp_mask] * self.cfg.n_layer
        if len(masks) != self.cfg.n_layer:
            raise ValueError(f"got {len(masks)} per-layer MLP masks for {self.cfg.n_layer} layers")
        for i, block in enumerate(self.blocks):
            x = block(x, rope, attn_mask, masks[i], adapter_ctx, cache.layers[i] if cache is not None else None)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def token_logprobs(self, idx, targets, **kw):
        """(B, T) float32 log p(targets[:, t] | idx[:, :t+1]); 0 where targets == -100."""
        logits, _ = self(idx, **kw)
        logp = torch.log_softmax(logits.float(), dim=-1)
        keep = targets != -100
        lp = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        return lp * keep

    # --- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, *, temperature=0.0, top_k=None, eos_id=None, pad_id=0,
                 use_cache=True, generator=None, mlp_mask=None, adapter_ctx=None):
        """
        Batched generation. prompts: a (B, T) LongTensor or a list of token lists of any lengths (left-padded
        here; padding is invisible to attention and positions). temperature 0 = greedy.
        mlp_mask must broadcast with (B, 1, d_ff) (one mask per row, e.g. a source's sink mask).
        Returns (B, max_new_tokens) new tokens; after a row emits eos_id it is filled with eos_id.
        """
        dev = self.wte.weight.device
        if isinstance(prompts, torch.Tensor):
            idx = prompts.to(dev)
            doc = torch.zeros_like(idx)
        else:
            if not prompts or any(len(p) == 0 for p in prompts):
                raise ValueError("generate needs at least one non-empty prompt per row")
            L = max(len(p) for p in prompts)
            idx = torch.tensor([[pad_id] * (L - len(p)) + list(p) for p in prompts], device=dev)
            doc = torch.tensor([[-1] * (L - len(p)) + [0] * len(p) for p in prompts], device=dev)
        B = idx.shape[0]
        kw = dict(mlp_mask=mlp_mask, adapter_ctx=adapter_ctx)
        cache = KVCache(self.cfg.n_layer) if use_cache else None
        out = torch.empty(B, 0, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        step_idx, step_doc = idx, doc
        for _ in range(max_new_tokens):
            if use_cache:
                logits, _ = self(step_idx, doc_ids=step_doc, cache=cache, **kw)
            else:   # recompute everything: the slow reference the cache is tested against
                logits, _ = self(torch.cat([idx, out], 1), doc_ids=torch.cat([doc, torch.zeros_like(out)], 1), **kw)
            logits = logits[:, -1, :].float()
            if temperature <= 0:
                nxt = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1, None]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out = torch.cat([out, nxt[:, None]], 1)
            step_idx, step_doc = nxt[:, None], torch.zeros(B, 1, dtype=torch.long, device=dev)
            if eos_id is not None and bool(done.all()):
                break
        if out.shape[1] < max_new_tokens:   # every row finished early
            out = torch.cat([out, torch.full((B, max_new_tokens - out.shape[1]), eos_id, device=dev)], 1)
        return out


# -------------------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints from a local folder (no `transformers` needed at run time)
# -------------------------------------------------------------------------------------------------
# Kept to this section's needs so the section reads on its own.
import json
import re
from pathlib import Path


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


# -------------------------------------------------------------------------------------------------
# Checkpoints, config parsing and the small shared training loop
# -------------------------------------------------------------------------------------------------
# (this section's imports live here, so the model core above stays self-contained)
import dataclasses
import os
import random
import sys
import tempfile
import time
import types
import typing
from contextlib import nullcontext

import numpy as np
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


def pick_device(name="auto"):
    """'auto' -> cuda, then mps, then cpu. Anything else must be a device torch knows (cpu, cuda:1, mps)."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from e
    return name


# --- config parsing: `python x.py --preset=paper --lr=3e-4` -------------------------------------

_UNIONS = (typing.Union, types.UnionType)


def _auto(s):
    """A field whose type we cannot tell (default None, no usable annotation): int, else float, else str."""
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s


def _convert(s, typ, default):
    """Parse the command-line string s for a field annotated `typ` (typing.Any = unknown) with this default."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if s == "None":
        # nanoGPT's configurator rejected None defaults (its PR #156); here a None default means "may be None"
        if default is None or (origin in _UNIONS and type(None) in args):
            return None
        raise ValueError("None is allowed only for Optional fields and fields whose default is None")
    if origin in _UNIONS:                                       # Optional[X] parses as X; wider unions by guess
        rest = [a for a in args if a is not type(None)]
        typ = rest[0] if len(rest) == 1 else typing.Any
        origin, args = typing.get_origin(typ), typing.get_args(typ)
    if typ is typing.Any and default is not None and default is not dataclasses.MISSING:
        typ, origin, args = type(default), None, ()
    if typ is typing.Any:
        return _auto(s)
    if typ is bool:
        if s.lower() in ("true", "1", "yes"):
            return True
        if s.lower() in ("false", "0", "no"):
            return False
        raise ValueError("expected a bool: true/false/1/0/yes/no")
    if typ is int:
        try:
            return int(s)
        except ValueError:
            f = float(s)                                        # 1e4 is a fine way to write 10000 steps
            if not f.is_integer():
                raise ValueError(f"expected an int, got {s!r}") from None
            return int(f)
    if typ in (tuple, list) or origin in (tuple, list):
        parts = [p.strip() for p in s.strip().strip("()[]").split(",")]
        parts = [p for p in parts if p]                         # "()" and the trailing comma of "(5,)"
        if args and args[-1] is not Ellipsis and origin is tuple:   # tuple[float, float]: fixed length
            if len(args) != len(parts):
                raise ValueError(f"expected {len(args)} comma-separated values, got {len(parts)}")
            el = list(args)
        elif args:                                              # tuple[int, ...], list[int]
            el = [args[0]] * len(parts)
        elif default and len(default) == len(parts):            # bare `tuple`: follow the default's elements
            el = [type(d) for d in default]
        elif default and len({type(d) for d in default}) == 1:
            el = [type(default[0])] * len(parts)
        else:
            el = [typing.Any] * len(parts)
        vals = [_convert(p, t, dataclasses.MISSING) for p, t in zip(parts, el)]
        return tuple(vals) if tuple in (typ, origin) else vals
    return typ(s)                                               # float, str, or any class built from a string


def parse_config(ConfigClass, argv=None, presets=None):
    """
    Build a ConfigClass (a dataclass whose defaults are the CPU setting) from `--preset=NAME --key=value ...`.
    The preset's overrides apply first wherever --preset stands, then each --key=value, converted to the
    field's type (bool, int, float, str, tuples/lists like 0.9,0.95 or (0.9,0.95), None for Optional fields).
    presets defaults to the PRESETS dict of the module that defines ConfigClass. If ConfigClass has a field
    `preset`, it records the preset's name. Unknown keys or presets, malformed arguments and bad values exit
    with status 2 and a message listing the valid keys; --help prints them with their defaults and exits 0.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if presets is None:
        presets = getattr(sys.modules.get(ConfigClass.__module__), "PRESETS", None) or {}
    MISSING = dataclasses.MISSING
    defaults = {f.name: f.default if f.default is not MISSING else
                f.default_factory() if f.default_factory is not MISSING else MISSING
                for f in dataclasses.fields(ConfigClass)}
    try:
        hints = typing.get_type_hints(ConfigClass)
    except Exception:                                           # unresolvable string annotations: use the defaults
        hints = {}
    hints = {k: (typing.Any if isinstance(v, str) or v is object else v) for k, v in hints.items()}

    def usage():
        lines = [f"usage: python {os.path.basename(sys.argv[0] or 'script')} [--preset=NAME] [--key=value ...]",
                 f"presets: {', '.join(presets) if presets else '(none)'}", "keys (default):"]
        w = max((len(k) for k in defaults), default=0)
        lines += [f"  --{k:<{w}}  {'(required)' if v is MISSING else repr(v)}" for k, v in defaults.items()]
        return "\n".join(lines)

    def fail(msg):
        print(f"error: {msg}\n{usage()}", file=sys.stderr)
        raise SystemExit(2)

    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        raise SystemExit(0)
    preset, overrides = None, {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            fail(f"malformed argument {arg!r}: expected --key=value")
        key, val = arg[2:].split("=", 1)
        key = key.replace("-", "_")                             # --max-steps works like --max_steps
        if key == "preset":
            if preset is not None:
                fail("--preset given twice")
            if val not in presets:
                fail(f"unknown preset {val!r}; presets: {', '.join(presets) if presets else '(none)'}")
            preset = val
            continue
        if key not in defaults:
            fail(f"unknown key {key!r}")
        if key in overrides:
            fail(f"--{key} given twice")
        try:
            overrides[key] = _convert(val, hints.get(key, typing.Any), defaults[key])
        except (ValueError, TypeError, SyntaxError) as e:
            fail(f"bad value for --{key}: {val!r} ({e})")
    values = dict(presets[preset]) if preset is not None else {}
    unknown = [k for k in values if k not in defaults]
    if unknown:
        fail(f"preset {preset!r} sets unknown keys {unknown}")
    values.update(overrides)
    if preset is not None and "preset" in defaults and "preset" not in overrides:
        values["preset"] = preset
    try:
        return ConfigClass(**values)
    except (TypeError, ValueError) as e:                        # missing required fields, __post_init__ checks
        fail(str(e))


# --- checkpoints --------------------------------------------------------------------------------

def unwrap(model):
    """The plain module inside DistributedDataParallel (.module) and torch.compile (._orig_mod) wrappers.
    Saving the unwrapped module keeps `module.` / `_orig_mod.` prefixes out of checkpoints (nanoGPT #325)."""
    while True:
        if isinstance(model, DDP):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _as_dict(config):
    if config is None or isinstance(config, dict):
        return config
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    raise TypeError(f"config must be a dataclass or a dict, got {type(config).__name__}")


def rng_state():
    """Every global RNG a run draws from: python, numpy, torch CPU and (when present) CUDA."""
    name, keys, *rest = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), *rest), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"].cpu())                  # map_location may have moved it to the GPU
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path, model, optimizer=None, step=0, config=None, tokenizer=None, extra=None):
    """
    Write {model, model_config, optimizer, step, config, tokenizer, extra, rng} to `path` atomically: the
    bytes go to a temp file in the same directory (same file system, so the rename is atomic), are fsynced,
    then os.replace'd over the old file. A crash mid-write leaves the previous checkpoint untouched.
    tokenizer is a dict (tokenizer.state_dict()); config a dataclass or dict (the run's Config).
    """
    raw = unwrap(model)
    mcfg = getattr(raw, "cfg", None)
    ckpt = {"model": raw.state_dict(), "model_config": _as_dict(mcfg) if dataclasses.is_dataclass(mcfg) else None,
            "optimizer": optimizer.state_dict() if optimizer is not None else None, "step": int(step),
            "config": _as_dict(config), "tokenizer": tokenizer, "extra": extra, "rng": rng_state()}
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)                          # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:                                       # includes Ctrl-C: never leave a half file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load_checkpoint(path, device="cpu", weights_only=True):
    """The dict save_checkpoint wrote, tensors on `device`. weights_only=True refuses arbitrary pickled
    objects (everything save_checkpoint writes itself loads this way); pass False for trusted files whose
    tokenizer/config/extra hold other Python objects."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=device, weights_only=weights_only)


def model_from_checkpoint(ckpt, device="cpu", setup=None):
    """Rebuild the GPT in ckpt (a dict from load_checkpoint, or a path). setup(model) runs before the weights
    are loaded, e.g. to attach the adapters whose weights the checkpoint also holds (loading is strict)."""
    if isinstance(ckpt, (str, os.PathLike)):
        ckpt = load_checkpoint(ckpt, device)
    if ckpt.get("model_config") is None:
        raise ValueError("checkpoint has no model_config: it was not saved from a GPT")
    model = GPT(ModelConfig(**ckpt["model_config"]))
    if setup is not None:
        setup(model)
    model.load_state_dict(ckpt["model"])
    return model.to(device)


# --- optimizer and schedule ---------------------------------------------------------------------

def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.95), extra_groups=()):
    """
    AdamW. Default groups: every trainable tensor with >= 2 dims (matmul weights and, as in nanoGPT, the
    embeddings) decays; biases, norm gains and other 1-D tensors do not. extra_groups: dicts with "params"
    and optionally "lr", "weight_decay", "constant_lr" (True = the schedule leaves this group at its lr, e.g.
    memory values: no decay, constant lr), "name", or any other AdamW group option. Their parameters are
    taken out of the default groups; a parameter in two groups is an error. Every group gets "base_lr",
    the lr the schedule scales.
    """
    taken, groups = set(), []
    for g in extra_groups:
        g = dict(g)
        ps = g.pop("params")
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        for p in ps:
            if id(p) in taken:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} is in two optimizer groups")
            taken.add(id(p))
        groups.append({"name": f"extra{len(groups)}", **g, "params": ps})
    rest = [p for p in unwrap(model).parameters() if p.requires_grad and id(p) not in taken]  # tied weights once
    groups = [{"name": "decay", "params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
              {"name": "no_decay", "params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}] + groups
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("make_optimizer: the model has no trainable parameters")
    for g in groups:
        g.setdefault("lr", lr)
        g.setdefault("weight_decay", weight_decay)
        g.setdefault("constant_lr", False)
        g["base_lr"] = g["lr"]
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=True if on_cuda else None)


def lr_at(step, max_lr, warmup, total, min_lr):
    """Linear warmup to max_lr over the first `warmup` steps (step 0 already gets max_lr / warmup), then half
    a cosine from max_lr at step `warmup` down to min_lr at step `total`, and min_lr after it."""
    if total <= 0 or not 0 <= warmup <= total:
        raise ValueError(f"need total > 0 and 0 <= warmup <= total, got warmup={warmup}, total={total}")
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    ratio = (step - warmup) / (total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


# --- the shared training loop -------------------------------------------------------------------

@dataclass
class TrainConfig:
    lr: float = 1e-3
    min_lr: typing.Optional[float] = None   # None = lr / 10, the usual floor (nanoGPT, Chinchilla)
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    warmup_steps: int = 0
    max_steps: int = 1000
    grad_clip: float = 1.0                  # max global grad norm; 0 = off
    log_every: int = 10                     # progress line every N steps; 0 = none
    eval_every: int = 0                     # eval_fn runs every N steps and at the end; 0 = only at the end
    ckpt_every: int = 0                     # checkpoint every N steps and at the end; needs ckpt_path
    ckpt_path: typing.Optional[str] = None
    resume: bool = False                    # continue from ckpt_path when that file exists
    device: str = "auto"
    seed: int = 0


def as_train_config(cfg):
    """A TrainConfig from any object (a script's Config) or dict with some of its field names."""
    if isinstance(cfg, TrainConfig):
        return cfg
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d: getattr(cfg, k, d))
    return TrainConfig(**{f.name: get(f.name, f.default) for f in dataclasses.fields(TrainConfig)})


def is_main_process():
    """True except on the non-zero ranks of a torchrun launch (only rank 0 logs and writes files)."""
    return int(os.environ.get("RANK", "0")) == 0


def _reseed(seed, step, stream):
    # Everything random inside a step (batch sampling, dropout) is a function of (seed, step, stream): a
    # resumed run draws exactly what the uninterrupted run drew, whatever happened in between (evals, ...).
    s = ((seed * 1_000_003 + step) * 1024 + stream) % 2**63
    torch.default_generator.manual_seed(s)     # not torch.manual_seed: on CPU-only runs its lazy CUDA seeding
    if torch.cuda.is_initialized():            # costs more than a tiny model's whole step
        torch.cuda.manual_seed_all(s)
    if torch.backends.mps.is_available():
        torch.mps.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


def _shard(obj, B, rank, world, device):
    """Move a batch to device; with world > 1 keep this rank's contiguous slice of every tensor whose first
    dim is the global batch size B (recursing into dicts, lists, tuples; other objects pass unchanged)."""
    if isinstance(obj, torch.Tensor):
        if world > 1 and obj.dim() > 0 and obj.shape[0] == B:
            obj = obj[rank * B // world:(rank + 1) * B // world]
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _shard(v, B, rank, world, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_shard(v, B, rank, world, device) for v in obj)
    return obj


def _plain(v):
    # eval results go into checkpoints, which load with weights_only=True: plain Python numbers and lists only
    return v.tolist() if isinstance(v, (torch.Tensor, np.ndarray, np.generic)) else v


def _hms(sec):
    sec = int(round(sec))
    h, m, s = sec // 3600, sec // 60 % 60, sec % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _human(x):
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


_MODEL_KWARGS = ("doc_ids", "mlp_mask", "adapter_ctx")
_METADATA = ("source_ids",)    # data.py's per-token source labels: for masks and metrics, not a model input


def train(model, batches, cfg, *, optimizer=None, extra_groups=(), loss_fn=None, eval_fn=None, param_filter=None,
          tokenizer=None, log=print):
    """
    The small loop every script shares. Returns a history dict: loss and lr per step, eval results, wall
    time, tokens/s.

    model:   a GPT (or anything whose forward is model(x, y, **kw) -> (logits, loss)).
    batches: a callable step -> dict, or an iterator of dicts with state_dict()/load_state_dict() (needed when
             checkpointing). A dict holds the GLOBAL batch: x, y (shifted targets, -100 ignored) and optionally
             doc_ids / mlp_mask / adapter_ctx, passed to the model; under torchrun each rank keeps its own
             contiguous slice of every tensor whose first dim is the batch size (inside dicts/lists too);
             other objects (mask objects, adapter contexts) reach every rank whole, so per-row ones must be
             built from the shard, in a loss_fn. Keys other than these and source_ids need a loss_fn.
    cfg:     a TrainConfig, or a script's Config / dict read by field name (missing fields take the defaults).
    loss_fn: (model, batch) -> scalar loss for custom objectives; `model` may be DDP-wrapped, so call it (not
             its methods) for the forward pass, and use unwrap(model) for attributes. Under DDP its gradient
             is averaged over ranks. The default loss is the mean over all counted targets of the global batch.
    eval_fn: (model, step) -> dict, run on rank 0 in eval mode every eval_every steps and at the end.
    param_filter: (name, param) -> bool; parameters for which it is False are frozen (requires_grad=False).
    The global RNGs are reseeded from (seed, step) every step, so sampling in `batches` and dropout are
    reproducible; with cfg.resume a run continues from cfg.ckpt_path bit-identically (on CPU).
    """
    tc = as_train_config(cfg)
    if tc.lr <= 0 or tc.max_steps <= 0 or not 0 <= tc.warmup_steps <= tc.max_steps:
        raise ValueError(f"need lr > 0, max_steps > 0 and 0 <= warmup_steps <= max_steps, got lr={tc.lr}, "
                         f"max_steps={tc.max_steps}, warmup_steps={tc.warmup_steps}")
    is_iter = hasattr(batches, "__next__")
    if not is_iter and not callable(batches):
        raise TypeError("batches must be a callable step -> dict or an iterator of dicts")
    if tc.ckpt_path and is_iter and not hasattr(batches, "state_dict"):
        raise TypeError("checkpoints of a run fed by an iterator need its state_dict()/load_state_dict() to "
                        "resume exactly; give the iterator those, or pass a callable step -> batch")
    # data-parallel when launched by torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = pick_device(tc.device)
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    say = log if (rank == 0 and log is not None) else (lambda *a, **k: None)

    model = model.to(device)
    raw = unwrap(model)
    if param_filter is not None:
        for name, p in raw.named_parameters():
            p.requires_grad_(p.requires_grad and bool(param_filter(name, p)))
    opt = optimizer if optimizer is not None else make_optimizer(raw, tc.lr, tc.weight_decay, tc.betas, extra_groups)
    for g in opt.param_groups:
        g.setdefault("base_lr", g["lr"])
    params = [p for g in opt.param_groups for p in g["params"]]
    min_ratio = (tc.lr / 10 if tc.min_lr is None else tc.min_lr) / tc.lr
    history, start = {"loss": [], "lr": [], "eval": []}, 0
    if tc.resume and tc.ckpt_path and os.path.exists(tc.ckpt_path):
        ck = load_checkpoint(tc.ckpt_path, device)
        extra = ck.get("extra") or {}
        if ck.get("optimizer") is None or (is_iter and extra.get("data") is None):
            raise ValueError(f"{tc.ckpt_path} lacks the optimizer or data state an exact resume needs "
                             "(was it written by train()?)")
        raw.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start, history = ck["step"], extra.get("history", history)
        if is_iter:
            batches.load_state_dict(extra["data"])
        set_rng_state(ck["rng"])
        say(f"resumed from {tc.ckpt_path} at step {start}")
    elif tc.resume:
        say(f"no checkpoint at {tc.ckpt_path}: starting from step 0")
    net = DDP(model, device_ids=[torch.cuda.current_device()] if device.startswith("cuda") else None) \
        if world > 1 else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    ntrain = sum(p.numel() for p in params)
    say(f"training {ntrain / 1e6:.2f}M params on {device}" + (f" x {world} ranks" if world > 1 else "") +
        f", steps {start}..{tc.max_steps}")

    pending, tokens = [], 0
    t0 = t_log = time.time()
    tok_log = 0

    def flush():                       # per-step losses stay on the device until needed (no sync every step)
        if pending:
            history["loss"] += torch.stack(pending).float().cpu().tolist()
            pending.clear()

    net.train()
    for step in range(start, tc.max_steps):
        f = lr_at(step, 1.0, tc.warmup_steps, tc.max_steps, min_ratio)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] if g.get("constant_lr") else g["base_lr"] * f
        _reseed(tc.seed, step, 0)                      # the global batch: identical on every rank
        batch = next(batches) if is_iter else batches(step)
        _reseed(tc.seed, step, 1 + rank)               # dropout & co: independent across ranks
        B = batch["x"].shape[0]
        if B % world:
            raise ValueError(f"global batch size {B} does not divide by the {world} ranks")
        tokens += batch["x"].numel()
        local = _shard(batch, B, rank, world, device)
        with autocast:
            if loss_fn is not None:
                loss = loss_fn(net, local)
                report = loss.detach() / world
            else:
                unknown = set(local) - {"x", "y", *_MODEL_KWARGS, *_METADATA}
                if unknown:
                    raise ValueError(f"batch keys {sorted(unknown)} are not model inputs: pass a loss_fn that uses them")
                kw = {k: local[k] for k in _MODEL_KWARGS if k in local}
                if world == 1:
                    _, loss = net(local["x"], local["y"], **kw)
                    report = loss.detach()
                else:
                    # DDP averages gradients over ranks, but shards can count different numbers of targets
                    # (-100s). Sum this shard's losses over the global count, times world: the average over
                    # ranks is then exactly the gradient of the global-batch mean.
                    logits, _ = net(local["x"], **kw)
                    n_all = (batch["y"] != -100).sum().clamp(min=1).to(device)
                    total = F.cross_entropy(logits.float().flatten(0, 1), local["y"].flatten(), ignore_index=-100,
                                            reduction="sum")
                    loss, report = total * world / n_all, total.detach() / n_all
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(report)                    # sum of the shares = the global-batch loss
        pending.append(report)
        history["lr"].append(tc.lr * f)
        done = step + 1
        last = done == tc.max_steps

        if tc.log_every and (done % tc.log_every == 0 or last):
            flush()
            now = time.time()
            tps = (tokens - tok_log) / max(now - t_log, 1e-9)
            eta = (now - t0) / (done - start) * (tc.max_steps - done)
            say(f"step {done}/{tc.max_steps} | loss {history['loss'][-1]:.3f} | lr {tc.lr * f:.1e} | "
                f"{_human(tps)} tok/s | eta {_hms(eta)}")
            t_log, tok_log = now, tokens
        if eval_fn is not None and rank == 0 and ((tc.eval_every and done % tc.eval_every == 0) or last):
            raw.eval()
            res = {k: _plain(v) for k, v in eval_fn(raw, done).items()}
            net.train()
            opt.zero_grad(set_to_none=True)            # in case the eval computed gradients
            history["eval"].append({"step": done, **res})
            say(f"eval step {done} | " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in res.items()))
        if tc.ckpt_path and ((tc.ckpt_every and done % tc.ckpt_every == 0) or last):
            flush()
            if rank == 0:
                run_cfg = cfg if dataclasses.is_dataclass(cfg) or isinstance(cfg, dict) else None
                save_checkpoint(tc.ckpt_path, raw, opt, done, config=run_cfg, tokenizer=tokenizer,
                                extra={"history": history, "data": batches.state_dict() if is_iter else None})

    flush()
    wall = time.time() - t0
    history.update(wall_time=wall, tokens_per_s=tokens / max(wall, 1e-9), start_step=start, steps=tc.max_steps)
    if own_group:
        dist.destroy_process_group()
    return history
