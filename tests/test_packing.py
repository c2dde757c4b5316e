"""data.packing: several examples in one row, with the loss and gradients of the same examples unpacked."""

import jax
import jax.numpy as jnp
import numpy as np

from grass_jax import models
from grass_jax.data import Batching, Dataset, Example
from grass_jax.loss import cross_entropy
from grass_jax.models.decoder import segment_positions

CFG = models.config_from_hf({"model_type": "llama", "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})


def _examples(lengths=(5, 7, 4), seed=0):
  rng = np.random.default_rng(seed)
  return [Example(rng.integers(1, 40, n).tolist(), [0, 0] + [1] * (n - 2)) for n in lengths]


def test_positions_restart_in_each_packed_sequence():
  segments = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]])
  assert segment_positions(segments).tolist() == [[0, 1, 2, 0, 1, 0, 0, 0], [0, 0, 0, 1, 2, 3, 4, 5]]


def test_a_packed_row_has_the_loss_and_gradients_of_its_examples_unpacked():
  examples = _examples()
  unpacked = Dataset(examples, Batching(batch_size=3, buckets=[8]), pad_id=0)
  packed = Dataset(examples, Batching(batch_size=1, buckets=[16], packing=True), pad_id=0)
  (length, rows), = packed.epoch_plan(0)
  assert length == 16 and sorted(i for row in rows for i in row) == [0, 1, 2] and len(rows) == 1
  batches = [d.make_batch(*d.epoch_plan(0)[0]) for d in (unpacked, packed)]
  row = batches[1]
  assert row["attention_mask"][0, 0].tolist() == sum(([k + 1] * len(examples[i].tokens)
                                                       for k, i in enumerate(rows[0])), [])
  params = models.init_params(CFG, jax.random.PRNGKey(0))

  def loss(p, b):
    logits, _ = models.forward(p, CFG, jnp.asarray(b["tokens"][0]), jnp.asarray(b["attention_mask"][0]))
    return cross_entropy(logits, jnp.asarray(b["tokens"][0]), jnp.asarray(b["loss_mask"][0]))

  (s_u, n_u), (s_p, n_p) = (loss(params, b) for b in batches)
  g_u, g_p = (jax.jit(jax.grad(lambda p, b=b: loss(p, b)[0]))(params) for b in batches)
  assert float(n_u) == float(n_p) == sum(sum(e.loss_mask) for e in examples)  # the same target tokens
  # float32 sums of <= 16 tokens x 24 features in another order: relative error < 100 ulp
  np.testing.assert_allclose(float(s_p), float(s_u), rtol=100 * 2.0**-24)
  # each gradient entry is a float32 sum over the 13 targets through 2 layers of 16-24 features, reordered by
  # the packing: off by at most ~200 ulp of the leaf's scale (200 * 2^-24 = 1.2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1.2e-5 * np.abs(b).max()), g_p, g_u)


def test_packing_fills_rows_in_order_and_covers_every_example_once_per_epoch():
  examples = _examples(lengths=(5, 7, 4, 9, 3, 6, 8, 3), seed=1)
  d = Dataset(examples, Batching(batch_size=2, buckets=[16], seed=3, packing=True), pad_id=0)
  for epoch in range(3):
    plan = d.epoch_plan(epoch)
    rows = [r for _, batch in plan for r in batch]
    assert sorted(i for r in rows for i in r) == list(range(8))
    assert all(sum(len(examples[i].tokens) for i in r) <= 16 for r in rows)
    assert plan == d.epoch_plan(epoch)  # a function of (seed, epoch): resumable
    for length, batch in plan:
      b = d.make_batch(length, batch)
      for r, row in enumerate(batch):
        starts = np.cumsum([0] + [len(examples[i].tokens) for i in row])[:-1]
        assert (b["loss_mask"][0, r][starts] == 0).all()  # no sequence's first token is a target
  assert len(d) < len(Dataset(examples, Batching(batch_size=2, buckets=[16], seed=3), pad_id=0))


def test_training_with_packing_through_the_trainer(tmp_path):
  from grass_jax import config as config_lib
  from grass_jax.train import Trainer
  cfg = config_lib.load("configs/tiny-demo.yaml", [
      "model.random_init={model_type: llama, vocab_size: 259, hidden_size: 32, intermediate_size: 48, "
      "num_hidden_layers: 4, num_attention_heads: 2, num_key_value_heads: 1}", f"train.output_dir={tmp_path}",
      "train.batch_size=2", "data.packing=true", "data.max_length=512", "data.buckets=[512]",
      "train.max_steps=3", "eval.tasks=[]", "train.export=false", "train.checkpoint_every=0"])
  trainer = Trainer(cfg, progress=False)
  first = trainer.dataset.make_batch(*trainer.dataset.epoch_plan(0)[0])
  assert first["attention_mask"].max() >= 2  # rows hold several examples
  trainer.train()
  summary = trainer.finish()
  assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
