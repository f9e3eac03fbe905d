"""Folding batch norm into the preceding linear layer, for deployment.

At inference a batch-norm layer is one affine map per feature (Algorithm 2),
so it merges into the Dense or convolution before it::

    s       = scale / sqrt(var + epsilon)
    kernel' = kernel * s           # per output feature (the kernel's last axis)
    bias'   = (bias - mean) * s + beta

and ``bn_infer(layer(x))`` becomes ``layer'(x)``: one pass over the
activations fewer (the transform PyTorch's ``torch.nn.utils.fusion`` applies).
Parallel branches of convolution and batch norm whose outputs are summed
(RepVGG, MobileOne), an identity branch that is a batch norm alone included,
fold into one convolution with a bias (:func:`fold_branches`).

References:
  Ioffe & Szegedy, ICML 2015, arXiv:1502.03167, Sec. 3.1 and Algorithm 2.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxbn.core import DEFAULTS
from jaxbn.core import BNAccState
from jaxbn.core import BNParams
from jaxbn.core import BNState
from jaxbn.layer import features_last

__all__ = ("FoldTrace", "fold_bn", "fold_branches", "qualified_name")

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


# One branch of fold_branches: (kernel, bias, params, state); kernel None: the identity.
_Branch = tuple[Array | None, Array | None, BNParams, BNState | BNAccState]


def fold_branches(
  branches: Sequence[_Branch], *, groups: int = 1, epsilon: float = DEFAULTS.epsilon
) -> tuple[Array, Array]:
  r"""Folds summed parallel branches of convolution + batch norm into one convolution.

  A RepVGG or MobileOne block in inference computes
  ``sum_i bn_infer(params_i, state_i, conv_i(x))``, where each branch is a
  convolution (any kernel size, padded to keep the size: ``k // 2``, the same
  strides and groups for all) followed by batch norm, or a batch norm alone
  on ``x`` (the identity branch). Each branch folds by :func:`fold_bn`; the
  identity branch is the convolution whose kernel is 1 at its center from
  input channel ``c`` to output channel ``c`` (grouped: ``c mod C/groups``);
  kernels smaller than the largest are zero-padded around their center. The
  sum of the folded kernels and biases is one convolution::

      kernel = sum_i pad(kernel_i * s_i),   s_i = scale_i / sqrt(var_i + epsilon)
      bias   = sum_i (bias_i - mean_i) * s_i + beta_i

  and ``conv(x, kernel) + bias`` (padding ``K // 2``) is the block's output,
  to float32 rounding.

  Args:
    branches: ``(kernel, bias, params, state)`` per branch: an ``HWIO``
      kernel (``(*spatial, in/groups, out)``) and its bias or ``None``, then
      the batch norm's :class:`jaxbn.BNParams` and state; ``kernel=None`` (and
      ``bias=None``) for the identity branch, whose batch norm has the block's
      ``out`` features (it needs ``in == out`` and stride 1).
    groups: the convolutions' ``feature_group_count``.
    epsilon: the batch norms' epsilon.

  Returns:
    ``(kernel, bias)``: the largest branch's kernel shape, in the first
    kernel's dtype, and a bias of shape ``(out,)``.

  Raises:
    ValueError: no convolution branch; kernels that disagree on rank, on
      ``in/groups`` and ``out``, or whose sizes differ by an odd number (no
      common center); the identity branch's batch norm not of ``out`` features.

  Examples:
    A 3x3 branch, a 1x1 branch and an identity branch on 2 channels:

    >>> import jax, jax.numpy as jnp
    >>> import jaxbn
    >>> ks = jax.random.split(jax.random.key(0), 3)
    >>> k3, k1 = jax.random.normal(ks[0], (3, 3, 2, 2)), jax.random.normal(ks[1], (1, 1, 2, 2))
    >>> bn = [jaxbn.bn_init(2) for _ in range(3)]
    >>> bn = [(p, s._replace(var=s.var * (i + 2))) for i, (p, s) in enumerate(bn)]
    >>> branches = [(k3, None, *bn[0]), (k1, None, *bn[1]), (None, None, *bn[2])]
    >>> kernel, bias = jaxbn.fold_branches(branches)
    >>> kernel.shape, bias.shape
    ((3, 3, 2, 2), (2,))
    >>> x = jax.random.normal(ks[2], (1, 5, 5, 2))
    >>> conv = lambda x, k: jax.lax.conv_general_dilated(
    ...   x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    >>> block = sum(jaxbn.bn_infer(p, s, y) for (p, s), y in zip(bn, [conv(x, k3), conv(x, k1), x]))
    >>> bool(jnp.allclose(conv(x, kernel) + bias[None, None, None], block, rtol=1e-5, atol=1e-5))
    True

  References:
    Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021,
    arXiv:2101.03697, Sec. 3.3; Vasu et al., "MobileOne", CVPR 2023,
    arXiv:2206.04040; Ioffe & Szegedy 2015, arXiv:1502.03167, Algorithm 2.
  """
  fn = "fold_branches"
  convs = [jnp.asarray(k) for k, *_ in branches if k is not None]
  if not convs:
    raise ValueError(f"{fn}: needs at least one convolution branch (a kernel), got none.")
  ranks = {k.ndim for k in convs}
  if len(ranks) != 1 or convs[0].ndim < 3:
    raise ValueError(
      f"{fn}: kernels must share one rank of at least 3 (*spatial, in/groups, out); got "
      f"shapes {[k.shape for k in convs]}."
    )
  io = {k.shape[-2:] for k in convs}
  if len(io) != 1:
    raise ValueError(f"{fn}: kernels disagree on (in/groups, out): {[k.shape for k in convs]}.")
  (cin, out), nsp = io.pop(), convs[0].ndim - 2
  size = tuple(max(k.shape[d] for k in convs) for d in range(nsp))
  dtype = convs[0].dtype
  total_k = jnp.zeros((*size, cin, out), jnp.float64 if dtype == jnp.float64 else jnp.float32)
  total_b = jnp.zeros((out,), total_k.dtype)
  for i, (kernel, bias, params, state) in enumerate(branches):
    if kernel is None:
      if params.scale.shape != (out,) or out % groups or out // groups != cin:
        raise ValueError(
          f"{fn}: branch {i} is the identity (a batch norm alone), so it needs {out} features "
          f"and in = out ({cin} * groups {groups} = {cin * groups} input channels given); its "
          f"batch norm has shape {params.scale.shape}."
        )
      center = tuple(s // 2 for s in size)
      channel = jnp.arange(out)
      kernel = (
        jnp.zeros((*size, cin, out), total_k.dtype).at[(*center, channel % cin, channel)].set(1)
      )
    kernel = jnp.asarray(kernel)
    pad = [size[d] - kernel.shape[d] for d in range(nsp)]
    if any(p % 2 for p in pad):
      raise ValueError(
        f"{fn}: branch {i}'s kernel {kernel.shape[:nsp]} and the largest {size} differ by an "
        f"odd number: they have no common center."
      )
    k, b = fold_bn(kernel.astype(total_k.dtype), bias, params, state, epsilon=epsilon)
    total_k = total_k + jnp.pad(k, [(p // 2, p // 2) for p in pad] + [(0, 0), (0, 0)])
    total_b = total_b + b
  return total_k.astype(dtype), total_b.astype(dtype)


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
      if not features_last(axis, ndim):
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
