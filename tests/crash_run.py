"""Helper for tests/test_crash.py: a training run that can SIGKILL itself while a checkpoint is written.

  python tests/crash_run.py OUT_DIR KILL_AT_SAVE [override ...]
KILL_AT_SAVE = n > 0: the n-th checkpoint save is written (orbax writes in the background into a temporary
directory), and the process kills itself with SIGKILL at the moment orbax would commit it (the rename of the
temporary directory to the step's name): always mid-write, never just after. 0: never. With SIGNAL_AT_STEP=n:NAME in
the environment (e.g. 7:SIGINT) the process sends itself that signal once step n is dispatched, and runs
as scripts/train.py does (its exit code and message).
"""

import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grass_jax import checkpoints, config as config_lib, train  # noqa: E402
from grass_jax.train import run  # noqa: E402


def main() -> None:
  out, kill_at, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
  original = checkpoints.Checkpointer.save
  calls, target = [], []
  real_rename = os.rename

  def rename(src, dst, *args, **kwargs):
    # orbax commits a checkpoint by renaming its temporary directory to the step's name
    if target and Path(dst).name == str(target[0]) and Path(src).name != str(target[0]):
      print(f"KILLING step={target[0]} before its commit, unfinished={Path(src).name}", flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    return real_rename(src, dst, *args, **kwargs)

  def save(self, step, **kw):
    calls.append(step)
    if len(calls) == kill_at:
      target.append(step)
    original(self, step, **kw)

  os.rename = rename
  checkpoints.Checkpointer.save = save
  if os.environ.get("SIGNAL_AT_STEP"):
    at, name = os.environ["SIGNAL_AT_STEP"].split(":")
    step_once = train.Trainer.train_step

    def train_step(self, batch):
      step_once(self, batch)
      if self.state.step == int(at):
        print(f"SIGNALLING step={at}", flush=True)
        os.kill(os.getpid(), getattr(signal, name))
    train.Trainer.train_step = train_step
    # through the command line itself: its exit code and its one-line message are what is tested
    from scripts import train as train_script
    sys.argv = ["train.py", "--no-progress", "--config", str(ROOT / "configs" / "tiny-demo.yaml"),
                f"train.output_dir={out}", *overrides]
    sys.exit(train_script.main())
  run(config_lib.load(ROOT / "configs" / "tiny-demo.yaml", [f"train.output_dir={out}", *overrides]), progress=False)


if __name__ == "__main__":
  main()
