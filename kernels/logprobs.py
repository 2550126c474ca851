"""
Per-token log-probabilities of the labels, logp[n] = log softmax(logits[n])[labels[n]], without ever holding
the (N, V) softmax in fp32 (DESIGN.md §3).

Forward: one program per row reads the row once, chunk by chunk, with an online log-sum-exp, and writes
logp and the row's fp32 log-sum-exp (LSE) for the backward.
Backward: d logp[n] / d logits[n, i] = onehot(labels[n])_i − softmax(logits[n])_i, so with the upstream
gradient g[n] each program re-reads its row and writes g·(onehot − p) with p = exp(logits − LSE), optionally
over the logits buffer itself (the logits are then gone: use it only when nothing else needs them).

Conventions: a label equal to ignore_index gives logp 0 and zero gradient; a row with no finite logit
(all −inf) carries no distribution and is treated the same way; a finite row whose label logit is −inf gives
logp −inf.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _logprobs_fwd_kernel(logits_ptr, stride_n, labels_ptr, logp_ptr, lse_ptr, V, ignore_index,
                         BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 before the stride product: N·V passes 2³¹
    row_ptr = logits_ptr + row * stride_n
    label = tl.load(labels_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    # online log-sum-exp: m is the running max, s = Σ exp(x − m) over the chunks seen so far
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        x = tl.load(row_ptr + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all −inf so far: keep exp() away from −inf − −inf
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
        m = m_new
    has_mass = s > 0.0
    lse = tl.where(has_mass, m + tl.log(tl.where(has_mass, s, 1.0)), float("-inf"))
    valid = (label != ignore_index) & has_mass
    x_label = tl.load(row_ptr + label, mask=valid, other=0.0).to(tl.float32)
    tl.store(logp_ptr + row, tl.where(valid, x_label - lse, 0.0))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _logprobs_bwd_kernel(logits_ptr, stride_n, grad_logits_ptr, stride_gn, labels_ptr, lse_ptr, grad_ptr, V,
                         ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_n
    out_ptr = grad_logits_ptr + row * stride_gn
    label = tl.load(labels_ptr + row).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_ptr + row).to(tl.float32)
    has_mass = lse != float("-inf")
    g = tl.where((label != ignore_index) & has_mass, g, 0.0)
    lse = tl.where(has_mass, lse, 0.0)  # fully masked row: p = exp(−inf) = 0 below instead of NaN
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        in_row = start + cols < V
        x = tl.load(row_ptr + start + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        p = tl.exp(x - lse)
        grad = g * (tl.where(start + cols == label, 1.0, 0.0) - p)
        tl.store(out_ptr + start + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


def _block_v(V):
    # A row chunk of up to 8192 elements: long enough to stream at full bandwidth, short enough to stay in registers.
    return min(triton.next_power_of_2(V), 8192)


def _num_warps(block):
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def check_inputs(logits, labels, ignore_index, where):
    if logits.dim() != 2:
        raise ValueError(f"{where}: logits must be (N, V), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"{where}: labels must be (N,) = ({logits.shape[0]},), got {tuple(labels.shape)}")
    if not logits.is_floating_point() or labels.is_floating_point():
        raise TypeError(f"{where}: logits must be floating point and labels integer, got {logits.dtype}, "
                        f"{labels.dtype}")
    V = logits.shape[1]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bad.any():
        raise ValueError(f"{where}: label {labels[bad][0].item()} is outside the vocabulary [0, {V}) and is not "
                         f"ignore_index={ignore_index}")


def _rows_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def logprobs_forward_triton(logits, labels, ignore_index=-100, block_v=None):
    """(N, V) logits, (N,) labels -> logp (N,) fp32, lse (N,) fp32."""
    logits = _rows_contiguous(logits)
    N, V = logits.shape
    logp = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    block = block_v or _block_v(V)
    if N > 0:
        _logprobs_fwd_kernel[(N,)](logits, logits.stride(0), labels.contiguous(), logp, lse, V, ignore_index,
                                   BLOCK_V=block, num_warps=_num_warps(block))
    return logp, lse


def logprobs_backward_triton(logits, labels, lse, grad, ignore_index=-100, out=None, block_v=None):
    """Writes grad[n]·(onehot(labels[n]) − softmax(logits[n])) into out (may be logits itself) and returns it."""
    logits = _rows_contiguous(logits)
    out = torch.empty_like(logits) if out is None else out
    N, V = logits.shape
    block = block_v or _block_v(V)
    if N > 0:
        _logprobs_bwd_kernel[(N,)](logits, logits.stride(0), out, out.stride(0), labels.contiguous(), lse,
                                   grad.contiguous(), V, ignore_index, BLOCK_V=block, num_warps=_num_warps(block))
    return out


def _row_chunk(V):
    # rows per chunk of the PyTorch path so that one fp32 chunk holds about 2²² elements (16 MB): its few
    # temporaries stay small next to large (N, V) logits, and smaller chunks were slower on CPU (fresh pages)
    return max(1, (1 << 22) // max(V, 1))


def logprobs_forward_torch(logits, labels, ignore_index=-100):
    """The same results as logprobs_forward_triton, in plain PyTorch over row chunks (the path on CPU tensors)."""
    N, V = logits.shape
    logp = torch.zeros(N, dtype=torch.float32, device=logits.device)
    lse = torch.full((N,), float("-inf"), dtype=torch.float32, device=logits.device)
    rows = _row_chunk(V)
    for a in range(0, N, rows):
        x = logits[a:a + rows].float()  # (C, V)
        # log_softmax is one fused pass on CPU (logsumexp is several); since log_softmax = x − LSE, the LSE is
        # max(x) − max(log_softmax)
        log_softmax = x.log_softmax(-1)
        x_max = x.amax(-1)
        has_mass = x_max > float("-inf")
        lse[a:a + rows] = torch.where(has_mass, x_max - log_softmax.amax(-1), float("-inf"))
        lab = labels[a:a + rows]
        valid = (lab != ignore_index) & has_mass
        label_logp = log_softmax.gather(1, torch.where(valid, lab, 0)[:, None]).squeeze(1)
        logp[a:a + rows] = torch.where(valid, label_logp, 0.0)
    return logp, lse


def logprobs_backward_torch(logits, labels, lse, grad, ignore_index=-100, out=None):
    out = torch.empty_like(logits) if out is None else out
    N, V = logits.shape
    rows = _row_chunk(V)
    for a in range(0, N, rows):
        lse_c, lab = lse[a:a + rows], labels[a:a + rows]
        has_mass = lse_c > float("-inf")
        g = torch.where((lab != ignore_index) & has_mass, grad[a:a + rows].float(), 0.0)[:, None]
        # g·(onehot − p), built in place in one fp32 chunk: p = exp(x − LSE), then −g·p, then +g at the label
        d = logits[a:a + rows].to(torch.float32, copy=True).sub_(torch.where(has_mass, lse_c, 0.0)[:, None])
        d = d.exp_().mul_(-g)
        d.scatter_add_(1, torch.where(lab != ignore_index, lab, 0)[:, None], g)
        out[a:a + rows] = d
    return out


BACKENDS = {
    "triton": (logprobs_forward_triton, logprobs_backward_triton),
    "torch": (logprobs_forward_torch, logprobs_backward_torch),
}


class TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, inplace_backward, backend):
        check_inputs(logits, labels, ignore_index, "token_logprobs")
        forward, _ = BACKENDS[backend]
        logp, lse = forward(logits, labels, ignore_index)
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index, ctx.inplace_backward, ctx.backend = ignore_index, inplace_backward, backend
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        logits, labels, lse = ctx.saved_tensors
        _, backward = BACKENDS[ctx.backend]
        out = logits if ctx.inplace_backward and logits.stride(-1) == 1 else None
        grad_logits = backward(logits, labels, lse, grad_logp, ctx.ignore_index, out=out)
        return grad_logits, None, None, None, None


def token_logprobs(logits, labels, ignore_index=-100, inplace_backward=False):
    """
    logits (N, V) fp32/bf16/fp16, labels (N,) int -> logp (N,) fp32 = log softmax(logits)[labels], with autograd.
    Triton on CUDA tensors, a chunked PyTorch path elsewhere. inplace_backward=True writes the gradient over
    the logits buffer (saves N·V memory; the logits must not be needed afterwards).
    """
    backend = "triton" if logits.is_cuda else "torch"
    return TokenLogprobs.apply(logits, labels, ignore_index, inplace_backward, backend)


def token_logprobs_triton(logits, labels, ignore_index=-100, inplace_backward=False):
    """token_logprobs forced onto the Triton kernels (tests run them on CPU under TRITON_INTERPRET=1)."""
    return TokenLogprobs.apply(logits, labels, ignore_index, inplace_backward, "triton")


def token_logprobs_torch(logits, labels, ignore_index=-100, inplace_backward=False):
    """token_logprobs forced onto the chunked PyTorch path."""
    return TokenLogprobs.apply(logits, labels, ignore_index, inplace_backward, "torch")
