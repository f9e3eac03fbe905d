"""Numerics beyond the anchors, each against float64 computed on the same input,
and the trace-time validation of bn_train's options."""

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbn


def _ref64(x, eps=1e-5):
  """Algorithm 1 in float64 NumPy on the same (float32) values, features last."""
  x = np.asarray(x, np.float64)
  red = tuple(range(x.ndim - 1))
  mu, var = x.mean(red), x.var(red)
  return (x - mu) / np.sqrt(var + eps), mu, var


# ------------------------------------------------------------ far from zero


def test_mean_exact_far_from_zero():
  x = 1e6 + jax.random.normal(jax.random.key(0), (64, 8))
  params, state = jaxbn.bn_init(8)
  y, new = jaxbn.bn_train(params, state, x, momentum=0.0)
  y_ref, mu, var = _ref64(x)
  assert np.max(np.abs(np.asarray(y, np.float64) - y_ref)) < 1e-3
  np.testing.assert_allclose(new.var, var, rtol=1e-4)
  np.testing.assert_allclose(new.mean, mu, rtol=1e-7)
  # The same through every layout of the reduction (NHWC, several devices).
  x4 = 1e6 + jax.random.normal(jax.random.key(1), (8, 4, 4, 3))
  y4, _ = jaxbn.bn_train(*jaxbn.bn_init(3), x4)
  assert np.max(np.abs(np.asarray(y4, np.float64) - _ref64(x4)[0])) < 1e-3


@pytest.mark.parametrize("rows", [16, 96, 100])
def test_constant_feature_gives_exactly_bias(rows):
  # 96 and 100 rows: a subset of 3 and 4 values whose float32 mean may miss the
  # value by a spacing, so the shift is not the value and `delta` is not 0;
  # biases that are not binary fractions, so that no rounding hides.
  params = jaxbn.BNParams(scale=jnp.array([2.0, 3.0]), bias=jnp.array([0.1, -0.3]))
  _, state = jaxbn.bn_init(2)
  x = jnp.full((rows, 2), 123456.7)
  y, _ = jaxbn.bn_train(params, state, x)
  np.testing.assert_array_equal(y, jnp.broadcast_to(params.bias, x.shape))
  g = jax.grad(lambda x: jnp.sum(jaxbn.bn_train(params, state, x)[0] * x))(x)
  chex.assert_tree_all_finite(g)


def test_far_from_zero_across_devices():
  """Every device shifts by the same value: exact synchronized statistics."""
  x = 1e6 + jax.random.normal(jax.random.key(0), (64, 4))
  params, state = jaxbn.bn_init(4)
  y = jax.vmap(lambda x: jaxbn.bn_train(params, state, x, axis_name="d")[0], axis_name="d")(
    x.reshape(8, 8, 4)
  )
  assert np.max(np.abs(np.asarray(y.reshape(64, 4), np.float64) - _ref64(x)[0])) < 1e-3


# ------------------------------------------------------ non-finite values


def test_nan_and_inf_in_masked_positions_never_reach_valid_results():
  x = jax.random.normal(jax.random.key(0), (12, 3)) * 2 + 1
  mask = (jnp.arange(12) % 4 != 0)[:, None]
  dirty = jnp.where(mask, x, jnp.array([jnp.nan, jnp.inf, -jnp.inf]))
  clean = jnp.where(mask, x, 0.0)
  params, state = jaxbn.bn_init(3)
  ct = jax.random.normal(jax.random.key(1), x.shape)

  def run(x):
    def loss(p, x):
      y, new = jaxbn.bn_train(p, state, x, mask=mask)
      return jnp.sum(jnp.where(mask, y * ct, 0)), (y, new)

    (_, (y, new)), g = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
    return y, new, g

  y_d, new_d, (gp_d, gx_d) = run(dirty)
  y_c, new_c, (gp_c, gx_c) = run(clean)
  np.testing.assert_allclose(jnp.where(mask, y_d, 0), jnp.where(mask, y_c, 0), rtol=1e-6)
  chex.assert_trees_all_close(new_d, new_c)
  chex.assert_tree_all_finite((new_d, gp_d))
  chex.assert_trees_all_close(gp_d, gp_c, rtol=1e-5)
  np.testing.assert_allclose(jnp.where(mask, gx_d, 0), jnp.where(mask, gx_c, 0), rtol=1e-5)
  # Forward mode too.
  _, t = jax.jvp(lambda x: jaxbn.bn_train(params, state, x, mask=mask)[0], (dirty,), (ct,))
  _, t_c = jax.jvp(lambda x: jaxbn.bn_train(params, state, x, mask=mask)[0], (clean,), (ct,))
  np.testing.assert_allclose(jnp.where(mask, t, 0), jnp.where(mask, t_c, 0), rtol=1e-5)


def test_non_finite_batch_leaves_running_statistics_unchanged():
  params, state = jaxbn.bn_init(3)
  state = state._replace(mean=jnp.array([1.0, 2.0, 3.0]), var=jnp.array([4.0, 5.0, 6.0]))
  x = jax.random.normal(jax.random.key(0), (8, 3)).at[2, 1].set(jnp.inf)
  for momentum in (0.9, None):
    _, new = jaxbn.bn_train(params, state, x, momentum=momentum, ema_warmup=True)
    assert float(new.mean[1]) == 2.0 and float(new.var[1]) == 5.0
    assert float(new.count[1]) == 0.0
    assert float(new.mean[0]) != 1.0  # the finite features still update
    chex.assert_tree_all_finite(new)


def test_apply_if_finite_loop_recovers_from_a_bad_batch():
  """optax.apply_if_finite skips the parameter update; jaxbn keeps the state."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = nn.Dense(8)(x)
      x = jaxbn.linen.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      return nn.Dense(1)(nn.relu(x))

  net = Net()
  x = jax.random.normal(jax.random.key(0), (32, 4))
  y = jnp.sum(x, 1, keepdims=True)
  variables = net.init(jax.random.key(1), x, train=False)
  tx = optax.apply_if_finite(optax.sgd(0.05), max_consecutive_errors=5)
  opt = tx.init(variables["params"])

  @jax.jit
  def step(params, stats, opt, x):
    def loss(p):
      out, upd = net.apply(
        {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
      )
      return jnp.mean((out - y) ** 2), upd["batch_stats"]

    (value, stats), g = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), stats, opt, value

  params, stats = variables["params"], variables["batch_stats"]
  for i in range(30):
    bad = x.at[3, 0].set(jnp.nan) if i == 10 else x
    params, stats, opt, _value = step(params, stats, opt, bad)
    chex.assert_tree_all_finite((params, stats))
  assert int(opt.total_notfinite) == 1
  out = net.apply({"params": params, "batch_stats": stats}, x, train=False)
  assert float(jnp.mean((out - y) ** 2)) < float(jnp.mean(y**2))


# --------------------------------------------------------------- dtypes


def test_float64_models_keep_float64_statistics():
  with jax.enable_x64(True):
    params, state = jaxbn.bn_init(2, dtype=jnp.float64)
    chex.assert_type([state.mean, state.var, state.count], jnp.float64)
    x = 1e8 + 1e-3 * jax.random.normal(jax.random.key(0), (256, 2), jnp.float64)
    _, state = jaxbn.bn_train(params, state, x, momentum=None)
    chex.assert_type([state.mean, state.var], jnp.float64)
    y = jaxbn.bn_infer(params, state, x)
    y_ref, _, _ = _ref64(x)
    # float32 statistics were off by 0.11 here; float64 ones by the mean's rounding.
    assert np.max(np.abs(np.asarray(y) - y_ref)) < 1e-4
    # A float32 model under x64 keeps float32 statistics.
    _, s32 = jaxbn.bn_init(2)
    chex.assert_type(jaxbn.bn_train(params, s32, x)[1].mean, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_models_keep_float32_statistics(dtype):
  _params, state = jaxbn.bn_init(2, dtype=dtype)
  chex.assert_type([state.mean, state.var, state.count], jnp.float32)


# ------------------------------------------------------ one value, running_var


def test_one_value_per_feature_warns_returns_bias_and_keeps_statistics():
  params = jaxbn.BNParams(scale=jnp.array([2.0, 3.0]), bias=jnp.array([0.5, -1.0]))
  _, state = jaxbn.bn_init(2)
  state = state._replace(mean=jnp.array([1.0, 2.0]), var=jnp.array([3.0, 4.0]))
  with pytest.warns(jaxbn.SingleValueWarning, match=r"shape \(1, 2\).*axis_name"):
    y, new = jaxbn.bn_train(params, state, jnp.array([[7.0, -8.0]]))
  np.testing.assert_array_equal(y, params.bias[None])
  chex.assert_trees_all_equal(new._replace(step=0), state._replace(step=0))
  # Under jit: warned while tracing, once per shape.
  f = jax.jit(jaxbn.bn_train)
  with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    f(params, state, jnp.ones((1, 2)))
    f(params, state, 2 * jnp.ones((1, 2)))
  assert sum(issubclass(w.category, jaxbn.SingleValueWarning) for w in seen) == 1
  # Two or more values: no warning.
  with warnings.catch_warnings():
    warnings.simplefilter("error", jaxbn.SingleValueWarning)
    jaxbn.bn_train(params, state, jnp.ones((2, 2)))


def test_unbiased_running_variance():
  x = jax.random.normal(jax.random.key(0), (4, 3)) * 2 + 1
  params, state = jaxbn.bn_init(3)
  _, new = jaxbn.bn_train(params, state, x, momentum=0.9, running_var="unbiased")
  xs = np.asarray(x, np.float64)
  np.testing.assert_allclose(new.var, 0.9 + 0.1 * xs.var(0, ddof=1), rtol=1e-6)
  np.testing.assert_allclose(new.mean, 0.1 * xs.mean(0), rtol=1e-6)
  # Cumulative: the unbiased variance of everything seen.
  _, st = jaxbn.bn_train(params, state, x[:2], momentum=None, running_var="unbiased")
  _, st = jaxbn.bn_train(params, st, x[2:], momentum=None, running_var="unbiased")
  np.testing.assert_allclose(st.var, xs.var(0, ddof=1), rtol=1e-5)


# ------------------------------------------------------------- validation


def test_options_are_validated_at_trace_time():
  params, state = jaxbn.bn_init(2)
  x = jnp.ones((4, 2))
  step = lambda **kw: jax.jit(lambda x: jaxbn.bn_train(params, state, x, **kw))(x)
  for eps in (0, 0.0, -1e-5):
    with pytest.raises(ValueError, match="epsilon must be > 0"):
      step(epsilon=eps)
  with pytest.raises(ValueError, match="epsilon must be > 0"):
    jaxbn.bn_infer(params, state, x, epsilon=0.0)
  for m in (-0.5, 1.5):
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\]"):
      step(momentum=m)
  for axis in (None, "1", 1.0):
    with pytest.raises(TypeError, match="axis must be an int or a tuple of ints"):
      step(axis=axis)
  with pytest.raises(ValueError, match="running_var must be 'biased' or 'unbiased'"):
    step(running_var="torch")


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.int32])
def test_state_of_the_wrong_dtype_is_rejected(dtype):
  params, state = jaxbn.bn_init(2)
  bad = jax.tree.map(lambda t: t.astype(dtype), state._replace(step=state.step))
  bad = bad._replace(step=state.step)
  for fn in (jaxbn.bn_train, jaxbn.bn_infer):
    with pytest.raises(TypeError, match="statistics dtype, float32"):
      fn(params, bad, jnp.ones((4, 2)))


# ------------------------------------------------- shifted one-pass moments


@pytest.mark.parametrize("shift", [0.0, 1e6 - 3.0, -2e6])
def test_shifted_moments_are_exact_from_any_shift(shift):
  """One pass from a near shift; from a far one the guard's second pass."""
  from jaxbn import numerics

  x = 1e6 + jax.random.normal(jax.random.key(0), (512, 4)) * 0.5
  mask = jax.random.bernoulli(jax.random.key(1), 0.8, x.shape).at[:8].set(False)
  st = numerics.shifted_moments(x, (0,), mask=mask, shift=jnp.full((1, 4), shift))
  m = st.moments()
  xs = np.where(np.asarray(mask), np.asarray(x, np.float64), np.nan)
  np.testing.assert_allclose(m.count[0], np.sum(np.asarray(mask), 0))
  np.testing.assert_allclose(m.mean[0], np.nanmean(xs, 0), rtol=np.finfo(np.float32).eps)
  np.testing.assert_allclose(numerics.variance(m)[0], np.nanvar(xs, 0), rtol=1e-5)


def test_one_pass_error_grows_with_the_shift_distance_the_guard_bounds():
  """The guard's threshold is where the one-pass variance starts losing digits."""
  from jaxbn import numerics

  x = jax.random.normal(jax.random.key(0), (4096, 1))
  var = float(np.var(np.asarray(x, np.float64)))
  for k, refines in ((0.1, False), (np.sqrt(numerics.REFINE_RATIO) * 1.5, True), (3e3, True)):
    one = numerics.shifted_sums(x, (0,), jnp.full((1, 1), -k))
    assert bool(numerics.needs_refinement(one)) == refines
  # Far beyond it, one pass alone is off by much more than float32 rounding.
  one = numerics.shifted_sums(x, (0,), jnp.full((1, 1), -3e3))
  assert abs(float(numerics.variance(one.moments())[0, 0]) / var - 1) > 1e-4
  both = numerics.shifted_moments(x, (0,), shift=jnp.full((1, 1), -3e3))
  assert abs(float(numerics.variance(both.moments())[0, 0]) / var - 1) < 1e-5


def test_non_finite_sums_and_constant_features_do_not_refine():
  from jaxbn import numerics

  x = jnp.ones((16, 2)).at[3, 0].set(jnp.nan) * 1e6  # NaN column, constant column
  st = numerics.shifted_sums(x, (0,), jnp.zeros((1, 2)))
  assert not np.isfinite(float(st.delta[0, 0]))
  assert bool(numerics.needs_refinement(st, floor=1e-5))  # the constant, far: once
  # A shift a few float spacings from a constant: one pass is exact already.
  near = numerics.shifted_sums(x, (0,), jnp.full((1, 2), 1e6 + 4 * 0.0625))
  assert not bool(numerics.needs_refinement(near, floor=1e-5))
  assert float(near.m2[0, 1]) == 0.0 and float(near.shift[0, 1] + near.delta[0, 1]) == 1e6
