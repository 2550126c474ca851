"""
Fused kernels for OREO's loss (DESIGN.md §3); this package imports nothing else of the project. The log-prob, KL
and fused-linear functions run their Triton kernels on CUDA tensors and a chunked PyTorch path elsewhere (also
under TRITON_INTERPRET=1; tests call the *_triton variants directly). bellman_loss is the Triton kernel alone:
its specification, oreo.oreo_loss, is what a caller runs on other devices.
"""
from kernels.bellman import bellman_loss
from kernels.kl import token_kl, token_logprobs_and_kl
from kernels.linear import linear_logprobs
from kernels.logprobs import token_logprobs

__all__ = ["token_logprobs", "token_kl", "token_logprobs_and_kl", "linear_logprobs", "bellman_loss"]
