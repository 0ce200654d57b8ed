"""``causal_lm_logprobs``: per-token log-probs (and entropy) of transformers causal LMs without
logits, against each model's own logits path (log_softmax in float64), values and gradients
with a random upstream gradient; packed padding-free rows; clear errors for other layouts.

Tiny random models from configs (float64), no download.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from alignops.bindings.transformers import causal_lm_logprobs, logit_transform  # noqa: E402

from tests._assert import assert_close  # noqa: E402

SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


def _llama(tied=False):
    return transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=211, num_key_value_heads=2, tie_word_embeddings=tied, **SMALL)
    )


def _qwen2():
    cfg = transformers.Qwen2Config(vocab_size=173, num_key_value_heads=2, **SMALL)
    return transformers.Qwen2ForCausalLM(cfg)


def _qwen3():
    cfg = transformers.Qwen3Config(vocab_size=181, num_key_value_heads=2, head_dim=8, **SMALL)
    return transformers.Qwen3ForCausalLM(cfg)


def _mistral():
    cfg = transformers.MistralConfig(vocab_size=149, num_key_value_heads=2, sliding_window=6, **SMALL)
    return transformers.MistralForCausalLM(cfg)


def _gemma2():
    cfg = transformers.Gemma2Config(
        vocab_size=157, num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0, **SMALL
    )
    return transformers.Gemma2ForCausalLM(cfg)


def _gemma3():
    cfg = transformers.Gemma3TextConfig(
        vocab_size=163, num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.5, **SMALL
    )
    return transformers.Gemma3ForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=139, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg)


def _qwen2_moe():
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=167,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        experts_implementation="eager",  # grouped_mm has no float64
        **SMALL,
    )
    return transformers.Qwen2MoeForCausalLM(cfg)


def _granite():  # divides its logits by ``logits_scaling``
    cfg = transformers.GraniteConfig(vocab_size=151, num_key_value_heads=2, logits_scaling=4.0, **SMALL)
    return transformers.GraniteForCausalLM(cfg)


def _cohere():  # multiplies its logits by ``logit_scale``, tied head
    cfg = transformers.CohereConfig(vocab_size=143, num_key_value_heads=2, logit_scale=0.3, **SMALL)
    return transformers.CohereForCausalLM(cfg)


ARCHS = {
    "llama": _llama,
    "llama-tied": lambda: _llama(tied=True),
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "mistral": _mistral,
    "gemma2-softcap": _gemma2,
    "gemma3-softcap": _gemma3,
    "gpt2": _gpt2,
    "qwen2-moe": _qwen2_moe,
    "granite-logits_scaling": _granite,
    "cohere-logit_scale": _cohere,
}


def _batch(vocab, b=3, t=13):
    ids = torch.randint(0, vocab, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 9:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # prompt
    return ids, mask, labels


def _model_logps(model, ids, mask, labels):
    """``log_softmax`` of the model's own logits, float64, ``[B, T - 1]`` (0 where ignored)."""
    out = model(input_ids=ids, attention_mask=mask)
    logp_all = torch.log_softmax(out.logits[:, :-1].double(), -1)
    y = labels[:, 1:]
    valid = y != -100
    logp = logp_all.gather(-1, y.clamp(min=0)[..., None])[..., 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, ent, 0.0), valid


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logprobs_entropy_and_gradients_match_the_models_logits(arch):
    torch.manual_seed(0)
    model = ARCHS[arch]().double().eval()
    ids, mask, labels = _batch(model.config.vocab_size)
    got = causal_lm_logprobs(model, ids, mask, labels, return_entropy=True)
    want_lp, want_ent, valid = _model_logps(model, ids, mask, labels)
    assert torch.equal(got.mask, valid)
    assert_close("logps", want_lp, got.logps, atol=1e-10, rtol=1e-9)
    assert_close("entropy", want_ent, got.entropy, atol=1e-10, rtol=1e-9)
    g1, g2 = torch.randn_like(want_lp), torch.randn_like(want_lp)
    params = [p for p in model.parameters() if p.requires_grad]
    d_got = torch.autograd.grad((got.logps * g1 + got.entropy * g2).sum(), params, allow_unused=True)
    d_want = torch.autograd.grad((want_lp * g1 + want_ent * g2).sum(), params, allow_unused=True)
    for (name, _), a, c in zip(model.named_parameters(), d_want, d_got):
        if a is None:
            assert c is None or not c.any(), name
        else:
            assert_close(name, a, c, atol=1e-9, rtol=1e-8)


def test_default_labels_ignore_padding_and_temperature():
    torch.manual_seed(1)
    model = _qwen2().double().eval()
    ids, mask, _ = _batch(model.config.vocab_size)
    got = causal_lm_logprobs(model, ids, mask, temperature=0.7)
    z = model(input_ids=ids, attention_mask=mask).logits[:, :-1] / 0.7
    y = ids[:, 1:]
    valid = mask[:, 1:] == 1
    want = torch.log_softmax(z, -1).gather(-1, y[..., None])[..., 0]
    assert torch.equal(got.mask, valid)
    assert_close("logps", torch.where(valid, want, 0.0), got.logps, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2-softcap"])
def test_packed_padding_free_rows_equal_separate_sequences(arch):
    """Three sequences packed in one row with restarting ``position_ids`` (no attention mask) give
    the log-probs of each sequence run alone; nothing scores across a boundary."""
    torch.manual_seed(2)
    model = ARCHS[arch]().double().eval()
    lens = [5, 7, 4]
    seqs = [torch.randint(0, model.config.vocab_size, (n,)) for n in lens]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    got = causal_lm_logprobs(model, ids, position_ids=pos)
    want, valid = [], []
    for s in seqs:
        lp, _, v = _model_logps(model, s[None], None, s[None])
        want.append(torch.cat([lp[0], torch.zeros(1, dtype=lp.dtype)]))  # the boundary: not scored
        valid.append(torch.cat([v[0], torch.zeros(1, dtype=torch.bool)]))
    want, valid = torch.cat(want)[:-1], torch.cat(valid)[:-1]
    assert torch.equal(got.mask[0], valid)
    # packed vs separate attention differs in rounding only (Gemma-2's eager attention takes its
    # softmax in float32: ~1e-8); a sequence attending across a boundary would be off by O(0.1)
    assert_close("packed logps", want, got.logps[0], atol=1e-6, rtol=1e-6)


def test_autocast_bf16_matches_the_models_autocast_logits():
    """Under ``torch.autocast`` the head's matmul takes bf16-rounded operands, as the model's own
    ``lm_head`` does, with fp32 arithmetic after it: log-probs and entropy equal float64 math on
    the bf16-rounded hidden states and weight (the model's own bf16 logits only to 2**-8)."""
    torch.manual_seed(3)
    model = _llama().eval()
    ids, mask, labels = _batch(model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = causal_lm_logprobs(model, ids, mask, labels, return_entropy=True)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        own, _, valid = _model_logps(model, ids, mask, labels)
    z = hidden.detach().bfloat16().double() @ model.lm_head.weight.detach().bfloat16().double().T
    logp_all = torch.log_softmax(z, -1)
    y = labels[:, 1:]
    want = torch.where(valid, logp_all.gather(-1, y.clamp(min=0)[..., None])[..., 0], 0.0)
    ent = torch.where(valid, -(logp_all.exp() * logp_all).sum(-1), 0.0)
    assert_close("logps", want, got.logps, atol=1e-5, rtol=1e-5)
    assert_close("entropy", ent, got.entropy, atol=1e-5, rtol=1e-5)
    assert_close("logps vs the model's bf16 logits", own, got.logps.double(), atol=3e-2, rtol=1e-2)


def test_logit_transform_reads_each_convention():
    def cfg(**kw):
        c = transformers.LlamaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
        for k, v in kw.items():
            setattr(c, k, v)
        return c

    assert logit_transform(cfg()) == (1.0, None)
    assert logit_transform(cfg(logit_scale=0.5)) == (0.5, None)
    assert logit_transform(cfg(output_multiplier=2.0)) == (2.0, None)
    assert logit_transform(cfg(lm_head_multiplier=0.25)) == (0.25, None)
    assert logit_transform(cfg(logits_scaling=8.0)) == (0.125, None)
    assert logit_transform(cfg(logits_scaling=8.0, model_type="hyperclovax")) == (8.0, None)
    assert logit_transform(cfg(final_logit_softcapping=30.0)) == (1.0, 30.0)
    with pytest.raises(ValueError, match="finite scale > 0"):
        logit_transform(cfg(logit_scale=0.0))


class _NoHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = transformers.LlamaConfig(vocab_size=10, hidden_size=8, num_attention_heads=2)

    def get_output_embeddings(self):
        return None


def test_unsupported_layouts_raise_naming_what_is_missing():
    ids = torch.randint(0, 10, (1, 5))
    with pytest.raises(TypeError, match="no output embedding"):
        causal_lm_logprobs(_NoHead(), ids)
    with pytest.raises(TypeError, match="no .config"):
        causal_lm_logprobs(torch.nn.Linear(2, 2), ids)
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=10, d_model=8, d_ff=8, d_kv=4, num_layers=1, num_heads=2)
    )
    with pytest.raises(TypeError, match="encoder-decoder"):
        causal_lm_logprobs(t5, ids)
    with pytest.raises(ValueError, match="labels must have"):
        causal_lm_logprobs(_llama(), ids, labels=ids[:, :3])


@pytest.mark.parametrize(
    "arch", ["granite-logits_scaling", "cohere-logit_scale", "gemma3-softcap", "qwen2-moe"]
)
def test_patch_causal_lm_reads_the_same_conventions(arch):
    """``patch_causal_lm`` uses the same config reader: its loss equals the cross-entropy of the
    model's own logits in float64 (HF's loss function rounds to float32), value and gradients
    with respect to every parameter."""
    from alignops.bindings.transformers import patch_causal_lm

    torch.manual_seed(4)
    model = ARCHS[arch]().double().eval()
    ids, mask, labels = _batch(model.config.vocab_size)
    params = list(model.parameters())
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    d_want = torch.autograd.grad(want, params, allow_unused=True)
    with patch_causal_lm(model):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    d_got = torch.autograd.grad(out.loss, params, allow_unused=True)
    assert_close("loss", want.detach(), out.loss.detach(), atol=1e-10, rtol=1e-9)
    for (name, _), a, c in zip(model.named_parameters(), d_want, d_got):
        if a is None or c is None:
            assert (a is None or not a.any()) and (c is None or not c.any()), name
        else:
            assert_close(name, a, c, atol=1e-9, rtol=1e-8)
