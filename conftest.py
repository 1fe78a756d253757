"""Test set-up shared by tests/ and the doctests in jcce/.

Runs before JAX initialises: eight host CPU devices for the multi-device tests, rank
promotion as an error, and Hypothesis profiles that are fast and repeatable.

On a machine with only the CPU the suite is mostly compiling, and it compiles with
two of XLA:CPU's code generation settings changed: LLVM's optimizations off
(``--xla_backend_optimization_level=0``) and the older, faster loop emitter instead of
the MLIR fusion emitters (``--xla_cpu_use_fusion_emitters=false``, where the installed
XLA has that flag). On two cores the suite took 14 to 17 minutes with the first alone
and 10 with both (1,150 seconds of tests against 1,956). Values are checked to the
same tolerances either way (the machine code differs, the arithmetic asked for does
not; LLVM may contract a multiply and an add into one rounding at the default level,
which every tolerance here admits). What the two settings could hide, the tests check
at XLA's defaults: without the fusion emitters XLA fuses some programs differently, so
every test that reads a compiled program's HLO or memory compiles it with them
(``tests/compiled.py``); and ``tests/test_xla_defaults.py`` runs the losses in a
process with no flags at all (where contraction changed results beyond rounding, with
huge logits and a constant temperature, and with ordinary logits). To test with other
flags set ``XLA_FLAGS`` yourself, with ``--xla_force_host_platform_device_count=8``
for the multi-device tests.
"""

import importlib.util
import os
import pkgutil
import subprocess
import sys

from tests.compiled import SUITE_FLAG


def _cpu_only() -> bool:
    """Whether JAX will find no accelerator plugin (CUDA, ROCm, TPU), asked without
    initialising it."""
    if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        return True
    try:
        import jax_plugins  # the namespace package of JAX's PJRT plugins
    except ImportError:
        plugins = []
    else:
        plugins = list(pkgutil.iter_modules(jax_plugins.__path__))
    return not plugins and importlib.util.find_spec("libtpu") is None


def _accepted(flags: str) -> bool:
    """Whether the installed XLA accepts ``flags`` (it aborts a process that sets a
    flag it does not know, as a jaxlib without the loop emitter would), asked of a
    child process."""
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    probe = [sys.executable, "-c", "import jax; jax.devices()"]
    return subprocess.run(probe, env=env, capture_output=True).returncode == 0


def _suite_flags() -> str:
    flags = "--xla_force_host_platform_device_count=8"
    if not _cpu_only():
        return flags
    flags += " --xla_backend_optimization_level=0"
    loop_emitter = f"{flags} {SUITE_FLAG}"
    return loop_emitter if _accepted(loop_emitter) else flags


# Set in the controlling process, whose environment the xdist workers inherit.
if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = _suite_flags()


def _shared_compilation_cache() -> None:
    """A persistent compilation cache for this run, shared by the xdist workers: tests
    compile many identical programs (the same loss and shapes from different tests
    and workers), and a program compiled once is loaded from disk after that (about
    14% of the suite's time on two cores). Set up in the controlling process, whose
    environment the workers inherit, in a temporary directory removed at exit; a
    ``JAX_COMPILATION_CACHE_DIR`` of your own is used as it is."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ or "PYTEST_XDIST_WORKER" in os.environ:
        return
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="jcce-tests-jax-cache-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"


_shared_compilation_cache()

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
