"""The run's persistent compilation cache: used when nothing else is configured, never over the user's."""

import os
import subprocess
import sys
from pathlib import Path

from grass_jax.compile_cache import use_compilation_cache

ROOT = Path(__file__).resolve().parents[1]


def test_a_cache_set_in_the_environment_wins(tmp_path):
  assert use_compilation_cache(tmp_path / "run", {"JAX_COMPILATION_CACHE_DIR": "/elsewhere"}) == Path("/elsewhere")
  assert not (tmp_path / "run").exists()


def test_the_run_cache_holds_the_step_and_a_resumed_run_compiles_nothing_new(tmp_path):
  # docs/training.md: --resume reads the step back from <output_dir>/compilation_cache. Two fresh processes,
  # without the test session's cache; each compiles something before the run sets its cache. With every
  # program cached (min compile time 0), a train step the resume compiled anew would add an entry of its own.
  code = (
      "import sys; from grass_jax import config; from grass_jax.train import run\n"
      "cfg = config.load('configs/tiny-demo.yaml', ['model.random_init={model_type: llama, vocab_size: 259, "
      "hidden_size: 32, intermediate_size: 48, num_hidden_layers: 4, num_attention_heads: 2, "
      "num_key_value_heads: 1}', 'train.batch_size=8', 'data.train=data/tiny_arithmetic.jsonl', 'eval.tasks=[]', "
      "'data.max_length=160', 'data.buckets=[160]', 'optim.period=2', 'train.max_steps=4', "
      "'train.checkpoint_every=2', 'train.export=false', 'train.output_dir=' + sys.argv[1]])\n"
      "import logging; logging.basicConfig(); logging.getLogger('jax._src.compiler').setLevel(logging.DEBUG)\n"
      # something compiles before the run sets its cache (JAX decides on its cache at the first compile)
      "import jax, jax.numpy as jnp; jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready()\n"
      "run(cfg, resume=sys.argv[2] == 'resume', progress=False, stop_at=None if sys.argv[2] == 'resume' else 2)\n")
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  out = tmp_path / "run"
  entries, logs = [], []
  for mode in ("start", "resume"):
    proc = subprocess.run([sys.executable, "-c", code, str(out), mode], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries.append(sorted(p.name for p in (out / "compilation_cache").iterdir()))
    logs.append(proc.stderr)
  steps = [[e for e in names if e.startswith("jit_step-")] for names in entries]
  assert len(steps[0]) == 1, f"the first run cached no train step: {entries[0]}"
  # The resume read the train step back; what it compiled anew is the end of the run's small eager ops
  # (the first run stopped before them), never a step.
  assert steps[1] == steps[0], f"the resume compiled another train step: {steps}"
  assert "cache hit for 'jit_step'" not in logs[0] and "cache hit for 'jit_step'" in logs[1], logs[1][-2000:]
