"""``alignops kernels``: build every Triton kernel ahead of time and report its resources.

GPU build evidence without a GPU. For every
``AotSpec`` listed in ``AOT_SPECS`` by the modules of ``alignops.kernels`` (private
modules, ``_*``, are skipped) and every requested architecture, the command

1. compiles the kernel with ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
   capability, 32))`` (PTX, then ``ptxas`` to a cubin; Triton's cache is used, so a second
   run is fast; ``--no-cache`` recompiles);
2. runs the ``cuobjdump`` shipped in the Triton wheel: ``--dump-resource-usage`` gives
   registers, static shared memory, stack and local memory; ``-sass`` tells whether
   tensor-core instructions were emitted (``HMMA`` on sm_80, ``HGMMA`` = wgmma on sm_90a;
   only disassembled when the PTX holds ``mma`` / ``wgmma`` instructions, since ptxas
   never creates them otherwise); dynamic shared memory is ``metadata.shared``;
3. re-runs the wheel's ``ptxas -v`` on the PTX with Triton's flags for the spill byte
   counts (register spills land in the stack frame: ``LOCAL`` stays 0 when they happen).

It exits 1 when a module fails to import, a kernel fails to compile, or any kernel spills
(spill stores / loads or local memory > 0), 2 on a usage error. Usage::

    alignops kernels                         # sm_80 and sm_90a, every kernel
    alignops kernels --arch sm_90a --kernel linear_logprobs --json build.json

Sample output (regs per thread; smem bytes static + dynamic; local, spill (stores +
loads) and stack in bytes; tc = tensor-core instruction; sec = compile seconds, ``*`` =
Triton cache hit)::

    kernel                config                arch    regs     smem  local  spill  stack  tc   sec  status
    --------------------  --------------------  ------  ----  -------  -----  -----  -----  --  ----  ------
    _logprobs_fwd_kernel  bf16 plain BV=4096 w8  sm_80     31     0+32      0      0      0  no  0.74  ok
    _logprobs_fwd_kernel  bf16 plain BV=4096 w8  sm_90a    31  1024+32      0      0      0  no  0.30  ok

Signature strings are Triton types (``*bf16``, ``i32``, ``fp32``, ``constexpr``). A
``:16`` suffix (Triton's own AOT hint syntax, ``i32:16``) marks an integer the runtime
sees divisible by 16; pointers are taken as 16-byte aligned, as torch allocations are.
Capability 90 is always compiled as ``sm_90a`` (Triton enables the wgmma / TMA features),
so ``--arch`` accepts ``sm_90a``, not ``sm_90``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_ARCHS = "sm_80,sm_90a"
#: Tensor-core instruction families in SASS: Ampere/Ada HMMA (fp16/bf16/tf32), IMMA
#: (int8), DMMA (fp64); Hopper warpgroup MMA (wgmma) HGMMA / IGMMA / QGMMA (fp8);
#: Blackwell UTC*MMA (tcgen05).
_TENSOR_CORE = re.compile(r"\b(HMMA|IMMA|DMMA|HGMMA|IGMMA|QGMMA|UTC[A-Z]*MMA)\b")
#: PTX matrix instructions that can become tensor-core SASS: mma.sync (sm_80+),
#: wgmma.mma_async (sm_90a), tcgen05.mma (sm_100a).
_PTX_MMA = re.compile(r"\b(?:mma\.sync|wgmma\.mma_async|tcgen05\.mma)")
_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass(frozen=True)
class Arch:
    """A requested target: ``name`` as written by ptxas (``sm_90a``) and its capability."""

    name: str
    capability: int


@dataclass
class Row:
    """One (kernel configuration, architecture) line of the report."""

    module: str
    kernel: str
    config: str
    arch: str
    status: str  # "ok", "SPILL" or "FAIL"
    error: str | None = None
    registers: int | None = None
    shared_static: int | None = None
    shared_dynamic: int | None = None
    local: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    tensor_cores: str | None = None  # instruction name, "" when none
    compile_s: float | None = None
    cached: bool | None = None


def parse_archs(text: str) -> list[Arch]:
    """``"sm_80,sm_90a"`` -> ``[Arch("sm_80", 80), Arch("sm_90a", 90)]``.

    Raises ValueError for a name Triton cannot produce (e.g. ``sm_90`` without ``a``).
    """
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    archs = []
    for item in (t.strip() for t in text.split(",")):
        m = re.fullmatch(r"(?:sm_)?(\d{2,3})([a-z]?)", item)
        if not m:
            raise ValueError(f"bad architecture {item!r}: expected e.g. sm_80 or sm_90a")
        cap = int(m.group(1))
        name = sm_arch_from_capability(cap)
        if f"sm_{m.group(1)}{m.group(2)}" != name:
            raise ValueError(f"Triton compiles capability {cap} as {name}; ask for {name}, not {item}")
        archs.append(Arch(name, cap))
    return archs


# --------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------


def discover(extra_modules: list[str] = ()) -> tuple[list[tuple[str, int, Any]], list[Row]]:
    """``[(module name, index in its AOT_SPECS, AotSpec)]`` from every public module of
    ``alignops.kernels`` plus ``extra_modules``, and one FAIL row per module that could not
    be imported."""
    import alignops.kernels as pkg

    names = [
        f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")
    ]
    specs, failed = [], []
    for name in [*sorted(names), *extra_modules]:
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # a broken module is a build failure, reported like one
            failed.append(Row(name, "-", "-", "-", "FAIL", error=f"import failed: {type(e).__name__}: {e}"))
            continue
        for i, spec in enumerate(getattr(mod, "AOT_SPECS", [])):
            specs.append((name, i, spec))
    return specs, failed


def _label(spec) -> str:
    if spec.label:
        return spec.label
    cx = " ".join(f"{k}={v}" for k, v in spec.constexprs.items())
    return f"{cx} w{spec.num_warps} s{spec.num_stages}".strip()


def _jit_function(kernel):
    """The ``JITFunction`` under ``@triton.heuristics`` / ``@triton.autotune`` wrappers."""
    from triton.runtime.jit import JITFunction

    k = kernel
    while not isinstance(k, JITFunction) and hasattr(k, "fn"):
        k = k.fn
    if not isinstance(k, JITFunction):
        raise TypeError(f"{kernel!r} is not a @triton.jit kernel (is TRITON_INTERPRET set?)")
    return k


def _ast_source(spec):
    """``ASTSource`` with constexprs keyed by argument name (Triton maps names to
    ``(index,)`` paths) and ``tt.divisibility = 16`` on pointers and ``:16`` integers."""
    from triton.compiler import ASTSource

    fn = _jit_function(spec.kernel)
    missing = [a for a in fn.arg_names if a not in spec.signature]
    unknown = [a for a in spec.signature if a not in fn.arg_names]
    if missing or unknown:
        raise ValueError(f"signature does not match the kernel: missing {missing}, unknown {unknown}")
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        ty, _, hint = spec.signature[arg].partition(":")
        if hint not in ("", "16"):
            raise ValueError(f"{arg}: only the ':16' hint is supported, got {spec.signature[arg]!r}")
        if ty == "constexpr":
            if arg not in spec.constexprs:
                raise ValueError(f"constexpr {arg} has no value in constexprs")
        elif hint == "16" or ty.startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
        signature[arg] = ty
    return ASTSource(fn=fn, signature=signature, constexprs=dict(spec.constexprs), attrs=attrs)


# --------------------------------------------------------------------------------------
# Build and inspect
# --------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    import triton

    return getattr(triton.knobs.nvidia, name).path


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{os.path.basename(cmd[0])} failed ({proc.returncode}): {proc.stderr.strip()[:500]}"
        )
    return proc.stdout


def _resources(cubin: str, kernel: str) -> tuple[int, int, int, int]:
    """``(REG, STACK, SHARED, LOCAL)`` of ``kernel`` from ``cuobjdump --dump-resource-usage``."""
    out = _run([_tool("cuobjdump"), "--dump-resource-usage", cubin])
    block = out.split(f"Function {kernel}:", 1)
    m = _RESOURCE.search(block[1] if len(block) == 2 else out)
    if m is None:
        raise RuntimeError(f"no resource usage for {kernel} in cuobjdump output:\n{out[:500]}")
    reg, stack, shared, local = (int(v) for v in m.groups())
    return reg, stack, shared, local


def _tensor_core_op(cubin: str) -> str:
    """The first tensor-core instruction family in the SASS, or ``""``."""
    m = _TENSOR_CORE.search(_run([_tool("cuobjdump"), "-sass", cubin]))
    return m.group(1) if m else ""


def _spills(ptx_path: str, arch: Arch, fp_fusion: bool, workdir: str) -> tuple[int, int]:
    """Spill store / load bytes from ``ptxas -v`` run with Triton's own flags."""
    from triton.backends.nvidia.compiler import get_ptxas

    cmd = [get_ptxas(arch.capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2"]
    cmd += [] if fp_fusion else ["--fmad=false"]
    cmd += [f"--gpu-name={arch.name}", ptx_path, "-o", os.path.join(workdir, "ptxas_check.cubin")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas -v failed ({proc.returncode}): {proc.stderr.strip()[:500]}")
    found = _SPILLS.findall(proc.stdout + proc.stderr)
    if not found:
        raise RuntimeError("ptxas -v printed no spill line")
    return sum(int(s) for s, _ in found), sum(int(l) for _, l in found)


def build_one(module: str, spec, arch: Arch, workdir: str) -> Row:
    """Compile ``spec`` for ``arch`` and read its resources; never raises."""
    import triton
    from triton.backends.compiler import GPUTarget

    row = Row(module, spec.name, _label(spec), arch.name, "FAIL")
    hits: list[bool] = []
    old_listener = triton.knobs.compilation.listener
    triton.knobs.compilation.listener = lambda **kw: hits.append(bool(kw.get("cache_hit")))
    t0 = time.perf_counter()
    try:
        src = _ast_source(spec)
        options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
        compiled = triton.compile(src, target=GPUTarget("cuda", arch.capability, 32), options=options)
    except Exception as e:
        row.error = f"compile failed: {type(e).__name__}: {_first_lines(str(e))}"
        return row
    finally:
        triton.knobs.compilation.listener = old_listener
        row.compile_s = time.perf_counter() - t0
    row.cached = bool(hits and hits[-1])
    try:
        taskdir = tempfile.mkdtemp(dir=workdir)  # one per task: workers share workdir
        stem = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{spec.name}-{arch.name}")
        cubin = os.path.join(taskdir, stem + ".cubin")
        ptx = os.path.join(taskdir, stem + ".ptx")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        name = compiled.metadata.name
        row.registers, row.stack, row.shared_static, row.local = _resources(cubin, name)
        row.shared_dynamic = int(compiled.metadata.shared)
        # Disassembly costs ~0.5 s per cubin: only confirm in SASS what the PTX asks for
        # (ptxas never turns scalar FMAs into tensor-core instructions).
        has_mma = _PTX_MMA.search(compiled.asm["ptx"]) is not None
        row.tensor_cores = _tensor_core_op(cubin) if has_mma else ""
        if row.stack == 0 and row.local == 0:
            row.spill_stores = row.spill_loads = 0  # spill slots live in the stack frame
        else:
            fusion = bool(compiled.metadata.enable_fp_fusion)
            row.spill_stores, row.spill_loads = _spills(ptx, arch, fusion, taskdir)
    except Exception as e:
        row.error = f"inspection failed: {type(e).__name__}: {_first_lines(str(e))}"
        return row
    spilled = row.local > 0 or row.spill_stores > 0 or row.spill_loads > 0
    row.status = "SPILL" if spilled else "ok"
    if spilled:
        row.error = (
            f"spills: {row.spill_stores} B stores, {row.spill_loads} B loads, {row.local} B local, "
            f"{row.stack} B stack"
        )
    return row


def _build_task(module: str, index: int, arch: Arch, workdir: str) -> Row:
    """Worker entry (separate process): re-import the module, build one spec."""
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    spec = importlib.import_module(module).AOT_SPECS[index]
    return build_one(module, spec, arch, workdir)


def build_all(tasks: list[tuple[str, int, Any, Arch]], workdir: str, *, jobs: int) -> list[Row]:
    """Build ``(module, index, spec, arch)`` tasks, in ``jobs`` processes when ``jobs > 1``
    (Triton compilation is CPU-bound and single-threaded); rows keep the task order."""
    if jobs <= 1 or len(tasks) <= 2:
        return [build_one(m, spec, arch, workdir) for m, _, spec, arch in tasks]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent has imported torch and triton (thread pools, CUDA state).
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_build_task, m, i, arch, workdir) for m, i, _, arch in tasks]
        rows = []
        for (m, _, spec, arch), fut in zip(tasks, futures):
            try:
                rows.append(fut.result())
            except Exception as e:  # a worker that died still gets its FAIL row
                rows.append(Row(m, spec.name, _label(spec), arch.name, "FAIL", error=f"worker failed: {e!r}"))
        return rows


def _first_lines(text: str, n: int = 6) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n    ".join(lines[:n]) + ("\n    ..." if len(lines) > n else "")


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

_COLUMNS = (
    ("kernel", "<"),
    ("config", "<"),
    ("arch", "<"),
    ("regs", ">"),
    ("smem", ">"),
    ("local", ">"),
    ("spill", ">"),
    ("stack", ">"),
    ("tc", "<"),
    ("sec", ">"),
    ("status", "<"),
)


def _cells(r: Row) -> list[str]:
    def num(v):
        return "-" if v is None else str(v)

    spill = "-" if r.spill_stores is None else str(r.spill_stores + r.spill_loads)
    smem = "-" if r.shared_static is None else f"{r.shared_static}+{r.shared_dynamic}"
    tc = "-" if r.tensor_cores is None else (f"yes ({r.tensor_cores})" if r.tensor_cores else "no")
    secs = "-" if r.compile_s is None else f"{r.compile_s:.2f}{'*' if r.cached else ''}"
    return [
        r.kernel,
        r.config,
        r.arch,
        num(r.registers),
        smem,
        num(r.local),
        spill,
        num(r.stack),
        tc,
        secs,
        r.status,
    ]


def format_table(rows: list[Row]) -> str:
    """Fixed-width table, one line per row, columns sized to their widest cell."""
    cells = [_cells(r) for r in rows]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, (h, _) in enumerate(_COLUMNS)]

    def line(vals):
        return "  ".join(f"{v:{a}{w}}" for v, (_, a), w in zip(vals, _COLUMNS, widths)).rstrip()

    out = [line([h for h, _ in _COLUMNS]), line(["-" * w for w in widths])]
    out += [line(c) for c in cells]
    return "\n".join(out)


def _header(archs: list[Arch]) -> str:
    import triton

    fusion = os.environ.get("TRITON_DEFAULT_FP_FUSION", "unset (on)")
    return (
        f"alignops kernel build report: triton {triton.__version__}, targets "
        f"{', '.join(a.name for a in archs)}, fp fusion {fusion}; smem in bytes (static + dynamic), "
        "local / spill (stores + loads) / stack in bytes, tc = tensor-core instruction, "
        "* = Triton cache hit"
    )


def main(argv: list[str]) -> int:
    """Entry point of ``alignops kernels``; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="alignops kernels",
        description="Compile every alignops Triton kernel ahead of time and report registers, "
        "shared memory, spills and tensor-core use per architecture (no GPU needed).",
    )
    parser.add_argument("--arch", default=DEFAULT_ARCHS, help=f"comma list (default {DEFAULT_ARCHS})")
    parser.add_argument("--kernel", default=None, help="only kernels whose 'module.kernel' contains this")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    parser.add_argument(
        "--module",
        action="append",
        default=[],
        metavar="MOD",
        help="also read AOT_SPECS from this importable module (repeatable)",
    )
    parser.add_argument("--no-cache", action="store_true", help="recompile even when Triton's cache has it")
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(os.cpu_count() or 1, 8),
        help="compile in this many processes (default: CPU count, at most 8)",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help and on usage errors
        return int(e.code or 0)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(
            "alignops kernels: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)",
            file=sys.stderr,
        )
        return 2
    try:
        archs = parse_archs(args.arch)
    except ValueError as e:
        print(f"alignops kernels: {e}", file=sys.stderr)
        return 2

    import triton

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    specs, rows = discover(args.module)
    if args.kernel:
        specs = [(m, i, s) for m, i, s in specs if args.kernel in f"{m}.{s.name}"]
        rows = [r for r in rows if args.kernel in r.module]
    if not specs and not rows:
        print(f"alignops kernels: no AOT spec matches {args.kernel!r}", file=sys.stderr)
        return 1

    tasks = [(m, i, s, arch) for m, i, s in specs for arch in archs]
    old_env = os.environ.get("TRITON_ALWAYS_COMPILE")
    if args.no_cache:  # read by this process's knobs and inherited by the workers
        os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    try:
        with tempfile.TemporaryDirectory(prefix="alignops-kernels-") as workdir:
            rows += build_all(tasks, workdir, jobs=args.jobs)
    finally:
        if args.no_cache:
            if old_env is None:
                os.environ.pop("TRITON_ALWAYS_COMPILE", None)
            else:
                os.environ["TRITON_ALWAYS_COMPILE"] = old_env

    print(_header(archs))
    print(format_table(rows))
    bad = [r for r in rows if r.status != "ok"]
    for r in bad:
        print(f"\n{r.status}: {r.module}.{r.kernel} [{r.config}] {r.arch}\n    {r.error}")
    print(f"\n{len(rows) - len(bad)} ok, {len(bad)} failed or spilled")
    if args.json:
        payload = {
            "triton": triton.__version__,
            "archs": [a.name for a in archs],
            "ok": not bad,
            "rows": [asdict(r) for r in rows],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
