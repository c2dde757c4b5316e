"""Every measured table in README.md and docs/ is what benchmarks/report.py makes of the committed rows."""

import shutil

from benchmarks import report


def test_committed_tables_are_what_the_result_files_give():
  assert report.differences() == []


def test_a_changed_number_is_caught_and_rewritten(tmp_path, monkeypatch):
  for rel in [*report.PAGES, *report.sources()]:
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(report.ROOT / rel, tmp_path / rel)
  page = tmp_path / "README.md"
  page.write_text(page.read_text().replace("| 87.4% |", "| 88.4% |", 1))
  monkeypatch.setattr(report, "ROOT", tmp_path)
  assert report.differences() == ["README.md: paired_accuracy_readme"]
  monkeypatch.setattr("sys.argv", ["report.py"])
  assert report.main() == 0 and report.differences() == []
  assert "| 87.4% |" in page.read_text()


def test_the_speed_table_is_the_peers_rows_of_one_invocation_each():
  table = report.peers_speed_readme()
  assert "| 68,476 | **4.75** |" in table and "| 11,936 | 15.54 |" in table and "| **13,560** | **14.93** |" in table


def test_a_new_empty_table_is_filled_without_swallowing_the_next(tmp_path, monkeypatch):
  # A page gets a new table as an empty pair of markers; the next table and the text between must stay.
  for rel in [*report.PAGES, *report.sources()]:
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(report.ROOT / rel, tmp_path / rel)
  page = tmp_path / "docs" / "performance.md"
  text = page.read_text()
  start = text.index("<!-- report: peers_default_docs -->\n") + len("<!-- report: peers_default_docs -->\n")
  emptied = text[:start] + text[text.index("<!-- /report -->", start):]
  page.write_text(emptied)
  monkeypatch.setattr(report, "ROOT", tmp_path)
  assert report.render("docs/performance.md") == text


def test_the_performance_page_states_the_present_in_at_most_200_lines():
  # issue 41: how we got there belongs to performance-history.md
  assert len((report.ROOT / "docs/performance.md").read_text().splitlines()) <= 200


def test_the_profile_table_splits_each_rows_step_by_kernel_class():
  table = report.peers_profile_docs(*report.PEERS_PROFILE)
  assert "| 120.7 | 112.1 | 8.6 | 64.9 |" in table and "| 111.6 | 107.7 | 3.9 | 64.6 |" in table
  assert "lines 37-40: one invocation" in table


def test_every_result_file_is_named_by_a_page_script_or_test():
  # issue 41: nothing unreferenced in benchmarks/results (history lives in git, not in the folder).
  import subprocess
  tracked = subprocess.run(["git", "ls-files"], cwd=report.ROOT, capture_output=True, text=True).stdout.split()
  if not tracked:  # not a git checkout (an sdist): nothing to check against
    return
  results = [p for p in tracked if p.startswith("benchmarks/results/") and not p.endswith("README.md")]
  text = "\n".join((report.ROOT / p).read_text(errors="ignore") for p in tracked
                   if p.endswith((".py", ".md", ".yaml")) and p not in results)
  assert results and [p for p in results if p.split("/")[-1] not in text] == []


def test_every_benchmark_script_is_named_outside_itself():
  # issue 41: one script per question, and no probe left that nothing names.
  import subprocess
  tracked = subprocess.run(["git", "ls-files"], cwd=report.ROOT, capture_output=True, text=True).stdout.split()
  scripts = [p for p in tracked if p.startswith("benchmarks/") and p.endswith(".py") and "/results/" not in p
             and not p.endswith("__init__.py")]
  if not scripts:  # not a git checkout
    return
  texts = {p: (report.ROOT / p).read_text(errors="ignore") for p in tracked if p.endswith((".py", ".md", ".yaml"))}
  unnamed = [s for s in scripts
             if not any(s.split("/")[-1][:-3] in text for p, text in texts.items() if p != s)]
  assert unnamed == []
