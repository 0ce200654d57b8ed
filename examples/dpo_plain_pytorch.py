"""A plain PyTorch DPO loop on alignops (DPO: Rafailov et al., 2023, arXiv:2305.18290).

The reference model scores every pair once, before training, into an ``alignops.cache``
reference cache on disk (``alignops.cache.precompute``, the same as ``alignops precompute
--model REF --data pairs.jsonl --output CACHE``; here in a temporary directory); training opens
the cache (checksums and the reference's fingerprint checked) and never loads the reference.
Each step runs only the policy: ``causal_lm_logprobs`` (per-token log-probs, no ``[B, T, V]``
logits) -> sums over completion tokens -> ``alignops.losses.dpo_loss`` with the cached reference
sums (``alignops.cache.reference_logps``, looked up by each pair's token ids).

    python examples/dpo_plain_pytorch.py
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from alignops.bench.trl_trainers import tiny_llama  # a 2-layer random Llama: use your model
from alignops.bindings.transformers import causal_lm_logprobs

import alignops
from alignops.cache import ReferenceCache, precompute, reference_logps


def make_pairs(vocab: int, pairs: int = 8, prompt: int = 5, completion: int = 7, seed: int = 0):
    """``[2P, T]`` ids (chosen rows first, then rejected) and labels with the prompt ignored."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab, (pairs, prompt), generator=g)
    chosen = torch.randint(0, vocab, (pairs, completion), generator=g)
    rejected = torch.randint(0, vocab, (pairs, completion), generator=g)
    ids = torch.cat([torch.cat([prompts, chosen], 1), torch.cat([prompts, rejected], 1)])
    labels = ids.clone()
    labels[:, :prompt] = -100
    return ids, labels


def pair_rows(ids: torch.Tensor, prompt: int = 5) -> list[dict]:
    """The pairs as tokenized preference rows (``prompt_input_ids``, ``chosen_input_ids``,
    ``rejected_input_ids``), the layout the cache reads and keys its values by."""
    p = ids.shape[0] // 2
    return [
        {
            "prompt_input_ids": ids[i, :prompt].tolist(),
            "chosen_input_ids": ids[i, prompt:].tolist(),
            "rejected_input_ids": ids[p + i, prompt:].tolist(),
        }
        for i in range(p)
    ]


def sequence_logps(model, ids, labels):
    """``[2P]`` summed log-probs of the completion tokens."""
    return causal_lm_logprobs(model, ids, labels=labels).logps.sum(-1)


def main(steps: int = 4, beta: float = 0.1, lr: float = 0.05) -> list[float]:
    torch.manual_seed(0)
    policy = tiny_llama(211)
    ids, labels = make_pairs(211)
    rows = pair_rows(ids)
    with tempfile.TemporaryDirectory() as tmp:
        # once, before training: the reference (here the initial policy) scores every pair
        ref_dir, data, cache_dir = (os.path.join(tmp, n) for n in ("ref", "pairs.jsonl", "ref-cache"))
        policy.save_pretrained(ref_dir)
        with open(data, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        precompute(ref_dir, data, cache_dir, add_eos=False, progress=False)
        # training: the reference log-probs come from the cache
        cache = ReferenceCache(cache_dir, model=ref_dir)  # refuses another model's cache
        batch = {k: [r[k] for r in rows] for k in rows[0]}
        refs = reference_logps(cache, batch, kind="preference")  # ref_chosen_logps, ref_rejected_logps
    p = ids.shape[0] // 2
    opt = torch.optim.SGD(policy.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        logps = sequence_logps(policy, ids, labels)
        out = alignops.losses.dpo_loss(logps[:p], logps[p:], **refs, beta=beta)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        print(f"step {step + 1}: DPO loss {out.loss.item():.6f}")
    return losses


if __name__ == "__main__":
    main()
