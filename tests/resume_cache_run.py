"""Helper for tests/test_compile_cache.py: a run stopped after step 2, then resumed in the same process with
JAX's in-memory caches cleared, counting the persistent-cache hits and misses of each.

  python tests/resume_cache_run.py OUT_DIR  ->  prints RESULT<json>
"""

import json
import sys
from pathlib import Path

import jax
from jax import monitoring

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grass_jax import config as config_lib  # noqa: E402
from grass_jax.train import run  # noqa: E402

EVENTS = {"hits": "/jax/compilation_cache/cache_hits", "misses": "/jax/compilation_cache/cache_misses"}


def main() -> None:
  out = Path(sys.argv[1])
  seen: list[str] = []
  monitoring.register_event_listener(lambda name, **_: seen.append(name))
  cfg = config_lib.load(ROOT / "configs" / "tiny-demo.yaml", [
      "model.random_init={model_type: llama, vocab_size: 259, hidden_size: 32, intermediate_size: 48, "
      "num_hidden_layers: 4, num_attention_heads: 2, num_key_value_heads: 1}",
      "train.batch_size=8", "data.train=data/tiny_arithmetic.jsonl", "eval.tasks=[]", "data.max_length=160",
      "data.buckets=[160]", "optim.period=2", "train.max_steps=4", "train.checkpoint_every=0",
      "train.export=false", f"train.output_dir={out}"])
  run(cfg, progress=False, stop_at=2)
  first = {k: seen.count(v) for k, v in EVENTS.items()}
  seen.clear()
  jax.clear_caches()  # as a new process would start: nothing compiled in memory
  summary = run(cfg, resume=True, progress=False)
  resumed = {k: seen.count(v) for k, v in EVENTS.items()}
  print("RESULT" + json.dumps({"first": first, "resumed": resumed, "steps": summary["steps"],
                               "cache_files": len(list((out / "compilation_cache").iterdir()))}))


if __name__ == "__main__":
  main()
