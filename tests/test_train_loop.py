"""scripts/train.py end to end on CPU: the demo config, resume equality, config and data errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from grass_jax import config as config_lib
from grass_jax import data as data_lib
from grass_jax.train import Trainer, run
from grass_jax.transform import find_state

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "tiny-demo.yaml"
SMALL_MODEL = ("model.random_init={model_type: llama, vocab_size: 259, hidden_size: 32, intermediate_size: 48, "
               "num_hidden_layers: 4, num_attention_heads: 2, num_key_value_heads: 1}")


def _cfg(tmp_path, *extra):
  return config_lib.load(DEMO, [SMALL_MODEL, f"train.output_dir={tmp_path}", "train.batch_size=8",
                                "data.train=data/tiny_arithmetic.jsonl", "eval.tasks=[]", "data.max_length=160",
                                "data.buckets=[160]", *extra])


@pytest.mark.parametrize("offload,stream,sketch_every", [(True, True, 3)])
def test_resume_equals_straight_run(tmp_path, offload, stream, sketch_every):
  # sketch_every=3: the run stops at step 5, between two sketch steps, and resumes on the same schedule
  # (with streamed offloading, in one run for CI time; plain offloading resumes in tests/test_crash.py, no
  # offloading in the bfloat16 test below, buckets in test_backward_buckets_reach_the_train_step).
  extra = ["train.max_steps=12", "train.checkpoint_every=0", "optim.period=3", f"optim.sketch_every={sketch_every}",
           f"optim.offload_optimizer_state={str(offload).lower()}", f"optim.stream_active_states={str(stream).lower()}"]
  straight = run(_cfg(tmp_path / "a", *extra), progress=False, return_state=True)
  first = run(_cfg(tmp_path / "b", *extra), progress=False, stop_at=5)
  assert first["steps"] == 5
  resumed = run(_cfg(tmp_path / "b", *extra), resume=True, progress=False, return_state=True)
  assert resumed["steps"] == 12
  jax.tree.map(np.testing.assert_array_equal, straight["params"], resumed["params"])
  jax.tree.map(np.testing.assert_array_equal, straight["opt_state"], resumed["opt_state"])
  if offload:
    assert set(straight["layer_states"]) == set(resumed["layer_states"])
    for l in straight["layer_states"]:
      jax.tree.map(np.testing.assert_array_equal, straight["layer_states"][l], resumed["layer_states"][l])
  if stream:  # the active states stay on the host through steps, switches and the restore
    # (bitwise equality with plain offloading: tests/test_offload.py)
    s = find_state(resumed["opt_state"])
    assert {x.sharding.memory_kind for x in jax.tree.leaves(s.slot_states)} == {"pinned_host"}


def test_the_trainer_compiles_every_batch_length_before_it_loads_the_model(tmp_path, monkeypatch):
  # grass_jax.ahead_of_time, with offloaded states: no step compiles later. The buckets split this data in two.
  # (Resuming an offloaded run: tests/test_crash.py.)
  import grass_jax.train as train_lib
  from grass_jax.ahead_of_time import CompiledStep
  events = []
  compile_, load = CompiledStep.compile, train_lib.load_model
  monkeypatch.setattr(CompiledStep, "compile", lambda self, *a: (events.append("compile"), compile_(self, *a))[1])
  monkeypatch.setattr(train_lib, "load_model", lambda *a: (events.append("load"), load(*a))[1])
  extra = ["train.max_steps=4", "optim.period=2", "optim.offload_optimizer_state=true",
           "data.max_length=192", "data.buckets=[188, 192]"]
  trainer = Trainer(_cfg(tmp_path, *extra), progress=False)
  lengths = [b["tokens"].shape[-1] for _, _, b in trainer.dataset.iterate()][:4]
  assert set(lengths) == {188, 192}, "the run no longer fills both buckets: the test would not test two shapes"
  assert events == ["compile", "compile", "load"]
  trainer.train()
  trainer.finish()
  assert trainer.train_step_fn.step._cache_size() == 0  # no step compiled with the weights on the device
  assert trainer.state.offloader is not None


@pytest.mark.parametrize("override, message", [
    ("optim.num_activ=2", "unknown key optim.num_activ; valid keys in optim:"),
    ("optim.num_active=two", "optim.num_active must be int; got 'two'"),
    ("optim.strategy=gras", "optim.strategy must be one of grass, grass_static, lisa, full"),
    ("optim.period=0", "optim.period must be >= 1"),
    ("optim.epsilon=2", r"optim.epsilon must be in \[0, 1\]"),
    ("train.batch_size=null", "train.batch_size must not be null"),
    ("optim.strategy=lisa", "offload_optimizer_state needs optim.strategy: grass"),
    ("data.buckets=[64]", "largest of data.buckets"),
    ("optim.stream_active_states=true", "needs optim.offload_optimizer_state: true"),
    ("model.path=foo", "exactly one of model.path"),
    ("nonsense.key=1", "unknown section"),
    ("optim.num_active", "must look like section.key=value"),
    ("optim.frozen_grads=select", "optim.frozen_grads was removed; frozen layers always skip"),
    ("optim.reset_on_switch=true", "nothing to offload: set optim.offload_optimizer_state: false"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0; got -0.1"),
    ("optim.importance=gain optim.period=1", "optim.importance: gain compares each period's two halves"),
])
def test_config_errors_name_the_key(override, message):
  extra = ["optim.offload_optimizer_state=true"] if ("lisa" in override or "reset_on" in override) else []
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.load(DEMO, [*extra, *override.split(" ")])


def test_scientific_notation_without_dot_is_a_float():
  cfg = config_lib.load(DEMO, ["optim.learning_rate=1e-4"])
  assert cfg.optim.learning_rate == 1e-4
  with pytest.raises(config_lib.ConfigError, match="optim.learning_rate must be float"):
    config_lib.load(DEMO, ["optim.learning_rate=fast"])


def test_config_file_errors(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="does not exist"):
    config_lib.load(tmp_path / "nope.yaml")
  bad = tmp_path / "bad.yaml"
  bad.write_text("model: [unclosed")
  with pytest.raises(config_lib.ConfigError, match="not valid YAML"):
    config_lib.load(bad)


def test_all_shipped_configs_validate():
  names = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
  assert "tiny-demo.yaml" in names and len(names) >= 7
  for p in (ROOT / "configs").glob("*.yaml"):
    config_lib.load(p)


def test_data_errors(tmp_path):
  with pytest.raises(data_lib.DataError, match="does not exist"):
    data_lib.load_records(str(tmp_path / "missing.jsonl"))
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(data_lib.DataError, match="holds no records"):
    data_lib.load_records(str(empty))
  broken = tmp_path / "broken.jsonl"
  broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
  with pytest.raises(data_lib.DataError, match=r"broken.jsonl:2 is not valid JSON"):
    data_lib.load_records(str(broken))
  fields = tmp_path / "fields.json"
  fields.write_text(json.dumps([{"question": "a", "answer": "b"}]))
  with pytest.raises(data_lib.DataError, match="record 0 must be an object with a string 'instruction' and 'output'"):
    data_lib.load_records(str(fields))
  with pytest.raises(data_lib.DataError, match="unsupported file type"):
    (tmp_path / "x.csv").write_text("a,b")
    data_lib.load_records(str(tmp_path / "x.csv"))
  tok = data_lib.ByteTokenizer()
  with pytest.raises(data_lib.DataError, match="raise data.max_length"):
    data_lib.build_dataset([{"instruction": "x" * 50, "output": "y"}], tok, data_lib.Batching(batch_size=1),
                           max_length=20)
  # through the trainer, a message about the whole set names the file
  (tmp_path / "long.jsonl").write_text(json.dumps({"instruction": "x" * 300, "output": "y"}) + "\n")
  with pytest.raises(data_lib.DataError, match=r"long.jsonl: no example has response tokens .* raise data.max_length"):
    Trainer(_cfg(tmp_path / "run", f"data.train={tmp_path / 'long.jsonl'}"), progress=False)


def test_parquet_and_json_dict_sources(tmp_path):
  import datasets
  rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
  datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
  assert data_lib.load_records(str(tmp_path / "d.parquet")) == rows
  (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
  assert data_lib.load_records(str(tmp_path / "d.json")) == rows


def test_batches_mask_prompt_and_are_deterministic_and_resumable():
  records = data_lib.load_records(str(ROOT / "data" / "tiny_arithmetic.jsonl"))
  tok = data_lib.ByteTokenizer()
  ds = data_lib.build_dataset(records[:50], tok, data_lib.Batching(batch_size=4, grad_accum=2, buckets=[128, 256],
                                                                   seed=1), max_length=256)
  full = list(ds.iterate(0, 0, 2))
  again = list(ds.iterate(0, 0, 2))
  assert [(e, k) for e, k, _ in full] == [(e, k) for e, k, _ in again]
  for (_, _, a), (_, _, b) in zip(full, again):
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  resumed = list(ds.iterate(1, 2, 2))
  np.testing.assert_array_equal(resumed[0][2]["tokens"], full[len(ds) + 2][2]["tokens"])
  seen = sorted(i for _, idx in ds.epoch_plan(0) for i in idx)
  assert seen == list(range(50))  # every example exactly once per epoch
  batch = full[0][2]
  assert batch["tokens"].shape[:2] == (2, 4) and batch["tokens"].shape[2] in (128, 256)
  row = batch["tokens"][0, 0][batch["loss_mask"][0, 0] == 1]
  text = tok.decode(row)
  assert "The answer is" in text and "### Instruction" not in text


def test_advanced_keys_go_under_advanced_and_old_files_still_load(tmp_path):
  import yaml
  cfg = config_lib.load(DEMO)
  as_saved = config_lib.to_file_dict(cfg)  # what a run writes to its config.yaml
  assert sum(len(keys) for section, keys in as_saved.items() if section != "advanced") == 25
  (tmp_path / "new.yaml").write_text(yaml.safe_dump(as_saved))
  assert config_lib.load(tmp_path / "new.yaml") == cfg
  assert config_lib.load(tmp_path / "new.yaml", ["optim.temperature=2"]).optim.temperature == 2.0
  old = config_lib.to_dict(cfg)  # every key in its section, and a key removed since
  (tmp_path / "old.yaml").write_text(yaml.safe_dump({**old, "model": {**old["model"], "backward_bucket_compile": "ahead"}}))
  assert config_lib.load(tmp_path / "old.yaml") == cfg
  with pytest.raises(config_lib.ConfigError, match="model.backward_bucket_compile was removed; buckets always "
                                                   "compile ahead now .*: delete the key \\(got 'background'\\)"):
    config_lib.load(tmp_path / "old.yaml", ["model.backward_bucket_compile=background"])
  for held in ("true", "false"):  # optim.offload_prefetch (removed 2026-12-07): either value an old run wrote
    assert config_lib.load(tmp_path / "old.yaml", [f"optim.offload_prefetch={held}"]) == cfg
  with pytest.raises(config_lib.ConfigError, match="optim.offload_prefetch was removed; offloaded states are always "
                                                   "swapped .*: delete the key \\(got 2\\)"):
    config_lib.load(tmp_path / "old.yaml", ["optim.offload_prefetch=2"])
  for advanced, message in [({"optim": {"strategy": "grass"}}, "advanced.optim.strategy: optim.strategy is a core "
                                                                "key; set it under optim:, not under advanced:"),
                            ({"optim": {"temperature": 1.0}}, "optim.temperature is set twice"),
                            ({"optimizer": {"temperature": 1.0}}, "unknown section advanced.optimizer"),
                            (3, "advanced must be a mapping")]:
    data = {**as_saved, "optim": {**as_saved["optim"], "temperature": 0.5}, "advanced": advanced}
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.from_dict(data)
  # docs/configuration.md lists the core keys in one table, the others in another
  doc = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
  core_doc = doc.split("## Core keys")[1].split("## Advanced keys")[0]
  assert set(re.findall(r"^\| `(\w+\.\w+)", core_doc, flags=re.M)) == \
      {f"{section}.{key}" for section, keys in config_lib.CORE.items() for key in keys}


def test_the_documented_defaults_are_the_configs():
  # a default changed in code (loss_chunk_tokens, offload_prefetch on 2026-12-07) must change in the docs too
  import yaml
  doc = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
  defaults = config_lib.Config()
  checked = 0
  for key, cell in re.findall(r"^\| `(\w+\.\w+)` \| ([^|]+?) \|", doc, flags=re.M):
    section, name = key.split(".")
    if not hasattr(getattr(defaults, section, None), name):
      continue
    try:
      documented = yaml.safe_load(cell)
    except yaml.YAMLError:
      continue
    want = getattr(getattr(defaults, section), name)
    if isinstance(want, float) and isinstance(documented, str):  # YAML 1.1 reads `1e-5` as a string
      documented = float(documented)
    if isinstance(documented, (bool, int, float, type(None))) or (isinstance(documented, str) and re.fullmatch(r"\w+", documented)):
      assert documented == want, f"{key}: docs say {cell}, the config {want!r}"
      checked += 1
  assert checked >= 30


def test_cli_reports_config_errors(tmp_path):
  proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(DEMO),
                         "optim.num_activ=3"], capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode == 2
  assert "config error: unknown key optim.num_activ" in proc.stderr


def test_evaluation_inside_training_at_checkpoints_and_no_overwrite_without_resume(tmp_path):
  cfg = _cfg(tmp_path, "train.max_steps=6", "train.checkpoint_every=3", "eval.tasks=[gsm8k]",
             "eval.data=data/tiny_arithmetic.jsonl", "eval.limit=4", "eval.max_new_tokens=8", "eval.batch_size=4")
  summary = run(cfg, progress=False)
  assert (tmp_path / "eval" / "step_3" / "gsm8k_predictions.jsonl").exists()
  assert (tmp_path / "eval" / "step_6" / "gsm8k_summary.json").exists()
  rows = [json.loads(l) for l in (tmp_path / "eval" / "step_6" / "gsm8k_predictions.jsonl").read_text().splitlines()]
  assert len(rows) == 4 and summary["eval/gsm8k_accuracy"] == sum(r["correct"] for r in rows) / 4
  logged = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert sum("eval/gsm8k_accuracy" in l for l in logged) == 2
  # The same run again, without --resume, is refused: its checkpoints would be overwritten.
  with pytest.raises(FileExistsError, match="--resume"):
    run(cfg, progress=False)


def test_eval_config_errors():
  with pytest.raises(config_lib.ConfigError, match="eval.tasks: unknown task 'gsm9k'"):
    config_lib.load(DEMO, ["eval.tasks=[gsm9k]"])
  with pytest.raises(config_lib.ConfigError, match="single task"):
    config_lib.load(DEMO, ["eval.tasks=[gsm8k, boolq]", "eval.data=x.json"])


def test_missing_data_file_is_named_not_tried_as_a_hub_id():
  from grass_jax.data import DataError, load_records
  for source in ("data/missing.jsonl", "data/nope", "somewhere/train.json"):
    with pytest.raises(DataError, match="does not exist"):
      load_records(source)


def test_more_active_layers_than_the_model_has_is_a_config_error(tmp_path):
  from grass_jax.config import ConfigError
  cfg = config_lib.load(ROOT / "configs" / "tiny-demo.yaml", [f"train.output_dir={tmp_path}", "optim.num_active=7"])
  with pytest.raises(ConfigError, match="optim.num_active=7 exceeds the model's 6 layers"):
    run(cfg, progress=False)


@pytest.mark.parametrize("make, override, message", [
    (lambda d: (d / "afile").write_text("x"), "train.output_dir={d}/afile", "is a file: set train.output_dir"),
    (lambda d: None, "model.tokenizer={d}/no/tokenizer", "no such file or directory; set model.tokenizer"),
    (lambda d: None, "mesh.data=64", "needs 64 devices"),
])
def test_cli_errors_outside_the_config_are_one_line(tmp_path, make, override, message, monkeypatch, capsys):
  # The script's main() in this process (a fresh interpreter costs CI seconds; test_cli_reports_config_errors
  # runs the real command line).
  from scripts import train as train_script
  make(tmp_path)
  monkeypatch.chdir(ROOT)
  monkeypatch.setattr(sys, "argv", ["train.py", "--config", str(DEMO), "--no-progress",
                                    f"train.output_dir={tmp_path}/run", override.format(d=tmp_path), "train.max_steps=1"])
  capsys.readouterr()
  code = train_script.main()
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 1 and message in lines[0], err[-2000:]


@pytest.mark.parametrize("offload", [False, True])
def test_fixed_strategy_trains_only_its_layers_through_the_trainer(tmp_path, offload):
  from grass_jax.train import load_model
  cfg = _cfg(tmp_path, "optim.strategy=fixed", "optim.fixed_layers=[3,1]", "train.max_steps=4", "optim.period=2",
             "train.checkpoint_every=0", "train.export=false", f"optim.offload_optimizer_state={str(offload).lower()}")
  out = run(cfg, progress=False, return_state=True)
  before, _ = load_model(cfg.model, cfg.train.seed)
  for name, after in out["params"]["layers"].items():
    moved = [not np.array_equal(np.asarray(after[i]), np.asarray(before["layers"][name][i]))
             for i in range(after.shape[0])]
    assert moved == [False, True, False, True], name
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert all(l["active_layers"] == [1, 3] for l in lines if "active_layers" in l)


def test_unroll_forward_reaches_the_train_step(tmp_path, monkeypatch):
  # model.unroll_forward is passed to make_train_step (its math: test_train_step's unrolled-forward test);
  # the run stops there, before compiling anything.
  import grass_jax.assembly as assembly_lib
  seen = {}

  class Stop(Exception):
    pass

  def spy(config, tx, options, **kwargs):
    seen["options"] = options
    raise Stop

  monkeypatch.setattr(assembly_lib, "make_train_step", spy)
  with pytest.raises(Stop):
    run(_cfg(tmp_path, "model.unroll_forward=true", "train.max_steps=1"), progress=False)
  assert seen["options"].unroll_forward is True
  with pytest.raises(config_lib.ConfigError, match="model.unroll_forward must be bool"):
    config_lib.load(DEMO, ["model.unroll_forward=3"])
  with pytest.raises(config_lib.ConfigError, match="model.unroll_forward needs model.remat: full"):
    config_lib.load(DEMO, ["model.unroll_forward=true", "model.remat=dots"])


def test_backward_buckets_reach_the_train_step(tmp_path, monkeypatch):
  # model.backward_bucket: probing steps run the slot scan (None), the others their draw's bucket (the
  # math of both: tests/test_bucketed_stack.py); compiled ahead (the default), every bucket runs from its first step.
  # (The background policy, the scan standing in for a bucket still compiling: tests/test_ahead_of_time.py.)
  from grass_jax.ahead_of_time import CompiledStep
  asked = []
  call = CompiledStep.__call__
  monkeypatch.setattr(CompiledStep, "__call__",
                      lambda self, *a, backward_start=None: (asked.append(backward_start),
                                                             call(self, *a, backward_start=backward_start))[1])
  extra = ["model.backward_bucket=3", "optim.always_on=false", "optim.importance=grad", "optim.period=3",
           "train.max_steps=6", "train.log_every=1", "train.export=false", "train.checkpoint_every=0"]
  out = run(_cfg(tmp_path / "a", *extra), progress=False, return_state=True)
  lines = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
  active = next(l["active_layers"] for l in lines if l.get("step") == 4)  # steps 3-5: one period
  start = min(active) // 3 * 3  # buckets of 3: two executables (starts 0 and 3) besides the scan
  assert asked == [None] * 3 + [start] * 3
  assert out["steps_by_backward_start"] == {"None": 3, str(start): 3}
  assert lines[-1]["skipped_steps"] == 0 and out["steps"] == 6
  # Stopped inside the bucketed period and resumed: the host picks the same bucket again, the run ends equal.
  asked.clear()
  run(_cfg(tmp_path / "b", *extra), progress=False, stop_at=4)
  resumed = run(_cfg(tmp_path / "b", *extra), resume=True, progress=False, return_state=True)
  assert asked == [None] * 3 + [start] * 3
  jax.tree.map(np.testing.assert_array_equal, out["params"], resumed["params"])
  for bad, message in [(["model.backward_bucket=2"], "optim.always_on: false"),
                       (["model.backward_bucket=2", "optim.always_on=false"], "optim.sketch_every > 1"),
                       (["model.backward_bucket=-1"], "must be >= 0")]:
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.load(DEMO, bad)


@pytest.mark.parametrize("overrides, message", [
    (["optim.strategy=fixed"], "optim.strategy fixed trains optim.fixed_layers"),
    (["optim.strategy=fixed", "optim.fixed_layers=[1,1]"], "distinct layer indices"),
    (["optim.fixed_layers=[1,2]"], "optim.fixed_layers is for optim.strategy fixed"),
])
def test_fixed_strategy_config_errors(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.load(DEMO, overrides)


def test_fixed_layer_beyond_the_model_is_a_config_error(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="names a layer beyond the model's 4"):
    run(_cfg(tmp_path, "optim.strategy=fixed", "optim.fixed_layers=[1,4]", "train.max_steps=1"), progress=False)


@pytest.mark.parametrize("overrides,probing,measure", [
    ([], 0, "sketch"),  # the default: live importance, no probing
    (["optim.importance=grad"], 5, "exact"),  # the paper's: one period of probing, then the trained layers
    (["optim.importance=grad", "optim.probe_steps=0"], 0, "none"),
    (["optim.probe_steps=10"], 10, "sketch"),
    (["optim.strategy=grass_static"], 5, "exact"),  # GRASS* takes its importance from probing, whatever importance says
    (["optim.strategy=lisa"], 0, "none"),
])
def test_importance_defaults_resolve_to_what_the_train_step_measures(overrides, probing, measure):
  from grass_jax.train import measure_mode
  o = config_lib.load(DEMO, ["optim.period=5", *overrides]).optim
  assert (o.probing_steps(), measure_mode(o)) == (probing, measure)


def test_resume_with_nothing_to_resume_and_a_fresh_start_over_a_run_are_refused(tmp_path):
  from grass_jax.pretrained import CheckpointError
  with pytest.raises(CheckpointError, match=r"--resume: .*checkpoints holds no checkpoint .*run without --resume"):
    Trainer(_cfg(tmp_path), resume=True, progress=False)
  assert not (tmp_path / "metrics.jsonl").exists()
  (tmp_path / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n')  # a run without checkpoints
  with pytest.raises(FileExistsError, match=r"holds a run \(metrics.jsonl\): pass --resume .* or set train.output_dir"):
    Trainer(_cfg(tmp_path), progress=False)
  with pytest.raises(CheckpointError, match="holds no checkpoint"):
    Trainer(_cfg(tmp_path), resume=True, progress=False)
  assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 10, "loss": 1.0}\n'


def test_metrics_after_the_resumed_step_move_aside_and_are_not_lost(tmp_path):
  from grass_jax.metrics import MetricsWriter
  lines = ['{"step": 5, "loss": 3.0}', '{"step": 10, "loss": 2.0}', '{"step": 15, "loss": 1.5}', '{"step": 2']
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  w = MetricsWriter(tmp_path, resume_step=10)
  w.write(15, {"loss": 1.4})
  w.close()
  assert (tmp_path / "metrics.jsonl").read_text().splitlines() == [*lines[:2], '{"step": 15, "loss": 1.4}']
  assert (tmp_path / "metrics_superseded.jsonl").read_text().splitlines() == lines[2:]


def test_cli_out_of_memory_and_signals_are_one_line_and_debug_shows_tracebacks(tmp_path, monkeypatch, capsys):
  from scripts import train as train_script

  def oom(*args, **kwargs):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3.72GiB with allocator GPU_0_bfc."
                       "\nmore lines of XLA's report")
  monkeypatch.setattr(train_script, "run", oom)
  monkeypatch.chdir(ROOT)
  argv = ["train.py", "--config", str(DEMO), f"train.output_dir={tmp_path}/run"]
  monkeypatch.setattr(sys, "argv", argv)
  capsys.readouterr()
  assert train_script.main() == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: out of device memory (RESOURCE_EXHAUSTED: Out of memory")
  assert all(fix in lines[0] for fix in ("train.batch_size", "data.max_length", "model.remat", "offload", "--debug"))
  monkeypatch.setattr(sys, "argv", [*argv, "--debug"])
  with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
    train_script.main()
  monkeypatch.setattr(sys, "argv", [*argv, "optim.num_activ=3", "--debug"])
  with pytest.raises(config_lib.ConfigError, match="unknown key optim.num_activ"):
    train_script.main()
  def interrupted(*args, **kwargs):
    from grass_jax.train import Interrupted
    raise Interrupted(15, 7, tmp_path / "run" / "checkpoints")
  monkeypatch.setattr(train_script, "run", interrupted)  # SIGTERM: one line, exit 128 + 15
  monkeypatch.setattr(sys, "argv", argv)
  capsys.readouterr()
  assert train_script.main() == 143
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("interrupted (SIGTERM) at step 7; saved a checkpoint"), lines
  monkeypatch.setattr(train_script, "run", lambda *a, **k: 1 / 0)  # not a user's error: the traceback stays
  monkeypatch.setattr(sys, "argv", argv)
  with pytest.raises(ZeroDivisionError):
    train_script.main()


def test_a_batch_larger_than_the_dataset_is_named(tmp_path, capsys):
  data = tmp_path / "three.jsonl"
  data.write_text("".join(json.dumps({"instruction": f"What is {i} + 1?", "input": "", "output": str(i + 1)}) + "\n"
                          for i in range(3)))
  with Trainer(_cfg(tmp_path / "run", f"data.train={data}", "train.batch_size=4", "train.max_steps=1"),
               progress=False) as trainer:
    pass
  assert trainer.writer._file.closed  # a Trainer is a context manager that closes its files
  trainer.close()  # and closing twice is harmless
  err = capsys.readouterr().err
  assert "warning: a step takes train.batch_size x train.grad_accum = 4 sequences, more than the 3 training " \
         "examples" in err, err


@pytest.mark.parametrize("importance", ["gain", "adam"])
def test_importance_learned_from_training_trains_through_the_trainer(tmp_path, importance):
  cfg = _cfg(tmp_path, f"optim.importance={importance}", "optim.period=2", "train.max_steps=8", "train.log_every=2",
             "train.checkpoint_every=0", "train.export=false")
  summary = run(cfg, progress=False)
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert summary["steps"] == 8 and all(np.isfinite(l["loss"]) for l in lines)
  probs = np.asarray(lines[-1]["probabilities"])
  assert probs.shape == (4,) and np.isclose(probs.sum(), 1.0, atol=1e-6) and (probs >= 0.1 / 4 - 1e-7).all()
  assert np.any(np.asarray(lines[-1]["importance"]) != 0)  # periods after the first were credited


def test_bfloat16_run_across_an_epoch_boundary_with_gradient_accumulation_resumes_bitwise(tmp_path):
  # The shipped GPU configs keep weights and compute in bfloat16. 20 records, 8 a step (4 x 2 accumulated): the
  # second epoch starts at step 4, and the run stops inside it; the resumed run must see the second epoch's own
  # order and the same accumulation. The loss falls, every weight stays bfloat16 (an update must not promote
  # a leaf to float32), and the resumed run equals the straight one bitwise, logged losses included.
  lines = (ROOT / "data" / "tiny_arithmetic.jsonl").read_text().splitlines()[:20]
  (tmp_path / "small.jsonl").write_text("\n".join(lines) + "\n")
  extra = [f"data.train={tmp_path / 'small.jsonl'}", "train.batch_size=4", "train.grad_accum=2", "train.epochs=2",
           "train.checkpoint_every=0", "optim.period=2", "model.dtype=bfloat16", "model.compute_dtype=bfloat16",
           "optim.learning_rate=3e-3", "train.log_every=1"]
  straight = run(_cfg(tmp_path / "a", *extra), progress=False, return_state=True)
  first = run(_cfg(tmp_path / "b", *extra), progress=False, stop_at=4)
  resumed = run(_cfg(tmp_path / "b", *extra), resume=True, progress=False, return_state=True)
  steps_per_epoch = 3  # 8 + 8 + the last 4 records
  assert first["steps"] == 4 > steps_per_epoch and resumed["steps"] == straight["steps"] == 2 * steps_per_epoch
  assert {x.dtype for x in jax.tree.leaves(straight["params"])} == {jax.numpy.dtype("bfloat16")}
  jax.tree.map(np.testing.assert_array_equal, straight["params"], resumed["params"])
  jax.tree.map(np.testing.assert_array_equal, straight["opt_state"], resumed["opt_state"])
  logged = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
  want = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
  assert [(m["step"], m["loss"]) for m in logged] == [(m["step"], m["loss"]) for m in want]
  losses = [m["loss"] for m in want]
  assert len(losses) == 6 and all(np.isfinite(losses)) and np.mean(losses[-2:]) < np.mean(losses[:2]), losses
