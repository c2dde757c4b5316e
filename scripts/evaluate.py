"""Accuracy of a (fine-tuned) model on LLM-Adapters' commonsense and math test sets.

  python scripts/evaluate.py --model runs/x/hf_model --task gsm8k [--data dataset/gsm8k/test.json]

Writes <out>/<task>_predictions.jsonl (generation, extracted answer, gold, correct) and
<out>/<task>_summary.json. Several --task values run one after another.
"""

import argparse
import json
import sys

import jax.numpy as jnp

from grass_jax import gguf_checkpoint
from grass_jax.data import load_tokenizer
from grass_jax.errors import USER_ERRORS
from grass_jax.evaluate import evaluate, load_task_records, write_results
from grass_jax.tasks import TASKS, canonical_task
from grass_jax.pretrained import load_pretrained
from grass_jax.xla_flags import use_recommended_flags


def default_out(model: str) -> str:
  """``<model>/eval`` for a checkpoint directory; ``runs/eval-<name>`` for a GGUF file."""
  if gguf_checkpoint.is_gguf(model):
    return f"runs/eval-{gguf_checkpoint.resolve(model).stem}"
  return f"{model}/eval"


def argument_problem(args: argparse.Namespace) -> str | None:
  """What is wrong with the arguments, in one line naming the fix; None when nothing is."""
  if args.data and len(args.task) > 1:
    return "--data names one test set: give a single --task with it"
  for task in args.task:
    try:
      canonical_task(task)
    except ValueError as e:
      return str(e)
  for flag in ("batch_size", "max_new_tokens", "limit"):
    value = getattr(args, flag)
    if value is not None and value < 1:
      return f"--{flag.replace('_', '-')} must be >= 1; got {value}"
  return None


def main() -> int:
  use_recommended_flags()  # before JAX starts its backend (grass_jax.xla_flags)
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", required=True, help="HF checkpoint directory or hub id, or a GGUF model "
                  "(file, directory, or package:<module>/<file>.gguf)")
  ap.add_argument("--task", required=True, nargs="+", help=f"one or more of: {', '.join(TASKS)}")
  ap.add_argument("--data", help="test file/dir/hub id (default: dataset/<task>/test.json); one task only")
  ap.add_argument("--tokenizer", help="tokenizer dir/hub id, or 'bytes' (default: the model's)")
  ap.add_argument("--out", default=None, help="output directory (default: <model>/eval)")
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--max-new-tokens", type=int, default=None, help="default: 32 commonsense, 256 math")
  ap.add_argument("--limit", type=int, default=None, help="first N examples only")
  ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
  ap.add_argument("--prompt-format", choices=["alpaca", "chat", "plain"], default="alpaca",
                  help="how a question is asked: the Alpaca prompt, a user turn in the tokenizer's chat template "
                       "(for a model trained on chat records), or the instruction as it is")
  ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
  args = ap.parse_args()
  problem = argument_problem(args)
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    return 2
  try:
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    params, config = load_pretrained(args.model, dtype=dtype)
    tokenizer = load_tokenizer(args.tokenizer, args.model)
    results = []
    for task in args.task:
      records = load_task_records(task, args.data, args.limit)
      summary, rows = evaluate(params, config, tokenizer, task, records, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, dtype=dtype, progress=True,
                               prompt_format=args.prompt_format)
      write_results(args.out or default_out(args.model), summary, rows)
      results.append(summary)
  except (*USER_ERRORS, ValueError, OSError) as e:  # (a model's config may raise a plain ValueError too)
    if args.debug:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(results, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
