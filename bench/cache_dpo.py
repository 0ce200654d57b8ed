"""One DPO step with cached reference log-probs against the same step with a live reference forward.

Usage (CPU; every measurement in a fresh process)::

    python -m alignops.bench.cache_dpo [--layers 4] [--hidden 256] [--vocab 32000] [--pairs 4]
                                       [--prompt-len 61] [--completion-len 187] [--examples 64]

It builds a tiny random Llama (``--vocab`` >= 32000, a few layers) in a temporary directory with
a pre-tokenized preference dataset, runs ``alignops precompute`` on it (its progress line and
tokens/s are printed as they come), then measures one training step, fwd + bwd, each in a new
interpreter:

  cache  reference log-probs looked up in the cache (``alignops.cache.reference_logps``);
         only the policy is in memory
  live   the reference model is in memory and runs a forward (decoder + fused log-probs, under
         ``torch.no_grad()``) every step

Both compute the policy's sequence log-probs with ``alignops.sequence.sequence_logprobs`` and
finish with ``alignops.losses.dpo_loss``. Time: median wall time of ``--repeats`` steps after one
warm-up. Memory: resident memory once the models are loaded, and the peak extra resident memory
during one step, measured as ``alignops bench`` does on CPU (``bench/_memory.py``: glibc tuned so
RSS follows live bytes, VmHWM reset through /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _build(work: Path, a: argparse.Namespace) -> tuple[Path, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.hidden * 8 // 3,
        num_hidden_layers=a.layers,
        num_attention_heads=max(1, a.hidden // 64),
        num_key_value_heads=max(1, a.hidden // 64),
        max_position_embeddings=a.prompt_len + a.completion_len + 8,
        tie_word_embeddings=False,
    )
    model_dir = work / "ref-model"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    rng = random.Random(1)

    def ids(n: int) -> list[int]:
        return [rng.randrange(4, a.vocab) for _ in range(n)]

    rows = []
    for _ in range(a.examples):
        p = a.prompt_len - rng.randrange(0, 5)
        rows.append({
            "prompt_input_ids": ids(p),
            "chosen_input_ids": ids(a.completion_len - rng.randrange(0, 9)),
            "rejected_input_ids": ids(a.completion_len - rng.randrange(0, 9)),
        })  # fmt: skip
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def _batch(data: Path, pairs: int) -> dict:
    rows = [json.loads(line) for line in data.read_text().splitlines()[:pairs]]
    return {k: [r[k] for r in rows] for k in rows[0]}


def _policy_inputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[chosen; rejected]`` right-padded ids, attention mask and labels (-100 on prompt, padding)."""
    seqs = [(p, c) for key in ("chosen_input_ids", "rejected_input_ids")
            for p, c in zip(batch["prompt_input_ids"], batch[key])]  # fmt: skip
    t = max(len(p) + len(c) for p, c in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.int64)
    labels = torch.full_like(ids, -100)
    attn = torch.zeros_like(ids)
    for i, (p, c) in enumerate(seqs):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attn[i, : len(p) + len(c)] = 1
        labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
    return ids, attn, labels


def _seq_logps(model, ids, attn, labels) -> torch.Tensor:
    from alignops.sequence import sequence_logprobs

    hidden = model.get_decoder()(input_ids=ids, attention_mask=attn).last_hidden_state
    return sequence_logprobs(hidden, model.get_output_embeddings().weight, labels).sums


def child(mode: str, model_dir: str, cache_dir: str, data: str, pairs: int, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    import alignops
    from alignops.cache import ReferenceCache, reference_logps

    from ._memory import _peak_during, _status_kib, _tune_malloc

    trim = _tune_malloc()
    policy = AutoModelForCausalLM.from_pretrained(model_dir).train()
    batch = _batch(Path(data), pairs)
    ids, attn, labels = _policy_inputs(batch)
    if mode == "cache":
        cache = ReferenceCache(cache_dir, model=model_dir)

        def refs() -> dict:
            return reference_logps(cache, batch, kind="preference", device=ids.device)
    else:
        ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()

        def refs() -> dict:
            with torch.no_grad():
                s = _seq_logps(ref, ids, attn, labels)
            c, r = s.chunk(2)
            return {"ref_chosen_logps": c, "ref_rejected_logps": r}

    def step() -> None:
        policy.zero_grad(set_to_none=True)
        pc, pr = _seq_logps(policy, ids, attn, labels).chunk(2)
        alignops.losses.dpo_loss(pc, pr, **refs(), beta=0.1).loss.backward()

    step()  # warm-up
    policy.zero_grad(set_to_none=True)
    trim()
    resident = _status_kib("VmRSS") * 1024
    peak_kib, base_kib, method = _peak_during(step)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "mode": mode,
        "step_s": statistics.median(times),
        "resident_bytes": resident,
        "peak_extra_bytes": (peak_kib - base_kib) * 1024,
        "method": method,
        "tokens": int((labels != -100).sum()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m alignops.bench.cache_dpo", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per step")
    p.add_argument("--prompt-len", type=int, default=61)
    p.add_argument("--completion-len", type=int, default=187)
    p.add_argument("--examples", type=int, default=64, help="pairs in the precomputed dataset")
    p.add_argument("--batch-size", type=int, default=8, help="precompute batch size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--paths", nargs=3, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.vocab < 32000:
        p.error("--vocab must be >= 32000 (a real vocabulary size)")
    if a.child:
        model_dir, cache_dir, data = a.paths
        print(json.dumps(child(a.child, model_dir, cache_dir, data, a.pairs, a.repeats)))
        return 0
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory(prefix="alignops-cache-bench-") as tmp:
        work = Path(tmp)
        model_dir, data = _build(work, a)
        cache_dir = work / "ref-cache"
        print(f"tiny Llama: {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}; {a.examples} pairs, "
              f"prompt ~{a.prompt_len}, completions ~{a.completion_len} tokens; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads", flush=True)  # fmt: skip
        cmd = [sys.executable, "-m", "alignops.cli", "precompute", "--model", str(model_dir), "--data",
               str(data), "--output", str(cache_dir), "--batch-size", str(a.batch_size)]  # fmt: skip
        subprocess.run(cmd, env=env, check=True)
        rows = []
        for mode in ("cache", "live"):
            paths = [str(model_dir), str(cache_dir), str(data)]
            cmd = [sys.executable, "-m", "alignops.bench.cache_dpo", "--child", mode, "--paths", *paths,
                   "--pairs", str(a.pairs), "--repeats", str(a.repeats)]  # fmt: skip
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    mib = 2**20
    print(f"\none DPO step (fwd+bwd), {a.pairs} pairs = {rows[0]['tokens']} completion tokens, CPU, "
          f"fresh process per mode; memory: {rows[0]['method']}")  # fmt: skip
    print(f"{'reference':<10} {'step ms':>9} {'resident MiB':>13} {'peak extra MiB':>15}")
    for r in rows:
        print(f"{r['mode']:<10} {r['step_s'] * 1e3:>9.1f} {r['resident_bytes'] / mib:>13.1f} "
              f"{r['peak_extra_bytes'] / mib:>15.1f}")  # fmt: skip
    c, l = rows
    saved = l["resident_bytes"] + l["peak_extra_bytes"] - c["resident_bytes"] - c["peak_extra_bytes"]
    print(f"cache vs live: {l['step_s'] / c['step_s']:.2f}x faster, {saved / mib:.1f} MiB less at the peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
