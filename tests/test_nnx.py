"""jaxbn.nnx.BatchNorm is a drop-in for flax.nnx.BatchNorm.

The reference is nnx.BatchNorm with use_fast_variance=False (two-pass
variance, as jaxbn).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
from jaxbn import nnx as jbn


def _x(shape, seed=0, loc=0.0):
  return jax.random.normal(jax.random.key(seed), shape) * 2.0 + loc


def _pair(num_features, **kw):
  ref = nnx.BatchNorm(num_features, use_fast_variance=False, rngs=nnx.Rngs(0), **kw)
  ours = jbn.BatchNorm(num_features, rngs=nnx.Rngs(0), **kw)
  return ref, ours


def test_same_variables_as_nnx():
  ref, ours = _pair(4)
  kinds = lambda m: {
    k: (type(v).__name__, v[...].shape, str(v[...].dtype)) for k, v in nnx.state(m).items()
  }
  assert kinds(ours) == kinds(ref)
  ref, ours = _pair(4, use_scale=False, use_bias=False)
  assert ours.scale is None and ours.bias is None
  assert set(nnx.state(ours).keys()) == set(nnx.state(ref).keys()) == {"mean", "var"}


@pytest.mark.parametrize(("shape", "axis"), [((16, 4), -1), ((4, 5, 5, 3), -1), ((4, 3, 5, 5), 1)])
def test_train_then_eval_matches_nnx(shape, axis):
  c = shape[axis]
  ref, ours = _pair(c, axis=axis, momentum=0.8)
  # Shared non-trivial parameters.
  for m in (ref, ours):
    m.scale[...] = 1.0 + 0.3 * _x((c,), seed=1)
    m.bias[...] = 0.3 * _x((c,), seed=2)
  for step in range(3):
    x = _x(shape, seed=10 + step, loc=float(step))
    np.testing.assert_allclose(ours(x), ref(x), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(ours.mean[...], ref.mean[...], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.var[...], ref.var[...], rtol=1e-5, atol=1e-6)
  ref.eval()
  ours.eval()
  assert ours.use_running_average is True
  x = _x(shape, seed=50)
  mean_before = np.asarray(ours.mean[...])
  np.testing.assert_allclose(ours(x), ref(x), atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(ours.mean[...], mean_before)  # eval does not update
  ours.train()
  assert ours.use_running_average is False


def test_gradients_match_nnx():
  ref, ours = _pair(3)
  x = _x((12, 3), loc=2.0)
  w = _x((12, 3), seed=3)
  for m in (ref, ours):
    m.scale[...] = jnp.array([0.5, 1.5, 2.0])

  def grads(module):
    def loss(module, x):
      return jnp.sum(module(x) * w)

    return nnx.grad(loss, argnums=(0, 1))(module, x)

  (g_ref_m, g_ref_x), (g_m, g_x) = grads(ref), grads(ours)
  np.testing.assert_allclose(g_x, g_ref_x, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(g_m["scale"][...], g_ref_m["scale"][...], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(g_m["bias"][...], g_ref_m["bias"][...], atol=1e-4, rtol=1e-4)


def test_nnx_variables_load_both_ways():
  x = _x((8, 3), loc=1.0)
  ref, ours = _pair(3)
  ref(x)  # move the statistics away from their initial values
  nnx.update(ours, nnx.state(ref))
  ref.eval()
  ours.eval()
  np.testing.assert_allclose(ours(x), ref(x), atol=1e-5)
  ours.train()
  ours(x * 2.0)
  nnx.update(ref, nnx.state(ours))
  np.testing.assert_array_equal(ref.var[...], ours.var[...])


def test_view_and_call_argument_select_the_mode():
  bn = jbn.BatchNorm(2, rngs=nnx.Rngs(0))
  x = _x((6, 2), loc=3.0)
  evaluating = nnx.view(bn, use_running_average=True)
  # Initial running statistics are mean 0, var 1: evaluation is nearly identity.
  np.testing.assert_allclose(evaluating(x), x / np.sqrt(1 + 1e-5), rtol=1e-6)
  np.testing.assert_allclose(bn(x, use_running_average=True), x / np.sqrt(1 + 1e-5), rtol=1e-6)
  np.testing.assert_array_equal(bn.mean[...], np.zeros(2))
  bn(x)
  assert np.all(np.asarray(bn.mean[...]) != 0.0)


def test_under_nnx_jit_the_statistics_are_updated():
  bn = jbn.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0))
  x = _x((10, 3), loc=4.0)

  @nnx.jit
  def step(bn, x):
    return bn(x)

  step(bn, x)
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(bn.mean[...], 0.5 * x64.mean(0), rtol=1e-5)
  np.testing.assert_allclose(bn.var[...], 0.5 + 0.5 * x64.var(0), rtol=1e-5)


def test_extras_cumulative_average_and_renorm_schedule():
  data = np.asarray(_x((30, 2), loc=-2.0))
  bn = jbn.BatchNorm(2, momentum=None, rngs=nnx.Rngs(0))
  for start in range(0, 30, 10):
    bn(jnp.asarray(data[start : start + 10]))
  np.testing.assert_allclose(bn.mean[...], data.astype(np.float64).mean(0), rtol=1e-5)
  np.testing.assert_allclose(bn.var[...], data.astype(np.float64).var(0), rtol=1e-5)
  assert isinstance(bn.count, nnx.BatchStat) and bn.step is None
  rn = jbn.BatchNorm(2, renorm=jaxbn.renorm_schedule(), rngs=nnx.Rngs(0))
  rn(jnp.asarray(data[:10]))
  assert int(rn.step[...]) == 1 and rn.count is None


def test_mask_and_output_dtype():
  x = _x((10, 2))
  mask = (jnp.arange(10) < 6)[:, None]  # whole examples
  bn = jbn.BatchNorm(2, momentum=0.0, rngs=nnx.Rngs(0))
  bn(x, mask=mask)
  x64 = np.asarray(x, np.float64)[:6]
  np.testing.assert_allclose(bn.mean[...], x64.mean(0), rtol=1e-5)
  np.testing.assert_allclose(bn.var[...], x64.var(0), rtol=1e-5)
  assert bn(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
  bf16_out = jbn.BatchNorm(2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(x)
  assert bf16_out.dtype == jnp.bfloat16


def test_bad_input_gets_the_core_errors():
  bn = jbn.BatchNorm(3, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="x must be a floating-point array"):
    bn(jnp.ones((4, 3), jnp.int32))
  with pytest.raises(ValueError, match=r"feature shape \(4,\)"):
    bn(jnp.ones((4, 4)))
  with pytest.raises(ValueError, match="num_features"):
    jbn.BatchNorm(0, rngs=nnx.Rngs(0))


def test_numpy_int_features_view_docs_and_one_example():
  bn = jbn.BatchNorm(np.int64(4), rngs=nnx.Rngs(0))
  assert bn.mean[...].shape == (4,)
  info = nnx.view_info(bn)
  assert "the stored batch statistics will be" in info and "use_running_average" in info
  # nnx.tabulate on one example, as flax's docs show it: a warning, no error,
  # and the running statistics are unchanged.
  model = nnx.Sequential(nnx.Linear(32, 4, rngs=nnx.Rngs(0)), jbn.BatchNorm(4, rngs=nnx.Rngs(1)))
  with pytest.warns(jaxbn.SingleValueWarning):
    table = nnx.tabulate(model, jnp.ones((1, 32)))
  assert "BatchNorm" in table
  np.testing.assert_array_equal(model.layers[1].var[...], np.ones(4))


def test_view_info_describes_use_running_average_as_flax_does():
  # flax's own docstring example of nnx.view_info prints this text for its BatchNorm.
  ours = nnx.view_info(jbn.BatchNorm(3, rngs=nnx.Rngs(0)))
  assert ours == nnx.view_info(nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
  assert "the stored batch statistics will be" in ours
