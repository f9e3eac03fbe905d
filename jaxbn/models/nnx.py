"""The models in flax.nnx (:class:`NNXMLP`, :class:`NNXCNN`) and their folding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from jaxbn import nnx as jbn_nnx
from jaxbn.core import BNOptions
from jaxbn.folding import fold_bn
from jaxbn.models._common import PREACTIVATION
from jaxbn.models._common import Activation
from jaxbn.models._common import _activation
from jaxbn.models._common import _flatten


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
    bn_options: BNOptions = BNOptions(),
    rngs: nnx.Rngs,
  ):
    self.activation = activation
    self.use_bn = use_bn
    bn = bn_options._asdict()
    widths = (in_features, *features)
    self.dense = nnx.List(
      [
        nnx.Linear(a, b, use_bias=not use_bn, rngs=rngs)
        for a, b in zip(widths, features, strict=False)
      ]
    )
    self.bn = nnx.List([jbn_nnx.BatchNorm(w, rngs=rngs, **bn) for w in features] if use_bn else [])
    self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool | None = None) -> jax.Array:
    """Logits of ``x``; ``train`` overrides the ``.train()`` / ``.eval()`` mode."""
    act = _activation(self.activation)
    use_running_average = None if train is None else not train
    x = _flatten(x)
    for i, dense in enumerate(self.dense):
      x = dense(x)
      if self.use_bn:
        x = self.bn[i](x, use_running_average)
      _nnx_sow(self, x)
      x = act(x)
    return self.head(x)


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
    bn_options: BNOptions = BNOptions(),
    rngs: nnx.Rngs,
  ):
    self.use_bn = use_bn
    bn = bn_options._asdict()
    chans = (in_channels, *features)
    self.conv = nnx.List(
      [
        nnx.Conv(a, b, (3, 3), padding="SAME", use_bias=not use_bn, rngs=rngs)
        for a, b in zip(chans, features, strict=False)
      ]
    )
    self.bn = nnx.List([jbn_nnx.BatchNorm(c, rngs=rngs, **bn) for c in features] if use_bn else [])
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
    return self.head(_flatten(x))


def fold_nnx(model: Any) -> Any:
  """Folds every batch norm of an nnx :class:`jaxbn.models.NNXMLP` or ``NNXCNN``.

  Returns a copy (``nnx.clone``) whose hidden ``Linear`` / ``Conv`` layers
  carry the folded kernel and bias (:func:`fold_bn`) and which has no batch
  norm (``use_bn=False``); ``model`` is unchanged. The copy's output equals
  the original's in evaluation mode.

  Args:
    model: a :class:`jaxbn.models.NNXMLP` or :class:`jaxbn.models.NNXCNN`
      with ``use_bn=True``.

  Returns:
    The folded copy.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxbn
    >>> from jaxbn.models import NNXMLP
    >>> model = NNXMLP(5, features=(8,), num_classes=3, rngs=nnx.Rngs(0))
    >>> folded = jaxbn.fold_nnx(model)
    >>> x = jax.random.normal(jax.random.key(0), (4, 5))
    >>> bool(jnp.allclose(folded(x), model(x, train=False), atol=1e-5))
    True
  """
  fn = "fold_nnx"
  if not isinstance(model, (NNXMLP, NNXCNN)):
    raise TypeError(
      f"{fn}: model must be a jaxbn.models.NNXMLP or NNXCNN, got {type(model).__name__}; "
      f"for another model, fold each layer with jaxbn.fold_bn."
    )
  if not model.use_bn:
    raise ValueError(f"{fn}: the model has use_bn=False; there is nothing to fold.")
  folded = nnx.clone(model)
  layers = folded.dense if isinstance(folded, NNXMLP) else folded.conv
  for layer, bn in zip(layers, folded.bn, strict=True):
    params, state = jbn_nnx.params_and_state(bn)
    old_bias = layer.bias[...] if layer.bias is not None else None
    kernel, bias = fold_bn(layer.kernel[...], old_bias, params, state, epsilon=bn.epsilon)
    layer.kernel[...] = kernel
    layer.bias = nnx.Param(bias)
    layer.use_bias = True
  folded.bn = nnx.List([])
  folded.use_bn = False
  folded.eval()
  return folded
