"""Training checkpoints with orbax ``CheckpointManager``.

A checkpoint holds the parameters, the whole optimizer state (GRASS state
with its PRNG key, importance and active layers), the host-offloaded layer
states when offloading is on, and the loop's position (JSON). Orbax writes a
step to a temporary directory and renames it when complete, so a crash while
saving never leaves a checkpoint that :meth:`Checkpointer.latest_step` picks up.

Example::

  ckpt = Checkpointer("runs/x/checkpoints", max_to_keep=2)
  ckpt.save(100, params=params, opt_state=opt_state, layer_states=None, meta={"epoch": 0})
  params, opt_state, layer_states, meta = ckpt.restore(ckpt.latest_step(), params=params,
                                                       opt_state=opt_state, layer_states=None)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import contextlib
import logging
import shutil

import orbax.checkpoint as ocp

from grass_jax.errors import CheckpointError


@contextlib.contextmanager
def _quiet_orbax():
  """Orbax and absl log whole asyncio tracebacks for a damaged file; the caller reports one line instead."""
  loggers = [logging.getLogger(n) for n in ("absl", "orbax", "orbax.checkpoint", "jax._src.distributed")]
  levels = [l.level for l in loggers]
  for l in loggers:
    l.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    for l, level in zip(loggers, levels):
      l.setLevel(level)


class Checkpointer:
  """Saves and restores ``(params, opt_state, layer_states, meta)`` by step."""

  def __init__(self, directory: str | Path, max_to_keep: int = 2):
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, *, params: Any, opt_state: Any, layer_states: Any, meta: dict) -> None:
    items = dict(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                 meta=ocp.args.JsonSave(meta))
    if layer_states is not None:
      items["layer_states"] = ocp.args.StandardSave(layer_states)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, *, params: Any, opt_state: Any, layer_states: Any) -> tuple[Any, Any, Any, dict]:
    """Restores into the structure, dtypes, shardings and memory kinds of the given targets."""
    if step not in self.manager.all_steps():
      raise FileNotFoundError(f"no complete checkpoint for step {step} in {self.directory} "
                              f"(available: {self.manager.all_steps()})")
    items = dict(params=ocp.args.StandardRestore(params), opt_state=ocp.args.StandardRestore(opt_state),
                 meta=ocp.args.JsonRestore())
    if layer_states is not None:
      items["layer_states"] = ocp.args.StandardRestore(layer_states)
    r = self.manager.restore(step, args=ocp.args.Composite(**items))
    return r.params, r.opt_state, r.get("layer_states") if layer_states is not None else None, r.meta

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_newest_readable(self, *, params: Any, opt_state: Any, layer_states: Any,
                              warn=print) -> tuple[int, Any, Any, Any, dict] | None:
    """Restores the newest checkpoint that reads back whole; returns ``(step, params, opt_state, layer_states, meta)``.

    A checkpoint that fails to read (a truncated or garbage array file, a missing metadata file) is
    moved aside to ``<directory>_unreadable/<step>`` (``<step>.1``, ... when that exists; kept, never deleted)
    with one line through
    ``warn`` naming it and the error, and the next older one is tried. None when no checkpoint exists.
    Raises :class:`CheckpointError` when checkpoints exist but none reads back.
    """
    skipped = []
    for step in reversed(self.all_steps()):
      try:
        with _quiet_orbax():
          restored = self.restore(step, params=params, opt_state=opt_state, layer_states=layer_states)
      except Exception as e:  # noqa: BLE001 - orbax and tensorstore fail in many ways on a damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if len(first) > 160:  # cut at a word, and say so
          first = first[:160].rsplit(" ", 1)[0] + " ..."
        reason = f"{type(e).__name__}: {first}"
        skipped.append(step)
        aside = self.directory.parent / f"{self.directory.name}_unreadable" / str(step)
        n = 1
        while aside.exists():  # an earlier unreadable checkpoint of the same step: never moved inside it
          aside, n = aside.with_name(f"{step}.{n}"), n + 1
        aside.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.directory / str(step)), str(aside))
        warn(f"skipped checkpoint {step} (unreadable: {reason}); moved it to {aside}")
        self.manager.reload()
        continue
      return (step, *restored)
    if skipped:
      raise CheckpointError(f"no readable checkpoint in {self.directory} (skipped steps {skipped}, moved to "
                            f"{self.directory.name}_unreadable/); start without --resume in a new train.output_dir")
    return None

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
