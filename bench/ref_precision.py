"""
How far apart are log π_θ and log π_ref at step 0, when both start from the same weights?

Under bf16 autocast the fp32 policy and a bf16 copy of its weights run the same bf16 matmuls, but the copy keeps
its embeddings, residual stream and norms in bf16, so the two log-probs differ before any training step. oreo.py
therefore keeps the reference in the policy's fp32 (the same computation, a gap of exactly 0). This prints the gap
per action token and summed over each response (the sum is what enters acc, and β·acc the value's target) for a
bf16 reference and for the fp32 one, under bf16 autocast on this machine's device.

    python bench/ref_precision.py --policy out/demo/sft/policy     # a trained checkpoint, on built-in task data
    python bench/ref_precision.py                                  # a random Qwen2-style model on random tokens
    python bench/ref_precision.py --device cuda --policy FOLDER --data trajectories.jsonl
"""
import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from model import Config, Transformer  # noqa: E402


def logprobs(model, ids, autocast):
    with torch.no_grad(), autocast:
        logits = model(ids)
    return logits.float().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)   # (B, L-1) fp32


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", help="checkpoint folder (default: a random Qwen2-style model, 12 × 512, vocab 32k)")
    p.add_argument("--data", help="trajectories .jsonl (default: built-in task demonstrations, or random tokens)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.03)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.policy:
        policy = Transformer.from_pretrained(args.policy, dtype=torch.float32, device=device).eval()
        tokenizer = data.Tokenizer.from_pretrained(args.policy)
        trajectories = data.load_trajectories(args.data) if args.data else data.builtin_demonstrations(
            data.builtin_problems(args.batch, args.seed, "val"), args.seed)
        batch = data.collate([data.encode_trajectory(tokenizer, t, 512) for t in trajectories[:args.batch]],
                             tokenizer.pad_id)
        ids, mask, what = batch["input_ids"].to(device), batch["mask"].to(device), args.policy
    else:
        config = Config(model_type="qwen2", vocab_size=32768, n_layer=12, n_head=8, n_kv_head=2, d_model=512,
                        head_dim=64, d_ff=1408, max_seq_len=512, norm_eps=1e-6, rope_theta=10000.0,
                        tie_embeddings=True, qkv_bias=True, qk_norm=False)
        policy = Transformer(config).to(device).eval()
        ids = torch.randint(0, config.vocab_size, (args.batch, 256), device=device)
        mask, what = torch.ones(args.batch, 255, device=device), "random qwen2-style 12 × 512, random tokens"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    logp = logprobs(policy, ids, autocast)
    print(f"{what}: {ids.shape[0]} sequences, {int(mask.sum())} action tokens, bf16 autocast on {device.type}, "
          f"β {args.beta}")
    print(f"{'reference':>22} {'mean |Δ| / token':>17} {'max |Δ|':>9} {'mean |Σ Δ| / seq':>17} {'β·mean |Σ Δ|':>13}")
    for name, dtype in (("bf16 copy (before)", torch.bfloat16), ("fp32, as the policy", torch.float32)):
        reference = Transformer(policy.config).to(device)
        reference.load_state_dict(policy.state_dict())
        reference.to(dtype).eval()
        delta = (logp - logprobs(reference, ids, autocast)) * mask                        # (B, L-1)
        per_token = delta.abs().sum() / mask.sum()
        per_seq = delta.sum(-1).abs().mean()
        print(f"{name:>22} {per_token.item():17.2e} {delta.abs().max().item():9.2e} {per_seq.item():17.2e} "
              f"{args.beta * per_seq.item():13.2e}")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
