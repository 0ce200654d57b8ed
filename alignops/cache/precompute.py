"""Precompute reference log-probs once: run a causal LM over a dataset and write a cache.

:func:`precompute` (and ``alignops precompute``) loads a transformers causal LM from a local
directory in the dtype asked for, tokenizes the dataset (:mod:`alignops.cache.data`), and scores
every distinct ``prompt + completion`` sequence with the fused log-probs
(:func:`alignops.linear_logprobs` on the decoder's last hidden states and the output embedding,
under ``torch.no_grad()``: no ``[tokens, vocab]`` logits, no autograd graph).

The plan is deterministic: sequences sorted by length (longest first, ties by key), cut into
batches of ``batch_size``, batches grouped into shards of ``shard_size`` sequences. Shard ``i``
therefore always holds the same sequences computed in the same batches, so a run that was killed
and rerun, or one split over ``torchrun`` ranks (shard ``i`` goes to rank ``i % world_size``),
writes the very bytes of an uninterrupted single-process run. A rerun computes only the shards
whose file is missing or fails its checksum, and says how much that is.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ._format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    RUN_FILE,
    CacheError,
    manifest_digest,
    model_fingerprint,
    read_json,
    sequence_key,
    shard_name,
    write_json_atomic,
)
from .data import detect_kind, example_sequences, load_rows
from .store import shard_done, write_shard

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
PROGRESS_PERIOD_S = 0.5


@dataclass
class PrecomputeResult:
    """What a :func:`precompute` call did (on this rank; totals are the whole cache's)."""

    path: Path
    sequences: int  # distinct sequences in the cache
    tokens: int  # completion tokens in the cache
    computed_sequences: int  # sequences this call (this rank) computed
    computed_tokens: int  # tokens (prompt + completion) it ran through the model
    skipped_sequences: int  # sequences of this rank's shards that were already cached
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.computed_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Seq:
    ids: tuple[int, ...]
    start: int
    key: bytes


class _Progress:
    """A progress line on stderr: tokens done, tokens/s, ETA (refreshed at most every 0.5 s)."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.done, self.t0, self.last = 0, time.perf_counter(), 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.last >= PROGRESS_PERIOD_S or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta_s = "?" if eta == float("inf") else time.strftime("%H:%M:%S", time.gmtime(eta))
            pct = 100.0 * self.done / max(self.total, 1)
            sys.stderr.write(
                f"\r{self.label} {self.done}/{self.total} tokens ({pct:5.1f}%) "
                f"{rate:,.0f} tokens/s ETA {eta_s}"
            )
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.total:
            sys.stderr.write("\n")


def _dist() -> tuple[int, int, bool]:
    """(rank, world size, whether this call initialised the process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _from_rank0(err: str | None, world: int) -> None:
    """Raise rank 0's error on every rank (so that no rank waits at a barrier for a failed one)."""
    if world > 1:
        import torch.distributed as dist

        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err is not None:
        raise CacheError(err)


def _prepare(root: Path, run: dict, overwrite: bool) -> str | None:
    """Create the cache directory or check that it holds this run; the reason it cannot, or None."""
    root.mkdir(parents=True, exist_ok=True)
    if (root / RUN_FILE).is_file():
        old = read_json(root / RUN_FILE, "run record")
        if old != run:
            diff = sorted(k for k in run if old.get(k) != run[k])
            if not overwrite:
                return (
                    f"{str(root)!r} holds a cache of another run (differs in: {', '.join(diff)}); "
                    "refusing to mix them. Use another output directory or overwrite=True (--overwrite)."
                )
            _clear(root)
    elif any(root.iterdir()) and not overwrite:
        return f"{str(root)!r} is not empty and holds no reference cache; refusing to write there"
    if not (root / RUN_FILE).is_file():
        write_json_atomic(root / RUN_FILE, run)
    return None


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _plan_sequences(rows, kind, tokenizer, id_column, add_eos, max_length) -> list[_Seq]:
    seen: dict[bytes, _Seq] = {}
    for n, row in enumerate(rows):
        if id_column is not None and id_column not in row:
            raise ValueError(f"row {n} has no id column {id_column!r}")
        eid = None if id_column is None else str(row[id_column])
        for prompt, comp in example_sequences(row, kind, tokenizer, add_eos=add_eos, max_length=max_length):
            key = sequence_key(prompt + comp, len(prompt), eid)
            seen.setdefault(key, _Seq(tuple(prompt + comp), len(prompt), key))
    return sorted(seen.values(), key=lambda s: (-len(s.ids), s.key))


def _score_batch(decoder, weight, bias, seqs: list[_Seq], opts: dict, device) -> dict[str, torch.Tensor]:
    """Reference values of one batch (right-padded), with the fused log-probs."""
    from ..linear_logprobs import linear_logprobs
    from ..sequence import reduce_padded

    b, t = len(seqs), max(len(s.ids) for s in seqs)
    ids = torch.zeros(b, t, dtype=torch.int64)
    attn = torch.zeros(b, t, dtype=torch.int64)
    targets = torch.full((b, t - 1), -100, dtype=torch.int64)
    for i, s in enumerate(seqs):
        row = torch.tensor(s.ids, dtype=torch.int64)
        ids[i, : len(s.ids)] = row
        attn[i, : len(s.ids)] = 1
        targets[i, s.start - 1 : len(s.ids) - 1] = row[s.start :]  # position p scores token p + 1
    ids, attn, targets = ids.to(device), attn.to(device), targets.to(device)
    out = decoder(input_ids=ids, attention_mask=attn)
    hidden = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[:, :-1]
    lp = linear_logprobs(
        hidden,
        weight,
        targets,
        bias=bias,
        temperature=opts["temperature"],
        softcap=opts["softcap"],
        logit_scale=opts["logit_scale"],
        topk=opts["topk"],
    )
    mask = targets != -100
    logps = lp.logps.float()
    res = {"sums": reduce_padded(logps, mask).sums.float().cpu(), "counts": mask.sum(-1).cpu()}
    if opts["per_token"] or opts["topk"]:
        rows = [slice(s.start - 1, len(s.ids) - 1) for s in seqs]
        if opts["per_token"]:
            res["token_logps"] = torch.cat([logps[i, r] for i, r in enumerate(rows)]).cpu()
        if opts["topk"]:
            res["topk_ids"] = torch.cat([lp.topk_ids[i, r] for i, r in enumerate(rows)]).long().cpu()
            res["topk_logps"] = torch.cat([lp.topk_logps[i, r] for i, r in enumerate(rows)]).float().cpu()
    return res


def _clear(root: Path) -> None:
    for p in root.iterdir():
        if p.name in (RUN_FILE, MANIFEST_FILE) or (
            p.name.startswith("shard-") and p.suffix in (".json", ".safetensors")
        ):
            p.unlink()


def precompute(
    model: str | os.PathLike,
    data: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: str = "float32",
    split: str | None = None,
    kind: str | None = None,
    id_column: str | None = None,
    batch_size: int = 8,
    shard_size: int = 1024,
    max_length: int | None = None,
    add_eos: bool = True,
    per_token: bool = False,
    topk: int = 0,
    temperature: float = 1.0,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
) -> PrecomputeResult:
    """Score a dataset with a reference model and write (or finish) a reference cache.

    Args:
        model: local directory of a transformers causal LM (with its tokenizer for text data).
        data: JSONL / Parquet file or saved ``datasets`` directory (layouts: :mod:`.data`).
        output: the cache directory (created; a rerun resumes it).
        dtype: the reference's dtype (``float32``, ``bfloat16``, ``float16``, ``float64``).
        kind: the dataset layout, or ``None`` to recognise it from the columns.
        id_column: a column whose value joins each sequence's key (the same ids then must be
            given at lookup).
        batch_size / shard_size: sequences per forward / per shard file.
        max_length: truncate completions so that prompt + completion fits.
        per_token / topk: also store per-token log-probs / the reference's top-``topk`` ids and
            log-probs per completion token (``topk <= 64``).
        temperature: divides the logits (the model's own soft-cap and logit scale are applied).
        device: where the model runs (default: this rank's CUDA device, else CPU).
        overwrite: replace a cache directory that holds another run (otherwise refused).
        on_shard: called with each shard index after that shard is durably written.

    Under ``torchrun`` (``WORLD_SIZE > 1``) every rank calls this with the same arguments; each
    writes its own shards and rank 0 writes the manifest once all exist.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .. import __version__

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be >= 1")
    if not 0 <= topk <= 64:
        raise ValueError(f"topk must be in [0, 64], got {topk}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rank, world, own_group = _dist()
    root = Path(output)
    fingerprint = model_fingerprint(model)
    config = AutoConfig.from_pretrained(model)
    softcap = getattr(config, "final_logit_softcapping", None)
    opts = {
        "temperature": float(temperature),
        "softcap": None if softcap is None else float(softcap),
        "logit_scale": float(getattr(config, "logit_scale", None) or 1.0),
        "dtype": dtype,
        "max_length": max_length,
        "add_eos": bool(add_eos),
        "per_token": bool(per_token),
        "topk": int(topk),
    }
    tokenizer = AutoTokenizer.from_pretrained(model) if fingerprint["tokenizer_sha256"] else None
    rows = load_rows(data, split=split)
    if not rows:
        raise ValueError(f"dataset {str(data)!r} is empty")
    kind = kind or detect_kind(rows[0].keys())
    seqs = _plan_sequences(rows, kind, tokenizer, id_column, add_eos, max_length)
    shard_size = max(batch_size, shard_size // batch_size * batch_size)
    shards = [seqs[i : i + shard_size] for i in range(0, len(seqs), shard_size)]
    plan_hash = hashlib.sha256(f"{batch_size},{shard_size}".encode())
    for s in seqs:
        plan_hash.update(s.key)
    run = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "options": opts,
        "data": {"kind": kind, "examples": len(rows), "id_column": id_column},
        "plan": {
            "sha256": plan_hash.hexdigest(),
            "shards": len(shards),
            "sequences": len(seqs),
            "batch_size": batch_size,
            "shard_size": shard_size,
        },
    }
    _from_rank0(_prepare(root, run, overwrite) if rank == 0 else None, world)

    mine = [i for i in range(len(shards)) if i % world == rank]
    todo = [i for i in mine if shard_done(root, i) is None]
    for p in root.iterdir():  # temporary files of a killed writer of one of this rank's shards
        if p.name.endswith(".tmp") and any(p.name.startswith("." + shard_name(i)) for i in todo):
            p.unlink()
    todo_tokens = sum(len(s.ids) for i in todo for s in shards[i])
    skipped = sum(len(shards[i]) for i in mine if i not in todo)
    label = "precompute" if world == 1 else f"precompute [rank {rank}/{world}]"
    if progress:
        sys.stderr.write(
            f"{label}: {len(mine) - len(todo)} of {len(mine)} shards ({skipped} sequences) already cached; "
            f"computing {sum(len(shards[i]) for i in todo)} sequences ({todo_tokens} tokens) "
            f"in {len(todo)} shards\n"
        )
    computed = 0
    t_run = time.perf_counter()
    if todo:
        device = (
            torch.device(device)
            if device is not None
            else (
                torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                if torch.cuda.is_available()
                else torch.device("cpu")
            )
        )
        net = AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[dtype]).to(device).eval()
        head = net.get_output_embeddings()
        decoder = net.get_decoder()
        bar = _Progress(todo_tokens, label, progress)
        t_run = time.perf_counter()
        with torch.no_grad():
            for i in todo:
                parts = []
                for j in range(0, len(shards[i]), batch_size):
                    batch = shards[i][j : j + batch_size]
                    parts.append(
                        _score_batch(decoder, head.weight, getattr(head, "bias", None), batch, opts, device)
                    )
                    bar.update(sum(len(s.ids) for s in batch))
                tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
                tensors["keys"] = torch.tensor([list(s.key) for s in shards[i]], dtype=torch.uint8)
                if per_token or topk:
                    tensors["offsets"] = torch.cat(
                        [torch.zeros(1, dtype=torch.int64), tensors["counts"].cumsum(0)]
                    )
                write_shard(root, i, tensors)
                computed += len(shards[i])
                if on_shard is not None:
                    on_shard(i)
        bar.close()
    seconds = time.perf_counter() - t_run
    _barrier(world)
    err = None
    if rank == 0:
        records = [shard_done(root, i) for i in range(len(shards))]
        missing = [i for i, r in enumerate(records) if r is None]
        if missing:
            err = f"shards {missing[:8]} are missing or damaged after precompute; rerun it"
    _from_rank0(err, world)
    if rank == 0:
        manifest = dict(
            run, library_version=__version__, model_name=Path(model).resolve().name, shards=records
        )
        manifest["totals"] = {"sequences": len(seqs), "tokens": sum(r["tokens"] for r in records)}
        manifest["manifest_sha256"] = manifest_digest(manifest)
        write_json_atomic(root / MANIFEST_FILE, manifest)
    _barrier(world)
    if own_group:
        import torch.distributed as dist

        dist.destroy_process_group()
    return PrecomputeResult(
        path=root,
        sequences=len(seqs),
        tokens=sum(len(s.ids) - s.start for s in seqs),
        computed_sequences=computed,
        computed_tokens=todo_tokens,
        skipped_sequences=skipped,
        seconds=seconds,
    )


__all__ = ["DTYPES", "PrecomputeResult", "precompute"]
