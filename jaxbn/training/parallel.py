"""Data parallelism: the batch sharded over every device, batch norm over the global batch.

The way to scale is ``jax.jit`` on sharded arrays: the batch split over a
mesh axis with a ``NamedSharding``, the state replicated, and the model and
step written for one device. Every reduction over the batch axis, batch
norm's statistics included, is then a reduction over the global batch, which
XLA turns into an all-reduce; nothing names a mesh axis. The same code runs
on one device, on the devices of one host and on those of several processes
(``jax.distributed.initialize``), where :func:`global_batch` assembles the
global batch from each process's rows. :func:`data_parallel_train_step` is
that step; :func:`shard_map_train_step` is the older form under
``jax.shard_map``, for models whose batch norm names the mesh axis
(``axis_name``, ``axis_index_groups``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbn.training.state import Batch
from jaxbn.training.state import TrainState
from jaxbn.training.state import train_step


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


def global_batch(batch: Any, mesh: Mesh) -> Any:
  """The global batch, split over ``mesh``'s axis, from each process's rows.

  Every leaf of ``batch`` (NumPy or JAX arrays, e.g. ``(x, y)``) holds this
  process's rows; the result holds global ``jax.Array`` s sharded along their
  first axis over the mesh (``NamedSharding(mesh, P(axis))``), the
  processes' rows in the order of the mesh's devices (process 0's first for
  :func:`data_parallel_mesh`). It is ``jax.make_array_from_process_local_data``
  for each leaf; in one process, the batch placed over the devices. A leaf
  that already is a global array sharded over several processes is resharded
  as it is.

  Args:
    batch: a pytree of this process's rows; the leading axis of each leaf must
      be divisible by the number of this process's devices in the mesh.
    mesh: a one-axis mesh, e.g. :func:`data_parallel_mesh`.

  Returns:
    The batch as global arrays.

  Examples:
    >>> import numpy as np
    >>> from jaxbn import training
    >>> mesh = training.data_parallel_mesh()
    >>> x = training.global_batch(np.zeros((64, 3), np.float32), mesh)
    >>> x.shape, len(x.sharding.device_set) == mesh.size
    ((64, 3), True)
  """
  (axis,) = mesh.axis_names
  _check_batch("global_batch", batch, mesh)
  return _place(batch, NamedSharding(mesh, P(axis)))


def _check_batch(fn: str, batch: Any, mesh: Mesh) -> None:
  """A clear error for a batch that the mesh's devices cannot share evenly.

  A global array must divide over every device of the mesh; this process's
  rows over its own devices of it.
  """
  (axis,) = mesh.axis_names
  local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  for leaf in jax.tree.leaves(batch):
    whole = isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
    n, k = np.shape(leaf)[0], (mesh.size if whole else local)
    if n % k:
      raise ValueError(
        f"{fn}: a batch of {n} examples cannot be split evenly over the {k} devices of the "
        f"mesh axis {axis!r}; use a batch size divisible by {k} (fit's batch_size, e.g. "
        f"{max(k, n - n % k)})."
      )


def _place(tree: Any, sharding: NamedSharding) -> Any:
  """Each leaf with ``sharding``: this process's part of it, or already a global array."""
  if sharding.is_fully_addressable:
    # Placing the arguments first (a no-op when they are already placed) also
    # serves meshes with explicit axis types, which do not reshard implicitly.
    return jax.device_put(tree, sharding)

  def leaf(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x, sharding)  # already global
    # This process's part; for a replicated value, the whole of it.
    return jax.make_array_from_process_local_data(
      sharding, x if isinstance(x, jax.Array) else np.asarray(x)
    )

  return jax.tree.map(leaf, tree)


def data_parallel_train_step(
  mesh: Mesh,
  *,
  use_running_average: bool = False,
  update_batch_stats: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """:func:`train_step` under ``jax.jit`` with the batch split over ``mesh``'s axis.

  The step is :func:`train_step`'s, unchanged; only the placement differs:
  the state is replicated over the mesh and the batch sharded along its
  first axis (``NamedSharding(mesh, P(axis))``). Each reduction over the
  batch, the loss's mean and batch norm's statistics alike, is a reduction
  over the global batch, so a model written for one device (batch norm
  without ``axis_name``, jaxbn's or flax's) trains as :func:`train_step`
  on the whole batch on one device does, up to float rounding. The mesh may
  have explicit axis types (``jax.sharding.AxisType.Explicit``) or auto ones.

  Statistics per device (or per group of examples) are asked for in the model
  rather than by the step: ``ghost_batch_size`` equal to the per-device batch
  normalizes each device's rows by their own statistics with no collective
  for them (the running statistics are then those of the global batch).

  Several processes (``jax.distributed.initialize``, a mesh that spans
  their devices, as :func:`data_parallel_mesh` does by default): every
  process calls the step with the same ``state`` and its own rows of the
  batch, NumPy or local arrays, which the step assembles with
  :func:`global_batch`; a batch that already is a global array is taken as
  it is. The returned state and metrics are replicated global arrays,
  readable in every process (``np.asarray``, ``float``). :func:`fit` drives
  the step the same way when each process gives it its own data and its
  local batch size.

  Args:
    mesh: a one-axis mesh, e.g. :func:`data_parallel_mesh`.
    use_running_average: as in :func:`train_step`.
    update_batch_stats: as in :func:`train_step`.

  Returns:
    ``step(state, batch) -> (state, metrics)``; the global batch size must be
    divisible by the number of devices.

  Examples:
    >>> import numpy as np, optax
    >>> from jaxbn import models, training
    >>> x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    >>> y = (x[:, 0] > 0).astype(np.int32)
    >>> state = training.create_train_state(
    ...   models.MLP(features=(8,), num_classes=2), optax.sgd(0.1), x[:1])
    >>> step = training.data_parallel_train_step(training.data_parallel_mesh())
    >>> state, metrics = step(state, (x, y))
    >>> int(state.step), state.params['Dense_0']['kernel'].sharding.is_fully_replicated
    (1, True)
  """
  (axis,) = mesh.axis_names
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(axis))
  jitted = jax.jit(
    functools.partial(
      train_step, use_running_average=use_running_average, update_batch_stats=update_batch_stats
    ),
    out_shardings=replicated,
  )

  def run(state, batch):
    _check_batch("data_parallel_train_step", batch, mesh)
    state, batch = _place(state, replicated), _place(batch, split)
    try:
      with jax.set_mesh(mesh):
        return jitted(state, batch)
    except NameError as e:
      if "unbound axis name" not in str(e):
        raise
      raise ValueError(
        f"data_parallel_train_step: the model names a mesh axis ({e}); under jit with "
        f"sharded arrays batch norm needs no axis_name (its statistics are the global "
        f"batch's): build the model without axis_name, or use shard_map_train_step."
      ) from e

  return run


def shard_map_train_step(
  mesh: Mesh,
  *,
  use_running_average: bool = False,
  update_batch_stats: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """:func:`train_step` under ``jax.shard_map``, for models that name the mesh axis.

  :func:`data_parallel_train_step` (``jax.jit`` on sharded arrays) is the
  way to scale; this step is for what it does not do: models whose batch
  norm names the mesh axis (``axis_name``, e.g. code from ``pmap``, and
  ``axis_index_groups``, statistics over fixed groups of devices), and
  flax's per-device semantics for a model without ``axis_name`` (the running
  statistics averaged over devices, as below).

  Under ``jax.shard_map`` each device runs the model on its shard; the loss
  is the global batch mean and the gradient the sum over devices; the state
  is replicated.

  Batch norm with ``axis_name`` equal to the mesh's axis name (e.g.
  ``models.MLP(bn_options=BNOptions(axis_name='batch'))``) normalizes with the statistics of the
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
    state, metrics = train_step(
      state,
      batch,
      use_running_average=use_running_average,
      update_batch_stats=update_batch_stats,
      axis_name=axis_name,
    )
    stats = state.batch_stats
    if any(_varies_over(s, axis_name) for s in jax.tree.leaves(stats)):
      import warnings

      warnings.warn(
        f"shard_map_train_step: the model's batch norm has no axis_name={axis_name!r}, so"
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

  def run(state, batch):
    _check_batch("shard_map_train_step", batch, mesh)
    return sharded(_place(state, replicated), _place(batch, split))

  return run
