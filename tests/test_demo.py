"""
The built-in demo (train.sh + report.py + diagnose.py) at tiny sizes: one whole pipeline run (2 rounds), shared by
the tests below, whose every stage's output must be well-formed, whose trainers must have reduced their losses,
whose re-run must skip every finished stage and whose second run in a fresh folder must give the same results.json.
Before it, the built-in task's checks and diagnose.py's arithmetic against hand-built answers.
"""
import itertools
import json
import math
import os
import statistics
import xml.etree.ElementTree as ET

import pytest
import torch

import data
import diagnose
import oreo
import report
from model import Config, Transformer, ValueModel
from tests.launch import ROOT, run as run_command

K, STEPS = 3, 24
# two operations per problem: enough right answers among the samples for the value to have something to learn
TINY = {"N_TRAIN": "48", "N_VAL": "8", "N_TEST": "24", "N_OPS": "2", "DEMOS": "2", "SFT_EPOCHS": "20", "K": str(K),
        "STEPS": str(STEPS), "BATCH": "8", "BEAMS": "2,3", "SFT_BEAMS": "2", "BEAM_PROBLEMS": "10",
        "DIAG_PROBLEMS": "12",
        "MODEL": "--n-layer 1 --d-model 32 --n-head 2",
        # large rates so that 16 steps of a tiny model move the losses well clear of batch-to-batch noise
        "LR_RS": "3e-3", "LR_DPO": "3e-3", "LR_KTO": "3e-3", "LR_OREO": "3e-3", "LR_OREO_STEP": "3e-3",
        "LR_OREO_SEARCH": "1e-3",
        "VALUE_LR": "3e-3"}
ENV = {**os.environ, **TINY, "OMP_NUM_THREADS": "1"}
RUNS = ("sft", "rs", "dpo", "kto", "oreo", "oreo_step", "oreo_search", "rs_r2", "oreo_r2")
TOKENIZER = data.Tokenizer.byte_level()


# ---- the built-in task's checks and the diagnostics, on hand-built answers ----------------------------------

class ScriptedRandom:
    """Stands in for random.Random in builtin_demonstration: random() returns the scripted numbers in turn."""
    def __init__(self, numbers):
        self.numbers = iter(numbers)

    def random(self):
        return next(self.numbers)


@pytest.mark.parametrize("question", ["7 *4 +3 *8", "0 +1 -2", "5 *5 *5 *5 *5", "3 -3 *0 +9 *1 -7"])
@pytest.mark.parametrize("p_misread", [0.7, 0.25, 1.0])
def test_entropy_floor_is_the_entropy_of_every_demonstration_the_demonstrator_can_write(question, p_misread):
    # every way the coins of the '*' steps can fall, each solution written by builtin_demonstration itself
    n_mul = question.count("*")
    solutions = {}
    for misreads in itertools.product([True, False], repeat=n_mul):
        prob = math.prod(p_misread if m else 1 - p_misread for m in misreads)
        text = data.builtin_demonstration({"question": question}, ScriptedRandom([0.0 if m else 0.999999
                                                                                  for m in misreads]), p_misread)
        solutions[text] = solutions.get(text, 0.0) + prob
    assert abs(sum(solutions.values()) - 1) < 1e-12
    entropy = -sum(p * math.log(p) for p in solutions.values() if p > 0)
    assert data.builtin_demonstration_entropy(question, p_misread) == pytest.approx(entropy, abs=1e-12)


QUESTION = "7 *4 +3"   # right: 7*4=8, 8+3=1, #### 1
CHECKS = [
    ("7*4=8\n8+3=1\n#### 1", [(True, True)] * 3),
    ("7+4=1\n1+3=4\n#### 4", [(True, False), (True, True), (True, True)]),           # the misread, then right
    ("7*4=9\n9+3=2\n#### 2", [(False, False), (True, True), (True, True)]),          # wrong arithmetic
    ("7*4=8\n5+3=8\n#### 8", [(True, True), (True, False), (True, True)]),           # wrong carried value
    ("7*4=8\n8-3=5\n#### 5", [(True, True), (True, False), (True, True)]),           # wrong operator, right sum
    ("7*4=8\n8+2=0\n#### 0", [(True, True), (True, False), (True, True)]),           # wrong operand
    ("7*4=8\n8+3=1\n#### 7", [(True, True), (True, True), (False, False)]),          # answer not the result
    ("7*4=8\n#### 8", [(True, True), (False, False)]),                                # an early answer
    ("7*4=8\n8+3=1\n1+1=2\n#### 2", [(True, True), (True, True), (False, False), (False, False)]),  # a line too many
    ("7*4=8\n8+3=", [(True, True), (False, False)]),                                  # cut off
]


@pytest.mark.parametrize("response,expected", CHECKS)
def test_builtin_check_steps_on_hand_built_answers(response, expected):
    assert data.builtin_check_steps(QUESTION, response) == expected


def test_step_stats_count_lucky_positives_and_arithmetic_of_operation_lines():
    rows = [{"prompt": QUESTION + "\n", "response": r, "reward": data.grade(r, "1")} for r in
            ["7*4=8\n8+3=1\n#### 1",      # right, every step right
             "7+4=1\n1*3=3\n#### 1",      # reward 1 by luck: two wrong steps (a misread, then '*' for '+')
             "7*4=9\n9+3=1\n#### 1",      # reward 1 by luck: wrong arithmetic twice
             "7+4=1\n1+3=4\n#### 4"]]     # wrong
    stats = diagnose.step_stats(rows)
    # operation lines: 2 per sample, 8 in all; 2 of them do not follow from their operator (7*4=9, 9+3=1)
    assert stats["step_accuracy"] == 6 / 8
    assert stats["correct"] == 3 / 4 and stats["lucky_positives"] == 2 / 3 and stats["all_steps_right"] == 1 / 4


def test_state_positions_are_the_prompt_end_each_newline_and_the_token_before_eos():
    prompt = TOKENIZER.encode("7 *4 +3\n")
    response = TOKENIZER.encode("7*4=8\n8+3=1\n#### 1")
    seq = prompt + response + [TOKENIZER.eos_id]
    positions = diagnose.state_positions(TOKENIZER, len(prompt), response + [TOKENIZER.eos_id])
    assert [TOKENIZER.decode([seq[p]]) for p in positions] == ["\n", "\n", "\n", "1"]
    assert positions[-1] == len(seq) - 2
    cut = diagnose.state_positions(TOKENIZER, len(prompt), response[:8])   # cut at the length limit: "7*4=8\n8+"
    assert cut == [len(prompt) - 1, len(prompt) + 5, len(prompt) + 7]


def test_credit_takes_the_one_wrong_step_samples_and_the_changes_of_v_across_their_steps():
    right, wrong = (True, True), (True, False)
    paths = [[0.2, 0.3, 0.1, 0.1],     # one wrong step (the second): changes +0.1, -0.2, 0.0
             [0.2, 0.0, 0.0, 0.4],     # one wrong step (the first): changes -0.2, 0.0, +0.4
             [0.5, 0.5, 0.5, 0.5],     # every step right: left out
             [0.1, 0.0, 0.0, 0.0]]     # two wrong steps: left out
    checks = [[right, wrong, right], [wrong, right, right], [right] * 3, [wrong, wrong, right]]
    result = diagnose.credit(paths, checks, [0, 1, 1, 0], n_paths=1)
    assert result["samples"] == 2
    assert result["dv_wrong"][0] == pytest.approx((-0.2 - 0.2) / 2)
    assert result["dv_right"][0] == pytest.approx((0.1 + 0.0 + 0.0 + 0.4) / 4)
    assert result["wrong_is_largest_drop"] == 1.0      # -0.2 is the most negative change of both
    assert result["paths"] == [{"values": paths[0], "wrong_step": 2, "reward": 0}]


def test_sft_fit_nll_is_the_trainers_sft_loss_and_the_floor_its_entropy_per_token():
    torch.manual_seed(0)
    config = Config(model_type="llama", vocab_size=TOKENIZER.vocab_size, n_layer=1, n_head=2, d_model=16, d_ff=32,
                    max_seq_len=96)
    policy = Transformer(config).eval()
    problems = data.builtin_problems(5, 3, "train", n_steps=4)
    demos = data.builtin_demonstrations(problems, 3, per_problem=2)
    nll, floor = diagnose.sft_fit(policy, TOKENIZER, demos)
    batch = data.collate([data.encode_trajectory(TOKENIZER, d, 2048) for d in demos], TOKENIZER.pad_id)
    with torch.no_grad():
        logp, _ = oreo.policy_logprobs(policy, batch["input_ids"], fused=False)
    assert nll == pytest.approx(oreo.nll_loss(logp, batch["mask"]).item(), rel=1e-5)
    # 4 operations: 4 lines of 6 bytes, "#### d" and EOS are the action tokens
    expected = sum(data.builtin_demonstration_entropy(p["question"]) / (4 * 6 + 6 + 1) for p in problems) / 5
    assert floor == pytest.approx(expected, rel=1e-12)


def test_sweep_report_takes_each_methods_best_rate_and_oreos_beam_search_as_rows_of_their_own(tmp_path):
    # hand-written validation accuracies: greedy files under sweep/, OREO's beam-search files under sweep/beam/
    greedy = {"rs": {"1e-4": 0.6, "1e-3": 0.5}, "oreo": {"1e-4": 0.4, "1e-3": 0.55, "3e-3": 0.55}}
    beams = {"oreo": {"1e-4": {"beam2": 0.3, "beam3": 0.7}, "1e-3": {"beam2": 0.5, "beam3": 0.6}}}
    (tmp_path / "sweep" / "beam").mkdir(parents=True)
    for method, by_lr in greedy.items():
        for lr, acc in by_lr.items():
            summary = {"greedy": {"accuracy": acc, "tokens": 1, "seconds": 1}}
            (tmp_path / "sweep" / f"{method}-lr{lr}.json").write_text(json.dumps({"summary": summary}))
    for method, by_lr in beams.items():
        for lr, accs in by_lr.items():
            summary = {key: {"accuracy": acc, "tokens": 1, "seconds": 1} for key, acc in accs.items()}
            (tmp_path / "sweep" / "beam" / f"{method}-lr{lr}.json").write_text(json.dumps({"summary": summary}))
    report.main(["sweep", str(tmp_path)])
    result = json.loads((tmp_path / "sweep.json").read_text())
    # a tie (OREO 0.55 at 1e-3 and 3e-3) goes to the smaller rate
    assert result["best_lr"] == {"rs": "1e-4", "oreo": "1e-3", "oreo+beam2": "1e-3", "oreo+beam3": "1e-4"}
    assert result["validation_accuracy"]["oreo+beam3"] == {"1e-4": 0.7, "1e-3": 0.6}


def test_agent_report_rows_come_from_each_eval_file_and_average_over_seeds(tmp_path):
    # hand-written agent.py eval summaries of 2 seeds: file -> split -> method -> success
    seeds = [{"sft": {"seen": {"greedy": 0.25}, "unseen": {"greedy": 0.5}},
              "oreo": {"seen": {"greedy": 0.5, "sample": 0.125, "bestof3": 0.375}, "unseen": {"greedy": 0.25}},
              "oreo_t05": {"seen": {"sample": 0.625, "bestof3": 0.75}}},
             {"sft": {"seen": {"greedy": 0.75}, "unseen": {"greedy": 0.5}},
              "oreo": {"seen": {"greedy": 0.5, "sample": 0.375, "bestof3": 0.125}, "unseen": {"greedy": 0.75}},
              "oreo_t05": {"seen": {"sample": 0.375, "bestof3": 0.25}}}]
    runs = []
    for i, files in enumerate(seeds):
        (tmp_path / f"s{i}" / "eval").mkdir(parents=True)
        for name, splits in files.items():
            summary = {split: {m: {"success": x, "steps": 9, "episodes": 8, "seconds": 1} for m, x in methods.items()}
                       for split, methods in splits.items()}
            (tmp_path / f"s{i}" / "eval" / f"{name}.json").write_text(json.dumps({"summary": summary}))
        runs.append(str(tmp_path / f"s{i}"))
    report.main(["agent", *runs, "--out", str(tmp_path / "summary")])
    table = json.loads((tmp_path / "summary" / "results.json").read_text())["table"]
    assert list(table) == ["seen: SFT", "seen: OREO-token", "seen: OREO-token, sampling (T 1)",
                           "seen: OREO-token + best-of-3", "seen: OREO-token, sampling (T 0.5)",
                           "seen: OREO-token + best-of-3 (T 0.5)", "unseen: SFT", "unseen: OREO-token"]
    assert table["seen: OREO-token + best-of-3 (T 0.5)"]["seeds"] == [0.75, 0.25]
    assert table["seen: OREO-token + best-of-3 (T 0.5)"]["mean"] == pytest.approx(0.5)
    assert table["seen: SFT"]["std"] == pytest.approx(statistics.stdev([0.25, 0.75]))
    assert table["unseen: OREO-token"]["problems"] == 8


# ---- the whole pipeline at tiny size -----------------------------------------------------------------------

def run_train_sh(out, timeout=1200, rounds=2):
    proc = run_command(["bash", os.path.join(ROOT, "train.sh"), "--out", str(out), "--seed", "1",
                        "--rounds", str(rounds)], env=ENV, timeout=timeout)
    assert proc.returncode == 0, f"train.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    return out, run_train_sh(out)


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_data_files_parse_and_samples_are_graded_k_per_problem(run):
    out, _ = run
    splits = {s: data.load_problems(out / "data" / f"problems_{s}.jsonl") for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [48, 8, 24]
    samples = data.load_trajectories(out / "data" / "samples_r1.jsonl")
    assert len(samples) == 48 * K
    for row in samples:
        assert row["reward"] == data.grade(row["response"], row["gold"]), f"reward does not match the grader: {row}"


def test_every_trainer_exported_its_models_and_logged_every_step(run):
    out, _ = run
    for name in RUNS:
        assert (out / name / "policy" / "config.json").exists(), f"{name}: no exported policy"
        log = read_log(out / name / "log.jsonl")
        assert [r["step"] for r in log] == list(range(1, len(log) + 1)) and len(log) >= STEPS, f"{name}: steps"
    for name in ("oreo", "oreo_step", "oreo_search", "oreo_r2"):
        assert (out / name / "value" / "value_head.safetensors").exists(), f"{name}: no exported value model"


@pytest.mark.parametrize("method", ["rs", "oreo"])
def test_round_2_collects_with_round_1s_policy_and_trains_from_it(run, method):
    out, _ = run
    samples = data.load_trajectories(out / "data" / f"samples_{method}_r2.jsonl")
    assert len(samples) == 48 * K and all(r["reward"] == data.grade(r["response"], r["gold"]) for r in samples)
    args = torch.load(out / f"{method}_r2" / "ckpt.pt", map_location="cpu", weights_only=False)["args"]
    assert args["init"] == str(out / method / "policy") and args["data"].endswith(f"samples_{method}_r2.jsonl")


@pytest.mark.parametrize("name", ["sft", "rs", "dpo"])
def test_training_reduced_the_loss(run, name):
    out, _ = run
    losses = [r["policy_loss"] for r in read_log(out / name / "log.jsonl")]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.9 * first, f"{name}: mean loss of the first 4 steps {first:.4f}, of the last 4 {last:.4f}"


@torch.no_grad()
def bellman_losses(folder, policy_folder, value_folder, variant):
    """OREO's (policy, value) losses over all of round 1's samples, in one batch, for the given models (the
    per-step log is too noisy at this size: a batch of 8 holds 0 to 2 correct samples)."""
    tokenizer = data.Tokenizer.from_pretrained(folder / "sft" / "policy")
    examples = [data.encode_trajectory(tokenizer, t, 2048) for t in
                data.load_trajectories(folder / "data" / "samples_r1.jsonl")]
    batch = data.collate(examples, tokenizer.pad_id)
    ids = batch["input_ids"]
    logp = oreo.policy_logprobs(Transformer.from_pretrained(policy_folder), ids, False)[0]
    ref_logp = oreo.policy_logprobs(Transformer.from_pretrained(folder / "sft" / "policy"), ids, False)[0]
    values = ValueModel.from_pretrained(value_folder)(ids)[:, :-1]
    return oreo.oreo_loss(logp, ref_logp, values, batch["rewards"], batch["mask"], 0.03, variant, batch["step_start"])


@pytest.mark.parametrize("name,variant", [("oreo", "token"), ("oreo_step", "step")])
def test_oreo_training_reduced_the_value_loss_on_its_data(run, name, variant):
    out, _ = run
    sft = out / "sft" / "policy"
    # against how oreo.py starts the value: the SFT backbone with a zero head. (The policy loss is not checked: at
    # this size 24 noisy steps need not lower it; tests/test_oreo.py checks that the policy learns on a fixed batch.)
    _, before = bellman_losses(out, sft, sft, variant)
    _, after = bellman_losses(out, out / name / "policy", out / name / "value", variant)
    # With few right answers (p ≈ 7% here) even the best constant beats the zero head by only ≈ p: no margin.
    assert after < before, f"{name}: value loss over its training samples {before:.4f} before, {after:.4f} after"


def test_eval_files_hold_accuracies_in_0_1_for_every_problem(run):
    out, _ = run
    evals = {p.stem: json.loads(p.read_text()) for p in (out / "eval").glob("*.json")}
    assert set(evals) == {"sft", "rs", "dpo", "kto", "oreo", "oreo_step", "beam_oreo", "beam_sft", "choice",
                          "oreo_search", "rs_r2", "oreo_r2", "beam_oreo_r2"}
    assert set(evals["beam_sft"]["summary"]) == {"beam2", "randbeam2"}
    assert set(evals["oreo_search"]["summary"]) == {"greedy", "beam2", "beam3"}
    for name, ev in evals.items():
        for method, s in ev["summary"].items():
            assert 0 <= s["accuracy"] <= 1, f"{name} {method}: accuracy {s['accuracy']}"
            n = 10 if name.startswith("beam") or name == "oreo_search" else 24
            assert len(ev["per_problem"][method]) == n, (name, method)
        for method, c in ev["choice"].items():
            assert 0 <= c["random"] <= c["best_possible"] <= 1 and c["by_value"] <= c["best_possible"], (name, c)


def test_results_table_has_every_row_and_the_chart_is_valid_svg(run):
    out, stdout = run
    table = json.loads((out / "results.json").read_text())["table"]
    expected = ["SFT greedy", "SFT sampling (T = 1)", "RS greedy", "DPO greedy", "KTO greedy", "OREO-token greedy",
                "OREO-step greedy", "RS round 2 greedy", "OREO-token round 2 greedy",
                "OREO-token greedy (beam problems)", "OREO + value beam B = 2",
                "OREO + value beam B = 3", "OREO-token round 2 greedy on the beam problems",
                "OREO-token round 2 + value beam B = 2", "OREO-token round 2 + value beam B = 3",
                "OREO-token tuned for search: greedy (beam problems)",
                "OREO-token tuned for search + value beam B = 2", "OREO-token tuned for search + value beam B = 3",
                "SFT greedy (beam problems)", "SFT policy + OREO value beam B = 2",
                "SFT policy + random scores beam B = 2 (control)",
                f"1 of {K} SFT samples chosen by OREO value", f"1 of {K} SFT samples chosen at random",
                f"1 of {K} SFT samples: best possible"]
    assert list(table) == expected
    for label, row in table.items():
        assert 0 <= row["mean"] <= 1 and row["std"] == 0 and len(row["seeds"]) == 1, (label, row)
        assert row["problems"] == (10 if "beam" in label else 24), (label, row)
        assert label in stdout, f"the printed table lacks {label!r}"
    diagnostics = json.loads((out / "results.json").read_text())["diagnostics"]
    shares = [label for label, row in diagnostics.items() if row["group"]]
    assert len(diagnostics) >= 5 and len(shares) >= 3, diagnostics   # credit rows need a one-wrong-step sample
    svg = ET.parse(out / "results.svg").getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    assert len(svg.findall("{http://www.w3.org/2000/svg}rect")) == len(expected) + len(shares)


def test_diagnostics_match_the_samples_they_were_computed_from(run):
    out, _ = run
    d = json.loads((out / "diagnostics.json").read_text())
    assert d["sft_samples"] == diagnose.step_stats(data.load_trajectories(out / "data" / "samples_r1.jsonl"))
    assert d["sft_loss"] > d["entropy_floor"] > 0
    assert d["test_samples"]["samples"] == 12 * K and d["credit"]["problems"] == 12
    for path in d["credit"]["paths"]:
        assert len(path["values"]) >= 2 and 1 <= path["wrong_step"] < len(path["values"])


def test_progress_shows_stages_steps_and_eta(run):
    _, stdout = run
    assert "start sft" in stdout and "done oreo " in stdout
    assert f"[oreo] step {STEPS}/{STEPS}" in stdout and "ETA" in stdout


def test_rerun_skips_every_finished_stage(run):
    out, _ = run
    stdout = run_train_sh(out, timeout=300)
    assert " start " not in stdout, f"a finished stage ran again:\n{stdout}"


def test_the_same_command_in_a_fresh_folder_gives_the_same_results(run, tmp_path):
    # one round only (79 s instead of 131 s here): round 2 adds its own rows and changes none of round 1's
    out, _ = run
    run_train_sh(tmp_path / "again", rounds=1)
    first, second = (json.loads((o / "results.json").read_text()) for o in (out, tmp_path / "again"))
    assert [k for k in first["table"] if k not in second["table"]] == [k for k in first["table"] if "round 2" in k]
    assert second["table"] == {k: first["table"][k] for k in second["table"]}
    assert first["diagnostics"] == second["diagnostics"]
