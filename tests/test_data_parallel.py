"""Data-parallel steps in one process over 8 devices.

data_parallel_train_step (jit on sharded arrays, the model written for one
device) against train_step on one device; shard_map_train_step for models that
name the mesh axis and for flax's per-device statistics. The reference for
per-device statistics is computed without any mesh: the model applied to each
device's shard on its own, the loss averaged over shards, and the running
statistics averaged over shards.
"""

import functools
import warnings

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import jaxbn
from jaxbn import linen as jbn_linen
from jaxbn import models
from jaxbn import training

pytestmark = pytest.mark.slow  # end-to-end: the full suite runs it, -m 'not slow' skips it

N_DEVICES = 8


class _Net(nn.Module):
  """Dense -> BatchNorm -> relu -> Dense, with the batch norm class as a field."""

  bn: type = nn.BatchNorm
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(6, use_bias=False)(x)
    x = self.bn(use_running_average=not train, momentum=0.8, axis_name=self.axis_name)(x)
    return nn.Dense(3)(nn.relu(x))


def _data(n=64, d=5, seed=0):
  rng = np.random.default_rng(seed)
  # Shards with different means and spreads, so per-device statistics differ
  # clearly from the global ones.
  shift = np.repeat(rng.normal(size=(N_DEVICES, d)) * 2, n // N_DEVICES, axis=0)
  x = (rng.normal(size=(n, d)) * rng.uniform(0.5, 2, size=(n, 1)) + shift).astype(np.float32)
  y = rng.integers(0, 3, n).astype(np.int32)
  return x, y


@jax.jit
def _per_device_loss(params, state, xs, ys):
  """Mean loss of the model applied to each shard alone, and the mean new statistics."""
  losses, stats = [], []
  for x, y in zip(xs, ys, strict=True):
    variables = {"params": params, "batch_stats": state.batch_stats}
    logits, upd = state.apply_fn(variables, x, train=True, mutable=["batch_stats"])
    losses.append(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
    stats.append(upd["batch_stats"])
  mean_stats = jax.tree.map(lambda *s: sum(s) / len(s), *stats)
  return sum(losses) / len(losses), mean_stats


def _per_device_reference_step(state, batch):
  """One step of per-device batch norm: shard-wise forward, mean loss, mean statistics."""
  xs, ys = (np.split(a, N_DEVICES) for a in batch)
  grad_fn = jax.value_and_grad(_per_device_loss, has_aux=True)
  (loss, stats), grads = grad_fn(state.params, state, xs, ys)
  return state.apply_gradients(grads=grads, batch_stats=stats), loss


def _assert_trees_close(a, b, **tol):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **tol), a, b)


def test_default_mesh_spans_every_device():
  mesh = training.data_parallel_mesh()
  assert list(mesh.devices.flat) == jax.devices()
  assert mesh.size == jax.device_count() == N_DEVICES


# The jaxbn case needs the kernel's backward to accept per-device (varying)
# values under shard_map; the flax case checks the step's own logic.
@pytest.mark.parametrize("bn", [nn.BatchNorm, jbn_linen.BatchNorm], ids=["flax", "jaxbn"])
def test_without_axis_name_trains_with_per_device_statistics(bn):
  x, y = _data()
  model = _Net(bn=bn)
  state = training.create_train_state(model, optax.sgd(0.3), x[:1], key=1)
  reference = state
  step = training.shard_map_train_step(training.data_parallel_mesh())
  with pytest.warns(UserWarning, match="axis_name='batch'"):
    state, metrics = step(state, (x, y))
  reference, loss = _per_device_reference_step(reference, (x, y))
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  for t in range(2):
    batch = (x[::-1], y[::-1]) if t % 2 == 0 else (x, y)
    state, metrics = step(state, batch)
    reference, loss = _per_device_reference_step(reference, batch)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  _assert_trees_close(state.params, reference.params, rtol=1e-5, atol=1e-6)
  _assert_trees_close(state.batch_stats, reference.batch_stats, rtol=1e-5, atol=1e-6)
  # The data make per-device statistics clearly differ from the global batch's.
  synced = training.create_train_state(_Net(bn=bn), optax.sgd(0.3), x[:1], key=1)
  for batch in [(x, y), (x[::-1], y[::-1]), (x, y)]:
    synced, _ = training.train_step(synced, batch)
  gap = np.abs(state.batch_stats["BatchNorm_0"]["var"] - synced.batch_stats["BatchNorm_0"]["var"])
  assert gap.max() > 0.1


@pytest.mark.parametrize("bn", [nn.BatchNorm, jbn_linen.BatchNorm], ids=["flax", "jaxbn"])
def test_with_axis_name_no_warning_and_global_statistics(bn):
  x, y = _data()
  single = training.create_train_state(_Net(bn=bn), optax.sgd(0.3), x[:1], key=1)
  parallel = single.replace(apply_fn=_Net(bn=bn, axis_name="batch").apply)
  step = training.shard_map_train_step(training.data_parallel_mesh())
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    parallel, m_parallel = step(parallel, (x, y))
  single, m_single = training.train_step(single, (x, y))
  np.testing.assert_allclose(m_parallel["loss"], m_single["loss"], rtol=1e-5)
  _assert_trees_close(parallel.params, single.params, rtol=1e-5, atol=1e-6)
  _assert_trees_close(parallel.batch_stats, single.batch_stats, rtol=1e-5, atol=1e-6)


def test_per_device_running_statistics_are_replicated_means():
  """models.MLP without axis_name: running mean and variance against NumPy.

  With momentum 0 the running mean is the global batch mean (equal shards) and
  the running variance the mean of the shards' variances.
  """
  x, y = _data()
  model = models.MLP(features=(5,), num_classes=3, bn_options=jaxbn.BNOptions(momentum=0.0))
  state = training.create_train_state(model, optax.sgd(0.0), x[:1])
  step = training.shard_map_train_step(training.data_parallel_mesh())
  with pytest.warns(UserWarning, match="axis_name"):
    state, _ = step(state, (x, y))
  h = np.asarray(x @ state.params["Dense_0"]["kernel"], np.float64)
  shards = np.split(h, N_DEVICES)
  stats = state.batch_stats["BatchNorm_0"]
  np.testing.assert_allclose(stats["mean"], h.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    stats["var"], np.mean([s.var(0) for s in shards], axis=0), rtol=1e-5, atol=1e-6
  )
  assert np.all(np.mean([s.var(0) for s in shards], axis=0) < h.var(0) * 0.9)
  assert stats["mean"].sharding.is_fully_replicated


def _mesh(axis_type):
  return jax.make_mesh((N_DEVICES,), ("batch",), axis_types=(axis_type,))


def _run_both(bn, mesh, steps=3, ghost=None):
  x, y = _data()
  model = _Net(bn=bn if ghost is None else functools.partial(bn, ghost_batch_size=ghost))
  single = training.create_train_state(model, optax.sgd(0.3), x[:1], key=1)
  parallel = single
  step = training.data_parallel_train_step(mesh)
  for t in range(steps):
    batch = (x[::-1], y[::-1]) if t % 2 else (x, y)
    single, m_single = training.train_step(single, batch)
    parallel, m_parallel = step(parallel, batch)
    np.testing.assert_allclose(m_parallel["loss"], m_single["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_parallel["accuracy"], m_single["accuracy"])
  return single, parallel


_AUTO = jax.sharding.AxisType.Auto
_EXPLICIT = jax.sharding.AxisType.Explicit


@pytest.mark.parametrize(
  "bn, axis_type",
  [
    (nn.BatchNorm, _AUTO),
    (jbn_linen.BatchNorm, _AUTO),
    (nn.BatchNorm, _EXPLICIT),
    (jbn_linen.BatchNorm, _EXPLICIT),
  ],
  ids=["flax-auto", "jaxbn-auto", "flax-explicit", "jaxbn-explicit"],
)
def test_sharded_jit_step_equals_single_device_step(bn, axis_type):
  """The model written for one device, its batch sharded over 8: the same training."""
  single, parallel = _run_both(bn, _mesh(axis_type))
  _assert_trees_close(parallel.params, single.params, rtol=1e-5, atol=1e-6)
  _assert_trees_close(parallel.batch_stats, single.batch_stats, rtol=1e-5, atol=1e-6)
  leaf = parallel.batch_stats["BatchNorm_0"]["mean"]
  assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == N_DEVICES


def test_global_batch_is_sharded_over_the_mesh():
  mesh = training.data_parallel_mesh()
  x, y = _data()
  gx, gy = training.global_batch((x, y), mesh)
  assert gx.sharding == jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
  assert [s.data.shape for s in gx.addressable_shards] == [(len(x) // N_DEVICES, x.shape[1])] * 8
  np.testing.assert_array_equal(gx, x)
  np.testing.assert_array_equal(gy, y)


def test_sharded_jit_step_rejects_a_model_that_names_the_axis():
  x, y = _data()
  state = training.create_train_state(
    _Net(bn=jbn_linen.BatchNorm, axis_name="batch"), optax.sgd(0.1), x[:1]
  )
  step = training.data_parallel_train_step(training.data_parallel_mesh())
  with pytest.raises(ValueError, match="shard_map_train_step"):
    step(state, (x, y))


def test_ghost_batch_per_device_statistics_under_jit():
  """ghost_batch_size = per-device batch: each device's rows normalized by their statistics.

  The loss and the parameters are those of the model applied to each shard on
  its own (per-device statistics, as under shard_map without axis_name); the
  running statistics are the global batch's (the merged ghost batches).
  """
  x, y = _data()
  per_device = len(x) // N_DEVICES
  model = _Net(bn=functools.partial(jbn_linen.BatchNorm, ghost_batch_size=per_device))
  state = training.create_train_state(model, optax.sgd(0.3), x[:1], key=1)
  reference = training.create_train_state(
    _Net(bn=jbn_linen.BatchNorm), optax.sgd(0.3), x[:1], key=1
  )
  step = training.data_parallel_train_step(training.data_parallel_mesh())
  h = np.asarray(x, np.float64) @ np.asarray(state.params["Dense_0"]["kernel"], np.float64)
  state, metrics = step(state, (x, y))
  reference, loss = _per_device_reference_step(reference, (x, y))
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  _assert_trees_close(state.params, reference.params, rtol=1e-5, atol=1e-6)
  stats = state.batch_stats["BatchNorm_0"]
  np.testing.assert_allclose(stats["mean"], 0.2 * h.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.8 + 0.2 * h.var(0), rtol=1e-5, atol=1e-6)


class _Identity(nn.Module):
  use_running_average: bool = False
  momentum: float = 0.8
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x):
    return x


def _all_reduces(bn, update_batch_stats=True):
  x, y = _data()
  mesh = training.data_parallel_mesh()
  state = training.create_train_state(_Net(bn=bn), optax.sgd(0.3), x[:1], key=1)
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = jax.device_put(state, rep)
  batch = training.global_batch((x, y), mesh)
  step = jax.jit(functools.partial(training.train_step, update_batch_stats=update_batch_stats))
  text = step.lower(state, batch).compile().as_text()
  return sum(
    1 for line in text.splitlines() if " all-reduce(" in line or " all-reduce-start(" in line
  )


def test_ghost_batch_per_device_statistics_need_no_all_reduce():
  """Normalizing by per-device statistics adds no all-reduce over an identity-norm model.

  With the running statistics kept (update_batch_stats=False) the compiled
  step has exactly the identity model's all-reduces (the gradients' and the
  loss's); the synchronized model, the baseline, has more.
  """
  per_device = len(_data()[0]) // N_DEVICES
  ghost = functools.partial(jbn_linen.BatchNorm, ghost_batch_size=per_device)
  identity = _all_reduces(_Identity)
  assert _all_reduces(ghost, update_batch_stats=False) == identity
  assert _all_reduces(jbn_linen.BatchNorm, update_batch_stats=False) > identity
