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

Usage:
  python benchmarks/small_batches.py [--seeds 3] [--epochs 6] [--lr 0.1]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbn
from jaxbn import data
from jaxbn.models import apply_mlp
from jaxbn.models import init_mlp

SIZES = (2, 4, 8)
GHOST_BATCH = 32
MOMENTUM = 0.99


def scaled_renorm(total_steps: int) -> jaxbn.Renorm:
  """The paper's schedule (5k / 25k / 40k steps) scaled to a short budget."""
  return jaxbn.renorm_schedule(
    3.0,
    5.0,
    warmup_steps=max(1, round(0.05 * total_steps)),
    rmax_steps=max(2, round(0.40 * total_steps)),
    dmax_steps=max(2, round(0.25 * total_steps)),
  )


def _train(seed: int, ds: data.Dataset, batch: int, epochs: int, lr: float, bn: dict[str, Any]):
  """Trains one MLP; returns (params, running states)."""
  params, states = init_mlp(jax.random.key(seed), ds.x_train.shape[1])
  tx = optax.sgd(lr)
  opt_state = tx.init(params)

  def step(carry, xy):
    params, opt_state, states = carry
    x, y = xy

    def loss_fn(params):
      logits, new_states = apply_mlp(params, states, x, train=True, momentum=MOMENTUM, **bn)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_states

    (_, states), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, states), None

  @jax.jit
  def epoch(carry, xs, ys):
    return jax.lax.scan(step, carry, (xs, ys))[0]

  rng = np.random.default_rng(seed)
  n = len(ds.x_train) - len(ds.x_train) % batch
  carry = (params, opt_state, states)
  for _ in range(epochs):
    idx = rng.permutation(len(ds.x_train))[:n].reshape(-1, batch)
    carry = epoch(carry, ds.x_train[idx], ds.y_train[idx])
  return carry[0], carry[2]


@jax.jit
def _accuracy(params, states, x, y):
  logits, _ = apply_mlp(params, states, x, train=False)
  return jnp.mean(jnp.argmax(logits, -1) == y)


def _recalibrate(params, states, ds: data.Dataset, batch: int, bn: dict[str, Any]):
  ghost = bn.get("ghost_batch_size")

  def forward(params, states, x, **bn_kwargs):
    return apply_mlp(params, states, x, train=True, ghost_batch_size=ghost, **bn_kwargs)

  batches = (x for x, _ in data.batches(ds.x_train, ds.y_train, batch))
  return jaxbn.population_stats(forward, params, states, batches, progress=False)


def configurations(epochs: int, n_train: int):
  """(label, normalization size, optimizer batch, bn options) of every run."""
  for g in SIZES:
    steps = epochs * (n_train // g)
    yield ("plain", g, g, {})
    yield ("renorm", g, g, {"renorm": scaled_renorm(steps)})
    yield ("ghost", g, GHOST_BATCH, {"ghost_batch_size": g})
  yield ("plain", GHOST_BATCH, GHOST_BATCH, {})


def run(seeds: int, epochs: int, lr: float) -> list[dict]:
  ds = data.load_digits().flat()
  rows = []
  for label, g, batch, bn in configurations(epochs, len(ds.x_train)):
    running, recal = [], []
    for seed in range(seeds):
      params, states = _train(seed, ds, batch, epochs, lr, bn)
      running.append(float(_accuracy(params, states, ds.x_test, ds.y_test)))
      pop = _recalibrate(params, states, ds, batch, bn)
      recal.append(float(_accuracy(params, pop, ds.x_test, ds.y_test)))
    rows.append(
      dict(
        method=label,
        g=g,
        batch=batch,
        steps=epochs * (len(ds.x_train) // batch),
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
