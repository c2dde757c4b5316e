"""What module granularity costs against LISA by layers: step time and the compiled step's temporary memory, by
layers (2 slots) and by modules (4 slots: each forming its module's weight gradients only, in module-form buffers
that hold the leaves each slot trains and no others), on one random Llama, in one process, the same batch. A
sanity check on whatever backend runs it; the GPU's answer is `benchmarks/peers.py`'s `-modules` rows.

  python benchmarks/probes/module_backward.py --out benchmarks/results/probes/module_backward_cpu.json

It also compiles (without running: the weights are abstract) the step the peers' 7B default rows run, by modules
and by layers (the same spec through the same assembly: Llama-2-7B's shapes, bf16, batch 2 x 512, embeddings
frozen), and records the compiled step's temporary bytes. XLA:CPU assigns buffers far less tightly than XLA:GPU
(its absolute numbers are not the GPU's peak): compare rows.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def measure(cfg, modules: bool, steps: int) -> dict:
  """Mean seconds of a train step after its compilation (embeddings trained: the backward reaches layer 0), and
  the compiled step's temporary bytes (XLA's buffer assignment)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import grass_jax
  from grass_jax import models
  from grass_jax.module_sampling import ATTENTION_MLP
  from grass_jax.train_step import LAYERS, StepOptions, make_train_step
  from grass_jax.transform import strategy_settings
  settings = strategy_settings("lisa", layers=LAYERS, num_active=4 if modules else 2, period=steps + 1, seed=0,
                               modules=ATTENTION_MLP if modules else None)
  tx = optax.chain(optax.clip_by_global_norm(1.0), grass_jax.transform(optax.adamw(1e-3), settings))
  step = make_train_step(cfg, tx, StepOptions(dtype=jnp.float32, grass=settings, donate=False))
  params = models.init_params(cfg, jax.random.PRNGKey(1))
  state = tx.init(params)
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.vocab_size, size=(1, 8, 256)).astype(np.int32))
  batch = {"tokens": tokens, "attention_mask": jnp.ones_like(tokens), "loss_mask": jnp.ones_like(tokens)}
  temp = step.lower(params, state, batch).compile().memory_analysis().temp_size_in_bytes
  params, state, _ = step(params, state, batch)
  jax.block_until_ready(params)
  start = time.perf_counter()
  for _ in range(steps):
    params, state, _ = step(params, state, batch)
  jax.block_until_ready(params)
  return {"seconds": (time.perf_counter() - start) / steps, "temp_bytes": temp}


def llama2_7b_temp_bytes(modules: bool) -> tuple[int, int]:
  """The temporary bytes of the step the peers' ``7b-jax-default-modules`` / ``-layers`` rows run (built by
  :func:`grass_jax.assembly.assemble` from the same spec; compiled only, on abstract weights), and one layer's
  bytes. On the GPU the row's peak is its arguments plus these temporaries (its ``memory_phases``)."""
  import jax
  import jax.numpy as jnp

  from benchmarks.common import spec_config
  from benchmarks.peers import PLAN
  from grass_jax.ahead_of_time import abstract
  from grass_jax.assembly import assemble
  spec = dict(dict(PLAN)["7b-jax-default-modules" if modules else "7b-jax-default-layers"], period=20)  # peers --period
  parts = assemble(spec_config(spec), total_steps=200)
  tokens = jax.ShapeDtypeStruct((1, spec["batch"], spec["seq"]), jnp.int32)
  batch = {"tokens": tokens, "attention_mask": tokens, "loss_mask": tokens}
  compiled = parts.step.step.lower(abstract(parts.param_shapes), abstract(parts.state_shapes), batch).compile()
  layers = parts.param_shapes["layers"].values()
  return compiled.memory_analysis().temp_size_in_bytes, sum(math.prod(x.shape[1:]) * x.dtype.itemsize for x in layers)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--steps", type=int, default=4)
  ap.add_argument("--out", type=Path)
  args = ap.parse_args()
  import jax

  from benchmarks.common import provenance
  from grass_jax.models import llama
  cfg = llama.config_from_hf({"model_type": "llama", "vocab_size": 256, "hidden_size": 512,
                              "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 8,
                              "num_key_value_heads": 8})
  rows = {"layers": measure(cfg, False, args.steps), "modules": measure(cfg, True, args.steps)}
  layer_bytes = 4 * sum(math.prod(shape[1:]) for shape in cfg.param_shapes()["layers"].values())
  base = rows["layers"]
  for name, r in rows.items():
    print(f"{name:8s} {r['seconds']:.3f} s/step  {r['seconds'] / base['seconds']:.2f}x LISA by layers;  temporaries "
          f"{r['temp_bytes'] / 2**20:.1f} MiB ({(r['temp_bytes'] - base['temp_bytes']) / layer_bytes:+.2f} layers)")
  measured = {name: llama2_7b_temp_bytes(name == "modules") for name in rows}
  seven_b, layer_7b = {name: b for name, (b, _) in measured.items()}, measured["layers"][1]
  for name, b in seven_b.items():
    print(f"7B {name:8s} compiled temporaries {b / 2**30:.2f} GiB "
          f"({(b - seven_b['layers']) / layer_7b:+.2f} layers)")
  if args.out:
    args.out.write_text(json.dumps({"backend": jax.default_backend(), "steps": args.steps, "rows": rows,
                                    "layer_bytes": layer_bytes, "model": "llama 8 x 512, batch 8 x 256",
                                    "llama2_7b_compiled_temp_bytes": seven_b, "llama2_7b_layer_bytes": layer_7b,
                                    **provenance()}, indent=2) + "\n")


if __name__ == "__main__":
  main()
