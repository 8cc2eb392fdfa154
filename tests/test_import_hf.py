"""`jaxllm import-hf` turns a local HF Llama directory into a run: greedy `jaxllm generate`
then produces exactly the continuation transformers' own greedy `generate` produces."""

import numpy as np
import pytest
import torch
import transformers

from jaxllm import cli
from jaxllm.data import load_tokenizer, train_bpe
from jaxllm.data.corpus import source_root


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  texts = [p.read_text() for p in sorted(source_root("stdlib").glob("json/*.py"))]
  tok = train_bpe(texts, 300, root / "tokenizer.json")
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      tie_word_embeddings=False, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # larger weights than the default init, so greedy paths are not flat
    for p in model.parameters():
      p.mul_(8.0) if p.ndim > 1 else None
  model.save_pretrained(root, safe_serialization=True)
  return root, model


def test_import_then_generate_matches_transformers_greedy(hf_dir, tmp_path, capsys):
  root, hf_model = hf_dir
  workdir = tmp_path / "run"
  set_args = ["--set", "train.seq_len=64", "train.batch_size=8"]
  assert cli.main(["import-hf", str(root), "--workdir", str(workdir), *set_args]) == 0
  capsys.readouterr()
  prompt = "def loads(s):"
  assert cli.main(["generate", "--workdir", str(workdir), "--prompt", prompt,
                   "--max-new-tokens", "12", "--temperature", "0"]) == 0
  ours = capsys.readouterr().out.rstrip("\n")
  tok = load_tokenizer(str(root))
  ids = torch.tensor(np.concatenate([[tok.bos_id], tok.encode(prompt)])[None])
  with torch.no_grad():
    out = hf_model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None,
                            pad_token_id=tok.pad_id)
  theirs = prompt + tok.decode(out[0, ids.shape[1]:].numpy())
  assert ours == theirs


def test_import_refuses_to_overwrite_a_run(hf_dir, tmp_path, capsys):
  root, _ = hf_dir
  args = ["import-hf", str(root), "--workdir", str(tmp_path / "r"), "--set",
          "train.seq_len=64", "train.batch_size=8"]
  assert cli.main(args) == 0
  assert cli.main(args) == 2
  assert "already exists" in capsys.readouterr().err
