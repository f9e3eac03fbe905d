"""Gradient accumulation: ``accumulate_steps=k`` updates the running statistics once per k calls.

References: float64 NumPy statistics of the k micro-batches concatenated, and
flax's BatchNorm applied to the concatenated batch; for the parameters,
``optax.MultiSteps`` against the mean of flax's per-micro-batch gradients.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxbn
from jaxbn import linen as jbn_linen
from jaxbn import nnx as jbn_nnx
from jaxbn import training

K = 3
MICRO = 6
FEATURES = 4
EPS32 = float(jnp.finfo(jnp.float32).eps)
TOL = dict(rtol=50 * EPS32, atol=50 * EPS32)


def _data(seed=0, n=K * MICRO, d=FEATURES):
  rng = np.random.default_rng(seed)
  # Micro-batches with different means and spreads: their own statistics differ
  # clearly from the concatenation's.
  shift = np.repeat(rng.normal(size=(n // MICRO, d)) * 3, MICRO, axis=0)
  return (rng.normal(size=(n, d)) * rng.uniform(0.5, 2, (n, 1)) + 10 + shift).astype(np.float32)


def _micro(x):
  return [x[i * MICRO : (i + 1) * MICRO] for i in range(len(x) // MICRO)]


@pytest.mark.parametrize(
  "options",
  [
    dict(momentum=0.9),
    dict(momentum=None),
    dict(momentum=0.9, ema_warmup=True),
    dict(momentum=0.5, running_var="unbiased"),
    dict(momentum=0.9, ghost_batch_size=2),
  ],
  ids=["ema", "cumulative", "warmup", "unbiased", "ghost"],
)
def test_k_micro_batches_update_once_with_the_concatenated_statistics(options):
  x = _data()
  params, state = jaxbn.bn_init(FEATURES, accumulate_steps=K)
  params = params._replace(scale=jnp.full(FEATURES, 1.5), bias=jnp.full(FEATURES, -0.5))
  start = state
  step = jax.jit(functools.partial(jaxbn.bn_train, accumulate_steps=K, **options))
  for i, xb in enumerate(_micro(x)):
    y, state = step(params, state, xb)
    # Each micro-batch is normalized with its own statistics (its ghost batches' with ghosts).
    g = options.get("ghost_batch_size", MICRO)
    xg = np.asarray(xb, np.float64).reshape(MICRO // g, g, FEATURES)
    want = (xg - xg.mean(1, keepdims=True)) / np.sqrt(xg.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, (1.5 * want - 0.5).reshape(MICRO, FEATURES), rtol=1e-5, atol=2e-5)
    assert int(state.step) == i + 1
    if i < K - 1:  # the running statistics do not move for k - 1 calls
      for name in ("mean", "var", "count"):
        np.testing.assert_array_equal(getattr(state, name), getattr(start, name), err_msg=name)
      np.testing.assert_array_equal(state.acc.count, (i + 1) * MICRO)
  # The k-th call: one update with the statistics of the concatenation.
  _, whole = jaxbn.bn_train(params, jaxbn.bn_init(FEATURES)[1], x, **options)
  np.testing.assert_allclose(state.mean, whole.mean, **TOL)
  np.testing.assert_allclose(state.var, whole.var, **TOL)
  np.testing.assert_allclose(state.count, whole.count, **TOL)
  np.testing.assert_array_equal(state.acc.count, 0)  # emptied for the next cycle
  # ... and against float64 NumPy.
  x64 = np.asarray(x, np.float64)
  n = len(x64)
  ddof = 1 if options.get("running_var") == "unbiased" else 0
  mom = options["momentum"]
  if mom is None or options.get("ema_warmup"):  # count 0: the batch's statistics
    mean, var = x64.mean(0), x64.var(0, ddof=ddof)
  else:
    mean, var = (1 - mom) * x64.mean(0), mom + (1 - mom) * x64.var(0, ddof=ddof)
  np.testing.assert_allclose(state.mean, mean, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state.var, var, rtol=1e-5, atol=1e-5)
  assert n == K * MICRO


def test_cycles_repeat():
  x, x2 = _data(0), _data(1)
  params, state = jaxbn.bn_init(FEATURES, accumulate_steps=K)
  _, ref = jaxbn.bn_init(FEATURES)
  for xb in _micro(np.concatenate([x, x2])):
    _, state = jaxbn.bn_train(params, state, xb, momentum=0.8, accumulate_steps=K)
  for whole in (x, x2):
    _, ref = jaxbn.bn_train(params, ref, whole, momentum=0.8)
  assert int(state.step) == 2 * K and int(ref.step) == 2
  np.testing.assert_allclose(state.mean, ref.mean, **TOL)
  np.testing.assert_allclose(state.var, ref.var, **TOL)


def test_masked_micro_batches():
  x = _data()
  mask = np.random.default_rng(3).random(len(x)) < 0.6
  params, state = jaxbn.bn_init(FEATURES, accumulate_steps=K)
  for xb, mb in zip(_micro(x), _micro(mask), strict=True):
    _, state = jaxbn.bn_train(
      params, state, xb, momentum=None, mask=mb[:, None], accumulate_steps=K
    )
  kept = np.asarray(x[mask], np.float64)
  np.testing.assert_allclose(state.count, len(kept))
  np.testing.assert_allclose(state.mean, kept.mean(0), rtol=1e-5)
  np.testing.assert_allclose(state.var, kept.var(0), rtol=1e-5)


def test_one_is_the_default_state_and_step():
  params, state = jaxbn.bn_init(FEATURES, accumulate_steps=1)
  assert type(state) is jaxbn.BNState and len(state) == 4
  x = _data()[:MICRO]
  y1, s1 = jaxbn.bn_train(params, state, x, accumulate_steps=1)
  y0, s0 = jaxbn.bn_train(params, state, x)
  np.testing.assert_array_equal(y1, y0)
  jax.tree.map(np.testing.assert_array_equal, s1, s0)


def test_an_accumulating_state_keeps_its_kind_when_a_step_does_not_accumulate():
  # A BNAccState through bn_train with accumulate_steps=1 (a layer whose accumulation is switched
  # off for a run) stays a BNAccState with its acc untouched, for every batch, so that a scan
  # carry keeps one structure; its statistics are the plain state's.
  params, acc_state = jaxbn.bn_init(FEATURES, accumulate_steps=3)
  _, plain = jaxbn.bn_init(FEATURES)
  x = _data()[:MICRO]
  _, new = jaxbn.bn_train(params, acc_state, x)
  _, want = jaxbn.bn_train(params, plain, x)
  assert type(new) is jaxbn.BNAccState
  jax.tree.map(np.testing.assert_array_equal, tuple(new[:4]), tuple(want))
  jax.tree.map(np.testing.assert_array_equal, new.acc, acc_state.acc)
  with pytest.warns(jaxbn.SingleValueWarning):
    _, single = jaxbn.bn_train(params, acc_state, x[:1])
  assert jax.tree.structure(single) == jax.tree.structure(new)

  def step(s, xb):
    return jaxbn.bn_train(params, s, xb)[1], None

  final, _ = jax.lax.scan(step, acc_state, x.reshape(2, MICRO // 2, FEATURES))
  assert type(final) is jaxbn.BNAccState and int(final.step) == 2


def test_bad_accumulate_steps():
  params, state = jaxbn.bn_init(FEATURES)
  x = _data()[:MICRO]
  with pytest.raises(ValueError, match=r"bn_init\(\.\.\., accumulate_steps=3\)"):
    jaxbn.bn_train(params, state, x, accumulate_steps=3)
  for bad in (0, -2, 1.5, True):
    with pytest.raises(ValueError, match="accumulate_steps must be a positive int"):
      jaxbn.bn_train(params, state, x, accumulate_steps=bad)
    with pytest.raises(ValueError, match="accumulate_steps must be a positive int"):
      jaxbn.bn_init(FEATURES, accumulate_steps=bad)


def _flax_stats_of_concatenation(x, momentum):
  bn = nn.BatchNorm(use_running_average=False, momentum=momentum, use_fast_variance=False)
  variables = bn.init(jax.random.key(0), x)
  _, upd = bn.apply(variables, x, mutable=["batch_stats"])
  return upd["batch_stats"]


def test_linen_module_against_flax_on_the_concatenation():
  x = _data()
  bn = jbn_linen.BatchNorm(use_running_average=False, momentum=0.7, accumulate_steps=K)
  variables = bn.init(jax.random.key(0), x[:MICRO])
  assert sorted(variables["batch_stats"]) == [
    "acc_count",
    "acc_m2",
    "acc_mean",
    "mean",
    "step",
    "var",
  ]
  for xb in _micro(x):
    _, upd = bn.apply(variables, xb, mutable=["batch_stats"])
    variables = {**variables, **upd}
  want = _flax_stats_of_concatenation(x, 0.7)
  np.testing.assert_allclose(variables["batch_stats"]["mean"], want["mean"], **TOL)
  np.testing.assert_allclose(variables["batch_stats"]["var"], want["var"], **TOL)
  # accumulate_steps=1 keeps the default variables (checkpoints of existing layers load).
  plain = jbn_linen.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  assert sorted(plain["batch_stats"]) == ["mean", "var"]


def test_nnx_module_against_flax_on_the_concatenation():
  x = _data()
  bn = jbn_nnx.BatchNorm(FEATURES, momentum=0.7, accumulate_steps=K, rngs=nnx.Rngs(0))
  for i, xb in enumerate(_micro(x)):
    bn(xb)
    if i < K - 1:
      np.testing.assert_array_equal(bn.mean[...], 0)
  want = _flax_stats_of_concatenation(x, 0.7)
  np.testing.assert_allclose(bn.mean[...], want["mean"], **TOL)
  np.testing.assert_allclose(bn.var[...], want["var"], **TOL)
  assert int(bn.step[...]) == K and float(bn.acc_count[...][0]) == 0
  plain = jbn_nnx.BatchNorm(FEATURES, rngs=nnx.Rngs(0))
  assert plain.step is None and plain.acc_count is None


class _Net(nn.Module):
  """Dense -> BatchNorm -> tanh -> Dense, the batch norm given as a factory."""

  bn: type

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(5, use_bias=False)(x)
    x = self.bn(use_running_average=not train)(x)
    return nn.Dense(3)(jnp.tanh(x))


def test_multisteps_train_step_against_flax_micro_batches_and_the_whole_batch():
  x = _data()
  y = np.random.default_rng(1).integers(0, 3, len(x)).astype(np.int32)
  jbn = functools.partial(jbn_linen.BatchNorm, momentum=0.8, accumulate_steps=K)
  fbn = functools.partial(nn.BatchNorm, momentum=0.8, use_fast_variance=False)
  lr = 0.3
  tx = optax.MultiSteps(optax.sgd(lr), every_k_schedule=K)
  state = training.create_train_state(_Net(bn=jbn), tx, x[:1], key=2)
  start = state
  for i, (xb, yb) in enumerate(zip(_micro(x), _micro(y), strict=True)):
    state, _ = training.train_step(state, (xb, yb))
    if i < K - 1:
      jax.tree.map(np.testing.assert_array_equal, state.params, start.params)
      bs = state.batch_stats["BatchNorm_0"]
      np.testing.assert_array_equal(bs["mean"], start.batch_stats["BatchNorm_0"]["mean"])
      np.testing.assert_array_equal(bs["var"], start.batch_stats["BatchNorm_0"]["var"])

  # Parameters: MultiSteps's update, the mean of the micro-batches' gradients,
  # each micro-batch normalized by its own statistics (flax's BatchNorm).
  flax_model = _Net(bn=fbn)
  variables = {
    "params": start.params,
    "batch_stats": {
      "BatchNorm_0": {
        k: v for k, v in start.batch_stats["BatchNorm_0"].items() if k in ("mean", "var")
      }
    },
  }

  def loss(params, xb, yb):
    logits, _ = flax_model.apply(
      {**variables, "params": params}, xb, train=True, mutable=["batch_stats"]
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  grads = [
    jax.grad(loss)(start.params, xb, yb) for xb, yb in zip(_micro(x), _micro(y), strict=True)
  ]
  mean_grad = jax.tree.map(lambda *g: sum(g) / K, *grads)
  want = jax.tree.map(lambda p, g: p - lr * g, start.params, mean_grad)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state.params, want
  )
  assert int(state.step) == K

  # Running statistics: one update with the statistics of the whole batch
  # (its Dense output with the parameters the micro-batches saw).
  h = np.asarray(x, np.float64) @ np.asarray(start.params["Dense_0"]["kernel"], np.float64)
  bs = state.batch_stats["BatchNorm_0"]
  np.testing.assert_allclose(bs["mean"], 0.2 * h.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bs["var"], 0.8 + 0.2 * h.var(0), rtol=1e-5, atol=1e-6)
  whole = jax.jit(lambda v, x: flax_model.apply(v, x, train=True, mutable=["batch_stats"])[1])
  flax_stats = whole(variables, x)["batch_stats"]["BatchNorm_0"]
  np.testing.assert_allclose(bs["mean"], flax_stats["mean"], **TOL)
  np.testing.assert_allclose(bs["var"], flax_stats["var"], **TOL)


def test_population_statistics_of_accumulating_layers():
  """Population statistics update once per batch, whatever the layers accumulate in training."""
  x = _data()
  bn = jbn_nnx.BatchNorm(FEATURES, accumulate_steps=K, rngs=nnx.Rngs(0))
  jaxbn.nnx_population_stats(bn, _micro(x)[:2])
  np.testing.assert_allclose(bn.mean[...], x[: 2 * MICRO].astype(np.float64).mean(0), rtol=1e-5)
  np.testing.assert_allclose(bn.var[...], x[: 2 * MICRO].astype(np.float64).var(0), rtol=1e-4)
  np.testing.assert_array_equal(bn.acc_count[...], 0)  # the accumulator is left as it was
  layer = jbn_linen.BatchNorm(use_running_average=False, accumulate_steps=K)
  variables = layer.init(jax.random.key(0), x[:MICRO])
  out = jaxbn.linen_population_stats(layer, variables, _micro(x)[:2])
  np.testing.assert_allclose(
    out["batch_stats"]["mean"], x[: 2 * MICRO].astype(np.float64).mean(0), rtol=1e-5
  )
