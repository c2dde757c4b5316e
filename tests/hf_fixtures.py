"""Tiny random Hugging Face PyTorch models of every supported family (test helper)."""

from __future__ import annotations

import numpy as np
import torch
import transformers

VOCAB = 64

FAMILY_CONFIGS = {
    "llama3": (transformers.LlamaConfig, dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16},
        rope_theta=500000.0, max_position_embeddings=64)),
    "tinyllama": (transformers.LlamaConfig, dict()),
    "mistral": (transformers.MistralConfig, dict(sliding_window=4)),
    "qwen2": (transformers.Qwen2Config, dict()),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=16)),  # head_dim != hidden / heads, as in Qwen3
    # Llama 3.2: tied embeddings and llama3 RoPE.
    "llama3.2": (transformers.LlamaConfig, dict(
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16},
        rope_theta=500000.0, max_position_embeddings=64, tie_word_embeddings=True)),
    "gemma": (transformers.GemmaConfig, dict(head_dim=8)),
    # Gemma 3: a global layer between two sliding ones, each kind with its own RoPE (the global one scaled).
    "gemma3": (transformers.Gemma3TextConfig, dict(
        head_dim=8, query_pre_attn_scalar=12, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}})),
    "gemma2": (transformers.Gemma2Config, dict(head_dim=8, query_pre_attn_scalar=12, sliding_window=4,
                                               attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
}


def tiny_hf_model(family: str, seed: int = 0, num_layers: int = 3) -> transformers.PreTrainedModel:
  cls, extra = FAMILY_CONFIGS[family]
  extra = dict(extra)
  cfg = cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=extra.pop("max_position_embeddings", 64),
            rms_norm_eps=1e-5, pad_token_id=0, **extra)
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
  with torch.no_grad():  # random norms and biases too, so that loading them wrongly shows
    for name, p in model.named_parameters():
      if "norm" in name or "bias" in name:
        p.copy_(torch.randn_like(p) * 0.3 + (0.0 if family.startswith("gemma") else 1.0) * ("norm" in name))
  return model


def padded_batch(seed: int = 0, batch: int = 3, length: int = 10) -> tuple[np.ndarray, np.ndarray]:
  """Tokens and mask with left padding (row 1), right padding (row 2) and none (row 0)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, VOCAB, size=(batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  mask[1, :3] = 0
  mask[2, -4:] = 0
  tokens[mask == 0] = 0
  return tokens, mask


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions, dtype=torch.long))
  return out.logits.float().numpy()
