"""Runs the suites that check numbers against references under both implementations.

``implementation=None`` takes ``"xla_cpu"`` on this CPU; the modules below run once more
with ``jcce.use_implementation("xla")``, the portable path that accelerators run, so
its values, gradients, second derivatives, dtypes, extremes, masks, vmap and sharding
are checked against the same references on the CPU. Test ids end in ``[xla_cpu]`` or
``[xla]``. (Every other test still traces the ``"xla"`` path: ``None`` stages out both
implementations and lowering keeps the CPU's.) Left out, to keep the suite near ten
minutes: ``test_kernel_paths`` (the XLA:CPU layout's chunk shapes; ``test_backends``
checks both paths at those sizes), ``test_edges`` and ``test_transforms`` (mostly label,
weight and option handling before the kernel; the non-negativity test of
``test_edges`` forces ``"xla"`` itself).
"""

from __future__ import annotations

import pytest

import jcce

BOTH_IMPLEMENTATIONS = {
    "tests.test_core",
    "tests.test_family_losses",
    "tests.test_jax_transformations",
    "tests.test_linear",
    "tests.test_optax_parity",
    "tests.test_properties",
    "tests.test_torch_parity",
    "tests.test_vocab_parallel",
}


def pytest_generate_tests(metafunc):
    if metafunc.module.__name__ in BOTH_IMPLEMENTATIONS:
        metafunc.parametrize(
            "implementation", ["xla_cpu", "xla"], indirect=True, scope="module"
        )


@pytest.fixture(autouse=True, scope="module")
def implementation(request):
    """The implementation that ``implementation=None`` means in this test (None:
    chosen by platform, for modules outside :data:`BOTH_IMPLEMENTATIONS`)."""
    chosen = getattr(request, "param", None)
    with jcce.use_implementation(chosen):
        yield chosen
