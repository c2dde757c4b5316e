"""benchmarks/peers.py's report: the table and the figure from its rows."""

import json


def test_peers_report_and_figure_from_rows(tmp_path):
  # benchmarks/peers.py --report/--figure: the table has every row (errors too), the figure is drawn.
  from benchmarks.peers import figure, finish_row, report
  base = dict(size="tinyllama-1.1b", batch=16, seq=512, run_steps=200, num_active=2, compile=True,
              device="NVIDIA H200", peak_bytes=5 * 2**30)
  rows = [finish_row("tiny-jax-grass", dict(base, framework="jax", method="grass", step_s=0.1, whole_run_s=25.0)),
          finish_row("tiny-torch-lisa", dict(base, framework="torch", method="lisa", step_s=0.125, whole_run_s=50.0)),
          finish_row("tiny-torch-lora", dict(base, framework="torch", method="lora", error="out of memory"))]
  path = tmp_path / "peers.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  table = report(path)
  assert "| tiny-jax-grass | jax | grass | yes | 2 | 81,920 | 65,536 | 5.00 |" in table
  assert "| tiny-torch-lisa | torch | lisa | yes | 2 | 65,536 | 32,768 | 5.00 |" in table
  assert "error: out of memory" in table
  assert figure(path, tmp_path / "peers.png").stat().st_size > 10_000
