"""Vocabulary-parallel heads: the error against the single-process run and the bytes each rank
sends, measured.

``python -m alignops.bench.distributed`` spawns 2 and then 4 CPU processes (gloo), splits an LM
head of ``V`` rows (not divisible by either world size) over them, runs ``linear_logprobs`` with
every statistic (log-prob, entropy, lse, log sum p^2, top-k) and ``linear_cross_entropy``
forward and backward, and prints:

* the largest absolute error of every output and gradient against the single-process float64
  computation on the full head (float64 inputs: the combine itself; float32 inputs: what a run
  in float32 sees);
* every collective the calls made (and those of ``linear_divergence``, forward KL and jsd),
  counted by wrapping ``torch.distributed.all_reduce`` / ``all_gather``: the payload (elements
  and bytes) per token of each call, for two vocabulary sizes (a ring all-reduce moves about
  ``2 (P - 1) / P`` times its payload per rank), which shows that the per-token traffic does not
  depend on ``V`` (O(1) floats per token; the top-k all-gather is O(k); the hidden-state gradient
  all-reduce is the usual ``H`` floats per token of a tensor-parallel layer, unless
  ``reduce_hidden_grad=False``).

Options: ``--tokens``, ``--hidden``, ``--vocab`` (two sizes), ``--worlds``.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections import defaultdict
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

OUTPUTS = ("logps", "entropy", "lse", "log_sum_p2")


class _Counter:
    """Wraps ``dist.all_reduce`` / ``dist.all_gather`` and records (name, elements, bytes)."""

    def __init__(self):
        self.calls: list[tuple[str, int, int]] = []
        self._orig = {}

    def __enter__(self):
        for name in ("all_reduce", "all_gather"):
            self._orig[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, self._orig[name]))
        return self

    def __exit__(self, *exc):
        for name, fn in self._orig.items():
            setattr(dist, name, fn)

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            t = args[1] if name == "all_gather" else args[0]
            op = kwargs.get("op")
            label = name if op is None else f"{name} {str(op).split('.')[-1]}"
            self.calls.append((label, t.numel(), t.numel() * t.element_size()))
            return fn(*args, **kwargs)

        return counted


def _cut(x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return x[start : start + sizes[rank]].clone()


def _sizes(v: int, world: int) -> list[int]:
    step = -(-v // world)
    return [max(0, min(step, v - r * step)) for r in range(world)]


def _reference(hidden, weight, bias, targets, ups, topk):
    """Single-process float64 run on the full head (plain PyTorch, full logits)."""
    h, w, b = (x.detach().double().requires_grad_() for x in (hidden, weight, bias))
    z = h @ w.T + b
    valid = targets != -100
    lse = torch.logsumexp(z, -1)
    logsm = z - lse[:, None]
    p = logsm.exp()
    zero = torch.zeros((), dtype=z.dtype)
    safe = torch.where(valid, targets, 0)
    st = {
        "logps": torch.where(valid, logsm.gather(1, safe[:, None]).squeeze(1), zero),
        "entropy": torch.where(valid, -(p * logsm).sum(-1), zero),
        "lse": torch.where(valid, lse, zero),
        "log_sum_p2": torch.where(valid, torch.log((p * p).sum(-1)), zero),
    }
    sum((st[k] * ups[k]).sum() for k in OUTPUTS).backward()
    ce = torch.nn.functional.cross_entropy(z.detach(), targets, ignore_index=-100)
    tv, ti = logsm.detach().topk(topk, -1)
    ti, tv = torch.where(valid[:, None], ti, -1), torch.where(valid[:, None], tv, zero)
    return st, ce, (ti, tv), (h.grad, w.grad, b.grad)


def _worker(rank, world, port, n, hdim, vocabs, topk, queue):
    torch.set_num_threads(1)
    os.environ["ALIGNOPS_BACKEND"] = "torch"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    import alignops

    report = {"errors": defaultdict(float), "traffic": {}}
    for v in vocabs:
        g = torch.Generator().manual_seed(v)
        hidden = torch.randn(n, hdim, generator=g, dtype=torch.float64)
        weight = 0.5 * torch.randn(v, hdim, generator=g, dtype=torch.float64)
        bias = 0.5 * torch.randn(v, generator=g, dtype=torch.float64)
        targets = torch.randint(0, v, (n,), generator=g)
        targets[::7] = -100
        ups = {k: torch.randn(n, generator=g, dtype=torch.float64) for k in OUTPUTS}
        st, ce_ref, (ti, tv), grads_ref = _reference(hidden, weight, bias, targets, ups, topk)
        sizes = _sizes(v, world)
        start = sum(sizes[:rank])
        for dtype in (torch.float64, torch.float32):
            h = hidden.to(dtype, copy=True).requires_grad_()
            w = _cut(weight, sizes, rank).to(dtype).requires_grad_()
            b = _cut(bias, sizes, rank).to(dtype).requires_grad_()
            with _Counter() as fwd:
                out = alignops.linear_logprobs(
                    h, w, targets, bias=b, return_entropy=True, return_lse=True, return_log_sum_p2=True,
                    topk=topk, process_group=dist.group.WORLD,
                )  # fmt: skip
            with _Counter() as bwd:
                sum((getattr(out, k) * ups[k].to(out.logps.dtype)).sum() for k in OUTPUTS).backward()
            with _Counter() as ce_calls:
                ce = alignops.linear_cross_entropy(
                    h.detach(), w.detach(), targets, bias=b.detach(), process_group=dist.group.WORLD
                )
            err = report["errors"]
            key = str(dtype).replace("torch.", "")
            for k in OUTPUTS:
                err[(key, k)] = max(err[(key, k)], (getattr(out, k).double() - st[k]).abs().max().item())
            err[(key, "topk_logps")] = max(
                err[(key, "topk_logps")], (out.topk_logps.double() - tv).abs().max().item()
            )
            err[(key, "topk_ids mismatches")] += int((out.topk_ids != ti).sum())
            err[(key, "cross_entropy")] = max(err[(key, "cross_entropy")], abs(ce.item() - ce_ref.item()))
            dh, dw, db = grads_ref
            err[(key, "d hidden")] = max(err[(key, "d hidden")], (h.grad.double() - dh).abs().max().item())
            dws = dw[start : start + sizes[rank]]
            err[(key, "d weight shard")] = max(
                err[(key, "d weight shard")], (w.grad.double() - dws).abs().max().item()
            )
            dbs = db[start : start + sizes[rank]]
            err[(key, "d bias shard")] = max(
                err[(key, "d bias shard")], (b.grad.double() - dbs).abs().max().item()
            )
            if dtype == torch.float32:
                report["traffic"][v] = {
                    "forward": fwd.calls,
                    "backward": bwd.calls,
                    "cross_entropy": ce_calls.calls,
                    **_divergence_traffic(h.detach(), w.detach(), g),
                }
    queue.put((rank, report))
    dist.barrier()
    dist.destroy_process_group()


def _divergence_traffic(h, w, g) -> dict:
    """The collectives of ``linear_divergence`` with a group (student = this head, teacher = a
    perturbed copy): forward KL with the entropy (forward, backward) and jsd (two rounds)."""
    import alignops

    wq = w + 0.1 * torch.randn(w.shape, generator=g, dtype=w.dtype)
    out = {}
    for kind in ("forward_kl", "jsd"):
        hp, wp = h.clone().requires_grad_(), w.clone().requires_grad_()
        with _Counter() as fwd:
            o = alignops.linear_divergence(
                hp, wp, h, wq, kind=kind, return_entropy=True, reduction="sum", process_group=dist.group.WORLD
            )
        with _Counter() as bwd:
            (o.loss + o.entropy.sum()).backward()
        out[f"divergence {kind} + entropy forward"] = fwd.calls
        out[f"divergence {kind} + entropy backward"] = bwd.calls
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, n: int, hdim: int, vocabs: list[int], topk: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, n, hdim, vocabs, topk, queue)) for r in range(world)
    ]
    for p in procs:
        p.start()
    reports = dict(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a rank exited with code {p.exitcode}")
    errors: dict = defaultdict(float)
    for rep in reports.values():
        for k, e in rep["errors"].items():
            errors[k] = errors[k] + e if "mismatches" in k[1] else max(errors[k], e)
    return {"errors": errors, "traffic": reports[0]["traffic"]}


def _print(world: int, n: int, hdim: int, vocabs: list[int], res: dict) -> None:
    print(f"\n== {world} ranks (gloo, CPU), N = {n} tokens, H = {hdim}, V in {vocabs} ==")
    print("largest |error| against the single-process float64 run (over ranks and both V):")
    for dtype in ("float64", "float32"):
        row = ", ".join(f"{k} {e:.1e}" if "mismatch" not in k else f"{k} {int(e)}"
                        for (d, k), e in res["errors"].items() if d == dtype)  # fmt: skip
        print(f"  {dtype} inputs: {row}")
    print("collectives sent by rank 0 per call (float32 inputs); the first all_gather is the")
    print("input check (a fixed 16 int64 per rank, 26 for the divergences, not per token):")
    for v, phases in res["traffic"].items():
        for phase, calls in phases.items():
            print(f"  V={v:>6} {phase}:")
            for op, e, b in calls:
                print(
                    f"    {op:<18} {b:>8} B in all = {b / n:7.2f} B per token ({e / n:g} elements per token)"
                )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=301)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--vocab", type=int, nargs=2, default=[1009, 8191])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--topk", type=int, default=4)
    a = ap.parse_args(argv)
    for world in a.worlds:
        _print(world, a.tokens, a.hidden, a.vocab, run(world, a.tokens, a.hidden, a.vocab, a.topk))


if __name__ == "__main__":
    main()
