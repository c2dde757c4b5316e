"""How long do the README's two commands take on this machine, from a fresh clone, and what do they print?

  python benchmarks/readme_times.py --out benchmarks/results/readme_times_cpu.json

Clones the repository's committed HEAD into a temporary directory and runs there, one after the
other, the README's main job (``pip install -e . && python scripts/train.py``) and its test command
(what ``.ci/run`` runs), timing the install and the run of each. Records the demo's held-out
accuracy, pytest's summary line and duration, the machine's CPU count, and where and when it ran.
The editable install is left pointing at the clone: run ``pip install -e .`` in your checkout after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(cmd: str, cwd: Path) -> tuple[float, str]:
  """Seconds and combined output of a shell command; raises with its tail when it fails."""
  t = time.perf_counter()
  p = subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True)
  if p.returncode:
    raise SystemExit(f"{cmd!r} failed ({p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
  return time.perf_counter() - t, p.stdout + p.stderr


def readme_commands() -> tuple[str, str]:
  """The README's demo and test commands, as written there (the first two bash blocks)."""
  blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
  return blocks[0].strip(), blocks[1].strip()


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--out", required=True)
  args = ap.parse_args()
  from benchmarks.common import provenance
  demo, tests = readme_commands()
  row = {**provenance(), "cpus": os.cpu_count(), "demo_command": demo, "test_command": tests}
  with tempfile.TemporaryDirectory() as tmp:
    clone = Path(tmp) / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    install, run = demo.split(" && ")
    row["demo_install_s"], _ = timed(install, clone)
    row["demo_run_s"], out = timed(run, clone)
    row["demo_accuracy_line"] = next((l for l in out.splitlines() if "accuracy on" in l), None)
    row["tests_s"], out = timed(tests, clone)
    summary = [l for l in out.splitlines() if re.search(r"\d+ passed", l)]
    row["pytest_summary"] = summary[-1] if summary else None
    found = re.search(r" in ([\d.]+)s", row["pytest_summary"] or "")
    row["pytest_s"] = float(found.group(1)) if found else None
  print(json.dumps(row, indent=1))
  Path(args.out).write_text(json.dumps(row, indent=1) + "\n")


if __name__ == "__main__":
  main()
