"""Module granularity (optim.granularity: module): each active layer trains its attention or its MLP."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import grass_jax
from grass_jax import config as config_lib
from grass_jax import models
from grass_jax.models import llama
from grass_jax.module_sampling import (ATTENTION_MLP, from_module_form, mask_modules, module_index, slot_modules,
                                       to_module_form)
from grass_jax.train_step import LAYERS, StepOptions, make_train_step
from grass_jax.transform import strategy, strategy_settings

CFG = llama.config_from_hf({"model_type": "llama", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24,
                            "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2})
ATTENTION = {"input_norm", "q_proj", "k_proj", "v_proj", "o_proj"}
MLP = {"pre_mlp_norm", "gate_proj", "up_proj", "down_proj"}


def test_every_layer_leaf_of_every_family_is_in_exactly_one_module():
  # Every option that adds a layer leaf (biases, Gemma's post-norms, Qwen3's q/k norms): a new leaf fails here.
  everything = dataclasses.replace(CFG, attention_bias=True, o_bias=True, mlp_bias=True, post_norms=True, qk_norm=True)
  names = set(everything.param_shapes()["layers"])
  assert len(names) == 20
  attention = {n for n in names if module_index(ATTENTION_MLP, n) == 0}
  assert attention == ATTENTION | {"q_bias", "k_bias", "v_bias", "o_bias", "q_norm", "k_norm", "post_attn_norm"}
  assert module_index(ATTENTION_MLP, "layers/down_proj") == 1  # a path as the transform's layout names it
  with pytest.raises(ValueError, match="'layers/lora_a' matches 0 of the modules"):
    module_index(ATTENTION_MLP, "layers/lora_a")


def _step_and_state(period=3, seed=0):
  params = models.init_params(CFG, jax.random.PRNGKey(1))
  settings = strategy_settings("lisa", layers=LAYERS, num_active=4, period=period, seed=seed, modules=ATTENTION_MLP)
  # Weight decay: an update that is not masked moves a weight even where the gradient is zero.
  tx = optax.chain(optax.clip_by_global_norm(1.0), grass_jax.transform(optax.adamw(1e-2, weight_decay=0.1), settings))
  step = make_train_step(CFG, tx, StepOptions(dtype=jnp.float32, grass=settings, donate=False))
  return params, tx.init(params), step


def _batch(seed):
  tokens = np.random.default_rng(seed).integers(1, 50, size=(1, 2, 9)).astype(np.int32)
  ones = jnp.ones(tokens.shape, jnp.int32)
  return {"tokens": jnp.asarray(tokens), "attention_mask": ones, "loss_mask": ones}


def test_the_train_step_moves_only_each_slots_module_and_compiles_once():
  params, opt_state, step = _step_and_state()
  pairs = set()
  for t in range(12):  # four periods
    active = np.asarray(grass_jax.find_state(opt_state).active)
    new_params, opt_state, _ = step(params, opt_state, _batch(t))
    for name, before in params["layers"].items():
      moved = np.any(np.asarray(new_params["layers"][name] != before).reshape(CFG.num_layers, -1), axis=1)
      expect = np.zeros(CFG.num_layers, bool)
      expect[active[:2] if name in ATTENTION else active[2:]] = True  # slots 0-1 attention, 2-3 MLP
      np.testing.assert_array_equal(moved, expect, err_msg=f"step {t}, {name}")  # exact: others bitwise unchanged
    pairs.update((int(l), "attention") for l in active[:2])
    pairs.update((int(l), "mlp") for l in active[2:])
    params = new_params
  # The draw's order pairs layers with modules at random: some layer trained each module within four periods.
  assert {l for l, m in pairs if m == "attention"} & {l for l, m in pairs if m == "mlp"}
  assert step._cache_size() == 1  # new layers: the same executable


def _scan_gradients():
  """The slot scan's gradients of a 4-slot draw by modules: ``(loss_of, zeros, roles)``, where ``loss_of(slots,
  slot_roles)`` is a loss whose gradient with respect to the slot handles ``slots`` is the slots' weight gradient."""
  from grass_jax.models.slot_scan import slot_stack
  from grass_jax.models.decoder import forward

  params = models.init_params(CFG, jax.random.PRNGKey(1))
  active = jnp.array([4, 1, 0, 3])  # slots 0-1 attention, 2-3 MLP; the draw's (unsorted) order
  slot_of = jnp.full((CFG.num_layers,), -1).at[active].set(jnp.arange(4))
  zeros = {k: jnp.zeros((4,) + v.shape[1:], v.dtype) for k, v in params["layers"].items()}
  roles = tuple(tuple(sorted(ATTENTION if m == 0 else MLP)) for m in slot_modules(ATTENTION_MLP, 4))
  batch = _batch(0)

  def loss_of(slots, slot_roles):
    stack = slot_stack(CFG, slots, slot_of, attention="einsum", slot_roles=slot_roles)
    logits, _ = forward(params, CFG, batch["tokens"][0], batch["attention_mask"][0], layer_stack=stack)
    return jnp.sum(logits.astype(jnp.float32) ** 2) * 1e-3

  return loss_of, zeros, roles


def test_the_backward_pass_forms_only_each_slots_module_as_the_masked_one_does():
  # The backward pass takes each slot's module's weight gradient only (ScanSettings.slot_roles, a branch per
  # module chosen by the slot); the whole layer's gradient, masked after (slot_roles None), is the reference.
  # The same ops on the same inputs: equal to float32 rounding of a reordered sum at most: rtol 1e-6 is 8 ulps
  # of an entry, atol 1e-9 8 ulps of this model's largest gradient entries (about 1.3e-3, ulp 1.2e-10; the
  # differences seen are 1-2 of them). (Through Adam the parameters then differ by a few ulps: docs/accuracy.md.)
  import grass_jax.train_step as train_step_lib

  loss_of, zeros, roles = _scan_gradients()
  only, whole = (jax.jit(jax.grad(lambda slots: loss_of(slots, r)))(zeros) for r in (roles, None))
  for name, g in only.items():
    trains = np.array([name in r for r in roles])
    assert np.all(np.asarray(g)[~trains] == 0), name  # never formed: exact zeros
    np.testing.assert_allclose(g[trains], whole[name][trains], rtol=1e-6, atol=1e-9, err_msg=name)
    assert np.any(np.asarray(whole[name])[~trains] != 0), name  # the reference did form them

  # Handles in module form (each leaf's rows of the slots that take it, as the train step passes them): the
  # same rows. Bitwise at XLA's default flags (the next test); with this session's cheaper LLVM passes the
  # weight-gradient dot, written into a buffer of another shape, may sum in another order: the tolerance above.
  compact = jax.grad(lambda slots: loss_of(slots, roles))(to_module_form(ATTENTION_MLP, zeros))
  assert {k: v.shape[0] for k, v in compact.items()} == dict.fromkeys(zeros, 2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), compact,
               to_module_form(ATTENTION_MLP, only))
  with pytest.raises(ValueError, match="'q_proj' have 3 rows; expected 4 .one per slot. or 2"):
    loss_of({**zeros, "q_proj": zeros["q_proj"][:3]}, roles)

  # The train step asks the scan for exactly these roles (the transform's slots, in its order).
  settings = strategy_settings("lisa", layers=LAYERS, num_active=4, modules=ATTENTION_MLP)
  assert train_step_lib._slot_roles(StepOptions(grass=settings), zeros, 4) == roles
  assert train_step_lib._slot_roles(StepOptions(), zeros, 4) is None


@pytest.mark.default_flags
def test_module_form_rows_are_the_slot_form_rows_bitwise():
  # The same ops on the same inputs: the rows of the slots that do not take a leaf are simply not there.
  # Compiled whole, as the train step is (and one compilation each, not one per op).
  loss_of, zeros, roles = _scan_gradients()
  compact = jax.jit(jax.grad(lambda slots: loss_of(slots, roles)))(to_module_form(ATTENTION_MLP, zeros))
  slot_form = jax.jit(jax.grad(lambda slots: loss_of(slots, roles)))(zeros)
  jax.tree.map(np.testing.assert_array_equal, compact, to_module_form(ATTENTION_MLP, slot_form))


def test_the_update_is_the_same_from_full_slot_and_module_form_gradients():
  # The transform takes a module-form stack (the train step's) and gives its updates in it; full and slot form
  # still work, and all three are one computation: the same numbers, bitwise, each in the form it came in.
  params = models.init_params(CFG, jax.random.PRNGKey(1))
  settings = strategy_settings("lisa", layers=LAYERS, num_active=4, period=2, seed=0, modules=ATTENTION_MLP)
  tx = grass_jax.transform(optax.adamw(1e-2, weight_decay=0.1), settings)
  state = tx.init(params)
  active = grass_jax.find_state(state).active
  full = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(2), x.shape), params)
  slot = {**full, "layers": {k: v[active] for k, v in full["layers"].items()}}
  rows = {**full, "layers": to_module_form(ATTENTION_MLP, slot["layers"])}
  jax.tree.map(np.testing.assert_array_equal, rows,
               grass_jax.gather_active(full, state, LAYERS, modules=ATTENTION_MLP))
  slot_p = {**params, "layers": {k: v[active] for k, v in params["layers"].items()}}
  rows_p = {**params, "layers": to_module_form(ATTENTION_MLP, slot_p["layers"])}
  u_full, s_full = tx.update(full, state, params)
  u_slot, s_slot = tx.update(slot, state, slot_p)
  u_rows, s_rows = tx.update(rows, state, rows_p)
  jax.tree.map(np.testing.assert_array_equal, s_full, s_rows)
  jax.tree.map(np.testing.assert_array_equal, s_slot, s_rows)
  assert {v.shape[0] for v in u_rows["layers"].values()} == {2}
  jax.tree.map(np.testing.assert_array_equal, u_slot["layers"], from_module_form(ATTENTION_MLP, u_rows["layers"], 4))
  jax.tree.map(np.testing.assert_array_equal, u_full["layers"], {
      k: jnp.zeros_like(v).at[active].set(u_slot["layers"][k]) for k, v in params["layers"].items()})
  with pytest.raises(ValueError, match="leading size 3; expected L=6 .full form. or num_active=4 .slot form. or 2"):
    tx.update({**full, "layers": {k: v[:3] for k, v in full["layers"].items()}}, state, None)
  new = grass_jax.apply_slot_updates(params, u_rows, active, LAYERS, modules=ATTENTION_MLP)
  jax.tree.map(np.testing.assert_array_equal, new["layers"], optax.apply_updates(params, u_full)["layers"])


def test_modules_hold_lisa_by_layers_memory_in_the_compiled_step():
  # The step's buffers are in module form: by modules (4 slots) it needs what LISA by layers (2 slots) needs,
  # within one layer's bytes (XLA's buffer assignment differs by the step's small buffers and its order). In slot
  # form each buffer of the gradients, the gathered parameters and the updates held 4 whole layers: about a dozen
  # layers more on this CPU (387.6 against 223.5 MiB at 8 layers of width 512, measured 2026-12-07).
  cfg = llama.config_from_hf({"model_type": "llama", "vocab_size": 50, "hidden_size": 128, "intermediate_size": 384,
                              "num_hidden_layers": 5, "num_attention_heads": 4, "num_key_value_heads": 2})
  params = models.init_params(cfg, jax.random.PRNGKey(1))
  layer_bytes = sum(v[0].nbytes for v in params["layers"].values())

  def temp_bytes(modules):
    settings = strategy_settings("lisa", layers=LAYERS, num_active=4 if modules else 2, period=3, seed=0,
                                 modules=ATTENTION_MLP if modules else None)
    tx = optax.chain(optax.clip_by_global_norm(1.0), grass_jax.transform(optax.adamw(1e-2), settings))
    step = make_train_step(cfg, tx, StepOptions(dtype=jnp.float32, grass=settings))
    compiled = step.lower(params, tx.init(params), _batch(0)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  by_layers, by_modules = temp_bytes(False), temp_bytes(True)
  assert by_modules <= by_layers + layer_bytes, (by_modules, by_layers, layer_bytes)


def test_each_slot_holds_the_moments_of_its_module_only():
  # 2 attention and 2 MLP slots hold the parameters and the moments of 2 whole layers: LISA's at gamma 2.
  params, opt_state, _ = _step_and_state()
  states = grass_jax.find_state(opt_state).slot_states
  mu = [s[0].mu for s in states]
  assert [{k.split("/")[-1] for k in m} for m in mu] == [ATTENTION, ATTENTION, MLP, MLP]
  layer = sum(x[0].size for x in params["layers"].values())
  assert sum(x.size for m in mu for x in m.values()) == 2 * layer


def test_module_draws_are_lisa_draws_in_the_draw_order_and_repeat_from_the_seed():
  params = {"embed": jnp.ones((8, 4)), "layers": {"q_proj": jnp.ones((9, 4, 4)), "up_proj": jnp.ones((9, 4, 8))}}
  grads = jax.tree.map(jnp.ones_like, params)

  def run(**fields):
    tx = strategy("lisa", optax.adamw(1e-2), layers=grass_jax.stacked_layers("layers"), num_active=4, period=2,
                  seed=3, **fields)
    state, out = tx.init(params), []
    for _ in range(12):
      _, state = jax.jit(tx.update)(grads, state, params)
      out.append(tuple(np.asarray(grass_jax.find_state(state).active)))
    return out

  with_modules = run(modules=ATTENTION_MLP)
  assert [tuple(sorted(a)) for a in with_modules] == run()  # the same layers as LISA's, drawn from the same noise
  assert with_modules == run(modules=ATTENTION_MLP)
  assert any(list(a) != sorted(a) for a in with_modules)  # in the draw's order, not by depth


def test_mask_modules_zeroes_exactly_the_untrained_module():
  slots = {"q_proj": jnp.arange(12.0).reshape(3, 2, 2), "gate_proj": jnp.arange(6.0).reshape(3, 2) + 1}
  out = mask_modules(ATTENTION_MLP, slots, (0, 1, 0))
  np.testing.assert_array_equal(out["q_proj"], slots["q_proj"] * jnp.array([1, 0, 1])[:, None, None])
  np.testing.assert_array_equal(out["gate_proj"], slots["gate_proj"] * jnp.array([0, 1, 0])[:, None])
  assert slot_modules(ATTENTION_MLP, 6) == (0, 0, 0, 1, 1, 1)


@pytest.mark.parametrize("fields,match", [
    ({"strategy": "grass"}, "optim.granularity: module samples modules as LISA samples layers"),
    ({"strategy": "lisa", "granularity": "modules"}, "optim.granularity must be one of layer, module"),
])
def test_config_errors_name_the_fix(fields, match):
  raw = {"model": {"random_init": {"model_type": "llama"}}, "data": {"train": "data/tiny_parity_train.jsonl"},
         "optim": {"strategy": fields["strategy"]}, "advanced": {"optim": {"granularity": "module", **fields}}}
  raw["advanced"]["optim"].pop("strategy")
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.from_dict(raw)


def test_the_transform_refuses_modules_without_lisa_or_with_an_odd_count():
  with pytest.raises(ValueError, match="modules \\(module granularity\\) needs"):
    strategy_settings("grass", layers=LAYERS, num_active=2, modules=ATTENTION_MLP)
  with pytest.raises(ValueError, match="give a multiple of 2 \\(e.g. 4: the parameters of 2 layers\\); got 3"):
    strategy_settings("lisa", layers=LAYERS, num_active=3, modules=ATTENTION_MLP)
  every_layer = grass_jax.transform(optax.sgd(1.0), strategy_settings("lisa", layers=LAYERS, num_active=6,
                                                                      modules=ATTENTION_MLP))
  with pytest.raises(ValueError, match="draws every one of the L=6 layers: give fewer slots than layers"):
    every_layer.init(models.init_params(CFG, jax.random.PRNGKey(0)))


def test_a_run_logs_the_module_each_active_layer_trains_and_resumes_bitwise(tmp_path):
  from tests.test_train_loop import _cfg
  from grass_jax.train import run
  extra = ["train.max_steps=4", "train.log_every=2", "train.checkpoint_every=0", "train.export=false",
           "optim.strategy=lisa", "optim.granularity=module", "optim.num_active=1", "optim.period=3"]
  # 4 layers: 1 layer's worth draws 2 of them (2 of 4 would draw all: refused, see below).
  straight = run(_cfg(tmp_path / "a", *extra), progress=False, return_state=True)
  lines = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if "active_modules" in l]
  assert len(lines) == 2 and all(l["active_modules"] == ["attention", "mlp"] for l in lines)
  assert all(len(set(l["active_layers"])) == 2 for l in lines)
  # Stopped inside the first period and resumed across the switch: the draws' order (which layer trains
  # which module) and the module-shaped states come back exactly.
  run(_cfg(tmp_path / "b", *extra), progress=False, stop_at=2)
  resumed = run(_cfg(tmp_path / "b", *extra), resume=True, progress=False, return_state=True)
  jax.tree.map(np.testing.assert_array_equal, (straight["params"], straight["opt_state"]),
               (resumed["params"], resumed["opt_state"]))


def _optim(**optim):
  raw = {"model": {"random_init": {"model_type": "llama"}}, "data": {"train": "data/tiny_parity_train.jsonl"},
         "optim": {k: v for k, v in optim.items() if k != "granularity"},
         "advanced": {"optim": {k: v for k, v in optim.items() if k == "granularity"}}}
  return config_lib.from_dict(raw)


def test_lisa_samples_modules_by_default_and_num_active_counts_layers_worth():
  from grass_jax.assembly import grass_settings
  default = _optim().optim  # strategy lisa, granularity null
  assert default.strategy == "lisa" and default.granularity is None and default.module_granularity()
  s = grass_settings(default, 6, 0)  # 2 layers' worth: 2 attention and 2 MLP slots
  assert s.num_active == 4 and s.modules == ATTENTION_MLP
  layers = grass_settings(_optim(granularity="layer").optim, 6, 0)
  assert layers.num_active == 2 and layers.modules is None
  grass = _optim(strategy="grass").optim  # the default is the strategy's own: grass draws whole layers
  assert not grass.module_granularity() and grass_settings(grass, 6, 0).modules is None


def test_more_layers_worth_than_half_the_model_by_modules_is_refused():
  from grass_jax.assembly import check_layers_fit
  import types
  model = types.SimpleNamespace(num_layers=6)  # all that the check reads of a model
  check_layers_fit(_optim(num_active=2).optim, model)
  # 6 of 6 layers drawn would be full fine-tuning's path (every layer whole): refused too.
  with pytest.raises(config_lib.ConfigError, match="optim.num_active=3 by modules draws 6 layers .* use at most 2, "
                                                   "or optim.granularity: layer"):
    check_layers_fit(_optim(num_active=3).optim, model)
  check_layers_fit(_optim(num_active=3, granularity="layer").optim, model)
  with pytest.raises(config_lib.ConfigError, match="as many as or more than the model's 2; set optim.granularity: "
                                                   "layer$"):
    check_layers_fit(_optim(num_active=1).optim, types.SimpleNamespace(num_layers=2))  # too few layers for modules


def test_a_run_saved_before_the_granularity_key_resumes_by_layers_only(tmp_path):
  import yaml

  from grass_jax.train import check_same_schedule
  saved = tmp_path / "config.yaml"
  old = config_lib.to_dict(_optim(granularity="layer"))
  old["optim"].pop("granularity")  # a file from before 2026-12-07: it trained whole layers
  saved.write_text(yaml.safe_dump(old))
  check_same_schedule(_optim(granularity="layer"), saved)
  with pytest.raises(config_lib.ConfigError, match="--resume with optim.granularity='module', but the run in .* was "
                                                   "started with 'layer'"):
    check_same_schedule(_optim(), saved)  # the new default would switch a LISA run to modules


def test_the_progress_bar_names_each_active_layers_block():
  from grass_jax.train import _active_label
  assert _active_label([3, 17], None) == "3,17"
  assert _active_label([4, 1, 0, 3], ["attention", "attention", "mlp", "mlp"]) == "4a,1a,0m,3m"
