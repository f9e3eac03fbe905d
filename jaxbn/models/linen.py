"""The models in flax.linen (:class:`MLP`, :class:`CNN`) and their folding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbn import linen as jbn_linen
from jaxbn.core import BNOptions
from jaxbn.core import BNParams
from jaxbn.core import BNState
from jaxbn.folding import fold_bn
from jaxbn.models._common import PREACTIVATION
from jaxbn.models._common import Activation
from jaxbn.models._common import _activation
from jaxbn.models._common import _flatten

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
  bn_options: BNOptions = BNOptions()
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Logits of ``x``; batch statistics in training, running ones otherwise."""
    act = _activation(self.activation)
    x = _flatten(x)
    for width in self.features:
      x = nn.Dense(width, use_bias=not self.use_bn, kernel_init=self.kernel_init)(x)
      if self.use_bn:
        x = jbn_linen.BatchNorm(use_running_average=not train, **self.bn_options._asdict())(x)
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
  bn_options: BNOptions = BNOptions()
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Logits of NHWC images ``x``."""
    for channels in self.features:
      x = nn.Conv(
        channels, (3, 3), padding="SAME", use_bias=not self.use_bn, kernel_init=self.kernel_init
      )(x)
      if self.use_bn:
        x = jbn_linen.BatchNorm(use_running_average=not train, **self.bn_options._asdict())(x)
      self.sow("intermediates", PREACTIVATION, x)
      x = nn.max_pool(jax.nn.relu(x), (2, 2), strides=(2, 2), padding="SAME")
    return nn.Dense(self.num_classes, kernel_init=self.kernel_init)(_flatten(x))


def _layer_names(fn: str, model: Any) -> tuple[str, int]:
  if isinstance(model, MLP):
    return "Dense", len(model.features)
  if isinstance(model, CNN):
    return "Conv", len(model.features)
  raise TypeError(
    f"{fn}: model must be a jaxbn.models.MLP or CNN, got {type(model).__name__}; for "
    f"another model, fold each layer with jaxbn.fold_bn."
  )


def fold_linen(model: Any, variables: Any) -> tuple[Any, dict]:
  """Folds every batch norm of a linen :class:`jaxbn.models.MLP` or ``CNN``.

  Each hidden ``Dense`` (or ``Conv``) followed by a batch norm becomes one
  ``Dense`` (``Conv``) with a bias, by :func:`fold_bn` with the model's
  ``epsilon``; the head is kept. The result is the same model class with
  ``use_bn=False`` and variables without ``'batch_stats'``, whose
  ``apply(..., train=False)`` equals the original's in evaluation mode.

  Args:
    model: a :class:`jaxbn.models.MLP` or :class:`jaxbn.models.CNN` with
      ``use_bn=True``.
    variables: its ``'params'`` and ``'batch_stats'`` (running or population
      statistics).

  Returns:
    ``(folded_model, folded_variables)`` with ``folded_variables =
    {'params': ...}``.

  Raises:
    TypeError: another model class.
    ValueError: the model has no batch norm, or the variables do not match it.

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
  """
  fn = "fold_linen"
  layer, n = _layer_names(fn, model)
  if not model.use_bn:
    raise ValueError(f"{fn}: the model has use_bn=False; there is nothing to fold.")
  params = dict(variables["params"])
  stats = variables.get("batch_stats", {})
  for i in range(n):
    name, bn = f"{layer}_{i}", f"BatchNorm_{i}"
    if name not in params or bn not in params or bn not in stats:
      raise ValueError(
        f"{fn}: variables lack {name!r} or {bn!r} (in 'params' and 'batch_stats'); "
        f"were they made by this model's init?"
      )
    bn_params = BNParams(params[bn]["scale"], params[bn]["bias"])
    state = BNState(
      stats[bn]["mean"],
      stats[bn]["var"],
      jnp.zeros_like(stats[bn]["mean"]),
      jnp.zeros((), jnp.int32),
    )
    kernel, bias = fold_bn(
      params[name]["kernel"],
      params[name].get("bias"),
      bn_params,
      state,
      epsilon=model.bn_options.epsilon,
    )
    params[name] = {"kernel": kernel, "bias": bias}
    del params[bn]
  return model.clone(use_bn=False), {"params": params}
