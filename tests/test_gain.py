"""importance_from='gain': the loss decrease each period realises, credited to its layers (grass_jax.gain)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grass_jax
from grass_jax import gain


def test_period_credit_by_hand():
  def period(t, first, second):
    for loss in first:
      t = gain.add_loss(t, loss, second_half=False)
    for loss in second:
      t = gain.add_loss(t, loss, second_half=True)
    return gain.period_credit(t)
  # period 1: halves 4 -> 3, decrease 0.25: its own baseline, credit 0
  credit, has, t = period(jnp.zeros(6), [4.0], [3.0])
  assert bool(has) and float(credit) == 0.0 and np.allclose(t, [0, 0, 0, 0, 0.25, 1])
  # period 2: halves mean 2 -> 1.5 (the NaN step left out): decrease 0.25, baseline 0.25, credit 0
  credit, has, t = period(t, [2.0, jnp.nan], [1.5])
  assert bool(has) and abs(float(credit)) < 1e-7 and np.allclose(t, [0, 0, 0, 0, 0.5, 2])
  # period 3: 1 -> 0.4, decrease 0.6 against a baseline of 0.25: credit 0.35
  credit, has, t = period(t, [1.0], [0.4])
  assert bool(has) and np.isclose(float(credit), 0.35) and np.allclose(t, [0, 0, 0, 0, 1.1, 3])
  # a half without a finite loss gives no credit and no decrease
  credit, has, t = period(t, [jnp.nan], [1.0])
  assert not bool(has) and float(credit) == 0.0 and np.allclose(t, [0, 0, 0, 0, 1.1, 3])


def test_probabilities_standardise_credits_and_try_unseen_layers_first():
  credits = jnp.asarray([0.1, -0.1, 0.0, 0.0])
  counts = jnp.asarray([1, 1, 0, 0])
  p = gain.probabilities(credits, counts, temperature=1.0, epsilon=0.0)
  # z of the credited layers: +1, -1; the unseen take the best z (+1)
  e = np.exp([1.0, -1.0, 1.0, 1.0])
  np.testing.assert_allclose(p, e / e.sum(), rtol=1e-6)
  flat = gain.probabilities(jnp.zeros(4), jnp.zeros(4, jnp.int32), temperature=0.5, epsilon=0.2)
  np.testing.assert_allclose(flat, 0.25, rtol=1e-6)


@pytest.mark.parametrize("coverage", [False, True])
def test_the_layer_whose_periods_lower_the_loss_is_drawn_most(coverage):
  """A synthetic run: the loss falls 1% a period, 20% in a period that trains layer 3. Layer 3's importance
  should end the largest, and without coverage its share of the later draws far above uniform (1/6)."""
  num_layers, period = 6, 2
  params = {"layers": {"w": jnp.zeros((num_layers, 2))}}
  tx = grass_jax.transform(optax.sgd(0.0), layers=grass_jax.stacked_layers("layers"), num_active=1, period=period,
                           temperature=0.5, epsilon=0.1, importance_from="gain", coverage=coverage, seed=1)
  state = tx.init(params)
  step = jax.jit(tx.update)
  grads = jax.tree.map(jnp.ones_like, params)
  loss, drawn = 10.0, []
  for _ in range(120 * period):
    active = int(grass_jax.find_state(state).active[0])
    drawn.append(active)
    _, state = step(grads, state, params, loss=jnp.float32(loss))
    loss *= (0.8 if active == 3 else 0.99) ** (1 / period)
  s = grass_jax.find_state(state)
  assert int(np.argmax(np.asarray(s.importance))) == 3
  late = np.asarray(drawn[len(drawn) // 2:])
  share = np.mean(late == 3)
  # with coverage every layer has one turn per 6 periods (1/6 at most); without, importance takes over
  assert share == pytest.approx(1 / 6, abs=0.02) if coverage else share > 0.5


def test_gain_needs_the_loss_and_no_probing():
  tx = grass_jax.transform(optax.sgd(0.1), layers=grass_jax.stacked_layers("layers"), num_active=1, period=2,
                           importance_from="gain")
  params = {"layers": {"w": jnp.zeros((3, 2))}}
  with pytest.raises(ValueError, match=r"needs each step's training loss: tx.update\(..., loss=loss\)"):
    tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match="no probing"):
    grass_jax.transform(optax.sgd(0.1), layers=grass_jax.stacked_layers("layers"), num_active=1, period=2,
                        importance_from="gain", probe_steps=2)
