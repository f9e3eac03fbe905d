"""The example models in flax.nnx: :class:`NNXMLP`, :class:`NNXCNN`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from jaxbn import nnx as jbn_nnx
from jaxbn.core import DEFAULTS
from jaxbn.core import BNOptions
from jaxbn.models.common import PREACTIVATION
from jaxbn.models.common import Activation
from jaxbn.models.common import activation_fn
from jaxbn.models.common import flatten


def _nnx_sow(module: nnx.Module, x: jax.Array) -> None:
  # Only inside nnx.capture: outside it, nnx would store the value on the module
  # (deprecated) and grow its state at every call.
  if hasattr(module, "__captures__"):
    module.sow(nnx.Intermediate, PREACTIVATION, x)


# --------------------------------------------------------------------------
# flax.nnx


class NNXMLP(nnx.Module):
  """The :class:`MLP` in flax.nnx.

  Args:
    in_features: size of the (flattened) input.
    features: widths of the hidden layers.
    num_classes: number of logits.
    activation: ``'sigmoid'``, ``'relu'``, ``'tanh'`` or a callable.
    use_bn: batch norm after each hidden affine map (which then has no bias).
    bn_options: the options of every :class:`jaxbn.nnx.BatchNorm`
      (:class:`jaxbn.BNOptions`).
    rngs: :class:`flax.nnx.Rngs`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbn.models import NNXMLP
    >>> model = NNXMLP(5, features=(8,), num_classes=3, rngs=nnx.Rngs(0))
    >>> model(jnp.ones((4, 5))).shape  # training mode by default
    (4, 3)
    >>> model.eval()
    >>> model(jnp.ones((1, 5))).shape
    (1, 3)
  """

  def __init__(
    self,
    in_features: int,
    features: Sequence[int] = (100, 100, 100),
    num_classes: int = 10,
    *,
    activation: Activation = "sigmoid",
    use_bn: bool = True,
    bn_options: BNOptions = DEFAULTS,
    rngs: nnx.Rngs,
  ):
    self.activation = activation
    self.use_bn = use_bn
    widths = (in_features, *features)
    self.dense = nnx.List(
      [
        nnx.Linear(a, b, use_bias=not use_bn, rngs=rngs)
        for a, b in zip(widths, features, strict=False)
      ]
    )
    self.bn = nnx.List(
      [jbn_nnx.BatchNorm(w, options=bn_options, rngs=rngs) for w in features] if use_bn else []
    )
    self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
    """Logits of ``x``; ``train`` overrides the ``.train()`` / ``.eval()`` mode."""
    act = activation_fn(self.activation)
    use_running_average = None if train is None else not train
    x = flatten(x)
    for i, dense in enumerate(self.dense):
      x = dense(x)
      if self.use_bn:
        x = self.bn[i](x, use_running_average)
      _nnx_sow(self, x)
      x = act(x)
    return self.head(x)

  def fold_pairs(self) -> list[tuple[Any, Any]]:
    """``(dense layer, batch norm)`` of each block, for :func:`jaxbn.nnx.fold_nnx`."""
    return list(zip(self.dense, self.bn, strict=True)) if self.use_bn else []

  def without_batch_norm(self) -> None:
    """Drops the batch norms, in place, once folded (``use_bn=False``)."""
    self.bn = nnx.List([])
    self.use_bn = False


class NNXCNN(nnx.Module):
  """The :class:`CNN` in flax.nnx.

  Args:
    in_channels: channels of the NHWC input.
    features: channels of the convolution blocks.
    num_classes: number of logits.
    image_size: ``(H, W)`` of the input (sizes the dense head).
    use_bn: batch norm after each convolution.
    bn_options: the options of every :class:`jaxbn.nnx.BatchNorm`
      (:class:`jaxbn.BNOptions`).
    rngs: :class:`flax.nnx.Rngs`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbn.models import NNXCNN
    >>> model = NNXCNN(1, features=(4, 8), image_size=(8, 8), rngs=nnx.Rngs(0))
    >>> model(jnp.ones((2, 8, 8, 1)), train=True).shape
    (2, 10)
  """

  def __init__(
    self,
    in_channels: int,
    features: Sequence[int] = (32, 64),
    num_classes: int = 10,
    *,
    image_size: tuple[int, int] = (8, 8),
    use_bn: bool = True,
    bn_options: BNOptions = DEFAULTS,
    rngs: nnx.Rngs,
  ):
    self.use_bn = use_bn
    chans = (in_channels, *features)
    self.conv = nnx.List(
      [
        nnx.Conv(a, b, (3, 3), padding="SAME", use_bias=not use_bn, rngs=rngs)
        for a, b in zip(chans, features, strict=False)
      ]
    )
    self.bn = nnx.List(
      [jbn_nnx.BatchNorm(c, options=bn_options, rngs=rngs) for c in features] if use_bn else []
    )
    h, w = image_size
    for _ in features:
      h, w = -(-h // 2), -(-w // 2)  # SAME pooling rounds up
    self.head = nnx.Linear(h * w * chans[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
    """Logits of NHWC images ``x``; ``train`` overrides the mode."""
    use_running_average = None if train is None else not train
    for i, conv in enumerate(self.conv):
      x = conv(x)
      if self.use_bn:
        x = self.bn[i](x, use_running_average)
      _nnx_sow(self, x)
      x = nnx.max_pool(jax.nn.relu(x), (2, 2), strides=(2, 2), padding="SAME")
    return self.head(flatten(x))

  def fold_pairs(self) -> list[tuple[Any, Any]]:
    """``(conv layer, batch norm)`` of each block, for :func:`jaxbn.nnx.fold_nnx`."""
    return list(zip(self.conv, self.bn, strict=True)) if self.use_bn else []

  def without_batch_norm(self) -> None:
    """Drops the batch norms, in place, once folded (``use_bn=False``)."""
    self.bn = nnx.List([])
    self.use_bn = False
