"""Core benchmark: jcce vs optax, loss plus gradient under ``jax.jit``.

What it measures, for integer labels, is ``jax.jit(jax.value_and_grad(f))`` where
``f(logits)`` is the *mean* loss and the gradient is taken w.r.t. the logits:

* ``jcce.cross_entropy(logits, labels)`` (mean reduction built in);
* ``jcce.softmax_cross_entropy_with_integer_labels(logits, labels).mean()``;
* ``optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean()``
  (the baseline).

For each it reports the median wall-clock time over ``--repeats`` calls (after warm-up;
the functions are timed interleaved, round-robin in a rotating order, so background load
and allocator state affect them alike), the time ratio jcce/optax, XLA's
``memory_analysis().temp_size_in_bytes`` of the compiled function (scratch memory beyond
the arguments and outputs) and the temp ratio jcce/optax. The last column is the largest
gradient difference from optax (a sanity check). Shapes ``[N, K]``: (4096, 32768) float32, (4096, 32768) bfloat16 and
(256, 262144) float32 (``--quick`` uses small shapes for a smoke test).

A last table compares each transform alone, a chain of four
(``label_smoothing(0.1), temperature(2.0), z_loss(1e-4), softcap(30.0)``) and a chain of
every transform with plain ``jcce.cross_entropy`` at (4096, 32768) float32 (ratio
chain/plain; ``--chains-only`` prints just this table), and plain, label smoothing and
optax with one row in eight masked by ``where``.

A final table prices the per-logit work each kind of transform must add, whatever the
implementation: one fused, chunked reduction pass over the logits that evaluates only
that work (``tanh`` for the soft-cap; ``(1 - p)^gamma`` and ``log p`` for focal with
label smoothing, whose uniform term needs ``phi(l_k)`` of every class; a plain read for
label smoothing's ``sum_k x_k``), as a ratio to plain ``value_and_grad``. ``1 + floor`` is
a lower bound on chain/plain for any chain containing that transform on this machine.

Run it from the repository root (takes a few minutes on 2 CPU cores):

    python benchmarks/bench_core.py            # full shapes
    python benchmarks/bench_core.py --quick    # small shapes
    python benchmarks/bench_core.py --repeats 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

import jcce

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    CORE_COLUMNS,
    environment,
    every_transform,
    fmt_bytes,
    fmt_ms,
    fmt_ratio,
    four_transforms,
    memory_stats,
    print_table,
)

FULL_SHAPES = [
    ((4096, 32768), jnp.float32),
    ((4096, 32768), jnp.bfloat16),
    ((256, 262144), jnp.float32),
]
QUICK_SHAPES = [
    ((256, 4096), jnp.float32),
    ((256, 4096), jnp.bfloat16),
    ((16, 65536), jnp.float32),
]
CHAIN_FULL = ((4096, 32768), jnp.float32)
CHAIN_QUICK = ((256, 4096), jnp.float32)


def make_inputs(shape, dtype, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    logits = (3.0 * jax.random.normal(k1, shape, jnp.float32)).astype(dtype)
    labels = jax.random.randint(k2, shape[:-1], 0, shape[-1], dtype=jnp.int32)
    return jax.block_until_ready(logits), jax.block_until_ready(labels)


def loss_fns():
    def jcce_ce(logits, labels):
        return jcce.cross_entropy(logits, labels)

    def jcce_optax_api(logits, labels):
        return jcce.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def optax_ce(logits, labels):
        return optax.losses.softmax_cross_entropy_with_integer_labels(
            logits, labels
        ).mean()

    return {
        "jcce.cross_entropy": jcce_ce,
        "jcce.softmax_ce_int": jcce_optax_api,
        "optax": optax_ce,
    }


def chain_configs(num_classes: int):
    """Plain ``jcce.chain()``, each transform alone, and chains of several."""
    cw = jnp.linspace(0.5, 1.5, num_classes)
    return {
        "plain": jcce.chain(),
        "temperature": jcce.temperature(2.0),
        "softcap": jcce.softcap(30.0),
        "label_smoothing": jcce.label_smoothing(0.1),
        "z_loss + log_base": jcce.chain(jcce.z_loss(1e-4), jcce.log_base(2.0)),
        "class_weights": jcce.class_weights(cw),
        "focal": jcce.focal(2.0),
        "poly": jcce.poly(2.0),
        "4-transform chain": four_transforms(),
        "every transform": every_transform(num_classes),
    }


def chain_fns(num_classes: int):
    """:func:`chain_configs` as functions of the logits and labels, and masked rows."""
    fns = {
        name: (lambda logits, labels, c=c: c(logits, labels))
        for name, c in chain_configs(num_classes).items()
    }
    # Padding-style masks: one row in eight left out (the "xla_cpu" forward reads the
    # raw logits and replaces those rows' results; optax, as a baseline, masks first).
    fns["plain, 1/8 rows masked"] = lambda logits, labels: jcce.cross_entropy(
        logits, labels, where=_every_eighth_masked(labels)
    )
    fns["label_smoothing, 1/8 masked"] = lambda logits, labels: jcce.label_smoothing(
        0.1
    )(logits, labels, where=_every_eighth_masked(labels))
    fns["optax, 1/8 rows masked"] = lambda logits, labels: (
        optax.losses.softmax_cross_entropy_with_integer_labels(
            logits, labels, where=_every_eighth_masked(labels)
        ).mean()
    )
    return fns


def _every_eighth_masked(labels):
    return jnp.arange(labels.shape[0]) % 8 != 0


def value_and_grad(loss):
    """The jitted function that is timed: mean loss and its gradient w.r.t. logits."""
    return jax.jit(jax.value_and_grad(loss))


def interleaved_samples(
    fns: dict, args, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds of each call, per function, timed round-robin so that load drifts hit all
    alike: round ``i`` of one function ran right next to round ``i`` of the others."""
    for _ in range(max(warmup, 1)):
        for f in fns.values():
            jax.block_until_ready(f(*args))
    samples = {name: [] for name in fns}
    names = list(fns)
    for i in range(repeats):
        # Rotate the order every round: which function runs first (right after another
        # one freed its buffers) must not bias the comparison.
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name](*args))
            samples[name].append(time.perf_counter() - t0)
    return samples


def time_interleaved(fns: dict, args, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per function, timed round-robin (``interleaved_samples``)."""
    samples = interleaved_samples(fns, args, repeats, warmup)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def check_agreement(fns: dict, args, ref: str):
    """Max |difference| of loss and gradient to the reference (sanity check)."""
    ref_loss, ref_g = fns[ref](*args)
    out = {}
    for name, f in fns.items():
        loss, g = f(*args)
        out[name] = (
            float(jnp.abs(loss - ref_loss)),
            float(jnp.max(jnp.abs(g.astype(jnp.float32) - ref_g.astype(jnp.float32)))),
        )
    return out


def bench_case(shape, dtype, repeats, warmup):
    args = make_inputs(shape, dtype)
    losses = loss_fns()
    fns = {name: value_and_grad(f) for name, f in losses.items()}
    mem = {
        name: memory_stats(jax.value_and_grad(f), *args) for name, f in losses.items()
    }
    times = time_interleaved(fns, args, repeats, warmup)
    agree = check_agreement(fns, args, "optax")
    del args
    rows = []
    label = f"{shape[0]}x{shape[1]} {jnp.dtype(dtype).name}"
    for name in losses:
        rows.append(
            [
                label,
                name,
                fmt_ms(times[name]),
                fmt_ratio(times[name] / times["optax"]),
                fmt_bytes(mem[name]["temp"]),
                fmt_ratio(mem[name]["temp"] / max(mem["optax"]["temp"], 1)),
                f"{agree[name][1]:.1e}",
            ]
        )
    return rows


def bench_chain(shape, dtype, repeats, warmup):
    args = make_inputs(shape, dtype)
    losses = chain_fns(shape[-1])
    fns = {name: value_and_grad(f) for name, f in losses.items()}
    mem = {
        name: memory_stats(jax.value_and_grad(f), *args) for name, f in losses.items()
    }
    times = time_interleaved(fns, args, repeats, warmup)
    label = f"{shape[0]}x{shape[1]} {jnp.dtype(dtype).name}"
    rows = []
    for name in losses:
        rows.append(
            [
                label,
                name,
                fmt_ms(times[name]),
                fmt_ratio(times[name] / times["plain"]),
                fmt_bytes(mem[name]["temp"]),
                fmt_ratio(mem[name]["temp"] / max(mem["plain"]["temp"], 1)),
            ]
        )
    return rows


def _pass(elementwise):
    """One fused reduction pass over the logits evaluating ``elementwise`` per logit
    (chunked and pinned as the kernel's own passes are, so it runs at their speed)."""

    def f(logits, labels):
        del labels
        v = jax.lax.optimization_barrier(logits.reshape(-1, 8192))
        return jnp.sum(elementwise(v), axis=-1)

    return jax.jit(f)


FLOORS = {
    "read (label smoothing's sum_k x_k)": lambda v: v,
    "tanh (softcap)": lambda v: jnp.tanh(v / 30.0),
    "(1-p)^gamma, log p (focal + smoothing)": lambda v: (
        jnp.exp(2.0 * jnp.log(-jnp.expm1(-jnp.abs(v)))) * jnp.abs(v)
    ),
}


def bench_floor(shape, dtype, repeats, warmup):
    args = make_inputs(shape, dtype)
    fns = {"plain": value_and_grad(chain_fns(shape[-1])["plain"])}
    fns.update({name: _pass(e) for name, e in FLOORS.items()})
    times = time_interleaved(fns, args, repeats, warmup)
    label = f"{shape[0]}x{shape[1]} {jnp.dtype(dtype).name}"
    return [
        [label, name, fmt_ms(times[name]), fmt_ratio(times[name] / times["plain"])]
        for name in fns
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small shapes (smoke test)"
    )
    parser.add_argument(
        "--repeats", type=int, default=15, help="timed calls per function"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    parser.add_argument(
        "--chains-only", action="store_true", help="only the transforms table"
    )
    opts = parser.parse_args(argv)

    shapes = QUICK_SHAPES if opts.quick else FULL_SHAPES
    chain_case = CHAIN_QUICK if opts.quick else CHAIN_FULL
    print(environment())
    print(
        f"value_and_grad of the mean loss w.r.t. logits, jax.jit; median of "
        f"{opts.repeats} (warm-up {opts.warmup}); integer labels\n"
    )

    if not opts.chains_only:
        rows = []
        for shape, dtype in shapes:
            rows += bench_case(shape, dtype, opts.repeats, opts.warmup)
        print_table(
            CORE_COLUMNS,
            rows,
        )
        print()
    print_table(
        ["shape", "function", "time", "time/plain", "temp", "temp/plain"],
        bench_chain(*chain_case, opts.repeats, opts.warmup),
    )
    print()
    print_table(
        ["shape", "unavoidable per-logit work (one pass)", "time", "floor/plain"],
        bench_floor(*chain_case, opts.repeats, opts.warmup),
    )


if __name__ == "__main__":
    main()
