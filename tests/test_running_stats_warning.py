"""RunningStatsWarning: jaxbn's loops and evaluation say when the running statistics lag."""

import functools
import warnings

import jax
import jax.numpy as jnp
import optax
import pytest

import jaxbn
from jaxbn import data
from jaxbn import engine
from jaxbn import models
from jaxbn import training


def _caught(run):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = run()
  return out, [w for w in caught if issubclass(w.category, jaxbn.RunningStatsWarning)]


def _fit(steps, **options):
  ds = data.load_digits().flat()
  model = models.MLP(features=(16,), num_classes=10, bn_options=jaxbn.BNOptions(**options))
  state = training.create_train_state(model, optax.adam(1e-2), ds.x_train[:1])
  return _caught(
    lambda: training.fit(
      state, ds.x_train, ds.y_train, batch_size=60, steps=steps, eval_data=(ds.x_test, ds.y_test)
    )
  )


def test_fit_warns_once_when_it_evaluates_before_the_window():
  (_, history), caught = _fit(44, momentum=0.999)
  assert len(history["eval_step"]) == 3  # steps 0, 22, 44: one warning for the run
  assert len(caught) == 1
  message = str(caught[0].message)
  assert "22 updates" in message and "1000" in message
  assert "ema_warmup" in message and "population_stats" in message
  assert caught[0].filename == __file__  # points at the caller


@pytest.mark.parametrize("options", [{"momentum": 0.9}, {"momentum": 0.999, "ema_warmup": True}])
def test_fit_is_quiet_when_the_statistics_have_settled(options):
  _, caught = _fit(44, **options)
  assert caught == []


def test_evaluate_warns_about_statistics_never_updated():
  (state, _), _ = _fit(22, momentum=0.9)
  initial = jax.tree.map(lambda t: t * 0, state.batch_stats)
  initial = {k: {**v, "var": v["var"] + 1} for k, v in initial.items()}
  ds = data.load_digits().flat()
  _, caught = _caught(
    lambda: training.evaluate(state.replace(batch_stats=initial), ds.x_test, ds.y_test)
  )
  assert len(caught) == 1 and "never updated" in str(caught[0].message)
  _, caught = _caught(lambda: training.evaluate(state, ds.x_test, ds.y_test))
  assert caught == []


@pytest.mark.parametrize("momentum", [0.999, 0.5])
def test_engine_train_warns_before_the_window(momentum):
  ds = data.load_digits().flat()
  params, state = models.init_mlp(jax.random.key(0), 64, (16,))
  apply = functools.partial(models.apply_mlp, bn_options=jaxbn.BNOptions(momentum=momentum))

  def evaluate(params, state):
    return engine.accuracy(models.apply_mlp(params, state, ds.x_test, train=False)[0], ds.y_test)

  _, caught = _caught(
    lambda: engine.train(
      apply, params, state, ds.x_train, ds.y_train, steps=40, batch_size=30,
      learning_rate=0.1, eval_fn=evaluate, eval_every=20,
    )
  )  # fmt: skip
  if momentum == 0.5:
    assert caught == []
  else:
    assert len(caught) == 1 and "20 updates" in str(caught[0].message)


def test_unsettled_message():
  from jaxbn.diagnosis import unsettled

  opts = [jaxbn.BNOptions(momentum=0.99), jaxbn.BNOptions(momentum=0.999, accumulate_steps=2)]
  young = [(jnp.full(3, 0.4), jnp.full(3, 0.97))]  # 5% of the way to (8, 0.4): kept 0.95
  assert "= 2000 at momentum 0.999" in unsettled("f", opts, 100, young)
  assert unsettled("f", opts, 2000, young) is None  # a window's worth of updates
  # A variance below momentum^t of the initial 1: not a young average from (0, 1).
  assert unsettled("f", opts, 100, [(jnp.full(3, 0.4), jnp.full(3, 0.5))]) is None
  initial = [(jnp.zeros(3), jnp.ones(3))]
  assert unsettled("f", opts, 0, initial) is None  # before training: nothing to say
  assert unsettled("f", [jaxbn.BNOptions(momentum=None)], 3, young) is None
  assert "never updated" in unsettled("f", [jaxbn.BNOptions(momentum=None)], 3, initial)
