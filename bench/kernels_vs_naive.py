"""
Benchmark: the naive PyTorch loss against the fused kernels (DESIGN.md §3).

    python bench/kernels_vs_naive.py                   # GPU: N ∈ {4096, 8192, 16384} × V ∈ {32000, 128256, 151936}
    python bench/kernels_vs_naive.py --out bench.json  # also write every measurement as JSON
    python bench/kernels_vs_naive.py --cpu             # CPU (the default without a GPU): small shapes

Operations, each forward, backward and both ("full"), from bf16 logits (N, V) that require grad:
    loss    per-token log-probs + OREO's token-level Bellman losses (policy + value), T = 2048 tokens per row;
            naive: log_softmax in fp32, gather, oreo.oreo_loss; fused: token_logprobs(inplace_backward=True)
            + bellman_loss. Floor: 6·N·V bytes (read the logits twice, write the gradient once).
    kl      full-vocabulary KL[π ‖ π_ref] per token, summed; naive: two fp32 log_softmaxes; fused: token_kl.
            Floor: 10·N·V bytes (read both rows twice, write the gradient once).
    loss_kl OREO's whole policy-side loss: loss + α·mean KL; fused: token_logprobs_and_kl(inplace_backward=True)
            + bellman_loss. Floor: 10·N·V bytes.
    linear  (GPU only) logp from bf16 hidden (N, 1536) and an lm_head (V, 1536): naive materialises the logits,
            fused is linear_logprobs; its peak memory should stay flat in N.
    train   what oreo.forward_backward computes on the vocabulary side, from the last hidden states (N, D) of policy
            and reference (D = 1536 on a GPU, 576 on a CPU) and their lm_heads (bf16 on a GPU, fp32 on a CPU, as in
            the trainer): log-probs + full KL + Bellman losses.
            naive: both logits materialised, fp32 log_softmaxes, gather, the KL, oreo_loss; materialised: the
            logits, then token_logprobs_and_kl(inplace_backward=True) (the trainer's CPU path); fused:
            linear_logprobs with the reference (the trainer's CUDA path). The Bellman loss is the Triton kernel on
            a GPU and oreo.oreo_loss on a CPU, as in the trainer.
On the GPU times are medians of triton.testing.do_bench, "vs floor" is the full time over the floor's bytes
moved at the measured device-to-device copy bandwidth, and memory is the peak allocated beyond the inputs. On the
CPU times are medians of a few runs of the chunked PyTorch path, and peak memory is the growth of the resident
set during one forward+backward (what the naive loss allocates at once is what the chunked path avoids).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import peak_rss_growth  # noqa: E402
from kernels import bellman_loss, linear_logprobs, token_kl, token_logprobs, token_logprobs_and_kl  # noqa: E402
from kernels.reference import naive_linear_logprobs, naive_token_kl, naive_token_logprobs  # noqa: E402
from oreo import oreo_loss  # noqa: E402

GPU_SHAPES = [(N, V) for N in (4096, 8192, 16384) for V in (32000, 128256, 151936)]
CPU_SHAPES = [(512, 32000), (128, 151936), (1024, 49152)]
# bf16 bytes per logit moved by the fused kernels at best
FLOOR_BYTES_PER_ELEMENT = {"loss": 6, "kl": 10, "loss_kl": 10}
BETA = 0.03
ALPHA = 0.01


def make_inputs(op, N, V, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    if op in ("linear", "train"):
        D, dtype = (1536, torch.bfloat16) if device == "cuda" else (576, torch.float32)  # as the trainer's
        hidden = torch.randn(N, D, device=device, generator=g, dtype=dtype).requires_grad_()
        weight = torch.randn(V, D, device=device, generator=g, dtype=dtype).mul_(D**-0.5).requires_grad_()
        labels = torch.randint(0, V, (N,), device=device, generator=g)
        inputs = dict(hidden=hidden, weight=weight, labels=labels)
        if op == "linear":
            return inputs
        inputs.update(ref_hidden=hidden.detach() + 0.1 * torch.randn(N, D, device=device, generator=g, dtype=dtype),
                      ref_weight=weight.detach().clone())
    else:
        # made in bf16 and scaled in place: no fp32 temporary, so the CPU's resident-set baseline is just the inputs
        logits = torch.randn(N, V, device=device, generator=g, dtype=torch.bfloat16).mul_(2).requires_grad_()
        inputs = dict(logits=logits, labels=torch.randint(0, V, (N,), device=device, generator=g))
    if op in ("kl", "loss_kl"):
        inputs["ref_logits"] = torch.randn(N, V, device=device, generator=g, dtype=torch.bfloat16).mul_(2)
    if op in ("loss", "loss_kl", "train"):
        T = min(N, 2048)
        B = N // T
        inputs.update(ref_logp=-torch.rand(B, T, device=device, generator=g) * 5,
                      values=torch.randn(B, T, device=device, generator=g),
                      rewards=(torch.rand(B, device=device, generator=g) < 0.5).float(),
                      mask=(torch.rand(B, T, device=device, generator=g) < 0.8).float())
    return inputs


def bellman(logp, ref_logp, values, rewards, mask):
    """As the trainer: the Triton kernel on CUDA tensors, its specification oreo_loss elsewhere."""
    policy, value = (bellman_loss if logp.is_cuda else oreo_loss)(logp, ref_logp, values, rewards, mask, BETA)
    return policy + value


def naive_loss(logits, labels, ref_logp, values, rewards, mask):
    logp = naive_token_logprobs(logits, labels).view_as(ref_logp)  # (B, T)
    policy, value = oreo_loss(logp, ref_logp, values, rewards, mask, BETA)
    return policy + value


def fused_loss(logits, labels, ref_logp, values, rewards, mask):
    logp = token_logprobs(logits, labels, inplace_backward=True).view_as(ref_logp)  # (B, T)
    return bellman(logp, ref_logp, values, rewards, mask)


def naive_loss_kl(logits, labels, ref_logits, ref_logp, values, rewards, mask):
    kl = naive_token_kl(logits, ref_logits)
    return naive_loss(logits, labels, ref_logp, values, rewards, mask) + ALPHA * kl.mean()


def fused_loss_kl(logits, labels, ref_logits, ref_logp, values, rewards, mask):
    logp, kl = token_logprobs_and_kl(logits, ref_logits, labels, inplace_backward=True)
    return bellman(logp.view_as(ref_logp), ref_logp, values, rewards, mask) + ALPHA * kl.mean()


def naive_kl(logits, labels, ref_logits):
    return naive_token_kl(logits, ref_logits).sum()


def fused_kl(logits, labels, ref_logits):
    return token_kl(logits, ref_logits).sum()


def naive_linear(hidden, weight, labels):
    return naive_linear_logprobs(hidden, weight, labels).sum()


def fused_linear(hidden, weight, labels):
    return linear_logprobs(hidden, weight, labels).sum()


def naive_train(hidden, weight, labels, ref_hidden, ref_weight, ref_logp, values, rewards, mask):
    logp, kl = naive_linear_logprobs(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight)
    policy, value = oreo_loss(logp.view_as(ref_logp), ref_logp, values, rewards, mask, BETA)
    return policy + value + ALPHA * kl.mean()


def materialised_train(hidden, weight, labels, ref_hidden, ref_weight, ref_logp, values, rewards, mask):
    logp, kl = token_logprobs_and_kl(hidden @ weight.t(), ref_hidden @ ref_weight.t(), labels, inplace_backward=True)
    return bellman(logp.view_as(ref_logp), ref_logp, values, rewards, mask) + ALPHA * kl.mean()


def fused_train(hidden, weight, labels, ref_hidden, ref_weight, ref_logp, values, rewards, mask):
    logp, kl = linear_logprobs(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight)
    return bellman(logp.view_as(ref_logp), ref_logp, values, rewards, mask) + ALPHA * kl.mean()


IMPLS = {
    "loss": {"naive": naive_loss, "fused": fused_loss},
    "kl": {"naive": naive_kl, "fused": fused_kl},
    "loss_kl": {"naive": naive_loss_kl, "fused": fused_loss_kl},
    "linear": {"naive": naive_linear, "fused": fused_linear},
    "train": {"naive": naive_train, "materialised": materialised_train, "fused": fused_train},
}


def leaves(inputs):
    return [x for x in inputs.values() if x.requires_grad]


# ---------------------------------------------------------------------------------------------------------- GPU

def copy_bandwidth():
    """Device-to-device copy bandwidth in bytes/s (each byte is read once and written once)."""
    from triton.testing import do_bench
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def bench_gpu(op, impl, fn, N, V, copy_bw):
    from triton.testing import do_bench
    inputs = make_inputs(op, N, V, "cuda")
    grads = leaves(inputs)
    row = dict(op=op, impl=impl, N=N, V=V, device=torch.cuda.get_device_name())
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(**inputs).backward()  # also the warm-up (and the compilation for torch.compile)
        torch.cuda.synchronize()
        row["peak_extra_GB"] = (torch.cuda.max_memory_allocated() - base) / 1e9
        for x in grads:
            x.grad = None
        row["fwd_ms"] = do_bench(lambda: fn(**inputs), return_mode="median")
        out = fn(**inputs)
        row["bwd_ms"] = do_bench(lambda: out.backward(retain_graph=True), grad_to_none=grads, return_mode="median")
        del out
        row["full_ms"] = do_bench(lambda: fn(**inputs).backward(), grad_to_none=grads, return_mode="median")
    except Exception as e:  # torch.compile or memory can fail on some shapes: report it, go on
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        return row
    if op in FLOOR_BYTES_PER_ELEMENT:
        floor = FLOOR_BYTES_PER_ELEMENT[op] * N * V
        row["GB_per_s"] = floor / (row["full_ms"] * 1e-3) / 1e9
        row["vs_floor"] = row["full_ms"] / (floor / copy_bw * 1e3)  # 1.0 = the floor at copy bandwidth
    return row


def run_gpu(shapes, ops, compile_naive):
    copy_bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}, measured copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    rows = []
    for op in ops:
        linear_shapes = [(N, 151936) for N in (4096, 8192, 16384)]
        for N, V in linear_shapes if op == "linear" else shapes:
            impls = dict(IMPLS[op])
            if compile_naive and op in FLOOR_BYTES_PER_ELEMENT:
                impls["naive+compile"] = torch.compile(impls["naive"])
            for impl, fn in impls.items():
                rows.append(bench_gpu(op, impl, fn, N, V, copy_bw))
                print_row(rows[-1])
                torch.cuda.empty_cache()
    return dict(device=torch.cuda.get_device_name(), copy_GB_per_s=copy_bw / 1e9, rows=rows)


# ---------------------------------------------------------------------------------------------------------- CPU

def median_seconds(fn, reps=3):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_cpu(shapes, ops):
    cases = [(op, N, V, impl) for op in ops if op != "linear" for N, V in shapes for impl in IMPLS[op]]
    rows = []
    for op, N, V, impl in cases:
        fn, inputs = IMPLS[op][impl], make_inputs(op, N, V, "cpu")
        rows.append(dict(op=op, impl=impl, N=N, V=V, device="cpu", fwd_ms=median_seconds(lambda: fn(**inputs)) * 1e3,
                         full_ms=median_seconds(lambda: full_step(fn, inputs)) * 1e3))
    # memory last: peak_rss_growth changes the allocator's settings, which would slow the timings above
    for row, (op, N, V, impl) in zip(rows, cases):
        inputs = make_inputs(op, N, V, "cpu")
        row["peak_extra_GB"] = peak_rss_growth(lambda: full_step(IMPLS[op][impl], inputs)) / 1e9
        print_row(row)
    for op, N, V, impl in cases:
        if impl == "fused":
            naive, fused = (next(r for r in rows if (r["op"], r["N"], r["V"], r["impl"]) == (op, N, V, k))
                            for k in ("naive", "fused"))
            ratio = naive["peak_extra_GB"] / max(fused["peak_extra_GB"], 1e-9)
            print(f"{op} N={N} V={V}: chunked path peak memory is 1/{ratio:.1f} of the naive one, "
                  f"time {fused['full_ms'] / naive['full_ms']:.2f}× the naive one")
    return dict(device="cpu", rows=rows)


def full_step(fn, inputs):
    fn(**inputs).backward()
    for x in leaves(inputs):
        x.grad = None


def print_row(r):
    if "error" in r:
        print(f"{r['op']:7} {r['impl']:14} N={r['N']:6} V={r['V']:6}  error: {r['error']}")
        return
    cols = [f"{r['op']:7} {r['impl']:14} N={r['N']:6} V={r['V']:6}", f"fwd {r['fwd_ms']:9.3f} ms"]
    if "bwd_ms" in r:
        cols.append(f"bwd {r['bwd_ms']:9.3f} ms")
    cols += [f"full {r['full_ms']:9.3f} ms", f"peak extra {r['peak_extra_GB']:7.3f} GB"]
    if "vs_floor" in r:
        cols.append(f"{r['GB_per_s']:6.0f} GB/s  {r['vs_floor']:.2f}× floor")
    print("  ".join(cols), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the measurements to this JSON file")
    parser.add_argument("--cpu", action="store_true", help="run the small CPU benchmark even if a GPU is present")
    parser.add_argument("--ops", help="comma-separated subset of loss,kl,loss_kl,linear,train (default: all on a "
                        "GPU, loss,loss_kl,train on the CPU)")
    parser.add_argument("--shapes", help="N×V pairs to run instead of the defaults, e.g. 8192x151936,4096x32000")
    parser.add_argument("--no-compile", action="store_true", help="skip the naive loss under torch.compile")
    args = parser.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")] if args.shapes else None
    if torch.cuda.is_available() and not args.cpu:
        ops = (args.ops or "loss,kl,loss_kl,linear,train").split(",")
        result = run_gpu(shapes or GPU_SHAPES, ops, compile_naive=not args.no_compile)
    else:
        result = run_cpu(shapes or CPU_SHAPES, (args.ops or "loss,loss_kl,train").split(","))
    result.update(torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
