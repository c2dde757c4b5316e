"""Host offloading of optimizer state: memory and step time, offload on vs off vs full fine-tuning.

  python benchmarks/offload.py [--sizes tinyllama-1.1b llama2-7b] [--out benchmarks/results/offload.json]

Each row runs in a fresh process (peak memory); ratios are taken within one invocation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import run_isolated  # noqa: E402

COPY_GBPS = 53.0


def gib(nbytes):
  return None if nbytes is None else nbytes / 2**30  # measured pinned host<->device rate on the lent H100 (DESIGN.md)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--sizes", nargs="+", default=["tinyllama-1.1b", "llama2-7b"])
  ap.add_argument("--batch", type=int, nargs="+", default=[16, 8], help="batch per size, same order")
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--steps", type=int, default=60)
  ap.add_argument("--num-active", type=int, default=2)
  ap.add_argument("--periods", type=int, nargs="+", default=[1, 50])
  ap.add_argument("--no-full", action="store_true", help="skip the full fine-tuning row")
  ap.add_argument("--append", action="store_true", help="add to the rows already in --out (split long runs)")
  ap.add_argument("--out", default="benchmarks/results/offload.json")
  args = ap.parse_args()
  out = Path(args.out)
  rows = json.loads(out.read_text())["rows"] if args.append and out.exists() else []
  for size, batch in zip(args.sizes, args.batch):
    base = dict(size=size, batch=batch, seq=args.seq, num_active=args.num_active, steps=args.steps)
    specs = [] if args.no_full else [dict(base, strategy="full", period=1, offload=False)]
    for period in args.periods:
      for offload in (False, True):
        specs.append(dict(base, strategy="grass", period=period, offload=offload))
    for spec in specs:
      r = run_isolated(spec)
      rows.append(r)
      print(json.dumps({k: r.get(k) for k in ("size", "strategy", "period", "offload", "step_s", "peak_bytes",
                                               "opt_state_device_bytes", "error")}), flush=True)
  summary = []
  for size in sorted({r["size"] for r in rows}):
    by = {(r["strategy"], r["period"], r["offload"]): r for r in rows if r["size"] == size}
    for period in (1, 50):
      on, off = by.get(("grass", period, True)), by.get(("grass", period, False))
      if not on or not off or "error" in on or "error" in off:
        continue
      moved = 2 * on["num_active"] * on["layer_state_bytes"]  # worst case: every slot swaps, both ways
      copy_s = moved / (COPY_GBPS * 1e9)
      extra = on["step_s"] - off["step_s"]
      summary.append({
          "size": size, "period": period,
          "throughput_ratio_offload_vs_device": off["step_s"] / on["step_s"],
          "peak_gib_offload": gib(on.get("peak_bytes")), "peak_gib_device": gib(off.get("peak_bytes")),
          "peak_gib_full": gib(by.get(("full", 1, False), {}).get("peak_bytes")),
          "opt_state_device_gib_offload": on["opt_state_device_bytes"] / 2**30,
          "opt_state_device_gib_device": off["opt_state_device_bytes"] / 2**30,
          "bytes_per_switch_worst": moved, "copy_s_at_53GBps": copy_s,
          "switch_every_steps": period, "extra_s_per_step": extra,
          "hidden_fraction_of_copy": 1 - max(extra, 0) * period / copy_s if copy_s else None,
      })
  print(f"\n{'size':<16}{'K':>4}{'thru on/off':>12}{'peak on':>9}{'peak off':>9}{'peak full':>10}"
        f"{'opt dev on':>11}{'opt dev off':>12}{'copy ms':>8}{'hidden':>7}")
  for s in summary:
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"
    print(f"{s['size']:<16}{s['period']:>4}{s['throughput_ratio_offload_vs_device']:>12.3f}"
          f"{fmt(s['peak_gib_offload']):>9}{fmt(s['peak_gib_device']):>9}{fmt(s['peak_gib_full']):>10}"
          f"{s['opt_state_device_gib_offload']:>11.2f}{s['opt_state_device_gib_device']:>12.2f}"
          f"{1e3 * s['copy_s_at_53GBps']:>8.1f}{s['hidden_fraction_of_copy'] or 0:>7.2f}")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))


if __name__ == "__main__":
  main()
