"""GRASS transform: masking, moments across pauses, switching, forms, baselines."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grass_jax
from tests.float_bounds import assert_adam_runs_agree
from scripts.toy_problem import make_step, toy_problem

L, D = 6, 5
# XLA:CPU rounds the same arithmetic differently in the last bit depending on
# how it fuses the surrounding ops (the reference runs in a different jit), so
# per-layer comparisons allow a few ulps. Reset or stale moments would be off by
# orders of magnitude more. Full fine-tuning vs plain adamw is compared bitwise.
ULPS = dict(rtol=1e-6, atol=1e-9)


def stacked_params(key=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(key), 3)
  return {
      "embed": jax.random.normal(k1, (7, D)),
      "layers": {"w": jax.random.normal(k2, (L, D, D)), "b": jax.random.normal(k3, (L, D))},
  }


def random_grads(params, key):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(key), len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def layer_slice(tree, l):
  return {"w": tree["layers"]["w"][l], "b": tree["layers"]["b"][l]}


@pytest.mark.default_flags
@pytest.mark.parametrize("period", [1, 3])
def test_masking_and_moments_survive_pauses(period):
  """Inactive layers get exactly 0; active ones get the bare inner optimizer's
  update computed from that layer's own history (moments frozen while inactive)."""
  inner = optax.adamw(1e-2, weight_decay=0.1)
  tx = grass_jax.transform(inner, layers=grass_jax.stacked_layers(), num_active=2, period=period, seed=3)
  params = stacked_params()
  state = tx.init(params)
  ref_states = [inner.init(layer_slice(params, l)) for l in range(L)]
  ref_embed = inner.init({"embed": params["embed"]})
  update = jax.jit(tx.update)
  ref_update = jax.jit(inner.update)  # jit vs eager differ in the last bit on XLA:CPU
  paused_and_resumed = 0
  last_active_step = {}
  for step in range(24):
    grads = random_grads(params, step)
    active = np.asarray(state.active)
    updates, state = update(grads, state, params)
    for l in range(L):
      got = layer_slice(updates, l)
      if l in active:
        want, ref_states[l] = ref_update(layer_slice(grads, l), ref_states[l], layer_slice(params, l))
        np.testing.assert_allclose(got["w"], want["w"], **ULPS)
        np.testing.assert_allclose(got["b"], want["b"], **ULPS)
        if l in last_active_step and last_active_step[l] < step - 1:
          paused_and_resumed += 1
        last_active_step[l] = step
      else:
        assert not np.any(np.asarray(got["w"])) and not np.any(np.asarray(got["b"]))
    want_e, ref_embed = ref_update({"embed": grads["embed"]}, ref_embed, {"embed": params["embed"]})
    np.testing.assert_allclose(updates["embed"], want_e["embed"], **ULPS)
    params = optax.apply_updates(params, updates)
  assert paused_and_resumed > 0, "the test never exercised a layer resumed after a pause"


def test_switch_timing_and_next_active_known_one_step_ahead():
  tx = grass_jax.transform(optax.sgd(0.1), layers=grass_jax.stacked_layers(), num_active=2, period=4, seed=1)
  params = stacked_params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  history = []
  for step in range(16):
    before = state
    _, state = update(random_grads(params, step), state, params)
    history.append((np.asarray(before.active), np.asarray(state.active), np.asarray(state.next_active)))
    c = step + 1
    if c % 4 != 0:
      np.testing.assert_array_equal(state.active, before.active)
    else:  # the switch takes the set announced one step earlier
      np.testing.assert_array_equal(state.active, before.next_active)
    if (c + 1) % 4 != 0 and c % 4 != 0:
      np.testing.assert_array_equal(state.next_active, before.next_active)
  changed = sum(not np.array_equal(a, b) for a, b, _ in history)
  assert changed >= 1


def test_same_seed_same_sequence_other_seed_differs():
  def sequence(seed):
    tx = grass_jax.transform(optax.sgd(0.1), layers=grass_jax.stacked_layers(), num_active=2, period=1,
                             seed=seed)
    params = stacked_params()
    state = tx.init(params)
    seq = []
    for step in range(12):
      _, state = jax.jit(tx.update)(random_grads(params, step), state, params)
      seq.append(np.asarray(state.active).tolist())
    return seq

  assert sequence(5) == sequence(5)
  assert sequence(5) != sequence(6)


def test_no_recompilation_across_switches():
  tx = grass_jax.transform(optax.adam(1e-3), layers=grass_jax.stacked_layers(), num_active=2, period=1)
  params = stacked_params()
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(g, s, p):
    traces.append(1)
    return tx.update(g, s, p)

  seen = set()
  for i in range(10):
    _, state = step(random_grads(params, i), state, params)
    seen.add(tuple(np.asarray(state.active)))
  assert len(seen) > 2 and len(traces) == 1


@pytest.mark.default_flags
def test_slot_form_equals_full_form():
  tx = grass_jax.transform(optax.adam(1e-2), layers=grass_jax.stacked_layers(), num_active=3, period=2, seed=0)
  params = stacked_params()
  s_full = s_slot = tx.init(params)
  for step in range(8):
    grads = random_grads(params, step)
    active = s_full.active
    u_full, s_full = tx.update(grads, s_full, params)
    slot_g = grass_jax.gather_active(grads, s_slot, grass_jax.stacked_layers())
    slot_p = grass_jax.gather_active(params, s_slot, grass_jax.stacked_layers())
    assert slot_g["layers"]["w"].shape == (3, D, D)
    u_slot, s_slot = tx.update(slot_g, s_slot, slot_p)
    np.testing.assert_array_equal(u_slot["layers"]["w"], u_full["layers"]["w"][active])
    np.testing.assert_array_equal(u_slot["embed"], u_full["embed"])
    new_full = optax.apply_updates(params, u_full)
    new_slot = grass_jax.apply_slot_updates(params, u_slot, active, grass_jax.stacked_layers())
    jax.tree.map(np.testing.assert_array_equal, new_full, new_slot)
    params = new_full
  jax.tree.map(np.testing.assert_array_equal, s_full, s_slot)


def test_dict_of_layers_tree_in_chain_with_clipping_and_schedule():
  k = jax.random.split(jax.random.PRNGKey(0), 5)
  params = {f"blocks_{i}": {"dense": {"kernel": jax.random.normal(k[i], (4, 4))}} for i in range(4)}
  params["head"] = jnp.ones((4, 2))
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 3, 20)
  tx = optax.chain(
      optax.clip_by_global_norm(0.5),
      grass_jax.transform(optax.adamw(1.0), layers=grass_jax.indexed_layers(), num_active=2, period=2,
                          refresh_every=1),
      optax.scale_by_schedule(schedule))
  state = tx.init(params)
  step = jax.jit(tx.update)
  for i in range(6):
    gs = grass_jax.find_state(state)
    active = set(np.asarray(gs.active).tolist())
    updates, state = step(random_grads(params, i), state, params)
    for l in range(4):
      nz = np.any(np.asarray(updates[f"blocks_{l}"]["dense"]["kernel"]))
      assert nz == (l in active) or i == 0  # schedule starts at lr 0
    assert np.any(np.asarray(updates["head"])) or i == 0
    params = optax.apply_updates(params, updates)
  assert grass_jax.diagnostics(state)["num_measurements"].sum() == 12


@pytest.mark.default_flags
def test_full_strategy_equals_plain_adamw():
  schedule = optax.linear_schedule(1e-2, 1e-3, 10)
  plain = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
  ours = optax.chain(optax.clip_by_global_norm(1.0),
                     grass_jax.full(optax.adamw(1.0, weight_decay=0.01), layers=grass_jax.stacked_layers()),
                     optax.scale_by_schedule(schedule))
  p1 = p2 = stacked_params()
  s1, s2 = plain.init(p1), ours.init(p2)
  for i in range(10):
    g = random_grads(p1, i)
    u1, s1 = jax.jit(plain.update)(g, s1, p1)
    u2, s2 = jax.jit(ours.update)(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  # Two programs of the same arithmetic: equal up to their roundings (tests/float_bounds.py); any other
  # formula (a schedule applied twice, a lost weight decay) differs by far more.
  jax.tree.map(lambda a, b: assert_adam_runs_agree(a, b, steps=10, lr=1e-2), p1, p2)


def test_lisa_resets_moments_on_switch():
  inner = optax.adam(1e-2)
  tx = grass_jax.lisa(inner, layers=grass_jax.stacked_layers(), num_active=2, period=2, seed=0)
  params = stacked_params()
  state = tx.init(params)
  assert state.bank is None
  starts = {}
  ref_update = jax.jit(inner.update)
  update = jax.jit(tx.update)
  for step in range(10):
    grads = random_grads(params, step)
    active = np.asarray(state.active)
    if step % 2 == 0:  # fresh moments at the start of every period
      starts = {l: inner.init(layer_slice(params, l)) for l in active}
    updates, state = update(grads, state, params)
    for l in active:
      want, starts[l] = ref_update(layer_slice(grads, l), starts[l])
      np.testing.assert_allclose(layer_slice(updates, l)["w"], want["w"], **ULPS)
  np.testing.assert_allclose(state.probabilities, np.full(L, 1 / L), rtol=1e-6)


def test_always_on_false_freezes_outside_leaves():
  tx = grass_jax.transform(optax.sgd(1.0), layers=grass_jax.stacked_layers(), num_active=1, always_on=False)
  params = stacked_params()
  updates, _ = tx.update(random_grads(params, 0), tx.init(params), params)
  assert not np.any(np.asarray(updates["embed"]))


@pytest.mark.parametrize("always_on,trained", [("embed|head", {"embed", "head"}),
                                               (lambda path: "norm" in path, {"norm"})])
def test_always_on_as_a_regex_or_a_predicate_on_the_leaf_path(always_on, trained):
  tx = grass_jax.transform(optax.sgd(1.0), layers=grass_jax.stacked_layers(), num_active=1, always_on=always_on)
  params = {**stacked_params(), "head": jnp.ones((D, 3)), "norm": jnp.ones((D,))}
  grads = random_grads(params, 0)
  updates, _ = tx.update(grads, tx.init(params), params)
  for name in ("embed", "head", "norm"):  # sgd(1.0): an updated leaf moves by exactly minus its gradient
    want = -grads[name] if name in trained else jnp.zeros_like(grads[name])
    np.testing.assert_array_equal(updates[name], want, err_msg=name)


def test_toy_mlp_stack_loss_falls():
  params, loss_fn = toy_problem(depth=8, width=16, batch=64)
  tx = grass_jax.transform(optax.adam(1e-2), layers=grass_jax.stacked_layers(), num_active=2, period=5,
                           refresh_every=1)
  state = tx.init(params)
  step = make_step(tx, loss_fn)
  start = float(loss_fn(params))
  for _ in range(150):
    params, state, loss = step(params, state)
  assert float(loss_fn(params)) < 0.5 * start
  d = grass_jax.diagnostics(state)
  assert d["num_measurements"].sum() == 150 * 2
  np.testing.assert_allclose(d["current_probabilities"].sum(), 1.0, rtol=1e-6)


def test_each_strategy_is_one_settings_object_the_step_can_share():
  layers = grass_jax.stacked_layers()
  common = dict(layers=layers, num_active=2, period=4, seed=5, always_on=False, probe_steps=8, coverage=True,
                fixed_layers=[1, 3], offload=True, temperature=2.0)
  lisa = grass_jax.strategy_settings("lisa", **common)
  assert (lisa.sampling_kind, lisa.reset_on_switch, lisa.probe_steps, lisa.coverage, lisa.seed) == \
      ("uniform", True, 0, True, 5)
  assert not lisa.offload and lisa.temperature == 0.5  # fields LISA does not take keep their defaults
  full = grass_jax.strategy_settings("full", **common)
  assert (full.num_active, full.period, full.probe_steps, full.always_on) == (None, 1, 0, False)
  fixed = grass_jax.strategy_settings("fixed", **common)
  assert (fixed.sampling_kind, fixed.fixed_layers, fixed.num_active, fixed.offload) == ("fixed", (1, 3), 2, True)
  static = grass_jax.strategy_settings("grass_static", **common)
  assert static.static and static.probe_steps == 8 and static.temperature == 2.0
  # the by-name transform is the transform of those settings: the same states and updates
  params = stacked_params()
  g = jax.tree.map(jnp.ones_like, params)
  a, b = grass_jax.lisa(optax.sgd(1.0), layers=layers, num_active=2, seed=5), grass_jax.transform(
      optax.sgd(1.0), grass_jax.strategy_settings("lisa", layers=layers, num_active=2, seed=5))
  (ua, sa), (ub, sb) = (t.update(g, t.init(params), params) for t in (a, b))
  jax.tree.map(np.testing.assert_array_equal, (ua, sa), (ub, sb))


def test_strategy_by_name_and_bad_arguments():
  layers = grass_jax.stacked_layers()
  params = stacked_params()
  assert grass_jax.strategy("full", optax.sgd(1.0), layers=layers).init(params).active.shape == (L,)
  assert grass_jax.strategy("lisa", optax.sgd(1.0), layers=layers, num_active=2).init(params).bank is None
  assert grass_jax.strategy("grass", optax.sgd(1.0), layers=layers, num_active=2).init(params).bank is not None
  with pytest.raises(ValueError, match="unknown strategy 'gras'"):
    grass_jax.strategy("gras", optax.sgd(1.0), layers=layers)
  with pytest.raises(ValueError, match="period"):
    grass_jax.transform(optax.sgd(1.0), layers=layers, num_active=2, period=0)
  with pytest.raises(ValueError, match="epsilon"):
    grass_jax.transform(optax.sgd(1.0), layers=layers, num_active=2, epsilon=1.5)
  with pytest.raises(ValueError, match="exceeds the number of layers"):
    grass_jax.transform(optax.sgd(1.0), layers=layers, num_active=7).init(params)
  with pytest.raises(ValueError, match="no parameter belongs to a layer"):
    grass_jax.transform(optax.sgd(1.0), layers=grass_jax.stacked_layers("nope"), num_active=1).init(params)
  tx = grass_jax.transform(optax.sgd(1.0), layers=layers, num_active=2)
  bad = {"embed": params["embed"], "layers": {"w": params["layers"]["w"][:4], "b": params["layers"]["b"][:4]}}
  with pytest.raises(ValueError, match="leading size 4"):
    tx.update(bad, tx.init(params))
  uneven = {"blocks_0": {"w": jnp.ones((2, 2))}, "blocks_1": {"w": jnp.ones((3, 2))}}
  with pytest.raises(ValueError, match="identical layers"):
    grass_jax.transform(optax.sgd(1.0), layers=grass_jax.indexed_layers(), num_active=1).init(uneven)


@pytest.mark.default_flags
def test_fixed_layers_train_only_those_layers_with_adams_own_updates():
  # The oracle baseline: layers 1 and 4 train at every step, with the moments of a plain Adam on them;
  # no other layer ever moves, nothing is ever drawn.
  params = stacked_params()
  tx = grass_jax.fixed(optax.adam(1e-2), layers=grass_jax.stacked_layers("layers"), fixed_layers=[4, 1])
  ref = optax.adam(1e-2)
  state, ref_state = tx.init(params), ref.init(params)
  p, rp = params, params
  for i in range(7):
    g = random_grads(params, i)
    u, state = tx.update(g, state, p)
    p = optax.apply_updates(p, u)
    ru, ref_state = ref.update(g, ref_state, rp)
    rp = optax.apply_updates(rp, ru)
    s = grass_jax.find_state(state)
    assert list(np.asarray(s.active)) == [1, 4] and list(np.asarray(s.next_active)) == [1, 4]
  for name in ("w", "b"):
    for layer in range(L):
      if layer in (1, 4):
        np.testing.assert_allclose(p["layers"][name][layer], rp["layers"][name][layer], **ULPS)
      else:
        np.testing.assert_array_equal(p["layers"][name][layer], params["layers"][name][layer])
  np.testing.assert_allclose(p["embed"], rp["embed"], **ULPS)  # always-on trains as usual
  probs = grass_jax.diagnostics(state, fixed=True)["current_probabilities"]
  np.testing.assert_array_equal(probs, [0, 0.5, 0, 0, 0.5, 0])


@pytest.mark.parametrize("fixed_layers, message", [([1], "num_active=2 distinct"), ([2, 2], "distinct"),
                                                    ([1, -1], ">= 0")])
def test_fixed_layers_are_checked(fixed_layers, message):
  with pytest.raises(ValueError, match=message):
    grass_jax.transform(optax.adam(1e-2), layers=grass_jax.stacked_layers("layers"), num_active=2,
                        sampling_kind="fixed", fixed_layers=fixed_layers)


def test_fixed_layer_beyond_the_model_is_an_error_at_init():
  tx = grass_jax.fixed(optax.adam(1e-2), layers=grass_jax.stacked_layers("layers"), fixed_layers=[0, L])
  with pytest.raises(ValueError, match=f"beyond the model's L={L}"):
    tx.init(stacked_params())


def test_settings_object_and_keywords_build_the_same_transform():
  import dataclasses

  layers = grass_jax.stacked_layers("layers")
  params = {"layers": {"w": jnp.arange(24.0).reshape(6, 2, 2)}}
  grads = jax.tree.map(lambda x: jnp.cos(x) + 0.1, params)
  base = grass_jax.GrassSettings(layers=layers, num_active=2, period=2, seed=4)
  by_keywords = grass_jax.transform(optax.adam(1e-2), layers=layers, num_active=2, period=3, seed=4)
  by_settings = grass_jax.transform(optax.adam(1e-2), base, period=3)  # a keyword replaces the settings' field
  states = [tx.init(params) for tx in (by_keywords, by_settings)]
  for _ in range(7):  # across two switches
    outs = [tx.update(grads, st, params) for tx, st in zip((by_keywords, by_settings), states)]
    states = [o[1] for o in outs]
    jax.tree.map(np.testing.assert_array_equal, outs[0][0], outs[1][0])
  jax.tree.map(np.testing.assert_array_equal, *states)
  assert base.period == 2 and base.refresh_interval == 2  # the settings object itself is unchanged
  with pytest.raises(dataclasses.FrozenInstanceError):
    base.period = 5
  with pytest.raises(ValueError, match="temperature must be > 0"):
    dataclasses.replace(base, temperature=0.0)  # validated whenever built
  with pytest.raises(TypeError, match="tempreature"):
    grass_jax.transform(optax.adam(1e-2), base, tempreature=1.0)
