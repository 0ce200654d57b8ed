"""Vocabulary-parallel log-prob statistics on ``torch.distributed``: each rank of a process group
holds a slice of the LM head (``W[V_r, H]``, its bias, or the logits ``[..., V_r]`` of a
column-parallel head) and every rank gets the exact full-vocabulary :class:`TokenStats`.

Composed above the engines (no kernel changes). Rank ``r`` owns global ids ``[start_r, start_r +
V_r)``, ``start_r = V_0 + ... + V_{r-1}``; rows past ``vocab_size`` are padding and are left out.
Each rank runs the ordinary forward on its slice (targets remapped to local ids; a target on
another rank becomes any local id and its ``z_y`` is masked out), then per token::

    M      = max_r lse_r                                   (all-reduce MAX, 1 float)
    S      = sum_r e_r,  e_r = exp(lse_r - M)               (one all-reduce SUM of k floats:)
    z_y    = sum_r [y on r] z_y                             lse = M + log S,  logp = z_y - lse
    E_p z  = sum_r e_r (lse_r - H_r) / S                    entropy = lse - E_p z
    zmean  = sum_r V_r zmean_r / V
    sum p^2 = sum_r e_r^2 exp(log_sum_p2_r) / S^2

so two all-reduces of ``1`` and ``k <= 5`` floats per token, O(1) in the vocabulary; top-k adds one
all-gather of the ``K`` local candidates per rank (O(K), never O(V)).

Backward: each rank calls its engine's backward with the *global* saved ``lse`` / ``entropy`` /
``log_sum_p2``. On a rank that does not hold the target, ``d logp / dz = -p``, the same as the
gradient of ``-lse``: the engine gets ``g_lse - g_logp`` and no ``g_logp`` there; ``g_zmean`` is
scaled by ``V_r / V`` (the engine divides by its own ``V_r``). The weight / bias / logits
gradients are then exactly this rank's shard of the full gradient. The hidden-state gradient
is a sum over ranks: it is all-reduced unless ``reduce_hidden_grad=False`` (for a caller whose
layer already reduces it, e.g. Megatron-LM's ``copy_to_tensor_model_parallel_region``).

The upstream gradients must be the same on every rank, which is the case whenever every rank
computes the same loss from the (replicated) outputs. Shapes, options and the targets are
checked with one small all-gather before any other collective, so a mismatch raises the same
``ValueError`` on every rank instead of hanging.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._ops import _common as c
from ._ops.linear_logprobs import linear_logprobs_bwd_op, linear_logprobs_fwd_op
from ._ops.logprobs import logprobs_bwd_op, logprobs_fwd_op
from .kernels._common import (
    LogitOptions,
    StatRequest,
    TokenStats,
    check_linear_inputs,
    check_logits_inputs,
    check_targets_in_range,
    compute_dtype,
    rows_2d,
)

#: The local ignore id: globally ignored rows; never a valid local id.
_LOCAL_IGNORE = -1


def _dtensor_types():
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch builds without distributed tensors
        return None, None
    return DTensor, Shard


def is_dtensor(t) -> bool:
    DTensor, _ = _dtensor_types()
    return DTensor is not None and isinstance(t, DTensor)


def local_shard(name: str, t, group, dim: int):
    """``(local tensor, group)`` of a tensor sharded on ``dim`` over the vocabulary: a DTensor on a
    1-D mesh with placement ``Shard(dim)`` gives its local shard and its mesh's group; a plain
    tensor is returned as is. A DTensor whose mesh group differs from ``group`` raises."""
    if not is_dtensor(t):
        return t, group
    _, Shard = _dtensor_types()
    mesh = t.device_mesh
    if mesh.ndim != 1 or len(t.placements) != 1 or t.placements[0] != Shard(dim % t.dim()):
        raise ValueError(
            f"{name} as a DTensor must be sharded over the vocabulary on a 1-D mesh "
            f"(placements (Shard({dim}),)), got mesh of {mesh.ndim} dims and {t.placements}"
        )
    g = mesh.get_group()
    if group is not None and dist.get_process_group_ranks(group) != dist.get_process_group_ranks(g):
        raise ValueError(
            f"process_group (ranks {dist.get_process_group_ranks(group)}) is not the group of "
            f"{name}'s device mesh (ranks {dist.get_process_group_ranks(g)})"
        )
    return t.to_local(), g


@dataclass(frozen=True)
class Shard:
    """Where this rank's slice lies in the global vocabulary (from :func:`plan`)."""

    group: object
    world: int
    start: int  # global id of local row 0
    valid: int  # local rows that are real ids (the rest is padding)
    vocab: int  # global vocabulary size V


def _float_bits(x: float | None) -> int:
    return -1 if x is None else struct.unpack("<q", struct.pack("<d", float(x)))[0]


#: The fields checked across ranks: (name, must be equal on every rank).
_FIELDS = (
    ("input check", False),
    ("kind", True),
    ("local vocabulary rows", False),
    ("hidden size", True),
    ("tokens", True),
    ("bias", True),
    ("dtypes", True),
    ("targets checksum", True),
    ("targets weighted checksum", True),
    ("ignore_index", True),
    ("logit_scale", True),
    ("softcap", True),
    ("temperature", True),
    ("requested statistics", True),
    ("vocab_size", True),
    ("reduce_hidden_grad", True),
)
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def plan(
    group,
    *,
    linear: bool,
    v_local: int,
    hidden_size: int,
    dtypes: tuple | None,
    has_bias: bool,
    targets: torch.Tensor,
    opts: LogitOptions,
    want: StatRequest,
    vocab_size: int | None,
    reduce_hidden_grad: bool,
    local_error: Exception | None = None,
    extra: tuple = (),
    targets_name: str = "targets",
) -> Shard:
    """Check that every rank of ``group`` runs the same call on consistent slices (one all-gather
    of a few int64 per rank) and return this rank's :class:`Shard`. Raises on every rank when
    they disagree, or when any rank's own input check failed (``local_error``: that rank raises
    it, the others say which rank failed), so no rank is left waiting in a collective.
    ``extra``: further ``(name, int)`` fields that must be equal on every rank; ``targets_name``:
    what the ``targets`` are called in the messages (e.g. a token mask)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group needs torch.distributed to be initialised (init_process_group)")
    if group is None:
        group = dist.group.WORLD
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group returns to non-members
        raise ValueError("this process is not a member of process_group")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)):
        raise TypeError(f"vocab_size must be an int or None, got {vocab_size!r}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of process_group")
    y = targets.reshape(-1).long()
    w = torch.arange(y.numel(), device=y.device) % 1009 + 1
    mine = torch.tensor(
        [
            int(local_error is not None),
            int(linear),
            v_local,
            hidden_size,
            y.numel(),
            int(has_bias),
            sum(5**i * _DTYPE_CODES.get(d, 4) for i, d in enumerate(dtypes)) if dtypes else -1,
            int(y.sum()),
            int((y * w).sum()),
            opts.ignore_index,
            _float_bits(opts.logit_scale),
            _float_bits(opts.softcap),
            _float_bits(opts.temperature),
            (want.entropy << 0 | want.zmean << 1 | want.log_sum_p2 << 2) + 8 * want.topk,
            -1 if vocab_size is None else vocab_size,
            int(reduce_hidden_grad),
            *(x for _, x in extra),
        ],
        dtype=torch.int64,
        device=y.device,
    )
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    table = torch.stack(parts).cpu()
    if local_error is not None:
        raise local_error
    if bool(table[:, 0].any()):
        bad = table[:, 0].nonzero().flatten().tolist()
        raise ValueError(f"vocabulary-parallel call: the inputs of rank(s) {bad} of the group failed a check")
    fields = tuple((n.replace("targets", targets_name), same) for n, same in _FIELDS)
    for j, (name, same) in enumerate(fields + tuple((name, True) for name, _ in extra)):
        if same and bool((table[:, j] != table[0, j]).any()):
            raise ValueError(
                f"vocabulary-parallel call: ranks disagree on {name} (per rank: {table[:, j].tolist()}); "
                "every rank of the group must pass the same tokens, targets, options and hidden size"
            )
    sizes = table[:, 2].tolist()
    total = sum(sizes)
    vocab = total if vocab_size is None else vocab_size
    if not 0 < vocab <= total:
        raise ValueError(
            f"vocab_size={vocab_size} must be in (0, {total}] (the sum of the local vocabulary slices "
            f"{sizes}); rows past vocab_size are padding"
        )
    start = sum(sizes[:rank])
    return Shard(group, world, start, max(0, min(v_local, vocab - start)), vocab)


# ----------------------------------------------------------------------------------------------
# forward combine
# ----------------------------------------------------------------------------------------------


def remap_targets(y: torch.Tensor, sh: Shard, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(local targets, hit)``: ids on this rank in local numbering, other ranks' ids -> 0,
    ignored rows -> ``_LOCAL_IGNORE``; ``hit`` marks the rows whose target is on this rank."""
    valid = y != ignore_index
    hit = valid & (y >= sh.start) & (y < sh.start + sh.valid)
    local = torch.where(hit, y - sh.start, torch.zeros_like(y))
    return torch.where(valid, local, torch.full_like(y, _LOCAL_IGNORE)), hit


def local_request(want: StatRequest, sh: Shard) -> StatRequest:
    return StatRequest(want.entropy, want.zmean, want.log_sum_p2, min(want.topk, sh.valid))


def _empty_local(n: int, want: StatRequest, cdt, dev) -> TokenStats:
    """The statistics of an empty slice (a rank holding only padding): lse = -inf."""
    z = torch.zeros(n, dtype=cdt, device=dev)
    return TokenStats(z, torch.full_like(z, -math.inf), z, z, z, None, None)


def combine(st: TokenStats, hit, valid, sh: Shard, want: StatRequest) -> TokenStats:
    """The global statistics from this rank's local ``st`` (module docstring)."""
    lse_r = st.lse
    m = lse_r.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=sh.group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(lse_r - m)
    has = e > 0
    cols = [e, torch.where(hit, st.logp + lse_r, 0.0)]
    if want.entropy:
        cols.append(torch.where(has, e * (lse_r - st.entropy), 0.0))
    if want.zmean:
        cols.append(st.zmean * sh.valid)
    if want.log_sum_p2:
        cols.append(torch.where(has, e * e * torch.exp(st.log_sum_p2), 0.0))
    packed = torch.stack(cols, 1)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=sh.group)
    zero = torch.zeros((), dtype=lse_r.dtype, device=lse_r.device)

    def masked(x):
        return torch.where(valid, x, zero)

    s = packed[:, 0]
    log_s = torch.log(torch.where(valid, s, 1.0))
    lse = m + log_s
    out = {"logp": masked(packed[:, 1] - lse), "lse": masked(lse)}
    j = 2
    if want.entropy:
        out["entropy"] = masked(lse - packed[:, j] / s)
        j += 1
    if want.zmean:
        out["zmean"] = masked(packed[:, j] / sh.vocab)
        j += 1
    if want.log_sum_p2:
        out["log_sum_p2"] = masked(torch.log(torch.where(valid, packed[:, j], 1.0)) - 2.0 * log_s)
    if want.topk:
        out["topk_ids"], out["topk_logps"] = _merge_topk(st, lse_r, lse, valid, sh, want.topk)
    return TokenStats(**out)


def _merge_topk(st: TokenStats, lse_r, lse, valid, sh: Shard, k: int):
    """The global top-k from every rank's local top-k (one all-gather of ``[N, K]`` values and ids)."""
    n = lse.shape[0]
    vals = torch.full((n, k), -math.inf, dtype=lse.dtype, device=lse.device)
    ids = torch.full((n, k), -1, dtype=torch.int64, device=lse.device)
    if st.topk_ids is not None:
        kr = st.topk_ids.shape[1]
        vals[:, :kr] = st.topk_logps + lse_r.unsqueeze(1)  # local logits z
        ids[:, :kr] = st.topk_ids + sh.start
    all_v, all_i = (_all_gather_cat(x, sh) for x in (vals, ids))
    top, pick = all_v.topk(k, dim=1)
    top_ids = all_i.gather(1, pick)
    return (
        torch.where(valid[:, None], top_ids, -1),
        torch.where(valid[:, None], top - lse.unsqueeze(1), torch.zeros((), dtype=lse.dtype)),
    )


def _all_gather_cat(x: torch.Tensor, sh: Shard) -> torch.Tensor:
    """``[N, K]`` from every rank, concatenated in rank order: ``[N, P * K]``."""
    parts = [torch.empty_like(x) for _ in range(sh.world)]
    dist.all_gather(parts, x, group=sh.group)
    return torch.cat(parts, 1)


def local_grads(grads: TokenStats, hit, sh: Shard) -> tuple:
    """The upstream gradients for this rank's engine backward (module docstring), as the op's
    ``g_*`` arguments (None = zero)."""
    g_logp, g_lse, g_ent, g_zmean, g_lsp2 = grads[:5]
    if g_logp is not None:
        off = torch.where(hit, 0.0, g_logp)
        g_lse = -off if g_lse is None else g_lse - off
        g_logp = torch.where(hit, g_logp, 0.0)
    if g_zmean is not None:
        g_zmean = g_zmean * (sh.valid / sh.vocab)
    return g_logp, g_lse, g_ent, g_zmean, g_lsp2


def _saved_args(saved: TokenStats, like: torch.Tensor):
    return c.pack(saved.lse, like), c.pack(saved.entropy, like), c.pack(saved.log_sum_p2, like)


def _local_problem(targets, sh: Shard, opts: LogitOptions, want: StatRequest):
    """This rank's share of the problem: ``(y [N], valid [N], y_local [N], hit [N], lopts, lwant)``,
    the flat global targets, their non-ignored mask, the targets remapped to this slice (see
    :func:`remap_targets`) and the options / request of the local engine call."""
    y = targets.reshape(-1).long()
    valid = y != opts.ignore_index
    y_local, hit = remap_targets(y, sh, opts.ignore_index)
    lopts = LogitOptions(_LOCAL_IGNORE, opts.logit_scale, opts.softcap, opts.temperature)
    return y, valid, y_local, hit, lopts, local_request(want, sh)


def _forward_outputs(ctx, g: TokenStats, sh: Shard, lopts: LogitOptions) -> tuple:
    """The op's seven tensors of the global stats ``g``; keeps on ``ctx`` what the backward needs
    (top-k ids and log-probs have no gradient)."""
    ctx.sh, ctx.lopts = sh, lopts
    ctx.set_materialize_grads(False)
    outs = c.pack_stats(g)
    ctx.mark_non_differentiable(outs[5], outs[6])
    return outs


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


class LinearVocabParallelFunction(torch.autograd.Function):
    """Global :class:`TokenStats` (as the op's seven tensors) of ``hidden [N, H]`` under this rank's
    ``weight [V_r', H]`` / ``bias [V_r']`` (padding rows already cut off)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, sh: Shard, opts: LogitOptions, want, reduce_dh):
        y, valid, y_local, hit, lopts, lwant = _local_problem(targets, sh, opts, want)
        n = hidden.shape[0]
        if sh.valid > 0:
            out = linear_logprobs_fwd_op(hidden, weight, y_local, bias, *lopts.as_args(), *lwant)
            st = c.stats_like(out, y_local, lwant)
        else:
            st = _empty_local(n, lwant, compute_dtype(hidden, weight, bias), hidden.device)
        g = combine(st, hit, valid, sh, want)
        ctx.save_for_backward(hidden, weight, bias, y_local, hit, g.lse, g.entropy, g.log_sum_p2)
        ctx.reduce_dh = reduce_dh
        return _forward_outputs(ctx, g, sh, lopts)

    @staticmethod
    def backward(ctx, *grads):
        hidden, weight, bias, y_local, hit, lse, ent, lsp2 = ctx.saved_tensors
        sh = ctx.sh
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        need_db = bool(need_db and bias is not None)
        n = hidden.shape[0]
        g = local_grads(c.unpack_grads(n, grads[:5]), hit, sh)
        dh = dw = db = None
        if sh.valid > 0 and (need_dh or need_dw or need_db):
            saved = TokenStats(None, lse, ent, None, lsp2)
            dh, dw, db = linear_logprobs_bwd_op(
                hidden,
                weight,
                y_local,
                bias,
                *_saved_args(saved, hidden),
                *g,
                *ctx.lopts.as_args(),
                need_dh,
                need_dw,
                need_db,
            )
        elif sh.valid == 0:
            dh, dw = torch.zeros_like(hidden), torch.zeros_like(weight)
            db = None if bias is None else torch.zeros_like(bias)
        if need_dh and ctx.reduce_dh and sh.world > 1:
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=sh.group)
        return (
            dh if need_dh else None,
            dw if need_dw else None,
            db if need_db else None,
            None,
            None,
            None,
            None,
            None,
        )


class VocabParallelFunction(torch.autograd.Function):
    """Global :class:`TokenStats` (as the op's seven tensors) of this rank's logits ``[..., V_r']``
    (padding columns already cut off)."""

    @staticmethod
    def forward(ctx, logits, targets, sh: Shard, opts: LogitOptions, want):
        y, valid, y_local, hit, lopts, lwant = _local_problem(targets, sh, opts, want)
        y_local = y_local.view(targets.shape)  # the engine wants the logits' leading dims
        if sh.valid > 0:
            out = logprobs_fwd_op(logits, y_local, *lopts.as_args(), *lwant, False)
            st = c.stats_like(out, y, lwant)
        else:
            st = _empty_local(y.numel(), lwant, compute_dtype(logits), logits.device)
        g = combine(st, hit, valid, sh, want)
        ctx.save_for_backward(logits, y_local, hit, g.lse, g.entropy, g.log_sum_p2)
        return _forward_outputs(ctx, g, sh, lopts)

    @staticmethod
    def backward(ctx, *grads):
        logits, y_local, hit, lse, ent, lsp2 = ctx.saved_tensors
        sh = ctx.sh
        if not ctx.needs_input_grad[0]:
            return (None,) * 5
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        if sh.valid == 0:
            return (grad.zero_(),) + (None,) * 4
        g = local_grads(c.unpack_grads(y_local.numel(), grads[:5]), hit, sh)
        saved = TokenStats(None, lse, ent, None, lsp2)
        logprobs_bwd_op(logits, y_local, *_saved_args(saved, logits), *g, *ctx.lopts.as_args(), grad)
        return (grad,) + (None,) * 4


# ----------------------------------------------------------------------------------------------
# entry points used by the public functions
# ----------------------------------------------------------------------------------------------


def _check(fn, *args) -> Exception | None:
    """The error ``fn(*args)`` raises (a bad input on this rank), or None."""
    try:
        fn(*args)
    except (TypeError, ValueError) as e:
        return e
    return None


def _check_linear_shard(hidden, weight, targets, bias) -> None:
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == 0:
        # an empty slice is legal here (more ranks than vocabulary rows): check the rest
        weight = weight.new_empty(1, weight.shape[1])
        bias = None if bias is None or bias.shape != (0,) else bias.new_empty(1)
    check_linear_inputs(hidden, weight, targets, bias)


def _check_logits_shard(logits, targets) -> None:
    if isinstance(logits, torch.Tensor) and logits.dim() >= 1 and logits.shape[-1] == 0:
        logits = logits.new_empty(*logits.shape[:-1], 1)
    check_logits_inputs(logits, targets)


def linear_token_stats_parallel(
    hidden, weight, targets, bias, opts: LogitOptions, want: StatRequest, group, vocab_size, reduce_dh
) -> TokenStats:
    """:class:`TokenStats` with ``targets.shape`` over the full vocabulary, from this rank's
    ``weight [V_r, H]`` (a tensor, or a DTensor sharded ``Shard(0)``) and ``bias [V_r]``."""
    if is_dtensor(hidden):
        raise TypeError("hidden must be a plain tensor (the same on every rank), not a DTensor")
    weight, group = local_shard("weight", weight, group, 0)
    if bias is not None:
        bias, group = local_shard("bias", bias, group, 0)
    err = _check(_check_linear_shard, hidden, weight, targets, bias)
    sh = plan(
        group,
        linear=True,
        v_local=weight.shape[0] if err is None else -1,
        hidden_size=hidden.shape[-1] if err is None else -1,
        dtypes=(hidden.dtype, weight.dtype, None if bias is None else bias.dtype) if err is None else None,
        has_bias=bias is not None,
        targets=targets,
        opts=opts,
        want=want,
        vocab_size=vocab_size,
        reduce_hidden_grad=reduce_dh,
        local_error=err,
    )
    want = want.checked(sh.vocab)
    y = targets.reshape(-1)
    check_targets_in_range(y, sh.vocab, opts.ignore_index)
    w = weight[: sh.valid] if sh.valid > 0 else weight
    b = None if bias is None else (bias[: sh.valid] if sh.valid > 0 else bias)
    out = LinearVocabParallelFunction.apply(rows_2d(hidden), w, b, y, sh, opts, want, reduce_dh)
    return c.stats_like(out, targets, want)


def token_stats_parallel(logits, targets, opts: LogitOptions, want: StatRequest, group, vocab_size):
    """:class:`TokenStats` with ``targets.shape`` over the full vocabulary, from this rank's
    ``logits [..., V_r]`` (a tensor, or a DTensor sharded on its last dimension)."""
    logits, group = local_shard("logits", logits, group, -1)
    err = _check(_check_logits_shard, logits, targets)
    sh = plan(
        group,
        linear=False,
        v_local=logits.shape[-1] if err is None else -1,
        hidden_size=0,
        dtypes=(logits.dtype,) if err is None else None,
        has_bias=False,
        targets=targets,
        opts=opts,
        want=want,
        vocab_size=vocab_size,
        reduce_hidden_grad=False,
        local_error=err,
    )
    want = want.checked(sh.vocab)
    check_targets_in_range(targets.reshape(-1), sh.vocab, opts.ignore_index)
    x = logits[..., : sh.valid] if sh.valid > 0 else logits
    out = VocabParallelFunction.apply(x, targets, sh, opts, want)
    return c.stats_like(out, targets, want)
