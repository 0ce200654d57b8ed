"""Thin adapters of alignops into other people's training code (transformers, TRL).

Imported as ``alignops.bindings``; only calls the public ``alignops`` API.

* ``alignops.bindings.transformers``: ``patch_causal_lm`` (the SFT loss without logits) and
  ``causal_lm_logprobs`` (per-token log-probs / entropy of any causal LM without logits).
* ``alignops.bindings.trl``: ``enable()`` / ``disable()``, every TRL trainer's fused LM head on
  alignops' kernels.

Usage, the architectures and trainers tried: docs/bindings.md.
"""
