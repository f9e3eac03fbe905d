"""jaxbn.deploy: qwix and jax2onnx see jaxbn's batch norm as they see flax's.

qwix: a conv -> BN -> relu -> dense model (linen and nnx) under ODML
quantization-aware training with an all-ops int8 rule; flax's BatchNorm is the
reference: the same quantization statistics keys (the decisions: where a fake
quantization sits) and the same outputs, in QAT and in conversion. jax2onnx:
one ONNX ``BatchNormalization`` node per batch norm (none once folded), and
onnxruntime's output within 1e-5 (relative) of JAX's.
"""

import collections
import json
import warnings

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime
import pytest
import qwix
from flax import nnx
from jax2onnx import to_onnx

import jaxbn
import jaxbn.deploy
from jaxbn import linen as jbn_linen
from jaxbn import nnx as jbn_nnx
from tests.reference import perturb_bn
from tests.reference import run_python

pytestmark = pytest.mark.slow  # end-to-end against torch / the tools: the full suite runs it

C_IN, C, H, OUT = 3, 8, 6, 4
X = jax.random.normal(jax.random.key(0), (4, H, H, C_IN)) * 2 + 1
RULES = [qwix.QuantizationRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=jnp.int8)]
# What qwix collects for flax's BatchNorm after a conv: nothing of its own (it folds).
FLAX_LINEN_KEYS = ["Conv_0/conv_general_dilated0_lhs", "Dense_0/dot_general0_lhs", "final_output0"]


class LinenNet(nn.Module):
  bn: type

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(C, (3, 3))(x)
    x = nn.relu(self.bn(use_running_average=not train, momentum=0.9)(x))
    return nn.Dense(OUT)(x.reshape((x.shape[0], -1)))


class NnxNet(nnx.Module):
  def __init__(self, bn, rngs):
    self.conv = nnx.Conv(C_IN, C, (3, 3), rngs=rngs)
    self.bn = bn(C, momentum=0.9, rngs=rngs)
    self.dense = nnx.Linear(H * H * C, OUT, rngs=rngs)

  def __call__(self, x):
    return self.dense(nnx.relu(self.bn(self.conv(x))).reshape((x.shape[0], -1)))


@pytest.fixture(autouse=True)
def _third_party_promotion():
  """qwix and jax2onnx rely on JAX's standard promotion (conftest.py makes it strict for jaxbn)."""
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    yield


def _keys(tree):
  return sorted({"/".join(map(str, k[:-1])) for k in flax.traverse_util.flatten_dict(tree)})


def _qat_linen(bn, train):
  """Quant-stat keys, the QAT output and the converted (deployment) output of the linen net."""
  model = LinenNet(bn)
  variables = LinenNet(nn.BatchNorm).init(jax.random.key(1), X, False)  # the same weights
  qat = qwix.quantize_model(model, qwix.OdmlQatProvider(RULES))
  qv = {**qat.init(jax.random.key(1), X, train), **variables}
  y, new = qat.apply(qv, X, train, mutable=True)  # one QAT step collects the statistics
  qv = {**qv, **new}
  convert = qwix.OdmlConversionProvider(RULES, qv["params"], qv["quant_stats"])
  y_converted = qwix.quantize_model(model, convert).apply(qv, X, False)
  return _keys(qv["quant_stats"]), y, y_converted


def _qat_nnx(bn, train):
  model, ref = NnxNet(bn, nnx.Rngs(1)), NnxNet(nnx.BatchNorm, nnx.Rngs(1))
  nnx.update(model, nnx.state(ref))  # the same weights
  model.train() if train else model.eval()
  qat = qwix.quantize_model(model, qwix.OdmlQatProvider(RULES), X)
  y = qat(X)
  return _keys(nnx.to_pure_dict(nnx.state(qat, qwix.QuantStat))), y


def _close(got, want):
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_qwix_quantizes_jaxbn_linen_as_flax(train):
  jaxbn.deploy.register_qwix()
  keys, y, y_conv = _qat_linen(jbn_linen.BatchNorm, train)
  want_keys, want_y, want_conv = _qat_linen(nn.BatchNorm, train)
  assert want_keys == FLAX_LINEN_KEYS
  assert keys == want_keys
  _close(y, want_y)
  _close(y_conv, want_conv)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_qwix_quantizes_jaxbn_nnx_as_flax(train):
  jaxbn.deploy.register_qwix()
  keys, y = _qat_nnx(jbn_nnx.BatchNorm, train)
  want_keys, want_y = _qat_nnx(nnx.BatchNorm, train)
  assert keys == want_keys and not any("bn" in k.lower() for k in keys), keys
  _close(y, want_y)


def test_without_registration():
  """A fresh interpreter, neither tool registered.

  qwix fake-quantizes the arithmetic inside jaxbn's batch norm (why ``register_qwix`` exists),
  and a ResNet with two blocks in its second stage exports to ONNX as elementwise nodes that
  onnxruntime runs (jax2onnx 0.17.1 mis-shapes it with BatchNormalization nodes, flax's
  included: see the test above).
  """
  out = run_python(
    "import json, warnings, jax, numpy as np, onnxruntime\n"
    "from jax2onnx import to_onnx\n"
    "import jaxbn\n"
    "from jaxbn import linen as jbn\n"
    "from tests.test_deploy import _qat_linen\n"
    "jax.config.update('jax_numpy_dtype_promotion', 'standard')\n"
    "warnings.simplefilter('ignore')\n"
    "keys = _qat_linen(jbn.BatchNorm, False)[0]\n"
    "model = jaxbn.models.ResNet(stage_sizes=(1, 2, 1, 1), num_classes=5)\n"
    "x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))\n"
    "v = model.init(jax.random.key(1), x, train=False)\n"
    "fn = lambda x: model.apply(v, x, train=False)\n"
    "proto = to_onnx(fn, [x.shape])\n"
    "s = onnxruntime.InferenceSession(proto.SerializeToString())\n"
    "y = s.run(None, {s.get_inputs()[0].name: np.asarray(x)})[0]\n"
    "want = np.asarray(fn(x))\n"
    "ops = [n.op_type for n in proto.graph.node]\n"
    "print(json.dumps([keys, float(np.abs(y - want).max() / np.abs(want).max()),"
    " ops.count('BatchNormalization'), ops.count('Conv')]))"
  )
  jaxbn_keys, rel, bn_nodes, convs = json.loads(out.splitlines()[-1])
  assert [k for k in jaxbn_keys if k.startswith("BatchNorm_0/")], jaxbn_keys  # flax's: none
  assert rel <= 1e-5 and bn_nodes == 0 and convs == 14, out


def _export(fn, x):
  """ONNX op counts, and onnxruntime's output against JAX's (max difference, relative)."""
  jaxbn.deploy.register_onnx()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # jax2onnx's own deprecation notices
    proto = to_onnx(fn, [x.shape], model_name="jaxbn")
  session = onnxruntime.InferenceSession(proto.SerializeToString())
  got = session.run(None, {session.get_inputs()[0].name: np.asarray(x)})[0]
  want = np.asarray(fn(x))
  ops = collections.Counter(n.op_type for n in proto.graph.node)
  return ops, float(np.abs(got - want).max() / np.abs(want).max())


def test_onnx_nnx_batch_norm_is_one_node():
  model = NnxNet(jbn_nnx.BatchNorm, nnx.Rngs(0))
  nnx.update(model, perturb_bn(nnx.state(model), 2))
  model.eval()
  ops, rel = _export(model, X)
  assert ops["BatchNormalization"] == 1, ops
  assert rel <= 1e-5, rel


@pytest.mark.parametrize("axis", [-1, 1], ids=["channels-last", "axis1"])
def test_onnx_linen_batch_norm_is_one_node_when_features_are_last(axis):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(C, (3, 3))(x)
      x = jbn_linen.BatchNorm(use_running_average=True, axis=axis, epsilon=1e-3)(x)
      return nn.relu(jbn_linen.BatchNorm(use_running_average=True)(x))

  variables = perturb_bn(Net().init(jax.random.key(0), X), 2)
  ops, rel = _export(lambda x: Net().apply(variables, x), X)
  # Another feature axis exports as jaxbn's arithmetic: correct, but not the ONNX node.
  assert ops["BatchNormalization"] == (2 if axis == -1 else 1), ops
  assert rel <= 1e-5, rel


def test_onnx_of_a_resnet_and_of_folded_models():
  # One block per stage: with BatchNormalization nodes (flax's plugin's too), jax2onnx 0.17.1
  # mis-shapes the residual Add of a block after a strided one (see the next test).
  model = jaxbn.models.ResNet(stage_sizes=(1, 1, 1, 1), num_classes=5)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = perturb_bn(jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(x), 2)
  ops, rel = _export(lambda x: model.apply(variables, x, train=False), x)
  assert ops["BatchNormalization"] == 12, ops  # the stem's, 2 + 3 + 3 + 3 in the blocks
  assert variables["batch_stats"]["layer2_0"]["downsample_bn"]["var"][0] != 1  # randomized too
  assert rel <= 1e-5, rel
  # Folded: the model without batch norm and the folded variables (jax2onnx 0.17.1 mis-lays-out
  # the bias Add of fold_linen's wrapper, as the residual Add above), and a reparameterized block.
  cnn = jaxbn.models.CNN(features=(4, 8))
  xs = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  v = perturb_bn(cnn.init(jax.random.key(1), xs, train=False), 2)
  _, fv = jbn_linen.fold_linen(cnn, v, xs, train=False)
  ops, rel = _export(lambda x: cnn.without_batch_norm().apply(fv, x, train=False), xs)
  assert ops["BatchNormalization"] == 0 and ops["Conv"] == 2, ops
  assert rel <= 1e-5, rel
  block = jaxbn.models.RepBlock(8)
  xb = jax.random.normal(jax.random.key(0), (2, 6, 6, 8))
  vb = perturb_bn(block.init(jax.random.key(1), xb, train=False), 2)
  ops, _ = _export(lambda x: block.apply(vb, x, train=False), xb)
  assert ops["BatchNormalization"] == 3 and ops["Conv"] == 2, ops
  deployed, dv = block.reparameterize(vb)
  ops, rel = _export(lambda x: deployed.apply(dv, x, train=False), xb)
  assert ops["BatchNormalization"] == 0 and ops["Conv"] == 1, ops
  assert rel <= 1e-5, rel
