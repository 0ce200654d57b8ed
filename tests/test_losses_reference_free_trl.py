"""Reference-free preference losses against TRL 1.16's own loss code (``CPOTrainer``,
``ORPOTrainer``, ``TPOTrainer`` in ``trl.experimental``), on the same random logits: the trainer
method is called on an instance built without ``__init__``, carrying only the config fields it reads;
the "model" is a stub returning the logits. Our side reduces the same logits to sequence log-probs.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace as NS

import pytest
import torch
import torch.nn.functional as F
from _assert import assert_close
from _inputs import trl_trainer

from alignops.losses import cpo_loss, orpo_loss, tpo_loss


def _trl(cls_path, **fields):
    return trl_trainer(cls_path, is_encoder_decoder=False, **fields)


def _pair_batch(b=5, t=11, v=13, seed=0):
    """TRL CPO/ORPO batch: prompt tokens and right padding carry label -100."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for side in ("chosen", "rejected"):
        ids = torch.randint(0, v, (b, t), generator=g)
        attn = torch.ones(b, t, dtype=torch.long)
        labels = ids.clone()
        for i in range(b):
            p = int(torch.randint(1, 4, (), generator=g))
            pad = int(torch.randint(0, 4, (), generator=g))
            labels[i, :p] = -100
            if pad:
                labels[i, t - pad :] = -100
                attn[i, t - pad :] = 0
        out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attn, f"{side}_labels": labels})
    logits = (2 * torch.randn(2 * b, t, v, generator=g)).requires_grad_(True)
    return out, logits


def _seq_logps(logits, labels):
    """Summed completion log-probs and counts from logits (causal shift, label -100 ignored)."""
    lb = labels[:, 1:]
    keep = lb != -100
    tok = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, lb.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (tok * keep).sum(-1), keep.sum(-1)


def _ours_from_logits(batch, logits):
    labels = torch.cat((batch["chosen_labels"], batch["rejected_labels"]))
    s, n = _seq_logps(logits, labels)
    b = batch["chosen_labels"].shape[0]
    return s[:b], s[b:], n[:b], n[b:]


@pytest.mark.parametrize(
    "kind,eps,cpo_alpha,alpha",
    [
        ("sigmoid", 0.0, 1.0, 0.0),
        ("sigmoid", 0.1, 0.5, 0.0),
        ("hinge", 0.0, 1.0, 0.0),
        ("ipo", 0.0, 1.0, 0.0),
        ("simpo", 0.2, 0.0, 0.0),
        ("simpo", 0.0, 1.0, 0.3),
        ("sigmoid", 0.0, 0.0, 0.1),
    ],
)
def test_cpo_matches_trl(kind, eps, cpo_alpha, alpha):
    batch, logits = _pair_batch()
    beta = 0.7
    trainer = _trl(
        "trl.experimental.cpo.CPOTrainer",
        pad_token_id=0,
        cpo_alpha=cpo_alpha,
        loss_type=kind,
        beta=beta,
        label_smoothing=eps,
        simpo_gamma=0.3,
        alpha=alpha,
    )
    model = lambda *a, **k: NS(logits=logits)  # noqa: E731
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(model, batch)
    sw, sl, nw, nl = _ours_from_logits(batch, logits)
    out = cpo_loss(
        sw,
        sl,
        chosen_lengths=nw,
        rejected_lengths=nl,
        beta=beta,
        loss_type=kind,
        label_smoothing=eps,
        cpo_alpha=cpo_alpha,
        simpo_gamma=0.3,
        alpha=alpha,
    )
    assert_close("cpo-vs-trl/loss", trl_loss.detach(), out.loss, atol=2e-6, rtol=2e-6)
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
    ):
        assert_close(
            f"cpo-vs-trl/{key}", torch.tensor(trl_metrics[key]), out.metrics[key], atol=1e-5, rtol=1e-5
        )
    if cpo_alpha:
        assert_close(
            "cpo-vs-trl/nll",
            torch.tensor(trl_metrics["nll_loss"]),
            out.metrics["nll_loss"],
            atol=1e-5,
            rtol=1e-5,
        )
    g = torch.randn(())
    (g_trl,) = torch.autograd.grad(trl_loss * g, logits)
    (g_ours,) = torch.autograd.grad(out.loss * g, logits)
    assert_close("cpo-vs-trl/grad", g_trl, g_ours, atol=1e-6, rtol=1e-5)


def test_cpo_loss_method_matches_trl_on_extreme_alpha_free_margins():
    """TRL's unbound ``cpo_loss`` on per-pair log-probs with |β·margin| up to ~1e3."""
    trainer = _trl(
        "trl.experimental.cpo.CPOTrainer", beta=0.1, loss_type="sigmoid", label_smoothing=0.0, alpha=0.0
    )
    sw = torch.tensor([-1.0, -1e4, -30.0, -500.0], requires_grad=True)
    sl = torch.tensor([-1e4, -1.0, -31.0, -499.0], requires_grad=True)
    trl_losses, trl_cr, _ = trainer.cpo_loss(sw, sl)
    out = cpo_loss(sw, sl, cpo_alpha=0.0)
    assert_close("cpo-method/losses", trl_losses.detach(), out.losses, atol=1e-5, rtol=1e-6)
    assert_close("cpo-method/rewards", trl_cr.mean(), out.metrics["rewards/chosen"], atol=1e-5, rtol=1e-6)


def test_orpo_matches_trl():
    batch, logits = _pair_batch(seed=1)
    trainer = _trl("trl.experimental.orpo.ORPOTrainer", padding_value=0, beta=0.25)
    model = lambda *a, **k: NS(logits=logits)  # noqa: E731
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(model, batch)
    sw, sl, nw, nl = _ours_from_logits(batch, logits)
    # TRL's ORPO NLL runs over prompt + completion tokens of the chosen rows (attention mask);
    # compute that cross-entropy ourselves and pass it in.
    b = sw.shape[0]
    ids = batch["chosen_input_ids"]
    nll_labels = torch.where(batch["chosen_attention_mask"] == 1, ids, -100)[:, 1:]
    nll = F.cross_entropy(
        logits[:b, :-1].reshape(-1, logits.shape[-1]), nll_labels.reshape(-1), ignore_index=-100
    )
    out = orpo_loss(sw, sl, chosen_lengths=nw, rejected_lengths=nl, beta=0.25, nll_loss=nll)
    assert_close("orpo-vs-trl/loss", trl_loss.detach(), out.loss, atol=2e-6, rtol=2e-6)
    for key in (
        "rewards/chosen",
        "rewards/margins",
        "rewards/accuracies",
        "log_odds_ratio",
        "log_odds_chosen",
        "nll_loss",
    ):
        assert_close(
            f"orpo-vs-trl/{key}", torch.tensor(trl_metrics[key]), out.metrics[key], atol=1e-5, rtol=1e-5
        )
    g = torch.randn(())
    (g_trl,) = torch.autograd.grad(trl_loss * g, logits)
    (g_ours,) = torch.autograd.grad(out.loss * g, logits)
    assert_close("orpo-vs-trl/grad", g_trl, g_ours, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "kind,eps,tpo_alpha",
    [
        ("sigmoid", 0.1, 1.0),
        ("hinge", 0.0, 0.5),
        ("ipo", 0.0, 1.0),
        ("tpo-l", 0.0, 1.0),
        ("sigmoid", 0.0, 0.0),
    ],
)
def test_tpo_matches_trl(kind, eps, tpo_alpha):
    g = torch.Generator().manual_seed(2)
    n_br = 3 if tpo_alpha else 2
    b, t, v = 4, 10, 9
    ids = torch.randint(0, v, (n_br * b, t), generator=g)
    attn = torch.ones_like(ids)
    comp = torch.zeros_like(ids)
    for i in range(n_br * b):
        p = int(torch.randint(1, 4, (), generator=g))
        pad = int(torch.randint(0, 3, (), generator=g))
        comp[i, p : t - pad] = 1
        if pad:
            attn[i, t - pad :] = 0
    logits = torch.randn(n_br * b, t, v, generator=g).requires_grad_(True)
    beta = 0.5
    trainer = _trl(
        "trl.experimental.tpo.TPOTrainer",
        tpo_alpha=tpo_alpha,
        loss_type=kind,
        beta=beta,
        label_smoothing=eps,
        tpo_l_gamma=0.4,
        model=NS(training=True),
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    model = lambda **k: NS(logits=logits)  # noqa: E731
    trl_loss = trainer._compute_loss(
        model, {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}, False
    )
    labels = torch.where(comp == 1, ids, -100)
    s, n = _seq_logps(logits, labels)
    gold = (s[2 * b :], n[2 * b :]) if tpo_alpha else (None, None)
    out = tpo_loss(
        s[:b],
        s[b : 2 * b],
        gold[0],
        chosen_lengths=n[:b],
        rejected_lengths=n[b : 2 * b],
        gold_lengths=gold[1],
        beta=beta,
        loss_type=kind,
        label_smoothing=eps,
        tpo_l_gamma=0.4,
        tpo_alpha=tpo_alpha,
    )
    assert_close("tpo-vs-trl/loss", trl_loss.detach(), out.loss, atol=2e-6, rtol=2e-6)
    m = trainer._metrics["train"]
    for key in ("rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert_close(f"tpo-vs-trl/{key}", torch.tensor(m[key][-1]), out.metrics[key], atol=1e-5, rtol=1e-5)
    up = torch.randn(())
    (g_trl,) = torch.autograd.grad(trl_loss * up, logits)
    (g_ours,) = torch.autograd.grad(out.loss * up, logits)
    assert_close("tpo-vs-trl/grad", g_trl, g_ours, atol=1e-6, rtol=1e-5)
