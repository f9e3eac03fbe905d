"""ResNets in flax.linen with torchvision's structure: :class:`ResNet` and its depths.

torchvision's ResNet (v1.5: the stride of a bottleneck is on its 3x3
convolution) for NHWC images: a 7x7 stride-2 stem, a 3x3 stride-2 max pool,
four stages of basic or bottleneck blocks (64, 128, 256, 512 planes; every
stage after the first halves the resolution), a global average pool and a
dense head. Every convolution is followed by batch norm and has no bias; a
block whose shape changes has a ``1x1`` convolution and batch norm on its
shortcut. The layers carry torch's names (``conv1``, ``bn1``,
``layer1_0/conv1``, ``fc``), so that :func:`jaxbn.torch.from_torch_resnet`
ports a torchvision or timm ResNet's weights by renaming ``layer1.0.`` to
``layer1_0/``; the shortcut's ``downsample.0`` and ``downsample.1`` are
``downsample_conv`` and ``downsample_bn`` (a batch norm's name ends in ``bn``,
so that :func:`jaxbn.training.freeze_bn_affine` and the other masks find it).

References:
  He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
  arXiv:1512.03385 (Table 1: the depths); Ioffe & Szegedy 2015,
  arXiv:1502.03167, Sec. 3.2 (batch norm after each convolution, per channel).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbn import linen as jbn_linen
from jaxbn.core import DEFAULTS
from jaxbn.core import BNOptions

__all__ = ("BLOCKS", "NORMS", "ResNet", "resnet18", "resnet34", "resnet50", "resnet101")

BLOCKS = ("basic", "bottleneck")
"""The residual blocks: two 3x3 convolutions, or 1x1, 3x3 (grouped), 1x1 with 4x the planes."""

NORMS = ("batch", "frozen")
"""``"batch"``: batch statistics in training; ``"frozen"``: running statistics always."""

_EXPANSION = {"basic": 1, "bottleneck": 4}
# torchvision's initialization: He normal, fan-out, for every convolution.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pad(k: int, dilation: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
  p = dilation * (k - 1) // 2
  return ((p, p), (p, p))


class _Block(nn.Module):
  """One residual block: ``conv1``, ``bn1``, ..., ``downsample_conv``, ``downsample_bn``."""

  planes: int
  strides: int
  block: str
  groups: int
  width_per_group: int
  norm: Any
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out = self.planes * _EXPANSION[self.block]
    conv = lambda f, k, s, name, g=1: nn.Conv(
      f,
      (k, k),
      strides=s,
      padding=_pad(k),
      use_bias=False,
      feature_group_count=g,
      kernel_init=_CONV_INIT,
      dtype=self.dtype,
      name=name,
    )
    if self.block == "basic":
      y = nn.relu(self.norm(name="bn1")(conv(self.planes, 3, self.strides, "conv1")(x)))
      y = self.norm(name="bn2")(conv(out, 3, 1, "conv2")(y))
    else:
      width = int(self.planes * (self.width_per_group / 64.0)) * self.groups
      y = nn.relu(self.norm(name="bn1")(conv(width, 1, 1, "conv1")(x)))
      y = nn.relu(self.norm(name="bn2")(conv(width, 3, self.strides, "conv2", self.groups)(y)))
      y = self.norm(name="bn3")(conv(out, 1, 1, "conv3")(y))
    if self.strides != 1 or x.shape[-1] != out:
      x = self.norm(name="downsample_bn")(conv(out, 1, self.strides, "downsample_conv")(x))
    return nn.relu(y + x)


class ResNet(nn.Module):
  """A ResNet with torchvision's structure and layer names, for NHWC images.

  ``stem (conv 7x7/2, BN, relu, max pool 3x3/2) -> 4 stages -> average pool
  -> Dense``; stage ``i`` has ``stage_sizes[i]`` blocks of ``64 * 2**i``
  planes, the first with stride 2 (stride 1 in the first stage). Input
  ``(N, H, W, C)``; output logits ``(N, num_classes)``. :func:`resnet18`,
  :func:`resnet34`, :func:`resnet50` and :func:`resnet101` give the depths of
  the paper (Table 1); ``groups`` and ``width_per_group`` give ResNeXt and
  wide ResNets (torchvision's ``resnext50_32x4d``: ``groups=32,
  width_per_group=4``).

  Attributes:
    stage_sizes: the number of blocks in each of the four stages.
    block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (50 and deeper).
    num_classes: number of logits.
    norm: ``"batch"`` (:class:`jaxbn.linen.BatchNorm`: batch statistics in
      training, running ones in evaluation) or ``"frozen"`` (running
      statistics in training too, as torchvision's ``FrozenBatchNorm2d``;
      train with :func:`jaxbn.training.freeze_bn_affine` to keep scale and
      bias fixed too).
    bn_options: the options of every batch norm (:class:`jaxbn.BNOptions`;
      :func:`jaxbn.torch.from_torch_resnet` sets torch's momentum, epsilon
      and unbiased running variance).
    groups: groups of the 3x3 convolution of a bottleneck.
    width_per_group: planes per group of a bottleneck's 3x3 convolution at
      ``planes=64`` (64: the standard ResNet).
    dtype: the computation dtype of the convolutions and the head (``None``:
      from the inputs and parameters).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbn.models import resnet18
    >>> model = resnet18(num_classes=10)
    >>> x = jnp.ones((2, 32, 32, 3))
    >>> variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
    >>> sorted(variables["params"])[:4]
    ['bn1', 'conv1', 'fc', 'layer1_0']
    >>> logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    >>> logits.shape
    (2, 10)
  """

  stage_sizes: Sequence[int]
  block: str = "basic"
  num_classes: int = 1000
  norm: str = "batch"
  bn_options: BNOptions = DEFAULTS
  groups: int = 1
  width_per_group: int = 64
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Logits of NHWC images ``x``; batch statistics in training when ``norm="batch"``."""
    if self.block not in BLOCKS:
      raise ValueError(f"ResNet: block must be one of {BLOCKS}, got {self.block!r}.")
    if self.norm not in NORMS:
      raise ValueError(f"ResNet: norm must be one of {NORMS}, got {self.norm!r}.")
    if len(self.stage_sizes) != 4:
      raise ValueError(f"ResNet: stage_sizes must have 4 entries, got {tuple(self.stage_sizes)}.")
    if x.ndim != 4:
      raise ValueError(f"ResNet: x must be NHWC images (rank 4), got shape {x.shape}.")
    frozen = self.norm == "frozen"
    norm = lambda name: jbn_linen.BatchNorm(
      use_running_average=frozen or not train, options=self.bn_options, name=name
    )
    x = nn.Conv(
      64,
      (7, 7),
      strides=2,
      padding=_pad(7),
      use_bias=False,
      kernel_init=_CONV_INIT,
      dtype=self.dtype,
      name="conv1",
    )(x)
    x = nn.relu(norm("bn1")(x))
    # torch's MaxPool2d(3, 2, padding=1): padding with -inf, then a VALID pool (the same
    # values; jax2onnx 0.17 exports nn.max_pool's explicit padding wrongly, and patches it with
    # a keyword-only signature).
    x = jnp.pad(x, ((0, 0), *_pad(3), (0, 0)), constant_values=-jnp.inf)
    x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")
    for i, n in enumerate(self.stage_sizes):
      for j in range(n):
        x = _Block(
          planes=64 * 2**i,
          strides=2 if i > 0 and j == 0 else 1,
          block=self.block,
          groups=self.groups,
          width_per_group=self.width_per_group,
          norm=norm,
          dtype=self.dtype,
          name=f"layer{i + 1}_{j}",
        )(x)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


def resnet18(**kwargs: Any) -> ResNet:
  """ResNet-18: basic blocks, stages of 2, 2, 2, 2 (``kwargs``: the other attributes)."""
  return ResNet(stage_sizes=(2, 2, 2, 2), block="basic", **kwargs)


def resnet34(**kwargs: Any) -> ResNet:
  """ResNet-34: basic blocks, stages of 3, 4, 6, 3."""
  return ResNet(stage_sizes=(3, 4, 6, 3), block="basic", **kwargs)


def resnet50(**kwargs: Any) -> ResNet:
  """ResNet-50: bottleneck blocks, stages of 3, 4, 6, 3."""
  return ResNet(stage_sizes=(3, 4, 6, 3), block="bottleneck", **kwargs)


def resnet101(**kwargs: Any) -> ResNet:
  """ResNet-101: bottleneck blocks, stages of 3, 4, 23, 3."""
  return ResNet(stage_sizes=(3, 4, 23, 3), block="bottleneck", **kwargs)
