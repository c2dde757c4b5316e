"""The training loop behind ``scripts/train.py``: a :class:`Trainer` with named phases.

A run is set-up (model, data, optimizer, placement on the mesh), an optional
restore, the step loop, and export. The loop's recurring phases are methods of
their own: :meth:`Trainer.train_step` (one optimizer step, probing included),
:meth:`Trainer.log` (metrics once per ``log_every`` steps: the only host
sync), :meth:`Trainer.checkpoint` and :meth:`Trainer.evaluate`. Everything
the phases share lives in one :class:`RunState`.

Example::

  summary = run(config.load("configs/tiny-demo.yaml"))
  # or, phase by phase:
  trainer = Trainer(cfg, resume=False)
  trainer.train()
  summary = trainer.finish()
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from tqdm.auto import tqdm

from grass_jax import chat
from grass_jax import data as data_lib
from grass_jax import sharding as sharding_lib
from grass_jax import xla_flags
from grass_jax.ahead_of_time import CompiledStep
from grass_jax.assembly import assemble, build_optimizer, check_layers_fit, dtype_of, measure_mode, model_config
from grass_jax.checkpoints import Checkpointer
from grass_jax.compile_cache import use_compilation_cache
from grass_jax.config import (Config, ConfigError, ModelConfig, granularity_used, merge_advanced, to_dict,
                               to_file_dict)
from grass_jax.evaluate import EvalOptions, evaluate, load_task_records, write_results
from grass_jax.metrics import MetricsWriter, plot_probability_heatmap
from grass_jax.models import LAYERS, init_params
from grass_jax.models.decoder import DecoderConfig, Params
from grass_jax.offload import Offloader
from grass_jax.pretrained import CheckpointError, load_pretrained, save_pretrained
from grass_jax.train_step import StepOptions, cross_entropy, make_train_step, slot_loss
from grass_jax.module_sampling import ATTENTION_MLP, MODULE_NAMES, slot_modules
from grass_jax.transform import diagnostics

__all__ = ["LAYERS", "RunState", "StepOptions", "Trainer", "build_optimizer", "cross_entropy", "load_model", "make_train_step",
           "measure_mode", "run", "slot_loss"]


def load_model(m: ModelConfig, seed: int) -> tuple[Params, DecoderConfig]:
  if m.random_init is not None:
    cfg = model_config(m)
    return init_params(cfg, jax.random.PRNGKey(seed), dtype_of(m.dtype)), cfg
  return load_pretrained(m.path, dtype=dtype_of(m.dtype))


# What the learning-rate schedule and the layer sequence of a run are a function of.
SCHEDULE_KEYS = ("train.max_steps", "train.epochs", "train.batch_size", "train.grad_accum", "train.seed",
                 "optim.strategy", "optim.learning_rate", "optim.schedule", "optim.warmup_ratio", "optim.period",
                 "optim.probe_steps", "optim.importance", "optim.sketch_every", "optim.num_active",
                 "optim.fixed_layers", "data.train", "data.shuffle_seed")


def check_same_schedule(cfg: Config, saved: Path) -> None:
  """Refuses a resume whose schedule keys differ from the run's saved ``config.yaml`` (never a silent jump)."""
  if not saved.exists():
    return
  old, new = merge_advanced(yaml.safe_load(saved.read_text()) or {}), to_dict(cfg)  # files of either layout
  for key in SCHEDULE_KEYS + ("optim.granularity",):
    section, name = key.split(".")
    was, now = (old.get(section) or {}).get(name), new[section][name]
    if key == "optim.granularity":  # compared as the runs used it: null is the strategy's own
      was, now = _granularity_used(old.get("optim") or {}), _granularity_used(new["optim"])
    if was != now:
      raise ConfigError(f"--resume with {key}={now!r}, but the run in {saved.parent} was started with {was!r}: "
                        "the schedule and the layer sequence span the whole run. Set it back, or start a new run "
                        "in another train.output_dir")


def _active_label(layers: list[int], modules: list[str] | None) -> str:
  """The progress bar's active layers: ``3,17``; by modules each with its block's initial (``3a,17m``)."""
  if modules is None:
    return ",".join(map(str, layers))
  return ",".join(f"{l}{m[0]}" for l, m in zip(layers, modules))


def _granularity_used(optim: dict) -> str:
  """The granularity a run's optim section trains by; a file from before the key (2026-12-07) trained layers."""
  if "granularity" not in optim:
    return "layer"
  return granularity_used(optim.get("strategy", "lisa"), optim["granularity"])


@dataclasses.dataclass
class RunState:
  """What the phases of a run share.

  Attributes:
    step: optimizer steps done (probing included).
    params, opt_state: the model and optimizer state (on the mesh).
    offloader: host-resident layer states, or None.
    epoch, next_batch: where the data iterator resumes.
    skipped: steps skipped for non-finite gradients.
    history: ``(step, probabilities)`` for the heatmap.
    pending: device metrics of the steps since the last log.
    last: the latest logged metrics.
    window_tokens, window_start: throughput of the current log window.
  """
  step: int
  params: Params
  opt_state: Any
  offloader: Offloader | None = None
  epoch: int = 0
  next_batch: int = 0
  skipped: int = 0
  history: list = dataclasses.field(default_factory=list)
  pending: list = dataclasses.field(default_factory=list)
  last: dict = dataclasses.field(default_factory=dict)
  window_tokens: float = 0.0
  window_start: float = dataclasses.field(default_factory=time.perf_counter)


def _note_missing_flags() -> None:
  """On a GPU, one line when this process started without the recommended XLA flags (a program of the user's
  own that did not call grass_jax.use_recommended_flags(); scripts/train.py sets them)."""
  missing = xla_flags.missing_recommended_flags()
  if missing and jax.default_backend() == "gpu":
    print(f"note: XLA_FLAGS lacks {' '.join(missing)}, so steps run slower (docs/performance.md); call "
          "grass_jax.use_recommended_flags() before the first jax computation, or run scripts/train.py",
          file=sys.stderr)


class Trainer:
  """Fine-tunes as a :class:`~grass_jax.config.Config` says (README 'Training' lists the outputs)."""

  def __init__(self, cfg: Config, *, resume: bool = False, progress: bool = True):
    self.cfg = cfg
    self.progress = progress
    self.out = Path(cfg.train.output_dir)
    self.mesh = self._prepare_run(resume)
    try:
      self._set_up(resume)
    except BaseException:
      self.close()  # the checkpointer's threads; nothing else is open yet
      raise

  def _set_up(self, resume: bool) -> None:
    cfg = self.cfg
    if cfg.train.compilation_cache:
      use_compilation_cache(self.out / "compilation_cache")
    self.mcfg = model_config(cfg.model)
    check_layers_fit(cfg.optim, self.mcfg)  # before the data is read
    self.tokenizer = data_lib.load_tokenizer(cfg.model.tokenizer, cfg.model.path)
    self.dataset = self._load_data()
    self.total = len(self.dataset) * cfg.train.epochs
    if cfg.train.max_steps is not None:
      self.total = min(self.total, cfg.train.max_steps)
    self.parts = assemble(cfg, total_steps=self.total, mesh=self.mesh, model=self.mcfg)
    _note_missing_flags()
    self.train_step_fn = self._compile_step()  # before the weights are on the device
    self.state = self._place_and_restore(resume)
    # With several hosts, process 0 writes the files; every process takes part in checkpoints.
    self.main_process = jax.process_index() == 0
    self.writer = MetricsWriter(self.out, resume_step=self.state.step if resume else None) \
        if self.main_process else None
    self.eval_sets = {t: load_task_records(t, cfg.eval.data, cfg.eval.limit) for t in cfg.eval.tasks}

  # -- set-up and restore ------------------------------------------------------------------------

  def _prepare_run(self, resume: bool) -> Any:
    cfg = self.cfg
    if cfg.mesh.distributed:
      sharding_lib.initialize_distributed()
    mesh = sharding_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    sharding_lib.check_batch_size(cfg.train.batch_size, mesh)  # before loading the model
    ckpt_dir = self.out / "checkpoints"
    if self.out.exists() and not self.out.is_dir():
      raise FileExistsError(f"train.output_dir {self.out} is a file: set train.output_dir to a directory")
    held = [p.name for p in (ckpt_dir, self.out / "metrics.jsonl")
            if p.exists() and (p.is_file() or any(p.iterdir()))]
    if not resume and held:
      raise FileExistsError(f"{self.out} holds a run ({', '.join(held)}): pass --resume to continue it, or set "
                            "train.output_dir to a new directory")
    if resume:
      if "checkpoints" not in held:
        raise CheckpointError(f"--resume: {ckpt_dir} holds no checkpoint (nothing to resume); run without --resume")
      check_same_schedule(cfg, self.out / "config.yaml")
    self.out.mkdir(parents=True, exist_ok=True)
    (self.out / "config.yaml").write_text(yaml.safe_dump(to_file_dict(cfg), sort_keys=False))
    self.ckpt = Checkpointer(ckpt_dir, cfg.train.keep_checkpoints)
    return mesh

  @property
  def prompt_format(self) -> str:
    """How evaluation asks a test record: in the form the model trained on (:class:`EvalOptions`)."""
    return self.eval_options.prompt_format

  def _load_data(self) -> data_lib.Dataset:
    cfg = self.cfg
    records = data_lib.load_records(cfg.data.train, cfg.data.split)
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    if per_step > len(records):
      print(f"warning: a step takes train.batch_size x train.grad_accum = {per_step} sequences, more than the "
            f"{len(records)} training examples: the rest of each batch is padding; lower train.batch_size",
            file=sys.stderr)
    fmt = chat.detect_format(records, cfg.data.train) if cfg.data.format == "auto" else cfg.data.format
    if data_lib.record_format(records[0]) != fmt:
      raise data_lib.DataError(f"{cfg.data.train}: data.format is {fmt}, but record 0 is "
                               f"{data_lib.record_format(records[0])}; set data.format: auto")
    # evaluation asks in the form the model was trained on
    self.eval_options = EvalOptions(
        batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
        dtype=dtype_of(cfg.model.compute_dtype), prompt_format={"alpaca": "alpaca", "messages": "chat"}.get(
            fmt, "chat" if isinstance(records[0].get("prompt"), list) else "plain"))
    if self.prompt_format == "chat":
      chat.require_chat_template(self.tokenizer, cfg.data.train)
    tok, n = self.tokenizer, cfg.data.max_length
    try:
      batching = data_lib.Batching(batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum,
                                   buckets=tuple(cfg.data.buckets or ()), seed=cfg.data.shuffle_seed,
                                   packing=cfg.data.packing)
      return data_lib.build_dataset(records, tok, batching, max_length=n, encode=lambda i, r: chat.encode_record(
          r, fmt, tok, n, f"{cfg.data.train}: record {i}"))
    except data_lib.DataError as e:  # a message about the whole set names the file too
      if str(cfg.data.train) in str(e):
        raise
      raise data_lib.DataError(f"{cfg.data.train}: {e}") from e

  def _compile_step(self) -> CompiledStep:
    """The train step, compiled for every batch length of the run (and every backward bucket) before the
    weights are on the device (:meth:`grass_jax.assembly.Assembly.compile_ahead`)."""
    parts = self.parts
    batches = [self.dataset.make_batch(length, []) for length in self._batch_lengths()]
    total = len(batches) * parts.scan_runs + (parts.backward_buckets is not None)
    with tqdm(total=total, desc="compiling the train step", disable=not self.progress, dynamic_ncols=True) as bar:
      parts.compile_ahead(batches, on_compiled=lambda: bar.update(1))
    return parts.step

  def _batch_lengths(self) -> list[int]:
    """The bucket lengths of the run's first ``total`` batches (on resume, a superset of those left)."""
    lengths: set[int] = set()
    seen = 0
    for epoch in range(self.cfg.train.epochs):
      for length, _ in self.dataset.epoch_plan(epoch):
        if seen == self.total or len(lengths) == len(self.dataset.buckets):
          return sorted(lengths)
        lengths.add(length)
        seen += 1
    return sorted(lengths)

  def _place_and_restore(self, resume: bool) -> RunState:
    """Loads the model and places params and state on the mesh with the step's shardings (so it compiles once)."""
    o = self.cfg.optim
    params, _ = load_model(self.cfg.model, self.cfg.train.seed)
    params = self.parts.place(params)
    opt_state = self.parts.init_state(params)
    target = Offloader.checkpoint_target(opt_state) if (resume and o.offload_optimizer_state) else None
    restored = self.ckpt.restore_newest_readable(
        params=params, opt_state=opt_state, layer_states=target,
        warn=lambda msg: print(f"warning: {msg}", file=sys.stderr)) if resume else None
    if restored is None:
      return RunState(step=0, params=params, opt_state=opt_state, offloader=self.parts.offloader(opt_state))
    step, params, opt_state, layer_states, meta = restored
    offloader = self.parts.offloader(opt_state, layer_states)
    return RunState(step=step, params=params, opt_state=opt_state, offloader=offloader, epoch=meta["epoch"],
                    next_batch=meta["batch"], skipped=meta["skipped"],
                    history=[(s, np.asarray(p)) for s, p in meta["probability_history"]])

  # -- the step loop -----------------------------------------------------------------------------

  def train(self, *, stop_at: int | None = None) -> None:
    """Runs steps until the end of the schedule (or ``stop_at``, as if interrupted), checkpointing and logging.

    SIGINT (Ctrl-C) and SIGTERM (a preempted job) end the run after the step in flight: its metrics are
    logged, a checkpoint of that step is saved (no evaluation), and :class:`Interrupted` says what to run
    to continue. A second Ctrl-C stops at once, saving nothing.
    """
    s, t = self.state, self.cfg.train
    bar = tqdm(total=self.total, initial=s.step, disable=not self.progress, unit="step", dynamic_ncols=True)
    s.window_start = time.perf_counter()
    with StopSignals() as signals:
      for epoch, batch_idx, batch in self.dataset.iterate(s.epoch, s.next_batch, t.epochs):
        if s.step >= self.total or (stop_at is not None and s.step >= stop_at) or signals.received:
          s.next_batch = batch_idx  # fetched, not consumed: resume starts with it
          break
        s.epoch, s.next_batch = epoch, batch_idx + 1
        self.train_step(batch)
        bar.update(1)
        if s.step % t.log_every == 0 or s.step == self.total:
          self.log(bar)
        if t.checkpoint_every and s.step % t.checkpoint_every == 0 and s.step < self.total:
          self.checkpoint()
      bar.close()
      if signals.received:
        if s.pending:
          self.log()
        if self.ckpt.latest_step() != s.step:
          self.checkpoint(evaluate=False)
        self.ckpt.wait()
        raise Interrupted(signals.received, s.step, self.ckpt.directory)
    if self.ckpt.latest_step() != s.step:
      self.checkpoint()

  def train_step(self, batch: dict[str, np.ndarray]) -> None:
    """One optimizer step (or probing step), dispatched asynchronously; the offloader swaps after it."""
    s = self.state
    buckets = self.parts.backward_buckets
    start = None if buckets is None else buckets.start(s.step, s.opt_state, s.offloader)
    s.params, s.opt_state, m = self.train_step_fn(s.params, s.opt_state,
                                                  sharding_lib.shard_batch(batch, self.parts.shardings[2]),
                                                  backward_start=start)
    if s.offloader is not None:
      s.opt_state = s.offloader.after_step(s.opt_state)
    s.step += 1
    s.pending.append(m)

  # -- logging, checkpointing, evaluation --------------------------------------------------------

  def diagnostics(self) -> dict[str, np.ndarray]:
    o = self.cfg.optim
    rule = "gain" if o.importance_from_gain() else o.probability
    return diagnostics(self.state.opt_state, probability=rule, temperature=o.temperature,
                       epsilon=o.epsilon, uniform=o.strategy == "lisa", fixed=o.strategy == "fixed")

  def log(self, bar: Any = None) -> None:
    """Reads the pending step metrics (the only host sync, once per log interval) and writes one line."""
    s = self.state
    ms = jax.device_get(s.pending)
    s.pending = []
    s.window_tokens += sum(float(x["tokens"]) for x in ms)
    n_skipped = sum(int(x["skipped"]) for x in ms)
    s.skipped += n_skipped
    if n_skipped == len(ms) and len(ms) >= 3:
      raise FloatingPointError(f"gradients were NaN/inf in all of the last {len(ms)} steps (step {s.step}); "
                               "lower optim.learning_rate, use model.dtype: float32, or check the data")
    dt = time.perf_counter() - s.window_start
    d = self.diagnostics()
    s.history.append((s.step, d["current_probabilities"]))
    stats = jax.local_devices()[0].memory_stats() or {}
    probing = bool(int(ms[-1]["probing"]))
    s.last = {"loss": float(ms[-1]["loss"]), "mean_loss": float(np.mean([float(x["loss"]) for x in ms])),
              "lr": float(self.parts.schedule(s.step - 1)), "grad_norm": float(ms[-1]["grad_norm"]),
              "tokens_per_s": s.window_tokens / dt if dt > 0 else 0.0, "skipped_steps": s.skipped,
              "peak_memory_bytes": stats.get("peak_bytes_in_use"), "epoch": s.epoch, "probing": probing,
              "active_layers": d["active"], "importance": d["importance"],
              "probabilities": d["current_probabilities"]}
    if self.cfg.optim.module_granularity():  # the module each of active_layers trains
      s.last["active_modules"] = [MODULE_NAMES[m] for m in slot_modules(ATTENTION_MLP, len(d["active"]))]
    if self.writer is not None:
      self.writer.write(s.step, s.last)
    if bar is not None:
      bar.set_postfix(loss=f"{s.last['mean_loss']:.4f}", tok_s=f"{s.last['tokens_per_s']:.0f}",
                      active="probing" if probing else _active_label(d["active"], s.last.get("active_modules")))
    s.window_tokens, s.window_start = 0.0, time.perf_counter()

  def checkpoint(self, *, evaluate: bool = True) -> None:
    """Saves a checkpoint, redraws the heatmap and evaluates the configured tasks (unless ``evaluate`` is False)."""
    s = self.state
    layer_states = None if s.offloader is None else s.offloader.checkpoint_tree(s.opt_state)
    self.ckpt.save(s.step, params=s.params, opt_state=s.opt_state, layer_states=layer_states,
                   meta={"epoch": s.epoch, "batch": s.next_batch, "skipped": s.skipped,
                         "probability_history": [(i, p.tolist()) for i, p in s.history]})
    if self.main_process:
      plot_probability_heatmap(s.history, self.out / "layer_probabilities.png", title=self._heatmap_title())
    if evaluate:
      self.evaluate()

  def _heatmap_title(self) -> str:
    o = self.cfg.optim
    if o.strategy == "lisa":
      return "LISA layer sampling probability (uniform)"
    if o.strategy == "full":
      return "Full fine-tuning (every layer trains)"
    if o.strategy == "fixed":
      return f"Fixed layers {sorted(o.fixed_layers)} (no sampling)"
    name, importance = ("GRASS*", "probing") if o.strategy == "grass_static" else ("GRASS", o.importance)
    return f"{name} layer sampling probability ({o.probability}, T={o.temperature}, importance: {importance})"

  def evaluate(self) -> None:
    """Evaluates the configured tasks on the current parameters (``eval.tasks``)."""
    s = self.state
    accuracies = {}
    for task, records in self.eval_sets.items():
      summary, rows = evaluate(s.params, self.mcfg, self.tokenizer, task, records, self.eval_options)
      if self.main_process:
        write_results(self.out / "eval" / f"step_{s.step}", summary, rows)
      accuracies[f"eval/{task}_accuracy"] = summary["accuracy"]
    if accuracies and self.writer is not None:
      self.writer.write(s.step, accuracies)
      s.last.update(accuracies)

  # -- export ------------------------------------------------------------------------------------

  def close(self) -> None:
    """Closes the checkpointer (waiting for a save in flight) and the metrics writer; safe to call twice.

    A Trainer is also a context manager that closes itself::

      with Trainer(cfg) as trainer:
        trainer.train()
        summary = trainer.finish()
    """
    if getattr(self, "_closed", False):
      return
    self._closed = True
    for part in ("train_step_fn", "ckpt", "writer"):  # (a Trainer that failed to set up has only some)
      if getattr(self, part, None) is not None:
        getattr(self, part).close()  # the step's: background compilations nobody will use

  def __enter__(self) -> "Trainer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def finish(self, *, return_state: bool = False) -> dict[str, Any]:
    """Closes the checkpointer and writer, exports ``hf_model/`` and writes ``summary.json``."""
    s, out = self.state, self.out
    self.close()
    summary = {"steps": s.step, "final_loss": s.last.get("mean_loss"), "skipped_steps": s.skipped,
               "output_dir": str(out), "heatmap": str(out / "layer_probabilities.png"),
               **{k: v for k, v in s.last.items() if k.startswith("eval/")}}
    if self.parts.backward_buckets is not None:  # how many steps ran which executable (None: the slot scan)
      summary["steps_by_backward_start"] = {str(k): v for k, v in self.train_step_fn.runs.items()}
    if self.cfg.train.export:
      summary["hf_model"] = str(self.export(out / "hf_model"))
    if self.main_process:
      (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if return_state:
      summary.update(params=s.params, opt_state=s.opt_state,
                     layer_states=None if s.offloader is None else s.offloader.full_bank(s.opt_state))
    return summary

  def export(self, directory: Path) -> Path:
    """Writes the model and tokenizer as a Hugging Face checkpoint."""
    params = self.state.params
    if jax.process_count() > 1:  # arrays span hosts: gather, then one process writes
      from jax.experimental import multihost_utils
      params = multihost_utils.process_allgather(params, tiled=True)
    if self.main_process:
      save_pretrained(params, self.mcfg, directory)
    if hasattr(self.tokenizer, "save_pretrained"):
      self.tokenizer.save_pretrained(directory)
    elif self.main_process:
      data_lib.save_tokenizer_marker(self.tokenizer, directory)
    return directory


class Interrupted(Exception):
  """Training stopped on a signal after saving a checkpoint; ``str()`` says where and how to continue."""

  def __init__(self, signum: int, step: int, checkpoints: Path):
    self.signum, self.step = signum, step
    super().__init__(f"interrupted ({signal.Signals(signum).name}) at step {step}; saved a checkpoint of it in "
                     f"{checkpoints}: run the same command with --resume to continue")


class StopSignals:
  """While active, SIGINT and SIGTERM set ``received`` (the signal's number) instead of raising at once.

  A second SIGINT raises KeyboardInterrupt, so a user can still stop a hung save. Outside the main
  thread (where Python cannot install handlers) it does nothing.
  """

  def __init__(self):
    self.received: int | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):
    if self.received == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signum

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def run(cfg: Config, *, resume: bool = False, progress: bool = True, stop_at: int | None = None,
        return_state: bool = False) -> dict[str, Any]:
  """Fine-tunes as ``cfg`` says; returns a summary. See README 'Training' for the outputs.

  Args:
    resume: continue from the latest checkpoint in ``train.output_dir``.
    progress: show a progress bar.
    stop_at: stop (with a checkpoint) after this step, as if interrupted; the
      schedule still spans the whole run, so ``resume`` continues it exactly.
    return_state: add the final ``params`` and ``opt_state`` to the summary.

  Raises:
    Interrupted: on SIGINT or SIGTERM, once the step in flight is checkpointed.
  """
  with Trainer(cfg, resume=resume, progress=progress) as trainer:
    trainer.train(stop_at=stop_at)
    return trainer.finish(return_state=return_state)
