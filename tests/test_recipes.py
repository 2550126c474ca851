"""
The trainer's recipes and command lines against independent references: the micro-batch that follows the world
size (a brute-force search; a 2-process torchrun run of the no-batch-flag command against one process), the
paper's learning rates (its appendix A.3, written out here), LoRA on the value model (a float64 recomputation,
the merged export), the reference's precision (bf16 autocast), the official step segmentation (a port of the
official code's character-offset rule), the NLL means, and the one-line user errors of every command line.
"""
import json
import os
import random

import pytest
import torch

import data
import options
import oreo
import search
from model import LoRALinear, ValueModel, add_lora, merge_lora
from tests.hf_models import make_checkpoint
from tests.launch import ROOT, launch

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
TINY = ["--n-layer", "2", "--d-model", "32", "--n-head", "2", "--builtin-problems", "64", "--save-every", "0"]


def checkpoint_weights(out):
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=False)
    return {f"{m}.{k}": v for m in ("policy", "value") if m in ckpt for k, v in ckpt[m].items()}


# ----------------------------------------------------------------------------------------------------------
# Issue 17: the micro-batch follows the world size; the no-argument command under torchrun


@pytest.mark.parametrize("batch,default,world", [(32, 32, 1), (32, 32, 2), (32, 32, 8), (128, 4, 8), (128, 4, 64),
                                                 (96, 32, 3), (30, 4, 2), (7, 32, 7)])
def test_without_micro_batch_flag_it_is_the_largest_that_fits_and_the_global_batch_stays(batch, default, world):
    micro = options.micro_batch_size(batch, None, default, world)
    fitting = [m for m in range(1, default + 1) if batch % (m * world) == 0]   # brute force
    assert micro == max(fitting)
    assert micro * (batch // (micro * world)) * world == batch


@pytest.mark.parametrize("batch,micro,world", [(32, 32, 2), (30, 4, 1), (32, 12, 8), (32, 5, 3)])
def test_an_impossible_explicit_batch_is_refused_in_one_line_with_numbers_that_work(batch, micro, world):
    with pytest.raises(data.UserError) as e:
        options.micro_batch_size(batch, micro, 4, world)
    msg = str(e.value)
    assert "\n" not in msg and f"--batch-size {batch}" in msg
    suggested = [int(w) for w in msg.replace(",", " ").split() if w.isdigit()]
    if batch % world == 0:
        new_micro = int(msg.split("use --micro-batch-size ")[1].split()[0])
        assert options.micro_batch_size(batch, new_micro, 4, world) == new_micro
        new_batch = int(msg.split("or --batch-size ")[1].split()[0])
        assert options.micro_batch_size(new_batch, micro, 4, world) == micro
    else:
        assert any(n % world == 0 and n > 0 for n in suggested), msg


def test_torchrun_two_processes_without_batch_flags_train_like_one_process(tmp_path):
    # The full no-argument command takes ≈ 30 s on one process and ≈ 80 s on two loaded cores (62 steps); three
    # steps of it show the same thing: 2 × 16 sequences per step are the 32 of the one-process run.
    args = ["--max-steps", "3", "--save-every", "0"]
    one = launch("oreo.py", args + ["--out", str(tmp_path / "one")], env=ENV, timeout=180)
    two = launch("oreo.py", args + ["--out", str(tmp_path / "two")], nproc=2, env=ENV, timeout=180)
    for p in (one, two):
        assert p.returncode == 0, p.stderr[-3000:]
    assert "batch 32 = 16 × 1 accumulation × 2" in two.stdout and "batch 32 = 32 × 1 accumulation × 1" in one.stdout
    a, b = checkpoint_weights(tmp_path / "one"), checkpoint_weights(tmp_path / "two")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, f"2 processes vs 1: parameters differ by {worst:.3g}"
    for folder in ("policy", "value"):
        assert os.path.exists(tmp_path / "two" / folder / "config.json")


@pytest.mark.parametrize("loss", ["oreo", "sft", "rs", "dpo", "kto"])
def test_every_loss_finds_training_examples_in_the_builtin_task(loss):
    args = oreo.parse_args(["--loss", loss, "--builtin-problems", "200"])
    examples, _ = oreo.load_examples(args, data.Tokenizer.byte_level())
    assert len(examples) >= args.batch_size, f"--loss {loss}: {len(examples)} examples"
    if loss == "dpo":
        assert all(chosen.reward == 1 and rejected.reward == 0 for chosen, rejected in examples)


def test_an_impossible_batch_under_torchrun_is_printed_once_without_our_traceback(tmp_path):
    p = launch("oreo.py", ["--micro-batch-size", "32", "--out", str(tmp_path)], nproc=2, env=ENV, timeout=180)
    assert p.returncode != 0
    ours = [line for line in p.stderr.splitlines() if line.startswith("oreo.py: error:")]
    assert len(ours) == 1 and "--micro-batch-size 16" in ours[0], p.stderr[-3000:]
    assert "oreo.py\", line" not in p.stderr, "a traceback through oreo.py was printed"


# ----------------------------------------------------------------------------------------------------------
# Issue 15.1: the paper's learning rates (appendix A.3, Qwen2.5-Math-1.5B) and the printed settings

PAPER = {"oreo": 5e-6, "sft": 2e-5, "rs": 5e-6, "dpo": 5e-7, "kto": 5e-8}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    tokenizer = data.Tokenizer.byte_level()
    make_checkpoint(folder, "llama", vocab_size=tokenizer.vocab_size)
    tokenizer.save_pretrained(str(folder))
    return str(folder)


@pytest.mark.parametrize("loss", sorted(PAPER))
def test_each_loss_defaults_to_the_papers_learning_rate_with_init(loss, checkpoint):
    args = oreo.parse_args(["--init", checkpoint, "--loss", loss])
    assert args.lr == PAPER[loss]
    assert oreo.parse_args(["--init", checkpoint, "--loss", loss, "--lr", "3e-4"]).lr == 3e-4
    if loss == "oreo":
        assert args.value_lr == PAPER["oreo"]
        assert oreo.parse_args(["--init", checkpoint, "--value-lora", "64"]).value_lr == 1e-4


def test_the_effective_settings_are_printed_at_the_start(checkpoint, tmp_path, capsys):
    traj = tmp_path / "traj.jsonl"
    traj.write_text("".join(json.dumps({"prompt": f"{i // 2}+1=", "response": f"{i}", "reward": float(i % 2)})
                            + "\n" for i in range(8)))
    oreo.main(["--init", checkpoint, "--loss", "dpo", "--data", str(traj), "--batch-size", "2", "--max-steps", "1",
               "--max-len", "32", "--save-every", "0", "--out", str(tmp_path / "dpo")])
    settings = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("settings:"))
    assert "loss dpo" in settings and "β 0.1" in settings and "lr 5e-07" in settings, settings


# ----------------------------------------------------------------------------------------------------------
# Issue 15.2: LoRA on the value model


def test_lora_linear_is_base_plus_scaled_block_low_rank_update_in_float64():
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(7, 3 + 5 + 5, bias=True).double()
    lora = LoRALinear(base, rank=2, alpha=6, splits=(3, 5, 5))
    with torch.no_grad():
        lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=g, dtype=torch.float64))
    x = torch.randn(4, 9, 7, generator=g, dtype=torch.float64)
    A, B = lora.lora_A.detach(), lora.lora_B.detach()
    blocks = [B[0:3] @ A[0:2], B[3:8] @ A[2:4], B[8:13] @ A[4:6]]   # each projection its own A_i, B_i
    expected = x @ (base.weight.detach() + 3.0 * torch.cat(blocks)).T + base.bias.detach()
    torch.testing.assert_close(lora(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lora.delta_weight(), 3.0 * torch.cat(blocks), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_lora_value_model_trains_only_lora_and_head_and_exports_merged_with_the_same_values(family, tmp_path):
    make_checkpoint(tmp_path / "base", family)
    value = ValueModel.from_pretrained(str(tmp_path / "base"))
    add_lora(value.backbone, rank=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at 0 (then merging is trivially exact): give the update and the head values
        for name, p in value.named_parameters():
            if "lora_B" in name or name == "head.weight":
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    ids = torch.randint(0, value.backbone.config.vocab_size, (3, 11), generator=g)
    values = value(ids)
    values.square().sum().backward()
    with_grad = {n for n, p in value.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in value.named_parameters() if "lora_" in n} | {"head.weight"}
    assert all(not p.requires_grad for n, p in value.named_parameters() if n not in with_grad)
    merge_lora(value).save_pretrained(str(tmp_path / "merged"))
    exported = ValueModel.from_pretrained(str(tmp_path / "merged"))
    assert not any(isinstance(m, LoRALinear) for m in exported.modules())
    torch.testing.assert_close(exported(ids), values.detach(), rtol=1e-5, atol=1e-6)


def test_value_lora_run_exports_a_plain_value_folder_equal_to_its_checkpoint(tmp_path):
    out = tmp_path / "lora"
    oreo.main([*TINY, "--value-lora", "2", "--max-steps", "3", "--value-lr", "1e-2", "--out", str(out)])
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert any("lora_A" in k for k in ckpt["value"])
    args = oreo.parse_args([*TINY, "--value-lora", "2"])
    trained = ValueModel(oreo.builtin_config(args, data.Tokenizer.byte_level().vocab_size))
    add_lora(trained.backbone, 2)
    trained.load_state_dict(ckpt["value"])
    assert trained.backbone.layers[0].attn.qkv.lora_B.abs().max() > 0, "the LoRA update did not train"
    exported = ValueModel.from_pretrained(str(out / "value"))
    ids = torch.randint(0, 256, (2, 17))
    torch.testing.assert_close(exported(ids), trained(ids).detach(), rtol=1e-5, atol=1e-6)
    initial = oreo.build_models(args, data.Tokenizer.byte_level(), "cpu")[2]  # the run's seeded initialisation
    assert torch.equal(initial.backbone.tok_emb.weight, ckpt["value"]["backbone.tok_emb.weight"]), \
        "LoRA must leave the value's embeddings frozen"


# ----------------------------------------------------------------------------------------------------------
# Issue 15.3: the reference computes exactly what the policy computes at step 0


def test_initial_log_ratio_is_exactly_zero_under_bf16_autocast_and_a_bf16_copy_is_not(checkpoint):
    tokenizer = data.Tokenizer.byte_level()
    for argv in ([*TINY], ["--init", checkpoint, "--max-len", "64"]):
        args = oreo.parse_args(argv)
        policy, reference, _ = oreo.build_models(args, tokenizer, "cpu")
        assert {p.dtype for p in reference.parameters()} == {p.dtype for p in policy.parameters()}
        ids = torch.randint(0, policy.config.vocab_size, (3, 23), generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            ref_logp, kl_inputs = oreo.reference_logprobs(reference, ids, False, True)  # the trainer's paths
            logp, _ = oreo.policy_logprobs(policy, ids, False, kl_inputs)
            bf16_logp, _ = oreo.reference_logprobs(reference.to(torch.bfloat16), ids, False, False)
        assert torch.equal(logp, ref_logp), f"initial log-ratio up to {(logp - ref_logp).abs().max():.3g}"
        assert (logp - bf16_logp).abs().max() > 0, "a bf16 reference should differ (the test would be vacuous)"


# ----------------------------------------------------------------------------------------------------------
# Issue 15.4: the official step segmentation and value states


def official_starts(response, offsets, delimiters):
    """A port of the official code's rule (openrlhf/datasets/pcl_dataset.py, --step_level): cut the response into
    steps at character level (GSM8K: split at '\\n', which is dropped; MATH: each step ends with its delimiter),
    and mark the token holding each step's first character."""
    if tuple(delimiters) == ("\n",):
        lines, offset, firsts = response.split("\n"), 0, []
        for line in lines:
            firsts.append(offset)
            offset += len(line) + 1
    else:
        firsts, j = [], 0
        for i in range(len(response)):
            if i == len(response) - 1 or response[j:i + 1].endswith(tuple(delimiters)):
                firsts.append(j)
                j = i + 1
    starts = [False] * len(offsets)
    for c in firsts:
        k = next((k for k, (a, b) in enumerate(offsets) if a <= c < b), None)
        if k is not None:
            starts[k] = True
    return starts


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    from tests.bpe import train_bpe
    from tests.test_data import BYTE_ALPHABET, corpus
    folder = str(tmp_path_factory.mktemp("bpe"))
    return train_bpe(folder, "llama", corpus(), 700, BYTE_ALPHABET), data.Tokenizer.from_pretrained(folder)


def test_official_step_starts_match_a_port_of_the_official_character_rule(bpe):
    hf, tok = bpe
    rng, differ = random.Random(3), 0
    for _ in range(150):
        response = "".join(rng.choice(["We add", " 3", ".\n", ". ", ".$ ", "\n", " so", " Then", "x", "\n\n"])
                           for _ in range(rng.randrange(1, 25)))
        delimiters = data.STEP_DELIMITERS[rng.choice(["gsm8k", "math"])]
        traj = {"prompt": "P:", "response": response, "reward": 0}
        ex = data.encode_trajectory(tok, traj, 1000, delimiters, "official")
        enc = hf.encode(response, add_special_tokens=False)
        n_prompt = len(tok.encode("P:"))
        assert ex.ids[n_prompt:-1] == enc.ids
        assert ex.step_start[n_prompt - 1:-1] == official_starts(response, enc.offsets, delimiters), response
        differ += ex.step_start != data.encode_trajectory(tok, traj, 1000, delimiters).step_start
    assert differ > 0, "the two rules should differ where '. ' ends inside ' Then'"


def test_official_step_level_trains_the_value_only_at_step_starts_in_float64():
    g = torch.Generator().manual_seed(4)
    B, T, beta = 3, 9, 0.1
    logp, ref_logp = -torch.rand(B, T, generator=g, dtype=torch.float64), -torch.rand(B, T, generator=g,
                                                                                        dtype=torch.float64)
    values, rewards = torch.randn(B, T, generator=g, dtype=torch.float64), torch.tensor([1.0, 0.0, 1.0],
                                                                                       dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 6:] = 0
    starts = (torch.rand(B, T, generator=g) < 0.4) & mask.bool()
    starts[:, 0] = True
    policy_loss, value_loss = oreo.oreo_loss(logp, ref_logp, values, rewards, mask, beta, "step", starts, starts)
    per_row = []
    for b in range(B):
        ts = [t for t in range(T) if starts[b, t]]
        acc = [sum(mask[b, i] * (logp[b, i] - ref_logp[b, i]) for i in range(t, T)) for t in ts]
        per_row.append(sum((beta * a + values[b, t] - rewards[b]) ** 2 for a, t in zip(acc, ts)) / len(ts))
    assert value_loss.item() == pytest.approx(sum(per_row).item() / B, rel=1e-12)
    assert policy_loss.item() == pytest.approx(value_loss.item(), rel=1e-12), "equal by construction"


# ----------------------------------------------------------------------------------------------------------
# Issue 15.5: the NLL mean


def test_nll_token_mean_is_the_micro_batch_token_mean_and_sequence_mean_weighs_rows_equally():
    g = torch.Generator().manual_seed(5)
    logp = -torch.rand(4, 10, generator=g, dtype=torch.float64) * 3
    mask = torch.zeros(4, 10, dtype=torch.float64)
    for b, n in enumerate((1, 10, 4, 7)):
        mask[b, :n] = 1
    nll = [[-logp[b, j].item() for j in range(10) if mask[b, j]] for b in range(4)]
    token = sum(sum(r) for r in nll) / sum(len(r) for r in nll)
    sequence = sum(sum(r) / len(r) for r in nll) / 4
    assert oreo.nll_loss(logp, mask, "token").item() == pytest.approx(token, rel=1e-12)
    assert oreo.nll_loss(logp, mask, "sequence").item() == pytest.approx(sequence, rel=1e-12)
    assert abs(token - sequence) > 1e-3


# ----------------------------------------------------------------------------------------------------------
# Issue 15.6: a user's mistake is one line and exit status 2; a bug keeps its traceback


def test_cli_prints_a_user_error_as_one_line_and_lets_a_bug_raise(capsys):
    def mistake(argv):
        raise data.UserError("--data x.jsonl:3: missing field 'reward'")

    with pytest.raises(SystemExit) as e:
        data.cli("oreo.py", mistake)
    assert e.value.code == 2
    assert capsys.readouterr().err == "oreo.py: error: --data x.jsonl:3: missing field 'reward'\n"

    def bug(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        data.cli("oreo.py", bug)


@pytest.mark.parametrize("script,args,message", [
    ("oreo.py", ["--data", "BAD"], "BAD:2: not valid JSON"),
    ("oreo.py", ["--init", "NOWHERE"], "NOWHERE: not a folder"),
    ("search.py", ["eval", "--policy", "NOWHERE", "--problems", "BAD"], "BAD:2: not valid JSON"),
    ("data.py", ["builtin"], "the following arguments are required: out_dir"),
])
def test_every_command_line_stops_a_users_mistake_with_one_line_and_status_2(script, args, message, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b", "reward": 1}\n{not json\n')
    args = [str(bad) if a == "BAD" else str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in args]
    p = launch(script, args + (["--out", str(tmp_path / "out")] if script == "oreo.py" else []), env=ENV,
               timeout=180)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"{script}: error: "), p.stderr
    assert message.replace("BAD", str(bad)).replace("NOWHERE", str(tmp_path / "nowhere")) in p.stderr, p.stderr


def test_a_prompt_longer_than_the_policy_reads_is_a_user_error_naming_the_problem(checkpoint, tmp_path):
    positions = json.load(open(os.path.join(checkpoint, "config.json")))["max_position_embeddings"]
    problems = tmp_path / "problems.jsonl"
    problems.write_text(json.dumps({"id": "short", "question": "1+1", "answer": "#### 2"}) + "\n"
                        + json.dumps({"id": "long", "question": "9" * (2 * positions), "answer": "#### 9"}) + "\n")
    for argv in (["eval", "--methods", "greedy"], ["collect", "-k", "1"]):
        with pytest.raises(data.UserError, match=f"problem 'long' has a .*at most {positions} positions"):
            search.main(argv + ["--policy", checkpoint, "--problems", str(problems), "--max-new-tokens", "4",
                                "--out", str(tmp_path / "out.jsonl"), "--device", "cpu"])
