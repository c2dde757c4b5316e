"""GRASS as an optax ``GradientTransformation``: adaptive layer-wise sampling.

:func:`transform` wraps an inner optimizer (e.g. ``optax.adamw``) so that only
``num_active`` of the ``L`` transformer layers (plus an always-on group) are
updated at a time. Every ``period`` steps a new set of layers is drawn with
probabilities derived from each layer's mean gradient norm
(:mod:`grass_jax.importance`, :mod:`grass_jax.sampling`). Updates of the other
layers are exactly zero; their inner-optimizer moments are kept and used again
when the layer is drawn again.

Gradients may come in two forms:

* **full form**: the usual optax form, same shapes as the parameters;
* **slot form** (stacked layouts only): layer leaves have a leading axis of
  ``num_active`` holding the gradients of the active layers in the order of
  ``state.active``, as produced by differentiating with respect to
  :func:`gather_active` params. The frozen layers' gradients then never exist,
  and clipping in the same ``optax.chain`` sees only the trained parameters.

Updates are returned in the form the gradients came in.

Example::

  >>> import jax, jax.numpy as jnp, optax, grass_jax
  >>> params = {'embed': jnp.ones((8, 4)), 'layers': {'w': jnp.ones((6, 4, 4))}}
  >>> tx = optax.chain(
  ...     optax.clip_by_global_norm(1.0),
  ...     grass_jax.transform(optax.adam(1e-3), layers=grass_jax.stacked_layers('layers'),
  ...                         num_active=2, period=10, seed=0))
  >>> state = tx.init(params)
  >>> grads = jax.tree.map(jnp.ones_like, params)
  >>> updates, state = jax.jit(tx.update)(grads, state, params)
  >>> int((jnp.abs(updates['layers']['w']).sum(axis=(1, 2)) > 0).sum())
  2
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from grass_jax import importance as importance_lib
from grass_jax import sampling
from grass_jax.layers import AlwaysOn, LabelsFn, LayerLayout, build_layout

STRATEGIES = ("grass", "lisa", "full")


class GrassState(NamedTuple):
  """State of :func:`transform`.

  Attributes:
    count: int32 scalar, number of updates applied so far.
    key: uint32 ``[2]`` PRNG key; every layer draw is derived from it only.
    importance: float32 ``[L]``, running mean of each layer's size-normalised
      gradient norm (0 for a layer never measured).
    num_measurements: int32 ``[L]``, how many steps fed ``importance``.
    probabilities: float32 ``[L]``, the probabilities of the latest draw.
    active: int32 ``[gamma]`` (sorted), the layers updated by the next step.
    next_active: int32 ``[gamma]``, the layers of the next period. It is drawn
      one step before the switch so offloading can prefetch their state.
    slot_layers: int32 ``[gamma]``, the layers whose inner states are in
      ``slot_states``. Equal to ``active`` except between a switch and the
      offloader's swap (:mod:`grass_jax.offload`).
    slot_states: tuple of ``gamma`` inner-optimizer states, one per layer of
      ``slot_layers`` (each with its own moments and step count, as torch keeps
      a step per parameter), so one layer's state can be moved on its own.
      With all layers active (full fine-tuning) it is instead one inner state
      for the whole layer stack, exactly what the bare inner optimizer keeps.
    bank: inner states of all ``L`` layers, leading axis ``[L]``, holding the
      saved moments of inactive layers. None when the strategy needs no bank
      (all layers active, or moments reset on switch) or when it lives in
      host memory (``offload=True``).
    always_on_state: inner state of the always-on group (embeddings, final
      norm, LM head), updated every step.
  """

  count: jax.Array
  key: jax.Array
  importance: jax.Array
  num_measurements: jax.Array
  probabilities: jax.Array
  active: jax.Array
  next_active: jax.Array
  slot_layers: jax.Array
  slot_states: Any
  bank: Any
  always_on_state: Any


def _take(tree: Any, idx: jax.Array) -> Any:
  return jax.tree.map(lambda x: x[idx], tree)


def _guard(ok: jax.Array | None, updates: Any, new_state: Any, old_state: Any) -> tuple[Any, Any]:
  """``(updates, state)`` of a step, or zero updates and the old state where ``ok`` is False."""
  if ok is None:
    return updates, new_state
  return (jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), updates),
          jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_state, old_state))


class StateStream(NamedTuple):
  """Moves an active layer's inner state between host and device around its update.

  Passed to the GRASS update as ``tx.update(..., state_stream=...)`` (see
  :func:`grass_jax.offload.state_stream`) when the active layers' states live in
  host memory: each layer's state is fetched, updated and stored in turn, so
  the device holds one layer's state at a time.

  Attributes:
    fetch: ``(host_state, after) -> device_state``; the copy must not start
      before ``after`` (a pytree) is computed, which orders the layers.
    store: ``device_state -> host_state``.
  """
  fetch: Callable[[Any, Any], Any]
  store: Callable[[Any], Any]


def _per_layer_update(inner: optax.GradientTransformation, grads: Any, states: tuple, params: Any,
                      num: int, ok: jax.Array | None = None,
                      stream: StateStream | None = None) -> tuple[Any, tuple]:
  """``inner.update`` on each of ``num`` stacked layers with its own state (a tuple).

  An unrolled loop rather than ``jax.vmap``: under vmap the per-layer step
  count becomes a vector and XLA evaluates the bias correction's power through
  a different (vectorised) code path, so updates would differ from the bare
  inner optimizer's in the last bit. ``ok``: see :func:`_guard`. ``stream``: states live in host memory; each
  is fetched after the previous layer's update and stored back.
  """
  outs, new_states = [], []
  after = grads
  for i in range(num):
    p_i = None if params is None else _take(params, i)
    old = states[i] if stream is None else stream.fetch(states[i], after)
    u, s = _guard(ok, *inner.update(_take(grads, i), old, p_i), old)
    after = u
    outs.append(u)
    new_states.append(s if stream is None else stream.store(s))
  return jax.tree.map(lambda *xs: jnp.stack(xs), *outs), tuple(new_states)


def _check_args(num_active: int | None, period: int, temperature: float, epsilon: float,
                importance_decay: float | None, sampling_kind: str) -> None:
  if num_active is not None and (not isinstance(num_active, (int, np.integer)) or num_active < 1):
    raise ValueError(f"num_active must be a positive int (or None for all layers); got {num_active!r}")
  if not isinstance(period, (int, np.integer)) or period < 1:
    raise ValueError(f"period must be an int >= 1 (steps between layer switches); got {period!r}")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0; got {temperature!r}")
  if not 0.0 <= epsilon <= 1.0:
    raise ValueError(f"epsilon (uniform exploration floor) must be in [0, 1]; got {epsilon!r}")
  if importance_decay is not None and not 0.0 <= importance_decay < 1.0:
    raise ValueError(f"importance_decay must be None (running mean) or in [0, 1); got {importance_decay!r}")
  if sampling_kind not in ("importance", "uniform"):
    raise ValueError(f"sampling must be 'importance' or 'uniform'; got {sampling_kind!r}")


def transform(
    inner: optax.GradientTransformation,
    *,
    layers: LabelsFn,
    num_active: int | None,
    period: int = 20,
    temperature: float = 1.0,
    epsilon: float = 0.1,
    importance_decay: float | None = None,
    seed: int = 0,
    always_on: AlwaysOn = True,
    sampling_kind: str = "importance",
    reset_on_switch: bool = False,
    offload: bool = False,
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """GRASS: gradient-based adaptive layer-wise importance sampling.

  Args:
    inner: the optimizer applied to the active layers, e.g. ``optax.adamw(lr)``.
      Each layer gets its own inner state (its own moments and step count).
      A schedule inside ``inner`` sees the layer's own step count; for a
      global schedule use ``optax.adamw(1.0)`` and add
      ``optax.scale_by_schedule(schedule)`` after this transform.
    layers: labels function saying which leaves form which layer
      (:func:`grass_jax.stacked_layers`, :func:`grass_jax.indexed_layers`,
      or your own, see :mod:`grass_jax.layers`).
    num_active: gamma, layers updated at a time; None means all (full fine-tuning).
    period: K, steps between layer switches.
    temperature: sharpness of importance sampling: ``p ~ importance ** (1/T)``.
    epsilon: uniform exploration floor: every layer has ``p >= epsilon / L``.
    importance_decay: None for a running mean of all measurements, or an EMA decay.
    seed: seeds the PRNG key in the state; same seed, same layer sequence.
    always_on: which leaves outside the layers are updated every step: True
      (LISA's convention: embeddings, final norm, LM head), False (frozen), a
      regex on the leaf path, or a predicate on it.
    sampling_kind: 'importance' (GRASS) or 'uniform' (LISA).
    reset_on_switch: start layers with fresh inner states at every switch (LISA)
      instead of restoring their saved moments (GRASS).
    offload: keep no bank of inactive layers' states in the state: they live in
      host memory, managed by :class:`grass_jax.offload.Offloader`.
    skip_nonfinite: when any gradient is NaN/inf, return zero updates and keep
      the inner states (the step still counts for the layer schedule). A
      non-finite layer norm never enters the importance statistics.

  Returns:
    An optax ``GradientTransformationExtraArgs`` whose state is a :class:`GrassState`.
  """
  _check_args(num_active, period, temperature, epsilon, importance_decay, sampling_kind)

  def init_fn(params: Any) -> GrassState:
    layout = build_layout(params, layers, always_on)
    num_layers = layout.num_layers
    gamma = num_layers if num_active is None else num_active
    if gamma > num_layers:
      raise ValueError(f"num_active={gamma} exceeds the number of layers L={num_layers}")
    stack, always = layout.split(params)
    key, k0, k1 = jax.random.split(jax.random.PRNGKey(seed), 3)
    probs = sampling.uniform(num_layers)
    if gamma == num_layers:
      active = next_active = jnp.arange(num_layers, dtype=jnp.int32)
    else:
      active = sampling.draw(k0, probs, gamma)
      next_active = sampling.draw(k1, probs, gamma) if period == 1 else active
    if gamma == num_layers:
      slot_states = inner.init(stack)
    else:
      slot_states = tuple(inner.init(_take(stack, active[i])) for i in range(gamma))
    keeps_bank = gamma < num_layers and not reset_on_switch and not offload
    bank = jax.vmap(inner.init)(stack) if keeps_bank else None
    return GrassState(
        count=jnp.zeros([], jnp.int32),
        key=key,
        importance=jnp.zeros((num_layers,), jnp.float32),
        num_measurements=jnp.zeros((num_layers,), jnp.int32),
        probabilities=probs,
        # Distinct buffers: a train step donates the state, and one buffer cannot be donated twice.
        active=active,
        next_active=jnp.copy(next_active),
        slot_layers=jnp.copy(active),
        slot_states=slot_states,
        bank=bank,
        always_on_state=inner.init(always) if always else optax.EmptyState(),
    )

  def to_slots(layout: LayerLayout, tree: Any, active: jax.Array, gamma: int) -> tuple[dict, dict, bool]:
    """``(active layers' stack, always-on leaves, whether the tree came in full form)``."""
    stack, always = layout.split(tree)
    n = layout.stack_size(layout.treedef.flatten_up_to(tree))
    if n == layout.num_layers:
      if gamma < n:
        stack = _take(stack, active)
    elif n != gamma:
      raise ValueError(f"layer leaves have a leading size {n}; expected L={layout.num_layers} (full form) "
                       f"or num_active={gamma} (slot form)")
    return stack, always, n == layout.num_layers

  def update_fn(updates: Any, state: GrassState, params: Any = None, *, state_stream: StateStream | None = None,
                **extra_args) -> tuple[Any, GrassState]:
    del extra_args
    num_layers = state.importance.shape[0]
    gamma = state.active.shape[0]
    layout = build_layout(updates, layers, always_on, num_layers=num_layers)
    slot_g, always_g, full_form = to_slots(layout, updates, state.active, gamma)
    slot_p, always_p, _ = (None, None, None) if params is None else to_slots(layout, params, state.active, gamma)

    norms = importance_lib.layer_grad_norms(slot_g, layout.layer_size)
    imp, counts = importance_lib.update_importance(
        state.importance, state.num_measurements, state.active, norms, importance_decay)

    if state_stream is not None and (gamma == num_layers or state.bank is not None or reset_on_switch):
      raise ValueError("state_stream needs offload=True with num_active < L and reset_on_switch=False")
    # A NaN/inf anywhere skips the update (zero updates, moments kept) but not the
    # layer schedule, which stays a function of the step count (offloading relies on it).
    ok = jnp.isfinite(optax.tree.norm((slot_g, always_g))) if skip_nonfinite else None
    if gamma == num_layers:  # one inner state for the whole stack: plain full fine-tuning
      slot_u, slot_states = _guard(ok, *inner.update(slot_g, state.slot_states, slot_p), state.slot_states)
    else:
      slot_u, slot_states = _per_layer_update(inner, slot_g, state.slot_states, slot_p, gamma, ok, state_stream)
    if always_g:
      always_u, always_state = _guard(ok, *inner.update(always_g, state.always_on_state, always_p),
                                      state.always_on_state)
    else:
      always_u, always_state = {}, state.always_on_state

    count = state.count + 1
    key, sub = jax.random.split(state.key)
    bank, slot_layers, active, next_active, probs = (
        state.bank, state.slot_layers, state.active, state.next_active, state.probabilities)
    if gamma < num_layers:
      switch = count % period == 0
      active = jnp.where(switch, state.next_active, state.active)
      if reset_on_switch:
        fresh = tuple(inner.init(jax.tree.map(jnp.zeros_like, _take(slot_g, i))) for i in range(gamma))
        slot_states = jax.tree.map(lambda f, s: jnp.where(switch, f, s), fresh, slot_states)
        slot_layers = active
      elif bank is not None:
        def do_switch(bank, slots):
          for i in range(gamma):
            bank = jax.tree.map(lambda b, s: b.at[state.active[i]].set(s), bank, slots[i])
          return bank, tuple(_take(bank, state.next_active[i]) for i in range(gamma))
        bank, slot_states = jax.lax.cond(switch, do_switch, lambda b, s: (b, s), bank, slot_states)
        slot_layers = active
      # else: offloaded; slot_layers lag behind `active` until the Offloader swaps.
      draw_due = (count + 1) % period == 0
      if sampling_kind == "uniform":
        new_probs = sampling.uniform(num_layers)
      else:
        new_probs = sampling.probabilities(imp, counts, temperature=temperature, epsilon=epsilon)
      drawn = sampling.draw(sub, new_probs, gamma)
      next_active = jnp.where(draw_due, drawn, state.next_active)
      probs = jnp.where(draw_due, new_probs, state.probabilities)

    if full_form and gamma < num_layers:
      stack_u = {r: jnp.zeros((num_layers,) + u.shape[1:], u.dtype).at[state.active].set(u)
                 for r, u in slot_u.items()}
    else:
      stack_u = slot_u
    new_updates = layout.merge(stack_u, always_u, updates)
    new_state = GrassState(count, key, imp, counts, probs, active, next_active, slot_layers,
                           slot_states, bank, always_state)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lisa(inner: optax.GradientTransformation, *, layers: LabelsFn, num_active: int, period: int = 20,
         seed: int = 0, always_on: AlwaysOn = True) -> optax.GradientTransformationExtraArgs:
  """LISA baseline: uniform layer sampling, moments reset at every switch.

  Same API and state as :func:`transform`, for side-by-side comparisons.
  """
  return transform(inner, layers=layers, num_active=num_active, period=period, seed=seed,
                   always_on=always_on, sampling_kind="uniform", reset_on_switch=True)


def full(inner: optax.GradientTransformation, *, layers: LabelsFn,
         always_on: AlwaysOn = True) -> optax.GradientTransformationExtraArgs:
  """Full fine-tuning baseline: every layer active at every step (``num_active = L``).

  With ``always_on=True`` its updates equal the bare ``inner`` optimizer's.
  """
  return transform(inner, layers=layers, num_active=None, period=1, always_on=always_on)


def strategy(name: str, inner: optax.GradientTransformation, *, layers: LabelsFn,
             num_active: int | None = None, period: int = 20, temperature: float = 1.0,
             epsilon: float = 0.1, importance_decay: float | None = None, seed: int = 0,
             always_on: AlwaysOn = True, offload: bool = False) -> optax.GradientTransformationExtraArgs:
  """Builds a strategy by name (``grass | lisa | full``), as configs name them."""
  if name == "grass":
    return transform(inner, layers=layers, num_active=num_active, period=period, temperature=temperature,
                     epsilon=epsilon, importance_decay=importance_decay, seed=seed, always_on=always_on,
                     offload=offload)
  if name == "lisa":
    if num_active is None:
      raise ValueError("strategy 'lisa' needs num_active")
    return lisa(inner, layers=layers, num_active=num_active, period=period, seed=seed, always_on=always_on)
  if name == "full":
    return full(inner, layers=layers, always_on=always_on)
  raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")


def find_state(opt_state: Any) -> GrassState:
  """Returns the (single) :class:`GrassState` inside a possibly chained optimizer state."""
  found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, GrassState))
           if isinstance(s, GrassState)]
  if len(found) != 1:
    raise ValueError(f"expected exactly one GrassState in the optimizer state, found {len(found)}")
  return found[0]


def replace_state(opt_state: Any, new: GrassState) -> Any:
  """Returns ``opt_state`` with its :class:`GrassState` replaced by ``new``."""
  find_state(opt_state)
  return jax.tree_util.tree_map(lambda s: new if isinstance(s, GrassState) else s, opt_state,
                                is_leaf=lambda x: isinstance(x, GrassState))


def diagnostics(opt_state: Any, *, temperature: float = 1.0, epsilon: float = 0.1) -> dict[str, np.ndarray]:
  """Readable snapshot for logging and plots (host numpy arrays).

  Keys: ``step``, ``active``, ``next_active``, ``importance``,
  ``num_measurements``, ``probabilities`` (of the latest draw) and
  ``current_probabilities`` (what a draw now would use, given ``temperature``
  and ``epsilon``).
  """
  s = find_state(opt_state)
  cur = sampling.probabilities(s.importance, s.num_measurements, temperature=temperature, epsilon=epsilon)
  return {
      "step": np.asarray(s.count),
      "active": np.asarray(s.active),
      "next_active": np.asarray(s.next_active),
      "importance": np.asarray(s.importance),
      "num_measurements": np.asarray(s.num_measurements),
      "probabilities": np.asarray(s.probabilities),
      "current_probabilities": np.asarray(cur),
  }


def gather_active(tree: Any, opt_state: Any, layers: LabelsFn) -> Any:
  """Slot form of a stacked tree: layer leaves sliced to the active layers ``[gamma, ...]``.

  Differentiate the loss with respect to this (and the always-on leaves) to get
  slot-form gradients for :func:`transform` without ever forming the frozen
  layers' gradients.
  """
  s = find_state(opt_state)
  layout = build_layout(tree, layers, True)
  if layout.kind != "stacked":
    raise ValueError("slot form needs stacked layers (a leading [L, ...] axis)")
  chex.assert_equal(layout.num_layers, s.importance.shape[0])
  stack, _ = layout.split(tree)
  leaves = list(layout.treedef.flatten_up_to(tree))
  for (i,), r in zip(layout.role_leaves, layout.roles):
    leaves[i] = stack[r][s.active]
  return layout.treedef.unflatten(leaves)


def apply_slot_updates(params: Any, updates: Any, active: jax.Array, layers: LabelsFn) -> Any:
  """``optax.apply_updates`` for slot-form updates: adds them to the active layers only."""
  layout = build_layout(params, layers, True)
  p_leaves = layout.treedef.flatten_up_to(params)
  u_leaves = layout.treedef.flatten_up_to(updates)
  layer_leaves = {i for (i,) in layout.role_leaves} if layout.kind == "stacked" else set()
  out = []
  for i, (p, u) in enumerate(zip(p_leaves, u_leaves)):
    if i in layer_leaves:
      # One slot at a time, in place: each slot's update is a static slice of the stacked updates,
      # which XLA forwards from the per-layer results, so the stack need never exist.
      for j in range(u.shape[0]):
        row = jax.lax.dynamic_index_in_dim(p, active[j], keepdims=False)
        p = jax.lax.dynamic_update_index_in_dim(p, (row + u[j]).astype(p.dtype), active[j], 0)
      out.append(p)
    else:
      out.append((p + u).astype(p.dtype))
  return layout.treedef.unflatten(out)
