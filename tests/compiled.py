"""The compiler options under which a test compiles a program whose HLO or memory it
reads.

On a CPU-only machine ``conftest.py`` turns XLA:CPU's fusion emitters off for the suite
(``--xla_cpu_use_fusion_emitters=false``: they take about 40% of its time, the suite is
mostly compiling). Their absence changes some of XLA's fusion decisions, so a test that
counts a compiled program's passes over the logits or its scratch bytes compiles it with
``jax.jit(f).lower(...).compile(user_pipeline())``: with the emitters back on, as users'
programs are compiled (``None``, nothing to restore, where the suite runs XLA's
defaults).
"""

from __future__ import annotations

import os

# The flag conftest.py adds (imported by it before JAX starts: no jax import at the top,
# and the environment read at call time, once conftest.py has set it).
SUITE_FLAG = "--xla_cpu_use_fusion_emitters=false"


def user_pipeline() -> dict | None:
    """The compiler options that undo the suite's flag, or None where it is not set."""
    if SUITE_FLAG in os.environ.get("XLA_FLAGS", "").split():
        return {"xla_cpu_use_fusion_emitters": True}
    return None


def compiled_as_users(fun, *args):
    """``jax.jit(fun)`` compiled for ``args`` as users' programs are compiled."""
    import jax

    return jax.jit(fun).lower(*args).compile(user_pipeline())
