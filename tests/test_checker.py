"""The checker must reject deliberately wrong "kernels".

If ``assert_close`` with the tolerances our tests use let any of these through, the tests
would be unable to catch the bug each one stands for.
"""

from __future__ import annotations

import pytest
import torch

from alignops.reference import linear_logprobs_ref
from tests._assert import assert_close, assert_close_lowp


def _case():
    n, h, v = 64, 32, 500
    hid = torch.randn(n, h, dtype=torch.float64)
    w = torch.randn(v, h, dtype=torch.float64) / h**0.5
    y = torch.randint(0, v, (n,))
    y[::7] = -100
    return hid, w, y


def _bf16_rounded(hid, w, y):
    return linear_logprobs_ref(hid.bfloat16(), w.bfloat16(), y)[0].to(torch.bfloat16).double()


def _dropped_ignore_mask(hid, w, y):
    z = torch.log_softmax(hid @ w.T, -1)
    return z.gather(-1, y.clamp(min=0)[:, None])[:, 0]


def _off_by_one_targets(hid, w, y):
    return linear_logprobs_ref(hid, w, torch.where(y >= 0, (y + 1) % w.shape[0], y))[0]


@pytest.mark.parametrize("wrong", [_bf16_rounded, _dropped_ignore_mask, _off_by_one_targets])
def test_assert_close_rejects_wrong_kernels(wrong):
    hid, w, y = _case()
    ref = linear_logprobs_ref(hid, w, y)[0]
    with pytest.raises(AssertionError):
        assert_close("logps", ref, wrong(hid, w, y), atol=1e-6, rtol=1e-6)


def test_lowp_rule_rejects_worse_than_torch():
    """A 'kernel' that accumulates in bf16 is worse than torch's bf16 path: rejected."""
    hid, w, y = _case()
    y = y.clamp(min=0)
    truth = linear_logprobs_ref(hid, w, y)[0]
    base = linear_logprobs_ref(hid.bfloat16().double(), w.bfloat16().double(), y)[0].float()
    noisy = (truth + 0.05 * torch.randn_like(truth)).float()
    with pytest.raises(AssertionError):
        assert_close_lowp("logps", truth, noisy, base)


def test_assert_close_rejects_nan_and_shape():
    ref = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(AssertionError):
        assert_close("nan", ref, torch.tensor([0.0, float("nan"), 0.0, 0.0], dtype=torch.float64), atol=1.0)
    with pytest.raises(AssertionError):
        assert_close("shape", ref, torch.zeros(5, dtype=torch.float64), atol=1.0)
