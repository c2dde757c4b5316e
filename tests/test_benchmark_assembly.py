"""The benchmarks build their runs as the Trainer does (grass_jax.assembly): a spec's knobs reach the run."""

import pytest

from benchmarks.common import run_config, spec_config
from grass_jax.assembly import measure_mode

SPEC = dict(size="tiny-test", strategy="grass", num_active=2, period=2, batch=2, seq=32, steps=2, warmup=1,
            attention="einsum")


def test_a_spec_is_a_training_config():
  cfg = spec_config(dict(SPEC, offload=True, measure="sketch", loss_chunk=16, always_on=False))
  o = cfg.optim
  assert (o.strategy, o.num_active, o.period, o.offload_optimizer_state, o.always_on) == ("grass", 2, 2, True, False)
  assert measure_mode(o) == "sketch" and cfg.model.loss_chunk_tokens == 16 and cfg.model.attention == "einsum"
  assert measure_mode(spec_config(SPEC).optim) == "none"  # importance from the trained layers, no probing


def test_every_peers_row_is_a_training_config():
  from benchmarks.peers import PLAN
  configs = {name: spec_config({"period": 20, **spec}) for name, spec in PLAN if spec.get("framework") == "jax"}
  modules, layers = configs["tiny-jax-default-modules"].optim, configs["tiny-jax-default-layers"].optim
  assert (modules.strategy, modules.granularity, modules.num_active) == ("lisa", "module", 2)
  assert (layers.strategy, layers.granularity) == ("lisa", "layer")
  default = configs["tiny-jax-default"].optim  # the config's own default: LISA by modules
  assert default.granularity is None and default.module_granularity()
  assert not configs["tiny-jax-lisa-chunk2048"].optim.module_granularity()  # LISA rows: whole layers


def test_a_benchmark_run_offloads_what_its_spec_says():
  on = run_config(dict(SPEC, offload=True))
  # tiny-test layer: q, o 256 x 256, k, v 256 x 128, MLP 3 x 256 x 512, 2 norms; Adam's two bf16 moments
  layer_moments = 2 * 2 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512 + 2 * 256)
  # the host bank: the 8 - 2 inactive layers' moments and int32 step counts (0 bytes without offload)
  assert on["opt_state_host_bytes"] == 6 * (layer_moments + 4)
  assert on["layer_state_bytes"] == layer_moments + 4 and on["compiled_executables"] == 1


def test_provenance_names_the_commit_git_gives_or_the_one_it_is_told(monkeypatch):
  import re

  from benchmarks.common import provenance
  monkeypatch.delenv("GRASS_BENCH_COMMIT", raising=False)
  row = provenance("cpu")
  assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", row["commit"]) and row["device"] == "cpu"
  assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", row["time"]) and row["invocation"]
  monkeypatch.setenv("GRASS_BENCH_COMMIT", "21ae5d9")  # a copied tree whose .git is stale: told, never '+dirty'
  assert provenance()["commit"] == "21ae5d9"


def test_provenance_told_the_stale_head_itself_still_says_dirty(monkeypatch):
  # The mistake it guards against: GRASS_BENCH_COMMIT=$(git rev-parse --short HEAD) run on the lent machine,
  # whose copied .git is older than the tree.
  import subprocess

  from benchmarks import common
  answers = {"rev-parse": "75b20a0cd273d7edaff5bc76526c57f860bde012", "status": " M grass_jax/train.py"}
  calls = []

  def run(args, **kw):
    calls.append(args)
    return subprocess.CompletedProcess(args, 0, stdout=answers[args[1]] + "\n", stderr="")
  monkeypatch.setattr(common.subprocess, "run", run)
  monkeypatch.setenv("GRASS_BENCH_COMMIT", "75b20a0")
  assert common.provenance()["commit"] == "75b20a0+dirty"
  # a study's own report, written while its other runs start, is not a change to the code
  assert calls[-1][1] == "status" and calls[-1][-1] == ":(exclude)benchmarks/results"
  monkeypatch.setenv("GRASS_BENCH_COMMIT", "800d9ae")  # the commit the tree was copied from
  assert common.provenance()["commit"] == "800d9ae"
  answers["status"] = ""
  monkeypatch.setenv("GRASS_BENCH_COMMIT", "75b20a0")  # the .git is the tree's: nothing to flag
  assert common.provenance()["commit"] == "75b20a0"


def test_train_script_benchmarks_take_the_median_of_the_windows_after_warm_up():
  # benchmarks/packing.py and benchmarks/determinism.py
  from benchmarks.common import steady_tokens_per_s
  from benchmarks.packing import VARIANTS
  lines = [{"step": 10 * i, "tokens_per_s": v} for i, v in enumerate([5.0, 90.0, 95.0, 100.0, 300.0, 102.0], 1)]
  lines.insert(2, {"step": 15, "eval/gsm8k_accuracy": 0.5})  # lines without a window do not count
  assert steady_tokens_per_s(lines) == (102.0, 3)
  assert VARIANTS["packed"] == ["data.packing=true"] and VARIANTS["padded"] == []
  with pytest.raises(ValueError, match="run more steps"):
    steady_tokens_per_s(lines[:3])
