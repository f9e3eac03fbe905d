"""Batch norm under ``jax.checkpoint``: the statistics are kept, not recomputed.

With ``policy=save_only_these_names(*jaxbn.checkpoint_names)`` the backward
pass recomputes the layers elementwise from their inputs and the saved batch
statistics. Every count below is compared with a baseline compiled in the same
test (the step without remat, and with remat that saves nothing), never with an
absolute number: how many collectives one step has belongs to the kernel.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn

N_DEVICES = 8
LAYERS = 3
WIDTH = 16
BATCH = 64
SAVE_STATS = jax.checkpoint_policies.save_only_these_names(*jaxbn.checkpoint_names)
TOL = dict(rtol=20 * float(jnp.finfo(jnp.float32).eps), atol=20 * float(jnp.finfo(jnp.float32).eps))


def _model(axis_name=None):
  """A tanh MLP with batch norm after each matmul; returns ``loss(params, states, x)``."""

  def loss(params, states, x):
    ws, bn_params = params
    h, new = x, []
    for w, p, s in zip(ws, bn_params, states, strict=True):
      h, s = jaxbn.bn_train(p, s, h @ w, momentum=0.9, axis_name=axis_name)
      new.append(s)
      h = jnp.tanh(h)
    value = jnp.mean(jnp.square(h - 0.5))
    if axis_name is not None:
      value = jax.lax.pmean(value, axis_name)
    return value, new

  return loss


def _inputs():
  keys = jax.random.split(jax.random.key(0), LAYERS + 1)
  ws = [jax.random.normal(k, (WIDTH, WIDTH)) * 0.4 for k in keys[:LAYERS]]
  layers = [jaxbn.bn_init(WIDTH) for _ in range(LAYERS)]
  params = (ws, [p for p, _ in layers])
  states = [s for _, s in layers]
  x = jax.random.normal(keys[-1], (BATCH, WIDTH)) * 2 + 1
  return params, states, x


def _all_reduces(compiled) -> int:
  text = compiled.as_text()
  return sum(
    1 for line in text.splitlines() if " all-reduce(" in line or " all-reduce-start(" in line
  )


def _variants(loss):
  return {
    "plain": loss,
    "remat_stats": jax.checkpoint(loss, policy=SAVE_STATS),
    "remat_nothing": jax.checkpoint(loss),
  }


def _sharded_jit_counts():
  mesh = jax.make_mesh((N_DEVICES,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
  params, states, x = _inputs()
  params, states = jax.device_put((params, states), NamedSharding(mesh, P()))
  x = jax.device_put(x, NamedSharding(mesh, P("batch")))
  counts = {}
  for name, f in _variants(_model()).items():
    step = jax.jit(jax.value_and_grad(f, has_aux=True))
    counts[name] = _all_reduces(step.lower(params, states, x).compile())
  return counts


def _shard_map_counts():
  mesh = jax.make_mesh((N_DEVICES,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
  params, states, x = _inputs()
  counts = {}
  for name, f in _variants(_model("batch")).items():
    step = jax.jit(
      jax.shard_map(
        jax.value_and_grad(f, has_aux=True),
        mesh=mesh,
        in_specs=(P(), P(), P("batch")),
        out_specs=P(),
      )
    )
    counts[name] = _all_reduces(step.lower(params, states, x).compile())
  return counts


def test_checkpoint_names_are_strings():
  assert isinstance(jaxbn.checkpoint_names, tuple) and jaxbn.checkpoint_names
  assert all(isinstance(n, str) for n in jaxbn.checkpoint_names)
  assert len(set(jaxbn.checkpoint_names)) == len(jaxbn.checkpoint_names)


def test_saved_residuals_are_the_named_statistics(capsys):
  """Under the policy the residuals are the inputs and the named per-feature statistics."""
  params, states, x = _inputs()
  f = jax.checkpoint(lambda p, s, x: _model()(p, s, x)[0], policy=SAVE_STATS)
  jax.ad_checkpoint.print_saved_residuals(f, params, states, x)
  saved = capsys.readouterr().out.strip().splitlines()
  named = [line for line in saved if " named " in line]
  others = [line for line in saved if " named " not in line]
  assert all("from the argument" in line for line in others), others
  # Per layer: the shift and the three moments (count, delta, m2), each per feature.
  assert len(named) == 4 * LAYERS, named
  assert all(line.startswith(f"f32[1,{WIDTH}] named 'jaxbn_") for line in named), named


def _batch_reductions(jaxpr, batch: int) -> int:
  """Reductions over an axis of size ``batch`` in ``jaxpr`` and every sub-jaxpr."""
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("reduce_sum", "psum"):
      shape = eqn.invars[0].aval.shape
      axes = eqn.params.get("axes", ())
      n += any(shape[a] == batch for a in axes if isinstance(a, int))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += _batch_reductions(sub, batch)
  return n


def test_remat_computes_no_batch_reduction_twice():
  """In the traced step, remat with the names has as many batch-sized sums as no remat."""
  params, states, x = _inputs()
  counts = {
    name: _batch_reductions(
      jax.make_jaxpr(jax.value_and_grad(f, has_aux=True))(params, states, x).jaxpr, BATCH
    )
    for name, f in _variants(_model()).items()
  }
  assert counts["remat_stats"] == counts["plain"], counts
  assert counts["remat_nothing"] > counts["plain"], counts  # the baseline does recompute


def test_shard_map_step_remat_adds_no_all_reduce():
  counts = _shard_map_counts()
  assert counts["remat_stats"] <= counts["plain"], counts
  assert counts["remat_nothing"] > counts["plain"], counts


def test_sharded_jit_step_remat_adds_no_all_reduce():
  counts = _sharded_jit_counts()
  assert counts["remat_nothing"] > counts["plain"], counts
  assert counts["remat_stats"] <= counts["plain"], counts


@pytest.mark.parametrize("axis_name", [None, "batch"])
def test_remat_gradients_and_one_state_update(axis_name):
  params, states, x = _inputs()
  loss = _model(axis_name)
  if axis_name is not None:
    mesh = jax.make_mesh((N_DEVICES,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))

    def wrap(f):
      g = jax.value_and_grad(f, has_aux=True)
      return jax.jit(jax.shard_map(g, mesh=mesh, in_specs=(P(), P(), P("batch")), out_specs=P()))
  else:

    def wrap(f):
      return jax.jit(jax.value_and_grad(f, has_aux=True))

  (v0, s0), g0 = wrap(loss)(params, states, x)
  (v1, s1), g1 = wrap(jax.checkpoint(loss, policy=SAVE_STATS))(params, states, x)
  np.testing.assert_allclose(v1, v0, **TOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), g1, g0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), s1, s0)
  # Updated once: one step, and the first layer's statistics against NumPy.
  assert [int(s.step) for s in s1] == [1] * LAYERS
  h = np.asarray(x, np.float64) @ np.asarray(params[0][0], np.float64)
  np.testing.assert_allclose(s1[0].mean, 0.1 * h.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s1[0].var, 0.9 + 0.1 * h.var(0), rtol=1e-5, atol=1e-6)
