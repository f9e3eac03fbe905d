"""Saving and restoring a :class:`~jaxbn.training.TrainState` with orbax (imported on use)."""

from __future__ import annotations

import os
from typing import Any

import jax

from jaxbn.training.state import TrainState


def _saved(state: TrainState) -> dict:
  return {
    "step": state.step,
    "params": state.params,
    "batch_stats": state.batch_stats,
    "opt_state": state.opt_state,
  }


def save_checkpoint(directory: str | os.PathLike, state: TrainState) -> None:
  """Saves ``state`` (step, params, batch_stats, opt_state) with orbax.

  Args:
    directory: an absolute path, created; it must not exist yet.
    state: the :class:`TrainState` (``apply_fn`` and ``tx`` are code, not
      saved: :func:`restore_checkpoint` takes them from a template).

  With several processes every process calls it with the same global state
  and the same directory (each writes the shards it holds).
  """
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.fspath(directory), _saved(state))


def restore_checkpoint(
  directory: str | os.PathLike, template: TrainState, *, sharding: Any = None
) -> TrainState:
  """Restores a state saved by :func:`save_checkpoint`.

  Args:
    directory: the absolute path given to :func:`save_checkpoint`.
    template: a :class:`TrainState` of the same model and optimizer (e.g. from
      :func:`create_train_state`); gives the structure, shapes and dtypes and
      the ``apply_fn`` and ``tx``.
    sharding: where to put every restored array, e.g.
      ``NamedSharding(mesh, P())`` for a state replicated over a mesh that
      spans several processes (every process calls this then); default: the
      template's own shardings. A checkpoint saved by any number of processes
      restores onto any mesh.

  Returns:
    The restored :class:`TrainState`, bit-identical to the saved one.

  Examples:
    >>> import os, tempfile, jax.numpy as jnp, optax
    >>> from jaxbn import models, training
    >>> state = training.create_train_state(
    ...   models.MLP(features=(4,)), optax.adam(1e-3), jnp.ones((1, 3)))
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> training.save_checkpoint(path, state)
    >>> restored = training.restore_checkpoint(path, state)
    >>> bool((restored.params['Dense_0']['kernel'] == state.params['Dense_0']['kernel']).all())
    True
  """
  import orbax.checkpoint as ocp

  def target_of(x):
    t = ocp.utils.to_shape_dtype_struct(x)
    return t if sharding is None else jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=sharding)

  target = jax.tree.map(target_of, _saved(template))
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(os.fspath(directory), target)
  # orbax gives back plain containers where the template had optax's
  # NamedTuples: put the leaves back into the template's structure.
  leaves = jax.tree.leaves(restored)
  restored = jax.tree.unflatten(jax.tree.structure(_saved(template)), leaves)
  return template.replace(**restored)
