"""Shared input builders for the loss tests, and the two checkers they all use.

Every builder draws from its own seeded ``torch.Generator`` (never the global RNG), so a test's
inputs do not depend on which tests ran before it. Sizes are deliberately awkward (odd batches,
odd lengths, empty and full-length completions). Values are float64 unless a test asks for
another dtype: the references run in float64 on the same (possibly rounded) values.

* :func:`check_losses`: values of ``losses`` / ``loss`` and gradients w.r.t. every float input
  (random upstream gradients) against a float64 reference.
* :func:`ref_logits`, :func:`gather_logps`: full-logits float64 log-probs, the reference of every
  hidden-states -> loss path.
* :class:`Accelerator`, :func:`trl_class`: what TRL's trainer methods need from ``self`` to run
  on one process without ``__init__``.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from _assert import assert_close

F64 = torch.float64
IGNORE = -100


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normal(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """``scale · N(0, 1)`` float64 of ``shape`` from its own seeded generator."""
    return scale * torch.randn(*shape, generator=generator(seed), dtype=F64)


def padded_mask(b: int, t: int, g: torch.Generator, *, empty_row: bool = True, holes: bool = False):
    """``[B, T]`` bool right-padding mask: random lengths, row 0 empty (``empty_row``), the last
    row full; ``holes`` drops ~20% of the tokens inside completions (tool outputs)."""
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    if empty_row:
        lengths[0] = 0
    lengths[-1] = t
    mask = torch.arange(t)[None, :] < lengths[:, None]
    if holes:
        mask &= torch.rand(b, t, generator=g) > 0.2
    return mask


def with_garbage(x: torch.Tensor, mask: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    """Fill unscored positions with NaN: a correct loss never reads them."""
    return torch.where(mask, x, torch.full_like(x, value))


# ------------------------------------------------------------------------------------------------
# sequence-level log-probs


def pair_logps(b: int, *, seed: int = 0, scale: float = 8.0, dtype: torch.dtype = torch.float32):
    """DPO pairs ``(S_θ(y_w), S_θ(y_l), S_ref(y_w), S_ref(y_l))`` ``[B]``: policy sums in
    ``[-45, -5]``, reference sums off by ``N(0, scale²)`` (log-ratios of a few units)."""
    g = generator(seed)
    pc = -torch.rand(b, generator=g) * 40 - 5
    pr = -torch.rand(b, generator=g) * 40 - 5
    rc = pc + torch.randn(b, generator=g) * scale
    rr = pr + torch.randn(b, generator=g) * scale
    return [x.to(dtype) for x in (pc, pr, rc, rr)]


def summed_logps(b: int, *, seed: int = 0, lo: float = 0.05, hi: float = 3.0, zero_len: bool = True):
    """Chosen / rejected summed log-probs ``S = -(per-token mean) · n`` with token counts ``n``
    (rows 2 and 5 zero-length when ``zero_len``): ``(S_w, S_l, n_w, n_l)``."""
    g = generator(seed)
    n_w = torch.randint(1, 60, (b,), generator=g)
    n_l = torch.randint(1, 60, (b,), generator=g)
    if zero_len:
        n_w[2] = 0
        n_l[5] = 0
    s_w = -(lo + (hi - lo) * torch.rand(b, generator=g, dtype=F64)) * n_w
    s_l = -(lo + (hi - lo) * torch.rand(b, generator=g, dtype=F64)) * n_l
    return s_w, s_l, n_w, n_l


def unpaired_logps(nd: int, nu: int, *, seed: int = 0, scale: float = 20.0):
    """KTO / BCO batches: desirable ``[N_D]`` and undesirable ``[N_U]`` policy sums and their
    reference sums: ``(pw, pl, rw, rl)``."""
    g = generator(seed)
    pw = -scale * torch.rand(nd, generator=g, dtype=F64) - 1
    pl = -scale * torch.rand(nu, generator=g, dtype=F64) - 1
    rw = pw + 3 * torch.randn(nd, generator=g, dtype=F64)
    rl = pl + 3 * torch.randn(nu, generator=g, dtype=F64)
    return pw, pl, rw, rl


# ------------------------------------------------------------------------------------------------
# token-level log-probs


def token_logps(b: int = 7, t: int = 13, *, seed: int = 0, spread: float = 0.5, holes: bool = False):
    """Sampled completions ``[B, T]`` (float64): policy ``logps``, sampler ``old`` and reference
    ``ref`` log-probs ``spread`` apart, advantages ``adv [B]``, entropies ``ent`` and the ``mask``
    (lengths 0, T and random in between). Also returns the generator ``g`` for further draws."""
    g = generator(seed)
    lengths = torch.randint(1, t, (b,), generator=g)
    lengths[0], lengths[1] = 0, t
    mask = torch.arange(t)[None, :] < lengths[:, None]
    if holes:
        mask &= torch.rand(b, t, generator=g) > 0.2
    logps = -torch.rand(b, t, generator=g, dtype=F64) * 3 - 0.05
    old = logps + spread * torch.randn(b, t, generator=g, dtype=F64)
    ref = logps + spread * torch.randn(b, t, generator=g, dtype=F64)
    adv = torch.randn(b, generator=g, dtype=F64)
    ent = torch.rand(b, t, generator=g, dtype=F64) * 4
    return dict(logps=logps, old=old, ref=ref, adv=adv, mask=mask, ent=ent, g=g)


def completion_mask(n: int, t: int, g: torch.Generator, *, prompt_max: int = 3, min_len: int = 0):
    """``[N, T]`` long: 0 on a prompt of ``1..prompt_max`` tokens, 1 on the completion, 0 on the
    right padding (completions of at least ``min_len`` tokens; 0 allows empty ones)."""
    cm = torch.zeros(n, t, dtype=torch.long)
    for i in range(n):
        start = int(torch.randint(1, prompt_max + 1, (), generator=g))
        end = int(torch.randint(min(start + min_len, t), t + 1, (), generator=g))
        cm[i, start:end] = 1
    return cm


def prompt_labels(n: int, t: int, v: int, g: torch.Generator, *, prompt_max: int = 3, min_len: int = 0):
    """HF-style unshifted labels ``[N, T]``: token ids with ``-100`` on the prompt and the padding."""
    ids = torch.randint(0, v, (n, t), generator=g)
    return torch.where(completion_mask(n, t, g, prompt_max=prompt_max, min_len=min_len) == 1, ids, IGNORE)


def ref_logits(h, w, bias=None, *, temperature: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """Full float64 logits ``softcap(h W^T + b) / temperature`` (the order of the fused engine)."""
    z = h.double() @ w.double().T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def gather_logps(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor | None = None):
    """``log_softmax(logits)[target]`` per position, 0 where ``keep`` is False (default: target
    != -100), and the per-token entropy."""
    keep = targets != IGNORE if keep is None else keep
    logsm = torch.log_softmax(logits.double(), -1)
    tok = logsm.gather(-1, torch.where(keep, targets, 0).unsqueeze(-1)).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    zero = torch.zeros((), dtype=tok.dtype)
    return torch.where(keep, tok, zero), torch.where(keep, ent, zero)


# ------------------------------------------------------------------------------------------------
# checkers


def check_losses(
    name: str,
    ours: Callable,
    ref: Callable,
    floats: Sequence[torch.Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    gatol: float | None = None,
    grtol: float | None = None,
    seed: int = 0,
):
    """``ours(*x)`` (a ``LossOutput``) against the float64 ``ref(*x)`` (its per-example losses) on
    the same inputs rounded to ``dtype``: ``losses``, ``loss == mean`` and the gradients w.r.t.
    every input of ``floats`` under random upstream gradients on both. Returns ``ours``'s output."""
    x_ours = [t.detach().to(dtype).requires_grad_(True) for t in floats]
    x_ref = [t.detach().to(dtype).to(F64).requires_grad_(True) for t in floats]
    out = ours(*x_ours)
    want = ref(*x_ref)
    assert out.losses.dtype in (torch.float32, F64)
    assert_close(f"{name}/losses", want, out.losses, atol=atol, rtol=rtol)
    assert_close(f"{name}/loss", want.mean(), out.loss, atol=atol, rtol=rtol)
    g = generator(seed)
    up = torch.randn(want.shape, generator=g, dtype=F64)
    up_loss = torch.randn((), generator=g, dtype=F64)
    got = torch.autograd.grad(
        (out.losses * up.to(out.losses.dtype)).sum() + out.loss * up_loss.item(), x_ours, allow_unused=True
    )
    exp = torch.autograd.grad((want * up).sum() + want.mean() * up_loss, x_ref, allow_unused=True)
    for i, (a, e) in enumerate(zip(got, exp)):
        a = torch.zeros_like(x_ours[i]) if a is None else a
        e = torch.zeros_like(x_ref[i]) if e is None else e
        assert a.dtype == dtype
        assert_close(f"{name}/grad{i}", e, a, atol=gatol or atol, rtol=grtol or rtol)
    return out


def check_metrics(name: str, expect: dict, metrics: dict, *, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Each expected metric (a number or tensor) equals the logged one; logged metrics are detached."""
    for key, value in expect.items():
        got = metrics[key]
        assert not got.requires_grad, key
        assert_close(f"{name}/{key}", torch.as_tensor(value, dtype=F64), got, atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------------
# TRL on one process, without a trainer's __init__


class Accelerator:
    """Single process: every gather / reduce is the identity."""

    device = torch.device("cpu")
    num_processes = 1
    sync_gradients = True

    def reduce(self, t, reduction="sum"):
        return t

    def gather(self, t):
        return t

    def gather_for_metrics(self, t):
        return t

    def pad_across_processes(self, t, dim=0, pad_index=0):
        return t

    def unwrap_model(self, m):
        return m


def trl_class(path: str):
    """Import ``trl.<module>.<Class>`` with TRL's import-time warnings silenced."""
    mod, name = path.rsplit(".", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(__import__(mod, fromlist=[name]), name)


def trl_trainer(path: str, **fields):
    """An instance of a TRL trainer built without ``__init__``, carrying only ``fields`` (plus a
    single-process :class:`Accelerator` and an empty metrics store)."""
    obj = object.__new__(trl_class(path))
    defaults = dict(
        accelerator=Accelerator(),
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    for k, v in {**defaults, **fields}.items():
        setattr(obj, k, v)
    return obj
