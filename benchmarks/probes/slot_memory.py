"""Compiled (XLA) temp memory and bytes accessed of the train step per active-layer count.

  python benchmarks/probes/slot_memory.py [--size llama2-7b | --hidden 1024 --layers 8] [--batch 1 --seq 128]
                                          [--variants base no-skip no-clip] [--json OUT]

Lowers and compiles the GRASS train step (offload on, embeddings and head frozen: the 7B memory
rows of the sweep) with abstract inputs on the default backend, and prints
``memory_analysis().temp_size_in_bytes`` and ``cost_analysis()['bytes accessed']`` for each gamma:
the growth per extra active layer, without running anything. Variants switch off parts of the
optimizer step (the non-finite guard, gradient clipping) to show what each one costs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

VARIANTS = ("base", "no-skip", "no-clip", "sgd")


def measure(model: dict, batch: int, seq: int, gamma: int, frozen_grads: str, variant: str) -> dict:
  import jax
  import jax.numpy as jnp
  import optax

  import grass_jax
  from grass_jax.models import config_from_hf, init_params
  from grass_jax.train_step import LAYERS, StepOptions, make_train_step

  cfg = config_from_hf(model)
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16))
  inner = optax.sgd(1e-4) if variant == "sgd" else optax.adamw(1e-5, weight_decay=0.0)
  grass = grass_jax.transform(inner, layers=LAYERS, num_active=gamma, period=50, offload=True,
                             always_on=False, skip_nonfinite=variant != "no-skip")
  tx = grass if variant == "no-clip" else optax.chain(optax.clip_by_global_norm(1.0), grass)
  state = jax.eval_shape(tx.init, params)
  step = make_train_step(cfg, tx, StepOptions(dtype=jnp.bfloat16, frozen_grads=frozen_grads, attention="einsum"))
  tok = jax.ShapeDtypeStruct((1, batch, seq), jnp.int32)
  compiled = step.lower(params, state, {"tokens": tok, "attention_mask": tok, "loss_mask": tok}).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  layer_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params["layers"])) // cfg.num_layers
  return {"variant": variant, "gamma": gamma, "temp_bytes": mem.temp_size_in_bytes,
          "bytes_accessed": cost.get("bytes accessed"), "flops": cost.get("flops"), "layer_bytes": layer_bytes,
          "backend": jax.default_backend()}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", default=None, help="a model of benchmarks/common.py SIZES (overrides --hidden/--layers)")
  ap.add_argument("--hidden", type=int, default=1024)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--gammas", type=int, nargs="+", default=[1, 2, 4])
  ap.add_argument("--frozen-grads", default="cond")
  ap.add_argument("--variants", nargs="+", default=["base"], choices=VARIANTS)
  ap.add_argument("--json", default=None, help="also write the rows here")
  args = ap.parse_args()
  if args.size:
    from benchmarks.common import SIZES
    model = SIZES[args.size]
  else:
    model = dict(model_type="llama", vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                 num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                 num_key_value_heads=args.hidden // 128)
  rows = []
  for variant in args.variants:
    prev = None
    for g in args.gammas:
      r = measure(model, args.batch, args.seq, g, args.frozen_grads, variant)
      rows.append(r)
      grow = "" if prev is None else (
          f"  per extra layer: temp {(r['temp_bytes'] - prev['temp_bytes']) / (g - prev['gamma']) / r['layer_bytes']:.2f}"
          f" x layer bytes, accessed {(r['bytes_accessed'] - prev['bytes_accessed']) / (g - prev['gamma']) / r['layer_bytes']:.1f} x")
      print(f"{variant:8s} gamma {g}: temp {r['temp_bytes'] / 2**20:8.1f} MiB  accessed "
            f"{r['bytes_accessed'] / 2**30:7.2f} GiB  (layer {r['layer_bytes'] / 2**20:.1f} MiB){grow}", flush=True)
      prev = r
  if args.json:
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
  main()
