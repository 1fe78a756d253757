"""Shared helpers for the jcce benchmarks: timing, compiled-memory stats, tables."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def time_fn(fn: Callable, *args, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall-clock seconds of ``fn(*args)`` (``fn`` should already be jitted).

    Each call is synchronised with ``jax.block_until_ready``; ``warmup`` untimed calls
    (the first one compiles) precede ``repeats`` timed ones.
    """
    for _ in range(max(warmup, 1)):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_stats(fn: Callable, *args) -> dict[str, int]:
    """XLA's ``memory_analysis`` of ``jax.jit(fn)`` compiled for ``args`` (bytes)."""
    ma = jax.jit(fn).lower(*args).compile().memory_analysis()
    return {
        "temp": int(ma.temp_size_in_bytes),
        "argument": int(ma.argument_size_in_bytes),
        "output": int(ma.output_size_in_bytes),
        "alias": int(ma.alias_size_in_bytes),
    }


def temp_bytes(fn: Callable, *args) -> int:
    """Temporary (scratch) bytes XLA allocates for ``jax.jit(fn)`` on ``args``."""
    return memory_stats(fn, *args)["temp"]


def optimized_hlo(fn: Callable, *args) -> str:
    """The optimized HLO text of ``jax.jit(fn)`` compiled for ``args``."""
    return jax.jit(fn).lower(*args).compile().as_text()


def fmt_bytes(n: float) -> str:
    """Human-readable byte count (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def fmt_ratio(x: float) -> str:
    return f"{x:.3f}"


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], file=None
) -> None:
    """Prints a Markdown-style table (left-aligned first column, the rest right) to
    ``file`` (standard output by default)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        parts = [
            r[i].ljust(widths[i]) if i == 0 else r[i].rjust(widths[i])
            for i in range(len(r))
        ]
        return "| " + " | ".join(parts) + " |"

    print(line(cells[0]), file=file)
    print("|" + "|".join(("-" * (w + 2)) for w in widths) + "|", file=file)
    for r in cells[1:]:
        print(line(r), file=file)
    if file is not None:
        file.flush()


def cpu_model() -> str:
    """The host CPU's model name and core count, as the OS reports them."""
    import os
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def environment() -> str:
    """One line naming the JAX version, the backend and its device, and the host CPU."""
    import platform

    dev = jax.devices()[0]
    return (
        f"jax {jax.__version__}, backend {jax.default_backend()} ({dev.device_kind}), "
        f"host CPU {cpu_model()}, python {platform.python_version()}"
    )


# Column headers shared by the benchmark scripts' tables.
CORE_COLUMNS = [
    "shape",
    "function",
    "time",
    "time/optax",
    "temp",
    "temp/optax",
    "max|dgrad|",
]
LINEAR_COLUMNS = ["N x D x V", "op", "time", "time/unfused", "temp", "temp/unfused"]


def four_transforms():
    """The chain the accelerator comparisons use: smoothing, temperature, z-loss and
    soft-cap (Liger-Kernel has all but the temperature)."""
    import jcce

    return jcce.chain(
        jcce.label_smoothing(0.1),
        jcce.temperature(2.0),
        jcce.z_loss(1e-4),
        jcce.softcap(30.0),
    )


def every_transform(num_classes: int):
    """A chain of every transform (focal included), class weights over ``num_classes``."""
    import jcce

    return jcce.chain(
        jcce.softcap(30.0),
        jcce.temperature(2.0),
        jcce.label_smoothing(0.1),
        jcce.z_loss(1e-4),
        jcce.log_base(2.0),
        jcce.focal(2.0),
        jcce.class_weights(jnp.linspace(0.5, 1.5, num_classes)),
    )
