"""Conversational training data: the tokenizer's own chat template, loss on the assistant turns only.

Two record formats besides Alpaca's (:mod:`grass_jax.data`), as TRL's ``SFTTrainer`` takes them:

* ``messages``: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``,
  rendered with the tokenizer's chat template; every assistant turn (its content and the template's
  end-of-turn text) carries the loss, everything else does not;
* ``prompt_completion``: ``{"prompt": str, "completion": str}`` (plain text, the loss on the
  completion and eos), or with ``prompt`` and ``completion`` lists of messages (a conversation whose
  completion turns carry the loss).

An assistant turn's span is found by rendering the conversation up to it twice: before it (with the
generation prompt) and with it. The template must render a conversation's start the same whatever
follows (every common template does); one that does not is named in the error.

Example::

  >>> from grass_jax.data import record_format
  >>> record_format({"messages": [{"role": "user", "content": "Hi"}]})
  'messages'
"""

from __future__ import annotations

from typing import Any

from grass_jax.data import (DataError, Example, Tokenizer, encode_example, encode_prompt_response, question_text,
                            record_format, shown)

ROLES = ("system", "user", "assistant")


def detect_format(records: list[dict[str, Any]], source: str) -> str:
  """The format every record of ``source`` has; a mix is an error naming the first record that differs."""
  first = record_format(records[0])
  for i, r in enumerate(records):
    if record_format(r) != first:
      raise DataError(f"{source}: record {i} is {record_format(r)} but record 0 is {first}; use one format per "
                      "file (or set data.format)")
  return first


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
  """``messages`` as a list of role/content dicts with at least one assistant turn, or a DataError at ``where``."""
  if not isinstance(messages, list) or not messages:
    raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
  for j, m in enumerate(messages):
    if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
      raise DataError(f"{where}: message {j} must have a role in {', '.join(ROLES)} and a string content; "
                      f"got {shown(m, 80)}")
  if not any(m["role"] == "assistant" for m in messages):
    raise DataError(f"{where}: no assistant turn, so nothing to learn; add one or drop the record")
  return messages


def _render(tokenizer: Tokenizer, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
  return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def require_chat_template(tokenizer: Tokenizer, source: str) -> None:
  if getattr(tokenizer, "chat_template", None) is None:
    raise DataError(f"{source} holds chat records, but the tokenizer has no chat template; set model.tokenizer to "
                    "one that has one (an instruct model's), or write the data as alpaca records")


def encode_messages(messages: list[dict[str, str]], tokenizer: Tokenizer, max_length: int,
                    where: str = "record", first_learned: int = 0) -> Example:
  """Tokens of the rendered conversation; the loss mask covers each assistant turn from message
  ``first_learned`` on (tokenized piece by piece, so a turn's tokens are its own)."""
  pieces: list[tuple[str, int]] = []  # (text, carries the loss)
  done = ""
  for k, m in enumerate(messages):
    if m["role"] != "assistant" or k < first_learned:
      continue
    before = _render(tokenizer, messages[:k], generation_prompt=True)
    after = _render(tokenizer, messages[:k + 1], generation_prompt=False)
    if not before.startswith(done) or not after.startswith(before):
      raise DataError(f"{where}: the chat template renders turn {k} differently depending on what follows, so "
                      "the assistant's tokens cannot be found; use prompt_completion records instead")
    pieces += [(before[len(done):], 0), (after[len(before):], 1)]
    done = after
  full = _render(tokenizer, messages, generation_prompt=False)
  pieces.append((full[len(done):], 0))
  tokens: list[int] = []
  mask: list[int] = []
  for text, loss in pieces:
    ids = tokenizer.encode(text, add_special_tokens=False) if text else []
    tokens += ids
    mask += [loss] * len(ids)
  return Example(tokens[:max_length], mask[:max_length])


def encode_record(record: dict[str, Any], fmt: str, tokenizer: Tokenizer, max_length: int, where: str) -> Example:
  """One training record of format ``fmt`` as tokens and loss mask."""
  if fmt == "alpaca":
    return encode_example(record, tokenizer, max_length)
  if fmt == "messages":
    return encode_messages(check_messages(record.get("messages"), where), tokenizer, max_length, where)
  prompt, completion = record.get("prompt"), record.get("completion")
  if isinstance(prompt, str) and isinstance(completion, str):
    return encode_prompt_response(prompt, completion, tokenizer, max_length)
  if isinstance(prompt, list) and isinstance(completion, list):
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in completion):
      raise DataError(f"{where}: the completion has no assistant turn, so nothing to learn")
    # the prompt's assistant turns are context: only the completion's learn
    return encode_messages(check_messages(prompt + completion, where), tokenizer, max_length, where,
                           first_learned=len(prompt))
  raise DataError(f"{where}: 'prompt' and 'completion' must both be strings or both be lists of messages")


def prompt_ids(record: dict[str, Any], tokenizer: Tokenizer) -> list[int]:
  """An Alpaca-style test record asked as a user turn, with the template's generation prompt (evaluation)."""
  rendered = _render(tokenizer, [{"role": "user", "content": question_text(record)}], generation_prompt=True)
  return tokenizer.encode(rendered, add_special_tokens=False)
