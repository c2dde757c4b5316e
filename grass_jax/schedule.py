"""When GRASS probes, measures, refreshes, draws and switches: one answer for the device and the host.

Every question takes ``count``, the number of updates before the step (the transform's
``state.count``: 0 for the first step), as a Python int (the host side: offloading, the backward-pass
buckets) or a traced int32 (inside the jitted step), and answers with a bool of the same kind.

For ``period = 4`` and no probing, steps ``count = 0..7``::

  drawing     . . X . . . X .    the next period's layers are drawn one step before the switch
  switching   . . . X . . . X    after this step the drawn layers are the active ones
  refreshing  . . X . . . X .    each window of measurements is folded into the MGN before the draw

Example::

  >>> s = Schedule(period=4)
  >>> [c for c in range(8) if s.switching(c)], [c for c in range(8) if s.drawing(c)]
  ([3, 7], [2, 6])
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Schedule:
  """GRASS's step schedule.

  Attributes:
    period: K, steps between layer switches.
    probe_steps: T_p, the first steps measure every layer and update nothing (a multiple of ``period``).
    refresh_every: T_u, steps between MGN refreshes (None: ``period``).
    sketch_every: with sketched importance, frozen layers are sketched every n-th step (it should divide
      the refresh interval, so that every refresh sees a sketch; the config checks it).
    static: GRASS*: the MGN is refreshed once, at the end of probing.
  """

  period: int
  probe_steps: int = 0
  refresh_every: int | None = None
  sketch_every: int = 1
  static: bool = False

  def __post_init__(self):
    def positive_int(value: Any) -> bool:
      return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1
    if not positive_int(self.period):
      raise ValueError(f"period must be an int >= 1 (steps between layer switches); got {self.period!r}")
    if not isinstance(self.probe_steps, (int, np.integer)) or self.probe_steps < 0 or self.probe_steps % self.period:
      raise ValueError(f"probe_steps must be a multiple of period={self.period} (layers switch every period "
                       f"steps); got {self.probe_steps!r}")
    if self.refresh_every is not None and not positive_int(self.refresh_every):
      raise ValueError(f"refresh_every must be an int >= 1 (or None: every period); got {self.refresh_every!r}")
    if not positive_int(self.sketch_every):
      raise ValueError(f"sketch_every must be an int >= 1; got {self.sketch_every!r}")
    if self.static and self.probe_steps == 0:
      raise ValueError("static importance (GRASS*) comes from probing: set probe_steps > 0")

  @property
  def refresh_interval(self) -> int:
    return self.period if self.refresh_every is None else self.refresh_every

  def probing(self, count: Any) -> Any:
    """The step measures every layer and updates nothing."""
    return count < self.probe_steps

  def switching(self, count: Any) -> Any:
    """The step is its period's last: after it, the layers drawn one step earlier are active."""
    return (count + 1) % self.period == 0

  def drawing(self, count: Any) -> Any:
    """The step draws the next period's layers (one step before the switch, so their state can be prefetched)."""
    return (count + 2) % self.period == 0

  def refreshing(self, count: Any) -> Any:
    """The step folds the windows of measurements into the MGN (at the end of probing, then every
    ``refresh_every`` steps, one step before the steps that are multiples of it, as the draw)."""
    after_probe = count + 2 - self.probe_steps
    if self.static:
      return after_probe == 0
    return (after_probe >= 0) & (after_probe % self.refresh_interval == 0)

  def sketching(self, count: Any) -> Any:
    """With sketched importance: the step sketches the frozen layers (every refresh step does)."""
    return (count + 2 - self.probe_steps) % self.sketch_every == 0
