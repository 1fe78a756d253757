"""Post-hoc calibration: temperature scaling and the expected calibration error.

Temperature scaling (Guo et al. 2017) fits one scalar ``T > 0`` on held-out data so that
``softmax(z / T)`` minimises the mean negative log-likelihood; it changes the
confidences but never the predicted class. :func:`fit_temperature` finds ``T`` with
safeguarded Newton steps on ``log T``, using jcce's own closed-form first and second
derivatives of ``jcce.chain(jcce.temperature(T))`` with respect to ``T``.
:func:`expected_calibration_error` and :func:`reliability_diagram_data` measure the
result with equal-width confidence bins.

References:
  Guo, Pleiss, Sun and Weinberger (2017), On Calibration of Modern Neural Networks,
  ICML. Naeini, Cooper and Hauskrecht (2015), Obtaining Well Calibrated Probabilities
  Using Bayesian Binning, AAAI.
"""

from __future__ import annotations

import math
import statistics
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jcce import _validate as v
from jcce._config import acc_dtype
from jcce._losses import configured_cross_entropy
from jcce._plumbing import convert_arrays
from jcce._transforms import chain, temperature

__all__ = [
    "ReliabilityDiagram",
    "expected_calibration_error",
    "fit_temperature",
    "reliability_diagram_data",
]

# The fitted temperature is clamped to [1 / _T_LIMIT, _T_LIMIT].
_T_LIMIT = 1e4
# Largest change of log T in one step (a factor of e^2 in T).
_MAX_STEP = 2.0
# Step halvings tried before the line search gives up (the loss no longer decreases
# within float precision, so the current point is the optimum to that precision).
_MAX_HALVINGS = 30


def _fit(logits, labels, where, weights, init, max_iter, tol):
    """The jitted solver: safeguarded Newton on u = log T (see fit_temperature)."""
    fn = "fit_temperature"
    if jnp.issubdtype(labels.dtype, jnp.integer):  # once, not in each Newton step
        v.check_labels(fn, labels, logits.shape[-1], where)
    dtype = acc_dtype(logits.dtype)
    tol = tol.astype(dtype)
    lo, hi = -math.log(_T_LIMIT), math.log(_T_LIMIT)

    def nll(u):
        return configured_cross_entropy(
            fn,
            chain(temperature(jnp.exp(u))),
            logits,
            labels,
            where=where,
            weights=weights,
        )

    def grad_and_value(u):
        f, g = jax.value_and_grad(nll)(u)
        return g, f

    def derivatives(u):
        # Reverse over reverse: d/du of dL/du, carrying L and dL/du along.
        (g, f), h = jax.value_and_grad(grad_and_value, has_aux=True)(u)
        return f, g, h

    def direction(g, h):
        # Newton where the curvature is positive; elsewhere (L is locally concave in
        # log T, e.g. at a far too high T) the longest step downhill, then backtrack.
        newton = h > 0
        d = jnp.where(newton, -g / jnp.where(newton, h, 1), -jnp.sign(g) * _MAX_STEP)
        return jnp.clip(d, -_MAX_STEP, _MAX_STEP)

    def better(f_c, g_c, f, g):
        # Near the optimum a float32 loss cannot resolve the decrease of a Newton step
        # (it is ~ L'' du^2 / 2); there a smaller |dL/du| at an equal loss is progress.
        # A NaN candidate is never better.
        return (f_c < f) | ((f_c <= f) & (jnp.abs(g_c) < jnp.abs(g)))

    # One loop evaluates one candidate u + alpha d per iteration (a single copy of the
    # derivative program keeps compilation fast): accept it and take the next Newton
    # direction, or halve alpha. The first candidate is the starting point itself.
    def body(state):
        first, steps, halvings, u, f, g, d, alpha, _ = state
        u_c = jnp.clip(u + alpha * d, lo, hi)
        f_c, g_c, h_c = derivatives(u_c)
        accept = first | better(f_c, g_c, f, g)
        d_c = direction(g_c, h_c)
        one = jnp.ones((), dtype)
        done = jnp.where(
            accept,
            # Converged (a zero gradient, e.g. all masked, included), or a bad loss.
            (jnp.abs(d_c) <= tol)
            | (~first & (jnp.abs(u_c - u) <= tol))
            | (first & ~jnp.isfinite(f_c)),
            # No halving improved: the optimum to float precision.
            halvings + 1 >= _MAX_HALVINGS,
        )

        def pick(new, old):
            return jnp.where(accept, new, old)

        return (
            jnp.zeros((), bool),
            steps + (accept & ~first),
            pick(0, halvings + 1),
            pick(u_c, u),
            pick(f_c, f),
            pick(g_c, g),
            pick(d_c, d),
            pick(one, alpha / 2),
            done,
        )

    def cond(state):
        steps, done = state[1], state[-1]
        return (steps < max_iter) & ~done

    u0 = jnp.clip(jnp.log(jnp.asarray(init, dtype)), lo, hi)
    zero = jnp.zeros((), dtype)
    i0 = jnp.int32(0)
    state = (
        jnp.ones((), bool),
        i0,
        i0,
        u0,
        zero,
        zero,
        zero,
        zero,
        jnp.zeros((), bool),
    )
    _, _, _, u, f, *_ = jax.lax.while_loop(cond, body, state)
    t = jnp.clip(jnp.exp(u), 1 / _T_LIMIT, _T_LIMIT)
    # A NaN or infinite loss (NaN logits, a bad label) has no best temperature.
    return jnp.where(jnp.isfinite(f), t, jnp.nan)


_fit_jit = v.keyed_jit(_fit)


def fit_temperature(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    where: jax.typing.ArrayLike | None = None,
    weights: jax.typing.ArrayLike | None = None,
    init: float | jax.typing.ArrayLike = 1.0,
    max_iter: int = 50,
    tol: float = 1e-7,
) -> jax.Array:
    r"""Fits the temperature ``T > 0`` that minimises the held-out mean NLL.

    Temperature scaling (Guo et al. 2017) solves

    ``T* = argmin_{T > 0} L(T)``, ``L(T) = sum_i s_i l_i(z_i / T) / sum_i s_i``,

    where ``l_i`` is the cross-entropy of example ``i`` and ``s_i`` its weight, i.e.
    ``L(T) = jcce.chain(jcce.temperature(T))(logits, labels, where=where,
    weights=weights)``. The solver works on ``u = log T`` (so ``T`` stays positive) and
    takes Newton steps ``u <- u - L'(u) / L''(u)``, where ``L'`` and ``L''`` are jcce's
    closed-form derivatives with respect to the temperature (``jax.grad`` and
    ``jax.grad(jax.grad(...))``, reverse over reverse). It is safeguarded: where
    ``L'' <= 0`` (``L`` is locally concave in ``log T``, e.g. at a far too high ``T``)
    it steps downhill instead; every step is at most 2 in ``log T``; a step is halved
    until the loss decreases (or, where a float32 loss cannot resolve the decrease
    next to the optimum, stays equal while ``|L'|`` decreases); and ``T`` is clamped to
    ``[1e-4, 1e4]``. It stops when a step in ``log T`` (the relative change of ``T``)
    is at most ``tol``, when no step improves, or after ``max_iter`` steps; from
    ``init = 1`` it typically takes 4 to 6 steps. The solve is one
    ``jax.lax.while_loop`` (one candidate per iteration), compiled once per input
    shape, and works under ``jax.jit``.

    Args:
      logits: float ``[*batch, K]`` held-out logits (classes last).
      labels: int ``[*batch]`` class indices, or float ``[*batch, K]`` probability
        targets, as in :func:`jcce.cross_entropy`.
      where: bool ``[*batch]``; ``False`` leaves the example out of the fit.
      weights: float ``[*batch]`` per-example weights ``s_i >= 0``. (For another
        class axis or an ``ignore_index``, move the classes last with
        ``jnp.moveaxis`` and pass ``where=labels != ignore_index``.)
      init: the starting temperature, ``> 0`` (a scalar array is not checked when
        traced).
      max_iter: the maximum number of Newton steps, a positive Python int.
      tol: stopping tolerance on the change of ``log T``, ``>= 0``.

    Returns:
      The fitted temperature: a float32 scalar (float64 for float64 logits). Divide
      the logits by it (or use ``jcce.temperature(T)``) at test time.

    Raises:
      TypeError: for non-floating logits, labels of the wrong dtype, a non-boolean
        ``where``, a ``max_iter`` that is not a Python int, or when called under
        ``jax.grad`` or ``jax.jvp`` with differentiated inputs.
      ValueError: for shape mismatches (as :func:`jcce.cross_entropy`), ``init <= 0``,
        ``max_iter < 1`` or ``tol < 0``.

    If every example is masked, the loss is flat and ``init`` is returned. On data the
    logits separate perfectly the loss decreases all the way to ``T -> 0``; the result
    is then a small temperature at which the float loss has stopped changing (at least
    the clamp ``1e-4``). A NaN or infinite loss (NaN in unmasked logits, a label outside
    ``[0, K)``, a target on a ``-inf`` class) returns NaN.

    Example:
      Two classes, logit gap ``2 log 3``: at ``T = 1`` every prediction has confidence
      ``0.9``, but only 3 of 4 are right. The best temperature makes the confidence
      ``sigmoid(2 log 3 / T) = 3/4``, so ``T = 2``.

      >>> import jax.numpy as jnp
      >>> from jcce import calibration
      >>> logits = jnp.tile(jnp.array([0.0, 2.0 * jnp.log(3.0)]), (4, 1))
      >>> labels = jnp.array([1, 1, 1, 0])
      >>> round(float(calibration.fit_temperature(logits, labels)), 4)
      2.0

    Note:
      The fitted temperature is not differentiable with respect to the logits (it is
      the output of an iterative solver); to fit inside a differentiated function,
      pass ``jax.lax.stop_gradient(logits)``. The objective is Guo et al.'s (mean NLL
      on a validation set; they use L-BFGS on ``T``); PyTorch and optax ship no
      temperature fitting.

    References:
      Guo, Pleiss, Sun and Weinberger (2017), On Calibration of Modern Neural Networks,
      ICML.
    """
    fn = "fit_temperature"
    max_iter = v.positive_int(fn, "max_iter", max_iter)
    init = v.transform_value(fn, init, lambda x: x > 0.0, "init must be finite and > 0")
    v.tolerance(fn, tol)
    arrays = convert_arrays(
        fn, logits=logits, labels=labels, where=where, weights=weights
    )
    arrays["logits"] = v.floating_logits(fn, arrays["logits"])
    v.has_classes(fn, arrays["logits"].shape, (-1,), -1, "a temperature fit needs")
    v.not_differentiated(fn, arrays, init)
    return _fit_jit(
        **arrays, init=init, max_iter=max_iter, tol=jnp.asarray(tol, jnp.float32)
    )


def _binned(logits, labels, where, num_bins):
    """Per-bin sums of confidence and correctness, int32 counts, and whether an unmasked
    label is outside ``[0, K)``."""
    z = logits.astype(acc_dtype(logits.dtype))
    k = z.shape[-1]
    z = z.reshape(-1, k)
    y = labels.reshape(-1)
    zmax = jnp.max(z, axis=-1)
    # max softmax probability = 1 / sum_k exp(z_k - max z); argmax of z is the prediction.
    conf = 1 / jnp.sum(jnp.exp(z - zmax[:, None]), axis=-1)
    live = jnp.ones(y.shape, bool) if where is None else where.reshape(-1)
    # Compare with k only if the labels' dtype can hold it (no wrap-around).
    too_big = (y >= k) if k <= jnp.iinfo(y.dtype).max else jnp.zeros(y.shape, bool)
    invalid = jnp.any(live & ((y < 0) | too_big))
    # A label that wraps in this cast is invalid, so it makes the result NaN anyway.
    pred = jnp.argmax(z, axis=-1)
    correct = (pred == y.astype(pred.dtype)).astype(z.dtype)
    # Bin b is (edge_b, edge_{b+1}], edge_b = b / B: b = ceil(c B) - 1, corrected by
    # one where the rounding of c B disagrees with the edges themselves.
    edges = jnp.linspace(0, 1, num_bins + 1, dtype=z.dtype)
    b = jnp.clip(jnp.ceil(conf * num_bins), 1, num_bins).astype(jnp.int32) - 1
    b = b - (conf <= edges[b]) + (conf > edges[b + 1])
    b = jnp.clip(b, 0, num_bins - 1)  # only NaN confidences need it
    zeros = jnp.zeros((num_bins,), z.dtype)
    conf_sum = zeros.at[b].add(jnp.where(live, conf, 0))
    correct_sum = zeros.at[b].add(jnp.where(live, correct, 0))
    count = jnp.zeros((num_bins,), jnp.int32).at[b].add(live.astype(jnp.int32))
    return conf_sum, correct_sum, count, invalid


class ReliabilityDiagram(NamedTuple):
    """Per-bin data of a reliability diagram; each field is ``[num_bins]``.

    Bin ``b`` is ``(b / B, (b + 1) / B]``; the edges are
    ``jnp.linspace(0, 1, num_bins + 1)``. An empty bin has ``count == 0`` and
    confidence and accuracy 0, so tell empty bins by ``count``, not by ``accuracy``: an
    accuracy of 0 in a bin with ``count > 0`` means every example in it was wrong.

    A bin with few examples has a noisy accuracy (with one example it can only be 0 or
    1); :meth:`accuracy_interval` gives the uncertainty to draw with it.
    """

    confidence: jax.Array
    """Mean confidence (max softmax probability) of the bin's examples."""
    accuracy: jax.Array
    """Fraction of the bin's examples whose argmax is the label."""
    count: jax.Array
    """Number of (unmasked) examples in the bin, int32."""

    def accuracy_interval(self, level: float = 0.95) -> tuple[jax.Array, jax.Array]:
        """Wilson score interval of each bin's accuracy: ``(low, high)``, each ``[B]``.

        With ``n = count``, ``a = accuracy`` and ``z`` the standard normal quantile of
        ``(1 + level) / 2`` (1.96 for 0.95), the interval is
        ``(a + z^2/(2n) -+ z sqrt(a (1 - a)/n + z^2/(4 n^2))) / (1 + z^2/n)``. It
        stays inside ``[0, 1]`` and is wide where a bin holds few examples: one wrong
        example gives ``(0, 0.79)`` at ``level = 0.95``. An empty bin gives ``(0, 1)``
        (nothing is known); NaN accuracies (a bad label) stay NaN.

        Args:
          level: the confidence level, a Python float in ``(0, 1)``.

        Returns:
          Two arrays of the accuracy's shape and dtype, the lower and upper ends; plot
          them as error bars around ``accuracy``.

        Raises:
          TypeError: if ``level`` is not a real number.
          ValueError: if ``level`` is not in ``(0, 1)``.

        Example:
          >>> import jax.numpy as jnp
          >>> from jcce import calibration
          >>> d = calibration.ReliabilityDiagram(
          ...     confidence=jnp.array([0.0, 0.43, 0.9]),
          ...     accuracy=jnp.array([0.0, 0.0, 0.9]),
          ...     count=jnp.array([0, 1, 100], jnp.int32),
          ... )
          >>> low, high = d.accuracy_interval()
          >>> [round(x, 3) for x in low.tolist()], [round(x, 3) for x in high.tolist()]
          ([0.0, 0.0, 0.826], [1.0, 0.793, 0.945])
        """
        v.confidence_level("accuracy_interval", level)
        z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
        a = jnp.asarray(self.accuracy)
        n = jnp.asarray(self.count).astype(a.dtype)
        empty = n == 0
        n = jnp.where(empty, 1, n)
        z2 = z * z
        centre = (a + z2 / (2 * n)) / (1 + z2 / n)
        half = z / (1 + z2 / n) * jnp.sqrt(a * (1 - a) / n + z2 / (4 * n * n))
        low = jnp.where(empty, 0, jnp.clip(centre - half, 0, 1))
        high = jnp.where(empty, 1, jnp.clip(centre + half, 0, 1))
        # jnp.clip keeps NaN, so a NaN accuracy gives NaN ends.
        return low.astype(a.dtype), high.astype(a.dtype)


def _calibration(logits, labels, where, num_bins, fn):
    """The ECE and the reliability diagram from one binning (one compiled program)."""
    v.check_labels(fn, labels, logits.shape[-1], where)
    conf_sum, correct_sum, count, invalid = _binned(logits, labels, where, num_bins)
    dtype = conf_sum.dtype
    nan = jnp.where(invalid, jnp.nan, 0).astype(dtype)
    n = jnp.sum(count).astype(dtype)
    ece = jnp.sum(jnp.abs(correct_sum - conf_sum)) / jnp.where(n == 0, 1, n) + nan
    denom = jnp.where(count == 0, 1, count).astype(dtype)
    diagram = ReliabilityDiagram(
        confidence=conf_sum / denom + nan,
        accuracy=correct_sum / denom + nan,
        count=count,
    )
    return ece, diagram


_calibration_jit = v.keyed_jit(_calibration, static_argnames=("num_bins", "fn"))


def _check_ece_inputs(fn, logits, labels, where, num_bins):
    num_bins = v.positive_int(fn, "num_bins", num_bins)
    arrays = convert_arrays(fn, logits=logits, labels=labels, where=where)
    logits = v.floating_logits(fn, arrays["logits"])
    v.has_classes(fn, logits.shape, (-1,), -1, "a prediction needs")
    batch_shape = logits.shape[:-1]
    _, labels = v.labels_kind(
        fn, arrays["labels"], batch_shape, logits.shape, allow=("int",)
    )
    where = arrays["where"]
    if where is not None:
        where = v.mask(fn, "where", where, batch_shape)
    return logits, labels, where, num_bins


def expected_calibration_error(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    num_bins: int = 15,
    *,
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""Top-label expected calibration error with equal-width confidence bins.

    For example ``i`` the confidence is ``c_i = max_k softmax(z_i)_k`` and the
    prediction is right if ``argmax_k z_ik == y_i``. The examples are put into
    ``B = num_bins`` bins ``(b / B, (b + 1) / B]``, ``b = 0, ..., B - 1`` (confidence
    ``c`` goes to bin ``ceil(c B) - 1``), and

    ``ECE = sum_b (n_b / n) |acc_b - conf_b|``,

    where ``n_b`` is the number of examples in bin ``b``, ``acc_b`` their accuracy,
    ``conf_b`` their mean confidence and ``n`` the number of (unmasked) examples. Empty
    bins contribute 0.

    Args:
      logits: float ``[*batch, K]`` (classes last). Any softmax-invariant form works,
        e.g. log-probabilities.
      labels: int ``[*batch]`` class indices in ``[0, K)``.
      num_bins: the number of bins ``B``, a positive Python int (static under jit).
      where: bool ``[*batch]``; ``False`` leaves the example out (even with NaN
        logits).

    Returns:
      float32 (float64 for float64 logits) scalar in ``[0, 1]``; 0 if every example is
      masked.

    Raises:
      TypeError: for non-floating logits, non-integer labels, a non-boolean ``where``
        or a ``num_bins`` that is not a Python int.
      ValueError: for shape mismatches or ``num_bins < 1``.

    An unmasked label outside ``[0, K)`` makes the result NaN, as NaN logits do (jcce
    never counts a bad label as a silent mistake). Ties in the logits go to the first
    maximal class, as ``jnp.argmax``.

    Example:
      Two predictions with confidence 0.9, both right, and two with confidence 0.7,
      both wrong: ``ECE = (2/4) |1 - 0.9| + (2/4) |0 - 0.7| = 0.4``.

      >>> import jax.numpy as jnp
      >>> from jcce import calibration
      >>> probs = jnp.array([[0.9, 0.1], [0.1, 0.9], [0.7, 0.3], [0.3, 0.7]])
      >>> labels = jnp.array([0, 1, 1, 0])
      >>> ece = calibration.expected_calibration_error(jnp.log(probs), labels)
      >>> round(float(ece), 4)
      0.4

    Note:
      This is the top-label (``"l1"``) ECE of Guo et al., with the bins of their
      reference code (``lower < c <= upper``); a library that closes bins on the left
      puts a confidence exactly on an edge in the next bin. The ECE depends on
      ``num_bins`` and is a biased estimate: even a perfectly calibrated model has an
      ECE of order ``sqrt(B / n)`` on ``n`` examples.

    References:
      Naeini, Cooper and Hauskrecht (2015), Obtaining Well Calibrated Probabilities
      Using Bayesian Binning, AAAI. Guo, Pleiss, Sun and Weinberger (2017), On
      Calibration of Modern Neural Networks, ICML.
    """
    fn = "expected_calibration_error"
    logits, labels, where, num_bins = _check_ece_inputs(
        fn, logits, labels, where, num_bins
    )
    return _calibration_jit(logits, labels, where, num_bins=num_bins, fn=fn)[0]


def reliability_diagram_data(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    num_bins: int = 15,
    *,
    where: jax.typing.ArrayLike | None = None,
) -> ReliabilityDiagram:
    r"""Per-bin mean confidence, accuracy and count: the data of a reliability diagram.

    Uses the bins of :func:`expected_calibration_error`, so
    ``ECE = sum_b count_b |accuracy_b - confidence_b| / sum_b count_b``. Plot
    ``accuracy`` (bars) against the bin centres ``(b + 0.5) / B`` with the diagonal as
    the perfectly calibrated reference, and skip bins with ``count == 0`` (their
    accuracy 0 is a placeholder). A bin with ``count > 0`` and accuracy 0 is a bar of
    height 0, not an empty bin: draw its accuracy as a marker too, with
    :meth:`ReliabilityDiagram.accuracy_interval` as error bars, so that bins of one or
    two examples read as what they are.

    Args:
      logits: float ``[*batch, K]`` (classes last).
      labels: int ``[*batch]`` class indices in ``[0, K)``.
      num_bins: the number of bins ``B``, a positive Python int (static under jit).
      where: bool ``[*batch]``; ``False`` leaves the example out.

    Returns:
      A :class:`ReliabilityDiagram` ``(confidence, accuracy, count)`` of ``[B]`` arrays:
      float32 (float64 for float64 logits) means, 0 for empty bins, and int32 counts.
      An unmasked label outside ``[0, K)`` makes the means NaN.

    Raises:
      TypeError, ValueError: as :func:`expected_calibration_error`.

    Example:
      >>> import jax.numpy as jnp
      >>> from jcce import calibration
      >>> probs = jnp.array([[0.9, 0.1], [0.1, 0.9], [0.7, 0.3], [0.3, 0.7]])
      >>> d = calibration.reliability_diagram_data(
      ...     jnp.log(probs), jnp.array([0, 1, 1, 0]), num_bins=5
      ... )
      >>> d.count.tolist()  # bins (0.6, 0.8] and (0.8, 1]
      [0, 0, 0, 2, 2]
      >>> [round(x, 4) for x in d.confidence.tolist()]
      [0.0, 0.0, 0.0, 0.7, 0.9]
      >>> d.accuracy.tolist()
      [0.0, 0.0, 0.0, 0.0, 1.0]

    References:
      DeGroot and Fienberg (1983), The Comparison and Evaluation of Forecasters, The
      Statistician. Guo, Pleiss, Sun and Weinberger (2017), On Calibration of Modern
      Neural Networks, ICML.
    """
    fn = "reliability_diagram_data"
    logits, labels, where, num_bins = _check_ece_inputs(
        fn, logits, labels, where, num_bins
    )
    return _calibration_jit(logits, labels, where, num_bins=num_bins, fn=fn)[1]
