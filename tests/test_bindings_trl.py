"""The TRL binding: alignops' head in place of TRL's ``ChunkedLogProbFunction``.

Every field TRL asks for against float64 logits written from the math, every logit-scaling
convention TRL reads from a config, the switch and its refusals, and TRL's DPO / KTO / GRPO / SFT
trainers a few steps on the CPU with and without alignops (fp32; per-step losses within 1e-5
relative + 1e-6 absolute, TRL's head ran zero times with the switch on).
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

import trl.trainer.utils as trl_utils  # noqa: E402
from alignops.bench.trl_trainers import tiny_llama  # noqa: E402
from alignops.bindings import trl as binding  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from tests._assert import assert_close  # noqa: E402
from tests._trl_runs import trainer_run  # noqa: E402

ALL = binding.OUTPUTS


@pytest.fixture(autouse=True)
def _switch_off():
    binding.disable()
    yield
    binding.disable()


def _reference(hidden, weight, bias, targets, *, temperature=1.0, softcap=None, scale=1.0):
    """float64 ``(logp, entropy, log sum p^2, mean logit, is_top1)`` from full logits."""
    r = hidden.double() @ weight.double().T
    if bias is not None:
        r = r + bias.double()
    z = r * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp_all = torch.log_softmax(z, -1)
    p = logp_all.exp()
    logp = logp_all.gather(-1, targets[:, None])[:, 0]
    ent = -(p * logp_all).sum(-1)
    lsp2 = torch.logsumexp(2 * logp_all, -1)
    return logp, ent, lsp2, z.mean(-1), z.argmax(-1) == targets


@pytest.mark.parametrize("softcap,scale,temperature", [(None, 1.0, 1.0), (6.0, 0.37, 0.7), (None, 2.5, 1.3)])
def test_fused_head_fields_and_gradients_match_float64(softcap, scale, temperature):
    n, h, v = 53, 12, 301
    hid = (torch.randn(n, h, dtype=torch.float64) * 2).requires_grad_()
    w = (torch.randn(v, h, dtype=torch.float64) / math.sqrt(h)).requires_grad_()
    b = (torch.randn(v, dtype=torch.float64) * 0.3).requires_grad_()
    y = torch.randint(0, v, (n,))
    y[:5] = (hid[:5].detach() @ w.detach().T + b.detach()).argmax(-1)  # some true top-1 labels
    got = binding.fused_head(hid, w, b, y, temperature, 4096, softcap, scale, ALL)
    want = _reference(hid, w, b, y, temperature=temperature, softcap=softcap, scale=scale)
    for name, a, c in zip(ALL[:4], want[:4], got[:4]):
        assert_close(name, a, c, atol=1e-10, rtol=1e-9)
    assert torch.equal(got[4], want[4]) and got[4].any()
    assert not got[2].requires_grad and not got[3].requires_grad  # no gradient, as in TRL
    g1, g2 = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    d_got = torch.autograd.grad((got[0] * g1 + got[1] * g2).sum(), (hid, w, b))
    d_want = torch.autograd.grad((want[0] * g1 + want[1] * g2).sum(), (hid, w, b))
    for name, a, c in zip(("dhidden", "dweight", "dbias"), d_want, d_got):
        assert_close(name, a, c, atol=1e-10, rtol=1e-9)


def test_fused_head_dtypes_autocast_and_fp32_head():
    """Under bf16 autocast (fp32 master weight) the matmul runs on bf16-rounded operands, as TRL's
    head; with a bf16 head and fp32 hidden states (TRL's ``cast_lm_head_to_fp32``) in fp32."""
    from trl.kernels import ChunkedLogProbFunction

    g = torch.Generator().manual_seed(3)
    hid, w = torch.randn(45, 16, generator=g), torch.randn(263, 16, generator=g) / 4
    y = torch.randint(0, 263, (45,), generator=g)
    bf = lambda t: t.bfloat16().double()  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = binding.fused_head(hid, w, None, y, 1.0, None, None, 1.0, ALL)
        trl_out = ChunkedLogProbFunction.apply(hid, w, None, y, 1.0, 32768, None, 1.0, ALL)
    want = _reference(bf(hid), bf(w), None, y)
    for name, a, c in zip(ALL[:4], want[:4], got[:4]):  # fp32 arithmetic on bf16 operands
        assert_close(name + " autocast", a, c, atol=1e-5, rtol=1e-5)
    # TRL also rounds each logit to bf16 (step 2**-8 relative): agreement to that
    assert_close("logps vs TRL autocast", trl_out[0], got[0], atol=3e-2, rtol=0)
    got32 = binding.fused_head(hid, w.bfloat16(), None, y, 1.0, None, None, 1.0, ("log_probs",))
    assert_close("logps fp32 head cast", _reference(hid, bf(w), None, y)[0], got32[0], atol=1e-5, rtol=1e-5)


def test_fused_head_only_requested_fields():
    hid, w, y = torch.randn(7, 4), torch.randn(11, 4), torch.randint(0, 11, (7,))
    lp, ent, lsp2, mean, top1 = binding.fused_head(hid, w, None, y, 1.0, 8, None, 1.0, ("log_probs",))
    assert lp.shape == (7,) and ent is None and lsp2 is None and mean is None and top1 is None


# (config attribute, value, model_type or None, the multiplier TRL applies)
CONVENTIONS = [
    ("logit_scale", 0.31, None, 0.31),
    ("output_multiplier", 1.7, None, 1.7),
    ("lm_head_multiplier", 0.6, None, 0.6),
    ("logits_scaling", 4.0, None, 0.25),
    ("logits_scaling", 1.5, "hyperclovax", 1.5),
    ("final_logit_softcapping", 2.0, None, 1.0),
]


@pytest.mark.parametrize(
    "attr,value,model_type,scale", CONVENTIONS, ids=[c[0] + str(c[2] or "") for c in CONVENTIONS]
)
def test_every_scaling_convention_trl_reads(attr, value, model_type, scale):
    """``add_fused_lm_head`` on a model whose config carries the convention: alignops' fields equal
    the float64 math, and TRL's own head gives the same (fp32) numbers."""
    model = tiny_llama(97, seed=1, tie_word_embeddings=False)
    setattr(model.config, attr, value)
    if model_type:
        model.config.model_type = model_type
    softcap = value if attr == "final_logit_softcapping" else None
    add_fused_lm_head(model, temperature=0.9, outputs=ALL)
    ids = torch.randint(0, 97, (3, 17))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 12:] = -100
    trl_out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    with binding.enable(), binding.count_head_calls() as calls:
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert calls.trl == 0 and calls.alignops == 1
    hid = model.model(input_ids=ids).last_hidden_state[:, :-1].detach()
    mask = labels[:, 1:] != -100
    y = labels[:, 1:][mask]
    ref = _reference(hid[mask], model.lm_head.weight, None, y, temperature=0.9, softcap=softcap, scale=scale)
    fields = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits")
    for name, want in zip(fields, ref):
        assert_close(name, want, getattr(out, name)[mask], atol=2e-5, rtol=2e-5)
        assert_close(name + " vs TRL", getattr(trl_out, name), getattr(out, name), atol=2e-5, rtol=2e-5)
        assert (getattr(out, name)[~mask] == 0).all()
    assert torch.equal(out.is_top1[mask], ref[4])
    assert_close("loss", trl_out.loss, out.loss, atol=1e-6, rtol=1e-6)


def test_switch_reverts_and_covers_models_patched_before():
    original = trl_utils._ChunkedLogProbFunction
    model = tiny_llama(61, seed=2)
    add_fused_lm_head(model)  # patched while the switch is off
    ids = torch.randint(0, 61, (2, 9))
    with binding.count_head_calls() as calls:
        a = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
        handle = binding.enable()
        binding.enable()  # idempotent
        assert binding.is_enabled()
        b = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
        binding.disable()
        c = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
    assert (calls.trl, calls.alignops) == (2, 1)
    assert trl_utils._ChunkedLogProbFunction is original and not binding.is_enabled()
    assert isinstance(handle, binding.Switch)
    assert_close("log_probs", a, b, atol=1e-6, rtol=1e-6)
    assert torch.equal(a, c)


def test_zero3_is_refused(monkeypatch):
    import transformers.integrations.deepspeed as hf_ds

    monkeypatch.setattr(hf_ds, "is_deepspeed_zero3_enabled", lambda: True)
    hid, w, y = torch.randn(3, 4), torch.randn(9, 4), torch.randint(0, 9, (3,))
    with pytest.raises(NotImplementedError, match="ZeRO-3 is not supported"):
        binding.fused_head(hid, w, None, y, 1.0, 8, None, 1.0, ("log_probs",))


def test_refusals_name_the_reason():
    with binding.enable():
        hid, w, y = torch.randn(3, 4), torch.randn(9, 4), torch.randint(0, 9, (3,))
        with pytest.raises(ValueError, match="logit scale 0.0"):
            binding.fused_head(hid, w, None, y, 1.0, 8, None, 0.0, ("log_probs",))
        with pytest.raises(ValueError, match="unknown output"):
            binding.fused_head(hid, w, None, y, 1.0, 8, None, 1.0, ("log_probs", "logits"))


@pytest.mark.parametrize("kind", ["dpo", "kto", "grpo", "rloo", "sft", "sft-packed"])
def test_trainer_losses_match_and_trl_head_never_runs(kind):
    """Three optimizer steps (plain SGD, fp32) with TRL's head and with alignops': the logged
    per-step losses agree within 1e-5 relative + 1e-6 absolute, the logged gradient norms
    within 1e-5 relative, and with the switch on TRL's
    ``ChunkedLogProbFunction`` ran zero times."""
    off = trainer_run(kind, False)
    on = trainer_run(kind, True)
    assert off["trl_calls"] > 0 and off["alignops_calls"] == 0
    assert on["trl_calls"] == 0 and on["alignops_calls"] == off["trl_calls"]
    assert len(on["losses"]) == len(off["losses"]) == 3
    assert_close("losses", torch.tensor(off["losses"]), torch.tensor(on["losses"]), atol=1e-6, rtol=1e-5)
    # the gradient norms the trainer logs before each update: the backward agrees too
    assert_close(
        "grad norms", torch.tensor(off["grad_norms"]), torch.tensor(on["grad_norms"]), atol=0, rtol=1e-5
    )
    assert not binding.is_enabled()


def test_bench_head_comparison_runs_both_heads_on_the_same_inputs():
    """The must-show's head-alone measurement (``python -m alignops.bench.trl_trainers``) at a tiny
    size: both heads see the same inputs and agree on the summed log-probs (float64 reference)."""
    from alignops.bench.trl_trainers import _child_head

    trl_r, ours = _child_head("trl", 37, 8, 301), _child_head("alignops", 37, 8, 301)
    g = torch.Generator().manual_seed(0)
    hid, w = torch.randn(37, 8, generator=g), torch.randn(301, 8, generator=g) / 8**0.5
    y = torch.randint(0, 301, (37,), generator=g)
    want = torch.log_softmax(hid.double() @ w.double().T, -1).gather(-1, y[:, None]).sum().item()
    assert abs(trl_r["sum_logps"] - want) < 1e-4 and abs(ours["sum_logps"] - want) < 1e-4
    assert ours["peak_extra_mib"] >= 0 and trl_r["grads_mib"] == ours["grads_mib"]


def _reference_lookup(calls: list):
    """A stand-in for a reference-log-prob cache: sums of the reference model's completion log-probs
    computed here with ``causal_lm_logprobs`` (an independent path: no TRL code)."""
    import os

    from alignops.bindings.transformers import causal_lm_logprobs

    def lookup(trainer, dataset, name):
        calls.append(name)
        path = os.path.join(os.path.dirname(trainer.args.output_dir), "model")
        ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        cols = {"ref_chosen_logps": [], "ref_rejected_logps": []}
        with torch.no_grad():
            for row in dataset:
                for side in ("chosen", "rejected"):
                    ids = torch.tensor(row["prompt_ids"] + row[f"{side}_ids"])[None]
                    labels = ids.clone()
                    labels[:, : len(row["prompt_ids"])] = -100
                    lp = causal_lm_logprobs(ref, ids, labels=labels).logps.sum().item()
                    cols[f"ref_{side}_logps"].append(lp)
        for k, v in cols.items():
            dataset = dataset.add_column(k, v)
        return dataset

    return lookup


def test_dpo_reference_hook_replaces_the_precompute():
    """``enable(dpo_reference=lookup)``: DPOTrainer takes its reference log-probs from the lookup
    (no reference forward at all) and trains like TRL's own precompute."""
    from alignops.bench.trl_trainers import run_trainer

    want = run_trainer("dpo", False, steps=2, precompute_ref_log_probs=True)
    calls: list = []
    binding.enable(dpo_reference=_reference_lookup(calls))
    got = run_trainer("dpo", True, steps=2, precompute_ref_log_probs=True)  # disables at the end
    binding.enable(dpo_reference=_reference_lookup(calls))
    with pytest.raises(ValueError, match="precompute_ref_log_probs=True"):
        run_trainer("dpo", True, steps=1)  # the hook would never be asked: refused
    assert calls == ["train"]
    # TRL's precompute ran its head once per batch (4 rows of 16); with the lookup only the policy's 2 steps
    assert want["trl_calls"] == 2 + 16 // 4 and got["alignops_calls"] == 2 and got["trl_calls"] == 0
    assert_close("losses", torch.tensor(want["losses"]), torch.tensor(got["losses"]), atol=1e-6, rtol=1e-5)
    assert_close(
        "grad norms", torch.tensor(want["grad_norms"]), torch.tensor(got["grad_norms"]), rtol=1e-5, atol=0
    )
    from trl import DPOTrainer

    assert "_precompute_ref_logps" not in vars(DPOTrainer) or not binding.is_enabled()


def test_bench_bf16_accuracy_line():
    """The must-show's bf16 accuracy line at a tiny size: alignops' head is at fp32 accuracy on the
    bf16-rounded operands (TRL's rounds each logit to bf16, reported, not asserted)."""
    from alignops.bench.trl_trainers import head_errors_bf16

    errs = head_errors_bf16(33, 16, 1001)
    assert errs["alignops"][0] < 1e-5 and errs["alignops"][1] < 1e-4
    assert all(map(math.isfinite, errs["trl"]))
