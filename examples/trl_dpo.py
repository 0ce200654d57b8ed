"""TRL's DPOTrainer with alignops' fused LM head: one switch, the trainer is unchanged.

``alignops.bindings.trl.enable()`` makes TRL's fused head (every field: log-probs, entropy, mean
logit, is-top-1, WPO's log sum p^2) run on alignops' kernels; ``count_head_calls`` shows TRL's
own head ran zero times.

    python examples/trl_dpo.py
"""

from __future__ import annotations

import tempfile

from alignops.bench.trl_trainers import build_trainer  # tiny model, tokenizer, data: use yours
from alignops.bindings import trl as alignops_trl


def main(steps: int = 2) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp, alignops_trl.enable():
        with alignops_trl.count_head_calls() as calls:
            trainer = build_trainer("dpo", tmp, steps=steps)  # a trl.DPOTrainer
            trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    print(f"DPO losses {losses}; alignops head calls {calls.alignops}, TRL head calls {calls.trl}")
    return losses


if __name__ == "__main__":
    main()
