"""
The trainer's command line (oreo.py): the flags, grouped, with their help; the checks that refuse combinations that
make no sense; and the defaults that depend on other flags (the paper's β, α and learning rates per loss, the
built-in model's sizes). Imports data (UserError, the step delimiters); oreo.py calls parse_args.
"""
import os

import data

# The paper's β, α and learning rates per loss and variant (DESIGN.md §1 and the paper's appendix A.3, for
# Qwen2.5-Math-1.5B: SFT 2e-5, RS 5e-6, DPO 5e-7, KTO 5e-8, OREO 5e-6; a LoRA critic at 1e-4 for 7B). Flags override.
DEFAULT_BETA = {"oreo": 0.03, "dpo": 0.1, "kto": 0.1}
DEFAULT_ALPHA = {"token": 0.01, "step": 0.1, "response": 0.3}
PAPER_LR = {"oreo": 5e-6, "sft": 2e-5, "rs": 5e-6, "dpo": 5e-7, "kto": 5e-8}
PAPER_LORA_VALUE_LR = 1e-4
BUILTIN_LR = 1e-3  # the tiny built-in model learns from scratch


def parse_args(argv=None):
    p = data.ArgumentParser(description="OREO and its baselines (SFT, RS, DPO, KTO) on offline trajectories.",
                            allow_abbrev=False)
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
    g.add_argument("--group-by-length", action="store_true",
                   help="batch examples of similar length together (less padding; batches stay in random order)")
    g.add_argument("--builtin-problems", type=int, default=data.BUILTIN_TRAIN_PROBLEMS,
                   help="built-in task (no --data): number of training problems, as data.py builtin --n-train")

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
    g.add_argument("--seed", type=int, default=0, help="seeds the initialisation, the data order and the built-in "
                   "task; each rank's random numbers are seeded with seed + rank")
    data.add_device_flags(g, dtype_help="the compute dtype (autocast); weights and optimizer states stay float32",
                          dtypes=("float32", "bfloat16"))
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
