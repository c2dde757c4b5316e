"""Which parameters belong to which transformer layer.

GRASS samples *layers*, so it needs to know how the leaves of a parameter tree
group into the ``L`` layers of the model. Two layouts are supported:

* **stacked**: blocks are stacked along a leading layer axis (what ``nnx.scan``
  or ``jax.lax.scan`` models use): a leaf of shape ``[L, ...]`` holds one slice
  per layer. This is the layout of :mod:`grass_jax.models` and the only one in
  which the memory-saving "slot" form (only the active layers' gradients) exists.
* **indexed**: one sub-tree per layer (``blocks_0``, ``layers.3``, ...), as in
  a Python loop over layers. Every layer must have the same leaves and shapes.

A *labels function* maps a parameter tree to a tree of the same structure whose
leaves are ints: a layer index ``l >= 0``, :data:`STACKED` for a leaf with a
leading layer axis, or :data:`NOT_A_LAYER` for leaves outside every layer
(embeddings, final norm, LM head: the always-on group, or frozen).

Example::

  >>> import jax.numpy as jnp
  >>> params = {'embed': jnp.zeros((10, 4)), 'layers': {'w': jnp.zeros((3, 4, 4))}}
  >>> labels = stacked_layers('layers')(params)
  >>> labels['layers']['w'] == STACKED, labels['embed'] == NOT_A_LAYER
  (True, True)
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

STACKED = -2
NOT_A_LAYER = -1

LabelsFn = Callable[[Any], Any]
AlwaysOn = bool | str | Callable[[str], bool]

# Matches `blocks_3`, `layers.3`, `layers/3`, `h.3`, `layer_3` as a path component.
DEFAULT_INDEX_PATTERN = r"(?:^|/)(?:blocks|block|layers|layer|h)[._/]?(\d+)(?:/|$)"


def path_str(path: tuple[Any, ...]) -> str:
  """'/'-joined readable form of a ``jax.tree_util`` key path."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return "/".join(parts)


def stacked_layers(pattern: str = r"(?:^|/)layers(?:/|$)") -> LabelsFn:
  """Labels function for blocks stacked on a leading layer axis.

  Args:
    pattern: regex searched in each leaf's '/'-joined path; matching leaves have
      a leading ``[L, ...]`` layer axis. Default: any path with a ``layers``
      component, the layout of :mod:`grass_jax.models`.

  Returns:
    A callable ``params -> labels`` for :func:`grass_jax.transform`'s ``layers``.
  """
  regex = re.compile(pattern)

  def labels(tree: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda p, _: STACKED if regex.search(path_str(p)) else NOT_A_LAYER, tree)

  return labels


def indexed_layers(pattern: str = DEFAULT_INDEX_PATTERN) -> LabelsFn:
  """Labels function for one sub-tree per layer (``blocks_0``, ``layers.3``, ...).

  Args:
    pattern: regex with one group capturing the layer index from the leaf's
      '/'-joined path. The default accepts ``blocks_N``, ``layers.N``,
      ``layers/N``, ``layer_N`` and ``h.N`` path components.

  Returns:
    A callable ``params -> labels`` for :func:`grass_jax.transform`'s ``layers``.
  """
  regex = re.compile(pattern)

  def label(p, _):
    m = regex.search(path_str(p))
    return int(m.group(1)) if m else NOT_A_LAYER

  return lambda tree: jax.tree_util.tree_map_with_path(label, tree)


def _always_on_predicate(always_on: AlwaysOn) -> Callable[[str], bool]:
  if isinstance(always_on, bool):
    return lambda _: always_on
  if isinstance(always_on, str):
    regex = re.compile(always_on)
    return lambda p: bool(regex.search(p))
  if callable(always_on):
    return always_on
  raise TypeError(f"always_on must be a bool, a regex string or a callable on the leaf path; got {always_on!r}")


@dataclasses.dataclass(frozen=True)
class LayerLayout:
  """Static split of a parameter tree into layers (computed at trace time).

  Attributes:
    treedef: structure of the parameter tree.
    paths: '/'-joined path of every leaf, in flatten order.
    num_layers: L, the number of layers.
    kind: 'stacked' or 'indexed'.
    roles: names of the per-layer leaves (keys of the "layer stack" dicts).
    role_leaves: for each role, the flat indices of its leaves: one leaf
      (stacked) or L leaves, one per layer (indexed).
    always_on: flat indices of the always-on leaves (updated every step).
    frozen: flat indices of leaves that are never updated.
    layer_size: number of parameters in one layer.
  """

  treedef: Any
  paths: tuple[str, ...]
  num_layers: int
  kind: str
  roles: tuple[str, ...]
  role_leaves: tuple[tuple[int, ...], ...]
  always_on: tuple[int, ...]
  frozen: tuple[int, ...]
  layer_size: int

  def stack_size(self, leaves: list[Any]) -> int:
    """Leading size of the layer stack in ``leaves`` (L in full form, gamma in slot form)."""
    if self.kind == "indexed":
      return self.num_layers
    return leaves[self.role_leaves[0][0]].shape[0]

  def split(self, tree: Any) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Splits a tree into ``(layer_stack, always_on)`` dicts keyed by role / path.

    ``layer_stack[role]`` has a leading axis over layers (``[L, ...]`` in full
    form, ``[gamma, ...]`` in slot form). Indexed layouts are stacked here, which
    copies; stacked layouts are returned as they are.
    """
    leaves = self.treedef.flatten_up_to(tree)
    if self.kind == "stacked":
      stack = {r: leaves[idx[0]] for r, idx in zip(self.roles, self.role_leaves)}
    else:
      stack = {r: jnp.stack([leaves[i] for i in idx]) for r, idx in zip(self.roles, self.role_leaves)}
    always = {self.paths[i]: leaves[i] for i in self.always_on}
    return stack, always

  def merge(self, stack: Mapping[str, jax.Array], always: Mapping[str, jax.Array], like: Any) -> Any:
    """Inverse of :meth:`split`; frozen leaves become zeros shaped like ``like``'s."""
    leaves = list(self.treedef.flatten_up_to(like))
    out: list[Any] = [None] * len(leaves)
    for r, idx in zip(self.roles, self.role_leaves):
      if self.kind == "stacked":
        out[idx[0]] = stack[r]
      else:
        for l, i in enumerate(idx):
          out[i] = stack[r][l]
    for i in self.always_on:
      out[i] = always[self.paths[i]]
    for i in self.frozen:
      out[i] = jnp.zeros_like(leaves[i])
    return self.treedef.unflatten(out)


def build_layout(tree: Any, labels_fn: LabelsFn, always_on: AlwaysOn = True,
                 num_layers: int | None = None) -> LayerLayout:
  """Builds the :class:`LayerLayout` of ``tree`` from a labels function.

  Args:
    tree: parameter (or gradient) tree, in full or slot form.
    labels_fn: see the module docstring.
    always_on: which leaves outside the layers are updated every step: True
      (all), False (none: frozen), a regex on the leaf path, or a predicate.
    num_layers: L when already known (the tree may then be in slot form).

  Raises:
    ValueError: with the offending leaf paths when the labels do not describe
      a consistent layer structure.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  paths = tuple(path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0])
  try:
    labels = treedef.flatten_up_to(labels_fn(tree))
  except (ValueError, TypeError) as e:
    raise ValueError(f"`layers` returned a tree whose structure differs from the parameters: {e}") from e
  labels = [int(l) for l in labels]
  is_on = _always_on_predicate(always_on)
  stacked = [i for i, l in enumerate(labels) if l == STACKED]
  indexed = [i for i, l in enumerate(labels) if l >= 0]
  outside = [i for i, l in enumerate(labels) if l == NOT_A_LAYER]
  bad = [paths[i] for i, l in enumerate(labels) if l < STACKED]
  if bad:
    raise ValueError(f"invalid layer labels for {bad}: use an index >= 0, STACKED or NOT_A_LAYER")
  if stacked and indexed:
    raise ValueError("`layers` mixes stacked leaves ({}) and per-layer leaves ({}); use one layout".format(
        paths[stacked[0]], paths[indexed[0]]))
  if not stacked and not indexed:
    raise ValueError(f"no parameter belongs to a layer; check `layers` (leaf paths: {list(paths)[:8]}...)")
  always = tuple(i for i in outside if is_on(paths[i]))
  frozen = tuple(i for i in outside if not is_on(paths[i]))

  if stacked:
    sizes = {paths[i]: leaves[i].shape[0] if leaves[i].ndim else None for i in stacked}
    if None in sizes.values() or len(set(sizes.values())) != 1:
      raise ValueError(f"stacked layer leaves must share one leading layer axis; got leading sizes {sizes}")
    n = next(iter(sizes.values()))
    if num_layers is None:
      num_layers = n
    roles = tuple(paths[i] for i in stacked)
    role_leaves = tuple((i,) for i in stacked)
    layer_size = sum(math.prod(leaves[i].shape) // n for i in stacked)
    return LayerLayout(treedef, paths, num_layers, "stacked", roles, role_leaves, always, frozen, layer_size)

  by_layer: dict[int, list[int]] = {}
  for i in indexed:
    by_layer.setdefault(labels[i], []).append(i)
  found = sorted(by_layer)
  if found != list(range(len(found))):
    raise ValueError(f"layer indices must be 0..L-1 without gaps; found {found}")
  if num_layers is not None and num_layers != len(found):
    raise ValueError(f"the tree has {len(found)} layers but the state was built for {num_layers}")
  first = by_layer[0]
  for l in found[1:]:
    mine = by_layer[l]
    shapes0 = [(leaves[i].shape, leaves[i].dtype) for i in first]
    shapes = [(leaves[i].shape, leaves[i].dtype) for i in mine]
    if shapes != shapes0:
      raise ValueError(f"layer {l} ({[paths[i] for i in mine]}) does not have the same leaves and shapes "
                       f"as layer 0 ({[paths[i] for i in first]}); GRASS needs identical layers")
  roles = tuple(f"{k}:{paths[i]}" for k, i in enumerate(first))
  role_leaves = tuple(tuple(by_layer[l][k] for l in found) for k in range(len(first)))
  layer_size = sum(math.prod(leaves[i].shape) for i in first)
  return LayerLayout(treedef, paths, len(found), "indexed", roles, role_leaves, always, frozen, layer_size)
