"""Model registry: the LM-head shapes benchmarks run at (shapes come from here, never literals).

A benchmark case takes ``hidden_size`` and ``vocab_size`` (and the final-logit soft-cap, when the model
has one) from an entry below and scales the token count with ``--tokens``. ``--hidden`` / ``--vocab``
override the entry for one-off measurements (the case is then named ``custom``).

Real models are three large public ones and two small ones; the ``cpu-*`` entries are
synthetic shapes sized so a 2-core CPU finishes a case in well under a second.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    vocab_size: int
    softcap: float | None = None  # Gemma-2 style final-logit soft-cap c·tanh(z/c)
    source: str = ""


_ENTRIES = (
    ModelShape("llama3-8b", 4096, 128256, None, "meta-llama/Meta-Llama-3-8B config.json"),
    ModelShape("qwen2.5-7b", 3584, 152064, None, "Qwen/Qwen2.5-7B config.json"),
    # final_logit_softcapping = 30.0 in transformers' Gemma2Config.
    ModelShape("gemma2-2b", 2304, 256000, 30.0, "google/gemma-2-2b config.json"),
    ModelShape("qwen2.5-0.5b", 896, 151936, None, "Qwen/Qwen2.5-0.5B config.json"),
    ModelShape("smollm2-135m", 576, 49152, None, "HuggingFaceTB/SmolLM2-135M config.json"),
    # Synthetic, CPU-sized: V/H = 64 keeps the vocab-dominated aspect of real LM heads.
    ModelShape("cpu-small", 256, 16384, None, "synthetic"),
    # Synthetic, for --quick: the same V/H, a 4 MiB fp32 head, so every provider (torch's chunked
    # path included, whose cost grows with the number of chunks times V·H) runs in well under 1 s.
    ModelShape("cpu-quick", 128, 8192, None, "synthetic"),
    # Synthetic, for tests: a case runs in milliseconds. V is not a power of two on purpose.
    ModelShape("cpu-tiny", 64, 1000, None, "synthetic"),
)

MODELS: dict[str, ModelShape] = {m.name: m for m in _ENTRIES}

# What a run without --model measures on each device type.
DEFAULT_MODELS_CUDA = ("llama3-8b", "qwen2.5-7b", "gemma2-2b")
DEFAULT_MODELS_CPU = ("cpu-small",)


def get_model(name: str) -> ModelShape:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


def with_overrides(
    model: ModelShape, *, hidden_size: int | None = None, vocab_size: int | None = None
) -> ModelShape:
    """``model`` with explicit H / V; renamed ``custom`` when anything changed."""
    if hidden_size is None and vocab_size is None:
        return model
    return dataclasses.replace(
        model,
        name="custom",
        hidden_size=hidden_size or model.hidden_size,
        vocab_size=vocab_size or model.vocab_size,
        source=f"override of {model.name}",
    )
