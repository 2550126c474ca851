"""
The fused-linear form: per-token log-probs (and optionally the KL to a reference) straight from the last hidden
states, logits = hidden @ weightᵀ, without ever holding the (N, V) logits (DESIGN.md §3, as in Liger-Kernel's
and Apple's Cut Cross-Entropy's fused linear losses).

Forward: for each chunk of C tokens, logits_c = hidden_c @ weightᵀ (C, V) in the input dtype, then the row
kernels of logprobs.py (and kl.py) give logp, the LSE (and KL); only the (N,) results are kept.
Backward: each chunk's logits are recomputed, turned into dlogits_c = g_logp·(onehot − p) + g_kl·p·(log p − log q − KL)
by one kernel (written over the recomputed logits), and
    d hidden_c = dlogits_c @ weight      (C, D)
    d weight  += dlogits_cᵀ @ hidden_c   (V, D), accumulated in fp32 over the chunks.
Peak extra memory is O(C·V) plus the fp32 d weight accumulator, flat in N. The reference side (ref_hidden,
ref_weight) is frozen: no gradient flows into it.
"""
import torch

from kernels import kl as kl_ops
from kernels import logprobs as logprob_ops


def default_chunk_size(V, device):
    # on a GPU about 2²⁷ logits per chunk (256 MB in bf16): big enough for efficient matmuls, small next to (N, V);
    # on a CPU 2²² (16 MB in fp32), where memory is scarcer and matmuls are efficient at any size
    budget = 1 << 27 if device.type == "cuda" else 1 << 22
    return max(16, min(4096, budget // max(V, 1)))


class LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ref_hidden, ref_weight, ignore_index, chunk_size, backend):
        lp_forward, _ = logprob_ops.BACKENDS[backend]
        kl_forward, _ = kl_ops.BACKENDS[backend]
        N = hidden.shape[0]
        has_ref = ref_hidden is not None
        logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
        kl = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        ref_lse = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        for a in range(0, N, chunk_size):
            b = min(a + chunk_size, N)
            logits = hidden[a:b] @ weight.t()  # (C, V)
            if has_ref:  # logp and KL from one pass over both chunks
                ref_logits = ref_hidden[a:b] @ ref_weight.t()  # (C, V)
                kl[a:b], lse[a:b], ref_lse[a:b], logp[a:b] = kl_forward(logits, ref_logits, labels[a:b], ignore_index)
            else:
                logp[a:b], lse[a:b] = lp_forward(logits, labels[a:b], ignore_index)
        ctx.save_for_backward(hidden, weight, labels, lse, kl, ref_lse,
                              *((ref_hidden, ref_weight) if has_ref else ()))
        ctx.ignore_index, ctx.chunk_size, ctx.backend, ctx.has_ref = ignore_index, chunk_size, backend, has_ref
        if not has_ref:
            ctx.mark_non_differentiable(kl)
        return logp, kl

    @staticmethod
    def backward(ctx, grad_logp, grad_kl):
        hidden, weight, labels, lse, kl, ref_lse, *ref = ctx.saved_tensors
        _, lp_backward = logprob_ops.BACKENDS[ctx.backend]
        _, kl_backward = kl_ops.BACKENDS[ctx.backend]
        N = hidden.shape[0]
        if grad_logp is None:
            grad_logp = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        if grad_kl is None:
            grad_kl = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for a in range(0, N, ctx.chunk_size):
            b = min(a + ctx.chunk_size, N)
            logits = hidden[a:b] @ weight.t()  # (C, V), recomputed, then overwritten by its gradient
            if ctx.has_ref:
                ref_logits = ref[0][a:b] @ ref[1].t()
                grad_logits = kl_backward(logits, ref_logits, kl[a:b], lse[a:b], ref_lse[a:b], grad_kl[a:b],
                                          labels[a:b], grad_logp[a:b], ctx.ignore_index, out=logits)
            else:
                grad_logits = lp_backward(logits, labels[a:b], lse[a:b], grad_logp[a:b], ctx.ignore_index, out=logits)
            if grad_hidden is not None:
                grad_hidden[a:b] = grad_logits @ weight  # (C, D)
            if grad_weight is not None:
                grad_weight.add_(grad_logits.t() @ hidden[a:b])  # (V, D), promoted into fp32 without an fp32 copy
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def linear_logprobs(hidden, weight, labels, ignore_index=-100, ref_hidden=None, ref_weight=None, chunk_size=None,
                    backend=None):
    """
    hidden (N, D), weight (V, D), labels (N,) -> logp (N,) fp32 = log softmax(hidden @ weightᵀ)[labels], or
    (logp, kl) when ref_hidden (N, D') and ref_weight (V, D') are given (kl: KL[π ‖ π_ref] per token, gradient
    into hidden and weight only). Chunked over tokens (chunk_size rows at a time), never (N, V).
    backend: "triton" or "torch"; by default Triton on CUDA tensors, the PyTorch row functions elsewhere.
    Under autocast the inputs are cast once to its dtype (the forward and the recomputing backward then agree).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_logprobs: hidden must be (N, D) and weight (V, D), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("linear_logprobs: give both ref_hidden and ref_weight, or neither")
    if ref_hidden is not None and (ref_hidden.shape[0] != hidden.shape[0] or ref_weight.shape[0] != weight.shape[0]
                                   or ref_hidden.shape[1] != ref_weight.shape[1]):
        raise ValueError(f"linear_logprobs: ref_hidden must be (N, D') and ref_weight (V, D') with N = "
                         f"{hidden.shape[0]}, V = {weight.shape[0]}; got {tuple(ref_hidden.shape)} and "
                         f"{tuple(ref_weight.shape)}")
    V = weight.shape[0]
    if labels.shape != hidden.shape[:1] or labels.is_floating_point() or \
            ((labels != ignore_index) & ((labels < 0) | (labels >= V))).any():
        raise ValueError(f"linear_logprobs: labels must be (N,) = ({hidden.shape[0]},) with values in [0, {V}) or "
                         f"ignore_index={ignore_index}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # as F.linear under autocast: one cast of each input, then that dtype
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        if ref_hidden is not None:
            ref_hidden, ref_weight = ref_hidden.to(dtype), ref_weight.to(dtype)
    backend = backend or ("triton" if hidden.is_cuda else "torch")
    chunk_size = chunk_size or default_chunk_size(V, hidden.device)
    if ref_hidden is not None:
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
    logp, kl = LinearLogprobs.apply(hidden, weight, labels, ref_hidden, ref_weight, ignore_index, chunk_size, backend)
    return logp if ref_hidden is None else (logp, kl)
