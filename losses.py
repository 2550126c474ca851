"""
OREO's losses and the log-probabilities they read (DESIGN.md §1): the value and policy losses at token, step and
response level, the KL term, and the baselines' losses (SFT/RS NLL, DPO, KTO). Imports kernels (the fused and
chunked log-prob passes) and nothing else of ours; oreo.py trains with them (and re-exports oreo_loss).

Every function takes log-probs laid out as in §1: position j is the state s_j = x_{≤j}, whose action is x_{j+1}.
"""
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

import kernels


def reverse_cumsum(x):
    """acc[..., j] = sum_{i >= j} x[..., i] along the last dimension."""
    return x.flip(-1).cumsum(-1).flip(-1)


def masked_mean(x, mask):
    """mean_b ( Σ_j mask·x / Σ_j mask ): every sequence weighs the same, whatever its length."""
    return ((mask * x).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def oreo_loss(logp, ref_logp, values, rewards, mask, beta, variant="token", step_start=None, value_mask=None):
    """
    OREO's policy and value losses (DESIGN.md §1), without the KL term (the trainer adds it).

    logp, ref_logp: (B, T) log-probs of the action x_{j+1} at state s_j under the policy and the reference
    values:         (B, T) V(s_j)
    rewards:        (B,)   terminal reward R
    mask:           (B, T) 1 where x_{j+1} is an action token
    step_start:     (B, T) bool, True at the state before each step's first token (variant "step" only)
    value_mask:     (B, T) the states the value loss trains (default: mask; the official step level: step_start)
    Returns (policy_loss, value_loss): the policy loss only sends gradient into logp, the value loss only into
    values.
    """
    if variant not in ("token", "step", "response"):
        raise ValueError(f"variant must be 'token', 'step' or 'response', got {variant!r}")
    if variant == "step" and step_start is None:
        raise ValueError("variant 'step' needs step_start: (B, T) bool marking the first token of each step")
    mask = mask.to(logp.dtype)
    R = rewards.to(logp.dtype)[:, None]  # (B, 1)

    # masked log-ratio lr[j] = mask·(logp − ref_logp), and acc[j] = Σ_{i≥j} lr[i]
    log_ratio = mask * (logp - ref_logp)
    acc = reverse_cumsum(log_ratio)  # (B, T), carries the policy's gradient
    acc_sg = acc.detach()
    values_sg = values.detach()

    # Value loss: res_V[j] = β·acc[j] + V(s_j) − R; the log-probs are constants here.
    res_v = beta * acc_sg + values - R
    value_loss = masked_mean(res_v**2, mask if value_mask is None else value_mask.to(logp.dtype))

    if variant == "token":
        # Token-level policy loss: res_π[j] = β·(sg(acc[j+1]) + logp[j] − ref_logp[j]) + sg(V(s_j)) − R,
        # with acc[T] = 0. Only the current token's logp gets gradient, so every step is on the same scale.
        acc_next = F.pad(acc_sg[:, 1:], (0, 1))
        res_pi = beta * (acc_next + logp - ref_logp) + values_sg - R
        policy_loss = masked_mean(res_pi**2, mask)
    elif variant == "step":
        # Step-level policy loss, at each step start t with next start n(t) (or the end, where acc = 0):
        # res_π[t] = β·(acc[t] − acc[n(t)] + sg(acc[n(t)])) + sg(V(s_t)) − R; gradient flows through the step's tokens.
        starts = step_start.bool()
        T = logp.shape[1]
        pos = torch.arange(T, device=logp.device).expand_as(starts)
        start_pos = torch.where(starts, pos, T)  # (B, T) own position at a start, else T
        next_start = start_pos.flip(-1).cummin(-1).values.flip(-1)  # first start at or after j
        next_start = F.pad(next_start[:, 1:], (0, 1), value=T)  # first start strictly after j: n(j)
        acc_n = F.pad(acc, (0, 1)).gather(1, next_start)  # (B, T) acc[n(j)], 0 at the end
        res_pi = beta * (acc - acc_n + acc_n.detach()) + values_sg - R
        starts = starts.to(logp.dtype)
        policy_loss = masked_mean(res_pi**2, starts)
    else:
        # Response-level policy loss, one residual per sequence at its first action state s_0:
        # res_π = β·acc[s_0] + sg(V(s_0)) − R.
        first = mask.argmax(-1, keepdim=True)  # (B, 1) first action position
        has_action = (mask.sum(-1) > 0).to(logp.dtype)
        res_pi = beta * acc.gather(1, first) + values_sg.gather(1, first) - R
        policy_loss = (has_action * res_pi.squeeze(1) ** 2).mean()
    return policy_loss, value_loss


def shifted_labels(input_ids):
    """(B, L) tokens -> (B·L,) labels: position j's label is x_{j+1}; the last position has none (ignore_index),
    so the (B·L, ·) views of hidden states and logits need no copy."""
    return F.pad(input_ids[:, 1:], (0, 1), value=-100).reshape(-1)


def full_weight(weight):
    """A parameter as one plain tensor: FSDP2 holds it sharded (a DTensor) outside its module's forward."""
    return weight.full_tensor() if isinstance(weight, DTensor) else weight


def reference_logprobs(reference, input_ids, fused, with_kl):
    """
    The frozen reference's ref_logp (B, L-1) fp32, without gradient, and, with_kl, what the policy's KL pass reads:
    fused, the reference's last hidden states (B·L, D) and its lm_head weight (V, D); else its logits (B·L, V).
    """
    labels = shifted_labels(input_ids)

    def head(hidden, weight):
        hidden = hidden.flatten(0, 1)  # (B·L, D)
        if fused:
            return kernels.linear_logprobs(hidden, weight, labels), hidden
        logits = F.linear(hidden, weight)  # (B·L, V)
        return kernels.token_logprobs(logits, labels), logits

    with torch.no_grad():
        ref_logp, kept = reference(input_ids, head=torch.compiler.disable(head))  # see policy_logprobs
    ref_logp = ref_logp.view(input_ids.shape)[:, :-1]
    if not with_kl:
        return ref_logp, None
    return ref_logp, ((kept, full_weight(reference.lm_head.weight)) if fused else kept)


def policy_logprobs(policy, input_ids, fused, kl_inputs=None):
    """
    logp[b, j] = log π(x_{j+1} | x_{≤j}) (B, L-1) fp32 from one policy forward; with kl_inputs (from
    reference_logprobs) also the per-token full-vocabulary KL[π_θ(·|s_j) ‖ π_ref(·|s_j)] (B, L-1) from the same
    pass over the vocabulary, else None.
    fused: kernels.linear_logprobs from the last hidden states, in chunks of tokens recomputed in the backward, so
    no (B·L, V) logits exist for policy or reference. Otherwise the logits are made once and read by one chunked
    pass whose backward writes the gradient over them (faster on a CPU; docs/reference.md "The loss path on a CPU").
    """
    labels = shifted_labels(input_ids)

    def head(hidden, weight):
        hidden = hidden.flatten(0, 1)  # (B·L, D)
        if fused:
            if kl_inputs is None:
                return kernels.linear_logprobs(hidden, weight, labels), None
            ref_hidden, ref_weight = kl_inputs
            return kernels.linear_logprobs(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=ref_weight)
        logits = F.linear(hidden, weight)  # (B·L, V); its backward needs hidden and weight, not the logits
        if kl_inputs is None:
            return kernels.token_logprobs(logits, labels, inplace_backward=True), None
        return kernels.token_logprobs_and_kl(logits, kl_inputs, labels, inplace_backward=True)

    # The head runs eagerly under --compile: its kernels are fused already, and their Python chunk loops and
    # data-dependent checks would only break the graph.
    logp, kl = policy(input_ids, head=torch.compiler.disable(head))  # (B·L,) each
    shape = input_ids.shape
    return logp.view(shape)[:, :-1], None if kl is None else kl.view(shape)[:, :-1]


def kl_term(kind, token_kl, logp, ref_logp, mask):
    """The KL penalty of the policy loss, for the states whose action is trained. token_kl: (B, L-1) per-token
    full-vocabulary KL from policy_logprobs(..., kl_inputs) (kind "full" only)."""
    if kind == "full":
        # KL = mean_b ( Σ_j mask · KL[π_θ(·|s_j) ‖ π_ref(·|s_j)] / Σ_j mask ), over the full vocabulary
        kl = token_kl
    else:
        # k3 estimator on the data's token: exp(ref − logp) + (logp − ref) − 1 (≥ 0, no vocabulary pass;
        # unbiased only for tokens sampled from π, which offline data are not)
        log_ratio = ref_logp - logp
        kl = log_ratio.exp() - log_ratio - 1
    return masked_mean(kl, mask)


def nll_loss(logp, mask, mean="sequence"):
    """SFT and RS: negative log-likelihood of the response tokens. "sequence": each sequence's token mean, then the
    batch mean (every sequence weighs the same, and the loss does not depend on how the batch is cut into
    micro-batches); "token": the official code's token mean over the micro-batch (long responses weigh more)."""
    if mean == "token":
        return (mask * -logp).sum() / mask.sum().clamp(min=1)
    return masked_mean(-logp, mask)


def dpo_loss(logp, ref_logp, mask, beta):
    """Rows [0, P) are the chosen responses y_w, rows [P, 2P) the rejected y_l of the same prompts."""
    # DPO: −log σ(β[(log π − log π_ref)(y_w) − (log π − log π_ref)(y_l)]), log-probs summed over the response
    seq_log_ratio = (mask * (logp - ref_logp)).sum(-1)  # (2P,)
    chosen, rejected = seq_log_ratio.chunk(2)
    return -F.logsigmoid(beta * (chosen - rejected)).mean()


def kto_loss(logp, ref_logp, mask, rewards, beta, lambda_desirable=1.0, lambda_undesirable=1.0):
    """KTO on the same data: reward-1 responses are desirable, the others undesirable."""
    # KTO: desirable λ_D(1 − σ(β(r − z0))), undesirable λ_U(1 − σ(β(z0 − r))), r = Σ mask·(log π − log π_ref),
    # z0 = a detached batch estimate of KL[π‖π_ref]: the micro-batch mean of r, clamped at 0 (the KTO paper
    # estimates it on mismatched prompt/response pairs; the batch mean is a cheaper stand-in)
    r = (mask * (logp - ref_logp)).sum(-1)  # (B,)
    z0 = r.detach().mean().clamp(min=0)
    desirable = lambda_desirable * (1 - torch.sigmoid(beta * (r - z0)))
    undesirable = lambda_undesirable * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(rewards > 0.5, desirable, undesirable).mean()
