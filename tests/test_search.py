"""search.py: the cached engine against the naive one, stop strings, beam search on a scripted tree, collect and
its resume, eval, and the errors a user can cause. Tiny random models and the byte-level tokenizer."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data
import search
from model import Config, Transformer, ValueModel

TOKENIZER = data.Tokenizer.byte_level()


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second thread only adds waiting (and the CI machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(family="llama", seed=0, dtype=torch.float64, max_seq_len=96):
    """A random 2-layer model over the byte tokenizer's ids. Weights are drawn wider than GPT-2's init so the
    next-token distribution is far from uniform (near-uniform logits would make greedy ties likely)."""
    config = Config(model_type=family, vocab_size=TOKENIZER.vocab_size, n_layer=2, n_head=4,
                    n_kv_head=2 if family != "gpt2" else 4, d_model=32, d_ff=48, max_seq_len=max_seq_len)
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.to(dtype).eval()


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
    assert search._check_stop(MergedTokens(), tokens, limit=2 if expected == "length" else 10, stop=stop) \
        == expected


def test_response_text_drops_the_eos_and_the_stop_string_that_ended_it():
    ids = TOKENIZER.encode("6 * 7 = 42\n#### 42<|im_end|>junk")
    assert search.response_text(TOKENIZER, ids, stop=("<|im_end|>",)) == "6 * 7 = 42\n#### 42"
    assert search.response_text(TOKENIZER, ids[:5] + [TOKENIZER.eos_id]) == "6 * 7"


def scripted_search(tree, values, beam_width, max_steps=20):
    """Beam search over a scripted tree: tree[response] lists the beam_width continuations (tokens, finish) that
    sampling from that beam returns; values[response] is the value at its last token."""
    calls = []

    def expand(pairs):
        calls.append([tuple(resp) for _, resp in pairs])
        return [tree[tuple(resp)] for _, resp in pairs]

    def value(seqs):
        return [values[tuple(s[1:])] for s in seqs]   # s = prompt [99] + response

    return search.beam_search([[99]], expand, value, beam_width, max_steps)[0], calls


def test_beam_search_follows_the_highest_values_and_keeps_ties_stable():
    S, E = "stop", "eos"
    tree = {(): [([1], S), ([2], S)],
            (1,): [([3], S), ([4, 0], E)],     # 4 then EOS (id 0)
            (2,): [([5], S), ([6], S)],
            (1, 3): [([7, 0], E), ([8], "length")],
            (2, 5): [([9, 0], E), ([10, 0], E)]}
    values = {(1,): 0.5, (2,): 0.5, (1, 3): 0.2, (1, 4): 0.1, (2, 5): 0.9, (2, 6): 0.2,
              (1, 3, 7): 0.3, (1, 3, 8): 0.95, (2, 5, 9): 0.6, (2, 5, 10): 0.4}
    best, calls = scripted_search(tree, values, beam_width=2)
    # step 1: one beam, two samples; step 2: (1,) and (2,) in sampling order (tie 0.5/0.5); step 3: (2,5) first,
    # then (1,3) and not (2,6): both are worth 0.2, and a tie keeps the earlier candidate
    assert calls == [[()], [(1,), (2,)], [(2, 5), (1, 3)]]
    assert best["response"] == [1, 3, 8] and best["value"] == 0.95
    # finished ones are scored before their EOS: (1, 4, 0) has the value of (1, 4)
    assert sorted(v for v, _ in best["pool"]) == [0.1, 0.3, 0.4, 0.6, 0.95]
    assert best["tokens"] == 2 + 5 + 7


def test_beam_search_stops_after_max_steps_and_keeps_open_beams():
    tree = {(): [([1], "stop")], (1,): [([2], "stop")], (1, 2): [([3], "stop")]}
    values = {(1,): 0.0, (1, 2): 0.7, (1, 2, 3): 0.4}
    best, calls = scripted_search(tree, values, beam_width=1, max_steps=2)
    assert len(calls) == 2 and best["response"] == [1, 2] and best["value"] == 0.7



def test_beam_search_answers_with_a_finished_candidate_over_a_higher_valued_open_beam():
    # After max_steps the open beam [2, 3] (value 0.9) has no answer yet; the finished [1, 0] (0.5) must win.
    tree = {(): [([1, 0], "eos"), ([2], "stop")], (2,): [([3], "stop"), ([4], "stop")]}
    values = {(1,): 0.5, (2,): 0.1, (2, 3): 0.9, (2, 4): 0.2}
    best, _ = scripted_search(tree, values, beam_width=2, max_steps=2)
    assert best["response"] == [1, 0] and best["value"] == 0.5

def test_value_beam_search_with_models_scores_the_state_before_eos():
    policy = tiny_model(seed=1, dtype=torch.float32)
    value_model = ValueModel(None, tiny_model(seed=2, dtype=torch.float32))
    torch.nn.init.normal_(value_model.head.weight)
    value_fn = lambda seqs: search.last_token_values(value_model, seqs, batch_size=3)
    prompts = random_prompts([3, 8], seed=6)
    results = search.value_beam_search(policy, TOKENIZER, value_fn, prompts, beam_width=2,
                                       delimiters=tuple("abcdefghijklmnop"), max_new_tokens=12,
                                       generator=torch.Generator().manual_seed(0), batch_size=3)
    for prompt, r in zip(prompts, results):
        assert r["value"] == max(v for v, _ in r["pool"]) and 0 < len(r["response"]) <= 12
        for v, resp in r["pool"]:
            state = prompt + (resp[:-1] if resp[-1] == TOKENIZER.eos_id else resp)
            assert v == pytest.approx(value_model(torch.tensor([state]))[0, -1].item(), abs=1e-5)


def test_best_of_k_and_select_action_keep_the_highest_value():
    policy = tiny_model(seed=1, dtype=torch.float32)
    score = lambda seqs: [float(sum(s) % 97) for s in seqs]   # any deterministic value function
    prompts = random_prompts([4, 2], seed=7)
    results = search.best_of_k(policy, TOKENIZER, score, prompts, k=5, max_new_tokens=10,
                               generator=torch.Generator().manual_seed(0), batch_size=4)
    for prompt, r in zip(prompts, results):
        assert len(r["samples"]) == 5 and r["values"][r["best"]] == max(r["values"])
        assert r["values"] == score([prompt + s for s in r["samples"]])
    # per-turn action selection is best-of-K over one transcript prefix, stopping at the end of the turn
    turn = search.best_of_k(policy, TOKENIZER, score, prompts[:1], k=5, max_new_tokens=10, stop=("\x01",),
                            generator=torch.Generator().manual_seed(1))[0]
    action, value = search.select_action(policy, TOKENIZER, score, prompts[0], k=5, end_of_turn=("\x01",),
                                         max_new_tokens=10, generator=torch.Generator().manual_seed(1))
    assert action == turn["samples"][turn["best"]] and value == max(turn["values"])


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
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(repo, "search.py"), *collect_args(policy_dir, problem_file, two)],
                   check=True, capture_output=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
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
