"""Host-side contract shared by every layer: the logit options, the dtype policy, input checks,
output allocation and environment flags.

This module is the bottom of the stack: it imports only torch (never Triton, never another
``alignops`` module), so the Triton launchers of ``alignops.kernels``, the PyTorch engines in
``alignops._torch``, the custom ops, the losses and the bindings all use it without an
upward import. Each helper here has exactly one definition in the package.

Dtype policy (every family):

* ``hidden`` / ``logits`` / ``weight``: float16, bfloat16 or float32 (float64 too on the PyTorch
  engine, for ``gradcheck``). ``hidden`` and ``weight`` may differ, as in mixed precision and
  under ``torch.autocast`` (bf16 activations, fp32 master weight): the matmul operands are then
  rounded to the narrower of the two dtypes, which is what ``torch.autocast`` does to a linear
  layer, and the products accumulate in float32 on every engine. float16 with bfloat16 is
  refused (neither is narrower), and so is float64 with anything else.
* Every ``exp`` / ``log`` / sum and every accumulator runs in :func:`compute_dtype` (float32, or
  float64 for float64 inputs). Per-token outputs are in that dtype; each gradient is stored in
  the dtype of its input.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Dtypes the Triton kernels take (float64 always runs the PyTorch engine).
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NARROW_ORDER = {torch.float16: 0, torch.bfloat16: 0, torch.float32: 1, torch.float64: 2}


# ----------------------------------------------------------------------------------------------
# environment and allocation
# ----------------------------------------------------------------------------------------------


def env_int(name: str, default: int) -> int:
    """Integer environment variable (docs/env.md); unset or empty gives ``default``."""
    v = os.environ.get(name)
    return default if v in (None, "") else int(v)


def env_flag(name: str, default: bool) -> bool:
    """Boolean environment variable: ``0`` / ``false`` / ``no`` / ``off`` are false."""
    v = os.environ.get(name)
    if v in (None, ""):
        return default
    return v.lower() not in ("0", "false", "no", "off")


def poison_enabled() -> bool:
    """``ALIGNOPS_POISON=1`` (set by the test suite): fill new outputs with NaN / -1."""
    return env_flag("ALIGNOPS_POISON", False)


def empty(shape, *, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Allocate an output buffer; filled with NaN when ``ALIGNOPS_POISON=1`` (tests) so an
    element a kernel forgets to write is caught. Integer buffers are filled with -1."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if poison_enabled():
        t.fill_(float("nan") if dtype.is_floating_point else -1)
    return t


# ----------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The accumulation dtype: float64 if any given tensor is float64, else float32."""
    return (
        torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
    )


def matmul_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype both matmul operands are rounded to: the narrower of ``a`` and ``b``.

    Equal dtypes give that dtype. float16 with bfloat16 and float64 with anything else raise
    TypeError: there is no narrower one, and silently picking one would change the numbers."""
    if a == b:
        return a
    if torch.float64 in (a, b) or _NARROW_ORDER[a] == _NARROW_ORDER[b]:
        raise TypeError(
            f"hidden ({a}) and weight ({b}) cannot be mixed: mixed precision means a 16-bit dtype "
            "with float32 (the operands are rounded to the 16-bit one, as torch.autocast does); "
            "float64 works only with float64"
        )
    return a if _NARROW_ORDER[a] < _NARROW_ORDER[b] else b


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------


def check_number(name: str, v, *, lo: float, lo_open: bool, hi: float = math.inf) -> float:
    """A finite real (not a bool) with ``v > lo`` (``lo_open``) or ``v >= lo``, and ``v <= hi``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if (v <= lo if lo_open else v < lo) or v > hi:
        bound = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi != math.inf else "")
        raise ValueError(f"{name} must be {bound}, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class LogitOptions:
    """How the raw logits ``r`` (``hidden @ weight.T + bias``, or the caller's logits) become the
    logits ``z`` of the distribution, and which target means "ignore this position"::

        z = softcap * tanh(logit_scale * r / softcap) / temperature      (with a soft-cap)
        z = logit_scale * r / temperature                                 (without)

    ``logit_scale`` is a model's logit multiplier (Cohere's ``logit_scale``, muP's output multiplier,
    ``1 / logits_scaling`` for Granite); ``softcap`` Gemma-2's final soft-capping (Gemma Team,
    2024, arXiv:2408.00118); ``temperature`` the sampling temperature. Rows whose target equals
    ``ignore_index`` produce exactly 0 in every output and get zero gradient.

    Validated on construction (a clear ``ValueError``); frozen, so launchers, engines and the
    autograd context can share one object.
    """

    ignore_index: int = -100
    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    def __post_init__(self):
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {self.ignore_index!r}")
        object.__setattr__(self, "ignore_index", int(self.ignore_index))
        object.__setattr__(
            self, "logit_scale", check_number("logit_scale", self.logit_scale, lo=0.0, lo_open=True)
        )
        object.__setattr__(
            self, "temperature", check_number("temperature", self.temperature, lo=0.0, lo_open=True)
        )
        if self.softcap is not None:
            object.__setattr__(self, "softcap", check_number("softcap", self.softcap, lo=0.0, lo_open=True))

    def as_args(self) -> tuple[int, float, float | None, float]:
        """The fields in declaration order, for custom-op signatures (which take no objects)."""
        return self.ignore_index, self.logit_scale, self.softcap, self.temperature


#: Largest top-k the kernels keep per token (a [BN, 64] running list per tile stays in registers).
MAX_TOPK = 64


class TokenStats(NamedTuple):
    """Per-token statistics of one next-token distribution ``p = softmax(z)``:

    logp:       ``[N]`` ``log p[target]``;                lse:   ``[N]`` ``log sum_v exp(z_v)``;
    entropy:    ``[N]`` ``-sum_v p_v log p_v``;            zmean: ``[N]`` ``(1 / V) sum_v z_v``;
    log_sum_p2: ``[N]`` ``log sum_v p_v^2`` (the per-token weight of WPO, Zhou et al., 2024,
                arXiv:2406.11827; ``-log sum p^2`` is the collision entropy);
    topk_ids:   ``[N, K]`` int64, the ``K`` most likely ids, most likely first;
    topk_logps: ``[N, K]`` their log-probabilities (no gradient).

    Also the container of the upstream gradients in the backward (of the first five; the top-k
    fields are side outputs without one). A field is ``None`` when it was not requested
    (outputs) or its gradient is zero (backward). Ignored rows hold 0 (ids: -1)."""

    logp: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    zmean: torch.Tensor | None = None
    log_sum_p2: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logps: torch.Tensor | None = None


#: The differentiable fields of :class:`TokenStats`, in order (the backward's upstream gradients).
GRAD_FIELDS = ("logp", "lse", "entropy", "zmean", "log_sum_p2")


class StatRequest(NamedTuple):
    """Which optional :class:`TokenStats` a forward computes (``logp`` and ``lse`` always are):
    each costs a little on every call; ``topk = 0`` means none."""

    entropy: bool = False
    zmean: bool = False
    log_sum_p2: bool = False
    topk: int = 0

    def checked(self, vocab: int) -> StatRequest:
        """Validated against the vocabulary size (clear errors for a bad ``topk``)."""
        k = self.topk
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= min(MAX_TOPK, vocab):
            raise ValueError(f"topk must be an int in [0, min({MAX_TOPK}, V={vocab})], got {k!r}")
        return self


#: Log-probs and log-sum-exp only.
NOTHING_EXTRA = StatRequest()


# ----------------------------------------------------------------------------------------------
# input checks (one implementation, called by the public functions, the launchers and engines)
# ----------------------------------------------------------------------------------------------


def _check_tensor(name: str, t, *, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be one of {names}, got {t.dtype}")


def _check_targets(targets, lead: tuple[int, ...], what: str) -> None:
    _check_tensor("targets", targets, dtypes=(torch.int64, torch.int32))
    if tuple(targets.shape) != lead:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal {what}'s leading dims {lead}")


def _check_one_device(**tensors) -> None:
    devs = {t.device for t in tensors.values() if t is not None}
    if len(devs) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devs)}")


def check_linear_inputs(hidden, weight, targets, bias=None) -> torch.dtype:
    """``hidden [..., H]``, ``weight [V, H]``, ``targets [...]`` int, ``bias [V]`` or None, one
    device, a contiguous last dimension (any row strides). Returns the matmul dtype."""
    _check_tensor("hidden", hidden)
    _check_tensor("weight", weight)
    dot = matmul_dtype(hidden.dtype, weight.dtype)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension [..., H]")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden is [..., {hidden.shape[-1]}] but weight is "
            f"[{weight.shape[0]}, {weight.shape[1]}]"
        )
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight has an empty vocabulary or hidden size: {tuple(weight.shape)}")
    _check_targets(targets, tuple(hidden.shape[:-1]), "hidden")
    if bias is not None:
        _check_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    _check_one_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    if (hidden.numel() and hidden.stride(-1) != 1) or weight.stride(-1) != 1:
        raise ValueError("hidden and weight must be contiguous in their last dimension (any row strides)")
    return dot


def check_logits_inputs(logits, targets) -> None:
    """``logits [..., V]`` with a contiguous vocabulary dimension, ``targets [...]`` int."""
    _check_tensor("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V > 0, got shape {tuple(logits.shape)}")
    _check_targets(targets, tuple(logits.shape[:-1]), "logits")
    _check_one_device(logits=logits, targets=targets)
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        raise ValueError("logits must have a contiguous last (vocab) dimension; call .contiguous() first")


def check_saved(saved: TokenStats, grads: TokenStats) -> None:
    """A backward needs the forward's ``lse``, and its ``entropy`` / ``log_sum_p2`` where those get a
    gradient."""
    if saved.lse is None:
        raise ValueError("the backward needs the forward's lse")
    for k in ("entropy", "log_sum_p2"):
        if getattr(grads, k) is not None and getattr(saved, k) is None:
            raise ValueError(f"a gradient of {k} needs the forward's {k}")


def check_targets_in_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Targets must lie in ``[0, V)`` or equal ``ignore_index``.

    On the CPU this is a host check (cheap). On CUDA it is ``torch._assert_async``: a
    device-side assert with no host synchronisation; it surfaces at the next sync as a
    CUDA error. ``ALIGNOPS_CHECK_TARGETS=0`` turns the CUDA check off.
    """
    if targets.numel() == 0:
        return
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if targets.is_cuda:
        if env_flag("ALIGNOPS_CHECK_TARGETS", True):
            torch._assert_async(~bad.any(), "alignops: a target is outside [0, V) and is not ignore_index")
        return
    if bool(bad.any()):
        first = targets[bad][0].item()
        raise ValueError(
            f"targets must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {first}"
        )


# ----------------------------------------------------------------------------------------------
# layouts
# ----------------------------------------------------------------------------------------------


def rows_2d(hidden: torch.Tensor) -> torch.Tensor:
    """``hidden [..., H]`` as ``[N, H]``: a view whenever the leading dims flatten to one strided
    axis (any row stride). Only a layout that cannot be viewed so (e.g. ``x[:, :-1]`` of a
    ``[B, T, H]`` tensor with ``B > 1``) is copied: O(N * H), never O(V)."""
    return hidden if hidden.dim() == 2 else hidden.reshape(-1, hidden.shape[-1])


def rows_3d(x: torch.Tensor) -> torch.Tensor:
    """``x [..., V]`` as a ``[B, T, V]`` view (row ``n = b * T + t``), without copying.

    Any layout whose leading dims flatten to one strided axis gives ``[1, N, V]``; a slice such
    as ``logits[:, :-1]`` of ``[B, L, V]`` gives ``[B, L - 1, V]``. Only layouts that are
    neither (e.g. a 4-D tensor sliced on two axes) are copied."""
    v = x.shape[-1]
    try:
        return x.view(1, -1, v)
    except RuntimeError:
        pass
    if x.dim() >= 3:
        try:
            return x.view(-1, x.shape[-2], v)
        except RuntimeError:
            pass
    return x.reshape(1, -1, v)


def rows_3d_like(out: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
    """``out`` (the logits' shape) as a view with the ``[B, T, V]`` shape of ``x3 = rows_3d(logits)``,
    so that row ``n`` means the same row in both."""
    try:
        return out.view(x3.shape)
    except RuntimeError:
        d3 = rows_3d(out)
        if d3.shape != x3.shape:
            raise ValueError("out must have the logits' layout (or be contiguous)") from None
        return d3


# ----------------------------------------------------------------------------------------------
# the divergence family (two heads: p = student / policy, trained; q = teacher / reference, frozen)
# ----------------------------------------------------------------------------------------------

#: The divergences of the ``linear_divergence`` family (module docstring of
#: ``alignops/_torch/linear_divergence.py`` has the math and the passes each takes).
DIVERGENCE_KINDS = ("forward_kl", "reverse_kl", "jsd", "tv", "alpha", "f")
#: Named generators of ``kind="f"``: ``D_f(p || q) = sum_v q_v f(p_v / q_v)``.
F_GENERATORS = ("kl", "reverse_kl", "hellinger", "chi2", "js", "tv")


@dataclass(frozen=True)
class DivergenceOptions:
    """Which per-token divergence between the student ``p`` and the teacher ``q`` to compute.

    * ``"forward_kl"``: ``KL(q || p) = sum_v q_v log(q_v / p_v)`` (teacher -> student, standard KD);
    * ``"reverse_kl"``: ``KL(p || q)``;
    * ``"jsd"``: the generalized Jensen-Shannon divergence with the mixture
      ``m = (1 - beta) p + beta q``: ``beta KL(q || m) + (1 - beta) KL(p || m)`` (Agarwal et al.,
      2024, arXiv:2306.13649, as TRL's ``ChunkedDivergenceFunction`` writes it); ``beta = 0`` is
      exactly ``KL(q || p)`` and ``beta = 1`` exactly ``KL(p || q)`` (TRL's convention: the
      mixture formula itself tends to 0 at both ends);
    * ``"tv"``: total variation ``(1 / 2) sum_v |p_v - q_v|``;
    * ``"alpha"``: Amari's alpha-divergence
      ``(1 - sum_v p_v^alpha q_v^(1 - alpha)) / (alpha (1 - alpha))`` (Amari, 1985; Cichocki and
      Amari, 2010, doi:10.3390/e12061532); ``alpha = 1`` is ``KL(p || q)``, ``alpha = 0`` is
      ``KL(q || p)`` (the limits);
    * ``"f"``: Csiszar's f-divergence ``sum_v q_v f(p_v / q_v)`` (Csiszar, 1967) for one of the
      named ``generator`` s of :data:`F_GENERATORS`.

    Validated on construction (a clear ``ValueError``); frozen."""

    kind: str
    beta: float = 0.5
    alpha: float = 0.5
    generator: str | None = None

    def __post_init__(self):
        if self.kind not in DIVERGENCE_KINDS:
            raise ValueError(f"unknown divergence kind {self.kind!r}; expected one of {DIVERGENCE_KINDS}")
        object.__setattr__(self, "beta", check_number("beta", self.beta, lo=0.0, lo_open=False, hi=1.0))
        object.__setattr__(self, "alpha", check_number("alpha", self.alpha, lo=-math.inf, lo_open=True))
        if self.kind == "f":
            if self.generator not in F_GENERATORS:
                raise ValueError(f"kind='f' needs generator one of {F_GENERATORS}, got {self.generator!r}")
        elif self.generator is not None:
            raise ValueError(f"generator is only used with kind='f', got kind={self.kind!r}")


class DivStats(NamedTuple):
    """Per-token outputs of the divergence family, in the compute dtype (float32, or float64 for
    float64 inputs); rows with ``valid = False`` hold 0.

    div:       ``[N]`` the divergence of :class:`DivergenceOptions`;
    lse_p:     ``[N]`` ``log sum_v exp(z^p_v)`` of the student;
    lse_q:     ``[N]`` the teacher's, or ``None`` for a sparse (top-k) teacher;
    entropy_p: ``[N]`` the student's entropy ``-sum_v p_v log p_v``, or ``None`` when not asked."""

    div: torch.Tensor
    lse_p: torch.Tensor
    lse_q: torch.Tensor | None
    entropy_p: torch.Tensor | None


def _check_head(which: str, hidden, weight, bias) -> torch.dtype:
    _check_tensor(f"h_{which}", hidden)
    _check_tensor(f"w_{which}", weight)
    dot = matmul_dtype(hidden.dtype, weight.dtype)
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"h_{which} must be [N, H] and w_{which} [V, H], "
            f"got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: h_{which} is [N, {hidden.shape[1]}] "
            f"but w_{which} is {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"w_{which} has an empty vocabulary or hidden size: {tuple(weight.shape)}")
    if bias is not None:
        _check_tensor(f"b_{which}", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"b_{which} must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if (hidden.numel() and hidden.stride(-1) != 1) or weight.stride(-1) != 1:
        raise ValueError(f"h_{which} and w_{which} must be contiguous in their last dimension")
    return dot


def check_divergence_inputs(h_p, w_p, b_p, h_q, w_q, b_q, valid) -> tuple[torch.dtype, torch.dtype | None]:
    """The two heads of the divergence family: ``h_p [N, Hp]``, ``w_p [V, Hp]``, ``b_p [V]`` or
    None, and the same for ``q`` with its own hidden size (``h_q`` / ``w_q`` None for a sparse
    teacher); ``valid [N]`` bool; one device. Returns the matmul dtype of each head."""
    dot_p = _check_head("p", h_p, w_p, b_p)
    dot_q = None
    if w_q is not None:
        dot_q = _check_head("q", h_q, w_q, b_q)
        if w_q.shape[0] != w_p.shape[0]:
            raise ValueError(
                f"vocabulary size mismatch: the student head has V = {w_p.shape[0]}, the teacher's "
                f"V = {w_q.shape[0]}"
            )
        if h_q.shape[0] != h_p.shape[0]:
            raise ValueError(f"token count mismatch: h_p has {h_p.shape[0]} rows, h_q has {h_q.shape[0]}")
    _check_tensor("valid", valid, dtypes=(torch.bool,))
    if tuple(valid.shape) != (h_p.shape[0],):
        raise ValueError(f"valid must be [N] = [{h_p.shape[0]}] bool, got {tuple(valid.shape)}")
    _check_one_device(h_p=h_p, w_p=w_p, b_p=b_p, h_q=h_q, w_q=w_q, b_q=b_q, valid=valid)
    return dot_p, dot_q


def check_logits_pair(logits_p, logits_q, valid) -> None:
    """Both heads' logits ``[N, V]`` (same shape, contiguous rows' last dimension) and ``valid [N]``."""
    _check_tensor("logits_p", logits_p)
    _check_tensor("logits_q", logits_q)
    if logits_p.dim() != 2 or logits_p.shape[1] == 0:
        raise ValueError(f"logits_p must be [N, V] with V > 0, got {tuple(logits_p.shape)}")
    if logits_q.dim() != 2 or logits_q.shape[1] != logits_p.shape[1]:
        raise ValueError(
            f"vocabulary size mismatch: logits_p is {tuple(logits_p.shape)}, logits_q {tuple(logits_q.shape)}"
        )
    if logits_q.shape[0] != logits_p.shape[0]:
        raise ValueError(
            f"token count mismatch: logits_p has {logits_p.shape[0]} rows, logits_q {logits_q.shape[0]}"
        )
    _check_tensor("valid", valid, dtypes=(torch.bool,))
    if tuple(valid.shape) != (logits_p.shape[0],):
        raise ValueError(f"valid must be [N] = [{logits_p.shape[0]}] bool, got {tuple(valid.shape)}")
    _check_one_device(logits_p=logits_p, logits_q=logits_q, valid=valid)
