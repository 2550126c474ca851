"""
Kernels (kernels/) against independent float64 references, forward and every gradient.

The Triton kernels run here under TRITON_INTERPRET=1 (tests/conftest.py) through the *_triton entry points; the
chunked PyTorch path that the public functions take on CPU is tested through the *_torch entry points, so both
paths run in one session. Shapes stay tiny: the interpreter is thousands of times slower than PyTorch.
"""
import pytest
import torch

from kernels import bellman, kl, linear, logprobs, reference
from oreo_reference import oreo_loss_loops, random_oreo_batch

# The kernels evaluate both sides of tl.where; in masked-out lanes that is e.g. (−inf) − (−inf), which numpy in the
# interpreter reports although the result is never selected.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

BACKENDS = ["triton", "torch"]
LOGPROBS = {"triton": logprobs.token_logprobs_triton, "torch": logprobs.token_logprobs_torch}
KL = {"triton": kl.token_kl_triton, "torch": kl.token_kl_torch}
# Forward results are computed in fp32 whatever the input dtype; gradients come back in the input dtype.
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
            torch.float16: dict(rtol=2e-3, atol=1e-6)}


def random_logits(N, V, dtype, seed, scale=3.0, neg_inf=True, masked_row=None):
    """(N, V) logits with a few −inf entries per row (never all of a row) and optionally one row all −inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    if neg_inf and V > 1:
        x[torch.rand(N, V, generator=g) < 0.2] = float("-inf")
        x[:, 0] = torch.randn(N, generator=g, dtype=torch.float64)  # every row keeps a finite entry
    if masked_row is not None:
        x[masked_row] = float("-inf")
    return x.to(dtype)


def finite_labels(x, seed):
    """A label per row on a finite logit (any label for an all −inf row)."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.isfinite(x.double()).double() + 1e-12
    return torch.multinomial(weights, 1, generator=g).squeeze(1)


def ref_logprobs_and_grad(x, labels, grad, ignore_index=-100):
    """float64: logp = log softmax(x)[label] (0 for ignored labels and all −inf rows) and d(Σ grad·logp)/dx."""
    x = x.double()
    has_mass = torch.isfinite(x).any(-1)
    x = torch.where(has_mass[:, None], x, 0.0).requires_grad_()  # all −inf rows: no NaN through autograd
    valid = (labels != ignore_index) & has_mass
    logp = x.log_softmax(-1).gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)
    logp = torch.where(valid, logp, 0.0)
    (logp * grad.double()).sum().backward()
    return logp.detach(), x.grad


def ref_kl_and_grad(x, y, grad):
    """float64 KL[softmax(x) ‖ softmax(y)] per row (0 for all −inf policy rows) and d(Σ grad·KL)/dx."""
    x, y = x.double(), y.double()
    has_mass = torch.isfinite(x).any(-1)
    x = torch.where(has_mass[:, None], x, 0.0).requires_grad_()
    y = torch.where(has_mass[:, None], y, 0.0)
    logp, logq = x.log_softmax(-1), y.log_softmax(-1)
    p = logp.exp()
    support = p > 0  # terms with p_i = 0 are 0; keep −inf out of them so autograd gives no NaN
    kl_rows = (p * (torch.where(support, logp, 0.0) - torch.where(support, logq, 0.0))).sum(-1)
    kl_rows = torch.where(has_mass, kl_rows, 0.0)
    (kl_rows * grad.double()).sum().backward()
    return kl_rows.detach(), x.grad


def assert_grad_close(actual, expected, dtype, scale=1.0):
    tol = GRAD_TOL[dtype]
    torch.testing.assert_close(actual.double(), expected, rtol=tol["rtol"] * scale, atol=tol["atol"] * scale)


# ---------------------------------------------------------------------------------------------------------- logprobs

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,V", [(1, 1), (5, 3), (6, 4231)])
def test_token_logprobs_match_float64_with_ignored_labels_and_inf(backend, dtype, N, V):
    x = random_logits(N, V, dtype, seed=V + N, masked_row=N - 1 if N > 2 else None)
    labels = finite_labels(x, seed=V)
    if N > 2:
        labels[1] = -100
    grad = torch.randn(N, generator=torch.Generator().manual_seed(7))
    logits = x.clone().requires_grad_()
    logp = LOGPROBS[backend](logits, labels)
    logp.backward(grad)
    ref_logp, ref_grad = ref_logprobs_and_grad(x, labels, grad)
    assert torch.equal(logits.detach(), x), "the backward changed the logits (inplace_backward is off)"
    assert logp.dtype == torch.float32 and logits.grad.dtype == dtype
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    assert_grad_close(logits.grad, ref_grad, dtype)
    if N > 2:
        assert logp[1] == 0 and logits.grad[1].abs().max() == 0, "an ignored label must give 0 and no gradient"
        assert logp[N - 1] == 0 and logits.grad[N - 1].abs().max() == 0, "an all −inf row must give 0, no NaN"


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_stay_accurate_for_logits_of_1e4(backend):
    x = random_logits(4, 300, torch.float32, seed=3, scale=1e4)
    labels = finite_labels(x, seed=3)
    grad = torch.randn(4, generator=torch.Generator().manual_seed(3))
    logits = x.clone().requires_grad_()
    LOGPROBS[backend](logits, labels).backward(grad)
    ref_logp, ref_grad = ref_logprobs_and_grad(x, labels, grad)
    logp = LOGPROBS[backend](x, labels)
    # the saved fp32 LSE is rounded to fp32's spacing at 1e4 (≈ 1e-3), so probabilities carry ~1e-3 relative error
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-6, atol=2e-3)
    torch.testing.assert_close(logits.grad.double(), ref_grad, rtol=2e-3, atol=1e-6)
    assert torch.isfinite(logits.grad).all()


def test_triton_logprobs_with_many_chunks_and_a_ragged_tail():
    # block 512 over V = 4231: nine chunks, the last one 135 wide, so the online LSE rescales many times
    x = random_logits(3, 4231, torch.float32, seed=11)
    labels = finite_labels(x, seed=11)
    grad = torch.randn(3, generator=torch.Generator().manual_seed(11))
    logp, lse = logprobs.logprobs_forward_triton(x, labels, block_v=512)
    grad_logits = logprobs.logprobs_backward_triton(x, labels, lse, grad, block_v=512)
    ref_logp, ref_grad = ref_logprobs_and_grad(x, labels, grad)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    assert_grad_close(grad_logits, ref_grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_overwrites_only_its_own_logits(backend):
    # the logits are a column slice of a wider buffer (row stride 40, V = 33): the columns beyond must survive
    buffer = random_logits(5, 40, torch.float32, seed=5)
    logits = buffer[:, :33]
    labels = finite_labels(logits, seed=5)
    labels[2] = -100
    grad = torch.randn(5, generator=torch.Generator().manual_seed(5))
    expected_logp, expected_grad = ref_logprobs_and_grad(logits, labels, grad)
    untouched, labels_before = buffer[:, 33:].clone(), labels.clone()

    leaf = buffer.clone().requires_grad_()
    work = leaf * 1.0  # a non-leaf (5, 40) buffer; the logits are a strided view of its first 33 columns
    inplace_logits = work[:, :33]
    seen = {}
    inplace_logits.register_hook(lambda g: seen.setdefault("grad", g.clone()))
    logp = LOGPROBS[backend](inplace_logits, labels, inplace_backward=True)
    logp.backward(grad)
    torch.testing.assert_close(logp.double(), expected_logp, rtol=1e-5, atol=1e-5)
    assert_grad_close(seen["grad"], expected_grad, torch.float32)
    assert_grad_close(leaf.grad[:, :33], expected_grad, torch.float32)
    assert leaf.grad[:, 33:].abs().max() == 0, "gradient leaked into columns outside the logits"
    assert torch.equal(work[:, 33:].detach(), untouched), "the backward wrote outside its logits"
    assert torch.equal(labels, labels_before)
    torch.testing.assert_close(inplace_logits.detach().double(), expected_grad, rtol=1e-5, atol=1e-6,
                               msg="inplace_backward should leave the gradient in the logits buffer")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_labels_and_upstream_gradients_are_read_correctly(backend):
    x = random_logits(4, 37, torch.float32, seed=13)
    labels = torch.stack([finite_labels(x, seed=13), torch.zeros(4, dtype=torch.long)], 1)[:, 0]  # stride 2
    grad = torch.randn(4, 2, generator=torch.Generator().manual_seed(13))[:, 1]  # stride 2
    logits = x.clone().requires_grad_()
    LOGPROBS[backend](logits, labels).backward(grad)
    ref_logp, ref_grad = ref_logprobs_and_grad(x, labels.contiguous(), grad.contiguous())
    torch.testing.assert_close(LOGPROBS[backend](x, labels).double(), ref_logp, rtol=1e-5, atol=1e-5)
    assert_grad_close(logits.grad, ref_grad, torch.float32)


def test_out_of_vocabulary_label_is_an_error_naming_the_function():
    with pytest.raises(ValueError, match="token_logprobs.*outside the vocabulary"):
        logprobs.token_logprobs(torch.zeros(2, 5), torch.tensor([1, 5]))


def test_public_functions_on_cpu_take_the_pytorch_path_and_agree_with_naive():
    x = random_logits(4, 50, torch.float32, seed=2, neg_inf=False)
    y = random_logits(4, 50, torch.float32, seed=4, neg_inf=False)
    labels = finite_labels(x, seed=2)
    torch.testing.assert_close(logprobs.token_logprobs(x, labels), reference.naive_token_logprobs(x, labels))
    torch.testing.assert_close(kl.token_kl(x, y), reference.naive_token_kl(x, y))


# ---------------------------------------------------------------------------------------------------------------- KL

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,V", [(1, 1), (5, 3), (6, 4231)])
def test_token_kl_matches_float64(backend, dtype, N, V):
    x = random_logits(N, V, dtype, seed=V + 1, masked_row=N - 1 if N > 2 else None)
    # the reference keeps mass wherever the policy has it (else KL = inf); it may be −inf where the policy is
    y = random_logits(N, V, torch.float64, seed=V + 2, neg_inf=False)
    y = torch.where(torch.isfinite(x.double()) | (torch.rand(N, V) < 0.5), y, float("-inf")).to(dtype)
    grad = torch.randn(N, generator=torch.Generator().manual_seed(8))
    logits = x.clone().requires_grad_()
    ref_logits = y.clone().requires_grad_()
    kl_rows = KL[backend](logits, ref_logits)
    kl_rows.backward(grad)
    expected, expected_grad = ref_kl_and_grad(x, y, grad)
    assert torch.equal(logits.detach(), x) and torch.equal(ref_logits.detach(), y), "the KL changed its inputs"
    assert kl_rows.dtype == torch.float32 and ref_logits.grad is None, "the reference must get no gradient"
    torch.testing.assert_close(kl_rows.double(), expected, rtol=1e-5, atol=1e-5)
    assert_grad_close(logits.grad, expected_grad, dtype)
    if N > 2:
        assert kl_rows[N - 1] == 0 and logits.grad[N - 1].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_kl_stays_accurate_for_logits_of_1e4(backend):
    x = random_logits(3, 200, torch.float32, seed=21, scale=1e4, neg_inf=False)
    y = x + random_logits(3, 200, torch.float32, seed=22, scale=1.0, neg_inf=False)  # a nearby reference
    grad = torch.randn(3, generator=torch.Generator().manual_seed(2))
    logits = x.clone().requires_grad_()
    kl_rows = KL[backend](logits, y)
    kl_rows.backward(grad)
    expected, expected_grad = ref_kl_and_grad(x, y, grad)
    torch.testing.assert_close(kl_rows.double(), expected, rtol=1e-3, atol=2e-3)
    torch.testing.assert_close(logits.grad.double(), expected_grad, rtol=5e-3, atol=1e-5)


def test_triton_kl_with_many_chunks():
    x = random_logits(2, 4231, torch.float32, seed=31)
    y = random_logits(2, 4231, torch.float32, seed=32, neg_inf=False)
    grad = torch.randn(2, generator=torch.Generator().manual_seed(31))
    labels = finite_labels(x, seed=31)
    grad_logp = torch.randn(2, generator=torch.Generator().manual_seed(32))
    kl_rows, lse, ref_lse, logp = kl.kl_forward_triton(x, y, labels, block_v=512)
    grad_logits = kl.kl_backward_triton(x, y, kl_rows, lse, ref_lse, grad, labels, grad_logp, block_v=512)
    expected, expected_grad = ref_kl_and_grad(x, y, grad)
    expected_logp, expected_logp_grad = ref_logprobs_and_grad(x, labels, grad_logp)
    torch.testing.assert_close(kl_rows.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp.double(), expected_logp, rtol=1e-5, atol=1e-5)
    assert_grad_close(grad_logits, expected_grad + expected_logp_grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_logprobs_and_kl_in_one_pass_equal_the_two_separately(backend, dtype, inplace):
    N, V = 6, 1031
    x = random_logits(N, V, dtype, seed=90, masked_row=4)
    y = random_logits(N, V, torch.float64, seed=91, neg_inf=False)
    y = torch.where(torch.isfinite(x.double()) | (torch.rand(N, V) < 0.5), y, float("-inf")).to(dtype)
    labels = finite_labels(x, seed=90)
    labels[2] = -100
    g = torch.Generator().manual_seed(92)
    grad_logp, grad_kl = torch.randn(N, generator=g), torch.randn(N, generator=g)
    leaf = x.clone().requires_grad_()
    logits = leaf * 1  # a non-leaf buffer that the in-place backward may overwrite
    logp, kl_rows = KL[backend](logits, y, labels, inplace_backward=inplace)
    ((logp * grad_logp).sum() + (kl_rows * grad_kl).sum()).backward()
    expected_logp, grad_from_logp = ref_logprobs_and_grad(x, labels, grad_logp)
    expected_kl, grad_from_kl = ref_kl_and_grad(x, y, grad_kl)
    torch.testing.assert_close(logp.double(), expected_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl_rows.double(), expected_kl, rtol=1e-5, atol=1e-5)
    assert_grad_close(leaf.grad, grad_from_logp + grad_from_kl, dtype)


# ----------------------------------------------------------------------------------------------------------- Bellman

@pytest.mark.parametrize("variant", ["token", "step", "response"])
@pytest.mark.parametrize("block_t", [None, 8])
def test_bellman_kernel_equals_oreo_loss_and_the_loop_derivation(variant, block_t):
    from oreo import oreo_loss

    B, T, beta = 5, 37, 0.1
    logp, ref_logp, values, rewards, mask, step_start = random_oreo_batch(B, T, seed=40 + len(variant))
    mask[3] = 0  # a row without actions
    step_start[3] = False
    step_start[1, :] = False  # a row with actions but no step start
    upstream = (1.3, 0.7)

    def losses_and_grads(fn, dtype, **kw):
        lp = logp.to(dtype, copy=True).requires_grad_()
        v = values.to(dtype, copy=True).requires_grad_()
        policy, value = fn(lp, ref_logp.to(dtype), v, rewards.to(dtype), mask.to(dtype), beta, variant, step_start,
                           **kw)
        (upstream[0] * policy + upstream[1] * value).backward()
        return policy.double(), value.double(), lp.grad.double(), v.grad.double()

    kernel = losses_and_grads(bellman.bellman_loss, torch.float32, block_t=block_t)
    for name, expected in (("oreo_loss", losses_and_grads(oreo_loss, torch.float64)),
                           ("oreo_loss_loops", losses_and_grads(oreo_loss_loops, torch.float64))):
        for what, a, b in zip(("policy loss", "value loss", "d logp", "d values"), kernel, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{variant}: {what} differs from {name}: {m}")


def test_bellman_step_residual_reaches_every_token_of_its_step_across_chunks():
    # one row, one step from position 2 to the end (T = 20, chunks of 4): every action token after the start
    # gets the same policy gradient, positions before it none
    T = 20
    logp = -torch.rand(1, T, dtype=torch.float64)
    ref_logp = -torch.rand(1, T, dtype=torch.float64)
    values, rewards = torch.zeros(1, T), torch.ones(1)
    mask = torch.ones(1, T)
    step_start = torch.zeros(1, T, dtype=torch.bool)
    step_start[0, 2] = True
    lp = logp.float().requires_grad_()
    policy, _ = bellman.bellman_loss(lp, ref_logp.float(), values, rewards, mask, 0.5, "step", step_start,
                                     block_t=4)
    policy.backward()
    assert lp.grad[0, :2].abs().max() == 0
    assert torch.allclose(lp.grad[0, 2:], lp.grad[0, 2].expand(T - 2)) and lp.grad[0, 2] != 0


# ------------------------------------------------------------------------------------------------------ fused linear

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_ref", [False, True])
def test_linear_logprobs_equal_the_naive_path(backend, with_ref):
    g = torch.Generator().manual_seed(50)
    N, D, V, D_ref = 11, 16, 257, 8
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5
    ref_hidden = torch.randn(N, D_ref, generator=g, dtype=torch.float64)
    ref_weight = torch.randn(V, D_ref, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[4] = -100
    g_logp, g_kl = torch.randn(N, generator=g), torch.randn(N, generator=g)
    ref_kw = dict(ref_hidden=ref_hidden, ref_weight=ref_weight) if with_ref else {}

    def run(fn, dtype, **kw):
        h = hidden.to(dtype, copy=True).requires_grad_()
        w = weight.to(dtype, copy=True).requires_grad_()
        out = fn(h, w, labels, **{k: x.to(dtype) for k, x in ref_kw.items()}, **kw)
        logp, kl_rows = out if with_ref else (out, torch.zeros(N))
        ((logp * g_logp).sum() + (kl_rows * g_kl).sum()).backward()
        return logp.double(), kl_rows.double(), h.grad.double(), w.grad.double()

    fused = run(linear.linear_logprobs, torch.float32, chunk_size=4, backend=backend)  # chunks 4, 4, 3
    naive = run(reference.naive_linear_logprobs, torch.float64)
    for what, a, b in zip(("logp", "kl", "d hidden", "d weight"), fused, naive):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{what} differs from the naive path")
    assert fused[0][4] == 0


def test_linear_logprobs_bf16_equal_the_naive_path_in_bf16():
    g = torch.Generator().manual_seed(60)
    N, D, V = 9, 32, 100
    hidden = torch.randn(N, D, generator=g).bfloat16()
    weight = (torch.randn(V, D, generator=g) * 0.3).bfloat16()
    labels = torch.randint(0, V, (N,), generator=g)
    results = []
    for fn, kw in ((linear.linear_logprobs, dict(chunk_size=4, backend="triton")), (reference.naive_linear_logprobs,
                                                                                     {})):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp = fn(h, w, labels, **kw)
        logp.sum().backward()
        results.append((logp, h.grad, w.grad))
    for what, a, b in zip(("logp", "d hidden", "d weight"), *results):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=f"bf16 {what}")


# ------------------------------------------------------------------------------------------ GPU (compiled kernels)

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton)")


@requires_gpu
def test_gpu_kernels_match_float64_at_a_real_vocabulary():
    N, V = 64, 151936
    x = random_logits(N, V, torch.bfloat16, seed=70, masked_row=5).cuda()
    y = random_logits(N, V, torch.float64, seed=71, neg_inf=False)
    y = torch.where(torch.isfinite(x.double().cpu()), y, float("-inf")).to(torch.bfloat16).cuda()
    labels = finite_labels(x.cpu(), seed=70).cuda()
    labels[3] = -100
    grad = torch.randn(N, device="cuda")
    logits = x.clone().requires_grad_()
    logprobs.token_logprobs(logits, labels).backward(grad)
    ref_logp, ref_grad = ref_logprobs_and_grad(x, labels, grad)
    torch.testing.assert_close(logprobs.token_logprobs(x, labels).double(), ref_logp, rtol=1e-5, atol=1e-4)
    assert_grad_close(logits.grad, ref_grad, torch.bfloat16)
    logits.grad = None
    kl.token_kl(logits, y).backward(grad)
    expected, expected_grad = ref_kl_and_grad(x, y, grad)
    torch.testing.assert_close(kl.token_kl(x, y).double(), expected, rtol=1e-4, atol=1e-4)
    assert_grad_close(logits.grad, expected_grad, torch.bfloat16)


@requires_gpu
def test_gpu_rows_past_2_31_elements_are_addressed_correctly():
    V = 151936
    N = (1 << 31) // V + 4  # the last rows start beyond element 2³¹: int32 offsets would wrap
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, V, (N,), device="cuda")
    logits = x.clone().requires_grad_()
    logp = logprobs.token_logprobs(logits, labels, inplace_backward=False)
    logp.backward(torch.ones(N, device="cuda"))
    tail = slice(N - 8, N)
    ref_logp, ref_grad = ref_logprobs_and_grad(x[tail], labels[tail], torch.ones(8, device="cuda"))
    torch.testing.assert_close(logp[tail].double(), ref_logp, rtol=1e-5, atol=1e-4)
    assert_grad_close(logits.grad[tail], ref_grad, torch.bfloat16)


@requires_gpu
@pytest.mark.parametrize("variant", ["token", "step", "response"])
def test_gpu_bellman_kernel_equals_oreo_loss_on_long_rows(variant):
    from oreo import oreo_loss

    batch = [t.cuda() for t in random_oreo_batch(3, 2500, seed=80)]  # T = 2500: three chunks of 1024
    logp, ref_logp, values, rewards, mask, step_start = batch
    results = []
    for fn, dtype in ((bellman.bellman_loss, torch.float32), (oreo_loss, torch.float64)):
        lp, v = logp.to(dtype, copy=True).requires_grad_(), values.to(dtype, copy=True).requires_grad_()
        policy, value = fn(lp, ref_logp.to(dtype), v, rewards.to(dtype), mask.to(dtype), 0.03, variant, step_start)
        (policy + value).backward()
        results.append((policy.double(), value.double(), lp.grad.double(), v.grad.double()))
    for what, a, b in zip(("policy loss", "value loss", "d logp", "d values"), *results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"{variant} {what}: {m}")
