"""VAR: visual autoregressive modelling by next-scale prediction (Tian et al., 2024).

Follows FoundationVision/VAR models/var.py. The sequence is the multi-scale token pyramid,
coarse to fine (L = sum pn^2). Scale 0's input is the start token (class embedding + pos_start);
scale k > 0's input is the area-downsampled running reconstruction f_hat_{k-1}, through a
Linear(Cvae -> D) (`word_embed`). Learned absolute positions and a level embedding are added; the
class embedding is also the AdaLN condition. Attention is block-causal across scales.

Training is teacher-forced (`VAR.__call__`, `var_loss_fn`); generation (`generate`) runs one
forward per scale with a KV cache, classifier-free guidance logits = (1 + t) cond - t uncond with
t = cfg * k / (K - 1), then top-k / top-p sampling.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxllm.infer.sampling import sample_token
from jaxllm.nn.adaln import AdaLNBeforeHead, AdaLNBlock
from jaxllm.nn.attention import KVCache

# ---------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class VARConfig:
  """Shape of a VAR transformer. `vocab_size`, `c_vae`, `patch_nums` come from the VQ-VAE."""

  vocab_size: int = 4096
  c_vae: int = 32
  patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  depth: int = 16
  d_model: int | None = None  # default 64 * depth
  num_heads: int | None = None  # default depth
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  cond_drop_rate: float = 0.1  # label dropout for classifier-free guidance
  attn_l2_norm: bool = True
  norm_eps: float = 1e-6
  init_adaln: float = 0.5
  init_adaln_gamma: float = 1e-5
  init_head: float = 0.02

  def __post_init__(self):
    object.__setattr__(self, "patch_nums", tuple(self.patch_nums))
    if self.width % self.heads:
      raise ValueError(f"VARConfig: num_heads={self.heads} must divide d_model={self.width}.")
    if any(b <= a for a, b in zip(self.patch_nums, self.patch_nums[1:])):
      raise ValueError(f"VARConfig.patch_nums={self.patch_nums} must be strictly increasing.")

  @property
  def width(self) -> int:
    return self.d_model or 64 * self.depth

  @property
  def heads(self) -> int:
    return self.num_heads or self.depth

  @property
  def seq_len(self) -> int:
    return sum(p * p for p in self.patch_nums)

  @property
  def init_std(self) -> float:
    return math.sqrt(1 / self.width / 3)

  def begin_ends(self) -> list[tuple[int, int]]:
    out, cur = [], 0
    for p in self.patch_nums:
      out.append((cur, cur + p * p))
      cur += p * p
    return out

  def levels(self) -> np.ndarray:
    """Scale index of each of the L positions."""
    return np.concatenate([np.full(p * p, i, np.int32) for i, p in enumerate(self.patch_nums)])

  @classmethod
  def for_vqvae(cls, vq, **kw) -> VARConfig:
    return cls(vocab_size=vq.vocab_size, c_vae=vq.c_vae, patch_nums=vq.patch_nums, **kw)


def var_d16(**kw) -> VARConfig:
  return VARConfig(**{**dict(depth=16), **kw})


def var_d20(**kw) -> VARConfig:
  return VARConfig(**{**dict(depth=20), **kw})


def var_d24(**kw) -> VARConfig:
  return VARConfig(**{**dict(depth=24), **kw})


def var_d30(**kw) -> VARConfig:
  return VARConfig(**{**dict(depth=30), **kw})


def tiny(**kw) -> VARConfig:
  """Unit tests: matches `vqvae.tiny` (V 64, Cvae 8, scales 1,2,4,8), 2 blocks of width 32."""
  return VARConfig(**{**dict(vocab_size=64, c_vae=8, patch_nums=(1, 2, 4, 8), depth=2,
                             d_model=32, num_heads=2, num_classes=4), **kw})


PRESETS = {f.__name__: f for f in (var_d16, var_d20, var_d24, var_d30, tiny)}


def preset(name: str, **overrides: Any) -> VARConfig:
  if name not in PRESETS:
    raise ValueError(f"Unknown VAR preset {name!r}; choose one of {sorted(PRESETS)}.")
  return PRESETS[name](**overrides)


def block_causal_mask(patch_nums) -> np.ndarray:
  """[L, L] boolean: token i may attend to token j iff level(i) >= level(j)."""
  lv = np.concatenate([np.full(p * p, i) for i, p in enumerate(patch_nums)])
  return lv[:, None] >= lv[None, :]


# ---------------------------------------------------------------------------------------- model


class VAR(nn.Module):
  """Teacher-forced forward (`__call__`) and per-scale cached steps (`first_scale`, `scale`)."""

  config: VARConfig

  def setup(self):
    cfg = self.config
    D, std = cfg.width, cfg.init_std
    tn = nn.initializers.truncated_normal(std)
    self.word_embed = nn.Dense(D, name="word_embed", kernel_init=nn.with_logical_partitioning(
        tn, (None, "embed")))
    self.class_emb = nn.Embed(cfg.num_classes + 1, D, name="class_emb",
                              embedding_init=nn.with_logical_partitioning(tn, (None, "embed")))
    first_l = cfg.patch_nums[0] ** 2
    self.pos_start = self.param("pos_start", nn.with_logical_partitioning(tn, (None, "embed")),
                                (first_l, D))
    self.pos_LD = self.param("pos_1LC", nn.with_logical_partitioning(tn, (None, "embed")),
                             (cfg.seq_len, D))
    self.lvl_embed = nn.Embed(len(cfg.patch_nums), D, name="lvl_embed",
                              embedding_init=nn.with_logical_partitioning(tn, (None, "embed")))
    out_std = std / math.sqrt(2 * cfg.depth)
    self.blocks = [AdaLNBlock(cfg.heads, cfg.mlp_ratio, cfg.norm_eps, cfg.attn_l2_norm, std,
                              out_std, cfg.init_adaln, cfg.init_adaln_gamma, name=f"blocks_{i}")
                   for i in range(cfg.depth)]
    self.head_nm = AdaLNBeforeHead(cfg.norm_eps, std)
    self.head = nn.Dense(cfg.vocab_size, name="head", kernel_init=nn.with_logical_partitioning(
        nn.initializers.truncated_normal(std * cfg.init_head), ("embed", "vocab")))

  def _lvl_pos(self, lo: int, hi: int) -> Float[Array, "l D"]:
    levels = jnp.asarray(self.config.levels()[lo:hi])
    return self.lvl_embed(levels) + self.pos_LD[lo:hi]

  def _start(self, label_B: Int[Array, " B"]):
    cond_BD = self.class_emb(label_B)
    first_l = self.config.patch_nums[0] ** 2
    x = cond_BD[:, None, :] + self.pos_start[None] + self._lvl_pos(0, first_l)[None]
    return x, cond_BD

  def _trunk(self, x_BLD, cond_BD, level_BL=None, caches=None):
    new = []
    for i, blk in enumerate(self.blocks):
      x_BLD, c = blk(x_BLD, cond_BD, level_BL, None if caches is None else caches[i])
      new.append(c)
    logits = self.head(self.head_nm(x_BLD, cond_BD))
    return logits, (None if caches is None else new)

  def __call__(self, label_B: Int[Array, " B"], x_BLCv: Float[Array, "B L1 Cv"]
               ) -> Float[Array, "B L V"]:
    """Teacher forcing. `x_BLCv` = `VQVAE.idx_to_var_input(...)` ([B, L - pn_0^2, Cvae]).

    Labels equal to `num_classes` are the unconditional (dropped) class.
    """
    cfg = self.config
    first_l = cfg.patch_nums[0] ** 2
    if x_BLCv.shape[1] != cfg.seq_len - first_l:
      raise ValueError(f"VAR input has {x_BLCv.shape[1]} positions, expected "
                       f"{cfg.seq_len - first_l} (the pyramid {cfg.patch_nums} minus scale 0).")
    sos, cond_BD = self._start(label_B)
    x = self.word_embed(x_BLCv.astype(jnp.float32)) + self._lvl_pos(first_l, cfg.seq_len)[None]
    x = jnp.concatenate([sos, x], axis=1)
    B = x.shape[0]
    level_BL = jnp.broadcast_to(jnp.asarray(cfg.levels())[None], (B, cfg.seq_len))
    return self._trunk(x, cond_BD, level_BL)[0]

  def first_scale(self, label_B: Int[Array, " B"], caches: list[KVCache]):
    """Scale 0 with a KV cache: (logits [B, pn_0^2, V], cond, caches)."""
    x, cond_BD = self._start(label_B)
    logits, caches = self._trunk(x, cond_BD, caches=caches)
    return logits, cond_BD, caches

  def scale(self, si: int, x_BlCv: Float[Array, "B l Cv"], cond_BD, caches: list[KVCache]):
    """Scale si > 0 with a KV cache: input = area(f_hat_{si-1}, pn_si)."""
    lo, hi = self.config.begin_ends()[si]
    x = self.word_embed(x_BlCv.astype(jnp.float32)) + self._lvl_pos(lo, hi)[None]
    return self._trunk(x, cond_BD, caches=caches)


def init_caches(config: VARConfig, batch: int) -> list[KVCache]:
  H = config.width // config.heads
  return [KVCache.empty(batch, config.seq_len, config.heads, H) for _ in range(config.depth)]


# ----------------------------------------------------------------------------------- generation


def guidance(cfg: float, si: int, num_scales: int) -> float:
  """VAR's guidance ratio at scale si: grows linearly from 0 to cfg."""
  return cfg * si / max(num_scales - 1, 1)


def generate(model: VAR, params, vqvae, vq_params, label_B: Int[Array, " B"], rng, *,
             cfg: float | None = 1.5, top_k: int = 0, top_p: float = 1.0,
             temperature: float = 1.0) -> dict[str, Any]:
  """Next-scale generation with a KV cache: one forward per scale.

  cfg=None runs the conditional model alone (batch B); a number runs [cond; uncond] (batch 2B)
  and mixes logits with t = cfg * k / (K - 1). top_k=0 / top_p=1 disable the filters;
  temperature=0 is greedy. Returns {"idx": per-scale [B, pn^2] tokens, "logits": guided logits
  [B, L, V] (float32), "f_hat": [B, h, w, Cvae]}; decode with `vqvae.decode_fhat`.
  `vqvae` is any module with `next_input` (a `VQVAE` or its `MultiScaleQuantizer`). Compiled
  once per (model, sampling filters, cfg on/off); the cfg value itself is traced.
  """
  return _generate(model, params, vqvae, vq_params, label_B, rng,
                   jnp.asarray(0.0 if cfg is None else cfg, jnp.float32),
                   use_cfg=cfg is not None, top_k=top_k, top_p=top_p, temperature=temperature)


@functools.partial(jax.jit, static_argnames=("model", "vqvae", "use_cfg", "top_k", "top_p",
                                             "temperature"))
def _generate(model, params, vqvae, vq_params, label_B, rng, cfg, *, use_cfg, top_k, top_p,
              temperature):
  c = model.config
  B = label_B.shape[0]
  K = len(c.patch_nums)
  if use_cfg:
    label_B = jnp.concatenate([label_B, jnp.full_like(label_B, c.num_classes)])
  caches = init_caches(c, label_B.shape[0])
  apply = functools.partial(model.apply, {"params": params})
  vq = functools.partial(vqvae.apply, {"params": vq_params})
  H = c.patch_nums[-1]
  f_hat = jnp.zeros((B, H, H, c.c_vae), jnp.float32)
  idx_list, logits_list, nxt = [], [], None
  logits, cond_BD, caches = apply(label_B, caches, method=VAR.first_scale)
  for si, pn in enumerate(c.patch_nums):
    if si > 0:
      x = jnp.concatenate([nxt, nxt]) if use_cfg else nxt
      logits, caches = apply(si, x, cond_BD, caches, method=VAR.scale)
    logits = logits.astype(jnp.float32)
    if use_cfg:
      t = guidance(cfg, si, K)
      logits = (1 + t) * logits[:B] - t * logits[B:]
    rng, step_rng = jax.random.split(rng)
    idx = sample_token(step_rng, logits.reshape(B * pn * pn, -1), temperature, top_k, top_p)
    idx = idx.reshape(B, pn * pn)
    idx_list.append(idx)
    logits_list.append(logits)
    f_hat, nxt = vq(si, f_hat, idx, method="next_input")
  return {"idx": idx_list, "logits": jnp.concatenate(logits_list, axis=1), "f_hat": f_hat}


# ----------------------------------------------------------------------------------------- loss


def var_loss_fn(model: VAR, vqvae, vq_params):
  """`loss_fn(params, batch, rng) -> (ce_sum, num_tokens)` for `jaxllm.train.step`.

  batch: "image" [B, H, W, 3] in [-1, 1] (tokenised by the frozen VQ-VAE) or "idx" [B, L]
  (pre-tokenised, scales concatenated), and "label" [B]. Labels are dropped to the
  unconditional class with probability `cond_drop_rate`.
  """
  c = model.config

  def loss_fn(params, batch, rng):
    vq = functools.partial(vqvae.apply, {"params": vq_params})
    if "idx" in batch:
      idx_BL = batch["idx"]
      idx_list = [idx_BL[:, lo:hi] for lo, hi in c.begin_ends()]
    else:
      idx_list = vq(batch["image"], method="img_to_idx")
      idx_BL = jnp.concatenate(idx_list, axis=1)
    x_BLCv = jax.lax.stop_gradient(vq(idx_list, method="idx_to_var_input"))
    label = batch["label"]
    drop = jax.random.uniform(rng, label.shape) < c.cond_drop_rate
    label = jnp.where(drop, c.num_classes, label)
    logits = model.apply({"params": params}, label, x_BLCv).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, idx_BL[..., None], axis=-1)[..., 0]
    return jnp.sum(nll), jnp.asarray(nll.size, jnp.float32)

  return loss_fn


def token_accuracy(logits_BLV, idx_BL) -> Array:
  return jnp.mean(jnp.argmax(logits_BLV, -1) == idx_BL)
