"""The models in flax.nnx (:class:`NNXMLP`, :class:`NNXCNN`) and their folding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from jaxbn import nnx as jbn_nnx
from jaxbn.core import DEFAULTS
from jaxbn.core import BNOptions
from jaxbn.folding import fold_bn
from jaxbn.layer import BNLayer
from jaxbn.models.common import PREACTIVATION
from jaxbn.models.common import Activation
from jaxbn.models.common import FoldTrace
from jaxbn.models.common import activation_fn
from jaxbn.models.common import flatten
from jaxbn.models.common import qualified_name


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


# --------------------------------------------------------------------------
# Folding

_BATCH_NORMS = (jbn_nnx.BatchNorm, nnx.BatchNorm)
_LINEAR = (nnx.Linear, nnx.Conv)


class FoldedBatchNorm(nnx.Module):
  """A batch norm folded into the layer before it (by :func:`fold_nnx`): the identity.

  Takes the batch norm's call arguments (``use_running_average``, ``mask``)
  and returns ``x``, in ``dtype`` when given.
  """

  def __init__(self, dtype: Any = None):
    self.dtype = dtype

  def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    return x if self.dtype is None else x.astype(self.dtype)


def _nodes(model: Any) -> dict[tuple, Any]:
  return {tuple(p): n for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Module)}


def _path(path: tuple) -> str:
  return "/".join(map(str, path))


def _traced_pairs(fn: str, model: Any, args: tuple, kwargs: dict) -> list[tuple[tuple, tuple]]:
  """``(linear path, batch-norm path)`` of every batch norm in a call of a copy of ``model``.

  While the copy runs, the ``__call__`` of the batch norms, ``Linear`` and
  ``Conv`` record their inputs and outputs: a batch norm folds when its
  input is the very output of a ``Linear`` or ``Conv`` call.
  """
  probe = nnx.clone(model)
  paths = {id(n): p for p, n in _nodes(probe).items()}
  trace = FoldTrace("Linear or Conv", _path)

  def spy(cls: type) -> Any:
    call = cls.__call__

    def spied(self, *a, **kw):
      path = paths.get(id(self), ("?",))
      if isinstance(self, _BATCH_NORMS):
        trace.batch_norm(path, self, a[0] if a else kw.get("x"), BNLayer.of(self).options.axis)
      out = call(self, *a, **kw)
      trace.called(path, self, out, linear=isinstance(self, _LINEAR))
      return out

    return call, spied

  classes = (*_BATCH_NORMS, *_LINEAR)
  saved = {}
  try:
    for cls in classes:
      saved[cls], cls.__call__ = spy(cls)
    probe(*args, **kwargs)
  finally:
    for cls, call in saved.items():
      cls.__call__ = call
  return [(linear, bn) for bn, (linear, _) in trace.result(fn, model).items()]


def _fold_into(layer: Any, bn: Any) -> None:
  """Folds the nnx batch norm ``bn`` into the ``Linear`` or ``Conv`` ``layer``, in place."""
  params, state = BNLayer.of(bn).read_nnx(bn)
  old_bias = layer.bias[...] if layer.bias is not None else None
  kernel, bias = fold_bn(layer.kernel[...], old_bias, params, state, epsilon=bn.epsilon)
  layer.kernel.set_value(kernel)
  layer.bias = nnx.Param(bias)
  layer.use_bias = True


def fold_nnx(model: Any, *args: Any, **kwargs: Any) -> Any:
  """Folds every batch norm of an nnx model into the Linear or Conv before it.

  Returns a copy (``nnx.clone``; ``model`` is unchanged) whose ``Linear`` /
  ``Conv`` layers followed by a batch norm (:class:`jaxbn.nnx.BatchNorm` or
  ``flax.nnx.BatchNorm``) carry the folded kernel and bias
  (:func:`jaxbn.fold_bn` with the batch norm's ``epsilon``), in evaluation
  mode. Its output equals the original's in evaluation mode.

  For :class:`jaxbn.models.NNXMLP` and :class:`jaxbn.models.NNXCNN` the copy
  has no batch norm (``use_bn=False``). Any other model needs an example
  call, ``fold_nnx(model, x)`` (its call arguments, e.g. ``x, train=False``):
  a copy runs it to find which layer each batch norm follows, and each batch
  norm of the result is a :class:`FoldedBatchNorm` (the identity). A batch
  norm that does not directly follow a ``Linear`` or ``Conv`` (an activation
  between them, say) or normalizes another axis than the layer's output
  features is an error naming it. The layer's output must feed only the
  batch norm, which the call does not check.

  Args:
    model: an nnx model.
    *args: an example call's arguments (not needed for jaxbn's models).
    **kwargs: its keyword arguments.

  Returns:
    The folded copy.

  Raises:
    TypeError: a model other than jaxbn's without an example call.
    ValueError: a batch norm that cannot be folded (named with its path and
      class), or no batch norm.

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

    A model of one's own:

    >>> from jaxbn import nnx as jbn
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.dense = nnx.Linear(5, 8, use_bias=False, rngs=rngs)
    ...     self.bn = jbn.BatchNorm(8, rngs=rngs)
    ...     self.head = nnx.Linear(8, 3, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.head(nnx.relu(self.bn(self.dense(x))))
    >>> net = Net(nnx.Rngs(0))
    >>> _ = net(x)  # one training step moves the running statistics
    >>> net.eval()
    >>> folded = jaxbn.fold_nnx(net, x)
    >>> type(folded.bn).__name__
    'FoldedBatchNorm'
    >>> bool(jnp.allclose(folded(x), net(x), atol=1e-5))
    True
  """
  fn = "fold_nnx"
  own = isinstance(model, (NNXMLP, NNXCNN))
  if own and not model.use_bn:
    raise ValueError(f"{fn}: the model has use_bn=False; there is nothing to fold.")
  if own and not args and not kwargs:
    folded = nnx.clone(model)
    layers = folded.dense if isinstance(folded, NNXMLP) else folded.conv
    for layer, bn in zip(layers, folded.bn, strict=True):
      _fold_into(layer, bn)
    folded.bn = nnx.List([])
    folded.use_bn = False
    folded.eval()
    return folded
  if not args and not kwargs:
    raise TypeError(
      f"{fn}: {qualified_name(model)} is not a jaxbn.models.NNXMLP or NNXCNN; pass an example "
      f"call, fold_nnx(model, x), so that the layer each batch norm follows can be found."
    )
  pairs = _traced_pairs(fn, model, args, kwargs)
  folded = nnx.clone(model)
  nodes = _nodes(folded)
  for linear, bn in pairs:
    _fold_into(nodes[linear], nodes[bn])
    parent, key = nodes[bn[:-1]], bn[-1]
    identity = FoldedBatchNorm(getattr(nodes[bn], "dtype", None))
    if isinstance(key, int):
      parent[key] = identity
    else:
      setattr(parent, key, identity)
  folded.eval()
  return folded
