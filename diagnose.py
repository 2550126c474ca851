"""
The built-in demo's diagnostics: what the accuracies alone do not show.

    python diagnose.py out/demo        # OUT/diagnostics.json; report.py puts it in the table and draws V's paths

1. Has SFT learnt what it was shown? Its loss on its demonstrations and on fresh ones of the validation problems
   (nats per token, per-sequence mean as in training) next to their entropy floor
   (data.builtin_demonstration_entropy; only below it on the training demonstrations, by memorising their coins),
   and the per-step accuracy of its offline samples (OUT/data/samples_r1.jsonl): a step is right when its result
   follows from the operator it wrote.
2. Are the offline rewards signal or luck? The share of reward-1 samples with a wrong step ("lucky positives";
   data.builtin_check_steps says what a wrong step is: wrong operator or operand, wrong carried value, or wrong
   arithmetic).
3. Does OREO's value assign credit to the step that made the error (the paper's central claim)? K fresh samples
   of the SFT policy per test problem, and OREO's value V at the state before the first line and after every
   line (at its newline; after the last line, at the token before EOS: the state whose action is EOS). On the
   samples with exactly one wrong step: the mean change of V across the wrong step against across the right ones.
   Left out while there is no value model yet (so 1 and 2 can be read as soon as SFT and collect are done).

The agent demo's (`python agent.py diagnose --eval EVAL.json [--value FOLDER] [--returns N --policy FOLDER]`
runs them on agent.py eval's transcripts): the share of actions that fail, per verb; V at each turn's end and its
AUC for success and for a valid action; for best-of-K, whether V ranks a turn's valid candidates above its invalid
ones (each candidate stepped in a copy of the environment replayed to that turn); and with --returns, the returns
after a valid and after an invalid candidate that V would have to rank (the policy continuing from there).

Imports data, loading, model and search; only agent.py imports it.
"""
import argparse
import copy
import json
import math
import random
import statistics
import sys
from pathlib import Path

import torch

import data
import loading
import search
from model import ValueModel


@torch.no_grad()
def sft_fit(policy, tokenizer, demos):
    """(SFT's mean NLL, the entropy floor), both nats per action token averaged per sequence as oreo.py's
    nll_loss does, over the demonstrations."""
    nll, floor = [], []
    for i in range(0, len(demos), 256):
        examples = [data.encode_trajectory(tokenizer, d, 2048) for d in demos[i:i + 256]]
        batch = data.collate(examples, tokenizer.pad_id)
        ids, mask = batch["input_ids"], batch["mask"]
        logp = policy(ids)[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]   # (B, L-1)
        nll += ((-logp * mask).sum(-1) / mask.sum(-1)).tolist()
        floor += [data.builtin_demonstration_entropy(question(d)) / sum(e.mask) for d, e in zip(demos[i:], examples)]
    return statistics.fmean(nll), statistics.fmean(floor)


def question(row):
    return row["prompt"].strip()   # the built-in prompts are plain: the question and a newline


def step_stats(rows):
    """Per-step accuracy of the operation lines, share of samples with every step right, lucky positives."""
    op_lines = follows = all_right = positives = lucky = 0
    for row in rows:
        checks = data.builtin_check_steps(question(row), row["response"])
        n_ops = len(question(row).split()) - 1
        op_lines += len(checks[:n_ops])
        follows += sum(f for f, _ in checks[:n_ops])
        wrong = not all(r for _, r in checks)
        all_right += not wrong
        positives += row["reward"] == 1
        lucky += row["reward"] == 1 and wrong
    return {"samples": len(rows), "step_accuracy": follows / max(op_lines, 1), "all_steps_right": all_right / len(rows),
            "correct": positives / len(rows), "lucky_positives": lucky / max(positives, 1), "positives": positives}


def state_positions(tokenizer, n_prompt, tokens):
    """Positions (in prompt + tokens) of the state before the first line and after each line: a line's newline
    token, and for the last line the token before EOS (the last token when the sample was cut at its length)."""
    positions, offset = [n_prompt - 1], n_prompt
    ended = bool(tokens) and tokens[-1] in tokenizer.stop_ids
    body = tokens[:-1] if ended else tokens
    for piece in tokenizer.token_bytes(body):
        positions += [offset] * piece.count(b"\n")
        offset += 1
    return positions + [n_prompt + len(body) - 1]


def credit(value_paths, checks, rewards, n_paths):
    """Changes of V across the wrong step and across the right steps of the samples with exactly one wrong step;
    the share of them whose wrong step is V's largest drop; the first n_paths of them for the plot."""
    wrong_dv, right_dv, largest, paths = [], [], 0, []
    for values, check, reward in zip(value_paths, checks, rewards):
        wrong = [k for k, (_, right) in enumerate(check) if not right]
        if len(wrong) != 1 or len(values) != len(check) + 1:
            continue
        dv = [b - a for a, b in zip(values, values[1:])]
        wrong_dv.append(dv[wrong[0]])
        right_dv += [d for k, d in enumerate(dv) if k != wrong[0]]
        largest += min(range(len(dv)), key=lambda k: dv[k]) == wrong[0]
        if len(paths) < n_paths:
            paths.append({"values": values, "wrong_step": wrong[0] + 1, "reward": reward})

    def mean_se(xs):
        return [statistics.fmean(xs), statistics.stdev(xs) / math.sqrt(len(xs))] if len(xs) > 1 else [None, None]
    return {"samples": len(wrong_dv), "dv_wrong": mean_se(wrong_dv), "dv_right": mean_se(right_dv),
            "wrong_is_largest_drop": largest / max(len(wrong_dv), 1), "paths": paths}


def diagnose(args):
    out = Path(args.out)
    policy, tokenizer = loading.load_policy(args.policy or out / "sft" / "policy", "cpu", torch.float32)
    value_folder = Path(args.value or out / "oreo" / "value")
    loss, floor = sft_fit(policy, tokenizer, data.load_trajectories(out / "data" / "demos.jsonl"))
    val_demos = data.builtin_demonstrations(data.load_problems(out / "data" / "problems_val.jsonl"), args.seed,
                                            per_problem=4)
    val_loss, val_floor = sft_fit(policy, tokenizer, val_demos)
    result = {"sft_loss": loss, "entropy_floor": floor, "sft_loss_val": val_loss, "entropy_floor_val": val_floor,
              "sft_samples": step_stats(data.load_trajectories(out / "data" / "samples_r1.jsonl"))}
    print(f"diagnose: SFT loss on its demonstrations {loss:.4f} nats/token (their entropy floor {floor:.4f}), on "
          f"fresh ones of the validation problems {val_loss:.4f} (floor {val_floor:.4f})", file=sys.stderr)

    problems = loading.read_problems(args.problems or out / "data" / "problems_test.jsonl")[:args.limit or None]
    prompts = [loading.encode_prompt(tokenizer, p["question"], "plain") for p in problems]
    generator = torch.Generator().manual_seed(args.seed)
    tokens, _ = search.sample_batched(policy, tokenizer, prompts, args.max_new_tokens, args.batch_size,
                                      n_samples=args.k, temperature=1.0, generator=generator)
    rows = [{"prompt": data.format_prompt(problems[i // args.k]["question"], "plain"),
             "response": loading.response_text(tokenizer, t), "gold": problems[i // args.k]["gold"]}
            for i, t in enumerate(tokens)]
    for row in rows:
        row["reward"] = data.grade(row["response"], row["gold"])
    seqs = [prompts[i // args.k] + t for i, t in enumerate(tokens)]
    positions = [state_positions(tokenizer, len(prompts[i // args.k]), t) for i, t in enumerate(tokens)]
    result["test_samples"] = step_stats(rows)
    if value_folder.is_dir():
        value_model = loading.load_value(value_folder, policy, tokenizer, args.policy or out / "sft" / "policy",
                                         "cpu", torch.float32)
        value_paths = search.values_at(value_model, seqs, positions, args.batch_size)
        checks = [data.builtin_check_steps(question(r), r["response"]) for r in rows]
        c = result["credit"] = credit(value_paths, checks, [r["reward"] for r in rows], args.paths)
        c.update(value=str(value_folder), problems=len(problems), k=args.k)
        print(f"diagnose: {c['samples']} test samples with exactly one wrong step: mean ΔV across it "
              f"{c['dv_wrong'][0]}, across the right steps {c['dv_right'][0]}", file=sys.stderr)
    else:   # before OREO has run: the SFT diagnostics alone
        print(f"diagnose: no value model in {value_folder}: credit assignment left out", file=sys.stderr)
    data.write_text(out / "diagnostics.json", json.dumps(result, indent=1))
    print(f"diagnose: wrote {out}/diagnostics.json", file=sys.stderr)
    return result


# ----------------------------------------------------------------------------------------------------------
# The agent demo's: which actions fail, and what the value reads at each turn's end (agent.py diagnose runs them)


def auc(positives, negatives):
    """P(a positive scores above a negative), ties counted half (the Mann-Whitney statistic); None unless both
    are given. Average ranks over the pooled scores: O(n log n)."""
    if not positives or not negatives:
        return None
    pooled = sorted([(x, 1) for x in positives] + [(x, 0) for x in negatives])
    rank_sum, i = 0.0, 0
    while i < len(pooled):
        j = i
        while j < len(pooled) and pooled[j][0] == pooled[i][0]:
            j += 1
        rank_sum += (i + j + 1) / 2 * sum(label for _, label in pooled[i:j])   # ranks i+1..j, averaged
        i = j
    n, m = len(positives), len(negatives)
    return (rank_sum - n * (n + 1) / 2) / (n * m)


def turn_end_values(value_model, tokenizer, transcripts, batch_size=32):
    """V at each assistant turn's last token (the state whose action is the token that ends the turn, where
    best-of-K reads it), per transcript (a messages list), from full forwards of the transcripts as training
    encodes them."""
    seqs, ends = [], []
    for messages in transcripts:
        ex = data.encode_trajectory(tokenizer, {"messages": messages, "reward": 0.0}, max_len=10**9)
        seqs.append(ex.ids)
        ends.append([j for j, (a, b) in enumerate(zip(ex.mask, ex.mask[1:] + [0])) if a and not b])
    return search.values_at(value_model, seqs, ends, batch_size)


def candidate_steps(make_env, task, row):
    """Per turn of a best-of-K row: each candidate's (answer, reward, done), stepped in a copy (copy.deepcopy) of the
    environment replayed to that turn along the transcript, which must replay exactly and whose action each turn
    must be the first of the highest-valued candidates (as rollout chose)."""
    env, out = make_env(), []
    if env.reset(task) != row["messages"][0]["content"]:
        raise data.UserError(f"task {task['id']}: the environment does not replay this transcript (its first "
                             "observation differs)")
    for t, candidates in enumerate(row["candidates"]):
        action, answer = row["messages"][2 * t + 1]["content"], row["messages"][2 * t + 2]["content"]
        if max(candidates, key=lambda c: c[1])[0] != action:
            raise data.UserError(f"task {task['id']}, turn {t}: the action {action!r} is not the first of the "
                                 "highest-valued candidates")
        try:
            out.append([copy.deepcopy(env).step(text) for text, _ in candidates])
        except (TypeError, copy.Error) as e:
            raise data.UserError(f"{type(env).__name__}: diagnosing candidates needs copy.deepcopy of the "
                                 f"environment ({e})") from None
        if env.step(action)[0] != answer:
            raise data.UserError(f"task {task['id']}, turn {t}: the replayed environment answers otherwise")
    return out


def candidate_validity(steps, invalid):
    """Per turn, per candidate: answered otherwise than `invalid` (steps: candidate_steps of a row)."""
    return [[answer != invalid for answer, _, _ in turn] for turn in steps]


def return_gap(rows, steps, invalid, go_on, n, max_turns, seed):
    """What best-of-K's value would have to rank: on up to max_turns of the turns whose candidates are partly valid
    (drawn with seed), the return after the turn's first valid and after its first invalid candidate, each the
    candidate's own reward plus the mean of n continuations (go_on(prefixes, n) -> n episodes per (task id,
    transcript) prefix, the policy sampling; none when the candidate ends the episode). Returns both means, their
    paired difference per turn (mean, and its standard error clustered by episode: a row's turns are not
    independent), V's difference between the same two candidates on the same turns, and the correlation of the
    two differences over the turns."""
    turns = [(i, t) for i, r in enumerate(steps) for t, turn in enumerate(r)
             if len({answer != invalid for answer, _, _ in turn}) == 2]
    turns = sorted(random.Random(seed).sample(turns, min(max_turns, len(turns))))
    own, prefixes, value_gaps = [], [], []   # own: per (turn, candidate), its reward and its prefix's index if any
    for i, t in turns:
        pair = [next(j for j, (answer, _, _) in enumerate(steps[i][t]) if (answer != invalid) == valid)
                for valid in (True, False)]
        value_gaps.append(rows[i]["candidates"][t][pair[0]][1] - rows[i]["candidates"][t][pair[1]][1])
        for j in pair:
            answer, reward, done = steps[i][t][j]
            own.append((float(reward), None if done else len(prefixes)))
            if not done:
                action = {"role": "assistant", "content": rows[i]["candidates"][t][j][0]}
                prefix = rows[i]["messages"][:2 * t + 1] + [action, {"role": "user", "content": answer}]
                prefixes.append((rows[i]["id"], prefix))
    episodes = go_on(prefixes, n) if prefixes else []
    returns = [r + (0.0 if p is None else statistics.fmean(e["reward"] for e in episodes[p * n:(p + 1) * n]))
               for r, p in own]
    gaps = [v - w for v, w in zip(returns[0::2], returns[1::2])]
    out = {"turns": len(turns), "episodes": len({i for i, _ in turns}), "continuations": n,
           "after_valid": mean_or_none(returns[0::2]), "after_invalid": mean_or_none(returns[1::2]),
           "gap": mean_or_none(gaps), "gap_se": None, "value_gap": mean_or_none(value_gaps), "correlation": None}
    if len(gaps) > 1:
        by_row = {}
        for (i, _), g in zip(turns, gaps):
            by_row[i] = by_row.get(i, 0.0) + g - out["gap"]
        out["gap_se"] = math.sqrt(sum(x * x for x in by_row.values())) / len(gaps)
        try:
            out["correlation"] = statistics.correlation(value_gaps, gaps)
        except statistics.StatisticsError:   # one of them constant
            pass
    return out


def mean_or_none(xs):
    return sum(xs) / len(xs) if xs else None


def agent_stats(rows, invalid, values=None, validity=None):
    """Per-method statistics of evaluated episodes: the share of actions answered `invalid`, per first word of the
    action; with values (V at each turn's end, per row): mean V, and V's AUC for the episode's success and for the
    action being answered otherwise than `invalid`. With validity (candidate_validity per best-of-K row), on the
    turns whose candidates are partly valid: V's AUC for a valid candidate within the turn (the values best-of-K
    recorded; pairs pooled over the turns), and how often the chosen candidate is valid against the share of valid
    candidates (a pick at random), and V's gap between the turn's first valid and first invalid candidate (mean,
    and its spread over the turns); None without such turns."""
    verbs, at_success, at_failure, at_valid, at_invalid = {}, [], [], [], []
    pairs, chosen, share, gaps = [], [], [], []
    for r, turns in zip(rows, validity or []):
        for candidates, valid in zip(r["candidates"], turns):
            if any(valid) and not all(valid):
                v = [value for _, value in candidates]
                pairs += [(a > b) + (a == b) / 2 for a, ok in zip(v, valid) if ok
                          for b, bad in zip(v, valid) if not bad]
                chosen.append(valid[max(range(len(v)), key=lambda j: v[j])])
                share.append(sum(valid) / len(valid))
                gaps.append(v[valid.index(True)] - v[valid.index(False)])
    for n, r in enumerate(rows):
        turns = [(m["content"], r["messages"][i + 1]["content"] if i + 1 < len(r["messages"]) else None)
                 for i, m in enumerate(r["messages"]) if m["role"] == "assistant"]
        for t, (action, answer) in enumerate(turns):
            verb = verbs.setdefault((action.split() or [""])[0], [0, 0])
            verb[0] += 1
            verb[1] += answer == invalid
            if values is not None:
                (at_success if r["reward"] > 0 else at_failure).append(values[n][t])
                if answer is not None:
                    (at_invalid if answer == invalid else at_valid).append(values[n][t])
    actions = sum(c for c, _ in verbs.values())
    out = {"episodes": len(rows), "success": sum(r["reward"] for r in rows) / max(len(rows), 1),
           "actions": actions, "invalid": sum(b for _, b in verbs.values()) / max(actions, 1),
           "by_verb": {v: {"share": c / actions, "invalid": b / c}
                       for v, (c, b) in sorted(verbs.items(), key=lambda kv: -kv[1][0])}}
    if values is not None:
        every = at_success + at_failure
        out.update(mean_value=sum(every) / max(len(every), 1), auc_success=auc(at_success, at_failure),
                   auc_valid=auc(at_valid, at_invalid))
    if validity is not None:
        out.update(mixed_turns=len(chosen), auc_valid_within_turn=mean_or_none(pairs),
                   chosen_valid=mean_or_none(chosen), random_valid=mean_or_none(share), value_gap=mean_or_none(gaps),
                   value_gap_sd=statistics.stdev(gaps) if len(gaps) > 1 else None)
    return out


def agent_eval(args, env_factory, run_episodes):
    """agent.py eval's transcripts: per split and method, how often and with which verbs actions fail, (with
    --value) how well V at each turn's end tells successful episodes and valid actions apart, and for best-of-K
    how well it tells a turn's valid candidates from its invalid ones (each candidate stepped in a replayed copy of
    the eval's environment; with --returns, the returns after a valid and after an invalid candidate). agent.py
    diagnose runs it, passing its env_factory and run_episodes."""
    try:
        report = json.loads(Path(args.eval).read_text())
        per_task = report["per_task"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise data.UserError(f"--eval {args.eval}: not an agent.py eval output ({e})") from None
    value_model = tokenizer = None
    if args.value:
        loading.need_folder(args.value, "--value")
        with data.as_user_error():
            value_model = ValueModel.from_pretrained(args.value).eval()
            tokenizer = data.Tokenizer.from_pretrained(args.value)
    if args.returns < 0:
        raise data.UserError(f"--returns {args.returns}: give a number of continuations, 1 or more (0: none)")
    if args.returns:   # the policy's continuations
        if not args.policy:
            raise data.UserError("--returns: give --policy FOLDER, the policy that continues the episodes")
        loading.need_folder(args.policy, "--policy")
        policy, policy_tokenizer = loading.load_policy(args.policy, *data.device_and_dtype(args))
    result = {"eval": args.eval, "value": args.value, "invalid_answer": args.invalid, "splits": {}}
    for split, methods in per_task.items():
        for method, rows in methods.items():
            values = None
            if value_model:
                values = turn_end_values(value_model, tokenizer, [r["messages"] for r in rows])
            validity = None
            if rows and "candidates" in rows[0] and "env" in report:
                make_env = env_factory(report["env"], split, report["seed"], report["max_steps"])
                tasks = {t["id"]: t for t in make_env().tasks(split, report.get("tasks") or None)}
                if any(r["id"] not in tasks for r in rows):
                    raise data.UserError(f"--eval {args.eval}: {split} has tasks that --env {report['env']} "
                                         f"(seed {report['seed']}) does not list")
                steps = [candidate_steps(make_env, tasks[r["id"]], r) for r in rows]
                validity = [candidate_validity(s, args.invalid) for s in steps]
            d = agent_stats(rows, args.invalid, values, validity)
            result["splits"].setdefault(split, {})[method] = d
            if args.returns and validity is None:
                print(f"agent diagnose: {split} {method}: no best-of-K candidates (or an eval without its env): "
                      "--returns skipped", flush=True)
            elif args.returns:
                def go_on(prefixes, n):   # the policy's continuations
                    print(f"agent diagnose: {split} {method}: {n} continuations of {len(prefixes)} prefixes",
                          flush=True)
                    return run_episodes(policy, policy_tokenizer, make_env, [tasks[i] for i, _ in prefixes],
                                        samples=n, seed=report["seed"], batch_size=args.batch_size,
                                        prefixes=[p for _, p in prefixes], temperature=args.temperature,
                                        max_action_tokens=args.max_action_tokens, max_turns=report["max_steps"])
                d["return_gap"] = return_gap(rows, steps, args.invalid, go_on, args.returns, args.turns,
                                             report["seed"])
            top = ", ".join(f"{v} {s['share']:.2f} ({s['invalid']:.2f})" for v, s in list(d["by_verb"].items())[:6])
            line = (f"agent diagnose: {split:>7} {method:>8} success {d['success']:.3f} | {d['actions']} actions, "
                    f"{d['invalid']:.3f} answered {args.invalid!r}; by verb, share (invalid): {top}")
            if value_model:
                line += (f" | mean V {d['mean_value']:.3f}, AUC for success {d['auc_success']:.3f}, for a valid "
                         f"action {d['auc_valid']:.3f}")
            if validity is not None and d["mixed_turns"]:
                line += (f" | {d['mixed_turns']} turns with valid and invalid candidates: V's AUC for a valid one "
                         f"{d['auc_valid_within_turn']:.3f}, chosen valid {d['chosen_valid']:.3f} (at random "
                         f"{d['random_valid']:.3f}), V's gap valid - invalid {d['value_gap']:+.3f} (sd "
                         f"{d['value_gap_sd'] or 0:.3f})")
            if "return_gap" in d and d["return_gap"]["turns"] > 1:
                g = d["return_gap"]
                line += (f" | return after a valid / an invalid candidate ({g['turns']} of those turns, "
                         f"{args.returns} continuations each): {g['after_valid']:.3f} / {g['after_invalid']:.3f}, "
                         f"gap {g['gap']:+.3f} ± {g['gap_se']:.3f} (V's there {g['value_gap']:+.3f}, "
                         f"correlation {g['correlation'] if g['correlation'] is None else round(g['correlation'], 3)})")
            print(line, flush=True)
    if args.out:
        data.write_text(args.out, json.dumps(result, indent=1))
        print(f"agent diagnose: results in {args.out}", flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    parser.add_argument("out", help="a train.sh output folder (data/, sft/, oreo/)")
    parser.add_argument("--policy", help="the sampling policy (default OUT/sft/policy)")
    parser.add_argument("--value", help="the value model (default OUT/oreo/value; none there: no credit assignment)")
    parser.add_argument("--problems", help="problems to sample on (default OUT/data/problems_test.jsonl)")
    parser.add_argument("--limit", type=int, default=500, help="only the first N problems (0: all)")
    parser.add_argument("-k", "--k", type=int, default=4, help="samples per problem")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="response length limit in tokens")
    parser.add_argument("--batch-size", type=int, default=256, help="sequences per forward pass")
    parser.add_argument("--paths", type=int, default=6, help="value paths kept for the plot")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling and the validation demonstrations")
    diagnose(parser.parse_args(argv))


if __name__ == "__main__":
    main()
