"""The ``"pallas"`` implementation: two Pallas kernels that own the passes over the logits.

XLA decides how many times a chain reads the logits; these kernels decide it
themselves. Each program of a kernel takes one row of the ``[N, K]`` logits and walks
its classes ``COLUMNS`` at a time (:func:`class_walk`), so ``value_and_grad`` of any
supported chain reads the logits twice and writes the gradient once, whatever the
transforms:

* :func:`row_sums` (the forward): one read. Per row, the running max (the shift) and
  the sum of exponentials below it, rescaled whenever the max grows (the online
  log-sum-exp), the label's logit, and the label-smoothing sums (support size, class
  weights over the support, ``sum_S w_k d_k``), the power sum ``sum_k w_k exp(a d_k)``
  of poly and generalized smoothing and the power sums of focal's whole gammas,
  rescaled likewise.
* :func:`column_map` (the backward): one read and one write. Each block of classes gets
  its gradient from a function of the block and the per-example residuals; the kernel
  (:mod:`jcce._kernel`) passes its own closed form, so no math is written twice.

This module knows nothing of losses: the logit maps and the gradient come in as
functions. Pallas lowers these kernels through Triton on NVIDIA GPUs (``cuda``); on any
other platform the ``"pallas"`` implementation runs the ``"xla"`` path
(:func:`jcce._backend.dispatch`), except inside :func:`jcce._backend.interpret_pallas`,
where the kernels run in Pallas's interpret mode (how the CPU tests check them).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jcce import _backend, _xla

# Classes per step of a program's walk along its row: 8192 ran fastest on an H200 for a
# two-pass kernel of one row per program (../shared/ACCELERATOR.md; 2048: 3% slower).
COLUMNS = 8192
# Below this many classes a class count that is not a power of two runs the "xla" path
# (a walk of blocks that small is not worth a kernel).
MIN_COLUMNS = 128

# Outside the two kernels (and for what they do not cover) the "xla" path's layout.
OPS = _xla.OPS._replace(name="pallas")


class Walk(NamedTuple):
    """How a program walks a row of ``K`` classes: ``steps`` aligned blocks of
    ``block`` classes, then, where they leave ``r = K - steps * block > 0`` classes, one
    block of ``tail`` classes (the smallest power of two ``>= r``) ending at ``K``,
    whose first ``tail - r`` classes the aligned blocks already covered (masked there).
    Every load and store is a power of two in size (Triton requires it) and in bounds,
    so nothing depends on how a backend pads an out-of-bounds block."""

    block: int
    steps: int
    tail: int


def class_walk(num_classes: int) -> Walk | None:
    """The :class:`Walk` of a row: blocks of the largest power of two up to
    :data:`COLUMNS` and ``num_classes``, or None for fewer than :data:`MIN_COLUMNS`
    classes that are not a power of two."""
    block = min(COLUMNS, 1 << (num_classes.bit_length() - 1))
    steps, rest = divmod(num_classes, block)
    if rest and num_classes < MIN_COLUMNS:
        return None
    return Walk(block, steps, 1 << (rest - 1).bit_length() if rest else 0)


def _walk(k, step, carry):
    """``carry`` through ``step(start, width, covered, carry)`` over a row of ``k``
    classes (:func:`class_walk`): ``covered`` is None for the aligned blocks, and for
    the tail the first class it must not count again."""
    walk = class_walk(k)

    def aligned(j, carry):
        return step(pl.multiple_of(j * walk.block, walk.block), walk.block, None, carry)

    carry = lax.fori_loop(0, walk.steps, aligned, carry)
    if walk.tail:
        carry = step(k - walk.tail, walk.tail, walk.steps * walk.block, carry)
    return carry


def _pack(tree, dtype):
    """The scalar leaves of ``tree`` as one vector (Pallas kernels take arrays, not
    closed-over values) and how to rebuild the tree from a ref to it."""
    leaves, treedef = jax.tree.flatten(tree)
    vector = jnp.stack(
        [jnp.asarray(v, dtype) for v in leaves] or [jnp.zeros((), dtype)]
    )

    def unpack(ref):
        return jax.tree.unflatten(treedef, [ref[i] for i in range(len(leaves))])

    return vector, unpack


def _spec(shape, index_map):
    return pl.BlockSpec(shape, index_map)


def _call(kernel, grid, in_specs, out_specs, out_shape, args):
    """``kernel`` run over ``grid`` on ``args``. ``out_shape`` (one
    ``jax.ShapeDtypeStruct`` or a list) gives the results' shapes and dtypes; inside
    ``jax.shard_map`` they vary over every mesh axis an argument varies over."""

    def typed(struct):
        return _backend.shaped_like(struct.shape, struct.dtype, *args)

    interpreting = _backend.interpreting_pallas()
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=jax.tree.map(typed, out_shape),
        interpret=interpreting,
        # Triton, not Mosaic GPU (whose resource estimator rejects custom_jvp calls,
        # as the logit maps are).
        compiler_params=None if interpreting else pltriton.CompilerParams(num_warps=4),
    )(*args)


def _rescaled(total, factor):
    """``total * factor`` where ``total`` is nonzero: a sum of nothing stays 0 when the
    shift jumps (``0 * exp(huge)`` would be NaN); NaN stays NaN."""
    return jnp.where(total != 0, total * factor, total)


def row_sums(maps, z, y, live, cw, scalars, *, smoothing, power, powers=0):
    """Per-row sums of the mapped logits in one read of ``z`` ``[N, K]``.

    Args:
      maps: ``(pre, post)``, the logit maps split at the shift:
        ``pre(z_block, scalars)`` gives the logits the shift (their max) is taken of,
        in the accumulation dtype, and ``post(u, scalars)`` the shifted mapped logits
        ``d = x - max x`` from ``u = pre(z) - shift``; both increasing, ``post``
        linear (the identity, or a division by a temperature).
      z: ``[N, K]`` logits; ``y``: ``[N]`` int32 labels (any value; one out of range
        matches no class); ``live``: ``[N]`` bool, False rows read as zero logits.
      cw: ``[K]`` class weights or None. ``scalars``: a pytree of scalars for the maps
        and the power.
      smoothing: also compute the label-smoothing sums. ``power``: None, or a function
        of ``scalars`` giving ``a`` for ``sum_k w_k exp(a (x_k - m))``. ``powers``: a
        static ``n >= 0``; for ``j = 1..n`` also ``sum_k w_k exp(j (x_k - m))`` and
        ``sum_k w_k (x_k - m) exp(j (x_k - m))`` (focal's whole powers).

    Returns:
      ``(m, se, x_y, ks, ws, wd, wpa, e, f)``, each ``[N]`` in the accumulation dtype
      (None where not asked; ``e`` and ``f`` tuples of ``n``): ``m`` the shift, the max
      of ``pre(z)`` (0 where not finite), ``se = sum exp(d)``, ``x_y`` the label's
      ``pre(z)``, ``ks`` the support size (``x > -inf``, NaN for a NaN logit),
      ``ws = sum_S w``, ``wd = sum_S w d``, ``wpa = sum w exp(a d)``,
      ``e[j - 1] = sum w exp(j d)``, ``f[j - 1] = sum_S w d exp(j d)``.
    """
    n, k = z.shape
    pre, post = maps
    acc = jax.eval_shape(pre, jax.ShapeDtypeStruct((1, 1), z.dtype), scalars)
    acc = acc.dtype
    vector, unpack = _pack(scalars, acc)
    weighted = cw is not None
    names = ["m", "se", "x_y"] + (["ks", "ws", "wd"] if smoothing else [])
    names += ["wpa"] if power is not None else []
    names += [f"{s}{j}" for j in range(1, powers + 1) for s in "ef"]

    def kernel(scalar_ref, z_ref, y_ref, live_ref, *refs):
        cw_ref = refs[0] if weighted else None
        out_refs = dict(zip(names, refs[int(weighted) :], strict=True))
        values = unpack(scalar_ref)
        a = None if power is None else power(values)
        label, keep = y_ref[...], live_ref[...]
        zero = jnp.zeros((1,), acc)

        def step(start, width, covered, carry):
            zb = z_ref[:, pl.ds(start, width)]
            zb = jnp.where(keep[:, None], zb, jnp.zeros((), zb.dtype))
            x = pre(zb, values)
            cols = start + lax.broadcasted_iota(jnp.int32, x.shape, 1)
            w = cw_ref[pl.ds(start, width)][None, :] if weighted else None
            hit = cols == label[:, None]
            if covered is not None:  # the tail: a class counted before reads masked
                fresh = cols >= covered
                x = jnp.where(fresh, x, -jnp.inf)
                hit = hit & fresh
            m = jnp.maximum(carry["m"], jnp.max(x, axis=1))
            old, new = carry["shift"], jnp.where(jnp.isfinite(m), m, 0)
            d = post(x - new[:, None], values)
            step_d = post(old - new, values)  # d moves by this where the shift moves
            ex, grow = jnp.exp(d), jnp.exp(step_d)
            dw = _xla.OPS.zero_neg_inf(d)
            out = dict(m=m, shift=new)
            out["se"] = _rescaled(carry["se"], grow) + jnp.sum(ex, axis=1)
            out["x_y"] = carry["x_y"] + jnp.sum(jnp.where(hit, x, 0), axis=1)
            if smoothing:
                on = _xla.OPS.support(d)  # a d of -inf is off the support
                out["ks"] = carry["ks"] + jnp.sum(on, axis=1)
                ws = jnp.sum(on if w is None else on * w, axis=1)
                # sum_S w (x - m): the sum so far moves with the shift, by its weight.
                moved = jnp.where(
                    carry["ws"] > 0,
                    carry["wd"] + step_d * carry["ws"],
                    carry["wd"],
                )
                out["wd"] = moved + jnp.sum(dw if w is None else dw * w, axis=1)
                out["ws"] = carry["ws"] + ws
            if power is not None:
                e = jnp.exp(a * d)
                out["wpa"] = _rescaled(carry["wpa"], jnp.exp(a * step_d)) + (
                    jnp.sum(e if w is None else e * w, axis=1)
                )
            e, factor = ex, grow  # e^{j d} and e^{j (old - new)}, by products
            for j in range(1, powers + 1):
                if j > 1:
                    e, factor = e * ex, factor * grow
                ed = e * dw
                # sum w d e^{j d} moves with the shift by step_d times the matching
                # sum of e^{j d}, and both scale by e^{j step_d}.
                e_old, f_old = carry[f"e{j}"], carry[f"f{j}"]
                moved = jnp.where(e_old != 0, f_old + step_d * e_old, f_old)
                out[f"f{j}"] = _rescaled(moved, factor) + jnp.sum(
                    ed if w is None else ed * w, axis=1
                )
                out[f"e{j}"] = _rescaled(e_old, factor) + jnp.sum(
                    e if w is None else e * w, axis=1
                )
            return out

        init = {name: zero for name in names}
        init["m"] = jnp.full((1,), -jnp.inf, acc)
        init["shift"] = zero
        final = _walk(k, step, init)
        final["m"] = final["shift"]
        for name in names:
            out_refs[name][...] = final[name]

    row = _spec((1,), lambda i: (i,))
    in_specs = [
        _spec(vector.shape, lambda i: (0,)),
        _spec((1, k), lambda i: (i, 0)),
        row,
        row,
    ] + ([_spec((k,), lambda i: (0,))] if weighted else [])
    args = [vector, z, y.astype(jnp.int32), live] + ([cw] if weighted else [])
    results = _call(
        kernel,
        (n,),
        in_specs,
        [row] * len(names),
        [jax.ShapeDtypeStruct((n,), acc)] * len(names),
        args,
    )
    found = dict(zip(names, results, strict=True))
    e, f = (
        tuple(found[f"{s}{j}"] for j in range(1, powers + 1)) if powers else None
        for s in "ef"
    )
    return tuple(
        found.get(name) for name in ("m", "se", "x_y", "ks", "ws", "wd", "wpa")
    ) + (e, f)


def column_map(fun, z, y, rows, cols, scalars, dtype):
    """``fun`` applied block by block along each row of ``z`` ``[N, K]``, in one read of
    ``z`` and one write of the result.

    ``fun(z_block, y_block, rows_block, cols_block, scalars)`` gets a ``[1, B]`` block
    of classes ``[s, s + B)``, the labels shifted by ``-s``, the row's slice of the
    pytree ``rows`` (leaves ``[N]``), the block of the pytree ``cols`` (leaves ``[K]``)
    and ``scalars`` (a pytree of scalars); it returns the ``[1, B]`` block of the
    result, of dtype ``dtype``.
    """
    n, k = z.shape
    row_leaves, row_def = jax.tree.flatten(rows)
    col_leaves, col_def = jax.tree.flatten(cols)
    acc = jnp.result_type(*row_leaves) if row_leaves else jnp.float32
    vector, unpack = _pack(scalars, acc)
    n_rows, n_cols = len(row_leaves), len(col_leaves)

    def kernel(scalar_ref, z_ref, y_ref, *refs):
        row_refs, col_refs = refs[:n_rows], refs[n_rows : n_rows + n_cols]
        out_ref = refs[-1]
        values = unpack(scalar_ref)
        row_block = jax.tree.unflatten(row_def, [r[...] for r in row_refs])
        label = y_ref[...]

        # The tail rewrites the classes it shares with the last aligned block with the
        # same values (``fun`` maps each class on its own).
        def step(start, width, covered, carry):
            del covered
            cols_block = jax.tree.unflatten(
                col_def, [r[pl.ds(start, width)] for r in col_refs]
            )
            out = fun(
                z_ref[:, pl.ds(start, width)],
                label - start,
                row_block,
                cols_block,
                values,
            )
            out_ref[:, pl.ds(start, width)] = out.astype(dtype)
            return carry

        _walk(k, step, 0)

    row = _spec((1,), lambda i: (i,))
    in_specs = (
        [_spec(vector.shape, lambda i: (0,)), _spec((1, k), lambda i: (i, 0)), row]
        + [row] * n_rows
        + [_spec((k,), lambda i: (0,))] * n_cols
    )
    return _call(
        kernel,
        (n,),
        in_specs,
        _spec((1, k), lambda i: (i, 0)),
        jax.ShapeDtypeStruct((n, k), dtype),
        [vector, z, y.astype(jnp.int32), *row_leaves, *col_leaves],
    )
