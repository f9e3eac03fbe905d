"""The training loop of jaxbn, and a plain-JAX engine on it: SGD on shuffled mini-batches.

:func:`train_loop` is the one training loop: it checks the inputs, orders
the data, cuts the run into stretches between evaluations, shows progress
and keeps the history; :func:`train` (below) and :func:`jaxbn.training.fit`
(flax train states) say only how a stretch of steps runs. Both minimize
:func:`cross_entropy` and run optax under :func:`optimizer_promotion`.
Step ``t`` of a run with seed ``s`` takes batch ``t % per_epoch`` of epoch
``t // per_epoch``, in the order :func:`jaxbn.data.epoch_order` ``(s, epoch,
n)`` with each epoch's last partial batch dropped (:func:`batch_indices`).
``eval_every=k`` evaluates at step 0 (before training), after every
``k``-th step and after the last (:func:`eval_points`).

:func:`train` trains the plain-JAX models (``jaxbn reproduce``, the
benchmarks, the notebooks). A model is two functions:

- ``init(key) -> (params, state)``, e.g. :func:`jaxbn.models.init_mlp` with
  its sizes bound;
- ``apply(params, state, x, *, train) -> (logits, new_state, *extra)``, e.g.
  :func:`jaxbn.models.apply_mlp` with its batch-norm options bound by
  ``functools.partial``. ``state`` is any pytree the forward pass updates
  (the running statistics, or several sets of them side by side).

It minimizes the loss with plain SGD (``p - learning_rate * g``) or an optax
optimizer. The steps between two evaluations are one jitted
``jax.lax.scan``, followed in the same program by ``eval_fn``.

Several runs train at once: with ``seed`` a sequence of seeds, ``params`` and
``state`` carry a leading run axis (:func:`init_runs`) and ``learning_rate``
may differ per run; the runs are ``jax.vmap``-ed, or with ``vectorize=False``
one compiled program is called run by run (convolutions under ``vmap`` are
slow on CPU).

Examples:
  Three seeds and three learning rates of a small MLP, at once:

  >>> import functools
  >>> from jaxbn import data, engine, models
  >>> ds = data.load_digits().flat()
  >>> init = functools.partial(models.init_mlp, in_features=64, features=(32,))
  >>> params, state = engine.init_runs(init, seeds=[0, 1, 2])
  >>> def test_accuracy(params, state):
  ...   logits, _ = models.apply_mlp(params, state, ds.x_test, train=False)
  ...   return engine.accuracy(logits, ds.y_test)
  >>> out = engine.train(models.apply_mlp, params, state, ds.x_train, ds.y_train,
  ...                    steps=100, batch_size=60, learning_rate=[0.1, 0.5, 1.0],
  ...                    seed=[0, 1, 2], eval_fn=test_accuracy, eval_every=50)
  >>> out.eval_steps, out.evals.shape, out.losses.shape
  ([0, 50, 100], (3, 3), (3, 100))
  >>> bool((out.evals[:, -1] > 0.8).all()), out.finite.tolist()
  (True, [True, True, True])
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbn.core import BNState
from jaxbn.core import RunningStatsWarning
from jaxbn.data import epoch_order
from jaxbn.diagnosis import observed_options
from jaxbn.diagnosis import unsettled
from jaxbn.diagnosis import window

__all__ = (
  "History",
  "Trained",
  "accuracy",
  "batch_indices",
  "cross_entropy",
  "eval_points",
  "init_runs",
  "optimizer_promotion",
  "over_runs",
  "train",
  "train_loop",
)


class Trained(NamedTuple):
  """What :func:`train` returns; with several runs, every array leads with the run axis.

  Attributes:
    params: the trained parameters.
    state: the final state (running statistics).
    opt_state: the optax state (``()`` for plain SGD).
    eval_steps: the steps after which ``eval_fn`` ran (0: before training).
    evals: ``eval_fn``'s outputs as NumPy arrays, each of shape
      ``(runs, len(eval_steps), ...)`` (without ``runs`` for one run);
      None without ``eval_fn``.
    losses: the training loss of every step, ``(runs, steps)``.
    finite: whether the losses, and the parameters after each stretch of
      steps, stayed finite (one bool per run).
  """

  params: Any
  state: Any
  opt_state: Any
  eval_steps: list[int]
  evals: Any
  losses: np.ndarray
  finite: np.ndarray | np.bool_


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """The share of examples whose largest logit is the label, as a float32 scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbn import engine
    >>> float(engine.accuracy(jnp.array([[2.0, 1.0], [0.0, 3.0]]), jnp.array([0, 0])))
    0.5
  """
  return jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))


def batch_indices(seed: int, n: int, steps: int, batch_size: int, *, start: int = 0) -> np.ndarray:
  """The example indices of steps ``start`` to ``start + steps``, as ``(steps, batch_size)`` int32.

  Epoch ``e`` visits :func:`jaxbn.data.epoch_order` ``(seed, e, n)`` in
  ``n // batch_size`` batches (the rest dropped), so the batch of a step
  depends only on the seed and the step.

  Examples:
    >>> from jaxbn import engine
    >>> idx = engine.batch_indices(0, n=10, steps=3, batch_size=4)
    >>> idx.shape, len(set(idx[:2].ravel().tolist()))  # 2 batches per epoch, 8 distinct
    ((3, 4), 8)
    >>> (engine.batch_indices(0, 10, 1, 4, start=2) == idx[2:]).all()
    np.True_
  """
  per_epoch = n // batch_size
  if per_epoch == 0:
    raise ValueError(f"the training set has {n} examples, fewer than batch_size={batch_size}.")
  if steps < 1:
    return np.zeros((0, batch_size), np.int32)
  first, last = start // per_epoch, (start + steps - 1) // per_epoch
  order = np.concatenate(
    [epoch_order(seed, e, n)[: per_epoch * batch_size] for e in range(first, last + 1)]
  )
  offset = (start - first * per_epoch) * batch_size
  order = order[offset : offset + steps * batch_size]
  return order.reshape(steps, batch_size).astype(np.int32)


def over_runs(f: Callable[..., Any], *, vectorize: bool = True, in_axes: Any = 0) -> Callable:
  """``f`` applied to every run of arguments stacked over runs; outputs stacked likewise.

  Args:
    f: a function of one run's arguments.
    vectorize: ``jax.jit(jax.vmap(f))``; False calls ``jax.jit(f)`` run by run
      (one compilation) and stacks the results, which gives the same numbers
      where ``vmap`` would be slow (convolutions on CPU).
    in_axes: as ``jax.vmap``'s, 0 or None per argument (None: shared by all runs).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbn import engine
    >>> f = lambda a, b: a * b
    >>> engine.over_runs(f, vectorize=False, in_axes=(0, None))(jnp.arange(3.0), 2.0).tolist()
    [0.0, 2.0, 4.0]
  """
  if vectorize:
    return jax.jit(jax.vmap(f, in_axes=in_axes))
  one = jax.jit(f)

  def looped(*args):
    axes = tuple(in_axes) if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
    stacked = [a for a, ax in zip(args, axes, strict=True) if ax == 0 and jax.tree.leaves(a)]
    runs = len(jax.tree.leaves(stacked[0])[0])
    outs = []
    for i in range(runs):
      run_args = [
        jax.tree.map(lambda t, i=i: t[i], a) if ax == 0 else a
        for a, ax in zip(args, axes, strict=True)
      ]
      outs.append(one(*run_args))
    return jax.tree.map(lambda *t: jnp.stack(t), *outs)

  return looped


def init_runs(
  init: Callable[[jax.Array], Any], seeds: Sequence[int], *, vectorize: bool = True
) -> Any:
  """``init(jax.random.key(seed))`` for every seed, stacked over runs.

  Examples:
    >>> import functools
    >>> from jaxbn import engine, models
    >>> init = functools.partial(models.init_mlp, in_features=4, features=(8,))
    >>> params, state = engine.init_runs(init, [0, 1])
    >>> params['hidden'][0]['kernel'].shape, state[0].mean.shape
    ((2, 4, 8), (2, 8))
  """
  keys = jnp.stack([jax.random.key(int(s)) for s in seeds])
  return over_runs(init, vectorize=vectorize)(keys)


def _finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(t)) for t in jax.tree.leaves(tree)]))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """The mean softmax cross-entropy of ``logits`` against int ``labels``, in float32 or wider.

  The loss of every training loop here (:func:`train`, :func:`jaxbn.training.fit`):
  half-precision logits are promoted to float32 first, so the loss and its
  gradient are not rounded to 8 or 11 bits.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbn import engine
    >>> round(float(engine.cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))), 4)  # log 4
    1.3863
  """
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def optimizer_promotion() -> contextlib.AbstractContextManager:
  """The dtype promotion an optax update runs under (a context manager).

  optax's own code mixes Python floats with int32 arrays (e.g. Adam's bias
  correction ``decay**count``), which ``jax_numpy_dtype_promotion='strict'``
  rejects; the updates of :func:`train` and :class:`jaxbn.training.TrainState`
  run under standard promotion so that a strict configuration elsewhere does
  not break the optimizer.
  """
  return jax.numpy_dtype_promotion("standard")


def eval_points(
  eval_every: int | Sequence[int] | None, steps: int, *, start: int = 0, name: str = "engine.train"
) -> list[int]:
  """The step counts at which a run of ``steps`` steps from step ``start`` evaluates.

  The one meaning of ``eval_every`` (:func:`train`, :func:`jaxbn.training.fit`,
  ``jaxbn reproduce --eval-every``): an int ``k`` evaluates at every step
  count in ``[start, start + steps]`` that is a multiple of ``k`` (step 0 is
  before any training) and after the last step; the step counts are those
  of the whole training, so a run resumed from a checkpoint evaluates where
  the run that never stopped did. A sequence lists the step counts; None
  evaluates never.

  Examples:
    >>> from jaxbn import engine
    >>> engine.eval_points(3, 7), engine.eval_points(3, 5, start=4), engine.eval_points([2], 5)
    ([0, 3, 6, 7], [6, 9], [2])
  """
  end = start + steps
  if eval_every is None:
    return []
  if isinstance(eval_every, (int, np.integer)):
    if eval_every < 1:
      raise ValueError(f"{name}: eval_every must be a positive integer, got {eval_every}.")
    k = int(eval_every)
    return sorted({*range(-(-start // k) * k, end + 1, k), end})
  points = sorted({int(s) for s in eval_every})
  if points and not start <= points[0] <= points[-1] <= end:
    raise ValueError(f"{name}: evaluation steps must lie in [{start}, {end}], got {points}.")
  return points


def _progress_bar(total: int, desc: str, name: str) -> Any:
  from jaxbn.extras import require  # tqdm imported only when asked: it warns in some notebooks

  tqdm = require("tqdm.auto", f"jaxbn.{name}(progress=True)").tqdm  # name: "fit", "engine.train"
  return tqdm(total=total, desc=desc, leave=False, unit="step")


class History(NamedTuple):
  """What :func:`train_loop` returns.

  Attributes:
    eval_steps: the step counts at which the run evaluated.
    evals: what evaluated at each of them (``segment``'s or ``evaluate_start``'s output).
    metrics: what ``segment`` returned for each stretch of steps, in order.
  """

  eval_steps: list[int]
  evals: list[Any]
  metrics: list[Any]


def train_loop(
  segment: Callable[..., tuple[Any, Any]],
  n: int,
  labels: int,
  *,
  steps: int | None = None,
  epochs: int | None = None,
  batch_size: int,
  seed: int | Sequence[int] = 0,
  start: int = 0,
  eval_every: int | Sequence[int] | None = None,
  evaluate_start: Callable[[], Any] | None = None,
  on_eval: Callable[[int, Any], dict | None] | None = None,
  progress: bool = False,
  desc: str = "train",
  name: str = "engine.train",
) -> History:
  """The schedule of a training run: input checks, data order, evaluations, progress, history.

  The one training loop of jaxbn: :func:`train` (plain-JAX models, runs at
  once, ``jax.lax.scan`` over steps) and :func:`jaxbn.training.fit` (flax
  train states, a jitted step per batch) are adapters that say how to run a
  stretch of steps. The run covers steps ``start`` to ``start + steps``; step
  ``t`` of seed ``s`` takes batch ``t % per_epoch`` of epoch ``t // per_epoch``
  (:func:`batch_indices`). The run is cut into stretches that end at the
  evaluation points (:func:`eval_points`) and at the last step.

  Args:
    segment: ``segment(idx, evaluate, tick) -> (metrics, evaluation)`` runs
      the steps of one stretch, whose example indices are ``idx``
      (``(steps, batch_size)``, or ``(runs, steps, batch_size)`` for a
      sequence of seeds), evaluating after them when ``evaluate``; it may
      call ``tick(k)`` after ``k`` steps to move the progress bar.
    n: the number of training examples.
    labels: the number of labels (must equal ``n``).
    steps: the number of steps.
    epochs: instead of ``steps``, the number of epochs (of ``n // batch_size``
      steps); exactly one of the two.
    batch_size: examples per step.
    seed: the seed of the data order, or one per run.
    start: the step count the run starts at (e.g. a restored checkpoint's).
    eval_every: when to evaluate (see :func:`eval_points`).
    evaluate_start: evaluates before any step, when ``start`` is an
      evaluation point (None: nothing is evaluated there, the point is kept).
    on_eval: ``on_eval(step, evaluation)``, after each evaluation; a dict
      it returns is shown beside the progress bar.
    progress: show a tqdm progress bar.
    desc: the progress bar's label.
    name: the function named in error messages.

  Returns:
    A :class:`History`.

  Raises:
    ValueError: ``n`` and ``labels`` differ, not exactly one of ``steps``
      and ``epochs``, ``steps``, ``epochs``, ``start`` or ``batch_size`` not
      a fitting int, or evaluation points outside the run.

  Examples:
    A loop that only counts its steps:

    >>> from jaxbn import engine
    >>> def segment(idx, evaluate, tick):
    ...   return len(idx), ("evaluated" if evaluate else None)
    >>> h = engine.train_loop(segment, 10, 10, steps=7, batch_size=4, eval_every=3)
    >>> h.eval_steps, h.metrics
    ([0, 3, 6, 7], [3, 3, 1])
  """
  if labels != n:
    raise ValueError(f"{name}: x and y differ in length: {n} and {labels}.")
  if (epochs is None) == (steps is None):
    raise ValueError(f"{name}: give exactly one of epochs and steps, got {epochs=} and {steps=}.")
  if not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size <= n:
    raise ValueError(f"{name}: batch_size must be an int in [1, {n}] (len(x)), got {batch_size!r}.")
  if epochs is not None:
    if not isinstance(epochs, (int, np.integer)) or epochs < 1:
      raise ValueError(f"{name}: epochs must be a positive integer, got {epochs!r}.")
    steps = epochs * (n // batch_size)
  if not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"{name}: steps must be a positive integer, got {steps!r}.")
  if not isinstance(start, (int, np.integer)) or start < 0:
    raise ValueError(f"{name}: the start step must be a non-negative integer, got {start!r}.")
  points = eval_points(eval_every, steps, start=start, name=name)
  several = not isinstance(seed, (int, np.integer))
  end = start + steps
  history = History([], [], [])
  bar = _progress_bar(steps, desc, name) if progress else None
  tick = (lambda k: None) if bar is None else bar.update

  def record(step, out):
    history.eval_steps.append(step)
    history.evals.append(out)
    shown = on_eval(step, out) if on_eval is not None else None
    if bar is not None and shown:
      bar.set_postfix(shown)

  try:
    if points and points[0] == start:
      record(start, evaluate_start() if evaluate_start is not None else None)
    begin = start
    for stop in sorted({p for p in points if p > start} | {end}):
      idx = [
        batch_indices(int(s), n, stop - begin, batch_size, start=begin) for s in np.ravel(seed)
      ]
      idx = np.stack(idx) if several else idx[0]
      metrics, out = segment(idx, stop in points, tick)
      history.metrics.append(metrics)
      if stop in points:
        record(stop, out)
      if bar is not None:
        bar.update(stop - start - bar.n)
      begin = stop
  finally:
    if bar is not None:
      bar.close()
  return history


def _stats(state: Any) -> list[tuple[Any, Any]]:
  """``(mean, var)`` of every BNState in ``state``."""
  leaves = jax.tree.leaves(state, is_leaf=lambda t: isinstance(t, BNState))
  return [(t.mean, t.var) for t in leaves if isinstance(t, BNState)]


def _options(apply: Callable[..., Any], params: Any, state: Any, x: Any, several: bool) -> list:
  """The options of ``apply``'s batch norms (none without a BNState), traced for shapes."""
  if not _stats(state):
    return []
  if several:  # the first run stands for all: they share the model
    params, state = jax.tree.map(lambda t: t[0], (params, state))
  return observed_options(lambda: apply(params, state, x, train=True))


def train(
  apply: Callable[..., Any],
  params: Any,
  state: Any,
  x: Any,
  y: Any,
  *,
  steps: int,
  batch_size: int,
  learning_rate: float | Sequence[float] | None = None,
  tx: optax.GradientTransformation | Callable[[Any], optax.GradientTransformation] | None = None,
  seed: int | Sequence[int] = 0,
  eval_fn: Callable[[Any, Any], Any] | None = None,
  eval_every: int | Sequence[int] | None = None,
  callback: Callable[[int, Any, Any], None] | None = None,
  vectorize: bool = True,
  progress: bool = False,
  desc: str = "train",
) -> Trained:
  """Trains ``apply``'s model on ``(x, y)`` for ``steps`` mini-batch steps.

  Args:
    apply: ``apply(params, state, x, *, train) -> (logits, new_state, *extra)``;
      called with ``train=True`` on each batch.
    params: the initial parameters (stacked over runs with several seeds).
    state: the initial state, likewise.
    x: training inputs (NumPy or JAX arrays).
    y: int labels.
    steps: number of steps.
    batch_size: examples per step.
    learning_rate: the SGD rate, or one per run.
    tx: instead of plain SGD, an optax optimizer, or a function of the
      learning rate that returns one (e.g. ``optax.adam``; called with each
      run's ``learning_rate``).
    seed: the seed of the data order, or a sequence of seeds: one run each.
    eval_fn: ``eval_fn(params, state) -> pytree of arrays`` (test accuracy,
      percentiles...), jitted with the training steps (and vmapped over runs).
    eval_every: when to call ``eval_fn`` and ``callback`` (:func:`eval_points`):
      an int ``k`` means at step 0 (before training), after every ``k``-th
      step and after the last; a sequence lists the steps.
    callback: ``callback(step, params, state)``, called in Python at every
      evaluation (after ``eval_fn``), e.g. for statistics over a data set.
    vectorize: with several runs, ``jax.vmap`` over them; False runs one
      compiled program run by run (see :func:`over_runs`).
    progress: show a tqdm progress bar (updated at each evaluation).
    desc: the progress bar's label.

  Returns:
    A :class:`Trained`.

  Raises:
    ValueError: a bad size, a missing or doubled optimizer, learning rates
      that do not match the runs, or evaluation steps outside ``[0, steps]``.

  Examples:
    Adam on one run, evaluated at chosen steps:

    >>> import jax, optax
    >>> from jaxbn import data, engine, models
    >>> ds = data.load_digits().flat()
    >>> params, state = models.init_mlp(jax.random.key(0), 64, (32,))
    >>> evaluate = lambda p, s: engine.accuracy(
    ...   models.apply_mlp(p, s, ds.x_test, train=False)[0], ds.y_test)
    >>> out = engine.train(models.apply_mlp, params, state, ds.x_train, ds.y_train,
    ...                    steps=60, batch_size=30, tx=optax.adam(1e-2),
    ...                    eval_fn=evaluate, eval_every=[10, 60])
    >>> out.eval_steps, out.evals.shape, int(out.state[0].step)
    ([10, 60], (2,), 60)
  """
  fixed_tx = isinstance(tx, optax.GradientTransformation)
  if fixed_tx == (learning_rate is not None):
    raise ValueError(
      "engine.train: give learning_rate (plain SGD, or for a tx that is a function of it) or an "
      f"optax optimizer tx, not both or neither; got {learning_rate=} and {tx=}."
    )
  several = not isinstance(seed, (int, np.integer))
  seeds = [int(s) for s in seed] if several else [int(seed)]
  if not seeds:
    raise ValueError("engine.train: seed must be an int or a non-empty sequence of ints.")
  lr = np.asarray(0.0 if learning_rate is None else learning_rate, np.float32)
  if several:
    if lr.ndim > 1 or lr.size not in (1, len(seeds)):
      raise ValueError(
        f"engine.train: {len(seeds)} runs (seeds) need one learning rate or one per run, "
        f"got {lr.tolist()}."
      )
    lr = np.broadcast_to(lr.reshape(-1), (len(seeds),))
  elif lr.ndim:
    raise ValueError(
      f"engine.train: one run (an int seed) takes one learning rate, got {lr.tolist()}."
    )

  def make_tx(lr: Any) -> optax.GradientTransformation | None:
    if tx is None or isinstance(tx, optax.GradientTransformation):  # None, or fixed_tx
      return tx
    return tx(lr)

  def init_opt(params, lr):
    t = make_tx(lr)
    if t is None:
      return ()
    with optimizer_promotion():
      return t.init(params)

  def chunk(params, state, opt_state, lr, idx, x, y, *, evaluate):
    t = make_tx(lr)

    def step(carry, ix):
      params, state, opt_state = carry

      def loss_fn(p):
        logits, new_state = apply(p, state, x[ix], train=True)[:2]
        return cross_entropy(logits, y[ix]), new_state

      (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      if t is None:
        params = jax.tree.map(lambda p, g: p - lr.astype(g.dtype) * g, params, grads)
      else:
        with optimizer_promotion():
          updates, opt_state = t.update(grads, opt_state, params)
          params = optax.apply_updates(params, updates)
      return (params, state, opt_state), loss

    (params, state, opt_state), losses = jax.lax.scan(step, (params, state, opt_state), idx)
    evals = eval_fn(params, state) if evaluate and eval_fn is not None else None
    finite = _finite(params) & jnp.all(jnp.isfinite(losses))
    return params, state, opt_state, losses, evals, finite

  def compiled(f, in_axes):
    if several:
      return over_runs(f, vectorize=vectorize, in_axes=in_axes)
    return jax.jit(f)

  chunks = {}  # one compiled program with evaluation, one without
  x, y = jnp.asarray(x), jnp.asarray(y)
  lr = jnp.asarray(lr)
  opt_state = None  # initialized by the first stretch, after train_loop's checks
  ok = np.ones(len(seeds), bool) if several else np.bool_(True)

  def segment(idx, evaluate, tick):
    nonlocal params, state, opt_state, ok
    evaluate = evaluate and eval_fn is not None
    if evaluate not in chunks:
      f = functools.partial(chunk, evaluate=evaluate)
      chunks[evaluate] = compiled(f, (0, 0, 0, 0, 0, None, None))
    if opt_state is None:
      opt_state = compiled(init_opt, 0)(params, lr)
    params, state, opt_state, loss, out, finite = chunks[evaluate](
      params, state, opt_state, lr, idx, x, y
    )
    ok = ok & np.asarray(finite)
    return np.asarray(loss), None if out is None else jax.tree.map(np.asarray, out)

  def evaluate_start():
    if eval_fn is None:
      return None
    return jax.tree.map(np.asarray, compiled(eval_fn, 0)(params, state))

  options: list | None = None  # the layers' options, traced at the first evaluation
  done = False  # warned, or past every window

  def on_eval(step, out):
    nonlocal options, done
    if not done and eval_fn is not None and step > 0:
      # Says once per run when the running statistics are not yet the data's.
      if options is None:
        options = _options(apply, params, state, x[:batch_size], several)
      running = [jax.tree.map(lambda t: t[0] if several else t, r) for r in _stats(state)]
      message = unsettled("engine.train", options, step, running)
      windows = [w for o in options if (w := window(o)) is not None]
      done = message is not None or step >= max(windows, default=0)
      if message is not None:
        warnings.warn(message, RunningStatsWarning, stacklevel=6)
    if callback is not None:
      callback(step, params, state)

  history = train_loop(
    segment,
    len(x),
    len(y),
    steps=steps,
    batch_size=batch_size,
    seed=seeds if several else seeds[0],
    eval_every=eval_every,
    evaluate_start=evaluate_start,
    on_eval=on_eval,
    progress=progress,
    desc=desc,
  )
  evals = [e for e in history.evals if e is not None]
  axis = 1 if several else 0
  stacked = jax.tree.map(lambda *t: np.stack(t, axis), *evals) if evals else None
  losses = np.concatenate(history.metrics, axis=-1)
  return Trained(params, state, opt_state, history.eval_steps, stacked, losses, ok)
