"""Probe: what reading a layer's weights out of the ``[L, ...]`` stack costs, against per-layer buffers.

The 7B profile shows XLA copying every weight matrix out of the stack before its matmuls (a memcpy
per matrix per layer pass; docs/performance.md). This times the frozen-layer work of a step, forward
and input gradient (the backward of a frozen block, recomputed), four ways, on the same weights:

* ``scan``: ``lax.scan`` over the stack (what the slot scan does);
* ``unrolled-slices``: a Python loop over static slices ``w[l]`` of the stack;
* ``unrolled-buffers``: a Python loop over per-layer arrays (PyTorch's layout);
* ``fori-buffers-switch``: a dynamic-bound ``fori_loop`` that picks layer ``l``'s own buffers with
  ``lax.switch`` (what a per-layer layout needs for the backward's frozen runs);
* ``unrolled-slices-cond``: the forward over static slices, and a backward that visits every layer
  in a Python loop, each behind a ``lax.cond`` on a traced lowest layer (here 0): the slot scan's
  dynamic-bound frozen runs without dynamic slices, and without a change of layout.

  python benchmarks/probes/weight_copies.py [--size llama2-7b] [--batch 2] [--seq 512] [--out FILE]

Prints ms per pass and writes one JSON object (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
  import jax
  import jax.numpy as jnp

  from benchmarks.common import SIZES
  from grass_jax.models import config_from_hf, init_params
  from grass_jax.models.decoder import LayerInputs, resolve_attention, rope_inv_freq, run_block

  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", default="llama2-7b")
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--out", type=Path)
  args = ap.parse_args()

  cfg = config_from_hf(SIZES[args.size])
  attention = resolve_attention(cfg, "auto", jnp.bfloat16)
  stack = jax.jit(lambda k: init_params(cfg, k, jnp.bfloat16)["layers"])(jax.random.PRNGKey(0))
  buffers = [jax.tree.map(lambda w, l=l: jnp.array(w[l]), stack) for l in range(cfg.num_layers)]
  b, t = args.batch, args.seq
  h0 = jax.random.normal(jax.random.PRNGKey(1), (b, t, cfg.hidden_size), jnp.bfloat16)
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  inputs = LayerInputs(positions, jnp.asarray(rope_inv_freq(cfg)), jnp.zeros((cfg.num_layers,), bool),
                       jnp.ones((b, t), bool))

  def block(lp, h, idx):
    return jax.checkpoint(lambda x: run_block(cfg, lp, x, idx, inputs, attention=attention))(h)

  def loss_scan(h, stack):
    out, _ = jax.lax.scan(lambda h, xs: (block(xs[0], h, xs[1]), None), h, (stack, jnp.arange(cfg.num_layers)))
    return jnp.sum(out.astype(jnp.float32))

  def loss_slices(h, stack):
    for l in range(cfg.num_layers):
      h = block({k: w[l] for k, w in stack.items()}, h, l)
    return jnp.sum(h.astype(jnp.float32))

  def loss_buffers(h, buffers):
    for l, lp in enumerate(buffers):
      h = block(lp, h, l)
    return jnp.sum(h.astype(jnp.float32))

  def loss_switch(h, buffers):
    branches = [lambda x, lp=lp, l=l: block(lp, x, l) for l, lp in enumerate(buffers)]
    out = jax.lax.fori_loop(0, cfg.num_layers, lambda i, x: jax.lax.switch(i, branches, x), h)
    return jnp.sum(out.astype(jnp.float32))

  def frozen_stack(stack, lo):
    """The stack on h; its input gradient from the layers >= lo only (static slices, a cond per layer)."""
    @jax.custom_vjp
    def f(h):
      return fwd(h)[0]

    def fwd(h):
      hs = []
      for l in range(cfg.num_layers):
        hs.append(h)
        h = block({k: w[l] for k, w in stack.items()}, h, l)
      return h, hs

    def bwd(hs, dh):
      for l in reversed(range(cfg.num_layers)):
        step = lambda d, l=l: jax.vjp(lambda x: block({k: w[l] for k, w in stack.items()}, x, l), hs[l])[1](d)[0]
        dh = jax.lax.cond(l >= lo, step, lambda d: d, dh)
      return (dh,)

    f.defvjp(fwd, bwd)
    return f

  def loss_cond(h, stack, lo=jnp.int32(0)):
    return jnp.sum(frozen_stack(stack, lo)(h).astype(jnp.float32))

  variants = {"scan": (loss_scan, stack), "unrolled-slices": (loss_slices, stack),
              "unrolled-slices-cond": (loss_cond, stack),
              "unrolled-buffers": (loss_buffers, buffers), "fori-buffers-switch": (loss_switch, buffers)}
  reference: dict = {}
  result = {"size": args.size, "batch": b, "seq": t, "device": jax.devices()[0].device_kind, "ms": {}}
  for name, (fn, weights) in variants.items():
    for what, f in (("forward", jax.jit(fn)), ("forward+input-grad", jax.jit(jax.grad(fn)))):
      try:
        t0 = time.perf_counter()
        jax.block_until_ready(f(h0, weights))
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.reps):
          t0 = time.perf_counter()
          jax.block_until_ready(f(h0, weights))
          times.append(time.perf_counter() - t0)
        ms = 1e3 * sorted(times)[len(times) // 2]
        value = f(h0, weights)
        reference.setdefault(what, value)  # the scan's, the first variant: every other must agree
        ref = reference[what].astype(jnp.float32)  # bf16 blocks: expect differences of bf16 rounding (~1e-2)
        diff = float(jnp.max(jnp.abs(value.astype(jnp.float32) - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))
        result["ms"][f"{name} {what}"] = {"ms": ms, "compile_s": compile_s, "max_rel_diff_vs_scan": diff}
        print(f"{name:<22} {what:<20} {ms:8.2f} ms   (compile {compile_s:.1f} s; off the scan by {diff:.1e} "
              "of its largest entry)", flush=True)
      except Exception as e:  # noqa: BLE001 - a probe reports what failed and goes on
        result["ms"][f"{name} {what}"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"{name:<22} {what:<20} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
  if args.out:
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
