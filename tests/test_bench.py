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
PROVIDERS = "alignops,eager,torch-native,torch-chunked,liger,cce"
MIB = 2**20


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "--family",
        "linear_cross_entropy,cross_entropy",
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
        for provider in ("alignops", "eager", "torch-native"):
            assert (mode, provider) in ran
    assert all("DIFF" not in r for r in rows), text
    # peers that cannot run on the CPU are skipped with a reason, never silently
    assert "liger" in text and "cce" in text and "need a CUDA device" in text
    assert "divergence  cpu-tiny" not in text  # only the requested families run
    assert "x eager" in text and "mem/eager" in text

    with open(out / "linear_cross_entropy.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == _report.CSV_FIELDS
        csv_rows = list(reader)
    metrics = {(r["provider"], r["mode"], r["metric"]) for r in csv_rows}
    assert ("alignops", "fwd+bwd", "time") in metrics
    assert ("eager", "fwd+bwd", "peak_extra_memory") in metrics
    assert ("alignops", "fwd", "throughput") in metrics
    assert ("eager", "bwd", "agreement_rel_err") in metrics
    for r in csv_rows:
        assert r["x_name"] == "tokens" and r["x"] in ("32", "64")
        assert float(r["p20"]) <= float(r["p50"]) <= float(r["p80"]) or r["metric"] != "time"
        assert json.loads(r["config_json"])["vocab"] == 1000

    doc = json.loads((out / "tiny.json").read_text())
    assert doc["environment"]["torch"] == torch.__version__
    assert {s["provider"] for s in doc["skipped"]} >= {"liger", "cce"}
    assert not any(s["reason"].startswith("memory not measured") for s in doc["skipped"]), doc["skipped"]
    recs = [r for r in doc["records"] if r["case"]["family"] == "linear_cross_entropy"]
    assert {r["provider"] for r in recs} >= {"alignops", "eager", "torch-native"}
    for r in recs:
        assert r["peak_extra_bytes"] is not None, r["memory"]
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
        torch_mem = server.measure(lce.__name__, case, "eager", ["fwd", "fwd+bwd"])
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


REPO_ROOT = H.REPO_ROOT if (H.REPO_ROOT / "pyproject.toml").exists() else None


def _decoy_checkout(tmp_path):
    """A working directory with an ``alignops/`` folder that is not the installed package, as the
    root of a checkout is for a normal (non-editable) install."""
    (tmp_path / "alignops").mkdir()
    decoy = "raise ImportError('the decoy alignops/ was imported')\n"
    (tmp_path / "alignops" / "__init__.py").write_text(decoy)
    return tmp_path


@pytest.mark.parametrize("where", ["repo-root", "decoy-checkout"])
def test_memory_independent_of_working_directory(where, tmp_path, monkeypatch, capfd):
    """The measuring process imports the installed package whatever the working directory (a
    checkout's alignops/ folder used to shadow it: every memory figure was missing), and what it
    prints stays out of the terminal."""
    if where == "repo-root":
        if REPO_ROOT is None:
            pytest.skip("alignops is not installed from a checkout")
        monkeypatch.chdir(REPO_ROOT)
    else:
        monkeypatch.chdir(_decoy_checkout(tmp_path))
    case = H.Case("linear_cross_entropy", "cpu-tiny", 64, 64, 1000, "float32", "cpu")
    with M.MemoryServer() as server:
        mem = server.measure(lce.__name__, case, "alignops", ["fwd+bwd"])["fwd+bwd"]
    assert mem.peak_extra_bytes is not None, mem.error
    assert mem.peak_extra_bytes > 0
    err = capfd.readouterr().err
    assert "nanobind" not in err and "Traceback" not in err, err


def test_memory_errors_are_reported():
    case = H.Case("linear_cross_entropy", "cpu-tiny", 64, 64, 1000, "float32", "cpu")
    with M.MemoryServer() as server:
        mem = server.measure(lce.__name__, case, "no-such-provider", ["fwd"])["fwd"]
    assert mem.peak_extra_bytes is None and "no-such-provider" in mem.error


def test_default_output_is_outside_tracked_files(tmp_path, monkeypatch, capsys):
    """Results go to ./alignops-bench-results (or $ALIGNOPS_BENCH_OUT), never to bench/results."""
    monkeypatch.delenv(bench_cli.OUT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert bench_cli.default_out() == tmp_path / "alignops-bench-results"
    argv = ["--family", "cross_entropy", "--providers", "alignops", "--mode", "fwd", "--no-memory", *TINY]
    assert bench_cli.main(argv) == 0
    assert (tmp_path / "alignops-bench-results" / "cross_entropy.csv").exists()
    assert (tmp_path / "alignops-bench-results" / "run.json").exists()
    monkeypatch.setenv(bench_cli.OUT_ENV, str(tmp_path / "elsewhere"))
    assert bench_cli.main(argv) == 0
    assert (tmp_path / "elsewhere" / "run.json").exists()
    if REPO_ROOT is not None:  # the curated results of a checkout are never the default
        monkeypatch.chdir(REPO_ROOT)
        monkeypatch.delenv(bench_cli.OUT_ENV)
        assert bench_cli.default_out() == REPO_ROOT / "alignops-bench-results"
    capsys.readouterr()


def test_warnings_are_kept_out_of_the_tables(monkeypatch, tmp_path, capsys):
    import warnings

    def noisy(case, inputs):
        h, w, y = inputs.tensors["hidden"], inputs.tensors["weight"], inputs.tensors["targets"]

        def fn():
            warnings.warn("noisy peer says hello", UserWarning, stacklevel=1)
            return lce.native_linear_ce(h, w, y, None)

        return H.Bound(fn, inputs.leaves)

    original = lce.providers
    monkeypatch.setattr(lce, "providers", lambda: [*original(), H.Provider("noisy", noisy)])
    argv = ["--family", "linear_cross_entropy", "--providers", "alignops,noisy", "--mode", "fwd+bwd"]
    assert bench_cli.main([*argv, "--no-memory", "--no-save", *TINY]) == 0
    out, err = capsys.readouterr()
    assert "noisy peer says hello" not in out
    assert err.count("noisy peer says hello") == 1 and "warnings raised while measuring" in err


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for family in bench_cli.FAMILIES:
        assert family in text
    assert "eager" in text and "alignops-bench-results" in text and "ALIGNOPS_BENCH_OUT" in text
    for bad in ("``", ":func:", ":class:", ".py", "_harness", "_memory", "SPEC"):
        assert bad not in text, bad


def test_divergence_family_agrees_and_skips_liger_with_reason(tmp_path, capsys):
    """The divergence family: alignops, eager full logits and TRL's chunked divergence agree on
    the loss and the student's gradients; Liger's fused linear JSD is skipped on the CPU, named."""
    argv = [
        "--family",
        "divergence",
        "--providers",
        "alignops,eager,trl-chunked,liger",
        "--no-memory",
        "--no-save",
    ]
    assert bench_cli.main([*argv, *TINY]) == 0
    text = capsys.readouterr().out
    assert "divergence  cpu-tiny  N=64 H=64 V=1000" in text
    rows = [line.split() for line in text.splitlines() if line.split()[:1] == ["fwd+bwd"]]
    assert {r[1] for r in rows} == {"alignops", "eager", "trl-chunked"}
    assert all("DIFF" not in r for r in rows), text
    assert "liger" in text and "need a CUDA device" in text


@pytest.mark.slow  # three fresh interpreters
def test_one_shot_prints_a_row_per_provider(capsys):
    from alignops.bench import one_shot

    argv = ["--family", "divergence", "--tokens", "48", "--hidden", "16", "--vocab", "301"]
    assert one_shot.main([*argv, "--providers", "alignops,eager,liger"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {ln.split()[0]: ln.split() for ln in lines[2:] if ln.split()}
    assert float(rows["alignops"][1]) > 0 and float(rows["alignops"][2]) >= 0
    assert rows["alignops"][4] == rows["eager"][4]  # the same loss to 7 digits
    assert "skipped:" in rows["liger"]
