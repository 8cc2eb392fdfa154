"""Images on the host: conversion to RGB float, PyTorch-compatible resizes, embedded photos.

Every image in the SR code is a float32 numpy array [H, W, 3] in [0, 1] (`to_rgb` converts).
Conversions, all documented here and applied by `to_rgb`:
- grayscale ([H, W] or [H, W, 1]) is replicated to three channels;
- RGBA ([H, W, 4]) loses its alpha channel (colours are kept as stored, not composited);
- uint8 / uint16 are divided by 255 / 65535; float input must already lie in [0, 1].
Anything else (2 channels, 5+ channels, float outside [0, 1], empty) raises a ValueError.

`resize_matrix` builds the [out, in] linear map of PyTorch's `F.interpolate` (modes "area",
"bilinear", "bicubic" with a = -0.75, align_corners=False, no antialiasing) so host-side resizes
match the GPU pipelines of Real-ESRGAN / BasicSR exactly. The same maps serve both resizes: `resize`
(one image on the host, numpy) and `resize_batch` (a batch in the graph, jax; used by the VQ-VAE,
VARSR and the CNN's bicubic skip).
"""

from __future__ import annotations

import functools
import os

import jax.numpy as jnp
import numpy as np

# scikit-image's bundled RGB photographs (no download). The held-out ones are never trained on.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left",
                  "motorcycle_right", "hubble_deep_field", "retina", "immunohistochemistry")
HELD_OUT_PHOTOS = ("chelsea", "motorcycle_right")
TRAIN_PHOTOS = tuple(n for n in SKIMAGE_PHOTOS if n not in HELD_OUT_PHOTOS)


def to_rgb(img) -> np.ndarray:
  """Any image-like (numpy array, PIL image) -> float32 [H, W, 3] in [0, 1]; see module doc."""
  if hasattr(img, "mode") and hasattr(img, "convert"):  # PIL image
    img = np.asarray(img.convert("RGBA") if img.mode in ("P", "LA", "PA") else img)
  a = np.asarray(img)
  if a.size == 0:
    raise ValueError(f"empty image of shape {a.shape}.")
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim == 2:
    a = np.repeat(a[..., None], 3, axis=-1)
  elif a.ndim == 3 and a.shape[-1] == 4:
    a = a[..., :3]
  elif not (a.ndim == 3 and a.shape[-1] == 3):
    raise ValueError(f"expected an image [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape "
                     f"{a.shape}.")
  if a.dtype == np.uint8:
    return a.astype(np.float32) / 255.0
  if a.dtype == np.uint16:
    return a.astype(np.float32) / 65535.0
  if a.dtype == bool or not np.issubdtype(a.dtype, np.floating):
    raise ValueError(f"unsupported image dtype {a.dtype}; use uint8, uint16 or float in [0, 1].")
  a = a.astype(np.float32)
  if a.min() < 0 or a.max() > 1:
    raise ValueError(f"float image values must lie in [0, 1], got [{a.min():.3g}, "
                     f"{a.max():.3g}]; divide by 255 first if it holds 8-bit values.")
  return a


def to_uint8(img: np.ndarray) -> np.ndarray:
  return np.clip(np.round(np.asarray(img) * 255.0), 0, 255).astype(np.uint8)


def load_image(path: str | os.PathLike) -> np.ndarray:
  """Reads any Pillow-readable file as float32 RGB [H, W, 3] in [0, 1]."""
  from PIL import Image
  with Image.open(path) as im:
    return to_rgb(im)


def save_image(path: str | os.PathLike, img: np.ndarray) -> None:
  from PIL import Image
  Image.fromarray(to_uint8(img)).save(path)


def skimage_photo(name: str) -> np.ndarray:
  """One of scikit-image's bundled photographs (`SKIMAGE_PHOTOS`) as float RGB."""
  if name not in SKIMAGE_PHOTOS:
    raise ValueError(f"unknown photo {name!r}; choose one of {SKIMAGE_PHOTOS}.")
  from skimage import data  # scikit-image ships these files; nothing is downloaded
  if name.startswith("motorcycle_"):
    left, right, _ = data.stereo_motorcycle()
    return to_rgb(left if name == "motorcycle_left" else right)
  return to_rgb(getattr(data, name)())


# ------------------------------------------------------------------------------------- resizing


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=256)
def resize_matrix(n_out: int, n_in: int, mode: str) -> np.ndarray:
  """[n_out, n_in] float32 weights of PyTorch's `F.interpolate(size=...)` along one axis."""
  if n_out < 1 or n_in < 1:
    raise ValueError(f"resize from {n_in} to {n_out} pixels: sizes must be positive.")
  m = np.zeros((n_out, n_in), np.float64)
  rows = np.arange(n_out)
  if mode == "area":  # adaptive average pooling
    for i in range(n_out):
      lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
      m[i, lo:hi] = 1.0 / (hi - lo)
  elif mode == "bilinear":
    src = np.maximum((rows + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    np.add.at(m, (rows, i0), 1 - lam)
    np.add.at(m, (rows, i1), lam)
  elif mode == "bicubic":
    src = (rows + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src).astype(int)
    t = src - base
    for off in range(-1, 3):
      np.add.at(m, (rows, np.clip(base + off, 0, n_in - 1)), _cubic(off - t))
  else:
    raise ValueError(f"resize mode {mode!r}: use 'area', 'bilinear' or 'bicubic'.")
  return m.astype(np.float32)


def resize(img: np.ndarray, size: tuple[int, int], mode: str = "bicubic") -> np.ndarray:
  """[H, W, C] -> [h, w, C] with PyTorch `F.interpolate` semantics (no antialiasing)."""
  h, w = size
  if img.shape[:2] == (h, w):
    return img.astype(np.float32, copy=False)
  mh, mw = resize_matrix(h, img.shape[0], mode), resize_matrix(w, img.shape[1], mode)
  return np.einsum("oh,hwc,pw->opc", mh, img.astype(np.float32), mw, optimize=True)


def resize_batch(x_BHWC, size: tuple[int, int], mode: str = "bicubic"):
  """[B, H, W, C] -> [B, h, w, C] in the graph (jnp), the same linear maps as `resize`: two
  small matmuls, so it differentiates and shards like any einsum."""
  h, w = size
  H, W = x_BHWC.shape[1:3]
  if (H, W) == (h, w):
    return x_BHWC
  mh, mw = jnp.asarray(resize_matrix(h, H, mode)), jnp.asarray(resize_matrix(w, W, mode))
  return jnp.einsum("oh,bhwc,pw->bopc", mh, x_BHWC, mw)


def self_ensemble(fn, img: np.ndarray) -> np.ndarray:
  """Geometric self-ensemble (EDSR, Lim et al. 2017): the mean over the 8 symmetries t of the
  square (4 rotations by 90 degrees, each with and without a horizontal flip) of
  t^-1(fn(t(img))), for an image-to-image `fn` ([H, W, C] -> [sH, sW, C]). It costs 8 calls; an
  `fn` that commutes with the symmetries (e.g. bicubic resizing) is left unchanged."""
  outs = []
  for k in range(4):
    for flip in (False, True):
      x = np.rot90(img, k)
      y = np.asarray(fn(np.ascontiguousarray(x[:, ::-1] if flip else x)), np.float64)
      outs.append(np.rot90(y[:, ::-1] if flip else y, -k))
  return np.mean(outs, axis=0).astype(np.float32)


def crop_to_multiple(img: np.ndarray, multiple: int) -> np.ndarray:
  """Drops the bottom / right rows and columns beyond a multiple of `multiple`."""
  H, W = img.shape[:2]
  return img[:H - H % multiple, :W - W % multiple]


def random_crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  H, W = img.shape[:2]
  if H < size or W < size:
    raise ValueError(f"image {H}x{W} is smaller than the crop size {size}.")
  y, x = rng.integers(0, H - size + 1), rng.integers(0, W - size + 1)
  return img[y:y + size, x:x + size]


# ------------------------------------------------------------------------------- SR data source


def train_photos() -> list[np.ndarray]:
  """The embedded photos minus the held-out ones (`HELD_OUT_PHOTOS` are never trained on)."""
  return [skimage_photo(n) for n in TRAIN_PHOTOS]


def sr_dataset(photos, crop: int, degradation=None, seed: int = 0, negative_prob: float = 0.0,
               num_examples: int = 1_000_000):
  """A Grain `MapDataset` of SR training pairs, element i computed from (seed, i) alone.

  Each element: {"hr": [crop, crop, 3], "lr": [crop/scale, crop/scale, 3] (both float32 in
  [-1, 1]), "label": int32 0 (positive) or 1 (negative, with probability `negative_prob`, the
  HR replaced by `degradations.make_negative` of itself)}. A random photo, a random crop, a
  random degradation, all drawn from np.random.default_rng([seed, i]): deterministic, resumable
  at any index, and independent across workers. Batch it with `.batch(n)`.
  """
  import grain

  from jaxllm.data import degradations as deg
  cfg = degradation or deg.varsr_x4()
  if crop % cfg.scale or crop < cfg.min_hr_side:
    raise ValueError(f"crop={crop} must be a multiple of scale={cfg.scale} and at least "
                     f"{cfg.min_hr_side}.")
  photos = [to_rgb(p) for p in photos]
  small = [i for i, p in enumerate(photos) if min(p.shape[:2]) < crop]
  if small:
    raise ValueError(f"photos {small} are smaller than the crop size {crop}.")

  def make(i):
    rng = np.random.default_rng([seed, int(i)])
    hr = random_crop(photos[rng.integers(len(photos))], crop, rng)
    label = int(rng.uniform() < negative_prob)
    if label:
      hr = deg.make_negative(hr, rng)
    hr, lr = deg.degrade(hr, rng, cfg)
    return {"hr": hr * 2 - 1, "lr": lr * 2 - 1, "label": np.int32(label)}

  return grain.MapDataset.range(num_examples).map(make)
