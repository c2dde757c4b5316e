"""Layer importance: GRASS's mean gradient norm (MGN).

For every layer ``l`` GRASS keeps ``importance[l]``, the mean over steps of the
layer's gradient RMS

    ||g_l||_2 / sqrt(n_l)

(``n_l`` is the number of parameters in the layer, so that wide layers do not
dominate). Measurements go into a window (:func:`accumulate`); at a refresh
the window's mean is folded into the MGN (:func:`refresh`), by a running mean
over all measurements or an EMA. A layer not measured in the window keeps its
last MGN. Non-finite norms (a NaN/inf gradient, or NaN for "not measured")
are skipped so that one bad step cannot poison the statistics.

Example::

  >>> import jax.numpy as jnp
  >>> imp, n = jnp.zeros(4), jnp.zeros(4, jnp.int32)
  >>> imp, n = update_importance(imp, n, jnp.array([1, 3]), jnp.array([2., 4.]), decay=None)
  >>> imp.tolist(), n.tolist()
  ([0.0, 2.0, 0.0, 4.0], [0, 1, 0, 1])
"""

from __future__ import annotations

from collections.abc import Mapping

import chex
import jax
import jax.numpy as jnp


def layer_grad_norms(layer_grads: Mapping[str, jax.Array], layer_size: int) -> jax.Array:
  """``||g_l|| / sqrt(layer_size)`` for each layer of a ``role -> [n, ...]`` stack.

  Returns:
    float32 ``[n]``.
  """
  sq = None
  for g in layer_grads.values():
    s = jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1)
    sq = s if sq is None else sq + s
  return jnp.sqrt(sq) / jnp.sqrt(jnp.float32(layer_size))


def adam_gains(layer_grads: Mapping[str, jax.Array], layer_updates: Mapping[str, jax.Array],
               layer_size: int) -> jax.Array:
  """Each layer's first-order loss decrease per parameter from its optimizer step, ``[n]`` float32.

  ``-<g_l, u_l> / n_l`` (importance 'adam'). Adam moves every parameter by about its learning rate
  whatever the gradient's size, so the decrease its step buys is ``lr * mean(g * m_hat / sqrt(v_hat))``:
  ``mean(|g|)`` for a fresh state, not the gradient's RMS the paper uses, and small for a gradient that
  keeps changing sign (its momentum is nearly orthogonal to it) however large its norm. Read in units of
  the inner optimizer's learning rate: give the inner optimizer a unit rate (``optax.adamw(1.0)``) and
  put the schedule after the transform, as :func:`grass_jax.assembly.build_optimizer` does, or the gains of
  different steps are scaled by different rates. Negative gains (a step that raises the loss to first
  order) count as 0; a layer whose update is all zero (a skipped step) is NaN, not measured.

  Args:
    layer_grads, layer_updates: ``role -> [n, ...]`` stacks of the same structure.
    layer_size: parameters per layer.
  """
  dot = moved = None
  for role, g in layer_grads.items():
    u = layer_updates[role].astype(jnp.float32)
    d = jnp.sum((g.astype(jnp.float32) * u).reshape(u.shape[0], -1), axis=1)
    m = jnp.any((u != 0).reshape(u.shape[0], -1), axis=1)
    dot, moved = (d, m) if dot is None else (dot + d, moved | m)
  return jnp.where(moved, jnp.maximum(-dot, 0.0) / jnp.float32(layer_size), jnp.nan)


def update_importance(importance: jax.Array, counts: jax.Array, layers: jax.Array,
                      norms: jax.Array, decay: float | None) -> tuple[jax.Array, jax.Array]:
  """Folds new measurements of the given (distinct) layers into the running mean.

  Args:
    importance: float32 ``[L]`` current estimates.
    counts: int32 ``[L]`` number of measurements folded in so far.
    layers: int32 ``[k]`` distinct layer indices that were measured.
    norms: float32 ``[k]`` their normalised gradient norms.
    decay: None for the arithmetic mean of all measurements; a float in [0, 1)
      for an exponential moving average ``m <- decay * m + (1 - decay) * x``
      (the first measurement initialises ``m``), which forgets early training.

  Returns:
    ``(importance, counts)`` updated at ``layers``; other layers are untouched.
  """
  chex.assert_equal_shape([importance, counts])
  chex.assert_equal_shape([layers, norms])
  # A window of one step, folded at once: the same rule as the windowed MGN.
  rms = jnp.full(importance.shape, jnp.nan, jnp.float32).at[layers].set(norms.astype(jnp.float32))
  window_sum, window_count = accumulate(jnp.zeros_like(rms), jnp.zeros_like(counts), rms)
  return refresh(importance, counts, window_sum, window_count, decay)


def accumulate(window_sum: jax.Array, window_count: jax.Array, rms: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Adds one step's per-layer RMS ``[L]`` (NaN: not measured) to the window ``(sum, count)``."""
  chex.assert_equal_shape([window_sum, window_count, rms])
  ok = jnp.isfinite(rms)
  return window_sum + jnp.where(ok, rms, 0.0), window_count + ok.astype(window_count.dtype)


def refresh(importance: jax.Array, counts: jax.Array, window_sum: jax.Array, window_count: jax.Array,
            ema: float | None) -> tuple[jax.Array, jax.Array]:
  """Folds each layer's window into its MGN; layers with an empty window keep theirs.

  Args:
    importance, counts: float32 / int32 ``[L]``: the MGN and how many step
      measurements it holds.
    window_sum, window_count: the window (:func:`accumulate`).
    ema: None for the running mean over every measurement so far (a window
      of ``n`` steps weighs ``n``); a float ``alpha`` in [0, 1) for
      ``m <- alpha * m + (1 - alpha) * window_mean`` (a layer's first window
      sets ``m``).

  Returns:
    ``(importance, counts)``.
  """
  chex.assert_equal_shape([importance, counts, window_sum, window_count])
  seen = window_count > 0
  n_new = counts + window_count
  if ema is None:
    new = importance + (window_sum - window_count.astype(jnp.float32) * importance) / jnp.maximum(
        n_new, 1).astype(jnp.float32)
  else:
    mean = window_sum / jnp.maximum(window_count, 1).astype(jnp.float32)
    new = jnp.where(counts == 0, mean, ema * importance + (1.0 - ema) * mean)
  return jnp.where(seen, new, importance).astype(importance.dtype), n_new
