"""Vocabulary-parallel ``linear_divergence`` on torch.distributed (gloo, CPU processes): every kind
(forward / reverse KL, jsd, tv, alpha, f-generators) with the student entropy, value and both
heads' gradients against the float64 single-process reference, for even, uneven (one empty) and
padded vocabulary slices, float32, DTensor heads, the un-reduced hidden gradients, zero
probabilities, and mismatched inputs (a clear error on every rank); the engine's second pass of
jsd / tv with given normalizers."""

import pytest
import torch
from _distributed import run
from _distributed_div_cases import div_cases
from alignops.kernels._common import DivergenceOptions, LogitOptions

from alignops._torch import linear_divergence as eng
from alignops.reference.linear_divergence import linear_divergence_ref


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_divergence(world):
    run(world, div_cases)


def test_row_sums_with_given_normalizers():
    """The jsd / tv second pass alone (what each rank runs with the global normalizers) equals the
    engine's own row sums when given the head's own ``lse``; other kinds are refused."""
    g = torch.Generator().manual_seed(3)
    h_p, w_p, b_p = (
        torch.randn(13, 6, generator=g),
        torch.randn(29, 6, generator=g),
        torch.randn(29, generator=g),
    )
    h_q, w_q = torch.randn(13, 5, generator=g), torch.randn(29, 5, generator=g)
    valid = torch.rand(13, generator=g) > 0.3
    op, oq = LogitOptions(-100, 1.0, 6.0, 0.8), LogitOptions(-100, 1.1, None, 1.0)
    for div in (DivergenceOptions("jsd", beta=0.35), DivergenceOptions("tv")):
        rs = []
        st = eng.linear_divergence_fwd(h_p, w_p, b_p, h_q, w_q, None, valid, op, oq, div, row_sums_out=rs)
        ref = linear_divergence_ref(
            h_p.double(), w_p.double(), h_q.double(), w_q.double(), div, b_p=b_p.double(), valid=valid,
            opts_p=op, opts_q=oq,
        )  # fmt: skip
        rows = eng.linear_divergence_row_sums(
            h_p, w_p, b_p, h_q, w_q, None, valid, op, oq, div, ref[1].float(), ref[2].float()
        )
        assert rows.shape == (2, 13)
        torch.testing.assert_close(rows, torch.where(valid, rs[0], 0.0), rtol=1e-5, atol=1e-6)
        b = div.beta
        d = b * rows[0] + (1 - b) * rows[1] if div.kind == "jsd" else 0.5 * (rows[0] - rows[1])
        torch.testing.assert_close(d.double(), ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.div.double(), ref[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="jsd and tv only"):
        eng.linear_divergence_row_sums(
            h_p, w_p, b_p, h_q, w_q, None, valid, op, oq, DivergenceOptions("forward_kl"), ref[1], ref[2]
        )
