"""search.py and engine.py: the cached engine against the naive one, stop strings, beam search on a scripted tree,
cached beam search and best-of-K against their full-recompute references, the state each value is read at, collect
and its resume, eval, and the errors a user can cause. Tiny random models and the byte-level tokenizer."""
import json
import os

import pytest
import torch

import data
import engine
import loading
import search
from model import Config, ValueModel
from tests.launch import launch
from tiny_models import tiny_model

TOKENIZER = data.Tokenizer.byte_level()


pytestmark = pytest.mark.usefixtures("one_thread")


def random_prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_p=0.9, top_k=50)])
def test_cached_generation_equals_naive_token_for_token(family, sampling):
    model = tiny_model(family)
    prompts = random_prompts([5, 1, 13, 8], seed=1)
    # rows leave the batch mid-way: row 2 at its limit of 9 tokens, others when they sample a stop string or EOS
    kwargs = dict(max_new_tokens=[24, 30, 9, 30], stop=tuple("\x01\x03\x07\x08!$&*/:<>?@[]^{}~aeiou"), **sampling)
    cached = search.generate_with_finish(model, TOKENIZER, prompts, generator=torch.Generator().manual_seed(3),
                                         **kwargs)
    naive = search.generate_naive(model, TOKENIZER, prompts, generator=torch.Generator().manual_seed(3), **kwargs)
    assert cached == naive
    # several samples per prompt share one prefill; they must equal sampling the repeated prompts
    limits = [n for n in kwargs["max_new_tokens"] for _ in range(3)]
    repeated = search.generate_naive(model, TOKENIZER, [p for p in prompts for _ in range(3)],
                                     generator=torch.Generator().manual_seed(4), **dict(kwargs, max_new_tokens=limits))
    assert search.generate_with_finish(model, TOKENIZER, prompts, generator=torch.Generator().manual_seed(4),
                                       n_samples=3, **kwargs) == repeated


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batch_rows_of_different_lengths_equal_each_row_alone(dtype):
    model = tiny_model(dtype=dtype)
    prompts = random_prompts([2, 17, 6, 1, 9], seed=2)
    batched = search.generate(model, TOKENIZER, prompts, max_new_tokens=20, temperature=0)
    alone = [search.generate(model, TOKENIZER, [p], max_new_tokens=20, temperature=0)[0] for p in prompts]
    assert batched == alone
    assert len({tuple(t) for t in batched}) == len(prompts), "distinct prompts should give distinct continuations"


def test_sampling_is_reproducible_with_a_generator_and_top_k_1_is_greedy():
    model = tiny_model(dtype=torch.float32)
    prompts = random_prompts([4, 7], seed=4)
    a = search.generate(model, TOKENIZER, prompts, 16, generator=torch.Generator().manual_seed(0))
    b = search.generate(model, TOKENIZER, prompts, 16, generator=torch.Generator().manual_seed(0))
    c = search.generate(model, TOKENIZER, prompts, 16, generator=torch.Generator().manual_seed(1))
    assert a == b and a != c
    assert search.generate(model, TOKENIZER, prompts, 16, top_k=1, generator=torch.Generator().manual_seed(5)) \
        == search.generate(model, TOKENIZER, prompts, 16, temperature=0)


def test_top_p_keeps_the_smallest_set_holding_p_of_the_mass():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    seen = set(search.sample_next(logits.expand(4000, 4), top_p=0.75,
                                  generator=torch.Generator().manual_seed(0)).tolist())
    assert seen == {0, 2}, "0.5 + 0.3 reach 0.75, so only tokens 0 and 2 may be drawn"
    counts = torch.bincount(search.sample_next(logits.expand(20000, 4), generator=torch.Generator().manual_seed(1)),
                            minlength=4) / 20000
    assert torch.allclose(counts, probs[0], atol=0.015), f"sampled frequencies {counts} should match {probs}"


def test_stop_string_spanning_tokens_cuts_right_after_it():
    model = tiny_model()
    prompt = random_prompts([6], seed=6)
    free = search.generate(model, TOKENIZER, prompt, 40, temperature=0)[0]
    # a two-byte ASCII stop string first complete at token i >= 3 (every byte is one token here)
    i = next(i for i in range(3, len(free)) if free[i - 1] < 128 and free[i] < 128
             and bytes(free[i - 1:i + 1]) not in bytes(free[:i]))
    stop = bytes(free[i - 1:i + 1]).decode()
    tokens, finish = search.generate_with_finish(model, TOKENIZER, prompt, 40, temperature=0, stop=(stop,))
    assert tokens[0] == free[:i + 1] and finish == ["stop"]
    assert search.generate_with_finish(model, TOKENIZER, prompt, 40, temperature=0, stop=stop) == (tokens, finish)


class MergedTokens:
    """A tokenizer whose tokens hold several characters, like BPE: ".\\n\\nThe" is one token."""
    stop_ids = [0]
    vocab = ["<eos>", "x", ".", " ", ".\n\nThe", "\n", "$"]

    def token_bytes(self, ids):
        return [self.vocab[i].encode() for i in ids]


@pytest.mark.parametrize("tokens, stop, expected", [
    ([1, 4], ("\n",), "stop"),          # the delimiter sits inside a token
    ([1, 2], (". ",), None),            # only half of ". " so far
    ([1, 2, 3], (". ",), "stop"),       # ". " across two tokens
    ([2, 6, 3], (".$ ",), "stop"),      # three tokens
    ([1, 1], ("\n",), "length"),        # limit reached
    ([1, 0], ("\n",), "eos"),
])
def test_stop_strings_are_matched_on_text_across_and_inside_tokens(tokens, stop, expected):
    assert engine._check_stop(MergedTokens(), tokens, limit=2 if expected == "length" else 10, stop=stop) \
        == expected


@pytest.mark.parametrize("context, tokens, stop, delimiters, expected", [
    ([1, 5], [5], ("\n\n",), ("\n",), "stop"),    # a stop string that began in the beam's earlier step ends it
    ([1, 5], [5], (), ("\n",), "step"),           # without it, the same token only ends a step
    ([1, 2], [3], (), (". ",), None),             # a delimiter is a step's own: not matched across steps
    ([1, 2], [3], (". ",), ("\n",), "stop"),      # a stop string is matched across them
    ([1], [1, 5], ("$",), ("\n",), "step"),
])
def test_stop_strings_span_a_beams_earlier_steps_and_delimiters_do_not(context, tokens, stop, delimiters,
                                                                          expected):
    assert engine._check_stop(MergedTokens(), tokens, 10, stop, delimiters, context) == expected


@pytest.mark.parametrize("tokens, finish, stop, expected", [
    ([1, 2, 0], "eos", (), 2),            # the state whose action is EOS: all tokens but EOS
    ([1, 2, 5], "step", (), 3),           # a step: the state after its last token
    ([1, 4], "stop", ("\n\n",), 1),       # ".\n\nThe" straddles the stop string's start: left out
    ([1, 2, 5, 5], "stop", ("\n\n",), 2),  # the stop string's own tokens are not part of the state
    ([5, 5, 1], "stop", ("x", "\n"), 0),  # the first occurrence of any stop string; the state is the prompt alone
    ([1, 1], "length", (), 2),
])
def test_end_state_is_the_state_whose_action_ends_the_response(tokens, finish, stop, expected):
    assert engine.end_state(MergedTokens(), tokens, finish, stop) == expected


def test_response_text_drops_the_eos_and_the_stop_string_that_ended_it():
    ids = TOKENIZER.encode("6 * 7 = 42\n#### 42<|im_end|>junk")
    assert loading.response_text(TOKENIZER, ids, stop=("<|im_end|>",)) == "6 * 7 = 42\n#### 42"
    assert loading.response_text(TOKENIZER, ids[:5] + [TOKENIZER.eos_id]) == "6 * 7"


def scripted_search(tree, values, beam_width, max_steps=20):
    """Beam search over a scripted tree: tree[response] lists the beam_width continuations (tokens, finish) that
    sampling from that beam returns; values[response] is the value of that candidate."""
    calls = []

    def expand(parents):
        calls.append([tuple(resp) for _, resp, _ in parents])
        return [[(new, why, values[tuple(resp + new)]) for new, why in tree[tuple(resp)]] for _, resp, _ in parents]

    return search.beam_search([[99]], expand, beam_width, max_steps)[0], calls


def test_beam_search_follows_the_highest_values_and_keeps_ties_stable():
    S, E = "step", "eos"
    tree = {(): [([1], S), ([2], S)],
            (1,): [([3], S), ([4, 0], E)],     # 4 then EOS (id 0)
            (2,): [([5], S), ([6], S)],
            (1, 3): [([7, 0], E), ([8], "length")],
            (2, 5): [([9, 0], E), ([10], "stop")]}
    values = {(1,): 0.5, (2,): 0.5, (1, 3): 0.2, (1, 4, 0): 0.1, (2, 5): 0.9, (2, 6): 0.2,
              (1, 3, 7, 0): 0.3, (1, 3, 8): 0.95, (2, 5, 9, 0): 0.6, (2, 5, 10): 0.4}
    best, calls = scripted_search(tree, values, beam_width=2)
    # step 1: one beam, two samples; step 2: (1,) and (2,) in sampling order (tie 0.5/0.5); step 3: (2,5) first,
    # then (1,3) and not (2,6): both are worth 0.2, and a tie keeps the earlier candidate
    assert calls == [[()], [(1,), (2,)], [(2, 5), (1, 3)]]
    assert best["response"] == [1, 3, 8] and best["value"] == 0.95
    # eos, stop (a stop string) and length all finish a candidate
    assert sorted(v for v, _ in best["pool"]) == [0.1, 0.3, 0.4, 0.6, 0.95]
    assert best["tokens"] == 2 + 5 + 6


def test_beam_search_stops_after_max_steps_and_keeps_open_beams():
    tree = {(): [([1], "step")], (1,): [([2], "step")], (1, 2): [([3], "step")]}
    values = {(1,): 0.0, (1, 2): 0.7, (1, 2, 3): 0.4}
    best, calls = scripted_search(tree, values, beam_width=1, max_steps=2)
    assert len(calls) == 2 and best["response"] == [1, 2] and best["value"] == 0.7


def test_beam_search_answers_with_a_finished_candidate_over_a_higher_valued_open_beam():
    # After max_steps the open beam [2, 3] (value 0.9) has no answer yet; the finished [1, 0] (0.5) must win.
    tree = {(): [([1, 0], "eos"), ([2], "step")], (2,): [([3], "step"), ([4], "step")]}
    values = {(1, 0): 0.5, (2,): 0.1, (2, 3): 0.9, (2, 4): 0.2}
    best, _ = scripted_search(tree, values, beam_width=2, max_steps=2)
    assert best["response"] == [1, 0] and best["value"] == 0.5


def byte_tokenizer(stop_ids):
    """The byte-level tokenizer with other stop ids: many make EOS fall inside a step, none let no answer end."""
    tokenizer = data.Tokenizer.byte_level()
    tokenizer.stop_ids = stop_ids
    return tokenizer


def value_model_for_search(seed, zero_head=False):
    value_model = ValueModel(None, tiny_model(seed=seed))
    if not zero_head:   # the value model's head starts at zero, so every value is 0.0: all ties
        torch.nn.init.normal_(value_model.head.weight)
    return value_model


def as_text(tokens):
    """One character per token (the byte tokenizer's EOS and pad become ÿ), so a text index is a token index."""
    return bytes(min(t, 255) for t in tokens).decode("latin-1")


def state_value(value_model, state):
    """The reference: V at the last token of state, from a plain forward over the whole sequence."""
    return value_model(torch.tensor([state]))[0, -1].item()


@pytest.mark.parametrize("case", ["plain", "ties", "eos_in_steps", "cap", "value_fn"])
@pytest.mark.parametrize("beam_width", [1, 3])
def test_cached_beam_search_equals_the_full_recompute_reference(beam_width, case):
    policy = tiny_model(seed=1)
    value_model = value_model_for_search(2, zero_head=case == "ties")
    tokenizer = {"eos_in_steps": byte_tokenizer(list(range(0, 256, 11)) + [256]),   # ~1 token in 11 ends
                 "cap": byte_tokenizer([])}.get(case, TOKENIZER)
    delimiters = tuple(chr(c) for c in range(128)) if case == "cap" else tuple("abcdefghijklmnop")  # ASCII
    prompts = random_prompts([3, 8] if case == "cap" else [3, 8, 1, 5, 2], seed=6)
    kwargs = dict(beam_width=beam_width, delimiters=delimiters, max_new_tokens=60 if case == "cap" else 16,
                  stop=() if case == "cap" else tuple("qrstuvwxyz"), batch_size=20, temperature=1.0, top_p=0.95)
    generators = [torch.Generator().manual_seed(0) for _ in range(2)]
    # "value_fn": the cached policy with the value given as a function of whole sequences
    value = (lambda seqs: search.last_token_values(value_model, seqs)) if case == "value_fn" else value_model
    cached = search.value_beam_search(policy, tokenizer, value, prompts, generator=generators[0], **kwargs)
    reference = search.value_beam_search(policy, tokenizer, value_model, prompts, generator=generators[1],
                                         cached=False, **kwargs)
    assert torch.equal(generators[0].get_state(), generators[1].get_state()), "both must draw the same numbers"
    for c, r in zip(cached, reference):
        assert c["response"] == r["response"] and c["tokens"] == r["tokens"]
        assert [resp for _, resp in c["pool"]] == [resp for _, resp in r["pool"]]
        assert [v for v, _ in c["pool"]] == pytest.approx([v for v, _ in r["pool"]], abs=1e-6)
        assert c["value"] == pytest.approx(r["value"], abs=1e-6)
    if case == "ties":
        assert all(v == 0.0 for c in cached for v, _ in c["pool"])
    if case == "cap":   # nothing ends an answer but the length, and steps are short: 20 expansions end the search
        assert all(len(c["response"]) >= 20 for c in cached)
        assert any(len(c["response"]) < 60 for c in cached), "some answers should be open beams at the cap"
    if case == "eos_in_steps":
        ended = [resp for c in cached for _, resp in c["pool"] if resp[-1] in tokenizer.stop_ids]
        assert ended, "some answers should end with a stop id inside a step"


@pytest.mark.parametrize("cached", [True, False])
def test_stop_strings_end_beam_candidates_and_their_value_is_read_before_the_end(cached):
    policy = tiny_model(seed=1)
    value_model = value_model_for_search(2)
    prompts = random_prompts([3, 8, 4], seed=6)
    stop = tuple("qrstuvwxyz")
    results = search.value_beam_search(policy, TOKENIZER, value_model, prompts, beam_width=3,
                                       delimiters=tuple("abcdefghijklmnop"), max_new_tokens=24, stop=stop,
                                       generator=torch.Generator().manual_seed(0), batch_size=27, cached=cached)
    n_stopped = 0
    for prompt, r in zip(prompts, results):
        assert r["value"] == max(v for v, _ in r["pool"]) and 0 < len(r["response"]) <= 24
        for v, resp in r["pool"]:
            text = as_text(resp)
            first = min([text.find(s) for s in stop if s in text], default=len(resp))
            # a stop string ends the answer at once, as in a sampled answer; no step goes on past it
            assert first >= len(resp) - 1, f"{text!r} goes on past a stop string"
            n_stopped += first == len(resp) - 1
            # the value of the state whose action ends the answer: before EOS or before the stop string
            state = prompt + resp[:min(first, len(resp) - (resp[-1] == TOKENIZER.eos_id))]
            assert v == pytest.approx(state_value(value_model, state), abs=1e-5)
    assert n_stopped > 0, "some answers should end with a stop string (each token is one with p ~ 10/258)"


@pytest.mark.parametrize("as_model", [True, False])
def test_best_of_k_and_select_action_read_the_value_before_the_end_of_the_action(as_model):
    policy = tiny_model(seed=1)
    value_model = value_model_for_search(3)
    asked = []

    def value_fn(seqs):
        asked.extend(seqs)
        return search.last_token_values(value_model, seqs)
    value = value_model if as_model else value_fn
    prompts = random_prompts([4, 2, 7], seed=7)
    stop = ("\x01", "e", "ou")
    results = search.best_of_k(policy, TOKENIZER, value, prompts, k=5, max_new_tokens=12, stop=stop,
                               generator=torch.Generator().manual_seed(0), batch_size=10)
    states = []
    for prompt, r in zip(prompts, results):
        assert len(r["samples"]) == 5 and r["values"][r["best"]] == max(r["values"])
        for s, why in zip(r["samples"], r["finish"]):
            text = as_text(s)
            cut = len(s) - (why == "eos")
            if why == "stop":
                cut = min(text.find(x) for x in stop if x in text)
            states.append(prompt + s[:cut])
        assert r["values"] == pytest.approx([state_value(value_model, x) for x in states[-5:]], abs=1e-5)
    assert {"stop", "length"} <= {w for r in results for w in r["finish"]}
    if not as_model:
        assert asked == states
    # per-turn action selection is best-of-K over one transcript prefix, stopping at the end of the turn
    turn = search.best_of_k(policy, TOKENIZER, value, prompts[:1], k=5, max_new_tokens=10, stop=stop,
                            generator=torch.Generator().manual_seed(1))[0]
    action, v = search.select_action(policy, TOKENIZER, value, prompts[0], k=5, end_of_turn=stop,
                                     max_new_tokens=10, generator=torch.Generator().manual_seed(1))
    assert action == turn["samples"][turn["best"]] and v == max(turn["values"])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_extend_appends_ragged_rows_as_a_full_forward_reads_them(family):
    policy = tiny_model(family, seed=4)
    value_model = ValueModel(None, tiny_model(family, seed=5))
    torch.nn.init.normal_(value_model.head.weight)
    seqs = random_prompts([9, 4, 13, 6], seed=8)
    cuts = [[3, 7], [4, 4], [1, 12], [0, 6]]   # appended in two calls; a row may append nothing
    for model in (policy, value_model):
        cache = model.new_cache(len(seqs), 20)
        outs = [[] for _ in seqs]
        for part in (0, 1):
            pieces = [s[c[0]:c[1]] if part else s[:c[0]] for s, c in zip(seqs, cuts)]
            out = engine._extend_rows(model, cache, pieces)
            out = model.lm_head(out) if model is policy else out
            for o, p, piece in zip(outs, out, pieces):
                o.extend(p[:len(piece)])
        assert cache.lengths.tolist() == [c[1] for c in cuts]
        for s, c, o in zip(seqs, cuts, outs):
            full = model(torch.tensor([s[:c[1]]]))[0]
            assert torch.allclose(torch.stack(o), full, atol=1e-6), f"{family} {type(model).__name__}"


# ----------------------------------------------------------------------------------------------------------
# collect and eval through the command line


@pytest.fixture
def run_files(tmp_path):
    policy_dir = tmp_path / "policy"
    model = tiny_model(dtype=torch.float32, max_seq_len=128)
    model.save_pretrained(policy_dir)
    TOKENIZER.save_pretrained(policy_dir)
    value_dir = tmp_path / "value"
    value_model = ValueModel(None, model)
    torch.nn.init.normal_(value_model.head.weight)
    value_model.save_pretrained(value_dir)
    TOKENIZER.save_pretrained(value_dir)
    problem_file = tmp_path / "problems.jsonl"
    data.write_jsonl(str(problem_file), [{"id": f"p{i}", "prompt": f"{i} + {i}", "answer": 2 * i} for i in range(7)])
    return tmp_path, policy_dir, value_dir, problem_file, data.load_problems(str(problem_file))


def collect_args(policy_dir, problem_file, out):
    # batch size 6 with k = 3: chunks of 2 problems, so 7 problems make 4 chunks
    return ["collect", "--policy", str(policy_dir), "--problems", str(problem_file), "--out", str(out), "-k", "3",
            "--max-new-tokens", "12", "--batch-size", "6", "--device", "cpu"]


def test_collect_writes_trajectories_that_data_reads_back(run_files):
    tmp_path, policy_dir, _, problem_file, problems = run_files
    out = tmp_path / "traj.jsonl"
    search.main(collect_args(policy_dir, problem_file, out))
    rows = data.load_trajectories(str(out))
    assert [r["id"] for r in rows] == [p["id"] for p in problems for _ in range(3)]
    for r, p in zip(rows, [p for p in problems for _ in range(3)]):
        assert r["prompt"] == data.format_prompt(p["question"], "plain") and r["gold"] == p["gold"]
        assert r["reward"] == data.grade(r["response"], p["gold"])
    assert len({r["response"] for r in rows}) > len(problems), "samples of one problem should differ"
    assert not list(tmp_path.glob("traj.jsonl.*")), "no part or temporary files should remain"


def test_interrupted_collect_resumes_to_the_same_file(run_files):
    tmp_path, policy_dir, _, problem_file, _ = run_files
    full = tmp_path / "full.jsonl"
    search.main(collect_args(policy_dir, problem_file, full))
    expected = full.read_text()
    lines = expected.splitlines(keepends=True)
    # a kill in the middle of writing: 1 complete chunk, one problem of the next, half a line
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:9]) + lines[9][:20])
    # and a rank of an earlier 2-rank run had finished the last chunk (problem p6) into its part file
    (tmp_path / "cut.jsonl.part1").write_text("".join(lines[18:21]))
    search.main(collect_args(policy_dir, problem_file, cut))
    assert cut.read_text() == expected
    search.main(collect_args(policy_dir, problem_file, cut))   # nothing left to do: unchanged
    assert cut.read_text() == expected


def test_collect_on_two_torchrun_ranks_writes_the_same_file_as_one_process(run_files):
    tmp_path, policy_dir, _, problem_file, _ = run_files
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    search.main(collect_args(policy_dir, problem_file, one))
    p = launch("search.py", collect_args(policy_dir, problem_file, two), nproc=2,
               env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert two.read_text() == one.read_text()


def test_eval_prints_every_method_and_the_choice_numbers(run_files, capsys):
    tmp_path, policy_dir, value_dir, problem_file, problems = run_files
    out = tmp_path / "eval.json"
    summary, choice = search.main(["eval", "--policy", str(policy_dir), "--value", str(value_dir), "--problems",
                                   str(problem_file), "--methods", "greedy,sample,beam2,bestof3",
                                   "--max-new-tokens", "10", "--delimiters", '["a", "e"]', "--out", str(out)])
    printed = capsys.readouterr().out
    assert all(name in printed for name in ("greedy", "sample", "beam2", "bestof3"))
    report = json.loads(out.read_text())
    assert set(report["per_problem"]) == {"greedy", "sample", "beam2", "bestof3"}
    assert [r["id"] for r in report["per_problem"]["beam2"]] == [p["id"] for p in problems]
    c = choice["bestof3"]
    assert c["random"] <= c["best_possible"] and c["by_value"] <= c["best_possible"]
    assert summary["greedy"]["tokens"] <= 10 * len(problems)


def test_clear_errors_for_missing_folder_empty_problems_and_other_tokenizer(run_files):
    tmp_path, policy_dir, value_dir, problem_file, _ = run_files
    base = ["eval", "--policy", str(policy_dir), "--problems", str(problem_file), "--methods", "greedy"]
    with pytest.raises(data.UserError, match="--policy .*nowhere: no such folder"):
        search.main(["eval", "--policy", str(tmp_path / "nowhere"), "--problems", str(problem_file)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl: empty file"):
        search.main(["eval", "--policy", str(policy_dir), "--problems", str(empty)])
    with pytest.raises(ValueError, match="need a value model"):
        search.main(base[:-1] + ["beam3"])
    with pytest.raises(ValueError, match="unknown method 'beam'"):
        search.main(base[:-1] + ["beam"])
    twice = tmp_path / "twice.jsonl"
    twice.write_text(problem_file.read_text() + problem_file.read_text().splitlines(keepends=True)[0])
    with pytest.raises(ValueError, match="problem id 'p0' appears more than once"):
        search.main(["collect", "--policy", str(policy_dir), "--problems", str(twice), "--out", str(tmp_path / "o")])
    # a value model whose vocabulary is another size
    other = tmp_path / "other_vocab"
    ValueModel(Config(vocab_size=300, n_layer=1, n_head=2, d_model=8)).save_pretrained(other)
    TOKENIZER.save_pretrained(other)
    with pytest.raises(ValueError, match="vocab_size 300 but --policy"):
        search.main(base + ["--value", str(other)])
    # the same vocabulary size, but the byte tokens numbered the other way round
    reversed_bytes = data.Tokenizer({bytes([b]): 255 - b for b in range(256)}, data.GPT2_PATTERN,
                                    {"<|endoftext|>": 256, "<|pad|>": 257}, eos="<|endoftext|>", pad="<|pad|>")
    reversed_bytes.save_pretrained(str(value_dir))
    with pytest.raises(ValueError, match="different tokenizers: tokens differs .first difference: token id 0 is "):
        search.main(base + ["--value", str(value_dir)])
