"""Running the experiment: every network of a :class:`~jaxbn.reproduce.Config` on the engine.

All runs of one network (every seed and learning rate) train at once with
:func:`jaxbn.engine.train` (``jax.vmap`` over runs of a jitted ``jax.lax.scan``
over steps; the CNN runs one compiled program run by run). The models are
:func:`jaxbn.models.apply_mlp` and :func:`jaxbn.models.apply_cnn`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import data as data_lib
from jaxbn import engine
from jaxbn import models
from jaxbn.core import BNOptions
from jaxbn.population import population_stats
from jaxbn.reproduce.config import PERCENTILES
from jaxbn.reproduce.config import Config
from jaxbn.reproduce.config import load_data
from jaxbn.reproduce.report import _clean
from jaxbn.reproduce.report import summarize


@dataclasses.dataclass(frozen=True)
class _Net:
  name: str
  init: Callable[[jax.Array], tuple[Any, Any]]
  # apply(params, state, x, *, train, **bn_kwargs) -> (logits, new_state, probe)
  apply: Callable[..., tuple[jax.Array, Any, jax.Array]]
  use_bn: bool
  vectorize: bool  # vmap over runs (conv under vmap is slow on CPU: loop instead)


def _gaussian_kernels(params: Any, key: jax.Array, std: float) -> Any:
  """Redraws every ``kernel`` from ``N(0, std)`` (Sec. 4.1: small random Gaussians)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for i, (path, leaf) in enumerate(leaves):
    if getattr(path[-1], "key", None) == "kernel":
      leaf = std * jax.random.normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype)
    out.append(leaf)
  return jax.tree.unflatten(treedef, out)


def _mlp_net(in_features: int, activation: str, use_bn: bool, init_std: float) -> _Net:
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
      bn_options=BNOptions(**bn_kwargs),
    )
    return logits, state, pre[-1][:, 0]  # the input to one sigmoid of the last hidden layer

  bn = "BN" if use_bn else "plain"
  return _Net(f"mlp-{activation}-{bn}", init, apply, use_bn, vectorize=True)


def _cnn_net(image_shape: tuple[int, ...], features: tuple[int, ...], use_bn: bool) -> _Net:
  h, w, c = image_shape

  def init(key):
    return models.init_cnn(key, c, features, 10, image_size=(h, w), use_bn=use_bn)

  def apply(params, state, x, *, train, **bn_kwargs):
    logits, state, pre = models.apply_cnn(
      params, state, x, train=train, return_preactivations=True, bn_options=BNOptions(**bn_kwargs)
    )
    return logits, state, pre[-1][..., 0].reshape(-1)

  return _Net(f"cnn-relu-{'BN' if use_bn else 'plain'}", init, apply, use_bn, vectorize=False)


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
    vectorize=net.vectorize,
    progress=progress,
    desc=net.name,
  )
  params, state = trained.params, trained.state
  accs, pcts = trained.evals  # (runs, evals), (runs, evals, 3)
  eval_steps = trained.eval_steps

  population = None
  if net.use_bn:
    # Whole-training-set statistics (Algorithm 2), for every run at once: the
    # forward is vmapped over runs, the data shared; step is common to all runs.
    def forward(params, state, x, **bn_kwargs):
      apply = lambda p, s: net.apply(p, s, x, train=True, **bn_kwargs)[:2]
      axes = tuple(s._replace(mean=0, var=0, count=0, step=None) for s in state)
      return jax.vmap(apply, in_axes=(0, axes), out_axes=(0, axes))(params, state)

    common = tuple(s._replace(step=s.step[0]) for s in state)
    x_tr = jnp.asarray(ds.x_train)
    n_batches = len(ds.x_train) // batch_size
    batches = (x_tr[i * batch_size : (i + 1) * batch_size] for i in range(n_batches))
    pop_state = population_stats(forward, params, common, batches, total=n_batches)
    pop_state = tuple(s._replace(step=jnp.broadcast_to(s.step, (len(runs),))) for s in pop_state)
    evaluate_all = engine.over_runs(evaluate, vectorize=net.vectorize)
    population = np.asarray(evaluate_all(params, pop_state)[0])

  run_records = []
  for i, (r, s) in enumerate(runs):
    hit = np.nonzero(accs[i] >= target)[0]
    run_records.append(
      {
        "lr": r,
        "seed": s,
        "diverged": not bool(trained.finite[i]),
        "test_accuracy": _clean(accs[i]),
        "percentiles": _clean(pcts[i]),
        "steps_to_target": int(eval_steps[hit[0]]) if hit.size else None,
        "accuracy_running_average": _clean(accs[i, -1]),
        "accuracy_population": None if population is None else _clean(population[i]),
      }
    )
  return {"name": net.name, "use_bn": net.use_bn, "eval_steps": eval_steps, "runs": run_records}


def reproduce(config: Config) -> dict:
  """Runs every experiment of ``config``; returns the ``results.json`` record.

  Args:
    config: a :class:`~jaxbn.reproduce.Config`.

  Returns:
    ``{'config', 'dataset', 'networks', 'summary'}``: ``networks`` is a list of
    one record per network (``name``, ``use_bn``, ``eval_steps`` and its
    ``runs``, each with ``lr``, ``seed``, ``diverged``, ``test_accuracy``,
    ``percentiles``, ``steps_to_target``, ``accuracy_running_average``,
    ``accuracy_population``); ``summary`` is one row per network and rate,
    averaged over seeds (see :func:`jaxbn.reproduce.summarize`).
  """
  config.validate()
  if config.fig1_lr is None:
    config = dataclasses.replace(config, fig1_lr=2.0 if 2.0 in config.lrs else max(config.lrs))
  ds, name = load_data(config)
  common = dict(
    eval_every=config.eval_every,
    batch_size=config.batch_size,
    target=config.target,
    progress=config.progress,
  )
  networks = []
  if config.model in ("mlp", "both"):
    flat = ds.flat()
    for activation in config.activations:
      for use_bn in (False, True):
        net = _mlp_net(flat.x_train.shape[1], activation, use_bn, config.init_std)
        networks.append(
          _train_net(net, flat, config.lrs, config.seeds, steps=config.steps, **common)
        )
  if config.model in ("cnn", "both"):
    for use_bn in (False, True):
      net = _cnn_net(ds.x_train.shape[1:], config.cnn_features, use_bn)
      networks.append(
        _train_net(net, ds, config.cnn_lrs, config.seeds, steps=config.cnn_steps_, **common)
      )
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
  return results
