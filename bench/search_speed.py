"""Test-time search speed: tokens/s of sampling, value-guided beam search and best-of-K on the same model and problems.

    python bench/search_speed.py --policy out/demo/sft/policy --value out/demo/oreo/value   # the demo's models
    python bench/search_speed.py                        # a random-init model of the built-in demo's shape
    python bench/search_speed.py --reference            # also the full-recompute search (search.py cached=False)
    python bench/search_speed.py --compile              # torch.compile the policy's decode step

All methods run on the first --problems built-in test problems (data.builtin_problems, seed 0), temperature 1,
--max-new-tokens per answer, --batch-size rows per forward (beam search: batch_size // B² problems at a time).
tokens = tokens sampled by the policy (every candidate of every beam counts); s/token relative to sampling is the
per-token cost of a method divided by sampling's (1.0 = as cheap per token as plain sampling). Each method runs
--repeats times, alternating, and the table shows the median.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import loading  # noqa: E402
import search  # noqa: E402
from model import Config, Transformer, ValueModel  # noqa: E402


def builtin_shape_model(tokenizer, seed):
    """oreo.py's built-in model (train.sh: --n-layer 4 --d-model 96 --n-head 4), randomly initialised."""
    torch.manual_seed(seed)
    config = Config(model_type="llama", vocab_size=tokenizer.vocab_size, n_layer=4, n_head=4, n_kv_head=4,
                    d_model=96, head_dim=24, d_ff=256, max_seq_len=256)
    return Transformer(config).eval()


def load_models(args, device):
    if args.policy:
        policy, tokenizer = loading.load_policy(args.policy, device, torch.float32)
    else:
        tokenizer = data.Tokenizer.byte_level()
        policy = builtin_shape_model(tokenizer, args.seed).to(device)
    if args.value:
        value = loading.load_value(args.value, policy, tokenizer, args.policy, device, torch.float32)
    else:   # the policy's backbone with a random head: a value model of the same shape (its values mean nothing)
        value = ValueModel(policy.config).to(device).eval()
        value.backbone.load_state_dict(policy.state_dict())
        torch.nn.init.normal_(value.head.weight, std=0.1, generator=torch.Generator().manual_seed(args.seed))
    return policy, value, tokenizer


def run_method(name, policy, value, tokenizer, prompts, args, cached):
    generator = torch.Generator(device=policy.lm_head.weight.device).manual_seed(args.seed)
    common = dict(temperature=1.0, generator=generator, batch_size=args.batch_size)
    t0 = time.perf_counter()
    if name == "sample":
        tokens, _ = search.sample_batched(policy, tokenizer, prompts, args.max_new_tokens, **common)
        n = sum(len(t) for t in tokens)
    elif name.startswith("beam"):
        results = search.value_beam_search(policy, tokenizer, value, prompts, int(name[4:]), ("\n",),
                                           args.max_new_tokens, cached=cached, **common)
        n = sum(r["tokens"] for r in results)
    else:
        k = int(name[6:])
        results = search.best_of_k(policy, tokenizer, value if cached else search.as_value_fn(value, args.batch_size),
                                   prompts, k, args.max_new_tokens, **common)
        n = sum(len(s) for r in results for s in r["samples"])
    return n, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", help="policy folder (default: a random-init model of the built-in shape)")
    parser.add_argument("--value", help="value folder (default: the policy's backbone with a random head)")
    parser.add_argument("--problems", type=int, default=200, help="built-in test problems")
    parser.add_argument("--methods", default="sample,beam3,beam5,bestof4", help="comma-separated, as search.py eval")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="response length limit in tokens")
    parser.add_argument("--batch-size", type=int, default=256, help="sequences per forward pass")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method, median reported")
    parser.add_argument("--reference", action="store_true", help="also time the full-recompute beam and best-of-K")
    parser.add_argument("--compile", action="store_true", help="torch.compile the policy's decode step")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="the random-init models' seed")
    args = parser.parse_args()
    device = torch.device(args.device)
    policy, value, tokenizer = load_models(args, device)
    problems = data.builtin_problems(args.problems, 0, "test")
    prompts = [loading.encode_prompt(tokenizer, p["question"], "plain") for p in problems]
    if args.compile:
        t0 = time.perf_counter()
        loading.compile_decode(policy)
        run_method("sample", policy, value, tokenizer, prompts[:8], args, True)   # the compilation happens here
        print(f"torch.compile of decode: first call {time.perf_counter() - t0:.1f} s (compile time)")
    runs = [(m, True) for m in args.methods.split(",")]
    runs += [(m, False) for m in args.methods.split(",") if args.reference and m != "sample"]
    times = {run: [] for run in runs}
    tokens = {}
    for _ in range(args.repeats):
        for run in runs:
            tokens[run], seconds = run_method(*run[:1], policy, value, tokenizer, prompts, args, run[1])
            times[run].append(seconds)
    print(f"{len(prompts)} problems, max {args.max_new_tokens} new tokens, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, device {args.device}{', compiled decode' if args.compile else ''}, "
          f"policy {args.policy or 'random init (built-in shape)'}")
    print(f"{'method':>18} {'tokens':>8} {'seconds':>8} {'tokens/s':>9} {'s/token vs sample':>18}")
    base = statistics.median(times[("sample", True)]) / tokens[("sample", True)] if ("sample", True) in times else None
    for run in runs:
        seconds = statistics.median(times[run])
        rel = f"{seconds / tokens[run] / base:.2f}x" if base else "-"
        name = run[0] + ("" if run[1] else " (recompute)")
        print(f"{name:>18} {tokens[run]:8d} {seconds:8.2f} {tokens[run] / seconds:9.0f} {rel:>18}")


if __name__ == "__main__":
    main()
