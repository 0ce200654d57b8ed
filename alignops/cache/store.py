"""Write and read a reference-log-prob cache (format: :mod:`alignops.cache._format`).

:class:`ReferenceCache` opens a complete cache, checks it (format, fingerprints, every shard's
size and sha256) and serves values by sequence key from memory-mapped safetensors shards: only
the per-sequence ``keys`` / ``sums`` / ``counts`` / ``offsets`` are read at open; per-token rows
are sliced out of the mapped files when asked for.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ._format import (
    FORMAT,
    FORMAT_VERSION,
    KEY_BYTES,
    MANIFEST_FILE,
    RUN_FILE,
    CacheCorruptError,
    CacheError,
    CacheIncompleteError,
    CacheKeyError,
    check_fingerprints,
    file_sha256,
    manifest_digest,
    model_fingerprint,
    read_json,
    sequence_key,
    shard_name,
    sidecar_name,
    write_atomic,
    write_json_atomic,
)

SHARD_TENSORS = ("keys", "sums", "counts", "offsets", "token_logps", "topk_ids", "topk_logps")


def write_shard(root: str | os.PathLike, index: int, tensors: dict[str, torch.Tensor]) -> dict:
    """Write shard ``index`` atomically, then its sidecar; return the sidecar record."""
    from safetensors.torch import save

    unknown = set(tensors) - set(SHARD_TENSORS)
    if unknown:
        raise ValueError(f"unknown shard tensors {sorted(unknown)}")
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": FORMAT})
    root = Path(root)
    write_atomic(root / shard_name(index), data)

    record = {
        "file": shard_name(index),
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "sequences": int(tensors["keys"].shape[0]),
        "tokens": int(tensors["counts"].sum()),
    }
    write_json_atomic(root / sidecar_name(index), record)
    return record


def shard_done(root: Path, index: int) -> dict | None:
    """The sidecar of shard ``index`` if the shard is on disk and matches it (size and sha256)."""
    side = root / sidecar_name(index)
    if not side.is_file():
        return None
    try:
        record = read_json(side, "shard record")
    except CacheCorruptError:
        return None
    path = root / record.get("file", "")
    if not path.is_file() or path.stat().st_size != record.get("bytes"):
        return None
    return record if file_sha256(path) == record.get("sha256") else None


def check_shard_file(root: Path, record: dict) -> None:
    """Raise :class:`CacheCorruptError` unless the shard's size and sha256 match its record."""
    path = root / record["file"]
    if not path.is_file():
        raise CacheCorruptError(f"shard {record['file']} is missing from {root}")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise CacheCorruptError(
            f"shard {record['file']} has {size} bytes, its record says {record['bytes']} (truncated or "
            "overwritten): the cache is damaged; recompute it"
        )
    digest = file_sha256(path)
    if digest != record["sha256"]:
        raise CacheCorruptError(
            f"shard {record['file']} fails its checksum (sha256 {digest[:16]}..., recorded "
            f"{record['sha256'][:16]}...): the file was modified or damaged; recompute the cache"
        )


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a complete cache; :class:`CacheIncompleteError` if precompute has not finished."""
    root = Path(path)
    if not root.is_dir():
        raise CacheError(f"reference cache {str(path)!r} does not exist")
    try:
        manifest = read_json(root / MANIFEST_FILE, "manifest")
    except FileNotFoundError:
        if (root / RUN_FILE).is_file():
            run = read_json(root / RUN_FILE, "run record")
            done = sum(1 for i in range(run["plan"]["shards"]) if (root / sidecar_name(i)).is_file())
            raise CacheIncompleteError(
                f"reference cache {str(path)!r} is incomplete ({done} of {run['plan']['shards']} shards "
                "written, no manifest): its precompute was interrupted. Rerun the same precompute "
                "command to finish it (only the missing shards are computed)."
            ) from None
        raise CacheError(f"{str(path)!r} is not a reference cache (no {MANIFEST_FILE})") from None
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{str(path)!r} is not a reference cache (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"reference cache format version {manifest.get('format_version')} is not supported by this "
            f"alignops (reads version {FORMAT_VERSION}); recompute the cache"
        )
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise CacheCorruptError(
            f"the manifest of {str(path)!r} fails its checksum (edited or damaged): recompute the cache"
        )
    return manifest


def verify_cache(
    path: str | os.PathLike, *, model: str | os.PathLike | None = None, options: dict | None = None
) -> dict:
    """Check a cache: manifest, every shard's size and sha256, and (given a model directory or
    options) its fingerprint. Returns the manifest; raises a :class:`CacheError` saying why not."""
    root = Path(path)
    manifest = read_manifest(root)
    if model is not None:
        check_fingerprints(
            manifest["fingerprint"], model_fingerprint(model), f"reference cache {str(path)!r}"
        )
    if options:
        check_fingerprints(manifest["options"], options, f"reference cache {str(path)!r}")
    for record in manifest["shards"]:
        check_shard_file(root, record)
    return manifest


@dataclass(frozen=True)
class _Loc:
    shard: int
    row: int


def id_lists(x) -> list[list[int]]:
    """Token ids as a list of Python int lists (from lists, tuples, 1-D tensors or arrays)."""
    out = []
    for row in x:
        if isinstance(row, torch.Tensor):
            if row.dim() != 1 or row.is_floating_point():
                raise ValueError(
                    f"each sequence must be a 1-D integer tensor, got {tuple(row.shape)} {row.dtype}"
                )
            row = row.tolist()
        out.append([int(t) for t in row])
    return out


def unpad(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Rows of a padded ``[B, T]`` id tensor without their padding (``mask [B, T]``, nonzero = token;
    left or right padding)."""
    if ids.shape != mask.shape or ids.dim() != 2:
        raise ValueError(f"ids {tuple(ids.shape)} and mask {tuple(mask.shape)} must both be [B, T]")
    return [row[m != 0].tolist() for row, m in zip(ids.cpu(), mask.cpu())]


def sequence_keys(prompt_ids, completion_ids, example_ids: Sequence[str] | None = None) -> list[bytes]:
    """Keys of ``B`` sequences ``prompt + completion`` (lists of id lists or 1-D tensors)."""
    prompts, completions = id_lists(prompt_ids), id_lists(completion_ids)
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if example_ids is not None and len(example_ids) != len(prompts):
        raise ValueError(f"{len(example_ids)} example ids for {len(prompts)} sequences")
    return [
        sequence_key(p + c, len(p), None if example_ids is None else example_ids[i])
        for i, (p, c) in enumerate(zip(prompts, completions))
    ]


class ReferenceCache:
    """A complete reference-log-prob cache, opened for lookups.

    Args:
        path: the cache directory (written by :func:`alignops.cache.precompute`).
        model: optional model directory: refuse the cache unless its weights, config and tokenizer
            are the ones the cache was computed with.
        options: optional log-prob options to insist on (``temperature``, ``softcap``,
            ``logit_scale``, ``dtype``, ``max_length``, ...): refuse the cache if any differs.
        verify: check every shard's sha256 at open (default); ``False`` checks sizes only.

    Lookups take sequence keys (:func:`sequence_keys`) or prompt / completion ids and return
    tensors on ``device``. A key that is not in the cache raises :class:`CacheKeyError`; nothing
    ever falls back to zeros or to another model.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        model: str | os.PathLike | None = None,
        options: dict | None = None,
        verify: bool = True,
    ) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if model is not None:
            check_fingerprints(
                self.manifest["fingerprint"], model_fingerprint(model), f"reference cache {str(path)!r}"
            )
        if options:
            check_fingerprints(self.manifest["options"], options, f"reference cache {str(path)!r}")
        self.per_token = bool(self.manifest["options"]["per_token"])
        self.topk = int(self.manifest["options"]["topk"])
        self._files, self._sums, self._counts, self._offsets = [], [], [], []
        self._index: dict[bytes, _Loc] = {}
        for s, record in enumerate(self.manifest["shards"]):
            if verify:
                check_shard_file(self.path, record)
            else:
                size = (
                    (self.path / record["file"]).stat().st_size
                    if (self.path / record["file"]).is_file()
                    else -1
                )
                if size != record["bytes"]:
                    raise CacheCorruptError(
                        f"shard {record['file']} has {size} bytes, recorded {record['bytes']}"
                    )
            try:
                f = safe_open(str(self.path / record["file"]), framework="pt")
                keys = f.get_tensor("keys").numpy()
                self._sums.append(f.get_tensor("sums"))
                self._counts.append(f.get_tensor("counts"))
                self._offsets.append(f.get_tensor("offsets") if self.per_token or self.topk else None)
            except Exception as e:  # a header or tensor the format does not allow
                raise CacheCorruptError(f"shard {record['file']} cannot be read: {e}") from e
            if keys.shape != (record["sequences"], KEY_BYTES):
                raise CacheCorruptError(
                    f"shard {record['file']} holds keys {keys.shape}, record says {record}"
                )
            self._files.append(f)
            for r, k in enumerate(keys):
                self._index[k.tobytes()] = _Loc(s, r)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def _locate(self, keys: Sequence[bytes]) -> list[_Loc]:
        missing = [i for i, k in enumerate(keys) if k not in self._index]
        if missing:
            raise CacheKeyError(
                f"{len(missing)} of {len(keys)} sequences are not in the reference cache {str(self.path)!r} "
                f"(first: batch row {missing[0]}, key {keys[missing[0]].hex()[:16]}...). The batch's token "
                "ids, completion boundary or example id differ from what was precomputed (another "
                "tokenizer, chat template, truncation or dataset?); no reference value is invented."
            )
        return [self._index[k] for k in keys]

    def _keys(self, keys, prompt_ids, completion_ids, example_ids) -> list[bytes]:
        if keys is not None:
            return list(keys)
        if prompt_ids is None or completion_ids is None:
            raise ValueError("pass keys=, or prompt_ids= and completion_ids=")
        return sequence_keys(prompt_ids, completion_ids, example_ids)

    def sequence_logps(
        self, keys=None, *, prompt_ids=None, completion_ids=None, example_ids=None, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sums [B] float32, counts [B] int64)`` of ``B`` sequences, on ``device``."""
        locs = self._locate(self._keys(keys, prompt_ids, completion_ids, example_ids))
        sums = torch.stack([self._sums[l.shard][l.row] for l in locs]) if locs else torch.zeros(0)
        counts = (
            torch.stack([self._counts[l.shard][l.row] for l in locs])
            if locs
            else torch.zeros(0, dtype=torch.int64)
        )
        return sums.to(device), counts.to(device)

    def _rows(self, name: str, locs: list[_Loc]) -> list[torch.Tensor]:
        rows = []
        for l in locs:
            off = self._offsets[l.shard]
            a, b = int(off[l.row]), int(off[l.row + 1])
            rows.append(self._files[l.shard].get_slice(name)[a:b])  # read from the mapped file
        return rows

    def token_logps(
        self, keys=None, *, prompt_ids=None, completion_ids=None, example_ids=None, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token reference log-probs of the completions, right-padded: ``(logps [B, C] float32,
        mask [B, C] bool)`` with ``C`` the longest completion; 0 where ``mask`` is False."""
        if not self.per_token:
            raise CacheError(
                f"reference cache {str(self.path)!r} holds no per-token values (precompute with --per-token)"
            )
        locs = self._locate(self._keys(keys, prompt_ids, completion_ids, example_ids))
        rows = self._rows("token_logps", locs)
        return _pad(rows, 0.0, device)

    def topk_logps(
        self, keys=None, *, prompt_ids=None, completion_ids=None, example_ids=None, device=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The reference's top-k per completion token: ``(ids [B, C, K] int64 (-1 padding),
        logps [B, C, K] float32, mask [B, C] bool)``."""
        if not self.topk:
            raise CacheError(
                f"reference cache {str(self.path)!r} holds no top-k values (precompute with --topk K)"
            )
        locs = self._locate(self._keys(keys, prompt_ids, completion_ids, example_ids))
        ids, _ = _pad(self._rows("topk_ids", locs), -1, device)
        logps, mask = _pad(self._rows("topk_logps", locs), 0.0, device)
        return ids, logps, mask

    def pair_logps(self, prompt_ids, chosen_ids, rejected_ids, *, example_ids=None, device=None) -> dict:
        """``{"ref_chosen_logps": [B], "ref_rejected_logps": [B]}`` of a preference batch, on
        ``device``: the keyword arguments of :func:`alignops.losses.dpo_loss` and its family."""
        chosen, _ = self.sequence_logps(
            prompt_ids=prompt_ids, completion_ids=chosen_ids, example_ids=example_ids, device=device
        )
        rejected, _ = self.sequence_logps(
            prompt_ids=prompt_ids, completion_ids=rejected_ids, example_ids=example_ids, device=device
        )
        return {"ref_chosen_logps": chosen, "ref_rejected_logps": rejected}

    def summary(self) -> str:
        """What the cache holds, as printed by ``alignops cache show``."""
        m = self.manifest
        return describe(m)


def describe(m: dict) -> str:
    o, fp = m["options"], m["fingerprint"]
    lines = [
        f"reference cache, format {m['format']} v{m['format_version']}, "
        f"written by alignops {m['library_version']}",
        f"  model          {m.get('model_name')}  weights sha256 {fp['weights_sha256'][:16]}...  "
        f"config {fp['config_sha256'][:16]}...  tokenizer {(fp['tokenizer_sha256'] or 'none')[:16]}",
        f"  dataset        {m['data']['kind']}  {m['data']['examples']} examples -> "
        f"{m['totals']['sequences']} "
        f"sequences, {m['totals']['tokens']} completion tokens",
        "  options        " + "  ".join(f"{k}={o[k]}" for k in sorted(o)),
        f"  values         sums+counts{' per-token' if o['per_token'] else ''}"
        + (f" top-{o['topk']}" if o["topk"] else ""),
        f"  shards         {len(m['shards'])} ({sum(s['bytes'] for s in m['shards'])} bytes)",
    ]
    return "\n".join(lines)


def _pad(rows: list[torch.Tensor], fill, device) -> tuple[torch.Tensor, torch.Tensor]:
    b = len(rows)
    c = max((r.shape[0] for r in rows), default=0)
    tail = tuple(rows[0].shape[1:]) if rows else ()
    dtype = rows[0].dtype if rows else torch.float32
    out = torch.full((b, c, *tail), fill, dtype=dtype)
    mask = torch.zeros(b, c, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return out.to(device), mask.to(device)


__all__ = [
    "ReferenceCache",
    "describe",
    "id_lists",
    "read_manifest",
    "sequence_keys",
    "unpad",
    "verify_cache",
    "write_shard",
]
