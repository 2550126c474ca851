"""Multi-turn agents (DESIGN.md §6): batched rollouts in an environment, demonstrations, collection of K episodes per
training task, and evaluation with greedy or value-guided best-of-K action selection.

    python agent.py demos --out demos.jsonl --n 240                    # the demonstrator's transcripts (SFT data)
    python agent.py collect --policy sft/policy --out episodes.jsonl -k 4
    python agent.py eval --policy oreo/policy --value oreo/value --methods greedy,bestof3 --out eval.json

A transcript is a `{messages, reward}` row that oreo.py trains on: the first user turn holds the first observation
and the task, each assistant turn is one action, each later user turn the environment's answer (masked). The
environment is household.py's by default; `--env module:factory` plugs in any other: factory(split, seed, max_steps)
returns an object with `tasks(split, n)` (JSON task specs, each with a unique "id"), `reset(task) -> str` and
`step(action) -> (observation, reward, done)`.

The engine: every live episode (times K candidates) is one row of a KV cache. Rows move in lockstep, one token per
row per model call: a row with nothing to feed writes a throw-away token and is rolled back. Each turn the rows sample
an action up to EOS (<|im_end|> for ChatML) or a newline; with K > 1 the value model, fed the same tokens, scores
each candidate at its last token (the state whose action ends the turn) and the best one is kept. Each row samples
from its own generator, seeded by (seed, task id, sample), so batching never changes what an episode draws.
"""
import argparse
import importlib
import json
import os
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

import data
import household
import search
from model import Cache

# ----------------------------------------------------------------------------------------------------------
# Transcripts: token ids exactly as data.encode_trajectory renders them for training


def render(tokenizer, messages):
    """Token ids of messages followed by an open assistant turn (its header): where the next action starts."""
    ids = data.encode_trajectory(tokenizer, {"messages": messages + [{"role": "assistant", "content": ""}],
                                            "reward": 0.0}, max_len=10**9).ids
    return ids[:-1 - len(tokenizer.encode("\n"))]   # drop the empty turn's end token and the newline after it


def _run(model, ids, positions, cache, lengths):
    """Final hidden states of the tokens ids (B, T) at positions (B, T), written into cache, which then holds
    lengths (B,) tokens per row. model.prefill/decode without the lm_head, so a value head can read them too."""
    S = cache.k.shape[3]
    mask = (torch.arange(S, device=ids.device) <= positions[:, -1:])[:, None, None, :]   # (B, 1, 1, S)
    if ids.shape[1] > 1:   # prefill from position 0: causal attention over the written prefix
        h = model._run(ids, positions, None, cache)
    else:
        h = model._run(ids, positions, mask, cache, decode_pos=positions[:, 0])
    cache.lengths.copy_(lengths)
    return h                                                                               # (B, T, D)


class Rows:
    """A model's KV cache over the rows, fed in lockstep; keeps each row's last hidden state."""

    def __init__(self, model, prompts):
        self.model = model
        B, T = len(prompts), max(len(p) for p in prompts)
        self.capacity = model.config.max_seq_len
        self.cache = model.new_cache(B, min(self.capacity, max(256, 2 * T)))
        device = self.cache.k.device
        ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts], device=device)    # (B, T) right padded
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        h = _run(model, ids, torch.arange(T, device=device).expand(B, T), self.cache, lengths)
        self.last = h[torch.arange(B, device=device), lengths - 1]                         # (B, D)

    def feed(self, tokens):
        """tokens: one id or None per row; rows given None are left as they were."""
        lengths = self.cache.lengths
        if int(lengths.max()) + 1 > self.cache.k.shape[3]:   # grow the cache (doubling, up to max_seq_len)
            old, S = self.cache, min(self.capacity, 2 * self.cache.k.shape[3])
            self.cache = Cache(old.k.new_zeros(*old.k.shape[:3], S, old.k.shape[4]),
                               old.v.new_zeros(*old.v.shape[:3], S, old.v.shape[4]), old.lengths)
            self.cache.k[:, :, :, :old.k.shape[3]], self.cache.v[:, :, :, :old.v.shape[3]] = old.k, old.v
        fed = torch.tensor([t is not None for t in tokens], device=lengths.device)
        ids = torch.tensor([0 if t is None else t for t in tokens], device=lengths.device)
        h = _run(self.model, ids[:, None], lengths[:, None].clone(), self.cache, lengths + fed)[:, 0]
        self.last = torch.where(fed[:, None], h, self.last)   # an idle row's throw-away token is overwritten later

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
            max_turns=40):
    """Run one episode per (env, task) together; seeds[i] seeds episode i's generators. With k > 1 each turn
    samples k candidate actions and keeps the one the value model rates highest (the first on ties); k = 1 at
    temperature 0 is greedy. Returns per episode {"messages", "reward" (the sum of the step rewards), "steps",
    "values" (the chosen candidate's per turn, k > 1), "action_tokens" (the sampled ids of each chosen action;
    its text may encode back to other ids), "end"}; end is "done" (the environment ended it), "turns"
    (max_turns) or "context" (the next turn would not fit the model's max_seq_len)."""
    E, limit = len(tasks), policy.config.max_seq_len
    messages = [[{"role": "user", "content": env.reset(task)}] for env, task in zip(envs, tasks)]
    ids = [render(tokenizer, m) for m in messages]          # each episode's transcript, up to its open turn
    for task, prompt in zip(tasks, ids):
        if len(prompt) + max_action_tokens > limit:
            raise ValueError(f"task {task['id']}: the first observation has {len(prompt)} tokens; with "
                             f"{max_action_tokens} for an action that exceeds the model's {limit} positions")
    gens = [g for task, s in zip(tasks, seeds) for g in generators(s, task["id"], k)]
    models = [policy] + ([value_model.backbone] if k > 1 else [])
    rows = [Rows(m, [ids[r // k] for r in range(E * k)]) for m in models]   # row r: candidate r % k of r // k
    episodes = [{"messages": m, "reward": 0.0, "steps": 0, "values": [], "action_tokens": [], "end": None}
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
            step = [None] * (E * k)
            for r in sorted(open_rows):
                token = search.sample_next(logits[r:r + 1], temperature, generator=gens[r]).item()
                if token in tokenizer.stop_ids or b"\n" in tokenizer.token_bytes([token])[0]:
                    open_rows.discard(r)
                    continue
                actions[r].append(token)
                step[r] = token
                if len(actions[r]) >= max_action_tokens:
                    open_rows.discard(r)
            if any(t is not None for t in step):
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
        # 3. feed the answers (and the next assistant header) to every row of the episodes that go on
        for i in range(max((len(p) for p in pending if p), default=0)):
            step = [pending[r // k][i] if pending[r // k] and i < len(pending[r // k]) else None
                    for r in range(E * k)]
            for model_rows in rows:
                model_rows.feed(step)
    for ep in episodes:
        ep["end"] = ep["end"] or "turns"
    return episodes


def run_episodes(policy, tokenizer, make_env, tasks, samples=1, seed=0, batch_size=32, **kw):
    """rollout over chunks of batch_size episodes: samples episodes per task (sample s seeded by f"{seed}:{s}"),
    task-major. Returns the episodes with "id" (the task's) and "sample" added."""
    jobs = [(task, s) for task in tasks for s in range(samples)]
    out = []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        episodes = rollout(policy, tokenizer, [make_env() for _ in chunk], [t for t, _ in chunk],
                           [f"{seed}:{s}" for _, s in chunk], **kw)
        out += [{"id": t["id"], "sample": s, **ep} for (t, s), ep in zip(chunk, episodes)]
    return out
