"""Telling a local path from a Hugging Face hub id, so a mistyped path is never sent to the hub.

A hub id is ``name`` or ``namespace/name``. A source is local when it cannot be one: it is absolute,
starts with ``.`` or ``~``, has two or more ``/``, ends in one of the given file suffixes, or its
parent directory exists here. Such a source that does not exist is a "not found" error at once,
instead of a minute of network retries ending in a hub error.

Example::

  looks_local("runs/demo/hf_model")         # True: two '/'
  looks_local("TinyLlama/TinyLlama-1.1B")   # False: could be a hub id
  looks_local("data/train.jsonl", (".jsonl",))  # True: a file suffix
"""

from __future__ import annotations

import os
from pathlib import Path


def looks_local(source: str | os.PathLike, suffixes: tuple[str, ...] = ()) -> bool:
  """True when ``source`` cannot be a hub id (see the module docstring)."""
  text = str(source)
  p = Path(text).expanduser()
  return (text.startswith((".", "~", "/")) or text.count("/") >= 2 or p.suffix.lower() in suffixes
          or (p.parent != Path(".") and p.parent.exists()))
