"""``alignops bench``: argument parsing, the run loop and the ``--help`` text.

The measurement method is documented in ``_harness``'s docstring; ``--help`` is the user's manual,
plain text (no markup, no file names of the package's internals).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

from . import _harness as H
from . import _memory as M
from . import _report
from .models import DEFAULT_MODELS_CPU, DEFAULT_MODELS_CUDA, MODELS, get_model, with_overrides

FAMILIES = ("linear_cross_entropy", "cross_entropy", "divergence", "dpo_step", "grpo_step")
DEFAULT_TOKENS_CPU = (512, 1024, 2048)
DEFAULT_TOKENS_CUDA = (4096, 8192, 16384)
DEFAULT_DTYPE_CPU = "float32"
DEFAULT_DTYPE_CUDA = "bfloat16"

# Results go to one place, in the working directory unless told otherwise; never into the
# package (site-packages) nor into a checkout's tracked files (bench/results holds curated runs,
# written only when asked for with --out).
OUT_ENV = "ALIGNOPS_BENCH_OUT"
DEFAULT_OUT_NAME = "alignops-bench-results"


def default_out() -> Path:
    """``$ALIGNOPS_BENCH_OUT`` if set, else ``./alignops-bench-results`` (absolute)."""
    return Path(os.environ.get(OUT_ENV) or DEFAULT_OUT_NAME).resolve()


# --quick: every family, small enough for a few minutes on a 2-core CPU; two token counts for
# the fused linear CE (the plot's lines), one for the others.
QUICK_MODEL_CPU = "cpu-quick"
QUICK_TOKENS_CPU = {"linear_cross_entropy": (256, 1024), "default": (1024,)}
QUICK_MODEL_CUDA = "llama3-8b"
QUICK_TOKENS_CUDA = {"linear_cross_entropy": (4096, 16384), "default": (8192,)}
QUICK_BUDGET_S = 0.3

DESCRIPTION = """\
Microbenchmarks of alignops against what people use instead, on the device at hand
(CUDA when present, else CPU): time, peak extra memory, a roofline column, and a
numerical agreement check of every provider's loss and gradients against alignops.

families:
  linear_cross_entropy  hidden states @ LM head -> mean cross-entropy
  cross_entropy         mean cross-entropy on given logits
  divergence            generalized JSD (beta 1/2) between a trained and a frozen head
  dpo_step              one DPO loss step from hidden states (cached reference log-probs)
  grpo_step             one GRPO loss step from hidden states

providers (each family runs those that apply; one that cannot run is listed with why):
  alignops       the alignops public function
  eager          eager PyTorch reference on full logits (the x eager / mem/eager baseline)
  torch.compile  the same reference under torch.compile
  torch-native   F.cross_entropy on float32 logits, what training code usually writes
  torch-chunked  PyTorch's chunked F.linear_cross_entropy (torch >= 2.13)
  trl            TRL's selective log-softmax on full logits
  trl-chunked    TRL's chunked LM head (divergence: its chunked two-head divergence)
  liger, cce     Liger-Kernel and Cut Cross-Entropy (CUDA only; divergence: Liger's fused JSD)
"""

EPILOG = f"""\
memory: on CUDA the allocator's peak; on CPU the peak resident memory of a fresh process
per (case, provider), so the numbers do not depend on what ran before.

output: a table on stdout; CSV rows appended to <out>/<family>.csv and the whole run as
<out>/<tag>.json. <out> is --out, else ${OUT_ENV}, else ./{DEFAULT_OUT_NAME}
in the current directory.

examples:
  alignops bench --quick
  alignops bench --family linear_cross_entropy --model llama3-8b --tokens 4096,16384 --dtype bfloat16
  alignops bench --family cross_entropy --providers alignops,eager --mode fwd+bwd
  alignops bench --family linear_cross_entropy --tokens 4096 --hidden 1024 --vocab 65536 \\
      --dtype float32 --mode fwd+bwd --memory-report
  alignops bench --list
"""


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="alignops bench",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--family", type=_csv, default=None, help=f"comma list of {', '.join(FAMILIES)}")
    p.add_argument("--model", type=_csv, default=None, help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--tokens", type=lambda s: [int(x) for x in _csv(s)], default=None, help="N, comma list")
    p.add_argument("--hidden", type=int, default=None, help="override H of the model")
    p.add_argument("--vocab", type=int, default=None, help="override V of the model")
    p.add_argument("--softcap", type=float, default=None, help="override the model's final-logit soft-cap")
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="sequence length T of the dpo_step / grpo_step batches (default 256); N = sequences * T",
    )
    p.add_argument("--providers", type=_csv, default=None, help="comma list; default: all that apply")
    p.add_argument("--dtype", type=_csv, default=None, help=f"comma list of {', '.join(H.DTYPES)}")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--mode",
        type=_csv,
        default=None,
        help="fwd, bwd, fwd+bwd or all (default: all; fwd+bwd for the *_step families)",
    )
    p.add_argument("--quick", action="store_true", help="every family once, small shapes")
    p.add_argument(
        "--out", type=Path, default=None, help=f"results folder (default: ${OUT_ENV} or ./{DEFAULT_OUT_NAME})"
    )
    p.add_argument("--tag", default=None, help="JSON file name (default: quick / run)")
    p.add_argument("--plot", action="store_true", help="draw PNGs (matplotlib)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--no-save", action="store_true", help="print only; write no CSV / JSON")
    p.add_argument("--memory-report", action="store_true", help="print the memory report block")
    p.add_argument("--budget-s", type=float, default=None, help="CPU seconds of repetitions per timing")
    p.add_argument("--list", action="store_true", help="list families, providers and models")
    return p.parse_args(argv)


def _family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise SystemExit(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return importlib.import_module(f"{__package__}.{name}")


def _listing(device: str) -> str:
    lines = ["families and providers:"]
    probe = H.Case("probe", "probe", 1, 1, 1, "float32", device)
    for name in FAMILIES:
        mod = _family(name)
        reason = mod.unavailable()
        lines.append(f"  {name}" + (f"  (skipped: {reason})" if reason else ""))
        for prov in [] if reason else mod.providers():
            why = prov.skip_reason(probe)
            lines.append(f"    {prov.name:<14} {'skipped: ' + why if why else 'runs'}")
    lines.append("models:")
    for m in MODELS.values():
        cap = f" softcap={m.softcap:g}" if m.softcap else ""
        lines.append(f"  {m.name:<14} H={m.hidden_size:<5} V={m.vocab_size:<7}{cap}  ({m.source})")
    return "\n".join(lines)


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run_case(
    mod: ModuleType,
    case: H.Case,
    wanted: list[str] | None,
    modes: list[str],
    args: argparse.Namespace,
    budget_s: float,
    skips: list[H.Skip],
    memserver: M.MemoryServer,
) -> list[H.Record]:
    records: list[H.Record] = []
    inputs = mod.make_inputs(case)
    peaks = H.device_peaks(case.device, case.torch_dtype)
    reference = None
    for prov in mod.providers():
        if wanted is not None and prov.name not in wanted:
            continue
        reason = prov.skip_reason(case)
        if reason:
            _add_skip(skips, H.Skip(case.family, prov.name, reason))
            continue
        label = f"{case.family} {case.model} N={case.tokens} {case.dtype} {prov.name}"
        t0 = time.perf_counter()
        try:
            bound = prov.build(case, inputs)
            out = H.run_once(bound)
        except Exception as e:  # a peer that cannot run here is reported, never fatal
            _add_skip(skips, H.Skip(case.family, prov.name, f"failed: {type(e).__name__}: {_first_line(e)}"))
            continue
        if reference is None:
            reference, agreement = out, None
        else:
            agreement = H.compare(reference, out, case.torch_dtype, mod.GRAD_NAMES)
        _log(
            f"{label} agreement run: {'ref' if agreement is None else agreement.detail}  "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        timings = {}
        for mode in modes:
            t0 = time.perf_counter()
            timings[mode] = H.time_step(bound, mode, case.device, budget_s)
            _log(f"{label} {mode}: {timings[mode].p50_ms:.4g} ms  ({time.perf_counter() - t0:.1f} s)")
        memory: dict[str, M.Memory] = {}
        if not args.no_memory:
            t0 = time.perf_counter()
            if case.device == "cuda":
                memory = {mode: M.memory_cuda(bound, mode) for mode in modes}
            else:
                memory = memserver.measure(mod.__name__, case, prov.name, modes, prov.preload)
            peaks_text = ", ".join(f"{m} {_mib(memory[m].peak_extra_bytes)}" for m in modes)
            _log(f"{label} memory: {peaks_text}  ({time.perf_counter() - t0:.1f} s)")
            errors = sorted({mem.error for mem in memory.values() if mem.peak_extra_bytes is None})
            for error in errors:  # a missing number is always explained, in the log and the table
                _log(f"{label} memory not measured: {error}")
                _add_skip(skips, H.Skip(case.family, prov.name, f"memory not measured: {error}"))
        for mode in modes:
            records.append(
                H.Record(
                    case=case,
                    provider=prov.name,
                    mode=mode,
                    timing=timings[mode],
                    memory=memory.get(mode),
                    grads_bytes=mod.grads_bytes(case),
                    flops=mod.flops(case, mode),
                    bytes_moved=mod.bytes_moved(case, mode),
                    rate_unit=mod.RATE_UNIT,
                    peaks=peaks,
                    agreement=agreement,
                    version=prov.version(),
                    note=bound.note,
                )
            )
        del bound
        gc.collect()
    return records


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def _print_warnings(caught: list[warnings.WarningMessage]) -> None:
    """The warnings raised during the run, once each, on stderr."""
    seen: dict[str, int] = {}
    for w in caught:
        first = str(w.message).strip().splitlines()
        key = f"{w.category.__name__}: {first[0] if first else ''}"
        seen[key] = seen.get(key, 0) + 1
    if seen:
        print("\nwarnings raised while measuring:", file=sys.stderr)
        for key, count in seen.items():
            print(f"  {key}" + (f"  (x{count})" if count > 1 else ""), file=sys.stderr)
    sys.stderr.flush()


def _add_skip(skips: list[H.Skip], skip: H.Skip) -> None:
    if skip not in skips:
        skips.append(skip)


def _run_all(
    args: argparse.Namespace,
    device: str,
    shapes: list,
    dtypes: list[str],
    tokens: list[int] | dict[str, tuple[int, ...]],
    modes: list[str] | None,
    budget_s: float,
    skips: list[H.Skip],
    memserver: M.MemoryServer,
) -> list[H.Record]:
    records: list[H.Record] = []
    for fam_name in args.family or FAMILIES:
        mod = _family(fam_name)
        reason = mod.unavailable()
        if reason:
            _add_skip(skips, H.Skip(fam_name, "*", reason))
            continue
        fam_modes = modes or list(getattr(mod, "DEFAULT_MODES", H.MODES))
        for shape in shapes:
            softcap = args.softcap if args.softcap is not None else shape.softcap
            for dtype in dtypes:
                fam_tokens = tokens.get(fam_name, tokens["default"]) if isinstance(tokens, dict) else tokens
                for n in fam_tokens:
                    case = H.Case(
                        fam_name, shape.name, n, shape.hidden_size, shape.vocab_size, dtype, device, softcap
                    )
                    records += run_case(
                        mod, case, args.providers, fam_modes, args, budget_s, skips, memserver
                    )
    return records


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.seq_len is not None:
        if args.seq_len < 2:
            raise SystemExit("alignops bench: --seq-len must be >= 2")
        # an environment variable, so the fresh processes that measure memory see it too
        os.environ["ALIGNOPS_BENCH_SEQ_LEN"] = str(args.seq_len)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if args.list:
        print(_listing(device))
        return 0
    cuda = device == "cuda"
    if args.quick:
        models = args.model or [QUICK_MODEL_CUDA if cuda else QUICK_MODEL_CPU]
        tokens = args.tokens or dict(QUICK_TOKENS_CUDA if cuda else QUICK_TOKENS_CPU)
        budget_s = args.budget_s or QUICK_BUDGET_S
    else:
        models = args.model or list(DEFAULT_MODELS_CUDA if cuda else DEFAULT_MODELS_CPU)
        tokens = args.tokens or list(DEFAULT_TOKENS_CUDA if cuda else DEFAULT_TOKENS_CPU)
        budget_s = args.budget_s or H.CPU_TIME_BUDGET_S
    dtypes = args.dtype or [DEFAULT_DTYPE_CUDA if cuda else DEFAULT_DTYPE_CPU]
    modes = None if args.mode is None else (list(H.MODES) if "all" in args.mode else args.mode)
    for m in modes or []:
        if m not in H.MODES:
            raise SystemExit(f"unknown mode {m!r}; known: {', '.join(H.MODES)}, all")
    for d in dtypes:
        if d not in H.DTYPES:
            raise SystemExit(f"unknown dtype {d!r}; known: {', '.join(H.DTYPES)}")
    shapes = [with_overrides(get_model(m), hidden_size=args.hidden, vocab_size=args.vocab) for m in models]

    env = H.environment(device)
    skips: list[H.Skip] = []
    started = time.perf_counter()
    # Warnings that torch.compile, Triton or transformers raise while measuring (those the active
    # warning filters let through) are collected and printed once each after the tables, on
    # stderr, never in the middle of them.
    with warnings.catch_warnings(record=True) as caught, M.MemoryServer() as memserver:
        records = _run_all(args, device, shapes, dtypes, tokens, modes, budget_s, skips, memserver)
    elapsed_s = time.perf_counter() - started

    peaks = {
        f"{dev} {str(dt).removeprefix('torch.')}": f"{p.flops_per_s / 1e12:.3g} TFLOP/s, "
        f"{p.bytes_per_s / 1e9:.3g} GB/s, {p.source}"
        for (dev, dt), p in H._PEAK_CACHE.items()
    }
    print(_report.header(env, peaks))
    print(_report.table(records))
    if args.memory_report or args.hidden is not None or args.vocab is not None:
        print(_report.memory_report(records))
    print(_report.skipped(skips))
    print(f"\n{len(records)} measurements in {elapsed_s:.1f} s")
    _print_warnings(caught)
    if not args.no_save:
        args.out = args.out or default_out()
        args.out.mkdir(parents=True, exist_ok=True)
        tag = args.tag or ("quick" if args.quick else "run")
        arg_dict = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        written = _report.write_csv(records, env, args.out)
        written.append(_report.write_json(records, skips, env, arg_dict, args.out / f"{tag}.json"))
        if args.plot:
            written += _report.plot(records, env, args.out)
        print("wrote " + ", ".join(str(p) for p in written))
    return 0
