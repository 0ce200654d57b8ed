"""Triton kernels of the fused linear log-probs (``kernels/linear_logprobs.py``) under the
interpreter, against the float64 reference (SPEC §1.1).

``TRITON_INTERPRET`` must be set before the kernels are decorated, so the cases live in
``tests/_interpret_worker.py`` and run in subprocesses (about 30 s in all on 2 cores). Each
test below reports one case function of the worker, read back from the subprocess's JUnit
XML; a crash of a subprocess (for instance a segfault from an int32 offset that wrapped) fails
the tests of that run with the fatal error and the frames in our files.

What the worker checks (details in its docstring):
  test_fwd_bwd_against_reference  logp / entropy / lse / zmean and dh / dW / db for fp32, fp16,
                                  bf16; default and small-block configs; vocab split; chunked
                                  backward; bias, soft-cap, temperature; ignored and all-ignored
                                  rows (exact zeros); |z| ~ 1e4; a row-strided hidden; missing
                                  upstream gradients and partial needs
  test_vocab_split_matches_no_split   1, 2 and 7 vocab splits agree
  test_int64_offsets              hidden / weight rows beyond 2**31 elements
  test_poison_catches_unwritten_outputs   a launch short of one block leaves NaN that fails
  test_public_api_reaches_triton  alignops.linear_logprobs with ALIGNOPS_BACKEND=triton
  test_bad_inputs_raise           ValueError / TypeError on bad inputs
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.interpret

ROOT = Path(__file__).resolve().parents[1]
WORKER = "tests/_interpret_worker.py"
TIMEOUT_S = 170

CASE_FUNCTIONS = [
    "test_fwd_bwd_against_reference",
    "test_vocab_split_matches_no_split",
    "test_int64_offsets",
    "test_poison_catches_unwritten_outputs",
    "test_public_api_reaches_triton",
    "test_bad_inputs_raise",
]


# Worker runs: the int64 case alone, so that a segfault there (an offset that wrapped) cannot
# hide the results of the others.
RUNS = {"main": "not test_int64_offsets", "int64": "test_int64_offsets"}


def _run_of(function: str) -> str:
    return "int64" if function == "test_int64_offsets" else "main"


def _tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


def _crash_summary(output: str) -> str:
    """The fatal-error line and the frames in our files, then the end of the output."""
    keep = [
        line
        for line in output.splitlines()
        if "Fatal Python error" in line or "/kernels/" in line or "_interpret_worker.py" in line
    ]
    return "\n".join(keep[:40]) + "\n--- output tail ---\n" + _tail(output, 2000)


def _failure_text(text: str) -> str:
    """pytest's ``E`` lines and ``file:line`` locations of a failure; the whole text if none."""
    keep = [line for line in text.splitlines() if line.startswith("E ") or re.match(r"^\S+\.py:\d+: ", line)]
    return "\n".join(keep) if keep else text


def _run_worker(select: str, xml_path: Path) -> dict:
    """``{"cases": {name: (outcome, message, seconds)}, "error": str | None, "wall_s": float}``."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "ALIGNOPS_POISON": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("ALIGNOPS_BACKEND", None)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        WORKER,
        "-q",
        "-p",
        "no:cacheprovider",
        "-k",
        select,
        f"--junitxml={xml_path}",
        "-o",
        "junit_family=xunit1",
    ]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {
            "cases": {},
            "error": f"worker timed out after {TIMEOUT_S} s\n{_tail(out)}",
            "wall_s": TIMEOUT_S,
        }
    wall = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    if proc.returncode not in (0, 1) or not xml_path.exists():
        error = f"worker exited with {proc.returncode} after {wall:.1f} s\n{_crash_summary(output)}"
        return {"cases": {}, "error": error, "wall_s": wall}
    cases = {}
    for tc in ET.parse(xml_path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = tc.find(tag)
            if node is not None:
                outcome, message = tag, _failure_text(node.text or node.get("message") or "")
                break
        cases[tc.get("name")] = (outcome, message, float(tc.get("time", 0.0)))
    return {"cases": cases, "error": None, "wall_s": wall}


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("interpret")
    results = {name: _run_worker(select, tmp / f"{name}.xml") for name, select in RUNS.items()}
    walls = ", ".join(f"{k} {v['wall_s']:.1f} s" for k, v in results.items())
    print(f"\ninterpreted linear log-probs worker runs: {walls}")
    return results


@pytest.mark.parametrize("function", CASE_FUNCTIONS)
def test_interpreted(worker_results, function):
    run = worker_results[_run_of(function)]
    if run["error"]:
        pytest.fail(run["error"], pytrace=False)
    mine = {k: v for k, v in run["cases"].items() if k == function or k.startswith(function + "[")}
    assert mine, f"{function}: the worker reported no such case"
    bad = {k: v for k, v in mine.items() if v[0] != "passed"}
    if bad:
        report = "\n\n".join(f"--- {k}: {o}\n{_tail(msg, 3000)}" for k, (o, msg, _) in bad.items())
        pytest.fail(f"{len(bad)} of {len(mine)} interpreted cases not passed:\n{report}", pytrace=False)
