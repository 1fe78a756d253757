"""Vocabulary-parallel losses inside ``jax.shard_map`` with ``check_vma=False`` and True.

With ``check_vma=False`` shard_map cannot know that a loss is replicated over the
vocabulary's mesh axis, so its transpose hands each device an equal share of the
output's cotangent (divided by the axis size) and relies on ``psum`` transposing to
``psum`` to add the shares up; jcce's hand-written backward rules must do the same, or
the logits' (and every other per-class input's) gradient comes out divided by the
number of vocabulary shards. Every case compares the value and the gradient of every
input under both settings with the same loss computed on one device, on a 2x4
("data", "model") mesh of host CPU devices, for the reductions "none", "mean" (over
each data shard's tokens) and "sum" (summed over the data axis, out_specs P()).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import jcce

N, K, D = 8, 32, 16  # tokens, classes (8 per "model" device), hidden size
RTOL, ATOL = 1e-5, 1e-6
REDUCTIONS = ("none", "mean", "sum")
HALVES = (slice(0, N // 2), slice(N // 2, N))  # the tokens of each "data" shard


def _mesh():
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def _data():
    rng = np.random.default_rng(3)
    return dict(
        z=jnp.asarray(rng.standard_normal((N, K)) * 3, jnp.float32),
        labels=jnp.asarray(rng.integers(0, K, N), jnp.int32),
        probs=jnp.asarray(rng.dirichlet(np.ones(K), N), jnp.float32),
        weights=jnp.asarray(rng.uniform(0.5, 2.0, N), jnp.float32),
        class_weights=jnp.asarray(np.linspace(0.5, 1.5, K), jnp.float32),
        embeddings=jnp.asarray(rng.standard_normal((N, D)), jnp.float32),
        classifier=jnp.asarray(rng.standard_normal((D, K)) / 2, jnp.float32),
        bias=jnp.asarray(rng.standard_normal(K), jnp.float32),
    )


DATA = _data()

# Traced hyper-parameters, differentiated like every other input.
HYPER = {
    "cross_entropy": {},
    "chain": dict(
        cap=jnp.float32(6.0),
        t=jnp.float32(1.5),
        eps=jnp.float32(0.1),
        lam=jnp.float32(1e-2),
    ),
    "focal": dict(gamma=jnp.float32(2.0), eps=jnp.float32(0.1)),
}


def _chain(kind, h):
    if kind == "chain":
        return jcce.chain(
            jcce.softcap(h["cap"]),
            jcce.temperature(h["t"]),
            jcce.label_smoothing(h["eps"]),
            jcce.z_loss(h["lam"]),
        )
    return jcce.chain(jcce.focal(h["gamma"]), jcce.label_smoothing(h["eps"]))


def _loss(kind, h, z, target, **kw):
    if kind == "cross_entropy":
        return jcce.cross_entropy(z, target, **kw)
    return _chain(kind, h)(z, target, **kw)


def _linear_loss(kind, h, e, w, y, **kw):
    if kind == "cross_entropy":
        return jcce.linear_cross_entropy(e, w, y, **kw)
    return _chain(kind, h).linear(e, w, y, **kw)


def _objective(out):
    """A scalar with a non-uniform cotangent for each of ``out``'s entries."""
    out = jnp.ravel(out)
    return jnp.sum(out * (1 + jnp.cos(jnp.arange(out.size, dtype=out.dtype))))


def _on_one_device(each):
    """The three reductions' outputs as the sharded bodies return them, from
    ``each(rows, reduction)`` on the unsharded inputs (rows: a slice of the tokens)."""
    mean = jnp.stack([each(rows, "mean") for rows in HALVES])
    return each(slice(None), "none"), mean, each(slice(None), "sum")


def _compare_both_modes(each, mesh, in_specs, names, reference, diff, fixed, what):
    """Values and gradients of ``each`` (its arguments ``names``, drawn from ``diff``
    and ``fixed``) in a shard_map with check_vma False and True, against
    ``reference``."""
    want = _values_and_grads(reference)(diff, fixed)
    for check in (False, True):
        sharded = _in_shard_map(each, mesh, in_specs, check)

        def run(d, f, sharded=sharded):
            t = {**d, **f}
            return sharded(*(t[n] for n in names))

        got = _values_and_grads(run)(diff, fixed)
        _assert_close(got, want, f"{what}, check_vma={check}")


def _in_shard_map(each, mesh, in_specs, check_vma):
    """``each(args, reduction)`` for the three reductions in one shard_map: "none"
    per token, "mean" per data shard, "sum" summed over the data axis."""

    def body(*args):
        return (
            each(args, "none"),
            each(args, "mean")[None],
            jax.lax.psum(each(args, "sum"), "data"),
        )

    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=in_specs,
        out_specs=(P("data"), P("data"), P()),
        check_vma=check_vma,
    )


def _values_and_grads(outputs):
    """``jit`` of the three reductions' values and the gradient of their sum of
    :func:`_objective` with respect to the dict ``diff`` (one backward pass: each
    reduction's cotangents differ, so a wrong one shows in the sum)."""

    def objective(diff, fixed):
        outs = outputs(diff, fixed)
        return sum(_objective(out) for out in outs), outs

    return jax.jit(jax.value_and_grad(objective, has_aux=True))


def _assert_close(got, want, context):
    (_, got_outs), got_grads = got
    (_, want_outs), want_grads = want
    for reduction, g, w in zip(REDUCTIONS, got_outs, want_outs, strict=True):
        np.testing.assert_allclose(
            np.asarray(g).ravel(), np.asarray(w).ravel(), rtol=RTOL, atol=ATOL,
            err_msg=f"{context}: value of reduction={reduction!r}",
        )  # fmt: skip
    leaves, _ = jax.tree_util.tree_flatten_with_path(want_grads)
    for (path, w), g in zip(leaves, jax.tree.leaves(got_grads), strict=True):
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(w), rtol=RTOL, atol=ATOL,
            err_msg=f"{context}: gradient of {jax.tree_util.keystr(path)}",
        )  # fmt: skip


# (loss, target, class weights as this device's [K / P] slice or the whole [K])
CASES = [
    ("cross_entropy", "labels", "whole"),
    ("cross_entropy", "probs", "slice"),
    ("chain", "labels", "slice"),
    ("chain", "probs", "whole"),
    ("focal", "labels", "whole"),
    ("focal", "probs", "slice"),
]


@pytest.mark.parametrize(("kind", "target", "cw"), CASES, ids=map("-".join, CASES))
def test_cross_entropy_gradients_under_either_check_vma(kind, target, cw):
    mesh = _mesh()
    probs = target == "probs"
    diff = dict(
        z=DATA["z"],
        weights=DATA["weights"],
        class_weights=DATA["class_weights"],
        hyper=HYPER[kind],
    )
    if probs:
        diff["target"] = DATA["probs"]
    fixed = {} if probs else dict(target=DATA["labels"])

    def reference(d, f):
        t = {**d, **f}

        def each(rows, reduction):
            return _loss(
                kind, t["hyper"], t["z"][rows], t["target"][rows],
                weights=t["weights"][rows], class_weights=t["class_weights"],
                reduction=reduction,
            )  # fmt: skip

        return _on_one_device(each)

    def each(args, reduction):
        z, target, weights, class_weights, h = args
        return _loss(
            kind, h, z, target, weights=weights, class_weights=class_weights,
            reduction=reduction, vocab_axis="model",
        )  # fmt: skip

    in_specs = (
        P("data", "model"),
        P("data", "model") if probs else P("data"),
        P("data"),
        P("model") if cw == "slice" else P(),
        P(),
    )
    names = ("z", "target", "weights", "class_weights", "hyper")
    _compare_both_modes(
        each, mesh, in_specs, names, reference, diff, fixed, f"{kind}, {target}"
    )


# (loss, classifier layout, class weights, tokens per block: 3 pads each device's 4,
# lean mode)
LINEAR_CASES = [
    ("cross_entropy", "DV", "slice", None, False),
    ("chain", "VD", "whole", 3, False),
    ("chain", "DV", "slice", 3, True),
]


@pytest.mark.parametrize(
    ("kind", "layout", "cw", "block", "lean"),
    LINEAR_CASES,
    ids=[f"{k}-{lay}-{cw}-lean{lean}" for k, lay, cw, _, lean in LINEAR_CASES],
)
def test_linear_gradients_under_either_check_vma(kind, layout, cw, block, lean):
    mesh = _mesh()
    classifier = DATA["classifier"] if layout == "DV" else DATA["classifier"].T
    diff = dict(
        embeddings=DATA["embeddings"],
        classifier=classifier,
        bias=DATA["bias"],
        weights=DATA["weights"],
        class_weights=DATA["class_weights"],
        hyper=HYPER[kind],
    )
    fixed = dict(labels=DATA["labels"])

    def reference(d, f):
        t = {**d, **f}
        w = t["classifier"] if layout == "DV" else t["classifier"].T

        def each(rows, reduction):
            logits = t["embeddings"][rows] @ w + t["bias"][None, :]
            return _loss(
                kind, t["hyper"], logits, t["labels"][rows],
                weights=t["weights"][rows], class_weights=t["class_weights"],
                reduction=reduction,
            )  # fmt: skip

        return _on_one_device(each)

    def each(args, reduction):
        e, w, b, y, weights, class_weights, h = args
        return _linear_loss(
            kind, h, e, w, y, bias=b, weights=weights, class_weights=class_weights,
            reduction=reduction, vocab_axis="model", classifier_layout=layout,
            block_size=block, lean=lean,
        )  # fmt: skip

    in_specs = (
        P("data"),
        P(None, "model") if layout == "DV" else P("model", None),
        P("model"),
        P("data"),
        P("data"),
        P("model") if cw == "slice" else P(),
        P(),
    )
    names = (
        "embeddings", "classifier", "bias", "labels", "weights", "class_weights",
        "hyper",
    )  # fmt: skip
    _compare_both_modes(
        each, mesh, in_specs, names, reference, diff, fixed,
        f"linear {kind}, {layout}",
    )  # fmt: skip


def test_vocabulary_over_both_mesh_axes_under_either_check_vma():
    """``vocab_axis=("data", "model")``: the classes over all eight devices, the
    tokens on each; the shares of the cotangent come from both axes."""
    mesh = _mesh()
    both = ("data", "model")
    diff = dict(
        z=DATA["z"],
        weights=DATA["weights"],
        class_weights=DATA["class_weights"],
        hyper=HYPER["chain"],
    )
    fixed = dict(labels=DATA["labels"])

    def each(d, f, reduction, **kw):
        return _loss(
            "chain", d["hyper"], d["z"], f["labels"], weights=d["weights"],
            class_weights=d["class_weights"], reduction=reduction, **kw,
        )  # fmt: skip

    def reference(d, f):
        return tuple(each(d, f, reduction) for reduction in REDUCTIONS)

    def body(d, f):
        return tuple(each(d, f, r, vocab_axis=both) for r in REDUCTIONS)

    specs = (
        dict(z=P(None, both), weights=P(), class_weights=P(both), hyper=P()),
        dict(labels=P()),
    )
    want = _values_and_grads(reference)(diff, fixed)
    for check in (False, True):
        f = jax.shard_map(
            body, mesh=mesh, in_specs=specs, out_specs=(P(),) * 3, check_vma=check
        )
        got = _values_and_grads(f)(diff, fixed)
        _assert_close(got, want, f"vocab over both axes, check_vma={check}")


def _psum_cross_entropy(z, y):
    """The summed cross-entropy of class-sharded logits written with ``lax.psum``."""
    m = jax.lax.pmax(jax.lax.stop_gradient(z).max(-1), "model")
    se = jax.lax.psum(jnp.sum(jnp.exp(z - m[:, None]), -1), "model")
    k = z.shape[-1]
    local = y - jax.lax.axis_index("model") * k
    owned = (local >= 0) & (local < k)
    z_y = jnp.take_along_axis(z, jnp.clip(local, 0, k - 1)[:, None], -1)[:, 0]
    return jnp.sum(m + jnp.log(se) - jax.lax.psum(jnp.where(owned, z_y, 0), "model"))


@pytest.mark.parametrize("check_vma", [False, True])
def test_gradients_are_those_of_the_loss_written_with_psum(check_vma):
    """jcce differentiates as JAX differentiates ``lax.psum``, with ``jax.grad``
    outside the shard_map or inside its body. With ``check_vma=False`` a ``jax.grad``
    inside the body seeds a cotangent of 1 on every device of the vocabulary axis and
    ``psum`` transposes to ``psum``, so the gradient counts each seed: 4x here, for
    jcce as for any loss written with ``lax.psum`` (``check_vma=True`` gives 1x)."""
    mesh = _mesh()
    y, e = DATA["labels"], DATA["embeddings"]

    def losses(z, w):  # the same two losses by jcce and by lax.psum
        ce = jcce.cross_entropy(z, y, reduction="sum", vocab_axis="model")
        lin = jcce.linear_cross_entropy(e, w, y, reduction="sum", vocab_axis="model")
        return ce + lin, _psum_cross_entropy(z, y) + _psum_cross_entropy(e @ w, y)

    def inside(z, w):  # jax.grad in the body: each device seeds a cotangent of 1
        return [jax.grad(lambda *a, i=i: losses(*a)[i], (0, 1))(z, w) for i in (0, 1)]

    classes = P(None, "model")
    specs = dict(in_specs=(classes, classes), check_vma=check_vma)
    f_in = jax.shard_map(inside, mesh=mesh, out_specs=classes, **specs)
    f_out = jax.shard_map(losses, mesh=mesh, out_specs=P(), **specs)
    z, w = DATA["z"], DATA["classifier"]
    got_in, want_in = jax.jit(f_in)(z, w)
    outside = [jax.grad(lambda *a, i=i: f_out(*a)[i], (0, 1)) for i in (0, 1)]
    got_out, want_out = jax.jit(lambda z, w: [g(z, w) for g in outside])(z, w)
    for got, want in ((got_in, want_in), (got_out, want_out)):
        for g, w_ in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w_, rtol=RTOL, atol=ATOL)
    one_device = jax.grad(
        lambda z, w: (
            jcce.cross_entropy(z, y, reduction="sum")
            + jcce.cross_entropy(e @ w, y, reduction="sum")
        ),
        (0, 1),
    )(z, w)
    shards = 1 if check_vma else 4
    for g_in, g_out, w_ in zip(got_in, got_out, one_device, strict=True):
        np.testing.assert_allclose(g_out, w_, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(g_in, shards * w_, rtol=RTOL, atol=ATOL)
