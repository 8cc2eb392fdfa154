"""Real-ESRGAN degradations: kernels, determinism, JPEG, presets, input conversion."""

import itertools
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxllm.data import degradations as deg
from jaxllm.data import images


def _photo(size=64, seed=0):
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:size, 0:size] / size
  base = np.stack([np.sin(8 * x), np.cos(5 * y), x * y], -1) * 0.4 + 0.5
  return np.clip(base + 0.05 * rng.normal(size=base.shape), 0, 1).astype(np.float32)


@pytest.mark.parametrize("seed", range(30))
def test_random_kernels_sum_to_one_and_are_padded(seed):
  rng = np.random.default_rng(seed)
  for cfg in (deg.KernelConfig(), deg.KernelConfig(sigma=(0.2, 1.5), sinc_prob=0.5)):
    k = deg.random_kernel(rng, cfg, 21)
    assert k.shape == (21, 21) and k.dtype == np.float32
    np.testing.assert_allclose(k.sum(), 1.0, atol=1e-5)
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-6)  # point-symmetric about the centre


def test_each_kernel_family():
  g = deg.gaussian_kernel(21, 2.0)
  np.testing.assert_allclose(g, g.T, atol=1e-7)  # isotropic
  x = np.arange(21) - 10
  ref = np.exp(-x ** 2 / 8.0)
  np.testing.assert_allclose(g, np.outer(ref, ref) / np.outer(ref, ref).sum(), atol=1e-7)
  a = deg.gaussian_kernel(21, 3.0, 0.5, np.pi / 2)  # rotated 90 deg: long along y
  assert a[:, 10].sum() > a[10, :].sum()
  # generalized with beta = 1 is the Gaussian; plateau is flatter than the Gaussian at the peak
  np.testing.assert_allclose(deg.generalized_gaussian_kernel(21, 2.0, 1.0, 0.3, 1.0),
                             deg.gaussian_kernel(21, 2.0, 1.0, 0.3), atol=1e-7)
  p = deg.plateau_kernel(21, 2.0, 2.0, 0.0, 2.0)
  assert p[10, 10] / p[10, 11] < g[10, 10] / g[10, 11] * 1.01
  s = deg.sinc_kernel(13, np.pi / 2, pad_to=21)
  assert s.shape == (21, 21) and s[0, 0] == 0 and s.min() < 0  # ringing lobes
  np.testing.assert_allclose(s.sum(), 1.0, atol=1e-5)
  for k in (g, a, p):
    np.testing.assert_allclose(k.sum(), 1.0, atol=1e-5)


def test_filter2d_matches_torch_reflect_conv():
  img = _photo(32)
  k = deg.gaussian_kernel(7, 1.5, 0.7, 0.4)
  ours = deg.filter2d(img, k)
  t = torch.from_numpy(img).permute(2, 0, 1)[:, None]
  t = F.conv2d(F.pad(t, (3, 3, 3, 3), mode="reflect"), torch.from_numpy(k)[None, None])
  np.testing.assert_allclose(ours, t[:, 0].permute(1, 2, 0).numpy(), atol=1e-5)


@pytest.mark.parametrize("mode", ["area", "bilinear", "bicubic"])
def test_host_resize_matches_torch(mode):
  img = _photo(40)
  ours = images.resize(img, (17, 61), mode)
  ref = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None], size=(17, 61),
                      mode=mode)[0].permute(1, 2, 0).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  # the in-graph batched resize (VQ-VAE, VARSR, CNN skip) uses the same maps, up and down
  batch = np.stack([img, img[::-1]])
  for size in ((17, 61), (53, 80)):
    ref = F.interpolate(torch.from_numpy(batch).permute(0, 3, 1, 2), size=size,
                        mode=mode).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(images.resize_batch(batch, size, mode)), ref,
                               atol=1e-5)


def test_jpeg_quality_monotone():
  img = _photo(64)
  errs = [np.mean((deg.jpeg(img, q) - img) ** 2) for q in (10, 30, 60, 95)]
  assert all(b < a for a, b in itertools.pairwise(errs)), errs


def test_noise():
  img = np.full((64, 64, 3), 0.5, np.float32)
  rng = np.random.default_rng(0)
  g = deg.add_gaussian_noise(img, rng, 10.0, gray=False)
  np.testing.assert_allclose(np.std(g - img), 10 / 255, rtol=0.1)
  gg = deg.add_gaussian_noise(img, rng, 10.0, gray=True)
  np.testing.assert_array_equal(gg[..., 0], gg[..., 2])
  p = deg.add_poisson_noise(_photo(64), rng, 1.0, gray=False)
  assert 0 < np.std(p - _photo(64)) < 0.2 and p.min() >= 0 and p.max() <= 1


@pytest.mark.parametrize("name", ["realesrgan_x4", "varsr_x4"])
def test_pipeline_deterministic_shapes_and_fast(name):
  cfg = deg.preset(name)
  hr = _photo(64)
  t = time.perf_counter()
  outs = [deg.degrade(hr, seed, cfg)[1] for seed in range(8)]
  per_image = (time.perf_counter() - t) / 8
  assert all(o.shape == (16, 16, 3) and o.dtype == np.float32 for o in outs)
  assert all(np.array_equal(o * 255, np.round(o * 255)) for o in outs)  # 8-bit levels
  np.testing.assert_array_equal(deg.degrade(hr, 3, cfg)[1], outs[3])
  assert not np.array_equal(outs[0], outs[1])
  assert per_image < 0.5, per_image  # generous: 2 shared cores; ~10 ms unloaded


def test_varsr_preset_is_milder():
  hr = _photo(128)
  err = {n: np.mean([np.mean((images.resize(deg.degrade(hr, s, deg.preset(n))[1], (128, 128),
                                            "bicubic") - hr) ** 2) for s in range(12)])
         for n in ("realesrgan_x4", "varsr_x4")}
  assert err["varsr_x4"] < err["realesrgan_x4"], err
  v = deg.varsr_x4()
  assert v.stage1.jpeg_range == (60.0, 95.0) and v.stage2.blur_prob == 0.5


def test_bad_input_clear_error_or_documented_conversion():
  cfg = deg.varsr_x4()
  with pytest.raises(ValueError, match="smaller than the minimum"):
    deg.degrade(_photo(16), 0, cfg)
  gray = (np.random.default_rng(0).uniform(size=(64, 64)) * 255).astype(np.uint8)
  hr, lr = deg.degrade(gray, 0, cfg)  # grayscale -> replicated to RGB
  assert hr.shape == (64, 64, 3) and lr.shape == (16, 16, 3)
  rgba = np.concatenate([(_photo(66) * 255).astype(np.uint8),
                         np.full((66, 66, 1), 7, np.uint8)], -1)
  hr, lr = deg.degrade(rgba, 0, cfg)  # alpha dropped; cropped to a multiple of 4
  assert hr.shape == (64, 64, 3) and lr.shape == (16, 16, 3)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    images.to_rgb(np.full((8, 8, 3), 2.0, np.float32))
  with pytest.raises(ValueError, match="shape"):
    images.to_rgb(np.zeros((8, 8, 2), np.uint8))


def test_negative_targets_are_low_quality_and_seeded():
  hr = _photo(64)
  neg = deg.make_negative(hr, 5)
  assert neg.shape == hr.shape and neg.min() >= 0 and neg.max() <= 1
  np.testing.assert_array_equal(neg, deg.make_negative(hr, 5))
  assert np.mean((neg - hr) ** 2) > np.mean((deg.jpeg(hr, 95) - hr) ** 2)


def test_sr_dataset_is_deterministic_per_index_and_batches():
  photos = [_photo(80, 0), (_photo(72, 1)[..., 0] * 255).astype(np.uint8)]  # RGB and grayscale
  ds = images.sr_dataset(photos, crop=64, seed=3, negative_prob=0.5, num_examples=16)
  a, b = ds[5], ds[5]
  np.testing.assert_array_equal(a["lr"], b["lr"])
  assert a["hr"].shape == (64, 64, 3) and a["lr"].shape == (16, 16, 3)
  assert -1 <= a["lr"].min() and a["lr"].max() <= 1
  batch = next(iter(ds.batch(4)))
  assert batch["hr"].shape == (4, 64, 64, 3) and batch["label"].shape == (4,)
  assert {int(ds[i]["label"]) for i in range(16)} == {0, 1}
  with pytest.raises(ValueError, match="smaller than the crop"):
    images.sr_dataset([_photo(40)], crop=64)
  assert set(images.HELD_OUT_PHOTOS) <= set(images.SKIMAGE_PHOTOS)


def test_self_ensemble_keeps_equivariant_maps_and_symmetrises_the_rest():
  rng = np.random.default_rng(0)
  img = rng.uniform(size=(5, 7, 3)).astype(np.float32)
  up = lambda x: images.resize(x, (4 * x.shape[0], 4 * x.shape[1]), "bicubic")  # noqa: E731
  # bicubic resizing (symmetric kernel, half-pixel centres) commutes with flips and transposes
  np.testing.assert_allclose(images.self_ensemble(up, img), up(img), atol=1e-6)
  # a fixed additive pattern g is averaged over the group: for a ramp along the rows, whose 8
  # images are ramps along either axis in either direction, the mean is the image-constant
  # mean of the ramp
  ramp = np.linspace(0, 1, 20)[:, None, None] * np.ones((1, 20, 3))
  square = rng.uniform(size=(5, 5, 3)).astype(np.float32)
  fn = lambda x: up(x) + ramp  # noqa: E731
  np.testing.assert_allclose(images.self_ensemble(fn, square), up(square) + 0.5, atol=1e-6)
  # outputs keep the input's orientation for non-square images
  assert images.self_ensemble(up, img).shape == (20, 28, 3)
