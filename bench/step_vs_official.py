"""
One full OREO optimizer step of ours against an official-style step, on the same config and the same random batch.

    python bench/step_vs_official.py --preset cpu             # SmolLM2-135M dimensions, fp32, seq 512 (2-core CPU)
    python bench/step_vs_official.py --preset qwen2.5-1.5b    # GPU: bf16 autocast, seq 2048, micro-batch 4

Ours: oreo.forward_backward, the trainer's micro-step (one policy forward; log-probs and the full-vocabulary KL by
the fused-linear form on CUDA, --path chooses on a CPU; the Triton Bellman kernel on CUDA), then both AdamW steps.
Official-style, as the official OREO trainer (github jwhj/OREO, openrlhf/trainer/pcl_trainer.py) runs a micro-batch:
Hugging Face transformers models; a policy forward without gradient for the log-probs of the value loss; the value
forward and backward and its AdamW step; the reference forward, keeping its fp32 log_softmax over (B, T, V); a second
policy forward with gradient, its fp32 log_softmax over (B, T, V), the policy loss plus α × the masked mean of
F.kl_div(ref log-probs, log-probs, log_target=True) summed over the vocabulary; backward; AdamW step. Both sides use
oreo.oreo_loss for the (B, T) losses, gradient checkpointing (as the official recipe does), fp32 weights and AdamW
states, and on CUDA bf16 autocast with a bf16 reference.

Each side runs in its own process (a fresh allocator). Gradients and AdamW states are allocated before the timed
steps, so "peak" is the memory beyond the three models' weights, gradients and optimizer states: on CUDA the peak
allocated, on a CPU the growth of the resident set. Prints a table and ends with
`step vs official: speed X.XX×, peak memory Y.YY×` (speed ours / theirs; memory theirs / ours).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import oreo  # noqa: E402
from common import adamw, autocast, peak_rss_growth, random_batch  # noqa: E402
from losses import masked_mean  # noqa: E402
from model import Transformer, ValueModel  # noqa: E402
from options import parse_args  # noqa: E402

transformers.utils.logging.disable_progress_bar()

PRESETS = {
    # HuggingFaceTB/SmolLM2-135M's config.json (random weights): 134.5M parameters, tied embeddings
    "cpu": dict(model=dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                           num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                           max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                           tie_word_embeddings=True),
                seq=512, micro_batch=2, device="cpu"),
    # Qwen2.5-1.5B / Qwen2.5-Math-1.5B dimensions (random weights)
    "qwen2.5-1.5b": dict(model=dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                    num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                    max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=10000.0,
                                    tie_word_embeddings=True),
                         seq=2048, micro_batch=4, device="cuda"),
}


def hf_policy(settings, folder, device):
    config = transformers.AutoConfig.for_model(**settings)
    torch.manual_seed(0)
    policy = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    policy.save_pretrained(folder)
    return policy.to(device)


def build_ours(settings, device, cuda):
    with tempfile.TemporaryDirectory() as folder:
        hf_policy(settings, folder, "cpu")
        policy = Transformer.from_pretrained(folder, device=device)
        reference = Transformer.from_pretrained(folder, dtype=torch.bfloat16 if cuda else torch.float32, device=device)
        value = ValueModel.from_pretrained(folder, device=device)
    reference.requires_grad_(False).eval()
    for m in (policy, value):
        m.set_gradient_checkpointing(True)
    return policy, reference, value


class Critic(torch.nn.Module):
    """OpenRLHF's critic: the base model (no lm_head) and a bias-free value head on its last hidden state."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.value_head = torch.nn.Linear(base.config.hidden_size, 1, bias=False, device=base.device)
        torch.nn.init.zeros_(self.value_head.weight)

    def forward(self, input_ids):
        hidden = self.base(input_ids).last_hidden_state
        with torch.autocast(hidden.device.type, enabled=False):
            return self.value_head(hidden.float()).squeeze(-1)


def build_official(settings, device, cuda):
    with tempfile.TemporaryDirectory() as folder:
        policy = hf_policy(settings, folder, device)
        reference = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation="sdpa").to(device)
        base = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    reference.requires_grad_(False).eval()
    value = Critic(base.to(device))
    for m in (policy, value.base):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    return policy, reference, value


def official_log_probs(model, input_ids):
    """As pcl_trainer.accumulated_logps: fp32 log_softmax over (B, T-1, V) and the labels' log-probs (B, T-1)."""
    log_probs = model(input_ids).logits[:, :-1].float().log_softmax(-1)
    return log_probs, log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def official_micro_step(policy, reference, value, batch, args, precision, scale):
    ids, mask, rewards = batch["input_ids"], batch["mask"], batch["rewards"]
    with precision:
        with torch.no_grad():
            logp = official_log_probs(policy, ids)[1]  # first policy forward, for the value loss
        values = value(ids)[:, :-1]
        with torch.no_grad():
            ref_log_probs, ref_logp = official_log_probs(reference, ids)
    _, value_loss = oreo.oreo_loss(logp, ref_logp, values, rewards, mask, args.beta, args.variant, batch["step_start"])
    (value_loss * scale).backward()  # the official trainer's value AdamW step comes here (DeepSpeed: at the boundary)
    with precision:
        log_probs, logp = official_log_probs(policy, ids)  # second policy forward, with gradient
    policy_loss, _ = oreo.oreo_loss(logp, ref_logp, values.detach(), rewards, mask, args.beta, args.variant,
                                    batch["step_start"])
    kl = F.kl_div(ref_log_probs, log_probs, reduction="none", log_target=True).sum(-1)  # (B, T-1) KL[π ‖ π_ref]
    ((policy_loss + args.alpha * masked_mean(kl, mask)) * scale).backward()


def run_side(a):
    preset = PRESETS[a.preset]
    device = torch.device(a.device or preset["device"])
    cuda = device.type == "cuda"
    torch.set_num_threads(a.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    B, T = a.micro_batch or preset["micro_batch"], a.seq or preset["seq"]
    build = build_ours if a.side == "ours" else build_official
    settings = dict(preset["model"], num_hidden_layers=a.layers or preset["model"]["num_hidden_layers"])
    policy, reference, value = build(settings, device, cuda)
    trained = (policy, value)
    optimizers = adamw(trained, cuda)
    # weights, gradients and AdamW states exist before the measured steps: the peak is what a step adds to them
    for m, opt in zip(trained, optimizers):
        for p in m.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=False)
    args = parse_args([])  # the trainer's defaults: token level, β 0.03, α 0.01, full KL
    precision = autocast(cuda)
    batch = random_batch(B, T, preset["model"]["vocab_size"], device)
    fused = {"auto": None, "fused": True, "materialised": False}[a.path]

    def step():
        for _ in range(a.grad_accum):
            if a.side == "ours":
                oreo.forward_backward(policy, reference, value, batch, args, precision, 1 / a.grad_accum, fused=fused)
            else:
                official_micro_step(policy, reference, value, batch, args, precision, 1 / a.grad_accum)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=False)

    for _ in range(a.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times, peak = [], 0
    for i in range(a.steps):
        t0 = time.perf_counter()
        if cuda:
            step()
            torch.cuda.synchronize()
        elif i == 0:
            peak = peak_rss_growth(step)
        else:
            step()
        times.append(time.perf_counter() - t0)
        print(f"{a.side}: step {i + 1}/{a.steps} {times[-1]:.1f} s", file=sys.stderr, flush=True)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    seconds = sorted(times)[len(times) // 2]
    n_params = sum(p.numel() for p in policy.parameters())
    print("RESULT " + json.dumps(dict(side=a.side, device=torch.cuda.get_device_name() if cuda else "cpu",
                                      params=n_params, tokens=B * T * a.grad_accum, seconds=seconds,
                                      tokens_per_s=B * T * a.grad_accum / seconds, peak_GB=peak / 1e9)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="model dimensions, sequence length, "
                   "micro-batch and device (see PRESETS)")
    p.add_argument("--device", help="cpu or cuda (default: the preset's)")
    p.add_argument("--layers", type=int, help="transformer blocks (default: the preset's)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: the preset's)")
    p.add_argument("--micro-batch", type=int, help="sequences per micro-batch (default: the preset's)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, help="timed optimizer steps, median reported (default 1 CPU, 3 CUDA)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 0 CPU, 1 CUDA)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per side")
    p.add_argument("--path", default="auto", choices=["auto", "fused", "materialised"],
                   help="our log-prob/KL path: auto = the trainer's choice (fused-linear on CUDA only)")
    p.add_argument("--side", choices=["ours", "official"], help=argparse.SUPPRESS)  # one side, in this process
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per side")
    a = p.parse_args()
    cuda = (a.device or PRESETS[a.preset]["device"]) == "cuda"
    a.steps = a.steps or (3 if cuda else 1)
    a.warmup = a.warmup if a.warmup is not None else (1 if cuda else 0)
    if a.side:
        return run_side(a)
    results = {}
    for side in ("ours", "official"):
        cmd = [sys.executable, os.path.abspath(__file__), "--side", side] + sys.argv[1:]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"step_vs_official: the {side} side failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        results[side] = json.loads(lines[-1][len("RESULT "):])
    ours, theirs = results["ours"], results["official"]
    B, T = a.micro_batch or PRESETS[a.preset]["micro_batch"], a.seq or PRESETS[a.preset]["seq"]
    layers = a.layers or PRESETS[a.preset]["model"]["num_hidden_layers"]
    print(f"preset {a.preset} on {ours['device']}: {ours['params'] / 1e6:.1f}M parameters ({layers} blocks), "
          f"micro-batch {B} × seq {T} "
          f"× {a.grad_accum}, our path {a.path}" + ("" if cuda else f", {a.threads} threads"))
    print(f"{'side':<16}{'s/step':>10}{'tokens/s':>12}{'peak extra GB':>16}")
    for name, r in (("ours", ours), ("official-style", theirs)):
        print(f"{name:<16}{r['seconds']:>10.2f}{r['tokens_per_s']:>12.0f}{r['peak_GB']:>16.3f}")
    speed = ours["tokens_per_s"] / theirs["tokens_per_s"]
    memory = theirs["peak_GB"] / max(ours["peak_GB"], 1e-9)
    print(f"step vs official: speed {speed:.2f}×, peak memory {memory:.2f}×")


if __name__ == "__main__":
    main()
