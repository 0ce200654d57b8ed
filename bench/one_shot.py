"""One measured step per provider, each in a fresh interpreter: time and peak extra memory of a
single fwd+bwd at a large CPU shape, where ``alignops bench`` (three timed repetitions plus the
memory child's two runs per provider) would take too long on a small shared CPU.

    python -m alignops.bench.one_shot --family divergence --tokens 4096 --hidden 1024 \\
        --vocab 65536 --providers alignops,eager,torch.compile,trl-chunked

Per provider, a new ``python`` process builds the case's inputs, tunes malloc and measures the
peak extra RSS of one fwd+bwd exactly as the memory child of ``alignops bench`` does
(``_memory``: ``VmHWM - VmRSS`` after ``clear_refs``), timing the same step with ``perf_counter``.
One step at a tiny shape runs first (lazy imports, op registration and thread pools are costs of
the process, not of the step), then ``--warmup`` steps at the case's shape (default 0); a provider
named ``torch.compile`` always gets one, so that compiling the graph is not counted. Each child
also prints the loss and the norms of the gradients, so the providers' numerical agreement is
visible in the same table. Prints a table; writes no files.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import subprocess
import sys
import time

import torch

_CHILD = "alignops.bench.one_shot"


def child(spec: dict) -> dict:
    from . import _memory as M
    from ._harness import Case, find_provider, mode_steps

    trim = M._tune_malloc()
    mod = importlib.import_module(f"alignops.bench.{spec['family']}")
    case = Case(**spec["case"])
    prov = find_provider(mod.providers(), spec["provider"])
    reason = prov.skip_reason(case)
    if reason:
        return {"provider": spec["provider"], "skipped": reason}
    # one step at a tiny shape first: lazy imports, op registration and thread pools are one-time
    # costs of the process, not of the step
    tiny = Case(**{**spec["case"], "tokens": 64, "hidden": 32, "vocab": 257})
    setup, run = mode_steps(prov.build(tiny, mod.make_inputs(tiny)), "fwd+bwd")
    setup()
    run()
    setup()
    inputs = mod.make_inputs(case)
    bound = prov.build(case, inputs)
    setup, run = mode_steps(bound, "fwd+bwd")
    warm = spec["warmup"] + (1 if spec["provider"] == "torch.compile" and spec["warmup"] == 0 else 0)
    for _ in range(warm):
        setup()
        run()
    setup()
    gc.collect()
    trim()
    out = {}

    def step():
        t0 = time.perf_counter()
        loss = bound.fn()
        loss.backward()
        out["s"] = time.perf_counter() - t0
        out["loss"] = float(loss.detach())

    peak_kib, base_kib, method = M._peak_during(step)
    return {
        "provider": spec["provider"],
        "time_s": out["s"],
        "peak_extra_bytes": (peak_kib - base_kib) * 1024,
        "method": method,
        "loss": out["loss"],
        "grad_norms": [float(t.grad.double().norm()) for t in bound.leaves],
        "grads_bytes": mod.grads_bytes(case),
        "warmup": warm,
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m alignops.bench.one_shot", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--family", required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--softcap", type=float, default=None)
    p.add_argument("--providers", required=True, help="comma list")
    p.add_argument("--warmup", type=int, default=0)
    a = p.parse_args(argv)
    case = dict(
        family=a.family, model="custom", tokens=a.tokens, hidden=a.hidden, vocab=a.vocab, dtype=a.dtype,
        device="cpu", softcap=a.softcap,
    )  # fmt: skip
    print(
        f"{a.family}: N={a.tokens} H={a.hidden} V={a.vocab} {a.dtype} cpu, fwd+bwd, one fresh process per "
        f"provider; torch {torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )
    print(
        f"{'provider':<15}{'time s':>9}{'peak extra MiB':>16}{'/grads':>8}{'loss':>14}  grad norms",
        flush=True,
    )
    for name in [s.strip() for s in a.providers.split(",") if s.strip()]:
        spec = {"family": a.family, "case": case, "provider": name, "warmup": a.warmup}
        r = subprocess.run(
            [sys.executable, "-m", _CHILD, "--child", json.dumps(spec)], capture_output=True, text=True
        )
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode != 0 or not lines:
            tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"{name:<15} failed: {tail[:160]}", flush=True)
            continue
        res = json.loads(lines[-1])
        if "skipped" in res:
            print(f"{name:<15} skipped: {res['skipped']}", flush=True)
            continue
        mib = res["peak_extra_bytes"] / 2**20
        ratio = res["peak_extra_bytes"] / res["grads_bytes"]
        norms = " ".join(f"{x:.6g}" for x in res["grad_norms"])
        print(
            f"{name:<15}{res['time_s']:>9.1f}{mib:>16.1f}{ratio:>8.2f}{res['loss']:>14.7g}  {norms}",
            flush=True,
        )
    print("peak extra = VmHWM - VmRSS around the step (clear_refs); /grads = over the bytes of dh + dW")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))), flush=True)
    else:
        sys.exit(main(sys.argv[1:]))
