"""
Loading what sampling reads, with the errors a user can cause: a policy checkpoint and its tokenizer, a value model
(refused when its tokenizer differs from the policy's), a problem file and its prompts, built exactly as training
built them; and a sampled response's text. Imports data and model; search.py, agent.py and diagnose.py use it.
"""
from collections import Counter
from pathlib import Path

import torch

import data
from model import Transformer, ValueModel


def compile_decode(model):
    """torch.compile the model's one-token decode step. Measured on a 2-core CPU (docs/reference.md): it paid for a
    few rows at a time (2.3x for 2 prompts) and cost more than it saved in batched evaluation (100+ rows, whose batch
    and cache sizes change between calls and so compile again); the first call compiles (25-130 s there)."""
    model.decode = torch.compile(model.decode)
    return model


def need_folder(folder, flag):
    if not Path(folder).is_dir():
        raise data.UserError(f"{flag} {folder}: no such folder (expected a checkpoint folder with config.json, "
                                f"*.safetensors and tokenizer files)")


def load_policy(folder, device, dtype):
    """(Transformer in eval mode, its data.Tokenizer) from a checkpoint folder."""
    need_folder(folder, "--policy")
    with data.as_user_error():
        tokenizer = data.Tokenizer.from_pretrained(folder)
        return Transformer.from_pretrained(folder, dtype=dtype, device=device).eval(), tokenizer


def tokenizer_fingerprint(tokenizer):
    """What must agree for two models to read the same token ids: special ids and every token's bytes."""
    def token(i):
        try:
            return tokenizer.token_bytes([i])[0]
        except KeyError:   # an id that is no token (a hole in the vocabulary) must be a hole in both
            return None
    return {"vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "bos_id": tokenizer.bos_id,
            "pad_id": tokenizer.pad_id, "stop_ids": tokenizer.stop_ids, "add_bos": tokenizer.add_bos,
            "tokens": [token(i) for i in range(tokenizer.vocab_size)]}


def load_value(folder, policy, tokenizer, policy_folder, device, dtype):
    """A ValueModel from folder, refused when its tokenizer (or vocabulary size) differs from the policy's."""
    need_folder(folder, "--value")
    with data.as_user_error():
        value_model = ValueModel.from_pretrained(folder, dtype=dtype, device=device).eval()
    ours, theirs = policy.config.vocab_size, value_model.backbone.config.vocab_size
    if ours != theirs:
        raise data.UserError(f"--value {folder} has vocab_size {theirs} but --policy {policy_folder} has {ours}: "
                         f"the value must be trained on the policy's tokenizer")
    with data.as_user_error():
        theirs = data.Tokenizer.from_pretrained(folder)
    a, b = tokenizer_fingerprint(tokenizer), tokenizer_fingerprint(theirs)
    for key in a:
        if a[key] != b[key]:
            where = ""
            if key == "tokens":
                i = next(i for i, (x, y) in enumerate(zip(a[key], b[key])) if x != y)
                where = f" (first difference: token id {i} is {a[key][i]!r} vs {b[key][i]!r})"
            raise data.UserError(f"--policy {policy_folder} and --value {folder} have different tokenizers: "
                             f"{key} differs{where}; a value model only scores the token ids it was trained on")
    return value_model


def read_problems(path):
    problems = data.load_problems(path)   # an empty file stops there, with its name
    repeated = [i for i, n in Counter(p["id"] for p in problems).items() if n > 1]
    if repeated:
        raise data.UserError(f"--problems {path}: problem id {repeated[0]!r} appears more than once (ids must be "
                         f"unique: collect uses them to resume)")
    return problems


def encode_prompt(tokenizer, question, style):
    """Prompt ids exactly as data.encode_trajectory builds them for training (BOS first when the tokenizer adds one)."""
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    return bos + tokenizer.encode(data.format_prompt(question, style), allow_special=True)


def encode_prompts(tokenizer, problems, style, policy, path):
    """encode_prompt of each problem; a prompt the policy cannot read (longer than its positions) is the user's
    mistake, named by problem id."""
    prompts = [encode_prompt(tokenizer, p["question"], style) for p in problems]
    for problem, prompt in zip(problems, prompts):
        if len(prompt) > policy.config.max_seq_len:
            raise data.UserError(f"--problems {path}: problem {problem['id']!r} has a {len(prompt)}-token prompt; "
                                 f"the policy reads at most {policy.config.max_seq_len} positions")
    return prompts


def response_text(tokenizer, tokens, stop=()):
    """The response as text, without the EOS (or other stop id) or the --stop string that ended it."""
    if tokens and tokens[-1] in tokenizer.stop_ids:
        tokens = tokens[:-1]
    text = tokenizer.decode(tokens)
    return text[:min([text.find(s) for s in stop if s in text], default=len(text))]
