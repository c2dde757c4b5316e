"""GRASS's importance as the paper specifies it: probing, sketched norms, refresh, GRASS*, moving stages."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grass_jax
from grass_jax import models
from grass_jax.models.slot_scan import Measurement
from grass_jax.train_step import LAYERS, Backward, StepOptions, cross_entropy, make_train_step, slot_loss
from tests.test_train_step import CFG, _batch

# Module fixtures: the whole file on one xdist worker (--dist loadgroup), the fixture built once.
pytestmark = pytest.mark.xdist_group("importance_measurement")


def _exact_layer_sq_norms(params, mb):
  """Squared norm of each layer's weight gradient of the summed loss, from the plain model."""
  def loss(p):
    logits, _ = models.forward(p, CFG, mb["tokens"], mb["attention_mask"])
    return cross_entropy(logits, mb["tokens"], mb["loss_mask"])[0]
  g = jax.grad(loss)(params)["layers"]
  return sum(np.sum(np.square(np.asarray(v, np.float64)).reshape(CFG.num_layers, -1), axis=1) for v in g.values())


def _sink_grad(params, mb, active, *, measure, probing, key, sketch_size=4):
  trainable = {**params, "layers": {k: jnp.zeros_like(v[active]) for k, v in params["layers"].items()}}

  def f(sink):
    # the step knows probing from the transform's settings: any whose probe_steps > 0
    grass = grass_jax.GrassSettings(layers=LAYERS, num_active=2, period=1, probe_steps=1) if probing else None
    options = StepOptions(dtype=jnp.float32, measure=measure, sketch_size=sketch_size, grass=grass)
    return slot_loss(trainable, params["layers"], active, CFG, mb, options,
                     backward=Backward(sink, Measurement(jnp.asarray(probing), key)))[0]
  return jax.grad(f)(jnp.zeros((CFG.num_layers,), jnp.float32))


def test_probing_measures_every_layer_exactly_and_trained_layers_always():
  params = models.init_params(CFG, jax.random.PRNGKey(0))
  mb = jax.tree.map(lambda x: x[0], _batch(accum=1))
  exact = _exact_layer_sq_norms(params, mb)
  active = jnp.array([3, 1], jnp.int32)
  key = jax.random.PRNGKey(0)
  probed = np.asarray(jax.jit(lambda: _sink_grad(params, mb, active, measure="exact", probing=True, key=key))())
  np.testing.assert_allclose(probed, exact, rtol=1e-5)
  trained = np.asarray(jax.jit(lambda: _sink_grad(params, mb, active, measure="exact", probing=False, key=key))())
  np.testing.assert_allclose(trained[[1, 3]], exact[[1, 3]], rtol=1e-5)
  assert not trained[[0, 2, 4]].any()  # frozen layers are not measured outside probing


@pytest.fixture(scope="module")
def sketches():
  """Sketched squared norms of frozen layers 0, 1, 3, 4 (layer 2 trains) for k = 1, 4, 16, and the exact ones."""
  params = models.init_params(CFG, jax.random.PRNGKey(1))
  mb = jax.tree.map(lambda x: x[0], _batch(accum=1, seed=3))
  exact = _exact_layer_sq_norms(params, mb)
  active = jnp.array([2], jnp.int32)
  out = {}
  # k=16, 2000 draws: mean within 0.75% of exact (z <= 1.6) against the tests' 2% and 4 sigma (was 5000: CI time).
  for k, n in ((1, 600), (4, 600), (16, 2000)):
    est = jax.jit(jax.vmap(lambda key: _sink_grad(params, mb, active, measure="sketch", probing=False, key=key,
                                                  sketch_size=k)))(jax.random.split(jax.random.PRNGKey(k), n))
    est = np.asarray(est, np.float64)
    np.testing.assert_allclose(est[:, 2], exact[2], rtol=1e-5)  # the trained layer is exact
    out[k] = est[:, [0, 1, 3, 4]]
  return out, exact[[0, 1, 3, 4]]


@pytest.mark.parametrize("k", [1, 4, 16])
def test_sketch_is_unbiased(sketches, k):
  est, exact = sketches[0][k], sketches[1]
  sem = est.std(0) / np.sqrt(len(est))
  assert np.all(np.abs(est.mean(0) - exact) < 4 * sem), (est.mean(0), exact, sem)


def test_sketch_mean_is_within_2_percent_of_the_exact_norm(sketches):
  np.testing.assert_allclose(sketches[0][16].mean(0), sketches[1], rtol=0.02)


def test_sketch_spread_falls_as_one_over_sqrt_k(sketches):
  est, exact = sketches
  ratio = est[1].std(0) / est[16].std(0)
  assert np.all((ratio > 4 * 0.8) & (ratio < 4 * 1.25)), ratio  # sqrt(16) = 4


def test_train_step_probing_updates_nothing_then_trains():
  params = models.init_params(CFG, jax.random.PRNGKey(2))
  period = 2
  settings = grass_jax.GrassSettings(layers=LAYERS, num_active=2, period=period, probe_steps=2 * period, seed=0)
  tx = grass_jax.transform(optax.adam(1e-2), settings)
  step = make_train_step(CFG, tx, StepOptions(dtype=jnp.float32, donate=False, measure="exact", grass=settings))
  state = tx.init(params)
  p, s = params, state
  for i in range(2 * period):
    p, s, m = step(p, s, _batch(accum=1, seed=i))
    assert int(m["probing"]) == 1
  jax.tree.map(np.testing.assert_array_equal, p, params)
  jax.tree.map(np.testing.assert_array_equal, s.slot_states, state.slot_states)
  # One step before the switch the probe window (3 of 4 probing steps, every layer) was folded in.
  assert np.all(np.asarray(s.num_measurements) == 3) and np.all(np.asarray(s.importance) > 0)
  p, s, m = step(p, s, _batch(accum=1, seed=9))
  assert int(m["probing"]) == 0
  changed = [not np.array_equal(p["layers"]["up_proj"][l], params["layers"]["up_proj"][l]) for l in range(5)]
  assert sorted(np.flatnonzero(changed)) == sorted(np.asarray(s.active).tolist())
  assert step._cache_size() == 1


def test_sketch_every_n_steps_measures_frozen_layers_on_those_steps_only():
  # sketch_every=2, refresh every 4 steps (at counts 2, 6, ...): frozen layers are sketched on counts 0 and 2,
  # so the refresh step is a sketch step; trained layers are measured at every step; the weights follow the
  # same path as sketching every step.
  params = models.init_params(CFG, jax.random.PRNGKey(4))
  runs = {}
  for every in (1, 2):
    tx = grass_jax.transform(optax.adam(1e-2), layers=LAYERS, num_active=2, period=4, seed=0)
    step = make_train_step(CFG, tx, StepOptions(dtype=jnp.float32, donate=False, measure="sketch", sketch_every=every))
    p, s, flags, windows = params, tx.init(params), [], []
    for i in range(3):
      p, s, m = step(p, s, _batch(accum=1, seed=i))
      flags.append(int(m["sketching"]))
      windows.append(np.asarray(s.window_count))
    runs[every] = (p, s, flags, windows)
    assert step._cache_size() == 1
  assert runs[1][2] == [1, 1, 1] and runs[2][2] == [1, 0, 1]
  # The two programs sum the trained layers' gradients in different orders. The longest chain of float32 sums
  # behind one gradient here is ~320 terms (18 tokens, 5 layers of 16 + 24 + 9, a 50-token vocabulary), so each
  # gradient carries a relative error up to n * u (u = 2^-24). Adam's step lr * m / sqrt(v) does not depend on
  # the gradient's scale, so it keeps that relative error twice (m and v): per step at most lr * 2 * n * u.
  # A different path moves the weights by ~lr per step, 10^4 times more.
  lr, steps, n = 1e-2, 3, 320
  bound = steps * lr * 2 * n * 2.0**-24
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(runs[2][0]), jax.tree.leaves(runs[1][0])))
  assert diff <= bound, (diff, bound)
  active = np.asarray(runs[2][1].active)
  frozen = np.setdiff1d(np.arange(CFG.num_layers), active)
  np.testing.assert_array_equal(runs[1][3][1], 2)  # after two steps, before the refresh
  np.testing.assert_array_equal(runs[2][3][1][active], 2)
  np.testing.assert_array_equal(runs[2][3][1][frozen], 1)
  for every in (1, 2):  # the refresh emptied the window and gave every layer an importance
    assert not runs[every][3][2].any() and np.all(np.asarray(runs[every][1].importance) > 0)


def test_sketch_every_must_divide_the_refresh_interval():
  from grass_jax.config import ConfigError, from_dict
  base = {"model": {"random_init": {"model_type": "llama"}}, "data": {"train": "x.jsonl"}}
  with pytest.raises(ConfigError, match="sketch_every must be >= 1 and divide the refresh interval .*: 20"):
    from_dict({**base, "optim": {"period": 20, "sketch_every": 3}})
  with pytest.raises(ConfigError, match="sketch_every .*: 6"):
    from_dict({**base, "optim": {"period": 20, "refresh_every": 6, "sketch_every": 4}})
  assert from_dict({**base, "optim": {"period": 20, "sketch_every": 4}}).optim.sketch_every == 4
  with pytest.raises(ValueError, match="sketch_every must be an int >= 1"):
    StepOptions(measure="sketch", sketch_every=0)


def _stage_run(variant, steps=400, change=200, num_layers=8, seed=0):
  """Synthetic gradients whose important layer moves from 2 to 6 at ``change``; returns probabilities per step."""
  params = {"layers": {"w": jnp.zeros((num_layers, 4, 4))}}
  kw = {"legacy": dict(probability="power", temperature=1.0, refresh_every=1, mgn_ema=None),
        "paper": dict(probability="softmax", temperature=0.5, mgn_ema=0.5, probe_steps=5),
        "sketch": dict(probability="softmax", temperature=0.5, mgn_ema=0.5)}[variant]
  tx = grass_jax.transform(optax.sgd(0.0), layers=grass_jax.stacked_layers(), num_active=2, period=5, seed=seed,
                           always_on=False, **kw)
  state = tx.init(params)
  update = jax.jit(tx.update)
  probs = []
  for t in range(steps):
    scale = np.ones(num_layers, np.float32)
    scale[2 if t < change else 6] = 5.0
    grads = {"layers": {"w": jnp.asarray(np.broadcast_to(scale[:, None, None], (num_layers, 4, 4)))}}
    extra = {"layer_norms": jnp.asarray(scale)} if variant == "sketch" else {}
    _, state = update(grads, state, params, **extra)
    probs.append(np.asarray(grass_jax.diagnostics(state, **{k: v for k, v in kw.items()
                                                            if k in ("probability", "temperature")})[
        "current_probabilities"]))
  return np.array(probs)


@pytest.mark.parametrize("variant,periods", [("paper", 10), ("sketch", 2)])
def test_sampling_follows_the_layer_that_matters_now(variant, periods):
  probs = _stage_run(variant)
  assert np.argmax(probs[199]) == 2
  moved = [t for t in range(200, 400) if np.argmax(probs[t]) == 6 and probs[t][6] > 2 * probs[t][2]]
  assert moved and moved[0] < 200 + periods * 5, moved[:3]
  # ...and stays there.
  assert np.argmax(probs[-1]) == 6


def test_running_mean_does_not_follow_within_ten_periods():
  probs = _stage_run("legacy")
  assert all(probs[t][2] > probs[t][6] for t in range(200, 250))


def test_grass_static_keeps_the_probed_importance():
  params = {"layers": {"w": jnp.zeros((4, 2, 2))}}
  tx = grass_jax.strategy("grass_static", optax.sgd(0.1), layers=grass_jax.stacked_layers(), num_active=1,
                          period=2, probe_steps=2, always_on=False)
  state = tx.init(params)
  for t in range(10):
    g = {"layers": {"w": jnp.full((4, 2, 2), float(t + 1)) * jnp.arange(1, 5.0)[:, None, None]}}
    _, state = tx.update(g, state, params)
    if t == 0:
      probed = np.asarray(state.importance)
  np.testing.assert_array_equal(state.importance, probed)
  np.testing.assert_allclose(probed, np.arange(1, 5.0) * 2 / 2)  # RMS of step 0 (the window before the draw)


def test_probing_arguments_are_checked():
  layers = grass_jax.stacked_layers()
  with pytest.raises(ValueError, match="probe_steps must be a multiple of period=4"):
    grass_jax.transform(optax.sgd(1.0), layers=layers, num_active=1, period=4, probe_steps=6)
  with pytest.raises(ValueError, match="static importance .* set probe_steps > 0"):
    grass_jax.transform(optax.sgd(1.0), layers=layers, num_active=1, static=True)
  params = {"layers": {"w": jnp.zeros((4, 2, 2))}}
  tx = grass_jax.transform(optax.sgd(1.0), layers=layers, num_active=2, period=1, probe_steps=1)
  slot_form = {"layers": {"w": jnp.zeros((2, 2, 2))}}
  with pytest.raises(ValueError, match="layer_norms"):
    tx.update(slot_form, tx.init(params), params)
