"""Host offloading of inactive layers' optimizer state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grass_jax
from grass_jax.offload import Offloader, host_slot_states, memory_kind, state_stream
from grass_jax.layer_updates import StateStream
from tests.float_bounds import assert_adam_runs_agree, assert_moments_agree
from tests.test_transform import random_grads, stacked_params


def _run(offload, period, steps=14, seed=2, stream=False, by_leaf=True):
  params = stacked_params()
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   grass_jax.transform(optax.adamw(1e-2, weight_decay=0.1), layers=grass_jax.stacked_layers(),
                                       num_active=2, period=period, seed=seed, offload=offload))
  state = tx.init(params)
  extra = {}
  if stream:  # the active layers' states live on the host too; the step fetches each for its update
    state = jax.device_put(state, jax.devices()[0])
    state, shardings = host_slot_states(state, jax.tree.map(lambda x: x.sharding, state))
    extra = {"state_stream": state_stream(grass_jax.find_state(shardings).slot_states[0], by_leaf=by_leaf)}
  off = Offloader(state, period=period, stream=stream) if offload else None

  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p, **extra)
    return optax.apply_updates(p, u), s

  seen = []
  for i in range(steps):
    params, state = step(params, state, random_grads(params, i))
    if off is not None:
      state = off.after_step(state)
    seen.append(np.asarray(grass_jax.find_state(state).active).tolist())
  return params, state, off, seen


@pytest.mark.default_flags
@pytest.mark.parametrize("period,stream,by_leaf", [(1, False, True), (3, False, True), (1, True, False),
                                                   (3, True, False), (3, True, True)])
def test_params_identical_with_and_without_offload(period, stream, by_leaf):
  p_on, s_on, off, seq_on = _run(True, period, stream=stream, by_leaf=by_leaf)
  p_off, s_off, _, seq_off = _run(False, period)
  assert seq_on == seq_off
  assert len({tuple(a) for a in seq_on}) > 2
  # Two programs of the same Adam arithmetic (offloading moves states, streaming by leaf runs adamw on one
  # matrix at a time): equal up to their roundings (tests/float_bounds.py).
  jax.tree.map(lambda a, b: assert_adam_runs_agree(a, b, steps=14, lr=1e-2), p_on, p_off)
  same = lambda a, b: assert_moments_agree(a, b, steps=14)
  # every layer's moments agree with the on-device bank
  ref = grass_jax.find_state(s_off)
  ref_active = np.asarray(ref.active).tolist()
  for l, st in off.full_bank(s_on).items():
    want = ref.slot_states[ref_active.index(l)] if l in ref_active else jax.tree.map(lambda b: b[l], ref.bank)
    jax.tree.map(same, st, want)


def test_late_swap_copies_only_after_the_step_and_waits_for_its_copies(monkeypatch):
  """At a switch that moves layers, wait for the step, then copy, then wait for the copies; no waiting at steps
  without a switch, nor when streaming (a switch moves no data)."""
  events = []
  block, put = jax.block_until_ready, jax.device_put
  monkeypatch.setattr(jax, "block_until_ready", lambda x: (events.append("wait"), block(x))[1])
  monkeypatch.setattr(jax, "device_put", lambda *a, **k: (events.append("copy"), put(*a, **k))[1])
  _, _, off, seen = _run(True, 3, steps=12)
  periods = [seen[0], *seen[2::3]]  # the first set, then the sets after the switches at steps 3, 6, 9, 12
  moves = sum(set(a) != set(b) for a, b in zip(periods, periods[1:]))
  swaps = "".join("w" if e == "wait" else "c" for e in events)
  assert moves >= 2
  assert swaps.count("w") == 2 * moves  # one wait before and one after each switch that moves layers
  for chunk in swaps.split("w")[1::2]:  # between the two waits: the copies of that switch
    assert chunk and set(chunk) == {"c"}
  events.clear()
  _run(True, 3, steps=12, stream=True)
  assert "wait" not in events


def test_memory_kinds_after_switch():
  _, state, off, _ = _run(True, 1, steps=6)
  s = grass_jax.find_state(state)
  assert s.bank is None
  assert off.bank, "no layer was swapped out"
  assert memory_kind(off.bank) == {"pinned_host"}
  assert memory_kind(off.fresh) == {"pinned_host"}
  assert memory_kind(s.slot_states) == {"device"}
  assert sorted(off.slot_layers) == np.asarray(s.active).tolist() == np.asarray(s.slot_layers).tolist()
  assert not set(off.bank) & set(off.slot_layers)


def test_streamed_active_states_stay_on_the_host():
  _, state, off, _ = _run(True, 1, steps=6, stream=True)
  s = grass_jax.find_state(state)
  assert off.bank and memory_kind(off.bank) == {"pinned_host"}
  assert memory_kind(s.slot_states) == {"pinned_host"}  # after steps and switches alike
  assert memory_kind((s.importance, s.active)) == {"device"}
  with pytest.raises(ValueError, match="host_slot_states"):
    Offloader(grass_jax.find_state(_run(True, 1, steps=1)[1]), period=1, stream=True)


def test_resumed_layer_continues_from_saved_moments():
  """A layer swapped out and back in carries its moments (count > 0, mu != 0), not fresh ones."""
  params = stacked_params()
  inner = optax.adam(1e-2)
  tx = grass_jax.transform(inner, layers=grass_jax.stacked_layers(), num_active=2, period=1, seed=0, offload=True)
  state = tx.init(params)
  off = Offloader(state, period=1)
  trained_then_paused = set()
  for i in range(20):
    before = set(np.asarray(state.active).tolist())
    _, state = tx.update(random_grads(params, i), state, params)
    state = off.after_step(state)
    after = set(np.asarray(state.active).tolist())
    trained_then_paused |= before - after
    back = trained_then_paused & after
    for l in back:
      j = off.slot_layers.index(l)
      adam_state = state.slot_states[j][0]
      assert int(adam_state.count) > 0 and float(jnp.abs(adam_state.mu["layers/w"]).sum()) > 0
      return
  pytest.fail("no layer came back after a pause")


def test_offloader_rejects_states_it_cannot_manage():
  params = stacked_params()
  on_device = grass_jax.transform(optax.adam(1e-2), layers=grass_jax.stacked_layers(), num_active=2)
  with pytest.raises(ValueError, match="offload=True"):
    Offloader(on_device.init(params), period=1)
  full = grass_jax.full(optax.adam(1e-2), layers=grass_jax.stacked_layers())
  with pytest.raises(ValueError, match="nothing to offload"):
    Offloader(full.init(params), period=1)


def _recording_stream(by_leaf, fetched):
  """A StateStream that stays on the device and records the moment leaves of each state it fetches."""
  def fetch(state, after, part=None):
    groups = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, dict)) if isinstance(x, dict)]
    fetched.append(sorted(groups[0]))
    return state
  return StateStream(fetch=fetch, store=lambda state, part=None: state, by_leaf=by_leaf)


def _with_vector_state():
  """An inner optimizer whose state holds a [2] vector beside the moments: it does not split by leaf."""
  tally = optax.GradientTransformation(lambda p: jnp.zeros(2), lambda u, s, p=None: (u, s + 1))
  return optax.chain(optax.adam(1e-2), tally)


@pytest.mark.parametrize("inner,by_leaf,want", [
    (optax.adamw(1e-2), True, [["layers/b"], ["layers/w"]] * 2),   # one matrix's moments at a time
    (optax.adamw(1e-2), False, [["layers/b", "layers/w"]] * 2),     # a layer's
    (_with_vector_state(), True, [["layers/b", "layers/w"]] * 2),  # streamed by layer
])
def test_streaming_by_leaf_fetches_one_matrix_state_at_a_time(inner, by_leaf, want):
  params = stacked_params()
  tx = grass_jax.transform(inner, layers=grass_jax.stacked_layers(), num_active=2, period=3, offload=True,
                           always_on=False)
  state = tx.init(params)
  fetched = []
  u, new = tx.update(random_grads(params, 0), state, params, state_stream=_recording_stream(by_leaf, fetched))
  assert fetched == want
  # the same updates and states as without a stream (on the device: no copies, bitwise up to fusion)
  u_ref, ref = tx.update(random_grads(params, 0), state, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), (u, new), (u_ref, ref))


def test_streaming_by_leaf_keeps_updates_of_another_dtype_than_their_gradients():
  # adam with float32 first moments returns float32 updates for bf16 gradients: they cannot be written over
  # the gradients, so they are stacked on their own, unrounded.
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), stacked_params())
  tx = grass_jax.transform(optax.adam(1e-2, mu_dtype=jnp.float32), layers=grass_jax.stacked_layers(), num_active=2,
                           period=3, offload=True, always_on=False)
  state = tx.init(params)
  grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), random_grads(params, 0))
  fetched = []
  u, new = tx.update(grads, state, params, state_stream=_recording_stream(True, fetched))
  assert fetched == [["layers/b"], ["layers/w"]] * 2
  u_ref, ref = tx.update(grads, state, params)
  assert u["layers"]["w"].dtype == u_ref["layers"]["w"].dtype == jnp.float32
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                                       rtol=1e-6, atol=1e-7), (u, new), (u_ref, ref))
