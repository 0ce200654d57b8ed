"""TRL's GRPOTrainer with alignops' fused LM head (GRPO: Shao et al., 2024, arXiv:2402.03300).

Generation is TRL's; the policy's and the reference's per-token log-probs and entropies (at the
trainer's temperature) come from alignops' kernels.

    python examples/trl_grpo.py
"""

from __future__ import annotations

import tempfile

from alignops.bench.trl_trainers import build_trainer  # tiny model, tokenizer, reward: use yours
from alignops.bindings import trl as alignops_trl


def main(steps: int = 2) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp, alignops_trl.enable():
        with alignops_trl.count_head_calls() as calls:
            trainer = build_trainer("grpo", tmp, steps=steps)  # a trl.GRPOTrainer
            trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    print(f"GRPO losses {losses}; alignops head calls {calls.alignops}, TRL head calls {calls.trl}")
    return losses


if __name__ == "__main__":
    main()
