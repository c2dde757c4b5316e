"""Helper for tests/test_sharding.py: runs in a process with 4 CPU devices (XLA_FLAGS set by the test).

  python tests/sharded_run.py OUT_DIR  ->  prints one JSON line with the comparisons
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grass_jax import config as config_lib  # noqa: E402
from grass_jax.sharding import FSDP  # noqa: E402
from grass_jax.transform import find_state  # noqa: E402
from grass_jax.train import run  # noqa: E402

MODEL = ("model.random_init={model_type: llama, vocab_size: 259, hidden_size: 64, intermediate_size: 128, "
         "num_hidden_layers: 4, num_attention_heads: 4, num_key_value_heads: 2}")


def cfg(out: Path, mesh: dict, offload: bool, *extra: str):
  return config_lib.load(ROOT / "configs" / "tiny-demo.yaml", [
      MODEL, f"train.output_dir={out}", "train.batch_size=8", "train.max_steps=8", "train.checkpoint_every=0",
      # optim.eps: the scale on which the two runs are compared (test_sharding.py)
      "train.log_every=1", "optim.eps=0.1", "data.train=data/tiny_arithmetic.jsonl", "eval.tasks=[]",
      "data.max_length=160",
      "data.buckets=[160]", "optim.period=2",
      "model.dtype=float32", "model.compute_dtype=float32", f"optim.offload_optimizer_state={str(offload).lower()}",
      *[f"mesh.{k}={v}" for k, v in mesh.items()], "train.export=false", *extra])


# The default strategy (LISA by modules: module-form slot buffers, a backward branch per module); one layer's
# worth, so that its 2 drawn layers fit the 4-layer model.
DEFAULT = ("optim.strategy=lisa", "optim.num_active=1")


def compare(ref: dict, r: dict, ref_dir: Path, run_dir: Path) -> dict:
  """What test_sharding.py checks of a mesh run against its single-device reference."""
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(ref["params"]), jax.tree.leaves(r["params"])))
  scale = max(float(np.max(np.abs(np.asarray(a)))) for a in jax.tree.leaves(ref["params"]))
  s_ref, s = find_state(ref["opt_state"]), find_state(r["opt_state"])
  lines = lambda d: [{k: json.loads(l).get(k) for k in ("active_layers", "active_modules")}
                     for l in (d / "metrics.jsonl").read_text().splitlines()]
  return {
      "max_param_diff": diff, "param_scale": scale,
      "max_grad_norm": max(json.loads(l)["grad_norm"] for l in (ref_dir / "metrics.jsonl").read_text().splitlines()),
      "same_layer_draws": lines(ref_dir) == lines(run_dir),
      "same_final_active": np.asarray(s_ref.active).tolist() == np.asarray(s.active).tolist(),
      "active_replicated": bool(s.active.sharding.is_fully_replicated),
      "devices_used": len(jax.tree.leaves(r["params"])[0].sharding.device_set),
      "fsdp_sharded_leaves": sum(FSDP in str(x.sharding.spec) for x in jax.tree.leaves(r["params"])),
      "loss": [r["final_loss"], ref["final_loss"]],
      "modules_logged": any(l["active_modules"] for l in lines(run_dir)),
  }


def main() -> None:
  out = Path(sys.argv[1])
  assert len(jax.devices()) == 4, jax.devices()
  result = {}
  # One single-device reference, without offloading: offloading changes no number (tests/test_offload.py).
  # One mesh with both axes (CI time: 2 runs; a data-only mesh of 4 ran here until 2026-12-03): the batch split
  # over the data axis, the weights and their host states over fsdp.
  ref = run(cfg(out / "single", {"data": 1, "fsdp": 1}, False), progress=False, return_state=True)
  for name, mesh, offload in [("data2_fsdp2", {"data": 2, "fsdp": 2}, True)]:
    r = run(cfg(out / f"{name}-{offload}", mesh, offload), progress=False, return_state=True)
    result[f"{name}-offload{offload}"] = compare(ref, r, out / "single", out / f"{name}-{offload}")
    s = find_state(r["opt_state"])
    # Stopped after step 5 (inside a period) and resumed on the same mesh: the checkpoint's shards come back
    # where they were, host states included, and the run ends bitwise where the straight one did.
    stopped = out / f"{name}-{offload}-resumed"
    run(cfg(stopped, mesh, offload), progress=False, stop_at=5)
    resumed = run(cfg(stopped, mesh, offload), resume=True, progress=False, return_state=True)
    same = lambda a, b: all(np.array_equal(np.asarray(x), np.asarray(y))
                            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    result[f"{name}-offload{offload}"].update(
        resume_bitwise=same(r["params"], resumed["params"]) and same(r["opt_state"], resumed["opt_state"])
        and all(same(r["layer_states"][l], resumed["layer_states"][l]) for l in r["layer_states"]),
        resumed_steps=resumed["steps"],
        resumed_sharding_kept=all(x.sharding == y.sharding for x, y in
                                  zip(jax.tree.leaves(r["params"]), jax.tree.leaves(resumed["params"]))))
    if offload:  # an inactive layer's state: in host memory, laid out like its device copy
      inactive = next(l for l in r["layer_states"] if l not in np.asarray(s.active).tolist())
      host = jax.tree.leaves(r["layer_states"][inactive])
      result[f"{name}-offload{offload}"].update(
          host_kinds=sorted({x.sharding.memory_kind for x in host}),
          host_fsdp_leaves=sum(FSDP in str(x.sharding.spec) for x in host))
  ref = run(cfg(out / "single-default", {"data": 1, "fsdp": 1}, False, *DEFAULT), progress=False, return_state=True)
  r = run(cfg(out / "mesh-default", {"data": 2, "fsdp": 2}, False, *DEFAULT), progress=False, return_state=True)
  result["data2_fsdp2-default"] = compare(ref, r, out / "single-default", out / "mesh-default")
  print("RESULT" + json.dumps(result))


if __name__ == "__main__":
  main()
