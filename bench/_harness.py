"""The benchmark harness behind ``alignops bench``: cases, providers, timing, memory, roofline.

Manual
======

``alignops bench`` compares alignops with what people use instead, on the device at hand, for
every kernel family under ``bench/``::

    alignops bench --quick                                  # < 2 min on a 2-core CPU
    alignops bench --family linear_cross_entropy --model llama3-8b --tokens 4096,16384 --dtype bfloat16
    alignops bench --family cross_entropy --providers alignops,eager,liger --mode fwd+bwd
    alignops bench --family linear_cross_entropy --tokens 4096 --hidden 1024 --vocab 65536 \\
                   --dtype float32 --mode fwd+bwd              # memory report (H/V overrides)
    alignops bench --list                                   # families, providers, models

Options: ``--family`` ``--model`` ``--tokens`` (comma lists) ``--hidden`` ``--vocab`` ``--softcap``
``--providers`` ``--dtype`` ``--device {auto,cpu,cuda}`` ``--mode {fwd,bwd,fwd+bwd,all}``
``--out DIR`` (default ``$ALIGNOPS_BENCH_OUT``, else ``./alignops-bench-results``) ``--tag``
``--plot`` ``--no-memory`` ``--no-save`` ``--memory-report`` ``--budget-s``. ``alignops bench --help``
is the user's version of this manual.

Families: ``linear_cross_entropy``, ``cross_entropy`` (on logits), ``dpo_step``, ``grpo_step``
(a loss step from hidden states); each module's docstring defines its inputs, providers and
FLOP / byte counts.

Providers (a family lists the ones that apply): ``alignops`` (the public API); ``eager`` (the
package reference ``alignops.reference``, eager PyTorch, full logits: the baseline of the
``x eager`` column); ``torch.compile`` (the same reference under ``torch.compile(dynamic=False)``);
``torch-native`` (``F.cross_entropy`` on fp32 logits, the line people write: the reference also
computes entropy and mean-logit terms, so it is slower than what people run); ``torch-chunked``
(``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions()``, torch >= 2.13); ``trl``
(TRL's ``selective_log_softmax`` on full logits) and ``trl-chunked`` (TRL's fused LM head
``trl.kernels.ChunkedLogProbFunction``); ``liger`` and ``cce`` when importable and runnable. A
provider that cannot run is skipped with its reason; the version of every peer is recorded.

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
  runs the step once; peak extra = ``VmHWM`` - RSS before the step. The kernel updates the
  high-water mark before RSS ever drops, so short peaks are not missed. glibc malloc would keep freed
  blocks in its heap (RSS then overstates what is live, and a warm-up hides the next peak), so
  the child sets ``M_MMAP_THRESHOLD`` to ``MALLOC_MMAP_THRESHOLD_BYTES`` (``_memory``) and trims the heap:
  every block that size or larger is its own mapping, returned on free, and RSS follows the live
  bytes to the page. Where ``clear_refs`` cannot be written, RSS is sampled every
  ``RSS_SAMPLE_PERIOD_S`` (a lower bound; the method is recorded with every number).
* roofline: FLOP and byte counts per case (formulas in each family module), achieved rate, and
  the fraction of the device bound ``max(FLOP / peak FLOP/s, bytes / peak bytes/s)`` reached.
  Peaks: a per-GPU table (``CUDA_PEAKS``); on CPU (or an unknown GPU) measured at startup with
  a ``PEAK_MATMUL_SIZE``³ matmul in the case dtype and a ``PEAK_COPY_BYTES`` copy.

Output: a table on stdout headed by device, torch / triton versions and the git commit; rows
of the long-format CSV (``_report``) appended to ``<out>/<family>.csv``; the whole run as
``<out>/<tag>.json``; with ``--plot``, ``<out>/<family>_<model>_<dtype>.png`` (time and peak extra
memory against tokens, one line per provider). ``<out>`` is ``--out``, else ``$ALIGNOPS_BENCH_OUT``,
else ``./alignops-bench-results`` (git-ignored); the curated results committed under
``bench/results/`` are written only when ``--out bench/results`` asks for it. Warnings raised while
measuring are printed once each after the tables, on stderr. Columns: ``x eager`` =
time(eager) / time(row); ``mem/eager`` = memory(row) / memory(eager); ``ao x`` = time(row) /
time(alignops), alignops' speedup over that row; ``ao mem`` = memory(alignops) / memory(row);
``/grads`` = peak extra memory over the bytes of the gradients the op must return (1.0 is the
floor for fwd+bwd).

Sample output (``alignops bench --quick`` on a 2-core CPU; one block, columns narrowed to fit)::

    alignops bench  device: cpu Intel(R) Xeon(R) Processor (2 threads)  torch 2.13.0+cpu  triton 3.9.0
    commit 206b31c+dirty  2026-11-24T03:00:51+0000
    load average at start 0.96 on 2 cores
    peak cpu float32: 0.325 TFLOP/s, 22.5 GB/s, measured at startup (2048^3 float32 matmul, 256 MiB copy)

    linear_cross_entropy  cpu-quick  N=1024 H=128 V=8192  float32  grads 4.5 MiB  rate in TFLOP/s
    mode    provider      ms p50 p20..p80     rate roof% extra MiB /grads agree  x eager mem/eager ao x ao mem
    fwd+bwd alignops       44.46 44.18..44.81 0.145 44.6      36.5   8.11 ref       3.45     0.157 1.00  1.000
    fwd+bwd eager          153.2 152.1..154.6 0.042 12.9     231.9  51.53 ok 3e-07  1.00     1.000 3.45  0.157
    fwd+bwd torch.compile  40.38 39.78..41.2  0.160 49.1      64.0  14.23 ok 3e-07  3.79     0.276 0.91  0.570
    fwd+bwd torch-native   57.96 57.38..59.17 0.111 34.2      96.0  21.33 ok 3e-07  2.64     0.414 1.30  0.380
    fwd+bwd torch-chunked  87.11 86.36..88.29 0.074 22.7       8.8   1.96 ok 4e-07  1.76     0.038 1.96  4.128
    fwd+bwd trl-chunked    191.7 185.1..195.7 0.034 10.3     272.5  60.56 ok 3e-07  0.80     1.175 4.31  0.134

    skipped / failed:
      linear_cross_entropy   liger   liger-kernel 0.8.5: Triton kernels need a CUDA device, this run is cpu
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ._memory import Memory

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
    preload: tuple[str, ...] = ()  # slow imports the memory server does once, before forking


def baseline_providers(alignops_: Callable, eager: Callable, torch_compile: Callable) -> list[Provider]:
    """The three providers every family has: ``alignops`` (the public API), ``eager`` (the float
    reference) and ``torch.compile`` (the reference compiled), from the family's build functions."""
    import alignops

    from ._peers import COMPILE_PRELOAD

    return [
        Provider("alignops", alignops_, version=lambda: alignops.__version__),
        Provider("eager", eager),
        Provider("torch.compile", torch_compile, preload=COMPILE_PRELOAD),
    ]


def seq_len_setting(default: int) -> int:
    """The sequence length of the step families: ``alignops bench --seq-len`` (it sets
    ``ALIGNOPS_BENCH_SEQ_LEN``), else ``default``."""
    return int(os.environ.get("ALIGNOPS_BENCH_SEQ_LEN", default))


def generator(case: Case) -> torch.Generator:
    """The case's seeded generator, on its device (inputs are drawn where they live)."""
    return torch.Generator(device=case.device).manual_seed(case.seed)


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
    try:  # the version without importing triton (its import is slow and, at exit, noisy)
        from importlib.metadata import version

        triton_version = version("triton")
    except Exception:
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
    """Short commit of the checkout, ``+dirty`` with uncommitted changes; read-only git calls.
    ``installed`` for a package installed from a wheel (no checkout to ask)."""
    if not (REPO_ROOT / ".git").exists():
        return "installed"
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # never write the index

    def git(*args: str) -> str:
        run = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=10, check=True
        )
        return run.stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
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
