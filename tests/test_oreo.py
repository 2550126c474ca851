"""
The trainer (oreo.py): baseline losses against their textbook formulas, the KL term against a float64
full-vocabulary KL, and whole runs of a tiny model on tiny data — DDP and FSDP against one process, exact resume
after SIGKILL (also during a checkpoint write), learning on a fixed batch, NaN handling, option checks.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import oreo
from tests.hf_models import make_checkpoint
from tests.launch import ROOT, launch

# One thread per process: 1-process and 2-process runs then do the same arithmetic, and the 2 shared cores suffice.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
TINY = ["--n-layer", "2", "--d-model", "32", "--n-head", "2", "--max-len", "40", "--lr", "3e-3"]


# ----------------------------------------------------------------------------------------------------------
# Losses against formulas written out independently, in float64


def random_logp(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    ref_logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    mask = (torch.rand(B, T, generator=g) < 0.7).double()
    rewards = (torch.rand(B, generator=g) < 0.5).double()
    return logp, ref_logp, mask, rewards


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("P,T,seed", [(1, 1, 0), (3, 7, 1), (5, 13, 2)])
def test_dpo_loss_is_minus_log_sigmoid_of_beta_times_chosen_minus_rejected_log_ratio(P, T, seed):
    logp, ref_logp, mask, _ = random_logp(2 * P, T, seed)
    beta = 0.37
    ours = oreo.dpo_loss(logp, ref_logp, mask, beta)
    terms = []
    for p in range(P):
        ratio = [sum(mask[b, j].item() * (logp[b, j].item() - ref_logp[b, j].item()) for j in range(T))
                 for b in (p, P + p)]
        terms.append(-math.log(sigmoid(beta * (ratio[0] - ratio[1]))))
    assert ours.item() == pytest.approx(sum(terms) / P, rel=1e-12)


@pytest.mark.parametrize("B,T,seed", [(1, 1, 0), (4, 9, 1), (6, 5, 2)])
def test_kto_loss_matches_its_formula_with_a_detached_batch_reference_point(B, T, seed):
    logp, ref_logp, mask, rewards = random_logp(B, T, seed)
    logp.requires_grad_(True)
    beta = 0.2
    ours = oreo.kto_loss(logp, ref_logp, mask, rewards, beta)
    r = [sum(mask[b, j].item() * (logp[b, j].item() - ref_logp[b, j].item()) for j in range(T)) for b in range(B)]
    z0 = max(0.0, sum(r) / B)
    terms = [1 - sigmoid(beta * (r[b] - z0)) if rewards[b] > 0.5 else 1 - sigmoid(beta * (z0 - r[b]))
             for b in range(B)]
    assert ours.item() == pytest.approx(sum(terms) / B, rel=1e-12)
    # z0 is a constant: d loss / d r_b = ∓β σ'(·) / B, and r_b's gradient reaches every action token equally
    grad = torch.autograd.grad(ours, logp)[0]
    for b in range(B):
        s = sigmoid(beta * (r[b] - z0)) if rewards[b] > 0.5 else sigmoid(beta * (z0 - r[b]))
        expected = (-1 if rewards[b] > 0.5 else 1) * beta * s * (1 - s) / B
        torch.testing.assert_close(grad[b], expected * mask[b], rtol=1e-10, atol=1e-12)


class head_model:
    """A stand-in for Transformer: model(input_ids, head=head) = head(hidden (B, L, D), lm_head weight (V, D))."""

    def __init__(self, hidden, weight):
        self.hidden, self.lm_head = hidden, torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.lm_head.weight = torch.nn.Parameter(weight, requires_grad=False)

    def __call__(self, input_ids, head):
        return head(self.hidden, self.lm_head.weight)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("B,L,V,seed", [(1, 2, 5, 0), (3, 9, 37, 1), (2, 17, 258, 2)])
def test_sft_loss_is_per_sequence_token_mean_cross_entropy(B, L, V, seed, fused):
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(B, L, 8, generator=g), torch.randn(V, 8, generator=g)
    logits = hidden @ weight.t()
    input_ids = torch.randint(0, V, (B, L), generator=g)
    mask = (torch.rand(B, L - 1, generator=g) < 0.6).float()
    mask[0, -1] = 1  # at least one action token
    ours = oreo.nll_loss(oreo.policy_logprobs(head_model(hidden, weight), input_ids, fused)[0], mask)
    rows = []
    for b in range(B):
        ce = F.cross_entropy(logits[b, :-1].double(), input_ids[b, 1:], reduction="none")  # (L-1,)
        n = mask[b].sum().item()
        rows.append((ce * mask[b].double()).sum().item() / max(n, 1))
    assert ours.item() == pytest.approx(sum(rows) / B, rel=1e-5)


def test_rs_trains_on_exactly_the_reward_one_responses(tmp_path):
    rows = [{"prompt": f"q{i}\n", "response": f"a{i}", "reward": float(i % 3 == 0)} for i in range(10)]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = oreo.parse_args(["--data", str(path), "--loss", "rs", "--init", "unused"])
    tokenizer = oreo.data.Tokenizer.byte_level()
    examples, _ = oreo.load_examples(args, tokenizer)
    got = sorted(tokenizer.decode(e.ids) for e in examples)
    want = sorted(tokenizer.decode(oreo.data.encode_trajectory(tokenizer, r, 2048).ids) for r in rows if r["reward"])
    assert got == want and len(got) == 4


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("B,L,V,seed", [(1, 2, 3, 0), (2, 7, 37, 1), (3, 5, 258, 2)])
def test_full_kl_term_equals_float64_full_vocabulary_kl_and_k3_its_formula(B, L, V, seed, fused):
    g = torch.Generator().manual_seed(seed)
    D = 6
    hidden, weight = torch.randn(B, L, D, generator=g), torch.randn(V, D, generator=g)
    ref_hidden, ref_weight = hidden + 0.3 * torch.randn(B, L, D, generator=g), torch.randn(V, D, generator=g)
    logits, ref_logits = hidden @ weight.t(), ref_hidden @ ref_weight.t()
    input_ids = torch.randint(0, V, (B, L), generator=g)
    mask = (torch.rand(B, L - 1, generator=g) < 0.7).float()
    ours_hidden = hidden.clone().requires_grad_(True)
    ref_logp, kl_inputs = oreo.reference_logprobs(head_model(ref_hidden, ref_weight), input_ids, fused, True)
    logp, token_kl = oreo.policy_logprobs(head_model(ours_hidden, weight), input_ids, fused, kl_inputs)
    ours = oreo.kl_term("full", token_kl, logp, ref_logp, mask)
    k3 = oreo.kl_term("k3", None, logp, ref_logp, mask)
    logits64 = logits.double().requires_grad_(True)
    p, q = logits64.log_softmax(-1)[:, :-1], ref_logits.double().log_softmax(-1)[:, :-1]
    kl = (p.exp() * (p - q)).sum(-1)  # (B, L-1)
    logp64 = p.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logp.double(), logp64, rtol=1e-5, atol=1e-6)
    d = ref_logp.double() - logp.double()
    k3_ref = d.exp() - d - 1
    m = mask.double()
    for value, per_token in ((ours, kl), (k3, k3_ref)):
        expected = ((m * per_token).sum(-1) / m.sum(-1).clamp(min=1)).mean()
        assert value.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    # The one fused pass must also give the gradient of a loss that uses both its outputs (logp and the KL).
    weights = torch.randn(B, L - 1, generator=g, dtype=torch.float64)
    (ours + (weights * logp).sum()).backward()
    expected = ((m * kl).sum(-1) / m.sum(-1).clamp(min=1)).mean() + (weights * logp64).sum()
    expected.backward()
    torch.testing.assert_close(ours_hidden.grad.double(), logits64.grad @ weight.double(), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Whole runs


@pytest.fixture(scope="module")
def traj_file(tmp_path_factory):
    """16 short trajectories: 'a+b=' prompts, two-step responses, about half of them correct."""
    rows = []
    for i in range(16):
        a, b = i % 7, (3 * i) % 5
        s = a + b + (i % 2)  # odd i: off by one, reward 0
        rows.append({"prompt": f"{a}+{b}=\n", "response": f"{a}+{b}={s}\n#### {s}", "reward": float(i % 2 == 0)})
    path = tmp_path_factory.mktemp("data") / "traj.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run(args, nproc=1, timeout=120):
    p = launch("oreo.py", args, nproc=nproc, env=ENV, timeout=timeout)
    assert p.returncode == 0, f"oreo.py {' '.join(args)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p


def weights(out):
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=False)
    return ckpt, {f"{m}.{k}": v for m in ("policy", "value") for k, v in ckpt[m].items()}


def assert_same_weights(a, b, atol, what):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"{what}: parameters differ by up to {worst:.3g} (allowed {atol})"


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def one_process_run(traj_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("single"))
    args = ["--data", traj_file, *TINY, "--batch-size", "8", "--micro-batch-size", "2", "--max-steps", "4",
            "--save-every", "0", "--out", out]
    run(args)
    return args, weights(out)[1]


def test_group_by_length_batches_the_sequences_the_sampler_groups(traj_file, tmp_path):
    out = str(tmp_path)
    run(["--data", traj_file, *TINY, "--batch-size", "4", "--micro-batch-size", "4", "--max-steps", "3",
         "--save-every", "0", "--group-by-length", "--out", out])
    ckpt, _ = weights(out)
    assert ckpt["sampler"]["grouped"] and ckpt["sampler"]["step"] == 3
    tokenizer = oreo.data.Tokenizer.byte_level()
    lengths = [len(oreo.data.encode_trajectory(tokenizer, json.loads(line), 2048).ids) for line in open(traj_file)]
    sampler = iter(oreo.data.Sampler(16, 4, ckpt["args"]["seed"], lengths=lengths))
    tokens = [sum(lengths[i] for i in next(sampler)) for _ in range(3)]
    assert [row["tokens"] for row in read_log(out)] == tokens


def test_two_ddp_processes_give_the_same_parameters_as_one_process(one_process_run, tmp_path):
    args, single = one_process_run
    out = str(tmp_path / "ddp")
    run(args[:-1] + [out], nproc=2)  # 2 processes × 2 micro-batches of 2 = the same 8 sequences per step
    assert_same_weights(single, weights(out)[1], 1e-5, "DDP on 2 processes vs 1 process")


def test_fsdp_on_two_processes_gives_the_same_parameters_as_one_process(one_process_run, tmp_path):
    args, single = one_process_run
    out = str(tmp_path / "fsdp")
    run(args[:-1] + [out, "--fsdp"], nproc=2)
    assert_same_weights(single, weights(out)[1], 1e-5, "FSDP on 2 processes vs 1 process")
    policy = weights(out)[0]["policy"]
    exported = oreo.Transformer.from_pretrained(os.path.join(out, "policy")).state_dict()
    assert_same_weights({k: exported[k] for k in policy}, policy, 0, "FSDP export vs its checkpoint")


def start_and_kill(args, ready, timeout=120):
    """Start oreo.py, SIGKILL it as soon as ready() holds; returns whether it was still running then."""
    p = subprocess.Popen([sys.executable] + args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while not ready() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    alive = p.poll() is None
    p.send_signal(signal.SIGKILL)
    p.wait()
    return alive, p.stderr.read().decode()[-3000:]


def logged_steps(out):
    try:
        return len(read_log(out))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def saved_step(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["step"]


@pytest.fixture(scope="module")
def uninterrupted(traj_file, tmp_path_factory):
    """12 steps in one go; every resume test must end with exactly these weights."""
    args = ["--data", traj_file, *TINY, "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "12",
            "--save-every", "4"]
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    run(args + ["--out", out])
    return args, weights(out)


def test_sigkill_mid_training_then_resume_ends_with_the_same_weights_and_optimizer_state(uninterrupted, tmp_path):
    args, (full_ckpt, full) = uninterrupted
    out = str(tmp_path / "killed")
    alive, err = start_and_kill([os.path.join(ROOT, "oreo.py")] + args + ["--out", out],
                                lambda: logged_steps(out) >= 6)
    assert alive, f"the run ended before it could be killed mid-training:\n{err}"
    killed_at = saved_step(out)
    assert killed_at in (4, 8), killed_at
    p = run(args + ["--out", out, "--resume"])
    assert f"resumed from {out}/ckpt.pt at step {killed_at}" in p.stdout
    resumed_ckpt, resumed = weights(out)
    assert_same_weights(full, resumed, 0, "killed and resumed vs uninterrupted")
    for k, state in full_ckpt["policy_optimizer"]["state"].items():
        for name, t in state.items():
            assert torch.equal(resumed_ckpt["policy_optimizer"]["state"][k][name], t), f"AdamW {name} of {k}"


def test_resume_on_two_processes_from_a_one_process_checkpoint_matches_the_uninterrupted_run(uninterrupted,
                                                                                             tmp_path):
    args, (_, full) = uninterrupted
    out = str(tmp_path / "switch")
    alive, err = start_and_kill([os.path.join(ROOT, "oreo.py")] + args + ["--out", out],
                                lambda: logged_steps(out) >= 5)
    assert alive and saved_step(out) in (4, 8), err
    run(args + ["--out", out, "--resume"], nproc=2)  # the data position is kept in global batches
    assert_same_weights(full, weights(out)[1], 1e-5, "1 process, then 2 processes")


def test_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_loadable(uninterrupted, tmp_path):
    args, (_, full) = uninterrupted
    out = str(tmp_path / "torn")
    # The second checkpoint write (step 8) stalls half-way, as on a slow disk; the SIGKILL lands inside it.
    stall = ("import io, time, torch, oreo\n"
             "save, n = torch.save, [0]\n"
             "def slow_save(obj, f):\n"
             "    n[0] += 1\n"
             "    if n[0] < 2: return save(obj, f)\n"
             "    buf = io.BytesIO(); save(obj, buf); f.write(buf.getvalue()[:len(buf.getvalue()) // 2]); f.flush()\n"
             "    time.sleep(600)\n"
             "torch.save = slow_save\n"
             f"oreo.main({args + ['--out', out]!r})\n")
    tmp_file = os.path.join(out, "ckpt.pt.tmp")
    alive, err = start_and_kill(["-c", stall], lambda: logged_steps(out) >= 5 and os.path.exists(tmp_file))
    assert alive and os.path.exists(tmp_file), err
    assert saved_step(out) == 4, "the torn write must not replace the step-4 checkpoint"
    p = run(args + ["--out", out, "--resume"])
    assert "at step 4" in p.stdout
    assert_same_weights(full, weights(out)[1], 0, "resumed after a torn write vs uninterrupted")


@pytest.fixture
def one_thread():
    """In-process runs share the machine's cores with other test processes: one thread avoids oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_few_steps_on_one_fixed_batch_fit_the_value_and_favour_the_correct_responses(traj_file, tmp_path,
                                                                                       one_thread):
    out = str(tmp_path / "fit")
    argv = ["--data", traj_file, *TINY, "--batch-size", "16", "--max-steps", "20", "--save-every", "0", "--warmup", "0",
            "--value-lr", "1e-2", "--out", out]
    oreo.main(argv)
    log = read_log(out)
    # (In the token variant the policy and value residuals are equal in value; they differ in what they train.)
    assert log[-1]["value_loss"] < 0.5 * log[0]["value_loss"], f"value loss {log[0]['value_loss']:.4f} → " \
        f"{log[-1]['value_loss']:.4f} in 20 steps"
    # The policy: Σ log π/π_ref must rise more on the reward-1 responses than on the reward-0 ones.
    args = oreo.parse_args(argv)
    tokenizer = oreo.data.Tokenizer.byte_level()
    examples, _ = oreo.load_examples(args, tokenizer)
    reference = oreo.build_models(args, tokenizer, "cpu")[0]  # the same seeded initialisation as the run's
    policy = oreo.Transformer.from_pretrained(os.path.join(out, "policy"))
    batch = oreo.data.collate(examples, tokenizer.pad_id)
    ids = batch["input_ids"]
    with torch.no_grad():
        log_ratio = oreo.policy_logprobs(policy, ids, False)[0] - oreo.policy_logprobs(reference, ids, False)[0]
    seq = (log_ratio * batch["mask"]).sum(-1)  # (B,)
    correct, wrong = seq[batch["rewards"] > 0.5].mean().item(), seq[batch["rewards"] < 0.5].mean().item()
    assert correct > wrong + 1, f"log π/π_ref: correct responses {correct:.2f}, wrong ones {wrong:.2f}"

    sft = str(tmp_path / "sft")
    oreo.main(["--data", traj_file, *TINY, "--loss", "sft", "--batch-size", "16", "--max-steps", "20",
               "--save-every", "0", "--warmup", "0", "--out", sft])
    log = read_log(sft)
    assert log[-1]["policy_loss"] < 0.7 * log[0]["policy_loss"], \
        f"SFT NLL {log[0]['policy_loss']:.3f} → {log[-1]['policy_loss']:.3f}"


def test_a_nan_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(traj_file, tmp_path, monkeypatch,
                                                                                one_thread):
    # A NaN appears in the value loss of the 5th micro-batch: step 3 (2 micro-batches per step).
    calls, real_loss = [0], oreo.oreo_loss

    def loss_with_a_nan(*a, **k):
        calls[0] += 1
        policy_loss, value_loss = real_loss(*a, **k)
        return policy_loss, value_loss * float("nan") if calls[0] == 5 else value_loss

    monkeypatch.setattr(oreo, "oreo_loss", loss_with_a_nan)
    out = str(tmp_path / "nan")
    with pytest.raises(oreo.data.UserError) as e:
        oreo.main(["--data", traj_file, *TINY, "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "6",
                   "--save-every", "1", "--out", out])
    msg = str(e.value)
    assert msg.startswith("step 3: non-finite value loss nan"), msg
    assert "(step 2)" in msg and saved_step(out) == 2
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert all(v.isfinite().all() for m in ("policy", "value") for v in ckpt[m].values())


@pytest.mark.parametrize("argv,name", [
    (["--variant", "step", "--loss", "sft"], "--variant"),
    (["--loss", "dpo", "--alpha", "0.1"], "--alpha"),
    (["--loss", "rs", "--beta", "0.1"], "--beta"),
    (["--init", "ckpt", "--n-layer", "2"], "--n-layer"),
    (["--epochs", "1", "--max-steps", "3"], "--max-steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lossy", "oreo"], "--lossy"),
    (["--kl", "forward"], "--kl"),
])
def test_unknown_or_conflicting_options_are_rejected_by_name(argv, name, capsys):
    with pytest.raises(SystemExit) as e:
        oreo.data.cli("oreo.py", oreo.parse_args, argv)
    assert e.value.code == 2
    assert name in capsys.readouterr().err


def test_batch_not_divisible_by_micro_batch_is_rejected(traj_file, tmp_path):
    with pytest.raises(oreo.data.UserError) as e:
        oreo.main(["--data", traj_file, *TINY, "--batch-size", "6", "--micro-batch-size", "4", "--out",
                   str(tmp_path)])
    assert "--batch-size 6" in str(e.value) and "--micro-batch-size 4" in str(e.value)


def test_max_len_beyond_the_checkpoints_positions_is_refused_by_name(tmp_path):
    # GPT-2's learned positions: 16 rows, so 32 tokens cannot fit
    make_checkpoint(tmp_path / "gpt2", "gpt2", n_positions=16)
    args = oreo.parse_args(["--init", str(tmp_path / "gpt2"), "--loss", "sft", "--max-len", "32"])
    with pytest.raises(oreo.data.UserError) as e:
        oreo.build_models(args, None, "cpu")
    assert "--max-len 32" in str(e.value) and "16 positions" in str(e.value)
