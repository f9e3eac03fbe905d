"""Bad input across the public API: each case gets a clear error naming what was wrong.

The cases a newcomer meets following the README are here. Others stay next
to the behaviour they guard, and are listed so that this module is the index:

- core (``bn_train``, ``bn_infer``, ``bn_init``): test_core.py
  ``test_init_rejects_bad_num_features``, ``test_errors_name_the_problem``,
  ``test_train_errors``; test_core_numerics.py
  ``test_state_of_the_wrong_dtype_is_rejected``; one value per feature:
  test_core_numerics.py ``test_one_value_per_feature_warns_returns_bias_and_keeps_statistics``;
  ghost batches: test_small_batches.py
  ``test_ghost_size_that_does_not_divide_the_batch_is_an_error``; several inputs with one
  set of statistics (``x`` and ``mask`` tuples): test_joint.py
  ``test_bad_joint_inputs_name_x_and_mask``.
- modules: test_linen.py and test_nnx.py ``test_bad_input_gets_the_core_errors``;
  models: test_models_training.py ``test_bad_input_through_models_gets_the_core_errors``.
- population statistics: test_population.py ``test_bad_arguments_are_named``,
  ``test_linen_model_with_flax_batchnorm_is_refused``,
  ``test_nnx_forced_evaluation_mode_is_refused``,
  ``test_the_forward_is_checked_once_per_shape_and_a_bad_one_on_every_call``.
- training: test_engine.py ``test_bad_arguments_are_clear_errors``; checkpoints:
  test_checkpoints.py (relative, existing, damaged, another model's).
- data and the command line: test_data.py (files that are not data sets),
  test_cli.py ``test_bad_arguments_and_files_are_clear_errors``,
  ``test_every_bad_data_file_is_a_one_line_error_naming_data``.
- folding and PyTorch: test_folding.py ``test_folding_refuses_models_it_does_not_know``,
  test_torch_interop.py ``test_from_torch_model_rejects_unknown_layers_with_state``.
"""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxbn
from jaxbn import linen as jbl
from jaxbn import models
from jaxbn import nnx as jbx
from jaxbn import training


def _rows(n, d=3, seed=0):
  return np.random.default_rng(seed).normal(size=(n, d)) * 2 + 1  # float64, NumPy's default


# ----------------------------------------------------------------- params and state


def test_params_and_state_of_different_layers_name_each_array():
  params, _ = jaxbn.bn_init(4)
  _, state = jaxbn.bn_init(8)
  want = (
    r"bn_train: params and state must come from one bn_init call \(one layer\), but their "
    r"shapes differ: params.scale \(4,\), params.bias \(4,\), state.mean \(8,\), "
    r"state.var \(8,\), state.count \(8,\)\."
  )
  with pytest.raises(ValueError, match=want):
    jaxbn.bn_train(params, state, jnp.ones((2, 4)))
  with pytest.raises(ValueError, match=r"bn_infer: .*state.mean \(8,\)"):
    jaxbn.bn_infer(params, state, jnp.ones((2, 4)))


def test_swapped_params_and_state_are_a_type_error():
  params, state = jaxbn.bn_init(4)
  msg = r"bn_train: params and state are swapped \(got params: BNState, state: BNParams\)"
  with pytest.raises(TypeError, match=msg):
    jaxbn.bn_train(state, params, jnp.ones((2, 4)))
  with pytest.raises(TypeError, match="bn_infer: params and state are swapped"):
    jaxbn.bn_infer(state, params, jnp.ones((2, 4)))
  with pytest.raises(TypeError, match=r"state must be a jaxbn.BNState .*got dict"):
    jaxbn.bn_train(params, {"mean": 0}, jnp.ones((2, 4)))


def test_a_module_names_the_layer_whose_state_does_not_fit():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = jbl.BatchNorm(use_running_average=False, name="first")(x)
      return jbl.BatchNorm(use_running_average=False, name="second")(x)

  x = jnp.ones((4, 3))
  variables = Net().init(jax.random.key(0), x)
  stats = dict(variables["batch_stats"])
  stats["second"] = {"mean": jnp.zeros(5), "var": jnp.ones(5)}  # another layer's
  variables = {**variables, "batch_stats": stats}
  msg = r"jaxbn.linen.BatchNorm at 'second': bn_train: .*state.mean \(5,\)"
  with pytest.raises(ValueError, match=msg):
    Net().apply(variables, x, mutable=["batch_stats"])

  bn = jbx.BatchNorm(3, rngs=nnx.Rngs(0))
  bn.mean = nnx.BatchStat(jnp.zeros(5))  # another layer's
  with pytest.raises(ValueError, match=r"jaxbn.nnx.BatchNorm of feature shape \(3,\): bn_train"):
    bn(x)


# ------------------------------------------------------------------ NumPy input


def test_float64_numpy_input_is_cast_at_the_boundary_without_warnings():
  x = _rows(8)
  params, state = jaxbn.bn_init(3)
  module = jbl.BatchNorm(use_running_average=False)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    y, new = jaxbn.bn_train(params, state, x, mask=np.ones((8, 1), bool))
    z = jaxbn.bn_infer(params, new, x)
    variables = module.init(jax.random.key(0), x)
    w, _ = module.apply(variables, x, mutable=["batch_stats"])
    v = jbx.BatchNorm(3, rngs=nnx.Rngs(0))(x)
  for out in (y, z, w, v):
    assert out.dtype == jnp.float32
  # The same numbers as the float32 array a user would cast by hand.
  y32, _ = jaxbn.bn_train(params, state, jnp.asarray(x, jnp.float32), mask=np.ones((8, 1), bool))
  np.testing.assert_array_equal(y, y32)  # one computation on the same float32 values


# ----------------------------------------------------------- one value per feature


def test_one_example_in_training_mode_points_to_evaluation_mode_first():
  model = models.NNXMLP(3, (4,), rngs=nnx.Rngs(0))
  model(jnp.asarray(_rows(16), jnp.float32))  # trained a little
  with pytest.warns(jaxbn.SingleValueWarning) as record:
    model(jnp.ones((1, 3)))  # left in training mode
  msg = str(record[0].message)
  assert "1 value per feature" in msg
  evaluation = msg.index("To predict, use evaluation mode")
  assert "model.eval()" in msg and "use_running_average=True" in msg
  assert evaluation < msg.index("at least 2 values")
  model.eval()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    model(jnp.ones((1, 3)))


# ------------------------------------------------------------------- data parallel


def test_batch_size_not_divisible_by_the_devices_names_both():
  assert jax.device_count() == 8  # tests/conftest.py
  mesh = training.data_parallel_mesh()
  x = _rows(120).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32)
  model = models.MLP(features=(4,), num_classes=2, bn_options=jaxbn.BNOptions(axis_name="batch"))
  state = training.create_train_state(model, optax.sgd(0.1), x[:1])
  msg = (
    r"data_parallel_train_step: a batch of 60 examples cannot be split evenly over the 8 "
    r"devices of the mesh axis 'batch'; use a batch size divisible by 8 \(fit's batch_size, "
    r"e.g. 56\)"
  )
  with pytest.raises(ValueError, match=msg):
    training.fit(
      state, x, y, batch_size=60, steps=1, step_fn=training.data_parallel_train_step(mesh)
    )


# ------------------------------------------------------------ population statistics


@pytest.mark.parametrize("cnn", [False, True], ids=["mlp", "cnn"])
def test_population_batches_of_one_example_are_an_error(cnn):
  # The CNN's images are 2x2: after one 2x2 pool, its second block sees one
  # position, so one image gives it one value per feature.
  if cnn:
    model = models.CNN(features=(3, 4), num_classes=2)
    x = np.random.default_rng(0).normal(size=(10, 2, 2, 1)).astype(np.float32)
  else:
    model = models.MLP(features=(4,), num_classes=2)
    x = _rows(10).astype(np.float32)
  variables = model.init(jax.random.key(0), x[:2], train=False)
  msg = (
    r"population_stats: a batch of 1 example\(s\) .* gives a batch-norm layer 1 value "
    r"per feature .* Pass batches of the size the model was trained with"
  )
  for _ in range(2):  # also once the program is compiled (no warning is traced again)
    with pytest.raises(ValueError, match=msg):
      jaxbn.linen_population_stats(model, variables, [x[i : i + 1] for i in range(10)], train=True)
  # Batches of 5 are fine.
  jaxbn.linen_population_stats(model, variables, [x[:5], x[5:]], train=True)


def test_population_of_a_model_trained_with_axis_name_works_outside_the_mesh():
  x = _rows(64).astype(np.float32)
  batches = [x[:32], x[32:]]
  plain = models.MLP(features=(4,), num_classes=2)
  synced = plain.clone(bn_options=jaxbn.BNOptions(axis_name="batch"))
  variables = plain.init(jax.random.key(0), x[:2], train=False)
  want = jaxbn.linen_population_stats(plain, variables, batches, train=True)
  got = jaxbn.linen_population_stats(synced, variables, batches, train=True)
  tol = 4 * np.finfo(np.float32).eps  # one computation; only the tracing differs
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tol, atol=tol), got, want)

  net = models.NNXMLP(3, (4,), rngs=nnx.Rngs(0), bn_options=jaxbn.BNOptions(axis_name="batch"))
  jaxbn.nnx_population_stats(net, batches)
  h = x @ np.asarray(net.dense[0].kernel[...])
  np.testing.assert_allclose(net.bn[0].mean[...], h.mean(0), rtol=1e-5, atol=1e-5)

  # A forward of one's own with an unbound axis_name: the error gives the remedy.
  params, states = models.init_mlp(jax.random.key(0), 3, (4,), 2)
  forward = functools.partial(
    models.apply_mlp, train=True, bn_options=jaxbn.BNOptions(axis_name="batch")
  )
  with pytest.raises(ValueError, match=r"axis_name that is not bound here.*axis_name=None"):
    jaxbn.population_stats(forward, params, states, batches)


def test_plain_jax_models_are_population_forwards():
  x = _rows(64).astype(np.float32)
  params, states = models.init_mlp(jax.random.key(0), 3, (4,), 2)
  got = jaxbn.population_stats(
    functools.partial(models.apply_mlp, train=True), params, states, [x[:32], x[32:]]
  )
  # The first layer's input is x @ kernel: its statistics over all 64 rows, in float64.
  h = x.astype(np.float64) @ np.asarray(params["hidden"][0]["kernel"], np.float64)
  np.testing.assert_allclose(got[0].mean, h.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[0].var, h.var(0), rtol=1e-5, atol=1e-5)


def test_population_batches_of_x_y_pairs_get_an_error_that_says_what_to_pass():
  params, states = models.init_mlp(jax.random.key(0), 3, (4,), 2)
  forward = functools.partial(models.apply_mlp, train=True)
  x = _rows(16).astype(np.float32)
  pairs = [(x[:8], np.zeros(8, np.int32)), (x[8:], np.zeros(8, np.int32))]
  with pytest.raises(TypeError, match=r"a pair \(ndarray, ndarray\).*\(x for x, _ in loader\)"):
    jaxbn.population_stats(forward, params, states, pairs)
  got = jaxbn.population_stats(forward, params, states, (x for x, _ in pairs))
  want = jaxbn.population_stats(forward, params, states, [x[:8], x[8:]])
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_an_unbound_axis_name_names_the_option_and_the_ways_to_bind_it():
  params, state = jaxbn.bn_init(3)
  x = _rows(8).astype(np.float32)
  with pytest.raises(NameError, match=r"bn_train: axis_name='batch': unbound axis name 'batch'"):
    jaxbn.bn_train(params, state, x, axis_name="batch")
  ways = r"unbound axis name 'batch'.*shard_map.*vmap\(\.\.\., axis_name='batch'\).*=None"
  with pytest.raises(NameError, match=ways):
    jax.jit(lambda x: jaxbn.bn_train(params, state, x, axis_name=("batch", "b")))(x)
  # Bound, the same call runs: vmap over examples with that name.
  y, _ = jax.vmap(lambda r: jaxbn.bn_train(params, state, r[None], axis_name="batch"),
                  axis_name="batch")(x)  # fmt: skip
  np.testing.assert_allclose(y[:, 0], jaxbn.bn_train(params, state, x)[0], rtol=1e-5, atol=1e-5)
