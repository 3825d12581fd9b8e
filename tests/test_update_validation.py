"""Every transform's update names the leaf and both shapes of a mismatch.

One shared preamble (`core/validation.validate_update_call`) serves the eight
transforms; a mismatch between the gradients and the params, or between the
gradients and an optimizer state that mirrors the params, is a ValueError
naming the leaf's path and both shapes, not an error deep inside.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax
import pytest

import jaxnan

TRANSFORMS = {
    "zero_nonfinite": jaxnan.zero_nonfinite,
    "clip_by_global_norm": lambda: jaxnan.clip_by_global_norm(1.0),
    "skip_nonfinite": lambda: jaxnan.skip_nonfinite(optax.adam(1e-2)),
    "skip_spikes": lambda: jaxnan.skip_spikes(optax.sgd(1e-2)),
    "zscore_clip": jaxnan.zscore_clip,
    "adagc": jaxnan.adagc,
    "monitor": lambda: jaxnan.monitor(optax.adam(1e-2)),
    "dynamic_loss_scale": lambda: jaxnan.dynamic_loss_scale(optax.sgd(1e-2)),
}

PARAMS = {"a": jnp.ones((2, 3)), "b": jnp.ones(4)}
WRONG = {"a": jnp.ones((3, 2)), "b": jnp.ones(4)}


def _state(tx):
    return tx.init(PARAMS)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_grads_of_another_shape_than_params(name):
    tx = TRANSFORMS[name]()
    with pytest.raises(
        ValueError, match=r"updates\['a'\] has shape \(3, 2\).*\(2, 3\)"
    ):
        tx.update(WRONG, _state(tx), PARAMS, loss=jnp.float32(1.0))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_grads_of_another_structure_than_params(name):
    tx = TRANSFORMS[name]()
    with pytest.raises(ValueError, match="different tree structures"):
        tx.update({"a": PARAMS["a"]}, _state(tx), PARAMS, loss=jnp.float32(1.0))


WRAPPERS = {
    "monitor": jaxnan.monitor,
    "skip_nonfinite": jaxnan.skip_nonfinite,
    "skip_spikes": jaxnan.skip_spikes,
    "dynamic_loss_scale": jaxnan.dynamic_loss_scale,
}


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_grads_of_another_shape_than_the_inner_state(name):
    # No params: the optimizer state's moments mirror the params. Before,
    # monitor(adam) failed deep inside with "add got incompatible shapes".
    tx = WRAPPERS[name](optax.adam(1e-2))
    with pytest.raises(
        ValueError, match=r"updates\['a'\] has shape \(3, 2\).*mu\['a'\] has shape"
    ):
        tx.update(WRONG, _state(tx), loss=jnp.float32(1.0))


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_broadcastable_grads_do_not_reshape_the_inner_state(name):
    # Gradients of shape (4, 1) broadcast against Adam's (4,) moments: the
    # inner update traces, and without the check the moments, the updates
    # and then the params silently became (4, 4) (optax's quickstart calls
    # update(grads, state) with no params).
    tx = WRAPPERS[name](optax.adam(1e-2))
    column = {"a": jnp.ones((2, 3)), "b": jnp.ones((4, 1))}
    with pytest.raises(
        ValueError, match=r"updates\['b'\] has shape \(4, 1\).*mu\['b'\] has \S+ \(4,\)"
    ):
        tx.update(column, _state(tx), loss=jnp.float32(1.0))


def test_multisteps_accumulator_is_checked():
    tx = jaxnan.skip_nonfinite(optax.MultiSteps(optax.sgd(0.1), every_k_schedule=2))
    with pytest.raises(ValueError, match=r"acc_grads\['a'\] has shape \(2, 3\)"):
        tx.update(WRONG, _state(tx))


def test_per_leaf_scalar_state_is_not_mistaken_for_a_mirror():
    # zero_nonfinite's per-leaf counters have the params' structure and
    # scalar leaves: a healthy call passes.
    tx = jaxnan.zero_nonfinite()
    updates, _ = tx.update(PARAMS, _state(tx), PARAMS)
    assert updates["a"].shape == (2, 3)


def test_string_loss_is_a_type_error():
    tx = jaxnan.monitor(optax.sgd(0.1))
    with pytest.raises(TypeError, match="loss"):
        tx.update(PARAMS, _state(tx), PARAMS, loss="nan")
