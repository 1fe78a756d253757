"""The losses lower for every XLA backend: nothing CPU-only may slip in.

``jax.export`` lowers for platforms without needing their devices.
"""

import jax
import jax.numpy as jnp
import pytest

import jcce

CHAIN = jcce.chain(
    jcce.label_smoothing(0.1),
    jcce.softcap(30.0),
    jcce.temperature(2.0),
    jcce.z_loss(1e-4),
    jcce.log_base(2.0),
)


def _value_and_grads(z, y, t, cw, s):
    def total(z, t):
        return (
            CHAIN(z, y, class_weights=cw, weights=s)
            + jcce.cross_entropy(z, t, reduction="sum")
            + jcce.softmax_cross_entropy_with_integer_labels(z, y).sum()
            # the loss family: per-class objectives, their smoothing sums, entropy
            + jcce.chain(jcce.focal(0.5), jcce.label_smoothing(0.1))(z, y)
            + jcce.generalized_cross_entropy(z, t)
            + jcce.symmetric_cross_entropy(z, y)
            + jcce.poly_loss_cross_entropy(z, t).sum()
            + jcce.entropy(z)
        )

    return jax.value_and_grad(total, argnums=(0, 1))(z, t)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_export_for_cpu_cuda_and_tpu(dtype):
    n, k = 8, 16
    args = (
        jax.ShapeDtypeStruct((n, k), dtype),
        jax.ShapeDtypeStruct((n,), jnp.int32),
        jax.ShapeDtypeStruct((n, k), jnp.float32),
        jax.ShapeDtypeStruct((k,), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.float32),
    )
    exported = jax.export.export(
        jax.jit(_value_and_grads), platforms=("cpu", "cuda", "tpu")
    )(*args)
    assert exported.platforms == ("cpu", "cuda", "tpu")
    text = exported.mlir_module()
    assert "custom_call" not in text.replace("Sharding", "")  # plain XLA ops only


def test_exported_program_runs_and_matches():
    z = jax.random.normal(jax.random.PRNGKey(0), (4, 6))
    y = jnp.array([0, 5, 2, 3])
    t = jax.nn.softmax(z * 0.3)
    cw = jnp.linspace(0.5, 2.0, 6)
    s = jnp.array([1.0, 0.0, 2.0, 1.0])
    exported = jax.export.export(jax.jit(_value_and_grads))(z, y, t, cw, s)
    roundtrip = jax.export.deserialize(exported.serialize())
    got = roundtrip.call(z, y, t, cw, s)
    want = _value_and_grads(z, y, t, cw, s)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert jnp.allclose(g, w, rtol=1e-6), (g, w)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_linear_cross_entropy_exports_for_cpu_cuda_and_tpu(dtype):
    def value_and_grads(e, w, b, y):
        def loss(e, w, b):
            return CHAIN.linear(e, w, y, bias=b, block_size=4) + jnp.sum(
                jcce.linear_cross_entropy(e, w.T, y, reduction="none", block_size=3,
                                          classifier_layout="VD")
            )  # fmt: skip

        return jax.value_and_grad(loss, argnums=(0, 1, 2))(e, w, b)

    n, d, v = 10, 4, 16
    args = (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((d, v), dtype),
        jax.ShapeDtypeStruct((v,), dtype),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    exported = jax.export.export(
        jax.jit(value_and_grads), platforms=("cpu", "cuda", "tpu")
    )(*args)
    assert "custom_call" not in exported.mlir_module().replace("Sharding", "")
