"""Controlled accuracy study: pre-train a small Llama, then fine-tune it with full FT, LISA and GRASS.

  python benchmarks/accuracy/study.py --scale gpu [--out benchmarks/results/accuracy.json]

1. Pre-train a small Llama (byte tokenizer) on a synthetic corpus (full fine-tuning, all tokens).
2. Fine-tune the same checkpoint on each downstream task (benchmarks/accuracy/tasks.py) with each
   method, at equal steps and the same gamma, for several seeds (scripts/train.py's library code).
3. Greedy-decode the held-out test set and score it (grass_jax.evaluate).
Prints a table (accuracy mean and spread, peak memory, time) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SCALES = {
    # model size, pre-training / fine-tuning steps and batch, pre-training window, fine-tuning
    # length (the Alpaca prompt alone is ~170 byte tokens), task sizes, seeds
    "tiny": dict(hidden=32, layers=4, heads=2, pretrain_steps=8, finetune_steps=4, batch=4, seq=64,
                 n_train=32, n_test=4, ft_len=384, seeds=[0], tasks=["pattern"], methods=["full", "lisa", "grass"]),
    "gpu": dict(hidden=512, layers=12, heads=8, pretrain_steps=1500, finetune_steps=450, batch=32, seq=256,
                n_train=4000, n_test=300, ft_len=384, seeds=[0, 1, 2], tasks=["arith", "pattern"],
                methods=["full", "lisa", "grass"]),
}


def pretrain(scale: dict, out: Path, log) -> Path:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import grass_jax
  from benchmarks.accuracy.tasks import corpus
  from grass_jax.data import ByteTokenizer
  from grass_jax.models import config_from_hf, init_params
  from grass_jax.train import LAYERS, make_train_step

  cfg = config_from_hf({"model_type": "llama", "vocab_size": 259, "hidden_size": scale["hidden"],
                        "intermediate_size": scale["hidden"] * 8 // 3 // 8 * 8, "num_hidden_layers": scale["layers"],
                        "num_attention_heads": scale["heads"], "num_key_value_heads": scale["heads"],
                        "max_position_embeddings": 2048, "eos_token_id": 2, "bos_token_id": 1, "pad_token_id": 0})
  tok = ByteTokenizer()
  stream = []
  for doc in corpus(scale["pretrain_steps"] * scale["batch"] * 8, seed=123):
    stream.extend(tok.encode(doc) + [tok.eos_token_id])
  stream = np.array(stream, np.int32)
  params = init_params(cfg, jax.random.PRNGKey(0))
  sched = optax.warmup_cosine_decay_schedule(0.0, 1e-3, max(scale["pretrain_steps"] // 20, 1), scale["pretrain_steps"])
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   grass_jax.full(optax.adamw(1.0, weight_decay=0.01), layers=LAYERS), optax.scale_by_schedule(sched))
  state = tx.init(params)
  params, state = jax.device_put((params, state), jax.devices()[0])
  step = make_train_step(cfg, tx, dtype=jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32)
  rng = np.random.default_rng(0)
  b, t = scale["batch"], scale["seq"]
  t0 = time.perf_counter()
  for i in range(scale["pretrain_steps"]):
    starts = rng.integers(0, len(stream) - t, size=b)
    tokens = np.stack([stream[s:s + t] for s in starts])[None]
    batch = {"tokens": tokens, "attention_mask": np.ones_like(tokens), "loss_mask": np.ones_like(tokens)}
    params, state, m = step(params, state, batch)
    if (i + 1) % max(scale["pretrain_steps"] // 10, 1) == 0:
      log(f"pretrain step {i + 1}: loss {float(m['loss']):.3f}")
  path = out / "pretrained"
  grass_jax.save_pretrained(params, cfg, path)
  log(f"pretrained {cfg.num_params() / 1e6:.1f}M params in {time.perf_counter() - t0:.0f}s -> {path}")
  return path


def finetune_and_eval(scale: dict, model_dir: Path, task: str, method: str, seed: int, out: Path) -> dict:
  import jax

  from benchmarks.accuracy.tasks import TASKS
  from grass_jax import config as config_lib
  from grass_jax.data import ByteTokenizer
  from grass_jax.evaluate import evaluate
  from grass_jax.pretrained import load_pretrained
  from grass_jax.train import run

  make, scorer = TASKS[task]
  data_dir = out / "data"
  data_dir.mkdir(parents=True, exist_ok=True)
  train_file = data_dir / f"{task}_train.jsonl"
  if not train_file.exists():
    train_file.write_text("\n".join(json.dumps(r) for r in make(scale["n_train"], seed=1)))
  test = make(scale["n_test"], seed=2)
  run_dir = out / "runs" / f"{task}-{method}-s{seed}"
  cfg = config_lib.from_dict({
      "model": {"path": str(model_dir), "tokenizer": "bytes", "dtype": "float32",
                "compute_dtype": "bfloat16" if jax.default_backend() == "gpu" else "float32"},
      "data": {"train": str(train_file), "max_length": scale["ft_len"], "buckets": [scale["ft_len"]],
               "shuffle_seed": seed},
      "optim": {"strategy": method, "num_active": 2, "period": 10, "learning_rate": 3e-4 if method == "full"
                else 1e-3, "warmup_ratio": 0.05, "max_grad_norm": 1.0},
      "train": {"epochs": 1000, "max_steps": scale["finetune_steps"], "batch_size": scale["batch"], "seed": seed,
                "log_every": max(scale["finetune_steps"] // 5, 1), "checkpoint_every": 0,
                "output_dir": str(run_dir), "export": True},
  })
  import shutil
  shutil.rmtree(run_dir, ignore_errors=True)
  t0 = time.perf_counter()
  summary = run(cfg, progress=False)
  train_s = time.perf_counter() - t0
  peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")  # training only: read before eval
  params, mcfg = load_pretrained(run_dir / "hf_model")
  result, _ = evaluate(params, mcfg, ByteTokenizer(), scorer, test, batch_size=64, max_new_tokens=64)
  return {"task": task, "method": method, "seed": seed, "accuracy": result["accuracy"],
          "final_loss": summary["final_loss"], "train_s": train_s, "peak_bytes": peak or None}


def finetune_isolated(scale_name: str, model_dir: Path, task: str, method: str, seed: int, out: Path) -> dict:
  """:func:`finetune_and_eval` in a fresh process, so its peak device memory is its own."""
  import os
  import subprocess
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  cmd = [sys.executable, __file__, "--scale", scale_name, "--work", str(out), "--one", task, method, str(seed)]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT"):
      return json.loads(line[len("RESULT"):])
  raise RuntimeError(f"fine-tuning run {task}/{method}/seed {seed} failed:\n{proc.stderr[-3000:]}")


def summarize(rows: list[dict], scale: dict) -> list[dict]:
  """Accuracy mean and spread, time and peak memory per (task, method) over the finished seeds."""
  table = []
  for task in scale["tasks"]:
    for method in scale["methods"]:
      rs = [r for r in rows if r["task"] == task and r["method"] == method]
      if not rs:
        continue
      accs = [r["accuracy"] for r in rs]
      table.append({"task": task, "method": method, "accuracy_mean": statistics.mean(accs),
                    "accuracy_std": statistics.pstdev(accs), "seeds": len(accs),
                    "train_s_mean": statistics.mean(r["train_s"] for r in rs),
                    "peak_gib": max((r["peak_bytes"] or 0) for r in rs) / 2**30})
  return table


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--scale", choices=sorted(SCALES), default="gpu")
  ap.add_argument("--work", default="runs/accuracy-study",
                  help="work dir; finished runs are recorded in rows.jsonl there and skipped on a re-run")
  ap.add_argument("--out", default="benchmarks/results/accuracy.json")
  ap.add_argument("--budget-s", type=float, default=None,
                  help="start no new fine-tuning run after this many seconds (re-run to continue)")
  ap.add_argument("--one", nargs=3, metavar=("TASK", "METHOD", "SEED"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  t_start = time.perf_counter()
  scale = SCALES[args.scale]
  work = Path(args.work)
  work.mkdir(parents=True, exist_ok=True)
  log = lambda msg: print(msg, flush=True)
  import jax
  # Runs of one method share their step executables: compile each once.
  jax.config.update("jax_compilation_cache_dir", str(work / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  model_dir = work / "pretrained"
  if args.one:
    task, method, seed = args.one
    print("RESULT" + json.dumps(finetune_and_eval(scale, model_dir, task, method, int(seed), work)), flush=True)
    return
  if not (model_dir / "config.json").exists():
    model_dir = pretrain(scale, work, log)
  rows_file = work / "rows.jsonl"
  rows = [json.loads(l) for l in rows_file.read_text().splitlines()] if rows_file.exists() else []
  done = {(r["task"], r["method"], r["seed"]) for r in rows}
  todo = [(t, m, s) for t in scale["tasks"] for m in scale["methods"] for s in scale["seeds"] if (t, m, s) not in done]
  for task, method, seed in todo:
    if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
      log(f"budget of {args.budget_s:.0f}s spent; {len(todo) - (len(rows) - len(done))} runs left, re-run to continue")
      break
    r = finetune_isolated(args.scale, model_dir, task, method, seed, work)
    rows.append(r)
    with rows_file.open("a") as f:
      f.write(json.dumps(r) + "\n")
    log(json.dumps(r))
  table = summarize(rows, scale)
  print(f"\n{'task':<9}{'method':<7}{'accuracy':>16}{'seeds':>6}{'train s':>9}{'peak GiB':>9}")
  for t in table:
    print(f"{t['task']:<9}{t['method']:<7}{t['accuracy_mean']:>10.3f} ± {t['accuracy_std']:.3f}{t['seeds']:>6}"
          f"{t['train_s_mean']:>9.1f}{t['peak_gib']:>9.2f}")
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  complete = len(rows) == len(scale["tasks"]) * len(scale["methods"]) * len(scale["seeds"])
  out.write_text(json.dumps({"scale": args.scale, "config": scale, "complete": complete,
                             "device": jax.devices()[0].device_kind, "rows": rows, "table": table}, indent=2))


if __name__ == "__main__":
  main()
