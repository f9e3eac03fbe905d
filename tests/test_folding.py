"""fold_bn and whole-model folding: BN-free layers with the same inference output."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from tests.reference import bn_infer_ref
from tests.reference import perturb_bn

EPS = 1e-5


def _bn(num, seed):
  rng = np.random.default_rng(seed)
  params = jaxbn.BNParams(
    scale=jnp.asarray(rng.uniform(0.5, 2.0, num), jnp.float32),
    bias=jnp.asarray(rng.normal(size=num), jnp.float32),
  )
  _, state = jaxbn.bn_init(num)
  state = state._replace(
    mean=jnp.asarray(rng.normal(size=num) * 3, jnp.float32),
    var=jnp.asarray(rng.uniform(0.1, 5.0, num), jnp.float32),
  )
  return params, state


def _conv(x, kernel):
  return jax.lax.conv_general_dilated(
    x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


@pytest.mark.parametrize("with_bias", [True, False])
def test_folded_dense_equals_dense_then_bn_infer(with_bias):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 7)).astype(np.float32)
  kernel = rng.normal(size=(7, 5)).astype(np.float32)
  bias = rng.normal(size=5).astype(np.float32) if with_bias else None
  params, state = _bn(5, 1)
  k, b = jaxbn.fold_bn(kernel, bias, params, state, epsilon=EPS)
  got = np.asarray(x @ k + b[None])
  z = x.astype(np.float64) @ kernel.astype(np.float64) + (0 if bias is None else bias)
  want = bn_infer_ref(z, params.scale, params.bias, state.mean, state.var, epsilon=EPS)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  assert k.dtype == jnp.float32 and b.dtype == jnp.float32 and b.shape == (5,)


@pytest.mark.parametrize("with_bias", [True, False])
def test_folded_conv_equals_conv_then_bn_infer(with_bias):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 6)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=6), jnp.float32) if with_bias else None
  params, state = _bn(6, 3)
  k, b = jaxbn.fold_bn(kernel, bias, params, state, epsilon=EPS)
  got = np.asarray(_conv(x, k) + b.reshape(1, 1, 1, 6))
  with jax.enable_x64(True):
    z = _conv(jnp.asarray(x, jnp.float64), jnp.asarray(kernel, jnp.float64))
    z = np.asarray(z) + (0 if bias is None else np.asarray(bias, np.float64))
  want = bn_infer_ref(z, params.scale, params.bias, state.mean, state.var, epsilon=EPS)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_low_precision_kernel_is_folded_in_float32_and_returned_in_its_dtype():
  params, state = _bn(4, 4)
  kernel = jnp.asarray(np.random.default_rng(5).normal(size=(3, 4)), jnp.bfloat16)
  k, b = jaxbn.fold_bn(kernel, None, params, state)
  assert k.dtype == jnp.bfloat16 and b.dtype == jnp.bfloat16
  s = np.asarray(params.scale, np.float64) / np.sqrt(np.asarray(state.var, np.float64) + EPS)
  want = np.asarray(kernel, np.float64) * s[None]
  np.testing.assert_allclose(np.asarray(k, np.float64), want, rtol=1e-2)


def test_float64_kernel_stays_float64():
  params, state = _bn(3, 6)
  with jax.enable_x64(True):
    kernel = jnp.asarray(np.random.default_rng(7).normal(size=(2, 3)), jnp.float64)
    k, b = jaxbn.fold_bn(kernel, None, params, state, epsilon=0.0)
    assert k.dtype == jnp.float64 and b.dtype == jnp.float64
    s = np.asarray(params.scale, np.float64) / np.sqrt(np.asarray(state.var, np.float64))
    np.testing.assert_allclose(k, np.asarray(kernel) * s[None], rtol=1e-12)
    mean = np.asarray(state.mean, np.float64)
    np.testing.assert_allclose(b, -mean * s + np.asarray(params.bias, np.float64), rtol=1e-12)


def test_mismatched_shapes_are_named():
  params, state = _bn(4, 0)
  with pytest.raises(ValueError, match=r"params.scale \(4,\)"):
    jaxbn.fold_bn(jnp.ones((3, 5)), None, params, state)
  with pytest.raises(ValueError, match=r"bias \(3,\)"):
    jaxbn.fold_bn(jnp.ones((3, 4)), jnp.ones(3), params, state)
  with pytest.raises(TypeError, match="floating"):
    jaxbn.fold_bn(jnp.ones((3, 4), jnp.int32), None, params, state)


# --------------------------------------------------------------------------
# Whole models of jaxbn.models.


def _close(got, want):
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.slow
@pytest.mark.parametrize("cnn", [False, True], ids=["mlp", "cnn"])
def test_fold_linen_model_gives_the_same_inference_output(cnn):
  from jaxbn.models import CNN
  from jaxbn.models import MLP

  model = (
    CNN(features=(4, 6))
    if cnn
    else MLP(features=(16, 12), bn_options=jaxbn.BNOptions(epsilon=1e-3))
  )
  x = jax.random.uniform(jax.random.key(0), (16, 8, 8, 1))
  variables = perturb_bn(model.init(jax.random.key(1), x, train=False), 2)
  assert float(jnp.abs(variables["batch_stats"]["BatchNorm_1"]["mean"]).max()) > 0
  folded, folded_vars = jaxbn.fold_linen(model, variables)
  assert not folded.use_bn and set(folded_vars) == {"params"}
  assert not any("BatchNorm" in k for k in folded_vars["params"])
  _close(folded.apply(folded_vars, x, train=False), model.apply(variables, x, train=False))


@pytest.mark.parametrize("cnn", [False, True], ids=["mlp", "cnn"])
def test_fold_nnx_model_gives_the_same_inference_output(cnn):
  from flax import nnx

  from jaxbn.models import NNXCNN
  from jaxbn.models import NNXMLP

  rngs = nnx.Rngs(0)
  model = NNXCNN(1, features=(4, 6), rngs=rngs) if cnn else NNXMLP(64, (16, 12), rngs=rngs)
  graphdef, state = nnx.split(model)
  model = nnx.merge(graphdef, perturb_bn(state, 3))
  x = jax.random.uniform(jax.random.key(0), (16, 8, 8, 1))
  assert float(jnp.abs(model.bn[1].mean[...]).max()) > 0
  folded = jaxbn.fold_nnx(model)
  assert not folded.use_bn and len(folded.bn) == 0 and model.use_bn  # a copy
  _close(folded(x), model(x, train=False))


@pytest.mark.slow
@pytest.mark.parametrize("cnn", [False, True], ids=["mlp", "cnn"])
def test_fold_params_of_plain_jax_models(cnn):
  from jaxbn import models

  x = jax.random.uniform(jax.random.key(0), (16, 8, 8, 1))
  if cnn:
    params, state = models.init_cnn(jax.random.key(1), 1, (4, 6))
    apply = models.apply_cnn
  else:
    params, state = models.init_mlp(jax.random.key(1), 64, (16, 12))
    apply = models.apply_mlp
  params, state = perturb_bn((params, state), 4)
  assert float(jnp.abs(state[0].mean).max()) > 0  # not the initial statistics
  folded = jaxbn.fold_params(params, state)
  want, _ = apply(params, state, x, train=False)
  got, _ = apply(folded, (), x, train=False)
  _close(got, want)


def test_folding_refuses_models_it_does_not_know():
  import flax.linen as nn

  from jaxbn.models import MLP

  with pytest.raises(TypeError, match=r"Dense has no fold_pairs\(\); pass an example call"):
    jaxbn.fold_linen(nn.Dense(3), {})
  with pytest.raises(ValueError, match="MLP has no batch norm; nothing to fold"):
    jaxbn.fold_linen(MLP(use_bn=False), {})
  with pytest.raises(ValueError, match="'hidden'"):
    jaxbn.fold_params({"layers": []}, ())


# ------------------------------------------------------------------------ branch folding


def _conv_count(fn, *args):
  """The convolutions in the jaxpr of ``fn(*args)``, nested jaxprs included."""

  def count(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      n += eqn.primitive.name == "conv_general_dilated"
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        n += count(sub)
    return n

  return count(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize(
  "kwargs",
  [
    {},  # RepVGG: 3x3 + 1x1 + identity
    {"num_conv_branches": 3, "groups": 8},  # MobileOne, depthwise
    {"strides": 2},  # no identity branch where the shape changes
    {"kernel_size": 5, "scale_branch": False},
  ],
  ids=["repvgg", "mobileone-depthwise", "stride2", "5x5-identity"],
)
def test_rep_block_folds_into_one_convolution(kwargs):
  from jaxbn.models import RepBlock

  block = RepBlock(features=8, **kwargs)
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 8)) * 2 + 1
  variables = perturb_bn(block.init(jax.random.key(1), x, train=False), 1)
  deployed, folded = block.reparameterize(variables)
  want = jax.jit(lambda v, x: block.apply(v, x, train=False))(variables, x)
  got = jax.jit(lambda v, x: deployed.apply(v, x, train=False))(folded, x)
  err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
  assert err <= 1e-5, err
  branches = kwargs.get("num_conv_branches", 1) + kwargs.get("scale_branch", True)
  assert _conv_count(lambda x: block.apply(variables, x, train=False), x) == branches
  assert _conv_count(lambda x: deployed.apply(folded, x, train=False), x) == 1
  has_identity = "identity_bn" in variables["params"]
  assert has_identity == (kwargs.get("strides", 1) == 1)


def test_fold_branches_against_a_float64_sum_of_branches():
  rng = np.random.default_rng(3)
  k3 = rng.normal(size=(3, 3, 4, 4)).astype(np.float32)
  k1 = rng.normal(size=(1, 1, 4, 4)).astype(np.float32)
  b1 = rng.normal(size=4).astype(np.float32)
  bns = [_bn(4, s) for s in range(3)]
  x = rng.normal(size=(2, 6, 6, 4)).astype(np.float32) * 3
  kernel, bias = jaxbn.fold_branches(
    [(k3, None, *bns[0]), (k1, b1, *bns[1]), (None, None, *bns[2])], epsilon=EPS
  )
  with jax.enable_x64(True):
    x64 = x.astype(np.float64)
    branches = [
      _conv(x64, k3.astype(np.float64)),
      np.asarray(_conv(x64, k1.astype(np.float64))) + b1.astype(np.float64),
      x64,
    ]
    want = sum(
      bn_infer_ref(np.asarray(y), p.scale, p.bias, s.mean, s.var, epsilon=EPS)
      for y, (p, s) in zip(branches, bns, strict=True)
    )
    got = np.asarray(_conv(x64, np.asarray(kernel, np.float64))) + np.asarray(bias, np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_fold_branches_names_what_cannot_fold():
  p4, s4 = _bn(4, 0)
  p2, s2 = _bn(2, 0)
  k = jnp.ones((3, 3, 2, 4))
  with pytest.raises(ValueError, match="at least one convolution branch"):
    jaxbn.fold_branches([(None, None, p4, s4)])
  with pytest.raises(ValueError, match=r"branch 1 is the identity.*in = out"):
    jaxbn.fold_branches([(k, None, p4, s4), (None, None, p4, s4)])
  with pytest.raises(ValueError, match="differ by an odd number"):
    jaxbn.fold_branches([(k, None, p4, s4), (jnp.ones((2, 2, 2, 4)), None, p4, s4)])
  with pytest.raises(ValueError, match="disagree on"):
    jaxbn.fold_branches([(k, None, p4, s4), (jnp.ones((1, 1, 2, 2)), None, p2, s2)])
