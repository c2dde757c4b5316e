"""A mistyped local path is 'not found' at once, never a hub request."""

import pytest

from grass_jax.local_paths import looks_local
from grass_jax.pretrained import CheckpointError, resolve


@pytest.mark.parametrize("source, local", [
    ("runs/demo/hf_model", True), ("./model", True), ("/abs/model", True), ("~/model", True),
    ("data/train.jsonl", True), ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", False), ("gpt2", False),
    ("nowhere_dir/model", False),
])
def test_looks_local(source, local):
  assert looks_local(source, (".jsonl",)) is local


def test_existing_parent_makes_a_path_local(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "runs").mkdir()
  assert looks_local("runs/model") and not looks_local("elsewhere/model")


def test_resolve_refuses_a_missing_local_directory_without_the_hub(monkeypatch):
  import huggingface_hub

  def no_hub(*a, **k):
    raise AssertionError("a local path was sent to the hub")
  monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
  with pytest.raises(CheckpointError, match="runs/x/hf_model: no such directory"):
    resolve("runs/x/hf_model")
