"""Tests for alignops.losses.rl: GRPO family, GMPO, RLOO, PPO / PPO-ptx (SPEC §4, §5, §3).

Two independent oracles:
* float64 references written here from the SPEC formulas, sequence by sequence on the compacted
  valid tokens (no masks-times-tensors arithmetic as in the library);
* TRL 1.16's own ``GRPOTrainer._compute_loss``, ``GMPOTrainer._compute_loss`` and
  ``RLOOTrainer._compute_loss``, called on a minimal stub ``self`` whose model forward returns our
  random per-token log-probs, on the same inputs.
Sizes are deliberately awkward: B=7 completions (not a power of two), T=13 positions, with an
empty completion, a full-length one and random lengths in between.
"""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from _assert import assert_close

from alignops.losses import gmpo_loss, grpo_loss, ppo_loss, rloo_loss
from alignops.losses._common import LossOutput

B, T = 7, 13  # odd batch, odd length: no accidental alignment with any block size
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo"]
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
MAX_LEN = 17  # dr_grpo's max_completion_length, deliberately != T


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------


def make_batch(*, b=B, t=T, spread=0.5, seed=0, holes=False):
    """Random per-token log-probs (float64) with lengths 0, t and random in between."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t, (b,), generator=g)
    lengths[0], lengths[1] = 0, t
    mask = torch.arange(t)[None, :] < lengths[:, None]
    if holes:  # a few unscored tokens inside completions (tool outputs)
        mask &= torch.rand(b, t, generator=g) > 0.2
    logps = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3 - 0.05
    old = logps + spread * torch.randn(b, t, generator=g, dtype=torch.float64)
    ref = logps + spread * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    ent = torch.rand(b, t, generator=g, dtype=torch.float64) * 4
    return dict(logps=logps, old=old, ref=ref, adv=adv, mask=mask, ent=ent, g=g)


def with_garbage(x, mask, value=float("nan")):
    """Fill unscored positions with NaN: a correct loss never reads them."""
    return torch.where(mask, x, torch.full_like(x, value))


# ------------------------------------------------------------------------------------------
# float64 reference from SPEC §5.3 (per sequence, compacted tokens)
# ------------------------------------------------------------------------------------------


def ref_grpo(
    logps,
    old,
    adv,
    mask,
    *,
    loss_type="dapo",
    level="token",
    ref=None,
    beta=0.0,
    eps=0.2,
    eps_high=None,
    delta=None,
    bias_kl=True,
    num_items=None,
    num_sequences=None,
    max_len=None,
    ent=None,
    ent_coef=0.0,
    top_q=1.0,
    opm_thr=None,
    sampling=None,
    is_ratio=None,
    sapo=(1.0, 1.05),
    vespo=(2.0, 3.0, 3.0, 2.0),
):
    """Returns (loss, per-token loss matrix [B, T]) from the formulas of SPEC §5.3-§5.4."""
    e_lo, e_hi = eps, (eps if eps_high is None else eps_high)
    b, t = logps.shape
    if top_q < 1.0:
        all_ent = torch.cat([ent[i][mask[i]] for i in range(b)])
        thr = torch.quantile(all_ent, 1 - top_q) if all_ent.numel() else None
    per_tok = torch.zeros(b, t, dtype=torch.float64)
    per_tok_rows = []
    seq_means, tot, n_tot, ent_sum, ent_n = [], 0.0, 0, 0.0, 0
    for i in range(b):
        idx = mask[i].nonzero().squeeze(-1)
        n = idx.numel()
        lp, o = logps[i, idx], old[i, idx]
        a = adv[i] if adv.dim() == 1 else adv[i, idx]
        if level == "token":
            w = torch.exp(lp - o)
        elif level == "sequence":
            w = torch.exp((lp - o).mean()) * torch.ones(n, dtype=torch.float64) if n else lp * 0
        else:  # sequence_token: value of the sequence ratio, gradient of each token
            s = (lp - o).mean().detach() if n else 0.0
            w = torch.exp(lp - lp.detach() + s)
        if loss_type in CLIPPED:
            wu = torch.clamp(w, max=delta) if delta is not None else w
            L = -torch.minimum(wu * a, torch.clamp(w, 1 - e_lo, 1 + e_hi) * a)
        elif loss_type == "cispo":
            L = -torch.clamp(w, max=e_hi).detach() * a * lp
        elif loss_type == "sapo":
            pos, neg = (torch.tensor(v, dtype=torch.float64) for v in sapo)
            tau = torch.where(torch.as_tensor(a) > 0, pos, neg)
            L = -(4 / tau) * torch.sigmoid(tau * (w - 1)) * a
        else:  # vespo: gamma weight of the clamped summed sequence log-ratio
            s = (lp - o).clamp(-20, 20).sum()
            if is_ratio is not None:
                s = s + torch.log(is_ratio[i, idx]).clamp(math.log(1e-8), 20).sum()
            lw = s.clamp(math.log(1e-8), 20).detach()
            kp, lp_, kn, ln = (torch.tensor(v, dtype=torch.float64) for v in vespo)
            k = torch.where(torch.as_tensor(a) >= 0, kp, kn)
            lam = torch.where(torch.as_tensor(a) >= 0, lp_, ln)
            phi = torch.exp(lam + k * lw - lam * torch.exp(lw))
            L = -phi * a * lp
        if opm_thr is not None:
            sp = (sampling if sampling is not None else old)[i, idx]
            drift = (sp - lp.detach()).mean() if n else torch.tensor(0.0, dtype=torch.float64)
            keep = (torch.as_tensor(a) >= 0) | (drift <= opm_thr)
            L = L * keep.double()
        keep_ent = torch.ones(n, dtype=torch.float64)
        if top_q < 1.0:
            keep_ent = (ent[i, idx] >= thr).double()
            L = L * keep_ent
        if is_ratio is not None and loss_type != "vespo":
            L = L * is_ratio[i, idx]
        if beta != 0.0:
            lr = ref[i, idx] - lp
            k3 = torch.exp(lr) - lr - 1
            if bias_kl:
                k3 = k3 * w
            L = L + beta * k3
        L = L * torch.ones(n, dtype=torch.float64)  # broadcast a per-sequence value to its tokens
        per_tok_rows.append((i, idx, L))
        seq_means.append(L.sum() / max(1, n))
        tot = tot + L.sum()
        n_tot += n
        if ent is not None:
            ent_sum = ent_sum + (ent[i, idx] * keep_ent).sum()
            ent_n += int(keep_ent.sum())
    n_seq = b if num_sequences is None else num_sequences
    if loss_type in ("grpo", "sapo"):
        loss = sum(seq_means) / n_seq
    elif loss_type == "dr_grpo":
        loss = tot / (n_seq * max_len)
    elif loss_type == "luspo":
        loss = tot / n_seq
    else:
        loss = tot / (max(1, n_tot) if num_items is None else num_items)
    if ent_coef:
        loss = loss - ent_coef * ent_sum / (max(1, ent_n) if num_items is None else num_items)
    per_tok = per_tok.clone()
    for i, idx, L in per_tok_rows:
        per_tok = per_tok.index_put((torch.full_like(idx, i), idx), L)
    return loss, per_tok


def run_both(batch, *, opts, ref_opts, garbage=True):
    """Our loss and the reference, values and gradients w.r.t. logps with a random upstream grad."""
    m = batch["mask"]
    x = batch["logps"].clone().requires_grad_()
    x_in = with_garbage(x, m) if garbage else x
    on_policy = batch.get("on_policy", False)
    out = grpo_loss(x_in, None if on_policy else batch["old"], batch["adv"], m, **opts)
    xr = batch["logps"].clone().requires_grad_()
    old_r = xr.detach() if on_policy else batch["old"]
    ref_loss, ref_tok = ref_grpo(xr, old_r, batch["adv"], m, **ref_opts)
    gu = torch.randn((), generator=batch["g"], dtype=torch.float64)
    (out.loss * gu).backward()
    (ref_loss * gu).backward()
    return out, ref_loss, ref_tok, x.grad, xr.grad


# ------------------------------------------------------------------------------------------
# GRPO family vs the float64 SPEC reference
# ------------------------------------------------------------------------------------------


# every loss type at every ratio level; VESPO is defined at token level only (its ValueError is
# tested in test_grpo_bad_input_raises)
TYPE_LEVELS = [
    pytest.param(lt, lv, id=f"{lt}-{lv}")
    for lt in LOSS_TYPES
    for lv in ("token", "sequence", "sequence_token")
    if lt != "vespo" or lv == "token"
]


@pytest.mark.parametrize("loss_type,level", TYPE_LEVELS)
def test_grpo_types_vs_spec_reference(loss_type, level):
    batch = make_batch(seed=LOSS_TYPES.index(loss_type) * 3 + len(level), holes=True)
    opts = dict(loss_type=loss_type, importance_sampling_level=level, max_completion_length=MAX_LEN)
    ropts = dict(loss_type=loss_type, level=level, max_len=MAX_LEN)
    out, ref_loss, ref_tok, g, gr = run_both(batch, opts=opts, ref_opts=ropts)
    assert isinstance(out, LossOutput)
    assert out.loss.dtype == torch.float64 and out.losses.shape == (B, T)
    assert_close(f"{loss_type}/{level} loss", ref_loss, out.loss, atol=1e-12, rtol=1e-10)
    assert_close(f"{loss_type}/{level} per-token", ref_tok, out.losses.detach(), atol=1e-12, rtol=1e-10)
    assert_close(f"{loss_type}/{level} dlogps", gr, g, atol=1e-12, rtol=1e-10)
    assert (g[~batch["mask"]] == 0).all()
    # the per-token losses are differentiable too: random [B, T] upstream gradient
    m = batch["mask"]
    x = batch["logps"].clone().requires_grad_()
    xr = batch["logps"].clone().requires_grad_()
    gu = torch.randn(B, T, generator=batch["g"], dtype=torch.float64)
    (tok,) = torch.autograd.grad(
        (grpo_loss(with_garbage(x, m), batch["old"], batch["adv"], m, **opts).losses * gu).sum(), x
    )
    (tok_r,) = torch.autograd.grad((ref_grpo(xr, batch["old"], batch["adv"], m, **ropts)[1] * gu).sum(), xr)
    assert_close(f"{loss_type}/{level} d(per-token)", tok_r, tok, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo", "vespo", "luspo"])
@pytest.mark.parametrize("bias_kl", [True, False])
def test_grpo_kl_beta_and_options_vs_spec_reference(loss_type, bias_kl):
    """k3 KL with beta, bias correction, epsilon_high, delta, entropy bonus + entropy mask,
    off-policy mask and a sampler importance ratio, all at once."""
    batch = make_batch(seed=11, spread=0.8)
    g = batch["g"]
    is_ratio = torch.exp(0.3 * torch.randn(B, T, generator=g, dtype=torch.float64))
    sampling = batch["old"] + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    common = dict(beta=0.07, eps_high=0.28, delta=1.6, ent_coef=0.013, top_q=0.6, opm_thr=0.05)
    opts = dict(
        loss_type=loss_type,
        ref_logps=batch["ref"],
        beta=0.07,
        epsilon_high=0.28,
        delta=1.6,
        use_bias_correction_kl=bias_kl,
        entropy=batch["ent"],
        entropy_coef=0.013,
        top_entropy_quantile=0.6,
        off_policy_mask_threshold=0.05,
        sampling_logps=sampling,
        importance_sampling_ratio=is_ratio,
    )
    ropts = dict(
        loss_type=loss_type,
        ref=batch["ref"],
        bias_kl=bias_kl,
        ent=batch["ent"],
        sampling=sampling,
        is_ratio=is_ratio,
        **common,
    )
    out, ref_loss, ref_tok, gx, gr = run_both(batch, opts=opts, ref_opts=ropts)
    assert_close(f"{loss_type} loss", ref_loss, out.loss, atol=1e-12, rtol=1e-10)
    assert_close(f"{loss_type} per-token", ref_tok, out.losses.detach(), atol=1e-12, rtol=1e-10)
    assert_close(f"{loss_type} dlogps", gr, gx, atol=1e-12, rtol=1e-10)


def test_grpo_on_policy_when_old_is_none():
    """old_logps=None -> ratio 1 and gradient -A / N on every valid token (SPEC §5.3)."""
    batch = make_batch(seed=3)
    batch["on_policy"] = True
    out, ref_loss, _, gx, gr = run_both(batch, opts=dict(loss_type="dapo"), ref_opts=dict(loss_type="dapo"))
    assert_close("on-policy loss", ref_loss, out.loss, atol=1e-12)
    assert_close("on-policy grad", gr, gx, atol=1e-12)
    n = batch["mask"].sum()
    expect = -(batch["adv"][:, None] * batch["mask"]).sum() / n
    assert_close("on-policy loss = -mean A", expect, out.loss.detach(), atol=1e-12)
    assert_close("ratio/mean", torch.tensor(1.0, dtype=torch.float64), out.metrics["ratio/mean"], atol=1e-12)


def test_grpo_zero_advantages_give_zero_loss_and_grad():
    batch = make_batch(seed=5, spread=2.0)
    batch["adv"] = torch.zeros(B, dtype=torch.float64)
    for lt in LOSS_TYPES:
        x = batch["logps"].clone().requires_grad_()
        out = grpo_loss(
            x, batch["old"], batch["adv"], batch["mask"], loss_type=lt, max_completion_length=MAX_LEN
        )
        out.loss.backward()
        assert out.loss.item() == 0.0, lt
        assert (x.grad == 0).all(), lt


def test_grpo_ratio_far_outside_clip_range():
    """d = +-6 (ratio 400 or 0.0025): clipped tokens get zero gradient, unclipped keep the
    unclipped gradient, clip metrics count them (SPEC §5.3 metrics)."""
    batch = make_batch(seed=9)
    m = batch["mask"]
    sign = torch.where(torch.rand(B, T, generator=batch["g"]) > 0.5, 1.0, -1.0).double()
    batch["old"] = batch["logps"] - 6.0 * sign
    out, ref_loss, _, gx, gr = run_both(batch, opts=dict(loss_type="bnpo"), ref_opts=dict(loss_type="bnpo"))
    assert_close("far loss", ref_loss, out.loss, atol=1e-9, rtol=1e-12)
    assert_close("far grad", gr, gx, atol=1e-9, rtol=1e-12)
    a = batch["adv"][:, None].expand(B, T)
    high = (sign > 0) & (a > 0) & m
    low = (sign < 0) & (a < 0) & m
    assert (gx[high | low] == 0).all()  # clipped branch is constant
    unclipped = m & ~(high | low)
    assert (gx[unclipped] != 0).all()  # the min picks the unclipped branch there
    n = m.sum().double()
    assert_close("high_mean", high.sum() / n, out.metrics["clip_ratio/high_mean"], atol=1e-12)
    assert_close("low_mean", low.sum() / n, out.metrics["clip_ratio/low_mean"], atol=1e-12)
    assert_close("region_mean", (high | low).sum() / n, out.metrics["clip_ratio/region_mean"], atol=1e-12)


def test_grpo_all_masked_batch_is_finite_zero():
    batch = make_batch(seed=2)
    m = torch.zeros(B, T, dtype=torch.bool)
    x = with_garbage(batch["logps"], m).requires_grad_()
    for lt in LOSS_TYPES:
        out = grpo_loss(
            x,
            with_garbage(batch["old"], m),
            batch["adv"],
            m,
            loss_type=lt,
            max_completion_length=MAX_LEN,
            ref_logps=with_garbage(batch["ref"], m),
            beta=0.1,
        )
        (g,) = torch.autograd.grad(out.loss, x)
        assert out.loss.item() == 0.0 and torch.isfinite(g).all() and (g == 0).all(), lt


def test_grpo_bf16_inputs():
    """bf16 log-probs: the loss is computed in float32 and equals the float64 reference on the
    same (bf16-rounded) values to float32 accuracy."""
    batch = make_batch(seed=21, spread=0.3)
    m = batch["mask"]
    lp16, old16, ref16 = (batch[k].bfloat16() for k in ("logps", "old", "ref"))
    x = lp16.clone().requires_grad_()
    out = grpo_loss(x, old16, batch["adv"].bfloat16(), m, ref_logps=ref16, beta=0.04, loss_type="grpo")
    assert out.loss.dtype == torch.float32
    xr = lp16.double().requires_grad_()
    ref_loss, _ = ref_grpo(
        xr,
        old16.double(),
        batch["adv"].bfloat16().double(),
        m,
        ref=ref16.double(),
        beta=0.04,
        loss_type="grpo",
    )
    gu = torch.randn((), generator=batch["g"], dtype=torch.float64)
    (out.loss * gu).backward()
    (ref_loss * gu).backward()
    assert x.grad.dtype == torch.bfloat16
    assert_close("bf16 loss", ref_loss, out.loss, atol=2e-6, rtol=2e-6)
    # the gradient is rounded to bf16 on its way out (8 mantissa bits)
    assert_close("bf16 grad", xr.grad, x.grad.double(), atol=1e-6, rtol=8e-3)


@pytest.mark.parametrize(
    "loss_type,unit",
    [
        ("dapo", "items"),
        ("bnpo", "items"),
        ("cispo", "items"),
        ("grpo", "seqs"),
        ("dr_grpo", "seqs"),
        ("luspo", "seqs"),
    ],
)
def test_grpo_global_normaliser_makes_accumulation_exact(loss_type, unit):
    """SPEC §3.3: two micro-batches with num_items / num_sequences of the whole batch sum to the
    full-batch loss (and gradient), whatever the split of tokens between them."""
    batch = make_batch(seed=17, b=10)
    m = batch["mask"]
    x = batch["logps"].clone().requires_grad_()
    kw = dict(loss_type=loss_type, max_completion_length=MAX_LEN, beta=0.05)
    full = grpo_loss(x, batch["old"], batch["adv"], m, ref_logps=batch["ref"], **kw).loss
    (g_full,) = torch.autograd.grad(full, x)
    norm = dict(num_items=m.sum()) if unit == "items" else dict(num_sequences=10)
    parts = [slice(0, 3), slice(3, 10)]  # unequal token counts
    total = sum(
        grpo_loss(x[s], batch["old"][s], batch["adv"][s], m[s], ref_logps=batch["ref"][s], **kw, **norm).loss
        for s in parts
    )
    (g_acc,) = torch.autograd.grad(total, x)
    assert_close("accumulated loss", full.detach(), total.detach(), atol=1e-12)
    assert_close("accumulated grad", g_full, g_acc, atol=1e-12)


def test_grpo_mask_truncated_equals_masking_rows():
    batch = make_batch(seed=4)
    m = batch["mask"]
    trunc = torch.tensor([False, True, False, True, False, False, True])
    a = grpo_loss(batch["logps"], batch["old"], batch["adv"], m, mask_truncated=trunc, loss_type="dapo")
    ref_loss, _ = ref_grpo(batch["logps"], batch["old"], batch["adv"], m & ~trunc[:, None], loss_type="dapo")
    assert_close("mask_truncated", ref_loss, a.loss, atol=1e-12)
    assert (a.losses[trunc] == 0).all()


def test_grpo_per_token_advantages():
    batch = make_batch(seed=8)
    adv_t = torch.randn(B, T, generator=batch["g"], dtype=torch.float64)
    batch["adv"] = adv_t
    out, ref_loss, _, gx, gr = run_both(batch, opts=dict(loss_type="sapo"), ref_opts=dict(loss_type="sapo"))
    assert_close("[B, T] advantages", ref_loss, out.loss, atol=1e-12)
    assert_close("[B, T] advantages grad", gr, gx, atol=1e-12)


def test_grpo_bad_input_raises():
    batch = make_batch()
    lp, old, adv, m = batch["logps"], batch["old"], batch["adv"], batch["mask"]
    with pytest.raises(ValueError, match="valid choices.*'dapo'"):
        grpo_loss(lp, old, adv, m, loss_type="dapo2")
    with pytest.raises(ValueError, match="gmpo_loss"):
        grpo_loss(lp, old, adv, m, loss_type="gmpo")
    with pytest.raises(ValueError, match="sequence_token"):
        grpo_loss(lp, old, adv, m, importance_sampling_level="seq")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(lp, old, adv, m, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(lp, old, adv, m, beta=0.1)
    with pytest.raises(ValueError, match="importance_sampling_level='token'"):
        grpo_loss(lp, old, adv, m, loss_type="vespo", importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="shape"):
        grpo_loss(lp, old[:, :-1], adv, m)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(lp, old, adv[:-1], m)
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(lp, old, adv, m, entropy_coef=0.1)


# ------------------------------------------------------------------------------------------
# GRPO vs TRL 1.16 GRPOTrainer._compute_loss on a stub self
# ------------------------------------------------------------------------------------------


class _Accelerator:
    """Single process: reductions and gathers are the identity."""

    num_processes = 1
    sync_gradients = True

    def reduce(self, t, reduction="sum"):
        return t

    def gather(self, t):
        return t

    gather_for_metrics = gather

    def pad_across_processes(self, t, dim=0, pad_index=0):
        return t


def _stub(trainer_cls, logps, entropy, **fields):
    s = types.SimpleNamespace(
        accelerator=_Accelerator(),
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


def _inputs(mask, **extra):
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
    from trl.trainer.grpo_trainer import GRPOTrainer

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
    loss = GRPOTrainer._compute_loss(s, None, _inputs(mask, num_items_in_batch=mask.sum(), **inputs))
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
# GMPO (SPEC §5.5)
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
def test_gmpo_vs_spec_reference_and_trl(opts):
    from trl.experimental.gmpo.gmpo_trainer import GMPOTrainer

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
        s, None, _inputs(m, old_per_token_logps=batch["old"], advantages=batch["adv"], **extra)
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
# RLOO (SPEC §5.6)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("old_form", ["seq", "token", "none"])
def test_rloo_loss_vs_spec_reference_and_trl(old_form):
    from trl.trainer.rloo_trainer import RLOOTrainer

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
    loss_trl = RLOOTrainer._compute_loss(s, None, _inputs(m, old_logps=seq_old, advantages=batch["adv"]))
    (loss_trl * gu).backward()
    assert_close("rloo loss vs TRL", loss_trl.detach(), out.loss.detach(), atol=1e-12)
    assert_close("rloo grad vs TRL", x_trl.grad, x.grad, atol=1e-12)
    for name, v in s._metrics["train"].items():
        assert_close(
            f"rloo metric {name}", torch.tensor(v[0], dtype=torch.float64), out.metrics[name], atol=1e-6
        )


# ------------------------------------------------------------------------------------------
# PPO / PPO-ptx (SPEC §5.1, §5.2)
# ------------------------------------------------------------------------------------------


def ref_ppo(
    lp,
    old,
    adv,
    m,
    *,
    values,
    old_values,
    returns,
    vm,
    clip=0.2,
    clip_v=0.2,
    vf_coef=0.1,
    ref=None,
    beta=0.0,
    kind="k1",
    ent=None,
    ent_coef=0.0,
    ptx=None,
    ptx_coef=0.0,
):
    """Flattened valid tokens, SPEC §5.2 step 4 formulas."""
    a = (adv[:, None].expand_as(lp) if adv.dim() == 1 else adv)[m]
    l, o = lp[m], old[m]
    rho = torch.exp(l - o)
    pg = torch.maximum(-a * rho, -a * rho.clamp(1 - clip, 1 + clip))
    loss = pg.mean() if pg.numel() else pg.sum()
    v, vo, r = values[vm], old_values[vm], returns[vm]
    vc = torch.maximum(torch.minimum(v, vo + clip_v), vo - clip_v)
    vf = 0.5 * torch.maximum((v - r) ** 2, (vc - r) ** 2).mean()
    loss = loss + vf_coef * vf
    if beta:
        logr = ref[m] - l
        k = {"k1": -logr, "k2": 0.5 * logr**2, "k3": torch.exp(logr) - 1 - logr}[kind]
        loss = loss + beta * k.mean()
    if ent_coef:
        loss = loss - ent_coef * ent[m].mean()
    if ptx_coef:
        loss = loss + ptx_coef * ptx
    tok = pg + beta * k if beta else pg
    return loss, dict(
        pg=pg, rho=rho, a=a, tok=tok, vf_clipfrac=((vc - r) ** 2 > (v - r) ** 2).double().mean()
    )


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_ppo_vs_spec_reference(kind):
    batch = make_batch(seed=61, spread=0.4)
    m, g = batch["mask"], batch["g"]
    vm = m.clone()
    lengths = m.sum(-1)
    for i in range(B):  # TRL's value mask covers one position past the response (padding_mask_p1)
        if 0 < lengths[i] < T:
            vm[i, lengths[i]] = True
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    old_values = values + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    returns = torch.randn(B, T, generator=g, dtype=torch.float64)
    x = batch["logps"].clone().requires_grad_()
    v = values.clone().requires_grad_()
    out = ppo_loss(
        with_garbage(x, m),
        batch["old"],
        adv,
        m,
        values=with_garbage(v, vm),
        old_values=old_values,
        returns=returns,
        value_mask=vm,
        ref_logps=batch["ref"],
        beta=0.03,
        kl_estimator=kind,
        entropy=batch["ent"],
        entropy_coef=0.01,
    )
    xr = batch["logps"].clone().requires_grad_()
    vr = values.clone().requires_grad_()
    ref_loss, parts = ref_ppo(
        xr,
        batch["old"],
        adv,
        m,
        values=vr,
        old_values=old_values,
        returns=returns,
        vm=vm,
        ref=batch["ref"],
        beta=0.03,
        kind=kind,
        ent=batch["ent"],
        ent_coef=0.01,
    )
    gu = torch.randn((), generator=g, dtype=torch.float64)
    (out.loss * gu).backward()
    (ref_loss * gu).backward()
    assert_close("ppo loss", ref_loss, out.loss, atol=1e-12)
    assert_close("ppo dlogps", xr.grad, x.grad, atol=1e-12)
    assert_close("ppo dvalues", vr.grad, v.grad, atol=1e-12)
    pg, rho, a = parts["pg"], parts["rho"], parts["a"]
    clipfrac = ((-a * rho.clamp(0.8, 1.2)) > (-a * rho)).double().mean()
    assert_close("policy/clipfrac_avg", clipfrac, out.metrics["policy/clipfrac_avg"], atol=1e-12)
    assert_close("val/clipfrac_avg", parts["vf_clipfrac"], out.metrics["val/clipfrac_avg"], atol=1e-12)
    approx = 0.5 * ((batch["logps"] - batch["old"])[m] ** 2).mean()
    assert_close("policy/approxkl_avg", approx, out.metrics["policy/approxkl_avg"], atol=1e-12)
    assert_close("val/ratio", rho.detach().mean(), out.metrics["val/ratio"], atol=1e-12)
    assert_close("loss/policy_avg", pg.detach().mean(), out.metrics["loss/policy_avg"], atol=1e-12)
    assert_close("per-token pg + beta kl", parts["tok"].detach(), out.losses.detach()[m], atol=1e-12)
    assert (out.losses[~m] == 0).all()


def test_ppo_ptx_from_hidden_and_precomputed():
    """PPO-ptx: gamma * pretraining NLL computed by alignops.linear_cross_entropy from a pretraining
    batch equals the full-logits float64 NLL, values and gradients w.r.t. hidden and weight."""
    batch = make_batch(seed=71)
    m, g = batch["mask"], batch["g"]
    M, H, V = 11, 6, 29
    # the fused engine takes bf16 / fp16 / fp32 hidden states; the reference runs in float64
    ph = torch.randn(M, H, generator=g).requires_grad_()
    W = (0.5 * torch.randn(V, H, generator=g)).requires_grad_()
    labels = torch.randint(0, V, (M,), generator=g)
    labels[[2, 7]] = -100
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    out = ppo_loss(
        batch["logps"], batch["old"], adv, m, ptx_hidden=ph, ptx_weight=W, ptx_labels=labels, ptx_coef=0.7
    )
    ph_r = ph.detach().double().requires_grad_()
    W_r = W.detach().double().requires_grad_()
    keep = labels != -100
    nll = -F.log_softmax(ph_r @ W_r.T, -1)[keep].gather(-1, labels[keep, None]).mean()
    ref_loss, _ = ref_ppo(
        batch["logps"],
        batch["old"],
        adv,
        m,
        values=batch["old"],
        old_values=batch["old"],
        returns=batch["old"],
        vm=m,
        vf_coef=0.0,
        ptx=nll,
        ptx_coef=0.7,
    )
    gu = torch.randn((), generator=g, dtype=torch.float64)
    (out.loss * gu).backward()
    (ref_loss * gu).backward()
    assert_close("ptx loss", ref_loss, out.loss, atol=1e-5, rtol=1e-5)
    assert_close("ptx metric", nll.detach(), out.metrics["loss/ptx"], atol=1e-5, rtol=1e-5)
    assert_close("ptx dhidden", ph_r.grad, ph.grad, atol=1e-5, rtol=1e-5)
    assert_close("ptx dweight", W_r.grad, W.grad, atol=1e-5, rtol=1e-5)
    pre = ppo_loss(batch["logps"], batch["old"], adv, m, ptx_nll=nll.detach(), ptx_coef=0.7)
    assert_close("ptx precomputed", ref_loss.detach(), pre.loss, atol=1e-12)


def test_ppo_num_items_accumulation_and_on_policy():
    batch = make_batch(seed=81, b=9)
    m, g = batch["mask"], batch["g"]
    adv = torch.randn(9, T, generator=g, dtype=torch.float64)
    values = torch.randn(9, T, generator=g, dtype=torch.float64)
    kw = dict(
        values=values,
        old_values=values + 0.5,
        returns=values - 0.2,
        ref_logps=batch["ref"],
        beta=0.1,
        entropy=batch["ent"],
        entropy_coef=0.02,
    )
    full = ppo_loss(batch["logps"], batch["old"], adv, m, **kw).loss
    acc = 0.0
    for s in (slice(0, 4), slice(4, 9)):
        part = {k: (v[s] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        acc = acc + ppo_loss(batch["logps"][s], batch["old"][s], adv[s], m[s], num_items=m.sum(), **part).loss
    assert_close("ppo accumulated", full, acc, atol=1e-12)
    on = ppo_loss(batch["logps"], None, adv, m)
    assert_close(
        "ppo on-policy ratio", torch.tensor(1.0, dtype=torch.float64), on.metrics["val/ratio"], atol=0
    )
    assert_close("ppo on-policy loss", -(adv * m).sum() / m.sum(), on.loss, atol=1e-12)


def test_ppo_bad_input_raises():
    batch = make_batch()
    lp, old, m = batch["logps"], batch["old"], batch["mask"]
    adv = torch.randn(B, dtype=torch.float64)
    with pytest.raises(ValueError, match="'k1', 'k2', 'k3'"):
        ppo_loss(lp, old, adv, m, kl_estimator="k4")
    with pytest.raises(ValueError, match="ptx_coef"):
        ppo_loss(lp, old, adv, m, ptx_nll=torch.tensor(1.0))
    with pytest.raises(ValueError, match="value loss"):
        ppo_loss(lp, old, adv, m, values=lp)
    with pytest.raises(ValueError, match="ref_logps"):
        ppo_loss(lp, old, adv, m, beta=0.1)
