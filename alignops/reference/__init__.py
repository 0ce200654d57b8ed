"""Plain-PyTorch references, written from the math (shared SPEC), float64-capable.

They materialize full logits on purpose: they are the ground truth for tests and the
``torch`` provider of the benchmarks, never a production path.
"""

from .linear_logprobs import (
    cross_entropy_ref,
    linear_cross_entropy_ref,
    linear_logprobs_ref,
    logits_ref,
)

__all__ = ["cross_entropy_ref", "linear_cross_entropy_ref", "linear_logprobs_ref", "logits_ref"]
