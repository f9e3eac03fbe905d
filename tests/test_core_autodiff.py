"""Every JAX autodiff mode through bn_train, against a float64 plain-jnp reference.

The reference writes Algorithm 1 out with jnp (no custom derivative), so JAX's
own autodiff of it is the independent check of jaxbn's tangent rule and of
its transpose (the analytic backward).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jaxbn

EPS = 1e-5


def plain_bn(scale, bias, x, *, mask=None, ghost=None, renorm=None, ref=None, eps=EPS):
  """Algorithm 1 in plain jnp over every axis but the last (autodiff reference).

  ``ghost``: contiguous virtual batches of that size along axis 0; ``renorm``:
  ``(rmax, dmax)`` with the running ``ref = (mean, var)``, r and d under
  stop_gradient (Ioffe 2017).
  """
  if ghost is not None:
    xs = x.reshape(x.shape[0] // ghost, ghost, *x.shape[1:])
    ms = None if mask is None else mask.reshape(xs.shape[:2] + mask.shape[1:])
    ys = [
      plain_bn(scale, bias, xs[i], mask=None if ms is None else ms[i], eps=eps)
      for i in range(xs.shape[0])
    ]
    return jnp.concatenate(ys, 0)
  red = tuple(range(x.ndim - 1))
  c = (1,) * (x.ndim - 1) + (-1,)
  scale, bias = scale.reshape(c), bias.reshape(c)
  w = (
    jnp.ones(x.shape, x.dtype) if mask is None else jnp.broadcast_to(mask, x.shape).astype(x.dtype)
  )
  n = jnp.sum(w, red, keepdims=True)
  mu = jnp.sum(x * w, red, keepdims=True) / n
  var = jnp.sum(jnp.square(x - mu) * w, red, keepdims=True) / n
  xhat = (x - mu) / jnp.sqrt(var + eps)
  if renorm is None:
    return xhat * scale + bias
  rmax, dmax = renorm
  sigma = jnp.sqrt(ref[1].reshape(c) + eps)
  r = jax.lax.stop_gradient(jnp.clip(jnp.sqrt(var + eps) / sigma, 1 / rmax, rmax))
  d = jax.lax.stop_gradient(jnp.clip((mu - ref[0].reshape(c)) / sigma, -dmax, dmax))
  return (xhat * r + d) * scale + bias


CASES = {
  "plain": {},
  "masked": {"mask": True},
  "ghost": {"ghost": 3},
  "renorm": {"renorm": (1.2, 0.1)},  # r and d clipped: locally constant
}


def _setup(case, dtype=jnp.float64):
  k = jax.random.split(jax.random.key(0), 4)
  x = (jax.random.normal(k[0], (6, 2, 3), dtype) * 2 + 1).astype(dtype)
  scale = (1 + 0.3 * jax.random.normal(k[1], (3,))).astype(dtype)
  bias = (0.5 * jax.random.normal(k[2], (3,))).astype(dtype)
  _, state = jaxbn.bn_init(3, dtype=dtype)
  state = state._replace(
    mean=jnp.array([3.0, -2.0, 1.5], state.mean.dtype),
    var=jnp.array([9.0, 0.5, 25.0], state.var.dtype),
  )
  kw, ref_kw = {}, {}
  opts = CASES[case]
  if opts.get("mask"):
    # Whole examples out for two features, single values for the third.
    mask = jnp.array([True, False, True, True, True, False])[:, None, None]
    mask = mask & jnp.array([True, True, False])[None, None, :]
    mask = mask | (jnp.arange(6) % 2 == 0)[:, None, None] & (jnp.arange(3) == 2)[None, None, :]
    kw["mask"] = ref_kw["mask"] = mask
  if "ghost" in opts:
    kw["ghost_batch_size"] = ref_kw["ghost"] = opts["ghost"]
  if "renorm" in opts:
    kw["renorm"] = jaxbn.Renorm(*opts["renorm"])
    ref_kw["renorm"] = opts["renorm"]
    ref_kw["ref"] = (state.mean, state.var)

  def ours(scale, bias, x):
    return jaxbn.bn_train(jaxbn.BNParams(scale, bias), state, x, **kw)[0]

  def ref(scale, bias, x):
    return plain_bn(scale, bias, x, **ref_kw)

  return ours, ref, (scale, bias, x)


def _close(a, b, tol=1e-9):
  chex.assert_trees_all_close(a, b, rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_forward_modes_match_plain_autodiff(case):
  with jax.enable_x64(True):
    ours, ref, args = _setup(case)
    tangents = jax.tree.map(lambda a: jax.random.normal(jax.random.key(7), a.shape, a.dtype), args)
    _close(jax.jvp(ours, args, tangents), jax.jvp(ref, args, tangents))
    _close(jax.jacfwd(ours, (0, 1, 2))(*args), jax.jacfwd(ref, (0, 1, 2))(*args))
    y, lin = jax.linearize(ours, *args)
    y_ref, lin_ref = jax.linearize(ref, *args)
    _close((y, lin(*tangents)), (y_ref, lin_ref(*tangents)))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_reverse_and_second_order_match_plain_autodiff(case):
  with jax.enable_x64(True):
    ours, ref, args = _setup(case)
    ct = jax.random.normal(jax.random.key(8), args[2].shape, jnp.float64)

    def loss(f):
      return lambda s, b, x: jnp.sum(jnp.tanh(f(s, b, x)) * ct)

    _close(jax.grad(loss(ours), (0, 1, 2))(*args), jax.grad(loss(ref), (0, 1, 2))(*args))
    # Hessian in x (forward over reverse), and grad of grad in the params.
    _close(jax.hessian(loss(ours), 2)(*args), jax.hessian(loss(ref), 2)(*args), 1e-8)
    gg = lambda f: jax.grad(lambda s, b, x: jnp.sum(jax.grad(loss(f), 2)(s, b, x) ** 2), (0, 1))
    _close(gg(ours)(*args), gg(ref)(*args), 1e-8)
    # jvp of grad.
    v = jax.random.normal(jax.random.key(9), args[2].shape, jnp.float64)
    jg = lambda f: jax.jvp(lambda x: jax.grad(loss(f), 2)(*args[:2], x), (args[2],), (v,))
    _close(jg(ours), jg(ref), 1e-8)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_check_grads_second_order_both_modes(case):
  with jax.enable_x64(True):
    ours, _, args = _setup(case)
    check_grads(ours, args, order=2, modes=("fwd", "rev"), eps=1e-4)


@pytest.mark.slow
def test_maml_inner_step_matches_plain_autodiff():
  """Meta-gradient through one SGD step on the batch-norm parameters."""
  with jax.enable_x64(True):
    ours, ref, (scale, bias, x) = _setup("plain")
    target = jnp.sin(x)

    def meta_loss(f):
      def inner(params):
        return jnp.mean((f(*params, x) - target) ** 2)

      def outer(params):
        adapted = jax.tree.map(lambda p, g: p - 0.1 * g, params, jax.grad(inner)(params))
        return inner(adapted)

      return jax.grad(outer)

    _close(meta_loss(ours)((scale, bias)), meta_loss(ref)((scale, bias)), 1e-8)


@pytest.mark.slow
def test_vmap_axis_name_jvp_and_hessian_equal_the_whole_batch():
  """Per-example calls merged by axis_name: the psum's tangent and transpose."""
  with jax.enable_x64(True):
    _ours, _, (scale, bias, x) = _setup("plain")
    _, state = jaxbn.bn_init(3, dtype=jnp.float64)
    params = jaxbn.BNParams(scale, bias)
    per_example = jax.vmap(
      lambda x: jaxbn.bn_train(params, state, x, axis_name="b")[0], axis_name="b"
    )
    whole = lambda x: jaxbn.bn_train(params, state, x)[0]
    v = jax.random.normal(jax.random.key(3), x.shape, jnp.float64)
    _close(jax.jvp(per_example, (x,), (v,)), jax.jvp(whole, (x,), (v,)))
    f = lambda g: lambda x: jnp.sum(jnp.tanh(g(x)))
    _close(jax.hessian(f(per_example))(x), jax.hessian(f(whole))(x), 1e-8)


def _mesh2d():
  return Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))


def test_shard_map_per_device_statistics_with_gradients():
  """No axis_name under shard_map: each device normalizes its own shard."""
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  params, state = jaxbn.bn_init(3)
  x = jax.random.normal(jax.random.key(0), (16, 3)) * 2 + 1
  ct = jax.random.normal(jax.random.key(1), x.shape)

  def loss(p, x, c):
    y, new = jaxbn.bn_train(p, state, x)
    return jnp.sum(y * c), new.mean

  def sharded(p, x, c):
    (value, mean), (gp, gx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(p, x, c)
    return jax.lax.psum(value, "data"), mean[None], gp, gx

  f = jax.jit(
    jax.shard_map(
      sharded,
      mesh=mesh,
      in_specs=(P(), P("data"), P("data")),
      out_specs=(P(), P("data"), P(), P("data")),
    )
  )
  total, means, gp, gx = f(params, x, ct)
  grad = jax.value_and_grad(loss, (0, 1), has_aux=True)
  shards = [grad(params, x[i : i + 4], ct[i : i + 4]) for i in range(0, 16, 4)]
  np.testing.assert_allclose(total, sum(s[0][0] for s in shards), rtol=1e-5)
  np.testing.assert_allclose(means, np.stack([s[0][1] for s in shards]), rtol=1e-6)
  # The replicated parameters' gradient sums over devices, as autodiff would.
  chex.assert_trees_all_close(
    gp, jax.tree.map(lambda *g: sum(g), *[s[1][0] for s in shards]), rtol=1e-5, atol=1e-5
  )
  np.testing.assert_allclose(gx, np.concatenate([s[1][1] for s in shards]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_shard_map_2d_mesh_statistics_over_one_axis():
  """x split over 'data' and 'model'; statistics synchronized over 'data' only."""
  mesh = _mesh2d()
  params, state = jaxbn.bn_init(3)
  x = jax.random.normal(jax.random.key(0), (8, 2, 3)) * 2 + 1  # (batch, group, C)
  ct = jax.random.normal(jax.random.key(1), x.shape)

  def loss(p, x, c):
    y, new = jaxbn.bn_train(p, state, x, axis_name="data")
    return jnp.sum(y * c), new.var

  def sharded(p, x, c):
    (value, var), (gp, gx) = jax.value_and_grad(loss, (0, 1), has_aux=True)(p, x, c)
    return jax.lax.psum(value, ("data", "model")), var[None], gp, gx

  f = jax.jit(
    jax.shard_map(
      sharded,
      mesh=mesh,
      in_specs=(P(), P("data", "model"), P("data", "model")),
      out_specs=(P(), P("model"), P(), P("data", "model")),
    )
  )
  total, var, gp, gx = f(params, x, ct)

  # Reference: each 'model' column is one batch norm over the whole batch.
  def loss_ref(p, x, c):
    y, new = jaxbn.bn_train(p, state, x)
    return jnp.sum(y * c), new.var

  grad_ref = jax.value_and_grad(loss_ref, (0, 1), has_aux=True)
  cols = [grad_ref(params, x[:, j : j + 1], ct[:, j : j + 1]) for j in range(2)]
  np.testing.assert_allclose(total, sum(c[0][0] for c in cols), rtol=1e-5)
  np.testing.assert_allclose(var, np.stack([c[0][1] for c in cols]), rtol=1e-5)
  chex.assert_trees_all_close(
    gp, jax.tree.map(lambda *g: sum(g), *[c[1][0] for c in cols]), rtol=1e-4, atol=1e-4
  )
  np.testing.assert_allclose(gx, np.concatenate([c[1][1] for c in cols], 1), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_float32_training_step_with_optax_under_forward_mode():
  """jacfwd of a whole optax step runs (forward mode composes with the update)."""
  params, state = jaxbn.bn_init(3)
  x = jax.random.normal(jax.random.key(0), (8, 3))
  tx = optax.sgd(0.1)

  def step(p):
    g = jax.grad(lambda p: jnp.sum(jnp.sin(jaxbn.bn_train(p, state, x)[0])))(p)
    updates, _ = tx.update(g, tx.init(p), p)
    return optax.apply_updates(p, updates)

  jac = jax.jacfwd(step)(params)
  chex.assert_tree_all_finite(jac)
  up = step(params._replace(scale=params.scale.at[0].add(1e-2))).scale
  down = step(params._replace(scale=params.scale.at[0].add(-1e-2))).scale
  fd = (up - down) / 2e-2
  np.testing.assert_allclose(jac.scale.scale[:, 0], fd, rtol=2e-2, atol=2e-3)
