"""The models as plain JAX functions of ``(params, state, x)`` and their folding.

Plain JAX: params and state are pytrees, every layer a function; no flax.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from typing import Literal
from typing import overload

import jax
import jax.numpy as jnp

from jaxbn.core import DEFAULTS
from jaxbn.core import BNOptions
from jaxbn.core import BNParams
from jaxbn.core import BNState
from jaxbn.core import bn_init
from jaxbn.folding import fold_bn
from jaxbn.layer import BNLayer
from jaxbn.models.common import Activation
from jaxbn.models.common import activation_fn
from jaxbn.models.common import flatten


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
    layer: dict[str, Any] = {"kernel": _dense_init(k, n_in, n_out, dtype)}
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


def _bn_apply(
  bn_params: BNParams, state: BNState, x: jax.Array, train: bool, bn: BNOptions
) -> tuple[jax.Array, BNState]:
  y, new = BNLayer(options=bn).normalize(bn_params, state, x, use_running_average=not train)
  return y, state if new is None else new


# (logits, new_state) or, with return_preactivations=True, (logits, new_state, preactivations).
_Applied = (
  tuple[jax.Array, tuple[BNState, ...]]
  | tuple[jax.Array, tuple[BNState, ...], tuple[jax.Array, ...]]
)


@overload
def apply_mlp(
  params: dict,
  state: tuple[BNState, ...],
  x: jax.Array,
  *,
  train: bool,
  activation: Activation = ...,
  bn_options: BNOptions = ...,
  return_preactivations: Literal[False] = False,
  **bn_kwargs: Any,
) -> tuple[jax.Array, tuple[BNState, ...]]: ...
@overload
def apply_mlp(
  params: dict,
  state: tuple[BNState, ...],
  x: jax.Array,
  *,
  train: bool,
  activation: Activation = ...,
  bn_options: BNOptions = ...,
  return_preactivations: Literal[True],
  **bn_kwargs: Any,
) -> tuple[jax.Array, tuple[BNState, ...], tuple[jax.Array, ...]]: ...
@overload
def apply_mlp(
  params: dict,
  state: tuple[BNState, ...],
  x: jax.Array,
  *,
  train: bool,
  activation: Activation = ...,
  bn_options: BNOptions = ...,
  return_preactivations: bool,
  **bn_kwargs: Any,
) -> _Applied: ...
def apply_mlp(
  params: dict,
  state: tuple[BNState, ...],
  x: jax.Array,
  *,
  train: bool,
  activation: Activation = "sigmoid",
  bn_options: BNOptions = DEFAULTS,
  return_preactivations: bool = False,
  **bn_kwargs: Any,
) -> _Applied:
  """Logits of a plain-JAX MLP made by :func:`init_mlp`.

  Args:
    params: from :func:`init_mlp`.
    state: from :func:`init_mlp` or a previous call.
    x: input ``(N, ...)``, flattened to ``(N, in_features)``.
    train: batch statistics (and a new state) if True; running ones if False.
    activation: ``'sigmoid'``, ``'relu'``, ``'tanh'`` or a callable.
    bn_options: the options of every batch norm (:class:`jaxbn.BNOptions`).
    return_preactivations: also return the tuple of every hidden layer's
      input to its activation.
    **bn_kwargs: :class:`jaxbn.BNOptions` fields that override
      ``bn_options`` (e.g. ``momentum``); so
      ``functools.partial(apply_mlp, train=True)`` is a forward for
      :func:`jaxbn.population_stats`.

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
  act = activation_fn(activation)
  bn = bn_options._replace(**bn_kwargs)
  x = flatten(x)
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
  """2x2 max pooling, stride 2, SAME padding (``flax.linen.max_pool``'s)."""
  # A Python scalar initial value: JAX recognizes the max-reduction (and its gradient).
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "SAME")


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
    block: dict[str, Any] = {"kernel": kernel}
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


@overload
def apply_cnn(
  params: dict,
  state: tuple[BNState, ...],
  x: jax.Array,
  *,
  train: bool,
  bn_options: BNOptions = ...,
  return_preactivations: Literal[False] = False,
  **bn_kwargs: Any,
) -> tuple[jax.Array, tuple[BNState, ...]]: ...
@overload
def apply_cnn(
  params: dict,
  state: tuple[BNState, ...],
  x: jax.Array,
  *,
  train: bool,
  bn_options: BNOptions = ...,
  return_preactivations: Literal[True],
  **bn_kwargs: Any,
) -> tuple[jax.Array, tuple[BNState, ...], tuple[jax.Array, ...]]: ...
@overload
def apply_cnn(
  params: dict,
  state: tuple[BNState, ...],
  x: jax.Array,
  *,
  train: bool,
  bn_options: BNOptions = ...,
  return_preactivations: bool,
  **bn_kwargs: Any,
) -> _Applied: ...
def apply_cnn(
  params: dict,
  state: tuple[BNState, ...],
  x: jax.Array,
  *,
  train: bool,
  bn_options: BNOptions = DEFAULTS,
  return_preactivations: bool = False,
  **bn_kwargs: Any,
) -> _Applied:
  """Logits of a plain-JAX CNN made by :func:`init_cnn` on NHWC images ``x``.

  Args and returns as :func:`apply_mlp` (the activation is relu), ``**bn_kwargs`` included.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbn.models import apply_cnn, init_cnn
    >>> params, state = init_cnn(jax.random.key(0), 1, (4,))
    >>> logits, _ = apply_cnn(params, state, jnp.ones((2, 8, 8, 1)), train=False)
    >>> logits.shape
    (2, 10)
  """
  bn = bn_options._replace(**bn_kwargs)
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
  logits = flatten(x) @ head["kernel"].astype(x.dtype) + head["bias"].astype(x.dtype)[None]
  if return_preactivations:
    return logits, tuple(new_state), tuple(pre)
  return logits, tuple(new_state)


def fold_params(params: dict, state: Any, *, epsilon: float = DEFAULTS.epsilon) -> dict:
  """Folds the batch norms of a plain-JAX model of :mod:`jaxbn.models`.

  ``params`` from :func:`jaxbn.models.init_mlp` (``'hidden'`` layers) or
  :func:`jaxbn.models.init_cnn` (``'conv'`` blocks), with ``state`` the tuple
  of their :class:`jaxbn.BNState`. Each layer ``{'kernel', 'bn'}`` becomes
  ``{'kernel', 'bias'}``, which ``apply_mlp`` / ``apply_cnn`` run without
  batch norm: ``apply_mlp(folded, (), x, train=False)`` equals
  ``apply_mlp(params, state, x, train=False)``.

  Args:
    params: the model's parameters.
    state: the tuple of batch-norm states, one per hidden layer.
    epsilon: the batch norms' epsilon.

  Returns:
    The folded parameters.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxbn
    >>> from jaxbn.models import apply_mlp, init_mlp
    >>> params, state = init_mlp(jax.random.key(0), 5, (8,), 3)
    >>> folded = jaxbn.fold_params(params, state)
    >>> x = jax.random.normal(jax.random.key(1), (4, 5))
    >>> want, _ = apply_mlp(params, state, x, train=False)
    >>> got, _ = apply_mlp(folded, (), x, train=False)
    >>> bool(jnp.allclose(got, want, atol=1e-5))
    True
  """
  fn = "fold_params"
  key = "hidden" if "hidden" in params else "conv" if "conv" in params else None
  if key is None:
    raise ValueError(
      f"{fn}: params must have 'hidden' (init_mlp) or 'conv' (init_cnn) layers, got keys "
      f"{sorted(params)}."
    )
  with_bn = [layer for layer in params[key] if "bn" in layer]
  if len(with_bn) != len(state):
    raise ValueError(
      f"{fn}: {len(with_bn)} layers have batch norm but state has {len(state)} entries."
    )
  states = iter(state)
  layers = []
  for layer in params[key]:
    if "bn" in layer:
      kernel, bias = fold_bn(
        layer["kernel"], layer.get("bias"), layer["bn"], next(states), epsilon=epsilon
      )
      layer = {"kernel": kernel, "bias": bias}
    layers.append(layer)
  return {**params, key: layers}
