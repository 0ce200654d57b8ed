"""TRL trainer runs shared by the test files (each (trainer, head, steps) runs once per pytest run)."""

from __future__ import annotations

import functools


@functools.cache
def trainer_run(kind: str, use_alignops: bool, steps: int = 3, beta: float | None = None) -> dict:
    """``kind`` among the bench's trainers, or ``"sft-packed"``: SFT with packed, padding-free rows
    (``packing=True, padding_free=True``: one row per batch, ``position_ids`` restarting per
    sequence). ``beta``: the DistillationTrainer's divergence (``kind="distill"``)."""
    from alignops.bench.trl_trainers import run_trainer

    if kind == "sft-packed":
        return run_trainer("sft", use_alignops, steps=steps, packing=True, padding_free=True)
    if beta is not None:
        return run_trainer(kind, use_alignops, steps=steps, beta=beta)
    return run_trainer(kind, use_alignops, steps=steps)
