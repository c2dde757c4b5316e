"""Training metrics: JSONL lines, TensorBoard scalars, and the layer-probability heatmap.

Example::

  writer = MetricsWriter("runs/x")
  writer.write(10, {"loss": 1.2, "lr": 1e-5})
  plot_probability_heatmap([(10, probs10), (20, probs20)], "runs/x/layer_probabilities.png")
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _jsonable(v: Any) -> Any:
  if isinstance(v, np.ndarray):
    return v.tolist()
  if isinstance(v, (np.floating, np.integer)):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


class MetricsWriter:
  """Appends one JSON object per logged step to ``metrics.jsonl``; scalars also go to TensorBoard.

  TensorBoard needs ``tensorboardX``; without it only the JSONL file is written.
  """

  def __init__(self, directory: str | Path, *, resume_step: int | None = None):
    """``resume_step``: lines after this step (a crashed run logged past its last checkpoint, which the resumed
    run logs again) move to ``metrics_superseded.jsonl``, so ``metrics.jsonl`` stays one line per step and
    nothing written is lost."""
    self.directory = Path(directory)
    self.directory.mkdir(parents=True, exist_ok=True)
    self.path = self.directory / "metrics.jsonl"
    if resume_step is not None and self.path.exists():
      kept, superseded = [], []
      for line in self.path.read_text().splitlines():
        try:
          (kept if json.loads(line)["step"] <= resume_step else superseded).append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
          superseded.append(line)  # a line cut short by the crash
      if superseded:
        with (self.directory / "metrics_superseded.jsonl").open("a") as f:
          f.write("".join(l + "\n" for l in superseded))
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(l + "\n" for l in kept))
        tmp.replace(self.path)  # atomic: a second crash leaves the old file or the new one, never half of it
    self._file = self.path.open("a")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(self.directory / "tensorboard"))
    except ImportError:
      self._tb = None

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
          self._tb.add_scalar(k, float(v), step)
        elif isinstance(v, np.ndarray) and v.ndim == 1 and v.size <= 128:
          for i, x in enumerate(v):
            self._tb.add_scalar(f"{k}/layer_{i:02d}", float(x), step)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def plot_probability_heatmap(history: Sequence[tuple[int, np.ndarray]], path: str | Path,
                             title: str = "GRASS layer sampling probability") -> Path | None:
  """Heatmap of the sampling probability of each layer (rows) over steps (columns)."""
  if not history:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  steps = [s for s, _ in history]
  grid = np.stack([np.asarray(p, np.float64) for _, p in history], axis=1)
  fig, ax = plt.subplots(figsize=(min(14, 4 + 0.08 * len(steps)), max(3, 0.25 * grid.shape[0] + 1.5)))
  im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                 extent=(steps[0], steps[-1] if len(steps) > 1 else steps[0] + 1, -0.5, grid.shape[0] - 0.5))
  ax.set_xlabel("step")
  ax.set_ylabel("layer")
  ax.set_title(title)
  fig.colorbar(im, ax=ax, label="probability")
  fig.tight_layout()
  path = Path(path)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
