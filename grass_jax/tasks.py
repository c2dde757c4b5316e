"""The evaluation tasks by name (LLM-Adapters' commonsense and math suites) and how answers are read.

Kept apart from :mod:`grass_jax.evaluate` so that the config can check task names without importing the
evaluation (generation, models).

Example::

  >>> canonical_task("arc-e"), canonical_task("GSM8K")
  ('ARC-Easy', 'gsm8k')
"""

from __future__ import annotations

# commonsense task -> the pattern of its answers (the first match in a generation counts)
COMMONSENSE = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
}
MATH = ("gsm8k", "AQuA", "mawps", "SVAMP", "AddSub", "SingleEq", "MultiArith")
TASKS = (*COMMONSENSE, *MATH)
ALIASES = {"siqa": "social_i_qa", "arc-e": "ARC-Easy", "arc-c": "ARC-Challenge", "obqa": "openbookqa",
           "aqua": "AQuA", "svamp": "SVAMP", "addsub": "AddSub", "singleeq": "SingleEq", "multiarith": "MultiArith"}


def canonical_task(name: str) -> str:
  """Task name as LLM-Adapters spells it (accepts short aliases, case-insensitive)."""
  for t in TASKS:
    if name.lower() == t.lower():
      return t
  if name.lower() in ALIASES:
    return ALIASES[name.lower()]
  raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
