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

**The module form of a slot tree** (:func:`to_module_form`). A slot tree in slot form holds every slot's
whole layer, ``[num_slots, ...]`` per leaf; in module form each leaf holds the rows of the slots that
train it only: ``[num_slots / len(modules), ...]``, row ``k`` of a leaf of module ``m`` being slot
``m * num_slots / len(modules) + k``. The train step's gradient handles, gradients and updates are in module
form, so that no buffer holds the leaves a slot does not train: LISA's ``gamma`` layers' worth, not
``2 * gamma`` layers'.

Example::

  >>> import jax.numpy as jnp
  >>> from grass_jax.module_sampling import ATTENTION_MLP, mask_modules, slot_modules, to_module_form
  >>> slot_modules(ATTENTION_MLP, 4)
  (0, 0, 1, 1)
  >>> slots = {"q_proj": jnp.ones((2, 3, 3)), "up_proj": jnp.ones((2, 3, 5))}
  >>> out = mask_modules(ATTENTION_MLP, slots, (0, 1))  # slot 0 trains attention, slot 1 its MLP
  >>> [float(out["q_proj"][i].sum()) for i in (0, 1)], [float(out["up_proj"][i].sum()) for i in (0, 1)]
  ([9.0, 0.0], [0.0, 15.0])
  >>> {r: x.shape for r, x in to_module_form(ATTENTION_MLP, slots).items()}  # slot 0's q_proj, slot 1's up_proj
  {'q_proj': (1, 3, 3), 'up_proj': (1, 3, 5)}
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

__all__ = ["ATTENTION_MLP", "MODULE_NAMES", "active_rows", "from_module_form", "mask_modules", "module_index", "module_leaves",
           "module_layers", "module_rows", "per_slot_module_update", "slot_module_leaves", "slot_modules",
           "to_module_form"]

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


def module_rows(modules: Sequence[str], role: str, num_slots: int) -> slice:
  """The slots (rows of a slot-form leaf) that train layer leaf ``role``: its module's, contiguous."""
  per = num_slots // len(modules)
  m = module_index(tuple(modules), role)
  return slice(m * per, (m + 1) * per)


def to_module_form(modules: Sequence[str], slots: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """``slots`` (role -> ``[num_slots, ...]``) in module form: each leaf's rows of the slots that train it."""
  return {r: x[module_rows(modules, r, x.shape[0])] for r, x in slots.items()}


def from_module_form(modules: Sequence[str], rows: Mapping[str, jax.Array], num_slots: int) -> dict[str, jax.Array]:
  """Slot form of a module-form tree: zeros in the rows of the slots that do not train a leaf."""
  out = {}
  for r, x in rows.items():
    where = module_rows(modules, r, num_slots)
    out[r] = jnp.pad(x, [(where.start, num_slots - where.stop)] + [(0, 0)] * (x.ndim - 1))
  return out


def module_layers(modules: Sequence[str] | None, roles: Sequence[str], active: jax.Array) -> dict[str, jax.Array]:
  """Per layer leaf, the layers of its rows: ``active`` (int ``[num_slots]``) of the slots that train it (module
  form), or, without ``modules`` (slot form), ``active`` itself."""
  if modules is None:
    return dict.fromkeys(roles, active)
  return {r: active[module_rows(modules, r, active.shape[0])] for r in roles}


def active_rows(modules: Sequence[str] | None, stack: Mapping[str, jax.Array], active: jax.Array) -> dict[str, jax.Array]:
  """The active layers' rows of a full-form stack (role -> ``[L, ...]``): slot form (each slot's whole layer),
  or, with ``modules``, module form (each leaf's rows of the slots that train it)."""
  at = module_layers(modules, list(stack), active)
  return {r: x[at[r]] for r, x in stack.items()}


def slot_module_leaves(modules: Sequence[str], rows: Mapping[str, Any], slot: int, num_slots: int) -> dict[str, Any]:
  """Slot ``slot``'s own leaves (its module's) of a module-form tree, one row each."""
  m = slot_modules(modules, num_slots)[slot]
  per = num_slots // len(modules)
  return {r: x[slot - m * per] for r, x in rows.items() if module_index(tuple(modules), r) == m}


def per_slot_module_update(inner: optax.GradientTransformation, modules: Sequence[str], grads: dict, states: tuple,
                           params: dict | None, ok: jax.Array | None) -> tuple[dict, tuple]:
  """``inner.update`` on each slot's module (its state covers that module's leaves only). ``grads``,
  ``params`` and the updates returned are in module form (:func:`to_module_form`). ``ok``: see :func:`guard`."""
  num_slots = len(states)
  per_slot, new_states = [], []
  for i in range(num_slots):
    g = slot_module_leaves(modules, grads, i, num_slots)
    p = None if params is None else slot_module_leaves(modules, params, i, num_slots)
    u, s = guard(ok, *inner.update(g, states[i], p), states[i])
    per_slot.append(u)
    new_states.append(s)
  stacked = {r: jnp.stack([per_slot[i][r] for i in range(num_slots)[module_rows(modules, r, num_slots)]])
             for r in grads}
  return stacked, tuple(new_states)
