"""Options in one value, the one layer representation, and folding of models of one's own.

References are independent of jaxbn's conversion code: flax's own BatchNorm
modules (their apply in evaluation mode), a float64 NumPy formula
(``tests.reference.bn_infer_ref``), or the unfolded model's output.
"""

import dataclasses
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxbn
from jaxbn import linen as jbl
from jaxbn import nnx as jbx
from jaxbn.layer import BNLayer
from jaxbn.linen import read_variables
from jaxbn.linen import write_variables
from jaxbn.nnx import read_module
from jaxbn.nnx import write_module
from tests.reference import bn_infer_ref

EPS32 = float(jnp.finfo(jnp.float32).eps)


def _close(got, want, *, ulps=64):
  """Equal to float32 rounding of the largest value (a few operations' worth)."""
  want = np.asarray(want, np.float64)
  scale = max(float(np.abs(want).max()), 1.0)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=ulps * EPS32 * scale)


def _random_stats(tree, seed):
  """Non-trivial scale, bias, mean and var in every batch-norm entry of a tree."""
  rng = np.random.default_rng(seed)

  def leaf(path, t):
    name = jax.tree_util.keystr(path)
    if not any(k in name for k in ("'scale'", "'bias'", "'mean'", "'var'", ".mean", ".var")):
      return t
    if "Dense" in name or "Conv" in name or "dense" in name or "conv" in name or "head" in name:
      return t  # only the batch norms
    if "var" in name or "scale" in name:
      return jnp.asarray(rng.uniform(0.3, 3.0, t.shape), t.dtype)
    return jnp.asarray(rng.normal(size=t.shape), t.dtype)

  return jax.tree_util.tree_map_with_path(leaf, tree)


# --------------------------------------------------------------------------
# Options in one place


def test_bn_train_options_positional_with_override_equals_keywords():
  params, state = jaxbn.bn_init(3)
  x = jax.random.normal(jax.random.key(0), (8, 3)) * 2 + 1
  opts = jaxbn.BNOptions(momentum=0.5, epsilon=1e-2, running_var="unbiased")
  y1, s1 = jaxbn.bn_train(params, state, x, opts, momentum=0.8)
  y2, s2 = jaxbn.bn_train(params, state, x, momentum=0.8, epsilon=1e-2, running_var="unbiased")
  # The same computation reached through two spellings: identical results.
  np.testing.assert_array_equal(y1, y2)
  for a, b in zip(s1, s2, strict=True):
    np.testing.assert_array_equal(a, b)
  # The override took effect: momentum 0.5 would give another running mean.
  _, s3 = jaxbn.bn_train(params, state, x, opts)
  assert not np.allclose(s1.mean, s3.mean)
  # bn_infer reads epsilon and axis from the same options.
  want = bn_infer_ref(x, params.scale, params.bias, s1.mean, s1.var, epsilon=1e-2)
  _close(jaxbn.bn_infer(params, s1, x, opts), want)
  _close(jaxbn.bn_infer(params, s1, x, opts, epsilon=1e-2), want)


def test_bn_train_rejects_options_of_another_type():
  params, state = jaxbn.bn_init(2)
  with pytest.raises(TypeError, match=r"options \(the 4th positional argument\)"):
    jaxbn.bn_train(params, state, jnp.ones((4, 2)), {"momentum": 0.9})


def test_bn_train_mask_of_whole_examples_is_n_by_1():
  params, state = jaxbn.bn_init(3)
  x = jax.random.normal(jax.random.key(1), (6, 3))
  keep = jnp.array([True, True, False, True, False, True])
  _, s = jaxbn.bn_train(params, state, x, mask=keep[:, None], momentum=None)
  np.testing.assert_allclose(s.mean, np.asarray(x)[np.asarray(keep)].mean(0), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r"mask\[:, None\]"):
    jaxbn.bn_train(params, state, x, mask=keep)


def test_linen_options_field_equals_keywords_and_a_given_keyword_wins():
  x = jax.random.normal(jax.random.key(2), (8, 3)) + 3
  opts = jaxbn.BNOptions(momentum=0.5, epsilon=1e-3, ema_warmup=True)
  a = jbl.BatchNorm(options=opts)
  b = jbl.BatchNorm(momentum=0.5, epsilon=1e-3, ema_warmup=True)
  va = a.init(jax.random.key(0), x, use_running_average=False)
  vb = b.init(jax.random.key(0), x, use_running_average=False)
  assert jax.tree.structure(va) == jax.tree.structure(vb)  # count stored in both
  ya, ua = a.apply(va, x, use_running_average=False, mutable=["batch_stats"])
  yb, ub = b.apply(vb, x, use_running_average=False, mutable=["batch_stats"])
  np.testing.assert_array_equal(ya, yb)  # one computation, two spellings
  np.testing.assert_array_equal(ua["batch_stats"]["mean"], ub["batch_stats"]["mean"])
  # bn_train's rule: a keyword given wins over the same field of options.
  c = jbl.BatchNorm(options=opts, epsilon=0.5)
  yc, uc = c.apply(va, x, use_running_average=False, mutable=["batch_stats"])
  want_y, want = jaxbn.bn_train(*jaxbn.bn_init(3), x, opts, epsilon=0.5)
  np.testing.assert_array_equal(yc, want_y)
  np.testing.assert_array_equal(uc["batch_stats"]["mean"], want.mean)
  assert not np.allclose(yc, ya)


def test_nnx_options_argument_sets_the_attributes():
  opts = jaxbn.BNOptions(momentum=None, epsilon=1e-3)
  bn = jbx.BatchNorm(3, options=opts, rngs=nnx.Rngs(0))
  assert bn.momentum is None and bn.epsilon == 1e-3 and bn.count is not None
  bn = jbx.BatchNorm(3, options=opts, epsilon=1e-2, rngs=nnx.Rngs(0))  # a keyword given wins
  assert bn.epsilon == 1e-2 and bn.momentum is None


def _option_keywords(fn):
  """The keywords of ``fn`` whose default is FROM_OPTIONS (the options it takes one by one)."""
  return {
    k for k, p in inspect.signature(fn).parameters.items() if p.default is jaxbn.core.FROM_OPTIONS
  }


def test_every_face_names_the_options_as_bn_train_does():
  fields = set(jaxbn.BNOptions._fields)
  assert _option_keywords(jaxbn.bn_train) == fields
  linen = {
    f.name for f in dataclasses.fields(jbl.BatchNorm) if f.default is jaxbn.core.FROM_OPTIONS
  }
  assert linen == fields
  assert _option_keywords(jbx.BatchNorm.__init__) == fields
  # Equinox's layer keeps equinox's constructor: its three options under equinox's names.
  from jaxbn import equinox as jeqx

  assert _option_keywords(jeqx.BatchNorm.__init__) == set(jeqx.EQUINOX_NAMES)
  assert set(jeqx.EQUINOX_NAMES.values()) <= fields


# --------------------------------------------------------------------------
# The layer representation


@pytest.mark.parametrize(
  "opts",
  [
    jaxbn.BNOptions(),
    jaxbn.BNOptions(momentum=None),
    jaxbn.BNOptions(ema_warmup=True, renorm=jaxbn.renorm_schedule()),
    jaxbn.BNOptions(accumulate_steps=3),
  ],
  ids=["default", "cumulative", "warmup-renorm", "accumulate"],
)
def test_linen_variables_round_trip(opts):
  bn = jbl.BatchNorm(options=opts, use_bias=False)
  x = jax.random.normal(jax.random.key(3), (8, 4)) + 2
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  _, upd = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  variables = {"params": variables["params"], "batch_stats": upd["batch_stats"]}
  layer = BNLayer.of(bn, (4,))
  params, state = read_variables(variables, layer)
  assert isinstance(state, jaxbn.BNAccState) == (opts.accumulate_steps > 1)
  np.testing.assert_array_equal(params.bias, np.zeros(4))  # use_bias=False: bias 0
  back = write_variables(params, state, layer)
  assert jax.tree.structure(back) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables), strict=True):
    np.testing.assert_array_equal(a, b)


def test_flax_linen_batchnorm_variables_read_as_a_full_state():
  bn = nn.BatchNorm(epsilon=1e-3)
  x = jax.random.normal(jax.random.key(4), (16, 5)) * 3 + 2
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  _, upd = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  variables = {"params": variables["params"], "batch_stats": upd["batch_stats"]}
  layer = BNLayer.of(bn, (5,))
  assert layer.options.epsilon == 1e-3
  params, state = read_variables(variables, layer)
  np.testing.assert_array_equal(state.count, np.zeros(5, np.float32))  # as bn_init makes it
  assert state.step.dtype == jnp.int32 and int(state.step) == 0
  want = bn.apply(variables, x, use_running_average=True)  # flax's own inference
  _close(jaxbn.bn_infer(params, state, x, layer.options), want)
  # A bare batch_stats dict reads too (params 1 and 0).
  _, bare = read_variables(variables["batch_stats"])
  np.testing.assert_array_equal(bare.mean, state.mean)
  # Written back, the variables are flax's tree again: no count, no step.
  back = write_variables(params, state, layer)
  assert jax.tree.structure(back) == jax.tree.structure(variables)


def test_nnx_module_round_trip():
  bn = jbx.BatchNorm(4, ema_warmup=True, accumulate_steps=2, rngs=nnx.Rngs(0))
  bn(jax.random.normal(jax.random.key(5), (8, 4)) + 1)
  layer = BNLayer.of(bn)
  params, state = read_module(bn, layer)
  assert isinstance(state, jaxbn.BNAccState) and int(state.step) == 1
  new = jax.tree.map(lambda t: t + 1 if t.dtype != jnp.int32 else t + 3, state)
  write_module(bn, params._replace(scale=params.scale * 2), new, layer)
  p2, s2 = read_module(bn, layer)
  np.testing.assert_array_equal(p2.scale, params.scale * 2)
  for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(new), strict=True):
    np.testing.assert_array_equal(a, b)


def test_flax_nnx_batchnorm_reads_and_writes():
  bn = nnx.BatchNorm(3, epsilon=1e-4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(6), (8, 3)) * 2 - 1
  bn(x)  # training: running statistics move
  bn.eval()
  layer = BNLayer.of(bn)
  assert layer.feature_shape == (3,) and layer.options.epsilon == 1e-4
  params, state = read_module(bn, layer)
  _close(jaxbn.bn_infer(params, state, x, layer.options), bn(x))
  write_module(bn, None, state._replace(mean=state.mean + 1), layer)
  np.testing.assert_array_equal(bn.mean[...], state.mean + 1)


def test_fold_bn_of_a_flax_batch_stats_dict():
  model = nn.Sequential([nn.Dense(6, use_bias=False), nn.BatchNorm(use_running_average=True)])
  x = jax.random.normal(jax.random.key(7), (10, 4))
  variables = _random_stats(model.init(jax.random.key(0), x), 1)
  dense, bn = variables["params"]["layers_0"], "layers_1"
  params, state = read_variables(
    {"params": variables["params"][bn], "batch_stats": variables["batch_stats"][bn]}
  )
  kernel, bias = jaxbn.fold_bn(dense["kernel"], None, params, state)
  _close(x @ kernel + bias[None], model.apply(variables, x))


# --------------------------------------------------------------------------
# Folding models of one's own


class LinenMLP(nn.Module):
  flax_bn: bool = False

  @nn.compact
  def __call__(self, x, train):
    bn = nn.BatchNorm if self.flax_bn else jbl.BatchNorm
    for width in (12, 8):
      x = nn.Dense(width, use_bias=False)(x)
      x = bn(use_running_average=not train, epsilon=1e-3)(x)
      x = nn.relu(x)
    return nn.Dense(3)(x)


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(6, (3, 3), padding="SAME")(x)  # with a bias of its own
    return nn.relu(jbl.BatchNorm(use_running_average=not train)(x))


class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    x = LinenBlock(name="block1")(x, train)
    x = LinenBlock(name="block2")(x, train)
    return nn.Dense(2)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("kind", ["mlp", "mlp-flax-bn", "cnn"])
def test_fold_linen_user_model(kind):
  model = LinenCNN() if kind == "cnn" else LinenMLP(flax_bn=kind == "mlp-flax-bn")
  shape = (4, 6, 6, 2) if kind == "cnn" else (4, 5)
  x = jax.random.normal(jax.random.key(8), shape)
  variables = _random_stats(model.init(jax.random.key(0), x, train=False), 2)
  folded, folded_vars = jaxbn.fold_linen(model, variables, x, train=False)
  assert set(folded_vars) == {"params"}
  leaves = jax.tree_util.tree_leaves_with_path(folded_vars)
  assert not any("BatchNorm" in jax.tree_util.keystr(p) for p, _ in leaves)
  _close(folded.apply(folded_vars, x, train=False), model.apply(variables, x, train=False))
  jitted = jax.jit(folded.apply, static_argnames="train")
  _close(jitted(folded_vars, x, train=False), model.apply(variables, x, train=False))


def test_fold_linen_names_the_layer_it_cannot_fold():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      x = nn.relu(nn.Dense(4)(x))
      return jbl.BatchNorm(use_running_average=not train)(x)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      return Block(name="block1")(x, train)

  x = jnp.ones((3, 5))
  variables = Net().init(jax.random.key(0), x, train=False)
  msg = (
    r"layer 'block1/BatchNorm_0' \(jaxbn.linen.BatchNorm\) does not directly follow a Dense "
    r"or Conv.*'block1/Dense_0' \(flax.linen.linear.Dense\)"
  )
  with pytest.raises(ValueError, match=msg):
    jaxbn.fold_linen(Net(), variables, x, train=False)
  with pytest.raises(TypeError, match=r"test_layer.*Net has no fold_pairs\(\)"):
    jaxbn.fold_linen(Net(), variables)


class NNXMLPOfMine(nnx.Module):
  def __init__(self, rngs, flax_bn=False):
    bn = nnx.BatchNorm if flax_bn else jbx.BatchNorm
    self.layers = nnx.List([nnx.Linear(5, 12, rngs=rngs), nnx.Linear(12, 8, rngs=rngs)])
    self.norms = nnx.List([bn(12, rngs=rngs), bn(8, epsilon=1e-3, rngs=rngs)])
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    for layer, norm in zip(self.layers, self.norms, strict=True):
      x = nnx.relu(norm(layer(x)))
    return self.head(x)


class NNXCNNOfMine(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 6, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
    self.bn = jbx.BatchNorm(6, rngs=rngs)
    self.head = nnx.Linear(6 * 6 * 6, 2, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    return self.head(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("kind", ["mlp", "mlp-flax-bn", "cnn"])
def test_fold_nnx_user_model(kind):
  rngs = nnx.Rngs(0)
  model = NNXCNNOfMine(rngs) if kind == "cnn" else NNXMLPOfMine(rngs, kind == "mlp-flax-bn")
  x = jax.random.normal(jax.random.key(9), (4, 6, 6, 2) if kind == "cnn" else (4, 5))
  graphdef, state = nnx.split(model)
  model = nnx.merge(graphdef, _random_stats(state, 3))
  model.eval()
  want = model(x)
  folded = jaxbn.fold_nnx(model, x)
  names = {type(n).__name__ for _, n in nnx.iter_graph(folded)}
  assert "BatchNorm" not in names and "FoldedBatchNorm" in names
  _close(folded(x), want)
  _close(model(x), want)  # the model itself is unchanged


def test_fold_nnx_names_the_layer_it_cannot_fold():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(5, 4, rngs=rngs)
      self.bn = jbx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
      return self.bn(nnx.relu(self.dense(x)))

  net = Net(nnx.Rngs(0))
  net.eval()
  msg = r"layer 'bn' \(jaxbn.nnx.BatchNorm\) does not directly follow a Linear or Conv.*'dense'"
  with pytest.raises(ValueError, match=msg):
    jaxbn.fold_nnx(net, jnp.ones((2, 5)))
  with pytest.raises(TypeError, match=r"Net has no fold_pairs\(\)"):
    jaxbn.fold_nnx(net)


def test_the_02_names_of_the_moved_functions_warn_and_forward():
  import jaxbn.models

  with pytest.warns(FutureWarning, match=r"jaxbn\.models\.fold_linen is deprecated"):
    assert jaxbn.models.fold_linen is jaxbn.linen.fold_linen
  with pytest.warns(FutureWarning, match=r"jaxbn\.models\.FoldedBatchNorm is deprecated"):
    assert jaxbn.models.FoldedBatchNorm is jaxbn.nnx.FoldedBatchNorm
  stats = {"mean": jnp.array([1.0, 2.0]), "var": jnp.array([4.0, 1.0])}
  layer = BNLayer((2,), jaxbn.BNOptions(momentum=None))
  with pytest.warns(FutureWarning, match=r"BNLayer\.read_linen is deprecated"):
    params, state = layer.read_linen(stats)
  np.testing.assert_array_equal(state.var, stats["var"])
  with pytest.warns(FutureWarning, match=r"BNLayer\.write_linen is deprecated"):
    assert sorted(layer.write_linen(params, state)["batch_stats"]) == ["count", "mean", "var"]
  bn = jbx.BatchNorm(2, momentum=None, rngs=nnx.Rngs(0))
  with pytest.warns(FutureWarning, match=r"BNLayer\.write_nnx is deprecated"):
    layer.write_nnx(bn, params, state)
  with pytest.warns(FutureWarning, match=r"BNLayer\.read_nnx is deprecated"):
    np.testing.assert_array_equal(layer.read_nnx(bn)[1].mean, stats["mean"])
  with pytest.raises(AttributeError, match="no attribute 'fold_anything'"):
    jaxbn.models.fold_anything  # noqa: B018
