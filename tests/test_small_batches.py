"""Small batches: batch renormalization and ghost batches, as the benchmark uses them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import data
from jaxbn import engine
from jaxbn import models
from jaxbn.reproduce import small_batches
from tests.reference import bn_train_ref

pytestmark = pytest.mark.slow  # end-to-end: the full suite runs it, -m 'not slow' skips it

EPS = 1e-5


def _setup(n=8, c=3, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, c)) * 2 + 1, jnp.float32)
  params, state = jaxbn.bn_init(c)
  params = params._replace(scale=jnp.linspace(0.5, 1.5, c), bias=jnp.linspace(-0.2, 0.2, c))
  state = state._replace(mean=jnp.linspace(-1.0, 1.0, c), var=jnp.linspace(0.5, 3.0, c))
  return params, state, x


def _loss(params, state, x, **kw):
  y, new = jaxbn.bn_train(params, state, x, **kw)
  return jnp.sum(y * jnp.cos(x)), (y, new)


def test_scaled_schedule_ramps_over_the_budget():
  renorm = small_batches.scaled_renorm(1000)
  at = lambda f, t: float(f(jnp.int32(t)))
  assert at(renorm.rmax, 0) == 1.0 and at(renorm.dmax, 0) == 0.0
  assert at(renorm.rmax, 50) == 1.0 and at(renorm.dmax, 50) == 0.0  # 5%: plain BN
  np.testing.assert_allclose(at(renorm.rmax, 400), 3.0)
  np.testing.assert_allclose(at(renorm.dmax, 250), 5.0)
  np.testing.assert_allclose(at(renorm.rmax, 225), 1.0 + 2.0 * 175 / 350, rtol=1e-6)


def test_renorm_at_the_start_of_the_schedule_is_plain_batch_norm():
  params, state, x = _setup()
  renorm = small_batches.scaled_renorm(1000)
  (_, (y_r, s_r)), g_r = jax.value_and_grad(_loss, argnums=(0, 2), has_aux=True)(
    params, state, x, renorm=renorm
  )
  (_, (y_p, s_p)), g_p = jax.value_and_grad(_loss, argnums=(0, 2), has_aux=True)(params, state, x)
  np.testing.assert_allclose(y_r, y_p, rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves((s_r, g_r)), jax.tree.leaves((s_p, g_p)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_renorm_at_the_end_of_the_schedule_corrects_toward_the_running_statistics():
  params, state, x = _setup(n=2)  # batch of 2: the statistics the lecture says are lost
  state = state._replace(step=jnp.int32(1000))
  y, _ = jaxbn.bn_train(params, state, x, renorm=small_batches.scaled_renorm(1000))
  xd = np.asarray(x, np.float64)
  mu, var = xd.mean(0), xd.var(0)
  sigma = np.sqrt(np.asarray(state.var, np.float64) + EPS)
  r = np.clip(np.sqrt(var + EPS) / sigma, 1 / 3.0, 3.0)
  d = np.clip((mu - np.asarray(state.mean, np.float64)) / sigma, -5.0, 5.0)
  xhat = (xd - mu) / np.sqrt(var + EPS)
  want = np.asarray(params.scale) * (xhat * r + d) + np.asarray(params.bias)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  plain, _ = jaxbn.bn_train(params, state, x)
  assert not np.allclose(y, plain, atol=1e-3)  # the correction is active


def test_ghost_batches_of_2_are_batch_norm_of_each_pair():
  params, state, x = _setup(n=8)
  y, new = jaxbn.bn_train(params, state, x, ghost_batch_size=2)
  for i in range(0, 8, 2):
    want, _, _ = bn_train_ref(x[i : i + 2], params.scale, params.bias, state.mean, state.var)
    np.testing.assert_allclose(y[i : i + 2], want, rtol=1e-5, atol=1e-5)
  # The running statistics see the whole batch of 8, as plain batch norm does.
  _, want_mean, want_var = bn_train_ref(x, params.scale, params.bias, state.mean, state.var)
  np.testing.assert_allclose(new.mean, want_mean, rtol=1e-6)
  np.testing.assert_allclose(new.var, want_var, rtol=1e-6)


def test_ghost_batches_leave_inference_unchanged():
  params, state, x = _setup(n=32)
  _, s_ghost = jaxbn.bn_train(params, state, x, ghost_batch_size=4)
  _, s_plain = jaxbn.bn_train(params, state, x)
  # Two computations (per-ghost-batch moments merged, one whole-batch
  # moment) of the same statistics: equal to float32 rounding, not bit for bit.
  eps = np.finfo(np.float32).eps
  for a, b in zip(s_ghost, s_plain, strict=True):
    np.testing.assert_allclose(a, b, rtol=8 * eps)
  # Statistics 8 ulps apart move (x - mean) / sqrt(var + eps) by a few ulps of |y|.
  np.testing.assert_allclose(
    jaxbn.bn_infer(params, s_ghost, x),
    jaxbn.bn_infer(params, s_plain, x),
    rtol=32 * eps,
    atol=32 * eps,
  )


def test_ghost_size_that_does_not_divide_the_batch_is_an_error():
  params, state, x = _setup(n=6)
  with pytest.raises(ValueError, match="ghost_batch_size=4 does not divide the batch of 6"):
    jaxbn.bn_train(params, state, x, ghost_batch_size=4)


def test_every_configuration_sees_the_same_examples():
  n_train, epochs = 1347, 6
  rows = list(small_batches.configurations(epochs, n_train))
  assert {(label, g) for label, g, _, _ in rows} >= {
    (m, g) for m in ("plain", "renorm", "ghost") for g in (2, 4, 8)
  }
  for label, g, batch, bn in rows:
    examples = epochs * (n_train // batch) * batch
    assert n_train * epochs - epochs * batch < examples <= n_train * epochs
    if label == "ghost":
      assert bn["ghost_batch_size"] == g and batch % g == 0 and batch > g
    if label == "renorm":
      steps = epochs * (n_train // g)
      assert float(bn["renorm"].rmax(jnp.int32(steps))) == 3.0


def test_a_short_renorm_run_at_batch_2_learns_and_counts_its_steps():
  ds = data.load_digits().flat()
  ds = ds._replace(x_train=ds.x_train[:400], y_train=ds.y_train[:400])
  renorm = small_batches.scaled_renorm(200)
  bn = jaxbn.BNOptions(momentum=0.99, renorm=renorm)
  apply = functools.partial(models.apply_mlp, bn_options=bn)
  params, states = models.init_mlp(jax.random.key(0), ds.x_train.shape[1])
  trained = engine.train(
    apply, params, states, ds.x_train, ds.y_train, steps=200, batch_size=2, learning_rate=0.3
  )
  params, states = trained.params, trained.state
  assert all(int(s.step) == 200 for s in states)
  assert all(bool(jnp.all(jnp.isfinite(s.var))) for s in states)
  logits, _ = models.apply_mlp(params, states, ds.x_test, train=False)
  acc = float(engine.accuracy(logits, ds.y_test))
  assert acc > 0.3  # chance is 0.1; 200 steps of batch 2
