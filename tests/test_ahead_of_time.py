"""CompiledStep: one executable per batch shape, compiled when asked, run without jit's dispatch.
(With the real train step: tests/test_train_step.py, equality with the full form; tests/test_train_loop.py,
the Trainer compiles every batch length before loading the model.)"""

import threading

import jax
import jax.numpy as jnp
import numpy as np

from grass_jax.ahead_of_time import CompiledStep, abstract


def _toy_step(params, opt_state, batch):
  return params + batch["x"].sum(), opt_state + 1, {"loss": batch["x"].mean()}


def test_compiled_step_runs_what_it_compiled_ahead_and_compiles_other_shapes_at_their_call():
  step = CompiledStep(jax.jit(_toy_step))
  params, state = jnp.float32(0), jnp.int32(0)
  step.compile(abstract(params), abstract(state), {"x": jax.ShapeDtypeStruct((2, 3), jnp.float32)})
  step.compile(params, state, {"x": np.zeros((2, 3), np.float32)})  # the same shape again: nothing new
  assert step.num_compiled() == 1
  params, state, m = step(params, state, {"x": jnp.ones((2, 3))})
  assert (float(params), int(state), float(m["loss"])) == (6.0, 1, 1.0)
  assert step.step._cache_size() == 0  # the executable compiled ahead ran, not the jitted function
  params, state, m = step(params, state, {"x": jnp.ones((2, 5))})
  assert (float(params), int(state)) == (16.0, 2)
  assert step.step._cache_size() == 1 and step.num_compiled() == 2


def _bucketed_toy_step(params, opt_state, batch, backward_start=None):
  add = 0.0 if backward_start is None else 100.0 * backward_start  # which executable ran, visibly
  return params + batch["x"].sum() + add, opt_state + 1, {"loss": batch["x"].mean()}


def test_a_bucket_compiles_in_the_background_while_the_scan_runs():
  step = CompiledStep(jax.jit(_bucketed_toy_step, static_argnums=(3,)))
  params, state, batch = jnp.float32(0), jnp.int32(0), {"x": jnp.ones((2, 3))}
  step.compile(params, state, batch)  # the scan, ahead
  gate = threading.Event()
  lower = step._lower  # pylint: disable=protected-access
  step._lower = lambda *a: (gate.wait(10), lower(*a))[1]  # the bucket's compilation held until released
  params, state, _ = step(params, state, batch, backward_start=2)
  assert float(params) == 6.0  # the scan ran: the bucket is still compiling
  gate.set()
  step.wait()
  params, state, _ = step(params, state, batch, backward_start=2)
  assert float(params) == 6.0 + 6.0 + 200.0  # the bucket's executable
  assert dict(step.runs) == {None: 1, 2: 1} and step.num_compiled() == 2 and step.step._cache_size() == 0
  waiting = CompiledStep(jax.jit(_bucketed_toy_step, static_argnums=(3,)), background=False)
  assert float(waiting(jnp.float32(0), state, batch, backward_start=1)[0]) == 106.0  # compiled at the call
