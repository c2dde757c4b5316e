"""The README's main job, run exactly as written: the CPU demo learns numbers it never saw."""

import json
import os
import subprocess
import sys
from pathlib import Path

from grass_jax.data import ByteTokenizer, load_tokenizer
from grass_jax.pretrained import load_pretrained
from tests.conftest import FAST_COMPILE_FLAGS

ROOT = Path(__file__).resolve().parents[1]


def _run_script(script: str, *args: str) -> str:
  # A process of its own, compiled as a user's run is: the demo trains for 250 steps, which run twice as
  # long compiled the way the rest of the suite is (tests/conftest.py).
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f not in FAST_COMPILE_FLAGS]
  env = dict(os.environ, XLA_FLAGS=" ".join(flags))
  p = subprocess.run([sys.executable, f"scripts/{script}", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  return p.stdout


def test_quick_start_demo_learns_held_out_numbers(tmp_path):
  # The README's main job exactly as written (scripts/train.py, default config): the held-out accuracy it
  # prints is what the README says (100%; the untrained model gets 0%).
  out = _run_script("train.py", "--no-progress", f"train.output_dir={tmp_path}")
  summary = json.loads((tmp_path / "summary.json").read_text())
  # 100% here; another CPU's float rounding may flip an answer or two.
  assert summary["steps"] == 250 and summary["eval/boolq_accuracy"] >= 0.95
  assert f"accuracy on data/tiny_parity_test.jsonl (boolq scoring): {summary['eval/boolq_accuracy']:.1%}" in out
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_lines = [l for l in lines if "mean_loss" in l]
  assert train_lines[-1]["step"] == 250 and train_lines[-1]["mean_loss"] < 0.05 * train_lines[0]["mean_loss"]
  assert {"loss", "lr", "grad_norm", "tokens_per_s", "active_layers", "importance", "probabilities"} <= set(lines[0])
  assert (tmp_path / "layer_probabilities.png").stat().st_size > 1000
  assert list((tmp_path / "tensorboard").iterdir())
  params, mcfg = load_pretrained(tmp_path / "hf_model")
  assert mcfg.num_layers == 6
  assert isinstance(load_tokenizer(None, str(tmp_path / "hf_model")), ByteTokenizer)  # marked beside the model
  # The README's next command scores the exported model again, without naming a tokenizer (the exported
  # byte tokenizer is found beside the model).
  _run_script("evaluate.py", "--model", str(tmp_path / "hf_model"), "--task", "boolq",
              "--data", "data/tiny_parity_test.jsonl", "--max-new-tokens", "24", "--dtype", "float32",
              "--out", str(tmp_path / "rescored"))
  rescored = json.loads((tmp_path / "rescored" / "boolq_summary.json").read_text())
  assert rescored["examples"] == 200 and rescored["accuracy"] == summary["eval/boolq_accuracy"]
