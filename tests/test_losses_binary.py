"""Binary / unpaired feedback losses: KTO (Ethayarajh et al. 2024, arXiv:2402.01306), BCO (Jung et
al. 2024, arXiv:2404.04656), DRO (Richemond et al. 2024, arXiv:2405.19107).

float64 references written from the papers' formulas below; KTO is also run against TRL 1.16's
``KTOTrainer._compute_loss`` on the same per-token log-probs (a stub "model" returns them; the
trainer instance is built without ``__init__`` and carries only the fields the method reads).
TRL 1.16 has no BCO trainer, so BCO is checked against the float64 reference only.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from types import SimpleNamespace as NS

import pytest
import torch
import torch.nn.functional as F
from _assert import assert_close
from _inputs import F64, check_losses, generator, unpaired_logps
from _policy_refs import check_pairs, leaf, value_and_grads

from alignops.losses import RewardRunningMean, VanillaKTOOptions, bco_loss, dro_loss, kto_loss, udm_weights

# ---------------------------------------------------------------------------------------------
# float64 references


def ref_kto(pw, pl, rw, rl, pk, rk, *, beta, wd, wu, kind):
    uw, ul = pw - rw.detach(), pl - rl.detach()  # reference log-probs are constants
    if kind == "kto":
        z0 = torch.clamp((pk - rk).mean(), min=0).detach()
        cw = 1 - torch.sigmoid(beta * (uw - z0))
        cl = 1 - torch.sigmoid(beta * (z0 - ul))
    else:
        cw = 1 - torch.sigmoid(beta * uw)
        cl = torch.sigmoid(beta * ul)
    return torch.cat((wd * cw, wu * cl))


def ref_bco(pw, pl, rw, rl, *, beta, delta, omega=None):
    cw = -F.logsigmoid(beta * (pw - rw.detach()) - delta)
    cl = -F.logsigmoid(-(beta * (pl - rl.detach()) - delta))
    if omega is not None:
        cl = cl * omega
    return torch.cat((cw, cl))


def ref_dro(s, sref, r, v, *, tau):
    u = s - sref
    pol = -s * (r - v).detach() + tau / 2 * u**2
    val = 0.5 * (r - v - tau * u.detach()) ** 2
    return pol + val


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,beta,wd,wu,nd,nu",
    [
        ("kto", 0.1, 1.0, 1.0, 7, 5),
        ("kto", 0.5, 1.33, 0.8, 3, 9),
        ("kto", 0.1, 1.0, 1.0, 6, 0),  # batch without undesirable rows
        ("kto", 0.1, 1.0, 1.0, 0, 6),  # batch without desirable rows
        ("apo_zero_unpaired", 0.2, 1.0, 2.0, 7, 5),
    ],
)
def test_kto_matches_reference(kind, beta, wd, wu, nd, nu):
    pw, pl, rw, rl = unpaired_logps(nd, nu)
    pk, _, rk, _ = unpaired_logps(nd + nu, 1, seed=1, scale=10.0)
    out = check_losses(
        "kto",
        lambda a, b, c, d, e, f: kto_loss(
            a,
            b,
            c,
            d,
            policy_kl_logps=e,
            ref_kl_logps=f,
            beta=beta,
            desirable_weight=wd,
            undesirable_weight=wu,
            loss_type=kind,
        ),
        lambda *x: ref_kto(*x, beta=beta, wd=wd, wu=wu, kind=kind),
        [pw, pl, rw, rl, pk, rk],
        atol=1e-6,
        gatol=1e-7,
    )
    z0 = torch.clamp((pk - rk).mean(), min=0) if kind == "kto" else torch.zeros((), dtype=F64)
    assert_close("kto/kl", z0, out.metrics["kl"], atol=1e-5, rtol=1e-6)
    if nd:
        assert_close(
            "kto/rewards/chosen",
            (beta * (pw - rw)).mean(),
            out.metrics["rewards/chosen"],
            atol=1e-5,
            rtol=1e-5,
        )
    else:
        assert "rewards/chosen" not in out.metrics and "rewards/margins" not in out.metrics
    if nd and nu:
        margin = (beta * (pw - rw)).mean() - (beta * (pl - rl)).mean()
        assert_close("kto/rewards/margins", margin, out.metrics["rewards/margins"], atol=1e-5, rtol=1e-5)


def ref_vanilla_kto(pw, pl, rw, rl, *, beta, detach):
    """OpenRLHF's ``VanillaKTOLoss``: each side against the other side's mean log-ratio, clamped at 0."""
    uw, ul = pw - rw, pl - rl
    kl_w = torch.clamp(uw.mean(), min=0) if uw.numel() else torch.zeros((), dtype=F64)
    kl_l = torch.clamp(ul.mean(), min=0) if ul.numel() else torch.zeros((), dtype=F64)
    if detach:
        kl_w, kl_l = kl_w.detach(), kl_l.detach()
    return torch.cat((1 - torch.sigmoid(beta * (uw - kl_l)), 1 - torch.sigmoid(beta * (kl_w - ul))))


def run_vanilla_kto(detach: bool, nd: int = 7, nu: int = 5):
    """Values and gradients w.r.t. both policy sides (one leaf, split) against the float64 formula."""

    def run(dtype):
        pw, pl, rw, rl = unpaired_logps(nd, nu, seed=4, scale=6.0)
        rl = rl - 4.0  # the undesirable side's mean log-ratio is > 0: its reference point acts
        x, xr = leaf(torch.cat((pw, pl)), dtype)
        opts = VanillaKTOOptions(detach_reference_point=detach)
        out = kto_loss(
            x[:nd], x[nd:], rw.to(dtype), rl.to(dtype), loss_type="vanilla", beta=0.3, vanilla=opts
        )
        want = ref_vanilla_kto(
            xr[:nd], xr[nd:], rw.to(dtype).double(), rl.to(dtype).double(), beta=0.3, detach=detach
        )
        return value_and_grads(f"vanilla kto detach={detach}", out.loss, out.losses, want.mean(), want, x, xr)

    return run


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("nd,nu", [(7, 5), (6, 0)])
def test_kto_vanilla_vs_float64(detach, nd, nu):
    check_pairs(run_vanilla_kto(detach, nd, nu)(F64), atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="loss_type='vanilla' only"):
        kto_loss(*unpaired_logps(3, 3), kl=0.0, vanilla=VanillaKTOOptions())


def test_kto_given_kl_is_clamped_and_matches_kl_logps():
    pw, pl, rw, rl = unpaired_logps(7, 5)
    pk, _, rk, _ = unpaired_logps(12, 1, seed=4)
    a = kto_loss(pw, pl, rw, rl, policy_kl_logps=pk, ref_kl_logps=rk)
    b = kto_loss(pw, pl, rw, rl, kl=(pk - rk).mean())
    assert_close("kto/kl-equivalence", a.losses, b.losses, atol=1e-7)
    neg = kto_loss(pw, pl, rw, rl, kl=-3.0)  # z0 = clamp_min(kl, 0) = 0
    zero = ref_kto(
        pw, pl, rw, rl, torch.zeros(1, dtype=F64), torch.zeros(1, dtype=F64), beta=0.1, wd=1, wu=1, kind="kto"
    )
    assert_close("kto/negative-kl", zero, neg.losses, atol=1e-6, rtol=1e-6)
    empty = kto_loss(pw[:0], pl[:0], rw[:0], rl[:0], kl=0.0)
    assert empty.loss.item() == 0.0 and empty.losses.numel() == 0


@pytest.mark.parametrize("form", ["float64-tensor", "python-float"])
def test_kto_given_kl_is_exact_in_float64(form):
    """Issue 8: ``kto_loss(kl=...)`` rounded ``kl`` through float32 even for float64 log-probs (the loss
    was off by ~2e-10 here). Float64 inputs must give the float64 formula to the last bit."""
    pw, pl, rw, rl = unpaired_logps(7, 5, seed=12)
    z0 = 1.2345678901234567  # not a float32 number (float32 rounds it by ~2e-8)
    kl = torch.tensor(z0, dtype=F64) if form == "float64-tensor" else z0
    out = kto_loss(pw, pl, rw, rl, kl=kl, beta=0.1)
    want = torch.cat((torch.sigmoid(-0.1 * ((pw - rw) - z0)), torch.sigmoid(-0.1 * (z0 - (pl - rl)))))
    assert out.losses.dtype == F64
    assert_close("kto/kl-float64", want, out.losses, atol=1e-15, rtol=0)
    assert out.metrics["kl"].dtype == F64 and out.metrics["kl"].item() == z0


def test_kto_matches_trl():
    """TRL 1.16 ``KTOTrainer._compute_loss`` (KL rows + precomputed reference log-probs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl import KTOTrainer
    g = torch.Generator().manual_seed(3)
    b, t = 9, 8
    labels = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.bool)
    comp = (torch.rand(b, t, generator=g) > 0.3).long()
    kl_comp = (torch.rand(b, t, generator=g) > 0.3).long()
    tok = (-3 * torch.rand(b, t - 1, generator=g)).requires_grad_(True)
    kl_tok = -3 * torch.rand(b, t - 1, generator=g)
    ref_logps = (tok.detach() * comp[:, 1:]).sum(-1) + 2 * torch.randn(b, generator=g)
    ref_kl = (kl_tok * kl_comp[:, 1:]).sum(-1) + torch.randn(b, generator=g)
    ids = torch.randint(0, 50, (b, t), generator=g)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones(b, t, dtype=torch.long),
        "completion_mask": comp,
        "KL_input_ids": ids + 1000,
        "KL_attention_mask": torch.ones(b, t, dtype=torch.long),
        "KL_completion_mask": kl_comp,
        "label": labels,
        "ref_logps": ref_logps,
        "ref_KL_logps": ref_kl,
    }

    def model(**kw):
        kl_call = bool(kw["input_ids"][0, 0] >= 1000)
        lp = kl_tok * kl_comp[:, 1:] if kl_call else tok * comp[:, 1:]
        return NS(log_probs=lp, entropy=torch.zeros(b, t - 1), mean_logits=torch.zeros(b, t - 1))

    model.training = True
    for kind in ("kto", "apo_zero_unpaired"):
        trainer = object.__new__(KTOTrainer)
        acc = NS(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
        for k, v in dict(
            model=model,
            accelerator=acc,
            precompute_ref_logps=True,
            calculate_KL=kind == "kto",
            aux_loss_enabled=False,
            loss_type=kind,
            beta=0.3,
            desirable_weight=1.2,
            undesirable_weight=0.9,
            _metrics={"train": defaultdict(list)},
            _total_train_tokens=0,
            _tp_size=1,
        ).items():
            setattr(trainer, k, v)
        trl_loss = trainer._compute_loss(model, batch, False)

        s = (tok * comp[:, 1:]).sum(-1)
        s_kl = (kl_tok * kl_comp[:, 1:]).sum(-1)
        out = kto_loss(
            s[labels],
            s[~labels],
            ref_logps[labels],
            ref_logps[~labels],
            policy_kl_logps=s_kl if kind == "kto" else None,
            ref_kl_logps=ref_kl if kind == "kto" else None,
            beta=0.3,
            desirable_weight=1.2,
            undesirable_weight=0.9,
            loss_type=kind,
        )
        assert_close(f"kto-vs-trl[{kind}]/loss", trl_loss.detach(), out.loss, atol=1e-6, rtol=1e-6)
        m = trainer._metrics["train"]
        for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
            assert_close(
                f"kto-vs-trl[{kind}]/{key}", torch.tensor(m[key][-1]), out.metrics[key], atol=1e-5, rtol=1e-5
            )
        up = torch.randn(())
        (g_trl,) = torch.autograd.grad(trl_loss * up, tok)
        (g_ours,) = torch.autograd.grad(out.loss * up, tok)
        assert_close(f"kto-vs-trl[{kind}]/grad", g_trl, g_ours, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("with_udm", [False, True])
def test_bco_matches_reference(with_udm):
    pw, pl, rw, rl = unpaired_logps(8, 6, seed=5)
    omega = udm_weights(torch.rand(6, dtype=F64)) if with_udm else None
    out = check_losses(
        "bco",
        lambda *x: bco_loss(*x, beta=0.2, delta=0.7, rejected_weights=omega),
        lambda *x: ref_bco(*x, beta=0.2, delta=0.7, omega=omega),
        [pw, pl, rw, rl],
    )
    assert_close("bco/delta", torch.tensor(0.7, dtype=F64), out.metrics["delta"], atol=1e-7)


def test_bco_running_mean_is_updated_before_the_loss():
    """δ = mean of every reward seen so far, this batch included (TRL updates before the loss)."""
    running = RewardRunningMean()
    seen = []
    for step in range(3):
        pw, pl, rw, rl = unpaired_logps(4 + step, 3, seed=10 + step)
        out = bco_loss(pw.float(), pl.float(), rw.float(), rl.float(), beta=0.1, delta=running)
        seen.append(torch.cat((0.1 * (pw - rw), 0.1 * (pl - rl))))
        delta = torch.cat(seen).mean()
        assert_close(f"bco/delta-step{step}", delta, out.metrics["delta"], atol=1e-6, rtol=1e-6)
        want = ref_bco(pw, pl, rw, rl, beta=0.1, delta=delta)
        assert_close(f"bco/losses-step{step}", want, out.losses, atol=1e-5, rtol=1e-5)


def test_udm_weights_clamp():
    p = torch.tensor([0.0, 0.2, 0.5, 0.9, 0.99], dtype=F64)
    want = (p / (1 - p + 1e-8)).clamp(0.5, 10.0)
    assert_close("udm", want, udm_weights(p), atol=1e-12)


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_dro_matches_reference_and_joint_objective_gradient(tau):
    g = generator(6)
    b = 11
    s = -10 * torch.rand(b, generator=g, dtype=F64)
    sref = s + torch.randn(b, generator=g, dtype=F64)
    r = torch.randn(b, generator=g, dtype=F64).sign()
    v = 0.5 * torch.randn(b, generator=g, dtype=F64)
    check_losses(
        "dro",
        lambda *x: dro_loss(*x, tau=tau),
        lambda a, b, c, d: ref_dro(a, b.detach(), c, d, tau=tau),
        [s, sref, r, v],
    )
    # the policy term's θ-gradient is ∇_θ ½ (r - V - τ u)² / τ; the value term's V-gradient is ∇_V of it.
    x = s.clone().requires_grad_(True)
    vv = v.clone().requires_grad_(True)
    joint = 0.5 * (r - vv - tau * (x - sref)) ** 2
    gx, gv = torch.autograd.grad(joint.sum(), (x, vv))
    x2 = s.clone().requires_grad_(True)
    v2 = v.clone().requires_grad_(True)
    ox, ov = torch.autograd.grad(dro_loss(x2, sref, r, v2, tau=tau).losses.sum(), (x2, v2))
    assert_close("dro/policy-grad", gx / tau, ox, atol=1e-10, rtol=1e-10)
    assert_close("dro/value-grad", gv, ov, atol=1e-10, rtol=1e-10)


def test_dro_without_values_uses_batch_mean_baseline():
    s = torch.tensor([-3.0, -5.0, -1.0], dtype=F64, requires_grad=True)
    r = torch.tensor([1.0, -1.0, 1.0], dtype=F64)
    out = dro_loss(s, s.detach() + 0.5, r)
    want = -s * (r - r.mean()) + 0.5 * (0.5) ** 2
    assert_close("dro/no-values", want, out.losses, atol=1e-12)


def test_extreme_margins_and_bf16():
    big = torch.tensor([-1e4, -1.0, -5e3, -2.0])
    small = torch.tensor([-1.0, -1e4, -2.0, -5e3])
    for fn in (
        lambda a, b, c, d: kto_loss(a, b, c, d, kl=5.0),
        lambda a, b, c, d: kto_loss(a, b, c, d, loss_type="apo_zero_unpaired"),
        lambda a, b, c, d: bco_loss(a, b, c, d, delta=3.0),
        lambda a, b, c, d: dro_loss(a, c, torch.ones(4), b / 10),
    ):
        xs = [big.clone().requires_grad_(True), small.clone().requires_grad_(True), small, big]
        out = fn(*xs)
        grads = torch.autograd.grad((out.losses * torch.randn(out.losses.shape)).sum(), xs[:2])
        assert torch.isfinite(out.losses).all() and all(torch.isfinite(g).all() for g in grads)
    # bf16 inputs: fp32 arithmetic on the bf16-rounded values, bf16 gradients
    pw, pl, rw, rl = unpaired_logps(6, 5, seed=9, scale=5.0)
    out = check_losses(
        "bco-bf16",
        lambda *x: bco_loss(*x, beta=0.5, delta=0.1),
        lambda *x: ref_bco(*x, beta=0.5, delta=0.1),
        [pw, pl, rw, rl],
        dtype=torch.bfloat16,
        gatol=1e-3,
        grtol=8e-3,
    )
    assert out.losses.dtype == torch.float32


def test_bad_inputs_raise_clear_errors():
    pw, pl, rw, rl = unpaired_logps(7, 5)
    with pytest.raises(ValueError, match="batch size"):
        kto_loss(pw, pl, rw[:-1], rl, kl=0.0)
    with pytest.raises(ValueError, match="reference point"):
        kto_loss(pw, pl, rw, rl)
    with pytest.raises(ValueError, match="valid choices: 'kto', 'apo_zero_unpaired'"):
        kto_loss(pw, pl, rw, rl, kl=0.0, loss_type="bco")
    with pytest.raises(ValueError, match="NaN"):
        bco_loss(pw, pl * float("nan"), rw, rl)
    with pytest.raises(ValueError, match="batch size"):
        bco_loss(pw, pl, rw, rl, rejected_weights=torch.ones(2))
    with pytest.raises(ValueError, match="batch size"):
        dro_loss(pw, rw, torch.ones(3), torch.zeros(7))
