"""Running the experiment: every network of a :class:`~jaxbn.reproduce.Config` on the engine.

All runs of one network (every seed and learning rate) train at once with
:func:`jaxbn.engine.train` (``jax.vmap`` over runs of a jitted ``jax.lax.scan``
over steps; the CNN runs one compiled program run by run). The models are
:func:`jaxbn.models.apply_mlp` and :func:`jaxbn.models.apply_cnn`. At every
evaluation, the engine's callback also recomputes each run's statistics over
the whole training set (:func:`jaxbn.population_stats`) and evaluates with
them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import BNOptions
from jaxbn import data as data_lib
from jaxbn import engine
from jaxbn import models
from jaxbn.population import population_stats
from jaxbn.reproduce.claims import check_claims
from jaxbn.reproduce.config import PERCENTILES
from jaxbn.reproduce.config import Config
from jaxbn.reproduce.config import Network
from jaxbn.reproduce.config import load_data
from jaxbn.reproduce.report import machine
from jaxbn.reproduce.report import summarize
from jaxbn.reproduce.report import to_json


@dataclasses.dataclass(frozen=True)
class _Net:
  network: Network
  init: Callable[[jax.Array], tuple[Any, Any]]
  # apply(params, state, x, *, train, **bn_kwargs) -> (logits, new_state, probe)
  apply: Callable[..., tuple[jax.Array, Any, jax.Array]]
  vectorize: bool  # vmap over runs (conv under vmap is slow on CPU: loop instead)

  @property
  def name(self) -> str:
    return self.network.name

  @property
  def use_bn(self) -> bool:
    return self.network.bn


def _gaussian_kernels(params: Any, key: jax.Array, std: float) -> Any:
  """Redraws every ``kernel`` from ``N(0, std)`` (Sec. 4.1: small random Gaussians)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for i, (path, leaf) in enumerate(leaves):
    if getattr(path[-1], "key", None) == "kernel":
      leaf = std * jax.random.normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype)
    out.append(leaf)
  return jax.tree.unflatten(treedef, out)


def _mlp_net(
  in_features: int,
  activation: str,
  use_bn: bool,
  init_std: float,
  bn_options: BNOptions,
) -> _Net:
  def init(key):
    params, state = models.init_mlp(key, in_features, (100, 100, 100), 10, use_bn=use_bn)
    return _gaussian_kernels(params, jax.random.fold_in(key, 1), init_std), state

  def apply(params, state, x, *, train, **bn_kwargs):
    logits, state, pre = models.apply_mlp(
      params,
      state,
      x,
      train=train,
      activation=activation,
      return_preactivations=True,
      bn_options=bn_options._replace(**bn_kwargs),
    )
    return logits, state, pre[-1][:, 0]  # the input to one sigmoid of the last hidden layer

  return _Net(Network("mlp", activation, use_bn), init, apply, vectorize=True)


def _cnn_net(
  image_shape: tuple[int, ...],
  features: tuple[int, ...],
  use_bn: bool,
  bn_options: BNOptions,
) -> _Net:
  h, w, c = image_shape

  def init(key):
    return models.init_cnn(key, c, features, 10, image_size=(h, w), use_bn=use_bn)

  def apply(params, state, x, *, train, **bn_kwargs):
    logits, state, pre = models.apply_cnn(
      params,
      state,
      x,
      train=train,
      return_preactivations=True,
      bn_options=bn_options._replace(**bn_kwargs),
    )
    return logits, state, pre[-1][..., 0].reshape(-1)

  return _Net(Network("cnn", "relu", use_bn), init, apply, vectorize=False)


def _population_evaluator(net: _Net, ds: data_lib.Dataset, evaluate_all: Callable) -> Callable:
  """``f(params, state)``: each run's test accuracy with whole-training-set statistics.

  The statistics are :func:`jaxbn.population_stats` (exact, Algorithm 2) over
  the whole training set as one batch, for every run at once: the training
  forward is vmapped over runs with the data shared, and the step counter is
  common to all runs.
  """

  def forward(params, state, x, **bn_kwargs):
    apply = lambda p, s: net.apply(p, s, x, train=True, **bn_kwargs)[:2]
    # Every statistic per run (axis 0) but the step counter, common to all runs.
    axes = tuple(jax.tree.map(lambda _: 0, s)._replace(step=None) for s in state)
    return jax.vmap(apply, in_axes=(0, axes), out_axes=(0, axes))(params, state)

  x_tr = jnp.asarray(ds.x_train)

  def population_accuracy(params, state):
    common = tuple(s._replace(step=s.step[0]) for s in state)
    pop = population_stats(forward, params, common, [x_tr], total=1)
    runs = len(state[0].step)
    pop = tuple(s._replace(step=jnp.broadcast_to(s.step, (runs,))) for s in pop)
    return np.asarray(evaluate_all(params, pop)[0])

  return population_accuracy


def _first_crossing(acc: np.ndarray, eval_steps: Sequence[int], target: float) -> int | None:
  hit = np.nonzero(acc >= target)[0]
  return int(eval_steps[hit[0]]) if hit.size else None


def _train_net(
  net: _Net,
  ds: data_lib.Dataset,
  lrs: Sequence[float],
  seeds: Sequence[int],
  *,
  steps: int,
  eval_every: int,
  batch_size: int,
  target: float,
  final_evals: int,
  progress: bool,
) -> dict:
  """Trains every (learning rate, seed) run of ``net``; returns its record."""
  runs = [(float(lr), int(s)) for lr in lrs for s in seeds]
  run_seeds = [s for _, s in runs]
  x_te, y_te = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
  q = jnp.asarray(PERCENTILES, jnp.float32)

  def evaluate(params, state):
    logits, _, probe = net.apply(params, state, x_te, train=False)
    return engine.accuracy(logits, y_te), jnp.percentile(probe, q)

  population = []  # per evaluation: (runs,) accuracies with whole-training-set statistics
  callback = None
  if net.use_bn:
    evaluate_all = engine.over_runs(evaluate, vectorize=net.vectorize)
    population_accuracy = _population_evaluator(net, ds, evaluate_all)
    callback = lambda step, params, state: population.append(population_accuracy(params, state))

  params, state = engine.init_runs(net.init, run_seeds, vectorize=net.vectorize)
  trained = engine.train(
    net.apply,
    params,
    state,
    ds.x_train,
    ds.y_train,
    steps=steps,
    batch_size=batch_size,
    learning_rate=[r for r, _ in runs],
    seed=run_seeds,
    eval_fn=evaluate,
    eval_every=eval_every,
    callback=callback,
    vectorize=net.vectorize,
    progress=progress,
    desc=net.name,
  )
  accs, pcts = trained.evals  # (runs, evals), (runs, evals, 3)
  eval_steps = trained.eval_steps
  pop = np.stack(population, axis=1) if population else None  # (runs, evals)
  # The final accuracy: the mean of the last evaluations, never that of step 0.
  last = slice(-min(final_evals, max(1, len(eval_steps) - 1)), None)

  run_records = []
  for i, (r, s) in enumerate(runs):
    run_records.append(
      {
        "lr": r,
        "seed": s,
        "diverged": not bool(np.asarray(trained.finite)[i]),
        "test_accuracy": to_json(accs[i]),
        "percentiles": to_json(pcts[i]),
        "population_accuracy": None if pop is None else to_json(pop[i]),
        "steps_to_target": _first_crossing(accs[i], eval_steps, target),
        "accuracy_running_average": to_json(np.mean(accs[i, last])),
        "accuracy_population": None if pop is None else to_json(np.mean(pop[i, last])),
      }
    )
  return {"name": net.name, "use_bn": net.use_bn, "eval_steps": eval_steps, "runs": run_records}


def reproduce(config: Config) -> dict:
  """Runs every experiment of ``config``; returns the ``results.json`` record.

  Args:
    config: a :class:`~jaxbn.reproduce.Config`.

  Returns:
    ``{'config', 'dataset', 'networks', 'summary', 'claims', 'machine'}``:
    ``networks`` is a list of one record per network (``name``, ``use_bn``,
    ``eval_steps`` and its ``runs``, each with ``lr``, ``seed``,
    ``diverged``, the curves ``test_accuracy``, ``population_accuracy`` (None
    without batch norm) and ``percentiles``, ``steps_to_target``, and the
    final ``accuracy_running_average`` and ``accuracy_population``, means
    over the last ``config.final_evals`` evaluations); ``summary`` is one row
    per network and rate over seeds (:func:`jaxbn.reproduce.summarize`);
    ``claims`` the paper's claims checked on these data
    (:func:`jaxbn.reproduce.check_claims`); ``machine`` where it ran and the
    wall time of the runs (:func:`jaxbn.reproduce.report.machine`).
  """
  start = time.perf_counter()
  config.validate()
  config = config.resolved()
  ds, name = load_data(config)
  common: dict[str, Any] = dict(
    eval_every=config.eval_every,
    batch_size=config.batch_size,
    target=config.target,
    final_evals=config.final_evals,
    progress=config.progress,
  )
  networks = []
  if config.model in ("mlp", "both"):
    flat = ds.flat()
    for activation in config.activations:
      for use_bn in (False, True):
        net = _mlp_net(
          flat.x_train.shape[1], activation, use_bn, config.init_std, config.bn_options
        )
        steps = config.steps_of(net.network)
        networks.append(_train_net(net, flat, config.lrs, config.seeds, steps=steps, **common))
  if config.model in ("cnn", "both"):
    for use_bn in (False, True):
      net = _cnn_net(ds.x_train.shape[1:], config.cnn_features, use_bn, config.bn_options)
      steps = config.steps_of(net.network)
      networks.append(_train_net(net, ds, config.cnn_lrs, config.seeds, steps=steps, **common))
  results = {
    "config": dataclasses.asdict(config),
    "dataset": {
      "name": name,
      "train": len(ds.x_train),
      "test": len(ds.x_test),
      "image_shape": list(ds.x_train.shape[1:]),
    },
    "networks": networks,
  }
  results["summary"] = summarize(results)
  results["claims"] = check_claims(results)
  results["machine"] = machine()
  results["machine"]["wall_time_s"] = round(time.perf_counter() - start, 1)
  return results
