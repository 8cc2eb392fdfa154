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

NIQE is not implemented: its pristine-model parameters (BasicSR's `niqe_pris_params.npz`) are
not available offline here. Learned metrics (LPIPS, ...) need user-supplied weights.
"""

from __future__ import annotations

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


def sr_metrics(sr, hr, scale: int) -> dict[str, float]:
  """{"psnr", "ssim"} on Y with border = scale: the numbers SR papers report."""
  return {"psnr": psnr(sr, hr, scale), "ssim": ssim(sr, hr, scale)}
