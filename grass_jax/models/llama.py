"""Llama family: Llama 2/3 (llama3 RoPE scaling), TinyLlama, Mistral, Qwen2/Qwen2.5, Qwen3.

All are :class:`~grass_jax.models.decoder.DecoderConfig` decoders; this file
reads their Hugging Face ``config.json`` and names their checkpoint tensors.

Example::

  >>> cfg = config_from_hf({'model_type': 'llama', 'vocab_size': 32, 'hidden_size': 16,
  ...     'intermediate_size': 32, 'num_hidden_layers': 2, 'num_attention_heads': 4,
  ...     'num_key_value_heads': 2})
  >>> cfg.head_dim, cfg.num_kv_heads
  (4, 2)
"""

from __future__ import annotations

from typing import Any

from grass_jax.models.decoder import DecoderConfig

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# HF tensor name -> (our parameter path, transpose [out, in] -> [in, out]).
# `{i}` is the layer index; the parameter is then the slice [i] of a stacked leaf.
HF_NAMES: dict[str, tuple[str, bool]] = {
    "model.embed_tokens.weight": ("embed", False),
    "model.norm.weight": ("final_norm", False),
    "lm_head.weight": ("lm_head", True),
    "model.layers.{i}.input_layernorm.weight": ("layers/input_norm", False),
    "model.layers.{i}.self_attn.q_proj.weight": ("layers/q_proj", True),
    "model.layers.{i}.self_attn.k_proj.weight": ("layers/k_proj", True),
    "model.layers.{i}.self_attn.v_proj.weight": ("layers/v_proj", True),
    "model.layers.{i}.self_attn.o_proj.weight": ("layers/o_proj", True),
    "model.layers.{i}.self_attn.q_proj.bias": ("layers/q_bias", False),
    "model.layers.{i}.self_attn.k_proj.bias": ("layers/k_bias", False),
    "model.layers.{i}.self_attn.v_proj.bias": ("layers/v_bias", False),
    "model.layers.{i}.self_attn.o_proj.bias": ("layers/o_bias", False),
    "model.layers.{i}.post_attention_layernorm.weight": ("layers/pre_mlp_norm", False),
    "model.layers.{i}.mlp.gate_proj.weight": ("layers/gate_proj", True),
    "model.layers.{i}.mlp.up_proj.weight": ("layers/up_proj", True),
    "model.layers.{i}.mlp.down_proj.weight": ("layers/down_proj", True),
    "model.layers.{i}.mlp.gate_proj.bias": ("layers/gate_bias", False),
    "model.layers.{i}.mlp.up_proj.bias": ("layers/up_bias", False),
    "model.layers.{i}.mlp.down_proj.bias": ("layers/down_bias", False),
}
# Qwen3: an RMSNorm over each head's query and key.
QK_NORM_NAMES: dict[str, tuple[str, bool]] = {
    "model.layers.{i}.self_attn.q_norm.weight": ("layers/q_norm", False),
    "model.layers.{i}.self_attn.k_norm.weight": ("layers/k_norm", False),
}


def rope_settings(d: dict[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...]]:
  """RoPE base and scaling from either transformers 5's ``rope_parameters`` or 4's ``rope_theta``/``rope_scaling``."""
  rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
  theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
  return theta, tuple(sorted(rope.items()))


def sliding_flags(d: dict[str, Any], num_layers: int) -> tuple[bool, ...]:
  """Per-layer sliding-window flags from ``layer_types``, or all layers when only ``sliding_window`` is set."""
  types = d.get("layer_types")
  if types:
    return tuple(t == "sliding_attention" for t in types)
  return (d.get("sliding_window") is not None,) * num_layers


def shared_fields(d: dict[str, Any]) -> dict[str, Any]:
  """DecoderConfig fields that every family reads the same way from ``config.json``."""
  heads = d["num_attention_heads"]
  theta, scaling = rope_settings(d)
  return dict(
      model_type=d["model_type"],
      vocab_size=d["vocab_size"],
      hidden_size=d["hidden_size"],
      intermediate_size=d["intermediate_size"],
      num_layers=d["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=d.get("num_key_value_heads") or heads,
      head_dim=d.get("head_dim") or d["hidden_size"] // heads,
      rms_norm_eps=d.get("rms_norm_eps", 1e-6),
      rope_theta=theta,
      rope_scaling=scaling,
      hf_config=dict(d),
  )


def config_from_hf(d: dict[str, Any]) -> DecoderConfig:
  """Builds the decoder config from a Llama/Mistral/Qwen2/Qwen3 ``config.json`` dict."""
  model_type = d["model_type"]
  if model_type not in MODEL_TYPES:
    raise ValueError(f"model_type {model_type!r} is not a Llama-family type {MODEL_TYPES}")
  act = d.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"hidden_act {act!r} is not supported for {model_type} (expected 'silu')")
  qkv_bias = model_type == "qwen2" or bool(d.get("attention_bias", False))
  flags = sliding_flags(d, d["num_hidden_layers"])
  return DecoderConfig(
      **shared_fields(d),
      attention_bias=qkv_bias,
      o_bias=model_type != "qwen2" and bool(d.get("attention_bias", False)),
      mlp_bias=bool(d.get("mlp_bias", False)),
      tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
      sliding_window=d.get("sliding_window") if any(flags) else None,
      sliding_layers=flags,
      qk_norm=model_type == "qwen3",
      max_position_embeddings=d.get("max_position_embeddings", 4096),
  )


def hf_names(config: DecoderConfig) -> dict[str, tuple[str, bool]]:
  return {**HF_NAMES, **QK_NORM_NAMES} if config.qk_norm else HF_NAMES

