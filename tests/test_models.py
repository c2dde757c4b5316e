"""Model parity with Hugging Face PyTorch, checkpoint formats, and load errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import grass_jax
from grass_jax import models
from grass_jax.generate import greedy_generate
from grass_jax.pretrained import CheckpointError, load_pretrained, save_pretrained
from tests.hf_fixtures import FAMILY_CONFIGS, hf_logits, padded_batch, tiny_hf_model

# Module fixtures: the whole file on one xdist worker (--dist loadgroup), the fixture built once.
pytestmark = pytest.mark.xdist_group("models")

FAMILIES = sorted(FAMILY_CONFIGS)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Each family saved once as HF safetensors."""
  out = {}
  for fam in FAMILIES:
    model = tiny_hf_model(fam)
    d = tmp_path_factory.mktemp(fam)
    model.save_pretrained(d)
    out[fam] = (model, d)
  return out


def _ours(params, config, tokens, mask):
  logits, _ = models.forward(params, config, jnp.asarray(tokens), jnp.asarray(mask))
  return np.asarray(logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf_with_padding(saved, family):
  hf, d = saved[family]
  params, config = load_pretrained(d)
  tokens, mask = padded_batch()
  want = hf_logits(hf, tokens, mask)
  got = _ours(params, config, tokens, mask)
  valid = mask.astype(bool)
  assert np.max(np.abs(got[valid] - want[valid])) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_hf(saved, family):
  hf, d = saved[family]
  params, config = load_pretrained(d)
  prompt = np.array([[0, 0, 5, 9, 13, 2], [7, 3, 11, 4, 8, 6]], np.int32)
  mask = (np.arange(6)[None] >= np.array([[2], [0]])).astype(np.int32)
  ours = np.asarray(greedy_generate(params, config, jnp.asarray(prompt), jnp.asarray(mask), 5))
  with torch.no_grad():
    out = hf.generate(torch.tensor(prompt, dtype=torch.long), attention_mask=torch.tensor(mask),
                      max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
  np.testing.assert_array_equal(ours, out[:, 6:].numpy())


@pytest.mark.parametrize("family", ["tinyllama", "gemma2", "gemma3", "qwen3", "llama3.2"])
def test_round_trip_save_then_hf_load(saved, family, tmp_path):
  hf, d = saved[family]
  params, config = load_pretrained(d)
  params = jax.tree.map(lambda x: x * 1.01, params)  # a "fine-tuned" model
  save_pretrained(params, config, tmp_path / "export")
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager").float()
  tokens, mask = padded_batch(1)
  valid = mask.astype(bool)
  diff = hf_logits(back, tokens, mask)[valid] - _ours(params, config, tokens, mask)[valid]
  assert np.max(np.abs(diff)) < 1e-4


def test_sharded_safetensors(saved, tmp_path):
  hf, _ = saved["qwen2"]
  hf.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  params, config = load_pretrained(tmp_path)
  tokens, mask = padded_batch(2)
  valid = mask.astype(bool)
  assert np.max(np.abs(_ours(params, config, tokens, mask)[valid] - hf_logits(hf, tokens, mask)[valid])) < 1e-4
  # our own sharded export loads back identically
  save_pretrained(params, config, tmp_path / "ours", max_shard_bytes=30_000)
  assert len(list((tmp_path / "ours").glob("model-*.safetensors"))) > 1
  again, _ = load_pretrained(tmp_path / "ours")
  jax.tree.map(np.testing.assert_array_equal, params, again)


def test_flax_msgpack_legacy(saved, tmp_path):
  """HF Flax layout: kernels [in, out], embeddings named 'embedding', nested dicts."""
  from flax import serialization
  hf, d = saved["tinyllama"]
  tree: dict = {}
  for name, t in hf.state_dict().items():
    parts = name.split(".")
    arr = t.numpy()
    if parts[-2] == "embed_tokens":
      parts[-1] = "embedding"
    elif parts[-1] == "weight" and arr.ndim == 2:
      parts[-1], arr = "kernel", arr.T
    node = tree
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = arr
  (tmp_path / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
  (tmp_path / "config.json").write_text((d / "config.json").read_text())
  params, config = load_pretrained(tmp_path)
  ref, _ = load_pretrained(d)
  jax.tree.map(np.testing.assert_array_equal, params, ref)


def test_bf16_loading_and_nnx_module(saved):
  _, d = saved["llama3"]
  params, config = load_pretrained(d, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  model = models.Decoder(config, params, dtype=jnp.bfloat16)
  tokens, mask = padded_batch()
  logits = model(jnp.asarray(tokens), jnp.asarray(mask))
  ref = _ours(jax.tree.map(lambda x: x.astype(jnp.float32), params), config, tokens, mask)
  assert logits.dtype == jnp.float32
  assert np.max(np.abs(np.asarray(logits) - ref)[mask.astype(bool)]) < 0.05
  from flax import nnx
  state = nnx.state(model, nnx.Param)
  assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(params))


def test_grass_layer_structure_of_model(saved):
  _, d = saved["gemma2"]
  params, config = load_pretrained(d)
  layout = grass_jax.build_layout(params, grass_jax.stacked_layers("layers"))
  assert layout.num_layers == config.num_layers
  assert set(layout.paths[i] for i in layout.always_on) == {"embed", "final_norm"}


def test_remat_gives_same_gradients(saved):
  _, d = saved["mistral"]
  params, config = load_pretrained(d)
  tokens, mask = padded_batch()

  def loss(p, remat):
    logits, _ = models.forward(p, config, jnp.asarray(tokens), jnp.asarray(mask),
                               options=models.ForwardOptions(remat=remat))
    return jnp.mean(logits ** 2)

  g0 = jax.grad(loss)(params, "none")
  for policy in ("full", "dots"):
    g1 = jax.grad(loss)(params, policy)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


# ---- errors a user can hit ---------------------------------------------------------------


def _copy_checkpoint(src, dst):
  dst.mkdir()
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  return dst


def test_unknown_model_type(saved, tmp_path):
  d = _copy_checkpoint(saved["tinyllama"][1], tmp_path / "x")
  cfg = json.loads((d / "config.json").read_text())
  cfg["model_type"] = "gpt_neox"
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="unknown model_type .gpt_neox.; supported: gemma, gemma2, gemma3_text, "
                                       "llama, mistral, qwen2, qwen3"):
    load_pretrained(d)


def test_missing_weights_file_and_missing_tensors(saved, tmp_path):
  d = _copy_checkpoint(saved["tinyllama"][1], tmp_path / "x")
  (d / "model.safetensors").unlink()
  with pytest.raises(CheckpointError, match="no weights in"):
    load_pretrained(d)
  from safetensors.torch import save_file
  sd = {k: v.contiguous() for k, v in saved["tinyllama"][0].state_dict().items()
        if k != "model.layers.1.mlp.up_proj.weight"}
  save_file(sd, str(d / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"missing weights .*layers/up_proj\[1\]"):
    load_pretrained(d)


def test_shape_mismatch_names_tensor_and_shapes(saved, tmp_path):
  d = _copy_checkpoint(saved["tinyllama"][1], tmp_path / "x")
  cfg = json.loads((d / "config.json").read_text())
  cfg["intermediate_size"] = 40
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight': checkpoint has "
                     r"\((48, 32|32, 48)\), the config \(llama\) expects \((40, 32|32, 40)\)"):
    load_pretrained(d)


def test_unexpected_tensors_listed(saved, tmp_path):
  d = _copy_checkpoint(saved["tinyllama"][1], tmp_path / "x")
  from safetensors.torch import save_file
  sd = {k: v.contiguous() for k, v in saved["tinyllama"][0].state_dict().items()}
  sd["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
  save_file(sd, str(d / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"unexpected tensors .*q_norm"):
    load_pretrained(d)


def test_not_a_directory_or_hub_id(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(CheckpointError, match="not a local directory"):
    load_pretrained("no-such-org/no-such-model")


def test_loading_streams_tensors_without_a_second_host_copy(tmp_path):
  """numpy memory while loading stays near one copy of the model (XLA buffers are not numpy's)."""
  import tracemalloc
  cfg = transformers.LlamaConfig(vocab_size=2000, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                                 num_attention_heads=4)
  hf = transformers.LlamaForCausalLM(cfg)
  hf.save_pretrained(tmp_path, max_shard_size="1MB")
  model_bytes = sum(p.numel() * 4 for p in hf.parameters())
  tracemalloc.start()
  load_pretrained(tmp_path)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert peak < 1.5 * model_bytes, (peak, model_bytes)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_dot_product_attention_matches_einsum(saved, family):
  _, d = saved[family]
  params, config = load_pretrained(d)
  tokens, mask = padded_batch()
  valid = mask.astype(bool)

  def loss(p, attention):
    logits, _ = models.forward(p, config, jnp.asarray(tokens), jnp.asarray(mask),
                                 options=models.ForwardOptions(attention=attention))
    return jnp.sum(jnp.where(valid[..., None], logits, 0.0) ** 2) * 1e-3, logits

  (l0, a), g0 = jax.value_and_grad(loss, has_aux=True)(params, "einsum")
  (l1, b), g1 = jax.value_and_grad(loss, has_aux=True)(params, "xla")
  assert np.max(np.abs(np.asarray(a)[valid] - np.asarray(b)[valid])) < 1e-5
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), g0, g1)


def test_fused_attention_refuses_softcapping(saved):
  _, d = saved["gemma2"]
  params, config = load_pretrained(d)
  with pytest.raises(ValueError, match="no logit soft-capping"):
    models.forward(params, config, jnp.ones((1, 4), jnp.int32), options=models.ForwardOptions(attention="xla"))


def test_auto_attention_picks_cudnn_only_where_it_applies(saved, monkeypatch):
  from grass_jax.models.decoder import resolve_attention
  _, d = saved["mistral"]
  _, config = load_pretrained(d)
  _, d2 = saved["gemma2"]
  _, gemma2 = load_pretrained(d2)
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")  # whatever this host has
  assert resolve_attention(config, "auto", jnp.bfloat16) == "einsum"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert resolve_attention(config, "auto", jnp.bfloat16) == "cudnn"
  assert resolve_attention(config, "auto", jnp.float32) == "einsum"
  assert resolve_attention(config, "auto", jnp.bfloat16, decoding=True) == "einsum"
  assert resolve_attention(gemma2, "auto", jnp.bfloat16) == "einsum"  # soft-capping
  assert resolve_attention(config, "xla", jnp.float32) == "xla"
  with pytest.raises(ValueError, match="choose one of auto, einsum"):
    resolve_attention(config, "flash", jnp.bfloat16)
