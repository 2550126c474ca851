"""
Everything the loss sees comes from this file: tokenizers built offline from a checkpoint folder (on tiktoken),
prompt formats, problem and trajectory files, the action mask and step starts of DESIGN.md §1, batching and
sharding, and the built-in synthetic task. Answer extraction and grading live in grading.py (re-exported here).

    python data.py builtin OUT_DIR --seed 0      # writes the built-in task's problems and demonstrations
"""

import argparse
import base64
import json
import math
import os
import random
import re
import shutil
import sys
import unicodedata
import warnings
from dataclasses import dataclass

import regex  # tiktoken's own dependency; Unicode classes (\p{L}) for tokenizer.json's Split patterns
import tiktoken
import torch

from grading import extract_answer, grade, is_equiv, last_boxed  # noqa: F401  (re-exported: data.grade etc.)

# ----------------------------------------------------------------------------------------------------------
# Tokenizer

# Pre-tokenizer regexes. GPT-2's is what a tokenizer.json "ByteLevel" pre-tokenizer with use_regex applies; the
# others are OpenAI's encodings, which a bare *.tiktoken rank file does not carry (copied from tiktoken_ext).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
WHOLE_PIECE = r"[\s\S]+"  # tiktoken's pattern when Python has already split the text into pieces
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+"""])
# A *.tiktoken file is recognised by its number of ranks: name, pattern, special tokens.
KNOWN_TIKTOKEN = {
    50256: ("r50k_base", GPT2_PATTERN, {"<|endoftext|>": 50256}),
    50280: ("p50k_base", GPT2_PATTERN, {"<|endoftext|>": 50256}),
    100256: ("cl100k_base", CL100K_PATTERN, {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258,
                                             "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
                                             "<|endofprompt|>": 100276}),
    199998: ("o200k_base", O200K_PATTERN, {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "generation_config.json")


def byte_level_alphabet():
    """GPT-2's map byte -> printable unicode char, which byte-level BPE files use to write tokens as text."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return chars


BYTE_OF_CHAR = {c: b for b, c in byte_level_alphabet().items()}


def _read_json(folder, name):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _token_bytes(token, path):
    try:
        return bytes(BYTE_OF_CHAR[c] for c in token)
    except KeyError:
        raise ValueError(f"{path}: token {token!r} has a character outside the byte-level alphabet; only "
                         "byte-level BPE (GPT-2, Llama-3, Qwen2, DeepSeek ...) is supported") from None


def _first(*values):
    return next((v for v in values if v is not None), None)  # id 0 is a real token id


def _as_list(value):
    return value if isinstance(value, list) else [] if value is None else [value]


def _content(token):
    return token.get("content") if isinstance(token, dict) else token  # AddedToken dicts or plain strings


class Tokenizer:
    """A tiktoken encoding plus the special-token ids a trainer needs (eos appended to responses, pad)."""

    def __init__(self, ranks, pattern, special_tokens, eos, pad=None, bos=None, add_bos=False, stop_ids=(),
                 normalizer=None, pre_splits=(), name="tokenizer", source=None, files=()):
        # ranks: {token bytes: id}; tiktoken merges the adjacent pair whose concatenation has the lowest id.
        # pattern: the one pre-tokenizer regex tiktoken applies. pre_splits: several regexes applied one after the
        # other (Hugging Face Split, behavior Isolated), which one tiktoken regex cannot express (DeepSeek).
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise ValueError(f"{name}: the vocabulary lacks {len(missing)} single-byte tokens (e.g. byte "
                             f"{missing[0]:#04x}); tiktoken cannot encode text containing them. Train byte-level "
                             "BPE with the full 256-byte initial alphabet.")
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)
        self.pattern, self.special_tokens, self.normalizer = pattern, dict(special_tokens), normalizer
        self.pre_splits = [regex.compile(p) for p in pre_splits]
        self.special_split = regex.compile("(" + "|".join(map(regex.escape, sorted(special_tokens, key=len)[::-1]))
                                           + ")") if special_tokens else None
        self.source, self.files = source, tuple(files)  # where it came from, for save_pretrained
        self.vocab_size = self.enc.max_token_value + 1
        self.eos_id = self._id(eos, "eos")
        self.pad_id = self.eos_id if pad is None else self._id(pad, "pad")
        self.bos_id = None if bos is None else self._id(bos, "bos")
        self.add_bos = bool(add_bos and self.bos_id is not None)  # prepend BOS to every sequence (Llama-3, DeepSeek)
        self.stop_ids = sorted({self.eos_id, *stop_ids})  # every id that ends a response (e.g. Qwen: im_end, eot)
        self.chatml = "<|im_start|>" in special_tokens and "<|im_end|>" in special_tokens

    def _id(self, token, what):
        if isinstance(token, int):
            return token
        if token in self.special_tokens:
            return self.special_tokens[token]
        try:
            return self.enc.encode_single_token(token.encode())
        except KeyError:
            raise ValueError(f"{self.enc.name}: {what} token {token!r} is not in the vocabulary") from None

    def _name(self, i):
        """A token's string for tokenizer_config.json, or its id when no string names it exactly (e.g. a partial
        UTF-8 byte, or an id outside the vocabulary that config.json gave)."""
        special = {j: t for t, j in self.special_tokens.items()}
        if i is None or i in special:
            return special.get(i)
        try:
            text = self.enc.decode_single_token_bytes(i).decode(errors="replace")
        except KeyError:
            return i
        return text if self.encode(text) == [i] else i

    def encode(self, text, allow_special=False):
        """Token ids. allow_special parses special-token strings (chat templates); model text never should."""
        if self.normalizer:
            text = unicodedata.normalize(self.normalizer, text)
        if not self.pre_splits:
            return self.enc.encode(text, allowed_special="all" if allow_special else set(), disallowed_special=())
        # Several Split pre-tokenizers: special tokens first, then each split in turn, then BPE on each piece.
        parts = self.special_split.split(text) if allow_special and self.special_split else [text]
        ids = []
        for k, part in enumerate(parts):
            if k % 2:  # the separators re.split keeps: the special tokens
                ids.append(self.special_tokens[part])
                continue
            pieces = [part]
            for split in self.pre_splits:
                pieces = [p for piece in pieces for p in _split_isolated(split, piece)]
            ids += [i for piece in pieces for i in self.enc.encode_ordinary(piece)]
        return ids

    def decode(self, ids):
        return self.enc.decode(list(ids), errors="replace")

    def token_bytes(self, ids):
        return self.enc.decode_tokens_bytes(list(ids))

    @classmethod
    def byte_level(cls):
        """The built-in task's tokenizer: 256 byte tokens, then <|endoftext|> (EOS) and <|pad|>."""
        return cls({bytes([b]): b for b in range(256)}, GPT2_PATTERN, {"<|endoftext|>": 256, "<|pad|>": 257},
                   eos="<|endoftext|>", pad="<|pad|>", name="byte_level")

    @classmethod
    def from_pretrained(cls, folder, pattern=None):
        """From tokenizer.json, vocab.json + merges.txt, or a *.tiktoken file (pattern: its regex if unknown)."""
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: not a folder")
        names = os.listdir(folder)
        config = _read_json(folder, "tokenizer_config.json")
        added = {int(i): _content(t) for i, t in config.get("added_tokens_decoder", {}).items()}
        add_bos = config.get("add_bos_token")
        normalizer, pre_splits = None, ()
        if "tokenizer.json" in names:
            path = os.path.join(folder, "tokenizer.json")
            ranks, patterns, file_added, normalizer, template_bos = _read_tokenizer_json(path)
            added.update(file_added)
            if len(patterns) > 1:  # applied one after the other in Python; tiktoken gets whole pieces
                pattern, pre_splits = WHOLE_PIECE, patterns
            pattern = pattern or patterns[0]
            add_bos = template_bos if add_bos is None else add_bos
        elif "vocab.json" in names and "merges.txt" in names:
            path = os.path.join(folder, "vocab.json")
            with open(path, encoding="utf-8") as f:
                ranks = {_token_bytes(t, path): i for t, i in json.load(f).items()}
            with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
                merges = [line.split() for line in f if line.strip() and not line.startswith("#version")]
            _check_merge_order(merges, ranks, path)
            added.update({int(i): t for t, i in _read_json(folder, "added_tokens.json").items()})
            pattern = pattern or GPT2_PATTERN
        elif any(n.endswith(".tiktoken") for n in names):
            path = os.path.join(folder, sorted(n for n in names if n.endswith(".tiktoken"))[0])
            ranks = _read_tiktoken_file(path)
            name, known_pattern, known_special = KNOWN_TIKTOKEN.get(len(ranks), (None, None, {}))
            pattern = pattern or config.get("tiktoken_pattern") or known_pattern
            if pattern is None:
                raise ValueError(f"{path}: {len(ranks)} ranks match no standard encoding (r50k, p50k, cl100k, "
                                 "o200k) and a .tiktoken file holds no regex: pass pattern=... to from_pretrained")
            added.update({i: t for t, i in known_special.items()})
        elif "tokenizer.model" in names:
            raise ValueError(f"{folder}: only a SentencePiece tokenizer.model is present; SentencePiece is not "
                             "supported (convert it to a byte-level tokenizer.json, or use a byte-level BPE model)")
        else:
            raise FileNotFoundError(f"{folder}: no tokenizer.json, vocab.json + merges.txt, or *.tiktoken file")
        # Named special tokens can also sit in the vocabulary (GPT-2's <|endoftext|>): make them special.
        named = {k: _content(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        for token in named.values():
            if isinstance(token, str) and token not in added.values() and token.encode() in ranks:
                added[ranks[token.encode()]] = token
        special = {t: i for i, t in added.items()}
        for b in [b for b, i in ranks.items() if i in added and len(b) > 1]:
            del ranks[b]  # a special token is never produced by merging ordinary text
        model_config = _read_json(folder, "config.json")
        generation = _read_json(folder, "generation_config.json")
        eos_ids = [i for config_ in (generation, model_config) for i in _as_list(config_.get("eos_token_id"))]
        eos = _first(named["eos_token"], *eos_ids[:1], "<|endoftext|>" if "<|endoftext|>" in special else None)
        if eos is None:
            raise ValueError(f"{folder}: no EOS token in tokenizer_config.json, generation_config.json or "
                             "config.json; responses need one to end")
        bos = _first(named["bos_token"], model_config.get("bos_token_id"))
        pad = _first(named["pad_token"], model_config.get("pad_token_id"))
        files = [n for n in names if n in TOKENIZER_FILES or n.endswith(".tiktoken")]
        return cls(ranks, pattern, special, eos=eos, pad=pad, bos=bos, add_bos=add_bos, stop_ids=eos_ids,
                   normalizer=normalizer, pre_splits=pre_splits, name=os.path.basename(os.path.abspath(folder)),
                   source=folder, files=files)

    def save_pretrained(self, folder):
        """Write tokenizer files into folder (a checkpoint) so that from_pretrained(folder) reads them back: the
        files it was loaded from, or a byte-level tokenizer.json Hugging Face reads too; and a tokenizer_config.json
        that names EOS, PAD and BOS (they may have come from a config.json that the checkpoint rewrites)."""
        os.makedirs(folder, exist_ok=True)
        config = {}
        for name in self.files:
            source, target = os.path.join(self.source, name), os.path.join(folder, name)
            if name == "tokenizer_config.json":
                config = _read_json(self.source, name)
            elif os.path.abspath(source) != os.path.abspath(target):
                shutil.copyfile(source, target)
        if not self.files:  # built in memory: ranks as a vocabulary (ids are ranks, so no merges are needed)
            alphabet = byte_level_alphabet()
            vocab = {"".join(alphabet[b] for b in t): i for t, i in self.enc._mergeable_ranks.items()}
            byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
            _write_json(os.path.join(folder, "tokenizer.json"), {
                "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
                "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                                  "normalized": False, "special": True} for t, i in self.special_tokens.items()],
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                    byte_level]},
                "decoder": byte_level,
                "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                          "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                          "ignore_merges": False, "vocab": vocab, "merges": []}})
        elif any(n.endswith(".tiktoken") for n in self.files):  # a rank file holds neither regex nor specials
            config["tiktoken_pattern"] = self.pattern
            config["added_tokens_decoder"] = {str(i): {"content": t, "special": True}
                                              for t, i in self.special_tokens.items()}
        for key, i in (("eos_token", self.eos_id), ("pad_token", self.pad_id), ("bos_token", self.bos_id)):
            config[key] = self._name(i)
        config["add_bos_token"] = self.add_bos
        _write_json(os.path.join(folder, "tokenizer_config.json"), config)


def _split_isolated(split, text):
    """Hugging Face's Split(behavior="Isolated"): every match and every gap between matches is a piece."""
    pieces, last = [], 0
    for m in split.finditer(text):
        pieces += [p for p in (text[last:m.start()], m.group()) if p]
        last = m.end()
    return pieces + ([text[last:]] if last < len(text) else [])


def _write_json(path, obj):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
    os.replace(path + ".tmp", path)


def _read_tokenizer_json(path):
    """(ranks, [pre-tokenizer regexes], {id: added token}, unicode normalization or None, whether BOS is added)."""
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r} is not supported; only byte-level BPE is")
    if model.get("byte_fallback"):
        raise ValueError(f"{path}: a SentencePiece-style BPE (byte_fallback) is not supported; only byte-level BPE")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds[-1:] != ["ByteLevel"] or set(kinds[:-1]) - {"Split", "Digits"}:
        raise ValueError(f"{path}: pre-tokenizer {kinds} is not supported; expected Split/Digits regexes, then "
                         "ByteLevel (GPT-2, Llama-3, Qwen2, DeepSeek style)")
    if steps[-1].get("add_prefix_space"):
        raise ValueError(f"{path}: ByteLevel add_prefix_space=true is not supported")
    patterns = []
    for step in steps[:-1]:
        if step["type"] == "Digits":
            patterns.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif step.get("behavior") != "Isolated" or step.get("invert") or "Regex" not in step.get("pattern", {}):
            raise ValueError(f"{path}: only a Split with a Regex, behavior Isolated, invert false is supported")
        else:
            patterns.append(step["pattern"]["Regex"])
    if steps[-1].get("use_regex", True):
        patterns.append(GPT2_PATTERN)
    if not patterns:
        raise ValueError(f"{path}: ByteLevel with use_regex false and no Split regex: no pre-tokenizer pattern")
    norm = spec.get("normalizer")
    forms = [n.get("type") for n in (norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm])] \
        if norm else []
    if set(forms) - {"NFC", "NFD", "NFKC", "NFKD"} or len(forms) > 1:
        raise ValueError(f"{path}: normalizer {forms} is not supported (only one of NFC/NFD/NFKC/NFKD)")
    added = {t["id"]: t["content"] for t in spec.get("added_tokens", [])}
    ranks = {}
    for token, i in model["vocab"].items():
        if i not in added:
            ranks[_token_bytes(token, path)] = i
    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
    _check_merge_order(merges, ranks, path)
    post = spec.get("post_processor") or {}
    adds_bos = any("SpecialToken" in (p.get("single") or [{}])[0]  # Llama-3's TemplateProcessing prepends BOS
                   for p in (post.get("processors", []) if post.get("type") == "Sequence" else [post]))
    return ranks, patterns, added, (forms or [None])[0], adds_bos


def _check_merge_order(merges, ranks, path):
    """tiktoken merges by the id of the merged token, Hugging Face by the merge's line: these agree when ids follow
    the merge order, as in every byte-level BPE trained by tokenizers or tiktoken. Warn when they do not."""
    last = -1
    for n, (a, b) in enumerate(merges):
        i = ranks.get(_token_bytes(a + b, path))
        if i is not None and i < last:
            warnings.warn(f"{path}: merge #{n} {a!r} {b!r} gives id {i}, lower than an earlier merge's id {last}; "
                          "tiktoken ranks by id, so some texts may tokenize differently from Hugging Face")
            return
        last = max(last, i if i is not None else last)


def _read_tiktoken_file(path):
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
                except ValueError:
                    raise ValueError(f"{path}:{n}: expected 'base64-token rank'") from None
    return ranks


# ----------------------------------------------------------------------------------------------------------
# Prompt formats

SYSTEM_PROMPTS = {  # the paper's system prompts for Qwen2.5-Math
    "qwen-gsm8k": "Please reason step by step, and produce a final answer following 4 '#', like '#### 0'",
    "qwen-math": "Please reason step by step, and put your final answer within \\boxed{}.",
}
PROMPT_STYLES = ("plain", "qwen-gsm8k", "qwen-math", "deepseek")


def format_prompt(question, style):
    if style == "plain":
        return question + "\n"
    if style in SYSTEM_PROMPTS:
        return (f"<|im_start|>system\n{SYSTEM_PROMPTS[style]}<|im_end|>\n"
                f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
    if style == "deepseek":  # DeepSeekMath-Instruct's chain-of-thought form
        return (f"User: {question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
                "\n\nAssistant:")
    raise ValueError(f"unknown prompt style {style!r}; choose one of {PROMPT_STYLES}")


# ----------------------------------------------------------------------------------------------------------
# Files: JSON lines, validated line by line

ROLES = ("system", "user", "assistant", "tool", "observation", "environment")


def read_jsonl(path):
    """[(line number, dict)], stopping at the first bad line with an error that names file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append((n, row))
    if not rows:
        raise ValueError(f"{path}: empty file (no JSON lines)")
    return rows


def _field(row, key, path, n, kind=str):
    if key not in row:
        raise ValueError(f"{path}:{n}: missing field {key!r} (has {sorted(row)})")
    if not isinstance(row[key], kind):
        kinds = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{path}:{n}: field {key!r} should be {kinds}, got {type(row[key]).__name__}")
    return row[key]


def load_problems(path):
    """Our own {question, gold} rows, GSM8K (question, answer '#### n'), MATH (problem, solution with \\boxed{};
    or answer), or prompt + answer."""
    problems = []
    for n, row in read_jsonl(path):
        if "gold" in row:
            question, gold = _field(row, "question", path, n), _field(row, "gold", path, n, (str, int, float))
        elif "problem" in row:
            question = _field(row, "problem", path, n)
            gold = str(row["answer"]) if "answer" in row else last_boxed(_field(row, "solution", path, n))
            if gold is None:
                raise ValueError(f"{path}:{n}: the solution has no \\boxed{{...}} answer")
        elif "question" in row:
            question, answer = _field(row, "question", path, n), _field(row, "answer", path, n)
            if "####" not in answer:
                raise ValueError(f"{path}:{n}: a GSM8K answer should end with '#### <number>'")
            gold = answer.split("####")[-1].strip().replace(",", "")
        elif "prompt" in row:
            question, gold = _field(row, "prompt", path, n), _field(row, "answer", path, n, (str, int, float))
        else:
            raise ValueError(f"{path}:{n}: a problem needs 'question'+'answer' (GSM8K), 'problem'+'solution' "
                             f"(MATH) or 'prompt'+'answer'; has {sorted(row)}")
        problems.append({"id": str(row.get("id", row.get("unique_id", f"{os.path.basename(path)}:{n}"))),
                         "question": question, "gold": str(gold)})
    return problems


def load_trajectories(path):
    """Rows {prompt, response, reward, ...} or the agent form {messages: [{role, content}], reward, ...}."""
    trajectories = []
    for n, row in read_jsonl(path):
        if "messages" in row:
            messages = _field(row, "messages", path, n, list)
            for k, m in enumerate(messages):
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise ValueError(f"{path}:{n}: messages[{k}] needs a role in {ROLES} and a string content")
            if not any(m["role"] == "assistant" for m in messages):
                raise ValueError(f"{path}:{n}: no assistant message, so nothing to learn")
        else:
            _field(row, "prompt", path, n), _field(row, "response", path, n)
        reward = _field(row, "reward", path, n, (int, float))
        if isinstance(reward, bool) or not math.isfinite(reward):
            raise ValueError(f"{path}:{n}: reward should be a finite number, got {reward!r}")
        trajectories.append({**row, "reward": float(reward)})
    return trajectories


def write_jsonl(path, rows):
    """Write rows atomically (a partial file never replaces a good one)."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def append_jsonl(path, rows):
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------------------
# Examples and batches (DESIGN.md §1: mask[j] = 1 iff ids[j+1] is an action; step_start[j] iff ids[j+1] starts one)

STEP_DELIMITERS = {"gsm8k": ("\n",), "math": ("\n", ". ", ".$ ")}


@dataclass
class Example:
    ids: list        # prompt then response tokens, EOS ending each action turn; length L
    mask: list       # L-1 ints: 1 where ids[j+1] is an action token
    step_start: list  # L-1 bools: True where ids[j+1] is the first token of a reasoning step
    reward: float
    truncated: bool  # cut to max_len (the count is reported by the trainer, never silently)


def _step_starts(tokenizer, ids, delimiters):
    """A step is a maximal run of action tokens ended by a delimiter: the first token starts a step, and so does
    every token that follows one in which a delimiter ends. A delimiter inside a token counts ('.\\n' as one
    token ends its step). This is where search.py stops a step while sampling, so training and search agree;
    with '. ' the space usually begins the next word's token (' Then'), and that token still ends its step."""
    pieces = tokenizer.token_bytes(ids)
    text = b"".join(pieces)
    last_byte = bytearray(len(text))  # 1 at the last byte of every delimiter occurrence
    for d in delimiters:
        d = d.encode()
        k = text.find(d)
        while k >= 0:
            last_byte[k + len(d) - 1] = 1
            k = text.find(d, k + len(d))
    starts, offset = [True], 0
    for piece in pieces[:-1]:
        starts.append(any(last_byte[offset:offset + len(piece)]))
        offset += len(piece)
    return starts[:len(ids)]


def encode_trajectory(tokenizer, traj, max_len, delimiters=("\n",)):
    """Tokens, action mask and step starts of one trajectory. Prompt/response form: the response and the EOS
    after it are actions. Agent form: only assistant turns and the token that ends each (<|im_end|> in ChatML,
    else EOS) are actions; system, user and environment turns never are. An end token joins its turn's last step
    (or starts its own when the turn ends with a delimiter)."""
    segments = []  # (ids, is_action): an action segment is one turn, its end token included
    if tokenizer.add_bos:
        segments.append(([tokenizer.bos_id], False))
    if "messages" in traj:
        for m in traj["messages"]:
            act = m["role"] == "assistant"
            content = tokenizer.encode(m["content"])
            if tokenizer.chatml:
                segments.append((tokenizer.encode(f"<|im_start|>{m['role']}\n", allow_special=True), False))
                segments.append((content + [tokenizer.special_tokens["<|im_end|>"]], act))
            else:
                segments.append((tokenizer.encode(f"{m['role']}: "), False))
                segments.append((content + [tokenizer.eos_id] if act else content, act))
            segments.append((tokenizer.encode("\n"), False))
    else:
        segments.append((tokenizer.encode(traj["prompt"], allow_special=True), False))
        segments.append((tokenizer.encode(traj["response"]) + [tokenizer.eos_id], True))
    ids, action, start = [], [], []
    for seg_ids, act in segments:
        ids += seg_ids
        action += [act] * len(seg_ids)
        start += _step_starts(tokenizer, seg_ids, delimiters) if act else [False] * len(seg_ids)
    truncated = len(ids) > max_len
    ids, action, start = ids[:max_len], action[:max_len], start[:max_len]
    if not any(action[1:]):
        raise ValueError(f"trajectory {traj.get('id', '')!r}: no action token within max_len={max_len} "
                         f"(the prompt alone has about {len(ids)} tokens); raise --max-len")
    return Example(ids=ids, mask=[int(a) for a in action[1:]], step_start=start[1:],
                   reward=float(traj["reward"]), truncated=truncated)


def collate(examples, pad_id):
    """Right-padded tensors: input_ids (B, L) long, mask (B, L-1) float32, step_start (B, L-1) bool, rewards (B,)."""
    B, L = len(examples), max(len(e.ids) for e in examples)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros(B, L - 1, dtype=torch.float32)
    step_start = torch.zeros(B, L - 1, dtype=torch.bool)
    for b, e in enumerate(examples):
        input_ids[b, :len(e.ids)] = torch.tensor(e.ids)
        mask[b, :len(e.mask)] = torch.tensor(e.mask, dtype=torch.float32)
        step_start[b, :len(e.step_start)] = torch.tensor(e.step_start, dtype=torch.bool)
    rewards = torch.tensor([e.reward for e in examples], dtype=torch.float32)
    return {"input_ids": input_ids, "mask": mask, "step_start": step_start, "rewards": rewards}


class Sampler:
    """Global batches drawn from an endless stream of per-epoch shuffles (epoch e: Random(seed, e)). Global step g
    takes stream positions [g*G, (g+1)*G), crossing epoch ends, so every batch is full. Each rank takes its
    contiguous 1/world_size share. The state is the global step, so a run resumes exactly, on any world size."""

    def __init__(self, n_examples, global_batch, seed, rank=0, world_size=1):
        if n_examples < 1:
            raise ValueError("Sampler: no examples to sample from")
        if not 0 <= rank < world_size:
            raise ValueError(f"Sampler: rank {rank} is outside world size {world_size}")
        if global_batch % world_size:
            raise ValueError(f"Sampler: global batch {global_batch} is not divisible by world size {world_size}")
        self.n, self.global_batch, self.seed = n_examples, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.step, self._perm = 0, (None, None)

    def _order(self, epoch):
        if self._perm[0] != epoch:
            order = list(range(self.n))
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
            self._perm = (epoch, order)
        return self._perm[1]

    @property
    def epoch(self):
        return self.step * self.global_batch // self.n

    def global_indices(self, step):
        positions = range(step * self.global_batch, (step + 1) * self.global_batch)  # in the stream of epochs
        return [self._order(p // self.n)[p % self.n] for p in positions]

    def __iter__(self):  # endless: the trainer decides how many steps to take
        share = self.global_batch // self.world_size
        while True:
            indices = self.global_indices(self.step)
            self.step += 1
            yield indices[self.rank * share:(self.rank + 1) * share]

    def state_dict(self):
        return {"step": self.step, "n_examples": self.n, "global_batch": self.global_batch, "seed": self.seed}

    def load_state_dict(self, state):
        for key, mine in (("n_examples", self.n), ("global_batch", self.global_batch), ("seed", self.seed)):
            if state[key] != mine:
                raise ValueError(f"Sampler: resuming with {key}={mine}, but the checkpoint has {state[key]}")
        self.step = state["step"]


def _prompt_key(traj):
    if "messages" in traj:  # everything before the first assistant turn
        first = next(k for k, m in enumerate(traj["messages"]) if m["role"] == "assistant")
        return json.dumps(traj["messages"][:first])
    return traj["prompt"]


def dpo_pairs(trajectories, max_pairs_per_prompt=6, seed=0):
    """(chosen, rejected): a reward-1 and a reward-below-1 response of the same prompt, at most
    max_pairs_per_prompt per prompt, sampled without replacement (deterministic given seed)."""
    groups = {}
    for t in trajectories:
        groups.setdefault(_prompt_key(t), ([], []))[0 if t["reward"] == 1 else 1].append(t)
    rng, pairs = random.Random(seed), []
    for correct, wrong in groups.values():
        all_pairs = [(c, w) for c in correct for w in wrong]
        pairs += rng.sample(all_pairs, min(max_pairs_per_prompt, len(all_pairs)))
    return pairs


def rejection_sampling(trajectories):
    return [t for t in trajectories if t["reward"] == 1]


# ----------------------------------------------------------------------------------------------------------
# The built-in task: a start digit, then n_steps operations from {+, -, *} mod 10, one step per line.
# Question "7 *4 +3 -8", solution "7*4=8\n8+3=1\n1-8=3\n#### 3".

OPS = {"+": lambda a, b: (a + b) % 10, "-": lambda a, b: (a - b) % 10, "*": lambda a, b: (a * b) % 10}
_BUILTIN_OP = re.compile(r"([+\-*])(\d)")


def builtin_problems(n, seed, split, n_steps=6):
    """n problems; the split ('train', 'val', 'test') is part of the seed, so splits differ."""
    rng = random.Random(f"builtin:{seed}:{split}")
    problems = []
    for k in range(n):
        start = rng.randrange(10)
        ops = [(rng.choice("+-*"), rng.randrange(10)) for _ in range(n_steps)]
        question = f"{start} " + " ".join(f"{op}{b}" for op, b in ops)
        problems.append({"id": f"builtin-{split}-{k}", "question": question, "gold": str(builtin_answer(question))})
    return problems


def _parse_builtin(question):
    head, *rest = question.split()
    ops = [_BUILTIN_OP.fullmatch(t) for t in rest]
    if not head.isdigit() or not all(ops):
        raise ValueError(f"not a built-in task question: {question!r}")
    return int(head), [(m.group(1), int(m.group(2))) for m in ops]


def builtin_answer(question):
    """The exact verifier's answer: the value after every step."""
    value, ops = _parse_builtin(question)
    for op, b in ops:
        value = OPS[op](value, b)
    return value


def builtin_demonstration(problem, rng, p_misread=0.7):
    """An imperfect step-per-line solution: each '*' step is misread as '+' with probability p_misread, and the
    line shows the operator actually used ('3+4=7' where the question says '*4'), so the error is checkable from
    the text; later steps continue from the wrong value."""
    value, ops = _parse_builtin(problem["question"])
    lines = []
    for op, b in ops:
        used = "+" if op == "*" and rng.random() < p_misread else op
        result = OPS[used](value, b)
        lines.append(f"{value}{used}{b}={result}")
        value = result
    return "\n".join(lines) + f"\n#### {value}"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Data utilities.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("builtin", help="write the built-in task: problems_{train,val,test}.jsonl and demos.jsonl")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=400, help="training problems")
    p.add_argument("--n-val", type=int, default=200, help="validation problems")
    p.add_argument("--n-test", type=int, default=1000, help="test problems")
    p.add_argument("--n-steps", type=int, default=6, help="operations per problem")
    p.add_argument("--p-misread", type=float, default=0.7, help="probability the demonstrator reads '*' as '+'")
    p.add_argument("--demos-per-problem", type=int, default=1, help="demonstrations per training problem")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    splits = {"train": args.n_train, "val": args.n_val, "test": args.n_test}
    problems = {s: builtin_problems(n, args.seed, s, args.n_steps) for s, n in splits.items()}
    for split, rows in problems.items():
        write_jsonl(os.path.join(args.out_dir, f"problems_{split}.jsonl"), rows)
    rng, demos = random.Random(f"demos:{args.seed}"), []
    for problem in problems["train"]:
        for _ in range(args.demos_per_problem):
            response = builtin_demonstration(problem, rng, args.p_misread)
            demos.append({"id": problem["id"], "prompt": format_prompt(problem["question"], "plain"),
                          "response": response, "reward": grade(response, problem["gold"]), "gold": problem["gold"]})
    write_jsonl(os.path.join(args.out_dir, "demos.jsonl"), demos)
    correct = sum(d["reward"] for d in demos) / len(demos)
    print(f"data.py: wrote {sum(splits.values())} problems and {len(demos)} demonstrations "
          f"({correct:.1%} correct) to {args.out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
