"""benchmarks/peers.py's report: the table and the figure from its rows."""

import json


def test_peers_report_and_figure_from_rows(tmp_path):
  # benchmarks/peers.py --report/--figure: the table has every row (errors too), the figure is drawn.
  from benchmarks.common import summarize_kernels
  from benchmarks.peers import figure, finish_row, report
  base = dict(size="tinyllama-1.1b", batch=16, seq=512, run_steps=200, period=100, num_active=2, compile=True,
              device="NVIDIA H200", peak_bytes=5 * 2**30)
  profile = summarize_kernels([{"name": "sm90_xmma_gemm_bf16", "ts": 0.0, "dur": 600.0},
                               {"name": "loop_add_fusion", "ts": 500.0, "dur": 300.0},
                               {"name": "cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "ts": 1000.0,
                                "dur": 100.0}], steps=1)
  rows = [finish_row("tiny-jax-grass", dict(base, framework="jax", method="grass", step_s=0.1, whole_run_s=25.0,
                                            mean_step_s=0.125, profile=profile,
                                            draws=[[0, 5], [3, 9], [20, 30]])),  # the last: drawn after step 200
          finish_row("tiny-torch-lisa", dict(base, framework="torch", method="lisa", step_s=0.125, whole_run_s=50.0)),
          finish_row("tiny-torch-lisa-no-ckpt", dict(base, framework="torch", method="lisa", step_s=0.1,
                                                     whole_run_s=40.0, checkpointing=False)),
          finish_row("tiny-jax-grass-dots", dict(base, framework="jax", method="grass", step_s=0.1, whole_run_s=25.0,
                                                 remat="dots")),
          finish_row("tiny-torch-lora", dict(base, framework="torch", method="lora", error="out of memory"))]
  path = tmp_path / "peers.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  table = report(path)
  assert "| tiny-jax-grass | jax | grass | yes | 2 | 81,920 | 65,536 | 65,536 | 5.00 | 1.5 |" in table
  assert "| tiny-torch-lisa | torch | lisa | yes | 2 | 65,536 |  | 32,768 | 5.00 |  |" in table
  # span 0..1.1 ms; busy: [0, 0.8] and [1.0, 1.1] (the overlap counted once); cuDNN's sm90 kernel is attention
  assert "| tiny-jax-grass | 1.1 | 0.9 | 0.6 | 0.1 | 0.3 | 0.0 | 0.0 | 0.0 | 3 |" in table
  assert "| tiny-torch-lisa-no-ckpt | torch | lisa (no gradient checkpointing) | yes |" in table
  assert "| tiny-jax-grass-dots | jax | grass + remat dots | yes |" in table
  assert "error: out of memory" in table
  from benchmarks.common import _kernel_class
  assert _kernel_class("triton_poi_fused__to_copy_add_bmm_cat_clone_cos_mul") == "fusion (elementwise/reduce)"
  assert _kernel_class("memcpy128") == "copy" and _kernel_class("nvjet_sm90_tst_256x128_64x4") == "matmul"
  assert figure(path, tmp_path / "peers.png").stat().st_size > 10_000


def test_lisa_switcher_replays_another_rows_draws():
  # The same-draws PyTorch rows train the layers a GRASS row trained, in its order, then start over.
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  from benchmarks.peers import LisaSwitcher
  torch.manual_seed(0)
  model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                       num_attention_heads=2, num_key_value_heads=1))
  made = []
  switcher = LisaSwitcher(model, 2, False, lambda params: made.append(len(params)) or "opt", replay=[[2, 0], [3, 1]])
  seen = []
  for _ in range(3):
    assert switcher.switch() == "opt"
    trained = [i for i, layer in enumerate(model.model.layers) if all(p.requires_grad for p in layer.parameters())]
    frozen_rest = not any(p.requires_grad for p in model.model.embed_tokens.parameters())
    seen.append((switcher.active, trained, frozen_rest))
  assert seen == [([0, 2], [0, 2], True), ([1, 3], [1, 3], True), ([0, 2], [0, 2], True)]
  assert made == [2 * 9] * 3  # a fresh optimizer over the two layers' 9 tensors each time


def test_same_draws_rows_take_the_draws_of_a_grass_row_of_the_same_run(tmp_path, monkeypatch):
  # peers.py main: the PyTorch same-draws row replays what the GRASS row measured just before it
  # drew, whichever of its flag variants ran; without one it is skipped, not run on its own draws.
  import json
  import sys
  from benchmarks import peers
  draws = [[9, 11], [0, 17]]
  specs = {}

  def fake_run_one(spec, timeout, hlo_dir=None):
    specs[spec["framework"]] = spec
    return {**spec, "step_s": 0.1, "mean_step_s": 0.1, "whole_run_s": 1.0, "first_step_s": 0.5, "slow_steps": 0,
            "peak_bytes": 2**30, **({"draws": draws} if spec["framework"] == "jax" else {})}

  monkeypatch.setattr(peers, "run_one", fake_run_one)
  argv = ["peers.py", "--out-dir", str(tmp_path / "a"), "--steps", "10", "--only",
          "tiny-jax-grass-offload-late-chunk2048-nomerge", "tiny-torch-lisa-compile-same-draws"]
  monkeypatch.setattr(sys, "argv", argv)
  peers.main()
  assert specs["torch"]["replay"] == draws and specs["torch"]["replayed"].endswith("-nomerge")
  specs.clear()
  monkeypatch.setattr(sys, "argv", ["peers.py", "--out-dir", str(tmp_path / "b"), "--only",
                                    "tiny-torch-lisa-compile-same-draws"])
  peers.main()
  assert specs == {}  # skipped
  rows = [json.loads(l) for l in (tmp_path / "a" / "peers.jsonl").read_text().splitlines()]
  assert [r["name"] for r in rows] == ["tiny-jax-grass-offload-late-chunk2048-nomerge",
                                       "tiny-torch-lisa-compile-same-draws"]


def test_profile_summary_reports_host_copies_and_their_overlap():
  from benchmarks.common import summarize_kernels
  # 2 steps: H2D 0-10 us and D2H 5-15 us overlap 5 us; compute 12-22 us overlaps the copies 3 us.
  kernels = [dict(name="MemcpyH2D", ts=0, dur=10), dict(name="Memcpy DtoH (Device -> Pinned)", ts=5, dur=10),
             dict(name="loop_fusion", ts=12, dur=10)]
  copies = summarize_kernels(kernels, steps=2)["host_copies"]
  assert copies == {"h2d_ms": 0.005, "d2h_ms": 0.005, "h2d_beside_d2h_ms": 0.0025,
                    "copies_beside_compute_ms": 0.0015}


def test_an_invocation_is_appended_to_the_cards_file_and_its_lines_named(tmp_path):
  from benchmarks.peers import append_rows
  card = tmp_path / "peers_h100.jsonl"
  card.write_text('{"name": "old"}\n')
  rows = [{"name": "a", "profile": {"trace": "/tmp/x", "span_ms": 1.0}}, {"name": "b"}]
  assert append_rows(rows, card) == (2, 3)
  back = [json.loads(l) for l in card.read_text().splitlines()]
  assert [r["name"] for r in back] == ["old", "a", "b"] and back[1]["profile"] == {"span_ms": 1.0}
  assert append_rows([{"name": "c"}], tmp_path / "new.jsonl") == (1, 1)
