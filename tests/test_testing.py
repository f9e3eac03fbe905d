"""jaxbn.testing: each assertion passes on what batch norm gives and fails on what it should not.

The references are closed forms: a standardized array is normalized, an affine image of it has
mean ``bias`` and spread ``|scale|``, a running mean shifted by ``d`` standard deviations is
``d`` deviations off.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import testing


def _x(shape, seed=0, loc=3.0, scale=2.0):
  return np.asarray(
    loc + scale * np.asarray(jax.random.normal(jax.random.key(seed), shape)), np.float32
  )


@pytest.mark.parametrize(
  "shape, axis", [((64, 5), -1), ((8, 4, 4, 3), -1), ((8, 3, 4, 4), 1), ((8, 6, 2, 3), (1, 3))]
)
def test_normalized_holds_for_bn_train_in_every_layout(shape, axis):
  fshape = tuple(shape[a] for a in ((axis,) if isinstance(axis, int) else axis))
  params, state = jaxbn.bn_init(fshape)
  k1, k2 = jax.random.split(jax.random.key(1))
  params = params._replace(
    scale=jax.random.uniform(k1, fshape, minval=-3.0, maxval=3.0),
    bias=jax.random.normal(k2, fshape),
  )
  y, new = jaxbn.bn_train(params, state, _x(shape), axis=axis)
  testing.assert_normalized(y, axis=axis, params=params)
  testing.assert_valid_state(params, new)
  with pytest.raises(AssertionError, match="standard deviation"):
    testing.assert_normalized(y, axis=axis, params=params._replace(scale=2 * params.scale))
  with pytest.raises(AssertionError, match="mean"):
    testing.assert_normalized(y, axis=axis, params=params._replace(bias=params.bias + 0.1))


def test_normalized_counts_only_what_the_mask_keeps():
  x = _x((32, 4))
  keep = jnp.arange(32)[:, None] < 20  # padded examples at the end
  params, state = jaxbn.bn_init(4)
  y, _ = jaxbn.bn_train(params, state, x, mask=keep)
  y = jnp.where(keep, y, jnp.nan)  # what a model may leave in padding
  testing.assert_normalized(y, mask=keep)
  with pytest.raises(AssertionError, match="not finite"):
    testing.assert_normalized(y)
  y_all, _ = jaxbn.bn_train(params, state, x)  # statistics over the padding too
  with pytest.raises(AssertionError):
    testing.assert_normalized(y_all, mask=keep)


def test_normalized_fails_on_raw_data_and_bad_arguments():
  x = _x((64, 3))
  with pytest.raises(AssertionError, match="mean"):
    testing.assert_normalized(x)
  z = (x - x.mean(0)) / x.std(0)  # standardized by hand: the closed form passes
  testing.assert_normalized(z)
  with pytest.raises(ValueError, match="axis"):
    testing.assert_normalized(z, axis=2)
  with pytest.raises(ValueError, match="mask"):
    testing.assert_normalized(z, mask=jnp.ones((3, 64), bool))
  with pytest.raises(ValueError, match="mask: expected booleans"):
    testing.assert_normalized(z, mask=jnp.ones((64, 1)))
  with pytest.raises(ValueError, match="params"):
    testing.assert_normalized(z, params=jaxbn.bn_init(4)[0])
  with pytest.raises(AssertionError, match="every other"):
    testing.assert_normalized(z[:1])


@pytest.mark.parametrize("accumulate_steps", [1, 3])
def test_valid_state_after_init_and_training(accumulate_steps):
  params, state = jaxbn.bn_init(3, accumulate_steps=accumulate_steps)
  testing.assert_valid_state(params, state)
  for i in range(4):
    _, state = jaxbn.bn_train(params, state, _x((16, 3), seed=i), accumulate_steps=accumulate_steps)
  testing.assert_valid_state(params, state)
  testing.assert_valid_state(None, state)
  with jax.enable_x64(True):
    p64, s64 = jaxbn.bn_init(3, dtype=jnp.float64)
    testing.assert_valid_state(p64, s64)


@pytest.mark.parametrize(
  "broken, message",
  [
    (lambda p, s: (p, s._replace(var=s.var.at[1].set(jnp.nan))), "state.var"),
    (lambda p, s: (p, s._replace(mean=s.mean.at[0].set(jnp.inf))), "state.mean"),
    (lambda p, s: (p, s._replace(var=s.var.at[2].set(-1e-3))), "state.var has a negative"),
    (lambda p, s: (p, s._replace(count=-s.count - 1)), "state.count has a negative"),
    (lambda p, s: (p, s._replace(var=s.var.astype(jnp.float16))), "state.var"),
    (lambda p, s: (p, s._replace(mean=jnp.zeros(4))), r"state.mean \(4,\), state.var \(3,\)"),
    (lambda p, s: (p._replace(scale=jnp.ones(2)), s), r"params.scale \(2,\).* share one"),
    (lambda p, s: (p, s._replace(step=jnp.zeros((), jnp.float32))), "state.step"),
    (lambda p, s: (p, (s.mean, s.var)), "BNState"),
  ],
  ids=["nan", "inf", "negative_var", "negative_count", "dtype", "shape", "params", "step", "type"],
)
def test_valid_state_names_what_is_broken(broken, message):
  params, state = jaxbn.bn_init(3)
  params, state = broken(params, state)
  with pytest.raises(AssertionError, match=message):
    testing.assert_valid_state(params, state)


def test_running_stats_close_to_a_population_only_once_they_have_converged():
  data = _x((4096, 4), seed=3, loc=np.array([1.0, -2.0, 5.0, 0.0]), scale=np.array([1, 2, 3, 4.0]))
  mu, s2 = np.asarray(data, np.float64).mean(0), np.asarray(data, np.float64).var(0)
  params, state = jaxbn.bn_init(4)
  step = jax.jit(lambda s, x: jaxbn.bn_train(params, s, x, momentum=0.9)[1])
  state = step(state, data[:128])
  with pytest.raises(AssertionError, match="running mean"):
    testing.assert_running_stats_close(state, (mu, s2))
  for b in range(1, 32):
    state = step(state, data[128 * b : 128 * (b + 1)])
  testing.assert_running_stats_close(state, (mu, s2), tol=0.2)
  pop = jaxbn.bn_init(4)[1]._replace(
    mean=jnp.asarray(mu, jnp.float32), var=jnp.asarray(s2, jnp.float32)
  )
  testing.assert_running_stats_close(state, pop, tol=0.2)


def test_running_stats_close_measures_in_population_deviations():
  _, state = jaxbn.bn_init(2)
  mu, s2 = np.zeros(2), np.array([4.0, 1.0])
  # Running mean 0, var 1 against mean 0 and var 4: feature 0's variance is 75% off.
  with pytest.raises(AssertionError, match=r"feature 0's running var is 0.75"):
    testing.assert_running_stats_close(state, (mu, s2))
  testing.assert_running_stats_close(state, (mu, s2), tol=0.8)
  # A mean 0.5 deviations away (std 2 against a shift of 1): fails at 0.4, holds at 0.6.
  shifted = state._replace(mean=jnp.array([1.0, 0.0]), var=jnp.array([4.0, 1.0]))
  with pytest.raises(AssertionError, match=r"feature 0's running mean is 0.5 "):
    testing.assert_running_stats_close(shifted, (mu, s2), tol=0.4)
  testing.assert_running_stats_close(shifted, (mu, s2), tol=0.6)
  # A feature without spread in the population: equal is close, any difference is not.
  testing.assert_running_stats_close(state, (np.zeros(2), np.ones(2)), tol=0.0)
  with pytest.raises(AssertionError):
    testing.assert_running_stats_close(state, (np.array([0.0, 1e-3]), np.array([1.0, 0.0])))
  with pytest.raises(ValueError, match="population"):
    testing.assert_running_stats_close(state, (np.zeros(3), np.ones(3)))
  # A population that is not finite would hide every difference: an error, not a pass.
  with pytest.raises(ValueError, match="finite"):
    testing.assert_running_stats_close(state, (np.array([np.nan, 0.0]), np.ones(2)))
