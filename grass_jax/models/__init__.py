"""Model families: which Hugging Face ``model_type`` is read by which file.

Example::

  >>> sorted(FAMILIES)
  ['gemma', 'gemma2', 'gemma3_text', 'llama', 'mistral', 'qwen2', 'qwen3']
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from grass_jax.layers import stacked_layers
from grass_jax.models import gemma, llama
from grass_jax.models.decoder import (Decoder, DecoderConfig, ForwardOptions, KVCache, forward, hidden_states,
                                      init_cache, init_params, logits_from_hidden)

# The GRASS `layers` argument for every model here: blocks stacked under params["layers"].
LAYERS = stacked_layers("layers")

FAMILIES: dict[str, ModuleType] = {t: llama for t in llama.MODEL_TYPES} | {t: gemma for t in gemma.MODEL_TYPES}
# The transformers class each model_type loads as (config.json's "architectures").
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                    "gemma3_text": "Gemma3ForCausalLM"}


def family(model_type: str) -> ModuleType:
  if model_type not in FAMILIES:
    raise ValueError(f"unknown model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}. "
                     "Add a family file under grass_jax/models/ to support it.")
  return FAMILIES[model_type]


def config_from_hf(d: dict[str, Any]) -> DecoderConfig:
  """Decoder config from a Hugging Face ``config.json`` dict (any supported family)."""
  if "model_type" not in d:
    raise ValueError("config.json has no 'model_type'; is this a Hugging Face causal-LM checkpoint?")
  return family(d["model_type"]).config_from_hf(d)


def hf_names(config: DecoderConfig) -> dict[str, tuple[str, bool]]:
  """HF tensor name pattern -> (parameter path, transpose) for this config's family."""
  return family(config.model_type).hf_names(config)


__all__ = ["FAMILIES", "HF_ARCHITECTURES", "LAYERS", "Decoder", "DecoderConfig", "ForwardOptions", "KVCache", "config_from_hf", "family",
           "forward", "hf_names", "hidden_states", "init_cache", "init_params", "logits_from_hidden"]
