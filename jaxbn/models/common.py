"""What the linen, nnx and plain-JAX models share: activations, flattening, and folding's trace."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Activation = str | Callable[[jax.Array], jax.Array]

_ACTIVATIONS = {"sigmoid": jax.nn.sigmoid, "relu": jax.nn.relu, "tanh": jnp.tanh}

PREACTIVATION = "preactivation"


def activation_fn(act: Activation) -> Callable[[jax.Array], jax.Array]:
  """The function an :data:`Activation` names (a callable is returned as it is)."""
  if callable(act):
    return act
  if act not in _ACTIVATIONS:
    raise ValueError(
      f"activation must be one of {sorted(_ACTIVATIONS)} or a callable, got {act!r}."
    )
  return _ACTIVATIONS[act]


def flatten(x: jax.Array) -> jax.Array:
  """``(N, ...)`` as ``(N, -1)``: the input of a dense layer."""
  return x.reshape(x.shape[0], -1)


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
