"""The loss's configuration: what the kernel is told, and the dtype policy.

A chain of transforms is folded into a static :class:`Spec` (which logit maps apply, in
which order; which terms are on) and a :class:`Params` of hyper-parameter values. The
public :class:`jcce.Chain` is a :class:`Configuration` that can also be called as a
loss; everything below the public losses sees only the configuration.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jcce import _validate

# Kinds that map the logits elementwise, applied in chain order before the softmax.
LOGIT_MAPS = ("softcap", "temperature")
# Kinds that replace the per-class loss -log p_k by another function of p_k; a chain
# holds at most one of them.
OBJECTIVES = ("focal", "poly", "generalized", "symmetric")
# Every kind of transform, and the length of the tuple value of those that hold one.
KINDS = (
    LOGIT_MAPS + OBJECTIVES + ("label_smoothing", "z_loss", "log_base", "class_weights")
)
TUPLE_VALUES = {"focal": 2, "poly": 1, "generalized": 1, "symmetric": 3}
# The largest focal gamma taken as a static integer power (see Spec.focal_power).
FOCAL_POWERS = 3


class Spec(NamedTuple):
    """Static structure of one kernel call (hashable; part of the jit cache key)."""

    maps: tuple[str, ...] = ()
    label_smoothing: bool = False
    z_loss: bool = False
    log_base: bool = False
    objective: str | None = None
    # Focal's gamma where it was a concrete whole number from 0 to FOCAL_POWERS at the
    # loss's call (Configuration.pinned): (1 - p)^gamma is then a polynomial in p, and
    # label smoothing's sums of focal terms split into power sums that need only the
    # shift (jcce._kernel._power_sums). A gamma the caller traced is never static, so
    # derivatives with respect to gamma take the general path.
    focal_power: int | None = None


def static_power(value, most: int = FOCAL_POWERS) -> int | None:
    """``value`` as an ``int`` if it is a concrete whole number in ``[0, most]``."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        v = float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None
    return int(v) if v.is_integer() and 0 <= v <= most else None


class Params(NamedTuple):
    """Hyper-parameter values matching a :class:`Spec`; absent terms are ``None``."""

    maps: tuple[Any, ...] = ()
    label_smoothing: Any = None
    z_loss: Any = None
    log_base: Any = None
    objective: tuple[Any, ...] = ()


def in_domain(spec: Spec, params: Params) -> Params:
    """``params`` (scalar arrays) with every value outside its domain replaced by NaN.

    Concrete values were checked when their transform was built; a traced value (a
    schedule) cannot be. Outside its domain a formula's shortcuts stop holding (a
    negative temperature reverses the order of the logits, so the max-shift no longer
    bounds the exponentials), and the loss would be a wrong number, finite or
    infinite. NaN says instead that the value is wrong, and under
    ``jax.experimental.checkify`` a check names it.
    """

    def guard(kind, value, index=0):
        ok_, requirement = _validate.DOMAINS[kind][index]
        ok = ok_(value) & jnp.isfinite(value)
        _validate.check_domain(kind, value, ok, requirement)
        return jnp.where(ok, value, jnp.nan)

    def optional(kind, value):
        return None if value is None else guard(kind, value)

    objective = params.objective
    if spec.objective is not None:
        objective = tuple(
            guard(spec.objective, o, i) for i, o in enumerate(params.objective)
        )
    return Params(
        maps=tuple(guard(k, m) for k, m in zip(spec.maps, params.maps, strict=True)),
        label_smoothing=optional("label_smoothing", params.label_smoothing),
        z_loss=optional("z_loss", params.z_loss),
        log_base=optional("log_base", params.log_base),
        objective=objective,
    )


def acc_dtype(dtype) -> jnp.dtype:
    """Accumulation (and loss) dtype: float64 stays float64, all else uses float32."""
    return jnp.dtype(jnp.float64) if dtype == jnp.float64 else jnp.dtype(jnp.float32)


def value_key(value):
    if isinstance(value, tuple):
        return tuple(value_key(v) for v in value)
    if value is None or isinstance(value, float):
        return value
    if isinstance(value, jax.core.Tracer):
        return ("traced", id(value))
    try:
        return ("array", float(value))
    except (TypeError, jax.errors.ConcretizationTypeError):
        return ("array", id(value))


@jax.tree_util.register_pytree_node_class
class Record:
    """One transform's data: its kind and its value (the value a JAX pytree leaf, or a
    tuple of them, the kind static). The public :class:`jcce.Transform` is a record
    that can also be called as a loss; a loss below the transforms (such as
    :func:`jcce.info_nce_loss`, whose temperature is the kernel's) builds a
    :class:`Configuration` of records directly. Immutable, compared by value."""

    __slots__ = ("kind", "value")

    def __init__(self, kind: str, value):
        _validate.transform_record(kind, value, KINDS, TUPLE_VALUES)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "value", value)

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def tree_flatten(self):
        return (self.value,), self.kind

    @classmethod
    def tree_unflatten(cls, kind, children):
        return cls(kind, children[0])

    def __eq__(self, other):
        if not isinstance(other, Record):
            return NotImplemented
        return self.kind == other.kind and value_key(self.value) == value_key(
            other.value
        )

    def __hash__(self):
        return hash((self.kind, value_key(self.value)))


@jax.tree_util.register_pytree_node_class
class Configuration:
    """An ordered tuple of transforms (records with ``kind`` and ``value``), as the
    kernel's callers see it: :meth:`config` and :meth:`class_factors`. A JAX pytree
    whose leaves are the hyper-parameter values; hashable and compared by value."""

    __slots__ = ("transforms", "focal_power")

    def __init__(self, transforms: tuple = (), focal_power: int | None = None):
        transforms = tuple(transforms)
        for t in transforms:
            if getattr(t, "kind", None) not in KINDS:
                _validate.not_a_transform(t)
        _validate.chain_members(transforms, OBJECTIVES)
        object.__setattr__(self, "transforms", transforms)
        object.__setattr__(self, "focal_power", focal_power)

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def tree_flatten(self):
        return self.transforms, self.focal_power

    @classmethod
    def tree_unflatten(cls, focal_power, children):
        return cls(tuple(children), focal_power)

    def pinned(self) -> Configuration:
        """This configuration with focal's gamma also held as static data (the pytree's
        auxiliary data, so part of a jit cache key) where it is a concrete whole number
        (see :attr:`Spec.focal_power`).

        Built by a loss's entry point, outside its jit, from the values the caller
        passed, and never handed back: inside the jit the traced gamma then equals the
        static one. (Derived automatically on every flatten it would go stale under a
        ``jax.tree.map`` of traced values.) A gamma traced by the caller, the only
        kind anything differentiates, is never pinned."""
        power = None
        for t in self.transforms:
            if t.kind == "focal":
                power = static_power(t.value[0])
        return type(self)(self.transforms, power)

    def __eq__(self, other):
        if not isinstance(other, Configuration):
            return NotImplemented
        return self.transforms == other.transforms

    def __hash__(self):
        return hash(("chain", self.transforms))

    def __iter__(self):
        return iter(self.transforms)

    def __len__(self):
        return len(self.transforms)

    def config(self) -> tuple[Spec, Params]:
        """Folds the transforms into the kernel's static spec and parameter values."""
        _validate.scalar_hyper_parameters(self.transforms)
        maps, map_values = [], []
        terms: dict[str, Any] = {}
        objective, objective_values = None, ()
        for t in self.transforms:
            if t.kind in LOGIT_MAPS:
                maps.append(t.kind)
                map_values.append(t.value)
            elif t.kind in OBJECTIVES:
                objective = t.kind
                # focal's alpha weights classes; it reaches the kernel with them.
                objective_values = t.value[:1] if t.kind == "focal" else t.value
            else:
                terms[t.kind] = t.value
        spec = Spec(
            maps=tuple(maps),
            label_smoothing="label_smoothing" in terms,
            z_loss="z_loss" in terms,
            log_base="log_base" in terms,
            objective=objective,
            focal_power=self.focal_power if objective == "focal" else None,
        )
        params = Params(
            maps=tuple(map_values),
            label_smoothing=terms.get("label_smoothing"),
            z_loss=terms.get("z_loss"),
            log_base=terms.get("log_base"),
            objective=tuple(objective_values),
        )
        return spec, params

    def class_factors(self) -> tuple[Any, Any]:
        """The chain's :func:`class_weights` value and :func:`focal` ``alpha`` (or None)."""
        found = {t.kind: t.value for t in self.transforms}
        focal_ = found.get("focal")
        return found.get("class_weights"), None if focal_ is None else focal_[1]


PLAIN = Configuration()  # no transform: the cross-entropy
