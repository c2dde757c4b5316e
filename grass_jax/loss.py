"""The next-token loss, whole or in chunks of tokens.

The LM head's float32 logits are ``[tokens, vocab]``: 1 GiB for 8192 tokens of a
32k vocabulary, and their gradient as much again, the largest activation of a
training step. :func:`chunked_cross_entropy` computes the head and the loss a
chunk of tokens at a time inside a rematerialised ``lax.scan``, so no more than
one chunk's logits (and their gradient) exist at any time; the backward pass
recomputes each chunk's logits. The head's gradient accumulates over chunks in
float32.

Example::

  h, _ = forward(params, config, tokens, mask, return_hidden=True)
  loss_sum, count = chunked_cross_entropy(params, config, h, tokens, loss_mask, chunk_tokens=2048)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from grass_jax.models.decoder import DecoderConfig, Params, logits_from_hidden

HEAD_LEAVES = ("embed", "lm_head")


def cross_entropy(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Next-token loss summed over ``loss_mask[:, 1:]`` positions; returns ``(sum, count)``."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets = tokens[:, 1:]
  mask = loss_mask[:, 1:].astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum((logz - picked) * mask), jnp.sum(mask)


def chunked_cross_entropy(params: Params, config: DecoderConfig, hidden: jax.Array, tokens: jax.Array,
                          loss_mask: jax.Array, chunk_tokens: int) -> tuple[jax.Array, jax.Array]:
  """:func:`cross_entropy` of ``logits_from_hidden(params, config, hidden)``, ``chunk_tokens`` at a time.

  Args:
    params: the model's parameters (only the head is read: ``lm_head``, or
      ``embed`` when tied).
    hidden: ``[B, T, D]`` final normed hidden states (``forward(..., return_hidden=True)``).
    tokens, loss_mask: ``[B, T]``.
    chunk_tokens: tokens per chunk; the last chunk is padded (padding carries no loss).

  Returns:
    ``(summed loss, number of loss tokens)``, equal to the unchunked loss up to
    float32 summation order.
  """
  if chunk_tokens < 1:
    raise ValueError(f"chunk_tokens must be >= 1; got {chunk_tokens}")
  d = hidden.shape[-1]
  h = hidden[:, :-1].reshape(-1, d)
  targets = tokens[:, 1:].reshape(-1)
  mask = loss_mask[:, 1:].reshape(-1).astype(jnp.float32)
  n = h.shape[0]
  chunk = min(chunk_tokens, n)
  pad = -n % chunk
  h = jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, chunk, d)
  targets = jnp.pad(targets, (0, pad)).reshape(-1, chunk)
  mask_c = jnp.pad(mask, (0, pad)).reshape(-1, chunk)
  # The head enters the loop in float32, so its gradient sums over chunks in float32; each chunk's
  # matmul still runs in the compute dtype (logits_from_hidden casts the head to it).
  head = {k: params[k].astype(jnp.float32) for k in HEAD_LEAVES if k in params}

  @jax.checkpoint
  def chunk_loss(head, h_c, y_c, m_c):
    logits = logits_from_hidden(head, config, h_c[None])[0]
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0]
    return jnp.sum((logz - picked) * m_c)

  def body(total, xs):
    return total + chunk_loss(head, *xs), None

  total, _ = jax.lax.scan(body, jnp.float32(0), (h, targets, mask_c))
  return total, jnp.sum(mask)
