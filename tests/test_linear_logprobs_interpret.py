"""The fused linear log-probs Triton kernels under the interpreter, against float64
(cases and their reasons: ``tests/interpreted/linear_logprobs.py``; harness: ``tests/_interpret.py``)."""

import pytest
from _interpret import case_functions, check_function, run_cases

CASES = "tests/interpreted/linear_logprobs.py"
# the int64-offset case alone: a segfault there (an offset that wrapped) cannot hide the others
RUNS = {"main": "not test_int64_offsets", "int64": "test_int64_offsets"}
pytestmark = pytest.mark.interpret


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_cases(CASES, tmp_path_factory.mktemp("interpret"), RUNS)


@pytest.mark.parametrize("function", case_functions(CASES))
def test_interpreted(results, function):
    check_function(results, function)
