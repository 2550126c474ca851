"""
OREO: Offline REasoning Optimization (arXiv 2412.16145), the trainer.

    python oreo.py                                   # built-in task on CPU: tiny model, byte tokens, minutes
    python oreo.py --init ckpt/sft --data trajectories.jsonl --out out/oreo
    torchrun --standalone --nproc_per_node=8 oreo.py --init ckpt/sft --data trajectories.jsonl --out out/oreo

This file is the trainer around the losses (losses.py, the method of DESIGN.md §1): data and models, then the
loop, top to bottom as `main` runs it: set-up (distributed, models wrapped for FSDP/compile/DDP, resume), the step
(micro-batches, clipping, the optimizers), logging. The flags are in options.py, the checkpoints in checkpoint.py.
OREO fits a policy π_θ and a value V_φ to the soft Bellman equation
V(s_t) = R − β Σ_{i≥t} log π(a_i|s_i)/π_ref(a_i|s_i) on offline trajectories with a terminal reward.
"""
import contextlib
import gc
import json
import math
import os
import time
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

import checkpoint
import data
import kernels
from losses import (dpo_loss, kl_term, kto_loss, masked_mean, nll_loss, oreo_loss, policy_logprobs,
                    reference_logprobs)
from model import Config, Transformer, ValueModel, add_lora
from options import parse_args


# ----------------------------------------------------------------------------------------------------------
# Data and models

def load_examples(args, tokenizer):
    """Encoded examples; for dpo, (chosen, rejected) pairs of examples."""
    source = args.data or "the built-in task"
    if args.data:
        trajectories = data.load_trajectories(args.data)
    else:
        # DPO pairs two responses of one prompt: there, two demonstrations per problem
        trajectories = data.builtin_demonstrations(data.builtin_problems(args.builtin_problems, args.seed, "train"),
                                                   args.seed, per_problem=2 if args.loss == "dpo" else 1)
    if args.loss == "rs":
        trajectories = data.rejection_sampling(trajectories)
    delimiters = data.STEP_DELIMITERS[args.delimiters]

    def encode(t):
        return data.encode_trajectory(tokenizer, t, args.max_len, delimiters, args.step_start)

    if args.loss == "dpo":
        examples = [(encode(c), encode(r)) for c, r in data.dpo_pairs(trajectories, seed=args.seed)]
        truncated = sum(c.truncated or r.truncated for c, r in examples)
    else:
        examples = [encode(t) for t in trajectories]
        truncated = sum(e.truncated for e in examples)
    if not examples:
        what = {"rs": "no reward-1 response", "dpo": "no prompt with both a correct and a wrong response"}
        raise data.UserError(f"{source}: {what.get(args.loss, 'no trajectory')} to train --loss {args.loss} on")
    return examples, truncated


def builtin_config(args, vocab_size):
    """A tiny Llama-family model (a few hundred thousand parameters) that learns the built-in task on a CPU."""
    return Config(model_type="llama", vocab_size=vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                  n_kv_head=args.n_head, d_model=args.d_model, head_dim=args.d_model // args.n_head,
                  d_ff=(8 * args.d_model // 3 + 31) // 32 * 32, max_seq_len=max(args.max_len, 256),
                  norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=True, qkv_bias=False, qk_norm=False)


def build_models(args, tokenizer, device):
    """Policy π_θ, frozen reference π_ref (None for sft/rs) and value model V_φ (None unless oreo)."""
    torch.manual_seed(args.seed)  # the same initialisation on every rank (FSDP does not broadcast it)
    if args.init:
        with data.as_user_error():
            policy = Transformer.from_pretrained(args.init, dtype=torch.float32, device=device)
    else:
        policy = Transformer(builtin_config(args, tokenizer.vocab_size)).to(device)
    if args.max_len > policy.config.max_seq_len:
        raise data.UserError(f"--max-len {args.max_len} is longer than the model's {policy.config.max_seq_len} "
                             f"positions (max_position_embeddings / n_positions in {args.init}/config.json): lower "
                             "--max-len")
    # The reference keeps the policy's fp32 weights, although it is frozen: under bf16 autocast it then computes
    # exactly what the policy's forward computes, so log π_θ − log π_ref is exactly 0 at step 0. A bf16 copy (half
    # the memory) keeps a bf16 residual stream and norms and is off by a fraction of a nat per sequence
    # (bench/ref_precision.py measures it).
    reference = value = None
    if args.loss != "sft" and args.loss != "rs":
        if args.init:
            with data.as_user_error():
                reference = Transformer.from_pretrained(args.ref or args.init, dtype=torch.float32, device=device)
        else:
            reference = Transformer(policy.config).to(device=device)
            reference.load_state_dict(policy.state_dict())
        reference.requires_grad_(False).eval()
    if args.loss == "oreo":
        if args.init:
            with data.as_user_error():
                value = ValueModel.from_pretrained(args.init_value or args.init, dtype=torch.float32, device=device)
        else:
            value = ValueModel(policy.config).to(device)  # the head starts at zero
            value.backbone.load_state_dict(policy.state_dict())
        if args.value_lora:
            add_lora(value.backbone, args.value_lora)  # the head stays trainable; the rest of the backbone freezes
    return policy, reference, value


# ----------------------------------------------------------------------------------------------------------
# Training

def settings_line(args, value):
    """The effective method and optimisation settings (defaults filled in), printed at the start of a run."""
    parts = [f"loss {args.loss}"]
    if args.loss == "oreo":
        parts.append(f"variant {args.variant}" + (f" (step starts {args.step_start}, delimiters {args.delimiters})"
                                                  if args.variant == "step" else ""))
        parts.append(f"β {args.beta}, α {args.alpha}, KL {args.kl}")
    elif args.beta is not None:
        parts.append(f"β {args.beta}")
    if args.loss in ("sft", "rs"):
        parts.append(f"NLL mean per {args.nll_mean}")
    parts.append(f"lr {args.lr:g}" + (f", value lr {args.value_lr:g}" if value is not None else "") +
                 f" (AdamW 0.9/0.95, cosine, {args.warmup:.0%} warm-up, grad clip {args.grad_clip})")
    if value is not None:
        trained = sum(p.numel() for p in value.parameters() if p.requires_grad)
        parts.append((f"value LoRA rank {args.value_lora}, " if args.value_lora else "value ") +
                     f"{trained / 1e6:.2f}M trained params")
    line = " | ".join(parts)
    if args.loss == "oreo" and (args.variant == "token" or args.variant == "step" and args.step_start == "official"):
        line += ("\n(the logged policy and value losses are the same number by construction: both residuals equal "
                 "β·acc + V − R at the states both train; they differ only in which model gets the gradient)")
    return line


def get_lr(step, total_steps, peak_lr, warmup_frac):
    """Cosine schedule with linear warm-up over the first warmup_frac of the steps, decaying to 0."""
    warmup = math.ceil(warmup_frac * total_steps)
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * progress))


def peak_flops(device):
    """Dense bf16 peak of the GPU in FLOP/s, or None when unknown (then no MFU is printed)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("4090", 165e12)):
        if key in name:
            return flops
    return None


def flops_per_token(config, n_params, seq_len, loss):
    """≈ 6N per trained model (forward + backward), 2N per forward-only one, plus attention (nanoGPT's count)."""
    trained, frozen = {"oreo": (2, 1), "sft": (1, 0), "rs": (1, 0), "dpo": (1, 1), "kto": (1, 1)}[loss]
    attention = 12 * config.n_layer * config.n_head * config.head_dim * seq_len  # fwd + bwd of QKᵀ and AV
    return trained * (6 * n_params + attention) + frozen * (2 * n_params + attention / 3)


def fmt_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def forward_backward(policy, reference, value, batch, args, autocast, scale, fused=None):
    """
    One micro-batch of args.loss: the forward passes, the loss, and its backward pass; gradients are scaled by
    `scale` (1 / accumulation steps) and accumulate. Returns the detached policy_loss (a baseline's loss),
    value_loss, kl and mean_value, zero where the loss has no such term. fused: log-probs and KL by the
    fused-linear form (default: on CUDA, where the Bellman losses also run in the Triton kernel; policy_logprobs
    says what the other path does).
    """
    input_ids, mask, rewards = batch["input_ids"], batch["mask"], batch["rewards"]  # (B, L) (B, L-1) (B,)
    fused = input_ids.is_cuda if fused is None else fused
    full_kl = args.loss == "oreo" and args.kl == "full"
    zero = torch.zeros((), device=input_ids.device)
    with autocast:
        if reference is not None:
            ref_logp, kl_inputs = reference_logprobs(reference, input_ids, fused, full_kl)
        # the one policy forward of this micro-batch; (B, L-1) fp32 each
        logp, token_kl = policy_logprobs(policy, input_ids, fused, kl_inputs if full_kl else None)
    if args.loss == "oreo":
        # The value loss needs acc = Σ mask·(logp − ref_logp), so the reference runs before it. The losses detach
        # logp inside the value loss and the values inside the policy loss, so one backward of their sum gives
        # each model exactly its own loss's gradient, and both losses see the pre-update V and logp.
        with autocast:
            values = value(input_ids)[:, :-1]  # (B, L-1) fp32, V(s_j)
        value_mask = batch["step_start"] if args.step_start == "official" else None
        if logp.is_cuda and value_mask is None:  # the Triton kernel (it has no official step-start value loss)
            policy_loss, value_loss = kernels.bellman_loss(logp, ref_logp, values, rewards, mask, args.beta,
                                                           args.variant, batch["step_start"])
        else:  # the specification
            policy_loss, value_loss = oreo_loss(logp, ref_logp, values, rewards, mask, args.beta, args.variant,
                                                batch["step_start"], value_mask)
        kl = kl_term(args.kl, token_kl, logp, ref_logp, mask) if args.kl != "none" else zero
        ((value_loss + policy_loss + args.alpha * kl) * scale).backward()
        return dict(policy_loss=policy_loss.detach(), value_loss=value_loss.detach(), kl=kl.detach(),
                    mean_value=masked_mean(values.detach(), mask))
    if args.loss in ("sft", "rs"):
        loss = nll_loss(logp, mask, args.nll_mean)
    elif args.loss == "dpo":
        loss = dpo_loss(logp, ref_logp, mask, args.beta)
    else:
        loss = kto_loss(logp, ref_logp, mask, rewards, args.beta)
    (loss * scale).backward()
    return dict(policy_loss=loss.detach(), value_loss=zero, kl=zero, mean_value=zero)


@dataclass
class Run:
    """Where this process runs: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (nanoGPT style)."""
    ddp: bool            # launched by torchrun
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype   # the compute dtype: float32, or bfloat16 under autocast (--dtype)
    use_cuda: bool

    @property
    def master(self):    # rank 0 prints, logs and writes the files
        return self.rank == 0


def setup_distributed(args):
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world_size = 0, 0, 1
    device, dtype = data.device_and_dtype(args)  # under torchrun, auto and cuda mean cuda:LOCAL_RANK
    use_cuda = device.type == "cuda"
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if args.fsdp and not ddp:
        raise data.UserError("--fsdp shards over processes: launch with torchrun (e.g. --nproc_per_node=8)")
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Run(ddp, rank, local_rank, world_size, device, dtype, use_cuda)


@dataclass
class Trained:
    """A model that trains: its name in checkpoints and logs, the model the step calls (compiled, DDP-wrapped), the
    unwrapped one that checkpoints and export read, its peak learning rate and its optimizer."""
    name: str            # "policy" or "value"
    model: torch.nn.Module
    raw: torch.nn.Module
    peak_lr: float
    optimizer: torch.optim.Optimizer


def wrap_models(args, run, policy, reference, value):
    """Gradient checkpointing, FSDP2 sharding, torch.compile and DDP, in that order; returns the models the step
    calls, policy and value as Trained (with their AdamW), and the reference."""
    # Unwrapped and uncompiled (fully_shard works in place, so under FSDP these are the sharded modules):
    # checkpoints and export read them.
    raw_policy, raw_value = policy, value
    for m in (policy, value and value.backbone):
        if m is not None and args.grad_checkpointing:
            m.set_gradient_checkpointing(True)
    if args.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # Under bf16 autocast, gather bf16 weights (half the traffic; autocast would cast them anyway); reduce in fp32.
        mp = MixedPrecisionPolicy(param_dtype=None if run.dtype == torch.float32 else run.dtype,
                                  reduce_dtype=torch.float32)
        for m, blocks in ((policy, policy.layers), (reference, reference and reference.layers),
                          (value, value and value.backbone.layers)):
            if m is not None:
                for block in blocks:
                    fully_shard(block, mp_policy=mp)
                fully_shard(m, mp_policy=mp)
    if args.compile:
        policy, reference, value = (m and torch.compile(m) for m in (policy, reference, value))
    if run.ddp and not args.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        device_ids = [run.local_rank] if run.use_cuda else None
        policy = DDP(policy, device_ids=device_ids)
        value = value and DDP(value, device_ids=device_ids)

    def adamw(model, lr):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                                 weight_decay=0.0, fused=run.use_cuda and not args.fsdp)

    trained = [Trained("policy", policy, raw_policy, args.lr, adamw(policy, args.lr))]
    if value is not None:
        trained.append(Trained("value", value, raw_value, args.value_lr, adamw(value, args.value_lr)))
    return trained, reference


@dataclass
class StepStats:
    """One optimizer step's logged numbers, global: means over micro-batches and ranks, tokens summed."""
    policy_loss: float   # a baseline's loss
    value_loss: float
    kl: float
    mean_value: float    # mean V over the trained states
    mean_reward: float
    tokens: float        # real tokens in the global batch
    seq_len: float       # padded length of a micro-batch


def train_step(args, run, trained, reference, examples, indices, pad_id):
    """The forward and backward passes of one optimizer step over this rank's share `indices` of the global batch,
    in micro-batches whose gradients accumulate; the optimizers do not step here."""
    micro = args.micro_batch_size  # parse_args fitted it to the world size (options.micro_batch_size)
    grad_accum = args.batch_size // run.world_size // micro
    models = {t.name: t.model for t in trained}
    autocast = (contextlib.nullcontext() if run.dtype == torch.float32 else
                torch.autocast(run.device.type, dtype=run.dtype))
    sums = {f.name: torch.zeros((), device=run.device) for f in fields(StepStats)}
    for micro_step in range(grad_accum):
        chunk = [examples[i] for i in indices[micro_step * micro:(micro_step + 1) * micro]]
        if args.loss == "dpo":
            chunk = [c for c, _ in chunk] + [r for _, r in chunk]  # chosen rows first, then rejected
        batch = {k: v.to(run.device, non_blocking=True) for k, v in data.collate(chunk, pad_id).items()}
        last = micro_step == grad_accum - 1
        # Gradients are all-reduced only after the last micro-step; set before its forward (nanoGPT).
        for t in trained:
            if args.fsdp:
                t.model.set_requires_gradient_sync(last)
            elif run.ddp:
                t.model.require_backward_grad_sync = last
        losses = forward_backward(models["policy"], reference, models.get("value"), batch, args, autocast,
                                  1 / grad_accum)
        for name, x in losses.items():
            sums[name] += x
        sums["mean_reward"] += batch["rewards"].mean()
        sums["tokens"] += sum(len(e.ids) for e in chunk)
        sums["seq_len"] += batch["input_ids"].shape[1]
    # Logged numbers are global: losses and means averaged over ranks, tokens summed.
    total = torch.stack(list(sums.values()))
    if run.ddp:
        dist.all_reduce(total)
    n = grad_accum * run.world_size
    total = torch.stack([x if name == "tokens" else x / n for name, x in zip(sums, total)])
    return StepStats(*total.tolist())


def clip_gradients(args, trained):
    """Clip each model's gradient norm to --grad-clip; returns {name: norm before clipping}."""
    norms = {}
    for t in trained:
        norm = torch.nn.utils.clip_grad_norm_(t.model.parameters(), args.grad_clip or float("inf"))
        norms[t.name] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    return norms


def stop_if_not_finite(step, stats, grad_norms, run, ckpt_path, last_saved):
    """A NaN/inf stops the run before any optimizer step, so the last checkpoint stays the last good state."""
    checks = [("policy loss", stats.policy_loss), ("value loss", stats.value_loss), ("KL", stats.kl)] + [
        (f"{name} gradient norm", norm) for name, norm in grad_norms.items()]
    bad = [f"{name} {x}" for name, x in checks if not math.isfinite(x)]
    if bad:
        msg = (f"step {step + 1}: non-finite {', '.join(bad)}; stopped before the optimizer step. "
               + (f"The last good checkpoint is {ckpt_path} (step {last_saved}); resume from it with a lower "
                  "--lr/--value-lr, or check the data." if last_saved is not None else
                  "No checkpoint was written yet; lower --lr/--value-lr or check the data."))
        if run.ddp:
            dist.destroy_process_group()
        raise data.UserError(msg)


def log_step(args, step, total_steps, stats, grad_norms, lr, seconds, eta, mfu, log_path):
    """Print the step's line and append its row to OUT/log.jsonl (rank 0)."""
    value_norm = grad_norms.get("value")
    row = {"step": step + 1, "policy_loss": stats.policy_loss, "value_loss": stats.value_loss, "kl": stats.kl,
           "mean_value": stats.mean_value, "mean_reward": stats.mean_reward, "lr": lr,
           "grad_norm_policy": grad_norms["policy"], "grad_norm_value": value_norm,
           "tokens": stats.tokens, "seq_len": stats.seq_len, "tokens_per_s": stats.tokens / seconds, "eta_s": eta}
    name = "policy" if value_norm is not None else args.loss
    line = (f"step {step + 1}/{total_steps} | {name} {stats.policy_loss:.4f}" +
            (f" value {stats.value_loss:.4f} KL {stats.kl:.4f} | V {stats.mean_value:+.3f}"
             if value_norm is not None else "") +
            f" R {stats.mean_reward:.3f} | lr {lr:.2e} | grad norm {grad_norms['policy']:.3f}" +
            (f" / {value_norm:.3f}" if value_norm is not None else "") + f" | {stats.tokens / seconds:,.0f} tok/s")
    if mfu is not None:
        row["mfu"] = mfu
        line += f" | MFU {100 * mfu:.1f}%"
    print(line + f" | ETA {fmt_time(eta)}", flush=True)
    with open(log_path, "a") as f:
        f.write(json.dumps(row) + "\n")


def main(argv=None):
    args = parse_args(argv)
    run = setup_distributed(args)

    # --- data and models
    with data.as_user_error():
        tokenizer = data.Tokenizer.from_pretrained(args.init) if args.init else data.Tokenizer.byte_level()
    examples, n_truncated = load_examples(args, tokenizer)
    policy, reference, value = build_models(args, tokenizer, run.device)
    torch.manual_seed(args.seed + run.rank)  # from here on, each rank draws its own random numbers
    trained, reference = wrap_models(args, run, policy, reference, value)
    lengths = None
    if args.group_by_length:   # a DPO example is a pair: its length is both sequences'
        lengths = [sum(len(e.ids) for e in (ex if args.loss == "dpo" else (ex,))) for ex in examples]
    sampler = data.Sampler(len(examples), args.batch_size, args.seed, rank=run.rank, world_size=run.world_size,
                           lengths=lengths)
    steps_per_epoch = len(examples) // args.batch_size
    if steps_per_epoch == 0:
        raise data.UserError(f"{len(examples)} training examples, fewer than --batch-size {args.batch_size}")
    total_steps = args.max_steps or max(1, int(args.epochs * steps_per_epoch))

    # --- resume: models, optimizers, data position, every rank's random state, and the step (the schedule's state)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path, log_path = os.path.join(args.out, "ckpt.pt"), os.path.join(args.out, "log.jsonl")
    last_saved = checkpoint.resume(ckpt_path, log_path, args, run, trained, sampler)
    start_step = last_saved or 0

    n_params = sum(p.numel() for p in policy.parameters())
    if run.master:
        print(f"{len(examples)} examples ({n_truncated} cut at --max-len {args.max_len}) | {n_params / 1e6:.2f}M "
              f"params | {run.world_size} process(es) on {run.device.type} | batch {args.batch_size} = "
              f"{args.micro_batch_size} × {args.batch_size // run.world_size // args.micro_batch_size} accumulation "
              f"× {run.world_size} | {total_steps} steps")
        print("settings: " + settings_line(args, value), flush=True)

    # --- the loop: one optimizer step per global batch
    batches = iter(sampler)
    t_start, flops_peak = time.perf_counter(), peak_flops(run.device)
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        for t in trained:
            for group in t.optimizer.param_groups:
                group["lr"] = get_lr(step, total_steps, t.peak_lr, args.warmup)
        stats = train_step(args, run, trained, reference, examples, next(batches), tokenizer.pad_id)
        grad_norms = clip_gradients(args, trained)
        stop_if_not_finite(step, stats, grad_norms, run, ckpt_path, last_saved)
        for t in trained:
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            checkpoint.save(ckpt_path, step + 1, args, run, trained, sampler)
            last_saved = step + 1
        if run.master:
            eta = (time.perf_counter() - t_start) / (step + 1 - start_step) * (total_steps - step - 1)
            mfu = flops_per_token(policy.config, n_params, stats.seq_len, args.loss) * stats.tokens / dt / (
                flops_peak * run.world_size) if flops_peak else None
            log_step(args, step, total_steps, stats, grad_norms, trained[0].optimizer.param_groups[0]["lr"], dt, eta,
                     mfu, log_path)

    # --- the end: a last checkpoint, and the models as Hugging Face folders
    if last_saved != total_steps:
        checkpoint.save(ckpt_path, total_steps, args, run, trained, sampler)
    checkpoint.export(policy, Transformer, os.path.join(args.out, "policy"), tokenizer, args.fsdp, run.master)
    if value is not None:
        checkpoint.export(value, ValueModel, os.path.join(args.out, "value"), tokenizer, args.fsdp, run.master,
                          args.value_lora)
    if run.master:
        print(f"saved {ckpt_path}, {args.out}/policy" + (f", {args.out}/value" if value is not None else ""))
    if run.ddp:
        # Free the DDP wrappers (their reducers hold the process group) before the group goes: freed after it, when
        # main returned, a gloo rank sometimes never exited (2 CPU processes beside a busy core: 1 hang in 5 runs of
        # the resume tests before this, none in 24 after).
        for t in trained:
            t.model = None
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    data.cli("oreo.py", main)
