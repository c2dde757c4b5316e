"""Tokenizers converted from GGUF files, kept on disk so that a later process reads them back.

``transformers`` builds a GGUF file's tokenizer from its metadata (SmolLM2's 49k-token vocabulary: 5-8 s
on a CPU); saved as ``tokenizer.json`` it loads in a fraction of a second. Entries live under
``$GRASS_JAX_CACHE/tokenizers`` (default ``$XDG_CACHE_HOME/grass_jax``, else ``~/.cache/grass_jax``), one
directory per file: its path, size and modification time, and the ``transformers`` version that converted
it, so a rewritten file or another ``transformers`` converts again. ``GRASS_JAX_CACHE=off`` keeps nothing.
An entry that cannot be read is converted again; a cache directory that cannot be written is skipped.

Example::

  tokenizer = cached(key, convert)   # convert() runs only when no readable entry exists for key
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = "GRASS_JAX_CACHE"


def cache_root() -> Path | None:
  """The cache directory, or None when ``GRASS_JAX_CACHE=off``."""
  chosen = os.environ.get(ENV)
  if chosen is not None:
    return None if chosen.strip().lower() in ("off", "0", "") else Path(chosen).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
  return Path(base) / "grass_jax"


def entry_dir(key: tuple[str, int, int]) -> Path | None:
  """Where the tokenizer of the file ``key`` (path, size, mtime_ns) is kept, or None without a cache."""
  root = cache_root()
  if root is None:
    return None
  import transformers
  digest = hashlib.sha256(repr((*key, transformers.__version__)).encode()).hexdigest()[:24]
  return root / "tokenizers" / digest


def cached(key: tuple[str, int, int], convert: Callable[[], Any]) -> Any:
  """The tokenizer kept for ``key``, or ``convert()``'s, which is then kept."""
  where = entry_dir(key)
  if where is not None and (where / "tokenizer.json").is_file():
    try:
      from transformers import AutoTokenizer
      return AutoTokenizer.from_pretrained(str(where))
    except Exception:  # noqa: BLE001 -- a damaged or foreign entry: convert again and replace it
      shutil.rmtree(where, ignore_errors=True)
  tokenizer = convert()
  if where is not None:
    _keep(tokenizer, where)
  return tokenizer


def _keep(tokenizer: Any, where: Path) -> None:
  """Saves into a fresh directory beside ``where``, then renames it: a reader sees a whole entry or none."""
  try:
    where.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=where.name + ".", dir=where.parent))
    tokenizer.save_pretrained(str(tmp))
    try:
      os.replace(tmp, where)
    except OSError:  # another process kept it first
      shutil.rmtree(tmp, ignore_errors=True)
  except OSError:
    pass  # a read-only home: every process converts, as without a cache
