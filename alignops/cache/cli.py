"""``alignops precompute`` and ``alignops cache verify|show``."""

from __future__ import annotations

import argparse
import sys

from ._format import CacheError


def precompute_main(argv: list[str]) -> int:
    from .precompute import DTYPES, precompute

    p = argparse.ArgumentParser(
        prog="alignops precompute",
        description="Score a dataset with a reference causal LM (fused log-probs, no autograd) and write a "
        "reference-log-prob cache. Rerunning the same command resumes an interrupted run. Under torchrun "
        "every rank writes its own shards.",
    )
    p.add_argument("--model", required=True, help="local directory of a transformers causal LM (+ tokenizer)")
    p.add_argument("--data", required=True, help="JSONL / Parquet file or a saved datasets directory")
    p.add_argument("--output", required=True, help="cache directory")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--split", default=None, help="split of a saved DatasetDict")
    p.add_argument(
        "--kind",
        default=None,
        choices=["preference", "binary", "listwise", "completion"],
        help="dataset layout (default: recognised from the columns)",
    )
    p.add_argument("--id-column", default=None, help="column whose value joins each sequence's key")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=1024, help="sequences per shard file")
    p.add_argument("--max-length", type=int, default=None, help="truncate completions to fit this length")
    p.add_argument("--no-eos", action="store_true", help="do not append EOS to text completions")
    p.add_argument("--per-token", action="store_true", help="also store per-token log-probs")
    p.add_argument("--topk", type=int, default=0, help="also store the reference's top-k ids / log-probs")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--device", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace a cache of another run in --output")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    a = p.parse_args(argv)
    try:
        passed = ("dtype", "split", "kind", "id_column", "batch_size", "shard_size", "max_length")
        passed += ("per_token", "topk", "temperature", "device", "overwrite")
        options = {name: getattr(a, name) for name in passed}
        r = precompute(a.model, a.data, a.output, add_eos=not a.no_eos, progress=not a.quiet, **options)
    except (CacheError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"alignops precompute: error: {e}", file=sys.stderr)
        return 2
    print(
        f"computed {r.computed_sequences} sequences ({r.computed_tokens} tokens) in {r.seconds:.2f} s: "
        f"{r.tokens_per_s:,.0f} tokens/s; {r.skipped_sequences} sequences were already cached; "
        f"the cache holds {r.sequences} sequences ({r.tokens} completion tokens) in {r.path}"
    )
    return 0


def cache_main(argv: list[str]) -> int:
    from .store import describe, verify_cache

    p = argparse.ArgumentParser(prog="alignops cache", description="Inspect a reference-log-prob cache.")
    sub = p.add_subparsers(dest="action", required=True)
    v = sub.add_parser("verify", help="check every shard's checksum (and, with --model, the fingerprint)")
    v.add_argument("cache_dir")
    v.add_argument("--model", default=None, help="model directory the cache must have been computed with")
    s = sub.add_parser("show", help="print what the cache holds")
    s.add_argument("cache_dir")
    a = p.parse_args(argv)
    try:
        if a.action == "verify":
            m = verify_cache(a.cache_dir, model=a.model)
            fp = " and the model's fingerprint" if a.model else ""
            print(
                f"ok: {len(m['shards'])} shards, {m['totals']['sequences']} sequences; "
                f"every checksum{fp} matches"
            )
        else:
            from .store import read_manifest

            print(describe(read_manifest(a.cache_dir)))
    except CacheError as e:
        print(f"alignops cache {a.action}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0
