"""household.py and agent.py: every task type solved by its expert plan, impossible actions change nothing, reward
only on success, the splits; batched rollouts against one-at-a-time ones, the value read where training puts it,
masks on assistant tokens only, and collect's resume, on tiny random models and the byte-level tokenizer; last, `bash
train.sh agent` whole at tiny size."""
import json
import math
import os
import random
import statistics
import xml.etree.ElementTree as ET

import pytest
import torch

import agent
import data
import diagnose
import household
import search
from household import NOTHING, TASK_TYPES, HouseholdEnv
from model import ValueModel
from tests.launch import ROOT, launch, run
from tiny_models import tiny_model

TOKENIZER = data.Tokenizer.byte_level()


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_value(seed=1, dtype=torch.float64):
    value = ValueModel(None, tiny_model(seed=seed, dtype=dtype, max_seq_len=1024))
    with torch.no_grad():
        value.head.weight.normal_(0, 1.0)
    return value.to(dtype).eval()


# ---- the environment ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "seen", "unseen"])
def test_every_task_type_is_solved_by_its_expert_plan_also_from_a_random_midway_state(split):
    env, rng = HouseholdEnv(split, seed=3), random.Random(0)
    tasks = env.tasks(n=60)
    assert {t["type"] for t in tasks} == set(TASK_TYPES)
    for task in tasks:
        for warmup in (0, 6):   # from the start, and after 6 random actions (some apply, some do not)
            env.reset(task)
            for _ in range(warmup):
                env.step(rng.choice(random_actions(env)))
            if env.done:
                continue
            plan = env.expert_plan()
            for n, action in enumerate(plan, 1):
                observation, reward, done = env.step(action)
                assert observation != NOTHING, f"{task['id']}: {action!r} of the plan does not apply"
                assert (reward == 1.0) == (n == len(plan)) and done == (n == len(plan)), f"{task['id']}: {plan}"


def random_actions(env):
    """Mostly well-formed actions about this room's receptacles and objects, many of which cannot apply."""
    objects = [o for inside in env.contents.values() for o in inside] + [env.holding or "mug 1"]
    r, o = random.choice(env.receptacles), random.choice(objects)
    return [f"go to {r}", f"open {r}", f"close {r}", f"take {o} from {r}", f"put {o} in/on {r}",
            f"clean {o} with sinkbasin 1", f"heat {o} with microwave 1", f"cool {o} with fridge 1",
            "use desklamp 1", f"examine {o}", "look", "inventory"]


def test_impossible_actions_answer_nothing_happens_and_change_nothing():
    env = HouseholdEnv("train", seed=0)
    task = next(t for t in env.tasks() if t["type"] == "pick_clean_then_place")
    env.reset(task)
    closed = next(r for r in env.receptacles if r.startswith("drawer"))
    inside = next(r for r in env.receptacles if r.startswith("cabinet"))
    env.contents[closed].append("pen 9")
    env.contents[inside].append("cd 9")
    cases = [  # (what to do first, the impossible action)
        ([], "fly to the moon"), ([], ""), ([], "go to bathtub 1"), ([], "open fridge 1"), ([], "take cd 9 from "
         f"{inside}"), ([], "put cd 9 in countertop 1"), ([], "use desklamp 1"), ([], "inventory please"),
        ([f"go to {closed}"], f"go to {closed}"), ([f"go to {closed}"], f"take pen 9 from {closed}"),
        ([f"go to {closed}"], f"close {closed}"), ([f"go to {closed}", f"open {closed}"], f"open {closed}"),
        (["go to countertop 1"], "open countertop 1"), (["go to countertop 1"], f"take cd 9 from {inside}"),
        ([f"go to {inside}", f"open {inside}"], "take desklamp 1 from shelf 1"),
        ([f"go to {inside}", f"open {inside}", f"take cd 9 from {inside}"], f"take cd 9 from {inside}"),
        ([f"go to {inside}", f"open {inside}", f"take cd 9 from {inside}"], "put cd 9 in countertop 1"),
        ([f"go to {inside}", f"open {inside}", f"take cd 9 from {inside}"], "put pen 9 in " + inside),
        ([f"go to {inside}", f"open {inside}", f"take cd 9 from {inside}"], "clean cd 9 with sinkbasin 1"),
        ([f"go to {inside}", f"open {inside}", f"take cd 9 from {inside}", "go to sinkbasin 1"],
         "clean cd 9 with microwave 1"),
        ([f"go to {inside}", f"open {inside}", f"take cd 9 from {inside}", "go to sinkbasin 1"],
         "heat cd 9 with microwave 1"),
        (["go to sinkbasin 1"], "clean cd 9 with sinkbasin 1"), (["go to fridge 1"], "examine pen 9"),
        ([f"go to {env.lamp}", "use desklamp 1"], "use desklamp 1"),
    ]
    for before, action in cases:
        env.reset(task)
        env.contents[closed].append("pen 9")
        env.contents[inside].append("cd 9")
        env.attributes.update({"pen 9": set(), "cd 9": set()})
        for a in before:
            assert env.step(a)[0] != NOTHING, f"setting up {action!r}: {a!r} should apply"
        snapshot = env.state()
        assert env.step(action) == (NOTHING, 0.0, False), f"{action!r} after {before}"
        assert env.state() == snapshot, f"{action!r} after {before} changed the world"


def test_reward_comes_only_in_the_step_that_reaches_the_goal_and_the_step_limit_ends_episodes():
    env, rng = HouseholdEnv("train", seed=1, max_steps=25), random.Random(2)
    for task in env.tasks(n=90):
        env.reset(task)
        assert not env.goal_holds(), f"{task['id']}: the goal holds before any action"
        for n in range(1, 26):
            # half expert, half random: episodes that succeed and episodes that run out of steps
            action = env.expert_plan()[0] if rng.random() < 0.5 else rng.choice(random_actions(env))
            _, reward, done = env.step(action)
            assert reward == float(env.goal_holds()), f"{task['id']}: reward {reward} after {action!r}"
            assert done == (reward == 1.0 or n == 25)
            if done:
                break
        with pytest.raises(RuntimeError):
            env.step("look")


def test_unseen_split_has_new_layouts_and_combinations_and_seen_and_val_have_new_episodes():
    train, val, seen, unseen = (household.make_tasks(s, seed=5) for s in ("train", "val", "seen", "unseen"))
    key = lambda t: (t["type"], t["object"], t["target"])
    layout = lambda t: json.dumps(t["layout"], sort_keys=True)
    assert not {key(t) for t in unseen} & {key(t) for t in train}
    assert not {layout(t) for t in unseen} & {layout(t) for t in train}
    pool = set(household.world(5)[2]["train"])   # seen draws from the training combinations, not from the 600 drawn
    assert {key(t) for t in seen} <= pool and {key(t) for t in train} <= pool
    assert {layout(t) for t in seen} <= {layout(t) for t in train}
    episode = lambda split: {(key(t), layout(t), t["episode"]) for t in split}
    assert not episode(seen) & episode(train)
    # val (for choosing settings) is drawn like seen, apart from train and from seen
    assert {key(t) for t in val} <= pool and {layout(t) for t in val} <= {layout(t) for t in train}
    assert not episode(val) & episode(train) and not episode(val) & episode(seen)
    assert [len(x) for x in (train, val, seen, unseen)] == [600, 140, 140, 134]


def test_demonstrator_makes_mistakes_and_its_reward_is_the_environments():
    env, rng = HouseholdEnv("train", seed=0, max_steps=20), random.Random(0)
    results = [household.demonstrate(env, t, rng) for t in env.tasks(n=120)]
    rewards = [r for _, _, r in results]
    assert 0.3 < sum(rewards) / len(rewards) < 1.0, "the demonstrator should fail some episodes at the step limit"
    assert any(o == "You see nothing." for _, turns, _ in results for _, o in turns), "it never searched in vain"
    for (first, turns, reward), task in zip(results, env.tasks(n=120)):   # replaying its actions gives its reward
        assert env.reset(task) == first
        out = [env.step(a) for a, _ in turns]
        assert [o for o, _, _ in out] == [o for _, o in turns] and reward == out[-1][1]


# ---- rollouts -----------------------------------------------------------------------------------------------

def scripted_env(split="train", seed=0, max_steps=6):
    return lambda: HouseholdEnv(split, seed, max_steps)


@pytest.mark.parametrize("k,temperature,samples", [(1, 0.0, 2), (1, 1.0, 2), (3, 1.0, 1)])
def test_batched_rollouts_equal_one_at_a_time(k, temperature, samples):
    policy, value = tiny_model(max_seq_len=1024), tiny_value()
    tasks = HouseholdEnv("train", 0).tasks(n=3)
    kw = dict(k=k, value_model=value, temperature=temperature, max_action_tokens=8)
    env = scripted_env(max_steps=4)
    together = agent.run_episodes(policy, TOKENIZER, env, tasks, samples=samples, seed=7, batch_size=6, **kw)
    alone = agent.run_episodes(policy, TOKENIZER, env, tasks, samples=samples, seed=7, batch_size=1, **kw)
    assert together == alone
    # greedy: both samples of a task are the same episode; sampled: every episode differs
    assert len({json.dumps(e["messages"]) for e in together}) == 3 * (1 if temperature == 0 else samples)


def test_best_of_k_reads_the_value_at_the_actions_last_token_a_trained_position():
    policy, value = tiny_model(max_seq_len=1024), tiny_value()
    tasks = HouseholdEnv("train", 0).tasks(n=3)
    episodes = agent.run_episodes(policy, TOKENIZER, scripted_env(max_steps=4), tasks, k=3, value_model=value,
                                  max_action_tokens=12, seed=1)
    for ep in episodes:
        ex = data.encode_trajectory(TOKENIZER, {"messages": ep["messages"], "reward": 0.0}, 10**9)
        turns = [i for i, m in enumerate(ep["messages"]) if m["role"] == "assistant"]
        for n, i in enumerate(turns):
            prefix = agent.render(TOKENIZER, ep["messages"][:i])
            # full recompute of the value there, in float64, against the cached engine's
            seq = prefix + ep["action_tokens"][n]
            assert ep["values"][n] == pytest.approx(search.last_token_values(value, [seq])[0], abs=1e-6)
            # in the transcript training sees, that is the state whose action (the next token) ends the turn
            j = len(prefix) + len(TOKENIZER.encode(ep["messages"][i]["content"])) - 1
            assert ex.ids[j + 1] == TOKENIZER.eos_id and ex.mask[j] == 1 and ex.mask[j - 1] == 1
            # every candidate is kept with its value; the chosen one is the first of the highest
            texts, values = zip(*ep["candidates"][n])
            assert len(texts) == 3 and values.index(max(values)) == texts.index(ep["messages"][i]["content"])
            assert max(values) == ep["values"][n]


def test_an_episode_continued_from_its_prefix_is_the_rest_of_the_full_episode():
    policy = tiny_model(seed=4, max_seq_len=1024)
    tasks = HouseholdEnv("train", 0).tasks(n=2)
    env = scripted_env(max_steps=6)
    full = agent.run_episodes(policy, TOKENIZER, env, tasks, max_action_tokens=10, temperature=0.0)
    prefixes = [ep["messages"][:5] for ep in full]   # the first observation and 2 turns
    rest = agent.run_episodes(policy, TOKENIZER, env, tasks, max_action_tokens=10, temperature=0.0,
                              prefixes=prefixes)
    for a, b in zip(full, rest):
        assert b["messages"] == a["messages"] and b["steps"] == a["steps"] - 2 and b["reward"] == a["reward"]
    with pytest.raises(data.UserError, match="or ends with an action"):
        agent.run_episodes(policy, TOKENIZER, env, tasks[:1], temperature=0.0, prefixes=[full[0]["messages"][:4]])
    prefixes[1][2]["content"] = "You see a unicorn."
    with pytest.raises(data.UserError, match=f"task {tasks[1]['id']}: the environment does not replay the prefix"):
        agent.run_episodes(policy, TOKENIZER, env, tasks, max_action_tokens=10, temperature=0.0, prefixes=prefixes)


def test_masks_cover_the_assistant_tokens_only():
    policy = tiny_model(seed=2, max_seq_len=1024)
    ep = agent.run_episodes(policy, TOKENIZER, scripted_env(max_steps=5), HouseholdEnv("train", 0).tasks(n=1),
                            temperature=1.0, max_action_tokens=12, seed=3)[0]
    ex = data.encode_trajectory(TOKENIZER, {"messages": ep["messages"], "reward": ep["reward"]}, 10**9)
    expected = []   # rebuilt from the text: "assistant: " + content + EOS are actions, nothing else
    for m in ep["messages"]:
        expected += [0] * len(f"{m['role']}: ".encode())
        expected += [int(m["role"] == "assistant")] * (len(m["content"].encode()) + (m["role"] == "assistant"))
        expected += [0]
    assert ex.mask == expected[1:]
    assert sum(ex.mask) == sum(len(m["content"].encode()) + 1 for m in ep["messages"] if m["role"] == "assistant")


# ---- collect and eval through the command line ------------------------------------------------------------

@pytest.fixture
def policy_dirs(tmp_path):
    model = tiny_model(dtype=torch.float32, max_seq_len=512)
    model.save_pretrained(tmp_path / "policy", tokenizer=TOKENIZER)
    value = ValueModel(None, model)
    torch.nn.init.normal_(value.head.weight)
    value.save_pretrained(tmp_path / "value", tokenizer=TOKENIZER)
    return tmp_path, tmp_path / "policy", tmp_path / "value"


def collect_args(policy, out):
    # 5 tasks, k = 2, batch size 4: chunks of 2 tasks (4 episodes), so 3 chunks
    return ["collect", "--policy", str(policy), "--out", str(out), "-k", "2", "--tasks", "5", "--max-steps", "3",
            "--max-action-tokens", "6", "--batch-size", "4", "--device", "cpu", "--seed", "4"]


def test_collect_writes_transcripts_oreo_reads_and_an_interrupted_collect_resumes_to_the_same_file(policy_dirs):
    tmp_path, policy, _ = policy_dirs
    full = tmp_path / "full.jsonl"
    agent.main(collect_args(policy, full))
    rows = data.load_trajectories(str(full))
    assert [r["id"] for r in rows] == [t["id"] for t in HouseholdEnv("train", 4).tasks(n=5) for _ in range(2)]
    assert all(r["steps"] == 3 and r["messages"][0]["role"] == "user" for r in rows)
    expected = full.read_text()
    lines = expected.splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"   # killed while writing: one whole chunk, one task of the next, half a line
    cut.write_text("".join(lines[:6]) + lines[6][:30])
    agent.main(collect_args(policy, cut))
    assert cut.read_text() == expected
    assert not list(tmp_path.glob("cut.jsonl.*")), "no part or temporary files should remain"


def test_collect_on_two_torchrun_ranks_writes_the_same_file_as_one_process(policy_dirs):
    tmp_path, policy, _ = policy_dirs
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    agent.main(collect_args(policy, one))
    p = launch("agent.py", collect_args(policy, two), nproc=2, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert two.read_text() == one.read_text()


def test_eval_reports_success_and_steps_per_split_and_method(policy_dirs):
    tmp_path, policy, value = policy_dirs
    out = tmp_path / "eval.json"
    summary = agent.main(["eval", "--policy", str(policy), "--value", str(value), "--methods", "greedy,bestof2",
                          "--tasks", "2", "--max-steps", "2", "--max-action-tokens", "6", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["summary"] == summary and set(summary) == {"seen", "unseen"}
    for split in summary:
        assert set(summary[split]) == {"greedy", "bestof2"}
        assert [r["id"] for r in report["per_task"][split]["greedy"]] == [f"{split}-0", f"{split}-1"]
        assert summary[split]["greedy"]["steps"] == 2.0   # a random policy never succeeds in 2 steps
    with pytest.raises(ValueError, match="value model"):
        agent.main(["eval", "--policy", str(policy), "--methods", "bestof2", "--out", str(out)])
    with pytest.raises(data.UserError, match="--splits seen,foo: 'foo': unknown split"):
        agent.main(["eval", "--policy", str(policy), "--methods", "greedy", "--splits", "seen,foo",
                    "--out", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()


# ---- diagnose: failing actions by verb, V at each turn's end ------------------------------------------------

def test_auc_equals_the_pairwise_count_with_ties_half():
    rng = random.Random(0)
    for n, m in [(1, 1), (3, 7), (20, 13)]:
        pos, neg = [rng.randint(0, 5) for _ in range(n)], [rng.randint(0, 5) for _ in range(m)]
        pairs = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg) / (n * m)
        assert diagnose.auc(pos, neg) == pytest.approx(pairs, abs=1e-12)
    assert diagnose.auc([1.0], []) is None and diagnose.auc([], [0.0]) is None


def test_turn_end_values_of_a_transcript_equal_a_full_recompute_at_each_actions_last_token():
    # where best-of-K reads V while acting (test_best_of_k_reads_the_value_at_the_actions_last_token...): the
    # prefix up to the turn's open header plus the action's ids, recomputed here one prefix at a time
    policy, value = tiny_model(max_seq_len=1024), tiny_value()
    episodes = agent.run_episodes(policy, TOKENIZER, scripted_env(max_steps=4), HouseholdEnv("train", 0).tasks(n=2),
                                  temperature=1.0, max_action_tokens=12, seed=5)
    for ep, got in zip(episodes, diagnose.turn_end_values(value, TOKENIZER, [ep["messages"] for ep in episodes])):
        turns = [i for i, m in enumerate(ep["messages"]) if m["role"] == "assistant"]
        assert len(got) == len(turns) == 4
        for n, i in enumerate(turns):
            seq = agent.render(TOKENIZER, ep["messages"][:i]) + TOKENIZER.encode(ep["messages"][i]["content"])
            assert got[n] == pytest.approx(search.last_token_values(value, [seq])[0], abs=1e-6)


def test_diagnose_counts_failing_actions_by_verb_and_the_values_auc(tmp_path):
    def episode(reward, *turns):
        messages = [{"role": "user", "content": "task"}]
        for action, answer in turns:
            messages += [{"role": "assistant", "content": action}, {"role": "user", "content": answer}]
        return {"id": "t", "messages": messages, "reward": reward}
    rows = [episode(1.0, ("go to desk 1", "On the desk 1, you see a mug 1."), ("take mug 1 from desk 1", "ok")),
            episode(0.0, ("put mug 1 in/on shelf 1", NOTHING), ("go to shelf 1", "ok"), ("look", NOTHING))]
    d = diagnose.agent_stats(rows, NOTHING, values=[[0.9, 0.8], [0.1, 0.85, 0.8]])
    assert (d["episodes"], d["success"], d["actions"], d["invalid"]) == (2, 0.5, 5, 2 / 5)
    assert d["by_verb"] == {"go": {"share": 0.4, "invalid": 0.0}, "take": {"share": 0.2, "invalid": 0.0},
                            "put": {"share": 0.2, "invalid": 1.0}, "look": {"share": 0.2, "invalid": 1.0}}
    assert d["mean_value"] == pytest.approx(3.45 / 5)
    # success 0.9, 0.8 against failure 0.1, 0.85, 0.8: 3 + (1 + 0.5 for the tie) of 6 pairs
    assert d["auc_success"] == pytest.approx(4.5 / 6)
    # valid 0.9, 0.8, 0.85 against the two answered NOTHING, 0.1 and 0.8: 2 + 1.5 + 2 of 6 pairs
    assert d["auc_valid"] == pytest.approx(5.5 / 6)
    assert "mean_value" not in diagnose.agent_stats(rows, NOTHING)
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"summary": {}, "per_task": {"seen": {"greedy": rows}}}))
    out = tmp_path / "diagnose.json"
    result = agent.main(["diagnose", "--eval", str(ev), "--out", str(out)])
    assert json.loads(out.read_text()) == result and result["splits"]["seen"]["greedy"]["invalid"] == 2 / 5
    with pytest.raises(data.UserError, match=f"--eval {out}: not an agent.py eval output"):
        agent.main(["diagnose", "--eval", str(out)])


def test_candidate_validity_steps_each_candidate_in_a_replayed_copy_and_the_within_turn_auc(tmp_path):
    env = HouseholdEnv("seen", 0, 40)
    task = env.tasks()[0]
    messages = [{"role": "user", "content": env.reset(task)}]
    plan = env.expert_plan()
    bad = "take mug 9 from shelf 7"   # nothing of that name: it cannot apply, nor can "xyzzy"; the plan's actions do
    actions = ["xyzzy"] + plan         # a failing first action changes nothing: the plan still applies after it
    for action in actions:
        messages += [{"role": "assistant", "content": action}, {"role": "user", "content": env.step(action)[0]}]
    assert messages[2]["content"] == NOTHING and env.done
    # turn 0: "xyzzy" ties the valid plan[0] at the top and is first, so rollout chose it; later turns: the plan's
    # action ties `bad` at the top and is first. Each turn: the valid one vs the 2 invalid ones, a tie and a win.
    candidates = [[["xyzzy", 0.5], [plan[0], 0.5], [bad, 0.1]]]
    candidates += [[[a, 0.3], ["xyzzy", 0.2], [bad, 0.3]] for a in plan]
    row = {"id": task["id"], "messages": messages, "reward": 1.0, "candidates": candidates}
    make_env = scripted_env("seen", 0, 40)
    steps = diagnose.candidate_steps(make_env, task, row)
    validity = diagnose.candidate_validity(steps, NOTHING)
    assert validity == [[False, True, False]] + [[True, False, False]] * len(plan)   # the replay went on: copies
    d = diagnose.agent_stats([row], NOTHING, validity=[validity])
    n = len(actions)
    assert d["mixed_turns"] == n and d["random_valid"] == pytest.approx(1 / 3)
    assert d["auc_valid_within_turn"] == pytest.approx(1.5 / 2) and d["chosen_valid"] == pytest.approx((n - 1) / n)
    # first valid minus first invalid: 0.5 - 0.5 at turn 0, then 0.3 - 0.2 (the first invalid is "xyzzy")
    value_gaps = [0.0] + [0.3 - 0.2] * (n - 1)
    assert d["value_gap"] == pytest.approx(sum(value_gaps) / n)
    assert d["value_gap_sd"] == pytest.approx(statistics.stdev(value_gaps))
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"env": "household", "seed": 0, "max_steps": 40, "tasks": 0,
                              "per_task": {"seen": {"bestof3": [row]}}}))
    got = agent.main(["diagnose", "--eval", str(ev)])["splits"]["seen"]["bestof3"]
    assert got["mixed_turns"] == n and got["chosen_valid"] == d["chosen_valid"]
    with pytest.raises(data.UserError, match="--returns: give --policy FOLDER"):
        agent.main(["diagnose", "--eval", str(ev), "--returns", "2"])
    all_valid = {**row, "candidates": [[[a, 0.5]] * 3 for a in actions[1:]], "messages": [messages[0]] + messages[3:]}
    assert diagnose.agent_stats([all_valid], NOTHING, validity=[[[True] * 3] * len(plan)])["chosen_valid"] is None
    last_of_highest = {**row, "candidates": [[[plan[0], 0.5], ["xyzzy", 0.5], [bad, 0.1]]] + candidates[1:]}
    with pytest.raises(data.UserError, match="turn 0: the action 'xyzzy' is not the first of the highest"):
        diagnose.candidate_steps(make_env, task, last_of_highest)
    # the return gap, on two copies of the row (two episodes): continuations after the first valid and the first
    # invalid candidate of each turn; the last plan action ends the episode (reward 1) and is not continued. A
    # stand-in policy: after a valid candidate every continuation succeeds; after an invalid one, sample s of the
    # q-th prefix succeeds when q + s is a multiple of 3.
    seen = []

    def go_on(prefixes, k):
        seen.extend(prefixes)
        return [{"reward": float(p[-2]["content"] not in (bad, "xyzzy") or (q + s) % 3 == 0)}
                for q, (_, p) in enumerate(prefixes) for s in range(k)]
    g = diagnose.return_gap([row, row], [steps, steps], NOTHING, go_on, 2, 100, seed=0)
    assert len(seen) == 2 * (2 * n - 1) and all(i == task["id"] and p[-1]["role"] == "user" for i, p in seen)
    assert [p[-2]["content"] for _, p in seen[:4]] == [plan[0], "xyzzy", plan[0], "xyzzy"]   # turn t > 0: plan[t - 1]
    gaps, q = [], 0   # the same walk by hand: turn by turn, the valid prefix (if any) and then the invalid one
    for _ in range(2):
        for turn in range(n):
            q += turn < n - 1
            gaps.append(1.0 - sum((q + s) % 3 == 0 for s in range(2)) / 2)
            q += 1
    mean = sum(gaps) / len(gaps)
    clustered = math.sqrt(sum(sum(x - mean for x in gaps[r * n:(r + 1) * n]) ** 2 for r in range(2))) / len(gaps)
    value_gaps = [0.0] + [0.3 - 0.2] * (n - 1)
    assert (g["turns"], g["episodes"], g["after_valid"]) == (2 * n, 2, 1.0)
    assert g["gap"] == pytest.approx(mean) and g["gap_se"] == pytest.approx(clustered)
    assert g["value_gap"] == pytest.approx(sum(value_gaps) / n)
    assert g["correlation"] == pytest.approx(statistics.correlation(value_gaps * 2, gaps))
    assert diagnose.return_gap([row], [steps], NOTHING, go_on, 2, 3, seed=0)["turns"] == 3   # at most max_turns
    messages[4]["content"] = "You see a unicorn."
    with pytest.raises(data.UserError, match="turn 1: the replayed environment answers otherwise"):
        diagnose.candidate_steps(make_env, task, row)


# ---- train.sh agent: the whole pipeline at tiny size --------------------------------------------------------

# 3 training tasks, learnt by heart (80 epochs) so that the 12 episodes collected per task hold successes for RS
# and DPO (seed 5: 10 of 36 on the Xeon of the README; another CPU rounds differently and may collect fewer, and
# with fewer than 2 RS and DPO stop with one error line naming the file)
A_TINY = {"A_TRAIN": "3", "A_DEMOS": "8", "A_K": "12", "A_EVAL": "2", "A_MAX_STEPS": "20", "A_BEST_OF": "2",
          "A_SFT_EPOCHS": "80", "A_SFT_BATCH": "8", "A_STEPS": "4", "A_BATCH": "2",
          "A_MODEL": "--n-layer 2 --d-model 64 --n-head 2"}
A_RUNS = ("sft", "rs", "dpo", "oreo", "oreo_step")


def replayed(row, split, seed, max_steps):
    """Step a fresh environment through a transcript's actions: (its observations, the reward it gave)."""
    env = HouseholdEnv(split, seed, max_steps)
    task = next(t for t in env.tasks() if t["id"] == row["id"])
    observations, reward = [env.reset(task)], 0.0
    for message in row["messages"][1::2]:
        observation, r, _ = env.step(message["content"])
        observations.append(observation)
        reward += r
    return observations, reward


def test_train_sh_agent_runs_every_stage_into_the_results_table_and_a_rerun_skips_them(tmp_path):
    out, seed = tmp_path / "agent", 5
    cmd = ["bash", os.path.join(ROOT, "train.sh"), "agent", "--out", str(out), "--seed", str(seed)]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("A_") and k != "PARALLEL"}, **A_TINY,
           "OMP_NUM_THREADS": "1"}
    p = run(cmd, env=env, timeout=900)
    assert p.returncode == 0, f"train.sh agent failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"

    # the data: demonstrations and collected episodes of the 3 training tasks, as the environment answers them
    ids = [t["id"] for t in HouseholdEnv("train", seed).tasks(n=3)]
    for name, per_task in (("demos", 8), ("episodes", 12)):
        rows = data.load_trajectories(str(out / "data" / f"{name}.jsonl"))
        assert sorted(r["id"] for r in rows) == sorted(ids * per_task), name
        for r in rows:
            observations, reward = replayed(r, "train", seed, 20)
            assert [m["content"] for m in r["messages"][0::2]] == observations and r["reward"] == reward, name
    # every trainer: its logged steps and exported models; OREO's value models
    for name in A_RUNS:
        steps = [json.loads(line)["step"] for line in (out / name / "log.jsonl").read_text().splitlines()]
        assert steps == list(range(1, len(steps) + 1)) and len(steps) == (240 if name == "sft" else 4), name
        assert (out / name / "policy" / "config.json").exists(), name
    for name in ("oreo", "oreo_step"):
        assert (out / name / "value" / "value_head.safetensors").exists(), name
    sft = (str(out / "init"), str(out / "data" / "demos.jsonl"))  # SFT on the demonstrations; the others from its
    offline = (str(out / "sft" / "policy"), str(out / "data" / "episodes.jsonl"))  # policy on the collected episodes
    for name, start, loss, variant in (("sft", sft, "sft", "token"), ("rs", offline, "rs", "token"),
                                       ("dpo", offline, "dpo", "token"), ("oreo", offline, "oreo", "token"),
                                       ("oreo_step", offline, "oreo", "step")):
        args = torch.load(out / name / "ckpt.pt", map_location="cpu", weights_only=False)["args"]
        assert (args["init"], args["data"], args["loss"], args["variant"]) == (*start, loss, variant), name
    # the evaluations: 2 tasks per split, each method's success the mean of its episodes' rewards
    methods = {"sft": ["greedy"], "rs": ["greedy"], "dpo": ["greedy"], "oreo": ["greedy", "sample", "bestof2"],
               "oreo_step": ["greedy", "sample", "bestof2"], "oreo_t05": ["sample", "bestof2"]}
    for name, expected in methods.items():
        report = json.loads((out / "eval" / f"{name}.json").read_text())
        trained = "oreo" if name == "oreo_t05" else name
        assert report["policy"] == str(out / trained / "policy"), name
        assert report["value"] == (str(out / trained / "value") if trained.startswith("oreo") else None), name
        for split in ("seen", "unseen"):
            assert sorted(report["summary"][split]) == sorted(expected), name
            for method in expected:
                episodes = report["per_task"][split][method]
                assert [e["id"] for e in episodes] == [f"{split}-{i}" for i in range(2)], (name, method)
                assert report["summary"][split][method]["success"] == pytest.approx(
                    statistics.mean(e["reward"] for e in episodes)), (name, split, method)
                for e in episodes:
                    assert replayed(e, split, seed, 20)[1] == e["reward"], (name, split, method)
    # the table: every row on both splits, its one seed's number the eval file's
    rows = {"SFT": ("sft", "greedy"), "RS": ("rs", "greedy"), "DPO": ("dpo", "greedy"),
            "OREO-token": ("oreo", "greedy"), "OREO-step": ("oreo_step", "greedy"),
            "OREO-token, sampling (T 1)": ("oreo", "sample"), "OREO-token + best-of-2": ("oreo", "bestof2"),
            "OREO-step, sampling (T 1)": ("oreo_step", "sample"), "OREO-step + best-of-2": ("oreo_step", "bestof2"),
            "OREO-token, sampling (T 0.5)": ("oreo_t05", "sample"),
            "OREO-token + best-of-2 (T 0.5)": ("oreo_t05", "bestof2")}
    table = json.loads((out / "results.json").read_text())["table"]
    assert sorted(table) == sorted(f"{split}: {label}" for split in ("seen", "unseen") for label in rows)
    for label, (name, method) in rows.items():
        summary = json.loads((out / "eval" / f"{name}.json").read_text())["summary"]
        for split in ("seen", "unseen"):
            assert table[f"{split}: {label}"]["seeds"] == [summary[split][method]["success"]], label
    ET.fromstring((out / "results.svg").read_text())  # a well-formed SVG

    # a re-run starts no stage and changes no file but the report's
    def files():
        return {f: f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file() and "logs" not in f.parts
                and f.name not in ("results.json", "results.svg")}
    before = files()
    p = run(cmd, env=env, timeout=300)
    assert p.returncode == 0 and " start " not in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
    assert files() == before
