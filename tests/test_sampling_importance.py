"""Sampling probabilities and draws; the importance running mean."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax

import grass_jax
from grass_jax import importance, sampling

# Upper 0.1% points of the chi-square distribution (df = 5, 7): a correct sampler
# fails these with probability 0.001 per test, and the draws are seeded, so the
# test is deterministic.
CHI2_999 = {5: 20.515, 7: 24.322}


def _draw_many(probs, num, n, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), n)
  return np.asarray(jax.vmap(lambda k: sampling.draw(k, probs, num))(keys))


def test_single_draw_frequencies_match_probabilities_chi_square():
  probs = jnp.array([0.02, 0.08, 0.1, 0.15, 0.05, 0.3, 0.2, 0.1])
  n = 40_000
  draws = _draw_many(probs, 1, n)[:, 0]
  observed = np.bincount(draws, minlength=8)
  expected = n * np.asarray(probs)
  chi2 = float(np.sum((observed - expected) ** 2 / expected))
  assert chi2 < CHI2_999[7], (chi2, observed, expected)


def _inclusion_probabilities(p, k):
  """Exact inclusion probabilities of successive sampling without replacement."""
  p = np.asarray(p, np.float64)
  incl = np.zeros_like(p)
  for seq in itertools.permutations(range(len(p)), k):
    prob, left = 1.0, 1.0
    for i in seq:
      prob *= p[i] / left
      left -= p[i]
    incl[list(seq)] += prob
  return incl


def test_multi_draw_frequencies_match_exact_inclusion_probabilities():
  probs = jnp.array([0.05, 0.1, 0.15, 0.2, 0.2, 0.3])
  n, k = 40_000, 3
  draws = _draw_many(probs, k, n, seed=1)
  assert all(len(set(d)) == k for d in draws)
  assert np.all(np.diff(draws, axis=1) > 0)  # sorted, distinct
  freq = np.bincount(draws.ravel(), minlength=6) / n
  incl = _inclusion_probabilities(probs, k)
  np.testing.assert_allclose(incl.sum(), k, rtol=1e-6)
  # 4.5 binomial standard deviations per layer.
  tol = 4.5 * np.sqrt(incl * (1 - incl) / n)
  assert np.all(np.abs(freq - incl) < tol), (freq, incl)


def test_probabilities_epsilon_floor_temperature_and_unknown_layers():
  imp = jnp.array([1e-6, 1.0, 4.0, 0.0])
  counts = jnp.array([1, 1, 1, 0])
  p = sampling.probabilities(imp, counts, temperature=1.0, epsilon=0.2)
  np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)
  assert float(p.min()) >= 0.2 / 4 - 1e-7
  # The unknown layer uses the mean of the known ones: (1e-6 + 1 + 4) / 3.
  fill = (1e-6 + 1.0 + 4.0) / 3
  raw = np.array([1e-6, 1.0, 4.0, fill])
  np.testing.assert_allclose(p, 0.8 * raw / raw.sum() + 0.05, rtol=1e-5)
  sharp = sampling.probabilities(imp, counts, temperature=0.5, epsilon=0.0)
  raw2 = raw ** 2
  np.testing.assert_allclose(sharp, raw2 / raw2.sum(), rtol=1e-5)
  uniform = sampling.probabilities(jnp.zeros(4), jnp.zeros(4, jnp.int32), temperature=1.0, epsilon=0.0)
  np.testing.assert_allclose(uniform, np.full(4, 0.25), rtol=1e-6)


def test_epsilon_floor_keeps_every_layer_reachable():
  p = sampling.probabilities(jnp.array([1e-30, 1e-30, 1.0, 1.0]), jnp.ones(4, jnp.int32),
                             temperature=1.0, epsilon=0.2)
  freq = np.bincount(_draw_many(p, 1, 20_000)[:, 0], minlength=4) / 20_000
  np.testing.assert_allclose(freq[:2], [0.05, 0.05], atol=0.008)


def test_running_mean_by_hand_and_inactive_layers_frozen():
  imp = jnp.zeros(3)
  n = jnp.zeros(3, jnp.int32)
  imp, n = importance.update_importance(imp, n, jnp.array([0, 2]), jnp.array([1.0, 6.0]), None)
  imp, n = importance.update_importance(imp, n, jnp.array([0, 1]), jnp.array([3.0, 5.0]), None)
  imp, n = importance.update_importance(imp, n, jnp.array([0, 1]), jnp.array([8.0, jnp.nan]), None)
  np.testing.assert_allclose(imp, [(1 + 3 + 8) / 3, 5.0, 6.0])
  np.testing.assert_array_equal(n, [3, 1, 1])  # the NaN measurement was skipped
  ema, m = importance.update_importance(jnp.zeros(2), jnp.zeros(2, jnp.int32), jnp.array([1]), jnp.array([2.0]), 0.9)
  ema, m = importance.update_importance(ema, m, jnp.array([1]), jnp.array([4.0]), 0.9)
  np.testing.assert_allclose(ema, [0.0, 0.9 * 2 + 0.1 * 4], rtol=1e-6)


def test_importance_in_transform_matches_hand_computed_norms():
  """On a toy stacked tree: importance = mean over active steps of ||g_l|| / sqrt(n_l)."""
  params = {"layers": {"w": jnp.zeros((4, 2, 3)), "b": jnp.zeros((4, 3))}, "head": jnp.zeros(2)}
  tx = grass_jax.transform(optax.sgd(1.0), layers=grass_jax.stacked_layers(), num_active=2, period=1, seed=0,
                           mgn_ema=None)
  state = tx.init(params)
  sums, counts = np.zeros(4), np.zeros(4)
  for step in range(10):
    scale = np.arange(1, 5, dtype=np.float32)[:, None] * (step + 1)
    grads = {"layers": {"w": jnp.ones((4, 2, 3)) * scale[:, :, None], "b": jnp.ones((4, 3)) * scale},
             "head": jnp.ones(2) * 100.0}
    before = np.asarray(state.importance)
    active = np.asarray(state.active)
    _, state = tx.update(grads, state, params)
    for l in range(4):
      if l in active:
        sums[l] += np.sqrt(9 * scale[l, 0] ** 2) / 3.0  # 9 params per layer, all equal to scale
        counts[l] += 1
      else:
        assert state.importance[l] == before[l]
  np.testing.assert_allclose(state.importance, np.where(counts > 0, sums / np.maximum(counts, 1), 0), rtol=1e-6)
  np.testing.assert_array_equal(state.num_measurements, counts)


def test_draw_first_mask_all_true_is_the_plain_draw_and_false_layers_only_fill_up():
  probs = jnp.asarray([0.05, 0.6, 0.05, 0.2, 0.1], jnp.float32)
  for i in range(20):
    key = jax.random.PRNGKey(i)
    assert sampling.draw(key, probs, 2, jnp.ones(5, bool)).tolist() == sampling.draw(key, probs, 2).tolist()
    first = jnp.asarray([True, False, True, False, False])
    assert sampling.draw(key, probs, 2, first).tolist() == [0, 2]  # both first layers, whatever the noise
    one = jnp.asarray([False, False, False, False, True])
    got = sampling.draw(key, probs, 2, one).tolist()
    assert 4 in got and len(set(got)) == 2


def test_an_unsorted_draw_is_the_same_layers_in_the_order_of_their_scores():
  probs = jnp.full((30,), 1 / 30, jnp.float32)
  in_depth_order = []
  for i in range(20):
    key = jax.random.PRNGKey(i)
    got = sampling.draw(key, probs, 4, sort=False)
    assert sorted(got.tolist()) == sampling.draw(key, probs, 4).tolist()
    scores = jnp.log(probs) + jax.random.gumbel(key, probs.shape, jnp.float32)
    assert np.all(np.diff(np.asarray(scores)[np.asarray(got)]) < 0)  # highest score first
    in_depth_order.append(got.tolist() == sorted(got.tolist()))
  assert sum(in_depth_order) < 20  # 1 in 24 draws of 4 is in depth order by chance


def test_next_cycle_counts_fillers_for_the_next_cycle():
  undrawn = jnp.asarray([True, False, False, False, False])
  # layer 0 was owed a turn; layer 3 filled the draw: the next cycle owes every layer but 3.
  assert sampling.next_cycle(undrawn, jnp.asarray([0, 3])).tolist() == [True, True, True, False, True]
  # the cycle ends exactly: every layer is owed a turn again.
  assert sampling.next_cycle(jnp.asarray([True, True, False]), jnp.asarray([0, 1])).tolist() == [True] * 3


@pytest.mark.parametrize("num_layers,gamma", [(6, 2), (7, 2), (5, 3)])
def test_coverage_trains_every_layer_once_per_cycle(num_layers, gamma):
  """With coverage, after c whole cycles (c * L / gamma draws, rounded up) every layer had c or c+1 turns,
  and within each cycle of ceil(L / gamma) draws no layer comes twice before all came once."""
  params = {"layers": {"w": jnp.ones((num_layers, 2))}}
  for strategy, args in [("lisa", {}), ("grass", {"temperature": 0.2})]:
    tx = grass_jax.strategy(strategy, optax.sgd(0.1), layers=grass_jax.stacked_layers("layers"),
                            num_active=gamma, period=1, seed=3, coverage=True, **args)
    state = tx.init(params)
    step = jax.jit(tx.update)
    grads = {"layers": {"w": jnp.arange(num_layers * 2, dtype=jnp.float32).reshape(num_layers, 2) + 1}}
    turns = np.zeros(num_layers, int)
    draws = []
    for _ in range(4 * num_layers):
      draws.append(np.asarray(grass_jax.find_state(state).active))
      _, state = step(grads, state, params)
    for cycle in range(3):
      before = turns.copy()
      owed = set(range(num_layers))
      while owed:
        d = draws.pop(0)
        np.add.at(turns, d, 1)
        owed -= set(d.tolist())
      assert (turns - before).min() >= 1 and (turns - before).max() <= 2, (strategy, turns - before)
      assert turns.max() - turns.min() <= 1 + (num_layers % gamma != 0), (strategy, turns)


def test_softmax_rule_exact_values_by_hand():
  # The paper's rule, computed here in float64 from its formula: p = (1 - eps) softmax(m / (mean(m) T)) + eps / L,
  # an unmeasured layer taking the mean of the measured ones. float32 softmax: exp, a sum and a division, each
  # within a few ulps (U = 2^-24): 16 U relative covers them.
  import math
  from grass_jax.sampling import layer_probabilities
  U = 2.0 ** -24
  imp, counts = jnp.array([2.0, 0.0, 4.0, 6.0]), jnp.array([1, 0, 1, 1])
  filled = [2.0, 4.0, 4.0, 6.0]  # layer 1 unmeasured: the mean of 2, 4 and 6
  for temperature, eps in ((0.5, 0.1), (1.0, 0.0), (2.0, 0.3)):
    logits = [m / (sum(filled) / 4) / temperature for m in filled]
    z = sum(math.exp(x) for x in logits)
    want = [(1 - eps) * math.exp(x) / z + eps / 4 for x in logits]
    got = layer_probabilities("softmax", imp, counts, temperature=temperature, epsilon=eps)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=16 * U, atol=0)
  # The same by the power rule: p ~ m ** (1 / T).
  got = layer_probabilities("power", imp, counts, temperature=0.5, epsilon=0.1)
  w = [m ** 2 for m in filled]
  np.testing.assert_allclose(np.asarray(got, np.float64), [0.9 * x / sum(w) + 0.1 / 4 for x in w], rtol=16 * U)
  # Before any measurement both rules are uniform.
  for rule in ("softmax", "power"):
    np.testing.assert_array_equal(layer_probabilities(rule, jnp.zeros(4), jnp.zeros(4, jnp.int32), temperature=0.5,
                                                      epsilon=0.1), 0.25)
