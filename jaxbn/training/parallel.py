"""Data parallelism: the batch sharded over every device, batch norm synchronized."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbn.training.state import Batch
from jaxbn.training.state import TrainState
from jaxbn.training.state import _train_step


def data_parallel_mesh(axis_name: str = "batch", devices: Any = None) -> Mesh:
  """A one-axis mesh over ``devices`` (default: every device, ``jax.devices()``).

  In one process that is every local device. After
  ``jax.distributed.initialize`` the default spans the devices of every
  process, and :func:`data_parallel_train_step` then takes each process's
  own part of the batch; pass ``jax.local_devices()`` for a mesh of this
  process alone.

  Examples:
    >>> import jax
    >>> from jaxbn.training import data_parallel_mesh
    >>> mesh = data_parallel_mesh()
    >>> mesh.axis_names, mesh.size == jax.device_count()
    (('batch',), True)
  """
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (axis_name,))


def _varies_over(x: Any, axis_name: Any) -> bool:
  """Whether ``x`` differs between the devices of ``axis_name`` inside ``jax.shard_map``."""
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)  # jax >= 0.10; earlier versions call it vma
  varying = mat.varying if mat is not None else getattr(aval, "vma", frozenset())
  return axis_name in varying


def data_parallel_train_step(
  mesh: Mesh,
  *,
  use_running_average: bool = False,
  update_batch_stats: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """A jitted :func:`train_step` with the batch split over ``mesh``'s axis.

  Under ``jax.shard_map`` each device runs the model on its shard; the loss
  is the global batch mean and the gradient the sum over devices; the state
  is replicated.

  Batch norm with ``axis_name`` equal to the mesh's axis name (e.g.
  ``models.MLP(axis_name='batch')``) normalizes with the statistics of the
  global batch, merged exactly by count: the result equals
  :func:`train_step` on the whole batch on one device (up to float
  rounding). Batch norm without ``axis_name`` (jaxbn's or flax's) trains as
  flax does there, with per-device statistics: each device normalizes its
  shard by the shard's own statistics, and the running statistics, which
  then differ between devices, are replaced by their mean over devices so
  that the state stays replicated. That is rarely what data parallelism
  wants, so a step that updates such running statistics warns when it is
  traced (``UserWarning``).

  Several processes (``jax.distributed.initialize``, a mesh that spans
  their devices, as :func:`data_parallel_mesh` does by default): every
  process calls the step with the same ``state`` and its own part of the
  batch, NumPy or local arrays whose leading axis is divisible by its number
  of devices in the mesh. The step assembles the global batch with
  ``jax.make_array_from_process_local_data`` (the processes' parts in the
  order of the mesh's devices, process 0's first for ``jax.devices()``); a
  batch that is already a global ``jax.Array`` is taken as it is. The
  returned state and metrics are replicated global arrays, readable in every
  process (``np.asarray``, ``float``). :func:`fit` drives the step the same
  way when each process gives it its own data and its local batch size.

  Args:
    mesh: a one-axis mesh, e.g. :func:`data_parallel_mesh`.
    use_running_average: as in :func:`train_step`.
    update_batch_stats: as in :func:`train_step`.

  Returns:
    ``step(state, batch) -> (state, metrics)``; the global batch size must be
    divisible by the number of devices.
  """
  (axis_name,) = mesh.axis_names

  def step(state, batch):
    state, metrics = _train_step(state, batch, use_running_average, update_batch_stats, axis_name)
    stats = state.batch_stats
    if any(_varies_over(s, axis_name) for s in jax.tree.leaves(stats)):
      import warnings

      warnings.warn(
        f"data_parallel_train_step: the model's batch norm has no axis_name={axis_name!r}, so"
        " each device normalizes its shard by its own statistics and the running statistics"
        f" are averaged over devices; build it with axis_name={axis_name!r} for the statistics"
        " of the global batch.",
        UserWarning,
        stacklevel=2,
      )
      stats = jax.tree.map(
        lambda s: jax.lax.pmean(s, axis_name) if _varies_over(s, axis_name) else s, stats
      )
      state = state.replace(batch_stats=stats)
    return state, metrics

  sharded = jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=(P(), P(axis_name)), out_specs=(P(), P()))
  )
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(axis_name))
  multi_process = not replicated.is_fully_addressable

  def place(tree, sharding):
    # Placing the arguments first (a no-op when they are already placed) also
    # serves meshes with explicit axis types, which do not reshard implicitly.
    if not multi_process:
      return jax.device_put(tree, sharding)

    def leaf(x):
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)  # already global
      # This process's part; for the replicated state, the whole value.
      return jax.make_array_from_process_local_data(
        sharding, x if isinstance(x, jax.Array) else np.asarray(x)
      )

    return jax.tree.map(leaf, tree)

  # The rows this process gives: split over its own devices of the mesh.
  local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)

  def run(state, batch):
    for leaf in jax.tree.leaves(batch):
      glob = isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
      n, k = np.shape(leaf)[0], (mesh.size if glob else local)
      if n % k:
        raise ValueError(
          f"data_parallel_train_step: a batch of {n} examples cannot be split evenly over "
          f"the {k} devices of the mesh axis {axis_name!r}; use a batch size divisible by "
          f"{k} (fit's batch_size, e.g. {max(k, n - n % k)})."
        )
    return sharded(place(state, replicated), place(batch, split))

  return run
