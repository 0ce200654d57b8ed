"""A plain PyTorch DPO loop on alignops (DPO: Rafailov et al., 2023, arXiv:2305.18290).

The reference model scores every pair once, before training, and its sequence log-probs are
cached (here a tensor in memory; on disk for a real run); each step then runs only the policy:
``causal_lm_logprobs`` (per-token log-probs, no ``[B, T, V]`` logits) -> sums over completion
tokens -> ``alignops.losses.dpo_loss``.

    python examples/dpo_plain_pytorch.py
"""

from __future__ import annotations

import copy

import torch
from alignops.bench.trl_trainers import tiny_llama  # a 2-layer random Llama: use your model
from alignops.bindings.transformers import causal_lm_logprobs

import alignops


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


def sequence_logps(model, ids, labels):
    """``[2P]`` summed log-probs of the completion tokens."""
    return causal_lm_logprobs(model, ids, labels=labels).logps.sum(-1)


def main(steps: int = 4, beta: float = 0.1, lr: float = 0.05) -> list[float]:
    torch.manual_seed(0)
    policy = tiny_llama(211)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    ids, labels = make_pairs(211)
    with torch.no_grad():  # the cache: reference log-probs, computed once
        ref_cache = sequence_logps(ref, ids, labels)
    del ref
    p = ids.shape[0] // 2
    opt = torch.optim.SGD(policy.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        logps = sequence_logps(policy, ids, labels)
        out = alignops.losses.dpo_loss(logps[:p], logps[p:], ref_cache[:p], ref_cache[p:], beta=beta)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        print(f"step {step + 1}: DPO loss {out.loss.item():.6f}")
    return losses


if __name__ == "__main__":
    main()
