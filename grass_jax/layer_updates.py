"""The inner optimizer applied to the active layers one at a time, each with its own state.

A layer's inner state may live on the device, or in host memory and be streamed to the device for its
update (:class:`StateStream`): one layer's state at a time, or one weight matrix's, so that the device
holds a piece of the optimizer state instead of the active layers' whole state
(:mod:`grass_jax.offload` builds the stream; :mod:`grass_jax.transform` calls :func:`per_layer_update`).

Example::

  updates, states = per_layer_update(optax.adamw(1e-5), slot_grads, slot_states, slot_params, num=2)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["StateStream", "guard", "per_layer_update", "take_layer"]


def take_layer(tree: Any, idx: jax.Array) -> Any:
  return jax.tree.map(lambda x: x[idx], tree)


def guard(ok: jax.Array | None, updates: Any, new_state: Any, old_state: Any) -> tuple[Any, Any]:
  """``(updates, state)`` of a step, or zero updates and the old state where ``ok`` is False."""
  if ok is None:
    return updates, new_state
  return (jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates),
          jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_state, old_state))


class StateStream(NamedTuple):
  """Moves an active layer's inner state between host and device around its update.

  Passed to the GRASS update as ``tx.update(..., state_stream=...)`` (see
  :func:`grass_jax.offload.state_stream`) when the active layers' states live in
  host memory: each layer's state (or each weight matrix's, ``by_leaf``) is
  fetched, updated and stored in turn, so the device holds one piece at a time.

  Attributes:
    fetch: ``(host_state, after, part=None) -> device_state``; the copy must
      not start before ``after`` (a pytree) is computed, which orders the
      copies. ``part``: None (a layer's state), or a function that cuts a
      tree shaped like a layer's state (the state's shardings, say) to the
      piece ``host_state`` is (one leaf's, with ``by_leaf``).
    store: ``(device_state, part=None) -> host_state``.
    by_leaf: move and update one weight matrix's state at a time instead of
      one layer's (:func:`_per_leaf_streamed_update`): the device holds about
      two matrices' moments, not a layer's, and each update is written over
      its gradient. (The next matrix's copy to the device may run beside this
      one's copy back; XLA may also run them one after the other.) Needs an inner
      optimizer that updates each leaf on its own (adam, adamw, sgd, lion,
      adafactor, ...: not one that reduces across a layer's leaves, such as
      ``clip_by_global_norm`` inside ``inner``). A state that does not split
      by leaf (a non-scalar leaf outside the parameter-shaped subtrees)
      streams by layer.
  """
  fetch: Callable[..., Any]
  store: Callable[..., Any]
  by_leaf: bool = False


def _is_group(x: Any, keys: set[str]) -> bool:
  """Whether ``x`` is a parameter-shaped subtree of a layer's inner state (a dict over the layer's leaves)."""
  return isinstance(x, dict) and set(x) == keys


def _splits_by_leaf(state: Any, keys: set[str]) -> bool:
  """Whether a layer's inner state is parameter-shaped subtrees (moments) and scalars (step counts) only."""
  flat = jax.tree.leaves(state, is_leaf=lambda x: _is_group(x, keys))
  return (any(_is_group(x, keys) for x in flat)
          and all(_is_group(x, keys) or np.ndim(x) == 0 for x in flat))


def _leaf_state(state: Any, keys: set[str], key: str) -> Any:
  """The part of a layer's inner state for one leaf: each parameter-shaped subtree cut to ``{key: ...}``."""
  return jax.tree.map(lambda x: {key: x[key]} if _is_group(x, keys) else x, state,
                      is_leaf=lambda x: _is_group(x, keys))


def _merge_leaf_states(parts: dict[str, Any]) -> Any:
  """Inverse of :func:`_leaf_state`: one layer's state from its leaves' parts (scalars from the first part).

  The scalars (step counts) are equal in every part: each leaf's update advanced its own copy once.
  """
  first = next(iter(parts))
  flat = {k: jax.tree.flatten(p, is_leaf=lambda x, k=k: _is_group(x, {k})) for k, p in parts.items()}
  leaves, treedef = flat[first]
  merged = [{k: flat[k][0][n][k] for k in parts} if _is_group(x, {first}) else x for n, x in enumerate(leaves)]
  return treedef.unflatten(merged)


def per_layer_update(inner: optax.GradientTransformation, grads: Any, states: tuple, params: Any,
                      num: int, ok: jax.Array | None = None,
                      stream: StateStream | None = None) -> tuple[Any, tuple]:
  """``inner.update`` on each of ``num`` stacked layers with its own state (a tuple).

  An unrolled loop rather than ``jax.vmap``: under vmap the per-layer step
  count becomes a vector and XLA evaluates the bias correction's power through
  a different (vectorised) code path, so updates would differ from the bare
  inner optimizer's in the last bit. ``ok``: see :func:`guard`. ``stream``: states live in host memory; each
  is fetched after the previous layer's update and stored back.
  """
  if stream is not None and stream.by_leaf and _splits_by_leaf(states[0], set(grads)):
    return _per_leaf_streamed_update(inner, grads, states, params, num, ok, stream)
  outs, new_states = [], []
  after = grads
  for i in range(num):
    p_i = None if params is None else take_layer(params, i)
    old = states[i] if stream is None else stream.fetch(states[i], after)
    u, s = guard(ok, *inner.update(take_layer(grads, i), old, p_i), old)
    after = u
    outs.append(u)
    new_states.append(s if stream is None else stream.store(s))
  return jax.tree.map(lambda *xs: jnp.stack(xs), *outs), tuple(new_states)


def _per_leaf_streamed_update(inner: optax.GradientTransformation, grads: dict, states: tuple, params: Any,
                              num: int, ok: jax.Array | None, stream: StateStream) -> tuple[Any, tuple]:
  """:func:`per_layer_update` with host-resident states moved one leaf (weight matrix) at a time.

  A double buffer: leaf ``n``'s state is fetched once leaf ``n - 2``'s update is computed, so the copy
  to the device may run beside leaf ``n - 1``'s update and copy back, and at most a few matrices' moments
  are on the device at once. Each leaf is updated by ``inner`` on its own; the results equal the
  per-layer update's for an inner optimizer that acts leaf by leaf (:class:`StateStream`).
  """
  keys = sorted(grads)
  # Each update is written over its gradient (same dtype): the stacked gradients become the stacked updates,
  # so the updates take no buffers of their own.
  work, separate = dict(grads), {}
  parts = [dict() for _ in range(num)]
  done = []  # each leaf's update and its state back on the host, in order: what the fetch two leaves later waits for
  for i in range(num):
    for key in keys:
      part = functools.partial(_leaf_state, keys=set(keys), key=key)
      old = stream.fetch(part(states[i]), grads if len(done) < 2 else done[-2], part)
      p = None if params is None else {key: params[key][i]}
      u, new = guard(ok, *inner.update({key: work[key][i]}, old, p), old)
      if u[key].dtype == grads[key].dtype:
        work[key] = work[key].at[i].set(u[key])
      else:  # an update of another dtype than its gradient: stacked on its own
        separate.setdefault(key, []).append(u[key])
      parts[i][key] = stream.store(new, part)
      # Waiting for the state back on the host too bounds the device copies of new states held for their
      # copy back: XLA would otherwise finish every copy back at the end of the step.
      done.append((u, parts[i][key]))
  work.update({key: jnp.stack(us) for key, us in separate.items()})
  return work, tuple(_merge_leaf_states(parts[i]) for i in range(num))
