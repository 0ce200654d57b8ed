"""Reference cache: precomputed values == a live float64 reference forward; losses from the cache
== losses with the live reference; lookups by key survive shuffling and filtering; every layout
and file format; the collator and the plain-loop lookup."""

from __future__ import annotations

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

import alignops  # noqa: E402
from alignops.cache import (  # noqa: E402
    CacheKeyError,
    FingerprintMismatchError,
    ReferenceCache,
    ReferenceCollator,
    example_sequences,
    precompute,
    reference_logps,
)
from tests._assert import assert_close, assert_close_lowp, assert_topk  # noqa: E402
from tests._cache_models import VOCAB, make_model_dir, make_tokenizer, preference_rows, write_jsonl  # noqa: E402

N_ROWS = 13  # not a multiple of the batch (4) or the shard (8) size
TOPK = 5


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    model_dir = make_model_dir(root / "model", seed=1)
    rows = preference_rows(N_ROWS, seed=2)
    data = write_jsonl(root / "data.jsonl", rows)
    cache_dir = root / "cache"
    precompute(
        model_dir, data, cache_dir, batch_size=4, shard_size=8, per_token=True, topk=TOPK, progress=False
    )
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    return {"model": model_dir, "rows": rows, "cache": cache_dir, "ref": ref, "tok": make_tokenizer()}


def _live(ref, prompt: list[int], comp: list[int]) -> torch.Tensor:
    """Float64 per-token log-probs of ``comp`` after ``prompt``, from the model's own logits."""
    ids = torch.tensor([prompt + comp])
    with torch.no_grad():
        logp = torch.log_softmax(ref(input_ids=ids).logits[0].double(), -1)
    return logp[len(prompt) - 1 : -1], logp[len(prompt) - 1 : -1].gather(-1, ids[0, len(prompt) :, None])[
        :, 0
    ]


def test_cached_values_equal_live_reference(built):
    cache = ReferenceCache(built["cache"], model=built["model"])
    for row in built["rows"]:
        for prompt, comp in example_sequences(row, "preference", built["tok"]):
            full, live = _live(built["ref"], prompt, comp)
            sums, counts = cache.sequence_logps(prompt_ids=[prompt], completion_ids=[comp])
            assert counts.tolist() == [len(comp)] and sums.dtype == torch.float32
            assert_close("sum", live.sum()[None], sums, atol=2e-5, rtol=2e-6)
            tok, mask = cache.token_logps(prompt_ids=[prompt], completion_ids=[comp])
            assert mask.all() and tok.shape == (1, len(comp))
            assert_close("per-token", live[None], tok, atol=2e-5, rtol=2e-6)
            ids, lps, _ = cache.topk_logps(prompt_ids=[prompt], completion_ids=[comp])
            assert_topk("topk", full, ids[0], lps[0], torch.ones(len(comp), dtype=torch.bool), atol=2e-5)


def _policy_logps(policy, tok, rows):
    out = []
    for key in ("chosen", "rejected"):
        seqs = [example_sequences(r, "preference", tok)[0 if key == "chosen" else 1] for r in rows]
        out.append(torch.stack([_live(policy, p, c)[1].sum() for p, c in seqs]))
    return out


def test_dpo_loss_from_cache_equals_live_reference(built, tmp_path):
    torch.manual_seed(5)
    policy = transformers.AutoModelForCausalLM.from_pretrained(built["model"]).double()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = built["rows"][:7]
    pol_c, pol_r = (x.requires_grad_() for x in _policy_logps(policy, built["tok"], rows))
    ref_c, ref_r = _policy_logps(built["ref"], built["tok"], rows)
    live = alignops.losses.dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=0.3)
    cache = ReferenceCache(built["cache"])
    batch = {"prompt_input_ids": [], "chosen_input_ids": [], "rejected_input_ids": []}
    for r in rows:
        (p, c), (_, j) = example_sequences(r, "preference", built["tok"])
        batch["prompt_input_ids"].append(p)
        batch["chosen_input_ids"].append(c)
        batch["rejected_input_ids"].append(j)
    refs = reference_logps(cache, batch, kind="preference")
    cached = alignops.losses.dpo_loss(pol_c, pol_r, **refs, beta=0.3)
    assert_close("dpo loss", live.loss.detach(), cached.loss.detach(), atol=1e-6)
    assert_close("dpo losses", live.losses.detach(), cached.losses.detach(), atol=1e-6)
    g = torch.rand(len(rows), dtype=torch.float64)  # random upstream gradient: same policy gradient
    (ga,) = torch.autograd.grad((live.losses * g).sum(), [pol_c], retain_graph=True)
    (gb,) = torch.autograd.grad((cached.losses * g).sum(), [pol_c])
    assert_close("d loss / d policy_chosen", ga, gb, atol=1e-6)
    assert not torch.allclose(ref_c, pol_c.detach(), atol=1e-3)  # the reference is not the policy


def test_ld_dpo_references_from_per_token_values(built):
    """LD-DPO (Liu et al. 2024, arXiv:2409.06411): shared-length head + alpha * tail, per pair."""
    alpha = 0.37
    rows = built["rows"][:6]
    batch = {"prompt_input_ids": [], "chosen_input_ids": [], "rejected_input_ids": []}
    want_c, want_r = [], []
    for r in rows:
        (p, c), (_, j) = example_sequences(r, "preference", built["tok"])
        batch["prompt_input_ids"].append(p)
        batch["chosen_input_ids"].append(c)
        batch["rejected_input_ids"].append(j)
        lc, lr = _live(built["ref"], p, c)[1], _live(built["ref"], p, j)[1]
        n = min(len(c), len(j))
        want_c.append(lc[:n].sum() + alpha * lc[n:].sum())
        want_r.append(lr[:n].sum() + alpha * lr[n:].sum())
    assert any(len(c) != len(j) for c, j in zip(batch["chosen_input_ids"], batch["rejected_input_ids"]))
    refs = reference_logps(ReferenceCache(built["cache"]), batch, ld_alpha=alpha)
    assert_close("ld chosen", torch.stack(want_c), refs["ref_chosen_logps"], atol=2e-5, rtol=2e-6)
    assert_close("ld rejected", torch.stack(want_r), refs["ref_rejected_logps"], atol=2e-5, rtol=2e-6)


def test_shuffled_filtered_dataset_reads_same_values(built):
    cache = ReferenceCache(built["cache"])
    rows = list(built["rows"])
    random.Random(7).shuffle(rows)
    kept = rows[::2]
    seqs = [s for r in kept for s in example_sequences(r, "preference", built["tok"])]
    sums, _ = cache.sequence_logps(prompt_ids=[p for p, _ in seqs], completion_ids=[c for _, c in seqs])
    live = torch.stack([_live(built["ref"], p, c)[1].sum() for p, c in seqs])
    assert_close("shuffled+filtered", live, sums, atol=2e-5, rtol=2e-6)
    # a sequence that was never precomputed (one token changed) is refused, not zero
    p, c = seqs[0]
    with pytest.raises(CacheKeyError, match="1 of 2 sequences are not in the reference cache"):
        cache.sequence_logps(prompt_ids=[p, p], completion_ids=[c, c[:-1] + [(c[-1] + 1) % 60]])
    # the same tokens with another completion boundary are another sequence
    with pytest.raises(CacheKeyError):
        cache.sequence_logps(prompt_ids=[p + c[:1]], completion_ids=[c[1:]])


def test_collator_and_padded_batch_on_device(built):
    cache = ReferenceCache(built["cache"])
    tok = built["tok"]
    feats = []
    for r in built["rows"][:5]:
        (p, c), (_, j) = example_sequences(r, "preference", tok)
        feats.append({"prompt_input_ids": p, "chosen_input_ids": c, "rejected_input_ids": j, "score": 1.5})
    loader = torch.utils.data.DataLoader(feats, batch_size=5, collate_fn=ReferenceCollator(cache))
    batch = next(iter(loader))
    live_c = torch.stack(
        [_live(built["ref"], f["prompt_input_ids"], f["chosen_input_ids"])[1].sum() for f in feats]
    )
    live_r = torch.stack(
        [_live(built["ref"], f["prompt_input_ids"], f["rejected_input_ids"])[1].sum() for f in feats]
    )
    assert_close("collator chosen", live_c, batch["ref_chosen_logps"], atol=2e-5, rtol=2e-6)
    assert_close("collator rejected", live_r, batch["ref_rejected_logps"], atol=2e-5, rtol=2e-6)
    assert batch["chosen_input_ids"].shape[0] == 5 and batch["score"].tolist() == [1.5] * 5
    pair = cache.pair_logps(
        [f["prompt_input_ids"] for f in feats],
        [f["chosen_input_ids"] for f in feats],
        [f["rejected_input_ids"] for f in feats],
    )
    assert torch.equal(pair["ref_chosen_logps"], batch["ref_chosen_logps"])
    assert torch.equal(pair["ref_rejected_logps"], batch["ref_rejected_logps"])
    # a plain loop on the padded tensors the collator built: the same values, on the batch's device
    padded = {k: v for k, v in batch.items() if not k.startswith("ref_")}
    refs = reference_logps(cache, padded, kind="preference", per_token=True)
    assert_close("padded chosen", live_c, refs["ref_chosen_logps"], atol=2e-5, rtol=2e-6)
    assert refs["ref_chosen_logps"].device == padded["chosen_input_ids"].device
    n = refs["ref_chosen_logps_token_mask"].sum(-1)
    assert n.tolist() == [len(f["chosen_input_ids"]) for f in feats]
    assert_close(
        "per-token sums", refs["ref_chosen_logps"], refs["ref_chosen_logps_token_logps"].sum(-1), atol=1e-5
    )


@pytest.mark.parametrize("fmt", ["parquet", "datasets"])
def test_layouts_and_formats(built, tmp_path, fmt):
    """KTO, listwise and prompt/completion rows, chat-templated or pre-tokenized, from Parquet or a
    saved datasets directory: the cached sums are the live reference's."""
    import datasets

    rng = random.Random(3)
    words = [f"w{i}" for i in range(60)]

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))

    tok = built["tok"]
    cases = {
        "binary": [{"prompt": text(3), "completion": text(4 + i % 3), "label": i % 2 == 0} for i in range(5)],
        "listwise": [{"prompt": text(2), "completions": [text(3), text(5), text(2)]} for _ in range(3)],
        "completion": [
            {
                "prompt": [{"role": "user", "content": text(3)}],
                "completion": [{"role": "assistant", "content": text(4)}],
            }
            for _ in range(3)
        ],
    }
    pre = [
        {"prompt_input_ids": tok(text(3))["input_ids"], "completion_input_ids": [5, 9, 11, 3]}
        for _ in range(3)
    ]
    cases["completion-pretokenized"] = pre
    for name, rows in cases.items():
        kind = name.split("-")[0]
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            data = tmp_path / f"{name}.parquet"
            pq.write_table(pa.Table.from_pylist(rows), data)
        else:
            data = tmp_path / f"{name}-ds"
            datasets.Dataset.from_list(rows).save_to_disk(str(data))
        out = tmp_path / f"{name}-cache"
        precompute(built["model"], data, out, batch_size=3, shard_size=4, progress=False)
        cache = ReferenceCache(out, model=built["model"])
        seqs = [s for r in rows for s in example_sequences(r, kind, tok)]
        assert len(cache) == len({tuple(p + c) for p, c in seqs})
        feats = {"prompt_input_ids": [example_sequences(r, kind, tok)[0][0] for r in rows]}
        if kind == "listwise":
            feats["completions_input_ids"] = [[c for _, c in example_sequences(r, kind, tok)] for r in rows]
        else:
            feats["completion_input_ids"] = [example_sequences(r, kind, tok)[0][1] for r in rows]
        if kind == "binary":
            feats["label"] = [r["label"] for r in rows]
        refs = reference_logps(cache, feats, kind=kind)
        live = torch.stack([_live(built["ref"], p, c)[1].sum() for p, c in seqs])
        assert_close(
            f"{name} {fmt}", live.view(len(rows), -1).squeeze(-1), refs["ref_logps"], atol=2e-5, rtol=2e-6
        )
        if kind == "binary":
            lab = torch.tensor(feats["label"])
            assert_close("kto chosen", live[lab], refs["ref_chosen_logps"], atol=2e-5, rtol=2e-6)
            assert_close("kto rejected", live[~lab], refs["ref_rejected_logps"], atol=2e-5, rtol=2e-6)


def test_chat_template_and_example_ids(built, tmp_path):
    rows = preference_rows(4, seed=9, chat=True)
    rows.append(dict(rows[0], id="dup"))  # the same conversation under another example id
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "chat-cache"
    precompute(built["model"], data, out, id_column="id", batch_size=2, shard_size=2, progress=False)
    cache = ReferenceCache(out)
    assert len(cache) == 10  # 5 examples x 2, the duplicate keyed apart by its id
    (p, c), _ = example_sequences(rows[0], "preference", built["tok"])
    user, answer = rows[0]["prompt"][0]["content"], rows[0]["chosen"][0]["content"]
    assert built["tok"].decode(p) == f"<s> user : {user} </s> assistant :"
    assert built["tok"].decode(c) == f"{answer} </s>"
    a, _ = cache.sequence_logps(prompt_ids=[p, p], completion_ids=[c, c], example_ids=["ex0", "dup"])
    live = _live(built["ref"], p, c)[1].sum()
    assert_close("chat", torch.stack([live, live]), a, atol=2e-5, rtol=2e-6)
    with pytest.raises(CacheKeyError):  # keyed with ids: a lookup without the id is not a match
        cache.sequence_logps(prompt_ids=[p], completion_ids=[c])


def test_bfloat16_reference(built, tmp_path):
    """A bf16 reference: the cached sums are as close to float64 (on the bf16 weights) as the
    model's own bf16 logits path (three-way rule)."""
    rows = built["rows"][:5]
    out = tmp_path / "bf16"
    precompute(built["model"], write_jsonl(tmp_path / "d.jsonl", rows), out, dtype="bfloat16", progress=False)
    cache = ReferenceCache(out, options={"dtype": "bfloat16"})
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(built["model"], dtype=torch.bfloat16).eval()
    ref64 = (
        transformers.AutoModelForCausalLM.from_pretrained(built["model"], dtype=torch.bfloat16)
        .double()
        .eval()
    )
    seqs = [s for r in rows for s in example_sequences(r, "preference", built["tok"])]
    live = torch.stack([_live(ref64, p, c)[1].sum() for p, c in seqs])
    base = []
    for p, c in seqs:
        with torch.no_grad():
            logits = bf16(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1]
        base.append(torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(c)[:, None]).sum())
    sums, _ = cache.sequence_logps(prompt_ids=[p for p, _ in seqs], completion_ids=[c for _, c in seqs])
    assert_close_lowp("bf16 sums", live, sums, torch.stack(base))
    with pytest.raises(FingerprintMismatchError, match="dtype"):
        ReferenceCache(out, options={"dtype": "float32"})


def _gemma2(path):
    cfg = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, final_logit_softcapping=3.0,
    )  # fmt: skip
    return transformers.Gemma2ForCausalLM(cfg), "softcap", 3.0


def _cohere(path):
    cfg = transformers.CohereConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, logit_scale=0.37,
    )  # fmt: skip
    return transformers.CohereForCausalLM(cfg), "logit_scale", 0.37


@pytest.mark.parametrize("make", [_gemma2, _cohere], ids=["gemma2-softcap", "cohere-logit-scale"])
def test_model_logit_transform_is_applied_and_recorded(tmp_path, make):
    """The model's own soft-cap / logit scale (read from its config) match its logits."""
    torch.manual_seed(4)
    model, field, value = make(tmp_path)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    rows = preference_rows(3, seed=8)
    out = tmp_path / "cache"
    precompute(model_dir, write_jsonl(tmp_path / "d.jsonl", rows), out, progress=False)
    cache = ReferenceCache(out, options={field: value})
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    seqs = [s for r in rows for s in example_sequences(r, "preference", make_tokenizer())]
    live = torch.stack([_live(ref, p, c)[1].sum() for p, c in seqs])
    sums, _ = cache.sequence_logps(prompt_ids=[p for p, _ in seqs], completion_ids=[c for _, c in seqs])
    assert_close(field, live, sums, atol=2e-5, rtol=2e-6)
