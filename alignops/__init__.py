"""alignops: fused log-prob and loss kernels for LLM alignment.

Never materializes the full ``[tokens, vocab]`` logits. CUDA tensors run Triton kernels;
every other device runs a chunked PyTorch engine with the same math and memory bound.
"""

from .linear_logprobs import (
    LogProbsOutput,
    linear_cross_entropy,
    linear_logprobs,
)

try:  # TEMPORARY until alignops/cross_entropy.py lands
    from .cross_entropy import cross_entropy
except ImportError:  # pragma: no cover
    from .reference import cross_entropy_ref as cross_entropy

__version__ = "0.1.0"

__all__ = [
    "LogProbsOutput",
    "cross_entropy",
    "linear_cross_entropy",
    "linear_logprobs",
]
