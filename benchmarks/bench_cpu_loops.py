"""Why a soft-capped gradient costs what it does on XLA:CPU: the loops in isolation.

Times, at ``[4096, 32768]`` float32 (512 MiB) unless named otherwise, the pieces that
docs/performance.md ("The gradient loop on XLA:CPU") reasons from:

(a) memory and arithmetic: reading the logits (a sum); NumPy's ``z * 2`` on one core
    into a buffer written before and into a new one (the difference is the page faults
    of a fresh allocation); a copy, plain's gradient loop, a ``tanh`` and the
    soft-cap's gradient loop, each into a new buffer (as a jitted function's output
    is) and over a donated input (a buffer written before);
(b) layouts tried for the soft-cap that did not pay: the gradient loop whole, split
    in two behind an optimization barrier, and in blocks of rows (``lax.map``); the
    forward's two soft-capped sums as two reductions, as one variadic ``lax.reduce``
    and as one complex sum; focal's five per-block sums as reductions and as one
    batched ``dot_general``.

Each row is the median of ``--repeats`` calls after one untimed call, with its ratio to
a baseline measured in the same run (plain's gradient loop in the same kind of buffer,
or the layout jcce uses). The numbers are for the machine this runs on; the script
prints it.

    python benchmarks/bench_cpu_loops.py             # under a minute on 2 cores
    python benchmarks/bench_cpu_loops.py --repeats 11
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, print_table, time_fn  # noqa: E402

N, K = 4096, 32768
CAP = 30.0
# Each row's baseline, measured in the same run.
PLAIN = "plain's gradient: exp(z - lse) * s"
PLAIN_NEW = f"(a) {PLAIN}, into a new buffer"
PLAIN_OLD = f"(a) {PLAIN}, into a buffer written before"
TWO_SUMS = "two soft-capped sums, two reductions (jcce's way)"


def median_ms(fn, *args, repeats):
    return 1e3 * time_fn(fn, *args, repeats=repeats, warmup=1)


def in_place_ms(fn, z, repeats):
    """``fn(z)`` written over a copy of ``z`` that was written before (donated to the
    call): the output's pages are mapped already."""
    call = jax.jit(fn, donate_argnums=0)
    jax.block_until_ready(call(z + 0))
    times = []
    for _ in range(repeats):
        copy = jax.block_until_ready(z + 0)
        t0 = time.perf_counter()
        jax.block_until_ready(call(copy))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


# A rational tanh for float32 (the degree 13 / 6 approximation that XLA and Eigen use),
# written in jnp operations, so that LLVM sees no tanh.
_TANH_P = (
    -2.76076847742355e-16,
    2.00018790482477e-13,
    -8.60467152213735e-11,
    5.12229709037114e-08,
    1.48572235717979e-05,
    6.37261928875436e-04,
    4.89352455891786e-03,
)
_TANH_Q = (
    1.19825839466702e-06,
    1.18534705686654e-04,
    2.26843463243900e-03,
    4.89352518554385e-03,
)


def rational_tanh(u):
    u = jnp.clip(u, -7.90531110763549805, 7.90531110763549805)
    u2 = u * u
    p, q = _TANH_P[0], _TANH_Q[0]
    for a in _TANH_P[1:]:
        p = p * u2 + a
    for b in _TANH_Q[1:]:
        q = q * u2 + b
    return u * p / q


def softcap_grad(z, lse, tanh=jnp.tanh):
    t = tanh(z * (1 / CAP))
    return jnp.exp(CAP * t - lse[..., None]) * (1 - t * t)


def split_softcap_grad(z, lse):
    """:func:`softcap_grad` as two loops: the ``tanh`` into the output's buffer, then
    the rest over it in place (XLA shares the buffer: no temp)."""
    t = lax.optimization_barrier(jnp.tanh(z * (1 / CAP)))
    return jnp.exp(CAP * t - lse[..., None]) * (1 - t * t)


def two_sums(z):  # sum exp(x - cap) and sum x, each in its own layout (as jcce does)
    x = CAP * jnp.tanh(z / CAP)
    x2 = CAP * jnp.tanh(lax.optimization_barrier(z.reshape(N, 8, K // 8)) / CAP)
    return jnp.sum(jnp.exp(x - CAP), -1), jnp.sum(x2, (-1, -2))


def variadic_sums(z):
    x = CAP * jnp.tanh(z / CAP)
    zero = np.float32(0)
    return lax.reduce(
        (jnp.exp(x - CAP), x),
        (zero, zero),
        lambda a, b: (a[0] + b[0], a[1] + b[1]),
        (1,),
    )


def complex_sums(z):
    x = CAP * jnp.tanh(z / CAP)
    s = jnp.sum(lax.complex(jnp.exp(x - CAP), x), -1)
    return s.real, s.imag


def focal_block_sums(zr):  # what focal + smoothing with gamma 2 sums per row
    m = jnp.max(zr, -1, keepdims=True)
    d = zr - m
    e = jnp.exp(d)
    e2 = e * e
    sums = [jnp.sum(v, -1) for v in (e, d, e * d, e2, e2 * d)]
    return m, jnp.stack(sums, -1)


def focal_block_dot(zr):  # the same five sums (and one more) from one batched matmul
    m = jnp.max(zr, -1, keepdims=True)
    d = zr - m
    e = jnp.exp(d)
    a = jnp.stack([e, e * e, d], 1)
    b = jnp.stack([d, jnp.ones_like(d)], 1)
    dims = (((2,), (2,)), ((0,), (0,)))
    return m, lax.dot_general(a, b, dims, precision="highest")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    opts = parser.parse_args(argv)
    r = opts.repeats
    print(environment())
    print(f"[{N}, {K}] float32 unless named; median of {r}\n")

    z = 3.0 * jax.random.normal(jax.random.key(0), (N, K), jnp.float32)
    lse = jnp.zeros((N,), jnp.float32)
    host = np.asarray(z)
    written = np.ones_like(host)

    def numpy_ms(fn):
        times = []
        for _ in range(r):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    rows = [
        ["(a) read: sum(z)", median_ms(jax.jit(jnp.sum), z, repeats=r), PLAIN_NEW],
        [
            "(a) NumPy z * 2, one core, into a buffer written before",
            numpy_ms(lambda: np.multiply(host, 2, out=written)),
            None,
        ],
        [
            "(a) NumPy z * 2, one core, into a new buffer",
            numpy_ms(lambda: host * 2),
            "(a) NumPy z * 2, one core, into a buffer written before",
        ],
    ]
    shift = jnp.full((N, 1), 12.0, jnp.float32)  # a log-sum-exp per row
    for name, fn in [
        ("z * 2", lambda v: v * 2),
        (PLAIN, lambda v: jnp.exp(v - shift) * 0.5),
        ("tanh(z / c)", lambda v: jnp.tanh(v / CAP)),
        (
            "t = tanh(z / c); exp(c t - lse) * (1 - t^2)",
            lambda v: softcap_grad(v, shift[:, 0]),
        ),
        (
            "the same with a rational tanh in jnp operations",
            lambda v: softcap_grad(v, shift[:, 0], rational_tanh),
        ),
    ]:
        new = median_ms(jax.jit(fn), z, repeats=r)
        rows.append([f"(a) {name}, into a new buffer", new, PLAIN_NEW])
        old = in_place_ms(fn, z, r)
        rows.append([f"(a) {name}, into a buffer written before", old, PLAIN_OLD])
    rows.append(
        [
            "(b) soft-cap gradient loop",
            median_ms(jax.jit(softcap_grad), z, lse, repeats=r),
            None,
        ]
    )
    rows.append(
        [
            "(b) the same split in two behind an optimization barrier",
            median_ms(jax.jit(split_softcap_grad), z, lse, repeats=r),
            "(b) soft-cap gradient loop",
        ]
    )
    for block in (8, 32, 128):
        blocked = jax.jit(
            lambda v, s, b=block: lax.map(
                lambda a: softcap_grad(*a), (v, s), batch_size=b
            )
        )
        rows.append(
            [
                f"(b) the same in blocks of {block} rows",
                median_ms(blocked, z, lse, repeats=r),
                "(b) soft-cap gradient loop",
            ]
        )
    for name, fn in [
        (TWO_SUMS, two_sums),
        ("the same, one variadic lax.reduce", variadic_sums),
        ("the same, one complex sum", complex_sums),
    ]:
        base = None if name.startswith("two") else f"(b) {TWO_SUMS}"
        rows.append([f"(b) {name}", median_ms(jax.jit(fn), z, repeats=r), base])
    blocks = z.reshape(N // 8, 8, K)
    for name, fn in [
        ("focal's block sums, reductions", focal_block_sums),
        ("focal's block sums, one batched dot", focal_block_dot),
    ]:
        rows.append(
            [
                f"(b) {name}",
                median_ms(jax.jit(lambda v, f=fn: lax.map(f, v)), blocks, repeats=r),
                None
                if fn is focal_block_sums
                else "(b) focal's block sums, reductions",
            ]
        )
    times = {n: t for n, t, _ in rows}
    print_table(
        ["loop", "time", "/ baseline", "baseline (the same run)"],
        [
            [n, f"{t:.1f} ms", f"{t / times[b]:.3f}" if b else "", b or ""]
            for n, t, b in rows
        ],
    )


if __name__ == "__main__":
    main()
