"""The bucketed backward pass: one executable per bucket of draws, no recomputation above the bucket.

The slot scan (:mod:`grass_jax.models.slot_scan`) compiles once for every draw, so its backward pass
runs frozen layers in loops with dynamic bounds and recomputes every block it differentiates
(``remat='full'``). A draw known at compile time would let XLA do what PyTorch's autograd does: keep
the activations of the layers above the lowest trained one, run no recomputation, and read weights
in place. On Llama-2-7B that recomputation is a large part of the stack's time
(``benchmarks/probes/weight_copies.py``, static-draw variants; docs/performance-history.md).

A *bucket* keeps most of that and compiles once per ``bucket`` lowest layers, not per draw. For a
static ``start`` (the lowest trained layer rounded down to a multiple of ``bucket``):

* **forward below the bucket**: layers ``0 .. start-1`` run with nothing kept (embeddings frozen:
  no gradient flows below the lowest trained layer);
* **forward above**: layers ``start .. L-1`` unrolled over static slices of the stack, every residual
  of their *input* gradients kept (weights are constants there: no weight-gradient matmuls), each
  layer's output passed through a :func:`tap` whose second input receives that output's gradient;
* **backward**: one pass of input gradients from the loss down to ``start``, which leaves every
  layer's output gradient in the taps;
* **weight gradients**: each trained layer's, after that pass, from its block input, its output
  gradient and one recomputation of the block, written into its slot.

The draw is still an argument (``slot_of``): any draw whose lowest trained layer is ``>= start``
runs in the bucket's executable. A draw below ``start`` would need layers the bucket never
differentiated; its gradients (and measured norms) come out NaN, so a GRASS step skips it
(``metrics['skipped']``) instead of training on a wrong gradient.

It costs the kept activations and a compilation per bucket; what it gains is measured in
docs/performance.md. The ``measure``
modes: 'none', or 'exact' on steps that do not probe (trained layers only).

Example::

  start = backward_start(lowest_trained_layer, bucket=4)   # host-side, once per switch
  stack = bucketed_stack(config, zeros_like_slots, slot_of, start, attention="einsum")
  logits, _ = forward(params, config, tokens, mask, layer_stack=stack)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from grass_jax.models.decoder import DecoderConfig, LayerStack, Params, run_block
from grass_jax.models.slot_scan import layers_of_slots, squared_norm

BUCKET_MEASURES = ("none", "exact")


def backward_start(active_layers: Sequence[int], bucket: int) -> int:
  """The bucket of a draw: its lowest trained layer rounded down to a multiple of ``bucket``.

  >>> backward_start([13, 30], bucket=4)
  12
  """
  if bucket < 1:
    raise ValueError(f"bucket must be >= 1; got {bucket}")
  if not len(active_layers):
    raise ValueError("backward_start needs at least one trained layer")
  return int(min(active_layers)) // bucket * bucket


class BucketSettings(NamedTuple):
  """Static settings of a bucketed stack.

  Attributes:
    start: the lowest layer the backward pass reaches (static: one executable per value).
    attention: the (resolved) attention implementation.
    act_sharding: activation sharding on a mesh, or None.
    measure: 'none', or 'exact': the sink's gradient holds the trained layers' squared weight-gradient norms.
  """
  start: int
  attention: str
  act_sharding: Any = None
  measure: str = "none"


def bucketed_stack(config: DecoderConfig, slots: Params, slot_of: jax.Array, start: int, /, *,
                   sink: jax.Array | None = None, refuse: jax.Array | None = None, **fields: Any) -> LayerStack:
  """A ``layer_stack`` for :func:`~grass_jax.models.decoder.forward` training slotted layers at or above ``start``.

  The interface of :func:`~grass_jax.models.slot_scan.slot_stack` with ``input_grad=False`` (the
  gradient with respect to the stack's input is zeros: embeddings frozen).

  Args:
    slots: ``[gamma, ...]`` handles for the trained layers' weights (their values are never read).
    slot_of: int ``[L]``, each layer's slot or -1; every trained layer must be ``>= start``, or the
      slots' gradients are NaN (module docstring).
    start: the bucket, a static int in ``[0, L)`` (:func:`backward_start`).
    fields: the other :class:`BucketSettings`: ``attention`` (required, resolved: not 'auto'),
      ``act_sharding``, ``measure`` ('none' or 'exact': trained layers' squared norms into the sink's
      gradient).
    sink: float32 ``[L]`` zeros (required with ``measure='exact'``).
    refuse: a traced bool; where true the slots' gradients and the norms are NaN, as for a draw below
      the bucket (a probing step, which must measure frozen layers: run the slot scan there).
  """
  settings = BucketSettings(start, **fields)
  measure = settings.measure
  if measure not in BUCKET_MEASURES:
    raise ValueError(f"a bucketed backward pass measures {BUCKET_MEASURES} only; got measure={measure!r} "
                     "(frozen layers below the bucket are never differentiated)")
  if measure == "exact" and sink is None:
    raise ValueError("measure='exact' needs a sink")
  if not isinstance(start, int) or not 0 <= start < config.num_layers:
    raise ValueError(f"start must be an int in [0, {config.num_layers}); got {start!r}")
  chex.assert_shape(slot_of, (config.num_layers,))
  sink = sink if measure == "exact" else None
  refuse = jnp.asarray(False) if refuse is None else refuse

  def run(layers: Params, h: jax.Array, inputs: Any) -> jax.Array:
    return _bucketed(config, settings, slots, jax.lax.stop_gradient(layers), h, sink, (slot_of, inputs, refuse))

  return run


@jax.custom_vjp
def tap(y: jax.Array, sink: jax.Array) -> jax.Array:
  """``y`` itself; the gradient with respect to ``sink`` (zeros of ``y``'s shape) is ``y``'s gradient."""
  del sink
  return y


tap.defvjp(lambda y, sink: (y, None), lambda _, dy: (dy, dy))


def _block(config, settings, frozen, layer, h, inputs):
  """Block ``layer`` (a static int) on ``h``, its weights a static slice of the stack (read in place)."""
  lp = {k: w[layer] for k, w in frozen.items()}
  return run_block(config, lp, h, jnp.int32(layer), inputs, attention=settings.attention,
                   act_sharding=settings.act_sharding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _bucketed(config, settings, slots, frozen, h, sink, given):
  """The layer stack ``frozen`` applied to ``h``; differentiable in ``slots`` (and ``sink``).

  ``given``: ``(slot_of, inputs, refuse)``, the step's inputs that take no gradient.
  """
  return _bucketed_fwd(config, settings, slots, frozen, h, sink, given)[0]


def _bucketed_fwd(config, settings, slots, frozen, h, sink, given):
  del sink  # only its gradient is written
  slot_of, inputs, refuse = given
  start, num_layers = settings.start, config.num_layers
  for layer in range(start):  # below the bucket: nothing is kept
    h = _block(config, settings, frozen, layer, h, inputs)

  def upper(taps):
    x, block_inputs = h, jnp.zeros((num_layers - start,) + h.shape, h.dtype)
    for layer in range(start, num_layers):
      block_inputs = block_inputs.at[layer - start].set(x)  # in place: one buffer for all block inputs
      x = tap(_block(config, settings, frozen, layer, x, inputs), taps[layer - start])
    return x, block_inputs

  taps = jnp.zeros((num_layers - start,) + h.shape, h.dtype)
  out, output_grads_of, block_inputs = jax.vjp(upper, taps, has_aux=True)
  # The slots' values are never read; empty [gamma, 0] stand-ins carry gamma and dtype to the backward pass.
  marks = jax.tree.map(lambda x: jnp.zeros((x.shape[0], 0), x.dtype), slots)
  return out, (marks, frozen, slot_of, block_inputs, output_grads_of, inputs, refuse)


def _bucketed_bwd(config, settings, res, d_out):
  marks, frozen, slot_of, block_inputs, output_grads_of, inputs, refuse = res
  start, num_layers = settings.start, config.num_layers
  (output_grads,) = output_grads_of(d_out)  # the input-gradient pass, down to `start`
  gamma = jax.tree.leaves(marks)[0].shape[0]
  layer_of = layers_of_slots(slot_of, gamma).astype(jnp.int32)
  in_bucket = jnp.all(layer_of >= start) & ~refuse
  grads = {k: jnp.zeros((gamma,) + frozen[k].shape[1:], m.dtype) for k, m in marks.items()}
  norms = jnp.zeros((num_layers,), jnp.float32)
  for slot in range(gamma):
    # One trained layer's weights copied out of the stack at a time (see the slot scan's backward pass).
    layer, grads = jax.lax.optimization_barrier((layer_of[slot], grads))
    dp = _weight_grad(config, settings, frozen, layer, block_inputs, output_grads, inputs)
    # A draw below the bucket: NaN, so that the step is skipped rather than trained on a wrong gradient.
    dp = jax.tree.map(lambda g: jnp.where(in_bucket, g, jnp.nan), dp)
    grads = {k: jax.lax.dynamic_update_index_in_dim(g, dp[k].astype(g.dtype), slot, 0) for k, g in grads.items()}
    norms = norms.at[layer].set(squared_norm(dp))
  d_sink = jnp.where(in_bucket, norms, jnp.nan) if settings.measure == "exact" else None
  return grads, None, jnp.zeros(block_inputs.shape[1:], block_inputs.dtype), d_sink, None


def _weight_grad(config, settings, frozen, layer, block_inputs, output_grads, inputs) -> Params:
  """One trained layer's weight gradient: its block recomputed once from its kept input."""
  row = jnp.maximum(layer - settings.start, 0)
  lp = {k: jax.lax.dynamic_index_in_dim(w, layer, keepdims=False) for k, w in frozen.items()}
  h_in = jax.lax.dynamic_index_in_dim(block_inputs, row, keepdims=False)

  def block_of(p):
    return run_block(config, p, h_in, layer, inputs, attention=settings.attention, act_sharding=settings.act_sharding)

  return jax.vjp(block_of, lp)[1](jax.lax.dynamic_index_in_dim(output_grads, row, keepdims=False))[0]


_bucketed.defvjp(_bucketed_fwd, _bucketed_bwd)
