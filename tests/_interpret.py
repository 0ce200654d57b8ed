"""The one harness that runs Triton kernels under ``TRITON_INTERPRET=1`` for every family.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so interpreted cases live
in ``tests/interpreted/<family>.py`` (pytest files that skip themselves unless the variable is
set) and run in a subprocess. ``tests/test_<family>_interpret.py`` is then three lines: a fixture
calling :func:`run_cases` and the test :func:`check_function` per case function, whose names are
read from the case file with ``ast`` (no import: it would skip).

Each subprocess reports through JUnit XML. A crash (for instance a segfault from an int32
offset that wrapped) fails every case of that run with the fatal-error line and our frames.
Run a case file by hand with ``TRITON_INTERPRET=1 python -m pytest tests/interpreted/<family>.py``.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


def case_functions(case_file: str) -> list[str]:
    """Names of the ``test_*`` functions of ``tests/interpreted/<family>.py``, in file order."""
    tree = ast.parse((ROOT / case_file).read_text())
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]


def _tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


def _crash_summary(output: str) -> str:
    """The fatal-error line and the frames in our files, then the end of the output."""
    keep = [
        line
        for line in output.splitlines()
        if "Fatal Python error" in line or "/kernels/" in line or "/interpreted/" in line
    ]
    return "\n".join(keep[:40]) + "\n--- output tail ---\n" + _tail(output, 2000)


def _failure_text(text: str) -> str:
    """pytest's ``E`` lines and ``file:line`` locations of a failure; the whole text if none."""
    keep = [line for line in text.splitlines() if line.startswith("E ") or re.match(r"^\S+\.py:\d+: ", line)]
    return "\n".join(keep) if keep else text


def _run(case_file: str, select: str | None, xml_path: Path) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "ALIGNOPS_POISON": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("ALIGNOPS_BACKEND", None)
    cmd = [sys.executable, "-m", "pytest", case_file, "-q", "-p", "no:cacheprovider"]
    cmd += ["-k", select] if select else []
    cmd += [f"--junitxml={xml_path}", "-o", "junit_family=xunit1"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"cases": {}, "error": f"timed out after {TIMEOUT_S} s\n{_tail(out)}", "wall_s": TIMEOUT_S}
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1) or not xml_path.exists():
        summary = _crash_summary(proc.stdout + proc.stderr)
        return {
            "cases": {},
            "error": f"exited with {proc.returncode} after {wall:.1f} s\n{summary}",
            "wall_s": wall,
        }
    cases = {}
    for tc in ET.parse(xml_path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = tc.find(tag)
            if node is not None:
                outcome, message = tag, _failure_text(node.text or node.get("message") or "")
                break
        cases[tc.get("name")] = (outcome, message)
    return {"cases": cases, "error": None, "wall_s": wall}


def run_cases(case_file: str, tmp: Path, runs: dict[str, str | None]) -> dict[str, dict]:
    """Run ``case_file`` once per entry of ``runs`` (name -> pytest ``-k`` selection; a case that
    could crash the interpreter gets a run of its own so it cannot hide the others)."""
    results = {name: _run(case_file, select, tmp / f"{name}.xml") for name, select in runs.items()}
    walls = ", ".join(f"{k} {v['wall_s']:.1f} s" for k, v in results.items())
    print(f"\ninterpreted {case_file}: {walls}")
    return results


def check_function(results: dict[str, dict], function: str) -> None:
    """Fail unless every case of ``function`` passed in the run that reported it."""
    for run in results.values():
        mine = {k: v for k, v in run["cases"].items() if k == function or k.startswith(function + "[")}
        if mine:
            bad = {k: v for k, v in mine.items() if v[0] != "passed"}
            if bad:
                text = "\n\n".join(f"--- {k}: {o}\n{_tail(msg, 3000)}" for k, (o, msg) in bad.items())
                pytest.fail(f"{len(bad)} of {len(mine)} interpreted cases not passed:\n{text}", pytrace=False)
            return
    errors = "\n".join(run["error"] for run in results.values() if run["error"])
    pytest.fail(errors or f"{function}: no run reported this case function", pytrace=False)
