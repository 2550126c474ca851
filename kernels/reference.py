"""
The naive PyTorch versions of the kernels: what a plain implementation of the loss does, kept as the baseline
for kernels/bench.py and as a readable statement of what the kernels compute. Each holds (N, V) fp32
tensors (log_softmax, then gather), which is exactly the memory the kernels avoid.
"""
import torch


def naive_token_logprobs(logits, labels, ignore_index=-100):
    """logits (N, V), labels (N,) -> (N,) fp32; ignored labels give 0."""
    valid = labels != ignore_index
    logp = logits.float().log_softmax(-1).gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)  # (N,)
    return torch.where(valid, logp, 0.0)


def naive_token_kl(logits, ref_logits):
    """(N, V) policy and reference logits -> KL[π ‖ π_ref] per row (N,) fp32, gradient into logits only."""
    logp = logits.float().log_softmax(-1)  # (N, V)
    ref_logp = ref_logits.detach().float().log_softmax(-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def naive_linear_logprobs(hidden, weight, labels, ignore_index=-100, ref_hidden=None, ref_weight=None):
    """hidden (N, D) @ weight (V, D)ᵀ -> logp (N,), or (logp, kl) with the reference; the full (N, V) logits."""
    logits = hidden @ weight.t()  # (N, V)
    logp = naive_token_logprobs(logits, labels, ignore_index)
    if ref_hidden is None:
        return logp
    return logp, naive_token_kl(logits, ref_hidden.detach() @ ref_weight.detach().t())
