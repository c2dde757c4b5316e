"""Layer weights as one array per layer and weight ("per-layer buffers") instead of ``[L, ...]`` stacks.

The model's own layout stacks each weight over the layers (``params['layers'][name]`` is ``[L, ...]``):
one scan compiles the stack, and GRASS addresses layer ``l`` by index. On a GPU that layout costs a
copy: XLA:GPU hands cuBLAS whole buffers, so in a loop over the stack every weight matrix is copied
out of it before each matmul that reads it (Llama-2-7B, b2 x 512: about 6 ms of a 69 ms step, and the
copies' buffers are most of the step's temporaries; docs/performance.md). PyTorch keeps one tensor
per weight and never copies.

The per-layer layout is PyTorch's: ``params['layers']`` is a tuple of ``L`` dicts, layer ``l``'s
weights at ``params['layers'][l][name]`` with the stacked leaf's shape less its leading axis. Every
layer is then its own buffer; the forward and backward passes are unrolled over the layers
(:mod:`grass_jax.models.slot_scan`), and the few places that pick layers by a traced index (the active
layers of a step) use :func:`run_if` instead of indexing.

Example::

  per_layer = unstack_layers(params)           # same values, one buffer per layer
  assert is_per_layer(per_layer["layers"])
  params = stack_layers(per_layer)             # and back (checkpoints, evaluation)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import chex
import jax
import jax.numpy as jnp

Params = dict[str, Any]
PerLayer = tuple[dict[str, jax.Array], ...]
State = TypeVar("State")


def is_per_layer(layers: Any) -> bool:
  """Whether ``params['layers']`` is in the per-layer layout (a tuple or list of per-layer dicts)."""
  return isinstance(layers, (tuple, list))


def num_layers_of(layers: Any) -> int:
  """L, in either layout."""
  return len(layers) if is_per_layer(layers) else next(iter(layers.values())).shape[0]


def layer_weights(layers: Any, layer: int) -> dict[str, jax.Array]:
  """Layer ``layer``'s weights (a Python int): the layer's own dict, or static slices of the stacks."""
  if is_per_layer(layers):
    return layers[layer]
  return {k: w[layer] for k, w in layers.items()}


def unstack_layers(params: Params) -> Params:
  """``params`` with ``layers`` split into a tuple of per-layer dicts (unchanged if already split)."""
  layers = params["layers"]
  if is_per_layer(layers):
    return params
  return {**params, "layers": tuple(layer_weights(layers, l) for l in range(num_layers_of(layers)))}


def stack_layers(params: Params) -> Params:
  """Inverse of :func:`unstack_layers`: ``layers`` as ``[L, ...]`` stacks (unchanged if already stacked)."""
  layers = params["layers"]
  if not is_per_layer(layers):
    return params
  return {**params, "layers": jax.tree.map(lambda *ws: jnp.stack(ws), *layers)}


def run_if(pred: jax.Array, fn: Callable[[State], State], state: State) -> State:
  """``fn(state)`` where the traced bool ``pred`` holds, else ``state``, updating ``state`` in place.

  A ``lax.cond`` would do the same, but XLA copies what a conditional's other branch passes through
  unchanged: weight-gradient slots carried through 32 layers' conditionals cost 14 ms a 7B step
  (docs/performance.md). A while loop of 0 or 1 trips updates its state in place.
  """
  chex.assert_shape(pred, ())
  return jax.lax.fori_loop(0, pred.astype(jnp.int32), lambda _, s: fn(s), state)


def gather_slots(layers: PerLayer, slot_of: jax.Array, gamma: int) -> dict[str, jax.Array]:
  """The slotted layers' weights as ``[gamma, ...]`` stacks: layer ``l`` at slot ``slot_of[l]`` (-1: none)."""
  chex.assert_shape(slot_of, (len(layers),))
  slots = {k: jnp.zeros((gamma,) + w.shape, w.dtype) for k, w in layers[0].items()}
  for l, lp in enumerate(layers):
    slots = run_if(slot_of[l] >= 0, lambda s, lp=lp, l=l: {
        k: jax.lax.dynamic_update_index_in_dim(s[k], lp[k], slot_of[l], 0) for k in s}, slots)
  return slots


def add_slot_updates(layers: PerLayer, updates: dict[str, jax.Array], slot_of: jax.Array) -> PerLayer:
  """``layers`` with each slotted layer ``l`` plus its update ``updates[name][slot_of[l]]``, in place."""
  chex.assert_shape(slot_of, (len(layers),))

  def add(l: int, lp: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: (w + jax.lax.dynamic_index_in_dim(updates[k], slot_of[l], keepdims=False)).astype(w.dtype)
            for k, w in lp.items()}

  return tuple(run_if(slot_of[l] >= 0, lambda lp, l=l: add(l, lp), lp) for l, lp in enumerate(layers))
