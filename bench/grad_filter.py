"""Gradient filtering: the fraction of skipped tiles and the CPU backward time with and without.

    python -m alignops.bench.grad_filter [N H V] [--reps R]

Defaults N=4096, H=1024, V=65536, bf16 inputs (so ``grad_filter="auto"`` is 2^-12), upstream
gradient of a mean cross-entropy. Times the torch engine's backward (the CPU path) with the
filter off and on, and reports the skipped fraction in the torch engine's unit (a vocabulary
column of a token chunk) and in the Triton path's unit (a 64 x 128 tile of the default
configuration), the latter computed from the float32 softmax with the kernels' rule.

How the inputs are made peaked (as a trained model's next-token distributions): every hidden
state is a scaled mean of the weight rows of 4 "topic" tokens drawn from a Zipf(1.1) law whose
frequent tokens have low ids (a BPE vocabulary assigns ids in merge order, roughly by
frequency), plus Gaussian noise; one of the 4 is the target, and 1/8 of the rows are ignored.
The script prints the resulting mean max-probability and entropy.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from alignops.bench.ignored_rows import OPTS, engine_bwd
from alignops.kernels._common import NOTHING_EXTRA, TokenStats, grad_filter_threshold

from alignops._torch import linear_logprobs as E

#: Default sharpness: at H = 1024 a mean entropy of about 1.5 nats per token, in the range of a
#: trained language model's on text (lower than a uniform guess over the 4 topics' 1.39 nats
#: only through the noise).
SHARP = 2.0
TOPICS = 4


def peaked_inputs(n: int, h: int, v: int, *, topics: int = 4, sharp: float = 4.0, seed: int = 0):
    """``(hidden [n, h], weight [v, h], targets [n])`` in float32 (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, h, generator=g) / h**0.5 * 2.0
    zipf = torch.arange(1, v + 1, dtype=torch.float64).pow(-1.1)
    picks = torch.multinomial(zipf / zipf.sum(), n * topics, replacement=True, generator=g).view(n, topics)
    hidden = weight[picks].mean(1) * (sharp * h**0.5 / 2.0) + 0.3 * torch.randn(n, h, generator=g)
    targets = picks[torch.arange(n), torch.randint(0, topics, (n,), generator=g)]
    targets[torch.randperm(n, generator=g)[: n // 8]] = OPTS.ignore_index
    return hidden, weight, targets


def triton_tile_fraction(
    hidden, weight, targets, lse, t: float, bn: int = 64, bv: int = 128
) -> tuple[float, float, float]:
    """``(live tiles / all tiles, mean max p, mean entropy)`` of the ``[bn, bv]`` tiling, by the
    kernels' rule: live when a valid entry has ``p >= t`` or a valid row's target is inside."""
    n, v = hidden.shape[0], weight.shape[0]
    valid = targets != OPTS.ignore_index
    live = total = 0
    maxp, ent = [], []
    for r0 in range(0, n, bn * 8):
        r1 = min(n, r0 + bn * 8)
        z = hidden[r0:r1] @ weight.T
        lp = z - lse[r0:r1, None]
        lp[~valid[r0:r1]] = -math.inf
        p = lp.exp()
        maxp.append(p.amax(1)[valid[r0:r1]])
        ent.append(-(p * lp.nan_to_num(neginf=0.0)).sum(1)[valid[r0:r1]])
        rows = r1 - r0
        pad_r, pad_c = -rows % bn, -v % bv
        m = torch.nn.functional.pad(lp >= math.log(t), (0, pad_c, 0, pad_r))
        hit = torch.zeros_like(m)
        vr = valid[r0:r1].nonzero().squeeze(1)
        hit[vr, targets[r0:r1][vr]] = True
        tiles = (m | hit).view(-1, bn, m.shape[1] // bv, bv).any(3).any(1)
        has_valid = torch.nn.functional.pad(valid[r0:r1], (0, pad_r)).view(-1, bn).any(1)
        live += int((tiles & has_valid[:, None]).sum())
        total += tiles.numel()
    return live / total, torch.cat(maxp).mean().item(), torch.cat(ent).mean().item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shape", nargs="*", type=int, default=[4096, 1024, 65536])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--sharp", type=float, default=SHARP, help="logit scale of the topic tokens")
    ap.add_argument("--topics", type=int, default=TOPICS, help="tokens mixed into each hidden state")
    args = ap.parse_args(argv)
    n, h, v = args.shape
    hidden, weight, targets = peaked_inputs(n, h, v, topics=args.topics, sharp=args.sharp)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    t = grad_filter_threshold("auto", torch.bfloat16)
    st = E.linear_logprobs_fwd(hidden, weight, targets, None, OPTS, NOTHING_EXTRA)
    valid = targets != OPTS.ignore_index
    g = torch.where(valid, -1.0 / valid.sum(), 0.0)
    saved = TokenStats(st.logp, st.lse, None, None, None, None, None)
    grads = TokenStats(g, None, None, None, None, None, None)
    frac_live, maxp, ent = triton_tile_fraction(hidden.float(), weight.float(), targets, st.lse, t)
    print(
        f"N={n} H={h} V={v} bf16, threshold {t:.3g} (2^{math.log2(t):.0f}); threads {torch.get_num_threads()}"
    )
    print(f"peakedness: mean max p {maxp:.3f}, mean entropy {ent:.3f} nats (valid rows)")
    print(f"Triton 64x128 tiles skipped: {1 - frac_live:.1%}")
    times = {}
    for name, thr in (("off", 0.0), ("on", t)):
        runs = []
        for _ in range(args.reps):
            tiles: dict = {}
            t0 = time.perf_counter()
            engine_bwd(hidden, weight, targets, saved, grads, grad_filter=thr, tile_stats=tiles)
            runs.append(time.perf_counter() - t0)
        times[name] = statistics.median(runs)
        if tiles:
            skipped = 1 - tiles["live"].item() / tiles["tiles"].item()
            print(f"torch engine columns skipped: {skipped:.1%}")
    off, on = times["off"], times["on"]
    print(f"CPU backward (torch engine), median of {args.reps}: off {off:.2f} s, on {on:.2f} s", end=" ")
    print(f"({off / on:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
