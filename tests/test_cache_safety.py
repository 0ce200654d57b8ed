"""Reference cache safety: a flipped byte, a truncated shard, an unfinished run, another model's
weights or tokenizer, other options, a missing key: each refused with a clear error (library and
``alignops cache verify``); bad arguments raise."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from alignops.cache import (  # noqa: E402
    CacheCorruptError,
    CacheError,
    CacheIncompleteError,
    FingerprintMismatchError,
    ReferenceCache,
    precompute,
    sequence_key,
    verify_cache,
)
from alignops.cache.cli import cache_main  # noqa: E402
from tests._cache_models import make_model_dir, preference_rows, write_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    model_dir = make_model_dir(root / "model", seed=3)
    data = write_jsonl(root / "data.jsonl", preference_rows(7, seed=4))
    precompute(model_dir, data, root / "cache", batch_size=3, shard_size=6, progress=False)
    return {"root": root, "model": model_dir, "data": data, "cache": root / "cache"}


@pytest.fixture
def copy(built, tmp_path):
    dst = tmp_path / "cache"
    shutil.copytree(built["cache"], dst)
    return dst


def _shard(path):
    return sorted(path.glob("shard-*.safetensors"))[1]


def test_intact_cache_opens_and_verifies(built, capsys):
    cache = ReferenceCache(
        built["cache"], model=built["model"], options={"temperature": 1.0, "dtype": "float32"}
    )
    assert len(cache) == 14
    assert cache_main(["verify", str(built["cache"]), "--model", str(built["model"])]) == 0
    assert "every checksum and the model's fingerprint matches" in capsys.readouterr().out
    assert cache_main(["show", str(built["cache"])]) == 0
    shown = capsys.readouterr().out
    assert "preference  7 examples -> 14 sequences" in shown and "temperature=1.0" in shown
    assert not list(built["cache"].glob("*.tmp")) and not list(built["cache"].glob(".*"))


def test_flipped_byte_is_refused(copy, capsys):
    shard = _shard(copy)
    data = bytearray(shard.read_bytes())
    data[len(data) - 3] ^= 0x01  # inside the tensor data, not the header: it would still parse
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match=f"{shard.name} fails its checksum"):
        ReferenceCache(copy)
    assert cache_main(["verify", str(copy)]) == 1
    assert "CacheCorruptError" in capsys.readouterr().err


def test_truncated_shard_is_refused(copy, capsys):
    shard = _shard(copy)
    shard.write_bytes(shard.read_bytes()[:-8])
    for verify in (True, False):
        with pytest.raises(CacheCorruptError, match="truncated|recorded"):
            ReferenceCache(copy, verify=verify)
    assert cache_main(["verify", str(copy)]) == 1
    assert "truncated" in capsys.readouterr().err


def test_edited_manifest_is_refused(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["options"]["temperature"] = 0.5  # would make the cache claim other options
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheCorruptError, match="manifest .* fails its checksum"):
        ReferenceCache(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(CacheCorruptError, match="cannot be read"):
        ReferenceCache(copy)


def test_cli_precompute_reports_refusals(built, copy, capsys):
    from alignops.cache.cli import precompute_main

    args = ["--model", str(built["model"]), "--data", str(built["data"]), "--output", str(copy)]
    assert precompute_main([*args, "--batch-size", "3", "--shard-size", "6", "--temperature", "0.5"]) == 2
    assert "holds a cache of another run (differs in: options)" in capsys.readouterr().err


def test_unfinished_cache_is_refused(copy, capsys):
    (copy / "manifest.json").unlink()
    with pytest.raises(CacheIncompleteError, match="interrupted. Rerun the same precompute"):
        ReferenceCache(copy)
    assert cache_main(["verify", str(copy)]) == 1
    with pytest.raises(CacheError, match="not a reference cache"):
        ReferenceCache(copy.parent)


def test_other_model_weights_or_tokenizer_are_refused(built, tmp_path, capsys):
    other = make_model_dir(tmp_path / "other", seed=11)
    with pytest.raises(FingerprintMismatchError, match="weights_sha256"):
        ReferenceCache(built["cache"], model=other)
    assert cache_main(["verify", str(built["cache"]), "--model", str(other)]) == 1
    assert "weights_sha256" in capsys.readouterr().err
    same_weights = tmp_path / "retok"
    shutil.copytree(built["model"], same_weights)
    cfg = json.loads((same_weights / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 77
    (same_weights / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FingerprintMismatchError, match="tokenizer_sha256") as e:
        ReferenceCache(built["cache"], model=same_weights)
    assert "weights_sha256" not in str(e.value)


@pytest.mark.parametrize(
    "options, field",
    [({"temperature": 0.7}, "temperature"), ({"dtype": "bfloat16"}, "dtype"), ({"softcap": 30.0}, "softcap")],
)
def test_other_options_are_refused(built, options, field):
    with pytest.raises(FingerprintMismatchError, match=field):
        ReferenceCache(built["cache"], options=options)
    with pytest.raises(FingerprintMismatchError, match=field):
        verify_cache(built["cache"], options=options)


def test_precompute_refuses_to_mix_runs(built, copy):
    with pytest.raises(CacheError, match="another run .*options"):
        precompute(
            built["model"], built["data"], copy, temperature=0.5, batch_size=3, shard_size=6, progress=False
        )
    other = make_model_dir(copy.parent / "other", seed=12)
    with pytest.raises(CacheError, match="another run .*fingerprint"):
        precompute(other, built["data"], copy, batch_size=3, shard_size=6, progress=False)
    ReferenceCache(copy)  # untouched
    not_cache = copy.parent / "stuff"
    not_cache.mkdir()
    (not_cache / "notes.txt").write_text("x")
    with pytest.raises(CacheError, match="not empty"):
        precompute(built["model"], built["data"], not_cache, progress=False)


def test_missing_values_and_bad_arguments(built, tmp_path):
    cache = ReferenceCache(built["cache"])
    with pytest.raises(CacheError, match="no per-token values"):
        cache.token_logps(prompt_ids=[[2, 5]], completion_ids=[[6]])
    with pytest.raises(CacheError, match="no top-k values"):
        cache.topk_logps(prompt_ids=[[2, 5]], completion_ids=[[6]])
    with pytest.raises(KeyError, match="1 of 1 sequences are not in the reference cache"):
        cache.sequence_logps(prompt_ids=[[2, 5]], completion_ids=[[6]])
    with pytest.raises(ValueError, match="at least one token"):
        sequence_key([4, 5], 0)
    with pytest.raises(ValueError, match="1-D"):
        sequence_key([[4, 5]], 1)
    assert sequence_key([4, 5, 6], 1) != sequence_key([4, 5, 6], 2) != sequence_key([4, 5, 6], 2, "a")
    assert sequence_key(torch.tensor([4, 5, 6]).tolist(), 1) == sequence_key((4, 5, 6), 1)
    for kwargs, msg in [
        ({"dtype": "int8"}, "unknown dtype"),
        ({"topk": 65}, "topk"),
        ({"temperature": 0.0}, "temperature"),
    ]:
        with pytest.raises(ValueError, match=msg):
            precompute(built["model"], built["data"], tmp_path / "x", progress=False, **kwargs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w1", "answer": "w2"}\n')
    with pytest.raises(ValueError, match="cannot tell the dataset layout"):
        precompute(built["model"], bad, tmp_path / "y", progress=False)
    with pytest.raises(FileNotFoundError):
        precompute(built["model"], tmp_path / "nope.jsonl", tmp_path / "z", progress=False)
