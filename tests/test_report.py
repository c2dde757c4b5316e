"""Every measured table in README.md and docs/ is what benchmarks/report.py makes of the committed rows."""

import shutil

from benchmarks import report


def test_committed_tables_are_what_the_result_files_give():
  assert report.differences() == []


def test_a_changed_number_is_caught_and_rewritten(tmp_path, monkeypatch):
  for rel in [*report.PAGES, report.PAIRED]:
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(report.ROOT / rel, tmp_path / rel)
  page = tmp_path / "README.md"
  page.write_text(page.read_text().replace("| **87.4%** |", "| **88.4%** |", 1))
  monkeypatch.setattr(report, "ROOT", tmp_path)
  assert report.differences() == ["README.md: paired_accuracy_readme"]
  monkeypatch.setattr("sys.argv", ["report.py"])
  assert report.main() == 0 and report.differences() == []
  assert "| **87.4%** |" in page.read_text()
