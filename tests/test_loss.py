"""The chunked LM head + loss: equal to the whole loss, and smaller in memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grass_jax import models
from grass_jax.loss import chunked_cross_entropy, cross_entropy
from grass_jax.models import llama

CFG = llama.config_from_hf({"model_type": "llama", "vocab_size": 300, "hidden_size": 16, "intermediate_size": 24,
                            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
TIED = llama.config_from_hf({**CFG.hf_config, "tie_word_embeddings": True})


def _data(b=3, t=11, seed=0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, 300, (b, t)), jnp.int32)
  loss_mask = jnp.asarray(rng.random((b, t)) < 0.7, jnp.int32)
  return tokens, loss_mask


# 30 = the 3 x 10 loss positions exactly; 7 pads the last chunk; 1000 is one chunk.
@pytest.mark.parametrize("config,chunk", [(CFG, 7), (TIED, 30), (TIED, 1000)], ids=["untied-7", "tied-30", "tied-1000"])
def test_chunked_loss_and_gradients_equal_the_whole_loss(config, chunk):
  params = models.init_params(config, jax.random.PRNGKey(0))
  tokens, loss_mask = _data()

  def whole(p):
    return cross_entropy(models.forward(p, config, tokens)[0], tokens, loss_mask)

  def chunked(p):
    h, _ = models.forward(p, config, tokens, return_hidden=True)
    return chunked_cross_entropy(p, config, h, tokens, loss_mask, chunk)

  (l_w, n_w), g_w = jax.value_and_grad(whole, has_aux=True)(params)
  (l_c, n_c), g_c = jax.value_and_grad(chunked, has_aux=True)(params)
  assert float(n_c) == float(n_w) == float(jnp.sum(loss_mask[:, 1:]))
  np.testing.assert_allclose(l_c, l_w, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), g_c, g_w)


def test_chunked_head_gradient_sums_in_float32():
  # bf16 weights: the head's gradient over 8 chunks equals the whole one's to bf16 rounding.
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), models.init_params(CFG, jax.random.PRNGKey(1)))
  tokens, loss_mask = _data(b=4, t=33)

  def loss(p, chunk):
    h, _ = models.forward(p, CFG, tokens, return_hidden=True, dtype=jnp.bfloat16)
    if chunk:
      return chunked_cross_entropy(p, CFG, h, tokens, loss_mask, chunk)[0]
    return cross_entropy(models.decoder.logits_from_hidden(p, CFG, h), tokens, loss_mask)[0]

  g_whole = jax.grad(loss)(params, 0)["lm_head"].astype(jnp.float32)
  g_chunk = jax.grad(loss)(params, 16)["lm_head"].astype(jnp.float32)
  assert g_chunk.dtype == jnp.float32
  np.testing.assert_allclose(g_chunk, g_whole, rtol=2 ** -7, atol=1e-3 * float(jnp.abs(g_whole).max()))


def test_chunked_loss_needs_less_memory():
  big = llama.config_from_hf({**CFG.hf_config, "vocab_size": 8192})
  params = models.init_params(big, jax.random.PRNGKey(0))
  tokens = jnp.zeros((4, 256), jnp.int32)
  loss_mask = jnp.ones_like(tokens)

  def temp_bytes(chunk):
    def loss(p):
      h, _ = models.forward(p, big, tokens, return_hidden=True)
      if chunk:
        return chunked_cross_entropy(p, big, h, tokens, loss_mask, chunk)[0]
      return cross_entropy(models.decoder.logits_from_hidden(p, big, h), tokens, loss_mask)[0]
    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = 4 * 255 * 8192 * 4  # float32 [tokens, vocab]
  whole, chunked = temp_bytes(0), temp_bytes(128)
  assert whole > logits_bytes  # the whole logits exist at once...
  assert chunked < whole - logits_bytes  # ...and the chunked loss saves at least their size


def test_chunk_size_is_checked():
  tokens, loss_mask = _data()
  with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
    chunked_cross_entropy({}, CFG, jnp.zeros((3, 11, 16)), tokens, loss_mask, 0)


def test_step_memory_probe_accounts_for_the_always_on_state():
  # benchmarks/probes/step_memory.py (run on the GPU for #17): with the head frozen, the always-on
  # group's moments leave the step's arguments; with SGD no moment is an argument at all.
  import sys
  from pathlib import Path
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from benchmarks.common import SIZES
  from benchmarks.probes.step_memory import measure
  rows = {v: measure(SIZES["tiny-test"], 2, 32, 2, v) for v in ("chunk16", "chunk16-frozen-head", "chunk16-sgd")}
  cfg = SIZES["tiny-test"]
  head_bytes = 2 * cfg["vocab_size"] * cfg["hidden_size"] * 2  # embed + lm_head, bf16
  moments = rows["chunk16"]["argument_bytes"] - rows["chunk16-frozen-head"]["argument_bytes"]
  assert moments >= 2 * head_bytes  # Adam's two moments of the embeddings and head
  assert rows["chunk16-sgd"]["argument_bytes"] < rows["chunk16-frozen-head"]["argument_bytes"]
  assert all(r["temp_bytes"] > 0 for r in rows.values())
