"""Test set-up shared by tests/ and the doctests in jcce/.

Runs before JAX initialises: eight host CPU devices for the multi-device tests, rank
promotion as an error, and Hypothesis profiles that are fast and repeatable.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "ci", database=None, derandomize=True, deadline=None, max_examples=25
)
settings.register_profile("thorough", database=None, deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# A script run by tests/test_multiprocess.py in processes of its own (it initialises
# jax.distributed on import), not a module for --doctest-modules to import.
collect_ignore = ["tests/multiprocess_worker.py"]
