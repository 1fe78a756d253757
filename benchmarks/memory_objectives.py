"""Compiled scratch memory of each objective, for class indices and probability targets.

    python benchmarks/memory_objectives.py [--shape 256x4096]

``value_and_grad`` of the mean loss, compiled for the default backend; each row gives
XLA's ``temp_size_in_bytes`` (``memory_analysis``) as a multiple of the logits' bytes,
for every implementation that runs there, beside optax's ``softmax_cross_entropy``
(probability targets) and ``softmax_cross_entropy_with_integer_labels`` compiled in the
same run. The targets are arguments of the compiled function. A value of 1.00 is one
``[N, K]`` float32 array kept besides the inputs and the gradient.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import optax

import jcce

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, print_table, temp_bytes  # noqa: E402

CHAINS = {
    "cross-entropy": jcce.chain(),
    "softcap(5)": jcce.chain(jcce.softcap(5.0)),
    "label_smoothing(0.1)": jcce.chain(jcce.label_smoothing(0.1)),
    "poly(1)": jcce.chain(jcce.poly(1.0)),
    "generalized(0.5)": jcce.chain(jcce.generalized(0.5)),
    "generalized(0.5) + softcap(5)": jcce.chain(
        jcce.generalized(0.5), jcce.softcap(5.0)
    ),
    "focal(2)": jcce.chain(jcce.focal(2.0)),
    "focal(2) + label_smoothing(0.1)": jcce.chain(
        jcce.focal(2.0), jcce.label_smoothing(0.1)
    ),
    "symmetric(0.5, 1)": jcce.chain(jcce.symmetric(0.5, 1.0)),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="256x4096")
    n, k = map(int, parser.parse_args().shape.split("x"))
    z = jnp.zeros((n, k), jnp.float32)
    labels = {"indices": jnp.zeros(n, jnp.int32), "probabilities": jnp.zeros((n, k))}
    impls = ["xla_cpu", "xla"] if jax.default_backend() == "cpu" else ["xla", "pallas"]

    def ratio(loss, target):
        f = jax.value_and_grad(lambda z, t: jnp.mean(loss(z, t)))
        return f"{temp_bytes(f, z, target) / z.nbytes:.2f}"

    print(environment())
    print(f"temp / logits bytes, [{n}, {k}] float32, value_and_grad of the mean\n")
    rows = [
        ["optax (its own program in both columns)"]
        + [
            ratio(
                optax.losses.softmax_cross_entropy_with_integer_labels,
                labels["indices"],
            ),
            ratio(optax.losses.softmax_cross_entropy, labels["probabilities"]),
        ]
        * len(impls)
    ]
    for name, chain in CHAINS.items():
        row = [name]
        for impl in impls:
            for target in labels.values():
                loss = lambda z, t, impl=impl, chain=chain: chain(  # noqa: E731
                    z, t, reduction="none", implementation=impl
                )
                row.append(ratio(loss, target))
        rows.append(row)
    columns = ["chain"] + [f"{i}: {t}" for i in impls for t in labels]
    print_table(columns, rows)


if __name__ == "__main__":
    main()
