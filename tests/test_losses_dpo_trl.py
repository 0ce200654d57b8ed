"""DPO family against TRL 1.16 ``DPOTrainer._compute_loss`` itself, run on the same random per-token
log-probs through a stub model (no download), and end to end from hidden states against full-logits
float64 PyTorch feeding the float64 reference of test_losses_dpo.py."""

from __future__ import annotations

import re
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from _assert import assert_close
from _inputs import (
    Accelerator,
    completion_mask,
    gather_logps,
    generator,
    prompt_labels,
    ref_logits,
    trl_class,
)
from test_losses_dpo import DEFAULTS, ref_losses

from alignops.losses import TRL_DPO_LOSS_TYPES, dpo_loss
from alignops.sequence import ld_dpo_logps, reduce_padded, sequence_logprobs, split_pair, wpo_log_weights

# TRL's own list of DPOTrainer loss types, read from DPOConfig's help text (independent of ours)
TRL_TYPES = re.findall(
    r"`'(\w+)'`", trl_class("trl.DPOConfig").__dataclass_fields__["loss_type"].metadata["help"]
)


def test_trl_loss_types_are_ours():
    assert len(TRL_TYPES) >= 15 and tuple(TRL_TYPES) == TRL_DPO_LOSS_TYPES


class _StubLM:
    """Stands in for a TRL-patched causal LM: `model(..., fused_lm_head=True)` returns given per-token
    log-probs ([2B, T-1], zero where the label is -100, as the fused head does)."""

    training = True
    is_gradient_checkpointing = False

    def __init__(self, log_probs, log_sum_sq_probs=None):
        self.log_probs = log_probs
        self.log_sum_sq_probs = log_sum_sq_probs

    def __call__(self, **kwargs):
        assert kwargs["fused_lm_head"]
        z = torch.zeros_like(self.log_probs.detach())
        return SimpleNamespace(
            log_probs=self.log_probs,
            entropy=z,
            mean_logits=z,
            is_top1=z.bool(),
            log_sum_sq_probs=self.log_sum_sq_probs,
            aux_loss=None,
        )


def _trl_dpo(per_token, ref_per_token, cm, *, loss_types, loss_weights=None, log_sum_sq_probs=None, **cfg):
    """TRL 1.16 `DPOTrainer._compute_loss`, unbound, on a stub `self` holding the config fields."""
    cfg = {**DEFAULTS, "ld_alpha": None, "use_weighting": False, **cfg}
    stub = SimpleNamespace(
        model=_StubLM(per_token, log_sum_sq_probs),
        ref_model=_StubLM(ref_per_token),
        accelerator=Accelerator(),
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        loss_types=list(loss_types),
        loss_weights=list(loss_weights) if loss_weights else [1.0] * len(loss_types),
        beta=cfg["beta"],
        label_smoothing=cfg["label_smoothing"],
        f_divergence_type=cfg["f_divergence_type"],
        f_alpha_divergence_coef=cfg["f_alpha_divergence_coef"],
        ld_alpha=cfg["ld_alpha"],
        use_weighting=cfg["use_weighting"],
        args=SimpleNamespace(discopop_tau=cfg["discopop_tau"], gradient_checkpointing_kwargs=None),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    n, t = cm.shape
    inputs = {
        "input_ids": torch.randint(0, 50, (n, t), generator=generator(0)),
        "attention_mask": torch.ones(n, t, dtype=torch.long),
        "completion_mask": cm,
    }
    loss = trl_class("trl.trainer.dpo_trainer.DPOTrainer")._compute_loss(stub, stub.model, inputs, False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


_SMOOTHED = ("robust", "aot", "exo_pair")
TRL_CASES = [
    pytest.param([t], {"label_smoothing": 0.1 if t in _SMOOTHED else 0.0}, id=t)
    for t in TRL_TYPES
    if t != "sft"
]
TRL_CASES += [
    pytest.param(["sigmoid", "sft"], {"loss_weights": [1.0, 0.6]}, id="rpo"),
    pytest.param(["sigmoid", "bco_pair", "sft"], {"loss_weights": [0.8, 0.2, 1.0]}, id="mpo"),
    pytest.param(["sigmoid"], {"f_divergence_type": "forward_kl"}, id="fkl-sigmoid"),
    pytest.param(["sigmoid"], {"f_divergence_type": "js_divergence"}, id="js-sigmoid"),
    pytest.param(
        ["ipo"], {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}, id="alpha-ipo"
    ),
    pytest.param(["discopop"], {"f_divergence_type": "alpha_divergence"}, id="alpha-discopop"),
    pytest.param(
        ["sigmoid_norm", "hinge"], {"f_divergence_type": "js_divergence", "beta": 0.5}, id="js-norm-hinge"
    ),
    pytest.param(["sigmoid"], {"ld_alpha": 0.5}, id="ld-sigmoid"),
    pytest.param(["ipo", "apo_zero"], {"ld_alpha": 0.0}, id="ld0-ipo-apo"),
    pytest.param(["sigmoid"], {"use_weighting": True}, id="wpo-sigmoid"),
    pytest.param(
        ["robust", "nca_pair"], {"use_weighting": True, "label_smoothing": 0.2}, id="wpo-robust-nca"
    ),
    pytest.param(["sigmoid"], {"ld_alpha": 0.3, "use_weighting": True, "beta": 0.3}, id="ld-wpo"),
]


@pytest.mark.parametrize("types, opts", TRL_CASES)
def test_matches_trl_dpo_trainer(types, opts):
    """Same random per-token log-probs into TRL 1.16 and into alignops (sequence reductions, LD-DPO split, WPO
    weights, dpo_loss): equal loss, metrics and gradient w.r.t. the policy per-token log-probs."""
    b, t = 5, 10  # 5 pairs, padded length 10 (9 scored positions)
    g = generator(40)
    cm = completion_mask(2 * b, t, g)
    cm[0, 2:] = 1  # at least one chosen token in the micro-batch (TRL's sft mean needs one)
    cm[b + 1] = 0  # an empty rejected completion
    mask = cm[:, 1:].bool()
    per_token = (torch.randn(2 * b, t - 1, generator=g) * 2 - 1) * mask
    ref_per_token = per_token + torch.randn(2 * b, t - 1, generator=g) * 0.7 * mask
    lssp = -torch.rand(2 * b, t - 1, generator=g) * 2 * mask if opts.get("use_weighting") else None

    p_trl = per_token.clone().requires_grad_(True)
    trl_loss, trl_metrics = _trl_dpo(
        p_trl, ref_per_token, cm, loss_types=types, log_sum_sq_probs=lssp, **opts
    )
    (g_trl,) = torch.autograd.grad(trl_loss, p_trl)

    p = per_token.clone().requires_grad_(True)
    plain = reduce_padded(p, mask)
    ld_alpha = opts.get("ld_alpha")
    mc, mr = split_pair(mask)
    if ld_alpha is None:
        pc, pr = split_pair(plain.sums)
        rc, rr = split_pair(reduce_padded(ref_per_token, mask).sums)
    else:
        pc, pr = ld_dpo_logps(*split_pair(p), chosen_mask=mc, rejected_mask=mr, ld_alpha=ld_alpha)
        rc, rr = ld_dpo_logps(*split_pair(ref_per_token), chosen_mask=mc, rejected_mask=mr, ld_alpha=ld_alpha)
    nw, nl = split_pair(plain.counts)
    sums_c, _ = split_pair(plain.sums)
    kw = {k: v for k, v in opts.items() if k != "ld_alpha"}
    if opts.get("use_weighting"):
        kw["wpo_logw"] = split_pair(wpo_log_weights(p, lssp, mask))
    nll = -(sums_c.sum() / nw.sum().clamp(min=1))
    out = dpo_loss(
        pc, pr, rc, rr, loss_type=types, chosen_lengths=nw, rejected_lengths=nl, chosen_nll=nll, **kw
    )
    (g_ours,) = torch.autograd.grad(out.loss, p)

    assert_close("loss vs TRL", trl_loss.detach(), out.loss, atol=1e-5, rtol=1e-5)
    # TRL's fused head writes constant zeros at masked positions (masked_scatter), so only the gradient on
    # counted positions is meaningful there; ours must be exactly 0 elsewhere.
    assert_close("grad vs TRL", g_trl * mask, g_ours, atol=1e-6, rtol=1e-4)
    assert bool((g_ours[~mask] == 0).all())
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert_close(
            k, torch.tensor(trl_metrics[k], dtype=torch.float64), out.metrics[k], atol=1e-5, rtol=1e-5
        )
    for k in ("logps/chosen", "logps/rejected"):
        assert_close(
            k, torch.tensor(trl_metrics[k], dtype=torch.float64), out.metrics[k], atol=1e-5, rtol=1e-5
        )


# ================================================================ end to end: hidden -> loss


@pytest.mark.parametrize(
    "types, weights",
    [
        pytest.param(["sigmoid"], None, id="sigmoid"),
        pytest.param(["ipo"], None, id="ipo"),
        pytest.param(["sigmoid", "sft"], [1.0, 0.5], id="rpo"),
    ],
)
def test_end_to_end_hidden_to_loss(types, weights):
    """hidden -> sequence_logprobs -> split_pair -> dpo_loss equals full-logits float64 PyTorch
    (h @ W.T, log_softmax, gather, masked sums) -> the reference formula; values and grads w.r.t. hidden
    and weight."""
    b, t, h_dim, v = 2, 9, 12, 23
    g = generator(41)
    h = torch.randn(2 * b, t, h_dim, generator=g).requires_grad_(True)
    w = (torch.randn(v, h_dim, generator=g) * 0.4).requires_grad_(True)
    h_ref_model = h.detach() + 0.3 * torch.randn(h.shape, generator=g)  # the reference model's own states
    w_ref_model = w.detach() + 0.1 * torch.randn(w.shape, generator=g)
    labels = prompt_labels(2 * b, t, v, g, min_len=1)

    out = sequence_logprobs(h, w, labels)
    with torch.no_grad():
        ref_out = sequence_logprobs(h_ref_model, w_ref_model, labels)
    pc, pr = split_pair(out.sums)
    rc, rr = split_pair(ref_out.sums)
    nw, nl = split_pair(out.counts)
    res = dpo_loss(
        pc,
        pr,
        rc,
        rr,
        loss_type=types,
        loss_weights=weights,
        beta=0.5,
        chosen_lengths=nw,
        rejected_lengths=nl,
        chosen_nll=-(pc.sum() / nw.sum().clamp(min=1)),
    )

    def seq_sums_64(hh, ww):
        tok, _ = gather_logps(ref_logits(hh, ww)[:, :-1], labels[:, 1:])
        return tok.sum(-1), (labels[:, 1:] != -100).sum(-1)

    hd, wd = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    s, n = seq_sums_64(hd, wd)
    s_ref, _ = seq_sums_64(h_ref_model, w_ref_model)
    ex = {"chosen_nll": -(s[:b].sum() / n[:b].sum())}
    args = (s[:b], s[b:], s_ref[:b], s_ref[b:], n[:b].double(), n[b:].double(), ex, {**DEFAULTS, "beta": 0.5})
    ref_l, ref_loss = ref_losses(types, weights or [1.0], *args)
    assert_close("loss", ref_loss, res.loss, atol=1e-5, rtol=1e-5)
    up = torch.randn(b, generator=g)
    grads = torch.autograd.grad((res.losses * up).sum(), (h, w))
    grads_ref = torch.autograd.grad((ref_l * up.double()).sum(), (hd, wd))
    assert_close("d hidden", grads_ref[0], grads[0], atol=2e-6, rtol=1e-4)
    assert_close("d weight", grads_ref[1], grads[1], atol=2e-6, rtol=1e-4)
