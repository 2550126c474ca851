"""Byte-level BPE tokenizers trained in-process with Hugging Face tokenizers: the independent reference that
tests/test_data.py and tests/test_tokenizer_missing_bytes.py compare tokenizer.py against. Test-only; the callers
importorskip tokenizers first."""
import json
import os

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def train_bpe(folder, style, texts, vocab_size, initial_alphabet, unk_token=None, fuse_unk=False):
    """Train a BPE on texts and save it in folder as tokenizer.json, with a tokenizer_config.json naming EOS
    (<|im_end|>) and PAD (<|endoftext|>); returns the tokenizers.Tokenizer. The pre-tokenizer by style: gpt2, the
    ByteLevel regex; llama, Split(Llama-3 regex) + ByteLevel; smollm, Digits + ByteLevel regex (SmolLM2's layout);
    deepseek, several Splits and Digits in sequence (DeepSeek LLM's layout), then ByteLevel. initial_alphabet: the
    characters the vocabulary starts from (ByteLevel.alphabet() for every byte, [] for only the bytes of texts)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False)
    tok = Tokenizer(models.BPE(unk_token=unk_token, fuse_unk=fuse_unk))
    if style == "deepseek":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"[\r\n]"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r"\s?[A-Za-zé]+"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r"\s?[!-/:-~]+"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r"\s+$"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            byte_level])
    elif style == "llama":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"), byte_level])
    elif style == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True, trim_offsets=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=initial_alphabet)
    tok.train_from_iterator(texts, trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, f)
    return tok
