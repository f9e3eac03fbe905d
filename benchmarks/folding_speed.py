"""Inference speed of a model with batch norm against the same model folded.

For the linen MLP and CNN of :mod:`jaxbn.models`, times ``jax.jit`` inference
(``apply(..., train=False)``: Dense/Conv, then ``bn_infer``) against the folded
model of :func:`jaxbn.fold_linen` (Dense/Conv with a bias, no batch norm).
Then stacks of :class:`jaxbn.models.RepBlock` (RepVGG and MobileOne blocks:
parallel conv + batch-norm branches and an identity batch norm) against the
same stacks reparameterized into one convolution per block
(:func:`jaxbn.fold_branches`). Runs are interleaved (one of each in turn) and
the median of ``--reps`` is reported, so both sides see the same machine load.
Also checks that the two outputs agree.

Usage:
  python benchmarks/folding_speed.py [--reps 50]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import numpy as np

import jaxbn
from jaxbn.models import CNN
from jaxbn.models import MLP
from jaxbn.models import RepBlock

CASES = [
  # name, model, input shape
  ("MLP 64-100-100-100-10, sigmoid, batch 1024", MLP(features=(100, 100, 100)), (1024, 64)),
  ("MLP 784-100-100-100-10, sigmoid, batch 1024", MLP(features=(100, 100, 100)), (1024, 784)),
  ("CNN 32-64 on 8x8x1, batch 256", CNN(features=(32, 64)), (256, 8, 8, 1)),
  ("CNN 32-64 on 28x28x1, batch 256", CNN(features=(32, 64)), (256, 28, 28, 1)),
]


BRANCH_CASES = [
  # name, block, number of blocks, input shape
  ("RepVGG: 4 blocks 3x3+1x1+id, 64 ch, 56x56, batch 8", RepBlock(64), 4, (8, 56, 56, 64)),
  (
    "MobileOne: 4 depthwise blocks, 3 branches 3x3+1x1+id, 128 ch, 28x28, batch 8",
    RepBlock(128, num_conv_branches=3, groups=128),
    4,
    (8, 28, 28, 128),
  ),
]


def _time(fn, *args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def _calibrated(model, variables, x, seed: int):
  """Non-trivial batch-norm parameters, and statistics of the input ``x``."""
  rng = np.random.default_rng(seed)

  def perturb(path, t):
    if "BatchNorm" not in jax.tree_util.keystr(path):
      return t
    return t + np.asarray(rng.uniform(0.5, 1.0, t.shape), np.float32)

  variables = {
    **variables,
    "params": jax.tree_util.tree_map_with_path(perturb, variables["params"]),
  }
  return jaxbn.linen_population_stats(model, variables, [x], train=True, progress=False)


def _compare(name: str, reps: int, with_bn: tuple, folded: tuple, x) -> dict:
  """Interleaved medians of two jitted ``(fn, variables)`` on ``x``, and their difference."""
  (f_bn, v_bn), (f_fold, v_fold) = with_bn, folded
  a, b = f_bn(v_bn, x), f_fold(v_fold, x)  # compile
  err = float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(a))))
  t_bn, t_fold = [], []
  for _ in range(reps):
    t_bn.append(_time(f_bn, v_bn, x))
    t_fold.append(_time(f_fold, v_fold, x))
  m_bn, m_fold = statistics.median(t_bn), statistics.median(t_fold)
  return dict(name=name, bn_ms=1e3 * m_bn, folded_ms=1e3 * m_fold, speedup=m_bn / m_fold, err=err)


def run(reps: int) -> list[dict]:
  rows = []
  for name, model, shape in CASES:
    x = jax.random.uniform(jax.random.key(0), shape)
    variables = _calibrated(model, model.init(jax.random.key(1), x, train=False), x, 0)
    folded, folded_vars = jaxbn.fold_linen(model, variables)
    with_bn = jax.jit(lambda v, x, m=model: m.apply(v, x, train=False))
    without = jax.jit(lambda v, x, m=folded: m.apply(v, x, train=False))
    rows.append(_compare(name, reps, (with_bn, variables), (without, folded_vars), x))
  return rows


def _random_bn(variables, seed: int):
  """Random affine parameters and running statistics in every batch norm of a block."""
  rng = np.random.default_rng(seed)

  def leaf(path, t):
    name = jax.tree_util.keystr(path)
    if "bn" not in name:
      return t
    lo, hi = (0.5, 2.0) if ("var" in name or "'scale'" in name) else (-0.5, 0.5)
    return np.asarray(rng.uniform(lo, hi, t.shape), np.float32)

  return jax.tree_util.tree_map_with_path(leaf, variables)


def run_branches(reps: int) -> list[dict]:
  rows = []
  for name, block, n, shape in BRANCH_CASES:
    x = jax.random.normal(jax.random.key(0), shape)
    vs = [_random_bn(block.init(jax.random.key(i), x, train=False), i) for i in range(n)]
    folded = [block.reparameterize(v) for v in vs]
    deployed = folded[0][0]
    fvs = [v for _, v in folded]

    def stack(m):
      def apply(variables, x):
        for v in variables:
          x = m.apply(v, x, train=False)
        return x

      return jax.jit(apply)

    rows.append(_compare(name, reps, (stack(block), vs), (stack(deployed), fvs), x))
  return rows


def _print(rows: list[dict], first: str, bn: str, folded: str) -> None:
  print(f"| {first} | {bn} | {folded} | speed-up | max rel. difference |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['name']} | {r['bn_ms']:.3f} ms | {r['folded_ms']:.3f} ms | "
      f"{r['speedup']:.2f}x | {r['err']:.1e} |"
    )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--reps", type=int, default=50)
  parser.add_argument("--only", choices=("layers", "branches"), default=None)
  args = parser.parse_args()
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {platform.processor() or ''}")
  print(f"median of {args.reps} interleaved runs, jit, float32\n")
  if args.only != "branches":
    _print(run(args.reps), "model, input", "with batch norm", "folded")
    print()
  if args.only != "layers":
    _print(run_branches(args.reps), "blocks, input", "branches + batch norm", "one conv each")


if __name__ == "__main__":
  main()
