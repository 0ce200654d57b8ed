"""Ahead-of-time build descriptions of the kernels (for ``alignops kernels --arch ...``).

Each kernel module exposes ``AOT_SPECS: list[AotSpec]``: one entry per configuration its
launchers actually use (block sizes, warps, stages, dtype). ``alignops/build_report.py``
compiles each entry for every requested architecture and reads registers, shared memory
and spills from the cubin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
