"""Peak extra memory of one step: the CUDA allocator in-process, or RSS in a fresh CPU process.

The method is described in the manual (``_harness``). On CPU, :class:`MemoryServer` sends each
(case, provider) to ``python -m alignops.bench._memserver``, which forks a fresh child for it;
:func:`measure_in_child` is what the child runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib
import json
import os
import select
import subprocess
import sys
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
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> MemoryServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", f"{__package__}._memserver"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                bufsize=1,
            )
        return self._proc

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
        request = {
            "module": family_module,
            "case": asdict(case),
            "provider": provider_name,
            "modes": modes,
            "preload": list(preload),
        }
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], MEMORY_CHILD_TIMEOUT_S)
        line = proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            return {m: Memory(None, "fresh process", "no answer from the memory server") for m in modes}
        result = json.loads(line)
        if "error" in result:
            return {m: Memory(None, "fresh process", result["error"]) for m in modes}
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
            self._proc = None
