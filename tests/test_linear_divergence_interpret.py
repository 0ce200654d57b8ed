"""The fused two-head divergence Triton kernels under the interpreter, against float64
(cases and their reasons: ``tests/interpreted/linear_divergence.py``; harness: ``tests/_interpret.py``)."""

import pytest
from _interpret import case_functions, check_function, run_cases

CASES = "tests/interpreted/linear_divergence.py"
RUNS = {"main": None}
pytestmark = pytest.mark.interpret


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_cases(CASES, tmp_path_factory.mktemp("interpret"), RUNS)


@pytest.mark.parametrize("function", case_functions(CASES))
def test_interpreted(results, function):
    check_function(results, function)
