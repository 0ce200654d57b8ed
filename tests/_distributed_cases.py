"""Per-process bodies of ``tests/test_distributed.py`` (run by ``tests/_distributed.run``): every
rank builds the same full problem from a fixed seed, keeps its vocabulary slice, and checks the
vocabulary-parallel outputs and gradients against the float64 single-process computation."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _distributed import cut, even_sizes, full_stats_ref, linear_z_ref, max_err, padded_sizes

import alignops
from alignops.reference.logprobs import cross_entropy_ref, transform_ref

N_SHAPE, H, V = (2, 7), 24, 37  # V = 37: no world size divides it; N = 14 not a block multiple
STATS = ("logp", "entropy", "lse", "log_sum_p2")
OUT_NAMES = {"logp": "logps", "entropy": "entropy", "lse": "lse", "log_sum_p2": "log_sum_p2"}
TF = {"logit_scale": 1.3, "softcap": 9.0, "temperature": 0.8}


def problem(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*N_SHAPE, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (0.6 * torch.randn(V, H, generator=g, dtype=torch.float64)).to(dtype)
    bias = (0.5 * torch.randn(V, generator=g, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, V, N_SHAPE, generator=g)
    targets[0, 3] = targets[1, 6] = -100
    ups = {k: torch.randn(N_SHAPE, generator=g, dtype=torch.float64) for k in STATS}
    return hidden, weight, bias, targets, ups


def uneven_sizes(world: int) -> list[int]:
    """Arbitrary uneven slices (an empty one for 4 ranks)."""
    return {1: [V], 2: [30, 7], 4: [5, 20, 0, 12]}[world]


def _ref_linear(hidden, weight, bias, targets, ups, topk):
    h, w, b = (x.detach().double().requires_grad_() for x in (hidden, weight, bias))
    st = full_stats_ref(linear_z_ref(h, w, b, **TF), targets, -100, topk)
    sum(st[k].mul(ups[k]).sum() for k in STATS).backward()
    return st, h.grad, w.grad, b.grad


def check_linear(rank, world, sizes, vocab_size=None, *, dtype=torch.float64, targets=None, atol=1e-11):
    """``linear_logprobs`` with every differentiable output, bias, soft-cap, scale, temperature,
    top-k; values and gradients against the float64 run; returns the largest error."""
    hidden, weight, bias, t0, ups = problem(dtype)
    targets = t0 if targets is None else targets
    st, dh_ref, dw_ref, db_ref = _ref_linear(hidden, weight, bias, targets, ups, topk=5)
    h = hidden.clone().requires_grad_()
    w = cut(weight, sizes, rank).requires_grad_()
    b = cut(bias, sizes, rank).requires_grad_()
    out = alignops.linear_logprobs(
        h, w, targets, bias=b, return_entropy=True, return_lse=True, return_log_sum_p2=True, topk=5,
        process_group=dist.group.WORLD, vocab_size=vocab_size, **TF,
    )  # fmt: skip
    sum(getattr(out, OUT_NAMES[k]).mul(ups[k]).sum() for k in STATS).backward()
    errs = [max_err(getattr(out, OUT_NAMES[k]), st[k]) for k in STATS]
    assert torch.equal(out.topk_ids, st["topk_ids"]), (out.topk_ids, st["topk_ids"])
    errs.append(max_err(out.topk_logps, st["topk_logps"]))
    start, n = sum(sizes[:rank]), sizes[rank]
    real = max(0, min(n, V - start))
    errs += [max_err(h.grad, dh_ref), max_err(w.grad[:real], dw_ref[start : start + real])]
    errs.append(max_err(b.grad[:real], db_ref[start : start + real]))
    assert w.grad.dtype == w.dtype and h.grad.dtype == h.dtype
    assert torch.all(w.grad[real:] == 0) and torch.all(b.grad[real:] == 0), "padding rows got a gradient"
    assert max(errs) <= atol, f"rank {rank} sizes {sizes}: errors {errs}"
    # every rank holds bitwise the same outputs and hidden gradient
    for x in (out.logps, out.entropy, out.lse, out.log_sum_p2, out.topk_logps, h.grad):
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        assert all(torch.equal(p, parts[0]) for p in parts), "ranks disagree"
    return max(errs), (out, h.grad, w.grad, b.grad)


def check_linear_ce(rank, world, sizes, vocab_size=None):
    """``linear_cross_entropy`` with label smoothing (the global zmean) and z-loss."""
    hidden, weight, bias, targets, _ = problem()
    opts = {"label_smoothing": 0.15, "z_loss": 1e-2, **TF}
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = cross_entropy_ref(hr @ wr.T + bias, targets, **opts)
    ref.backward()
    h, w = hidden.clone().requires_grad_(), cut(weight, sizes, rank).requires_grad_()
    b = cut(bias, sizes, rank)
    loss = alignops.linear_cross_entropy(
        h, w, targets, bias=b, process_group=dist.group.WORLD, vocab_size=vocab_size, **opts
    )
    loss.backward()
    start, real = sum(sizes[:rank]), max(0, min(sizes[rank], V - sum(sizes[:rank])))
    errs = [
        max_err(loss, ref),
        max_err(h.grad, hr.grad),
        max_err(w.grad[:real], wr.grad[start : start + real]),
    ]
    assert max(errs) < 1e-11, f"rank {rank}: {errs}"
    return max(errs)


def check_logits(rank, world, sizes, vocab_size=None):
    """``logprobs`` and ``cross_entropy`` on this rank's logits slice ``[B, T, V_r]``."""
    _, _, _, targets, ups = problem()
    logits = 3.0 * torch.randn(*N_SHAPE, V, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = logits.clone().requires_grad_()
    st = full_stats_ref(transform_ref(x, **TF), targets, -100, topk=3)
    sum(st[k].mul(ups[k]).sum() for k in STATS).backward()
    xr = cut(logits, sizes, rank, dim=-1).requires_grad_()
    out = alignops.logprobs(
        xr, targets, return_entropy=True, return_lse=True, return_log_sum_p2=True, topk=3,
        process_group=dist.group.WORLD, vocab_size=vocab_size, **TF,
    )  # fmt: skip
    sum(getattr(out, OUT_NAMES[k]).mul(ups[k]).sum() for k in STATS).backward()
    start, real = sum(sizes[:rank]), max(0, min(sizes[rank], V - sum(sizes[:rank])))
    errs = [max_err(getattr(out, OUT_NAMES[k]), st[k]) for k in STATS]
    errs.append(max_err(xr.grad[..., :real], x.grad[..., start : start + real]))
    assert torch.equal(out.topk_ids, st["topk_ids"])
    assert torch.all(xr.grad[..., real:] == 0)
    # cross-entropy with label smoothing (global zmean) and z-loss, sum reduction
    opts = {"label_smoothing": 0.2, "z_loss": 1e-3, "reduction": "sum"}
    x2 = logits.clone().requires_grad_()
    ref = cross_entropy_ref(x2, targets, **opts)
    ref.backward()
    xr2 = cut(logits, sizes, rank, dim=-1).requires_grad_()
    loss = alignops.cross_entropy(xr2, targets, process_group=dist.group.WORLD, vocab_size=vocab_size, **opts)
    loss.backward()
    errs += [max_err(loss, ref), max_err(xr2.grad[..., :real], x2.grad[..., start : start + real])]
    assert max(errs) < 1e-11, f"rank {rank} sizes {sizes}: {errs}"
    return max(errs)


def check_dtensor(rank, world):
    """A DTensor weight and bias sharded ``Shard(0)`` (uneven: torch.chunk sizes), no group given."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    hidden, weight, bias, targets, ups = problem()
    mesh = init_device_mesh("cpu", (world,))
    st, dh_ref, dw_ref, db_ref = _ref_linear(hidden, weight, bias, targets, ups, topk=0)
    w = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
    b = distribute_tensor(bias, mesh, [Shard(0)]).requires_grad_()
    h = hidden.clone().requires_grad_()
    out = alignops.linear_logprobs(
        h, w, targets, bias=b, return_entropy=True, return_lse=True, return_log_sum_p2=True, **TF
    )
    sum(getattr(out, OUT_NAMES[k]).mul(ups[k]).sum() for k in STATS).backward()
    sizes = even_sizes(V, world)
    start, n = sum(sizes[:rank]), sizes[rank]
    errs = [max_err(getattr(out, OUT_NAMES[k]), st[k]) for k in STATS]
    errs += [max_err(h.grad, dh_ref), max_err(w.grad.to_local(), dw_ref[start : start + n])]
    errs.append(max_err(b.grad.to_local(), db_ref[start : start + n]))
    assert max(errs) < 1e-11, errs
    # logits sharded on the vocabulary dimension
    logits = 2.0 * torch.randn(*N_SHAPE, V, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    x = logits.clone().requires_grad_()
    ref = cross_entropy_ref(x, targets, label_smoothing=0.1)
    ref.backward()
    xd = distribute_tensor(logits, mesh, [Shard(2)]).requires_grad_()
    loss = alignops.cross_entropy(xd, targets, label_smoothing=0.1)
    loss.backward()
    assert max_err(loss, ref) < 1e-12 and max_err(xd.grad.to_local(), x.grad[..., start : start + n]) < 1e-12
    with pytest.raises(ValueError, match="must be sharded over the vocabulary"):
        alignops.cross_entropy(distribute_tensor(logits, mesh, [Shard(0)]), targets)
    # a process group that is not the mesh's: the same clear error on every rank
    solo = dist.new_group([0])
    with pytest.raises(ValueError, match="not the group of weight's device mesh"):
        alignops.linear_logprobs(h, w, targets, process_group=solo)
    if rank != 0:  # a group this process is not in
        with pytest.raises(ValueError, match="not a member"):
            alignops.linear_logprobs(h, cut(weight, sizes, rank), targets, process_group=solo)


def check_partial_hidden_grad(rank, world):
    """``reduce_hidden_grad=False``: each rank's partial ``dh``; their sum is the full gradient."""
    hidden, weight, bias, targets, ups = problem()
    sizes = even_sizes(V, world)
    _, dh_ref, _, _ = _ref_linear(hidden, weight, bias, targets, ups, topk=0)
    h = hidden.clone().requires_grad_()
    out = alignops.linear_logprobs(
        h, cut(weight, sizes, rank), targets, bias=cut(bias, sizes, rank), return_entropy=True,
        process_group=dist.group.WORLD, reduce_hidden_grad=False, **TF,
    )  # fmt: skip
    (out.logps * ups["logp"] + out.entropy * ups["entropy"]).sum().backward()
    x = h.grad.clone()
    dist.all_reduce(x)
    hf = hidden.clone().requires_grad_()
    stf = full_stats_ref(linear_z_ref(hf, weight, bias, **TF), targets, -100)
    (stf["logp"] * ups["logp"] + stf["entropy"] * ups["entropy"]).sum().backward()
    assert max_err(x, hf.grad) < 1e-11
    if world > 1:
        assert max_err(h.grad, hf.grad) > 1e-6, "the partial gradient was reduced anyway"


def check_fused_grpo(rank, world):
    """``grpo_loss_from_hidden`` on a vocabulary-parallel head: the loss of ``grpo_loss`` on the
    float64 log-probs / entropy of the full head, with its gradients."""
    from alignops.losses import grpo_loss

    hidden, weight, bias, ids, _ = problem()
    g = torch.Generator().manual_seed(11)
    mask = torch.rand(N_SHAPE, generator=g) < 0.8
    old = -3.0 * torch.rand(N_SHAPE, generator=g, dtype=torch.float64)
    adv = torch.randn(N_SHAPE[0], generator=g, dtype=torch.float64)
    opts = {"loss_type": "dapo", "entropy_coef": 0.01, "beta": 0.0}
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    st = full_stats_ref(linear_z_ref(hr, wr, bias, temperature=0.7), ids, -100)
    scored = mask & (ids != -100)
    ref = grpo_loss(st["logp"], old, adv, scored, entropy=st["entropy"], **opts).loss
    ref.backward()
    sizes = padded_sizes(V, world, 8)
    h, w = hidden.clone().requires_grad_(), cut(weight, sizes, rank).requires_grad_()
    out = alignops.grpo_loss_from_hidden(
        h, w, ids, mask, old, adv, bias=cut(bias, sizes, rank), temperature=0.7,
        process_group=dist.group.WORLD, vocab_size=V, **opts,
    )  # fmt: skip
    out.loss.backward()
    start, real = sum(sizes[:rank]), max(0, min(sizes[rank], V - sum(sizes[:rank])))
    errs = [
        max_err(out.loss, ref),
        max_err(h.grad, hr.grad),
        max_err(w.grad[:real], wr.grad[start : start + real]),
    ]
    assert max(errs) < 1e-12, errs


def check_tensor_and_data_parallel(rank, world):
    """4 ranks as 2 data-parallel x 2 vocabulary-parallel groups (subgroups, not the world): the
    token-mean cross-entropy with ``num_items`` counted over the data-parallel group; the shares
    add up to the single-process loss, the weight gradients (summed over data-parallel ranks)
    to its gradient."""
    from alignops.distributed import global_count, global_loss

    assert world == 4
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    tp, dp = tp_groups[rank // 2], dp_groups[rank % 2]
    tp_rank, dp_rank = rank % 2, rank // 2
    hidden, weight, bias, targets, _ = problem()
    opts = {"label_smoothing": 0.1, **TF}
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = cross_entropy_ref(hr @ wr.T + bias, targets, **opts)
    ref.backward()
    sizes = uneven_sizes(2)
    t = targets[0:1, :5] if dp_rank == 0 else torch.cat([targets[0:1, 5:], targets[1:]], 1)
    hid = hidden[0:1, :5] if dp_rank == 0 else torch.cat([hidden[0:1, 5:], hidden[1:]], 1)
    h, w = hid.clone().requires_grad_(), cut(weight, sizes, tp_rank).requires_grad_()
    n = global_count(t != -100, dp)
    loss = alignops.linear_cross_entropy(
        h, w, t, bias=cut(bias, sizes, tp_rank), num_items=n, process_group=tp, **opts
    )
    loss.backward()
    dw = w.grad.clone()
    dist.all_reduce(dw, group=dp)
    dh_ref = hr.grad[0:1, :5] if dp_rank == 0 else torch.cat([hr.grad[0:1, 5:], hr.grad[1:]], 1)
    start = sum(sizes[:tp_rank])
    errs = [max_err(global_loss(loss, dp), ref), max_err(dw, wr.grad[start : start + sizes[tp_rank]])]
    errs.append(max_err(h.grad, dh_ref))
    assert max(errs) < 1e-12, errs


def check_mixed_and_empty(rank, world):
    """bf16 ``hidden`` with an fp32 weight slice (operands rounded to bf16, as on one process),
    int32 targets, and zero tokens."""
    hidden, weight, _, targets, ups = problem()
    sizes = uneven_sizes(world)
    hb = hidden.to(torch.bfloat16).requires_grad_()
    w = cut(weight.float(), sizes, rank).requires_grad_()
    out = alignops.linear_logprobs(hb, w, targets.int(), return_entropy=True, process_group=dist.group.WORLD)
    (out.logps * ups["logp"] + out.entropy * ups["entropy"]).sum().backward()
    h64 = hb.detach().double().requires_grad_()
    w64 = weight.to(torch.bfloat16).double().requires_grad_()  # the operands rounded to bf16
    st = full_stats_ref(h64 @ w64.T, targets, -100)
    (st["logp"] * ups["logp"] + st["entropy"] * ups["entropy"]).sum().backward()
    start, n = sum(sizes[:rank]), sizes[rank]
    errs = [max_err(out.logps, st["logp"]), max_err(out.entropy, st["entropy"])]
    errs.append(max_err(w.grad, w64.grad[start : start + n]))
    # the bf16 gradient: within bf16 rounding (eps 2**-7 relative to its largest entry)
    assert max_err(hb.grad, h64.grad) <= 2**-7 * h64.grad.abs().max().item()
    assert (
        out.logps.dtype == torch.float32 and hb.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    )
    assert max(errs) < 1e-4, errs
    h0 = torch.zeros(0, H, dtype=torch.float64, requires_grad=True)
    out = alignops.linear_logprobs(
        h0, w.detach().double(), torch.zeros(0, dtype=torch.long), return_entropy=True, topk=2,
        process_group=dist.group.WORLD,
    )  # fmt: skip
    assert out.logps.shape == (0,) and out.topk_ids.shape == (0, 2)
    (out.logps.sum() + out.entropy.sum()).backward()
    assert h0.grad.shape == (0, H)


def check_errors(rank, world):
    """Mismatched slices / inputs: the same kind of error on every rank, no hang; the group still
    works afterwards."""
    hidden, weight, bias, targets, _ = problem()
    sizes = even_sizes(V, world)
    w = cut(weight, sizes, rank)
    grp = dist.group.WORLD
    # one rank's weight has another hidden size
    w_bad = torch.randn(w.shape[0], H + 1, dtype=w.dtype) if rank == world - 1 else w
    msg = "hidden size mismatch" if rank == world - 1 else rf"rank\(s\) \[{world - 1}\]"
    with pytest.raises(ValueError, match=msg):
        alignops.linear_logprobs(hidden, w_bad, targets, process_group=grp)
    # one rank's targets differ
    t_bad = targets.clone()
    if rank == 0:
        t_bad[1, 1] = (t_bad[1, 1] + 1) % V
    with pytest.raises(ValueError, match="disagree on targets"):
        alignops.linear_logprobs(hidden, w, t_bad, process_group=grp)
    # one rank's hidden state has another number of tokens
    h_bad = hidden[:1] if rank == 0 else hidden
    with pytest.raises(ValueError):
        alignops.linear_logprobs(h_bad, w, targets[: h_bad.shape[0]], process_group=grp)
    # one rank's weight slice in another dtype
    with pytest.raises(ValueError, match="disagree on dtypes"):
        alignops.linear_logprobs(
            hidden.float(), w.float() if rank else w.bfloat16(), targets, process_group=grp
        )
    # bias on one rank only
    with pytest.raises(ValueError, match="disagree on bias"):
        alignops.linear_logprobs(
            hidden, w, targets, bias=cut(bias, sizes, rank) if rank == 0 else None, process_group=grp
        )
    # vocab_size larger than the slices hold; a target in the padding
    with pytest.raises(ValueError, match="vocab_size"):
        alignops.linear_logprobs(hidden, w, targets, process_group=grp, vocab_size=V + 1)
    with pytest.raises(ValueError, match="targets must be in"):
        alignops.linear_logprobs(hidden, w, targets.clamp(max=V - 3), process_group=grp, vocab_size=V - 3)
    # mismatched logits slices: another token count on one rank
    logits = torch.randn(*N_SHAPE, sizes[rank] + (1 if rank == 0 else 0), dtype=torch.float64)
    out = alignops.cross_entropy(logits, targets.clamp(max=sum(sizes) - 1), process_group=grp)
    assert torch.isfinite(out)
    with pytest.raises(ValueError):
        alignops.cross_entropy(
            logits[:1] if rank == 1 else logits, targets[:1] if rank == 1 else targets, process_group=grp
        )
    # the group is still usable
    check_linear(rank, world, sizes)


def tp_cases(rank: int, world: int) -> None:
    """Every vocabulary-parallel check for one world size."""
    hidden, weight, bias, targets, _ = problem()
    layouts = [(even_sizes(V, world), None), (padded_sizes(V, world, 8), V), (uneven_sizes(world), None)]
    for sizes, vs in layouts:
        check_linear(rank, world, sizes, vs)
        check_linear_ce(rank, world, sizes, vs)
        check_logits(rank, world, sizes, vs)
    sizes = uneven_sizes(world)
    # all targets on one rank (the last non-empty one), and all on rank 0
    last = max(r for r in range(world) if sizes[r] > 0)
    lo = sum(sizes[:last])
    on_last = torch.where(targets == -100, targets, lo + targets % sizes[last])
    check_linear(rank, world, sizes, targets=on_last)
    check_linear(rank, world, sizes, targets=torch.where(targets == -100, targets, targets % sizes[0]))
    # every token ignored: zeros, zero gradients
    check_linear(rank, world, sizes, targets=torch.full(N_SHAPE, -100))
    # float32 inputs against the float64 truth
    check_linear(rank, world, even_sizes(V, world), dtype=torch.float32, atol=2e-4)
    # bitwise-identical reruns
    _, a = check_linear(rank, world, padded_sizes(V, world, 8), V)
    _, b = check_linear(rank, world, padded_sizes(V, world, 8), V)
    for x, y in zip(a[1:] + tuple(a[0]), b[1:] + tuple(b[0])):
        assert (x is None and y is None) or torch.equal(x, y), "a rerun differs"
    check_dtensor(rank, world)
    check_partial_hidden_grad(rank, world)
    check_mixed_and_empty(rank, world)
    check_fused_grpo(rank, world)
    if world == 4:
        check_tensor_and_data_parallel(rank, world)
    check_errors(rank, world)


def triton_cases(rank: int, world: int) -> None:
    """The vocabulary-parallel path on the Triton engine (run under ``TRITON_INTERPRET=1`` by
    ``tests/interpreted/vocab_parallel.py``): float32, even and uneven (one empty) slices."""
    import os
    import sys

    from alignops._dispatch import use_triton

    os.environ["ALIGNOPS_BACKEND"] = "triton"
    assert os.environ.get("TRITON_INTERPRET") == "1" and use_triton(torch.zeros(1))
    for sizes, vs in ((padded_sizes(V, world, 8), V), (uneven_sizes(world), None)):
        check_linear(rank, world, sizes, vs, dtype=torch.float32, atol=2e-4)
    assert "alignops.kernels.linear_logprobs" in sys.modules, "the Triton engine did not run"
