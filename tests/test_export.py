"""jax.export: train steps exported, serialized, deserialized and run; symbolic batch sizes.

Each exported step is checked against the direct call and against the float64
NumPy reference of Algorithm 1 (tests/reference.py), gradient included.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import export

import jaxbn
from jaxbn import linen as jbn_linen
from tests.reference import bn_train_ref

C = 8
MOMENTUM = 0.9
EPS = 1e-5


def _bn_step(params, state, x, g):
  """bn_train forward, new state and the gradient of ``sum(y * g)`` for params and x."""

  def loss(params, x):
    y, new_state = jaxbn.bn_train(params, state, x, momentum=MOMENTUM, epsilon=EPS)
    return jnp.sum(y * g), (y, new_state)

  (_, (y, new_state)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
  return y, new_state, grads


def _inputs(n, seed=0):
  rng = np.random.default_rng(seed)
  params = jaxbn.BNParams(
    scale=jnp.asarray(rng.uniform(0.5, 2, C), jnp.float32),
    bias=jnp.asarray(rng.normal(size=C), jnp.float32),
  )
  _, state = jaxbn.bn_init(C)
  state = state._replace(mean=jnp.asarray(rng.normal(size=C), jnp.float32))
  x = jnp.asarray(rng.normal(size=(n, C)) * 3 + 2, jnp.float32)
  g = jnp.asarray(rng.normal(size=(n, C)), jnp.float32)
  return params, state, x, g


def _reference(params, state, x, g):
  """float64: y, new mean and var (Algorithm 1) and the analytic gradients of sum(y * g)."""
  x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
  scale = np.asarray(params.scale, np.float64)
  y, mean, var = bn_train_ref(
    x64, params.scale, params.bias, state.mean, state.var, momentum=MOMENTUM, epsilon=EPS
  )
  r = 1 / np.sqrt(x64.var(0) + EPS)
  xhat = (x64 - x64.mean(0)) * r
  dx = scale * r * (g64 - g64.mean(0) - xhat * (g64 * xhat).mean(0))
  return y, mean, var, (g64 * xhat).sum(0), g64.sum(0), dx


def _check_bn_step(out, inputs):
  y, new_state, (dparams, dx) = out
  want = _reference(*inputs)
  got = (y, new_state.mean, new_state.var, dparams.scale, dparams.bias, dx)
  for name, a, b in zip(("y", "mean", "var", "dscale", "dbias", "dx"), got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5, err_msg=name)


def _roundtrip(exported):
  blob = exported.serialize()
  assert isinstance(blob, (bytes, bytearray)) and len(blob) > 0
  return export.deserialize(blob)


def _assert_trees_equal(a, b, rtol=1e-6, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


def test_bn_train_step_exported_serialized_and_run():
  inputs = _inputs(16)
  step = jax.jit(_bn_step)
  exported = export.export(step)(*inputs)
  restored = _roundtrip(exported)
  out = restored.call(*inputs)
  _assert_trees_equal(out, step(*inputs))
  _check_bn_step(out, inputs)
  # The pytree of BNParams / BNState comes back, not plain tuples.
  assert isinstance(out[1], jaxbn.BNState) and isinstance(out[2][0], jaxbn.BNParams)


def test_bn_train_step_with_symbolic_batch_size():
  (b,) = export.symbolic_shape("b")
  params, state, _, _ = _inputs(4)
  spec = jax.ShapeDtypeStruct((b, C), jnp.float32)
  exported = export.export(jax.jit(_bn_step))(params, state, spec, spec)
  assert exported.in_avals[-2].shape == (b, C)  # x (then g) among the flat arguments
  restored = _roundtrip(exported)
  for n in (5, 32):
    inputs = _inputs(n, seed=n)
    out = restored.call(*inputs)
    _assert_trees_equal(out, jax.jit(_bn_step)(*inputs))
    _check_bn_step(out, inputs)


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(C, use_bias=False)(x)
    x = jbn_linen.BatchNorm(use_running_average=not train, momentum=MOMENTUM)(x)
    return nn.Dense(3)(nn.relu(x))


def _linen_step(variables, x, y):
  """Loss, gradient and new batch statistics of the mean squared error to ``y``."""

  def loss(params):
    out, upd = _Net().apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      x,
      train=True,
      mutable=["batch_stats"],
    )
    return jnp.mean((out - y) ** 2), upd["batch_stats"]

  (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
  return value, grads, stats


def _linen_inputs(n, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, 5)) + 1, jnp.float32)
  y = jnp.asarray(rng.normal(size=(n, 3)), jnp.float32)
  variables = _Net().init(jax.random.key(0), x[:2], train=False)
  return variables, x, y


def _check_linen_step(out, variables, x, y):
  """Against the NumPy reference of the same network (float64)."""
  value, grads, stats = out
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  h = np.asarray(x, np.float64) @ p["Dense_0"]["kernel"]
  bn = p["BatchNorm_0"]
  old = variables["batch_stats"]["BatchNorm_0"]
  z, mean, var = bn_train_ref(
    h, bn["scale"], bn["bias"], old["mean"], old["var"], momentum=MOMENTUM, epsilon=EPS
  )
  out = np.maximum(z, 0) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
  np.testing.assert_allclose(value, np.mean((out - np.asarray(y)) ** 2), rtol=1e-5)
  np.testing.assert_allclose(stats["BatchNorm_0"]["mean"], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["BatchNorm_0"]["var"], var, rtol=1e-5, atol=1e-6)
  # The head's gradient: d mean((out - y)^2) / d bias = 2 sum_n(out - y) / out.size.
  np.testing.assert_allclose(
    grads["Dense_1"]["bias"], 2 * np.sum(out - np.asarray(y), 0) / out.size, rtol=1e-4, atol=1e-6
  )


def test_linen_train_step_exported_serialized_and_run():
  variables, x, y = _linen_inputs(16)
  step = jax.jit(_linen_step)
  restored = _roundtrip(export.export(step)(variables, x, y))
  out = restored.call(variables, x, y)
  _assert_trees_equal(out, step(variables, x, y))
  _check_linen_step(out, variables, x, y)


def test_linen_train_step_with_symbolic_batch_size():
  variables, _, _ = _linen_inputs(4)
  b, d, k = export.symbolic_shape("b, 5, 3")
  exported = export.export(jax.jit(_linen_step))(
    variables, jax.ShapeDtypeStruct((b, d), jnp.float32), jax.ShapeDtypeStruct((b, k), jnp.float32)
  )
  restored = _roundtrip(exported)
  for n in (3, 64):
    _, x, y = _linen_inputs(n, seed=n)
    out = restored.call(variables, x, y)
    _assert_trees_equal(out, jax.jit(_linen_step)(variables, x, y), rtol=1e-5)
    _check_linen_step(out, variables, x, y)
