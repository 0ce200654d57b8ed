"""Cached reference log-probs: precompute once, store safely, train without a reference model.

* :func:`precompute` (``alignops precompute``): score a dataset with a reference causal LM using
  the fused log-probs, into a directory of checksummed safetensors shards + a JSON manifest.
* :class:`ReferenceCache`: open a complete cache (checksums, fingerprints) and look values up by
  sequence key; :func:`verify_cache` (``alignops cache verify``) checks one.
* :func:`reference_logps` / :class:`ReferenceCollator`: a batch's ``ref_chosen_logps`` /
  ``ref_rejected_logps`` (or per-token values), on the batch's device, for any alignops loss.

Format and guarantees: docs/cache.md.
"""

from ._format import (
    CacheCorruptError,
    CacheError,
    CacheIncompleteError,
    CacheKeyError,
    FingerprintMismatchError,
    model_fingerprint,
    sequence_key,
)
from .data import detect_kind, example_sequences, load_rows
from .lookup import ReferenceCollator, pad_collate, reference_logps
from .precompute import PrecomputeResult, precompute
from .store import ReferenceCache, read_manifest, sequence_keys, verify_cache

__all__ = [
    "CacheCorruptError",
    "CacheError",
    "CacheIncompleteError",
    "CacheKeyError",
    "FingerprintMismatchError",
    "PrecomputeResult",
    "ReferenceCache",
    "ReferenceCollator",
    "detect_kind",
    "example_sequences",
    "load_rows",
    "model_fingerprint",
    "pad_collate",
    "precompute",
    "read_manifest",
    "reference_logps",
    "sequence_key",
    "sequence_keys",
    "verify_cache",
]
