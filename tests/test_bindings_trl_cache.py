"""TRL's DPOTrainer fed by an alignops reference cache: ``enable(dpo_reference=cache_reference(cache))``.

The cache is precomputed (``alignops.cache.precompute``) with the tiny reference model on the
training set's text; the trainer then takes every reference log-prob from it. Compared with TRL's
own run with a live reference model (``precompute_ref_log_probs=False``: the reference forward
every step): 3 plain-SGD steps in fp32, per-step losses within 1e-5 relative + 1e-6 absolute,
logged gradient norms within 1e-5 relative; the decoder forward calls counted: only the policy's
(one per step) with the cache, policy + reference without.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")

from alignops.bindings import trl as binding  # noqa: E402

from tests._assert import assert_close  # noqa: E402

STEPS = 3


@pytest.fixture(autouse=True)
def _switch_off():
    binding.disable()
    yield
    binding.disable()


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory):
    """The bench's tiny DPO setup (same seed: the very weights the trainer loads) precomputed."""
    from alignops.bench.trl_trainers import tiny_dataset, tiny_llama, tiny_tokenizer

    from alignops.cache import ReferenceCache, precompute

    tmp = tmp_path_factory.mktemp("trl-cache")
    model_dir = str(tmp / "model")
    tok = tiny_tokenizer(model_dir)
    tiny_llama(len(tok)).save_pretrained(model_dir)
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in tiny_dataset("dpo")))
    precompute(model_dir, data, tmp / "cache", batch_size=5, progress=False)
    return ReferenceCache(tmp / "cache", model=model_dir), model_dir


def _counting_decoder_calls(runs: list):
    """Count the forward calls of every Llama decoder (policy and reference alike)."""
    from transformers.models.llama.modeling_llama import LlamaModel

    def hook(module, args, output):
        if isinstance(module, LlamaModel):
            runs[0] += 1

    return torch.nn.modules.module.register_module_forward_hook(hook)


def _run(use_alignops: bool, **config) -> tuple[dict, int]:
    from alignops.bench.trl_trainers import run_trainer

    runs = [0]
    handle = _counting_decoder_calls(runs)
    try:
        out = run_trainer("dpo", use_alignops, steps=STEPS, **config)
    finally:
        handle.remove()
    return out, runs[0]


def test_dpo_trains_from_the_cache_like_a_live_reference(ref_cache):
    cache, _ = ref_cache
    want, want_decoder = _run(False)  # TRL alone, its reference model live at every step
    binding.enable(dpo_reference=binding.cache_reference(cache))
    got, got_decoder = _run(True, precompute_ref_log_probs=True)  # run_trainer disables at the end
    assert want_decoder == 2 * STEPS and got_decoder == STEPS  # the reference never ran
    assert got["trl_calls"] == 0 and got["alignops_calls"] == STEPS
    assert_close("losses", torch.tensor(want["losses"]), torch.tensor(got["losses"]), atol=1e-6, rtol=1e-5)
    assert_close(
        "grad norms", torch.tensor(want["grad_norms"]), torch.tensor(got["grad_norms"]), rtol=1e-5, atol=0
    )
    assert len(got["losses"]) == STEPS and not binding.is_enabled()


def test_cache_reference_values_are_the_reference_models(ref_cache):
    """The lookup's columns against the reference model's float64 log-probs of the same ids."""
    from datasets import Dataset

    cache, model_dir = ref_cache
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    from alignops.bench.trl_trainers import tiny_dataset

    rows = list(tiny_dataset("dpo"))[::3]
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    ds = Dataset.from_list(
        [
            {
                "prompt_ids": enc(r["prompt"]),
                "chosen_ids": enc(r["chosen"]) + [tok.eos_token_id],
                "rejected_ids": enc(r["rejected"]) + [tok.eos_token_id],
            }
            for r in rows
        ]
    )
    out = binding.cache_reference({"train": cache})(None, ds, "train")
    assert binding.cache_reference({"train": cache})(None, ds, "eval") is None  # left to TRL
    for side in ("chosen", "rejected"):
        want = []
        for row in ds:
            ids = torch.tensor(row["prompt_ids"] + row[f"{side}_ids"])
            with torch.no_grad():
                logp = torch.log_softmax(ref(input_ids=ids[None]).logits[0, :-1], -1)
            tok_lp = logp.gather(-1, ids[1:, None])[:, 0]
            want.append(tok_lp[len(row["prompt_ids"]) - 1 :].sum())
        assert_close(side, torch.stack(want), torch.tensor(out[f"ref_{side}_logps"]), atol=2e-4, rtol=1e-5)


def test_cache_reference_refuses_other_tokens(ref_cache):
    from datasets import Dataset

    from alignops.cache import CacheKeyError

    cache, _ = ref_cache
    ds = Dataset.from_list([{"prompt_ids": [5, 6], "chosen_ids": [7, 1], "rejected_ids": [8, 1]}])
    with pytest.raises(CacheKeyError):
        binding.cache_reference(cache)(None, ds, "train")
    with pytest.raises(ValueError, match="has no"):
        binding.cache_reference(cache)(None, ds.remove_columns("chosen_ids"), "train")
