"""Whole models: every Conv, Linear and batch norm of a torch model as flax variables."""

from __future__ import annotations

from typing import Any

from jaxbn.torch.bridges import from_torch_linen
from jaxbn.torch.layer import _to_jax
from jaxbn.torch.layer import _torch
from jaxbn.torch.layouts import torch_conv_kernel
from jaxbn.torch.layouts import torch_linear_kernel

__all__ = ("from_torch_model",)


def from_torch_model(
  model: Any, bn: Any = None, *, batch_values: float | None = None
) -> dict[str, dict[str, Any]]:
  """Every Conv, Linear and batch norm of a torch model as flax variables.

  ``{"params": {name: ...}, "batch_stats": {name: ...}}`` keyed by torch's
  module names (``"layer1.0.conv1"``; rename them to the flax model's):

  - ``Conv1d/2d/3d``: ``{"kernel"}`` via :func:`torch_conv_kernel`, and
    ``"bias"`` when it has one (``flax.linen.Conv`` layout).
  - ``Linear``: ``{"kernel"}`` via :func:`torch_linear_kernel` (without
    ``input_chw``: fix a Linear after a flatten of channel-first maps with
    ``torch_linear_kernel(weight, input_chw)``), and ``"bias"``.
  - batch norms: :func:`from_torch_linen` (with ``bn`` and ``batch_values``).

  Args:
    model: a ``torch.nn.Module``.
    bn: passed to :func:`from_torch_linen` for every batch norm.
    batch_values: passed to :func:`from_torch_linen`.

  Returns:
    The variables dict.

  Raises:
    ValueError: a module of another type holds parameters or buffers of its
      own (convert it by hand).

  Examples:
    >>> import jax, jax.numpy as jnp, torch
    >>> import jaxbn.torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    >>> v = jaxbn.torch.from_torch_model(net)
    >>> jax.tree.map(jnp.shape, v["params"])
    {'0': {'bias': (4,), 'kernel': (3, 3, 3, 4)}, '1': {'bias': (4,), 'scale': (4,)}}
  """
  torch = _torch()
  nn = torch.nn
  out: dict[str, dict[str, Any]] = {"params": {}, "batch_stats": {}}
  for name, m in model.named_modules():
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
      v = from_torch_linen(m, bn, batch_values=batch_values)
      if v["params"]:
        out["params"][name] = v["params"]
      out["batch_stats"][name] = v["batch_stats"]
    elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
      conv = not isinstance(m, nn.Linear)
      p = {"kernel": torch_conv_kernel(m.weight) if conv else torch_linear_kernel(m.weight)}
      if m.bias is not None:
        p["bias"] = _to_jax(m.bias)
      out["params"][name] = p
    else:
      own = [n for n, _ in m.named_parameters(recurse=False)]
      own += [n for n, b in m.named_buffers(recurse=False) if b is not None]
      if own:
        raise ValueError(
          f"from_torch_model: {name or 'the model'} ({type(m).__name__}) holds {own}; "
          f"only Conv1d/2d/3d, Linear and batch norms are converted. Convert it by hand."
        )
  return out
