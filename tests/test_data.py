"""Corpora and Grain pipelines: splits, the write-once cache, packing, determinism, resume."""

from __future__ import annotations

import json
import re

import grain
import numpy as np
import pytest

from jaxllm.data import (
  ByteTokenizer,
  DataConfig,
  eval_batches,
  prepare_corpus,
  read_manifest,
  token_counts,
  train_iterator,
)
from jaxllm.data import corpus

TOK = ByteTokenizer()
SEQ, BATCH = 15, 3


def make_folder(root, n=60, seed=0):
  """`n` distinct text files of 1..300 words in nested folders, plus files to be ignored."""
  rng = np.random.default_rng(seed)
  words = ["alpha", "beta", "γάμμα", "delta", "ünïcode", "🎉", "\n", "def", "x = 1"]
  for i in range(n):
    path = root / f"d{i % 4}" / f"doc{i:03d}{['.txt', '.md', '.py', '.rst'][i % 4]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"document {i}: " + " ".join(rng.choice(words, rng.integers(1, 300))))
  (root / "d0" / "image.bin").write_bytes(b"\x00\x01")
  (root / ".hidden").mkdir()
  (root / ".hidden" / "secret.txt").write_text("never read")
  return root


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
  folder = make_folder(tmp_path_factory.mktemp("folder"))
  return DataConfig(source=str(folder), cache_dir=str(tmp_path_factory.mktemp("cache")),
                    val_fraction=0.2, shuffle_window=8)


def doc_tokens(cfg: DataConfig, split: str) -> list[np.ndarray]:
  """tokenize(doc) + [eos] for every document of `split`, in file order, read from the files."""
  root = corpus.source_root(cfg.source)
  files = corpus.split_files(corpus.list_files(cfg.source, cfg.extensions), cfg.val_fraction)[split]
  texts = [(root / f).read_bytes().decode("utf-8", errors="replace") for f in files]
  return [np.append(TOK.encode(t), TOK.eos_id).astype(np.int32) for t in texts]


def rows(batches) -> np.ndarray:
  return np.concatenate([b["tokens"] for b in batches])


def pieces(stream: np.ndarray) -> list[bytes]:
  """The complete documents in a token stream that starts at a document start."""
  ends = np.flatnonzero(stream == TOK.eos_id)
  return [stream[a + 1:b + 1].tobytes() for a, b in zip([-1, *ends[:-1]], ends)]


def take(it, n):
  return [next(it)["tokens"] for _ in range(n)]


def test_stdlib_split_is_deterministic_and_disjoint():
  files = corpus.list_files("stdlib")
  assert len(files) > 1000 and files == sorted(files)
  assert not any("site-packages" in f or "dist-packages" in f for f in files)
  splits = corpus.split_files(files, 0.05)
  again = corpus.split_files(files[::-1], 0.05)
  assert {k: set(v) for k, v in splits.items()} == {k: set(v) for k, v in again.items()}
  assert not set(splits["train"]) & set(splits["validation"])
  assert set(splits["train"]) | set(splits["validation"]) == set(files)
  assert 0.03 < len(splits["validation"]) / len(files) < 0.07


def test_stdlib_records_equal_files():
  paths = prepare_corpus("stdlib")  # JAXLLM_CACHE from conftest.py
  manifest = read_manifest(paths["train"][0])
  root = corpus.source_root("stdlib")
  assert sum(s["num_docs"] for s in manifest["splits"].values()) == len(corpus.list_files("stdlib"))
  for split in ("train", "validation"):
    source = grain.sources.ArrayRecordDataSource(paths[split])
    files = manifest["splits"][split]["files"]
    assert len(source) == len(files) == manifest["splits"][split]["num_docs"]
    for i in range(0, len(files), 7):
      text = (root / files[i]).read_bytes().decode("utf-8", errors="replace")
      assert source[i] == text.encode("utf-8"), files[i]


def test_prepare_writes_once_and_rewrites_on_change(tmp_path):
  folder, cache = make_folder(tmp_path / "src", n=12), tmp_path / "cache"
  paths = prepare_corpus(str(folder), str(cache), val_fraction=0.3)
  (written,) = cache.iterdir()
  mtimes = {p.name: p.stat().st_mtime_ns for p in written.iterdir()}
  assert set(mtimes) == {"train.array_record", "validation.array_record", "manifest.json"}
  assert prepare_corpus(str(folder), str(cache), val_fraction=0.3) == paths
  assert {p.name: p.stat().st_mtime_ns for p in written.iterdir()} == mtimes
  assert list(cache.iterdir()) == [written]  # no temporary folders left behind
  manifest = read_manifest(written)
  assert sum(manifest["splits"][s]["num_docs"] for s in ("train", "validation")) == 12
  for split, files in manifest["splits"].items():
    records = list(grain.sources.ArrayRecordDataSource(paths[split]))
    assert records == [(folder / f).read_bytes() for f in files["files"]]
    assert files["bytes"] == sum(map(len, records))
  (folder / "d0" / "new.txt").write_text("a new file")
  assert prepare_corpus(str(folder), str(cache), val_fraction=0.3) != paths
  assert len(list(cache.iterdir())) == 2


def test_interrupted_write_leaves_no_cache(tmp_path, monkeypatch):
  folder, cache = make_folder(tmp_path / "src", n=12), tmp_path / "cache"
  calls = []

  def failing_read(path):
    calls.append(path)
    if len(calls) == 5:
      raise KeyboardInterrupt
    return path.read_bytes()

  monkeypatch.setattr(corpus, "_read_text", failing_read)
  with pytest.raises(KeyboardInterrupt):
    prepare_corpus(str(folder), str(cache))
  assert list(cache.iterdir()) == []
  monkeypatch.undo()
  paths = prepare_corpus(str(folder), str(cache))
  assert len(grain.sources.ArrayRecordDataSource(paths["train"])) > 0


def test_folder_errors_name_the_path(tmp_path):
  missing = tmp_path / "missing"
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    prepare_corpus(str(missing), str(tmp_path / "cache"))
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "data.bin").write_bytes(b"\x00")
  with pytest.raises(ValueError, match=re.escape(str(empty))):
    prepare_corpus(str(empty), str(tmp_path / "cache"))
  one = tmp_path / "one"
  one.mkdir()
  name = next(f"f{i}.txt" for i in range(100) if corpus.split_of(f"f{i}.txt", 0.05) == "train")
  (one / name).write_text("only a train document")
  one_cfg = DataConfig(source=str(one), cache_dir=str(tmp_path / "cache"))
  with pytest.raises(ValueError, match=f"validation split of data source '{re.escape(str(one))}'"):
    list(eval_batches(one_cfg, TOK, SEQ, BATCH))
  with pytest.raises(ValueError, match="process_count=2"):
    train_iterator(one_cfg, TOK, SEQ, BATCH, process_index=1, process_count=2)


@pytest.mark.parametrize("field,value", [
  ("val_fraction", 0.0), ("val_fraction", 1.5), ("seed", -1), ("extensions", ("txt",)),
  ("extensions", ()), ("source", ""), ("tokenizer", ""), ("shuffle_window", 0),
])
def test_config_errors_name_the_field(field, value):
  with pytest.raises(ValueError, match=f"DataConfig.{field}"):
    DataConfig(**{field: value})


def test_eval_packing_loses_no_token(cfg):
  batches = list(eval_batches(cfg, TOK, SEQ, BATCH))
  assert all(b["tokens"].shape == (BATCH, SEQ + 1) for b in batches)
  assert all(b["tokens"].dtype == np.int32 for b in batches)
  again = list(eval_batches(cfg, TOK, SEQ, BATCH))  # deterministic and re-iterable
  np.testing.assert_array_equal(rows(again), rows(batches))
  stream = rows(batches).ravel()
  expected = np.concatenate(doc_tokens(cfg, "validation"))
  np.testing.assert_array_equal(stream[stream != TOK.pad_id], expected)
  np.testing.assert_array_equal(stream[:len(expected)], expected)  # pads only at the very end
  assert len(stream) - len(expected) < BATCH * (SEQ + 1)
  assert len(list(eval_batches(cfg, TOK, SEQ, BATCH, max_batches=2))) == 2


def test_eval_on_stdlib_validation():
  stdlib = DataConfig()
  stream = rows(eval_batches(stdlib, TOK, 255, 16)).ravel()
  expected = np.concatenate(doc_tokens(stdlib, "validation"))
  np.testing.assert_array_equal(stream[stream != TOK.pad_id], expected)


def test_eval_processes_share_rows_and_batch_count(cfg):
  single = rows(eval_batches(cfg, TOK, SEQ, 2))
  parts = [rows(eval_batches(cfg, TOK, SEQ, 2, process_index=i, process_count=3)) for i in range(3)]
  assert len({len(p) for p in parts}) == 1  # same number of batches everywhere
  pad_row = np.full(SEQ + 1, TOK.pad_id)
  real = [r for r in np.stack(parts, 1).reshape(-1, SEQ + 1) if (r != pad_row).any()]
  np.testing.assert_array_equal(np.stack(real), single[(single != pad_row).any(1)])


def test_train_rows_tile_shuffled_epochs(cfg):
  cfg = DataConfig(**{**cfg.__dict__, "shuffle_window": 1})
  docs = {d.tobytes() for d in doc_tokens(cfg, "train")}
  n_rows = 2 * sum(len(d) for d in docs) // (SEQ + 1) + 2  # a bit more than two epochs
  it = train_iterator(cfg, TOK, SEQ, BATCH)
  seen = pieces(rows({"tokens": b} for b in take(it, n_rows // BATCH + 1)).ravel())
  first, second = seen[:len(docs)], seen[len(docs):2 * len(docs)]
  assert set(first) == docs == set(second)  # each epoch is a permutation of the split
  assert first != second  # reshuffled each epoch


def test_train_is_deterministic(cfg):
  a = take(train_iterator(cfg, TOK, SEQ, BATCH), 20)
  b = take(train_iterator(cfg, TOK, SEQ, BATCH), 20)
  c = take(train_iterator(DataConfig(**{**cfg.__dict__, "seed": 1}), TOK, SEQ, BATCH), 20)
  assert a[0].shape == (BATCH, SEQ + 1) and a[0].dtype == np.int32
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  assert not np.array_equal(np.stack(a), np.stack(c))


@pytest.mark.parametrize("seq_len,k", [(SEQ, 0), (SEQ, 1), (SEQ, 7), (SEQ, 30), (255, 20)])
def test_train_resumes_exactly(cfg, seq_len, k):
  it = train_iterator(cfg, TOK, seq_len, BATCH)
  take(it, k)
  state = json.loads(json.dumps(it.get_state()))  # how a checkpoint stores it
  expected = take(it, 40)  # crosses shuffle windows; with seq_len 255 also epochs
  resumed = train_iterator(cfg, TOK, seq_len, BATCH)
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack(take(resumed, 40)), np.stack(expected))


def test_train_processes_get_disjoint_documents(cfg):
  cfg, seq_len = DataConfig(**{**cfg.__dict__, "shuffle_window": 1}), 255
  docs = {d.tobytes() for d in doc_tokens(cfg, "train")}
  n_batches = 2 * sum(len(d) for d in docs) // (seq_len + 1) // BATCH + 2  # over an epoch each
  seen = []
  for i in range(2):
    it = train_iterator(cfg, TOK, seq_len, BATCH, process_index=i, process_count=2)
    seen.append(set(pieces(rows({"tokens": b} for b in take(it, n_batches)).ravel())))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == docs


def test_token_counts(cfg):
  docs = doc_tokens(cfg, "train")
  counts = token_counts(cfg, TOK)
  assert counts.dtype == np.int64 and counts.shape == (TOK.vocab_size,)
  np.testing.assert_array_equal(counts, np.bincount(np.concatenate(docs), minlength=TOK.vocab_size))
  assert token_counts(cfg, TOK, max_docs=3)[TOK.eos_id] == 3
