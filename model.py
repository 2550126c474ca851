"""The transformer: GPT-2 and the Llama family (Llama, Mistral, Qwen2, Qwen3), a preallocated KV cache for
generation, the value model (a transformer with a scalar head) that OREO trains next to the policy, and LoRA for it.

Loading a Hugging Face checkpoint folder (hf.py) builds the model on the meta device and assigns the checkpoint's
tensors straight in the requested dtype, so peak memory is one copy of the weights.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from files import atomic_folder
from hf import SUPPORTED, config_from_hf, config_to_hf, load_hf_tensors, open_safetensors, read_json, tensor_files, \
    write_hf


@dataclass
class Config:
    model_type: str = "llama"    # one of SUPPORTED; "gpt2" selects the GPT-2 block, the rest the Llama block
    vocab_size: int = 258        # rows of the embedding and of the head
    n_layer: int = 4             # transformer blocks
    n_head: int = 4              # query heads
    n_kv_head: int = 0           # key/value heads (grouped-query attention); 0 means n_head
    d_model: int = 128           # residual stream width D
    head_dim: int = 0            # per-head width; 0 means d_model // n_head (Qwen3 sets it explicitly)
    d_ff: int = 0                # MLP hidden width; 0 means 4 * d_model
    max_seq_len: int = 1024      # longest sequence (GPT-2: rows of the position table)
    norm_eps: float = 1e-5       # epsilon of LayerNorm (GPT-2) / RMSNorm (Llama family)
    rope_theta: float = 10000.0  # RoPE base (Llama family; unused by GPT-2)
    tie_embeddings: bool = True  # head weight is the embedding weight (lm_head.weight absent from the file)
    qkv_bias: bool = False       # biases on q/k/v (Qwen2; GPT-2 always has them)
    qk_norm: bool = False        # RMSNorm on each query/key head before RoPE (Qwen3)
    bos_token_id: int | None = None              # carried to config.json for generation tools
    eos_token_id: int | list[int] | None = None  # idem (some configs list several)

    def __post_init__(self):
        if self.model_type not in SUPPORTED:
            raise ValueError(f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED)}")
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.d_model // self.n_head
        self.d_ff = self.d_ff or 4 * self.d_model
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.model_type == "gpt2" and (self.qk_norm or self.n_kv_head != self.n_head):
            raise ValueError("gpt2 has neither qk_norm nor grouped-query attention")

    @classmethod
    def from_hf(cls, hf, source="config.json"):
        """Config from a Hugging Face config.json dict; settings that would change results are refused."""
        return cls(**config_from_hf(hf, source))

    def to_hf(self, dtype=torch.float32):
        """The config.json dict that transformers (and vLLM) read back as this exact model."""
        return config_to_hf(self, dtype)


# ----------------------------------------------------------------------------------------------------------
# The blocks


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, as the Hugging Face Llama/Qwen code does."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def make_norm(config, dim):
    if config.model_type == "gpt2":
        return nn.LayerNorm(dim, eps=config.norm_eps)
    return RMSNorm(dim, config.norm_eps)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """cos, sin (B, 1, T, head_dim) for integer positions (B, T); computed in fp32 like transformers."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions[..., None].float() * inv_freq                   # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]              # (B, 1, T, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE (the Hugging Face layout, so checkpoint q/k weights need no permutation)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        gpt2 = config.model_type == "gpt2"
        # q, k and v in one matmul: rows [q (n_head*hd); k (n_kv_head*hd); v (n_kv_head*hd)]
        self.qkv = nn.Linear(config.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim,
                             bias=config.qkv_bias or gpt2)
        self.proj = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=gpt2)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None

    def forward(self, x, rope, mask, kv_cache=None, write=None):
        """x (B, T, D); rope = (cos, sin) or None (GPT-2); mask None (causal) or bool (B, 1, T, S), True =
        attend. With kv_cache = (k_buf, v_buf) each (B, n_kv_head, max_len, hd): prefill (write None) writes
        positions 0..T-1; decode and extend pass write = (rows, cols, positions), each (N,): new token
        (rows[i], cols[i]) goes to position positions[i], and the queries attend over the whole buffer (mask
        hides what is not written yet)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_head * self.head_dim, self.n_kv_head * self.head_dim,
                                     self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                            # (B, nh, T, hd), (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)     # (B, nkv, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k_buf, v_buf = kv_cache
            if write is None:
                k_buf[:, :, :T], v_buf[:, :, :T] = k, v
            else:
                rows, cols, pos = write
                k_buf[rows, :, pos], v_buf[rows, :, pos] = k[rows, :, cols], v[rows, :, cols]   # (N, nkv, hd)
                k, v = k_buf, v_buf
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_head != self.n_head)   # (B, nh, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gpt2 = config.model_type == "gpt2"
        # GPT-2: fc is c_fc, then tanh GELU. Llama: fc holds [gate; up] in one matmul, then SwiGLU.
        self.fc = nn.Linear(config.d_model, config.d_ff * (1 if self.gpt2 else 2), bias=self.gpt2)
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=self.gpt2)

    def forward(self, x):
        if self.gpt2:
            return self.proj(F.gelu(self.fc(x), approximate="tanh"))
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn_norm, self.attn = make_norm(config, config.d_model), Attention(config)
        self.mlp_norm, self.mlp = make_norm(config, config.d_model), MLP(config)

    def forward(self, x, rope, mask, kv_cache=None, write=None):
        x = x + self.attn(self.attn_norm(x), rope, mask, kv_cache, write)
        return x + self.mlp(self.mlp_norm(x))


# ----------------------------------------------------------------------------------------------------------
# The KV cache


@dataclass
class Cache:
    k: torch.Tensor        # (n_layer, B, n_kv_head, max_len, head_dim)
    v: torch.Tensor        # same
    lengths: torch.Tensor  # (B,) long: tokens written per row; the next token of row b goes to position lengths[b]

    def select(self, rows):
        """A cache holding the given rows (B',) in that order, e.g. the beams kept by a search step."""
        return Cache(self.k.index_select(1, rows), self.v.index_select(1, rows), self.lengths[rows])  # copies


def padding_mask(attention_mask):
    """Bool (B, 1, T, T), True where query t may attend key s: s ≤ t and s is a real token. Each position
    also sees itself, so a query on a left pad is never fully masked (some SDPA kernels give NaN there)."""
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    real_key = attention_mask.bool()[:, None, None, :]                          # (B, 1, 1, T)
    return causal & (real_key | torch.eye(T, dtype=torch.bool, device=attention_mask.device))


# ----------------------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model) if config.model_type == "gpt2" else None
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config, config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self._residual = {id(m) for block in self.layers for m in (block.attn.proj, block.mlp.proj)}
        self.apply(self._init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def _init_weights(self, module):
        # GPT-2's init, with the residual projections scaled down by √(2·n_layer); only for training from scratch
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if id(module) in self._residual else 0.02
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def set_gradient_checkpointing(self, enabled):
        """Recompute each block's activations in the backward pass (saves memory, costs one more forward)."""
        self.gradient_checkpointing = enabled

    def _run(self, input_ids, positions, mask, cache=None, write=None):
        """Final hidden states (B, T, D) for tokens at explicit positions (B, T)."""
        x = self.tok_emb(input_ids)                                            # (B, T, D)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        else:
            rope = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, block in enumerate(self.layers):
            kv_cache = None if cache is None else (cache.k[i], cache.v[i])
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, mask, use_reentrant=False)
            else:
                x = block(x, rope, mask, kv_cache, write)
        return self.norm(x)

    def hidden_states(self, input_ids, attention_mask=None):
        """(B, T, D) after the final norm. attention_mask (B, T) is 1 on real tokens (left or right padding);
        right padding alone needs no mask, since causal attention never looks ahead."""
        B, T = input_ids.shape
        if attention_mask is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
            return self._run(input_ids, positions, None)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)      # (B, T); pads before row start → 0
        return self._run(input_ids, positions, padding_mask(attention_mask))

    def forward(self, input_ids, attention_mask=None, head=None):
        """Logits (B, T, V) in the model's dtype; or head(hidden (B, T, D), lm_head weight (V, D)), e.g. a loss that
        never builds the logits. It runs inside forward, where FSDP has gathered the sharded weight."""
        hidden = self.hidden_states(input_ids, attention_mask)
        return self.lm_head(hidden) if head is None else head(hidden, self.lm_head.weight)

    # -- generation with the KV cache ------------------------------------------------------------------------

    def new_cache(self, batch_size, max_len):
        p = self.tok_emb.weight
        shape = (self.config.n_layer, batch_size, self.config.n_kv_head, max_len, self.config.head_dim)
        return Cache(torch.zeros(shape, dtype=p.dtype, device=p.device),
                     torch.zeros(shape, dtype=p.dtype, device=p.device),
                     torch.zeros(batch_size, dtype=torch.long, device=p.device))

    @torch.no_grad()
    def prefill(self, input_ids, lengths, cache):
        """Write prompts (B, T) right padded, real lengths (B,), into an empty cache; logits (B, V) at each row's
        last real token. The pads' keys are written too, but decode overwrites them before anyone attends."""
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        h = self._run(input_ids, positions, None, cache)                      # (B, T, D)
        cache.lengths.copy_(lengths)
        return self.lm_head(h[torch.arange(B, device=h.device), lengths - 1])

    @torch.no_grad()
    def decode(self, tokens, cache):
        """Append one token per row (B,) at position cache.lengths[b]; logits (B, V) for the next token."""
        pos = cache.lengths.clone()                                            # (B,)
        S = cache.k.shape[3]
        mask = (torch.arange(S, device=pos.device) <= pos[:, None])[:, None, None, :]   # (B, 1, 1, S)
        rows = torch.arange(len(pos), device=pos.device)
        h = self._run(tokens[:, None], pos[:, None], mask, cache, write=(rows, torch.zeros_like(rows), pos))
        cache.lengths += 1
        return self.lm_head(h[:, 0])                                           # h (B, 1, D)

    @torch.no_grad()
    def extend(self, tokens, n_new, cache):
        """Append the first n_new[b] ≥ 0 tokens of row b (tokens (B, T), right padded) at positions
        cache.lengths[b] onward, each attending to the row's cache and to the new tokens before it: many tokens
        in one forward instead of one decode each (on an empty cache it is a prefill). Returns the final hidden
        states (B, T, D); those of the pads mean nothing."""
        B, T = tokens.shape
        S = cache.k.shape[3]
        # a pad's position may pass the buffer's end: clamped, it only reads (nothing is written for a pad)
        positions = (cache.lengths[:, None] + torch.arange(T, device=tokens.device)).clamp(max=S - 1)  # (B, T)
        mask = (torch.arange(S, device=tokens.device) <= positions[..., None])[:, None]               # (B, 1, T, S)
        rows, cols = (torch.arange(T, device=tokens.device) < n_new[:, None]).nonzero(as_tuple=True)
        h = self._run(tokens, positions, mask, cache, write=(rows, cols, positions[rows, cols]))
        cache.lengths += n_new
        return h

    # -- Hugging Face checkpoints ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.float32, device="cpu"):
        folder = Path(folder)
        config = Config.from_hf(read_json(folder / "config.json"), source=str(folder / "config.json"))
        files = tensor_files(folder)
        config.tie_embeddings = config.tie_embeddings or "lm_head.weight" not in files   # no head: tied
        with torch.device("meta"):   # parameters without storage: the checkpoint's tensors are assigned below
            model = cls(config)
        model.load_state_dict(load_hf_tensors(files, model, dtype, device), strict=True, assign=True)
        if config.tie_embeddings:   # assign=True replaced both names by one tensor; tie the modules again
            model.lm_head.weight = model.tok_emb.weight
        return model

    def save_pretrained(self, folder, max_shard_size=5 * 2**30, tokenizer=None):
        """Write config.json and model.safetensors (sharded with model.safetensors.index.json above
        max_shard_size bytes) in Hugging Face naming. Atomic: the folder is replaced whole, only once the new
        one is complete; pass `tokenizer` (anything with save_pretrained(folder)) to have its files in it too."""
        with atomic_folder(folder) as tmp:
            write_hf(self, tmp, max_shard_size)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))


# ----------------------------------------------------------------------------------------------------------
# The value model


class ValueModel(nn.Module):
    """V(s_j): a transformer backbone and a bias-free Linear(D, 1) head on its last hidden state, zero at start
    (so every value starts at 0). Saved as a causal-LM folder plus value_head.safetensors."""

    def __init__(self, config, backbone=None):
        super().__init__()
        self.backbone = backbone if backbone is not None else Transformer(config)
        p = self.backbone.tok_emb.weight
        self.head = nn.Linear(self.backbone.config.d_model, 1, bias=False, device=p.device, dtype=p.dtype)
        nn.init.zeros_(self.head.weight)
        # An untied lm_head gets no gradient here; freezing it keeps DDP from waiting for it. A tied one is the
        # embedding, which does get gradients.
        if not self.backbone.config.tie_embeddings:
            self.backbone.lm_head.weight.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.float32, device="cpu"):
        model = cls(None, Transformer.from_pretrained(folder, dtype=dtype, device=device))
        head_file = Path(folder) / "value_head.safetensors"
        if head_file.exists():
            with open_safetensors(head_file) as f:
                weight = f.get_tensor("weight") if "weight" in f.keys() else None
            if weight is None or weight.shape != model.head.weight.shape:
                raise ValueError(f"{head_file}: expected a tensor 'weight' of shape {tuple(model.head.weight.shape)}")
            with torch.no_grad():
                model.head.weight.copy_(weight)
        return model

    def set_gradient_checkpointing(self, enabled):
        self.backbone.set_gradient_checkpointing(enabled)

    def forward(self, input_ids, attention_mask=None):
        """Values (B, T) float32; the head runs in fp32 so bf16 values are not rounded to 3 digits."""
        return self._values(self.backbone.hidden_states(input_ids, attention_mask))

    def _values(self, h):
        with torch.autocast(h.device.type, enabled=False):  # autocast would cast the fp32 head back to bf16
            return F.linear(h.float(), self.head.weight.float()).squeeze(-1)   # (B, T, D) -> (B, T)

    def new_cache(self, batch_size, max_len):
        return self.backbone.new_cache(batch_size, max_len)

    @torch.no_grad()
    def extend(self, tokens, n_new, cache):
        """Values (B, T) float32 of new tokens appended to the value model's own KV cache (Transformer.extend):
        a search pays the value of a candidate's new tokens only, not of its whole prefix again."""
        return self._values(self.backbone.extend(tokens, n_new, cache))

    def save_pretrained(self, folder, max_shard_size=5 * 2**30, tokenizer=None):
        with atomic_folder(folder) as tmp:
            write_hf(self.backbone, tmp, max_shard_size)
            save_file({"weight": self.head.weight.detach().contiguous().cpu()}, str(tmp / "value_head.safetensors"))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))


# ----------------------------------------------------------------------------------------------------------
# LoRA for the value model (Hu et al. 2021; the paper trains its 7B critic with rank 64, α 64)


class LoRALinear(nn.Module):
    """y = base(x) + (α/r)·ΔW x with ΔW = [B_1 A_1; B_2 A_2; ...]: a frozen Linear plus a trainable rank-r update for
    each block of its output rows, so that the fused qkv (and Llama's fused [gate; up]) get one update per Hugging Face
    projection, as LoRA on q_proj, k_proj and v_proj would. B starts at zero: the model starts as the base."""

    def __init__(self, base, rank, alpha, splits):
        super().__init__()
        assert sum(splits) == base.out_features, (splits, base.out_features)
        self.base, self.splits, self.rank, self.scale = base, tuple(splits), rank, alpha / rank
        base.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(len(splits) * rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft (and nn.Linear) initialise A

    def delta_weight(self):
        """(α/r)·ΔW, shaped like base.weight (out, in): row block i is B_i A_i."""
        A = self.lora_A.view(len(self.splits), self.rank, -1)                   # (n, r, in)
        return self.scale * torch.cat([b @ a for b, a in zip(self.lora_B.split(self.splits), A)])

    def forward(self, x):
        h = F.linear(x, self.lora_A).unflatten(-1, (len(self.splits), self.rank))   # (..., n, r)
        update = torch.cat([F.linear(h[..., i, :], b) for i, b in enumerate(self.lora_B.split(self.splits))], -1)
        return self.base(x) + self.scale * update


def add_lora(model, rank, alpha=None):
    """Freeze a Transformer and wrap the linear layers of every block in LoRALinear (α = rank unless given): only
    the lora_A / lora_B tensors train. GPT-2's c_attn is one Hugging Face projection, so it gets one update."""
    model.requires_grad_(False)
    c, alpha = model.config, alpha or rank
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        q, kv = attn.n_head * attn.head_dim, attn.n_kv_head * attn.head_dim
        attn.qkv = LoRALinear(attn.qkv, rank, alpha, (q + 2 * kv,) if mlp.gpt2 else (q, kv, kv))
        attn.proj = LoRALinear(attn.proj, rank, alpha, (c.d_model,))
        mlp.fc = LoRALinear(mlp.fc, rank, alpha, (c.d_ff,) if mlp.gpt2 else (c.d_ff, c.d_ff))
        mlp.proj = LoRALinear(mlp.proj, rank, alpha, (c.d_model,))
    return model


def merge_lora(model):
    """Fold every LoRALinear back into its Linear, W ← W + (α/r)·ΔW, in place: the model is then a plain one and
    saves as a normal checkpoint folder."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    child.base.weight += child.delta_weight().to(child.base.weight.dtype)
                setattr(module, name, child.base)
    return model
