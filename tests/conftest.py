"""Shared pytest setup.

* ``ALIGNOPS_POISON=1``: every output buffer allocated through ``alignops.kernels._common.empty``
  is filled with NaN first, so an element a kernel forgets to write fails the test.
* ``cuda`` marked tests skip cleanly on machines without a GPU.
"""

import os

os.environ.setdefault("ALIGNOPS_POISON", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
