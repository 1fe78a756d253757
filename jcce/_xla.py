"""The ``"xla"`` implementation: the portable path, written for accelerators.

On a GPU or TPU the arithmetic of a loss is free next to its memory traffic, and XLA
fuses plain reductions and elementwise code into few passes over the logits. So this
path is the kernel's math written plainly: whole-row reductions, compares and selects,
ordinary converts and gathers, a one-hot compare for the label entries. The fused
linear loss keeps 16-bit operands in 16-bit matmuls with float32 results and sizes its
token blocks from a memory budget (:func:`linear_plan`), never from a CPU cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jcce._backend import LinearPlan, Ops, rows_within

# Bytes of one token block's float32 logits in the fused linear loss: large enough that
# the block's matmuls fill an accelerator (a handful of blocks at N = 8192, V = 131072),
# small next to an accelerator's memory and next to the float32 [V, D] gradient carry.
LOGITS_BUDGET = 512 * 2**20
# The lean mode's budget, for a token block's logits and for the class sweep's
# [N, chunk] logits alike: with their gradients and the float32 [N, D] embedding
# gradient, a few hundred MiB where the default holds the float32 [V, D] carry.
LEAN_BUDGET = 128 * 2**20


def _row_reduce(reduce, x, elementwise=None, row=None, layout=None, col=None):
    del layout  # an XLA:CPU concern
    v = x if elementwise is None else elementwise(x, _per_class(row))
    if col is not None:
        v = v * col.reshape((1,) * (v.ndim - 1) + col.shape)
    return reduce(v, axis=-1)


def _per_class(row):
    """The per-example operand(s) ``row`` (an array or a tuple), broadcast along the
    classes."""
    return jax.tree.map(lambda r: r[..., None], row)


def _sum_exp(x, m):
    return jnp.sum(jnp.exp(x - m[..., None]), axis=-1)


def _widen(z):
    return z.astype(jnp.float32)


def _take_label(z, yc):
    return jnp.take_along_axis(z, yc[..., None], axis=-1)


def _support(x):
    # 0 or 1; NaN stays NaN (as the XLA:CPU arithmetic gives it).
    return jnp.where(jnp.isnan(x), x, (x > -jnp.inf).astype(x.dtype))


def _zero_neg_inf(u):
    return jnp.where(u > -jnp.inf, u, jnp.zeros((), u.dtype))


def _keeps_exponentials(num_classes, dtype):
    # Memory traffic is what costs here: reading the logits again is cheaper than
    # writing a saved array and reading it back.
    del num_classes, dtype
    return False


def _support_sums(exact, unmasked, k):
    # The count and the masked sum fuse into the pass that reads the logits anyway.
    del unmasked, k
    return exact()


def _full_support(full, exact, ks, k):
    # The masks are free next to the memory traffic on an accelerator: one program.
    del full, ks, k
    return exact()


# XLA fuses sibling reductions into one pass on an accelerator: no blocks of rows.
_row_sums = None


def _pin_targets(t):
    return t


def _by_rows(fun, *arrays):
    """``fun(*arrays)`` in one call: an accelerator fuses its per-row sums into the
    pass that reads the logits."""
    return fun(*arrays)


# A select fuses into an accelerator's reductions: mask the logits first.
OPS = Ops.collect("xla", globals(), scatter_labels=False, late_row_mask=False)


def _fit(budget: int, row: int, floor: int) -> int:
    """The largest power of two ``n >= floor`` with ``n * row`` float32s within
    ``budget`` bytes (``floor`` if none)."""
    n = floor
    while n * 2 * max(row, 1) * 4 <= budget:
        n *= 2
    return n


def default_block_size(num_tokens: int, vocab: int, lean: bool = False) -> int:
    """Tokens per block: the largest power of two (at least 128) whose float32 logits
    fit :data:`LOGITS_BUDGET` (:data:`LEAN_BUDGET` when lean), never more than the
    tokens rounded up to 8."""
    block = _fit(LEAN_BUDGET if lean else LOGITS_BUDGET, vocab, 128)
    return max(8, min(block, -(-num_tokens // 8) * 8))


def linear_plan(num_tokens, vocab, hidden, dtype, acc, block_size, lean) -> LinearPlan:
    """Whole-vocabulary matmuls on the inputs' dtype (float32 results), token blocks
    from :data:`LOGITS_BUDGET`; lean: blocks and class chunks from
    :data:`LEAN_BUDGET`."""
    del dtype, acc
    return LinearPlan(
        block=block_size or default_block_size(num_tokens, vocab, lean),
        widen=False,
        logits_chunk=vocab,
        grad_chunk=vocab,
        lean_classes=lean_classes(num_tokens, vocab, hidden),
    )


def lean_classes(num_tokens: int, vocab: int, hidden: int) -> int:
    """Classes per step of the lean class sweep: the chunk's ``[N, chunk]`` float32
    logits and its ``[chunk, D]`` float32 classifier gradient within
    :data:`LEAN_BUDGET`, at least 128 classes, at most ``vocab``."""
    return min(vocab, _fit(LEAN_BUDGET, num_tokens + hidden, 128))


def cluster_rows(num_rows: int, classes: int) -> int:
    """Rows per block of a row-gathered softmax (an adaptive-softmax cluster): the
    block's float32 logits within :data:`LOGITS_BUDGET`, as the linear loss's blocks."""
    return rows_within(LOGITS_BUDGET, classes, num_rows)
