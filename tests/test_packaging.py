"""The wheel holds every subpackage: pyproject lists packages explicitly (``kernels/``, ``bindings/``
and ``bench/`` are mapped under ``alignops``), so a new folder that is not listed would import in
an editable install and be missing from a normal one."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    roots = {name: ROOT / folder for name, folder in cfg["package-dir"].items()}
    found = set()
    for name, folder in roots.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert found - listed == set(), (
        f"package folders missing from pyproject's packages: {sorted(found - listed)}"
    )
    assert listed - found == set(), f"listed packages without a folder: {sorted(listed - found)}"
