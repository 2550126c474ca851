"""
The Bellman-residual kernel: OREO's value loss and token-, step- or response-level policy loss (DESIGN.md §1)
over a (B, T) batch in one Triton kernel, with exactly oreo.oreo_loss's signature and results. oreo.oreo_loss
is the specification; this file only makes it one pass over memory. It runs on CUDA tensors (or under
TRITON_INTERPRET=1); the caller chooses between it and the specification (oreo.py: this kernel on CUDA).

One program per row b. Pass 1 walks the row's chunks from the end, carrying the suffix sum, so that
    lr[j] = mask·(logp − ref_logp),   acc[j] = Σ_{i≥j} lr[i] = carry + Σ_chunk lr − cumsum_chunk(lr)[j] + lr[j],
    res_V[j] = β·acc[j] + V(s_j) − R.
Because of the stop-gradients every policy residual is numerically a value residual or its token form, and
each loss is a mean of masked squares, so the forward already knows every per-token derivative up to the
upstream scalar and the row's denominator:
    value:     L_V = mean_b Σ_j mask·res_V² / n_b,           dL_V/dV(s_j)   = 2·mask·res_V[j] / (B·n_b)
    token:     res_π[j] = β·(acc[j+1] + logp[j] − ref[j]) + V(s_j) − R,   acc[j+1] = acc[j] − lr[j],
               L_π = mean_b Σ_j mask·res_π² / n_b,            dL_π/dlogp[j]  = 2β·mask·res_π[j] / (B·n_b)
    step:      res_π[t] = β·(acc[t] − acc[n(t)] + sg(acc[n(t)])) + sg(V(s_t)) − R = res_V[t] in value,
               L_π = mean_b Σ_t res_π[t]² / |starts_b|,       dL_π/dlogp[j]  = 2β·mask·res_π[t(j)] / (B·|starts_b|)
               where t(j) is the last step start ≤ j (no gradient before the first start)
    response:  res_π = β·acc[s_0] + sg(V(s_0)) − R = res_V[s_0],   L_π = mean_b res_π²,
               dL_π/dlogp[j] = 2β·mask·res_π / B   (mask is 0 before the first action s_0)
The kernel writes res_V and the policy coefficient (res_π[j], res_π[t(j)] or res_π) per token plus each row's
losses and denominators; the backward only multiplies by the upstream gradients. Pass 2 (step and response)
walks the chunks forward to spread each step's residual over its tokens with a segmented scan.
"""
import torch
import triton
import triton.language as tl

VARIANTS = {"token": 0, "step": 1, "response": 2}


@triton.jit
def _last_start(flag_a, value_a, flag_b, value_b):
    # segmented scan: the value of the latest position with flag 1 (b comes after a)
    return tl.maximum(flag_a, flag_b), tl.where(flag_b > 0.0, value_b, value_a)


@triton.jit
def _bellman_fwd_kernel(logp_ptr, ref_ptr, values_ptr, rewards_ptr, mask_ptr, starts_ptr, res_v_ptr, coef_ptr,
                        rows_ptr, T, beta, VARIANT: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    R = tl.load(rewards_ptr + row)
    lanes = tl.arange(0, BLOCK_T)
    n_chunks = tl.cdiv(T, BLOCK_T)
    carry = 0.0  # Σ lr over the chunks after this one
    n_actions = 0.0
    value_sum = 0.0
    policy_sum = 0.0
    n_starts = 0.0
    first_res = 0.0  # res_V at the first action (response variant)
    for c in range(0, n_chunks):
        offs = (n_chunks - 1 - c) * BLOCK_T + lanes
        inb = offs < T
        logp = tl.load(logp_ptr + base + offs, mask=inb, other=0.0).to(tl.float32)
        ref = tl.load(ref_ptr + base + offs, mask=inb, other=0.0).to(tl.float32)
        v = tl.load(values_ptr + base + offs, mask=inb, other=0.0).to(tl.float32)
        m = tl.load(mask_ptr + base + offs, mask=inb, other=0.0).to(tl.float32)
        lr = m * (logp - ref)
        chunk_total = tl.sum(lr, 0)
        acc = carry + chunk_total - tl.cumsum(lr, 0) + lr
        carry += chunk_total
        res_v = beta * acc + v - R
        tl.store(res_v_ptr + base + offs, res_v, mask=inb)
        n_actions += tl.sum(m, 0)
        value_sum += tl.sum(m * res_v * res_v, 0)
        if VARIANT == 0:
            res_pi = beta * (acc - lr + logp - ref) + v - R
            policy_sum += tl.sum(m * res_pi * res_pi, 0)
            tl.store(coef_ptr + base + offs, res_pi, mask=inb)
        elif VARIANT == 1:
            s = tl.load(starts_ptr + base + offs, mask=inb, other=0.0).to(tl.float32)
            n_starts += tl.sum(s, 0)
            policy_sum += tl.sum(s * res_v * res_v, 0)
        else:
            first = tl.min(tl.where(m > 0.0, offs, T), 0)  # chunks go backwards: the last one found is the first
            first_res = tl.where(first < T, tl.sum(tl.where(offs == first, res_v, 0.0), 0), first_res)
    if VARIANT == 2:
        policy_sum = first_res * first_res  # 0 for a row without actions
    tl.debug_barrier()  # pass 2 re-reads res_V written above
    if VARIANT != 0:
        current = 0.0  # residual of the step in progress (0 before the first step start)
        for c in range(0, n_chunks):
            offs = c * BLOCK_T + lanes
            inb = offs < T
            if VARIANT == 1:
                s = tl.load(starts_ptr + base + offs, mask=inb, other=0.0).to(tl.float32)
                res_v = tl.load(res_v_ptr + base + offs, mask=inb, other=0.0)
                seen, last = tl.associative_scan((s, s * res_v), 0, _last_start)
                coef = tl.where(seen > 0.0, last, current)
                current = tl.where(tl.max(s, 0) > 0.0, tl.sum(tl.where(lanes == BLOCK_T - 1, last, 0.0), 0), current)
            else:
                coef = tl.zeros([BLOCK_T], tl.float32) + first_res
            tl.store(coef_ptr + base + offs, coef, mask=inb)
    if VARIANT == 0:
        policy_denom = tl.maximum(n_actions, 1.0)
    elif VARIANT == 1:
        policy_denom = tl.maximum(n_starts, 1.0)
    else:
        policy_denom = 1.0
    value_denom = tl.maximum(n_actions, 1.0)
    tl.store(rows_ptr + row * 4 + 0, policy_sum / policy_denom)
    tl.store(rows_ptr + row * 4 + 1, value_sum / value_denom)
    tl.store(rows_ptr + row * 4 + 2, policy_denom)
    tl.store(rows_ptr + row * 4 + 3, value_denom)


def _f32(x):
    # (B, T) copies are negligible next to the (N, V) logits
    return x.detach().to(torch.float32).contiguous()


def bellman_forward_triton(logp, ref_logp, values, rewards, mask, beta, variant, step_start=None, block_t=None):
    """
    (B, T) inputs -> (res_v (B, T), coef (B, T), rows (B, 4)) fp32: the value residuals, the policy coefficient per
    token, and per row [policy loss, value loss, policy denominator, value denominator].
    """
    B, T = logp.shape
    logp, ref_logp, values, rewards, mask = map(_f32, (logp, ref_logp, values, rewards, mask))
    starts = _f32(step_start) if variant == "step" else mask
    res_v = torch.empty(B, T, dtype=torch.float32, device=logp.device)
    coef = torch.empty(B, T, dtype=torch.float32, device=logp.device)
    rows = torch.empty(B, 4, dtype=torch.float32, device=logp.device)
    block = block_t or min(triton.next_power_of_2(max(T, 1)), 1024)
    if B > 0:
        _bellman_fwd_kernel[(B,)](logp, ref_logp, values, rewards, mask, starts, res_v, coef, rows, T, float(beta),
                                  VARIANT=VARIANTS[variant], BLOCK_T=block, num_warps=4)
    return res_v, coef, rows


class BellmanLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, ref_logp, values, rewards, mask, beta, variant, step_start, block_t):
        res_v, coef, rows = bellman_forward_triton(logp, ref_logp, values, rewards, mask, beta, variant, step_start,
                                                   block_t)
        ctx.save_for_backward(res_v, coef, rows, mask)
        ctx.beta, ctx.logp_dtype, ctx.values_dtype = beta, logp.dtype, values.dtype
        return rows[:, 0].mean().to(logp.dtype), rows[:, 1].mean().to(logp.dtype)

    @staticmethod
    def backward(ctx, grad_policy, grad_value):
        res_v, coef, rows, mask = ctx.saved_tensors
        B = res_v.shape[0]
        m = mask.to(torch.float32)
        # dL_π/dlogp[j] = 2β·mask·coef[j] / (B·policy_denom_b);  dL_V/dV(s_j) = 2·mask·res_V[j] / (B·n_b)
        grad_logp = (grad_policy.float() * 2 * ctx.beta / B) * m * coef / rows[:, 2:3]
        grad_values = (grad_value.float() * 2 / B) * m * res_v / rows[:, 3:4]
        return (grad_logp.to(ctx.logp_dtype), None, grad_values.to(ctx.values_dtype), None, None, None, None, None,
                None)


def _check(logp, ref_logp, values, rewards, mask, variant, step_start):
    if variant not in VARIANTS:
        raise ValueError(f"bellman_loss: variant must be 'token', 'step' or 'response', got {variant!r}")
    if variant == "step" and step_start is None:
        raise ValueError("bellman_loss: variant 'step' needs step_start: (B, T) bool marking the first token of each "
                         "step")
    for name, x in (("ref_logp", ref_logp), ("values", values), ("mask", mask)):
        if x.shape != logp.shape:
            raise ValueError(f"bellman_loss: {name} must have logp's shape {tuple(logp.shape)}, got {tuple(x.shape)}")
    if logp.dim() != 2 or rewards.shape != logp.shape[:1]:
        raise ValueError(f"bellman_loss: logp must be (B, T) and rewards (B,), got {tuple(logp.shape)} and "
                         f"{tuple(rewards.shape)}")


def bellman_loss(logp, ref_logp, values, rewards, mask, beta, variant="token", step_start=None, block_t=None):
    """
    Exactly oreo.oreo_loss (same arguments, same (policy_loss, value_loss), same gradients into logp and values),
    in one Triton kernel. block_t: positions per chunk of a row (default: the row, at most 1024).
    """
    _check(logp, ref_logp, values, rewards, mask, variant, step_start)
    return BellmanLoss.apply(logp, ref_logp, values, rewards, mask, beta, variant, step_start, block_t)
