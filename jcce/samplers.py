"""Candidate samplers for sampled losses: pure functions of a ``jax.random`` key.

A :class:`Sampler` is a distribution ``q`` over the classes ``[0, V)``:

* :func:`uniform`: ``q(c) = 1 / V``;
* :func:`log_uniform`: the Zipfian ``q(c) = log((c + 2) / (c + 1)) / log(V + 1)``, for
  classes sorted by decreasing frequency (TensorFlow's
  ``log_uniform_candidate_sampler`` documents the same distribution);
* :func:`unigram`: ``q(c)`` proportional to ``counts[c] ** distortion``.

:func:`sample` draws ``num_samples`` classes from it, with replacement or unique (by
drawing with replacement until ``num_samples`` distinct classes have appeared, and
counting the draws that took). :func:`expected_count` is how many times a class is
expected among the draws, the correction sampled losses subtract in log space:

* with replacement, ``S q(c)`` for ``S`` draws;
* unique, ``1 - (1 - q(c)) ** T`` for the ``T`` draws it took: the probability that
  ``c`` is among them.

Example:
  >>> import jax, jcce
  >>> sampler = jcce.samplers.log_uniform(1000)
  >>> drawn = jcce.samplers.sample(sampler, jax.random.key(0), 8)
  >>> drawn.classes.shape, bool(drawn.tries >= 8)
  ((8,), True)
  >>> float(jcce.samplers.expected_count(sampler, drawn, 0)) > 0.5  # the top class
  True
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jcce import _validate as v

__all__ = [
    "Candidates",
    "Sampler",
    "expected_count",
    "log_uniform",
    "sample",
    "uniform",
    "unigram",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampler:
    """A distribution over ``[0, num_classes)``: ``kind`` is ``"uniform"``,
    ``"log_uniform"`` or ``"unigram"``; ``log_q`` holds the ``[V]`` log-probabilities of
    a unigram sampler (None for the others, whose ``q`` is a formula)."""

    kind: str = dataclasses.field(metadata={"static": True})
    num_classes: int = dataclasses.field(metadata={"static": True})
    log_q: jax.Array | None = None

    def log_prob(self, classes) -> jax.Array:
        """``log q(c)`` of each class, float32."""
        c = jnp.asarray(classes)
        if self.kind == "uniform":
            return jnp.full(c.shape, -jnp.log(jnp.float32(self.num_classes)))
        if self.kind == "log_uniform":
            c = c.astype(jnp.float32)
            return jnp.log(jnp.log1p(1 / (c + 1))) - jnp.log(
                jnp.log1p(jnp.float32(self.num_classes))
            )
        return self.log_q[c]

    def num_drawable(self) -> int:
        """How many classes can be drawn: every class, or a unigram sampler's classes
        with a positive count (where its probabilities are concrete)."""
        if self.log_q is None or isinstance(self.log_q, jax.core.Tracer):
            return self.num_classes
        return int(jnp.sum(jnp.isfinite(self.log_q)))

    def draw(self, key, shape) -> jax.Array:
        """Independent draws (with replacement), int32 of ``shape``."""
        if self.kind == "uniform":
            return jax.random.randint(key, shape, 0, self.num_classes, jnp.int32)
        if self.kind == "log_uniform":
            # Inverse CDF: P(draw <= c) = log(c + 2) / log(V + 1).
            u = jax.random.uniform(key, shape)
            c = jnp.floor(jnp.exp(u * jnp.log1p(jnp.float32(self.num_classes)))) - 1
            return jnp.clip(c, 0, self.num_classes - 1).astype(jnp.int32)
        return jax.random.categorical(key, self.log_q, shape=shape).astype(jnp.int32)


def uniform(num_classes: int) -> Sampler:
    """Every class with probability ``1 / num_classes``."""
    return Sampler("uniform", v.num_classes("uniform", num_classes))


def log_uniform(num_classes: int) -> Sampler:
    """The Zipfian ``q(c) = log((c + 2) / (c + 1)) / log(num_classes + 1)``: class 0 the
    most frequent."""
    return Sampler("log_uniform", v.num_classes("log_uniform", num_classes))


def unigram(counts, distortion: float = 1.0) -> Sampler:
    """``q(c)`` proportional to ``counts[c] ** distortion`` (``distortion=0.75``
    flattens a word-frequency distribution as word2vec does; 0 makes it uniform).
    Classes with count 0 are never drawn, and their expected count is 0: a label of
    such a class has ``log Q = -inf``, so with ``subtract_log_q=True`` (the default)
    its example's loss is NaN, as in TensorFlow's sampled losses. Give every class
    that can be a label a positive count (add-one smoothing, say)."""
    counts = v.unigram_counts("unigram", counts, distortion)
    positive = counts > 0
    w = jnp.where(
        positive, distortion * jnp.log(jnp.where(positive, counts, 1)), -jnp.inf
    )
    return Sampler("unigram", counts.shape[0], w - jax.nn.logsumexp(w))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Candidates:
    """Sampled classes: ``classes`` int32 ``[S]``; ``tries`` the draws it took (``S``
    with replacement); ``unique`` whether the classes are distinct (the expected
    count's formula depends on it)."""

    classes: jax.Array
    tries: jax.Array
    unique: bool = dataclasses.field(metadata={"static": True})


def sample(
    sampler: Sampler, key, num_samples: int, *, unique: bool = True
) -> Candidates:
    """``num_samples`` classes from ``sampler``: independent draws, or (``unique``) the
    first ``num_samples`` distinct classes of a stream of independent draws, in the
    order they appeared, with the number of draws that took.

    Raises ``ValueError`` if ``unique`` asks for more classes than the sampler can give.
    """
    v.num_samples("sample", num_samples, sampler.num_drawable(), unique)
    if not unique:
        drawn = sampler.draw(key, (num_samples,))
        return Candidates(drawn, jnp.int32(num_samples), False)
    return _unique(sampler, key, num_samples)


def _unique(sampler: Sampler, key, s: int) -> Candidates:
    """Draws ``s`` at a time until ``s`` distinct classes have appeared; a bitmap of
    the ``V`` classes remembers which did."""
    num_classes = sampler.num_classes

    def body(state):
        key, seen, out, count, tries = state
        key, sub = jax.random.split(key)
        drawn = sampler.draw(sub, (s,))
        # First appearance within this chunk: sort stably, keep the first of each run.
        order = jnp.argsort(drawn, stable=True)
        ordered = drawn[order]
        first_sorted = jnp.concatenate(
            [jnp.ones((1,), bool), ordered[1:] != ordered[:-1]]
        )
        first = jnp.zeros((s,), bool).at[order].set(first_sorted)
        new = first & ~seen[drawn]
        rank = count + jnp.cumsum(new, dtype=jnp.int32)  # 1-based place in the output
        take = new & (rank <= s)
        out = out.at[jnp.where(take, rank - 1, s)].set(drawn, mode="drop")
        seen = seen.at[jnp.where(take, drawn, num_classes)].set(True, mode="drop")
        done = take & (rank == s)
        used = jnp.where(done.any(), jnp.argmax(done).astype(jnp.int32) + 1, s)
        return key, seen, out, jnp.minimum(rank[-1], s), tries + used.astype(jnp.int32)

    def cond(state):
        return state[3] < s

    init = (
        key,
        jnp.zeros((num_classes,), bool),
        jnp.zeros((s,), jnp.int32),
        jnp.int32(0),
        jnp.int32(0),
    )
    _, _, out, _, tries = lax.while_loop(cond, body, init)
    return Candidates(out, tries, True)


def expected_count(sampler: Sampler, candidates: Candidates, classes) -> jax.Array:
    """How many times each class in ``classes`` is expected among the draws that gave
    ``candidates``: ``S q(c)`` with replacement, ``1 - (1 - q(c)) ** T`` unique (``T``
    draws), float32, the shape of ``classes``."""
    log_q = sampler.log_prob(classes)
    tries = candidates.tries.astype(jnp.float32)
    if candidates.unique:
        # 1 - (1 - q)^T = -expm1(T log1p(-q)), accurate for q near 0 and near 1.
        return -jnp.expm1(tries * jnp.log1p(-jnp.exp(log_q)))
    return tries * jnp.exp(log_q)
