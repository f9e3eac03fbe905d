"""The ``jaxbn`` command line.

``jaxbn reproduce`` runs the paper's Section 4.1 experiment and its companions
(:mod:`jaxbn.reproduce`), prints a results table and writes
``results.json`` and PNG figures::

    jaxbn reproduce --out results                      # bundled 8x8 digits, ~2 min on 2 cores
    jaxbn reproduce --dataset mnist --data mnist.npz --steps 50000 --out mnist

``python -m jaxbn`` is the same command. This module imports only the
configuration at load time (``jaxbn --help`` starts fast); the training, with
optax and flax, and the figures, with matplotlib, load when a command runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from jaxbn.reproduce.config import Config
from jaxbn.reproduce.config import load_data
from jaxbn.reproduce.report import format_table
from jaxbn.reproduce.report import write_results


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
  """The parser, and that of ``reproduce`` (for its usage in error messages)."""
  defaults = Config()
  parser = argparse.ArgumentParser(
    prog="jaxbn", description="Batch normalization for JAX: reproduce the paper's experiments."
  )
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser(
    "reproduce",
    help="train the paper's Sec. 4.1 network (and a CNN) with and without batch norm",
    description=(
      "Train the network of Ioffe & Szegedy (2015), Sec. 4.1 (3 hidden layers of 100 "
      "sigmoid units, mini-batch 60, plain SGD) with and without batch norm over seeds "
      "and learning rates, ReLU networks and a CNN likewise; print a results table and "
      "write results.json and PNG figures (Figure 1 a, b, c analogues, learning-rate sweep)."
    ),
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument("--out", default="results", help="directory for results.json and figures")
  p.add_argument("--steps", type=int, default=defaults.steps, help="SGD steps per MLP run")
  p.add_argument(
    "--cnn-steps", type=int, default=None, help="SGD steps per CNN run (default: steps / 4)"
  )
  p.add_argument(
    "--seeds", type=int, nargs="+", default=list(defaults.seeds), help="seeds (vectorized)"
  )
  p.add_argument(
    "--lrs", type=float, nargs="+", default=list(defaults.lrs), help="MLP learning rates"
  )
  p.add_argument(
    "--cnn-lrs", type=float, nargs="+", default=list(defaults.cnn_lrs), help="CNN learning rates"
  )
  p.add_argument(
    "--fig1-lr",
    type=float,
    default=None,
    help="learning rate of the Figure 1 plots (default: 2.0 if swept, else the largest)",
  )
  p.add_argument(
    "--activations",
    nargs="+",
    choices=("sigmoid", "relu", "tanh"),
    default=list(defaults.activations),
    help="hidden activations of the MLP",
  )
  p.add_argument("--model", choices=("mlp", "cnn", "both"), default=defaults.model)
  p.add_argument(
    "--dataset",
    choices=("digits", "mnist"),
    default=None,
    help="bundled 8x8 digits, or MNIST from --data (default: mnist if --data is given)",
  )
  p.add_argument(
    "--data",
    default=None,
    metavar="PATH",
    help="a Keras-layout mnist.npz or a directory with the four MNIST IDX files",
  )
  p.add_argument("--eval-every", type=int, default=defaults.eval_every)
  p.add_argument("--target", type=float, default=defaults.target, help="target test accuracy")
  p.add_argument(
    "--init-std", type=float, default=defaults.init_std, help="std of the MLP's initial weights"
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  return parser, p


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``jaxbn`` console script; returns the exit status.

  Examples:
    >>> from jaxbn.cli import main
    >>> main(["reproduce", "--help"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    SystemExit: 0
  """
  parser, sub = _parser()
  args = parser.parse_args(argv)
  dataset = args.dataset or ("mnist" if args.data else "digits")
  if dataset == "digits" and args.data:
    sub.error("--data is for --dataset mnist; the digits are bundled with scikit-learn.")
  config = Config(
    steps=args.steps,
    cnn_steps=args.cnn_steps,
    seeds=tuple(args.seeds),
    lrs=tuple(args.lrs),
    cnn_lrs=tuple(args.cnn_lrs),
    fig1_lr=args.fig1_lr,
    activations=tuple(args.activations),
    model=args.model,
    dataset=dataset,
    data=args.data,
    eval_every=args.eval_every,
    target=args.target,
    init_std=args.init_std,
    progress=not args.no_progress,
  )
  try:
    config.validate()
    if config.dataset == "mnist":
      load_data(config)  # fail on a bad file before any training
  except (ValueError, FileNotFoundError) as e:
    sub.error(str(e))
  # Imported here, not at the top: optax and flax (training), matplotlib (figures).
  from jaxbn.reproduce.figures import write_figures
  from jaxbn.reproduce.run import reproduce

  start = time.perf_counter()
  results = reproduce(config)
  paths = [write_results(results, args.out), *write_figures(results, args.out)]
  ds = results["dataset"]
  print(
    f"\n{ds['name']}: {ds['train']} training and {ds['test']} test images of shape "
    f"{tuple(ds['image_shape'])}; mini-batch {config.batch_size}; seeds {list(config.seeds)}"
  )
  print(format_table(results))
  print(f"\nwrote {', '.join(paths)}")
  print(f"done in {time.perf_counter() - start:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
