"""Chat-format data: the loss mask covers the assistant turns exactly, token by token, for a Llama-3-style
template (here) and SmolLM2's own (tests/test_smollm2.py); bad records are one-line errors."""

import json

import numpy as np
import pytest

from grass_jax import chat
from grass_jax.data import ByteTokenizer, DataError, record_format

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# Llama 3's chat template, as its tokenizer_config.json has it (without the tool and date parts).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
WORDS = ["[UNK]", *SPECIAL, "system", "user", "assistant", "Be", "brief.", "Hi", "Hello!", "How", "are", "you?",
         "Fine.", "What", "is", "2+3?", "5"]


def llama3_style_tokenizer():
  """A word-level tokenizer with Llama 3's special tokens and chat template: every id is known by hand."""
  model = tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]")
  tok = tokenizers.Tokenizer(model)
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                              eos_token="<|eot_id|>", pad_token="[UNK]")
  fast.add_special_tokens({"additional_special_tokens": SPECIAL[1:3]})
  fast.chat_template = LLAMA3_TEMPLATE
  return fast


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"},
                {"role": "assistant", "content": "Fine."}]


def _ids(*words):
  return [WORDS.index(w) for w in words]


def test_multi_turn_mask_covers_each_assistant_turn_and_its_end_of_turn_token():
  tok = llama3_style_tokenizer()
  ex = chat.encode_record({"messages": CONVERSATION}, "messages", tok, 256, "r")
  B, S, E, T = SPECIAL
  want = [(_ids(B, S, "system", E, "Be", "brief.", T, S, "user", E, "Hi", T, S, "assistant", E), 0),
          (_ids("Hello!", T), 1),
          (_ids(S, "user", E, "How", "are", "you?", T, S, "assistant", E), 0),
          (_ids("Fine.", T), 1)]
  assert ex.tokens == [i for ids, _ in want for i in ids]
  assert ex.loss_mask == [m for ids, m in want for _ in ids]


def test_prompt_completion_records_learn_the_completion_only():
  tok = llama3_style_tokenizer()
  convo = chat.encode_record({"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]}, "prompt_completion", tok,
                             256, "r")
  full = chat.encode_record({"messages": CONVERSATION}, "messages", tok, 256, "r")
  assert convo.tokens == full.tokens
  assert sum(convo.loss_mask) == 2 and convo.loss_mask[-2:] == [1, 1]  # "Fine." and its <|eot_id|>
  text = chat.encode_record({"prompt": "What is 2+3?", "completion": "5"}, "prompt_completion", tok, 256, "r")
  # plain text: the tokenizer's own special tokens (this one adds no BOS), the completion and eos learn
  assert text.tokens == _ids("What", "is", "2+3?", "5", "<|eot_id|>")
  assert text.loss_mask == [0, 0, 0, 1, 1]


def test_evaluation_asks_in_the_template_with_the_generation_prompt():
  tok = llama3_style_tokenizer()
  B, S, E, _ = SPECIAL
  assert chat.prompt_ids({"instruction": "What is 2+3?"}, tok) == _ids(B, S, "user", E, "What", "is", "2+3?",
                                                                        "<|eot_id|>", S, "assistant", E)


@pytest.mark.parametrize("record, message", [
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "message 0 must have a role in system, user, assistant"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant turn, so nothing to learn"),
    ({"prompt": "Hi", "completion": ["x"]}, "must both be strings or both be lists of messages"),
])
def test_bad_records_are_named(record, message):
  with pytest.raises(DataError, match=message):
    chat.encode_record(record, record_format(record), llama3_style_tokenizer(), 64, "data.jsonl: record 7")


def test_formats_are_detected_and_a_mix_or_a_missing_template_is_refused(tmp_path):
  assert [record_format(r) for r in ({"instruction": "a", "output": "b"}, {"messages": []},
                                          {"prompt": "a", "completion": "b"})] == \
      ["alpaca", "messages", "prompt_completion"]
  with pytest.raises(DataError, match=r"d.jsonl: record 1 is alpaca but record 0 is messages"):
    chat.detect_format([{"messages": []}, {"instruction": "a", "output": "b"}], "d.jsonl")
  with pytest.raises(DataError, match="the tokenizer has no chat template"):
    chat.require_chat_template(ByteTokenizer(), "d.jsonl")


def test_training_on_messages_through_the_trainer(tmp_path):
  """A tiny model trains on chat records with the template's tokenizer; the batches' loss mask is the turns'."""
  from grass_jax import config as config_lib
  from grass_jax.train import Trainer
  tok = llama3_style_tokenizer()
  tok.save_pretrained(tmp_path / "tok")
  data = tmp_path / "chat.jsonl"
  data.write_text("".join(json.dumps({"messages": CONVERSATION}) + "\n" for _ in range(4)))
  cfg = config_lib.from_dict({
      "model": {"random_init": {"model_type": "llama", "vocab_size": len(WORDS) + 2, "hidden_size": 16,
                                "intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
                                "num_key_value_heads": 1}, "tokenizer": str(tmp_path / "tok")},
      "data": {"train": str(data), "max_length": 64, "buckets": [64]},
      "optim": {"num_active": 1, "period": 1, "learning_rate": 1e-3},
      "train": {"max_steps": 1, "batch_size": 2, "output_dir": str(tmp_path / "run"), "export": False}})
  trainer = Trainer(cfg, progress=False)
  assert trainer.prompt_format == "chat"
  batch = trainer.dataset.make_batch(64, [0, 1])
  mask = np.asarray(batch["loss_mask"]).reshape(-1, 64)[0]
  tokens = np.asarray(batch["tokens"]).reshape(-1, 64)[0]
  assert [WORDS[t] for t in tokens[mask == 1]] == ["Hello!", "<|eot_id|>", "Fine.", "<|eot_id|>"]
  trainer.train()
  assert trainer.finish()["steps"] == 1
