"""A deep linear network (Flax linen) on tiny-valued inputs with a badly
scaled initialization: the forward pass stays finite, but the cotangents
grow like the weights' product and overflow in the backward pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp

EXPECT = {
    "primitive": "dot_general",
    "phase": "backward",
    "cause": "exploding_gradient",
    "seen": "dot_general received max |x|",
}


class DeepLinear(nn.Module):
    depth: int = 10
    width: int = 8

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.constant(3000.0)
        for _ in range(self.depth):
            x = nn.Dense(self.width, use_bias=False, kernel_init=init)(x)  # <- creates
        return x


def make():
    model = DeepLinear()
    x = jnp.full((2, 8), 1e-30)
    variables = model.init(jax.random.key(5), x)

    def loss(variables, x):
        return jnp.sum(model.apply(variables, x))

    return jax.value_and_grad(loss), (variables, x)
