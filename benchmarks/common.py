"""Shared pieces of the GPU benchmarks: model sizes, one timed training run in a fresh process.

Each configuration runs in its own process because ``peak_bytes_in_use`` only grows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

# Architectures of the models the paper uses (random init: only the shapes matter here).
SIZES: dict[str, dict[str, Any]] = {
    "tinyllama-1.1b": dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
    "gemma-2b": dict(model_type="gemma", vocab_size=256000, hidden_size=2048, intermediate_size=16384,
                     num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256),
    "llama2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "tiny-test": dict(model_type="llama", vocab_size=1000, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2),
}


def provenance(device: str | None = None) -> dict[str, Any]:
  """Where and when a result row was measured: the device (when given), the code's commit (``+dirty`` with
  uncommitted changes to tracked files outside ``benchmarks/results``), the invocation that ran it (``GRASS_BENCH_INVOCATION``, set once
  per command and inherited by the processes it starts) and the UTC time.

  ``GRASS_BENCH_COMMIT`` names the commit instead of git: a copy of the working tree whose ``.git`` is not
  that of the tree (the lent GPU machine's copy reported an older base as ``+dirty``) is run with it set to
  the commit the tree was copied from. Told the stale ``.git``'s own HEAD, it still adds ``+dirty`` where git
  sees changes: compute the commit where the tree came from, not on the machine."""
  import datetime
  from pathlib import Path
  root = Path(__file__).resolve().parents[1]

  def git(*args: str) -> str:
    try:
      return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return ""
  told = os.environ.get("GRASS_BENCH_COMMIT")
  head = git("rev-parse", "HEAD")
  commit = told or head or None
  # Told the copied .git's own HEAD (computed on the machine, not where the tree came from): the tree is
  # not that commit when git sees changes, so it says so as it does untold.
  vouched = told and not (head and head.startswith(told))
  # Result files are not code: a study writing its report while other runs start must not mark them dirty.
  if commit and not vouched and git("status", "--porcelain", "--untracked-files=no", "--", ".",
                                    ":(exclude)benchmarks/results"):
    commit += "+dirty"
  os.environ.setdefault("GRASS_BENCH_INVOCATION", f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
  return {**({"device": device} if device else {}), "commit": commit,
          "invocation": os.environ["GRASS_BENCH_INVOCATION"],
          "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def add_train_script_args(ap: Any) -> None:
  """The arguments of a benchmark that runs ``scripts/train.py`` on a config: the config, the steps, random
  weights instead of its checkpoint, more overrides, and the output file."""
  ap.add_argument("--config", default="configs/smollm2-135m-math.yaml")
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--random-init", metavar="SIZE", help="random weights of a benchmarks.common.SIZES entry")
  ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
  ap.add_argument("--out", required=True)


def train_script_overrides(args: Any) -> list[str]:
  """The overrides :func:`add_train_script_args`' ``--random-init`` and ``--set`` ask for: random weights of a
  benchmark size replace the config's checkpoint (no hub here), with the byte tokenizer."""
  random = (["model.path=null", f"model.random_init={json.dumps(SIZES[args.random_init])}", "model.tokenizer=bytes"]
            if args.random_init else [])
  return [*random, *args.set]


def run_train_script(config: str, steps: int, out: Any, *overrides: str) -> list[dict]:
  """``scripts/train.py`` on a config for ``steps`` steps in a fresh process (no evaluation, export or compile
  cache; a line every 10 steps); returns its ``metrics.jsonl`` lines."""
  from pathlib import Path
  root = Path(__file__).resolve().parents[1]
  cmd = [sys.executable, str(root / "scripts" / "train.py"), "--no-progress", "--config", config,
         f"train.max_steps={steps}", "train.log_every=10", "eval.tasks=[]", "train.export=false",
         "train.compilation_cache=false", f"train.output_dir={out}", *overrides]
  subprocess.run(cmd, check=True, cwd=root, stdout=subprocess.DEVNULL)
  return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def steady_tokens_per_s(lines: list[dict], skip: int = 3) -> tuple[float, int]:
  """Median tokens/s (the loss tokens a step trains on) over a run's logged windows after the first ``skip``
  (compilation and warm-up), from its ``metrics.jsonl`` lines; and how many windows that is."""
  windows = [l["tokens_per_s"] for l in lines if "tokens_per_s" in l][skip:]
  if not windows:
    raise ValueError(f"no logged window after the first {skip}: run more steps (or log more often)")
  import statistics
  return statistics.median(windows), len(windows)


PEAK_FLOPS = 798e12  # bf16 matmul rate measured on the lent H100 (8192^3 products)


def required_flops(cfg: Any, batch: int, seq: int, num_active: int | None) -> float:
  """Matmul FLOPs a step must do: forward, input gradients, and weight gradients of trained layers only.

  Rematerialisation's recomputed forward is not counted (it is overhead), nor the embedding lookup.
  """
  d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  per_layer = d * cfg.num_heads * hd * 2 + d * cfg.num_kv_heads * hd * 2 + 3 * d * f
  head = d * cfg.vocab_size
  tokens = batch * seq
  attn = 2 * 2 * seq * cfg.num_heads * hd * tokens  # QK^T and PV per layer, forward
  fwd = 2 * tokens * (per_layer * cfg.num_layers + head) + attn * cfg.num_layers
  trained = cfg.num_layers if num_active is None else num_active
  dw = 2 * tokens * (per_layer * trained + head)
  return 2 * fwd + dw  # forward + input gradients (~ forward) + weight gradients


def spec_config(spec: dict[str, Any]) -> Any:
  """The training config a benchmark spec describes (random weights of a ``SIZES`` entry, no data).

  spec keys: size (or model: a Hugging Face config dict of its own), strategy (grass|lisa|full), num_active, period, offload, stream (active states on the
  host too), always_on, measure ('none': importance from the trained layers, 'sketch': live
  importance), probe_steps, sketch_size, sketch_every, remat, attention, loss_chunk,
  unroll_forward, backward_bucket (0: the slot scan; the buckets compile ahead), granularity ('module' or
  'layer': with ``defaults``; unset, the config's default), batch, devices, fsdp. Learning rate 1e-5, constant, clipping at 1.0: the speed does not depend on them.
  ``defaults``: true takes every setting but size, batch, always_on, num_active and period from the
  config's defaults.
  """
  from grass_jax import config as config_lib
  model = {"random_init": spec.get("model") or SIZES[spec["size"]], "tokenizer": "bytes"}
  if spec.get("defaults"):  # what a user gets who sets only the model, the batch and the embeddings' training
    if "loss_chunk" in spec:  # a candidate default
      model["loss_chunk_tokens"] = spec["loss_chunk"]
    if spec.get("unroll_forward"):  # a candidate default: no weight copies out of the stack, longer compiles
      model["unroll_forward"] = True
    # Modules or whole layers, where a row names one (the default changed on 2026-12-07).
    modules = {"granularity": spec["granularity"]} if "granularity" in spec else {}
    return config_lib.from_dict({"model": model, "data": {"train": "(synthetic tokens)"},
                                 "optim": {"always_on": spec.get("always_on", True),  # and the protocol's:
                                           "num_active": spec["num_active"], "period": spec["period"], **modules},
                                 "train": {"batch_size": spec["batch"]}, "mesh": {"data": 1}})
  return config_lib.from_dict({
      "model": {**model, "dtype": "bfloat16", "compute_dtype": "bfloat16",
                "remat": spec.get("remat", "full"), "attention": spec.get("attention", "auto"),
                "loss_chunk_tokens": spec.get("loss_chunk", 0), "unroll_forward": spec.get("unroll_forward", False),
                "backward_bucket": spec.get("backward_bucket", 0)},
      "data": {"train": "(synthetic tokens)"},
      "optim": {"strategy": spec["strategy"], "num_active": spec.get("num_active") or 1, "period": spec["period"],
                "offload_optimizer_state": spec.get("offload", False), "stream_active_states": bool(spec.get("stream")),
                "always_on": spec.get("always_on", True),
                "importance": "sketch" if spec.get("measure", "none") == "sketch" else "grad",
                "probe_steps": spec.get("probe_steps", 0), "sketch_size": spec.get("sketch_size", 4),
                "sketch_every": spec.get("sketch_every", 1),
                "learning_rate": 1e-5, "schedule": "constant", "warmup_ratio": 0.0, "weight_decay": 0.0,
                "max_grad_norm": 1.0,
                # A `-lisa` row is LISA by whole layers, as its committed rows measured (unless it says otherwise).
                "granularity": spec.get("granularity", "layer" if spec["strategy"] != "full" else None)},
      "train": {"batch_size": spec["batch"], "seed": 0},
      "mesh": {"data": spec.get("devices", 1), "fsdp": spec.get("fsdp", 1)},
  })


def run_config(spec: dict[str, Any]) -> dict[str, Any]:
  """Runs one training configuration in-process and returns its measurements.

  The run is built by :func:`grass_jax.assembly.assemble` from :func:`spec_config`, as the Trainer builds
  a user's. Other spec keys: seq, steps, warmup, run_steps (the peers benchmark: every step timed),
  compile_ahead, compile_workers, profile_steps, profile_dir.
  """
  import jax
  import numpy as np

  import grass_jax
  from grass_jax import sharding
  from grass_jax.assembly import assemble

  cfg = spec_config(spec)
  dev = jax.devices()[0]
  mesh = sharding.make_mesh(data=cfg.mesh.data, fsdp=cfg.mesh.fsdp)
  t0 = time.perf_counter()
  parts = assemble(cfg, total_steps=spec.get("run_steps") or spec.get("steps", 1), mesh=mesh,
                   compile_workers=spec.get("compile_workers", 1))
  strategy, step, buckets = cfg.optim.strategy, parts.step, parts.backward_buckets
  model = parts.model
  b, t = spec["batch"], spec["seq"]
  tokens = np.random.default_rng(0).integers(0, model.vocab_size, size=(1, b, t)).astype(np.int32)
  host_batch = {"tokens": tokens, "attention_mask": np.ones_like(tokens), "loss_mask": np.ones_like(tokens)}
  phases = {}  # device memory after each phase of the run: when the peak happened (allocator statistics)

  def phase(name: str) -> None:
    st = dev.memory_stats() or {}
    phases[name] = {k: st.get(k) for k in ("bytes_in_use", "peak_bytes_in_use", "largest_alloc_size",
                                           "peak_bytes_reserved", "peak_pool_bytes")}

  compile_ahead_s = 0.0
  if spec.get("compile_ahead", True):  # before the weights are on the device (grass_jax.ahead_of_time)
    tc = time.perf_counter()
    parts.compile_ahead([host_batch])  # as the Trainer does: every bucket too
    compile_ahead_s = time.perf_counter() - tc
  phase("compiled")
  params = jax.block_until_ready(parts.init_params(seed=0))
  phase("params")
  opt_state = jax.block_until_ready(parts.init_state(params))
  phase("optimizer_state")
  off = parts.offloader(opt_state)
  batch = sharding.shard_batch(host_batch, parts.shardings[2])
  phase("offloader")

  draws = []  # the trained layers of each period (host-side: the offloader's slots), for the peers rows

  count = 0

  def run(n):
    nonlocal params, opt_state, count
    m = None
    for _ in range(n):
      if count in (1, cfg.optim.period + 1):  # the previous step has finished (the timed runs block on each)
        phase("first_step" if count == 1 else "first_switch")
      start = buckets.start(count, opt_state, off) if buckets else None
      params, opt_state, m = step(params, opt_state, batch, backward_start=start)
      count += 1
      if off is not None:
        opt_state = off.after_step(opt_state)
        if not draws or draws[-1] != sorted(off.slot_layers):
          draws.append(sorted(off.slot_layers))
    return m

  if spec.get("run_steps"):  # the peers benchmark: every step timed, compilation included (whole_run_s)
    timed = _timed_run(run, spec["run_steps"])
    timed["whole_run_s"] += compile_ahead_s  # the whole run includes compiling, whenever it happens
    phase("run")
    row = {**spec, **timed, "compile_ahead_s": compile_ahead_s, "device": dev.device_kind, "jax": jax.__version__,
           "peak_bytes": (dev.memory_stats() or {}).get("peak_bytes_in_use"), "memory_phases": phases,
           "compiled_executables": step.num_compiled(), "draws": draws,
           "runs_by_backward_start": {str(k): v for k, v in step.runs.items()}}
    if spec.get("profile_steps"):  # after the peak was read: the profiler's buffers do not count
      log_dir = f"/tmp/jax_profile_{os.getpid()}"
      with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        jax.block_until_ready(run(spec["profile_steps"]))
      row["profile"] = summarize_trace(log_dir, steps=spec["profile_steps"])
    return row
  tc = time.perf_counter()
  jax.block_until_ready(run(1))
  compile_s = time.perf_counter() - tc + compile_ahead_s
  jax.block_until_ready(run(spec.get("warmup", 2)))
  ts = time.perf_counter()
  m = run(spec["steps"])
  loss = float(m["loss"])
  elapsed = time.perf_counter() - ts
  compiles = step.num_compiled()
  profile = None
  if spec.get("profile_dir"):
    with jax.profiler.trace(spec["profile_dir"], create_perfetto_trace=True):
      jax.block_until_ready(run(3))
    profile = summarize_trace(spec["profile_dir"], steps=3)
  stats = dev.memory_stats() or {}
  s = grass_jax.find_state(opt_state)
  dev_kind = dev.default_memory().kind
  opt_dev = sum(x.nbytes for x in jax.tree.leaves(opt_state) if x.sharding.memory_kind == dev_kind)
  opt_host = sum(x.nbytes for x in jax.tree.leaves(off.bank)) if off else 0
  layer_state = s.slot_states[0] if isinstance(s.slot_states, tuple) else None
  layer_state_bytes = sum(x.nbytes for x in jax.tree.leaves(layer_state)) if layer_state is not None else 0
  step_s = elapsed / spec["steps"]
  flops = required_flops(model, b, t, None if strategy == "full" else cfg.optim.num_active)
  return {**spec, "device": dev.device_kind, "jax": jax.__version__, "num_params": model.num_params(),
          "step_s": step_s, "tokens_per_s": b * t / step_s, "compile_s": compile_s,
          "setup_s": tc - t0 - compile_ahead_s, "peak_bytes": stats.get("peak_bytes_in_use"),
          "bytes_in_use": stats.get("bytes_in_use"), "opt_state_device_bytes": opt_dev,
          "opt_state_host_bytes": opt_host, "layer_state_bytes": layer_state_bytes,
          "param_bytes": sum(x.nbytes for x in jax.tree.leaves(params)), "final_loss": loss,
          "skipped": int(m["skipped"]), "compiled_executables": compiles,
          "required_flops": flops, "mfu": flops / step_s / PEAK_FLOPS, "profile": profile}


def _timed_run(run: Any, steps: int) -> dict[str, Any]:
  """Times ``steps`` calls of ``run(1)`` one by one; the first includes compilation."""
  import jax
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(run(1))
    times.append(time.perf_counter() - t)
  return step_times_summary(times)


def step_times_summary(times: list[float]) -> dict[str, Any]:
  """Steady state (median step) and whole run (every step, compilation included) of timed steps."""
  ordered = sorted(times)
  median = ordered[len(ordered) // 2]
  # The mean of the steps that are not slow (compilation, recompilation): the steady state of a run
  # whose steps differ on purpose (sketch_every > 1), where the median would pick the cheap steps.
  usual = [t for t in times[1:] if t <= 3 * median] or [median]
  return {"step_s": median, "mean_step_s": sum(usual) / len(usual), "whole_run_s": sum(times),
          "first_step_s": times[0], "slow_steps": sum(t > 3 * median for t in times),
          "step_times_ms": [round(t * 1e3, 3) for t in times]}


def _kernel_class(name: str) -> str:
  """A GPU kernel's class, for XLA's and PyTorch's (eager and Inductor/Triton) kernel names alike."""
  n = name.lower()
  if any(k in n for k in ("flash", "fmha", "sdpa", "attention")):  # before 'sm90'/'cutlass': attention kernels too
    return "attention"
  if any(k in n for k in ("gemm", "cublas", "cutlass", "nvjet", "matmul", "xmma", "sm90")):
    return "matmul"
  if "triton" in n:  # Inductor's fused kernels; their names often contain '_to_copy' (a dtype cast)
    return "fusion (elementwise/reduce)"
  if "memcpy" in n or "memset" in n or "copy" in n:
    return "copy"
  if "adam" in n or "multi_tensor" in n:
    return "optimizer (fused)"
  if any(k in n for k in ("fusion", "loop_", "input_", "reduce", "transpose", "elementwise", "softmax",
                          "cross_entropy", "nll", "norm", "embedding", "index", "scatter", "gather", "cat")):
    return "fusion (elementwise/reduce)"
  return "other"


def summarize_trace(log_dir: str, steps: int, top: int = 40) -> dict[str, Any]:
  """Where device time goes: a jax.profiler perfetto trace reduced to kernel-class totals per step."""
  import glob
  import gzip

  path = sorted(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True))[-1]
  trace = json.load(gzip.open(path))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpu = {pid for pid, name in procs.items() if "GPU" in name or "gpu" in name}
  kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e]
  if not kernels:
    return {"error": f"no GPU events in {path}", "processes": sorted(set(procs.values()))}
  return {"trace": path, **summarize_kernels(kernels, steps, top)}


def summarize_kernels(kernels: list[dict], steps: int, top: int = 40) -> dict[str, Any]:
  """Kernel events (``name``, ``ts``, ``dur`` in microseconds) reduced to per-step totals by kernel class.

  ``busy_ms`` is the union of kernel intervals on the GPU (idle gaps excluded), ``span_ms`` the
  wall time from first to last kernel; both per step. Shared by the JAX and the PyTorch traces.
  """
  import collections
  by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
  by_class: dict[str, float] = collections.defaultdict(float)
  for e in kernels:
    by_name[e["name"]][0] += e["dur"]
    by_name[e["name"]][1] += 1
    by_class[_kernel_class(e["name"])] += e["dur"]
  intervals = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels)
  busy = sum(b - a for a, b in _union(intervals))
  per_step = lambda us: us / steps / 1e3
  return {"span_ms": per_step(intervals[-1][1] - intervals[0][0]), "busy_ms": per_step(busy),
          "kernels_per_step": len(kernels) / steps, "host_copies": host_copy_overlap(kernels, steps),
          "class_ms": {k: per_step(v) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
          "top": [{"name": n[:120], "ms": per_step(v[0]), "calls_per_step": v[1] / steps}
                  for n, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]]}


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
  """Overlapping intervals merged, in order."""
  merged: list[list[float]] = []
  for a, b in sorted(intervals):
    if merged and a <= merged[-1][1]:
      merged[-1][1] = max(merged[-1][1], b)
    else:
      merged.append([a, b])
  return [(a, b) for a, b in merged]


def _overlap(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> float:
  """Total time two unions of intervals share."""
  total, i, j = 0.0, 0, 0
  while i < len(x) and j < len(y):
    total += max(0.0, min(x[i][1], y[j][1]) - max(x[i][0], y[j][0]))
    if x[i][1] < y[j][1]:
      i += 1
    else:
      j += 1
  return total


def host_copy_overlap(kernels: list[dict], steps: int) -> dict[str, float]:
  """Per step, ms: host->device and device->host copies, and how much of them ran beside each other or compute."""
  def is_dir(e, *keys):
    n = e["name"].lower().replace(" ", "")
    return "memcpy" in n and any(k in n for k in keys)
  h2d = _union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if is_dir(e, "htod", "h2d")])
  d2h = _union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if is_dir(e, "dtoh", "d2h")])
  compute = _union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if "memcpy" not in e["name"].lower()])
  per_step = lambda us: us / steps / 1e3
  both = _union(h2d + d2h)
  return {"h2d_ms": per_step(sum(b - a for a, b in h2d)), "d2h_ms": per_step(sum(b - a for a, b in d2h)),
          "h2d_beside_d2h_ms": per_step(_overlap(h2d, d2h)),
          "copies_beside_compute_ms": per_step(_overlap(both, compute))}


def run_isolated(spec: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
  """Runs :func:`run_config` in a fresh Python process (clean peak-memory counter)."""
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  code = ("import json, sys; sys.path.insert(0, '.'); from benchmarks.common import run_config; "
          f"print('RESULT' + json.dumps(run_config(json.loads({json.dumps(json.dumps(spec))}))), flush=True); "
          # without waiting for a background compilation still under way (a bucket nobody will use)
          "import os; os._exit(0)")
  t0 = time.perf_counter()
  try:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    return {**spec, "error": f"timeout after {timeout}s"}
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT"):
      return json.loads(line[len("RESULT"):])
  err = (proc.stderr or "").strip().splitlines()
  oom = any("RESOURCE_EXHAUSTED" in l or "Out of memory" in l for l in err)
  # JAX appends a note after the exception; keep the tail so the real error line survives.
  tail = "\n".join(l for l in err[-25:] if not l.startswith("For simplicity, JAX has removed"))
  return {**spec, "error": "out of memory" if oom else (tail or f"exit {proc.returncode}"),
          "wall_s": time.perf_counter() - t0}
