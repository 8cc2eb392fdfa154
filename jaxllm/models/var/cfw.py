"""Controllable feature wrapping (CFW; StableSR, Wang et al., IJCV 2024, section 3.3): the
VQ-VAE decoder with features of the low-resolution input fused into its levels, a knob w that
trades the generative decode (w = 0) for fidelity to the input (w = 1) at inference.

A generative SR model decodes one plausible image per input; PSNR rewards the conditional mean,
which one draw from a broad posterior is not (`docs/results/varsr.md`). StableSR's answer:
encode the (bicubic-upsampled) LR image with a copy of the autoencoder's encoder, and at chosen
decoder levels i add a correction computed from both feature maps,

    F_m = F_d + w C_i(F_e, F_d),

with C_i = ResBlock(2C -> C), more ResBlocks, a 3 x 3 conv (StableSR: ResBlock, RRDB blocks,
ResBlock; `Fuse_sft_block_RRDB` in its `ldm/modules/diffusionmodules/model.py`). The decoder
itself stays frozen, so w = 0 is exactly the plain decoder; C is trained with the generator's
own outputs as decoder input (StableSR generates latents with the trained diffusion model; here
`train.sr` runs VARSR on every training batch) and the HR crop as target.

Ours: the last conv of C_i starts at zero, so training starts from the plain decoder; the LR
encoder starts from the VQ-VAE's encoder; MSE (PSNR's loss) instead of StableSR's L1 + LPIPS +
GAN, which need pretrained weights; the fused levels are configurable, by default every level
but the lowest-resolution one (StableSR fuses the middle ones: at its 512-pixel outputs level 0
is costly; at 64 pixels it is not, and the LR's structure is finest there).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxllm.models.var.vqvae import (DECODER_PARAMS, Decoder, Encoder, ResBlock, VQVAEConfig,
                                     resize)


@dataclasses.dataclass(frozen=True)
class CFWConfig:
  levels: tuple[int, ...] | None = None  # decoder levels to fuse (0: full resolution); None:
  # all but the lowest-resolution one
  blocks: int = 2  # ResBlocks in each fusion (>= 1)

  def __post_init__(self):
    if self.levels is not None:
      object.__setattr__(self, "levels", tuple(self.levels))
    if self.blocks < 1:
      raise ValueError(f"CFWConfig.blocks={self.blocks} must be >= 1.")

  def fused(self, vq: VQVAEConfig) -> tuple[int, ...]:
    n = len(vq.ch_mult)
    levels = tuple(range(n - 1)) if self.levels is None else self.levels
    bad = [i for i in levels if not 0 <= i < n]
    if bad or not levels:
      raise ValueError(f"CFW levels {levels}: this VQ-VAE's decoder has levels 0..{n - 1} "
                       "(0 at full resolution); name at least one of them.")
    return tuple(sorted(set(levels)))


class Fuse(nn.Module):
  """F_d + w C(F_e, F_d), C's last conv zero-initialised."""

  channels: int
  groups: int
  blocks: int

  @nn.compact
  def __call__(self, enc_BHWC, dec_BHWC, w):
    h = jnp.concatenate([enc_BHWC, dec_BHWC], axis=-1)
    for j in range(self.blocks):
      h = ResBlock(self.channels, self.groups, name=f"block_{j}")(h)
    h = nn.Conv(self.channels, (3, 3), padding="SAME", kernel_init=nn.initializers.zeros,
                name="out")(h)
    return dec_BHWC + w * h


# The parameters a CFW stage trains; the rest (DECODER_PARAMS) are the frozen decoder's.
LR_ENCODER = "lr_encoder"


class CFWDecoder(nn.Module):
  """(f_hat [B, h, w, Cv], LR [B, H/s, W/s, 3] in [-1, 1], w) -> image [B, H, W, 3]: the
  VQ-VAE's `post_quant_conv` and decoder (parameter names as in `VQVAE`) with CFW fusions."""

  vq: VQVAEConfig
  cfw: CFWConfig = CFWConfig()

  def setup(self):
    v = self.vq
    self.lr_encoder = Encoder(v.ch, v.ch_mult, v.num_res_blocks, v.c_vae, v.norm_groups,
                              v.mid_attn, v.level_attn)
    self.post_quant_conv = nn.Conv(v.c_vae, (3, 3), padding="SAME")
    self.decoder = Decoder(v.ch, v.ch_mult, v.num_res_blocks, v.norm_groups, v.mid_attn,
                           v.level_attn)
    self.levels = self.cfw.fused(v)
    self.fuse = [Fuse(v.ch * v.ch_mult[i], v.norm_groups, self.cfw.blocks)
                 for i in self.levels]

  def __call__(self, f_hat_BhwC: Float[Array, "B h w C"], lr_BhW3: Float[Array, "B hl wl 3"],
               w: float | Float[Array, ""] = 1.0) -> Float[Array, "B H W 3"]:
    S = self.vq.image_size
    if lr_BhW3.ndim != 4 or lr_BhW3.shape[-1] != 3 or S % lr_BhW3.shape[1]:
      raise ValueError(f"CFW needs RGB LR tiles [B, h, w, 3] whose side divides {S}, got "
                       f"{lr_BhW3.shape}.")
    feats = self.lr_encoder(resize(lr_BhW3, S, "bicubic"), features_only=True)
    by_level = dict(zip(self.levels, self.fuse))

    def hook(i, h):
      return by_level[i](feats[i], h, w) if i in by_level else h

    return self.decoder(self.post_quant_conv(f_hat_BhwC), level_hook=hook)


def init_params(model: CFWDecoder, vq_params: dict, seed: int = 0) -> dict:
  """CFW parameters starting from a (tuned) VQ-VAE: its decoder and `post_quant_conv`, its
  encoder's levels as the LR encoder, fresh fusions (whose output convs are zero)."""
  S, s = model.vq.image_size, model.vq.downsample
  fresh = model.init(jax.random.key(seed), jnp.zeros((1, S // s, S // s, model.vq.c_vae)),
                     jnp.zeros((1, S, S, 3)))["params"]
  enc = vq_params["encoder"]
  fresh[LR_ENCODER] = {k: enc[k] for k in fresh[LR_ENCODER]}
  return {**fresh, **{k: vq_params[k] for k in DECODER_PARAMS}}


def split(params: dict) -> tuple[dict, dict]:
  """-> (trained: the LR encoder and the fusions, frozen: the decoder's)."""
  frozen = {k: params[k] for k in DECODER_PARAMS}
  return {k: v for k, v in params.items() if k not in DECODER_PARAMS}, frozen


def cfw_loss_fn(model: CFWDecoder, frozen: dict, generate):
  """`loss_fn(trained_params, batch, rng) -> (loss_sum, weight)` for `jaxllm.train.step`.

  `generate(lr, rng) -> f_hat` is the frozen generator (e.g. VARSR's `upscale`), run on every
  batch without gradient; loss per image = MSE of the CFW decode at w = 1 against batch["hr"].
  """
  def loss_fn(params, batch, rng):
    f_hat = jax.lax.stop_gradient(generate(batch["lr"], rng))
    out = model.apply({"params": {**frozen, **params}}, f_hat, batch["lr"], 1.0)
    per_image = jnp.mean((out - batch["hr"]) ** 2, axis=(1, 2, 3))
    return jnp.sum(per_image), jnp.asarray(out.shape[0], jnp.float32)

  return loss_fn

