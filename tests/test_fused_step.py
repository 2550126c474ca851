"""
The trainer's fused micro-step (oreo.forward_backward: fused-linear log-probs and KL from the last hidden states,
never the (B, L, V) logits) against a materialised step written out here the plain way (full logits, fp32
log_softmax, gather, F.kl_div over the vocabulary, oreo.oreo_loss): every gradient of the policy and the value
model must agree, for the token, step and response variants and for SFT/DPO/KTO, with tied and untied embeddings,
in one process and sharded by FSDP2 over 2 CPU processes (gloo; this file is also the torchrun worker).
"""
import argparse
import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels.linear  # noqa: E402
import oreo  # noqa: E402
from model import Config, Transformer, ValueModel  # noqa: E402
from tests.launch import ROOT, launch  # noqa: E402

VARIANTS = ["token", "step", "response"]
LOSSES = ["sft", "dpo", "kto"]
TOL = dict(rtol=1e-4, atol=1e-6)


def tiny_models(tied, seed=0, vocab_size=67):
    """Policy, a reference that differs from it (so that the KL and its gradient are not 0), and a value model
    with a random head (a zero head would leave its backbone without gradient)."""
    torch.manual_seed(seed)
    config = Config(model_type="llama", vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=1, d_model=16, d_ff=40,
                    max_seq_len=64, tie_embeddings=tied)
    policy = Transformer(config)
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference.requires_grad_(False).eval()
    value = ValueModel(None, copy.deepcopy(policy))
    with torch.no_grad():
        value.head.weight.normal_(std=0.5)
    return policy, reference, value


def random_batch(B, L, V, seed):
    """Right-padded rows: a prompt (mask 0), then actions, some rows padded; step starts among the actions."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (B, L), generator=g)
    mask = torch.zeros(B, L - 1)
    step_start = torch.zeros(B, L - 1, dtype=torch.bool)
    for b in range(B):
        prompt, end = 2 + b % 3, L - 1 - 2 * (b % 2)
        mask[b, prompt:end] = 1
        step_start[b, prompt] = True
        step_start[b, prompt:end] |= torch.rand(end - prompt, generator=g) < 0.3
    rewards = (torch.rand(B, generator=g) < 0.5).float()
    rewards[0] = 1.0
    return {"input_ids": input_ids, "mask": mask, "step_start": step_start, "rewards": rewards}


def materialised_step(policy, reference, value, batch, args):
    """The plain micro-step: (B, L, V) logits for policy and reference, as an official-style trainer computes it."""
    ids, mask, rewards = batch["input_ids"], batch["mask"], batch["rewards"]
    labels = ids[:, 1:, None]
    log_probs = policy(ids)[:, :-1].float().log_softmax(-1)  # (B, L-1, V)
    logp = log_probs.gather(-1, labels).squeeze(-1)
    if reference is not None:
        with torch.no_grad():
            ref_log_probs = reference(ids)[:, :-1].float().log_softmax(-1)
        ref_logp = ref_log_probs.gather(-1, labels).squeeze(-1)
    if args.loss == "oreo":
        values = value(ids)[:, :-1]
        policy_loss, value_loss = oreo.oreo_loss(logp, ref_logp, values, rewards, mask, args.beta, args.variant,
                                                 batch["step_start"])
        kl = F.kl_div(ref_log_probs, log_probs, reduction="none", log_target=True).sum(-1)  # KL[π ‖ π_ref]
        loss = policy_loss + value_loss + args.alpha * oreo.masked_mean(kl, mask)
    elif args.loss == "sft":
        loss = oreo.nll_loss(logp, mask)
    elif args.loss == "dpo":
        loss = oreo.dpo_loss(logp, ref_logp, mask, args.beta)
    else:
        loss = oreo.kto_loss(logp, ref_logp, mask, rewards, args.beta)
    loss.backward()


def train_args(loss, variant="token"):
    argv = ["--loss", loss] + (["--variant", variant] if loss == "oreo" else [])
    return oreo.parse_args(argv)


def grads(models):
    """name -> full gradient (FSDP2 gradients are DTensor shards: gathered here)."""
    out = {}
    for tag, m in models.items():
        for name, p in m.named_parameters():
            if p.requires_grad:
                g = p.grad
                out[f"{tag}.{name}"] = g.full_tensor() if hasattr(g, "full_tensor") else g
    return out


def assert_same_grads(got, want, what, tol=TOL):
    assert got.keys() == want.keys(), f"{what}: parameters {sorted(set(got) ^ set(want))} differ"
    for name in want:
        assert got[name] is not None and want[name] is not None, f"{what}: {name} got no gradient"
        torch.testing.assert_close(got[name], want[name], **tol, msg=lambda m: f"{what}: {name}: {m}")
    assert any(want[n].abs().max() > 0 for n in want if n.startswith("policy.layers")), f"{what}: zero gradients"


def cases():
    return [(tied, "oreo", v) for tied in (True, False) for v in VARIANTS] + [(True, loss, "token") for loss in LOSSES]


def models_for(loss, tied):
    policy, reference, value = tiny_models(tied)
    return policy, (None if loss == "sft" else reference), (value if loss == "oreo" else None)


def trained(policy, value):
    return {"policy": policy, **({"value": value} if value is not None else {})}


# ---------------------------------------------------------------------------------------------------- one process

def test_fused_and_materialised_steps_give_the_same_gradients_for_every_variant_and_loss(monkeypatch):
    monkeypatch.setattr(kernels.linear, "default_chunk_size", lambda V, device: 5)  # several chunks, ragged tail
    for tied, loss, variant in cases():
        args = train_args(loss, variant)
        batch = random_batch(4, 13, 67, seed=len(variant) + tied)
        want_models = models_for(loss, tied)
        materialised_step(*want_models, batch, args)
        want = grads(trained(want_models[0], want_models[2]))
        for fused in (True, False):
            policy, reference, value = models_for(loss, tied)
            oreo.forward_backward(policy, reference, value, batch, args, torch.autocast("cpu", enabled=False), 1.0,
                                  fused=fused)
            path = "fused-linear" if fused else "materialised chunked"
            assert_same_grads(grads(trained(policy, value)), want, f"{path} {loss} {variant} tied={tied}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton)")
def test_gpu_fused_step_with_triton_kernels_gives_the_materialised_gradients():
    # the CUDA path itself: Triton fused-linear log-probs and KL, the Triton Bellman kernel (fp32, no autocast)
    for variant in VARIANTS:
        args = train_args("oreo", variant)
        batch = {k: v.cuda() for k, v in random_batch(4, 300, 5003, seed=len(variant)).items()}
        want_models = [m.cuda() for m in tiny_models(True, vocab_size=5003)]
        materialised_step(*want_models, batch, args)
        policy, reference, value = (m.cuda() for m in tiny_models(True, vocab_size=5003))
        oreo.forward_backward(policy, reference, value, batch, args, torch.autocast("cuda", enabled=False), 1.0)
        assert_same_grads(grads(trained(policy, value)), grads(trained(want_models[0], want_models[2])),
                          f"CUDA fused {variant}", tol=dict(rtol=1e-3, atol=1e-5))  # GPU sums in other orders


# ---------------------------------------------------------------------------------------------------- two processes

def test_fused_step_under_fsdp_on_two_processes_gives_the_materialised_gradients():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    p = launch(__file__, ["--worker"], nproc=2, env=env, timeout=300)
    assert p.returncode == 0, f"FSDP worker failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    assert p.stdout.count("ok ") == 2 * len(cases()), p.stdout[-3000:]


def worker():
    """Each rank: its own half of a batch, FSDP2-sharded models (as oreo.main shards them), the fused step; then
    the gradients, gathered, against the materialised step's averaged over both halves on unsharded copies."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    kernels.linear.default_chunk_size = lambda V, device: 5
    for tied, loss, variant in cases():
        args = train_args(loss, variant)
        halves = [random_batch(3, 11, 67, seed=10 * r + len(variant) + tied) for r in range(world)]
        want = {}
        for half in halves:  # FSDP averages the ranks' gradients
            ref_models = models_for(loss, tied)
            materialised_step(*ref_models, half, args)
            for name, g in grads(trained(ref_models[0], ref_models[2])).items():
                want[name] = want.get(name, 0) + g / world
        policy, reference, value = models_for(loss, tied)
        for m, blocks in ((policy, policy.layers), (reference, reference and reference.layers),
                          (value, value and value.backbone.layers)):
            if m is not None:
                for block in blocks:
                    fully_shard(block)
                fully_shard(m)
        oreo.forward_backward(policy, reference, value, halves[rank], args, torch.autocast("cpu", enabled=False),
                              1.0, fused=True)
        assert_same_grads(grads(trained(policy, value)), want, f"FSDP fused {loss} {variant} tied={tied}")
        print(f"ok rank {rank}: {loss} {variant} tied={tied}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    if parser.parse_args().worker:
        worker()
