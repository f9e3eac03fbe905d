"""The train state, its jitted steps, evaluation and the :func:`fit` loop."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from flax.training import train_state as flax_train_state

from jaxbn.core import RunningStatsWarning
from jaxbn.diagnosis import is_labelled
from jaxbn.diagnosis import observed_options
from jaxbn.diagnosis import unsettled
from jaxbn.engine import accuracy
from jaxbn.engine import cross_entropy
from jaxbn.engine import optimizer_promotion
from jaxbn.engine import train_loop
from jaxbn.training.masks import freeze_bn_affine

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

    The update runs under :func:`jaxbn.engine.optimizer_promotion`, so that
    a strict dtype promotion elsewhere does not break optax.
    """
    with optimizer_promotion():
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


def _loss_fn(params, state: TrainState, batch: Batch, use_running_average: bool, update: bool):
  x, y = batch
  variables = {"params": params, "batch_stats": state.batch_stats}
  if use_running_average:
    logits = state.apply_fn(variables, x, train=False)
    new_stats = state.batch_stats
  else:
    logits, updates = state.apply_fn(variables, x, train=True, mutable=["batch_stats"])
    new_stats = updates.get("batch_stats", state.batch_stats) if update else state.batch_stats
  return cross_entropy(logits, y), (new_stats, logits)


def train_step(
  state: TrainState,
  batch: Batch,
  *,
  use_running_average: bool = False,
  update_batch_stats: bool = True,
  axis_name: Any = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One jit-compiled optimizer step on ``batch = (x, y)``.

  The loss is ``mean(softmax_cross_entropy(model(x, train=True), y))``
  (:func:`jaxbn.engine.cross_entropy`); it returns ``(loss,
  (new_batch_stats, logits))`` (``has_aux``), so the running statistics
  computed in the forward pass come out with the gradient.

  Args:
    state: a :class:`TrainState`.
    batch: ``(x, y)``, labels int32.
    use_running_average: normalize with the running statistics (batch norm
      frozen in inference mode; the statistics are not updated).
    update_batch_stats: False normalizes with the batch statistics but keeps
      the running ones unchanged.
    axis_name: inside ``jax.shard_map``, the mesh axis the batch is split
      over: the loss and accuracy are averaged over it, so that they are the
      global batch's (:func:`shard_map_train_step` passes it); None outside.

  Returns:
    ``(new_state, {'loss': ..., 'accuracy': ...})`` (scalars of this batch).

  The same step runs on sharded arrays: with the batch split over devices
  (a ``NamedSharding``, e.g. :func:`global_batch`) and the state replicated,
  the loss and batch norm's statistics are those of the global batch
  (:func:`data_parallel_train_step` places both).

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
  # Every flag passed by keyword: jit keys its cache on the keywords given.
  return _train_step(
    state,
    batch,
    use_running_average=use_running_average,
    update_batch_stats=update_batch_stats,
    axis_name=axis_name,
  )


@functools.partial(
  jax.jit, static_argnames=("use_running_average", "update_batch_stats", "axis_name")
)
def _train_step(state, batch, *, use_running_average, update_batch_stats, axis_name):
  def loss(params):
    value, aux = _loss_fn(params, state, batch, use_running_average, update_batch_stats)
    if axis_name is not None:
      # The mean over the global batch (equal shards); JAX sums the gradient of
      # the replicated params over devices.
      value = jax.lax.pmean(value, axis_name)
    return value, aux

  (value, (new_stats, logits)), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
  acc = accuracy(logits, batch[1])
  if axis_name is not None:
    acc = jax.lax.pmean(acc, axis_name)
  state = state.apply_gradients(grads=grads, batch_stats=new_stats)
  return state, {"loss": value, "accuracy": acc}


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
  return {"loss": cross_entropy(logits, y), "accuracy": accuracy(logits, y)}


def population_stats(
  state: TrainState,
  batches: Iterable[Any],
  *,
  estimator: str = "exact",
  progress: bool = False,
  total: int | None = None,
) -> TrainState:
  """``state`` with the statistics of ``batches`` as its running statistics.

  :func:`jaxbn.linen_population_stats` for a :class:`TrainState`: the model
  (``state.apply_fn``'s module) runs ``apply(variables, x, train=True)`` on each
  batch, and the exact (or Algorithm 2's) statistics of every batch norm's
  inputs replace ``state.batch_stats``. The fix :func:`jaxbn.diagnose` prints for
  running statistics that are not the data's.

  Args:
    state: a :class:`TrainState` whose ``apply_fn`` is a linen model's ``apply``.
    batches: inputs ``x``, or ``(x, y)`` pairs (``y`` is not used).
    estimator: ``"exact"`` or ``"paper"`` (see :func:`jaxbn.population_stats`).
    progress: show a progress bar.
    total: number of batches, for the progress bar.

  Returns:
    The new :class:`TrainState` (``params``, ``step`` and ``opt_state`` unchanged).

  Examples:
    >>> import numpy as np, optax
    >>> from jaxbn import models, training
    >>> x = np.random.default_rng(0).normal(5, 2, size=(64, 3)).astype(np.float32)
    >>> state = training.create_train_state(models.MLP(features=(4,)), optax.sgd(0.1), x[:1])
    >>> state = training.population_stats(state, [x[:32], x[32:]])
    >>> h = x @ np.asarray(state.params['Dense_0']['kernel'])
    >>> bool(np.allclose(state.batch_stats['BatchNorm_0']['mean'], h.mean(0), atol=1e-4))
    True
  """
  from jaxbn.linen import linen_population_stats

  model = linen_model("population_stats", state)
  xs = (b[0] if is_labelled(b) else b for b in batches)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  new = linen_population_stats(
    model, variables, xs, estimator=estimator, progress=progress, total=total, train=True
  )
  return state.replace(batch_stats=new["batch_stats"])


def linen_model(fn: str, state: TrainState) -> nn.Module:
  """The linen model whose ``apply`` is ``state.apply_fn``; a TypeError naming ``fn`` if none."""
  model = getattr(state.apply_fn, "__self__", None)
  if not isinstance(model, nn.Module):
    raise TypeError(
      f"{fn}: state.apply_fn must be a linen model's apply (as create_train_state makes it), "
      f"got {state.apply_fn!r}; use the linen model and its variables instead."
    )
  return model


def _unsettled(where: str, state: TrainState, x: Any) -> str | None:
  """The RunningStatsWarning message for evaluating ``state`` (None: nothing to say)."""
  if not state.batch_stats:
    return None
  updates = int(state.step)
  if updates <= 0:
    return None
  flat = traverse_util.flatten_dict(dict(state.batch_stats))
  layers = {k[:-1] for k in flat if k[-1] == "mean" and (*k[:-1], "var") in flat}
  running = [(flat[(*k, "mean")], flat[(*k, "var")]) for k in sorted(layers)]
  sample = jnp.asarray(x[:2])
  key = (state.apply_fn, sample.shape, str(sample.dtype))
  options = _OPTIONS.get(key) if _hashable(key) else None
  if options is None:
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    options = observed_options(
      lambda: state.apply_fn(variables, sample, train=True, mutable=["batch_stats"])
    )
    if _hashable(key):
      _OPTIONS[key] = options
  return unsettled(where, options, updates, running)


# The layers' options of a model (its apply_fn) and input signature, traced once.
_OPTIONS: dict[Any, list] = {}


def _hashable(key: Any) -> bool:
  try:
    hash(key)
  except TypeError:
    return False
  return True


def evaluate(state: TrainState, x: Any, y: Any, *, batch_size: int = 1024) -> dict[str, float]:
  """Loss and accuracy over a whole data set, with the running statistics.

  Warns (:class:`jaxbn.RunningStatsWarning`) when the running statistics were
  never updated, or have seen fewer updates (``state.step``) than their moving
  average's window ``1 / (1 - momentum)``.

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
  message = _unsettled("evaluate", state, x)
  if message is not None:
    warnings.warn(message, RunningStatsWarning, stacklevel=2)
  return _evaluate(state, x, y, batch_size)


def _evaluate(state: TrainState, x: Any, y: Any, batch_size: int) -> dict[str, float]:
  n = len(x)
  loss = correct = 0.0
  for start in range(0, n, batch_size):
    xb, yb = x[start : start + batch_size], y[start : start + batch_size]
    m = jax.device_get(eval_step(state, (xb, yb)))
    loss += float(m["loss"]) * len(xb)
    correct += float(m["accuracy"]) * len(xb)
  return {"loss": loss / n, "accuracy": correct / n}


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
  eval_every: int | Sequence[int] | None = None,
  progress: bool = False,
  step_fn: Callable[[TrainState, Batch], tuple[TrainState, dict]] | None = None,
  use_running_average: bool = False,
  update_batch_stats: bool = True,
) -> tuple[TrainState, dict[str, list[float]]]:
  """Trains ``state`` on ``(x, y)`` with shuffled mini-batches.

  The loop is :func:`jaxbn.engine.train_loop`, one :func:`train_step` (or
  ``step_fn``) call per batch. Epoch ``e`` visits the examples in the order
  :func:`jaxbn.data.epoch_order` ``(seed, e, len(x))``, in batches of
  ``batch_size`` (the last partial batch dropped; the order of
  :func:`jaxbn.engine.batch_indices`), and the batch of a step is found from
  ``state.step``: training resumed from a checkpoint sees the same data as
  training that never stopped.

  Args:
    state: a :class:`TrainState` (its ``step`` says where in the data to start).
    x: training inputs (NumPy or JAX arrays).
    y: int labels.
    batch_size: examples per step.
    epochs: number of epochs to run (of ``len(x) // batch_size`` steps).
    steps: number of steps to run instead (exactly one of the two).
    seed: seed of the shuffles.
    eval_data: ``(x_test, y_test)``, evaluated with :func:`evaluate` as
      ``eval_every`` says.
    eval_every: with ``eval_data``, when to evaluate, counted in
      ``state.step`` (:func:`jaxbn.engine.eval_points`): an int ``k``
      evaluates at every multiple of ``k`` from the step the run starts at
      (step 0 is before training) and after the last step; a sequence lists
      the steps. Default: each epoch (``len(x) // batch_size``).
    progress: show a tqdm progress bar (off by default: a library call prints nothing).
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
    >>> state, history = training.fit(state, x, y, batch_size=16, epochs=2,
    ...                               eval_data=(x, y))
    >>> int(state.step), len(history['loss']), history['eval_step']
    (8, 8, [0, 4, 8])
  """
  n = len(x)
  if eval_every is None and isinstance(batch_size, int) and 1 <= batch_size <= n:
    eval_every = n // batch_size  # else train_loop names the bad batch_size
  if step_fn is None:
    step_fn = functools.partial(
      train_step, use_running_average=use_running_average, update_batch_stats=update_batch_stats
    )
  start = int(state.step)
  warned = False

  def evaluated(state):
    # Says once per run when the running statistics are not yet the data's.
    nonlocal warned
    assert eval_data is not None
    if not warned:
      message = _unsettled("fit", state, eval_data[0])
      if message is not None:
        warned = True
        warnings.warn(message, RunningStatsWarning, stacklevel=5)
    return _evaluate(state, *eval_data, 1024)

  def segment(idx, evaluate_now, tick):
    nonlocal state
    metrics = []
    for ix in idx:
      state, m = step_fn(state, (x[ix], y[ix]))
      metrics.append(m)
      tick(1)
    return metrics, evaluated(state) if evaluate_now and eval_data is not None else None

  ran = train_loop(
    segment,
    n,
    len(y),
    steps=steps,
    epochs=epochs,
    batch_size=batch_size,
    seed=seed,
    start=start,
    eval_every=eval_every if eval_data is not None else None,
    evaluate_start=None if eval_data is None else lambda: evaluated(state),
    on_eval=lambda step, m: {"test_acc": f"{m['accuracy']:.4f}"},
    progress=progress,
    desc="fit",
    name="fit",
  )
  per_step = jax.device_get([m for metrics in ran.metrics for m in metrics])
  history = {
    "step": list(range(start + 1, start + 1 + len(per_step))),
    "loss": [float(m["loss"]) for m in per_step],
    "accuracy": [float(m["accuracy"]) for m in per_step],
  }
  if eval_data is not None:
    history["eval_step"] = ran.eval_steps
    history["eval_loss"] = [m["loss"] for m in ran.evals]
    history["eval_accuracy"] = [m["accuracy"] for m in ran.evals]
  return state, history
