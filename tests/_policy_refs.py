"""Float64 references for the RL catalog's variants, written from the papers' formulas and the
frameworks' documented behaviour, one sequence at a time on its compacted valid tokens (Python
loops, no mask-times-tensor arithmetic and no alignops helper), plus the runner plumbing the
variant tests and the error table share.

A *runner* ``run(dtype) -> list[(label, expected, got)]`` evaluates one option on inputs rounded
to ``dtype`` against its float64 reference on the same rounded values (values and gradients under
random upstream gradients); :func:`check_pairs` asserts a runner's pairs and :func:`max_error`
condenses them for the table.
"""

from __future__ import annotations

import math

import torch
from _assert import assert_close
from _inputs import F64, generator

# ------------------------------------------------------------------------------------------------
# runner plumbing


def check_pairs(pairs, *, atol: float, rtol: float) -> None:
    for label, want, got in pairs:
        assert_close(label, want, got, atol=atol, rtol=rtol)


def max_error(pairs) -> tuple[float, float]:
    """Largest ``|got - want|`` and largest ``|got - want| / max(1, |want|)`` over every pair."""
    worst_abs = worst_rel = 0.0
    for _, want, got in pairs:
        d = (got.detach().double() - want.detach().double()).abs()
        if d.numel():
            worst_abs = max(worst_abs, d.max().item())
            worst_rel = max(worst_rel, (d / want.detach().double().abs().clamp(min=1.0)).max().item())
    return worst_abs, worst_rel


def leaf(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` rounded to ``dtype`` (ours) and the same values in float64 (the reference), both leaves."""
    ours = x.detach().to(dtype).requires_grad_(True)
    return ours, ours.detach().to(F64).requires_grad_(True)


def value_and_grads(label, out_loss, out_losses, ref_loss, ref_losses, ours_x, ref_x, seed=0):
    """Pairs for the scalar loss, the per-token / per-row losses and the gradients w.r.t. ``ours_x``
    / ``ref_x`` under random upstream gradients on both outputs."""
    g = generator(seed)
    up = torch.randn(ref_losses.shape, generator=g, dtype=F64)
    up_loss = torch.randn((), generator=g, dtype=F64).item()
    (got,) = torch.autograd.grad(
        (out_losses * up.to(out_losses.dtype)).sum() + out_loss * up_loss, ours_x, allow_unused=True
    )
    (want,) = torch.autograd.grad((ref_losses * up).sum() + ref_loss * up_loss, ref_x, allow_unused=True)
    got = torch.zeros_like(ours_x) if got is None else got
    want = torch.zeros_like(ref_x) if want is None else want
    return [
        (f"{label} loss", ref_loss.detach(), out_loss.detach()),
        (f"{label} losses", ref_losses.detach(), out_losses.detach()),
        (f"{label} grad", want, got),
    ]


# ------------------------------------------------------------------------------------------------
# inputs


def policy_batch(b: int = 7, t: int = 13, *, seed: int = 0, extreme: bool = True):
    """Float64 ``[B, T]`` policy / sampler / reference / rollout log-probs, advantages ``[B]``,
    per-token advantages, entropies and a mask with an empty row (0), a full row (1), interior
    holes and right padding. ``extreme``: a quarter of the sampler log-probs sit 50 nats from the
    policy's (log-ratios of +-50)."""
    g = generator(seed)
    lengths = torch.randint(1, t, (b,), generator=g)
    lengths[0], lengths[1] = 0, t
    mask = torch.arange(t)[None, :] < lengths[:, None]
    mask &= ~((torch.rand(b, t, generator=g) < 0.15) & (torch.arange(t)[None, :] > 0))
    logps = -torch.rand(b, t, generator=g, dtype=F64) * 3 - 0.05
    old = logps + 0.4 * torch.randn(b, t, generator=g, dtype=F64)
    if extreme:
        far = torch.rand(b, t, generator=g) < 0.25
        sign = torch.where(torch.rand(b, t, generator=g) < 0.5, 1.0, -1.0).to(F64)
        old = torch.where(far, logps - 50.0 * sign, old)
    ref = logps + 0.5 * torch.randn(b, t, generator=g, dtype=F64)
    sampling = old + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    adv = torch.randn(b, generator=g, dtype=F64)
    adv_t = torch.randn(b, t, generator=g, dtype=F64)
    ent = torch.rand(b, t, generator=g, dtype=F64) * 4
    values = torch.randn(b, t, generator=g, dtype=F64)
    old_values = values + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    returns = torch.randn(b, t, generator=g, dtype=F64)
    return dict(
        logps=logps,
        old=old,
        ref=ref,
        sampling=sampling,
        adv=adv,
        adv_t=adv_t,
        ent=ent,
        mask=mask,
        values=values,
        old_values=old_values,
        returns=returns,
        g=g,
    )


def rows(mask: torch.Tensor) -> list[torch.Tensor]:
    """The valid positions of each row."""
    return [mask[i].nonzero().squeeze(-1) for i in range(mask.shape[0])]


# ------------------------------------------------------------------------------------------------
# KL estimators (Schulman 2020), with log r = ref - logp


def ref_kl(lp: torch.Tensor, ref: torch.Tensor, kind: str, *, clamp=None, estimate_clamp=None):
    kind = {"kl": "k1", "mse": "k2", "low_var_kl": "k3", "kl+": "k1+", "low_var_kl+": "k3+"}.get(kind, kind)
    lr = ref - lp
    if clamp is not None:
        lr = torch.clamp(lr, -clamp, clamp)
    forms = {
        "k1": lambda x: -x,
        "k2": lambda x: x * x / 2,
        "k3": lambda x: torch.exp(x) - 1 - x,
        "abs": lambda x: torch.abs(x),
    }
    value = forms[kind.rstrip("+")](lr)
    if estimate_clamp is not None:
        value = torch.clamp(value, -estimate_clamp, estimate_clamp)
    if kind.endswith("+"):
        k2 = lr * lr / 2
        return value.detach() + (k2 - k2.detach())  # value exactly, k2's gradient
    return value


# ------------------------------------------------------------------------------------------------
# aggregation (verl's loss_agg_mode)


def ref_aggregate(
    per_row, mode, *, t, over="all", num_items=None, num_sequences=None, horizon=None
) -> torch.Tensor:
    """``per_row``: one 1-D tensor of token losses per row (its valid tokens)."""
    total = sum(r.sum() for r in per_row)
    n = [r.numel() for r in per_row]
    if mode == "token-mean":
        return total / (num_items if num_items is not None else max(1, sum(n)))
    if num_sequences is not None:
        rows_ = num_sequences
    elif over == "all":
        rows_ = len(per_row)
    else:
        rows_ = max(1, sum(1 for k in n if k > 0))
    if mode == "seq-mean-token-sum":
        return total / rows_
    if mode == "seq-mean-token-mean":
        return sum(r.sum() / max(1, r.numel()) for r in per_row) / rows_
    assert mode == "seq-mean-token-sum-norm", mode
    return total / (rows_ * (horizon if horizon is not None else t))


def scatter_rows(per_row, idx, shape) -> torch.Tensor:
    """The per-row token losses back on a zero ``[B, T]`` matrix (differentiable)."""
    out = torch.zeros(shape, dtype=F64)
    for i, (ix, r) in enumerate(zip(idx, per_row)):
        out = out.index_put((torch.full_like(ix, i), ix), r * torch.ones(ix.numel(), dtype=F64))
    return out


# ------------------------------------------------------------------------------------------------
# policy surrogates


def ref_clip(w, a, *, low, high, delta=None, c=None):
    """PPO's clipped surrogate (Schulman et al. 2017) with INTELLECT-2's cap and dual-clip (Ye et
    al. 2020), token by token."""
    out = []
    for wt, at in zip(w.reshape(-1), a.reshape(-1).expand(w.numel())):
        wu = torch.clamp(wt, max=delta) if delta is not None else wt
        lt = torch.maximum(-wu * at, -torch.clamp(wt, 1 - low, 1 + high) * at)
        if c is not None and at < 0:
            lt = torch.minimum(lt, -c * at)
        out.append(lt)
    return torch.stack(out) if out else w.reshape(-1) * 0


def ref_covariance(lp, adv, mask):
    """``cov_t = (A_t - mean A)(logp_t - mean logp)`` over the valid tokens, as a dict keyed by
    ``(row, position)``."""
    pos = [(i, int(j)) for i, ix in enumerate(rows(mask)) for j in ix]
    if not pos:
        return {}
    a = [float(adv[i]) if adv.dim() == 1 else float(adv[i, j]) for i, j in pos]
    lps = [float(lp[i, j]) for i, j in pos]
    ma, ml = sum(a) / len(a), sum(lps) / len(lps)
    return {p: (x - ma) * (y - ml) for p, x, y in zip(pos, a, lps)}


def ref_kl_cov_chosen(lp, adv, mask, ratio):
    cov = ref_covariance(lp, adv, mask)
    k = max(1, int(ratio * len(cov)))
    return set(sorted(cov, key=lambda p: -cov[p])[:k]) if cov else set()


def ref_clip_cov_chosen(lp, old, adv, mask, *, ratio, lower, upper, low, high, seed):
    """Candidates: valid, not clipped by PPO (``-A clip(w) > -A w``), ``lower < cov < upper``, in
    row-major order; a uniform draw of ``max(1, floor(ratio * valid))`` of them with
    ``torch.randperm`` on a generator seeded ``seed``."""
    cov = ref_covariance(lp, adv, mask)
    cands = []
    for i, j in sorted(cov):
        w = math.exp(float(lp[i, j]) - float(old[i, j]))
        a = float(adv[i]) if adv.dim() == 1 else float(adv[i, j])
        clipped = -a * min(max(w, 1 - low), 1 + high) > -a * w
        if not clipped and lower < cov[(i, j)] < upper:
            cands.append((i, j))
    k = max(1, int(ratio * len(cov)))
    if len(cands) > k:
        perm = torch.randperm(len(cands), generator=torch.Generator().manual_seed(seed))[:k]
        cands = [cands[p] for p in perm.tolist()]
    return set(cands)


def ref_policy_rows(
    lp,
    old,
    adv,
    mask,
    *,
    surrogate="clip",
    level="token",
    low=0.2,
    high=0.2,
    delta=None,
    c=None,
    cispo=(None, None),
    chosen=(),
    kl_cov_coef=1.0,
    weights=None,
    ref=None,
    beta=0.0,
    kind="k3",
    bias_kl=True,
    kl_clamp=None,
    kl_estimate_clamp=None,
):
    """Per-row token losses (a list of 1-D tensors over each row's valid tokens) of a GRPO / PPO
    style policy loss. ``surrogate``: ``clip`` (PPO, optional ``delta`` / dual-clip ``c``),
    ``cispo`` (``-sg(clip(w, lo, hi)) A logp``), ``clip_cov`` (clip, 0 on ``chosen``), ``kl_cov``
    (``-w A + coef |logp - old|`` on ``chosen``). ``weights``: sampler weights ``[B, T]`` / ``[B, 1]``."""
    out = []
    for i, ix in enumerate(rows(mask)):
        n = ix.numel()
        lpi, oi = lp[i, ix], old[i, ix]
        a = adv[i] if adv.dim() == 1 else adv[i, ix]
        a = a * torch.ones(n, dtype=F64)
        d = lpi - oi
        if level == "token":
            w = torch.exp(d)
        else:  # sequence (GSPO): the geometric mean, one per row
            w = torch.exp(d.mean()) * torch.ones(n, dtype=F64) if n else d
        if surrogate in ("clip", "clip_cov"):
            L = ref_clip(w, a, low=low, high=high, delta=delta, c=c)
            if surrogate == "clip_cov":
                keep = torch.tensor([(i, int(j)) not in chosen for j in ix], dtype=F64)
                L = L * keep
        elif surrogate == "cispo":
            lo, hi = cispo
            L = -torch.clamp(w, min=lo, max=hi).detach() * a * lpi
        else:  # kl_cov
            pen = torch.tensor([(i, int(j)) in chosen for j in ix], dtype=F64)
            L = -w * a + kl_cov_coef * pen * torch.abs(d)
        if weights is not None:
            L = L * (weights[i, ix] if weights.shape[1] > 1 else weights[i, 0])
        if beta:
            k = ref_kl(lpi, ref[i, ix], kind, clamp=kl_clamp, estimate_clamp=kl_estimate_clamp)
            L = L + beta * k * (w if bias_kl else 1.0)
        out.append(L)
    return out


# ------------------------------------------------------------------------------------------------
# rollout corrections (TIS / MIS)


def ref_rollout(
    old,
    sampling,
    mask,
    *,
    is_level="token",
    is_hi=2.0,
    is_lo=None,
    rs_level=None,
    rs_hi=None,
    rs_lo=None,
    drop=True,
):
    """``(weights [B, T], mask [B, T])`` of truncated / masked IS from the rollout log-probs, one
    row at a time."""
    b, t = old.shape
    weights = torch.ones(b, t, dtype=F64)
    keep = mask.clone()
    for i, ix in enumerate(rows(mask)):
        d = (old[i, ix] - sampling[i, ix]).tolist()
        if is_level is not None:
            raw = [math.exp(x) for x in d] if is_level == "token" else [math.exp(sum(d))] * len(d)
            for j, r in zip(ix.tolist(), raw):
                weights[i, j] = min(max(r, is_lo if is_lo is not None else -math.inf), is_hi)
        if rs_level is None:
            continue
        lo = 1 / rs_hi if rs_lo is None else rs_lo
        if rs_level == "token":
            bad = [not (lo <= math.exp(x) <= rs_hi) for x in d]
        else:
            s = sum(d) if rs_level == "sequence" else (sum(d) / len(d) if d else 0.0)
            bad = [not (lo <= math.exp(s) <= rs_hi)] * len(d)
        for j, rej in zip(ix.tolist(), bad):
            if rej and drop:
                keep[i, j] = False
            elif rej:
                weights[i, j] = 0.0
    return weights, keep
