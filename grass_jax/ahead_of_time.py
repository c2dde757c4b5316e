"""The train step compiled ahead of time, before the weights are on the device.

XLA:GPU's autotuner runs candidate kernels on buffers the size of their operands while it compiles.
When the step first compiles at its first call, the weights and optimizer state are already
resident, and those buffers come on top of them. With the forward pass unrolled
(``model.unroll_forward``) the step's matmuls read slices of the whole ``[L, ...]`` weight stack, and
compiling Llama-2-7B's step (b2 x 512) peaked at 2.93 GiB against 1.12 GiB scanned
(``benchmarks/probes/step_memory.py`` on an H200): the run's peak rose by 0.72 GiB over the scan's
although the compiled step needs less memory. Compiled before the weights are placed, the
autotuner's buffers and the weights are never on the device together.

The step compiles once per batch shape (per length bucket, see :mod:`grass_jax.data`), as ``jax.jit``
would, from abstract shapes. A shape not compiled ahead compiles at its first call.

Example::

  step = CompiledStep(make_train_step(config, tx, shardings=(p_sh, s_sh, b_sh)))
  step.compile(param_shapes, state_shapes, batch_shapes)   # nothing on the device yet
  params = jax.device_put(host_params, p_sh)
  params, opt_state, metrics = step(params, opt_state, batch)
"""

from __future__ import annotations

from typing import Any

import jax

Batch = dict[str, Any]


def abstract(tree: Any) -> Any:
  """``jax.ShapeDtypeStruct`` leaves of the same shapes and dtypes (arrays, numpy or abstract)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _batch_key(batch: Batch) -> tuple:
  return tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(batch.items()))


class CompiledStep:
  """A jitted train step with one compiled executable per batch shape, compiled on request.

  ``jax.jit`` compiles at the first call with a new shape; this compiles when :meth:`compile` is
  called, so the caller picks the moment (before the weights are on the device). Calls with a
  shape compiled ahead run that executable; the arguments' shardings must be the ones the step
  was made with (``make_train_step(shardings=...)``), which is what keeps the step to one
  compilation per shape.

  Attributes:
    step: the jitted step (``make_train_step``'s result), run as is for shapes not compiled ahead.
  """

  def __init__(self, step: Any):
    self.step = step
    self._compiled: dict[tuple, Any] = {}

  def compile(self, params: Any, opt_state: Any, batch: Batch) -> None:
    """Compiles the step for these shapes (arrays or ``jax.ShapeDtypeStruct``; nothing is read)."""
    key = _batch_key(batch)
    if key not in self._compiled:
      self._compiled[key] = self.step.lower(abstract(params), abstract(opt_state), abstract(batch)).compile()

  def __call__(self, params: Any, opt_state: Any, batch: Batch) -> Any:
    compiled = self._compiled.get(_batch_key(batch))
    if compiled is None:
      return self.step(params, opt_state, batch)
    return compiled(params, opt_state, batch)

  def num_compiled(self) -> int:
    """Executables so far: compiled ahead plus those the jitted step compiled at a call."""
    return len(self._compiled) + self.step._cache_size()  # pylint: disable=protected-access
