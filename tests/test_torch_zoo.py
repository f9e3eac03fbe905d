"""PyTorch's model zoo: every batch norm of torchvision and timm, and whole ResNets, against torch.

torch is the reference: each expected value is what the torch module computes on
CPU. Batch-norm buffers and affine parameters are randomized (no download: the
weights are random, as the structure is all a port reads), so that a swapped or
missing statistic shows. One layer agrees within ``LAYER_EPS`` float32 eps
relative to ``max(1, |want|)``, as in test_torch_interop.py; a whole ResNet's
logits within ``LOGITS_RTOL`` of their largest magnitude (relative), its running
statistics after one training step within ``STATS_RTOL``.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
import torchvision
from timm.layers import BatchNormAct2d
from timm.layers import FrozenBatchNormAct2d
from timm.layers.split_batchnorm import SplitBatchNorm2d
from torchvision.ops import FrozenBatchNorm2d

import jaxbn
from jaxbn import torch as jtorch

pytestmark = pytest.mark.slow  # end-to-end against torch / the tools: the full suite runs it

torch.set_num_threads(1)  # the test machines are small and shared

EPS32 = float(np.finfo(np.float32).eps)
LAYER_EPS = 16
# Measured (AMD EPYC, AVX-512, torch 2.14.1, batch 2 at 224x224): eval logits within 7.6e-7 of
# the largest logit; one training step's logits and running statistics within 1.6e-6 (ResNet-18)
# and 1.7e-5 (ResNet-50: rounding accumulated over 53 layers, each normalized by 98 values at
# the last stage).
LOGITS_RTOL = 1e-4  # the bound for eval-mode logits
STATS_RTOL = 1e-4


def _np(t):
  return t.detach().cpu().numpy()


def _randomize(model, seed=1):
  """Random affine parameters and running statistics in every batch norm, in place."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if getattr(m, "running_mean", None) is not None:
        c = m.running_mean.shape[0]
        m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
        m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        m.bias.copy_(torch.randn(c, generator=g) * 0.2)
  return model


def _assert_layer_close(got, want, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err = np.max(np.abs(got - want) / np.maximum(1.0, np.abs(want)))
  assert err <= LAYER_EPS * EPS32, f"{what}: {err:.2e} > {LAYER_EPS} eps"


def _x(shape, seed=0):
  return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


# ------------------------------------------------------------------------ one layer at a time


@pytest.mark.parametrize("cls", [FrozenBatchNorm2d, FrozenBatchNormAct2d])
def test_frozen_batch_norm_ports_and_normalizes_with_its_buffers(cls):
  tbn = _randomize(cls(6, eps=1e-3))
  params, state = jaxbn.from_torch(tbn)
  s = jaxbn.torch_settings(tbn)
  assert s.frozen and s.epsilon == 1e-3 and s.momentum == 1.0
  assert s.module_kwargs()["use_running_average"] is True
  assert int(state.step) == 0 and float(state.count[0]) == jtorch.PORTED_COUNT
  x = _x((4, 6, 5, 5))
  y = jaxbn.bn_infer(params, state, jnp.asarray(_np(x)), axis=1, epsilon=s.epsilon)
  if s.activation is not None:
    y = s.activation(y)
  want = _np(tbn.train()(x))  # frozen: training mode normalizes with the buffers too
  _assert_layer_close(y, want, cls.__name__)
  with pytest.raises(ValueError, match=r"frozen batch norm.*bn_infer"):
    s.train_kwargs(state)
  # Back into a fresh module: bitwise, and the buffers are what torch then uses.
  back = jtorch.to_torch(params, state, cls(6, eps=1e-3))
  for name in ("weight", "bias", "running_mean", "running_var"):
    np.testing.assert_array_equal(_np(getattr(back, name)), _np(getattr(tbn, name)))
  # Its state dict too (no num_batches_tracked).
  _, s2 = jaxbn.from_torch(tbn.state_dict())
  np.testing.assert_array_equal(s2.var, state.var)
  assert float(s2.count[0]) == jtorch.PORTED_COUNT


def test_frozen_batch_norm_in_the_flax_modules():
  tbn = _randomize(FrozenBatchNorm2d(4))
  bn = jaxbn.linen.BatchNorm(**jaxbn.torch_settings(tbn).module_kwargs())
  variables = jaxbn.from_torch_linen(tbn, bn)
  x = _x((3, 4, 2, 2))
  y = bn.apply(variables, jtorch.nchw_to_nhwc(x))  # use_running_average=True from the settings
  _assert_layer_close(y, jtorch.nchw_to_nhwc(tbn(x)), "linen")
  model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1, bias=False), tbn)
  v = jtorch.from_torch_model(model)
  np.testing.assert_array_equal(v["batch_stats"]["1"]["var"], _np(tbn.running_var))


@pytest.mark.parametrize("act", ["ReLU", "SiLU", "GELU", "Identity", "LeakyReLU"])
def test_batch_norm_act_carries_its_activation_in_eval_and_train(act):
  torch.manual_seed(0)
  tbn = _randomize(BatchNormAct2d(5, act_layer=getattr(torch.nn, act), momentum=0.3))
  params, state = jaxbn.from_torch(tbn)
  s = jaxbn.torch_settings(tbn)
  f = s.activation or (lambda y: y)
  x = _x((6, 5, 3, 3))
  xj = jnp.asarray(_np(x))
  y = f(jaxbn.bn_infer(params, state, xj, axis=1, epsilon=s.epsilon))
  _assert_layer_close(y, _np(tbn.eval()(x)), f"{act} eval")
  y, new = jaxbn.bn_train(params, state, xj, axis=1, **s.train_kwargs(state))
  want = _np(tbn.train()(x))
  _assert_layer_close(f(y), want, f"{act} train")
  _assert_layer_close(new.mean, _np(tbn.running_mean), f"{act} running mean")
  _assert_layer_close(new.var, _np(tbn.running_var), f"{act} running var")
  # A whole model: its values convert; the activation has no weights to carry.
  v = jtorch.from_torch_model(torch.nn.Sequential(torch.nn.Conv2d(2, 5, 1), tbn))
  assert sorted(v["batch_stats"]) == ["1"]


def test_batch_norm_act_with_an_unmapped_activation_is_refused():
  tbn = BatchNormAct2d(3, act_layer=torch.nn.Softplus)
  with pytest.raises(ValueError, match=r"Softplus.*from_torch and apply that activation"):
    jaxbn.torch_settings(tbn)
  params, _ = jaxbn.from_torch(tbn)  # the values alone still port
  assert params.scale.shape == (3,)


def test_split_batch_norm_ports_each_split_and_the_main_layer():
  torch.manual_seed(0)
  tbn = _randomize(SplitBatchNorm2d(4, num_splits=3, momentum=0.2))
  v = jtorch.from_torch_model(torch.nn.Sequential(tbn))
  assert sorted(v["batch_stats"]) == ["0", "0.aux_bn.0", "0.aux_bn.1"]
  layers = [tbn, *tbn.aux_bn]
  ported = [jaxbn.from_torch(m) for m in layers]
  s = jaxbn.torch_settings(tbn)
  x = _x((6, 4, 3, 3))
  want = _np(tbn.train()(x))  # split i of the batch through layer i
  chunks = jnp.split(jnp.asarray(_np(x)), 3)
  for i, ((p, st), m, xc) in enumerate(zip(ported, layers, chunks, strict=True)):
    y, new = jaxbn.bn_train(p, st, xc, axis=1, **s.train_kwargs(st))
    _assert_layer_close(y, want[2 * i : 2 * i + 2], f"split {i}")
    _assert_layer_close(new.mean, _np(m.running_mean), f"split {i} running mean")
    _assert_layer_close(new.var, _np(m.running_var), f"split {i} running var")
  p, st = jaxbn.from_torch(tbn)  # evaluation uses the main layer only
  y = jaxbn.bn_infer(p, st, jnp.asarray(_np(x)), axis=1, epsilon=s.epsilon)
  _assert_layer_close(y, _np(tbn.eval()(x)), "eval")


# ------------------------------------------------------------------------ whole ResNets

ZOO = {
  "tv-resnet18": lambda: torchvision.models.resnet18(),
  "tv-resnet18-frozen": lambda: torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d),
  "tv-resnet50": lambda: torchvision.models.resnet50(),
  "tv-resnet50-frozen": lambda: torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d),
  "timm-resnet18": lambda: timm.create_model("resnet18"),
  "timm-resnet50": lambda: timm.create_model("resnet50"),
}


def _rel(got, want):
  return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def _check_resnet(name, size, batch=2):
  """Eval-mode logits, then one training-mode step: logits and running statistics."""
  torch.manual_seed(0)
  tm = _randomize(ZOO[name]()).eval()
  t0 = time.perf_counter()
  model, variables = jtorch.from_torch_resnet(tm)
  port_s = time.perf_counter() - t0
  x = _x((batch, 3, size, size))
  xj = jtorch.nchw_to_nhwc(x)
  with torch.no_grad():
    want = _np(tm(x))
  eval_rel = _rel(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, xj), want)
  assert eval_rel <= LOGITS_RTOL, f"{name} eval logits: {eval_rel:.2e}"
  result = {"port_s": port_s, "eval_rel": eval_rel}
  if model.norm == "batch":
    with torch.no_grad():
      want = _np(tm.train()(x))  # batch statistics, and the running-statistics update
    logits, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, xj
    )
    result["train_rel"] = _rel(logits, want)
    assert result["train_rel"] <= LOGITS_RTOL, f"{name} train logits: {result['train_rel']:.2e}"
    torch_stats = jtorch.from_torch_model(tm, rename=jtorch.resnet_rename)["batch_stats"]
    errs = jax.tree.map(lambda g, w: _rel(g, np.asarray(w)), updates["batch_stats"], torch_stats)
    result["stats_rel"] = max(jax.tree.leaves(errs))
    assert result["stats_rel"] <= STATS_RTOL, f"{name} running statistics: {errs}"
  else:  # frozen: training mode normalizes with the buffers too, in torch and in jaxbn
    with torch.no_grad():
      want = _np(tm.train()(x))
    result["train_rel"] = _rel(model.apply(variables, xj, train=True), want)
    assert result["train_rel"] <= LOGITS_RTOL, f"{name} train logits: {result['train_rel']:.2e}"
  return result


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_resnet_port_matches_torch_at_224(name, record_property):
  r = _check_resnet(name, size=224)
  for k, v in r.items():
    record_property(k, v)
  print(name, {k: f"{v:.2e}" if "rel" in k else f"{v:.2f}" for k, v in r.items()})


def test_port_reads_groups_width_and_classes():
  tm = torchvision.models.resnext50_32x4d(num_classes=7)
  model, variables = jtorch.from_torch_resnet(tm)
  assert (model.groups, model.width_per_group, model.num_classes) == (32, 4, 7)
  assert variables["params"]["layer1_0"]["conv2"]["kernel"].shape == (3, 3, 4, 128)
  wide = jtorch.from_torch_resnet(torchvision.models.wide_resnet50_2())[0]
  assert (wide.groups, wide.width_per_group) == (1, 128)
  # A small grouped bottleneck ResNet computes as torch's.
  from torchvision.models.resnet import Bottleneck
  from torchvision.models.resnet import ResNet

  small = _randomize(ResNet(Bottleneck, [1, 2, 1, 1], num_classes=5, groups=4, width_per_group=8))
  model, variables = jtorch.from_torch_resnet(small.eval())
  x = _x((2, 3, 32, 32))
  with torch.no_grad():
    want = _np(small(x))
  got = model.apply(variables, jtorch.nchw_to_nhwc(x), train=False)
  assert _rel(got, want) <= LOGITS_RTOL


def _with(model, name, module):
  setattr(model, name, module)
  return model


def _without_maxpool():
  """The CIFAR change: the stem's max pool removed (the logits would differ silently)."""
  return _with(torchvision.models.resnet18(), "maxpool", torch.nn.Identity())


def _momentum_none():
  model = torchvision.models.resnet18()
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.momentum = None
  return model


@pytest.mark.parametrize(
  ("make", "match"),
  [
    (
      lambda: timm.create_model("resnet50d"),
      "conv1 is a Sequential, not as in torchvision's ResNet",
    ),
    (
      lambda: timm.create_model("seresnet18"),
      "layer1.0.se is a SEModule, which torchvision's ResNet does not have there",
    ),
    (
      lambda: torchvision.models.resnet50(replace_stride_with_dilation=[False, False, True]),
      r"layer4.0.conv2 is .*dilation",
    ),
    (lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)), "not a ResNet"),
    (lambda: _without_maxpool(), "no max pool after its stem"),
    (lambda: _with(torchvision.models.resnet18(), "maxpool", torch.nn.MaxPool2d(2)), "MaxPool2d"),
    (lambda: torchvision.models.resnet18(norm_layer=torch.nn.Identity), "bn1 is an Identity"),
    (lambda: _momentum_none(), "momentum=None"),
  ],
  ids=[
    "deep-stem",
    "squeeze-excitation",
    "dilation",
    "not-a-resnet",
    "no-maxpool",
    "other-maxpool",
    "no-batch-norm",
    "momentum-none",
  ],
)
def test_port_refuses_what_the_resnet_cannot_hold(make, match):
  with pytest.raises(ValueError, match=match):
    jtorch.from_torch_resnet(make())


def test_port_refuses_mixed_batch_norms():
  tm = torchvision.models.resnet18()
  tm.layer1[0].bn1 = FrozenBatchNorm2d(64)
  with pytest.raises(ValueError, match="mixes FrozenBatchNorm2d and BatchNorm2d"):
    jtorch.from_torch_resnet(tm)
  tm = torchvision.models.resnet18()
  tm.layer2[1].bn2.eps = 1e-3
  with pytest.raises(ValueError, match="differ in momentum, eps"):
    jtorch.from_torch_resnet(tm)


def test_rename_nests_and_drops_layers():
  net = torch.nn.Sequential(
    torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 2)
  )
  names = {"0": "block/conv", "1": "block/bn", "2": None}
  v = jtorch.from_torch_model(net, rename=lambda n: names.get(n, n))
  assert sorted(v["params"]["block"]) == ["bn", "conv"] and "2" not in v["params"]
  assert sorted(v["batch_stats"]) == ["block"]
  with pytest.raises(ValueError, match="puts '1' at 'x', on or inside the path of '0'"):
    jtorch.from_torch_model(net, rename=lambda n: n and "x")
  with pytest.raises(ValueError, match="puts '1' at 'blk/bn', on or inside the path of '0'"):
    jtorch.from_torch_model(net, rename={"0": "blk", "1": "blk/bn"}.get)
  # None leaves any module out, one with weights jaxbn does not convert too.
  with_norm = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.LayerNorm(2))
  with pytest.raises(ValueError, match=r"LayerNorm.*rename that returns None"):
    jtorch.from_torch_model(with_norm)
  v = jtorch.from_torch_model(with_norm, rename=lambda n: None if n == "1" else n)
  assert sorted(v["params"]) == ["0"]


def test_weights_inside_a_fused_batch_norm_are_not_dropped():
  tbn = BatchNormAct2d(3, act_layer=torch.nn.PReLU)  # PReLU has a weight
  with pytest.raises(ValueError, match=r"0.act \(PReLU\) \(inside a batch norm\) holds"):
    jtorch.from_torch_model(torch.nn.Sequential(tbn))
