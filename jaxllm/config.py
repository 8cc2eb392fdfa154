"""Run configuration: dataclasses loaded from TOML files and `section.field=value` overrides.

A config file names a model preset and overrides its fields; every other section maps onto a
dataclass below. Unknown sections or fields are errors that name the bad key and the valid ones.

    [model]
    preset = "small"
    max_seq_len = 256

    [train]
    steps = 600
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from pathlib import Path
from typing import Any

from jaxllm.data.pipeline import DataConfig
from jaxllm.models import llama
from jaxllm.sharding.mesh import MeshConfig


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with a learning-rate schedule, global-norm clipping and decoupled weight decay."""

  lr: float = 3e-3
  schedule: str = "warmup_cosine"  # warmup_cosine | wsd | constant
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1  # final lr / peak lr for cosine and wsd
  decay_fraction: float = 0.2  # wsd: share of steps spent decaying
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0

  def __post_init__(self):
    if self.schedule not in ("warmup_cosine", "wsd", "constant"):
      raise ValueError(f"optim.schedule={self.schedule!r}; use warmup_cosine, wsd or constant.")
    if self.lr <= 0:
      raise ValueError(f"optim.lr={self.lr} must be positive.")
    if not 0 < self.decay_fraction <= 1:
      raise ValueError(f"optim.decay_fraction={self.decay_fraction} must lie in (0, 1].")


OBJECTIVES = ("next_token", "masked_diffusion")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training loop. `batch_size` is global (all processes), in sequences of `seq_len`."""

  steps: int = 1000
  objective: str = "next_token"  # next_token | masked_diffusion (LLaDA)
  batch_size: int = 16
  seq_len: int = 256
  grad_accum: int = 1
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0  # 0: evaluate only at the end
  eval_batches: int = 16
  ckpt_every: int = 0  # 0: checkpoint only at the end
  keep_ckpts: int = 2
  halt_at: int = 0  # stop after this step as if pre-empted (0: run to `steps`)
  workdir: str = "runs/default"
  sample_prompt: str = ""
  sample_tokens: int = 200
  sample_temperature: float = 0.8
  sample_top_p: float = 0.95
  progress: bool = True

  def __post_init__(self):
    if self.objective not in OBJECTIVES:
      raise ValueError(f"train.objective={self.objective!r}; use one of {OBJECTIVES}.")
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_batches"):
      if getattr(self, name) <= 0:
        raise ValueError(f"train.{name}={getattr(self, name)} must be positive.")
    if self.batch_size % self.grad_accum:
      raise ValueError(f"train.batch_size={self.batch_size} is not divisible by "
                       f"train.grad_accum={self.grad_accum}; make grad_accum a divisor.")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Multi-host set-up; `enabled` calls `jax.distributed.initialize` with these (None: auto)."""

  enabled: bool = False
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_count: int | None = None  # CPU testing: devices simulated per process


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Quantization-aware training (see `jaxllm.quant.recipe` for the spec strings).

  rules: tables `{ pattern = <regex on module paths>, weight = <spec>, act = <spec> }`; the first
    rule whose pattern fullmatches a Dense's path decides it. Empty: no quantization.
  exclude: paths never quantized (None: the LM head and embeddings, as in the papers).
  qat_fraction: ParetoQ's recipe: train in full precision, then quantize for this last share of
    the steps (1.0: QAT from the first step).
  scale_lr_ratio: learning rate of the learned ParetoQ scales relative to optim.lr (no decay).
  trust_mask_updates: also mask QuEST layers' optimizer updates with the trust mask.
  kernels: how Hadamard rotations and packed low-bit matmuls run — "xla" (default; any backend),
    "pallas" (the TPU kernels of `pallas_kernels`), "pallas_gpu" (their GPU Triton variants) or
    "pallas_interpret" / "pallas_gpu_interpret" (those kernels in interpret mode, for testing on
    CPU). Chosen here, never by a silent fallback.
  """

  rules: tuple[dict[str, Any], ...] = ()
  exclude: tuple[str, ...] | None = None
  qat_fraction: float = 1.0
  scale_lr_ratio: float = 1.0
  trust_mask_updates: bool = False
  kernels: str = "xla"

  def __post_init__(self):
    if self.kernels not in ("xla", "pallas", "pallas_interpret", "pallas_gpu",
                            "pallas_gpu_interpret"):
      raise ValueError(f"quant.kernels={self.kernels!r}: choose 'xla' (any backend), 'pallas' "
                       "(TPU), 'pallas_gpu' (NVIDIA GPU), or 'pallas_interpret' / "
                       "'pallas_gpu_interpret' (those kernels on CPU, for tests).")
    if not 0.0 < self.qat_fraction <= 1.0:
      raise ValueError(f"quant.qat_fraction={self.qat_fraction} must lie in (0, 1]; 1.0 "
                       "quantizes from the first step, 0.1 only the last 10% of the steps.")
    if self.scale_lr_ratio <= 0:
      raise ValueError(f"quant.scale_lr_ratio={self.scale_lr_ratio} must be positive.")
    from jaxllm.quant.recipe import policy_from_config
    policy_from_config(self)  # errors name the rule and the fix

  def policy(self):
    from jaxllm.quant.recipe import policy_from_config
    return policy_from_config(self)


@dataclasses.dataclass(frozen=True)
class Config:
  model: dict[str, Any] = dataclasses.field(default_factory=lambda: {"preset": "small"})
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  distributed: DistributedConfig = DistributedConfig()
  quant: QuantConfig = QuantConfig()

  def model_config(self, vocab_size: int) -> llama.LlamaConfig:
    """The model preset with this config's overrides; the vocabulary comes from the tokenizer.

    `preset = "custom"` builds the model from the listed fields alone (imported checkpoints).
    """
    fields = dict(self.model)
    name = fields.pop("preset", "small")
    fields.setdefault("vocab_size", vocab_size)
    if fields["vocab_size"] < vocab_size:
      raise ValueError(f"model.vocab_size={fields['vocab_size']} is smaller than the tokenizer's "
                       f"{vocab_size} ids; remove the override or raise it.")
    valid = {f.name for f in dataclasses.fields(llama.LlamaConfig)}
    for key in fields:
      if key not in valid:
        raise ValueError(f"Unknown field model.{key}; valid fields: preset, {sorted(valid)}.")
    if name == "custom":
      return llama.LlamaConfig(**fields)
    return llama.preset(name, **fields)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)


def _build(cls, values: dict[str, Any], where: str):
  hints = typing.get_type_hints(cls)
  valid = {f.name for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in values.items():
    if key not in valid:
      raise ValueError(f"Unknown config field {where}.{key}; valid fields: {sorted(valid)}.")
    hint = hints[key]
    if dataclasses.is_dataclass(hint):
      value = _build(hint, value, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
      value = tuple(value)
    elif hint is float and isinstance(value, int):
      value = float(value)
    kwargs[key] = value
  return cls(**kwargs)


def from_dict(values: dict[str, Any]) -> Config:
  values = dict(values)
  model = values.pop("model", {"preset": "small"})
  config = _build(Config, values, "")
  return dataclasses.replace(config, model=dict(model))


def parse_override(text: str) -> tuple[list[str], Any]:
  """`train.steps=100` -> (["train", "steps"], 100); values are TOML, bare words are strings."""
  if "=" not in text:
    raise ValueError(f"Override {text!r} must look like section.field=value (e.g. train.steps=100).")
  key, raw = text.split("=", 1)
  try:
    value = tomllib.loads(f"v = {raw}")["v"]
  except tomllib.TOMLDecodeError:
    value = raw
  return key.strip().split("."), value


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
  """Reads a TOML config file (or the defaults) and applies `section.field=value` overrides."""
  values: dict[str, Any] = {}
  if path is not None:
    path = Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"Config file {path} does not exist; see experiments/configs/ "
                              "for examples.")
    try:
      values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
      raise ValueError(f"Config file {path} is not valid TOML: {e}") from e
  for text in overrides:
    keys, value = parse_override(text)
    node = values
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = value
  return from_dict(values)
