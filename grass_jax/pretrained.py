"""Load and save Hugging Face checkpoints for the models in :mod:`grass_jax.models`.

``load_pretrained`` reads a local directory or a hub id (through
``huggingface_hub``, which honours ``HF_HUB_OFFLINE``) holding ``config.json``
and the weights as single or sharded safetensors (``model.safetensors.index.json``)
or the legacy ``flax_model.msgpack``. Tensors are streamed one at a time into
preallocated host arrays of the target dtype, so loading needs about one copy
of the model in host memory, not two. The family's explicit name table
(:data:`grass_jax.models.llama.HF_NAMES`, ...) maps HF names to parameter paths.

``save_pretrained`` writes HF-named safetensors and ``config.json`` that
``transformers.AutoModelForCausalLM.from_pretrained`` loads.

Example::

  model, config = load_pretrained("TinyLlama/TinyLlama-1.1B-Chat-v1.0", dtype=jnp.bfloat16)
  save_pretrained(model, config, "out/tinyllama-grass")
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grass_jax import gguf_checkpoint, models
from grass_jax.errors import CheckpointError
from grass_jax.local_paths import looks_local
from grass_jax.models.decoder import DecoderConfig, Params

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "flax_model.msgpack", "tokenizer*", "*.model", "*.txt"]
IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attention\.masked_bias|\.attention\.bias)$")


def resolve(path_or_hub_id: str | os.PathLike) -> Path:
  """Local directory as is; otherwise download (or find in the HF cache) a hub snapshot."""
  path = Path(path_or_hub_id).expanduser()
  if path.is_dir():
    return path
  if path.exists():
    raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json")
  if looks_local(path_or_hub_id):
    raise CheckpointError(f"{path}: no such directory; pass a checkpoint directory that holds config.json "
                          "(or a hub id such as 'TinyLlama/TinyLlama-1.1B-Chat-v1.0')")
  try:
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(str(path_or_hub_id), allow_patterns=WEIGHT_PATTERNS))
  except Exception as e:  # noqa: BLE001 - any hub failure gets the same actionable message
    first_line = (str(e).strip().splitlines() or [""])[0]  # hub errors run to several lines
    raise CheckpointError(
        f"{path_or_hub_id!r} is not a local directory and could not be fetched from the Hugging Face hub "
        f"({type(e).__name__}: {first_line}). Pass a local checkpoint directory, or set HF_HUB_OFFLINE=1 to use "
        "a cached snapshot.") from e


def read_config(directory: Path) -> DecoderConfig:
  cfg = directory / "config.json"
  if not cfg.exists():
    raise CheckpointError(f"no config.json in {directory}")
  return models.config_from_hf(_read_json(cfg))


def _read_json(path: Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is damaged: export or download it "
                          "again") from e


def _flax_name(path: tuple[str, ...]) -> tuple[str, bool]:
  """HF Flax parameter path -> (PyTorch-style name, already [in, out])."""
  *head, leaf = path
  if leaf == "embedding":
    return ".".join([*head, "weight"]), False
  if leaf == "kernel":
    return ".".join([*head, "weight"]), True
  if leaf == "scale":
    return ".".join([*head, "weight"]), False
  return ".".join(path), False


def iter_tensors(directory: Path) -> Iterator[tuple[str, np.ndarray, bool]]:
  """Yields ``(hf_name, array, already_transposed)`` one tensor at a time."""
  index = directory / "model.safetensors.index.json"
  single = directory / "model.safetensors"
  msgpack = directory / "flax_model.msgpack"
  if index.exists():
    weight_map = _read_json(index).get("weight_map")
    if not weight_map:
      raise CheckpointError(f"{index} has no weight_map")
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (directory / f).exists()]
    if missing:
      raise CheckpointError(f"shards listed in {index.name} are missing from {directory}: {missing}")
  elif single.exists():
    files = [single.name]
  elif msgpack.exists():
    from flax import serialization
    tree = serialization.msgpack_restore(msgpack.read_bytes())
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for path, value in flat:
      name, transposed = _flax_name(tuple(str(k.key) for k in path))
      yield name, np.asarray(value), transposed
    return
  else:
    raise CheckpointError(f"no weights in {directory}: expected model.safetensors, model.safetensors.index.json "
                          "or flax_model.msgpack")
  from safetensors import SafetensorError, safe_open
  for fname in files:
    try:
      with safe_open(str(directory / fname), framework="numpy") as f:
        for name in f.keys():
          yield name, f.get_tensor(name), False
    except SafetensorError as e:  # a truncated or overwritten file: name it, not safetensors' internals
      raise CheckpointError(f"{directory / fname} cannot be read ({e}); the checkpoint is damaged: export or "
                            "download it again") from e


def _match(name: str, table: dict[str, tuple[str, bool]]) -> tuple[str, int | None, bool] | None:
  if name in table:
    path, transpose = table[name]
    return path, None, transpose
  m = re.search(r"\.layers\.(\d+)\.", name)
  if m:
    pattern = name[:m.start()] + ".layers.{i}." + name[m.end():]
    if pattern in table:
      path, transpose = table[pattern]
      return path, int(m.group(1)), transpose
  return None


def _get(tree: dict, path: str) -> Any:
  for part in path.split("/"):
    tree = tree[part]
  return tree


def load_params(directory: Path, config: DecoderConfig, dtype: Any = jnp.float32,
                tensors: Iterator[tuple[str, np.ndarray, bool]] | None = None) -> Params:
  """Streams the checkpoint into host numpy arrays of ``dtype``, then moves them to the device.

  ``tensors``: ``(hf_name, array, already_transposed)`` from another source
  (a GGUF file, :mod:`grass_jax.gguf_checkpoint`); default: the files in ``directory``.
  """
  table = models.hf_names(config)
  np_dtype = np.dtype(jnp.dtype(dtype))  # bfloat16 is ml_dtypes' numpy dtype
  shapes = config.param_shapes()
  host = jax.tree.map(lambda s: np.empty(s, np_dtype), shapes, is_leaf=lambda x: isinstance(x, tuple))
  expected = {p: math.prod(s[:1]) if p.startswith("layers/") else 1
              for p, s in _flat_paths(shapes).items()}
  filled: dict[str, set[int]] = {p: set() for p in expected}
  unexpected: list[str] = []
  value = arr = target = dest = None
  for name, value, transposed in (iter_tensors(directory) if tensors is None else tensors):
    hit = _match(name, table)
    if hit is None:
      if not IGNORED.search(name):
        unexpected.append(name)
      continue
    path, layer, transpose = hit
    if path not in expected:
      if path == "lm_head" and config.tie_word_embeddings:
        continue  # some tied checkpoints also store the head
      unexpected.append(name)
      continue
    arr = value.T if (transpose and not transposed) else value
    dest = _get(host, path)
    target = dest if layer is None else dest[layer] if layer < dest.shape[0] else None
    if target is None:
      unexpected.append(name)
      continue
    if arr.shape != target.shape:
      want = target.shape[::-1] if transpose and not transposed else target.shape
      raise CheckpointError(f"shape mismatch for tensor {name!r}: checkpoint has {tuple(value.shape)}, the config "
                            f"({config.model_type}) expects {tuple(want)}")
    target[...] = arr.astype(np_dtype)
    filled[path].add(-1 if layer is None else layer)
  if unexpected:
    raise CheckpointError(f"unexpected tensors in {directory} (not in the {config.model_type} name table): "
                          f"{sorted(unexpected)[:20]}{' ...' if len(unexpected) > 20 else ''}")
  missing = []
  for path, n in expected.items():
    want = {-1} if not path.startswith("layers/") else set(range(n))
    for l in sorted(want - filled[path]):
      missing.append(path if l == -1 else f"{path}[{l}]")
  if missing:
    raise CheckpointError(f"missing weights in {directory}: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
  leaves, treedef = jax.tree.flatten(host)
  del host, target, dest, arr, value  # the list is now the only reference to each host array
  out = []
  while leaves:  # move leaf by leaf, dropping each host copy as we go
    out.append(jax.device_put(leaves.pop(0)))
  return treedef.unflatten(out)


def _flat_paths(shapes: dict) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]
  return {"/".join(str(k.key) for k in p): s for p, s in flat}


def read_model_config(path_or_hub_id: str | os.PathLike) -> DecoderConfig:
  """The model config of what :func:`load_pretrained` would load, without reading any weights."""
  if gguf_checkpoint.is_gguf(path_or_hub_id):
    return gguf_checkpoint.read_config(gguf_checkpoint.open_reader(gguf_checkpoint.resolve(path_or_hub_id)))
  return read_config(resolve(path_or_hub_id))


def load_pretrained(path_or_hub_id: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[Params, DecoderConfig]:
  """Loads ``(params, config)`` from a HF checkpoint directory or hub id, or a GGUF file.

  Args:
    path_or_hub_id: local directory with ``config.json`` and weights, a hub id,
      or a llama-architecture GGUF model: a ``.gguf`` file, a directory holding
      one, or ``package:<module>/<file>.gguf`` (:mod:`grass_jax.gguf_checkpoint`).
    dtype: parameter dtype (``jnp.float32`` or ``jnp.bfloat16``).

  Raises:
    CheckpointError: unknown ``model_type``, missing files or weights, shape
      mismatches or unexpected tensors, each naming the tensors involved.
    GGUFError: an unsupported GGUF architecture or tensor type (named), or
      the ``gguf`` package missing (the message names the extra to install).
  """
  if gguf_checkpoint.is_gguf(path_or_hub_id):
    file = gguf_checkpoint.resolve(path_or_hub_id)
    reader = gguf_checkpoint.open_reader(file)
    config = gguf_checkpoint.read_config(reader)
    return load_params(file, config, dtype, tensors=gguf_checkpoint.iter_tensors(reader, config)), config
  directory = resolve(path_or_hub_id)
  config = read_config(directory)
  return load_params(directory, config, dtype), config


def save_pretrained(params: Params, config: DecoderConfig, directory: str | os.PathLike, *,
                    dtype: Any | None = None, max_shard_bytes: int = 2 * 1024**3) -> Path:
  """Writes HF-named safetensors (sharded with an index above ``max_shard_bytes``) and ``config.json``.

  Args:
    params: parameters (any dtype); ``dtype`` casts them on export (default: as they are).
  """
  from safetensors.numpy import save_file
  out = Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  table = models.hf_names(config)
  shapes = _flat_paths(config.param_shapes())
  by_path: dict[str, list[tuple[str, bool]]] = {}
  for pattern, (path, transpose) in table.items():
    if path in shapes:
      by_path.setdefault(path, []).append((pattern, transpose))
  np_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))

  def tensors() -> Iterator[tuple[str, np.ndarray]]:
    for path in shapes:
      for pattern, transpose in by_path.get(path, []):
        value = _get(params, path)
        layers = range(value.shape[0]) if "{i}" in pattern else [None]
        for l in layers:
          arr = np.asarray(value if l is None else value[l])
          arr = arr.T if transpose else arr
          yield pattern.format(i=l), np.ascontiguousarray(arr if np_dtype is None else arr.astype(np_dtype))

  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, arr in tensors():
    if size and size + arr.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = arr
    size += arr.nbytes
  meta = {"format": "pt"}
  if len(shards) == 1:
    save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, str(out / fname), metadata=meta)
      weight_map.update({k: fname for k in shard})
    total = sum(a.nbytes for s in shards for a in s.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  hf = dict(config.hf_config) or _minimal_hf_config(config)
  saved_dtype = str(np_dtype or np.asarray(jax.tree.leaves(params)[0]).dtype)
  hf["torch_dtype"] = hf["dtype"] = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}.get(
      saved_dtype, "float32")
  (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
  return out


def _minimal_hf_config(config: DecoderConfig) -> dict[str, Any]:
  """A config.json for a model built without one (e.g. random init in tests/benchmarks)."""
  arch = models.HF_ARCHITECTURES[config.model_type]
  return {"model_type": config.model_type, "architectures": [arch], "vocab_size": config.vocab_size,
          "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
          "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
          "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
          "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
          "tie_word_embeddings": config.tie_word_embeddings,
          "max_position_embeddings": config.max_position_embeddings}
