"""One tolerance helper for every test (STYLE §9).

``assert_close(name, ref, out, atol=..., rtol=...)`` compares ``out`` to a float64
reference and, on failure, reports max-abs error, relative RMS error and the worst
indices. ``assert_close_lowp(name, ref64, out, base)`` is the three-way rule for low
precision: the kernel's error against the float64 truth must not exceed the error of the
ordinary PyTorch path in the same dtype (``base``) by more than a small slack.
"""

from __future__ import annotations

import torch


def _err(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    d = (out.double() - ref.double()).abs()
    max_abs = d.max().item() if d.numel() else 0.0
    denom = ref.double().pow(2).mean().sqrt().item() if ref.numel() else 0.0
    rms = d.pow(2).mean().sqrt().item() if d.numel() else 0.0
    return max_abs, rms / max(denom, 1e-30)


def _describe(name, ref, out, k=5):
    d = (out.double() - ref.double()).abs().flatten()
    idx = torch.topk(d.nan_to_num(float("inf")), min(k, d.numel())).indices
    rows = [
        f"  [{i}] ref={ref.flatten()[i].item():.6g} out={out.flatten()[i].item():.6g}" for i in idx.tolist()
    ]
    max_abs, rel = _err(ref, out)
    return f"{name}: max_abs={max_abs:.3e} rel_rms={rel:.3e}\n" + "\n".join(rows)


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, *, atol: float, rtol: float = 0.0):
    """``|out - ref| <= atol + rtol * |ref|`` elementwise, finite, same shape."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values\n" + _describe(name, ref, out)
    ok = (out.double() - ref.double()).abs() <= atol + rtol * ref.double().abs()
    assert bool(ok.all()), _describe(name, ref, out)


def assert_close_lowp(
    name: str, ref64: torch.Tensor, out: torch.Tensor, base: torch.Tensor, *, slack: float = 1e-3
):
    """Three-way rule: err(out) <= err(base) * 1.25 + slack, on max-abs and relative RMS."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    o_abs, o_rel = _err(ref64, out)
    b_abs, b_rel = _err(ref64, base)
    scale = ref64.double().abs().max().item() if ref64.numel() else 1.0
    assert o_abs <= 1.25 * b_abs + slack * max(scale, 1.0), (
        f"{name}: kernel max_abs {o_abs:.3e} vs torch-lowp {b_abs:.3e}\n" + _describe(name, ref64, out)
    )
    assert o_rel <= 1.25 * b_rel + slack, f"{name}: kernel rel_rms {o_rel:.3e} vs torch-lowp {b_rel:.3e}"
