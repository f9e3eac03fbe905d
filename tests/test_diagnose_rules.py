"""jaxbn.diagnose's rules on synthetic layers of the core, where the truth is known (fast)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbn
from jaxbn import data
from jaxbn import models
from jaxbn import training


def forward(params, state, x, **bn_kwargs):
  return jaxbn.bn_train(params, state, x, jaxbn.BNOptions(momentum=0.9), **bn_kwargs)


def _data(shift=0.0, scale=2.0, n=256, c=4):
  return shift + scale * np.asarray(jax.random.normal(jax.random.key(0), (n, c)), np.float32)


def _settled(x, steps):
  """A state whose moving average (momentum 0.9) has seen `steps` updates of data like x."""
  params, state = jaxbn.bn_init(x.shape[1])
  state = state._replace(
    mean=jnp.asarray(x.mean(0)), var=jnp.asarray(x.var(0)), step=jnp.int32(steps)
  )
  return params, state


def test_a_settled_average_far_from_the_batches_is_stale_not_young():
  """5000 updates at momentum 0.9: settled, whatever its distance (the count decides)."""
  x = _data()
  params, state = _settled(x, 5000)
  shifted = [x[:128] + 3.0, x[128:] + 3.0]  # other data than the statistics'
  report = jaxbn.diagnose(forward, shifted, params=params, state=state)
  assert report.cause == "stale_statistics", str(report)
  assert report.layers[0].updates == 5000 and report.layers[0].window == pytest.approx(10)


def test_the_same_distance_after_few_updates_is_a_young_average():
  x = _data(shift=5.0)
  params, state = jaxbn.bn_init(4)
  state = state._replace(mean=0.3 * jnp.asarray(x.mean(0)), step=jnp.int32(4))
  report = jaxbn.diagnose(
    lambda p, s, x, **kw: jaxbn.bn_train(p, s, x, jaxbn.BNOptions(momentum=0.999), **kw),
    [x[:128], x[128:]],
    params=params,
    state=state,
  )
  assert report.cause == "ema_not_settled", str(report)
  assert "momentum=" not in report.findings[0].fix or "momentum=1.0" not in report.findings[0].fix


def test_a_constant_feature_slightly_off_is_a_note_not_an_alarm():
  x = _data()
  x[:, 2] = 0.5  # a dead unit
  params, state = _settled(x, 5000)
  state = state._replace(mean=state.mean.at[2].add(1e-3), var=state.var.at[2].set(1e-4))
  report = jaxbn.diagnose(forward, [x[:128], x[128:]], params=params, state=state)
  assert report.ok, str(report)
  assert [f.cause for f in report.findings] == ["dead_features"]
  assert report.layers[0].constant == 1 and report.layers[0].local < 0.05


def test_a_jitted_forward_is_still_diagnosed_and_says_what_it_could_not_check():
  x = _data(shift=3.0)
  params, state = jaxbn.bn_init(4)
  with pytest.warns(UserWarning, match="could not be observed"):
    report = jaxbn.diagnose(jax.jit(forward), [x[:128], x[128:]], params=params, state=state)
  assert report.cause == "never_updated"
  assert report.layers[0].options is None


def test_two_float_inputs_are_joint_inputs_not_a_labelled_pair():
  x = _data(shift=3.0)

  def joint(params, state, xs, **kw):
    (a, b), new = jaxbn.bn_train(params, state, xs, jaxbn.BNOptions(momentum=0.9), **kw)
    return jnp.concatenate([a, b]), new

  params, state = jaxbn.bn_init(4)
  report = jaxbn.diagnose(joint, [(x[:64], x[64:128])], params=params, state=state)
  assert report.accuracy == {}
  np.testing.assert_allclose(report.layers[0].batch_mean, x[:128].mean(0), rtol=1e-5)


def test_a_train_state_whose_apply_is_not_a_linen_model_is_refused_by_name():
  state = training.create_train_state(models.MLP(features=(4,)), optax.sgd(0.1), jnp.ones((1, 3)))
  state = state.replace(apply_fn=lambda v, x, **kw: x)
  with pytest.raises(TypeError, match=r"diagnose: state\.apply_fn"):
    jaxbn.diagnose(state, [np.ones((8, 3), np.float32)])


def _caught(run):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = run()
  return out, [w for w in caught if issubclass(w.category, jaxbn.RunningStatsWarning)]


def test_evaluate_is_quiet_after_population_statistics():
  ds = data.load_digits().flat()
  bn = jaxbn.BNOptions(momentum=0.999)
  model = models.MLP(features=(16,), num_classes=10, bn_options=bn)
  state = training.create_train_state(model, optax.adam(1e-2), ds.x_train[:1])
  state, _ = training.fit(state, ds.x_train, ds.y_train, batch_size=60, steps=20)
  _, caught = _caught(lambda: training.evaluate(state, ds.x_test, ds.y_test))
  assert len(caught) == 1  # 20 updates of a window of 1000, from (0, 1)
  batches = [(ds.x_train[i : i + 60], ds.y_train[i : i + 60]) for i in range(0, 600, 60)]
  fixed = training.population_stats(state, batches)
  _, caught = _caught(lambda: training.evaluate(fixed, ds.x_test, ds.y_test))
  assert caught == []


def test_engine_train_says_when_the_state_is_dropped():
  ds = data.load_digits().flat()
  params, state = models.init_mlp(jax.random.key(0), 64, (16,))

  def dropped(params, state, x, *, train):
    logits, _ = models.apply_mlp(params, state, x, train=train)
    return logits, state  # the bug: the new state is not returned

  def evaluate(params, state):
    return jaxbn.engine.accuracy(
      models.apply_mlp(params, state, ds.x_test, train=False)[0], ds.y_test
    )

  _, caught = _caught(
    lambda: jaxbn.engine.train(
      dropped, params, state, ds.x_train, ds.y_train, steps=20, batch_size=30,
      learning_rate=0.1, eval_fn=evaluate, eval_every=10,
    )
  )  # fmt: skip
  assert len(caught) == 1 and "never updated" in str(caught[0].message)
