"""The measured tables of README.md and docs/, made from the committed result files.

  python benchmarks/report.py           # rewrites every table between its markers
  python benchmarks/report.py --check   # exit 1, naming the table, where a committed table differs

A table in a page sits between ``<!-- report: NAME -->`` and ``<!-- /report -->``; NAME is a key of
:data:`TABLES`, whose function makes the table from the result file it names. ``tests/test_report.py``
runs the check, so a number in a table is always what the committed rows give.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAIRED = "benchmarks/results/accuracy_paired.json"
# What each method of the paired study is, in words: (name in the README, draws, moments at a switch).
PAIRED_METHODS = {
    "lisa": ("LISA (uniform draws, moments reset)", "uniform", "reset"),
    "uniform_kept": ("uniform draws, moments kept", "uniform", "kept"),
    "grass_sketch": ("GRASS, live importance", "importance (live)", "kept"),
    "grass_sketch_reset": ("GRASS, live importance, moments reset", "importance (live)", "reset"),
    "lisa_coverage": ("LISA in cycles (`optim.coverage`)", "uniform, in cycles", "reset"),
    "grass_sketch_coverage": ("GRASS, live importance, in cycles", "importance (live), in cycles", "kept"),
    "grass_gain": ("GRASS, importance from the loss decrease (`importance: gain`)", "credited loss decrease", "kept"),
    "grass": ("GRASS as the paper specifies it (`importance: grad`)", "importance (paper)", "kept"),
    "grass_static": ("GRASS\\* (static importance)", "importance (probing only)", "kept"),
    "grass_adam": ("GRASS, importance from Adam's own step (`importance: adam`)", "gain of Adam's step", "kept"),
    "lisa_modules": ("LISA by modules", "uniform, by module", "reset"),
}


# The method the README sets beside LISA on every task: the config's default (LISA's draws by modules).
README_METHOD = "lisa_modules"


def _points(x: float) -> str:
  return f"{100 * x:+.1f}".replace("-", "−")


def _study(result: dict) -> tuple[list[dict], dict]:
  """(summary table, scale) recomputed from a study file's rows."""
  from benchmarks.accuracy.study import summarize
  scale = {**result["config"], "lrs": result["lr_grid"]}
  return summarize(result["rows"], scale), scale


def _paired(result: dict) -> tuple[list[dict], dict, dict]:
  """(summary table, paired differences by (task, method), scale) recomputed from the file's rows."""
  from benchmarks.accuracy.study import paired_vs
  table, scale = _study(result)
  paired = {(p["task"], p["method"]): p for p in paired_vs(result["rows"], scale)}
  return table, paired, scale


def _interval(p: dict) -> str:
  """'−3.4 [−5.5, −1.3]', bold where the whole interval is on one side of zero."""
  text = f"{_points(p['mean_difference'])} [{_points(p['ci95'][0])}, {_points(p['ci95'][1])}]"
  return f"**{text}**" if p["ci95"][0] > 0 or p["ci95"][1] < 0 else text


def paired_accuracy_readme(result: dict) -> str:
  """Per task: LISA, the README's GRASS method, the paired difference; then its mean over the tasks."""
  table, paired, scale = _paired(result)
  method = README_METHOD
  acc = {(t["task"], t["method"]): t for t in table}
  tasks = [t for t in scale["tasks"] if (t, "lisa") in acc and (t, method) in acc]
  lines = [f"| task | LISA | {PAIRED_METHODS[method][0]} | difference, points [95% interval] | seeds |",
           "|---|---|---|---|---|"]
  for task in tasks:
    lisa, other, p = acc[(task, "lisa")], acc[(task, method)], paired[(task, method)]
    if p.get("at_ceiling"):  # cannot show anything beating LISA; docs/accuracy.md has it
      continue
    lines.append(f"| {task} | {100 * lisa['accuracy_mean']:.1f}% | {100 * other['accuracy_mean']:.1f}% | "
                 f"{_interval(p)} | {p['seeds']} |")
  mean = paired.get(("mean", method))
  if mean is not None:
    lines.append(f"| mean of the {len(mean['tasks'])} tasks |  |  | {_interval(mean)} | {mean['seeds']} |")
  return "\n".join(lines)


def paired_accuracy_docs(result: dict) -> str:
  table, paired, scale = _paired(result)
  lines = ["| task | method | draws | moments at a switch | test accuracy %, mean ± sample std | seeds | against LISA, "
           "paired (points) | 95% interval | training-loss gap |", "|---|---|---|---|---|---|---|---|---|"]
  for t in table:
    if t["method"] == "pretrained":
      continue
    _, draws, moments = PAIRED_METHODS[t["method"]]
    p = paired.get((t["task"], t["method"]))
    cells = ["", "", ""] if p is None else [
        _points(p["mean_difference"]), f"[{_points(p['ci95'][0])}, {_points(p['ci95'][1])}]",
        f"{p['tail_loss_difference']:+.5f}".replace("-", "−")]
    task = t["task"] + (" (at the ceiling)" if p is not None and p.get("at_ceiling") else "")
    lines.append(f"| {task} | `{t['method']}` | {draws} | {moments} | {100 * t['accuracy_mean']:.1f} ± "
                 f"{100 * t['accuracy_std']:.1f} | {t['seeds']} | {' | '.join(cells)} |")
  for method in scale["methods"]:
    for key, after in (("mean", ""), ("mean_chosen", " (the tasks chosen on)")):
      p = paired.get((key, method))
      if p is not None:
        _, draws, moments = PAIRED_METHODS[method]
        lines.append(f"| mean of {', '.join(p['tasks'])}{after} | `{method}` | {draws} | {moments} |  | {p['seeds']} | "
                     f"{_points(p['mean_difference'])} | [{_points(p['ci95'][0])}, {_points(p['ci95'][1])}] |  |")
  return "\n".join(lines)


# Every H200 peers invocation, one after another; a table names its invocation's lines.
PEERS_H200 = "benchmarks/results/peers/peers_h200.jsonl"
PEERS_H100 = "benchmarks/results/peers/peers_h100.jsonl"
H200_TINY_SAME_DRAWS = slice(43, 47)  # TinyLlama against compiled LISA on the same layers, with and without ckpt
H200_BUCKETS = slice(20, 23)  # Llama-2-7B: the bucketed backward, the slot scan, compiled LISA on the same layers

# The README's speed table: per model, the peers file, the rows shown from it and their invocation's lines.
PEERS_README = [
    (PEERS_H100,
     "TinyLlama-1.1B, b16 x 512, embeddings trained",
     [("tiny-jax-default-modules", "grass_jax, the defaults (LISA by modules)"),
      ("tiny-jax-default-layers", "grass_jax, LISA by layers"),
      ("tiny-torch-lisa-compile", "PyTorch LISA, `torch.compile`, checkpointed")], slice(36, 40)),
    (PEERS_H100, "Llama-2-7B, b2 x 512, embeddings frozen",
     [("7b-jax-default-modules", "grass_jax, the defaults (LISA by modules)"),
      ("7b-jax-default-layers", "grass_jax, LISA by layers"),
      ("7b-torch-lisa-compile-g2", "PyTorch LISA, `torch.compile`, checkpointed")], slice(33, 36)),
]


# The older, non-deterministic studies of docs/accuracy.md (750 steps on 2026-12-01; 500 steps on 2026-11-25).
STUDY_750 = "benchmarks/results/accuracy_smollm2.json"
STUDY_500 = "benchmarks/results/accuracy_smollm2_500.json"
STUDY_LABELS = {
    "pretrained": "before fine-tuning", "full": "full fine-tuning", "lisa": "LISA",
    "grass": "GRASS, paper (`grass`, `importance: grad`)", "grass_static": "GRASS\\* (`grass_static`)",
    "grass_sketch": "GRASS, live importance (`grass_sketch`)",
    "grass_sketch_offload": "the same with offloaded moments (`grass_sketch_offload`)",
    "grass_power": "GRASS, old rule (`grass_power`)", "grass_floor": "diagnostic: floor 0.5 (`grass_floor`)",
}


def study_docs(result: dict, with_cost: bool = True) -> str:
  """Per task and method at its chosen learning rate: test accuracy (mean ± sample std), the difference of
  means against LISA (these runs were not paired), and with ``with_cost`` train seconds and peak GiB."""
  table, _ = _study(result)
  lisa = {t["task"]: t["accuracy_mean"] for t in table if t["method"] == "lisa"}
  head = "| task | method | lr | test accuracy, mean ± sample std | seeds | against LISA (points) |"
  lines = [head + (" train s | peak GiB |" if with_cost else ""), "|---" * (6 + 2 * with_cost) + "|"]
  for t in table:
    pre = t["method"] == "pretrained"
    acc = f"{t['accuracy_mean']:.3f}" + (f" ± {t['accuracy_std']:.3f}" if t["seeds"] > 1 else "")
    vs = "" if pre or t["method"] == "lisa" or t["task"] not in lisa else _points(t["accuracy_mean"] - lisa[t["task"]])
    lr = "" if pre else f"{t['lr']:.0e}".replace("e-0", "e-")
    cells = [t["task"], STUDY_LABELS.get(t["method"], f"`{t['method']}`"), lr, acc,
             "" if pre else str(t["seeds"]), vs]
    if with_cost:
      cells += ["" if pre else f"{t['seconds_mean']:.0f}", "" if t["peak_gib"] is None else f"{t['peak_gib']:.2f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def study_goal_docs(result: dict) -> str:
  """The 750-step study against LISA: difference of means per task, their average, and Welch's t on the
  noisier task (dates_direct) over the seeds each method ran."""
  import statistics

  from benchmarks.accuracy.study import of_this_scale, scored_rows
  table, scale = _study(result)
  rows = of_this_scale(result["rows"], scale)
  mean = {(t["task"], t["method"]): t["accuracy_mean"] for t in table}

  def accs(task: str, method: str) -> list[float]:
    return [r["accuracy"] for r in scored_rows(rows, task, method, scale)]

  lisa = accs("dates_direct", "lisa")
  lines = ["| method | arith | dates_direct | average | seeds | Welch t on dates_direct |", "|---|---|---|---|---|---|"]
  for method in ("grass", "grass_static", "grass_sketch", "grass_power"):
    diffs = [mean[(task, method)] - mean[(task, "lisa")] for task in ("arith", "dates_direct")]
    other = accs("dates_direct", method)
    t = (statistics.mean(other) - statistics.mean(lisa)) / (
        statistics.variance(other) / len(other) + statistics.variance(lisa) / len(lisa)) ** 0.5
    lines.append(f"| {STUDY_LABELS[method]} | {_points(diffs[0])} | {_points(diffs[1])} | "
                 f"{_points(sum(diffs) / 2)} | {len(other)} vs {len(lisa)} | {t:+.1f} |".replace("-", "−"))
  return "\n".join(lines)


STUDY_750_TRACES = "benchmarks/results/accuracy/traces.jsonl"


def _periods(trace: dict, period: int | None) -> list[list[int]]:
  """The layers each period trained, probing periods left out (they train nothing). ``period``: steps per
  period where a trace logs more often than once a period (its first entry in each period counts); None:
  one entry per period."""
  entries = [e for e in trace["log"] if not e["probing"]]
  if period is None:
    return [e["active_layers"] for e in entries]
  first: dict[int, list[int]] = {}
  for e in entries:
    first.setdefault((e["step"] - 1) // period, e["active_layers"])
  return list(first.values())


def draws_docs(traces: list[dict], chosen: dict[tuple[str, str], float], methods: tuple[str, ...], *,
               log_entries: int | None = None, period: int | None = None) -> str:
  """Where each sampler's draws went, per task over its seeds at the chosen learning rate: the share of
  periods that trained layer 0 and the last layer, the layers a run never trained, the largest probability.
  ``log_entries``: only traces of this many entries (a file holding runs of several lengths)."""
  lines = ["| task | method | seeds | periods with layer 0 | periods with the last layer | layers never trained "
           "(per seed) | largest p in a run |", "|---|---|---|---|---|---|---|"]
  for (task, method), lr in chosen.items():
    if method not in methods:
      continue
    runs = sorted((t for t in traces if t["task"] == task and t["method"] == method and t["lr"] == lr
                   and (log_entries is None or len(t["log"]) == log_entries)), key=lambda t: t["seed"])
    if not runs:
      continue
    n_layers = len(runs[0]["log"][0]["probabilities"])
    periods = [_periods(t, period) for t in runs]
    total = sum(len(p) for p in periods)
    share = lambda layer: sum(layer in a for p in periods for a in p) / total
    never = [n_layers - len({l for a in p for l in a}) for p in periods]
    p_max = [max(max(e["probabilities"]) for e in t["log"]) for t in runs]
    lines.append(f"| {task} | `{method}` | {len(runs)} | {share(0):.0%} | {share(n_layers - 1):.0%} | "
                 f"{' '.join(map(str, never))} | {min(p_max):.2f}-{max(p_max):.2f} |")
  return "\n".join(lines)


def study_750_draws_docs(traces: list[dict]) -> str:
  """:func:`draws_docs` of the 750-step study (75 periods) at each method's chosen learning rate."""
  chosen = {(t["task"], t["method"]): t["lr"] for t in json.loads((ROOT / STUDY_750).read_text())["table"]}
  return draws_docs(traces, chosen, ("lisa", "grass", "grass_static", "grass_sketch"), log_entries=75)


PAIRED_TRACES = "benchmarks/results/accuracy_paired_traces.jsonl"


def paired_draws_docs(traces: list[dict]) -> str:
  """:func:`draws_docs` of the paired study's committed traces (19 periods of 20 steps, logged every 4)."""
  scale = json.loads((ROOT / PAIRED).read_text())
  chosen = {(t["task"], t["method"]): t["lr"] for t in scale["table"] if t["method"] != "pretrained"}
  return draws_docs(traces, chosen, tuple(PAIRED_METHODS), period=scale["config"]["period"])


ORACLE = "benchmarks/results/accuracy_smollm2_oracle.json"
PAIRED_CHAT = "benchmarks/results/accuracy_paired_chat.json"


def paired_chat_docs(result: dict) -> str:
  """The chat-template runs against the Alpaca-prompt runs of the same task, method and seed."""
  out = ["| task | method | Alpaca prompt | SmolLM2's chat template | difference, points [95% interval] | seeds |",
         "|---|---|---|---|---|---|"]
  for f in result["against_alpaca"]:
    out.append(f"| {f['task']} | `{f['method']}` | {100 * f['alpaca_accuracy_mean']:.1f}% | "
               f"{100 * f['chat_accuracy_mean']:.1f}% | {_interval(f)} | {f['seeds']} |")
  return "\n".join(out)


PAIRED_CHAT_GRID = "benchmarks/results/accuracy_paired_chat_grid.json"


def paired_chat_grid_docs(result: dict) -> str:
  """The chat form's learning-rate grid at seed 0: validation accuracy (what chooses) and test accuracy."""
  out = ["| method | learning rate | validation | test | card | commit |", "|---|---|---|---|---|---|"]
  grid = sorted((r for r in result["rows"] if r["seed"] == 0 and "val_accuracy" in r), key=lambda r: r["lr"])
  best = max(grid, key=lambda r: (r["val_accuracy"], -r["lr"]))
  for r in grid:
    val = f"{100 * r['val_accuracy']:.1f}%"
    out.append(f"| `{r['method']}` | {r['lr']:g} | {f'**{val}**' if r is best else val} | {100 * r['accuracy']:.1f}% | "
               f"{r['device']} | {r['commit']} |")
  out.append(f"\n{result['config']['steps']} steps, {len(result['config']['tasks'])} task "
             f"({', '.join(result['config']['tasks'])}); `{PAIRED_CHAT_GRID}`.")
  return "\n".join(out)


PACKING = "benchmarks/results/packing_h100.json"


def packing_docs(result: dict) -> str:
  """``benchmarks/packing.py``: loss tokens/s of each layout and its ratio to padded rows; its card and commit."""
  out = ["| layout | loss tokens/s (median after warm-up) | against padded |", "|---|---|---|"]
  for r in result["rows"]:
    sets = ", ".join(f"`{o}`" for o in r["overrides"]) or "as shipped"
    out.append(f"| {r['variant']} ({sets}) | {r['loss_tokens_per_s']:,.0f} | {r['gain_over_padded']:.2f}x |")
  out.append(f"\n{result['device']}; commit {result['commit']}; {result['steps']} steps of `{result['config']}`; "
             f"`{PACKING}`.")
  return "\n".join(out)


def oracle_docs(result: dict) -> str:
  """Each pair of layers trained alone: test accuracy and the pair's MGN over the mean (best of each bold)."""
  pairs = result["oracle"][0]["pairs"]
  best_acc = max(p["accuracy"] for p in pairs)
  best_mgn = max(p["mgn"] for p in pairs)
  bold = lambda text, on: f"**{text}**" if on else text
  return "\n".join([
      "| layers | " + " | ".join(f"{p['layers'][0]}-{p['layers'][-1]}" for p in pairs) + " |",
      "|---|" + "---|" * len(pairs),
      "| test accuracy | " + " | ".join(bold(f"{p['accuracy']:.3f}"[1:], p["accuracy"] == best_acc) for p in pairs) + " |",
      "| pair MGN / mean | " + " | ".join(bold(f"{p['mgn']:.2f}", p["mgn"] == best_mgn) for p in pairs) + " |"])


SCALING = {"`data=2`": "benchmarks/results/scaling/data_parallel_h200x2.json",
           "`fsdp=2`": "benchmarks/results/scaling/fsdp_h200x2.json"}


def scaling_docs(_: Any = None) -> str:
  """One GPU against two, per mesh: tokens/s, scaling, the peak on GPU 0 (each file one invocation)."""
  lines = ["| mesh | 1 GPU tokens/s | 2 GPUs tokens/s | scaling | peak GiB on GPU 0 (1 / 2) |", "|---|---|---|---|---|"]
  for mesh, path in SCALING.items():
    one, two = json.loads((ROOT / path).read_text())["rows"][:2]
    lines.append(f"| {mesh} | {one['tokens_per_s']:,.0f} | {two['tokens_per_s']:,.0f} | "
                 f"{two['tokens_per_s'] / one['tokens_per_s']:.2f}x | "
                 f"{one['peak_bytes'] / 2**30:.1f} / {two['peak_bytes'] / 2**30:.1f} |")
  return "\n".join(lines)


STREAM_PEERS = "benchmarks/results/peers/peers_h200.jsonl"
STREAM_PEERS_LINES = slice(66, 69)  # one invocation
STREAM_PROBE = "benchmarks/results/probes/stream_barrier_wait_stored_h200.json"
# The first two lines' session lost its raw rows (2026-12-03); what its notes printed is kept, marked as lost.
STREAM_LOST = [("by layer (rows lost)", "14.47, 10,581", "16.73, 5,198", "1.84 / 4.11 GiB"),
               ("by matrix, updates in buffers of their own, not kept (rows lost)", "14.24, 10,463", "16.74, 5,333",
                "1.61 / 4.06")]


def streaming_docs(_: Any = None) -> str:
  """Peak GiB and tokens/s of the streamed 7B rows (gamma 1 and 4) and of plain offload, with the step's
  compiled temporaries; the lines whose rows were lost say so, the transcribed ones name their file."""
  def cell(r):
    return f"{r['peak_gib']:.2f}, {r['tokens_per_s']:,.0f}"

  peers = _peers_rows(STREAM_PEERS, STREAM_PEERS_LINES)
  probe = json.loads((ROOT / STREAM_PROBE).read_text())
  temps = {(r["change"], r["gamma"]): r["temps_gib"] for r in probe["step_temporaries_gib"]["rows"] if r["stream"]}
  late = {r["row"]: r for r in probe["peers_60_steps_one_invocation"]["rows"]}
  name = f"`{STREAM_PEERS.split('results/')[1]}`, lines {STREAM_PEERS_LINES.start + 1}-{STREAM_PEERS_LINES.stop}"
  lines = ["| streaming | gamma 1 | gamma 4 | step temporaries (compiled), gamma 1 / 4 |", "|---|---|---|---|",
           *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in STREAM_LOST),
           f"| by matrix, updates over the gradients ({name}) | {cell(peers['7b-jax-grass-stream-g1'])} | "
           f"{cell(peers['7b-jax-grass-stream-g4'])} | {temps['none (55e9ee2)', 1]:.2f} / {temps['none (55e9ee2)', 4]:.2f} |",
           f"| plain offload (prefetch), same invocation, for the speed ratio | {cell(peers['7b-jax-grass-offload-g1'])} | | |",
           f"| **+ weights sliced at their turn, fetch waits for the state back (the default; transcribed: "
           f"`{STREAM_PROBE.split('results/')[1]}`)** | **{late['7b-jax-grass-stream-g1']['peak_gib']:.2f}**, "
           f"{late['7b-jax-grass-stream-g1']['tokens_per_s']:,} | **{late['7b-jax-grass-stream-g4']['peak_gib']:.2f}**, "
           f"{late['7b-jax-grass-stream-g4']['tokens_per_s']:,} | **{temps['barrier + wait stored', 1]:.2f}** / "
           f"**{temps['barrier + wait stored', 4]:.2f}** |",
           f"| plain offload (prefetch), same invocation (transcribed, same file) | "
           f"{late['7b-jax-grass-offload-g1']['peak_gib']:.2f}, {late['7b-jax-grass-offload-g1']['tokens_per_s']:,} | | |"]
  return "\n".join(lines)


def peers_speed_readme(_: Any = None) -> str:
  """Mean tokens/s after compilation and peak GiB; the better of each model's rows in bold."""
  lines = ["| model | setup | tokens/s | peak GiB |", "|---|---|---|---|"]
  for path, model, shown, invocation in PEERS_README:
    rows = _peers_rows(path, invocation)
    picked = [(rows[name], label) for name, label in shown]
    best_tps = max(r["mean_tokens_per_s"] for r, _ in picked)
    best_peak = min(r["peak_gib"] for r, _ in picked)
    for k, (r, label) in enumerate(picked):
      tps, peak = f"{r['mean_tokens_per_s']:,.0f}", f"{r['peak_gib']:.2f}"
      lines.append(f"| {model if k == 0 else ''} | {label} | {f'**{tps}**' if r['mean_tokens_per_s'] == best_tps else tps}"
                   f" | {f'**{peak}**' if r['peak_gib'] == best_peak else peak} |")
  return "\n".join(lines)


def _peers_rows(path: str, lines: slice = slice(None)) -> dict[str, dict]:
  """The rows of a peers file by name; ``lines``: the lines of one invocation where a file holds several."""
  rows = {}
  for line in (ROOT / path).read_text().splitlines()[lines]:
    r = json.loads(line)
    rows[r["name"]] = r  # the file's last row of a name is the current one
  return rows


def peers_docs_table(path: str, shown: list[tuple[str, str]], lines: slice = slice(None)) -> str:
  """One invocation's rows: mean and median step after compilation, the whole run, the peak; its card."""
  rows = _peers_rows(path, lines)
  out = ["| row | tokens/s, mean after compilation | median step | whole run | peak GiB |", "|---|---|---|---|---|"]
  for name, label in shown:
    r = rows[name]
    mean = f"{r['mean_tokens_per_s']:,.0f}" if r.get("mean_tokens_per_s") else "not recorded"
    out.append(f"| {label} (`{name}`) | {mean} | {r['tokens_per_s']:,.0f} | {r['run_tokens_per_s']:,.0f} | "
                 f"{r['peak_gib']:.2f} |")
  out.append(f"\n{_invocation_note(rows, shown, path, lines)}")
  return "\n".join(out)


def _invocation_note(rows: dict[str, dict], shown: list[tuple[str, str]], path: str, lines: slice) -> str:
  """The card(s), commit(s) and file (with the invocation's lines) of a table's rows."""
  devices = sorted({rows[name].get("device", "?") for name, _ in shown})
  commits = sorted({(rows[name].get("commit") or "not recorded")[:12] for name, _ in shown})
  part = "" if lines == slice(None) else f" (lines {lines.start + 1}-{lines.stop}: one invocation)"
  return f"{', '.join(devices)}; commit {', '.join(commits)}; `{path}`{part}."


def peers_profile_docs(path: str, shown: list[tuple[str, str]], lines: slice = slice(None)) -> str:
  """One invocation's ``--profile`` rows: GPU time per step by kernel class, busy (the union of kernel
  intervals), idle (the span's rest) and kernels per step."""
  rows = _peers_rows(path, lines)
  profiles = [(label, name, rows[name]["profile"]) for name, label in shown]
  classes = sorted({c for _, _, p in profiles for c in p["class_ms"]}, key=lambda c: -profiles[0][2]["class_ms"].get(c, 0))
  out = ["| row | step span | busy | idle | " + " | ".join(classes) + " | kernels per step |",
         "|---" * (len(classes) + 5) + "|"]
  for label, name, p in profiles:
    cells = [f"{p['class_ms'].get(c, 0):.1f}" for c in classes]
    out.append(f"| {label} (`{name}`) | {p['span_ms']:.1f} | {p['busy_ms']:.1f} | {p['span_ms'] - p['busy_ms']:.1f} | "
               + " | ".join(cells) + f" | {p['kernels_per_step']:,.0f} |")
  out.append(f"\nms per step; {_invocation_note(rows, shown, path, lines)}")
  return "\n".join(out)


# The docs' speed tables: (peers file, rows shown with their labels[, the lines of one invocation]).
PEERS_DOCS = {
    "peers_default_docs": ("benchmarks/results/peers/peers_h100.jsonl", [
        ("tiny-jax-default-modules", "TinyLlama: grass_jax, the defaults (LISA by modules)"),
        ("tiny-jax-default-layers", "TinyLlama: LISA by layers (`optim.granularity: layer`)"),
        ("tiny-torch-lisa-compile", "TinyLlama: PyTorch LISA, compiled, checkpointed")], slice(36, 40)),
    "peers_default_7b_docs": ("benchmarks/results/peers/peers_h100.jsonl", [
        ("7b-jax-default-modules", "7B: grass_jax, the defaults (LISA by modules)"),
        ("7b-jax-default-layers", "7B: LISA by layers (`optim.granularity: layer`)"),
        ("7b-torch-lisa-compile-g2", "7B: PyTorch LISA, compiled, checkpointed")], slice(33, 36)),
    "peers_default_h200_docs": (PEERS_H200, [
        ("tiny-jax-default", "TinyLlama: grass_jax, LISA by layers (the default until 2026-12-07)"),
        ("tiny-jax-default-modules", "TinyLlama: LISA by modules (the default since)"),
        ("tiny-torch-lisa-compile", "TinyLlama: PyTorch LISA, compiled, checkpointed"),
        ("7b-jax-default", "7B: grass_jax, LISA by layers (the default until 2026-12-07)"),
        ("7b-jax-default-modules", "7B: LISA by modules (the default since)"),
        ("7b-torch-lisa-compile-g2", "7B: PyTorch LISA, compiled, checkpointed")], slice(77, 83)),
    "peers_tiny_docs": (PEERS_H200, [
        ("tiny-jax-grass-offload-late-chunk2048-nomerge", "grass_jax GRASS + offload, `importance: grad`"),
        ("tiny-torch-lisa-compile-same-draws", "PyTorch LISA, compiled, checkpointed, same layers"),
        ("tiny-torch-lisa-compile-same-draws-no-ckpt", "PyTorch LISA, compiled, no checkpointing")], H200_TINY_SAME_DRAWS),
    "peers_7b_docs": (PEERS_H200, [
        ("7b-jax-grass-offload-late-g2-nomerge-bucket4", "grass_jax GRASS + offload, `model.backward_bucket: 4`"),
        ("7b-jax-grass-offload-late-g2-nomerge-unrolled", "grass_jax GRASS + offload, slot scan, unrolled forward"),
        ("7b-torch-lisa-compile-g2-same-draws", "PyTorch LISA, compiled, checkpointed, same layers")], H200_BUCKETS),
    "peers_importance_docs": (PEERS_H200, [
        ("tiny-torch-lisa-compile", "TinyLlama: PyTorch LISA, compiled"),
        ("tiny-jax-grass-offload-late-chunk2048", "TinyLlama: GRASS, `importance: grad`"),
        ("tiny-jax-grass-offload-late-sketch-chunk2048", "TinyLlama: GRASS, `importance: sketch`"),
        ("tiny-jax-grass-offload-late-sketch4-chunk2048", "TinyLlama: the same, `sketch_every: 4`"),
        ("7b-torch-lisa-compile-g2", "7B: PyTorch LISA, compiled"),
        ("7b-jax-grass-offload-late-g2", "7B: GRASS, `importance: grad`"),
        ("7b-jax-grass-offload-late-sketch-g2", "7B: GRASS, `importance: sketch`"),
        ("7b-jax-grass-offload-late-sketch4-g2", "7B: the same, `sketch_every: 4`")], slice(47, 55)),
    "peers_memory_docs": (PEERS_H200, [
        ("tiny-torch-lisa-compile", "PyTorch LISA, compiled, checkpointed"),
        ("tiny-jax-grass-offload-late-chunk2048-nomerge-prealloc", "grass_jax GRASS + offload, JAX's default preallocation"),
        ("tiny-jax-grass-offload-late-chunk2048-nomerge", "the same, preallocation off")], slice(16, 20)),
}


# The default's profile beside compiled LISA's (--profile 4), one invocation.
PEERS_PROFILE = ("benchmarks/results/peers/peers_h100.jsonl", [
    ("tiny-jax-default-modules", "grass_jax, the defaults (LISA by modules)"),
    ("tiny-jax-default-layers", "LISA by layers"),
    ("tiny-torch-lisa-compile", "PyTorch LISA, compiled, checkpointed")], slice(36, 40))
PEERS_PROFILE_7B = ("benchmarks/results/peers/peers_h100.jsonl", [
    ("7b-jax-default", "grass_jax, LISA by layers (the default until 2026-12-07)"),
    ("7b-torch-lisa-compile-g2", "PyTorch LISA, compiled, checkpointed")], slice(9, 11))


def sources() -> list[str]:
  """Every result file a table is made from."""
  return [PAIRED, PAIRED_TRACES, PAIRED_CHAT, PACKING, STUDY_750, STUDY_750_TRACES, STUDY_500, ORACLE, *SCALING.values(),
          STREAM_PEERS, STREAM_PROBE,
          *(path for path, _, _, _ in PEERS_README),
          *(spec[0] for spec in PEERS_DOCS.values()), PEERS_PROFILE[0], PEERS_PROFILE_7B[0],
          PAIRED_CHAT_GRID]


# name -> (result file, function making the markdown table from its JSON)
TABLES: dict[str, tuple[str | None, Callable[[Any], str]]] = {
    "paired_accuracy_readme": (PAIRED, paired_accuracy_readme),
    "paired_accuracy_docs": (PAIRED, paired_accuracy_docs),
    "paired_chat_docs": (PAIRED_CHAT, paired_chat_docs),
    "packing_docs": (PACKING, packing_docs),
    "peers_speed_readme": (None, peers_speed_readme),  # reads the peers files of PEERS_README
    "study_750_docs": (STUDY_750, study_docs),
    "study_750_goal_docs": (STUDY_750, study_goal_docs),
    "study_500_docs": (STUDY_500, lambda result: study_docs(result, with_cost=False)),
    "oracle_docs": (ORACLE, oracle_docs),
    "study_750_draws_docs": (STUDY_750_TRACES, study_750_draws_docs),
    "paired_draws_docs": (PAIRED_TRACES, paired_draws_docs),
    "scaling_docs": (None, scaling_docs),  # reads the files of SCALING
    "streaming_docs": (None, streaming_docs),  # reads STREAM_PEERS and STREAM_PROBE
    **{name: (None, lambda _, spec=spec: peers_docs_table(*spec)) for name, spec in PEERS_DOCS.items()},
    "peers_default_profile_docs": (None, lambda _: peers_profile_docs(*PEERS_PROFILE)),
    "peers_default_7b_profile_docs": (None, lambda _: peers_profile_docs(*PEERS_PROFILE_7B)),
    "paired_chat_grid_docs": (PAIRED_CHAT_GRID, paired_chat_grid_docs),
}
PAGES = ["README.md", "docs/accuracy.md", "docs/performance.md", "docs/multi-gpu.md", "docs/offloading.md",
         "docs/training.md"]
MARKER = re.compile(r"(<!-- report: (\w+) -->\n)(.*?)\n?(<!-- /report -->)", re.S)  # a new table's body is empty


def _load(path: Path) -> Any:
  """A result file: one JSON document, or a list of them, one per line (``.jsonl``)."""
  if path.suffix == ".jsonl":
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return json.loads(path.read_text())


def render(page: str) -> str:
  """The page with every marked table made again from its result file."""
  def table(m: re.Match) -> str:
    name = m.group(2)
    if name not in TABLES:
      raise KeyError(f"{page}: no table named {name!r} in benchmarks/report.py (known: {', '.join(TABLES)})")
    path, make = TABLES[name]
    return m.group(1) + make(None if path is None else _load(ROOT / path)) + "\n" + m.group(4)
  return MARKER.sub(table, (ROOT / page).read_text())


def differences() -> list[str]:
  """The pages whose committed tables differ from what the result files give, with the table's name."""
  out = []
  for page in PAGES:
    text = (ROOT / page).read_text()
    made = render(page)
    if made != text:
      names = [m.group(2) for m, n in zip(MARKER.finditer(text), MARKER.finditer(made)) if m.group(0) != n.group(0)]
      out.append(f"{page}: {', '.join(names) or 'tables'}")
  return out


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--check", action="store_true", help="change nothing; exit 1 where a table differs")
  args = ap.parse_args()
  if args.check:
    diff = differences()
    for d in diff:
      print(f"differs from its result file: {d} (run python benchmarks/report.py)")
    return 1 if diff else 0
  for page in PAGES:
    (ROOT / page).write_text(render(page))
  return 0


if __name__ == "__main__":
  sys.exit(main())
