"""What does a deterministic GPU run (``train.deterministic``) cost, and is it bitwise reproducible?

  python benchmarks/determinism.py --out benchmarks/results/determinism_h100.json [--steps 200]
  python benchmarks/determinism.py --out /tmp/d.json --config configs/tinyllama-1.1b-math.yaml \
      --random-init tinyllama-1.1b --set data.train=data/arith_train.jsonl   # TinyLlama's shapes, random weights

Runs ``configs/smollm2-135m-math.yaml`` (no evaluation, no export) through ``scripts/train.py`` for each
strategy with ``train.deterministic`` false and true, one run at a time, then the deterministic runs once
more; reports the median tokens/s of the logged steps after the first three, and whether the repeat's
logged losses are bitwise those of the first run. Needs a GPU (on a CPU both settings are the same run).
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


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_train_script_args(ap)
  ap.add_argument("--strategies", nargs="+", default=["lisa", "grass"])
  args = ap.parse_args()
  extra = train_script_overrides(args)
  import jax
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for strategy in args.strategies:
      for det in (False, True):
        runs = [run_train_script(args.config, args.steps, Path(tmp) / f"{strategy}-{det}-{i}",
                                 f"optim.strategy={strategy}", f"train.deterministic={str(det).lower()}", *extra)
                for i in range(2 if det else 1)]
        tokens_per_s, n = steady_tokens_per_s(runs[0])
        row = {"strategy": strategy, "deterministic": det, "steady_tokens_per_s_median": tokens_per_s, "n": n}
        if det:
          row["repeat_bitwise_equal"] = [l["loss"] for l in runs[0]] == [l["loss"] for l in runs[1]]
        rows.append(row)
        print(json.dumps(row), flush=True)
  Path(args.out).write_text(json.dumps({**provenance(jax.devices()[0].device_kind), "config": args.config,
                                        "overrides": extra, "steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
  main()
