"""Byte-level BPE vocabularies that lack some single bytes (as real ones do: SmolLM2 lacks 21) against Hugging Face
tokenizers, on small tokenizers trained here with a reduced initial alphabet: the ids on mixed text, decode, and
what happens to a byte the vocabulary cannot express (HF drops it before merging, or gives unk when the model
names one)."""

import json
import random

import pytest

import data
import tokenizer

tokenizers = pytest.importorskip("tokenizers")
from bpe import SPECIALS, train_bpe  # noqa: E402

# Text the tokenizers are trained on: ASCII prose and code, accents, CJK, emoji, arrows, whitespace runs; no 'Q'
# or 'q', no Cyrillic, no control bytes but tab and newline.
PRESENT = ["the", " answer", " is", " 42", ".", "..", ".\n", "\n\n", "    ", "\t", " x = 3", "def f(a, b):",
           "    return a + b", " café", " naïve", " über", " 日本語", " 中文", " 😀", "👍", " ⬆", "—", " theme",
           " 1,234", "####", " Step 2:", "I'm", " we'll", "ab", " abc", "\r\n", "{", "}", " $x^2$"]
# Text holding bytes those vocabularies lack: control bytes, a missing letter inside a word, a missing
# continuation byte of a character whose other bytes exist (€ = e2 82 ac beside ⬆ = e2 ac 86), a missing lead
# byte (Cyrillic d0), missing bytes inside emoji (🙂 = f0 9f 99 82) and accented letters (ÿ = c3 bf).
ABSENT = ["\x04", "\x00", "\x7f", "a\x04b", ".\x04.", "x\x1b[0m", "thQe", " Quiz", "aQb", "€", " 5€", "Жук",
          "🙂", "naÿve", "\x01\x02\x03", " \x04the", "1\x042", "\x04\n"]


def random_text(rng, pieces, n=24):
    return "".join(rng.choice(pieces) for _ in range(rng.randrange(1, n)))


def corpus():
    rng = random.Random(0)
    return [random_text(rng, PRESENT, 40) for _ in range(300)]


def train(folder, style):
    """gpt2: no unk (missing bytes are dropped); smollm: unk; llama: unk and fuse_unk. The initial alphabet is
    empty, so the vocabulary holds only the bytes of the corpus."""
    return train_bpe(folder, style, corpus(), 600, [], unk_token=None if style == "gpt2" else "<|endoftext|>",
                     fuse_unk=style == "llama")


@pytest.fixture(scope="module", params=["gpt2", "smollm", "llama"])
def trained(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(request.param))
    return request.param, train(folder, request.param), data.Tokenizer.from_pretrained(folder)


def test_the_trained_vocabularies_lack_the_bytes_the_tests_rely_on(trained):
    _, hf, _ = trained
    byte_of = tokenizer.BYTE_OF_CHAR
    have = {byte_of[t] for t in hf.get_vocab() if len(t) == 1 and t in byte_of}
    for b in (0x00, 0x04, 0x7f, ord("Q"), 0x82, 0xd0, 0xbf, 0x99):
        assert b not in have, f"byte {b:#04x} is in the vocabulary, so the texts below would not test a missing one"
    for b in (0xe2, 0xac, 0xc3, 0xf0, 0x9f):
        assert b in have, f"byte {b:#04x} should be in the vocabulary (a partly expressible character)"


def test_ids_and_decode_equal_hf_on_mixed_text_with_bytes_the_vocabulary_lacks(trained):
    style, hf, ours = trained
    rng = random.Random(1)
    round_trips = lossy = 0
    for n in range(400):
        pieces = PRESENT + SPECIALS + (ABSENT if n % 2 else [])  # every other text holds only expressible bytes
        text = random_text(rng, pieces)
        ids = ours.encode(text, allow_special=True)
        assert ids == hf.encode(text, add_special_tokens=False).ids, (style, text)
        hf_text = hf.decode(ids, skip_special_tokens=False)
        assert ours.decode(ids) == hf_text, (style, text)
        if hf_text == text:
            round_trips += 1
        else:
            lossy += 1
            assert n % 2, f"{text!r} holds only expressible bytes, yet HF does not round-trip it"
    assert round_trips > 200 and lossy > 100, (round_trips, lossy)


def test_each_missing_byte_case_alone_equals_hf(trained):
    style, hf, ours = trained
    for text in ABSENT + ["€⬆", "Ω", "\x04" * 5, "a\x04\x05b", " \x7f\x7f", "<|im_end|>\x04<|im_start|>"]:
        assert ours.encode(text, allow_special=True) == hf.encode(text, add_special_tokens=False).ids, (style, text)


def test_hf_drops_a_missing_byte_before_merging_or_gives_unk_and_so_do_we(trained):
    """The documented behaviour, stated on HF itself (so that a change in HF shows here) and on ours."""
    style, hf, ours = trained
    ids = {text: hf.encode(text, add_special_tokens=False).ids for text in ("thQe", "the", "..", ".\x04.", "\x04\x04")}
    unk = hf.token_to_id("<|endoftext|>")
    if style == "gpt2":  # no unk: the byte is dropped and its neighbours merge as if it were not there
        assert ids["thQe"] == ids["the"] and ids[".\x04."] == ids[".."] and ids["\x04\x04"] == []
    elif style == "smollm":  # unk, not fused: one unk per byte, and the bytes around it merge on their own
        assert unk in ids["thQe"] and ids[".\x04."] == [hf.token_to_id("."), unk, hf.token_to_id(".")]
        assert ids["\x04\x04"] == [unk, unk]
    else:  # unk, fused: a run of unknown bytes is one unk
        assert ids["\x04\x04"] == [unk]
    for text, expected in ids.items():
        assert ours.encode(text) == expected, (style, text)
    assert ours.decode(ours.encode("a\x04b")) != "a\x04b"  # what the vocabulary cannot express does not come back


def test_a_tokenizer_built_in_memory_with_missing_bytes_and_unk_saves_a_file_hf_reads(tmp_path):
    ranks = {bytes([b]): i for i, b in enumerate(b for b in range(256) if b not in b"\x04\x82Q")}
    specials = {"<unk>": len(ranks), "<|endoftext|>": len(ranks) + 1}
    ours = data.Tokenizer(ranks, data.GPT2_PATTERN, specials, eos="<|endoftext|>", unk="<unk>")
    ours.save_pretrained(str(tmp_path))
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    again = data.Tokenizer.from_pretrained(str(tmp_path))
    for text in ["a\x04b", "aQb", "€ x", "Q\x04Q", "plain text", "é"]:
        expected = hf.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == expected and again.encode(text) == expected, text
    assert ours.encode("a\x04b") == [ranks[b"a"], specials["<unk>"], ranks[b"b"]]


def test_an_unk_token_outside_the_vocabulary_is_refused(tmp_path):
    train(str(tmp_path), "smollm")
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["model"]["unk_token"] = "<unk>"
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="tokenizer.json: the BPE model's unk_token '<unk>' is not in its vocab"):
        data.Tokenizer.from_pretrained(str(tmp_path))
