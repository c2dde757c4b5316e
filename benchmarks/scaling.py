"""Data-parallel scaling: tokens/s of GRASS on 1 and N GPUs of one host (same per-GPU batch).

  python benchmarks/scaling.py [--size tinyllama-1.1b --per-device-batch 16 --devices 1 2]
                               [--out benchmarks/results/scaling.json]

Needs N visible GPUs (the lent nvidia-h200-x2 for N=2). Each row is a fresh process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import run_isolated  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", default="tinyllama-1.1b")
  ap.add_argument("--per-device-batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--devices", type=int, nargs="+", default=[1, 2])
  ap.add_argument("--fsdp", type=int, default=1)
  ap.add_argument("--offload", action="store_true")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--out", default="benchmarks/results/scaling.json")
  args = ap.parse_args()
  rows = []
  for n in args.devices:
    spec = dict(size=args.size, strategy="grass", num_active=2, period=50, batch=args.per_device_batch * n,
                seq=args.seq, steps=args.steps, devices=max(n // args.fsdp, 1), fsdp=min(args.fsdp, n),
                offload=args.offload)
    r = run_isolated(spec)
    rows.append(r)
    print(f"{n} device(s): " + (r["error"] if "error" in r else f"{r['tokens_per_s']:.0f} tokens/s, "
                                f"peak {(r['peak_bytes'] or 0) / 2**30:.1f} GiB on device 0"), flush=True)
  ok = [r for r in rows if "error" not in r]
  summary = {}
  if len(ok) >= 2:
    base = ok[0]
    summary = {f"speedup_{r['devices'] * r.get('fsdp', 1)}_vs_{base['devices'] * base.get('fsdp', 1)}":
               r["tokens_per_s"] / base["tokens_per_s"] for r in ok[1:]}
    print(summary)
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))


if __name__ == "__main__":
  main()
