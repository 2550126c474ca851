"""
OREO: Offline REasoning Optimization (arXiv 2412.16145), the trainer.

The loss below is the method; the trainer around it follows.
"""
import torch
import torch.nn.functional as F


def reverse_cumsum(x):
    """acc[..., j] = sum_{i >= j} x[..., i] along the last dimension."""
    return x.flip(-1).cumsum(-1).flip(-1)


def oreo_loss(logp, ref_logp, values, rewards, mask, beta, variant="token", step_start=None):
    """
    OREO's policy and value losses (DESIGN.md §1), without the KL term (the trainer adds it).

    logp, ref_logp: (B, T) log-probs of the action x_{j+1} at state s_j under the policy and the reference
    values:         (B, T) V(s_j)
    rewards:        (B,)   terminal reward R
    mask:           (B, T) 1 where x_{j+1} is an action token
    step_start:     (B, T) bool, True at the state before each step's first token (variant "step" only)
    Returns (policy_loss, value_loss): the policy loss only sends gradient into logp, the value loss only into
    values.
    """
    if variant not in ("token", "step", "response"):
        raise ValueError(f"variant must be 'token', 'step' or 'response', got {variant!r}")
    if variant == "step" and step_start is None:
        raise ValueError("variant 'step' needs step_start: (B, T) bool marking the first token of each step")
    mask = mask.to(logp.dtype)
    R = rewards.to(logp.dtype)[:, None]  # (B, 1)
    n_actions = mask.sum(-1).clamp(min=1)  # (B,)

    # masked log-ratio lr[j] = mask·(logp − ref_logp), and acc[j] = Σ_{i≥j} lr[i]
    log_ratio = mask * (logp - ref_logp)
    acc = reverse_cumsum(log_ratio)  # (B, T), carries the policy's gradient
    acc_sg = acc.detach()
    values_sg = values.detach()

    # Value loss: res_V[j] = β·acc[j] + V(s_j) − R; the log-probs are constants here.
    res_v = beta * acc_sg + values - R
    value_loss = ((mask * res_v**2).sum(-1) / n_actions).mean()

    if variant == "token":
        # Token-level policy loss: res_π[j] = β·(sg(acc[j+1]) + logp[j] − ref_logp[j]) + sg(V(s_j)) − R,
        # with acc[T] = 0. Only the current token's logp gets gradient, so every step is on the same scale.
        acc_next = F.pad(acc_sg[:, 1:], (0, 1))
        res_pi = beta * (acc_next + logp - ref_logp) + values_sg - R
        policy_loss = ((mask * res_pi**2).sum(-1) / n_actions).mean()
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
        policy_loss = ((starts * res_pi**2).sum(-1) / starts.sum(-1).clamp(min=1)).mean()
    else:
        # Response-level policy loss, one residual per sequence at its first action state s_0:
        # res_π = β·acc[s_0] + sg(V(s_0)) − R.
        first = mask.argmax(-1, keepdim=True)  # (B, 1) first action position
        has_action = (mask.sum(-1) > 0).to(logp.dtype)
        res_pi = beta * acc.gather(1, first) + values_sg.gather(1, first) - R
        policy_loss = (has_action * res_pi.squeeze(1) ** 2).mean()
    return policy_loss, value_loss
