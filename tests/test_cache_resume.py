"""Reference cache: a precompute killed with SIGKILL mid-way, then rerun, writes the same bytes as
an uninterrupted run (and the rerun computes only what is missing); a 2-process ``torchrun``
(gloo, CPU) run writes the same bytes as a single-process run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")

from alignops.cache import CacheIncompleteError, ReferenceCache, precompute  # noqa: E402
from tests._cache_models import make_model_dir, preference_rows, write_jsonl  # noqa: E402

ARGS = ["--batch-size", "3", "--shard-size", "6", "--per-token", "--topk", "4"]
N_ROWS = 17  # 34 sequences -> 6 shards of 6 (the last one 4), batches of 3
# One intra-op thread in every process: torchrun starts its workers with OMP_NUM_THREADS=1, and
# a CPU reduction's rounding may depend on how it is split across threads.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
KILL_TIMEOUT_S = 240


def _cli(*args, check=True):
    cmd = [sys.executable, "-m", "alignops.cli", "precompute", *args]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=KILL_TIMEOUT_S)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = make_model_dir(root / "model", seed=5)
    data = write_jsonl(root / "data.jsonl", preference_rows(N_ROWS, seed=6))
    r = _cli("--model", str(model), "--data", str(data), "--output", str(root / "whole"), *ARGS)
    assert re.search(r"computed 34 sequences \(\d+ tokens\) in [\d.]+ s: [\d,]+ tokens/s", r.stdout), r.stdout
    return {"root": root, "model": model, "data": data, "whole": root / "whole"}


_KILLABLE = """
import sys, time
from alignops.cache import precompute
precompute(sys.argv[1], sys.argv[2], sys.argv[3], batch_size=3, shard_size=6, per_token=True, topk=4,
           progress=False, on_shard=lambda i: time.sleep(0.4))
"""


def test_sigkill_then_rerun_equals_uninterrupted(base, tmp_path):
    out = tmp_path / "killed"
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE, str(base["model"]), str(base["data"]), str(out)], env=ENV
    )
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while len(list(out.glob("shard-*.json"))) < 2:
        assert child.poll() is None, "the precompute ended before it could be killed"
        assert time.monotonic() < deadline, "no shard written in time"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    written = len(list(out.glob("shard-*.json")))
    assert 2 <= written < 6 and not (out / "manifest.json").exists()
    with pytest.raises(CacheIncompleteError, match=f"{written} of 6 shards written"):
        ReferenceCache(out)
    r = _cli("--model", str(base["model"]), "--data", str(base["data"]), "--output", str(out), *ARGS)
    assert f"{written} of 6 shards ({written * 6} sequences) already cached" in r.stderr, r.stderr
    assert (
        f"computed {34 - written * 6} sequences" in r.stdout
        and f"{written * 6} sequences were already cached" in r.stdout
    )
    assert _files(out) == _files(base["whole"])
    again = precompute(base["model"], base["data"], out, batch_size=3, shard_size=6, per_token=True, topk=4)
    assert again.computed_sequences == 0 and again.skipped_sequences == 34
    assert _files(out) == _files(base["whole"])
    ReferenceCache(out, model=base["model"])


def test_torchrun_two_ranks_equals_single_process(base, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "alignops.cli", "precompute",
        "--model", str(base["model"]), "--data", str(base["data"]), "--output", str(out), "--quiet", *ARGS,
    ]  # fmt: skip
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=KILL_TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("computed 3 shards") == 0 and r.stdout.count("computed 18 sequences") == 1
    assert r.stdout.count("computed 16 sequences") == 1
    assert _files(out) == _files(base["whole"])
