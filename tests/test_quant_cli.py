"""Quantization from configs and the CLI: spec strings, QAT in `jaxllm train`, `jaxllm quantize`
(packed export whose held-out loss equals the fake-quant model's), `generate --packed`."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import cli
from jaxllm import config as config_lib
from jaxllm import quant
from jaxllm.quant import export, recipe
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.train.loop import Run

TINY = ["model.preset=tiny", "train.steps=6", "train.seq_len=32", "train.batch_size=8",
        "train.eval_batches=1", "train.log_every=2", "train.progress=false",
        'train.sample_prompt=""']
QAT_RULES = "quant.rules=[{pattern='layers_\\d+/(attn|mlp)/.*', weight='paretoq:2'}]"


@pytest.mark.parametrize("text, spec", [
    ("paretoq:2", quant.paretoq(2)),
    ("paretoq:ternary", quant.paretoq(1.58)),
    ("paretoq:1.58:group=16", quant.paretoq(1.58, 16)),
    ("quest:4", quant.quest(4)),
    ("quest:2:block=64:trust=none", quant.quest(2, 64, None)),
    ("quest:1:block=none", quant.quest(1, None)),
    ("bitnet", quant.bitnet()),
    ("bitnet_act", quant.bitnet_act()),
    ("matquant:3", quant.policy.matquant(3)),
    ("minmax:4:per_tensor=true", quant.minmax(4, per_tensor=True)),
    ({"method": "quest", "bits": 4, "hadamard_block": 32}, quant.quest(4, 32)),
])
def test_spec_strings(text, spec):
  assert recipe.parse_spec(text) == spec


@pytest.mark.parametrize("rules, match", [
    ([{"pattern": ".*", "weight": "paretoq:5"}],
     r"rule 0 .*paretoq does not support bits=5; use one of \[1, 1.58, 2, 3, 4\]"),
    ([{"pattern": ".*", "weight": "lsq:4"}], r"quant.rules\[0\].weight: unknown method 'lsq'"),
    ([{"pattern": ".*", "weight": "quest:4:blk=64"}], r"option 'blk=64' .* key one of"),
    ([{"pattern": ".*", "weight": "paretoq"}], r"names no bit width; write e.g. 'paretoq:2'"),
    ([{"pattern": ".*", "act": "paretoq:2"}], r"paretoq quantizes weights only"),
    ([{"weight": "paretoq:2"}], r"quant.rules\[0\]: each rule is a table with 'pattern'"),
])
def test_bad_quant_configs_name_the_rule_and_the_fix(rules, match):
  with pytest.raises(ValueError, match=match):
    config_lib.QuantConfig(rules=tuple(rules))


def test_rule_matching_no_module_fails_at_build(tmp_path):
  cfg = config_lib.load("experiments/configs/tiny.toml", [
      *TINY, f"train.workdir='{tmp_path}'",
      "quant.rules=[{pattern='layers_\\d+/mlp/gate', weight='paretoq:2'}]"])
  with pytest.raises(ValueError, match=r"rule 0 .*matched no nn.Dense module.*Fix the pattern"):
    Run.build(cfg)


def _eval(model, params, run, batches=1):
  from jaxllm.eval import lm as lm_eval
  fn = lm_eval.make_eval_fn(model, run.tokenizer.pad_id, run.tokenizer.token_bytes())
  totals = np.zeros(3)
  for b in run.eval_batch_iter(batches):
    totals += np.array([float(x) for x in fn(params, b)])
  return lm_eval.summarize(*totals)["bpb"]


def test_qat_train_quantize_and_generate_from_packed(tmp_path, capsys):
  workdir = tmp_path / "qat"
  assert cli.main(["train", "--config", "experiments/configs/tiny.toml", "--set", *TINY,
                   f"train.workdir='{workdir}'", QAT_RULES, "quant.qat_fraction=0.5"]) == 0
  capsys.readouterr()
  run = Run.build(cli._load_run_config(str(workdir), []))
  params = run.restore(Checkpointer(workdir / "checkpoints")).params
  layer = params["layers_0"]["attn"]["q_proj"]
  assert float(layer["qat_gate"]) == 1.0  # switched to QAT half-way
  assert layer["quant_alpha"].shape == (1, layer["kernel"].shape[1])  # one learned scale per row
  assert "quant_alpha" not in params["lm_head"] and "qat_gate" not in params["embed"]

  assert cli.main(["quantize", "--workdir", str(workdir), "--eval-batches", "1"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  # the packed model is the fake-quant model: same held-out loss
  assert result["packed_bpb"] == pytest.approx(result["float_bpb"], rel=1e-3)
  packed = export.load_packed(workdir / "packed" / "packed.safetensors")
  pw = packed["layers_0"]["mlp"]["down_proj"]["kernel"]
  assert isinstance(pw, quant.PackedWeight) and pw.fmt == "2"
  k, o = pw.shape
  assert pw.codes.nbytes == k * o // 4  # 4 codes per byte
  again = export.load_packed(export.save_packed(packed, tmp_path / "again.safetensors"))
  assert export.tree_equal(packed, again)
  base = run.model.model
  assert _eval(quant.Policy(()).apply(base), packed, run) == pytest.approx(
      _eval(run.model, params, run), rel=1e-3)

  assert cli.main(["generate", "--workdir", str(workdir), "--packed",
                   str(workdir / "packed" / "packed.safetensors"), "--prompt", "def ",
                   "--max-new-tokens", "8", "--temperature", "0"]) == 0
  assert capsys.readouterr().out.startswith("def ")


def test_mixed_precision_ptq_of_a_float_run(tmp_path, capsys):
  workdir = tmp_path / "fp"
  assert cli.main(["train", "--config", "experiments/configs/tiny.toml", "--set", *TINY,
                   "train.steps=2", f"train.workdir='{workdir}'"]) == 0
  assert cli.main(["quantize", "--workdir", str(workdir), "--mixed", "minmax:4,paretoq:1.58",
                   "--eval-batches", "0", "--out", str(tmp_path / "mixed")]) == 0
  capsys.readouterr()
  packed = export.load_packed(tmp_path / "mixed" / "packed.safetensors")
  fmt = {f"{i}/{g}/{n}": packed[f"layers_{i}"][g][n]["kernel"].fmt
         for i in (0, 1) for g in ("attn", "mlp") for n in packed[f"layers_{i}"][g]}
  assert {f for p, f in fmt.items() if p.startswith("0/") or "/attn/" in p} == {"4"}
  assert {f for p, f in fmt.items() if p.startswith("1/mlp/")} == {"ternary"}
  assert packed["embed"]["embedding"].dtype == jnp.float32  # embeddings stay float
  with pytest.raises(SystemExit):
    cli.main(["quantize"])  # --workdir is required
  assert cli.main(["quantize", "--workdir", str(workdir), "--eval-batches", "0"]) == 2
  assert "trained without a [quant] policy" in capsys.readouterr().err
