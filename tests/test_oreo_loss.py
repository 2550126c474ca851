import pytest
import torch

from oreo import oreo_loss
from tests.oreo_reference import oreo_loss_loops, random_oreo_batch


@pytest.mark.parametrize("variant", ["token", "step", "response"])
@pytest.mark.parametrize("B,T,seed", [(1, 1, 0), (3, 7, 1), (4, 13, 2), (2, 5, 3)])
def test_oreo_loss_matches_float64_loops_values_and_gradients(variant, B, T, seed):
    logp, ref_logp, values, rewards, mask, step_start = random_oreo_batch(B, T, seed)
    if B > 1:
        mask[-1] = 0  # a row with no action at all must not break anything
        step_start[-1] = False
    ours_in = [t.clone().requires_grad_(True) for t in (logp, values)]
    ref_in = [t.clone().requires_grad_(True) for t in (logp, values)]
    beta = 0.37
    pol, val = oreo_loss(ours_in[0], ref_logp, ours_in[1], rewards, mask, beta, variant, step_start)
    pol_r, val_r = oreo_loss_loops(ref_in[0], ref_logp, ref_in[1], rewards, mask, beta, variant, step_start)
    torch.testing.assert_close(pol, pol_r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(val, val_r, rtol=1e-10, atol=1e-12)
    for loss, loss_r in ((pol, pol_r), (val, val_r)):
        for a, b in zip(grads(loss, ours_in), grads(loss_r, ref_in)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def grads(loss, inputs):
    """d loss / d inputs, zeros where the loss does not depend on an input (e.g. a batch with no step start)."""
    if not loss.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    g = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(x) if gi is None else gi for x, gi in zip(inputs, g)]


@pytest.mark.parametrize("variant", ["token", "step", "response"])
def test_policy_loss_gives_no_gradient_to_values_and_value_loss_none_to_logp(variant):
    logp, ref_logp, values, rewards, mask, step_start = random_oreo_batch(3, 9, seed=7)
    logp.requires_grad_(True)
    values.requires_grad_(True)
    pol, val = oreo_loss(logp, ref_logp, values, rewards, mask, 0.1, variant, step_start)
    g_values = torch.autograd.grad(pol, values, allow_unused=True)[0]
    g_logp = torch.autograd.grad(val, logp, allow_unused=True)[0]
    assert g_values is None or not g_values.any(), "policy loss leaked gradient into the value model"
    assert g_logp is None or not g_logp.any(), "value loss leaked gradient into the policy"
    assert torch.autograd.grad(pol, logp)[0].abs().sum() > 0, "policy loss must train the policy"


def test_zero_residual_when_values_satisfy_soft_bellman_equation():
    # If V(s_j) = R − β·acc[j] exactly (the telescoped soft Bellman equation), both residuals vanish.
    logp, ref_logp, _, rewards, mask, _ = random_oreo_batch(2, 6, seed=11)
    mask[:] = 1
    beta = 0.5
    acc = (mask * (logp - ref_logp)).flip(-1).cumsum(-1).flip(-1)
    values = rewards[:, None] - beta * acc
    pol, val = oreo_loss(logp, ref_logp, values, rewards, mask, beta, "token")
    assert pol.item() < 1e-20 and val.item() < 1e-20
