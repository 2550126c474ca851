"""Hugging Face checkpoint folders: config.json <-> model.Config, the one name-mapping table per checkpoint family
(`hf_names`, used both ways), and safetensors loading (single or sharded, each tensor shape-checked) and saving.
Imports nothing of ours; model.py calls it from Config.from_hf / to_hf and Transformer.from_pretrained /
save_pretrained.
"""
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SUPPORTED = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def config_from_hf(hf, source="config.json"):
    """model.Config's fields from a Hugging Face config.json dict; settings that would change results are
    refused (ValueError naming the file and the setting)."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED)}")

    def need(key):
        if key not in hf:
            raise ValueError(f"{source}: setting {key!r} is missing (needed for model_type {model_type!r})")
        return hf[key]

    def refuse(setting, why):
        raise ValueError(f"{source}: {setting} is not supported: {why}")

    tokens = dict(bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))
    if model_type == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            refuse(f"activation_function {hf['activation_function']!r}", "GPT-2 here uses tanh GELU")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            refuse("scale_attn_by_inverse_layer_idx / scale_attn_weights=false", "attention scale is 1/√d")
        return dict(model_type=model_type, vocab_size=need("vocab_size"), n_layer=need("n_layer"),
                    n_head=need("n_head"), d_model=need("n_embd"), d_ff=hf.get("n_inner") or 4 * need("n_embd"),
                    max_seq_len=need("n_positions"), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                    tie_embeddings=hf.get("tie_word_embeddings", True), qkv_bias=True, **tokens)

    # Llama family. transformers 5 writes rope_parameters {"rope_type", "rope_theta"}; older files have
    # top-level rope_theta and rope_scaling.
    rope = hf.get("rope_parameters") or {}
    rope_theta = hf.get("rope_theta") or rope.get("rope_theta") or 10000.0
    for scaling in (hf.get("rope_scaling"), rope):
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if kind != "default":
            refuse(f"RoPE scaling {kind!r}", "it changes the positions' rotation; only 'default' is exact here")
    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act {hf['hidden_act']!r}", "the Llama-family MLP here is SwiGLU (silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        refuse("attention_bias / mlp_bias = true", "only Qwen2's q/k/v biases are implemented")
    # Mistral has no switch: its window applies whenever it is set. Qwen2/Qwen3 need use_sliding_window.
    max_pos = need("max_position_embeddings")
    window = hf.get("sliding_window")
    if hf.get("use_sliding_window", model_type == "mistral") and window is not None and window < max_pos:
        refuse(f"sliding_window {window} < max_position_embeddings {max_pos}",
               "sliding-window attention is not implemented; set sliding_window to null if your sequences "
               "are never longer than the window")
    if "sliding_attention" in (hf.get("layer_types") or []):
        refuse("layer_types with 'sliding_attention'", "sliding-window attention is not implemented")
    d_model, n_head = need("hidden_size"), need("num_attention_heads")
    return dict(model_type=model_type, vocab_size=need("vocab_size"), n_layer=need("num_hidden_layers"),
                n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head, d_model=d_model,
                head_dim=hf.get("head_dim") or d_model // n_head, d_ff=need("intermediate_size"),
                max_seq_len=max_pos, norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(rope_theta),
                tie_embeddings=hf.get("tie_word_embeddings", False), qkv_bias=model_type == "qwen2",
                qk_norm=model_type == "qwen3", **tokens)


def config_to_hf(config, dtype=torch.float32):
    """The config.json dict that transformers (and vLLM) read back as this exact model."""
    dtype_name = str(dtype).removeprefix("torch.")
    common = dict(model_type=config.model_type, architectures=[ARCHITECTURES[config.model_type]],
                  vocab_size=config.vocab_size, tie_word_embeddings=config.tie_embeddings,
                  bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                  torch_dtype=dtype_name, dtype=dtype_name)
    if config.model_type == "gpt2":
        return dict(common, n_embd=config.d_model, n_layer=config.n_layer, n_head=config.n_head, n_inner=config.d_ff,
                    n_positions=config.max_seq_len, layer_norm_epsilon=config.norm_eps,
                    activation_function="gelu_new")
    hf = dict(common, hidden_size=config.d_model, num_hidden_layers=config.n_layer,
              num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head, head_dim=config.head_dim,
              intermediate_size=config.d_ff, max_position_embeddings=config.max_seq_len,
              rms_norm_eps=config.norm_eps, hidden_act="silu", rope_theta=config.rope_theta,
              rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta})
    if config.model_type != "llama":
        hf.update(sliding_window=None, use_sliding_window=False)
    return hf


def write_hf(model, folder, max_shard_size):
    """config.json and the safetensors of a model.Transformer in Hugging Face naming, into folder."""
    config, state = model.config, model.state_dict()
    dtype = model.tok_emb.weight.dtype
    hf_tensors = {}
    for ours, (names, sizes, conv1d) in hf_names(config).items():
        for name, piece in zip(names, state[ours].split(sizes) if sizes else [state[ours]]):
            hf_tensors[name] = (piece.t() if conv1d else piece).detach().contiguous().cpu()
    (Path(folder) / "config.json").write_text(json.dumps(config.to_hf(dtype), indent=2))
    write_safetensors(folder, hf_tensors, max_shard_size)


# ----------------------------------------------------------------------------------------------------------
# Checkpoint naming: one table per family, used both ways


def hf_names(config):
    """Our parameter name -> (HF tensor names, their sizes along dim 0 when several are concatenated (q/k/v,
    gate/up) else None, whether it is a GPT-2 Conv1D weight, stored transposed as (in, out))."""
    t = {}
    if config.model_type == "gpt2":
        t.update({"tok_emb.weight": (["transformer.wte.weight"], None, False),
                  "pos_emb.weight": (["transformer.wpe.weight"], None, False),
                  "norm.weight": (["transformer.ln_f.weight"], None, False),
                  "norm.bias": (["transformer.ln_f.bias"], None, False)})
        for i in range(config.n_layer):
            for ours, hf, conv1d in [("attn_norm", "ln_1", False), ("attn.qkv", "attn.c_attn", True),
                                     ("attn.proj", "attn.c_proj", True), ("mlp_norm", "ln_2", False),
                                     ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True)]:
                t[f"layers.{i}.{ours}.weight"] = ([f"transformer.h.{i}.{hf}.weight"], None, conv1d)
                t[f"layers.{i}.{ours}.bias"] = ([f"transformer.h.{i}.{hf}.bias"], None, False)
    else:
        qkv = [config.n_head * config.head_dim] + [config.n_kv_head * config.head_dim] * 2
        t.update({"tok_emb.weight": (["model.embed_tokens.weight"], None, False),
                  "norm.weight": (["model.norm.weight"], None, False)})
        for i in range(config.n_layer):
            o, h, a = f"layers.{i}.", f"model.layers.{i}.", f"model.layers.{i}.self_attn."
            t.update({o + "attn_norm.weight": ([h + "input_layernorm.weight"], None, False),
                      o + "attn.qkv.weight": ([a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"],
                                              qkv, False),
                      o + "attn.proj.weight": ([a + "o_proj.weight"], None, False),
                      o + "mlp_norm.weight": ([h + "post_attention_layernorm.weight"], None, False),
                      o + "mlp.fc.weight": ([h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"],
                                            [config.d_ff] * 2, False),
                      o + "mlp.proj.weight": ([h + "mlp.down_proj.weight"], None, False)})
            if config.qkv_bias:
                t[o + "attn.qkv.bias"] = ([a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"], qkv, False)
            if config.qk_norm:
                t[o + "attn.q_norm.weight"] = ([a + "q_norm.weight"], None, False)
                t[o + "attn.k_norm.weight"] = ([a + "k_norm.weight"], None, False)
    if not config.tie_embeddings:
        t["lm_head.weight"] = (["lm_head.weight"], None, False)
    return t


# Buffers that some checkpoints carry but that are recomputed, never loaded: GPT-2's causal mask, old RoPE tables
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def read_json(path):
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a checkpoint folder needs a Hugging Face config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def tensor_files(folder):
    """HF tensor name -> the safetensors file holding it (model.safetensors or the shards of the index)."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map'")
        return {name: folder / file for name, file in weight_map.items()}
    if single.is_file():
        with open_safetensors(single) as f:
            return {name: single for name in f.keys()}
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(f"{folder}: neither model.safetensors nor model.safetensors.index.json found "
                            f"(present: {present}); .bin checkpoints must be converted to safetensors first")


@contextmanager
def open_safetensors(path):
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (listed in the checkpoint index)")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for a truncated or corrupt header
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    with handle as f:
        yield f


def load_hf_tensors(files, meta_model, dtype, device):
    """The state dict of `meta_model` from the checkpoint's tensors, through the family's name table. Each
    tensor is shape-checked, then cast and moved on its own, so peak memory is one copy of the weights."""
    config, shapes = meta_model.config, {k: v.shape for k, v in meta_model.state_dict().items()}
    table = hf_names(config)
    expected = {}  # HF name -> (our name, the shape it must have in the file)
    for ours, (names, sizes, conv1d) in table.items():
        for name, size in zip(names, sizes or [shapes[ours][0]]):
            shape = (size, *shapes[ours][1:])
            expected[name] = (ours, shape[::-1] if conv1d else shape)
    folder = next(iter(files.values())).parent
    # The original GPT-2 files (saved from GPT2Model) name their tensors without the "transformer." prefix.
    bare = config.model_type == "gpt2" and not any(n.startswith("transformer.") for n in files)
    name_in_file = {("transformer." + n if bare else n): n for n in files}
    files = {name: files[n] for name, n in name_in_file.items()}
    missing = [name for name in expected if name not in files]
    if missing:
        raise ValueError(f"{folder}: tensor {missing[0]} is missing from the checkpoint "
                         f"({len(missing)} missing in all) for model_type {config.model_type!r}")
    # A tied checkpoint may still store lm_head.weight (a copy of the embedding); transformers ignores it too.
    unexpected = [n for n in files if n not in expected and not n.endswith(IGNORED_SUFFIXES)
                  and n != "lm_head.weight"]
    if unexpected:
        raise ValueError(f"{folder}: unexpected tensor {unexpected[0]} in {files[unexpected[0]].name} "
                         f"({len(unexpected)} unexpected in all): not part of a {config.model_type!r} model")
    pieces = {}
    for path in sorted(set(files[name] for name in expected)):
        with open_safetensors(path) as f:
            for name in (n for n in expected if files[n] == path):
                ours, shape = expected[name]
                found = tuple(f.get_slice(name_in_file[name]).get_shape())
                if found != shape:
                    raise ValueError(f"{path.name}: tensor {name_in_file[name]} has shape {found}, "
                                     f"but config.json implies {shape}")
                tensor = f.get_tensor(name_in_file[name]).to(device=device, dtype=dtype)
                pieces[name] = tensor.t().contiguous() if table[ours][2] else tensor
    state = {ours: pieces.pop(names[0]) if len(names) == 1 else torch.cat([pieces.pop(n) for n in names])
             for ours, (names, _, _) in table.items()}
    if config.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    return state


def write_safetensors(folder, tensors, max_shard_size):
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json above the size."""
    shards, size = [{}], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(Path(folder) / "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(Path(folder) / file), metadata=metadata)
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (Path(folder) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
