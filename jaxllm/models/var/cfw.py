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
encoder starts from the VQ-VAE's encoder; MSE (PSNR's loss) instead of StableSR's L1 + LPIPS
(which needs pretrained weights), and optionally (`adv_weight` > 0) its adversarial term: a
PatchGAN discriminator trained from scratch beside the fusions with hinge losses, the generator's
term weighted adaptively as in taming-transformers (the ratio of the reconstruction's to the
adversarial term's gradient norm, times `adv_weight`) but measured at the output image, since
the decoder's last layer is frozen here; the fused levels are configurable, by default every level
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
  adv_weight: float = 0.0  # adversarial gradient / reconstruction gradient at the output; 0: off
  disc_ch: int = 32  # the discriminator's first width (doubling per stride-2 layer, 3 layers)

  def __post_init__(self):
    if self.levels is not None:
      object.__setattr__(self, "levels", tuple(self.levels))
    if self.blocks < 1:
      raise ValueError(f"CFWConfig.blocks={self.blocks} must be >= 1.")
    if self.adv_weight < 0:
      raise ValueError(f"CFWConfig.adv_weight={self.adv_weight} must be >= 0 (0: MSE only).")

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


class PatchDiscriminator(nn.Module):
  """PatchGAN (taming-transformers' NLayerDiscriminator layout, GroupNorm for BatchNorm): 4 x 4
  convs of stride 2 and widths ch, 2 ch, 4 ch with leaky ReLU, then one logit per patch."""

  ch: int = 32

  @nn.compact
  def __call__(self, img_BHW3):
    h = img_BHW3
    for i in range(3):
      h = nn.Conv(self.ch * 2 ** i, (4, 4), strides=2, padding=((1, 1), (1, 1)),
                  name=f"conv_{i}")(h)
      if i:
        h = nn.GroupNorm(8, name=f"norm_{i}")(h)
      h = nn.leaky_relu(h, 0.2)
    return nn.Conv(1, (3, 3), padding="SAME", name="out")(h)[..., 0]


# The parameters a CFW stage trains; the rest (DECODER_PARAMS) are the frozen decoder's. With
# the adversarial term, DISC holds the discriminator's (unused at inference).
LR_ENCODER, DISC = "lr_encoder", "disc"


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
  if model.cfw.adv_weight > 0:
    fresh[DISC] = PatchDiscriminator(model.cfw.disc_ch).init(
        jax.random.key(seed + 1), jnp.zeros((1, S, S, 3)))["params"]
  return {**fresh, **{k: vq_params[k] for k in DECODER_PARAMS}}


def decoder_params(params: dict) -> dict:
  """The params `CFWDecoder.apply` takes: all but the discriminator's."""
  return {k: v for k, v in params.items() if k != DISC}


def split(params: dict) -> tuple[dict, dict]:
  """-> (trained: the LR encoder and the fusions, frozen: the decoder's)."""
  frozen = {k: params[k] for k in DECODER_PARAMS}
  return {k: v for k, v in params.items() if k not in DECODER_PARAMS}, frozen


def cfw_loss_fn(model: CFWDecoder, frozen: dict, generate):
  """`loss_fn(trained_params, batch, rng) -> (loss_sum, weight)` for `jaxllm.train.step`.

  `generate(lr, rng) -> f_hat` is the frozen generator (e.g. VARSR's `upscale`), run on every
  batch without gradient; loss per image = MSE of the CFW decode at w = 1 against batch["hr"].

  With `adv_weight` > 0, one loss trains both players (each term sees the other player's
  parameters through stop_gradient, so one gradient step updates each on its own objective):
  + lam x (-D(out)) for the fusions, lam = adv_weight ||d MSE / d out|| / ||d(-D(out)) / d out||
  (held constant), + hinge relu(1 - D(hr)) + relu(1 + D(out)) for the discriminator; D(.) is
  the mean patch logit of an image.
  """
  adv = model.cfw.adv_weight
  disc = PatchDiscriminator(model.cfw.disc_ch)

  def loss_fn(params, batch, rng):
    f_hat = jax.lax.stop_gradient(generate(batch["lr"], rng))
    out = model.apply({"params": {**frozen, **decoder_params(params)}}, f_hat, batch["lr"], 1.0)
    hr = batch["hr"]
    per_image = jnp.mean((out - hr) ** 2, axis=(1, 2, 3))
    if adv > 0:
      d = params[DISC]
      d_sg = jax.lax.stop_gradient(d)
      g_adv = lambda o: -jnp.mean(disc.apply({"params": d_sg}, o), axis=(1, 2))  # noqa: E731
      g_rec = jax.grad(lambda o: jnp.sum(jnp.mean((o - hr) ** 2, axis=(1, 2, 3))))(out)
      g_gan = jax.grad(lambda o: jnp.sum(g_adv(o)))(out)
      lam = jax.lax.stop_gradient(
          adv * jnp.linalg.norm(g_rec) / (jnp.linalg.norm(g_gan) + 1e-8))
      hinge = (jnp.mean(jax.nn.relu(1 - disc.apply({"params": d}, hr)), axis=(1, 2))
               + jnp.mean(jax.nn.relu(1 + disc.apply({"params": d},
                                                       jax.lax.stop_gradient(out))), axis=(1, 2)))
      per_image = per_image + lam * g_adv(out) + hinge
    return jnp.sum(per_image), jnp.asarray(out.shape[0], jnp.float32)

  return loss_fn

