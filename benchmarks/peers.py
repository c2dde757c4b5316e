"""grass_jax against the PyTorch setups a user would run instead, side by side on one GPU.

  python benchmarks/peers.py --out-dir benchmarks/results/peers [--only NAME ...] [--group tinyllama|7b]
  python benchmarks/peers.py --report benchmarks/results/peers/peers_h200.jsonl \
      --figure benchmarks/results/peers/peers_h200.png                              # table + figure

Every configuration runs in a fresh process (a clean peak-memory counter) for ``--steps`` steps
(default 200) with a layer switch every ``--period`` (20), each step timed on its own:

* steady state: tokens/s of the median step (``tokens_per_s``) and of the mean step after compilation
  (``mean_tokens_per_s``). With frozen embeddings a GRASS step's cost depends on its draw (the depth of
  the lowest trained layer), so compare same-draws rows by the mean, over 200 steps (10 draws): the
  median of a few draws picks one draw's cost (7B: 1.06x by median over 5 draws, 1.00x by mean over 10);
* whole run: tokens/s over all steps, compilation and recompilations included (``run_tokens_per_s``);
* peak device memory: ``torch.cuda.max_memory_allocated`` / JAX ``peak_bytes_in_use`` (allocator peaks:
  the bytes live buffers take). Since 2026-12-03 JAX rows run with JAX's default preallocation (one
  region the BFC allocator splits to the size asked for). Earlier rows ran with preallocation off: the
  allocator then grows region by region and hands out free chunks up to 128 MiB larger than asked,
  unsplit, and its peak counts them (TinyLlama: 5.28 against 5.09 GiB for the same program;
  ``peers_h200.jsonl`` lines 17-20). ``preallocate: False`` runs a row that way. PyTorch rows
  also record ``peak_reserved_bytes`` (what its caching allocator took from the device).

The PyTorch peers: a ``transformers`` Llama with SDPA attention, gradient checkpointing
(non-reentrant; ``...-no-ckpt`` rows without it) and fused AdamW, everything in bf16 (weights, gradients, moments), random weights
of the real shapes (only the shapes matter). Methods:

* ``full``: every parameter trains;
* ``lisa``: the way LMFlow does it: at each switch every layer's ``requires_grad`` is turned off,
  ``gamma`` layers drawn uniformly are turned on, and a fresh AdamW is built over the trainable
  parameters (embeddings and head too when ``always_on``);
* ``lora``: ``peft`` LoRA r=16 (alpha 32) on every linear map of the layers.

Each eager and with ``torch.compile`` (the whole model; the backward through AOTAutograd). The
JAX rows are ``benchmarks/common.run_config`` with the same shapes, cuDNN attention and full remat,
under XLA's default flags unless a row sets ``xla_flags``: the ``-nomerge`` rows have what
``scripts/train.py`` sets (``grass_jax.xla_flags``). ``...-same-draws`` PyTorch rows train the
layers a JAX row of the same run drew, in its order (run that row first). Since 2026-12-02 (third
session) a JAX row compiles its step before the weights are on the device (``compile_ahead_s``,
counted in the whole run; ``grass_jax.ahead_of_time``); earlier rows compiled at the first step.
Rows are appended to ``peers.jsonl`` as they land, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import SIZES, provenance, step_times_summary  # noqa: E402
from grass_jax.xla_flags import RECOMMENDED as RECOMMENDED_XLA_FLAGS  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = dict(size="tinyllama-1.1b", batch=16, seq=512, always_on=True)
SEVEN_B = dict(size="llama2-7b", batch=2, seq=512, always_on=False)
JAX = dict(framework="jax", compile=True, attention="cudnn", remat="full")
# XLA:GPU runs a while loop (our layer scans) and a conditional from the host, one sync per iteration;
# these command-buffer kinds record them as CUDA graph conditional nodes instead.
CMDBUF = "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE"
# XLA flag sets tried against the weight copies the profile shows. A layer's weights are a dynamic slice of
# the [L, ...] stack: XLA copies each weight matrix before each matmul that reads it (a memcpy per matrix per
# layer pass), and its dot merger concatenates k_proj and v_proj (same input) into one matrix per pass.
NO_DOT_MERGER = "--xla_gpu_dot_merger_threshold_mb=0"
DSFUSION = "--xla_gpu_enable_dynamic_slice_fusion=true"  # matmuls read a slice in place (legacy cuBLAS calls only)
TRAIN_FLAGS = " ".join(f"--{k}={v}" for k, v in RECOMMENDED_XLA_FLAGS.items())  # what scripts/train.py adds
LEGACY_DSFUSION = f"{DSFUSION} --xla_gpu_enable_cublaslt=false {NO_DOT_MERGER}"
FLAG_VARIANTS = {
    "dsfusion": DSFUSION,
    "triton": "--xla_gpu_cublas_fallback=false",  # every matmul a Triton gemm
    "nomerge": NO_DOT_MERGER,
    "legacy-dsfusion": LEGACY_DSFUSION,
    "unroll-dsfusion": f"{LEGACY_DSFUSION} --xla_gpu_enable_while_loop_unrolling=WHILE_LOOP_UNROLLING_FULL_UNROLL",
}


# Rows whose draws a same-draws PyTorch row replays (the first of them measured in the run; they all draw alike).
GRASS_DRAWS_TINY = ["tiny-jax-grass-offload-late-chunk2048", "tiny-jax-grass-offload-late-chunk2048-nomerge",
                    "tiny-jax-grass-offload-late-chunk2048-nomerge-unrolled"]
GRASS_DRAWS_7B = ["7b-jax-grass-offload-late-g2", "7b-jax-grass-offload-late-g2-nomerge",
                  "7b-jax-grass-offload-late-g2-nomerge-bucket4",
                  "7b-jax-grass-offload-late-g2-nomerge-unrolled", "7b-jax-grass-offload-late-g2-nomerge-remat-dots",
                  "7b-jax-grass-offload-late-g2-nomerge-remat-none"]


def _torch(method: str, compile_: bool, **kw) -> dict[str, Any]:
  return dict(framework="torch", method=method, compile=compile_, **kw)


# `prefetch`: kept in the specs because it names what the committed rows measured. Since 2026-12-07 every offloaded
# row swaps late (the prefetch is gone from grass_jax), so an `-offload` row and its `-offload-late` twin run the same.
def _jax(method: str, **kw) -> dict[str, Any]:
  strategy = {"grass": "grass", "lisa": "lisa", "full": "full"}[method]
  return dict(JAX, method=method, strategy=strategy, **kw)


def _default(**kw) -> dict[str, Any]:
  """What a user gets: the config's defaults (grass_jax.config), only the model, batch and embeddings set."""
  return dict(framework="jax", method="default", strategy="default", defaults=True, **{"num_active": 2, **kw})


# (name, spec) in priority order; group = the model the row belongs to.
PLAN: list[tuple[str, dict[str, Any]]] = [
    ("tiny-jax-default", _default(**TINY)),
    ("7b-jax-default", _default(**SEVEN_B)),
    # The defaults with the XLA flags scripts/train.py sets (grass_jax.xla_flags.RECOMMENDED): what its user gets.
    ("tiny-jax-default-train-flags", _default(**TINY, xla_flags=TRAIN_FLAGS)),
    ("7b-jax-default-train-flags", _default(**SEVEN_B, xla_flags=TRAIN_FLAGS)),
    # The defaults with the forward unrolled (model.unroll_forward): the forward reads each layer's weights in
    # place instead of copying them out of the [L, ...] stack, at a longer compilation.
    ("tiny-jax-default-unrolled", _default(**TINY, unroll_forward=True)),
    ("7b-jax-default-unrolled", _default(**SEVEN_B, unroll_forward=True)),
    # Module granularity (optim.granularity: module; the default since 2026-12-07, so `-default` rows of later
    # commits run it too): 2 attention and 2 MLP blocks, the parameters and moments of 2 layers; the backward
    # pass reaches 4 drawn layers deep. `-layers`: LISA by whole layers, the default until then.
    ("tiny-jax-default-modules", _default(**TINY, granularity="module")),
    ("7b-jax-default-modules", _default(**SEVEN_B, granularity="module")),
    ("tiny-jax-default-layers", _default(**TINY, granularity="layer")),
    ("7b-jax-default-layers", _default(**SEVEN_B, granularity="layer")),
    # The defaults with the whole LM head at once (the default until 2026-12-07: faster, a higher peak).
    ("tiny-jax-default-whole-loss", _default(**TINY, loss_chunk=0)),
    ("tiny-jax-grass-offload-chunk2048", _jax("grass", **TINY, num_active=2, offload=True, loss_chunk=2048)),
    ("tiny-torch-lisa-compile", _torch("lisa", True, **TINY, num_active=2)),
    # The incoming layers' states copied after the period's last step, not during it (one slot set less at the peak).
    ("tiny-jax-grass-offload-late-chunk2048", _jax("grass", **TINY, num_active=2, offload=True, prefetch=False,
                                                   loss_chunk=2048)),
    # The config default since 2026-12-01: live importance (every layer measured at every step by sketch).
    ("tiny-jax-grass-offload-late-sketch-chunk2048", _jax("grass", **TINY, num_active=2, offload=True, prefetch=False,
                                                          loss_chunk=2048, measure="sketch")),
    ("tiny-jax-grass-offload-late-sketch4-chunk2048", _jax("grass", **TINY, num_active=2, offload=True,
                                                           prefetch=False, loss_chunk=2048, measure="sketch",
                                                           sketch_every=4)),
    ("tiny-jax-grass-offload-late-chunk2048-cmdbuf", _jax("grass", **TINY, num_active=2, offload=True,
                                                          prefetch=False, loss_chunk=2048, xla_flags=CMDBUF)),
    # The same with cudaMallocAsync: its statistics count the bytes asked for, as PyTorch's do, where the BFC
    # allocator's count whole chunks (it may hand out a free chunk up to 128 MiB larger than asked, unsplit).
    ("tiny-jax-grass-offload-late-chunk2048-nomerge-async", _jax("grass", **TINY, num_active=2, offload=True,
                                                                 prefetch=False, loss_chunk=2048,
                                                                 xla_flags=NO_DOT_MERGER, allocator="cuda_async")),
    # Preallocation off (every row before 2026-12-03): the BFC allocator grows region by region, and its peak
    # counts free chunks handed out unsplit, up to 128 MiB larger than asked for.
    ("tiny-jax-grass-offload-late-chunk2048-nomerge-growth", _jax("grass", **TINY, num_active=2, offload=True,
                                                                  prefetch=False, loss_chunk=2048,
                                                                  xla_flags=NO_DOT_MERGER, preallocate=False)),
    ("tiny-jax-grass-offload-late-chunk2048-nomerge-unrolled", _jax("grass", **TINY, num_active=2, offload=True,
                                                                    prefetch=False, loss_chunk=2048,
                                                                    xla_flags=NO_DOT_MERGER, unroll_forward=True)),
    *[(f"tiny-jax-grass-offload-late-chunk2048-{v}", _jax("grass", **TINY, num_active=2, offload=True,
                                                          prefetch=False, loss_chunk=2048, xla_flags=flags))
      for v, flags in FLAG_VARIANTS.items()],
    ("tiny-jax-grass-offload-late-chunk1024", _jax("grass", **TINY, num_active=2, offload=True, prefetch=False,
                                                   loss_chunk=1024)),
    ("tiny-jax-grass-offload", _jax("grass", **TINY, num_active=2, offload=True)),
    ("tiny-torch-lisa-compile-same-draws", _torch("lisa", True, **TINY, num_active=2,
                                                  replay_from=GRASS_DRAWS_TINY)),
    ("tiny-torch-lisa-compile-same-draws-no-ckpt", _torch("lisa", True, **TINY, num_active=2,
                                                          replay_from=GRASS_DRAWS_TINY, checkpointing=False)),
    ("tiny-torch-full-compile", _torch("full", True, **TINY, num_active=None)),
    ("tiny-jax-full-chunk2048", _jax("full", **TINY, num_active=None, loss_chunk=2048)),
    ("tiny-torch-lisa-eager", _torch("lisa", False, **TINY, num_active=2)),
    ("tiny-jax-grass-offload-stream-chunk2048", _jax("grass", **TINY, num_active=2, offload=True, stream=True,
                                                     loss_chunk=2048)),
    ("tiny-jax-lisa-chunk2048", _jax("lisa", **TINY, num_active=2, loss_chunk=2048)),
    ("tiny-torch-full-eager", _torch("full", False, **TINY, num_active=None)),
    ("tiny-torch-lora-eager", _torch("lora", False, **TINY, num_active=None)),
    ("tiny-torch-lora-compile", _torch("lora", True, **TINY, num_active=None)),
    ("7b-jax-grass-offload-g2", _jax("grass", **SEVEN_B, num_active=2, offload=True)),
    ("7b-torch-lisa-compile-g2", _torch("lisa", True, **SEVEN_B, num_active=2)),
    ("7b-jax-grass-offload-late-g2", _jax("grass", **SEVEN_B, num_active=2, offload=True, prefetch=False)),
    ("7b-jax-grass-offload-late-sketch-g2", _jax("grass", **SEVEN_B, num_active=2, offload=True, prefetch=False,
                                                 measure="sketch")),
    # Live importance sketched every 4th step: between sketches the backward stops at the lowest trained layer.
    ("7b-jax-grass-offload-late-sketch4-g2", _jax("grass", **SEVEN_B, num_active=2, offload=True, prefetch=False,
                                                  measure="sketch", sketch_every=4)),
    ("7b-jax-grass-offload-late-g2-cmdbuf", _jax("grass", **SEVEN_B, num_active=2, offload=True, prefetch=False,
                                                 xla_flags=CMDBUF)),
    # The forward pass over static slices of the stack: no copy of each layer's weights (probes/weight_copies.py).
    ("7b-jax-grass-offload-late-g2-nomerge-unrolled", _jax("grass", **SEVEN_B, num_active=2, offload=True,
                                                           prefetch=False, xla_flags=NO_DOT_MERGER,
                                                           unroll_forward=True)),
    # The bucketed backward pass (grass_jax.models.bucketed_stack): from the lowest trained layer rounded down to
    # a multiple of 4, no recomputation; one executable per bucket, all 8 compiled before the weights are placed
    # (8 threads).
    ("7b-jax-grass-offload-late-g2-nomerge-bucket4", _jax("grass", **SEVEN_B, num_active=2, offload=True,
                                                          prefetch=False, xla_flags=NO_DOT_MERGER, backward_bucket=4,
                                                          compile_workers=8)),
    ("7b-jax-grass-offload-late-g2-nomerge-bucket8", _jax("grass", **SEVEN_B, num_active=2, offload=True,
                                                          prefetch=False, xla_flags=NO_DOT_MERGER, backward_bucket=8,
                                                          compile_workers=8)),
    # Frozen layers keep their matmul outputs (dots) or everything (none) instead of being recomputed in the
    # backward pass: faster, not leaner. Compared with PyTorch without gradient checkpointing (below).
    *[(f"7b-jax-grass-offload-late-g2-nomerge-remat-{r}", _jax("grass", **SEVEN_B, num_active=2, offload=True,
                                                               prefetch=False, xla_flags=NO_DOT_MERGER, remat=r))
      for r in ("dots", "none")],
    *[(f"7b-jax-grass-offload-late-g2-{v}", _jax("grass", **SEVEN_B, num_active=2, offload=True, prefetch=False,
                                                 xla_flags=flags)) for v, flags in FLAG_VARIANTS.items()],
    # The same layers as the GRASS row, in the same order: both engines doing the same work.
    ("7b-torch-lisa-compile-g2-same-draws", _torch("lisa", True, **SEVEN_B, num_active=2,
                                                   replay_from=GRASS_DRAWS_7B)),
    # PyTorch's fastest setup when memory allows: nothing recomputed (the match of remat dots/none above).
    ("7b-torch-lisa-compile-g2-same-draws-no-ckpt", _torch("lisa", True, **SEVEN_B, num_active=2,
                                                           replay_from=GRASS_DRAWS_7B, checkpointing=False)),
    ("7b-torch-lisa-eager-g2", _torch("lisa", False, **SEVEN_B, num_active=2)),
    ("7b-torch-lisa-eager-g2-no-ckpt", _torch("lisa", False, **SEVEN_B, num_active=2, checkpointing=False)),
    ("7b-jax-grass-stream-g2", _jax("grass", **SEVEN_B, num_active=2, offload=True, stream=True)),
    *[(f"7b-jax-grass-offload-g{g}", _jax("grass", **SEVEN_B, num_active=g, offload=True)) for g in (1, 4)],
    *[(f"7b-torch-lisa-compile-g{g}", _torch("lisa", True, **SEVEN_B, num_active=g)) for g in (1, 4)],
    *[(f"7b-jax-grass-stream-g{g}", _jax("grass", **SEVEN_B, num_active=g, offload=True, stream=True))
      for g in (1, 4)],
    ("7b-torch-lora-eager", _torch("lora", False, **SEVEN_B, num_active=None)),
    ("7b-torch-lora-compile", _torch("lora", True, **SEVEN_B, num_active=None)),
    ("7b-torch-full-eager", _torch("full", False, **SEVEN_B, num_active=None)),
]


# ----------------------------------------------------------------------------------------------- torch

def _torch_model(spec: dict[str, Any], device: str):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  hf = {k: v for k, v in SIZES[spec["size"]].items() if k != "model_type"}
  cfg = LlamaConfig(**hf, tie_word_embeddings=False, use_cache=False, max_position_embeddings=4096)
  cfg._attn_implementation = "sdpa"
  torch.manual_seed(0)
  default = torch.get_default_dtype()
  torch.set_default_dtype(torch.bfloat16)  # create the weights in bf16 (no float32 copy at any time)
  try:
    with torch.device(device):
      model = LlamaForCausalLM(cfg)
  finally:
    torch.set_default_dtype(default)
  if spec.get("checkpointing", True):
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  model.train()
  return model


class LisaSwitcher:
  """LMFlow's LISA: at each switch freeze every layer, unfreeze ``gamma`` drawn uniformly, new AdamW.

  ``always_on``: the embeddings, final norm and LM head train at every step. ``replay``: instead of
  drawing, train these layer sets in turn (another row's draws: the same work as that row).
  """

  def __init__(self, model, num_active: int, always_on: bool, make_optimizer, seed: int = 0,
               replay: list[list[int]] | None = None):
    import numpy as np
    self.model, self.num_active, self.make_optimizer = model, num_active, make_optimizer
    self.replay = [sorted(d) for d in replay or []]
    self.layers = model.model.layers
    self.rng = np.random.default_rng(seed)
    for p in model.parameters():
      p.requires_grad_(False)
    for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
      for p in module.parameters():
        p.requires_grad_(always_on)
    self.active: list[int] = []
    self.switches = 0

  def switch(self):
    for i in self.active:
      for p in self.layers[i].parameters():
        p.requires_grad_(False)
        p.grad = None
    if self.replay:
      self.active = self.replay[self.switches % len(self.replay)]
    else:
      self.active = sorted(int(i) for i in self.rng.choice(len(self.layers), self.num_active, replace=False))
    self.switches += 1
    for i in self.active:
      for p in self.layers[i].parameters():
        p.requires_grad_(True)
    return self.make_optimizer([p for p in self.model.parameters() if p.requires_grad])


def torch_run(spec: dict[str, Any]) -> dict[str, Any]:
  """One PyTorch configuration in this process; every step timed on its own."""
  import torch
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = _torch_model(spec, device)

  def adamw(params):
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=device == "cuda")

  method, switcher = spec["method"], None
  if method == "full":
    opt = adamw(list(model.parameters()))
  elif method == "lisa":
    switcher = LisaSwitcher(model, spec["num_active"], spec["always_on"], adamw, replay=spec.get("replay"))
    opt = switcher.switch()
  elif method == "lora":
    import peft
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                       target_modules=LORA_TARGETS))
    opt = adamw([p for p in model.parameters() if p.requires_grad])
  else:
    raise ValueError(f"unknown method {method!r}")
  forward = torch.compile(model) if spec["compile"] else model
  gen = torch.Generator().manual_seed(0)
  tokens = torch.randint(0, model.config.vocab_size, (spec["batch"], spec["seq"]), generator=gen).to(device)
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  times, losses = [], []
  draws = [switcher.active] if switcher is not None else []

  def one_step(i):
    nonlocal opt
    if switcher is not None and i and i % spec["period"] == 0:
      opt = switcher.switch()
      draws.append(switcher.active)
    loss = forward(input_ids=tokens, labels=tokens).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(loss.detach())

  for i in range(spec["run_steps"]):
    t = time.perf_counter()
    one_step(i)
    sync()
    times.append(time.perf_counter() - t)
    print(f"STEP {times[-1]:.6f}", flush=True)  # a row cut short by its timeout still reports its steps
  row = {**spec, **step_times_summary(times), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
         "torch": torch.__version__, "final_loss": float(losses[-1]),
         "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
         # What the caching allocator took from the device at most (its free blocks included).
         "peak_reserved_bytes": torch.cuda.max_memory_reserved() if device == "cuda" else None,
         "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad), "draws": draws}
  if spec.get("profile_steps") and device == "cuda":  # after the peak was read; steps with no switch
    row["profile"] = torch_profile(lambda: one_step(1), spec["profile_steps"])
  return row


def torch_profile(step, steps: int) -> dict[str, Any]:
  """``steps`` calls of ``step`` under torch.profiler, reduced like the JAX trace (benchmarks.common)."""
  import tempfile

  import torch
  from benchmarks.common import summarize_kernels
  acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
  with torch.profiler.profile(activities=acts) as prof:
    for _ in range(steps):
      step()
    torch.cuda.synchronize()
  with tempfile.NamedTemporaryFile(suffix=".json") as f:
    prof.export_chrome_trace(f.name)
    events = json.load(open(f.name))["traceEvents"]
  kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
  if not kernels:
    return {"error": "no CUDA kernels in the torch.profiler trace"}
  return summarize_kernels(kernels, steps)


# ----------------------------------------------------------------------------------------------- driver

def run_one(spec: dict[str, Any], timeout: float, hlo_dir: Path | None = None) -> dict[str, Any]:
  """Runs one row in a fresh process; returns the row (with ``error`` when it failed).

  ``hlo_dir``: where XLA dumps a JAX row's training step (its HLO before and after optimisation).
  """
  fn = "torch_run" if spec["framework"] == "torch" else "jax_run"
  code = ("import json, sys; sys.path.insert(0, '.'); from benchmarks import peers; "
          f"print('RESULT' + json.dumps(peers.{fn}(json.loads({json.dumps(json.dumps(spec))}))), flush=True); "
          "import os; os._exit(0)")  # not waiting for a background compilation nobody will use
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="true" if spec.get("preallocate", True) else "false",
             TOKENIZERS_PARALLELISM="false")
  if spec.get("allocator"):  # JAX's device allocator: 'bfc' (default) or 'cuda_async' (cudaMallocAsync)
    env["XLA_PYTHON_CLIENT_ALLOCATOR"] = spec["allocator"]
  flags = [env.get("XLA_FLAGS", ""), spec.get("xla_flags", "")]
  if hlo_dir and spec["framework"] == "jax":  # the optimised HLO of the training step, to name the profile's kernels
    flags.append(f"--xla_dump_to={hlo_dir} --xla_dump_hlo_module_re=jit_step")
  env["XLA_FLAGS"] = " ".join(f for f in flags if f)
  t0 = time.perf_counter()
  try:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    times = [float(l.split()[1]) for l in out.splitlines() if l.startswith("STEP ")]
    partial = {**step_times_summary(times), "steps_done": len(times)} if len(times) > 2 else {}
    return {**spec, **partial, "error": f"timeout after {timeout:.0f}s ({len(times)} steps done)"}
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT"):
      return {**json.loads(line[len("RESULT"):]), "process_s": time.perf_counter() - t0}
  err = (proc.stderr or "").strip().splitlines()
  oom = any("out of memory" in l.lower() or "RESOURCE_EXHAUSTED" in l for l in err)
  return {**spec, "error": "out of memory" if oom else "\n".join(err[-15:]) or f"exit {proc.returncode}"}


def jax_run(spec: dict[str, Any]) -> dict[str, Any]:
  from benchmarks.common import run_config
  return run_config(spec)


def finish_row(name: str, r: dict[str, Any]) -> dict[str, Any]:
  """Adds the fields every row has: tokens/s steady and whole run, peak GiB."""
  row = {"name": name, **r}
  tokens = r["batch"] * r["seq"]
  if "step_s" in r:  # also a row cut short: its steady state from the steps it finished
    row["tokens_per_s"] = tokens / r["step_s"]
  if "mean_step_s" in r:
    row["mean_tokens_per_s"] = tokens / r["mean_step_s"]
  if "error" not in r:
    row.update(run_tokens_per_s=tokens * r["run_steps"] / r["whole_run_s"], peak_gib=(r["peak_bytes"] or 0) / 2**30)
  return row


def latest_rows(path: Path, *, measured_only: bool = False) -> dict[str, dict]:
  """The rows of a peers.jsonl by name, the last of each name winning (``measured_only``: of those without error)."""
  rows: dict[str, dict] = {}
  for line in path.read_text().splitlines():
    r = json.loads(line)
    if not (measured_only and "error" in r):
      rows[r["name"]] = r
  return rows


PROFILE_CLASSES = ("matmul", "attention", "fusion (elementwise/reduce)", "copy", "optimizer (fused)", "other")


def report(path: Path) -> str:
  """Markdown tables of a peers.jsonl (the last row of each name wins): throughput and memory, then the
  GPU time per step by kernel class of the rows run with ``--profile``."""
  rows = latest_rows(path)
  out = ["| row | framework | method | compile | gamma | tokens/s steady | tokens/s mean | tokens/s whole run "
         "| peak GiB | lowest trained layer (mean) |", "|---|---|---|---|---|---|---|---|---|---|"]
  for name, r in rows.items():
    if "error" in r:
      out.append(f"| {name} | {r['framework']} | {r['method']} | | | error: {r['error'][:60]} | | | | |")
      continue
    variant = " + stream" if r.get("stream") else " + late swap" if r.get("prefetch") is False else ""
    if r.get("measure") == "sketch":
      every = r.get("sketch_every", 1)
      variant += " + live importance" + (f" (every {every}th step)" if every > 1 else "")
    variant += " + XLA flags" if r.get("xla_flags") else ""
    variant += " + unrolled forward" if r.get("unroll_forward") else ""
    variant += f" + remat {r['remat']}" if r.get("remat", "full") != "full" else ""
    if r.get("backward_bucket"):
      # rows before 2026-12-07 say how their buckets compiled; since then always ahead
      compiled = r.get("bucket_compile", "background" if r["name"].endswith("-background") else "ahead")
      variant += f" + backward buckets of {r['backward_bucket']} ({compiled})"
    variant += " (no gradient checkpointing)" if r.get("checkpointing") is False else ""
    mean = f"{r['mean_tokens_per_s']:,.0f}" if "mean_tokens_per_s" in r else ""
    # With frozen embeddings a step's backward pass runs down to the lowest trained layer: draws set its cost.
    draws = r.get("draws") or []
    if r.get("period"):  # a JAX row also records the draw made after its last step, which nothing trained on
      draws = draws[:math.ceil(r["run_steps"] / r["period"])]
    lowest = f"{sum(min(d) for d in draws) / len(draws):.1f}" if draws else ""
    out.append(f"| {name} | {r['framework']} | {r['method']}{variant} | "
               f"{'yes' if r.get('compile', r['framework'] == 'jax') else 'no'} | {r.get('num_active') or 'all'} | {r['tokens_per_s']:,.0f} | "
               f"{mean} | {r['run_tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | {lowest} |")
  profiled = {n: r["profile"] for n, r in rows.items() if "error" not in r.get("profile", {"error": 1})}
  if profiled:
    out += ["", "GPU time per step, ms (profiled steps after the run; busy: the union of kernel intervals):", "",
            "| row | span | busy | " + " | ".join(PROFILE_CLASSES) + " | kernels/step |",
            "|---|---|---|" + "---|" * len(PROFILE_CLASSES) + "---|"]
    for name, p in profiled.items():
      cells = " | ".join(f"{p['class_ms'].get(c, 0.0):.1f}" for c in PROFILE_CLASSES)
      out.append(f"| {name} | {p['span_ms']:.1f} | {p['busy_ms']:.1f} | {cells} | {p['kernels_per_step']:,.0f} |")
  return "\n".join(out)


def figure(path: Path, out: Path) -> Path:
  """Bar charts of a peers.jsonl: tokens/s (steady and whole run) and peak GiB per row, one model per row of plots."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = latest_rows(path, measured_only=True)
  groups = sorted({r["size"] for r in rows.values()})
  fig, axes = plt.subplots(len(groups), 2, figsize=(13, 3.2 * len(groups) + 0.6), squeeze=False)
  for g, size in enumerate(groups):
    rs = [r for r in rows.values() if r["size"] == size]
    names = [r["name"].split("-", 1)[1] for r in rs]
    colors = ["tab:green" if r["framework"] == "jax" else "tab:orange" for r in rs]
    y = range(len(rs))
    ax = axes[g][0]
    ax.barh([i + 0.2 for i in y], [r["tokens_per_s"] for r in rs], height=0.4, color=colors, label="steady")
    ax.barh([i - 0.2 for i in y], [r["run_tokens_per_s"] for r in rs], height=0.4, color=colors, alpha=0.45,
            label="whole run (compilation included)")
    ax.set_yticks(list(y), names, fontsize=8)
    ax.set_xlabel("tokens/s")
    device = ", ".join(sorted({r.get("device", "?").replace("NVIDIA ", "") for r in rs}))
    ax.set_title(f"{size} on {device}: throughput (green: grass_jax, orange: PyTorch)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[g][1]
    ax.barh(list(y), [r["peak_gib"] for r in rs], color=colors)
    ax.set_yticks(list(y), [""] * len(rs))
    ax.set_xlabel("peak device memory, GiB")
    ax.set_title(f"{size} on {device}: peak memory", fontsize=9)
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out-dir", default="benchmarks/results/peers")
  ap.add_argument("--only", nargs="+", help="run only these PLAN names")
  ap.add_argument("--group", choices=["tiny", "7b"], help="run only the rows of one model")
  ap.add_argument("--as-given", action="store_true", help="run the --only rows in the order given (default: PLAN's)")
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--period", type=int, default=20)
  ap.add_argument("--deadline-s", type=float, default=None, help="start no row after this many seconds")
  ap.add_argument("--timeout-s", type=float, default=420, help="per row")
  ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                  help="after the timed run, trace this many more steps (jax.profiler / torch.profiler) and add "
                       "their per-step GPU time by kernel class to the row ('profile')")
  ap.add_argument("--dump-hlo", type=Path, metavar="DIR",
                  help="XLA dumps each JAX row's training step under DIR/<row name> (to name a profile's fusions)")
  ap.add_argument("--append-to", type=Path, metavar="FILE",
                  help="at the end, append this invocation's rows to FILE (the card's one file, e.g. "
                       "benchmarks/results/peers/peers_h100.jsonl) and print their lines, for benchmarks/report.py")
  ap.add_argument("--report", type=Path, help="print the table of a peers.jsonl and exit")
  ap.add_argument("--figure", type=Path, help="with --report: also draw its bar charts here (PNG)")
  args = ap.parse_args()
  if args.report:
    print(report(args.report))
    if args.figure:
      print(f"figure: {figure(args.report, args.figure)}")
    return
  out = Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  measured = []
  plan = PLAN
  if args.only and args.as_given:  # the order of --only (a row's place in an invocation can change its whole run)
    by_name = dict(PLAN)
    unknown = [n for n in args.only if n not in by_name]
    if unknown:
      raise SystemExit(f"unknown rows {', '.join(unknown)}: see PLAN in benchmarks/peers.py")
    plan = [(n, by_name[n]) for n in args.only]
  for name, spec in plan:
    if (args.only and name not in args.only) or (args.group and not name.startswith(args.group + "-")):
      continue
    if args.deadline_s is not None and time.perf_counter() - t0 > args.deadline_s:
      print(f"deadline reached; not run: {name}", flush=True)
      continue
    spec = dict(spec, run_steps=args.steps, period=args.period, **({"profile_steps": args.profile}
                                                                     if args.profile else {}))
    if spec.get("replay_from"):  # the draws of the first of these rows this run has measured
      done = latest_rows(out / "peers.jsonl", measured_only=True) if (out / "peers.jsonl").exists() else {}
      source = next((done[n] for n in spec["replay_from"] if done.get(n, {}).get("draws")), None)
      if source is None:
        print(f"{name:<40} skipped: run one of {', '.join(spec['replay_from'])} first (its draws are replayed)",
              flush=True)
        continue
      spec["replay"], spec["replayed"] = source["draws"], source["name"]
    row = finish_row(name, run_one(spec, args.timeout_s, args.dump_hlo / name if args.dump_hlo else None))
    row.update(provenance(row.get("device")))  # one invocation id for every row of this command
    with (out / "peers.jsonl").open("a") as f:
      f.write(json.dumps(row) + "\n")
    measured.append(row)
    if "error" in row:
      print(f"{name:<40} ERROR {row['error'][-300:]}", flush=True)
    else:
      print(f"{name:<40} {row['tokens_per_s']:>8,.0f} tok/s steady {row['mean_tokens_per_s']:>8,.0f} mean "
            f"{row['run_tokens_per_s']:>8,.0f} whole "
            f"{row['peak_gib']:>6.2f} GiB first step {row['first_step_s']:.1f}s slow steps {row['slow_steps']}",
            flush=True)
  if args.append_to and measured:
    first, last = append_rows(measured, args.append_to)
    print(f"appended as lines {first}-{last} of {args.append_to}: name them in benchmarks/report.py", flush=True)


def append_rows(rows: list[dict], path: Path) -> tuple[int, int]:
  """Appends one invocation's rows to a card's result file (a profile's trace path, local to this machine,
  left out); returns their first and last line, counted from 1."""
  before = len([l for l in path.read_text().splitlines() if l.strip()]) if path.exists() else 0
  with path.open("a") as f:
    for row in rows:
      if isinstance(row.get("profile"), dict):
        row = {**row, "profile": {k: v for k, v in row["profile"].items() if k != "trace"}}
      f.write(json.dumps(row) + "\n")
  return before + 1, before + len(rows)


if __name__ == "__main__":
  main()
