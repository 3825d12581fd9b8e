"""The Flax NNX scan over layers the tests share.

Written as flax/examples/nnx_toy_examples/06_scan_over_layers.py writes it:
`nnx.vmap` builds the stack of blocks, `nnx.scan` runs it. Import it only
after `pytest.importorskip("flax.nnx")`.
"""

from flax import nnx


def stack(make_block, length, rngs):
    """`length` blocks made by `make_block(rngs)`, stacked on a leading axis."""

    @nnx.split_rngs(splits=length)
    @nnx.vmap(axis_size=length)
    def create_block(rngs: nnx.Rngs):
        return make_block(rngs)

    return create_block(rngs)


def run(layers, x):
    """`x` through each block of the stack in turn."""

    @nnx.scan
    def scan_fn(x, block):
        return block(x), None

    x, _ = scan_fn(x, layers)
    return x
