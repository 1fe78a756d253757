"""jcce's implementations ("xla", "xla_cpu", None; "pallas" on a GPU) against optax, on any backend.

One script, one run, on whatever backend JAX has (the CPU, or an accelerator such as an
NVIDIA GPU), that needs nothing beyond jax, numpy and optax (plus the repository on
``PYTHONPATH``). It prints :func:`_common.environment` and then three tables:

(a) core: ``jax.jit(jax.value_and_grad(f))`` of the *mean* loss w.r.t. the logits, for
    ``jcce.cross_entropy(logits, labels, implementation=impl)`` with ``impl`` in
    ``"xla"``, ``"xla_cpu"`` and ``None`` (``None`` picks ``"xla_cpu"`` on the CPU and
    ``"xla"`` elsewhere), against
    ``optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean()``
    measured in the same run: median time, time ratio to optax (median of the per-round
    ratios; the functions are timed round-robin, and a sample of a call shorter than
    ``SAMPLE_SECONDS`` is the mean of back-to-back calls that fill it), XLA's compiled
    scratch memory
    (``memory_analysis().temp_size_in_bytes``), its ratio to optax's, and the largest
    gradient difference from optax (a sanity check). Shapes ``[N, K]`` in bfloat16 and
    float32: ``ACCEL_CORE_SHAPES`` on an accelerator (the issue's large vocabularies),
    ``CPU_CORE_SHAPES`` on the CPU (bench_core.py's), each followed by the small class
    counts of ``SMALL_K_SHAPES`` (K = 2 to 1,000).
(b) chains: the same, for ``jcce.chain(label_smoothing(0.1))``, ``chain(softcap(30))``,
    a chain of four (``label_smoothing(0.1), temperature(2.0), z_loss(1e-4),
    softcap(30.0)``) and a chain of every transform (as in bench_core.py), each as a
    ratio to plain ``jcce.cross_entropy`` of the same implementation, at the first shape
    of (a).
(c) linear: ``jax.jit(jax.value_and_grad(f, argnums=(0, 1)))`` of the mean loss w.r.t.
    the embeddings ``[N, D]`` and the classifier ``[V, D]`` for
    ``jcce.linear_cross_entropy(e, w, y, classifier_layout="VD", implementation=impl)``
    (and ``lean=True`` with ``implementation=None``; on an accelerator ``"xla"``,
    ``"pallas"`` and ``"xla"`` with token blocks of half the default size, see
    :func:`linear_losses`) against the unfused computation a user writes: ``logits = e @ w.T`` in the inputs'
    dtype, then optax's loss ``.mean()``. Time and temp ratios to the unfused, and the
    classifier gradient's largest difference from the unfused one relative to its
    largest entry. ``ACCEL_LINEAR_SHAPES`` / ``CPU_LINEAR_SHAPES`` (bench_linear.py's).

A function that raises is reported as ``ERROR`` in its row, with the traceback printed
after the tables, so the other rows still come out. Each shape's rows also go to
standard error as soon as they are measured, so a run stopped by a time limit keeps
what it finished.

Run it from the repository root (``PYTHONPATH=.`` if jcce is not installed):

    python benchmarks/bench_backends.py             # full shapes (CPU, 2 cores: 6 to 11 minutes)
    python benchmarks/bench_backends.py --quick     # small shapes (smoke test, < 1 min)
    python benchmarks/bench_backends.py --only linear
    python benchmarks/bench_backends.py --only core --small --repeats 15  # K <= 1,000
    python benchmarks/bench_backends.py --only core,chains --repeats 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import optax

import jcce
from jcce import _xla  # the accelerator plan's default block size

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    CORE_COLUMNS,
    LINEAR_COLUMNS,
    environment,
    every_transform,
    fmt_bytes,
    fmt_ms,
    fmt_ratio,
    four_transforms,
    print_table,
)

BF16, F32 = jnp.bfloat16, jnp.float32

# (a) core shapes [N, K]; each is run in every dtype of CORE_DTYPES. The first one is
# also the shape of (b).
# The textbook classifiers' class counts (K = 2 to 1,000), on every backend.
SMALL_K_SHAPES = [
    (65536, 100),
    (32768, 200),
    (65536, 32),
    (16384, 1000),
    (256, 1000),
    (4096, 10),
    (4096, 2),
]
# 8192 x 50257 (GPT-2's vocabulary): "pallas" walks 6 blocks and a tail of 2,048.
ACCEL_CORE_SHAPES = [(8192, 131072), (65536, 32768), (8192, 50257), *SMALL_K_SHAPES]
CPU_CORE_SHAPES = [
    (4096, 32768),  # bench_core.py
    (256, 262144),  # bench_core.py
    (256, 32002),  # 2 x 16001: no equal chunks of 1,024 to 8,192 classes
    (128, 100277),  # cl100k's vocabulary, 149 x 673: reduced in windows on the CPU
    *SMALL_K_SHAPES,
]
QUICK_CORE_SHAPES = [(256, 4096), (16, 65536), (4096, 100), (4096, 10), (4096, 2)]
CORE_DTYPES = [BF16, F32]

# (b) chains: dtypes run at the first core shape (the CPU does float32 only, to stay
# within its time budget; bench_core.py's chain table is float32 too).
ACCEL_CHAIN_DTYPES = [BF16, F32]
CPU_CHAIN_DTYPES = [F32]

# (c) linear cases (N, D, V, dtype); the classifier is [V, D] (classifier_layout="VD").
ACCEL_LINEAR_SHAPES = [
    (8192, 4096, 131072, BF16),
    (16384, 2048, 262144, BF16),
    (8192, 4096, 131072, F32),
]
CPU_LINEAR_SHAPES = [  # bench_linear.py's FULL
    (4096, 512, 32768, F32),
    (4096, 512, 32768, BF16),
    (2048, 256, 262144, F32),
    (2048, 256, 262144, BF16),
]
QUICK_LINEAR_SHAPES = [(512, 64, 4096, F32), (256, 32, 16384, BF16)]

# "pallas" runs its kernels on NVIDIA GPUs only; elsewhere it is "xla" (not repeated).
IMPLEMENTATIONS = ("xla", "xla_cpu", None) + (
    ("pallas",) if jax.default_backend() == "gpu" else ()
)

ERRORS: list[str] = []


def on_accelerator() -> bool:
    return jax.default_backend() != "cpu"


def impl_name(impl) -> str:
    if impl is None:
        return f"None (={'xla' if on_accelerator() else 'xla_cpu'})"
    return impl


def _record_error(what: str) -> str:
    ERRORS.append(f"--- {what} ---\n{traceback.format_exc()}")
    return "ERROR"


def make_logits(shape, dtype, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    logits = (3.0 * jax.random.normal(k1, shape, F32)).astype(dtype)
    labels = jax.random.randint(k2, shape[:-1], 0, shape[-1], dtype=jnp.int32)
    return jax.block_until_ready(logits), jax.block_until_ready(labels)


# A sample of a short call times this many seconds of back-to-back calls: a single call
# of a millisecond or less is mostly dispatch and timer jitter (identical programs
# differed by 20% at 0.1 to 0.5 ms on the CPU).
SAMPLE_SECONDS = 0.05


def calls_per_sample(fn, args, budget=SAMPLE_SECONDS, most=1000):
    """How many back-to-back calls of ``fn`` make one sample: enough to fill about
    ``budget`` seconds (from one timed call), 1 for a call that long or longer."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    single = time.perf_counter() - t0
    return int(min(most, max(1, round(budget / max(single, 1e-9)))))


def _sample(fn, args, calls):
    """Seconds per call over ``calls`` calls dispatched back to back (the last one
    awaited), as a training loop runs them."""
    t0 = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / calls


def measure(losses, args, baseline, repeats, label, check):
    """Compiles each of ``losses`` (name -> function of ``args``, already wrapped in
    ``value_and_grad``) once, records its temp memory, calls it once (warm-up; that
    output goes to ``check(output, baseline_output) -> str``, the baseline compiled and
    run first), then times them all round-robin in a rotating order. Each sample is
    the mean of :func:`calls_per_sample` back-to-back calls (the same count for every
    function of a table row group, from the baseline's time): one call for the large
    shapes, enough to fill ``SAMPLE_SECONDS`` for the sub-millisecond ones.

    Returns ``({name: (median_s, median ratio to baseline, temp) or None}, {name:
    check string})``; a function that raises gets None and its traceback goes to
    ``ERRORS``, so the other rows still come out."""
    order = [baseline] + [n for n in losses if n != baseline]
    fns, temp, checks = {}, {}, {}
    ref = None
    for name in order:
        try:
            compiled = jax.jit(losses[name]).lower(*args).compile()
            temp[name] = int(compiled.memory_analysis().temp_size_in_bytes)
            out = jax.block_until_ready(compiled(*args))
            if name == baseline:
                ref = out
            checks[name] = check(out, ref) if ref is not None else ""
            del out
            fns[name] = compiled
        except Exception:  # noqa: BLE001 -- reported after the tables
            checks[name] = _record_error(f"{label} {name}")
    del ref
    if baseline not in fns:
        return {name: None for name in losses}, checks
    names = list(fns)
    calls = calls_per_sample(fns[baseline], args)
    samples = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            samples[name].append(_sample(fns[name], args, calls))
    results = {}
    for name in losses:
        if name not in fns:
            results[name] = None
            continue
        # Each round's calls ran back to back, so the median of the per-round ratios is
        # steadier than the ratio of the medians when the machine's speed drifts.
        ratio = statistics.median(
            t / u for t, u in zip(samples[name], samples[baseline], strict=True)
        )
        results[name] = (statistics.median(samples[name]), ratio, temp[name])
    return results, checks


CHAIN_COLUMNS = [
    "shape, implementation",
    "chain",
    "time",
    "time/plain",
    "temp",
    "temp/plain",
]


def _progress(what, columns, rows):
    """Prints ``rows`` to standard error as they come (a run cut off by a time limit
    keeps the tables of the shapes it finished) and returns them."""
    print(f"  done: {what}", file=sys.stderr, flush=True)
    print_table(columns, rows, file=sys.stderr)
    return rows


def _rows(label, results, baseline, extra=None):
    rows = []
    base = results.get(baseline)
    for name, r in results.items():
        if r is None:
            row = [label, name, "ERROR", "", "", ""]
            rows.append(row + [extra.get(name, "")] if extra is not None else row)
            continue
        t, ratio, temp = r
        row = [
            label,
            name,
            fmt_ms(t),
            fmt_ratio(ratio),
            fmt_bytes(temp),
            fmt_ratio(temp / max(base[2], 1)) if base else "",
        ]
        if extra is not None:
            row.append(extra.get(name, ""))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- (a)


def core_losses():
    def jcce_loss(impl):
        return lambda logits, labels: jcce.cross_entropy(
            logits, labels, implementation=impl
        )

    def optax_loss(logits, labels):
        return optax.losses.softmax_cross_entropy_with_integer_labels(
            logits, labels
        ).mean()

    losses = {f"jcce {impl_name(i)}": jcce_loss(i) for i in IMPLEMENTATIONS}
    losses["optax"] = optax_loss
    return {name: jax.value_and_grad(f) for name, f in losses.items()}


def grad_diff(out, ref) -> str:
    """Largest |difference| of the logits gradient from the baseline's."""
    g, g_ref = out[1].astype(F32), ref[1].astype(F32)
    return f"{float(jnp.max(jnp.abs(g - g_ref))):.1e}"


def bench_core(shapes, dtypes, repeats):
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            label = f"{shape[0]}x{shape[1]} {jnp.dtype(dtype).name}"
            args = make_logits(shape, dtype)
            results, diff = measure(
                core_losses(), args, "optax", repeats, label, grad_diff
            )
            rows += _progress(
                f"core {label}", CORE_COLUMNS, _rows(label, results, "optax", diff)
            )
            del args
    return rows


# ----------------------------------------------------------------------------- (b)


def chains(num_classes):
    return {
        "plain": jcce.chain(),
        "label_smoothing(0.1)": jcce.chain(jcce.label_smoothing(0.1)),
        "softcap(30)": jcce.chain(jcce.softcap(30.0)),
        "4-transform chain": four_transforms(),
        "every transform": every_transform(num_classes),
    }


def bench_chains(shape, dtypes, repeats):
    rows = []
    for dtype in dtypes:
        label = f"{shape[0]}x{shape[1]} {jnp.dtype(dtype).name}"
        args = make_logits(shape, dtype)
        for impl in IMPLEMENTATIONS:
            losses = {
                name: jax.value_and_grad(
                    lambda logits, labels, c=c, i=impl: c(
                        logits, labels, implementation=i
                    )
                )
                for name, c in chains(shape[-1]).items()
            }
            results, _ = measure(
                losses, args, "plain", repeats, label, lambda out, ref: ""
            )
            rows += _progress(
                f"chains {label} {impl_name(impl)}",
                CHAIN_COLUMNS,
                _rows(f"{label} {impl_name(impl)}", results, "plain"),
            )
        del args
    return rows


# ----------------------------------------------------------------------------- (c)


def make_linear(n, d, v, dtype, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    e = jax.random.normal(k1, (n, d), F32).astype(dtype)
    w = (jax.random.normal(k2, (v, d), F32) / d**0.5).astype(dtype)
    y = jax.random.randint(k3, (n,), 0, v, dtype=jnp.int32)
    return jax.block_until_ready((e, w, y))


def linear_losses(block_size, num_tokens, vocab):
    """The fused linear losses and the unfused one. On an accelerator, ``"xla_cpu"``
    (float32 matmuls over cache-sized chunks: 15 to 19 times the unfused time there,
    ../shared/ACCELERATOR.md) and ``None`` (the same program as ``"xla"``) are left
    out, to spend the device time on ``"xla"`` with token blocks of half the default
    size instead: the float32 ``[V, D]`` carry takes most of the default's temp, so
    the block size trades temp against the carry's traffic."""

    def fused(impl, lean=False, block=block_size):
        return lambda e, w, y: jcce.linear_cross_entropy(
            e,
            w,
            y,
            classifier_layout="VD",
            block_size=block,
            implementation=impl,
            lean=lean,
        )

    def unfused(e, w, y):
        logits = e @ w.T
        return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    if on_accelerator():
        losses = {f"jcce {i}": fused(i) for i in IMPLEMENTATIONS if i is not None}
        del losses["jcce xla_cpu"]
        half = max(8, (block_size or _xla.default_block_size(num_tokens, vocab)) // 2)
        losses[f"jcce xla, {half}-token blocks"] = fused("xla", block=half)
    else:
        losses = {f"jcce {impl_name(i)}": fused(i) for i in IMPLEMENTATIONS}
    losses[f"jcce {impl_name(None)} lean"] = fused(None, lean=True)
    losses["unfused"] = unfused
    return {name: jax.value_and_grad(f, argnums=(0, 1)) for name, f in losses.items()}


def dw_err(out, ref) -> str:
    """Largest |difference| of the classifier gradient from the baseline's, relative to
    the baseline's largest entry."""
    dw, dw_ref = out[1][1].astype(F32), ref[1][1].astype(F32)
    return f"{float(jnp.max(jnp.abs(dw - dw_ref)) / jnp.max(jnp.abs(dw_ref))):.1e}"


def bench_linear(cases, repeats, block_size):
    rows = []
    for n, d, v, dtype in cases:
        label = f"{n}x{d}x{v} {jnp.dtype(dtype).name}"
        args = make_linear(n, d, v, dtype)
        results, err = measure(
            linear_losses(block_size, n, v), args, "unfused", repeats, label, dw_err
        )
        rows += _progress(
            f"linear {label}",
            LINEAR_COLUMNS + ["dW rel. err"],
            _rows(label, results, "unfused", err),
        )
        del args
    return rows


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small shapes (smoke test)"
    )
    parser.add_argument(
        "--small",
        action="store_true",
        help="(a) at the small class counts only (K = 2 to 1,000)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per function in (a) and (b) (default: 20 on an "
        "accelerator, 5 on the CPU)",
    )
    parser.add_argument(
        "--linear-repeats",
        type=int,
        default=None,
        help="timed calls per function in (c) (default: 10 on an accelerator, 2 on "
        "the CPU)",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="tokens per block of the linear loss (default: auto)",
    )
    parser.add_argument(
        "--only",
        default="core,chains,linear",
        help="comma-separated sections to run (core, chains, linear)",
    )
    opts = parser.parse_args(argv)
    accel = on_accelerator()
    repeats = opts.repeats or (20 if accel else 5)
    linear_repeats = opts.linear_repeats or (10 if accel else 2)
    sections = {s.strip() for s in opts.only.split(",") if s.strip()}
    if opts.quick:
        core_shapes, linear_cases = QUICK_CORE_SHAPES, QUICK_LINEAR_SHAPES
    elif accel:
        core_shapes, linear_cases = ACCEL_CORE_SHAPES, ACCEL_LINEAR_SHAPES
    else:
        core_shapes, linear_cases = CPU_CORE_SHAPES, CPU_LINEAR_SHAPES
    if opts.small:
        core_shapes = SMALL_K_SHAPES
    chain_dtypes = ACCEL_CHAIN_DTYPES if accel else CPU_CHAIN_DTYPES

    print(environment())
    print(
        f"implementation None resolves to "
        f"{'xla' if accel else 'xla_cpu'} here; integer labels; one untimed "
        f"call per function first"
        f"{'; --quick' if opts.quick else ''}\n"
    )

    if "core" in sections:
        print(
            f"(a) core: value_and_grad of the mean loss w.r.t. logits, jax.jit; median "
            f"of {repeats}, round-robin; ratios to optax in the same run\n"
        )
        print_table(
            CORE_COLUMNS,
            bench_core(core_shapes, CORE_DTYPES, repeats),
        )
        print(flush=True)
    if "chains" in sections:
        print(
            f"(b) chains at {core_shapes[0][0]}x{core_shapes[0][1]}: value_and_grad "
            f"w.r.t. logits; median of {repeats}; ratios to plain jcce of the same "
            "implementation\n"
        )
        print_table(CHAIN_COLUMNS, bench_chains(core_shapes[0], chain_dtypes, repeats))
        print(flush=True)
    if "linear" in sections:
        print(
            "(c) linear: value_and_grad of the mean loss w.r.t. embeddings [N, D] and "
            "classifier [V, D] (classifier_layout='VD'), jax.jit; median of "
            f"{linear_repeats}; block_size {opts.block_size or 'auto'}; unfused = "
            "optax(e @ w.T in the inputs' dtype)\n"
        )
        print_table(
            LINEAR_COLUMNS + ["dW rel. err"],
            bench_linear(linear_cases, linear_repeats, opts.block_size),
        )
        print(flush=True)

    if ERRORS:
        print(f"{len(ERRORS)} function(s) raised:\n")
        for e in ERRORS:
            print(e)
        sys.exit(1)


if __name__ == "__main__":
    main()
