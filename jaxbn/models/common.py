"""What the linen, nnx and plain-JAX example models share: activations and flattening."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Activation = str | Callable[[jax.Array], jax.Array]

_ACTIVATIONS = {"sigmoid": jax.nn.sigmoid, "relu": jax.nn.relu, "tanh": jnp.tanh}

PREACTIVATION = "preactivation"
"""The name under which the example models sow the input of each hidden activation."""


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
