"""jaxbn's modules under flax's transforms, each against flax's BatchNorm in the same program.

scan over layers and remat (linen and nnx), an nnx.vmap ensemble and
nnx.eval_shape: the same model is built once with ``flax.linen.BatchNorm`` /
``flax.nnx.BatchNorm`` (two-pass variance) and once with jaxbn's, from the same
keys, and the outputs, the updated running statistics and the gradients must
agree.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
from jaxbn import linen as jbn_linen
from jaxbn import nnx as jbn_nnx

pytestmark = pytest.mark.slow  # end-to-end: the full suite runs it, -m 'not slow' skips it

LAYERS = 3
WIDTH = 6
BATCH = 16
ENSEMBLE = 4
TOL = dict(rtol=1e-5, atol=1e-5)
SAVE_STATS = jax.checkpoint_policies.save_only_these_names(*jaxbn.checkpoint_names)

LINEN = {
  "flax": functools.partial(nn.BatchNorm, use_fast_variance=False),
  "jaxbn": jbn_linen.BatchNorm,
}
NNX = {
  "flax": functools.partial(nnx.BatchNorm, use_fast_variance=False),
  "jaxbn": jbn_nnx.BatchNorm,
}


def _x(seed=0, shape=(BATCH, WIDTH)):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=shape) * 2 + 3, jnp.float32)


def _close(a, b):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **TOL), a, b)


# --------------------------------------------------------------------------
# linen


class _LinenBlock(nn.Module):
  bn: type

  @nn.compact
  def __call__(self, x, _=None):
    x = nn.Dense(WIDTH)(x)
    x = self.bn(use_running_average=False, momentum=0.9)(x)
    return jnp.tanh(x), None


class _LinenScan(nn.Module):
  bn: type
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    block = nn.remat(_LinenBlock, policy=SAVE_STATS) if self.remat else _LinenBlock
    stack = nn.scan(
      block,
      variable_axes={"params": 0, "batch_stats": 0},
      split_rngs={"params": True},
      length=LAYERS,
    )
    x, _ = stack(bn=self.bn)(x)
    return x


def _linen_run(model, x):
  variables = model.init(jax.random.key(0), x)

  def loss(params):
    y, upd = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
    )
    return jnp.sum(jnp.square(y - 0.3)), (y, upd["batch_stats"])

  grads, (y, stats) = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  return y, stats, grads


@pytest.mark.parametrize("remat", [False, True], ids=["scan", "scan+remat"])
def test_linen_scan_over_layers(remat):
  x = _x()
  want = _linen_run(_LinenScan(bn=LINEN["flax"], remat=remat), x)
  got = _linen_run(_LinenScan(bn=LINEN["jaxbn"], remat=remat), x)
  _close(got[0], want[0])
  _close(got[1], want[1])  # stacked (LAYERS, WIDTH) mean and var
  _close(got[2], want[2])
  # One (LAYERS, WIDTH) mean and var: each layer its own statistics.
  assert {leaf.shape for leaf in jax.tree.leaves(got[1])} == {(LAYERS, WIDTH)}


def test_linen_remat():
  class Net(nn.Module):
    bn: type

    @nn.compact
    def __call__(self, x):
      for _ in range(2):
        x, _ = nn.remat(_LinenBlock, policy=SAVE_STATS)(bn=self.bn)(x)
      return x

  x = _x(1)
  want = _linen_run(Net(bn=LINEN["flax"]), x)
  got = _linen_run(Net(bn=LINEN["jaxbn"]), x)
  for g, w in zip(got, want, strict=True):
    _close(g, w)


# --------------------------------------------------------------------------
# nnx


class _NnxBlock(nnx.Module):
  def __init__(self, bn, rngs: nnx.Rngs):
    self.linear = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    self.bn = bn(WIDTH, momentum=0.9, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.bn(self.linear(x)))


def _stacked(bn, n):
  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(rngs):
    return _NnxBlock(bn, rngs)

  return create(nnx.Rngs(0))


def _nnx_grads(model, forward, x):
  def loss(model):
    return jnp.sum(jnp.square(forward(model, x) - 0.3))

  return nnx.grad(loss)(model)


def _nnx_compare(make, forward, x):
  """Outputs, running statistics and gradients of jaxbn's model against flax's."""
  results = {}
  for name, bn in NNX.items():
    model = make(bn)
    grads = _nnx_grads(model, forward, x)  # training: updates the statistics
    y = forward(model, x)  # a second step, from the updated statistics
    results[name] = (y, model, grads)
  (y_f, m_f, g_f), (y_j, m_j, g_j) = results["flax"], results["jaxbn"]
  _close(y_j, y_f)
  _close((m_j.bn.mean[...], m_j.bn.var[...]), (m_f.bn.mean[...], m_f.bn.var[...]))
  _close(
    nnx.to_pure_dict(nnx.state(g_j, nnx.Param)),
    nnx.to_pure_dict(nnx.state(g_f, nnx.Param)),
  )
  return m_j


def test_nnx_scan_over_stacked_layers():
  @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
  def through(block, x):
    return block(x)

  model = _nnx_compare(lambda bn: _stacked(bn, LAYERS), lambda m, x: through(m, x), _x(2))
  assert model.bn.mean[...].shape == (LAYERS, WIDTH)
  assert not np.allclose(model.bn.mean[...][0], model.bn.mean[...][1])  # each layer its own


def test_nnx_remat():
  forward = nnx.remat(lambda m, x: m(x), policy=SAVE_STATS)
  _nnx_compare(lambda bn: _NnxBlock(bn, nnx.Rngs(0)), forward, _x(3))


def test_nnx_vmap_ensemble():
  """ENSEMBLE members on the same batch; each normalizes with its own statistics."""

  @nnx.vmap(in_axes=(0, None), out_axes=0)
  def forward(member, x):
    return member(x)

  model = _nnx_compare(lambda bn: _stacked(bn, ENSEMBLE), forward, _x(4))
  assert model.bn.mean[...].shape == (ENSEMBLE, WIDTH)


def test_nnx_eval_shape():
  shapes = {
    name: nnx.state(nnx.eval_shape(lambda bn=bn: _NnxBlock(bn, nnx.Rngs(0))))
    for name, bn in NNX.items()
  }
  flat = {
    name: {
      jax.tree_util.keystr(p): (v.shape, v.dtype)
      for p, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(s))
    }
    for name, s in shapes.items()
  }
  assert flat["jaxbn"] == flat["flax"]
  assert all(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(shapes["jaxbn"]))
