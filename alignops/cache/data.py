"""Datasets for the reference cache: read rows, recognise the layout, tokenize into sequences.

Files: JSON Lines (``.jsonl`` / ``.json``, one object per line), Parquet (``.parquet``), or a
directory written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` needs ``split``).

Layouts (``kind``), recognised from the columns, with text or already-tokenized columns:

    preference  prompt, chosen, rejected        | prompt_input_ids, chosen_input_ids, rejected_input_ids
    binary      prompt, completion, label (KTO) | prompt_input_ids, completion_input_ids, label
    listwise    prompt, completions (a list)    | prompt_input_ids, completions_input_ids
    completion  prompt, completion              | prompt_input_ids, completion_input_ids

Text goes through the tokenizer: the prompt with the tokenizer's special tokens (BOS), the
completion without them, followed by EOS (``add_eos``). Conversational rows (lists of
``{"role", "content"}`` messages) go through the chat template: the prompt rendered with the
generation prompt, the completion as the rest of the rendered conversation. Tokenized columns
are used as they are. Every sequence is ``prompt + completion`` with its completion start; the
same function (:func:`example_sequences`) gives a training loop the very ids that were cached.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

KINDS = ("preference", "binary", "listwise", "completion")
# completion columns of each layout, in the order their sequences are listed per example
_COMPLETIONS = {
    "preference": ("chosen", "rejected"),
    "binary": ("completion",),
    "listwise": ("completions",),
    "completion": ("completion",),
}


def load_rows(data: str | os.PathLike, *, split: str | None = None) -> list[dict]:
    """Rows (dicts) of a JSONL / Parquet file or a saved ``datasets`` directory."""
    path = Path(data)
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split is None:
                if len(ds) != 1:
                    raise ValueError(f"{str(data)!r} holds splits {sorted(ds)}: name one with split=")
                split = next(iter(ds))
            if split not in ds:
                raise ValueError(f"split {split!r} not in {str(data)!r} (splits: {sorted(ds)})")
            ds = ds[split]
        return ds.to_list()
    if not path.is_file():
        raise FileNotFoundError(f"dataset {str(data)!r} does not exist")
    if path.suffix in (".jsonl", ".json"):
        rows = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as e:
                        raise ValueError(f"{path.name} line {n} is not JSON: {e}") from e
        return rows
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(
        f"unknown dataset format {path.suffix!r} (use .jsonl, .parquet or a saved datasets directory)"
    )


def detect_kind(columns) -> str:
    """The layout of a dataset from its column names (see the module docstring)."""
    cols = set(columns)

    def has(name: str) -> bool:
        return name in cols or f"{name}_input_ids" in cols

    if has("chosen") and has("rejected"):
        return "preference"
    if has("completions"):
        return "listwise"
    if has("completion"):
        return "binary" if "label" in cols else "completion"
    raise ValueError(
        f"cannot tell the dataset layout from its columns {sorted(cols)}: expected prompt with chosen/"
        "rejected, completion (+ label), or completions (or their *_input_ids tokenized forms)"
    )


def _is_chat(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(m, dict) and "role" in m for m in x)


def _tok(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _text_pair(tokenizer, prompt, completion, add_eos: bool) -> tuple[list[int], list[int]]:
    if _is_chat(prompt) or _is_chat(completion):
        if not (_is_chat(prompt) and _is_chat(completion)):
            raise ValueError("a conversational row needs both prompt and completion as lists of messages")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("conversational rows need a tokenizer with a chat template")
        head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        if not full.startswith(head):
            raise ValueError("the chat template renders the conversation without its prompt as a prefix")
        return _tok(tokenizer, head, False), _tok(tokenizer, full[len(head) :], False)
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise TypeError(
            f"prompt and completion must be text or messages, got {type(prompt).__name__}, "
            f"{type(completion).__name__}"
        )
    ids = _tok(tokenizer, completion, False)
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("add_eos needs a tokenizer with an eos token")
        ids.append(int(tokenizer.eos_token_id))
    return _tok(tokenizer, prompt, True), ids


def _int_list(x, what: str) -> list[int]:
    if not isinstance(x, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in x):
        raise TypeError(f"{what} must be a list of token ids")
    return list(x)


def example_sequences(
    row: dict,
    kind: str,
    tokenizer=None,
    *,
    add_eos: bool = True,
    max_length: int | None = None,
) -> list[tuple[list[int], list[int]]]:
    """The ``(prompt_ids, completion_ids)`` sequences of one example, in the order of its layout
    (preference: chosen, rejected; listwise: its completions; otherwise one)."""
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {KINDS}")
    pairs = []
    for col in _COMPLETIONS[kind]:
        if "prompt_input_ids" in row and f"{col}_input_ids" in row:
            prompt = _int_list(row["prompt_input_ids"], "prompt_input_ids")
            comps = row[f"{col}_input_ids"]
            comps = comps if col == "completions" else [comps]
            pairs += [(prompt, _int_list(c, f"{col}_input_ids")) for c in comps]
        elif "prompt" in row and col in row:
            if tokenizer is None:
                raise ValueError("text columns need a tokenizer")
            comps = row[col] if col == "completions" else [row[col]]
            if col == "completions" and not isinstance(comps, list):
                raise TypeError("completions must be a list")
            pairs += [_text_pair(tokenizer, row["prompt"], c, add_eos) for c in comps]
        else:
            raise ValueError(f"a {kind} row needs prompt and {col} (or their _input_ids), got {sorted(row)}")
    out = []
    for prompt, comp in pairs:
        if not prompt:
            raise ValueError(
                "a sequence needs at least one prompt token (the first completion token is "
                "scored from the position before it); add a BOS token"
            )
        if not comp:
            raise ValueError("a sequence has an empty completion")
        if max_length is not None and len(prompt) + len(comp) > max_length:
            if len(prompt) >= max_length:
                raise ValueError(
                    f"a prompt of {len(prompt)} tokens leaves no room under max_length={max_length}"
                )
            comp = comp[: max_length - len(prompt)]
        out.append((prompt, comp))
    return out


__all__ = ["KINDS", "detect_kind", "example_sequences", "load_rows"]
