"""The package's import structure: no import cycle between modules, no deferred imports in the light
layer (sequence, rl, losses, fused), each light-layer module importable on its own in a fresh
interpreter, the public names where users find them, and no citation of documents users do not
have."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package name -> source folder (pyproject's package-dir: alignops.kernels lives in kernels/)
PACKAGES = {
    "alignops": ROOT / "alignops",
    "alignops.kernels": ROOT / "kernels",
    "alignops.bindings": ROOT / "bindings",
    "alignops.bench": ROOT / "bench",
}
LIGHT_LAYER = [
    "alignops._checks",
    "alignops.sequence",
    "alignops.rl",
    "alignops._advantages",
    "alignops.fused",
    "alignops.losses",
    "alignops.losses.policy",
    "alignops.losses.dpo",
]


def _modules() -> dict[str, Path]:
    """Every module of the package (``alignops`` and the mapped ``alignops.kernels``), by name."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("").parts
            if any(p.startswith(".") or p == "__pycache__" for p in rel):
                continue
            if pkg == "alignops" and rel[0] in ("kernels", "bindings", "bench"):  # mapped elsewhere
                continue
            name = ".".join((pkg, *rel))
            out[name.removesuffix(".__init__")] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if _is_package(path) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _top_level_imports(tree: ast.Module):
    """Import statements executed at import time (module body, ``if`` / ``try`` blocks), except
    ``if TYPE_CHECKING:`` blocks."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                stack.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend(node.body + node.orelse + node.finalbody)
            for h in node.handlers:
                stack.extend(h.body)


def import_graph() -> dict[str, set[str]]:
    """``module -> modules it imports at import time``. ``from X import y`` depends on ``X.y`` when
    that is a module, else on ``X``; importing ``P.sub`` also runs ``P/__init__`` unless ``P`` is an
    ancestor of the importer (then it is already being imported)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _top_level_imports(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                src = _resolve(mod, path, node)
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
            for target in targets:
                parts = target.split(".")
                for k in range(1, len(parts) + 1):
                    dep = ".".join(parts[:k])
                    is_ancestor = mod == dep or mod.startswith(dep + ".")
                    if dep in mods and dep != mod and (k == len(parts) or not is_ancestor):
                        graph[mod].add(dep)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    graph = import_graph()
    assert "alignops.rl" in graph and graph["alignops.losses.policy"] >= {"alignops.rl"}
    assert _cycles(graph) == []


def test_the_cycle_check_catches_a_cycle():
    """The checker itself: a back edge (rl importing the loss catalog) is reported."""
    graph = import_graph()
    graph["alignops.rl"].add("alignops.losses")
    assert any("alignops.rl" in c and "alignops.losses.policy" in c for c in _cycles(graph))


def test_rl_never_imports_the_loss_layer():
    graph = import_graph()
    for module in ("alignops.rl", "alignops._advantages"):
        assert not any(d.startswith("alignops.losses") for d in graph[module]), module


@pytest.mark.parametrize("module", LIGHT_LAYER)
def test_no_deferred_imports_in_the_light_layer(module):
    """Imports of the package run at module import time, never inside a function."""
    path = _modules()[module]
    tree = ast.parse(path.read_text())
    deferred = [
        (fn.name, node.lineno)
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(fn)
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("alignops"))
    ]
    assert deferred == []


def test_rl_imports_first_in_a_fresh_interpreter():
    """``import alignops.rl`` as the very first import works (it used to reach the loss catalog
    through deferred imports); the policy losses and the fused paths are then there."""
    code = "import alignops.rl, alignops.losses.policy, alignops.fused"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_public_names_stay_reachable():
    import alignops
    from alignops import losses, rl

    for name in ("grpo_loss", "gmpo_loss", "rloo_loss", "ppo_loss", "dpo_loss", "kto_loss", "LossOutput"):
        assert name in losses.__all__ and callable(getattr(losses, name))
    for name in (
        "kl_estimate",
        "group_advantages",
        "rloo_advantages",
        "compute_gae",
        "whiten",
        "ppo_rewards",
        "remax_advantages",
        "opo_advantages",
        "passk_advantages",
        "reinforce_pp_advantages",
        "reinforce_pp_baseline_advantages",
        "rollout_correction",
        "RolloutCorrection",
    ):
        assert getattr(alignops, name) is getattr(rl, name)
    for name in ("grpo_loss_from_hidden", "ppo_loss_from_hidden"):
        assert name in alignops.__all__ and getattr(alignops, name) is getattr(alignops.fused, name)


def test_docs_cite_papers_not_internal_documents():
    """The package, its docs, examples and tests cite papers (authors, year, arXiv id), never the
    project's internal design documents, which users do not have."""
    folders = ("alignops", "kernels", "bindings", "bench", "docs", "tests", "examples")
    files = [f for d in folders for f in sorted((ROOT / d).rglob("*")) if f.suffix in (".py", ".md")]
    files += [ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
    # the names spelled in parts so that this file does not match itself
    names = "|".join(["SP" + "EC", "ST" + "YLE", "DE" + "SIGN", "KERNEL-" + "REVIEW"])
    internal = re.compile(r"\b(" + names + r")(\.md\b|\s*\u00a7)|\b" + "SP" + r"EC\s+\u00a7")
    offenders = [str(f.relative_to(ROOT)) for f in files if internal.search(f.read_text())]
    assert files and offenders == []
