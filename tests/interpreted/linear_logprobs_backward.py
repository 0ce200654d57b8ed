"""Interpreted cases of the linear log-prob backward's precision and work-skipping options
(``kernels/linear_logprobs.py``): the fp32 workspace of fp16 inputs and gradient filtering.

Run by ``tests/test_linear_logprobs_backward_interpret.py`` through ``tests/_interpret.py``; by
hand: ``TRITON_INTERPRET=1 python -m pytest tests/interpreted/linear_logprobs_backward.py -q``.

References are float64 autograd through the full logits of the same (16-bit rounded) operands.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before import (see module docstring)", allow_module_level=True)

from alignops.kernels import constants as C  # noqa: E402
from alignops.kernels import linear_logprobs as K  # noqa: E402
from alignops.kernels._common import NOTHING_EXTRA, LogitOptions, StatRequest, TokenStats  # noqa: E402

from tests._assert import assert_close  # noqa: E402
from tests._backward_cases import (  # noqa: E402
    filter_bound,
    mean_ce_case,
    peaked_case,
    ref_grads,
    ref_mean_ce_grads,
    rel_rms,
)

IGNORE = -100
OPTS = LogitOptions(IGNORE, 1.0, None, 1.0)


def _triton_grads(hidden, weight, targets, g_logp, opts=OPTS, **bwd_kw):
    st = K.linear_logprobs_fwd(hidden, weight, targets, None, opts, NOTHING_EXTRA)
    saved = TokenStats(st.logp, st.lse, None, None, None, None, None)
    grads = TokenStats(g_logp, None, None, None, None, None, None)
    dh, dw, _ = K.linear_logprobs_bwd(
        hidden,
        weight,
        targets,
        None,
        saved,
        grads,
        opts,
        need_dhidden=True,
        need_dweight=True,
        need_dbias=False,
        **bwd_kw,
    )
    return dh, dw


def test_fp16_mean_reduction_small_gradients(monkeypatch):
    """Mean cross-entropy over a global count of 8192 tokens (gradient accumulation: upstream
    gradient -1/8192 per valid token) with fp16 inputs: ``dr ~ p / 8192 ~ 1e-7`` is below fp16's
    smallest normal (6.1e-5). With the fp32 workspace dh and dW match float64 within fp16's own
    output rounding (rel. RMS <= 1e-3, measured 5.5e-4 / 4.1e-4); the fp16 workspace (the old
    path, forced here; measured 7.3e-3 / 5.2e-3) must be at least 4x worse, so the test can fail.
    N = 200, H = 16, V = 1100: several token and vocab blocks, none full."""
    hidden, weight, targets, g = mean_ce_case(
        N=200, H=16, V=1100, dtype=torch.float16, seed=3, num_items=8192
    )
    ref_dh, ref_dw = ref_mean_ce_grads(hidden, weight, targets, g)
    dh, dw = _triton_grads(hidden, weight, targets, g)
    assert dh.dtype == torch.float16 and dw.dtype == torch.float16
    err_dh, err_dw = rel_rms(ref_dh, dh), rel_rms(ref_dw, dw)
    assert err_dh <= 1e-3 and err_dw <= 1e-3, (err_dh, err_dw)
    monkeypatch.setattr(K, "workspace_dtype", lambda dot: dot)  # the fp16 workspace
    dh16, dw16 = _triton_grads(hidden, weight, targets, g)
    assert rel_rms(ref_dh, dh16) > 4 * err_dh and rel_rms(ref_dw, dw16) > 4 * err_dw


SMALL_BWD = K.BwdConfig(16, 32, 16, 4, 1, 70 * 96)  # vocab chunks of 96 rows: 3 blocks each


def _filtered(hidden, weight, targets, g_logp, g_lse, threshold, cfg=SMALL_BWD):
    st = K.linear_logprobs_fwd(hidden, weight, targets, None, OPTS, NOTHING_EXTRA)
    saved = TokenStats(st.logp, st.lse, None, None, None, None, None)
    grads = TokenStats(g_logp, g_lse, None, None, None, None, None)
    tiles = {}
    dh, dw, _ = K.linear_logprobs_bwd(
        hidden,
        weight,
        targets,
        None,
        saved,
        grads,
        OPTS,
        need_dhidden=True,
        need_dweight=True,
        need_dbias=False,
        config=cfg,
        grad_filter=threshold,
        tile_stats=tiles,
    )
    return dh, dw, tiles["live"].item(), tiles["tiles"].item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grad_filter_bound(dtype):
    """Filtering at 2^-12 on peaked distributions (``peaked_case``): some tiles are skipped (and
    not all), and the gradients differ from float64 by at most what filtering may drop (the
    tiling-free bound of ``filter_bound``: ``|coef_n| p_nv`` for each dropped non-target entry
    with ``p_nv < 2^-12``) plus the dtype's rounding (fp32 5e-5, 16-bit 2e-2 relative to the
    largest gradient). N = 70, H = 48, V = 300: partial token, vocab and hidden blocks."""
    hidden, weight, targets = peaked_case(N=70, H=48, V=300, dtype=dtype, seed=11, sharp=8.0)
    g = torch.Generator().manual_seed(12)
    g_logp, g_lse = torch.randn(70, generator=g), torch.randn(70, generator=g) * 0.3
    t = 2.0**-12
    ref_dh, ref_dw = ref_grads(hidden, weight, targets, g_logp, g_lse)
    bound_dh, bound_dw, _ = filter_bound(hidden, weight, targets, g_lse - g_logp, t)
    dh, dw, live, tiles = _filtered(hidden, weight, targets, g_logp, g_lse, t)
    assert 0 < live < tiles, (live, tiles)
    rt = 5e-5 if dtype == torch.float32 else 2e-2
    for name, ref, out, bound in (("dh", ref_dh, dh, bound_dh), ("dw", ref_dw, dw, bound_dw)):
        err = (out.double() - ref).abs()
        ok = err <= bound * 1.001 + rt * ref.abs().max()
        assert bool(ok.all()), f"{name}: worst excess {(err - bound).max().item():.3e}"
    # the filter did drop something: without it the result is closer to float64 in fp32
    if dtype == torch.float32:
        dh0, dw0 = _triton_grads(hidden, weight, targets, g_logp)
        assert rel_rms(ref_dh, dh) > rel_rms(ref_grads(hidden, weight, targets, g_logp)[0], dh0)


def test_grad_filter_deterministic_and_ignored_blocks():
    """Two runs give bitwise-equal gradients; a token block whose rows are all ignored has no
    live tile (and exact-zero dh rows); filtering with a threshold below every p keeps every
    other tile and matches the unfiltered backward to fp32 rounding."""
    hidden, weight, targets = peaked_case(N=70, H=48, V=300, dtype=torch.float32, seed=13, sharp=8.0)
    targets[:32] = IGNORE  # token blocks 0 and 1 (BN = 16) entirely ignored
    g = torch.Generator().manual_seed(14)
    g_logp = torch.randn(70, generator=g)
    a = _filtered(hidden, weight, targets, g_logp, None, 2.0**-12)
    b = _filtered(hidden, weight, targets, g_logp, None, 2.0**-12)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert bool((a[0][:32] == 0).all())
    dh, dw, live, tiles = _filtered(hidden, weight, targets, g_logp, None, 1e-38)
    n_vb = tiles // 5  # 5 token blocks of 16 rows
    assert live == tiles - 2 * n_vb, (live, tiles)
    ref_dh, ref_dw = ref_grads(hidden, weight, targets, g_logp)
    assert_close("dh", ref_dh, dh, atol=5e-5 * ref_dh.abs().max().item())
    assert_close("dw", ref_dw, dw, atol=5e-5 * ref_dw.abs().max().item())


@pytest.mark.parametrize(
    "dtype,cfg",
    K.fwd_candidates(),
    ids=lambda x: str(x).replace("torch.", "") if isinstance(x, torch.dtype) else None,
)
def test_every_forward_candidate(dtype, cfg):
    """Each configuration the forward heuristic can pick (``fwd_candidates``: BN 16 / 32 / 64 /
    128, with and without a top-k) against float64 at N = 150, H = 40, V = 300: a partial last
    token block for every BN, several vocab blocks and splits. The top-k configs also check the
    top-5 ids."""
    hidden, weight, targets, _ = mean_ce_case(N=150, H=40, V=300, dtype=dtype, seed=51)
    topk = 5 if cfg.BN <= C.LLP_BN_TOPK else 0  # the top-k configs (and the other small ones)
    want = StatRequest(topk=topk)
    st = K.linear_logprobs_fwd(hidden, weight, targets, None, OPTS, want, config=cfg)
    z = hidden.double() @ weight.double().T
    valid = targets != IGNORE
    lse = torch.logsumexp(z, -1)
    logp = z.gather(1, targets.clamp(min=0)[:, None])[:, 0] - lse
    tol = 2e-5 if dtype == torch.float32 else 2e-4  # operands are already rounded: fp32 sums only
    assert_close("lse", torch.where(valid, lse, 0.0), st.lse, atol=tol, rtol=tol)
    assert_close("logp", torch.where(valid, logp, 0.0), st.logp, atol=tol, rtol=tol)
    if topk:
        assert torch.equal(st.topk_ids[valid], z.topk(topk, -1).indices[valid])
