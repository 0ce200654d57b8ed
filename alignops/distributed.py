"""Data / sequence parallelism: normalisers that span ranks.

When the batch is split over the ranks of a process group, a loss whose normaliser counts the
whole batch (token-mean cross-entropy, GRPO's ``num_items`` / ``num_sequences``, DAPO's token
count, KTO's batch KL reference point, BCO's running reward mean) needs that count or mean over
every rank, not the local one. The helpers here compute them with one all-reduce of one or two
numbers (detached: a normaliser is a constant), to pass as the losses' ``num_items=`` /
``num_sequences=`` / ``kl=``; ``kto_loss`` / ``bco_loss`` / :class:`RewardRunningMean` take a
``process_group=`` directly.

The convention is the one of ``num_items`` (gradient accumulation): each rank's loss is its
*share*, ``sum_local / N_global``, so the shares of all ranks add up to the single-process loss of
the whole batch, and so do their gradients. A data-parallel wrapper that *averages* gradients
over ranks (``DistributedDataParallel``, FSDP) then needs the loss multiplied by the world size,
as transformers' ``Trainer`` does for ``num_items_in_batch``; one that sums them needs nothing.
:func:`global_loss` gives the full-batch value for logging.

Vocabulary (tensor) parallelism of the LM head is the ``process_group=`` option of
:func:`alignops.linear_logprobs` and friends (docs/distributed.md).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["global_count", "global_loss", "global_mean", "global_sum"]


def _group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("the alignops.distributed helpers need torch.distributed to be initialised")
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group returns to non-members
        raise ValueError("this process is not a member of process_group")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    return dist.group.WORLD if group is None else group


def _device(group) -> torch.device:
    """Where a collective of ``group`` wants a tensor that has no device of its own."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_sum(x: torch.Tensor | float | int, process_group=None) -> torch.Tensor:
    """``sum`` of ``x`` (a tensor, summed over all its elements, or a number) over the ranks of
    ``process_group`` (default: the world), detached, float64 (exact for counts below 2**53), on
    ``x``'s device. One all-reduce of one float."""
    g = _group(process_group)
    if isinstance(x, torch.Tensor):
        t = x.detach().double().sum().reshape(1)
    else:
        t = torch.tensor([float(x)], dtype=torch.float64, device=_device(g))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=g)
    return t.reshape(())


def global_count(mask: torch.Tensor | int, process_group=None) -> torch.Tensor:
    """The number of ``True`` / non-zero entries of ``mask`` over every rank (or the sum of an int
    count), as a 0-d int64 tensor (dividing a float32 loss by it keeps float32): the
    ``num_items`` of a token-mean loss (``targets != ignore_index``, a completion mask) or the
    ``num_sequences`` of a sequence mean (``torch.ones(B)``, or ``mask.any(-1)``). Clamped to >= 1,
    so an all-masked batch gives a finite 0 loss. One all-reduce of one int64."""
    g = _group(process_group)
    if isinstance(mask, torch.Tensor):
        t = (mask != 0).sum().reshape(1).to(torch.int64)
    elif isinstance(mask, bool) or not isinstance(mask, int):
        raise TypeError(f"global_count takes a mask tensor or an int, got {type(mask).__name__}")
    else:
        t = torch.tensor([mask], dtype=torch.int64, device=_device(g))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=g)
    return t.reshape(()).clamp(min=1)


def global_mean(x: torch.Tensor, process_group=None) -> torch.Tensor:
    """The mean of every element of ``x`` over every rank (ranks may hold different numbers of
    elements, or none), detached, float64: e.g. KTO's batch KL ``kl=global_mean(policy_kl_logps -
    ref_kl_logps)`` (TRL all-gathers the same quantity). One all-reduce of two floats. Raises when
    no rank holds an element."""
    g = _group(process_group)
    n = torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)
    t = torch.stack([x.detach().double().sum(), n])
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=g)
    if t[1] == 0:
        raise ValueError("global_mean of tensors that are empty on every rank")
    return t[0] / t[1]


def global_loss(share: torch.Tensor, process_group=None) -> torch.Tensor:
    """The full-batch loss from every rank's ``share`` (the sum of the shares), detached: the value
    to log; backpropagate the share."""
    return global_sum(share, process_group).to(share.dtype)
