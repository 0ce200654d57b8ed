"""Sequence reductions (sums, counts and means; LD-DPO; WPO; packed rows) against float64 references
written from the math:
per-row / per-segment Python loops and full-logits log-softmax, at awkward sizes, with random upstream
gradients. The DPO-side use of these helpers is also checked against TRL in test_losses_dpo.py."""

from __future__ import annotations

import pytest
import torch
from _assert import assert_close
from _inputs import gather_logps, generator, prompt_labels, ref_logits

from alignops.sequence import (
    cu_seqlens_from_position_ids,
    group_by_prompt,
    ld_dpo_logps,
    reduce_packed,
    reduce_padded,
    sequence_logprobs,
    split_pair,
    wpo_log_weights,
)

# ---------------------------------------------------------------- float64 references (loops)


def _ref_reduce_rows(x: torch.Tensor, m: torch.Tensor):
    """S = Σ m ℓ, n = Σ m, A = S / max(1, n), one row at a time in float64."""
    rows = x.flatten(0, -2).double()
    mrows = m.flatten(0, -2).bool()
    sums, counts = [], []
    for r, mr in zip(rows, mrows):
        s = 0.0 * r.sum()  # float64 zero that stays in the graph when nothing counts
        for v, keep in zip(r, mr):
            if keep:
                s = s + v
        sums.append(s)
        counts.append(int(mr.sum()))
    sums = torch.stack(sums).reshape(x.shape[:-1])
    counts = torch.tensor(counts, dtype=torch.int64).reshape(x.shape[:-1])
    return sums, counts, sums / counts.clamp(min=1).double()


def _random_mask(shape, p=0.6, *, empty_rows=()):
    m = torch.rand(shape) < p
    for i in empty_rows:
        m[i] = False
    return m


# ---------------------------------------------------------------- padded


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param((5, 13), id="B5_T13"),  # odd sizes
        pytest.param((2, 3, 7), id="lead_2x3_T7"),  # extra leading dims
        pytest.param((1, 1), id="B1_T1"),  # smallest
    ],
)
def test_reduce_padded_values_and_grads(shape):
    x = torch.randn(shape) * 3
    m = _random_mask(shape, empty_rows=(0,))  # an all-masked row
    x.requires_grad_(True)
    out = reduce_padded(x, m)
    xr = x.detach().double().requires_grad_(True)
    s_ref, n_ref, a_ref = _ref_reduce_rows(xr, m)
    assert out.counts.dtype == torch.int64 and out.sums.dtype == torch.float32 and out.per_token is None
    assert torch.equal(out.counts, n_ref)
    assert_close("sums", s_ref, out.sums, atol=1e-5, rtol=1e-6)
    assert_close("means", a_ref, out.means, atol=1e-5, rtol=1e-6)
    g_s, g_a = torch.randn(out.sums.shape), torch.randn(out.means.shape)
    (gx,) = torch.autograd.grad((out.sums * g_s).sum() + (out.means * g_a).sum(), x)
    (gx_ref,) = torch.autograd.grad((s_ref * g_s.double()).sum() + (a_ref * g_a.double()).sum(), xr)
    assert_close("d x", gx_ref, gx, atol=1e-6, rtol=1e-6)


def test_reduce_padded_masked_garbage_does_not_leak():
    """Masked positions may hold NaN / -inf (e.g. never-written buffers): zero value and zero grad there."""
    x = torch.randn(4, 9)
    m = _random_mask((4, 9))
    x = torch.where(m, x, torch.tensor(float("nan")))
    x[1, ~m[1]] = float("-inf")
    x.requires_grad_(True)
    out = reduce_padded(x, m)
    s_ref, _, _ = _ref_reduce_rows(torch.where(m, x.detach(), 0.0), m)
    assert_close("sums", s_ref, out.sums, atol=1e-5)
    (gx,) = torch.autograd.grad(out.sums.sum(), x)
    assert torch.equal(gx, m.float())


def test_reduce_padded_float64_stays_float64():
    x = torch.randn(3, 5, dtype=torch.float64)
    m = _random_mask((3, 5))
    out = reduce_padded(x, m)
    assert out.sums.dtype == torch.float64
    assert_close("sums", _ref_reduce_rows(x, m)[0], out.sums, atol=1e-12)


# ---------------------------------------------------------------- packed


def _segments(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int64)


@pytest.mark.parametrize("use_position_ids", [False, True], ids=["cu_seqlens", "position_ids"])
def test_reduce_packed_matches_segment_loop(use_position_ids):
    lengths = (
        [7, 1, 12, 9, 3] if use_position_ids else [7, 0, 1, 12, 0, 9, 3]
    )  # cu_seqlens allows empty segments
    cu = _segments(lengths)
    n = int(cu[-1])
    x = (torch.randn(1, n) * 2).requires_grad_(True)
    m = _random_mask((1, n))
    m[0, cu[2] : cu[3]] = False  # a segment with no counted token
    if use_position_ids:
        pos = torch.cat([torch.arange(k) for k in lengths]).unsqueeze(0)
        out = reduce_packed(x, m, position_ids=pos)
    else:
        out = reduce_packed(x, m, cu_seqlens=cu.to(torch.int32))
    xr = x.detach().double()[0].requires_grad_(True)
    s_ref, n_ref = [], []
    for s in range(len(lengths)):
        a, b = int(cu[s]), int(cu[s + 1])
        seg_s, seg_n, _ = _ref_reduce_rows(xr[a:b].unsqueeze(0), m[0, a:b].unsqueeze(0))
        s_ref.append(seg_s[0])
        n_ref.append(int(seg_n[0]))
    s_ref = torch.stack(s_ref)
    n_ref = torch.tensor(n_ref)
    a_ref = s_ref / n_ref.clamp(min=1).double()
    assert torch.equal(out.counts, n_ref)
    assert_close("sums", s_ref, out.sums, atol=1e-5, rtol=1e-6)
    assert_close("means", a_ref, out.means, atol=1e-5, rtol=1e-6)
    g_s, g_a = torch.randn(len(lengths)), torch.randn(len(lengths))
    (gx,) = torch.autograd.grad((out.sums * g_s).sum() + (out.means * g_a).sum(), x)
    (gx_ref,) = torch.autograd.grad((s_ref * g_s.double()).sum() + (a_ref * g_a.double()).sum(), xr)
    assert_close("d x", gx_ref.unsqueeze(0), gx, atol=1e-6, rtol=1e-6)


def test_reduce_packed_long_row_precision():
    """Segment sums come from one prefix sum: a float32 prefix (magnitude ~1e5, ulp ~8e-3) would wreck the
    short segments that follow long ones; every segment must match float64 to float32 rounding."""
    lengths = [5000, 3, 7001, 1, 7995]
    cu = _segments(lengths)
    x = -10.0 * torch.rand(int(cu[-1]))
    m = torch.ones_like(x, dtype=torch.bool)
    out = reduce_packed(x, m, cu_seqlens=cu)
    ref = torch.stack([x[int(cu[s]) : int(cu[s + 1])].double().sum() for s in range(len(lengths))])
    assert_close("sums", ref, out.sums, atol=1e-5, rtol=1e-6)


def test_cu_seqlens_from_position_ids():
    pos = torch.tensor([[3, 4, 0, 1, 2, 0, 0, 1]])  # first segment does not start at 0 (truncated pack)
    assert torch.equal(cu_seqlens_from_position_ids(pos), torch.tensor([0, 2, 5, 6, 8]))
    assert torch.equal(cu_seqlens_from_position_ids(torch.arange(6)), torch.tensor([0, 6]))


@pytest.mark.parametrize(
    "cu, match",
    [
        (torch.tensor([1, 4, 6]), "start at 0"),
        (torch.tensor([0, 4, 5]), "end at N"),
        (torch.tensor([0, 5, 3, 6]), "non-decreasing"),
        (torch.tensor([0.0, 6.0]), "integer"),
    ],
)
def test_reduce_packed_rejects_bad_cu_seqlens(cu, match):
    with pytest.raises(ValueError, match=match):
        reduce_packed(torch.randn(6), torch.ones(6, dtype=torch.bool), cu_seqlens=cu)


def test_reduce_packed_needs_exactly_one_boundary_kind():
    x, m = torch.randn(4), torch.ones(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="exactly one"):
        reduce_packed(x, m)
    with pytest.raises(ValueError, match="exactly one"):
        reduce_packed(x, m, cu_seqlens=torch.tensor([0, 4]), position_ids=torch.arange(4))


# ---------------------------------------------------------------- layouts


def test_split_pair_and_group_by_prompt():
    b, k = 3, 4
    x = torch.randn(b * k, 5)
    g = group_by_prompt(x, k)  # prompt-major: row b*K + j
    gs = group_by_prompt(x, k, order="sample_major")  # row j*B + b
    for i in range(b):
        for j in range(k):
            assert torch.equal(g[i, j], x[i * k + j])
            assert torch.equal(gs[i, j], x[j * b + i])
    c, r = split_pair(x[:6])
    assert torch.equal(c, x[:3]) and torch.equal(r, x[3:6])
    # the concatenated [chosen; rejected] batch is the K = 2 sample-major case
    assert torch.equal(group_by_prompt(x[:6], 2, order="sample_major")[:, 1], r)
    with pytest.raises(ValueError, match="even"):
        split_pair(torch.randn(5))
    with pytest.raises(ValueError, match="multiple"):
        group_by_prompt(torch.randn(7), 2)
    with pytest.raises(ValueError, match="prompt_major"):
        group_by_prompt(x, k, order="rows")


# ---------------------------------------------------------------- LD-DPO (Liu et al. 2024)


def _ref_ld(x, m, shared_len, alpha):
    """Walk the completion: the first `shared_len` counted tokens get weight 1, later ones `alpha`."""
    total = 0.0 * x.double().sum()
    pos = 0
    for v, keep in zip(x.double(), m):
        if keep:
            pos += 1
            total = total + (v if pos <= shared_len else alpha * v)
    return total


@pytest.mark.parametrize("alpha", [0.0, 0.37, 1.0])
def test_ld_dpo_logps(alpha):
    b, tc, tr = 5, 11, 8  # different padded lengths for the two halves
    xc = torch.randn(b, tc, requires_grad=True)
    xr = torch.randn(b, tr, requires_grad=True)
    mc = _random_mask((b, tc), empty_rows=(2,))  # holes inside completions + one empty completion
    mr = _random_mask((b, tr))
    oc, orj = ld_dpo_logps(xc, xr, chosen_mask=mc, rejected_mask=mr, ld_alpha=alpha)
    xcd, xrd = xc.detach().double().requires_grad_(True), xr.detach().double().requires_grad_(True)
    ref_c, ref_r = [], []
    for i in range(b):
        lp = min(int(mc[i].sum()), int(mr[i].sum()))
        ref_c.append(_ref_ld(xcd[i], mc[i], lp, alpha))
        ref_r.append(_ref_ld(xrd[i], mr[i], lp, alpha))
    ref_c, ref_r = torch.stack(ref_c), torch.stack(ref_r)
    assert_close("chosen", ref_c, oc, atol=1e-5, rtol=1e-6)
    assert_close("rejected", ref_r, orj, atol=1e-5, rtol=1e-6)
    if alpha == 1.0:
        assert_close("alpha=1 is the plain sum", _ref_reduce_rows(xcd, mc)[0], oc, atol=1e-5)
    gc, gr = torch.randn(b), torch.randn(b)
    d = torch.autograd.grad((oc * gc).sum() + (orj * gr).sum(), (xc, xr))
    d_ref = torch.autograd.grad((ref_c * gc.double()).sum() + (ref_r * gr.double()).sum(), (xcd, xrd))
    assert_close("d chosen", d_ref[0], d[0], atol=1e-6)
    assert_close("d rejected", d_ref[1], d[1], atol=1e-6)
    with pytest.raises(ValueError, match="ld_alpha"):
        ld_dpo_logps(xc, xr, chosen_mask=mc, rejected_mask=mr, ld_alpha=1.5)


def test_wpo_log_weights():
    x = -torch.rand(4, 9) * 5
    lssp = -torch.rand(4, 9) * 3  # log Σ p² ∈ [-log V, 0]
    m = _random_mask((4, 9), empty_rows=(3,))
    x.requires_grad_(True)
    w = wpo_log_weights(x, lssp, m)
    _, _, ref = _ref_reduce_rows(x.detach().double() - lssp.double(), m)
    assert_close("w_bar", ref, w, atol=1e-6)
    assert not w.requires_grad


# ---------------------------------------------------------------- hidden -> sequence log-probs


def _ref_seq_logprobs(h, w, labels, bias, *, temperature=1.0, softcap=None, loss_mask=None, shift=True):
    """Full-logits float64 reference: log_softmax, gather the next token, masked sums."""
    z = ref_logits(h, w, bias, temperature=temperature, softcap=softcap)
    keep = labels != -100
    if loss_mask is not None:
        keep = keep & loss_mask.bool()
    if shift:
        z, tgt, keep = z[:, :-1], labels[:, 1:], keep[:, 1:]
    else:
        tgt = labels
    tok, _ = gather_logps(z, tgt, keep)
    s = tok.sum(-1)
    n = keep.sum(-1)
    return s, n, s / n.clamp(min=1).double(), tok


def _labels(b, t, v, *, prompt_max=4):
    """Token ids with -100 on a random prompt and on right padding (rows may have no completion token)."""
    return prompt_labels(b, t, v, generator(int(torch.randint(0, 2**31, ()))), prompt_max=prompt_max)


@pytest.mark.parametrize(
    "shift, use_bias, temperature, softcap, use_mask",
    [
        pytest.param(True, False, 1.0, None, False, id="shift"),
        pytest.param(True, True, 0.7, 3.0, True, id="shift-bias-temp-softcap-mask"),
        pytest.param(False, True, 1.3, None, False, id="noshift-bias-temp"),
    ],
)
def test_sequence_logprobs_padded(shift, use_bias, temperature, softcap, use_mask):
    b, t, h_dim, v = 3, 11, 20, 37  # odd sizes
    h = torch.randn(b, t, h_dim, requires_grad=True)
    w = (torch.randn(v, h_dim) * 0.5).requires_grad_(True)
    bias = (torch.randn(v) * 0.3).requires_grad_(True) if use_bias else None
    labels = _labels(b, t, v)
    loss_mask = _random_mask((b, t), p=0.8) if use_mask else None
    out = sequence_logprobs(
        h,
        w,
        labels,
        bias=bias,
        temperature=temperature,
        softcap=softcap,
        loss_mask=loss_mask,
        shift=shift,
        return_per_token=True,
    )
    leaves = [h, w] + ([bias] if use_bias else [])
    leaves_ref = [x.detach().double().requires_grad_(True) for x in leaves]
    s, n, a, tok = _ref_seq_logprobs(
        leaves_ref[0],
        leaves_ref[1],
        labels,
        leaves_ref[2] if use_bias else None,
        temperature=temperature,
        softcap=softcap,
        loss_mask=loss_mask,
        shift=shift,
    )
    assert out.per_token.shape == (b, t - 1 if shift else t) and out.per_token.dtype == torch.float32
    assert torch.equal(out.counts, n)
    assert_close("sums", s, out.sums, atol=2e-5, rtol=1e-5)
    assert_close("means", a, out.means, atol=2e-5, rtol=1e-5)
    assert_close("per_token", tok, out.per_token, atol=2e-5, rtol=1e-5)
    assert bool((out.per_token[tok == 0] == 0).all())
    g_s, g_a, g_t = torch.randn(b), torch.randn(b), torch.randn(tok.shape)
    obj = (out.sums * g_s).sum() + (out.means * g_a).sum() + (out.per_token * g_t).sum()
    obj_ref = (s * g_s.double()).sum() + (a * g_a.double()).sum() + (tok * g_t.double()).sum()
    grads = torch.autograd.grad(obj, leaves)
    grads_ref = torch.autograd.grad(obj_ref, leaves_ref)
    for name, gr, go in zip(("hidden", "weight", "bias"), grads_ref, grads):
        assert_close(f"d {name}", gr, go, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("use_position_ids", [False, True], ids=["cu_seqlens", "position_ids"])
def test_sequence_logprobs_packed_matches_separate_sequences(use_position_ids):
    """A packed row must give, per segment, exactly what each sequence gives on its own (no prediction
    across a boundary), including a 1-token segment that has nothing to predict."""
    lengths = [6, 1, 9, 5]
    cu = _segments(lengths)
    n, h_dim, v = int(cu[-1]), 16, 29
    h = torch.randn(1, n, h_dim, requires_grad=True)
    w = torch.randn(v, h_dim, requires_grad=True)
    labels = torch.cat(
        [_labels(1, k, v, prompt_max=min(2, k)) if k > 1 else torch.randint(0, v, (1, 1)) for k in lengths],
        dim=1,
    )
    kw = (
        {"position_ids": torch.cat([torch.arange(k) for k in lengths])[None]}
        if use_position_ids
        else {"cu_seqlens": cu}
    )
    out = sequence_logprobs(h, w, labels, return_per_token=True, **kw)
    hd, wd = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    s_ref, n_ref, tok_ref = [], [], []
    for i in range(len(lengths)):
        a, b = int(cu[i]), int(cu[i + 1])
        s, cnt, _, tok = _ref_seq_logprobs(hd[:, a:b], wd, labels[:, a:b], None)
        s_ref.append(s[0])
        n_ref.append(int(cnt[0]))
        tok_ref.append(torch.cat([tok[0], torch.zeros(1, dtype=torch.float64)]))  # boundary position -> 0
    s_ref = torch.stack(s_ref)
    tok_ref = torch.cat(tok_ref)[:-1].unsqueeze(0)
    assert torch.equal(out.counts, torch.tensor(n_ref))
    assert_close("sums", s_ref, out.sums, atol=2e-5, rtol=1e-5)
    assert_close("per_token", tok_ref, out.per_token, atol=2e-5, rtol=1e-5)
    g = torch.randn(len(lengths))
    d = torch.autograd.grad((out.sums * g).sum(), (h, w))
    d_ref = torch.autograd.grad((s_ref * g.double()).sum(), (hd, wd))
    assert_close("d hidden", d_ref[0], d[0], atol=5e-5, rtol=1e-4)
    assert_close("d weight", d_ref[1], d[1], atol=5e-5, rtol=1e-4)


def test_sequence_logprobs_packed_1d_is_one_row():
    """A 1-D packed row ([N] labels, [N, H] hidden) equals the [1, N] call."""
    n, h_dim, v = 17, 8, 13
    h, w = torch.randn(n, h_dim), torch.randn(v, h_dim)
    labels = _labels(1, n, v, prompt_max=2)[0]
    pos = torch.cat([torch.arange(10), torch.arange(7)])
    one = sequence_logprobs(h, w, labels, position_ids=pos, return_per_token=True)
    two = sequence_logprobs(h[None], w, labels[None], position_ids=pos[None], return_per_token=True)
    assert one.per_token.shape == (n - 1,) and one.sums.shape == (2,)
    assert torch.equal(one.sums, two.sums) and torch.equal(one.per_token, two.per_token[0])


def test_sequence_logprobs_bf16_hidden():
    """bf16 hidden/weight: float32 accumulation must be at least as accurate as the ordinary bf16 path."""
    from _assert import assert_close_lowp

    b, t, h_dim, v = 2, 9, 24, 41
    h = torch.randn(b, t, h_dim).bfloat16()
    w = torch.randn(v, h_dim).bfloat16()
    labels = _labels(b, t, v)
    out = sequence_logprobs(h, w, labels)
    s64, _, _, _ = _ref_seq_logprobs(h, w, labels, None)  # float64 truth on the bf16 values
    logp_bf16 = torch.log_softmax(h @ w.T, dim=-1)[:, :-1]  # what a user would write in bf16
    keep = labels[:, 1:] != -100
    tok = logp_bf16.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    base = torch.where(keep, tok, torch.zeros((), dtype=tok.dtype)).float().sum(-1)
    assert out.sums.dtype == torch.float32
    assert_close_lowp("sums", s64, out.sums, base)


def test_sequence_logprobs_input_errors():
    h, w = torch.randn(2, 5, 4), torch.randn(7, 4)
    lab = torch.randint(0, 7, (2, 5))
    with pytest.raises(TypeError, match="labels"):
        sequence_logprobs(h, w, lab.float())
    with pytest.raises(ValueError, match="hidden"):
        sequence_logprobs(h[:, :4], w, lab)
    with pytest.raises(ValueError, match="one row"):
        sequence_logprobs(h, w, lab, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="loss_mask"):
        sequence_logprobs(h, w, lab, loss_mask=torch.ones(2, 4))
