"""Accuracy on LLM-Adapters' commonsense and math suites with batched greedy generation.

The model answers the Alpaca prompt of each test record; the answer is
extracted from the generated text as LLM-Adapters does it:

* commonsense (multiple choice): the first option keyword the model writes
  (``true``/``false`` for BoolQ, ``solution1``/``2`` for PIQA, ``answer1..5``
  for SIQA, ARC and OBQA, ``ending1..4`` for HellaSwag, ``option1``/``2`` for
  WinoGrande), compared with the record's ``answer``;
* math: the last number in the text (``,`` removed), equal to the answer
  within 1e-3; for AQuA the first letter A-E.

Prompts are left-padded to a few bucket lengths so generation compiles once
per bucket.

Example::

  >>> extract_answer("gsm8k", "She has 3 + 4 = 7 apples. The answer is 7.")
  '7'
  >>> extract_answer("boolq", "the correct answer is false")
  'false'
  >>> is_correct("gsm8k", "7.0", "7")
  True
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from grass_jax.data import Tokenizer, load_records, prompt_text, question_text
from grass_jax.generate import greedy_generate
from grass_jax.models.decoder import DecoderConfig, Params
from grass_jax.tasks import COMMONSENSE, MATH, canonical_task

def extract_answer(task: str, text: str) -> str:
  """The answer the model gave, '' when it gave none."""
  task = canonical_task(task)
  if task in COMMONSENSE:
    found = re.findall(COMMONSENSE[task], text.strip())
    return found[0] if found else ""
  if task == "AQuA":
    found = re.findall(r"A|B|C|D|E", text.strip())
    return found[0] if found else ""
  found = re.findall(r"-?\d+\.?\d*", text.replace(",", ""))
  return found[-1].rstrip(".") if found else ""


def is_correct(task: str, prediction: str, answer: Any) -> bool:
  task = canonical_task(task)
  if task in MATH and task != "AQuA":
    try:
      return abs(float(prediction) - float(str(answer).replace(",", ""))) < 1e-3
    except ValueError:
      return False
  return prediction.strip() == str(answer).strip()


def _bucket(n: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if n <= b:
      return b
  return buckets[-1]


PROMPT_FORMATS = ("alpaca", "chat", "plain")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """How a task is scored, validated when built.

  Attributes:
    batch_size: prompts generated at once (fewer prompts: the next power of two above their number).
    max_new_tokens: tokens generated per prompt; None: 32 for the commonsense tasks, 256 for math.
    buckets: prompt lengths (tokens) prompts are left-padded up to, so generation compiles once per bucket;
      a longer prompt keeps its end. None: 128, 256, 512, 1024.
    dtype: compute dtype of generation.
    progress: a progress bar over the prompts.
    prompt_format: how a test record is asked: 'alpaca' (the Alpaca prompt), 'chat' (a user turn in the
      tokenizer's chat template, for a model trained on chat records) or 'plain' (the instruction as it is).
  """

  batch_size: int = 16
  max_new_tokens: int | None = None
  buckets: Sequence[int] | None = None
  dtype: Any = jnp.float32
  progress: bool = False
  prompt_format: str = "alpaca"

  def __post_init__(self):
    if self.prompt_format not in PROMPT_FORMATS:
      raise ValueError(f"prompt_format must be 'alpaca', 'chat' or 'plain'; got {self.prompt_format!r}")
    if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
      raise ValueError(f"batch_size must be an int >= 1; got {self.batch_size!r}")
    if self.max_new_tokens is not None and not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
      raise ValueError(f"max_new_tokens must be an int >= 1 (or None: the task's default); got {self.max_new_tokens!r}")
    buckets = (128, 256, 512, 1024) if self.buckets is None else tuple(sorted(int(b) for b in self.buckets))
    if not buckets or buckets[0] < 1:
      raise ValueError(f"buckets must be prompt lengths >= 1; got {self.buckets!r}")
    object.__setattr__(self, "buckets", buckets)


def _options(options: EvalOptions | None, fields: dict[str, Any]) -> EvalOptions:
  return EvalOptions(**fields) if options is None else dataclasses.replace(options, **fields)


def generate_texts(params: Params, config: DecoderConfig, tokenizer: Tokenizer, prompts: list[str] | list[list[int]],
                   options: EvalOptions | None = None, /, **fields: Any) -> list[str]:
  """Greedy continuations of ``prompts`` (texts, or token ids as they are; batched, left-padded to buckets).

  ``options``, ``fields``: :class:`EvalOptions`, or its fields as keywords (which replace the options' own);
  ``max_new_tokens`` must be set. ``prompt_format`` is not used (the prompts are already asked).
  """
  from tqdm.auto import tqdm
  o = _options(options, fields)
  if o.max_new_tokens is None:
    raise ValueError("generate_texts needs max_new_tokens (EvalOptions.max_new_tokens)")
  encoded = [list(p) if isinstance(p, list) else tokenizer.encode(p) for p in prompts]
  order = np.argsort([len(e) for e in encoded], kind="stable")  # similar lengths batch together
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  eos = tokenizer.eos_token_id
  out: list[str] = [""] * len(prompts)
  bar = tqdm(total=len(prompts), disable=not o.progress, unit="ex", dynamic_ncols=True)
  # Fewer prompts than a batch: a smaller batch (a power of two, so that few shapes compile), not filler rows.
  batch_size = min(o.batch_size, 1 << max(len(prompts) - 1, 0).bit_length())
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    length = _bucket(max(len(encoded[i]) for i in idx), o.buckets)
    tokens = np.full((batch_size, length), pad, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for row, i in enumerate(idx):
      ids = encoded[i][-length:]  # keep the end of over-long prompts: the question is there
      tokens[row, length - len(ids):] = ids
      mask[row, length - len(ids):] = 1
    mask[len(idx):, -1] = 1  # filler rows: one dummy token, results ignored
    gen = np.asarray(greedy_generate(params, config, jnp.asarray(tokens), jnp.asarray(mask), o.max_new_tokens,
                                     eos_token_id=eos, dtype=o.dtype))
    for row, i in enumerate(idx):
      ids = gen[row].tolist()
      if eos is not None and eos in ids:
        ids = ids[:ids.index(eos)]
      out[i] = tokenizer.decode(ids, skip_special_tokens=True)
    bar.update(len(idx))
  bar.close()
  return out


def evaluate(params: Params, config: DecoderConfig, tokenizer: Tokenizer, task: str, records: list[dict],
             options: EvalOptions | None = None, /, **fields: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Returns ``(summary, per-example predictions)`` for one task.

  ``options``, ``fields``: how it is scored, :class:`EvalOptions` or its fields as keywords (which replace
  the options' own).

  Example::

    summary, rows = evaluate(params, config, tokenizer, "gsm8k", records, batch_size=64, max_new_tokens=128)
  """
  o = _options(options, fields)
  task = canonical_task(task)
  if not records:
    raise ValueError(f"no records to evaluate for {task}")
  if o.max_new_tokens is None:
    o = dataclasses.replace(o, max_new_tokens=32 if task in COMMONSENSE else 256)
  if o.prompt_format == "chat":
    from grass_jax.chat import prompt_ids
    prompts: list = [prompt_ids(r, tokenizer) for r in records]
  elif o.prompt_format == "plain":
    prompts = [question_text(r) for r in records]
  else:
    prompts = [prompt_text(r) for r in records]
  texts = generate_texts(params, config, tokenizer, prompts, o)
  rows = []
  for r, text in zip(records, texts):
    gold = r.get("answer", r.get("output"))
    pred = extract_answer(task, text)
    rows.append({"instruction": r["instruction"], "generation": text, "prediction": pred, "answer": gold,
                 "correct": is_correct(task, pred, gold)})
  correct = sum(row["correct"] for row in rows)
  return {"task": task, "examples": len(rows), "correct": correct, "accuracy": correct / len(rows)}, rows


def write_results(out_dir: str | Path, summary: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  with (out / f"{summary['task']}_predictions.jsonl").open("w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  (out / f"{summary['task']}_summary.json").write_text(json.dumps(summary, indent=2))
  return out


def load_task_records(task: str, data: str | None, limit: int | None = None) -> list[dict[str, Any]]:
  """Test records from ``data`` (file, directory or hub id); default ``dataset/<task>/test.json`` (LLM-Adapters)."""
  task = canonical_task(task)
  source = data or f"dataset/{task}/test.json"
  records = load_records(source, split="test", test=True)
  return records[:limit] if limit else records
