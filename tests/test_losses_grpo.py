"""GRPO family (Shao et al. 2024, arXiv:2402.03300, and the TRL 1.16 variants) against a float64
reference written here from the formulas, sequence by sequence on the compacted valid tokens (no
masks-times-tensors arithmetic as in the library). TRL 1.16's own ``GRPOTrainer._compute_loss`` on
the same inputs: test_losses_grpo_trl.py. Sizes are deliberately awkward: B=7 completions, T=13
positions, with an empty completion, a full-length one and random lengths in between.
"""

from __future__ import annotations

import math

import pytest
import torch
from _assert import assert_close
from _inputs import token_logps, with_garbage

from alignops.losses import LossOutput, SAPOOptions, VESPOOptions, grpo_loss

B, T = 7, 13  # odd batch, odd length: no accidental alignment with any block size
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo"]
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
MAX_LEN = 17  # dr_grpo's max_completion_length, deliberately != T


def make_batch(*, b=B, t=T, spread=0.5, seed=0, holes=False):
    return token_logps(b, t, seed=seed, spread=spread, holes=holes)


# ------------------------------------------------------------------------------------------
# float64 reference (per sequence, compacted tokens)
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
    """Returns (loss, per-token loss matrix [B, T]) from the GRPO / GSPO / variant formulas."""
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
# GRPO family vs the float64 reference
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
def test_grpo_types_vs_float64_reference(loss_type, level):
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
def test_grpo_kl_beta_and_options_vs_float64_reference(loss_type, bias_kl):
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


@pytest.mark.parametrize(
    "loss_type, opts, ropts",
    [
        ("sapo", dict(sapo=SAPOOptions(0.7, 1.6)), dict(sapo=(0.7, 1.6))),
        ("vespo", dict(vespo=VESPOOptions(1.5, 2.5, 4.0, 1.0)), dict(vespo=(1.5, 2.5, 4.0, 1.0))),
    ],
)
def test_grpo_variant_options_vs_float64_reference(loss_type, opts, ropts):
    """The options only one loss type reads come grouped (SAPOOptions, VESPOOptions), not at TRL's
    defaults here."""
    batch = make_batch(seed=13, spread=0.7)
    out, ref_loss, ref_tok, g, gr = run_both(
        batch, opts=dict(loss_type=loss_type, **opts), ref_opts=dict(loss_type=loss_type, **ropts)
    )
    assert_close(f"{loss_type} options loss", ref_loss, out.loss, atol=1e-12, rtol=1e-10)
    assert_close(f"{loss_type} options per-token", ref_tok, out.losses.detach(), atol=1e-12, rtol=1e-10)
    assert_close(f"{loss_type} options dlogps", gr, g, atol=1e-12, rtol=1e-10)


def test_grpo_on_policy_when_old_is_none():
    """old_logps=None -> ratio 1 and gradient -A / N on every valid token."""
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
    unclipped gradient, clip metrics count them (TRL's clip_ratio metrics)."""
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
    """Gradient accumulation (transformers' ``num_items_in_batch``): two micro-batches with
    num_items / num_sequences of the whole batch sum to the full-batch loss (and gradient), whatever
    the split of tokens between them."""
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
