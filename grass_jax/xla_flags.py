"""XLA flags that make GRASS training faster on GPU, and the one place that sets them.

Each flag is measured (``benchmarks/peers.py``, rows ending in ``-nomerge``; ``docs/performance-history.md``):

* ``--xla_gpu_dot_merger_threshold_mb=0``: XLA's dot merger turns matmuls that share an input (a
  layer's ``k_proj`` and ``v_proj``) into one, by concatenating their weights. With the layers in a
  loop over a ``[L, ...]`` stack the weights change at every iteration, so the merge copies both
  matrices at every layer pass to save one matmul launch. Off is faster on both benchmark models
  (the ``-nomerge`` rows; docs/performance-history.md).

XLA reads ``XLA_FLAGS`` once, when JAX starts its backend (the first computation or device query),
so the flags must be set before that. ``scripts/train.py`` and ``scripts/evaluate.py`` do it first
thing; a program of your own calls :func:`use_recommended_flags` before it touches JAX::

  import grass_jax
  grass_jax.use_recommended_flags()   # before the first jax computation
  ...

A deterministic run (``train.deterministic``) also needs :data:`DETERMINISTIC`, XLA's deterministic GPU
kernels (no atomics in reductions and scatters); :func:`use_deterministic_flags` sets it the same way.

A flag already in ``XLA_FLAGS`` is left as you set it, so ``XLA_FLAGS=--xla_gpu_dot_merger_threshold_mb=32``
turns the dot merger back on. The flags only affect GPU compilation; on CPU they are parsed and unused.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import MutableMapping

# flag name (without the leading dashes) -> value
RECOMMENDED: dict[str, str] = {"xla_gpu_dot_merger_threshold_mb": "0"}
# What a bitwise-reproducible GPU run needs (cuDNN's fused attention is not covered: it crashed in its
# first execution with this flag, so deterministic runs use XLA's attention; grass_jax.train).
DETERMINISTIC: dict[str, str] = {"xla_gpu_deterministic_ops": "true"}


def _flag_name(token: str) -> str:
  return token.lstrip("-").split("=", 1)[0]


def _backend_started() -> bool:
  """Whether JAX has started a backend (then XLA_FLAGS is no longer read); False where JAX cannot say."""
  try:
    from jax._src import xla_bridge  # private; present from jax 0.4 to 0.10 at least
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False


def with_recommended_flags(xla_flags: str, recommended: dict[str, str] | None = None) -> str:
  """``xla_flags`` followed by every recommended flag it does not already set (yours win).

  Example::

    with_recommended_flags("--xla_gpu_autotune_level=2")
    # '--xla_gpu_autotune_level=2 --xla_gpu_dot_merger_threshold_mb=0'
  """
  return " ".join([xla_flags.strip(), *_unset(xla_flags, RECOMMENDED if recommended is None else recommended)]).strip()


def _unset(xla_flags: str, flags: dict[str, str]) -> list[str]:
  """``--name=value`` for each of ``flags`` that ``xla_flags`` does not name (a value of yours counts as set)."""
  present = {_flag_name(t) for t in xla_flags.split()}
  return [f"--{name}={value}" for name, value in flags.items() if name not in present]


def missing_deterministic_flags(environ: MutableMapping[str, str] | None = None) -> list[str]:
  """The flags of :data:`DETERMINISTIC` that ``XLA_FLAGS`` does not set to their value (``--name=value``)."""
  env = os.environ if environ is None else environ
  present = dict(t.lstrip("-").partition("=")[::2] for t in env.get("XLA_FLAGS", "").split())
  return [f"--{k}={v}" for k, v in DETERMINISTIC.items() if present.get(k, "").lower() not in (v, "1")]


def missing_recommended_flags(environ: MutableMapping[str, str] | None = None) -> list[str]:
  """The flags of :data:`RECOMMENDED` that ``XLA_FLAGS`` does not name at all (a value of your own counts as set)."""
  env = os.environ if environ is None else environ
  return _unset(env.get("XLA_FLAGS", ""), RECOMMENDED)


def use_deterministic_flags(environ: MutableMapping[str, str] | None = None) -> list[str]:
  """:func:`use_recommended_flags` for :data:`DETERMINISTIC`: call it before JAX's first computation."""
  return use_recommended_flags(environ, DETERMINISTIC)


def use_recommended_flags(environ: MutableMapping[str, str] | None = None,
                          flags: dict[str, str] | None = None) -> list[str]:
  """Adds the recommended flags to ``XLA_FLAGS`` (those not set already); returns the flags added.

  Call it before JAX's first computation: once the backend runs, XLA no longer reads ``XLA_FLAGS``,
  and this changes nothing (with a warning when that backend is a GPU, where the flags matter).
  ``environ`` defaults to ``os.environ``; ``flags`` to :data:`RECOMMENDED`.
  """
  env = os.environ if environ is None else environ
  before = env.get("XLA_FLAGS", "")
  after = with_recommended_flags(before, flags)
  if after == before.strip():
    return []
  if environ is None and _backend_started():
    import jax
    if jax.default_backend() != "gpu":
      return []
    warnings.warn("grass_jax.use_recommended_flags() was called after JAX started its backend; XLA_FLAGS is "
                  "read only at start, so the flags are not used. Call it before the first jax computation.",
                  stacklevel=2)
    return []
  env["XLA_FLAGS"] = after
  return after[len(before.strip()):].split()
