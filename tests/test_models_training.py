"""Models (linen, nnx, plain JAX) and the optax training loop."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxbn
from jaxbn import data
from jaxbn import engine
from jaxbn import models
from jaxbn import training


@pytest.fixture(scope="module")
def digits():
  return data.load_digits()


def _batch(n=32, d=12, classes=4, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32) * 2 + 1
  y = rng.integers(0, classes, size=n).astype(np.int32)
  return x, y


def _tree_allclose(a, b, **kw):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(u, v, **kw)


def _tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(u, v)


# --------------------------------------------------------------------------
# Models.


def test_mlp_places_bn_between_affine_map_and_activation():
  # A tiny epsilon: the second layer's inputs (sigmoid outputs) vary little.
  model = models.MLP(features=(8, 6), num_classes=3, bn_options=jaxbn.BNOptions(epsilon=1e-10))
  x, _ = _batch(d=5)
  variables = model.init(jax.random.key(0), x, train=False)
  params = variables["params"]
  assert "bias" not in params["Dense_0"] and "bias" not in params["Dense_1"]
  assert set(params["Dense_2"]) == {"kernel", "bias"}  # the head keeps its bias
  _, state = model.apply(
    variables, x, train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=False
  )
  pre = state["intermediates"]["preactivation"]
  assert [p.shape for p in pre] == [(32, 8), (32, 6)]
  # With scale 1 and bias 0 the input of every hidden unit is standardized.
  for p in pre:
    jaxbn.testing.assert_normalized(p, atol=1e-5, rtol=5e-4)


@pytest.mark.slow
def test_use_bn_false_keeps_dense_bias_and_has_no_statistics():
  x, _ = _batch(d=5)
  variables = models.MLP(features=(8,), use_bn=False).init(jax.random.key(0), x, train=False)
  assert "batch_stats" not in variables
  assert set(variables["params"]["Dense_0"]) == {"kernel", "bias"}
  cnn = models.CNN(features=(4,), use_bn=False)
  variables = cnn.init(jax.random.key(0), jnp.ones((2, 8, 8, 1)), train=False)
  assert "batch_stats" not in variables and "bias" in variables["params"]["Conv_0"]


def _functional_from_linen_mlp(variables, n_hidden):
  p, s = variables["params"], variables["batch_stats"]
  hidden = [
    {
      "kernel": p[f"Dense_{i}"]["kernel"],
      "bn": jaxbn.BNParams(p[f"BatchNorm_{i}"]["scale"], p[f"BatchNorm_{i}"]["bias"]),
    }
    for i in range(n_hidden)
  ]
  state = tuple(
    jaxbn.BNState(
      s[f"BatchNorm_{i}"]["mean"],
      s[f"BatchNorm_{i}"]["var"],
      jnp.zeros_like(s[f"BatchNorm_{i}"]["mean"]),
      jnp.zeros((), jnp.int32),
    )
    for i in range(n_hidden)
  )
  return {"hidden": hidden, "head": p[f"Dense_{n_hidden}"]}, state


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_linen_nnx_and_functional_mlps_agree(activation):
  x, _ = _batch(d=7)
  model = models.MLP(
    features=(9, 5), num_classes=3, activation=activation, bn_options=jaxbn.BNOptions(momentum=0.7)
  )
  variables = model.init(jax.random.key(1), x, train=False)
  variables = jax.tree.map(lambda t: t + 0.05, variables)  # non-trivial BN params
  logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])

  params, state = _functional_from_linen_mlp(variables, 2)
  f_logits, f_state = models.apply_mlp(
    params, state, x, train=True, activation=activation, bn_options=jaxbn.BNOptions(momentum=0.7)
  )
  np.testing.assert_allclose(f_logits, logits, atol=1e-5)
  np.testing.assert_allclose(
    f_state[1].var, updates["batch_stats"]["BatchNorm_1"]["var"], rtol=1e-6
  )

  net = models.NNXMLP(
    7, (9, 5), 3, activation=activation, bn_options=jaxbn.BNOptions(momentum=0.7), rngs=nnx.Rngs(0)
  )
  p = variables["params"]
  for i in range(2):
    net.dense[i].kernel[...] = p[f"Dense_{i}"]["kernel"]
    net.bn[i].scale[...] = p[f"BatchNorm_{i}"]["scale"]
    net.bn[i].bias[...] = p[f"BatchNorm_{i}"]["bias"]
    net.bn[i].mean[...] = variables["batch_stats"][f"BatchNorm_{i}"]["mean"]
    net.bn[i].var[...] = variables["batch_stats"][f"BatchNorm_{i}"]["var"]
  net.head.kernel[...] = p["Dense_2"]["kernel"]
  net.head.bias[...] = p["Dense_2"]["bias"]
  np.testing.assert_allclose(net(x), logits, atol=1e-5)
  np.testing.assert_allclose(net.bn[1].var[...], updates["batch_stats"]["BatchNorm_1"]["var"])
  # Evaluation: running statistics in all three.
  v2 = {"params": variables["params"], **updates}
  e_logits = model.apply(v2, x, train=False)
  net.eval()
  np.testing.assert_allclose(net(x), e_logits, atol=1e-5)
  f_eval, _ = models.apply_mlp(params, f_state, x, train=False, activation=activation)
  np.testing.assert_allclose(f_eval, e_logits, atol=1e-5)


@pytest.mark.slow
def test_linen_nnx_and_functional_cnns_agree():
  x = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1))
  model = models.CNN(features=(4, 6), num_classes=5)
  variables = model.init(jax.random.key(1), x, train=False)
  logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  p = variables["params"]

  params = {
    "conv": [
      {
        "kernel": p[f"Conv_{i}"]["kernel"],
        "bn": jaxbn.BNParams(p[f"BatchNorm_{i}"]["scale"], p[f"BatchNorm_{i}"]["bias"]),
      }
      for i in range(2)
    ],
    "head": p["Dense_0"],
  }
  _, state = models.init_cnn(jax.random.key(0), 1, (4, 6), 5)
  f_logits, f_state, pre = models.apply_cnn(
    params, state, x, train=True, return_preactivations=True
  )
  np.testing.assert_allclose(f_logits, logits, atol=1e-5)
  np.testing.assert_allclose(f_state[0].mean, updates["batch_stats"]["BatchNorm_0"]["mean"])
  assert pre[1].shape == (6, 4, 4, 6)

  net = models.NNXCNN(1, (4, 6), 5, image_size=(8, 8), rngs=nnx.Rngs(0))
  for i in range(2):
    net.conv[i].kernel[...] = p[f"Conv_{i}"]["kernel"]
  net.head.kernel[...] = p["Dense_0"]["kernel"]
  net.head.bias[...] = p["Dense_0"]["bias"]
  np.testing.assert_allclose(net(x, train=True), logits, atol=1e-5)

  @nnx.capture(nnx.Intermediate)
  def forward(net, x):
    return net(x, train=False)

  _, inter = forward(net, x)
  assert inter["preactivation"][-1].shape == (6, 4, 4, 6)


@pytest.mark.slow
def test_bn_options_reach_the_layers():
  x, _ = _batch(n=16, d=5)
  model = models.MLP(features=(4,), bn_options=jaxbn.BNOptions(momentum=None, ghost_batch_size=4))
  variables = model.init(jax.random.key(0), x, train=False)
  assert "count" in variables["batch_stats"]["BatchNorm_0"]
  _, state = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"])
  pre = np.asarray(state["intermediates"]["preactivation"][0], np.float64)
  # Ghost batches of 4: each is standardized on its own.
  for g in range(4):
    np.testing.assert_allclose(pre[4 * g : 4 * g + 4].mean(0), 0.0, atol=1e-5)


def test_bad_input_through_models_gets_the_core_errors():
  model = models.MLP(features=(4,))
  variables = model.init(jax.random.key(0), jnp.ones((2, 3)), train=False)
  with pytest.warns(jaxbn.SingleValueWarning, match="1 value per feature"):
    _, upd = model.apply(variables, jnp.ones((1, 3)), train=True, mutable=["batch_stats"])
  chex.assert_trees_all_equal(upd["batch_stats"], variables["batch_stats"])
  net = models.NNXMLP(3, (4,), rngs=nnx.Rngs(0))
  with pytest.warns(jaxbn.SingleValueWarning, match="1 value per feature"):
    net(jnp.ones((1, 3)), train=True)
  # A convolution's statistics also run over positions: one image is enough.
  cnn = models.NNXCNN(1, (4,), rngs=nnx.Rngs(0))
  assert cnn(jnp.ones((1, 8, 8, 1)), train=True).shape == (1, 10)
  with pytest.raises(ValueError, match="activation"):
    models.MLP(activation="swish").init(jax.random.key(0), jnp.ones((2, 3)), train=False)


# --------------------------------------------------------------------------
# Training.


@pytest.mark.slow
def test_mlp_with_bn_learns_digits(digits):
  ds = digits.flat()
  model = models.MLP(
    features=(100, 100, 100), activation="sigmoid", bn_options=jaxbn.BNOptions(momentum=0.9)
  )
  state = training.create_train_state(model, optax.adam(3e-3), ds.x_train[:1])
  state, history = training.fit(
    state,
    ds.x_train,
    ds.y_train,
    batch_size=60,
    epochs=8,
    eval_data=(ds.x_test, ds.y_test),
    progress=False,
  )
  assert history["eval_accuracy"][-1] >= 0.95
  assert len(history["loss"]) == len(history["step"]) == 8 * (len(ds.x_train) // 60)
  assert history["eval_step"][-1] == int(state.step)
  assert history["loss"][-1] < history["loss"][0]


@pytest.mark.slow
def test_cnn_with_bn_learns_digits(digits):
  model = models.CNN(features=(16, 32), bn_options=jaxbn.BNOptions(momentum=0.9))
  state = training.create_train_state(model, optax.adam(3e-3), digits.x_train[:1])
  state, _ = training.fit(
    state, digits.x_train, digits.y_train, batch_size=60, epochs=4, progress=False
  )
  assert training.evaluate(state, digits.x_test, digits.y_test)["accuracy"] >= 0.95


@pytest.mark.slow
def test_train_step_threads_statistics_and_matches_a_hand_written_step():
  x, y = _batch()
  model = models.MLP(features=(6,), num_classes=4, bn_options=jaxbn.BNOptions(momentum=0.5))
  state = training.create_train_state(model, optax.sgd(0.1), x[:1])
  new, metrics = training.train_step(state, (x, y))

  def loss(params):
    logits, upd = model.apply(
      {"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

  (value, upd), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
  np.testing.assert_allclose(metrics["loss"], value, rtol=1e-6)
  _tree_allclose(new.batch_stats, upd["batch_stats"], rtol=1e-6)
  _tree_allclose(new.params, jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads), atol=1e-6)
  assert int(new.step) == 1
  # The running mean after one step at momentum 0.5 is half the batch mean of
  # the first layer's pre-normalization activations.
  h = np.asarray(x, np.float64) @ np.asarray(state.params["Dense_0"]["kernel"], np.float64)
  np.testing.assert_allclose(new.batch_stats["BatchNorm_0"]["mean"], 0.5 * h.mean(0), rtol=1e-4)


def test_no_retrace_after_the_first_step():
  x, _ = _batch()
  model = models.MLP(features=(6,), num_classes=4)
  traces = []

  def counting_apply(*args, **kwargs):
    traces.append(1)
    return model.apply(*args, **kwargs)

  state = training.create_train_state(model, optax.adam(1e-2), x[:1])
  state = state.replace(apply_fn=counting_apply)
  for seed in range(4):
    state, _ = training.train_step(state, _batch(seed=seed))
  assert len(traces) == 1
  # fit feeds batches of the same shape through the same compiled step.
  x2, y2 = _batch(n=64, seed=9)
  state, _ = training.fit(state, x2, y2, batch_size=32, steps=5, progress=False)
  assert len(traces) == 1


@pytest.mark.slow
def test_eval_uses_running_statistics_and_ignores_batching():
  x, y = _batch(n=40)
  model = models.MLP(features=(6,), num_classes=4, bn_options=jaxbn.BNOptions(momentum=0.5))
  state = training.create_train_state(model, optax.sgd(0.1), x[:1])
  state, _ = training.train_step(state, (x, y))
  whole = training.evaluate(state, x, y, batch_size=40)
  one_by_one = training.evaluate(state, x, y, batch_size=1)
  np.testing.assert_allclose(one_by_one["loss"], whole["loss"], rtol=1e-5)
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, x, train=False)
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  np.testing.assert_allclose(whole["loss"], expected, rtol=1e-5)


@pytest.mark.slow
def test_weight_decay_mask_skips_bn_scale_and_bias():
  x, _ = _batch()
  for model in (models.MLP(features=(6, 5)), models.CNN(features=(3,))):
    xin = x[:, :9].reshape(-1, 3, 3, 1) if isinstance(model, models.CNN) else x
    variables = model.init(jax.random.key(0), xin, train=False)
    params = variables["params"]
    exact = training.bn_param_mask(params, variables["batch_stats"])
    assert training.bn_param_mask(params) == exact
    assert sum(jax.tree.leaves(exact)) == 2 * len(variables["batch_stats"])
  # Decay alone (zero gradients): kernels shrink, BN scale and bias do not.
  tx = optax.chain(
    optax.add_decayed_weights(0.5, mask=training.bn_weight_decay_mask), optax.sgd(1.0)
  )
  state = training.create_train_state(models.MLP(features=(6,)), tx, x[:1])
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  new = state.apply_gradients(grads=zeros)
  np.testing.assert_allclose(
    new.params["Dense_0"]["kernel"], 0.5 * state.params["Dense_0"]["kernel"], rtol=1e-6
  )
  np.testing.assert_array_equal(new.params["BatchNorm_0"]["scale"], 1.0)
  # Functional params: BNParams nodes are recognised.
  params, _ = models.init_mlp(jax.random.key(0), 4, (3,))
  mask = training.bn_param_mask(params)
  assert mask["hidden"][0]["bn"] == jaxbn.BNParams(True, True)
  assert mask["hidden"][0]["kernel"] is False


def test_freezing_switches_are_independent():
  x, y = _batch()
  model = models.MLP(features=(6,), num_classes=4, bn_options=jaxbn.BNOptions(momentum=0.5))
  state = training.create_train_state(model, optax.sgd(0.5), x[:1])
  state, _ = training.train_step(state, (x, y))  # running stats away from init
  stats, params = state.batch_stats, state.params
  bn = lambda s: s.params["BatchNorm_0"]

  # 1. Normalize with the running statistics: they stay, the loss is eval's.
  frozen, m = training.train_step(state, (x, y), use_running_average=True)
  _tree_equal(frozen.batch_stats, stats)
  np.testing.assert_allclose(m["loss"], training.eval_step(state, (x, y))["loss"], rtol=1e-6)

  # 2. Batch statistics, running ones kept: the loss is training's.
  kept, m_kept = training.train_step(state, (x, y), update_batch_stats=False)
  moving, m_train = training.train_step(state, (x, y))
  _tree_equal(kept.batch_stats, stats)
  np.testing.assert_allclose(m_kept["loss"], m_train["loss"], rtol=1e-6)
  _tree_allclose(kept.params, moving.params, rtol=1e-6)
  assert not np.allclose(moving.batch_stats["BatchNorm_0"]["mean"], stats["BatchNorm_0"]["mean"])

  # 3. Scale and bias frozen, everything else trained.
  fixed = training.create_train_state(model, optax.sgd(0.5), x[:1], train_bn_affine=False)
  fixed = fixed.replace(params=params, batch_stats=stats, opt_state=fixed.tx.init(params))
  fixed, _ = training.train_step(fixed, (x, y))
  _tree_equal(bn(fixed), bn(state))
  assert not np.allclose(fixed.params["Dense_0"]["kernel"], params["Dense_0"]["kernel"])
  _tree_allclose(fixed.batch_stats, moving.batch_stats, rtol=1e-6)


def test_fit_history_is_plottable_and_silent_without_progress(capsys):
  x, y = _batch(n=64)
  state = training.create_train_state(models.MLP(features=(6,), num_classes=4), optax.adam(1e-2), x)
  state, history = training.fit(
    state, x, y, batch_size=16, steps=6, eval_data=(x, y), eval_every=3, progress=False
  )
  assert history["step"] == [1, 2, 3, 4, 5, 6]
  # eval_every=3: before training, after every 3rd step and after the last (here the 6th).
  assert history["eval_step"] == [0, 3, 6]
  assert all(isinstance(v, float) for v in history["loss"] + history["eval_accuracy"])
  out = capsys.readouterr()
  assert out.out == "" and out.err == ""
  with pytest.raises(ValueError, match="exactly one of epochs and steps"):
    training.fit(state, x, y, progress=False)


def test_fit_and_engine_evaluate_at_the_same_steps_counted_from_the_start_of_training():
  # eval_every counts state.step: a run resumed at step 4 evaluates where the run
  # that never stopped does (6), then after its last step (9); the engine agrees.
  x, y = _batch(n=64)
  state = training.create_train_state(models.MLP(features=(6,), num_classes=4), optax.sgd(0.1), x)
  state, first = training.fit(state, x, y, batch_size=16, steps=4, eval_data=(x, y), eval_every=3)
  state, resumed = training.fit(state, x, y, batch_size=16, steps=5, eval_data=(x, y), eval_every=3)
  assert first["eval_step"] == [0, 3, 4] and resumed["eval_step"] == [6, 9]
  assert resumed["step"] == [5, 6, 7, 8, 9]
  assert engine.eval_points(3, 4) == first["eval_step"]
  assert engine.eval_points(3, 5, start=4) == resumed["eval_step"]
  # The default: each epoch (64 // 16 = 4 steps) of the whole training, and at the end.
  _, by_epoch = training.fit(state, x, y, batch_size=16, epochs=2, eval_data=(x, y))
  assert by_epoch["eval_step"] == [12, 16, 17]


@pytest.mark.slow
def test_checkpoint_restore_and_continue_is_bit_identical(tmp_path):
  x, y = _batch(n=48)
  model = models.MLP(
    features=(6,), num_classes=4, bn_options=jaxbn.BNOptions(momentum=0.8, ema_warmup=True)
  )
  start = training.create_train_state(model, optax.adam(1e-2), x[:1])
  kw = dict(batch_size=16, seed=3, progress=False)

  straight, _ = training.fit(start, x, y, steps=7, **kw)

  half, _ = training.fit(start, x, y, steps=4, **kw)
  path = tmp_path / "ckpt"
  training.save_checkpoint(path.absolute(), half)
  template = training.create_train_state(model, optax.adam(1e-2), x[:1], key=9)
  restored = training.restore_checkpoint(path.absolute(), template)
  _tree_equal(restored.params, half.params)
  _tree_equal(restored.opt_state, half.opt_state)
  assert int(restored.step) == 4
  resumed, _ = training.fit(restored, x, y, steps=3, **kw)

  assert int(resumed.step) == int(straight.step) == 7
  _tree_equal(resumed.params, straight.params)
  _tree_equal(resumed.batch_stats, straight.batch_stats)
  _tree_equal(resumed.opt_state, straight.opt_state)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("how", ["jit", "shard_map"])
def test_data_parallel_equals_single_device_on_the_global_batch(kind, how):
  assert jax.device_count() == 8
  mesh = training.data_parallel_mesh()
  rng = np.random.default_rng(0)
  if kind == "mlp":
    make = lambda **kw: models.MLP(
      features=(10, 7), num_classes=4, bn_options=jaxbn.BNOptions(momentum=0.7, **kw)
    )
    x = rng.normal(size=(64, 12)).astype(np.float32) + 1
  else:
    make = lambda **kw: models.CNN(
      features=(3,), num_classes=4, bn_options=jaxbn.BNOptions(momentum=0.7, **kw)
    )
    x = rng.uniform(size=(32, 4, 4, 1)).astype(np.float32)
  y = rng.integers(0, 4, len(x)).astype(np.int32)
  single = training.create_train_state(make(), optax.adam(1e-2), x[:1])
  if how == "jit":  # the same model, its batch sharded
    parallel, step = single, training.data_parallel_train_step(mesh)
  else:  # batch norm that names the mesh axis, under shard_map
    parallel = single.replace(apply_fn=make(axis_name="batch").apply)
    step = training.shard_map_train_step(mesh)
  for t in range(3):
    batch = (x[::-1], y[::-1]) if t % 2 else (x, y)
    single, m_single = training.train_step(single, batch)
    parallel, m_parallel = step(parallel, batch)
    np.testing.assert_allclose(m_parallel["loss"], m_single["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_parallel["accuracy"], m_single["accuracy"])
  _tree_allclose(parallel.params, single.params, atol=1e-5, rtol=1e-5)
  _tree_allclose(parallel.batch_stats, single.batch_stats, atol=1e-5, rtol=1e-5)
  assert int(parallel.step) == 3
  # fit drives the data-parallel step like any other.
  parallel, history = training.fit(
    parallel, x, y, batch_size=len(x), steps=1, step_fn=step, progress=False
  )
  assert int(parallel.step) == 4 and np.isfinite(history["loss"][0])
