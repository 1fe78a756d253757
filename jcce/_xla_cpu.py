"""The ``"xla_cpu"`` implementation: how jcce lays out its work for XLA:CPU.

Everything here was chosen by measurement on a two-core x86-64 CPU (see the docs'
performance pages) and is wrong, or pointless, on an accelerator, which uses
:mod:`jcce._xla`. The numbers are those of :mod:`jcce._kernel`; only the layout differs:

* Row reductions over more than ``_ROW_CHUNK`` classes are split into chunks (YNNPACK
  reduces long rows about 5x slower), behind an optimization barrier; a class count
  with no such tiling (a prime) is reduced in padded windows (``lax.reduce_window``).
* Reductions that would share a ``[..., K]`` subexpression get distinct chunk layouts,
  so XLA cannot CSE them into one materialized temporary.
* ``-inf`` tests are arithmetic (no compare or select), which XLA:CPU fuses into its
  reductions; bfloat16 is widened and gathered through its bit pattern, so the convert
  cannot be hoisted and shared.
* Masked examples' logits are read as they are and those rows' results replaced after
  the forward's reductions (``late_row_mask``): YNNPACK's reductions take no select.
* Label smoothing's gradient drops its support masks where every row's support is
  full (:func:`_full_support`, a ``lax.cond``).
* The backward writes the label entries with a scatter for 32/64-bit logits.
* Probability targets that are a constant of the program pass an optimization
  barrier for the nonlinear objectives (:func:`_pin_targets`): XLA:CPU's YNNPACK
  fusions computed their sums wrongly where ``vmap`` broadcast them.
* Up to ``_KEEP_EXPONENTIALS`` classes, 32/64-bit logits: the VJP saves ``exp(x - m)``
  from the forward (as optax saves its softmax) rather than computing it twice.
* The fused linear loss runs its gradient matmuls in float32 over cache-sized chunks of
  the vocabulary (:func:`linear_plan`).
* Focal label smoothing with a whole gamma (``2 gamma + 2`` sums in the forward) takes
  its forward sums a cache-sized block of rows at a time (:func:`_row_sums`), so the
  maps and exponentials are computed once per logit rather than once per reduction.
* Probability targets with a nonlinear objective take their target sums a block of
  rows at a time too (:func:`_by_rows`), so XLA cannot share their ``[N, K]`` terms
  with the gradient's loop (it kept up to six float32 copies of the logits).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jcce import _backend
from jcce._backend import LinearPlan, Ops, rows_within

# XLA:CPU (YNNPACK) reduces rows longer than ~32k elements about 5x slower; reductions
# over the class axis are split into chunks of at most this many classes when K allows.
_ROW_CHUNK = 8192
# Chunks narrower than this cost more than the long row they split: K = 32002 = 2 x
# 16001 in 16001 chunks of 2 classes took value_and_grad at [256, K] from 7 to 42 ms.
_MIN_CHUNK = 1024


def _n_chunks(k: int) -> int:
    """The fewest equal chunks of ``_MIN_CHUNK`` to ``_ROW_CHUNK`` classes that tile
    ``k``; 1 for ``k <= _ROW_CHUNK`` (the row whole) or where no such tiling exists
    (``k`` prime, or a small multiple of a large prime, above ``_ROW_CHUNK``: then
    :func:`_windowed` reduces the row)."""
    if k <= _ROW_CHUNK:
        return 1
    for n in range(-(-k // _ROW_CHUNK), k // _MIN_CHUNK + 1):
        if k % n == 0:
            return n
    return 1


def _untiled(k: int) -> bool:
    """Whether a row of ``k`` classes is too long to reduce whole and has no tiling."""
    return k > _ROW_CHUNK and _n_chunks(k) == 1


# The reductions the kernel hands _row_reduce, as (monoid, identity) for
# lax.reduce_window.
_MONOIDS = {jnp.sum: (lax.add, 0.0), jnp.max: (lax.max, -jnp.inf)}


def _windowed(reduce, v):
    """``reduce(v, axis=-1)`` for a row with no tiling (:func:`_untiled`): a
    ``lax.reduce_window`` over windows of ``_ROW_CHUNK`` classes, the last one padded
    with the reduction's identity (no copy: the padding is virtual), then the windows.
    Whole-row, the sum of exponentials at [256, 100277] took 46 ms, in windows 8 ms; a
    slice of the remainder is copied by XLA:CPU (a [N, K] temp)."""
    op, identity = _MONOIDS[reduce]
    k, ones = v.shape[-1], (1,) * (v.ndim - 1)
    window = ones + (_ROW_CHUNK,)
    padding = ((0, 0),) * (v.ndim - 1) + ((0, -k % _ROW_CHUNK),)
    # A NumPy scalar, concrete under tracing: lax.reduce_window then takes the sum's
    # or the max's own primitive, which JAX differentiates (a traced init takes the
    # generic one, which it does not).
    init = np.asarray(identity, v.dtype)
    return reduce(lax.reduce_window(v, init, op, window, window, padding), axis=-1)


def _pin(x):
    """``x`` behind an optimization barrier (free for an input; removed after fusion),
    so XLA cannot move the chunking reshape below the elementwise ops that follow:
    YNNPACK runs elementwise ops computed on the unchunked shape several times slower."""
    return lax.optimization_barrier(x)


def _row_reduce(reduce, x, elementwise=None, row=None, layout=None, col=None):
    """``reduce(elementwise(x, row), axis=-1)`` with the class axis split into
    ``_n_chunks(K)`` chunks, then the chunks reduced again; ``row`` is a per-example
    operand broadcast along the classes (and along the chunks).

    With ``layout`` (0, 1, 2, ...) the class axis is split into ``nb * 2**layout`` chunks
    (twice as many if ``nb == 1``, when ``K`` allows) and :func:`_pin`-ned before
    ``elementwise``: reductions with different layouts have different shapes, so they
    share no ``[..., K]``-sized subexpression (XLA would CSE it and materialize it),
    with each other or with the backward's ``[*batch, K]`` ops. ``col`` (``[K]``, with
    ``layout``) multiplies the elementwise result per class."""
    lead = x.shape[:-1]
    nb = _n_chunks(x.shape[-1])
    if _untiled(x.shape[-1]):
        return _windowed_row_reduce(reduce, x, elementwise, row, layout, col)
    if layout is not None:
        n = nb * 2 ** (layout + (nb == 1))
        nb = n if x.shape[-1] % n == 0 else nb
        width = x.shape[-1] // nb
        if col is not None:
            # Chunks as an axis of their own, so the class weights broadcast along the
            # rows only: as [rows * chunks, width] against a broadcast [rows * chunks,
            # width] copy of them, YNNPACK ran the reduction about 8x slower.
            v = _pin(x.reshape(-1, nb, width))
            if elementwise is not None:
                v = elementwise(v, jax.tree.map(lambda r: r.reshape(-1, 1, 1), row))
            v = v * col.reshape(1, nb, width)
            return reduce(reduce(v, axis=-1), axis=-1).reshape(lead)
        v = _pin(x.reshape(-1, width))
        if elementwise is not None:
            v = elementwise(v, _per_chunk(row, lead, nb))
        if col is not None:
            cols = jnp.broadcast_to(col.reshape(nb, width), lead + (nb, width))
            v = v * cols.reshape(-1, width)
        return reduce(reduce(v, axis=-1).reshape(lead + (nb,)), axis=-1)
    if nb == 1:
        v = (
            x
            if elementwise is None
            else elementwise(x, jax.tree.map(lambda r: r[..., None], row))
        )
        return reduce(v, axis=-1)
    v = x.reshape(-1, x.shape[-1] // nb)
    if elementwise is not None:
        v = elementwise(v, _per_chunk(row, lead, nb))
    return reduce(reduce(v, axis=-1).reshape(lead + (nb,)), axis=-1)


def _windowed_row_reduce(reduce, x, elementwise, row, layout, col):
    """:func:`_row_reduce` for a row with no tiling: the class axis in windows
    (:func:`_windowed`). With ``layout``, ``x`` is :func:`_pin`-ned with ``layout + 1``
    unit axes before the classes, so reductions of different layouts share no
    ``[..., K]`` subexpression."""
    lead, k = x.shape[:-1], x.shape[-1]
    units = (1,) * (0 if layout is None else layout + 1)
    v = x.reshape((-1,) + units + (k,))
    if layout is not None:
        v = _pin(v)
    if elementwise is not None:
        v = elementwise(v, jax.tree.map(lambda r: r.reshape((-1,) + units + (1,)), row))
    if col is not None:
        v = v * col.reshape((1,) + units + (k,))
    return _windowed(reduce, v).reshape(lead)


def _pin_targets(t):
    """Constant probability targets behind an optimization barrier (the kernel calls
    this only for those, and only with a nonlinear objective: ``_kernel._pinned``).
    Closed over by a jitted ``vmap(grad(...))`` they are an HLO constant broadcast along
    the mapped axis, and jaxlib 0.10.2's YNNPACK fusion of the backward's sum of the
    targets times a function of the logits was wrong by 3% to 10% of the gradient's
    scale with generalized(0.5) and a soft-cap, from 8,193 classes up. Barriers on
    every probability target cost one ``[N, K]`` copy of targets computed in the
    program, hence the restriction to constants."""
    return lax.optimization_barrier(t)


# The fewest classes for which _by_rows takes blocks of rows (below, one call).
_BY_ROWS_MIN_CLASSES = 64


def _by_rows(fun, *arrays):
    """``fun(*arrays)``, a function of each row of its ``[..., K]`` and ``[...]``
    operands with per-row results, taken a cache-sized block of rows at a time
    (``lax.map``) from ``_BY_ROWS_MIN_CLASSES`` classes up.

    The kernel gives it the target sums of probability targets with a nonlinear
    objective, ``sum_k w_k t_k phi(l_k)`` and ``sum_k w_k t_k phi'(l_k)``: computed on
    the whole batch, XLA:CPU shared their ``[N, K]`` subexpressions with the
    backward's gradient and kept up to six ``[N, K]`` float32 copies of them; inside
    the loop nothing is shared and the scratch is a few blocks. ``value_and_grad``
    of the mean, probability targets, against the unblocked sums on the Intel host
    (min of 9, interleaved; docs/performance.md): 0.50 to 0.89 of the time at
    [2048, 32768], 0.34 to 1.02 at [65536, 64] to [8192, 1000], 0.89 to 1.10 at
    [256, 4096]; at [65536, 10] and [4096, 10] the loop cost 1.1 to 2.1 times the
    unblocked sums, hence the threshold."""
    lead, k = arrays[0].shape[:-1], arrays[0].shape[-1]
    if k < _BY_ROWS_MIN_CLASSES:
        return fun(*arrays)
    n = math.prod(lead)
    rows = min(rows_within(_BLOCK_BYTES, k, n), max(1, n // 8))
    flat = [a.reshape((n,) + a.shape[len(lead) :]) for a in arrays]
    out = lax.map(lambda args: fun(*args), tuple(flat), batch_size=rows)
    return jax.tree.map(lambda v: v.reshape(lead), out)


def _per_chunk(row, lead, nb):
    """The per-example operand(s) ``row`` (an array or a tuple) as a column of the
    ``[rows * nb, width]`` chunks."""
    return jax.tree.map(
        lambda r: jnp.broadcast_to(r[..., None], lead + (nb,)).reshape(-1, 1), row
    )


def _sum_exp(x, m):
    """``sum_k exp(x_k - m)``, fused by XLA:CPU into one pass over ``x`` (no temp).

    Written ``x + (-m)``: the backward's ``x - m`` would otherwise be CSE'd with this one
    and the shared ``[..., K]`` difference materialized."""
    return _row_reduce(jnp.sum, x, lambda v, neg: jnp.exp(v + neg), -m)


@jax.custom_jvp
def _widen(z):
    """Exact bfloat16 -> float32 by bit operations, so XLA cannot CSE it with the
    forward's ``convert`` (a shared convert is materialized as an f32 ``[..., K]`` temp)."""
    bits = lax.bitcast_convert_type(z, jnp.uint16).astype(jnp.uint32) << 16
    return lax.bitcast_convert_type(bits, jnp.float32)


@_widen.defjvp
def _widen_jvp(primals, tangents):
    return _widen(primals[0]), tangents[0].astype(jnp.float32)


@jax.custom_jvp
def _take_label(z, yc):
    """``take_along_axis(z, yc[..., None], -1)``; for 16-bit floats on the bit patterns,
    so XLA cannot hoist the float32 convert of ``z`` above the gather and share it."""
    if jnp.dtype(z.dtype).itemsize == 2:
        bits = lax.bitcast_convert_type(z, jnp.uint16)
        taken = jnp.take_along_axis(bits, yc[..., None], axis=-1)
        return lax.bitcast_convert_type(taken, z.dtype)
    return jnp.take_along_axis(z, yc[..., None], axis=-1)


@_take_label.defjvp
def _take_label_jvp(primals, tangents):
    z, yc = primals
    return _take_label(z, yc), jnp.take_along_axis(tangents[0], yc[..., None], axis=-1)


def _support(x):
    """``x > -inf`` as exactly 0 or 1 (NaN stays NaN) from arithmetic that XLA:CPU's
    reductions fuse (no compare or select): ``x / 2 >= -F / 2`` unless ``x = -inf``, so
    the sign of ``max(x / 2, -F) + 3F / 4`` is ``-1`` exactly for ``-inf``."""
    big = jnp.finfo(x.dtype).max
    return 0.5 * jnp.sign(jnp.maximum(x * 0.5, -big) + 0.75 * big) + 0.5


@jax.custom_jvp
def _zero_neg_inf(u):
    """``u`` with ``-inf`` replaced by exactly 0, by arithmetic (no compare or select):
    with ``c = max(u, -F)``, ``-inf -> -F + 1 F`` and a finite ``u -> u + 0 F``.

    Its derivative is given directly: autodiff of the formula would add and subtract
    ``F`` times the tangent and lose it to rounding."""
    big = jnp.finfo(u.dtype).max
    c = jnp.maximum(u, -big)
    return c + jnp.minimum(c - u, 1) * big


@_zero_neg_inf.defjvp
def _zero_neg_inf_jvp(primals, tangents):
    (u,), (du,) = primals, tangents
    return _zero_neg_inf(u), jnp.where(u > -jnp.inf, du, jnp.zeros((), du.dtype))


# The most classes for which the cross-entropy's VJP saves the exponentials, by the
# logits' item size. At small K an exp costs XLA:CPU more than a pass over memory does,
# so computing it twice made jcce 1.1-1.3x optax's time (optax saves its softmax) for
# float32 at K = 10 to 1000, and 1.2-2.1x for 16-bit logits at K <= 10. Above these
# the recomputing layout is at or below optax's time (tests/test_backends.py names the
# measurement), and the saved [N, K] array is no longer small next to the activations.
_KEEP_EXPONENTIALS = {2: 64, 4: 2048, 8: 2048}


def _keeps_exponentials(num_classes, dtype):
    return num_classes <= _KEEP_EXPONENTIALS[jnp.dtype(dtype).itemsize]


def _support_sums(exact, unmasked, k):
    """One pass where the batch has no ``-inf`` (nor NaN) logit: the unmasked sum of
    ``w d`` is then the masked one and ``K_S = k``; a non-finite sum anywhere in the
    batch (a ``-inf`` class, NaN, overflow) takes the two exact reductions instead.
    XLA:CPU runs each reduction as its own pass over the logits, so the common case
    saves one of label smoothing's two extra passes (a ``lax.cond``; under ``vmap`` it
    becomes a select and both run)."""
    wd = unmasked()
    fast = (jnp.full_like(wd, k), wd)
    return _backend.cond(jnp.all(jnp.isfinite(wd)), lambda: fast, exact)


def _full_support(full, exact, ks, k):
    """``full()`` where every row's support is all ``k`` classes (no ``-inf`` and no
    NaN mapped logit: its masks drop out of the gradient pass), else ``exact()``.
    XLA:CPU compiles each gradient fusion to a loop that LLVM interleaves only while
    its body is small; the masks push label smoothing's loop past that (1.5x plain,
    1.1x without). A ``lax.cond``: under ``vmap`` a select that runs both."""
    if k >= 2**24:  # K_S would round in float32
        return exact()
    return _backend.cond(jnp.all(ks == k), full, exact)


# The fused linear loss.


def default_block_size(num_tokens: int, vocab: int, hidden: int, dtype) -> int:
    """Tokens per block: ``B V`` float32 logits near 32 MiB, and at least 128 tokens
    (smaller blocks starve the matmuls), never more than the tokens rounded up to 8."""
    del hidden, dtype  # the logits block is float32 whatever the inputs' dtype
    target = (32 * 2**20) // (4 * max(vocab, 1))
    block = 128
    while block * 2 <= target:
        block *= 2
    return max(8, min(block, -(-num_tokens // 8) * 8))


def vocab_chunk(vocab: int, hidden: int, nbytes: int) -> int:
    """Classes per chunk such that a float32 ``[chunk, D]`` slice of the classifier (or of
    its gradient) takes about ``nbytes``: at least 512, at most ``vocab``."""
    chunk = 512
    while chunk * 2 * max(hidden, 1) * 4 <= nbytes:
        chunk *= 2
    return min(chunk, vocab)


def lean_classes(num_tokens: int, vocab: int, hidden: int) -> int:
    """Classes per step of the lean class sweep: the chunk's ``[N, chunk]`` float32
    logits and its ``[chunk, D]`` float32 classifier gradient near 32 MiB, at least
    128 classes, at most ``vocab``."""
    chunk = 128
    while chunk * 2 * max(num_tokens + hidden, 1) * 4 <= 32 * 2**20:
        chunk *= 2
    return min(chunk, vocab)


def linear_plan(num_tokens, vocab, hidden, dtype, acc, block_size, lean) -> LinearPlan:
    """XLA:CPU runs 16-bit matmuls with float32 results more slowly than float32 ones, so
    16-bit operands are widened a chunk of classes at a time (logits from widened
    slices near 16 MiB); the gradient products go over float32 ``[chunk, D]`` slices
    near 4 MiB (tuned on a machine with 1 MiB of L2 per core and 32 MiB of L3), added
    to the classifier's gradient while they are still in cache. The lean mode's class
    sweep takes ``[N, chunk]`` logits near 32 MiB (:func:`lean_classes`)."""
    narrow = jnp.dtype(dtype).itemsize < jnp.dtype(acc).itemsize
    return LinearPlan(
        block=block_size or default_block_size(num_tokens, vocab, hidden, dtype),
        widen=narrow,
        logits_chunk=vocab_chunk(vocab, hidden, 16 * 2**20) if narrow else vocab,
        grad_chunk=vocab_chunk(vocab, hidden, 4 * 2**20),
        lean_classes=lean_classes(num_tokens, vocab, hidden),
    )


@partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def widened_slice(x, start, size, axis, dtype):
    """``dynamic_slice_in_dim(x, start, size, axis).astype(dtype)`` for a 16-bit ``x``,
    sliced as raw 16-bit words: sliced as floats inside a loop, XLA:CPU widens the
    whole of ``x`` to float32 before the loop (a float32 copy of the classifier)."""
    bits = lax.bitcast_convert_type(x, jnp.uint16)
    part = lax.dynamic_slice_in_dim(bits, start, size, axis)
    return lax.bitcast_convert_type(part, x.dtype).astype(dtype)


@widened_slice.defjvp
def _widened_slice_jvp(size, axis, dtype, primals, tangents):
    # The bits carry no tangent; the slice is linear in x, so its tangent is the slice
    # of x's tangent (forward-over-reverse derivatives of the gradient sweep).
    x, start = primals
    x_dot, _ = tangents
    out = widened_slice(x, start, size, axis, dtype)
    return out, lax.dynamic_slice_in_dim(x_dot, start, size, axis).astype(dtype)


def cluster_rows(num_rows: int, classes: int) -> int:
    """Rows per block of a row-gathered softmax (an adaptive-softmax cluster): float32
    logits near 64 MiB. Measured at 4096 Zipfian labels, D = 128, cutoffs 2^14 and
    2^17 of 2^20 classes: 16-row blocks of the last cluster (58 MiB) took 3.4 s a step,
    64-row blocks 4.0 s, 256-row blocks 4.8 s."""
    return rows_within(64 * 2**20, classes, num_rows)


# The forward's reductions, a block of rows at a time.

# Bytes of one block's float32 mapped logits: blocks this small stay in the cache while
# every reduction of the forward reads them.
_BLOCK_BYTES = 1 * 2**20


def _row_sums(maps, z, y, live, cw, scalars, *, smoothing, power, powers=0):
    """:func:`jcce._pallas.row_sums` (same arguments, same results) as a loop over
    blocks of rows: each block's logits are mapped once (a soft-cap's ``tanh`` and the
    exponentials computed once) into a cache-sized temporary that every sum then reads,
    where the unblocked layout recomputes the maps and exponentials in each of its
    reductions.

    With label smoothing, the blocks first take the sums as if every mapped logit were
    finite (support size ``K``, ``sum_S w = sum w``, no ``-inf`` to zero: two sums per
    block fewer); a row where that is not so (a ``-inf`` class, NaN, overflow) has a
    sum ``sum_k w_k d_k`` that is not finite, and then the whole batch takes the exact
    sums in a second walk (a ``lax.cond``; under ``vmap`` both run)."""
    walk = partial(
        _blocked_sums, maps, z, y, live, cw, scalars, power=power, powers=powers
    )
    if not smoothing:
        return walk(smoothing=False)
    fast = walk(smoothing=True, finite=True)
    wd = fast[_SUMS.index("wd")]
    return _backend.cond(
        jnp.all(jnp.isfinite(wd)), lambda: fast, lambda: walk(smoothing=True)
    )


# The names of the per-row sums, in the order row_sums returns them (then e and f).
_SUMS = ("m", "se", "x_y", "ks", "ws", "wd", "wpa")


def _blocked_sums(
    maps, z, y, live, cw, scalars, *, smoothing, power, powers, finite=False
):
    """The walk of :func:`_row_sums`; with ``finite`` it takes the smoothing sums as
    if every mapped logit were finite."""
    n, k = z.shape
    # At most an eighth of the batch a block: the temporaries stay far below [N, K].
    rows = min(rows_within(_BLOCK_BYTES, k, n), max(1, n // 8))
    chunks = _n_chunks(k)

    def total(v):  # a row's sum, its classes in chunks of <= _ROW_CHUNK
        return jnp.sum(jnp.sum(v.reshape(chunks, -1), axis=-1))

    def weighted(v):
        if cw is None:
            return total(v)
        # A matrix-vector product over the block's rows: as a reduction of v * cw, the
        # weights were broadcast to a [rows, K] copy each block, which YNNPACK then
        # read beside v (every transform's value_and_grad: 669 -> 599 ms).
        return jnp.dot(v, cw.astype(v.dtype), precision=lax.Precision.HIGHEST)

    def one(zr, yr, keep):
        zr = jnp.where(keep, zr, jnp.zeros((), zr.dtype))
        pre, post = maps
        x = pre(zr, scalars)
        m = jnp.max(x)
        m = jnp.where(jnp.isfinite(m), m, jnp.zeros((), m.dtype))
        d = post(x - m, scalars)
        e = jnp.exp(d)
        out = {"m": m, "se": total(e)}
        # The label's logit (before the shift) by index (a gather), not a masked sum over the
        # block (which cost a pass over it); 0 for a label out of range.
        inside = (yr >= 0) & (yr < k)
        out["x_y"] = jnp.where(inside, x[jnp.clip(yr, 0, k - 1)], 0)
        dw = d if finite else _zero_neg_inf(d)
        if smoothing:
            out["wd"] = weighted(dw)
        if smoothing and not finite:
            on = _support(d)  # a d of -inf is off the support (see _support_size)
            out["ks"], out["ws"] = total(on), weighted(on)
        if power is not None:
            out["wpa"] = weighted(jnp.exp(power(scalars) * d))
        e_j, es, fs = e, [], []
        for _ in range(powers):
            es.append(weighted(e_j))
            fs.append(weighted(e_j * dw))
            e_j = e_j * e
        return out, tuple(es), tuple(fs)

    out, es, fs = lax.map(
        lambda a: one(*a), (z, y.astype(jnp.int32), live), batch_size=rows
    )
    if finite:  # every class in the support: its size and weight are the totals
        acc = out["se"].dtype
        ones = jnp.ones((k,), acc)
        out["ks"] = jnp.broadcast_to(total(ones), (n,))
        out["ws"] = jnp.broadcast_to(weighted(ones), (n,))
    return tuple(out.get(name) for name in _SUMS) + (
        es or None,
        fs or None,
    )


# XLA:CPU runs reductions as YNNPACK fusions, which take no select: masked logits,
# where(live, z, 0), would be written out as an [N, K] array before the forward's
# reductions read them (once per layout), so the forward reads the raw logits and
# replaces the masked rows' results (jcce._kernel._late_masked_forward).
OPS = Ops.collect("xla_cpu", globals(), scatter_labels=True, late_row_mask=True)
