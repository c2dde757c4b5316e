"""Resuming: a damaged checkpoint falls back to the one before it; a changed schedule is refused."""

import shutil

import jax
import numpy as np
import pytest

from grass_jax.config import ConfigError
from grass_jax.train import run
from tests.test_train_loop import _cfg

# Module fixtures: the whole file on one xdist worker (--dist loadgroup), the fixture built once.
pytestmark = pytest.mark.xdist_group("resume")


def _largest_file(directory):
  return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


FALLBACK = ["train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=2"]


@pytest.fixture(scope="module")
def _stopped(tmp_path_factory):
  out = tmp_path_factory.mktemp("stopped") / "run"
  return out, run(_cfg(out, *FALLBACK), progress=False, stop_at=4, return_state=True)["params"]


@pytest.fixture(scope="module")
def straight_four_steps(_stopped):
  """The parameters after 4 uninterrupted steps (the stopped run below stops at its last step: the same run)."""
  return _stopped[1]


@pytest.fixture(scope="module")
def stopped_at_four(_stopped):
  """A run stopped after step 4, holding the checkpoints of steps 2 and 4 (each test damages a copy)."""
  return _stopped[0]


def test_resume_with_a_changed_schedule_is_refused_naming_the_key(tmp_path, stopped_at_four):
  # (the stopped run of the fallback tests: started with train.max_steps=4; refused before anything compiles)
  shutil.copytree(stopped_at_four, tmp_path / "b")
  with pytest.raises(ConfigError, match=r"--resume with train.max_steps=8, but the run .* was started with 4"):
    run(_cfg(tmp_path / "b", "train.max_steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=2"),
        resume=True, progress=False)


# A value other than the run's for each key the schedule and the layer sequence depend on.
CHANGED = {"train.max_steps": "7", "train.epochs": "5", "train.batch_size": "4", "train.grad_accum": "2",
           "train.seed": "1", "optim.strategy": "lisa", "optim.learning_rate": "0.5", "optim.schedule": "linear",
           "optim.warmup_ratio": "0.2", "optim.period": "1", "optim.probe_steps": "0", "optim.importance": "sketch",
           "optim.sketch_every": "5", "optim.num_active": "1", "optim.fixed_layers": "[0, 1]",
           "data.train": "data/tiny_parity_train.jsonl", "data.shuffle_seed": "3"}


def test_every_schedule_key_is_checked_on_resume(tmp_path):
  # check_same_schedule alone (the run's refusal above goes through it): each key changed on its own is named
  from grass_jax.config import to_dict
  from grass_jax.train import SCHEDULE_KEYS, check_same_schedule
  import yaml
  assert set(CHANGED) == set(SCHEDULE_KEYS)
  grass = ["optim.strategy=grass", "optim.period=5", "optim.probe_steps=5", "optim.importance=grad",
           "train.max_steps=6"]
  fixed = ["optim.strategy=fixed", "optim.fixed_layers=[2, 3]", "train.max_steps=6"]
  for base in (grass, fixed):
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(to_dict(_cfg(tmp_path, *base))))
    check_same_schedule(_cfg(tmp_path, *base), saved)  # the same config resumes
    for key, value in CHANGED.items():
      if (key == "optim.fixed_layers") != (base is fixed):  # fixed_layers exists only for strategy fixed
        continue
      with pytest.raises(ConfigError, match=f"--resume with {key}="):
        check_same_schedule(_cfg(tmp_path, *base, f"{key}={value}"), saved)


@pytest.mark.parametrize("damage", ["truncated_array", "missing_metadata", "garbage_bytes"])
def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path, damage, capsys, straight_four_steps,
                                                             stopped_at_four):
  extra = FALLBACK
  shutil.copytree(stopped_at_four, tmp_path / "b")
  newest = tmp_path / "b" / "checkpoints" / "4"
  if damage == "truncated_array":
    f = _largest_file(newest / "params")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  elif damage == "missing_metadata":
    for manifest in (newest / "params").rglob("manifest.ocdbt"):  # the index of the array files
      manifest.unlink()
    (tmp_path / "b" / "checkpoints_unreadable" / "4").mkdir(parents=True)  # step 4 was set aside once before
  else:
    f = _largest_file(newest / "opt_state")
    f.write_bytes(np.random.default_rng(0).integers(0, 256, f.stat().st_size, dtype=np.uint8).tobytes())
  resumed = run(_cfg(tmp_path / "b", *extra), resume=True, progress=False, return_state=True)
  err = capsys.readouterr().err
  assert "skipped checkpoint 4 (unreadable:" in err
  aside = tmp_path / "b" / "checkpoints_unreadable" / ("4.1" if damage == "missing_metadata" else "4")
  assert f"moved it to {aside}" in err and (aside / "params").is_dir()  # kept, not deleted, not inside another
  assert resumed["steps"] == 4
  jax.tree.map(np.testing.assert_array_equal, straight_four_steps, resumed["params"])


def test_resume_of_a_run_started_with_the_papers_importance_is_refused_under_the_new_default(tmp_path,
                                                                                           stopped_at_four):
  # The default importance changed from grad to sketch; a run started with grad must not continue with
  # another layer sequence without a word. (The stopped run of the fallback tests, its saved config
  # rewritten as a run started with grad: the check reads only that file.)
  import yaml
  shutil.copytree(stopped_at_four, tmp_path / "b")
  saved = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
  saved["advanced"]["optim"]["importance"] = "grad"
  (tmp_path / "b" / "config.yaml").write_text(yaml.safe_dump(saved))
  with pytest.raises(ConfigError, match=r"--resume with optim.importance='sketch', but the run .* with 'grad'"):
    run(_cfg(tmp_path / "b", *FALLBACK), resume=True, progress=False)


def test_resume_with_another_sketch_schedule_is_refused(tmp_path):
  # The check itself, on a saved config.yaml (no run needed): which steps sketch is part of the schedule.
  import yaml

  from grass_jax.config import to_dict
  from grass_jax.train import check_same_schedule
  saved = tmp_path / "config.yaml"
  saved.write_text(yaml.safe_dump(to_dict(_cfg(tmp_path, "optim.period=2", "optim.sketch_every=2"))))
  check_same_schedule(_cfg(tmp_path, "optim.period=2", "optim.sketch_every=2"), saved)
  with pytest.raises(ConfigError, match=r"--resume with optim.sketch_every=1, but the run .* with 2"):
    check_same_schedule(_cfg(tmp_path, "optim.period=2"), saved)
