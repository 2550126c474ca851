"""Generation throughput: search.generate (our KV cache) vs Hugging Face transformers `generate`, same weights.

    python bench/generate_vs_hf.py                                     # CPU: tiny random Qwen2, batch 1 and 16
    python bench/generate_vs_hf.py --device cuda --preset qwen2.5-1.5b  # GPU: bf16, ours with/without torch.compile

Each call generates exactly --new tokens per row after a random prompt of --prompt tokens (no EOS, no stop
strings), greedy and sampled (temperature 1, top-p 0.95). Calls alternate between the contenders so both see the
same machine load; the table gives the median over --iters calls of generated tokens/s (batch x new / seconds,
prefill included) and ours/HF as a ratio of throughputs (> 1 means ours is faster). Greedy rows of both should
be the same tokens on fp32 ("same greedy tokens" counts the rows that are).
"""
import argparse
import os
import sys

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import search  # noqa: E402
from common import time_side_by_side  # noqa: E402
from model_vs_hf import PRESETS, build_models  # noqa: E402  (the same models, side by side)

transformers.utils.logging.set_verbosity_error()

def hf_generate(hf, input_ids, new_tokens, sample):
    kwargs = dict(do_sample=True, temperature=1.0, top_p=0.95, top_k=0) if sample else dict(do_sample=False)
    with torch.no_grad():
        out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None, **kwargs)
    return out[:, input_ids.shape[1]:].tolist()


def ours_generate(ours, prompts, new_tokens, sample, generator):
    kwargs = dict(temperature=1.0, top_p=0.95) if sample else dict(temperature=0.0)
    return search.generate(ours, None, prompts, new_tokens, generator=generator, **kwargs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="model dimensions (default: tiny on CPU, qwen2.5-1.5b on CUDA)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,16 CPU; 1,16,64 CUDA)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens per row (default 16 CPU, 128 CUDA)")
    p.add_argument("--new", type=int, default=None, help="generated tokens per row (default 64 CPU, 256 CUDA)")
    p.add_argument("--iters", type=int, default=5, help="timed calls per contender")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: a tiny model gains nothing "
                   "from more, and on a shared machine extra threads only wait for each other)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time ours with torch.compile(model.decode) (default: on for CUDA)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers (e.g. to save GPU time)")
    args = p.parse_args()
    cuda = args.device == "cuda"
    preset = args.preset or ("qwen2.5-1.5b" if cuda else "tiny")
    batches = [int(b) for b in (args.batches or ("1,16,64" if cuda else "1,16")).split(",")]
    prompt_len, new = args.prompt or (128 if cuda else 16), args.new or (256 if cuda else 64)
    dtype = torch.bfloat16 if cuda else torch.float32
    use_compile = cuda if args.compile is None else args.compile
    torch.set_num_threads(args.threads)

    hf, ours = build_models(preset, dtype, args.device)
    hf, ours = hf.eval(), ours.eval()
    decode_eager = ours.decode
    compiled = torch.compile(decode_eager, dynamic=False) if use_compile else None
    print(f"preset {preset}, {args.device}, {dtype}, prompt {prompt_len} + {new} new tokens per row, "
          f"{sum(q.numel() for q in ours.parameters()) / 1e6:.2f}M parameters, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    print(f"{'mode':<8}{'batch':>6}  {'contender':<14}{'tokens/s':>11}{'vs HF':>8}")
    for B in batches:
        prompt_ids = torch.randint(0, ours.config.vocab_size, (B, prompt_len),
                                   generator=torch.Generator().manual_seed(B)).to(args.device)
        prompts = prompt_ids.tolist()
        greedy = ours_generate(ours, prompts, new, False, None)
        if not args.no_hf:
            same = sum(a == b for a, b in zip(hf_generate(hf, prompt_ids, new, False), greedy))
            print(f"batch {B}: same greedy tokens as transformers in {same}/{B} rows")
        if compiled is not None:
            ours.decode = compiled
            same = sum(a == b for a, b in zip(ours_generate(ours, prompts, new, False, None), greedy))
            del ours.decode
            print(f"batch {B}: same greedy tokens with torch.compile as without in {same}/{B} rows")
        for sample in (False, True):
            gen = torch.Generator(device=args.device).manual_seed(0)
            contenders = [] if args.no_hf else [("transformers", lambda: hf_generate(hf, prompt_ids, new, sample))]

            def ours_call(decode):
                def call():
                    ours.decode = decode   # an instance attribute, so generate's model.decode(...) uses it
                    try:
                        ours_generate(ours, prompts, new, sample, gen)
                    finally:
                        del ours.decode
                return call
            contenders.append(("ours", ours_call(decode_eager)))
            if compiled is not None:
                contenders.append(("ours+compile", ours_call(compiled)))
            times = time_side_by_side([c for _, c in contenders], args.iters, device=args.device)
            for (name, _), t in zip(contenders, times):
                ratio = "" if args.no_hf else f"{times[0] / t:>7.2f}x"
                print(f"{'sample' if sample else 'greedy':<8}{B:>6}  {name:<14}{B * new / t:>11.0f}{ratio}",
                      flush=True)


if __name__ == "__main__":
    main()
