"""
Full-vocabulary reverse KL per token, KL[n] = Σ_i p_i (log p_i − log q_i) with p = softmax(logits[n]) (policy)
and q = softmax(ref_logits[n]) (frozen reference): the KL term of OREO's policy loss (DESIGN.md §1).

Forward: one program per row streams both rows in chunks. With z the policy logits and r the reference logits,
    KL = Σ_i p_i (z_i − r_i) − LSE(z) + LSE(r),   Σ_i p_i (z_i − r_i) = Σ_i e^{z_i − m} (z_i − r_i) / Σ_i e^{z_i − m},
so three online sums (the policy's, its (z − r)-weighted twin, and the reference's) rescaled by the running maxima
suffice: no probability vector is ever stored.
Backward (policy logits only; the reference is frozen):
    dKL/dz_j = Σ_i dp_i/dz_j (log p_i − log q_i) + Σ_i p_i d log p_i/dz_j,   dp_i/dz_j = p_i (δ_ij − p_j)
             = p_j (log p_j − log q_j) − p_j KL + (p_j − p_j)
             = p_j ((log p_j − log q_j) − KL).
The label's log-prob can ride along in the same two passes (token_logprobs_and_kl): the forward reads z[label]
and uses the same LSE, and the backward adds g_logp·(onehot − p) (see logprobs.py) to the KL gradient, so the
logits are read twice and the combined gradient written once, optionally over the logits buffer.
Conventions: where p_i = 0 the term is 0 (also when q_i = 0); a policy row with no finite logit gives KL 0 and
zero gradient; p_i > 0 where q_i = 0 gives KL = +inf.
"""
import torch
import triton
import triton.language as tl

from kernels.logprobs import _block_v, _num_warps, _row_chunk, _rows_contiguous, check_inputs


@triton.jit
def _kl_fwd_kernel(z_ptr, stride_z, r_ptr, stride_r, kl_ptr, lse_z_ptr, lse_r_ptr, labels_ptr, logp_ptr, V,
                   ignore_index, WITH_LABELS: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    r_row = r_ptr + row * stride_r
    cols = tl.arange(0, BLOCK_V)
    m_z = float("-inf")
    s_z = 0.0  # Σ e^{z − m_z}
    w_z = 0.0  # Σ e^{z − m_z} (z − r)
    m_r = float("-inf")
    s_r = 0.0  # Σ e^{r − m_r}
    for start in range(0, V, BLOCK_V):
        in_row = start + cols < V
        z = tl.load(z_row + start + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        r = tl.load(r_row + start + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        m_z_new = tl.maximum(m_z, tl.max(z, 0))
        m_z_safe = tl.where(m_z_new == float("-inf"), 0.0, m_z_new)
        e = tl.exp(z - m_z_safe)
        scale = tl.exp(m_z - m_z_safe)
        s_z = s_z * scale + tl.sum(e, 0)
        w_z = w_z * scale + tl.sum(tl.where(e > 0.0, e * (z - r), 0.0), 0)  # p_i = 0 adds nothing, even if q_i = 0
        m_z = m_z_new
        m_r_new = tl.maximum(m_r, tl.max(r, 0))
        m_r_safe = tl.where(m_r_new == float("-inf"), 0.0, m_r_new)
        s_r = s_r * tl.exp(m_r - m_r_safe) + tl.sum(tl.exp(r - m_r_safe), 0)
        m_r = m_r_new
    has_mass = s_z > 0.0
    lse_z = tl.where(has_mass, m_z + tl.log(tl.where(has_mass, s_z, 1.0)), float("-inf"))
    lse_r = m_r + tl.log(s_r)  # a reference row with no finite logit has no distribution: KL is undefined there
    kl = tl.where(has_mass, w_z / tl.where(has_mass, s_z, 1.0) - lse_z + lse_r, 0.0)
    tl.store(kl_ptr + row, kl)
    tl.store(lse_z_ptr + row, lse_z)
    tl.store(lse_r_ptr + row, lse_r)
    if WITH_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        valid = (label != ignore_index) & has_mass
        z_label = tl.load(z_row + label, mask=valid, other=0.0).to(tl.float32)
        tl.store(logp_ptr + row, tl.where(valid, z_label - lse_z, 0.0))


@triton.jit
def _kl_bwd_kernel(z_ptr, stride_z, r_ptr, stride_r, grad_z_ptr, stride_gz, kl_ptr, lse_z_ptr, lse_r_ptr, grad_kl_ptr,
                   labels_ptr, grad_logp_ptr, V, ignore_index, WITH_LABELS: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    r_row = r_ptr + row * stride_r
    out_row = grad_z_ptr + row * stride_gz
    lse_z = tl.load(lse_z_ptr + row)
    lse_r = tl.load(lse_r_ptr + row)
    kl = tl.load(kl_ptr + row)
    has_mass = lse_z != float("-inf")
    g = tl.where(has_mass, tl.load(grad_kl_ptr + row).to(tl.float32), 0.0)
    label = -1
    g_logp = 0.0
    if WITH_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        g_logp = tl.where((label != ignore_index) & has_mass, tl.load(grad_logp_ptr + row).to(tl.float32), 0.0)
    lse_z = tl.where(has_mass, lse_z, 0.0)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        in_row = start + cols < V
        z = tl.load(z_row + start + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        r = tl.load(r_row + start + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        p = tl.exp(z - lse_z)
        # dKL/dz_j = p_j ((log p_j − log q_j) − KL), 0 where p_j = 0
        grad = tl.where(p > 0.0, g * p * ((z - lse_z) - (r - lse_r) - kl), 0.0)
        if WITH_LABELS:
            grad += g_logp * (tl.where(start + cols == label, 1.0, 0.0) - p)  # d logp/dz_j = onehot_j − p_j
        tl.store(out_row + start + cols, grad.to(grad_z_ptr.dtype.element_ty), mask=in_row)


def check_pair(logits, ref_logits, where):
    if logits.dim() != 2 or logits.shape != ref_logits.shape:
        raise ValueError(f"{where}: logits and ref_logits must both be (N, V), got {tuple(logits.shape)} and "
                         f"{tuple(ref_logits.shape)}")
    if not (logits.is_floating_point() and ref_logits.is_floating_point()):
        raise TypeError(f"{where}: logits must be floating point, got {logits.dtype} and {ref_logits.dtype}")


def kl_forward_triton(logits, ref_logits, labels=None, ignore_index=-100, block_v=None):
    """(N, V) policy and reference logits [, (N,) labels] -> kl, lse, ref_lse (N,) fp32, and logp (N,) or None."""
    logits, ref_logits = _rows_contiguous(logits), _rows_contiguous(ref_logits)
    N, V = logits.shape
    kl, lse, ref_lse = (torch.empty(N, dtype=torch.float32, device=logits.device) for _ in range(3))
    logp = None if labels is None else torch.empty(N, dtype=torch.float32, device=logits.device)
    block = block_v or _block_v(V)
    if N > 0:
        _kl_fwd_kernel[(N,)](logits, logits.stride(0), ref_logits, ref_logits.stride(0), kl, lse, ref_lse,
                             kl if labels is None else labels.contiguous(), kl if logp is None else logp, V,
                             ignore_index,
                             WITH_LABELS=labels is not None, BLOCK_V=block, num_warps=_num_warps(block))
    return kl, lse, ref_lse, logp


def kl_backward_triton(logits, ref_logits, kl, lse, ref_lse, grad_kl, labels=None, grad_logp=None, ignore_index=-100,
                       out=None, block_v=None):
    """Writes grad_kl·p·((log p − log q) − KL) [+ grad_logp·(onehot − p)] into out (may be logits) and returns it."""
    logits, ref_logits = _rows_contiguous(logits), _rows_contiguous(ref_logits)
    out = torch.empty_like(logits) if out is None else out
    N, V = logits.shape
    block = block_v or _block_v(V)
    if N > 0:
        _kl_bwd_kernel[(N,)](logits, logits.stride(0), ref_logits, ref_logits.stride(0), out, out.stride(0), kl, lse,
                             ref_lse, grad_kl.contiguous(), kl if labels is None else labels.contiguous(),
                             kl if grad_logp is None else grad_logp.contiguous(), V, ignore_index,
                             WITH_LABELS=labels is not None, BLOCK_V=block, num_warps=_num_warps(block))
    return out


def _log_softmax_and_lse(x):
    # log_softmax is one fused pass on CPU; since it equals x − LSE, LSE = max(x) − max(log_softmax)
    log_softmax = x.log_softmax(-1)
    x_max = x.amax(-1)
    return log_softmax, torch.where(x_max > float("-inf"), x_max - log_softmax.amax(-1), float("-inf"))


def kl_forward_torch(logits, ref_logits, labels=None, ignore_index=-100):
    """The same results as kl_forward_triton, in plain PyTorch over row chunks."""
    N, V = logits.shape
    kl, lse, ref_lse = (torch.empty(N, dtype=torch.float32, device=logits.device) for _ in range(3))
    logp = None if labels is None else torch.zeros(N, dtype=torch.float32, device=logits.device)
    rows = _row_chunk(V)
    for a in range(0, N, rows):
        log_p, lse[a:a + rows] = _log_softmax_and_lse(logits[a:a + rows].float())
        log_q, ref_lse[a:a + rows] = _log_softmax_and_lse(ref_logits[a:a + rows].float())
        has_mass = lse[a:a + rows] > float("-inf")
        if labels is not None:
            lab = labels[a:a + rows]
            valid = (lab != ignore_index) & has_mass
            logp[a:a + rows] = torch.where(valid, log_p.gather(1, torch.where(valid, lab, 0)[:, None]).squeeze(1), 0.0)
        p = log_p.exp()
        terms = log_p.sub_(log_q).mul_(p).masked_fill_(p == 0, 0.0)  # p·(log p − log q), 0 where p = 0
        kl[a:a + rows] = torch.where(has_mass, terms.sum(-1), 0.0)
    return kl, lse, ref_lse, logp


def kl_backward_torch(logits, ref_logits, kl, lse, ref_lse, grad_kl, labels=None, grad_logp=None, ignore_index=-100,
                      out=None):
    out = torch.empty_like(logits) if out is None else out
    N, V = logits.shape
    rows = _row_chunk(V)
    for a in range(0, N, rows):
        has_mass = lse[a:a + rows] > float("-inf")
        g = torch.where(has_mass, grad_kl[a:a + rows].float(), 0.0)[:, None]
        lse_c = torch.where(has_mass, lse[a:a + rows], 0.0)[:, None]
        log_p = logits[a:a + rows].to(torch.float32, copy=True).sub_(lse_c)
        p = log_p.exp()
        # g·p·((log p − log q) − KL), built in place; 0 where p = 0
        d = log_p.sub_(ref_logits[a:a + rows].float()).add_(ref_lse[a:a + rows, None]).sub_(kl[a:a + rows, None])
        d = d.mul_(p).mul_(g).masked_fill_(p == 0, 0.0)
        if labels is not None:  # + g_logp·(onehot − p)
            lab = labels[a:a + rows]
            g_logp = torch.where((lab != ignore_index) & has_mass, grad_logp[a:a + rows].float(), 0.0)[:, None]
            d.sub_(p.mul_(g_logp)).scatter_add_(1, torch.where(lab != ignore_index, lab, 0)[:, None], g_logp)
        out[a:a + rows] = d
    return out


BACKENDS = {
    "triton": (kl_forward_triton, kl_backward_triton),
    "torch": (kl_forward_torch, kl_backward_torch),
}


class TokenLogprobsKL(torch.autograd.Function):
    """(logp, kl) per token from one pair of passes over the logits; labels=None gives the KL alone."""

    @staticmethod
    def forward(ctx, logits, ref_logits, labels, ignore_index, inplace_backward, backend):
        check_pair(logits, ref_logits, "token_kl")
        if labels is not None:
            check_inputs(logits, labels, ignore_index, "token_logprobs_and_kl")
        forward, _ = BACKENDS[backend]
        kl, lse, ref_lse, logp = forward(logits, ref_logits.detach(), labels, ignore_index)
        ctx.save_for_backward(logits, ref_logits.detach(), kl, lse, ref_lse, labels)
        ctx.ignore_index, ctx.inplace_backward, ctx.backend = ignore_index, inplace_backward, backend
        if logp is None:
            return kl
        return logp, kl

    @staticmethod
    def backward(ctx, *grads):
        logits, ref_logits, kl, lse, ref_lse, labels = ctx.saved_tensors
        _, backward = BACKENDS[ctx.backend]
        grad_logp, grad_kl = grads if labels is not None else (None, grads[0])
        if grad_kl is None:
            grad_kl = torch.zeros_like(kl)
        if labels is not None and grad_logp is None:
            grad_logp = torch.zeros_like(kl)
        out = logits if ctx.inplace_backward and logits.stride(-1) == 1 else None
        grad_logits = backward(logits, ref_logits, kl, lse, ref_lse, grad_kl, labels, grad_logp, ctx.ignore_index,
                               out=out)
        return grad_logits, None, None, None, None, None


def token_kl(logits, ref_logits):
    """
    logits, ref_logits (N, V) -> KL[softmax(logits) ‖ softmax(ref_logits)] per row, (N,) fp32, with gradient into
    logits only (the reference is treated as a constant). Triton on CUDA tensors, chunked PyTorch elsewhere.
    """
    return TokenLogprobsKL.apply(logits, ref_logits, None, -100, False, "triton" if logits.is_cuda else "torch")


def token_logprobs_and_kl(logits, ref_logits, labels, ignore_index=-100, inplace_backward=False):
    """
    (token_logprobs(logits, labels), token_kl(logits, ref_logits)) from one read of both rows forward and one
    combined gradient written backward (optionally over the logits buffer): what OREO's policy loss needs.
    """
    return TokenLogprobsKL.apply(logits, ref_logits, labels, ignore_index, inplace_backward,
                                 "triton" if logits.is_cuda else "torch")


def token_kl_triton(logits, ref_logits, labels=None, ignore_index=-100, inplace_backward=False):
    """token_kl (or, given labels, token_logprobs_and_kl) forced onto the Triton kernels."""
    return TokenLogprobsKL.apply(logits, ref_logits, labels, ignore_index, inplace_backward, "triton")


def token_kl_torch(logits, ref_logits, labels=None, ignore_index=-100, inplace_backward=False):
    """token_kl (or, given labels, token_logprobs_and_kl) forced onto the chunked PyTorch path."""
    return TokenLogprobsKL.apply(logits, ref_logits, labels, ignore_index, inplace_backward, "torch")
