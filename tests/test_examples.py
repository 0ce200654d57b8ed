"""Every script in ``examples/`` runs on the CPU and its per-step losses equal an independent
computation of the same training: the model's own logits path (float64 log_softmax, HF's loss)
or the same TRL trainer on TRL's own head."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from tests._assert import assert_close  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_example_is_tested_and_none_is_packaged():
    tested = {"dpo_plain_pytorch", "trl_dpo", "trl_grpo", "sft_patch"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested
    # scripts, not a package: no __init__.py, and pyproject lists its packages explicitly
    import tomllib

    cfg = tomllib.loads((EXAMPLES.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert not (EXAMPLES / "__init__.py").exists()
    assert not any("examples" in name for name in cfg["packages"])


def _seq_logps_from_logits(model, ids, labels):
    logits = model(input_ids=ids).logits[:, :-1].double()
    y = labels[:, 1:]
    lp = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    return torch.where(y != -100, lp, 0.0).sum(-1)


def test_dpo_plain_pytorch_matches_the_logits_path():
    mod = _load("dpo_plain_pytorch")
    looked_up = []  # the reference values the example read from its cache
    lookup = mod.reference_logps
    mod.reference_logps = lambda *a, **k: looked_up.append(lookup(*a, **k)) or looked_up[-1]
    got = mod.main(steps=3)
    # the same loop with the model's own logits and DPO written out: -log sigmoid(beta * margin)
    torch.manual_seed(0)
    policy = mod.tiny_llama(211)
    ref = copy.deepcopy(policy)
    ids, labels = mod.make_pairs(211)
    with torch.no_grad():
        r = _seq_logps_from_logits(ref, ids, labels)
    p = ids.shape[0] // 2
    assert len(looked_up) == 1  # one lookup in a cache precomputed by the example
    cached = torch.cat([looked_up[0]["ref_chosen_logps"], looked_up[0]["ref_rejected_logps"]])
    assert_close("cached reference log-probs", r, cached, atol=2e-4, rtol=1e-5)
    opt = torch.optim.SGD(policy.parameters(), lr=0.05)
    want = []
    for _ in range(3):
        s = _seq_logps_from_logits(policy, ids, labels)
        loss = -F.logsigmoid(0.1 * ((s[:p] - r[:p]) - (s[p:] - r[p:]))).mean()
        opt.zero_grad()
        loss.float().backward()
        opt.step()
        want.append(loss.item())
    assert_close("DPO losses", torch.tensor(want), torch.tensor(got), atol=1e-6, rtol=1e-5)
    assert got[-1] < got[0]


def test_sft_patch_matches_the_models_own_loss():
    mod = _load("sft_patch")
    got = mod.main(steps=3)
    torch.manual_seed(0)
    model = mod.tiny_llama(211)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 211, (4, 16), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    want = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=labels).loss  # HF's loss on full logits
        opt.zero_grad()
        loss.backward()
        opt.step()
        want.append(loss.item())
    assert_close("SFT losses", torch.tensor(want), torch.tensor(got), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name,kind", [("trl_dpo", "dpo"), ("trl_grpo", "grpo")])
def test_trl_examples_match_trls_own_head(name, kind):
    pytest.importorskip("trl")
    from tests._trl_runs import trainer_run

    got = _load(name).main(steps=3)
    want = trainer_run(kind, False)["losses"]  # TRL's own head (shared with the binding tests)
    assert len(got) == 3
    assert_close(f"{kind} losses", torch.tensor(want), torch.tensor(got), atol=1e-6, rtol=1e-5)
