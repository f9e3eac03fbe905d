"""Inference statistics during training: running averages against the whole training set.

Trains the paper's MLP (three hidden layers of 100 sigmoid units with batch
norm, plain SGD, batch 60) on the bundled 8x8 digits. One parameter
trajectory per seed (training normalizes with batch statistics, so it does not
depend on the running averages) carries two running averages side by side:

- ``ema``: the exponential moving average, ``momentum=0.99``, from mean 0,
  var 1 (flax's default);
- ``warm-up``: the count-aware average, ``bn_train(..., ema_warmup=True)``;

and at several steps the test accuracy is measured with each, and with the
statistics of the whole training set computed by :func:`jaxbn.population_stats`
(``exact``, and Algorithm 2's ``paper`` estimator over batches of 60). The
table gives the mean over seeds and the mean absolute gap to ``exact`` in
accuracy points. Every seed trains at once on :func:`jaxbn.engine.train`;
seed ``s`` draws the weights and the data order (:func:`jaxbn.data.epoch_order`).

Usage:
  python benchmarks/inference_stats.py [--seeds 5] [--steps 2000] [--lr 0.5]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxbn
from jaxbn import data
from jaxbn import engine
from jaxbn.models import apply_mlp
from jaxbn.models import init_mlp

CHECKPOINTS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
BATCH = 60
MOMENTUM = 0.99


def _forward(params, states, x, **bn_kwargs):
  return apply_mlp(params, states, x, train=True, bn_options=jaxbn.BNOptions(**bn_kwargs))


def _apply(params, states, x, *, train):
  """The network with two running averages side by side: ``states = (ema, warm)``."""
  ema, warm = states
  logits, ema = apply_mlp(
    params, ema, x, train=train, bn_options=jaxbn.BNOptions(momentum=MOMENTUM)
  )
  # The same batch through the same parameters, for the warm-up average only.
  _, warm = apply_mlp(
    params, warm, x, train=train, bn_options=jaxbn.BNOptions(momentum=MOMENTUM, ema_warmup=True)
  )
  return logits, (ema, warm)


def run(seeds: int, steps: int, lr: float) -> dict[int, dict[str, list[float]]]:
  ds = data.load_digits().flat()
  checkpoints = [c for c in CHECKPOINTS if c <= steps]
  results = {c: {k: [] for k in ("ema", "warm-up", "exact", "paper")} for c in checkpoints}
  x_te, y_te = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)

  def accuracy(params, states):
    return engine.accuracy(apply_mlp(params, states, x_te, train=False)[0], y_te)

  def evaluate(params, states):
    ema, warm = states
    return {"ema": accuracy(params, ema), "warm-up": accuracy(params, warm)}

  def population(step, params, states):
    # Statistics of the whole training set, each seed in turn (not jittable:
    # population_stats runs over a data iterator).
    for i in range(seeds):
      p, ema = jax.tree.map(lambda t, i=i: t[i], (params, states[0]))
      for est in ("exact", "paper"):
        train_batches = (x for x, _ in data.batches(ds.x_train, ds.y_train, BATCH))
        pop = jaxbn.population_stats(_forward, p, ema, train_batches, estimator=est)
        results[step][est].append(float(accuracy(p, pop)))

  init = functools.partial(init_mlp, in_features=ds.x_train.shape[1])
  params, ema = engine.init_runs(init, range(seeds))
  trained = engine.train(
    _apply,
    params,
    (ema, ema),
    ds.x_train,
    ds.y_train,
    steps=steps,
    batch_size=BATCH,
    learning_rate=lr,
    seed=list(range(seeds)),  # every seed at once
    eval_fn=evaluate,
    eval_every=checkpoints,
    callback=population,
  )
  for j, step in enumerate(trained.eval_steps):
    for name in ("ema", "warm-up"):
      results[step][name] = trained.evals[name][:, j].tolist()
  return results


def table(results: dict[int, dict[str, list[float]]]) -> str:
  lines = [
    "| step | exact | paper (Alg. 2) | ema | warm-up | ema - exact | warm-up - exact |",
    "|---|---|---|---|---|---|---|",
  ]
  for step, row in results.items():
    exact = np.array(row["exact"])
    mean = {k: 100 * np.mean(v) for k, v in row.items()}
    gap = {k: 100 * np.mean(np.abs(np.array(row[k]) - exact)) for k in ("ema", "warm-up")}
    lines.append(
      f"| {step} | {mean['exact']:.1f} | {mean['paper']:.1f} | {mean['ema']:.1f} | "
      f"{mean['warm-up']:.1f} | {gap['ema']:.1f} | {gap['warm-up']:.1f} |"
    )
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--lr", type=float, default=0.5)
  args = parser.parse_args()
  t0 = time.perf_counter()
  results = run(args.seeds, args.steps, args.lr)
  print(
    f"digits, MLP 64-100-100-100-10 sigmoid + BN, SGD lr {args.lr}, batch {BATCH}, "
    f"momentum {MOMENTUM}; test accuracy (%), mean of {args.seeds} seeds; gaps: mean "
    f"|accuracy - exact| in points ({time.perf_counter() - t0:.0f} s)\n"
  )
  print(table(results))


if __name__ == "__main__":
  main()
