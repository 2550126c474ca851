"""Multi-turn agents (DESIGN.md §6): batched rollouts in an environment, demonstrations, collection of K episodes per
training task, and evaluation with greedy or value-guided best-of-K action selection.

    python agent.py demos --out demos.jsonl --n 240                    # the demonstrator's transcripts (SFT data)
    python agent.py collect --policy sft/policy --out episodes.jsonl -k 4
    python agent.py eval --policy oreo/policy --value oreo/value --methods greedy,bestof3 --out eval.json
    python agent.py diagnose --eval eval.json --value oreo/value       # failing actions; V's AUCs, within turns
    python agent.py diagnose --eval eval.json --returns 8 --policy oreo/policy   # the returns V would have to rank

A transcript is a `{messages, reward}` row that oreo.py trains on: the first user turn holds the first observation
and the task, each assistant turn is one action, each later user turn the environment's answer (masked). The
environment is household.py's by default; `--env module:factory` plugs in any other: factory(split, seed, max_steps)
returns an object with `tasks(split, n)` (JSON task specs, each with a unique "id"), `reset(task) -> str` and
`step(action) -> (observation, reward, done)`.

The engine: every live episode (times K candidates) is one row of a KV cache, fed through the models' extend. While
sampling, the rows move in lockstep, one token per row per model call (a row whose action has ended waits); then
each episode's observation goes into its rows in one call. Each turn the rows sample an action up to EOS
(<|im_end|> for ChatML) or a newline; with K > 1 the value model, fed the same tokens, scores each candidate at its
last token (the state whose action ends the turn) and the best one is kept. Each row samples from its own
generator, seeded by (seed, task id, sample), so batching never changes what an episode draws.
"""
import argparse
import datetime
import importlib
import json
import os
import random
import time
import zlib
from pathlib import Path

import torch
import regex
import torch.distributed as dist

import data
import diagnose
import household
import loading
import search
from model import Cache, Config, Transformer
from tokenizer import GPT2_PATTERN

# ----------------------------------------------------------------------------------------------------------
# Transcripts: token ids exactly as data.encode_trajectory renders them for training


def render(tokenizer, messages):
    """Token ids of messages followed by an open assistant turn (its header): where the next action starts."""
    ids = data.encode_trajectory(tokenizer, {"messages": messages + [{"role": "assistant", "content": ""}],
                                            "reward": 0.0}, max_len=10**9).ids
    return ids[:-1 - len(tokenizer.encode("\n"))]   # drop the empty turn's end token and the newline after it


class Rows:
    """A model's KV cache over the rows, fed through Transformer.extend; keeps each row's last final hidden state
    (for the next token's logits, or a value). A feed appends any number of tokens per row, none to a row that
    waits."""

    def __init__(self, model, prompts):
        self.model = model
        self.capacity = model.config.max_seq_len
        self.cache = model.new_cache(len(prompts), min(self.capacity, max(256, 2 * max(map(len, prompts)))))
        self.last = None
        self.feed(prompts)   # extend on an empty cache is a prefill

    def feed(self, tokens):
        """tokens: a list of ids per row (empty: the row is left as it was)."""
        device = self.cache.lengths.device
        n_new = torch.tensor([len(t) for t in tokens], device=device)                        # (B,)
        need = int((self.cache.lengths + n_new).max())
        if need > self.cache.k.shape[3]:   # grow the cache (doubling, up to max_seq_len)
            old, S = self.cache, min(self.capacity, max(need, 2 * self.cache.k.shape[3]))
            self.cache = Cache(old.k.new_zeros(*old.k.shape[:3], S, old.k.shape[4]),
                               old.v.new_zeros(*old.v.shape[:3], S, old.v.shape[4]), old.lengths)
            self.cache.k[:, :, :, :old.k.shape[3]], self.cache.v[:, :, :, :old.v.shape[3]] = old.k, old.v
        T = int(n_new.max())
        if T == 0:
            return
        ids = torch.tensor([t + [0] * (T - len(t)) for t in tokens], device=device)        # (B, T) right padded
        h = self.model.extend(ids, n_new, self.cache)                                     # (B, T, D)
        last = h[torch.arange(len(tokens), device=device), (n_new - 1).clamp(min=0)]      # (B, D) the last new one
        self.last = last if self.last is None else torch.where((n_new > 0)[:, None], last, self.last)

    def rewind(self, row, length):
        self.cache.lengths[row] = length

    def copy_row(self, src, dst):
        for buf in (self.cache.k, self.cache.v):
            buf[:, dst] = buf[:, src]
        self.cache.lengths[dst] = self.cache.lengths[src]
        self.last[dst] = self.last[src]


def generators(seed, task_id, k):
    """One generator per candidate row of an episode, seeded by (seed, task id, candidate): an episode draws the
    same numbers whichever batch it runs in."""
    return [torch.Generator().manual_seed(zlib.crc32(f"{seed}:{task_id}:{j}".encode())) for j in range(k)]


@torch.no_grad()
def rollout(policy, tokenizer, envs, tasks, seeds, k=1, value_model=None, temperature=1.0, max_action_tokens=48,
            max_turns=40, prefixes=None):
    """Run one episode per (env, task) together; seeds[i] seeds episode i's generators. With k > 1 each turn
    samples k candidate actions and keeps the one the value model rates highest (the first on ties); k = 1 at
    temperature 0 is greedy. Returns per episode {"messages", "reward" (the sum of the step rewards), "steps",
    "values" (the chosen candidate's per turn, k > 1), "candidates" (per turn, each candidate's [text, value],
    k > 1), "action_tokens" (the sampled ids of each chosen action; its text may encode back to other ids),
    "end"}; end is "done" (the environment ended it), "turns" (max_turns) or "context" (the next turn would not
    fit the model's max_seq_len). prefixes[i], if given, is a transcript (ending with an answer) for episode i to
    go on from: env i replays its actions (each answer must be the transcript's, the episode not over); messages
    hold the prefix, every other field counts the new turns only."""
    E, limit = len(tasks), policy.config.max_seq_len
    messages = [[{"role": "user", "content": env.reset(task)}] for env, task in zip(envs, tasks)]
    for env, task, m, prefix in zip(envs, tasks, messages, prefixes or [None] * E):
        if prefix:
            answers = [m[0]["content"]]
            for action in prefix[1::2] if len(prefix) % 2 else []:
                observation, _, done = env.step(action["content"])
                answers.append(None if done else observation)
            if answers != [u["content"] for u in prefix[0::2]]:
                raise data.UserError(f"task {task['id']}: the environment does not replay the prefix transcript "
                                     "(or it ends the episode, or ends with an action)")
            m[:] = [dict(x) for x in prefix]
    ids = [render(tokenizer, m) for m in messages]          # each episode's transcript, up to its open turn
    for task, prompt in zip(tasks, ids):
        if len(prompt) + max_action_tokens > limit:
            raise data.UserError(f"task {task['id']}: the transcript so far has {len(prompt)} tokens; with "
                             f"{max_action_tokens} for an action that exceeds the model's {limit} positions")
    gens = [g for task, s in zip(tasks, seeds) for g in generators(s, task["id"], k)]
    # the value model's rows keep hidden states too: its head runs below on each episode's k candidates alone (in
    # ValueModel.extend it would run on the whole batch, whose float32 rounding then depends on the batch's shape)
    models = [policy] + ([value_model.backbone] if k > 1 else [])
    rows = [Rows(m, [ids[r // k] for r in range(E * k)]) for m in models]   # row r: candidate r % k of r // k
    ends = set(tokenizer.stop_ids) | ({tokenizer.special_tokens["<|im_end|>"]} if tokenizer.chatml else set())
    episodes = [{"messages": m, "reward": 0.0, "steps": 0, "values": [], "candidates": [], "action_tokens": [],
                 "end": None}
                for m in messages]
    for _ in range(max_turns):
        live = [e for e in range(E) if episodes[e]["end"] is None]
        if not live:
            break
        start = {e: len(ids[e]) for e in live}
        # 1. sample: every live row until its action ends; the token that ends it (EOS, a newline) is not fed
        actions = {r: [] for e in live for r in range(e * k, e * k + k)}
        open_rows = set(actions)
        while open_rows:
            logits = policy.lm_head(rows[0].last)                                       # (E*k, V)
            step = [[] for _ in range(E * k)]
            greedy = logits.argmax(-1).tolist() if temperature == 0 else None
            for r in sorted(open_rows):
                token = greedy[r] if greedy else search.sample_next(logits[r:r + 1], temperature,
                                                                    generator=gens[r]).item()
                if token in ends or b"\n" in tokenizer.token_bytes([token])[0]:
                    open_rows.discard(r)
                    continue
                actions[r].append(token)
                step[r] = [token]
                if len(actions[r]) >= max_action_tokens:
                    open_rows.discard(r)
            if any(step):
                for model_rows in rows:
                    model_rows.feed(step)
        # 2. choose (the value at each candidate's last token), act, and append the answer to the transcript
        pending = [None] * E
        for e in live:
            best = e * k
            if k > 1:
                h = rows[1].last[e * k:e * k + k].float()
                v = torch.nn.functional.linear(h, value_model.head.weight.float())[:, 0].tolist()
                best = e * k + max(range(k), key=lambda j: v[j])
                episodes[e]["values"].append(v[best - e * k])
                episodes[e]["candidates"].append([[tokenizer.decode(actions[e * k + j]), v[j]] for j in range(k)])
            text = tokenizer.decode(actions[best])
            observation, reward, done = envs[e].step(text)
            ep = episodes[e]
            ep["messages"] += [{"role": "assistant", "content": text}, {"role": "user", "content": observation}]
            ep["reward"] += reward
            ep["steps"] += 1
            ep["action_tokens"].append(actions[best])
            new = render(tokenizer, ep["messages"])
            keep = new[:start[e] + len(actions[best])] == ids[e] + actions[best]   # the text encodes back the same
            cached = start[e] + len(actions[best]) if keep else start[e]
            for r in range(e * k, e * k + k):
                for model_rows in rows:
                    if keep and r != best:
                        model_rows.copy_row(best, r)
                    elif not keep:
                        model_rows.rewind(r, start[e])
            ids[e] = new
            if done:
                ep["end"] = "done"
            elif len(new) + max_action_tokens > limit:
                ep["end"] = "context"
            else:
                pending[e] = new[cached:]
        # 3. feed the answers (and the next assistant header) to every row of the episodes that go on, in one call
        step = [pending[r // k] or [] for r in range(E * k)]
        for model_rows in rows:
            model_rows.feed(step)
    for ep in episodes:
        ep["end"] = ep["end"] or "turns"
    return episodes


def run_episodes(policy, tokenizer, make_env, tasks, samples=1, seed=0, batch_size=32, prefixes=None, **kw):
    """rollout over chunks of batch_size episodes: samples episodes per task (sample s seeded by f"{seed}:{s}"),
    task-major. With prefixes (one per task), each goes on from its task's prefix, and sample s of the j-th is
    seeded by f"{seed}:{s}:prefix{j}", so that prefixes of one task draw apart. Returns the episodes with "id" (the
    task's) and "sample" added."""
    jobs = [(task, s, p, f"{seed}:{s}" if p is None else f"{seed}:{s}:prefix{j}")
            for j, (task, p) in enumerate(zip(tasks, prefixes or [None] * len(tasks))) for s in range(samples)]
    out = []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        episodes = rollout(policy, tokenizer, [make_env() for _ in chunk], [job[0] for job in chunk],
                           [job[3] for job in chunk], prefixes=[job[2] for job in chunk], **kw)
        out += [{"id": t["id"], "sample": s, **ep} for (t, s, _, _), ep in zip(chunk, episodes)]
    return out


# ----------------------------------------------------------------------------------------------------------
# Command line: demos, collect, eval, diagnose


def env_factory(spec, split, seed, max_steps):
    """A function making fresh environments: household.py's ("household"), or module:factory(split, seed,
    max_steps) for any object with tasks(split, n), reset(task) and step(action)."""
    if spec == "household":
        return lambda: household.HouseholdEnv(split, seed, max_steps)
    module, _, name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise data.UserError(f"--env {spec}: cannot load it ({e}); use household or module:factory") from None
    return lambda: factory(split, seed, max_steps)


def row(episode):
    keys = ("id", "sample", "messages", "reward", "steps", "end")
    keys += ("candidates",) if episode.get("candidates") else ()   # best-of-K: for agent.py diagnose
    return {k: episode[k] for k in keys}


def word_tokenizer(texts):
    """A byte-level BPE whose tokens include every pre-token (GPT-2 pattern) of texts: the environment's words and
    numbers, with and without their leading space, become one token each, as in a real LLM's vocabulary. Every
    byte stays a token, so any text still encodes. Merges are the prefixes of each word, shortest first; a word
    that does not come out as one token gets the merge of its first two pieces until it does."""
    words = sorted({w.encode() for t in texts for w in regex.findall(GPT2_PATTERN, t) if len(w.encode()) > 1})
    ranks = {bytes([b]): b for b in range(256)}
    for n in range(2, max(map(len, words), default=1) + 1):
        for w in words:
            ranks.setdefault(w[:n], len(ranks)) if len(w) >= n else None
    for _ in range(50):
        tok = data.Tokenizer(ranks, GPT2_PATTERN, {"<|endoftext|>": len(ranks), "<|pad|>": len(ranks) + 1},
                             eos="<|endoftext|>", pad="<|pad|>", name="household")
        pieces = {w: tok.token_bytes(tok.encode(w.decode())) for w in words}
        broken = [p for p in pieces.values() if len(p) > 1]
        if not broken:
            return tok
        for p in broken:
            ranks.setdefault(p[0] + p[1], len(ranks))
    raise RuntimeError("word_tokenizer: some words still split after 50 rounds")


def init(args):
    """A tiny Llama-family model from scratch, with the word tokenizer of the demonstrator's transcripts."""
    env, rng, texts = household.HouseholdEnv("train", args.seed, args.max_steps), random.Random(args.seed), []
    for task in env.tasks(n=200):
        first, turns, _ = household.demonstrate(env, task, rng)
        texts += [first, "user", "assistant"] + [text for turn in turns for text in turn] + [household.NOTHING]
    tokenizer = word_tokenizer(texts)
    d = args.d_model
    config = Config(model_type="llama", vocab_size=tokenizer.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                    n_kv_head=args.n_head, d_model=d, head_dim=d // args.n_head, d_ff=(8 * d // 3 + 31) // 32 * 32,
                    max_seq_len=args.max_len, norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=True)
    torch.manual_seed(args.seed)
    Transformer(config).save_pretrained(args.out, tokenizer=tokenizer)
    print(f"agent init: {sum(p.numel() for p in Transformer(config).parameters()) / 1e6:.2f}M parameters, "
          f"{tokenizer.vocab_size} tokens -> {args.out}", flush=True)


def demos(args):
    """The demonstrator's transcripts on the training tasks: SFT data with visible mistakes and a 0/1 reward."""
    env = household.HouseholdEnv("train", args.seed, args.max_steps)
    rng, rows = random.Random(f"demos:{args.seed}"), []
    for task in env.tasks(n=args.tasks):
        for s in range(args.per_task):
            first, turns, reward = household.demonstrate(env, task, rng, args.p_poor_search, args.p_skip,
                                                         args.p_wrong_place)
            messages = [{"role": "user", "content": first}]
            for action, observation in turns:
                messages += [{"role": "assistant", "content": action}, {"role": "user", "content": observation}]
            rows.append({"id": task["id"], "sample": s, "messages": messages, "reward": reward,
                         "steps": len(turns), "end": "done" if reward or len(turns) == args.max_steps else "gave up"})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    data.write_jsonl(args.out, rows)
    print(f"agent demos: {len(rows)} transcripts, success {sum(r['reward'] for r in rows) / len(rows):.3f}, "
          f"mean {sum(r['steps'] for r in rows) / len(rows):.1f} steps -> {args.out}", flush=True)


def collect(args):
    """K episodes per training task, appended chunk by chunk (resumable); under torchrun each rank takes every
    WORLD_SIZE-th chunk, as search.py collect does, and rank 0 merges."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device, dtype = data.device_and_dtype(args)
    if world > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
    make_env = env_factory(args.env, "train", args.seed, args.max_steps)
    tasks = make_env().tasks("train", args.tasks)
    policy, tokenizer = loading.load_policy(args.policy, device, dtype)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        search.merge_outputs(out, tasks, args.k)
    if world > 1:
        dist.barrier()
    done = {r["id"] for r in search.read_jsonl_lines(out)}
    per_chunk = max(1, args.batch_size // args.k)
    chunks = [tasks[i:i + per_chunk] for i in range(0, len(tasks), per_chunk)]
    mine = [c for c in range(rank, len(chunks), world) if any(t["id"] not in done for t in chunks[c])]
    if rank == 0:
        print(f"agent collect: {len(tasks)} tasks, {len(done)} already in {out}, k={args.k}, {world} rank(s)",
              flush=True)
    part, t0, n_rows, n_success = out.with_name(f"{out.name}.part{rank}"), time.time(), 0, 0.0
    for n, c in enumerate(mine, 1):
        todo = [t for t in chunks[c] if t["id"] not in done]
        episodes = run_episodes(policy, tokenizer, make_env, todo, args.k, args.seed, args.batch_size,
                                temperature=args.temperature, max_action_tokens=args.max_action_tokens,
                                max_turns=args.max_steps)
        with open(part, "a") as f:   # one write per chunk, whole lines: a kill loses at most this chunk
            f.write("".join(json.dumps(row(e)) + "\n" for e in episodes))
            f.flush()
            os.fsync(f.fileno())
        n_rows, n_success = n_rows + len(episodes), n_success + sum(e["reward"] for e in episodes)
        if rank == 0:
            print(f"agent collect: rank 0 chunk {n}/{len(mine)}, {n_rows / (time.time() - t0):.2f} episodes/s, "
                  f"success {n_success / n_rows:.3f}", flush=True)
    if world > 1:
        dist.barrier()
    if rank == 0:
        kept = search.merge_outputs(out, tasks, args.k)
        rewards = [r["reward"] for r in search.read_jsonl_lines(out)]
        print(f"agent collect: {len(rewards)} episodes of {len(kept)} tasks in {out} (success "
              f"{sum(rewards) / max(len(rewards), 1):.3f}) in {time.time() - t0:.0f} s", flush=True)
    if world > 1:
        dist.destroy_process_group()


def evaluate(args):
    """Success rate and mean steps per split and method: greedy, sample, or bestofK (K candidates per turn at
    --temperature, the value model choosing)."""
    device, dtype = data.device_and_dtype(args)
    policy, tokenizer = loading.load_policy(args.policy, device, dtype)
    methods = search.parse_methods(args.methods)
    if any(kind == "beam" for kind, _ in methods):
        raise data.UserError("--methods: agents use greedy, sample or bestofK (beam search is for reasoning steps)")
    value_model = None
    if args.value:
        value_model = loading.load_value(args.value, policy, tokenizer, args.policy, device, dtype)
    elif any(kind == "bestof" for kind, _ in methods):
        raise data.UserError("--methods bestofK needs a value model: pass --value FOLDER")
    summary, per_task, splits = {}, {}, {}
    for split in args.splits.split(","):   # every split's tasks first: a bad name fails before any episode runs
        make_env = env_factory(args.env, split, args.seed, args.max_steps)
        try:
            splits[split] = make_env, make_env().tasks(split, args.tasks or None)
        except (ValueError, KeyError) as e:
            raise data.UserError(f"--splits {args.splits}: {split!r}: {e}") from None
    for split, (make_env, tasks) in splits.items():
        summary[split], per_task[split] = {}, {}
        for kind, width in methods:
            name, t0 = kind if kind != "bestof" else f"bestof{width}", time.time()
            episodes = run_episodes(policy, tokenizer, make_env, tasks, 1, args.seed, args.batch_size,
                                    k=width if kind == "bestof" else 1, value_model=value_model,
                                    temperature=0.0 if kind == "greedy" else args.temperature,
                                    max_action_tokens=args.max_action_tokens, max_turns=args.max_steps)
            summary[split][name] = {"success": sum(e["reward"] for e in episodes) / len(episodes),
                                    "steps": sum(e["steps"] for e in episodes) / len(episodes),
                                    "episodes": len(episodes), "seconds": time.time() - t0}
            per_task[split][name] = [{**row(e), "type": t["type"]} for e, t in zip(episodes, tasks)]
            s = summary[split][name]
            print(f"agent eval: {split:>7} {name:>8} success {s['success']:.3f}  mean steps {s['steps']:5.1f}  "
                  f"({s['episodes']} episodes, {s['seconds']:.0f} s)", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        data.write_text(args.out, json.dumps({"policy": args.policy, "value": args.value, "env": args.env,
                                              "seed": args.seed, "max_steps": args.max_steps, "tasks": args.tasks,
                                              "summary": summary,
                                              "per_task": per_task}, indent=1))
        print(f"agent eval: results in {args.out}", flush=True)
    return summary


def build_parser():
    parser = data.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("environment")
    g.add_argument("--env", default="household", help="household, or module:factory (see the top of this file)")
    g.add_argument("--seed", type=int, default=0, help="the world (layouts, tasks) and the sampling seed")
    g.add_argument("--max-steps", type=int, default=40, help="actions per episode (paper: 40)")
    g.add_argument("--out", required=True, help="output file")
    p = sub.add_parser("init", parents=[common], help="a tiny model from scratch with the word tokenizer")
    p.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
    p.add_argument("--d-model", type=int, default=96, help="width")
    p.add_argument("--n-head", type=int, default=4, help="attention heads")
    p.add_argument("--max-len", type=int, default=1024, help="the model's positions")
    p = sub.add_parser("demos", parents=[common], help="the demonstrator's transcripts (SFT data)")
    p.add_argument("--tasks", type=int, default=600, help="training tasks")
    p.add_argument("--per-task", type=int, default=1, help="transcripts per task")
    p.add_argument("--p-poor-search", type=float, default=0.5, help="chance of searching in a random order")
    p.add_argument("--p-skip", type=float, default=0.3, help="chance of skipping the clean/heat/cool step")
    p.add_argument("--p-wrong-place", type=float, default=0.2, help="chance of a put in the wrong receptacle")
    sampling = argparse.ArgumentParser(add_help=False)   # rollouts: collect, eval, diagnose --returns
    g = sampling.add_argument_group("sampling")
    data.add_device_flags(g)
    g.add_argument("--temperature", type=float, default=1.0,
                   help="collect, sample, bestofK and diagnose --returns (paper: 1.0)")
    g.add_argument("--max-action-tokens", type=int, default=48, help="an action's length limit in tokens")
    g.add_argument("--batch-size", type=int, default=32, help="episodes stepped together")
    model = argparse.ArgumentParser(add_help=False, parents=[sampling])
    model.add_argument("--policy", required=True, help="policy checkpoint folder (config.json, safetensors, "
                       "tokenizer)")
    p = sub.add_parser("collect", parents=[common, model], help="K episodes per training task -> {messages, reward}")
    p.add_argument("-k", "--k", type=int, default=4, help="episodes per task")
    p.add_argument("--tasks", type=int, default=600, help="training tasks")
    p = sub.add_parser("eval", parents=[common, model], help="success rate and mean steps per split and method")
    p.add_argument("--value", help="value model folder (needed by bestofK)")
    p.add_argument("--methods", default="greedy,bestof3", help="comma-separated: greedy, sample, bestofK")
    p.add_argument("--splits", default="seen,unseen", help="comma-separated splits")
    p.add_argument("--tasks", type=int, default=0, help="tasks per split (0: all)")
    p = sub.add_parser("diagnose", parents=[sampling],
                       help="eval's transcripts: failing actions by verb; V's AUC at turn ends; best-of-K: does V "
                            "rank a turn's valid candidates first, and (--returns) the returns it would have to rank")
    p.add_argument("--eval", required=True, help="an agent.py eval output (JSON)")
    p.add_argument("--value", help="value model folder: also V at each turn's end (mean, AUCs); the within-turn "
                                   "measures read the values best-of-K recorded")
    p.add_argument("--invalid", default=household.NOTHING, help="the answer to an action that cannot apply")
    p.add_argument("--returns", type=int, default=0, help="best-of-K: N continuations by --policy after a valid "
                   "and after an invalid candidate of each of --turns partly valid turns (0: none)")
    p.add_argument("--turns", type=int, default=200, help="partly valid turns drawn for --returns")
    p.add_argument("--policy", help="the policy that continues (--returns)")
    p.add_argument("--out", help="output file (JSON)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return {"init": init, "demos": demos, "collect": collect, "eval": evaluate,
            "diagnose": lambda a: diagnose.agent_eval(a, env_factory, run_episodes)}[args.command](args)


if __name__ == "__main__":
    data.cli("agent.py", main)
