"""A persistent compilation cache per run, so a resumed run does not compile its step again.

Compiling the train step takes seconds to a minute on a large model (more with
``model.unroll_forward``, most of it autotuning). JAX can keep compiled executables on disk and read
them back when the same program is compiled again. The trainer points that cache at
``<train.output_dir>/compilation_cache`` (``train.compilation_cache: true``, the default), so resuming
a run (after a crash, or to extend it) reads its step back instead of compiling it. Only programs
that took at least a second to compile are stored (JAX's default), which is the train step and little
else. A cache you configured yourself wins: ``JAX_COMPILATION_CACHE_DIR`` in the environment or
``jax.config.jax_compilation_cache_dir`` set by your program.

Example::

  use_compilation_cache(Path("runs/my-run/compilation_cache"))
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache


def use_compilation_cache(directory: Path, environ: dict[str, str] | None = None) -> Path:
  """Makes ``directory`` JAX's persistent compilation cache, unless one is configured already.

  Returns the cache directory in use: ``directory``, or the one configured before.
  """
  env = os.environ if environ is None else environ
  if env.get("JAX_COMPILATION_CACHE_DIR"):
    return Path(env["JAX_COMPILATION_CACHE_DIR"])
  if jax.config.jax_compilation_cache_dir:
    return Path(jax.config.jax_compilation_cache_dir)
  directory.mkdir(parents=True, exist_ok=True)
  # Works after earlier compiles too: without a directory JAX leaves its cache uninitialised and
  # builds it at the first compile that finds one (tests/test_compile_cache.py checks this).
  compilation_cache.set_cache_dir(str(directory))
  return directory
