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
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def random_init_overrides(size: str) -> list[str]:
  """Overrides that replace a config's checkpoint by random weights of a benchmark size (no hub here)."""
  from benchmarks.common import SIZES
  return ["model.path=null", f"model.random_init={json.dumps(SIZES[size])}", "model.tokenizer=bytes"]


def train(config: str, steps: int, out: Path, *overrides: str) -> list[dict]:
  cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--no-progress", "--config", config,
         f"train.max_steps={steps}", "train.log_every=10", "eval.tasks=[]", "train.export=false",
         "train.compilation_cache=false", f"train.output_dir={out}", *overrides]
  subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
  return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="configs/smollm2-135m-math.yaml")
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--strategies", nargs="+", default=["lisa", "grass"])
  ap.add_argument("--random-init", metavar="SIZE", help="random weights of a benchmarks.common.SIZES entry")
  ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
  ap.add_argument("--out", required=True)
  args = ap.parse_args()
  extra = [*(random_init_overrides(args.random_init) if args.random_init else []), *args.set]
  import jax
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for strategy in args.strategies:
      for det in (False, True):
        runs = [train(args.config, args.steps, Path(tmp) / f"{strategy}-{det}-{i}", f"optim.strategy={strategy}",
                      f"train.deterministic={str(det).lower()}", *extra) for i in range(2 if det else 1)]
        tps = [l["tokens_per_s"] for l in runs[0] if "tokens_per_s" in l][3:]
        row = {"strategy": strategy, "deterministic": det, "steady_tokens_per_s_median": statistics.median(tps),
               "n": len(tps)}
        if det:
          row["repeat_bitwise_equal"] = [l["loss"] for l in runs[0]] == [l["loss"] for l in runs[1]]
        rows.append(row)
        print(json.dumps(row), flush=True)
  from benchmarks.common import provenance
  Path(args.out).write_text(json.dumps({**provenance(jax.devices()[0].device_kind), "config": args.config,
                                        "overrides": extra, "steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
  main()
