"""``alignops bench`` on the CPU at tiny shapes: table, CSV / JSON / plot, agreement check, memory.

Speed is never asserted here (benchmarks print it); the structure of the output, the agreement
check and the memory measurement's ability to see what must be there are.
"""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
import torch
from alignops.bench import _harness as H
from alignops.bench import _memory as M
from alignops.bench import _report
from alignops.bench import cli as bench_cli
from alignops.bench import linear_cross_entropy as lce

# cpu-tiny (H=64, V=1000): a case runs in milliseconds; torch.compile is left out (seconds of
# compilation per shape) and is exercised by `alignops bench --quick`.
TINY = ["--model", "cpu-tiny", "--tokens", "64", "--budget-s", "0.01"]
PROVIDERS = "alignops,torch,torch-native,torch-chunked,liger,cce"
MIB = 2**20


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "--family",
        "linear_cross_entropy,cross_entropy,divergence",
        "--providers",
        PROVIDERS,
        "--out",
        str(out),
        "--tag",
        "tiny",
        *TINY,
        "--tokens",
        "32,64",
    ]  # two points: a plot line
    if importlib.util.find_spec("matplotlib") is not None:
        argv.append("--plot")
    return out, argv


def test_cli_table_csv_json(tiny_run, capsys):
    out, argv = tiny_run
    assert bench_cli.main(argv) == 0
    text = capsys.readouterr().out

    # header: device, versions, commit
    assert "alignops bench  device: cpu" in text
    assert f"torch {torch.__version__}" in text and "triton " in text and "commit " in text
    # one block per family, a row per (mode, provider) that ran, agreement marked
    for family in ("linear_cross_entropy  cpu-tiny  N=64 H=64 V=1000", "cross_entropy  cpu-tiny"):
        assert family in text
    rows = [line.split() for line in text.splitlines() if line.split()[:1] in (["fwd"], ["bwd"], ["fwd+bwd"])]
    ran = {(r[0], r[1]) for r in rows}
    for mode in H.MODES:
        for provider in ("alignops", "torch", "torch-native"):
            assert (mode, provider) in ran
    assert all("DIFF" not in r for r in rows), text
    # peers that cannot run on the CPU are skipped with a reason, never silently
    assert "liger" in text and "cce" in text and "need a CUDA device" in text
    assert "no divergence family in alignops yet" in text

    with open(out / "linear_cross_entropy.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == _report.CSV_FIELDS
        csv_rows = list(reader)
    metrics = {(r["provider"], r["mode"], r["metric"]) for r in csv_rows}
    assert ("alignops", "fwd+bwd", "time") in metrics
    assert ("torch", "fwd+bwd", "peak_extra_memory") in metrics
    assert ("alignops", "fwd", "throughput") in metrics
    assert ("torch", "bwd", "agreement_rel_err") in metrics
    for r in csv_rows:
        assert r["x_name"] == "tokens" and r["x"] in ("32", "64")
        assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"]) or r["metric"] != "time"
        assert json.loads(r["config_json"])["vocab"] == 1000

    doc = json.loads((out / "tiny.json").read_text())
    assert doc["environment"]["torch"] == torch.__version__
    assert {s["provider"] for s in doc["skipped"]} >= {"liger", "cce", "*"}
    recs = [r for r in doc["records"] if r["case"]["family"] == "linear_cross_entropy"]
    assert {r["provider"] for r in recs} >= {"alignops", "torch", "torch-native"}
    for r in recs:
        assert r["timing_ms"]["p50_ms"] > 0 and r["flops"] > 0 and r["bytes"] > 0
        assert r["agreement"] is None or r["agreement"]["ok"]
    if "--plot" in argv:
        assert (out / "linear_cross_entropy_cpu-tiny_float32.png").stat().st_size > 0


def test_disagreeing_provider_is_marked(monkeypatch, tmp_path, capsys):
    """A provider whose loss and gradient are 1 % off must be flagged DIFF, not pass."""

    def wrong(case, inputs):
        h, w, y = inputs.tensors["hidden"], inputs.tensors["weight"], inputs.tensors["targets"]
        return H.Bound(lambda: 1.01 * lce.native_linear_ce(h, w, y, None), inputs.leaves)

    original = lce.providers
    monkeypatch.setattr(lce, "providers", lambda: [*original(), H.Provider("wrong", wrong)])
    argv = [
        "--family",
        "linear_cross_entropy",
        "--providers",
        "alignops,wrong",
        "--mode",
        "fwd+bwd",
        "--no-memory",
        "--out",
        str(tmp_path),
        "--tag",
        "wrong",
        *TINY,
    ]
    assert bench_cli.main(argv) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("fwd+bwd") and " wrong " in line)
    assert "DIFF" in row
    doc = json.loads((tmp_path / "wrong.json").read_text())
    bad = next(r for r in doc["records"] if r["provider"] == "wrong")
    assert not bad["agreement"]["ok"] and bad["agreement"]["max_rel_err"] > 5e-3


def test_compare_tolerances():
    loss, grad = torch.tensor(2.0, dtype=torch.float64), torch.randn(100, 10)
    ref = (loss, [grad])
    assert H.compare(ref, (loss, [grad.clone()]), torch.float32, ["x"]).ok
    assert not H.compare(ref, (loss, [grad * 1.001]), torch.float32, ["x"]).ok
    assert H.compare(ref, (loss, [grad * 1.001]), torch.bfloat16, ["x"]).ok
    assert not H.compare(ref, (loss, [grad * float("nan")]), torch.bfloat16, ["x"]).ok
    assert not H.compare(ref, (loss, [None]), torch.float32, ["x"]).ok


def test_cpu_memory_sees_logits_and_grads():
    """Fresh-process peaks: eager full-logit CE must show at least its [N, V] fp32 logits, and every
    fwd+bwd at least the gradients it returns (they are alive when the step ends)."""
    case = H.Case("linear_cross_entropy", "test", 256, 64, 8192, "float32", "cpu")
    logits_bytes = case.tokens * case.vocab * 4
    with M.MemoryServer() as server:
        torch_mem = server.measure(lce.__name__, case, "torch", ["fwd", "fwd+bwd"])
        ours = server.measure(lce.__name__, case, "alignops", ["fwd+bwd"])
    for mem in (*torch_mem.values(), *ours.values()):
        assert mem.peak_extra_bytes is not None, mem.error
        assert "fresh process" in mem.method
    assert torch_mem["fwd"].peak_extra_bytes >= logits_bytes
    assert torch_mem["fwd+bwd"].peak_extra_bytes >= lce.grads_bytes(case)
    assert ours["fwd+bwd"].peak_extra_bytes >= 0.95 * lce.grads_bytes(case)


def test_quantiles_and_roofline_counts():
    t = H._quantiles([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.p20_ms, t.p50_ms, t.p80_ms, t.reps) == (1.8, 3.0, 4.2, 5)
    case = H.Case("linear_cross_entropy", "m", 8, 4, 16, "bfloat16", "cpu")
    assert lce.flops(case, "fwd") == 2 * 8 * 16 * 4
    assert lce.flops(case, "fwd+bwd") == 3 * lce.flops(case, "fwd")
    assert lce.bytes_moved(case, "fwd") == (8 + 16) * 4 * 2 + 8 * 8


def test_list_and_bad_arguments(capsys):
    assert bench_cli.main(["--list"]) == 0
    text = capsys.readouterr().out
    assert "linear_cross_entropy" in text and "llama3-8b" in text and "gemma2-2b" in text
    with pytest.raises(SystemExit):
        bench_cli.main(["--family", "nope", "--no-save", *TINY])
