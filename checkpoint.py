"""
The trainer's checkpoints: one file, OUT/ckpt.pt, with the models, the optimizers, the data position, every rank's
random state and the step, written atomically (files.write_atomic: a kill mid-write keeps the previous one) and
resumed exactly on any world size; and the export of the trained models as Hugging Face folders. Checkpoints hold
the unwrapped, uncompiled models. Imports data, files and model; oreo.py calls it.
"""
import json
import os

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

import data
from files import write_atomic
from model import Transformer, add_lora, merge_lora

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # unsharded, on CPU (under FSDP: rank 0 only)

# Options that change the result: a resumed run must use the same ones as the run that wrote the checkpoint.
RESUME_MUST_MATCH = ("data", "delimiters", "step_start", "max_len", "builtin_problems", "init", "ref", "init_value",
                     "value_lora", "n_layer", "d_model", "n_head", "loss", "variant", "beta", "alpha", "kl", "nll_mean",
                     "lr", "value_lr", "batch_size", "epochs", "max_steps", "warmup", "grad_clip", "seed")


def save_checkpoint(path, state):
    write_atomic(path, lambda f: torch.save(state, f), binary=True)


def rng_state(device):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def save(path, step, args, run, trained, sampler):
    """Write the checkpoint of `step`: a collective, every rank takes part (run: oreo.Run, trained: oreo.Trained)."""
    state = {"step": step, "args": vars(args), "world_size": run.world_size, "sampler": sampler.state_dict(),
             "config": trained[0].raw.config.to_hf()}
    for t in trained:
        state[t.name] = get_model_state_dict(t.raw, options=FULL)
        state[t.name + "_optimizer"] = get_optimizer_state_dict(t.raw, t.optimizer, options=FULL)
    rngs = [None] * run.world_size
    if run.ddp:
        dist.all_gather_object(rngs, rng_state(run.device))
    else:
        rngs = [rng_state(run.device)]
    state["rng"] = rngs
    if run.master:
        save_checkpoint(path, state)
    if run.ddp:
        dist.barrier()


def resume(path, log_path, args, run, trained, sampler):
    """With --resume and a checkpoint at path: load models, optimizers, data position and every rank's random
    state, cut the log after its step (those steps are about to be redone), and return the step. Otherwise a fresh
    run: the log is removed, and None is returned."""
    if not (args.resume and os.path.exists(path)):
        if run.master:
            if args.resume:
                print(f"--resume: no {path} yet, starting from step 0")
            if os.path.exists(log_path):
                os.remove(log_path)  # a fresh run starts a fresh log
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # no full copy per rank
    changed = [k for k in RESUME_MUST_MATCH if ckpt["args"].get(k) != getattr(args, k)]
    if changed:
        raise data.UserError(f"--resume: {path} was written with different " + ", ".join(
            f"--{k.replace('_', '-')} ({ckpt['args'].get(k)!r} there, {getattr(args, k)!r} now)" for k in changed))
    for t in trained:
        set_model_state_dict(t.raw, ckpt[t.name], options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(t.raw, t.optimizer, ckpt[t.name + "_optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    sampler.load_state_dict(ckpt["sampler"])
    if len(ckpt["rng"]) == run.world_size:
        set_rng_state(ckpt["rng"][run.rank], run.device)
    elif run.master:  # nothing in training draws random numbers today; the data order lives in the Sampler
        print(f"resume: {len(ckpt['rng'])} ranks wrote {path}, {run.world_size} now: fresh per-rank RNG seeds")
    step = ckpt["step"]
    if run.master:
        print(f"resumed from {path} at step {step}")
        if os.path.exists(log_path):  # forget the steps after the checkpoint: they are about to be redone
            with open(log_path) as f:
                rows = [line for line in f if line.endswith("}\n") and json.loads(line)["step"] <= step]
            with open(log_path, "w") as f:
                f.writelines(rows)
    return step


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
