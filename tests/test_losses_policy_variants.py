"""The verl / OpenRLHF options of the policy losses against float64 references written here and in
``_policy_refs.py`` from the papers' formulas: dual-clip PPO (Ye et al. 2020, arXiv:1912.09729),
PPO's separate low / high ranges, CISPO's two bounds (MiniMax 2025, arXiv:2506.13585), Clip-Cov and
KL-Cov (Cui et al. 2025, arXiv:2505.22617), every KL estimator in the losses, verl's four
aggregation modes with all / non-empty rows, and the rollout corrections (TIS / MIS).

Every runner returns ``(label, float64 expected, ours)`` pairs: the scalar loss, the per-token (or
per-row) losses and the gradient w.r.t. the policy log-probs under random upstream gradients on
both. Batches: B=7, T=13 with an empty row, a full row, interior holes, NaN at masked positions
and a quarter of the sampler log-probs 50 nats away (log-ratios of +-50). The tests assert the
runners in float64; test_rl_error_table.py prints their largest error in float32 and float64.
"""

from __future__ import annotations

import pytest
import torch
from _inputs import F64, with_garbage
from _policy_refs import (
    check_pairs,
    leaf,
    policy_batch,
    ref_aggregate,
    ref_clip,
    ref_clip_cov_chosen,
    ref_kl_cov_chosen,
    ref_policy_rows,
    ref_rollout,
    rows,
    scatter_rows,
    value_and_grads,
)
from test_losses_grpo import ref_grpo
from test_losses_grpo_trl import ref_gmpo

from alignops.losses import (
    CISPOOptions,
    ClipCovOptions,
    KLCovOptions,
    gmpo_loss,
    grpo_loss,
    ppo_loss,
    rloo_loss,
)
from alignops.rl import RolloutCorrection

B, T = 7, 13
AGG_MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
TIGHT = dict(atol=1e-10, rtol=1e-10)


def _inputs(batch, dtype, *names):
    return [batch[n].to(dtype) for n in names]


def _token_loss(
    label, dtype, batch, call, ref_rows, *, mode="token-mean", agg=None, mask=None, constant=0.0, seed=0
):
    """``call(x, mask)`` -> our LossOutput on ``x [B, T]`` (NaN where masked); ``ref_rows(xr)`` ->
    the reference's per-row token losses, aggregated by ``mode`` over ``mask`` (default: the batch's),
    plus ``constant`` (terms that do not depend on the log-probs: entropy bonus, value loss)."""
    m = batch["mask"]
    x, xr = leaf(batch["logps"], dtype)
    out = call(with_garbage(x, m), m)
    scored = m if mask is None else mask
    per_row = ref_rows(xr)
    ref_loss = ref_aggregate(per_row, mode, t=T, **(agg or {})) + constant
    return value_and_grads(
        label, out.loss, out.losses, ref_loss, scatter_rows(per_row, rows(scored), (B, T)), x, xr, seed
    )


# ------------------------------------------------------------------------------------------
# runners


def run_dual_clip(loss: str):
    """Dual-clip ``c``: ``min(L, -c A)`` where ``A < 0`` on GRPO, PPO and RLOO."""

    def run(dtype):
        batch = policy_batch(seed=1)
        old, adv, adv_t = _inputs(batch, dtype, "old", "adv", "adv_t")
        o64, a64, at64 = (t.to(F64) for t in (old, adv, adv_t))
        if loss == "grpo":
            kw = dict(loss_type="grpo", epsilon_high=0.28, clip_ratio_c=3.0)
            return _token_loss(
                "dual-clip grpo",
                dtype,
                batch,
                lambda x, m: grpo_loss(x, old, adv, m, **kw),
                lambda xr: ref_policy_rows(xr, o64, a64, batch["mask"], low=0.2, high=0.28, c=3.0),
                mode="seq-mean-token-mean",
            )
        if loss == "ppo":
            return _token_loss(
                "dual-clip ppo",
                dtype,
                batch,
                lambda x, m: ppo_loss(x, old, adv_t, m, clip_ratio_c=2.5),
                lambda xr: ref_policy_rows(xr, o64, at64, batch["mask"], c=2.5),
            )
        return _rloo_dual(dtype, batch)

    return run


def _rloo_dual(dtype, batch):
    m = batch["mask"]
    x, xr = leaf(batch["logps"], dtype)
    seq_old = torch.stack([batch["logps"][i, ix].sum() for i, ix in enumerate(rows(m))])
    seq_old = (seq_old + 1.5 * torch.randn(B, generator=batch["g"], dtype=F64)).to(dtype)
    adv = batch["adv"].to(dtype)
    out = rloo_loss(with_garbage(x, m), seq_old, adv, m, epsilon_high=0.3, clip_ratio_c=3.0)
    ref_l = torch.stack(
        [
            ref_clip(
                torch.exp(xr[i, ix].sum() - seq_old[i].double()), adv[i].double(), low=0.2, high=0.3, c=3.0
            )[0]
            for i, ix in enumerate(rows(m))
        ]
    )
    return value_and_grads("dual-clip rloo", out.loss, out.losses, ref_l.mean(), ref_l, x, xr)


def run_ppo_low_high(dtype):
    """``cliprange`` low, ``cliprange_high`` high, with the clipped value loss."""
    batch = policy_batch(seed=2, extreme=False)
    m = batch["mask"]
    old, adv_t, values, old_values, returns = _inputs(
        batch, dtype, "old", "adv_t", "values", "old_values", "returns"
    )
    o64, at64 = old.double(), adv_t.double()
    v64, ov64, r64 = values.double(), old_values.double(), returns.double()
    vf = []
    for i, ix in enumerate(rows(m)):
        v, vo, r = v64[i, ix], ov64[i, ix], r64[i, ix]
        vf.append(torch.maximum((v - r) ** 2, (torch.clamp(v, vo - 0.2, vo + 0.2) - r) ** 2))
    value_term = 0.1 * 0.5 * torch.cat(vf).mean()

    def ours(x, mm):
        return ppo_loss(
            x,
            old,
            adv_t,
            mm,
            cliprange=0.1,
            cliprange_high=0.35,
            values=values,
            old_values=old_values,
            returns=returns,
        )

    pairs = _token_loss(
        "ppo low/high",
        dtype,
        batch,
        ours,
        lambda xr: ref_policy_rows(xr, o64, at64, m, low=0.1, high=0.35),
    )
    # the value term is a constant of the policy log-probs: compare it through the loss
    label, want, got = pairs[0]
    return [(label, want + value_term, got)] + pairs[1:]


def run_cispo_bounds(dtype):
    batch = policy_batch(seed=3)
    old, adv = _inputs(batch, dtype, "old", "adv")
    opts = CISPOOptions(weight_min=0.7, weight_max=1.6)
    return _token_loss(
        "cispo bounds",
        dtype,
        batch,
        lambda x, m: grpo_loss(x, old, adv, m, loss_type="cispo", cispo=opts),
        lambda xr: ref_policy_rows(
            xr, old.double(), adv.double(), batch["mask"], surrogate="cispo", cispo=(0.7, 1.6)
        ),
    )


def run_clip_cov(ratio: float):
    """``ratio=1``: every candidate is detached (deterministic); small ``ratio``: a seeded draw."""

    def run(dtype):
        batch = policy_batch(seed=4)
        m = batch["mask"]
        old, adv_t = _inputs(batch, dtype, "old", "adv_t")
        o64, a64 = old.double(), adv_t.double()
        lp64 = batch["logps"].to(dtype).double()
        band = dict(ratio=ratio, lower=0.05, upper=2.0)
        chosen = ref_clip_cov_chosen(lp64, o64, a64, m, low=0.2, high=0.2, seed=5, **band)
        assert chosen, "the batch must have Clip-Cov candidates"
        opts = ClipCovOptions(generator=torch.Generator().manual_seed(5), **band)
        return _token_loss(
            f"clip-cov ratio={ratio}",
            dtype,
            batch,
            lambda x, mm: grpo_loss(x, old, adv_t, mm, loss_type="clip_cov", clip_cov=opts),
            lambda xr: ref_policy_rows(xr, o64, a64, m, surrogate="clip_cov", chosen=chosen),
        )

    return run


def run_kl_cov(level: str):
    def run(dtype):
        batch = policy_batch(seed=6)
        m = batch["mask"]
        old, adv = _inputs(batch, dtype, "old", "adv")
        chosen = ref_kl_cov_chosen(batch["logps"].to(dtype).double(), adv.double(), m, 0.2)
        opts = KLCovOptions(ratio=0.2, coef=0.7)
        kw = dict(surrogate="kl_cov", level=level, chosen=chosen, kl_cov_coef=0.7)
        return _token_loss(
            f"kl-cov {level}",
            dtype,
            batch,
            lambda x, mm: grpo_loss(
                x, old, adv, mm, loss_type="kl_cov", importance_sampling_level=level, kl_cov=opts
            ),
            lambda xr: ref_policy_rows(xr, old.double(), adv.double(), m, **kw),
        )

    return run


KL_CASES = {
    "abs": dict(kind="abs"),
    "k1+": dict(kind="k1+"),
    "k3+": dict(kind="k3+"),
    "abs+": dict(kind="abs+"),
    "mse": dict(kind="mse"),
    "low_var_kl clamped": dict(kind="low_var_kl", kl_clamp=20.0, kl_estimate_clamp=10.0),
}


def run_kl_estimator(loss: str, case: str):
    """``kl_estimator`` (and its clamps) in GRPO (times the ratio, TRL's bias correction) and PPO;
    the reference log-probs are 30 nats off on some tokens so both clamps act."""

    def run(dtype):
        # moderate policy ratios: with w = e^50 the bias-corrected k1+ / abs+ gradients are
        # w (|log r| + (logp - ref)) = 0 computed as a difference of two ~1e20 terms
        batch = policy_batch(seed=7, extreme=False)
        m, g = batch["mask"], batch["g"]
        far = torch.rand(B, T, generator=g) < 0.2
        ref_lp = torch.where(far, batch["logps"] + 30.0, batch["ref"])
        old, adv, adv_t, ref = (t.to(dtype) for t in (batch["old"], batch["adv"], batch["adv_t"], ref_lp))
        o = KL_CASES[case]
        kw = dict(
            kl_estimator=o["kind"], kl_clamp=o.get("kl_clamp"), kl_estimate_clamp=o.get("kl_estimate_clamp")
        )
        rk = dict(ref=ref.double(), beta=0.05, **{k: v for k, v in o.items()})
        if loss == "grpo":
            return _token_loss(
                f"kl {case} grpo",
                dtype,
                batch,
                lambda x, mm: grpo_loss(x, old, adv, mm, ref_logps=ref, beta=0.05, **kw),
                lambda xr: ref_policy_rows(xr, old.double(), adv.double(), m, **rk),
            )
        return _token_loss(
            f"kl {case} ppo",
            dtype,
            batch,
            lambda x, mm: ppo_loss(x, old, adv_t, mm, ref_logps=ref, beta=0.05, **kw),
            lambda xr: ref_policy_rows(xr, old.double(), adv_t.double(), m, bias_kl=False, **rk),
        )

    return run


def _constant_rows(x, m):
    return [x[i, ix] for i, ix in enumerate(rows(m))]


def run_agg(loss: str, mode: str, over: str, counts: bool):
    """``loss_agg_mode`` x ``seq_mean_over`` (x given global counts) on every policy loss; GRPO and
    PPO with a KL penalty and an entropy bonus, PPO with its value loss (the same mode for all)."""

    def run(dtype):
        # moderate ratios: with +-50 the loss is ~1e21 and would hide the O(1) entropy / value terms
        batch = policy_batch(seed=8, extreme=False)
        m = batch["mask"]
        old, adv, ref, ent, v, v_old, ret = _inputs(
            batch, dtype, "old", "adv", "ref", "ent", "values", "old_values", "returns"
        )
        o64, a64 = old.double(), adv.double()
        given = dict(num_items=40, num_sequences=9) if counts else {}
        kw = dict(loss_agg_mode=mode, seq_mean_over=over, max_completion_length=17, **given)
        agg = dict(over=over, horizon=17, **given)
        label = f"{loss} {mode} {over}{' counts' if counts else ''}"
        terms = dict(ref_logps=ref, beta=0.03, entropy=ent, entropy_coef=0.02)
        bonus = -0.02 * ref_aggregate(_constant_rows(ent.double(), m), mode, t=T, **agg)
        if loss == "grpo":
            call = lambda x, mm: grpo_loss(x, old, adv, mm, loss_type="dapo", **terms, **kw)  # noqa: E731
            ref_rows = lambda xr: ref_policy_rows(xr, o64, a64, m, ref=ref.double(), beta=0.03)  # noqa: E731
            return _token_loss(label, dtype, batch, call, ref_rows, mode=mode, agg=agg, constant=bonus)
        if loss == "ppo":
            vals = dict(values=v, old_values=v_old, returns=ret)
            call = lambda x, mm: ppo_loss(x, old, adv, mm, **vals, **terms, **kw)  # noqa: E731
            rk = dict(ref=ref.double(), beta=0.03, kind="k1", bias_kl=False)
            ref_rows = lambda xr: ref_policy_rows(xr, o64, a64, m, **rk)  # noqa: E731
            v64, vo64, r64 = v.double(), v_old.double(), ret.double()
            vf = torch.maximum((v64 - r64) ** 2, (torch.clamp(v64, vo64 - 0.2, vo64 + 0.2) - r64) ** 2)
            value = 0.1 * 0.5 * ref_aggregate(_constant_rows(vf, m), mode, t=T, **agg)
            return _token_loss(
                label, dtype, batch, call, ref_rows, mode=mode, agg=agg, constant=bonus + value
            )
        if loss == "gmpo":
            call = lambda x, mm: gmpo_loss(x, old, adv, mm, **kw)  # noqa: E731
            ref_rows = lambda xr: ref_gmpo(xr, o64, a64, m)  # noqa: E731
        else:
            call = lambda x, mm: rloo_loss(x, old, adv, mm, **kw)  # noqa: E731
            ref_rows = lambda xr: _ref_rloo(xr, o64, a64, m)  # noqa: E731
        x, xr = leaf(batch["logps"], dtype)
        out = call(with_garbage(x, m), m)
        seq = ref_rows(xr)  # [B], an empty row's own loss included (w = 1: -A)
        ref_loss = ref_aggregate(_broadcast_rows(seq, m), mode, t=T, **agg)
        return value_and_grads(label, out.loss, out.losses, ref_loss, seq, x, xr)

    return run


def _ref_rloo(xr, old, adv, m):
    s_old = [old[i, ix].sum() for i, ix in enumerate(rows(m))]
    return torch.stack(
        [
            ref_clip(torch.exp(xr[i, ix].sum() - s_old[i]), adv[i], low=0.2, high=0.2)[0]
            for i, ix in enumerate(rows(m))
        ]
    )


def _broadcast_rows(seq_losses, m):
    """A sequence loss on each of its row's valid tokens."""
    return [seq_losses[i] * torch.ones(ix.numel(), dtype=F64) for i, ix in enumerate(rows(m))]


ROLLOUT_CASES = {
    "tis-token": (RolloutCorrection(is_threshold=1.3), dict(is_hi=1.3)),
    "tis-seq": (
        RolloutCorrection(is_level="sequence", is_threshold_lower=0.5),
        dict(is_level="sequence", is_lo=0.5),
    ),
    "rs-geometric": (
        RolloutCorrection(is_level=None, rs_level="geometric", rs_threshold=1.15),
        dict(is_level=None, rs_level="geometric", rs_hi=1.15),
    ),
    "tis+rs-token-zero": (
        RolloutCorrection(rs_level="token", rs_threshold=1.4, rs_threshold_lower=0.8, drop_rejected=False),
        dict(rs_level="token", rs_hi=1.4, rs_lo=0.8, drop=False),
    ),
    "tis+rs-seq": (
        RolloutCorrection(rs_level="sequence", rs_threshold=2.5),
        dict(rs_level="sequence", rs_hi=2.5),
    ),
}


def run_rollout(loss: str, case: str):
    """``rollout_correction`` from the rollout engine's log-probs ``sampling_logps``."""

    def run(dtype):
        batch = policy_batch(seed=9)
        m = batch["mask"]
        old, adv, samp = _inputs(batch, dtype, "old", "adv", "sampling")
        correction, rk = ROLLOUT_CASES[case]
        weights, keep = ref_rollout(old.double(), samp.double(), m, **rk)
        fn = grpo_loss if loss == "grpo" else ppo_loss
        return _token_loss(
            f"rollout {case} {loss}",
            dtype,
            batch,
            lambda x, mm: fn(x, old, adv, mm, sampling_logps=samp, rollout_correction=correction),
            lambda xr: ref_policy_rows(xr, old.double(), adv.double(), keep, weights=weights),
            mask=keep,
        )

    return run


EXTREME_TYPES = ["grpo", "dapo", "dr_grpo", "cispo", "sapo", "vespo", "luspo"]


def run_extreme(loss_type: str):
    """Log-ratios of +-50 through every existing loss type (the reference of test_losses_grpo)."""

    def run(dtype):
        batch = policy_batch(seed=10)
        m = batch["mask"]
        old, adv = _inputs(batch, dtype, "old", "adv")
        x, xr = leaf(batch["logps"], dtype)
        out = grpo_loss(with_garbage(x, m), old, adv, m, loss_type=loss_type, max_completion_length=17)
        ref_loss, ref_tok = ref_grpo(xr, old.double(), adv.double(), m, loss_type=loss_type, max_len=17)
        return value_and_grads(f"+-50 {loss_type}", out.loss, out.losses, ref_loss, ref_tok, x, xr)

    return run


# ------------------------------------------------------------------------------------------
# tests (float64); the error table runs the same runners in float32 too


@pytest.mark.parametrize("loss", ["grpo", "ppo", "rloo"])
def test_dual_clip_vs_float64(loss):
    pairs = run_dual_clip(loss)(F64)
    check_pairs(pairs, **TIGHT)


def test_dual_clip_bounds_the_loss_and_stops_the_gradient():
    """A ratio of e^50 on a negative-advantage token: the loss is exactly -c A and its gradient 0."""
    lp = torch.zeros(1, 3, dtype=F64, requires_grad=True)
    old = torch.tensor([[-50.0, 0.0, 50.0]], dtype=F64)
    out = grpo_loss(
        lp, old, torch.tensor([-2.0], dtype=F64), torch.ones(1, 3, dtype=torch.bool), clip_ratio_c=3.0
    )
    (g,) = torch.autograd.grad(out.losses.sum(), lp)
    assert out.losses[0, 0].item() == 6.0 and g[0, 0].item() == 0.0
    assert out.metrics["clip_ratio/dual_mean"].item() == pytest.approx(1 / 3)


def test_ppo_low_high_clip_vs_float64():
    check_pairs(run_ppo_low_high(F64), **TIGHT)


def test_cispo_bounds_vs_float64():
    check_pairs(run_cispo_bounds(F64), **TIGHT)


@pytest.mark.parametrize("ratio", [1.0, 0.1])
def test_clip_cov_vs_float64(ratio):
    check_pairs(run_clip_cov(ratio)(F64), **TIGHT)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_kl_cov_vs_float64(level):
    check_pairs(run_kl_cov(level)(F64), **TIGHT)


@pytest.mark.parametrize("loss", ["grpo", "ppo"])
@pytest.mark.parametrize("case", list(KL_CASES))
def test_kl_estimators_in_losses_vs_float64(loss, case):
    check_pairs(run_kl_estimator(loss, case)(F64), **TIGHT)


@pytest.mark.parametrize("counts", [False, True], ids=["micro", "global"])
@pytest.mark.parametrize("over", ["all", "nonempty"])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("loss", ["grpo", "ppo", "gmpo", "rloo"])
def test_loss_agg_modes_vs_float64(loss, mode, over, counts):
    check_pairs(run_agg(loss, mode, over, counts)(F64), **TIGHT)


@pytest.mark.parametrize("loss", ["grpo", "ppo"])
@pytest.mark.parametrize("case", list(ROLLOUT_CASES))
def test_rollout_correction_in_losses_vs_float64(loss, case):
    check_pairs(run_rollout(loss, case)(F64), **TIGHT)


@pytest.mark.parametrize("loss_type", EXTREME_TYPES)
def test_extreme_log_ratios_vs_float64(loss_type):
    check_pairs(run_extreme(loss_type)(F64), atol=1e-9, rtol=1e-10)


def test_policy_variant_bad_input_raises():
    batch = policy_batch(seed=11)
    lp, old, adv, m = batch["logps"], batch["old"], batch["adv"], batch["mask"]
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        grpo_loss(lp, old, adv, m, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="dual-clip"):
        grpo_loss(lp, old, adv, m, loss_type="sapo", clip_ratio_c=3.0)
    with pytest.raises(ValueError, match="read by loss_type='cispo' only"):
        grpo_loss(lp, old, adv, m, loss_type="dapo", cispo=CISPOOptions(weight_min=0.5))
    with pytest.raises(TypeError, match="KLCovOptions"):
        grpo_loss(lp, old, adv, m, loss_type="kl_cov", kl_cov=ClipCovOptions())
    with pytest.raises(ValueError, match="'token-mean'"):
        ppo_loss(lp, old, adv, m, loss_agg_mode="token-sum")
    with pytest.raises(ValueError, match="'all', 'nonempty'"):
        gmpo_loss(lp, old, adv, m, seq_mean_over="some")
    with pytest.raises(ValueError, match="max_completion_length"):
        rloo_loss(lp, None, adv, m, loss_agg_mode="seq-mean-token-sum-norm", max_completion_length=0)
    with pytest.raises(ValueError, match="'low_var_kl'"):
        grpo_loss(lp, old, adv, m, ref_logps=batch["ref"], beta=0.1, kl_estimator="k4")
    with pytest.raises(ValueError, match="sampling_logps"):
        grpo_loss(lp, old, adv, m, rollout_correction=RolloutCorrection())
    with pytest.raises(ValueError, match="not both"):
        ppo_loss(
            lp,
            old,
            adv,
            m,
            sampling_logps=old,
            rollout_correction=RolloutCorrection(),
            importance_sampling_ratio=torch.ones(B, 1),
        )
    with pytest.raises(ValueError, match="weight_min <= weight_max"):
        CISPOOptions(weight_min=2.0, weight_max=1.0)
    with pytest.raises(ValueError, match="ratio"):
        ClipCovOptions(ratio=0.0)
    with pytest.raises(ValueError, match="lower < upper"):
        ClipCovOptions(lower=2.0, upper=1.0)
    with pytest.raises(ValueError, match="high clip range"):
        ppo_loss(lp, old, adv, m, cliprange_high=-0.1)


def test_all_masked_batch_with_new_options_is_a_finite_zero():
    """An all-empty batch under every aggregation mode and the new loss types: loss 0, gradient 0."""
    batch = policy_batch(seed=12)
    m = torch.zeros(B, T, dtype=torch.bool)
    x = with_garbage(batch["logps"], m).requires_grad_()
    old, adv = with_garbage(batch["old"], m), batch["adv"]
    outs = [grpo_loss(x, old, adv, m, loss_type=lt) for lt in ("clip_cov", "kl_cov")]
    outs += [grpo_loss(x, old, adv, m, loss_agg_mode=mode, seq_mean_over="nonempty") for mode in AGG_MODES]
    outs += [gmpo_loss(x, old, adv, m, loss_agg_mode=mode) for mode in AGG_MODES]
    outs.append(
        ppo_loss(
            x,
            old,
            adv,
            m,
            sampling_logps=old,
            rollout_correction=RolloutCorrection(rs_level="geometric", rs_threshold=2.0),
        )
    )
    for out in outs:
        (g,) = torch.autograd.grad(out.loss, x)
        assert out.loss.item() == 0.0 and torch.isfinite(g).all() and (g == 0).all()
