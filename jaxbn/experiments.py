"""The paper's MNIST experiment (Sec. 4.1, Fig. 1), reproduced at laptop scale.

:func:`reproduce` trains the network of Section 4.1 (three fully connected
hidden layers of 100 sigmoid units, a softmax output, mini-batches of 60,
plain SGD, weights from ``N(0, init_std)``) with and without batch norm, over
several seeds and learning rates, plus ReLU networks (where high rates make
the plain network diverge) and a small CNN with and without batch norm. For
every run it records:

* the test accuracy every ``eval_every`` steps (Fig. 1(a)), with the running
  averages at inference, and the first step that reaches ``target``;
* the 15th, 50th and 85th percentiles over the test set of the input to one
  sigmoid of the last hidden layer (Fig. 1(b, c));
* the final test accuracy with the running averages and with statistics over
  the whole training set (:func:`jaxbn.population_stats`, Algorithm 2).

All runs of one network (every seed and learning rate) are trained at once:
``jax.vmap`` over runs of a ``jax.lax.scan`` over steps, jitted once. The
models are :func:`jaxbn.models.apply_mlp` and :func:`jaxbn.models.apply_cnn`.

References:
  Ioffe & Szegedy, "Batch Normalization", ICML 2015, arXiv:1502.03167,
  Sec. 4.1 and Figure 1.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxbn import data as data_lib
from jaxbn import models
from jaxbn.population import population_stats

PERCENTILES = (15.0, 50.0, 85.0)


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything :func:`reproduce` needs; the defaults are the documented run.

  Attributes:
    steps: SGD steps of each MLP run.
    cnn_steps: SGD steps of each CNN run (convolutions are costlier on CPU).
    seeds: seeds (weights and data order); runs are vectorized over them.
    lrs: learning rates of the MLP sweep.
    cnn_lrs: learning rates of the CNN runs.
    fig1_lr: the rate of the Figure 1 analogues (one of ``lrs``; by default
      2.0 if it is one, else the largest).
    activations: hidden activations of the MLP sweep (``'sigmoid'`` is the
      paper's, and the Figure 1 plots need it; ``'relu'`` shows the plain
      network failing at high rates).
    model: ``'mlp'``, ``'cnn'`` or ``'both'``.
    dataset: ``'digits'`` (bundled 8x8, offline) or ``'mnist'`` (from ``data``).
    data: path of ``mnist.npz`` or of the IDX directory.
    batch_size: examples per step (the paper's 60).
    init_std: std of the Gaussian initial weights of the MLP.
    cnn_features: channels of the CNN's convolution blocks.
    eval_every: steps between evaluations.
    target: test accuracy whose first crossing is reported.
    progress: show tqdm progress bars.
  """

  steps: int = 2000
  cnn_steps: int | None = None
  seeds: tuple[int, ...] = (0, 1, 2)
  lrs: tuple[float, ...] = (0.01, 0.1, 0.5, 2.0, 5.0)
  cnn_lrs: tuple[float, ...] = (0.1, 1.0)
  fig1_lr: float | None = None
  activations: tuple[str, ...] = ("sigmoid", "relu")
  model: str = "both"
  dataset: str = "digits"
  data: str | None = None
  batch_size: int = 60
  init_std: float = 0.05
  cnn_features: tuple[int, ...] = (8, 16)
  eval_every: int = 50
  target: float = 0.9
  progress: bool = True

  def validate(self) -> Config:
    """Raises ``ValueError`` naming the first bad field; returns ``self``."""
    ints = {"steps": self.steps, "batch_size": self.batch_size, "eval_every": self.eval_every}
    if self.cnn_steps is not None:
      ints["cnn_steps"] = self.cnn_steps
    for name, v in ints.items():
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}.")
    for name in ("seeds", "lrs", "cnn_lrs", "activations"):
      if not getattr(self, name):
        raise ValueError(f"{name} must not be empty.")
    for name in ("lrs", "cnn_lrs"):
      bad = [v for v in getattr(self, name) if not (math.isfinite(v) and v > 0)]
      if bad:
        raise ValueError(f"{name} must be positive finite learning rates, got {bad}.")
    if self.model not in ("mlp", "cnn", "both"):
      raise ValueError(f"model must be 'mlp', 'cnn' or 'both', got {self.model!r}.")
    if self.dataset not in ("digits", "mnist"):
      raise ValueError(f"dataset must be 'digits' or 'mnist', got {self.dataset!r}.")
    if self.dataset == "mnist" and not self.data:
      raise ValueError(
        "dataset 'mnist' needs data=PATH: a Keras-layout mnist.npz or a directory "
        "with the four IDX files (nothing is downloaded)."
      )
    if self.fig1_lr is not None and self.fig1_lr not in self.lrs:
      raise ValueError(f"fig1_lr={self.fig1_lr} must be one of lrs={list(self.lrs)}.")
    if not 0 < self.target <= 1:
      raise ValueError(f"target must be an accuracy in (0, 1], got {self.target}.")
    if self.init_std <= 0:
      raise ValueError(f"init_std must be positive, got {self.init_std}.")
    return self

  @property
  def cnn_steps_(self) -> int:
    return self.cnn_steps if self.cnn_steps is not None else max(1, self.steps // 4)


def load_data(config: Config) -> tuple[data_lib.Dataset, str]:
  """The data set named by ``config`` and a short name for it."""
  if config.dataset == "mnist":
    return data_lib.load_mnist(config.data), "mnist"
  return data_lib.load_digits(), "digits"


# --------------------------------------------------------------------------
# One network, every run at once.


@dataclasses.dataclass(frozen=True)
class _Net:
  name: str
  init: Callable[[jax.Array], tuple[Any, Any]]
  # apply(params, state, x, train, **bn_kwargs) -> (logits, new_state, probe)
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

  def apply(params, state, x, train, **bn_kwargs):
    logits, state, pre = models.apply_mlp(
      params,
      state,
      x,
      train=train,
      activation=activation,
      return_preactivations=True,
      **bn_kwargs,
    )
    return logits, state, pre[-1][:, 0]  # the input to one sigmoid of the last hidden layer

  bn = "BN" if use_bn else "plain"
  return _Net(f"mlp-{activation}-{bn}", init, apply, use_bn, vectorize=True)


def _cnn_net(image_shape: tuple[int, ...], features: tuple[int, ...], use_bn: bool) -> _Net:
  h, w, c = image_shape

  def init(key):
    return models.init_cnn(key, c, features, 10, image_size=(h, w), use_bn=use_bn)

  def apply(params, state, x, train, **bn_kwargs):
    logits, state, pre = models.apply_cnn(
      params, state, x, train=train, return_preactivations=True, **bn_kwargs
    )
    return logits, state, pre[-1][..., 0].reshape(-1)

  return _Net(f"cnn-relu-{'BN' if use_bn else 'plain'}", init, apply, use_bn, vectorize=False)


def _batch_indices(seed: int, n: int, steps: int, batch_size: int) -> np.ndarray:
  """``(steps, batch_size)`` indices of shuffled epochs, as :func:`jaxbn.training.fit`."""
  per_epoch = n // batch_size
  if per_epoch == 0:
    raise ValueError(f"the training set has {n} examples, fewer than batch_size={batch_size}.")
  epochs = -(-steps // per_epoch)
  order = [data_lib.epoch_order(seed, e, n)[: per_epoch * batch_size] for e in range(epochs)]
  return np.concatenate(order)[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def _finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(t)) for t in jax.tree.leaves(tree)]))


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
  x_tr, y_tr = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  x_te, y_te = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
  idx = np.stack([_batch_indices(s, len(ds.x_train), steps, batch_size) for _, s in runs])
  lr = jnp.asarray([r for r, _ in runs], jnp.float32)
  q = jnp.asarray(PERCENTILES, jnp.float32)

  def evaluate(params, state):
    logits, _, probe = net.apply(params, state, x_te, False)
    accuracy = jnp.mean((jnp.argmax(logits, -1) == y_te).astype(jnp.float32))
    return accuracy, jnp.percentile(probe, q)

  def chunk(params, state, lr, idx):
    def step(carry, ix):
      params, state = carry

      def loss_fn(p):
        logits, new_state, _ = net.apply(p, state, x_tr[ix], True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_tr[ix]).mean()
        return loss, new_state

      (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      params = jax.tree.map(lambda p, g: p - lr.astype(g.dtype) * g, params, grads)
      return (params, state), loss

    (params, state), losses = jax.lax.scan(step, (params, state), idx)
    accuracy, pct = evaluate(params, state)
    return params, state, accuracy, pct, _finite(params) & jnp.all(jnp.isfinite(losses))

  keys = jnp.stack([jax.random.key(s) for _, s in runs])
  if net.vectorize:
    params, state = jax.jit(jax.vmap(net.init))(keys)
    evaluate_all = jax.jit(jax.vmap(evaluate))
    chunk_all = jax.jit(jax.vmap(chunk))
  else:
    # One compiled step, called run by run; results stacked as vmap would.
    init_one, eval_one, chunk_one = jax.jit(net.init), jax.jit(evaluate), jax.jit(chunk)

    def stacked(f, *args):
      outs = [f(*(jax.tree.map(lambda t, i=i: t[i], a) for a in args)) for i in range(len(runs))]
      return jax.tree.map(lambda *t: jnp.stack(t), *outs)

    params, state = stacked(init_one, keys)
    evaluate_all = functools.partial(stacked, eval_one)
    chunk_all = functools.partial(stacked, chunk_one)

  accuracy, pct = evaluate_all(params, state)
  eval_steps, accs, pcts = [0], [np.asarray(accuracy)], [np.asarray(pct)]
  ok = np.ones(len(runs), bool)
  bar = tqdm(total=steps, desc=net.name, disable=not progress, leave=False, unit="step")
  for start in range(0, steps, eval_every):
    stop = min(start + eval_every, steps)
    params, state, accuracy, pct, finite = chunk_all(params, state, lr, idx[:, start:stop])
    eval_steps.append(stop)
    accs.append(np.asarray(accuracy))
    pcts.append(np.asarray(pct))
    ok &= np.asarray(finite)
    bar.update(stop - start)
  bar.close()
  accs_arr = np.stack(accs, 1)  # (runs, evals)
  pcts_arr = np.stack(pcts, 1)  # (runs, evals, 3)

  population = None
  if net.use_bn:
    # Whole-training-set statistics (Algorithm 2), for every run at once: the
    # forward is vmapped over runs, the data shared; step is common to all runs.
    def forward(params, state, x, **bn_kwargs):
      apply = lambda p, s: net.apply(p, s, x, True, **bn_kwargs)[:2]
      axes = tuple(s._replace(mean=0, var=0, count=0, step=None) for s in state)
      return jax.vmap(apply, in_axes=(0, axes), out_axes=(0, axes))(params, state)

    common = tuple(s._replace(step=s.step[0]) for s in state)
    n_batches = len(ds.x_train) // batch_size
    batches = (x_tr[i * batch_size : (i + 1) * batch_size] for i in range(n_batches))
    pop_state = population_stats(forward, params, common, batches, progress=False, total=n_batches)
    pop_state = tuple(s._replace(step=jnp.broadcast_to(s.step, lr.shape)) for s in pop_state)
    population = np.asarray(evaluate_all(params, pop_state)[0])

  run_records = []
  for i, (r, s) in enumerate(runs):
    hit = np.nonzero(accs_arr[i] >= target)[0]
    run_records.append(
      {
        "lr": r,
        "seed": s,
        "diverged": not bool(ok[i]),
        "test_accuracy": _clean(accs_arr[i]),
        "percentiles": _clean(pcts_arr[i]),
        "steps_to_target": int(eval_steps[hit[0]]) if hit.size else None,
        "accuracy_running_average": _clean(accs_arr[i, -1]),
        "accuracy_population": None if population is None else _clean(population[i]),
      }
    )
  return {"name": net.name, "use_bn": net.use_bn, "eval_steps": eval_steps, "runs": run_records}


def _clean(a: Any) -> Any:
  """NumPy to JSON: floats rounded to 4 digits, non-finite values as None."""
  a = np.asarray(a, np.float64)
  if a.ndim == 0:
    return round(float(a), 4) if np.isfinite(a) else None
  return [_clean(t) for t in a]


# --------------------------------------------------------------------------
# The whole experiment.


def reproduce(config: Config) -> dict:
  """Runs every experiment of ``config``; returns the ``results.json`` record.

  Args:
    config: a :class:`Config`.

  Returns:
    ``{'config', 'dataset', 'networks', 'summary'}``: ``networks`` is a list of
    one record per network (``name``, ``use_bn``, ``eval_steps`` and its
    ``runs``, each with ``lr``, ``seed``, ``diverged``, ``test_accuracy``,
    ``percentiles``, ``steps_to_target``, ``accuracy_running_average``,
    ``accuracy_population``); ``summary`` is one row per network and rate,
    averaged over seeds (see :func:`summarize`).

  Examples:
    Checking a configuration (``jaxbn reproduce`` runs the default one):

    >>> from jaxbn import experiments
    >>> config = experiments.Config(steps=10, seeds=(0,), lrs=(0.5,), model="mlp",
    ...                             activations=("sigmoid",), eval_every=5, progress=False)
    >>> config.validate().fig1_lr is None  # resolved by reproduce: the largest rate
    True
    >>> experiments.Config(lrs=(0.1,), fig1_lr=2.0).validate()
    Traceback (most recent call last):
    ...
    ValueError: fig1_lr=2.0 must be one of lrs=[0.1].
  """
  config.validate()
  if config.fig1_lr is None:
    config = dataclasses.replace(config, fig1_lr=2.0 if 2.0 in config.lrs else max(config.lrs))
  ds, name = load_data(config)
  networks = []
  if config.model in ("mlp", "both"):
    flat = ds.flat()
    for activation in config.activations:
      for use_bn in (False, True):
        net = _mlp_net(flat.x_train.shape[1], activation, use_bn, config.init_std)
        networks.append(
          _train_net(
            net,
            flat,
            config.lrs,
            config.seeds,
            steps=config.steps,
            eval_every=config.eval_every,
            batch_size=config.batch_size,
            target=config.target,
            progress=config.progress,
          )
        )
  if config.model in ("cnn", "both"):
    for use_bn in (False, True):
      net = _cnn_net(ds.x_train.shape[1:], config.cnn_features, use_bn)
      networks.append(
        _train_net(
          net,
          ds,
          config.cnn_lrs,
          config.seeds,
          steps=config.cnn_steps_,
          eval_every=config.eval_every,
          batch_size=config.batch_size,
          target=config.target,
          progress=config.progress,
        )
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


def summarize(results: dict) -> list[dict]:
  """One row per network and learning rate, over seeds.

  Each row has ``network``, ``lr``, ``runs``, ``diverged`` (how many),
  ``accuracy`` and ``accuracy_std`` (final test accuracy with running
  averages; diverged runs count as their chance-level accuracy),
  ``reached_target`` (how many runs), ``steps_to_target`` (median over the
  runs that reached it, or None) and ``accuracy_population`` (mean, with
  whole-training-set statistics; None without batch norm).
  """
  rows = []
  for net in results["networks"]:
    for lr in dict.fromkeys(r["lr"] for r in net["runs"]):
      runs = [r for r in net["runs"] if r["lr"] == lr]
      final = np.array([_nan(r["accuracy_running_average"]) for r in runs])
      steps = [r["steps_to_target"] for r in runs if r["steps_to_target"] is not None]
      pop = [_nan(r["accuracy_population"]) for r in runs]
      rows.append(
        {
          "network": net["name"],
          "lr": lr,
          "runs": len(runs),
          "diverged": sum(r["diverged"] for r in runs),
          "accuracy": _clean(np.nanmean(final)) if np.isfinite(final).any() else None,
          "accuracy_std": _clean(np.nanstd(final)) if np.isfinite(final).any() else None,
          "reached_target": len(steps),
          "steps_to_target": int(np.median(steps)) if steps else None,
          "accuracy_population": _clean(np.nanmean(pop)) if net["use_bn"] else None,
        }
      )
  return rows


def _nan(v: float | None) -> float:
  return math.nan if v is None else v


def format_table(results: dict) -> str:
  """The summary as a Markdown table: each network and rate, without and with BN."""
  target = results["config"]["target"]
  rows = {(r["network"], r["lr"]): r for r in results["summary"]}
  header = (
    "| network | lr | accuracy, plain | accuracy, BN | "
    f"steps to {target:.0%}, plain | steps to {target:.0%}, BN | BN, population stats |"
  )
  lines = [header, "|" + "---|" * 7]
  for (name, lr), plain in rows.items():
    if not name.endswith("-plain"):
      continue
    base = name[: -len("-plain")]
    bn = rows.get((base + "-BN", lr))
    lines.append(
      f"| {base} | {lr:g} | {_acc(plain)} | {_acc(bn)} | {_steps(plain)} | {_steps(bn)} | "
      f"{_fmt(bn and bn['accuracy_population'])} |"
    )
  return "\n".join(lines)


def _fmt(v: float | None) -> str:
  return "-" if v is None else f"{v:.3f}"


def _acc(row: dict | None) -> str:
  if row is None:
    return "-"
  text = f"{_fmt(row['accuracy'])} ± {_fmt(row['accuracy_std'])}"
  if row["diverged"]:
    text += f" ({row['diverged']}/{row['runs']} diverged)"
  return text


def _steps(row: dict | None) -> str:
  if row is None or row["steps_to_target"] is None:
    return "never" if row is not None else "-"
  if row["reached_target"] < row["runs"]:
    return f"{row['steps_to_target']} ({row['reached_target']}/{row['runs']} runs)"
  return str(row["steps_to_target"])


# --------------------------------------------------------------------------
# Outputs.


def _network(results: dict, name: str) -> dict | None:
  return next((n for n in results["networks"] if n["name"] == name), None)


def write_outputs(results: dict, out: str | os.PathLike) -> list[str]:
  """Writes ``results.json`` and the PNG figures to ``out``; returns their paths.

  Figures: ``fig1a.png`` (test accuracy against steps of the sigmoid MLP at
  ``fig1_lr``, without and with BN, mean and range over seeds),
  ``fig1b.png`` and ``fig1c.png`` (15th/50th/85th percentiles of the input to
  one sigmoid of the last hidden layer, without and with BN, first seed),
  ``fig1.png`` (the three side by side), ``lr_sweep.png`` (final accuracy
  against learning rate); ``cnn.png`` when the CNN ran.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(out, exist_ok=True)
  paths = [os.path.join(out, "results.json")]
  with open(paths[0], "w") as f:
    json.dump(results, f, indent=1)

  def save(fig, name):
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    paths.append(path)

  lr = results["config"]["fig1_lr"]
  plain, bn = _network(results, "mlp-sigmoid-plain"), _network(results, "mlp-sigmoid-BN")
  if plain is not None and bn is not None:
    panels = [
      ("fig1a.png", functools.partial(_plot_accuracy, nets=(plain, bn), lr=lr)),
      ("fig1b.png", functools.partial(_plot_percentiles, net=plain, lr=lr)),
      ("fig1c.png", functools.partial(_plot_percentiles, net=bn, lr=lr)),
    ]
    for name, draw in panels:
      fig, ax = plt.subplots(figsize=(4.2, 3.2))
      draw(ax)
      save(fig, name)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, (_, draw) in zip(axes, panels, strict=True):
      draw(ax)
    y0 = min(ax.get_ylim()[0] for ax in axes[1:])
    y1 = max(ax.get_ylim()[1] for ax in axes[1:])
    for ax in axes[1:]:
      ax.set_ylim(y0, y1)  # (b) and (c) on one scale, as in the paper
    save(fig, "fig1.png")

  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for net in results["networks"]:
    rows = [r for r in results["summary"] if r["network"] == net["name"]]
    x = [r["lr"] for r in rows]
    y = [_nan(r["accuracy"]) for r in rows]
    style = "-" if net["use_bn"] else "--"
    ax.plot(x, y, style, marker="o", label=net["name"])
  ax.set_xscale("log")
  ax.set_xlabel("learning rate")
  ax.set_ylabel("final test accuracy (mean over seeds)")
  ax.set_ylim(0, 1.02)
  ax.legend(fontsize=7)
  ax.set_title("learning-rate sweep")
  save(fig, "lr_sweep.png")

  cnns = [n for n in results["networks"] if n["name"].startswith("cnn")]
  if cnns:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for net in cnns:
      for r in dict.fromkeys(run["lr"] for run in net["runs"]):
        _plot_mean_accuracy(ax, net, r, label=f"{net['name']}, lr {r:g}")
    ax.set_xlabel("steps")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7)
    ax.set_title("CNN with and without batch norm")
    save(fig, "cnn.png")
  return paths


def _plot_mean_accuracy(ax, net: dict, lr: float, label: str) -> None:
  acc = np.array([[_nan(a) for a in r["test_accuracy"]] for r in net["runs"] if r["lr"] == lr])
  steps = net["eval_steps"]
  line = ax.plot(steps, np.nanmean(acc, 0), label=label)[0]
  ax.fill_between(steps, np.nanmin(acc, 0), np.nanmax(acc, 0), color=line.get_color(), alpha=0.2)


def _plot_accuracy(ax, nets: tuple[dict, dict], lr: float) -> None:
  for net, label in zip(nets, ("without BN", "with BN"), strict=True):
    _plot_mean_accuracy(ax, net, lr, label)
  ax.set_xlabel("steps")
  ax.set_ylabel("test accuracy")
  ax.set_ylim(0, 1.02)
  ax.legend()
  ax.set_title(f"(a) sigmoid MLP, lr {lr:g}")


def _plot_percentiles(ax, net: dict, lr: float) -> None:
  run = next(r for r in net["runs"] if r["lr"] == lr)
  pct = np.array(
    [[_nan(v) for v in p] if p is not None else [math.nan] * 3 for p in run["percentiles"]]
  )
  for j, q in enumerate(PERCENTILES):
    ax.plot(net["eval_steps"], pct[:, j], color="k", lw=1 + (j == 1), label=f"{q:.0f}th")
  ax.set_xlabel("steps")
  ax.set_ylabel("input to a last-layer sigmoid")
  which = "(c) with BN" if net["use_bn"] else "(b) without BN"
  ax.set_title(f"{which}, seed {run['seed']}")
