"""Multi-scale residual VQ-VAE: resizes vs PyTorch, phi mapping, residual quantisation."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxllm.models.var import vqvae as vqm


def np_init(module, *args, seed=0, std=0.05):
  """Random parameters without compiling an RNG program (fast on 2 loaded cores)."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, std, s.shape), s.dtype),
                      jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, shapes,
                                   is_leaf=lambda x: hasattr(x, "value")))


@pytest.mark.parametrize("n_in,n_out", [(8, 1), (8, 3), (16, 5), (13, 6), (3, 8), (13, 16)])
@pytest.mark.parametrize("mode", ["area", "bicubic"])
def test_resize_matches_torch_interpolate(n_in, n_out, mode):
  x = np.random.default_rng(0).normal(size=(2, n_in, n_in, 3)).astype(np.float32)
  ours = np.asarray(vqm.resize(jnp.asarray(x), n_out, mode))
  ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(n_out, n_out),
                      mode=mode).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_phi_mapping_matches_reference():
  # VAR quant.py PhiPartiallyShared with 4 convs over the 10-scale schedule
  assert [vqm.phi_index(k, 10, 4) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
  assert [vqm.phi_index(k, 10, 1) for k in range(10)] == [0] * 10  # fully shared
  assert [vqm.phi_index(k, 10, 10) for k in range(10)] == list(range(10))  # non-shared
  assert [vqm.phi_index(k, 4, 2) for k in range(4)] == [0, 0, 1, 1]
  assert vqm.VQVAEConfig(phi_share=0).num_phi == 10


def test_schedule_bookkeeping():
  assert vqm.var_f16().num_tokens == 680 and vqm.var_f16().image_size == 256
  assert vqm.varsr_f16().num_tokens == 2240 and vqm.varsr_f16().image_size == 512
  with pytest.raises(ValueError, match="strictly increasing"):
    vqm.VQVAEConfig(patch_nums=(1, 3, 2))


def test_var_f16_parameter_count():
  model = vqm.VQVAE(vqm.var_f16())
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 256, 256, 3))))
  n = sum(x.size for x in jax.tree.leaves(shapes))
  assert 105e6 < n < 112e6, n  # VAR's released vae_ch160v4096z32: ~109M parameters


def _quantizer(C=4, V=256, pn=(1, 2, 4, 8), phi_ratio=0.0):
  return vqm.MultiScaleQuantizer(V, C, pn, phi_ratio=phi_ratio)


def test_exact_when_last_scale_is_exact():
  """A map whose coarser-scale averages vanish (zero-mean 2x2 blocks): scales 0..K-2 take the
  zero code, and the last scale, finding every feature vector in the codebook, is exact."""
  rng = np.random.default_rng(0)
  C = 4
  blocks = rng.normal(size=(2, 4, 4, 1, 1, C))
  signs = np.array([[1, -1], [-1, 1]], np.float64)[None, None, None, :, :, None]
  f = (blocks * signs).transpose(0, 1, 3, 2, 4, 5).reshape(2, 8, 8, C).astype(np.float32)
  codebook = np.concatenate([np.zeros((1, C)), f.reshape(-1, C),
                             rng.normal(size=(15, C))]).astype(np.float32)
  q = _quantizer(C, len(codebook))
  idx, f_hat, _ = q.apply({"params": {"embedding": jnp.asarray(codebook)}}, jnp.asarray(f),
                          method="encode")
  assert all(int(jnp.max(i)) == 0 for i in idx[:-1])
  np.testing.assert_allclose(np.asarray(f_hat), f, atol=1e-6)


def test_error_falls_as_scales_are_added_and_residual_closes_the_gap():
  rng = np.random.default_rng(1)
  C, pn = 4, (1, 2, 4, 8)
  q = _quantizer(C, 256, pn)
  params = {"embedding": jnp.asarray(rng.normal(size=(256, C)), jnp.float32)}
  f = jnp.asarray(rng.normal(size=(2, 8, 8, C)), jnp.float32)
  idx, f_hat, f_rest_last = q.apply({"params": params}, f, method="encode")
  errs = [float(jnp.mean((q.apply({"params": params}, idx[:k + 1], method="idx_to_fhat") - f)
                         ** 2)) for k in range(len(pn))]
  assert all(b < a for a, b in itertools.pairwise(errs)), errs
  np.testing.assert_allclose(np.asarray(q.apply({"params": params}, idx, method="idx_to_fhat")),
                             np.asarray(f_hat), atol=1e-5)
  # identity phi: f_hat + (f_rest_K - e[r_K]) = f, the refiner's target closes the gap
  e_last = params["embedding"][idx[-1]].reshape(2, 8, 8, C)
  np.testing.assert_allclose(np.asarray(f_hat + f_rest_last - e_last), np.asarray(f),
                             atol=1e-5)


def test_training_forward_loss_and_straight_through():
  C, pn = 4, (1, 2, 4)
  q = vqm.MultiScaleQuantizer(32, C, pn, beta=0.25, phi_ratio=0.5, num_phi=2)
  f = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 4, C)), jnp.float32)
  params = np_init(q, f)
  f_st, loss, idx = q.apply({"params": params}, f)
  # forward value is f_hat, gradient w.r.t. f is the identity (straight-through)
  np.testing.assert_allclose(np.asarray(f_st),
                             np.asarray(q.apply({"params": params}, idx, method="idx_to_fhat")),
                             atol=1e-5)
  g = jax.grad(lambda x: jnp.sum(q.apply({"params": params}, x)[0] * 3.0))(f)
  np.testing.assert_allclose(np.asarray(g), 3.0, atol=1e-6)
  # loss = mean over scales of (1 + beta) * MSE(f_hat_k, f)
  expect = np.mean([1.25 * float(jnp.mean((q.apply({"params": params}, idx[:k + 1],
                                                    method="idx_to_fhat") - f) ** 2))
                    for k in range(3)])
  np.testing.assert_allclose(float(loss), expect, rtol=1e-5)
  # codebook and phi convs get gradients from the VQ loss
  gp = jax.grad(lambda p: q.apply({"params": p}, f)[1])(params)
  assert float(jnp.abs(gp["embedding"]).sum()) > 0 and float(jnp.abs(gp["phi_0"]["kernel"]).sum()) > 0


def test_teacher_forcing_input_equals_generation_path():
  C, pn = 4, (1, 2, 3, 5)
  q = vqm.MultiScaleQuantizer(16, C, pn, phi_ratio=0.5, num_phi=4)
  f = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 5, C)), jnp.float32)
  params = np_init(q, f)
  idx = q.apply({"params": params}, f, method="encode")[0]
  tf = q.apply({"params": params}, idx, method="idx_to_var_input")
  assert tf.shape == (2, 4 + 9 + 25, C)
  f_hat, pieces = jnp.zeros_like(f), []
  for si in range(len(pn)):
    f_hat, nxt = q.apply({"params": params}, si, f_hat, idx[si], method="next_input")
    if nxt is not None:
      pieces.append(nxt)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, 1)), np.asarray(tf), atol=1e-6)


def _tiny_vqvae():
  return vqm.tiny(ch=8, ch_mult=(1, 2), norm_groups=4, vocab_size=32, c_vae=4)


def test_vqvae_forward_loss_usage_and_bad_input():
  cfg = _tiny_vqvae()
  assert cfg.image_size == 16
  model = vqm.VQVAE(cfg)
  img = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  params = np_init(model, img)
  loss_fn = vqm.vqvae_loss_fn(model)

  @jax.jit
  def loss_and_idx(p):  # forward only: the quantiser's gradients are tested above
    loss_sum, weight = loss_fn(p, {"image": img}, None)
    return loss_sum, weight, model.apply({"params": p}, img)[2]

  loss_sum, weight, idx = loss_and_idx(params)
  assert float(weight) == 2 and np.isfinite(float(loss_sum))
  assert [i.shape for i in idx] == [(2, 1), (2, 4), (2, 16), (2, 64)]
  usage = vqm.codebook_usage(idx, cfg.vocab_size)
  assert 0 < float(usage["usage"]) <= 1 and float(usage["usage_scale_0"]) <= 2 / 32
  assert 1 <= float(usage["perplexity"]) <= 32
  with pytest.raises(ValueError, match="16 x 16"):
    model.apply({"params": params}, img[:, :8, :8])
  with pytest.raises(ValueError, match="RGB"):
    model.apply({"params": params}, img[..., :1])


def test_decoder_loss_matches_direct_reconstructions_and_trains_only_the_decoder():
  cfg = _tiny_vqvae()
  model = vqm.VQVAE(cfg)
  img = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (3, 16, 16, 3)), jnp.float32)
  params = np_init(model, img, std=0.3)  # large enough that the two decoder inputs differ
  dec = {k: params[k] for k in vqm.DECODER_PARAMS}
  loss_fn = vqm.decoder_loss_fn(model, params)
  loss_sum, weight = jax.jit(lambda p: loss_fn(p, {"image": img}, None))(dec)
  # independently: rows 0 and 2 through their tokens (unclipped decode), row 1 unquantised
  apply = lambda *a, **k: model.apply({"params": params}, *a, **k)  # noqa: E731
  rec_q = apply(apply(apply(img, method="img_to_idx"), method="idx_to_fhat"),
                method="decode_fhat")
  rec_u = apply(apply(img, method="features"), method="decode_fhat")
  mse = lambda a, b: np.mean((np.asarray(a) - np.asarray(b)) ** 2)  # noqa: E731
  expected = mse(rec_q[0], img[0]) + mse(rec_u[1], img[1]) + mse(rec_q[2], img[2])
  assert float(weight) == 3
  np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-5)
  assert abs(mse(rec_q[1], img[1]) - mse(rec_u[1], img[1])) > 1e-2  # the two paths differ
  grads = jax.grad(lambda p: loss_fn(p, {"image": img}, None)[0])(dec)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  with pytest.raises(ValueError, match="exactly"):
    loss_fn(params, {"image": img}, None)  # the full params: the encoder is not to be trained
