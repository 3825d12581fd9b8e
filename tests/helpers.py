"""Helpers shared by the tests: marker lines, checks that can fail, sharding.

`jax.transfer_guard("disallow")` does not stop host callbacks
(`jax.debug.callback`, `pure_callback`, `io_callback`), so a "no host sync"
test built on it passes whatever the program does. `assert_no_host_callback`
looks at the lowered program instead.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "P",
    "assert_bits_equal_but_counters",
    "assert_no_host_callback",
    "buffer_pointers",
    "host_callbacks",
    "marker_line",
    "marker_lines",
    "mesh_of",
    "replicate",
    "shard_map_over",
    "shard_leading",
    "sharded",
    "tagged_line",
]


SKIP_COUNTERS = ("nonfinite_total", "last_nonfinite_step", "skip_step")


def assert_bits_equal_but_counters(a, b) -> None:
    """Every leaf of `a` is `b`'s bit for bit (dtype, key data included),
    but `skip_nonfinite`'s own counters, which count the steps it skipped."""

    def leaves(tree):
        out = []
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            key = jax.tree_util.keystr(path)
            if any(f in key for f in SKIP_COUNTERS):
                continue
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                x = jax.random.key_data(x)
            out.append((key, np.asarray(x)))
        return out

    la, lb = leaves(a), leaves(b)
    assert [k for k, _ in la] == [k for k, _ in lb]
    for (key, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(x, y), key


def marker_lines(path, marker: str) -> list[int]:
    """The 1-based numbers of the lines of `path` that contain `marker`."""
    text = pathlib.Path(path).read_text()
    return [i for i, line in enumerate(text.splitlines(), 1) if marker in line]


def marker_line(path, marker: str) -> int:
    """The number of the one line of `path` that contains `marker`."""
    lines = marker_lines(path, marker)
    if len(lines) != 1:
        raise AssertionError(f"{marker!r} is on lines {lines} of {path}, not once")
    return lines[0]


def tagged_line(path, tag: str) -> int:
    """The number of the line of `path` ending with ``# <- tag``."""
    text = pathlib.Path(path).read_text()
    lines = [
        i
        for i, line in enumerate(text.splitlines(), 1)
        if line.rstrip().endswith(f"# <- {tag}")
    ]
    if len(lines) != 1:
        raise AssertionError(f"'# <- {tag}' ends lines {lines} of {path}, not one")
    return lines[0]


def mesh_of(n: int = 8, axis: str = "d") -> Mesh:
    """A 1-D mesh over the first `n` (forced CPU) devices."""
    return Mesh(jax.devices()[:n], (axis,))


def sharded(x, mesh: Mesh, spec=None):
    """`x` placed on `mesh` with `spec` (split along its first axis by default)."""
    spec = P(mesh.axis_names[0]) if spec is None else spec
    return jax.device_put(x, NamedSharding(mesh, spec))


def shard_map_over(mesh, fn, in_specs, out_specs):
    """`jax.shard_map` with replication checks off, jitted."""
    return jax.jit(
        jax.shard_map(
            fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )
    )


# What a host callback lowers to on CPU, GPU and TPU (the custom-call targets
# `xla_python_cpu_callback`, `xla_ffi_python_cpu_callback`,
# `xla_python_gpu_callback`, ... and the `callback` attributes).
_CALLBACK = re.compile(r"callback", re.IGNORECASE)


def host_callbacks(fn, *args, **kwargs) -> list[str]:
    """Lines of the lowered `jax.jit(fn)(*args)` that call back to the host."""
    text = jax.jit(fn).lower(*args, **kwargs).as_text()
    return [ln.strip() for ln in text.splitlines() if _CALLBACK.search(ln)]


def assert_no_host_callback(fn, *args, **kwargs) -> None:
    """Fails when the lowered `jax.jit(fn)(*args)` holds a host callback."""
    found = host_callbacks(fn, *args, **kwargs)
    assert not found, "host callback in the lowered program:\n" + "\n".join(found[:5])


def replicate(tree, mesh: Mesh):
    """`tree` with every leaf replicated over `mesh`."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_leading(tree, mesh: Mesh):
    """`tree` with each leaf whose leading axis divides the mesh size sharded
    along it, the others replicated."""
    n = int(np.prod(mesh.devices.shape))
    axis = mesh.axis_names[0]

    def one(x):
        shape = np.shape(x)
        spec = P(axis) if shape and shape[0] % n == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map(one, tree)


def buffer_pointers(tree) -> list[int]:
    """The device buffer address of every array shard in `tree`."""
    out = []
    for x in jax.tree_util.tree_leaves(tree):
        for shard in x.addressable_shards:
            out.append(shard.data.unsafe_buffer_pointer())
    return out


def optax_train_step(tx, loss_fn):
    """The train step of optax's examples, with the loss handed to `tx.update`.

    ``train_step(params, opt_state, batch) -> (params, opt_state, loss)``.
    """

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


# -- the guard tests' linear-regression run --------------------------------


def regression_batches(steps, bad=(), size=8, seed=0):
    """`steps` batches ``{"x", "y"}`` of a linear model; NaN at ``x[2, 0]`` in `bad`."""
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=(3,)).astype(np.float32)
    out = []
    for i in range(steps):
        x = rng.normal(size=(size, 3)).astype(np.float32)
        if i in bad:
            x[2, 0] = np.nan
        out.append({"x": x, "y": (x @ w_true).astype(np.float32)})
    return out


def regression_loss(params, batch):
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)


def regression_init(tx):
    params = {"w": jnp.zeros(3)}
    return params, tx.init(params)
