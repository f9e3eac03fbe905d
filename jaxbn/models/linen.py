"""The models in flax.linen (:class:`MLP`, :class:`CNN`) and their folding."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from flax import traverse_util

from jaxbn import linen as jbn_linen
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
      x = nn.max_pool(jax.nn.relu(x), (2, 2), strides=(2, 2), padding="SAME")
    return nn.Dense(self.num_classes, kernel_init=self.kernel_init)(flatten(x))


# --------------------------------------------------------------------------
# Folding


_BATCH_NORMS = (jbn_linen.BatchNorm, nn.BatchNorm)
_LINEAR = (nn.Dense, nn.Conv)


def _known_pairs(model: Any) -> list[tuple[str, str, BNLayer]]:
  """``(linear, batch norm, its layer)`` of a :class:`MLP` or :class:`CNN`, by their names."""
  name = "Dense" if isinstance(model, MLP) else "Conv"
  layer = BNLayer(options=model.bn_options)
  return [(f"{name}_{i}", f"BatchNorm_{i}", layer) for i in range(len(model.features))]


def _traced_pairs(fn: str, model: Any, variables: Any, args: tuple, kwargs: dict):
  """``(linear, batch norm)`` paths of every batch norm in a call of ``model``.

  Traces ``model.apply(variables, *args, **kwargs)`` (shapes only) and
  follows the data: a batch norm folds when its input is the very output of
  a ``Dense`` or ``Conv`` call.
  """
  trace = FoldTrace("Dense or Conv")

  def intercept(next_fun, a, kw, context):
    mod = context.module
    if context.method_name != "__call__":
      return next_fun(*a, **kw)
    path = "/".join(mod.path)
    if isinstance(mod, _BATCH_NORMS):
      trace.batch_norm(path, mod, a[0] if a else kw.get("x"), BNLayer.of(mod).options.axis)
    out = next_fun(*a, **kw)
    trace.called(path, mod, out, linear=isinstance(mod, _LINEAR))
    return out

  with nn.intercept_methods(intercept):
    jax.eval_shape(lambda v, *a: model.apply(v, *a, **kwargs), variables, *args)
  pairs = trace.result(fn, model)
  return [(linear, bn, BNLayer.of(mod)) for bn, (linear, mod) in pairs.items()]


def _fold_variables(fn: str, variables: Any, pairs: list[tuple[str, str, BNLayer]]) -> dict:
  """``variables`` with each batch norm folded into its linear layer and removed."""
  flat = {
    col: traverse_util.flatten_dict(dict(tree), sep="/") for col, tree in dict(variables).items()
  }
  params, stats = flat.get("params", {}), flat.get("batch_stats", {})
  for linear, bn, layer in pairs:

    def entries(col, prefix):
      return {k[len(prefix) + 1 :]: v for k, v in col.items() if k.startswith(prefix + "/")}

    lin, bn_p, bn_s = entries(params, linear), entries(params, bn), entries(stats, bn)
    if "kernel" not in lin or not bn_s:
      raise ValueError(
        f"{fn}: variables lack {linear!r} in 'params' or {bn!r} in 'batch_stats'; were they "
        f"made by this model's init?"
      )
    p, s = layer.read_linen({"params": bn_p, "batch_stats": bn_s})
    kernel, bias = fold_bn(lin["kernel"], lin.get("bias"), p, s, epsilon=layer.options.epsilon)
    params[f"{linear}/kernel"], params[f"{linear}/bias"] = kernel, bias
    for col in (params, stats):
      for k in [k for k in col if k.startswith(bn + "/")]:
        del col[k]
  return {col: traverse_util.unflatten_dict(tree, sep="/") for col, tree in flat.items() if tree}


@dataclasses.dataclass(frozen=True)
class FoldedLinen:
  """A linen model whose batch norms are folded into the layers before them.

  ``apply(variables, *args, **kwargs)`` runs ``model.apply`` with every
  folded batch norm skipped and each layer it followed adding its folded
  bias (made by :func:`fold_linen`, with its variables).

  Attributes:
    model: the original model.
    pairs: ``(linear path, batch-norm path)`` of every fold.
  """

  model: Any
  pairs: tuple[tuple[str, str], ...]

  def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
    """``model.apply(variables, *args, **kwargs)`` without the folded batch norms."""
    linear = {lin for lin, _ in self.pairs}
    bns = {bn for _, bn in self.pairs}

    def intercept(next_fun, a, kw, context):
      mod = context.module
      path = "/".join(mod.path)
      if context.method_name != "__call__" or (path not in bns and path not in linear):
        return next_fun(*a, **kw)
      if path in bns:
        x = a[0] if a else kw["x"]
        return x if getattr(mod, "dtype", None) is None else x.astype(mod.dtype)
      y = next_fun(*a, **kw)
      if mod.use_bias:  # the layer adds the folded bias itself
        return y
      bias = mod.get_variable("params", "bias").astype(y.dtype)
      return y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)

    with nn.intercept_methods(intercept):
      return self.model.apply(variables, *args, **kwargs)


def fold_linen(model: Any, variables: Any, *args: Any, **kwargs: Any) -> tuple[Any, dict]:
  """Folds every batch norm of a linen model into the Dense or Conv before it.

  Each batch norm (:class:`jaxbn.linen.BatchNorm` or ``flax.linen.BatchNorm``)
  whose input is the output of a ``Dense`` or ``Conv`` becomes that layer's
  bias, by :func:`jaxbn.fold_bn` with the batch norm's own ``epsilon``; its
  variables leave the tree. The folded model's evaluation output equals the
  original's.

  For :class:`jaxbn.models.MLP` and :class:`jaxbn.models.CNN` the folded
  model is the same class with ``use_bn=False``. Any other model needs an
  example call, ``fold_linen(model, variables, x, train=False)`` (the
  arguments after ``variables`` of its ``apply``, in evaluation mode; only
  shapes are used): the call is traced to find which layer each batch norm
  follows, and the folded model is a :class:`FoldedLinen`, whose ``apply``
  runs the model with those batch norms skipped. A batch norm that does not
  directly follow a ``Dense`` or ``Conv`` (an activation between them, say)
  or normalizes another axis than the layer's output features is an error
  naming it. The layer's output must feed only the batch norm (as in
  ``Dense -> BatchNorm -> activation``), which the trace does not check.

  Args:
    model: a linen model.
    variables: its ``'params'`` and ``'batch_stats'`` (running or population
      statistics).
    *args: an example call's arguments (not needed for jaxbn's models).
    **kwargs: its keyword arguments (e.g. ``train=False``).

  Returns:
    ``(folded_model, folded_variables)``.

  Raises:
    TypeError: a model other than jaxbn's without an example call.
    ValueError: a batch norm that cannot be folded (named with its path and
      class), no batch norm, or variables that do not match the model.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxbn
    >>> from jaxbn.models import MLP
    >>> model = MLP(features=(8,), num_classes=3)
    >>> x = jax.random.normal(jax.random.key(0), (4, 5))
    >>> variables = model.init(jax.random.key(1), x, train=False)
    >>> folded, folded_vars = jaxbn.fold_linen(model, variables)
    >>> folded.use_bn, sorted(folded_vars['params']['Dense_0'])
    (False, ['bias', 'kernel'])
    >>> want = model.apply(variables, x, train=False)
    >>> bool(jnp.allclose(folded.apply(folded_vars, x, train=False), want, atol=1e-5))
    True

    A model of one's own, with flax's batch norm:

    >>> import flax.linen as nn
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     x = nn.Dense(8, use_bias=False)(x)
    ...     x = nn.BatchNorm(use_running_average=not train)(x)
    ...     return nn.Dense(3)(nn.relu(x))
    >>> net = Net()
    >>> variables = net.init(jax.random.key(1), x, train=False)
    >>> folded, folded_vars = jaxbn.fold_linen(net, variables, x, train=False)
    >>> sorted(folded_vars)
    ['params']
    >>> want = net.apply(variables, x, train=False)
    >>> bool(jnp.allclose(folded.apply(folded_vars, x, train=False), want, atol=1e-5))
    True
  """
  fn = "fold_linen"
  own = isinstance(model, (MLP, CNN))
  if own and not model.use_bn:
    raise ValueError(f"{fn}: the model has use_bn=False; there is nothing to fold.")
  if own and not args and not kwargs:
    pairs = _known_pairs(model)
  elif not args and not kwargs:
    raise TypeError(
      f"{fn}: {qualified_name(model)} is not a jaxbn.models.MLP or CNN; pass an example call after "
      f"the variables, fold_linen(model, variables, x, train=False), so that the layer "
      f"each batch norm follows can be traced."
    )
  else:
    pairs = _traced_pairs(fn, model, variables, args, kwargs)
  folded = _fold_variables(fn, variables, pairs)
  if own:
    return model.clone(use_bn=False), {"params": folded["params"]}
  return FoldedLinen(model, tuple((lin, bn) for lin, bn, _ in pairs)), folded
