"""Does this jaxlib's XLA:CPU compute a reduce-then-broadcast fusion correctly?

    python benchmarks/xla_cpu_reduce_check.py

jaxlib 0.10.2's YNNPACK fusions on the CPU got ``sum(t * z, -1, keepdims=True) * z``
wrong where ``t`` is broadcast along a leading axis and rows are longer than 8,192
(docs/semantics.md, section 4). jcce works around it where its own programs met it
(constant probability targets under ``vmap``: ``Ops.pin_targets``). This script prints
the error of that plain-JAX program, without jcce, against float64 NumPy, for shapes on
both sides of the threshold, so that a new jaxlib can be checked before the workaround
is dropped. It exits with status 1 if any error exceeds 1e-5 (float32 rounding is about
1e-7 here). ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`` turns the YNNPACK
fusions off.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, print_table  # noqa: E402

# (logits shape, broadcast operand shape)
CASES = [
    ((4, 8192), (8192,)),
    ((4, 9000), (9000,)),
    ((2, 2, 8192), (2, 8192)),
    ((2, 2, 8193), (2, 8193)),
    ((3, 2, 20000), (2, 20000)),
    ((2, 2, 8193), (2, 2, 8193)),  # no broadcast
]


def _program(z, t):
    return jnp.sum(t * z, axis=-1, keepdims=True) * z


def main() -> int:
    cpu = jax.devices("cpu")[0]
    rng = np.random.default_rng(0)
    rows, worst = [], 0.0
    for z_shape, t_shape in CASES:
        z = rng.standard_normal(z_shape).astype(np.float32)
        t = rng.uniform(size=t_shape).astype(np.float32)
        want = _program(z.astype(np.float64), t.astype(np.float64))
        got = jax.jit(_program)(jax.device_put(z, cpu), jax.device_put(t, cpu))
        err = float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())
        worst = max(worst, err)
        rows.append([str(z_shape), str(t_shape), f"{err:.1e}"])
    print(environment())
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}\n")
    print_table(["z", "t", "max error / max |result|"], rows)
    ok = worst <= 1e-5
    print("\nok: float32 rounding" if ok else "\nwrong results: the miscompilation")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
