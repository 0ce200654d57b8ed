"""Supervised fine-tuning with ``patch_causal_lm``: the model's own ``.loss``, no logits.

After ``patch_causal_lm(model)``, ``model(input_ids=..., labels=...)`` computes HF's shifted
cross-entropy with alignops' fused kernel; ``logits`` is ``None``. Any training loop (or
``transformers.Trainer``) that reads ``.loss`` works unchanged.

    python examples/sft_patch.py
"""

from __future__ import annotations

import torch
from alignops.bench.trl_trainers import tiny_llama  # a 2-layer random Llama: use your model
from alignops.bindings.transformers import patch_causal_lm


def main(steps: int = 4, lr: float = 0.5) -> list[float]:
    torch.manual_seed(0)
    model = tiny_llama(211)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 211, (4, 16), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # prompt tokens are not trained on
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    with patch_causal_lm(model):
        for step in range(steps):
            out = model(input_ids=ids, labels=labels)
            assert out.logits is None  # never built
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
            print(f"step {step + 1}: SFT loss {out.loss.item():.6f}")
    return losses


if __name__ == "__main__":
    main()
