"""PSNR / SSIM in the SR convention against scikit-image on the same inputs."""

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from jaxllm.eval import sr_metrics as m


def _pair(seed, shape=(48, 40, 3)):
  rng = np.random.default_rng(seed)
  hr = rng.uniform(size=shape).astype(np.float32)
  hr = (hr + np.roll(hr, 1, 0) + np.roll(hr, 1, 1)) / 3  # some structure
  sr = np.clip(hr + rng.normal(0, 0.05, shape), 0, 1).astype(np.float32)
  return sr, hr


def test_y_channel_is_basicsr_formula():
  rgb = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]],
                 np.float32)
  np.testing.assert_allclose(m.rgb_to_y(rgb), [[16 + 65.481, 16 + 128.553],
                                               [16 + 24.966, 235.0]], atol=1e-3)
  u8 = (rgb * 255).astype(np.uint8)
  np.testing.assert_allclose(m.rgb_to_y(u8), m.rgb_to_y(rgb), atol=1e-4)


@pytest.mark.parametrize("seed,border", [(0, 0), (1, 4), (2, 2)])
def test_psnr_ssim_agree_with_scikit_image(seed, border):
  sr, hr = _pair(seed)
  ys, yh = m.rgb_to_y(sr), m.rgb_to_y(hr)
  if border:
    ys, yh = ys[border:-border, border:-border], yh[border:-border, border:-border]
  ref_psnr = peak_signal_noise_ratio(yh, ys, data_range=255)
  ref_ssim = structural_similarity(yh, ys, data_range=255, gaussian_weights=True, sigma=1.5,
                                   use_sample_covariance=False)
  np.testing.assert_allclose(m.psnr(sr, hr, border), ref_psnr, rtol=1e-10)
  np.testing.assert_allclose(m.ssim(sr, hr, border), ref_ssim, rtol=1e-8)
  # RGB mode: channel-averaged SSIM, PSNR over all channels
  ref_rgb = structural_similarity(hr.astype(np.float64) * 255, sr.astype(np.float64) * 255,
                                  data_range=255, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, channel_axis=-1)
  np.testing.assert_allclose(m.ssim(sr, hr, 0, test_y_channel=False), ref_rgb, rtol=1e-8)
  out = m.sr_metrics(sr, hr, 4)
  assert set(out) == {"psnr", "ssim"} and 0 < out["ssim"] < 1


def test_identical_and_bad_inputs():
  _, hr = _pair(3)
  assert m.psnr(hr, hr, 4) == float("inf")
  np.testing.assert_allclose(m.ssim(hr, hr, 4), 1.0)
  with pytest.raises(ValueError, match="shape"):
    m.psnr(hr, hr[:-1])
  with pytest.raises(ValueError, match="11x11"):
    m.ssim(hr[:16, :16], hr[:16, :16], crop_border=4)
  gray = (hr[..., 0] * 255).astype(np.uint8)  # grayscale: replicated to RGB (documented)
  assert np.isfinite(m.psnr(gray, np.roll(gray, 1, 0), 4))


# ------------------------------------------------------------------------------------------ NIQE


def _degraded_photos():
  from scipy.ndimage import gaussian_filter
  from skimage import data
  rng = np.random.default_rng(0)
  photo = data.astronaut()[:300, 40:340].astype(np.float32) / 255  # 300 x 300, not a multiple
  blurred = np.stack([gaussian_filter(photo[..., c], 2.0) for c in range(3)], -1)
  noisy = np.clip(photo + rng.normal(0, 0.08, photo.shape), 0, 1).astype(np.float32)
  return {"photo": photo, "blurred": blurred, "noisy": noisy,
          "coffee": data.coffee()}  # uint8, 400 x 600


def test_niqe_agrees_with_scikit_video():
  """Same Y input to ours and to scikit-video's `niqe` (an independent implementation with the
  same pristine model): equal to float32 rounding."""
  import skvideo.measure
  for name, img in _degraded_photos().items():
    y = m.rgb_to_y(img)
    ref = float(skvideo.measure.niqe(y.astype(np.float32))[0])
    np.testing.assert_allclose(m.niqe_y(y), ref, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(m.niqe(img, crop_border=4),
                               skvideo.measure.niqe(y[4:-4, 4:-4].astype(np.float32))[0],
                               rtol=1e-5, err_msg=name)


def test_niqe_ranks_distortions_and_rejects_small_images():
  imgs = _degraded_photos()
  scores = {k: m.niqe(v) for k, v in imgs.items()}
  assert scores["photo"] < scores["blurred"] and scores["photo"] < scores["noisy"], scores
  mu, cov = m.niqe_pristine_params()
  assert mu.shape == (36,) and cov.shape == (36, 36)
  with pytest.raises(ValueError, match="193x193"):
    m.niqe(imgs["photo"][:190])
  out = m.sr_metrics(imgs["blurred"], imgs["photo"], 4, with_niqe=True)
  np.testing.assert_allclose(out["niqe"], m.niqe(imgs["blurred"], 4))
