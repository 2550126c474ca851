"""
Tokenizers on tiktoken, built offline from what a checkpoint folder holds: tokenizer.json (byte-level BPE: GPT-2,
Llama-3, Qwen2/2.5, DeepSeek ...), GPT-2 style vocab.json + merges.txt, or a *.tiktoken rank file; and the byte-level
tokenizer of the built-in task. Nothing is downloaded: the byte-level alphabet is mapped back to bytes and
rank = token id. Imports only files.py of ours (atomic writes).
"""
import base64
import json
import os
import re
import shutil
import unicodedata
import warnings

import regex  # tiktoken's own dependency; Unicode classes (\p{L}) for tokenizer.json's Split patterns
import tiktoken

from files import write_atomic


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
                 normalizer=None, pre_splits=(), unk=None, fuse_unk=False, name="tokenizer", source=None, files=()):
        # ranks: {token bytes: id}; tiktoken merges the adjacent pair whose concatenation has the lowest id.
        # pattern: the one pre-tokenizer regex tiktoken applies. pre_splits: several regexes applied one after the
        # other (Hugging Face Split, behavior Isolated), which one tiktoken regex cannot express (DeepSeek).
        # unk, fuse_unk: the BPE model's unk token and whether a run of unknown bytes gives one unk (see _bpe).
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)
        self.pattern, self.special_tokens, self.normalizer = pattern, dict(special_tokens), normalizer
        self.python_split = bool(pre_splits)  # tiktoken's pattern is then WHOLE_PIECE
        self.splits = [regex.compile(p) for p in (pre_splits or [pattern])]
        # Real vocabularies can lack single bytes (control bytes their training text never held); tiktoken panics
        # on a byte it cannot encode, so text holding one is split and merged here instead (see _bpe).
        self.missing = bytes(b for b in range(256) if bytes([b]) not in ranks)
        self.missing_runs = re.compile(b"([" + b"".join(re.escape(bytes([b])) for b in self.missing) + b"]+)") \
            if self.missing else None
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
        self.unk_id, self.fuse_unk = (None if unk is None else self._id(unk, "unk")), bool(fuse_unk)

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
        if not self.python_split and not (self.missing and self._lacks_a_byte_of(text.encode())):
            return self.enc.encode(text, allowed_special="all" if allow_special else set(), disallowed_special=())
        # In Python: special tokens first, then each split in turn, then BPE on each piece.
        parts = self.special_split.split(text) if allow_special and self.special_split else [text]
        ids = []
        for k, part in enumerate(parts):
            if k % 2:  # the separators re.split keeps: the special tokens
                ids.append(self.special_tokens[part])
                continue
            pieces = [part]
            for split in self.splits:
                pieces = [p for piece in pieces for p in _split_isolated(split, piece)]
            ids += [i for piece in pieces for i in self._bpe(piece.encode())]
        return ids

    def _lacks_a_byte_of(self, data):
        return len(data.translate(None, self.missing)) < len(data)

    def _bpe(self, data):
        """The ids of one pre-tokenized piece. A byte the vocabulary lacks is handled as Hugging Face tokenizers
        does: without an unk token it is dropped before merging (so its neighbours may merge, and decode will not
        give it back); with one, each such byte becomes unk (a run of them one unk with fuse_unk) and the bytes
        around it are merged on their own."""
        if not (self.missing and self._lacks_a_byte_of(data)):
            return self.enc._encode_single_piece(data)  # tiktoken's BPE of one piece, as encode runs it
        if self.unk_id is None:
            data = data.translate(None, self.missing)
            return self.enc._encode_single_piece(data) if data else []
        ids = []
        for k, run in enumerate(self.missing_runs.split(data)):
            if k % 2:  # a run of unknown bytes
                ids += [self.unk_id] * (1 if self.fuse_unk else len(run))
            elif run:
                ids += self.enc._encode_single_piece(run)
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
        normalizer, pre_splits, unk = None, (), (None, False)
        if "tokenizer.json" in names:
            path = os.path.join(folder, "tokenizer.json")
            ranks, patterns, file_added, normalizer, template_bos, unk = _read_tokenizer_json(path)
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
                   normalizer=normalizer, pre_splits=pre_splits, unk=unk[0], fuse_unk=unk[1],
                   name=os.path.basename(os.path.abspath(folder)), source=folder, files=files)

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
            unk = self._name(self.unk_id)
            if self.unk_id in self.special_tokens.values():
                vocab[unk] = self.unk_id  # Hugging Face looks the unk token up in the model's vocabulary
            byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
            _write_json(os.path.join(folder, "tokenizer.json"), {
                "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
                "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                                  "normalized": False, "special": True} for t, i in self.special_tokens.items()],
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                    byte_level]},
                "decoder": byte_level,
                "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                          "end_of_word_suffix": None, "fuse_unk": self.fuse_unk, "byte_fallback": False,
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
    write_atomic(path, lambda f: json.dump(obj, f, ensure_ascii=False, indent=1))


def _read_tokenizer_json(path):
    """(ranks, [pre-tokenizer regexes], {id: added token}, unicode normalization or None, whether BOS is added,
    (unk token id or None, fuse_unk))."""
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
    unk = model.get("unk_token")
    if unk is not None and unk not in model["vocab"]:
        raise ValueError(f"{path}: the BPE model's unk_token {unk!r} is not in its vocabulary")
    unk_id = None if unk is None else model["vocab"][unk]
    return ranks, patterns, added, (forms or [None])[0], adds_bos, (unk_id, model.get("fuse_unk", False))


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
