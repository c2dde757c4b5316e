"""Typed training configuration, loaded from YAML with ``key=value`` overrides.

Every key is a field of one of the dataclasses below (the field docs are the
reference for ``configs/*.yaml``). Unknown keys, wrong types and out-of-range
values raise :class:`ConfigError` naming the key. A YAML file sets the keys of
:data:`CORE` in their sections and any other key under ``advanced:``, by
section (keys outside ``advanced:`` are read too, so older files still load)::

  optim:
    strategy: lisa
  advanced:
    optim: {temperature: 0.5}

Example::

  >>> cfg = from_dict({'model': {'random_init': {'model_type': 'llama'}}, 'data': {'train': 'x.jsonl'}})
  >>> cfg = apply_overrides(cfg, ['optim.num_active=4', 'train.max_steps=10'])
  >>> cfg.optim.num_active, cfg.train.max_steps
  (4, 10)
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from grass_jax.data import FORMATS, shown as _shown
from grass_jax.errors import ConfigError


def _key_name(key: Any) -> str:
  return key if isinstance(key, str) and key.isidentifier() else _shown(key, 30)


@dataclasses.dataclass
class ModelConfig:
  """model: which network to fine-tune.

  path: HF checkpoint directory or hub id (config.json + safetensors/msgpack).
  random_init: HF config.json keys of a randomly initialised model, instead of
    ``path`` (demos and benchmarks).
  dtype: parameter dtype, 'float32' or 'bfloat16'.
  compute_dtype: matmul/activation dtype, 'bfloat16' or 'float32'.
  remat: rematerialisation of each block: 'full' (needed for gamma-sized
    gradient memory), 'dots' or 'none'.
  tokenizer: tokenizer directory or hub id (default: ``path``), or 'bytes'
    for the built-in byte tokenizer (demo).
  attention: 'auto' (cuDNN fused attention on GPU where it applies, else
    'einsum'), 'einsum' (explicit scores, every model), or 'xla' / 'cudnn'
    (``jax.nn.dot_product_attention``; no Gemma 2 soft-capping).
  loss_chunk_tokens: the LM head and the loss run this many tokens at a time,
    so the float32 ``[tokens, vocab]`` logits and their gradient never exist
    whole (``grass_jax.loss``); 0, or a micro-batch predicting at most this
    many tokens, computes them whole. The default keeps a large batch's peak
    below the whole head's for a small speed cost (docs/performance.md).
  unroll_forward: run the forward pass as a Python loop over static slices of
    the layer stack instead of a scan, so that XLA:GPU reads each layer's
    weights in place instead of copying them (``remat: full`` only; more
    compile time; ``grass_jax.models.slot_scan``).
  backward_bucket: 0 (off), or n: with embeddings frozen, the backward pass
    starts at the lowest trained layer rounded down to a multiple of n,
    without recomputation (one executable per bucket, all compiled two at a
    time before the weights are placed; ``grass_jax.models.bucketed_stack``).
    Steps that measure frozen layers (probing, sketch steps) run the slot scan.
  """

  path: str | None = None
  random_init: dict | None = None
  dtype: str = "bfloat16"
  compute_dtype: str = "bfloat16"
  remat: str = "full"
  tokenizer: str | None = None
  attention: str = "auto"
  loss_chunk_tokens: int = 2048
  unroll_forward: bool = False
  backward_bucket: int = 0


@dataclasses.dataclass
class DataConfig:
  """data: the instruction-tuning set.

  train: local JSON/JSONL/parquet file or directory, or a hub dataset id.
  split: dataset split to read.
  template: prompt template of alpaca records: 'alpaca' (LLM-Adapters' instruction/input/output).
  format: 'alpaca', 'messages' (chat turns, rendered with the tokenizer's chat
    template, loss on the assistant turns), 'prompt_completion', or 'auto'
    (from the records' keys). Evaluation asks chat-trained models in the
    same template (``grass_jax.chat``).
  packing: put several short examples in one sequence of the largest bucket
    (attention and positions stay within each; grass_jax.data.Dataset).
  max_length: longest sequence in tokens; longer examples are truncated.
  buckets: sequence lengths to pad to (few shapes = few compilations);
    default: powers of two up to max_length.
  shuffle_seed: seed of the epoch order (deterministic and resumable).
  """

  train: str = ""
  split: str = "train"
  template: str = "alpaca"
  format: str = "auto"
  packing: bool = False
  max_length: int = 512
  buckets: list | None = None
  shuffle_seed: int = 0


@dataclasses.dataclass
class OptimConfig:
  """optim: optimizer and layer sampling.

  strategy: 'lisa' (uniform draws, moments reset; the default, because no
    importance sampler beat it in the paired study of docs/accuracy.md),
    'grass' (adaptive importance sampling), 'grass_static' (GRASS*: importance
    from probing only), 'full', or 'fixed' (the layers in fixed_layers, all
    run long: an oracle baseline).
  fixed_layers: with strategy 'fixed', the num_active layer indices that train.
  num_active: gamma, layers trained at a time.
  period: K, steps between layer switches.
  probability: 'softmax' (the paper's: softmax of MGN / mean(MGN) / temperature)
    or 'power' (p ~ MGN ** (1 / temperature)).
  temperature: sharpness of the probabilities (smaller: sharper).
  epsilon: uniform exploration floor (every layer keeps p >= epsilon / L).
  probe_steps: T_p, the first steps measure every layer's gradient norm and
    update nothing (a multiple of period; 0: no probing; null: none for live
    importance, which measures every layer from the first step, else one period).
  refresh_every: T_u, steps between MGN refreshes (null: period).
  mgn_ema: alpha, weight of a layer's previous MGN at a refresh (null: running mean).
  importance: how strategy 'grass' measures importance: 'sketch' (live
    importance, grass's default: every layer at every step, frozen ones by
    random projections of their weight gradient; it costs tokens/s because the
    backward pass cannot stop at the lowest trained layer), 'grad' (the
    paper's: the trained layers, and all of them while probing) or 'gain' (the
    loss decrease each period realised, credited to the layers trained in it:
    a bandit over layers, grass_jax.gain, free because the loss is computed
    anyway) or 'adam' (each trained layer's gradient along its own Adam
    update: the loss decrease Adam's step buys, not the gradient's size;
    grass_jax.importance.adam_gains; no probing, free).
    docs/accuracy.md measures each against LISA.
    grass_static always takes its importance from probing.
  sketch_size: k, random projections per linear map for importance 'sketch'.
  sketch_every: with importance 'sketch', sketch the frozen layers on every
    n-th step only (trained layers are measured at every step); the steps
    between cost what importance 'grad' costs. Must divide the refresh
    interval (refresh_every, or period), so every refresh sees a sketch.
    1 (default) is what docs/accuracy.md measured; larger values trade
    measurements for speed (docs/performance.md) and are not accuracy-tested.
  always_on: also train embeddings, final norm and LM head every step.
  reset_on_switch: strategy grass: a layer drawn again starts with fresh Adam
    moments, as LISA's layers do, instead of the moments it had when it was
    last trained (kept moments are stale: computed at other weights).
  coverage: strategies grass and lisa: draw layers in cycles, so that no layer
    trains a second time before every layer has trained once (the
    probabilities then only order the layers within a cycle).
  granularity: 'layer' (a drawn layer trains whole) or 'module' (strategy lisa
    only: 2 x num_active layers are drawn, num_active of them train their
    attention block and num_active their MLP block for the period, as MISA
    samples modules; the parameters and moments of num_active whole layers;
    grass_jax.module_sampling). null (default): 'module' for strategy lisa,
    which scored above LISA by layers on each task of docs/accuracy.md (not
    yet significantly), 'layer' for the others.
  offload_optimizer_state: keep inactive layers' optimizer state in pinned host memory.
  stream_active_states: with offload_optimizer_state, keep the active layers'
    state in host memory too and copy it to the device only for its update,
    one weight matrix at a time (no optimizer state per extra active layer on
    the device; costs host<->device copies every step, docs/offloading.md).
  learning_rate: peak learning rate.
  schedule: 'cosine', 'linear' or 'constant' after warm-up.
  warmup_ratio: fraction of the steps spent warming up linearly from 0.
  weight_decay: AdamW weight decay.
  max_grad_norm: global-norm clipping of the trained parameters' gradients (0 = off).
  b1, b2, eps: Adam hyper-parameters.
  """

  strategy: str = "lisa"
  num_active: int = 2
  fixed_layers: list | None = None
  period: int = 20
  probability: str = "softmax"
  temperature: float = 0.5
  epsilon: float = 0.1
  probe_steps: int | None = None
  refresh_every: int | None = None
  mgn_ema: float | None = 0.5
  importance: str = "sketch"
  sketch_size: int = 4
  sketch_every: int = 1
  always_on: bool = True
  reset_on_switch: bool = False
  coverage: bool = False
  granularity: str | None = None
  offload_optimizer_state: bool = False
  stream_active_states: bool = False
  learning_rate: float = 1e-5
  schedule: str = "cosine"
  warmup_ratio: float = 0.03
  weight_decay: float = 0.0
  max_grad_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8

  def probing_steps(self) -> int:
    """T_p as the run uses it: 0 for strategies without importance; when ``probe_steps`` is null, 0 for live
    importance (it measures every layer from the first step) and one ``period`` otherwise."""
    if not self.strategy.startswith("grass"):
      return 0
    if self.probe_steps is not None:
      return self.probe_steps
    return 0 if self.live_importance() or self.importance_from_training() else self.period

  def importance_from_gain(self) -> bool:
    return self.strategy == "grass" and self.importance == "gain"

  def importance_from_training(self) -> bool:
    """Whether strategy grass learns importance from training itself ('gain', 'adam'): no probing."""
    return self.strategy == "grass" and self.importance in ("gain", "adam")

  def module_granularity(self) -> bool:
    """Whether drawn layers train one module each (``granularity``; null: strategy lisa does)."""
    return granularity_used(self.strategy, self.granularity) == "module"

  def live_importance(self) -> bool:
    """Whether the backward pass measures every layer at every step (strategy grass, importance sketch)."""
    return self.strategy == "grass" and self.importance == "sketch"


def granularity_used(strategy: str, granularity: str | None) -> str:
  """What ``optim.granularity`` trains by: null is the strategy's own ('module' for lisa, else 'layer')."""
  return granularity or ("module" if strategy == "lisa" else "layer")


@dataclasses.dataclass
class TrainConfig:
  """train: the loop.

  epochs: passes over the training set.
  max_steps: stop after this many optimizer steps (null: run all epochs).
  batch_size: sequences per micro-batch.
  grad_accum: micro-batches per optimizer step.
  seed: model init / misc seed (layer sampling uses optim.seed... the same).
  log_every: steps between metric lines (JSONL, TensorBoard).
  checkpoint_every: steps between checkpoints (0: only at the end).
  keep_checkpoints: how many checkpoints to keep.
  output_dir: where metrics, checkpoints, plots and the exported model go.
  export: write the final model as a HF checkpoint (output_dir/hf_model).
  compilation_cache: keep compiled programs in output_dir/compilation_cache, so a
    resumed run reads its train step back instead of compiling it again
    (``grass_jax.compile_cache``; JAX_COMPILATION_CACHE_DIR, if set, wins).
  deterministic: the same config and seed give bitwise the same run on a GPU:
    XLA's deterministic GPU kernels (``--xla_gpu_deterministic_ops``, set by
    ``scripts/train.py`` before JAX starts) and XLA's attention instead of
    cuDNN's fused one, which has no deterministic backward pass there
    (``grass_jax.xla_flags``). Slower; CPU runs are deterministic anyway.
  """

  epochs: int = 1
  max_steps: int | None = None
  batch_size: int = 8
  grad_accum: int = 1
  seed: int = 0
  log_every: int = 10
  checkpoint_every: int = 500
  keep_checkpoints: int = 2
  output_dir: str = "runs/default"
  export: bool = True
  compilation_cache: bool = True
  deterministic: bool = False


@dataclasses.dataclass
class EvalConfig:
  """eval: accuracy during training (at every checkpoint and at the end).

  tasks: LLM-Adapters task names (e.g. [gsm8k, boolq]); empty: no evaluation.
  data: test file/dir/hub id for a single task (default: dataset/<task>/test.json).
  limit: evaluate the first N examples of each task (null: all).
  max_new_tokens: generation length (null: 32 commonsense, 256 math).
  batch_size: prompts per generation batch.
  """

  tasks: list = dataclasses.field(default_factory=list)
  data: str | None = None
  limit: int | None = None
  max_new_tokens: int | None = None
  batch_size: int = 16


@dataclasses.dataclass
class MeshConfig:
  """mesh: devices (see grass_jax/sharding.py).

  data: data-parallel replicas (null: all local devices / fsdp).
  fsdp: devices that also split the large parameter and optimizer-state arrays.
  distributed: call jax.distributed.initialize() first (several hosts; the
    coordinator comes from the environment). The mesh then spans every host.
  """

  data: int | None = None
  fsdp: int = 1
  distributed: bool = False


@dataclasses.dataclass
class Config:
  """The whole training configuration (one YAML file)."""

  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)


# The keys most runs set (25); every other key has a default that suits most runs and goes under `advanced:`.
CORE = {
    "model": ("path", "random_init", "tokenizer", "dtype"),
    "data": ("train", "max_length", "packing"),
    "optim": ("strategy", "num_active", "period", "learning_rate", "schedule", "warmup_ratio", "always_on",
              "offload_optimizer_state"),
    "train": ("epochs", "max_steps", "batch_size", "grad_accum", "seed", "checkpoint_every", "output_dir"),
    "eval": ("tasks", "data"),
    "mesh": ("data",),
}


# Keys that were removed: (the values an old config.yaml may still hold, what to do instead). Such a file still
# loads (a resume of a run started before the removal); another value is refused.
REMOVED = {
    "model.backward_bucket_compile": (("ahead",), "buckets always compile ahead now (compiled in the background, "
                                                  "none was ready within 1,000 steps of a 7B run): delete the key"),
    # Either value: when the swap copies changes no arithmetic, so an old run resumes as it would have.
    "optim.offload_prefetch": ((False, True), "offloaded states are always swapped after a period's last step "
                                              "(measured faster and leaner than prefetching): delete the key"),
    "optim.frozen_grads": (("cond",), "frozen layers always skip their weight gradients in the slot scan ('select', "
                                      "which computed and dropped them, was slower and could not measure): delete "
                                      "the key"),
}


def _drop_removed(data: dict) -> dict:
  data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
  for key, (kept, instead) in REMOVED.items():  # kept: the values still accepted
    section, name = key.split(".")
    if isinstance(data.get(section), dict) and name in data[section]:
      value = data[section].pop(name)
      if not any(value == k and type(value) is type(k) for k in kept):
        raise ConfigError(f"{key} was removed; {instead} (got {_shown(value)})")
  return data


def merge_advanced(data: dict) -> dict:
  """The sections with the ``advanced:`` keys merged into them (a key set in both places is an error)."""
  if "advanced" not in data:
    return data
  advanced = data["advanced"] or {}
  if not isinstance(advanced, dict):
    raise ConfigError(f"advanced must be a mapping of sections to keys (e.g. advanced: {{optim: {{temperature: "
                      f"0.5}}}}); got {_shown(advanced)}")
  merged = {k: v for k, v in data.items() if k != "advanced"}
  for section, keys in advanced.items():
    if section not in CORE:
      raise ConfigError(f"unknown section advanced.{_key_name(section)}; valid sections: {', '.join(CORE)}")
    if not isinstance(keys, dict):
      raise ConfigError(f"advanced.{section} must be a mapping of keys to values; got {_shown(keys)}")
    own = dict(merged.get(section) or {})
    for key, value in keys.items():
      if key in CORE[section]:
        raise ConfigError(f"advanced.{section}.{_key_name(key)}: {section}.{key} is a core key; set it under "
                          f"{section}:, not under advanced:")
      if key in own:
        raise ConfigError(f"{section}.{_key_name(key)} is set twice, in {section}: and in advanced.{section}: "
                          "keep one")
      own[key] = value
    merged[section] = own
  return merged


def to_file_dict(cfg: Config) -> dict:
  """The config as a YAML file holds it: the core keys in their sections, the others under ``advanced:``."""
  flat = to_dict(cfg)
  out = {section: {k: v for k, v in keys.items() if k in CORE[section]} for section, keys in flat.items()}
  out["advanced"] = {section: {k: v for k, v in keys.items() if k not in CORE[section]}
                     for section, keys in flat.items()}
  return out


# Checked by hand, not by pydantic (judged on 2026-12-07 by the messages a user gets): pydantic's are four
# lines with a URL (`1 validation error for Optim / strategy / Input should be 'grass', ... [type=literal_error,
# ...] / For further information visit ...`) and would need a formatter of ours to become one line; an unknown
# key's message would no longer list the section's keys; the cross-field checks in `validate` stay ours
# either way. It would replace about 50 lines (`CHOICES`, `_check_type`, `_section`) for a dependency.
CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("float32", "bfloat16"),
    "model.remat": ("full", "dots", "none"),
    "model.attention": ("auto", "einsum", "xla", "cudnn"),
    "data.template": ("alpaca",),
    "data.format": FORMATS,
    "optim.strategy": ("grass", "grass_static", "lisa", "full", "fixed"),
    "optim.probability": ("softmax", "power"),
    "optim.importance": ("grad", "sketch", "gain", "adam"),
    "optim.granularity": ("layer", "module"),
    "optim.schedule": ("cosine", "linear", "constant"),
}


def _check_type(key: str, value: Any, annotation: Any) -> Any:
  hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation  # noqa: S307
  options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
      else (hint,)
  if value is None:
    if type(None) in options:
      return None
    raise ConfigError(f"{key} must not be null")
  for t in options:
    if t is type(None):
      continue
    if t is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
      try:  # YAML 1.1 reads `1e-4` (no dot) as a string
        number = float(value)
      except ValueError:
        continue
      if not math.isfinite(number):
        raise ConfigError(f"{key} must be a finite number; got {_shown(value)}")
      return number
    if t is int and isinstance(value, int) and not isinstance(value, bool):
      return value
    if t in (str, bool, dict, list) and isinstance(value, t):
      return value
  names = " or ".join("null" if t is type(None) else t.__name__ for t in options)
  raise ConfigError(f"{key} must be {names}; got {_shown(value)} ({type(value).__name__})")


def _section(cls: type, data: dict, prefix: str) -> Any:
  if not isinstance(data, dict):
    raise ConfigError(f"{prefix} must be a mapping of keys to values; got {_shown(data)}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(_key_name(k) for k in set(data) - set(fields))
  if unknown:
    raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} "
                      f"{', '.join(prefix + '.' + k for k in unknown)}; valid keys in {prefix}: {', '.join(fields)}")
  kwargs = {k: _check_type(f"{prefix}.{k}", v, fields[k].type) for k, v in data.items()}
  return cls(**kwargs)


def _check_backward_bucket(cfg: Config) -> None:
  m, o = cfg.model, cfg.optim
  if m.backward_bucket < 0:
    raise ConfigError(f"model.backward_bucket must be >= 0 (0: off); got {m.backward_bucket}")
  if not m.backward_bucket:
    return
  if o.strategy == "full" or o.always_on:
    raise ConfigError("model.backward_bucket stops the backward pass at the lowest trained layer, so it needs "
                      "layer-wise training with the embeddings frozen: set optim.always_on: false "
                      "(and a strategy other than full), or model.backward_bucket: 0")
  if o.live_importance() and o.sketch_every == 1:
    raise ConfigError("model.backward_bucket cannot sketch layers below the bucket, and optim.sketch_every: 1 "
                      "sketches at every step: set optim.sketch_every > 1 (sketch steps run the slot scan, the "
                      "others the bucket), optim.importance: grad, or model.backward_bucket: 0")


def validate(cfg: Config) -> Config:
  """Range and cross-field checks; returns ``cfg``."""
  for key, allowed in CHOICES.items():
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    if value is not None and value not in allowed:  # null where the type allows it (checked with the type)
      raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {_shown(value)}")
  m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
  if cfg.mesh.fsdp < 1 or (cfg.mesh.data is not None and cfg.mesh.data < 1):
    raise ConfigError(f"mesh.data and mesh.fsdp must be >= 1 (mesh.data may be null: all devices); "
                      f"got data={cfg.mesh.data}, fsdp={cfg.mesh.fsdp}")
  if (m.path is None) == (m.random_init is None):
    raise ConfigError("set exactly one of model.path (a HF checkpoint) and model.random_init")
  if not d.train:
    raise ConfigError("data.train is required: a JSON/JSONL/parquet file or a hub dataset id")
  positive = {"data.max_length": d.max_length, "optim.num_active": o.num_active, "optim.period": o.period,
              "train.epochs": t.epochs, "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
              "train.log_every": t.log_every, "train.keep_checkpoints": t.keep_checkpoints}
  for key, value in positive.items():
    if value < 1:
      raise ConfigError(f"{key} must be >= 1; got {value}")
  if t.max_steps is not None and t.max_steps < 1:
    raise ConfigError(f"train.max_steps must be >= 1 or null; got {t.max_steps}")
  _check_optim_ranges(o)
  if m.loss_chunk_tokens < 0:
    raise ConfigError(f"model.loss_chunk_tokens must be >= 0 (0: the whole loss at once); "
                      f"got {m.loss_chunk_tokens}")
  if m.unroll_forward and m.remat != "full":
    raise ConfigError(f"model.unroll_forward needs model.remat: full (other policies keep the layer scan); "
                      f"got model.remat: {m.remat}. Set model.remat: full or model.unroll_forward: false")
  _check_backward_bucket(cfg)
  _check_strategy(o)
  _check_eval(cfg.eval)
  if d.buckets is not None:
    if not d.buckets or any(not isinstance(b, int) or b < 2 for b in d.buckets):
      raise ConfigError(f"data.buckets must be a list of ints >= 2; got {d.buckets}")
    if max(d.buckets) < d.max_length:
      raise ConfigError(f"the largest of data.buckets ({max(d.buckets)}) must be >= data.max_length ({d.max_length})")
  return cfg


def _check_optim_ranges(o: OptimConfig) -> None:
  if not 0 <= o.epsilon <= 1:
    raise ConfigError(f"optim.epsilon must be in [0, 1]; got {o.epsilon}")
  if o.temperature <= 0:
    raise ConfigError(f"optim.temperature must be > 0; got {o.temperature}")
  if not 0 <= o.warmup_ratio < 1:
    raise ConfigError(f"optim.warmup_ratio must be in [0, 1); got {o.warmup_ratio}")
  if o.weight_decay < 0:
    raise ConfigError(f"optim.weight_decay must be >= 0; got {o.weight_decay}")
  if o.learning_rate <= 0:
    raise ConfigError(f"optim.learning_rate must be > 0; got {o.learning_rate}")
  if o.mgn_ema is not None and not 0 <= o.mgn_ema < 1:
    raise ConfigError(f"optim.mgn_ema must be null or in [0, 1); got {o.mgn_ema}")
  if o.probe_steps is not None and (o.probe_steps < 0 or o.probe_steps % o.period):
    raise ConfigError(f"optim.probe_steps must be a multiple of optim.period ({o.period}); got {o.probe_steps}")
  if o.refresh_every is not None and o.refresh_every < 1:
    raise ConfigError(f"optim.refresh_every must be >= 1 or null (every period); got {o.refresh_every}")
  if o.sketch_size < 1:
    raise ConfigError(f"optim.sketch_size must be >= 1; got {o.sketch_size}")
  refresh = o.refresh_every or o.period
  if o.sketch_every < 1 or refresh % o.sketch_every:
    raise ConfigError(f"optim.sketch_every must be >= 1 and divide the refresh interval (optim.refresh_every, "
                      f"or optim.period when null: {refresh}), so every refresh sees a sketch; "
                      f"got {o.sketch_every}")


def _check_strategy(o: OptimConfig) -> None:
  """The cross-field rules of the strategy, its importance and where its moments live."""
  if o.strategy == "fixed":
    layers = o.fixed_layers or []
    if (len(layers) != o.num_active or len(set(layers)) != len(layers)
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
      raise ConfigError(f"optim.strategy fixed trains optim.fixed_layers: give optim.num_active={o.num_active} "
                        f"distinct layer indices >= 0, e.g. optim.fixed_layers=[12,13]; got {_shown(o.fixed_layers)}")
  elif o.fixed_layers is not None:
    raise ConfigError(f"optim.fixed_layers is for optim.strategy fixed (this run: {o.strategy}); remove it")
  if o.importance_from_gain() and (o.probing_steps() or o.period < 2 or o.refresh_every not in (None, o.period)):
    raise ConfigError("optim.importance: gain compares each period's two halves: set optim.period >= 2, "
                      "optim.probe_steps: 0 (or null) and optim.refresh_every: null")
  if o.strategy == "grass" and o.importance == "adam" and o.probing_steps():
    raise ConfigError("optim.importance: adam measures the trained layers' own updates, so it does not probe: "
                      "set optim.probe_steps: 0 (or null)")
  if o.strategy == "grass_static" and o.probing_steps() == 0:
    raise ConfigError("optim.strategy grass_static takes its importance from probing: set optim.probe_steps > 0")
  if o.reset_on_switch and o.offload_optimizer_state:
    raise ConfigError("optim.reset_on_switch keeps no moments of inactive layers, so there is nothing to offload: "
                      "set optim.offload_optimizer_state: false")
  if o.offload_optimizer_state and not (o.strategy.startswith("grass") or o.strategy == "fixed"):
    raise ConfigError("optim.offload_optimizer_state needs optim.strategy: grass (LISA resets moments and full "
                      "fine-tuning has no inactive layers)")
  if o.granularity == "module" and o.strategy != "lisa":
    raise ConfigError(f"optim.granularity: module samples modules as LISA samples layers: set optim.strategy: lisa "
                      f"(this run: {o.strategy}) or optim.granularity: layer")
  if o.stream_active_states and not o.offload_optimizer_state:
    raise ConfigError("optim.stream_active_states needs optim.offload_optimizer_state: true")


def _check_eval(e: EvalConfig) -> None:
  """Normalises ``e.tasks`` to their canonical names (in place)."""
  if e.tasks:
    from grass_jax.tasks import canonical_task
    try:
      e.tasks = [canonical_task(str(t)) for t in e.tasks]
    except ValueError as err:
      raise ConfigError(f"eval.tasks: {err}") from err
    if e.data and len(e.tasks) > 1:
      raise ConfigError("eval.data names one test set: give a single task in eval.tasks")
  if e.batch_size < 1 or (e.limit is not None and e.limit < 1):
    raise ConfigError("eval.batch_size and eval.limit must be >= 1")


def _require_mapping(data: Any, where: str) -> None:
  if not isinstance(data, dict):
    raise ConfigError(f"{where} must be a mapping with sections model, data, optim, train, eval, mesh, advanced; "
                      f"got {type(data).__name__} (see configs/tiny-demo.yaml)")


def from_dict(data: dict) -> Config:
  _require_mapping(data, "a config")
  data = _drop_removed(merge_advanced(data))
  sections = {f.name: f.type for f in dataclasses.fields(Config)}
  unknown = sorted(_key_name(k) for k in set(data) - set(sections))
  if unknown:
    raise ConfigError(f"unknown section{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                      f"valid sections: {', '.join(sections)}")
  classes = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig,
             "eval": EvalConfig, "mesh": MeshConfig}
  return validate(Config(**{k: _section(classes[k], data.get(k) or {}, k) for k in classes}))


def _yaml_where(e: Exception) -> str:
  mark = getattr(e, "problem_mark", None)
  return f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""


def _yaml_problem(e: Exception) -> str:
  """The parser's reason on one line (its own message quotes the text around the error over several)."""
  problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
  return " ".join(str(problem).split())


def load(path: str | Path, overrides: list[str] = ()) -> Config:
  """Reads a YAML config and applies ``section.key=value`` overrides."""
  path = Path(path)
  if not path.exists():
    raise ConfigError(f"config file {path} does not exist (see configs/ for examples)")
  try:
    data = yaml.safe_load(path.read_text()) or {}
  except (yaml.YAMLError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path}{_yaml_where(e)} is not valid YAML: {_yaml_problem(e)}") from e
  _require_mapping(data, str(path))  # before the overrides are merged into it
  return from_dict(_merge_overrides(merge_advanced(data), overrides))


def _merge_overrides(data: dict, overrides: list[str]) -> dict:
  data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {_shown(item)} must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2:
      raise ConfigError(f"override key {_shown(key)} must be section.key (e.g. optim.num_active)")
    section, name = parts
    try:
      value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
      raise ConfigError(f"override {_shown(item)}: cannot parse value: {_yaml_problem(e)}") from e
    data.setdefault(section, {})
    if not isinstance(data[section], dict):
      data[section] = {}
    data[section][name] = value
  return data


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
  return from_dict(_merge_overrides(to_dict(cfg), overrides))


def to_dict(cfg: Config) -> dict:
  return dataclasses.asdict(cfg)
