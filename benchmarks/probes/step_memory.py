"""Compiled memory of the GRASS train step, variant by variant, without running it.

  python benchmarks/probes/step_memory.py --size tinyllama-1.1b --batch 16 --seq 512 \\
      --variants whole chunk2048 chunk2048-frozen-head chunk2048-unrolled \\
      [--json benchmarks/results/probes/step_memory_h200.json] [--buffers DIR]

Builds the peers benchmark's GRASS + offload row (gamma 2, bf16 weights and moments, full remat, the
late swap) with ``grass_jax.assembly.assemble``, as the Trainer builds a run, compiles its step from
abstract inputs on the default backend, and prints XLA's
``memory_analysis()``: arguments (weights, device-resident optimizer state, batch), outputs, and
the temporaries the step needs on top (``temp``). A variant changes one thing:

* ``whole`` / ``chunkN``: the loss over all tokens at once, or N tokens at a time;
* ``-frozen-head``: embeddings and head frozen (no always-on optimizer step, no head gradient);
* ``-unrolled``: the forward pass over static slices of the stack (``model.unroll_forward``);
* ``-stream``: the active layers' optimizer states in host memory, streamed one weight matrix at a time
  (``optim.stream_active_states``).

The differences in ``temp`` say what the loss and the always-on group cost. On a CPU
the attention is einsum (its scores add to ``temp``); run it on the GPU for cuDNN's numbers.

``--buffers DIR`` also writes, per variant, XLA's buffer assignment of the compiled step and its
memory-usage report (which values share which allocation), gzipped, as
``DIR/<size>_<variant>_{buffer-assignment,memory-usage-report}.txt.gz``: what the temporaries hold.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Compile-only: without this a probe beside a running study takes 75% of the GPU (2026-12-01: it did, and a study
# run died out of memory).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def measure(model: dict, batch: int, seq: int, gamma: int, variant: str) -> dict:
  """XLA's ``memory_analysis()`` of the train step ``variant`` describes (module docstring), compiled from shapes."""
  import jax
  import jax.numpy as jnp

  from benchmarks.common import spec_config
  from grass_jax.assembly import assemble

  base = variant.split("-")[0]
  if not (base == "whole" or (base.startswith("chunk") and base[len("chunk"):].isdigit())):
    raise SystemExit(f"unknown variant {variant!r}: it starts with whole or chunkN (e.g. chunk2048-frozen-head)")
  attention = "cudnn" if jax.default_backend() == "gpu" else "einsum"
  # The peers benchmark's GRASS + offload row, built as the Trainer builds a run (grass_jax.assembly).
  parts = assemble(spec_config(dict(
      model=model, strategy="grass", num_active=gamma, period=20, offload=True,
      always_on="frozen-head" not in variant, attention=attention,
      loss_chunk=int(base[len("chunk"):]) if base.startswith("chunk") else 0,
      unroll_forward="-unrolled" in variant, stream="-stream" in variant, batch=batch)), total_steps=1000)
  tokens = jax.ShapeDtypeStruct((1, batch, seq), jnp.int32)
  batch_shapes = {"tokens": tokens, "attention_mask": tokens, "loss_mask": tokens}
  compiled = parts.step.step.lower(parts.param_shapes, parts.state_shapes, batch_shapes).compile()
  mem = compiled.memory_analysis()
  # Nothing is on the device here, so the peak so far is what compiling itself allocated (autotuning
  # runs candidate kernels on buffers the size of their operands). None on a CPU.
  stats = jax.devices()[0].memory_stats() or {}
  return {"variant": variant, "backend": jax.default_backend(), "attention": attention,
          "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
          "alias_bytes": mem.alias_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
          "compile_peak_bytes": stats.get("peak_bytes_in_use")}


def jax_device_kind() -> str:
  import jax
  return jax.devices()[0].device_kind


def row_key(row: dict) -> tuple:
  return row.get("size"), row["variant"], row.get("xla_flags", "")


def write_rows(path: Path, rows: list[dict]) -> None:
  """Merges ``rows`` into the card's result file: each replaces the kept row of the same :func:`row_key`."""
  new = {row_key(r) for r in rows}
  kept = [r for r in (json.loads(path.read_text()) if path.exists() else []) if row_key(r) not in new]
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(kept + rows, indent=2) + "\n")


def _keep_buffer_reports(new_files: list[Path], out: Path, name: str) -> None:
  """Gzips the compiled step's buffer assignment and memory-usage report from an XLA dump into ``out``."""
  out.mkdir(parents=True, exist_ok=True)
  for kind in ("buffer-assignment", "memory-usage-report"):
    found = [f for f in new_files if f.name.endswith(f"after_optimizations-{kind}.txt")]
    if not found:
      raise RuntimeError(f"XLA wrote no {kind} for {name}: was JAX started before --buffers set XLA_FLAGS?")
    with found[-1].open("rb") as src, gzip.open(out / f"{name}_{kind}.txt.gz", "wb") as dst:
      shutil.copyfileobj(src, dst)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", default="tinyllama-1.1b", help="a model of benchmarks/common.py SIZES")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--gamma", type=int, default=2)
  ap.add_argument("--variants", nargs="+", default=["whole", "chunk2048", "chunk2048-frozen-head"])
  ap.add_argument("--json", default=None,
                  help="also write the rows into this file, the card's one file (e.g. "
                       "benchmarks/results/probes/step_memory_h200.json): a row replaces the one of the same "
                       "size, variant and XLA flags, the others stay")
  ap.add_argument("--buffers", type=Path, metavar="DIR", help="also write each variant's buffer assignment here")
  args = ap.parse_args()
  dump = None
  if args.buffers:  # XLA reads its flags once, when JAX starts its backend: set them before anything runs
    dump = Path(tempfile.mkdtemp(prefix="step_memory_dump_"))
    os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump} "
                               "--xla_dump_hlo_module_re=jit_step").strip()
  from benchmarks.common import SIZES
  rows = []
  for variant in args.variants:
    before = set(dump.iterdir()) if dump else set()
    r = measure(SIZES[args.size], args.batch, args.seq, args.gamma, variant)
    r.update(size=args.size, xla_flags=os.environ.get("XLA_FLAGS", ""), device=jax_device_kind())
    rows.append(r)
    if dump:
      _keep_buffer_reports(sorted(set(dump.iterdir()) - before), args.buffers, f"{args.size}_{variant}")
    gib = {k: r[k] / 2**30 for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes")}
    print(f"{variant:26s} arguments {gib['argument_bytes']:6.2f} GiB  outputs {gib['output_bytes']:6.2f}  "
          f"aliased {gib['alias_bytes']:6.2f}  temp {gib['temp_bytes']:6.2f}  ({r['backend']}, {r['attention']})"
          + (f"  compiling peaked at {r['compile_peak_bytes'] / 2**30:.2f} GiB" if r["compile_peak_bytes"] else ""),
          flush=True)
  if args.json:
    write_rows(Path(args.json), rows)
  if dump:
    shutil.rmtree(dump, ignore_errors=True)


if __name__ == "__main__":
  main()
