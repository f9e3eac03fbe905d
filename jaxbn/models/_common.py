"""What the linen, nnx and plain-JAX models share: activations and names."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

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


def _flatten(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1)
