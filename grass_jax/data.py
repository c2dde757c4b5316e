"""Instruction-tuning data: loading, Alpaca templates, tokenization, length buckets.

Records follow LLM-Adapters' commonsense_170k / math_10k format:
``{"instruction": ..., "input": ..., "output": ..., "answer": ...}`` (``input``
and ``answer`` optional). The loss covers only the response tokens. Examples
are padded to the smallest of a few bucket lengths, so the train step
compiles once per bucket; the batch order is a pure function of
``(seed, epoch)`` and resumes exactly from ``(epoch, batch_index)``.

Example::

  >>> tok = ByteTokenizer()
  >>> ex = encode_example({'instruction': 'Add 2 and 3.', 'output': '5'}, tok, max_length=256)
  >>> tok.decode([t for t, m in zip(ex.tokens, ex.loss_mask) if m])
  '5'
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from grass_jax.errors import DataError
from grass_jax.local_paths import looks_local

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def shown(value: Any, limit: int = 60) -> str:
  """A user's value inside a one-line message: repr (newlines escaped), cut to ``limit`` characters."""
  text = repr(value)
  return text if len(text) <= limit else text[: limit - 3] + "..."


class Tokenizer(Protocol):
  pad_token_id: int | None
  eos_token_id: int | None
  bos_token_id: int | None

  def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as tokens (ids 3..258), with pad 0, bos 1, eos 2. Needs no files."""

  pad_token_id = 0
  bos_token_id = 1
  eos_token_id = 2
  vocab_size = 259

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    ids = [b + 3 for b in text.encode("utf-8")]
    return [self.bos_token_id, *ids] if add_special_tokens else ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")


BYTES_MARKER = "grass_jax_tokenizer.json"


def save_tokenizer_marker(tokenizer: Tokenizer, directory: str | Path) -> None:
  """Records a built-in tokenizer beside an exported model, so evaluation finds it without ``--tokenizer``."""
  if isinstance(tokenizer, ByteTokenizer):
    (Path(directory) / BYTES_MARKER).write_text('{"tokenizer": "bytes"}\n')


def load_tokenizer(spec: str | None, model_path: str | None) -> Tokenizer:
  """'bytes' for :class:`ByteTokenizer`; otherwise a HF tokenizer directory or hub id, or a GGUF model."""
  source = spec or model_path
  if source == "bytes" or (spec is None and model_path and (Path(model_path) / BYTES_MARKER).is_file()):
    return ByteTokenizer()
  if not source:
    raise DataError("no tokenizer: set model.tokenizer (a HF tokenizer directory, hub id, or 'bytes')")
  from transformers import AutoTokenizer

  if looks_local(source) and not Path(source).expanduser().exists():
    raise DataError(f"tokenizer {source!r}: no such file or directory; set model.tokenizer to a tokenizer "
                    "directory, a hub id, or 'bytes'")
  from grass_jax import gguf_checkpoint
  try:
    if gguf_checkpoint.is_gguf(source):  # the tokenizer inside the GGUF file, converted by transformers
      tok = gguf_checkpoint.load_tokenizer(gguf_checkpoint.resolve(source))
    else:
      tok = AutoTokenizer.from_pretrained(source)
  except gguf_checkpoint.GGUFError as e:
    raise DataError(str(e)) from e
  except Exception as e:  # noqa: BLE001
    raise DataError(f"cannot load the tokenizer from {source!r} ({type(e).__name__}: {e}); set model.tokenizer to "
                    "a local tokenizer directory, or HF_HUB_OFFLINE=1 to use the cache") from e
  if tok.pad_token_id is None:
    tok.pad_token = tok.eos_token or tok.unk_token
  return tok


def _looks_like_a_path(source: str) -> bool:
  """A data file's name: never tried as a hub id."""
  return looks_local(source, (".json", ".jsonl", ".parquet", ".csv", ".txt"))


def load_records(source: str, split: str = "train", *, test: bool = False) -> list[dict[str, Any]]:
  """Reads records from a local JSON/JSONL/parquet file or directory, or a hub dataset id.

  Training records need string ``instruction`` and ``output``; test records (``test=True``)
  need ``instruction`` and a gold ``answer`` (string or number) or ``output``.
  """
  path = Path(source).expanduser()
  if path.is_file():
    suffix = path.suffix.lower()

    def text() -> str:
      try:
        return path.read_text(encoding="utf-8")
      except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); JSON/JSONL files must be UTF-8") from e

    if suffix == ".jsonl":
      records = []
      for n, line in enumerate(text().splitlines(), 1):
        if not line.strip():
          continue
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{n} is not valid JSON: {e.msg}") from e
    elif suffix == ".json":
      try:
        data = json.loads(text())
      except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from e
      records = data.get("data", data.get(split)) if isinstance(data, dict) else data
      if not isinstance(records, list):
        raise DataError(f"{path} must hold a list of records (or {{'data': [...]}}); got {type(records).__name__}")
    elif suffix == ".parquet":
      import datasets
      try:
        records = list(datasets.load_dataset("parquet", data_files=str(path), split="train"))
      except Exception as e:  # noqa: BLE001 (pyarrow and datasets raise many types for a bad file)
        raise DataError(f"{path} is not a readable parquet file: {type(e).__name__}: {e}") from e
    else:
      raise DataError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl or .parquet")
  elif path.is_dir():
    import datasets
    try:
      records = list(datasets.load_dataset(str(path), split=split))
    except Exception as e:  # noqa: BLE001
      raise DataError(f"cannot read a dataset (split {split!r}) from directory {path}: {type(e).__name__}: {e}") from e
  elif "/" in source and not source.startswith((".", "/")) and not _looks_like_a_path(source):
    import datasets
    try:
      records = list(datasets.load_dataset(source, split=split))
    except Exception as e:  # noqa: BLE001
      raise DataError(f"cannot load dataset {source!r} (split {split!r}) from the hub: {type(e).__name__}: {e}. "
                      "Use a local JSON/JSONL/parquet file, or HF_DATASETS_OFFLINE=1 with a cached copy.") from e
  else:
    raise DataError(f"data file {source!r} does not exist")
  if not records:
    raise DataError(f"{source} holds no records")
  target = "'answer' (or 'output')" if test else "'output'"
  for i, r in enumerate(records):
    if not test and record_format(r) != "alpaca":
      continue  # a chat record: grass_jax.chat checks it
    ok = isinstance(r, dict) and isinstance(r.get("instruction"), str) and isinstance(r.get("input") or "", str)
    if ok and test:
      gold = r.get("answer", r.get("output"))
      ok = isinstance(gold, (str, int, float)) and not isinstance(gold, bool)
    elif ok:
      ok = isinstance(r.get("output"), str)
    if not ok:
      raise DataError(f"{source}: record {i} must be an object with a string 'instruction' and {target} "
                      f"(optional string 'input'); got {shown(r, 120)}")
  return records


# data.format's choices; 'auto' reads the format off the records (grass_jax.chat.detect_format)
FORMATS = ("auto", "alpaca", "messages", "prompt_completion")


def record_format(record: Any) -> str:
  """The format of one record: 'messages', 'prompt_completion' or 'alpaca' (by its keys)."""
  if isinstance(record, dict) and "messages" in record:
    return "messages"
  if isinstance(record, dict) and "prompt" in record and "completion" in record:
    return "prompt_completion"
  return "alpaca"


def question_text(record: dict[str, Any]) -> str:
  """A record's instruction and input as one question, without a template."""
  return record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")


def prompt_text(record: dict[str, Any]) -> str:
  """The Alpaca prompt of a record (what the model sees before its response)."""
  if record.get("input"):
    return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
  return PROMPT_NO_INPUT.format(instruction=record["instruction"])


class Example(NamedTuple):
  tokens: list[int]
  loss_mask: list[int]


def encode_example(record: dict[str, Any], tokenizer: Tokenizer, max_length: int) -> Example:
  """Prompt + response + eos; the loss mask covers the response and eos only."""
  return encode_prompt_response(prompt_text(record), record["output"], tokenizer, max_length)


def encode_prompt_response(prompt: str, response: str, tokenizer: Tokenizer, max_length: int) -> Example:
  """``prompt`` (with the tokenizer's special tokens), ``response`` and eos; the loss on the response and eos."""
  p = tokenizer.encode(prompt)
  r = tokenizer.encode(response, add_special_tokens=False)
  if tokenizer.eos_token_id is not None:
    r = [*r, tokenizer.eos_token_id]
  return Example((p + r)[:max_length], ([0] * len(p) + [1] * len(r))[:max_length])


def default_buckets(max_length: int) -> list[int]:
  out, b = [], 64
  while b < max_length:
    out.append(b)
    b *= 2
  return [*out, max_length]


@dataclasses.dataclass(frozen=True)
class Batching:
  """How a :class:`Dataset` cuts its examples into batches (``train.batch_size``, ``train.grad_accum``,
  ``data.buckets``, ``data.shuffle_seed``, ``data.packing``).

  Attributes:
    batch_size: rows per micro-batch.
    grad_accum: micro-batches per optimizer step.
    buckets: the padded lengths a batch may have (each batch takes the smallest that holds its longest
      example); empty: :func:`default_buckets` of the run's ``max_length``.
    seed: the shuffle's seed (each epoch shuffles with ``[seed, epoch]``).
    packing: several examples per row (see :class:`Dataset`).

  Example::

    >>> Batching(batch_size=4, buckets=[256, 128]).buckets
    (128, 256)
  """

  batch_size: int
  grad_accum: int = 1
  buckets: tuple[int, ...] = ()
  seed: int = 0
  packing: bool = False

  def __post_init__(self):
    object.__setattr__(self, "buckets", tuple(sorted(int(b) for b in (self.buckets or ()))))
    for name in ("batch_size", "grad_accum"):
      if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
        raise ValueError(f"{name} must be an int >= 1; got {getattr(self, name)!r}")
    if any(b < 1 for b in self.buckets):
      raise ValueError(f"buckets must be lengths >= 1; got {self.buckets}")


class Dataset:
  """Tokenized examples with deterministic, resumable, bucketed batches.

  A batch is a dict of int32 ``[grad_accum, batch_size, bucket]`` arrays:
  ``tokens``, ``attention_mask`` and ``loss_mask``. A last, partial batch of
  a bucket is filled with empty rows (all masks 0), so no example is dropped.

  ``packing``: each row holds as many examples as fit in the largest bucket, one after another (in the
  epoch's shuffled order, a new row when the next does not fit); ``attention_mask`` numbers them 1, 2,
  ... so that positions restart and attention stays within each (:func:`grass_jax.models.decoder.forward`),
  and each example's first token carries no loss (nothing before it in its own sequence predicts it).
  """

  def __init__(self, examples: list[Example], batching: Batching, *, pad_id: int):
    if not batching.buckets:
      raise ValueError("a Dataset needs Batching.buckets (build_dataset fills them from max_length)")
    if not examples:
      raise DataError("the dataset is empty after tokenization")
    usable = [e for e in examples if sum(e.loss_mask) > 0]
    if not usable:
      raise DataError("no example has response tokens left after truncation; raise data.max_length")
    self.examples = usable
    self.batching, self.pad_id = batching, pad_id
    self.lengths = np.array([len(e.tokens) for e in usable])
    self.bucket_of = np.searchsorted(self.buckets, self.lengths)

  @property
  def buckets(self) -> tuple[int, ...]:
    """The padded lengths a batch may have, ascending (``Batching.buckets``)."""
    return self.batching.buckets

  def __len__(self) -> int:
    return len(self.epoch_plan(0))

  def epoch_plan(self, epoch: int) -> list[tuple[int, list]]:
    """``[(bucket_length, rows)]`` for one epoch, a function of (seed, epoch) only: a row is an example's
    index, or with packing the list of the examples it holds."""
    batching = self.batching
    rng = np.random.default_rng([batching.seed, epoch])
    per_batch = batching.batch_size * batching.grad_accum
    if batching.packing:
      return self._packed_plan(rng.permutation(len(self.examples)), per_batch)
    pending: dict[int, list[int]] = {}
    plan = []
    for i in rng.permutation(len(self.examples)):
      b = int(self.bucket_of[i])
      pending.setdefault(b, []).append(int(i))
      if len(pending[b]) == per_batch:
        plan.append((self.buckets[b], pending.pop(b)))
    plan.extend((self.buckets[b], idx) for b, idx in sorted(pending.items()))
    return plan

  def _packed_plan(self, order: np.ndarray, per_batch: int) -> list[tuple[int, list]]:
    length = self.buckets[-1]
    rows, row, used = [], [], 0
    for i in order:
      n = int(self.lengths[i])
      if row and used + n > length:
        rows.append(row)
        row, used = [], 0
      row.append(int(i))
      used += n
    rows.append(row)
    return [(length, rows[k:k + per_batch]) for k in range(0, len(rows), per_batch)]

  def make_batch(self, length: int, indices: list) -> dict[str, np.ndarray]:
    n = self.batching.batch_size * self.batching.grad_accum
    tokens = np.full((n, length), self.pad_id, np.int32)
    attn = np.zeros((n, length), np.int32)
    loss = np.zeros((n, length), np.int32)
    for row, item in enumerate(indices):
      at = 0
      for seg, i in enumerate(item if isinstance(item, list) else [item], 1):
        e = self.examples[i]
        end = at + len(e.tokens)
        tokens[row, at:end] = e.tokens
        attn[row, at:end] = seg
        loss[row, at:end] = e.loss_mask
        if seg > 1:
          loss[row, at] = 0  # the previous sequence's last token does not predict this one
        at = end
    shape = (self.batching.grad_accum, self.batching.batch_size, length)
    return {"tokens": tokens.reshape(shape), "attention_mask": attn.reshape(shape), "loss_mask": loss.reshape(shape)}

  def iterate(self, start_epoch: int = 0, start_batch: int = 0,
              epochs: int = 1) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """Yields ``(epoch, batch_index, batch)`` from a resume position onwards."""
    for epoch in range(start_epoch, epochs):
      plan = self.epoch_plan(epoch)
      for k in range(start_batch if epoch == start_epoch else 0, len(plan)):
        yield epoch, k, self.make_batch(*plan[k])


def build_dataset(records: list[dict[str, Any]], tokenizer: Tokenizer, batching: Batching, *, max_length: int,
                  encode: Callable[[int, dict[str, Any]], Example] | None = None) -> Dataset:
  """``records`` tokenized (at most ``max_length`` tokens each) and batched as ``batching`` says.

  ``encode(index, record)``: a record's tokens and loss mask (default: Alpaca's, :func:`encode_example`).
  """
  examples = [encode_example(r, tokenizer, max_length) if encode is None else encode(i, r)
              for i, r in enumerate(records)]
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  if not batching.buckets:
    batching = dataclasses.replace(batching, buckets=tuple(default_buckets(max_length)))
  return Dataset(examples, batching, pad_id=pad)
