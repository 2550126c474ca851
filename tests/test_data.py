"""data.py and grading.py against independent references: Hugging Face tokenizers for token ids, hand-made
examples and a character-offset recomputation for masks and step starts, a plain-integer recomputation for the
built-in task."""

import json
import math
import os
import random
import re

import pytest

import data
import tokenizer

tokenizers = pytest.importorskip("tokenizers")
from bpe import LLAMA3_PATTERN, SPECIALS, train_bpe  # noqa: E402

BYTE_ALPHABET = tokenizers.pre_tokenizers.ByteLevel.alphabet()  # every byte in the vocabulary

PIECES = ["the", " answer", " is", " 42", ".", ".\n", "\n", "\n\n", "  ", "\t", " x = 3", ", ", "I'm", " we'll",
          "héllo", " naïve", " 日本語", " 😀", "👍🏽", " \\frac{1}{2}", " $", "1,234", "####", " Step", "'s",
          "ÿ", "\u00a0", " -7", "=", "Σ", "\r\n"]


def random_text(rng, n=30, specials=False):
    pieces = PIECES + (SPECIALS if specials else [])
    return "".join(rng.choice(pieces) for _ in range(rng.randrange(1, n)))


def corpus():
    rng = random.Random(0)
    lines = [random_text(rng, 40) for _ in range(300)]
    lines += ["First we add the numbers.\nThen we multiply.\nSo the answer is 12.\n"] * 50
    return lines


@pytest.fixture(scope="module")
def gpt2_style(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("gpt2_style"))
    return train_bpe(folder, "gpt2", corpus(), 700, BYTE_ALPHABET), folder


@pytest.fixture(scope="module")
def llama_style(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("llama_style"))
    return train_bpe(folder, "llama", corpus(), 700, BYTE_ALPHABET), folder


@pytest.fixture(scope="module")
def deepseek_style(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("deepseek_style"))
    return train_bpe(folder, "deepseek", corpus(), 700, BYTE_ALPHABET), folder


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


@pytest.mark.parametrize("style", ["gpt2_style", "llama_style", "deepseek_style"])
def test_tokenizer_json_ids_equal_hf_tokenizers_including_special_tokens(style, request):
    hf, folder = request.getfixturevalue(style)
    ours = data.Tokenizer.from_pretrained(folder)
    rng = random.Random(1)
    for _ in range(300):
        text = random_text(rng, specials=True)
        ids = ours.encode(text, allow_special=True)
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == text
    assert ours.eos_id == hf.token_to_id("<|im_end|>") and ours.pad_id == hf.token_to_id("<|endoftext|>")
    assert ours.vocab_size == hf.get_vocab_size()


def test_special_token_text_is_plain_text_unless_allowed(gpt2_style):
    _, folder = gpt2_style
    ours = data.Tokenizer.from_pretrained(folder)
    text = "a<|im_end|>b"
    assert ours.encode(text, allow_special=True).count(ours.eos_id) == 1
    plain = ours.encode(text)
    assert ours.eos_id not in plain and ours.decode(plain) == text


def test_vocab_json_and_merges_txt_ids_equal_hf(gpt2_style, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    hf_trained, _ = gpt2_style
    hf_trained.model.save(str(tmp_path))  # vocab.json + merges.txt
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump({"eos_token": "<|endoftext|>"}, f)
    hf = Tokenizer(models.BPE.from_file(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    ours = data.Tokenizer.from_pretrained(str(tmp_path))
    rng = random.Random(2)
    for _ in range(300):
        text = random_text(rng)
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ours.encode(text)) == text
    assert ours.eos_id == hf.token_to_id("<|endoftext|>")


def test_byte_level_round_trips_any_text_and_saves_a_file_hf_reads(tmp_path):
    from tokenizers import Tokenizer
    ours = data.Tokenizer.byte_level()
    assert (ours.vocab_size, ours.eos_id, ours.pad_id, ours.bos_id) == (258, 256, 257, None)
    text = "Zwölf 🙂 \x00\xff\n\t日本"
    assert ours.encode(text) == list(text.encode()) and ours.decode(ours.encode(text)) == text
    ours.save_pretrained(str(tmp_path))
    back = data.Tokenizer.from_pretrained(str(tmp_path))
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text += "<|endoftext|>x<|pad|>"
    assert back.encode(text, allow_special=True) == ours.encode(text, allow_special=True)
    assert back.encode(text, allow_special=True) == hf.encode(text, add_special_tokens=False).ids
    assert (back.eos_id, back.pad_id, back.vocab_size) == (256, 257, 258)
    # built in code, with EOS an ordinary token and the bytes numbered backwards
    custom = data.Tokenizer({bytes([b]): 255 - b for b in range(256)}, data.GPT2_PATTERN, {"<|pad|>": 256},
                            eos=255 - ord("\n"), pad="<|pad|>")
    custom.save_pretrained(str(tmp_path / "custom"))
    back = data.Tokenizer.from_pretrained(str(tmp_path / "custom"))
    assert back.encode(text) == custom.encode(text) == [255 - b for b in text.encode()]
    assert (back.eos_id, back.pad_id) == (255 - ord("\n"), 256)


def test_save_pretrained_of_a_loaded_tokenizer_reads_back_identically(llama_style, tmp_path):
    _, folder = llama_style
    ours = data.Tokenizer.from_pretrained(folder)
    ours.save_pretrained(str(tmp_path))
    back = data.Tokenizer.from_pretrained(str(tmp_path))
    text = random_text(random.Random(3), 200, specials=True)
    assert back.encode(text, allow_special=True) == ours.encode(text, allow_special=True)
    assert (back.eos_id, back.pad_id) == (ours.eos_id, ours.pad_id)


def test_tiktoken_file_needs_a_pattern_unless_standard(llama_style, tmp_path):
    import base64
    _, folder = llama_style
    ours = data.Tokenizer.from_pretrained(folder)
    with open(tmp_path / "custom.tiktoken", "w") as f:
        for token, rank in ours.enc._mergeable_ranks.items():
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"eos_token_id": 0}, f)
    with pytest.raises(ValueError, match="pattern"):
        data.Tokenizer.from_pretrained(str(tmp_path))
    loaded = data.Tokenizer.from_pretrained(str(tmp_path), pattern=LLAMA3_PATTERN)
    text = random_text(random.Random(4), 200)
    assert loaded.encode(text) == ours.encode(text) and loaded.eos_id == 0
    loaded.save_pretrained(str(tmp_path / "saved"))  # keeps the pattern beside the rank file
    again = data.Tokenizer.from_pretrained(str(tmp_path / "saved"))
    assert again.encode(text) == ours.encode(text) and again.eos_id == 0


def test_a_standard_tiktoken_file_is_recognised_by_its_number_of_ranks(tmp_path):
    import base64
    pairs = [bytes([a, b]) for a in range(256) for b in range(256)][:50256 - 256]  # r50k's count, made-up tokens
    with open(tmp_path / "r50k_base.tiktoken", "w") as f:
        for rank, token in enumerate([bytes([b]) for b in range(256)] + pairs):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    tok = data.Tokenizer.from_pretrained(str(tmp_path))
    assert tok.pattern == data.GPT2_PATTERN and tok.eos_id == 50256 and tok.vocab_size == 50257
    assert tok.encode("<|endoftext|>", allow_special=True) == [50256]


def test_special_ids_come_from_the_folder_config_files(llama_style, tmp_path):
    import shutil
    _, folder = llama_style
    shutil.copyfile(os.path.join(folder, "tokenizer.json"), tmp_path / "tokenizer.json")
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 0}, f)
    with open(tmp_path / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [2, 0]}, f)
    tok = data.Tokenizer.from_pretrained(str(tmp_path))
    assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.stop_ids) == (2, 2, 1, [0, 2])
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "bos_token": "<|im_start|>", "add_bos_token": True}, f)
    tok = data.Tokenizer.from_pretrained(str(tmp_path))
    assert (tok.eos_id, tok.bos_id, tok.add_bos) == (0, 1, True)
    os.remove(tmp_path / "tokenizer_config.json")  # Llama-3 says "add BOS" only in its post-processor template
    assert not data.Tokenizer.from_pretrained(str(tmp_path)).add_bos
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                                                  {"Sequence": {"id": "A", "type_id": 0}}]}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert data.Tokenizer.from_pretrained(str(tmp_path)).add_bos
    example = data.encode_trajectory(tok, {"prompt": "q", "response": "r", "reward": 1.0}, 64)
    assert example.ids[0] == 1 and example.mask[0] == 0


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "bos_template"])
def test_folders_saved_by_transformers_give_its_ids_and_special_ids(family, gpt2_style, tmp_path):
    """transformers writes each family's own pre-tokenizer, normalizer, post-processor and tokenizer_config.json
    (Qwen2: its Split regex and NFC; a template that prepends BOS, as Llama-3's)."""
    transformers = pytest.importorskip("transformers")
    hf, folder = gpt2_style
    spec = json.loads(open(os.path.join(folder, "tokenizer.json")).read())
    vocab, merges = spec["model"]["vocab"], [tuple(m) for m in spec["model"]["merges"]]
    if family == "qwen2":
        tok = transformers.Qwen2TokenizerFast(vocab=vocab, merges=merges, eos_token="<|im_end|>",
                                              pad_token="<|endoftext|>")
    elif family == "gpt2":
        tok = transformers.GPT2TokenizerFast(vocab=vocab, merges=merges, eos_token="<|endoftext|>",
                                             bos_token="<|endoftext|>")
    else:
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=hf, bos_token="<|im_start|>",
                                                   eos_token="<|im_end|>", add_bos_token=True)
    tok.save_pretrained(str(tmp_path))
    ours = data.Tokenizer.from_pretrained(str(tmp_path))
    rng = random.Random(7)
    for _ in range(100):
        text = random_text(rng, specials=True)
        assert ours.encode(text, allow_special=True) == tok.encode(text, add_special_tokens=False), text
    assert (ours.eos_id, ours.bos_id) == (tok.eos_token_id, tok.bos_token_id)
    assert ours.pad_id == (tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    added = tok.encode("hi", add_special_tokens=True)[:-len(tok.encode("hi", add_special_tokens=False))]
    assert ours.add_bos == (added == [tok.bos_token_id])


def test_an_nfc_normalizer_is_applied_like_hf(llama_style, tmp_path):
    from tokenizers import Tokenizer
    _, folder = llama_style
    spec = json.loads(open(os.path.join(folder, "tokenizer.json")).read())
    spec["normalizer"] = {"type": "NFC"}  # as in Qwen2's tokenizer.json
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 0}))
    ours, hf = data.Tokenizer.from_pretrained(str(tmp_path)), Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    rng = random.Random(6)
    for _ in range(50):
        text = random_text(rng) + "he\u0301llo Σ\u0308 \ufb01"  # decomposed é, composed later; a ligature stays
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids


def test_ids_out_of_merge_order_give_a_warning(gpt2_style, tmp_path):
    _, folder = gpt2_style
    spec = json.loads(open(os.path.join(folder, "tokenizer.json")).read())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    first, last = ("".join(m) if isinstance(m, list) else m.replace(" ", "") for m in (merges[0], merges[-1]))
    vocab[first], vocab[last] = vocab[last], vocab[first]  # the first merge now makes the highest id
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 0}))
    with pytest.warns(UserWarning, match="merge order|lower than an earlier"):
        data.Tokenizer.from_pretrained(str(tmp_path))


def test_unsupported_or_incomplete_tokenizers_fail_clearly(tmp_path):
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="SentencePiece"):
        data.Tokenizer.from_pretrained(str(tmp_path / "sp"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        data.Tokenizer.from_pretrained(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------------------------------------
# Masks and step starts


def reference_starts(text, offsets, delimiters):
    """Independent recomputation on characters: a token starts a step when a delimiter ends inside the previous
    token, i.e. the previous token's (start, end] holds a delimiter's end."""
    ends = {m.end() for d in delimiters for m in re.finditer(re.escape(d), text)}
    return [k == 0 or any(offsets[k - 1][0] < p <= offsets[k - 1][1] for p in ends) for k in range(len(offsets))]


def test_mask_and_step_starts_on_a_hand_made_pair():
    tok = data.Tokenizer.byte_level()
    prompt, response = "Q?\n", "a\nbc. d.$ e"
    ex = data.encode_trajectory(tok, {"prompt": prompt, "response": response, "reward": 1}, 100,
                                data.STEP_DELIMITERS["math"])
    assert ex.ids == list(b"Q?\na\nbc. d.$ e") + [tok.eos_id] and not ex.truncated and ex.reward == 1.0
    #                 positions j predict ids[j+1]: Q ? \n | a \n b c . _ d . $ _ e EOS
    assert ex.mask == [0, 0] + [1] * 12
    starts = [j + 1 - len(prompt) for j, s in enumerate(ex.step_start) if s]  # index in the response
    assert starts == [0, 2, 6, 10]  # 'a', 'b' after '\n', 'd' after '. ', 'e' after '.$ ' (EOS joins 'e')
    ex = data.encode_trajectory(tok, {"prompt": "", "response": "x\n\ny\n", "reward": 0}, 100)
    assert ex.mask == [1] * 5 and ex.step_start == [False, True, True, False, True]  # 'x' has no state before it


@pytest.mark.parametrize("style", ["gpt2_style", "llama_style", "deepseek_style"])
def test_step_starts_match_a_character_level_recomputation(style, request):
    hf, folder = request.getfixturevalue(style)
    tok = data.Tokenizer.from_pretrained(folder)
    rng = random.Random(5)
    for _ in range(100):
        response = "".join(rng.choice(["We add", " 3", ".\n", ". ", ".$ ", "\n", " so", "x", "\n\n"])
                           for _ in range(rng.randrange(1, 25)))
        delimiters = data.STEP_DELIMITERS[rng.choice(["gsm8k", "math"])]
        ex = data.encode_trajectory(tok, {"prompt": "P:", "response": response, "reward": 0}, 1000, delimiters)
        enc = hf.encode(response, add_special_tokens=False)
        n_prompt = len(tok.encode("P:"))
        assert ex.ids[n_prompt:-1] == enc.ids
        # EOS starts a step only when the response ends with a delimiter
        expected = reference_starts(response + "E", enc.offsets + [(len(response), len(response) + 1)], delimiters)
        assert ex.step_start[n_prompt - 1:] == expected, response


def test_a_delimiter_merged_into_a_token_ends_the_step(llama_style):
    hf, folder = llama_style
    tok = data.Tokenizer.from_pretrained(folder)
    merged = hf.token_to_id(tokenizer.byte_level_alphabet()[ord(".")] + tokenizer.byte_level_alphabet()[ord("\n")])
    assert merged is not None, "the trained vocabulary should hold '.\\n' as one token"
    ex = data.encode_trajectory(tok, {"prompt": "", "response": "First we add.\nThen we multiply.\nDone",
                                      "reward": 1}, 100)
    tokens = ex.ids
    assert merged in tokens
    after = [k + 1 for k, t in enumerate(tokens[:-1]) if t == merged]
    starts = {j + 1 for j, s in enumerate(ex.step_start) if s}
    assert starts == set(after), "each token after '.\\n' (and only those, the first token has no state) starts a step"


@pytest.mark.parametrize("chat", [False, True])
def test_agent_transcripts_mark_only_assistant_turns_as_actions(chat, llama_style):
    tok = data.Tokenizer.from_pretrained(llama_style[1]) if chat else data.Tokenizer.byte_level()
    messages = [{"role": "system", "content": "You act."}, {"role": "user", "content": "Find the key."},
                {"role": "assistant", "content": "go north\nlook"}, {"role": "observation", "content": "A key."},
                {"role": "assistant", "content": "take key"}, {"role": "user", "content": "Done."}]
    ex = data.encode_trajectory(tok, {"messages": messages, "reward": 1.0}, 1000)
    assert tok.chatml == chat
    end = "<|im_end|>" if chat else "<|endoftext|>"
    actions = [ex.ids[j + 1] for j, m in enumerate(ex.mask) if m]
    assert tok.decode(actions) == "go north" + "\n" + "look" + end + "take key" + end
    context = tok.decode([t for j, t in enumerate(ex.ids) if j == 0 or not ex.mask[j - 1]])
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] in context
    starts = [tok.decode([ex.ids[j + 1]]) for j, s in enumerate(ex.step_start) if s]
    assert len(starts) == 3 and all(ex.mask[j] for j, s in enumerate(ex.step_start) if s)



def test_the_response_end_token_is_eos_im_end_after_a_chatml_prompt_and_none_when_cut_at_the_length_limit():
    byte_tok = data.Tokenizer.byte_level()
    ex = data.encode_trajectory(byte_tok, {"prompt": "ab", "response": "cd", "reward": 1.0}, 100)
    assert ex.ids == byte_tok.encode("abcd") + [byte_tok.eos_id] and ex.mask == [0, 1, 1, 1]
    cut = data.encode_trajectory(byte_tok, {"prompt": "ab", "response": "cd", "reward": 0.0, "finish": "length"}, 100)
    assert cut.ids == byte_tok.encode("abcd") and cut.mask == [0, 1, 1], "a length-cut sample never chose to stop"
    # A base tokenizer whose EOS is <|endoftext|> but which knows ChatML (Qwen2.5's): after a ChatML prompt the
    # policy stops with <|im_end|>, so that is the action trained.
    specials = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
    qwen_like = data.Tokenizer({bytes([b]): b for b in range(256)}, data.GPT2_PATTERN, specials, "<|endoftext|>")
    chat = data.encode_trajectory(qwen_like, {"prompt": "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n",
                                              "response": "a", "reward": 1.0}, 100)
    plain = data.encode_trajectory(qwen_like, {"prompt": "q", "response": "a", "reward": 1.0}, 100)
    assert chat.ids[-1] == 258 and chat.mask[-2:] == [1, 1]
    assert plain.ids[-1] == 256 and plain.mask == [1, 1]

def test_truncation_is_flagged_and_a_prompt_without_room_is_an_error():
    tok = data.Tokenizer.byte_level()
    traj = {"prompt": "abc", "response": "defgh", "reward": 0.0}
    full = data.encode_trajectory(tok, traj, 100)
    cut = data.encode_trajectory(tok, traj, 6)
    assert not full.truncated and cut.truncated
    assert cut.ids == full.ids[:6] and cut.mask == full.mask[:5] and cut.step_start == full.step_start[:5]
    with pytest.raises(ValueError, match="max_len"):
        data.encode_trajectory(tok, traj, 3)


def test_collate_right_pads_and_keeps_rows():
    tok = data.Tokenizer.byte_level()
    examples = [data.encode_trajectory(tok, {"prompt": p, "response": r, "reward": w}, 50)
                for p, r, w in [("a", "b", 1), ("abcd", "ef\ngh", 0), ("x", "", 0.5)]]
    batch = data.collate(examples, tok.pad_id)
    L = max(len(e.ids) for e in examples)
    assert batch["input_ids"].shape == (3, L) and batch["mask"].shape == (3, L - 1)
    assert batch["step_start"].dtype.is_floating_point is False and batch["rewards"].tolist() == [1, 0, 0.5]
    for b, e in enumerate(examples):
        assert batch["input_ids"][b].tolist() == e.ids + [tok.pad_id] * (L - len(e.ids))
        assert batch["mask"][b].tolist() == e.mask + [0] * (L - len(e.ids))
        assert batch["step_start"][b].tolist() == e.step_start + [False] * (L - len(e.ids))


# ----------------------------------------------------------------------------------------------------------
# Files


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_problem_files_of_each_convention(tmp_path):
    path = write(tmp_path / "p.jsonl", [
        json.dumps({"question": "How many?", "answer": "2 + 2 = 4\n#### 1,004"}),
        json.dumps({"problem": "Half?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "unique_id": "m1"}),
        "",
        json.dumps({"prompt": "Say 7", "answer": 7, "id": "g"})])
    assert data.load_problems(path) == [{"id": "p.jsonl:1", "question": "How many?", "gold": "1004"},
                                        {"id": "m1", "question": "Half?", "gold": "\\frac{1}{2}"},
                                        {"id": "g", "question": "Say 7", "gold": "7"}]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "p", "response": "r", "reward": 1', "not valid JSON"),
    ('{"prompt": "p", "reward": 1}', "missing field 'response'"),
    ('{"prompt": "p", "response": "r", "reward": "1"}', "should be"),
    ('{"prompt": "p", "response": "r", "reward": NaN}', "finite"),
    ('{"messages": [{"role": "robot", "content": "x"}], "reward": 1}', "role"),
    ('[1, 2]', "JSON object"),
])
def test_bad_trajectory_lines_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"prompt": "p", "response": "r", "reward": 1})
    path = write(tmp_path / "t.jsonl", [good, good, line])
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
        data.load_trajectories(path)


def test_empty_files_and_bad_problem_lines_fail_clearly(tmp_path):
    path = write(tmp_path / "e.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="empty file"):
        data.load_trajectories(path)
    path = write(tmp_path / "p.jsonl", [json.dumps({"question": "q", "answer": "no marker"})])
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: ") + ".*####"):
        data.load_problems(path)


def test_jsonl_write_load_round_trip(tmp_path):
    rows = [{"prompt": "p", "response": "ré", "reward": 1.0, "id": "a"},
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "reward": 0.0}]
    path = str(tmp_path / "t.jsonl")
    data.write_jsonl(path, rows)
    assert data.load_trajectories(path) == rows


def test_prompt_formats():
    assert data.format_prompt("1+1?", "plain") == "1+1?\n"
    qwen = data.format_prompt("1+1?", "qwen-gsm8k")
    assert qwen.startswith("<|im_start|>system\nPlease reason step by step, and produce a final answer following "
                           "4 '#', like '#### 0'<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n")
    assert qwen.endswith("<|im_start|>assistant\n")
    assert "put your final answer within \\boxed{}." in data.format_prompt("q", "qwen-math")
    deepseek = data.format_prompt("q", "deepseek")
    assert deepseek.startswith("User: q") and deepseek.endswith("Assistant:")
    with pytest.raises(ValueError, match="style"):
        data.format_prompt("q", "llama")


# ----------------------------------------------------------------------------------------------------------
# Sampling, pairs


def test_sampler_is_deterministic_and_each_epoch_is_a_permutation():
    a, b = iter(data.Sampler(50, 8, seed=3)), iter(data.Sampler(50, 8, seed=3))
    first = [next(a) for _ in range(25)]
    assert first == [next(b) for _ in range(25)]
    assert first != [next(iter(data.Sampler(50, 8, seed=4))) for _ in range(25)]
    stream = [i for batch in first for i in batch]
    for epoch in range(4):
        assert sorted(stream[epoch * 50:(epoch + 1) * 50]) == list(range(50))
    assert stream[:50] != stream[50:100], "epochs are shuffled differently"


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_sharding_covers_the_global_batch_exactly_once(world_size):
    reference = iter(data.Sampler(37, 8, seed=1))
    ranks = [iter(data.Sampler(37, 8, seed=1, rank=r, world_size=world_size)) for r in range(world_size)]
    for _ in range(12):
        shares = [next(r) for r in ranks]
        assert all(len(s) == 8 // world_size for s in shares)
        assert [i for s in shares for i in s] == next(reference)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("new_world_size", [2, 1, 4])
def test_resume_equals_an_uninterrupted_run_also_on_another_world_size(new_world_size, grouped):
    lengths = [random.Random(f"29:{i}").randint(1, 50) for i in range(29)] if grouped else None
    uninterrupted = iter(data.Sampler(29, 4, seed=7, lengths=lengths))
    expected = [next(uninterrupted) for _ in range(20)]
    before = [data.Sampler(29, 4, seed=7, rank=r, world_size=2, lengths=lengths) for r in range(2)]
    its = [iter(s) for s in before]
    seen = [[i for it in its for i in next(it)] for _ in range(9)]
    state = json.loads(json.dumps(before[0].state_dict()))  # what a checkpoint stores
    after = [data.Sampler(29, 4, seed=7, rank=r, world_size=new_world_size, lengths=lengths)
             for r in range(new_world_size)]
    for s in after:
        s.load_state_dict(state)
    its = [iter(s) for s in after]
    seen += [[i for it in its for i in next(it)] for _ in range(11)]
    assert seen == expected
    with pytest.raises(ValueError, match="global_batch"):
        data.Sampler(29, 8, seed=7, lengths=lengths).load_state_dict(state)
    with pytest.raises(ValueError, match="grouped"):   # grouping is part of the data order: it must match
        data.Sampler(29, 4, seed=7, lengths=None if grouped else [1] * 29).load_state_dict(state)


@pytest.mark.parametrize("n,batch", [(203, 8), (64, 16), (37, 4)])
def test_grouping_by_length_keeps_epochs_permutations_and_cuts_padding(monkeypatch, n, batch):
    monkeypatch.setattr(data.Sampler, "GROUP", 3)   # several chunks per epoch
    lengths = [random.Random(f"{n}:{i}").randint(1, 300) for i in range(n)]
    grouped, plain = iter(data.Sampler(n, batch, 5, lengths=lengths)), iter(data.Sampler(n, batch, 5))
    steps = 4 * n // batch
    batches = [next(grouped) for _ in range(steps)]
    stream = [i for b in batches for i in b]
    for epoch in range(steps * batch // n):
        assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n)), f"epoch {epoch}"

    def padding(bs):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in bs)
    assert padding(batches) < 0.6 * padding([next(plain) for _ in range(steps)])


def test_dpo_pairs_pair_correct_with_wrong_of_the_same_prompt_at_most_six():
    rng = random.Random(0)
    trajs = [{"prompt": f"p{k % 5}", "response": str(k), "reward": float(rng.random() < 0.4)} for k in range(200)]
    pairs = data.dpo_pairs(trajs)
    assert pairs == data.dpo_pairs(trajs) and pairs != data.dpo_pairs(trajs, seed=1)
    for chosen, rejected in pairs:
        assert chosen["prompt"] == rejected["prompt"] and chosen["reward"] == 1 and rejected["reward"] == 0
    counts = {p: sum(c["prompt"] == p for c, _ in pairs) for p in {t["prompt"] for t in trajs}}
    assert counts == {f"p{k}": 6 for k in range(5)}
    few = [{"prompt": "q", "response": "a", "reward": 1.0}, {"prompt": "q", "response": "b", "reward": 0.0},
           {"prompt": "q", "response": "c", "reward": 0.0}, {"prompt": "z", "response": "d", "reward": 1.0}]
    assert len(data.dpo_pairs(few)) == 2
    assert data.rejection_sampling(few) == [few[0], few[3]]


# ----------------------------------------------------------------------------------------------------------
# Grading

GRADING = [  # (model answer text, gold, equivalent?)
    ("#### 72", "72", True), ("so she has 1,000 left.\n#### 1,000", "1000", True), ("#### $18.00", "18", True),
    ("#### 18 dollars", "18", True), ("#### 5", "6", False), ("#### -3", "3", False), ("#### 3.50", "3.5", True),
    ("#### 0.5", "1/2", True), ("#### 1,234,567", "1234567", True), ("#### 12.", "12", True),
    ("the total is 7 apples and 9 pears, 16", "16", True), ("no number here", "1", False),
    ("The answer is 42.", "42", True), ("The answer is $\\frac{3}{4}$.", "0.75", True),
    ("$\\boxed{\\frac{1}{2}}$", "\\frac12", True), ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", True),
    ("\\boxed{\\tfrac{2}{4}}", "0.5", True), ("\\boxed{0.3333}", "\\frac{1}{3}", False),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", True), ("\\boxed{\\sqrt3}", "\\sqrt{3}", True),
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", True), ("\\boxed{(1,2)}", "(2,1)", False),
    ("\\boxed{[0.5, 3)}", "[\\frac{1}{2},3)", True), ("\\boxed{[0.5, 3]}", "[\\frac{1}{2},3)", False),
    ("\\boxed{(1, 2, 3)}", "(1,2)", False), ("\\boxed{10\\%}", "10", True), ("\\boxed{10\\%}", "0.1", False),
    ("\\boxed{5\\text{ cm}}", "5", True), ("\\boxed{\\text{(B)}}", "B", True), ("\\boxed{(C)}", "B", False),
    ("\\boxed{b}", "B", False), ("\\boxed{x = 3}", "3", True), ("\\boxed{2x}", "2", False),
    ("\\boxed{90^\\circ}", "90", True), ("\\boxed{\\frac{-1}{2}}", "-\\frac{1}{2}", True),
    ("\\boxed{2\\frac{1}{2}}", "\\frac{5}{2}", True), ("\\boxed{\\frac{1}{0}}", "1", False),
    ("first \\boxed{1} then \\boxed{\\frac{2}{3}}", "\\frac23", True), ("\\boxed{{1}{2}}", "{1}{2}", True),
    ("\\boxed{\\$5}", "5", True), ("\\boxed{\\infty}", "\\infty", True), ("\\boxed{-\\infty}", "\\infty", False),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True), ("\\boxed{\\pi}", "3.14", False),
    ("\\boxed{3", "3", True),  # unbalanced box: falls back to the last number
    ("\\boxed 7", "7", True), ("The answer is: (A)", "A", True), ("0.1 + 0.2 = 0.3", "0.3", True),
    ("\\boxed{1.0}", "1", True), ("\\boxed{100}", "1,00", False), ("\\boxed{\\frac{1}{2}\\text{ cm}}", "0.5", True),
    ("\\boxed{16 \\text{ m}^2}", "16", True), ("\\boxed{2 x}", "2", False), ("\\boxed{f(x) = 3x}", "3x", False),
]


@pytest.mark.parametrize("response, gold, expected", GRADING)
def test_grading_table(response, gold, expected):
    assert data.grade(response, gold) == float(expected), (data.extract_answer(response), gold)


def test_extraction_takes_the_last_boxed_with_nested_braces():
    assert data.extract_answer("\\boxed{1} and \\boxed{\\frac{a}{\\sqrt{b}}} done") == "\\frac{a}{\\sqrt{b}}"
    assert data.extract_answer("nothing") is None and not data.is_equiv(None, "1")


# ----------------------------------------------------------------------------------------------------------
# The built-in task


def test_builtin_verifier_agrees_with_a_plain_integer_recomputation():
    # Independent: evaluate the whole chain in unbounded integers and reduce mod 10 once at the end (mod 10 is a
    # ring homomorphism for +, -, *), instead of the per-step reduction data.py does.
    problems = data.builtin_problems(300, seed=11, split="test", n_steps=7)
    assert len({p["question"] for p in problems}) == 300
    for p in problems:
        tokens = p["question"].split()
        assert len(tokens) == 8
        value = int(tokens[0])
        for t in tokens[1:]:
            value = {"+": value + int(t[1]), "-": value - int(t[1]), "*": value * int(t[1])}[t[0]]
        assert p["gold"] == str(value % 10)
        assert data.grade(f"...\n#### {value % 10}", p["gold"]) == 1.0
        assert data.grade(f"#### {(value + 1) % 10}", p["gold"]) == 0.0
    assert problems == data.builtin_problems(300, seed=11, split="test", n_steps=7)
    train = {p["question"] for p in data.builtin_problems(300, seed=11, split="train", n_steps=7)}
    assert len(train & {p["question"] for p in problems}) < 3


def test_builtin_demonstrator_misreads_at_its_rate_and_stays_consistent():
    p_misread = 0.7
    rng = random.Random(0)
    misread = stars = 0
    for p in data.builtin_problems(1000, seed=2, split="train"):
        demo = data.builtin_demonstration(p, rng, p_misread)
        lines = demo.split("\n")
        assert lines[-1] == f"#### {lines[-2].split('=')[1]}"
        value = int(p["question"].split()[0])
        for line, op in zip(lines[:-1], p["question"].split()[1:]):
            m = re.fullmatch(r"(\d)([+\-*])(\d)=(\d)", line)
            assert m and int(m.group(1)) == value, "each line continues from the previous (possibly wrong) value"
            shown = m.group(2)
            assert shown == op[0] or (op[0] == "*" and shown == "+"), "only '*' is misread, as '+'"
            assert int(m.group(4)) == data.OPS[shown](value, int(m.group(3))), "the line is right for its operator"
            stars += op[0] == "*"
            misread += op[0] == "*" and shown == "+"
            value = int(m.group(4))
        assert data.grade(demo, p["gold"]) == float(str(value) == p["gold"])
    sd = math.sqrt(p_misread * (1 - p_misread) / stars)
    assert abs(misread / stars - p_misread) < 5 * sd, (
        f"misread {misread}/{stars} = {misread / stars:.3f}, expected {p_misread} ± {sd:.4f}; a 5-sd deviation "
        "happens by chance with probability < 1e-6")
    perfect = data.builtin_demonstration(data.builtin_problems(1, 0, "val")[0], random.Random(0), p_misread=0.0)
    assert data.grade(perfect, data.builtin_problems(1, 0, "val")[0]["gold"]) == 1.0


def test_builtin_cli_writes_problems_and_graded_demonstrations(tmp_path):
    data.main(["builtin", str(tmp_path), "--seed", "1", "--n-train", "30", "--n-val", "5", "--n-test", "7"])
    assert len(data.load_problems(str(tmp_path / "problems_test.jsonl"))) == 7
    demos = data.load_trajectories(str(tmp_path / "demos.jsonl"))
    problems = data.load_problems(str(tmp_path / "problems_train.jsonl"))
    assert len(demos) == 30 and 0 < sum(d["reward"] for d in demos) < 30
    for d, p in zip(demos, problems):
        assert d["prompt"] == data.format_prompt(p["question"], "plain")
        assert d["reward"] == float(data.builtin_answer(p["question"]) == int(d["response"].split("#### ")[1]))
