"""The fused paths ``alignops.grpo_loss_from_hidden`` / ``alignops.ppo_loss_from_hidden`` (hidden
states -> per-token log-probs and entropy -> policy loss, no ``[N, V]`` logits) against full-logits
PyTorch (``log_softmax(softcap(h W^T + b) / T)`` in float64) feeding the float64 loss references of
test_losses_grpo.py / test_losses_ppo.py; values and gradients w.r.t. hidden, weight and bias under
a random upstream gradient. PPO-ptx's pretraining NLL comes from ``alignops.linear_cross_entropy``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _assert import assert_close, assert_close_lowp
from _inputs import gather_logps, generator, padded_mask, ref_logits
from test_losses_grpo import ref_grpo
from test_losses_ppo import ref_ppo

from alignops import grpo_loss_from_hidden, ppo_loss_from_hidden

BF, TF, HF, VF = 5, 11, 16, 37  # odd sizes, V prime


def fused_inputs(seed, dtype=torch.float32):
    g = generator(seed)
    h = torch.randn(BF, TF, HF, generator=g).to(dtype)
    w = (0.4 * torch.randn(VF, HF, generator=g)).to(dtype)
    bias = (0.3 * torch.randn(VF, generator=g)).to(dtype)
    ids = torch.randint(0, VF, (BF, TF), generator=g)
    m = padded_mask(BF, TF, g)
    ids[~m] = -100 if seed % 2 else 0  # padding ids may be ignore_index or a real token
    return g, h, w, bias, ids, m


def full_logits_stats(h, w, bias, ids, m, *, temperature=1.0, softcap=None):
    """Per-token float64 log-probs and entropies from the full logits (0 where not scored)."""
    return gather_logps(ref_logits(h, w, bias, temperature=temperature, softcap=softcap), ids, m)


@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, 2.5)], ids=["plain", "temp-softcap"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo"])
def test_grpo_loss_from_hidden_vs_full_logits(loss_type, temperature, softcap):
    g, h, w, bias, ids, m = fused_inputs(11 + len(loss_type))
    h, w, bias = (x.requires_grad_() for x in (h, w, bias))
    with torch.no_grad():
        lp0, _ = full_logits_stats(h, w, bias, ids, m, temperature=temperature, softcap=softcap)
    old = lp0 + 0.3 * torch.randn(BF, TF, generator=g, dtype=torch.float64)
    ref = lp0 + 0.3 * torch.randn(BF, TF, generator=g, dtype=torch.float64)
    adv = torch.randn(BF, generator=g)
    out = grpo_loss_from_hidden(
        h,
        w,
        ids,
        m,
        old.float(),
        adv,
        ref_logps=ref.float(),
        bias=bias,
        temperature=temperature,
        softcap=softcap,
        loss_type=loss_type,
        beta=0.04,
        entropy_coef=0.01,
        top_entropy_quantile=0.7,
        epsilon_high=0.28,
    )
    hr, wr, br = (x.detach().double().requires_grad_() for x in (h, w, bias))
    lp, ent = full_logits_stats(hr, wr, br, ids, m, temperature=temperature, softcap=softcap)
    ref_loss, _ = ref_grpo(
        lp,
        old.float().double(),
        adv.double(),
        m,
        loss_type=loss_type,
        ref=ref.float().double(),
        beta=0.04,
        ent=ent,
        ent_coef=0.01,
        top_q=0.7,
        eps_high=0.28,
    )
    gu = torch.randn((), generator=g, dtype=torch.float64)
    (out.loss * gu).backward()
    (ref_loss * gu).backward()
    assert out.loss.dtype == torch.float32
    assert_close("fused loss", ref_loss, out.loss, atol=2e-6, rtol=2e-5)
    assert_close(
        "fused entropy metric", (ent * m).sum() / m.sum(), out.metrics["entropy"], atol=2e-6, rtol=1e-5
    )
    for name, a, b in (
        ("dhidden", hr.grad, h.grad),
        ("dweight", wr.grad, w.grad),
        ("dbias", br.grad, bias.grad),
    ):
        scale = a.abs().max().item()
        assert_close(f"fused {name}", a, b, atol=2e-5 * scale, rtol=1e-4)
    assert (h.grad[~m] == 0).all()


def test_grpo_loss_from_hidden_on_policy_and_bf16():
    """old_logps=None (on-policy ratio 1) with bf16 hidden / weight: float32 loss equal to the
    float64 reference on the bf16 values; bf16 gradients no worse than the float64 truth rounded
    to bf16 (three-way rule)."""
    g, h, w, bias, ids, m = fused_inputs(23, dtype=torch.bfloat16)
    h, w = h.requires_grad_(), w.requires_grad_()
    adv = torch.randn(BF, generator=g)
    out = grpo_loss_from_hidden(h, w, ids, m, None, adv, loss_type="grpo")
    hr, wr = (x.detach().double().requires_grad_() for x in (h, w))
    lp, _ = full_logits_stats(hr, wr, torch.zeros(VF, dtype=torch.float64), ids, m)
    ref_loss, _ = ref_grpo(lp, lp.detach(), adv.double(), m, loss_type="grpo")
    gu = torch.randn((), generator=g, dtype=torch.float64)
    (out.loss * gu).backward()
    (ref_loss * gu).backward()
    assert out.loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    assert_close("bf16 fused on-policy loss", ref_loss, out.loss, atol=1e-6, rtol=1e-5)
    assert_close_lowp("bf16 dhidden", hr.grad, h.grad, hr.grad.bfloat16())
    assert_close_lowp("bf16 dweight", wr.grad, w.grad, wr.grad.bfloat16())


def test_ppo_loss_from_hidden_vs_full_logits_with_ptx():
    g, h, w, bias, ids, m = fused_inputs(31)
    h, w, bias = (x.requires_grad_() for x in (h, w, bias))
    with torch.no_grad():
        lp0, _ = full_logits_stats(h, w, bias, ids, m, temperature=0.7)
    old = (lp0 + 0.2 * torch.randn(BF, TF, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(BF, TF, generator=g)
    values = torch.randn(BF, TF, generator=g, requires_grad=True)
    old_values = values.detach() + 0.3 * torch.randn(BF, TF, generator=g)
    returns = torch.randn(BF, TF, generator=g)
    ph = torch.randn(3, 7, HF, generator=g, requires_grad=True)
    plab = torch.randint(0, VF, (3, 7), generator=g)
    plab[0, :2] = -100
    out = ppo_loss_from_hidden(
        h,
        w,
        ids,
        m,
        old,
        adv,
        bias=bias,
        temperature=0.7,
        values=values,
        old_values=old_values,
        returns=returns,
        entropy_coef=0.02,
        ptx_hidden=ph,
        ptx_labels=plab,
        ptx_coef=0.5,
    )
    hr, wr, br, vr, phr = (x.detach().double().requires_grad_() for x in (h, w, bias, values, ph))
    lp, ent = full_logits_stats(hr, wr, br, ids, m, temperature=0.7)
    keep = plab != -100
    z = phr @ wr.T + br
    nll = -F.log_softmax(z, -1)[keep].gather(-1, plab[keep][:, None]).mean()
    ref_loss, _ = ref_ppo(
        lp,
        old.double(),
        adv.double(),
        m,
        values=vr,
        old_values=old_values.double(),
        returns=returns.double(),
        vm=m,
        ent=ent,
        ent_coef=0.02,
        ptx=nll,
        ptx_coef=0.5,
    )
    gu = torch.randn((), generator=g, dtype=torch.float64)
    (out.loss * gu).backward()
    (ref_loss * gu).backward()
    assert_close("fused ppo loss", ref_loss, out.loss, atol=2e-6, rtol=2e-5)
    for name, a, b in (
        ("dhidden", hr.grad, h.grad),
        ("dweight", wr.grad, w.grad),
        ("dbias", br.grad, bias.grad),
        ("dvalues", vr.grad, values.grad),
        ("dptx_hidden", phr.grad, ph.grad),
    ):
        scale = a.abs().max().item()
        assert_close(f"fused ppo {name}", a, b, atol=2e-5 * scale, rtol=1e-4)


def test_fused_bad_options_raise():
    _, h, w, _, ids, m = fused_inputs(1)
    with pytest.raises(ValueError, match="unknown option.*'loss_typ'.*valid options of grpo_loss"):
        grpo_loss_from_hidden(h, w, ids, m, None, torch.zeros(BF), loss_typ="grpo")
    with pytest.raises(ValueError, match="ids"):
        grpo_loss_from_hidden(h, w, ids[:, :-1], m, None, torch.zeros(BF))
    with pytest.raises(ValueError, match="together"):
        ppo_loss_from_hidden(h, w, ids, m, None, torch.zeros(BF), ptx_hidden=h)


def test_ppo_loss_from_hidden_ptx_num_items():
    """``ptx_num_items`` normalises the pretraining NLL for gradient accumulation: Σ NLL / num_items."""
    g, h, w, bias, ids, m = fused_inputs(41)
    ph = torch.randn(2, 5, HF, generator=g)
    plab = torch.randint(0, VF, (2, 5), generator=g)
    plab[1, 3:] = -100
    n = int((plab != -100).sum())
    adv = torch.randn(BF, generator=g)
    mean = ppo_loss_from_hidden(
        h, w, ids, m, None, adv, bias=bias, ptx_hidden=ph, ptx_labels=plab, ptx_coef=1.0
    )
    spread = ppo_loss_from_hidden(
        h, w, ids, m, None, adv, bias=bias, ptx_hidden=ph, ptx_labels=plab, ptx_coef=1.0, ptx_num_items=4 * n
    )
    assert_close("ptx / num_items", mean.metrics["loss/ptx"] / 4, spread.metrics["loss/ptx"], atol=1e-6)
