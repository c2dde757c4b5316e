"""Importance from what training a layer gains: the loss decrease its period realises (a bandit over layers).

The gradient norm predicts the next step's loss decrease; ``importance_from='gain'`` measures the decrease
instead, from the training loss the train step computes anyway (measuring costs nothing). Within each
period the mean loss of its second half is compared with that of its first half: what changed between
them is mostly what the period's own layers learned. That relative decrease, less the mean decrease of
all periods so far (the schedule and the data make the loss fall whoever trains), is the period's credit,
given to the layers trained in it. Each layer's importance is the EMA of its credits, and
:func:`probabilities` turns them into draws: a softmax over the credits in units of their spread, with
layers never credited taking the best credit (optimism, so each is tried), and a uniform floor.

The trace of the loss is float32 ``[6]``: the current period's first-half loss sum and step count, its
second half's, and the sum and number of the periods' relative decreases.

Example::

  >>> import jax.numpy as jnp
  >>> t = add_loss(jnp.zeros(6), 4.0, second_half=False)
  >>> t = add_loss(t, 3.0, second_half=True)
  >>> credit, has, t = period_credit(t)
  >>> bool(has), float(credit), t.tolist()   # the first decrease is its own baseline
  (True, 0.0, [0.0, 0.0, 0.0, 0.0, 0.25, 1.0])
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

TRACE_SIZE = 6


def add_loss(trace: jax.Array, loss: jax.Array, *, second_half: jax.Array | bool) -> jax.Array:
  """The trace with one step's training loss added to its half of the period (a non-finite loss is left out)."""
  chex.assert_shape(trace, (TRACE_SIZE,))
  ok = jnp.isfinite(loss)
  i = jnp.where(second_half, 2, 0)
  return trace.at[i].add(jnp.where(ok, loss, 0.0)).at[i + 1].add(ok.astype(trace.dtype))


def period_credit(trace: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """At a period's end: ``(credit, has_credit, trace for the next period)``.

  ``credit`` is the relative decrease from the period's first-half mean loss to its second half's, less the
  mean decrease of the periods before it (the first decrease is its own baseline: credit 0); ``has_credit``
  is False where a half had no finite loss.
  """
  chex.assert_shape(trace, (TRACE_SIZE,))
  first = trace[0] / jnp.maximum(trace[1], 1.0)
  second = trace[2] / jnp.maximum(trace[3], 1.0)
  has = (trace[1] > 0) & (trace[3] > 0) & (first > 0)
  decrease = jnp.where(has, (first - second) / jnp.where(first > 0, first, 1.0), 0.0)
  baseline = jnp.where(trace[5] > 0, trace[4] / jnp.maximum(trace[5], 1.0), decrease)
  credit = jnp.where(has, decrease - baseline, 0.0)
  nxt = jnp.zeros_like(trace).at[4].set(trace[4] + decrease).at[5].set(trace[5] + has.astype(trace.dtype))
  return credit, has, nxt


def probabilities(credits: jax.Array, counts: jax.Array, *, temperature: float, epsilon: float) -> jax.Array:
  """``(1 - epsilon) * softmax(z / T) + epsilon / L`` with ``z`` the credits in units of their spread over the
  credited layers; a layer never credited takes the best ``z`` (it is tried before it is judged)."""
  chex.assert_rank(credits, 1)
  chex.assert_equal_shape([credits, counts])
  known = counts > 0
  n = jnp.maximum(jnp.sum(known), 1)
  mean = jnp.sum(jnp.where(known, credits, 0.0)) / n
  std = jnp.sqrt(jnp.sum(jnp.where(known, (credits - mean) ** 2, 0.0)) / n)
  z = jnp.where(known, (credits - mean) / jnp.maximum(std, 1e-12), 0.0)
  best = jnp.where(jnp.any(known), jnp.max(jnp.where(known, z, -jnp.inf)), 0.0)
  z = jnp.where(known, z, best)
  return ((1.0 - epsilon) * jax.nn.softmax(z / temperature) + epsilon / credits.shape[0]).astype(jnp.float32)
