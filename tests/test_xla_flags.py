"""grass_jax.xla_flags: the recommended XLA flags join XLA_FLAGS without overriding the user's."""

import os
import subprocess
import sys

from grass_jax.xla_flags import (DETERMINISTIC, RECOMMENDED, missing_deterministic_flags, use_deterministic_flags,
                                  use_recommended_flags, with_recommended_flags)


def test_recommended_flags_are_added_once_and_a_users_setting_wins():
  assert with_recommended_flags("") == "--xla_gpu_dot_merger_threshold_mb=0"
  assert with_recommended_flags(" --xla_gpu_autotune_level=2 ") == \
      "--xla_gpu_autotune_level=2 --xla_gpu_dot_merger_threshold_mb=0"
  mine = "--xla_gpu_dot_merger_threshold_mb=32 --xla_gpu_autotune_level=2"
  assert with_recommended_flags(mine) == mine
  env = {"XLA_FLAGS": "--xla_gpu_autotune_level=2"}
  assert use_recommended_flags(env) == ["--xla_gpu_dot_merger_threshold_mb=0"]
  assert env["XLA_FLAGS"] == "--xla_gpu_autotune_level=2 --xla_gpu_dot_merger_threshold_mb=0"
  assert use_recommended_flags(env) == [] and env["XLA_FLAGS"].count("dot_merger") == 1
  empty = {}
  assert use_recommended_flags(empty) == ["--xla_gpu_dot_merger_threshold_mb=0"]


def test_this_jaxlib_knows_every_recommended_flag():
  # XLA aborts on a flag it does not know ("Unknown flag in XLA_FLAGS"): a jax upgrade that renames one
  # shows here, not as a crash of every training run.
  env = dict(os.environ, XLA_FLAGS=with_recommended_flags("", {**RECOMMENDED, **DETERMINISTIC}), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                        capture_output=True, text=True, env=env, timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == "3.0", proc.stderr[-2000:]
  assert set(RECOMMENDED) <= {t.lstrip("-").split("=")[0] for t in env["XLA_FLAGS"].split()}
  bogus = dict(env, XLA_FLAGS="--xla_gpu_no_such_flag_grass=1")
  assert subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; jnp.ones(1)"], capture_output=True,
                        env=bogus, timeout=120).returncode != 0  # the check above can fail


def test_after_jax_started_nothing_changes(monkeypatch):
  # XLA reads XLA_FLAGS once, at start: a late call leaves the environment alone (on a CPU silently;
  # on a GPU it warns, since the flags would have mattered there).
  import jax
  jax.devices()
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=2")
  assert use_recommended_flags() == []
  assert os.environ["XLA_FLAGS"] == "--xla_gpu_autotune_level=2"


def test_deterministic_flags_are_set_once_and_reported_missing_until_then():
  env = {"XLA_FLAGS": "--xla_gpu_autotune_level=2"}
  assert missing_deterministic_flags(env) == ["--xla_gpu_deterministic_ops=true"]
  assert use_deterministic_flags(env) == ["--xla_gpu_deterministic_ops=true"]
  assert missing_deterministic_flags(env) == [] and use_deterministic_flags(env) == []
  # a user's explicit false is kept (theirs win) and still reported, so a deterministic run refuses to start
  off = {"XLA_FLAGS": "--xla_gpu_deterministic_ops=false"}
  assert use_deterministic_flags(off) == [] and missing_deterministic_flags(off) == ["--xla_gpu_deterministic_ops=true"]


def test_a_gpu_run_without_the_recommended_flags_gets_one_note(monkeypatch, capsys):
  from grass_jax import train as train_lib
  from grass_jax.xla_flags import RECOMMENDED, missing_recommended_flags
  mine = "--xla_gpu_dot_merger_threshold_mb=32"  # a value of the user's own counts as set
  assert missing_recommended_flags({"XLA_FLAGS": mine}) == []
  assert missing_recommended_flags({}) == [f"--{k}={v}" for k, v in RECOMMENDED.items()]
  monkeypatch.setattr(train_lib.jax, "default_backend", lambda: "gpu")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1")
  train_lib._note_missing_flags()
  assert capsys.readouterr().err.count("note: XLA_FLAGS lacks --xla_gpu_dot_merger_threshold_mb=0") == 1
  monkeypatch.setenv("XLA_FLAGS", mine)
  train_lib._note_missing_flags()
  assert capsys.readouterr().err == ""
