"""A small regression CNN for super-resolution: the baseline VARSR is compared with.

EDSR / SRResNet layout (Lim et al., 2017; Ledig et al., 2017), without batch norm:
conv3x3 3 -> F; `num_blocks` residual blocks x += res_scale * conv3x3(ReLU(conv3x3(x)));
conv3x3 and a long skip from the first conv; a pixel-shuffle upsampler (conv3x3 F -> 4F, then
depth-to-space x2, once per factor of 2); conv3x3 F -> 3. A global bicubic skip is added, so the
network predicts the residual over bicubic upsampling; its last conv starts at zero, so an
untrained model *is* bicubic. Fully convolutional: it takes an LR image of any size. Trained with
L1 on the same (HR crop, degraded LR) pairs as VARSR (`l1_loss_fn`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxllm.data.images import resize_batch


@dataclasses.dataclass(frozen=True)
class SRCNNConfig:
  scale: int = 4  # a power of two: one x2 pixel-shuffle stage per factor
  features: int = 64
  num_blocks: int = 8
  res_scale: float = 1.0  # EDSR uses 0.1 for its widest models

  def __post_init__(self):
    if self.scale < 2 or self.scale & (self.scale - 1):
      raise ValueError(f"SRCNNConfig.scale={self.scale}: the pixel-shuffle upsampler needs a "
                       "power of two (2, 4, 8).")
    if self.features < 1 or self.num_blocks < 0:
      raise ValueError("SRCNNConfig: features must be >= 1 and num_blocks >= 0.")


def small(**kw) -> SRCNNConfig:
  """The experiment's baseline: EDSR-baseline width with 14 blocks (1.4M parameters), sized so
  that a training step on 64-pixel crops costs about the FLOPs of a VARSR "small" step (21.1 vs
  20.6 GFLOP at batch 8, XLA's count)."""
  return SRCNNConfig(**{**dict(features=64, num_blocks=14), **kw})


def tiny(**kw) -> SRCNNConfig:
  """Unit tests."""
  return SRCNNConfig(**{**dict(features=16, num_blocks=2), **kw})


PRESETS = {f.__name__: f for f in (small, tiny)}


def preset(name: str, **overrides: Any) -> SRCNNConfig:
  if name not in PRESETS:
    raise ValueError(f"Unknown SR CNN preset {name!r}; choose one of {sorted(PRESETS)}.")
  return PRESETS[name](**overrides)


def pixel_shuffle(x_BHWC: Float[Array, "B H W C"], r: int) -> Float[Array, "B Hr Wr c"]:
  """Depth-to-space with PyTorch's channel order: out[h r + i, w r + j, c] = x[h, w, c r^2 +
  i r + j]."""
  B, H, W, C = x_BHWC.shape
  x = x_BHWC.reshape(B, H, W, C // (r * r), r, r)
  return x.transpose(0, 1, 4, 2, 5, 3).reshape(B, H * r, W * r, C // (r * r))


def bicubic_upsample(x_BHWC: Float[Array, "B H W C"], scale: int) -> Float[Array, "B Hs Ws C"]:
  """x`scale` bicubic upsampling, PyTorch `F.interpolate` semantics, any H x W."""
  H, W = x_BHWC.shape[1:3]
  return resize_batch(x_BHWC, (H * scale, W * scale), "bicubic")


def _conv(features: int, name: str, zero: bool = False) -> nn.Conv:
  return nn.Conv(features, (3, 3), padding="SAME", name=name,
                 kernel_init=nn.initializers.zeros if zero else nn.initializers.lecun_normal())


class ResBlock(nn.Module):
  features: int
  res_scale: float = 1.0

  @nn.compact
  def __call__(self, x_BHWF):
    h = _conv(self.features, "conv_0")(nn.relu(_conv(self.features, "conv_in")(x_BHWF)))
    return x_BHWF + self.res_scale * h


class SRCNN(nn.Module):
  """LR [B, h, w, 3] in [-1, 1] -> SR [B, h s, w s, 3] (unclipped, same range)."""

  config: SRCNNConfig

  @nn.compact
  def __call__(self, lr_BhwC: Float[Array, "B h w 3"]) -> Float[Array, "B H W 3"]:
    c = self.config
    x = lr_BhwC.astype(jnp.float32)
    head = _conv(c.features, "head")(x)
    h = head
    for i in range(c.num_blocks):
      h = ResBlock(c.features, c.res_scale, name=f"block_{i}")(h)
    h = head + _conv(c.features, "body_out")(h)
    for i in range(c.scale.bit_length() - 1):  # log2(scale) x2 stages
      h = nn.relu(pixel_shuffle(_conv(4 * c.features, f"up_{i}")(h), 2))
    return bicubic_upsample(x, c.scale) + _conv(3, "tail", zero=True)(h)


def l1_loss_fn(model: SRCNN):
  """`loss_fn(params, batch, rng) -> (sum over images of the mean |SR - HR|, num_images)`;
  batch "lr" [B, h, w, 3] and "hr" [B, h s, w s, 3], both in [-1, 1]."""

  def loss_fn(params, batch, rng):
    del rng  # deterministic
    sr = model.apply({"params": params}, batch["lr"])
    per_image = jnp.mean(jnp.abs(sr - batch["hr"].astype(jnp.float32)), axis=(1, 2, 3))
    return jnp.sum(per_image), jnp.asarray(per_image.shape[0], jnp.float32)

  return loss_fn
