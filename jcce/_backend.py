"""The backend seam: which strategy computes a loss.

Every loss takes ``implementation``, as ``jax.nn.dot_product_attention`` does:

* ``"xla"``: the portable path, written plainly for accelerators (GPU, TPU): plain
  reductions that XLA fuses into as few passes as it can, 16-bit operands in 16-bit
  matmuls with float32 results, token blocks sized to fill an accelerator's memory.
* ``"xla_cpu"``: the path tuned on XLA:CPU (:mod:`jcce._xla_cpu`): class-axis chunking,
  optimization barriers and reduction layouts that keep XLA:CPU from materializing a
  shared ``[..., K]`` temporary, bit-level widening, cache-sized vocabulary chunks.
* ``"pallas"``: two Pallas kernels (:mod:`jcce._pallas`) that read the logits once in
  the forward and once in the backward for any chain they support, on NVIDIA GPUs; the
  ``"xla"`` path on other platforms and for what the kernels do not cover.
* ``None`` (the default): ``"xla_cpu"`` where the computation is lowered for the CPU,
  ``"xla"`` everywhere else. The choice is made by :func:`jax.lax.platform_dependent`,
  so it follows the platform the program is lowered for, not the host: ``jax.export``
  for ``cuda`` or ``tpu`` exports the ``"xla"`` path even from a CPU-only machine, and
  the compiled program holds one path only.

Both implementations compute the same numbers from the same closed forms
(:mod:`jcce._kernel`); they differ only in how the work is laid out.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
from jax import lax

from jcce import _validate

IMPLEMENTATIONS = _validate.IMPLEMENTATIONS

_DEFAULT = contextvars.ContextVar("jcce_implementation", default=None)


@contextlib.contextmanager
def use_implementation(implementation: str | None):
    """Within this context, losses called without ``implementation=`` (or with
    ``None``) use ``implementation``: for code that calls jcce where you cannot pass
    the argument. Read when a loss is traced, and part of its jit cache key.

    Example:
      >>> import jax.numpy as jnp, jcce
      >>> with jcce.use_implementation("xla"):  # the accelerator path, on any backend
      ...     loss = jcce.cross_entropy(jnp.zeros((2, 3)), jnp.array([0, 2]))
      >>> round(float(loss), 4)  # log 3
      1.0986
    """
    _validate.implementation("use_implementation", implementation)
    token = _DEFAULT.set(implementation)
    try:
        yield
    finally:
        _DEFAULT.reset(token)


def resolve(implementation: str | None) -> str | None:
    """``implementation``, or for None the default of :func:`use_implementation` (None
    again outside it: chosen by platform, by :func:`dispatch`)."""
    return _DEFAULT.get() if implementation is None else implementation


class Ops(NamedTuple):
    """The layout decisions of one implementation, as the kernel uses them.

    ``row_reduce(reduce, x, elementwise=None, row=None, layout=None, col=None)`` is
    ``reduce(elementwise(x, row[..., None]) * col, axis=-1)`` (``row``: a per-example
    array, or a tuple of them, each broadcast so); ``layout`` (a small int)
    names reductions that must not share a ``[..., K]`` subexpression on XLA:CPU.
    ``sum_exp(x, m)`` is ``sum_k exp(x_k - m)``. ``widen(z)`` turns bfloat16 into
    float32. ``take_label(z, yc)`` gathers each row's label entry (``[..., 1]``).
    ``support(x)`` is ``x > -inf`` as 0 or 1 (NaN for NaN); ``zero_neg_inf(u)`` is ``u``
    with ``-inf`` replaced by 0. ``keeps_exponentials(num_classes, dtype)``: whether
    the cross-entropy's VJP saves ``exp(x - m)`` (one ``[..., K]`` array, as optax
    saves its softmax) instead of recomputing it in the backward, a choice by shape.
    ``support_sums(exact, unmasked, k)``: label smoothing's ``(K_S, sum_S w d)`` per
    row, given ``exact()`` (their own reductions) and ``unmasked()`` (``sum_k w d_k``
    without the support mask: equal to the masked sum, with ``K_S = k``, wherever it is
    finite). ``full_support(full, exact, ks, k)``: the backward's dense gradient,
    ``full()`` (computed as if every class were in the support) or ``exact()`` (with
    the support masks), given each row's support size ``ks`` of ``k`` classes; the two
    agree wherever every ``ks == k``. ``row_sums``: None, or a function that takes a
    chain's forward sums a block of rows at a time (the signature of
    :func:`jcce._pallas.row_sums`), for the chains the kernel gives it. ``scatter_labels``: whether the backward sets the
    label entries with a scatter instead of a one-hot compare (32/64-bit logits, when
    nothing was saved). ``late_row_mask``: whether the forward reads masked examples'
    logits as they are and replaces those rows' results afterwards (their derivatives
    come from the masked logits), instead of masking the logits before any pass reads
    them. ``pin_targets(t)``: constant probability targets as the kernel reads them
    (identity, or behind an optimization barrier where the compiler mishandles them).
    ``by_rows(fun, *arrays)``: ``fun(*arrays)`` for a ``fun`` of each row of its
    ``[..., K]`` and ``[...]`` operands with per-row results, in one call or a block of
    rows at a time (``fun`` then sees a single row: it must broadcast by rank)."""

    name: str
    row_reduce: Callable
    sum_exp: Callable
    widen: Callable
    take_label: Callable
    support: Callable
    zero_neg_inf: Callable
    keeps_exponentials: Callable
    support_sums: Callable
    full_support: Callable
    row_sums: Callable | None
    pin_targets: Callable
    by_rows: Callable
    scatter_labels: bool
    late_row_mask: bool

    @classmethod
    def collect(cls, name: str, namespace: dict, **flags: bool) -> Ops:
        """The implementation ``name`` from a module's functions named after the
        fields with a leading underscore (``_row_reduce``, ``_sum_exp``, ...), and the
        boolean fields ``flags``."""
        functions = [namespace["_" + f] for f in cls._fields[1:] if f not in flags]
        return cls(name, *functions, **flags)


class LinearPlan(NamedTuple):
    """How the fused linear loss tiles its work (static).

    ``block``: tokens per block. ``widen``: whether the gradient sweep's matmuls run on
    operands widened to the accumulation dtype (else on the inputs' dtype, with results
    in the accumulation dtype). ``logits_chunk`` / ``grad_chunk``: classes per matmul
    when computing a block's logits and its two gradient products (``V``: one matmul).
    ``lean_classes``: in the lean mode, classes per step of the class sweep, whose
    ``[N, lean_classes]`` logits are computed for every token at once.
    """

    block: int
    widen: bool
    logits_chunk: int
    grad_chunk: int
    lean_classes: int


def rows_within(budget: int, classes: int, num_rows: int) -> int:
    """The largest power of two ``r`` (at least 1) whose ``[r, classes]`` float32
    logits fit ``budget`` bytes, at most ``num_rows`` (at least 1)."""
    rows = 1
    while rows * 2 * max(classes, 1) * 4 <= budget:
        rows *= 2
    return max(1, min(rows, num_rows))


_INTERPRET_PALLAS = contextvars.ContextVar("jcce_interpret_pallas", default=False)


@contextlib.contextmanager
def interpret_pallas(enabled: bool = True):
    """Within this context ``implementation="pallas"`` runs its kernels in Pallas's
    interpret mode on any platform (the CPU tests' way to check them), instead of
    running the ``"xla"`` path where Pallas does not lower (``enabled=False`` restores
    that). Read at trace time."""
    token = _INTERPRET_PALLAS.set(enabled)
    try:
        yield
    finally:
        _INTERPRET_PALLAS.reset(token)


def interpreting_pallas() -> bool:
    """Whether :func:`interpret_pallas` is in effect."""
    return _INTERPRET_PALLAS.get()


def dispatch(implementation: str | None, fun: Callable, *args):
    """``fun(implementation, *args)``; with ``implementation=None``, ``"xla_cpu"`` when
    lowered for the CPU and ``"xla"`` for any other platform; ``"pallas"`` where
    Pallas lowers its kernels (``cuda``, or anywhere under :func:`interpret_pallas`)
    and ``"xla"`` elsewhere."""
    if implementation == "pallas" and not interpreting_pallas():
        branches = {"cuda": partial(fun, "pallas"), "default": partial(fun, "xla")}
        return lax.platform_dependent(*args, **_typed_alike(branches, args))
    if implementation is not None:
        return fun(implementation, *args)
    branches = {"cpu": partial(fun, "xla_cpu"), "default": partial(fun, "xla")}
    return lax.platform_dependent(*args, **_typed_alike(branches, args))


def cond(pred, true_fun: Callable, false_fun: Callable, *operands):
    """``lax.cond``, with the branches' results typed alike inside ``jax.shard_map``
    (a constant in one branch where the other computes from varying values)."""
    branches = _typed_alike({"t": true_fun, "f": false_fun}, operands)
    return lax.cond(pred, branches["t"], branches["f"], *operands)


def varying(aval) -> set:
    """The mesh axes an abstract value varies over inside ``jax.shard_map`` (empty
    elsewhere, and where ``check_vma=False``)."""
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
    if manual is not None:
        return set(manual.varying)
    return set(getattr(aval, "vma", ()))


def varying_of(*arrays) -> set:
    """The mesh axes any of ``arrays`` varies over (None entries are skipped)."""
    return set().union(*(varying(jax.typeof(a)) for a in arrays if a is not None))


def vary_alike(*arrays) -> list:
    """``arrays`` (None entries kept), each typed as varying over every mesh axis one
    of them varies over: passed so to a ``custom_vjp``, a replicated argument's
    cotangent is this shard's sum, which JAX adds up over the shards on the way out."""
    axes = varying_of(*arrays)
    return [None if a is None else vary_over(a, axes) for a in arrays]


def shaped_like(shape, dtype, *args) -> jax.ShapeDtypeStruct:
    """The shape and dtype of a result computed from ``args``: varying inside
    ``jax.shard_map`` over every mesh axis one of them varies over (the type a
    ``pallas_call`` must be told for its results where ``check_vma=True``)."""
    axes = frozenset(varying_of(*args))
    if hasattr(jax.sharding, "ManualAxisType"):  # jax >= 0.10
        mat = jax.sharding.ManualAxisType(varying=axes)
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
    return jax.ShapeDtypeStruct(shape, dtype, vma=axes)


def _typed_alike(branches: dict, args) -> dict:
    """``branches`` whose results are typed alike inside ``jax.shard_map``
    (``check_vma=True``), as ``lax.cond`` and ``platform_dependent`` need: each result
    varies over the mesh axes it varies over in any branch (a kernel's per-row sum
    varies over the batch where the other branch's constant does not). Outside
    ``shard_map`` the branches themselves; inside, each is traced once more here."""
    if not getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()):
        return branches
    shapes = [jax.eval_shape(branch, *args) for branch in branches.values()]
    axes = jax.tree.map(lambda *s: frozenset().union(*map(varying, s)), *shapes)

    def typed(branch):
        def run(*args):
            return jax.tree.map(vary_over, branch(*args), axes)

        return run

    return {name: typed(branch) for name, branch in branches.items()}


def vary_over(x, axes):
    """``x`` typed as varying over the mesh axes ``axes`` (and its own) inside
    ``jax.shard_map``; ``x`` itself elsewhere."""
    missing = tuple(sorted(set(axes) - varying(jax.typeof(x))))
    if not missing or jax.dtypes.issubdtype(jax.typeof(x).dtype, jax.dtypes.float0):
        return x
    return lax.pcast(x, missing, to="varying")
