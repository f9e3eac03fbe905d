"""The example models in flax.linen: :class:`MLP`, :class:`CNN`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from jaxbn import linen as jbn_linen
from jaxbn.core import DEFAULTS
from jaxbn.core import BNOptions
from jaxbn.models.common import PREACTIVATION
from jaxbn.models.common import Activation
from jaxbn.models.common import activation_fn
from jaxbn.models.common import flatten

# --------------------------------------------------------------------------
# flax.linen


class MLP(nn.Module):
  """Fully connected classifier: ``Dense -> BatchNorm -> activation`` blocks, dense head.

  The paper's MNIST network is ``MLP(features=(100, 100, 100),
  activation='sigmoid')``. Input ``(N, D)`` (or any ``(N, ...)``, flattened);
  output logits ``(N, num_classes)``.

  Attributes:
    features: widths of the hidden layers.
    num_classes: number of logits.
    activation: ``'sigmoid'`` (the paper's), ``'relu'``, ``'tanh'`` or a
      callable.
    use_bn: batch norm after each hidden affine map (which then has no bias).
    bn_options: the options of every batch-norm layer (:class:`jaxbn.BNOptions`;
      ``axis_name`` for data parallelism).
    kernel_init: initializer of the dense kernels.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbn.models import MLP
    >>> model = MLP(features=(8, 8), num_classes=3)
    >>> x = jnp.ones((4, 5))
    >>> variables = model.init(jax.random.key(0), x, train=False)
    >>> logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
    >>> logits.shape, sorted(updates['batch_stats'])
    ((4, 3), ['BatchNorm_0', 'BatchNorm_1'])
  """

  features: Sequence[int] = (100, 100, 100)
  num_classes: int = 10
  activation: Activation = "sigmoid"
  use_bn: bool = True
  bn_options: BNOptions = DEFAULTS
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Logits of ``x``; batch statistics in training, running ones otherwise."""
    act = activation_fn(self.activation)
    x = flatten(x)
    for width in self.features:
      x = nn.Dense(width, use_bias=not self.use_bn, kernel_init=self.kernel_init)(x)
      if self.use_bn:
        x = jbn_linen.BatchNorm(use_running_average=not train, options=self.bn_options)(x)
      self.sow("intermediates", PREACTIVATION, x)
      x = act(x)
    return nn.Dense(self.num_classes, kernel_init=self.kernel_init)(x)

  def fold_pairs(self) -> list[tuple[str, str, BNOptions]]:
    """``(Dense, BatchNorm, options)`` of each hidden layer, for :func:`jaxbn.linen.fold_linen`."""
    n = len(self.features) if self.use_bn else 0
    return [(f"Dense_{i}", f"BatchNorm_{i}", self.bn_options) for i in range(n)]

  def without_batch_norm(self) -> MLP:
    """The same network with ``use_bn=False``: the folded model."""
    return self.clone(use_bn=False)


class CNN(nn.Module):
  """Convolutional classifier for NHWC images.

  Blocks of ``Conv(3x3, SAME) -> BatchNorm -> relu -> max pool (2x2)`` (the
  convolution has no bias when batch norm follows; batch norm normalizes each
  feature map over batch and positions, Sec. 3.2), then a dense head on the
  flattened features. Input ``(N, H, W, C)``; output logits
  ``(N, num_classes)``.

  Attributes:
    features: channels of the convolution blocks.
    num_classes: number of logits.
    use_bn: batch norm after each convolution.
    bn_options: the options of every batch-norm layer (:class:`jaxbn.BNOptions`;
      ``axis_name`` for data parallelism).
    kernel_init: initializer of the kernels.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbn.models import CNN
    >>> model = CNN(features=(4, 8), num_classes=10)
    >>> x = jnp.ones((2, 8, 8, 1))
    >>> variables = model.init(jax.random.key(0), x, train=False)
    >>> model.apply(variables, x, train=False).shape
    (2, 10)
  """

  features: Sequence[int] = (32, 64)
  num_classes: int = 10
  use_bn: bool = True
  bn_options: BNOptions = DEFAULTS
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Logits of NHWC images ``x``."""
    for channels in self.features:
      x = nn.Conv(
        channels, (3, 3), padding="SAME", use_bias=not self.use_bn, kernel_init=self.kernel_init
      )(x)
      if self.use_bn:
        x = jbn_linen.BatchNorm(use_running_average=not train, options=self.bn_options)(x)
      self.sow("intermediates", PREACTIVATION, x)
      # window_shape by keyword, as jax2onnx (ONNX export) patches nn.max_pool to take it.
      x = nn.max_pool(jax.nn.relu(x), window_shape=(2, 2), strides=(2, 2), padding="SAME")
    return nn.Dense(self.num_classes, kernel_init=self.kernel_init)(flatten(x))

  def fold_pairs(self) -> list[tuple[str, str, BNOptions]]:
    """``(Conv, BatchNorm, options)`` of each block, for :func:`jaxbn.linen.fold_linen`."""
    n = len(self.features) if self.use_bn else 0
    return [(f"Conv_{i}", f"BatchNorm_{i}", self.bn_options) for i in range(n)]

  def without_batch_norm(self) -> CNN:
    """The same network with ``use_bn=False``: the folded model."""
    return self.clone(use_bn=False)
