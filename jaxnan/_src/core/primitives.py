"""What jaxnan knows about jax primitives, written down once.

- `DOMAINS`: the primitives that can create a nonfinite value from finite
  inputs, each with the kind of domain it has (`Domain`) and the operands
  that have to stay inside it. `causes` picks its classification rule by the
  domain, `lint` checks the operands.
- `REARRANGING` / `SUBSETTING`: primitives whose output holds exactly the
  elements of their first input, or a subset of them.
- `LOW_PRECISION` / `LOW_PRECISION_NAMES`: the 16-bit float dtypes.
- `user_spelling`: how a user writes a primitive (``sqrt`` -> ``jnp.sqrt``).
- `sub_jaxprs`: the one traversal of higher-order primitives (those whose
  params hold a jaxpr), naming the role of each body (a call, a branch, a
  loop body, a per-device program). It raises `NotImplementedError` for a
  higher-order primitive it does not know, so that a new one fails loudly
  everywhere instead of being treated as opaque somewhere.

No `jax._src` import here (those live in `compat`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

# ----------------------------------------------------------------------------
# Domains.


class Domain(enum.Enum):
    """How a primitive can turn finite inputs into a nonfinite output."""

    LOG = "log"  # log(x) needs x > 0, log1p(x) needs x > -1
    ROOT = "root"  # sqrt needs x >= 0, rsqrt x > 0 (and the derivative x > 0)
    DIVISION = "division"  # a zero denominator (div, rem)
    POWER = "power"  # a negative base with a fractional exponent, 0 ** -p
    INTEGER_POWER = "integer power"  # 0 ** -n
    ANGLE = "angle"  # arctan2(0, 0) has no derivative
    INVERSE_TRIG = "inverse trig"  # arccos/arcsin/arctanh need |x| <= 1 (< 1)
    POLE = "pole"  # lgamma/digamma at 0, -1, -2, ...
    FACTORIZATION = "factorization"  # cholesky of a matrix not positive definite
    EXP = "exp"  # overflow above log(max) of the dtype
    INF_ARITHMETIC = "inf arithmetic"  # inf - inf, 0 * inf


class PrimitiveDomain(NamedTuple):
    """The domain of one primitive.

    Attributes:
        domain: the kind of domain.
        operands: the positions of the operands that must stay inside it.
    """

    domain: Domain
    operands: tuple[int, ...]


DOMAINS: Mapping[str, PrimitiveDomain] = {
    "log": PrimitiveDomain(Domain.LOG, (0,)),
    "log1p": PrimitiveDomain(Domain.LOG, (0,)),
    "sqrt": PrimitiveDomain(Domain.ROOT, (0,)),
    "rsqrt": PrimitiveDomain(Domain.ROOT, (0,)),
    "div": PrimitiveDomain(Domain.DIVISION, (1,)),
    "rem": PrimitiveDomain(Domain.DIVISION, (1,)),
    "pow": PrimitiveDomain(Domain.POWER, (0,)),
    "integer_pow": PrimitiveDomain(Domain.INTEGER_POWER, (0,)),
    "atan2": PrimitiveDomain(Domain.ANGLE, (0, 1)),
    "acos": PrimitiveDomain(Domain.INVERSE_TRIG, (0,)),
    "asin": PrimitiveDomain(Domain.INVERSE_TRIG, (0,)),
    "atanh": PrimitiveDomain(Domain.INVERSE_TRIG, (0,)),
    "lgamma": PrimitiveDomain(Domain.POLE, (0,)),
    "digamma": PrimitiveDomain(Domain.POLE, (0,)),
    "cholesky": PrimitiveDomain(Domain.FACTORIZATION, (0,)),
    "exp": PrimitiveDomain(Domain.EXP, (0,)),
    "exp2": PrimitiveDomain(Domain.EXP, (0,)),
    "expm1": PrimitiveDomain(Domain.EXP, (0,)),
    "add": PrimitiveDomain(Domain.INF_ARITHMETIC, (0, 1)),
    "add_any": PrimitiveDomain(Domain.INF_ARITHMETIC, (0, 1)),
    "sub": PrimitiveDomain(Domain.INF_ARITHMETIC, (0, 1)),
    "mul": PrimitiveDomain(Domain.INF_ARITHMETIC, (0, 1)),
}
"""Primitive name -> its domain, for the primitives jaxnan explains."""


def domain_of(name: str) -> Domain | None:
    """The kind of domain of a primitive, None when it has no known one.

    Examples:
        >>> from jaxnan._src.core import primitives
        >>> primitives.domain_of("log1p"), primitives.domain_of("tanh")
        (<Domain.LOG: 'log'>, None)
    """
    entry = DOMAINS.get(name)
    return None if entry is None else entry.domain


# ----------------------------------------------------------------------------
# Rearranging ops.

REARRANGING = frozenset(
    {
        "reshape",
        "squeeze",
        "expand_dims",
        "broadcast_in_dim",
        "transpose",
        "copy",
        "copy_p",
        "rev",
        "optimization_barrier",
    }
)
"""Primitives whose output holds exactly the elements of their first input,
rearranged (or repeated): they cannot create a nonfinite value."""

SUBSETTING = frozenset({"slice", "dynamic_slice", "gather"})
"""Primitives whose output holds some of the elements of their first input."""

# ----------------------------------------------------------------------------
# Dtypes.

# Primitives whose floating output elements are elements of their inputs
# (selected, negated, clamped, rounded, sorted): an output code never exceeds
# the input codes, so they cannot create and are not checked. `can_create`
# handles the exceptions (complex abs, empty max/min reductions, narrowing
# converts).
SELECTING = frozenset(
    {
        "select_n",
        "max",
        "min",
        "neg",
        "abs",
        "sign",
        "floor",
        "ceil",
        "round",
        "concatenate",
        "pad",
        "slice",
        "dynamic_slice",
        "dynamic_update_slice",
        "sort",
        "clamp",
        "cummax",
        "cummin",
        "real",
        "imag",
        "conj",
        "reduce_max",
        "reduce_min",
        "convert_element_type",
    }
)


def _is_inexact(dtype: Any) -> bool:
    return dtype is not None and bool(jnp.issubdtype(dtype, jnp.inexact))


def can_create(eqn: Any) -> bool:
    """False when an equation's outputs hold only (transformed) input elements."""
    name = eqn.primitive.name
    if name not in SELECTING:
        return True
    ins = [v.aval for v in eqn.invars]
    if name in ("abs", "sign"):  # |z| of a complex z can overflow
        return jnp.issubdtype(ins[0].dtype, jnp.complexfloating)
    if name in ("reduce_max", "reduce_min"):  # an empty reduction gives -+inf
        return any(ins[0].shape[a] == 0 for a in eqn.params["axes"])
    if name == "convert_element_type":  # only widening float converts
        src, dst = ins[0].dtype, eqn.outvars[0].aval.dtype
        if not (_is_inexact(src) and _is_inexact(dst)):
            return True
        if jnp.issubdtype(src, jnp.complexfloating) != jnp.issubdtype(
            dst, jnp.complexfloating
        ):
            return True
        return bool(jnp.finfo(dst).max < jnp.finfo(src).max)
    return False


LOW_PRECISION_NAMES = ("float16", "bfloat16")
"""The names of the 16-bit float dtypes."""

LOW_PRECISION = (np.dtype("float16"), np.dtype(jnp.bfloat16))
"""The 16-bit float dtypes (numpy dtypes)."""

# ----------------------------------------------------------------------------
# User-facing spellings.

_SPELLINGS = {
    "div": "/",
    "mul": "*",
    "add": "+",
    "sub": "-",
    "integer_pow": "**",
    "pow": "jnp.power",
    "atan2": "jnp.arctan2",
    "acos": "jnp.arccos",
    "asin": "jnp.arcsin",
    "atanh": "jnp.arctanh",
    "acosh": "jnp.arccosh",
    "rsqrt": "lax.rsqrt",
    "logistic": "jax.nn.sigmoid",
    "reduce_sum": "jnp.sum",
    "reduce_prod": "jnp.prod",
    "reduce_max": "jnp.max",
    "dot_general": "jnp.dot",
    "cholesky": "jnp.linalg.cholesky",
    "lgamma": "jax.scipy.special.gammaln",
    "digamma": "jax.scipy.special.digamma",
    "erf_inv": "jax.scipy.special.erfinv",
}
_JNP_UNARY = frozenset(
    "sqrt log log1p exp exp2 expm1 tan tanh sinh cosh cbrt square abs sign".split()
)


def user_spelling(name: str) -> str:
    """The user-level spelling of a primitive (``sqrt`` -> ``jnp.sqrt``).

    Examples:
        >>> from jaxnan._src.core import primitives
        >>> [primitives.user_spelling(p) for p in ("sqrt", "div", "erf")]
        ['jnp.sqrt', '/', 'lax.erf']
    """
    if name in _SPELLINGS:
        return _SPELLINGS[name]
    if name in _JNP_UNARY:
        return f"jnp.{name}"
    return f"lax.{name}"


# ----------------------------------------------------------------------------
# Higher-order primitives: the one traversal.


class Role(enum.Enum):
    """What a sub-jaxpr of a higher-order equation is to that equation."""

    CALL = "call"  # run once in place on the trailing operands; gives the outputs
    BRANCH = "branch"  # one of several bodies, chosen by operand 0 (cond)
    LOOP_BODY = "loop body"  # run once per iteration (scan, while)
    LOOP_CONDITION = "loop condition"  # decides whether a while loop goes on
    PER_DEVICE = "per device"  # run on every device of a mesh (shard_map)
    AUXILIARY = "auxiliary"  # a function the primitive applies its own way
    UNKNOWN = "unknown"  # a primitive missing from the table (strict=False)


LOOP_ROLES = frozenset({Role.LOOP_BODY, Role.LOOP_CONDITION})
"""The roles whose body runs once per iteration of a loop."""


class SubJaxpr(NamedTuple):
    """One body of a higher-order equation.

    Attributes:
        role: what the body is to the equation.
        jaxpr: the body, an open `jax.extend.core.Jaxpr`.
        consts: the values of its constvars (empty for an open param).
        param: the name of the equation param holding it.
    """

    role: Role
    jaxpr: Any
    consts: tuple
    param: str


# First-order primitives whose params hold a small jaxpr (a combiner applied
# elementwise, not a nested computation).
_COMBINERS = frozenset(
    {"reduce", "reduce_window", "select_and_scatter", "select_and_gather_add"}
)

# name -> ((param, role), ...): the bodies of each known higher-order primitive.
_HIGHER_ORDER: dict[str, tuple[tuple[str, Role], ...]] = {
    "jit": (("jaxpr", Role.CALL),),
    "closed_call": (("call_jaxpr", Role.CALL),),
    "call": (("call_jaxpr", Role.CALL),),
    "remat2": (("jaxpr", Role.CALL),),  # jax.checkpoint
    "custom_jvp_call": (("call_jaxpr", Role.CALL),),  # the primal body
    "custom_vjp_call": (("call_jaxpr", Role.CALL),),  # the primal body
    "custom_vmap_call": (("call", Role.CALL),),
    "remat_opt": (("fwd_jaxpr", Role.CALL),),  # residuals, then outputs
    "linear_call": (("callee", Role.CALL),),
    "compute_on": (("jaxpr", Role.CALL),),
    "shard_map": (("jaxpr", Role.PER_DEVICE),),
    "cond": (("branches", Role.BRANCH),),
    "scan": (("jaxpr", Role.LOOP_BODY),),
    "while": (("cond_jaxpr", Role.LOOP_CONDITION), ("body_jaxpr", Role.LOOP_BODY)),
    "custom_linear_solve": (("jaxprs", Role.AUXILIARY),),  # matvec, solve, ...
}


_JAXPR_TYPES = (jex_core.Jaxpr, jex_core.ClosedJaxpr)


def _jaxprs_in(value: Any) -> list:
    items = value if isinstance(value, tuple | list) else (value,)
    return [b for b in items if isinstance(b, _JAXPR_TYPES)]


def is_higher_order(eqn: Any) -> bool:
    """True when an equation's params hold a jaxpr (a nested computation).

    Scatters and reductions hold a small combiner jaxpr applied elementwise:
    they are first-order.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxnan._src.core import primitives
        >>> f = jax.checkpoint(jnp.sin)
        >>> [primitives.is_higher_order(e)
        ...  for e in jax.make_jaxpr(f)(1.0).eqns]
        [True]
    """
    name = eqn.primitive.name
    if name.startswith("scatter") or name in _COMBINERS:
        return False
    return any(map(_holds_jaxpr, eqn.params.values()))


def _holds_jaxpr(value: Any) -> bool:
    if isinstance(value, _JAXPR_TYPES):
        return True
    if isinstance(value, tuple | list):  # namedtuples too (custom_linear_solve)
        return any(isinstance(b, _JAXPR_TYPES) for b in value)
    return False


def _open(body: Any) -> tuple[Any, tuple]:
    if isinstance(body, jex_core.ClosedJaxpr):
        return body.jaxpr, tuple(body.consts)
    return body, ()


def sub_jaxprs(eqn: Any, *, strict: bool = True) -> tuple[SubJaxpr, ...]:
    """The bodies of a higher-order equation with their roles, in order.

    Args:
        eqn: a jaxpr equation.
        strict: raise on a higher-order primitive missing from the table.
            With False its jaxpr params come back with role `Role.UNKNOWN`
            (for a walk that only needs the nesting).

    Returns:
        One `SubJaxpr` per body (a `cond` gives one per branch); empty for a
        first-order equation.

    Raises:
        NotImplementedError: for an unknown higher-order primitive (strict),
            naming it.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxnan._src.core import primitives
        >>> def f(x):
        ...     return jax.lax.while_loop(lambda c: c < 3.0, jnp.exp, x)
        >>> eqn = jax.make_jaxpr(f)(0.0).eqns[0]
        >>> [(s.role.name, s.param) for s in primitives.sub_jaxprs(eqn)]
        [('LOOP_CONDITION', 'cond_jaxpr'), ('LOOP_BODY', 'body_jaxpr')]
    """
    name = eqn.primitive.name
    spec = _HIGHER_ORDER.get(name)
    if spec is None:
        if not is_higher_order(eqn):
            return ()
        if strict:
            raise NotImplementedError(
                f"jaxnan: the higher-order primitive `{name}` (its params hold a "
                "jaxpr) is not in jaxnan's table of higher-order primitives "
                "(jaxnan/_src/core/primitives.py, _HIGHER_ORDER); add it there with "
                "the role of each body."
            )
        spec = tuple(
            (k, Role.UNKNOWN) for k, v in eqn.params.items() if _holds_jaxpr(v)
        )
    out = []
    for param, role in spec:
        for body in _jaxprs_in(eqn.params.get(param)):
            jaxpr, consts = _open(body)
            out.append(SubJaxpr(role, jaxpr, consts, param))
    return tuple(out)


def loop_depth(jaxpr: Any) -> int:
    """The deepest nesting of `scan`/`while` loops in `jaxpr`.

    Unknown higher-order primitives are walked into (the interpreter, not this
    count, decides whether it can evaluate them).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxnan._src.core import primitives
        >>> def f(x):
        ...     return jax.lax.fori_loop(0, 3, lambda i, c: jnp.exp(c), x)
        >>> primitives.loop_depth(jax.make_jaxpr(f)(0.0).jaxpr)
        1
    """
    best = 0
    for eqn in jaxpr.eqns:
        for sub in sub_jaxprs(eqn, strict=False):
            inner = loop_depth(sub.jaxpr) + (sub.role in LOOP_ROLES)
            best = max(best, inner)
    return best
