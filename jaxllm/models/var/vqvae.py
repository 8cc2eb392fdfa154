"""Multi-scale residual VQ-VAE (VAR, Tian et al., 2024): conv encoder, one codebook shared by all
scales, partially shared phi convolutions, conv decoder.

Follows FoundationVision/VAR models/quant.py (`VectorQuantizer2`) and models/basic_vae.py (the LDM
vq-f16 encoder/decoder layout). Images are NHWC in [-1, 1]; features are `f_BhwC` with h = w =
`patch_nums[-1]`. Resizing matches PyTorch's `F.interpolate`: "area" (adaptive average pooling)
to go down, "bicubic" (a = -0.75, align_corners=False, clamped border) to go up; both are fixed
linear maps, built once in numpy and applied as two small matmuls, so they are differentiable
and exact to float rounding.

Encoding (`MultiScaleQuantizer.encode`): f_rest = f, f_hat = 0; for scale k with side pn_k,
r_k = argmin_v ||area(f_rest, pn_k) - e_v|| (no resize at the last scale),
h_k = phi_k(bicubic(e[r_k], full)), f_hat += h_k, f_rest -= h_k.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxllm.data.images import resize_batch

# ---------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
  """Shape of a multi-scale VQ-VAE. Presets are the functions below."""

  vocab_size: int = 4096
  c_vae: int = 32  # codebook vector width (VAR's Cvae, = z_channels)
  ch: int = 160
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # downsampling 2 ** (len - 1)
  num_res_blocks: int = 2
  mid_attn: bool = True  # self-attention in the encoder's and decoder's middle blocks
  level_attn: bool = True  # self-attention after each res-block of the lowest-resolution level
  norm_groups: int = 32
  patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
  beta: float = 0.25  # commitment weight
  phi_ratio: float = 0.5  # phi(h) = (1 - r) h + r conv3x3(h); 0 disables phi
  phi_share: int = 4  # number of phi convs: 0 = one per scale, 1 = one for all, K = K shared

  def __post_init__(self):
    object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
    object.__setattr__(self, "patch_nums", tuple(self.patch_nums))
    if not self.patch_nums or any(b <= a for a, b in zip(self.patch_nums, self.patch_nums[1:])):
      raise ValueError(f"VQVAEConfig.patch_nums={self.patch_nums} must be strictly increasing.")
    if self.patch_nums[0] < 1:
      raise ValueError("VQVAEConfig.patch_nums must be positive.")
    for c in {self.ch * m for m in self.ch_mult}:
      if c % self.norm_groups:
        raise ValueError(f"VQVAEConfig: channel count {c} is not divisible by "
                         f"norm_groups={self.norm_groups}; change ch or norm_groups.")
    if self.phi_share < 0:
      raise ValueError("VQVAEConfig.phi_share must be >= 0.")

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def image_size(self) -> int:
    """Training image side: the last scale's side times the downsampling factor."""
    return self.patch_nums[-1] * self.downsample

  @property
  def num_tokens(self) -> int:
    return sum(p * p for p in self.patch_nums)

  @property
  def num_phi(self) -> int:
    return len(self.patch_nums) if self.phi_share == 0 else self.phi_share


def var_f16(**kw) -> VQVAEConfig:
  """VAR's released VQ-VAE: 256 px, 16x, 10 scales (680 tokens), V 4096, Cvae 32."""
  return VQVAEConfig(**kw)


def varsr_f16(**kw) -> VQVAEConfig:
  """VARSR's schedule at 512 px output: 10 scales up to 32 x 32 (2240 tokens)."""
  return VQVAEConfig(**{**dict(patch_nums=(1, 2, 3, 4, 6, 9, 13, 18, 24, 32)), **kw})


def tiny(**kw) -> VQVAEConfig:
  """Unit tests: 32 px images, 4x downsampling, 4 scales up to 8 x 8, V 64."""
  return VQVAEConfig(**{**dict(vocab_size=64, c_vae=8, ch=16, ch_mult=(1, 2, 2),
                               num_res_blocks=1, norm_groups=8, level_attn=False,
                               patch_nums=(1, 2, 4, 8)), **kw})


def small(**kw) -> VQVAEConfig:
  """CPU experiments: 64 px images, 8x downsampling, 6 scales up to 8 x 8, V 512."""
  return VQVAEConfig(**{**dict(vocab_size=512, c_vae=16, ch=32, ch_mult=(1, 2, 2, 4),
                               num_res_blocks=1, norm_groups=16, level_attn=False,
                               patch_nums=(1, 2, 3, 4, 6, 8)), **kw})


PRESETS = {f.__name__: f for f in (var_f16, varsr_f16, tiny, small)}


def preset(name: str, **overrides: Any) -> VQVAEConfig:
  if name not in PRESETS:
    raise ValueError(f"Unknown VQ-VAE preset {name!r}; choose one of {sorted(PRESETS)}.")
  return PRESETS[name](**overrides)


# -------------------------------------------------------------------------------- resize as matmul


def resize(x_BhwC: Float[Array, "B h w C"], size: int, mode: str) -> Float[Array, "B s s C"]:
  """Area or bicubic resize of a square-or-not NHWC map to `size` x `size`."""
  return resize_batch(x_BhwC, (size, size), mode)


# ------------------------------------------------------------------------------------- quantizer


def phi_index(si: int, num_scales: int, num_phi: int) -> int:
  """Which of `num_phi` phi convs serves scale `si` (VAR's PhiPartiallyShared): the one whose
  tick is nearest si / (K - 1); ticks are linspace(1/(3n), 1 - 1/(3n), n) for n = 4, else
  linspace(1/(2n), 1 - 1/(2n), n)."""
  if num_phi <= 1:
    return 0
  lo = 1 / 3 / num_phi if num_phi == 4 else 1 / 2 / num_phi
  ticks = np.linspace(lo, 1 - lo, num_phi)
  at = si / (num_scales - 1) if num_scales > 1 else 0.0
  return int(np.argmin(np.abs(ticks - at)))


def nearest_code(z_NC: Float[Array, "N C"], emb_VC: Float[Array, "V C"]) -> Int[Array, " N"]:
  """Euclidean argmin over the codebook (no gradient flows through the choice)."""
  z_NC, emb_VC = jax.lax.stop_gradient(z_NC), jax.lax.stop_gradient(emb_VC)
  d_NV = (jnp.sum(z_NC * z_NC, -1, keepdims=True) + jnp.sum(emb_VC * emb_VC, -1)[None, :]
          - 2.0 * z_NC @ emb_VC.T)
  return jnp.argmin(d_NV, axis=-1).astype(jnp.int32)


class MultiScaleQuantizer(nn.Module):
  """VAR's `VectorQuantizer2`: one codebook, K scales, `num_phi` partially shared phi convs.

  Token maps are lists of `idx_Bl` ([B, pn * pn], row-major), one per scale.
  """

  vocab_size: int
  c_vae: int
  patch_nums: tuple[int, ...]
  beta: float = 0.25
  phi_ratio: float = 0.5
  num_phi: int = 4

  def setup(self):
    def init(key, shape, dtype=jnp.float32):  # VAR's eini=-1: uniform(-1/V, 1/V)
      return jax.random.uniform(key, shape, dtype, -1.0 / shape[0], 1.0 / shape[0])

    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(init, (None, None)),
        (self.vocab_size, self.c_vae))
    self.phis = [nn.Conv(self.c_vae, (3, 3), padding="SAME", name=f"phi_{i}")
                 for i in range(self.num_phi if self.phi_ratio else 0)]

  def codebook(self) -> Float[Array, "V C"]:
    return self.embedding

  def phi(self, si: int, h_BhwC: Float[Array, "B h w C"]) -> Float[Array, "B h w C"]:
    if not self.phi_ratio:
      return h_BhwC
    conv = self.phis[phi_index(si, len(self.patch_nums), self.num_phi)]
    return (1 - self.phi_ratio) * h_BhwC + self.phi_ratio * conv(h_BhwC)

  def lookup(self, idx_Bl: Int[Array, "B l"], pn: int) -> Float[Array, "B pn pn C"]:
    return self.codebook()[idx_Bl].reshape(idx_Bl.shape[0], pn, pn, self.c_vae)

  def _check(self, f_BhwC):
    H = self.patch_nums[-1]
    if f_BhwC.shape[1:3] != (H, H):
      raise ValueError(f"feature map is {f_BhwC.shape[1]}x{f_BhwC.shape[2]}, the scale schedule "
                       f"ends at {H}x{H}: images must be {H} x downsampling pixels square.")

  def encode(self, f_BhwC: Float[Array, "B h w C"]):
    """Greedy residual quantisation (no gradients).

    Returns (idx list, f_hat, f_rest_K): f_rest_K = f - (f_hat before the last scale) is what
    the last scale quantises, so VARSR's refiner target is f_rest_K - e[r_K] and, with an
    identity phi at the last scale, f_hat + (f_rest_K - e[r_K]) = f exactly.
    """
    self._check(f_BhwC)
    f = jax.lax.stop_gradient(f_BhwC.astype(jnp.float32))
    B, H, _W, C = f.shape
    f_rest, f_hat, idx_list = f, jnp.zeros_like(f), []
    K = len(self.patch_nums)
    f_rest_last = f
    for si, pn in enumerate(self.patch_nums):
      z = resize(f_rest, pn, "area")
      idx = nearest_code(z.reshape(-1, C), self.codebook()).reshape(B, pn * pn)
      idx_list.append(idx)
      e = self.lookup(idx, pn)
      if si == K - 1:
        f_rest_last = f_rest
      h = self.phi(si, resize(e, H, "bicubic"))
      f_hat, f_rest = f_hat + h, f_rest - h
    return idx_list, f_hat, f_rest_last

  def __call__(self, f_BhwC: Float[Array, "B h w C"]):
    """Training forward: (straight-through f_hat, VQ loss, idx list).

    VQ loss per scale, averaged: beta * MSE(sg(f_hat_k), f) + MSE(f_hat_k, sg(f)).
    """
    self._check(f_BhwC)
    f = f_BhwC.astype(jnp.float32)
    f_ng = jax.lax.stop_gradient(f)
    B, H, _W, C = f.shape
    f_rest, f_hat, idx_list = f_ng, jnp.zeros_like(f), []
    loss = jnp.zeros((), jnp.float32)
    for si, pn in enumerate(self.patch_nums):
      z = resize(f_rest, pn, "area")
      idx = nearest_code(z.reshape(-1, C), self.codebook()).reshape(B, pn * pn)
      idx_list.append(idx)
      h = self.phi(si, resize(self.lookup(idx, pn), H, "bicubic"))
      f_hat = f_hat + h
      f_rest = f_rest - jax.lax.stop_gradient(h)
      loss += (self.beta * jnp.mean((jax.lax.stop_gradient(f_hat) - f) ** 2)
               + jnp.mean((f_hat - f_ng) ** 2))
    loss = loss / len(self.patch_nums)
    f_hat_st = jax.lax.stop_gradient(f_hat - f_ng) + f
    return f_hat_st.astype(f_BhwC.dtype), loss, idx_list

  def idx_to_fhat(self, idx_list: Sequence[Int[Array, "B l"]]) -> Float[Array, "B h w C"]:
    """Sum of phi_k(bicubic(e[r_k])) over the given scales (a prefix of the schedule is fine)."""
    H = self.patch_nums[-1]
    f_hat = 0.0
    for si, idx in enumerate(idx_list):
      f_hat = f_hat + self.phi(si, resize(self.lookup(idx, self.patch_nums[si]), H, "bicubic"))
    return f_hat

  def idx_to_var_input(self, idx_list: Sequence[Int[Array, "B l"]]) -> Float[Array, "B L C"]:
    """Teacher forcing: for k = 1..K-1, area(f_hat_{k-1}, pn_k), concatenated -> [B, L-l0, C]."""
    H = self.patch_nums[-1]
    B = idx_list[0].shape[0]
    f_hat, outs = jnp.zeros((B, H, H, self.c_vae), jnp.float32), []
    for si in range(len(self.patch_nums) - 1):
      f_hat = f_hat + self.phi(
          si, resize(self.lookup(idx_list[si], self.patch_nums[si]), H, "bicubic"))
      pn = self.patch_nums[si + 1]
      outs.append(resize(f_hat, pn, "area").reshape(B, pn * pn, self.c_vae))
    return jnp.concatenate(outs, axis=1)

  def next_input(self, si: int, f_hat_BhwC, idx_Bl):
    """Generation: adds scale si's codes to f_hat; returns (f_hat, next scale's input or None)."""
    H, pn = self.patch_nums[-1], self.patch_nums[si]
    f_hat = f_hat_BhwC + self.phi(si, resize(self.lookup(idx_Bl, pn), H, "bicubic"))
    if si == len(self.patch_nums) - 1:
      return f_hat, None
    nxt = self.patch_nums[si + 1]
    return f_hat, resize(f_hat, nxt, "area").reshape(f_hat.shape[0], nxt * nxt, self.c_vae)


# ------------------------------------------------------------------------------ encoder / decoder


class ResBlock(nn.Module):
  out_ch: int
  groups: int

  @nn.compact
  def __call__(self, x_BHWC):
    h = nn.Conv(self.out_ch, (3, 3), padding="SAME", name="conv1")(
        nn.swish(nn.GroupNorm(self.groups, epsilon=1e-6, name="norm1")(x_BHWC)))
    h = nn.Conv(self.out_ch, (3, 3), padding="SAME", name="conv2")(
        nn.swish(nn.GroupNorm(self.groups, epsilon=1e-6, name="norm2")(h)))
    if x_BHWC.shape[-1] != self.out_ch:
      x_BHWC = nn.Conv(self.out_ch, (1, 1), name="nin_shortcut")(x_BHWC)
    return x_BHWC + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention (LDM's AttnBlock)."""

  groups: int

  @nn.compact
  def __call__(self, x_BHWC):
    B, H, W, C = x_BHWC.shape
    h = nn.GroupNorm(self.groups, epsilon=1e-6, name="norm")(x_BHWC).reshape(B, H * W, C)
    q, k, v = (nn.Dense(C, name=n)(h) for n in ("q", "k", "v"))
    p = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) / math.sqrt(C), axis=-1)
    out = nn.Dense(C, name="proj_out")(jnp.einsum("bqk,bkc->bqc", p, v))
    return x_BHWC + out.reshape(B, H, W, C)


class Encoder(nn.Module):
  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  z_channels: int
  groups: int
  mid_attn: bool
  level_attn: bool = False

  @nn.compact
  def __call__(self, x_BHW3, features_only: bool = False):
    """-> latents [B, h, w, z_channels]; with `features_only`, the list of each level's
    output (after its res-blocks, before downsampling; level 0 at full resolution) instead,
    and the middle blocks and output conv are not run (StableSR's `return_fea`)."""
    h = nn.Conv(self.ch, (3, 3), padding="SAME", name="conv_in")(x_BHW3)
    last = len(self.ch_mult) - 1
    features = []
    for i, m in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = ResBlock(self.ch * m, self.groups, name=f"down_{i}_block_{j}")(h)
        if self.level_attn and i == last:
          h = AttnBlock(self.groups, name=f"down_{i}_attn_{j}")(h)
      features.append(h)
      if features_only and i == last:
        return features
      if i != len(self.ch_mult) - 1:  # LDM: pad right/bottom by one, 3x3 stride-2 conv
        h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
        h = nn.Conv(h.shape[-1], (3, 3), strides=2, padding="VALID", name=f"down_{i}")(h)
    h = ResBlock(h.shape[-1], self.groups, name="mid_block_1")(h)
    if self.mid_attn:
      h = AttnBlock(self.groups, name="mid_attn")(h)
    h = ResBlock(h.shape[-1], self.groups, name="mid_block_2")(h)
    h = nn.swish(nn.GroupNorm(self.groups, epsilon=1e-6, name="norm_out")(h))
    return nn.Conv(self.z_channels, (3, 3), padding="SAME", name="conv_out")(h)


class Decoder(nn.Module):
  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  groups: int
  mid_attn: bool
  level_attn: bool = False

  @nn.compact
  def __call__(self, z_BhwC, level_hook=None):
    """`level_hook(i, h) -> h`, if given, runs on each level i's features after its
    res-blocks and before upsampling (i = 0: full resolution), e.g. `cfw.CFWDecoder`'s fusion."""
    h = nn.Conv(self.ch * self.ch_mult[-1], (3, 3), padding="SAME", name="conv_in")(z_BhwC)
    h = ResBlock(h.shape[-1], self.groups, name="mid_block_1")(h)
    if self.mid_attn:
      h = AttnBlock(self.groups, name="mid_attn")(h)
    h = ResBlock(h.shape[-1], self.groups, name="mid_block_2")(h)
    for i in reversed(range(len(self.ch_mult))):
      for j in range(self.num_res_blocks + 1):
        h = ResBlock(self.ch * self.ch_mult[i], self.groups, name=f"up_{i}_block_{j}")(h)
        if self.level_attn and i == len(self.ch_mult) - 1:
          h = AttnBlock(self.groups, name=f"up_{i}_attn_{j}")(h)
      if level_hook is not None:
        h = level_hook(i, h)
      if i != 0:
        B, H, W, C = h.shape
        h = jax.image.resize(h, (B, 2 * H, 2 * W, C), "nearest")
        h = nn.Conv(C, (3, 3), padding="SAME", name=f"up_{i}")(h)
    h = nn.swish(nn.GroupNorm(self.groups, epsilon=1e-6, name="norm_out")(h))
    return nn.Conv(3, (3, 3), padding="SAME", name="conv_out")(h)


# ------------------------------------------------------------------------------------- the model


class VQVAE(nn.Module):
  """Image [-1, 1] NHWC -> multi-scale tokens -> image. `__call__` is the training forward."""

  config: VQVAEConfig

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.c_vae, cfg.norm_groups,
                           cfg.mid_attn, cfg.level_attn)
    self.quant_conv = nn.Conv(cfg.c_vae, (3, 3), padding="SAME")
    self.quantize = MultiScaleQuantizer(cfg.vocab_size, cfg.c_vae, cfg.patch_nums, cfg.beta,
                                        cfg.phi_ratio, cfg.num_phi)
    self.post_quant_conv = nn.Conv(cfg.c_vae, (3, 3), padding="SAME")
    self.decoder = Decoder(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.norm_groups,
                           cfg.mid_attn, cfg.level_attn)

  def _check_image(self, img_BHW3):
    S = self.config.image_size
    if img_BHW3.ndim != 4 or img_BHW3.shape[-1] != 3:
      raise ValueError(f"VQVAE expects RGB images [B, H, W, 3], got shape {img_BHW3.shape}; "
                       "convert grayscale / RGBA with jaxllm.data.images.to_rgb.")
    if img_BHW3.shape[1:3] != (S, S):
      raise ValueError(f"VQVAE was configured for {S} x {S} images (patch_nums[-1]="
                       f"{self.config.patch_nums[-1]} x {self.config.downsample}), got "
                       f"{img_BHW3.shape[1]} x {img_BHW3.shape[2]}; crop or resize first.")

  def features(self, img_BHW3: Float[Array, "B H W 3"]) -> Float[Array, "B h w C"]:
    self._check_image(img_BHW3)
    return self.quant_conv(self.encoder(img_BHW3))

  def decode_fhat(self, f_hat_BhwC: Float[Array, "B h w C"]) -> Float[Array, "B H W 3"]:
    return self.decoder(self.post_quant_conv(f_hat_BhwC))

  def img_to_idx(self, img_BHW3) -> list[Int[Array, "B l"]]:
    return self.quantize.encode(self.features(img_BHW3))[0]

  def img_to_pyramid(self, img_BHW3):
    """(idx list, f_hat, f_rest_K): see `MultiScaleQuantizer.encode`."""
    return self.quantize.encode(self.features(img_BHW3))

  def codebook(self) -> Float[Array, "V C"]:
    return self.quantize.codebook()

  def idx_to_img(self, idx_list) -> Float[Array, "B H W 3"]:
    return jnp.clip(self.decode_fhat(self.quantize.idx_to_fhat(idx_list)), -1, 1)

  def idx_to_var_input(self, idx_list):
    return self.quantize.idx_to_var_input(idx_list)

  def next_input(self, si, f_hat, idx_Bl):
    return self.quantize.next_input(si, f_hat, idx_Bl)

  def idx_to_fhat(self, idx_list):
    return self.quantize.idx_to_fhat(idx_list)

  def __call__(self, img_BHW3: Float[Array, "B H W 3"]):
    """(reconstruction, VQ loss, idx list)."""
    f_hat, vq_loss, idx_list = self.quantize(self.features(img_BHW3))
    return self.decode_fhat(f_hat), vq_loss, idx_list


# -------------------------------------------------------------------------------- losses, usage


def codebook_usage(idx_list: Sequence[Int[Array, "B l"]], vocab_size: int) -> dict[str, Array]:
  """Per-batch codebook statistics: fraction of codes hit (all scales, and per scale) and the
  perplexity exp(H(code histogram)). VAR logs an EMA of per-scale hits; average these over steps
  for the same picture."""
  hits = [jnp.zeros((vocab_size,), jnp.float32).at[i.reshape(-1)].add(1.0) for i in idx_list]
  total = sum(hits)
  p = total / jnp.sum(total)
  out = {"usage": jnp.mean(total > 0),
         "perplexity": jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0)))}
  for si, h in enumerate(hits):
    out[f"usage_scale_{si}"] = jnp.mean(h > 0)
  return out


def vqvae_loss_fn(model: VQVAE, recon: str = "l1", vq_weight: float = 1.0):
  """`loss_fn(params, batch, rng) -> (loss_sum, weight)` for `jaxllm.train.step`.

  batch["image"]: [B, H, W, 3] in [-1, 1]. Loss per image = recon (L1 or L2, mean over pixels)
  + vq_weight x VQ loss (commitment, codebook). No perceptual / adversarial term: both need
  pretrained weights that are not available offline.
  """
  if recon not in ("l1", "l2"):
    raise ValueError(f"recon={recon!r}: use 'l1' or 'l2'.")

  def loss_fn(params, batch, rng):
    del rng
    img = batch["image"]
    rec, vq_loss, _ = model.apply({"params": params}, img)
    err = jnp.abs(rec - img) if recon == "l1" else (rec - img) ** 2
    per_image = jnp.mean(err, axis=(1, 2, 3)) + vq_weight * vq_loss
    return jnp.sum(per_image), jnp.asarray(img.shape[0], jnp.float32)

  return loss_fn


# The parameters that map f_hat to pixels. Tuning only these keeps every token of every image
# (encoder, quant_conv, codebook and phi convolutions frozen), so a transformer trained on the
# tokenizer's tokens stays valid with the tuned decoder (cf. Stable Diffusion's decoder-only
# "ft-MSE" autoencoder, whose latents are those of the original).
DECODER_PARAMS = ("post_quant_conv", "decoder")


def decoder_loss_fn(model: VQVAE, frozen_params: dict):
  """`loss_fn(decoder_params, batch, rng) -> (loss_sum, weight)`: decoder-only fine-tuning.

  `frozen_params` are the full VQ-VAE params; `decoder_params` (the `DECODER_PARAMS` subtrees)
  replace theirs. Loss per image = MSE (PSNR's loss) of the decoder's reconstruction from the
  quantised f_hat (even batch rows) or from the unquantised latents (odd rows): VARSR decodes
  f_hat_{K-1} + e + 0.6 x0, which lies between the two and equals the latter with a perfect
  refiner. The encoder and the quantiser run under stop_gradient.
  """
  def loss_fn(params, batch, rng):
    del rng
    missing = set(DECODER_PARAMS) - set(params)
    if missing or set(params) - set(DECODER_PARAMS):
      raise ValueError(f"decoder params must hold exactly {DECODER_PARAMS}, got {sorted(params)}.")
    img = batch["image"]
    apply = functools.partial(model.apply, {"params": {**frozen_params, **params}})
    f = jax.lax.stop_gradient(apply(img, method="features"))
    _, f_hat, _ = apply(f, method=lambda m, x: m.quantize.encode(x))
    quantised = (jnp.arange(img.shape[0]) % 2 == 0)[:, None, None, None]
    rec = apply(jnp.where(quantised, f_hat, f), method="decode_fhat")
    per_image = jnp.mean((rec - img) ** 2, axis=(1, 2, 3))
    return jnp.sum(per_image), jnp.asarray(img.shape[0], jnp.float32)

  return loss_fn
