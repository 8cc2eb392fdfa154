"""Tokenizers: raw UTF-8 bytes, Hugging Face `tokenizer.json`, SentencePiece `.model`.

Every tokenizer has the same small surface (`Tokenizer`): `encode` adds no special tokens,
`decode` drops them, and `token_bytes` gives the number of UTF-8 bytes each id stands for, so a
loss in nats per token converts to bits per byte. `spec` is the string `load_tokenizer` reloads
the tokenizer from; checkpoints store it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import sentencepiece as spm
import tokenizers

BYTE_SPEC = "byte"
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<mask>")  # the ones `train_bpe` adds, in id order

# Names under which common tokenizers store their special tokens, most specific first.
_BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]")
_EOS_NAMES = ("<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>", "[SEP]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
_MASK_NAMES = ("<mask>", "[MASK]", "<|mask|>", "<|mdm_mask|>")
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")  # SentencePiece byte-fallback pieces
_ACCEPTED = (
  'accepted tokenizer specs: "byte", a path to a tokenizer.json, a path to a SentencePiece '
  ".model, or a directory holding tokenizer.json or a *.model"
)


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipeline, the trainer and checkpoints need from a tokenizer."""

  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int
  mask_id: int | None
  spec: str

  def encode(self, text: str) -> np.ndarray:
    """int32 ids of `text`, no special tokens added."""

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Text of `ids`, skipping special ids."""

  def token_bytes(self) -> np.ndarray:
    """int32 [vocab_size]: UTF-8 bytes each token stands for (0 for specials)."""


class ByteTokenizer:
  """ids 0..255 are UTF-8 bytes; 256 <bos>, 257 <eos>, 258 <pad>, 259 <mask>; 260..271 reserved."""

  vocab_size = 272
  bos_id, eos_id, pad_id, mask_id = 256, 257, 258, 259
  spec = BYTE_SPEC

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    ids = _as_ids(ids)
    return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes().decode("utf-8", "replace")

  def token_bytes(self) -> np.ndarray:
    return (np.arange(self.vocab_size) < 256).astype(np.int32)

  def __repr__(self) -> str:
    return "ByteTokenizer()"


def _as_ids(ids: Iterable[int] | np.ndarray) -> np.ndarray:
  """A flat integer array from a list, a NumPy/JAX array or any iterable of ids."""
  if hasattr(ids, "__array__") or isinstance(ids, (list, tuple)):
    return np.asarray(ids, np.int64).ravel()
  return np.fromiter(ids, np.int64)


def _specials(path: Path, lookup: dict[str, int], own: dict[str, int | None]) -> dict:
  """bos/eos/pad/mask ids: the file's own where it declares them, else found by common names."""

  def find(key: str, names: tuple[str, ...]) -> int | None:
    if own.get(key) is not None:
      return own[key]
    return next((lookup[n] for n in names if n in lookup), None)

  eos = find("eos", _EOS_NAMES)
  if eos is None:
    raise ValueError(
      f"tokenizer {path} has no end-of-sequence token (looked for {', '.join(_EOS_NAMES)}); "
      "add one to the tokenizer, or re-create it with jaxllm.data.train_bpe"
    )
  bos, pad = find("bos", _BOS_NAMES), find("pad", _PAD_NAMES)
  return dict(
    bos_id=eos if bos is None else bos,  # GPT-2 style: one <|endoftext|> serves both
    eos_id=eos,
    pad_id=eos if pad is None else pad,
    mask_id=find("mask", _MASK_NAMES),
  )


def _decodable(ids: Iterable[int] | np.ndarray, special: np.ndarray) -> list[int]:
  ids = _as_ids(ids)
  return ids[~np.isin(ids, special)].tolist()


def _has_type(node: Any, type_name: str) -> bool:
  """Whether a tokenizer.json component (possibly a Sequence of them) contains `type_name`."""
  if isinstance(node, dict):
    return node.get("type") == type_name or any(_has_type(v, type_name) for v in node.values())
  if isinstance(node, list):
    return any(_has_type(v, type_name) for v in node)
  return False


class HFTokenizer:
  """A Hugging Face `tokenizers.Tokenizer` loaded from a local tokenizer.json."""

  def __init__(self, path: str | Path):
    path = Path(path).expanduser().resolve()
    try:
      tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception for every parse failure
      raise ValueError(
        f"could not parse {path} as a tokenizer.json ({e}); re-create it (e.g. with "
        'jaxllm.data.train_bpe) or use tokenizer="byte"'
      ) from e
    tok.encode_special_tokens = True  # text that spells "<eos>" is text, never the special id
    self._tok, self.path, self.spec = tok, path, str(path)
    vocab = tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
    for key, value in _specials(path, vocab, {}).items():
      setattr(self, key, value)
    added = tok.get_added_tokens_decoder()
    self._special = frozenset(
      {i for i, t in added.items() if t.special}
      | {i for i in (self.bos_id, self.eos_id, self.pad_id, self.mask_id) if i is not None}
    )
    self._special_ids = np.array(sorted(self._special), np.int64)
    self._vocab, self._added = vocab, added

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    return self._tok.decode(_decodable(ids, self._special_ids), skip_special_tokens=True)

  def token_bytes(self) -> np.ndarray:
    config = json.loads(self._tok.to_str())
    byte_level = _has_type(config.get("pre_tokenizer"), "ByteLevel") or _has_type(
      config.get("decoder"), "ByteLevel")
    prefix = (config.get("model") or {}).get("continuing_subword_prefix") or ""
    out = np.zeros(self.vocab_size, np.int32)
    for token, i in self._vocab.items():
      if i in self._special:
        continue
      if i in self._added:  # added tokens hold raw text, not the model's alphabet
        out[i] = len(self._added[i].content.encode("utf-8"))
      elif byte_level:  # the byte-level alphabet spells each byte with exactly one character
        out[i] = len(token)
      elif _BYTE_PIECE.match(token):
        out[i] = 1
      else:
        token = token[len(prefix):] if prefix and token.startswith(prefix) else token
        out[i] = len(token.replace("\u2581", " ").encode("utf-8"))
    return out

  def __repr__(self) -> str:
    return f"HFTokenizer({self.spec!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer:
  """A SentencePiece model loaded from a local `.model` file."""

  def __init__(self, path: str | Path):
    path = Path(path).expanduser().resolve()
    try:
      sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # RuntimeError / OSError depending on how the proto is broken
      raise ValueError(
        f"could not parse {path} as a SentencePiece model ({e}); re-create it (e.g. with "
        'sentencepiece.SentencePieceTrainer, or use jaxllm.data.train_bpe) or use tokenizer="byte"'
      ) from e
    self._sp, self.path, self.spec = sp, path, str(path)
    self.vocab_size = sp.get_piece_size()
    pieces = {sp.id_to_piece(i): i for i in range(self.vocab_size)}
    own = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}
    own = {k: (v if v >= 0 else None) for k, v in own.items()}
    for key, value in _specials(path, pieces, own).items():
      setattr(self, key, value)
    self._special = frozenset(
      {i for i in range(self.vocab_size) if sp.is_control(i)}
      | {i for i in (self.bos_id, self.eos_id, self.pad_id, self.mask_id) if i is not None}
    )
    self._special_ids = np.array(sorted(self._special), np.int64)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text, out_type=int), np.int32)

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    return self._sp.decode(_decodable(ids, self._special_ids))

  def token_bytes(self) -> np.ndarray:
    """`▁` counts as one byte (a space), `<0xNN>` pieces as one; unknown and specials as 0."""
    sp, out = self._sp, np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if i in self._special or sp.is_unknown(i) or sp.is_unused(i):
        continue
      out[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return out

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self.spec!r}, vocab_size={self.vocab_size})"


def _find_file(path: Path) -> Path:
  if path.is_dir():
    found = [path / "tokenizer.json", path / "tokenizer.model", *sorted(path.glob("*.model"))]
    found = [p for p in found if p.is_file()]
    if not found:
      raise FileNotFoundError(f"no tokenizer.json or *.model in directory {path}; {_ACCEPTED}")
    return found[0]
  if not path.exists():
    raise FileNotFoundError(f"tokenizer file {path} does not exist; {_ACCEPTED}")
  return path


def load_tokenizer(spec: str) -> Tokenizer:
  """The tokenizer named by `spec` ("byte", a tokenizer.json, a .model, or a directory)."""
  if spec == BYTE_SPEC:
    return ByteTokenizer()
  path = _find_file(Path(spec).expanduser())
  if path.suffix == ".json":
    return HFTokenizer(path)
  if path.suffix == ".model":
    return SentencePieceTokenizer(path)
  raise ValueError(f"tokenizer file {path} is neither a .json nor a .model file; {_ACCEPTED}")


def train_bpe(texts: Iterable[str], vocab_size: int, save_path: str | Path) -> HFTokenizer:
  """Trains a byte-level BPE tokenizer on `texts`, saves it as tokenizer.json, and loads it.

  `save_path` is either a file ending in .json or a directory (then `<dir>/tokenizer.json`).
  The special tokens `<bos>`, `<eos>`, `<pad>`, `<mask>` get ids 0..3.
  """
  minimum = len(SPECIAL_TOKENS) + 256
  if vocab_size < minimum:
    raise ValueError(f"train_bpe: vocab_size={vocab_size} must be at least {minimum} "
                     "(4 special tokens + 256 byte symbols)")
  path = Path(save_path).expanduser()
  path = path if path.suffix == ".json" else path / "tokenizer.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(SPECIAL_TOKENS),
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    show_progress=True,
  )
  length = len(texts) if hasattr(texts, "__len__") else None  # for the progress bar
  tok.train_from_iterator(texts, trainer=trainer, length=length)
  tok.save(str(path))
  return HFTokenizer(path)
