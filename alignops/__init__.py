"""alignops: fused log-prob and loss kernels for LLM alignment.

Never materializes the full ``[tokens, vocab]`` logits. CUDA tensors run Triton kernels;
every other device runs a chunked PyTorch engine with the same math and memory bound.

Layers: the heavy part (``linear_logprobs`` / ``linear_cross_entropy`` from hidden states,
``logprobs`` / ``cross_entropy`` from logits) produces per-token log-probs;
``alignops.sequence`` reduces them per sequence; the loss catalog ``alignops.losses`` and the RL
helpers ``alignops.rl`` work on those, so cached reference log-probs plug in unchanged.
"""

from . import (
    distributed,  # noqa: F401  (normalisers over data-parallel ranks)
    losses,  # noqa: F401  (the catalog: alignops.losses.dpo_loss, ...)
)
from . import rl as _rl
from .fused import grpo_loss_from_hidden, ppo_loss_from_hidden
from .kernels._common import DivergenceOptions, DivStats, LogitOptions, TokenStats
from .linear_divergence import DivergenceOutput, divergence, linear_divergence, sparse_divergence
from .linear_logprobs import LogProbsOutput, linear_cross_entropy, linear_logprobs
from .logprobs import cross_entropy, logprobs
from .rl import *  # noqa: F403  (the RL estimators: every name of alignops.rl.__all__)
from .sequence import SequenceLogProbs, reduce_packed, reduce_padded, sequence_logprobs, split_pair

__version__ = "0.1.0"

__all__ = [
    "DivStats",
    "DivergenceOptions",
    "DivergenceOutput",
    "divergence",
    "linear_divergence",
    "sparse_divergence",
    "LogProbsOutput",
    "LogitOptions",
    "SequenceLogProbs",
    "cross_entropy",
    "distributed",
    "grpo_loss_from_hidden",
    "linear_cross_entropy",
    "linear_logprobs",
    "logprobs",
    "losses",
    "ppo_loss_from_hidden",
    "reduce_packed",
    "reduce_padded",
    "sequence_logprobs",
    "split_pair",
    "TokenStats",
] + _rl.__all__
