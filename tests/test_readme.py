"""The README's and docs' Python examples run as written; the README links only to pages that exist."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _python_blocks(page: pathlib.Path) -> list[str]:
  return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def test_readme_and_docs_have_python_examples():
  assert sum(len(_python_blocks(p)) for p in PAGES) >= 3


@pytest.mark.parametrize("page", [p for p in PAGES if _python_blocks(p)], ids=lambda p: p.name)
def test_python_blocks_run(page):
  for block in _python_blocks(page):
    exec(compile(block, str(page), "exec"), {})  # noqa: S102


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_point_at_files(page):
  for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
    if "://" not in target:
      assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_readme_is_a_short_front_page_whose_test_command_is_what_ci_runs():
  text = (ROOT / "README.md").read_text()
  size = len(text.encode())
  assert size <= 8192, f"README.md is {size} bytes; keep it under 8 KB (details go in docs/)"
  ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
  assert f"```bash\n{ci}\n```" in text, "the README's test command differs from .ci/run's"
  assert "```bash\npython -m pip install -e . && python scripts/train.py\n```" in text


def test_the_readmes_times_are_those_of_its_committed_measurement():
  # benchmarks/readme_times.py writes the file from a fresh clone; the README states what it holds.
  import json
  t = json.loads((ROOT / "benchmarks/results/readme_times_cpu.json").read_text())
  text = (ROOT / "README.md").read_text()
  passed, skipped = re.search(r"(\d+) passed, (\d+) skipped", t["pytest_summary"]).groups()
  assert f"({round(t['pytest_s'])} s of pytest on two cores, {passed} tests and {skipped} skipped, " \
         f"{round(t['tests_s'])} s with the install)" in text
  assert f"a tiny CPU demo ({round(t['demo_run_s'])} s, install {round(t['demo_install_s'])} s)" in text
  assert t["cpus"] == 2 and t["demo_accuracy_line"].endswith("100.0%") and "**100%**" in text
