"""The train step compiled ahead of time, before the weights are on the device.

XLA:GPU's autotuner runs candidate kernels on buffers the size of their operands while it compiles.
When the step first compiles at its first call, the weights and optimizer state are already
resident, and those buffers come on top of them. With the forward pass unrolled
(``model.unroll_forward``) the step's matmuls read slices of the whole ``[L, ...]`` weight stack, and
the autotuner's buffers raised the run's peak above the scan's although the compiled step needs less
memory (``benchmarks/probes/step_memory.py``; docs/performance-history.md). Compiled before the weights are placed, the
autotuner's buffers and the weights are never on the device together.

The step compiles once per batch shape (per length bucket, see :mod:`grass_jax.data`), as ``jax.jit``
would, from abstract shapes. A shape not compiled ahead compiles at its first call.

**Buckets of the backward pass** (``backward_start``, :mod:`grass_jax.models.bucketed_stack`): a
call with an int ``backward_start`` wants that bucket's executable. With ``background=True``
(default) a bucket not compiled yet is compiled in a background thread while the call, and the
calls after it, run the slot scan (``backward_start=None``, compiled ahead): training never waits
for a compilation, and switches to the faster executable once it is there. With
``background=False`` the call compiles it and waits (what ``jax.jit`` does).

Example::

  step = CompiledStep(make_train_step(config, tx, shardings=(p_sh, s_sh, b_sh)))
  step.compile(param_shapes, state_shapes, batch_shapes)   # nothing on the device yet
  params = jax.device_put(host_params, p_sh)
  params, opt_state, metrics = step(params, opt_state, batch)
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Any

import jax

Batch = dict[str, Any]


def abstract(tree: Any) -> Any:
  """``jax.ShapeDtypeStruct`` leaves of the same shapes and dtypes (arrays, numpy or abstract)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _batch_key(batch: Batch, backward_start: int | None = None) -> tuple:
  return tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(batch.items())) + (backward_start,)


def _start_arg(backward_start: int | None) -> tuple[int, ...]:
  # Steps made elsewhere need not take the argument: pass it only when a bucket is asked for, and by
  # position (jit refuses keyword arguments when the step has in_shardings).
  return () if backward_start is None else (backward_start,)


class CompiledStep:
  """A jitted train step with one compiled executable per batch shape, compiled on request.

  ``jax.jit`` compiles at the first call with a new shape; this compiles when :meth:`compile` is
  called, so the caller picks the moment (before the weights are on the device). Calls with a
  shape compiled ahead run that executable; the arguments' shardings must be the ones the step
  was made with (``make_train_step(shardings=...)``), which is what keeps the step to one
  compilation per shape.

  Attributes:
    step: the jitted step (``make_train_step``'s result), run as is for shapes not compiled ahead.
    background: compile buckets of the backward pass in a background thread (module docstring).
    workers: background compilations at a time (more: all buckets ahead sooner, at more host memory).
    runs: calls so far per ``backward_start`` that ran (None: the slot scan).
  """

  def __init__(self, step: Any, *, background: bool = True, workers: int = 1):
    self.step = step
    self.background = background
    self.workers = workers
    self.runs: collections.Counter = collections.Counter()
    self._compiled: dict[tuple, Any] = {}
    self._pending: dict[tuple, concurrent.futures.Future] = {}
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None

  def _lower(self, params: Any, opt_state: Any, batch: Batch, backward_start: int | None) -> Any:
    return self.step.lower(abstract(params), abstract(opt_state), abstract(batch), *_start_arg(backward_start))

  def compile(self, params: Any, opt_state: Any, batch: Batch, backward_start: int | None = None) -> None:
    """Compiles the step for these shapes (arrays or ``jax.ShapeDtypeStruct``; nothing is read)."""
    key = _batch_key(batch, backward_start)
    if key not in self._compiled:
      self._compiled[key] = self._lower(params, opt_state, batch, backward_start).compile()

  def compile_in_background(self, params: Any, opt_state: Any, batch: Batch, backward_start: int | None) -> None:
    """Starts compiling in a background thread (once per key); :meth:`__call__` uses it when done."""
    key = _batch_key(batch, backward_start)
    if key in self._compiled or key in self._pending:
      return
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="grass-compile")
    shapes = abstract((params, opt_state, batch))  # now: the arrays may be donated by the next step
    self._pending[key] = self._pool.submit(lambda: self._lower(*shapes, backward_start).compile())

  def _collect_finished(self) -> None:
    for key, future in list(self._pending.items()):
      if future.done():
        del self._pending[key]
        self._compiled[key] = future.result()  # a compilation error surfaces here, at the next call

  def __call__(self, params: Any, opt_state: Any, batch: Batch, backward_start: int | None = None) -> Any:
    if self._pending:
      self._collect_finished()
    key = _batch_key(batch, backward_start)
    if backward_start is not None and key not in self._compiled and self.background:
      self.compile_in_background(params, opt_state, batch, backward_start)
      backward_start, key = None, _batch_key(batch)  # the slot scan until the bucket is compiled
    self.runs[backward_start] += 1
    compiled = self._compiled.get(key)
    if compiled is None:
      return self.step(params, opt_state, batch, *_start_arg(backward_start))
    return compiled(params, opt_state, batch)

  def close(self) -> None:
    """Drops the background compilations not started yet (the run is over); one under way finishes."""
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)
      self._pool = None
    self._pending = {k: f for k, f in self._pending.items() if not f.cancelled()}

  def wait(self) -> None:
    """Waits for the background compilations started so far (tests, benchmarks)."""
    for future in list(self._pending.values()):
      future.result()
    self._collect_finished()

  def num_compiled(self) -> int:
    """Executables so far: compiled ahead or in the background, plus those the jitted step compiled at a call."""
    return len(self._compiled) + self.step._cache_size()  # pylint: disable=protected-access
