"""Every kernel family under ``torch.compile(fullgraph=True)``: each public op is a custom op, so
a compiled training step that calls them has no graph break, and matches eager values and
gradients (which the family tests compare with float64)."""

from __future__ import annotations

import pytest
import torch
from _assert import assert_close

import alignops


def _linear_step(h, w, b, y):
    lp = alignops.linear_logprobs(h, w, y, bias=b, return_entropy=True, softcap=5.0)
    ce = alignops.linear_cross_entropy(h, w, y, bias=b, label_smoothing=0.1, z_loss=1e-4)
    return (lp.logps * 0.5).sum() + lp.entropy.mean() + ce


def _logits_step(h, w, b, y):
    logits = torch.nn.functional.linear(h, w, b)
    lp = alignops.logprobs(logits, y, return_entropy=True, temperature=0.7)
    ce = alignops.cross_entropy(logits, y, label_smoothing=0.1, z_loss=1e-4)
    return (lp.logps * 0.5).sum() + lp.entropy.mean() + ce


@pytest.mark.parametrize("step", [_linear_step, _logits_step], ids=["linear_logprobs", "logprobs"])
def test_fullgraph_training_step(step):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(23, 8, generator=g, requires_grad=True)
    w = torch.randn(64, 8, generator=g, requires_grad=True)
    b = torch.randn(64, generator=g, requires_grad=True)
    y = torch.randint(0, 64, (23,), generator=g)
    y[3] = -100
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    out_c = compiled(h, w, b, y)
    g_c = torch.autograd.grad(out_c, (h, w, b))
    out_e = step(h, w, b, y)
    g_e = torch.autograd.grad(out_e, (h, w, b))
    assert_close("loss", out_e.detach(), out_c.detach(), atol=1e-6)
    for name, a, c in zip(("dh", "dw", "db"), g_e, g_c):
        assert_close(name, a, c, atol=1e-6)


def test_cross_entropy_lambda_compiles():
    """The exact call that used to fail with a data-dependent guard error."""
    x = torch.randn(4, 7, 50, requires_grad=True)
    y = torch.randint(0, 50, (4, 7))
    fn = torch.compile(lambda a, b: alignops.cross_entropy(a, b), fullgraph=True, backend="aot_eager")
    assert_close("loss", alignops.cross_entropy(x, y).detach(), fn(x, y).detach(), atol=1e-6)
