"""The regression-CNN baseline of the VARSR experiments (`jaxllm.models.srcnn`).

Pixel shuffle against PyTorch's `F.pixel_shuffle` (channel order matters: a transposed order
still trains, silently, but no longer matches the EDSR layout), bicubic upsampling against
`F.interpolate(mode="bicubic", align_corners=False)`, and the untrained model is bicubic
upsampling exactly (zero last conv), at any input size.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxllm.models import srcnn


@pytest.mark.parametrize("r", [2, 3])
def test_pixel_shuffle_matches_pytorch(r):
  x = np.random.default_rng(0).normal(size=(2, 3, 5, 4 * r * r)).astype(np.float32)
  ref = F.pixel_shuffle(torch.from_numpy(x).permute(0, 3, 1, 2), r).permute(0, 2, 3, 1)
  np.testing.assert_array_equal(np.asarray(srcnn.pixel_shuffle(jnp.asarray(x), r)), ref.numpy())


def test_bicubic_upsample_matches_pytorch():
  x = np.random.default_rng(1).uniform(-1, 1, size=(1, 7, 5, 3)).astype(np.float32)
  ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), scale_factor=4, mode="bicubic",
                      align_corners=False).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(srcnn.bicubic_upsample(jnp.asarray(x), 4)), ref,
                             atol=1e-5)


def test_untrained_model_is_bicubic_at_any_size():
  model = srcnn.SRCNN(srcnn.tiny())
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  x = jax.random.uniform(jax.random.key(1), (2, 5, 9, 3), minval=-1, maxval=1)
  out = model.apply({"params": params}, x)
  assert out.shape == (2, 20, 36, 3)
  np.testing.assert_allclose(out, srcnn.bicubic_upsample(x, 4), atol=1e-6)


def test_bad_config_names_the_fix():
  with pytest.raises(ValueError, match="power of two"):
    srcnn.SRCNNConfig(scale=3)
  with pytest.raises(ValueError, match="Unknown SR CNN preset"):
    srcnn.preset("huge")
