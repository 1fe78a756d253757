"""How often the compiled loss-and-gradient reads ``[N, K]`` data, and its scratch memory,
on the ``"xla_cpu"`` implementation (every count here is an XLA:CPU fact; the layout
tricks of ``jcce._xla_cpu`` exist to reach them).

"A chain configures the kernel; it never adds a pass over the logits" is checked on the
optimized HLO of ``jax.jit(jax.value_and_grad(loss))``: a *read* is an instruction of
the entry computation (a fusion, a scatter, ...) with an ``[N, K]`` operand, the logits
or any ``[N, K]`` value computed from them, so materializing an intermediate (written
once, then read) counts against the chain. The plain loss reads ``[N, K]`` data five
times on XLA:CPU: the max, the sum of exponentials, the label gather, the gradient and
the scatter of the label entries (a soft-cap that fits float32's exponent range, with
class indices, is the shift itself: no max, four). A conditional counts the reads of
its costliest branch (the worst case) unless a test asks for the cheapest; the blocked
sums' ``while`` loops (``jcce._xla_cpu._row_sums``) are not looked into, so chains
that take them are counted without those sums. ``temp`` is XLA's compiled scratch
memory; no configuration may need an ``[N, K]`` buffer there.

Label smoothing is the documented exception: its uniform term needs the support size and
the sum of the logits over the support, each one cheap reduction on XLA:CPU (whose
reductions take one operand and cannot share a pass), so it adds at most one read per
sum (without class weights or soft-cap: one unmasked sum, and the two exact sums only
in a conditional branch taken when some logit is ``-inf`` or NaN). Generalized adds a
sum of ``p_k^q``; focal with a whole ``gamma = n <= 3`` adds the power sums
``sum_k w_k exp(j d_k)`` and ``sum_k w_k d_k exp(j d_k)`` for ``j <= n`` (the first of
them only with class weights), which need only the shift; focal with any other gamma
adds two sums of ``(1 - p_k)^gamma`` terms, which need the log-sum-exp first.

The last tests are of the ``"xla"`` implementation and count something an accelerator
cares about instead: how deep the chain of reductions over the logits is in the
forward pass (siblings fuse into one pass there; a reduction that needs another's
result cannot).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

import jcce
from tests.compiled import compiled_as_users

N, K = 64, 4096
ONE_BUFFER = N * K * 4  # bytes of one float32 [N, K] array
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?(%\S+) = (\([^)]*\)|\S+) ([\w-]+)\((.*?)\)")
_BIG = re.compile(rf"\[{N},{K}\]")


# Compiled for the host CPU whatever the default device (an accelerator's compiler
# makes other choices): these are XLA:CPU facts.
ON_CPU = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])


def _compiled_text(loss, dtype=jnp.float32, probability_targets=False):
    z = jax.ShapeDtypeStruct((N, K), dtype, sharding=ON_CPU)
    if probability_targets:
        y = jax.ShapeDtypeStruct((N, K), jnp.float32, sharding=ON_CPU)
    else:
        y = jax.ShapeDtypeStruct((N,), jnp.int32, sharding=ON_CPU)
    with jcce.use_implementation("xla_cpu"):
        compiled = compiled_as_users(jax.value_and_grad(loss), z, y)
    return compiled


def _computations(text):
    """The HLO module's computations by name, and the entry's name."""
    comps, name, entry = {}, None, None
    for line in text.splitlines():
        header = re.match(r"(ENTRY )?(%\S+) \(.*\{$", line)
        if header:
            name = header.group(2)
            comps[name] = []
            entry = name if header.group(1) else entry
        elif name is not None:
            comps[name].append(line)
    return comps, entry


def _reads(comps, name, branch):
    """Reads of [N, K] data in computation ``name``; a conditional counts the reads of
    its branches, combined by ``branch`` (``max``: the worst case; ``min``: the
    cheapest branch)."""
    big, reads = set(), 0
    for line in comps[name]:
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        target, shape, op, operands = match.groups()
        if _BIG.search(shape) and op not in ("tuple", "bitcast"):
            big.add(target)
        if op == "conditional":
            names = re.search(r"branch_computations=\{([^}]*)\}", line).group(1)
            reads += branch(_reads(comps, b.strip(), branch) for b in names.split(","))
            continue
        if op in ("parameter", "tuple", "bitcast", "get-tuple-element"):
            continue
        if any(o.strip().split(" ")[-1] in big for o in operands.split(",")):
            reads += 1
    return reads


def reads_and_temp(loss, dtype=jnp.float32, probability_targets=False, branch=max):
    """Reads of [N, K] data in the compiled loss-and-gradient (a conditional: its
    branches' reads, the worst by default) and its scratch bytes."""
    compiled = _compiled_text(loss, dtype, probability_targets)
    comps, entry = _computations(compiled.as_text())
    return _reads(comps, entry, branch), compiled.memory_analysis().temp_size_in_bytes


CW = jnp.linspace(0.5, 1.5, K)
PLAIN_READS = 5

NO_EXTRA_READ = {
    "temperature": jcce.temperature(2.0),
    "softcap": jcce.softcap(30.0),
    "z_loss": jcce.z_loss(1e-4),
    "log_base": jcce.log_base(2.0),
    "class_weights": jcce.class_weights(CW),
    "focal": jcce.focal(2.0, 0.25),
    "poly": jcce.poly(2.0),
    "generalized": jcce.generalized(0.7),
    "symmetric": jcce.symmetric(),
    "every transform but label smoothing": jcce.chain(
        jcce.softcap(30.0),
        jcce.temperature(2.0),
        jcce.z_loss(1e-4),
        jcce.log_base(2.0),
        jcce.class_weights(CW),
        jcce.focal(2.0),
    ),
}

# label smoothing's sums, worst case: the unmasked sum, then support size and sum over
# the support (and sum of the class weights over it) where some logit is -inf; the
# soft-cap makes the support static (every class).
SMOOTHING = {
    "label_smoothing": (jcce.label_smoothing(0.1), 3),
    "with softcap": (jcce.chain(jcce.softcap(30.0), jcce.label_smoothing(0.1)), 1),
    "with class weights": (
        jcce.chain(jcce.label_smoothing(0.1), jcce.class_weights(CW)),
        4,
    ),
    "with poly": (jcce.chain(jcce.poly(2.0), jcce.label_smoothing(0.1)), 3),
    # ... and one sum of p_k^q
    "with generalized": (
        jcce.chain(jcce.generalized(0.7), jcce.label_smoothing(0.1)),
        3,
    ),
    # ... and focal's two sums of (1 - p_k)^gamma terms
    "with focal": (jcce.chain(jcce.focal(0.5), jcce.label_smoothing(0.1)), 4),
    # ... or, for gamma = 2, its power sums of exp(2 d), d exp(d) and d exp(2 d)
    "with focal, gamma 2": (jcce.chain(jcce.focal(2.0), jcce.label_smoothing(0.1)), 4),
    "every transform": (
        jcce.chain(
            jcce.softcap(30.0),
            jcce.temperature(2.0),
            jcce.label_smoothing(0.1),
            jcce.z_loss(1e-4),
            jcce.log_base(2.0),
            jcce.focal(2.0),
            jcce.class_weights(CW),
        ),
        # the sum over the support and focal's four power sums (with class weights)
        5,
    ),
    "every transform but an objective": (
        jcce.chain(
            jcce.softcap(30.0),
            jcce.temperature(2.0),
            jcce.label_smoothing(0.1),
            jcce.z_loss(1e-4),
            jcce.log_base(2.0),
            jcce.class_weights(CW),
        ),
        1,
    ),
}


def test_plain_loss_reads_the_logits_five_times_with_no_scratch():
    reads, temp = reads_and_temp(jcce.cross_entropy)
    assert reads == PLAIN_READS
    assert temp < ONE_BUFFER // 100


@pytest.mark.parametrize("name", list(NO_EXTRA_READ))
def test_transforms_add_no_read_and_no_scratch(name):
    reads, temp = reads_and_temp(NO_EXTRA_READ[name])
    assert reads <= PLAIN_READS
    assert temp < ONE_BUFFER // 100


# Focal smoothing with a whole gamma takes its forward sums a block of rows at a time
# (jcce._xla_cpu._row_sums): a few cache-sized blocks of scratch, each at most an
# eighth of the batch, whatever N (test_blocked_sums_keep_scratch_of_a_few_blocks).
BLOCKED = {"with focal, gamma 2", "every transform"}


@pytest.mark.parametrize("name", list(SMOOTHING))
def test_label_smoothing_adds_only_its_sums(name):
    loss, extra = SMOOTHING[name]
    reads, temp = reads_and_temp(loss)
    assert reads <= PLAIN_READS + extra
    assert temp < (
        ONE_BUFFER // 2 + ONE_BUFFER // 100 if name in BLOCKED else ONE_BUFFER // 100
    )


@pytest.mark.parametrize("name", sorted(BLOCKED))
def test_blocked_sums_keep_scratch_of_a_few_blocks(name):
    """Compiled (not run) for 64 times more examples, the scratch is that of a few
    blocks of at most ``_BLOCK_BYTES`` of float32 logits, not more."""
    from jcce import _xla_cpu

    z = jax.ShapeDtypeStruct((64 * N, K), jnp.float32, sharding=ON_CPU)
    y = jax.ShapeDtypeStruct((64 * N,), jnp.int32, sharding=ON_CPU)
    with jcce.use_implementation("xla_cpu"):
        compiled = compiled_as_users(jax.value_and_grad(SMOOTHING[name][0]), z, y)
    assert "while" in compiled.as_text()  # the loop over blocks
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= 6 * _xla_cpu._BLOCK_BYTES < 64 * ONE_BUFFER // 10


# Probability targets with a nonlinear objective: "xla_cpu" takes their target sums a
# block of rows at a time (jcce._xla_cpu._by_rows). Taken whole, XLA:CPU shared their
# [N, K] subexpressions with the gradient and kept 1 to 6 [N, K] float32 copies.
PROBABILITY_OBJECTIVES = {
    "generalized": jcce.chain(jcce.generalized(0.5)),
    "focal": jcce.chain(jcce.focal(2.0)),
    "poly + label smoothing": jcce.chain(jcce.poly(1.0), jcce.label_smoothing(0.1)),
    "generalized + softcap": jcce.chain(jcce.generalized(0.5), jcce.softcap(5.0)),
    "focal(1.5) + label smoothing + class weights": jcce.chain(
        jcce.focal(1.5), jcce.label_smoothing(0.1), jcce.class_weights(CW)
    ),
}


@pytest.mark.parametrize("name", sorted(PROBABILITY_OBJECTIVES))
def test_probability_targets_with_an_objective_keep_scratch_of_a_few_blocks(name):
    """Compiled for 64 times more examples: the scratch of a few blocks of at most
    ``_BLOCK_BYTES`` of float32 logits, no ``[N, K]`` copy."""
    from jcce import _xla_cpu

    z = jax.ShapeDtypeStruct((64 * N, K), jnp.float32, sharding=ON_CPU)
    t = jax.ShapeDtypeStruct((64 * N, K), jnp.float32, sharding=ON_CPU)
    with jcce.use_implementation("xla_cpu"):
        compiled = compiled_as_users(
            jax.value_and_grad(PROBABILITY_OBJECTIVES[name]), z, t
        )
    assert "while" in compiled.as_text()  # the loop over blocks
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= 6 * _xla_cpu._BLOCK_BYTES < 64 * ONE_BUFFER // 10


def test_bfloat16_chain_keeps_no_float32_copy():
    chain = jcce.chain(jcce.softcap(30.0), jcce.temperature(2.0), jcce.z_loss(1e-4))
    reads, temp = reads_and_temp(chain, jnp.bfloat16)
    assert reads <= PLAIN_READS
    assert temp < ONE_BUFFER // 100


def test_the_counter_sees_a_materialized_intermediate():
    """The measure is not vacuous: an unfused log-softmax pays for its [N, K] copy."""

    def unfused(z, y):
        logp = jax.nn.log_softmax(z)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

    reads, temp = reads_and_temp(unfused)
    assert reads > PLAIN_READS or temp >= ONE_BUFFER


def test_label_smoothing_without_minus_inf_reads_the_logits_once_more():
    """The unmasked sum is the one extra read of the branches taken when every mapped
    logit is finite; where one is -inf or NaN the support size and the masked sum add
    a read each (the worst case)."""
    loss = jcce.label_smoothing(0.1)
    assert reads_and_temp(loss, branch=min)[0] == PLAIN_READS + 1
    assert reads_and_temp(loss, branch=max)[0] == PLAIN_READS + 3


@pytest.mark.parametrize(
    "loss",
    [jcce.label_smoothing(0.1), jcce.chain(jcce.label_smoothing(0.1), jcce.focal(2.0))],
    ids=["label_smoothing", "with focal"],
)
def test_the_gradient_pass_has_a_branch_without_support_masks(loss):
    """Label smoothing's gradient is a conditional (``full_support``): one branch with
    the support masks, one without for rows whose every logit is finite. Each reads
    the logits once, the dense gradient's one pass."""
    text = _compiled_text(loss).as_text()
    comps, entry = _computations(text)
    (line,) = [
        x for x in comps[entry] if " conditional(" in x and _BIG.search(x.split("=")[1])
    ]
    names = re.search(r"branch_computations=\{([^}]*)\}", line).group(1).split(",")
    assert [_reads(comps, b.strip(), max) for b in names] == [1, 1]


def _capped(cap):
    return {
        "softcap": jcce.softcap(cap),
        "softcap_temperature_z_loss": jcce.chain(
            jcce.softcap(cap), jcce.temperature(2.0), jcce.z_loss(1e-4)
        ),
        "softcap_smoothing": jcce.chain(jcce.softcap(cap), jcce.label_smoothing(0.1)),
    }


@pytest.mark.parametrize("name", list(_capped(30.0)))
def test_a_soft_cap_shifts_by_the_cap_and_skips_the_max(name):
    """Soft-capped logits lie in [-cap, cap]: with class indices the cap is the shift
    and the max is never read, one read fewer than the same chain with a cap too wide
    for float32's exponent range (shifted by the max)."""
    reads, temp = reads_and_temp(_capped(30.0)[name])
    wide_reads, _ = reads_and_temp(_capped(100.0)[name])
    assert reads == wide_reads - 1
    assert temp < ONE_BUFFER // 100


# ------------------------------------------- the "xla" path: sequential reductions
#
# An accelerator's compiler fuses reductions that read the same data and depend on no
# other reduction (siblings) into one pass; what it cannot merge is a reduction that
# needs another's result first (the sum of exponentials needs the max). So on the
# "xla" path what counts is the depth of the chain of reductions over the logits in
# the forward pass, measured here on the compiled forward program (on the CPU; the
# dependency structure is the kernel's, not the backend's).


def _reduces_big_data(computation: str) -> bool:
    """Whether a fused computation reduces an ``[N, K]`` array (a gather of one entry
    a row, fused with per-example work, is not a pass over the logits)."""
    shapes = {}
    for line in computation.splitlines():
        match = _INSTRUCTION.match(line) or re.match(
            r"\s*(?:ROOT )?(%\S+) = (\S+) (parameter)\(()", line
        )
        if not match:
            continue
        name, shape, op, operands = match.groups()
        shapes[name] = shape
        names = [o.strip().split(" ")[-1] for o in operands.split(",")]
        if op == "reduce" and any(_BIG.search(shapes.get(n, "")) for n in names):
            return True
    return False


def forward_reduction_depth(loss, implementation="xla"):
    """The longest chain of reductions over ``[N, K]`` data, each needing the one
    before, in the compiled forward program."""
    z = jax.ShapeDtypeStruct((N, K), jnp.float32, sharding=ON_CPU)
    y = jax.ShapeDtypeStruct((N,), jnp.int32, sharding=ON_CPU)
    with jcce.use_implementation(implementation):
        text = compiled_as_users(lambda z, y: loss(z, y), z, y).as_text()
    bodies = {block.split(" ", 1)[0]: block for block in re.split(r"\n(?=%)", text)}
    depth = {}
    for line in text[text.index("ENTRY") :].splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, _, op, operands = match.groups()
        names = [o.strip().split(" ")[-1] for o in operands.split(",")]
        called = re.search(r"calls=(%[\w.-]+)", line)
        is_pass = bool(called) and _reduces_big_data(bodies.get(called.group(1), ""))
        below = max((depth.get(n, 0) for n in names), default=0)
        depth[name] = below + is_pass
    return max(depth.values())


PLAIN_DEPTH = 2  # the max, then the sum of exponentials (and the label's logit)

DEPTHS = {
    "plain": (jcce.chain(), PLAIN_DEPTH),
    "label_smoothing": (jcce.label_smoothing(0.1), PLAIN_DEPTH),
    # the cap is the shift: every reduction reads the logits with nothing before it
    "softcap": (jcce.softcap(30.0), 1),
    "every transform but label smoothing (a cap among them)": (
        NO_EXTRA_READ["every transform but label smoothing"],
        1,
    ),
    "4-transform chain": (
        jcce.chain(
            jcce.label_smoothing(0.1),
            jcce.temperature(2.0),
            jcce.z_loss(1e-4),
            jcce.softcap(30.0),
        ),
        1,
    ),
    "a cap too wide for float32": (jcce.softcap(100.0), PLAIN_DEPTH),
    # focal's power sums need the max shift (exp(2 d) must not underflow), not the
    # log-sum-exp: siblings of the sum of exponentials
    "every transform (focal with smoothing)": (
        SMOOTHING["every transform"][0],
        PLAIN_DEPTH,
    ),
    "focal with smoothing": (
        jcce.chain(jcce.focal(2.0), jcce.label_smoothing(0.1)),
        PLAIN_DEPTH,
    ),
    # a fractional gamma's smoothing sums need the log-sum-exp first
    "focal with a fractional gamma and smoothing": (
        jcce.chain(jcce.focal(0.5), jcce.label_smoothing(0.1)),
        PLAIN_DEPTH + 1,
    ),
    # a gamma the caller traces is never taken as a whole power
    "focal with a traced gamma and smoothing": (
        lambda z, y: jcce.chain(
            jcce.focal(jnp.asarray(2.0) + 0 * z[0, 0]), jcce.label_smoothing(0.1)
        )(z, y),
        PLAIN_DEPTH + 1,
    ),
}


@pytest.mark.parametrize("name", list(DEPTHS))
def test_xla_forward_reduction_depth(name):
    loss, want = DEPTHS[name]
    assert forward_reduction_depth(loss) == want


@pytest.mark.parametrize(
    "loss",
    [
        jcce.cross_entropy,
        jcce.label_smoothing(0.1),
        jcce.chain(jcce.label_smoothing(0.1), jcce.temperature(2.0)),
    ],
    ids=["cross_entropy", "label_smoothing", "label_smoothing_temperature"],
)
def test_a_where_mask_keeps_no_masked_copy_of_the_logits(loss):
    """No masked copy of the logits is written: the forward reads the raw logits and
    replaces the masked rows' results (``Ops.late_row_mask``; XLA:CPU's YNNPACK
    reductions take no select, so masked logits would be written out first, the
    buffer shared with the gradient's in ``value_and_grad`` and a temp of their own in
    the forward alone), and the backward masks them inside each conditional branch
    that reads them (a branch operand would be an [N, K] buffer)."""
    mask = jnp.arange(N) % 8 != 0

    def masked(z, y):
        return loss(z, y, where=mask)

    _, temp = reads_and_temp(masked)
    assert temp < ONE_BUFFER // 100
    z = jax.ShapeDtypeStruct((N, K), jnp.float32, sharding=ON_CPU)
    y = jax.ShapeDtypeStruct((N,), jnp.int32, sharding=ON_CPU)
    with jcce.use_implementation("xla_cpu"):
        forward = compiled_as_users(masked, z, y)
    assert forward.memory_analysis().temp_size_in_bytes < ONE_BUFFER // 100


# A vocabulary with no tiling into chunks of _MIN_CHUNK to _ROW_CHUNK classes: a prime
# above _ROW_CHUNK (at full size: Qwen's 151643; cl100k's 100277 = 149 x 673 has none
# either).
UNTILED_K = 16411


def _whole_row_reductions(text, shape):
    """The ``reduce`` instructions of an HLO module whose operand has ``shape``."""
    shapes, found = {}, []
    for line in text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        target, out_shape, op, operands = match.groups()
        shapes[target] = out_shape
        operand = operands.split(",")[0].strip().split(" ")[-1]
        if op == "reduce" and shapes.get(operand, "").startswith(shape):
            found.append(line.strip())
    return found


@pytest.mark.parametrize(
    "name",
    ["plain", "label_smoothing", "with softcap", "with class weights", "with focal"],
)
def test_a_vocabulary_without_tiling_is_reduced_in_windows_with_no_scratch(name):
    """``"xla_cpu"`` reduces such rows in windows of ``_ROW_CHUNK`` classes
    (``lax.reduce_window``, the last window padded virtually): whole, the sum of
    exponentials at [256, 100277] took 46 ms, in windows 8 ms. Each layout keeps its
    own shape, so nothing ``[N, K]`` is shared and materialized (whole rows of one shape
    were: 0.5 to 1.5 buffers of scratch with label smoothing)."""
    from jcce import _xla_cpu

    assert _xla_cpu._untiled(UNTILED_K)
    loss = jcce.cross_entropy if name == "plain" else SMOOTHING[name][0]
    if name == "with class weights":
        cw = jnp.linspace(0.5, 1.5, UNTILED_K)
        loss = jcce.chain(jcce.label_smoothing(0.1), jcce.class_weights(cw))
    z = jax.ShapeDtypeStruct((N, UNTILED_K), jnp.float32, sharding=ON_CPU)
    y = jax.ShapeDtypeStruct((N,), jnp.int32, sharding=ON_CPU)
    with jcce.use_implementation("xla_cpu"):
        compiled = compiled_as_users(jax.value_and_grad(loss), z, y)
    text = compiled.as_text()
    assert "reduce-window" in text
    assert not _whole_row_reductions(text, f"f32[{N},{UNTILED_K}]")
    assert compiled.memory_analysis().temp_size_in_bytes < N * UNTILED_K * 4 // 100
