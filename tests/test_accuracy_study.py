"""The accuracy study's pipeline (pre-train, fine-tune with each method, score) at tiny scale."""

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.accuracy.tasks import arith, pattern

ROOT = Path(__file__).resolve().parents[1]


def test_tasks_are_deterministic_and_well_formed():
  assert arith(5, 1) == arith(5, 1) and pattern(5, 1) == pattern(5, 1)
  for r in pattern(50, 3):
    k = int(r["answer"][-1])
    shown = r["instruction"].split(f"Answer{k}: ")[1].split()[0]
    seq = [int(x) for x in r["instruction"].split(": ")[1].split(", ?")[0].split(", ")]
    assert int(shown) == seq[-1] + (seq[1] - seq[0])
  for r in arith(50, 3):
    assert r["output"].endswith(f"The answer is {r['answer']}.")


def test_tiny_study_runs_all_methods(tmp_path):
  out = tmp_path / "acc.json"
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy" / "study.py"), "--scale", "tiny",
                         "--work", str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True,
                        cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = json.loads(out.read_text())["table"]
  assert [t["method"] for t in table] == ["full", "lisa", "grass"]
  assert all(0.0 <= t["accuracy_mean"] <= 1.0 for t in table)
