"""The transformers binding: patched loss == the model's own loss, values and gradients.

Tiny random models built from configs (no weights are downloaded).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from alignops.bindings.transformers import patch_causal_lm  # noqa: E402

from tests._assert import assert_close  # noqa: E402


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=211,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).double()


def _gemma2():
    cfg = transformers.Gemma2Config(
        vocab_size=157,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        final_logit_softcapping=3.0,
    )
    return transformers.Gemma2ForCausalLM(cfg).double()


def _batch(vocab):
    ids = torch.randint(0, vocab, (3, 13))
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[2, 9:] = -100  # padding
    return ids, labels


@pytest.mark.parametrize("make", [_llama, _gemma2], ids=["llama", "gemma2-softcap"])
@pytest.mark.parametrize("num_items", [None, 17])
def test_patched_loss_matches_model(make, num_items):
    model = make()
    ids, labels = _batch(model.config.vocab_size)
    kw = {} if num_items is None else {"num_items_in_batch": num_items}
    ref = model(input_ids=ids, labels=labels, **kw).loss
    ref_grads = torch.autograd.grad(ref * 1.7, list(model.parameters()), allow_unused=True)
    with patch_causal_lm(model) as handle:
        out = model(input_ids=ids, labels=labels, **kw)
        assert out.logits is None
        got_grads = torch.autograd.grad(out.loss * 1.7, list(model.parameters()), allow_unused=True)
    assert not handle.active
    # HF's loss upcasts the logits to float32 (even for a float64 model): fp32-level agreement
    assert_close("loss", ref.detach(), out.loss.detach(), atol=1e-6, rtol=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), ref_grads, got_grads):
        if a is None:
            assert b is None or b.abs().max() == 0, name
            continue
        assert_close(name, a, b, atol=1e-6, rtol=1e-5)
    # unpatched again: logits are back
    assert model(input_ids=ids, labels=labels).logits is not None


def test_calls_without_labels_use_the_original_forward():
    model = _llama()
    ids, _ = _batch(model.config.vocab_size)
    ref = model(input_ids=ids).logits
    handle = patch_causal_lm(model)
    out = model(input_ids=ids).logits
    handle.remove()
    assert_close("logits", ref.detach(), out.detach(), atol=0.0)
