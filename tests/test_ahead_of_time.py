"""The train step compiled ahead of time: the same results as the jitted step, one executable per
batch shape, and in the Trainer compiled before any weight is loaded."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import grass_jax
from grass_jax import config as config_lib
from grass_jax import models
from grass_jax.ahead_of_time import CompiledStep, abstract
from grass_jax.models import llama
from grass_jax.train_step import LAYERS, make_train_step

CFG = llama.config_from_hf({"model_type": "llama", "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24,
                            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2})
ROOT = Path(__file__).resolve().parents[1]


def _batch(t, seed=0):
  tokens = np.random.default_rng(seed).integers(1, 50, size=(1, 2, t)).astype(np.int32)
  return {"tokens": tokens, "attention_mask": np.ones_like(tokens), "loss_mask": np.ones_like(tokens)}


def test_compiled_step_equals_the_jitted_step_and_compiles_once_per_shape():
  params = models.init_params(CFG, jax.random.PRNGKey(0))
  tx = grass_jax.transform(optax.adamw(1e-2), layers=LAYERS, num_active=2, period=2, seed=0)
  state = tx.init(params)
  jitted = make_train_step(CFG, tx, dtype=jnp.float32, donate=False)
  step = CompiledStep(make_train_step(CFG, tx, dtype=jnp.float32, donate=False))
  step.compile(abstract(params), abstract(state), abstract(_batch(8)))  # shapes only
  assert step.num_compiled() == 1
  p_ref, s_ref, p, s = params, state, params, state
  for i in range(4):  # two periods: the drawn layers change, the executable does not
    p_ref, s_ref, m_ref = jitted(p_ref, s_ref, _batch(8, i))
    p, s, m = step(p, s, _batch(8, i))
    np.testing.assert_array_equal(m["loss"], m_ref["loss"])
  jax.tree.map(np.testing.assert_array_equal, p, p_ref)
  assert step.step._cache_size() == 0 and step.num_compiled() == 1  # every call ran the executable compiled ahead
  step(p, s, _batch(12))  # a shape not compiled ahead compiles at its call, as under jax.jit
  assert step.step._cache_size() == 1 and step.num_compiled() == 2


def test_trainer_compiles_every_bucket_before_loading_the_model(tmp_path, monkeypatch):
  import grass_jax.train as train_lib
  events = []
  compile_, load = CompiledStep.compile, train_lib.load_model
  monkeypatch.setattr(CompiledStep, "compile", lambda self, *a: (events.append("compile"), compile_(self, *a))[1])
  monkeypatch.setattr(train_lib, "load_model", lambda *a: (events.append("load"), load(*a))[1])
  small = ("model.random_init={model_type: llama, vocab_size: 259, hidden_size: 32, intermediate_size: 48, "
           "num_hidden_layers: 4, num_attention_heads: 2, num_key_value_heads: 1}")
  cfg = config_lib.load(ROOT / "configs" / "tiny-demo.yaml", [
      small, f"train.output_dir={tmp_path}", "train.batch_size=8", "data.train=data/tiny_arithmetic.jsonl",
      "eval.tasks=[]", "data.max_length=192", "data.buckets=[188, 192]", "train.max_steps=6", "optim.period=2",
      "train.checkpoint_every=0", "train.export=false", "optim.offload_optimizer_state=true"])
  trainer = train_lib.Trainer(cfg, progress=False)
  lengths = [b["tokens"].shape[-1] for _, _, b in trainer.dataset.iterate()][:6]
  assert set(lengths) == {188, 192}, "the run no longer fills both buckets: the test would not test two shapes"
  assert events == ["compile", "compile", "load"]
  trainer.train()
  trainer.finish()
  assert trainer.train_step_fn.step._cache_size() == 0  # no step compiled with the weights on the device
