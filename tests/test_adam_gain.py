"""importance_from='adam': each trained layer's gradient along its own Adam update (grass_jax.importance)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grass_jax
from grass_jax import config as config_lib
from grass_jax import importance

LAYERS = grass_jax.stacked_layers("layers")


def test_adam_gains_by_hand():
  g = {"w": jnp.asarray([[1.0, -2.0, 3.0, -4.0], [1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]])}
  # layer 0: a unit sign step (a fresh Adam state's at learning rate 1) gains mean |g| = 2.5; layer 1: a step up
  # the gradient gains nothing (not a negative gain); layer 2: no update (a skipped step) is not a measurement
  u = {"w": jnp.asarray([[-1.0, 1.0, -1.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]])}
  out = np.asarray(importance.adam_gains(g, u, layer_size=4))
  assert out[0] == 2.5 and out[1] == 0.0 and np.isnan(out[2])
  # momentum at a quarter of the gradient's sign (a sign-flipping history): a quarter of the gain
  u = {"w": -0.25 * jnp.sign(g["w"])}
  np.testing.assert_array_equal(importance.adam_gains(g, u, layer_size=4), [2.5 / 4, 1.0 / 4, 5.0 / 4 / 4])


def test_trained_layers_measure_the_gain_of_their_own_adam_steps():
  # A constant gradient: each trained layer's gain is what the bare optax.adam(1.0) step buys, -<g, u> / n
  # (about mean |g|: m_hat = g, v_hat = g^2; a zero gradient moves nothing and gains nothing); frozen layers
  # are not measured. One float32 dot of 2 terms against the same update: 1e-6 relative covers its rounding.
  rows = jnp.asarray([[1.0, -3.0], [0.5, 0.5], [2.0, -2.0], [4.0, 0.0]])
  params = {"layers": {"w": jnp.zeros((4, 2))}}
  tx = grass_jax.transform(optax.adam(1.0), layers=LAYERS, num_active=2, period=2, mgn_ema=None, seed=3,
                           importance_from="adam", always_on=False)
  state = tx.init(params)
  active = np.asarray(grass_jax.find_state(state).active)
  ref = optax.adam(1.0)
  ref_state = ref.init(rows)  # Adam acts elementwise: one [4, 2] leaf steps every layer as its own would
  expected = []
  for _ in range(2):  # the refresh falls one step before the switch (the draw must see it): after step 1
    _, state = tx.update({"layers": {"w": rows}}, state, params)
    u, ref_state = ref.update(rows, ref_state)
    expected.append(-np.sum(np.asarray(rows) * np.asarray(u), axis=1) / 2)
  s = grass_jax.find_state(state)
  np.testing.assert_allclose(np.asarray(s.importance)[active], expected[0][active], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(s.window_sum)[active], expected[1][active], rtol=1e-6)  # not folded yet
  np.testing.assert_allclose(expected[0], np.mean(np.abs(np.asarray(rows)), axis=1), rtol=1e-4)
  assert np.asarray(s.num_measurements)[active].tolist() == [1, 1]
  frozen = np.setdiff1d(np.arange(4), active)
  assert np.asarray(s.num_measurements)[frozen].tolist() == [0, 0] and np.all(np.asarray(s.importance)[frozen] == 0)


@pytest.mark.parametrize("importance_from,favoured", [("adam", "steady"), ("grad", "noisy")])
def test_adam_gain_prefers_a_steady_gradient_to_a_larger_noisy_one(importance_from, favoured):
  """Layer 0's gradient is +1 everywhere at every step; layers 1-3's are 3x larger with random signs. The
  gradient norm ranks the noisy layers first; the gain Adam's kept moments buy ranks the steady one first
  (a sign-flipping gradient is nearly orthogonal to its own momentum)."""
  num_layers, period = 4, 2
  params = {"layers": {"w": jnp.zeros((num_layers, 64))}}
  tx = grass_jax.transform(optax.adam(1.0), layers=LAYERS, num_active=1, period=period, temperature=0.5,
                           epsilon=0.1, importance_from=importance_from, always_on=False, seed=1)
  state = tx.init(params)
  step = jax.jit(tx.update)
  key = jax.random.PRNGKey(0)
  drawn = []
  for _ in range(100 * period):
    key, sub = jax.random.split(key)
    noisy = 3.0 * jnp.sign(jax.random.normal(sub, (num_layers - 1, 64)))
    grads = {"layers": {"w": jnp.concatenate([jnp.ones((1, 64)), noisy])}}
    drawn.append(int(grass_jax.find_state(state).active[0]))
    _, state = step(grads, state, params)
  imp = np.asarray(grass_jax.find_state(state).importance)
  late = np.mean(np.asarray(drawn[len(drawn) // 2:]) == 0)
  if favoured == "steady":
    assert imp[0] > imp[1:].max() and late > 0.5
  else:
    assert imp[0] < imp[1:].min() and late < 0.25


def test_config_refuses_probing_with_adam_importance(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="optim.importance: adam .* set optim.probe_steps: 0"):
    config_lib.load("configs/tiny-demo.yaml", ["optim.strategy=grass", "optim.importance=adam",
                                              "optim.probe_steps=4", "optim.period=2"])
  with pytest.raises(ValueError, match="importance_from='adam'.*no probing"):
    grass_jax.transform(optax.adam(1e-3), layers=LAYERS, num_active=1, period=2, importance_from="adam",
                        probe_steps=2)
  cfg = config_lib.load("configs/tiny-demo.yaml", ["optim.strategy=grass", "optim.importance=adam"])
  assert cfg.optim.probing_steps() == 0
