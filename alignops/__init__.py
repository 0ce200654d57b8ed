"""alignops: fused log-prob and loss kernels for LLM alignment.

Never materializes the full ``[tokens, vocab]`` logits. CUDA tensors run Triton kernels;
every other device runs a chunked PyTorch engine with the same math and memory bound.
"""

from .linear_logprobs import (
    LogProbsOutput,
    cross_entropy,
    linear_cross_entropy,
    linear_logprobs,
)

__version__ = "0.1.0"

__all__ = [
    "LogProbsOutput",
    "cross_entropy",
    "linear_cross_entropy",
    "linear_logprobs",
]
