"""The jitted train step: gradients only for the active layers ("slots").

The step differentiates with respect to the always-on leaves and a
``[gamma, ...]`` copy of the active layers' weights. Inside the scanned,
rematerialised block each layer ``l`` uses its slot's weights when it is
active and the frozen stack otherwise (``jnp.where`` on a dynamic slot index),
so switching layers never recompiles, gradients come out in the GRASS
transform's slot form, and the frozen layers' weight gradients are never
stored: gradient memory scales with gamma, not with L (DESIGN.md).

Example::

  step = make_train_step(config, tx, grad_accum=2)
  params, opt_state, metrics = step(params, opt_state, batch)
  # batch: tokens / attention_mask / loss_mask, each [grad_accum, B, T]
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from tqdm.auto import tqdm

from grass_jax import data as data_lib
from grass_jax import sharding as sharding_lib
from grass_jax.checkpoints import Checkpointer
from grass_jax.config import Config, ModelConfig, OptimConfig, to_dict
from grass_jax.evaluate import evaluate, load_task_records, write_results
from grass_jax.metrics import MetricsWriter, plot_probability_heatmap
from grass_jax.models import LAYERS, config_from_hf, init_params
from grass_jax.models.decoder import DecoderConfig, Params, forward
from grass_jax.offload import Offloader, host_slot_states, state_stream
from grass_jax.pretrained import load_pretrained, save_pretrained
from grass_jax.transform import apply_slot_updates, diagnostics, find_state, strategy

Batch = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Next-token loss summed over ``loss_mask[:, 1:]`` positions; returns ``(sum, count)``."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets = tokens[:, 1:]
  mask = loss_mask[:, 1:].astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum((logz - picked) * mask), jnp.sum(mask)


FROZEN_GRADS = ("cond", "select")


def slot_loss(trainable: Params, frozen_layers: dict[str, jax.Array], active: jax.Array, config: DecoderConfig,
              batch: Batch, *, dtype: Any, remat: str, frozen_grads: str = "cond",
              attention: str = "auto", act_sharding: Any = None) -> tuple[jax.Array, jax.Array]:
  """Summed loss of a micro-batch as a function of the trainable slot tree.

  Args:
    trainable: params whose ``layers`` leaves are ``[gamma, ...]`` (the active
      layers, in the order of ``active``); other leaves are the always-on group.
    frozen_layers: the full ``[L, ...]`` layer stack (no gradient flows to it).
    active: int32 ``[gamma]`` layer index of each slot.
    frozen_grads: how frozen layers avoid weight gradients. 'cond': the layer
      scan has a hand-written backward pass (``forward(slots=...)``): frozen
      layers compute input gradients only, active layers both (``remat``
      applies to what frozen layers keep). The active layers' weights are read
      from ``frozen_layers``; the values of ``trainable['layers']`` are not
      read (only their shapes).
      'select': every block picks its weights with ``jnp.where`` (one code
      path, but dW is computed for every layer and then discarded).
  """
  if frozen_grads not in FROZEN_GRADS:
    raise ValueError(f"frozen_grads must be one of {FROZEN_GRADS}; got {frozen_grads!r}")
  num_layers = config.num_layers
  gamma = active.shape[0]
  frozen_layers = jax.lax.stop_gradient(frozen_layers)
  slots = None
  if gamma == num_layers:  # all layers train: the slots are the stack itself (active == arange)
    params, override = trainable, None
  elif frozen_grads == "cond":
    slot_of = jnp.full((num_layers,), -1, jnp.int32).at[active].set(jnp.arange(gamma, dtype=jnp.int32))
    params, override, slots = {**trainable, "layers": frozen_layers}, None, (trainable["layers"], slot_of)
  else:
    slot_of = jnp.full((num_layers,), -1, jnp.int32).at[active].set(jnp.arange(gamma, dtype=jnp.int32))

    def override(lp: Params, idx: jax.Array) -> Params:
      slot = slot_of[idx]
      pick = jnp.maximum(slot, 0)
      return {k: jnp.where(slot >= 0, trainable["layers"][k][pick].astype(v.dtype), v) for k, v in lp.items()}

    params = {**trainable, "layers": frozen_layers}
  logits, _ = forward(params, config, batch["tokens"], batch["attention_mask"], dtype=dtype, remat=remat,
                      layer_override=override, slots=slots, attention=attention, act_sharding=act_sharding)
  return cross_entropy(logits, batch["tokens"], batch["loss_mask"])


def make_train_step(config: DecoderConfig, tx: optax.GradientTransformation, *, dtype: Any = jnp.bfloat16,
                    remat: str = "full", frozen_grads: str = "cond", attention: str = "auto",
                    donate: bool = True, shardings: tuple[Any, Any, Any] | None = None,
                    stream_states: bool = False) -> Callable:
  """Builds ``step(params, opt_state, batch) -> (params, opt_state, metrics)``, jitted.

  ``batch`` arrays have a leading gradient-accumulation axis ``[A, B, T]``;
  micro-batch gradients are summed in a ``lax.scan`` and divided by the number
  of loss tokens. A step whose gradients are not finite changes no parameter
  and no moment (the GRASS transform skips it) and ``metrics['skipped']`` is 1.
  ``tx`` must contain one GRASS transform (any strategy), with any clipping
  or scaling before or after it in an ``optax.chain``.

  ``shardings``: ``(params, opt_state, batch)`` shardings on a mesh
  (:mod:`grass_jax.sharding`); params and state keep theirs across steps, so
  the step compiles once. Without it the step runs where its inputs are.

  ``stream_states``: the active layers' optimizer states are in host memory
  (``shardings`` from :func:`grass_jax.offload.host_slot_states`); each is
  copied to the device for its update, one layer at a time, and back.
  """
  stream_sh = None
  if stream_states:
    if shardings is None:
      raise ValueError("stream_states needs shardings: see grass_jax.offload.host_slot_states")
    stream_sh = find_state(shardings[1]).slot_states[0]
  act_sharding = None
  if shardings is not None and shardings[2].mesh.size > 1:
    act_sharding = sharding_lib.activation_sharding(shardings[2].mesh)

  def step(params: Params, opt_state: Any, batch: Batch) -> tuple[Params, Any, dict[str, jax.Array]]:
    active = find_state(opt_state).active
    all_layers = active.shape[0] == config.num_layers  # full fine-tuning: no slot copies
    trainable = params if all_layers else {**params, "layers": {k: v[active] for k, v in params["layers"].items()}}
    # 'cond' reads the active layers from the frozen stack and never the slot values, so the gradient
    # is taken at zeros: the gathered `trainable` then feeds only the elementwise optimizer update.
    slot_handles = not all_layers and frozen_grads == "cond"
    wrt = ({**params, "layers": {k: jnp.zeros_like(v) for k, v in trainable["layers"].items()}}
           if slot_handles else trainable)
    grad_fn = jax.value_and_grad(
        lambda tr, frozen, act, mb: slot_loss(tr, frozen, act, config, mb, dtype=dtype, remat=remat,
                                              frozen_grads=frozen_grads, attention=attention,
                                              act_sharding=act_sharding), has_aux=True)

    def micro(acc, mb):
      (loss_sum, count), g = grad_fn(wrt, params["layers"], active, mb)
      acc_g, acc_l, acc_n = acc
      return (jax.tree.map(jnp.add, acc_g, g), acc_l + loss_sum, acc_n + count), None

    if batch["tokens"].shape[0] == 1:
      # No accumulation: skip the float32 accumulators (a copy of the trained parameters' size).
      (loss_sum, count), grads = grad_fn(wrt, params["layers"], active, jax.tree.map(lambda x: x[0], batch))
    else:
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
      (grads, loss_sum, count), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), batch)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, trainable)
    loss = loss_sum / denom
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # The GRASS transform itself skips non-finite steps (zero updates, moments kept).
    extra = {} if stream_sh is None else {"state_stream": state_stream(stream_sh)}
    updates, new_opt_state = tx.update(grads, opt_state, trainable, **extra)
    if all_layers:
      new_params = optax.apply_updates(params, updates)
    else:
      new_params = apply_slot_updates(params, updates, active, LAYERS)
    metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count, "skipped": (~ok).astype(jnp.int32)}
    return new_params, new_opt_state, metrics

  donate_argnums = (0, 1) if donate else ()
  if shardings is None:
    return jax.jit(step, donate_argnums=donate_argnums)
  p_sh, s_sh, b_sh = shardings
  metrics_sh = jax.sharding.NamedSharding(b_sh.mesh, jax.sharding.PartitionSpec())
  return jax.jit(step, donate_argnums=donate_argnums, in_shardings=(p_sh, s_sh, b_sh),
                 out_shardings=(p_sh, s_sh, metrics_sh))


# ---------------------------------------------------------------------------------------------
# The training loop behind scripts/train.py.


def build_optimizer(o: OptimConfig, num_layers: int, total_steps: int,
                    seed: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """``clip -> GRASS/LISA/full(adamw(1.0)) -> scale_by_schedule``: a global LR schedule, per-layer moments."""
  warmup = int(o.warmup_ratio * total_steps)
  decay_steps = max(total_steps - warmup, 1)
  if o.schedule == "cosine":
    after = optax.cosine_decay_schedule(o.learning_rate, decay_steps)
  elif o.schedule == "linear":
    after = optax.linear_schedule(o.learning_rate, 0.0, decay_steps)
  else:
    after = optax.constant_schedule(o.learning_rate)
  schedule = optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, warmup), after], [warmup]) \
      if warmup else after
  inner = optax.adamw(1.0, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  grass = strategy(o.strategy, inner, layers=LAYERS, num_active=None if o.strategy == "full" else min(
      o.num_active, num_layers), period=o.period, temperature=o.temperature, epsilon=o.epsilon,
                   importance_decay=o.importance_decay, seed=seed, always_on=o.always_on,
                   offload=o.offload_optimizer_state)
  parts = [optax.clip_by_global_norm(o.max_grad_norm)] if o.max_grad_norm > 0 else []
  return optax.chain(*parts, grass, optax.scale_by_schedule(schedule)), schedule


def _dtype(name: str) -> Any:
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def load_model(m: ModelConfig, seed: int) -> tuple[Params, DecoderConfig]:
  if m.random_init is not None:
    cfg = config_from_hf(dict(m.random_init))
    return init_params(cfg, jax.random.PRNGKey(seed), _dtype(m.dtype)), cfg
  return load_pretrained(m.path, dtype=_dtype(m.dtype))


def run(cfg: Config, *, resume: bool = False, progress: bool = True, stop_at: int | None = None,
        return_state: bool = False) -> dict[str, Any]:
  """Fine-tunes as ``cfg`` says; returns a summary. See README 'Training' for the outputs.

  Args:
    resume: continue from the latest checkpoint in ``train.output_dir``.
    progress: show a progress bar.
    stop_at: stop (with a checkpoint) after this step, as if interrupted; the
      schedule still spans the whole run, so ``resume`` continues it exactly.
    return_state: add the final ``params`` and ``opt_state`` to the summary.
  """
  if cfg.mesh.distributed:
    sharding_lib.initialize_distributed()
  mesh = sharding_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
  sharding_lib.check_batch_size(cfg.train.batch_size, mesh)  # before loading the model
  out = Path(cfg.train.output_dir)
  ckpt_dir = out / "checkpoints"
  if not resume and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
    raise FileExistsError(f"{ckpt_dir} already holds checkpoints: pass --resume to continue that run, or set "
                          "train.output_dir to a new directory")
  out.mkdir(parents=True, exist_ok=True)
  (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

  params, mcfg = load_model(cfg.model, cfg.train.seed)
  tokenizer = data_lib.load_tokenizer(cfg.model.tokenizer, cfg.model.path)
  records = data_lib.load_records(cfg.data.train, cfg.data.split)
  dataset = data_lib.build_dataset(records, tokenizer, max_length=cfg.data.max_length,
                                   batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum,
                                   buckets=cfg.data.buckets, seed=cfg.data.shuffle_seed)
  steps_per_epoch = len(dataset)
  total = steps_per_epoch * cfg.train.epochs
  if cfg.train.max_steps is not None:
    total = min(total, cfg.train.max_steps)
  tx, schedule = build_optimizer(cfg.optim, mcfg.num_layers, total, cfg.train.seed)
  device = jax.local_devices()[0]
  opt_state = tx.init(params)
  # Placed once on the mesh; the step keeps these shardings, so it compiles once.
  p_sh, s_sh, b_sh = (sharding_lib.tree_shardings(params, mesh), sharding_lib.tree_shardings(opt_state, mesh),
                      sharding_lib.batch_sharding(mesh))
  params, opt_state = jax.device_put((params, opt_state), (p_sh, s_sh))
  offload = cfg.optim.offload_optimizer_state
  stream = cfg.optim.stream_active_states
  if stream:
    opt_state, s_sh = host_slot_states(opt_state, s_sh)
  offloader = None
  ckpt = Checkpointer(ckpt_dir, cfg.train.keep_checkpoints)

  def layer_states_tree():
    return None if offloader is None else offloader.checkpoint_tree(opt_state)

  step, start_epoch, start_batch, skipped, history = 0, 0, 0, 0, []
  if resume and ckpt.latest_step() is not None:
    step = ckpt.latest_step()
    target = Offloader.checkpoint_target(opt_state) if offload else None
    params, opt_state, layer_states, meta = ckpt.restore(step, params=params, opt_state=opt_state,
                                                         layer_states=target)
    start_epoch, start_batch, skipped = meta["epoch"], meta["batch"], meta["skipped"]
    history = [(s, np.asarray(p)) for s, p in meta["probability_history"]]
    if offload:
      offloader = Offloader.restore(opt_state, layer_states, period=cfg.optim.period, stream=stream)
  elif offload:
    offloader = Offloader(opt_state, period=cfg.optim.period, stream=stream)

  train_step = make_train_step(mcfg, tx, dtype=_dtype(cfg.model.compute_dtype), remat=cfg.model.remat,
                               frozen_grads=cfg.optim.frozen_grads, attention=cfg.model.attention,
                               shardings=(p_sh, s_sh, b_sh), stream_states=stream)
  # With several hosts, process 0 writes the files; every process takes part in checkpoints.
  main_process = jax.process_index() == 0
  writer = MetricsWriter(out, resume_step=step if resume else None) if main_process else None
  diag_kw = dict(temperature=cfg.optim.temperature, epsilon=cfg.optim.epsilon)

  eval_sets = {t: load_task_records(t, cfg.eval.data, cfg.eval.limit) for t in cfg.eval.tasks}

  def save(epoch: int, batch: int) -> None:
    ckpt.save(step, params=params, opt_state=opt_state, layer_states=layer_states_tree(),
              meta={"epoch": epoch, "batch": batch, "skipped": skipped,
                    "probability_history": [(s, p.tolist()) for s, p in history]})
    if main_process:
      plot_probability_heatmap(history, out / "layer_probabilities.png")
    accuracies = {}
    for task, records in eval_sets.items():
      summary, rows = evaluate(params, mcfg, tokenizer, task, records, batch_size=cfg.eval.batch_size,
                               max_new_tokens=cfg.eval.max_new_tokens, dtype=_dtype(cfg.model.compute_dtype))
      if main_process:
        write_results(out / "eval" / f"step_{step}", summary, rows)
      accuracies[f"eval/{task}_accuracy"] = summary["accuracy"]
    if accuracies and writer is not None:
      writer.write(step, accuracies)
      last.update(accuracies)

  bar = tqdm(total=total, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
  window_tokens, window_start = 0.0, time.perf_counter()
  pending = []
  epoch, next_batch = start_epoch, start_batch
  last = {}
  for epoch, batch_idx, batch in dataset.iterate(start_epoch, start_batch, cfg.train.epochs):
    if step >= total or (stop_at is not None and step >= stop_at):
      next_batch = batch_idx  # fetched, not consumed: resume starts with it
      break
    next_batch = batch_idx + 1
    params, opt_state, m = train_step(params, opt_state, sharding_lib.shard_batch(batch, b_sh))
    if offloader is not None:
      opt_state = offloader.after_step(opt_state)
    step += 1
    pending.append(m)
    bar.update(1)
    if step % cfg.train.log_every == 0 or step == total:
      ms = jax.device_get(pending)  # the only host sync: once per log interval
      pending = []
      window_tokens += sum(float(x["tokens"]) for x in ms)
      n_skipped = sum(int(x["skipped"]) for x in ms)
      skipped += n_skipped
      if n_skipped == len(ms) and len(ms) >= 3:
        raise FloatingPointError(f"gradients were NaN/inf in all of the last {len(ms)} steps (step {step}); "
                                 "lower optim.learning_rate, use model.dtype: float32, or check the data")
      dt = time.perf_counter() - window_start
      d = diagnostics(opt_state, **diag_kw)
      history.append((step, d["current_probabilities"]))
      stats = device.memory_stats() or {}
      last = {"loss": float(ms[-1]["loss"]), "mean_loss": float(np.mean([float(x["loss"]) for x in ms])),
              "lr": float(schedule(step - 1)), "grad_norm": float(ms[-1]["grad_norm"]),
              "tokens_per_s": window_tokens / dt if dt > 0 else 0.0, "skipped_steps": skipped,
              "peak_memory_bytes": stats.get("peak_bytes_in_use"), "epoch": epoch,
              "active_layers": d["active"], "importance": d["importance"], "probabilities": d["current_probabilities"]}
      if writer is not None:
        writer.write(step, last)
      bar.set_postfix(loss=f"{last['mean_loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}",
                      active=",".join(map(str, d["active"])))
      window_tokens, window_start = 0.0, time.perf_counter()
    if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < total:
      save(epoch, next_batch)
  bar.close()
  if ckpt.latest_step() != step:
    save(epoch, next_batch)
  ckpt.close()
  if writer is not None:
    writer.close()
  summary = {"steps": step, "final_loss": last.get("mean_loss"), "skipped_steps": skipped,
             "output_dir": str(out), "heatmap": str(out / "layer_probabilities.png"),
             **{k: v for k, v in last.items() if k.startswith("eval/")}}
  if cfg.train.export:
    export = out / "hf_model"
    if jax.process_count() > 1:  # arrays span hosts: gather, then one process writes
      from jax.experimental import multihost_utils
      params = multihost_utils.process_allgather(params, tiled=True)
    if main_process:
      save_pretrained(params, mcfg, export)
    if hasattr(tokenizer, "save_pretrained"):
      tokenizer.save_pretrained(export)
    summary["hf_model"] = str(export)
  if main_process:
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
  if return_state:
    summary.update(params=params, opt_state=opt_state,
                   layer_states=None if offloader is None else offloader.full_bank(opt_state))
  return summary
