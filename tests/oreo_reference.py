"""
An independent float64 re-derivation of OREO's losses (DESIGN.md §1), written as plain loops over rows and
positions, so that the vectorised oreo.oreo_loss and the Triton Bellman kernel can be checked against it.
Gradients come from autograd on these loops; stop-gradients are explicit .detach() calls.
"""
import torch


def oreo_loss_loops(logp, ref_logp, values, rewards, mask, beta, variant="token", step_start=None):
    B, T = logp.shape
    policy_terms, value_terms = [], []
    for b in range(B):
        R = float(rewards[b])
        m = [float(mask[b, j]) for j in range(T)]

        def acc(j, detach):  # Σ_{i≥j} mask·(logp − ref), 0 past the end
            total = torch.zeros((), dtype=torch.float64)
            for i in range(j, T):
                lp = logp[b, i].detach() if detach else logp[b, i]
                total = total + m[i] * (lp - ref_logp[b, i])
            return total

        n = sum(m)
        v_sum = torch.zeros((), dtype=torch.float64)
        for j in range(T):
            if m[j]:
                v_sum = v_sum + (beta * acc(j, True) + values[b, j] - R) ** 2
        value_terms.append(v_sum / max(n, 1.0))

        if variant == "token":
            p_sum = torch.zeros((), dtype=torch.float64)
            for j in range(T):
                if m[j]:
                    res = beta * (acc(j + 1, True) + logp[b, j] - ref_logp[b, j]) + values[b, j].detach() - R
                    p_sum = p_sum + res**2
            policy_terms.append(p_sum / max(n, 1.0))
        elif variant == "step":
            starts = [j for j in range(T) if bool(step_start[b, j])]
            p_sum = torch.zeros((), dtype=torch.float64)
            for k, t in enumerate(starts):
                nxt = starts[k + 1] if k + 1 < len(starts) else T
                step_part = acc(t, False) - acc(nxt, False)  # the step's own tokens, with gradient
                res = beta * (step_part + acc(nxt, True)) + values[b, t].detach() - R
                p_sum = p_sum + res**2
            policy_terms.append(p_sum / max(len(starts), 1))
        else:
            actions = [j for j in range(T) if m[j]]
            if actions:
                s0 = actions[0]
                res = beta * acc(s0, False) + values[b, s0].detach() - R
                policy_terms.append(res**2)
            else:
                policy_terms.append(torch.zeros((), dtype=torch.float64))
    return torch.stack(policy_terms).mean(), torch.stack(value_terms).mean()


def random_oreo_batch(B, T, seed, dtype=torch.float64, p_action=0.7):
    """A fresh random batch: prompt-like masked prefixes, random action masks, step starts inside actions."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=dtype) * 5
    ref_logp = -torch.rand(B, T, generator=g, dtype=dtype) * 5
    values = torch.randn(B, T, generator=g, dtype=dtype)
    rewards = (torch.rand(B, generator=g) < 0.5).to(dtype)
    mask = (torch.rand(B, T, generator=g) < p_action).to(dtype)
    prompt_len = torch.randint(0, T, (B,), generator=g)
    mask[torch.arange(T)[None, :] < prompt_len[:, None]] = 0
    step_start = (torch.rand(B, T, generator=g) < 0.3) & (mask > 0)
    return logp, ref_logp, values, rewards, mask, step_start
