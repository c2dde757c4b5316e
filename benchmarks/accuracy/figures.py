"""Figures of the accuracy study: per-layer MGN on each task, and each GRASS variant's probability heatmap."""

from __future__ import annotations

from pathlib import Path

import numpy as np

VARIANTS = ("grass_power", "grass", "grass_static", "grass_sketch")


def _pick(traces: list[dict], task: str, method: str, lr: float | None) -> dict | None:
  cands = [t for t in traces if t["task"] == task and t["method"] == method and (lr is None or t["lr"] == lr)]
  return min(cands, key=lambda t: t["seed"]) if cands else None


def plot_mgn_per_task(traces: list[dict], tasks: list[str], path: Path) -> Path:
  """The final MGN of every layer (GRASS with sketched importance measures all of them), one line per task."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 3.2))
  for task in tasks:
    t = _pick(traces, task, "grass_sketch", None) or _pick(traces, task, "grass", None)
    if t is None or not t["log"]:
      continue
    mgn = np.asarray(t["log"][-1]["importance"], float)
    ax.plot(np.arange(len(mgn)), mgn / mgn.mean(), marker="o", ms=3, label=f"{task} ({t['method']})")
  ax.set_xlabel("layer")
  ax.set_ylabel("MGN / mean over layers")
  ax.set_title("Per-layer mean gradient norm at the end of fine-tuning, SmolLM2-135M")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_heatmaps(traces: list[dict], task: str, lrs: dict, path: Path) -> Path:
  """Sampling probability per layer (rows) and logged step (columns), one panel per GRASS variant."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  picked = [(m, _pick(traces, task, m, lrs.get(m))) for m in VARIANTS]
  picked = [(m, t) for m, t in picked if t is not None and t["log"]]
  fig, axes = plt.subplots(1, max(len(picked), 1), figsize=(3.2 * max(len(picked), 1), 3.6), squeeze=False)
  for ax, (method, t) in zip(axes[0], picked):
    probs = np.array([l["probabilities"] for l in t["log"]]).T
    steps = [l["step"] for l in t["log"]]
    im = ax.imshow(probs, aspect="auto", origin="lower", cmap="viridis",
                   extent=(steps[0], steps[-1], -0.5, probs.shape[0] - 0.5))
    ax.set_title(f"{method} (lr {t['lr']:g})", fontsize=9)
    ax.set_xlabel("step")
    fig.colorbar(im, ax=ax, fraction=0.05)
  axes[0][0].set_ylabel("layer")
  fig.suptitle(f"Layer sampling probability, task {task}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_oracle(oracle: dict, path: Path) -> Path:
  """Each fixed pair's test accuracy (bars) against its MGN at probing (line), with uniform sampling's accuracy."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  pairs = oracle["pairs"]
  x = np.arange(len(pairs))
  fig, ax = plt.subplots(figsize=(7.5, 3.4))
  ax.bar(x, [p["accuracy"] for p in pairs], color="tab:blue", alpha=0.7, label="pair trained alone (test)")
  if oracle.get("lisa_accuracy") is not None:
    ax.axhline(oracle["lisa_accuracy"], color="tab:green", ls="--", label="LISA, same lr and seed")
  lo = min(p["accuracy"] for p in pairs)
  ax.set_ylim(max(0.0, lo - 0.1), 1.0)
  ax.set_xticks(x, [f"{p['layers'][0]}-{p['layers'][1]}" for p in pairs], fontsize=7)
  ax.set_xlabel("layers trained for the whole run")
  ax.set_ylabel("accuracy")
  twin = ax.twinx()
  twin.plot(x, [p["mgn"] for p in pairs], color="tab:red", marker="o", ms=3, label="pair MGN at probing / mean")
  twin.set_ylabel("MGN / mean", color="tab:red")
  ax.set_title(f"Oracle on {oracle['task']}: Spearman(MGN, accuracy) = {oracle['spearman']:.2f}", fontsize=10)
  h1, l1 = ax.get_legend_handles_labels()
  h2, l2 = twin.get_legend_handles_labels()
  ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower left")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_all(traces: list[dict], rows: list[dict], scale: dict, prefix: Path, oracle: list[dict]) -> list[Path]:
  """The study's figures, named ``<prefix>_mgn.png``, ``<prefix>_heatmap_<task>.png`` (the oracle scale:
  ``<prefix>_<task>.png`` from ``oracle``, the report's analyses); the prefix is the report JSON without its suffix."""
  from benchmarks.accuracy.study import ORACLE, chosen_lr
  if all(m in ORACLE for m in scale["methods"]):
    return [plot_oracle(o, Path(f"{prefix}_{o['task']}.png")) for o in oracle]
  out = [plot_mgn_per_task(traces, scale["tasks"], Path(f"{prefix}_mgn.png"))]
  for task in scale["tasks"]:
    if not any(t["task"] == task and t["method"] in VARIANTS for t in traces):
      continue  # no GRASS run of this task left a trace: no figure rather than an empty one
    lrs = {m: chosen_lr(rows, task, m, scale) for m in VARIANTS if m in scale["lrs"]}
    out.append(plot_heatmaps(traces, task, lrs, Path(f"{prefix}_heatmap_{task}.png")))
  return out
