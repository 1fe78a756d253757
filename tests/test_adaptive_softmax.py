"""``jcce.adaptive_softmax`` against ``torch.nn.AdaptiveLogSoftmaxWithLoss`` and float64.

The same parameters are copied into torch's module (its ``[out, in]`` weights are the
transposes of jcce's): the per-example output, the loss, ``log_prob`` and ``predict``
must agree, and so must the gradients of every parameter and of the input. The loss
is also checked against a float64 NumPy reference of the definition (head
log-probability plus in-cluster log-probability) with masks, weights and every
reduction, and its first and second derivatives against ``jax`` derivatives of that
definition written naively.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jcce
from jcce import adaptive_softmax as asm
from tests.compiled import user_pipeline
from tests.reference import data_parallel_value_and_grad

D, V, CUTOFFS = 16, 300, (20, 80, 200)


def _params(seed=0, *, head_bias=True, div_value=2.0, dtype=jnp.float32, tails=1.0):
    """Parameters whose cluster tokens are competitive in the head (``tails`` scales
    their columns), so that predictions land in the clusters too."""
    p = asm.init(jax.random.key(seed), D, V, CUTOFFS, div_value=div_value,
                 head_bias=head_bias, dtype=dtype)  # fmt: skip
    head = p.head.at[:, CUTOFFS[0] :].multiply(tails)
    return asm.AdaptiveSoftmax(head, p.head_bias, p.projections, p.outputs, p.cutoffs)


def _problem(seed=0, n=64, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = (3 * rng.normal(size=(n, D))).astype(dtype)
    # Every cluster gets labels, the last cluster fewest.
    y = rng.choice(V, n, p=np.r_[np.full(20, 3.0), np.full(60, 1.0),
                                 np.full(120, 0.5), np.full(100, 0.25)]
                   / np.r_[np.full(20, 3.0), np.full(60, 1.0), np.full(120, 0.5),
                           np.full(100, 0.25)].sum())  # fmt: skip
    return x, y.astype(np.int32)


def _torch_module(p):
    m = torch.nn.AdaptiveLogSoftmaxWithLoss(
        D, V, list(CUTOFFS), div_value=2.0, head_bias=p.head_bias is not None
    ).double()

    def t(a):
        return torch.tensor(np.asarray(a, np.float64))

    with torch.no_grad():
        m.head.weight.copy_(t(p.head).T)
        if p.head_bias is not None:
            m.head.bias.copy_(t(p.head_bias))
        for i in range(len(CUTOFFS)):
            m.tail[i][0].weight.copy_(t(p.projections[i]).T)
            m.tail[i][1].weight.copy_(t(p.outputs[i]).T)
    return m


def _reference(p, x, y):
    """``-log p(y)`` in float64 from the definition."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x = np.asarray(x, np.float64)

    def log_softmax(z):
        m = z.max(-1, keepdims=True)
        return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))

    head = log_softmax(x @ p.head + (0 if p.head_bias is None else p.head_bias))
    bounds = (0,) + CUTOFFS + (V,)
    out = np.empty(len(y))
    for n, label in enumerate(y):
        cluster = np.searchsorted(bounds, label, side="right") - 1
        if cluster == 0:
            out[n] = -head[n, label]
        else:
            tail = log_softmax(
                x[n] @ p.projections[cluster - 1] @ p.outputs[cluster - 1]
            )
            out[n] = -(head[n, CUTOFFS[0] + cluster - 1]
                       + tail[label - bounds[cluster]])  # fmt: skip
    return out


def _naive_loss(p, x, y):
    """The loss through ``jax.nn.log_softmax`` of every cluster: for derivatives."""
    lp = asm.log_prob(p, x)
    return -jnp.mean(jnp.take_along_axis(lp, y[:, None], axis=-1))


# ---------------------------------------------------------------------- torch parity


@pytest.mark.parametrize("head_bias", [False, True])
def test_output_loss_log_prob_and_predict_match_torch(head_bias):
    p = _params(1, head_bias=head_bias, tails=6.0)
    x, y = _problem(1)
    m = _torch_module(p)
    got = asm.loss(p, x, y, reduction="none")
    want = m(torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.int64))
    np.testing.assert_allclose(got, -want.output.detach().numpy(), rtol=2e-6)
    np.testing.assert_allclose(asm.loss(p, x, y), want.loss.item(), rtol=2e-6)
    np.testing.assert_allclose(
        asm.log_prob(p, x),
        m.log_prob(torch.tensor(x, dtype=torch.float64)).detach().numpy(),
        rtol=2e-6, atol=2e-6,
    )  # fmt: skip
    predicted = np.asarray(asm.predict(p, x))
    np.testing.assert_array_equal(
        predicted, m.predict(torch.tensor(x, dtype=torch.float64)).numpy()
    )
    # Both of predict's paths ran: shortlist argmaxes, and rows that needed a cluster.
    assert np.any(predicted < CUTOFFS[0]) and np.any(predicted >= CUTOFFS[1])


def test_gradients_match_torch_autograd():
    p = _params(2, tails=3.0)
    x, y = _problem(2)
    m = _torch_module(p)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    m(xt, torch.tensor(y, dtype=torch.int64)).loss.backward()
    gp, gx = jax.grad(asm.loss, argnums=(0, 1))(p, x, y)
    tol = dict(rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gx, xt.grad.numpy(), **tol)
    np.testing.assert_allclose(gp.head.T, m.head.weight.grad.numpy(), **tol)
    np.testing.assert_allclose(gp.head_bias, m.head.bias.grad.numpy(), **tol)
    for i in range(len(CUTOFFS)):
        np.testing.assert_allclose(
            gp.projections[i].T, m.tail[i][0].weight.grad.numpy(), **tol
        )
        np.testing.assert_allclose(
            gp.outputs[i].T, m.tail[i][1].weight.grad.numpy(), **tol
        )


def test_init_draws_as_torch_linear_does():
    p = asm.init(jax.random.key(0), 64, 10_000, [100, 1000, 5000], head_bias=True)
    m = torch.nn.AdaptiveLogSoftmaxWithLoss(64, 10_000, [100, 1000, 5000],
                                            head_bias=True)  # fmt: skip
    assert p.head.shape == m.head.weight.T.shape == (64, 103)
    assert p.cutoffs == (100, 1000, 5000, 10_000) and p.num_clusters == 3
    for i, tail in enumerate(m.tail):
        assert p.projections[i].shape == tail[0].weight.T.shape  # 64 // 4 ** (i + 1)
        assert p.outputs[i].shape == tail[1].weight.T.shape
    for a, fan_in in [(p.head, 64), (p.head_bias, 64), (p.projections[2], 64),
                      (p.outputs[2], 1)]:  # fmt: skip
        bound = 1 / np.sqrt(fan_in)
        assert np.all(np.abs(np.asarray(a)) <= bound)
        assert np.abs(np.asarray(a)).max() > 0.9 * bound  # uniform, not narrower
    assert asm.init(jax.random.key(0), 8, 10, [5], dtype=jnp.bfloat16).head.dtype == (
        jnp.bfloat16
    )


# ------------------------------------------------------------------ float64 reference


@pytest.mark.parametrize("rows", [None, 1, 8, 64])
def test_value_matches_the_float64_definition_for_any_block_size(rows):
    with jax.enable_x64(True):
        p = jax.tree.map(lambda a: a.astype(jnp.float64), _params(3))
        x, y = _problem(3, dtype=np.float64)
        got = asm.loss(p, x, y, reduction="none", block_rows=rows)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, _reference(p, x, y), rtol=1e-12)


@pytest.mark.parametrize("implementation", ["xla", "xla_cpu"])
def test_where_weights_ignore_index_and_reductions(implementation):
    p = _params(4)
    x, y = _problem(4, n=40)
    where = np.arange(40) % 3 != 0
    w = np.linspace(0.5, 2, 40).astype(np.float32)
    y = np.where(np.arange(40) % 7 == 2, -1, y).astype(np.int32)
    keep = where & (y != -1)
    ref = _reference(p, x, np.where(keep, y, 0))
    kw = dict(where=where, weights=w, ignore_index=-1, implementation=implementation)
    none = asm.loss(p, x, y, reduction="none", **kw)
    np.testing.assert_allclose(none, np.where(keep, w * ref, 0), rtol=1e-5)
    np.testing.assert_allclose(
        asm.loss(p, x, y, reduction="sum", **kw), (w * ref)[keep].sum(), rtol=1e-5
    )
    np.testing.assert_allclose(
        asm.loss(p, x, y, **kw), (w * ref)[keep].sum() / w[keep].sum(), rtol=1e-5
    )


def test_gradients_and_second_order_match_the_naive_definition():
    """First derivatives of every parameter and the input, Hessian-vector products
    (forward over reverse) and reverse over reverse, against ``jax`` derivatives of
    the loss written through ``log_prob``; several blocks per cluster, partial ones
    included."""
    p = _params(5, tails=3.0)
    x, y = _problem(5, n=24)

    def ours(p, x):
        return asm.loss(p, x, y, block_rows=4)

    def naive(p, x):
        return _naive_loss(p, x, jnp.asarray(y))

    tol = dict(rtol=2e-4, atol=2e-6)
    for a, b in zip(
        jax.tree.leaves(jax.jit(jax.grad(ours, argnums=(0, 1)))(p, x)),
        jax.tree.leaves(jax.jit(jax.grad(naive, argnums=(0, 1)))(p, x)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, **tol)
    t = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size).reshape(a.shape)), (p, x))

    def hvp(f):
        return jax.jvp(jax.grad(f, argnums=(0, 1)), (p, x), t)[1]

    for a, b in zip(jax.tree.leaves(jax.jit(hvp, static_argnums=0)(ours)),
                    jax.tree.leaves(jax.jit(hvp, static_argnums=0)(naive)),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)

    def rev_rev(f):
        return jax.grad(lambda x: jnp.sum(jax.grad(f, argnums=1)(p, x) ** 2))(x)

    np.testing.assert_allclose(
        jax.jit(rev_rev, static_argnums=0)(ours),
        jax.jit(rev_rev, static_argnums=0)(naive),
        rtol=1e-3, atol=1e-5,
    )  # fmt: skip


def test_log_prob_is_a_distribution_and_predict_its_argmax():
    p = _params(6, tails=8.0)
    x, y = _problem(6)
    lp = np.asarray(asm.log_prob(p, x), np.float64)
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1, rtol=1e-5)
    np.testing.assert_allclose(
        -lp[np.arange(len(y)), y], asm.loss(p, x, y, reduction="none"), rtol=1e-5
    )
    for rows in (None, 1, 5):
        np.testing.assert_array_equal(asm.predict(p, x, block_rows=rows), lp.argmax(-1))


def test_batch_dims_jit_and_vmap():
    p = _params(7)
    x, y = _problem(7, n=24)
    x3, y3 = x.reshape(2, 3, 4, D), y.reshape(2, 3, 4)
    flat = asm.loss(p, x, y, reduction="none")
    np.testing.assert_allclose(
        asm.loss(p, x3, y3, reduction="none"), flat.reshape(2, 3, 4)
    )
    assert asm.predict(p, x3).shape == (2, 3, 4)
    assert asm.log_prob(p, x3).shape == (2, 3, 4, V)
    single = asm.loss(p, x[0], y[0])  # one example: [D] and a scalar label
    np.testing.assert_allclose(single, flat[0], rtol=1e-6)
    got = jax.jit(jax.vmap(lambda x, y: asm.loss(p, x, y, block_rows=2)))(x3[0], y3[0])
    np.testing.assert_allclose(got, flat.reshape(2, 3, 4)[0].mean(-1), rtol=1e-6)


def test_a_zero_weight_masks_nan_embeddings_as_where_does():
    """NaN embeddings in a row of weight 0 reach no parameter's gradient, as with
    ``where=False`` (they made every cluster's gradient NaN before)."""
    p = _params(9)
    x, y = _problem(9, n=12)
    x[1] = np.nan
    weights = np.array([1.0, 0.0] + [1.0] * 10, np.float32)

    def total(p, **mask):
        return asm.loss(p, x, y, **mask)

    got = jax.value_and_grad(lambda p: total(p, weights=weights))(p)
    want = jax.value_and_grad(lambda p: total(p, where=weights > 0))(p)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("block_rows", [None, 2])
def test_inside_a_data_parallel_shard_map(block_rows):
    """Examples over two devices, the parameters replicated (shard_map with
    check_vma): a cluster's skipped blocks and its replicated weights raised
    TypeErrors and ValueErrors before."""
    p = _params(8)
    x, y = _problem(8, n=24)

    def losses(p, x, y):
        return asm.loss(p, x, y, reduction="none", block_rows=block_rows)

    got, want = data_parallel_value_and_grad(
        losses, (p, x, y), (False, True, True), argnums=(0, 1)
    )
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("dtype", "rtol"), [(jnp.bfloat16, 3e-2), (jnp.float16, 4e-3)])
def test_16_bit_inputs_and_parameters_give_a_float32_loss(dtype, rtol):
    p32 = _params(8)
    x, y = _problem(8)
    p = jax.tree.map(lambda a: a.astype(dtype), p32)
    low = asm.loss(p, jnp.asarray(x, dtype), y, reduction="none")
    assert low.dtype == jnp.float32
    ref = _reference(p, np.asarray(jnp.asarray(x, dtype), np.float32), y)
    np.testing.assert_allclose(low, ref, rtol=rtol, atol=rtol)
    gp, gx = jax.grad(asm.loss, argnums=(0, 1))(p, jnp.asarray(x, dtype), y)
    assert gx.dtype == dtype and gp.outputs[2].dtype == dtype
    assert all(np.all(np.isfinite(np.asarray(g, np.float32)))
               for g in jax.tree.leaves((gp, gx)))  # fmt: skip
    assert asm.log_prob(p, jnp.asarray(x, dtype)).dtype == jnp.float32


# ------------------------------------------------------------------------- extremes


def test_extreme_logits_masks_nan_rows_and_out_of_range_labels():
    p = _params(9)
    x, y = _problem(9, n=16)
    # A head bias of +-1e30: the loss of the favoured class is 0, of the others ~1e30.
    bias = jnp.zeros(p.head.shape[1]).at[3].set(1e30).at[5].set(-1e30)
    big = asm.AdaptiveSoftmax(p.head, bias, p.projections, p.outputs, p.cutoffs)
    y_big = np.array([3, 5, 4, 100], np.int32)
    got = np.asarray(asm.loss(big, x[:4], y_big, reduction="none"))
    np.testing.assert_allclose(got, [0, 2e30, 1e30, 1e30], rtol=1e-6)
    g = jax.jit(jax.grad(asm.loss, argnums=1))(big, x[:4], y_big)
    assert np.all(np.isfinite(g))
    # NaN in masked rows reaches neither the loss nor any gradient.
    where = np.arange(16) % 2 == 0
    xn = np.where(where[:, None], x, np.nan).astype(np.float32)
    step = jax.jit(jax.value_and_grad(asm.loss, argnums=(0, 1)))
    value, (gp, gx) = step(p, xn, y, where=where)
    np.testing.assert_allclose(value, _reference(p, x, y)[where].mean(), rtol=1e-5)
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(gp))
    assert np.all(np.asarray(gx)[~where] == 0)
    # Every example masked: a zero loss and zero gradients.
    none = np.zeros(16, bool)
    value, (gp, gx) = step(p, xn, y, where=none)
    assert float(value) == 0 and all(np.all(a == 0) for a in jax.tree.leaves((gp, gx)))
    # Out of range: NaN for that example only.
    bad = y.copy()
    bad[[2, 7]] = [V, -3]
    out = np.asarray(asm.loss(p, x, bad, reduction="none"))
    assert np.all(np.isnan(out[[2, 7]]))
    assert np.all(np.isfinite(np.delete(out, [2, 7])))


def test_memory_never_holds_the_full_logits():
    """A 2^17-class adaptive softmax with 4096 examples: the compiled step's temp is a
    small fraction of the [N, V] float32 logits (2 GiB)."""
    n, v = 4096, 2**17
    p = asm.init(jax.random.key(0), 32, v, (1024, 8192))
    x = jnp.ones((n, 32))
    y = jnp.zeros(n, jnp.int32)
    step = jax.jit(jax.grad(asm.loss, argnums=(0, 1)))
    temp = (
        step.lower(p, x, y)
        .compile(user_pipeline())
        .memory_analysis()
        .temp_size_in_bytes
    )
    assert temp < n * v * 4 / 16, temp


# --------------------------------------------------------------------------- errors


def test_errors_name_the_argument():
    fn = "adaptive_softmax.init"
    key = jax.random.key(0)
    with pytest.raises(TypeError, match=f"{fn}: key must be one jax.random key"):
        asm.init(0, 8, 100, [10, 50])
    with pytest.raises(ValueError, match=f"{fn}: cutoffs must be strictly increasing"):
        asm.init(key, 8, 100, [10, 10, 50])
    with pytest.raises(
        ValueError, match=r"cutoffs must lie in \[1, num_classes - 1\] = \[1, 99\]"
    ):
        asm.init(key, 8, 100, [10, 100])
    with pytest.raises(ValueError, match="cutoffs must lie in"):
        asm.init(key, 8, 100, [0, 10])
    with pytest.raises(ValueError, match=f"{fn}: cutoffs must hold at least one"):
        asm.init(key, 8, 100, [])
    with pytest.raises(TypeError, match=f"{fn}: cutoffs must be a sequence of ints"):
        asm.init(key, 8, 100, [10.5])
    with pytest.raises(TypeError, match=f"{fn}: cutoffs must be a sequence of ints"):
        asm.init(key, 8, 100, 10)
    with pytest.raises(ValueError, match=r"projection widths are \[2, 0\]"):
        asm.init(key, 8, 100, [10, 50])
    with pytest.raises(ValueError, match=f"{fn}: div_value must be finite and > 0"):
        asm.init(key, 8, 100, [10], div_value=0.0)
    with pytest.raises(TypeError, match=f"{fn}: in_features must be a Python int"):
        asm.init(key, 8.0, 100, [10])
    with pytest.raises(TypeError, match=f"{fn}: dtype must be a floating dtype"):
        asm.init(key, 8, 100, [10], dtype=jnp.int32)
    p = _params()
    x, y = _problem(n=4)
    fn = "adaptive_softmax.loss"
    with pytest.raises(
        TypeError, match=f"{fn}: params must be a jcce.adaptive_softmax"
    ):
        asm.loss({"head": p.head}, x, y)
    with pytest.raises(ValueError, match=rf"{fn}: embeddings has shape \(4, 15\)"):
        asm.loss(p, x[:, :15], y)
    with pytest.raises(ValueError, match=f"{fn}: labels"):
        asm.loss(p, x, y[:3])
    with pytest.raises(TypeError, match=f"{fn}: embeddings must have a floating"):
        asm.loss(p, x.astype(np.int32), y)
    with pytest.raises(ValueError, match=f"{fn}: block_rows must be >= 1"):
        asm.loss(p, x, y, block_rows=0)
    with pytest.raises(ValueError, match=f"{fn}: reduction"):
        asm.loss(p, x, y, reduction="avg")
    with pytest.raises(
        ValueError, match="adaptive_softmax.predict: embeddings has shape"
    ):
        asm.predict(p, x[:, :3])
    with pytest.raises(TypeError, match="adaptive_softmax.log_prob: params must be"):
        asm.log_prob(None, x)


def test_is_exported():
    assert jcce.adaptive_softmax is asm and "adaptive_softmax" in jcce.__all__


def test_no_examples():
    """N = 0 gives empty losses, log-probabilities and predictions, a zero mean and
    zero gradients (the row compaction once gathered from an empty batch)."""
    params = asm.init(jax.random.key(0), 8, 20, (5, 10), div_value=2.0)
    x, y = jnp.zeros((0, 8)), jnp.zeros((0,), jnp.int32)
    assert asm.loss(params, x, y, reduction="none").shape == (0,)
    assert float(asm.loss(params, x, y)) == 0.0
    grads = jax.grad(asm.loss)(params, x, y)
    assert all(not np.any(g) for g in jax.tree.leaves(grads))
    assert asm.log_prob(params, x).shape == (0, 20)
    assert asm.predict(params, x).shape == (0,)


def test_parameters_that_disagree_with_their_cutoffs_are_named():
    """A hand-built (or mis-mapped) AdaptiveSoftmax gave NaN losses; its shapes are
    checked against its cutoffs."""
    import dataclasses

    params = asm.init(jax.random.key(0), 8, 20, (5, 10), div_value=2.0)
    x, y = jnp.ones((3, 8)), jnp.array([0, 7, 15])
    short = dataclasses.replace(
        params, outputs=(params.outputs[0], params.outputs[1][:, :5])
    )
    with pytest.raises(ValueError, match=re.escape(
        "adaptive_softmax.loss: params.outputs[1] has shape (2, 5) but the cutoffs "
        "(5, 10, 20) and the head need (2, 10); build the parameters with "
        "adaptive_softmax.init"
    )):  # fmt: skip
        asm.loss(short, x, y)
    fewer = dataclasses.replace(params, projections=params.projections[:1])
    with pytest.raises(ValueError, match=re.escape(
        "adaptive_softmax.predict: params has 1 projections and 2 outputs but its "
        "cutoffs (5, 10, 20) make 2 clusters"
    )):  # fmt: skip
        asm.predict(fewer, x)
