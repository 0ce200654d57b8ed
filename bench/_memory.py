"""Peak extra memory of one step: the CUDA allocator in-process, or RSS in a fresh CPU process.

The method is described in the manual (``_harness``). On CPU, :class:`MemoryServer` sends each
(case, provider) to ``python -m alignops.bench._memserver``, which forks a fresh child for it;
:func:`measure_in_child` is what the child runs.

The server imports the installed ``alignops`` whatever the working directory: it starts in an
empty private directory, so a checkout's ``alignops/`` folder (the source of the package, without
the ``kernels`` / ``bench`` mapping) can never shadow it. What the server and its children print
(warnings of torch.compile, Triton, transformers) goes to a log file, not to the terminal; the
end of that log comes back with any failed measurement.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ._harness import Bound, Case, find_provider, mode_steps

MALLOC_MMAP_THRESHOLD_BYTES = 64 * 2**10  # glibc M_MMAP_THRESHOLD in the memory child
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
RSS_SAMPLE_PERIOD_S = 0.001
MEMORY_CHILD_TIMEOUT_S = 1800.0
# The installed module, imported by name (never a path relative to the working directory).
MEMSERVER_MODULE = "alignops.bench._memserver"
LOG_TAIL_LINES = 8  # lines of the server's log attached to a failed measurement


@dataclass
class Memory:
    peak_extra_bytes: int | None
    method: str
    error: str = ""


def memory_cuda(bound: Bound, mode: str) -> Memory:
    setup, run = mode_steps(bound, mode)
    setup()
    run()  # warm-up: autotuning and workspace allocations are not part of the step
    setup()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    setup()
    return Memory(int(peak), "cuda allocator max_memory_allocated")


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _tune_malloc() -> Callable[[], None]:
    """Make RSS follow live bytes (see the manual); returns a heap-trim function."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, 0)
        libc.mallopt(_M_TOP_PAD, 0)
        return lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        return lambda: None


def _peak_during(run: Callable[[], None]) -> tuple[int, int, str]:
    """``(peak KiB, base KiB, method)`` of the RSS while ``run()`` executes."""
    if _reset_hwm():
        base_kib = _status_kib("VmRSS")
        run()
        return _status_kib("VmHWM"), base_kib, "VmHWM - VmRSS (clear_refs)"
    samples = [_status_kib("VmRSS")]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(_status_kib("VmRSS"))
            time.sleep(RSS_SAMPLE_PERIOD_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run()
    done.set()
    sampler.join()
    samples.append(_status_kib("VmRSS"))
    return max(samples), samples[0], f"RSS sampled every {RSS_SAMPLE_PERIOD_S * 1e3:g} ms (lower bound)"


def measure_in_child(family_module: str, case_fields: dict, provider_name: str, modes: list[str]) -> dict:
    """Peak extra RSS of each mode, in this (fresh) process; see the manual."""
    trim = _tune_malloc()
    mod = importlib.import_module(family_module)
    case = Case(**case_fields)
    bound = find_provider(mod.providers(), provider_name).build(case, mod.make_inputs(case))
    setup, run = mode_steps(bound, "fwd+bwd")
    setup()
    run()  # warm-up: torch.compile loads its graphs, thread pools start
    results = {}
    for mode in modes:
        setup, run = mode_steps(bound, mode)
        setup()
        gc.collect()
        trim()
        peak_kib, base_kib, method = _peak_during(run)
        setup()  # free this mode's outputs and gradients before the next
        results[mode] = {
            "peak_extra_bytes": (peak_kib - base_kib) * 1024,
            "method": f"fresh process per (case, provider), {method}, "
            f"mmap threshold {MALLOC_MMAP_THRESHOLD_BYTES >> 10} KiB",
        }
    return results


class MemoryServer:
    """Runs CPU memory measurements, each in a fresh process.

    A helper interpreter (``python -m alignops.bench._memserver``) imports torch, alignops and the
    family modules once and then forks one child per measurement: the child starts with no tensor
    and no thread pool of the benchmark process, in milliseconds rather than the seconds an
    interpreter start with torch costs. Use as a context manager; one server serves a whole run.

    The server runs in a private empty directory (so the working directory, a checkout's root for
    instance, is not on its ``sys.path``) and writes its stderr to ``server.log`` there.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._dir: str | None = None
        self._log = None

    def __enter__(self) -> MemoryServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self.close()
            self._dir = tempfile.mkdtemp(prefix="alignops-memserver-")
            self._log = open(os.path.join(self._dir, "server.log"), "w+")
            self._proc = subprocess.Popen(
                [sys.executable, "-m", MEMSERVER_MODULE],
                cwd=self._dir,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log,
                text=True,
                bufsize=1,
            )
        return self._proc

    def _log_tail(self, since: int) -> str:
        """The last lines the server wrote after offset ``since`` of its log, on one line."""
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(since)
        lines = [line.rstrip() for line in self._log.read().splitlines() if line.strip()]
        self._log.seek(0, os.SEEK_END)
        return " | ".join(lines[-LOG_TAIL_LINES:])

    def measure(
        self,
        family_module: str,
        case: Case,
        provider_name: str,
        modes: list[str],
        preload: tuple[str, ...] = (),
    ) -> dict[str, Memory]:
        """One fresh process measures every mode of ``modes``, one after the other."""
        if not os.path.exists("/proc/self/status") or not hasattr(os, "fork"):
            return {m: Memory(None, "unavailable", "needs Linux (fork, /proc) to measure RSS") for m in modes}
        proc = self._start()
        since = self._log.seek(0, os.SEEK_END)
        request = {
            "module": family_module,
            "case": asdict(case),
            "provider": provider_name,
            "modes": modes,
            "preload": list(preload),
        }
        try:
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
        except OSError:  # the server died (its log says why)
            pass
        ready, _, _ = select.select([proc.stdout], [], [], MEMORY_CHILD_TIMEOUT_S)
        line = proc.stdout.readline() if ready else ""
        if not line:
            if ready:  # end of file: the server exited; let it finish writing its log
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            tail = self._log_tail(since)
            self.close()
            error = "the memory server stopped" + (f": {tail}" if tail else "")
            return {m: Memory(None, "fresh process", error) for m in modes}
        result = json.loads(line)
        if "error" in result:
            tail = self._log_tail(since)
            error = result["error"] + (f" (log: {tail})" if tail else "")
            return {m: Memory(None, "fresh process", error) for m in modes}
        return {m: Memory(int(r["peak_extra_bytes"]), r["method"]) for m, r in result.items()}

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.stdin.close()
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc.stdout.close()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
