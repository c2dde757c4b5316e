"""The chunked LM head + loss: equal to the whole loss, and smaller in memory."""

import jax
import jax.extend
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
    h, _ = models.hidden_states(p, config, tokens)
    return chunked_cross_entropy(p, config, h, tokens, loss_mask, chunk)

  (l_w, n_w), g_w = jax.value_and_grad(whole, has_aux=True)(params)
  (l_c, n_c), g_c = jax.value_and_grad(chunked, has_aux=True)(params)
  assert float(n_c) == float(n_w) == float(jnp.sum(loss_mask[:, 1:]))
  np.testing.assert_allclose(l_c, l_w, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), g_c, g_w)


def test_chunked_head_gradient_sums_in_float32():
  # bf16 head and hidden states: each chunk's head gradient comes out of its matmul in float32 and only the sum
  # over 9 chunks is rounded to bf16, so the result is the float32 gradient to bf16 rounding (the logits'
  # gradient itself is rounded to bf16 before the matmuls, as a bf16 model's would be).
  rng = np.random.default_rng(1)
  head = jnp.asarray(rng.normal(0, 0.5, (16, 300)), jnp.bfloat16)
  hidden = jnp.asarray(rng.normal(0, 1, (4, 33, 16)), jnp.bfloat16)
  tokens, loss_mask = _data(b=4, t=33)

  def exact(hd):
    logits = jnp.einsum("btd,dv->btv", hidden.astype(jnp.float32), hd, precision="highest")
    return cross_entropy(logits, tokens, loss_mask)[0]

  g_exact = jax.grad(exact)(head.astype(jnp.float32))
  g_chunk = jax.grad(lambda hd: chunked_cross_entropy({"lm_head": hd}, CFG, hidden, tokens, loss_mask, 14)[0])(head)
  assert g_chunk.dtype == jnp.bfloat16  # the gradient has the head's dtype...
  err = np.abs(np.asarray(g_chunk, np.float32) - np.asarray(g_exact))
  scale = float(jnp.abs(g_exact).max())
  assert err.max() < 2 ** -6 * scale  # ...and float32 accuracy up to bf16 roundings
  # Rounding each chunk's gradient to bf16 and summing in bf16 (autodiff of a bf16 scan) is further off.
  positions = np.arange(4 * 32).reshape(4, 32)  # the flat loss positions the chunks of 14 cut
  g_bf16_sum = jnp.zeros_like(head)
  for start in range(0, 4 * 32, 14):
    in_chunk = np.pad((positions >= start) & (positions < start + 14), ((0, 0), (1, 0)))
    g_i = jax.grad(lambda hd: cross_entropy(jnp.einsum("btd,dv->btv", hidden.astype(jnp.float32), hd),
                                            tokens, loss_mask * in_chunk)[0])(head.astype(jnp.float32))
    g_bf16_sum = g_bf16_sum + g_i.astype(jnp.bfloat16)
  err_bf16 = np.abs(np.asarray(g_bf16_sum, np.float32) - np.asarray(g_exact))
  assert err_bf16.mean() > 1.5 * err.mean()


@pytest.mark.parametrize("chunk", [5, 64])
def test_chunked_loss_with_final_softcapping(chunk):
  # Gemma 2's final soft-capping goes through the hand-written backward pass too.
  from grass_jax.models import gemma
  config = gemma.config_from_hf({"model_type": "gemma2", "vocab_size": 300, "hidden_size": 16,
                                 "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
                                 "num_key_value_heads": 2, "head_dim": 4, "final_logit_softcapping": 3.0})
  assert config.final_softcap == 3.0
  params = models.init_params(config, jax.random.PRNGKey(2))
  params = {**params, "embed": params["embed"] * 20}  # logits well past the cap, where tanh bends
  tokens, loss_mask = _data()
  h = jax.random.normal(jax.random.PRNGKey(3), (3, 11, 16))

  def whole(p, h):
    return cross_entropy(models.decoder.logits_from_hidden(p, config, h), tokens, loss_mask)[0]

  def chunked(p, h):
    return chunked_cross_entropy(p, config, h, tokens, loss_mask, chunk)[0]

  l_w, (gp_w, gh_w) = jax.value_and_grad(whole, argnums=(0, 1))(params, h)
  l_c, (gp_c, gh_c) = jax.value_and_grad(chunked, argnums=(0, 1))(params, h)
  np.testing.assert_allclose(l_c, l_w, rtol=1e-6)
  np.testing.assert_allclose(gh_c, gh_w, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(gp_c["embed"], gp_w["embed"], rtol=2e-5, atol=1e-6)


def test_chunked_loss_needs_less_memory():
  big = llama.config_from_hf({**CFG.hf_config, "vocab_size": 8192})
  params = models.init_params(big, jax.random.PRNGKey(0))
  tokens = jnp.zeros((4, 256), jnp.int32)
  loss_mask = jnp.ones_like(tokens)

  def temp_bytes(chunk):
    def loss(p):
      h, _ = models.hidden_states(p, big, tokens)
      if chunk:
        return chunked_cross_entropy(p, big, h, tokens, loss_mask, chunk)[0]
      return cross_entropy(models.decoder.logits_from_hidden(p, big, h), tokens, loss_mask)[0]
    return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = 4 * 255 * 8192 * 4  # float32 [tokens, vocab]
  whole, chunked = temp_bytes(0), temp_bytes(128)
  assert whole > logits_bytes  # the whole logits exist at once...
  assert chunked < whole - logits_bytes  # ...and the chunked loss saves at least their size


def test_chunked_backward_holds_one_chunk_of_logits_and_no_float32_head():
  # The hand-written backward pass keeps, besides the float32 head-gradient sum, one chunk's float32 logits and
  # its bf16 gradient; autodiff of the rematerialised scan held another chunk of float32 logits and a float32
  # copy of the head (350 MiB here, against 222).
  cfg = llama.config_from_hf({**CFG.hf_config, "vocab_size": 32000, "hidden_size": 256})
  head = jnp.zeros((256, 32000), jnp.bfloat16)
  tokens = jnp.zeros((4, 1025), jnp.int32)
  hidden = jnp.zeros((4, 1025, 256), jnp.bfloat16)

  def loss(hd, h):
    return chunked_cross_entropy({"lm_head": hd}, cfg, h, tokens, jnp.ones_like(tokens), 1024)[0]

  temp = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(head, hidden).compile().memory_analysis().temp_size_in_bytes
  logits, dlogits, head_sum = 1024 * 32000 * 4, 1024 * 32000 * 2, 256 * 32000 * 4
  assert temp < 1.05 * (logits + dlogits + head_sum)


@pytest.mark.parametrize("config", [CFG, TIED], ids=["untied", "tied"])
def test_whole_loss_backward_multiplies_in_bf16(config):
  # Autodiff of the float32 logits would multiply their gradient by a float32 copy of the head (on
  # Llama-2-7B a 500 MiB temporary and a float32 matmul); the head's backward rounds the gradient to
  # bf16 instead, like the chunked loss, and stays within bf16 rounding of the float32 gradients.
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), models.init_params(config, jax.random.PRNGKey(1)))
  tokens, loss_mask = _data()
  h = jax.random.normal(jax.random.PRNGKey(3), (3, 11, 16), jnp.bfloat16)

  def whole(p, h):
    return cross_entropy(models.decoder.logits_from_hidden(p, config, h), tokens, loss_mask)[0]

  grad = jax.grad(whole, argnums=(0, 1))
  jaxpr = jax.make_jaxpr(grad)(params, h)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  dots += [e for eq in jaxpr.jaxpr.eqns for sub in jax.extend.core.jaxprs_in_params(eq.params)
           for e in sub.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 3 and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
  f32 = jax.tree.map(lambda x: x.astype(jnp.float32), (params, h))
  g_bf16, g_f32 = grad(params, h), grad(*f32)
  head = "embed" if config.tie_word_embeddings else "lm_head"
  for got, want in ((g_bf16[0][head], g_f32[0][head]), (g_bf16[1], g_f32[1])):
    scale = float(jnp.max(jnp.abs(want)))
    assert scale > 0
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2 * scale)


def test_chunk_size_is_checked():
  tokens, loss_mask = _data()
  with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
    chunked_cross_entropy({}, CFG, jnp.zeros((3, 11, 16)), tokens, loss_mask, 0)


def test_step_memory_probe_accounts_for_the_always_on_state():
  # benchmarks/probes/step_memory.py (run on the GPU for #17): with the head frozen, the always-on
  # group's moments leave the step's arguments.
  import sys
  from pathlib import Path
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from benchmarks.probes.step_memory import measure
  cfg = dict(model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2)  # the head outweighs a layer, as in real models
  rows = {v: measure(cfg, 2, 32, 2, v) for v in ("chunk16", "chunk16-frozen-head")}
  head_bytes = 2 * cfg["vocab_size"] * cfg["hidden_size"] * 2  # embed + lm_head, bf16
  moments = rows["chunk16"]["argument_bytes"] - rows["chunk16-frozen-head"]["argument_bytes"]
  assert moments >= 2 * head_bytes  # Adam's two moments of the embeddings and head
  assert all(r["temp_bytes"] > 0 for r in rows.values())


def test_step_memory_probe_keeps_one_file_per_card(tmp_path):
  # A probe run replaces its own rows (same size, variant and flags) and keeps the file's others.
  import sys
  from pathlib import Path
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from benchmarks.probes.step_memory import write_rows
  path = tmp_path / "step_memory_h200.json"
  old = [{"size": "a", "variant": "whole", "xla_flags": "", "temp_bytes": 1},
         {"size": "a", "variant": "whole", "xla_flags": "--f", "temp_bytes": 2},
         {"size": "b", "variant": "whole", "xla_flags": "", "temp_bytes": 3}]
  write_rows(path, old)
  write_rows(path, [{"size": "a", "variant": "whole", "xla_flags": "", "temp_bytes": 9}])
  import json
  assert [r["temp_bytes"] for r in json.loads(path.read_text())] == [2, 3, 9]
