"""Sampling, offline data collection, value-guided step-level beam search, best-of-K, and evaluation.

    python search.py collect --policy sft/ --problems train.jsonl --out trajectories.jsonl -k 10
    python search.py eval --policy oreo/policy --value oreo/value --problems test.jsonl --methods greedy,beam5

The sampling engine and the KV caches that search keeps across expansions are in engine.py; this file holds the
search itself (with the full-recompute versions the cached ones are tested against), collect and eval; loading.py
loads the checkpoints and problems they read.
"""
import argparse
import datetime
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import data
from engine import (CachedBeams, cached_values, end_state, end_state_values, generate_with_finish,
                    last_token_values, sample_batched)
# re-exported, so that callers (agent.py, diagnose.py, tests, users) find the whole engine as search.X
from engine import generate, generate_naive, sample_next, values_at  # noqa: F401
from loading import compile_decode, encode_prompts, load_policy, load_value, read_problems, response_text
from model import ValueModel


# ----------------------------------------------------------------------------------------------------------
# Value-guided step-level beam search and best-of-K (DESIGN §1, "Test-time search")


def beam_search(prompts, expand, beam_width, max_steps=20):
    """Value-guided step-level beam search, for many prompts at once.

    expand(parents) -> for each parent (prompt index, response tokens, id), beam_width sampled continuations
    [(new_tokens, finish, value)] up to the next step delimiter: finish is "step" at a delimiter, "eos", "stop"
    (a stop string) or "length" when the answer is complete; value is V at the state whose action ends the
    candidate (engine.end_state). id is the parent's index among the candidates the previous call returned (None
    at the first call), so that an expander can keep their caches.
    Each prompt starts with one empty beam; every beam samples beam_width continuations; finished candidates go to
    a pool; the beam_width best unfinished ones (earlier candidate first on ties) are the next beams. The answer is
    the highest-valued finished candidate; only if none finished within max_steps expansions is it the best beam
    still open. Returns per prompt {"response": tokens, "value", "pool": [(value, tokens)], "tokens": tokens
    sampled}.
    """
    beams = [[(0.0, [], None)] for _ in prompts]       # per prompt: (value, response tokens, candidate id)
    pools = [[] for _ in prompts]
    sampled = [0] * len(prompts)
    for _ in range(max_steps):
        parents = [(i, resp, c) for i, bs in enumerate(beams) for _, resp, c in bs]
        if not parents:
            break
        open_ = [[] for _ in prompts]
        c = 0
        for (i, resp, _), conts in zip(parents, expand(parents)):
            for new, finish, v in conts:
                (open_[i].append((v, resp + new, c)) if finish == "step" else pools[i].append((v, resp + new)))
                sampled[i] += len(new)
                c += 1
        # sorted() is stable: among equal values the earlier candidate (earlier beam, earlier sample) wins
        beams = [sorted(cands, key=lambda cand: -cand[0])[:beam_width] for cands in open_]
    results = []
    for pool, bs, n in zip(pools, beams, sampled):
        answers = pool or [(v, resp) for v, resp, _ in bs]  # open beams only when none finished
        best_value, best = max(answers, key=lambda a: a[0])   # max() keeps the first of equal values
        results.append({"response": best, "value": best_value, "pool": answers, "tokens": n})
    return results


def recompute_expander(policy, tokenizer, value_fn, prompts, beam_width, delimiters, stop, max_new_tokens, sampling,
                       generator):
    """The reference expand() for beam_search: every expansion reads each beam's whole prefix again (one
    generate_with_finish over all beams) and value_fn (values at the last tokens) reads each candidate's whole
    sequence. engine.CachedBeams gives the same candidates and values for a fraction of the work."""
    def expand(parents):
        seqs = [prompts[i] + resp for i, resp, _ in parents]
        tokens, finish = generate_with_finish(policy, tokenizer, seqs, [max_new_tokens - len(r) for _, r, _ in parents],
                                              generator=generator, stop=stop, n_samples=beam_width,
                                              delimiters=delimiters, contexts=[r for _, r, _ in parents], **sampling)
        owners = [parents[j // beam_width] for j in range(len(tokens))]
        values = end_state_values(value_fn, tokenizer, [prompts[i] for i, _, _ in owners],
                                  [r + t for (_, r, _), t in zip(owners, tokens)], finish, stop)
        return [list(zip(*(x[j:j + beam_width] for x in (tokens, finish, values))))
                for j in range(0, len(tokens), beam_width)]
    return expand


def as_value_fn(value, batch_size):
    """A value given as a ValueModel or as value_fn(seqs) -> values at the last tokens: the latter."""
    return (lambda seqs: last_token_values(value, seqs, batch_size)) if isinstance(value, ValueModel) else value


def value_beam_search(policy, tokenizer, value_fn, prompts, beam_width, delimiters, max_new_tokens,
                      temperature=1.0, top_p=1.0, top_k=0, generator=None, batch_size=64, max_steps=20, stop=(),
                      cached=True):
    """beam_search with steps sampled from the policy up to a delimiter; a response holds at most max_new_tokens
    and ends at EOS or at one of the stop strings, as a sampled answer does. value_fn: a ValueModel, or any
    value_fn(seqs) -> values at the last tokens (e.g. partial(last_token_values, value_model)); the policy and the
    value may come from different runs (an SFT policy guided by an OREO value isolates what the value adds).
    cached (default): engine.CachedBeams keeps the policy's (and a ValueModel's) KV caches across expansions;
    False: the full-recompute reference. Both give the same results with the same generator. Prompts are searched
    batch_size // beam_width² at a time, so that an expansion's candidates fit in one batch."""
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k)
    per_group = max(1, batch_size // beam_width ** 2)
    results = []
    for i in range(0, len(prompts), per_group):
        group = prompts[i:i + per_group]
        if cached:
            expand = CachedBeams(policy, tokenizer, value_fn, group, beam_width, delimiters, stop, max_new_tokens,
                                 sampling, generator)
        else:
            expand = recompute_expander(policy, tokenizer, as_value_fn(value_fn, batch_size), group, beam_width,
                                        tuple(delimiters), tuple(stop), max_new_tokens, sampling, generator)
        results += beam_search(group, expand, beam_width, max_steps)
    return results


def best_of_k(policy, tokenizer, value_fn, prompts, k, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
              generator=None, stop=(), batch_size=64):
    """K samples per prompt, each scored by the value at the state whose action ends it (engine.end_state: before
    the EOS or the stop string that ended it). value_fn: a ValueModel (each prompt read once into its cache, so a
    sample costs its own tokens) or value_fn(seqs) -> values at the last tokens. Returns per prompt {"samples":
    [tokens] * K, "finish", "values", "best": index of the highest value (first on ties)}. With stop strings that
    end a turn this is per-turn action selection (see select_action)."""
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    tokens, finish = sample_batched(policy, tokenizer, prompts, max_new_tokens, batch_size, n_samples=k,
                                    temperature=temperature, top_p=top_p, top_k=top_k, generator=generator,
                                    stop=stop)
    if isinstance(value_fn, ValueModel):
        states = [end_state(tokenizer, t, f, stop) for t, f in zip(tokens, finish)]
        values = cached_values(value_fn, prompts, k, tokens, states, batch_size)
    else:
        values = end_state_values(value_fn, tokenizer, [prompts[j // k] for j in range(len(tokens))], tokens, finish,
                                  stop)
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
    (action tokens, value) of the highest-valued one, the value read at the state whose action ends the turn.
    value_fn: a ValueModel or value_fn(seqs), as in best_of_k. Stepping the environment is the caller's job."""
    r = best_of_k(policy, tokenizer, value_fn, [prefix], k, max_new_tokens, temperature, top_p,
                  generator=generator, stop=end_of_turn)[0]
    return r["samples"][r["best"]], r["values"][r["best"]]


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
                raise data.UserError(f"{path}:{n}: not valid JSON ({e}); delete the line or the file") from None
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
    device, dtype = data.device_and_dtype(args)
    if world > 1:
        # only barriers, never tensors, go between ranks: gloo, with a timeout long enough for the slowest rank
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
        if device.type == "cuda":
            torch.cuda.set_device(device)
    problems = read_problems(args.problems)
    policy, tokenizer = load_policy(args.policy, device, dtype)
    if args.compile:
        compile_decode(policy)
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
        prompts = encode_prompts(tokenizer, chunks[c], args.prompt_style, policy, args.problems)
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
            raise data.UserError(f"--methods: unknown method {name!r}; use greedy, sample, beamB, randbeamB or "
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
        raise data.UserError(f"--delimiters {spec!r}: use a preset ({', '.join(data.STEP_DELIMITERS)}) or a JSON list "
                         f"of non-empty strings such as '[\"\\\\n\"]'")
    return tuple(delimiters)


def evaluate(args):
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise data.UserError("eval runs in one process: python search.py eval ... (under torchrun only collect "
                             "shares its work between ranks)")
    device, dtype = data.device_and_dtype(args)
    methods = parse_methods(args.methods)
    delimiters = parse_delimiters(args.delimiters)
    problems = read_problems(args.problems)[:args.limit or None]
    policy, tokenizer = load_policy(args.policy, device, dtype)
    if args.compile:
        compile_decode(policy)
    value_model = None
    if args.value:
        value_model = load_value(args.value, policy, tokenizer, args.policy, device, dtype)
    elif any(kind in ("beam", "bestof") for kind, _ in methods):
        raise data.UserError("--methods beam*/bestof* need a value model: pass --value FOLDER")
    prompts = encode_prompts(tokenizer, problems, args.prompt_style, policy, args.problems)
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
            score = value_model if kind == "beam" else lambda seqs: [rng.random() for _ in seqs]
            results = value_beam_search(policy, tokenizer, score, prompts, width, delimiters,
                                        args.max_new_tokens, generator=generator, batch_size=args.batch_size,
                                        max_steps=args.max_steps, stop=tuple(args.stop), **sampling)
            responses = [r["response"] for r in results]
            values = [r["value"] for r in results]
            n_tokens = sum(r["tokens"] for r in results)
        else:
            results = best_of_k(policy, tokenizer, value_model, prompts, width, args.max_new_tokens,
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
    parser = data.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model and data")
    g.add_argument("--policy", required=True, help="policy checkpoint folder (config.json, safetensors, tokenizer)")
    g.add_argument("--problems", required=True, help="JSONL of problems {id, question, gold} (data.load_problems)")
    g.add_argument("--prompt-style", default="plain", choices=data.PROMPT_STYLES,
                   help="data.format_prompt style (the one the policy was trained with)")
    data.add_device_flags(g, dtype_help="the weights of the policy and the value model")
    g = common.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=512, help="response length limit in tokens")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    g.add_argument("--stop", action="append", default=[], help="extra stop string ending a response, e.g. "
                   "'<|im_end|>' when the tokenizer's EOS is another token (repeatable)")
    g.add_argument("--batch-size", type=int, default=64, help="sequences per forward pass")
    g.add_argument("--compile", action="store_true", help="torch.compile the policy's decode step: pays for few rows "
                   "at a time; on a CPU it compiled for 25-130 s and was slower at batch 100+ (docs/reference.md)")
    g.add_argument("--seed", type=int, default=0, help="the sampling seed (collect: each chunk of problems derives "
                   "its own from it, so a resumed run draws the same samples; eval: each method starts from it)")

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
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling for sample, beam and bestof: keep the "
                   "most likely tokens that hold this probability (1.0: off)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N problems (0: all)")
    p.add_argument("--out", help="write per-problem results to this JSON file")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return collect(args) if args.command == "collect" else evaluate(args)


if __name__ == "__main__":
    data.cli("search.py", main)
