"""
OREO: Offline REasoning Optimization (arXiv 2412.16145), the trainer.

    python oreo.py                                   # built-in task on CPU: tiny model, byte tokens, minutes
    python oreo.py --init ckpt/sft --data trajectories.jsonl --out out/oreo
    torchrun --standalone --nproc_per_node=8 oreo.py --init ckpt/sft --data trajectories.jsonl --out out/oreo

The losses come first (the method, DESIGN.md §1), then the trainer around them: data, models, DDP/FSDP,
the training loop, checkpoints. OREO fits a policy π_θ and a value V_φ to the soft Bellman equation
V(s_t) = R − β Σ_{i≥t} log π(a_i|s_i)/π_ref(a_i|s_i) on offline trajectories with a terminal reward.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

import data
import kernels
from model import Config, Transformer, ValueModel, add_lora, merge_lora

# ----------------------------------------------------------------------------------------------------------
# The losses

def reverse_cumsum(x):
    """acc[..., j] = sum_{i >= j} x[..., i] along the last dimension."""
    return x.flip(-1).cumsum(-1).flip(-1)


def masked_mean(x, mask):
    """mean_b ( Σ_j mask·x / Σ_j mask ): every sequence weighs the same, whatever its length."""
    return ((mask * x).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def oreo_loss(logp, ref_logp, values, rewards, mask, beta, variant="token", step_start=None, value_mask=None):
    """
    OREO's policy and value losses (DESIGN.md §1), without the KL term (the trainer adds it).

    logp, ref_logp: (B, T) log-probs of the action x_{j+1} at state s_j under the policy and the reference
    values:         (B, T) V(s_j)
    rewards:        (B,)   terminal reward R
    mask:           (B, T) 1 where x_{j+1} is an action token
    step_start:     (B, T) bool, True at the state before each step's first token (variant "step" only)
    value_mask:     (B, T) the states the value loss trains (default: mask; the official step level: step_start)
    Returns (policy_loss, value_loss): the policy loss only sends gradient into logp, the value loss only into
    values.
    """
    if variant not in ("token", "step", "response"):
        raise ValueError(f"variant must be 'token', 'step' or 'response', got {variant!r}")
    if variant == "step" and step_start is None:
        raise ValueError("variant 'step' needs step_start: (B, T) bool marking the first token of each step")
    mask = mask.to(logp.dtype)
    R = rewards.to(logp.dtype)[:, None]  # (B, 1)

    # masked log-ratio lr[j] = mask·(logp − ref_logp), and acc[j] = Σ_{i≥j} lr[i]
    log_ratio = mask * (logp - ref_logp)
    acc = reverse_cumsum(log_ratio)  # (B, T), carries the policy's gradient
    acc_sg = acc.detach()
    values_sg = values.detach()

    # Value loss: res_V[j] = β·acc[j] + V(s_j) − R; the log-probs are constants here.
    res_v = beta * acc_sg + values - R
    value_loss = masked_mean(res_v**2, mask if value_mask is None else value_mask.to(logp.dtype))

    if variant == "token":
        # Token-level policy loss: res_π[j] = β·(sg(acc[j+1]) + logp[j] − ref_logp[j]) + sg(V(s_j)) − R,
        # with acc[T] = 0. Only the current token's logp gets gradient, so every step is on the same scale.
        acc_next = F.pad(acc_sg[:, 1:], (0, 1))
        res_pi = beta * (acc_next + logp - ref_logp) + values_sg - R
        policy_loss = masked_mean(res_pi**2, mask)
    elif variant == "step":
        # Step-level policy loss, at each step start t with next start n(t) (or the end, where acc = 0):
        # res_π[t] = β·(acc[t] − acc[n(t)] + sg(acc[n(t)])) + sg(V(s_t)) − R; gradient flows through the step's tokens.
        starts = step_start.bool()
        T = logp.shape[1]
        pos = torch.arange(T, device=logp.device).expand_as(starts)
        start_pos = torch.where(starts, pos, T)  # (B, T) own position at a start, else T
        next_start = start_pos.flip(-1).cummin(-1).values.flip(-1)  # first start at or after j
        next_start = F.pad(next_start[:, 1:], (0, 1), value=T)  # first start strictly after j: n(j)
        acc_n = F.pad(acc, (0, 1)).gather(1, next_start)  # (B, T) acc[n(j)], 0 at the end
        res_pi = beta * (acc - acc_n + acc_n.detach()) + values_sg - R
        starts = starts.to(logp.dtype)
        policy_loss = masked_mean(res_pi**2, starts)
    else:
        # Response-level policy loss, one residual per sequence at its first action state s_0:
        # res_π = β·acc[s_0] + sg(V(s_0)) − R.
        first = mask.argmax(-1, keepdim=True)  # (B, 1) first action position
        has_action = (mask.sum(-1) > 0).to(logp.dtype)
        res_pi = beta * acc.gather(1, first) + values_sg.gather(1, first) - R
        policy_loss = (has_action * res_pi.squeeze(1) ** 2).mean()
    return policy_loss, value_loss


def shifted_labels(input_ids):
    """(B, L) tokens -> (B·L,) labels: position j's label is x_{j+1}; the last position has none (ignore_index),
    so the (B·L, ·) views of hidden states and logits need no copy."""
    return F.pad(input_ids[:, 1:], (0, 1), value=-100).reshape(-1)


def full_weight(weight):
    """A parameter as one plain tensor: FSDP2 holds it sharded (a DTensor) outside its module's forward."""
    return weight.full_tensor() if isinstance(weight, DTensor) else weight


def reference_logprobs(reference, input_ids, fused, with_kl):
    """
    The frozen reference's ref_logp (B, L-1) fp32, without gradient, and, with_kl, what the policy's KL pass reads:
    fused, the reference's last hidden states (B·L, D) and its lm_head weight (V, D); else its logits (B·L, V).
    """
    labels = shifted_labels(input_ids)

    def head(hidden, weight):
        hidden = hidden.flatten(0, 1)  # (B·L, D)
        if fused:
            return kernels.linear_logprobs(hidden, weight, labels), hidden
        logits = F.linear(hidden, weight)  # (B·L, V)
        return kernels.token_logprobs(logits, labels), logits

    with torch.no_grad():
        ref_logp, kept = reference(input_ids, head=torch.compiler.disable(head))  # see policy_logprobs
    ref_logp = ref_logp.view(input_ids.shape)[:, :-1]
    if not with_kl:
        return ref_logp, None
    return ref_logp, ((kept, full_weight(reference.lm_head.weight)) if fused else kept)


def policy_logprobs(policy, input_ids, fused, kl_inputs=None):
    """
    logp[b, j] = log π(x_{j+1} | x_{≤j}) (B, L-1) fp32 from one policy forward; with kl_inputs (from
    reference_logprobs) also the per-token full-vocabulary KL[π_θ(·|s_j) ‖ π_ref(·|s_j)] (B, L-1) from the same
    pass over the vocabulary, else None.
    fused: kernels.linear_logprobs from the last hidden states, in chunks of tokens recomputed in the backward, so
    no (B·L, V) logits exist for policy or reference. Otherwise the logits are made once and read by one chunked
    pass whose backward writes the gradient over them (faster on a CPU; README "The loss path").
    """
    labels = shifted_labels(input_ids)

    def head(hidden, weight):
        hidden = hidden.flatten(0, 1)  # (B·L, D)
        if fused:
            if kl_inputs is None:
                return kernels.linear_logprobs(hidden, weight, labels), None
            ref_hidden, ref_weight = kl_inputs
            return kernels.linear_logprobs(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight)
        logits = F.linear(hidden, weight)  # (B·L, V); its backward needs hidden and weight, not the logits
        if kl_inputs is None:
            return kernels.token_logprobs(logits, labels, inplace_backward=True), None
        return kernels.token_logprobs_and_kl(logits, kl_inputs, labels, inplace_backward=True)

    # The head runs eagerly under --compile: its kernels are fused already, and their Python chunk loops and
    # data-dependent checks would only break the graph.
    logp, kl = policy(input_ids, head=torch.compiler.disable(head))  # (B·L,) each
    shape = input_ids.shape
    return logp.view(shape)[:, :-1], None if kl is None else kl.view(shape)[:, :-1]


def kl_term(kind, token_kl, logp, ref_logp, mask):
    """The KL penalty of the policy loss, for the states whose action is trained. token_kl: (B, L-1) per-token
    full-vocabulary KL from policy_logprobs(..., kl_inputs) (kind "full" only)."""
    if kind == "full":
        # KL = mean_b ( Σ_j mask · KL[π_θ(·|s_j) ‖ π_ref(·|s_j)] / Σ_j mask ), over the full vocabulary
        kl = token_kl
    else:
        # k3 estimator on the data's token: exp(ref − logp) + (logp − ref) − 1 (≥ 0, no vocabulary pass;
        # unbiased only for tokens sampled from π, which offline data are not)
        log_ratio = ref_logp - logp
        kl = log_ratio.exp() - log_ratio - 1
    return masked_mean(kl, mask)


def nll_loss(logp, mask, mean="sequence"):
    """SFT and RS: negative log-likelihood of the response tokens. "sequence": each sequence's token mean, then the
    batch mean (every sequence weighs the same, and the loss does not depend on how the batch is cut into
    micro-batches); "token": the official code's token mean over the micro-batch (long responses weigh more)."""
    if mean == "token":
        return (mask * -logp).sum() / mask.sum().clamp(min=1)
    return masked_mean(-logp, mask)


def dpo_loss(logp, ref_logp, mask, beta):
    """Rows [0, P) are the chosen responses y_w, rows [P, 2P) the rejected y_l of the same prompts."""
    # DPO: −log σ(β[(log π − log π_ref)(y_w) − (log π − log π_ref)(y_l)]), log-probs summed over the response
    seq_log_ratio = (mask * (logp - ref_logp)).sum(-1)  # (2P,)
    chosen, rejected = seq_log_ratio.chunk(2)
    return -F.logsigmoid(beta * (chosen - rejected)).mean()


def kto_loss(logp, ref_logp, mask, rewards, beta, lambda_desirable=1.0, lambda_undesirable=1.0):
    """KTO on the same data: reward-1 responses are desirable, the others undesirable."""
    # KTO: desirable λ_D(1 − σ(β(r − z0))), undesirable λ_U(1 − σ(β(z0 − r))), r = Σ mask·(log π − log π_ref),
    # z0 = a detached batch estimate of KL[π‖π_ref]: the micro-batch mean of r, clamped at 0 (the KTO paper
    # estimates it on mismatched prompt/response pairs; the batch mean is a cheaper stand-in)
    r = (mask * (logp - ref_logp)).sum(-1)  # (B,)
    z0 = r.detach().mean().clamp(min=0)
    desirable = lambda_desirable * (1 - torch.sigmoid(beta * (r - z0)))
    undesirable = lambda_undesirable * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(rewards > 0.5, desirable, undesirable).mean()


# ----------------------------------------------------------------------------------------------------------
# Options

# The paper's β, α and learning rates per loss and variant (DESIGN.md §1 and the paper's appendix A.3, for
# Qwen2.5-Math-1.5B: SFT 2e-5, RS 5e-6, DPO 5e-7, KTO 5e-8, OREO 5e-6; a LoRA critic at 1e-4 for 7B). Flags override.
DEFAULT_BETA = {"oreo": 0.03, "dpo": 0.1, "kto": 0.1}
DEFAULT_ALPHA = {"token": 0.01, "step": 0.1, "response": 0.3}
PAPER_LR = {"oreo": 5e-6, "sft": 2e-5, "rs": 5e-6, "dpo": 5e-7, "kto": 5e-8}
PAPER_LORA_VALUE_LR = 1e-4
BUILTIN_LR = 1e-3  # the tiny built-in model learns from scratch


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # options without a fixed default explain theirs in the help text
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    p = data.ArgumentParser(description="OREO and its baselines (SFT, RS, DPO, KTO) on offline trajectories.",
                            formatter_class=HelpFormatter, allow_abbrev=False)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="trajectories .jsonl ({prompt, response, reward} or {messages, reward}); "
                   "without it, graded demonstrations of the built-in task")
    g.add_argument("--delimiters", default="gsm8k", choices=sorted(data.STEP_DELIMITERS),
                   help="step delimiters for --variant step: gsm8k = newline; math = newline, '. ', '.$ '")
    g.add_argument("--step-start", default="ours", choices=["ours", "official"],
                   help="--variant step: ours = a step starts at the token after the one in which a delimiter ends, "
                   "the value trains at every action state; official = a step starts at the token holding the "
                   "character after a delimiter (' Then' after '. '), the value trains at step starts only")
    g.add_argument("--max-len", type=int, default=2048, help="tokens per sequence (prompt + response); longer are cut")
    g.add_argument("--builtin-problems", type=int, default=2000, help="built-in task: number of training problems")

    g = p.add_argument_group("models")
    g.add_argument("--init", help="checkpoint folder (HF layout) for policy, reference and value; "
                   "without it, a tiny built-in Llama-family model from scratch with the byte tokenizer")
    g.add_argument("--ref", help="a different checkpoint folder for the frozen reference (default: --init)")
    g.add_argument("--init-value", help="a different folder for the value model, e.g. OUT/value of an earlier run")
    g.add_argument("--value-lora", type=int, metavar="R", help="train the value model's linear layers as rank-R "
                   "LoRA (α = R) plus its head, the rest frozen (paper, 7B: 64); value/ is exported merged")
    g.add_argument("--n-layer", type=int, help="built-in model: blocks (default 4)")
    g.add_argument("--d-model", type=int, help="built-in model: width (default 96)")
    g.add_argument("--n-head", type=int, help="built-in model: attention heads (default 4)")

    g = p.add_argument_group("method")
    g.add_argument("--loss", default="oreo", choices=["oreo", "sft", "rs", "dpo", "kto"],
                   help="oreo; sft: NLL on all responses; rs: NLL on reward-1 responses; dpo: (correct, wrong) "
                   "pairs of a prompt; kto: reward-1 desirable, others undesirable")
    g.add_argument("--variant", choices=["token", "step", "response"],
                   help="OREO policy loss granularity (default token)")
    g.add_argument("--beta", type=float, help="KL-regularisation β (default: oreo 0.03, dpo/kto 0.1)")
    g.add_argument("--alpha", type=float, help="OREO KL weight α (default: token 0.01, step 0.1, response 0.3)")
    g.add_argument("--kl", choices=["full", "k3", "none"], help="OREO KL term: full-vocabulary (default), "
                   "sampled-token k3 estimator, or none")
    g.add_argument("--nll-mean", choices=["sequence", "token"], help="sft/rs loss: mean over each sequence's tokens, "
                   "then over sequences (default; independent of the micro-batch size), or the official token mean "
                   "over the micro-batch")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, help="policy peak learning rate (default with --init, the paper's: oreo 5e-6, "
                   "sft 2e-5, rs 5e-6, dpo 5e-7, kto 5e-8; built-in model 1e-3)")
    g.add_argument("--value-lr", type=float, help="value peak learning rate (default: as --lr; 1e-4 with --value-lora)")
    g.add_argument("--batch-size", type=int, help="global batch in sequences, pairs for dpo "
                   "(default 128 with --init, 32 built-in)")
    g.add_argument("--micro-batch-size", type=int, help="sequences per forward per process (default: up to 4 with "
                   "--init, 32 built-in, the largest that divides batch / processes); gradient accumulation = batch "
                   "/ (micro-batch × processes)")
    g.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    g.add_argument("--max-steps", type=int, help="optimizer steps (instead of --epochs)")
    g.add_argument("--warmup", type=float, default=0.03, help="fraction of steps of linear warm-up before the cosine")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm per model (0 = off)")

    g = p.add_argument_group("system")
    g.add_argument("--out", help="output folder: ckpt.pt, log.jsonl, policy/, value/ (default out/<loss>)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (0 = only at the end)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt exactly (any world size)")
    g.add_argument("--fsdp", action="store_true", help="shard the three models with FSDP2 (needs torchrun)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile the models")
    args = p.parse_args(argv)

    def reject(msg):
        raise data.UserError(msg)

    builtin = args.init is None
    if args.loss != "oreo":
        for name in ("variant", "alpha", "kl", "value_lr", "init_value", "value_lora"):
            if getattr(args, name) is not None:
                reject(f"--{name.replace('_', '-')} only applies to --loss oreo, not --loss {args.loss}")
    if args.loss in ("sft", "rs"):
        for name in ("beta", "ref"):
            if getattr(args, name) is not None:
                reject(f"--{name} needs a reference model; --loss {args.loss} has none")
    elif args.nll_mean is not None:
        reject(f"--nll-mean only applies to --loss sft and rs, not --loss {args.loss}")
    if args.step_start != "ours" and args.variant != "step":
        reject("--step-start only applies to --variant step")
    if not builtin:
        for name in ("n_layer", "d_model", "n_head"):
            if getattr(args, name) is not None:
                reject(f"--{name.replace('_', '-')} sets the built-in model; it conflicts with --init {args.init}")
    elif args.ref or args.init_value:
        reject("--ref and --init-value need --init (the built-in model starts from one random initialisation)")
    if args.epochs is not None and args.max_steps is not None:
        reject("give --epochs or --max-steps, not both")
    for name in ("max_len", "batch_size", "micro_batch_size", "max_steps", "builtin_problems", "value_lora"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            reject(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.save_every < 0:
        reject(f"--save-every must be >= 0, got {args.save_every}")

    args.variant = args.variant or "token"
    args.beta = args.beta if args.beta is not None else DEFAULT_BETA.get(args.loss)
    args.alpha = args.alpha if args.alpha is not None else DEFAULT_ALPHA[args.variant]
    args.kl = args.kl or ("full" if args.loss == "oreo" else "none")
    args.nll_mean = args.nll_mean or "sequence"
    args.lr = args.lr or (BUILTIN_LR if builtin else PAPER_LR[args.loss])
    args.value_lr = args.value_lr or (PAPER_LORA_VALUE_LR if args.value_lora and not builtin else args.lr)
    args.batch_size = args.batch_size or (32 if builtin else 128)
    args.micro_batch_size = micro_batch_size(args.batch_size, args.micro_batch_size, 32 if builtin else 4,
                                             int(os.environ.get("WORLD_SIZE", 1)))
    args.epochs = args.epochs if args.epochs is not None else 1.0
    args.n_layer, args.d_model, args.n_head = args.n_layer or 4, args.d_model or 96, args.n_head or 4
    args.out = args.out or os.path.join("out", args.loss)
    return args


def micro_batch_size(batch, micro, default_micro, world_size):
    """The micro-batch per process for a global batch of `batch` on world_size processes. Without --micro-batch-size
    it follows the world size: the largest divisor of batch / world_size up to default_micro, so the same command is
    the same computation on 1, 2 or 8 processes. An impossible explicit choice is refused with what would work."""
    if batch % world_size:
        lower = batch // world_size * world_size
        raise data.UserError(f"--batch-size {batch} cannot be shared by {world_size} processes: use a multiple of "
                             f"{world_size}, e.g. --batch-size {lower or world_size}" +
                             (f" or {lower + world_size}" if lower else ""))
    per_rank = batch // world_size
    divisors = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
    if micro is None:
        return max(d for d in divisors if d <= default_micro)
    if per_rank % micro:
        fits = [d for d in divisors if d <= micro]
        step = micro * world_size
        larger = (batch // step + 1) * step
        raise data.UserError(f"--batch-size {batch} is not a multiple of --micro-batch-size {micro} × {world_size} "
                             f"process(es) = {step}: use --micro-batch-size {fits[-1]} (or another divisor of "
                             f"{per_rank}), or --batch-size {larger}" +
                             (f" or {larger - step}" if larger > step else ""))
    return micro


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
# Checkpoints: one file, written to a temporary name and renamed, so a kill mid-write keeps the previous one

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # unsharded, on CPU (under FSDP: rank 0 only)


def save_checkpoint(path, state):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one


def rng_state(device):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def export(model, cls, folder, tokenizer, fsdp, master, lora_rank=None):
    """save_pretrained an unwrapped, unsharded copy (for search.py and transformers). A LoRA value model is saved
    merged (W + (α/r)·BA, in place: export comes last), so value/ is a normal folder."""
    if fsdp:
        state = get_model_state_dict(model, options=FULL)  # a collective: every rank takes part
        if not master:
            return
        config = model.config if cls is Transformer else model.backbone.config
        with torch.device("meta"):  # no random initialisation, no second copy of the weights
            model = cls(config)
            if lora_rank:
                add_lora(model.backbone, lora_rank)
        model.load_state_dict(state, assign=True)
    if master:
        if lora_rank:
            merge_lora(model)
        model.save_pretrained(folder, tokenizer=tokenizer)


# Options that change the result: a resumed run must use the same ones as the run that wrote the checkpoint.
RESUME_MUST_MATCH = ("data", "delimiters", "step_start", "max_len", "builtin_problems", "init", "ref", "init_value",
                     "value_lora", "n_layer", "d_model", "n_head", "loss", "variant", "beta", "alpha", "kl", "nll_mean",
                     "lr", "value_lr", "batch_size", "epochs", "max_steps", "warmup", "grad_clip", "seed")


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
    `scale` (1 / accumulation steps) and accumulate. Returns detached (policy loss, value loss, KL, mean V), zero
    where the loss has no such term. fused: log-probs and KL by the fused-linear form (default: on CUDA, where the
    Bellman losses also run in the Triton kernel; policy_logprobs says what the other path does).
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
        return policy_loss.detach(), value_loss.detach(), kl.detach(), masked_mean(values.detach(), mask)
    if args.loss in ("sft", "rs"):
        loss = nll_loss(logp, mask, args.nll_mean)
    elif args.loss == "dpo":
        loss = dpo_loss(logp, ref_logp, mask, args.beta)
    else:
        loss = kto_loss(logp, ref_logp, mask, rewards, args.beta)
    (loss * scale).backward()
    return loss.detach(), zero, zero, zero


def main(argv=None):
    args = parse_args(argv)

    # --- distributed set-up, nanoGPT style: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world_size = 0, 0, 1
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    else:
        device = torch.device("cuda" if use_cuda else "cpu")
    if args.fsdp and not ddp:
        raise data.UserError("--fsdp shards over processes: launch with torchrun (e.g. --nproc_per_node=8)")
    master = rank == 0
    micro = args.micro_batch_size  # parse_args fitted it to the world size (micro_batch_size)
    grad_accum = args.batch_size // world_size // micro
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_cuda else contextlib.nullcontext()
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    with data.as_user_error():
        tokenizer = data.Tokenizer.from_pretrained(args.init) if args.init else data.Tokenizer.byte_level()
    examples, n_truncated = load_examples(args, tokenizer)
    policy, reference, value = build_models(args, tokenizer, device)
    torch.manual_seed(args.seed + rank)  # from here on, each rank draws its own random numbers
    # Unwrapped and uncompiled (fully_shard works in place, so under FSDP these are the sharded modules):
    # checkpoints and export read them.
    raw_policy, raw_value = policy, value
    for m in (policy, value and value.backbone):
        if m is not None and args.grad_checkpointing:
            m.set_gradient_checkpointing(True)
    if args.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # On GPU, gather bf16 weights (half the traffic; autocast would cast them anyway), reduce gradients in fp32.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if use_cuda else None, reduce_dtype=torch.float32)
        for m, blocks in ((policy, policy.layers), (reference, reference and reference.layers),
                          (value, value and value.backbone.layers)):
            if m is not None:
                for block in blocks:
                    fully_shard(block, mp_policy=mp)
                fully_shard(m, mp_policy=mp)
    if args.compile:
        policy, reference, value = (m and torch.compile(m) for m in (policy, reference, value))
    if ddp and not args.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        device_ids = [local_rank] if use_cuda else None
        policy = DDP(policy, device_ids=device_ids)
        value = value and DDP(value, device_ids=device_ids)
    trained = [(policy, raw_policy, args.lr)] + ([(value, raw_value, args.value_lr)] if value is not None else [])
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                                    weight_decay=0.0,
                                    fused=use_cuda and not args.fsdp) for m, _, lr in trained]

    sampler = data.Sampler(len(examples), args.batch_size, args.seed, rank=rank, world_size=world_size)
    steps_per_epoch = len(examples) // args.batch_size
    if steps_per_epoch == 0:
        raise data.UserError(f"{len(examples)} training examples, fewer than --batch-size {args.batch_size}")
    total_steps = args.max_steps or max(1, int(args.epochs * steps_per_epoch))

    # --- resume: models, optimizers, data position, every rank's random state, and the step (the schedule's state)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    log_path = os.path.join(args.out, "log.jsonl")
    start_step, last_saved = 0, None
    if args.resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)  # no full copy per rank
        changed = [k for k in RESUME_MUST_MATCH if ckpt["args"].get(k) != getattr(args, k)]
        if changed:
            raise data.UserError(f"--resume: {ckpt_path} was written with different " + ", ".join(
                f"--{k.replace('_', '-')} ({ckpt['args'].get(k)!r} there, {getattr(args, k)!r} now)" for k in changed))
        for (_, raw, _), opt, name in zip(trained, optimizers, ("policy", "value")):
            set_model_state_dict(raw, ckpt[name], options=StateDictOptions(full_state_dict=True))
            set_optimizer_state_dict(raw, opt, ckpt[name + "_optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        sampler.load_state_dict(ckpt["sampler"])
        if len(ckpt["rng"]) == world_size:
            set_rng_state(ckpt["rng"][rank], device)
        elif master:  # nothing in training draws random numbers today; the data order lives in the Sampler
            print(f"resume: {len(ckpt['rng'])} ranks wrote {ckpt_path}, {world_size} now: fresh per-rank RNG seeds")
        start_step = last_saved = ckpt["step"]
        if master:
            print(f"resumed from {ckpt_path} at step {start_step}")
            if os.path.exists(log_path):  # forget the steps after the checkpoint: they are about to be redone
                with open(log_path) as f:
                    rows = [line for line in f if line.endswith("}\n") and json.loads(line)["step"] <= start_step]
                with open(log_path, "w") as f:
                    f.writelines(rows)
        del ckpt
    elif master:
        if args.resume:
            print(f"--resume: no {ckpt_path} yet, starting from step 0")
        if os.path.exists(log_path):
            os.remove(log_path)  # a fresh run starts a fresh log

    def checkpoint(step):
        state = {"step": step, "args": vars(args), "world_size": world_size, "sampler": sampler.state_dict(),
                 "config": raw_policy.config.to_hf()}
        for (_, raw, _), opt, name in zip(trained, optimizers, ("policy", "value")):
            state[name] = get_model_state_dict(raw, options=FULL)
            state[name + "_optimizer"] = get_optimizer_state_dict(raw, opt, options=FULL)
        rngs = [None] * world_size
        if ddp:
            dist.all_gather_object(rngs, rng_state(device))
        else:
            rngs = [rng_state(device)]
        state["rng"] = rngs
        if master:
            save_checkpoint(ckpt_path, state)
        if ddp:
            dist.barrier()

    n_params = sum(p.numel() for p in raw_policy.parameters())
    if master:
        print(f"{len(examples)} examples ({n_truncated} cut at --max-len {args.max_len}) | {n_params / 1e6:.2f}M "
              f"params | {world_size} process(es) on {device.type} | batch {args.batch_size} = {micro} × "
              f"{grad_accum} accumulation × {world_size} | {total_steps} steps")
        print("settings: " + settings_line(args, raw_value), flush=True)

    def to_device(batch):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    batches = iter(sampler)
    t_start, flops_peak = time.perf_counter(), peak_flops(device)
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        for opt, (_, _, peak) in zip(optimizers, trained):
            for group in opt.param_groups:
                group["lr"] = get_lr(step, total_steps, peak, args.warmup)
        indices = next(batches)  # this rank's share of the global batch
        # summed over micro-batches: policy loss, value loss, KL, mean V, mean R, real tokens, padded length
        stats = torch.zeros(7, device=device)
        for micro_step in range(grad_accum):
            chunk = [examples[i] for i in indices[micro_step * micro:(micro_step + 1) * micro]]
            if args.loss == "dpo":
                chunk = [c for c, _ in chunk] + [r for _, r in chunk]  # chosen rows first, then rejected
            batch = to_device(data.collate(chunk, tokenizer.pad_id))
            last = micro_step == grad_accum - 1
            # Gradients are all-reduced only after the last micro-step; set before its forward (nanoGPT).
            for m, _, _ in trained:
                if args.fsdp:
                    m.set_requires_gradient_sync(last)
                elif ddp:
                    m.require_backward_grad_sync = last
            stats[:4] += torch.stack(forward_backward(policy, reference, value, batch, args, autocast,
                                                      1 / grad_accum))
            stats[4] += batch["rewards"].mean()
            stats[5] += sum(len(e.ids) for e in chunk)
            stats[6] += batch["input_ids"].shape[1]
        # Logged numbers are global: losses and means averaged over ranks, tokens summed.
        if ddp:
            dist.all_reduce(stats)
        stats[:5] /= grad_accum * world_size
        stats[6] /= grad_accum * world_size
        policy_loss, value_loss, kl, mean_value, mean_reward, tokens, seq_len = stats.tolist()
        grad_norms = []
        for m, _, _ in trained:
            norm = torch.nn.utils.clip_grad_norm_(m.parameters(), args.grad_clip or float("inf"))
            grad_norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        # A NaN/inf stops the run before any optimizer step, so the last checkpoint stays the last good state.
        checks = [("policy loss", policy_loss), ("value loss", value_loss), ("KL", kl)] + [
            (f"{name} gradient norm", norm) for name, norm in zip(("policy", "value"), grad_norms)]
        bad = [f"{name} {x}" for name, x in checks if not math.isfinite(x)]
        if bad:
            msg = (f"step {step + 1}: non-finite {', '.join(bad)}; stopped before the optimizer step. "
                   + (f"The last good checkpoint is {ckpt_path} (step {last_saved}); resume from it with a lower "
                      "--lr/--value-lr, or check the data." if last_saved is not None else
                      "No checkpoint was written yet; lower --lr/--value-lr or check the data."))
            if ddp:
                dist.destroy_process_group()
            raise data.UserError(msg)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total_steps:
            checkpoint(step + 1)
            last_saved = step + 1

        if master:
            done = step + 1 - start_step
            eta = (time.perf_counter() - t_start) / done * (total_steps - step - 1)
            row = {"step": step + 1, "policy_loss": policy_loss, "value_loss": value_loss, "kl": kl,
                   "mean_value": mean_value, "mean_reward": mean_reward, "lr": optimizers[0].param_groups[0]["lr"],
                   "grad_norm_policy": grad_norms[0], "grad_norm_value": grad_norms[1] if value is not None else None,
                   "tokens_per_s": tokens / dt, "eta_s": eta}
            name = "policy" if value is not None else args.loss
            line = (f"step {step + 1}/{total_steps} | {name} {policy_loss:.4f}" +
                    (f" value {value_loss:.4f} KL {kl:.4f} | V {mean_value:+.3f}" if value is not None else "") +
                    f" R {mean_reward:.3f} | lr {row['lr']:.2e} | grad norm {grad_norms[0]:.3f}" +
                    (f" / {grad_norms[1]:.3f}" if value is not None else "") + f" | {tokens / dt:,.0f} tok/s")
            if flops_peak:
                mfu = flops_per_token(raw_policy.config, n_params, seq_len, args.loss) * tokens / dt / (
                    flops_peak * world_size)
                row["mfu"] = mfu
                line += f" | MFU {100 * mfu:.1f}%"
            print(line + f" | ETA {fmt_time(eta)}", flush=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    if last_saved != total_steps:
        checkpoint(total_steps)
    export(raw_policy, Transformer, os.path.join(args.out, "policy"), tokenizer, args.fsdp, master)
    if value is not None:
        export(raw_value, ValueModel, os.path.join(args.out, "value"), tokenizer, args.fsdp, master, args.value_lora)
    if master:
        print(f"saved {ckpt_path}, {args.out}/policy" + (f", {args.out}/value" if value is not None else ""))
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    data.cli("oreo.py", main)
