"""Fine-tune a Llama-family model with GRASS (or LISA / full fine-tuning).

  python scripts/train.py [--config configs/tiny-demo.yaml] [section.key=value ...] [--resume]

Outputs in train.output_dir: metrics.jsonl, tensorboard/, layer_probabilities.png,
checkpoints/ (orbax), hf_model/ (a Hugging Face checkpoint), summary.json.
"""

import argparse
import json
import sys

from grass_jax import config as config_lib
from grass_jax.errors import USER_ERRORS
from grass_jax.train import Interrupted, run
from grass_jax.xla_flags import use_deterministic_flags, use_recommended_flags


def is_out_of_memory(e: BaseException) -> bool:
  """Whether XLA ran out of device memory (its RESOURCE_EXHAUSTED error; the type differs between jax versions)."""
  return "RESOURCE_EXHAUSTED" in str(e) and "memory" in str(e).lower()


def first_line(e: BaseException, limit: int = 160) -> str:
  text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def main() -> int:
  use_recommended_flags()  # before JAX starts its backend (grass_jax.xla_flags)
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="configs/tiny-demo.yaml", help="YAML config (see configs/); default: the CPU demo")
  ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
  ap.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
  ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
  ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.num_active=4")
  args = ap.parse_intermixed_args()  # flags may follow the overrides
  try:
    cfg = config_lib.load(args.config, args.overrides)
  except config_lib.ConfigError as e:
    if args.debug:
      raise
    print(f"config error: {e}", file=sys.stderr)
    return 2
  if cfg.train.deterministic:
    use_deterministic_flags()  # still before JAX starts: loading the config runs no computation
  try:
    summary = run(cfg, resume=args.resume, progress=not args.no_progress)
  except USER_ERRORS as e:
    if args.debug:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Interrupted as e:  # before the catch-all below, which would re-raise it
    print(e, file=sys.stderr)
    return 128 + e.signum  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM
  except Exception as e:  # noqa: BLE001 -- only an out-of-memory error is turned into one line
    if args.debug or not is_out_of_memory(e):
      raise
    print(f"error: out of device memory ({first_line(e)}). Lower train.batch_size or data.max_length, set "
          "model.remat: full or optim.offload_optimizer_state: true; --debug shows the traceback", file=sys.stderr)
    return 2
  print(json.dumps(summary, indent=2))
  for task in cfg.eval.tasks:  # the summary holds eval/<task>_accuracy for each evaluated task
    if f"eval/{task}_accuracy" in summary:
      print(f"accuracy on {cfg.eval.data or task} ({task} scoring): {summary[f'eval/{task}_accuracy']:.1%}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
