"""The next-token loss, whole or in chunks of tokens.

The LM head's float32 logits are ``[tokens, vocab]``: 1 GiB for 8192 tokens of a
32k vocabulary, and their gradient as much again, the largest activation of a
training step. :func:`chunked_cross_entropy` computes the head and the loss a
chunk of tokens at a time inside a ``lax.scan``, so no more than one chunk's
logits (and their gradient) exist at any time; a hand-written backward pass
recomputes each chunk's logits, keeps the head in its own dtype and sums its
gradient over chunks in float32.

Example::

  h, _ = hidden_states(params, config, tokens, mask)
  loss_sum, count = chunked_cross_entropy(params, config, h, tokens, loss_mask, chunk_tokens=2048)
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from grass_jax.models.decoder import DecoderConfig, Params


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
    hidden: ``[B, T, D]`` final normed hidden states (:func:`~grass_jax.models.decoder.hidden_states`).
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
  head = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
  total = _chunked_loss(config.final_softcap, head, h, targets, mask_c)
  return total, jnp.sum(mask)


def _chunk_logits(head: jax.Array, h_c: jax.Array, softcap: float | None) -> tuple[jax.Array, jax.Array]:
  """One chunk's float32 logits and, with soft-capping, ``d logits / d raw logits``."""
  raw = jnp.einsum("cd,dv->cv", h_c, head.astype(h_c.dtype), preferred_element_type=jnp.float32)
  if softcap is None:
    return raw, jnp.float32(1.0)
  t = jnp.tanh(raw / softcap)
  return t * softcap, 1.0 - t * t


def _chunk_loss(logits: jax.Array, y_c: jax.Array, m_c: jax.Array) -> jax.Array:
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0]
  return jnp.sum((logz - picked) * m_c)


# A hand-written backward pass, not autodiff of a rematerialised scan: autodiff carries the head
# through the loop in float32 (a [D, V] float32 copy besides the [D, V] float32 gradient sum) and
# rounds each chunk's head gradient to the head's dtype before summing. Here the head stays in its
# own dtype, each chunk's gradient comes out of the matmul in float32, and only the sum is rounded.
@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_loss(softcap: float | None, head: jax.Array, h: jax.Array, targets: jax.Array,
                  mask: jax.Array) -> jax.Array:
  def body(total, xs):
    h_c, y_c, m_c = xs
    return total + _chunk_loss(_chunk_logits(head, h_c, softcap)[0], y_c, m_c), None

  return jax.lax.scan(body, jnp.float32(0), (h, targets, mask))[0]


def _chunked_loss_fwd(softcap, head, h, targets, mask):
  return _chunked_loss(softcap, head, h, targets, mask), (head, h, targets, mask)


def _chunked_loss_bwd(softcap, residuals, g):
  head, h, targets, mask = residuals

  def body(dhead, xs):
    h_c, y_c, m_c = xs
    logits, dcap = _chunk_logits(head, h_c, softcap)
    probs = jax.nn.softmax(logits, axis=-1)
    dlogits = (probs - jax.nn.one_hot(y_c, logits.shape[-1], dtype=probs.dtype)) * (m_c * g)[:, None] * dcap
    dlogits = dlogits.astype(h_c.dtype)
    dh_c = jnp.einsum("cv,dv->cd", dlogits, head.astype(h_c.dtype), preferred_element_type=jnp.float32)
    dhead = dhead + jnp.einsum("cd,cv->dv", h_c, dlogits, preferred_element_type=jnp.float32)
    return dhead, dh_c.astype(h_c.dtype)

  dhead, dh = jax.lax.scan(body, jnp.zeros(head.shape, jnp.float32), (h, targets, mask))
  return dhead.astype(head.dtype), dh, None, None


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)
