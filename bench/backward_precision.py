"""fp16 gradients of a mean-reduced loss: dh / dW relative error against float64, Triton kernels
with the fp32 workspace of fp16 inputs ("after") and with an fp16 workspace ("before"), and the
torch engine. Runs on the CPU under the interpreter (or on a GPU)::

    TRITON_INTERPRET=1 python -m alignops.bench.backward_precision [N H V]

Inputs: hidden ~ N(0, 1), weight ~ N(0, 1 / H) (logits of std ~1: a flat softmax, p ~ 1 / V,
the smallest raw-logit gradients), a quarter of the rows ignored, upstream gradient of the
log-probs ``-1 / (valid tokens)`` (``reduction="mean"``); the defaults are N=1024, H=16, V=8192.
"""

from __future__ import annotations

import sys
import time
from unittest import mock

import torch
from alignops.kernels._common import NOTHING_EXTRA, LogitOptions, TokenStats

from alignops._torch import linear_logprobs as E

OPTS = LogitOptions(-100, 1.0, None, 1.0)


def inputs(n: int, h: int, v: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).half()
    weight = (torch.randn(v, h, generator=g) / h**0.5).half()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.randperm(n, generator=g)[: n // 4]] = OPTS.ignore_index
    valid = targets != OPTS.ignore_index
    return hidden, weight, targets, torch.where(valid, -1.0 / valid.sum(), 0.0).float()


def reference(hidden, weight, targets, g):
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    z = h @ w.T
    logp = torch.log_softmax(z, -1).gather(1, targets.clamp(min=0)[:, None])[:, 0]
    (torch.where(targets != OPTS.ignore_index, logp, 0.0) * g.double()).sum().backward()
    return h.grad, w.grad


def grads(engine, hidden, weight, targets, g):
    st = engine.linear_logprobs_fwd(hidden, weight, targets, None, OPTS, NOTHING_EXTRA)
    saved = TokenStats(st.logp, st.lse, None, None, None, None, None)
    up = TokenStats(g, None, None, None, None, None, None)
    dh, dw, _ = engine.linear_logprobs_bwd(
        hidden, weight, targets, None, saved, up, OPTS, need_dhidden=True, need_dweight=True, need_dbias=False
    )
    return dh, dw


def rel(ref, out) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def main(argv: list[str]) -> int:
    n, h, v = (int(x) for x in argv[:3]) if len(argv) >= 3 else (1024, 16, 8192)
    hidden, weight, targets, g = inputs(n, h, v)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref_dh, ref_dw = reference(hidden, weight, targets, g)
    args = [x.to(device) for x in (hidden, weight, targets, g)]
    rows = [("torch engine (fp32 dr)", E, None)]
    try:
        from alignops.kernels import linear_logprobs as K

        rows += [("triton, fp32 workspace (now)", K, None), ("triton, fp16 workspace (before)", K, "fp16")]
    except Exception as e:  # no Triton backend here
        print(f"triton kernels unavailable: {e}")
    print(f"fp16, mean reduction, N={n} H={h} V={v}, device {device}")
    print(f"{'path':34s} {'dh rel err':>11s} {'dW rel err':>11s} {'dr subnorm':>11s} {'s':>6s}")
    flushed = (torch.softmax(hidden.double() @ weight.double().T, -1) * g.abs().double()[:, None]) < 2**-14
    flushed = flushed[targets != OPTS.ignore_index].double().mean().item()
    for name, engine, ws in rows:
        patch = mock.patch.object(engine, "workspace_dtype", lambda dot: dot) if ws else mock.MagicMock()
        with patch:
            t0 = time.perf_counter()
            dh, dw = grads(engine, *args)
            dt = time.perf_counter() - t0
        e_dh, e_dw = rel(ref_dh, dh.cpu()), rel(ref_dw, dw.cpu())
        print(f"{name:34s} {e_dh:11.2e} {e_dw:11.2e} {flushed:11.1%} {dt:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
