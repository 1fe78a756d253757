"""jcce's optax drop-in names give optax's numbers: values and ``jax.grad`` gradients.

Compared against ``optax.losses`` itself on random inputs, for every ``axis`` and
``where`` form optax accepts, under ``jit`` and ``vmap`` and in half precision. The
deliberate differences documented in the docstrings' Note sections (out-of-range
integer labels, ``-inf`` logits with a zero label, labels on ``where``-masked logits,
float32 losses for half-precision logits) are each asserted explicitly.

Inputs are built in NumPy and every comparison runs jitted: optax's eager op-by-op
dispatch compiles dozens of tiny programs, which would dominate the runtime.
"""

from __future__ import annotations

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy.testing import assert_allclose

import jcce
from tests.reference import assert_optax_signature

RTOL = 1e-6
ATOL = 1e-6

NAMES = (
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "safe_softmax_cross_entropy",
)
INT = "softmax_cross_entropy_with_integer_labels"
SCE = "softmax_cross_entropy"
SAFE = "safe_softmax_cross_entropy"


# ----------------------------------------------------------------------------- inputs


def _rng(*key) -> np.random.Generator:
    """A generator seeded by ``key``, the same in every run (unlike ``hash``)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _logits(rng, shape, dtype=jnp.float32, scale=2.0) -> jax.Array:
    return jnp.asarray(scale * rng.standard_normal(shape), dtype)


def _int_labels(rng, batch_shape, num_classes) -> jax.Array:
    return jnp.asarray(rng.integers(0, num_classes, size=batch_shape), jnp.int32)


def _targets(rng, shape, axis=-1) -> jax.Array:
    """Probability targets summing to 1 over ``axis`` (an int or a tuple of axes):
    soft distributions, except every other example is one-hot."""
    axes = (axis,) if isinstance(axis, int) else axis
    axes = tuple(a % len(shape) for a in axes)
    batch_axes = tuple(a for a in range(len(shape)) if a not in axes)
    # Build class-last ([batch, K]), then move the classes back to ``axes``.
    batch = tuple(shape[a] for a in batch_axes)
    k = int(np.prod([shape[a] for a in axes]))
    t = rng.random(batch + (k,)) + 0.05
    flat = t.reshape(-1, k)
    flat[::2] = np.eye(k)[rng.integers(0, k, size=flat[::2].shape[0])]
    t = flat / flat.sum(-1, keepdims=True)
    t = t.reshape(batch + tuple(shape[a] for a in axes))
    return jnp.asarray(np.transpose(t, np.argsort(batch_axes + axes)), jnp.float32)


def _per_logit_mask(rng, shape, axis=-1) -> np.ndarray:
    """A random per-logit mask (classes on the int ``axis``) with one fully masked
    and one fully live example; every other example keeps at least one logit."""
    mask = np.moveaxis(rng.random(shape) < 0.6, axis, -1).copy()
    flat = mask.reshape(-1, mask.shape[-1])
    flat[0] = False
    flat[1] = True
    for row in flat[2:]:
        if not row.any():
            row[rng.integers(row.size)] = True
    return np.moveaxis(flat.reshape(mask.shape), -1, axis)


def _labels_on_live(rng, mask_class_last) -> jax.Array:
    """Integer labels on unmasked logits (any label for a fully masked example)."""
    flat = mask_class_last.reshape(-1, mask_class_last.shape[-1])
    out = [
        rng.choice(np.flatnonzero(row)) if row.any() else rng.integers(row.size)
        for row in flat
    ]
    return jnp.asarray(np.reshape(out, mask_class_last.shape[:-1]), jnp.int32)


def _example_mask(rng, batch_shape) -> jax.Array:
    """A random per-example mask with at least one masked and one live example."""
    where = rng.random(batch_shape) < 0.5
    where.reshape(-1)[:2] = (False, True)
    return jnp.asarray(where)


# ---------------------------------------------------------------------------- running


def run(fn, logits, labels, *, soft=None, **kwargs):
    """``fn``'s losses and the gradients of their sum w.r.t. the logits (and the
    probability targets, when ``soft``), all in one jitted call.

    ``fn`` may be a tuple of functions, all run in that one program (one compile
    instead of several); then a list of results comes back, one per function.
    ``axis`` is static (closed over); ``where`` is a traced argument.
    """
    fns = fn if isinstance(fn, tuple) else (fn,)
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    if soft is None:
        soft = jnp.issubdtype(labels.dtype, jnp.floating)
    where = kwargs.pop("where", None)
    argnums = (0, 1) if soft else 0

    def value_and_grads(f, z, t, w):
        def total(z, t):
            losses = f(z, t, **kwargs) if w is None else f(z, t, where=w, **kwargs)
            return jnp.sum(losses), losses

        (_, losses), grads = jax.value_and_grad(total, argnums, has_aux=True)(z, t)
        return losses, grads if soft else (grads,)

    out = jax.jit(lambda z, t, w: [value_and_grads(f, z, t, w) for f in fns])(
        logits, labels, where
    )
    out = [(np.asarray(v), tuple(map(np.asarray, g))) for v, g in out]
    return out if isinstance(fn, tuple) else out[0]


def _pair(name):
    """jcce's and optax's function of that name, for :func:`run`."""
    return getattr(jcce, name), getattr(optax.losses, name)


def _live_targets(logits, kwargs) -> np.ndarray:
    """Where the loss depends on the probability targets: not under a ``where``."""
    where = kwargs.get("where")
    if where is None:
        return np.ones(logits.shape, bool)
    where = np.asarray(where)
    if where.ndim != logits.ndim:
        where = np.expand_dims(where, kwargs.get("axis", -1))
    return np.broadcast_to(where, logits.shape)


def assert_parity(name, logits, labels, **kwargs):
    """jcce.name and optax.losses.name agree in values and gradients (float32);
    returns jcce's losses and gradients."""
    (got, got_grads), (want, want_grads) = run(_pair(name), logits, labels, **kwargs)
    assert got.shape == want.shape
    assert got.dtype == np.float32
    assert np.all(np.isfinite(want)), "the test must pick inputs optax handles"
    assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    g, w = got_grads[0], want_grads[0]
    assert g.shape == w.shape and g.dtype == w.dtype == np.float32
    assert_allclose(g, w, rtol=RTOL, atol=ATOL)
    if len(got_grads) == 2:
        # Gradient w.r.t. the targets (-log_softmax) where they count. Under a
        # ``where`` mask optax's is NaN (0 * -inf); jcce's is 0: the loss ignores them.
        live = _live_targets(logits, kwargs)
        g, w = got_grads[1], want_grads[1]
        assert g.shape == w.shape
        assert_allclose(g[live], w[live], rtol=RTOL, atol=ATOL)
        assert np.all(g[~live] == 0)
    return got, got_grads


# ------------------------------------------------------------------------- signatures


@pytest.mark.parametrize("name", NAMES)
def test_signature_matches_optax(name):
    """optax's parameters, in order, with its defaults and kinds; after them only
    keyword-only additions with defaults (``implementation``), so every optax call
    is a jcce call."""
    assert_optax_signature(getattr(jcce, name), getattr(optax.losses, name))


# ------------------------------------------------------------------ docstring examples


def test_optax_docstring_examples_last_axis():
    logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
    one_hot = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    expected = [0.2761, 2.9518]  # optax's printed values
    assert_allclose(jcce.softmax_cross_entropy(logits, one_hot), expected, atol=5e-5)
    assert_allclose(
        jcce.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1])),
        expected,
        atol=5e-5,
    )
    assert_allclose(
        jcce.safe_softmax_cross_entropy(logits, one_hot), expected, atol=5e-5
    )


def test_optax_docstring_example_tuple_axis():
    shape = (1, 2, 3, 4)
    logits = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    ix = jnp.array([[1, 2]])
    jx = jnp.array([[1, 3]])
    labels = jnp.ravel_multi_index((ix, jx), shape[2:])
    got, _ = assert_parity(INT, logits, labels, axis=(2, 3))
    assert got.shape == (1, 2)
    assert_allclose(got, [[6.4587, 0.4587]], atol=5e-5)


# ------------------------------------------------------------------ random, last axis

SHAPES = [(5, 7), (2, 3, 4)]


@pytest.mark.parametrize("shape", SHAPES)
def test_integer_labels_random(shape):
    rng = _rng("int", shape)
    logits = _logits(rng, shape)
    assert_parity(INT, logits, _int_labels(rng, shape[:-1], shape[-1]))


@pytest.mark.parametrize("name", [SCE, SAFE])
@pytest.mark.parametrize("shape", SHAPES)
def test_probability_labels_random(name, shape):
    """One-hot and soft targets (alternate examples); gradients w.r.t. both inputs."""
    rng = _rng(name, shape)
    assert_parity(name, _logits(rng, shape), _targets(rng, shape))


def test_labels_broadcast_to_logits():
    """optax broadcasts probability targets to the logits' shape; so does jcce."""
    rng = _rng("broadcast")
    logits = _logits(rng, (5, 7))
    labels = _targets(rng, (1, 7))
    fns = _pair(SCE) + _pair(SAFE)
    (got, g), (want, w), (got_safe, g_safe), (want_safe, w_safe) = run(
        fns, logits, labels, soft=False
    )
    assert got.shape == got_safe.shape == (5,)
    for a, b in [
        (got, want),
        (got_safe, want_safe),
        (g[0], w[0]),
        (g_safe[0], w_safe[0]),
    ]:
        assert_allclose(a, b, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------- axis


@pytest.mark.parametrize("axis", [0, 1])
def test_int_axis_integer_labels(axis):
    shape = (2, 3, 4)
    rng = _rng("int-axis", axis)
    batch = tuple(n for a, n in enumerate(shape) if a != axis)
    labels = _int_labels(rng, batch, shape[axis])
    assert_parity(INT, _logits(rng, shape), labels, axis=axis)


@pytest.mark.parametrize("axis", [0, 1])
def test_int_axis_probability_labels(axis):
    shape = (2, 3, 4)
    rng = _rng("soft-axis", axis)
    logits = _logits(rng, shape)
    assert_parity(SCE, logits, _targets(rng, shape, axis), axis=axis)


@pytest.mark.parametrize("axes", [(1, 3), (3, 1), (-1, -3)])
def test_tuple_axis_integer_labels(axes):
    """A label is a flat index into the class axes, in the order given (optax's
    ``ravel_multi_index`` convention); (1, 3) is non-contiguous, (3, 1) reversed.
    (2, 3) is the docstring example's, above."""
    shape = (1, 2, 3, 4)
    rng = _rng("tuple-int", axes)
    canon = tuple(a % len(shape) for a in axes)
    batch = tuple(n for a, n in enumerate(shape) if a not in canon)
    class_shape = tuple(shape[a] for a in canon)
    idx = tuple(rng.integers(0, n, size=batch) for n in class_shape)
    labels = jnp.asarray(np.ravel_multi_index(idx, class_shape), jnp.int32)
    assert_parity(INT, _logits(rng, shape), labels, axis=axes)


@pytest.mark.parametrize("axes", [(2, 3), (1, 3)])
def test_tuple_axis_probability_labels(axes):
    shape = (1, 2, 3, 4)
    rng = _rng("tuple-soft", axes)
    logits = _logits(rng, shape)
    assert_parity(SCE, logits, _targets(rng, shape, axes), axis=axes)


def test_tuple_axis_matches_one_hot_of_flat_index():
    """Integer labels with a tuple axis equal targets that are one-hot there."""
    shape = (2, 3, 4, 5)
    axes = (3, 1)
    rng = _rng("tuple-onehot")
    logits = _logits(rng, shape)
    ii = rng.integers(0, 5, size=(2, 4))
    jj = rng.integers(0, 3, size=(2, 4))
    labels = jnp.asarray(np.ravel_multi_index((ii, jj), (5, 3)), jnp.int32)
    target = np.zeros(shape, np.float32)
    b, k = np.meshgrid(np.arange(2), np.arange(4), indexing="ij")
    target[b, jj, k, ii] = 1.0
    a = jcce.softmax_cross_entropy_with_integer_labels(logits, labels, axis=axes)
    c = jcce.softmax_cross_entropy(logits, jnp.asarray(target), axis=axes)
    assert_allclose(a, c, rtol=RTOL, atol=ATOL)


def test_axis_none():
    shape = (2, 3, 4)
    rng = _rng("none")
    logits = _logits(rng, shape)
    labels = jnp.asarray(rng.dirichlet(np.ones(24)).reshape(shape), jnp.float32)
    assert_parity(SCE, logits, labels, axis=None)
    assert jcce.softmax_cross_entropy(logits, labels, axis=None).shape == ()


# ------------------------------------------------------------------------------ where


def test_where_per_example_integer_labels():
    shape = (2, 3, 4)
    rng = _rng("where-ex-int")
    where = _example_mask(rng, shape[:-1])
    logits = _logits(rng, shape)
    labels = _int_labels(rng, shape[:-1], shape[-1])
    got, (g,) = assert_parity(INT, logits, labels, where=where)
    assert np.all(got[~np.asarray(where)] == 0)
    assert np.all(g[~np.asarray(where)] == 0)


def test_where_per_example_probability_labels():
    shape = (2, 3, 4)
    rng = _rng("where-ex-soft")
    where = _example_mask(rng, shape[:-1])
    logits = _logits(rng, shape)
    labels = _targets(rng, shape)
    got, (g, _) = assert_parity(SCE, logits, labels, where=where)
    assert np.all(got[~np.asarray(where)] == 0)
    assert np.all(g[~np.asarray(where)] == 0)


def test_where_per_logit_integer_labels():
    """Labels on unmasked logits (a label on a masked one is a deliberate difference,
    below); the first example is fully masked and costs 0."""
    shape = (2, 3, 4)
    rng = _rng("where-logit-int")
    mask = _per_logit_mask(rng, shape)
    logits = _logits(rng, shape)
    labels = _labels_on_live(rng, mask)
    got, (g,) = assert_parity(INT, logits, labels, where=jnp.asarray(mask))
    assert got.reshape(-1)[0] == 0
    assert np.all(g[~mask] == 0)


def test_where_per_logit_probability_labels():
    """optax drops masked logits from the softmax and from the sum; so does jcce
    (the soft targets put mass on masked logits too: ignored by both)."""
    shape = (5, 7)
    rng = _rng("where-logit-soft")
    mask = _per_logit_mask(rng, shape)
    logits = _logits(rng, shape)
    labels = _targets(rng, shape)
    got, (g, _) = assert_parity(SCE, logits, labels, where=jnp.asarray(mask))
    assert got[0] == 0
    assert np.all(g[~mask] == 0)


def test_where_per_logit_equals_dropping_the_logits():
    rng = _rng("where-drop")
    logits = _logits(rng, (1, 6))
    mask = np.array([[True, False, True, True, False, True]])
    got, (g,) = assert_parity(INT, logits, jnp.array([3]), where=jnp.asarray(mask))
    z = np.asarray(logits, np.float64)[0, mask[0]]
    assert_allclose(got, [np.log(np.exp(z).sum()) - z[2]], rtol=RTOL, atol=ATOL)
    assert np.all(g[~mask] == 0)


@pytest.mark.parametrize("axis", [0, 1])
def test_where_with_int_axis(axis):
    shape = (2, 3, 4)
    rng = _rng("where-axis", axis)
    logits = _logits(rng, shape)
    mask = _per_logit_mask(rng, shape, axis=axis)
    if axis == 0:
        labels = _labels_on_live(rng, np.moveaxis(mask, axis, -1))
        assert_parity(INT, logits, labels, axis=axis, where=jnp.asarray(mask))
        batch = labels.shape
        assert_parity(INT, logits, labels, axis=axis, where=_example_mask(rng, batch))
    else:
        labels = _targets(rng, shape, axis)
        assert_parity(SCE, logits, labels, axis=axis, where=jnp.asarray(mask))
        batch = shape[:axis] + shape[axis + 1 :]
        assert_parity(SCE, logits, labels, axis=axis, where=_example_mask(rng, batch))


def test_where_per_logit_with_tuple_axis():
    shape = (1, 2, 3, 4)
    axes = (1, 3)
    rng = _rng("where-tuple")
    logits = _logits(rng, shape)
    mask_cl = rng.random((1, 3, 8)) < 0.6  # class-last: batch (1, 3), 2 * 4 classes
    mask_cl[..., 0] = True  # every example keeps a logit
    # Back to the original layout: (b0, b2, c1, c3) -> (b0, c1, b2, c3).
    mask = np.transpose(mask_cl.reshape(1, 3, 2, 4), (0, 2, 1, 3))
    labels = _labels_on_live(rng, mask_cl)
    assert_parity(INT, logits, labels, axis=axes, where=jnp.asarray(mask))


# ------------------------------------------------------------------------ jit and vmap


def _cases():
    rng = _rng("transforms")
    logits = _logits(rng, (3, 4, 6))
    mask = _per_logit_mask(rng, (3, 4, 6))
    return {
        "int-where-example": (
            INT,
            logits,
            _int_labels(rng, (3, 4), 6),
            {"where": _example_mask(rng, (3, 4))},
        ),
        "int-where-logit": (
            INT,
            logits,
            _labels_on_live(rng, mask),
            {"where": jnp.asarray(mask)},
        ),
        "soft-where-logit": (
            SCE,
            logits,
            _targets(rng, (3, 4, 6)),
            {"where": jnp.asarray(mask)},
        ),
        "safe": (SAFE, logits, _targets(rng, (3, 4, 6)), {}),
    }


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_jit_and_vmap_match_eager(case):
    name, logits, labels, kw = CASES[case]
    fn = getattr(jcce, name)

    def call(z, t, kw):
        return fn(z, t, **kw)

    def loss(z, t, kw):
        return jnp.sum(fn(z, t, **kw))

    eager = fn(logits, labels, **kw)
    # jit, with ``where`` traced.
    assert_allclose(jax.jit(call)(logits, labels, kw), eager, rtol=RTOL, atol=ATOL)
    # vmap over the leading batch axis.
    assert_allclose(jax.vmap(call)(logits, labels, kw), eager, rtol=RTOL, atol=ATOL)
    # Per-example gradients (vmap of grad) are the rows of the batched gradient
    # (whose parity with optax the tests above check).
    g = jax.jit(jax.grad(loss))(logits, labels, kw)
    per_example = jax.vmap(jax.grad(loss))(logits, labels, kw)
    assert_allclose(per_example, g, rtol=RTOL, atol=ATOL)


def test_vmap_over_non_leading_axis_with_int_axis():
    rng = _rng("vmap-axis")
    logits = _logits(rng, (4, 5, 3))  # classes on axis 1 of each (4, 5) slice
    labels = _int_labels(rng, (4, 3), 5)
    fn = jcce.softmax_cross_entropy_with_integer_labels
    mapped = jax.vmap(lambda z, y: fn(z, y, axis=1), in_axes=(2, 1), out_axes=1)(
        logits, labels
    )
    want, _ = run(
        optax.losses.softmax_cross_entropy_with_integer_labels, logits, labels, axis=1
    )
    assert_allclose(mapped, want, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_returns_float32(dtype, name):
    """Losses are float32 and equal optax run in float32 on the same (upcast) values;
    gradients keep the logits' dtype and are optax's float32 gradient, rounded."""
    rng = _rng("half", name, str(jnp.dtype(dtype)))
    shape = (5, 7)
    logits = _logits(rng, shape, dtype)
    if name == INT:
        labels = _int_labels(rng, shape[:-1], shape[-1])
    else:
        labels = _targets(rng, shape).astype(dtype)
    ours, theirs = _pair(name)
    (got, (g,)), (want, (g_want,)) = run(
        (ours, _upcast(theirs)), logits, labels, soft=False
    )
    assert got.dtype == want.dtype == np.float32
    assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert g.dtype == g_want.dtype == dtype
    eps = float(jnp.finfo(dtype).eps)
    assert_allclose(g.astype(np.float32), g_want.astype(np.float32), rtol=eps, atol=0)


def _upcast(fn):
    """``fn`` run in float32 on the (exactly) upcast half-precision inputs; its
    gradient comes back rounded to the half dtype."""

    def upcast(x):
        x = jnp.asarray(x)
        return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return lambda z, t, **kw: fn(upcast(z), upcast(t), **kw)


def test_half_precision_optax_returns_half():
    """For reference: optax returns the logits' dtype (the documented difference)."""
    logits = jnp.zeros((2, 3), jnp.bfloat16)
    labels = jnp.array([0, 2])
    theirs = jax.eval_shape(
        optax.losses.softmax_cross_entropy_with_integer_labels, logits, labels
    )
    assert theirs.dtype == jnp.bfloat16
    got = jcce.softmax_cross_entropy_with_integer_labels(logits, labels)
    assert got.dtype == jnp.float32
    assert_allclose(got, [np.log(3)] * 2, rtol=RTOL)


def test_half_precision_where_and_tuple_axis():
    shape = (1, 2, 3, 4)
    rng = _rng("half-where")
    logits = _logits(rng, shape, jnp.bfloat16)
    labels = _int_labels(rng, (1, 3), 8)
    where = jnp.asarray([[True, False, True]])
    ours, theirs = _pair(INT)
    (got, (g,)), (want, (g_want,)) = run(
        (ours, _upcast(theirs)), logits, labels, axis=(1, 3), where=where
    )
    assert got.dtype == np.float32
    assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert g.dtype == jnp.bfloat16
    eps = float(jnp.finfo(jnp.bfloat16).eps)
    assert_allclose(g.astype(np.float32), g_want.astype(np.float32), rtol=eps, atol=0)


# ------------------------------------------------------------- deliberate differences


def test_negative_label_is_nan_where_optax_wraps():
    rng = _rng("neg")
    logits = _logits(rng, (4, 5))
    labels = np.array([0, -1, 2, 4])
    (got, (g,)), (theirs, (g_theirs,)) = run(_pair(INT), logits, labels)
    assert np.isnan(got[1])
    assert np.all(np.isnan(g[1]))
    # optax silently reads class K - 1: a finite, wrong loss.
    z = np.asarray(logits, np.float64)[1]
    assert_allclose(theirs[1], np.log(np.exp(z).sum()) - z[4], rtol=RTOL, atol=ATOL)
    # The other examples are untouched and equal optax, gradients included.
    ok = np.array([True, False, True, True])
    assert_allclose(got[ok], theirs[ok], rtol=RTOL, atol=ATOL)
    assert_allclose(g[ok], g_theirs[ok], rtol=RTOL, atol=ATOL)


def test_out_of_range_label_is_nan():
    """Labels K, 1000 and -K - 1: NaN in jcce (optax is NaN or garbage there too)."""
    rng = _rng("oob")
    logits = _logits(rng, (5, 5))
    labels = np.array([1, 5, 3, 1000, -6])
    (got, (g,)), (want, (g_want,)) = run(_pair(INT), logits, labels)
    bad = labels >= 5
    bad[-1] = True
    assert np.all(np.isnan(got[bad]))
    assert np.all(np.isnan(g[bad]))
    ok = ~bad
    assert_allclose(got[ok], want[ok], rtol=RTOL, atol=ATOL)
    assert_allclose(g[ok], g_want[ok], rtol=RTOL, atol=ATOL)


def test_out_of_range_label_with_tuple_axis_is_nan():
    shape = (1, 2, 3, 4)
    logits = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    labels = jnp.array([[12, -1]])  # 12 == 3 * 4 classes
    got = jcce.softmax_cross_entropy_with_integer_labels(logits, labels, axis=(2, 3))
    assert np.all(np.isnan(np.asarray(got)))


def test_masked_out_of_range_label_is_zero():
    """A per-example ``where`` hides even an out-of-range label, gradient included."""
    logits = _logits(_rng("masked-neg"), (2, 3))
    got, (g,) = run(
        jcce.softmax_cross_entropy_with_integer_labels,
        logits,
        [-1, 0],
        where=jnp.array([False, True]),
    )
    assert got[0] == 0 and np.all(g[0] == 0)
    assert np.isfinite(got[1])


def test_neg_inf_logit_with_zero_label():
    """jcce: finite, equal to the loss with that class removed; optax: NaN."""
    rng = _rng("neginf")
    logits = np.array(_logits(rng, (3, 5)))
    logits[:, 2] = -np.inf
    labels = np.array(_targets(rng, (3, 5)))
    labels[:, 0] += 0.1  # mass left after dropping class 2
    labels[:, 2] = 0.0
    labels /= labels.sum(-1, keepdims=True)
    (got, (g, g_t)), (theirs, _) = run(_pair(SCE), logits, labels)
    assert np.all(np.isnan(theirs))
    assert np.all(np.isfinite(got))

    # Reference without class 2, in float64: loss, d/dz = p - t, d/dt = -log p.
    keep = np.array([0, 1, 3, 4])
    z = logits[:, keep].astype(np.float64)
    t = labels[:, keep].astype(np.float64)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    assert_allclose(got, -(t * log_p).sum(-1), rtol=RTOL, atol=ATOL)
    assert np.all(g[:, 2] == 0)
    assert_allclose(g[:, keep], np.exp(log_p) - t, rtol=RTOL, atol=ATOL)
    assert_allclose(g_t[:, keep], -log_p, rtol=RTOL, atol=ATOL)
    # The integer version with a label off the -inf class: optax is finite; equal.
    assert_parity(INT, jnp.asarray(logits), jnp.array([0, 3, 4]))


@pytest.mark.parametrize("shape", SHAPES)
def test_safe_softmax_cross_entropy_with_neg_inf(shape):
    """jcce.safe_softmax_cross_entropy equals optax's, -inf logits included, and
    jcce.softmax_cross_entropy gives the same numbers (jcce's one convention)."""
    rng = _rng("safe-inf", shape)
    logits = np.asarray(_logits(rng, shape))
    inf = rng.random(shape) < 0.3
    inf.reshape(-1, shape[-1])[:, 0] = False  # every example keeps a finite logit
    logits = jnp.asarray(np.where(inf, -np.inf, logits))
    labels = np.where(inf, 0.0, np.asarray(_targets(rng, shape)))
    labels[..., 0] += 0.1  # mass left on the finite class 0
    labels = jnp.asarray(labels / labels.sum(-1, keepdims=True), jnp.float32)
    fns = (jcce.safe_softmax_cross_entropy, optax.losses.safe_softmax_cross_entropy)
    fns += (jcce.softmax_cross_entropy,)
    (got, g), (want, w), (plain, g_plain) = run(fns, logits, labels)
    assert np.all(np.isfinite(want))
    for a, b in [(got, want), *zip(g, w, strict=True), (plain, got)]:
        assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    for a, b in zip(g_plain, g, strict=True):
        assert_allclose(a, b, rtol=RTOL, atol=ATOL)


def test_safe_softmax_cross_entropy_mass_on_neg_inf_is_inf():
    """Target mass on a -inf logit: optax's safe version and jcce both give +inf."""
    logits = jnp.array([[0.0, -jnp.inf, 1.0], [0.5, 0.2, -1.0]])
    labels = jnp.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    (got, (g,)), (want, _) = run(_pair(SAFE), logits, labels, soft=False)
    assert got[0] == np.inf and want[0] == np.inf
    assert_allclose(got[1], want[1], rtol=RTOL, atol=ATOL)
    assert np.all(np.isfinite(g))


def test_label_on_where_masked_logit_is_inf():
    """jcce: that class has probability 0, so +inf; optax returns a finite number."""
    rng = _rng("label-on-masked")
    logits = _logits(rng, (2, 4))
    where = jnp.array([[True, False, True, True], [True, True, True, True]])
    labels = np.array([1, 1])
    (got, (g,)), (theirs, _) = run(_pair(INT), logits, labels, where=where)
    assert got[0] == np.inf
    assert np.isfinite(theirs[0])
    assert_allclose(got[1], theirs[1], rtol=RTOL, atol=ATOL)
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize("shape", [(4, 1), (1, 5)])
def test_same_rank_where_broadcasts_like_optax(shape):
    rng = np.random.default_rng(3)
    z = rng.standard_normal((4, 5)).astype(np.float32)
    y = np.array([0, 1, 2, 3], np.int32)
    t = np.eye(5, dtype=np.float32)[y]
    where = rng.random(shape) > 0.3
    where.flat[0] = True
    full = np.broadcast_to(where, (4, 5))
    y = np.where(full[np.arange(4), y], y, np.argmax(full, axis=1)).astype(np.int32)
    t = np.eye(5, dtype=np.float32)[y]
    for ours, theirs, labels in [
        (jcce.softmax_cross_entropy, optax.losses.softmax_cross_entropy, t),
        (
            jcce.softmax_cross_entropy_with_integer_labels,
            optax.losses.softmax_cross_entropy_with_integer_labels,
            y,
        ),
    ]:
        np.testing.assert_allclose(
            ours(z, labels, where=where), theirs(z, labels, where=where), rtol=1e-6
        )


# ------------------------------------------------------------ ranking_softmax_loss

RANK = jcce.ranking_softmax_loss


def _ranking_inputs(seed=0, shape=(4, 6)):
    rng = np.random.default_rng(seed)
    scores = (2.0 * rng.standard_normal(shape)).astype(np.float32)
    relevance = rng.integers(0, 4, shape).astype(np.float32)
    where = rng.random(shape) > 0.25
    where[0] = False  # a list with no item left
    weights = rng.uniform(0.0, 2.0, shape).astype(np.float32)
    return scores, relevance, where, weights


@pytest.mark.parametrize("reduce_fn", [jnp.mean, jnp.sum, None])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_ranking_softmax_loss_matches_optax(reduce_fn, masked, weighted):
    scores, relevance, where, weights = _ranking_inputs()
    kw = {"reduce_fn": reduce_fn}
    if masked:
        kw["where"] = where
    if weighted:
        kw["weights"] = weights

    def run(f):
        def total(s):
            return jnp.sum(f(s, relevance, **kw))

        return jax.jit(lambda s: (f(s, relevance, **kw), jax.grad(total)(s)))(scores)

    got, got_grad = run(RANK)
    want, want_grad = run(optax.losses.ranking_softmax_loss)
    assert got.dtype == jnp.float32
    assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert_allclose(got_grad, want_grad, rtol=RTOL, atol=ATOL)


def test_ranking_softmax_loss_hand_computed_and_leading_dims():
    scores = jnp.array([[[0.0, 0.0], [2.0, -1.0]]])  # one batch of two lists
    labels = jnp.array([[[1.0, 3.0], [1.0, 0.0]]])
    per_list = RANK(scores, labels, reduce_fn=None)
    assert per_list.shape == (1, 2)
    assert_allclose(per_list, [[4 * np.log(2), np.log1p(np.exp(-3.0))]], rtol=1e-6)
    assert_allclose(RANK(scores, labels), per_list.mean(), rtol=1e-6)


def test_ranking_softmax_loss_no_list_kept_gives_zero_and_masked_items_are_inert():
    scores = jnp.array([[1.0, jnp.nan], [jnp.inf, 0.5]])
    labels = jnp.array([[2.0, jnp.nan], [1.0, 1.0]])
    none = jnp.zeros((2, 2), bool)
    assert float(RANK(scores, labels, where=none)) == 0.0
    keep = jnp.array([[True, False], [False, True]])
    value, grad = jax.value_and_grad(lambda s: RANK(s, labels, where=keep))(scores)
    assert_allclose(value, 0.0, atol=1e-7)  # each list keeps one item: log 1 = 0
    assert np.isfinite(np.asarray(grad)).all() and float(grad[0, 1]) == 0.0


def test_ranking_softmax_loss_minus_inf_score_with_label_zero_costs_nothing():
    scores = jnp.array([[0.0, -jnp.inf, 0.0]])
    labels = jnp.array([[1.0, 0.0, 0.0]])
    assert_allclose(RANK(scores, labels), np.log(2), rtol=1e-6)
    assert np.isnan(float(optax.losses.ranking_softmax_loss(scores, labels)))


def test_ranking_softmax_loss_half_precision_gives_float32():
    scores, relevance, _, _ = _ranking_inputs(1)
    got = RANK(jnp.asarray(scores, jnp.bfloat16), relevance)
    assert got.dtype == jnp.float32
    want = RANK(jnp.asarray(jnp.asarray(scores, jnp.bfloat16), jnp.float32), relevance)
    assert_allclose(got, want, rtol=1e-6)


def test_ranking_softmax_loss_signature_matches_optax():
    assert_optax_signature(RANK, optax.losses.ranking_softmax_loss)


_RANK_ERRORS = [
    (
        lambda: RANK(jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3))),
        TypeError,
        "ranking_softmax_loss: logits must have a floating dtype (float16, bfloat16, "
        "float32 or float64), got int32",
    ),
    (
        lambda: RANK(jnp.zeros((2, 3)), jnp.ones((2, 4))),
        ValueError,
        "ranking_softmax_loss: labels has shape (2, 4) but must have (or broadcast "
        "to) the logits' shape (2, 3)",
    ),
    (
        lambda: RANK(jnp.zeros((2, 3)), jnp.ones((2, 3)), where=jnp.ones((2, 3))),
        TypeError,
        "ranking_softmax_loss: where must be a boolean mask, got float32",
    ),
    (
        lambda: RANK(jnp.zeros((2, 3)), jnp.ones((2, 3)), where=jnp.ones((3, 2), bool)),
        ValueError,
        "ranking_softmax_loss: where has shape (3, 2) but must broadcast to the "
        "logits' shape (2, 3) (one value per item)",
    ),
    (
        lambda: RANK(jnp.zeros((2, 3)), jnp.ones((2, 3)), weights=jnp.ones(2)),
        ValueError,
        "ranking_softmax_loss: weights has shape (2,) but must broadcast to the "
        "logits' shape (2, 3) (one value per item)",
    ),
    (
        lambda: RANK(jnp.zeros((2, 3)), jnp.ones((2, 3)), weights=jnp.ones(3, bool)),
        TypeError,
        "ranking_softmax_loss: weights must be real, got bool",
    ),
    (
        lambda: RANK(jnp.zeros((2, 3)), jnp.ones((2, 3)), reduce_fn="mean"),
        TypeError,
        "ranking_softmax_loss: reduce_fn must be a callable taking where= (such as "
        "jnp.mean or jnp.sum) or None, got str",
    ),
]


@pytest.mark.parametrize(("call", "exc", "message"), _RANK_ERRORS)
def test_ranking_softmax_loss_errors(call, exc, message):
    with pytest.raises(exc, match="^" + re.escape(message) + "$"):
        call()
