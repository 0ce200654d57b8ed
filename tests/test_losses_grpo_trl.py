"""GRPO family, GMPO and RLOO against TRL 1.16's own ``GRPOTrainer._compute_loss``,
``GMPOTrainer._compute_loss`` and ``RLOOTrainer._compute_loss``, called on a minimal stub ``self``
whose model forward returns our random per-token log-probs, on the same inputs; GMPO (Zhao et al.
2025, arXiv:2507.20673) and RLOO (Ahmadian et al. 2024, arXiv:2402.14740) also against float64
references written here.
"""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch
from _assert import assert_close
from _inputs import Accelerator, trl_class, with_garbage
from test_losses_grpo import LOSS_TYPES, MAX_LEN, B, T, make_batch

from alignops.losses import gmpo_loss, grpo_loss, rloo_loss


def _stub(trainer_cls, logps, entropy, **fields):
    """The ``self`` a TRL policy trainer's ``_compute_loss`` reads, with the model's per-token
    log-probs / entropies replaced by ours and TRL's own mask / weight helpers."""
    s = types.SimpleNamespace(
        accelerator=Accelerator(),
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        _metrics=defaultdict(lambda: defaultdict(list)),
        aux_loss_enabled=False,
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropy, None),
        **fields,
    )
    for name in ("get_off_policy_mask", "get_gamma_weights"):
        if hasattr(trainer_cls, name):
            setattr(s, name, getattr(trainer_cls, name))
    if hasattr(trainer_cls, "get_high_entropy_mask"):
        s.get_high_entropy_mask = types.MethodType(trainer_cls.get_high_entropy_mask, s)
    return s


def _trl_inputs(mask, **extra):
    """The batch dict TRL's policy trainers get from their generation step."""
    b, t = mask.shape
    return dict(
        prompt_ids=torch.zeros(b, 2, dtype=torch.long),
        prompt_mask=torch.ones(b, 2, dtype=torch.long),
        completion_ids=torch.zeros(b, t, dtype=torch.long),
        completion_mask=mask.long(),
        **extra,
    )


def trl_grpo(
    logps,
    entropy,
    mask,
    *,
    loss_type,
    level="token",
    beta=0.0,
    eps=0.2,
    eps_high=None,
    delta=None,
    bias_kl=True,
    ent_coef=0.0,
    top_q=1.0,
    opm_thr=None,
    use_is=False,
    max_len=MAX_LEN,
    **inputs,
):
    GRPOTrainer = trl_class("trl.trainer.grpo_trainer.GRPOTrainer")

    args = types.SimpleNamespace(
        use_bias_correction_kl=bias_kl,
        delta=delta,
        sapo_temperature_pos=1.0,
        sapo_temperature_neg=1.05,
        vespo_k_pos=2.0,
        vespo_lambda_pos=3.0,
        vespo_k_neg=3.0,
        vespo_lambda_neg=2.0,
        steps_per_generation=1,
    )
    s = _stub(
        GRPOTrainer,
        logps,
        entropy,
        args=args,
        top_entropy_quantile=top_q,
        off_policy_mask_threshold=opm_thr,
        importance_sampling_level=level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps,
        epsilon_high=eps if eps_high is None else eps_high,
        use_vllm=use_is,
        vllm_importance_sampling_correction=use_is,
        max_completion_length=max_len,
        _entropy_bonus_enabled=ent_coef != 0.0,
        entropy_coef=ent_coef,
        use_adaptive_entropy=False,
    )
    loss = GRPOTrainer._compute_loss(s, None, _trl_inputs(mask, num_items_in_batch=mask.sum(), **inputs))
    return loss, {k: v[0] for k, v in s._metrics["train"].items()}


TRL_CASES = [pytest.param(dict(loss_type=lt), id=lt) for lt in LOSS_TYPES] + [
    pytest.param(dict(loss_type="grpo", level="sequence", eps=3e-4, eps_high=4e-4), id="gspo"),
    pytest.param(dict(loss_type="luspo", level="sequence"), id="luspo-seq"),
    pytest.param(dict(loss_type="dapo", beta=0.04, eps_high=0.28), id="dapo-kl-bias"),
    pytest.param(dict(loss_type="grpo", beta=0.04, bias_kl=False, delta=1.5), id="grpo-kl-delta"),
    pytest.param(dict(loss_type="grpo", level="sequence", beta=0.04), id="gspo-kl"),
    pytest.param(dict(loss_type="bnpo", ent_coef=0.01, top_q=0.5), id="bnpo-entropy"),
    pytest.param(dict(loss_type="dapo", opm_thr=0.02, use_is=True), id="dapo-opm-is"),
    pytest.param(dict(loss_type="vespo", use_is=True), id="vespo-is"),
    pytest.param(dict(loss_type="cispo", eps_high=5.0, beta=0.02), id="cispo-kl"),
]


@pytest.mark.parametrize("case", TRL_CASES)
def test_grpo_matches_trl(case):
    batch = make_batch(seed=31, spread=0.6)
    g, m = batch["g"], batch["mask"]
    batch["ent"] = batch["ent"].float().double()  # TRL takes the entropy quantile in float32
    extra, opts = {}, {}
    if case.get("beta", 0.0):
        extra["ref_per_token_logps"] = batch["ref"]
        opts.update(ref_logps=batch["ref"], beta=case["beta"])
    if case.get("use_is"):
        is_ratio = torch.exp(0.3 * torch.randn(B, T, generator=g, dtype=torch.float64))
        is_ratio = torch.where(m, is_ratio, torch.ones_like(is_ratio))  # TRL's padding value
        extra["importance_sampling_ratio"] = is_ratio
        opts["importance_sampling_ratio"] = is_ratio
    if case.get("opm_thr") is not None:
        sampling = batch["old"] + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
        extra["sampling_per_token_logps"] = sampling
        opts.update(off_policy_mask_threshold=case["opm_thr"], sampling_logps=sampling)
    x_trl = batch["logps"].clone().requires_grad_()
    loss_trl, met_trl = trl_grpo(
        x_trl, batch["ent"], m, old_per_token_logps=batch["old"], advantages=batch["adv"], **case, **extra
    )
    x = batch["logps"].clone().requires_grad_()
    out = grpo_loss(
        x,
        batch["old"],
        batch["adv"],
        m,
        loss_type=case["loss_type"],
        importance_sampling_level=case.get("level", "token"),
        epsilon=case.get("eps", 0.2),
        epsilon_high=case.get("eps_high"),
        delta=case.get("delta"),
        use_bias_correction_kl=case.get("bias_kl", True),
        entropy=batch["ent"],
        entropy_coef=case.get("ent_coef", 0.0),
        top_entropy_quantile=case.get("top_q", 1.0),
        max_completion_length=MAX_LEN,
        **opts,
    )
    gu = torch.randn((), generator=g, dtype=torch.float64)
    (loss_trl * gu).backward()
    (out.loss * gu).backward()
    # TRL builds SAPO's temperatures with torch.where on Python floats, i.e. in float32 (1.05 -> 1.0499999523)
    rtol = 1e-6 if case["loss_type"] == "sapo" else 1e-10
    assert_close("loss vs TRL", loss_trl.detach(), out.loss.detach(), atol=1e-12, rtol=rtol)
    assert_close("grad vs TRL", x_trl.grad, x.grad, atol=1e-12, rtol=rtol)
    for name, v in met_trl.items():
        if name == "entropy_coef":
            continue
        ours = out.metrics[name]
        if math.isnan(v):
            assert torch.isnan(ours), name
        else:
            # TRL averages its float32 clip masks, so its metrics carry float32 rounding
            assert_close(f"metric {name}", torch.tensor(v, dtype=torch.float64), ours.double(), atol=1e-6)


# ------------------------------------------------------------------------------------------
# GMPO
# ------------------------------------------------------------------------------------------


def ref_gmpo(logps, old, adv, mask, *, eps=0.4, eps_high=None, ref=None, beta=0.0, ent=None, top_q=1.0):
    e_hi = eps if eps_high is None else eps_high
    if top_q < 1.0:
        thr = torch.quantile(torch.cat([ent[i][mask[i]] for i in range(len(adv))]), 1 - top_q)
    out = []
    for i in range(len(adv)):
        idx = mask[i].nonzero().squeeze(-1)
        d = logps[i, idx] - old[i, idx]
        c = d.clamp(-eps, e_hi)
        ct = torch.minimum(d, c) if adv[i] > 0 else torch.maximum(d, c)
        keep = torch.ones_like(d) if top_q == 1.0 else (ent[i, idx] >= thr).double()
        w = torch.exp((ct * keep).sum() / max(1.0, keep.sum().item()))
        L = -w * adv[i]
        if beta:
            lr = ref[i, idx] - logps[i, idx]
            L = L + beta * (torch.exp(lr) - lr - 1).sum() / max(1, idx.numel())
        out.append(L)
    return torch.stack(out)


@pytest.mark.parametrize(
    "opts", [dict(), dict(beta=0.05, eps_high=0.3), dict(top_q=0.5)], ids=["plain", "kl", "ent"]
)
def test_gmpo_vs_float64_reference_and_trl(opts):
    GMPOTrainer = trl_class("trl.experimental.gmpo.gmpo_trainer.GMPOTrainer")

    batch = make_batch(seed=41, spread=0.6)
    m, g = batch["mask"], batch["g"]
    batch["ent"] = batch["ent"].float().double()  # TRL takes the entropy quantile in float32
    kw = dict(ref=batch["ref"], ent=batch["ent"], **opts)
    x = batch["logps"].clone().requires_grad_()
    out = gmpo_loss(
        with_garbage(x, m),
        batch["old"],
        batch["adv"],
        m,
        ref_logps=batch["ref"],
        beta=opts.get("beta", 0.0),
        epsilon_high=opts.get("eps_high"),
        entropy=batch["ent"],
        top_entropy_quantile=opts.get("top_q", 1.0),
    )
    xr = batch["logps"].clone().requires_grad_()
    ref_losses = ref_gmpo(xr, batch["old"], batch["adv"], m, **kw)
    x_trl = batch["logps"].clone().requires_grad_()
    s = _stub(
        GMPOTrainer,
        x_trl,
        batch["ent"],
        top_entropy_quantile=opts.get("top_q", 1.0),
        epsilon_low=0.4,
        epsilon_high=opts.get("eps_high") or 0.4,
        beta=opts.get("beta", 0.0),
    )
    extra = dict(ref_per_token_logps=batch["ref"]) if opts.get("beta") else {}
    loss_trl = GMPOTrainer._compute_loss(
        s, None, _trl_inputs(m, old_per_token_logps=batch["old"], advantages=batch["adv"], **extra)
    )
    gu = torch.randn((), generator=g, dtype=torch.float64)
    for loss in (out.loss, ref_losses.mean(), loss_trl):
        (loss * gu).backward()
    assert out.losses.shape == (B,)
    assert_close("gmpo losses vs ref", ref_losses.detach(), out.losses.detach(), atol=1e-12)
    assert_close("gmpo loss vs TRL", loss_trl.detach(), out.loss.detach(), atol=1e-12)
    assert_close("gmpo grad vs ref", xr.grad, x.grad, atol=1e-12)
    assert_close("gmpo grad vs TRL", x_trl.grad, x.grad, atol=1e-12)
    for name, v in s._metrics["train"].items():
        ours = out.metrics[name]
        if math.isnan(v[0]):
            assert torch.isnan(ours), name
        else:
            assert_close(f"gmpo metric {name}", torch.tensor(v[0], dtype=torch.float64), ours, atol=1e-6)


# ------------------------------------------------------------------------------------------
# RLOO
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("old_form", ["seq", "token", "none"])
def test_rloo_loss_vs_float64_reference_and_trl(old_form):
    RLOOTrainer = trl_class("trl.trainer.rloo_trainer.RLOOTrainer")

    batch = make_batch(seed=51, spread=0.15)
    m, g = batch["mask"], batch["g"]
    seq_old = (batch["old"] * m).sum(-1)
    old_in = {"seq": seq_old, "token": with_garbage(batch["old"], m), "none": None}[old_form]
    x = batch["logps"].clone().requires_grad_()
    out = rloo_loss(with_garbage(x, m), old_in, batch["adv"], m, epsilon_high=0.3, entropy=batch["ent"])
    # reference: sequence sums over the compacted tokens
    xr = batch["logps"].clone().requires_grad_()
    ref_l = []
    for i in range(B):
        idx = m[i].nonzero().squeeze(-1)
        s_new = xr[i, idx].sum()
        s_old = s_new.detach() if old_form == "none" else batch["old"][i, idx].sum()
        rho = torch.exp(s_new - s_old)
        a = batch["adv"][i]
        ref_l.append(-torch.minimum(rho * a, rho.clamp(0.8, 1.3) * a))
    ref_l = torch.stack(ref_l)
    gu = torch.randn((), generator=g, dtype=torch.float64)
    (out.loss * gu).backward()
    (ref_l.mean() * gu).backward()
    assert_close("rloo losses", ref_l.detach(), out.losses.detach(), atol=1e-12)
    assert_close("rloo grad", xr.grad, x.grad, atol=1e-12)
    if old_form == "none":
        return
    x_trl = batch["logps"].clone().requires_grad_()
    s = _stub(RLOOTrainer, x_trl, batch["ent"], epsilon_low=0.2, epsilon_high=0.3)
    loss_trl = RLOOTrainer._compute_loss(s, None, _trl_inputs(m, old_logps=seq_old, advantages=batch["adv"]))
    (loss_trl * gu).backward()
    assert_close("rloo loss vs TRL", loss_trl.detach(), out.loss.detach(), atol=1e-12)
    assert_close("rloo grad vs TRL", x_trl.grad, x.grad, atol=1e-12)
    for name, v in s._metrics["train"].items():
        assert_close(
            f"rloo metric {name}", torch.tensor(v[0], dtype=torch.float64), out.metrics[name], atol=1e-6
        )
