"""Sampled and adaptive losses against the exact fused linear loss at a large vocabulary.

One training step's ``jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))`` (gradients of
the embeddings and of the classifier, or of the adaptive softmax's parameters) at
N = 4096 Zipfian labels, D = 128, V = 2^20 classes, float32, classifier ``[V, D]``: the
exact :func:`jcce.linear_cross_entropy` against :func:`jcce.sampled_softmax_cross_entropy`
and :func:`jcce.nce_loss` with 1,024 unique log-uniform samples and
:func:`jcce.adaptive_softmax.loss` with cutoffs 2^14 and 2^17 (``div_value=4``), with
the ratio to the exact step measured in the same run and XLA's compiled temp memory.
The sampled steps still write the dense ``[V, D]`` classifier gradient (most of it
zeros), as any of them would under ``jax.grad``.

    python benchmarks/bench_sampled.py            # V = 2^20 (a few minutes on 2 cores)
    python benchmarks/bench_sampled.py --quick    # V = 2^16, cutoffs 2^10 and 2^13
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

import jcce

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, fmt_bytes, fmt_ms, print_table, temp_bytes, time_fn  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="V = 2^16")
    parser.add_argument("--samples", type=int, default=1024)
    opts = parser.parse_args(argv)
    n, d, v = 4096, 128, 2**16 if opts.quick else 2**20
    cutoffs = (2**10, 2**13) if opts.quick else (2**14, 2**17)
    print(environment())
    print(
        f"N {n}, D {d}, V {v}, float32, classifier [V, D]; {opts.samples} samples;"
        f" adaptive softmax cutoffs {cutoffs}\n"
    )
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    e = jax.random.normal(k1, (n, d))
    w = jax.random.normal(k2, (v, d)) / d**0.5
    # Zipfian labels, as the log-uniform sampler assumes.
    y = jcce.samplers.log_uniform(v).draw(k3, (n,))
    key = jax.random.key(1)

    def exact(e, w):
        return jcce.linear_cross_entropy(e, w, y, classifier_layout="VD")

    def sampled(e, w):
        return jcce.sampled_softmax_cross_entropy(
            e, w, y, key=key, num_samples=opts.samples, classifier_layout="VD"
        )

    def nce(e, w):
        return jcce.nce_loss(
            e, w, y, key=key, num_samples=opts.samples, classifier_layout="VD"
        )

    params = jcce.adaptive_softmax.init(jax.random.key(2), d, v, cutoffs)

    def adaptive(e, params):
        return jcce.adaptive_softmax.loss(params, e, y)

    rows, base = [], None
    for name, loss, second, repeats in (
        ("exact linear_cross_entropy", exact, w, 2),
        ("sampled_softmax_cross_entropy", sampled, w, 10),
        ("nce_loss", nce, w, 10),
        ("adaptive_softmax.loss", adaptive, params, 5),
    ):
        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        t = time_fn(step, e, second, repeats=repeats, warmup=1)
        base = t if base is None else base
        temp = fmt_bytes(temp_bytes(step, e, second))
        rows.append([name, fmt_ms(t), f"{base / t:.1f}x", temp])
    print_table(["loss", "step", "speed-up over exact", "temp"], rows)


if __name__ == "__main__":
    main()
