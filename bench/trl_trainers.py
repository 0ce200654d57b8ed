"""TRL trainers with and without alignops' fused head: per-step losses, head calls, peak memory.

``python -m alignops.bench.trl_trainers`` runs TRL's DPOTrainer, GRPOTrainer and SFTTrainer (add
``--trainers dpo,kto,grpo,rloo,sft,distill``; ``distill``: the DistillationTrainer with a wider
teacher, its divergence head replaced) on a tiny random Llama (2 layers, H = 32, vocabulary ``--vocab``,
default 32000) on the CPU, each twice (TRL's own head, then alignops' head through
:func:`alignops.bindings.trl.enable`), each run in a fresh process, and prints the per-step
losses side by side, how many times each head ran, and the peak extra RSS of ``trainer.train()``.
Then the heads alone at the same vocabulary: TRL's ``ChunkedLogProbFunction`` against alignops'
head on the same inputs, forward and backward, peak extra RSS of each in a fresh process.

The tiny setup (model, tokenizer, datasets, trainer) is :func:`run_trainer`, also used by the
tests. No download: the model is built from a config and the tokenizer from a word list.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

WORDS = [f"w{i}" for i in range(90)]
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
TRAINERS = ("dpo", "kto", "grpo", "rloo", "sft", "distill")


def tiny_tokenizer(path: str):
    """A word-level tokenizer over :data:`WORDS`, saved to and loaded from ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    fast.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


def tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A 2-layer Llama with hidden size 32, float32, from a config (random weights)."""
    import transformers

    torch.manual_seed(seed)
    sizes = {"hidden_size": 32, "intermediate_size": 64} | overrides
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        **sizes,
    )
    return transformers.LlamaForCausalLM(cfg)


def _sentence(rng, lo: int, hi: int) -> str:
    n = int(torch.randint(lo, hi, (1,), generator=rng))
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=rng))


def tiny_dataset(kind: str, rows: int = 16, seed: int = 0):
    from datasets import Dataset

    rng = torch.Generator().manual_seed(seed)
    if kind == "dpo":
        data = [
            {
                "prompt": _sentence(rng, 3, 7),
                "chosen": " " + _sentence(rng, 2, 9),  # TRL tokenizes prompt + completion as one text
                "rejected": " " + _sentence(rng, 2, 9),
            }
            for _ in range(rows)
        ]
    elif kind == "kto":
        data = [
            {"prompt": _sentence(rng, 3, 7), "completion": " " + _sentence(rng, 2, 9), "label": bool(i % 2)}
            for i in range(rows)
        ]
    elif kind in ("grpo", "rloo", "distill"):
        data = [{"prompt": _sentence(rng, 3, 7)} for _ in range(rows)]
    elif kind == "sft":
        data = [{"text": _sentence(rng, 5, 15)} for _ in range(rows)]
    else:
        raise ValueError(f"unknown trainer {kind!r}; known: {TRAINERS}")
    return Dataset.from_list(data)


def _reward_ids(completions, completion_ids, **kwargs):
    """A deterministic reward of the generated ids (any vocabulary size): the share of even ids."""
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def build_trainer(kind: str, out_dir: str, *, steps: int = 3, vocab_size: int | None = None, **config):
    """The trainer ``kind`` (:data:`TRAINERS`) on a tiny random Llama, seeded, fp32, CPU."""
    import trl

    tok = tiny_tokenizer(os.path.join(out_dir, "tok"))
    # saved and passed by path: the trainers that need a reference model load a second copy
    model = os.path.join(out_dir, "model")
    tiny_llama(vocab_size or len(tok)).save_pretrained(model)
    common = dict(
        output_dir=os.path.join(out_dir, "run"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=0.5,
        optim="sgd",  # plain SGD: the step is linear in the gradient (Adam's first step is sign-like)
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,  # TRL configs default to bf16 autocast; fp32 compares the heads, not roundings
        seed=0,
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    common.update(config)
    ds = tiny_dataset(kind)
    if kind == "dpo":
        args = trl.DPOConfig(max_length=32, **common)
        return trl.DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    if kind == "kto":
        args = trl.KTOConfig(max_length=32, **common)
        return trl.KTOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    if kind == "sft":
        args = trl.SFTConfig(max_length=32, **common)
        return trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    if kind == "rloo":
        common.setdefault("num_generations", 4)
        args = trl.RLOOConfig(max_completion_length=8, beta=0.04, **common)
        return trl.RLOOTrainer(
            model=model, reward_funcs=_reward_ids, args=args, train_dataset=ds, processing_class=tok
        )
    if kind == "grpo":
        common.setdefault("num_generations", 4)
        args = trl.GRPOConfig(max_completion_length=8, beta=0.04, **common)
        return trl.GRPOTrainer(
            model=model, reward_funcs=_reward_ids, args=args, train_dataset=ds, processing_class=tok
        )
    if kind == "distill":
        # the teacher: another random tiny Llama of the same vocabulary, wider (H = 48)
        teacher = os.path.join(out_dir, "teacher")
        wide = {"hidden_size": 48, "intermediate_size": 96}
        tiny_llama(vocab_size or len(tok), seed=1, **wide).save_pretrained(teacher)
        common.setdefault("beta", 0.5)
        args = trl.DistillationConfig(max_completion_length=8, **common)
        return trl.DistillationTrainer(
            model=model, teacher_model=teacher, args=args, train_dataset=ds, processing_class=tok
        )
    raise ValueError(f"unknown trainer {kind!r}; known: {TRAINERS}")


def run_trainer(kind: str, use_alignops: bool, *, steps: int = 3, measure=None, **config) -> dict:
    """Train ``steps`` steps; ``{"losses", "grad_norms", "trl_calls", "alignops_calls"}``, plus
    ``"measured"``: what ``measure(trainer.train)`` returns when ``measure`` is given (it must
    call its argument once)."""
    from alignops.bindings import trl as binding

    measured = None
    with tempfile.TemporaryDirectory() as tmp:
        if use_alignops:
            binding.enable()
        try:
            with binding.count_head_calls() as calls:
                trainer = build_trainer(kind, tmp, steps=steps, **config)
                if measure is None:
                    trainer.train()
                else:
                    measured = measure(trainer.train)
        finally:
            if use_alignops:
                binding.disable()
        rows = [row for row in trainer.state.log_history if "loss" in row]
    return {
        "losses": [row["loss"] for row in rows],
        "grad_norms": [row.get("grad_norm") for row in rows],
        "trl_calls": calls.trl,
        "alignops_calls": calls.alignops,
        "measured": measured,
    }


# ----------------------------------------------------------------------------------------------
# the must-show report: each run in a fresh process
# ----------------------------------------------------------------------------------------------


def _peak_extra_kib(fn) -> tuple[object, int]:
    """``(fn(), peak extra RSS in KiB while it ran)``, glibc tuned so RSS follows live bytes."""
    import gc

    from ._memory import _peak_during, _tune_malloc

    trim = _tune_malloc()
    gc.collect()
    trim()
    box = []
    peak, base, _ = _peak_during(lambda: box.append(fn()))
    return box[0], peak - base


def _child_trainer(kind: str, use_alignops: bool, steps: int, vocab: int) -> dict:
    result = run_trainer(kind, use_alignops, steps=steps, vocab_size=vocab, measure=_peak_extra_kib)
    kib = result.pop("measured")[1]
    return {**result, "peak_extra_mib": kib / 1024}


def _child_head(head: str, n: int, h: int, v: int) -> dict:
    """One forward + backward of a head on ``[n, h] x [v, h]`` fp32 inputs."""
    g = torch.Generator().manual_seed(0)
    hid = torch.randn(n, h, generator=g).requires_grad_()
    w = (torch.randn(v, h, generator=g) / h**0.5).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    outputs = ("log_probs", "entropy")

    def step():
        if head == "trl":
            from trl.kernels import ChunkedLogProbFunction

            lp, ent, *_ = ChunkedLogProbFunction.apply(hid, w, None, y, 1.0, 32768, None, 1.0, outputs)
        else:
            from alignops.bindings.trl import fused_head

            lp, ent, *_ = fused_head(hid, w, None, y, 1.0, None, None, 1.0, outputs)
        (lp.sum() + 0.1 * ent.sum()).backward()
        return float(lp.detach().sum())

    step()  # warm-up: thread pools, first allocations
    hid.grad = w.grad = None
    value, kib = _peak_extra_kib(step)
    grads_mib = (hid.numel() + w.numel()) * 4 / 2**20
    return {"sum_logps": value, "peak_extra_mib": kib / 1024, "grads_mib": grads_mib}


def head_errors_bf16(n: int, h: int, v: int) -> dict:
    """Max |error| of each head's log-probs and entropies under bf16 ``torch.autocast`` (fp32
    weight), against float64 math on the same bf16-rounded operands."""
    from alignops.bindings.trl import fused_head
    from trl.kernels import ChunkedLogProbFunction

    g = torch.Generator().manual_seed(1)
    hid = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * (2 / h**0.5)
    y = torch.randint(0, v, (n,), generator=g)
    z = hid.bfloat16().double() @ w.bfloat16().double().T
    logp_all = torch.log_softmax(z, -1)
    ref_lp = logp_all.gather(-1, y[:, None])[:, 0]
    ref_ent = -(logp_all.exp() * logp_all).sum(-1)
    outputs = ("log_probs", "entropy")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = {
            "trl": ChunkedLogProbFunction.apply(hid, w, None, y, 1.0, 32768, None, 1.0, outputs),
            "alignops": fused_head(hid, w, None, y, 1.0, None, None, 1.0, outputs),
        }
    return {
        k: ((lp.double() - ref_lp).abs().max().item(), (ent.double() - ref_ent).abs().max().item())
        for k, (lp, ent, *_) in got.items()
    }


def _in_child(*args: str) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "alignops.bench.trl_trainers", "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def report(trainers: list[str], steps: int, vocab: int, tokens: int, hidden: int) -> None:
    import trl

    model = f"tiny Llama (2 layers, H=32, V={vocab})"
    print(f"TRL {trl.__version__}, torch {torch.__version__}, CPU, fp32, plain SGD; {model}")
    print("peak = peak extra RSS during trainer.train() (VmHWM - VmRSS before it), fresh process per run\n")
    for kind in trainers:
        off = _in_child("trainer", kind, "off", str(steps), str(vocab))
        on = _in_child("trainer", kind, "on", str(steps), str(vocab))
        print(f"{kind.upper()}Trainer, {steps} steps")
        print(
            f"  {'step':>4}  {'loss TRL head':>14}  {'loss alignops':>14}  {'|diff|':>9}"
            f"  {'grad-norm rel diff':>18}"
        )
        rows = zip(off["losses"], on["losses"], off["grad_norms"], on["grad_norms"])
        for i, (a, b, ga, gb) in enumerate(rows, 1):
            print(f"  {i:>4}  {a:>14.7f}  {b:>14.7f}  {abs(a - b):>9.2e}  {abs(ga - gb) / ga:>18.2e}")
        for name, r in (("TRL head", off), ("alignops", on)):
            print(
                f"  {name:<9} TRL head calls {r['trl_calls']:>3}, alignops head calls "
                f"{r['alignops_calls']:>3}, peak {r['peak_extra_mib']:8.1f} MiB"
            )
        print()
    print(f"LM head alone, forward+backward (log-probs + entropy): N={tokens} tokens, H={hidden}, V={vocab}")
    for head in ("trl", "alignops"):
        r = _in_child("head", head, str(tokens), str(hidden), str(vocab))
        print(
            f"  {head:<9} peak {r['peak_extra_mib']:8.1f} MiB  (inputs' gradients {r['grads_mib']:.1f} MiB, "
            f"sum logps {r['sum_logps']:.4f})"
        )
    n_acc = min(tokens, 256)
    print(f"\nAccuracy under bf16 autocast (fp32 weight), N={n_acc}, H={hidden}, V={vocab}:")
    print("  max |error| against float64 on the same bf16-rounded operands")
    for head, (e_lp, e_ent) in head_errors_bf16(n_acc, hidden, vocab).items():
        print(f"  {head:<9} log-probs {e_lp:.2e}   entropy {e_ent:.2e}")


def main(argv: list[str] | None = None) -> None:
    first_line = __doc__.split("\n")[0]
    p = argparse.ArgumentParser(prog="python -m alignops.bench.trl_trainers", description=first_line)
    p.add_argument("--trainers", default="dpo,grpo,sft", help=f"comma list among {','.join(TRAINERS)}")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        torch.set_num_threads(1)
        what, *rest = a.child
        if what == "trainer":
            out = _child_trainer(rest[0], rest[1] == "on", int(rest[2]), int(rest[3]))
        else:
            out = _child_head(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
        print(json.dumps(out))
        return
    report([t.strip() for t in a.trainers.split(",") if t.strip()], a.steps, a.vocab, a.tokens, a.hidden)


if __name__ == "__main__":
    main()
