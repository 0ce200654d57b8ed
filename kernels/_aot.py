"""Ahead-of-time build descriptions of the kernels (for ``alignops kernels --arch ...``).

Each kernel module exposes ``AOT_SPECS: list[AotSpec]``: one entry per configuration its
launchers actually use (block sizes, warps, stages, dtype). ``alignops/build_report.py``
compiles each entry for every requested architecture and reads registers, shared memory
and spills from the cubin. :func:`aot_spec` derives the signature from the kernel's argument
names (the naming grammar of CONTRIBUTING.md), so a family lists only what varies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ._common import MAX_TOPK

TRITON_TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# Integer arguments that real models make multiples of 16 (hidden size, vocab, row strides,
# workspace strides), so the JIT specializes them as such at run time. Their AOT type carries
# Triton's ":16" divisibility hint (the notation of triton/tools/compile.py), as do all
# pointers (torch allocations are 16-byte aligned): without it the compiler cannot vectorize
# the tile loads or pipeline them through shared memory, and the report would describe a kernel
# that never runs. Token counts and chunk offsets are `do_not_specialize`: no hint.
ALIGNED_INTS = frozenset(
    {"H", "V", "stride_hn", "stride_wv", "stride_dr", "stride_db"}
    | {"stride_xb", "stride_xt", "stride_dxb", "stride_dxt"}
    | {"HP", "HQ", "stride_hpn", "stride_wpv", "stride_hqn", "stride_wqv"}
)
# Float scalars of the logit transform (everything else that is not a pointer is an integer).
FLOAT_ARGS = frozenset(
    {"scale", "softcap", "inv_temp", "log_eps", "param"}
    | {f"{a}_{head}" for a in ("scale", "softcap", "inv_temp") for head in ("p", "q")}
)


@dataclass(frozen=True)
class AotSpec:
    """One compile configuration of one ``@triton.jit`` kernel.

    ``signature`` maps every kernel argument name to a Triton type string (``"*bf16"``,
    ``"*fp32"``, ``"i32"``, ``"i64"``, ``"fp32"``) or ``"constexpr"``; ``constexprs`` gives
    the value of every constexpr argument. ``label`` is the human-readable config name
    printed in the report (e.g. ``"bf16 BN=64 BV=128 BD=64 w4 s3"``).
    """

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""


def aot_spec(
    kernel,
    constexprs: dict,
    *,
    pointer_types: dict[str, str],
    warps: int,
    stages: int,
    label: str,
) -> AotSpec:
    """An AotSpec from argument names: pointers (``p_*``) get ``pointer_types[name]`` (default
    fp32), the scalars of :data:`FLOAT_ARGS` are fp32, other arguments i32 (``:16`` for
    :data:`ALIGNED_INTS`). A ``None`` pointer or soft-cap is a constexpr, as at run time."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    fn = kernel
    while isinstance(fn, (Heuristics, Autotuner)):
        fn = fn.fn  # the JITFunction under @triton.heuristics
    signature = {}
    for a in fn.arg_names:
        if a in constexprs:
            signature[a] = "constexpr"
        elif a.startswith("p_"):
            signature[a] = f"*{pointer_types.get(a, 'fp32')}:16"
        elif a in FLOAT_ARGS:
            signature[a] = "fp32"
        else:
            signature[a] = "i32:16" if a in ALIGNED_INTS else "i32"
    return AotSpec(
        name=fn.__name__,
        kernel=fn,
        signature=signature,
        constexprs=dict(constexprs),
        num_warps=warps,
        num_stages=stages,
        label=label,
    )


#: Pointer types every family shares: int64 targets and top-k ids, int32 partial top-k ids;
#: other pointers default to fp32 (a family adds its input-dtype pointers).
INDEX_POINTERS = {"p_y": "i64", "p_tkid": "i64", "p_topi": "i32"}
#: The optional statistics of a forward, off (``plain``: log-probs and lse only) or all on
#: (``full``, with the largest top-k: the most registers).
OPTIONAL_OUTPUTS = ("p_ent", "p_zmean", "p_lsp2", "p_tkid", "p_tklp")
#: The optional inputs of a backward (``plain``: only the log-prob gradient).
OPTIONAL_GRADS = ("p_ent", "p_lsp2", "p_glse", "p_gent", "p_gzmean", "p_glsp2")


#: Feature sets of the builds: ``plain`` (log-probs and lse only), ``full`` (every statistic and
#: gradient, bias and soft-cap where the family has them) and ``full`` with the largest top-k.
FEATURES = (("plain", False, 0), ("full", True, 0), (f"full top{MAX_TOPK}", True, MAX_TOPK))


def stat_constexprs(full: bool, topk: int) -> dict:
    """Forward request constexprs of a build (``None`` output pointers for what is off)."""
    cx = {"NEED_ENT": full, "NEED_ZMEAN": full, "NEED_S2": full, "K": topk, "KP": max(topk, 1)}
    off = () if full else OPTIONAL_OUTPUTS[:3]
    return cx | dict.fromkeys(off + (() if topk else OPTIONAL_OUTPUTS[3:]))


def grad_constexprs(full: bool) -> dict:
    """Backward constexprs of a ``plain`` build: every optional gradient pointer ``None``."""
    return {} if full else dict.fromkeys(OPTIONAL_GRADS)
