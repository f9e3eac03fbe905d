"""The plain-JAX training engine: data order, runs at once, optimizers, evaluation, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbn
from jaxbn import engine
from jaxbn import models

IN, N = 6, 40


def _data(n=N, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, IN)).astype(np.float32)
  y = (x[:, 0] + x[:, 1] > 0).astype(np.int32)
  return x, y


_init = functools.partial(models.init_mlp, in_features=IN, features=(8,), num_classes=2)
_apply = functools.partial(models.apply_mlp, bn_options=jaxbn.BNOptions(momentum=0.9))


def _evaluate(x, y):
  def evaluate(params, state):
    logits, _ = models.apply_mlp(params, state, x, train=False)
    return {"accuracy": engine.accuracy(logits, y), "logit": logits[0]}

  return evaluate


def _run(i, tree):
  return jax.tree.map(lambda t: t[i], tree)


def _arrays(out):
  return jax.tree.leaves((out.params, out.state, out.evals, out.losses, out.finite))


def test_batches_are_shuffled_epochs():
  idx = engine.batch_indices(3, n=130, steps=5, batch_size=60)
  assert idx.shape == (5, 60)
  # Two batches per epoch (10 examples dropped): each epoch visits 120 distinct examples.
  for epoch in (idx[0:2], idx[2:4]):
    assert len(np.unique(epoch)) == 120
  assert not np.array_equal(idx[0], idx[2])


def test_batch_indices_from_any_step_continue_the_same_order():
  whole = engine.batch_indices(1, n=50, steps=9, batch_size=8)
  for start in range(9):
    part = engine.batch_indices(1, n=50, steps=9 - start, batch_size=8, start=start)
    np.testing.assert_array_equal(part, whole[start:])


@pytest.mark.slow
def test_vectorized_looped_and_single_runs_agree():
  x, y = _data()
  seeds, lrs = [0, 1, 2], [0.1, 0.5, 0.5]
  kw = dict(steps=7, batch_size=8, eval_fn=_evaluate(x, y), eval_every=3)
  params, state = engine.init_runs(_init, seeds)
  together = engine.train(_apply, params, state, x, y, learning_rate=lrs, seed=seeds, **kw)
  looped = engine.train(
    _apply, params, state, x, y, learning_rate=lrs, seed=seeds, vectorize=False, **kw
  )
  assert together.eval_steps == looped.eval_steps == [0, 3, 6, 7]
  assert together.losses.shape == (3, 7) and together.evals["logit"].shape == (3, 4, 2)
  for a, b in zip(_arrays(together), _arrays(looped), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  p, st = _init(jax.random.key(seeds[1]))
  one = engine.train(_apply, p, st, x, y, learning_rate=lrs[1], seed=seeds[1], **kw)
  assert one.losses.shape == (7,) and bool(one.finite)
  for a, b in zip(_arrays(one), _run(1, _arrays(together)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Runs differ by seed (data order, weights) and rate.
  assert not np.allclose(together.losses[1], together.losses[2])


@pytest.mark.slow
def test_evaluation_steps_and_callback():
  x, y = _data()
  params, state = _init(jax.random.key(0))
  seen = []

  def callback(step, params, state):
    seen.append((step, int(state[0].step)))

  out = engine.train(
    _apply,
    params,
    state,
    x,
    y,
    steps=10,
    batch_size=8,
    learning_rate=0.1,
    eval_fn=_evaluate(x, y),
    eval_every=[4, 1, 4],
    callback=callback,
  )
  assert out.eval_steps == [1, 4] and seen == [(1, 1), (4, 4)]
  assert out.evals["accuracy"].shape == (2,)
  assert int(out.state[0].step) == 10 and out.losses.shape == (10,)
  no_eval = engine.train(_apply, params, state, x, y, steps=10, batch_size=8, learning_rate=0.1)
  assert no_eval.eval_steps == [] and no_eval.evals is None
  np.testing.assert_allclose(no_eval.losses, out.losses, rtol=1e-6)


@pytest.mark.slow
def test_optax_optimizers():
  x, y = _data()
  params, state = _init(jax.random.key(0))
  kw = dict(steps=6, batch_size=8)
  plain = engine.train(_apply, params, state, x, y, learning_rate=0.3, **kw)
  sgd = engine.train(_apply, params, state, x, y, tx=optax.sgd(0.3), **kw)
  for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(sgd.params), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # A function of the rate gives each run its own optimizer.
  params, state = engine.init_runs(_init, [0, 0])
  adam = engine.train(
    _apply, params, state, x, y, tx=optax.adam, learning_rate=[1e-3, 1e-2], seed=[0, 0], **kw
  )
  assert int(adam.opt_state[0].count[0]) == 6
  one = engine.train(
    _apply, _run(1, params), _run(1, state), x, y, tx=optax.adam(1e-2), seed=0, **kw
  )
  np.testing.assert_allclose(adam.losses[1], one.losses, rtol=1e-5)
  assert not np.allclose(adam.losses[0], adam.losses[1])


def test_a_diverging_run_is_flagged():
  x, y = _data()
  params, state = engine.init_runs(_init, [0, 1])
  out = engine.train(
    _apply, params, state, x, y, steps=4, batch_size=8, learning_rate=[0.1, np.inf], seed=[0, 1]
  )
  assert out.finite.tolist() == [True, False]


def test_nothing_is_printed(capsys):
  x, y = _data()
  params, state = _init(jax.random.key(0))
  engine.train(_apply, params, state, x, y, steps=3, batch_size=8, learning_rate=0.1)
  assert capsys.readouterr() == ("", "")


def test_accuracy():
  logits = jnp.array([[0.0, 1.0], [3.0, 1.0], [0.0, 2.0]])
  assert float(engine.accuracy(logits, jnp.array([1, 0, 0]))) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
  ("kw", "message"),
  [
    ({"learning_rate": None}, "give learning_rate"),
    ({"tx": optax.sgd(0.1)}, "not both or neither"),
    ({"steps": 0}, "steps must be a positive integer"),
    ({"batch_size": 41}, r"batch_size must be an int in \[1, 40\]"),
    ({"eval_every": [0, 11]}, r"evaluation steps must lie in \[0, 10\]"),
    ({"eval_every": 0}, "eval_every must be a positive integer"),
    ({"seed": [0, 1], "learning_rate": [0.1, 0.2, 0.3]}, "2 runs .* one per run"),
    ({"learning_rate": [0.1, 0.2]}, "one run .* takes one learning rate"),
  ],
)
def test_bad_arguments_are_clear_errors(kw, message):
  x, y = _data()
  params, state = _init(jax.random.key(0))
  args = {"steps": 10, "batch_size": 8, "learning_rate": 0.1, **kw}
  with pytest.raises(ValueError, match=message):
    engine.train(_apply, params, state, x, y, **args)
