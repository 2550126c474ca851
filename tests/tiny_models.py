"""The tiny random models that test_search.py and test_agent.py sample from, over the byte tokenizer's ids."""
import torch

import data
from model import Config, Transformer


def tiny_model(family="llama", seed=0, dtype=torch.float64, max_seq_len=96):
    """A random 2-layer model over the byte tokenizer's ids. Weights are drawn wider than GPT-2's init so the
    next-token distribution is far from uniform (near-uniform logits would make greedy ties likely)."""
    config = Config(model_type=family, vocab_size=data.Tokenizer.byte_level().vocab_size, n_layer=2, n_head=4,
                    n_kv_head=2 if family != "gpt2" else 4, d_model=32, d_ff=48, max_seq_len=max_seq_len)
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.to(dtype).eval()
