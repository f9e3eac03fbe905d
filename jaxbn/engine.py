"""A plain-JAX training engine: SGD on shuffled mini-batches, evaluated as it goes.

The one training loop of the plain-JAX models (``jaxbn reproduce``, the
benchmarks, the notebooks). A model is two functions:

- ``init(key) -> (params, state)``, e.g. :func:`jaxbn.models.init_mlp` with
  its sizes bound;
- ``apply(params, state, x, *, train) -> (logits, new_state, *extra)``, e.g.
  :func:`jaxbn.models.apply_mlp` with its batch-norm options bound by
  ``functools.partial``. ``state`` is any pytree the forward pass updates
  (the running statistics, or several sets of them side by side).

:func:`train` minimizes the mean softmax cross-entropy of the logits against
int labels with plain SGD (``p - learning_rate * g``) or an optax optimizer.
Step ``t`` of a run with seed ``s`` takes batch ``t % per_epoch`` of epoch
``t // per_epoch``, in the order :func:`jaxbn.data.epoch_order` ``(s, epoch,
n)`` with each epoch's last partial batch dropped (:func:`batch_indices`), as
:func:`jaxbn.training.fit` does. The steps between two evaluations are one
jitted ``jax.lax.scan``, followed in the same program by ``eval_fn``.

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

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbn.data import epoch_order

__all__ = ("Trained", "accuracy", "batch_indices", "init_runs", "over_runs", "train")


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
  finite: np.ndarray


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


def _eval_points(eval_every: int | Sequence[int] | None, steps: int) -> list[int]:
  if eval_every is None:
    return []
  if isinstance(eval_every, (int, np.integer)):
    if eval_every < 1:
      raise ValueError(f"train: eval_every must be a positive integer, got {eval_every}.")
    return sorted({*range(0, steps, int(eval_every)), steps})
  points = sorted({int(s) for s in eval_every})
  if points and not 0 <= points[0] <= points[-1] <= steps:
    raise ValueError(f"train: evaluation steps must lie in [0, {steps}], got {points}.")
  return points


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
    eval_every: when to call ``eval_fn`` and ``callback``: an int ``k`` means
      at step 0, every ``k`` steps and after the last; a sequence lists the
      steps (0 is before training).
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
  n = len(x)
  if len(y) != n:
    raise ValueError(f"train: x and y differ in length: {n} and {len(y)}.")
  if not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"train: steps must be a positive integer, got {steps!r}.")
  if not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size <= n:
    raise ValueError(f"train: batch_size must be an int in [1, {n}] (len(x)), got {batch_size!r}.")
  fixed_tx = isinstance(tx, optax.GradientTransformation)
  if fixed_tx == (learning_rate is not None):
    raise ValueError(
      "train: give learning_rate (plain SGD, or for a tx that is a function of it) or an optax "
      f"optimizer tx, not both or neither; got {learning_rate=} and {tx=}."
    )
  several = not isinstance(seed, (int, np.integer))
  seeds = [int(s) for s in seed] if several else [int(seed)]
  if not seeds:
    raise ValueError("train: seed must be an int or a non-empty sequence of ints.")
  lr = np.asarray(0.0 if learning_rate is None else learning_rate, np.float32)
  if several:
    if lr.ndim > 1 or lr.size not in (1, len(seeds)):
      raise ValueError(
        f"train: {len(seeds)} runs (seeds) need one learning rate or one per run, "
        f"got {lr.tolist()}."
      )
    lr = np.broadcast_to(lr.reshape(-1), (len(seeds),))
  elif lr.ndim:
    raise ValueError(f"train: one run (an int seed) takes one learning rate, got {lr.tolist()}.")
  points = _eval_points(eval_every, steps)

  def make_tx(lr):
    if tx is None:
      return None
    return tx if fixed_tx else tx(lr)

  def init_opt(params, lr):
    t = make_tx(lr)
    if t is None:
      return ()
    with jax.numpy_dtype_promotion("standard"):  # see below
      return t.init(params)

  def chunk(params, state, opt_state, lr, idx, x, y, *, evaluate):
    t = make_tx(lr)

    def step(carry, ix):
      params, state, opt_state = carry

      def loss_fn(p):
        logits, new_state = apply(p, state, x[ix], train=True)[:2]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y[ix]).mean()
        return loss, new_state

      (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      if t is None:
        params = jax.tree.map(lambda p, g: p - lr.astype(g.dtype) * g, params, grads)
      else:
        # optax mixes Python floats with int32 counts (Adam's decay**count),
        # which jax_numpy_dtype_promotion='strict' rejects.
        with jax.numpy_dtype_promotion("standard"):
          updates, opt_state = t.update(grads, opt_state, params)
          params = optax.apply_updates(params, updates)
      return (params, state, opt_state), loss

    (params, state, opt_state), losses = jax.lax.scan(step, (params, state, opt_state), idx)
    evals = eval_fn(params, state) if evaluate else None
    finite = _finite(params) & jnp.all(jnp.isfinite(losses))
    return params, state, opt_state, losses, evals, finite

  def compiled(f, in_axes):
    if several:
      return over_runs(f, vectorize=vectorize, in_axes=in_axes)
    return jax.jit(f)

  def with_eval(evaluate):
    f = lambda *args: chunk(*args, evaluate=evaluate)
    return compiled(f, (0, 0, 0, 0, 0, None, None))

  chunks = {}  # one compiled program with evaluation, one without
  x, y = jnp.asarray(x), jnp.asarray(y)
  lr = jnp.asarray(lr)
  opt_state = compiled(init_opt, 0)(params, lr)
  eval_steps, evals, losses = [], [], []
  ok = np.ones(len(seeds), bool) if several else np.bool_(True)

  def record(step, out):
    eval_steps.append(step)
    if out is not None:
      evals.append(jax.tree.map(np.asarray, out))
    if callback is not None:
      callback(step, params, state)

  bar = None
  if progress:
    from jaxbn.extras import require

    tqdm = require("tqdm.auto", "jaxbn.engine.train(progress=True)").tqdm
    bar = tqdm(total=steps, desc=desc, leave=False, unit="step")
  if points and points[0] == 0:
    record(0, compiled(eval_fn, 0)(params, state) if eval_fn is not None else None)
  start = 0
  for stop in sorted({p for p in points if p > 0} | {steps}):
    evaluate = stop in points and eval_fn is not None
    if evaluate not in chunks:
      chunks[evaluate] = with_eval(evaluate)
    idx = [batch_indices(s, n, stop - start, batch_size, start=start) for s in seeds]
    idx = np.stack(idx) if several else idx[0]
    params, state, opt_state, loss, out, finite = chunks[evaluate](
      params, state, opt_state, lr, idx, x, y
    )
    losses.append(np.asarray(loss))
    ok = ok & np.asarray(finite)
    if stop in points:
      record(stop, out)
    if bar is not None:
      bar.update(stop - start)
    start = stop
  if bar is not None:
    bar.close()
  axis = 1 if several else 0
  stacked = jax.tree.map(lambda *t: np.stack(t, axis), *evals) if evals else None
  return Trained(params, state, opt_state, eval_steps, stacked, np.concatenate(losses, axis=-1), ok)
