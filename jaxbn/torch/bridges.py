"""The flax bridges: one torch batch norm as linen variables or in an nnx module, and back.

:func:`from_torch_linen` and :func:`to_torch_linen` for a
:class:`jaxbn.linen.BatchNorm`'s variables, :func:`from_torch_nnx` and
:func:`to_torch_nnx` for a :class:`jaxbn.nnx.BatchNorm`; the values are those
of :func:`jaxbn.torch.from_torch` and :func:`jaxbn.torch.to_torch`, laid out
as the target module stores them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxbn.core import BNOptions
from jaxbn.layer import BNLayer
from jaxbn.linen import read_variables
from jaxbn.linen import write_variables
from jaxbn.nnx import read_module
from jaxbn.nnx import write_module
from jaxbn.torch.layer import _check_bn_module
from jaxbn.torch.layer import _momentum
from jaxbn.torch.layer import _tensors
from jaxbn.torch.layer import _torch
from jaxbn.torch.layer import from_torch
from jaxbn.torch.layer import to_torch

Array = jax.Array

__all__ = (
  "from_torch_linen",
  "from_torch_nnx",
  "to_torch_linen",
  "to_torch_nnx",
)


def _target_layout(fn: str, source: Any, bn: Any, prefix: str, batch_values: Any):
  """Params and state of the torch layer, and the :class:`BNLayer` of the target module.

  The state holds every entry the target stores (an accumulator, empty, for
  one that accumulates micro-batches).
  """
  params, state = from_torch(source, prefix=prefix, batch_values=batch_values)
  if bn is None:
    affine = _tensors(fn, source, prefix).weight is not None
    options = BNOptions(momentum=_momentum(_bn_module(source, prefix)), running_var="unbiased")
    layer = BNLayer(state.mean.shape, options, params.scale.dtype, affine, affine)
  else:
    layer = BNLayer.of(bn, state.mean.shape)
  for name, fixed in (("scale", 1), ("bias", 0)):
    if name not in layer.param_names and not np.all(np.asarray(getattr(params, name)) == fixed):
      raise ValueError(
        f"{fn}: the target module has use_{name}=False, but torch's {name} is not "
        f"{fixed} everywhere; construct it with use_{name}=True (torch's affine=True)."
      )
  params, state = layer.from_entries(params._asdict(), state._asdict(), fn=fn)
  return params, state, layer


def _bn_module(source: Any, prefix: str) -> Any:
  torch = _torch()
  if isinstance(source, torch.nn.Module):
    return source.get_submodule(prefix.rstrip(".")) if prefix else source
  return None


def from_torch_linen(
  source: Any, bn: Any = None, *, prefix: str = "", batch_values: float | None = None
) -> dict[str, dict[str, Array]]:
  """Variables of a :class:`jaxbn.linen.BatchNorm` from a torch batch norm.

  ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}`` with the
  values of :func:`from_torch`, plus exactly the entries the target module
  stores: ``batch_stats`` ``count`` with ``momentum=None`` or
  ``ema_warmup=True``, ``step`` with a renorm schedule; no ``scale``
  (``bias``) with ``use_scale=False`` (``use_bias=False``). Put the result
  where the layer sits in the model's variables. The arrays keep torch's
  dtypes: a float64 port runs in a module with ``param_dtype=jnp.float64``
  (under ``jax_enable_x64``), whose statistics are float64 too.

  Args:
    source: a torch batch norm, a model (with ``prefix``) or a state dict.
    bn: the :class:`jaxbn.linen.BatchNorm` these variables are for (only its
      configuration is read). Default: the module
      ``BatchNorm(**torch_settings(source).module_kwargs())`` (for a state
      dict: affine as the dict has it, torch's default momentum).
    prefix: see :func:`from_torch`.
    batch_values: see :func:`from_torch`.

  Returns:
    The variables dict.

  Raises:
    ValueError: ``bn`` leaves out ``scale`` or ``bias`` that are not 1 or 0.

  Examples:
    >>> import jax, jax.numpy as jnp, torch
    >>> import jaxbn
    >>> from jaxbn import linen as jbn
    >>> tbn = torch.nn.BatchNorm1d(3, momentum=0.1)
    >>> variables = jaxbn.from_torch_linen(tbn)
    >>> jax.tree.map(jnp.shape, variables)
    {'batch_stats': {'mean': (3,), 'var': (3,)}, 'params': {'bias': (3,), 'scale': (3,)}}
    >>> bn = jbn.BatchNorm(momentum=0.9, ema_warmup=True)
    >>> sorted(jaxbn.from_torch_linen(tbn, bn)["batch_stats"])
    ['count', 'mean', 'var']
  """
  params, state, layer = _target_layout("from_torch_linen", source, bn, prefix, batch_values)
  return write_variables(params, state, layer)


def to_torch_linen(variables: Mapping[str, Any], module: Any) -> Any:
  """Writes a :class:`jaxbn.linen.BatchNorm`'s variables into a torch batch norm.

  The inverse of :func:`from_torch_linen`. A missing ``scale`` (``bias``)
  counts as 1 (0); ``num_batches_tracked`` is written from ``step`` when the
  variables have one, else left as it is.

  Args:
    variables: ``{"params": ..., "batch_stats": ...}`` of one layer.
    module: the torch batch norm to write.

  Returns:
    ``module``.
  """
  _check_bn_module("to_torch_linen", module)
  params, state = read_variables(variables)
  if "step" not in variables.get("batch_stats", variables):
    state = state._replace(step=None)  # num_batches_tracked stays as it is
  return to_torch(params, state, module)


def from_torch_nnx(
  source: Any, bn: Any, *, prefix: str = "", batch_values: float | None = None
) -> Any:
  """Fills an existing :class:`jaxbn.nnx.BatchNorm` with a torch batch norm's values.

  ``scale``, ``bias`` (when the module has them), ``mean``, ``var``, and
  ``count`` and ``step`` when the module stores them, with the values of
  :func:`from_torch`; the arrays keep torch's dtypes (for a float64 port,
  make ``bn`` with ``param_dtype=jnp.float64``, under ``jax_enable_x64``).

  Args:
    source: a torch batch norm, a model (with ``prefix``) or a state dict.
    bn: the :class:`jaxbn.nnx.BatchNorm` to fill, in place.
    prefix: see :func:`from_torch`.
    batch_values: see :func:`from_torch`.

  Returns:
    ``bn``.

  Raises:
    ValueError: the feature counts differ, or ``bn`` has no ``scale``
      (``bias``) while torch's is not 1 (0).

  Examples:
    >>> import torch
    >>> from flax import nnx
    >>> import jaxbn
    >>> from jaxbn import nnx as jbn
    >>> tbn = torch.nn.BatchNorm1d(2)
    >>> _ = tbn(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    >>> bn = jaxbn.from_torch_nnx(tbn, jbn.BatchNorm(2, rngs=nnx.Rngs(0), momentum=0.9))
    >>> bn.mean[...]
    Array([0.2, 0.4], dtype=float32)
  """
  fn = "from_torch_nnx"
  params, state, layer = _target_layout(fn, source, bn, prefix, batch_values)
  if tuple(bn.feature_shape) != tuple(state.mean.shape):
    raise ValueError(
      f"{fn}: the nnx BatchNorm has feature shape {tuple(bn.feature_shape)}, torch's "
      f"{tuple(state.mean.shape)}."
    )
  return write_module(bn, params, state, layer)


def to_torch_nnx(bn: Any, module: Any) -> Any:
  """Writes a :class:`jaxbn.nnx.BatchNorm`'s values into a torch batch norm.

  The inverse of :func:`from_torch_nnx`; ``num_batches_tracked`` is written
  from ``step`` when the module stores one, else left as it is.

  Args:
    bn: the :class:`jaxbn.nnx.BatchNorm`.
    module: the torch batch norm to write.

  Returns:
    ``module``.
  """
  _check_bn_module("to_torch_nnx", module)
  params, state = read_module(bn)
  if getattr(bn, "step", None) is None:
    state = state._replace(step=None)  # num_batches_tracked stays as it is
  return to_torch(params, state, module)
