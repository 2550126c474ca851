"""Throughput of our Transformer vs Hugging Face transformers on the same config and the same weights.

    python bench/model_vs_hf.py                                   # CPU, small Qwen2-like config, fp32
    python bench/model_vs_hf.py --device cuda --preset qwen2.5-1.5b   # GPU: bf16, seq 2048, tokens/s and MFU

Forward (no grad) and forward+backward (cross-entropy on random labels) are timed side by side, alternating
between the two models so that both see the same machine load; the table reports the median time per step,
tokens/s, and ours/HF as a ratio of throughputs (> 1 means ours is faster). MFU counts 6·N FLOPs per token for the
matmul weights (lm_head included) plus 6·n_layer·T·n_head·head_dim for causal attention, over --peak-tflops.
"""
import argparse
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402
from common import time_side_by_side  # noqa: E402

PRESETS = {
    # the size of tests/hf_models.py's models: per-token Python overhead is what is measured here
    "tiny": dict(model_type="qwen2", vocab_size=211, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 tie_word_embeddings=False),
    # Small enough for a 2-core CPU run of under a minute.
    "cpu-small": dict(model_type="qwen2", vocab_size=8192, hidden_size=256, intermediate_size=704,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                      max_position_embeddings=2048, tie_word_embeddings=True),
    # The size of the built-in task's model (byte tokens): Python overhead matters more than matmuls.
    "cpu-tiny": dict(model_type="llama", vocab_size=258, hidden_size=128, intermediate_size=352,
                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                     max_position_embeddings=512, tie_word_embeddings=True),
    # Qwen2.5-1.5B / Qwen2.5-Math-1.5B dimensions (random weights).
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=10000.0),
}


def build_models(preset, dtype, device):
    """The HF model with random weights, and ours loaded from its save_pretrained folder (same weights)."""
    settings = dict(PRESETS[preset])
    config = transformers.AutoConfig.for_model(**settings)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = model.Transformer.from_pretrained(folder, dtype=dtype, device=device)
    return hf.to(device), ours


def step_fn(net, is_hf, input_ids, labels, backward):
    def step():
        if backward:
            logits = net(input_ids).logits if is_hf else net(input_ids)
            F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()).backward()
        else:
            with torch.no_grad():
                net(input_ids).logits if is_hf else net(input_ids)
    return step


def flops_per_token(config, T):
    c = config
    per_layer = c.d_model * (c.n_head + 2 * c.n_kv_head) * c.head_dim + c.n_head * c.head_dim * c.d_model \
        + 3 * c.d_model * c.d_ff
    matmul_params = c.n_layer * per_layer + c.d_model * c.vocab_size
    return 6 * matmul_params + 6 * c.n_layer * T * c.n_head * c.head_dim


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="model dimensions (default: cpu-small on CPU, qwen2.5-1.5b on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 4 CPU, 2 CUDA)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256 CPU, 2048 CUDA)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default fp32 CPU, bf16 CUDA")
    p.add_argument("--iters", type=int, default=5, help="timed steps per model and mode")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200 SXM: 989)")
    args = p.parse_args()
    cuda = args.device == "cuda"
    preset = args.preset or ("qwen2.5-1.5b" if cuda else "cpu-small")
    B, T = args.batch or (2 if cuda else 4), args.seq or (2048 if cuda else 256)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    torch.set_num_threads(args.threads)

    hf, ours = build_models(preset, dtype, args.device)
    V = ours.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, V, (B, T), generator=gen).to(args.device)
    labels = torch.randint(0, V, (B, T), generator=gen).to(args.device)
    with torch.no_grad():
        diff = (ours(input_ids[:1, :64]).float() - hf(input_ids[:1, :64]).logits.float()).abs().max().item()
    contenders = [("transformers", hf, True), ("ours", ours, False)]
    if args.compile:
        contenders.append(("ours+compile", torch.compile(ours), False))

    print(f"preset {preset}, {args.device}, {dtype}, batch {B} x seq {T}, "
          f"{sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, max |logit diff| {diff:.2e}")
    print(f"{'mode':<18}{'model':<15}{'ms/step':>10}{'tokens/s':>12}{'vs HF':>8}" + ("{:>8}".format("MFU") if cuda else ""))
    for mode, backward in (("forward", False), ("forward+backward", True)):
        steps = [step_fn(net, is_hf, input_ids, labels, backward) for _, net, is_hf in contenders]
        times = time_side_by_side(steps, args.iters, warmup=3 if args.compile else 1, device=args.device)
        for (name, _, _), t in zip(contenders, times):
            line = f"{mode:<18}{name:<15}{t * 1e3:>10.1f}{B * T / t:>12.0f}{times[0] / t:>7.2f}x"
            if cuda:
                flops = flops_per_token(ours.config, T) * B * T / (1 if backward else 3)
                line += f"{flops / t / (args.peak_tflops * 1e12):>8.1%}"
            print(line)
        for _, net, _ in contenders:
            net.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
