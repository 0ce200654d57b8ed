"""Interpreted case of the vocabulary-parallel path on the Triton engine: 2 and 4 gloo processes
(``tests/_distributed.py``), float32 linear log-probs with every statistic and top-k, values and
gradients against float64. Run by ``tests/test_vocab_parallel_interpret.py``; by hand:
``TRITON_INTERPRET=1 python -m pytest tests/interpreted/vocab_parallel.py -q``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before import (see module docstring)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _distributed import run  # noqa: E402
from _distributed_cases import triton_cases  # noqa: E402


def test_vocab_parallel_triton_2_ranks():
    run(2, triton_cases)


def test_vocab_parallel_triton_4_ranks():
    run(4, triton_cases)
