"""The README's code runs as written: every ```python block, and the shape of the quick start.

Each Python block is executed on its own (fresh namespace, fixed seed); the blocks build their
own tiny inputs and tiny random transformers models, nothing is downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.S | re.M)
HEADING = re.compile(r"^#+ (.+)$", re.M)


def _blocks(language: str) -> list[tuple[str, str]]:
    """``(nearest heading above, code)`` of every fenced block of ``language``."""
    text = README.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        if m.group(1) == language:
            headings = HEADING.findall(text[: m.start()])
            blocks.append((headings[-1] if headings else "top", m.group(2)))
    return blocks


PYTHON_BLOCKS = _blocks("python")


def _id(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


def test_readme_has_the_three_workflows():
    headings = " / ".join(h for h, _ in PYTHON_BLOCKS)
    for word in ("SFT", "DPO", "GRPO"):
        assert word in headings, headings
    assert "docs/interfaces.md" in README.read_text()


@pytest.mark.parametrize("heading,code", PYTHON_BLOCKS, ids=[_id(h) for h, _ in PYTHON_BLOCKS])
def test_python_block_runs(heading, code):
    if "import transformers" in code:
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    namespace = {"__name__": "__readme__"}
    exec(compile(code, f"README.md ({heading})", "exec"), namespace)
    loss = namespace.get("loss")
    if loss is None and "out" in namespace:
        loss = getattr(namespace["out"], "loss", None)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and torch.isfinite(loss), heading


def test_quick_start_is_two_commands():
    """One command for the benchmarks, one for the tests (CI runs the first one as it is)."""
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    code = FENCE.search(section).group(2)
    commands = [line.split("#")[0].strip() for line in code.splitlines() if line.strip()]
    assert commands == [
        'pip install ".[bench]" && alignops bench --quick',
        'pip install -e ".[test]" && python -m pytest -q',
    ]
