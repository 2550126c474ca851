"""
Full-vocabulary reverse KL per token, KL[n] = Σ_i p_i (log p_i − log q_i) with p = softmax(logits[n]) (policy)
and q = softmax(ref_logits[n]) (frozen reference): the KL term of OREO's policy loss (DESIGN.md §1).

Forward: one program per row streams both rows in chunks. With z the policy logits and r the reference logits,
    KL = Σ_i p_i (z_i − r_i) − LSE(z) + LSE(r)   and   Σ_i p_i (z_i − r_i) = Σ_i e^{z_i − m} (z_i − r_i) / Σ_i e^{z_i − m},
so three online sums (the policy's, its (z − r)-weighted twin, and the reference's) rescaled by the running maxima
suffice: no probability vector is ever stored.
Backward (policy logits only; the reference is frozen):
    dKL/dz_j = Σ_i dp_i/dz_j (log p_i − log q_i) + Σ_i p_i d log p_i/dz_j,   dp_i/dz_j = p_i (δ_ij − p_j)
             = p_j (log p_j − log q_j) − p_j KL + (p_j − p_j)
             = p_j ((log p_j − log q_j) − KL).
Conventions: where p_i = 0 the term is 0 (also when q_i = 0); a policy row with no finite logit gives KL 0 and
zero gradient; p_i > 0 where q_i = 0 gives KL = +inf.
"""
import torch
import triton
import triton.language as tl

from kernels.logprobs import _block_v, _num_warps, _row_chunk, _rows_contiguous


@triton.jit
def _kl_fwd_kernel(z_ptr, stride_z, r_ptr, stride_r, kl_ptr, lse_z_ptr, lse_r_ptr, V, BLOCK_V: tl.constexpr):
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


@triton.jit
def _kl_bwd_kernel(z_ptr, stride_z, r_ptr, stride_r, grad_z_ptr, stride_gz, kl_ptr, lse_z_ptr, lse_r_ptr, grad_ptr,
                   V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    r_row = r_ptr + row * stride_r
    out_row = grad_z_ptr + row * stride_gz
    lse_z = tl.load(lse_z_ptr + row)
    lse_r = tl.load(lse_r_ptr + row)
    kl = tl.load(kl_ptr + row)
    has_mass = lse_z != float("-inf")
    g = tl.where(has_mass, tl.load(grad_ptr + row).to(tl.float32), 0.0)
    lse_z = tl.where(has_mass, lse_z, 0.0)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        in_row = start + cols < V
        z = tl.load(z_row + start + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        r = tl.load(r_row + start + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        p = tl.exp(z - lse_z)
        # dKL/dz_j = p_j ((log p_j − log q_j) − KL), 0 where p_j = 0
        grad = tl.where(p > 0.0, g * p * ((z - lse_z) - (r - lse_r) - kl), 0.0)
        tl.store(out_row + start + cols, grad.to(grad_z_ptr.dtype.element_ty), mask=in_row)


def check_pair(logits, ref_logits, where):
    if logits.dim() != 2 or logits.shape != ref_logits.shape:
        raise ValueError(f"{where}: logits and ref_logits must both be (N, V), got {tuple(logits.shape)} and "
                         f"{tuple(ref_logits.shape)}")
    if not (logits.is_floating_point() and ref_logits.is_floating_point()):
        raise TypeError(f"{where}: logits must be floating point, got {logits.dtype} and {ref_logits.dtype}")


def kl_forward_triton(logits, ref_logits, block_v=None):
    """(N, V) policy and reference logits -> kl (N,), lse (N,), ref_lse (N,), all fp32."""
    logits, ref_logits = _rows_contiguous(logits), _rows_contiguous(ref_logits)
    N, V = logits.shape
    kl, lse, ref_lse = (torch.empty(N, dtype=torch.float32, device=logits.device) for _ in range(3))
    block = block_v or _block_v(V)
    if N > 0:
        _kl_fwd_kernel[(N,)](logits, logits.stride(0), ref_logits, ref_logits.stride(0), kl, lse, ref_lse, V,
                             BLOCK_V=block, num_warps=_num_warps(block))
    return kl, lse, ref_lse


def kl_backward_triton(logits, ref_logits, kl, lse, ref_lse, grad, out=None, block_v=None):
    """Writes grad[n]·p·((log p − log q) − KL[n]) into out (may be logits itself) and returns it."""
    logits, ref_logits = _rows_contiguous(logits), _rows_contiguous(ref_logits)
    out = torch.empty_like(logits) if out is None else out
    N, V = logits.shape
    block = block_v or _block_v(V)
    if N > 0:
        _kl_bwd_kernel[(N,)](logits, logits.stride(0), ref_logits, ref_logits.stride(0), out, out.stride(0), kl, lse,
                             ref_lse, grad.contiguous(), V, BLOCK_V=block, num_warps=_num_warps(block))
    return out


def _log_softmax_and_lse(x):
    # log_softmax is one fused pass on CPU; since it equals x − LSE, LSE = max(x) − max(log_softmax)
    log_softmax = x.log_softmax(-1)
    x_max = x.amax(-1)
    return log_softmax, torch.where(x_max > float("-inf"), x_max - log_softmax.amax(-1), float("-inf"))


def kl_forward_torch(logits, ref_logits, block_v=None):
    """The same results as kl_forward_triton, in plain PyTorch over row chunks."""
    N, V = logits.shape
    kl, lse, ref_lse = (torch.empty(N, dtype=torch.float32, device=logits.device) for _ in range(3))
    rows = _row_chunk(V)
    for a in range(0, N, rows):
        logp, lse[a:a + rows] = _log_softmax_and_lse(logits[a:a + rows].float())
        logq, ref_lse[a:a + rows] = _log_softmax_and_lse(ref_logits[a:a + rows].float())
        p = logp.exp()
        terms = logp.sub_(logq).mul_(p).masked_fill_(p == 0, 0.0)  # p·(log p − log q), 0 where p = 0
        kl[a:a + rows] = torch.where(lse[a:a + rows] > float("-inf"), terms.sum(-1), 0.0)
    return kl, lse, ref_lse


def kl_backward_torch(logits, ref_logits, kl, lse, ref_lse, grad, out=None, block_v=None):
    out = torch.empty_like(logits) if out is None else out
    N, V = logits.shape
    rows = _row_chunk(V)
    for a in range(0, N, rows):
        has_mass = lse[a:a + rows] > float("-inf")
        g = torch.where(has_mass, grad[a:a + rows].float(), 0.0)[:, None]
        logp = logits[a:a + rows].to(torch.float32, copy=True).sub_(torch.where(has_mass, lse[a:a + rows], 0.0)[:, None])
        p = logp.exp()
        # g·p·((log p − log q) − KL), built in place; 0 where p = 0
        d = logp.sub_(ref_logits[a:a + rows].float()).add_(ref_lse[a:a + rows, None]).sub_(kl[a:a + rows, None])
        out[a:a + rows] = d.mul_(p).mul_(g).masked_fill_(p == 0, 0.0)
    return out


BACKENDS = {
    "triton": (kl_forward_triton, kl_backward_triton),
    "torch": (kl_forward_torch, kl_backward_torch),
}


class TokenKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ref_logits, backend):
        check_pair(logits, ref_logits, "token_kl")
        forward, _ = BACKENDS[backend]
        kl, lse, ref_lse = forward(logits, ref_logits.detach())
        ctx.save_for_backward(logits, ref_logits.detach(), kl, lse, ref_lse)
        ctx.backend = backend
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        logits, ref_logits, kl, lse, ref_lse = ctx.saved_tensors
        _, backward = BACKENDS[ctx.backend]
        return backward(logits, ref_logits, kl, lse, ref_lse, grad_kl), None, None


def token_kl(logits, ref_logits):
    """
    logits, ref_logits (N, V) -> KL[softmax(logits) ‖ softmax(ref_logits)] per row, (N,) fp32, with gradient into
    logits only (the reference is treated as a constant). Triton on CUDA tensors, chunked PyTorch elsewhere.
    """
    return TokenKL.apply(logits, ref_logits, "triton" if logits.is_cuda else "torch")


def token_kl_triton(logits, ref_logits):
    """token_kl forced onto the Triton kernels."""
    return TokenKL.apply(logits, ref_logits, "triton")


def token_kl_torch(logits, ref_logits):
    """token_kl forced onto the chunked PyTorch path."""
    return TokenKL.apply(logits, ref_logits, "torch")
