"""Module granularity: the active slots train modules (attention or MLP blocks), not whole layers.

MISA (module-wise importance sampling, NeurIPS 2025) samples a layer's modules separately rather than
whole layers. This is its uniform form on top of LISA, stratified: of ``num_active`` slots the first half
trains attention and the second half MLP (:func:`slot_modules`), and the layers are drawn as LISA draws
them but left in the random order of the draw, so that which layer gets which module is random too (the
same layer never fills two slots). With ``num_active = 2 * gamma`` the slots hold exactly the parameters
and the moments of LISA's ``gamma`` whole layers: each slot's inner state covers its module's leaves only.
A slot's other module gets no gradient and no update. ``GrassSettings(modules=ATTENTION_MLP)`` turns it
on; the config does for strategy lisa by default (``optim.granularity``), where ``optim.num_active`` counts
layers' worth: 2 gives ``num_active=4`` slots here.

Example::

  >>> import jax.numpy as jnp
  >>> from grass_jax.module_sampling import ATTENTION_MLP, mask_modules, slot_modules
  >>> slot_modules(ATTENTION_MLP, 4)
  (0, 0, 1, 1)
  >>> slots = {"q_proj": jnp.ones((2, 3, 3)), "up_proj": jnp.ones((2, 3, 5))}
  >>> out = mask_modules(ATTENTION_MLP, slots, (0, 1))  # slot 0 trains attention, slot 1 its MLP
  >>> [float(out["q_proj"][i].sum()) for i in (0, 1)], [float(out["up_proj"][i].sum()) for i in (0, 1)]
  ([9.0, 0.0], [0.0, 15.0])
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from grass_jax.layer_updates import guard

__all__ = ["ATTENTION_MLP", "MODULE_NAMES", "mask_modules", "module_index", "module_leaves", "per_slot_module_update",
           "slot_modules"]

# The two modules of a decoder layer, by the names of grass_jax's layer leaves (each norm goes with the block
# it normalises the input or output of).
ATTENTION_MLP = (r"(?:^|/)(input_norm|[qkvo]_proj|[qkvo]_bias|[qk]_norm|post_attn_norm)$",
                 r"(?:^|/)(pre_mlp_norm|(gate|up|down)_(proj|bias)|post_mlp_norm)$")
MODULE_NAMES = ("attention", "mlp")  # of ATTENTION_MLP's modules, for logs


@functools.lru_cache(maxsize=None)
def module_index(modules: tuple[str, ...], role: str) -> int:
  """The module a layer leaf belongs to: the one regex of ``modules`` that matches ``role`` (its name or path)."""
  hits = [i for i, pattern in enumerate(modules) if re.search(pattern, role)]
  if len(hits) != 1:
    raise ValueError(f"the layer leaf {role!r} matches {len(hits)} of the modules {list(modules)}; each leaf must "
                     "match exactly one: give GrassSettings(modules=...) patterns that split the layer")
  return hits[0]


def slot_modules(modules: Sequence[str], num_slots: int) -> tuple[int, ...]:
  """The module each slot trains: ``num_slots / len(modules)`` slots per module, in order."""
  per = num_slots // len(modules)
  return tuple(i // per for i in range(num_slots))


def module_leaves(modules: Sequence[str], layer: Mapping[str, Any], module: int) -> dict[str, Any]:
  """The leaves of one layer (role -> array) that belong to ``module``."""
  return {role: x for role, x in layer.items() if module_index(tuple(modules), role) == module}


def mask_modules(modules: Sequence[str], slots: Mapping[str, jax.Array], chosen: Sequence[int]) -> dict[str, jax.Array]:
  """``slots`` (role -> ``[num_slots, ...]``) with each slot's leaves outside its module ``chosen[i]`` set to zero."""
  out = {}
  for role, x in slots.items():
    keep = jnp.asarray([m == module_index(tuple(modules), role) for m in chosen])
    out[role] = jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))
  return out


def per_slot_module_update(inner: optax.GradientTransformation, modules: Sequence[str], grads: dict, states: tuple,
                           params: dict | None, ok: jax.Array | None) -> tuple[dict, tuple]:
  """``inner.update`` on each slot's module (its state covers that module's leaves only); the updates
  stacked ``[num_slots, ...]`` per role, zero outside each slot's module. ``ok``: see :func:`guard`."""
  chosen = slot_modules(modules, len(states))
  per_slot, new_states = [], []
  for i, m in enumerate(chosen):
    g = module_leaves(modules, {r: x[i] for r, x in grads.items()}, m)
    p = None if params is None else module_leaves(modules, {r: x[i] for r, x in params.items()}, m)
    u, s = guard(ok, *inner.update(g, states[i], p), states[i])
    per_slot.append(u)
    new_states.append(s)
  stacked = {r: jnp.stack([u[r] if r in u else jnp.zeros_like(x[i]) for i, u in enumerate(per_slot)])
             for r, x in grads.items()}
  return stacked, tuple(new_states)
