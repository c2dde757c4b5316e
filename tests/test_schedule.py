"""grass_jax.schedule: the one answer to when GRASS probes, refreshes, draws and switches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grass_jax
from grass_jax.schedule import Schedule


def test_the_schedule_by_hand_on_the_host_and_traced():
  s = Schedule(period=4, probe_steps=4, sketch_every=2)
  steps = range(12)
  assert [c for c in steps if s.probing(c)] == [0, 1, 2, 3]
  assert [c for c in steps if s.switching(c)] == [3, 7, 11]
  assert [c for c in steps if s.drawing(c)] == [2, 6, 10]
  assert [c for c in steps if s.refreshing(c)] == [2, 6, 10]  # the end of probing, then before each draw
  assert [c for c in steps if s.sketching(c)] == [0, 2, 4, 6, 8, 10]
  assert [c for c in steps if Schedule(period=4, probe_steps=4, static=True).refreshing(c)] == [2]
  traced = jax.jit(lambda c: jnp.stack([s.probing(c), s.switching(c), s.drawing(c), s.refreshing(c), s.sketching(c)]))
  for c in steps:
    assert traced(jnp.int32(c)).tolist() == [s.probing(c), s.switching(c), s.drawing(c), s.refreshing(c),
                                             s.sketching(c)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(period=0), "period must be an int >= 1"),
    (dict(period=4, probe_steps=6), "probe_steps must be a multiple of period=4"),
    (dict(period=4, refresh_every=0), "refresh_every must be an int >= 1"),
    (dict(period=4, sketch_every=0), "sketch_every must be an int >= 1"),
    (dict(period=4, static=True), "static importance .* set probe_steps > 0"),
])
def test_bad_schedules_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    Schedule(**kwargs)


def test_the_transform_draws_and_switches_when_the_schedule_says():
  period = 4
  params = {"layers": {"w": jnp.zeros((8, 2))}}
  tx = grass_jax.transform(optax.sgd(0.1), layers=grass_jax.stacked_layers("layers"), num_active=2, period=period,
                           seed=5)
  state, grads = tx.init(params), {"layers": {"w": jnp.ones((8, 2))}}
  step = jax.jit(tx.update)
  schedule = Schedule(period)
  for c in range(12):
    before = grass_jax.find_state(state)
    _, state = step(grads, state, params)
    after = grass_jax.find_state(state)
    drawn = not np.array_equal(before.probabilities, after.probabilities) or \
        not np.array_equal(before.next_active, after.next_active)
    assert np.array_equal(after.active, before.next_active if schedule.switching(c) else before.active)
    if not schedule.drawing(c):
      assert not drawn, c  # next_active and the draw's probabilities change only at a draw
