"""The issue-7 sweep in one go: gamma, sequence length, model size, attention kernel, a profile.

  python benchmarks/perf_sweep.py --out-dir benchmarks/results/sweep [--deadline-s 480] [--only NAME ...]

Runs a fixed, prioritised list of configurations (see PLAN), each in a fresh process
(benchmarks/common.py), appending every result to ``sweep.jsonl`` as it lands so a run cut
short keeps what it measured. ``--deadline-s`` stops starting new rows after that many seconds.
Plot with ``python benchmarks/plot.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import run_isolated  # noqa: E402

TINY = dict(size="tinyllama-1.1b", batch=16, seq=512, steps=10, remat="full", attention="einsum")
GRASS = dict(strategy="grass", period=50, num_active=2)
OFFLOAD = dict(GRASS, offload=True)

# (name, spec) in priority order: what the targets need first.
PLAN: list[tuple[str, dict]] = [
    ("profile-grass", dict(TINY, **GRASS, profile_dir="/tmp/grass_profile")),
    ("profile-full", dict(TINY, strategy="full", period=1, num_active=0, profile_dir="/tmp/full_profile")),
    ("cudnn-full", dict(TINY, strategy="full", period=1, num_active=0, attention="cudnn")),
    ("cudnn-grass", dict(TINY, **GRASS, attention="cudnn")),
    ("cudnn-lisa", dict(TINY, **dict(GRASS, strategy="lisa"), attention="cudnn")),
    ("profile-grass-cudnn", dict(TINY, **GRASS, attention="cudnn", profile_dir="/tmp/grass_cudnn_profile")),
    ("profile-full-cudnn", dict(TINY, strategy="full", period=1, num_active=0, attention="cudnn",
                                profile_dir="/tmp/full_cudnn_profile")),
    *[(f"gamma{g}-offload", dict(TINY, **dict(OFFLOAD, num_active=g))) for g in (1, 4, 8)],
    ("gamma2-offload", dict(TINY, **OFFLOAD)),
    *[(f"seq{t}-offload", dict(TINY, **OFFLOAD, seq=t, batch=16 * 512 // t)) for t in (256, 1024, 2048)],
    ("seq1024-full", dict(TINY, strategy="full", period=1, num_active=0, seq=1024, batch=8)),
    ("gemma-full", dict(TINY, size="gemma-2b", batch=8, strategy="full", period=1, num_active=0)),
    ("gemma-offload", dict(TINY, size="gemma-2b", batch=8, **OFFLOAD)),
    ("7b-gamma1-offload-b2-no-always-on", dict(TINY, size="llama2-7b", batch=2, **dict(OFFLOAD, num_active=1),
                                               always_on=False)),
    ("7b-gamma2-offload-b2-no-always-on", dict(TINY, size="llama2-7b", batch=2, **OFFLOAD, always_on=False)),
    ("7b-gamma4-offload-b2-no-always-on", dict(TINY, size="llama2-7b", batch=2, **dict(OFFLOAD, num_active=4),
                                               always_on=False)),
    ("7b-gamma2-offload-b2", dict(TINY, size="llama2-7b", batch=2, **OFFLOAD)),
    # Active layers' states streamed from the host for their update (optim.stream_active_states).
    *[(f"7b-gamma{g}-stream-b2-no-always-on", dict(TINY, size="llama2-7b", batch=2, **dict(OFFLOAD, num_active=g),
                                                  stream=True, always_on=False)) for g in (1, 2, 4)],
    ("7b-gamma2-stream-b8-no-always-on", dict(TINY, size="llama2-7b", batch=8, **OFFLOAD, stream=True,
                                              always_on=False)),
    ("7b-gamma2-offload-b8-no-always-on", dict(TINY, size="llama2-7b", batch=8, **OFFLOAD, always_on=False)),
    ("cudnn-grass-stream", dict(TINY, **OFFLOAD, stream=True, attention="cudnn")),
    ("cudnn-grass-offload", dict(TINY, **OFFLOAD, attention="cudnn")),
    ("cudnn-grass-no-always-on", dict(TINY, **GRASS, attention="cudnn", always_on=False)),
    # The cost of sketched importance (every layer's gradient norm at every step), k projections per map.
    *[(f"cudnn-grass-sketch{k}", dict(TINY, **GRASS, attention="cudnn", measure="sketch", sketch_size=k))
      for k in (1, 4, 16)],
    *[(f"7b-gamma2-offload-b2-no-always-on-sketch{k}", dict(TINY, size="llama2-7b", batch=2, **OFFLOAD,
                                                           always_on=False, measure="sketch", sketch_size=k))
      for k in (1, 4, 16)],
    # A probing step (every layer's exact gradient norm, nothing updated): every step probes here.
    ("cudnn-grass-probing", dict(TINY, **GRASS, attention="cudnn", measure="exact", probe_steps=1000)),
    # Without rematerialisation (frozen layers keep their input-gradient residuals; weights not copied).
    *[(f"cudnn-{m}-remat-{r}", dict(TINY, **(GRASS if m == "grass" else dict(strategy="full", period=1, num_active=0)),
                                    attention="cudnn", remat=r))
      for r in ("none", "dots") for m in ("grass", "full")],
]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out-dir", default="benchmarks/results/sweep")
  ap.add_argument("--deadline-s", type=float, default=None)
  ap.add_argument("--only", nargs="+", help="run only these PLAN names")
  args = ap.parse_args()
  out = Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  for name, spec in PLAN:
    if args.only and name not in args.only:
      continue
    if args.deadline_s is not None and time.perf_counter() - t0 > args.deadline_s:
      print(f"deadline reached; not run: {name}", flush=True)
      continue
    r = {"name": name, **run_isolated(spec, timeout=240)}
    with (out / "sweep.jsonl").open("a") as f:
      f.write(json.dumps(r) + "\n")
    if "error" in r:
      print(f"{name:<36} {r['error']}", flush=True)
      continue
    prof = r.get("profile") or {}
    print(f"{name:<36} {r['tokens_per_s']:>8.0f} tok/s {(r['peak_bytes'] or 0) / 2**30:>6.2f} GiB "
          f"MFU {r['mfu']:.2f} compile {r['compile_s']:.0f}s opt-dev {r['opt_state_device_bytes'] / 2**30:.2f} GiB"
          + (f" busy {prof.get('busy_ms', 0):.0f}/{prof.get('span_ms', 0):.0f} ms {prof.get('class_ms')}" if prof else ""),
          flush=True)


if __name__ == "__main__":
  main()
