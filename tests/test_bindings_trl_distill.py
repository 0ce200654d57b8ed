"""The TRL binding of the DistillationTrainer: alignops' ``linear_divergence`` in place of TRL's
``ChunkedDivergenceFunction``.

The head against float64 logits written from TRL's definition of the generalized JSD (beta 0: the
forward KL(teacher || student), 1: the reverse KL, else ``beta KL(t || m) + (1 - beta) KL(s || m)``
with ``m = (1 - beta) p_s + beta p_t``) and against TRL's own head, with each model's logit scale
and soft-cap, one temperature, a random upstream gradient; then the DistillationTrainer a few
steps on the CPU with and without alignops (fp32; per-step losses within 1e-5 relative + 1e-6
absolute, TRL's divergence head ran zero times with the switch on).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("trl")

from alignops.bindings import trl as binding  # noqa: E402

from tests._assert import assert_close  # noqa: E402
from tests._trl_runs import trainer_run  # noqa: E402


@pytest.fixture(autouse=True)
def _switch_off():
    binding.disable()
    yield
    binding.disable()


def _logits(h, w, b, scale, softcap, temperature):
    z = h.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _trl_divergence_f64(zs, zt, beta):
    """Per-token divergence and student entropy from both heads' float64 logits."""
    ls, lt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    ps, pt = ls.exp(), lt.exp()
    if beta == 0.0:
        div = (pt * (lt - ls)).sum(-1)
    elif beta == 1.0:
        div = (ps * (ls - lt)).sum(-1)
    else:
        m = (1 - beta) * ps + beta * pt
        lm = m.log()
        div = beta * (pt * (lt - lm)).sum(-1) + (1 - beta) * (ps * (ls - lm)).sum(-1)
    return div, -(ps * ls).sum(-1)


CASES = [  # beta, temperature, (student scale, softcap), (teacher scale, softcap)
    (0.5, 1.0, (1.0, None), (1.0, None)),
    (0.0, 0.8, (0.5, None), (1.0, 5.0)),
    (1.0, 1.3, (1.0, 4.0), (2.0, None)),
    (0.3, 0.9, (1.7, 3.0), (0.6, 6.0)),
]


@pytest.mark.parametrize("beta,temperature,stud,teach", CASES)
def test_divergence_head_matches_float64_and_trl(beta, temperature, stud, teach):
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    n, hs, ht, v = 37, 12, 20, 211
    g = torch.Generator().manual_seed(int(beta * 10) + 1)
    h_s = (torch.randn(n, hs, generator=g, dtype=torch.float64) * 1.5).requires_grad_()
    w_s = (torch.randn(v, hs, generator=g, dtype=torch.float64) / math.sqrt(hs)).requires_grad_()
    b_s = (torch.randn(v, generator=g, dtype=torch.float64) * 0.2).requires_grad_()
    h_t = torch.randn(n, ht, generator=g, dtype=torch.float64) * 1.5
    w_t = (torch.randn(v, ht, generator=g, dtype=torch.float64) / math.sqrt(ht)).requires_grad_()
    b_t = torch.randn(v, generator=g, dtype=torch.float64) * 0.2
    args = (h_s, w_s, b_s, h_t, w_t, b_t, beta, temperature, stud[0], stud[1], teach[0], teach[1])
    div, ent = binding.AlignopsDivergenceFunction.apply(*args)
    want_div, want_ent = _trl_divergence_f64(
        _logits(h_s, w_s, b_s, *stud, temperature), _logits(h_t, w_t, b_t, *teach, temperature), beta
    )
    assert div.shape == ent.shape == (n,) and not ent.requires_grad
    assert_close("divergence", want_div, div, atol=1e-10, rtol=1e-9)
    assert_close("entropy", want_ent, ent, atol=1e-10, rtol=1e-9)
    up = torch.randn(n, generator=g, dtype=torch.float64)
    got_g = torch.autograd.grad((div * up).sum(), (h_s, w_s, b_s))
    want_g = torch.autograd.grad((want_div * up).sum(), (h_s, w_s, b_s))
    for name, a, c in zip(("dhidden", "dweight", "dbias"), want_g, got_g):
        assert_close(name, a, c, atol=1e-10, rtol=1e-9)
    assert w_t.grad is None  # the teacher gets no gradient, as in TRL
    # TRL's own head (fp32 tiles) on the same float32 inputs
    f32 = [a.detach().float() if isinstance(a, torch.Tensor) else a for a in args]
    trl_div, trl_ent = ChunkedDivergenceFunction.apply(*f32)
    ours = binding.AlignopsDivergenceFunction.apply(*f32)
    assert_close("divergence vs TRL", trl_div, ours[0], atol=2e-6, rtol=2e-5)
    assert_close("entropy vs TRL", trl_ent, ours[1], atol=2e-6, rtol=2e-5)


def test_divergence_head_refusals():
    h, w = torch.randn(3, 4), torch.randn(9, 4)
    with pytest.raises(ValueError, match="beta must be in"):
        binding.divergence_head(h, w, None, h, w, None, 1.5)
    with pytest.raises(ValueError, match="logit scales"):
        binding.divergence_head(h, w, None, h, w, None, 0.5, 1.0, 1.0, None, 0.0, None)


def test_switch_replaces_and_restores_the_divergence_head():
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    from trl.trainer import distillation_trainer as dist

    with binding.enable():
        assert dist.ChunkedDivergenceFunction is binding.AlignopsDivergenceFunction
    assert dist.ChunkedDivergenceFunction is ChunkedDivergenceFunction


@pytest.mark.parametrize("beta", [0.5, 0.0, 1.0])
def test_distillation_trainer_losses_match_and_trl_head_never_runs(beta):
    """Three SGD steps of TRL's DistillationTrainer (on-policy generation, a wider teacher, fp32)
    with TRL's divergence head and with alignops': the logged per-step losses agree within 1e-5
    relative + 1e-6 absolute, the logged gradient norms within 1e-5 relative, and with the switch on
    TRL's ``ChunkedDivergenceFunction`` ran zero times."""
    off = trainer_run("distill", False, 3, beta)
    on = trainer_run("distill", True, 3, beta)
    assert off["trl_calls"] == 3 and off["alignops_calls"] == 0
    assert on["trl_calls"] == 0 and on["alignops_calls"] == 3
    assert len(on["losses"]) == len(off["losses"]) == 3
    assert_close("losses", torch.tensor(off["losses"]), torch.tensor(on["losses"]), atol=1e-6, rtol=1e-5)
    assert_close(
        "grad norms", torch.tensor(off["grad_norms"]), torch.tensor(on["grad_norms"]), atol=0, rtol=1e-5
    )
    assert min(off["losses"]) > 0 and not binding.is_enabled()


def test_divergence_head_under_bf16_autocast():
    """TRL's default mixed precision: fp32 master weights, bf16 autocast. Both heads multiply the
    bf16-rounded operands and keep fp32 logits: values equal float64 on those operands; the student
    gradients equal TRL's to bf16 rounding of the backward matmuls."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    g = torch.Generator().manual_seed(5)
    h_s = torch.randn(29, 16, generator=g).requires_grad_()
    w_s = (torch.randn(301, 16, generator=g) / 4).requires_grad_()
    h_t, w_t = torch.randn(29, 24, generator=g), torch.randn(301, 24, generator=g) / 5
    up = torch.randn(29, generator=g)
    got = {}
    for name, head in (("alignops", binding.AlignopsDivergenceFunction), ("trl", ChunkedDivergenceFunction)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            div, ent = head.apply(h_s, w_s, None, h_t, w_t, None, 0.4, 0.9)
        assert div.dtype == torch.float32
        got[name] = (div, ent, *torch.autograd.grad((div * up).sum(), (h_s, w_s)))
    bf = lambda t: t.detach().bfloat16().double()  # noqa: E731
    want = _trl_divergence_f64(bf(h_s) @ bf(w_s).T / 0.9, bf(h_t) @ bf(w_t).T / 0.9, 0.4)
    for i, name in enumerate(("divergence", "entropy")):
        assert_close(name + " bf16", want[i], got["alignops"][i], atol=1e-5, rtol=1e-5)
    for i, name in ((2, "dhidden"), (3, "dweight")):
        assert got["alignops"][i].dtype == torch.float32
        assert_close(name + " vs TRL bf16", got["trl"][i], got["alignops"][i], atol=5e-4, rtol=1e-2)
