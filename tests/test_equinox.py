"""jaxbn.equinox.BatchNorm is a drop-in for equinox.nn.BatchNorm, computed by the core.

References: equinox.nn.BatchNorm itself (the same program run with either
class), and the float64 NumPy formulas of tests/reference.py.
"""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbn
from jaxbn import equinox as jeqx
from tests.reference import bn_infer_ref
from tests.reference import bn_train_ref

BATCH = "batch"


def _x(shape, seed=0, loc=0.0, scale=2.0):
  return jax.random.normal(jax.random.key(seed), shape) * scale + loc


def _vmapped(f, axis_name=BATCH):
  # Compiled as one program: faster than op-by-op dispatch of the eager vmap.
  return jax.jit(jax.vmap(f, in_axes=(0, None), out_axes=(0, None), axis_name=axis_name))


# --------------------------------------------------------------------------
# One Equinox program, run with either class.


class MLP(eqx.Module):
  layers: eqx.nn.Sequential

  def __init__(self, bn_cls, mode, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.layers = eqx.nn.Sequential(
      [
        eqx.nn.Linear(6, 8, use_bias=False, key=k1),
        bn_cls(8, BATCH, mode=mode),
        eqx.nn.Lambda(jax.nn.relu),
        eqx.nn.Linear(8, 8, use_bias=False, key=k2),
        bn_cls(8, BATCH, mode=mode),
        eqx.nn.Lambda(jax.nn.relu),
        eqx.nn.Linear(8, 3, key=k3),
      ]
    )

  def __call__(self, x, state):
    return self.layers(x, state)


class ConvNet(eqx.Module):
  conv1: eqx.nn.Conv2d
  bn1: eqx.Module
  conv2: eqx.nn.Conv2d
  bn2: eqx.Module
  head: eqx.nn.Linear

  def __init__(self, bn_cls, mode, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.conv1 = eqx.nn.Conv2d(2, 4, 3, padding=1, use_bias=False, key=k1)
    self.bn1 = bn_cls(4, BATCH, mode=mode)
    self.conv2 = eqx.nn.Conv2d(4, 5, 3, padding=1, key=k2)
    self.bn2 = bn_cls(5, BATCH, mode=mode)
    self.head = eqx.nn.Linear(5, 3, key=k3)

  def __call__(self, x, state):
    x, state = self.bn1(self.conv1(x), state)
    x, state = self.bn2(self.conv2(jax.nn.relu(x)), state)
    return self.head(jnp.mean(jax.nn.relu(x), axis=(1, 2))), state


def _program(net_cls, bn_cls, mode, xs, labels, tmp_path):
  """An Equinox training program: make_with_state, filter_vmap, optax, inference, serialisation.

  Returns the training logits and losses of each step, the gradients of the
  first step, the inference logits, and those after a serialise round trip.
  """
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model, state = eqx.nn.make_with_state(net_cls)(bn_cls, mode, jax.random.key(0))
  opt = optax.sgd(0.05, momentum=0.9)
  opt_state = opt.init(eqx.filter(model, eqx.is_array))

  def loss_fn(model, state, x, y):
    logits, state = eqx.filter_vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name=BATCH)(
      x, state
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits, state)

  @eqx.filter_jit
  def step(model, state, opt_state, x, y):
    grads, (logits, state) = eqx.filter_grad(loss_fn, has_aux=True)(model, state, x, y)
    updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), state, opt_state, logits, grads

  out = {"logits": [], "grads": None}
  for x, y in zip(xs, labels, strict=True):
    model, state, opt_state, logits, grads = step(model, state, opt_state, x, y)
    out["logits"].append(np.asarray(logits))
    if out["grads"] is None:
      out["grads"] = [np.asarray(g) for g in jax.tree.leaves(eqx.filter(grads, eqx.is_array))]
  infer = eqx.nn.inference_mode(model)
  call = eqx.filter_jit(
    lambda m, s, x: eqx.filter_vmap(m, in_axes=(0, None), out_axes=(0, None), axis_name=BATCH)(
      x, s
    )[0]
  )
  out["infer"] = np.asarray(call(infer, state, xs[0]))
  path = tmp_path / f"{bn_cls.__module__}.eqx"
  eqx.tree_serialise_leaves(path, (model, state))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    like = eqx.nn.make_with_state(net_cls)(bn_cls, mode, jax.random.key(1))
  model2, state2 = eqx.tree_deserialise_leaves(path, like)
  out["deserialised"] = np.asarray(call(eqx.nn.inference_mode(model2), state2, xs[0]))
  return out


# The MLP in "batch" mode in the fast tier; the other three with the slow tests.
@pytest.mark.parametrize(
  ("net_cls", "shape", "mode"),
  [
    pytest.param(MLP, (16, 6), "batch", id="mlp-batch"),
    pytest.param(MLP, (16, 6), "ema", id="mlp-ema", marks=pytest.mark.slow),
    pytest.param(ConvNet, (8, 2, 6, 6), "batch", id="conv-batch", marks=pytest.mark.slow),
    pytest.param(ConvNet, (8, 2, 6, 6), "ema", id="conv-ema", marks=pytest.mark.slow),
  ],
)
def test_an_equinox_program_runs_unchanged_and_gives_equinox_outputs(
  tmp_path, net_cls, shape, mode
):
  xs = [_x(shape, seed=s, loc=1.0) for s in range(4)]
  labels = [jax.random.randint(jax.random.key(100 + s), (shape[0],), 0, 3) for s in range(4)]
  # equinox's inference in "batch" mode raises under strict dtype promotion (float ** int32).
  with jax.numpy_dtype_promotion("standard"):
    ref = _program(net_cls, eqx.nn.BatchNorm, mode, xs, labels, tmp_path)
  ours = _program(net_cls, jeqx.BatchNorm, mode, xs, labels, tmp_path)
  for step, (a, b) in enumerate(zip(ours["logits"], ref["logits"], strict=True)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"training step {step}")
  for a, b in zip(ours["grads"], ref["grads"], strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(ours["infer"], ref["infer"], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(ours["deserialised"], ours["infer"])


# --------------------------------------------------------------------------
# The layer against float64 formulas.


def test_batch_mode_trains_as_algorithm_1_and_infers_with_equinox_debiasing():
  bn, state = eqx.nn.make_with_state(jeqx.BatchNorm)(3, BATCH, momentum=0.9, mode="batch")
  bn = eqx.tree_at(lambda b: (b.weight, b.bias), bn, (_x((3,), 1), _x((3,), 2)))
  mean, var = np.zeros(3), np.ones(3)
  for t in range(3):
    x = _x((12, 3), seed=10 + t, loc=3.0 * t)
    y, state = _vmapped(bn)(x, state)
    want, mean, var = bn_train_ref(x, bn.weight, bn.bias, mean, var, momentum=0.9, axis=-1)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  _, s = bn.read(state)
  np.testing.assert_allclose(s.mean, mean, rtol=1e-5)
  np.testing.assert_allclose(s.var, var, rtol=1e-5)
  assert int(s.step) == 3
  x = _x((5, 3), seed=50)
  y, state2 = _vmapped(eqx.nn.inference_mode(bn))(x, state)
  factor = 1 - 0.9**3  # equinox's zero-debiasing, the initial variance 1 included
  want = bn_infer_ref(x, bn.weight, bn.bias, mean / factor, var / factor, axis=-1)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert jax.tree.all(jax.tree.map(jnp.array_equal, state2, state))  # inference: no update


def test_ema_warmup_keeps_the_exact_average_and_is_used_as_stored():
  opts = jaxbn.BNOptions(ema_warmup=True)
  bn, state = eqx.nn.make_with_state(jeqx.BatchNorm)(2, BATCH, mode="batch", options=opts)
  xs = [_x((8, 2), seed=s, loc=5.0) for s in range(3)]
  for x in xs:
    _, state = _vmapped(bn)(x, state)
  _, s = bn.running(state)
  every = np.concatenate([np.asarray(x, np.float64) for x in xs])
  np.testing.assert_allclose(s.mean, every.mean(0), rtol=1e-5)
  assert bn.extra_state_index is not None  # count is stored


def test_ema_mode_normalizes_with_the_updated_running_statistics():
  bn, state = eqx.nn.make_with_state(jeqx.BatchNorm)(
    2, BATCH, momentum=0.8, channelwise_affine=False, mode="ema"
  )
  x1, x2 = _x((10, 2), seed=1, loc=2.0), _x((10, 2), seed=2, loc=-1.0)
  y1, state = _vmapped(bn)(x1, state)  # first call: the batch's own statistics
  want, _, _ = bn_train_ref(x1, np.ones(2), np.zeros(2), np.zeros(2), np.ones(2))
  np.testing.assert_allclose(y1, want, rtol=1e-5, atol=1e-5)
  y2, state = _vmapped(bn)(x2, state)
  x1d, x2d = np.asarray(x1, np.float64), np.asarray(x2, np.float64)
  mean = 0.8 * x1d.mean(0) + 0.2 * x2d.mean(0)
  var = 0.8 * x1d.var(0) + 0.2 * x2d.var(0)
  np.testing.assert_allclose(y2, (x2d - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(state.get(bn.ema_state_index)[0], mean, rtol=1e-5)


def test_ema_mode_is_filled_by_the_first_batch_that_can_fill_it():
  bn, state = eqx.nn.make_with_state(jeqx.BatchNorm)(2, BATCH, momentum=0.9, mode="ema")
  _, state = _vmapped(bn)(_x((1, 2), seed=1), state)  # one value per feature: nothing to fill
  assert bool(state.get(bn.ema_first_time_index))
  x = _x((12, 2), seed=2, loc=5.0)
  _, state = _vmapped(bn)(x, state)
  assert not bool(state.get(bn.ema_first_time_index))
  np.testing.assert_allclose(state.get(bn.ema_state_index)[0], np.asarray(x).mean(0), rtol=1e-5)


def test_ema_mode_before_training_is_not_equinox_316x():
  x = _x((4, 3), seed=3)
  ours, s = eqx.nn.make_with_state(jeqx.BatchNorm)(3, BATCH, mode="ema", inference=True)
  y, _ = _vmapped(ours)(x, s)
  np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_exact_far_from_zero():
  bn, state = eqx.nn.make_with_state(jeqx.BatchNorm)(4, BATCH, mode="batch")
  x = 1e4 + _x((256, 4), seed=4, scale=1.0)
  y, _ = _vmapped(bn)(x, state)
  jaxbn.testing.assert_normalized(y, rtol=0.0)  # std within 1e-3


# --------------------------------------------------------------------------
# Beyond equinox.


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_without_axis_name_a_plain_call_takes_the_whole_batch(mode):
  x = _x((6, 3, 4, 4), seed=5, loc=1.0)
  per_example, s1 = eqx.nn.make_with_state(jeqx.BatchNorm)(3, BATCH, mode=mode)
  whole, s2 = eqx.nn.make_with_state(jeqx.BatchNorm)(3, mode=mode)
  assert whole.axis_name is None
  y1, s1 = _vmapped(per_example)(x, s1)
  y2, s2 = whole(x, s2)
  np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(whole.read(s2)[1].mean, per_example.read(s1)[1].mean, rtol=1e-6)
  with pytest.raises(ValueError, match="whole batch of shape"):
    whole(x[0, :, 0, 0], s2)


def test_nested_vmaps_with_a_tuple_of_axis_names_use_the_whole_batch():
  x = _x((4, 5, 3), seed=6)
  bn, state = eqx.nn.make_with_state(jeqx.BatchNorm)(3, ("outer", "inner"), mode="batch")
  f = jax.vmap(bn, in_axes=(0, None), out_axes=(0, None), axis_name="inner")
  f = jax.vmap(f, in_axes=(0, None), out_axes=(0, None), axis_name="outer")
  y, state = f(x, state)
  want, mean, _ = bn_train_ref(x.reshape(20, 3), np.ones(3), np.zeros(3), np.zeros(3), np.ones(3))
  np.testing.assert_allclose(y.reshape(20, 3), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(bn.read(state)[1].mean, mean, rtol=1e-5, atol=1e-7)


def test_an_ensemble_over_a_batch_keeps_one_state_per_member():
  x = _x((2, 8, 3), seed=7)
  bn, state = eqx.nn.make_with_state(jeqx.BatchNorm)(3, BATCH, mode="batch")
  f = jax.vmap(_vmapped(bn), in_axes=(0, None))  # members, then examples
  y, states = f(x, state)
  assert states.get(bn.batch_state_index)[0].shape == (2, 3)
  for k in range(2):
    want, _, _ = bn_train_ref(x[k], np.ones(3), np.zeros(3), np.zeros(3), np.ones(3))
    np.testing.assert_allclose(y[k], want, rtol=1e-5, atol=1e-5)


def test_axis_name_is_static_and_not_a_leaf():
  bn = jeqx.BatchNorm(3, ("a", "b"), mode="batch")
  assert bn.axis_name == ("a", "b")
  assert not any(isinstance(leaf, str) for leaf in jax.tree.leaves(bn))
  assert jeqx.BatchNorm(3, ["a", "b"], mode="batch").axis_name == ("a", "b")


def test_mask_and_options_reach_the_core():
  x = _x((10, 3), seed=8, loc=2.0)
  keep = jnp.arange(10) < 7
  bn, state = eqx.nn.make_with_state(jeqx.BatchNorm)(
    3, BATCH, mode="batch", options=jaxbn.BNOptions(momentum=None)
  )
  f = jax.vmap(
    lambda x, m, s: bn(x, s, mask=m), in_axes=(0, 0, None), out_axes=(0, None), axis_name=BATCH
  )
  _, state = f(x, jnp.broadcast_to(keep[:, None], x.shape), state)
  _, s = bn.read(state)
  np.testing.assert_allclose(s.mean, np.asarray(x)[:7].mean(0), rtol=1e-5)
  np.testing.assert_array_equal(s.count, 7.0)
  # A keyword given wins over options; ghost batches through options.
  bn = jeqx.BatchNorm(3, BATCH, eps=1e-3, mode="batch", options=jaxbn.BNOptions(epsilon=0.5))
  assert bn.eps == 1e-3
  ghost, gs = eqx.nn.make_with_state(jeqx.BatchNorm)(
    3, mode="batch", options=jaxbn.BNOptions(ghost_batch_size=5)
  )
  y, _ = ghost(x, gs)
  want, _, _ = bn_train_ref(x[5:], np.ones(3), np.zeros(3), np.zeros(3), np.ones(3))
  np.testing.assert_allclose(y[5:], want, rtol=1e-5, atol=1e-5)


def test_gradient_accumulation_updates_once_per_cycle():
  opts = jaxbn.BNOptions(accumulate_steps=2, momentum=0.5)
  bn, state = eqx.nn.make_with_state(jeqx.BatchNorm)(2, mode="batch", options=opts)
  a, b = _x((6, 2), seed=9), _x((6, 2), seed=10, loc=3.0)
  _, state = bn(a, state)
  assert np.array_equal(bn.read(state)[1].mean, np.zeros(2))
  _, state = bn(b, state)
  both = np.concatenate([np.asarray(a, np.float64), np.asarray(b, np.float64)])
  np.testing.assert_allclose(bn.read(state)[1].mean, 0.5 * both.mean(0), rtol=1e-5)


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"mode": "fast"}, "mode must be 'batch' or 'ema'"),
    ({"mode": "batch", "options": jaxbn.BNOptions(axis=0)}, "channel axis"),
    ({"mode": "ema", "options": jaxbn.BNOptions(ghost_batch_size=2)}, "mode='batch'"),
    ({"mode": "batch", "options": {"momentum": 0.9}}, r"BatchNorm: options must be a jaxbn.BNOpt"),
  ],
)
def test_bad_construction_names_the_argument(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    jeqx.BatchNorm(3, BATCH, **kwargs)


def test_legacy_mode_warns_as_equinox_and_is_ema():
  with pytest.warns(UserWarning, match="defaults to 'ema'"):
    bn = jeqx.BatchNorm(3, BATCH)
  assert bn.mode == "ema"


def test_an_unbound_axis_name_is_equinox_name_error():
  bn, state = eqx.nn.make_with_state(jeqx.BatchNorm)(3, BATCH, mode="batch")
  with pytest.raises(NameError):
    jax.vmap(bn, in_axes=(0, None), out_axes=(0, None))(jnp.ones((4, 3)), state)


# --------------------------------------------------------------------------
# Carry-over, population statistics, folding.


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_from_equinox_carries_a_trained_model_over(mode):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model, state = eqx.nn.make_with_state(MLP)(eqx.nn.BatchNorm, mode, jax.random.key(0))
  for s in range(3):
    _, state = _vmapped(model)(_x((16, 6), seed=s, loc=1.0), state)
  new, new_state = jeqx.from_equinox(model, state)
  assert not jeqx._batch_norms(new, eqx.nn.BatchNorm)
  assert len(jeqx._batch_norms(new)) == 2
  x = _x((5, 6), seed=20)
  want, _ = _vmapped(eqx.nn.inference_mode(model))(x, state)
  got, _ = _vmapped(eqx.nn.inference_mode(new))(x, new_state)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Training goes on from the carried state as equinox's would: the same outputs, and the
  # same inference after the step (the running statistics moved alike).
  want, state = _vmapped(model)(x, state)
  got, new_state = _vmapped(new)(x, new_state)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  want, _ = _vmapped(eqx.nn.inference_mode(model))(x, state)
  got, _ = _vmapped(eqx.nn.inference_mode(new))(x, new_state)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_from_equinox_into_an_exact_average_keeps_inference_and_the_statistics():
  old, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, BATCH, mode="batch")
  for s in range(3):
    _, state = _vmapped(old)(_x((16, 3), seed=s, loc=4.0), state)
  opts = jaxbn.BNOptions(ema_warmup=True)
  new, new_state = jeqx.from_equinox(old, state, options=opts)
  x = _x((5, 3), seed=30)
  with jax.numpy_dtype_promotion("standard"):  # equinox's inference: float ** int32
    want, _ = _vmapped(eqx.nn.inference_mode(old))(x, state)
  got, _ = _vmapped(eqx.nn.inference_mode(new))(x, new_state)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  _, before = new.running(new_state)
  np.testing.assert_array_equal(new.read(new_state)[1].count, jaxbn.layer.PORTED_COUNT)
  x2 = _x((16, 3), seed=31, loc=-4.0)
  _, new_state = _vmapped(new)(x2, new_state)
  _, after = new.running(new_state)  # one batch among many: the plain EMA, not a replacement
  want = 0.99 * np.asarray(before.mean) + 0.01 * np.asarray(x2).mean(0)
  np.testing.assert_allclose(after.mean, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"options sets \['momentum'\]"):
    jeqx.from_equinox(old, state, options=jaxbn.BNOptions(momentum=0.9))


def test_from_equinox_keeps_the_model_order_of_the_state(tmp_path):
  def make(bn_cls):
    key = jax.random.key(4)
    return eqx.nn.Sequential(
      [
        bn_cls(3, BATCH, mode="batch"),
        eqx.nn.SpectralNorm(eqx.nn.Linear(3, 3, key=key), "weight", key=key),
      ]
    )

  model, state = eqx.nn.make_with_state(make)(eqx.nn.BatchNorm)
  _, new_state = jeqx.from_equinox(model, state)
  eqx.tree_serialise_leaves(tmp_path / "m.eqx", new_state)
  _, like = eqx.nn.make_with_state(make)(jeqx.BatchNorm)
  loaded = eqx.tree_deserialise_leaves(tmp_path / "m.eqx", like)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(new_state), strict=True):
    np.testing.assert_array_equal(a, b)


def test_population_stats_of_an_equinox_model_are_the_data_sets():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model, state = eqx.nn.make_with_state(MLP)(jeqx.BatchNorm, "batch", jax.random.key(0))
  xs = [_x((16, 6), seed=s, loc=1.0) for s in range(3)]
  forward = lambda m, s, x: _vmapped(m)(x, s)
  state = jeqx.equinox_population_stats(model, state, xs, forward=forward)
  first = model.layers[0]
  h = np.concatenate([np.asarray(jax.vmap(first)(x), np.float64) for x in xs])
  _, s = model.layers[1].running(state)
  np.testing.assert_allclose(s.mean, h.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s.var, h.var(0), rtol=1e-5, atol=1e-6)
  # Inference uses them as stored (equinox's debiasing divides by 1), and still does after
  # one more training step, which moves them by 1 - momentum.
  x = _x((16, 6), seed=9, loc=1.0)
  _, state = _vmapped(model)(x, state)
  _, after = model.layers[1].running(state)
  hx = np.asarray(jax.vmap(first)(x), np.float64)
  np.testing.assert_allclose(after.mean, 0.99 * h.mean(0) + 0.01 * hx.mean(0), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"take one example at a time .*forward=lambda"):
    jeqx.equinox_population_stats(model, state, xs)


def test_fold_equinox_equals_the_inference_model():
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model, state = eqx.nn.make_with_state(MLP)(jeqx.BatchNorm, "batch", jax.random.key(0))
  for s in range(3):
    _, state = _vmapped(model)(_x((16, 6), seed=s, loc=1.0), state)
  folded = jeqx.fold_equinox(model, state)
  assert not jeqx._batch_norms(folded)
  x = _x((5, 6), seed=21)
  want, _ = _vmapped(eqx.nn.inference_mode(model))(x, state)
  got, _ = jax.vmap(folded, in_axes=(0, None), out_axes=(0, None))(x, state)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fold_equinox_folds_a_conv_and_refuses_what_it_cannot_fold():
  key = jax.random.key(3)
  make = lambda: eqx.nn.Sequential(
    [eqx.nn.Conv2d(2, 3, 3, use_bias=False, key=key), jeqx.BatchNorm(3, BATCH, mode="batch")]
  )
  model, state = eqx.nn.make_with_state(make)()
  x = _x((4, 2, 5, 5), seed=22, loc=1.0)
  _, state = _vmapped(model)(x, state)
  folded = jeqx.fold_equinox(model, state)
  want, _ = _vmapped(eqx.nn.inference_mode(model))(x, state)
  np.testing.assert_allclose(jax.vmap(folded)(x), want, rtol=1e-5, atol=1e-5)
  # A convolution with a bias of its own, (out, 1, 1), folds too.
  make = lambda: eqx.nn.Sequential(
    [eqx.nn.Conv2d(2, 3, 3, key=key), jeqx.BatchNorm(3, BATCH, mode="batch")]
  )
  model, state = eqx.nn.make_with_state(make)()
  _, state = _vmapped(model)(x, state)
  folded = jeqx.fold_equinox(model, state)
  assert folded.layers[0].bias.shape == (3, 1, 1)
  want, _ = _vmapped(eqx.nn.inference_mode(model))(x, state)
  np.testing.assert_allclose(jax.vmap(folded)(x), want, rtol=1e-5, atol=1e-5)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    convnet, state = eqx.nn.make_with_state(ConvNet)(jeqx.BatchNorm, "batch", key)
  with pytest.raises(ValueError, match=r"cannot fold the batch norms at \['.bn1', '.bn2'\]"):
    jeqx.fold_equinox(convnet, state)
