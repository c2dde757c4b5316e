"""Answer extraction, accuracy bookkeeping and the evaluate script on a tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from grass_jax import evaluate as ev
from grass_jax.data import ByteTokenizer
from grass_jax.models import config_from_hf, init_params
from grass_jax.pretrained import save_pretrained

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("task, text, want", [
    ("boolq", "The correct answer is true.", "true"),
    ("piqa", "the answer is solution2 because", "solution2"),
    ("siqa", "answer3", "answer3"),
    ("hellaswag", "ending4 ending1", "ending4"),
    ("winogrande", "option1", "option1"),
    ("arc-e", "I think answer5", "answer5"),
    ("gsm8k", "He pays 1,250 + 50 = 1,300 dollars. The answer is 1,300.", "1300"),
    ("SVAMP", "no number here", ""),
    ("aqua", "Let's see. The answer is C", "C"),
    ("MultiArith", "-3.5 then 12.", "12"),
])
def test_extract_answer(task, text, want):
  assert ev.extract_answer(task, text) == want


def test_is_correct_and_task_names():
  assert ev.is_correct("gsm8k", "1300", "1,300") and ev.is_correct("AddSub", "12.", 12)
  assert not ev.is_correct("gsm8k", "", "3") and not ev.is_correct("boolq", "true", "false")
  assert ev.canonical_task("OBQA") == "openbookqa"
  with pytest.raises(ValueError, match="unknown task 'gsm9k'"):
    ev.canonical_task("gsm9k")


def test_accuracy_counts_with_a_model_that_copies_the_gold(monkeypatch):
  records = [{"instruction": f"q{i}", "output": "", "answer": str(i)} for i in range(5)]
  fake = [f"The answer is {i}" if i % 2 == 0 else "no idea" for i in range(5)]
  monkeypatch.setattr(ev, "generate_texts", lambda *a, **k: fake)
  summary, rows = ev.evaluate(None, None, None, "gsm8k", records)
  assert summary == {"task": "gsm8k", "examples": 5, "correct": 3, "accuracy": 0.6}
  assert [r["correct"] for r in rows] == [True, False, True, False, True]


def _tiny_model(tmp_path):
  cfg = config_from_hf({"model_type": "llama", "vocab_size": 259, "hidden_size": 32, "intermediate_size": 48,
                        "num_hidden_layers": 2, "num_attention_heads": 2, "eos_token_id": 2})
  params = init_params(cfg, jax.random.PRNGKey(0))
  save_pretrained(params, cfg, tmp_path / "model")
  return params, cfg


def test_batched_generation_equals_one_by_one(tmp_path, monkeypatch):
  # Three prompts and a batch of 64: one batch of 4 rows (the next power of two), not 61 filler rows.
  params, cfg = _tiny_model(tmp_path)
  tok = ByteTokenizer()
  prompts = ["What is 1 + 1?", "A much longer question about apples and pears?", "Hi"]
  rows, generate = [], ev.greedy_generate
  monkeypatch.setattr(ev, "greedy_generate", lambda p, c, tokens, *a, **k: (rows.append(tokens.shape[0]),
                                                                            generate(p, c, tokens, *a, **k))[1])
  batched = ev.generate_texts(params, cfg, tok, prompts, batch_size=64, max_new_tokens=6, buckets=[64])
  assert rows == [4]
  single = [ev.generate_texts(params, cfg, tok, [p], batch_size=1, max_new_tokens=6, buckets=[64])[0]
            for p in prompts]
  assert batched == single


def test_generation_stops_once_every_row_has_ended_and_gives_the_full_length_tokens():
  # A 4-token vocabulary: every end token ends some rows early, and for some prompts every row. The output must be
  # the full-length decode with each row's tokens after its first end token replaced by it (what the scan gave).
  import jax.numpy as jnp
  import numpy as np
  from grass_jax.generate import greedy_generate
  cfg = config_from_hf({"model_type": "llama", "vocab_size": 4, "hidden_size": 16, "intermediate_size": 32,
                        "num_hidden_layers": 2, "num_attention_heads": 2})
  stopped_early = 0
  for seed in range(6):
    params = init_params(cfg, jax.random.PRNGKey(seed))
    tokens = jax.random.randint(jax.random.PRNGKey(seed + 10), (3, 5), 0, 4)
    mask = jnp.ones_like(tokens).at[0, :2].set(0)
    full = np.asarray(greedy_generate(params, cfg, tokens, mask, 12))  # no end token: all 12 steps
    for eos in range(4):
      want = full.copy()
      for row in want:
        hit = np.nonzero(row == eos)[0]
        if len(hit):
          row[hit[0]:] = eos
      np.testing.assert_array_equal(greedy_generate(params, cfg, tokens, mask, 12, eos_token_id=eos), want)
      stopped_early += bool((want == eos).all(axis=0).any())
  assert stopped_early >= 6  # the early stop ran, not only the full-length path


def test_evaluate_script_writes_predictions_and_summary(tmp_path):
  _tiny_model(tmp_path)
  data = tmp_path / "test.jsonl"
  data.write_text("\n".join(json.dumps({"instruction": f"What is {i} + 1?", "input": "", "output": "",
                                        "answer": str(i + 1)}) for i in range(5)))
  proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", str(tmp_path / "model"),
                         "--task", "gsm8k", "--data", str(data), "--tokenizer", "bytes", "--max-new-tokens", "4",
                         "--dtype", "float32", "--out", str(tmp_path / "eval")],
                        capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads((tmp_path / "eval" / "gsm8k_summary.json").read_text())
  rows = [json.loads(l) for l in (tmp_path / "eval" / "gsm8k_predictions.jsonl").read_text().splitlines()]
  assert len(rows) == 5 and {"generation", "prediction", "answer", "correct"} <= set(rows[0])
  # the summary is the rows': each row correct exactly when its prediction is its answer (GSM8K: numbers)
  assert all(r["correct"] == (r["prediction"] != "" and abs(float(r["prediction"]) - float(r["answer"])) < 1e-3)
             for r in rows)
  assert summary["examples"] == 5 and summary["accuracy"] == sum(r["correct"] for r in rows) / 5
  bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", str(tmp_path / "nope"),
                        "--task", "gsm8k"], capture_output=True, text=True, cwd=ROOT, env={"HF_HUB_OFFLINE": "1",
                        "PATH": "/usr/bin:/bin"}, timeout=600)
  assert bad.returncode == 2 and "error:" in bad.stderr


def test_test_sets_need_an_answer_not_an_output(tmp_path):
  from grass_jax.data import DataError
  from grass_jax.evaluate import load_task_records
  good = tmp_path / "good.json"
  good.write_text(json.dumps([{"instruction": "1+1?", "input": "", "answer": 2}, {"instruction": "x", "answer": "3"}]))
  assert [r["answer"] for r in load_task_records("gsm8k", str(good))] == [2, "3"]
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps([{"instruction": "1+1?"}]))
  with pytest.raises(DataError, match="'answer' \\(or 'output'\\)"):
    load_task_records("gsm8k", str(bad))


@pytest.mark.parametrize("args, message", [
    (["--model", "runs/nowhere/hf_model", "--task", "gsm8k"], "runs/nowhere/hf_model: no such directory"),
    (["--model", "m", "--task", "gsm9k"], "unknown task 'gsm9k'"),
    (["--model", "m", "--task", "gsm8k", "boolq", "--data", "x.jsonl"], "give a single --task"),
    (["--model", "m", "--task", "gsm8k", "--batch-size", "0"], "--batch-size must be >= 1; got 0"),
    (["--model", "m", "--task", "gsm8k", "--limit", "-1"], "--limit must be >= 1"),
    (["--model", "{model}", "--task", "gsm8k", "--data", "data/missing.jsonl"],
     "data file 'data/missing.jsonl' does not exist"),
    (["--model", "{model}/config.json", "--task", "gsm8k"], "is a file; pass the checkpoint directory"),
])
def test_evaluate_script_errors_are_one_line(tmp_path, args, message, monkeypatch, capsys):
  # Errors a user can cause: one line naming the problem, exit code 2, no traceback, no hub retries.
  # (The script's main() in this process: a fresh interpreter per case cost CI ~2 s each; the real command
  # line runs in test_evaluate_script_writes_predictions_and_summary.)
  _tiny_model(tmp_path)
  args = [a.replace("{model}", str(tmp_path / "model")) for a in args]
  code, err = _evaluate_main([*args, "--tokenizer", "bytes"], monkeypatch, capsys)
  assert code == 2, err[-2000:]
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err[-2000:]


def _evaluate_main(args, monkeypatch, capsys):
  """``scripts/evaluate.py ARGS`` run from the repository root in this process: (exit code, stderr)."""
  from scripts import evaluate as evaluate_script
  monkeypatch.chdir(ROOT)
  monkeypatch.setattr(sys, "argv", ["evaluate.py", *args])
  capsys.readouterr()
  code = evaluate_script.main()
  return code, capsys.readouterr().err


@pytest.mark.parametrize("damage, message", [
    (lambda m: (m / "config.json").write_text("{garbage"), "config.json is not valid JSON"),
    (lambda m: (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:1000]),
     "model.safetensors cannot be read"),
    (lambda m: (m / "model.safetensors").write_bytes(b"\x00" * 64), "model.safetensors cannot be read"),
])
def test_a_damaged_model_is_one_line_naming_the_file(tmp_path, damage, message, monkeypatch, capsys):
  _tiny_model(tmp_path)
  damage(tmp_path / "model")
  code, err = _evaluate_main(["--model", str(tmp_path / "model"), "--task", "gsm8k", "--tokenizer", "bytes"],
                             monkeypatch, capsys)
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 1 and message in lines[0], err[-2000:]
  assert "export or download it again" in lines[0]


def test_eval_options_are_checked_once_and_keywords_replace_their_fields():
  import dataclasses
  o = ev.EvalOptions(batch_size=8, buckets=[256, 64])
  assert o.buckets == (64, 256) and ev.EvalOptions().buckets == (128, 256, 512, 1024)
  with pytest.raises(ValueError, match="prompt_format must be 'alpaca', 'chat' or 'plain'; got 'alpacca'"):
    ev.evaluate(None, None, None, "gsm8k", [{"instruction": "q", "answer": "1"}], o, prompt_format="alpacca")
  with pytest.raises(ValueError, match="batch_size must be an int >= 1; got 0"):
    dataclasses.replace(o, batch_size=0)
  with pytest.raises(ValueError, match="max_new_tokens"):
    ev.generate_texts(None, None, None, ["q"], o)  # generation needs a length; evaluate picks the task's
