"""The jitted train step: gradients only for the active layers ("slots").

The step differentiates with respect to the always-on leaves and ``[gamma, ...]``
handles for the active layers' weights. The layer stack runs as a slot scan
(:mod:`grass_jax.models.slot_scan`): frozen layers compute input gradients only,
trained layers write their weight gradient into their slot, so switching layers
never recompiles, gradients come out in the GRASS transform's slot form, and
gradient memory scales with gamma, not with L (DESIGN.md).

The same backward pass can measure every layer's gradient norm for GRASS's
importance (``measure``): during the probing phase exactly, or at every step by
a sketch; the step then hands the transform ``layer_norms`` (the per-layer
gradient RMS, NaN where a layer was not measured).

Example::

  settings = grass_jax.strategy_settings("lisa", layers=LAYERS, num_active=2, always_on=always_on)
  tx = optax.chain(optax.clip_by_global_norm(1.0), grass_jax.transform(optax.adamw(1e-4), settings))
  step = make_train_step(config, tx, StepOptions(grass=settings, loss_chunk=2048))
  params, opt_state, metrics = step(params, opt_state, batch)
  # batch: tokens / attention_mask / loss_mask, each [grad_accum, B, T]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from grass_jax import sharding as sharding_lib
from grass_jax.layers import AlwaysOn, build_layout
from grass_jax.loss import chunked_cross_entropy, cross_entropy
from grass_jax.models import LAYERS
from grass_jax.models.bucketed_stack import bucketed_stack
from grass_jax.models.decoder import DecoderConfig, ForwardOptions, Params, forward, hidden_states, resolve_attention
from grass_jax.models.slot_scan import MEASURES, Measurement, frozen_layers_measured, slot_stack
from grass_jax.schedule import Schedule
from grass_jax.offload import state_stream
from grass_jax.module_sampling import active_rows, from_module_form, module_leaves, slot_modules
from grass_jax.transform import GrassSettings, GrassState, apply_slot_updates, find_state

Batch = dict[str, jax.Array]


__all__ = ["LAYERS", "MEASURES", "Backward", "StepOptions", "cross_entropy", "make_train_step", "slot_loss"]


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """How the train step computes; validated once, here. The defaults are a plain run's.

  Attributes:
    dtype: compute dtype of the forward and backward passes.
    remat: what each block keeps for the backward pass: 'full' (its input; recomputed), 'dots', 'none'.
    attention: 'auto', 'cudnn', 'xla' or 'einsum' (:func:`grass_jax.models.decoder.resolve_attention`).
    loss_chunk: > 0: the LM head and the loss over this many tokens at a time (the float32 logits and
      their gradient never exist whole), where a micro-batch predicts more tokens than that; 0: whole.
    unroll_forward: the forward pass as a Python loop over static slices of the layer stack, so that
      XLA:GPU reads each layer's weights in place instead of copying them (``remat='full'`` only). More
      compile time: compile it ahead (:class:`grass_jax.ahead_of_time.CompiledStep`).
    measure: what the backward pass measures for GRASS's importance: 'none' (the transform measures the
      active layers from their gradients), 'exact' (the trained layers, and every layer during the first
      ``probe_steps`` steps: the probing phase) or 'sketch' (every layer at every step, ``sketch_size``
      random projections per linear map); the step passes the norms to the transform as ``layer_norms``.
    sketch_size: k, random projections per linear map for measure 'sketch'.
    sketch_every: n > 1 sketches frozen layers only on every n-th step, ending with the step that
      refreshes the transform's importance (n must divide its ``refresh_every``).
    grass: the settings the GRASS transform in ``tx`` was built from (:func:`grass_jax.strategy_settings`),
      the same object, so that the two cannot disagree. The step reads ``probe_steps`` from it (it
      measures every layer while the transform probes) and ``always_on`` (it differentiates only the
      layers and that group; with embeddings frozen the backward pass stops at the lowest trained
      layer). None: no probing, and every leaf gets a gradient (the transform keeps what it trains).
    stream_states: the active layers' optimizer states are in host memory (the step's ``shardings``
      from :func:`grass_jax.offload.host_slot_states`); each is copied to the device for its update and
      back, one weight matrix at a time (``stream_by_leaf``; the inner optimizer must act leaf by leaf,
      as adamw does), or one layer at a time.
    donate: the step reuses the buffers of the params and state it is given.
  """

  dtype: Any = jnp.bfloat16
  remat: str = "full"
  attention: str = "auto"
  loss_chunk: int = 0
  unroll_forward: bool = False
  measure: str = "none"
  sketch_size: int = 4
  sketch_every: int = 1
  grass: GrassSettings | None = None
  stream_states: bool = False
  stream_by_leaf: bool = True
  donate: bool = True

  def __post_init__(self):
    if self.measure not in MEASURES:
      raise ValueError(f"measure must be one of {MEASURES}; got {self.measure!r}")
    if self.unroll_forward and self.remat != "full":
      raise ValueError(f"unroll_forward needs remat='full' (other policies keep the layer scan); "
                       f"got remat={self.remat!r}")
    Schedule(period=1, probe_steps=self.probe_steps, sketch_every=self.sketch_every)  # validates both
    if self.grass is not None and self.sketch_every > 1 and self.grass.refresh_interval % self.sketch_every:
      raise ValueError(f"sketch_every={self.sketch_every} must divide the transform's refresh interval "
                       f"({self.grass.refresh_interval} steps), so that every refresh sees a sketch")

  @property
  def probe_steps(self) -> int:
    """The transform's probing steps (0 without ``grass``)."""
    return 0 if self.grass is None else self.grass.probe_steps

  @property
  def always_on(self) -> AlwaysOn | None:
    """The transform's always-on group (None without ``grass``: every leaf gets a gradient)."""
    return None if self.grass is None else self.grass.always_on

  @property
  def modules(self) -> tuple[str, ...] | None:
    """The transform's modules (module granularity: the slot tree in module form), or None."""
    return None if self.grass is None else self.grass.modules


class Backward(NamedTuple):
  """What the backward pass of :func:`slot_loss` measures and where it stops.

  Attributes:
    sink: float32 ``[L]`` zeros whose gradient holds each layer's squared gradient norm (importance
      measurement; see :mod:`grass_jax.models.slot_scan`); None: no measurement.
    measurement: this step's :class:`~grass_jax.models.slot_scan.Measurement` (with ``sink``).
    input_grad: False when the embeddings do not train: the backward pass then stops at the lowest
      trained layer ('cond' only).
    start: an int: the bucketed backward pass from this layer up (:mod:`grass_jax.models.bucketed_stack`;
      'cond', ``input_grad=False``, measure 'none' or 'exact', and not on probing steps: their gradients
      come out NaN); None: the slot scan.
  """

  sink: jax.Array | None = None
  measurement: Measurement | None = None
  input_grad: bool = True
  start: int | None = None


def slot_loss(trainable: Params, frozen_layers: dict[str, jax.Array], active: jax.Array, config: DecoderConfig,
              batch: Batch, options: StepOptions = StepOptions(), *, backward: Backward = Backward(),
              act_sharding: Any = None) -> tuple[jax.Array, jax.Array]:
  """Summed loss of a micro-batch as a function of the trainable slot tree.

  Args:
    trainable: params whose ``layers`` leaves are ``[gamma, ...]`` (the active
      layers, in the order of ``active``), in module form with module granularity
      (``options.grass.modules``: :mod:`grass_jax.module_sampling`); other leaves are the always-on group.
    frozen_layers: the full ``[L, ...]`` layer stack (no gradient flows to it).
    active: int32 ``[gamma]`` layer index of each slot.
    options: how it computes (:class:`StepOptions`). The active layers' weights are read from
      ``frozen_layers``, not from the values of ``trainable['layers']`` (only their shapes).
      ``grass``, ``stream_*`` and ``donate`` are the step's, not the loss's.
    backward: what the backward pass measures and where it stops (:class:`Backward`).
    act_sharding: the activations' sharding on a mesh of several devices.

  Returns:
    ``(summed loss, number of loss tokens)``.
  """
  o = options
  dtype, remat, measure, may_probe = o.dtype, o.remat, o.measure, o.probe_steps > 0
  sink, measurement, input_grad, backward_start = backward
  num_layers = config.num_layers
  gamma = active.shape[0]
  frozen_layers = jax.lax.stop_gradient(frozen_layers)
  impl = resolve_attention(config, o.attention, dtype)
  fwd = ForwardOptions(dtype=dtype, remat=remat, attention=impl, act_sharding=act_sharding)
  params = {**trainable, "layers": frozen_layers}
  stack = None
  if gamma == num_layers:  # all layers train: the slots are the stack itself (active == arange)
    params = trainable
  elif backward_start is not None:
    _check_bucketable(input_grad, measure, o.sketch_every)
    # Steps that measure frozen layers (probing, a sketch step) are refused: their gradients come out NaN.
    refuse = frozen_layers_measured(measure, measurement, may_probe=may_probe, sketch_every=o.sketch_every)
    slots = trainable["layers"]
    if o.modules is not None:  # the bucketed pass forms whole layers: their other modules' rows are dropped
      slots = from_module_form(o.modules, slots, gamma)
    stack = bucketed_stack(config, slots, _slot_of(active, num_layers), backward_start,
                           attention=impl, act_sharding=act_sharding,
                           measure="none" if measure == "none" else "exact", sink=sink, refuse=jnp.asarray(refuse))
  else:
    stack = slot_stack(config, trainable["layers"], _slot_of(active, num_layers), attention=impl,
                       act_sharding=act_sharding, remat=remat, measure=measure, sketch_size=o.sketch_size, sink=sink,
                       measurement=measurement, may_probe=may_probe, input_grad=input_grad,
                       sketch_every=o.sketch_every, unroll_forward=o.unroll_forward,
                       slot_roles=_slot_roles(o, trainable["layers"], gamma))
  # A batch of at most one chunk's tokens takes the whole-loss path: the same memory, no custom VJP.
  chunked = 0 < o.loss_chunk < batch["tokens"].shape[0] * (batch["tokens"].shape[1] - 1)
  out, _ = (hidden_states if chunked else forward)(params, config, batch["tokens"], batch["attention_mask"],
                                                   options=fwd, layer_stack=stack)
  if chunked:
    return chunked_cross_entropy(params, config, out, batch["tokens"], batch["loss_mask"], o.loss_chunk)
  return cross_entropy(out, batch["tokens"], batch["loss_mask"])


def _slot_roles(o: StepOptions, slots: Params, gamma: int) -> tuple[tuple[str, ...], ...] | None:
  """Per slot, the layer leaves it trains (module granularity: its module's), or None (all of them)."""
  if o.modules is None:
    return None
  return tuple(tuple(sorted(module_leaves(o.modules, slots, m))) for m in slot_modules(o.modules, gamma))


def _check_bucketable(input_grad: bool, measure: str, sketch_every: int) -> None:
  if input_grad:
    raise ValueError("a bucketed backward pass (backward_start) stops at the lowest trained layer, so the embeddings "
                     "must be frozen: build the transform and StepOptions(grass=...) from settings whose "
                     "always_on leaves out 'embed' (optim.always_on)")
  if measure == "sketch" and sketch_every == 1:
    raise ValueError("a bucketed backward pass (backward_start) cannot sketch frozen layers below the bucket, and "
                     "sketch_every=1 sketches at every step: use sketch_every > 1 (the steps between run the "
                     "bucket), measure 'exact' or 'none', or no backward_start")


def _slot_of(active: jax.Array, num_layers: int) -> jax.Array:
  """int ``[L]``: each layer's slot in ``active``, or -1."""
  return jnp.full((num_layers,), -1, jnp.int32).at[active].set(jnp.arange(active.shape[0], dtype=jnp.int32))


def _layer_size(config: DecoderConfig) -> int:
  return sum(math.prod(s[1:]) for s in config.param_shapes()["layers"].values())


def _layer_rms(sink_grad: jax.Array, state: GrassState, denom: jax.Array, *, measurement: Measurement,
               layer_size: int) -> jax.Array:
  """Per-layer gradient RMS from the sink's gradient (of the summed loss); NaN where not measured."""
  num_layers = sink_grad.shape[0]
  measured = jnp.zeros((num_layers,), bool).at[state.active].set(True) | measurement.probing | measurement.sketching
  rms = jnp.sqrt(sink_grad / layer_size) / denom
  return jnp.where(measured, rms, jnp.nan)


def _gradient_leaves(wrt: Params, always_on: AlwaysOn | None, state: GrassState, num_layers: int) -> list[bool]:
  """Per leaf of the slot tree (flatten order), whether the step differentiates it.

  The layers always; of the other leaves (embeddings, final norm, LM head) the always-on group, or all of
  them when ``always_on`` is None. A leaf left out gets a zero gradient and costs no backward pass.
  """
  leaves = jax.tree.leaves(wrt)
  if always_on is None:
    return [True] * len(leaves)
  layout = build_layout(wrt, LAYERS, always_on, num_layers=num_layers)
  trained = {i for idx in layout.role_leaves for i in idx} | set(layout.always_on)
  if not layout.always_on and jax.tree.leaves(state.always_on_state):
    raise ValueError("StepOptions(grass=...) says no leaf outside the layers trains, but the GRASS "
                     "transform has an always-on group: give the step the settings the transform was built from")
  return [i in trained for i in range(len(leaves))]


def _summed_gradients(grad_of: Callable, batch: Batch, wrt: Any) -> tuple[jax.Array, jax.Array, Any]:
  """``(summed loss, loss tokens, summed gradients)`` over the batch's leading micro-batch axis.

  ``grad_of(micro_batch) -> ((loss_sum, count), grads)``, ``grads`` shaped like ``wrt``.
  """
  if batch["tokens"].shape[0] == 1:
    # No accumulation: skip the float32 accumulators (a copy of the trained parameters' size).
    (loss_sum, count), grads = grad_of(jax.tree.map(lambda x: x[0], batch))
    return loss_sum, count, grads

  def micro(acc, mb):
    (loss_sum, count), g = grad_of(mb)
    acc_g, acc_l, acc_n = acc
    return (jax.tree.map(jnp.add, acc_g, g), acc_l + loss_sum, acc_n + count), None

  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), wrt)
  (grads, loss_sum, count), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), batch)
  return loss_sum, count, grads


def make_train_step(config: DecoderConfig, tx: optax.GradientTransformation, options: StepOptions = StepOptions(), *,
                    shardings: tuple[Any, Any, Any] | None = None) -> Callable:
  """Builds ``step(params, opt_state, batch, backward_start=None) -> (params, opt_state, metrics)``, jitted.

  ``batch`` arrays have a leading gradient-accumulation axis ``[A, B, T]``;
  micro-batch gradients are summed in a ``lax.scan`` and divided by the number
  of loss tokens. A step whose gradients are not finite changes no parameter
  and no moment (the GRASS transform skips it) and ``metrics['skipped']`` is 1.
  ``tx`` must contain one GRASS transform (any strategy), with any clipping
  or scaling before or after it in an ``optax.chain``.

  ``shardings``: ``(params, opt_state, batch)`` shardings on a mesh
  (:mod:`grass_jax.sharding`); params and state keep theirs across steps, so
  the step compiles once. Without it the step runs where its inputs are.

  ``options``: how it computes (:class:`StepOptions`: dtype, remat, attention, the loss in chunks,
  importance measured in the backward pass, the always-on leaves, streamed states). With
  ``options.measure`` other than 'none' ``metrics['probing']`` is 1 for a probing step and
  ``metrics['sketching']`` 1 for a step that sketched.

  ``backward_start`` (static, per call, the fourth positional argument):
  None runs the slot scan, compiled once for every draw. An int runs the bucketed backward pass from that layer
  up (:mod:`grass_jax.models.bucketed_stack`): no recomputation, one
  executable per value; every active layer must be at or above it (use
  :func:`~grass_jax.models.bucketed_stack.backward_start`), the embeddings
  frozen (``always_on`` without them), and the step must not measure frozen
  layers (probing, or a sketch step of ``sketch_every > 1``). A
  :class:`grass_jax.backward_buckets.BackwardBuckets` picks the value per
  step. A step that breaks either rule has NaN gradients and is skipped
  (``metrics['skipped']``), never trained on a wrong gradient. :class:`grass_jax.ahead_of_time.CompiledStep` compiles the
  buckets ahead or in the background; docs/performance.md measures it.
  """
  o = options
  # The step asks only whether it probes and whether it sketches: the period does not matter to it.
  schedule = Schedule(period=1, probe_steps=o.probe_steps, sketch_every=o.sketch_every)
  stream_sh = None
  if o.stream_states:
    if shardings is None:
      raise ValueError("stream_states needs shardings: see grass_jax.offload.host_slot_states")
    stream_sh = find_state(shardings[1]).slot_states[0]
  act_sharding = None
  if shardings is not None and shardings[2].mesh.size > 1:
    act_sharding = sharding_lib.activation_sharding(shardings[2].mesh)
  layer_size = _layer_size(config)

  def step(params: Params, opt_state: Any, batch: Batch,
           backward_start: int | None = None) -> tuple[Params, Any, dict[str, jax.Array]]:
    state = find_state(opt_state)
    active = state.active
    probing = schedule.probing(state.count)
    all_layers = active.shape[0] == config.num_layers  # full fine-tuning: no slot copies
    measuring = o.measure != "none" and not all_layers
    # Module granularity gathers each leaf's rows of the slots that train it (module form): no buffer of the
    # step then holds what a slot does not train.
    trainable = params if all_layers else {**params, "layers": active_rows(o.modules, params["layers"], active)}
    # The slot scan reads the active layers from the frozen stack and never the slot values, so the gradient
    # is taken at zeros: the gathered `trainable` then feeds only the elementwise optimizer update.
    slot_handles = not all_layers
    wrt = ({**params, "layers": {k: jnp.zeros_like(v) for k, v in trainable["layers"].items()}}
           if slot_handles else trainable)
    sink = jnp.zeros((config.num_layers,), jnp.float32) if measuring else None
    # A key of its own for the sketch's projections, derived from the state's (resume stays exact).
    sketching = jnp.asarray(o.measure == "sketch") & schedule.sketching(state.count)
    measurement = Measurement(probing, jax.random.fold_in(state.key, 0x5EC), sketching) if measuring else None
    leaves, treedef = jax.tree.flatten(wrt)
    differentiate = ([True] * len(leaves) if all_layers
                     else _gradient_leaves(wrt, o.always_on, state, config.num_layers))
    ids = [i for i, d in enumerate(differentiate) if d]
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(wrt)[0]]
    embed_trains = all(d for p, d in zip(paths, differentiate) if p == "['embed']")

    loss_options = o if measuring else dataclasses.replace(o, measure="none")

    def loss_of(diff_leaves, sk, frozen, act, mb):
      full = list(leaves)  # leaves not differentiated enter as constants
      for i, x in zip(ids, diff_leaves):
        full[i] = x
      backward = Backward(sk, measurement, input_grad=embed_trains, start=None if all_layers else backward_start)
      return slot_loss(treedef.unflatten(full), frozen, act, config, mb, loss_options, backward=backward,
                       act_sharding=act_sharding)

    grad_fn = jax.value_and_grad(loss_of, argnums=(0, 1), has_aux=True)
    diff_wrt = [leaves[i] for i in ids]
    loss_sum, count, (diff_grads, sink_grad) = _summed_gradients(
        lambda mb: grad_fn(diff_wrt, sink, params["layers"], active, mb), batch, (diff_wrt, sink))
    grad_leaves = [jnp.zeros_like(x) for x in leaves]
    for i, g in zip(ids, diff_grads):
      grad_leaves[i] = g
    grads = treedef.unflatten(grad_leaves)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, trainable)
    loss = loss_sum / denom
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # The GRASS transform itself skips non-finite steps (zero updates, moments kept).
    extra = {} if stream_sh is None else {"state_stream": state_stream(stream_sh, by_leaf=o.stream_by_leaf)}
    if measuring:
      extra["layer_norms"] = _layer_rms(sink_grad, state, denom, measurement=measurement, layer_size=layer_size)
    if isinstance(tx, optax.GradientTransformationExtraArgs):  # optax's convention: extra args for those that say so
      extra["loss"] = loss  # GRASS with importance_from='gain' learns from it; others ignore it
    updates, new_opt_state = tx.update(grads, opt_state, trainable, **extra)
    if all_layers:
      new_params = optax.apply_updates(params, updates)
    else:
      new_params = apply_slot_updates(params, updates, active, LAYERS, modules=o.modules)
    metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count, "skipped": (~ok).astype(jnp.int32),
               "probing": probing.astype(jnp.int32), "sketching": (measuring & sketching).astype(jnp.int32)}
    return new_params, new_opt_state, metrics

  donate_argnums = (0, 1) if o.donate else ()
  static = (3,)  # backward_start; passed by position: jit refuses keyword arguments with in_shardings
  if shardings is None:
    return jax.jit(step, donate_argnums=donate_argnums, static_argnums=static)
  p_sh, s_sh, b_sh = shardings
  metrics_sh = jax.sharding.NamedSharding(b_sh.mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, donate_argnums=donate_argnums, in_shardings=(p_sh, s_sh, b_sh),
                 out_shardings=(p_sh, s_sh, metrics_sh), static_argnums=static)
