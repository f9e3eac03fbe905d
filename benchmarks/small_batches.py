"""Batch norm with tiny batches: plain, batch renormalization and ghost batches.

The lecture: with batch sizes of 1, 2 or 3 the statistics are lost. On the
bundled 8x8 digits, the paper's MLP (three hidden layers of 100 sigmoid units,
batch norm, plain SGD) is trained with the same budget of examples (``--epochs``
passes over the 1,347 training images, so a smaller batch takes more steps),
for each normalization size ``g`` in 2, 4, 8:

- ``plain``: batch norm on batches of ``g``;
- ``renorm``: batch renormalization (Ioffe 2017) on batches of ``g``, with the
  paper's schedule scaled to the budget (plain batch norm for the first 5% of
  the steps, then ``rmax`` ramps to 3 by 40% and ``dmax`` to 5 by 25%);
- ``ghost``: batches of 32 split into contiguous ghost batches of ``g``
  (Hoffer et al. 2017): the same statistics' noise as ``plain``, but gradients
  averaged over 32 examples. It separates what the small batch does to the
  statistics from what it does to the optimizer.

plus ``plain`` on batches of 32 as the reference. Test accuracy is measured
with the running averages (``momentum=0.99``) and after recalibrating every
layer on the training set with :func:`jaxbn.population_stats` (exact
statistics, the training-mode network run on batches of the training size, as
Algorithm 2 prescribes). Mean and standard deviation over ``--seeds``.

The runs are :func:`jaxbn.reproduce.small_batches.configurations`, each
trained by :func:`jaxbn.engine.train` for every seed at once; seed ``s`` draws
the weights and the data order (:func:`jaxbn.data.epoch_order`).

Usage:
  python benchmarks/small_batches.py [--seeds 3] [--epochs 6] [--lr 0.1]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import numpy as np

import jaxbn
from jaxbn import data
from jaxbn import engine
from jaxbn.models import apply_mlp
from jaxbn.models import init_mlp
from jaxbn.reproduce.small_batches import configurations

MOMENTUM = 0.99


def _test_accuracy(params, states, ds: data.Dataset) -> float:
  logits, _ = apply_mlp(params, states, ds.x_test, train=False)
  return float(engine.accuracy(logits, ds.y_test))


def _recalibrate(params, states, ds: data.Dataset, batch: int, bn: dict):
  ghost = bn.get("ghost_batch_size")

  def forward(params, states, x, **bn_kwargs):
    return apply_mlp(
      params, states, x, train=True, bn_options=jaxbn.BNOptions(ghost_batch_size=ghost, **bn_kwargs)
    )

  batches = (x for x, _ in data.batches(ds.x_train, ds.y_train, batch))
  return jaxbn.population_stats(forward, params, states, batches)


def run(seeds: int, epochs: int, lr: float) -> list[dict]:
  ds = data.load_digits().flat()
  init = functools.partial(init_mlp, in_features=ds.x_train.shape[1])
  rows = []
  for label, g, batch, bn in configurations(epochs, len(ds.x_train)):
    steps = epochs * (len(ds.x_train) // batch)
    params, states = engine.init_runs(init, range(seeds))
    trained = engine.train(
      functools.partial(apply_mlp, bn_options=jaxbn.BNOptions(momentum=MOMENTUM, **bn)),
      params,
      states,
      ds.x_train,
      ds.y_train,
      steps=steps,
      batch_size=batch,
      learning_rate=lr,
      seed=list(range(seeds)),  # every seed at once
    )
    running, recal = [], []
    for i in range(seeds):
      params, states = jax.tree.map(lambda t, i=i: t[i], (trained.params, trained.state))
      running.append(_test_accuracy(params, states, ds))
      recal.append(_test_accuracy(params, _recalibrate(params, states, ds, batch, bn), ds))
    rows.append(
      dict(
        method=label,
        g=g,
        batch=batch,
        steps=steps,
        running=(100 * np.mean(running), 100 * np.std(running)),
        recalibrated=(100 * np.mean(recal), 100 * np.std(recal)),
      )
    )
  return rows


def table(rows: list[dict]) -> str:
  lines = [
    "| normalization batch | method | optimizer batch | steps | test acc., running stats "
    "| test acc., recalibrated |",
    "|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['g']} | {r['method']} | {r['batch']} | {r['steps']} | "
      f"{r['running'][0]:.1f} ± {r['running'][1]:.1f} | "
      f"{r['recalibrated'][0]:.1f} ± {r['recalibrated'][1]:.1f} |"
    )
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--epochs", type=int, default=6)
  parser.add_argument("--lr", type=float, default=0.1)
  args = parser.parse_args()
  t0 = time.perf_counter()
  rows = run(args.seeds, args.epochs, args.lr)
  print(
    f"digits, MLP 64-100-100-100-10 sigmoid + BN, SGD lr {args.lr}, {args.epochs} epochs "
    f"(same examples for every row), momentum {MOMENTUM}; test accuracy (%), mean ± std "
    f"over {args.seeds} seeds ({time.perf_counter() - t0:.0f} s)\n"
  )
  print(table(rows))


if __name__ == "__main__":
  main()
