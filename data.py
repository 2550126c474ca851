"""
Everything the loss sees comes from this file: prompt formats, problem and trajectory files, the action mask and
step starts of DESIGN.md §1, batching and sharding, and the built-in synthetic task. The tokenizer lives in
tokenizer.py, answer extraction and grading in grading.py, the command lines' user errors and shared flags in cli.py
(all re-exported here, since every command line imports this file).

    python data.py builtin OUT_DIR --seed 0      # writes the built-in task's problems and demonstrations
"""

import itertools
import json
import math
import os
import random
import re
import sys
from dataclasses import dataclass

import torch

from cli import (ArgumentParser, HelpFormatter, UserError, add_device_flags, as_user_error, cli,  # noqa: F401
                 device_and_dtype)  # (re-exported: data.UserError, data.cli etc.)
from files import write_atomic
from grading import extract_answer, grade, is_equiv, last_boxed  # noqa: F401  (re-exported: data.grade etc.)
from tokenizer import GPT2_PATTERN, Tokenizer  # noqa: F401  (re-exported: data.Tokenizer)

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
    with as_user_error(), open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append((n, row))
    if not rows:
        raise UserError(f"{path}: empty file (no JSON lines)")
    return rows


def _field(row, key, path, n, kind=str):
    if key not in row:
        raise UserError(f"{path}:{n}: missing field {key!r} (has {sorted(row)})")
    if not isinstance(row[key], kind):
        kinds = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise UserError(f"{path}:{n}: field {key!r} should be {kinds}, got {type(row[key]).__name__}")
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
                raise UserError(f"{path}:{n}: the solution has no \\boxed{{...}} answer")
        elif "question" in row:
            question, answer = _field(row, "question", path, n), _field(row, "answer", path, n)
            if "####" not in answer:
                raise UserError(f"{path}:{n}: a GSM8K answer should end with '#### <number>'")
            gold = answer.split("####")[-1].strip().replace(",", "")
        elif "prompt" in row:
            question, gold = _field(row, "prompt", path, n), _field(row, "answer", path, n, (str, int, float))
        else:
            raise UserError(f"{path}:{n}: a problem needs 'question'+'answer' (GSM8K), 'problem'+'solution' "
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
                    raise UserError(f"{path}:{n}: messages[{k}] needs a role in {ROLES} and a string content")
            if not any(m["role"] == "assistant" for m in messages):
                raise UserError(f"{path}:{n}: no assistant message, so nothing to learn")
        else:
            _field(row, "prompt", path, n), _field(row, "response", path, n)
        reward = _field(row, "reward", path, n, (int, float))
        if isinstance(reward, bool) or not math.isfinite(reward):
            raise UserError(f"{path}:{n}: reward should be a finite number, got {reward!r}")
        trajectories.append({**row, "reward": float(reward)})
    return trajectories


def write_text(path, text):
    """Write a file atomically (files.write_atomic): a partial file never replaces a good one."""
    write_atomic(path, lambda f: f.write(text))


def write_jsonl(path, rows):
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


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


STEP_START_RULES = ("ours", "official")


def _step_starts(tokenizer, ids, delimiters, rule="ours"):
    """A step is a maximal run of action tokens ended by a delimiter; the first token starts a step.
    "ours": so does every token that follows one in which a delimiter ends. A delimiter inside a token counts
    ('.\\n' as one token ends its step). This is where search.py stops a step while sampling, so training and search
    agree; with '. ' the space usually begins the next word's token (' Then'), and that token still ends its step.
    "official" (the official code's --step_level): the token holding the first character after a delimiter starts
    the next step, so ' Then' after '. ' begins it. The two differ only where a delimiter ends inside a token."""
    if rule not in STEP_START_RULES:
        raise ValueError(f"step start rule {rule!r}: use one of {STEP_START_RULES}")
    pieces = tokenizer.token_bytes(ids)
    text = b"".join(pieces)
    shift = 0 if rule == "ours" else 1
    marked = bytearray(len(text) + 1)  # ours: the last byte of every delimiter; official: the byte after it
    for d in delimiters:
        d = d.encode()
        k = text.find(d)
        while k >= 0:
            marked[k + len(d) - 1 + shift] = 1
            k = text.find(d, k + len(d))
    ends = list(itertools.accumulate(len(p) for p in pieces))
    holds = [any(marked[e - len(p):e]) for p, e in zip(pieces, ends)]  # token k holds a marked byte
    # ours: token k starts a step iff token k-1 holds a delimiter's end; official: iff token k holds the byte after
    starts = [True] + (holds[:-1] if rule == "ours" else holds[1:])
    return starts[:len(ids)]


def encode_trajectory(tokenizer, traj, max_len, delimiters=("\n",), step_start="ours"):
    """Tokens, action mask and step starts (rule `step_start`, see _step_starts) of one trajectory. Prompt/response
    form: the response and the token that ends it are actions. Agent form: only assistant turns and the token that
    ends each (<|im_end|> in ChatML, else EOS) are actions; system, user and environment turns never are. An end
    token joins its turn's last step (or starts its own when the turn ends with a delimiter)."""
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
        # The token that ends the response is an action too: <|im_end|> after a ChatML prompt, else EOS. A sample
        # cut at the length limit (finish "length", as search.py collect writes it) never chose to stop: none.
        if traj.get("finish") == "length":
            end = []
        elif tokenizer.chatml and "<|im_start|>" in traj["prompt"]:
            end = [tokenizer.special_tokens["<|im_end|>"]]
        else:
            end = [tokenizer.eos_id]
        segments.append((tokenizer.encode(traj["prompt"], allow_special=True), False))
        segments.append((tokenizer.encode(traj["response"]) + end, True))
    ids, action, start = [], [], []
    for seg_ids, act in segments:
        ids += seg_ids
        action += [act] * len(seg_ids)
        start += _step_starts(tokenizer, seg_ids, delimiters, step_start) if act else [False] * len(seg_ids)
    truncated = len(ids) > max_len
    ids, action, start = ids[:max_len], action[:max_len], start[:max_len]
    if not any(action[1:]):
        raise UserError(f"trajectory {traj.get('id', '')!r}: no action token within max_len={max_len} "
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
    contiguous 1/world_size share. The state is the global step, so a run resumes exactly, on any world size.

    With lengths (one per example), batches group examples of similar length, so less of each is padding: each
    epoch's shuffle is cut, where the stream's batches start, into chunks of GROUP batches; each chunk is sorted
    by length and cut into its batches, and the epoch's whole batches are shuffled (the group_by_length of other
    trainers)."""
    GROUP = 64

    def __init__(self, n_examples, global_batch, seed, rank=0, world_size=1, lengths=None):
        if n_examples < 1:
            raise ValueError("Sampler: no examples to sample from")
        if not 0 <= rank < world_size:
            raise ValueError(f"Sampler: rank {rank} is outside world size {world_size}")
        if global_batch % world_size:
            raise ValueError(f"Sampler: global batch {global_batch} is not divisible by world size {world_size}")
        if lengths is not None and len(lengths) != n_examples:
            raise ValueError(f"Sampler: {len(lengths)} lengths for {n_examples} examples")
        self.n, self.global_batch, self.seed, self.lengths = n_examples, global_batch, seed, lengths
        self.rank, self.world_size = rank, world_size
        self.step, self._perm = 0, (None, None)

    def _order(self, epoch):
        if self._perm[0] != epoch:
            order, rng = list(range(self.n)), random.Random(f"{self.seed}:{epoch}")
            rng.shuffle(order)
            if self.lengths is not None:
                order = self._grouped(order, epoch, rng)
            self._perm = (epoch, order)
        return self._perm[1]

    def _grouped(self, order, epoch, rng):
        G = self.global_batch
        head = (-epoch * self.n) % G            # this epoch's first examples finish a batch begun in the last one
        n_whole = (self.n - head) // G * G      # the batches that lie inside this epoch; the rest starts the next
        body, tail = order[head:head + n_whole], order[head + n_whole:]
        batches = []
        for c in range(0, n_whole, self.GROUP * G):
            chunk = sorted(body[c:c + self.GROUP * G], key=lambda i: self.lengths[i])
            batches += [chunk[b:b + G] for b in range(0, len(chunk), G)]
        rng.shuffle(batches)
        return order[:head] + [i for batch in batches for i in batch] + tail

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
        return {"step": self.step, "n_examples": self.n, "global_batch": self.global_batch, "seed": self.seed,
                "grouped": self.lengths is not None}

    def load_state_dict(self, state):
        ours = self.state_dict()
        for key in ("n_examples", "global_batch", "seed", "grouped"):
            if state.get(key, False) != ours[key]:   # (checkpoints before --group-by-length lack "grouped")
                raise UserError(f"Sampler: resuming with {key}={ours[key]}, but the checkpoint has {state.get(key)}")
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

BUILTIN_TRAIN_PROBLEMS = 400  # the default of oreo.py --builtin-problems and of data.py builtin --n-train
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


def builtin_demonstration_entropy(question, p_misread=0.7):
    """The demonstrator's entropy over its solutions of one question, in nats: every '*' step is a coin
    (misread or not) and everything else follows from the coins, so H = n('*') · H_binary(p_misread). Divided by
    the tokens it is spread over, this is the floor that SFT's loss (nats per token) can reach on the demos."""
    _, ops = _parse_builtin(question)
    coin = -sum(p * math.log(p) for p in (p_misread, 1 - p_misread) if p > 0)
    return sum(op == "*" for op, _ in ops) * coin


_BUILTIN_LINE = re.compile(r"(\d)([+\-*])(\d)=(\d)")


def builtin_check_steps(question, response):
    """(follows, right) per line of a built-in task response. An operation line 'a op b=c' follows when c is
    a op b (its result follows from the operator it wrote); it is right when it also is the step the question
    asks at that point: a is the previous line's result (the start digit first), op and b the question's. The
    answer line '#### n' (after all operations) follows and is right when n is the previous line's result. An
    unreadable line, an operation line too many or an early answer neither follows nor is right."""
    value, ops = _parse_builtin(question)
    checks = []
    for k, line in enumerate(response.split("\n")):
        m = _BUILTIN_LINE.fullmatch(line)
        if m and k < len(ops):
            a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            follows = c == OPS[op](a, b)
            checks.append((follows, follows and a == value and (op, b) == ops[k]))
            value = c
        else:
            ok = k == len(ops) and line == f"#### {value}"
            checks.append((ok, ok))
    return checks


def builtin_demonstrations(problems, seed, per_problem=1, p_misread=0.7):
    """Graded imperfect demonstrations as trajectory rows: offline data with a 0/1 reward and no model."""
    rng, demos = random.Random(f"demos:{seed}"), []
    for problem in problems:
        for _ in range(per_problem):
            response = builtin_demonstration(problem, rng, p_misread)
            demos.append({"id": problem["id"], "prompt": format_prompt(problem["question"], "plain"),
                          "response": response, "reward": grade(response, problem["gold"]), "gold": problem["gold"]})
    return demos


def main(argv=None):
    parser = ArgumentParser(description="Data utilities.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("builtin", help="write the built-in task: problems_{train,val,test}.jsonl and demos.jsonl")
    p.add_argument("out_dir", help="the folder to write the files into")
    p.add_argument("--seed", type=int, default=0, help="seeds the problems of every split and the demonstrations")
    p.add_argument("--n-train", type=int, default=BUILTIN_TRAIN_PROBLEMS, help="training problems")
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
    demos = builtin_demonstrations(problems["train"], args.seed, args.demos_per_problem, args.p_misread)
    write_jsonl(os.path.join(args.out_dir, "demos.jsonl"), demos)
    correct = sum(d["reward"] for d in demos) / len(demos)
    print(f"data.py: wrote {sum(splits.values())} problems and {len(demos)} demonstrations "
          f"({correct:.1%} correct) to {args.out_dir}", file=sys.stderr)


if __name__ == "__main__":
    cli("data.py", main)
