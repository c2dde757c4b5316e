"""A toy regression problem on a deep residual MLP stack, to compare strategies in seconds.

Used by ``scripts/demo.py`` and the tests; it needs no model weights or data.

Example::

  >>> result = run_toy(strategy='grass', steps=20)
  >>> result['final_loss'] < result['initial_loss']
  True
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

from grass_jax.layers import stacked_layers
from grass_jax.transform import strategy as make_strategy


def toy_problem(depth: int = 12, width: int = 32, batch: int = 128, seed: int = 0) -> tuple[dict, Any]:
  """Returns ``(params, loss_fn)`` of a residual tanh MLP with stacked layers."""
  kx, kw, kt = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(kx, (batch, width))
  teacher = jax.random.normal(kt, (width, 1)) / jnp.sqrt(width)
  y = jnp.sin(3.0 * x @ teacher)
  params = {
      "layers": {"w": jax.random.normal(kw, (depth, width, width)) * (0.5 / jnp.sqrt(width)),
                 "b": jnp.zeros((depth, width))},
      "head": jnp.zeros((width, 1)),
  }

  def loss_fn(p: dict) -> jax.Array:
    def body(h, wb):
      w, b = wb
      return h + jnp.tanh(h @ w + b), None
    h, _ = jax.lax.scan(body, x, (p["layers"]["w"], p["layers"]["b"]))
    return jnp.mean((h @ p["head"] - y) ** 2)

  return params, loss_fn


def make_step(tx: optax.GradientTransformation, loss_fn: Any) -> Any:
  """Jitted ``(params, state) -> (params, state, loss)`` of plain gradient descent with ``tx``."""

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  return step


def run_toy(strategy: str = "grass", steps: int = 200, num_active: int = 2, period: int = 10,
            learning_rate: float = 3e-3, seed: int = 0) -> dict[str, float]:
  """Trains the toy problem with one strategy; returns losses and wall time."""
  params, loss_fn = toy_problem(seed=seed)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   make_strategy(strategy, optax.adam(learning_rate), layers=stacked_layers(),
                                 num_active=None if strategy == "full" else num_active, period=period,
                                 seed=seed))
  state = tx.init(params)
  step = make_step(tx, loss_fn)
  initial = float(loss_fn(params))
  params, state, _ = step(params, state)  # compile outside the timing
  start = time.perf_counter()
  for _ in range(steps - 1):
    params, state, _ = step(params, state)
  final = float(loss_fn(params))
  return {"initial_loss": initial, "final_loss": final, "seconds": time.perf_counter() - start}
