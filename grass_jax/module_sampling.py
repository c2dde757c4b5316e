"""Module granularity: each active layer trains one of its modules (attention or MLP) per period.

MISA (module-wise importance sampling, NeurIPS 2025) samples a layer's modules separately rather than
whole layers. This is its uniform form on top of LISA: the layers are drawn as LISA draws them, and each
drawn layer trains one module, drawn uniformly for the period from the transform's seed and the period's
index (no state holds the choice, so resuming draws the same). The other module's gradients and updates
are zero. ``GrassSettings(modules=ATTENTION_MLP)`` turns it on (config: ``optim.granularity: module``).

Example::

  >>> import jax.numpy as jnp
  >>> from grass_jax.module_sampling import ATTENTION_MLP, mask_modules
  >>> slots = {"q_proj": jnp.ones((2, 3, 3)), "up_proj": jnp.ones((2, 3, 5))}
  >>> chosen = jnp.array([0, 1])                      # slot 0 trains attention, slot 1 its MLP
  >>> out = mask_modules(ATTENTION_MLP, slots, chosen)
  >>> [float(out["q_proj"][i].sum()) for i in (0, 1)], [float(out["up_proj"][i].sum()) for i in (0, 1)]
  ([9.0, 0.0], [0.0, 15.0])
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

__all__ = ["ATTENTION_MLP", "mask_modules", "module_index", "trained_modules"]

# The two modules of a decoder layer, by the names of grass_jax's layer leaves (each norm goes with the block
# it normalises the input or output of).
ATTENTION_MLP = (r"(?:^|/)(input_norm|[qkvo]_proj|[qkvo]_bias|[qk]_norm|post_attn_norm)$",
                 r"(?:^|/)(pre_mlp_norm|(gate|up|down)_(proj|bias)|post_mlp_norm)$")


@functools.lru_cache(maxsize=None)
def module_index(modules: tuple[str, ...], role: str) -> int:
  """The module a layer leaf belongs to: the one regex of ``modules`` that matches ``role`` (its name or path)."""
  hits = [i for i, pattern in enumerate(modules) if re.search(pattern, role)]
  if len(hits) != 1:
    raise ValueError(f"the layer leaf {role!r} matches {len(hits)} of the modules {list(modules)}; each leaf must "
                     "match exactly one: give GrassSettings(modules=...) patterns that split the layer")
  return hits[0]


def trained_modules(seed: int, num_modules: int, period_index: jax.Array, num_slots: int) -> jax.Array:
  """int32 ``[num_slots]``: the module each active layer trains in the period ``period_index``."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x3D01E)  # a stream of its own, apart from the layer draws
  return jax.random.randint(jax.random.fold_in(key, period_index), (num_slots,), 0, num_modules, dtype=jnp.int32)


def mask_modules(modules: Sequence[str], slots: Mapping[str, jax.Array], chosen: jax.Array) -> dict[str, jax.Array]:
  """``slots`` (role -> ``[gamma, ...]``) with every leaf of a module a slot does not train set to zero."""
  out = {}
  for role, x in slots.items():
    keep = chosen == module_index(tuple(modules), role)
    out[role] = jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))
  return out
