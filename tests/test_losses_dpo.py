"""DPO family against a float64 reference written in this file from the papers' formulas, literally
(``-log(sigmoid(x))``, ``exp``, ``max``; no stable rewrites), evaluated with torch float64 autograd at
moderate margins (extreme margins with mpmath: test_losses_dpo_numerics.py; TRL 1.16's own
``DPOTrainer``: test_losses_dpo_trl.py). Gradients use random upstream gradients; sizes are awkward
(B = 7, odd T). Every loss type is covered (test_every_type_is_covered)."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from _assert import assert_close
from _inputs import F64, check_metrics, generator, pair_logps

from alignops.losses import (
    DPO_LOSS_TYPES,
    DPOPOptions,
    GPOOptions,
    RDPOOptions,
    SLiCOptions,
    SPPOSoftOptions,
    dpo_loss,
)

B = 7  # odd batch of pairs

# ================================================================ float64 reference from the papers


class Torch64:
    """Number system for the reference: float64 torch tensors (elementwise over the batch)."""

    exp = staticmethod(torch.exp)
    log = staticmethod(torch.log)

    @staticmethod
    def sig(x):
        return 1.0 / (1.0 + torch.exp(-x))

    @staticmethod
    def relu(x):
        return torch.clamp(x, min=0.0)

    @staticmethod
    def at_least_1(n):
        return torch.clamp(n, min=1.0)


class MP:
    """The same formulas in mpmath scalars (for margins where float64 over/underflows)."""

    exp = staticmethod(mpmath.exp)
    log = staticmethod(mpmath.log)

    @staticmethod
    def sig(x):
        return 1 / (1 + mpmath.exp(-x))

    @staticmethod
    def relu(x):
        return max(mpmath.mpf(0), x)

    @staticmethod
    def at_least_1(n):
        return max(mpmath.mpf(1), n)


def _score(m, u, p):
    """f-DPO score s(u) = f'(e^u) (Wang et al. 2023, arXiv:2309.16240; TRL 1.16 α convention)."""
    f = p["f_divergence_type"]
    if f == "reverse_kl":
        return u
    if f == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - m.exp(-u)
    if f == "js_divergence":  # f'(t) = log(2t / (1 + t))
        t = m.exp(u)
        return m.log(2 * t / (1 + t))
    a = p["f_alpha_divergence_coef"]  # (t^(α-1) - 1) / (α - 1)
    if a == 1.0:
        return u
    return (m.exp((a - 1) * u) - 1) / (a - 1)


def _gpo_f(m, name, x):
    """GPO's convex functions (Tang et al. 2024)."""
    return {
        "logistic": lambda: m.log(1 + m.exp(-x)),
        "hinge": lambda: m.relu(1 - x),
        "squared": lambda: (x - 1) ** 2,
        "exponential": lambda: m.exp(-x),
        "truncated_quadratic": lambda: m.relu(1 - x) ** 2,
        "savage": lambda: 1 / (1 + m.exp(x)) ** 2,
    }[name]()


_PAIR_FORMULAS = {
    "sigmoid": lambda m, v: v.nll(v.x),
    "cdpo": lambda m, v: (1 - v.eps) * v.nll(v.x) + v.eps * v.nll(-v.x),
    "robust": lambda m, v: ((1 - v.eps) * v.nll(v.x) - v.eps * v.nll(-v.x)) / (1 - 2 * v.eps),
    "ipo": lambda m, v: (v.sw / m.at_least_1(v.nw) - v.sl / m.at_least_1(v.nl) - 1 / (2 * v.beta)) ** 2,
    "hinge": lambda m, v: m.relu(1 - v.x),
    "slic": lambda m, v: (
        m.relu(v.p["slic_delta"] - v.pc + v.pr) - v.p["slic_lambda"] * v.ex["sft_target_logps"]
    ),
    "gpo": lambda m, v: _gpo_f(m, v.p["gpo_function"], v.x),
    "dpop": lambda m, v: v.nll(v.beta * ((v.uw - v.ul) - v.p["dpop_lambda"] * m.relu(v.rc - v.pc))),
    "rdpo": lambda m, v: v.nll(v.x + v.p["rdpo_alpha"] * (v.nw - v.nl)),
    "sigmoid_norm": lambda m, v: v.nll(v.beta * (v.sw / m.at_least_1(v.nw) - v.sl / m.at_least_1(v.nl))),
    "exo_pair": lambda m, v: (
        m.sig(v.x) * (m.log(m.sig(v.x)) - math.log(1 - v.eps))
        + (1 - m.sig(v.x)) * (m.log(1 - m.sig(v.x)) - math.log(v.eps))
    ),
    "nca_pair": lambda m, v: (
        v.nll(v.beta * v.uw) - 0.5 * m.log(m.sig(-v.beta * v.uw)) - 0.5 * m.log(m.sig(-v.beta * v.ul))
    ),
    "bco_pair": lambda m, v: v.nll(v.beta * v.uw) + v.nll(-v.beta * v.ul),
    "apo_zero": lambda m, v: m.sig(-v.beta * v.uw) + m.sig(v.beta * v.ul),
    "apo_down": lambda m, v: m.sig(v.beta * v.uw) + m.sig(-v.beta * (v.uw - v.ul)),
    "sppo_hard": lambda m, v: (v.uw - 1 / (2 * v.beta)) ** 2 + (v.ul + 1 / (2 * v.beta)) ** 2,
    "sppo_soft": lambda m, v: (
        (v.uw - (v.ex["chosen_win_prob"] - 0.5) / v.beta) ** 2
        + (v.ul - (v.ex["rejected_win_prob"] - 0.5) / v.beta) ** 2
    ),
    "discopop": lambda m, v: (
        (1 - m.sig(v.x / v.p["discopop_tau"])) * m.log(1 + m.exp(-v.x))
        + m.sig(v.x / v.p["discopop_tau"]) * m.exp(-v.x)
    ),
}


class _Pair:
    """The named quantities of one pair (or a batch of pairs) in the number system ``m``."""

    def __init__(self, m, pc, pr, rc, rr, nw, nl, ex, p):
        self.pc, self.pr, self.rc, self.rr, self.nw, self.nl, self.ex, self.p = pc, pr, rc, rr, nw, nl, ex, p
        self.beta, self.eps = p["beta"], p["label_smoothing"]
        self.uw, self.ul = pc - rc, pr - rr
        self.sw, self.sl = _score(m, self.uw, p), _score(m, self.ul, p)
        self.x = self.beta * (self.sw - self.sl)
        self.nll = lambda z: -m.log(m.sig(z))  # -log σ(z), literally


def ref_pair(m, t, pc, pr, rc, rr, nw, nl, ex, p):
    """ℓ for one pair type, elementwise. `ex` holds per-pair extras."""
    return _PAIR_FORMULAS[t](m, _Pair(m, pc, pr, rc, rr, nw, nl, ex, p))


def ref_losses(types, weights, pc, pr, rc, rr, nw, nl, ex, p):
    """Per-pair Σ_k w_k ℓ_k (times the WPO weight) and the loss Σ_k w_k mean_b ℓ_k, float64 torch."""
    m = Torch64
    total, loss = None, 0.0
    for t, w in zip(types, weights):
        if t == "sft":
            ell = ex["chosen_nll"].expand(pc.shape[0]) if ex["chosen_nll"].dim() == 0 else ex["chosen_nll"]
        elif t in ("aot", "aot_unpaired"):
            if t == "aot":
                d = torch.sort(pc - pr).values - torch.sort(rc - rr).values
            else:
                d = torch.sort(pc - rc).values - torch.sort(pr - rr).values
            z = p["beta"] * d
            ell = -(1 - p["label_smoothing"]) * m.log(m.sig(z)) - p["label_smoothing"] * m.log(m.sig(-z))
        else:
            ell = ref_pair(m, t, pc, pr, rc, rr, nw, nl, ex, p)
        if "wpo_w" in ex:  # WPO (TRL 1.16): exp(w̄_w) · exp(w̄_l), no clamp
            ell = ell * torch.exp(ex["wpo_w"]) * torch.exp(ex["wpo_l"])
        total = w * ell if total is None else total + w * ell
        loss = loss + w * ell.mean()
    return total, loss


DEFAULTS = dict(
    beta=0.1,
    label_smoothing=0.0,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    discopop_tau=0.05,
    dpop_lambda=50.0,
    rdpo_alpha=0.01,
    slic_delta=1.0,
    slic_lambda=0.1,
    gpo_function="logistic",
)
# reference parameter -> (dpo_loss keyword, option object field)
_VARIANT_OPTIONS = {
    "dpop_lambda": ("dpop", DPOPOptions, "lam"),
    "rdpo_alpha": ("rdpo", RDPOOptions, "alpha"),
    "slic_delta": ("slic", SLiCOptions, "delta"),
    "slic_lambda": ("slic", SLiCOptions, "lam"),
    "gpo_function": ("gpo", GPOOptions, "function"),
}


def dpo_kwargs(opts: dict, extras: dict) -> dict:
    """The reference's flat parameters and per-pair extras as ``dpo_loss`` keywords (the variant
    options grouped in their option objects)."""
    kw, grouped = {}, {}
    for k, v in opts.items():
        if k in _VARIANT_OPTIONS:
            family, _, field = _VARIANT_OPTIONS[k]
            grouped.setdefault(family, {})[field] = v
        else:
            kw[k] = v
    if "sft_target_logps" in extras:
        grouped.setdefault("slic", {})["sft_target_logps"] = extras["sft_target_logps"]
    for family, fields in grouped.items():
        cls = next(c for f, c, _ in _VARIANT_OPTIONS.values() if f == family)
        kw[family] = cls(**fields)
    if "chosen_win_prob" in extras:
        kw["sppo_soft"] = SPPOSoftOptions(extras["chosen_win_prob"], extras["rejected_win_prob"])
    for k in ("chosen_lengths", "rejected_lengths", "chosen_nll"):
        if k in extras:
            kw[k] = extras[k]
    return kw


def extras(b=B, *, seed=1):
    g = generator(seed)
    return {
        "chosen_lengths": torch.randint(0, 25, (b,), generator=g),  # includes 0 (empty) sometimes
        "rejected_lengths": torch.randint(0, 25, (b,), generator=g),
        "chosen_nll": torch.rand((), generator=g) * 3,
        "sft_target_logps": -torch.rand(b, generator=g) * 30,
        "chosen_win_prob": torch.rand(b, generator=g),
        "rejected_win_prob": torch.rand(b, generator=g),
    }


def run_both(types, weights, opts, *, pc, pr, rc, rr, extras, wpo=None):
    """Our loss (float32 leaves) and the float64 reference; returns values and grads of Σ g·losses."""
    leaves = [pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)]
    ex_t = {
        k: v.clone().float().requires_grad_(k in ("chosen_nll", "sft_target_logps"))
        for k, v in extras.items()
    }
    ex_t["chosen_lengths"] = extras["chosen_lengths"]
    ex_t["rejected_lengths"] = extras["rejected_lengths"]
    kw = dpo_kwargs(opts, ex_t)
    if wpo is not None:
        kw.update(use_weighting=True, wpo_logw=wpo)
    out = dpo_loss(leaves[0], leaves[1], rc, rr, loss_type=types, loss_weights=weights, **kw)

    p = {**DEFAULTS, **opts}
    ref_leaves = [x.detach().double().requires_grad_(True) for x in leaves]
    ex_r = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in ex_t.items()}
    if wpo is not None:
        ex_r["wpo_w"], ex_r["wpo_l"] = wpo[0].double(), wpo[1].double()
    ref_l, ref_loss = ref_losses(
        types,
        weights or [1.0] * len(types),
        *ref_leaves,
        rc.double(),
        rr.double(),
        ex_r["chosen_lengths"],
        ex_r["rejected_lengths"],
        ex_r,
        p,
    )
    g = torch.randn(pc.shape[0], generator=generator(2))
    wrt = leaves + [ex_t[k] for k in ("chosen_nll", "sft_target_logps")]
    wrt_ref = ref_leaves + [ex_r[k] for k in ("chosen_nll", "sft_target_logps")]
    grads = torch.autograd.grad((out.losses * g).sum(), wrt, allow_unused=True)
    grads_ref = torch.autograd.grad((ref_l * g.double()).sum(), wrt_ref, allow_unused=True)
    return out, ref_l, ref_loss, grads, grads_ref


def check(out, ref_l, ref_loss, grads, grads_ref, *, rtol=2e-6):
    scale = max(1.0, ref_l.abs().max().item())
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert_close("loss", ref_loss, out.loss, atol=1e-6 * scale, rtol=rtol)
    assert_close("losses", ref_l, out.losses, atol=1e-6 * scale, rtol=rtol)
    assert_close("loss == mean(losses)", out.losses.double().mean(), out.loss, atol=1e-6 * scale)
    for name, gr, go in zip(
        ("d policy_chosen", "d policy_rejected", "d chosen_nll", "d sft_target"), grads_ref, grads
    ):
        if gr is None:
            assert go is None or bool((go == 0).all()), name
            continue
        gscale = max(1.0, gr.abs().max().item())
        assert_close(name, gr, go, atol=2e-6 * gscale, rtol=5e-5)


# every single type (beta_dpo has its own tests); options chosen so each term is non-trivial
SINGLE = [
    ("sigmoid", {}),
    ("cdpo", {"label_smoothing": 0.2}),
    ("robust", {"label_smoothing": 0.15}),
    ("ipo", {}),
    ("hinge", {"beta": 0.3}),
    ("slic", {"slic_delta": 4.0, "slic_lambda": 0.3}),
    ("dpop", {"dpop_lambda": 5.0}),
    ("rdpo", {"rdpo_alpha": 0.05}),
    ("sigmoid_norm", {"beta": 2.0}),
    ("sft", {}),
    ("exo_pair", {"label_smoothing": 1e-3}),
    ("nca_pair", {}),
    ("bco_pair", {}),
    ("aot", {"label_smoothing": 0.1}),
    ("aot_unpaired", {"label_smoothing": 0.0}),
    ("apo_zero", {}),
    ("apo_down", {}),
    ("sppo_hard", {}),
    ("sppo_soft", {}),
    ("discopop", {"beta": 0.2}),
] + [
    ("gpo", {"gpo_function": f, "beta": 0.2})
    for f in ("logistic", "hinge", "squared", "exponential", "truncated_quadratic", "savage")
]


def test_every_type_is_covered():
    covered = {t for t, _ in SINGLE} | {"beta_dpo"}  # beta_dpo: test_losses_dpo_numerics.py
    assert covered == set(DPO_LOSS_TYPES)


@pytest.mark.parametrize(
    "loss_type, opts", SINGLE, ids=[t + (f"-{o['gpo_function']}" if t == "gpo" else "") for t, o in SINGLE]
)
def test_single_type_vs_float64_reference(loss_type, opts):
    pc, pr, rc, rr = pair_logps(B, seed=3)
    check(*run_both([loss_type], None, opts, pc=pc, pr=pr, rc=rc, rr=rr, extras=extras()))


# f-DPO with every divergence on the types that allow it
F_CASES = [
    ("sigmoid", "forward_kl", 0.5),
    ("sigmoid", "js_divergence", 0.5),
    ("sigmoid", "alpha_divergence", 0.5),
    ("sigmoid", "alpha_divergence", 0.3),
    ("sigmoid", "alpha_divergence", 1.0),  # α → 1 is reverse KL
    ("ipo", "forward_kl", 0.5),
    ("sigmoid_norm", "js_divergence", 0.5),
    ("hinge", "alpha_divergence", 0.7),
    ("robust", "js_divergence", 0.5),
    ("exo_pair", "forward_kl", 0.5),
    ("discopop", "alpha_divergence", 0.5),
    ("cdpo", "forward_kl", 0.5),
    ("rdpo", "js_divergence", 0.5),
    ("gpo", "alpha_divergence", 0.25),
]


@pytest.mark.parametrize("loss_type, f, alpha", F_CASES, ids=[f"{t}-{f}-{a}" for t, f, a in F_CASES])
def test_f_divergence_vs_float64_reference(loss_type, f, alpha):
    opts = {"f_divergence_type": f, "f_alpha_divergence_coef": alpha, "beta": 0.5}
    if loss_type in ("robust", "exo_pair", "cdpo"):
        opts["label_smoothing"] = 0.05
    if loss_type == "gpo":
        opts["gpo_function"] = "savage"
    pc, pr, rc, rr = pair_logps(B, seed=4, scale=2.0)  # keeps e^{±u} moderate
    check(*run_both([loss_type], None, opts, pc=pc, pr=pr, rc=rc, rr=rr, extras=extras()))


@pytest.mark.parametrize(
    "types, weights, use_weighting",
    [
        pytest.param(["sigmoid", "sft"], [1.0, 0.7], False, id="rpo"),
        pytest.param(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], False, id="mpo"),
        pytest.param(["ipo", "nca_pair", "apo_down"], None, False, id="three-default-weights"),
        pytest.param(["sigmoid"], None, True, id="wpo-sigmoid"),
        pytest.param(["robust", "sft"], [1.0, 0.5], True, id="wpo-robust-sft"),
    ],
)
def test_combinations_and_wpo_vs_float64_reference(types, weights, use_weighting):
    pc, pr, rc, rr = pair_logps(B, seed=5)
    g = generator(6)
    wpo = (-torch.rand(B, generator=g) * 2, -torch.rand(B, generator=g) * 2) if use_weighting else None
    opts = {"label_smoothing": 0.1} if "robust" in types else {}
    check(*run_both(types, weights, opts, pc=pc, pr=pr, rc=rc, rr=rr, extras=extras(), wpo=wpo))


def test_sft_term_per_pair_nll():
    """A [B] chosen_nll is used per pair (e.g. Pang et al.'s length-normalised NLL)."""
    pc, pr, rc, rr = pair_logps(B, seed=7)
    ex = extras()
    ex["chosen_nll"] = torch.rand(B, generator=generator(8)) * 2
    check(*run_both(["sigmoid", "sft"], [1.0, 1.0], {}, pc=pc, pr=pr, rc=rc, rr=rr, extras=ex))


def test_python_float_nll_is_exact_in_float64():
    """A Python-float ``chosen_nll`` next to float64 log-probs is taken in float64 (no float32 step)."""
    pc, pr, rc, rr = (x.double() for x in pair_logps(B, seed=9))
    nll = 1.2345678901234567  # not a float32 number
    out = dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "sft"], chosen_nll=nll)
    beta_d = 0.1 * ((pc - rc) - (pr - rr))
    assert_close("sft float", -torch.log(torch.sigmoid(beta_d)) + nll, out.losses, atol=1e-14, rtol=1e-14)


def test_metrics_follow_trl_names():
    pc, pr, rc, rr = pair_logps(B, seed=10)
    beta = 0.25
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="dpop")
    rw, rl = beta * (pc.double() - rc.double()), beta * (pr.double() - rr.double())
    expect = {
        "rewards/chosen": rw.mean(),
        "rewards/rejected": rl.mean(),
        "rewards/margins": (rw - rl).mean(),
        "rewards/accuracies": (rw > rl).double().mean(),
        "logps/chosen": pc.double().mean(),
        "logps/rejected": pr.double().mean(),
    }
    assert set(out.metrics) == set(expect)
    check_metrics("dpo", expect, out.metrics)


def test_reference_logps_are_constants():
    """S_ref is detached (no grad through the reference), even if the caller's tensor has a graph."""
    pc, pr, rc, rr = pair_logps(B, seed=11)
    rc, rr = rc.clone().requires_grad_(True), rr.clone().requires_grad_(True)
    leaf = pc.clone().requires_grad_(True)
    ones = torch.ones(B)
    dpo_loss(
        leaf, pr, rc, rr, loss_type=["sigmoid", "ipo"], chosen_lengths=ones, rejected_lengths=ones
    ).loss.backward()
    assert rc.grad is None and rr.grad is None and leaf.grad is not None


def test_reference_free_slic():
    """SLiC-HF uses no reference model: refs may be None (S_ref ≡ 0)."""
    pc, pr, _, _ = pair_logps(B, seed=12)
    sft = -torch.rand(B, generator=generator(13)) * 20
    out = dpo_loss(pc, pr, None, None, loss_type="slic", slic=SLiCOptions(5.0, 0.2, sft))
    ref = torch.clamp(5.0 - pc.double() + pr.double(), min=0) - 0.2 * sft.double()
    assert_close("slic", ref.mean(), out.loss, atol=1e-5)
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        dpo_loss(pc, pr, None, None, loss_type="sigmoid")


def test_float64_inputs_stay_float64():
    pc, pr, rc, rr = (x.to(F64) for x in pair_logps(B, seed=14))
    out = dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "apo_down"])
    assert out.loss.dtype == F64 and all(v.dtype in (F64, torch.bool) for v in out.metrics.values())


def test_input_errors():
    pc, pr, rc, rr = pair_logps(B, seed=15)
    with pytest.raises(ValueError, match="NaN"):
        dpo_loss(pc.clone().index_fill_(0, torch.tensor([2]), float("nan")), pr, rc, rr)
    with pytest.raises(ValueError, match="batch size"):
        dpo_loss(pc, pr[:-1], rc, rr)
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        dpo_loss(pc[None], pr[None], rc[None], rr[None])
    with pytest.raises(ValueError, match="valid choices.*'sigmoid'"):
        dpo_loss(pc, pr, rc, rr, loss_type="sigmod")
    with pytest.raises(ValueError, match="loss_weights"):
        dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "sft"], loss_weights=[1.0], chosen_nll=1.0)
    for t, need in [
        ("ipo", "chosen_lengths"),
        ("sigmoid_norm", "chosen_lengths"),
        ("rdpo", "chosen_lengths"),
        ("sft", "chosen_nll"),
        ("sppo_soft", "SPPOSoftOptions"),
        ("slic", "sft_target_logps"),
        ("beta_dpo", "BetaDPOState"),
    ]:
        with pytest.raises(ValueError, match=need):
            dpo_loss(pc, pr, rc, rr, loss_type=t)
    with pytest.raises(ValueError, match="exo_pair"):
        dpo_loss(pc, pr, rc, rr, loss_type="exo_pair")  # TRL 1.16: ε = 0 is an error
    with pytest.raises(ValueError, match="0.5"):
        dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="only valid"):
        dpo_loss(pc, pr, rc, rr, loss_type="nca_pair", f_divergence_type="js_divergence")
    with pytest.raises(ValueError, match="valid choices"):
        dpo_loss(pc, pr, rc, rr, f_divergence_type="kl")
    with pytest.raises(ValueError, match="aot"):
        dpo_loss(pc, pr, rc, rr, loss_type="aot", use_weighting=True, wpo_logw=(pc, pr))
    with pytest.raises(ValueError, match="use_weighting=False"):
        dpo_loss(pc, pr, rc, rr, wpo_logw=(pc, pr))
    with pytest.raises(ValueError, match="wpo_logw"):
        dpo_loss(pc, pr, rc, rr, use_weighting=True)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)
    with pytest.raises(ValueError, match="GPOOptions.function"):
        dpo_loss(pc, pr, rc, rr, loss_type="gpo", gpo=GPOOptions("cubic"))
