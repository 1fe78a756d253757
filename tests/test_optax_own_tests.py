"""optax's own loss tests, run against jcce.

optax ships its tests beside its losses (``optax/losses/*_test.py``). Each test below
is one of them, run with every function that jcce has under the same name swapped in
for optax's (``unittest.mock.patch``), so optax's hand-worked numbers, its
``jax.test_util.check_grads`` (forward and reverse mode), its masks, axes, dtypes and
edge cases are checked against jcce's drop-ins with optax's own assertions. Only the
test classes whose source names a swapped function run (the others test optax alone).

A test that fails with jcce swapped in is listed in :data:`DIFFERENCES` with the
reason; each of those must still fail (a listed test that passes is a stale entry).
"""

from __future__ import annotations

import importlib
import inspect
import unittest
from unittest import mock

import pytest

import jcce

# optax's test module -> the module whose functions it calls.
MODULES = {
    "optax.losses._classification_test": "optax.losses._classification",
    "optax.losses._ranking_test": "optax.losses._ranking",
    "optax.losses._self_supervised_test": "optax.losses._self_supervised",
    "optax.losses._smoothing_test": "optax.losses._smoothing",
}

# Tests that fail by design, with the reason (docs/migration/optax.md lists each).
DIFFERENCES = {
    "GeneralizedKLDivergenceTest.test_deprecated_alias": (
        "optax deprecates convex_kl_divergence with a DeprecationWarning; jcce keeps "
        "the name without one"
    ),
}


def _swapped(impl):
    return {
        name: getattr(jcce, name)
        for name in dir(impl)
        if not name.startswith("_") and callable(getattr(jcce, name, None))
    }


def _collect():
    cases = []
    for test_name, impl_name in MODULES.items():
        try:
            tests, impl = map(importlib.import_module, (test_name, impl_name))
        except ImportError:  # an optax release that does not ship this test module
            continue
        names = _swapped(impl)
        loader = unittest.TestLoader()
        for _, cls in inspect.getmembers(tests, inspect.isclass):
            if not issubclass(cls, unittest.TestCase) or cls.__module__ != test_name:
                continue
            source = inspect.getsource(cls)
            if not any(f".{name}" in source for name in names):
                continue
            for method in loader.getTestCaseNames(cls):
                cases.append((test_name, impl_name, cls.__name__, method))
    return cases


CASES = _collect()


def test_optax_ships_the_tests_this_module_runs():
    # optax 0.2.8 ships 110 tests that call a function jcce has; a release that moved
    # them would leave this module testing nothing.
    assert len(CASES) >= 100, len(CASES)


@pytest.mark.parametrize(
    ("test_name", "impl_name", "cls", "method"),
    CASES,
    ids=[f"{c}.{m}" for _, _, c, m in CASES],
)
def test_optax_test_passes_with_jcce(test_name, impl_name, cls, method):
    tests, impl = map(importlib.import_module, (test_name, impl_name))
    case = getattr(tests, cls)(method)
    result = unittest.TestResult()
    with mock.patch.multiple(impl, **_swapped(impl)):
        case.run(result)
    problems = [tb for _, tb in result.failures + result.errors]
    key = f"{cls}.{method}"
    if key in DIFFERENCES:
        assert problems, f"{key} now passes: remove it from DIFFERENCES"
    else:
        assert result.testsRun == 1 and not problems, "\n".join(problems)
