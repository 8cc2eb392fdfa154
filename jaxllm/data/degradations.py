"""Real-ESRGAN's second-order blind degradation (Wang et al., 2021), on the host in numpy.

Follows xinntao/Real-ESRGAN (realesrgan/models/realesrgan_model.py `feed_data`,
realesrgan/data/realesrgan_dataset.py) and XPixelGroup/BasicSR (basicsr/data/degradations.py):

  stage 1: blur (kernel 1) -> random resize -> Gaussian or Poisson noise -> JPEG
  stage 2: blur (kernel 2, with probability) -> random resize -> noise
  final:   with p 0.5 [resize to HR/scale, sinc filter, JPEG] else [JPEG, resize, sinc];
           clip and round to 8-bit levels.

Kernels: isotropic / anisotropic Gaussian, generalized Gaussian exp(-0.5 (x^T S^-1 x)^beta),
plateau 1 / (1 + (x^T S^-1 x)^beta), and 2-D sinc (circular low-pass) w J1(w r) / (2 pi r), odd
sizes 7..21 zero-padded to 21, each normalised to sum 1.

Host-side choices (documented differences from the PyTorch GPU code): resizes use
`jaxllm.data.images.resize` (the same linear maps as `F.interpolate` with an explicit output
size; the first resize sizes the output as floor(side x scale)); JPEG is Pillow's libjpeg at an
integer quality (Real-ESRGAN's DiffJPEG uses the same quantisation tables, in float); the Poisson
noise follows BasicSR's numpy version (levels = next power of two above the number of distinct
8-bit values); the HR image is not unsharp-masked here (Real-ESRGAN sharpens the target, not the
degradation input, so that belongs to the data pipeline).

Everything draws from one `np.random.Generator`, so a seed fixes the whole degradation.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from scipy import signal, special

from jaxllm.data.images import crop_to_multiple, resize, to_rgb

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso",
                "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")

# ------------------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Random blur kernel ranges (one per stage)."""

  sizes: tuple[int, ...] = tuple(range(7, 22, 2))
  probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # over KERNEL_TYPES
  sigma: tuple[float, float] = (0.2, 3.0)
  betag: tuple[float, float] = (0.5, 4.0)  # generalized Gaussian shape
  betap: tuple[float, float] = (1.0, 2.0)  # plateau shape
  sinc_prob: float = 0.1

  def __post_init__(self):
    if len(self.probs) != len(KERNEL_TYPES) or not math.isclose(sum(self.probs), 1.0):
      raise ValueError(f"KernelConfig.probs must give {len(KERNEL_TYPES)} probabilities "
                       f"summing to 1 (for {KERNEL_TYPES}), got {self.probs}.")
    if any(s % 2 == 0 or s < 3 or s > 21 for s in self.sizes):
      raise ValueError(f"KernelConfig.sizes must be odd in [3, 21], got {self.sizes}.")


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """Resize and noise ranges of one degradation stage."""

  resize_prob: tuple[float, float, float]  # up, down, keep
  resize_range: tuple[float, float]
  gaussian_noise_prob: float
  noise_range: tuple[float, float]  # Gaussian sigma on the 0-255 scale
  poisson_scale_range: tuple[float, float]
  gray_noise_prob: float
  jpeg_range: tuple[float, float]
  blur_prob: float = 1.0


@dataclasses.dataclass(frozen=True)
class DegradationConfig:
  scale: int = 4
  kernel1: KernelConfig = KernelConfig()
  kernel2: KernelConfig = KernelConfig(sigma=(0.2, 1.5))
  stage1: StageConfig = StageConfig((0.2, 0.7, 0.1), (0.15, 1.5), 0.5, (1.0, 30.0),
                                    (0.05, 3.0), 0.4, (30.0, 95.0))
  stage2: StageConfig = StageConfig((0.3, 0.4, 0.3), (0.3, 1.2), 0.5, (1.0, 25.0),
                                    (0.05, 2.5), 0.4, (30.0, 95.0), blur_prob=0.8)
  final_sinc_prob: float = 0.8
  kernel_pad: int = 21

  @property
  def min_hr_side(self) -> int:
    """Smallest HR side accepted: 8 LR pixels."""
    return 8 * self.scale


def realesrgan_x4(**kw) -> DegradationConfig:
  """Real-ESRGAN x4plus's official ranges (options/train_realesrgan_x4plus.yml)."""
  return DegradationConfig(**kw)


def varsr_x4(**kw) -> DegradationConfig:
  """VARSR's milder ranges: smaller resize spans, weaker noise, JPEG >= 60, stage-2 blur p 0.5."""
  base = DegradationConfig()
  s1 = dataclasses.replace(base.stage1, resize_range=(0.3, 1.5), noise_range=(1.0, 15.0),
                           poisson_scale_range=(0.05, 2.0), jpeg_range=(60.0, 95.0))
  s2 = dataclasses.replace(base.stage2, blur_prob=0.5, resize_range=(0.6, 1.2),
                           noise_range=(1.0, 12.0), poisson_scale_range=(0.05, 1.0),
                           jpeg_range=(60.0, 100.0))
  return DegradationConfig(**{**dict(stage1=s1, stage2=s2), **kw})


PRESETS = {"realesrgan_x4": realesrgan_x4, "varsr_x4": varsr_x4}


def preset(name: str, **overrides) -> DegradationConfig:
  if name not in PRESETS:
    raise ValueError(f"Unknown degradation preset {name!r}; choose one of {sorted(PRESETS)}.")
  return PRESETS[name](**overrides)


# ------------------------------------------------------------------------------------- kernels


def _grid(size: int) -> np.ndarray:
  ax = np.arange(size, dtype=np.float64) - (size - 1) / 2
  xx, yy = np.meshgrid(ax, ax)
  return np.stack([xx, yy], axis=-1)  # [size, size, 2] (x, y)


def _quad_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
  """x^T S^-1 x with S = R diag(sx^2, sy^2) R^T."""
  c, s = math.cos(theta), math.sin(theta)
  rot = np.array([[c, -s], [s, c]])
  cov = rot @ np.diag([sigma_x ** 2, sigma_y ** 2]) @ rot.T
  g = _grid(size)
  return np.einsum("...i,ij,...j->...", g, np.linalg.inv(cov), g)


def _normalise(k: np.ndarray) -> np.ndarray:
  return (k / np.sum(k)).astype(np.float32)


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float | None = None,
                    theta: float = 0.0) -> np.ndarray:
  """Bivariate Gaussian (isotropic when sigma_y is None)."""
  q = _quad_form(size, sigma_x, sigma_x if sigma_y is None else sigma_y, theta)
  return _normalise(np.exp(-0.5 * q))


def generalized_gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float,
                                beta: float) -> np.ndarray:
  return _normalise(np.exp(-0.5 * np.power(_quad_form(size, sigma_x, sigma_y, theta), beta)))


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, theta: float,
                   beta: float) -> np.ndarray:
  return _normalise(1.0 / (np.power(_quad_form(size, sigma_x, sigma_y, theta), beta) + 1.0))


def sinc_kernel(size: int, omega_c: float, pad_to: int = 0) -> np.ndarray:
  """2-D circular low-pass (ringing / overshoot) filter with cutoff omega_c in (0, pi]."""
  r = np.linalg.norm(_grid(size), axis=-1)
  with np.errstate(divide="ignore", invalid="ignore"):
    k = omega_c * special.j1(omega_c * r) / (2 * np.pi * r)
  k[r == 0] = omega_c ** 2 / (4 * np.pi)
  return pad_kernel(_normalise(k), pad_to)


def pad_kernel(k: np.ndarray, pad_to: int) -> np.ndarray:
  p = (pad_to - k.shape[0]) // 2
  return np.pad(k, p) if p > 0 else k


def _beta(rng, lo_hi):  # BasicSR: half the time below 1, half above
  lo, hi = lo_hi
  return rng.uniform(lo, 1.0) if rng.uniform() < 0.5 else rng.uniform(1.0, hi)


def random_kernel(rng: np.random.Generator, cfg: KernelConfig, pad_to: int = 21) -> np.ndarray:
  """One of the mixed kernels (or, with `sinc_prob`, a sinc), zero-padded to pad_to x pad_to."""
  size = int(rng.choice(cfg.sizes))
  if rng.uniform() < cfg.sinc_prob:
    omega_c = rng.uniform(np.pi / 3, np.pi) if size < 13 else rng.uniform(np.pi / 5, np.pi)
    return sinc_kernel(size, omega_c, pad_to)
  kind = KERNEL_TYPES[rng.choice(len(KERNEL_TYPES), p=np.asarray(cfg.probs))]
  sx = rng.uniform(*cfg.sigma)
  if kind.endswith("iso") and not kind.endswith("aniso"):
    sy, theta = sx, 0.0
  else:
    sy, theta = rng.uniform(*cfg.sigma), rng.uniform(-np.pi, np.pi)
  if kind.startswith("generalized"):
    k = generalized_gaussian_kernel(size, sx, sy, theta, _beta(rng, cfg.betag))
  elif kind.startswith("plateau"):
    k = plateau_kernel(size, sx, sy, theta, _beta(rng, cfg.betap))
  else:
    k = gaussian_kernel(size, sx, sy, theta)
  return pad_kernel(k, pad_to)


# ------------------------------------------------------------------------------ image operations


def filter2d(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """Cross-correlation with reflect padding (BasicSR `filter2D`), per channel, via FFT."""
  p = kernel.shape[0] // 2
  padded = np.pad(img, ((p, p), (p, p), (0, 0)), mode="reflect")
  out = signal.fftconvolve(padded, kernel[::-1, ::-1, None].astype(np.float32), mode="valid",
                           axes=(0, 1))
  return out.astype(np.float32)


def add_gaussian_noise(img, rng, sigma: float, gray: bool) -> np.ndarray:
  """sigma on the 0-255 scale; gray noise is one field shared by the three channels."""
  shape = img.shape[:2] + (1,) if gray else img.shape
  noise = rng.standard_normal(shape).astype(np.float32) * (sigma / 255.0)
  return np.clip(img + noise, 0, 1)


def add_poisson_noise(img, rng, scale: float, gray: bool) -> np.ndarray:
  """BasicSR's Poisson noise: shot noise at 2^ceil(log2(#distinct 8-bit levels)) levels."""
  src = img
  if gray:
    src = (img @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
  src = np.clip(np.round(src * 255.0), 0, 255) / 255.0
  vals = 2 ** np.ceil(np.log2(max(len(np.unique(src)), 2)))
  noise = rng.poisson(src * vals).astype(np.float32) / vals - src
  return np.clip(img + noise.astype(np.float32) * scale, 0, 1)


def jpeg(img: np.ndarray, quality: float) -> np.ndarray:
  """Pillow JPEG round trip at integer quality (4:2:0 chroma, libjpeg's standard tables)."""
  from PIL import Image
  buf = io.BytesIO()
  u8 = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
  Image.fromarray(u8).save(buf, format="JPEG", quality=round(quality))
  buf.seek(0)
  with Image.open(buf) as im:
    return np.asarray(im.convert("RGB"), np.float32) / 255.0


def _noise(img, rng, st: StageConfig) -> np.ndarray:
  gray = rng.uniform() < st.gray_noise_prob
  if rng.uniform() < st.gaussian_noise_prob:
    return add_gaussian_noise(img, rng, rng.uniform(*st.noise_range), gray)
  return add_poisson_noise(img, rng, rng.uniform(*st.poisson_scale_range), gray)


def _random_scale(rng, st: StageConfig) -> float:
  kind = rng.choice(3, p=np.asarray(st.resize_prob))
  if kind == 0:
    return rng.uniform(1.0, st.resize_range[1])
  if kind == 1:
    return rng.uniform(st.resize_range[0], 1.0)
  return 1.0


def _mode(rng) -> str:
  return RESIZE_MODES[rng.integers(len(RESIZE_MODES))]


def final_sinc(rng, cfg: DegradationConfig) -> np.ndarray:
  if rng.uniform() < cfg.final_sinc_prob:
    size = int(rng.choice(cfg.kernel1.sizes))
    return sinc_kernel(size, rng.uniform(np.pi / 3, np.pi), cfg.kernel_pad)
  pulse = np.zeros((cfg.kernel_pad, cfg.kernel_pad), np.float32)
  pulse[cfg.kernel_pad // 2, cfg.kernel_pad // 2] = 1.0
  return pulse


# ------------------------------------------------------------------------------------ pipeline


def degrade(hr, rng: np.random.Generator | int,
            cfg: DegradationConfig = DegradationConfig()) -> tuple[np.ndarray, np.ndarray]:
  """HR image -> (HR, LR): LR is [H/scale, W/scale, 3] float32 on 8-bit levels in [0, 1].

  `hr` goes through `jaxllm.data.images.to_rgb` (grayscale replicated, alpha dropped) and is
  cropped at the bottom / right to a multiple of `scale`; the returned HR is that crop. An HR
  side below `cfg.min_hr_side` raises a ValueError. `rng` is a Generator or an int seed.
  """
  rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
  hr = crop_to_multiple(to_rgb(hr), cfg.scale)
  H, W = hr.shape[:2]
  if min(H, W) < cfg.min_hr_side:
    raise ValueError(f"HR image {H}x{W} is smaller than the minimum side {cfg.min_hr_side} "
                     f"(8 LR pixels at x{cfg.scale}); use a larger image or crop.")
  # kernels are drawn first (the dataset draws them before the model's feed_data)
  k1 = random_kernel(rng, cfg.kernel1, cfg.kernel_pad)
  k2 = random_kernel(rng, cfg.kernel2, cfg.kernel_pad)
  k_final = final_sinc(rng, cfg)

  # stage 1
  out = filter2d(hr, k1)
  s = _random_scale(rng, cfg.stage1)
  out = resize(out, (max(int(H * s), 1), max(int(W * s), 1)), _mode(rng))
  out = _noise(out, rng, cfg.stage1)
  out = jpeg(np.clip(out, 0, 1), rng.uniform(*cfg.stage1.jpeg_range))
  # stage 2
  if rng.uniform() < cfg.stage2.blur_prob:
    out = filter2d(out, k2)
  s = _random_scale(rng, cfg.stage2)
  out = resize(out, (max(int(H / cfg.scale * s), 1), max(int(W / cfg.scale * s), 1)),
               _mode(rng))
  out = _noise(out, rng, cfg.stage2)
  # final: resize + sinc and JPEG, in a random order
  lr_size = (H // cfg.scale, W // cfg.scale)
  if rng.uniform() < 0.5:
    out = filter2d(resize(out, lr_size, _mode(rng)), k_final)
    out = jpeg(np.clip(out, 0, 1), rng.uniform(*cfg.stage2.jpeg_range))
  else:
    out = jpeg(np.clip(out, 0, 1), rng.uniform(*cfg.stage2.jpeg_range))
    out = filter2d(resize(out, lr_size, _mode(rng)), k_final)
  lr = np.clip(np.round(out * 255.0), 0, 255).astype(np.float32) / 255.0
  return hr, lr


def make_negative(hr, rng: np.random.Generator | int, factor: int = 2,
                  cfg: DegradationConfig | None = None) -> np.ndarray:
  """A low-quality image at the HR's own size, for VARSR's negative (class 1) targets.

  VARSR takes its negatives from low-MOS photos of IQA datasets, which are not available
  offline; here they are made from the training photos themselves: the HR goes through the
  official (strong) Real-ESRGAN degradation at x`factor` and is bicubic-upsampled back. The
  negative sample's LR input is then `degrade(negative, ...)`, the same as for positives.
  """
  cfg = cfg or realesrgan_x4(scale=factor)
  if cfg.scale != factor:
    raise ValueError(f"cfg.scale={cfg.scale} differs from factor={factor}.")
  hr, lr = degrade(hr, rng, cfg)
  return np.clip(resize(lr, hr.shape[:2], "bicubic"), 0, 1)
