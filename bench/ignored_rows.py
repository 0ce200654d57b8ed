"""Ignored rows cost nothing: CPU forward + backward time of the torch engine on a DPO-like batch
whose prompts (ignored) take half the tokens, with and without skipping the ignored rows.

    python -m alignops.bench.ignored_rows [N H V] [--reps R]

Defaults N=4096, H=1024, V=32768, float32; rows alternate in blocks of 256 tokens between
prompt (ignore_index) and completion, as a packed batch of (prompt, completion) pairs does.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch
from alignops.kernels._common import NOTHING_EXTRA, LogitOptions, TokenStats

from alignops._torch import linear_logprobs as E

OPTS = LogitOptions(-100, 1.0, None, 1.0)


def step(hidden, weight, targets, g):
    st = E.linear_logprobs_fwd(hidden, weight, targets, None, OPTS, NOTHING_EXTRA)
    saved = TokenStats(st.logp, st.lse, None, None, None, None, None)
    grads = TokenStats(g, None, None, None, None, None, None)
    return engine_bwd(hidden, weight, targets, saved, grads)


def engine_bwd(hidden, weight, targets, saved: TokenStats, grads: TokenStats, **kw):
    """``(dh, dW, None)`` of the PyTorch engine's backward with :data:`OPTS`, no bias: ``hidden
    [N, H]``, ``weight [V, H]``, ``targets [N]``; ``kw``: ``grad_filter`` / ``tile_stats``."""
    return E.linear_logprobs_bwd(
        hidden,
        weight,
        targets,
        None,
        saved,
        grads,
        OPTS,
        need_dhidden=True,
        need_dweight=True,
        need_dbias=False,
        **kw,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shape", nargs="*", type=int, default=[4096, 1024, 32768])
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args(argv)
    n, h, v = args.shape
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / h**0.5
    targets = torch.randint(0, v, (n,), generator=gen)
    prompt = (torch.arange(n) // 256) % 2 == 0
    targets[prompt] = OPTS.ignore_index
    g = torch.where(prompt, 0.0, -1.0)
    print(f"N={n} H={h} V={v} float32, {int(prompt.sum())} of {n} rows ignored", end="; ")
    print(f"threads {torch.get_num_threads()}")
    times, outs = {}, {}
    for name, compact in (("dense", False), ("skip ignored", True)):
        with mock.patch.object(E, "COMPACT_IGNORED", compact):
            runs = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                outs[name] = step(hidden, weight, targets, g)
                runs.append(time.perf_counter() - t0)
        times[name] = statistics.median(runs)
        print(f"{name:14s} fwd+bwd median of {args.reps}: {times[name]:.2f} s")
    same = all(
        torch.allclose(a, b, atol=1e-6, rtol=1e-4)
        for a, b in zip(outs["dense"][:2], outs["skip ignored"][:2])
    )
    print(f"speed-up {times['dense'] / times['skip ignored']:.2f}x; gradients agree: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
