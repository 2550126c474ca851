"""
Fused kernels for OREO's loss (DESIGN.md §3). Each public function runs its Triton kernel on CUDA tensors and a
chunked PyTorch path elsewhere (also under TRITON_INTERPRET=1; tests call the *_triton variants directly).
"""
from kernels.bellman import bellman_loss
from kernels.kl import token_kl, token_logprobs_and_kl
from kernels.linear import linear_logprobs
from kernels.logprobs import token_logprobs

__all__ = ["token_logprobs", "token_kl", "token_logprobs_and_kl", "linear_logprobs", "bellman_loss"]
