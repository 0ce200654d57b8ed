"""Vocabulary-parallel ``linear_divergence`` on torch.distributed (gloo, CPU processes): every kind
(forward / reverse KL, jsd, tv, alpha, f-generators) with the student entropy, value and both
heads' gradients against the float64 single-process reference, for even, uneven (one empty) and
padded vocabulary slices, and mismatched inputs (a clear error on every rank)."""

import pytest
from _distributed import run
from _distributed_div_cases import div_cases


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_divergence(world):
    run(world, div_cases)
