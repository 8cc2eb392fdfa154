"""Hugging Face `LlamaForCausalLM` checkpoints <-> jaxllm Llama params (safetensors, no torch).

HF stores each projection as a torch `Linear` weight `[out, in]`; jaxllm stores Flax kernels
`[in, out]` with the heads folded head-major into one axis, as HF does. Converting is a
transpose. No RoPE permutation is needed: `jaxllm.nn.rope` uses HF's rotate-half layout.

    cfg, params = load_hf_llama("path/to/Llama-3.2-1B")   # config.json + *.safetensors
    logits, _ = Llama(cfg).apply({"params": params}, tokens_BL)
    save_hf_llama(cfg, params, "out/")                     # loadable by transformers
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxllm.models.llama import LlamaConfig
from jaxllm.nn.rope import Llama3RopeScaling

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_GLOB = "model-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors"

_NP_DTYPES = {"float32": np.dtype(jnp.float32), "bfloat16": np.dtype(jnp.bfloat16),
              "float16": np.dtype(jnp.float16)}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")
# Buffers some older checkpoints carry; they are recomputed from the config, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------------------- config
def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> LlamaConfig:
  """A `LlamaConfig` from a HF Llama `config.json` dict (transformers 4.x or 5.x layout).

  RoPE settings are read from `rope_parameters` (transformers >= 5) or from `rope_theta` and
  `rope_scaling` (earlier versions); only the default and "llama3" rope types are supported.
  `overrides` replace any `LlamaConfig` field afterwards (e.g. `dtype="bfloat16"`, `remat=True`).
  """
  hf = dict(hf_config)

  def need(key: str) -> Any:
    if hf.get(key) is None:
      raise ValueError(f"HF config is missing {key!r}, which a Llama {CONFIG_NAME} must give.")
    return hf[key]

  model_type = hf.get("model_type", "llama")
  if model_type != "llama":
    raise ValueError(f"HF config has model_type={model_type!r}; jaxllm.hub.llama reads only "
                     "'llama' checkpoints (LlamaForCausalLM).")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"HF config has hidden_act={hf['hidden_act']!r}; jaxllm's SwiGLU uses "
                     "'silu' only.")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise ValueError(f"HF config has {key}=true; jaxllm's Llama projections have no biases. "
                       "Convert a bias-free checkpoint.")
  d_model, n_heads = need("hidden_size"), need("num_attention_heads")
  head_dim = hf.get("head_dim") or d_model // n_heads
  theta, scaling = _rope_from_hf(hf)
  fields = dict(
      vocab_size=need("vocab_size"), d_model=d_model, n_layers=need("num_hidden_layers"),
      n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      ffn_dim=need("intermediate_size"),
      head_dim=None if head_dim * n_heads == d_model else head_dim,
      rope_theta=float(theta), rope_scaling=scaling,
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_seq_len=int(hf.get("max_position_embeddings", 2048)),
      init_std=float(hf.get("initializer_range", 0.02)))
  unknown = set(overrides) - {f.name for f in dataclasses.fields(LlamaConfig)}
  if unknown:
    raise ValueError(f"Unknown LlamaConfig override(s) {sorted(unknown)}; valid fields are "
                     f"{[f.name for f in dataclasses.fields(LlamaConfig)]}.")
  return LlamaConfig(**{**fields, **overrides})


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
  """(rope_theta, scaling) from either rope layout; unsupported rope types raise ValueError."""
  params = hf.get("rope_parameters")
  if params is not None and hf.get("rope_scaling") is None:
    source = "rope_parameters"
    params = dict(params)
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  else:
    source = "rope_scaling"
    params = dict(hf.get("rope_scaling") or {})
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
  if any(isinstance(v, Mapping) for v in params.values()):
    raise ValueError(f"HF config {source} is per layer type ({sorted(params)}); Llama uses one "
                     "RoPE for all layers.")
  partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if partial not in (None, 1.0):
    raise ValueError(f"HF config has partial_rotary_factor={partial}; jaxllm rotates the whole "
                     "head dimension (1.0) only.")
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type == "default":
    return theta, None
  if rope_type != "llama3":
    raise ValueError(f"HF config {source} has rope_type={rope_type!r}; jaxllm supports "
                     "'default' and 'llama3' only.")
  missing = [k for k in _LLAMA3_KEYS if params.get(k) is None]
  if missing:
    raise ValueError(f"HF config {source} (rope_type 'llama3') is missing {missing}.")
  return theta, Llama3RopeScaling(
      factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
      high_freq_factor=float(params["high_freq_factor"]),
      original_max_position=int(params["original_max_position_embeddings"]))


def config_to_hf(cfg: LlamaConfig, dtype: str | None = None) -> dict[str, Any]:
  """A HF `LlamaForCausalLM` config.json dict for `cfg` (stored dtype `dtype`, default
  `cfg.param_dtype`).

  RoPE is written in the layout every transformers version since 4.43 reads: top-level
  `rope_theta` and a `rope_scaling` dict (transformers 5 converts it to `rope_parameters`).
  """
  if cfg.mask_kind != "causal":
    raise ValueError(f"LlamaConfig.mask_kind={cfg.mask_kind!r} has no HF LlamaForCausalLM "
                     "equivalent; only 'causal' models can be exported.")
  dtype = dtype or cfg.param_dtype
  if dtype not in _NP_DTYPES:
    raise ValueError(f"dtype={dtype!r}; use one of {sorted(_NP_DTYPES)}.")
  scaling = None
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    scaling = dict(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                   high_freq_factor=s.high_freq_factor,
                   original_max_position_embeddings=s.original_max_position)
  return dict(
      architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim, num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.resolved_head_dim, hidden_act="silu",
      max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta, rope_scaling=scaling, tie_word_embeddings=cfg.tie_embeddings,
      attention_bias=False, mlp_bias=False, attention_dropout=0.0,
      initializer_range=cfg.init_std, torch_dtype=dtype, use_cache=True)


# -------------------------------------------------------------------------------- tensor layout
@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One checkpoint tensor: HF name and shape, jaxllm path, and whether it is a linear weight.

  A linear layer's HF weight is torch's `[out, in]`; its jaxllm kernel is Flax's `[in, out]`
  (heads folded head-major into one axis in both), so converting is a transpose. Norm scales
  and the embedding table are copied as they are.
  """

  hf_name: str
  path: tuple[str, ...]
  hf_shape: tuple[int, ...]
  linear: bool

  @property
  def shape(self) -> tuple[int, ...]:
    return self.hf_shape[::-1] if self.linear else self.hf_shape

  def to_jax(self, w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T) if self.linear else w

  def to_hf(self, k: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(k.T) if self.linear else k


def _layout(cfg: LlamaConfig) -> list[_Tensor]:
  """Every tensor of a `LlamaForCausalLM` checkpoint for `cfg`, in HF's order."""
  D, F, V = cfg.d_model, cfg.ffn_dim, cfg.vocab_size
  N, K, H = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
  table = [_Tensor("model.embed_tokens.weight", ("embed", "embedding"), (V, D), False)]
  for i in range(cfg.n_layers):
    hf, jx = f"model.layers.{i}.", f"layers_{i}"
    table += [
        _Tensor(hf + "self_attn.q_proj.weight", (jx, "attn", "q_proj", "kernel"), (N * H, D), True),
        _Tensor(hf + "self_attn.k_proj.weight", (jx, "attn", "k_proj", "kernel"), (K * H, D), True),
        _Tensor(hf + "self_attn.v_proj.weight", (jx, "attn", "v_proj", "kernel"), (K * H, D), True),
        _Tensor(hf + "self_attn.o_proj.weight", (jx, "attn", "o_proj", "kernel"), (D, N * H), True),
        _Tensor(hf + "mlp.gate_proj.weight", (jx, "mlp", "gate_proj", "kernel"), (F, D), True),
        _Tensor(hf + "mlp.up_proj.weight", (jx, "mlp", "up_proj", "kernel"), (F, D), True),
        _Tensor(hf + "mlp.down_proj.weight", (jx, "mlp", "down_proj", "kernel"), (D, F), True),
        _Tensor(hf + "input_layernorm.weight", (jx, "attn_norm", "scale"), (D,), False),
        _Tensor(hf + "post_attention_layernorm.weight", (jx, "mlp_norm", "scale"), (D,), False),
    ]
  table.append(_Tensor("model.norm.weight", ("final_norm", "scale"), (D,), False))
  if not cfg.tie_embeddings:
    table.append(_Tensor("lm_head.weight", ("lm_head", "kernel"), (V, D), True))
  return table


# ----------------------------------------------------------------------------------------- load
@dataclasses.dataclass(frozen=True)
class _Source:
  """An open safetensors file and its name (for error messages)."""

  handle: Any
  file: str

  def get(self, name: str) -> np.ndarray:
    return self.handle.get_tensor(name)


def load_hf_llama(path: str | os.PathLike, *, dtype: str | None = "float32",
                  **overrides: Any) -> tuple[LlamaConfig, dict]:
  """Reads a local HF Llama directory into `(LlamaConfig, params)`.

  The directory holds `config.json` and either `model.safetensors` or shards listed in
  `model.safetensors.index.json`. `params` is a nested dict of numpy arrays, cast to `dtype`
  (None keeps the stored dtype); `cfg.param_dtype` names the dtype returned. `overrides` go to
  `config_from_hf`. Names and shapes are checked before any tensor is read, and tensors are read
  one at a time, so peak host memory is about one copy of the converted params.
  """
  root = Path(path)
  if not root.is_dir():
    raise FileNotFoundError(f"HF checkpoint directory {str(root)!r} does not exist.")
  config_file = root / CONFIG_NAME
  if not config_file.is_file():
    raise FileNotFoundError(f"{str(config_file)!r} is missing; a HF checkpoint directory needs "
                            f"{CONFIG_NAME} beside its weights.")
  with open(config_file) as f:
    hf_config = json.load(f)
  if dtype is not None and dtype not in _NP_DTYPES:
    raise ValueError(f"load_hf_llama dtype={dtype!r}; use one of {sorted(_NP_DTYPES)} or None "
                     "(keep the stored dtype).")
  cfg = config_from_hf(hf_config, **overrides)
  layout = _layout(cfg)

  with contextlib.ExitStack() as stack:
    handles = _open_safetensors(root, stack)
    for name in [n for n in handles if n.endswith(_IGNORED_SUFFIXES)]:
      del handles[name]
    if cfg.tie_embeddings and "lm_head.weight" in handles:
      _check_tied_head(handles, root)
      del handles["lm_head.weight"]
    expected = {t.hf_name for t in layout}
    missing = sorted(expected - set(handles))
    if missing:
      raise KeyError(f"HF checkpoint {str(root)!r} lacks {len(missing)} tensor(s) its "
                     f"{CONFIG_NAME} implies, e.g. {missing[:5]}.")
    unexpected = sorted(set(handles) - expected)
    if unexpected:
      raise ValueError(f"HF checkpoint {str(root)!r} has {len(unexpected)} tensor(s) jaxllm's "
                       f"Llama does not use, e.g. {unexpected[:5]} (in "
                       f"{handles[unexpected[0]].file}); is it a LlamaForCausalLM?")
    stored = set()
    for t in layout:
      info = handles[t.hf_name].handle.get_slice(t.hf_name)
      shape = tuple(info.get_shape())
      if shape != t.hf_shape:
        raise ValueError(f"Tensor {t.hf_name} in {handles[t.hf_name].file} has shape "
                         f"{shape}, but {CONFIG_NAME} implies {t.hf_shape}; the config and "
                         "weights disagree.")
      stored.add(info.get_dtype())
    if dtype is None:
      if len(stored) != 1 or not stored <= set(_SAFETENSORS_DTYPES):
        raise ValueError(f"HF checkpoint {str(root)!r} stores dtypes {sorted(stored)}; "
                         f"dtype=None needs one of {sorted(_SAFETENSORS_DTYPES)} throughout: "
                         "pass dtype='float32' (or another) to cast.")
      dtype = _SAFETENSORS_DTYPES[stored.pop()]
    params: dict = {}
    for t in layout:
      w = handles[t.hf_name].get(t.hf_name)
      node = params
      for key in t.path[:-1]:
        node = node.setdefault(key, {})
      node[t.path[-1]] = t.to_jax(w.astype(_NP_DTYPES[dtype], copy=False))
  return dataclasses.replace(cfg, param_dtype=dtype), params


def _open_safetensors(root: Path, stack: contextlib.ExitStack) -> dict[str, _Source]:
  """{tensor name: (open handle, file name)}, from one file or an indexed set of shards."""
  index_file, single = root / INDEX_NAME, root / WEIGHTS_NAME
  if index_file.is_file():
    with open(index_file) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{str(index_file)!r} has no 'weight_map' dict of tensor -> shard file.")
    files = sorted(set(weight_map.values()))
  elif single.is_file():
    weight_map, files = None, [WEIGHTS_NAME]
  else:
    found = sorted(p.name for p in root.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    raise FileNotFoundError(
        f"HF checkpoint directory {str(root)!r} has neither {WEIGHTS_NAME} nor {INDEX_NAME} "
        f"(found {found}); save it with safe_serialization=True (pickled .bin is not read).")
  handles: dict[str, _Source] = {}
  for name in files:
    file = root / name
    if not file.is_file():
      raise FileNotFoundError(f"Shard {str(file)!r}, listed in {INDEX_NAME}, is missing.")
    handle = stack.enter_context(safe_open(file, framework="np"))
    for key in handle.keys():
      if key in handles:
        raise ValueError(f"Tensor {key} appears in both {handles[key].file} and {name}.")
      if weight_map is not None and weight_map.get(key) != name:
        raise ValueError(f"Tensor {key} is in {name}, but {INDEX_NAME} maps it to "
                         f"{weight_map.get(key)!r}.")
      handles[key] = _Source(handle, name)
  if weight_map is not None:
    absent = sorted(set(weight_map) - set(handles))
    if absent:
      raise KeyError(f"{INDEX_NAME} lists tensor(s) no shard holds, e.g. {absent[:5]}.")
  return handles


def _check_tied_head(handles: dict[str, _Source], root: Path) -> None:
  """A tied config with an `lm_head.weight` in the file: fine only if it equals the embedding."""
  head = handles["lm_head.weight"].get("lm_head.weight")
  embed = (handles["model.embed_tokens.weight"].get("model.embed_tokens.weight")
           if "model.embed_tokens.weight" in handles else None)
  if embed is None or not np.array_equal(head, embed):
    raise ValueError(f"HF checkpoint {str(root)!r} holds lm_head.weight that differs from "
                     f"model.embed_tokens.weight, but its {CONFIG_NAME} says "
                     "tie_word_embeddings=true; set it to false to load the head untied.")


# ----------------------------------------------------------------------------------------- save
def save_hf_llama(cfg: LlamaConfig, params: Mapping[str, Any], path: str | os.PathLike,
                  dtype: str | None = None, *, max_shard_bytes: int | None = None) -> None:
  """Writes `params` as a HF `LlamaForCausalLM` directory: config.json + safetensors.

  `dtype` casts the stored tensors (None: `cfg.param_dtype`). Tied embeddings store no
  `lm_head.weight`, as HF does. With `max_shard_bytes`, weights are split into
  `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`.
  """
  dtype = dtype or cfg.param_dtype
  hf_config = config_to_hf(cfg, dtype)
  params = nn.unbox(params)
  if "params" in params and len(params) == 1:
    raise ValueError("save_hf_llama got {'params': ...}; pass variables['params'] itself.")
  layout = _layout(cfg)
  tensors: dict[str, np.ndarray] = {}
  for t in layout:
    node = params
    for i, key in enumerate(t.path):
      if not isinstance(node, Mapping) or key not in node:
        raise KeyError(f"params lacks {'/'.join(t.path[:i + 1])!r}, which LlamaConfig "
                       f"implies for {t.hf_name}; do cfg and params belong together?")
      node = node[key]
    k = np.asarray(node)
    if k.shape != t.shape:
      raise ValueError(f"params {'/'.join(t.path)!r} has shape {k.shape}, but the LlamaConfig "
                       f"implies {t.shape}.")
    tensors[t.hf_name] = t.to_hf(k.astype(_NP_DTYPES[dtype], copy=False))
  expected = {"/".join(t.path) for t in layout}
  extra = sorted(set(_flat_paths(params)) - expected)
  if extra:
    raise ValueError(f"params has {len(extra)} leaf/leaves a Llama export does not know, e.g. "
                     f"{extra[:5]}; they would be lost.")

  root = Path(path)
  root.mkdir(parents=True, exist_ok=True)
  with open(root / CONFIG_NAME, "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
    f.write("\n")
  for stale in [root / WEIGHTS_NAME, root / INDEX_NAME, *root.glob(_SHARD_GLOB)]:
    stale.unlink(missing_ok=True)  # a previous export's files would shadow or confuse this one
  metadata = {"format": "pt"}  # transformers refuses safetensors files without it
  if max_shard_bytes is None:
    save_file(tensors, root / WEIGHTS_NAME, metadata=metadata)
    return
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, w in tensors.items():
    if shards[-1] and size + w.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = w
    size += w.nbytes
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, root / name, metadata=metadata)
    weight_map.update(dict.fromkeys(shard, name))
  index = {"metadata": {"total_size": sum(w.nbytes for w in tensors.values())},
           "weight_map": weight_map}
  with open(root / INDEX_NAME, "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)
    f.write("\n")


def _flat_paths(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
  out = []
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out += _flat_paths(value, f"{prefix}{key}/")
    else:
      out.append(f"{prefix}{key}")
  return out
