"""One tolerance helper for every test.

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
    """Three-way rule: err(out) <= err(base) * 1.25 + slack, on max-abs and relative RMS (the
    max-abs slack is at least one ulp of a 16-bit output at the largest magnitude)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    o_abs, o_rel = _err(ref64, out)
    b_abs, b_rel = _err(ref64, base)
    scale = ref64.double().abs().max().item() if ref64.numel() else 1.0
    # a 16-bit output may differ from the baseline by one rounding flip of its own dtype (one ulp
    # at the largest magnitude): both round fp32 values that differ in their last fp32 bits
    ulp = torch.finfo(out.dtype).eps * scale if out.dtype in (torch.float16, torch.bfloat16) else 0.0
    assert o_abs <= 1.25 * b_abs + max(slack * max(scale, 1.0), ulp), (
        f"{name}: kernel max_abs {o_abs:.3e} vs torch-lowp {b_abs:.3e}\n" + _describe(name, ref64, out)
    )
    assert o_rel <= 1.25 * b_rel + slack, f"{name}: kernel rel_rms {o_rel:.3e} vs torch-lowp {b_rel:.3e}"


def assert_topk(
    name: str, ref_logps: torch.Tensor, ids: torch.Tensor, logps: torch.Tensor, valid, *, atol: float
):
    """Top-k side outputs against the full float64 log-probabilities ``ref_logps [N, V]``.

    Robust to near-ties: every returned id's reference log-prob must equal the returned value,
    the values must be sorted, and the k-th returned value must match the reference's k-th
    largest (so the set is a true top-k up to ``atol``). Ignored rows: ids -1, log-probs 0."""
    n, k = ids.shape
    assert ids.dtype == torch.int64 and logps.shape == (n, k), f"{name}: {ids.dtype} {tuple(logps.shape)}"
    valid = torch.as_tensor(valid, dtype=torch.bool)
    assert bool((ids[~valid] == -1).all()) and bool((logps[~valid] == 0).all()), f"{name}: ignored rows"
    ids_v, lp_v, ref_v = ids[valid], logps[valid].double(), ref_logps[valid].double()
    assert bool(((ids_v >= 0) & (ids_v < ref_v.shape[-1])).all()), f"{name}: id out of range"
    assert_close(f"{name} values at ids", ref_v.gather(1, ids_v), lp_v, atol=atol)
    assert bool((lp_v[:, :-1] >= lp_v[:, 1:] - atol).all()), f"{name}: not sorted"
    assert_close(f"{name} k-th values", ref_v.topk(k, dim=1).values, lp_v, atol=atol)
    assert bool((ids_v.sort(1).values[:, 1:] != ids_v.sort(1).values[:, :-1]).all()), f"{name}: repeated id"
