"""One process of the two-process vocabulary-parallel check (run by test_multiprocess.py).

Usage: python tests/multiprocess_worker.py PROCESS_ID PORT

Each process has four host CPU devices; together they form a (2, 4) mesh of "data" and
"model" across both processes, with CPU collectives over gloo. The loss and gradients
of the vocabulary-parallel cross-entropy (inside jax.shard_map) and of the fused linear
cross-entropy are compared with the same losses computed unsharded in this process. Prints
"OK <process id>" on success and exits non-zero otherwise.
"""

import os
import sys

process_id, port = int(sys.argv[1]), int(sys.argv[2])
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    coordinator_address=f"localhost:{port}",
    num_processes=2,
    process_id=process_id,
    local_device_ids=list(range(4)),
)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jcce  # noqa: E402

assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
N, D, V = 16, 8, 64
rng = np.random.default_rng(0)  # the same data in both processes
z = (rng.standard_normal((N, V)) * 3).astype(np.float32)
y = rng.integers(0, V, N).astype(np.int32)
e = rng.standard_normal((N, D)).astype(np.float32)
w = (rng.standard_normal((D, V)) / 3).astype(np.float32)

mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
loss = jcce.chain(jcce.label_smoothing(0.1), jcce.z_loss(1e-3), jcce.softcap(5.0))


def put(x, spec):
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def gather(x):
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# Vocabulary-parallel cross-entropy in shard_map: global mean over "data".
def body(z, y):
    total = jax.lax.psum(loss(z, y, reduction="sum", vocab_axis="model"), "data")
    return total / N


f = jax.shard_map(
    body, mesh=mesh, in_specs=(P("data", "model"), P("data")), out_specs=P()
)
value, dz = jax.jit(jax.value_and_grad(f))(
    put(z, P("data", "model")), put(y, P("data"))
)
want_value, want_dz = jax.value_and_grad(lambda z: loss(z, y))(z)
np.testing.assert_allclose(gather(value), want_value, rtol=1e-5)
np.testing.assert_allclose(gather(dz), want_dz, rtol=1e-5, atol=1e-7)


# The fused linear cross-entropy with the classifier sharded over "model".
def body_linear(e, w, y):
    total = loss.linear(e, w, y, reduction="sum", vocab_axis="model", block_size=4)
    return jax.lax.psum(total, "data") / N


g = jax.shard_map(
    body_linear,
    mesh=mesh,
    in_specs=(P("data"), P(None, "model"), P("data")),
    out_specs=P(),
)
value, (de, dw) = jax.jit(jax.value_and_grad(g, argnums=(0, 1)))(
    put(e, P("data")), put(w, P(None, "model")), put(y, P("data"))
)
want_value, (want_de, want_dw) = jax.value_and_grad(
    lambda e, w: loss(e @ w, y), argnums=(0, 1)
)(e, w)
np.testing.assert_allclose(gather(value), want_value, rtol=1e-5)
np.testing.assert_allclose(gather(de), want_de, rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(gather(dw), want_dw, rtol=1e-5, atol=1e-6)
print(f"OK {process_id}", flush=True)
jax.distributed.shutdown()
