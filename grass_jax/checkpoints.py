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

import orbax.checkpoint as ocp


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

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
