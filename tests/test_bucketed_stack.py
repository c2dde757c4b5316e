"""The bucketed backward pass: the slot scan's gradients, one executable per bucket, NaN below it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grass_jax
from grass_jax import models
from grass_jax.ahead_of_time import CompiledStep
from grass_jax.backward_buckets import BackwardBuckets
from grass_jax.models import bucketed_stack as bucketed_lib
from grass_jax.models import llama
from grass_jax.models.bucketed_stack import backward_start, bucketed_stack
from grass_jax.models.slot_scan import Measurement, slot_stack
from grass_jax.offload import Offloader
from grass_jax.train_step import LAYERS, StepOptions, make_train_step
from tests.test_train_step import _batch

CFG = llama.config_from_hf({"model_type": "llama", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24,
                            "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2})
PARAMS = models.init_params(CFG, jax.random.PRNGKey(0))
TOKENS = jnp.asarray(np.random.default_rng(0).integers(1, 50, size=(2, 9)), jnp.int32)
MASK = jnp.ones_like(TOKENS).at[0, -2:].set(0)


def _slot_of(active):
  return jnp.full((CFG.num_layers,), -1, jnp.int32).at[jnp.asarray(active)].set(jnp.arange(len(active)))


def _loss(stack_of, active, measure="none"):
  """``(slots, sink) -> loss`` of the model with the layer stack ``stack_of(slots, slot_of, sink)``."""
  def loss(slots, sink):
    stack = stack_of(slots, _slot_of(active), sink, measure)
    logits, _ = models.forward(PARAMS, CFG, TOKENS, MASK, layer_stack=stack)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * MASK)
  return loss


def _scan(slots, slot_of, sink, measure):
  measurement = Measurement(jnp.asarray(False), jax.random.PRNGKey(0)) if measure != "none" else None
  return slot_stack(CFG, slots, slot_of, attention="einsum", measure=measure, sink=sink, measurement=measurement,
                    may_probe=False, input_grad=False)


def _bucket(start):
  return lambda slots, slot_of, sink, measure: bucketed_stack(CFG, slots, slot_of, start, attention="einsum",
                                                              measure=measure, sink=sink)


def _slots(active):
  return {k: jnp.zeros_like(v[jnp.asarray(active)]) for k, v in PARAMS["layers"].items()}


@pytest.mark.parametrize("active,bucket", [([5, 3], 4), ([5, 1, 3], 1)])
def test_bucketed_gradients_and_norms_equal_the_slot_scan(active, bucket):
  # float32: the same slot gradients (slot i gets layer active[i]'s), the same measured norms.
  start = backward_start(active, bucket)
  sink = jnp.zeros((CFG.num_layers,), jnp.float32)
  args = (_slots(active), sink)
  l_scan, (g_scan, n_scan) = jax.jit(jax.value_and_grad(_loss(_scan, active, "exact"), argnums=(0, 1)))(*args)
  l_bkt, (g_bkt, n_bkt) = jax.jit(jax.value_and_grad(_loss(_bucket(start), active, "exact"), argnums=(0, 1)))(*args)
  np.testing.assert_allclose(l_bkt, l_scan, rtol=1e-6)
  for k in g_scan:
    scale = np.abs(np.asarray(g_scan[k])).max()
    assert scale > 0
    np.testing.assert_allclose(g_bkt[k], g_scan[k], rtol=1e-4, atol=1e-5 * scale)
  assert np.all(np.asarray(n_scan)[active] > 0)
  np.testing.assert_allclose(n_bkt, n_scan, rtol=1e-4)


def test_one_executable_serves_every_draw_of_its_bucket():
  # The draw is an argument: draws 2,5 / 3,2 / 4,3 share the bucket starting at 2; 1,5 does not belong
  # to it, and its gradients are NaN (a GRASS step then skips it) instead of silently wrong.
  def grad_of(stack_of):
    return jax.jit(lambda slots, slot_of: jax.grad(lambda s: jnp.sum(
        models.forward(PARAMS, CFG, TOKENS, MASK, layer_stack=stack_of(s, slot_of, None, "none"))[0]))(slots))

  bucket, scan = grad_of(_bucket(2)), grad_of(_scan)
  for active in ([2, 5], [3, 2], [4, 3]):
    g, ref = bucket(_slots(active), _slot_of(active)), scan(_slots(active), _slot_of(active))
    for k in ref:
      np.testing.assert_allclose(g[k], ref[k], rtol=1e-4, atol=1e-5 * np.abs(np.asarray(ref[k])).max())
  assert bucket._cache_size() == 1  # pylint: disable=protected-access
  g = bucket(_slots([1, 5]), _slot_of([1, 5]))
  assert all(np.isnan(np.asarray(x)).all() for x in jax.tree.leaves(g))


def test_the_bucket_below_the_start_runs_forward_only(monkeypatch):
  # Layers below the bucket run once (forward); those above: forward once, and trained layers once
  # more for their weight gradients; no other recomputation.
  runs = []
  inner = bucketed_lib.run_block

  def counted(config, lp, h, idx, inputs, **kw):
    jax.debug.callback(lambda i: runs.append(int(i)), idx)
    return inner(config, lp, h, idx, inputs, **kw)

  monkeypatch.setattr(bucketed_lib, "run_block", counted)
  active = [4, 2]
  jax.jit(jax.grad(_loss(_bucket(2), active), argnums=0))(_slots(active), None)
  jax.effects_barrier()
  assert sorted(runs) == [0, 1, 2, 2, 3, 4, 4, 5]


def test_bucketed_stack_refuses_bad_settings():
  slots, slot_of = _slots([2, 3]), _slot_of([2, 3])
  with pytest.raises(ValueError, match="measures .* only"):
    bucketed_stack(CFG, slots, slot_of, 2, attention="einsum", measure="sketch")
  with pytest.raises(ValueError, match="start must be an int in"):
    bucketed_stack(CFG, slots, slot_of, 6, attention="einsum")
  with pytest.raises(ValueError, match="needs a sink"):
    bucketed_stack(CFG, slots, slot_of, 2, attention="einsum", measure="exact")
  with pytest.raises(ValueError, match="bucket must be >= 1"):
    backward_start([3], 0)
  assert backward_start([13, 30], 4) == 12 and backward_start([30, 13], 8) == 8


def _train(bucket, *, measure, probe_steps=0, sketch_every=1, offload=False, steps=8, period=3, settings=None):
  """Params after ``steps`` GRASS steps (SGD with momentum; embeddings frozen), with buckets of ``bucket``
  layers or the slot scan (0); and the step's runs per backward_start, the skipped steps and the draws.
  ``settings``: other GRASS settings than these."""
  settings = settings or grass_jax.GrassSettings(layers=LAYERS, num_active=2, period=period, always_on=False, seed=3,
                                                 offload=offload, probe_steps=probe_steps)
  tx = grass_jax.transform(optax.sgd(0.5, momentum=0.5), settings)
  step = CompiledStep(make_train_step(CFG, tx, StepOptions(
      dtype=jnp.float32, grass=settings, donate=False, measure=measure, sketch_every=sketch_every)), background=False)
  buckets = BackwardBuckets(bucket or 1, dataclasses.replace(settings.schedule, sketch_every=sketch_every), measure)
  params = PARAMS
  state = tx.init(params)
  if offload:
    params, state = jax.device_put((params, state), jax.devices()[0])
  off = Offloader(state, period=period) if offload else None
  skipped, draws = 0, set()
  for count in range(steps):
    draws.add(tuple(sorted(np.asarray(grass_jax.find_state(state).active).tolist())))
    start = buckets.start(count, state, off) if bucket else None
    params, state, m = step(params, state, _batch(seed=count), backward_start=start)
    state = off.after_step(state) if off else state
    skipped += int(m["skipped"])
  return params, dict(step.runs), skipped, draws


@pytest.mark.parametrize("measure,probe_steps,sketch_every,offload,period", [
    ("exact", 3, 1, True, 3), ("sketch", 0, 2, False, 2)])  # sketch_every divides the refresh interval (period)
def test_a_bucketed_run_trains_what_the_slot_scan_trains(measure, probe_steps, sketch_every, offload, period):
  # The host picks each step's bucket (after every switch; probing and sketch steps run the scan):
  # no step is skipped for a wrong bucket, and the parameters equal the scan's run.
  ref, _, ref_skipped, draws = _train(0, measure=measure, probe_steps=probe_steps, sketch_every=sketch_every,
                                      offload=offload, period=period)
  got, runs, skipped, _ = _train(2, measure=measure, probe_steps=probe_steps, sketch_every=sketch_every,
                                 offload=offload, period=period)
  assert skipped == ref_skipped == 0 and len(draws) > 2
  assert set(runs) - {None} and runs.get(None, 0) == (probe_steps or (8 // sketch_every if sketch_every > 1 else 0))
  for k in ref["layers"]:
    np.testing.assert_allclose(got["layers"][k], ref["layers"][k], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got["embed"], PARAMS["embed"])


def test_a_bucketed_run_by_modules_trains_what_the_slot_scan_trains():
  # Module granularity: the bucketed pass forms whole layers' gradients and the step keeps each slot's module's
  # rows (module form); the slot scan forms those rows only. The same run, as above.
  from grass_jax.module_sampling import ATTENTION_MLP
  settings = grass_jax.strategy_settings("lisa", layers=LAYERS, num_active=4, period=3, seed=3, always_on=False,
                                         modules=ATTENTION_MLP)
  ref, _, ref_skipped, draws = _train(0, measure="none", settings=settings)
  got, runs, skipped, _ = _train(2, measure="none", settings=settings)
  assert skipped == ref_skipped == 0 and len(draws) >= 2 and set(runs) - {None} and None not in runs
  for k in ref["layers"]:
    np.testing.assert_allclose(got["layers"][k], ref["layers"][k], rtol=1e-5, atol=1e-6)
    assert np.any(np.asarray(got["layers"][k] != PARAMS["layers"][k])), k
