"""Batched greedy generation with a KV cache, fully jitted with fixed shapes.

Prompts are left-padded to one length (pick a few bucket lengths to keep the
number of compilations small); the prompt is prefilled in one call, then
up to ``max_new_tokens`` decode steps run inside one loop (it stops once every row has ended).

Example::

  >>> import jax, jax.numpy as jnp
  >>> from grass_jax.models import llama, init_params
  >>> cfg = llama.config_from_hf({'model_type': 'llama', 'vocab_size': 32, 'hidden_size': 16,
  ...     'intermediate_size': 32, 'num_hidden_layers': 2, 'num_attention_heads': 2})
  >>> params = init_params(cfg, jax.random.PRNGKey(0))
  >>> out = greedy_generate(params, cfg, jnp.array([[0, 5, 6]]), jnp.array([[0, 1, 1]]), 4)
  >>> out.shape
  (1, 4)
"""

from __future__ import annotations

from functools import partial
from typing import Any

import chex
import jax
import jax.numpy as jnp

from grass_jax.models.decoder import DecoderConfig, ForwardOptions, KVCache, Params, forward, init_cache


@partial(jax.jit, static_argnames=("config", "max_new_tokens", "eos_token_id", "dtype"))
def greedy_generate(params: Params, config: DecoderConfig, tokens: jax.Array, mask: jax.Array,
                    max_new_tokens: int, eos_token_id: int | None = None, dtype: Any = jnp.float32) -> jax.Array:
  """Greedy continuation of left-padded prompts.

  Args:
    tokens: int ``[B, T]`` left-padded prompts.
    mask: ``[B, T]`` 1 for prompt tokens, 0 for padding.
    max_new_tokens: number of tokens to generate.
    eos_token_id: after it, a row keeps emitting it (so outputs stay rectangular); once every row has
      emitted it, decoding stops.

  Returns:
    int32 ``[B, max_new_tokens]`` generated tokens.
  """
  chex.assert_equal_shape([tokens, mask])
  b, t = tokens.shape
  total = t + max_new_tokens
  cache = init_cache(config, b, total, dtype)
  cache_mask = jnp.zeros((b, total), bool).at[:, :t].set(mask.astype(bool))
  cache = cache._replace(mask=cache_mask, index=jnp.int32(0))
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  options = ForwardOptions(dtype=dtype)
  logits, cache = forward(params, config, tokens, mask, positions=positions, cache=cache, options=options)
  first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
  next_pos = jnp.sum(mask, axis=1).astype(jnp.int32)

  def step(carry, i):
    cache, token, pos, done = carry
    index = t + i
    cache = cache._replace(mask=cache.mask.at[:, index].set(True), index=index.astype(jnp.int32))
    logits, cache = forward(params, config, token[:, None], None, positions=pos[:, None], cache=cache,
                            options=options)
    nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    if eos_token_id is not None:
      done = done | (token == eos_token_id)
      nxt = jnp.where(done, eos_token_id, nxt)
    return (cache, nxt, pos + 1, done), token

  init = (cache, first, next_pos, jnp.zeros((b,), bool))
  if eos_token_id is None:
    _, out = jax.lax.scan(step, init, jnp.arange(max_new_tokens))
    return out.T
  # With an end token, stop once every row has emitted it: the rest of the output is that token anyway.
  def unfinished(carry):
    i, (_, token, _, done), _ = carry
    return (i < max_new_tokens) & ~jnp.all(done | (token == eos_token_id))

  def decode(carry):
    i, inner, out = carry
    inner, token = step(inner, i)
    return i + 1, inner, out.at[i].set(token)

  out = jnp.full((max_new_tokens, b), eos_token_id, jnp.int32)
  _, _, out = jax.lax.while_loop(unfinished, decode, (jnp.int32(0), init, out))
  return out.T


__all__ = ["KVCache", "greedy_generate"]
