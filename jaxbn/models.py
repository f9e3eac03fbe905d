"""MLP and CNN classifiers with batch norm: in flax.linen, flax.nnx, and plain JAX.

Every model places batch norm as the paper does, between the affine map and
the nonlinearity, ``z = g(BN(W u))``, and drops the affine bias when batch
norm follows it (``beta`` takes its role). ``use_bn=False`` gives the same
network without batch norm, its affine layers with their bias. The head
returns logits; the softmax lives in the loss
(``optax.softmax_cross_entropy_with_integer_labels``).

Three versions with the same hyper-parameters:

- linen: :class:`MLP`, :class:`CNN`, called as
  ``model.apply(variables, x, train=...)``;
- nnx: :class:`NNXMLP`, :class:`NNXCNN`, switched with ``.train()`` /
  ``.eval()`` or ``model(x, train=...)``;
- plain functions of ``(params, state, x)`` calling :func:`jaxbn.bn_train` /
  :func:`jaxbn.bn_infer` directly: :func:`init_mlp` / :func:`apply_mlp` and
  :func:`init_cnn` / :func:`apply_cnn`.

The batch-norm options ``momentum``, ``epsilon``, ``ghost_batch_size``,
``renorm``, ``ema_warmup`` and ``axis_name`` go to every batch-norm layer.

The input of the hidden units (after batch norm, before the activation) of
every hidden layer is sown into the ``'intermediates'`` collection under the
name ``'preactivation'``, one entry per hidden layer in order (linen: pass
``mutable=['intermediates']``; nnx: ``nnx.capture(nnx.Intermediate)``); the
functional ``apply_*`` return them when ``return_preactivations=True``. The
last hidden layer's is ``[...]['preactivation'][-1]`` (Fig. 1(b, c) of the
paper plots its percentiles over training).

References:
  Ioffe & Szegedy, "Batch Normalization", ICML 2015, arXiv:1502.03167,
  Sec. 3.2 (placement, convolutions) and Sec. 4.1 (the MNIST network:
  three hidden layers of 100 sigmoid units).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxbn import linen as jbn_linen
from jaxbn import nnx as jbn_nnx
from jaxbn.core import BNParams
from jaxbn.core import BNState
from jaxbn.core import Renorm
from jaxbn.core import bn_infer
from jaxbn.core import bn_init
from jaxbn.core import bn_train

__all__ = (
  "CNN",
  "MLP",
  "NNXCNN",
  "NNXMLP",
  "apply_cnn",
  "apply_mlp",
  "init_cnn",
  "init_mlp",
)

Activation = str | Callable[[jax.Array], jax.Array]

_ACTIVATIONS = {"sigmoid": jax.nn.sigmoid, "relu": jax.nn.relu, "tanh": jnp.tanh}

PREACTIVATION = "preactivation"


def _activation(act: Activation) -> Callable[[jax.Array], jax.Array]:
  if callable(act):
    return act
  if act not in _ACTIVATIONS:
    raise ValueError(
      f"activation must be one of {sorted(_ACTIVATIONS)} or a callable, got {act!r}."
    )
  return _ACTIVATIONS[act]


def _bn_kwargs(momentum, epsilon, ghost_batch_size, renorm, ema_warmup, axis_name) -> dict:
  return dict(
    momentum=momentum,
    epsilon=epsilon,
    ghost_batch_size=ghost_batch_size,
    renorm=renorm,
    ema_warmup=ema_warmup,
    axis_name=axis_name,
  )


def _nnx_sow(module: nnx.Module, x: jax.Array) -> None:
  # Only inside nnx.capture: outside it, nnx would store the value on the module
  # (deprecated) and grow its state at every call.
  if hasattr(module, "__captures__"):
    module.sow(nnx.Intermediate, PREACTIVATION, x)


def _flatten(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1)


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
    momentum: batch norm's weight of the old running value (or ``None``).
    epsilon: batch norm's epsilon.
    ghost_batch_size: batch norm's virtual batch size.
    renorm: batch norm's :class:`jaxbn.Renorm`.
    ema_warmup: batch norm's count-aware running average.
    axis_name: named axis the batch is split over (data parallelism).
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
  momentum: float | None = 0.99
  epsilon: float = 1e-5
  ghost_batch_size: int | None = None
  renorm: Renorm | None = None
  ema_warmup: bool = False
  axis_name: Any = None
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Logits of ``x``; batch statistics in training, running ones otherwise."""
    act = _activation(self.activation)
    bn = _bn_kwargs(
      self.momentum,
      self.epsilon,
      self.ghost_batch_size,
      self.renorm,
      self.ema_warmup,
      self.axis_name,
    )
    x = _flatten(x)
    for width in self.features:
      x = nn.Dense(width, use_bias=not self.use_bn, kernel_init=self.kernel_init)(x)
      if self.use_bn:
        x = jbn_linen.BatchNorm(use_running_average=not train, **bn)(x)
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
    momentum: batch norm's weight of the old running value (or ``None``).
    epsilon: batch norm's epsilon.
    ghost_batch_size: batch norm's virtual batch size.
    renorm: batch norm's :class:`jaxbn.Renorm`.
    ema_warmup: batch norm's count-aware running average.
    axis_name: named axis the batch is split over (data parallelism).
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
  momentum: float | None = 0.99
  epsilon: float = 1e-5
  ghost_batch_size: int | None = None
  renorm: Renorm | None = None
  ema_warmup: bool = False
  axis_name: Any = None
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Logits of NHWC images ``x``."""
    bn = _bn_kwargs(
      self.momentum,
      self.epsilon,
      self.ghost_batch_size,
      self.renorm,
      self.ema_warmup,
      self.axis_name,
    )
    for channels in self.features:
      x = nn.Conv(
        channels, (3, 3), padding="SAME", use_bias=not self.use_bn, kernel_init=self.kernel_init
      )(x)
      if self.use_bn:
        x = jbn_linen.BatchNorm(use_running_average=not train, **bn)(x)
      self.sow("intermediates", PREACTIVATION, x)
      x = nn.max_pool(jax.nn.relu(x), (2, 2), strides=(2, 2), padding="SAME")
    return nn.Dense(self.num_classes, kernel_init=self.kernel_init)(_flatten(x))


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
    momentum, epsilon, ghost_batch_size, renorm, ema_warmup, axis_name: passed
      to every :class:`jaxbn.nnx.BatchNorm`.
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
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    ghost_batch_size: int | None = None,
    renorm: Renorm | None = None,
    ema_warmup: bool = False,
    axis_name: Any = None,
    rngs: nnx.Rngs,
  ):
    self.activation = activation
    self.use_bn = use_bn
    bn = _bn_kwargs(momentum, epsilon, ghost_batch_size, renorm, ema_warmup, axis_name)
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
    momentum, epsilon, ghost_batch_size, renorm, ema_warmup, axis_name: passed
      to every :class:`jaxbn.nnx.BatchNorm`.
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
    momentum: float | None = 0.99,
    epsilon: float = 1e-5,
    ghost_batch_size: int | None = None,
    renorm: Renorm | None = None,
    ema_warmup: bool = False,
    axis_name: Any = None,
    rngs: nnx.Rngs,
  ):
    self.use_bn = use_bn
    bn = _bn_kwargs(momentum, epsilon, ghost_batch_size, renorm, ema_warmup, axis_name)
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


# --------------------------------------------------------------------------
# Plain JAX: params and state are pytrees; no framework.


def _dense_init(key: jax.Array, n_in: int, n_out: int, dtype: Any) -> jax.Array:
  # LeCun normal, as the flax versions.
  return jax.random.normal(key, (n_in, n_out), dtype) * jnp.asarray(n_in**-0.5, dtype)


def init_mlp(
  key: jax.Array,
  in_features: int,
  features: Sequence[int] = (100, 100, 100),
  num_classes: int = 10,
  *,
  use_bn: bool = True,
  dtype: Any = jnp.float32,
) -> tuple[dict, tuple[BNState, ...]]:
  """Parameters and batch-norm state of a plain-JAX :class:`MLP`.

  Args:
    key: PRNG key.
    in_features: size of the (flattened) input.
    features: widths of the hidden layers.
    num_classes: number of logits.
    use_bn: batch norm after each hidden affine map (which then has no bias).
    dtype: dtype of the parameters (the state is float32).

  Returns:
    ``(params, state)``: ``params = {'hidden': [layer, ...], 'head':
    {'kernel', 'bias'}}`` where a hidden layer is ``{'kernel', 'bn':
    BNParams}`` with batch norm and ``{'kernel', 'bias'}`` without;
    ``state`` is a tuple of :class:`jaxbn.BNState`, one per hidden layer
    (empty without batch norm).

  Examples:
    >>> import jax
    >>> from jaxbn.models import init_mlp
    >>> params, state = init_mlp(jax.random.key(0), 64, (32, 32))
    >>> params['hidden'][0]['kernel'].shape, len(state)
    ((64, 32), 2)
  """
  keys = jax.random.split(key, len(features) + 1)
  widths = (in_features, *features)
  hidden, state = [], []
  for k, n_in, n_out in zip(keys, widths, features, strict=False):
    layer = {"kernel": _dense_init(k, n_in, n_out, dtype)}
    if use_bn:
      layer["bn"], s = bn_init(n_out, dtype=dtype)
      state.append(s)
    else:
      layer["bias"] = jnp.zeros((n_out,), dtype)
    hidden.append(layer)
  head = {
    "kernel": _dense_init(keys[-1], widths[-1], num_classes, dtype),
    "bias": jnp.zeros((num_classes,), dtype),
  }
  return {"hidden": hidden, "head": head}, tuple(state)


def _bn_apply(bn_params: BNParams, state: BNState, x: jax.Array, train: bool, bn: dict):
  if train:
    return bn_train(bn_params, state, x, **bn)
  return bn_infer(bn_params, state, x, epsilon=bn["epsilon"]), state


def apply_mlp(
  params: dict,
  state: tuple[BNState, ...],
  x: jax.Array,
  *,
  train: bool,
  activation: Activation = "sigmoid",
  momentum: float | None = 0.99,
  epsilon: float = 1e-5,
  ghost_batch_size: int | None = None,
  renorm: Renorm | None = None,
  ema_warmup: bool = False,
  axis_name: Any = None,
  return_preactivations: bool = False,
):
  """Logits of a plain-JAX MLP made by :func:`init_mlp`.

  Args:
    params: from :func:`init_mlp`.
    state: from :func:`init_mlp` or a previous call.
    x: input ``(N, ...)``, flattened to ``(N, in_features)``.
    train: batch statistics (and a new state) if True; running ones if False.
    activation: ``'sigmoid'``, ``'relu'``, ``'tanh'`` or a callable.
    momentum, epsilon, ghost_batch_size, renorm, ema_warmup, axis_name:
      passed to :func:`jaxbn.bn_train`.
    return_preactivations: also return the tuple of every hidden layer's
      input to its activation.

  Returns:
    ``(logits, new_state)``, or ``(logits, new_state, preactivations)``.
    ``new_state`` is ``state`` when ``train`` is False.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbn.models import apply_mlp, init_mlp
    >>> params, state = init_mlp(jax.random.key(0), 4, (8,), 3)
    >>> logits, state = apply_mlp(params, state, jnp.ones((2, 4)), train=True)
    >>> logits.shape, int(state[0].step)
    ((2, 3), 1)
  """
  act = _activation(activation)
  bn = _bn_kwargs(momentum, epsilon, ghost_batch_size, renorm, ema_warmup, axis_name)
  x = _flatten(x)
  new_state, pre = [], []
  for i, layer in enumerate(params["hidden"]):
    x = x @ layer["kernel"].astype(x.dtype)
    if "bn" in layer:
      x, s = _bn_apply(layer["bn"], state[i], x, train, bn)
      new_state.append(s)
    else:
      x = x + layer["bias"].astype(x.dtype)[None]
    pre.append(x)
    x = act(x)
  head = params["head"]
  logits = x @ head["kernel"].astype(x.dtype) + head["bias"].astype(x.dtype)[None]
  if return_preactivations:
    return logits, tuple(new_state), tuple(pre)
  return logits, tuple(new_state)


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x, kernel.astype(x.dtype), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def _max_pool(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


def init_cnn(
  key: jax.Array,
  in_channels: int,
  features: Sequence[int] = (32, 64),
  num_classes: int = 10,
  *,
  image_size: tuple[int, int] = (8, 8),
  use_bn: bool = True,
  dtype: Any = jnp.float32,
) -> tuple[dict, tuple[BNState, ...]]:
  """Parameters and batch-norm state of a plain-JAX :class:`CNN`.

  Args:
    key: PRNG key.
    in_channels: channels of the NHWC input.
    features: channels of the convolution blocks (3x3 kernels, HWIO).
    num_classes: number of logits.
    image_size: ``(H, W)`` of the input (sizes the dense head).
    use_bn: batch norm after each convolution (which then has no bias).
    dtype: dtype of the parameters.

  Returns:
    ``(params, state)`` laid out as :func:`init_mlp`'s, with ``'conv'``
    blocks instead of ``'hidden'`` layers.

  Examples:
    >>> import jax
    >>> from jaxbn.models import init_cnn
    >>> params, state = init_cnn(jax.random.key(0), 1, (4, 8))
    >>> params['conv'][1]['kernel'].shape, params['head']['kernel'].shape
    ((3, 3, 4, 8), (32, 10))
  """
  keys = jax.random.split(key, len(features) + 1)
  chans = (in_channels, *features)
  blocks, state = [], []
  for k, c_in, c_out in zip(keys, chans, features, strict=False):
    fan_in = 9 * c_in
    kernel = jax.random.normal(k, (3, 3, c_in, c_out), dtype) * jnp.asarray(fan_in**-0.5, dtype)
    block = {"kernel": kernel}
    if use_bn:
      block["bn"], s = bn_init(c_out, dtype=dtype)
      state.append(s)
    else:
      block["bias"] = jnp.zeros((c_out,), dtype)
    blocks.append(block)
  h, w = image_size
  for _ in features:
    h, w = -(-h // 2), -(-w // 2)
  head = {
    "kernel": _dense_init(keys[-1], h * w * chans[-1], num_classes, dtype),
    "bias": jnp.zeros((num_classes,), dtype),
  }
  return {"conv": blocks, "head": head}, tuple(state)


def apply_cnn(
  params: dict,
  state: tuple[BNState, ...],
  x: jax.Array,
  *,
  train: bool,
  momentum: float | None = 0.99,
  epsilon: float = 1e-5,
  ghost_batch_size: int | None = None,
  renorm: Renorm | None = None,
  ema_warmup: bool = False,
  axis_name: Any = None,
  return_preactivations: bool = False,
):
  """Logits of a plain-JAX CNN made by :func:`init_cnn` on NHWC images ``x``.

  Args and returns as :func:`apply_mlp` (the activation is relu).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbn.models import apply_cnn, init_cnn
    >>> params, state = init_cnn(jax.random.key(0), 1, (4,))
    >>> logits, _ = apply_cnn(params, state, jnp.ones((2, 8, 8, 1)), train=False)
    >>> logits.shape
    (2, 10)
  """
  bn = _bn_kwargs(momentum, epsilon, ghost_batch_size, renorm, ema_warmup, axis_name)
  new_state, pre = [], []
  for i, block in enumerate(params["conv"]):
    x = _conv(x, block["kernel"])
    if "bn" in block:
      x, s = _bn_apply(block["bn"], state[i], x, train, bn)
      new_state.append(s)
    else:
      x = x + block["bias"].astype(x.dtype).reshape(1, 1, 1, -1)
    pre.append(x)
    x = _max_pool(jax.nn.relu(x))
  head = params["head"]
  logits = _flatten(x) @ head["kernel"].astype(x.dtype) + head["bias"].astype(x.dtype)[None]
  if return_preactivations:
    return logits, tuple(new_state), tuple(pre)
  return logits, tuple(new_state)
