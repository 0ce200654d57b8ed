"""Benchmark family ``divergence``: full-distribution divergences between two LM heads.

A placeholder until alignops has the two-head divergence kernel family (DESIGN "The light part":
forward / reverse KL, JSD, ... without ``[N, V]`` tensors). The harness skips it with the note
below; write ``make_inputs`` and the providers here when the public function lands.
"""

from __future__ import annotations

import alignops

from ._harness import Case, Inputs, Provider

FAMILY = "divergence"
RATE_UNIT = "TFLOP/s"
GRAD_NAMES: list[str] = []
# Names the public function may take (alignops.<name>); the first one found is reported.
CANDIDATE_API_NAMES = ("linear_divergence", "linear_kl_divergence", "linear_jsd", "divergence")


def unavailable() -> str | None:
    found = [name for name in CANDIDATE_API_NAMES if hasattr(alignops, name)]
    if not found:
        names = ", ".join(CANDIDATE_API_NAMES)
        return f"no divergence family in alignops yet (looked for alignops.{{{names}}})"
    return f"alignops.{found[0]} exists but bench/divergence.py has no providers for it yet"


def make_inputs(case: Case) -> Inputs:
    raise NotImplementedError(unavailable())


def flops(case: Case, mode: str) -> float:
    return 0.0


def bytes_moved(case: Case, mode: str) -> float:
    return 0.0


def grads_bytes(case: Case) -> int:
    return 0


def providers() -> list[Provider]:
    return []
