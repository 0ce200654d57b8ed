"""Tiny local causal LMs and datasets for the reference-cache tests (nothing is downloaded).

A word-level tokenizer (``tokenizers`` WordLevel wrapped in ``PreTrainedTokenizerFast``, with a
small chat template) and a random ``LlamaForCausalLM`` from a config, saved to a directory.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = [f"w{i}" for i in range(60)]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
VOCAB = 67  # model vocabulary: 64 tokenizer entries + 3 never-produced ids (not a block multiple)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {{ eos_token }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + ["user", "assistant", ":"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model_dir(
    path: Path, *, seed: int = 0, vocab: int = VOCAB, layers: int = 2, hidden: int = 24
) -> Path:
    """Save a random tiny Llama (float32) and the tokenizer to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=40,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger logits than the default init, so that log-probs differ visibly
        model.lm_head.weight.normal_(0.0, 0.5)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def preference_rows(n: int, seed: int = 0, chat: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p, c, r = _text(rng, 1, 7), _text(rng, 1, 9), _text(rng, 1, 9)
        if chat:
            rows.append(
                {
                    "id": f"ex{i}",
                    "prompt": [{"role": "user", "content": p}],
                    "chosen": [{"role": "assistant", "content": c}],
                    "rejected": [{"role": "assistant", "content": r}],
                }
            )
        else:
            rows.append({"id": f"ex{i}", "prompt": p, "chosen": c, "rejected": r})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
