"""GRASS as an optax ``GradientTransformation``: adaptive layer-wise sampling.

:func:`transform` wraps an inner optimizer (e.g. ``optax.adamw``) so that only
``num_active`` of the ``L`` transformer layers (plus an always-on group) are
updated at a time. Updates of the other layers are exactly zero; their
inner-optimizer moments are kept and used again when the layer is drawn again.
One update is the paper's algorithm, step by step (each a function below):

1. :func:`measure_layers`: each measured layer's gradient RMS
   ``sqrt(||g_l||^2 / N_l)`` (:mod:`grass_jax.importance`);
2. :func:`accumulate_window`: add it to the layer's MGN window;
3. :func:`update_active_layers`: the inner optimizer on the active layers and
   the always-on group (nothing during probing);
4. :func:`refresh_importance`: every ``refresh_every`` steps fold each
   measured layer's window mean into its MGN (EMA with ``mgn_ema``); layers
   not measured keep theirs;
5. :func:`switch_layers`: every ``period`` steps the layers drawn one step
   earlier become active (their saved moments come back);
6. :func:`draw_next_layers`: one step before a switch, draw ``num_active``
   layers from the probabilities over the MGN (:mod:`grass_jax.sampling`).

With ``importance_from='gain'`` steps 1-2 are :func:`credit_gain` instead: the
loss decrease each period realises is credited to its layers (:mod:`grass_jax.gain`). With
``importance_from='adam'`` step 1 is :func:`measure_adam_gains`, after step 3: each trained layer's
gradient along its own update (:func:`grass_jax.importance.adam_gains`).
With ``modules`` (module granularity, :mod:`grass_jax.module_sampling`) each slot trains one module
of its layer (:func:`grass_jax.module_sampling.slot_modules`). When each step is due is
:class:`grass_jax.schedule.Schedule`'s answer.

**Probing** (``probe_steps``, the paper's T_p): the first steps measure every
layer and update nothing. **GRASS\\*** (``static=True``): the MGN of probing is
never refreshed.

Gradients may come in two forms:

* **full form**: the usual optax form, same shapes as the parameters;
* **slot form** (stacked layouts only): layer leaves have a leading axis of
  ``num_active`` holding the gradients of the active layers in the order of
  ``state.active``, as produced by differentiating with respect to
  :func:`gather_active` params. The frozen layers' gradients then never exist,
  and clipping in the same ``optax.chain`` sees only the trained parameters.
  Probing, and any measurement of frozen layers, then comes from the caller:
  ``tx.update(..., layer_norms=rms)`` with ``rms`` float32 ``[L]`` (NaN for
  a layer not measured), as :func:`grass_jax.train_step.make_train_step` does.

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

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from grass_jax import gain as gain_lib
from grass_jax import importance as importance_lib
from grass_jax import module_sampling
from grass_jax import sampling
from grass_jax.layer_updates import StateStream, guard, per_layer_update, take_layer
from grass_jax.layers import AlwaysOn, LabelsFn, LayerLayout, build_layout
from grass_jax.schedule import Schedule

STRATEGIES = ("grass", "grass_static", "lisa", "full", "fixed")


class GrassState(NamedTuple):
  """State of :func:`transform`.

  Attributes:
    count: int32 scalar, number of updates applied so far (probing included).
    key: uint32 ``[2]`` PRNG key; every layer draw is derived from it only.
    importance: float32 ``[L]``, each layer's MGN (mean gradient norm: the
      mean of its per-step gradient RMS, refreshed as :func:`refresh_importance`
      says); 0 for a layer never measured.
    num_measurements: int32 ``[L]``, how many steps' measurements were folded
      into ``importance``.
    window_sum: float32 ``[L]``, sum of the measurements since the last refresh.
    window_count: int32 ``[L]``, how many steps ``window_sum`` holds.
    probabilities: float32 ``[L]``, the probabilities of the latest draw.
    active: int32 ``[gamma]`` (sorted; with ``modules`` in the draw's order), the layers updated by the next step.
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
    undrawn: bool ``[L]``, with ``coverage``: the layers not drawn yet in the
      current cycle (each layer gets a turn before any gets a second);
      all True without it.
    loss_trace: float32 ``[6]``, with ``importance_from='gain'``: the training
      loss of the current period's two halves and the decreases of the past
      periods (:mod:`grass_jax.gain`); zeros otherwise.
  """

  count: jax.Array
  key: jax.Array
  importance: jax.Array
  num_measurements: jax.Array
  window_sum: jax.Array
  window_count: jax.Array
  probabilities: jax.Array
  active: jax.Array
  next_active: jax.Array
  slot_layers: jax.Array
  slot_states: Any
  bank: Any
  always_on_state: Any
  undrawn: jax.Array
  loss_trace: jax.Array


@dataclasses.dataclass(frozen=True)
class GrassSettings:
  """The static hyperparameters of :func:`transform`, validated once when built.

  Attributes:
    layers: labels function saying which leaves form which layer
      (:func:`grass_jax.stacked_layers`, :func:`grass_jax.indexed_layers`,
      or your own, see :mod:`grass_jax.layers`).
    num_active: gamma, layers updated at a time; None means all (full fine-tuning).
    period: K, steps between layer switches.
    probability: 'softmax' (the paper's: ``p ~ exp(m_l / (mean(m) * T))``, MGN
      divided by its mean over the layers so that one ``temperature`` means the
      same for every model) or 'power' (``p ~ m_l ** (1/T)``).
    temperature: T, sharpness of the probabilities (smaller: sharper).
    epsilon: uniform exploration floor: every layer has ``p >= epsilon / L``.
    probe_steps: T_p, the first steps measure every layer and update nothing
      (a multiple of ``period``). Slot-form callers pass ``layer_norms``.
    refresh_every: T_u, steps between MGN refreshes (None: ``period``).
    mgn_ema: alpha, weight kept from a layer's previous MGN when its window is
      folded in; None for the running mean of all its measurements.
    static: GRASS* (the paper's ablation): the MGN of probing, never refreshed.
    seed: seeds the PRNG key in the state; same seed, same layer sequence.
    always_on: which leaves outside the layers are updated every step: True
      (LISA's convention: embeddings, final norm, LM head), False (frozen), a
      regex on the leaf path, or a predicate on it.
    sampling_kind: 'importance' (GRASS), 'uniform' (LISA) or 'fixed' (the
      layers in ``fixed_layers``, always: an oracle baseline).
    reset_on_switch: start layers with fresh inner states at every switch (LISA)
      instead of restoring their saved moments (GRASS).
    offload: keep no bank of inactive layers' states in the state: they live in
      host memory, managed by :class:`grass_jax.offload.Offloader`.
    skip_nonfinite: when any gradient is NaN/inf, return zero updates and keep
      the inner states (the step still counts for the layer schedule). A
      non-finite layer norm never enters the importance statistics.
    fixed_layers: with ``sampling_kind='fixed'``, the ``num_active`` layers that train.
    coverage: draw in cycles: no layer is drawn a second time before every
      layer has had a turn (``ceil(L / num_active)`` periods); the
      probabilities order the layers within a cycle.
    importance_from: 'grad' (the MGN, as above), 'gain': the loss decrease
      each period realised, credited to its layers (:mod:`grass_jax.gain`;
      the update then needs ``loss=``, the step's training loss), or 'adam':
      each trained layer's loss decrease per parameter from its inner update,
      ``-<g, u> / n`` (:func:`grass_jax.importance.adam_gains`; give ``inner``
      a unit learning rate), what Adam's step buys rather than the gradient's
      size; no probing.
    modules: module granularity (:mod:`grass_jax.module_sampling`): regexes on a layer leaf's name, one per
      module, e.g. ``module_sampling.ATTENTION_MLP``; ``num_active`` then counts slots, each training one
      module of a layer drawn for it (as many slots per module; each slot's state holds its module only).
      Uniform draws with moments reset (LISA) only.
  """

  layers: LabelsFn
  num_active: int | None
  period: int = 20
  probability: str = "softmax"
  temperature: float = 0.5
  epsilon: float = 0.1
  probe_steps: int = 0
  refresh_every: int | None = None
  mgn_ema: float | None = 0.5
  static: bool = False
  seed: int = 0
  always_on: AlwaysOn = True
  sampling_kind: str = "importance"
  reset_on_switch: bool = False
  offload: bool = False
  skip_nonfinite: bool = True
  fixed_layers: Sequence[int] | None = None
  coverage: bool = False
  importance_from: str = "grad"
  modules: Sequence[str] | None = None

  def __post_init__(self):
    if self.fixed_layers is not None:
      object.__setattr__(self, "fixed_layers", tuple(int(i) for i in self.fixed_layers))
    if self.modules is not None:
      object.__setattr__(self, "modules", tuple(self.modules))
    _check_args(self)

  @property
  def schedule(self) -> Schedule:
    """When this transform probes, refreshes, draws and switches (:mod:`grass_jax.schedule`)."""
    return Schedule(self.period, self.probe_steps, self.refresh_interval, static=self.static)

  @property
  def refresh_interval(self) -> int:
    """T_u: ``refresh_every``, or ``period`` where it is None."""
    return self.period if self.refresh_every is None else self.refresh_every


def _check_args(s: GrassSettings) -> None:
  if s.num_active is not None and (not isinstance(s.num_active, (int, np.integer)) or s.num_active < 1):
    raise ValueError(f"num_active must be a positive int (or None for all layers); got {s.num_active!r}")
  s.schedule  # noqa: B018 -- period, probe_steps, refresh_every and static: its own checks
  if not s.temperature > 0:
    raise ValueError(f"temperature must be > 0; got {s.temperature!r}")
  if not 0.0 <= s.epsilon <= 1.0:
    raise ValueError(f"epsilon (uniform exploration floor) must be in [0, 1]; got {s.epsilon!r}")
  if s.mgn_ema is not None and not 0.0 <= s.mgn_ema < 1.0:
    raise ValueError(f"mgn_ema must be None (running mean) or in [0, 1); got {s.mgn_ema!r}")
  if s.sampling_kind not in ("importance", "uniform", "fixed"):
    raise ValueError(f"sampling must be 'importance', 'uniform' or 'fixed'; got {s.sampling_kind!r}")
  if s.sampling_kind == "fixed":
    layers = s.fixed_layers or ()
    if (len(layers) != s.num_active or len(set(layers)) != len(layers)
        or not all(isinstance(i, (int, np.integer)) and i >= 0 for i in layers)):
      raise ValueError(f"fixed_layers must be num_active={s.num_active} distinct layer indices >= 0; "
                       f"got {s.fixed_layers!r}")
  if s.probability not in sampling.PROBABILITIES:
    raise ValueError(f"probability must be one of {sampling.PROBABILITIES}; got {s.probability!r}")
  if s.importance_from not in ("grad", "gain", "adam"):
    raise ValueError(f"importance_from must be 'grad', 'gain' or 'adam'; got {s.importance_from!r}")
  if s.importance_from == "adam" and (s.probe_steps or s.static):
    raise ValueError("importance_from='adam' measures the trained layers' own updates: no probing "
                     "(probe_steps=0), not static")
  if s.modules is not None and (len(s.modules) < 2 or s.sampling_kind != "uniform" or not s.reset_on_switch
                                or s.probe_steps or s.offload):
    raise ValueError(f"modules (module granularity) needs two or more module patterns and uniform draws with "
                     f"moments reset at a switch (strategy 'lisa'); got modules={s.modules!r}, "
                     f"sampling_kind={s.sampling_kind!r}, reset_on_switch={s.reset_on_switch}")
  if s.modules is not None and (s.num_active is None or s.num_active % len(s.modules)):
    raise ValueError(f"with modules, num_active counts slots, as many for each of the {len(s.modules)} modules: "
                     f"give a multiple of {len(s.modules)} (e.g. {2 * len(s.modules)}: the parameters of 2 layers); "
                     f"got {s.num_active}")
  if s.importance_from == "gain" and (s.probe_steps or s.static or s.period < 2 or s.refresh_interval != s.period):
    raise ValueError("importance_from='gain' learns from training itself: no probing (probe_steps=0), not static, "
                     "a period of 2 steps or more (it compares the period's halves), refresh_every = period")


def init(inner: optax.GradientTransformation, s: GrassSettings, params: Any) -> GrassState:
  """The state before the first step: uniform probabilities, a first draw, fresh inner states."""
  layout = build_layout(params, s.layers, s.always_on)
  num_layers = layout.num_layers
  gamma = num_layers if s.num_active is None else s.num_active
  if gamma > num_layers:
    raise ValueError(f"num_active={gamma} exceeds the number of layers L={num_layers}")
  if s.modules is not None and gamma == num_layers:  # every layer a slot is full fine-tuning's path, not modules'
    raise ValueError(f"modules with num_active={gamma} slots draws every one of the L={num_layers} layers: give "
                     f"fewer slots than layers (at most {num_layers - 1})")
  stack, always = layout.split(params)
  key, k0, k1 = jax.random.split(jax.random.PRNGKey(s.seed), 3)
  probs = sampling.uniform(num_layers)
  undrawn = jnp.ones((num_layers,), bool)
  if gamma == num_layers:
    active = next_active = jnp.arange(num_layers, dtype=jnp.int32)
    slot_states = inner.init(stack)
  elif s.sampling_kind == "fixed":
    if max(s.fixed_layers) >= num_layers:
      raise ValueError(f"fixed_layers {list(s.fixed_layers)} name a layer beyond the model's L={num_layers}")
    active = next_active = jnp.asarray(sorted(s.fixed_layers), jnp.int32)
    probs = jnp.zeros((num_layers,), jnp.float32).at[active].set(1.0 / gamma)
    slot_states = _fresh_slot_states(inner, s, module_sampling.active_rows(s.modules, stack, active))
  else:
    sort = s.modules is None  # with modules the draw's random order pairs layers with modules at random
    active = sampling.draw(k0, probs, gamma, undrawn if s.coverage else None, sort=sort)
    undrawn = sampling.next_cycle(undrawn, active) if s.coverage else undrawn
    next_active = active
    if s.period == 1:
      next_active = sampling.draw(k1, probs, gamma, undrawn if s.coverage else None, sort=sort)
      undrawn = sampling.next_cycle(undrawn, next_active) if s.coverage else undrawn
    slot_states = _fresh_slot_states(inner, s, module_sampling.active_rows(s.modules, stack, active))
  # Fixed layers never switch: no other layer's state is ever needed.
  keeps_bank = gamma < num_layers and not s.reset_on_switch and not s.offload and s.sampling_kind != "fixed"
  return GrassState(
      count=jnp.zeros([], jnp.int32),
      key=key,
      importance=jnp.zeros((num_layers,), jnp.float32),
      num_measurements=jnp.zeros((num_layers,), jnp.int32),
      window_sum=jnp.zeros((num_layers,), jnp.float32),
      window_count=jnp.zeros((num_layers,), jnp.int32),
      probabilities=probs,
      # Distinct buffers: a train step donates the state, and one buffer cannot be donated twice.
      active=active,
      next_active=jnp.copy(next_active),
      slot_layers=jnp.copy(active),
      slot_states=slot_states,
      bank=jax.vmap(inner.init)(stack) if keeps_bank else None,
      always_on_state=inner.init(always) if always else optax.EmptyState(),
      undrawn=undrawn,
      loss_trace=jnp.zeros((gain_lib.TRACE_SIZE,), jnp.float32),
  )


def _fresh_slot_states(inner: optax.GradientTransformation, s: GrassSettings, slots: dict) -> tuple:
  """Each slot's inner state at its start, over its layer (``slots``: role -> ``[gamma, ...]``), or, with
  ``modules``, over its module's leaves only (``slots`` in module form)."""
  if s.modules is None:
    gamma = next(iter(slots.values())).shape[0]
    return tuple(inner.init(take_layer(slots, i)) for i in range(gamma))
  return tuple(inner.init(module_sampling.slot_module_leaves(s.modules, slots, i, s.num_active))
               for i in range(s.num_active))


FULL, SLOT, MODULE = "full", "slot", "module"  # the forms a layer stack comes in (_to_slots)


def _to_slots(s: GrassSettings, layout: LayerLayout, tree: Any, active: jax.Array) -> tuple[dict, dict, str]:
  """``(active layers' stack, always-on leaves, the form the tree came in)``: the stack in slot form, or in
  module form with ``modules`` (:mod:`grass_jax.module_sampling`), whatever form the tree came in."""
  stack, always = layout.split(tree)
  n = layout.stack_size(layout.treedef.flatten_up_to(tree))
  gamma = active.shape[0]
  rows = None if s.modules is None or gamma == layout.num_layers else gamma // len(s.modules)
  if n == layout.num_layers:
    return (module_sampling.active_rows(s.modules, stack, active) if gamma < n else stack), always, FULL
  if n == gamma:
    return (stack if rows is None else module_sampling.to_module_form(s.modules, stack)), always, SLOT
  if n == rows:
    return stack, always, MODULE
  raise ValueError(f"layer leaves have a leading size {n}; expected L={layout.num_layers} (full form) "
                   f"or num_active={gamma} (slot form)" + (f" or {rows} (module form)" if rows else ""))


def _from_slots(s: GrassSettings, slot_u: dict, form: str, active: jax.Array, num_layers: int) -> dict:
  """The active layers' updates (slot or module form) in the form the gradients came in."""
  gamma = active.shape[0]
  if gamma == num_layers or form == MODULE or (form == SLOT and s.modules is None):
    return slot_u
  if form == SLOT:
    return module_sampling.from_module_form(s.modules, slot_u, gamma)
  at = module_sampling.module_layers(s.modules, list(slot_u), active)
  return {r: jnp.zeros((num_layers,) + u.shape[1:], u.dtype).at[at[r]].set(u) for r, u in slot_u.items()}


def measure_layers(s: GrassSettings, state: GrassState, layout: LayerLayout, grads: Any, slot_grads: dict,
                   full_form: bool, probing: jax.Array, layer_norms: jax.Array | None) -> jax.Array:
  """Step 1: each layer's gradient RMS this step, float32 ``[L]``, NaN where not measured.

  ``layer_norms`` from the caller when given (slot form: the train step measures
  frozen layers in its backward pass). Otherwise the active layers from their
  gradients, and, while probing, every layer of a full-form gradient.
  """
  num_layers = state.importance.shape[0]
  if layer_norms is not None:
    chex.assert_shape(layer_norms, (num_layers,))
    return layer_norms.astype(jnp.float32)
  if s.probe_steps and not full_form:
    raise ValueError("probing with slot-form gradients needs the caller's measurement: "
                     "tx.update(..., layer_norms=...) (see grass_jax.train_step)")
  rms = jnp.full((num_layers,), jnp.nan, jnp.float32)
  rms = rms.at[state.active].set(importance_lib.layer_grad_norms(slot_grads, layout.layer_size))
  if s.probe_steps:  # a pass over every layer's gradient, on probing steps only
    rms = jax.lax.cond(probing, lambda: importance_lib.layer_grad_norms(layout.split(grads)[0], layout.layer_size),
                       lambda: rms)
  return rms


def accumulate_window(s: GrassSettings, state: GrassState, rms: jax.Array,
                      probing: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Step 2: ``(window_sum, window_count)`` with this step's finite measurements added."""
  if s.static:  # GRASS*: only probing feeds the importance
    rms = jnp.where(probing, rms, jnp.nan)
  return importance_lib.accumulate(state.window_sum, state.window_count, rms)


def update_active_layers(inner: optax.GradientTransformation, s: GrassSettings, state: GrassState,
                         grads: tuple[dict, dict], params: tuple[Any, Any], ok: jax.Array | None,
                         stream: StateStream | None) -> tuple[dict, Any, dict, Any]:
  """Step 3: the inner optimizer on the active layers and the always-on group.

  ``grads`` and ``params``: ``(slot tree, always-on tree)``. Returns ``(slot updates, slot states, always-on
  updates, always-on state)``; where ``ok`` is False the updates are zero and the states unchanged.
  """
  (slot_g, always_g), (slot_p, always_p) = grads, params
  num_layers, gamma = state.importance.shape[0], state.active.shape[0]
  if gamma == num_layers:  # one inner state for the whole stack: plain full fine-tuning
    slot_u, slot_states = guard(ok, *inner.update(slot_g, state.slot_states, slot_p), state.slot_states)
  elif s.modules is not None:
    slot_u, slot_states = module_sampling.per_slot_module_update(inner, s.modules, slot_g, state.slot_states,
                                                                 slot_p, ok)
  else:
    slot_u, slot_states = per_layer_update(inner, slot_g, state.slot_states, slot_p, gamma, ok, stream)
  if not always_g:
    return slot_u, slot_states, {}, state.always_on_state
  always_u, always_state = guard(ok, *inner.update(always_g, state.always_on_state, always_p),
                                  state.always_on_state)
  return slot_u, slot_states, always_u, always_state


def measure_adam_gains(state: GrassState, layout: LayerLayout, slot_g: dict, slot_u: dict) -> jax.Array:
  """Step 1 with ``importance_from='adam'`` (after step 3): float32 ``[L]``, the trained layers' gains
  along their updates (:func:`grass_jax.importance.adam_gains`), NaN for the frozen ones and on a skipped step."""
  rms = jnp.full(state.importance.shape, jnp.nan, jnp.float32)
  return rms.at[state.active].set(importance_lib.adam_gains(slot_g, slot_u, layout.layer_size))


def credit_gain(s: GrassSettings, state: GrassState, loss: jax.Array | None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Steps 1-2 with ``importance_from='gain'``: ``(window_sum, window_count, loss_trace)``.

  The step's loss joins its half of the period; at the period's last step its credit
  (:func:`grass_jax.gain.period_credit`) enters the windows of the layers trained in it, which the next
  refresh folds into their importance.
  """
  if loss is None:
    raise ValueError("importance_from='gain' needs each step's training loss: tx.update(..., loss=loss)")
  second_half = (state.count % s.period) >= s.period // 2
  trace = gain_lib.add_loss(state.loss_trace, jnp.asarray(loss, jnp.float32), second_half=second_half)
  # The period's last step (its layers switch out after it): its credit waits in the windows for the next
  # refresh, so it steers the draw after next (the next one is drawn a step before this).
  due = s.schedule.switching(state.count)
  credit, has, next_trace = gain_lib.period_credit(trace)
  rms = jnp.full(state.importance.shape, jnp.nan, jnp.float32).at[state.active].set(credit)
  window_sum, window_count = importance_lib.accumulate(state.window_sum, state.window_count,
                                                       jnp.where(due & has, rms, jnp.nan))
  return window_sum, window_count, jnp.where(due, next_trace, trace)


def refresh_importance(s: GrassSettings, state: GrassState, window_sum: jax.Array,
                       window_count: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Step 4: ``(importance, num_measurements, window_sum, window_count)`` after an optional refresh.

  A refresh is due one step before every ``refresh_every``-th step after probing
  (the draw for a switch happens one step early, and must see it), and at the
  end of probing; GRASS* refreshes only then. It folds each layer's window into
  its MGN (:func:`grass_jax.importance.refresh`) and empties the windows.
  """
  due = s.schedule.refreshing(state.count)
  imp, counts = importance_lib.refresh(state.importance, state.num_measurements, window_sum, window_count,
                                       s.mgn_ema)
  return (jnp.where(due, imp, state.importance), jnp.where(due, counts, state.num_measurements),
          jnp.where(due, 0.0, window_sum), jnp.where(due, 0, window_count))


def switch_layers(inner: optax.GradientTransformation, s: GrassSettings, state: GrassState, slot_g: dict,
                  slot_states: tuple, bank: Any) -> tuple[jax.Array, jax.Array, tuple, Any]:
  """Step 5: at a switch, ``next_active`` becomes active. Returns ``(active, slot_layers, slot_states, bank)``.

  GRASS saves the outgoing layers' inner states in the bank and restores the
  incoming ones (or, offloaded, leaves the swap to :class:`grass_jax.offload.Offloader`:
  ``slot_layers`` then lags behind ``active``); LISA starts them afresh.
  """
  gamma = state.active.shape[0]
  switch = s.schedule.switching(state.count)
  active = jnp.where(switch, state.next_active, state.active)
  slot_layers = state.slot_layers
  if s.reset_on_switch:
    fresh = _fresh_slot_states(inner, s, jax.tree.map(jnp.zeros_like, slot_g))
    slot_states = jax.tree.map(lambda f, x: jnp.where(switch, f, x), fresh, slot_states)
    slot_layers = active
  elif bank is not None:
    def do_switch(bank, slots):
      for i in range(gamma):
        bank = jax.tree.map(lambda b, x: b.at[state.active[i]].set(x), bank, slots[i])
      return bank, tuple(take_layer(bank, state.next_active[i]) for i in range(gamma))
    bank, slot_states = jax.lax.cond(switch, do_switch, lambda b, x: (b, x), bank, slot_states)
    slot_layers = active
  return active, slot_layers, slot_states, bank


def draw_next_layers(s: GrassSettings, state: GrassState, importance: jax.Array,
                     num_measurements: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Step 6: one step before a switch, draw the next period's layers.

  With ``coverage`` the layers not drawn yet in the cycle come first (:func:`grass_jax.sampling.draw`).
  Returns ``(next_active, probabilities, key, undrawn)``.
  """
  num_layers, gamma = importance.shape[0], state.active.shape[0]
  key, sub = jax.random.split(state.key)
  draw_due = s.schedule.drawing(state.count)
  if s.sampling_kind == "fixed":
    return state.next_active, state.probabilities, key, state.undrawn
  if s.sampling_kind == "uniform":
    new_probs = sampling.uniform(num_layers)
  elif s.importance_from == "gain":
    new_probs = gain_lib.probabilities(importance, num_measurements, temperature=s.temperature, epsilon=s.epsilon)
  else:
    new_probs = sampling.layer_probabilities(s.probability, importance, num_measurements,
                                             temperature=s.temperature, epsilon=s.epsilon)
  drawn = sampling.draw(sub, new_probs, gamma, state.undrawn if s.coverage else None, sort=s.modules is None)
  undrawn = jnp.where(draw_due, sampling.next_cycle(state.undrawn, drawn), state.undrawn) if s.coverage \
      else state.undrawn
  return (jnp.where(draw_due, drawn, state.next_active), jnp.where(draw_due, new_probs, state.probabilities), key,
          undrawn)


def update(inner: optax.GradientTransformation, s: GrassSettings, updates: Any, state: GrassState, params: Any = None,
           **extra_args: Any) -> tuple[Any, GrassState]:
  """One GRASS step (the module docstring lists its steps). ``extra_args``: the update's optional
  ``state_stream``, ``layer_norms`` and ``loss`` (:func:`transform`); others (from a chain) are ignored."""
  state_stream: StateStream | None = extra_args.get("state_stream")
  layer_norms: jax.Array | None = extra_args.get("layer_norms")
  loss: jax.Array | None = extra_args.get("loss")
  num_layers, gamma = state.importance.shape[0], state.active.shape[0]
  layout = build_layout(updates, s.layers, s.always_on, num_layers=num_layers)
  # With modules the stack is in module form from here on: a slot's other modules get no gradient and no update.
  slot_g, always_g, form = _to_slots(s, layout, updates, state.active)
  slot_p, always_p, _ = (None, None, None) if params is None else _to_slots(s, layout, params, state.active)
  full_form = form == FULL
  if state_stream is not None and (gamma == num_layers or state.bank is not None or s.reset_on_switch):
    raise ValueError("state_stream needs offload=True with num_active < L and reset_on_switch=False")
  probing = state.count < s.probe_steps
  measuring = gamma < num_layers and s.sampling_kind == "importance"

  loss_trace = state.loss_trace
  if measuring and s.importance_from == "gain":
    window_sum, window_count, loss_trace = credit_gain(s, state, loss)
  elif measuring and s.importance_from != "adam":
    rms = measure_layers(s, state, layout, updates, slot_g, full_form, probing, layer_norms)
    window_sum, window_count = accumulate_window(s, state, rms, probing)
  else:
    window_sum, window_count = state.window_sum, state.window_count
  # A NaN/inf anywhere skips the update (zero updates, moments kept) but not the
  # layer schedule, which stays a function of the step count (offloading relies on it).
  ok = jnp.isfinite(optax.tree.norm((slot_g, always_g))) if s.skip_nonfinite else None
  if s.probe_steps:
    ok = ~probing if ok is None else ok & ~probing
  slot_u, slot_states, always_u, always_state = update_active_layers(
      inner, s, state, (slot_g, always_g), (slot_p, always_p), ok, state_stream)
  if measuring and s.importance_from == "adam":
    window_sum, window_count = accumulate_window(s, state, measure_adam_gains(state, layout, slot_g, slot_u),
                                                 probing)

  count = state.count + 1
  imp, counts, bank, slot_layers, active = (
      state.importance, state.num_measurements, state.bank, state.slot_layers, state.active)
  next_active, probs, key, undrawn = state.next_active, state.probabilities, state.key, state.undrawn
  if measuring:
    imp, counts, window_sum, window_count = refresh_importance(s, state, window_sum, window_count)
  if gamma < num_layers:
    active, slot_layers, slot_states, bank = switch_layers(inner, s, state, slot_g, slot_states, bank)
    next_active, probs, key, undrawn = draw_next_layers(s, state, imp, counts)
  else:
    key, _ = jax.random.split(state.key)

  new_updates = layout.merge(_from_slots(s, slot_u, form, state.active, num_layers), always_u, updates)
  return new_updates, GrassState(count, key, imp, counts, window_sum, window_count, probs, active, next_active,
                                 slot_layers, slot_states, bank, always_state, undrawn, loss_trace)


def transform(inner: optax.GradientTransformation, settings: GrassSettings | None = None, /,
              **fields: Any) -> optax.GradientTransformationExtraArgs:
  """GRASS: gradient-based adaptive layer-wise importance sampling.

  Args:
    inner: the optimizer applied to the active layers, e.g. ``optax.adamw(lr)``.
      Each layer gets its own inner state (its own moments and step count).
      A schedule inside ``inner`` sees the layer's own step count; for a
      global schedule use ``optax.adamw(1.0)`` and add
      ``optax.scale_by_schedule(schedule)`` after this transform.
    settings, fields: the hyperparameters, a :class:`GrassSettings`, or its fields as keywords
      (``layers`` and ``num_active`` required), or both: the keywords replace the settings' fields.

  Returns:
    An optax ``GradientTransformationExtraArgs`` whose state is a :class:`GrassState`.
    Its update accepts ``layer_norms`` (float32 ``[L]`` gradient RMS, NaN where
    not measured), ``state_stream`` (:class:`StateStream`) and ``loss`` (the
    step's training loss, for ``importance_from='gain'``) as extra arguments. The layer leaves of its
    ``updates`` and ``params`` may be in full form (``[L, ...]``), slot form (``[num_active, ...]``, in the
    order of ``state.active``: :func:`gather_active`) or, with ``modules``, module form
    (:func:`grass_jax.module_sampling.to_module_form`); the updates come back in the form given.
  """
  s = GrassSettings(**fields) if settings is None else dataclasses.replace(settings, **fields)
  return optax.GradientTransformationExtraArgs(
      lambda params: init(inner, s, params),
      lambda updates, state, params=None, **kw: update(inner, s, updates, state, params, **kw))


def lisa(inner: optax.GradientTransformation, *, layers: LabelsFn, num_active: int, period: int = 20,
         seed: int = 0, always_on: AlwaysOn = True, coverage: bool = False) -> optax.GradientTransformationExtraArgs:
  """LISA baseline: uniform layer sampling, moments reset at every switch.

  Same API and state as :func:`transform`, for side-by-side comparisons. ``coverage``: uniform draws in
  cycles (a random order of the layers, ``num_active`` at a time: every layer trains once per cycle).
  """
  return transform(inner, strategy_settings("lisa", layers=layers, num_active=num_active, period=period, seed=seed,
                                            always_on=always_on, coverage=coverage))


def fixed(inner: optax.GradientTransformation, *, layers: LabelsFn, fixed_layers: Sequence[int],
          always_on: AlwaysOn = True, offload: bool = False) -> optax.GradientTransformationExtraArgs:
  """The same layers all run long: the oracle baseline for a chosen set (``len(fixed_layers)`` of them).

  Example::

    tx = grass_jax.fixed(optax.adamw(1e-4), layers=grass_jax.stacked_layers("layers"), fixed_layers=[12, 13])
  """
  return transform(inner, strategy_settings("fixed", layers=layers, fixed_layers=fixed_layers, always_on=always_on,
                                            offload=offload))


def full(inner: optax.GradientTransformation, *, layers: LabelsFn,
         always_on: AlwaysOn = True) -> optax.GradientTransformationExtraArgs:
  """Full fine-tuning baseline: every layer active at every step (``num_active = L``).

  With ``always_on=True`` its updates equal the bare ``inner`` optimizer's.
  """
  return transform(inner, strategy_settings("full", layers=layers, always_on=always_on))


_LISA_FIELDS = ("layers", "num_active", "period", "seed", "always_on", "coverage", "modules")
_FIXED_FIELDS = ("layers", "fixed_layers", "always_on", "offload")


def strategy_settings(name: str, /, **fields: Any) -> GrassSettings:
  """The :class:`GrassSettings` of a strategy named as configs name it, from :class:`GrassSettings` fields.

  ``grass`` (all fields), ``grass_static`` (GRASS*: ``static=True``, needs ``probe_steps``), ``lisa``
  (uniform draws, moments reset at a switch: takes ``layers``, ``num_active``, ``period``, ``seed``,
  ``always_on`` and ``coverage``), ``full`` (every layer: ``layers``, ``always_on``) or ``fixed`` (``layers``,
  ``fixed_layers``, ``always_on``, ``offload``). Fields a strategy does not take are ignored, so one set of
  fields serves every strategy. The same object configures the transform (:func:`transform`) and the train
  step (``StepOptions(grass=...)``), so the two cannot disagree.

  Example::

    >>> from grass_jax import stacked_layers
    >>> s = strategy_settings("lisa", layers=stacked_layers("layers"), num_active=2, probe_steps=40)
    >>> s.sampling_kind, s.reset_on_switch, s.probe_steps   # LISA does not probe
    ('uniform', True, 0)
  """
  def pick(names: Sequence[str]) -> dict[str, Any]:
    return {k: fields[k] for k in names if k in fields}
  if name in ("grass", "grass_static"):
    return GrassSettings(static=name == "grass_static", **fields)
  if name == "lisa":
    if fields.get("num_active") is None:
      raise ValueError("strategy 'lisa' needs num_active")
    return GrassSettings(sampling_kind="uniform", reset_on_switch=True, **pick(_LISA_FIELDS))
  if name == "full":
    return GrassSettings(num_active=None, period=1, **pick(("layers", "always_on")))
  if name == "fixed":
    if not fields.get("fixed_layers"):
      raise ValueError("strategy 'fixed' needs fixed_layers")
    f = pick(_FIXED_FIELDS)
    return GrassSettings(num_active=len(f["fixed_layers"]), period=1, sampling_kind="fixed", **f)
  raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")


def strategy(name: str, inner: optax.GradientTransformation, /, **fields: Any) -> optax.GradientTransformationExtraArgs:
  """:func:`transform` with :func:`strategy_settings` of ``name`` and ``fields``.

  Example::

    tx = grass_jax.strategy("lisa", optax.adamw(1e-4), layers=grass_jax.stacked_layers("layers"), num_active=2)
  """
  return transform(inner, strategy_settings(name, **fields))


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


def diagnostics(opt_state: Any, *, probability: str = "softmax", temperature: float = 0.5,
                epsilon: float = 0.1, uniform: bool = False, fixed: bool = False) -> dict[str, np.ndarray]:
  """Readable snapshot for logging and plots (host numpy arrays).

  Keys: ``step``, ``active``, ``next_active``, ``importance`` (MGN),
  ``num_measurements``, ``probabilities`` (of the latest draw) and
  ``current_probabilities`` (what a draw now would use under the given rule;
  uniform when ``uniform``, as LISA draws; the fixed set's when ``fixed``).
  """
  s = find_state(opt_state)
  if fixed:
    cur = s.probabilities
  elif uniform:
    cur = sampling.uniform(s.importance.shape[0])
  elif probability == "gain":
    cur = gain_lib.probabilities(s.importance, s.num_measurements, temperature=temperature, epsilon=epsilon)
  else:
    cur = sampling.layer_probabilities(probability, s.importance, s.num_measurements, temperature=temperature,
                                       epsilon=epsilon)
  return {
      "step": np.asarray(s.count),
      "active": np.asarray(s.active),
      "next_active": np.asarray(s.next_active),
      "importance": np.asarray(s.importance),
      "num_measurements": np.asarray(s.num_measurements),
      "probabilities": np.asarray(s.probabilities),
      "current_probabilities": np.asarray(cur),
  }


def gather_active(tree: Any, opt_state: Any, layers: LabelsFn, *, modules: Sequence[str] | None = None) -> Any:
  """Slot form of a stacked tree: layer leaves sliced to the active layers ``[gamma, ...]``.

  Differentiate the loss with respect to this (and the always-on leaves) to get
  slot-form gradients for :func:`transform` without ever forming the frozen
  layers' gradients. ``modules`` (the transform's): module form instead, each leaf's rows of the slots that
  train it (:func:`grass_jax.module_sampling.to_module_form`).
  """
  s = find_state(opt_state)
  layout = build_layout(tree, layers, True)
  if layout.kind != "stacked":
    raise ValueError("slot form needs stacked layers (a leading [L, ...] axis)")
  chex.assert_equal(layout.num_layers, s.importance.shape[0])
  stack, _ = layout.split(tree)
  leaves = list(layout.treedef.flatten_up_to(tree))
  rows = module_sampling.active_rows(modules, stack, s.active)
  for (i,), r in zip(layout.role_leaves, layout.roles):
    leaves[i] = rows[r]
  return layout.treedef.unflatten(leaves)


def apply_slot_updates(params: Any, updates: Any, active: jax.Array, layers: LabelsFn, *,
                       modules: Sequence[str] | None = None) -> Any:
  """``optax.apply_updates`` for slot-form updates: adds them to the active layers only.

  ``active``: int ``[gamma]``, each slot's layer. ``modules``: the updates are in module form
  (:func:`grass_jax.module_sampling.to_module_form`), as the GRASS update gives them for module-form gradients.
  """
  layout = build_layout(params, layers, True)
  p_leaves = layout.treedef.flatten_up_to(params)
  u_leaves = layout.treedef.flatten_up_to(updates)
  role_of = {idx[0]: r for r, idx in zip(layout.roles, layout.role_leaves)} if layout.kind == "stacked" else {}
  at = module_sampling.module_layers(modules, list(role_of.values()), active)
  out = []
  for i, (p, u) in enumerate(zip(p_leaves, u_leaves)):
    if i in role_of:
      rows = at[role_of[i]]
      # One slot at a time, in place: each slot's update is a static slice of the stacked updates,
      # which XLA forwards from the per-layer results, so the stack need never exist.
      for j in range(u.shape[0]):
        row = jax.lax.dynamic_index_in_dim(p, rows[j], keepdims=False)
        p = jax.lax.dynamic_update_index_in_dim(p, (row + u[j]).astype(p.dtype), rows[j], 0)
      out.append(p)
    else:
      out.append((p + u).astype(p.dtype))
  return layout.treedef.unflatten(out)
