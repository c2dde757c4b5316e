"""The jitted train step: gradients only for the active layers ("slots").

The step differentiates with respect to the always-on leaves and a
``[gamma, ...]`` copy of the active layers' weights. Inside the scanned,
rematerialised block each layer ``l`` uses its slot's weights when it is
active and the frozen stack otherwise (``jnp.where`` on a dynamic slot index),
so switching layers never recompiles, gradients come out in the GRASS
transform's slot form, and the frozen layers' weight gradients are never
stored: gradient memory scales with gamma, not with L (DESIGN.md).

Example::

  step = make_train_step(config, tx, grad_accum=2)
  params, opt_state, metrics = step(params, opt_state, batch)
  # batch: tokens / attention_mask / loss_mask, each [grad_accum, B, T]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from grass_jax.layers import stacked_layers
from grass_jax.models.decoder import DecoderConfig, Params, forward
from grass_jax.transform import apply_slot_updates, find_state, replace_state

LAYERS = stacked_layers("layers")
Batch = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Next-token loss summed over ``loss_mask[:, 1:]`` positions; returns ``(sum, count)``."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets = tokens[:, 1:]
  mask = loss_mask[:, 1:].astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum((logz - picked) * mask), jnp.sum(mask)


def slot_loss(trainable: Params, frozen_layers: dict[str, jax.Array], active: jax.Array, config: DecoderConfig,
              batch: Batch, *, dtype: Any, remat: str) -> tuple[jax.Array, jax.Array]:
  """Summed loss of a micro-batch as a function of the trainable slot tree.

  Args:
    trainable: params whose ``layers`` leaves are ``[gamma, ...]`` (the active
      layers, in the order of ``active``); other leaves are the always-on group.
    frozen_layers: the full ``[L, ...]`` layer stack (no gradient flows to it).
    active: int32 ``[gamma]`` layer index of each slot.
  """
  num_layers = config.num_layers
  gamma = active.shape[0]
  frozen_layers = jax.lax.stop_gradient(frozen_layers)
  if gamma == num_layers:  # all layers train: the slots are the stack itself (active == arange)
    params, override = trainable, None
  else:
    slot_of = jnp.full((num_layers,), -1, jnp.int32).at[active].set(jnp.arange(gamma, dtype=jnp.int32))

    def override(lp: Params, idx: jax.Array) -> Params:
      slot = slot_of[idx]
      pick = jnp.maximum(slot, 0)
      return {k: jnp.where(slot >= 0, trainable["layers"][k][pick].astype(v.dtype), v) for k, v in lp.items()}

    params = {**trainable, "layers": frozen_layers}
  logits, _ = forward(params, config, batch["tokens"], batch["attention_mask"], dtype=dtype, remat=remat,
                      layer_override=override)
  return cross_entropy(logits, batch["tokens"], batch["loss_mask"])


def make_train_step(config: DecoderConfig, tx: optax.GradientTransformation, *, dtype: Any = jnp.bfloat16,
                    remat: str = "full", donate: bool = True) -> Callable:
  """Builds ``step(params, opt_state, batch) -> (params, opt_state, metrics)``, jitted.

  ``batch`` arrays have a leading gradient-accumulation axis ``[A, B, T]``;
  micro-batch gradients are summed in a ``lax.scan`` and divided by the number
  of loss tokens. A step whose gradients are not finite changes no parameter
  and no moment (the GRASS transform skips it) and ``metrics['skipped']`` is 1.
  ``tx`` must contain one GRASS transform (any strategy), with any clipping
  or scaling before or after it in an ``optax.chain``.
  """

  def step(params: Params, opt_state: Any, batch: Batch) -> tuple[Params, Any, dict[str, jax.Array]]:
    active = find_state(opt_state).active
    all_layers = active.shape[0] == config.num_layers  # full fine-tuning: no slot copies
    trainable = params if all_layers else {**params, "layers": {k: v[active] for k, v in params["layers"].items()}}
    grad_fn = jax.value_and_grad(
        lambda tr, frozen, act, mb: slot_loss(tr, frozen, act, config, mb, dtype=dtype, remat=remat), has_aux=True)

    def micro(acc, mb):
      (loss_sum, count), g = grad_fn(trainable, params["layers"], active, mb)
      acc_g, acc_l, acc_n = acc
      return (jax.tree.map(jnp.add, acc_g, g), acc_l + loss_sum, acc_n + count), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
    (grads, loss_sum, count), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), batch)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, trainable)
    loss = loss_sum / denom
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # The GRASS transform itself skips non-finite steps (zero updates, moments kept).
    updates, new_opt_state = tx.update(grads, opt_state, trainable)
    if all_layers:
      new_params = optax.apply_updates(params, updates)
    else:
      new_params = apply_slot_updates(params, updates, active, LAYERS)
    metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count, "skipped": (~ok).astype(jnp.int32)}
    return new_params, new_opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def replace_grass_state(opt_state: Any, **fields: Any) -> Any:
  """Convenience: ``opt_state`` with some :class:`GrassState` fields replaced."""
  return replace_state(opt_state, find_state(opt_state)._replace(**fields))
