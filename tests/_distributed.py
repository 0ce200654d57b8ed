"""Multi-process harness for the ``torch.distributed`` tests: ``run(world, fn, *args)`` spawns
``world`` CPU processes joined in a gloo group (a free TCP port, a short collective timeout so a
hang fails the test instead of blocking it) and calls ``fn(rank, world, *args)`` in each; an
exception in any process fails the test with its traceback.

Also the float64 single-process ground truth of the full-vocabulary statistics, written from
the math on the full ``[N, V]`` logits, and helpers to cut a full head into rank slices.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from multiprocessing import forkserver

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alignops.reference.logprobs import transform_ref

#: A collective that waits longer than this raises instead of hanging the suite.
TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)
    os.environ["ALIGNOPS_BACKEND"] = "torch"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=TIMEOUT_S),
    )
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(world: int, fn, *args) -> None:
    """``fn(rank, world, *args)`` in ``world`` gloo processes; raises if any of them fails.

    The processes are forked from a fork server that has imported torch and run each alignops
    op once (``_distributed_warm``), so they start in a fraction of a second instead of paying
    the imports (and PyTorch's lazy imports on the first custom-op call) once per process."""
    here = os.path.dirname(os.path.abspath(__file__))
    # the fork server (Python 3.11) ignores the parent's sys.path: give it this folder while it
    # starts (once per pytest run), then restore the environment of the other tests
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = here + (os.pathsep + path if path else "")
    try:
        mp.set_forkserver_preload(["_distributed_warm"])
        forkserver.ensure_running()
    finally:
        if path is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = path
    mp.start_processes(
        _entry, args=(world, _free_port(), fn, args), nprocs=world, join=True, start_method="forkserver"
    )


# ----------------------------------------------------------------------------------------------
# slices of a head
# ----------------------------------------------------------------------------------------------


def even_sizes(v: int, world: int) -> list[int]:
    """``torch.chunk`` / DTensor ``Shard(0)`` slice sizes: ``ceil(V / P)`` each, the rest last."""
    step = -(-v // world)
    return [max(0, min(step, v - r * step)) for r in range(world)]


def padded_sizes(v: int, world: int, multiple: int) -> list[int]:
    """Megatron-style: the vocabulary padded up to a multiple of ``multiple * P``, equal slices."""
    vp = -(-v // (multiple * world)) * multiple * world
    return [vp // world] * world


def cut(x: torch.Tensor | None, sizes: list[int], rank: int, dim: int = 0) -> torch.Tensor | None:
    """Rank ``rank``'s slice of ``x`` (rows beyond ``x``'s size, i.e. padding, get random values:
    a correct implementation never reads them into the result)."""
    if x is None:
        return None
    start, n = sum(sizes[:rank]), sizes[rank]
    part = x.narrow(dim, min(start, x.shape[dim]), max(0, min(n, x.shape[dim] - start)))
    pad = n - part.shape[dim]
    if pad > 0:
        shape = list(x.shape)
        shape[dim] = pad
        part = torch.cat(
            [part, 1e3 * torch.randn(shape, dtype=x.dtype, generator=torch.Generator().manual_seed(rank))],
            dim,
        )
    return part.clone()


# ----------------------------------------------------------------------------------------------
# float64 ground truth
# ----------------------------------------------------------------------------------------------


def full_stats_ref(z: torch.Tensor, targets: torch.Tensor, ignore_index: int, topk: int = 0) -> dict:
    """Per-token statistics of the full logits ``z [..., V]`` (differentiable), 0 where ignored:
    ``logp``, ``lse``, ``entropy``, ``zmean``, ``log_sum_p2``, and ``topk_ids`` / ``topk_logps``."""
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    lse = torch.logsumexp(z, -1)
    logsm = z - lse.unsqueeze(-1)
    p = logsm.exp()
    zero = torch.zeros((), dtype=z.dtype)

    def m(x):
        return torch.where(valid, x, zero)

    out = {
        "logp": m(logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)),
        "lse": m(lse),
        "entropy": m(-(p * logsm).sum(-1)),
        "zmean": m(z.mean(-1)),
        "log_sum_p2": m(torch.log((p * p).sum(-1))),
    }
    if topk:
        v, i = logsm.detach().topk(topk, dim=-1)
        out["topk_ids"] = torch.where(valid.unsqueeze(-1), i, -1)
        out["topk_logps"] = torch.where(valid.unsqueeze(-1), v, zero)
    return out


def linear_z_ref(hidden, weight, bias, *, logit_scale=1.0, softcap=None, temperature=1.0):
    """Full transformed logits of a linear head in float64."""
    r = hidden.double() @ weight.double().T
    if bias is not None:
        r = r + bias.double()
    return transform_ref(r, logit_scale=logit_scale, softcap=softcap, temperature=temperature)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.0 if a.numel() == 0 else (a.double() - b.double()).abs().max().item()
