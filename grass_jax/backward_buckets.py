"""Host-side choice of the backward pass for each step: the slot scan, or a bucket of it.

A bucketed backward pass (:mod:`grass_jax.models.bucketed_stack`) is one executable per bucket of
draws: ``backward_start``, the lowest active layer rounded down to a multiple of the bucket size,
is a static argument of the train step. So the host must know the active layers before it
dispatches a step. They change only at a switch (a step count that is a multiple of ``period``),
where they are read once: from the :class:`~grass_jax.offload.Offloader`, which has them on the
host already, or from the optimizer state (which waits for the step before to finish: one short
pause per period). Steps that measure frozen layers (GRASS's probing steps, sketch steps) run the
slot scan.

Example::

  buckets = BackwardBuckets(4, period=20, measure="none")
  step = CompiledStep(make_train_step(config, tx, StepOptions(grass=settings)))  # tx built from settings,
                                                                                # always_on=False
  for batch in batches:
    start = buckets.start(count, opt_state, offloader)
    params, opt_state, metrics = step(params, opt_state, batch, backward_start=start)
    count += 1
"""

from __future__ import annotations

from typing import Any

import numpy as np

from grass_jax.models.bucketed_stack import backward_start
from grass_jax.schedule import Schedule
from grass_jax.transform import find_state


def measures_frozen_layers(count: int, *, measure: str, probe_steps: int, sketch_every: int) -> bool:
  """Whether the step at optimizer count ``count`` measures frozen layers (probing, or a sketch step).

  The train step's own rule (``metrics['probing']``, ``metrics['sketching']``), on the host.
  """
  if measure == "none":
    return False
  schedule = Schedule(period=1, probe_steps=probe_steps, sketch_every=sketch_every)
  return bool(schedule.probing(count)) or (measure == "sketch" and bool(schedule.sketching(count)))


class BackwardBuckets:
  """Picks ``backward_start`` for each step (module docstring).

  Attributes:
    bucket: layers per bucket (> 0).
    period: the transform's ``period`` (the active layers change only at multiples of it).
    measure, probe_steps, sketch_every: the train step's (``make_train_step``).
  """

  def __init__(self, bucket: int, *, period: int, measure: str = "none", probe_steps: int = 0,
               sketch_every: int = 1):
    if bucket < 1:
      raise ValueError(f"bucket must be >= 1; got {bucket}")
    if period < 1:
      raise ValueError(f"period must be >= 1; got {period}")
    self.bucket, self.period = bucket, period
    self.measure, self.probe_steps, self.sketch_every = measure, probe_steps, sketch_every
    self._layers: list[int] | None = None
    self._read_at: int | None = None

  def starts(self, num_layers: int) -> list[int]:
    """Every bucket of a model of ``num_layers`` layers, deepest backward pass (most gain) first."""
    return list(range(0, num_layers, self.bucket))

  def start(self, count: int, opt_state: Any, offloader: Any = None) -> int | None:
    """``backward_start`` for the step at optimizer count ``count`` (None: the slot scan)."""
    if measures_frozen_layers(count, measure=self.measure, probe_steps=self.probe_steps,
                              sketch_every=self.sketch_every):
      return None
    return backward_start(self.active_layers(count, opt_state, offloader), self.bucket)

  def active_layers(self, count: int, opt_state: Any, offloader: Any = None) -> list[int]:
    """The layers the step at ``count`` trains, read from the device once per period at most."""
    if offloader is not None:
      return list(offloader.slot_layers)
    period_of = count // self.period
    if self._layers is None or self._read_at != period_of:
      self._layers = [int(x) for x in np.asarray(find_state(opt_state).active)]
      self._read_at = period_of
    return self._layers
