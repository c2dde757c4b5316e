"""The accuracy study's pipeline (pre-train, fine-tune with each method, score) at tiny scale."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.accuracy.tasks import DAYS, arith, extract, pattern, units, weekday, write_splits

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
  assert extract(5, 1) == extract(5, 1)
  for r in extract(50, 3):  # the asked cities' boxes, read back from the log itself
    log, question = r["instruction"].split(" How many boxes were sent to ")
    asked = question.removesuffix(" together?").split(" and ")
    sent = [line.split(" sent ")[1].split(" boxes to ") for line in log.removeprefix("Shipping log: ").split(". ")]
    assert int(r["answer"]) == sum(int(k) for k, city in sent if city.rstrip(".") in asked)
    assert r["output"].endswith(f"The answer is {r['answer']}.")
  for r in weekday(50, 3):
    today = DAYS.index(r["instruction"].split("Today is ")[1].split(".")[0])
    offset = int(r["instruction"].split(" in ")[1].split(" days")[0])
    k = int(r["answer"][-1])
    assert r["instruction"].split(f"Answer{k}: ")[1].split()[0] == DAYS[(today + offset) % 7]


def test_tiny_study_runs_end_to_end(tmp_path):
  out = tmp_path / "acc.json"
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy" / "study.py"), "--scale", "tiny",
                         "--work", str(tmp_path / "work"), "--out", str(out), "--parallel", "0"],
                        capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  table = result["table"]
  assert [t["method"] for t in table] == ["pretrained", "grass_sketch"]
  by_method = {r["method"]: r["accuracy"] for r in result["rows"]}  # one seed: the mean is the row's
  assert all(t["accuracy_mean"] == by_method[t["method"]] for t in table)
  assert all(t["seeds"] == 1 for t in table[1:])
  assert {"task", "method", "seed", "lr", "accuracy", "peak_bytes", "seconds", "tail_loss", "device", "commit",
          "time"} <= set(result["rows"][1])
  assert (out.parent / "acc_heatmap_weekday.png").exists() and (out.parent / "acc_mgn.png").exists()
  # each run's checkpoints go once it is scored (40 runs of SmolLM2 filled a 64 GB disk)
  assert not list((tmp_path / "work" / "runs").glob("*/checkpoints"))
  assert list((tmp_path / "work" / "runs").glob("*/metrics.jsonl"))


def test_units_answers_are_the_problem_worked_out_and_never_training_problems(tmp_path):
  import re
  from fractions import Fraction
  assert units(5, 1) == units(5, 1)
  for r in units(200, 3):  # read back from the question alone, in exact arithmetic
    per, count, size = (int(x) for x in re.search(
        r"takes (\d+) .* do (\d+) \w+ take\? \(1 \w+ = (\d+) ", r["instruction"]).groups())
    assert Fraction(r["answer"]) == Fraction(per * count, size)  # exact: no answer is rounded
    assert r["output"].endswith(f"The answer is {r['answer']}.")
  paths = write_splits("units", tmp_path, n_train=400, n_val=50, n_test=100)
  read = lambda split: [json.loads(l)["instruction"] for l in Path(paths[split]).read_text().splitlines()]
  train = set(read("train"))
  assert len(read("test")) == 100 and len(read("val")) == 50
  assert not train & set(read("test")) and not train & set(read("val"))


def test_study_picks_the_best_validation_lr_then_runs_the_other_seeds():
  from benchmarks.accuracy.study import chosen_lr, jobs
  scale = {"tasks": ["arith"], "methods": ["lisa"], "seeds": [0, 1, 2], "lrs": {"lisa": [1e-4, 3e-4]}}
  base = {"task": "arith", "method": "pretrained", "seed": 0, "lr": 0.0, "accuracy": 0.0}
  assert [j["lr"] for j in jobs(scale, [base])] == [1e-4, 3e-4]  # the grid first, seed 0
  grid = [dict(task="arith", method="lisa", seed=0, lr=lr, val_accuracy=v, accuracy=0.5)
          for lr, v in ((1e-4, 0.4), (3e-4, 0.6))]
  assert chosen_lr([base, grid[0]], "arith", "lisa", scale) is None  # grid incomplete
  assert chosen_lr([base, *grid], "arith", "lisa", scale) == 3e-4
  todo = jobs(scale, [base, *grid])
  assert [(j["seed"], j["lr"], j["splits"]) for j in todo] == [(1, 3e-4, ["test"]), (2, 3e-4, ["test"])]
  # `--seeds 2 6` runs seeds 2 and 6 (the first named seed was once taken for the grid's and skipped)
  assert [j["seed"] for j in jobs({**scale, "seeds": [2, 6]}, [base, *grid])] == [2, 6]


def test_a_method_with_one_lr_runs_only_its_own_seeds():
  from benchmarks.accuracy.study import jobs
  base = {"task": "arith", "method": "pretrained", "seed": 0, "lr": 0.0, "accuracy": 0.0}
  scale = {"tasks": ["arith"], "methods": ["lisa", "grass"], "seeds": [0, 1], "lrs": {"lisa": [6e-4], "grass": [6e-4]},
           "seeds_by_method": {"lisa": [0, 1, 2, 3]}}
  todo = [(j["method"], j["seed"], j["splits"]) for j in jobs(scale, [base])]
  assert todo == [("lisa", 0, ["val", "test"]), ("grass", 0, ["val", "test"]), ("lisa", 1, ["test"]),
                  ("lisa", 2, ["test"]), ("lisa", 3, ["test"]), ("grass", 1, ["test"])]
  # Seeds 8-15 of a study whose seeds 0-7 ran elsewhere: no seed 0 (there is no learning rate to choose).
  later = {**scale, "seeds": [8, 9], "seeds_by_method": {}}
  assert [(j["method"], j["seed"]) for j in jobs(later, [base])] == [("lisa", 8), ("lisa", 9), ("grass", 8), ("grass", 9)]


def test_pool_survives_a_result_larger_than_a_pipe(tmp_path, monkeypatch, capsys):
  # A run's RESULT line with a long importance trace is over 64 KiB (71 KB for the probing variants
  # on SmolLM2); read only at exit through a pipe, it blocked the run for ever.
  import argparse
  import signal

  import jax

  from benchmarks.accuracy import study
  scale = {"tasks": ["arith"], "methods": ["lisa"], "seeds": [0], "lrs": {"lisa": [1e-4]}}
  row = {"task": "arith", "method": "lisa", "seed": 0, "lr": 1e-4, "accuracy": 0.5, "seconds": 1.0}
  base = {"task": "arith", "method": "pretrained", "seed": 0, "lr": 0.0, "accuracy": 0.0, "seconds": 0.0}
  (tmp_path / "rows.jsonl").write_text(json.dumps(base) + "\n")
  child = (f"import json, sys; sys.stderr.write('w' * 200_000 + chr(10)); "
           f"print('RESULT' + json.dumps({{'row': {row!r}, 'trace': {{**{row!r}, 'log': ['x' * 300_000]}}}}))")
  monkeypatch.setattr(study, "job_command", lambda args, work, job: [sys.executable, "-c", child])
  args = argparse.Namespace(parallel=2, budget_s=None, scale="tiny", methods=None, seeds=None, tasks=None,
                            compile_cache=False, oom_retry_until_s=None)
  signal.alarm(60)  # a blocked run fails the test instead of hanging it
  try:
    study.run_pool(args, scale, tmp_path)
  finally:
    signal.alarm(0)
  rows = [json.loads(l) for l in (tmp_path / "rows.jsonl").read_text().splitlines()]
  assert rows[-1] == row
  assert f"runs on {jax.devices()[0].device_kind}:" in capsys.readouterr().out  # the card, asked of a process of its own
  assert len(json.loads((tmp_path / "traces.jsonl").read_text())["log"][0]) == 300_000
  assert (tmp_path / "logs" / "arith-lisa-0-0.0001.log").stat().st_size > 500_000


def test_pool_runs_a_run_that_ran_out_of_memory_once_more_when_half_the_gpu_is_free(tmp_path, monkeypatch):
  # At 20 runs on one H100, 3 ran out of device memory while scoring; each costs a call to re-run.
  import argparse
  import signal

  from benchmarks.accuracy import study
  scale = {"tasks": ["arith"], "methods": ["lisa", "grass"], "seeds": [0], "lrs": {"lisa": [1e-4], "grass": [1e-4]}}
  base = {"task": "arith", "method": "pretrained", "seed": 0, "lr": 0.0, "accuracy": 0.0, "seconds": 0.0}
  (tmp_path / "rows.jsonl").write_text(json.dumps(base) + "\n")

  def command(args, work, job):
    row = {**{k: job[k] for k in ("task", "method", "seed", "lr")}, "accuracy": 0.5, "seconds": 1.0}
    marker = work / f"tried-{job['method']}"
    # lisa runs out of memory the first time, grass every time
    child = (f"import json, pathlib, sys; m = pathlib.Path({str(marker)!r}); first = not m.exists(); m.touch()\n"
             f"if first or {job['method'] == 'grass'}: print('RESOURCE_EXHAUSTED: Out of memory'); sys.exit(1)\n"
             f"print('RESULT' + json.dumps({{'row': {row!r}}}))")
    return [sys.executable, "-c", child]

  monkeypatch.setattr(study, "job_command", command)
  monkeypatch.setattr(study, "this_card", lambda env: "cpu")  # asked of jax in test_pool_survives_a_result_...
  args = argparse.Namespace(parallel=2, budget_s=0.5, scale="tiny", methods=None, seeds=None, tasks=None,
                            compile_cache=False, oom_retry_until_s=60.0)
  signal.alarm(60)
  try:
    study.run_pool(args, scale, tmp_path)
  finally:
    signal.alarm(0)
  rows = [json.loads(l) for l in (tmp_path / "rows.jsonl").read_text().splitlines()]
  assert [r["method"] for r in rows] == ["pretrained", "lisa"]  # lisa again, past --budget-s; grass only once more
  assert (tmp_path / "tried-grass").exists()
  args.oom_retry_until_s = None  # without it, nothing runs again
  (tmp_path / "tried-lisa").unlink()
  (tmp_path / "rows.jsonl").write_text(json.dumps(base) + "\n")
  args.budget_s = None
  study.run_pool(args, scale, tmp_path)
  assert [json.loads(l)["method"] for l in (tmp_path / "rows.jsonl").read_text().splitlines()] == ["pretrained"]


def test_pool_says_when_more_runs_wait_than_run_before_the_budget_ends(tmp_path, monkeypatch, capsys):
  import argparse

  from benchmarks.accuracy import study
  scale = {"tasks": ["arith"], "methods": ["lisa", "grass", "full"], "seeds": [0],
           "lrs": {"lisa": [1e-4], "grass": [1e-4], "full": [1e-4]}}
  base = {"task": "arith", "method": "pretrained", "seed": 0, "lr": 0.0, "accuracy": 0.0, "seconds": 0.0}
  (tmp_path / "rows.jsonl").write_text(json.dumps(base) + "\n")
  monkeypatch.setattr(study, "job_command", lambda args, work, job: [sys.executable, "-c", "pass"])
  monkeypatch.setattr(study, "this_card", lambda env: "cpu")  # asked of jax in test_pool_survives_a_result_...
  args = argparse.Namespace(parallel=2, budget_s=0.0, scale="tiny", methods=None, seeds=None, tasks=None,
                            compile_cache=False, oom_retry_until_s=None)
  study.run_pool(args, scale, tmp_path)
  out = capsys.readouterr().out
  assert "note: 3 runs to start (a pretrained baseline counts as one), --parallel 2" in out
  assert "budget spent; 3 runs left" in out  # a budget of 0 starts none


def test_dates_task_answers_are_the_calendar_and_options_distinct():
  import datetime

  from benchmarks.accuracy.tasks import MONTHS, dates
  records = dates(300, 5)
  assert records == dates(300, 5)
  crossings = 0
  for r in records:
    start = r["instruction"].split("It is ")[1].split(", 2023")[0]
    offset = int(r["instruction"].split("the date ")[1].split(" days")[0])
    want = datetime.date(2023, MONTHS.index(start.split()[0]) + 1, int(start.split()[1])) + datetime.timedelta(offset)
    options = [o.strip() for o in r["instruction"].split("\n\n")[1].split("Answer")[1:]]
    shown = {o.split(": ")[1] for o in options}
    assert len(shown) == 4  # four distinct dates
    k = int(r["answer"][-1])
    assert options[k - 1] == f"{k}: {MONTHS[want.month - 1]} {want.day}"
    assert r["output"].endswith(f"The date is {MONTHS[want.month - 1]} {want.day}. The correct answer is answer{k}")
    crossings += "days, so" in r["output"]
  assert 0.3 < crossings / len(records) < 0.95  # most problems cross a month boundary, not all


def test_rows_of_another_step_count_neither_skip_nor_enter_the_study():
  from benchmarks.accuracy.study import jobs, summarize
  scale = {"tasks": ["arith"], "methods": ["lisa"], "seeds": [0], "lrs": {"lisa": [3e-4]}, "steps": 750}
  base = {"task": "arith", "method": "pretrained", "seed": 0, "lr": 0.0, "accuracy": 0.01}
  old = dict(task="arith", method="lisa", seed=0, lr=3e-4, val_accuracy=0.9, accuracy=0.87, steps=500, seconds=1.0,
             peak_bytes=None)
  assert [(j["method"], j["seed"]) for j in jobs(scale, [base, old])] == [("lisa", 0)]  # the 500-step row is not it
  assert [t["method"] for t in summarize([base, old], scale)] == ["pretrained"]
  assert [t["accuracy_mean"] for t in summarize([base, {**old, "steps": 750}], scale)] == [0.01, 0.87]



def test_oracle_sets_each_pairs_accuracy_against_its_probing_mgn(tmp_path):
  from benchmarks.accuracy.figures import plot_oracle
  from benchmarks.accuracy.study import SCALES, oracle_analysis, spearman
  assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
  assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
  assert abs(spearman([1, 1, 2, 3], [1, 2, 3, 4]) - 0.9487) < 1e-4  # ties share their mean rank
  scale = SCALES["smollm2_oracle"]
  mgn = [1.0] * 30
  mgn[12], mgn[13], mgn[28], mgn[29] = 3.0, 3.0, 0.2, 0.2
  rows = [{"task": "arith", "method": f"fixed_{i}_{i + 1}", "seed": 0, "lr": 3e-4, "steps": 750,
           "accuracy": 0.5 + i / 100, "val_accuracy": 0.5} for i in range(0, 30, 2)]
  rows += [{"task": "arith", "method": "lisa", "seed": 0, "lr": 3e-4, "steps": 750, "accuracy": 0.9},
           {"task": "arith", "method": "lisa", "seed": 0, "lr": 3e-4, "steps": 500, "accuracy": 0.1}]
  traces = [{"task": "arith", "method": "lisa", "seed": 0, "lr": 3e-4, "log": [{"probing": False, "importance": [0] * 30}]},
            {"task": "arith", "method": "grass", "seed": 0, "lr": 3e-4, "log": [{"probing": True, "importance": mgn}]}]
  o = oracle_analysis(rows, traces, "arith", scale)
  assert o["probe_method"] == "grass" and o["lisa_accuracy"] == 0.9  # 750 steps, not the 500-step study
  assert [p["layers"] for p in o["pairs"]] == [[i, i + 1] for i in range(0, 30, 2)]
  mean = sum(mgn) / 30
  assert abs(o["pairs"][6]["mgn"] - 3.0 / mean) < 1e-9 and o["top_mgn_pair"] == [12, 13]
  assert o["best_pair"] == [28, 29]  # accuracy rises with the layer index here, MGN does not
  expected = spearman([p["mgn"] for p in o["pairs"]], [0.5 + i / 100 for i in range(0, 30, 2)])
  assert o["spearman"] == expected and o["spearman"] < 0
  assert oracle_analysis(rows, traces[:1], "arith", scale) is None  # no probing run: nothing to set against
  assert plot_oracle(o, tmp_path / "o.png").stat().st_size > 1000


def test_paired_differences_against_lisa_by_seed_with_a_t_interval():
  from benchmarks.accuracy.study import paired_vs
  scale = {"tasks": ["a", "b"], "methods": ["lisa", "x"], "lrs": {"lisa": [1e-3], "x": [1e-3]}}
  rows = []
  for task, shift in (("a", 0.02), ("b", -0.01)):
    for seed, acc in enumerate([0.80, 0.70, 0.75]):
      rows.append({"task": task, "method": "lisa", "seed": seed, "lr": 1e-3, "accuracy": acc, "tail_loss": 1.0})
      rows.append({"task": task, "method": "x", "seed": seed, "lr": 1e-3, "accuracy": acc + shift + 0.01 * seed,
                   "tail_loss": 1.5})
  rows.append({"task": "a", "method": "x", "seed": 9, "lr": 1e-3, "accuracy": 0.0, "tail_loss": 9.0})  # unpaired
  out = {p["task"]: p for p in paired_vs(rows, scale)}
  # task a: differences 0.02, 0.03, 0.04 -> mean 0.03, sample std 0.01, t(0.975, 2) = 4.303
  assert out["a"]["seeds"] == 3 and abs(out["a"]["mean_difference"] - 0.03) < 1e-12
  half = 4.302652729911275 * 0.01 / 3 ** 0.5
  assert all(abs(x - y) < 1e-9 for x, y in zip(out["a"]["ci95"], [0.03 - half, 0.03 + half]))
  assert abs(out["a"]["tail_loss_difference"] - 0.5) < 1e-12
  # over the tasks: each seed's mean difference (0.005, 0.015, 0.025)
  assert abs(out["mean"]["mean_difference"] - 0.015) < 1e-12 and out["mean"]["seeds"] == 3


def test_runs_pair_only_on_the_card_they_ran_on():
  # A seed on another card is another run (dates_direct seed 4: 43.2% on an H200, 21.6% on an H100).
  from benchmarks.accuracy.study import paired_vs, summarize
  scale = {"tasks": ["a", "b"], "methods": ["lisa", "x"], "lrs": {m: [1e-3] for m in ("lisa", "x")}}
  row = lambda t, m, s, acc, card: {"task": t, "method": m, "seed": s, "lr": 1e-3, "accuracy": acc, "tail_loss": 1.0,
                                    "device": card}
  rows = [row(t, "lisa", s, 0.5, "H100") for t in "ab" for s in range(3)]
  rows += [row("a", "x", s, 0.6 + 0.01 * s, "H100") for s in range(3)]  # differences 0.10, 0.11, 0.12
  rows += [row("a", "x", 3, 0.9, "H200")]  # no LISA run of seed 3 on the H200 (nor anywhere): no pair
  rows += [row("b", "x", s, 0.9, "H200") for s in range(3)]  # LISA's seeds 0-2 ran on the H100 only: no pairs
  out = {(p["task"], p["method"]): p for p in paired_vs(rows, scale)}
  assert out[("a", "x")]["seeds"] == 3 and abs(out[("a", "x")]["mean_difference"] - 0.11) < 1e-12
  assert ("b", "x") not in out and ("mean", "x") not in out  # cross-card rows never enter a difference
  # LISA on the H200 too, seeds 0 and 1: task b now pairs there (differences 0.3, 0.2) ...
  rows += [row("b", "lisa", 0, 0.6, "H200"), row("b", "lisa", 1, 0.7, "H200")]
  # ... and task a's seed 0 ran on both cards: the mean over tasks takes the mean of its two pairs.
  rows += [row("a", "x", 0, 0.8, "H200"), row("a", "lisa", 0, 0.5, "H200")]  # difference 0.30 on the H200
  out = {(p["task"], p["method"]): p for p in paired_vs(rows, scale)}
  assert out[("b", "x")]["seeds"] == 2 and abs(out[("b", "x")]["mean_difference"] - 0.25) < 1e-12
  table = {(t["task"], t["method"]): t for t in summarize([dict(r, seconds=1.0, peak_bytes=None) for r in rows],
                                                           scale)}
  assert table[("b", "lisa")]["cards"] == ["H100", "H200"] and table[("a", "x")]["seeds"] == 5  # the table says so
  assert out[("a", "x")]["seeds"] == 4  # seeds 0 (both cards), 1, 2
  mean = out[("mean", "x")]  # seeds 0 and 1 ran both tasks: (0.20 + 0.30) / 2 and (0.11 + 0.20) / 2
  assert mean["seeds"] == 2 and abs(mean["mean_difference"] - (0.25 + 0.155) / 2) < 1e-12


def test_a_run_on_another_card_runs_again_and_a_baseline_does_not():
  from benchmarks.accuracy.study import jobs
  scale = {"tasks": ["a"], "methods": ["lisa"], "seeds": [0, 1, 2], "lrs": {"lisa": [1e-3]}}
  base = {"task": "a", "method": "pretrained", "seed": 0, "lr": 0.0, "accuracy": 0.1, "device": "H100"}
  runs = [{"task": "a", "method": "lisa", "seed": 0, "lr": 1e-3, "accuracy": 0.5, "device": "H100"},
          {"task": "a", "method": "lisa", "seed": 1, "lr": 1e-3, "accuracy": 0.5, "device": "H200"},
          {"task": "a", "method": "lisa", "seed": 2, "lr": 1e-3, "accuracy": 0.5}]  # an old row: no card recorded
  assert [j["seed"] for j in jobs(scale, [base, *runs], "H100")] == [1]
  assert [j["seed"] for j in jobs(scale, [base, *runs], "H200")] == [0]
  assert jobs(scale, [base, *runs]) == []  # no card given: every recorded run counts


def test_the_mean_over_tasks_covers_the_tasks_a_method_ran_on_the_seeds_that_ran_them_all():
  from benchmarks.accuracy.study import paired_vs
  scale = {"tasks": ["a", "b", "c"], "methods": ["lisa", "x", "y"], "lrs": {m: [1e-3] for m in ("lisa", "x", "y")}}
  rows = [{"task": t, "method": "lisa", "seed": s, "lr": 1e-3, "accuracy": 0.5} for t in "abc" for s in range(3)]
  rows += [{"task": t, "method": "x", "seed": s, "lr": 1e-3, "accuracy": 0.5 + d}
           for t, d in (("a", 0.1), ("b", 0.3)) for s in range(3)]
  rows += [{"task": "a", "method": "x", "seed": 3, "lr": 1e-3, "accuracy": 0.0}]  # no LISA pair: left out
  rows += [{"task": "b", "method": "y", "seed": s, "lr": 1e-3, "accuracy": 0.6} for s in range(3)]
  rows = [dict(r, tail_loss=1.0) for r in rows]
  out = {(p["task"], p["method"]): p for p in paired_vs(rows, scale)}
  mean = out[("mean", "x")]  # x never ran c: its mean is over a and b, not missing
  assert mean["tasks"] == ["a", "b"] and mean["seeds"] == 3 and abs(mean["mean_difference"] - 0.2) < 1e-12
  assert ("mean", "y") not in out  # one task is no mean
  assert ("mean_chosen", "x") not in out  # no confirmation task in this scale


def test_the_mean_over_the_tasks_chosen_on_leaves_the_confirmation_task_out():
  from benchmarks.accuracy.study import paired_vs
  scale = {"tasks": ["a", "b", "c"], "methods": ["lisa", "x"], "lrs": {m: [1e-3] for m in ("lisa", "x")},
           "confirmation": ["c"]}
  rows = [{"task": t, "method": "lisa", "seed": s, "lr": 1e-3, "accuracy": 0.5, "tail_loss": 1.0}
          for t in "abc" for s in range(3)]
  rows += [{"task": t, "method": "x", "seed": s, "lr": 1e-3, "accuracy": 0.5 + d + 0.01 * s, "tail_loss": 1.0}
           for t, d in (("a", 0.1), ("b", 0.3), ("c", -0.4)) for s in range(3)]
  out = {(p["task"], p["method"]): p for p in paired_vs(rows, scale)}
  # per seed over a, b, c: (0.1 + 0.3 - 0.4) / 3 + 0.01 s; over a and b: 0.2 + 0.01 s
  assert abs(out[("mean", "x")]["mean_difference"] - 0.01) < 1e-12
  chosen = out[("mean_chosen", "x")]
  assert chosen["tasks"] == ["a", "b"] and chosen["seeds"] == 3 and abs(chosen["mean_difference"] - 0.21) < 1e-12


def test_the_bar_is_the_mean_over_the_tasks_chosen_on_and_every_tasks_worst():
  from benchmarks.accuracy.study import against_the_bar, paired_vs
  scale = {"tasks": ["a", "b", "c"], "methods": ["lisa", "x"], "lrs": {m: [1e-3] for m in ("lisa", "x")},
           "confirmation": ["c"]}

  def bar(shifts):  # per task, x's accuracy minus LISA's on seed s: shift + 0.01 * s, seeds 0-2
    rows = [{"task": t, "method": "lisa", "seed": s, "lr": 1e-3, "accuracy": 0.5} for t in "abc" for s in range(3)]
    rows += [{"task": t, "method": "x", "seed": s, "lr": 1e-3, "accuracy": 0.5 + d + 0.01 * s}
             for t, d in zip("abc", shifts) for s in range(3)]
    return against_the_bar(paired_vs(rows, scale), "x")
  # a and b: per seed 0.03 + 0.01 s, mean 0.04 > 0.02, interval above 0; c (confirmation): -0.005 + 0.01 s
  met = bar([0.02, 0.04, -0.015])
  assert met["met"] and met["over"] == ["a", "b"] and met["worst_task"] == "c"
  assert abs(met["margins"]["mean_at_least_2_points"] - 0.02) < 1e-12
  assert abs(met["margins"]["no_task_1_point_below"] - 0.005) < 1e-12  # c's mean -0.005 is above -0.01
  missed = bar([0.02, 0.04, -0.03])  # c's mean is -0.02: 1 point below LISA's -1
  assert not missed["met"] and missed["missed"] == ["no_task_1_point_below"]
  assert abs(missed["margins"]["no_task_1_point_below"] + 0.01) < 1e-12
  # over a and b per seed 0.0125 + 0.01 s: mean 0.0225, half-width 4.303 * 0.01 / sqrt(3) = 0.0248
  near = bar([0.005, 0.02, 0.0])
  assert near["missed"] == ["interval_above_0"] and abs(near["margins"]["interval_above_0"] + 0.0023) < 1e-4
  assert bar([-0.01, 0.0, 0.0])["missed"] == ["mean_at_least_2_points", "interval_above_0"]
  assert against_the_bar([], "x") is None


def test_committed_traces_are_sorted_and_rounded_to_four_digits(tmp_path):
  from benchmarks.accuracy.study import write_traces
  traces = [{"task": "b", "method": "lisa", "seed": 1, "lr": 6e-4,
             "log": [{"step": 20, "probabilities": [0.0333333351, 1 / 3], "active_layers": [3, 7], "probing": False}]},
            {"task": "a", "method": "lisa", "seed": 0, "lr": 6e-4, "log": []}]
  write_traces(traces, tmp_path / "t.jsonl")
  back = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
  assert [t["task"] for t in back] == ["a", "b"]
  assert back[1]["log"][0] == {"step": 20, "probabilities": [0.03333, 0.3333], "active_layers": [3, 7], "probing": False}
  assert back[1]["lr"] == 6e-4


def test_a_study_continues_from_its_committed_report(tmp_path):
  from benchmarks.accuracy.study import SCALES, jobs, seed_work
  report = ROOT / "benchmarks/results/accuracy_paired.json"
  committed = json.loads(report.read_text())["rows"]
  assert seed_work(report, tmp_path) == len(committed)
  rows = [json.loads(l) for l in (tmp_path / "rows.jsonl").read_text().splitlines()]
  assert rows == committed
  assert (tmp_path / "traces.jsonl").read_text() == report.with_name("accuracy_paired_traces.jsonl").read_text()
  left = jobs(dict(SCALES["paired"], tasks=["units"], methods=["lisa", "grass_sketch"]), rows)
  assert left == []  # units ran all 8 seeds of both: nothing to run again
  with pytest.raises(SystemExit, match="fills an empty work dir only"):
    seed_work(report, tmp_path)


def test_chat_runs_pair_with_the_alpaca_runs_of_the_same_task_method_and_seed(tmp_path, monkeypatch):
  from benchmarks.accuracy import study
  alpaca = [{"task": "a", "method": "lisa", "seed": s, "lr": 1e-3, "accuracy": acc}
            for s, acc in enumerate([0.80, 0.70, 0.75])]
  alpaca += [{"task": "a", "method": "lisa", "seed": 0, "lr": 3e-4, "accuracy": 0.0}]  # another lr: not a pair
  (tmp_path / "alpaca.json").write_text(json.dumps({"rows": alpaca}))
  monkeypatch.setattr(study, "ROOT", tmp_path)
  scale = {"tasks": ["a"], "methods": ["lisa"], "lrs": {"lisa": [1e-3]}, "alpaca_report": "alpaca.json"}
  chat = [{"task": "a", "method": "lisa", "seed": s, "lr": 1e-3, "accuracy": acc}
          for s, acc in enumerate([0.81, 0.72, 0.78, 0.5])]  # seed 3 has no Alpaca run: left out
  chat.append({"task": "a", "method": "lisa", "seed": 1, "lr": 1e-3, "accuracy": 0.0, "device": "H200"})  # other card
  (out,) = study.against_alpaca(chat, scale)
  # differences 0.01, 0.02, 0.03: mean 0.02, sample std 0.01, t(0.975, 2) = 4.303
  assert out["seeds"] == 3 and abs(out["mean_difference"] - 0.02) < 1e-12
  half = 4.302652729911275 * 0.01 / 3 ** 0.5
  assert all(abs(x - y) < 1e-9 for x, y in zip(out["ci95"], [0.02 - half, 0.02 + half]))
  assert abs(out["alpaca_accuracy_mean"] - 0.75) < 1e-12 and abs(out["chat_accuracy_mean"] - 0.77) < 1e-12


def test_chat_runs_pair_across_several_alpaca_reports_and_refuse_a_run_in_two(tmp_path, monkeypatch):
  from benchmarks.accuracy import study
  row = lambda s, acc: {"task": "a", "method": "lisa", "seed": s, "lr": 1e-3, "accuracy": acc}
  base = {"task": "a", "method": "pretrained", "seed": 0, "lr": 0.0, "accuracy": 0.1}  # in each report: allowed
  (tmp_path / "first.json").write_text(json.dumps({"rows": [base, row(0, 0.80), row(1, 0.70)]}))
  (tmp_path / "more.json").write_text(json.dumps({"rows": [base, row(8, 0.75)]}))
  monkeypatch.setattr(study, "ROOT", tmp_path)
  scale = {"tasks": ["a"], "methods": ["lisa"], "lrs": {"lisa": [1e-3]}, "alpaca_report": ["first.json", "more.json"]}
  (out,) = study.against_alpaca([row(0, 0.81), row(1, 0.72), row(8, 0.78)], scale)
  assert out["seeds"] == 3 and abs(out["mean_difference"] - 0.02) < 1e-12  # 0.01, 0.02, 0.03
  (tmp_path / "more.json").write_text(json.dumps({"rows": [row(1, 0.75)]}))  # seed 1 in both files
  with pytest.raises(SystemExit, match=r"\('a', 'lisa', 1, 0.001\)\] are in it twice"):
    study.against_alpaca([row(0, 0.81)], scale)
