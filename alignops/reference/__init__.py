"""Plain-PyTorch references of each kernel family, written from the math, float64-capable.

They materialize full logits on purpose: they are the ground truth for tests and the eager
provider of the benchmarks, never a production path. One module per family."""

from .linear_divergence import divergence_ref, linear_divergence_ref, sparse_divergence_ref
from .linear_logprobs import linear_cross_entropy_ref, linear_logprobs_ref, logits_ref, raw_logits_ref
from .logprobs import cross_entropy_ref, logprobs_ref, stats_ref, transform_ref

__all__ = [
    "cross_entropy_ref",
    "divergence_ref",
    "linear_divergence_ref",
    "linear_cross_entropy_ref",
    "linear_logprobs_ref",
    "logits_ref",
    "logprobs_ref",
    "raw_logits_ref",
    "sparse_divergence_ref",
    "stats_ref",
    "transform_ref",
]
