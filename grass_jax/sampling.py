"""Layer sampling probabilities and draws without replacement.

Two rules turn the layers' MGN ``m`` into probabilities, each mixed with a
uniform floor so that every layer keeps probability at least ``epsilon / L``:

* ``softmax`` (the paper's): ``softmax(m / (mean(m) * temperature))``. The MGN
  is divided by its mean over the layers first, because raw values (around
  1e-4, and different for every model and loss scale) would make any fixed
  temperature meaningless: with it, a layer whose MGN is ``1 + T`` times the
  mean weighs ``e`` times as much as an average layer;
* ``power``: ``normalise(m ** (1 / temperature))``.

::

    p = (1 - epsilon) * rule(m) + epsilon / L

A layer without a measurement yet uses the mean importance of the measured
ones (all uniform before any measurement). ``num_active`` distinct layers are
drawn by the Gumbel-top-k trick, i.e. successive sampling without replacement
where each next layer is drawn with probability proportional to ``p`` among the
layers not drawn yet. With ``num_active = 1`` layer ``l`` is drawn with
probability exactly ``p_l``.

Example::

  >>> import jax, jax.numpy as jnp
  >>> p = probabilities(jnp.array([1., 3.]), jnp.array([1, 1]), temperature=1.0, epsilon=0.0)
  >>> p.tolist()
  [0.25, 0.75]
  >>> draw(jax.random.PRNGKey(0), p, 2).tolist()
  [0, 1]
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def _fill_unknown(importance: jax.Array, counts: jax.Array) -> jax.Array:
  """A layer not measured yet gets the mean MGN of the measured ones (all 1 before any measurement)."""
  chex.assert_equal_shape([importance, counts])
  known = counts > 0
  n_known = jnp.sum(known)
  fill = jnp.where(n_known > 0, jnp.sum(jnp.where(known, importance, 0.0)) / jnp.maximum(n_known, 1), 1.0)
  return jnp.where(known, importance, fill).astype(jnp.float32)


def probabilities(importance: jax.Array, counts: jax.Array, *, temperature: float,
                  epsilon: float) -> jax.Array:
  """Sampling probabilities ``[L]`` (float32, sum 1) from importance estimates."""
  chex.assert_rank(importance, 1)
  chex.assert_equal_shape([importance, counts])
  num_layers = importance.shape[0]
  imp = _fill_unknown(importance, counts)
  # log space: importance ** (1/T) over- or underflows for small T.
  logits = jnp.log(jnp.maximum(imp, jnp.finfo(jnp.float32).tiny)) / temperature
  p_imp = jax.nn.softmax(logits)
  return (1.0 - epsilon) * p_imp + epsilon / num_layers


def softmax_probabilities(importance: jax.Array, counts: jax.Array, *, temperature: float,
                          epsilon: float) -> jax.Array:
  """The paper's rule: softmax over the mean-normalised MGN (module docstring); ``[L]``, sum 1."""
  chex.assert_rank(importance, 1)
  imp = _fill_unknown(importance, counts)
  scaled = imp / jnp.maximum(jnp.mean(imp), jnp.finfo(jnp.float32).tiny)
  return (1.0 - epsilon) * jax.nn.softmax(scaled / temperature) + epsilon / importance.shape[0]


PROBABILITIES = ("softmax", "power")


def layer_probabilities(rule: str, importance: jax.Array, counts: jax.Array, *, temperature: float,
                        epsilon: float) -> jax.Array:
  """Probabilities by rule name: 'softmax' or 'power'."""
  if rule == "softmax":
    return softmax_probabilities(importance, counts, temperature=temperature, epsilon=epsilon)
  if rule == "power":
    return probabilities(importance, counts, temperature=temperature, epsilon=epsilon)
  raise ValueError(f"probability rule must be one of {PROBABILITIES}; got {rule!r}")


def uniform(num_layers: int) -> jax.Array:
  """Uniform probabilities ``[L]`` (LISA's sampling)."""
  return jnp.full((num_layers,), 1.0 / num_layers, jnp.float32)


def draw(key: chex.PRNGKey, probs: jax.Array, num: int, first: jax.Array | None = None, *,
         sort: bool = True) -> jax.Array:
  """Draws ``num`` distinct layer indices (int32) without replacement: sorted, or with ``sort=False`` in the
  random order of the draw (the same layers).

  ``first``: bool ``[L]``; layers where it is True are drawn before any other (by ``probs`` among
  themselves), the others only to fill up when fewer than ``num`` are True. The same key gives the
  same Gumbel noise with or without it.
  """
  chex.assert_rank(probs, 1)
  if num > probs.shape[0]:
    raise ValueError(f"cannot draw {num} distinct layers out of {probs.shape[0]}")
  gumbel = jax.random.gumbel(key, probs.shape, jnp.float32)
  scores = jnp.log(probs) + gumbel
  if first is not None:
    chex.assert_equal_shape([probs, first])
    # log p >= log(tiny) = -87 and Gumbel noise is far below 1e4: a True layer outranks every False one.
    scores = jnp.where(first, jnp.maximum(scores, -1e3) + 1e4, scores)
  _, idx = jax.lax.top_k(scores, num)
  return (jnp.sort(idx) if sort else idx).astype(jnp.int32)


def next_cycle(undrawn: jax.Array, drawn: jax.Array) -> jax.Array:
  """Coverage: the layers still owed a turn in the cycle after ``drawn`` (int ``[gamma]``) were drawn.

  A cycle ends once every layer has had a turn; layers drawn beyond the end to fill the last draw count
  for the next one. ``undrawn`` (bool ``[L]``) is the mask before the draw, as :func:`draw` took it.
  """
  chosen = jnp.zeros_like(undrawn).at[drawn].set(True)
  left = undrawn & ~chosen
  fillers = chosen & ~undrawn
  return jnp.where(jnp.any(left), left, ~fillers)
