"""Diffusion refiner: MAR's per-token diffusion loss (Li et al., 2024), as VARSR uses it.

Follows LTH14/mar models/diffloss.py (`SimpleMLPAdaLN`) and diffusion/ (Gaussian diffusion with
a cosine schedule, respaced sampling). Each token's target is a small vector x0 (VARSR: the last
scale's quantisation residual / 0.6, 32 numbers); the condition z is the transformer's state at
that token. The network: y = TimestepEmbed(t) + Linear(z); x = Linear(x_t); res-blocks
x += g * MLP(LN(x)(1 + s) + b) with (b, s, g) = Linear(SiLU(y)); final modulated LN and Linear.
AdaLN projections and the output layer start at zero (the initial prediction is eps = 0).

Simplification (documented): eps-prediction with the fixed "small" posterior variance and an MSE
loss; MAR also learns the variance range with a VLB term, which matters for likelihoods, not for
the samples VARSR decodes. Sampling: ancestral DDPM over a respaced subset of the 1000 training
steps (10 for VARSR, 100 for MAR), noise scaled by a temperature.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


@dataclasses.dataclass(frozen=True)
class RefinerConfig:
  target_dim: int = 32  # VARSR: Cvae
  cond_dim: int = 1536  # the transformer width
  width: int = 1024
  depth: int = 6  # res-blocks
  num_train_steps: int = 1000
  num_sample_steps: int = 10
  batch_mul: int = 4  # diffusion timesteps drawn per token per training step
  x0_clip: float = 10.0  # bound on the x0 estimate while sampling (1/sqrt(acp) reaches 2e4)

  def __post_init__(self):
    if not 1 <= self.num_sample_steps <= self.num_train_steps:
      raise ValueError(f"RefinerConfig.num_sample_steps={self.num_sample_steps} must lie in "
                       f"[1, num_train_steps={self.num_train_steps}].")


def tiny(**kw) -> RefinerConfig:
  return RefinerConfig(**{**dict(target_dim=2, cond_dim=4, width=64, depth=2), **kw})


# ---------------------------------------------------------------------------------- schedules


def cosine_alphas_cumprod(num_steps: int, s: float = 0.008) -> np.ndarray:
  """Nichol & Dhariwal's cosine schedule, betas clipped at 0.999 (float64)."""
  f = lambda t: math.cos((t + s) / (1 + s) * math.pi / 2) ** 2
  betas = np.array([min(1 - f((i + 1) / num_steps) / f(i / num_steps), 0.999)
                    for i in range(num_steps)])
  return np.cumprod(1.0 - betas)


def respaced_timesteps(num_train: int, num_sample: int) -> np.ndarray:
  """Evenly spaced subset of [0, num_train) (guided-diffusion's `space_timesteps` for one
  section), ascending."""
  if num_sample == 1:
    return np.array([num_train - 1])
  frac = (num_train - 1) / (num_sample - 1)
  return np.array(sorted({round(i * frac) for i in range(num_sample)}))


def respaced_schedule(num_train: int, num_sample: int):
  """(timesteps, alphas_cumprod, betas) of the respaced process (float64)."""
  ts = respaced_timesteps(num_train, num_sample)
  acp = cosine_alphas_cumprod(num_train)[ts]
  prev = np.concatenate([[1.0], acp[:-1]])
  return ts, acp, 1.0 - acp / prev


# -------------------------------------------------------------------------------------- network


def timestep_embedding(t_N: Float[Array, " N"], dim: int = 256, max_period: float = 10000.0):
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t_N.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _dense(features, name, zero=False):
  init = nn.initializers.zeros if zero else nn.initializers.xavier_uniform()
  return nn.Dense(features, name=name, kernel_init=init, bias_init=nn.initializers.zeros)


class ResBlock(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x_NW, y_NW):
    b, s, g = jnp.split(_dense(3 * self.width, "ada_lin", zero=True)(nn.silu(y_NW)), 3, -1)
    h = nn.LayerNorm(epsilon=1e-6, name="in_ln")(x_NW) * (1 + s) + b
    h = _dense(self.width, "fc2")(nn.silu(_dense(self.width, "fc1")(h)))
    return x_NW + g * h


class DiffusionMLP(nn.Module):
  """MAR's SimpleMLPAdaLN: eps_theta(x_t, t, z)."""

  config: RefinerConfig

  @nn.compact
  def __call__(self, x_ND: Float[Array, "N D"], t_N, z_NC: Float[Array, "N C"]):
    c = self.config
    temb = timestep_embedding(t_N)
    y = _dense(c.width, "t_fc2")(nn.silu(_dense(c.width, "t_fc1")(temb)))
    y = y + _dense(c.width, "cond_embed")(z_NC)
    x = _dense(c.width, "input_proj")(x_ND)
    for i in range(c.depth):
      x = ResBlock(c.width, name=f"res_{i}")(x, y)
    b, s = jnp.split(_dense(2 * c.width, "final_ada", zero=True)(nn.silu(y)), 2, -1)
    x = nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False)(x) * (1 + s) + b
    return _dense(c.target_dim, "final", zero=True)(x)


# --------------------------------------------------------------------------------- loss, sample


def diffusion_loss(model: DiffusionMLP, params, x0_ND, z_NC, rng, mask_N=None):
  """Mean eps-MSE over `batch_mul` random timesteps per token -> (loss_sum, weight).

  `mask_N` (optional) weights tokens (e.g. 0 for padding)."""
  c = model.config
  x0 = jnp.tile(x0_ND, (c.batch_mul, 1))
  z = jnp.tile(z_NC, (c.batch_mul, 1))
  w = jnp.ones(x0.shape[0]) if mask_N is None else jnp.tile(mask_N, (c.batch_mul,))
  acp_all = jnp.asarray(cosine_alphas_cumprod(c.num_train_steps), jnp.float32)
  k_t, k_e = jax.random.split(rng)
  t = jax.random.randint(k_t, (x0.shape[0],), 0, c.num_train_steps)
  eps = jax.random.normal(k_e, x0.shape)
  acp = acp_all[t][:, None]
  xt = jnp.sqrt(acp) * x0 + jnp.sqrt(1 - acp) * eps
  pred = model.apply({"params": params}, xt, t, z)
  per_token = jnp.mean((pred - eps) ** 2, axis=-1)
  return jnp.sum(per_token * w) / c.batch_mul, jnp.sum(w) / c.batch_mul


def sample(model: DiffusionMLP, params, z_NC, rng, *, num_steps: int | None = None,
           temperature: float = 1.0, cfg: float = 1.0, z_uncond_NC=None):
  """Ancestral sampling over the respaced schedule -> x0 [N, target_dim].

  With `z_uncond_NC`, eps = eps_u + cfg (eps_c - eps_u) (MAR's guidance)."""
  c = model.config
  n = num_steps or c.num_sample_steps
  ts, acp, betas = respaced_schedule(c.num_train_steps, n)
  prev = np.concatenate([[1.0], acp[:-1]])
  post_var = betas * (1 - prev) / (1 - acp)
  coef_x0 = np.sqrt(prev) * betas / (1 - acp)
  coef_xt = np.sqrt(1 - betas) * (1 - prev) / (1 - acp)
  N = z_NC.shape[0]
  rng, k0 = jax.random.split(rng)
  x = jax.random.normal(k0, (N, c.target_dim))

  def eps_fn(x, t):
    tt = jnp.full((1,), t, jnp.int32)  # one shared timestep: its embedding broadcasts over N
    e = model.apply({"params": params}, x, tt, z_NC)
    if z_uncond_NC is not None:
      eu = model.apply({"params": params}, x, tt, z_uncond_NC)
      e = eu + cfg * (e - eu)
    return e

  f32 = lambda a: jnp.asarray(a, jnp.float32)
  per_step = (jnp.asarray(ts, jnp.int32), f32(np.sqrt(1 - acp)), f32(np.sqrt(acp)),
              f32(coef_x0), f32(coef_xt), f32(np.sqrt(post_var)), jnp.arange(len(ts)))

  def body(carry, inp):
    x, rng = carry
    t, s1, sa, cx0, cxt, sd, i = inp
    x0 = jnp.clip((x - s1 * eps_fn(x, t)) / sa, -c.x0_clip, c.x0_clip)
    rng, k = jax.random.split(rng)
    noise = jnp.where(i > 0, sd * temperature, 0.0) * jax.random.normal(k, x.shape)
    return (cx0 * x0 + cxt * x + noise, rng), None

  (x, _), _ = jax.lax.scan(body, (x, rng), jax.tree.map(lambda a: a[::-1], per_step))
  return x
