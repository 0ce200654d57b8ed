"""Vocabulary-parallel heads on torch.distributed (gloo, CPU processes): values and gradients of
``linear_logprobs`` / ``linear_cross_entropy`` / ``logprobs`` / ``cross_entropy`` against the
float64 single-process computation, for even, padded and uneven (one empty) vocabulary slices,
all targets on one rank, all tokens ignored, float32, DTensor ``Shard(0)`` weights, bitwise
reruns, the un-reduced hidden gradient, and mismatched inputs (a clear error on every rank)."""

import pytest
from _distributed import run
from _distributed_cases import tp_cases


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel(world):
    run(world, tp_cases)
