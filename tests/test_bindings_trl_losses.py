"""``enable(losses=True)``: DPOTrainer / GRPOTrainer / KTOTrainer compute their loss with alignops' catalog.

A few SGD steps (fp32, tiny Llama) with TRL's loss and with alignops' (``dpo_loss`` / ``grpo_loss`` /
``kto_loss`` on the log-probs TRL computed): the logged per-step losses agree within 1e-5 relative + 1e-6
absolute, the logged gradient norms within 1e-5 relative, alignops' loss ran once per
micro-batch; an option alignops' loss lacks is refused by name.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("trl")

from alignops.bench.trl_trainers import run_trainer  # noqa: E402
from alignops.bindings import trl as binding  # noqa: E402

from tests._assert import assert_close  # noqa: E402
from tests._trl_runs import trainer_run  # noqa: E402


@pytest.fixture(autouse=True)
def _switch_off():
    binding.disable()
    yield
    binding.disable()


def _with_losses(kind: str, steps: int = 3, **config) -> tuple[dict, binding.LossCalls]:
    binding.enable(losses=True)  # run_trainer's own enable() keeps it; it disables at the end
    with binding.count_loss_calls() as calls:
        got = run_trainer(kind, True, steps=steps, **config)
    return got, calls


def _assert_same_training(want: dict, got: dict) -> None:
    assert len(got["losses"]) == len(want["losses"]) > 0
    assert_close("losses", torch.tensor(want["losses"]), torch.tensor(got["losses"]), atol=1e-6, rtol=1e-5)
    assert_close(
        "grad norms", torch.tensor(want["grad_norms"]), torch.tensor(got["grad_norms"]), atol=0, rtol=1e-5
    )


@pytest.mark.parametrize("kind", ["dpo", "grpo", "kto"])
def test_default_loss_matches_trl(kind):
    from trl import DPOTrainer, GRPOTrainer, KTOTrainer

    trainers = (DPOTrainer, GRPOTrainer, KTOTrainer)
    originals = [t._compute_loss for t in trainers]
    want = trainer_run(kind, False)  # TRL's head and TRL's loss
    got, calls = _with_losses(kind)
    _assert_same_training(want, got)
    assert getattr(calls, kind) >= 3 and got["trl_calls"] == 0
    assert not binding.is_enabled()
    assert [t._compute_loss for t in trainers] == originals  # disable() restored them


@pytest.mark.parametrize(
    "config",
    [
        dict(loss_type=["ipo"], beta=0.3),
        # TRL 1.16 multiplies the per-pair loss by the WPO weight in place, which fails for "sft"
        # (an expanded tensor) and "hinge" (a relu output autograd saved): WPO with "sigmoid" only
        dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
        dict(loss_type=["sigmoid"], use_weighting=True),
        dict(loss_type=["robust"], label_smoothing=0.2, f_divergence_type="js_divergence"),
    ],
    ids=["ipo", "rpo", "wpo", "robust-js"],
)
def test_dpo_variants_match_trl(config):
    want = run_trainer("dpo", False, steps=2, **config)
    got, calls = _with_losses("dpo", steps=2, **config)
    _assert_same_training(want, got)
    assert calls.dpo == 2


@pytest.mark.parametrize(
    "config",
    [dict(loss_type="apo_zero_unpaired"), dict(beta=0.3, desirable_weight=1.3, undesirable_weight=0.7)],
    ids=["apo_zero_unpaired", "weights"],
)
def test_kto_variants_match_trl(config):
    want = run_trainer("kto", False, steps=2, **config)
    got, calls = _with_losses("kto", steps=2, **config)
    _assert_same_training(want, got)
    assert calls.kto == 2


GRPO_CONFIGS = [
    dict(loss_type="grpo"),
    dict(loss_type="bnpo"),
    dict(loss_type="dr_grpo"),
    dict(loss_type="cispo"),
    dict(loss_type="sapo"),
    dict(loss_type="luspo", importance_sampling_level="sequence"),
    dict(loss_type="grpo", importance_sampling_level="sequence", delta=1.5),  # GSPO, two-sided clip
    dict(loss_type="dapo", gradient_accumulation_steps=2),  # num_items over the accumulation window
    dict(loss_type="grpo", gradient_accumulation_steps=2),
]


@pytest.mark.parametrize(
    "config", GRPO_CONFIGS, ids=["-".join(f"{k}={v}" for k, v in c.items()) for c in GRPO_CONFIGS]
)
def test_grpo_configs_match_trl(config):
    want = run_trainer("grpo", False, steps=2, **config)
    got, calls = _with_losses("grpo", steps=2, **config)
    _assert_same_training(want, got)
    assert calls.grpo >= 2 * config.get("gradient_accumulation_steps", 1)


def test_the_loss_trained_on_is_alignops(monkeypatch):
    """A control: doubling alignops' ``dpo_loss`` doubles the logged loss (TRL's is discarded)."""
    import alignops.losses as losses

    want = run_trainer("dpo", False, steps=1)
    dpo_loss = losses.dpo_loss

    def doubled(*args, **kwargs):
        out = dpo_loss(*args, **kwargs)
        return (
            out._replace(loss=2 * out.loss) if hasattr(out, "_replace") else type(out)(2 * out.loss, *out[1:])
        )

    monkeypatch.setattr(losses, "dpo_loss", doubled)
    got, calls = _with_losses("dpo", steps=1)
    assert calls.dpo == 1
    assert_close(
        "doubled loss", 2 * torch.tensor(want["losses"]), torch.tensor(got["losses"]), atol=1e-6, rtol=1e-5
    )


def test_options_alignops_lacks_are_refused():
    binding.enable(losses=True)
    with pytest.raises(NotImplementedError, match="ld_alpha=0.5"):
        run_trainer("dpo", True, steps=1, ld_alpha=0.5)
    binding.enable(losses=True)
    with pytest.raises(NotImplementedError, match="loss_type='vespo'"):
        run_trainer("grpo", True, steps=1, loss_type="vespo")
    binding.enable(losses=True)
    with pytest.raises(NotImplementedError, match="top_entropy_quantile=0.5"):
        run_trainer("grpo", True, steps=1, top_entropy_quantile=0.5)
