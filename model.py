"""
The one GPT / LLaMA definition every paper script shares, in the spirit of nanoGPT's model.py.

Two flavors, one class:
- gpt2:  LayerNorm, GELU MLP, learned absolute positions, tied embeddings, biases.
- llama: RMSNorm, SwiGLU MLP, RoPE (Hugging Face rotate-half convention), grouped-query attention,
         no biases, optional tied embeddings.
GPT-Neo is the gpt2 flavor with attention_layers (global / sliding-window local per layer), local_window and
attn_scale=False (no 1/sqrt(head_dim)); its bias-free q/k/v load into qkv with a zero bias.

Hook points the five papers need (DESIGN of this repo: README.md, "Layout"), all given per forward call, never as
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
    # the gpt2 flavor's GELU: "exact" is the erf GELU nanoGPT trains from scratch with (its CPU kernel is ~4x faster
    # forward); "tanh" is GPT-2's gelu_new, which Hugging Face GPT-2 / GPT-Neo checkpoints need (hf.py sets it from
    # a checkpoint's activation_function). A checkpoint saved without the field was trained with "tanh"
    gelu: str = "exact"
    attn_scale: bool = True       # False: no 1/sqrt(head_dim) on attention logits (GPT-Neo was trained without it)
    attention_layers: tuple = ()  # per layer "global" or "local" (GPT-Neo alternates them); () = all global
    local_window: int = 0         # a "local" layer's query sees itself and the local_window - 1 tokens before it

    def __post_init__(self):
        if self.flavor not in ("gpt2", "llama"):
            raise ValueError(f"flavor must be 'gpt2' or 'llama', got {self.flavor!r}")
        if self.gelu not in ("tanh", "exact"):
            raise ValueError(f"gelu must be 'tanh' (GPT-2's gelu_new) or 'exact' (erf), got {self.gelu!r}")
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError("n_embd must divide by n_head and n_head by n_kv_head")
        self.rope_scaling = tuple(self.rope_scaling or ())
        self.attention_layers = tuple(self.attention_layers or ())
        if self.attention_layers and (len(self.attention_layers) != self.n_layer or
                                      not set(self.attention_layers) <= {"global", "local"}):
            raise ValueError(f"attention_layers must hold n_layer={self.n_layer} entries 'global' / 'local', "
                             f"got {self.attention_layers}")
        if "local" in self.attention_layers and self.local_window < 1:
            raise ValueError(f"local attention layers need local_window >= 1, got {self.local_window}")

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


# torch >= 2.5: scaled_dot_product_attention(enable_gqa=True) reads each kv head for its group of query heads, no
# copy per layer and per cached step. Only where torch runs it in a fused kernel: where it would take the math
# kernel (e.g. CUDA with a mask or fp32 on versions whose memory-efficient kernel lacks GQA) copying is no slower,
# and the copied K/V may get a fused kernel. Tests set SDPA_GQA = False for the repeat_interleave reference path.
SDPA_GQA = torch.__version__ >= (2, 5)


def native_gqa(q, k, v, kw):
    if not SDPA_GQA:
        return False
    try:
        return int(torch._fused_sdp_choice(q, k, v, **kw, enable_gqa=True)) > 0     # a fused kernel (0 = math)
    except Exception:                # a private probe: whatever it raises, the copy is always right
        return False


class Attention(nn.Module):
    def __init__(self, cfg, local=False):
        super().__init__()
        self.cfg, self.local = cfg, local    # local: the caller passes a mask limited to the window
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
        # attn_mask None = plain causal attention (the fast path when there are no documents or cache)
        kw = dict(attn_mask=attn_mask, is_causal=attn_mask is None, dropout_p=self.dropout if self.training else 0.0,
                  scale=None if cfg.attn_scale else 1.0)
        if cfg.n_kv_head != cfg.n_head:                      # GQA: share each kv head across a group
            if native_gqa(q, k, v, kw):
                kw["enable_gqa"] = True
            else:
                k = k.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)
                v = v.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, **kw)
        y = y.transpose(1, 2).reshape(B, T, cfg.n_head * hd)
        return self.proj(y)


class MLP(nn.Module):
    """up/gate/down. The hidden activation h (B, T, d_ff) is where masks act; down.weight[:, i] is value vector i."""
    def __init__(self, cfg):
        super().__init__()
        self.flavor, self.approximate = cfg.flavor, "tanh" if cfg.gelu == "tanh" else "none"
        self.up = nn.Linear(cfg.n_embd, cfg.d_ff, bias=cfg.bias)
        if cfg.flavor == "llama":
            self.gate = nn.Linear(cfg.n_embd, cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.n_embd, bias=cfg.bias)

    def hidden(self, x):
        if self.flavor == "llama":
            return F.silu(self.gate(x)) * self.up(x)         # SwiGLU
        return F.gelu(self.up(x), approximate=self.approximate)

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
    def __init__(self, cfg, layer=0):
        super().__init__()
        Norm = (lambda d: RMSNorm(d, cfg.norm_eps)) if cfg.flavor == "llama" else \
               (lambda d: nn.LayerNorm(d, eps=cfg.norm_eps, bias=cfg.bias))
        local = bool(cfg.attention_layers) and cfg.attention_layers[layer] == "local"
        self.ln_1, self.attn = Norm(cfg.n_embd), Attention(cfg, local)
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
        """k, v: (B, n_kv_head, T_cached, head_dim). They are views of buffers with room to grow (doubled when
        full), so a generation step copies only its new token's keys and values, not the whole cache as a
        concatenation would (O(T) instead of O(T^2) per sequence); attention reads the views bit-identically to
        contiguous copies. Under autograd the layer concatenates (no in-place writes into saved tensors)."""
        def __init__(self):
            self.k = self.v = None
            self.buf = None          # (k buffer, v buffer) whose first T_cached positions are k, v

        def append(self, k, v):
            if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (k, v, self.k, self.v)):
                self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
                self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
                self.buf = None
                return self.k, self.v
            L, T = (0 if self.k is None else self.k.shape[2]), k.shape[2]
            if self.buf is None or L + T > self.buf[0].shape[2]:      # a new buffer, twice what it must hold
                B, H, _, hd = k.shape
                self.buf = tuple(x.new_empty(B, H, 2 * (L + T), hd) for x in (k, v))
                if L:
                    self.buf[0][:, :, :L], self.buf[1][:, :, :L] = self.k, self.v
            self.buf[0][:, :, L:L + T], self.buf[1][:, :, L:L + T] = k, v
            self.k, self.v = self.buf[0][:, :, :L + T], self.buf[1][:, :, :L + T]
            return self.k, self.v

    def __init__(self, n_layer):
        self.layers = [KVCache.Layer() for _ in range(n_layer)]
        self.doc_ids = None      # (B, T_cached)
        self.next_pos = None     # (B,) position of the next token in each row

    def __len__(self):
        return 0 if self.doc_ids is None else self.doc_ids.shape[1]

    def select(self, index):
        """A new cache holding rows `index` (B',) of this one, repeats allowed (several continuations of one
        prefix: eval.py scores every candidate answer of a question on its cached question). This one is unchanged:
        appending to the new cache concatenates into new tensors."""
        out = KVCache(len(self.layers))
        for new, old in zip(out.layers, self.layers):
            if old.k is not None:
                new.k, new.v = old.k.index_select(0, index), old.v.index_select(0, index)
        if self.doc_ids is not None:
            out.doc_ids = self.doc_ids.index_select(0, index)
        if self.next_pos is not None:
            out.next_pos = self.next_pos.index_select(0, index)
        return out


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
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
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
        local_mask = None
        if "local" in self.cfg.attention_layers:   # local layers: also within local_window of the query
            q_abs, k_abs = torch.arange(past, past + T, device=dev), torch.arange(past + T, device=dev)
            d = q_abs[:, None] - k_abs[None, :]                                         # (T, past+T)
            near = (d >= 0) & (d < self.cfg.local_window)
            local_mask = near[None, None] if attn_mask is None else attn_mask & near
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
            x = block(x, rope, local_mask if block.attn.local else attn_mask, masks[i], adapter_ctx,
                      cache.layers[i] if cache is not None else None)
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
