"""How long one bucket of the bucketed backward pass takes to compile, alone (no other compilation).

The peers rows compile every bucket in parallel threads (``bucket_compile: ahead``) and took 146 s for
8 buckets and for 4; this compiles the Llama-2-7B train step (b2 x 512, frozen embeddings, GRASS
gamma 2, offloaded states) from shapes, one executable at a time: the slot scan (unrolled forward),
then the buckets named on the command line. Prints one line per executable and writes JSON.

  python benchmarks/probes/bucket_compile_time.py --starts 24 0 --out /tmp/compile.json
  python benchmarks/probes/bucket_compile_time.py --starts 0 8 16 24 --workers 2 --out /tmp/w2.json

``--workers N``: the buckets only, all at once in N threads (as ``CompiledStep`` compiles them ahead),
one JSON row with the wall time. Run each setting in its own process (JAX caches compilations in
memory).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--starts", type=int, nargs="+", default=[24, 0])
  ap.add_argument("--out", type=Path, required=True)
  ap.add_argument("--workers", type=int, default=0, help="compile the buckets in N threads at once (0: one by one)")
  args = ap.parse_args()
  import jax
  import jax.numpy as jnp

  from benchmarks.common import spec_config
  from grass_jax.assembly import assemble
  # The peers benchmark's 7B GRASS row with the unrolled forward pass, built as the Trainer builds a run.
  parts = assemble(spec_config(dict(size="llama2-7b", strategy="grass", num_active=2, period=20, offload=True,
                                    always_on=False, attention="cudnn", unroll_forward=True, batch=2)),
                   total_steps=1000)
  params, state = parts.param_shapes, parts.state_shapes
  batch = {k: jax.ShapeDtypeStruct((1, 2, 512), jnp.int32) for k in ("tokens", "attention_mask", "loss_mask")}
  step = parts.step.step  # the jitted step: lowered and compiled here, one backward start at a time
  if args.workers:
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.workers) as pool:
      list(pool.map(lambda s: step.lower(params, state, batch, s).compile(), args.starts))
    row = {"backward_starts": args.starts, "workers": args.workers, "wall_s": time.perf_counter() - t0,
           "device": jax.devices()[0].device_kind}
    print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps([row], indent=1))
    return
  rows = []
  for start in [None, *args.starts]:
    t0 = time.perf_counter()
    lowered = step.lower(params, state, batch, *(() if start is None else (start,)))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    row = {"backward_start": start, "lower_s": t1 - t0, "compile_s": t2 - t1,
           "temp_gib": getattr(mem, "temp_size_in_bytes", 0) / 2**30, "device": jax.devices()[0].device_kind}
    rows.append(row)
    print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()
