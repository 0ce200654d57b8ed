"""``alignops bench --gpu-check``: the first GPU run as one command (under 8 minutes).

On a CUDA machine it (1) runs the test suite's CUDA tests (``pytest -m cuda``, when the tests
are present: a source checkout), then (2) times alignops against Liger-Kernel, Cut
Cross-Entropy, TRL's chunked head, ``torch.compile`` and eager PyTorch, forward + backward in
bf16, at the two shapes with published figures (N=8192, H=2304, V=256000, Gemma-2 2B's head
with its soft-cap; N=16384, H=2048, V=248320) plus one DPO and one GRPO step, and prints the
bench table: time (p50), peak extra memory and the share of the roofline (``roof%``: flops of
the mathematically required ``6 N V H`` for forward + backward at the device's bf16 peak; the
fused path executes ``8 N V H``, the logits being recomputed in the backward, so its
tensor-core utilisation is 4/3 of that share). Without CUDA it says so and exits with 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

#: Wall-clock limits of the two parts (seconds): together under 8 minutes.
TESTS_TIMEOUT_S = 150
BENCH_BUDGET_S = 0.5  # repetition time per (provider, mode)

PUBLISHED = (
    # (label, bench arguments)
    (
        "N=8192 H=2304 V=256000 (gemma2-2b head)",
        ["--family", "linear_cross_entropy", "--model", "gemma2-2b", "--tokens", "8192"],
    ),
    (
        "N=16384 H=2048 V=248320",
        [
            "--family",
            "linear_cross_entropy",
            "--model",
            "llama3-8b",
            "--hidden",
            "2048",
            "--vocab",
            "248320",
            "--tokens",
            "16384",
        ],
    ),
    ("DPO and GRPO steps", ["--family", "dpo_step,grpo_step", "--model", "qwen2.5-0.5b", "--tokens", "8192"]),
)
COMMON = ["--dtype", "bfloat16", "--device", "cuda", "--mode", "fwd+bwd", "--no-save"]


def _tests_dir() -> Path | None:
    root = Path(__file__).resolve().parents[1]
    return root / "tests" if (root / "tests" / "conftest.py").exists() else None


def run_cuda_tests() -> int:
    tests = _tests_dir()
    if tests is None:
        print("gpu-check: no test suite next to the package (not a source checkout): tests skipped")
        return 0
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", str(tests)]
    print("gpu-check: " + " ".join(cmd), flush=True)
    try:
        return subprocess.run(cmd, cwd=tests.parent, timeout=TESTS_TIMEOUT_S).returncode
    except subprocess.TimeoutExpired:
        print(f"gpu-check: the CUDA tests passed the {TESTS_TIMEOUT_S} s limit")
        return 1


def main(argv: list[str] | None = None) -> int:
    del argv
    if not torch.cuda.is_available():
        print(
            "alignops bench --gpu-check: no CUDA device here (torch.cuda.is_available() is False); "
            "nothing was run",
            file=sys.stderr,
        )
        return 2
    from .cli import main as bench_main

    start = time.perf_counter()
    print(f"gpu-check on {torch.cuda.get_device_name()} (torch {torch.__version__})", flush=True)
    rc = run_cuda_tests()
    verdict = "passed" if rc in (0, 5) else "FAILED"  # 5: no test selected
    print(f"gpu-check: CUDA tests {verdict} ({time.perf_counter() - start:.0f} s)")
    os.environ.setdefault("ALIGNOPS_BENCH_SEQ_LEN", "512")
    for label, args in PUBLISHED:
        print(f"\n=== {label} ===", flush=True)
        bench_main([*args, *COMMON, "--budget-s", str(BENCH_BUDGET_S)])
    print(f"\ngpu-check done in {time.perf_counter() - start:.0f} s")
    return 0 if rc in (0, 5) else 1
