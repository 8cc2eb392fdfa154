"""VARSR: visual autoregressive super-resolution (Qu et al., 2025).

A VAR transformer conditioned on the low-resolution image through prefix tokens:
- the LR image, resized to the output size, goes through a small conv encoder (`LREncoder`) to
  pn_K x pn_K prefix tokens; the sequence is [LR tokens, class token, scales 2..K]; prefix and
  class token share level 0 (bidirectional among themselves), the scales follow block-causally;
- `conditioning="additive"` (the ablation) drops the prefix: the encoder's pn_K x pn_K map is
  area-downsampled to every scale's pn x pn grid and added to that scale's token inputs (the
  class token gets the map pooled to pn_1 x pn_1), so the sequence is VAR's own;
- positions are SA-RoPE (`jaxllm.nn.rope2d`; LR tokens on the final scale's grid) or, for the
  ablation, learned absolute embeddings;
- the class is a quality label (0 positive, 1 negative) used as the AdaLN condition; image-based
  CFG mixes logits (1 + t) F(LR, c+) - t F(LR, c-), t = cfg k / (K - 1);
- a diffusion refiner (`refiner.py`) predicts the last scale's quantisation residual
  (f_rest_K - e[i_hat]) / 0.6 from z = LN(h_K + word_embed(e[i_hat])); phi is not applied at the
  last scale when refining, so f_hat_{K-1} + e[i_hat] + 0.6 x0 = f for the true residual;
- loss = CE + diff_weight x diffusion loss; colour correction to the LR at the end: AdaIN per
  tile (VARSR's test script), or the wavelet fix on the whole image (`wavelet_color_fix`, the
  other one in the colour-fix module VARSR ships, from StableSR);
- images of any size go through `upscale_tiled` (model-sized LR tiles, blended).
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

from jaxllm.infer.sampling import sample_token
from jaxllm.models.var import refiner as refiner_lib
from jaxllm.models.var.var import guidance
from jaxllm.models.var.vqvae import resize as vqvae_resize
from jaxllm.nn.adaln import AdaLNBeforeHead, AdaLNBlock
from jaxllm.nn.attention import KVCache
from jaxllm.nn.rope2d import sa_rope_angles, scale_positions

POSITIVE, NEGATIVE = 0, 1


@dataclasses.dataclass(frozen=True)
class VARSRConfig:
  vocab_size: int = 4096
  c_vae: int = 32
  patch_nums: tuple[int, ...] = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
  image_size: int = 512  # output side; the LR is resized to it before the encoder
  scale: int = 4  # the SR factor the model is trained for
  depth: int = 24
  d_model: int | None = None  # default 64 * depth
  num_heads: int | None = None  # default depth
  mlp_ratio: float = 4.0
  num_classes: int = 2  # quality labels: 0 positive, 1 negative
  lr_channels: tuple[int, ...] = (32, 128, 256, 512)  # then a stride-2 stage to d_model
  positions: str = "sa_rope"  # or "learned" (absolute table, the ablation)
  conditioning: str = "prefix"  # or "additive" (LR map added to each scale's inputs, ablation)
  rope_theta: float = 10000.0
  attn_l2_norm: bool = True
  norm_eps: float = 1e-6
  init_adaln: float = 0.5
  init_adaln_gamma: float = 1e-5
  init_head: float = 0.02
  refiner: refiner_lib.RefinerConfig | None = None  # None: no diffusion refiner
  diff_weight: float = 2.0
  residual_scale: float = 0.6

  def __post_init__(self):
    for name in ("patch_nums", "lr_channels"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if self.positions not in ("sa_rope", "learned"):
      raise ValueError(f"VARSRConfig.positions={self.positions!r}: use 'sa_rope' or 'learned'.")
    if self.conditioning not in ("prefix", "additive"):
      raise ValueError(f"VARSRConfig.conditioning={self.conditioning!r}: use 'prefix' (LR tokens "
                       "before the sequence) or 'additive' (LR map added to each scale's inputs).")
    if self.width % self.heads or (self.width // self.heads) % 4:
      raise ValueError(f"VARSRConfig: d_model={self.width} / num_heads={self.heads} must be a "
                       "whole head dimension divisible by 4 (SA-RoPE).")
    down = 2 ** len(self.lr_channels)
    if self.image_size != self.patch_nums[-1] * down:
      raise ValueError(f"VARSRConfig: the LR encoder downsamples by {down}, so image_size must "
                       f"be patch_nums[-1] x {down} = {self.patch_nums[-1] * down}, got "
                       f"{self.image_size}.")
    if self.refiner is not None and (self.refiner.target_dim != self.c_vae
                                     or self.refiner.cond_dim != self.width):
      raise ValueError("VARSRConfig.refiner must have target_dim = c_vae and cond_dim = width.")

  width = property(lambda self: self.d_model or 64 * self.depth)
  heads = property(lambda self: self.num_heads or self.depth)
  seq_len = property(lambda self: sum(p * p for p in self.patch_nums))
  prefix_len = property(  # LR tokens before the class token (none when additive)
      lambda self: self.patch_nums[-1] ** 2 if self.conditioning == "prefix" else 0)
  init_std = property(lambda self: math.sqrt(1 / self.width / 3))

  def begin_ends(self) -> list[tuple[int, int]]:
    out, cur = [], 0
    for p in self.patch_nums:
      out.append((cur, cur + p * p))
      cur += p * p
    return out

  def levels(self) -> np.ndarray:
    """Level of each position of the full sequence [prefix, scales] (prefix at level 0)."""
    return np.concatenate([np.zeros(self.prefix_len, np.int32)] + [
        np.full(p * p, i, np.int32) for i, p in enumerate(self.patch_nums)])


def varsr_d24(**kw) -> VARSRConfig:
  """The paper's model: d 24 (width 1536), 512 px output, refiner 6 x 1024."""
  return VARSRConfig(**{**dict(refiner=refiner_lib.RefinerConfig(32, 1536)), **kw})


def tiny(**kw) -> VARSRConfig:
  """Unit tests: 16 px output (x4 from 4 px), scales 1,2,4,8, LR prefix 8x8, width 32."""
  return VARSRConfig(**{**dict(vocab_size=32, c_vae=4, patch_nums=(1, 2, 4, 8), image_size=16,
                               depth=2, d_model=32, num_heads=2, lr_channels=(8,),
                               refiner=refiner_lib.tiny(target_dim=4, cond_dim=32)), **kw})


PRESETS = {f.__name__: f for f in (varsr_d24, tiny)}


def preset(name: str, **overrides: Any) -> VARSRConfig:
  if name not in PRESETS:
    raise ValueError(f"Unknown VARSR preset {name!r}; choose one of {sorted(PRESETS)}.")
  return PRESETS[name](**overrides)


# -------------------------------------------------------------------------------------- modules


class LREncoder(nn.Module):
  """conv3x3 3 -> c0, SiLU, stride-2 conv stages through `channels` and on to `width`, then a
  3x3 conv_out: [B, S, S, 3] -> [B, S / 2^n, S / 2^n, width]."""

  channels: tuple[int, ...]
  width: int

  @nn.compact
  def __call__(self, x_BHW3):
    h = nn.silu(nn.Conv(self.channels[0], (3, 3), padding="SAME", name="conv_in")(x_BHW3))
    for i, c in enumerate(self.channels[1:] + (self.width,)):
      h = nn.silu(nn.Conv(c, (3, 3), strides=2, padding=((1, 1), (1, 1)), name=f"down_{i}")(h))
    return nn.Conv(self.width, (3, 3), padding="SAME", name="conv_out")(h)


class VARSR(nn.Module):
  config: VARSRConfig

  def setup(self):
    c = self.config
    D, std = c.width, c.init_std
    tn = nn.with_logical_partitioning(nn.initializers.truncated_normal(std), (None, "embed"))
    self.lr_encoder = LREncoder(c.lr_channels, D)
    self.word_embed = nn.Dense(D, kernel_init=tn)
    self.class_emb = nn.Embed(c.num_classes, D, embedding_init=tn)
    first_l = c.patch_nums[0] ** 2
    self.pos_start = self.param("pos_start", tn, (c.prefix_len + first_l, D))
    if c.positions == "learned":
      self.pos_LD = self.param("pos_1LC", tn, (c.seq_len - first_l, D))
    self.lvl_embed = nn.Embed(len(c.patch_nums), D, embedding_init=tn)
    out_std = std / math.sqrt(2 * c.depth)
    self.blocks = [AdaLNBlock(c.heads, c.mlp_ratio, c.norm_eps, c.attn_l2_norm, std, out_std,
                              c.init_adaln, c.init_adaln_gamma, name=f"blocks_{i}")
                   for i in range(c.depth)]
    self.head_nm = AdaLNBeforeHead(c.norm_eps, std)
    self.head = nn.Dense(c.vocab_size, kernel_init=nn.with_logical_partitioning(
        nn.initializers.truncated_normal(std * c.init_head), ("embed", "vocab")))
    if c.refiner is not None:
      self.refiner_norm = nn.LayerNorm(epsilon=1e-6)
      self.refiner = refiner_lib.DiffusionMLP(c.refiner)

  # ----------------------------------------------------------------------------- pieces
  def _angles(self, lo: int, hi: int):
    """SA-RoPE angles for positions [lo, hi) of the full sequence (None for learned)."""
    c = self.config
    if c.positions != "sa_rope":
      return None
    side = c.patch_nums[-1] if c.conditioning == "prefix" else 0  # LR tokens on the last grid
    pos = scale_positions(c.patch_nums, prefix_side=side)[lo:hi]
    return sa_rope_angles(pos, c.width // c.heads, c.rope_theta)

  def _check_lr(self, lr_BHW3):
    c = self.config
    if lr_BHW3.ndim != 4 or lr_BHW3.shape[-1] != 3:
      raise ValueError(f"VARSR expects RGB LR images [B, h, w, 3] in [-1, 1], got "
                       f"{lr_BHW3.shape}; convert grayscale / RGBA with jaxllm.data.images.to_rgb.")
    h, w = lr_BHW3.shape[1:3]
    if h * c.scale != c.image_size or w * c.scale != c.image_size:
      raise ValueError(f"this VARSR model upscales {c.image_size // c.scale}x"
                       f"{c.image_size // c.scale} LR images x{c.scale} to {c.image_size}; got "
                       f"{h}x{w}. Crop or resize the input (tiled inference is not implemented).")

  def _lr_added(self, lr_BPPD, s_lo: int, s_hi: int):
    """Additive conditioning of scales [s_lo, s_hi): the LR map area-pooled to each scale's
    pn x pn grid, flattened and concatenated like the sequence -> [B, l, D]."""
    B, D = lr_BPPD.shape[0], lr_BPPD.shape[-1]
    return jnp.concatenate([vqvae_resize(lr_BPPD, pn, "area").reshape(B, pn * pn, D)
                            for pn in self.config.patch_nums[s_lo:s_hi]], axis=1)

  def _start(self, lr_BHW3, label_B):
    """Level-0 inputs (prefix: [LR tokens, class token]; additive: class token + pooled LR map)
    + pos_start + level 0, the AdaLN condition, and the LR map [B, pn_K, pn_K, D]."""
    self._check_lr(lr_BHW3)
    c = self.config
    lr_BPPD = self.lr_encoder(vqvae_resize(lr_BHW3.astype(jnp.float32), c.image_size, "bicubic"))
    B = lr_BPPD.shape[0]
    cond_BD = self.class_emb(label_B)
    first_l = c.patch_nums[0] ** 2
    x = jnp.broadcast_to(cond_BD[:, None], (B, first_l, c.width))
    if c.conditioning == "prefix":
      x = jnp.concatenate([lr_BPPD.reshape(B, c.prefix_len, c.width), x], axis=1)
    else:
      x = x + self._lr_added(lr_BPPD, 0, 1)
    x = x + self.pos_start[None] + self.lvl_embed(jnp.zeros((1, 1), jnp.int32))
    return x, cond_BD, lr_BPPD

  def _scale_inputs(self, x_BlCv, lr_BPPD, s_lo: int, s_hi: int):
    """Embeds the inputs of scales [s_lo, s_hi) (s_lo >= 1)."""
    c = self.config
    lo, hi = c.begin_ends()[s_lo][0], c.begin_ends()[s_hi - 1][1]
    levels = jnp.asarray(c.levels()[c.prefix_len + lo:c.prefix_len + hi])
    x = self.word_embed(x_BlCv.astype(jnp.float32)) + self.lvl_embed(levels)[None]
    if c.positions == "learned":
      first_l = c.patch_nums[0] ** 2
      x = x + self.pos_LD[lo - first_l:hi - first_l][None]
    if c.conditioning == "additive":
      x = x + self._lr_added(lr_BPPD, s_lo, s_hi)
    return x

  def _trunk(self, x, cond_BD, angles, level_BL=None, caches=None):
    new = []
    for i, blk in enumerate(self.blocks):
      x, cc = blk(x, cond_BD, level_BL, None if caches is None else caches[i],
                  None if angles is None else jnp.broadcast_to(
                      angles[None], (x.shape[0],) + angles.shape))
      new.append(cc)
    return x, self.head(self.head_nm(x, cond_BD)), (None if caches is None else new)

  # ----------------------------------------------------------------------------- public
  def __call__(self, lr_BHW3, label_B, x_BLCv):
    """Teacher forcing -> (logits [B, L, V], final-scale hidden states [B, pn_K^2, D])."""
    c = self.config
    first_l = c.patch_nums[0] ** 2
    if x_BLCv.shape[1] != c.seq_len - first_l:
      raise ValueError(f"VARSR input has {x_BLCv.shape[1]} positions, expected "
                       f"{c.seq_len - first_l}.")
    start, cond_BD, lr_BPPD = self._start(lr_BHW3, label_B)
    x = jnp.concatenate([start, self._scale_inputs(x_BLCv, lr_BPPD, 1, len(c.patch_nums))],
                        axis=1)
    B, T = x.shape[:2]
    level_BL = jnp.broadcast_to(jnp.asarray(c.levels())[None], (B, T))
    h, logits, _ = self._trunk(x, cond_BD, self._angles(0, T), level_BL)
    lo = c.begin_ends()[-1][0]
    h_K = h[:, c.prefix_len + lo:]
    if c.refiner is not None and self.is_initializing():  # create the refiner's parameters
      z = self.refiner_cond(h_K[:, :1], jnp.zeros(h_K.shape[:1] + (1, c.c_vae)))[:, 0]
      self.refiner_eps(jnp.zeros((B, c.c_vae)), jnp.zeros((B,), jnp.int32), z)
    return logits[:, c.prefix_len:], h_K

  def first_scale(self, lr_BHW3, label_B, caches):
    """Level 0 with a KV cache -> (logits, hidden, cond, LR map for `scale`, caches)."""
    c = self.config
    start, cond_BD, lr_BPPD = self._start(lr_BHW3, label_B)
    h, logits, caches = self._trunk(start, cond_BD, self._angles(0, start.shape[1]),
                                    caches=caches)
    return logits[:, c.prefix_len:], h[:, c.prefix_len:], cond_BD, lr_BPPD, caches

  def scale(self, si: int, x_BlCv, cond_BD, lr_BPPD, caches):
    """Scale si > 0 with a KV cache (`lr_BPPD` from `first_scale`; only additive reads it)."""
    c = self.config
    lo, hi = c.begin_ends()[si]
    x = self._scale_inputs(x_BlCv, lr_BPPD, si, si + 1)
    h, logits, caches = self._trunk(x, cond_BD, self._angles(c.prefix_len + lo,
                                                             c.prefix_len + hi), caches=caches)
    return logits, h, caches

  def refiner_cond(self, h_BlD, e_BlCv):
    """z = LN(h_K + word_embed(e[i_hat]))."""
    return self.refiner_norm(h_BlD + self.word_embed(e_BlCv))

  def refiner_eps(self, x_ND, t_N, z_ND):
    return self.refiner(x_ND, t_N, z_ND)


def init_caches(config: VARSRConfig, batch: int) -> list[KVCache]:
  H = config.width // config.heads
  return [KVCache.empty(batch, config.prefix_len + config.seq_len, config.heads, H)
          for _ in range(config.depth)]


# ----------------------------------------------------------------------------------------- loss


def varsr_loss_fn(model: VARSR, vqvae, vq_params):
  """`loss_fn(params, batch, rng) -> (loss_sum, num_images)`.

  batch: "lr" [B, h, w, 3] in [-1, 1], "label" [B] (0 positive, 1 negative), and either "hr"
  [B, H, W, 3] in [-1, 1] (tokenised here by the frozen VQ-VAE) or the pre-tokenised "idx"
  [B, L] with "f_rest" [B, pn_K, pn_K, Cvae] (`VQVAE.img_to_pyramid` run offline, the cheaper
  way to train). Per image: mean CE over the L tokens + diff_weight x mean diffusion loss.
  """
  c = model.config

  def loss_fn(params, batch, rng):
    vq = functools.partial(vqvae.apply, {"params": vq_params})
    if "idx" in batch:
      idx_BL, f_rest_last = batch["idx"], batch["f_rest"]
      idx_list = [idx_BL[:, lo:hi] for lo, hi in c.begin_ends()]
    else:
      idx_list, _, f_rest_last = jax.lax.stop_gradient(
          vq(batch["hr"], method="img_to_pyramid"))
      idx_BL = jnp.concatenate(idx_list, axis=1)
    x_BLCv = jax.lax.stop_gradient(vq(idx_list, method="idx_to_var_input"))
    apply = functools.partial(model.apply, {"params": params})
    logits, h_K = apply(batch["lr"], batch["label"], x_BLCv)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce_B = -jnp.mean(jnp.take_along_axis(logp, idx_BL[..., None], -1)[..., 0], axis=1)
    loss_B = ce_B
    if c.refiner is not None:
      B, l = h_K.shape[:2]
      lo = c.begin_ends()[-1][0]
      i_hat = jnp.argmax(logits[:, lo:], axis=-1)  # VARSR: the predicted token in training
      e = vq(method="codebook")[i_hat]  # [B, l, Cv]
      target = (f_rest_last.reshape(B, l, c.c_vae) - e) / c.residual_scale
      z = apply(h_K, e, method="refiner_cond")
      refiner_module = refiner_lib.DiffusionMLP(c.refiner)

      def per_image(target_ld, z_ld, key):  # mean over one image's final-scale tokens
        s, w = refiner_lib.diffusion_loss(refiner_module, params["refiner"], target_ld, z_ld,
                                          key)
        return s / w

      diff_B = jax.vmap(per_image)(target, z, jax.random.split(rng, B))
      loss_B = loss_B + c.diff_weight * diff_B
    return jnp.sum(loss_B), jnp.asarray(loss_B.shape[0], jnp.float32)

  return loss_fn


# ------------------------------------------------------------------------------------ inference


def upscale(model: VARSR, params, vqvae, vq_params, lr_BhW3, rng, *, cfg: float | None = 6.0,
            top_k: int = 1, top_p: float = 0.75, temperature: float = 1.0,
            refine: bool = True, refiner_steps: int | None = None,
            mbr_tokens: bool = False) -> dict[str, Any]:
  """LR [B, h, w, 3] in [-1, 1] -> {"f_hat", "idx", "logits"} (decode with `decode`).

  cfg=None: positive quality label only; a number: image-based CFG against the negative label,
  t = cfg k / (K - 1) (the refiner uses the final scale's guidance). Defaults follow VARSR's test
  decoding (cfg 6, top_k 1, top_p 0.75, 10 refiner steps).

  mbr_tokens (ours, for fidelity): each scale's tokens are `mbr_tokens_from_logits` of its
  (guided) logits, the code nearest the expected code vector, instead of a draw (top_k,
  top_p and temperature then apply to the refiner only).
  """
  if refine and model.config.refiner is None:
    raise ValueError("refine=True but this VARSR config has no refiner.")
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0: greedy tokens and the "
                     "refiner's mean path).")
  return _upscale(model, params, vqvae, vq_params, lr_BhW3, rng,
                  jnp.asarray(0.0 if cfg is None else cfg, jnp.float32), use_cfg=cfg is not None,
                  top_k=top_k, top_p=top_p, temperature=temperature, refine=refine,
                  refiner_steps=refiner_steps, mbr_tokens=mbr_tokens)


@functools.partial(jax.jit, static_argnames=("model", "vqvae", "use_cfg", "top_k", "top_p",
                                             "temperature", "refine", "refiner_steps",
                                             "mbr_tokens"))
def _upscale(model, params, vqvae, vq_params, lr, rng, cfg, *, use_cfg, top_k, top_p,
             temperature, refine, refiner_steps, mbr_tokens):
  c = model.config
  B = lr.shape[0]
  K = len(c.patch_nums)
  label = jnp.zeros((B,), jnp.int32)
  if use_cfg:
    lr = jnp.concatenate([lr, lr])
    label = jnp.concatenate([label, jnp.full((B,), NEGATIVE, jnp.int32)])
  apply = functools.partial(model.apply, {"params": params})
  vq = functools.partial(vqvae.apply, {"params": vq_params})
  caches = init_caches(c, lr.shape[0])
  Hs = c.patch_nums[-1]
  f_hat = jnp.zeros((B, Hs, Hs, c.c_vae), jnp.float32)
  idx_list, logits_list, nxt = [], [], None
  logits, h, cond_BD, lr_map, caches = apply(lr, label, caches, method=VARSR.first_scale)
  for si, pn in enumerate(c.patch_nums):
    if si > 0:
      x = jnp.concatenate([nxt, nxt]) if use_cfg else nxt
      logits, h, caches = apply(si, x, cond_BD, lr_map, caches, method=VARSR.scale)
    logits = logits.astype(jnp.float32)
    t = guidance(cfg, si, K)
    if use_cfg:
      logits = (1 + t) * logits[:B] - t * logits[B:]
    rng, k = jax.random.split(rng)
    if mbr_tokens:
      idx = mbr_tokens_from_logits(logits.reshape(B * pn * pn, -1), vq(method="codebook"))
    else:
      idx = sample_token(k, logits.reshape(B * pn * pn, -1), temperature, top_k, top_p)
    idx = idx.reshape(B, pn * pn)
    idx_list.append(idx)
    logits_list.append(logits)
    if si < K - 1 or not refine:
      f_hat, nxt = vq(si, f_hat, idx, method="next_input")
  if refine:  # f_hat_{K-1} + e[i] + 0.6 x0, phi not applied at the last scale
    e = vq(method="codebook")[idx]  # [B, l, Cv]
    z = apply(h, jnp.concatenate([e, e]) if use_cfg else e, method="refiner_cond")
    l = Hs * Hs
    z = z.reshape(-1, c.width)
    z_c, z_u = (z[:B * l], z[B * l:]) if use_cfg else (z, None)
    ref = refiner_lib.DiffusionMLP(c.refiner)
    x0 = refiner_lib.sample(ref, params["refiner"], z_c, rng, num_steps=refiner_steps,
                            temperature=temperature, cfg=1 + guidance(cfg, K - 1, K),
                            z_uncond_NC=z_u)
    f_hat = f_hat + (e + c.residual_scale * x0.reshape(B, l, c.c_vae)).reshape(f_hat.shape)
  return {"f_hat": f_hat, "idx": idx_list, "logits": jnp.concatenate(logits_list, axis=1)}


def mbr_tokens_from_logits(logits_NV, codebook_VC):
  """Minimum-Bayes-risk tokens under squared error in code space: for each row, the code j
  minimising E_{i ~ softmax(logits)} ||e_j - e_i||^2 = ||e_j - e_bar||^2 + const, i.e. the
  codebook row nearest the expected code vector e_bar = softmax(logits) @ codebook."""
  e_bar = jax.nn.softmax(logits_NV.astype(jnp.float32), axis=-1) @ codebook_VC
  d = jnp.sum(codebook_VC * codebook_VC, -1)[None] - 2 * e_bar @ codebook_VC.T
  return jnp.argmin(d, axis=-1).astype(jnp.int32)


def decode(vqvae, vq_params, f_hat, lr_BhW3=None, color_fix: bool = True, cfw=None):
  """f_hat -> image in [-1, 1]; with the LR given, AdaIN colour correction to it. `cfw`:
  (`cfw.CFWDecoder`, its params, weight w) decodes with the LR fused in instead (needs the LR)."""
  if cfw is None:
    img = vqvae.apply({"params": vq_params}, f_hat, method="decode_fhat")
  else:
    if lr_BhW3 is None:
      raise ValueError("CFW decoding fuses the LR image into the decoder: pass lr_BhW3.")
    cfw_model, cfw_params, w = cfw
    img = cfw_model.apply({"params": cfw_params}, f_hat, lr_BhW3, w)
  img = jnp.clip(img, -1, 1)
  if color_fix and lr_BhW3 is not None:
    img = jnp.clip(adain_color_fix(img, vqvae_resize(lr_BhW3, img.shape[1], "bicubic")), -1, 1)
  return img


def adain_color_fix(img_BHWC, ref_BHWC, eps: float = 1e-5):
  """Per-image, per-channel mean and std of `img` set to those of `ref` (VARSR / StableSR)."""
  mu, sd = jnp.mean(img_BHWC, (1, 2), keepdims=True), jnp.std(img_BHWC, (1, 2), keepdims=True)
  mu_r = jnp.mean(ref_BHWC, (1, 2), keepdims=True)
  sd_r = jnp.std(ref_BHWC, (1, 2), keepdims=True)
  return (img_BHWC - mu) / (sd + eps) * sd_r + mu_r


def wavelet_decompose(img_BHWC, levels: int = 5):
  """-> (high, low): `low` is the image blurred `levels` times by the 3 x 3 binomial kernel
  [1 2 1]^T [1 2 1] / 16 dilated by 1, 2, 4, ... (a trous; edge-replicated borders), `high` the
  sum of the removed bands, img - low (StableSR's `wavelet_decomposition`)."""
  C = img_BHWC.shape[-1]
  k = jnp.asarray(np.outer([1, 2, 1], [1, 2, 1]) / 16.0, img_BHWC.dtype)
  k = jnp.tile(k[:, :, None, None], (1, 1, 1, C))  # HWIO, depthwise
  low = img_BHWC
  for i in range(levels):
    r = 2 ** i
    x = jnp.pad(low, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    low = jax.lax.conv_general_dilated(x, k, (1, 1), "VALID", rhs_dilation=(r, r),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=C,
                                       precision=jax.lax.Precision.HIGHEST)
  return img_BHWC - low, low


def wavelet_color_fix(img_BHWC, ref_BHWC, levels: int = 5):
  """`img`'s high-frequency bands on `ref`'s low-frequency residual (`wavelet_decompose`): with
  5 levels, structure wider than ~32 output pixels (colour, shading) comes from `ref`, the
  bicubic-upsampled LR, and the detail from the model."""
  if img_BHWC.shape != ref_BHWC.shape:
    raise ValueError(f"wavelet colour fix: image {img_BHWC.shape} and reference "
                     f"{ref_BHWC.shape} must have one shape.")
  return wavelet_decompose(img_BHWC, levels)[0] + wavelet_decompose(ref_BHWC, levels)[1]


# ------------------------------------------------------------------------------- tiled inference


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
  """Evenly spread tile origins covering [0, size) with at least `overlap` pixels shared."""
  if size <= tile:
    return [0]
  if not 0 <= overlap < tile:
    raise ValueError(f"overlap={overlap} must lie in [0, tile={tile}).")
  n = math.ceil((size - overlap) / (tile - overlap))
  return sorted({round(x) for x in np.linspace(0, size - tile, n)})


def upscale_tiled(fn, lr_HW3: np.ndarray, tile: int, scale: int, overlap: int = 8,
                  batch: int = 4) -> np.ndarray:
  """Upscales an LR image of any size >= 1 pixel with a fixed-size model, tile by tile.

  `fn(tiles [n, tile, tile, 3]) -> [n, tile * scale, tile * scale, 3]` (e.g. `upscale` then
  `decode`, jitted). Tiles overlap by `overlap` LR pixels and are blended with linear ramps.
  An image side smaller than `tile` is reflect-padded up to it and the result cropped back
  (a documented conversion: the model never sees a partial tile).
  """
  H, W = lr_HW3.shape[:2]
  ph, pw = max(tile - H, 0), max(tile - W, 0)
  if ph or pw:
    lr_HW3 = np.pad(lr_HW3, ((0, ph), (0, pw), (0, 0)), mode="symmetric")
  Hp, Wp = lr_HW3.shape[:2]
  ys, xs = tile_starts(Hp, tile, overlap), tile_starts(Wp, tile, overlap)
  origins = [(y, x) for y in ys for x in xs]
  T = tile * scale
  ramp = np.minimum(np.arange(T) + 1, T - np.arange(T)).astype(np.float64)
  ramp = np.minimum(ramp / max(overlap * scale, 1), 1.0)
  weight = np.outer(ramp, ramp)[..., None]
  acc = np.zeros((Hp * scale, Wp * scale, lr_HW3.shape[-1]))
  norm = np.zeros((Hp * scale, Wp * scale, 1))
  for i in range(0, len(origins), batch):
    chunk = origins[i:i + batch]
    out = np.asarray(fn(np.stack([lr_HW3[y:y + tile, x:x + tile] for y, x in chunk])))
    for (y, x), o in zip(chunk, out):
      acc[y * scale:y * scale + T, x * scale:x * scale + T] += weight * o
      norm[y * scale:y * scale + T, x * scale:x * scale + T] += weight
  return (acc / norm)[:H * scale, :W * scale].astype(np.float32)


def make_upscaler(model: VARSR, params, vqvae, vq_params, seed: int = 0, color_fix: bool = True,
                  cfw=None, **sampling):
  """A host function LR tiles [n, h, w, 3] in [0, 1] -> SR tiles [n, h s, w s, 3] in [0, 1]
  (`upscale` with `sampling` options, then `decode`, with `cfw` if given), for `upscale_tiled`.
  Every call reuses the same compiled program and the same seed, so tiles of equal content
  decode equally."""
  decode_jit = jax.jit(lambda f, lr: decode(vqvae, vq_params, f, lr, color_fix, cfw))

  def fn(tiles):
    lr = jnp.asarray(tiles, jnp.float32) * 2 - 1
    out = upscale(model, params, vqvae, vq_params, lr, jax.random.key(seed), **sampling)
    return (np.asarray(decode_jit(out["f_hat"], lr)) + 1) / 2

  return fn
