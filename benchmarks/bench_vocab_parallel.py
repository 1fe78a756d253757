"""Vocabulary-parallel cross-entropy on 8 host CPU devices: memory and communication.

For logits ``[N, V]`` sharded over the class axis of a mesh (``"model"``, 8 devices by
default), it compiles ``jax.value_and_grad`` of the mean loss three ways:

* ``jcce shard_map``: ``jcce.cross_entropy(..., vocab_axis="model")`` inside
  ``jax.shard_map`` (each device holds ``[N, V / 8]``);
* ``jcce jit``: the same under ``jax.jit`` with ``jax.set_mesh`` and no shard_map in the
  user's code;
* ``gather`` (the baseline): the logits gathered to every device
  (``jax.lax.with_sharding_constraint(logits, P())``), then
  ``optax.losses.softmax_cross_entropy_with_integer_labels``;

and prints, per device, XLA's compiled scratch memory (``memory_analysis()``) and the
bytes its collectives carry per token (the results of every all-reduce, all-gather,
all-to-all and collective-permute in the optimized HLO, summed), each also as a ratio
to the gather baseline's in the same run. The baseline is only compiled; the jcce rows
are also timed (median of ``--repeats``). Labels are replicated.

    python benchmarks/bench_vocab_parallel.py                 # N = 8192, V = 131072
    python benchmarks/bench_vocab_parallel.py --quick         # small shapes
"""

from __future__ import annotations

import argparse
import os
import re
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jcce  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, fmt_bytes, fmt_ms, print_table, time_fn  # noqa: E402

_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f64": 8, "pred": 1}


def collective_bytes(hlo: str) -> int:
    """Bytes of the results of every collective in an optimized HLO module."""
    total = 0
    pattern = (
        r"= (.+?) (all-reduce|all-gather|all-to-all|collective-permute)(?:-start)?\("
    )
    for m in re.finditer(pattern, hlo):
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
            count = int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
            total += count * _BYTES.get(dtype, 4)
    return total


def losses(mesh):
    def body(z, y):
        return jcce.cross_entropy(z, y, vocab_axis="model")

    sharded = jax.shard_map(
        body, mesh=mesh, in_specs=(P(None, "model"), P()), out_specs=P()
    )

    def jitted(z, y):
        return jcce.cross_entropy(z, y, vocab_axis="model")

    def gather(z, y):
        z = jax.lax.with_sharding_constraint(z, NamedSharding(mesh, P()))
        return optax.losses.softmax_cross_entropy_with_integer_labels(z, y).mean()

    return {"jcce shard_map": sharded, "jcce jit": jitted, "gather + optax": gather}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 256, V = 4096")
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args(argv)
    n, v = (256, 4096) if opts.quick else (8192, 131072)
    devices = jax.device_count()
    mesh = jax.make_mesh((devices,), ("model",), axis_types=(AxisType.Auto,))
    print(environment(), f"| {devices} devices, mesh ('model': {devices})")
    print(
        f"value_and_grad of the mean loss w.r.t. logits [{n}, {v}] float32 sharded "
        f"over 'model'; each device holds [{n}, {v // devices}]\n"
    )
    logits_sharding = NamedSharding(mesh, P(None, "model"))
    shapes = (
        jax.ShapeDtypeStruct((n, v), jnp.float32, sharding=logits_sharding),
        jax.ShapeDtypeStruct((n,), jnp.int32, sharding=NamedSharding(mesh, P())),
    )
    z = y = None
    rows = []
    with jax.set_mesh(mesh):
        for name, f in losses(mesh).items():
            compiled = jax.jit(jax.value_and_grad(f)).lower(*shapes).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            comm = collective_bytes(compiled.as_text())
            timed = "not run"
            if name.startswith("jcce"):
                if z is None:  # generated on the devices, shard by shard
                    make = jax.jit(
                        lambda key: jax.random.normal(key, (n, v), jnp.float32),
                        out_shardings=logits_sharding,
                    )
                    z = make(jax.random.key(0))
                    y = jax.random.randint(jax.random.key(1), (n,), 0, v)
                timed = fmt_ms(time_fn(compiled, z, y, repeats=opts.repeats))
            rows.append((name, temp, comm, timed))
    base_temp, base_comm = rows[-1][1], rows[-1][2]  # the gather baseline, this run
    print_table(
        [
            "loss",
            "temp per device",
            "temp/gather",
            "collective bytes per token",
            "bytes/gather",
            "time",
        ],
        [
            [
                name,
                fmt_bytes(temp),
                f"{temp / base_temp:.2e}",
                f"{comm / n:.1f}",
                f"{comm / base_comm:.2e}",
                timed,
            ]
            for name, temp, comm, timed in rows
        ],
    )


if __name__ == "__main__":
    main()
