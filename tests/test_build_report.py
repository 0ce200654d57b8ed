"""``alignops kernels``: ahead-of-time builds for sm_80 / sm_90a without a GPU.

* The real command over every kernel of the package: exit 0, every ``AOT_SPECS`` entry
  built for both architectures, no spills.
* Specs defined here prove the command can fail: a kernel with a compile error, a kernel
  that must spill (a [64, 128] fp32 tile kept live across two reductions by one warp:
  256 values per thread > 255 registers), and a bf16 ``tl.dot`` kernel whose SASS must hold
  tensor-core instructions (HMMA on sm_80, HGMMA = wgmma on sm_90a).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import triton
import triton.language as tl
from alignops.kernels._aot import AotSpec

from alignops import build_report

ARCHS = ("sm_80", "sm_90a")


@triton.jit
def _broken_kernel(x_ptr, BV: tl.constexpr):
    o_v = tl.arange(0, BV)  # BV = 100: arange needs a power of two -> compile error
    tl.store(x_ptr + o_v, tl.load(x_ptr + o_v) * 2.0)


@triton.jit
def _spill_kernel(x_ptr, o_ptr, BM: tl.constexpr, BN: tl.constexpr):
    o_m = tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    p = o_m[:, None] * BN + o_n[None, :]
    b_x = tl.load(x_ptr + p)
    b_cols = tl.sum(b_x, axis=0)
    b_rows = tl.sum(b_x, axis=1)
    tl.store(o_ptr + p, b_x * b_cols[None, :] + b_rows[:, None])


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    o_m = tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    o_k = tl.arange(0, BK)
    b_acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        b_a = tl.load(a_ptr + o_m[:, None] * K + (k + o_k)[None, :])
        b_b = tl.load(b_ptr + (k + o_k)[:, None] * BN + o_n[None, :])
        b_acc += tl.dot(b_a, b_b)  # [BM, BK] @ [BK, BN] -> [BM, BN]
    tl.store(c_ptr + o_m[:, None] * BN + o_n[None, :], b_acc)


AOT_SPECS = [
    AotSpec(
        name="_broken_kernel",
        kernel=_broken_kernel,
        signature={"x_ptr": "*fp32", "BV": "constexpr"},
        constexprs={"BV": 100},
        num_warps=4,
        num_stages=1,
        label="broken BV=100",
    ),
    AotSpec(
        name="_spill_kernel",
        kernel=_spill_kernel,
        signature={"x_ptr": "*fp32", "o_ptr": "*fp32", "BM": "constexpr", "BN": "constexpr"},
        constexprs={"BM": 64, "BN": 128},
        num_warps=1,
        num_stages=1,
        label="fp32 BM=64 BN=128 w1",
    ),
    AotSpec(
        name="_dot_kernel",
        kernel=_dot_kernel,
        signature={
            "a_ptr": "*bf16",
            "b_ptr": "*bf16",
            "c_ptr": "*fp32",
            "K": "i32:16",
            "BM": "constexpr",
            "BN": "constexpr",
            "BK": "constexpr",
        },
        constexprs={"BM": 64, "BN": 64, "BK": 32},
        num_warps=4,
        num_stages=3,
        label="bf16 64x64x32 w4 s3",
    ),
]


def _rows(payload, kernel):
    return {r["arch"]: r for r in payload["rows"] if r["kernel"] == kernel}


@pytest.fixture(scope="module")
def local_specs(tmp_path_factory):
    """The command run in-process on this module's specs only (``--module``)."""
    out = tmp_path_factory.mktemp("build") / "local.json"
    argv = ["--module", __name__, "--kernel", f"{__name__}.", "--arch", ",".join(ARCHS), "--json", str(out)]
    rc = build_report.main(argv)
    with open(out) as f:
        return rc, json.load(f)


def test_broken_kernel_fails_the_command(local_specs):
    rc, payload = local_specs
    assert rc == 1 and payload["ok"] is False
    rows = _rows(payload, "_broken_kernel")
    assert set(rows) == set(ARCHS)
    for r in rows.values():
        assert r["status"] == "FAIL" and "compile failed" in r["error"], r


def test_spilling_kernel_fails_the_command(local_specs):
    _, payload = local_specs
    rows = _rows(payload, "_spill_kernel")
    assert set(rows) == set(ARCHS)
    for r in rows.values():
        assert r["status"] == "SPILL", r
        assert r["spill_stores"] > 0 and r["spill_loads"] > 0 and r["stack"] > 0, r


def test_tensor_cores_detected(local_specs):
    _, payload = local_specs
    rows = _rows(payload, "_dot_kernel")
    assert rows["sm_80"]["status"] == "ok" and rows["sm_80"]["tensor_cores"] == "HMMA", rows["sm_80"]
    assert rows["sm_90a"]["status"] == "ok" and rows["sm_90a"]["tensor_cores"] == "HGMMA", rows["sm_90a"]
    for r in rows.values():
        assert 0 < r["registers"] <= 255 and r["shared_dynamic"] > 0 and r["local"] == 0


def test_signature_mismatch_is_a_failure(tmp_path):
    spec = AotSpec(
        name="_dot_kernel", kernel=_dot_kernel, signature={"a_ptr": "*bf16"}, label="bad signature"
    )
    row = build_report.build_one(__name__, spec, build_report.Arch("sm_80", 80), str(tmp_path))
    assert row.status == "FAIL" and "signature does not match" in row.error


def test_arch_parsing():
    assert build_report.parse_archs("sm_80,sm_90a") == [
        build_report.Arch("sm_80", 80),
        build_report.Arch("sm_90a", 90),
    ]
    with pytest.raises(ValueError, match="sm_90a"):
        build_report.parse_archs("sm_90")  # Triton only emits sm_90a for capability 90
    with pytest.raises(ValueError, match="bad architecture"):
        build_report.parse_archs("hopper")
    assert build_report.main(["--arch", "sm_90"]) == 2


@pytest.mark.parametrize(
    "only",
    [
        pytest.param("kernels.logprobs.", id="one-family"),
        # every kernel of the package: about 8 minutes on 2 cores without Triton's cache
        pytest.param(None, id="every-kernel", marks=pytest.mark.slow),
    ],
)
def test_package_kernels_build_for_both_archs(tmp_path, only):
    """The real command, as a user runs it, over the AOT specs of ``alignops.kernels`` (one
    family in the default run; all of them with ``-m slow``): zero spills, every row reported."""
    out = tmp_path / "all.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    select = [] if only is None else ["--kernel", only]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignops.cli",
            "kernels",
            "--arch",
            ",".join(ARCHS),
            "--json",
            str(out),
            *select,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"alignops kernels failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    with open(out) as f:
        payload = json.load(f)

    specs, failed = build_report.discover()
    assert failed == []
    assert {"alignops.kernels.linear_logprobs", "alignops.kernels.logprobs"} <= {m for m, _, _ in specs}
    if only is not None:
        specs = [(m, i, s) for m, i, s in specs if only in f"{m}.{s.name}"]
    want = sorted((m, s.name, build_report._label(s), a) for m, _, s in specs for a in ARCHS)
    got = sorted((r["module"], r["kernel"], r["config"], r["arch"]) for r in payload["rows"])
    assert got == want
    table = proc.stdout.splitlines()
    for r in payload["rows"]:
        assert r["status"] == "ok", r
        assert r["local"] == 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 < r["registers"] <= 255, r
        line = [
            ln
            for ln in table
            if ln.startswith(r["kernel"]) and f" {r['config']} " in ln and f" {r['arch']} " in ln
        ]
        assert len(line) >= 1, f"table has no line for {r['kernel']} [{r['config']}] {r['arch']}"
