"""Tiny random Hugging Face checkpoints, one per supported family, for tests (ours vs transformers).

Every builder is seeded, so the same call writes the same weights. transformers is imported here, in tests/,
never by the run-time code.
"""
import torch
import transformers

transformers.utils.logging.disable_progress_bar()

FAMILIES = ("gpt2", "llama", "qwen2", "qwen3", "mistral")

# Small but not symmetric: grouped-query attention (4 query heads, 2 key/value heads), an odd vocabulary,
# Qwen2 with q/k/v biases and an untied head, Qwen3 with a head_dim that is not d_model / n_head.
_LLAMA_LIKE = dict(vocab_size=211, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                   rms_norm_eps=1e-6, rope_theta=10000.0)
_CONFIGS = {
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(vocab_size=211, n_positions=128, n_embd=48, n_layer=2, n_head=4, n_inner=80,
                  activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                  bos_token_id=210, eos_token_id=210)),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(_LLAMA_LIKE, tie_word_embeddings=True, rope_theta=500000.0)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(_LLAMA_LIKE, tie_word_embeddings=False, rope_theta=1000000.0)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(_LLAMA_LIKE, head_dim=24, tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(_LLAMA_LIKE, num_key_value_heads=1, sliding_window=None, tie_word_embeddings=False)),
}


def hf_config(family, **overrides):
    """The tiny transformers config of a family; overrides replace any of its settings."""
    config_cls, _, settings = _CONFIGS[family]
    return config_cls(**{**settings, **overrides})


def hf_model(family, seed=0, **overrides):
    """A tiny transformers model with random weights (fp32, eval mode), the same for the same seed.

    HF's own init leaves biases at zero and norm weights at one, which would let a wrong mapping of those
    tensors pass unnoticed, so every parameter is redrawn: norms around 1, everything else N(0, 0.1²)."""
    _, model_cls, _ = _CONFIGS[family]
    config = hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm = "norm" in name or ".ln_" in name or name.startswith(("ln_", "transformer.ln_"))
            p.copy_(1.0 + 0.1 * noise if is_norm and name.endswith("weight") else 0.1 * noise)
    return model


def make_checkpoint(folder, family, seed=0, max_shard_size=None, **overrides):
    """Write a tiny random `family` checkpoint into `folder` with transformers' save_pretrained; return the
    transformers model. max_shard_size (e.g. "20KB") makes a sharded checkpoint with an index file."""
    model = hf_model(family, seed=seed, **overrides)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(folder), **kwargs)
    return model
