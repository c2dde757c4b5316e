"""grass_jax.transform composed with optax's own wrappers, as docs/optax.md promises."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import grass_jax
from tests.float_bounds import (assert_adam_runs_agree, assert_adam_runs_agree_given_gradient_error,
                                summed_gradient_error)
from tests.test_transform import random_grads, stacked_params


def _grass(inner, **kw):
  return grass_jax.transform(inner, layers=grass_jax.stacked_layers(), num_active=2, period=2, seed=0, **kw)


def _run(tx, grads, params=None):
  params = stacked_params() if params is None else params
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
  return params, state


def test_inject_hyperparams_as_the_inner_optimizer_equals_the_plain_one():
  grads = [random_grads(stacked_params(), i) for i in range(6)]
  injected, _ = _run(_grass(optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, weight_decay=0.1)), grads)
  plain, _ = _run(_grass(optax.adamw(1e-2, weight_decay=0.1)), grads)
  jax.tree.map(lambda a, b: assert_adam_runs_agree(a, b, steps=6, lr=1e-2), injected, plain)


def test_inject_hyperparams_around_grass_sets_the_learning_rate_between_steps():
  tx = optax.inject_hyperparams(lambda learning_rate: optax.chain(_grass(optax.adam(1.0)),
                                                                  optax.scale(-learning_rate)))(learning_rate=1e-2)
  params = stacked_params()
  state = tx.init(params)
  g = random_grads(params, 0)
  u1, state = jax.jit(tx.update)(g, state, params)
  state.hyperparams["learning_rate"] = jnp.asarray(0.0)
  u2, _ = jax.jit(tx.update)(g, state, params)
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(u1)) > 1e-3  # the active layers moved
  for x in jax.tree.leaves(u2):
    np.testing.assert_array_equal(x, 0.0)  # learning rate 0: nothing moves


def test_multi_steps_around_grass_equals_grass_on_the_mean_gradients():
  # optax.MultiSteps(k=2) accumulates two micro-batches' gradients and applies their mean once: the layers
  # switch on GRASS's own count of applied steps (period 2 = 4 micro-batches), not on micro-batches.
  # MultiSteps keeps a running mean, which rounds otherwise than (a + b) / 2: the mean gradients differ by a
  # few U, and Adam (with an eps that sets the scale, tests/float_bounds.py) carries that to the weights.
  grads = [random_grads(stacked_params(), i) for i in range(8)]
  multi, m_state = _run(optax.MultiSteps(_grass(optax.adam(1e-2, eps=0.1)), every_k_schedule=2), grads)
  means = [jax.tree.map(lambda a, b: (a + b) / 2, grads[i], grads[i + 1]) for i in range(0, 8, 2)]
  single, s_state = _run(_grass(optax.adam(1e-2, eps=0.1)), means)
  largest = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
  atol = assert_adam_runs_agree_given_gradient_error(multi, single, steps=4, lr=1e-2, eps=0.1,
                                                     grad_error=summed_gradient_error(largest, terms=3))
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(multi), jax.tree.leaves(stacked_params())))
  assert moved > 100 * atol  # the runs trained: a lost or doubled step would show
  np.testing.assert_array_equal(grass_jax.find_state(m_state).active, grass_jax.find_state(s_state).active)
