"""Tokenizers: round trips, special ids, byte accounting, reloading, and errors on bad files."""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers

from jaxllm.data import ByteTokenizer, Tokenizer, load_tokenizer, train_bpe

STDLIB_FILES = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
SAMPLES = [
  "",
  "hello world",
  "héllo wörld — ünïcödé 🎉\n\ttabs  and  spaces\r\n",
  "text that spells <eos> and <pad> stays text",
]


def read(path: Path) -> str:
  return path.read_bytes().decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  """A small BPE tokenizer trained on 40 stdlib files."""
  texts = [read(p) for p in STDLIB_FILES[:40]]
  return train_bpe(texts, vocab_size=1024, save_path=tmp_path_factory.mktemp("bpe"))


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_round_trip(text):
  tok = ByteTokenizer()
  ids = tok.encode(text)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, np.frombuffer(text.encode(), np.uint8))
  assert tok.decode(ids) == text
  assert tok.token_bytes()[ids].sum() == len(text.encode())


def test_byte_specials():
  tok = load_tokenizer("byte")
  assert isinstance(tok, ByteTokenizer) and isinstance(tok, Tokenizer)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (256, 257, 258, 259)
  assert tok.vocab_size == 272
  assert tok.spec == "byte"
  ids = [tok.bos_id, *tok.encode("añb").tolist(), tok.eos_id, tok.pad_id, tok.mask_id, 265]
  assert tok.decode(ids) == "añb"
  assert tok.decode(np.array([0xFF, 0x61])) == "\ufffda"  # invalid UTF-8 is replaced
  token_bytes = tok.token_bytes()
  assert token_bytes.shape == (272,) and token_bytes.dtype == np.int32
  assert token_bytes[:256].tolist() == [1] * 256 and not token_bytes[256:].any()


def test_bpe_round_trip_and_token_bytes(bpe):
  token_bytes = bpe.token_bytes()
  assert token_bytes.shape == (bpe.vocab_size,)
  texts = [read(p) for p in STDLIB_FILES[100:106]] + SAMPLES  # files it was not trained on
  for text in texts:
    ids = bpe.encode(text)
    assert ids.dtype == np.int32
    assert bpe.decode(ids) == text
    assert token_bytes[ids].sum() == len(text.encode())
  assert len(bpe.encode(texts[0])) < len(texts[0].encode()) / 2  # it does compress


def test_bpe_specials(bpe):
  assert (bpe.bos_id, bpe.eos_id, bpe.pad_id, bpe.mask_id) == (0, 1, 2, 3)
  assert not bpe.token_bytes()[:4].any()
  ids = bpe.encode("<eos> <pad>")
  assert not np.isin(ids, [0, 1, 2, 3]).any()  # special names in text are plain text
  assert bpe.decode([bpe.bos_id, *bpe.encode("x = 1").tolist(), bpe.eos_id, bpe.pad_id]) == "x = 1"


def test_bpe_reload_gives_identical_ids(bpe):
  text = read(STDLIB_FILES[120])
  for spec in (bpe.spec, str(Path(bpe.spec).parent)):
    again = load_tokenizer(spec)
    np.testing.assert_array_equal(again.encode(text), bpe.encode(text))
    np.testing.assert_array_equal(again.token_bytes(), bpe.token_bytes())
    assert again.spec == bpe.spec


def test_gpt2_style_specials_fall_back_to_eos(tmp_path):
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["hello world"] * 10, trainer=trainer)
  tok.save(str(tmp_path / "tokenizer.json"))
  loaded = load_tokenizer(str(tmp_path / "tokenizer.json"))
  assert loaded.bos_id == loaded.eos_id == loaded.pad_id == 0 and loaded.mask_id is None
  assert loaded.decode([0, *loaded.encode("hello").tolist(), 0]) == "hello"


def test_train_bpe_rejects_tiny_vocab(tmp_path):
  with pytest.raises(ValueError, match="vocab_size"):
    train_bpe(["abc"], vocab_size=100, save_path=tmp_path)


def test_sentencepiece_round_trip(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(read(p) for p in STDLIB_FILES[:8]))
  spm.SentencePieceTrainer.train(
    input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=500, byte_fallback=True,
    normalization_rule_name="identity", remove_extra_whitespaces=False, character_coverage=0.99,
    minloglevel=2,
  )
  tok = load_tokenizer(str(tmp_path / "sp.model"))
  assert load_tokenizer(str(tmp_path)).spec == tok.spec  # the directory form finds it too
  assert tok.vocab_size == 500 and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
  token_bytes = tok.token_bytes()
  for text in ["def f(x):\n    return x + 1  # héllo 🎉", read(STDLIB_FILES[50])[:3000]]:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids.tolist(), tok.eos_id]) == text
    # The dummy-prefix "▁" SentencePiece puts before the text counts as one byte.
    assert token_bytes[ids].sum() == len(text.encode()) + 1


@pytest.mark.parametrize("name,kind", [("tokenizer.json", "tokenizer.json"),
                                       ("bad.model", "SentencePiece model")])
def test_corrupt_file_names_the_file(tmp_path, name, kind):
  path = tmp_path / name
  path.write_bytes(b"{ this is not a tokenizer \x00\x01")
  with pytest.raises(ValueError, match=re.escape(str(path))) as err:
    load_tokenizer(str(path))
  assert kind in str(err.value) and "byte" in str(err.value)


def test_missing_path_names_the_path(tmp_path):
  missing = tmp_path / "nope" / "tokenizer.json"
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    load_tokenizer(str(missing))
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
    load_tokenizer(str(tmp_path))  # a directory without a tokenizer in it
