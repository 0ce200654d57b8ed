"""``alignops bench --gpu-check`` without CUDA: says so on stderr and exits non-zero (2), having
run nothing; the command line reaches it through ``alignops bench``."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from alignops.bench import cli as bench_cli
from alignops.bench import gpu_check


def test_gpu_check_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ran = []
    monkeypatch.setattr(gpu_check, "run_cuda_tests", lambda: ran.append(1) or 0)
    assert bench_cli.main(["--gpu-check"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit status on a machine without CUDA")
def test_gpu_check_command_exit_status():
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from alignops.cli import main; sys.exit(main(['bench', '--gpu-check']))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA device" in proc.stderr
