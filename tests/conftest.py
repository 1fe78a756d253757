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
``test_edges`` forces ``"xla"`` itself). Tests marked ``xla_subset`` run their
``[xla]`` copy on a subset of their parameters (see
:func:`pytest_collection_modifyitems`).
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
    "tests.test_t5x_parity",
    "tests.test_torch_parity",
    "tests.test_vocab_parallel",
}


def pytest_generate_tests(metafunc):
    if metafunc.module.__name__ in BOTH_IMPLEMENTATIONS:
        metafunc.parametrize(
            "implementation", ["xla_cpu", "xla"], indirect=True, scope="module"
        )


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "xla_subset(keep): under [xla], run only the parameter sets for which "
        "keep(params) is true (the [xla_cpu] run keeps every set)",
    )


def pytest_collection_modifyitems(config, items):
    """Deselects the ``[xla]`` copies that an ``xla_subset`` marker leaves out: where a
    test sweeps single transforms and also their combination, the portable path is
    checked on the combination (which reaches every kernel term) and plain, not on
    each transform again."""
    kept, dropped = [], []
    for item in items:
        marker = item.get_closest_marker("xla_subset")
        params = getattr(getattr(item, "callspec", None), "params", {})
        if (
            marker
            and params.get("implementation") == "xla"
            and not marker.args[0](params)
        ):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(autouse=True, scope="module")
def implementation(request):
    """The implementation that ``implementation=None`` means in this test (None:
    chosen by platform, for modules outside :data:`BOTH_IMPLEMENTATIONS`)."""
    chosen = getattr(request, "param", None)
    with jcce.use_implementation(chosen):
        yield chosen
