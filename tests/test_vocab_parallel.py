"""Vocabulary-parallel cross-entropy: logits sharded over the class axis in shard_map.

Every case compares the sharded loss and its gradients with the same loss on one device,
on meshes (data, model) of 8x1, 4x2, 2x4 and 1x8 host CPU devices (the root
``conftest.py`` asks XLA for eight). The compiled programs are also checked for what
crosses the network: a handful of ``[tokens]``-sized all-reduces, never the logits.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jcce
from tests.compiled import compiled_as_users, user_pipeline
from tests.reference import assert_close_to_scale

N, V = 16, 24  # tokens and classes: 24 = 8 * 3, so every mesh divides them
MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]
RTOL, ATOL = 1e-5, 1e-6


def _mesh(shape):
    return jax.make_mesh(shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def _data(seed=0):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((N, V)) * 3).astype(np.float32)
    z[2, [1, 5, 17]] = -np.inf  # masked classes on several shards
    y = rng.integers(0, V, N).astype(np.int32)
    y[2] = 4
    y[5] = -100  # ignored
    where = rng.uniform(size=N) > 0.2
    weights = rng.uniform(0.5, 2.0, N).astype(np.float32)
    cw = np.linspace(0.5, 1.5, V).astype(np.float32)
    probs = rng.dirichlet(np.ones(V), N).astype(np.float32)
    return z, y, where, weights, cw, probs


Z, Y, WHERE, WEIGHTS, CW, PROBS = _data()

CHAINS = {
    "plain": lambda t: jcce.chain(),
    "smoothing+maps+z_loss+units": lambda t: jcce.chain(
        jcce.softcap(4.0),
        jcce.temperature(t),
        jcce.label_smoothing(0.1),
        jcce.z_loss(1e-2),
        jcce.log_base(2.0),
    ),
    "temperature+smoothing": lambda t: jcce.chain(
        jcce.temperature(t), jcce.label_smoothing(0.2)
    ),
    "focal+smoothing": lambda t: jcce.chain(jcce.focal(t), jcce.label_smoothing(0.1)),
    # a whole gamma: its power sums are summed over the shards
    "focal2+smoothing": lambda t: jcce.chain(
        jcce.temperature(t), jcce.focal(2.0), jcce.label_smoothing(0.1)
    ),
    "poly": lambda t: jcce.chain(jcce.poly(t)),
    "symmetric": lambda t: jcce.chain(jcce.symmetric(0.5, t)),
}


def _options(name, cw):
    opts = dict(where=WHERE, weights=WEIGHTS, ignore_index=-100)
    if name != "symmetric":
        opts["class_weights"] = cw
    return opts


def _weighted(out):
    """A non-uniform cotangent for the per-token losses."""
    return jnp.sum(out * (1 + jnp.cos(jnp.arange(out.shape[0]))))


def _single_device(name, z, cw, t):
    loss = CHAINS[name](t)
    out = loss(z, jnp.asarray(Y), reduction="none", **_options(name, cw))
    return _weighted(out)


def _sharded(name, mesh, cw_spec):
    def body(z, y, where, weights, cw, t):
        opts = dict(where=where, weights=weights, ignore_index=-100)
        if name != "symmetric":
            opts["class_weights"] = cw
        out = CHAINS[name](t)(z, y, reduction="none", vocab_axis="model", **opts)
        return out

    f = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P("data", "model"), P("data"), P("data"), P("data"), cw_spec, P()),
        out_specs=P("data"),
    )
    return lambda z, cw, t: _weighted(
        f(z, jnp.asarray(Y), jnp.asarray(WHERE), jnp.asarray(WEIGHTS), cw, t)
    )


def _assert_close(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    ("name", "mesh_shape"),
    # Every mesh for the chain that reaches every kernel term; the others on the
    # meshes that split the vocabulary.
    [
        (name, mesh)
        for name in CHAINS
        for mesh in (MESHES if name == "smoothing+maps+z_loss+units" else MESHES[2:])
    ],
    ids=lambda x: f"{x[0]}x{x[1]}" if isinstance(x, tuple) else x,
)
def test_sharded_vocabulary_equals_one_device(name, mesh_shape):
    mesh = _mesh(mesh_shape)
    args = (jnp.asarray(Z), jnp.asarray(CW), jnp.float32(1.5))
    want = jax.value_and_grad(lambda *a: _single_device(name, *a), argnums=(0, 1, 2))(
        *args
    )
    # Class weights as this device's slice on half the meshes, whole on the others.
    cw_spec = (P("model"), P())[MESHES.index(mesh_shape) % 2]
    f = _sharded(name, mesh, cw_spec)
    got = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(*args)
    _assert_close(got, want)
    # The gradient of the logits keeps their sharding.
    dz = got[1][0]
    assert dz.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "model")), 2)


@pytest.mark.parametrize("mesh_shape", [(2, 4), (1, 8)], ids=["2x4", "1x8"])
def test_probability_targets(mesh_shape):
    mesh = _mesh(mesh_shape)
    loss = jcce.chain(jcce.label_smoothing(0.1), jcce.z_loss(1e-2))

    def body(z, q):
        return loss(z, q, reduction="none", vocab_axis="model")

    spec = P("data", "model")
    f = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec), out_specs=P("data"))
    z = jnp.asarray(np.where(np.isfinite(Z), Z, 0))
    q = jnp.asarray(PROBS)
    got = jax.jit(jax.value_and_grad(lambda z, q: _weighted(f(z, q)), (0, 1)))(z, q)
    want = jax.value_and_grad(
        lambda z, q: _weighted(loss(z, q, reduction="none")), (0, 1)
    )(z, q)
    _assert_close(got, want)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions_over_a_model_only_mesh(reduction):
    """With the batch unsharded, each device's reduction is the global one."""
    mesh = _mesh((1, 8))
    loss = jcce.chain(jcce.label_smoothing(0.1))

    def body(z, cw):
        return loss(
            z, jnp.asarray(Y), reduction=reduction, vocab_axis="model",
            **{**_options("x", cw)},
        )  # fmt: skip

    f = jax.shard_map(
        body, mesh=mesh, in_specs=(P(None, "model"), P("model")), out_specs=P()
    )
    z, cw = jnp.asarray(Z), jnp.asarray(CW)
    got = jax.jit(jax.value_and_grad(f, (0, 1)))(z, cw)
    want = jax.value_and_grad(
        lambda z, cw: loss(z, jnp.asarray(Y), reduction=reduction, **_options("x", cw)),
        (0, 1),
    )(z, cw)
    _assert_close(got, want)


def test_out_of_range_label_is_nan_on_every_shard():
    mesh = _mesh((1, 8))
    y = jnp.asarray(Y).at[3].set(V)  # one past the last class of the last shard

    def body(z):
        return jcce.cross_entropy(z, y, reduction="none", vocab_axis="model")

    f = jax.shard_map(body, mesh=mesh, in_specs=P(None, "model"), out_specs=P())
    out = np.asarray(jax.jit(f)(jnp.asarray(Z)))
    assert np.isnan(out[3]) and np.isnan(out[5])  # 5 has label -100
    assert np.all(np.isfinite(np.delete(out, [3, 5])))


def _collectives(hlo: str):
    """(op, element count) of every collective in an optimized HLO module."""
    found = []
    for m in re.finditer(
        r"= (.+?) (all-reduce|all-gather|all-to-all|collective-permute)(?:-start)?\(",
        hlo,
    ):
        shapes = re.findall(r"\[([\d,]*)\]", m.group(1))
        count = sum(
            int(np.prod([int(d) for d in s.split(",") if d] or [1])) for s in shapes
        )
        found.append((m.group(2), count))
    return found


def test_only_per_token_numbers_cross_the_network():
    mesh = _mesh((2, 4))
    f = _sharded("smoothing+maps+z_loss+units", mesh, P("model"))
    args = (jnp.asarray(Z), jnp.asarray(CW), jnp.float32(1.5))
    hlo = (
        jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
        .lower(*args)
        .compile(user_pipeline())
        .as_text()
    )
    ops = _collectives(hlo)
    assert ops, "expected all-reduces over the model axis"
    assert not [op for op, _ in ops if op != "all-reduce"], ops
    local_tokens, local_classes = N // 2, V // 4
    # Each all-reduce carries a few numbers per local token (tuples of them at most),
    # or the replicated class weights' and hyper-parameters' cotangents.
    for _, count in ops:
        assert count <= 8 * local_tokens or count <= V, ops
    assert all(count < local_tokens * local_classes for _, count in ops if count > V)


def test_vocab_axis_outside_shard_map_is_a_clear_error():
    with pytest.raises(ValueError, match=r"vocab_axis='model' is not a mesh axis"):
        jcce.cross_entropy(Z, Y, vocab_axis="model")


def test_vocab_axis_type_and_axis_errors():
    with pytest.raises(TypeError, match="vocab_axis must be a mesh axis name"):
        jcce.cross_entropy(Z, Y, vocab_axis=3)
    mesh = _mesh((1, 8))

    def body(z):
        return jcce.cross_entropy(
            z.reshape(N, 3, 1), jnp.asarray(Y), axis=(1, 2), vocab_axis="model"
        )

    f = jax.shard_map(body, mesh=mesh, in_specs=P(None, "model"), out_specs=P())
    with pytest.raises(ValueError, match="vocab_axis needs a single class axis"):
        f(jnp.asarray(Z))


def test_class_weights_of_neither_size_name_both():
    mesh = _mesh((1, 8))

    def body(z):
        return jcce.cross_entropy(
            z, jnp.asarray(Y), class_weights=jnp.ones(5), vocab_axis="model"
        )

    f = jax.shard_map(body, mesh=mesh, in_specs=P(None, "model"), out_specs=P())
    with pytest.raises(ValueError, match=r"class_weights has shape \(5,\)"):
        f(jnp.asarray(Z))


# ------------------------------------------------------------ linear_cross_entropy

D = 6


def _linear_data():
    rng = np.random.default_rng(1)
    e = rng.standard_normal((N, D)).astype(np.float32)
    w = rng.standard_normal((D, V)).astype(np.float32)
    b = rng.standard_normal(V).astype(np.float32)
    return jnp.asarray(e), jnp.asarray(w), jnp.asarray(b)


@pytest.mark.parametrize(
    ("mesh_shape", "reduction", "layout", "lean"),
    [((8, 1), "sum", "DV", False), ((4, 2), "none", "VD", False),
     ((2, 4), "sum", "VD", False), ((1, 8), "none", "DV", False),
     ((2, 4), "none", "DV", False), ((2, 4), "sum", "DV", True),
     ((4, 2), "none", "VD", True)],
)  # fmt: skip
def test_linear_with_a_sharded_classifier(mesh_shape, reduction, layout, lean):
    """Tokens over "data", the classifier's vocabulary over "model" (2-D mesh)."""
    mesh = _mesh(mesh_shape)
    e, w, b = _linear_data()
    w = w if layout == "DV" else w.T
    loss = jcce.chain(jcce.label_smoothing(0.1), jcce.z_loss(1e-3), jcce.softcap(5.0))
    y = jnp.asarray(np.where(Y < 0, 0, Y))

    def body(e, w, b, cw):
        out = loss.linear(
            e, w, y_local(), bias=b, class_weights=cw, reduction=reduction,
            vocab_axis="model", block_size=3, classifier_layout=layout, lean=lean,
        )  # fmt: skip
        return jax.lax.psum(out, "data") if reduction == "sum" else out

    def y_local():  # this data shard's labels
        i = jax.lax.axis_index("data")
        return jax.lax.dynamic_slice_in_dim(
            y, i * (N // mesh_shape[0]), N // mesh_shape[0]
        )

    w_spec = P(None, "model") if layout == "DV" else P("model", None)
    f = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P("data"), w_spec, P("model"), P("model")),
        out_specs=P() if reduction == "sum" else P("data"),
    )

    def unfused(e, w, b, cw):
        logits = e @ (w if layout == "DV" else w.T) + b[None, :]
        return loss(logits, y, class_weights=cw, reduction=reduction)

    def scalar(fn):
        return lambda *a: jnp.sum(fn(*a) * (1 + jnp.cos(jnp.arange(N))))

    args = (e, w, b, jnp.asarray(CW))
    got = jax.jit(jax.value_and_grad(scalar(f), argnums=(0, 1, 2, 3)))(*args)
    want = jax.value_and_grad(scalar(unfused), argnums=(0, 1, 2, 3))(*args)
    for g, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w_), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("lean", [False, True])
@pytest.mark.parametrize("mesh_shape", [(8, 1), (2, 4)])
def test_linear_objective_with_tokens_over_data(mesh_shape, lean):
    """An objective's per-example sums (focal with label smoothing), their gradients
    for gamma and epsilon included, with tokens over "data": the lean mode's
    classifier sweep raised a ValueError under check_vma (its unit cotangent was typed
    as replicated where the per-example losses vary over "data")."""
    mesh = _mesh(mesh_shape)
    e, w, _ = _linear_data()
    y = jnp.asarray(np.where(Y < 0, 0, Y))

    def chain(gamma, eps):
        return jcce.chain(jcce.focal(gamma), jcce.label_smoothing(eps))

    def body(e, w, y, gamma, eps):
        out = chain(gamma, eps).linear(
            e, w, y, reduction="sum", vocab_axis="model", block_size=3, lean=lean
        )
        return jax.lax.psum(out, "data")

    f = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P("data"), P(None, "model"), P("data"), P(), P()),
        out_specs=P(),
    )

    def unfused(e, w, y, gamma, eps):
        return chain(gamma, eps)(e @ w, y, reduction="sum")

    args = (e, w, y, jnp.float32(2.0), jnp.float32(0.1))
    got = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 3, 4)))(*args)
    want = jax.value_and_grad(unfused, argnums=(0, 1, 3, 4))(*args)
    for g, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w_), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(("dtype", "rtol"), [(jnp.float32, 2e-5), (jnp.bfloat16, 2e-2)])
def test_linear_over_vocabulary_chunks_on_each_shard(dtype, rtol):
    """2,300 classes per device with D = 1,100: the backward matmuls run over 4 chunks
    of 512 classes and a shorter rest, and 16-bit logits over 2,048 and a rest."""
    mesh = _mesh((2, 4))
    n, d, v = 16, 1100, 4 * 2300
    rng = np.random.default_rng(7)
    e = jnp.asarray(rng.standard_normal((n, d)), dtype)
    w = jnp.asarray(rng.standard_normal((d, v)) / np.sqrt(d) * 3, dtype)
    y = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    loss = jcce.chain(jcce.label_smoothing(0.1), jcce.z_loss(1e-3))

    def body(e, w, y):
        out = loss.linear(e, w, y, vocab_axis="model", block_size=8, reduction="sum")
        return jax.lax.psum(out, "data")

    f = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P("data"), P(None, "model"), P("data")),
        out_specs=P(),
    )
    got = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(e, w, y)
    e32, w32 = e.astype(jnp.float32), w.astype(jnp.float32)
    want = jax.value_and_grad(
        lambda e, w: loss(e @ w, y, reduction="sum"), argnums=(0, 1)
    )(e32, w32)
    np.testing.assert_allclose(got[0], want[0], rtol=2e-5)
    assert_close_to_scale(got[1], want[1], rtol, dtype)


# ------------------------------------------------ jax.jit with NamedSharding, no shard_map


JN, JD, JV = 64, 16, 1024  # large enough that logits dwarf every per-token vector


def _jit_data():
    rng = np.random.default_rng(2)
    z = (rng.standard_normal((JN, JV)) * 3).astype(np.float32)
    y = rng.integers(0, JV, JN).astype(np.int32)
    e = rng.standard_normal((JN, JD)).astype(np.float32)
    w = (rng.standard_normal((JD, JV)) / 4).astype(np.float32)
    b = rng.standard_normal(JV).astype(np.float32)
    cw = np.linspace(0.5, 1.5, JV).astype(np.float32)
    return map(jnp.asarray, (z, y, e, w, b, cw))


JZ, JY, JE, JW, JB, JCW = _jit_data()
LOCAL_LOGITS = (JN // 2) * (JV // 4)  # per device on the 2x4 mesh


@pytest.mark.parametrize(
    "name", ["plain", "smoothing+maps+z_loss+units", "focal+smoothing"]
)
def test_jit_named_sharding_partitions_without_gathering_logits(name, implementation):
    mesh = _mesh((2, 4))
    loss = CHAINS[name](jnp.float32(1.5))

    def f(z, y, cw):
        return loss(z, y, class_weights=cw, vocab_axis="model")

    with jax.set_mesh(mesh):
        zs = jax.device_put(JZ, NamedSharding(mesh, P("data", "model")))
        ys = jax.device_put(JY, NamedSharding(mesh, P("data")))
        step = jax.jit(jax.value_and_grad(f, argnums=(0, 2)))
        compiled = step.lower(zs, ys, JCW).compile(user_pipeline())
        got = compiled(zs, ys, JCW)
    want = jax.value_and_grad(
        lambda z, cw: loss(z, JY, class_weights=cw), argnums=(0, 1)
    )(JZ, JCW)
    _assert_close(got, want)
    assert got[1][0].sharding.is_equivalent_to(
        NamedSharding(mesh, P("data", "model")), 2
    )
    for op, count in _collectives(compiled.as_text()):
        assert count <= JV, (op, count)  # per-token vectors and the [V] cotangent
    # Per device: scratch well below the whole [N, V] logits (256 KiB in float32; the
    # device's own slice is 32 KiB, and the kernel's fixed buffers are a few KiB). An
    # XLA:CPU fact, which the "xla_cpu" layout exists to reach; XLA:CPU materializes
    # the plain "xla" layout's shared subexpressions.
    if implementation == "xla_cpu":
        assert compiled.memory_analysis().temp_size_in_bytes < JN * JV * 4 / 4


def test_jit_linear_with_a_sharded_classifier():
    mesh = _mesh((2, 4))
    loss = jcce.chain(jcce.label_smoothing(0.1), jcce.z_loss(1e-3))

    def f(e, w, b):
        return loss.linear(e, w, JY, bias=b, vocab_axis="model", block_size=16)

    with jax.set_mesh(mesh):
        es = jax.device_put(JE, NamedSharding(mesh, P("data")))
        ws = jax.device_put(JW, NamedSharding(mesh, P(None, "model")))
        bs = jax.device_put(JB, NamedSharding(mesh, P("model")))
        compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
        compiled = compiled.lower(es, ws, bs).compile(user_pipeline())
        got = compiled(es, ws, bs)
    want = jax.value_and_grad(
        lambda e, w, b: loss(e @ w + b[None, :], JY), argnums=(0, 1, 2)
    )(JE, JW, JB)
    _assert_close(got, want)
    assert got[1][1].sharding.is_equivalent_to(NamedSharding(mesh, P(None, "model")), 2)
    for op, count in _collectives(compiled.as_text()):
        assert count <= JN * JD, (op, count)  # at most the embeddings' gradient


def test_jit_errors_name_the_mesh_problem():
    z = jnp.asarray(np.where(np.isfinite(Z), Z, 0))
    with jax.set_mesh(_mesh((2, 4))):
        with pytest.raises(ValueError, match="vocab_axis='vocab' is not a mesh axis"):
            jcce.cross_entropy(z, Y, vocab_axis="vocab")
        with pytest.raises(ValueError, match=r"22 classes on axis 1, which the 4 dev"):
            jcce.cross_entropy(z[:, :22], np.minimum(Y, 21), vocab_axis="model")
    explicit = jax.make_mesh(
        (2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2
    )
    with jax.set_mesh(explicit):
        with pytest.raises(ValueError, match=r"needs mesh axes of type AxisType.Auto"):
            jcce.cross_entropy(z, Y, vocab_axis="model")


def test_padding_the_vocabulary_with_negative_infinity_changes_nothing():
    """The documented remedy for a vocabulary the devices cannot split evenly."""
    z = jnp.asarray(np.where(np.isfinite(Z), Z, 0))[:, :22]
    y = jnp.asarray(np.clip(Y, 0, 21))
    loss = jcce.chain(jcce.label_smoothing(0.1), jcce.z_loss(1e-2))
    padded = jnp.pad(z, ((0, 0), (0, 2)), constant_values=-jnp.inf)
    got = jax.value_and_grad(lambda z: loss(z, y))(padded)
    want = jax.value_and_grad(lambda z: loss(z, y))(z)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(got[1][:, :22], want[1], rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(got[1][:, 22:]) == 0)


def test_three_numbers_per_token_in_the_forward_pass():
    """max, sum of exponentials and the label's logit: 3 N floats cross the axis."""
    mesh = _mesh((1, 8))

    def body(z, y):
        return jcce.cross_entropy(z, y, reduction="none", vocab_axis="model")

    f = jax.shard_map(body, mesh=mesh, in_specs=(P(None, "model"), P()), out_specs=P())
    hlo = compiled_as_users(f, jnp.asarray(Z), jnp.asarray(Y)).as_text()
    ops = _collectives(hlo)
    assert {op for op, _ in ops} == {"all-reduce"}
    assert sum(count for _, count in ops) == 3 * N
