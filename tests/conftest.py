"""One persistent XLA compilation cache for the whole test session (both workers and the runs they
start in subprocesses): many tests compile the same small train steps, and a compiled step is read
back instead of compiled again (the suite: 7m20 without, 5m29 with, on 2 cores). The cache lives in
a fresh directory per session, removed at the end, so nothing stale is ever read; set
GRASS_TEST_NO_CACHE=1 to compile everything."""

import os
import shutil
import tempfile

import pytest

_OWNER = False
if not os.environ.get("GRASS_TEST_NO_CACHE") and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  # Set before jax is imported; xdist workers and subprocesses inherit it, so all share one directory.
  _OWNER = True
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="grass_jax_test_xla_cache_")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# GGUF tokenizers converted once per session (grass_jax.tokenizer_cache), in a directory of the session's own,
# never the user's ~/.cache: a run of the suite neither reads nor leaves entries there.
_OWN_TOKENIZER_CACHE = "GRASS_JAX_CACHE" not in os.environ
if _OWN_TOKENIZER_CACHE:
  os.environ["GRASS_JAX_CACHE"] = tempfile.mkdtemp(prefix="grass_jax_test_cache_")

# LLVM's expensive optimisation passes cost compile time that the suite's small programs never win back
# (test_train_step.py: 104 -> 93 s on 2 cores; the demo's training steps run as fast, and still
# reach 100%). Set before jax is imported; workers and subprocesses inherit it. A flag you set yourself wins.
LLVM_FLAG = "--xla_llvm_disable_expensive_passes=true"
if (os.environ.get("GRASS_TEST_DEFAULT_FLAGS") != "1"
    and "xla_llvm_disable_expensive_passes" not in os.environ.get("XLA_FLAGS", "")):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {LLVM_FLAG}".strip()
# Most tests compile more than they run. Compiled for speed of compiling (XLA's optimisation level 0, and the
# CPU's older loop emitters instead of its fusion emitters), test_train_step.py's 579 compilations take 14 s
# (65 s at level 0 alone, measured 2026-12-04). The code runs about twice as slowly, which costs only the tests
# that train for long: the README's demo runs in a process of its own without these flags (test_quick_start.py).
# A flag you set yourself wins; GRASS_TEST_FAST_COMPILE=0 runs without them.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
# Tests marked `default_flags` compare numbers to the last bits, and must hold in the compile mode a user's run
# has: the main session skips them and tests/test_default_flags.py runs them all in one process at XLA's
# default flags, which is this variable set (set it yourself to run one of them alone).
DEFAULT_FLAGS_SESSION = os.environ.get("GRASS_TEST_DEFAULT_FLAGS") == "1"


def default_xla_flags(flags: str) -> str:
  """``flags`` without any the suite added: what a user's process has."""
  return " ".join(f for f in flags.split() if f not in (*FAST_COMPILE_FLAGS, LLVM_FLAG))


def _add_fast_compile_flags() -> None:
  import subprocess
  import sys
  mine = os.environ.get("XLA_FLAGS", "")
  extra = [f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in mine]
  if not extra:  # already set: by you, or by the xdist controller for its workers
    return
  flags = " ".join([mine, *extra]).strip()
  probe = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; jnp.ones(2).block_until_ready()"],
                         env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                         timeout=300)
  if probe.returncode != 0:  # a silent drop would test another compile mode than the one the suite claims
    raise RuntimeError(f"this jaxlib rejects the test suite's compile flags {' '.join(extra)} "
                       f"({probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else 'no message'}); "
                       "run the tests with GRASS_TEST_FAST_COMPILE=0, or update FAST_COMPILE_FLAGS in tests/conftest.py")
  os.environ["XLA_FLAGS"] = flags


if DEFAULT_FLAGS_SESSION:
  os.environ["XLA_FLAGS"] = default_xla_flags(os.environ.get("XLA_FLAGS", ""))
elif os.environ.get("GRASS_TEST_FAST_COMPILE", "1") != "0":
  _add_fast_compile_flags()


@pytest.fixture(autouse=True)
def _no_cache_means_none_between_tests():
  """With GRASS_TEST_NO_CACHE=1, a training run's own cache (<output_dir>/compilation_cache, which the trainer
  sets process-wide) ends with its test, so later tests still compile everything."""
  yield
  if os.environ.get("GRASS_TEST_NO_CACHE"):
    import jax
    from jax.experimental.compilation_cache import compilation_cache
    if jax.config.jax_compilation_cache_dir:
      jax.config.update("jax_compilation_cache_dir", None)
      compilation_cache.reset_cache()


def pytest_unconfigure(config):
  if _OWNER:  # the process that made the directory (the xdist controller) removes it last
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
  if _OWN_TOKENIZER_CACHE:
    shutil.rmtree(os.environ["GRASS_JAX_CACHE"], ignore_errors=True)


# The longest files first (measured 2026-12-03, seconds on 2 cores): xdist hands out work in collection
# order, and a long file collected last leaves one worker running alone at the end.
_LONGEST_FIRST = ["test_default_flags.py", "test_quick_start.py", "test_smollm2.py", "test_importance_measurement.py", "test_sharding.py",
                  "test_accuracy_study.py", "test_crash.py", "test_bucketed_stack.py", "test_resume.py"]


def pytest_configure(config):
  config.addinivalue_line("markers", "default_flags: compares numbers to the last bits; runs at XLA's default "
                                     "flags only (tests/test_default_flags.py)")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
  if not DEFAULT_FLAGS_SESSION and "xla_backend_optimization_level=0" in os.environ.get("XLA_FLAGS", ""):
    skip = pytest.mark.skip(reason="checked at XLA's default flags by tests/test_default_flags.py "
                                   "(GRASS_TEST_DEFAULT_FLAGS=1 runs it alone)")
    for item in items:
      if item.get_closest_marker("default_flags"):
        item.add_marker(skip)
