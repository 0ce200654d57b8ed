"""Host-side helpers of the Triton launchers (every family): the launch seam, interpreter
switches, per-token vector preparation and the fp32-accumulating GEMM used by backwards.

Imports only torch: the families import Triton themselves.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

from . import constants as C
from ._common import StatRequest, TokenStats, check_saved, empty


def launch(kernel, grid: tuple[int, ...], **kwargs) -> None:
    """The single launch seam (tests shrink the grid here to prove unwritten outputs are caught).
    Families call it as ``_launch.launch(...)`` so that a patch of this attribute reaches them."""
    kernel[grid](**kwargs)


def interpreting() -> bool:
    """``TRITON_INTERPRET=1``: the kernels run on the CPU (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise ValueError("the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def dot_flags(a: torch.dtype, b: torch.dtype, dot: torch.dtype) -> dict:
    """Constexprs of a kernel whose ``tl.dot`` takes operands of dtypes ``a`` and ``b`` rounded
    to ``dot`` (``kernels/_jit.py::dot_operands``): ``CAST_*`` where an operand is wider than
    ``dot``; ``INTERP_BF16`` for a bf16 dot under the interpreter (triton issue 11584 and the
    interpreter's truncating bf16 cast; never on for a GPU); and the fp32 dot precision: TF32
    only where torch's float32 matmul precision allows it (the default "highest" is IEEE)."""
    tf32 = dot == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return {
        "CAST_H": a != dot,
        "CAST_W": b != dot,
        "INTERP_BF16": interpreting() and dot == torch.bfloat16,
        "INPUT_PRECISION": "tf32" if tf32 else "ieee",
    }


def vec(x: torch.Tensor | None, n: int, name: str) -> torch.Tensor | None:
    """An O(N) per-token vector as contiguous fp32 (a copy of at most N floats)."""
    if x is None:
        return None
    if x.shape != (n,):
        raise ValueError(f"{name} must be [{n}], got {tuple(x.shape)}")
    return x.to(torch.float32).contiguous()


@functools.lru_cache(maxsize=16)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a default when it cannot be asked)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return C.DEFAULT_SM_COUNT


#: torch has ``torch.mm(a, b, out_dtype=torch.float32)`` (16-bit operands, fp32 output on
#: tensor cores) from version 2.8 on: the ``aten::mm.dtype`` overload.
MM_OUT_DTYPE_MIN_TORCH = "2.8"
_HAS_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()
_slow_path_warned = False


class SlowPathWarning(UserWarning):
    """A backward GEMM runs on a path much slower than the tensor cores (given once per process)."""


def _warn_slow_path(reason: str) -> None:
    global _slow_path_warned
    if not _slow_path_warned:
        _slow_path_warned = True
        warnings.warn(
            f"alignops: the backward's dh product runs as an IEEE fp32 matmul on upcast operands "
            f"(about 10x slower than 16-bit tensor cores on an H100): {reason}. "
            f"torch >= {MM_OUT_DTYPE_MIN_TORCH} with CUDA has torch.mm(..., out_dtype=torch.float32).",
            SlowPathWarning,
            stacklevel=3,
        )


def _tensor_core_device(t: torch.Tensor) -> bool:
    """Whether ``t`` lives where 16-bit GEMMs with an fp32 output are expected (CUDA)."""
    return t.is_cuda


def mm_accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with an fp32 accumulator ``acc`` and fp32 products.

    fp32 operands: one ``addmm_``. 16-bit operands on CUDA: cuBLAS with an fp32 output
    (``torch.mm(..., out_dtype=torch.float32)``, torch >= ``MM_OUT_DTYPE_MIN_TORCH``). Where that
    is missing or refuses the operands, the operands are upcast (bounded: one workspace chunk
    and one weight chunk) and an IEEE fp32 ``addmm_`` runs, with a one-time
    :class:`SlowPathWarning` on CUDA: never a silent slow path. On the CPU (interpreter tests)
    the upcast is the ordinary path and says nothing.
    """
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if _tensor_core_device(a):
        if not _HAS_MM_OUT_DTYPE:
            _warn_slow_path(f"torch {torch.__version__} has no torch.mm(..., out_dtype=...)")
        else:
            try:
                acc.add_(torch.mm(a, b, out_dtype=torch.float32))
                return
            except (TypeError, RuntimeError, NotImplementedError) as e:
                _warn_slow_path(f"torch.mm(..., out_dtype=torch.float32) failed ({type(e).__name__}: {e})")
    acc.addmm_(a.float(), b.float())


@contextlib.contextmanager
def tf32_products(enabled: bool):
    """Let fp32 matmuls inside the block use TF32 tensor cores (``enabled`` only; the previous
    ``torch.get_float32_matmul_precision()`` is restored on exit). Used for the fp32 products
    of fp16 operands (``linear_logprobs.workspace_dtype``): fp16 values are exact in TF32."""
    if not enabled:
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def option_args(opts) -> dict:
    """The kernels' scalar arguments of a ``LogitOptions``."""
    return dict(
        ignore_index=opts.ignore_index,
        scale=opts.logit_scale,
        softcap=opts.softcap,
        inv_temp=1.0 / opts.temperature,
    )


def stat_outputs(n: int, want: StatRequest, device) -> TokenStats:
    """Output buffers of a forward: the requested ``[N]`` fp32 statistics and the ``[N, K]`` top-k."""

    def vec_out(need: bool):
        return empty((n,), dtype=torch.float32, device=device) if need else None

    k = want.topk
    return TokenStats(
        vec_out(True),
        vec_out(True),
        vec_out(want.entropy),
        vec_out(want.zmean),
        vec_out(want.log_sum_p2),
        empty((n, k), dtype=torch.int64, device=device) if k else None,
        empty((n, k), dtype=torch.float32, device=device) if k else None,
    )


def stat_args(stats: TokenStats, want: StatRequest) -> dict:
    """Output pointers and request constexprs of a forward kernel (``KP``: the top-k slots
    rounded up to a power of two, as ``tl.arange`` needs)."""
    return dict(
        p_logp=stats.logp,
        p_lse=stats.lse,
        p_ent=stats.entropy,
        p_zmean=stats.zmean,
        p_lsp2=stats.log_sum_p2,
        p_tkid=stats.topk_ids,
        p_tklp=stats.topk_logps,
        NEED_ENT=want.entropy,
        NEED_ZMEAN=want.zmean,
        NEED_S2=want.log_sum_p2,
        **topk_args(want),
    )


def topk_args(want: StatRequest) -> dict:
    return dict(K=want.topk, KP=triton_next_power_of_2(max(want.topk, 1)))


def triton_next_power_of_2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def backward_args(saved: TokenStats, grads: TokenStats, n: int) -> dict:
    """Pointers of a backward kernel: the forward's ``lse`` (and ``entropy`` / ``log_sum_p2`` when
    their gradient is given) and the upstream gradients, as contiguous fp32 ``[N]`` (``None``:
    zero gradient, a constexpr for the kernel)."""
    check_saved(saved, grads)
    return dict(
        p_lse=vec(saved.lse, n, "lse"),
        p_ent=vec(saved.entropy, n, "entropy") if grads.entropy is not None else None,
        p_lsp2=vec(saved.log_sum_p2, n, "log_sum_p2") if grads.log_sum_p2 is not None else None,
        p_glogp=vec(grads.logp, n, "grad of logp"),
        p_glse=vec(grads.lse, n, "grad of lse"),
        p_gent=vec(grads.entropy, n, "grad of entropy"),
        p_gzmean=vec(grads.zmean, n, "grad of zmean"),
        p_glsp2=vec(grads.log_sum_p2, n, "grad of log_sum_p2"),
    )
