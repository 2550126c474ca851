"""Sampling, offline data collection, value-guided step-level beam search, best-of-K, and evaluation.

    python search.py collect --policy sft/ --problems train.jsonl --out trajectories.jsonl -k 10
    python search.py eval --policy oreo/policy --value oreo/value --problems test.jsonl --methods greedy,beam5

The engine: prompts of any lengths share one batch; prefill writes them into the model's KV cache, then one decode
step per token. Each row stops on EOS, on a stop string (matched on the bytes of the tokens, so "\\n" is found also
inside a token like ".\\n\\n", and ". " across two tokens) or at its token limit; finished rows leave the batch.
`generate_naive` (a full forward per token) is kept beside it as the reference the tests compare with.
"""
import argparse
import datetime
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

import data
from model import Transformer, ValueModel

# ----------------------------------------------------------------------------------------------------------
# Sampling and generation


def sample_next(logits, temperature=1.0, top_p=1.0, top_k=0, generator=None):
    """Next tokens (B,) from logits (B, V). temperature 0 = argmax; top_k 0 and top_p 1 switch those filters off."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]   # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already hold top_p of the mass (the first one always stays)
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    # argmax(p / E) with E ~ Exp(1) is a sample from p (the exponential race, as in gpt-fast); unlike
    # torch.multinomial it never synchronises with the GPU. E is kept above 0 so a filtered token (p = 0) never
    # becomes 0/0 = NaN, which argmax would pick.
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_(min=torch.finfo(probs.dtype).tiny)
    return (probs / noise).argmax(-1)


def _check_stop(tokenizer, tokens, limit, stop):
    """Why a row with these new tokens is finished: "eos" (any of the tokenizer's stop ids, e.g. EOS or Qwen's
    <|im_end|>), "stop" (a stop string ends in its last token), "length", or None. Stop strings are matched on
    bytes, as data.py finds step delimiters for training. A stop string of n bytes ends within the last n tokens
    (every token is at least one byte), and earlier positions were checked at earlier steps, so that tail is
    enough."""
    if tokenizer is not None and tokens and tokens[-1] in tokenizer.stop_ids:
        return "eos"
    if stop:
        tail = b"".join(tokenizer.token_bytes(tokens[-max(len(s.encode()) for s in stop):]))
        if any(s.encode() in tail for s in stop):
            return "stop"
    if len(tokens) >= limit:
        return "length"
    return None


def _limits(model, prompts, max_new_tokens):
    """Per-row new-token limits: max_new_tokens (an int or one per row), cut to the model's max_seq_len."""
    if isinstance(max_new_tokens, int):
        max_new_tokens = [max_new_tokens] * len(prompts)
    limits = []
    for i, (prompt, n) in enumerate(zip(prompts, max_new_tokens)):
        if not prompt or len(prompt) > model.config.max_seq_len:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens; it needs 1 to max_seq_len = "
                             f"{model.config.max_seq_len} tokens")
        limits.append(max(0, min(n, model.config.max_seq_len - len(prompt))))
    return limits


@torch.no_grad()
def generate_with_finish(model, tokenizer, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                         generator=None, stop=(), n_samples=1):
    """New tokens per row (the EOS / stop id included when sampled) and why each row stopped ("eos" | "stop" |
    "length"). There are n_samples rows per prompt, prompt-major (row r continues prompt r // n_samples): each
    prompt is prefilled once and its cache rows copied. tokenizer None: no EOS, no stop strings (benchmarks)."""
    device = model.lm_head.weight.device
    limits = _limits(model, prompts, max_new_tokens)
    stop = (stop,) if isinstance(stop, str) else tuple(stop)   # one string is one stop string, not its characters
    B, T = len(prompts), max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    input_ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts], device=device)  # (B, T) right padded
    cache = model.new_cache(B, max(len(p) + n for p, n in zip(prompts, limits)))
    logits = model.prefill(input_ids, lengths, cache)                                # (B, V)
    out = [[] for _ in range(B * n_samples)]
    finish = ["length" if limits[r // n_samples] == 0 else None for r in range(B * n_samples)]
    active = [r for r, f in enumerate(finish) if f is None]   # the output row of each row of the cache
    if active != list(range(B)):
        rows = torch.tensor([r // n_samples for r in active], dtype=torch.long, device=device)
        cache, logits = cache.select(rows), logits[rows]
    while active:
        next_ids = sample_next(logits, temperature, top_p, top_k, generator)        # (B_active,)
        keep = []
        for row, (r, token) in enumerate(zip(active, next_ids.tolist())):
            out[r].append(token)
            finish[r] = _check_stop(tokenizer, out[r], limits[r // n_samples], stop)
            if finish[r] is None:
                keep.append(row)
        if len(keep) < len(active):  # finished rows leave the batch (and so never outgrow the cache)
            rows = torch.tensor(keep, dtype=torch.long, device=device)
            active, next_ids, cache = [active[i] for i in keep], next_ids[rows], cache.select(rows)
        if active:
            logits = model.decode(next_ids, cache)
    return out, finish


@torch.no_grad()
def generate_naive(model, tokenizer, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                   generator=None, stop=()):
    """The reference for the engine above: no cache, the whole right-padded batch through the model per token.
    Returns the same (tokens, finish) and draws the same random numbers."""
    device = model.lm_head.weight.device
    limits = _limits(model, prompts, max_new_tokens)
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    out = [[] for _ in prompts]
    finish = ["length" if n == 0 else None for n in limits]
    while any(f is None for f in finish):
        active = [b for b, f in enumerate(finish) if f is None]
        seqs = [prompts[b] + out[b] for b in active]
        T = max(len(s) for s in seqs)
        input_ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs], device=device)
        last = torch.tensor([len(s) - 1 for s in seqs], device=device)
        logits = model(input_ids)[torch.arange(len(seqs), device=device), last]     # (B_active, V)
        for b, token in zip(active, sample_next(logits, temperature, top_p, top_k, generator).tolist()):
            out[b].append(token)
            finish[b] = _check_stop(tokenizer, out[b], limits[b], stop)
    return out, finish


def generate(model, tokenizer, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, generator=None,
             stop=()):
    """New tokens (list[list[int]]) for each prompt (list[list[int]]); EOS is the last token when sampled."""
    return generate_with_finish(model, tokenizer, prompts, max_new_tokens, temperature, top_p, top_k, generator,
                                stop)[0]


def sample_batched(model, tokenizer, prompts, max_new_tokens, batch_size, n_samples=1, **sampling):
    """generate_with_finish over batches of about batch_size rows (longest prompts first, so that a batch holds
    similar lengths); n_samples rows per prompt, prompt-major, in the order of prompts."""
    limits = _limits(model, prompts, max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    per_batch = max(1, batch_size // n_samples)
    out, finish = [None] * (len(prompts) * n_samples), [None] * (len(prompts) * n_samples)
    for i in range(0, len(order), per_batch):
        idx = order[i:i + per_batch]
        tokens, why = generate_with_finish(model, tokenizer, [prompts[j] for j in idx], [limits[j] for j in idx],
                                           n_samples=n_samples, **sampling)
        for k, j in enumerate(idx):
            out[j * n_samples:(j + 1) * n_samples] = tokens[k * n_samples:(k + 1) * n_samples]
            finish[j * n_samples:(j + 1) * n_samples] = why[k * n_samples:(k + 1) * n_samples]
    return out, finish


@torch.no_grad()
def last_token_values(value_model, seqs, batch_size=64):
    """V(s) at the last token of each sequence (list[list[int]]) -> list[float]; batches of similar lengths."""
    device = value_model.head.weight.device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    values = [0.0] * len(seqs)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        T = len(seqs[idx[0]])
        input_ids = torch.tensor([seqs[j] + [0] * (T - len(seqs[j])) for j in idx], device=device)  # (B, T)
        last = torch.tensor([len(seqs[j]) - 1 for j in idx], device=device)
        v = value_model(input_ids)[torch.arange(len(idx), device=device), last]    # right padding needs no mask
        for j, x in zip(idx, v.tolist()):
            values[j] = x
    return values


# ----------------------------------------------------------------------------------------------------------
# Value-guided step-level beam search and best-of-K (DESIGN §1, "Test-time search")


def beam_search(prompts, expand, value, beam_width, max_steps=20):
    """Value-guided step-level beam search, for many prompts at once.

    expand(pairs) -> for each (prompt, response) pair, beam_width sampled continuations [(new_tokens, finish)] up
    to the next step delimiter; finish is "stop" at a delimiter, "eos" or "length" when the answer is complete.
    value(seqs) -> [float]: the value at the last token of each token sequence.
    Each prompt starts with one empty beam; every beam samples beam_width continuations; each candidate is scored
    at its last token (a finished one at the token before EOS: the state whose action is EOS; the EOS position is
    never trained); finished candidates go to a pool; the beam_width best unfinished ones (earlier candidate
    first on ties) are the next beams. The answer is the highest-valued finished candidate; only if none
    finished within max_steps expansions is it the best beam still open.
    Returns per prompt {"response": tokens, "value", "pool": [(value, tokens)], "tokens": tokens sampled}.
    """
    beams = [[(0.0, [])] for _ in prompts]       # per prompt: (value, response tokens)
    pools = [[] for _ in prompts]
    sampled = [0] * len(prompts)
    for _ in range(max_steps):
        parents = [(i, resp) for i, bs in enumerate(beams) for _, resp in bs]
        if not parents:
            break
        steps = expand([(prompts[i], resp) for i, resp in parents])
        candidates = [(i, resp + new, why) for (i, resp), conts in zip(parents, steps) for new, why in conts]
        values = value([prompts[i] + (resp[:-1] if why == "eos" else resp) for i, resp, why in candidates])
        open_ = [[] for _ in prompts]
        for (i, resp, why), v in zip(candidates, values):
            (open_ if why == "stop" else pools)[i].append((v, resp))
        for (i, _), conts in zip(parents, steps):
            sampled[i] += sum(len(new) for new, _ in conts)
        # sorted() is stable: among equal values the earlier candidate (earlier beam, earlier sample) wins
        beams = [sorted(cands, key=lambda c: -c[0])[:beam_width] for cands in open_]
    results = []
    for pool, bs, n in zip(pools, beams, sampled):
        answers = pool or bs  # the answer is a finished candidate; open beams only when none finished
        best_value, best = max(answers, key=lambda c: c[0])   # max() keeps the first of equal values
        results.append({"response": best, "value": best_value, "pool": answers, "tokens": n})
    return results


def value_beam_search(policy, tokenizer, value_fn, prompts, beam_width, delimiters, max_new_tokens,
                      temperature=1.0, top_p=1.0, top_k=0, generator=None, batch_size=64, max_steps=20):
    """beam_search with steps sampled from the policy up to a delimiter; a response holds at most max_new_tokens.
    value_fn(seqs) -> values at the last token, e.g. partial(last_token_values, value_model); the policy and the
    value may come from different runs (an SFT policy guided by an OREO value isolates what the value adds)."""
    def expand(pairs):
        tokens, finish = sample_batched(policy, tokenizer, [p + r for p, r in pairs],
                                        [max_new_tokens - len(r) for _, r in pairs], batch_size,
                                        n_samples=beam_width, temperature=temperature, top_p=top_p, top_k=top_k,
                                        generator=generator, stop=delimiters)
        return [list(zip(tokens[i:i + beam_width], finish[i:i + beam_width]))
                for i in range(0, len(tokens), beam_width)]
    return beam_search(prompts, expand, value_fn, beam_width, max_steps)


def best_of_k(policy, tokenizer, value_fn, prompts, k, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
              generator=None, stop=(), batch_size=64):
    """K samples per prompt, each scored by the value at its last token (before EOS when it ended with EOS).
    Returns per prompt {"samples": [tokens] * K, "finish", "values", "best": index of the highest value (first
    on ties)}. With stop strings that end a turn this is per-turn action selection (see select_action)."""
    tokens, finish = sample_batched(policy, tokenizer, prompts, max_new_tokens, batch_size, n_samples=k,
                                    temperature=temperature, top_p=top_p, top_k=top_k, generator=generator,
                                    stop=stop)
    seqs = [p for p in prompts for _ in range(k)]
    values = value_fn([s + (t[:-1] if w == "eos" else t) for s, t, w in zip(seqs, tokens, finish)])
    results = []
    for i in range(len(prompts)):
        vs = values[i * k:(i + 1) * k]
        results.append({"samples": tokens[i * k:(i + 1) * k], "finish": finish[i * k:(i + 1) * k], "values": vs,
                        "best": max(range(k), key=lambda j: vs[j])})
    return results


def select_action(policy, tokenizer, value_fn, prefix, k, end_of_turn, max_new_tokens=256, temperature=1.0,
                  top_p=1.0, generator=None):
    """Best-of-K action selection for agents: prefix (token ids) is a transcript ending where the assistant's
    turn starts; sample K actions up to an end_of_turn string (e.g. ("<|im_end|>",)) or EOS and return the
    (action tokens, value) of the highest-valued one. Stepping the environment is the caller's job."""
    r = best_of_k(policy, tokenizer, value_fn, [prefix], k, max_new_tokens, temperature, top_p,
                  generator=generator, stop=end_of_turn)[0]
    return r["samples"][r["best"]], r["values"][r["best"]]


# ----------------------------------------------------------------------------------------------------------
# Loading, with the errors a user can cause


def device_and_dtype(args):
    """--device auto: this rank's GPU (LOCAL_RANK) if there is one; --dtype auto: bfloat16 on GPU, else float32."""
    gpu = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
    device = torch.device(gpu if args.device == "auto" else args.device)
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" \
        else getattr(torch, args.dtype)
    return device, dtype


def need_folder(folder, flag):
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{flag} {folder}: no such folder (expected a checkpoint folder with config.json, "
                                f"*.safetensors and tokenizer files)")


def load_policy(folder, device, dtype):
    """(Transformer in eval mode, its data.Tokenizer) from a checkpoint folder."""
    need_folder(folder, "--policy")
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
    value_model = ValueModel.from_pretrained(folder, dtype=dtype, device=device).eval()
    ours, theirs = policy.config.vocab_size, value_model.backbone.config.vocab_size
    if ours != theirs:
        raise ValueError(f"--value {folder} has vocab_size {theirs} but --policy {policy_folder} has {ours}: "
                         f"the value must be trained on the policy's tokenizer")
    a, b = tokenizer_fingerprint(tokenizer), tokenizer_fingerprint(data.Tokenizer.from_pretrained(folder))
    for key in a:
        if a[key] != b[key]:
            where = ""
            if key == "tokens":
                i = next(i for i, (x, y) in enumerate(zip(a[key], b[key])) if x != y)
                where = f" (first difference: token id {i} is {a[key][i]!r} vs {b[key][i]!r})"
            raise ValueError(f"--policy {policy_folder} and --value {folder} have different tokenizers: "
                             f"{key} differs{where}; a value model only scores the token ids it was trained on")
    return value_model


def read_problems(path):
    problems = data.load_problems(path)   # an empty file stops there, with its name
    repeated = [i for i, n in Counter(p["id"] for p in problems).items() if n > 1]
    if repeated:
        raise ValueError(f"--problems {path}: problem id {repeated[0]!r} appears more than once (ids must be "
                         f"unique: collect uses them to resume)")
    return problems


def encode_prompt(tokenizer, question, style):
    """Prompt ids exactly as data.encode_trajectory builds them for training (BOS first when the tokenizer adds one)."""
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    return bos + tokenizer.encode(data.format_prompt(question, style), allow_special=True)


def response_text(tokenizer, tokens, stop=()):
    """The response as text, without the EOS (or other stop id) or the --stop string that ended it."""
    if tokens and tokens[-1] in tokenizer.stop_ids:
        tokens = tokens[:-1]
    text = tokenizer.decode(tokens)
    return text[:min([text.find(s) for s in stop if s in text], default=len(text))]


# ----------------------------------------------------------------------------------------------------------
# collect: K graded samples per problem -> the trajectory JSONL that oreo.py trains on


def read_jsonl_lines(path):
    """Rows of a JSONL file that may have been cut by a kill: a last line without its newline is ignored."""
    if not Path(path).exists():
        return []
    lines = Path(path).read_text().split("\n")
    rows = []
    for n, line in enumerate(lines[:-1], 1):   # lines[-1] is "" or an unfinished line
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e}); delete the line or the file") from None
    return rows


def merge_outputs(out, problems, k):
    """Rewrite out (atomically) with every problem that some file (out itself, then the .part* files of the
    ranks) holds exactly k samples of, in problem order; the part files are removed. Returns the ids kept."""
    out = Path(out)
    parts = sorted(out.parent.glob(out.name + ".part*"))
    groups = {}
    for path in [out] + parts:
        in_file = {}
        for row in read_jsonl_lines(path):
            in_file.setdefault(row["id"], []).append(row)
        for pid, rows in in_file.items():
            if len(rows) == k and pid not in groups:
                groups[pid] = rows
    rows = [row for p in problems if p["id"] in groups for row in groups[p["id"]]]
    data.write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    for path in parts:
        path.unlink()
    return set(groups)


def collect(args):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device, dtype = device_and_dtype(args)
    if world > 1:
        # only barriers, never tensors, go between ranks: gloo, with a timeout long enough for the slowest rank
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
        if device.type == "cuda":
            torch.cuda.set_device(device)
    problems = read_problems(args.problems)
    policy, tokenizer = load_policy(args.policy, device, dtype)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if rank == 0:   # fold in what an interrupted run left behind, dropping half-written problems
        merge_outputs(out, problems, args.k)
    if world > 1:
        dist.barrier()
    done = {row["id"] for row in read_jsonl_lines(out)}
    # Chunks are fixed slices of the problem file and each has its own seed, so a resumed run (or one with another
    # number of ranks) samples exactly what an uninterrupted one would have.
    per_chunk = max(1, args.batch_size // args.k)
    chunks = [problems[i:i + per_chunk] for i in range(0, len(problems), per_chunk)]
    mine = [c for c in range(rank, len(chunks), world) if any(p["id"] not in done for p in chunks[c])]
    todo = sum(p["id"] not in done for c in mine for p in chunks[c])   # this rank's share
    if rank == 0:
        print(f"collect: {len(problems)} problems, {len(done)} already in {out}, "
              f"{sum(p['id'] not in done for p in problems)} to go on {world} rank(s), k={args.k}", flush=True)
    part = out.with_name(f"{out.name}.part{rank}")
    t0, n_done, n_correct, n_samples = time.time(), 0, 0.0, 0
    for c in mine:
        generator = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + c)
        prompts = [encode_prompt(tokenizer, p["question"], args.prompt_style) for p in chunks[c]]
        tokens, finish = sample_batched(policy, tokenizer, prompts, args.max_new_tokens, args.batch_size,
                                        n_samples=args.k, temperature=args.temperature, top_p=args.top_p,
                                        top_k=args.top_k, generator=generator, stop=tuple(args.stop))
        rows = []
        for i, p in enumerate(chunks[c]):
            if p["id"] in done:
                continue
            prompt = data.format_prompt(p["question"], args.prompt_style)
            for j in range(i * args.k, (i + 1) * args.k):
                response = response_text(tokenizer, tokens[j], args.stop)
                rows.append({"id": p["id"], "prompt": prompt, "response": response,
                             "reward": data.grade(response, p["gold"]), "gold": p["gold"], "finish": finish[j]})
            n_done += 1
        with open(part, "a") as f:   # one write per chunk, whole lines: a kill loses at most this chunk
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
        n_samples += len(rows)
        n_correct += sum(r["reward"] for r in rows)
        if rank == 0:
            seconds = time.time() - t0
            print(f"collect: rank 0 at {n_done}/{todo} problems, {n_samples / seconds:.1f} samples/s, mean reward "
                  f"{n_correct / n_samples:.3f}, eta {seconds / n_done * (todo - n_done) / 60:.1f} min", flush=True)
    if world > 1:
        dist.barrier()
    if rank == 0:
        kept = merge_outputs(out, problems, args.k)
        rewards = [r["reward"] for r in read_jsonl_lines(out)]
        print(f"collect: wrote {len(rewards)} samples of {len(kept)} problems to {out} "
              f"(mean reward {sum(rewards) / max(len(rewards), 1):.3f}) in {time.time() - t0:.0f} s", flush=True)
    if world > 1:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# eval: greedy / sampling / beam search / best-of-K on a problem file


def parse_methods(spec):
    """"greedy,sample,beam3,bestof4" -> [("greedy", 1), ("sample", 1), ("beam", 3), ("bestof", 4)]."""
    methods = []
    for name in spec.split(","):
        kind = name.rstrip("0123456789")
        width = name[len(kind):]
        if (kind in ("greedy", "sample") and not width
                or kind in ("beam", "randbeam", "bestof") and width and int(width) > 0):
            methods.append((kind, int(width or 1)))
        else:
            raise ValueError(f"--methods: unknown method {name!r}; use greedy, sample, beamB, randbeamB or "
                             f"bestofK (e.g. beam5, bestof4)")
    return methods


def parse_delimiters(spec):
    """A preset name of data.STEP_DELIMITERS ("gsm8k", "math") or a JSON list of strings."""
    if spec in data.STEP_DELIMITERS:
        return tuple(data.STEP_DELIMITERS[spec])
    try:
        delimiters = json.loads(spec)
    except json.JSONDecodeError:
        delimiters = None
    if not isinstance(delimiters, list) or not delimiters or not all(isinstance(d, str) and d for d in delimiters):
        raise ValueError(f"--delimiters {spec!r}: use a preset ({', '.join(data.STEP_DELIMITERS)}) or a JSON list "
                         f"of non-empty strings such as '[\"\\\\n\"]'")
    return tuple(delimiters)


def evaluate(args):
    device, dtype = device_and_dtype(args)
    methods = parse_methods(args.methods)
    delimiters = parse_delimiters(args.delimiters)
    problems = read_problems(args.problems)[:args.limit or None]
    policy, tokenizer = load_policy(args.policy, device, dtype)
    value_fn = None
    if args.value:
        value_model = load_value(args.value, policy, tokenizer, args.policy, device, dtype)
        value_fn = lambda seqs: last_token_values(value_model, seqs, args.batch_size)
    elif any(kind in ("beam", "bestof") for kind, _ in methods):
        raise ValueError("--methods beam*/bestof* need a value model: pass --value FOLDER")
    prompts = [encode_prompt(tokenizer, p["question"], args.prompt_style) for p in problems]
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    summary, per_problem, choice = {}, {}, {}
    for kind, width in methods:
        name = kind if kind in ("greedy", "sample") else f"{kind}{width}"
        generator = torch.Generator(device=device).manual_seed(args.seed)
        t0 = time.time()
        values = [None] * len(problems)
        if kind in ("greedy", "sample"):
            responses, _ = sample_batched(policy, tokenizer, prompts, args.max_new_tokens, args.batch_size,
                                          generator=generator, stop=tuple(args.stop),
                                          **(dict(sampling, temperature=0.0) if kind == "greedy" else sampling))
            n_tokens = sum(len(r) for r in responses)
        elif kind in ("beam", "randbeam"):   # randbeam: seeded random scores instead of the value (a control)
            rng = random.Random(args.seed)
            score = value_fn if kind == "beam" else lambda seqs: [rng.random() for _ in seqs]
            results = value_beam_search(policy, tokenizer, score, prompts, width, delimiters,
                                        args.max_new_tokens, generator=generator, batch_size=args.batch_size,
                                        max_steps=args.max_steps, **sampling)
            responses = [r["response"] for r in results]
            values = [r["value"] for r in results]
            n_tokens = sum(r["tokens"] for r in results)
        else:
            results = best_of_k(policy, tokenizer, value_fn, prompts, width, args.max_new_tokens,
                                generator=generator, stop=tuple(args.stop), batch_size=args.batch_size, **sampling)
            responses = [r["samples"][r["best"]] for r in results]
            values = [r["values"][r["best"]] for r in results]
            n_tokens = sum(len(s) for r in results for s in r["samples"])
            # how well the value chooses among the same K samples, against chance and the best possible choice
            correct = [[data.grade(response_text(tokenizer, s, args.stop), p["gold"]) for s in r["samples"]]
                       for r, p in zip(results, problems)]
            choice[name] = {"by_value": sum(c[r["best"]] for c, r in zip(correct, results)) / len(problems),
                            "random": sum(sum(c) / width for c in correct) / len(problems),
                            "best_possible": sum(max(c) for c in correct) / len(problems)}
        seconds = time.time() - t0
        texts = [response_text(tokenizer, r, args.stop) for r in responses]
        rewards = [data.grade(t, p["gold"]) for t, p in zip(texts, problems)]
        summary[name] = {"accuracy": sum(rewards) / len(problems), "tokens": n_tokens, "seconds": seconds}
        per_problem[name] = [{"id": p["id"], "gold": p["gold"], "answer": data.extract_answer(t), "reward": r,
                              "value": v, "response": t} for p, t, r, v in zip(problems, texts, rewards, values)]
        print(f"eval: {name} done in {seconds:.1f} s", file=sys.stderr, flush=True)
    print(f"{'method':>10} {'accuracy':>9} {'tokens':>9} {'time s':>8} {'tokens/s':>9}   ({len(problems)} problems)")
    for name, s in summary.items():
        print(f"{name:>10} {s['accuracy']:9.3f} {s['tokens']:9d} {s['seconds']:8.1f} "
              f"{s['tokens'] / max(s['seconds'], 1e-9):9.0f}")
    for name, c in choice.items():
        print(f"{name}: choosing among the samples by value {c['by_value']:.3f}, at random {c['random']:.3f} "
              f"(expected), best possible {c['best_possible']:.3f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        report = {"policy": args.policy, "value": args.value, "problems": args.problems, "summary": summary,
                  "choice": choice, "per_problem": per_problem}
        data.write_text(args.out, json.dumps(report, indent=1))
        print(f"eval: per-problem results in {args.out}")
    return summary, choice


# ----------------------------------------------------------------------------------------------------------
# Command line


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model and data")
    g.add_argument("--policy", required=True, help="policy checkpoint folder (config.json, safetensors, tokenizer)")
    g.add_argument("--problems", required=True, help="JSONL of problems {id, question, gold} (data.load_problems)")
    g.add_argument("--prompt-style", default="plain", choices=data.PROMPT_STYLES,
                   help="data.format_prompt style (the one the policy was trained with)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda:LOCAL_RANK if any)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on GPU, float32 on CPU")
    g = common.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=512, help="response length limit in tokens")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    g.add_argument("--stop", action="append", default=[], help="extra stop string ending a response, e.g. "
                   "'<|im_end|>' when the tokenizer's EOS is another token (repeatable)")
    g.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass")
    g.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("collect", parents=[common], help="K graded samples per problem -> trajectory JSONL",
                       description="Append K graded samples per problem to --out as {id, prompt, response, reward, "
                       "gold, finish}. Rerun to resume. Under torchrun each rank takes every WORLD_SIZE-th chunk.")
    p.add_argument("--out", required=True, help="trajectory JSONL to write (appended to on resume)")
    p.add_argument("-k", "--k", type=int, default=10, help="samples per problem (paper: 10)")
    p.add_argument("--temperature", type=float, default=1.0, help="paper: 1.0")
    p.add_argument("--top-p", type=float, default=0.95, help="paper: 0.95")

    p = sub.add_parser("eval", parents=[common], help="accuracy of greedy / sampling / beam search / best-of-K",
                       description="Print accuracy, tokens generated and time per method; --out writes the "
                       "per-problem results as JSON.")
    p.add_argument("--value", help="value model folder (needed by beam and bestof); may come from another run "
                   "than --policy, e.g. the SFT policy with an OREO value to isolate what the value adds")
    p.add_argument("--methods", default="greedy,sample,beam3,beam5,bestof4",
                   help="comma-separated: greedy, sample, beamB (B beams, B samples each), randbeamB (the same "
                   "search scored at random: the control for the value), bestofK")
    p.add_argument("--delimiters", default="gsm8k", help="step delimiters for beam search: a preset of "
                   "data.STEP_DELIMITERS (gsm8k, math) or a JSON list of strings")
    p.add_argument("--max-steps", type=int, default=20, help="beam search expansions (paper: 20)")
    p.add_argument("--temperature", type=float, default=1.0, help="for sample, beam and bestof (paper: 1.0)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N problems (0: all)")
    p.add_argument("--out", help="write per-problem results to this JSON file")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return collect(args) if args.command == "collect" else evaluate(args)


if __name__ == "__main__":
    main()
