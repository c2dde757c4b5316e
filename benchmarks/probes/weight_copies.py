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

Then a *whole* slot-scan backward, trained layers included (``--trained``, default layers 6 and 13, the
profiled 7B draw; embeddings frozen, so the backward stops at the lowest trained layer), timed as the
gradient with respect to the slots:

* ``slot-scan``: the library's slot scan (:func:`grass_jax.models.slot_scan.slot_stack`), scanned;
* ``slot-scan-unroll-forward``: the same with ``unroll_forward`` (the 7B setting today);
* ``switch-slices`` / ``switch-buffers``: the forward unrolled, and a backward that visits every layer
  once, in a Python loop, behind a ``lax.switch`` on the layer's kind (below the lowest trained
  layer: skipped; frozen: input gradient; trained: weight and input gradient, written into its slot of
  the ``[gamma, ...]`` gradients the switch carries), reading static slices of the stack or
  per-layer arrays;
* ``while-buffers`` / ``while-slices``: the same backward, but each layer's two cases are ``fori_loop``
  while loops of 0 or 1 trips instead of switch branches. A loop updates its state in place; a
  conditional copies what a branch passes through unchanged (on the CPU, the switch program copies
  the carried gradients 42 times in an 8-layer toy, the loops none);
* ``small-carry-buffers`` / ``small-carry-slices``: the same, but the switches carry only
  hidden-state-sized arrays (a trained layer's branch keeps its block input and output gradient), and
  the trained layers' weight gradients are computed after the pass, each from one more recomputation.
* ``static-draw-buffers`` / ``static-draw-slices`` / ``static-draw-remat-buffers``: the bound a design
  that compiles per draw (or per bucket of draws) could reach: the draw is compiled in, the stack
  unrolled, and JAX's autodiff prunes the backward below the lowest trained layer by itself; without
  ``remat`` every residual is kept (PyTorch without gradient checkpointing), with it each block is
  recomputed (PyTorch with it).
* ``bucket-slices`` / ``bucket-buffers``: what one executable per bucket of draws keeps of that bound:
  the backward starts at the lowest trained layer rounded down to ``--bucket``, unrolled, no
  recomputation; the draw stays an argument: each layer's output gradient is tapped, and the trained
  layers' weight gradients are formed after the pass from their block input and output gradient.

Each row also records the compiled program's temporaries (``memory_analysis``) and counts its
``conditional`` and ``copy`` instructions (optimised HLO). The draw and the cond's lowest layer are
arguments of the compiled function. Before 2026-12-02 (fourth session) they were closed over: XLA then
folded the conditionals away, and the ``unrolled-slices-cond`` and switch rows timed programs
specialised to one draw (``weight_copies_7b_h200_cond.json``, ``weight_copies_7b_h200_switch.json``, read
with ``git show 3e843a2:benchmarks/results/probes/<name>``, as every result of this probe).
A whole 7B step with the switch backward, its draw an argument, was slower than the scan
(docs/performance-history.md): XLA copies the carried gradients in the branches that pass them through.

  python benchmarks/probes/weight_copies.py [--size llama2-7b] [--batch 2] [--seq 512] [--trained 6 13] \
      [--only VARIANT ...] [--out FILE]

Prints ms per pass and writes one JSON object (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
  from grass_jax.models.slot_scan import slot_stack

  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", default="llama2-7b")
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--trained", type=int, nargs="+", default=[6, 13], help="the trained layers (the slots)")
  ap.add_argument("--bucket", type=int, default=8,
                  help="bucket-*: one executable per this many lowest trained layers (its start rounds down)")
  ap.add_argument("--only", nargs="+", help="run these variants only")
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

  def plain_block(lp, h, idx):  # every residual kept
    return run_block(cfg, lp, h, idx, inputs, attention=attention)

  def block(lp, h, idx):  # recomputed in the backward pass
    return jax.checkpoint(lambda x: plain_block(lp, x, idx))(h)

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

  def loss_cond(h, stack, lo):
    return jnp.sum(frozen_stack(stack, lo)(h).astype(jnp.float32))

  def layer_reader(weights):
    """``l -> layer l's weights``: a static slice of the stack, or the l-th per-layer dict."""
    return weights.__getitem__ if not isinstance(weights, dict) else (lambda l: {k: w[l] for k, w in weights.items()})

  def lowest_trained(slot_of):
    return jnp.min(jnp.where(slot_of >= 0, jnp.arange(cfg.num_layers), cfg.num_layers))

  def layer_of_slots(slot_of, gamma):
    return jnp.argmax(slot_of[None, :] == jnp.arange(gamma)[:, None], axis=1)

  def pick_layer(weights, l):
    """One layer's weights, ``l`` traced: a switch over per-layer arrays, or a dynamic slice of the stack."""
    if not isinstance(weights, dict):
      return jax.lax.switch(l, [lambda i=i: weights[i] for i in range(cfg.num_layers)])
    return {k: jax.lax.dynamic_index_in_dim(w, l, keepdims=False) for k, w in weights.items()}

  def slot_marks(slots):  # empty [gamma, 0] residuals that carry the slots' dtypes to the backward pass
    return jax.tree.map(lambda x: jnp.zeros((x.shape[0], 0), x.dtype), slots)

  def slot_function(layer, bwd):
    """``f(slots, h)``: the stack on ``h`` over ``layer(l)``, unrolled, with the backward pass ``bwd``; its
    residuals are empty ``[gamma, 0]`` marks of the slots and the L block inputs."""
    def fwd(slots, h):
      hs = []
      for l in range(cfg.num_layers):
        hs.append(h)
        h = block(layer(l), h, l)
      return h, (slot_marks(slots), hs)

    f = jax.custom_vjp(lambda slots, h: fwd(slots, h)[0])
    f.defvjp(fwd, bwd)
    return f

  def branch_stack(weights, slot_of, gamma, how):
    """The stack on h, differentiable in [gamma, ...] slots: one backward pass that visits every layer,
    behind a lax.switch ('switch') or inside two while loops of 0 or 1 trips ('while': a loop's state
    is updated in place, where a conditional copies what a branch passes through)."""
    layer, lowest = layer_reader(weights), lowest_trained(slot_of)

    def bwd(res, dh):
      marks, hs = res
      grads = {k: jnp.zeros((gamma,) + v.shape, marks[k].dtype) for k, v in layer(0).items()}
      for l in reversed(range(cfg.num_layers)):
        def frozen(dh, grads, l=l):
          return jax.vjp(lambda x: block(layer(l), x, l), hs[l])[1](dh)[0], grads

        def trained(dh, grads, l=l):
          dp, dx = jax.vjp(lambda p, x: block(p, x, l), layer(l), hs[l])[1](dh)
          return dx, {k: jax.lax.dynamic_update_index_in_dim(g, dp[k].astype(g.dtype), slot_of[l], 0)
                      for k, g in grads.items()}

        if how == "switch":
          kind = jnp.where(slot_of[l] >= 0, 2, jnp.where(l > lowest, 1, 0))
          dh, grads = jax.lax.switch(kind, [lambda d, g: (d, g), frozen, trained], dh, grads)
        else:
          is_frozen = ((slot_of[l] < 0) & (l > lowest)).astype(jnp.int32)
          dh = jax.lax.fori_loop(0, is_frozen, lambda _, d, f=frozen: f(d, None)[0], dh)
          dh, grads = jax.lax.fori_loop(0, (slot_of[l] >= 0).astype(jnp.int32),
                                        lambda _, c, t=trained: t(*c), (dh, grads))
      return grads, jnp.zeros_like(dh)

    return slot_function(layer, bwd)

  def small_carry_stack(weights, slot_of, gamma):
    """As branch_stack's switch, but the switches carry only hidden-state-sized arrays: a trained layer's branch
    keeps its block input and output gradient, and its weight gradient is computed after the pass (one
    more recomputation of the layer)."""
    layer, lowest = layer_reader(weights), lowest_trained(slot_of)
    layer_of = layer_of_slots(slot_of, gamma)

    def bwd(res, dh):
      marks, hs = res
      saved = (jnp.zeros((gamma,) + dh.shape, dh.dtype), jnp.zeros((gamma,) + dh.shape, dh.dtype))
      for l in reversed(range(cfg.num_layers)):
        def input_grad(dh, l=l):
          return jax.vjp(lambda x: block(layer(l), x, l), hs[l])[1](dh)[0]

        def trained(dh, saved, l=l):
          s = slot_of[l]
          return input_grad(dh), (saved[0].at[s].set(hs[l]), saved[1].at[s].set(dh))

        kind = jnp.where(slot_of[l] >= 0, 2, jnp.where(l > lowest, 1, 0))
        dh, saved = jax.lax.switch(kind, [lambda d, sv: (d, sv), lambda d, sv: (input_grad(d), sv), trained],
                                   dh, saved)
      grads = []
      for j in range(gamma):  # the trained layers' weight gradients, after the pass
        lj = layer_of[j]
        grads.append(jax.vjp(lambda p: block(p, saved[0][j], lj), pick_layer(weights, lj))[1](saved[1][j])[0])
      return ({k: jnp.stack([g[k] for g in grads]).astype(marks[k].dtype) for k in marks}, jnp.zeros_like(dh))

    return slot_function(layer, bwd)

  slot_of = jnp.full((cfg.num_layers,), -1, jnp.int32).at[jnp.asarray(args.trained)].set(
      jnp.arange(len(args.trained), dtype=jnp.int32))
  # The trained layers' weights: the library's variants read them from the stack, static-draw from here.
  slots = jax.tree.map(lambda w: w[jnp.asarray(args.trained)], stack)

  def slot_loss_library(unroll):
    def loss(slots, h, stack, slot_of):
      run = slot_stack(cfg, slots, slot_of, attention=attention, input_grad=False, unroll_forward=unroll)
      return jnp.sum(run(stack, h, inputs).astype(jnp.float32))
    return loss

  def slot_loss_branches(how):
    def loss(slots, h, weights, slot_of):
      return jnp.sum(branch_stack(weights, slot_of, len(args.trained), how)(slots, h).astype(jnp.float32))
    return loss

  def slot_loss_static_draw(remat):
    """The ideal a bucketed design could reach: the draw compiled in (as torch.compile recompiles at a
    switch), the stack unrolled, the trained layers reading their slots, JAX's autodiff left to prune the
    backward below the lowest trained layer; ``remat``: each block checkpointed (PyTorch's gradient
    checkpointing), else every residual kept (PyTorch without it)."""
    slot_at = {l: j for j, l in enumerate(args.trained)}
    run = block if remat else plain_block

    def loss(slots, h, weights, slot_of):  # slot_of unused: the draw is static
      layer = layer_reader(weights)
      for l in range(cfg.num_layers):
        lp = {k: w[slot_at[l]] for k, w in slots.items()} if l in slot_at else layer(l)
        h = run(lp, h, l)
      return jnp.sum(h.astype(jnp.float32))
    return loss

  @jax.custom_vjp
  def tap(y, sink):  # y; the gradient with respect to sink is y's (a layer's output gradient, kept)
    return y

  tap.defvjp(lambda y, sink: (y, None), lambda _, dy: (dy, dy))

  def bucket_stack(weights, slot_of, gamma, start):
    """The stack on h, differentiable in [gamma, ...] slots, for any draw whose lowest trained layer is
    >= ``start`` (one executable per bucket of draws): layers below ``start`` run without residuals; the
    rest unrolled over static reads, every residual of their input gradients kept (no recomputation),
    each output tapped for its gradient; the trained layers' weight gradients after the pass, each from
    its block input, its output gradient and one recomputation."""
    layer, n, layer_of = layer_reader(weights), cfg.num_layers, layer_of_slots(slot_of, gamma)

    def upper(h, sinks):
      hs = []
      for l in range(start, n):
        hs.append(h)
        h = tap(plain_block(layer(l), h, l), sinks[l - start])
      return h, jnp.stack(hs)

    def fwd(slots, h):
      for l in range(start):
        h = plain_block(layer(l), h, l)
      out, grad_of_sinks, hs = jax.vjp(lambda s: upper(h, s), jnp.zeros((n - start,) + h.shape, h.dtype),
                                       has_aux=True)
      return out, (slot_marks(slots), grad_of_sinks, hs)

    def bwd(res, dout):
      marks, grad_of_sinks, hs = res
      (douts,) = grad_of_sinks(dout)
      grads = []
      for j in range(gamma):
        lj = layer_of[j]
        block_of = lambda p, lj=lj: plain_block(p, hs[lj - start], lj)  # noqa: E731
        grads.append(jax.vjp(block_of, pick_layer(weights, lj))[1](douts[lj - start])[0])
      return ({k: jnp.stack([g[k] for g in grads]).astype(marks[k].dtype) for k in marks},
              jnp.zeros(hs.shape[1:], hs.dtype))

    f = jax.custom_vjp(lambda slots, h: fwd(slots, h)[0])
    f.defvjp(fwd, bwd)
    return f

  def slot_loss_bucket(slots, h, weights, slot_of):
    start = min(args.trained) // args.bucket * args.bucket
    return jnp.sum(bucket_stack(weights, slot_of, len(args.trained), start)(slots, h).astype(jnp.float32))

  def slot_loss_small_carry(slots, h, weights, slot_of):
    return jnp.sum(small_carry_stack(weights, slot_of, len(args.trained))(slots, h).astype(jnp.float32))

  ignore_lo = lambda fn: lambda h, weights, lo: fn(h, weights)  # noqa: E731
  frozen_only = {"scan": (ignore_lo(loss_scan), stack), "unrolled-slices": (ignore_lo(loss_slices), stack),
                 "unrolled-slices-cond": (loss_cond, stack),
                 "unrolled-buffers": (ignore_lo(loss_buffers), buffers),
                 "fori-buffers-switch": (ignore_lo(loss_switch), buffers)}
  with_slots = {"slot-scan": (slot_loss_library(False), stack),
                "slot-scan-unroll-forward": (slot_loss_library(True), stack),
                "switch-buffers": (slot_loss_branches("switch"), buffers),
                "switch-slices": (slot_loss_branches("switch"), stack),
                "while-buffers": (slot_loss_branches("while"), buffers),
                "while-slices": (slot_loss_branches("while"), stack),
                "small-carry-buffers": (slot_loss_small_carry, buffers),
                "small-carry-slices": (slot_loss_small_carry, stack),
                "static-draw-buffers": (slot_loss_static_draw(False), buffers),
                "static-draw-slices": (slot_loss_static_draw(False), stack),
                "static-draw-remat-buffers": (slot_loss_static_draw(True), buffers),
                "bucket-slices": (slot_loss_bucket, stack), "bucket-buffers": (slot_loss_bucket, buffers)}
  reference: dict = {}
  result = {"size": args.size, "batch": b, "seq": t, "trained": args.trained,
            "device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""), "ms": {}}
  # The draw (slot_of) and the cond's lowest layer are arguments: closed over, they would be constants
  # and XLA would fold the branches away, timing a program specialised to one draw.
  lo = jnp.int32(0)
  # Copies of the [gamma, ...] slot gradients (what a conditional's pass-through branch copies).
  slot_shapes = {f"bf16[{len(args.trained)},{','.join(map(str, w.shape[1:]))}]" for w in stack.values()}
  runs = [(name, what, jax.jit(f), (h0, weights, lo)) for name, (fn, weights) in frozen_only.items()
          for what, f in (("forward", fn), ("forward+input-grad", jax.grad(fn)))]
  runs += [(name, "slot-grad", jax.jit(jax.grad(fn)), (slots, h0, weights, slot_of)) for name, (fn, weights) in with_slots.items()]
  for name, what, f, call_args in runs:
    if args.only and name not in args.only:
      continue
    try:
      t0 = time.perf_counter()
      compiled = f.lower(*call_args).compile()
      compile_s = time.perf_counter() - t0
      temp_gib = compiled.memory_analysis().temp_size_in_bytes / 2**30
      hlo = compiled.as_text()
      counts = {"conditionals": hlo.count(" conditional("), "copies": hlo.count(" copy(") + hlo.count(" copy-start("),
                "slot_copies": sum(len(re.findall(rf"= {re.escape(s)}\{{[0-9,]*\}} copy(-start)?\(", hlo))
                                   for s in slot_shapes)}
      jax.block_until_ready(compiled(*call_args))
      times = []
      for _ in range(args.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*call_args))
        times.append(time.perf_counter() - t0)
      ms = 1e3 * sorted(times)[len(times) // 2]
      value = jax.tree.leaves(compiled(*call_args))
      reference.setdefault(what, value)  # the first variant run of each kind: every other must agree
      # bf16 blocks: expect differences of bf16 rounding (~1e-2)
      diff = max(float(jnp.max(jnp.abs(v.astype(jnp.float32) - r.astype(jnp.float32)))
                       / jnp.maximum(jnp.max(jnp.abs(r.astype(jnp.float32))), 1e-30))
                 for v, r in zip(value, reference[what]))
      result["ms"][f"{name} {what}"] = {"ms": ms, "compile_s": compile_s, "temp_gib": temp_gib,
                                        "max_rel_diff_vs_first": diff, "hlo": counts}
      print(f"{name:<26} {what:<20} {ms:8.2f} ms   (compile {compile_s:.1f} s, temporaries {temp_gib:.2f} GiB; "
            f"off the first by {diff:.1e} of its largest entry; {counts['conditionals']} conditionals, "
            f"{counts['copies']} copies, {counts['slot_copies']} of slot gradients)", flush=True)
    except Exception as e:  # noqa: BLE001 - a probe reports what failed and goes on
      result["ms"][f"{name} {what}"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
      print(f"{name:<26} {what:<20} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
  if args.out:
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
