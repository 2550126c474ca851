"""
Tokenising a trajectory file: data.Tokenizer (tiktoken, built from tokenizer.json) vs Hugging Face tokenizers
reading the same tokenizer.json. Both encode every prompt (special tokens parsed) and response of the file.

    python bench/tokenizer_vs_hf.py --n 10000

The trajectories are the built-in task's problems in the Qwen chat format, with responses written as English
reasoning lines around the arithmetic steps; the tokenizer is a byte-level BPE trained on the first 2,000 of them.
"""

import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402

PHRASES = ["First, we", "Next, we", "Then we", "Now we", "So we", "Finally, we"]
VERBS = ["compute", "evaluate", "work out", "find", "take"]
SYLLABLES = ["ka", "lo", "mi", "ten", "ra", "su", "vel", "do", "an", "or", "is", "the", "qu", "ex", "ing", "al"]


def make_trajectories(n, seed):
    """Responses: each arithmetic step in an English frame plus a sentence of Zipf-distributed pseudo-words, so the
    trained vocabulary has real words to learn (digits alone give a few hundred tokens)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(5000)]
    weights = [1 / (k + 1) for k in range(len(words))]
    rows = []
    for problem in data.builtin_problems(n, seed, "bench"):
        steps = data.builtin_demonstration(problem, rng).split("\n")
        lines = [f"{rng.choice(PHRASES)} {rng.choice(VERBS)} {s} (mod 10), so the running value is {s[-1]}. "
                 + " ".join(rng.choices(words, weights, k=rng.randint(5, 15))).capitalize() + "."
                 for s in steps[:-1]]
        response = "\n".join(lines) + f"\nThe answer is {steps[-1][5:]}.\n{steps[-1]}"
        rows.append({"prompt": data.format_prompt(f"Start at {problem['question']}. What is the result mod 10?",
                                                  "qwen-gsm8k"),
                     "response": response, "reward": data.grade(response, problem["gold"])})
    return rows


def train_tokenizer(folder, rows, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([r["prompt"] + r["response"] for r in rows], trainer)
    tok.save(os.path.join(folder, "tokenizer.json"))
    return tok


def best_of(repeats, fn):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10000, help="trajectories in the file")
    parser.add_argument("--vocab-size", type=int, default=4000, help="BPE vocabulary of the trained tokenizer")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; the fastest is reported")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from tokenizers import Tokenizer as HFTokenizer

    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "trajectories.jsonl")
    data.write_jsonl(path, make_trajectories(args.n, args.seed))
    rows = data.load_trajectories(path)
    train_tokenizer(folder, rows[:2000], args.vocab_size)
    ours = data.Tokenizer.from_pretrained(folder)
    hf = HFTokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]

    def ours_loop():
        return [ours.encode(p, allow_special=True) + ours.encode(r) for p, r in zip(prompts, responses)]

    def hf_loop():
        return [hf.encode(p, add_special_tokens=False).ids + hf.encode(r, add_special_tokens=False).ids
                for p, r in zip(prompts, responses)]

    def ours_batch():  # tiktoken's thread pool
        a = ours.enc.encode_batch(prompts, allowed_special="all")
        b = ours.enc.encode_batch(responses, allowed_special=set(), disallowed_special=())
        return [x + y for x, y in zip(a, b)]

    def hf_batch():  # Rust threads
        a = hf.encode_batch(prompts, add_special_tokens=False)
        b = hf.encode_batch(responses, add_special_tokens=False)
        return [x.ids + y.ids for x, y in zip(a, b)]

    results = {}
    for name, fn in [("ours, one at a time", ours_loop), ("HF tokenizers, one at a time", hf_loop),
                     ("ours, encode_batch", ours_batch), ("HF tokenizers, encode_batch", hf_batch)]:
        seconds, ids = best_of(args.repeats, fn)
        results[name] = (seconds, ids)
    reference = results["HF tokenizers, one at a time"][1]
    assert all(ids == reference for _, ids in results.values()), "token ids differ between the tokenizers"
    n_tokens = sum(map(len, reference))
    print(f"{args.n} trajectories, {n_tokens} tokens (vocabulary {ours.vocab_size}), best of {args.repeats}; "
          "ids identical in all four")
    for name, (seconds, _) in results.items():
        print(f"{name:30s} {seconds * 1e3:8.1f} ms  {n_tokens / seconds / 1e6:6.2f} M tokens/s")
    seconds = {name: s for name, (s, _) in results.items()}
    print(f"ratio ours / HF: one at a time "
          f"{seconds['HF tokenizers, one at a time'] / seconds['ours, one at a time']:.2f}x, "
          f"batched {seconds['HF tokenizers, encode_batch'] / seconds['ours, encode_batch']:.2f}x")
    seconds, _ = best_of(1, lambda: [data.encode_trajectory(ours, r, 4096, data.STEP_DELIMITERS["math"]) for r in rows])
    print(f"data.encode_trajectory (ids, mask, step starts) over the file: {seconds:.2f} s, "
          f"{n_tokens / seconds / 1e6:.2f} M tokens/s")


if __name__ == "__main__":
    main()
