"""Where a chain's time goes: XLA's own per-operation timings, from JAX's profiler.

Runs ``jax.jit(jax.value_and_grad(loss))`` (or the forward alone with ``--forward``) of
one of bench_core.py's chains a few times under :func:`jax.profiler.trace`, reads the
Perfetto trace it writes, and prints the operations that took the most time per call:
on XLA:CPU the thunks of the compiled program (named after its HLO fusions, such as
``ynn_fusion.3`` or ``multiply_subtract_fusion``), on a GPU its kernels. Independent
thunks can run at the same time on XLA:CPU, and a conditional is listed beside the
fusion inside it, so the rows may add up to more than the call's wall time, which is
printed too. Look the names up in the compiled HLO
(``--hlo`` prints it).

    python benchmarks/profile_thunks.py --chain softcap
    python benchmarks/profile_thunks.py --chain "every transform" --forward
    python benchmarks/profile_thunks.py --chain plain --implementation xla --dtype bfloat16
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment  # noqa: E402
from bench_core import chain_configs, make_inputs  # noqa: E402

# Host-side events of the trace, not operations of the program.
_HOST = (
    "$",
    "ThunkExecutor",
    "PjitFunction",
    "CommonPjRt",
    "SlinkyThreadPool",
    "AllocateOutputBuffers",
    "PythonRefManager",
    "Handle inputs",
    "ParseArguments",
    "end: ",
)


def operation_times(fn, args, calls):
    """Milliseconds per call of each operation in the profile of ``calls`` calls."""
    with tempfile.TemporaryDirectory() as out:
        with jax.profiler.trace(out, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
        (path,) = glob.glob(
            os.path.join(out, "**", "*perfetto_trace.json.gz"), recursive=True
        )
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and not e["name"].startswith(_HOST):
            total[e["name"]] += e["dur"] / 1e3 / calls
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chain", default="softcap", help="a name from bench_core.py")
    parser.add_argument("--shape", default="4096x32768", help="N x K")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--implementation", default=None)
    parser.add_argument("--forward", action="store_true", help="the loss alone")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--hlo", action="store_true", help="print the compiled HLO")
    opts = parser.parse_args(argv)

    n, k = (int(s) for s in opts.shape.lower().split("x"))
    logits, labels = make_inputs((n, k), jnp.dtype(opts.dtype))
    chains = chain_configs(k)
    if opts.chain not in chains:
        parser.error(f"--chain must be one of {sorted(chains)}")
    chain = chains[opts.chain]

    def loss(z):
        return chain(z, labels, implementation=opts.implementation)

    fn = jax.jit(loss if opts.forward else jax.value_and_grad(loss))
    compiled = fn.lower(logits).compile()
    jax.block_until_ready(compiled(logits))
    t0 = time.perf_counter()
    for _ in range(opts.calls):
        jax.block_until_ready(compiled(logits))
    wall = (time.perf_counter() - t0) / opts.calls * 1e3

    print(environment())
    what = "loss" if opts.forward else "value_and_grad"
    print(
        f"{what} of {opts.chain!r}, {n}x{k} {opts.dtype}, implementation="
        f"{opts.implementation}: {wall:.1f} ms a call (mean of {opts.calls})\n"
    )
    times = operation_times(compiled, (logits,), opts.calls)
    for name, ms in times.most_common(opts.top):
        if ms >= 0.05:
            print(f"{ms:9.1f} ms  {name}")

    if opts.hlo:
        print("\n" + compiled.as_text())


if __name__ == "__main__":
    main()
