"""The active-slot train step: exact slot gradients, one compilation, NaN guard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grass_jax
from tests.float_bounds import assert_adam_runs_agree_given_gradient_error, summed_gradient_error
from grass_jax import models
from grass_jax.ahead_of_time import CompiledStep, abstract
from grass_jax.models import llama
from grass_jax.train_step import LAYERS, Backward, StepOptions, cross_entropy, make_train_step, slot_loss

CFG = llama.config_from_hf({"model_type": "llama", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24,
                            "num_hidden_layers": 5, "num_attention_heads": 4, "num_key_value_heads": 2})
FULL_REMAT = models.ForwardOptions(remat="full")


def _batch(accum=2, b=2, t=9, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 50, size=(accum, b, t)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[:, 0, -2:] = 0
  loss_mask = mask.copy()
  loss_mask[..., :3] = 0  # prompt tokens carry no loss
  return {"tokens": jnp.asarray(tokens), "attention_mask": jnp.asarray(mask), "loss_mask": jnp.asarray(loss_mask)}


@pytest.mark.parametrize("order,remat", [([1, 3], "full"), ([3, 0, 2], "full"), ([3, 0, 2], "none"), ([2, 1], "dots")])
def test_slot_gradients_equal_slices_of_full_gradient(order, remat):
  params = models.init_params(CFG, jax.random.PRNGKey(0))
  mb = jax.tree.map(lambda x: x[0], _batch())
  active = jnp.array(order, jnp.int32)  # unsorted too: slot i must get layer order[i]'s gradient

  def full_loss(p):
    logits, _ = models.forward(p, CFG, mb["tokens"], mb["attention_mask"], options=FULL_REMAT)
    return cross_entropy(logits, mb["tokens"], mb["loss_mask"])[0]

  g_full = jax.grad(full_loss)(params)
  trainable = {**params, "layers": {k: v[active] for k, v in params["layers"].items()}}
  g_slot = jax.grad(lambda tr: slot_loss(tr, params["layers"], active, CFG, mb, StepOptions(
      dtype=jnp.float32, remat=remat))[0])(trainable)
  for k in params["layers"]:
    np.testing.assert_allclose(g_slot["layers"][k], g_full["layers"][k][active], rtol=1e-5, atol=1e-7)
  # (atol: the embedding gradient's float32 sums, in another order, differ by up to 2e-7 on entries of 3e-3)
  np.testing.assert_allclose(g_slot["embed"], g_full["embed"], rtol=1e-5, atol=1e-6)
  # The slot values are handles, never read: zeros give the same gradient.
  zeros = {**params, "layers": jax.tree.map(jnp.zeros_like, trainable["layers"])}
  g_zero = jax.grad(lambda tr: slot_loss(tr, params["layers"], active, CFG, mb,
                                         StepOptions(dtype=jnp.float32))[0])(zeros)
  for k in params["layers"]:
    # (not bitwise: XLA may fuse the two traces differently; reading the values would differ at O(1))
    np.testing.assert_allclose(g_zero["layers"][k], g_slot["layers"][k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_kept_residuals_never_copy_the_weights(remat):
  # Without remat the forward pass keeps what each frozen block's input gradient needs, but the
  # weights themselves are re-read from the stack in the backward pass, never stacked again.
  from grass_jax.models.decoder import LayerInputs, rope_inv_freq
  from grass_jax.models.slot_scan import ScanSettings, _slot_scan_fwd
  params = models.init_params(CFG, jax.random.PRNGKey(0))
  b, t = 2, 8
  inputs = LayerInputs(jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.asarray(rope_inv_freq(CFG)),
                       jnp.zeros((CFG.num_layers,), bool), jnp.ones((b, t), bool))
  slots = jax.tree.map(lambda x: x[:2], params["layers"])
  slot_of = jnp.full((CFG.num_layers,), -1).at[:2].set(jnp.arange(2))
  _, res = jax.eval_shape(lambda h: _slot_scan_fwd(CFG, ScanSettings("einsum", None, remat), slots, params["layers"],
                                                    h, None, (slot_of, inputs, None)),
                          jnp.ones((b, t, CFG.hidden_size)))
  stored = res[4]
  assert stored, "nothing kept: the backward pass would recompute every block"
  weight_shapes = {v.shape for v in params["layers"].values() if v.ndim == 3}
  assert not [x.shape for x in stored if x.shape in weight_shapes]
  full = jax.eval_shape(lambda h: _slot_scan_fwd(CFG, ScanSettings("einsum", None, "full"), slots, params["layers"],
                                                  h, None, (slot_of, inputs, None)), jnp.ones((b, t, CFG.hidden_size)))
  assert full[1][4] == []


def ref_loss(p, batch):
  """The loss over every micro-batch, written out: the reference the train step is compared with."""
  tot, n = 0.0, 0.0
  for i in range(batch["tokens"].shape[0]):
    logits, _ = models.forward(p, CFG, batch["tokens"][i], batch["attention_mask"][i], options=FULL_REMAT)
    s, c = cross_entropy(logits, batch["tokens"][i], batch["loss_mask"][i])
    tot, n = tot + s, n + c
  return tot / n


def test_train_step_matches_full_form_and_never_recompiles():
  params = models.init_params(CFG, jax.random.PRNGKey(1))
  # No clipping here: in slot form clipping sees only the trained layers, by design.
  # eps 0.1: sets the scale on which two programs' gradients can be compared through Adam (tests/float_bounds.py)
  tx = optax.chain(optax.scale(1.0),
                   grass_jax.transform(optax.adamw(1e-2, eps=0.1), layers=LAYERS, num_active=2, period=1, seed=0))
  # Compiled ahead from shapes (grass_jax.ahead_of_time), as the Trainer does: the same numbers as the reference.
  step = CompiledStep(make_train_step(CFG, tx, StepOptions(dtype=jnp.float32, donate=False)))
  opt_state = tx.init(params)
  step.compile(abstract(params), abstract(opt_state), abstract(_batch()))
  ref_params, ref_state = params, opt_state

  @jax.jit
  def ref_step(p, state, batch):  # the full form: every layer differentiated, the transform masks
    loss, g = jax.value_and_grad(ref_loss)(p, batch)
    u, state = tx.update(g, state, p)
    return optax.apply_updates(p, u), state, loss

  sets, grad_norms = set(), []
  for i in range(5):
    batch = _batch(seed=i)
    params, opt_state, metrics = step(params, opt_state, batch)
    ref_params, ref_state, loss = ref_step(ref_params, ref_state, batch)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    sets.add(tuple(np.asarray(grass_jax.find_state(opt_state).active)))
    grad_norms.append(float(metrics["grad_norm"]))  # the trained leaves' norm: >= any entry that is updated
  # The two programs sum each gradient's ~320 terms (as in tests/test_importance_measurement.py) in different
  # orders; through 5 Adam steps that bounds the weights' difference. A wrong update moves a weight by ~lr = 1e-2.
  grad_error = summed_gradient_error(max(grad_norms), terms=320)
  atol = assert_adam_runs_agree_given_gradient_error(params, ref_params, steps=5, lr=1e-2, eps=0.1,
                                                     grad_error=grad_error)
  assert atol < 1e-4  # a wrong update moves a weight by ~lr * |g| / eps, 1e-3 and more
  assert len(sets) > 1
  assert step.num_compiled() == 1 and step.step._cache_size() == 0  # every call ran the one executable


def test_nonfinite_gradient_skips_step_but_not_schedule():
  params = models.init_params(CFG, jax.random.PRNGKey(2))
  tx = grass_jax.transform(optax.adam(1e-2), layers=LAYERS, num_active=2, period=10, seed=0, refresh_every=1)
  state = tx.init(params)
  step = make_train_step(CFG, tx, StepOptions(dtype=jnp.float32, donate=False))
  params, state, _ = step(params, state, _batch())
  bad = jax.tree.map(lambda x: x, params)
  bad["layers"]["up_proj"] = bad["layers"]["up_proj"].at[:, 0, 0].set(jnp.inf)
  new_params, new_state, metrics = step(bad, state, _batch(seed=1))
  assert int(metrics["skipped"]) == 1
  jax.tree.map(np.testing.assert_array_equal, new_params, bad)
  jax.tree.map(np.testing.assert_array_equal, new_state.slot_states, state.slot_states)
  jax.tree.map(np.testing.assert_array_equal, new_state.always_on_state, state.always_on_state)
  assert int(new_state.count) == int(state.count) + 1
  np.testing.assert_array_equal(new_state.importance, state.importance)  # all layers' norms were NaN


def test_nan_in_one_layer_does_not_poison_importance_or_moments():
  params = {"layers": {"w": jnp.ones((4, 3, 3))}, "head": jnp.ones(3)}
  tx = grass_jax.transform(optax.adam(1e-2), layers=LAYERS, num_active=2, period=10, seed=0, refresh_every=1)
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  active = np.asarray(state.active)
  g = {"layers": {"w": jnp.ones((4, 3, 3)).at[active[0]].set(jnp.nan)}, "head": jnp.ones(3)}
  u, new = tx.update(g, state, params)
  assert not np.any(np.asarray(u["layers"]["w"])) and not np.any(np.asarray(u["head"]))
  assert np.all(np.isfinite(new.importance))
  assert new.num_measurements[active[0]] == state.num_measurements[active[0]]
  assert new.num_measurements[active[1]] == state.num_measurements[active[1]] + 1
  jax.tree.map(np.testing.assert_array_equal, new.slot_states, state.slot_states)


def _count_block_runs(monkeypatch):
  """Counts block evaluations at run time (loops included) through the slot scan's block runner."""
  from grass_jax.models import slot_scan
  runs = []
  inner = slot_scan._run_block

  def counted(config, settings, lp, h, idx, inputs, probes=None):
    jax.debug.callback(lambda i: runs.append(int(i)), idx)
    return inner(config, settings, lp, h, idx, inputs, probes)

  monkeypatch.setattr(slot_scan, "_run_block", counted)
  return runs


def _probing_settings(probing, sketch_every):
  """Settings whose schedule probes (or not) and refreshes every ``sketch_every`` steps."""
  return grass_jax.GrassSettings(layers=LAYERS, num_active=2, period=sketch_every,
                                 probe_steps=sketch_every if probing else 0)


def test_the_step_reads_probing_and_the_always_on_group_from_the_transforms_settings():
  settings = grass_jax.strategy_settings("grass", layers=LAYERS, num_active=2, period=4, probe_steps=8,
                                         always_on="embed")
  o = StepOptions(grass=settings, measure="sketch", sketch_every=2)
  assert (o.probe_steps, o.always_on) == (8, "embed")
  assert (StepOptions().probe_steps, StepOptions().always_on) == (0, None)
  lisa = grass_jax.strategy_settings("lisa", layers=LAYERS, num_active=2, period=4, probe_steps=8)
  assert StepOptions(grass=lisa).probe_steps == 0  # LISA never probes, whatever the fields said
  with pytest.raises(ValueError, match="sketch_every=3 must divide the transform's refresh interval"):
    StepOptions(grass=settings, measure="sketch", sketch_every=3)


@pytest.mark.parametrize("measure,probing,sketch_every,sketchings",
                         # (sketch every step: the sketch step of sketch_every 3 is compared with it below;
                         # a sketch step and a step between run the same compiled programs)
                         [("none", False, 1, (True,)), ("exact", False, 1, (True,)), ("exact", True, 1, (True,)),
                          ("sketch", False, 3, (True, False))])
def test_frozen_embeddings_stop_the_backward_at_the_lowest_trained_layer(monkeypatch, measure, probing, sketch_every,
                                                                         sketchings):
  from grass_jax.models.slot_scan import Measurement
  params = models.init_params(CFG, jax.random.PRNGKey(0))
  mb = jax.tree.map(lambda x: x[0], _batch())
  active = jnp.array([4, 2], jnp.int32)
  slots = {**params, "layers": {k: jnp.zeros_like(v[active]) for k, v in params["layers"].items()}}
  sink = jnp.zeros((CFG.num_layers,), jnp.float32)
  runs = _count_block_runs(monkeypatch)
  compiled = {}

  def grads(input_grad, sketching, every=sketch_every):
    if (input_grad, every) not in compiled:  # the measurement is an argument: one program for both kinds of step
      layers_only = lambda sl, sk, m: slot_loss({**params, "layers": sl}, params["layers"], active, CFG, mb,
                                                StepOptions(dtype=jnp.float32, measure=measure, sketch_every=every,
                                                            grass=_probing_settings(probing, every)),
                                                backward=Backward(sk, m, input_grad=input_grad))[0]
      compiled[input_grad, every] = jax.jit(jax.grad(layers_only, argnums=(0, 1)))
    runs.clear()
    measurement = Measurement(jnp.asarray(probing), jax.random.PRNGKey(3), jnp.asarray(sketching))
    g = compiled[input_grad, every](slots["layers"], sink, measurement)
    jax.effects_barrier()
    return g, sorted(runs)

  for sketching in sketchings:
    (g_all, sink_all), runs_all = grads(True, sketching)
    (g_cut, sink_cut), runs_cut = grads(False, sketching)
    for k in g_all:  # the trained layers' gradients do not change (to float32 sums in another order)
      np.testing.assert_allclose(g_cut[k], g_all[k], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sink_cut, sink_all, rtol=1e-6)
    # forward: every layer once; backward: layers 0-1 are recomputed only when measured
    sketched = measure == "sketch" and sketching and not probing
    below_lowest = sketched or (measure != "none" and probing)
    assert runs_all == sorted(list(range(5)) * 2)
    assert runs_cut == sorted(list(range(5)) + list(range(2 if not below_lowest else 0, 5)))
    frozen = [0, 1, 3]
    if measure == "none" or not below_lowest:  # frozen layers unmeasured: their sink entries stay 0
      assert not np.asarray(sink_cut)[frozen].any()
    elif sketched and sketch_every > 1:  # a sketch step of sketch_every n measures what every-step sketching does
      (_, sink_every), _ = grads(False, sketching, every=1)
      np.testing.assert_allclose(sink_cut, sink_every, rtol=1e-6)
    else:
      assert np.all(np.asarray(sink_cut)[frozen] > 0)
    if measure != "none":
      assert np.all(np.asarray(sink_cut)[[2, 4]] > 0)  # trained layers: measured exactly at every step


def test_unrolled_forward_equals_the_scan(monkeypatch):
  # unroll_forward changes how the forward pass reads the weights (static slices, not a scan), nothing
  # else: the same loss, slot gradients and importance, every block run once forward either way.
  # One case: live importance with frozen embeddings (the backward pass is the scan's own code).
  from grass_jax.models.slot_scan import Measurement
  params = models.init_params(CFG, jax.random.PRNGKey(0))
  mb = jax.tree.map(lambda x: x[0], _batch())
  active = jnp.array([3, 1], jnp.int32)
  slots = {k: jnp.zeros_like(v[active]) for k, v in params["layers"].items()}
  sink = jnp.zeros((CFG.num_layers,), jnp.float32)
  measurement = Measurement(jnp.asarray(False), jax.random.PRNGKey(3))
  runs = _count_block_runs(monkeypatch)
  out = {}
  for unroll in (False, True):
    f = lambda sl, sk, unroll=unroll: slot_loss({**params, "layers": sl}, params["layers"], active, CFG, mb,
                                                StepOptions(dtype=jnp.float32, measure="sketch",
                                                            unroll_forward=unroll),
                                                backward=Backward(sk, measurement, input_grad=False))[0]
    runs.clear()
    # the scan over the layers is gone from the forward pass; the backward pass keeps its loops
    assert str(jax.make_jaxpr(jax.grad(f))(slots, sink)).count(" scan[") == (0 if unroll else 1)
    out[unroll] = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(slots, sink)
    jax.effects_barrier()
    out[unroll] += (sorted(runs),)
  (loss_s, (g_s, sink_s), runs_s), (loss_u, (g_u, sink_u), runs_u) = out[False], out[True]
  np.testing.assert_allclose(loss_u, loss_s, rtol=1e-6)
  for k in g_s:  # XLA fuses the two forward passes differently: float32 rounding, 1e-5 of the largest entry
    scale = np.abs(np.asarray(g_s[k])).max()
    assert scale > 0
    np.testing.assert_allclose(g_u[k], g_s[k], rtol=1e-4, atol=1e-5 * scale)
  np.testing.assert_allclose(sink_u, sink_s, rtol=1e-4)
  assert runs_u == runs_s and runs_s.count(0) == 2  # layer 0: forward, and the sketch recomputes it
  with pytest.raises(ValueError, match="unroll_forward needs remat='full'"):
    StepOptions(remat="dots", unroll_forward=True)


def test_train_step_with_frozen_embeddings_matches_full_gradients():
  # always_on=False: only the layers are differentiated; the update equals the one computed from
  # every leaf's gradient, and the non-layer leaves do not move.
  params = models.init_params(CFG, jax.random.PRNGKey(1))
  batch = _batch(accum=2)
  settings = grass_jax.GrassSettings(layers=LAYERS, num_active=2, period=3, always_on=False)
  tx = grass_jax.transform(optax.adam(1e-2, eps=0.1), settings)
  out = {}
  for always_on in (None, False):  # None: a step not told the settings differentiates every leaf
    step = make_train_step(CFG, tx, StepOptions(dtype=jnp.float32, grass=None if always_on is None else settings,
                                                donate=False))
    p, s = params, tx.init(params)
    norms = []
    for _ in range(4):
      p, s, m = step(p, s, batch)
      norms.append(float(m["grad_norm"]))
    out[always_on] = (p, m, max(norms))
  # Two programs (every leaf differentiated, or the layers only) through 4 Adam steps: bounded as above.
  grad_error = summed_gradient_error(max(out[None][2], out[False][2]), terms=320)  # updated leaves' norms
  assert_adam_runs_agree_given_gradient_error(out[None][0], out[False][0], steps=4, lr=1e-2, eps=0.1,
                                              grad_error=grad_error)
  np.testing.assert_array_equal(out[False][0]["embed"], params["embed"])
  assert float(out[False][1]["loss"]) == pytest.approx(float(out[None][1]["loss"]), rel=1e-6)


def test_train_step_refuses_an_always_on_mismatch():
  params = models.init_params(CFG, jax.random.PRNGKey(1))
  tx = grass_jax.transform(optax.adam(1e-2), layers=LAYERS, num_active=2, period=3, always_on=True)
  other = grass_jax.GrassSettings(layers=LAYERS, num_active=2, period=3, always_on=False)
  step = make_train_step(CFG, tx, StepOptions(dtype=jnp.float32, grass=other, donate=False))
  with pytest.raises(ValueError, match="give the step the settings the transform was built from"):
    step(params, tx.init(params), _batch(accum=1))


def test_chunked_loss_train_step_matches_the_whole_loss():
  always_on = None  # the head trains: its gradient is the one the chunks accumulate
  # model.loss_chunk_tokens through the slot step: same loss, same updated weights, one compilation.
  params = models.init_params(CFG, jax.random.PRNGKey(2))
  tx = grass_jax.transform(optax.adam(1e-2), layers=LAYERS, num_active=2, period=2, seed=1,
                           always_on=always_on is None)
  out = {}
  for chunk in (0, 5):
    step = make_train_step(CFG, tx, StepOptions(dtype=jnp.float32, donate=False, loss_chunk=chunk))
    p, s = params, tx.init(params)
    losses = []
    for i in range(3):
      p, s, m = step(p, s, _batch(seed=i))
      losses.append(float(m["loss"]))
    out[chunk] = (p, losses)
    assert step._cache_size() == 1
  np.testing.assert_allclose(out[5][1], out[0][1], rtol=1e-6)
  # Adam divides by sqrt(v): where a gradient is ~0, summation order moves a weight by ~1e-5.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), out[5][0], out[0][0])


def test_a_batch_of_one_chunk_or_less_takes_the_whole_loss_path(monkeypatch):
  from grass_jax import train_step
  monkeypatch.setattr(train_step, "chunked_cross_entropy", lambda *a, **k: (_ for _ in ()).throw(
      AssertionError("the chunked path ran")))
  params = models.init_params(CFG, jax.random.PRNGKey(2))
  tx = grass_jax.transform(optax.adam(1e-2), layers=LAYERS, num_active=2, period=2, seed=1)
  batch = _batch(seed=0)
  predicted = batch["tokens"].shape[1] * (batch["tokens"].shape[2] - 1)  # a micro-batch's predicted tokens
  step = make_train_step(CFG, tx, StepOptions(dtype=jnp.float32, donate=False, loss_chunk=predicted))
  step(params, tx.init(params), batch)  # exactly one chunk: the whole loss
  with pytest.raises(AssertionError, match="the chunked path ran"):
    make_train_step(CFG, tx, StepOptions(dtype=jnp.float32, donate=False, loss_chunk=predicted - 1))(
        params, tx.init(params), batch)
