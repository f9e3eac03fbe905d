"""Training with optax: a train state that carries the batch statistics, jitted steps, a loop.

The pieces, for a linen model whose ``__call__`` takes ``train: bool`` (the
models of :mod:`jaxbn.models`, or any flax model using
:class:`jaxbn.linen.BatchNorm` or ``flax.linen.BatchNorm``):

- :class:`TrainState` (``params``, ``batch_stats``, ``opt_state``, ``step``)
  and :func:`create_train_state`;
- :func:`train_step` (``state, batch -> state, metrics``): one jit-compiled
  optimizer step that threads the updated running statistics out of the loss
  as auxiliary output, and :func:`eval_step` / :func:`evaluate`, which use the
  running statistics;
- :func:`fit`: shuffled epochs or a step budget, a tqdm progress bar and a
  history of metrics to plot; the data order is a function of the step, so a
  run restored from a checkpoint continues exactly;
- :func:`bn_weight_decay_mask` (weight decay that skips batch norm's scale and
  bias) and :func:`freeze_bn_affine` (stop training them);
- :func:`save_checkpoint` / :func:`restore_checkpoint` (orbax);
- :func:`data_parallel_mesh` / :func:`data_parallel_train_step`: the batch
  sharded over all devices (of every process), batch norm synchronized through
  ``axis_name`` under ``jax.shard_map``.

Fine-tuning freezes batch norm with three independent switches:
``use_running_average=True`` (normalize with the running statistics),
``update_batch_stats=False`` (normalize with the batch's, keep the running
ones), and :func:`freeze_bn_affine` (scale and bias not trained).

A batch is a tuple ``(x, y)``: inputs and int32 labels. The loss is the mean
softmax cross-entropy of the model's logits.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state as flax_train_state
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbn import data as data_lib
from jaxbn.core import BNParams

__all__ = (
  "TrainState",
  "bn_param_mask",
  "bn_weight_decay_mask",
  "create_train_state",
  "data_parallel_mesh",
  "data_parallel_train_step",
  "eval_step",
  "evaluate",
  "fit",
  "freeze_bn_affine",
  "restore_checkpoint",
  "save_checkpoint",
  "train_step",
)

Batch = tuple[Any, Any]


class TrainState(flax_train_state.TrainState):
  """``flax.training.train_state.TrainState`` with the batch statistics.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    apply_fn: the model's ``apply`` (static, not saved in checkpoints).
    params: the ``'params'`` collection (trained by ``tx``).
    tx: the optax optimizer (static).
    opt_state: ``tx``'s state.
    batch_stats: the ``'batch_stats'`` collection (running statistics;
      ``{}`` for a model without batch norm).
  """

  batch_stats: Any = None

  def apply_gradients(self, *, grads: Any, **kwargs: Any) -> TrainState:
    """One optimizer update (``step + 1``); ``kwargs`` replace other fields.

    optax's own code (e.g. Adam's bias correction ``decay**count``) mixes
    Python floats with int32 arrays, which ``jax_numpy_dtype_promotion=
    'strict'`` rejects; the update runs under standard promotion so that
    a strict configuration elsewhere does not break the optimizer.
    """
    with jax.numpy_dtype_promotion("standard"):
      return super().apply_gradients(grads=grads, **kwargs)


def create_train_state(
  model: Any,
  tx: optax.GradientTransformation,
  sample_input: Any,
  *,
  key: jax.Array | int = 0,
  train_bn_affine: bool = True,
) -> TrainState:
  """Initializes a linen ``model`` and an optimizer state.

  Args:
    model: a linen module called as ``model(x, train=...)``.
    tx: the optax optimizer.
    sample_input: an input batch (only its shape and dtype matter).
    key: PRNG key or int seed of the initialization.
    train_bn_affine: False freezes batch norm's scale and bias (wraps ``tx``
      with :func:`freeze_bn_affine`).

  Returns:
    A :class:`TrainState` at step 0.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from jaxbn import models, training
    >>> state = training.create_train_state(
    ...   models.MLP(features=(16,)), optax.sgd(0.1), jnp.ones((1, 64)))
    >>> int(state.step), sorted(state.batch_stats)
    (0, ['BatchNorm_0'])
  """
  if isinstance(key, int):
    key = jax.random.key(key)
  variables = model.init(key, sample_input, train=False)
  params = variables["params"]
  if not train_bn_affine:
    tx = freeze_bn_affine(tx)
  state = TrainState.create(
    apply_fn=model.apply,
    params=params,
    tx=tx,
    batch_stats=variables.get("batch_stats", {}),
  )
  # A concrete int32 step (not a Python int) keeps the jitted step from
  # compiling twice.
  return state.replace(step=jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------
# Masks: which parameters belong to batch norm.

# flax's default names (BatchNorm_0) and the usual hand-given ones (bn, bn1,
# batch_norm_2, norm_bn).
_BN_NAME = re.compile(r"(^|_)(batch_?norm|bn)(_?\d+)?$", re.IGNORECASE)


def _key_name(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def bn_param_mask(params: Any, batch_stats: Any = None) -> Any:
  """A pytree of bools like ``params``: True for batch norm's scale and bias.

  With ``batch_stats``, a batch-norm layer is exactly a ``params`` subtree
  whose path also holds running statistics. Without it, a leaf named
  ``scale`` or ``bias`` belongs to batch norm when a module on its path is
  named like flax's default ``BatchNorm_0`` or ``bn``, ``bn1``,
  ``batch_norm_2``, ``..._bn`` (case-insensitive), or sits in a
  :class:`jaxbn.BNParams`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbn.training import bn_param_mask
    >>> params = {'Dense_0': {'kernel': jnp.ones((2, 2))},
    ...           'BatchNorm_0': {'scale': jnp.ones(2), 'bias': jnp.zeros(2)}}
    >>> bn_param_mask(params)
    {'BatchNorm_0': {'bias': True, 'scale': True}, 'Dense_0': {'kernel': False}}
  """
  if batch_stats is not None:
    layers = {
      tuple(_key_name(k) for k in path[:-1])
      for path, _ in jax.tree_util.tree_leaves_with_path(batch_stats)
    }

    def is_bn(path, _):
      names = tuple(_key_name(k) for k in path)
      return names[-1] in ("scale", "bias") and names[:-1] in layers

    return jax.tree_util.tree_map_with_path(is_bn, params)

  def is_bn_node(x):
    return isinstance(x, BNParams)

  def label(path, leaf):
    if isinstance(leaf, BNParams):
      return BNParams(True, True)
    names = [_key_name(k) for k in path]
    return bool(
      names and names[-1] in ("scale", "bias") and any(_BN_NAME.search(n) for n in names[:-1])
    )

  return jax.tree_util.tree_map_with_path(label, params, is_leaf=is_bn_node)


def bn_weight_decay_mask(params: Any) -> Any:
  """The mask for ``optax.add_decayed_weights`` / ``optax.adamw``: decay all but batch norm.

  True for every parameter except batch norm's scale and bias (see
  :func:`bn_param_mask` for how they are found): decaying ``gamma`` toward 0
  would shrink the normalized activations, and decaying ``beta`` would undo
  the bias it replaces.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from jaxbn.training import bn_weight_decay_mask
    >>> tx = optax.adamw(1e-3, weight_decay=1e-4, mask=bn_weight_decay_mask)
    >>> params = {'Dense_0': {'kernel': jnp.ones((2, 2))},
    ...           'BatchNorm_0': {'scale': jnp.ones(2), 'bias': jnp.zeros(2)}}
    >>> bn_weight_decay_mask(params)
    {'BatchNorm_0': {'bias': False, 'scale': False}, 'Dense_0': {'kernel': True}}
  """
  return jax.tree.map(lambda b: not b, bn_param_mask(params))


def freeze_bn_affine(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` for every parameter but batch norm's scale and bias, which stay fixed.

  Their updates are zero (``optax.set_to_zero``), weight decay included.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from jaxbn.training import freeze_bn_affine
    >>> params = {'Dense_0': {'kernel': jnp.ones(2)}, 'BatchNorm_0': {'scale': jnp.ones(2)}}
    >>> tx = freeze_bn_affine(optax.sgd(0.5))
    >>> updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    >>> updates['BatchNorm_0']['scale'].tolist(), updates['Dense_0']['kernel'].tolist()
    ([0.0, 0.0], [-0.5, -0.5])
  """

  def labels(params):
    return jax.tree.map(lambda b: "frozen" if b else "train", bn_param_mask(params))

  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


# --------------------------------------------------------------------------
# Steps.


def _loss_fn(params, state: TrainState, batch: Batch, use_running_average: bool, update: bool):
  x, y = batch
  variables = {"params": params, "batch_stats": state.batch_stats}
  if use_running_average:
    logits = state.apply_fn(variables, x, train=False)
    new_stats = state.batch_stats
  else:
    logits, updates = state.apply_fn(variables, x, train=True, mutable=["batch_stats"])
    new_stats = updates.get("batch_stats", state.batch_stats) if update else state.batch_stats
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
  return loss, (new_stats, logits)


def _accuracy(logits: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))


def _train_step(
  state: TrainState,
  batch: Batch,
  use_running_average: bool = False,
  update_batch_stats: bool = True,
  axis_name: Any = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  def loss(params):
    value, aux = _loss_fn(params, state, batch, use_running_average, update_batch_stats)
    if axis_name is not None:
      # The mean over the global batch (equal shards); JAX sums the gradient of
      # the replicated params over devices.
      value = jax.lax.pmean(value, axis_name)
    return value, aux

  (value, (new_stats, logits)), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
  accuracy = _accuracy(logits, batch[1])
  if axis_name is not None:
    accuracy = jax.lax.pmean(accuracy, axis_name)
  state = state.apply_gradients(grads=grads, batch_stats=new_stats)
  return state, {"loss": value, "accuracy": accuracy}


_STATIC = ("use_running_average", "update_batch_stats")

_train_step_jit = jax.jit(_train_step, static_argnames=_STATIC)


def train_step(
  state: TrainState,
  batch: Batch,
  *,
  use_running_average: bool = False,
  update_batch_stats: bool = True,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One jit-compiled optimizer step on ``batch = (x, y)``.

  The loss is ``mean(softmax_cross_entropy(model(x, train=True), y))``; it
  returns ``(loss, (new_batch_stats, logits))`` (``has_aux``), so the running
  statistics computed in the forward pass come out with the gradient.

  Args:
    state: a :class:`TrainState`.
    batch: ``(x, y)``, labels int32.
    use_running_average: normalize with the running statistics (batch norm
      frozen in inference mode; the statistics are not updated).
    update_batch_stats: False normalizes with the batch statistics but keeps
      the running ones unchanged.

  Returns:
    ``(new_state, {'loss': ..., 'accuracy': ...})`` (scalars of this batch).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from jaxbn import models, training
    >>> state = training.create_train_state(
    ...   models.MLP(features=(16,), num_classes=2), optax.sgd(0.1), jnp.ones((1, 3)))
    >>> batch = (jnp.array([[0.0, 1, 2], [3, 4, 5]]), jnp.array([0, 1]))
    >>> state, metrics = training.train_step(state, batch)
    >>> int(state.step), sorted(metrics)
    (1, ['accuracy', 'loss'])
  """
  return _train_step_jit(
    state, batch, use_running_average=use_running_average, update_batch_stats=update_batch_stats
  )


@jax.jit
def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
  """Loss and accuracy on ``batch = (x, y)`` with the running statistics.

  Each example's output depends on it alone (Algorithm 2 of the paper), so
  the result does not depend on how the evaluation data is batched.

  Returns:
    ``{'loss': ..., 'accuracy': ...}``, means over the batch.
  """
  x, y = batch
  logits = state.apply_fn(
    {"params": state.params, "batch_stats": state.batch_stats}, x, train=False
  )
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
  return {"loss": loss, "accuracy": _accuracy(logits, y)}


def evaluate(state: TrainState, x: Any, y: Any, *, batch_size: int = 1024) -> dict[str, float]:
  """Loss and accuracy over a whole data set, with the running statistics.

  Args:
    state: a :class:`TrainState`.
    x: inputs.
    y: int labels.
    batch_size: examples per :func:`eval_step` call.

  Returns:
    ``{'loss': float, 'accuracy': float}``, means over every example.
  """
  n = len(x)
  if n == 0 or len(y) != n:
    raise ValueError(f"evaluate: x and y must be non-empty and equally long, got {n} and {len(y)}.")
  loss = correct = 0.0
  for start in range(0, n, batch_size):
    xb, yb = x[start : start + batch_size], y[start : start + batch_size]
    m = jax.device_get(eval_step(state, (xb, yb)))
    loss += float(m["loss"]) * len(xb)
    correct += float(m["accuracy"]) * len(xb)
  return {"loss": loss / n, "accuracy": correct / n}


# --------------------------------------------------------------------------
# The loop.


def fit(
  state: TrainState,
  x: Any,
  y: Any,
  *,
  batch_size: int = 60,
  epochs: int | None = None,
  steps: int | None = None,
  seed: int = 0,
  eval_data: tuple[Any, Any] | None = None,
  eval_every: int | None = None,
  progress: bool = True,
  step_fn: Callable[[TrainState, Batch], tuple[TrainState, dict]] | None = None,
  use_running_average: bool = False,
  update_batch_stats: bool = True,
) -> tuple[TrainState, dict[str, list[float]]]:
  """Trains ``state`` on ``(x, y)`` with shuffled mini-batches.

  Epoch ``e`` visits the examples in the order
  :func:`jaxbn.data.epoch_order` ``(seed, e, len(x))``, in batches of
  ``batch_size`` (the last partial batch dropped), and the batch of a step is
  found from ``state.step``: training resumed from a checkpoint sees the same
  data as training that never stopped.

  Args:
    state: a :class:`TrainState` (its ``step`` says where in the data to start).
    x: training inputs (NumPy or JAX arrays).
    y: int labels.
    batch_size: examples per step.
    epochs: number of epochs to run (of ``len(x) // batch_size`` steps).
    steps: number of steps to run instead (exactly one of the two).
    seed: seed of the shuffles.
    eval_data: ``(x_test, y_test)``, evaluated with :func:`evaluate` every
      ``eval_every`` steps (default: each epoch) and at the end.
    eval_every: steps between evaluations.
    progress: show a tqdm progress bar.
    step_fn: the step to use (default :func:`train_step` with the two flags
      below), e.g. :func:`data_parallel_train_step`'s.
    use_running_average: passed to :func:`train_step`.
    update_batch_stats: passed to :func:`train_step`.

  Returns:
    ``(state, history)``: ``history`` maps ``'step'``, ``'loss'``,
    ``'accuracy'`` (one entry per training step; ``step`` is the step count
    after it) and, with ``eval_data``, ``'eval_step'``, ``'eval_loss'``,
    ``'eval_accuracy'`` to lists of numbers, ready to plot.

  Examples:
    >>> import numpy as np, optax
    >>> from jaxbn import models, training
    >>> x = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    >>> y = (x[:, 0] > 0).astype(np.int32)
    >>> state = training.create_train_state(
    ...   models.MLP(features=(8,), num_classes=2), optax.adam(0.05), x[:1])
    >>> state, history = training.fit(state, x, y, batch_size=16, epochs=2, progress=False)
    >>> int(state.step), len(history['loss'])
    (8, 8)
  """
  from tqdm.auto import tqdm

  n = len(x)
  if len(y) != n:
    raise ValueError(f"fit: x and y differ in length: {n} and {len(y)}.")
  if not isinstance(batch_size, int) or not 1 <= batch_size <= n:
    raise ValueError(f"fit: batch_size must be an int in [1, {n}] (len(x)), got {batch_size!r}.")
  if (epochs is None) == (steps is None):
    raise ValueError(f"fit: give exactly one of epochs and steps, got {epochs=} and {steps=}.")
  per_epoch = n // batch_size
  total = steps if steps is not None else epochs * per_epoch
  if eval_every is None:
    eval_every = per_epoch
  if step_fn is None:

    def step_fn(state, batch):
      return train_step(
        state,
        batch,
        use_running_average=use_running_average,
        update_batch_stats=update_batch_stats,
      )

  history: dict[str, list[float]] = {"step": [], "loss": [], "accuracy": []}
  if eval_data is not None:
    history.update(eval_step=[], eval_loss=[], eval_accuracy=[])
  pending: list[dict] = []

  def flush():
    for m in jax.device_get(pending):
      history["loss"].append(float(m["loss"]))
      history["accuracy"].append(float(m["accuracy"]))
    pending.clear()

  def run_eval(step: int):
    flush()
    m = evaluate(state, *eval_data)
    history["eval_step"].append(step)
    history["eval_loss"].append(m["loss"])
    history["eval_accuracy"].append(m["accuracy"])
    bar.set_postfix(
      loss=f"{history['loss'][-1]:.4f}" if history["loss"] else "-",
      test_acc=f"{m['accuracy']:.4f}",
    )

  start = int(state.step)
  order, order_epoch = None, -1
  bar = tqdm(range(start, start + total), disable=not progress, desc="fit", leave=False)
  for step in bar:
    epoch, index = divmod(step, per_epoch)
    if epoch != order_epoch:
      order, order_epoch = data_lib.epoch_order(seed, epoch, n), epoch
    idx = order[index * batch_size : (index + 1) * batch_size]
    state, metrics = step_fn(state, (x[idx], y[idx]))
    pending.append(metrics)
    history["step"].append(step + 1)
    if eval_data is not None and (step + 1 - start) % eval_every == 0:
      run_eval(step + 1)
  flush()
  if eval_data is not None and (
    not history["eval_step"] or history["eval_step"][-1] != start + total
  ):
    run_eval(start + total)
  bar.close()
  return state, history


# --------------------------------------------------------------------------
# Checkpoints.


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
  """
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.fspath(directory), _saved(state))


def restore_checkpoint(directory: str | os.PathLike, template: TrainState) -> TrainState:
  """Restores a state saved by :func:`save_checkpoint`.

  Args:
    directory: the absolute path given to :func:`save_checkpoint`.
    template: a :class:`TrainState` of the same model and optimizer (e.g. from
      :func:`create_train_state`); gives the structure, shapes and dtypes and
      the ``apply_fn`` and ``tx``.

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

  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _saved(template))
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(os.fspath(directory), target)
  # orbax gives back plain containers where the template had optax's
  # NamedTuples: put the leaves back into the template's structure.
  leaves = jax.tree.leaves(restored)
  restored = jax.tree.unflatten(jax.tree.structure(_saved(template)), leaves)
  return template.replace(**restored)


# --------------------------------------------------------------------------
# Data parallelism.


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

  def run(state, batch):
    return sharded(place(state, replicated), place(batch, split))

  return run
