"""The framework-adapter and guard-policy registries (DESIGN.md, Extension
points): a new framework is one adapter, a policy is one registered rule."""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnan
from jaxnan._src.frameworks import registry
from jaxnan._src.guard import incidents, policies


class Box:
    """A toy framework's mutable model: params and optimizer state as attributes."""

    def __init__(self, params, opt_state):
        self.params, self.opt_state = params, opt_state


@pytest.fixture
def toyfw(monkeypatch):
    """A framework module `toyfw` with its adapter registered, imported."""
    monkeypatch.setitem(sys.modules, "toyfw", types.ModuleType("toyfw"))
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))
    monkeypatch.setattr(registry, "ADAPTERS", dict(registry.ADAPTERS))
    calls = []

    def split(objs):
        single = isinstance(objs, Box)
        boxes = (objs,) if single else objs
        return (single, len(boxes)), [(b.params, b.opt_state) for b in boxes]

    def merge(definition, state):
        single, _ = definition
        boxes = tuple(Box(p, o) for p, o in state)
        return boxes[0] if single else boxes

    def update(objs, state):
        for b, (p, o) in zip(objs, state):
            b.params, b.opt_state = p, o

    @registry.register_adapter("toyfw")
    def toy_adapter():
        calls.append("made")
        return registry.Adapter(
            name="toyfw",
            is_node=lambda x: isinstance(x, Box),
            split=split,
            merge=merge,
            update=update,
            view=lambda b: (b.params, b.opt_state),
        )

    return calls


def _step(tx):
    def train_step(box, batch):
        def loss_fn(p):
            return jnp.mean((batch["x"] @ p["w"] - batch["y"]) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(box.params)
        updates, box.opt_state = tx.update(grads, box.opt_state, box.params, loss=loss)
        box.params = optax.apply_updates(box.params, updates)
        return loss

    return train_step


def _batches(bad_step):
    rng = np.random.default_rng(0)
    out = []
    for i in range(4):
        x = rng.normal(size=(8, 3)).astype(np.float32)
        if i == bad_step:
            x[5, 1] = np.nan
        out.append({"x": x, "y": x.sum(1)})
    return out


def test_a_new_framework_is_one_adapter_for_the_guard(toyfw):
    tx = jaxnan.skip_nonfinite(optax.adam(0.1))
    guarded, plain = (
        Box(p, tx.init(p)) for p in ({"w": jnp.zeros(3)}, {"w": jnp.zeros(3)})
    )
    step, plain_step = jaxnan.guard(_step(tx)), _step(tx)
    for i, b in enumerate(_batches(bad_step=2)):
        step(guarded, b)
        if i != 2:
            plain_step(plain, b)
    step.finish()
    assert toyfw == ["made"]  # made once, on first use
    # The bad step left the box as it was; the healthy ones moved it as the
    # plain loop did, bit for bit.
    np.testing.assert_array_equal(guarded.params["w"], plain.params["w"])
    (incident,) = step.incidents
    assert (incident.step, incident.rows) == (2, (5,))


def test_an_adapter_is_made_only_once_its_framework_is_imported(monkeypatch):
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))
    monkeypatch.setattr(registry, "ADAPTERS", dict(registry.ADAPTERS))
    made = []
    registry.register_adapter("not_imported_fw")(lambda: made.append(1))
    registry.active()
    assert made == [] and "not_imported_fw" not in registry.ADAPTERS
    with pytest.raises(ValueError, match="already has an adapter"):
        registry.register_adapter("not_imported_fw")(lambda: None)


def test_every_policy_has_one_rule():
    assert set(policies.POLICY_RULES) == set(incidents.Policy)
    assert [p for p, r in policies.POLICY_RULES.items() if r.raises] == [
        incidents.Policy.RAISE
    ]
    assert [p for p, r in policies.POLICY_RULES.items() if r.snapshots] == [
        incidents.Policy.ROLLBACK
    ]
    with pytest.raises(ValueError, match="already has a rule"):
        policies.register_policy(incidents.Policy.SKIP)(policies.Skip)


def test_the_guard_asks_the_rule_not_the_policy(monkeypatch):
    # A rule that rolls back without being called "rollback": the guard keeps
    # snapshots because the rule asks for them, and goes on from its state.
    class RollbackNamedSkip(policies.Rollback):
        pass

    monkeypatch.setitem(
        policies.POLICY_RULES, incidents.Policy.SKIP, RollbackNamedSkip()
    )
    tx = jaxnan.skip_nonfinite(optax.sgd(0.1))
    step = jaxnan.guard(_plain_step(tx), policy="skip", snapshot_every=2)
    params = {"w": jnp.zeros(3)}
    opt_state = tx.init(params)
    for b in _batches(bad_step=2):
        params, opt_state, _ = step(params, opt_state, b)
    step.finish()
    assert [i.action for i in step.incidents] == [incidents.Action.ROLLED_BACK]


def _plain_step(tx):
    @jax.jit
    def train_step(params, opt_state, batch):
        def loss_fn(p):
            return jnp.mean((batch["x"] @ p["w"] - batch["y"]) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step
