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


def test_the_run_cache_stores_programs_even_after_an_earlier_compile(tmp_path):
  # In a fresh process without the test session's cache: something compiles first (which makes JAX
  # decide on its cache), then the run's cache is set, and the next program lands in it.
  code = (
      "import sys, jax, jax.numpy as jnp; from pathlib import Path\n"
      "from grass_jax.compile_cache import use_compilation_cache\n"
      "jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready()\n"
      "print(use_compilation_cache(Path(sys.argv[1])))\n"
      "jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()\n")
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache")], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == str(tmp_path / "cache")
  assert any((tmp_path / "cache").iterdir()), "nothing was written to the run's cache"


def test_a_resume_reads_the_train_step_back_from_the_runs_cache(tmp_path):
  # The run's own cache (train.compilation_cache), outside the session's: the first run compiles the step and
  # stores it; the resume, with JAX's in-memory caches cleared as in a new process, reads it back and
  # compiles nothing that the cache keeps. (Two processes would cost the suite a second start-up.)
  import json
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR",
                                                           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                                                           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")}
  proc = subprocess.run([sys.executable, str(ROOT / "tests" / "resume_cache_run.py"), str(tmp_path / "run")],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  result = next((json.loads(l[6:]) for l in proc.stdout.splitlines() if l.startswith("RESULT")), None)
  assert result is not None, proc.stderr[-3000:]
  assert result["steps"] == 4 and result["cache_files"] >= 1, result
  assert result["first"]["misses"] >= 1, result  # the step was compiled and stored ...
  assert result["resumed"] == {"hits": result["first"]["misses"], "misses": 0}, result  # ... and read back
