"""The log-probs-on-logits Triton kernels under the interpreter, against float64 (cases and their
reasons: ``tests/interpreted/logprobs.py``; harness: ``tests/_interpret.py``)."""

import pytest
from _interpret import case_functions, check_function, run_cases

CASES = "tests/interpreted/logprobs.py"
pytestmark = pytest.mark.interpret


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_cases(CASES, tmp_path_factory.mktemp("interpret"), {"all": None})


@pytest.mark.parametrize("function", case_functions(CASES))
def test_interpreted(results, function):
    check_function(results, function)
