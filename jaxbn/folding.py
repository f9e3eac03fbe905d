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

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxbn.core import DEFAULTS
from jaxbn.core import BNAccState
from jaxbn.core import BNParams
from jaxbn.core import BNState

__all__ = ("FoldTrace", "fold_bn", "qualified_name")

Array = jax.Array


def fold_bn(
  kernel: Array,
  bias: Array | None,
  params: BNParams,
  state: BNState | BNAccState,
  *,
  epsilon: float = DEFAULTS.epsilon,
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
    state: its :class:`jaxbn.BNState` or :class:`jaxbn.BNAccState` (the
      running or population statistics; only ``mean`` and ``var`` are read).
      A flax layer's variables give both through
      :func:`jaxbn.linen.read_variables` or :func:`jaxbn.nnx.read_module`.
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
    >>> k, b = jaxbn.fold_bn(kernel, None, params, state)
    >>> k.round(4), b.round(4)
    (Array([[1., 3.]], dtype=float32), Array([-0.5,  0. ], dtype=float32))
    >>> x = jnp.array([[5.0]])
    >>> [round(v, 3) for v in (x @ k + b[None])[0].tolist()]
    [4.5, 15.0]
    >>> bool(jnp.allclose(x @ k + b[None], jaxbn.bn_infer(params, state, x @ kernel)))
    True

    A ``flax.linen.BatchNorm``'s ``batch_stats`` (no ``count``, no ``step``):

    >>> from jaxbn.linen import read_variables
    >>> p, s = read_variables({'mean': jnp.array([1.0, 0.0]), 'var': jnp.array([4.0, 1.0])})
    >>> bool(jnp.array_equal(jaxbn.fold_bn(kernel, None, p, s)[1], b))
    True

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
# Which linear layer each batch norm of a model follows (the faces' folds share it).


def qualified_name(obj: Any) -> str:
  """``module.QualifiedName`` of ``obj``'s class, as errors name a layer or model."""
  cls = type(obj)
  return f"{cls.__module__}.{cls.__qualname__}"


class FoldTrace:
  """Which linear layer each batch norm follows, recorded during one call of a model.

  The linen and nnx folds call :meth:`batch_norm` when a batch norm is called
  and :meth:`called` when any layer's call returns; a batch norm folds when
  its input is the very output of a linear layer's call (``id`` of the
  array), else the trace keeps a problem that names the layer.

  Args:
    linear: how errors name the foldable layers, e.g. ``"Dense or Conv"``.
    show: formats a layer path for errors.
  """

  def __init__(self, linear: str, show: Callable[[Any], str] = str):
    self.linear, self.show = linear, show
    self.outputs: dict[int, tuple[Any, Any, Any]] = {}  # id(output) -> (output, path, layer)
    self.last: tuple[Any, Any] | None = None  # (path, layer) of the last call that returned
    self.pairs: dict[Any, tuple[Any, Any]] = {}  # batch-norm path -> (linear path, batch norm)
    self.problems: list[str] = []

  def batch_norm(self, path: Any, bn: Any, x: Any, axis: Any) -> None:
    """Records a call of the batch norm ``bn`` at ``path`` on ``x``, normalizing ``axis``."""
    where = f"layer {self.show(path)!r} ({qualified_name(bn)})"
    src = self.outputs.get(id(x))
    if path in self.pairs:
      self.problems.append(f"{where} is called more than once")
    elif src is None:
      before = (
        f"the last layer called before it is {self.show(self.last[0])!r} "
        f"({qualified_name(self.last[1])})"
        if self.last
        else "no layer is called before it"
      )
      self.problems.append(
        f"{where} does not directly follow a {self.linear}: its input is not such a "
        f"layer's output ({before}; an operation between them, such as an activation, "
        f"cannot be folded)"
      )
    elif src[1] in [linear for linear, _ in self.pairs.values()]:
      self.problems.append(
        f"{where} normalizes {self.show(src[1])!r}, whose output another batch norm has"
      )
    else:
      ndim = jnp.ndim(x)
      axes = axis if isinstance(axis, (tuple, list)) else (axis,)
      if {int(a) % ndim for a in axes} != {ndim - 1}:
        self.problems.append(
          f"{where} normalizes axis {axis!r} of its {ndim}-d input; folding into "
          f"{self.show(src[1])!r} ({qualified_name(src[2])}) needs the features on the last axis"
        )
      else:
        self.pairs[path] = (src[1], bn)

  def called(self, path: Any, layer: Any, out: Any, *, linear: bool) -> None:
    """Records that ``layer`` at ``path`` returned ``out`` (a linear layer's output folds)."""
    self.last = (path, layer)
    if linear:
      self.outputs[id(out)] = (out, path, layer)

  def result(self, fn: str, model: Any) -> dict[Any, tuple[Any, Any]]:
    """``{batch-norm path: (linear path, batch norm)}``; an error if any cannot fold."""
    if self.problems:
      raise ValueError(
        f"{fn}: cannot fold {qualified_name(model)}: " + "; ".join(self.problems) + "."
      )
    if not self.pairs:
      raise ValueError(
        f"{fn}: {qualified_name(model)} calls no batch norm; there is nothing to fold."
      )
    return self.pairs
