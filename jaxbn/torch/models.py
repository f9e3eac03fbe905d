"""Whole models: every Conv, Linear and batch norm of a torch model as flax variables.

:func:`from_torch_model` converts the layers of any model, keyed by torch's
names or by the names a ``rename`` function gives them; :func:`from_torch_resnet`
ports a torchvision or timm ResNet into :class:`jaxbn.models.ResNet` and its
variables in one call.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax

from jaxbn import linen as jbn_linen
from jaxbn.core import BNOptions
from jaxbn.torch.bridges import from_torch_linen
from jaxbn.torch.layer import _is_batch_norm
from jaxbn.torch.layer import _is_frozen
from jaxbn.torch.layer import _to_jax
from jaxbn.torch.layer import _torch
from jaxbn.torch.layer import torch_settings
from jaxbn.torch.layouts import torch_conv_kernel
from jaxbn.torch.layouts import torch_linear_kernel

__all__ = ("from_torch_model", "from_torch_resnet", "resnet_rename")


def _put(tree: dict[str, Any], path: str, value: Any) -> None:
  """``tree[a][b] = value`` for the path ``"a/b"``."""
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def from_torch_model(
  model: Any,
  bn: Any = None,
  *,
  batch_values: float | None = None,
  rename: Callable[[str], str | None] | None = None,
) -> dict[str, dict[str, Any]]:
  """Every Conv, Linear and batch norm of a torch model as flax variables.

  ``{"params": {name: ...}, "batch_stats": {name: ...}}`` keyed by torch's
  module names (``"layer1.0.conv1"``), or by the flax paths ``rename`` gives
  them (``"layer1_0/conv1"`` nests as ``{"layer1_0": {"conv1": ...}}``):
  ``rename`` is how the variables of any architecture reach the flax model
  written for it (:func:`resnet_rename` is the ResNets'):

  - ``Conv1d/2d/3d``: ``{"kernel"}`` via :func:`torch_conv_kernel`, and
    ``"bias"`` when it has one (``flax.linen.Conv`` layout).
  - ``Linear``: ``{"kernel"}`` via :func:`torch_linear_kernel` (without
    ``input_chw``: fix a Linear after a flatten of channel-first maps with
    ``torch_linear_kernel(weight, input_chw)``), and ``"bias"``.
  - batch norms: :func:`from_torch_linen` (with ``bn`` and ``batch_values``):
    every subclass of torch's ``_BatchNorm`` (timm's ``BatchNormAct2d``, its
    activation aside: :func:`jaxbn.torch.torch_settings` names it; timm's
    ``SplitBatchNorm2d``, its auxiliary batch norms as the layers
    ``<name>.aux_bn.<i>``) and ``FrozenBatchNorm2d`` (torchvision's, timm's).

  Args:
    model: a ``torch.nn.Module``.
    bn: passed to :func:`from_torch_linen` for every batch norm.
    batch_values: passed to :func:`from_torch_linen`.
    rename: torch module name -> the flax path of the layer (``"/"``
      separates nested modules), or ``None`` to leave the layer out.

  Returns:
    The variables dict.

  Raises:
    ValueError: a module of another type holds parameters or buffers of its
      own (convert it by hand), or ``rename`` gives two layers one path.

  Examples:
    >>> import jax, jax.numpy as jnp, torch
    >>> import jaxbn.torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    >>> v = jaxbn.torch.from_torch_model(net)
    >>> jax.tree.map(jnp.shape, v["params"])
    {'0': {'bias': (4,), 'kernel': (3, 3, 3, 4)}, '1': {'bias': (4,), 'scale': (4,)}}
  """
  torch = _torch()
  nn = torch.nn
  out: dict[str, dict[str, Any]] = {"params": {}, "batch_stats": {}}
  placed: dict[str, str] = {}  # flax path -> torch name
  for name, m in model.named_modules():
    path = name if rename is None else rename(name)
    if path is None:
      continue
    own = [n for n, _ in m.named_parameters(recurse=False)]
    own += [n for n, b in m.named_buffers(recurse=False) if b is not None]
    is_bn = _is_batch_norm(m)
    layer = is_bn or isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    if layer:
      # The same path, or one inside the other ("a" and "a/b"; not "a" and "ab").
      clash = [
        t
        for p, t in placed.items()
        if f"{p}/".startswith(f"{path}/") or f"{path}/".startswith(f"{p}/")
      ]
      if clash:
        raise ValueError(
          f"from_torch_model: rename puts {name!r} at {path!r}, on or inside the path of "
          f"{clash[0]!r}; every layer needs a path of its own."
        )
      placed[path] = name
    if is_bn:
      v = from_torch_linen(m, bn, batch_values=batch_values)
      if v["params"]:
        _put(out["params"], path, v["params"])
      _put(out["batch_stats"], path, v["batch_stats"])
    elif layer:
      conv = not isinstance(m, nn.Linear)
      p = {"kernel": torch_conv_kernel(m.weight) if conv else torch_linear_kernel(m.weight)}
      if m.bias is not None:
        p["bias"] = _to_jax(m.bias)
      _put(out["params"], path, p)
    elif own:
      inside = " (inside a batch norm)" if _inside_batch_norm(model, name) else ""
      raise ValueError(
        f"from_torch_model: {name or 'the model'} ({type(m).__name__}){inside} holds {own}; "
        f"only Conv1d/2d/3d, Linear and batch norms are converted. Convert it by hand, or "
        f"leave it out with a rename that returns None for it."
      )
  return out


def _inside_batch_norm(model: Any, name: str) -> bool:
  """``name`` is a submodule of a batch norm (timm's ``act``/``drop``; not ``aux_bn``'s own)."""
  parent = name.rpartition(".")[0]
  while parent:
    if _is_batch_norm(model.get_submodule(parent)):
      return True
    parent = parent.rpartition(".")[0]
  return False


# --------------------------------------------------------------------------
# ResNets: torchvision's and timm's, into jaxbn.models.ResNet


_RESNET_NAME = re.compile(r"^(layer\d)\.(\d+)(?:\.(.*))?$")


def resnet_rename(name: str) -> str | None:
  """A torchvision/timm ResNet's module name as the path of :class:`jaxbn.models.ResNet`'s layer.

  ``"layer1.0.conv1"`` -> ``"layer1_0/conv1"``, ``"layer2.0.downsample.0"``
  (``.1``) -> ``"layer2_0/downsample_conv"`` (``downsample_bn``); the stem and head keep their names
  (``"conv1"``, ``"bn1"``, ``"fc"``). The argument ``rename`` of
  :func:`from_torch_model`.

  Examples:
    >>> from jaxbn.torch import resnet_rename
    >>> resnet_rename("layer2.0.downsample.1"), resnet_rename("fc")
    ('layer2_0/downsample_bn', 'fc')
  """
  m = _RESNET_NAME.match(name)
  if m is None:
    return name
  stage, block, rest = m.groups()
  path = f"{stage}_{block}"
  rest = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}.get(rest, rest)
  return path if rest is None else f"{path}/{rest}"


def _resnet_stages(model: Any) -> tuple[list[Any], bool, Any]:
  """The four stages, whether their blocks are bottlenecks, and the first block's 3x3 conv."""
  blocks = [getattr(model, f"layer{i}") for i in range(1, 5)]
  return blocks, hasattr(blocks[0][0], "conv3"), blocks[0][0].conv2


def _resnet_geometry(model: Any) -> dict[str, tuple]:
  """torch name -> (kernel, stride, padding, dilation, groups) of each conv torchvision's has."""
  blocks, bottleneck, conv2 = _resnet_stages(model)
  groups = conv2.groups
  geometry = {"conv1": ((7, 7), (2, 2), (3, 3), (1, 1), 1)}
  for i, stage in enumerate(blocks):
    for j in range(len(stage)):
      s = 2 if i > 0 and j == 0 else 1
      pre = f"layer{i + 1}.{j}."
      if bottleneck:
        geometry[pre + "conv1"] = ((1, 1), (1, 1), (0, 0), (1, 1), 1)
        geometry[pre + "conv2"] = ((3, 3), (s, s), (1, 1), (1, 1), groups)
        geometry[pre + "conv3"] = ((1, 1), (1, 1), (0, 0), (1, 1), 1)
      else:
        geometry[pre + "conv1"] = ((3, 3), (s, s), (1, 1), (1, 1), 1)
        geometry[pre + "conv2"] = ((3, 3), (1, 1), (1, 1), (1, 1), 1)
      if j == 0 and stage[0].downsample is not None:
        geometry[pre + "downsample.0"] = ((1, 1), (s, s), (0, 0), (1, 1), 1)
  return geometry


# Containers, and what the modules without weights of torchvision's and timm's ResNet-18/50 are.
_RESNET_CONTAINERS = ("Sequential", "BasicBlock", "Bottleneck", "ResNet")
_RESNET_IDENTITIES = ("aa", "drop_block", "drop_path", "flatten")  # timm's no-ops


def _weightless_problem(name: str, m: Any) -> str | None:
  """Why ``m`` at ``name`` is not what torchvision's (or timm's) ResNet has there, or ``None``."""
  kind, last = type(m).__name__, name.rpartition(".")[2]
  if kind in _RESNET_CONTAINERS or kind in ("ReLU", "Flatten"):
    return None
  if kind == "Identity":
    return None if last in _RESNET_IDENTITIES else "an Identity where a layer belongs"
  if kind == "MaxPool2d":
    got = (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    ok = name == "maxpool" and got in ((3, 2, 1, 1, False), ((3, 3), (2, 2), (1, 1), (1, 1), False))
    return None if ok else f"MaxPool2d with (kernel, stride, padding, dilation, ceil) {got}"
  if kind == "AdaptiveAvgPool2d":
    return None if m.output_size in (1, (1, 1)) else f"an average pool to {m.output_size}"
  if kind == "SelectAdaptivePool2d":
    return None if m.pool_type == "avg" else f"a {m.pool_type!r} global pool"
  return f"a {kind}"


def from_torch_resnet(model: Any, *, dtype: Any = None) -> tuple[Any, dict[str, Any]]:
  """A torchvision or timm ResNet as :class:`jaxbn.models.ResNet` and its variables, in one call.

  Reads the depth (the blocks per stage), the block type, ``groups`` and
  ``width_per_group`` (ResNeXt, wide ResNets), the number of classes and the
  batch norm (``BatchNorm2d`` or ``FrozenBatchNorm2d``, its epsilon and
  momentum: :func:`jaxbn.torch.torch_settings`) from ``model``, checks that
  every layer is where torchvision's structure puts it, with its geometry
  (convolutions and pools; activations, flattens and timm's no-op layers
  are the only other modules allowed), and converts the weights and running statistics with
  :func:`from_torch_model` and :func:`resnet_rename`. Pretrained weights a
  user has downloaded port the same way: load them into the torch model
  first. The flax model takes NHWC images: ``jaxbn.torch.nchw_to_nhwc(x)``.

  The batch norms train as torch's: ``momentum = 1 - torch's momentum``,
  ``running_var="unbiased"`` (a ``FrozenBatchNorm2d`` model gets
  ``norm="frozen"``: running statistics in training too).

  Args:
    model: a torchvision ``ResNet`` (``resnet18/34/50/101/152``,
      ``resnext*``, ``wide_resnet*``; any ``norm_layer`` of the two) or a
      timm ``ResNet`` with torchvision's stem and blocks (``resnet18``,
      ``resnet50``, ...).
    dtype: :attr:`jaxbn.models.ResNet.dtype`.

  Returns:
    ``(flax_model, variables)``: ``flax_model.apply(variables, x_nhwc,
    train=False)`` gives torch's eval-mode logits.

  Raises:
    ValueError: a layer torchvision's structure does not have (a deep stem,
      an anti-aliasing pool, squeeze-excitation, an average-pool shortcut, a
      dilation, a missing or different max pool), batch norms of both kinds,
      with different settings or with torch's ``momentum=None``.

  Examples:
    >>> import torchvision
    >>> from jaxbn.torch import from_torch_resnet
    >>> flax_model, variables = from_torch_resnet(torchvision.models.resnet18(num_classes=10))
    >>> flax_model.block, tuple(flax_model.stage_sizes), flax_model.bn_options.momentum
    ('basic', (2, 2, 2, 2), 0.9)
  """
  from jaxbn.models.resnet import ResNet

  fn = "from_torch_resnet"
  torch = _torch()
  nn = torch.nn
  what = f"{fn}: {type(model).__name__}"
  if not all(isinstance(getattr(model, n, None), nn.Module) for n in ("conv1", "bn1", "fc")):
    raise ValueError(f"{what} is not a ResNet with torchvision's stem (conv1, bn1) and head (fc).")
  try:
    geometry = _resnet_geometry(model)
  except AttributeError as e:
    raise ValueError(f"{what} does not have torchvision's stages and blocks ({e}).") from None
  bns = {n: m for n, m in model.named_modules() if _is_batch_norm(m)}
  if not isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
    raise ValueError(f"{what} has no max pool after its stem (maxpool); torchvision's ResNet has.")
  for name, m in model.named_modules():
    if name in geometry:
      conv = isinstance(m, nn.Conv2d) and m.bias is None
      if not conv or (m.kernel_size, m.stride, m.padding, m.dilation, m.groups) != geometry[name]:
        desc = repr(m) if isinstance(m, nn.Conv2d) else f"a {type(m).__name__}"
        raise ValueError(
          f"{what}: {name} is {desc}, not as in torchvision's ResNet: a Conv2d without bias "
          f"with (kernel, stride, padding, dilation, groups) = {geometry[name]}; port this "
          f"architecture with a flax model of its own and from_torch_model(model, rename=...)."
        )
    elif name in bns or _inside_batch_norm(model, name) or name == "fc":
      continue
    elif (problem := _weightless_problem(name, m)) is not None:
      raise ValueError(
        f"{what}: {name} is {problem}, which torchvision's ResNet does not have there; port "
        f"this architecture with a flax model of its own and from_torch_model(model, rename=...)."
      )
  if not isinstance(model.fc, nn.Linear):
    raise ValueError(f"{what}: fc is {type(model.fc).__name__}, not a Linear.")
  frozen = {_is_frozen(m) for m in bns.values()}
  if len(frozen) != 1:
    raise ValueError(
      f"{what} mixes FrozenBatchNorm2d and BatchNorm2d; make every batch norm one kind."
    )
  settings = {n: torch_settings(m) for n, m in bns.items()}
  kinds = {(s.momentum, s.epsilon, s.affine, s.track_running_stats) for s in settings.values()}
  if len(kinds) != 1 or any(s.activation is not None for s in settings.values()):
    raise ValueError(
      f"{what}: its batch norms differ in momentum, eps, affine or track_running_stats, or "
      f"fuse an activation ({sorted(kinds, key=str)}); jaxbn.models.ResNet has one setting."
    )
  s = next(iter(settings.values()))
  if not (s.affine and s.track_running_stats):
    raise ValueError(f"{what}: its batch norms need affine=True and track_running_stats=True.")
  if s.momentum is None:
    # torch's cumulative average weighs each batch equally; a module's momentum is a constant.
    raise ValueError(
      f"{what}: its batch norms have momentum=None (torch's cumulative average), which "
      f"jaxbn.models.ResNet cannot train as torch does; set a momentum on them first, or port "
      f"the layers with from_torch_model and train them with jaxbn.bn_train and "
      f"torch_settings(m).train_kwargs(state)."
    )
  blocks, bottleneck, conv2 = _resnet_stages(model)
  flax_model = ResNet(
    stage_sizes=tuple(len(b) for b in blocks),
    block="bottleneck" if bottleneck else "basic",
    num_classes=int(model.fc.out_features),
    norm="frozen" if s.frozen else "batch",
    # A frozen model never updates its statistics: only epsilon matters.
    bn_options=BNOptions(epsilon=s.epsilon)
    if s.frozen
    else BNOptions(momentum=s.momentum, epsilon=s.epsilon, running_var=s.running_var),
    groups=int(conv2.groups),
    width_per_group=int(conv2.out_channels // conv2.groups) if bottleneck else 64,
    dtype=dtype,
  )
  bn = jbn_linen.BatchNorm(options=flax_model.bn_options)  # what every batch norm there is
  variables = from_torch_model(model, bn, rename=resnet_rename)
  x = jax.ShapeDtypeStruct((1, 64, 64, int(model.conv1.in_channels)), jax.numpy.float32)
  shapes = jax.eval_shape(lambda x: flax_model.init(jax.random.key(0), x, train=False), x)
  want = jax.tree.map(lambda a: (a.shape, a.dtype), dict(shapes))
  got = jax.tree.map(lambda a: (a.shape, a.dtype), variables)
  if want != got:
    raise ValueError(
      f"{what}: its converted weights do not fit jaxbn.models.ResNet ({_tree_diff(want, got)})."
    )
  return flax_model, variables


def _tree_diff(want: Any, got: Any) -> str:
  """The first paths where two variable trees differ, for an error."""
  w = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  g = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  keystr = jax.tree_util.keystr
  only_w = sorted(keystr(k) for k in w.keys() - g.keys())[:3]
  only_g = sorted(keystr(k) for k in g.keys() - w.keys())[:3]
  differ = sorted(keystr(k) for k in w.keys() & g.keys() if w[k] != g[k])[:3]
  return f"missing {only_w}, unexpected {only_g}, different shape or dtype {differ}"
