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

  buckets = BackwardBuckets(4, settings.schedule, measure="none")
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


def measures_frozen_layers(count: int, schedule: Schedule, measure: str) -> bool:
  """Whether the step at optimizer count ``count`` measures frozen layers (probing, or a sketch step).

  The train step's own rule (``metrics['probing']``, ``metrics['sketching']``), on the host, from the
  run's one :class:`~grass_jax.schedule.Schedule`.
  """
  if measure == "none":
    return False
  return bool(schedule.probing(count)) or (measure == "sketch" and bool(schedule.sketching(count)))


class BackwardBuckets:
  """Picks ``backward_start`` for each step (module docstring).

  Attributes:
    bucket: layers per bucket (> 0).
    schedule: the run's :class:`~grass_jax.schedule.Schedule` (``GrassSettings.schedule``, with the
      step's ``sketch_every``): when the layers switch and which steps probe or sketch.
    measure: the train step's measure mode ('none', 'exact', 'sketch').
  """

  def __init__(self, bucket: int, schedule: Schedule, measure: str = "none"):
    if bucket < 1:
      raise ValueError(f"bucket must be >= 1; got {bucket}")
    self.bucket, self.schedule, self.measure = bucket, schedule, measure
    self._layers: list[int] | None = None
    self._read_at: int | None = None

  def starts(self, num_layers: int) -> list[int]:
    """Every bucket of a model of ``num_layers`` layers, deepest backward pass (most gain) first."""
    return list(range(0, num_layers, self.bucket))

  def start(self, count: int, opt_state: Any, offloader: Any = None) -> int | None:
    """``backward_start`` for the step at optimizer count ``count`` (None: the slot scan)."""
    if measures_frozen_layers(count, self.schedule, self.measure):
      return None
    return backward_start(self.active_layers(count, opt_state, offloader), self.bucket)

  def active_layers(self, count: int, opt_state: Any, offloader: Any = None) -> list[int]:
    """The layers the step at ``count`` trains, read from the device once per period at most."""
    if offloader is not None:
      return list(offloader.slot_layers)
    period_of = count // self.schedule.period
    if self._layers is None or self._read_at != period_of:
      self._layers = [int(x) for x in np.asarray(find_state(opt_state).active)]
      self._read_at = period_of
    return self._layers
