"""Probe: do host-to-device and device-to-host copies inside one jitted program run side by side?

  python benchmarks/probes/copy_directions.py [--mib 400] [--json OUT]

The streamed optimizer step (``optim.stream_active_states``) spent 15.0 ms copying moments to the
device and 15.7 ms copying them back per 7B step, one after the other (2026-12-03 profile). This times,
in one process, programs that copy ``--mib`` MiB of bf16 each way: only in, only out, both
(independent of each other), both beside a chain of matmuls, and in-and-out split into 8 pieces with
the double-buffered barriers streaming uses. If "both" takes about the sum of "in" and "out", XLA puts
the two directions on one stream (or orders them). Each variant of XLA flags runs in its own process
(XLA reads flags once): ``--flags NAME=...`` adds one.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

VARIANTS = {
    "default": "",
    "pipelined": "--xla_gpu_enable_pipelined_host_offloading=true",
}


def _time(fn, *args, reps: int = 10) -> float:
  import jax
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t)
  return sorted(ts)[len(ts) // 2] * 1e3


def measure(mib: int, dim: int) -> dict[str, float]:
  """Median ms of each program on the default device."""
  import jax
  import jax.numpy as jnp
  dev = jax.devices()[0]
  on_host = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
  on_dev = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
  n = mib * 2**20 // 2
  h = jax.device_put(jnp.ones((n,), jnp.bfloat16), on_host)
  d = jnp.ones((n,), jnp.bfloat16) * 2
  a = jnp.ones((dim, dim), jnp.bfloat16)

  def chain(a):
    return (a @ a @ a @ a @ a @ a).sum()

  h2d = jax.jit(lambda h: jax.device_put(h, on_dev) * 1)
  d2h = jax.jit(lambda d: jax.device_put(d * 1, on_host))
  both = jax.jit(lambda h, d: (jax.device_put(h, on_dev) * 1, jax.device_put(d * 1, on_host)))
  both_mm = jax.jit(lambda h, d, a: (jax.device_put(h, on_dev) * 1, jax.device_put(d * 1, on_host), chain(a)))
  mm = jax.jit(chain)

  pieces = [jax.device_put(jnp.full((n // 8,), i, jnp.bfloat16), on_host) for i in range(8)]

  def streamed(pieces, lookahead=2, wait_stored=False):
    # One piece at a time as the streamed update does: piece i comes in once piece i-lookahead is updated
    # (and, with wait_stored, once its update is back on the host).
    outs, done = [], []
    for i, piece in enumerate(pieces):
      if i >= lookahead:
        after = (done[i - lookahead], outs[i - lookahead]) if wait_stored else done[i - lookahead]
        piece, _ = jax.lax.optimization_barrier((piece, after))
      new = jax.device_put(piece, on_dev) * 1.5
      done.append(new)
      outs.append(jax.device_put(new, on_host))
    return outs
  stream = {f"streamed_8_pieces_lookahead{k}{'_wait_stored' if wait else ''}_ms":
            jax.jit(functools.partial(streamed, lookahead=k, wait_stored=wait))
            for k in (1, 2, 4, 8) for wait in (False, True) if not (wait and k == 8)}
  return {"h2d_ms": _time(h2d, h), "d2h_ms": _time(d2h, d), "both_ms": _time(both, h, d),
          "matmuls_ms": _time(mm, a), "both_and_matmuls_ms": _time(both_mm, h, d, a),
          **{name: _time(fn, pieces) for name, fn in stream.items()}}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--mib", type=int, default=400)
  ap.add_argument("--dim", type=int, default=8192, help="side of the matmul chain's matrices")
  ap.add_argument("--json", default=None)
  ap.add_argument("--flags", action="append", default=[], metavar="NAME=FLAGS")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    print(json.dumps(measure(args.mib, args.dim)))
    return
  variants = dict(VARIANTS, **dict(f.split("=", 1) for f in args.flags))
  rows = []
  for name, flags in variants.items():
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip(),
               XLA_PYTHON_CLIENT_PREALLOCATE="false")
    p = subprocess.run([sys.executable, __file__, "--child", "--mib", str(args.mib), "--dim", str(args.dim)], env=env,
                       capture_output=True, text=True)
    row = {"variant": name, "xla_flags": flags, "mib": args.mib}
    row.update(json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else
               {"error": p.stderr.strip()[-400:]})
    rows.append(row)
    print(json.dumps(row), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
