"""The divergence family as custom ops with autograd: ``alignops::linear_divergence_fwd`` /
``_bwd`` (two heads from hidden states and weights), ``alignops::logits_divergence_fwd`` /
``_bwd`` (caller-given logits) and ``alignops::sparse_divergence_fwd`` / ``_bwd`` (a top-k teacher).
Fake implementations give shapes for ``torch.compile``.

Engine seam (:func:`_engine`): CUDA tensors (and ``ALIGNOPS_BACKEND=triton``) use the Triton
launchers of ``alignops.kernels.linear_divergence``, for both heads from hidden states and for the
logits variant; everything else, float64 and the sparse teacher run the PyTorch engine.
"""

from __future__ import annotations

import importlib

import torch

from .._dispatch import use_triton
from .._torch import linear_divergence as torch_engine
from .._torch import sparse_divergence as sparse_engine
from ..kernels._common import DivergenceOptions, DivStats
from . import _common as c

_HEADS = "Tensor h_p, Tensor w_p, Tensor? b_p, Tensor h_q, Tensor w_q, Tensor? b_q, Tensor valid"
_LOGITS = "Tensor logits_p, Tensor logits_q, Tensor valid"
_DIV = "str kind, float beta, float alpha, str? generator"
_SAVED = (
    "Tensor div, Tensor lse_p, Tensor lse_q, Tensor entropy_p, Tensor row_sums, "
    + "Tensor? g_div, Tensor? g_entropy"
)
#: ``DivStats``' four fields, then the PyTorch engine's ``[2, N]`` row constants of jsd / tv (the
#: backward then skips a vocabulary pass; 0-element for the other kinds and the Triton launchers)
_OUT = "(Tensor, Tensor, Tensor, Tensor, Tensor)"
_NEEDS = "bool need_dh_p, bool need_dw_p, bool need_db_p, bool need_dh_q, bool need_dw_q, bool need_db_q"
_N_OPTS = 8  # two LogitOptions of four fields


def _engine(t: torch.Tensor):
    """The Triton launchers for a call that :func:`use_triton` sends there, once they exist; the
    PyTorch engine otherwise."""
    if use_triton(t):
        try:
            return importlib.import_module("alignops.kernels.linear_divergence")
        except ModuleNotFoundError:
            pass
    return torch_engine


def _split(args):
    """``(opts_p, opts_q, div, rest)`` from the flat op arguments."""
    op, oq = c.options(args[:4]), c.options(args[4:8])
    return op, oq, DivergenceOptions(*args[8:12]), args[12:]


def _pack(st: DivStats, like: torch.Tensor, row_sums: list):
    return tuple(c.pack(t, like) for t in st) + (row_sums[0] if row_sums else like,)


def _row_sums_shape(x: torch.Tensor, n: int, div_args) -> tuple[int, ...]:
    """The shape of the fifth output: ``[2, N]`` where the PyTorch engine hands the row constants
    over (jsd / tv), else 0 elements."""
    base = torch_engine.resolve(DivergenceOptions(*div_args))[0]
    return (2, n) if _engine(x) is torch_engine and base in ("jsd", "tv") else (0,)


def _rows(row_sums: torch.Tensor) -> dict:
    return {"row_sums": row_sums} if row_sums.numel() else {}


def _saved(n, div, lse_p, lse_q, entropy_p) -> DivStats:
    return DivStats(div, lse_p, lse_q, c.unpack(entropy_p, n))


def _fwd(h_p, w_p, b_p, h_q, w_q, b_q, valid, *args):
    op, oq, div, (want_entropy,) = _split(args)
    eng, rs = _engine(h_p), []
    extra = {"row_sums_out": rs} if eng is torch_engine else {}
    st = eng.linear_divergence_fwd(
        h_p, w_p, b_p, h_q, w_q, b_q, valid, op, oq, div, want_entropy=want_entropy, **extra
    )
    return _pack(st, h_p.new_empty(0, dtype=st.div.dtype), rs)


def _bwd(h_p, w_p, b_p, h_q, w_q, b_q, valid, div_, lse_p, lse_q, ent, row_sums, g_div, g_ent, *args):
    op, oq, div, needs = _split(args)
    n = h_p.shape[0]
    eng = _engine(h_p)
    out = eng.linear_divergence_bwd(
        h_p, w_p, b_p, h_q, w_q, b_q, valid, _saved(n, div_, lse_p, lse_q, ent), g_div, g_ent, op, oq, div,
        **dict(zip(("need_dh_p", "need_dw_p", "need_db_p", "need_dh_q", "need_dw_q", "need_db_q"), needs)),
        **(_rows(row_sums) if eng is torch_engine else {}),
    )  # fmt: skip
    return tuple(c.pack(t, h_p) for t in out)


_OPTS2 = (
    c.OPTIONS.replace(", ", "_p, ").replace(" temperature", " temperature_p")
    + ", "
    + c.OPTIONS.replace(", ", "_q, ").replace(" temperature", " temperature_q")
)

linear_divergence_fwd_op = c.custom_op(
    "linear_divergence_fwd", _fwd, f"{_HEADS}, {_OPTS2}, {_DIV}, bool want_entropy", _OUT
)
linear_divergence_bwd_op = c.custom_op(
    "linear_divergence_bwd",
    _bwd,
    f"{_HEADS}, {_SAVED}, {_OPTS2}, {_DIV}, {_NEEDS}",
    "(" + ", ".join(["Tensor"] * 6) + ")",
)


def _fake_stats(x: torch.Tensor, n: int, want_entropy: bool):
    dt = c.compute_dtype(x)
    return tuple(x.new_empty(n if need else 0, dtype=dt) for need in (True, True, True, want_entropy))


@linear_divergence_fwd_op.register_fake
def _(h_p, w_p, b_p, h_q, w_q, b_q, valid, *args):
    n = h_p.shape[0]
    rows = h_p.new_empty(_row_sums_shape(h_p, n, args[8:12]), dtype=c.compute_dtype(h_p))
    return _fake_stats(h_p, n, args[-1]) + (rows,)


@linear_divergence_bwd_op.register_fake
def _(h_p, w_p, b_p, h_q, w_q, b_q, *args):
    needs = args[-6:]
    like = (h_p, w_p, b_p, h_q, w_q, b_q)
    return tuple(
        torch.empty_like(t) if (need and t is not None) else h_p.new_empty(0) for t, need in zip(like, needs)
    )


def _setup(ctx, inputs, output):
    ctx.args = tuple(inputs[7 : 7 + _N_OPTS + 4])
    ctx.n_options = len(inputs) - 7
    ctx.save_for_backward(*inputs[:7], *output)
    ctx.mark_non_differentiable(output[1], output[2], output[4])


def _backward(ctx, g_div, g_lse_p, g_lse_q, g_ent, g_rows):
    h_p, w_p, b_p, h_q, w_q, b_q, valid, *saved = ctx.saved_tensors
    ni = ctx.needs_input_grad[:6]
    needs = tuple(bool(need and t is not None) for need, t in zip(ni, (h_p, w_p, b_p, h_q, w_q, b_q)))
    grads = [None] * 6
    if any(needs):
        g_ent = g_ent if g_ent is not None and g_ent.numel() else None
        out = linear_divergence_bwd_op(
            h_p, w_p, b_p, h_q, w_q, b_q, valid, *saved, g_div, g_ent, *ctx.args, *needs
        )
        grads = [t if need else None for t, need in zip(out, needs)]
    return (*grads, None) + (None,) * ctx.n_options


linear_divergence_fwd_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------------------------------------
# the logits variant
# ---------------------------------------------------------------------------------------------


def _lfwd(logits_p, logits_q, valid, *args):
    op, oq, div, (want_entropy,) = _split(args)
    eng, rs = _engine(logits_p), []
    extra = {"row_sums_out": rs} if eng is torch_engine else {}
    st = eng.logits_divergence_fwd(logits_p, logits_q, valid, op, oq, div, want_entropy=want_entropy, **extra)
    return _pack(st, logits_p.new_empty(0, dtype=st.div.dtype), rs)


def _lbwd(logits_p, logits_q, valid, div_, lse_p, lse_q, ent, row_sums, g_div, g_ent, *args):
    op, oq, div, (need_dp, need_dq) = _split(args)
    saved = _saved(logits_p.shape[0], div_, lse_p, lse_q, ent)
    eng = _engine(logits_p)
    dp, dq = eng.logits_divergence_bwd(
        logits_p, logits_q, valid, saved, g_div, g_ent, op, oq, div, need_dp=need_dp, need_dq=need_dq,
        **(_rows(row_sums) if eng is torch_engine else {}),
    )  # fmt: skip
    return c.pack(dp, logits_p), c.pack(dq, logits_p)


logits_divergence_fwd_op = c.custom_op(
    "logits_divergence_fwd", _lfwd, f"{_LOGITS}, {_OPTS2}, {_DIV}, bool want_entropy", _OUT
)
logits_divergence_bwd_op = c.custom_op(
    "logits_divergence_bwd", _lbwd, f"{_LOGITS}, {_SAVED}, {_OPTS2}, {_DIV}, bool need_dp, bool need_dq",
    "(Tensor, Tensor)",
)  # fmt: skip


@logits_divergence_fwd_op.register_fake
def _(logits_p, logits_q, valid, *args):
    n = logits_p.shape[0]
    rows = logits_p.new_empty(_row_sums_shape(logits_p, n, args[8:12]), dtype=c.compute_dtype(logits_p))
    return _fake_stats(logits_p, n, args[-1]) + (rows,)


@logits_divergence_bwd_op.register_fake
def _(logits_p, logits_q, *args):
    need_dp, need_dq = args[-2:]
    return (
        torch.empty_like(logits_p) if need_dp else logits_p.new_empty(0),
        torch.empty_like(logits_q) if need_dq else logits_p.new_empty(0),
    )


def _lsetup(ctx, inputs, output):
    ctx.args = tuple(inputs[3 : 3 + _N_OPTS + 4])
    ctx.n_options = len(inputs) - 3
    ctx.save_for_backward(*inputs[:3], *output)
    ctx.mark_non_differentiable(output[1], output[2], output[4])


def _lbackward(ctx, g_div, g_lse_p, g_lse_q, g_ent, g_rows):
    logits_p, logits_q, valid, *saved = ctx.saved_tensors
    need_dp, need_dq = ctx.needs_input_grad[:2]
    dp = dq = None
    if need_dp or need_dq:
        g_ent = g_ent if g_ent is not None and g_ent.numel() else None
        dp, dq = logits_divergence_bwd_op(
            logits_p, logits_q, valid, *saved, g_div, g_ent, *ctx.args, need_dp, need_dq
        )
    return (dp if need_dp else None, dq if need_dq else None, None) + (None,) * ctx.n_options


logits_divergence_fwd_op.register_autograd(_lbackward, setup_context=_lsetup)


# ---------------------------------------------------------------------------------------------
# the sparse (top-k) teacher: PyTorch engine on every device for now
# ---------------------------------------------------------------------------------------------

_SPARSE = "Tensor h_p, Tensor w_p, Tensor? b_p, Tensor q_ids, Tensor q_logps, Tensor valid"
_OPTS1 = _OPTS2.split(", int ignore_index_q")[0]


def _sfwd(h_p, w_p, b_p, q_ids, q_logps, valid, *args):
    op, div, want_entropy = c.options(args[:4]), DivergenceOptions(*args[4:8]), args[8]
    st = sparse_engine.sparse_divergence_fwd(
        h_p, w_p, b_p, q_ids, q_logps, valid, op, div, want_entropy=want_entropy
    )
    like = h_p.new_empty(0, dtype=st.div.dtype)
    return st.div, st.lse_p, c.pack(st.entropy_p, like)


def _sbwd(h_p, w_p, b_p, q_ids, q_logps, valid, div_, lse_p, ent, g_div, g_ent, *args):
    op, div, (need_dh, need_dw, need_db) = c.options(args[:4]), DivergenceOptions(*args[4:8]), args[8:]
    saved = DivStats(div_, lse_p, None, c.unpack(ent, h_p.shape[0]))
    out = sparse_engine.sparse_divergence_bwd(
        h_p, w_p, b_p, q_ids, q_logps, valid, saved, g_div, g_ent, op, div,
        need_dh_p=need_dh, need_dw_p=need_dw, need_db_p=need_db,
    )  # fmt: skip
    return tuple(c.pack(t, h_p) for t in out)


sparse_divergence_fwd_op = c.custom_op(
    "sparse_divergence_fwd",
    _sfwd,
    f"{_SPARSE}, {_OPTS1}, {_DIV}, bool want_entropy",
    "(Tensor, Tensor, Tensor)",
)
sparse_divergence_bwd_op = c.custom_op(
    "sparse_divergence_bwd", _sbwd,
    f"{_SPARSE}, Tensor div, Tensor lse_p, Tensor entropy_p, Tensor? g_div, Tensor? g_entropy, {_OPTS1}, "
    f"{_DIV}, bool need_dh_p, bool need_dw_p, bool need_db_p",
    "(Tensor, Tensor, Tensor)",
)  # fmt: skip


@sparse_divergence_fwd_op.register_fake
def _(h_p, w_p, b_p, q_ids, q_logps, valid, *args):
    return _fake_stats(h_p, h_p.shape[0], args[-1])[:2] + _fake_stats(h_p, h_p.shape[0], args[-1])[3:]


@sparse_divergence_bwd_op.register_fake
def _(h_p, w_p, b_p, *args):
    needs = args[-3:]
    return tuple(
        torch.empty_like(t) if (need and t is not None) else h_p.new_empty(0)
        for t, need in zip((h_p, w_p, b_p), needs)
    )


def _ssetup(ctx, inputs, output):
    ctx.args = tuple(inputs[6:14])
    ctx.n_options = len(inputs) - 6
    ctx.save_for_backward(*inputs[:6], *output)
    ctx.mark_non_differentiable(output[1])


def _sbackward(ctx, g_div, g_lse_p, g_ent):
    h_p, w_p, b_p, q_ids, q_logps, valid, *saved = ctx.saved_tensors
    needs = tuple(bool(need and t is not None) for need, t in zip(ctx.needs_input_grad[:3], (h_p, w_p, b_p)))
    grads = [None] * 3
    if any(needs):
        g_ent = g_ent if g_ent is not None and g_ent.numel() else None
        out = sparse_divergence_bwd_op(
            h_p, w_p, b_p, q_ids, q_logps, valid, *saved, g_div, g_ent, *ctx.args, *needs
        )
        grads = [t if need else None for t, need in zip(out, needs)]
    return (*grads, None, None, None) + (None,) * ctx.n_options


sparse_divergence_fwd_op.register_autograd(_sbackward, setup_context=_ssetup)
