"""The paper-style figure from three named H100 result files (``FILES``): memory and throughput per
method, memory per extra active layer, memory against sequence length.

  python benchmarks/plot.py [--results benchmarks/results] [--out benchmarks/results/figure_h100.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

GiB = 2**30
# The figure's files, all measured on one H100 (a file added to the folder changes nothing here).
FILES = ["memory_throughput_tinyllama.json", "sweep/sweep_h100.jsonl"]
FINAL = slice(17, 30)  # sweep_h100.jsonl's lines of the last side-by-side run (cuDNN attention, current slot scan)


def load_rows(results: Path) -> list[dict[str, Any]]:
  """The measured rows of ``FILES`` under ``results`` ({"rows": [...]} JSON or JSONL), tagged with their file
  (and ``final``: one of the sweep's ``FINAL`` lines)."""
  rows = []
  for name in FILES:
    f = results / name
    if f.suffix == ".json":
      data = json.loads(f.read_text())
      rows += [{**r, "file": f.name} for r in data["rows"] if "size" in r]
    else:
      lines = [l for l in f.read_text().splitlines() if l.strip()]
      rows += [{**json.loads(l), "file": f.name, "final": FINAL.start <= i < FINAL.stop} for i, l in enumerate(lines)]
  return [r for r in rows if "size" in r and "error" not in r and r.get("tokens_per_s")]


def pick(rows: list[dict], **match: Any) -> dict | None:
  """The last row whose fields equal ``match`` (None: absent)."""
  found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
  return found[-1] if found else None


def method_rows(rows: list[dict]) -> dict[str, list[tuple[str, dict]]]:
  """Per model, (label, row) for full FT, LISA, GRASS and GRASS + offload at gamma 2, seq 512."""
  out: dict[str, list[tuple[str, dict]]] = {}
  specs: list[tuple[str, str, Callable[[dict], bool]]] = [
      ("full FT", "full", lambda r: r.get("strategy") == "full"),
      ("LISA", "lisa", lambda r: r.get("strategy") == "lisa"),
      ("GRASS", "grass", lambda r: r.get("strategy") == "grass" and not r.get("offload")),
      ("GRASS+offload", "grass+offload", lambda r: r.get("strategy") == "grass" and r.get("offload")),
  ]
  for size in ("tinyllama-1.1b", "gemma-2b", "llama2-7b"):
    for label, _, ok in specs:
      cands = [r for r in rows if r["size"] == size and r.get("seq") == 512 and ok(r) and r.get("always_on", True)
               and r.get("num_active") in (0, 2, None) and r.get("period") in (1, 50) and r.get("frozen_grads", "cond") == "cond"
               and r.get("attention") in (None, "einsum") and r.get("remat") in (None, "full") and not r.get("profile")]
      if cands:  # the first file in name order: the side-by-side memory_throughput runs come first
        out.setdefault(size, []).append((label, cands[0]))
  # TinyLlama: the final side-by-side run (cuDNN attention, current slot scan) replaces the older rows.
  final = {r["name"]: r for r in rows if r.get("final")}
  names = [("full FT", "cudnn-full"), ("LISA", "cudnn-lisa"), ("GRASS", "cudnn-grass"),
           ("GRASS+offload", "cudnn-grass-offload")]
  if all(n in final for _, n in names):
    out["tinyllama-1.1b"] = [(label, final[n]) for label, n in names]
  return out



def main() -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--results", default="benchmarks/results")
  ap.add_argument("--out", default="benchmarks/results/figure_h100.png")
  args = ap.parse_args()
  rows = load_rows(Path(args.results))
  per_model = method_rows(rows)
  fig, ax = plt.subplots(2, 2, figsize=(12, 8.5))
  colors = {"full FT": "tab:gray", "LISA": "tab:orange", "GRASS": "tab:blue", "GRASS+offload": "tab:green"}
  width = 0.2
  for i, (size, items) in enumerate(per_model.items()):
    for j, (label, r) in enumerate(items):
      x = i + (j - 1.5) * width
      ax[0, 0].bar(x, r["peak_bytes"] / GiB, width, color=colors[label], label=label if i == 0 else None)
      ax[0, 1].bar(x, r["tokens_per_s"] / 1e3, width, color=colors[label], label=label if i == 0 else None)
  for a, title in ((ax[0, 0], "peak device memory (GiB)"), (ax[0, 1], "throughput (k tokens/s)")):
    a.set_xticks(range(len(per_model)), [f"{s}\n(batch {items[0][1]['batch']})" for s, items in per_model.items()])
    a.set_title(title)
    a.legend(fontsize=8)
  sweep = [r for r in rows if r.get("file", "").startswith("sweep")]
  series = [("tinyllama-1.1b (batch 16, einsum)", "o-",
             lambda r: r["size"] == "tinyllama-1.1b" and r["name"].startswith("gamma") and r.get("offload")),
            ("llama2-7b (batch 2) offload", "s-",
             lambda r: r.get("final") and r["name"].startswith("7b-gamma") and "-offload-" in r["name"]),
            ("llama2-7b (batch 2) offload + stream", "^-",
             lambda r: r.get("final") and r["name"].startswith("7b-gamma") and "-stream-" in r["name"])]
  for label, style, ok in series:
    pts = sorted((r["num_active"], r["peak_bytes"] / GiB) for r in sweep if ok(r))
    if pts:
      ax[1, 0].plot(*zip(*pts), style, label=label)
  ax[1, 0].set_xlabel("active layers (gamma)")
  ax[1, 0].axhline(12.55, color="gray", ls=":", lw=1)
  ax[1, 0].text(1, 12.75, "7B bf16 weights", fontsize=7, color="gray")
  ax[1, 0].set_title("GRASS + offload: peak memory vs active layers (GiB)")
  ax[1, 0].legend(fontsize=8)
  for label, pred in (("GRASS+offload", lambda r: r.get("offload")), ("full FT", lambda r: r.get("strategy") == "full")):
    pts = sorted((r["seq"], r["peak_bytes"] / GiB) for r in sweep + [r for r in rows if r.get("file") == "memory_throughput_tinyllama.json"]
                 if r["size"] == "tinyllama-1.1b" and pred(r) and r.get("batch", 0) * r["seq"] == 8192
                 and r.get("num_active", 2) in (0, 2) and r.get("attention", "einsum") == "einsum")
    if pts:
      ax[1, 1].plot(*zip(*sorted(dict(pts).items())), "o-", label=label, color=colors[label])
  ax[1, 1].set_xscale("log", base=2)
  ax[1, 1].set_xlabel("sequence length (8192 tokens per batch)")
  ax[1, 1].set_title("TinyLlama: peak memory vs sequence length (GiB)")
  ax[1, 1].legend(fontsize=8)
  fig.suptitle("grass_jax on one H100 80GB (bf16, remat full, gamma 2 unless shown; TinyLlama bars: cuDNN attention)")
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
