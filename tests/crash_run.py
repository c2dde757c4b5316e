"""Helper for tests/test_crash.py: a training run that can SIGKILL itself while a checkpoint is written.

  python tests/crash_run.py OUT_DIR KILL_AT_SAVE [override ...]
KILL_AT_SAVE = n > 0: the n-th checkpoint save starts (orbax writes in the background), then the
process kills itself with SIGKILL before the write is finalised. 0: never.
"""

import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grass_jax import checkpoints, config as config_lib  # noqa: E402
from grass_jax.train import run  # noqa: E402


def main() -> None:
  out, kill_at, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
  original = checkpoints.Checkpointer.save
  calls = []

  def save(self, step, **kw):
    calls.append(step)
    original(self, step, **kw)
    if len(calls) == kill_at:
      pending = [p.name for p in self.directory.iterdir() if "tmp" in p.name]
      print(f"KILLING step={step} unfinished={pending}", flush=True)
      os.kill(os.getpid(), signal.SIGKILL)

  checkpoints.Checkpointer.save = save
  run(config_lib.load(ROOT / "configs" / "tiny-demo.yaml", [f"train.output_dir={out}", *overrides]), progress=False)


if __name__ == "__main__":
  main()
