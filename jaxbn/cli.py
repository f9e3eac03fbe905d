"""The ``jaxbn`` command line.

``jaxbn reproduce`` runs the paper's Section 4.1 experiment and its companions
(:mod:`jaxbn.reproduce`), prints a results table and writes
``results.json`` and PNG figures::

    jaxbn reproduce --out results                      # bundled 8x8 digits, the full run
    jaxbn reproduce --quick --out quick                # the same claims on a smaller budget
    jaxbn reproduce --dataset mnist --data mnist.npz --steps 50000 --out mnist
    jaxbn reproduce --quick --momentum 0.9 --out m09   # batch norm's --momentum, --epsilon

``python -m jaxbn`` is the same command. This module imports only the
configuration at load time (``jaxbn --help`` starts fast); the training, with
optax and flax, and the figures, with matplotlib, load when a command runs.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
from collections.abc import Iterable
from collections.abc import Sequence
from dataclasses import fields
from typing import Any
from typing import NoReturn

from jaxbn.extras import MissingExtraError
from jaxbn.reproduce.config import QUICK
from jaxbn.reproduce.config import Config
from jaxbn.reproduce.config import load_data
from jaxbn.reproduce.report import format_report
from jaxbn.reproduce.report import write_report
from jaxbn.reproduce.report import write_results

__all__ = ("main",)


def _spaced(values: Iterable[object]) -> str:
  """Values as one types them after a flag: ``0.01 0.1 2``."""
  return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _default(field: str, text: str | None = None) -> str:
  """``(default: X)``, with ``--quick``'s value where it differs."""
  d, q = getattr(Config(), field), getattr(Config.quick(), field)
  shown = text or (_spaced(d) if isinstance(d, tuple) else f"{d:g}" if isinstance(d, float) else d)
  return f"(default: {shown}{f'; --quick: {q}' if q != d else ''})"


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
  """The parser, and that of ``reproduce`` (for its usage in error messages).

  The flags of configuration fields default to None, meaning "the preset's
  value": :class:`Config`'s, or :meth:`Config.quick`'s with ``--quick``.
  """
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
      "and learning rates, ReLU networks and a CNN likewise; check the paper's claims on the "
      "run's own data; print the report (machine, table, claims) and write results.json, "
      "report.md and PNG figures (Figure 1 a, b, c analogues, learning-rate sweep)."
    ),
  )
  # Each help states its default once, in the form one would type it.
  p.add_argument(
    "--out",
    default="results",
    metavar="DIR",
    help="directory for results.json, report.md and the figures; created, and checked "
    "writable, before any training (default: results)",
  )
  p.add_argument(
    "--quick",
    action="store_true",
    help=f"a smaller budget with the same claims: {_spaced(f'{k}={v}' for k, v in QUICK.items())} "
    "(flags given beside it still apply)",
  )
  p.add_argument("--steps", type=int, help=f"SGD steps per MLP run {_default('steps')}")
  p.add_argument(
    "--cnn-steps",
    type=int,
    default=None,
    help="SGD steps per CNN run (default: --steps, so that every network has the same budget)",
  )
  p.add_argument(
    "--seeds",
    type=int,
    nargs="+",
    help=f"seeds of the weights and data order, trained together {_default('seeds')}",
  )
  p.add_argument(
    "--lrs",
    type=float,
    nargs="+",
    help=f"learning rates of the MLPs {_default('lrs')}",
  )
  p.add_argument(
    "--cnn-lrs",
    type=float,
    nargs="+",
    help=f"learning rates of the CNN {_default('cnn_lrs')}",
  )
  p.add_argument(
    "--fig1-lr",
    type=float,
    default=None,
    help="learning rate of the Figure 1 plots, one of --lrs (default: 2 if swept, else the "
    "largest)",
  )
  p.add_argument(
    "--activations",
    nargs="+",
    choices=("sigmoid", "relu", "tanh"),
    help=f"hidden activations of the MLPs; the Figure 1 plots need sigmoid "
    f"{_default('activations')}",
  )
  p.add_argument(
    "--model",
    choices=("mlp", "cnn", "both"),
    help=f"which networks to train: the MLPs, the CNN or both {_default('model')}",
  )
  p.add_argument(
    "--dataset",
    choices=("digits", "mnist"),
    default=None,
    help="bundled 8x8 digits, or MNIST from --data (default: mnist if --data is given, "
    "else digits)",
  )
  p.add_argument(
    "--data",
    default=None,
    metavar="PATH",
    help="a Keras-layout mnist.npz or a directory with the four MNIST IDX files (nothing "
    "is downloaded)",
  )
  p.add_argument(
    "--eval-every",
    type=int,
    help="evaluate on the test set at step 0, after every this many SGD steps and after the "
    f"last {_default('eval_every')}",
  )
  p.add_argument(
    "--target",
    type=float,
    help=f"test accuracy whose first crossing is reported {_default('target')}",
  )
  p.add_argument(
    "--init-std",
    type=float,
    help=f"std of the MLP's Gaussian initial weights {_default('init_std')}",
  )
  p.add_argument(
    "--momentum",
    type=float,
    help="batch norm's momentum: each step keeps this share of the running averages, in "
    f"[0, 1) {_default('momentum')}",
  )
  p.add_argument(
    "--epsilon",
    type=float,
    help=f"batch norm's epsilon, added to the variance, positive {_default('epsilon')}",
  )
  p.add_argument(
    "--final-evals",
    type=int,
    help="a run's final accuracy is the mean of its last this many evaluations "
    f"{_default('final_evals')}",
  )
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  return parser, p


def _error(sub: argparse.ArgumentParser, flag: str, message: str) -> NoReturn:
  """Exits with status 2: the usage, then one line naming ``flag``."""
  message = " ".join(message.removeprefix("load_mnist: ").split())
  sub.error(f"argument {flag}: {message}")


def _check_out(out: str) -> None:
  """Creates ``out`` and writes and removes a probe file in it; raises ``OSError`` if it can't."""
  if os.path.exists(out) and not os.path.isdir(out):
    # makedirs would say "File exists", which reads as if the directory were fine.
    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), out)
  os.makedirs(out, exist_ok=True)
  fd, probe = tempfile.mkstemp(prefix=".jaxbn-probe-", dir=out)
  try:
    os.write(fd, b"probe")
  finally:
    os.close(fd)
    os.remove(probe)


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``jaxbn`` console script; returns the exit status.

  Arguments, the data file and ``--out`` are all checked before any training:
  a bad one exits with status 2 and one line naming its flag.

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
  # The preset, then every configuration flag given on the command line.
  given = vars(args)
  changes: dict[str, Any] = {
    f.name: tuple(v) if isinstance(v, list) else v
    for f in fields(Config)
    if (v := given.get(f.name)) is not None
  }
  changes.update(dataset=dataset, data=args.data, progress=not args.no_progress)
  config = (Config.quick if args.quick else Config)(**changes)
  # The fields the command line sets, named by their flags in error messages.
  flags = {f.name: "--" + f.name.replace("_", "-") for f in fields(Config) if f.name in given}
  try:
    config.validate(flags=flags)
  except ValueError as e:
    sub.error(str(e))
  if config.dataset == "mnist":
    try:
      load_data(config)  # a bad file fails here, not after minutes of training
    except (ValueError, OSError) as e:
      _error(sub, "--data", str(e))
  try:
    _check_out(args.out)
  except OSError as e:
    _error(sub, "--out", f"cannot create or write to {args.out!r} ({e.strerror or e}).")
  try:
    return _run(config, args.out)
  except MissingExtraError as e:  # a missing extra is one line, not a traceback
    parser.exit(1, f"jaxbn {args.command}: error: {e}\n")


def _run(config: Config, out: str) -> int:
  """Runs the reproduction and writes its report, results and figures into ``out``."""
  # Imported here, not at the top: optax and flax (training), matplotlib (figures).
  from jaxbn.reproduce.figures import write_figures
  from jaxbn.reproduce.run import reproduce

  results = reproduce(config)
  # The report first: it is the result, and should show even if writing files fails.
  report = format_report(results)
  print(f"\n{report}", flush=True)
  paths = [write_results(results, out), write_report(report, out)]
  paths += write_figures(results, out)
  print(f"\nwrote {', '.join(paths)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
