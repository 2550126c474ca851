"""
OREO training throughput: tokens/s of full optimizer steps (policy forward+backward, reference forward, value
forward+backward, both AdamW steps), with oreo.forward_backward, the trainer's own micro-step. On a GPU also MFU,
counting ≈ 14 × params FLOPs per token plus attention (oreo.flops_per_token).

    python bench/train_throughput.py                                      # built-in config on CPU
    python bench/train_throughput.py --device cuda --preset qwen2.5-1.5b  # random weights, seq 2048, bf16

Random weights and random tokens: the speed of a step does not depend on what the weights are.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import oreo  # noqa: E402
from common import adamw, autocast, random_batch  # noqa: E402
from model import Config, Transformer, ValueModel  # noqa: E402
from options import parse_args  # noqa: E402

# Qwen2.5-1.5B (and Qwen2.5-Math-1.5B): 1.54B parameters, tied embeddings, q/k/v biases, GQA 12/2.
PRESETS = {
    "builtin": None,  # oreo.builtin_config with the trainer's defaults
    "qwen2.5-1.5b": Config(model_type="qwen2", vocab_size=151936, n_layer=28, n_head=12, n_kv_head=2, d_model=1536,
                           d_ff=8960, max_seq_len=4096, norm_eps=1e-6, rope_theta=10000.0, tie_embeddings=True,
                           qkv_bias=True),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="builtin", choices=sorted(PRESETS), help="model dimensions (builtin: "
                   "the trainer's built-in model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 64 builtin, 2048 otherwise)")
    p.add_argument("--micro-batch-size", type=int, help="sequences per forward (default 32 builtin, 4 otherwise)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after 2 warm-up steps)")
    p.add_argument("--kl", default="full", choices=["full", "k3", "none"], help="the OREO KL term (oreo.py --kl)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    p.add_argument("--compile", action="store_true", help="torch.compile the three models")
    args = p.parse_args()
    builtin = args.preset == "builtin"
    T = args.seq_len or (64 if builtin else 2048)
    B = args.micro_batch_size or (32 if builtin else 4)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    train_args = parse_args(["--kl", args.kl])  # β, α, variant: the trainer's defaults
    config = oreo.builtin_config(train_args, 258) if builtin else PRESETS[args.preset]

    torch.manual_seed(0)
    with torch.device(device):
        policy = Transformer(config)
        reference = Transformer(config).to(torch.bfloat16 if cuda else torch.float32).requires_grad_(False).eval()
        value = ValueModel(None, Transformer(config))
    for m in (policy, value):
        m.set_gradient_checkpointing(args.grad_checkpointing)
    n_params = sum(p.numel() for p in policy.parameters())
    optimizers = adamw((policy, value), cuda)
    if args.compile:
        policy, reference, value = (torch.compile(m) for m in (policy, reference, value))
    precision = autocast(cuda)
    batch = random_batch(B, T, config.vocab_size, device)

    def step():
        for _ in range(args.grad_accum):
            oreo.forward_backward(policy, reference, value, batch, train_args, precision, 1 / args.grad_accum)
        for m, opt in zip((policy, value), optimizers):
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    tokens = B * T * args.grad_accum
    line = (f"{args.preset}: {n_params / 1e6:.2f}M params, {B} × {T} tokens × {args.grad_accum} micro-batches, "
            f"{device.type}: {dt * 1e3:.1f} ms/step, {tokens / dt:,.0f} tokens/s")
    peak = oreo.peak_flops(device)
    if peak:
        mfu = oreo.flops_per_token(config, n_params, T, "oreo") * tokens / dt / peak
        line += f", MFU {100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s"
    if cuda:
        line += f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    print(line)


if __name__ == "__main__":
    main()
