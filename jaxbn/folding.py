"""Folding batch norm into the preceding linear layer, for deployment.

At inference a batch-norm layer is one affine map per feature (Algorithm 2),
so it merges into the Dense or convolution before it::

    s       = scale / sqrt(var + epsilon)
    kernel' = kernel * s           # per output feature (the kernel's last axis)
    bias'   = (bias - mean) * s + beta

and ``bn_infer(layer(x))`` becomes ``layer'(x)``: one pass over the
activations fewer (the transform PyTorch's ``torch.nn.utils.fusion`` applies).

References:
  Ioffe & Szegedy, ICML 2015, arXiv:1502.03167, Sec. 3.1 and Algorithm 2.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxbn.core import BNParams
from jaxbn.core import BNState

Array = jax.Array


def fold_bn(
  kernel: Array,
  bias: Array | None,
  params: BNParams,
  state: BNState,
  *,
  epsilon: float = 1e-5,
) -> tuple[Array, Array]:
  r"""Folds an inference-mode batch norm into the layer before it.

  For a layer ``z = x * kernel + bias`` whose kernel's last axis is the
  output feature (Dense ``(in, out)``, convolution ``HWIO``), followed by
  ``bn_infer(params, state, z)``::

      s       = params.scale / sqrt(state.var + epsilon)
      kernel' = kernel * s                                 # along the last axis
      bias'   = (bias - state.mean) * s + params.bias

  Computed in float32 (float64 if the kernel is), returned in the kernel's
  dtype, so that the folded layer agrees with layer-then-``bn_infer`` to
  float32 rounding.

  Args:
    kernel: the preceding layer's weights, output features on the last axis.
    bias: its bias of shape ``(out,)``, or ``None`` for a layer without one
      (as the paper places batch norm after ``W u``, without ``b``).
    params: the batch norm's :class:`jaxbn.BNParams`, shape ``(out,)``.
    state: its :class:`jaxbn.BNState` (the running or population statistics).
    epsilon: the batch norm's epsilon.

  Returns:
    ``(kernel', bias')`` in the kernel's dtype; ``bias'`` has shape ``(out,)``.

  Raises:
    ValueError: the shapes of ``kernel``, ``bias``, ``params`` and ``state``
      do not agree on the number of output features.
    TypeError: ``kernel`` is not floating.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxbn
    >>> params, state = jaxbn.bn_init(2)
    >>> state = state._replace(mean=jnp.array([1.0, 0.0]), var=jnp.array([4.0, 1.0]))
    >>> kernel = jnp.array([[2.0, 3.0]])
    >>> k, b = jaxbn.fold_bn(kernel, None, params, state, epsilon=0.0)
    >>> k, b
    (Array([[1., 3.]], dtype=float32), Array([-0.5,  0. ], dtype=float32))
    >>> x = jnp.array([[5.0]])
    >>> x @ k + b[None], jaxbn.bn_infer(params, state, x @ kernel, epsilon=0.0)
    (Array([[ 4.5, 15. ]], dtype=float32), Array([[ 4.5, 15. ]], dtype=float32))

  References:
    Ioffe & Szegedy 2015, arXiv:1502.03167, Algorithm 2 (inference as one
    affine map).
  """
  fn = "fold_bn"
  kernel = jnp.asarray(kernel)
  if not jnp.issubdtype(kernel.dtype, jnp.floating):
    raise TypeError(f"{fn}: kernel must be floating, got dtype {kernel.dtype}.")
  if kernel.ndim < 1:
    raise ValueError(f"{fn}: kernel must have an output-feature axis, got shape {kernel.shape}.")
  out = kernel.shape[-1]
  shapes = {
    "params.scale": params.scale.shape,
    "params.bias": params.bias.shape,
    "state.mean": state.mean.shape,
    "state.var": state.var.shape,
  }
  if bias is not None:
    bias = jnp.asarray(bias)
    shapes["bias"] = bias.shape
  wrong = {k: v for k, v in shapes.items() if v != (out,)}
  if wrong:
    raise ValueError(
      f"{fn}: kernel of shape {kernel.shape} has {out} output features on its last "
      f"axis, so every vector must have shape ({out},); got "
      + ", ".join(f"{k} {v}" for k, v in wrong.items())
      + ". Dense kernels are (in, out) and convolution kernels HWIO."
    )
  dtype = jnp.float64 if kernel.dtype == jnp.float64 else jnp.float32
  s = params.scale.astype(dtype) * jax.lax.rsqrt(state.var.astype(dtype) + epsilon)
  b = jnp.zeros((out,), dtype) if bias is None else bias.astype(dtype)
  new_bias = (b - state.mean.astype(dtype)) * s + params.bias.astype(dtype)
  s_b = s.reshape((1,) * (kernel.ndim - 1) + (out,))
  new_kernel = kernel.astype(dtype) * s_b
  return new_kernel.astype(kernel.dtype), new_bias.astype(kernel.dtype)


# --------------------------------------------------------------------------
# Whole models of jaxbn.models: every batch norm folded into its Dense or Conv.


def _layer_names(fn: str, model: Any) -> tuple[str, int]:
  from jaxbn.models import CNN
  from jaxbn.models import MLP

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
      params[name]["kernel"], params[name].get("bias"), bn_params, state, epsilon=model.epsilon
    )
    params[name] = {"kernel": kernel, "bias": bias}
    del params[bn]
  return model.clone(use_bn=False), {"params": params}


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
  from flax import nnx

  from jaxbn.models import NNXCNN
  from jaxbn.models import NNXMLP

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
    params = BNParams(
      bn.scale[...] if bn.scale is not None else jnp.ones(bn.feature_shape, bn.param_dtype),
      bn.bias[...] if bn.bias is not None else jnp.zeros(bn.feature_shape, bn.param_dtype),
    )
    state = BNState(
      bn.mean[...], bn.var[...], jnp.zeros_like(bn.mean[...]), jnp.zeros((), jnp.int32)
    )
    old_bias = layer.bias[...] if layer.bias is not None else None
    kernel, bias = fold_bn(layer.kernel[...], old_bias, params, state, epsilon=bn.epsilon)
    layer.kernel[...] = kernel
    layer.bias = nnx.Param(bias)
    layer.use_bias = True
  folded.bn = nnx.List([])
  folded.use_bn = False
  folded.eval()
  return folded


def fold_params(params: dict, state: Any, *, epsilon: float = 1e-5) -> dict:
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
