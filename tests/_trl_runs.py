"""TRL trainer runs shared by the test files (one run per (trainer, head, steps) per session)."""

from __future__ import annotations

import functools


@functools.cache
def trainer_run(kind: str, use_alignops: bool, steps: int = 3) -> dict:
    from alignops.bench.trl_trainers import run_trainer

    return run_trainer(kind, use_alignops, steps=steps)
