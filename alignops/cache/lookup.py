"""Training-time use of a reference cache: batch lookups and a data collator.

Both take the batch's own token ids (so the key is computed from exactly what the policy sees)
and return tensors on the batch's device, named as the alignops losses name them::

    cache = ReferenceCache("ref-cache", model="ref-model")     # refuses any mismatch
    refs = reference_logps(cache, batch, kind="preference")   # {"ref_chosen_logps", "ref_rejected_logps"}
    out = alignops.losses.dpo_loss(policy_chosen, policy_rejected, **refs, beta=0.1)

or in a ``DataLoader``: ``collate_fn=ReferenceCollator(cache, kind="preference")``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .data import KINDS
from .store import ReferenceCache, id_lists, unpad

_COLUMNS = {
    "preference": ("chosen_input_ids", "rejected_input_ids"),
    "binary": ("completion_input_ids",),
    "completion": ("completion_input_ids",),
    "listwise": ("completions_input_ids",),
}


def _ids(batch: dict, name: str) -> list[list[int]]:
    if name not in batch:
        raise KeyError(f"the batch has no {name!r} (columns: {sorted(batch)})")
    x = batch[name]
    mask_name = name.replace("input_ids", "attention_mask")
    if isinstance(x, torch.Tensor) and x.dim() == 2:
        if mask_name not in batch:
            raise KeyError(f"a padded {name!r} tensor needs its {mask_name!r} to remove the padding")
        return unpad(x, batch[mask_name])
    return id_lists(x)


def reference_logps(
    cache: ReferenceCache,
    batch: dict,
    *,
    kind: str = "preference",
    example_ids=None,
    per_token: bool = False,
    ld_alpha: float | None = None,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """The cached reference values of a batch of tokenized rows.

    ``batch`` holds ``prompt_input_ids`` and the completion columns of ``kind`` (preference:
    ``chosen_input_ids`` / ``rejected_input_ids``; binary and completion: ``completion_input_ids``
    (+ ``label`` for binary); listwise: ``completions_input_ids``, a list of ``K`` per row), each
    either a list of id lists or a padded ``[B, T]`` tensor with its ``*_attention_mask``.

    Returns, on ``device`` (default: the device of the batch's first tensor, else CPU):
      preference: ``ref_chosen_logps [B]``, ``ref_rejected_logps [B]``
      binary:     ``ref_logps [B]``, and ``ref_chosen_logps`` / ``ref_rejected_logps`` (the rows
                  labelled True / False, in order, as :func:`alignops.losses.kto_loss` takes them)
      completion: ``ref_logps [B]``;   listwise: ``ref_logps [B, K]``
    and with ``per_token`` the per-token values ``<name>_token_logps [B, C]`` with their
    ``<name>_token_mask``. With ``ld_alpha`` (preference, a cache with per-token values) the
    two references are LD-DPO's length-desensitised sums (:func:`alignops.sequence.ld_dpo_logps`,
    Liu et al. 2024, arXiv:2409.06411), exactly as the policy's must then be computed.
    Missing sequences raise :class:`CacheKeyError`.
    """
    if ld_alpha is not None and kind != "preference":
        raise ValueError("ld_alpha applies to preference pairs only")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if device is None:
        device = next((v.device for v in batch.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    prompts = _ids(batch, "prompt_input_ids")
    out: dict[str, torch.Tensor] = {}

    def one(name: str, comps, eids) -> None:
        ps = prompts
        if kind == "listwise":  # flatten [B][K] -> B*K sequences
            k = {len(c) for c in comps}
            if len(k) != 1:
                raise ValueError(f"listwise rows must have the same number of completions, got {sorted(k)}")
            k = k.pop()
            ps = [p for p in prompts for _ in range(k)]
            comps = [c for row in comps for c in id_lists(row)]
            eids = None if eids is None else [e for e in eids for _ in range(k)]
        sums, _ = cache.sequence_logps(prompt_ids=ps, completion_ids=comps, example_ids=eids, device=device)
        out[name] = sums.view(len(prompts), -1) if kind == "listwise" else sums
        if per_token:
            tok, mask = cache.token_logps(
                prompt_ids=ps, completion_ids=comps, example_ids=eids, device=device
            )
            out[f"{name}_token_logps"], out[f"{name}_token_mask"] = tok, mask

    if kind == "preference":
        per_token = per_token or ld_alpha is not None  # LD-DPO needs the per-token values
        one("ref_chosen_logps", _ids(batch, "chosen_input_ids"), example_ids)
        one("ref_rejected_logps", _ids(batch, "rejected_input_ids"), example_ids)
        if ld_alpha is not None:
            from ..sequence import ld_dpo_logps

            c, r = "ref_chosen_logps", "ref_rejected_logps"
            out[c], out[r] = ld_dpo_logps(
                out[f"{c}_token_logps"], out[f"{r}_token_logps"], chosen_mask=out[f"{c}_token_mask"],
                rejected_mask=out[f"{r}_token_mask"], ld_alpha=ld_alpha,
            )  # fmt: skip
    elif kind == "listwise":
        one("ref_logps", batch["completions_input_ids"], example_ids)
    else:
        one("ref_logps", _ids(batch, "completion_input_ids"), example_ids)
        if kind == "binary":
            label = torch.as_tensor(batch["label"], dtype=torch.bool, device=device)
            out["ref_chosen_logps"], out["ref_rejected_logps"] = (
                out["ref_logps"][label],
                out["ref_logps"][~label],
            )
    return out


def pad_collate(features: list[dict], pad_id: int = 0) -> dict:
    """Right-pad every ``*_input_ids`` column into a ``[B, T]`` tensor with its ``*_attention_mask``;
    numbers become tensors; other values stay lists."""
    batch: dict = {}
    for name in features[0]:
        vals = [f[name] for f in features]
        if name.endswith("_input_ids") and all(isinstance(v[0], int) for v in vals if v):
            t = max(len(v) for v in vals)
            ids = torch.full((len(vals), t), pad_id, dtype=torch.int64)
            mask = torch.zeros(len(vals), t, dtype=torch.int64)
            for i, v in enumerate(vals):
                ids[i, : len(v)] = torch.tensor(v, dtype=torch.int64)
                mask[i, : len(v)] = 1
            batch[name], batch[name.replace("input_ids", "attention_mask")] = ids, mask
        elif all(isinstance(v, (int, float, bool)) for v in vals):
            batch[name] = torch.tensor(vals)
        else:
            batch[name] = vals
    return batch


class ReferenceCollator:
    """A ``collate_fn`` that adds the cached reference values to every batch.

    ``collate_fn`` (default :func:`pad_collate`) builds the batch from the rows; the reference
    values (:func:`reference_logps`) are computed from the rows' own ids and merged in, on
    ``device`` (default CPU: a ``DataLoader`` worker should not touch the GPU; move the batch as
    usual). ``id_column`` names a row field that joins the key (when the cache was built with one);
    ``per_token`` / ``ld_alpha`` as in :func:`reference_logps`.
    """

    def __init__(
        self,
        cache: ReferenceCache,
        *,
        kind: str = "preference",
        collate_fn: Callable[[list[dict]], dict] | None = None,
        id_column: str | None = None,
        per_token: bool = False,
        ld_alpha: float | None = None,
        device: torch.device | str | None = "cpu",
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        self.cache, self.kind, self.collate_fn = cache, kind, collate_fn or pad_collate
        self.id_column, self.per_token, self.device = id_column, per_token, device
        self.ld_alpha = ld_alpha

    def __call__(self, features: list[dict]) -> dict:
        rows = {k: [f[k] for f in features] for k in features[0]}
        eids = None if self.id_column is None else [str(v) for v in rows[self.id_column]]
        refs = reference_logps(
            self.cache, rows, kind=self.kind, example_ids=eids, per_token=self.per_token,
            ld_alpha=self.ld_alpha, device=self.device,
        )  # fmt: skip
        batch = self.collate_fn(features)
        clash = set(refs) & set(batch)
        if clash:
            raise ValueError(f"the collated batch already has {sorted(clash)}; refusing to overwrite them")
        batch.update(refs)
        return batch


__all__ = ["ReferenceCollator", "pad_collate", "reference_logps"]
