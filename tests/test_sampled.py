"""Candidate samplers (``jcce.samplers``) and ``jcce.sampled_softmax_cross_entropy``.

Samplers against their published formulas in float64 and against the frequencies of
many draws; unique sampling against a plain-Python replay of the same draws. The loss
against a float64 NumPy reference written from its definition for the same draw,
against the exact ``linear_cross_entropy`` when every class is sampled, and, over many
keys, its mean gradient against the exact gradient (the log-Q correction's purpose).
"""

from __future__ import annotations

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcce
from jcce import samplers
from tests.reference import data_parallel_value_and_grad

V = 64


def _q(sampler, v=V):
    """The sampler's distribution from its published formula, float64."""
    c = np.arange(v, dtype=np.float64)
    if sampler == "uniform":
        return np.full(v, 1 / v)
    if sampler == "log_uniform":
        return np.log((c + 2) / (c + 1)) / np.log(v + 1)
    counts = np.where(c % 5 == 0, 0.0, 1 + c[::-1])  # every fifth class never drawn
    q = counts**0.75
    return q / q.sum()


COUNTS = np.where(np.arange(V) % 5 == 0, 0.0, 1 + np.arange(V)[::-1])


def _sampler(name, v=V):
    if name == "unigram":
        return samplers.unigram(COUNTS, distortion=0.75)
    return getattr(samplers, name)(v)


SAMPLERS = ["uniform", "log_uniform", "unigram"]


# ------------------------------------------------------------------------ samplers


@pytest.mark.parametrize("name", SAMPLERS)
def test_probabilities_are_the_published_formulas(name):
    got = np.exp(np.asarray(_sampler(name).log_prob(jnp.arange(V)), np.float64))
    np.testing.assert_allclose(got, _q(name), rtol=2e-6, atol=1e-12)


@pytest.mark.parametrize("name", SAMPLERS)
def test_draw_frequencies_match_the_probabilities(name):
    n = 400_000
    drawn = np.asarray(_sampler(name).draw(jax.random.key(0), (n,)))
    freq = np.bincount(drawn, minlength=V) / n
    q = _q(name)
    assert np.all(freq[q == 0] == 0)
    # Five binomial standard deviations.
    np.testing.assert_array_less(np.abs(freq - q), 5 * np.sqrt(q * (1 - q) / n) + 1e-9)


def _replay_unique(sampler, key, s):
    """``sample(..., unique=True)`` in plain Python on the same stream of draws."""
    out, tries = [], 0
    while len(out) < s:
        key, sub = jax.random.split(key)
        for c in np.asarray(sampler.draw(sub, (s,))).tolist():
            tries += 1
            if c not in out:
                out.append(c)
                if len(out) == s:
                    break
    return out, tries


@pytest.mark.parametrize(
    ("name", "s"),
    [("uniform", 40), ("log_uniform", 1), ("log_uniform", 40), ("unigram", 10)],
)
def test_unique_samples_are_the_first_distinct_draws(name, s):
    sampler = _sampler(name)
    key = jax.random.key(s)
    got = jax.jit(samplers.sample, static_argnums=2)(sampler, key, s)
    want, tries = _replay_unique(sampler, key, s)
    assert got.unique and np.asarray(got.classes).tolist() == want
    assert int(got.tries) == tries


def test_every_drawable_class_unique():
    sampler = _sampler("unigram")
    drawable = int(np.sum(COUNTS > 0))
    got = samplers.sample(sampler, jax.random.key(1), drawable)
    assert sorted(np.asarray(got.classes).tolist()) == np.flatnonzero(COUNTS).tolist()


@pytest.mark.parametrize("name", SAMPLERS)
def test_expected_counts_are_the_formulas_and_the_means_of_many_draws(name):
    sampler, q, s = _sampler(name), _q(name), 16
    # With replacement: S q(c), the mean count over many draws.
    keys = jax.random.split(jax.random.key(2), 4000)
    drawn = jax.vmap(lambda k: samplers.sample(sampler, k, s, unique=False).classes)(
        keys
    )
    counts = np.stack([np.bincount(d, minlength=V) for d in np.asarray(drawn)])
    with_replacement = samplers.sample(sampler, keys[0], s, unique=False)
    expected = np.asarray(
        samplers.expected_count(sampler, with_replacement, jnp.arange(V))
    )
    np.testing.assert_allclose(expected, s * q, rtol=2e-6, atol=1e-12)
    se = np.sqrt(s * q * (1 - q) / len(keys))
    np.testing.assert_array_less(np.abs(counts.mean(0) - s * q), 5 * se + 1e-9)
    # Unique: 1 - (1 - q)^T for the T draws it took.
    unique = samplers.sample(sampler, keys[0], s)
    got = np.asarray(
        samplers.expected_count(sampler, unique, jnp.arange(V)), np.float64
    )
    t = int(unique.tries)
    np.testing.assert_allclose(got, 1 - (1 - q) ** t, rtol=1e-5, atol=1e-12)


def test_sampler_errors_name_the_argument():
    with pytest.raises(
        ValueError, match=r"sample: num_samples=65 unique samples .* 64"
    ):
        samplers.sample(samplers.uniform(V), jax.random.key(0), 65)
    with pytest.raises(
        ValueError, match=r"sample: num_samples=52 unique .* 51 classes"
    ):
        samplers.sample(_sampler("unigram"), jax.random.key(0), 52)
    with pytest.raises(ValueError, match="sample: num_samples must be a positive int"):
        samplers.sample(samplers.uniform(V), jax.random.key(0), 0)
    with pytest.raises(TypeError, match="sample: unique must be True or False"):
        samplers.sample(samplers.uniform(V), jax.random.key(0), 3, unique=1)
    with pytest.raises(ValueError, match="log_uniform: num_classes must be a positive"):
        samplers.log_uniform(0)
    with pytest.raises(ValueError, match=r"unigram: counts must have shape \[num_"):
        samplers.unigram(np.ones((2, 3)))
    with pytest.raises(ValueError, match="unigram: counts must be non-negative"):
        samplers.unigram(np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="at least one positive count"):
        samplers.unigram(np.zeros(4))
    with pytest.raises(TypeError, match="unigram: distortion must be a real number"):
        samplers.unigram(np.ones(4), distortion="x")
    with pytest.raises(ValueError, match="unigram: distortion must be finite, got nan"):
        samplers.unigram(np.ones(4), distortion=float("nan"))


# ------------------------------------------------------------------ sampled softmax

D, N = 8, 12


def _problem(seed=0, dtype=np.float32, n=N, v=V):
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(n, D)).astype(dtype)
    w = (rng.normal(size=(D, v)) / 2).astype(dtype)
    b = rng.normal(size=v).astype(dtype) / 4
    y = rng.integers(0, v, n).astype(np.int32)
    return e, w, b, y


def _reference(e, w, b, y, sampler_name, drawn, *, hits=True, log_q=True):
    """The definition, in float64, for the classes that were drawn."""
    e, w, b = (np.asarray(a, np.float64) for a in (e, w, b))
    s = np.asarray(drawn.classes)
    q = _q(sampler_name, w.shape[1])
    t = float(drawn.tries)
    expected = (1 - (1 - q) ** t) if drawn.unique else t * q
    logits = e @ w + b
    true = logits[np.arange(len(y)), y]
    sampled = logits[:, s]
    if log_q:
        true = true - np.log(expected[y])
        sampled = sampled - np.log(expected[s])
    if hits:
        sampled = np.where(s[None, :] == y[:, None], -np.inf, sampled)
    full = np.concatenate([true[:, None], sampled], axis=1)
    m = full.max(1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(full - m).sum(1))
    return lse - true


@pytest.mark.parametrize(
    ("name", "unique", "hits", "log_q"),
    [
        ("uniform", True, True, True),
        ("log_uniform", True, True, True),
        ("unigram", True, True, True),
        ("log_uniform", False, True, True),
        ("unigram", False, False, True),
        ("log_uniform", True, False, False),
    ],
)
def test_value_matches_the_float64_definition(name, unique, hits, log_q):
    with jax.enable_x64(True):
        e, w, b, y = _problem(dtype=np.float64)
        if name == "unigram":  # labels the sampler can draw, as in a real corpus
            y = np.flatnonzero(COUNTS)[y % int(np.sum(COUNTS > 0))].astype(np.int32)
        key, sampler = jax.random.key(5), _sampler(name)
        got = jcce.sampled_softmax_cross_entropy(
            e, w, y, bias=b, key=key, num_samples=20, sampler=sampler, unique=unique,
            remove_accidental_hits=hits, subtract_log_q=log_q, reduction="none",
        )  # fmt: skip
        drawn = samplers.sample(sampler, key, 20, unique=unique)
        want = _reference(e, w, b, y, name, drawn, hits=hits, log_q=log_q)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-5)  # q in float32


@pytest.mark.parametrize("layout", ["DV", "VD"])
def test_every_class_sampled_uniformly_is_the_exact_loss(layout):
    """Unique uniform samples of all V classes: the corrections are one constant, the
    label's own sample is an accidental hit, so the loss is exactly the full one."""
    e, w, b, y = _problem(1)
    wl = w if layout == "DV" else w.T

    def sampled(e, w, b):
        return jcce.sampled_softmax_cross_entropy(
            e, w, y, bias=b, key=jax.random.key(0), num_samples=V,
            sampler=samplers.uniform(V), classifier_layout=layout,
        )  # fmt: skip

    def exact(e, w, b):
        return jcce.linear_cross_entropy(e, w, y, bias=b, classifier_layout=layout)

    got = jax.value_and_grad(sampled, argnums=(0, 1, 2))(e, wl, b)
    want = jax.value_and_grad(exact, argnums=(0, 1, 2))(e, wl, b)
    for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["uniform", "log_uniform"])
def test_loss_and_gradient_approach_the_exact_ones_as_samples_grow_to_v(name):
    """Unique samples, S = V/8, V/4, V/2, V: the error of the loss and of the
    classifier's gradient (mean over 16 keys, relative) falls with every step. With
    S = V every class is drawn: uniform, the corrections are one constant and the loss
    and gradient are the exact ones; log-uniform, the rarest classes' expected counts
    1 - (1 - q)^T stay a little below 1 at the few hundred draws it takes, and what is
    left is that (measured 9e-4 in the loss, 5e-3 in the gradient)."""
    e, w, b, y = _problem(9)
    sampler = _sampler(name)
    exact, exact_grad = jax.value_and_grad(
        lambda w: jcce.linear_cross_entropy(e, w, y, bias=b)
    )(w)
    keys = jax.random.split(jax.random.key(4), 16)
    errors = []
    for s in (V // 8, V // 4, V // 2, V):

        def step(key, s=s):
            return jax.value_and_grad(
                lambda w: jcce.sampled_softmax_cross_entropy(
                    e, w, y, bias=b, key=key, num_samples=s, sampler=sampler
                )
            )(w)

        losses, grads = jax.jit(jax.vmap(step))(keys)
        errors.append(
            (
                float(np.mean(np.abs(losses - exact)) / exact),
                float(
                    np.mean(np.linalg.norm(grads - exact_grad[None], axis=(1, 2)))
                    / np.linalg.norm(exact_grad)
                ),  # fmt: skip
            )
        )
    for before, after in zip(errors, errors[1:], strict=False):
        assert after[0] < before[0] and after[1] < before[1], errors
    tol = (1e-5, 1e-5) if name == "uniform" else (2e-3, 1e-2)
    assert errors[-1][0] < tol[0] and errors[-1][1] < tol[1], errors


def test_log_q_correction_makes_the_mean_gradient_close_to_the_exact_one():
    """Over 512 keys, 32 log-uniform samples of 64 classes: with the correction the
    mean gradient of the classifier is within 12% of the exact gradient (relative
    Frobenius error; measured 0.090 and 0.094 over two sets of keys: what is left is
    sampled softmax's bias, not noise), less than half the error without it (0.21)."""
    e, w, b, y = _problem(2, n=32)
    y = (y % 8).astype(np.int32)  # frequent classes first, as log-uniform assumes
    exact = jax.grad(lambda w: jcce.linear_cross_entropy(e, w, y, bias=b))(w)
    keys = jax.random.split(jax.random.key(3), 512)

    def mean_grad(log_q):
        def grad(key):
            return jax.grad(
                lambda w: jcce.sampled_softmax_cross_entropy(
                    e, w, y, bias=b, key=key, num_samples=32, subtract_log_q=log_q
                )
            )(w)

        return jax.jit(jax.vmap(grad))(keys).mean(0)

    def error(g):
        return float(np.linalg.norm(g - exact) / np.linalg.norm(exact))

    corrected, uncorrected = error(mean_grad(True)), error(mean_grad(False))
    assert corrected < 0.12 and uncorrected > 2 * corrected


def test_masks_ignore_index_nan_in_masked_rows_and_all_masked():
    e, w, b, y = _problem(4)
    where = np.arange(N) % 3 != 0
    y = np.where(np.arange(N) % 4 == 1, -100, y).astype(np.int32)
    e[~where] = np.nan
    kw = dict(key=jax.random.key(1), num_samples=24, bias=b)

    def loss(e, w, **more):
        return jcce.sampled_softmax_cross_entropy(
            e, w, y, where=where, ignore_index=-100, **kw, **more
        )

    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(e, w)
    keep = where & (y != -100)
    per_example = jcce.sampled_softmax_cross_entropy(
        np.where(keep[:, None], e, 0), w, np.where(keep, y, 0), reduction="none", **kw
    )
    np.testing.assert_allclose(value, per_example[keep].mean(), rtol=1e-6)
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert np.all(np.asarray(grads[0])[~keep] == 0)
    nothing = jax.value_and_grad(loss, argnums=(0, 1))(e, w, weights=np.zeros(N))
    assert float(nothing[0]) == 0.0
    assert all(np.all(np.asarray(g) == 0) for g in nothing[1])


def test_an_out_of_range_label_is_nan_for_its_example_only():
    e, w, _, y = _problem(5)
    y[3] = V
    got = jcce.sampled_softmax_cross_entropy(
        e, w, y, key=jax.random.key(0), num_samples=8, reduction="none"
    )
    assert np.isnan(got[3]) and np.all(np.isfinite(np.delete(np.asarray(got), 3)))


@pytest.mark.parametrize(("dtype", "rtol"), [(jnp.bfloat16, 2e-2), (jnp.float16, 2e-3)])
def test_16_bit_inputs_give_a_float32_loss(dtype, rtol):
    e, w, b, y = _problem(6)
    kw = dict(key=jax.random.key(2), num_samples=16, reduction="none")
    low = jcce.sampled_softmax_cross_entropy(
        jnp.asarray(e, dtype), jnp.asarray(w, dtype), y, **kw
    )
    assert low.dtype == jnp.float32
    full = jcce.sampled_softmax_cross_entropy(
        jnp.asarray(e, dtype).astype(jnp.float32),
        jnp.asarray(w, dtype).astype(jnp.float32),
        y,
        **kw,
    )
    np.testing.assert_allclose(low, full, rtol=rtol)
    grad = jax.grad(
        lambda e: jcce.sampled_softmax_cross_entropy(
            e, jnp.asarray(w, dtype), y, key=kw["key"], num_samples=16
        )
    )(jnp.asarray(e, dtype))
    assert grad.dtype == dtype and np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_jit_and_vmap_over_keys_and_batches():
    e, w, b, y = _problem(7)

    def loss(e, y, key):
        return jcce.sampled_softmax_cross_entropy(e, w, y, key=key, num_samples=8)

    keys = jax.random.split(jax.random.key(0), 3)
    es, ys = np.stack([e, -e, e]), np.stack([y, y, y[::-1]])
    got = jax.jit(jax.vmap(loss))(es, ys, keys)
    want = [loss(a, c, k) for a, c, k in zip(es, ys, keys, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_sampled_softmax_errors_name_the_argument():
    e, w, b, y = _problem()
    call = jcce.sampled_softmax_cross_entropy
    key = jax.random.key(0)
    fn = "sampled_softmax_cross_entropy"
    with pytest.raises(TypeError, match=f"{fn}: key is required"):
        call(e, w, y, num_samples=4)
    key_message = (
        f"{fn}: key must be one jax.random key, such as jax.random.key(0) (or a "
        "legacy jax.random.PRNGKey(0)), got "
    )
    with pytest.raises(TypeError, match=re.escape(key_message + "3")):
        call(e, w, y, key=3, num_samples=4)
    with pytest.raises(
        TypeError,
        match=re.escape(key_message + "an array of shape (2,) and dtype key<fry>"),
    ):
        call(e, w, y, key=jax.random.split(key, 2), num_samples=4)
    with pytest.raises(
        ValueError,
        match=re.escape(f"{fn}: classifier has shape (8, 0), no classes to draw"),
    ):
        call(e, w[:, :0], y, key=key, num_samples=4)
    # Negative host weights are rejected, as cross_entropy rejects them.
    with pytest.raises(ValueError, match=re.escape(
        f"{fn}: weights has a negative entry (-1 at index 2); weights must be >= 0"
    )):  # fmt: skip
        call(
            e,
            w,
            y,
            key=key,
            num_samples=4,
            weights=np.where(np.arange(len(y)) == 2, -1.0, 1.0),
        )
    # A legacy raw key is a key.
    assert np.isfinite(call(e, w, y, key=jax.random.PRNGKey(0), num_samples=4))
    with pytest.raises(TypeError, match=f"{fn}: num_samples is required"):
        call(e, w, y, key=key)
    with pytest.raises(
        ValueError, match=f"{fn}: sampler draws from 10 classes .* V = 64"
    ):
        call(e, w, y, key=key, num_samples=4, sampler=samplers.uniform(10))
    with pytest.raises(
        TypeError, match=f"{fn}: sampler must be a jcce.samplers.Sampler"
    ):
        call(e, w, y, key=key, num_samples=4, sampler="log_uniform")
    with pytest.raises(ValueError, match=r"sample: num_samples=65 unique"):
        call(e, w, y, key=key, num_samples=65)
    with pytest.raises(ValueError, match=rf"{fn}: bias has shape \(3,\)"):
        call(e, w, y, key=key, num_samples=4, bias=np.ones(3, np.float32))
    with pytest.raises(TypeError, match=f"{fn}: remove_accidental_hits must be True"):
        call(e, w, y, key=key, num_samples=4, remove_accidental_hits=None)
    with pytest.raises(ValueError, match=rf"{fn}: classifier has shape \(64, 8\)"):
        call(e, w.T, y, key=key, num_samples=4)
    with pytest.raises(ValueError, match=f"{fn}: classifier_layout must be"):
        call(e, w, y, key=key, num_samples=4, classifier_layout="dv")


# ------------------------------------------------------------------------------ NCE


def _softplus(x):
    return np.logaddexp(0, x)


@pytest.mark.parametrize("hits", [False, True])
def test_nce_matches_the_float64_definition(hits):
    with jax.enable_x64(True):
        e, w, b, y = _problem(8, dtype=np.float64)
        key, sampler = jax.random.key(4), _sampler("log_uniform")
        got = jcce.nce_loss(
            e, w, y, bias=b, key=key, num_samples=20, sampler=sampler,
            remove_accidental_hits=hits, reduction="none",
        )  # fmt: skip
        drawn = samplers.sample(sampler, key, 20)
        q = _q("log_uniform")
        expected = 1 - (1 - q) ** float(drawn.tries)
        s = np.asarray(drawn.classes)
        logits = e @ w + b
        true = logits[np.arange(N), y] - np.log(expected[y])
        sampled = logits[:, s] - np.log(expected[s])
        noise = _softplus(sampled)
        if hits:
            noise = np.where(s[None, :] == y[:, None], 0.0, noise)
        want = _softplus(-true) + noise.sum(1)
        np.testing.assert_allclose(got, want, rtol=1e-5)  # q in float32
        assert np.any(s[None, :] == y[:, None])  # so hits=True changes something


def test_a_label_of_count_zero_is_nan_with_the_correction_only():
    """A unigram class of count 0 is never drawn and has expected count 0: its label's
    log Q is -inf, so the correction makes that example NaN (as documented in
    ``samplers.unigram``) and leaves the others alone; without it the loss is finite."""
    e, w, b, y = _problem(11, v=6)
    y[1] = 2
    sampler = samplers.unigram(np.array([5.0, 3.0, 0.0, 2.0, 1.0, 4.0]))

    def losses(log_q):
        return jcce.sampled_softmax_cross_entropy(
            e, w, y, key=jax.random.key(7), num_samples=3, sampler=sampler,
            subtract_log_q=log_q, reduction="none",
        )  # fmt: skip

    got = np.asarray(losses(True))
    assert np.all(np.isnan(got[y == 2])) and np.all(np.isfinite(got[y != 2]))
    assert np.all(np.isfinite(losses(False)))


@pytest.mark.parametrize("loss", ["nce_loss", "sampled_softmax_cross_entropy"])
def test_a_zero_weight_masks_nan_embeddings_as_where_does(loss):
    """A weight of 0 masks its example (semantics section 2), so NaN embeddings in that
    row reach no gradient, as with ``where=False`` (they made the classifier's
    gradient NaN before)."""
    e, w, b, y = _problem(10)
    e[1] = np.nan
    weights = np.array([1.0, 0.0] + [1.0] * (N - 2), np.float32)
    key = jax.random.key(6)

    def total(w, **mask):
        return getattr(jcce, loss)(e, w, y, bias=b, key=key, num_samples=20, **mask)

    got = jax.value_and_grad(partial(total, weights=weights))(w)
    want = jax.value_and_grad(partial(total, where=weights > 0))(w)
    assert np.all(np.isfinite(got[1]))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)


@pytest.mark.parametrize("loss", ["nce_loss", "sampled_softmax_cross_entropy"])
def test_inside_a_data_parallel_shard_map(loss):
    """Tokens over two devices, the classifier replicated (shard_map with check_vma),
    one key for every shard: NCE's noise targets, broadcast over the sharded logits,
    gave a replicated argument a sharded cotangent (a ValueError before)."""
    e, w, b, y = _problem(9)
    key = jax.random.key(5)

    def losses(e, w, b, y):
        return getattr(jcce, loss)(
            e, w, y, bias=b, key=key, num_samples=20, reduction="none"
        )

    got, want = data_parallel_value_and_grad(
        losses, (e, w, b, y), (True, False, False, True), argnums=(0, 1, 2)
    )
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, b_ in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5)


def test_nce_optimum_recovers_the_distribution():
    """One input, 8 classes drawn with probabilities p; the expected NCE loss over the
    data (weights p) and 128 noise draws of 16 uniform samples, minimised over the
    bias: exp(bias) is p (measured within 0.007) and sums to 1 without being told to
    (self-normalisation)."""
    import optax

    p = np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02])
    v, one = len(p), jnp.ones((len(p), 1))
    keys = jax.random.split(jax.random.key(0), 128)

    def objective(b):
        def loss(key):
            return jcce.nce_loss(
                one, jnp.zeros((1, v)), jnp.arange(v), bias=b, key=key,
                num_samples=16, sampler=samplers.uniform(v), unique=False,
                weights=p, reduction="sum",
            )  # fmt: skip

        return jax.vmap(loss)(keys).mean()

    opt = optax.adam(0.05)

    @jax.jit
    def step(b, state):
        updates, state = opt.update(jax.grad(objective)(b), state)
        return optax.apply_updates(b, updates), state

    b, state = jnp.zeros(v), opt.init(jnp.zeros(v))
    for _ in range(500):
        b, state = step(b, state)
    fitted = np.exp(np.asarray(b, np.float64))
    np.testing.assert_allclose(fitted, p, atol=0.02)
    assert abs(fitted.sum() - 1) < 0.03


def test_nce_masks_nan_in_masked_rows_and_out_of_range_labels():
    e, w, b, y = _problem(9)
    where = np.arange(N) % 3 != 0
    e[~where] = np.nan
    y[4] = V  # out of range, and kept
    kw = dict(key=jax.random.key(1), num_samples=8, bias=b, where=where)
    per = jcce.nce_loss(e, w, y, reduction="none", **kw)
    assert np.all(np.asarray(per)[~where] == 0) and np.isnan(per[4])
    ok = np.delete(np.arange(N), 4)
    assert np.all(np.isfinite(np.asarray(per)[ok]))
    y[4] = 0
    value, grads = jax.jit(
        jax.value_and_grad(lambda e, w: jcce.nce_loss(e, w, y, **kw), argnums=(0, 1))
    )(e, w)
    per = jcce.nce_loss(np.where(where[:, None], e, 0), w, y, reduction="none", **kw)
    np.testing.assert_allclose(value, np.asarray(per)[where].mean(), rtol=1e-6)
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert np.all(np.asarray(grads[0])[~where] == 0)
    nothing = jcce.nce_loss(e, w, y, **{**kw, "where": np.zeros(N, bool)})
    assert float(nothing) == 0.0


def test_nce_errors_name_the_argument():
    e, w, b, y = _problem()
    with pytest.raises(ValueError, match="nce_loss: reduction must be"):
        jcce.nce_loss(e, w, y, key=jax.random.key(0), num_samples=4, reduction="avg")
    with pytest.raises(TypeError, match="nce_loss: key is required"):
        jcce.nce_loss(e, w, y, num_samples=4)
