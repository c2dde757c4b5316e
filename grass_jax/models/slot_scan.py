"""The slot scan: a decoder layer stack that trains ``gamma`` of its ``L`` layers.

GRASS trains a few layers at a time. Differentiating the whole stack and
dropping the frozen layers' weight gradients would compute (and, in a plain
``lax.scan``, store) them anyway. The slot scan instead has a hand-written
backward pass:

* the forward pass is the model's own layer scan; it keeps each block's input
  (``remat='full'``) or what the block's *input* gradient needs under the
  ``remat`` policy, never a copy of the weights;
* the trained layers, in descending order, split the stack into ``gamma + 1``
  runs of frozen layers. Each run is a loop with dynamic bounds that computes
  input gradients only (no weight-gradient matmuls); each trained layer is
  unrolled, recomputed once, and writes its weight gradient into its slot in
  place. The step compiles once whatever layers are drawn.

Interface with the model (:mod:`grass_jax.models.decoder`): per layer the scan
runs :func:`~grass_jax.models.decoder.run_block` on the layer's slice of the
stacked ``params['layers']`` and the call's
:class:`~grass_jax.models.decoder.LayerInputs`, and it returns the final hidden
state. :func:`slot_stack` packages this as ``forward(..., layer_stack=...)``.

**Measuring layer importance in the same pass** (``measure``). The backward
pass can also report every layer's squared weight-gradient norm, as the
gradient of a float32 ``[L]`` *sink* input (zeros; its value is never read):

* ``'none'``: nothing (the sink is not used);
* ``'exact'``: the trained layers' squared norms; and while
  ``Measurement.probing`` is true every frozen layer's too (GRASS's probing
  phase): its weight gradient is formed, reduced to a number and dropped, so
  no more than one layer's gradient exists at a time;
* ``'sketch'``: every layer at every step. Trained layers exactly; for a frozen
  layer each linear map ``y = x W`` gets a probe ``y += (x A) Z^T`` with ``A = 0``
  ``[d_in, k]`` and ``Z ~ N(0, 1)`` ``[d_out, k]``: the gradient with respect to
  ``A`` is ``x^T dy Z``, and ``E ||x^T dy Z||^2 / k = ||x^T dy||_F^2``. This
  costs about ``5 k tokens (d_in + d_out)`` flops per map, against
  ``2 tokens d_in d_out`` for the weight gradient. Norm weights and biases
  are exact. Frozen blocks are recomputed in this mode whatever ``remat`` says.
  With ``sketch_every > 1`` frozen layers are sketched only on the steps where
  ``Measurement.sketching`` is true; on the others they cost what they cost
  under ``'exact'`` (input gradients only, and the backward pass may stop at
  the lowest trained layer).

**Stopping at the lowest trained layer** (``input_grad=False``). When nothing
below the stack trains (frozen embeddings), the gradient with respect to the
stack's input is never used, so the backward pass ends at the lowest trained
layer: the frozen layers below it are neither recomputed nor differentiated
(except where they are measured: while probing, or by the sketch), and the
returned input gradient is zeros. PyTorch's autograd does the same by itself.

**Unrolling the forward pass** (``unroll_forward``). In a scan, each layer's weights are a dynamic
slice of the ``[L, ...]`` stack, and XLA:GPU copies every weight matrix out of the stack before the
matmuls that read it. A Python loop over static slices lets XLA read the weights in place: it pays
where weight reads dominate (Llama-2-7B at batch 2), not where tokens do (TinyLlama at batch 16;
``benchmarks/probes/weight_copies.py``, docs/performance-history.md). It costs compile time (the HLO holds every block), and it applies with
``remat='full'`` only. The backward pass keeps its loops.

Squared norms of micro-batches add up (the sink's gradient is a sum), so with
gradient accumulation a layer's measurement is the sum over micro-batches of
its squared micro-batch gradient norms (exact with one micro-batch).

Example::

  stack = slot_stack(config, zeros_like_slots, slot_of, attention="einsum")
  logits, _ = forward(params, config, tokens, mask, layer_stack=stack)
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from grass_jax.models.decoder import LINEAR_MAPS, DecoderConfig, LayerInputs, LayerStack, Params, run_block, with_remat

MEASURES = ("none", "exact", "sketch")


class ScanSettings(NamedTuple):
  """Static settings of the slot scan.

  Attributes:
    attention: a resolved attention implementation (not 'auto').
    act_sharding: activation sharding on a mesh, or None.
    remat: what the forward pass keeps of frozen layers (a ``remat`` policy).
    measure: 'none', 'exact' or 'sketch' (module docstring).
    sketch_size: k, the number of random projections of a sketch.
    sketch_every: 1: a 'sketch' measures frozen layers at every step; n > 1:
      only where ``Measurement.sketching`` is true (a ``lax.cond``).
    may_probe: whether any step can probe; without it frozen layers have no
      probing branch (a ``lax.cond``) in the backward pass.
    input_grad: whether the caller uses the gradient with respect to the
      stack's input; without it the backward pass stops at the lowest trained
      layer (module docstring).
    unroll_forward: the forward pass as a Python loop over static slices of the
      stack instead of a scan (module docstring); with ``remat='full'`` only.
    slot_roles: per slot, the layer leaves (roles) whose weight gradient it
      takes (module granularity, :mod:`grass_jax.module_sampling`); the
      others' come out zero and are never formed. None: every leaf. With it a
      leaf's handles may hold only the rows of the slots that take it (module
      form, :func:`slot_stack`).
  """
  attention: str
  act_sharding: Any = None
  remat: str = "full"
  measure: str = "none"
  sketch_size: int = 4
  may_probe: bool = True
  input_grad: bool = True
  sketch_every: int = 1
  unroll_forward: bool = False
  slot_roles: tuple[tuple[str, ...], ...] | None = None


class Measurement(NamedTuple):
  """Per-step inputs of the importance measurement (no gradient flows to these).

  Attributes:
    probing: bool scalar; with ``measure`` 'exact' or 'sketch', every frozen
      layer computes its exact weight-gradient norm this step.
    key: PRNG key of the sketch's random projections.
    sketching: bool scalar; with ``measure`` 'sketch' and ``sketch_every > 1``,
      whether frozen layers are sketched this step (ignored otherwise).
  """
  probing: jax.Array
  key: jax.Array
  sketching: jax.Array | bool = True


def slot_stack(config: DecoderConfig, slots: Params, slot_of: jax.Array, settings: ScanSettings | None = None, /, *,
               sink: jax.Array | None = None, measurement: Measurement | None = None, **fields: Any) -> LayerStack:
  """A ``layer_stack`` for :func:`~grass_jax.models.decoder.forward` that trains the slotted layers.

  Args:
    slots: ``[gamma, ...]`` handles for the trained layers' weights: their
      gradient is the weight gradient of layer ``i`` at slot ``slot_of[i]``;
      their values are never read (pass zeros: the weights are read from the
      stack, so the trained layers need not be copied). With ``slot_roles`` a
      leaf may instead hold one row per slot that takes it, in slot order
      (module form): no gradient buffer then holds a leaf a slot does not train.
    slot_of: int ``[L]``, each layer's slot or -1.
    settings, fields: how it computes and measures, a :class:`ScanSettings` or its fields as keywords (which
      replace the settings' own): ``attention`` (required), ``remat`` (what frozen layers keep for the
      backward pass; trained layers are always recomputed; 'full' under a sketch), ``measure``,
      ``sketch_size``, ``sketch_every`` (the importance measurement, module docstring), ``may_probe``
      (False: ``measurement.probing`` is never true, and the probing branch is left out of the backward
      pass), ``input_grad`` (False: the gradient with respect to the stack's input is not used, so the
      backward pass stops at the lowest trained layer and returns zeros for it), ``unroll_forward``
      (static slices instead of a scan; ``remat='full'`` only), ``act_sharding``.
    sink: float32 ``[L]`` zeros whose gradient receives the squared norms
      (required unless ``measure='none'``).
    measurement: the step's :class:`Measurement` (required unless 'none').
  """
  settings = ScanSettings(**fields) if settings is None else settings._replace(**fields)
  measure = settings.measure
  if measure not in MEASURES:
    raise ValueError(f"measure must be one of {MEASURES}; got {measure!r}")
  if measure != "none" and (sink is None or measurement is None):
    raise ValueError(f"measure={measure!r} needs a sink and a Measurement")
  if measure == "sketch" and settings.sketch_size < 1:
    raise ValueError(f"sketch_size must be >= 1; got {settings.sketch_size}")
  if settings.sketch_every < 1:
    raise ValueError(f"sketch_every must be >= 1; got {settings.sketch_every}")
  chex.assert_shape(slot_of, (config.num_layers,))
  _row_tables(settings, slots)  # checks the handles' rows against slot_roles
  remat = "full" if measure == "sketch" else settings.remat
  settings = settings._replace(remat=remat, unroll_forward=settings.unroll_forward and remat == "full")
  if measure == "none":
    sink = measurement = None

  def run(layers: Params, h: jax.Array, inputs: LayerInputs) -> jax.Array:
    return _slot_scan(config, settings, slots, jax.lax.stop_gradient(layers), h, sink, (slot_of, inputs, measurement))

  return run


def _run_block(config: DecoderConfig, settings: ScanSettings, lp: Params, h: jax.Array, idx: jax.Array,
               inputs: LayerInputs, probes=None) -> jax.Array:
  return run_block(config, lp, h, idx, inputs, attention=settings.attention, act_sharding=settings.act_sharding,
                   probes=probes)


def squared_norm(tree: Any) -> jax.Array:
  """Sum of the squares of every leaf, in float32 (a layer's measured importance)."""
  return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)), jnp.float32(0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _slot_scan(config, settings, slots, frozen, h, sink, given):
  """The layer stack ``frozen`` applied to ``h``; differentiable in ``slots`` (and ``sink``).

  ``given``: ``(slot_of, inputs, measurement)``, the step's inputs that take no gradient.
  """
  return _slot_scan_fwd(config, settings, slots, frozen, h, sink, given)[0]


def _frozen_vjp(config, settings, lp, h, idx, inputs):
  """``(out, pullback)`` of one block as a function of its input only, under the remat policy."""
  return jax.vjp(with_remat(lambda x: _run_block(config, settings, lp, x, idx, inputs), settings.remat), h)


def _residual_sources(pullback, lp, h, idx) -> tuple[Any, list[tuple], list[jax.Array]]:
  """Splits a block pullback's residuals into what must be stored and what the backward pass has anyway.

  Returns ``(treedef, sources, stored)``: a leaf that *is* one of the layer's weights, its input or
  its index is re-supplied from the weight stack, the stored block inputs or the loop counter (so
  weights are never stacked per layer); every other leaf is stored. Deciding by identity is safe:
  a leaf not recognised is merely stored.
  """
  leaves, treedef = jax.tree.flatten(pullback)
  known = [(("w", k), v) for k, v in lp.items()] + [(("h",), h), (("idx",), idx)]
  sources = [next((tag for tag, v in known if leaf is v), ("stored",)) for leaf in leaves]
  return treedef, sources, [leaf for leaf, src in zip(leaves, sources) if src == ("stored",)]


def _forward_unrolled(config, settings, frozen, h, inputs) -> tuple[jax.Array, jax.Array]:
  """``(output, block inputs [L, ...])`` of the stack, one block per static slice (ScanSettings.unroll_forward)."""
  hs = jnp.zeros((config.num_layers,) + h.shape, h.dtype)
  for layer in range(config.num_layers):
    hs = hs.at[layer].set(h)  # in place, like the scan's stacked outputs: no second copy of the block inputs
    h = _run_block(config, settings, {k: w[layer] for k, w in frozen.items()}, h, jnp.int32(layer), inputs)
  return h, hs


def _slot_scan_fwd(config, settings, slots, frozen, h, sink, given):
  del sink  # only its gradient is written
  slot_of, inputs, measurement = given
  # The slots' values are never read; empty [rows, 0] stand-ins carry their rows and dtype to the backward pass.
  marks = jax.tree.map(lambda x: jnp.zeros((x.shape[0], 0), x.dtype), slots)
  if settings.unroll_forward:
    out, hs = _forward_unrolled(config, settings, frozen, h, inputs)
    return out, (marks, frozen, slot_of, hs, [], inputs, measurement)

  def body(h, xs):
    lp, idx = xs
    if settings.remat == "full":  # keep only the block input; the backward pass recomputes the block
      return _run_block(config, settings, lp, h, idx, inputs), (h, [])
    out, pullback = _frozen_vjp(config, settings, lp, h, idx, inputs)
    return out, (h, _residual_sources(pullback, lp, h, idx)[2])

  out, (hs, stored) = jax.lax.scan(body, h, (frozen, jnp.arange(slot_of.shape[0])))
  return out, (marks, frozen, slot_of, hs, stored, inputs, measurement)


class _Backward(NamedTuple):
  """What the backward pass's steps share."""
  config: DecoderConfig
  settings: ScanSettings
  frozen: Params
  hs: jax.Array
  stored: list
  inputs: LayerInputs
  measurement: Measurement | None
  layout: dict

  def layer_params(self, layer):
    return {k: jax.lax.dynamic_index_in_dim(w, layer, keepdims=False) for k, w in self.frozen.items()}

  def block_input(self, layer):
    return jax.lax.dynamic_index_in_dim(self.hs, layer, keepdims=False)

  def input_grad(self, layer, dh):
    """Input gradient of a frozen layer: no weight-gradient matmuls."""
    h_in = self.block_input(layer)
    if self.settings.remat == "full":
      return jax.vjp(lambda x: self.run(self.layer_params(layer), x, layer), h_in)[1](dh)[0]
    lp, saved = self.layer_params(layer), iter([jax.lax.dynamic_index_in_dim(r, layer, keepdims=False)
                                                for r in self.stored])
    pick = {"w": lambda src: lp[src[1]], "h": lambda src: h_in, "idx": lambda src: layer,
            "stored": lambda src: next(saved)}
    return self.layout["treedef"].unflatten([pick[src[0]](src) for src in self.layout["sources"]])(dh)[0]

  def run(self, lp, x, layer, probes=None):
    return _run_block(self.config, self.settings, lp, x, layer, self.inputs, probes)

  def weight_and_input_grad(self, layer, dh, roles=None):
    """``(weight gradient, input gradient)`` of a layer from one recomputation; with ``roles``, only those
    leaves' weight gradients are formed and returned."""
    lp = self.layer_params(layer)
    if roles is None:
      _, vjp = jax.vjp(lambda p, x: self.run(p, x, layer), lp, self.block_input(layer))
      return vjp(dh)
    rest = {k: v for k, v in lp.items() if k not in roles}
    _, vjp = jax.vjp(lambda p, x: self.run({**rest, **p}, x, layer), {k: lp[k] for k in roles},
                     self.block_input(layer))
    return vjp(dh)

  def slot_grads(self, slot, layer, dh, grads, tables):
    """The layer in ``slot`` from one recomputation: its input gradient, ``grads`` with the weight gradients
    of the leaves the slot trains written into its rows (``tables``: :func:`_row_tables`), and their squared
    norm. By modules (``settings.slot_roles``) one branch per distinct set of leaves, chosen by the (dynamic)
    slot, forms and writes that set alone: no branch returns a whole layer's gradient."""
    roles = self.settings.slot_roles

    def branch(kind, layer, dh, grads):
      dp, dx = self.weight_and_input_grad(layer, dh, kind)
      written = {k: _write_row(grads[k], dp[k], slot, tables[k]) for k in dp}
      return dx, {**grads, **written}, squared_norm(dp) if self.settings.measure != "none" else jnp.float32(0)

    if roles is None:
      return branch(None, layer, dh, grads)
    kinds = sorted(set(roles))
    if len(kinds) == 1:
      return branch(kinds[0], layer, dh, grads)
    kind_of_slot = jnp.asarray([kinds.index(r) for r in roles], jnp.int32)
    return jax.lax.switch(kind_of_slot[slot], [functools.partial(branch, kind) for kind in kinds], layer, dh, grads)

  def exact_norm(self, layer, dh):
    """``(input gradient, squared weight-gradient norm)``; the gradient itself is dropped."""
    dp, dx = self.weight_and_input_grad(layer, dh)
    return dx, squared_norm(dp)

  def sketched_norm(self, layer, dh):
    """``(input gradient, estimated squared weight-gradient norm)`` from rank-k probes (module docstring)."""
    lp, k = self.layer_params(layer), self.settings.sketch_size
    maps = [m for m in LINEAR_MAPS if m in lp]
    small = {m: v for m, v in lp.items() if m not in maps}  # norm weights and biases: exact
    keys = jax.random.split(jax.random.fold_in(self.measurement.key, layer), len(maps))
    zs = {m: jax.random.normal(key, (lp[m].shape[1], k), jnp.float32) for m, key in zip(maps, keys)}
    probes = {m: jnp.zeros((lp[m].shape[0], k), jnp.float32) for m in maps}

    def f(small, probes, x):
      return self.run({**lp, **small}, x, layer, {m: (probes[m], zs[m]) for m in maps})

    _, vjp = jax.vjp(f, small, probes, self.block_input(layer))
    d_small, d_probes, dx = vjp(dh)
    return dx, squared_norm(d_small) + squared_norm(d_probes) / k

  def frozen_step(self, layer, dh, sink):
    """One frozen layer of the backward pass, measuring it as ``settings.measure`` says."""
    if _frozen_measured(self.settings, self.measurement) is False:  # only trained layers are measured
      return self.input_grad(layer, dh), sink
    cases = self.measurement_cases()
    index = jnp.int32(len(cases) - 1)
    for i in reversed(range(len(cases) - 1)):  # the first case whose condition holds runs
      index = jnp.where(cases[i][0], i, index)
    branches = [branch for _, branch in cases]
    dx, sq = branches[0](layer, dh) if len(branches) == 1 else jax.lax.switch(index, branches, layer, dh)
    return dx, sink.at[layer].set(sq)

  def measurement_cases(self) -> list[tuple[Any, Any]]:
    """``(condition, branch)`` pairs for a frozen layer, the first that holds running (the last always holds):
    the exact norm while probing, the sketch on a sketch step, else the input gradient alone."""
    s, m = self.settings, self.measurement
    cases = [(m.probing, self.exact_norm)] if s.may_probe else []
    if s.measure == "sketch":
      cases.append((m.sketching if s.sketch_every > 1 else True, self.sketched_norm))
    if not (s.measure == "sketch" and s.sketch_every == 1):
      cases.append((True, lambda l, d: (self.input_grad(l, d), jnp.float32(0))))
    return cases

  def frozen_run(self, dh, sink, lo, hi):
    """Backward through frozen layers hi-1 down to lo (dynamic bounds)."""
    def body(i, carry):
      return self.frozen_step((hi - 1 - i).astype(jnp.int32), *carry)
    return jax.lax.fori_loop(0, hi - lo, body, (dh, sink))


def _pullback_layout(config, settings, frozen, hs, stored, inputs) -> dict:
  """The frozen pullback's structure, from an abstract trace of the forward code (nothing is computed)."""
  layout = {}
  if settings.remat == "full":
    return layout

  def probe(lp, h, idx):
    _, pullback = _frozen_vjp(config, settings, lp, h, idx, inputs)
    layout["treedef"], layout["sources"], kept = _residual_sources(pullback, lp, h, idx)
    return kept

  shapes = jax.eval_shape(probe, {k: w[0] for k, w in frozen.items()}, hs[0], jnp.zeros((), jnp.int32))
  if [(x.shape, x.dtype) for x in shapes] != [(x.shape[1:], x.dtype) for x in stored]:
    raise RuntimeError("slot scan: the backward pass rebuilt a different block pullback than the forward pass")
  return layout


def _num_slots(settings: ScanSettings, slots: Params) -> int:
  """gamma: one per ``slot_roles`` entry, or the handles' rows (slot form)."""
  return len(settings.slot_roles) if settings.slot_roles is not None else jax.tree.leaves(slots)[0].shape[0]


def _row_tables(settings: ScanSettings, slots: Params) -> dict[str, Any]:
  """Per leaf, None (a row per slot) or, in module form, each slot's row of that leaf (-1: the slot does not
  take it), an int ``[gamma]`` table."""
  roles = settings.slot_roles
  gamma = _num_slots(settings, slots)
  tables = {}
  for k, x in slots.items():
    takers = [j for j in range(gamma) if roles is None or k in roles[j]]
    if x.shape[0] == gamma:
      tables[k] = None
    elif x.shape[0] == len(takers):
      tables[k] = [takers.index(j) if j in takers else -1 for j in range(gamma)]
    else:
      raise ValueError(f"the slot handles of {k!r} have {x.shape[0]} rows; expected {gamma} (one per slot) or "
                       f"{len(takers)} (one per slot whose slot_roles take it)")
  return tables


def _write_row(g: jax.Array, dp: jax.Array, slot: jax.Array, table: list[int] | None) -> jax.Array:
  """``g`` with ``dp`` written in place at ``slot``'s row (``table``: see :func:`_row_tables`); the slot takes
  this leaf (its branch forms only the leaves it trains), so its row is never -1."""
  row = slot if table is None else jnp.asarray(table, jnp.int32)[slot]
  return jax.lax.dynamic_update_index_in_dim(g, dp.astype(g.dtype), row, 0)


def _slot_scan_bwd(config, settings, res, d_out):
  marks, frozen, slot_of, hs, stored, inputs, measurement = res
  tables = _row_tables(settings, marks)
  gamma = _num_slots(settings, marks)
  num_layers = slot_of.shape[0]
  bw = _Backward(config, settings, frozen, hs, stored, inputs, measurement,
                 _pullback_layout(config, settings, frozen, hs, stored, inputs))
  measuring = settings.measure != "none"
  sink = jnp.zeros((num_layers,), jnp.float32) if measuring else None

  # The trained layers in descending order split the stack into gamma + 1 runs of frozen layers.
  # Each run is a loop with dynamic bounds (one compilation whatever the draw); each trained layer
  # is unrolled and computes its input and weight gradients from one recomputation, writing the
  # latter into its slot in place. Nothing weight-sized is carried through a loop or a branch.
  layer_of = layers_of_slots(slot_of, gamma)
  order = jnp.argsort(-layer_of)  # slots, deepest layer first
  grads = {k: jnp.zeros(m.shape[:1] + frozen[k].shape[1:], m.dtype) for k, m in marks.items()}
  dh, hi = d_out, jnp.asarray(num_layers, layer_of.dtype)
  for j in range(gamma):
    slot = order[j]
    layer = layer_of[slot]
    dh, sink = bw.frozen_run(dh, sink, layer + 1, hi)
    # The layer's weights are sliced out of the stack (a copy per matrix, for cuBLAS) only once its turn
    # comes: the draw is known from the start, and XLA would otherwise copy every trained layer's weights
    # early and hold them all through the backward pass.
    layer, dh = jax.lax.optimization_barrier((layer, dh))
    dh, grads, sq = bw.slot_grads(slot, layer, dh, grads, tables)
    if measuring:
      sink = sink.at[layer].set(sq)
    hi = layer
  dh, sink = bw.frozen_run(dh, sink, _lowest_needed(settings, measurement, hi), hi)
  if not settings.input_grad:
    dh = jnp.zeros_like(dh)  # the caller does not use it (ScanSettings.input_grad)
  return grads, None, dh, sink, None


def _frozen_measured(settings: ScanSettings, measurement: Measurement | None) -> bool | jax.Array:
  return frozen_layers_measured(settings.measure, measurement, may_probe=settings.may_probe,
                                sketch_every=settings.sketch_every)


def frozen_layers_measured(measure: str, measurement: Measurement | None, *, may_probe: bool,
                           sketch_every: int) -> bool | jax.Array:
  """Whether frozen layers are measured this step: False or True when that is known statically (no
  measurement at all, or a sketch at every step), else a traced bool (a probing or a sketch step)."""
  if measure == "sketch" and sketch_every == 1:
    return True
  measured = measurement.sketching if measure == "sketch" else False
  if measure != "none" and may_probe:
    measured = measurement.probing | measured
  return measured


def layers_of_slots(slot_of: jax.Array, gamma: int) -> jax.Array:
  """int ``[gamma]``: the layer in each slot (the inverse of ``slot_of``)."""
  return jnp.argmax(slot_of[None, :] == jnp.arange(gamma)[:, None], axis=1)


def _lowest_needed(settings: ScanSettings, measurement: Measurement | None, hi: jax.Array) -> jax.Array:
  """Where the backward pass below the lowest trained layer ``hi`` may stop.

  Layer 0 when the input gradient is used or frozen layers are measured this step (a sketch step, a
  probing step); otherwise ``hi`` itself: the loop below it runs no iteration.
  """
  if settings.input_grad:
    return jnp.zeros_like(hi)
  return jnp.where(_frozen_measured(settings, measurement), 0, hi).astype(hi.dtype)


_slot_scan.defvjp(_slot_scan_fwd, _slot_scan_bwd)
