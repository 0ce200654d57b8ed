"""Benchmark output: the stdout table, the memory report, the long-format CSV, the JSON, the plots.

CSV schema (long format, one row per number, appended to ``<out>/<family>.csv``)::

    family, provider, mode, metric, unit, x_name, x, p50, p20, p80, config_json, gpu, torch, triton,
    commit, timestamp

metrics: ``time`` (ms), ``peak_extra_memory`` (MiB), ``throughput`` (TFLOP/s or GB/s),
``roofline_fraction`` (%), ``agreement_rel_err`` (relative L2 error vs alignops). ``gpu`` holds
the device name (the CPU model on CPU); ``config_json`` the shape, dtype and measurement methods.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

from ._harness import MODES, Record, Skip

MIB = 2**20
BASELINE = "eager"  # eager PyTorch on full logits: the x eager / mem/eager columns
OURS = "alignops"
CSV_FIELDS = (
    "family",
    "provider",
    "mode",
    "metric",
    "unit",
    "x_name",
    "x",
    "p50",
    "p20",
    "p80",
    "config_json",
    "gpu",
    "torch",
    "triton",
    "commit",
    "timestamp",
)
TABLE_COLUMNS = (  # (title, width)
    ("mode", 8),
    ("provider", 14),
    ("ms p50", 10),
    ("p20..p80", 17),
    ("rate", 9),
    ("roof%", 6),
    ("extra MiB", 10),
    ("/grads", 7),
    ("agree", 13),
    ("x eager", 8),
    ("mem/eager", 9),
    ("ao x", 7),
    ("ao mem", 7),
)
PLOT_DPI = 110
OVER_BOUND_NOTE = (
    "\n* faster than the device bound for this mode's algorithmic work: the work is done in another\n"
    "  mode (torch's chunked CE computes the gradients during its forward)."
)
LOADED_FRACTION = 0.5  # load average above this fraction of the cores: timings flagged as noisy


def _group_key(r: Record) -> tuple:
    c = r.case
    return (c.family, c.model, c.tokens, c.hidden, c.vocab, c.dtype, c.softcap)


def _fmt(v: float | None, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def _time(r: Record | None) -> float | None:
    return None if r is None or r.timing is None else r.timing.p50_ms


def _mem(r: Record | None) -> float | None:
    if r is None or r.memory is None or r.memory.peak_extra_bytes is None:
        return None
    return float(max(r.memory.peak_extra_bytes, 0))


def _agree(r: Record) -> str:
    if r.agreement is None:
        return "ref"
    a = r.agreement
    return f"ok {a.max_rel_err:.0e}" if a.ok else f"DIFF {a.max_rel_err:.0e}"


def header(env: dict, peaks: dict[str, str]) -> str:
    lines = [
        f"alignops bench  device: {env['device']} {env['device_name']} ({env['device_detail']})  "
        f"torch {env['torch']}  triton {env['triton']}  python {env['python']}",
        f"commit {env['commit']}  {env['timestamp']}",
    ]
    load = env.get("load_average_1min")
    if load is not None:
        busy = load > LOADED_FRACTION * (env.get("cpu_count") or 1)
        lines.append(
            f"load average at start {load:.2f} on {env.get('cpu_count')} cores"
            + ("  WARNING: other work is running; CPU timings are noisy" if busy else "")
        )
    lines += [f"peak {k}: {v}" for k, v in peaks.items()]
    return "\n".join(lines)


def _row(cells: list[str]) -> str:
    """Fixed-width line: the first two columns left-aligned, numbers right-aligned."""
    widths = [w for _, w in TABLE_COLUMNS]
    return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def table(records: list[Record]) -> str:
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        groups[_group_key(r)].append(r)
    out = []
    title = _row([t for t, _ in TABLE_COLUMNS])
    footnote = False
    for key, rows in groups.items():
        family, model, n, h, v, dtype, softcap = key
        grads = rows[0].grads_bytes / MIB
        cap = f"  softcap={softcap:g}" if softcap is not None else ""
        out.append("")
        out.append(
            f"{family}  {model}  N={n} H={h} V={v}  {dtype}{cap}  grads {grads:.1f} MiB  "
            f"rate in {rows[0].rate_unit}"
        )
        out.append(title)
        by_mode = defaultdict(dict)
        for r in rows:
            by_mode[r.mode][r.provider] = r
        for mode in MODES:
            base, ours = by_mode[mode].get(BASELINE), by_mode[mode].get(OURS)
            for r in by_mode[mode].values():
                t = r.timing
                spread = f"{t.p20_ms:.4g}..{t.p80_ms:.4g}" if t else "-"
                rate, roof = r.rate, r.roofline_fraction
                over_bound = roof is not None and roof > 1.0
                footnote |= over_bound
                cells = [
                    r.mode,
                    r.provider,
                    _fmt(_time(r), ".4g"),
                    spread,
                    _fmt(rate, ".3g"),
                    ">100*" if over_bound else _fmt(None if roof is None else 100 * roof, ".1f"),
                    _fmt(None if _mem(r) is None else _mem(r) / MIB, ".1f"),
                    _fmt(_ratio(_mem(r), r.grads_bytes), ".2f"),
                    _agree(r),
                    _fmt(_ratio(_time(base), _time(r)), ".2f"),
                    _fmt(_ratio(_mem(r), _mem(base)), ".3f"),
                    _fmt(_ratio(_time(r), _time(ours)), ".2f"),
                    _fmt(_ratio(_mem(ours), _mem(r)), ".3f"),
                ]
                out.append(_row(cells))
    if footnote:
        out.append(OVER_BOUND_NOTE)
    return "\n".join(out)


def memory_report(records: list[Record]) -> str:
    """Peak extra memory per provider against the gradients the op must return, with times."""
    out = ["", "memory report: peak extra memory during the step, over the bytes of the returned grads"]
    groups: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        groups[(*_group_key(r), r.mode)].append(r)
    for (family, model, n, h, v, dtype, _cap, mode), rows in groups.items():
        grads = rows[0].grads_bytes
        out.append(f"{family} {model} N={n} H={h} V={v} {dtype} {mode}: grads {grads / MIB:.1f} MiB")
        ours = next((r for r in rows if r.provider == OURS), None)
        for r in rows:
            mem = _mem(r)
            cmp = ""
            if ours is not None and r is not ours:
                cmp = (
                    f"  alignops vs this: speedup {_fmt(_ratio(_time(r), _time(ours)), '.2f')}x, "
                    f"memory ratio {_fmt(_ratio(_mem(ours), mem), '.3f')}"
                )
            out.append(
                f"  {r.provider:<14} {_fmt(None if mem is None else mem / MIB, '9.1f')} MiB"
                f"  = {_fmt(_ratio(mem, grads), '6.2f')} x grads   {_fmt(_time(r), '9.4g')} ms{cmp}"
            )
        methods = sorted({r.memory.method for r in rows if r.memory is not None})
        out.append("  memory: " + "; ".join(methods))
    return "\n".join(out)


def skipped(skips: list[Skip]) -> str:
    if not skips:
        return ""
    lines = ["", "skipped / failed:"]
    lines += [f"  {s.family:<22} {s.provider:<14} {s.reason}" for s in skips]
    return "\n".join(lines)


def _config(r: Record) -> dict:
    c = r.case
    return {
        "model": c.model,
        "hidden": c.hidden,
        "vocab": c.vocab,
        "dtype": c.dtype,
        "softcap": c.softcap,
        "device": c.device,
        "seed": c.seed,
        "flops": r.flops,
        "bytes": r.bytes_moved,
        "grads_bytes": r.grads_bytes,
        "memory_method": r.memory.method if r.memory else None,
        "memory_error": r.memory.error if r.memory else None,
        "peaks": r.peaks.source,
        "provider_version": r.version,
        "agree": None if r.agreement is None else r.agreement.ok,
        "agreement_detail": None if r.agreement is None else r.agreement.detail,
        "note": r.note,
        "reps": r.timing.reps if r.timing else 0,
    }


def csv_rows(r: Record, env: dict) -> list[dict]:
    common = {
        "family": r.case.family,
        "provider": r.provider,
        "mode": r.mode,
        "x_name": "tokens",
        "x": r.case.tokens,
        "config_json": json.dumps(_config(r), sort_keys=True),
        "gpu": env["device_name"],
        "torch": env["torch"],
        "triton": env["triton"],
        "commit": env["commit"],
        "timestamp": env["timestamp"],
    }
    rows = []

    def add(metric: str, unit: str, p50, p20=None, p80=None) -> None:
        if p50 is None:
            return
        rows.append(
            {
                **common,
                "metric": metric,
                "unit": unit,
                "p50": p50,
                "p20": p50 if p20 is None else p20,
                "p80": p50 if p80 is None else p80,
            }
        )

    t = r.timing
    if t is not None:
        add("time", "ms", t.p50_ms, t.p20_ms, t.p80_ms)
        scale = r.rate / (1.0 / t.p50_ms) if r.rate is not None else None
        if scale is not None:  # rate = work / time: the p20 rate is the p80 time's
            add("throughput", r.rate_unit, r.rate, scale / t.p80_ms, scale / t.p20_ms)
        if r.roofline_fraction is not None:
            add("roofline_fraction", "%", 100 * r.roofline_fraction)
    if _mem(r) is not None:
        add("peak_extra_memory", "MiB", _mem(r) / MIB)
    if r.agreement is not None:
        add("agreement_rel_err", "1", r.agreement.max_rel_err)
    return rows


def write_csv(records: list[Record], env: dict, out_dir: Path) -> list[Path]:
    by_family: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_family[r.case.family] += csv_rows(r, env)
    paths = []
    for family, rows in by_family.items():
        path = out_dir / f"{family}.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if new:
                w.writeheader()
            w.writerows(rows)
        paths.append(path)
    return paths


def record_dict(r: Record) -> dict:
    d = {
        "case": asdict(r.case),
        "provider": r.provider,
        "mode": r.mode,
        "timing_ms": asdict(r.timing) if r.timing else None,
        "peak_extra_bytes": _mem(r),
        "memory": asdict(r.memory) if r.memory else None,
        "grads_bytes": r.grads_bytes,
        "flops": r.flops,
        "bytes": r.bytes_moved,
        "rate": r.rate,
        "rate_unit": r.rate_unit,
        "roofline_fraction": r.roofline_fraction,
        "peaks": asdict(r.peaks),
        "agreement": None if r.agreement is None else {**asdict(r.agreement), "ok": r.agreement.ok},
        "version": r.version,
        "note": r.note,
    }
    return d


def write_json(records: list[Record], skips: list[Skip], env: dict, args: dict, path: Path) -> Path:
    doc = {
        "environment": env,
        "args": args,
        "records": [record_dict(r) for r in records],
        "skipped": [asdict(s) for s in skips],
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


def plot(records: list[Record], env: dict, out_dir: Path) -> list[Path]:
    """Time and peak extra memory against tokens, one line per provider (fwd+bwd when measured);
    one PNG per (family, model, dtype) measured at two token counts or more."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[Record]] = defaultdict(list)
    for r in records:
        groups[(r.case.family, r.case.model, r.case.dtype)].append(r)
    paths = []
    for (family, model, dtype), rows in groups.items():
        if len({r.case.tokens for r in rows}) < 2:
            continue  # a line needs two points
        modes = {r.mode for r in rows}
        mode = "fwd+bwd" if "fwd+bwd" in modes else sorted(modes)[0]
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        lines: dict[str, list[Record]] = defaultdict(list)
        for r in rows:
            if r.mode == mode:
                lines[r.provider].append(r)
        for provider, pts in lines.items():
            pts.sort(key=lambda r: r.case.tokens)
            x = [r.case.tokens for r in pts]
            ax_t.plot(x, [_time(r) or math.nan for r in pts], marker="o", label=provider)
            ax_m.plot(x, [(_mem(r) or math.nan) / MIB for r in pts], marker="o", label=provider)
        floor = sorted({(r.case.tokens, r.grads_bytes / MIB) for r in rows})
        ax_m.plot([x for x, _ in floor], [g for _, g in floor], "k--", linewidth=1, label="grads (floor)")
        h, v = rows[0].case.hidden, rows[0].case.vocab
        for ax, ylabel in ((ax_t, "time p50 [ms]"), (ax_m, "peak extra memory [MiB]")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_m.legend(fontsize=8)
        fig.suptitle(
            f"{family} {mode}  {model} H={h} V={v} {dtype}  "
            f"{env['device_name']}  torch {env['torch']}  {env['commit']}",
            fontsize=9,
        )
        fig.tight_layout()
        path = out_dir / f"{family}_{model}_{dtype}.png"
        fig.savefig(path, dpi=PLOT_DPI)
        plt.close(fig)
        paths.append(path)
    return paths
