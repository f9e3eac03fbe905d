"""jaxbn.linen.BatchNorm is a drop-in for flax.linen.BatchNorm.

The reference is flax itself with use_fast_variance=False (two-pass variance,
as jaxbn), and float64 NumPy for the closed forms.
"""

import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import linen as jbn

LAYOUTS = [
  ((16, 4), -1),  # dense: one statistic per neuron
  ((4, 5, 5, 3), -1),  # NHWC: one per feature map
  ((4, 3, 5, 5), 1),  # NCHW
  ((6, 4, 3), (1, 2)),  # two feature axes
]


def _x(shape, seed=0, loc=0.0):
  return jax.random.normal(jax.random.key(seed), shape) * 2.0 + loc


def _stats(updates):
  return {k: updates["batch_stats"][k] for k in ("mean", "var")}


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_training_matches_flax_over_several_steps(shape, axis):
  ref = nn.BatchNorm(axis=axis, momentum=0.9, use_fast_variance=False)
  ours = jbn.BatchNorm(axis=axis, momentum=0.9)
  x0 = _x(shape)
  v_ref = ref.init(jax.random.key(1), x0, use_running_average=False)
  v_ours = ours.init(jax.random.key(1), x0, use_running_average=False)
  assert jax.tree.map(lambda t: (t.shape, t.dtype), v_ours) == jax.tree.map(
    lambda t: (t.shape, t.dtype), v_ref
  )
  # Non-trivial parameters, shared.
  params = jax.tree.map(lambda p: p + 0.3 * _x(p.shape, seed=7), v_ref["params"])
  v_ref = {"params": params, "batch_stats": v_ref["batch_stats"]}
  v_ours = {"params": params, "batch_stats": v_ours["batch_stats"]}
  for step in range(3):
    x = _x(shape, seed=10 + step, loc=float(step))
    y_ref, u_ref = ref.apply(v_ref, x, use_running_average=False, mutable=["batch_stats"])
    y, u = jbn.BatchNorm(axis=axis, momentum=0.9).apply(
      v_ours, x, use_running_average=False, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5)
    for k in ("mean", "var"):
      np.testing.assert_allclose(u["batch_stats"][k], u_ref["batch_stats"][k], rtol=1e-5, atol=1e-6)
    v_ref = {"params": params, "batch_stats": u_ref["batch_stats"]}
    v_ours = {"params": params, "batch_stats": u["batch_stats"]}
  # Evaluation with the statistics both have accumulated.
  x = _x(shape, seed=99)
  np.testing.assert_allclose(
    ours.apply(v_ours, x, use_running_average=True),
    ref.apply(v_ref, x, use_running_average=True),
    atol=2e-5,
    rtol=1e-5,
  )


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS[:3])
def test_gradients_match_flax(shape, axis):
  ref = nn.BatchNorm(axis=axis, use_fast_variance=False, use_running_average=False)
  ours = jbn.BatchNorm(axis=axis, use_running_average=False)
  x = _x(shape, loc=3.0)
  w = _x(shape, seed=5)
  variables = ref.init(jax.random.key(0), x)
  params = jax.tree.map(lambda p: p + 0.5 * _x(p.shape, seed=3), variables["params"])

  def loss(module):
    def f(params, x):
      y, _ = module.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
      )
      return jnp.sum(y * w)

    return jax.grad(f, argnums=(0, 1))(params, x)

  g_ours, g_ref = loss(ours), loss(ref)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_flax_variables_load_into_jaxbn_and_back():
  x = _x((8, 5), loc=1.0)
  flax_vars = nn.BatchNorm(use_running_average=False, use_fast_variance=False).init(
    jax.random.key(0), x
  )
  flax_vars = jax.tree.map(lambda t: t + 0.1 * _x(t.shape, seed=2), flax_vars)
  ours_vars = jbn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  ours_vars = jax.tree.map(lambda t: t + 0.2 * _x(t.shape, seed=4), ours_vars)
  for variables in (flax_vars, ours_vars):
    for train in (True, False):
      y_flax, u_flax = nn.BatchNorm(use_fast_variance=False).apply(
        variables, x, use_running_average=not train, mutable=["batch_stats"]
      )
      y_ours, u_ours = jbn.BatchNorm().apply(
        variables, x, use_running_average=not train, mutable=["batch_stats"]
      )
      np.testing.assert_allclose(y_ours, y_flax, atol=1e-5, rtol=1e-5)
      jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), u_ours, u_flax
      )


def test_closed_form_against_float64_numpy():
  x = _x((32, 3), loc=1e4)  # far from zero: flax's fast variance fails here
  bn = jbn.BatchNorm(momentum=0.8)
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  y, u = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  x64 = np.asarray(x, np.float64)
  mu, var = x64.mean(0), x64.var(0)
  np.testing.assert_allclose(y, (x64 - mu) / np.sqrt(var + 1e-5), atol=2e-3)
  np.testing.assert_allclose(u["batch_stats"]["mean"], 0.2 * mu, rtol=1e-6)
  np.testing.assert_allclose(u["batch_stats"]["var"], 0.8 + 0.2 * var, rtol=1e-4)


def test_statistics_not_updated_during_init_and_collective_skipped():
  x = _x((8, 3), loc=5.0)
  # axis_name names an axis that does not exist outside shard_map: init must
  # not reach for it.
  variables = jbn.BatchNorm(axis_name="batch").init(jax.random.key(0), x, use_running_average=False)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(3))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(3))


def test_use_scale_and_use_bias_false_omit_params_like_flax():
  x = _x((8, 3), loc=2.0)
  for use_scale, use_bias in ((False, True), (True, False), (False, False)):
    kw = dict(use_scale=use_scale, use_bias=use_bias, use_running_average=False)
    ref = nn.BatchNorm(use_fast_variance=False, **kw)
    ours = jbn.BatchNorm(**kw)
    v_ref = ref.init(jax.random.key(0), x)
    v_ours = ours.init(jax.random.key(0), x)
    assert jax.tree.structure(v_ours) == jax.tree.structure(v_ref)
    v = jax.tree.map(lambda t: t + 0.3, v_ref)
    y_ref, _ = ref.apply(v, x, mutable=["batch_stats"])
    y_ours, _ = ours.apply(v, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y_ours, y_ref, atol=1e-5)


def test_mask_matches_flax_on_one_device():
  x = _x((10, 4), loc=1.0)
  mask = jnp.broadcast_to((jnp.arange(10) % 3 != 0)[:, None], x.shape)
  ref = nn.BatchNorm(use_fast_variance=False, use_running_average=False)
  variables = ref.init(jax.random.key(0), x)
  y_ref, u_ref = ref.apply(variables, x, mask=mask, mutable=["batch_stats"])
  y, u = jbn.BatchNorm(use_running_average=False).apply(
    variables, x, mask=mask, mutable=["batch_stats"]
  )
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  np.testing.assert_allclose(u["batch_stats"]["var"], u_ref["batch_stats"]["var"], rtol=1e-6)


def test_default_tree_is_flax_tree_and_extras_add_count_and_step():
  x = _x((8, 3))
  shapes = lambda m: jax.tree.map(
    lambda t: (t.shape, str(t.dtype)), m.init(jax.random.key(0), x, use_running_average=False)
  )
  assert shapes(jbn.BatchNorm()) == shapes(nn.BatchNorm())
  assert shapes(jbn.BatchNorm(renorm=jaxbn.Renorm(3.0, 5.0)))["batch_stats"].keys() == {
    "mean",
    "var",
  }
  stats = shapes(jbn.BatchNorm(momentum=None))["batch_stats"]
  assert stats["count"] == ((3,), "float32") and "step" not in stats
  stats = shapes(jbn.BatchNorm(ema_warmup=True, renorm=jaxbn.renorm_schedule()))["batch_stats"]
  assert stats["count"] == ((3,), "float32") and stats["step"] == ((), "int32")


def test_cumulative_average_after_one_pass_holds_data_set_statistics():
  data = np.asarray(_x((40, 3), loc=3.0))
  bn = jbn.BatchNorm(momentum=None, use_running_average=False)
  variables = bn.init(jax.random.key(0), jnp.asarray(data[:8]))
  for start in range(0, 40, 8):
    _, u = bn.apply(variables, jnp.asarray(data[start : start + 8]), mutable=["batch_stats"])
    variables = {"params": variables["params"], **u}
  stats = variables["batch_stats"]
  np.testing.assert_allclose(stats["mean"], data.astype(np.float64).mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats["var"], data.astype(np.float64).var(0), rtol=1e-5)
  np.testing.assert_array_equal(stats["count"], np.full(3, 40.0))


def test_renorm_schedule_step_advances():
  x = _x((8, 3))
  bn = jbn.BatchNorm(renorm=jaxbn.renorm_schedule(warmup_steps=1), use_running_average=False)
  variables = bn.init(jax.random.key(0), x)
  for _ in range(2):
    _, u = bn.apply(variables, x, mutable=["batch_stats"])
    variables = {"params": variables["params"], **u}
  assert int(variables["batch_stats"]["step"]) == 2


def test_output_dtype_is_input_dtype_unless_dtype_given():
  x = _x((8, 3)).astype(jnp.bfloat16)
  bn = jbn.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), x)
  y, u = bn.apply(variables, x, mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16 and u["batch_stats"]["mean"].dtype == jnp.float32
  y32, _ = jbn.BatchNorm(use_running_average=False, dtype=jnp.float32).apply(
    variables, x, mutable=["batch_stats"]
  )
  assert y32.dtype == jnp.float32
  np.testing.assert_allclose(y32, np.asarray(y, np.float32), atol=0.05)


def test_use_running_average_from_attribute_or_call():
  x = _x((8, 3), loc=4.0)
  variables = jbn.BatchNorm().init(jax.random.key(0), x, use_running_average=True)
  # Running statistics are mean 0, var 1 at init: evaluation is nearly identity.
  y = jbn.BatchNorm(use_running_average=True).apply(variables, x)
  np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)
  with pytest.raises(ValueError, match="use_running_average"):
    jbn.BatchNorm(use_running_average=True).apply(variables, x, use_running_average=False)


def test_bad_input_gets_the_core_errors():
  bn = jbn.BatchNorm(use_running_average=False)
  with pytest.raises(TypeError, match="x must be a floating-point array"):
    bn.init(jax.random.key(0), jnp.ones((4, 3), jnp.int32))
  variables = bn.init(jax.random.key(0), jnp.ones((4, 3)))
  with pytest.raises(ValueError, match="no value per feature"):
    bn.apply(variables, jnp.ones((0, 3)), mutable=["batch_stats"])
  with pytest.raises(ValueError, match="out of range"):
    jbn.BatchNorm(axis=3, use_running_average=False).init(jax.random.key(0), jnp.ones((4, 3)))


def test_shard_map_statistics_are_global_batch_statistics():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("batch",))
  x = _x((32, 3), loc=2.0)
  bn = jbn.BatchNorm(axis_name="batch", use_running_average=False)
  variables = bn.init(jax.random.key(0), x)

  def f(variables, x):
    return bn.apply(variables, x, mutable=["batch_stats"])

  y, u = jax.jit(
    jax.shard_map(
      f,
      mesh=mesh,
      in_specs=(jax.P(), jax.P("batch")),
      out_specs=(jax.P("batch"), jax.P()),
    )
  )(variables, x)
  y_one, u_one = jbn.BatchNorm(use_running_average=False).apply(
    variables, x, mutable=["batch_stats"]
  )
  np.testing.assert_allclose(y, y_one, atol=1e-5)
  np.testing.assert_allclose(u["batch_stats"]["var"], u_one["batch_stats"]["var"], rtol=1e-6)


class _FlaxNet(nn.Module):
  """A user's flax model; only the BatchNorm it builds differs."""

  norm: type

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(6, use_bias=False)(x)
    x = self.norm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(2)(nn.relu(x))


def test_migrating_a_flax_model_is_one_import():
  x = _x((16, 5), loc=1.0)
  flax_net, our_net = _FlaxNet(nn.BatchNorm), _FlaxNet(jbn.BatchNorm)
  variables = flax_net.init(jax.random.key(0), x, train=False)
  assert jax.tree.structure(our_net.init(jax.random.key(0), x, train=False)) == jax.tree.structure(
    variables
  )
  out_ours, u_ours = our_net.apply(variables, x, train=True, mutable=["batch_stats"])
  out_flax, u_flax = _FlaxNet(nn.BatchNorm).apply(variables, x, train=True, mutable=["batch_stats"])
  # flax's default fast variance and jaxbn agree on data near zero.
  np.testing.assert_allclose(out_ours, out_flax, atol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), u_ours, u_flax)


def test_one_example_init_is_silent_and_training_keeps_the_statistics():
  """flax idioms: init on x[:1]; a last batch of one example warns, keeps stats."""
  bn = jbn.BatchNorm(use_running_average=False)
  x = _x((8, 3), loc=2.0)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    variables = bn.init(jax.random.key(0), x[:1])
  with pytest.warns(jaxbn.SingleValueWarning, match="1 value per feature"):
    y, upd = bn.apply(variables, x[:1], mutable=["batch_stats"])
  np.testing.assert_array_equal(y, jnp.zeros((1, 3)))  # bias, as in flax
  chex.assert_trees_all_equal(upd["batch_stats"], variables["batch_stats"])


def test_float64_params_keep_float64_statistics_and_running_var_attribute():
  with jax.enable_x64(True):
    x = _x((8, 3), loc=2.0).astype(jnp.float64)
    bn = jbn.BatchNorm(use_running_average=False, param_dtype=jnp.float64)
    variables = bn.init(jax.random.key(0), x)
    chex.assert_type(list(variables["batch_stats"].values()), jnp.float64)
  bn = jbn.BatchNorm(use_running_average=False, momentum=0.0, running_var="unbiased")
  x = _x((4, 3), loc=2.0)
  _, upd = bn.apply(bn.init(jax.random.key(0), x), x, mutable=["batch_stats"])
  np.testing.assert_allclose(upd["batch_stats"]["var"], np.asarray(x).var(0, ddof=1), rtol=1e-5)
