"""The benchmark harness behind ``alignops bench``: cases, providers, timing, memory, roofline.

Manual
======

``alignops bench`` compares alignops with what people use instead, on the device at hand, for
every kernel family under ``bench/``::

    alignops bench --quick                                  # < 2 min on a 2-core CPU
    alignops bench --family linear_cross_entropy --model llama3-8b --tokens 4096,16384 --dtype bfloat16
    alignops bench --family cross_entropy --providers alignops,torch,liger --mode fwd+bwd
    alignops bench --family linear_cross_entropy --tokens 4096 --hidden 1024 --vocab 65536 \\
                   --dtype float32 --mode fwd+bwd              # memory report (H/V overrides)
    alignops bench --list                                   # families, providers, models

Options: ``--family`` ``--model`` ``--tokens`` (comma lists) ``--hidden`` ``--vocab`` ``--softcap``
``--providers`` ``--dtype`` ``--device {auto,cpu,cuda}`` ``--mode {fwd,bwd,fwd+bwd,all}``
``--out DIR`` (default ``bench/results``) ``--tag`` ``--plot`` ``--no-memory`` ``--no-save``
``--memory-report`` ``--budget-s``.

Providers (a family lists the ones that apply): ``alignops`` (the public API); ``torch`` (the
package reference ``alignops.reference``, eager, full logits: the baseline of the ``x torch``
column); ``torch.compile`` (the same reference under ``torch.compile(dynamic=False)``);
``torch-native`` (``F.cross_entropy`` on fp32 logits, the line people write; the reference also
computes entropy and mean-logit terms, so it is slower than what people run); ``torch-chunked``
(``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions()``, torch >= 2.13); ``liger`` and
``cce`` when importable and runnable. A provider that cannot run is skipped with its reason.

What is measured, per case (family, model shape, tokens N, dtype) and mode:

* modes: ``fwd`` is a training forward (inputs require grad; the graph is kept alive),
  ``bwd`` is the backward alone (its forward runs untimed before each repetition), ``fwd+bwd``
  both. Gradients are reset to ``None`` before each repetition, as ``zero_grad()`` does.
* agreement: every provider first runs one fwd+bwd whose loss and gradients are compared with
  alignops' (relative L2 error, tolerance by dtype in ``TOLERANCE_REL``); ``DIFF`` marks a miss.
* time, CUDA: CUDA events around each repetition, the L2 cache flushed before each, warm-up
  excluded, about ``CUDA_REP_MS`` of repetitions (as ``triton.testing.do_bench``). Reported:
  median and the 20th / 80th percentiles.
* time, CPU: wall time (``perf_counter``) of repetitions for ``budget_s`` seconds (at least
  ``CPU_MIN_REPS``); the agreement run is the warm-up. Median, p20, p80. The header prints the
  load average: on a shared machine CPU timings are only as good as the quiet around them.
* peak extra memory, CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocation just
  before the timed step (peak counters reset between cases).
* peak extra memory, CPU: in a FRESH PROCESS per (case, provider), forked from a server that
  has imported torch and the family module and run nothing. The child builds the inputs, warms
  the op up with one fwd+bwd, then for each mode: frees the last outputs and gradients, trims
  the heap, reads RSS, resets the kernel's high-water mark (``/proc/self/clear_refs`` = 5) and
  runs the step once; peak extra = ``VmHWM`` - RSS before the step. The kernel updates the high-water
  mark before RSS ever drops, so short peaks are not missed. glibc malloc would keep freed
  blocks in its heap (RSS then overstates what is live, and a warm-up hides the next peak), so
  the child sets ``M_MMAP_THRESHOLD`` to ``MALLOC_MMAP_THRESHOLD_BYTES`` and trims the heap:
  every block that size or larger is its own mapping, returned on free, and RSS follows the live
  bytes to the page. Where ``clear_refs`` cannot be written, RSS is sampled every
  ``RSS_SAMPLE_PERIOD_S`` (a lower bound; the method is recorded with every number).
* roofline: FLOP and byte counts per case (formulas in each family module), achieved rate, and
  the fraction of the device bound ``max(FLOP / peak FLOP/s, bytes / peak bytes/s)`` reached.
  Peaks: a per-GPU table (``CUDA_PEAKS``); on CPU (or an unknown GPU) measured at startup with
  a ``PEAK_MATMUL_SIZE``³ matmul in the case dtype and a ``PEAK_COPY_BYTES`` copy.

Output: a table on stdout headed by device, torch / triton versions and the git commit; rows
of the long-format CSV (STYLE §12) appended to ``<out>/<family>.csv``; the whole run as
``<out>/<tag>.json``; with ``--plot``, ``<out>/<family>_<model>_<dtype>.png`` (time and peak extra
memory against tokens, one line per provider). Columns: ``x torch`` = time(torch) / time(row);
``mem/torch`` = memory(row) / memory(torch); ``ao x`` = time(row) / time(alignops), alignops'
speedup over that row; ``ao mem`` = memory(alignops) / memory(row); ``/grads`` = peak extra
memory over the bytes of the gradients the op must return (1.0 is the floor for fwd+bwd).

Sample output (``alignops bench --quick`` on a 2-core CPU, abridged)::

    alignops bench  device: cpu Intel(R) Xeon(R) Processor (2 threads)  torch 2.13.0+cpu  triton 3.9.0
    commit 1a2b3c4  peaks: 98.6 GFLOP/s float32 (measured, 2048^3 matmul), 11.2 GB/s (measured, copy)

    linear_cross_entropy  cpu-small  N=1024 H=256 V=16384  float32  grads 17.0 MiB
    mode     provider          ms p50    p20..p80  TFLOP/s  roof%  extra MiB  /grads  agree  x torch  mem/torch  ao x  ao mem
    fwd+bwd  alignops           290.1  288..293     0.089   90.1       17.3    1.02  ref       1.43       0.04  1.00    1.00
    fwd+bwd  torch              415.0  410..420     0.062   63.0      448.2   26.4   ok        1.00       1.00  1.43    0.04
    ...
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import importlib
import json
import math
import os
import platform
import select
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
QUANTILES = (0.5, 0.2, 0.8)

CPU_TIME_BUDGET_S = 2.0  # wall time spent repeating one (provider, mode) on CPU
CPU_MIN_REPS = 3
CPU_MAX_REPS = 50
CUDA_WARMUP_MS = 25.0  # triton.testing.do_bench's defaults
CUDA_REP_MS = 100.0
CUDA_MIN_REPS = 10
CUDA_MAX_REPS = 1000
L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H100: 50 MiB)
# CPU: the agreement run (one fwd+bwd, which also compiles) is the warm-up; the median of at least
# CPU_MIN_REPS repetitions absorbs one slow call.
CPU_WARMUP_CALLS = 0

MALLOC_MMAP_THRESHOLD_BYTES = 64 * 2**10  # glibc M_MMAP_THRESHOLD in the memory child
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
RSS_SAMPLE_PERIOD_S = 0.001
MEMORY_CHILD_TIMEOUT_S = 1800.0

PEAK_MATMUL_SIZE = 2048
PEAK_COPY_BYTES = 256 * 2**20
PEAK_REPS = 3

# Relative L2 error allowed between a provider and alignops (loss and each gradient). fp32: the
# order of a long sum differs between chunked and full-logit paths (~1e-6); bf16/fp16: gradients
# are stored in the input dtype (8 / 11 mantissa bits).
TOLERANCE_REL = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}

# Dense peak rates per GPU: (name substring, 16-bit tensor-core TFLOP/s, fp32 TFLOP/s, TB/s).
# fp32 is the non-tensor-core rate, what torch uses with TF32 off (its default for matmul).
CUDA_PEAKS = (
    ("H100 80GB HBM3", 989.0, 67.0, 3.35),  # H100 SXM
    ("H100 PCIe", 756.0, 51.0, 2.0),
    ("H100 NVL", 835.0, 60.0, 3.9),
    ("H200", 989.0, 67.0, 4.8),
    ("A100-SXM4-80GB", 312.0, 19.5, 2.039),
    ("A100-SXM4-40GB", 312.0, 19.5, 1.555),
    ("A100 80GB PCIe", 312.0, 19.5, 1.935),
    ("A100-PCIE-40GB", 312.0, 19.5, 1.555),
    ("L40S", 362.0, 91.6, 0.864),
    ("RTX 4090", 165.0, 82.6, 1.008),
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- cases, providers


@dataclass(frozen=True)
class Case:
    """One shape of one family. ``tokens`` is N, the flattened token count."""

    family: str
    model: str
    tokens: int
    hidden: int
    vocab: int
    dtype: str
    device: str
    softcap: float | None = None
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()


@dataclass
class Inputs:
    """Tensors of a case; ``leaves`` require grad and their gradients are compared and counted."""

    tensors: dict[str, torch.Tensor]
    leaves: list[torch.Tensor]


@dataclass
class Bound:
    """A provider bound to inputs: ``fn()`` returns the scalar loss."""

    fn: Callable[[], torch.Tensor]
    leaves: list[torch.Tensor]
    note: str = ""


@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable[[Case, Inputs], Bound]
    skip_reason: Callable[[Case], str | None] = lambda case: None
    version: Callable[[], str] = lambda: ""


def find_provider(providers: list[Provider], name: str) -> Provider:
    for p in providers:
        if p.name == name:
            return p
    raise KeyError(name)


# ----------------------------------------------------------------------------- one step, by mode


def mode_steps(bound: Bound, mode: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(setup, run)``: ``setup`` is untimed (reset grads, and the forward for ``bwd``)."""
    state: dict[str, torch.Tensor] = {}

    def clear() -> None:
        state.clear()
        for t in bound.leaves:
            t.grad = None

    if mode == "fwd":

        def setup() -> None:
            clear()

        def run() -> None:
            state["out"] = bound.fn()

    elif mode == "bwd":

        def setup() -> None:
            clear()
            state["out"] = bound.fn()

        def run() -> None:
            state["out"].backward()

    elif mode == "fwd+bwd":

        def setup() -> None:
            clear()

        def run() -> None:
            bound.fn().backward()

    else:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    return setup, run


def run_once(bound: Bound) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """One fwd+bwd; returns the loss (float64, detached) and the leaves' gradients (copies)."""
    for t in bound.leaves:
        t.grad = None
    loss = bound.fn()
    loss.backward()
    grads = [None if t.grad is None else t.grad.detach().clone() for t in bound.leaves]
    for t in bound.leaves:
        t.grad = None
    return loss.detach().double().clone(), grads


@dataclass
class Agreement:
    max_rel_err: float
    tolerance: float
    detail: str

    @property
    def ok(self) -> bool:
        return self.max_rel_err <= self.tolerance


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().flatten(), ref.detach().double().flatten()
    if not torch.isfinite(out).all():
        return math.inf
    return (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30)).item()


def compare(ref: tuple, out: tuple, dtype: torch.dtype, names: list[str]) -> Agreement:
    """Loss and gradients of ``out`` against ``ref`` (both from :func:`run_once`)."""
    errs = {"loss": _rel_err(out[0], ref[0])}
    for name, g_ref, g_out in zip(names, ref[1], out[1]):
        if g_ref is None or g_out is None:
            errs[f"d{name}"] = 0.0 if g_ref is g_out else math.inf
        else:
            errs[f"d{name}"] = _rel_err(g_out, g_ref)
    worst = max(errs.values())
    detail = " ".join(f"{k}={v:.1e}" for k, v in errs.items())
    return Agreement(worst, TOLERANCE_REL[dtype], detail)


# ----------------------------------------------------------------------------- timing


@dataclass
class Timing:
    p50_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _quantiles(samples_ms: list[float]) -> Timing:
    if len(samples_ms) == 1:
        v = samples_ms[0]
        return Timing(v, v, v, 1)
    cuts = statistics.quantiles(samples_ms, n=100, method="inclusive")  # 99 cut points
    p = {q: cuts[round(q * 100) - 1] for q in QUANTILES}
    return Timing(statistics.median(samples_ms), p[0.2], p[0.8], len(samples_ms))


def time_step(bound: Bound, mode: str, device: str, budget_s: float = CPU_TIME_BUDGET_S) -> Timing:
    setup, run = mode_steps(bound, mode)
    if device == "cuda":
        return _time_cuda(setup, run)
    for _ in range(CPU_WARMUP_CALLS):
        setup()
        run()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < CPU_MAX_REPS:
        setup()
        t0 = time.perf_counter()
        run()
        samples.append((time.perf_counter() - t0) * 1e3)
        if len(samples) >= CPU_MIN_REPS and time.perf_counter() - start >= budget_s:
            break
    setup()  # drop the last outputs and grads
    return _quantiles(samples)


def _time_cuda(setup: Callable[[], None], run: Callable[[], None]) -> Timing:
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    setup()
    torch.cuda.synchronize()
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    estimate_ms = max(start.elapsed_time(end), 1e-3)
    n_warmup = max(1, int(CUDA_WARMUP_MS / estimate_ms))
    n_rep = min(CUDA_MAX_REPS, max(CUDA_MIN_REPS, int(CUDA_REP_MS / estimate_ms)))
    for _ in range(n_warmup):
        setup()
        run()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        setup()
        flush.zero_()
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize()
    setup()
    return _quantiles([s.elapsed_time(e) for s, e in zip(starts, ends)])


# ----------------------------------------------------------------------------- memory


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
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            )
        return self._proc

    def measure(self, family_module: str, case: Case, provider_name: str, modes: list[str]) -> dict[str, Memory]:
        """One fresh process measures every mode of ``modes``, one after the other."""
        if not os.path.exists("/proc/self/status") or not hasattr(os, "fork"):
            return {m: Memory(None, "unavailable", "needs Linux (fork, /proc) to measure RSS") for m in modes}
        proc = self._start()
        request = {"module": family_module, "case": asdict(case), "provider": provider_name, "modes": modes}
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


# ----------------------------------------------------------------------------- device, roofline


@dataclass
class Peaks:
    flops_per_s: float
    bytes_per_s: float
    source: str


_PEAK_CACHE: dict[tuple[str, torch.dtype], Peaks] = {}


def device_peaks(device: str, dtype: torch.dtype) -> Peaks:
    key = (device, dtype)
    if key not in _PEAK_CACHE:
        table = _cuda_table_peaks(dtype) if device == "cuda" else None
        _PEAK_CACHE[key] = table or _measure_peaks(device, dtype)
    return _PEAK_CACHE[key]


def _cuda_table_peaks(dtype: torch.dtype) -> Peaks | None:
    name = torch.cuda.get_device_name()
    for sub, tf16, tf32, tbs in CUDA_PEAKS:
        if sub in name:
            tflops = tf16 if dtype in (torch.bfloat16, torch.float16) else tf32
            return Peaks(tflops * 1e12, tbs * 1e12, f"table ({sub}: {tflops:g} TFLOP/s, {tbs:g} TB/s)")
    return None


def _measure_peaks(device: str, dtype: torch.dtype) -> Peaks:
    n = PEAK_MATMUL_SIZE
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    src = torch.empty(PEAK_COPY_BYTES, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)

    def best_s(fn: Callable[[], object]) -> float:
        fn()
        best = math.inf
        for _ in range(PEAK_REPS):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        return best

    flops = 2.0 * n**3 / best_s(lambda: a @ b)
    bytes_per_s = 2.0 * PEAK_COPY_BYTES / best_s(lambda: dst.copy_(src))  # read + write
    dt = str(dtype).removeprefix("torch.")
    return Peaks(
        flops, bytes_per_s, f"measured at startup ({n}^3 {dt} matmul, {PEAK_COPY_BYTES >> 20} MiB copy)"
    )


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def environment(device: str) -> dict:
    """What heads the table and every CSV row."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
        detail = f"CUDA {torch.version.cuda}"
    else:
        name = _cpu_name()
        detail = f"{torch.get_num_threads()} threads"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {
        "device": device,
        "device_name": name,
        "device_detail": detail,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": git_commit(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """Short commit of the checkout, ``+dirty`` with uncommitted changes; read-only git calls."""
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # never write the index
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, env=env, capture_output=True,
            text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, env=env,
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


# ----------------------------------------------------------------------------- records


@dataclass
class Record:
    """One (case, provider, mode) measurement."""

    case: Case
    provider: str
    mode: str
    timing: Timing | None
    memory: Memory | None
    grads_bytes: int
    flops: float
    bytes_moved: float
    rate_unit: str
    peaks: Peaks
    agreement: Agreement | None  # None for the provider others are compared with
    version: str = ""
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float | None:
        if self.timing is None or self.timing.p50_ms <= 0:
            return None
        seconds = self.timing.p50_ms / 1e3
        if self.rate_unit == "TFLOP/s":
            return self.flops / seconds / 1e12
        return self.bytes_moved / seconds / 1e9

    @property
    def roofline_fraction(self) -> float | None:
        if self.timing is None or self.timing.p50_ms <= 0:
            return None
        bound_s = max(self.flops / self.peaks.flops_per_s, self.bytes_moved / self.peaks.bytes_per_s)
        return bound_s / (self.timing.p50_ms / 1e3)


@dataclass
class Skip:
    family: str
    provider: str
    reason: str
