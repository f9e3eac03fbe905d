"""Layouts: torch's channel-first activations and weights as JAX's channel-last ones.

Convolution weights ``(O, I, *spatial)`` as flax/XLA kernels ``(*spatial, I, O)``
(:func:`torch_conv_kernel`), Linear weights ``(out, in)`` as Dense kernels
``(in, out)`` (:func:`torch_linear_kernel`), and activations between NCHW and
NHWC (:func:`nchw_to_nhwc`, :func:`nhwc_to_nchw`). Which axis a batch norm
normalizes is stated once, in :mod:`jaxbn.core` (data layout).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn.torch.layer import _to_jax

Array = jax.Array

__all__ = (
  "nchw_to_nhwc",
  "nhwc_to_nchw",
  "torch_conv_kernel",
  "torch_linear_kernel",
)


def torch_conv_kernel(weight: Any) -> Array:
  """A torch convolution weight ``(O, I, *spatial)`` as a flax/XLA kernel ``(*spatial, I, O)``.

  ``OIHW -> HWIO`` for ``Conv2d`` (``OIW -> WIO``, ``OIDHW -> DHWIO``), for
  ``jax.lax.conv_general_dilated(..., ("NHWC", "HWIO", "NHWC"))`` and
  ``flax.linen.Conv``. Grouped convolutions need no change (``I`` is the
  input channels per group in both). Both compute a cross-correlation, so
  the kernel is not flipped. Not for ``ConvTranspose`` (weight ``(I, O, ...)``).

  Args:
    weight: a torch tensor or array of rank >= 3.

  Returns:
    The kernel as a JAX array of the same dtype.

  Examples:
    >>> import torch
    >>> import jaxbn.torch
    >>> jaxbn.torch.torch_conv_kernel(torch.zeros(8, 3, 5, 5)).shape
    (5, 5, 3, 8)
  """
  w = _to_jax(weight)
  if w.ndim < 3:
    raise ValueError(
      f"torch_conv_kernel: expected a convolution weight (O, I, *spatial), got shape {w.shape}."
    )
  return jnp.moveaxis(w, (0, 1), (-1, -2))


def torch_linear_kernel(weight: Any, input_chw: Sequence[int] | None = None) -> Array:
  """A torch Linear weight ``(out, in)`` as a flax Dense kernel ``(in, out)``.

  A Linear after ``torch.flatten`` of a channel-first activation ``(C, H,
  W)`` reads its input in ``(c, h, w)`` order; a JAX model that flattens the
  channel-last ``(H, W, C)`` activation needs the input rows permuted to
  ``(h, w, c)`` order: pass ``input_chw=(C, H, W)`` (any number of spatial
  axes).

  Args:
    weight: a torch tensor or array of shape ``(out, in)``.
    input_chw: the channel-first shape (without the batch) that torch
      flattened into this layer's input, or ``None``.

  Returns:
    The ``(in, out)`` kernel as a JAX array of the same dtype.

  Examples:
    >>> import torch
    >>> import jaxbn.torch
    >>> w = torch.arange(8.0).reshape(1, 8)  # input (C, H, W) = (2, 2, 2)
    >>> jaxbn.torch.torch_linear_kernel(w, input_chw=(2, 2, 2))[:, 0]
    Array([0., 4., 1., 5., 2., 6., 3., 7.], dtype=float32)
  """
  w = _to_jax(weight)
  if w.ndim != 2:
    raise ValueError(f"torch_linear_kernel: expected a weight (out, in), got shape {w.shape}.")
  if input_chw is not None:
    chw = tuple(int(s) for s in input_chw)
    if int(np.prod(chw)) != w.shape[1]:
      raise ValueError(
        f"torch_linear_kernel: input_chw={chw} has {int(np.prod(chw))} values, but the "
        f"weight has {w.shape[1]} inputs."
      )
    w = jnp.moveaxis(w.reshape(w.shape[0], *chw), 1, -1).reshape(w.shape)
  return w.T


def nchw_to_nhwc(x: Any) -> Array:
  """Channel-first activations ``(N, C, *spatial)`` as channel-last ``(N, *spatial, C)``.

  Any rank >= 2 (``NCL``, ``NCHW``, ``NCDHW``); a torch tensor is copied to
  a JAX array first.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxbn.torch
    >>> jaxbn.torch.nchw_to_nhwc(jnp.zeros((2, 3, 4, 5))).shape
    (2, 4, 5, 3)
  """
  x = _to_jax(x) if not isinstance(x, jax.Array) else x
  return jnp.moveaxis(x, 1, -1)


def nhwc_to_nchw(x: Any) -> Array:
  """Channel-last activations ``(N, *spatial, C)`` as channel-first ``(N, C, *spatial)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxbn.torch
    >>> jaxbn.torch.nhwc_to_nchw(jnp.zeros((2, 4, 5, 3))).shape
    (2, 3, 4, 5)
  """
  x = _to_jax(x) if not isinstance(x, jax.Array) else x
  return jnp.moveaxis(x, -1, 1)
