"""Memory and throughput of full fine-tuning, LISA, GRASS and GRASS + offload, side by side.

  python benchmarks/memory_throughput.py [--sizes tinyllama-1.1b llama2-7b] [--out benchmarks/results/memory_throughput.json]

Each row runs in a fresh process (peak memory); MFU counts only the FLOPs a step must do
(no rematerialisation, no weight gradients of frozen layers) against 798 TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import run_isolated  # noqa: E402

METHODS = {
    "full": dict(strategy="full", period=1),
    "lisa": dict(strategy="lisa", period=50),
    # (A "grass-select" row, dW computed for every layer and dropped, ran until that path was removed on 2026-12-07.)
    "grass": dict(strategy="grass", period=50),
    "grass+offload": dict(strategy="grass", period=50, offload=True),
}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--sizes", nargs="+", default=["tinyllama-1.1b", "llama2-7b"])
  ap.add_argument("--batch", type=int, nargs="+", default=[16, 8], help="batch per size, same order")
  ap.add_argument("--methods", nargs="+", default=list(METHODS))
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--num-active", type=int, nargs="+", default=[2])
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--remat", default="full", choices=["full", "dots", "none"])
  ap.add_argument("--attention", default="auto", choices=["auto", "einsum", "xla", "cudnn"])
  ap.add_argument("--append", action="store_true")
  ap.add_argument("--out", default="benchmarks/results/memory_throughput.json")
  args = ap.parse_args()
  out = Path(args.out)
  rows = json.loads(out.read_text())["rows"] if args.append and out.exists() else []
  for size, batch in zip(args.sizes, args.batch):
    for method in args.methods:
      for gamma in ([None] if method == "full" else args.num_active):
        spec = dict(size=size, batch=batch, seq=args.seq, steps=args.steps, num_active=gamma or 0,
                    method=method, remat=args.remat, attention=args.attention, **METHODS[method])
        r = run_isolated(spec)
        rows.append(r)
        if "error" in r:
          print(f"{size:<16}{method:<15}{gamma or 'all':>5}  {r['error']}", flush=True)
        else:
          peak = (r["peak_bytes"] or 0) / 2**30
          print(f"{size:<16}{method:<15}{gamma or 'all':>5} remat={args.remat} attn={args.attention} {r['tokens_per_s']:>9.0f} tok/s  "
                f"{peak:>6.1f} GiB peak  MFU {r['mfu']:.2f}  compile {r['compile_s']:.0f}s",
                flush=True)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
  main()
