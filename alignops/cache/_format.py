"""On-disk format of a reference-log-prob cache: keys, fingerprints, atomic files, errors.

A cache is a directory::

    run.json                 what is being computed (fingerprints, options, plan): written first
    shard-00000.safetensors  the values of shard 0 (flat arrays + offsets, see below)
    shard-00000.json         its sidecar: sha256, size and counts, written after the shard
    ...
    manifest.json            written last, once every shard exists: the cache is complete

Every file is written to a temporary name in the same directory, flushed with ``fsync`` and
renamed over its final name (``os.replace`` is atomic on POSIX), then the directory itself is
synced. A crash therefore leaves either the old file or the new one, never half of one, and a
cache without ``manifest.json`` is refused as incomplete.

Tensors of one shard (``n`` sequences, ``t`` completion tokens in all, ``K`` top-k width):

    keys        uint8   [n, 32]   sha256 of (token ids, completion start, optional example id)
    sums        float32 [n]       Σ of the completion tokens' log-probs under the reference
    counts      int64   [n]       completion tokens that count
    offsets     int64   [n + 1]   row i's tokens are [offsets[i], offsets[i + 1]) (per-token only)
    token_logps float32 [t]       per-token log-probs, flat (optional)
    topk_ids    int64   [t, K]    the reference's K most likely ids per token (optional)
    topk_logps  float32 [t, K]    and their log-probs (optional)
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

FORMAT = "alignops-reference-cache"
FORMAT_VERSION = 1
KEY_BYTES = 32
RUN_FILE = "run.json"
MANIFEST_FILE = "manifest.json"
_HASH_CHUNK = 1 << 20
# Files of a model directory that hold weights (the weights fingerprint), and of a tokenizer.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
MODEL_CONFIG_FILES = ("config.json",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)


class CacheError(Exception):
    """A reference cache cannot be used as asked (the message says why and what to do)."""


class CacheIncompleteError(CacheError):
    """The cache has no manifest: its precompute has not finished (rerun it to resume)."""


class CacheCorruptError(CacheError):
    """A shard's checksum or size does not match its record (flipped bytes, truncation)."""


class FingerprintMismatchError(CacheError):
    """The cache was computed with another model, tokenizer, dtype or log-prob options."""


class CacheKeyError(CacheError, KeyError):
    """A sequence asked for is not in the cache."""

    def __str__(self) -> str:  # KeyError quotes its argument; print the message as it is
        return str(self.args[0]) if self.args else ""


def sequence_key(token_ids: Sequence[int], completion_start: int, example_id: str | None = None) -> bytes:
    """The 32-byte key of one sequence: sha256 of its token ids (int64), the index of its first
    completion token, and the optional example id. Two sequences share a key iff all three agree,
    so re-ordering, shuffling or filtering the dataset can never pair a row with another's value.
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be one sequence (1-D), got shape {ids.shape}")
    if not 0 < completion_start <= ids.size:
        raise ValueError(
            f"completion_start {completion_start} must be in [1, {ids.size}] (the prompt must hold at "
            "least one token: the first completion token is scored from the position before it)"
        )
    h = hashlib.sha256(b"alignops-seq-v1")
    h.update(struct.pack("<qq", ids.size, completion_start))
    h.update(ids.astype("<i8", copy=False).tobytes())
    if example_id is not None:
        eid = str(example_id).encode()
        h.update(struct.pack("<q", len(eid)) + eid)
    return h.digest()


def manifest_digest(manifest: dict) -> str:
    """sha256 of a manifest's canonical JSON without its own ``manifest_sha256`` field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files_digest(root: Path, names: list[str]) -> str:
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode() + b"\0" + file_sha256(root / name).encode() + b"\0")
    return h.hexdigest()


def model_fingerprint(model_dir: str | os.PathLike) -> dict:
    """Fingerprints of a local transformers model directory: ``weights`` (sha256 over every weight
    file), ``config`` (config.json) and ``tokenizer`` (the tokenizer files present)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise CacheError(f"model directory {str(model_dir)!r} does not exist")
    weights = [p.name for p in root.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)]
    if not weights:
        raise CacheError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {str(model_dir)!r}")
    config = [n for n in MODEL_CONFIG_FILES if (root / n).is_file()]
    tok = [n for n in TOKENIZER_FILES if (root / n).is_file()]
    return {
        "weights_sha256": _files_digest(root, weights),
        "config_sha256": _files_digest(root, config),
        "tokenizer_sha256": _files_digest(root, tok) if tok else None,
    }


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_json_atomic(path: str | os.PathLike, obj: dict) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise CacheCorruptError(f"{what} {path.name} cannot be read: {e}") from e


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def sidecar_name(index: int) -> str:
    return f"shard-{index:05d}.json"


def check_fingerprints(recorded: dict, expected: dict, where: str) -> None:
    """Raise :class:`FingerprintMismatchError` naming every field of ``expected`` that differs."""
    diffs = [
        f"{k}: cache has {recorded.get(k)!r}, asked for {v!r}"
        for k, v in sorted(expected.items())
        if recorded.get(k) != v
    ]
    if diffs:
        raise FingerprintMismatchError(
            f"{where} does not match what was asked for, refusing it ({'; '.join(diffs)}). "
            "Recompute the cache with this model and these options (alignops precompute)."
        )
