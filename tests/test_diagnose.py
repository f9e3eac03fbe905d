"""jaxbn.diagnose on seeded failures: each a small model trained on the digits.

Every failure must be named (cause and layer) by the report's first finding, and
running the fix it prints must close at least 90% of the gap between the
training-mode and the evaluation-mode accuracy where a gap exists. A healthy
model gets no alarm.
"""

import functools

import equinox as eqx
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from flax import nnx

import jaxbn
import jaxbn.equinox
from jaxbn import data
from jaxbn import models
from jaxbn import training
from jaxbn.diagnosis import DEPARTURE

pytestmark = pytest.mark.slow


@functools.cache
def digits():
  return data.load_digits()


def _batches(x, y, size=60, count=6):
  return [(x[i : i + size], y[i : i + size]) for i in range(0, size * count, size)]


def _fit_mlp(momentum, steps, **options):
  ds = digits().flat()
  bn = jaxbn.BNOptions(momentum=momentum, **options)
  model = models.MLP(features=(64, 64), num_classes=10, activation="relu", bn_options=bn)
  state = training.create_train_state(model, optax.adam(1e-2), ds.x_train[:1])
  state, _ = training.fit(state, ds.x_train, ds.y_train, batch_size=60, steps=steps)
  return state


def _run_fix(fix, **names):
  namespace = {"jaxbn": jaxbn, **names}
  exec(fix, namespace)
  return namespace


def _closes_gap(before, after):
  """The gap (train-mode minus eval-mode accuracy) closes by at least 90%."""
  gap = before["train_mode"] - before["eval_mode"]
  assert gap > 0.1, before
  assert before["train_mode"] - after["eval_mode"] <= 0.1 * gap, (before, after)


def test_slow_momentum_is_named_and_population_statistics_close_the_gap():
  ds = digits().flat()
  state = _fit_mlp(0.999, 100)
  test = _batches(ds.x_test, ds.y_test)
  report = jaxbn.diagnose(state, test)
  print(report)
  first = report.findings[0]
  assert (first.cause, first.layer) == ("ema_not_settled", "BatchNorm_0")
  assert report.first_departure == "BatchNorm_0"
  layer = report.layers[0]
  assert layer.updates == 100 and layer.window == pytest.approx(1000)
  # A moving average after 100 updates at 0.999 has covered 1 - 0.999**100 = 9.5% of the way.
  assert 0.03 < layer.ema_progress < 0.2
  # The printed fix, run with training batches, fixes the test accuracy.
  fixed = _run_fix(first.fix, state=state, batches=_batches(ds.x_train, ds.y_train, count=20))
  after = jaxbn.diagnose(fixed["state"], test)
  _closes_gap(report.accuracy, after.accuracy)
  assert after.ok, str(after)


def _mlp_without_state_threading(steps=200):
  """A training loop that drops the state bn_train returns."""
  ds = digits().flat()
  params, state = models.init_mlp(jax.random.key(0), 64, (64, 64))
  forward = functools.partial(models.apply_mlp, train=True, activation="relu")
  tx = optax.adam(1e-2)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, y):
    def loss(p):
      logits, _ = forward(p, state, x)  # the new state is dropped: the bug
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.grad(loss)(params)
    with jaxbn.engine.optimizer_promotion():
      updates, opt = tx.update(grads, opt, params)
      return optax.apply_updates(params, updates), opt

  for i in range(steps):
    j = (i * 60) % (len(ds.x_train) - 60)
    params, opt = step(params, opt, ds.x_train[j : j + 60], ds.y_train[j : j + 60])
  return forward, params, state


def test_state_not_threaded_is_named_for_the_functional_core():
  ds = digits().flat()
  forward, params, state = _mlp_without_state_threading()
  test = _batches(ds.x_test, ds.y_test)
  report = jaxbn.diagnose(forward, test, params=params, state=state)
  print(report)
  first = report.findings[0]
  assert (first.cause, first.layer) == ("never_updated", "[0]")
  assert first.layers == ("[0]", "[1]")
  assert all(r.never_updated and r.ema_progress == 0 for r in report.layers)
  fixed = _run_fix(
    first.fix,
    forward=forward,
    params=params,
    state=state,
    batches=_batches(ds.x_train, ds.y_train, count=20),
  )
  after = jaxbn.diagnose(forward, test, params=params, state=fixed["state"])
  _closes_gap(report.accuracy, after.accuracy)
  assert after.ok, str(after)


class ChannelFirstNet(nn.Module):
  """A conv net on NCHW images whose batch norm takes its axis as told."""

  axis: int = -1

  @nn.compact
  def __call__(self, x, train):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (16, 1, 3, 3))
    dims = ("NCHW", "OIHW", "NCHW")
    h = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=dims)
    h = jaxbn.linen.BatchNorm(use_running_average=not train, axis=self.axis, momentum=0.9)(h)
    return nn.Dense(10)(nn.relu(h).mean((2, 3)))


def test_channel_first_images_with_the_channel_last_axis_are_named():
  ds = digits()
  x_train, x_test = np.moveaxis(ds.x_train, -1, 1), np.moveaxis(ds.x_test, -1, 1)
  test = _batches(x_test, ds.y_test)
  reports = {}
  for axis in (-1, 1):
    state = training.create_train_state(ChannelFirstNet(axis), optax.adam(1e-2), x_train[:1])
    state, _ = training.fit(state, x_train, ds.y_train, batch_size=60, steps=200)
    reports[axis] = jaxbn.diagnose(state, test)
  wrong, right = reports[-1], reports[1]
  print(wrong, right, sep="\n")
  first = wrong.findings[0]
  assert (first.cause, first.layer) == ("wrong_axis", "BatchNorm_0")
  assert "axis=1" in first.fix
  smooth = wrong.layers[0].axis_smoothness
  assert smooth[3] > 0.3 > smooth[1]  # positions correlate with their neighbours, channels not
  assert "wrong_axis" not in [f.cause for f in right.findings]
  gap = wrong.accuracy["train_mode"] - wrong.accuracy["eval_mode"]
  if gap > 0.02:  # where the wrong axis opened a gap, the right one closes it
    assert right.accuracy["train_mode"] - right.accuracy["eval_mode"] <= 0.1 * gap


def _nnx_mlp(steps=200):
  ds = digits().flat()
  model = models.NNXMLP(64, features=(64, 64), num_classes=10, activation="relu", rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss(model):
      logits = model(x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = nnx.grad(loss)(model)
    with jaxbn.engine.optimizer_promotion():
      optimizer.update(model, grads)

  for i in range(steps):
    j = (i * 60) % (len(ds.x_train) - 60)
    step(model, optimizer, ds.x_train[j : j + 60], ds.y_train[j : j + 60])
  return model


def test_batches_of_one_in_training_mode_are_named_for_nnx():
  ds = digits().flat()
  model = _nnx_mlp()
  ones = [(ds.x_test[i : i + 1], ds.y_test[i : i + 1]) for i in range(120)]
  report = jaxbn.diagnose(model, ones, train=True)
  print(report)
  first = report.findings[0]
  assert first.cause == "batch_of_one" and first.layer.endswith("0"), first
  assert report.layers[0].values_per_batch == 1
  # The user's evaluation (training mode, batches of one) against training-mode accuracy on
  # whole batches; the printed fix (evaluation mode) closes the gap.
  whole = jaxbn.diagnose(model, _batches(ds.x_test, ds.y_test), train=True).accuracy
  bad = report.accuracy["train_mode"]
  _run_fix(first.fix, model=model)
  fixed = np.mean([int(np.argmax(model(x)[0]) == y[0]) for x, y in ones])
  assert whole["train_mode"] - bad > 0.3, (whole, bad)
  assert whole["train_mode"] - fixed <= 0.1 * (whole["train_mode"] - bad), (whole, bad, fixed)


@pytest.mark.parametrize("cnn", [False, True])
def test_a_healthy_model_gets_no_alarm(cnn):
  ds = digits()
  if cnn:
    bn = jaxbn.BNOptions(momentum=0.9)
    state = training.create_train_state(models.CNN(bn_options=bn), optax.adam(1e-2), ds.x_train[:1])
    state, _ = training.fit(state, ds.x_train, ds.y_train, batch_size=60, steps=200)
    test = _batches(ds.x_test, ds.y_test)
  else:
    state = _fit_mlp(0.9, 300)
    test = _batches(ds.flat().x_test, ds.flat().y_test)
  report = jaxbn.diagnose(state, test)
  print(report)
  assert report.ok and report.findings == (), str(report)
  assert report.first_departure is None
  assert all(r.local < DEPARTURE and r.in_eval < DEPARTURE for r in report.layers)
  assert all(r.ema_progress is None or r.ema_progress > 0.9 for r in report.layers)
  assert abs(report.accuracy["train_mode"] - report.accuracy["eval_mode"]) < 0.03


def test_equinox_face_and_the_measures_against_numpy():
  """An untrained equinox model: never updated; the batch statistics are NumPy's."""
  model, state = eqx.nn.make_with_state(eqx.nn.Sequential)(
    [
      eqx.nn.Lambda(lambda x: 2 * x + 1),
      jaxbn.equinox.BatchNorm(4, axis_name=None, mode="batch"),
    ]
  )
  x = np.asarray(jax.random.normal(jax.random.key(1), (96, 4)), np.float32)
  batches = [x[:48], x[48:]]
  report = jaxbn.diagnose(model, batches, state=state)
  assert report.cause == "never_updated"
  (layer,) = report.layers
  h = 2 * x.astype(np.float64) + 1
  np.testing.assert_allclose(layer.batch_mean, h.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layer.batch_var, h.var(0), rtol=1e-4, atol=1e-5)
  # The running statistics are (0, 1): the mean shift is the RMS of the standardized means.
  want = np.sqrt(np.mean(np.square(h.mean(0) / np.sqrt(1 + 1e-5))))
  assert layer.mean_shift == pytest.approx(want, rel=1e-4)
  assert layer.values_per_batch == 48 and report.batches == 2
  assert "equinox_population_stats" in report.findings[0].fix
  fixed = _run_fix(report.findings[0].fix, model=model, state=state, batches=batches)
  assert jaxbn.diagnose(model, batches, state=fixed["state"]).ok
  fig = report.plot()
  assert len(fig.axes) == 2


def test_effective_batches_is_kish_count_of_the_moving_average():
  from jaxbn.diagnosis import LayerReport

  def report(momentum, updates):
    z = np.zeros(2)
    return LayerReport(
      "bn", None, jaxbn.BNOptions(momentum=momentum), 8, updates, z, z + 1, z, z + 1,
      0.0, 0.0, 0.0, None, False, 0, None, 0.0, 0.0,
    )  # fmt: skip

  for m, t in [(0.9, 5), (0.99, 300), (0.999, 100)]:
    w = (1 - m) * m ** np.arange(t)
    assert report(m, t).effective_batches == pytest.approx(w.sum() ** 2 / np.sum(w**2), rel=1e-9)
  assert report(None, 10).effective_batches is None
