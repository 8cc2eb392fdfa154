"""Data: tokenizers, the embedded corpus and user folders as ArrayRecord files, Grain pipelines."""

from __future__ import annotations

from jaxllm.data.corpus import prepare_corpus, read_manifest
from jaxllm.data.pipeline import DataConfig, eval_batches, token_counts, train_iterator
from jaxllm.data.tokenizers import (
  ByteTokenizer,
  HFTokenizer,
  SentencePieceTokenizer,
  Tokenizer,
  load_tokenizer,
  train_bpe,
)

__all__ = [
  "ByteTokenizer",
  "DataConfig",
  "HFTokenizer",
  "SentencePieceTokenizer",
  "Tokenizer",
  "eval_batches",
  "load_tokenizer",
  "prepare_corpus",
  "read_manifest",
  "token_counts",
  "train_bpe",
  "train_iterator",
]
