"""Kill training with SIGKILL (while a checkpoint is being written, and at random moments), then resume.

No corrupt checkpoint is picked up, and the resumed run ends with exactly the parameters and
optimizer state of a run that was never interrupted (nothing before the last complete checkpoint
is lost).
"""

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from grass_jax import config as config_lib
from grass_jax.checkpoints import Checkpointer
from grass_jax.train import run

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.random_init={model_type: llama, vocab_size: 259, hidden_size: 32, intermediate_size: 48, "
         "num_hidden_layers: 4, num_attention_heads: 2, num_key_value_heads: 1}",
         "train.batch_size=8", "data.train=data/tiny_arithmetic.jsonl", "eval.tasks=[]",
         "data.max_length=160", "data.buckets=[160]", "optim.period=3",
         "optim.offload_optimizer_state=true", "train.log_every=1", "train.export=false"]


# Module fixture: the whole file on one xdist worker (--dist loadgroup), the straight run trained once.
pytestmark = pytest.mark.xdist_group("crash")
STEPS = 12


def _cfg(out, steps, every):
  return config_lib.load(ROOT / "configs" / "tiny-demo.yaml",
                         [*SMALL, f"train.output_dir={out}", f"train.max_steps={steps}", f"train.checkpoint_every={every}"])


def _overrides(steps, every):
  return [*SMALL, f"train.max_steps={steps}", f"train.checkpoint_every={every}"]


def _assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])
  jax.tree.map(np.testing.assert_array_equal, a["opt_state"], b["opt_state"])
  for l in a["layer_states"]:
    jax.tree.map(np.testing.assert_array_equal, a["layer_states"][l], b["layer_states"][l])


def _resume_and_check(out, straight, steps):
  latest = Checkpointer(out / "checkpoints").latest_step()
  resumed = run(_cfg(out, steps, 0), resume=True, progress=False, return_state=True)
  assert resumed["steps"] == steps
  _assert_same(straight, resumed)
  logged = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
  assert logged == sorted(set(logged)), "metrics.jsonl repeats steps after the resume"
  return latest


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The run never interrupted (checkpoints change no number, so it saves none)."""
  return run(_cfg(tmp_path_factory.mktemp("straight"), STEPS, 0), progress=False, return_state=True)


def test_kill_while_a_checkpoint_is_written(tmp_path, straight):
  steps, every = STEPS, 2
  out = tmp_path / "killed"
  proc = subprocess.run([sys.executable, str(ROOT / "tests" / "crash_run.py"), str(out), "3", *_overrides(steps, every)],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == -9, proc.stderr[-3000:]
  # Killed when orbax was about to commit step 6: its files are written, the commit is not.
  assert "KILLING step=6 before its commit" in proc.stdout, proc.stdout[-2000:]
  ckpt = Checkpointer(out / "checkpoints")
  assert ckpt.latest_step() == 4 and 6 not in ckpt.manager.all_steps()
  assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("6") and p.name != "6"], \
      "no unfinished write of step 6 left behind: the kill did not land mid-write"
  ckpt.close()
  _resume_and_check(out, straight, steps)


@pytest.mark.parametrize("seed", [0])
def test_kill_at_a_random_moment(tmp_path, seed, straight):
  steps, every = STEPS, 1
  out = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "crash_run.py"), str(out), "0", *_overrides(steps, every)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  # The kill lands after a random step, measured by the run's own progress (not a fixed sleep, which a fast
  # host outruns), at a random moment of the next step or of its checkpoint's write. Early in the run: the
  # killed run writes a checkpoint at every step, the resumed one none.
  rng = random.Random(seed)
  after = rng.randint(3, 8)
  deadline = time.time() + 300
  metrics = out / "metrics.jsonl"
  while not metrics.exists() or len(metrics.read_text().splitlines()) < after:
    assert proc.poll() is None and time.time() < deadline, "the training run ended before the kill"
    time.sleep(0.01)
  time.sleep(rng.uniform(0.0, 0.05))
  proc.kill()
  assert proc.wait(timeout=60) == -9, "the run finished before the kill: nothing was tested"
  assert len(metrics.read_text().splitlines()) < STEPS, "the run trained every step before the kill"
  # The kill may land in a checkpoint's write: then the resume starts from the one before.
  _resume_and_check(out, straight, steps)


def test_ctrl_c_saves_the_step_says_how_to_continue_and_resumes_bitwise(tmp_path, straight):
  import os
  out = tmp_path / "interrupted"
  # checkpoint_every 0: no checkpoint before the end, so the one resumed from is the interruption's.
  proc = subprocess.run([sys.executable, str(ROOT / "tests" / "crash_run.py"), str(out), "0", *_overrides(STEPS, 0)],
                        capture_output=True, text=True, timeout=600, env=dict(os.environ, SIGNAL_AT_STEP="7:SIGINT"))
  assert proc.returncode == 130, proc.stderr[-3000:]
  assert "SIGNALLING step=7" in proc.stdout
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("interrupted (SIGINT) at step 7; saved a checkpoint") and "with --resume" in last, last
  assert Checkpointer(out / "checkpoints").latest_step() == 7
  logged = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
  assert logged == list(range(1, 8))  # the interrupted step's metrics are written too
  assert _resume_and_check(out, straight, STEPS) == 7


def test_stop_signals_defer_the_first_signal_and_restore_handlers():
  import os
  import signal

  from grass_jax.train import StopSignals
  before = signal.getsignal(signal.SIGTERM)
  with StopSignals() as signals:
    os.kill(os.getpid(), signal.SIGTERM)
    assert signals.received == signal.SIGTERM  # Python runs handlers between bytecodes: delivered by now
    os.kill(os.getpid(), signal.SIGINT)  # a SIGINT after a SIGTERM is deferred too
    assert signals.received == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C stops at once
      time.sleep(1)
  assert signal.getsignal(signal.SIGTERM) is before
