"""Quantizers: Gaussian-optimal scales, level sets, trust masks, Hadamard, custom VJPs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.quant import quantizers as q
from jaxllm.quant.hadamard import hadamard_matrix, hadamard_transform

T = q.TERNARY
# QuEST notebooks/mse_fitting.ipynb (reference/quantization.md section 2)
ALPHA_TABLE = {1: (0.79788, 0.36338), T: (1.22401, 0.19017), 2: (1.49353, 0.11885),
               3: (2.05107, 0.03744), 4: (2.51393, 0.011543)}
REJECTED_TABLE = {1: 0.1105, T: 0.0664, 2: 0.0464, 3: 0.0191, 4: 0.00733}


@pytest.mark.parametrize("bits", list(ALPHA_TABLE))
def test_closed_form_gaussian_mse_reproduces_alpha_table(bits):
  alpha, mse = ALPHA_TABLE[bits]
  assert q.optimal_gaussian_alpha(bits) == pytest.approx(alpha, rel=1e-3)
  assert q.gaussian_grid_mse(alpha, q.num_levels(bits)) == pytest.approx(mse, rel=1e-3)
  assert q.quest_alpha(bits) == alpha


def test_closed_form_mse_matches_monte_carlo():
  x = jax.random.normal(jax.random.key(0), (64, 8192))
  for bits in (1, 2, 4):
    mc = float(jnp.mean(jnp.square(q.decode(q.quest_codes(x, bits)) - x)))
    assert mc == pytest.approx(ALPHA_TABLE[bits][1], rel=0.03)


def _levels(values, alpha=1.0):
  return sorted({round(float(v) / alpha, 5) for v in np.asarray(values).ravel()})


W = jnp.linspace(-10.0, 10.0, 20001)[None, :]  # one row sweeping well past every clip range
ONE = jnp.ones((1, 1))


@pytest.mark.parametrize("bits, expected", [
    (1, [-1.0, 1.0]),
    (T, [-0.66667, 0.0, 0.66667]),
    (2, [-0.75, -0.25, 0.25, 0.75]),
    (3, [float(i) for i in range(-4, 4)]),
    (4, [float(i) for i in range(-8, 8)]),
])
def test_paretoq_level_sets(bits, expected):
  assert _levels(q.paretoq_quantize(W, ONE, bits, W.size)) == expected


def _paper_seq(x, k):
  """SEQ as printed in the ParetoQ paper: round(clip(x, -1, 1) * k/2 - 0.5) + 0.5) / k * 2."""
  return (jnp.round(jnp.clip(x, -1, 1) * k / 2 - 0.5) + 0.5) / k * 2


def test_paper_seq_formula_differs_from_code():
  """Regression: the paper's formula gives 4 levels for k=3 (ternary) and a fifth level at 1.25
  for k=4 (2 bits); the authors' code (implemented here) gives 3 and 4."""
  paper3, paper4 = _levels(_paper_seq(W, 3)), _levels(_paper_seq(W, 4))
  assert len(paper3) == 4 and 0.0 not in paper3
  assert len(paper4) == 5 and 1.25 in paper4
  assert len(_levels(q.paretoq_quantize(W, ONE, T, W.size))) == 3
  assert len(_levels(q.paretoq_quantize(W, ONE, 2, W.size))) == 4


@pytest.mark.parametrize("bits", [1, T, 2, 3, 4])
def test_quest_level_counts_and_centred_grid(bits):
  x = jax.random.normal(jax.random.key(1), (4, 4096))
  c = q.quest_codes(x, bits)
  n = q.num_levels(bits)
  assert int(c.codes.min()) == 0 and int(c.codes.max()) == n - 1
  assert len(_levels(q.decode(c)[0], float(c.scale[0, 0]))) == n
  assert (0.0 in c.codebook) == (bits == T)  # even level counts have no zero
  np.testing.assert_allclose(c.codebook, -np.asarray(c.codebook)[::-1], atol=1e-7)


def test_baseline_level_counts():
  x = jax.random.normal(jax.random.key(2), (8, 2048))
  assert len(_levels(q.decode(q.bitnet_codes(x)), 1e-6)) == 3
  assert len(set(np.asarray(q.absmax_codes(x, 8).codes[0]).tolist())) <= 255
  assert len(q.absmax_codes(x, 4).codebook) == 15
  assert len(q.minmax_codes(x, 4).codebook) == 16
  c = q.minmax_codes(x, 3)
  np.testing.assert_allclose(q.decode(c), x, atol=float(c.scale.max()) / 2 + 1e-6)


@pytest.mark.parametrize("bits", [1, T, 2, 3, 4])
def test_trust_mask_rejected_fraction_on_gaussian(bits):
  x = jax.random.normal(jax.random.key(3), (256, 4096))
  rejected = 1.0 - float(jnp.mean(q.quest_trust_mask(x, bits)))
  n = q.num_levels(bits)
  expected = math.erfc(q.quest_alpha(bits) * n / (n - 1) / math.sqrt(2))
  se = math.sqrt(expected * (1 - expected) / x.size)
  assert abs(rejected - expected) < 5 * se + 2e-4 * expected, (rejected, expected)
  assert expected == pytest.approx(REJECTED_TABLE[bits], rel=3e-3)


def test_hadamard_orthogonal_and_preserves_matmul():
  for n in (1, 2, 8, 64, 128):
    h = hadamard_matrix(n)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-6)
  kx, kw = jax.random.split(jax.random.key(4))
  x, w = jax.random.normal(kx, (5, 256)), jax.random.normal(kw, (7, 256))
  for block in (32, 128):
    xh, wh = hadamard_transform(x, block), hadamard_transform(w, block)
    np.testing.assert_allclose(xh @ wh.T, x @ w.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(hadamard_transform(xh, block), x, atol=1e-5)
  with pytest.raises(ValueError, match="power of two"):
    hadamard_matrix(12)
  with pytest.raises(ValueError, match="does not divide"):
    hadamard_transform(x, 96)


def _paretoq_grads_reference(w, alpha, g, bits):
  """The ParetoQ code's backward, written out in numpy."""
  w, alpha, g = (np.asarray(v, np.float64) for v in (w, alpha, g))
  x = w / alpha
  if bits in (T, 2):
    n, shift = (1.5, 0.0) if bits == T else (2.0, 0.5)
    qp = (n - shift) / n
    small, big = x < -0.99, x > 0.99
    inner = (np.round(np.clip(x, -0.99, 0.99) * n - shift) + shift) / n - x
    gs = 1 / math.sqrt(w.size)
    da = np.where(small, -qp, np.where(big, qp, inner))
  else:
    qn, qp = (-1, 1) if bits == 1 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    small, big = x < qn, x > qp
    gs = 1 / math.sqrt(w.size * qp)
    da = np.sign(w) if bits == 1 else np.where(small, qn, np.where(big, qp, np.round(x) - x))
  grad_alpha = (da * g * gs).sum(-1, keepdims=True)
  grad_w = np.where(~(small | big), g, 0.0)
  return grad_w, grad_alpha


@pytest.mark.parametrize("bits", [1, T, 2, 3, 4])
def test_paretoq_vjp_matches_authors_formula(bits):
  kw, kg = jax.random.split(jax.random.key(5))
  w = jax.random.normal(kw, (6, 3, 32))  # 6 rows, 3 groups of 32
  g = jax.random.normal(kg, w.shape)
  alpha = q.paretoq_init_scale(w, bits) * 0.8  # some entries clip
  _, vjp = jax.vjp(lambda w, a: q.paretoq_quantize(w, a, bits, w.size), w, alpha)
  gw, ga = vjp(g)
  rw, ra = _paretoq_grads_reference(w, alpha, g, bits)
  np.testing.assert_allclose(gw, rw, atol=1e-6)
  np.testing.assert_allclose(ga, ra, rtol=1e-4, atol=1e-6)
  assert 0 < float(jnp.mean(gw == 0)) < 1  # the pass mask both passes and blocks


def test_paretoq_scale_init_and_binary_pass_rate():
  w = jax.random.normal(jax.random.key(6), (64, 4096))
  np.testing.assert_allclose(q.paretoq_init_scale(w, 1)[:, 0], jnp.mean(jnp.abs(w), -1), rtol=1e-6)
  np.testing.assert_allclose(q.paretoq_init_scale(w, 2)[:, 0], jnp.max(jnp.abs(w), -1), rtol=1e-6)
  np.testing.assert_allclose(q.paretoq_init_scale(w, 4)[:, 0], jnp.max(jnp.abs(w), -1) / 7,
                             rtol=1e-6)
  # binary: the gradient passes where |W| <= mean|W|, P(|z| <= sqrt(2/pi)) = 57.5% on N(0, 1)
  rate = float(jnp.mean(q.paretoq_pass_mask(w, q.paretoq_init_scale(w, 1), 1)))
  assert rate == pytest.approx(math.erf(math.sqrt(2 / math.pi) / math.sqrt(2)), abs=3e-3)
  assert rate == pytest.approx(0.575, abs=5e-3)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_quest_vjp_is_masked_gradient_through_hadamard(bits):
  kw, kg = jax.random.split(jax.random.key(7))
  w, g = jax.random.normal(kw, (16, 256)), jax.random.normal(kg, (16, 256))
  f = lambda w: hadamard_transform(q.quest_quantize(hadamard_transform(w, 128), bits), 128)
  (gw,) = jax.vjp(f, w)[1](g)
  wh = hadamard_transform(w, 128)
  m = q.quest_trust_mask(wh, bits)
  expected = hadamard_transform(hadamard_transform(g, 128) * m, 128)  # (g H * M) H^T
  np.testing.assert_allclose(gw, expected, atol=1e-5)
  # without the trust mask it is the plain straight-through estimator
  (gs,) = jax.vjp(lambda v: q.quest_quantize(v, bits, None), wh)[1](g)
  np.testing.assert_allclose(gs, g)


def test_straight_through_quantizers_have_identity_vjp():
  x = jax.random.normal(jax.random.key(8), (4, 64))
  for method, bits in (("bitnet", T), ("absmax", 8), ("minmax", 4), ("matquant", 2)):
    (gx,) = jax.vjp(lambda v, m=method, b=bits: q.ste_quantize(v, m, b), x)[1](2 * x)
    np.testing.assert_allclose(gx, 2 * x)


def test_quantizers_jit():
  w = jax.random.normal(jax.random.key(9), (8, 64))
  a = q.paretoq_init_scale(w, 2)
  f = jax.jit(jax.grad(lambda w, a: jnp.sum(q.paretoq_quantize(w, a, 2, w.size) ** 2),
                       argnums=(0, 1)))
  gw, ga = f(w, a)
  assert gw.shape == w.shape and ga.shape == a.shape
  np.testing.assert_array_equal(jax.jit(q.quest_quantize, static_argnums=(1, 2))(w, 4, 1.0),
                                q.quest_quantize(w, 4, 1.0))
