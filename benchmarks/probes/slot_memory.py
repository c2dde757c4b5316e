"""Compiled (XLA) temp memory and bytes accessed of the train step per active-layer count, no GPU needed.

  python benchmarks/probes/slot_memory.py [--hidden 1024 --layers 8 --batch 1 --seq 128]

Lowers and compiles the GRASS train step with abstract inputs on the default backend and prints
``memory_analysis().temp_size_in_bytes`` and ``cost_analysis()['bytes accessed']`` for each gamma:
the growth per extra active layer, without running anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def measure(hidden: int, layers: int, batch: int, seq: int, gamma: int, frozen_grads: str) -> dict:
  import jax
  import jax.numpy as jnp
  import optax

  import grass_jax
  from grass_jax.models import config_from_hf, init_params
  from grass_jax.train import LAYERS, make_train_step

  cfg = config_from_hf(dict(model_type="llama", vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                            num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128))
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16))
  tx = grass_jax.strategy("grass", optax.adam(1e-4), layers=LAYERS, num_active=gamma, period=10, offload=True,
                          always_on=False)
  state = jax.eval_shape(tx.init, params)
  step = make_train_step(cfg, tx, dtype=jnp.bfloat16, remat="full", frozen_grads=frozen_grads, attention="einsum")
  tok = jax.ShapeDtypeStruct((1, batch, seq), jnp.int32)
  compiled = step.lower(params, state, {"tokens": tok, "attention_mask": tok, "loss_mask": tok}).compile()
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  layer_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params["layers"])) // layers
  return {"gamma": gamma, "temp_bytes": mem.temp_size_in_bytes, "bytes_accessed": cost.get("bytes accessed"),
          "flops": cost.get("flops"), "layer_bytes": layer_bytes}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--hidden", type=int, default=1024)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--gammas", type=int, nargs="+", default=[1, 2, 4])
  ap.add_argument("--frozen-grads", default="cond")
  args = ap.parse_args()
  prev = None
  for g in args.gammas:
    r = measure(args.hidden, args.layers, args.batch, args.seq, g, args.frozen_grads)
    grow = "" if prev is None else (f"  per extra layer: temp {(r['temp_bytes'] - prev['temp_bytes']) / (g - prev['gamma']) / r['layer_bytes']:.2f}"
                                    f" x layer bytes, accessed {(r['bytes_accessed'] - prev['bytes_accessed']) / (g - prev['gamma']) / r['layer_bytes']:.1f} x")
    print(f"gamma {g}: temp {r['temp_bytes'] / 2**20:8.1f} MiB  accessed {r['bytes_accessed'] / 2**30:7.2f} GiB"
          f"  (layer {r['layer_bytes'] / 2**20:.1f} MiB){grow}", flush=True)
    prev = r


if __name__ == "__main__":
  main()
