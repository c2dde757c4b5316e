"""The suite's numeric equalities, checked in the compile mode a user's run has.

The main session compiles for speed of compiling (tests/conftest.py), which rounds differently from XLA's
default flags. Tests marked ``default_flags`` compare numbers to the last bits; they are skipped there and
run here, all in one process at XLA's default flags.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_FLAGS_SESSION, default_xla_flags

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(DEFAULT_FLAGS_SESSION, reason="this is the default-flags session itself")
def test_numeric_equalities_hold_at_xla_default_flags():
  env = dict(os.environ, GRASS_TEST_DEFAULT_FLAGS="1",
             XLA_FLAGS=default_xla_flags(os.environ.get("XLA_FLAGS", "")))
  # Only the files that hold marked tests: collecting the whole suite would import torch and transformers.
  files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py")
                 if "@pytest.mark.default_flags" in f.read_text())
  p = subprocess.run([sys.executable, "-m", "pytest", "-n", "0", "-m", "default_flags", "-p", "no:cacheprovider",
                      *files], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]
  passed = re.search(r"(\d+) passed", p.stdout)
  # Every marked test ran and none was skipped: a silent skip would make this test unable to fail.
  assert passed and int(passed.group(1)) >= 10 and " skipped" not in p.stdout, p.stdout[-3000:]
