"""Fused linear + cross-entropy against the unfused op: memory, time, matmul throughput.

For each case it compiles ``jax.jit(jax.value_and_grad(f, argnums=(0, 1)))`` of the mean
loss for

* ``fused``: ``jcce.linear_cross_entropy(embeddings, classifier, labels)``;
* ``unfused`` (the baseline): ``embeddings @ classifier`` then
  ``optax.losses.softmax_cross_entropy_with_integer_labels(...).mean()``;

and prints XLA's compiled scratch memory (``memory_analysis().temp_size_in_bytes``), the
median time over ``--repeats`` calls timed round-robin, and the ratios fused/unfused
(time: the median of the per-round ratios). The
work is three ``N x D x V`` matmuls (logits, and the gradients of the embeddings and the
classifier): ``6 N D V`` FLOPs, printed with the achieved rate and its fraction of one
plain ``[N, D] @ [D, V]`` matmul's rate measured in the same run (the machine's matmul
throughput at that shape). The last column is the largest difference of the classifier
gradient from the baseline's, relative to its largest entry.

    python benchmarks/bench_linear.py              # the four cases of docs/large_vocab.md
    python benchmarks/bench_linear.py --quick      # small shapes (smoke test)
    python benchmarks/bench_linear.py --block-size 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import optax

import jcce

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    LINEAR_COLUMNS,
    environment,
    fmt_bytes,
    fmt_ms,
    fmt_ratio,
    print_table,
    temp_bytes,
)
from bench_core import interleaved_samples  # noqa: E402

FULL = [
    (4096, 512, 32768, jnp.float32),
    (4096, 512, 32768, jnp.bfloat16),
    (2048, 256, 262144, jnp.float32),
    (2048, 256, 262144, jnp.bfloat16),
]
QUICK = [(512, 64, 4096, jnp.float32), (256, 32, 16384, jnp.bfloat16)]


def make_inputs(n, d, v, dtype, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    e = jax.random.normal(k1, (n, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(k2, (d, v), jnp.float32) / d**0.5).astype(dtype)
    y = jax.random.randint(k3, (n,), 0, v)
    return e, w, y


def losses(block_size):
    def fused(e, w, y):
        return jcce.linear_cross_entropy(e, w, y, block_size=block_size)

    def unfused(e, w, y):
        logits = e @ w
        return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return {"fused": fused, "unfused": unfused}


def bench(n, d, v, dtype, repeats, warmup, block_size):
    e, w, y = make_inputs(n, d, v, dtype)
    grads = {
        name: jax.value_and_grad(f, argnums=(0, 1))
        for name, f in losses(block_size).items()
    }
    temp = {name: temp_bytes(g, e, w, y) for name, g in grads.items()}
    fns = {name: jax.jit(g) for name, g in grads.items()}
    fns["matmul"] = jax.jit(lambda e, w, y: e @ w)
    samples = interleaved_samples(fns, (e, w, y), repeats, warmup)
    times = {name: statistics.median(ts) for name, ts in samples.items()}
    # Each round's fused and unfused calls ran back to back, so the median of the
    # per-round ratios is steadier than the ratio of the medians when the machine's
    # speed drifts (by 10 to 20% between runs here).
    ratio = {
        name: statistics.median(
            t / u for t, u in zip(samples[name], samples["unfused"], strict=True)
        )
        for name in ("fused", "unfused")
    }
    dw = {
        name: fns[name](e, w, y)[1][1].astype(jnp.float32)
        for name in ("fused", "unfused")
    }
    err = float(
        jnp.max(jnp.abs(dw["fused"] - dw["unfused"])) / jnp.max(jnp.abs(dw["unfused"]))
    )
    matmul_rate = 2 * n * d * v / times["matmul"]
    flops = 6 * n * d * v
    label = f"{n}x{d}x{v} {jnp.dtype(dtype).name}"
    rows = []
    for name in ("fused", "unfused"):
        rate = flops / times[name]
        rows.append(
            [
                label,
                name,
                fmt_ms(times[name]),
                fmt_ratio(ratio[name]),
                fmt_bytes(temp[name]),
                fmt_ratio(temp[name] / temp["unfused"]),
                f"{flops / 1e9:.0f}",
                f"{rate / 1e9:.0f}",
                f"{rate / matmul_rate:.2f}",
                f"{err:.1e}" if name == "fused" else "",
            ]
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls each")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    parser.add_argument(
        "--block-size", type=int, default=None, help="tokens per block (default: auto)"
    )
    opts = parser.parse_args(argv)
    print(environment())
    print(
        "value_and_grad of the mean loss w.r.t. embeddings [N, D] and classifier "
        f"[D, V], jax.jit; median of {opts.repeats}\n"
    )
    rows = []
    for case in QUICK if opts.quick else FULL:
        rows += bench(*case, opts.repeats, opts.warmup, opts.block_size)
    print_table(
        LINEAR_COLUMNS
        + [
            "GFLOP",
            "GFLOP/s",
            "of matmul",
            "dW rel. err",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
