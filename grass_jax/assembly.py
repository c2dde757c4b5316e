"""One place that wires a run from a :class:`~grass_jax.config.Config`: optimizer, train step, shardings.

The :class:`~grass_jax.train.Trainer`, the benchmarks and the probes all build their run here, so a
config key means the same thing in each of them. Nothing here touches data or weights: the step is
built (and can be compiled) from abstract shapes, before the weights are on the device.

Example::

  cfg = config.load("configs/tiny-demo.yaml")
  run = assemble(cfg, total_steps=100)
  run.compile_ahead([batch])                                    # before the weights exist
  params = run.init_params(seed=0)                              # random weights, placed on the mesh
  opt_state = run.init_state(params)
  offloader = run.offloader(opt_state)                          # None unless offload_optimizer_state
  params, opt_state, metrics = run.step(params, opt_state, sharding.shard_batch(batch, run.shardings[2]))
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from grass_jax import module_sampling
from grass_jax import sharding as sharding_lib
from grass_jax import xla_flags
from grass_jax.ahead_of_time import CompiledStep
from grass_jax.backward_buckets import BackwardBuckets
from grass_jax.config import Config, ConfigError, ModelConfig, OptimConfig
from grass_jax.models import LAYERS, config_from_hf, init_params
from grass_jax.models.decoder import DecoderConfig, resolve_attention
from grass_jax.offload import Offloader, host_slot_shardings, host_slot_states
from grass_jax.pretrained import read_model_config
from grass_jax.train_step import StepOptions, make_train_step
from grass_jax.transform import GrassSettings, strategy_settings, transform

__all__ = ["Assembly", "assemble", "build_optimizer", "check_layers_fit", "dtype_of", "grass_settings", "measure_mode", "model_config", "step_attention",
           "step_options"]


def dtype_of(name: str) -> Any:
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def model_config(m: ModelConfig) -> DecoderConfig:
  """The config of the model ``model.path`` or ``model.random_init`` names, without loading it."""
  if m.random_init is not None:
    return config_from_hf(dict(m.random_init))
  return read_model_config(m.path)


def build_optimizer(o: OptimConfig, grass: GrassSettings,
                    total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """``clip -> GRASS/LISA/full(adamw(1.0)) -> scale_by_schedule``: a global LR schedule, per-layer moments;
  ``grass``: the strategy's settings (:func:`grass_settings`).

  The schedule counts optimizer updates after probing: probing steps update nothing.
  """
  probe = grass.probe_steps
  train_steps = max(total_steps - probe, 1)
  warmup = int(o.warmup_ratio * train_steps)
  decay_steps = max(train_steps - warmup, 1)
  if o.schedule == "cosine":
    after = optax.cosine_decay_schedule(o.learning_rate, decay_steps)
  elif o.schedule == "linear":
    after = optax.linear_schedule(o.learning_rate, 0.0, decay_steps)
  else:
    after = optax.constant_schedule(o.learning_rate)
  schedule = optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, warmup), after], [warmup]) \
      if warmup else after
  if probe:
    schedule = optax.join_schedules([optax.constant_schedule(0.0), schedule], [probe])
  inner = optax.adamw(1.0, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  parts = [optax.clip_by_global_norm(o.max_grad_norm)] if o.max_grad_norm > 0 else []
  return optax.chain(*parts, transform(inner, grass), optax.scale_by_schedule(schedule)), schedule


def grass_settings(o: OptimConfig, num_layers: int, seed: int) -> GrassSettings:
  """The strategy's settings: what the transform is built from and what the train step reads
  (``StepOptions(grass=...)``), one object for both."""
  return strategy_settings(
      o.strategy, layers=LAYERS, num_active=_slots(o, num_layers),
      period=o.period, seed=seed, always_on=o.always_on, offload=o.offload_optimizer_state,
      fixed_layers=o.fixed_layers, probability=o.probability, temperature=o.temperature, epsilon=o.epsilon,
      probe_steps=o.probing_steps(), refresh_every=o.refresh_every, mgn_ema=o.mgn_ema,
      reset_on_switch=o.reset_on_switch, coverage=o.coverage,
      modules=module_sampling.ATTENTION_MLP if o.module_granularity() else None,
      importance_from=o.importance if o.importance_from_training() else "grad")


def _slots(o: OptimConfig, num_layers: int) -> int | None:
  """The transform's active slots: ``num_active`` layers, or by modules one attention and one MLP slot per layer's
  worth (:mod:`grass_jax.module_sampling` counts slots)."""
  if o.strategy == "full":
    return None
  if o.module_granularity():
    return 2 * min(o.num_active, (num_layers - 1) // 2)
  return min(o.num_active, num_layers)


def measure_mode(o: OptimConfig) -> str:
  """What the train step's backward pass measures for the strategy (see grass_jax.train_step)."""
  if not o.strategy.startswith("grass"):
    return "none"
  if o.live_importance():
    return "sketch"
  return "exact" if o.probing_steps() else "none"


def step_attention(cfg: Config, model: DecoderConfig) -> str:
  """model.attention, with cuDNN's fused attention replaced by XLA's in a deterministic GPU run."""
  if not cfg.train.deterministic or jax.default_backend() != "gpu":
    return cfg.model.attention
  missing = xla_flags.missing_deterministic_flags()
  if missing:
    raise ConfigError(f"train.deterministic needs XLA_FLAGS={' '.join(missing)} before JAX starts: run "
                      "scripts/train.py, or call grass_jax.use_deterministic_flags() first thing")
  if cfg.model.attention == "cudnn":
    raise ConfigError("model.attention: cudnn has no deterministic backward pass on the GPU: with "
                      "train.deterministic use model.attention: auto, xla or einsum")
  impl = resolve_attention(model, cfg.model.attention, dtype_of(cfg.model.compute_dtype))
  return "xla" if impl == "cudnn" else impl


def check_layers_fit(o: OptimConfig, model: DecoderConfig) -> None:
  """The layers the optimizer settings name exist in the model (a config alone cannot tell)."""
  if o.strategy == "fixed" and max(o.fixed_layers) >= model.num_layers:
    raise ConfigError(f"optim.fixed_layers={o.fixed_layers} names a layer beyond the model's "
                      f"{model.num_layers} (0 to {model.num_layers - 1})")
  if o.strategy != "full" and o.module_granularity() and 2 * o.num_active >= model.num_layers:
    # Drawing every layer would be full fine-tuning's path (every layer whole), not modules'.
    most = (model.num_layers - 1) // 2
    fix = f"use at most {most}, or optim.granularity: layer" if most else "set optim.granularity: layer"
    raise ConfigError(f"optim.num_active={o.num_active} by modules draws {2 * o.num_active} layers (one attention "
                      f"and one MLP block per layer's worth), as many as or more than the model's "
                      f"{model.num_layers}; {fix}")
  if o.strategy != "full" and o.num_active > model.num_layers:
    raise ConfigError(f"optim.num_active={o.num_active} exceeds the model's {model.num_layers} layers; "
                      f"use at most {model.num_layers} (or optim.strategy: full)")


def step_options(cfg: Config, model: DecoderConfig, grass: GrassSettings) -> StepOptions:
  """The train step's settings a config implies (the model's, the optimizer's and the run's keys);
  ``grass``: the settings its transform was built from."""
  o, m = cfg.optim, cfg.model
  return StepOptions(dtype=dtype_of(m.compute_dtype), remat=m.remat,
                     attention=step_attention(cfg, model), loss_chunk=m.loss_chunk_tokens,
                     unroll_forward=m.unroll_forward, measure=measure_mode(o), sketch_size=o.sketch_size,
                     sketch_every=o.sketch_every, grass=grass, stream_states=o.stream_active_states)


@dataclasses.dataclass(frozen=True)
class Assembly:
  """A run's parts, built from its config before any weight exists.

  Attributes:
    cfg: the config it was built from.
    model: the decoder's config.
    tx: the optimizer (clipping, the GRASS/LISA/full transform, the learning-rate schedule).
    schedule: the learning rate by optimizer update.
    step: the train step, compiled per batch shape (and backward start) on first use or ahead of time.
    param_shapes, state_shapes: abstract parameters and optimizer state (for compiling ahead of time).
    shardings: ``(params, opt_state, batch)`` shardings the step is compiled for; with
      ``stream_active_states`` the active layers' states are in host memory.
    state_device_shardings: the optimizer state's shardings with every leaf on the device (what
      ``tx.init`` produces and checkpoints restore into).
    backward_buckets: the bucketed backward pass's host-side schedule, or None (``model.backward_bucket``).
  """

  cfg: Config
  model: DecoderConfig
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  step: CompiledStep
  param_shapes: Any
  state_shapes: Any
  shardings: tuple[Any, Any, Any]
  state_device_shardings: Any
  backward_buckets: BackwardBuckets | None

  def init_params(self, seed: int) -> Any:
    """Random weights of the model's shapes, created in place on the mesh (no host copy)."""
    dtype = dtype_of(self.cfg.model.dtype)
    return jax.jit(lambda k: init_params(self.model, k, dtype), out_shardings=self.shardings[0])(
        jax.random.PRNGKey(seed))

  def place(self, params: Any) -> Any:
    """Loaded weights, placed with the step's shardings (so the step compiles once)."""
    return jax.device_put(params, self.shardings[0])

  def init_state(self, params: Any) -> Any:
    """The optimizer state where the step wants it: one compiled program, not dozens of small ones."""
    opt_state = jax.jit(self.tx.init, out_shardings=self.state_device_shardings)(params)
    if self.cfg.optim.stream_active_states:
      opt_state, _ = host_slot_states(opt_state, self.state_device_shardings)
    return opt_state

  @property
  def scan_runs(self) -> bool:
    """Whether any step runs the slot scan: always without backward buckets; with them only steps that
    measure frozen layers (probing, sketching) do."""
    return self.backward_buckets is None or measure_mode(self.cfg.optim) != "none"

  def compile_ahead(self, batches: Sequence[Any], on_compiled: Callable[[], None] = lambda: None) -> None:
    """Compiles the step for every batch shape, and every bucket of the backward pass, from abstract shapes.

    Before the weights are placed, so XLA's autotuning buffers stay off the run's peak
    (:mod:`grass_jax.ahead_of_time`). The slot scan is left out where no step runs it (buckets without
    measurement). ``on_compiled`` is called after each batch shape's scan and once after the buckets.
    """
    if self.scan_runs:
      for batch in batches:
        self.step.compile(self.param_shapes, self.state_shapes, batch)
        on_compiled()
    if self.backward_buckets is not None:
      for start in self.backward_buckets.starts(self.model.num_layers):
        for batch in batches:
          self.step.compile_in_background(self.param_shapes, self.state_shapes, batch, start)  # workers at once
      self.step.wait()
      on_compiled()

  def offloader(self, opt_state: Any, layer_states: Any = None) -> Offloader | None:
    """The host bank of inactive layers' states (None unless ``optim.offload_optimizer_state``);
    ``layer_states``: a checkpoint's bank to restore."""
    o = self.cfg.optim
    if not o.offload_optimizer_state:
      return None
    kw = dict(period=o.period, stream=o.stream_active_states)
    if layer_states is not None:
      return Offloader.restore(opt_state, layer_states, **kw)
    return Offloader(opt_state, **kw)


def assemble(cfg: Config, *, total_steps: int, mesh: Any = None, compile_workers: int | None = None,
             model: DecoderConfig | None = None) -> Assembly:
  """Builds the optimizer, the train step and the shardings ``cfg`` describes, on ``mesh``.

  ``total_steps``: the run's length (the learning-rate schedule's). ``mesh``: default every device, data-parallel
  (:func:`grass_jax.sharding.make_mesh`). ``compile_workers``: threads compiling the bucketed backward
  pass's executables ahead of training (default: two). ``model``: :func:`model_config` of ``cfg.model``
  already read and checked with :func:`check_layers_fit` (default: read and checked here).
  """
  o = cfg.optim
  if model is None:
    model = model_config(cfg.model)
    check_layers_fit(o, model)
  mesh = sharding_lib.make_mesh() if mesh is None else mesh
  grass = grass_settings(o, model.num_layers, cfg.train.seed)
  tx, schedule = build_optimizer(o, grass, total_steps)
  dtype = dtype_of(cfg.model.dtype)
  param_shapes = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0), dtype))
  state_shapes = jax.eval_shape(tx.init, param_shapes)
  state_device = sharding_lib.tree_shardings(state_shapes, mesh)
  state_sh = host_slot_shardings(state_device) if o.stream_active_states else state_device
  shardings = (sharding_lib.tree_shardings(param_shapes, mesh), state_sh, sharding_lib.batch_sharding(mesh))
  measure = measure_mode(o)
  if compile_workers is None:
    compile_workers = min(2, os.cpu_count() or 1) if cfg.model.backward_bucket else 1
  step = CompiledStep(make_train_step(model, tx, step_options(cfg, model, grass), shardings=shardings),
                      workers=compile_workers)
  buckets = BackwardBuckets(cfg.model.backward_bucket, dataclasses.replace(grass.schedule, sketch_every=o.sketch_every),
                            measure) if cfg.model.backward_bucket else None
  return Assembly(cfg=cfg, model=model, tx=tx, schedule=schedule, step=step, param_shapes=param_shapes,
                  state_shapes=state_shapes, shardings=shardings, state_device_shardings=state_device,
                  backward_buckets=buckets)
