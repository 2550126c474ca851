"""What the benchmarks share: the interleaved median timer, the random batch, optimizers and autocast of a timed
OREO step (bench/step_vs_official.py, bench/train_throughput.py), and the resident-set peak of a CPU run."""
import contextlib
import ctypes
import statistics
import time

import torch


def time_side_by_side(calls, iters, warmup=1, device="cpu"):
    """Median seconds per call of each function, after `warmup` rounds of them all. The calls are interleaved
    (one of each per round), so that every contender sees the same machine load."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for call in calls:
            call()
    sync()
    times = [[] for _ in calls]
    for _ in range(iters):
        for i, call in enumerate(calls):
            t0 = time.perf_counter()
            call()
            sync()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def random_batch(B, T, V, device):
    """A trainer batch (data.collate's keys) of random tokens: the first quarter of each row is the prompt, about
    one state in 20 a step start, half the rewards 1. Seeded: the same batch on every call."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B, T - 1)
    mask[:, : T // 4] = 0  # the first quarter is the prompt
    batch = {"input_ids": torch.randint(0, V, (B, T), generator=g), "mask": mask,
             "step_start": torch.rand(B, T - 1, generator=g) < 0.05,
             "rewards": (torch.rand(B, generator=g) < 0.5).float()}
    return {k: v.to(device) for k, v in batch.items()}


def adamw(models, cuda):
    """The trainer's optimizer for each model (AdamW 0.9/0.95, no weight decay; fused on CUDA). The learning rate
    is small and fixed: a step's speed does not depend on it."""
    return [torch.optim.AdamW(m.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.0, fused=cuda)
            for m in models]


def autocast(cuda):
    """The trainer's precision: bf16 autocast on CUDA, plain fp32 on a CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()


def _proc_status_bytes(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def peak_rss_growth(fn):
    """Peak resident-set growth (bytes) while fn runs; Linux only: /proc/self/clear_refs resets the high-water mark.
    Large CPU tensors are mmap'ed and given back on free, so earlier runs do not hide this one's peak."""
    # glibc raises its mmap threshold after each freed block (up to 32 MB), keeping later blocks in the heap where
    # the high-water mark cannot see them reused: fix it at 128 KiB so every large tensor is a fresh mapping
    libc = ctypes.CDLL(None)
    libc.mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD
    libc.malloc_trim(0)  # give back what earlier runs left in the heap
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status_bytes("VmRSS")
    fn()
    return _proc_status_bytes("VmHWM") - before
