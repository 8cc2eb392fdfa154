"""VAR transformer: block-causal mask, KV-cached next-scale generation, CFG, sampling, loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models.var import var as varm
from jaxllm.models.var import vqvae as vqm
from jaxllm.nn.attention import MaskKind, attention_mask


def np_init(module, *args, seed=0, std=0.1):
  """Random parameters without compiling an RNG program (fast on 2 loaded cores)."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]
  shapes = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, shapes,
                        is_leaf=lambda x: hasattr(x, "value"))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, std, s.shape), s.dtype), shapes)


PN = (1, 2, 4)


@pytest.fixture(scope="module")
def tiny():
  cfg = varm.tiny(patch_nums=PN, vocab_size=16, c_vae=4, init_adaln_gamma=1.0)
  quant = vqm.MultiScaleQuantizer(cfg.vocab_size, cfg.c_vae, PN, phi_ratio=0.5, num_phi=2)
  q_params = np_init(quant, jnp.zeros((1, 4, 4, cfg.c_vae)), seed=1, std=0.5)
  model = varm.VAR(cfg)
  label = jnp.array([0, 3])
  x = jnp.zeros((2, cfg.seq_len - 1, cfg.c_vae))
  params = np_init(model, label, x, seed=2)
  return cfg, model, params, quant, q_params, label


def test_block_causal_mask():
  m = varm.block_causal_mask((1, 2))
  expect = np.array([[1, 0, 0, 0, 0]] + [[1, 1, 1, 1, 1]] * 4, bool)
  np.testing.assert_array_equal(m, expect)
  lv = jnp.asarray(varm.tiny(patch_nums=PN).levels())[None]
  assert lv.shape == (1, 21)
  np.testing.assert_array_equal(
      np.asarray(attention_mask(MaskKind.BLOCK_CAUSAL, lv, lv, lv, lv)[0]),
      varm.block_causal_mask(PN))
  assert varm.var_d16().seq_len == 680


def test_d16_parameter_count_near_paper():
  cfg = varm.var_d16()
  model = varm.VAR(cfg)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1,), jnp.int32),
                                             jnp.zeros((1, cfg.seq_len - 1, cfg.c_vae))))
  n = sum(x.size for x in jax.tree.leaves(shapes))
  assert 300e6 < n < 320e6, n  # the paper's VAR-d16: 310M


def test_kv_cached_generation_equals_full_masked_forward(tiny):
  _cfg, model, params, quant, q_params, label = tiny
  out = varm.generate(model, params, quant, q_params, label, jax.random.key(0), cfg=None,
                      temperature=1.0, top_k=6, top_p=0.9)
  x = quant.apply({"params": q_params}, out["idx"], method="idx_to_var_input")
  full = jax.jit(model.apply)({"params": params}, label, x)
  np.testing.assert_allclose(np.asarray(out["logits"]), np.asarray(full), atol=1e-5, rtol=0)
  # the whole pyramid depends on every coarser scale (the check is not vacuous)
  x2 = x.at[:, 0].add(1.0)
  full2 = jax.jit(model.apply)({"params": params}, label, x2)
  assert float(jnp.abs(full2[:, 1:] - full[:, 1:]).max()) > 1e-3
  np.testing.assert_allclose(np.asarray(full2[:, 0]), np.asarray(full[:, 0]), atol=1e-6)


def test_cfg_zero_equals_conditional_sampling(tiny):
  _cfg, model, params, quant, q_params, label = tiny
  kw = dict(temperature=1.0, top_k=6, top_p=0.9)
  cond = varm.generate(model, params, quant, q_params, label, jax.random.key(5), cfg=None, **kw)
  zero = varm.generate(model, params, quant, q_params, label, jax.random.key(5), cfg=0.0, **kw)
  np.testing.assert_allclose(np.asarray(zero["logits"]), np.asarray(cond["logits"]), atol=1e-5)
  for a, b in zip(cond["idx"], zero["idx"]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  guided = varm.generate(model, params, quant, q_params, label, jax.random.key(5), cfg=3.0, **kw)
  # t = 0 at the first scale: guided logits there are the conditional ones
  np.testing.assert_allclose(np.asarray(guided["logits"][:, :1]),
                             np.asarray(cond["logits"][:, :1]), atol=1e-5)
  assert [varm.guidance(1.5, k, 10) for k in (0, 9)] == [0.0, 1.5]
  np.testing.assert_allclose(varm.guidance(1.5, 3, 10), 0.5)


def test_top_k_one_is_greedy(tiny):
  _cfg, model, params, quant, q_params, label = tiny
  runs = [varm.generate(model, params, quant, q_params, label, jax.random.key(seed), cfg=1.0,
                        temperature=1.0, top_k=1, top_p=0.9) for seed in (1, 2)]
  lo = 0
  for si, pn in enumerate(PN):  # the guided logits' argmax, whatever the seed
    greedy = np.argmax(np.asarray(runs[0]["logits"][:, lo:lo + pn * pn]), -1)
    lo += pn * pn
    for r in runs:
      np.testing.assert_array_equal(np.asarray(r["idx"][si]), greedy)


def test_teacher_forced_loss_and_label_dropout(tiny):
  cfg, model, params, quant, q_params, label = tiny
  idx = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.seq_len)))
  loss_fn = varm.var_loss_fn(model, quant, q_params)
  batch = {"idx": idx, "label": label}
  (loss_sum, weight), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params, batch, jax.random.key(0))
  assert float(weight) == idx.size
  assert 0 < float(loss_sum) / float(weight) < 2 * np.log(cfg.vocab_size)
  assert float(jnp.abs(grads["class_emb"]["embedding"]).sum()) > 0
  with pytest.raises(ValueError, match="positions"):
    model.apply({"params": params}, label, jnp.zeros((2, 5, cfg.c_vae)))


def test_tiny_var_overfits_a_few_pyramids_under_teacher_forcing(tiny):
  import optax
  cfg, model, params, quant, q_params, label = tiny
  f = jnp.asarray(np.random.default_rng(7).normal(size=(2, 4, 4, cfg.c_vae)), jnp.float32)
  idx = quant.apply({"params": q_params}, f, method="encode")[0]
  batch = {"idx": jnp.concatenate(idx, 1), "label": label}
  loss_fn = varm.var_loss_fn(model, quant, q_params)
  opt = optax.adam(1e-2)

  @jax.jit
  def train(p, rng):
    def step(carry, k):
      p, st = carry
      g = jax.grad(lambda p: loss_fn(p, batch, k)[0])(p)
      u, st = opt.update(g, st, p)
      return (optax.apply_updates(p, u), st), None
    return jax.lax.scan(step, (p, opt.init(p)), jax.random.split(rng, 150))[0][0]

  trained = train(params, jax.random.key(3))
  x = quant.apply({"params": q_params}, idx, method="idx_to_var_input")
  logits = jax.jit(model.apply)({"params": trained}, label, x)
  assert float(varm.token_accuracy(logits, batch["idx"])) > 0.95


def test_sharded_forward_matches_single_device():
  import flax.linen as nn

  from jaxllm.sharding import mesh as mesh_lib
  from jaxllm.sharding import rules as rules_lib
  cfg = varm.tiny(patch_nums=PN, vocab_size=16, c_vae=4)
  model = varm.VAR(cfg)
  label = jnp.array([0, 3, 1, 2])
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, cfg.seq_len - 1, cfg.c_vae)),
                  jnp.float32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), label, x))["params"]
  params = np_init(model, label, x, seed=1)
  ref = jax.jit(model.apply)({"params": params}, label, x)
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  rules_lib.check_divisible(boxed, mesh)
  sharded = jax.device_put(params, nn.unbox(rules_lib.logical_shardings(boxed, mesh)))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules_lib.LOGICAL_RULES):
    bs = rules_lib.batch_sharding(mesh)
    out = jax.jit(model.apply)({"params": sharded}, jax.device_put(label, bs),
                               jax.device_put(x, bs))
  assert out.sharding.spec[-1] == "tensor"  # vocabulary split over the tensor axis
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


# ------------------------------------------------------------------------- VARSR building blocks


def test_sa_rope_positions_follow_the_formula():
  from jaxllm.nn import rope2d
  pos = rope2d.scale_positions((1, 2, 4), grid=4, prefix_side=4)
  assert pos.shape == (16 + 1 + 4 + 16, 2)
  np.testing.assert_allclose(pos[16], [0, 0])  # scale 1: the single token at the origin
  np.testing.assert_allclose(pos[17:21], [[0, 0], [0, 2], [2, 0], [2, 2]])  # i G / pn
  np.testing.assert_allclose(pos[:16], pos[21:])  # the LR prefix shares the final grid
  np.testing.assert_allclose(rope2d.sa_rope_frequencies(8), [1.0, 10000.0 ** -0.5])
  with pytest.raises(ValueError, match="divisible by 4"):
    rope2d.sa_rope_frequencies(6)


def test_sa_rope_dot_product_depends_only_on_relative_position():
  from jaxllm.nn import rope2d
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 2, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 2, 16)), jnp.float32)

  def dot(pq, pk):
    rq = rope2d.apply_sa_rope(q, jnp.asarray([pq], jnp.float32))
    rk = rope2d.apply_sa_rope(k, jnp.asarray([pk], jnp.float32))
    return np.asarray(jnp.sum(rq * rk, -1))

  base = dot((1.5, 2.0), (4.0, 0.5))
  np.testing.assert_allclose(dot((1.5 + 3.25, 2.0 - 1.0), (4.0 + 3.25, 0.5 - 1.0)), base,
                             atol=1e-4)
  assert np.abs(dot((1.5, 2.0), (4.0, 1.5)) - base).max() > 1e-3  # columns matter
  assert np.abs(dot((2.5, 2.0), (4.0, 0.5)) - base).max() > 1e-3  # rows matter
  np.testing.assert_allclose(np.linalg.norm(rope2d.apply_sa_rope(q, jnp.ones((1, 2))), axis=-1),
                             np.linalg.norm(q, axis=-1), rtol=1e-5)  # a rotation


def test_refiner_fits_a_2d_toy_distribution_and_respacing_is_consistent():
  import optax

  from jaxllm.models.var import refiner as rf
  cfg = rf.tiny()
  ts, acp, betas = rf.respaced_schedule(1000, 10)
  assert len(ts) == 10 and ts[0] == 0 and ts[-1] == 999 and np.all(np.diff(acp) < 0)
  np.testing.assert_allclose(np.cumprod(1 - betas), acp, rtol=1e-6)
  model = rf.DiffusionMLP(cfg)
  centers = jnp.asarray([[1, 1], [1, -1], [-1, 1], [-1, -1]], jnp.float32)
  params = np_init(model, jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 4)),
                   std=0.1)
  opt = optax.adam(3e-3)

  @jax.jit
  def train(params, rng):
    def step(carry, k):
      p, st = carry
      k1, k2, k3 = jax.random.split(k, 3)
      c = jax.random.randint(k1, (256,), 0, 4)
      x0 = centers[c] + 0.05 * jax.random.normal(k2, (256, 2))
      loss_w, g = jax.value_and_grad(
          lambda p: rf.diffusion_loss(model, p, x0, jax.nn.one_hot(c, 4), k3), has_aux=True)(p)
      u, st = opt.update(g, st, p)
      return (optax.apply_updates(p, u), st), loss_w[0] / loss_w[1]
    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)),
                                       jax.random.split(rng, 300))
    return params, losses

  params, losses = train(params, jax.random.key(1))
  assert float(losses[-20:].mean()) < 0.25 * float(losses[:5].mean())
  label = np.arange(200) % 4
  z = jax.nn.one_hot(jnp.asarray(label), 4)
  for n in (10, 100):
    x = jax.jit(lambda p, r, n=n: rf.sample(model, p, z, r, num_steps=n))(params,
                                                                          jax.random.key(2))
    err = np.linalg.norm(np.asarray(x) - np.asarray(centers)[label], axis=-1)
    assert np.mean(err) < 0.25, (n, np.mean(err))


# ---------------------------------------------------------------------------------------- VARSR


@pytest.fixture(scope="module")
def tiny_sr():
  from jaxllm.models.var import varsr
  cfg = varsr.tiny()
  vq = vqm.VQVAE(vqm.tiny(ch=8, ch_mult=(1, 2), norm_groups=4, vocab_size=cfg.vocab_size,
                          c_vae=cfg.c_vae))
  hr = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  lr = hr.reshape(2, 4, 4, 4, 4, 3).mean((2, 4))
  vq_params = np_init(vq, hr, seed=3, std=0.3)
  model = varsr.VARSR(cfg)
  params = np_init(model, lr, jnp.zeros((2,), jnp.int32),
                   jnp.zeros((2, cfg.seq_len - 1, cfg.c_vae)), seed=4)
  return varsr, cfg, model, params, vq, vq_params, lr, hr


@pytest.fixture(scope="module")
def tiny_sr_additive(tiny_sr):
  """The same VQ-VAE and images; VARSR with additive LR conditioning (no prefix tokens)."""
  varsr, _cfg, _model, _params, vq, vq_params, lr, hr = tiny_sr
  cfg = varsr.tiny(conditioning="additive")
  model = varsr.VARSR(cfg)
  params = np_init(model, lr, jnp.zeros((2,), jnp.int32),
                   jnp.zeros((2, cfg.seq_len - 1, cfg.c_vae)), seed=4)
  return varsr, cfg, model, params, vq, vq_params, lr, hr


SR_MODES = {"prefix": "tiny_sr", "additive": "tiny_sr_additive"}


@pytest.mark.parametrize("conditioning", SR_MODES)
def test_varsr_kv_cached_generation_equals_full_forward(conditioning, request):
  varsr, cfg, model, params, vq, vq_params, lr, _ = request.getfixturevalue(SR_MODES[conditioning])
  assert cfg.conditioning == conditioning
  out = varsr.upscale(model, params, vq, vq_params, lr, jax.random.key(1), cfg=None,
                      top_k=4, top_p=0.9, refine=True, refiner_steps=3)
  x = vq.apply({"params": vq_params}, out["idx"], method="idx_to_var_input")
  logits, h_K = jax.jit(model.apply)({"params": params}, lr, jnp.zeros((2,), jnp.int32), x)
  assert logits.shape == (2, cfg.seq_len, cfg.vocab_size) and h_K.shape == (2, 64, cfg.width)
  np.testing.assert_allclose(np.asarray(out["logits"]), np.asarray(logits), atol=1e-5, rtol=0)
  assert varsr.varsr_d24().seq_len == 2240 and varsr.varsr_d24().prefix_len == 1024


@pytest.mark.parametrize("conditioning", SR_MODES)
def test_varsr_image_cfg_zero_equals_positive_conditioning(conditioning, request):
  varsr, _cfg, model, params, vq, vq_params, lr, _ = request.getfixturevalue(
      SR_MODES[conditioning])
  kw = dict(top_k=4, top_p=0.9, refine=True, refiner_steps=3)
  pos = varsr.upscale(model, params, vq, vq_params, lr, jax.random.key(1), cfg=None, **kw)
  zero = varsr.upscale(model, params, vq, vq_params, lr, jax.random.key(1), cfg=0.0, **kw)
  for a, b in zip(pos["idx"], zero["idx"]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(np.asarray(zero["f_hat"]), np.asarray(pos["f_hat"]), atol=1e-4)
  if conditioning != "prefix":
    return  # the tiling below does not depend on the conditioning
  # end to end on a 4 x 6 LR image: two overlapping tiles, decoded, colour-fixed, blended
  fn = varsr.make_upscaler(model, params, vq, vq_params, seed=1, cfg=None, **kw)
  lr_img = (np.asarray(lr[0, :, :3]) + 1) / 2
  sr = varsr.upscale_tiled(fn, np.concatenate([lr_img, lr_img[:, :3]], 1), tile=4, scale=4,
                           overlap=2)
  assert sr.shape == (16, 24, 3) and 0 <= sr.min() and sr.max() <= 1


def _varsr_loss_and_grads(varsr, cfg, model, params, lr):
  """The VARSR loss on a pre-tokenised batch (a random quantizer's pyramid of random f)."""
  quant = vqm.MultiScaleQuantizer(cfg.vocab_size, cfg.c_vae, cfg.patch_nums, num_phi=2)
  q_params = np_init(quant, jnp.zeros((1, 8, 8, cfg.c_vae)), seed=5, std=0.5)
  f = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, cfg.c_vae)), jnp.float32)
  idx, _, f_rest = quant.apply({"params": q_params}, f, method="encode")
  loss_fn = varsr.varsr_loss_fn(model, quant, q_params)
  batch = {"lr": lr, "idx": jnp.concatenate(idx, 1), "f_rest": f_rest,
           "label": jnp.array([0, 1])}
  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch, jax.random.key(0))


def test_mbr_tokens_minimise_the_expected_code_distance(tiny_sr):
  """Against the risk computed directly, sum_i p_i ||e_j - e_i||^2 for every j; a peaked
  distribution gives its argmax; and generation with mbr_tokens emits, at every scale, the MBR
  tokens of the logits it returns (the full forward on those tokens reproduces the logits)."""
  varsr, cfg, model, params, vq, vq_params, lr, _ = tiny_sr
  rng = np.random.default_rng(0)
  E, logits = rng.normal(size=(7, 3)), rng.normal(size=(6, 7)) * 2
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  risk = np.einsum("ni,jiv->nj", p, (E[:, None] - E[None]) ** 2)  # [n, j]
  got = varsr.mbr_tokens_from_logits(jnp.asarray(logits, jnp.float32), jnp.asarray(E, jnp.float32))
  np.testing.assert_array_equal(np.asarray(got), risk.argmin(-1))
  peaked = np.where(np.arange(7) == 3, 50.0, 0.0)[None].repeat(2, 0)
  assert list(np.asarray(varsr.mbr_tokens_from_logits(jnp.asarray(peaked), jnp.asarray(
      E, jnp.float32)))) == [3, 3]
  out = varsr.upscale(model, params, vq, vq_params, lr, jax.random.key(1), cfg=None,
                      refine=False, mbr_tokens=True)
  book = vq.apply({"params": vq_params}, method="codebook")
  for (lo, hi), idx in zip(cfg.begin_ends(), out["idx"]):
    want = varsr.mbr_tokens_from_logits(out["logits"][:, lo:hi].reshape(-1, cfg.vocab_size), book)
    np.testing.assert_array_equal(np.asarray(idx).reshape(-1), np.asarray(want))
  x = vq.apply({"params": vq_params}, out["idx"], method="idx_to_var_input")
  logits_tf, _ = jax.jit(model.apply)({"params": params}, lr, jnp.zeros((2,), jnp.int32), x)
  np.testing.assert_allclose(np.asarray(out["logits"]), np.asarray(logits_tf), atol=1e-5)


def test_varsr_loss_bad_input_and_colour_fix(tiny_sr):
  varsr, cfg, model, params, _vq, _vq_params, lr, hr = tiny_sr
  (loss, n), grads = _varsr_loss_and_grads(varsr, cfg, model, params, lr)
  assert float(n) == 2 and np.isfinite(float(loss))
  for name in ("lr_encoder", "refiner", "class_emb"):
    assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads[name]))) > 0, name
  with pytest.raises(ValueError, match="x4"):
    model.apply({"params": params}, hr, jnp.zeros((2,), jnp.int32),
                jnp.zeros((2, cfg.seq_len - 1, cfg.c_vae)))
  with pytest.raises(ValueError, match="RGB"):
    model.apply({"params": params}, lr[..., :1], jnp.zeros((2,), jnp.int32),
                jnp.zeros((2, cfg.seq_len - 1, cfg.c_vae)))
  fixed = varsr.adain_color_fix(hr * 0.3 + 0.2, lr)
  np.testing.assert_allclose(np.asarray(fixed.mean((1, 2))), np.asarray(lr.mean((1, 2))),
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(fixed.std((1, 2))), np.asarray(lr.std((1, 2))),
                             atol=1e-4)


def test_wavelet_colour_fix_matches_scipy_and_keeps_detail():
  """The a-trous low band against scipy's correlate (dilated binomial kernel, 'nearest' edges,
  applied level by level); fixing an image shifted by a constant against the original returns
  the original (the blur keeps constants, so the shift lies wholly in the low band)."""
  from scipy import ndimage

  from jaxllm.models.var import varsr
  rng = np.random.default_rng(0)
  img = rng.uniform(size=(2, 40, 29, 3))
  low = img.copy()
  for i in range(5):
    r, k = 2 ** i, np.outer([1, 2, 1], [1, 2, 1]) / 16.0
    dilated = np.zeros((2 * r + 1, 2 * r + 1))
    dilated[::r, ::r] = k
    low = np.stack([np.stack([ndimage.correlate(low[b, :, :, c], dilated, mode="nearest")
                              for c in range(3)], -1) for b in range(2)])
  high_j, low_j = varsr.wavelet_decompose(jnp.asarray(img, jnp.float32))
  np.testing.assert_allclose(np.asarray(low_j), low, atol=1e-5)
  np.testing.assert_allclose(np.asarray(high_j), img - low, atol=1e-5)
  shifted = jnp.asarray(img + np.array([0.3, -0.2, 0.1]), jnp.float32)
  np.testing.assert_allclose(np.asarray(varsr.wavelet_color_fix(shifted, jnp.asarray(
      img, jnp.float32))), img, atol=1e-5)
  with pytest.raises(ValueError, match="one shape"):
    varsr.wavelet_color_fix(shifted, shifted[:, :8])


def test_tiled_upscale_blends_consistent_tiles_exactly():
  from jaxllm.models.var import varsr
  assert varsr.tile_starts(10, 4, 1) == [0, 3, 6] and varsr.tile_starts(3, 4, 1) == [0]
  rng = np.random.default_rng(0)

  def nearest(t):  # a stand-in model: nearest-neighbour x2
    return np.repeat(np.repeat(t, 2, axis=1), 2, axis=2)

  for shape in ((13, 21, 3), (3, 9, 3)):  # larger than a tile; and smaller (reflect-padded)
    lr = rng.uniform(size=shape).astype(np.float32)
    out = varsr.upscale_tiled(nearest, lr, tile=8, scale=2, overlap=3, batch=3)
    np.testing.assert_allclose(out, nearest(lr[None])[0], atol=1e-6)


def test_varsr_learned_positions_variant_and_config_errors():
  from jaxllm.models.var import varsr
  cfg = varsr.tiny(positions="learned")
  model = varsr.VARSR(cfg)
  lr = jnp.zeros((1, 4, 4, 3))
  args = (lr, jnp.zeros((1,), jnp.int32), jnp.zeros((1, cfg.seq_len - 1, cfg.c_vae)))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))["params"]
  assert shapes["pos_1LC"].value.shape == (cfg.seq_len - 1, cfg.width)  # the ablation's table
  logits, h_K = jax.eval_shape(lambda p: model.apply({"params": p}, *args), shapes)
  assert logits.shape == (1, cfg.seq_len, cfg.vocab_size) and h_K.shape == (1, 64, cfg.width)
  with pytest.raises(ValueError, match="image_size"):
    varsr.tiny(image_size=32)
  with pytest.raises(ValueError, match="positions"):
    varsr.tiny(positions="alibi")
  with pytest.raises(ValueError, match="conditioning"):
    varsr.tiny(conditioning="cross_attention")


def test_varsr_additive_conditioning_pools_the_lr_map_into_every_scale(tiny_sr_additive):
  varsr, cfg, model, params, _vq, _vq_params, lr, _ = tiny_sr_additive
  assert cfg.prefix_len == 0 and len(cfg.levels()) == cfg.seq_len  # just VAR's sequence
  assert params["pos_start"].shape == (1, cfg.width)
  # the additive term of every scale is the encoder map's block mean (8 / pn pixels per token)
  m_BPPD = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, cfg.width)), jnp.float32)
  added = model.apply({"params": params}, m_BPPD, 0, len(cfg.patch_nums),
                      method=lambda mod, *a: mod._lr_added(*a))
  m = np.asarray(m_BPPD)
  expect = np.concatenate([m.reshape(2, pn, 8 // pn, pn, 8 // pn, -1).mean((2, 4))
                           .reshape(2, pn * pn, -1) for pn in cfg.patch_nums], 1)
  np.testing.assert_allclose(np.asarray(added), expect, atol=1e-5)
  # so the LR reaches every scale, the first (class token) one included, and the loss trains
  # the encoder
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, cfg.seq_len - 1, cfg.c_vae)),
                  jnp.float32)
  fwd = jax.jit(lambda p, a: model.apply({"params": p}, a, jnp.zeros((2,), jnp.int32), x)[0])
  a, b = np.asarray(fwd(params, lr)), np.asarray(fwd(params, lr[::-1]))
  for lo, hi in cfg.begin_ends():
    assert np.abs(a[0, lo:hi] - b[0, lo:hi]).max() > 1e-4, (lo, hi)
  (loss, _), grads = _varsr_loss_and_grads(varsr, cfg, model, params, lr)
  assert np.isfinite(float(loss))
  for name in ("lr_encoder", "refiner"):
    assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads[name]))) > 0, name


def test_cfw_decoder_starts_as_and_at_w0_is_the_plain_decoder():
  """StableSR's CFW (`cfw.CFWDecoder`): with zero-initialised fusions it is the VQ-VAE decoder
  for every w; with trained (here random) fusions it is still exactly the decoder at w = 0 and
  differs at w > 0; its LR encoder's level features are the VQ-VAE encoder's own intermediate
  res-block outputs (flax's captured intermediates, an independent path)."""
  from jaxllm.models.var import cfw as cfwm
  cfg = vqm.tiny()
  S = cfg.image_size
  vq = vqm.VQVAE(cfg)
  vp = np_init(vq, jnp.zeros((1, S, S, 3)), seed=3)
  m = cfwm.CFWDecoder(cfg)
  p = cfwm.init_params(m, vp)
  rng = np.random.default_rng(0)
  f = jnp.asarray(rng.normal(size=(2, 8, 8, cfg.c_vae)), jnp.float32)
  lr = jnp.asarray(rng.uniform(-1, 1, (2, S // 4, S // 4, 3)), jnp.float32)
  plain = vq.apply({"params": vp}, f, method="decode_fhat")
  for w in (0.0, 1.0):
    np.testing.assert_array_equal(m.apply({"params": p}, f, lr, w), plain)
  trained, frozen = cfwm.split(p)
  assert sorted(frozen) == sorted(vqm.DECODER_PARAMS)
  assert sorted(trained) == ["fuse_0", "fuse_1", "lr_encoder"]  # all levels but the lowest
  noisy = {**frozen, **jax.tree.map(lambda x: x + 0.05 * jnp.asarray(
      rng.normal(size=x.shape), x.dtype), trained)}
  np.testing.assert_allclose(m.apply({"params": noisy}, f, lr, 0.0), plain, atol=1e-6)
  assert float(jnp.abs(m.apply({"params": noisy}, f, lr, 1.0) - plain).max()) > 1e-2
  # level features: the encoder's last res-block output per level, at 1, 1/2, 1/4 resolution
  up = vqm.resize(lr, S, "bicubic")
  feats = m.apply({"params": p}, up, True, method=lambda mod, x, fo: mod.lr_encoder(
      x, features_only=fo))
  _, inter = vq.apply({"params": vp}, up, method="features", capture_intermediates=True)
  enc = inter["intermediates"]["encoder"]
  last = cfg.num_res_blocks - 1
  for i, feat in enumerate(feats):
    assert feat.shape == (2, S >> i, S >> i, cfg.ch * cfg.ch_mult[i])
    np.testing.assert_allclose(feat, enc[f"down_{i}_block_{last}"]["__call__"][0], atol=1e-6)
  with pytest.raises(ValueError, match="levels 0..2"):
    cfwm.CFWConfig(levels=(3,)).fused(cfg)
  with pytest.raises(ValueError, match="side divides"):
    m.apply({"params": p}, f, lr[:, :5], 1.0)


def test_cfw_adversarial_loss_gives_each_player_its_own_gradient():
  """With adv_weight > 0 one loss trains both players: its gradient for the fusions is that of
  MSE + lam x (-D(out)) with lam = adv_weight ||dMSE/dout|| / ||d(-D)/dout|| held constant, and
  for the discriminator that of the patchwise hinge loss on (hr, out), each computed here
  directly."""
  from jaxllm.models.var import cfw as cfwm
  cfg = vqm.tiny()
  S = cfg.image_size
  vq = vqm.VQVAE(cfg)
  vp = np_init(vq, jnp.zeros((1, S, S, 3)), seed=4)
  m = cfwm.CFWDecoder(cfg, cfwm.CFWConfig(adv_weight=0.3, disc_ch=8))
  rng = np.random.default_rng(1)
  trained, frozen = cfwm.split(cfwm.init_params(m, vp))
  trained = jax.tree.map(lambda x: x + 0.05 * jnp.asarray(rng.normal(size=x.shape), x.dtype),
                         trained)
  f = jnp.asarray(rng.normal(size=(2, 8, 8, cfg.c_vae)), jnp.float32)
  batch = {"lr": jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 3)), jnp.float32),
           "hr": jnp.asarray(rng.uniform(-1, 1, (2, S, S, 3)), jnp.float32)}
  loss_fn = cfwm.cfw_loss_fn(m, frozen, lambda lr, key: f)
  grads = jax.grad(lambda q: loss_fn(q, batch, jax.random.key(0))[0])(trained)
  disc = cfwm.PatchDiscriminator(8)
  d_mean = lambda d, img: jnp.mean(disc.apply({"params": d}, img), axis=(1, 2))  # noqa: E731
  gen = {k: v for k, v in trained.items() if k != cfwm.DISC}
  decode = lambda g: m.apply({"params": {**frozen, **g}}, f, batch["lr"], 1.0)  # noqa: E731
  out = decode(gen)
  def hinge(d):  # per patch, as taming's hinge_d_loss
    real, fake = (disc.apply({"params": d}, x) for x in (batch["hr"], out))
    return jnp.sum(jnp.mean(jax.nn.relu(1 - real), (1, 2))
                   + jnp.mean(jax.nn.relu(1 + fake), (1, 2)))
  want_d = jax.grad(hinge)(trained[cfwm.DISC])
  n = out[0].size
  g_rec = 2 * (out - batch["hr"]) / n
  g_adv = jax.grad(lambda o: -jnp.sum(d_mean(trained[cfwm.DISC], o)))(out)
  lam = 0.3 * jnp.linalg.norm(g_rec) / jnp.linalg.norm(g_adv)
  want_g = jax.grad(lambda g: jnp.sum(jnp.mean((decode(g) - batch["hr"]) ** 2, axis=(1, 2, 3)))
                    - lam * jnp.sum(d_mean(trained[cfwm.DISC], decode(g))))(gen)
  for got, want in ((grads[cfwm.DISC], want_d), ({k: grads[k] for k in gen}, want_g)):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)
  assert float(jnp.abs(jax.tree.leaves(want_d)[0]).max()) > 0  # both players do learn
  with pytest.raises(ValueError, match="adv_weight"):
    cfwm.CFWConfig(adv_weight=-1.0)
