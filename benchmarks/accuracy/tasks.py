"""Synthetic pre-training corpus and downstream tasks for the controlled accuracy study.

No hub is reachable, so the study builds its own: a corpus that teaches numbers, sums and
sequences, and two downstream tasks whose difficulty sits in different places:

* ``arith``: three-step word problems ("Ann has 47 pens. Ann buys 25 more, gives away 13,
  then finds 8. ..."; the pre-training corpus only has one-step sums);
  the answer is the last number (scored like GSM8K).
* ``pattern``: multiple choice on arithmetic sequences ("2, 5, 8, 11, ?" with four options);
  the model works out the next number, then writes ``answerN`` (scored like ARC / OBQA in
  LLM-Adapters: the first ``answerN`` in the output counts).
"""

from __future__ import annotations

import random

NAMES = ["Ann", "Bob", "Cara", "Dan", "Eve", "Finn", "Gus", "Hana"]
ITEMS = ["pens", "apples", "books", "coins", "cards", "shells"]


def corpus(n: int, seed: int) -> list[str]:
  """Plain-text documents: arithmetic facts, counting sentences and number sequences."""
  rng = random.Random(seed)
  docs = []
  for _ in range(n):
    kind = rng.randrange(3)
    if kind == 0:
      a, b = rng.randint(0, 50), rng.randint(0, 50)
      op = rng.choice("+-")
      docs.append(f"{a} {op} {b} = {a + b if op == '+' else a - b}.")
    elif kind == 1:
      name, item, a = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(1, 20)
      docs.append(f"{name} has {a} {item}. {name} gets one more. Now {name} has {a + 1} {item}.")
    else:
      start, step = rng.randint(0, 20), rng.randint(1, 6)
      docs.append(", ".join(str(start + i * step) for i in range(6)) + ".")
  return docs


def arith(n: int, seed: int) -> list[dict]:
  """Three-step word problems with two-digit numbers (the pre-training corpus only has one step)."""
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c, d = rng.randint(10, 50), rng.randint(2, 40), rng.randint(1, 30), rng.randint(2, 20)
    s1 = a + b
    s2 = s1 - c
    total = s2 + d
    out.append({"instruction": f"{name} has {a} {item}. {name} buys {b} more, gives away {c}, "
                               f"then finds {d}. How many {item} does {name} have now?",
                "input": "", "output": f"{a} + {b} = {s1}. {s1} - {c} = {s2}. {s2} + {d} = {total}. "
                                       f"The answer is {total}.",
                "answer": str(total)})
  return out


def pattern(n: int, seed: int) -> list[dict]:
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    start, step = rng.randint(0, 30), rng.randint(1, 9)
    seq = [start + i * step for i in range(4)]
    right = start + 4 * step
    wrong = sorted({right + d for d in (-2 * step, -1, 1, step, 2)} - {right})
    options = [right, *rng.sample(wrong, 3)]
    rng.shuffle(options)
    k = options.index(right) + 1
    opts = " ".join(f"Answer{i + 1}: {o}" for i, o in enumerate(options))
    out.append({"instruction": f"Which number comes next: {', '.join(map(str, seq))}, ?\n\n{opts}\n\n"
                               "Answer format: answer1/answer2/answer3/answer4",
                "input": "", "output": f"The step is {step}. {seq[-1]} + {step} = {right}. The correct answer is answer{k}",
                "answer": f"answer{k}"})
  return out


DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def weekday(n: int, seed: int) -> list[dict]:
  """Calendar reasoning, multiple choice: "Today is Tuesday. What day will it be in 10 days?"

  Four weekday options; the rationale splits the offset into weeks and days. Scored like
  ARC / OBQA in LLM-Adapters (the first ``answerN`` counts).
  """
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    today, offset = rng.randrange(7), rng.randint(2, 40)
    right = (today + offset) % 7
    options = [right, *rng.sample([d for d in range(7) if d != right], 3)]
    rng.shuffle(options)
    k = options.index(right) + 1
    opts = " ".join(f"Answer{i + 1}: {DAYS[o]}" for i, o in enumerate(options))
    weeks, days = divmod(offset, 7)
    out.append({"instruction": f"Today is {DAYS[today]}. What day of the week will it be in {offset} days?\n\n"
                               f"{opts}\n\nAnswer format: answer1/answer2/answer3/answer4",
                "input": "", "output": f"{offset} days is {weeks} weeks and {days} days. {DAYS[today]} plus {days} "
                                       f"days is {DAYS[right]}. The correct answer is answer{k}",
                "answer": f"answer{k}"})
  return out


CITIES = ["Lyon", "Oslo", "Rome", "Porto", "Quito", "Dakar", "Hanoi", "Perth", "Turin", "Cork"]


def extract(n: int, seed: int) -> list[dict]:
  """Extraction and a sum: a shipping log of 4-6 lines, then "How many boxes went to Oslo and Rome together?"

  The model must find the two cities' lines among distractors (a city may appear twice; then both of its
  lines count) and add. The answer is a number, scored like GSM8K (the last number counts), so a run
  cannot collapse onto one option as multiple choice can.
  """
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    cities = rng.sample(CITIES, rng.randint(3, 5))
    lines = [(rng.choice(NAMES), c, rng.randint(2, 60)) for c in cities]
    lines.append((rng.choice(NAMES), rng.choice(cities), rng.randint(2, 60)))  # one city twice
    rng.shuffle(lines)
    asked = rng.sample(cities, 2)
    log = " ".join(f"{who} sent {k} boxes to {c}." for who, c, k in lines)
    parts = [k for _, c, k in lines if c in asked]
    found = " ".join(f"{c}: {k}." for _, c, k in lines if c in asked)
    out.append({"instruction": f"Shipping log: {log} How many boxes were sent to {asked[0]} and {asked[1]} "
                               "together?",
                "input": "", "output": f"{found} {' + '.join(map(str, parts))} = {sum(parts)}. "
                                       f"The answer is {sum(parts)}.",
                "answer": str(sum(parts))})
  return out


# (item, its plural, what one takes, the larger unit, its singular, its size, the amounts one may take)
UNITS = [("loaf", "loaves", "grams of flour", "kilograms", "kilogram", 1000, range(25, 1000, 25)),
         ("bottle", "bottles", "millilitres of juice", "litres", "litre", 1000, range(25, 1000, 25)),
         ("lap", "laps", "metres", "kilometres", "kilometre", 1000, range(25, 1000, 25)),
         ("song", "songs", "seconds", "minutes", "minute", 60, range(15, 600, 15)),
         ("tray", "trays", "eggs", "dozens", "dozen", 12, range(3, 120, 3))]


def units(n: int, seed: int) -> list[dict]:
  """A rate, a count and a unit change: "One loaf takes 250 grams of flour. How many kilograms do 6 loaves take?"

  Two steps with a rationale (multiply, then divide by the unit's size); the answer is a number, often a
  decimal (1.5), scored like GSM8K (the last number counts). About 4,500 distinct problems: its validation
  and test problems are kept out of its training set (:data:`DISJOINT`). The confirmation task of the paired
  study: made before any run on it, so that no sampler was chosen on it.
  """
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    item, items, small, large, one, factor, amounts = rng.choice(UNITS)
    count, per = rng.randint(2, 24), rng.choice(amounts)
    total = per * count
    answer = f"{total / factor:.3f}".rstrip("0").rstrip(".")  # exact: the amounts make at most 3 decimals
    word = small.split()[0]
    out.append({"instruction": f"One {item} takes {per} {small}. How many {large} do {count} {items} take? "
                               f"(1 {one} = {factor} {word}.)",
                "input": "", "output": f"{per} x {count} = {total} {word}. {total} / {factor} = {answer}. "
                                       f"The answer is {answer}.",
                "answer": answer})
  return out


MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
MONTH_DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]  # 2023, not a leap year


def _add_days(month: int, day: int, offset: int, lengths=MONTH_DAYS) -> tuple[int, int, list[str]]:
  """(month, day) ``offset`` days later, and the rationale's steps (one per month boundary crossed)."""
  steps, day = [], day + offset
  while day > lengths[month % 12]:
    steps.append(f"{MONTHS[month % 12]} has {lengths[month % 12]} days, so {day} - {lengths[month % 12]} = "
                 f"{day - lengths[month % 12]} in {MONTHS[(month + 1) % 12]}.")
    day -= lengths[month % 12]
    month += 1
  return month % 12, day, steps


def dates(n: int, seed: int, rationale: bool = True) -> list[dict]:
  """Date arithmetic, multiple choice: "It is March 28, 2023. What is the date 10 days later?"

  The model must know each month's length (which it half-knows) and add across one or two month
  boundaries. The wrong options are the usual slips: a 30/31-day month taken for the other, one day
  off, a week off. Scored like ARC / OBQA in LLM-Adapters (the first ``answerN`` counts).

  With the worked rationale SmolLM2 saturates it (LISA 99.2% after 750 steps, 2026-12-01);
  ``rationale=False`` (task ``dates_direct``) asks for the answer alone, as LLM-Adapters'
  commonsense sets do, so the date has to be worked out without writing the steps.
  """
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    month, day, offset = rng.randrange(12), rng.randint(1, 28), rng.randint(5, 45)
    m, d, steps = _add_days(month, day, offset)
    right = f"{MONTHS[m]} {d}"
    slips = [[31 if x == 30 else 30 if x == 31 else 30 for x in MONTH_DAYS]]
    wrong = {f"{MONTHS[wm]} {wd}" for wm, wd, _ in (_add_days(month, day, offset, l) for l in slips)}
    wrong |= {f"{MONTHS[wm]} {wd}" for wm, wd, _ in (_add_days(month, day, offset + k) for k in (-1, 1, 7, -7))}
    wrong.discard(right)
    options = [right, *rng.sample(sorted(wrong), 3)]
    rng.shuffle(options)
    k = options.index(right) + 1
    opts = " ".join(f"Answer{i + 1}: {o}" for i, o in enumerate(options))
    work = " ".join([f"{day} + {offset} = {day + offset}.", *steps, f"The date is {right}. "]) if rationale else ""
    out.append({"instruction": f"It is {MONTHS[month]} {day}, 2023. What is the date {offset} days later?\n\n"
                               f"{opts}\n\nAnswer format: answer1/answer2/answer3/answer4",
                "input": "", "output": f"{work}The correct answer is answer{k}", "answer": f"answer{k}"})
  return out


def dates_direct(n: int, seed: int) -> list[dict]:
  """:func:`dates` with the answer alone, no worked rationale."""
  return dates(n, seed, rationale=False)


def parity_demo(directory, *, n_train: int = 1000, n_test: int = 200, seed: int = 0) -> dict[str, str]:
  """The CPU demo's task: "Is 5407 an even number?" -> "the answer is false" (scored like BoolQ).

  Train and test numbers are disjoint, so the test accuracy is of numbers the model never saw: it
  must learn to read the last digit. Writes ``tiny_parity_{train,test}.jsonl``; returns their paths.
  """
  import json
  from pathlib import Path
  rng = random.Random(seed)
  numbers = rng.sample(range(10, 100000), n_train + n_test)

  def record(x: int) -> dict:
    answer = "true" if x % 2 == 0 else "false"
    return {"instruction": f"Is {x} an even number?", "input": "", "output": f"the answer is {answer}",
            "answer": answer}

  paths = {}
  for split, chunk in (("train", numbers[:n_train]), ("test", numbers[n_train:])):
    path = Path(directory) / f"tiny_parity_{split}.jsonl"
    path.write_text("".join(json.dumps(record(x)) + "\n" for x in chunk))
    paths[split] = str(path)
  return paths


TASKS = {"arith": (arith, "gsm8k"), "pattern": (pattern, "openbookqa"), "weekday": (weekday, "openbookqa"),
         "dates": (dates, "openbookqa"), "dates_direct": (dates_direct, "openbookqa"), "extract": (extract, "gsm8k"),
         "units": (units, "gsm8k")}


# Tasks whose validation and test problems are never training problems. The older tasks keep the files
# their committed runs were scored on (their splits come from disjoint seeds, not disjoint problems).
DISJOINT = {"units"}


def _split(task: str, n: int, seed: int, seen: set[str]) -> list[dict]:
  """``n`` records of ``task`` from ``seed``; for a :data:`DISJOINT` task none whose instruction is in ``seen``."""
  make = TASKS[task][0]
  if task not in DISJOINT:
    return make(n, seed)
  out: list[dict] = []
  draws = n
  while len(out) < n:
    fresh = [r for r in make(draws, seed) if r["instruction"] not in seen]
    out = fresh[:n]
    if draws > 50 * n:
      raise ValueError(f"task {task}: fewer than {n} problems outside its training set")
    draws *= 2
  return out


def write_splits(task: str, directory, *, n_train: int, n_val: int, n_test: int) -> dict[str, str]:
  """Writes ``<task>_{train,val,test}.jsonl`` (disjoint seeds) and returns their paths."""
  import json
  from pathlib import Path
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  paths, seen = {}, set()
  for split, n, seed in (("train", n_train, 1), ("val", n_val, 2), ("test", n_test, 3)):
    path = directory / f"{task}_{split}.jsonl"
    if not path.exists():
      path.write_text("".join(json.dumps(r) + "\n" for r in _split(task, n, seed, seen if split != "train" else set())))
    if split == "train":
      seen = {json.loads(l)["instruction"] for l in path.read_text().splitlines()}
    paths[split] = str(path)
  return paths


def as_messages(path):
  """An Alpaca records file as chat records (user: the instruction and input, assistant: the output), beside
  it as ``<name>_messages.jsonl``; an existing one is kept. Returns its path."""
  import json
  from pathlib import Path

  from grass_jax.data import question_text
  path = Path(path)
  out = path.with_name(path.stem + "_messages.jsonl")
  if not out.exists():
    lines = []
    for line in path.read_text().splitlines():
      r = json.loads(line)
      lines.append(json.dumps({"messages": [{"role": "user", "content": question_text(r)},
                                            {"role": "assistant", "content": r["output"]}]}))
    out.write_text("\n".join(lines) + "\n")
  return out


if __name__ == "__main__":  # python benchmarks/accuracy/tasks.py data/ : the files configs/*.yaml read
  import sys
  out = sys.argv[1] if len(sys.argv) > 1 else "data"
  for name in ("arith", "weekday", "dates", "dates_direct"):
    write_splits(name, out, n_train=4000, n_val=200, n_test=500)
  as_messages(f"{out}/arith_train.jsonl")  # configs/smollm2-135m-chat.yaml: the same problems as chat turns
  parity_demo(out)
