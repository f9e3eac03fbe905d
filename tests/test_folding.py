"""fold_bn and whole-model folding: BN-free layers with the same inference output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from tests.reference import bn_infer_ref

EPS = 1e-5


def _bn(num, seed):
  rng = np.random.default_rng(seed)
  params = jaxbn.BNParams(
    scale=jnp.asarray(rng.uniform(0.5, 2.0, num), jnp.float32),
    bias=jnp.asarray(rng.normal(size=num), jnp.float32),
  )
  _, state = jaxbn.bn_init(num)
  state = state._replace(
    mean=jnp.asarray(rng.normal(size=num) * 3, jnp.float32),
    var=jnp.asarray(rng.uniform(0.1, 5.0, num), jnp.float32),
  )
  return params, state


def _conv(x, kernel):
  return jax.lax.conv_general_dilated(
    x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


@pytest.mark.parametrize("with_bias", [True, False])
def test_folded_dense_equals_dense_then_bn_infer(with_bias):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 7)).astype(np.float32)
  kernel = rng.normal(size=(7, 5)).astype(np.float32)
  bias = rng.normal(size=5).astype(np.float32) if with_bias else None
  params, state = _bn(5, 1)
  k, b = jaxbn.fold_bn(kernel, bias, params, state, epsilon=EPS)
  got = np.asarray(x @ k + b[None])
  z = x.astype(np.float64) @ kernel.astype(np.float64) + (0 if bias is None else bias)
  want = bn_infer_ref(z, params.scale, params.bias, state.mean, state.var, epsilon=EPS)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  assert k.dtype == jnp.float32 and b.dtype == jnp.float32 and b.shape == (5,)


@pytest.mark.parametrize("with_bias", [True, False])
def test_folded_conv_equals_conv_then_bn_infer(with_bias):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 6)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=6), jnp.float32) if with_bias else None
  params, state = _bn(6, 3)
  k, b = jaxbn.fold_bn(kernel, bias, params, state, epsilon=EPS)
  got = np.asarray(_conv(x, k) + b.reshape(1, 1, 1, 6))
  with jax.enable_x64(True):
    z = _conv(jnp.asarray(x, jnp.float64), jnp.asarray(kernel, jnp.float64))
    z = np.asarray(z) + (0 if bias is None else np.asarray(bias, np.float64))
  want = bn_infer_ref(z, params.scale, params.bias, state.mean, state.var, epsilon=EPS)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_low_precision_kernel_is_folded_in_float32_and_returned_in_its_dtype():
  params, state = _bn(4, 4)
  kernel = jnp.asarray(np.random.default_rng(5).normal(size=(3, 4)), jnp.bfloat16)
  k, b = jaxbn.fold_bn(kernel, None, params, state)
  assert k.dtype == jnp.bfloat16 and b.dtype == jnp.bfloat16
  s = np.asarray(params.scale, np.float64) / np.sqrt(np.asarray(state.var, np.float64) + EPS)
  want = np.asarray(kernel, np.float64) * s[None]
  np.testing.assert_allclose(np.asarray(k, np.float64), want, rtol=1e-2)


def test_float64_kernel_stays_float64():
  params, state = _bn(3, 6)
  with jax.enable_x64(True):
    kernel = jnp.asarray(np.random.default_rng(7).normal(size=(2, 3)), jnp.float64)
    k, b = jaxbn.fold_bn(kernel, None, params, state, epsilon=0.0)
    assert k.dtype == jnp.float64 and b.dtype == jnp.float64
    s = np.asarray(params.scale, np.float64) / np.sqrt(np.asarray(state.var, np.float64))
    np.testing.assert_allclose(k, np.asarray(kernel) * s[None], rtol=1e-12)
    mean = np.asarray(state.mean, np.float64)
    np.testing.assert_allclose(b, -mean * s + np.asarray(params.bias, np.float64), rtol=1e-12)


def test_mismatched_shapes_are_named():
  params, state = _bn(4, 0)
  with pytest.raises(ValueError, match=r"params.scale \(4,\)"):
    jaxbn.fold_bn(jnp.ones((3, 5)), None, params, state)
  with pytest.raises(ValueError, match=r"bias \(3,\)"):
    jaxbn.fold_bn(jnp.ones((3, 4)), jnp.ones(3), params, state)
  with pytest.raises(TypeError, match="floating"):
    jaxbn.fold_bn(jnp.ones((3, 4), jnp.int32), None, params, state)
