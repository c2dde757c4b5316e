"""Sharded training (data parallel and FSDP) on 4 CPU devices equals the single-device run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.float_bounds import U, adam_atol_for_gradient_error, summed_gradient_error

from grass_jax import sharding

# Module fixtures: the whole file on one xdist worker (--dist loadgroup), the fixture built once.
pytestmark = pytest.mark.xdist_group("sharding")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sharded_run.py"), str(tmp_path_factory.mktemp("mesh"))],
                        capture_output=True, text=True, env=env, timeout=900)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
  assert lines, proc.stderr[-4000:]
  return json.loads(lines[0][len("RESULT"):])


def test_the_default_strategy_sharded_equals_its_single_device_run(sharded):
  # LISA by modules (the default): module-form slot buffers sharded like the stack, one backward branch per
  # module. The same bound as above (same model, data, lr, eps and steps; a moment reset lowers no bound).
  r = sharded["data2_fsdp2-default"]
  assert r["devices_used"] == 4 and r["fsdp_sharded_leaves"] == 3
  largest = min(1.0, r["max_grad_norm"])
  atol = adam_atol_for_gradient_error(steps=8, lr=3e-3, eps=0.1, grad_error=summed_gradient_error(largest, 2000))
  assert r["max_param_diff"] <= atol + 8 * U * r["param_scale"], (atol, r["max_param_diff"], r)
  assert r["modules_logged"] and r["same_layer_draws"] and r["same_final_active"] and r["active_replicated"], r
  assert abs(r["loss"][0] - r["loss"][1]) < 1e-4 * abs(r["loss"][1])


# A fused attention kernel under FSDP (q, k, v sharded alike) is checked in the lowered step below, not by a run.
def test_sharded_run_equals_single_device_run(sharded):
  name = "data2_fsdp2-offloadTrue"
  r = sharded[name]
  assert r["devices_used"] == 4
  # Same data, same math; only the order of the cross-device sums differs. A gradient entry sums at most ~2,000
  # terms (8 x 160 tokens, times the 128-wide products inside each), so it may move by 2,000 U times the largest
  # gradient, which clipping to norm 1 (the demo's max_grad_norm) bounds by min(1, the logged norm); Adam with eps
  # 0.1 carries that through 8 steps (tests/float_bounds.py). A lost or doubled reduction changes every gradient
  # by a factor, and the weights by ~lr |g| / eps per step.
  largest = min(1.0, r["max_grad_norm"])
  atol = adam_atol_for_gradient_error(steps=8, lr=3e-3, eps=0.1, grad_error=summed_gradient_error(largest, 2000))
  assert r["max_param_diff"] <= atol + 8 * U * r["param_scale"], (atol, r["max_param_diff"], r)
  assert r["same_layer_draws"] and r["same_final_active"] and r["active_replicated"], r
  assert abs(r["loss"][0] - r["loss"][1]) < 1e-4 * abs(r["loss"][1])
  assert r["fsdp_sharded_leaves"] == 3  # gate/up/down [L, 64, 128]; 64-wide dims stay whole at fsdp 2
  assert r["host_kinds"] == ["pinned_host"]
  assert r["host_fsdp_leaves"] > 0, r  # the host states are laid out like their FSDP-sharded device copies
  # stopped at step 5 and resumed on the mesh: bitwise the straight mesh run, shards where they were
  assert r["resume_bitwise"] and r["resumed_steps"] == 8 and r["resumed_sharding_kept"], r


def test_fused_attention_gets_q_k_v_sharded_alike():
  # cuDNN's partitioner refuses differently sharded q/k/v (seen on 2 H200s with FSDP); the constraint
  # must reach all three in the lowered step, forward and backward.
  import jax.numpy as jnp
  from grass_jax.models import config_from_hf, init_params
  from grass_jax.train_step import StepOptions, slot_loss
  cfg = config_from_hf(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
  params = init_params(cfg, jax.random.PRNGKey(0), jnp.float32)
  mesh = sharding.make_mesh(data=1, fsdp=1)
  act = sharding.activation_sharding(mesh)
  assert act.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, None, None)
  batch = {k: jnp.ones((2, 8), jnp.int32) for k in ("tokens", "attention_mask", "loss_mask")}
  trainable = {**params, "layers": {k: v[:1] for k, v in params["layers"].items()}}

  def hlo(act_sharding, attention):
    f = lambda tr: slot_loss(tr, params["layers"], jnp.array([0]), cfg, batch,
                             StepOptions(dtype=jnp.float32, attention=attention), act_sharding=act_sharding)[0]
    return jax.jit(jax.grad(f)).lower(trainable).as_text()

  count = lambda text: text.count("@Sharding") + text.count("sharding_constraint")
  assert count(hlo(None, "xla")) == 0
  # q, k, v in the forward scan, the frozen-layer loops and the unrolled trained layer.
  assert count(hlo(act, "xla")) >= 9
  assert count(hlo(act, "einsum")) == 0  # only fused kernels need it


def test_leaf_spec_picks_the_largest_divisible_dimension():
  P = jax.sharding.PartitionSpec
  assert sharding.leaf_spec((22, 2048, 5632), 4) == P(None, None, "fsdp")
  assert sharding.leaf_spec((2048, 5632), 4) == P(None, "fsdp")  # a slot of the same stack: same dimension
  assert sharding.leaf_spec((32001, 2048), 2) == P(None, "fsdp")  # 32001 is odd
  assert sharding.leaf_spec((22, 64), 4) == P()  # small: replicated
  assert sharding.leaf_spec((22,), 2) == P()
  assert sharding.leaf_spec((2048, 5632), 1) == P()


def test_mesh_and_batch_errors_name_the_fix():
  with pytest.raises(sharding.MeshError, match="needs 8 devices"):
    sharding.make_mesh(data=4, fsdp=2)
  with pytest.raises(sharding.MeshError, match="mesh.fsdp=3 does not divide"):
    sharding.make_mesh(fsdp=3, devices=[jax.devices()[0]] * 2)
  mesh = sharding.make_mesh(data=1, fsdp=1)
  b = sharding.shard_batch({"tokens": np.zeros((1, 3, 4), np.int32)}, sharding.batch_sharding(mesh))
  assert b["tokens"].shape == (1, 3, 4)
