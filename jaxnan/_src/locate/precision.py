"""The precision experiment of `jaxnan.locate`: the step again, in float32.

`finite_in_float32` re-evaluates a closed jaxpr with every float16,
bfloat16 and float8 value computed in float32 (arguments, constants, literals, casts,
``preferred_element_type``), inlining calls and rebuilding `cond`, `scan`,
`while` and `shard_map` around the upcast bodies, and says whether every
output is finite. When the nonfinite value disappears, the dtype lost it.

`lost_constant` finds the other way a dtype loses a value: a constant of the
user line (or of a default it names, ``eps=1e-12``) that float16 or bfloat16
rounds to 0 or to infinity before any equation runs, so that the jaxpr only
holds the rounded value.
"""

from __future__ import annotations

import linecache
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core
from jax.extend import source_info_util

from jaxnan._src.core import compat, hosts, primitives
from jaxnan._src.locate import operands

source_info_util.register_exclusion(__file__)

_LOW = primitives.LOW_PRECISION_NAMES
_DTYPE_PARAMS = ("new_dtype", "preferred_element_type", "dtype")


def is_narrow(dtype: Any) -> bool:
    """Whether the experiment recomputes `dtype` in float32.

    float16, bfloat16 and the 8- and 4-bit floats (``float8_e4m3fn``,
    ``float8_e5m2``, ...).

    Examples:
        >>> from jaxnan._src.locate.precision import is_narrow
        >>> is_narrow("float16"), is_narrow("float8_e4m3fn"), is_narrow("float32")
        (True, True, False)
    """
    name = str(dtype)
    return name in _LOW or name.startswith(("float8_", "float4_"))


class Unsupported(Exception):
    """A primitive the upcast evaluator cannot rebuild."""


def has_low_precision(jaxpr: Any) -> bool:
    """Whether any value of `jaxpr` (nested bodies included) is narrow."""
    for v in (*jaxpr.invars, *jaxpr.outvars, *jaxpr.constvars):
        if is_narrow(getattr(getattr(v, "aval", None), "dtype", "")):
            return True
    for eqn in jaxpr.eqns:
        for v in (*eqn.invars, *eqn.outvars):
            if is_narrow(getattr(getattr(v, "aval", None), "dtype", "")):
                return True
        for sub in primitives.sub_jaxprs(eqn, strict=False):
            if has_low_precision(sub.jaxpr):
                return True
    return False


def _up(x: Any) -> Any:
    dt = getattr(x, "dtype", None)
    if dt is not None and is_narrow(dt):
        return jnp.asarray(x, jnp.float32)
    return x


def _params(params: dict) -> dict:
    out = dict(params)
    for key in _DTYPE_PARAMS:
        if key in out and is_narrow(out[key]):
            out[key] = np.dtype(np.float32)
    return out


def _closed(body: Any) -> tuple[Any, Sequence[Any]]:
    if isinstance(body, jex_core.ClosedJaxpr):
        return body.jaxpr, body.consts
    return body, ()


def evaluate(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list:
    """Evaluates `jaxpr` with its narrow values (`is_narrow`) computed in float32."""
    env: dict[Any, Any] = {}
    for v, x in zip(jaxpr.constvars, consts):
        env[v] = _up(x)
    for v, x in zip(jaxpr.invars, args):
        env[v] = _up(x)

    def read(v: Any) -> Any:
        if isinstance(v, jex_core.Literal):
            return _up(np.asarray(v.val))
        return env[v]

    for eqn in jaxpr.eqns:
        outs = _eqn(eqn, [read(v) for v in eqn.invars])
        if not eqn.primitive.multiple_results and len(eqn.outvars) == 1:
            outs = [outs] if not isinstance(outs, list | tuple) else outs
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _eqn(eqn: Any, ins: list) -> Any:
    name = eqn.primitive.name
    p = eqn.params
    subs = primitives.sub_jaxprs(eqn, strict=False)
    if len(subs) == 1 and subs[0].role == primitives.Role.CALL:
        body = subs[0]
        if len(body.jaxpr.invars) == len(ins):
            return evaluate(body.jaxpr, body.consts, ins)
    if name == "cond":
        branches = [_closed(b) for b in p["branches"]]
        fns = [lambda *ops, b=b: evaluate(b[0], b[1], ops) for b in branches]
        return lax.switch(ins[0], fns, *ins[1:])
    if name == "scan":
        return _scan(p, ins)
    if name == "while":
        return _while(p, ins)
    if eqn.primitive is compat.shard_map_p:
        return _shard_map(p, ins)
    if primitives.is_higher_order(eqn):
        raise Unsupported(name)
    if name == "reduce_precision":
        return ins[0]
    out = eqn.primitive.bind(*ins, **_params(p))
    return list(out) if eqn.primitive.multiple_results else out


def _scan(p: dict, ins: list) -> list:
    body, bconsts = _closed(p["jaxpr"])
    nc, nk = p["num_consts"], p["num_carry"]
    consts, init, xs = ins[:nc], ins[nc : nc + nk], ins[nc + nk :]

    def step(carry: tuple, x: tuple) -> tuple:
        outs = evaluate(body, bconsts, (*consts, *carry, *x))
        return tuple(outs[:nk]), tuple(outs[nk:])

    carry, ys = lax.scan(
        step, tuple(init), tuple(xs), length=p["length"], reverse=p["reverse"]
    )
    return [*carry, *ys]


def _while(p: dict, ins: list) -> list:
    cj, cconsts = _closed(p["cond_jaxpr"])
    bj, bconsts = _closed(p["body_jaxpr"])
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cargs, bargs, init = ins[:nc], ins[nc : nc + nb], ins[nc + nb :]
    out = lax.while_loop(
        lambda c: evaluate(cj, cconsts, (*cargs, *c))[0],
        lambda c: tuple(evaluate(bj, bconsts, (*bargs, *c))),
        tuple(init),
    )
    return list(out)


def _shard_map(p: dict, ins: list) -> list:
    body, bconsts = _closed(p["jaxpr"])
    mesh = p["mesh"]
    manual = p.get("newly_manual_axes", p.get("manual_axes"))
    manual = set(mesh.axis_names if manual is None else manual)
    mapped = jax.shard_map(
        lambda *xs: tuple(evaluate(body, bconsts, xs)),
        mesh=mesh,
        in_specs=tuple(p["in_specs"]),
        out_specs=tuple(p["out_specs"]),
        axis_names=manual,
        check_vma=False,
    )
    return list(mapped(*ins))


def finite_in_float32(closed: Any, consts: Sequence[Any], args: Sequence[Any]):
    """True/False: whether every output of the upcast step is finite.

    None when the step holds no narrow value (`is_narrow`), or when a primitive
    cannot be re-evaluated in float32.
    """
    if not has_low_precision(closed.jaxpr):
        return None

    def finite(c, a):
        # Reduced in the program: outputs sharded over processes are not read.
        outs = jax.tree_util.tree_leaves(evaluate(closed.jaxpr, c, a))
        flags = [
            jnp.isfinite(o).all() for o in outs if jnp.issubdtype(o.dtype, jnp.inexact)
        ]
        return jnp.stack(flags).all() if flags else jnp.bool_(True)

    try:
        return bool(jax.jit(finite)(list(consts), list(args)))
    except Exception:  # noqa: BLE001 - an experiment that cannot run says nothing
        return None


def equation_finite_in_float32(eqn: Any, inputs: Sequence[np.ndarray]):
    """Whether the one creating equation is finite with float32 inputs."""
    try:
        # A value spanning processes stays where it is: the equation runs on
        # the global arrays, and only its finiteness is read back.
        ins = [_up(jnp.asarray(operands.of(a).value)) for a in inputs]
        with jax.ensure_compile_time_eval():
            out = eqn.primitive.bind(*ins, **_params(eqn.params))
        outs = out if isinstance(out, list | tuple) else [out]
        return all(
            bool(np.asarray(hosts.read(jnp.all(jnp.isfinite(o)))))
            for o in outs
            if jnp.issubdtype(o.dtype, jnp.inexact)
        )
    except Exception:  # noqa: BLE001 - a primitive that cannot be re-bound
        return None


_NUMBER = r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?"


def _vanishes(value: float, dtype: str) -> str | None:
    if value == 0 or not np.isfinite(value):
        return None
    with np.errstate(over="ignore", under="ignore"):
        rounded = float(np.asarray(value, jnp.dtype(dtype)).astype(np.float64))
    if rounded == 0.0:
        return f"{value:g} is 0.0 in {dtype}"
    if np.isinf(rounded):
        return f"{value:g} is {'-' if value < 0 else ''}inf in {dtype}"
    return None


def lost_constant(
    file: str | None, line: int | None, dtype: str | None, inputs: Sequence[Any]
) -> str | None:
    """A constant that `dtype` cannot hold, on the user line or behind it.

    Looks at the numbers written on the line, at the defaults of the names it
    uses (``eps`` in ``var + self.eps`` or ``def f(x, eps=1e-12)``), at the
    numbers of a dict it unpacks as keyword arguments (``nn.LayerNorm(**ln)``
    with ``ln = {"epsilon": 1e-8}`` in the same file), and at a
    constant-valued float32 input of a cast to `dtype`.
    """
    if dtype not in _LOW:
        return None
    for a in inputs:  # a cast of a constant array (jnp.full(shape, -1e10))
        arr = operands.of(a)
        value = arr.constant() if arr.dtype == np.float32 else None
        if value is not None:
            hit = _vanishes(value, dtype)
            if hit:
                return hit
    if not file or not line:
        return None
    code = linecache.getline(file, line)
    values = [float(v) for v in re.findall(_NUMBER, code)]
    text = "".join(linecache.getlines(file))
    for name in set(re.findall(r"(?:self\.)?([A-Za-z_]\w*)", code)):
        pattern = rf"\b{re.escape(name)}\s*(?::[^=\n,)]*)?=\s*({_NUMBER})"
        values += [float(v) for v in re.findall(pattern, text)]
    for name in set(re.findall(r"\*\*\s*(?:self\.)?([A-Za-z_]\w*)", code)):
        # keyword arguments passed as a dict: nn.LayerNorm(**ln), with
        # ln = {"epsilon": 1e-8, ...} or ln = dict(epsilon=1e-8, ...) in the file
        pattern = rf"\b{re.escape(name)}\s*(?::[^=\n]*)?=\s*(?:\{{|dict\()([^}})]*)"
        for body in re.findall(pattern, text):
            values += [float(v) for v in re.findall(_NUMBER, body)]
    for v in values:
        hit = _vanishes(v, dtype)
        if hit:
            return hit
    return None
