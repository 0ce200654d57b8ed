"""The bindings under ``torch.compile(fullgraph=True)``, ``torch.autocast`` and FSDP2.

* a training step (decoder + alignops' head + loss) of a tiny Llama compiles without a graph
  break and equals the eager step (which the binding tests compare with float64);
* TRL's head replacement compiles the same way;
* FSDP2 (``fully_shard``, the LM head a DTensor parameter) with 2 gloo processes on the CPU gives
  the single-process loss and gradients.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

transformers = pytest.importorskip("transformers")

from alignops.bench.trl_trainers import tiny_llama  # noqa: E402
from alignops.bindings.transformers import causal_lm_logprobs  # noqa: E402

from tests._assert import assert_close  # noqa: E402


def _inputs(vocab, b=3, t=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return ids, mask


def _step(model, ids, mask):
    out = causal_lm_logprobs(model, ids, mask, return_entropy=True, temperature=0.9)
    return -(out.logps.sum() / out.mask.sum()) - 0.01 * out.entropy.sum()


def test_compiled_training_step_fullgraph():
    model = tiny_llama(211, seed=0)
    ids, mask = _inputs(211)
    compiled = torch.compile(lambda i, m: _step(model, i, m), backend="aot_eager", fullgraph=True)
    loss_c = compiled(ids, mask)
    params = list(model.parameters())
    grads_c = torch.autograd.grad(loss_c, params)
    loss_e = _step(model, ids, mask)
    grads_e = torch.autograd.grad(loss_e, params)
    assert_close("loss", loss_e.detach(), loss_c.detach(), atol=1e-6, rtol=1e-6)
    for (name, _), a, c in zip(model.named_parameters(), grads_e, grads_c):
        assert_close(name, a, c, atol=1e-6, rtol=1e-5)


def test_trl_head_compiles_fullgraph():
    pytest.importorskip("trl")
    from alignops.bindings.trl import OUTPUTS, fused_head

    def head_step(h, w, y):
        lp, ent, lsp2, mean, top1 = fused_head(h, w, None, y, 0.8, None, 3.0, 0.5, OUTPUTS)
        return lp.sum() + 0.1 * ent.sum() + 0 * (lsp2.sum() + mean.sum() + top1.sum())

    g = torch.Generator().manual_seed(1)
    h = torch.randn(29, 8, generator=g, requires_grad=True)
    w = torch.randn(97, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 97, (29,), generator=g)
    out_c = torch.compile(head_step, backend="aot_eager", fullgraph=True)(h, w, y)
    g_c = torch.autograd.grad(out_c, (h, w))
    out_e = head_step(h, w, y)
    g_e = torch.autograd.grad(out_e, (h, w))
    assert_close("loss", out_e.detach(), out_c.detach(), atol=1e-5, rtol=1e-6)
    for name, a, c in zip(("dhidden", "dweight"), g_e, g_c):
        assert_close(name, a, c, atol=1e-6, rtol=1e-5)


def test_autocast_step_gradients_in_master_dtype():
    """Under bf16 autocast the fp32 master weights get fp32 gradients that agree with the same
    step in fp32 to bf16 accuracy."""
    model = tiny_llama(211, seed=0)
    ids, mask = _inputs(211)
    params = list(model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_a = _step(model, ids, mask)
    grads_a = torch.autograd.grad(loss_a, params)
    loss_f = _step(model, ids, mask)
    grads_f = torch.autograd.grad(loss_f, params)
    assert_close("loss", loss_f.detach(), loss_a.detach().float(), atol=2e-2, rtol=1e-2)
    head_grad = grads_a[-1]
    assert head_grad.dtype == torch.float32 and model.lm_head.weight is params[-1]
    rel = (head_grad - grads_f[-1]).norm() / grads_f[-1].norm()
    assert rel < 5e-2, f"lm_head grad rel err {rel:.3e}"


# ----------------------------------------------------------------------------------------------
# FSDP2 with 2 gloo processes
# ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = tiny_llama(211, seed=0)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert isinstance(model.lm_head.weight, DTensor)
        ids, mask = _inputs(211, b=4)
        mine = slice(rank * 2, rank * 2 + 2)  # each rank its half of the batch
        out = causal_lm_logprobs(model, ids[mine], mask[mine], return_entropy=True)
        # a global mean over both ranks' tokens: gradients are summed by FSDP's reduce-scatter
        count = torch.tensor(float(out.mask.sum()))
        dist.all_reduce(count)
        loss = -(out.logps.sum() / count) * world - 0.01 * out.entropy.sum() * world
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        total = loss.detach() / world
        dist.all_reduce(total)
        # outside the model's call the head is a sharded DTensor: TRL's head gathers it itself
        from alignops.bindings.trl import fused_head

        w = model.lm_head.weight
        assert isinstance(w, DTensor)
        h, y = torch.randn(9, 32, generator=torch.Generator().manual_seed(5)), torch.arange(9) * 7
        lp_dt = fused_head(h, w, None, y, 1.0, None, None, 1.0, ("log_probs",))[0]
        if rank == 0:
            out = {"loss": total, "grads": grads, "h": h, "y": y, "lp_dtensor": lp_dt.detach()}
            torch.save(out, os.path.join(out_dir, "fsdp.pt"))
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_gloo_processes_equal_single_process(tmp_path):
    import torch.multiprocessing as mp

    # the single-process run first: it also imports the model code the forked workers inherit
    model = tiny_llama(211, seed=0)
    ids, mask = _inputs(211, b=4)
    out = causal_lm_logprobs(model, ids, mask, return_entropy=True)
    loss = -(out.logps.sum() / out.mask.sum()) - 0.01 * out.entropy.sum()
    loss.backward()
    # fork: the workers inherit the imported modules (a fresh interpreter would re-import torch and
    # transformers, most of this test's time)
    mp.start_processes(
        _fsdp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    got = torch.load(tmp_path / "fsdp.pt")
    assert_close("loss", loss.detach(), got["loss"], atol=1e-6, rtol=1e-6)
    for name, p in model.named_parameters():
        assert_close(name, p.grad, got["grads"][name], atol=1e-6, rtol=1e-5)
    z = got["h"].double() @ model.lm_head.weight.detach().double().T
    want = torch.log_softmax(z, -1).gather(-1, got["y"][:, None])[:, 0]
    assert_close("DTensor head", want, got["lp_dtensor"], atol=1e-5, rtol=1e-5)
