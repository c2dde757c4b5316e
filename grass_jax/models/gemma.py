"""Gemma 1, Gemma 2 and Gemma 3 (text).

Gemma differs from Llama by a ``(1 + weight)`` RMSNorm, embeddings scaled by
sqrt(hidden), GeGLU, tied embeddings and a 256-wide head; Gemma 2 adds norms
after attention and after the MLP, attention and final logit soft-capping,
``query_pre_attn_scalar`` and a sliding window on alternate layers. Gemma 3 (``gemma3_text``) drops the
soft-capping, adds an RMSNorm over each head's query and key, and gives its sliding-window layers
(five in six) their own RoPE base.

Example::

  >>> cfg = config_from_hf({'model_type': 'gemma2', 'vocab_size': 32, 'hidden_size': 16,
  ...     'intermediate_size': 32, 'num_hidden_layers': 2, 'num_attention_heads': 2,
  ...     'num_key_value_heads': 1, 'head_dim': 8, 'query_pre_attn_scalar': 8})
  >>> cfg.post_norms, cfg.sliding_layers
  (True, (True, False))
"""

from __future__ import annotations

from typing import Any

from grass_jax.models import llama
from grass_jax.models.decoder import DecoderConfig

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")

GEMMA2_RENAMES = {
    "model.layers.{i}.post_attention_layernorm.weight": ("layers/post_attn_norm", False),
    "model.layers.{i}.pre_feedforward_layernorm.weight": ("layers/pre_mlp_norm", False),
    "model.layers.{i}.post_feedforward_layernorm.weight": ("layers/post_mlp_norm", False),
}
# Gemma 1 names its tensors as Llama does; Gemma 2 renames the norms around the MLP.
HF_NAMES: dict[str, dict[str, tuple[str, bool]]] = {
    "gemma": dict(llama.HF_NAMES),
    "gemma2": {**llama.HF_NAMES, **GEMMA2_RENAMES},
    "gemma3_text": {**llama.HF_NAMES, **GEMMA2_RENAMES, **llama.QK_NORM_NAMES},
}

_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "gelu": "gelu"}


def config_from_hf(d: dict[str, Any]) -> DecoderConfig:
  """Builds the decoder config from a Gemma / Gemma 2 / Gemma 3 text ``config.json`` dict."""
  model_type = d["model_type"]
  if model_type not in MODEL_TYPES:
    raise ValueError(f"model_type {model_type!r} is not a Gemma type {MODEL_TYPES}")
  act_name = d.get("hidden_activation") or "gelu_pytorch_tanh"
  if act_name not in _ACTS:
    raise ValueError(f"hidden_activation {act_name!r} is not supported (supported: {sorted(_ACTS)})")
  num_layers = d["num_hidden_layers"]
  is2 = model_type in ("gemma2", "gemma3_text")  # what Gemma 3 keeps of Gemma 2
  is3 = model_type == "gemma3_text"
  if is2:
    flags = tuple(t == "sliding_attention" for t in d["layer_types"]) if d.get("layer_types") else tuple(
        i % 2 == 0 for i in range(num_layers))
  else:
    flags = (False,) * num_layers
  shared = llama.shared_fields(d if not is3 else {k: v for k, v in d.items() if k != "rope_parameters"})
  if is3:
    shared.update(_gemma3_rope(d), hf_config=dict(d))
  head_dim = shared["head_dim"]
  return DecoderConfig(
      **shared,
      norm_offset=1.0,
      act=_ACTS[act_name],
      attention_bias=bool(d.get("attention_bias", False)),
      o_bias=bool(d.get("attention_bias", False)),
      tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
      embed_scale=True,
      query_scale=(d.get("query_pre_attn_scalar") or head_dim) ** -0.5 if is2 else None,
      attn_softcap=d.get("attn_logit_softcapping") if is2 else None,  # None in Gemma 3's configs
      final_softcap=d.get("final_logit_softcapping") if is2 else None,
      sliding_window=d.get("sliding_window") if any(flags) else None,
      sliding_layers=flags,
      post_norms=is2,
      qk_norm=is3,
      max_position_embeddings=d.get("max_position_embeddings", 8192),
  )


def _gemma3_rope(d: dict[str, Any]) -> dict[str, Any]:
  """Gemma 3's two RoPEs: transformers 5's ``rope_parameters`` per layer type, or 4's ``rope_theta``,
  ``rope_scaling`` and ``rope_local_base_freq``."""
  per_type = d.get("rope_parameters") or {}
  if "full_attention" in per_type:
    glob = dict(per_type["full_attention"])
    local = dict(per_type.get("sliding_attention") or {})
    if local.get("rope_type", "default") != "default":
      raise ValueError(f"Gemma 3 sliding-window layers with rope_type {local['rope_type']!r} are not supported")
    theta = float(glob.pop("rope_theta", 1_000_000.0))
    return dict(rope_theta=theta, rope_scaling=tuple(sorted(glob.items())),
                rope_local_theta=float(local.get("rope_theta", 10_000.0)))
  theta, scaling = llama.rope_settings(d)
  return dict(rope_theta=theta, rope_scaling=scaling, rope_local_theta=float(d.get("rope_local_base_freq", 10_000.0)))


def hf_names(config: DecoderConfig) -> dict[str, tuple[str, bool]]:
  return HF_NAMES[config.model_type]
