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
