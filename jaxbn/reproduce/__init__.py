"""The paper's MNIST experiment (Sec. 4.1, Fig. 1), reproduced at laptop scale.

:func:`reproduce` trains the network of Section 4.1 (three fully connected
hidden layers of 100 sigmoid units, a softmax output, mini-batches of 60,
plain SGD, weights from ``N(0, init_std)``) with and without batch norm, over
several seeds and learning rates, plus ReLU networks (where high rates make
the plain network diverge) and a small CNN with and without batch norm. For
every run it records, at every evaluation:

* the test accuracy with the running averages at inference (Fig. 1(a)), and
  with statistics over the whole training set (:func:`jaxbn.population_stats`,
  Algorithm 2);
* the 15th, 50th and 85th percentiles over the test set of the input to one
  unit of the last hidden layer (a sigmoid in the paper's network, Fig. 1(b, c)).

It then summarizes over seeds (:func:`summarize`) and checks four of the
paper's claims on the run's own data (:func:`check_claims`, each with its
evidence and whether it holds), and records the machine.

The parts: :class:`Config`, :class:`Network` (a network's kind, activation
and batch norm, named ``'mlp-sigmoid-BN'`` in records) and :func:`load_data`
(:mod:`~jaxbn.reproduce.config`);
:func:`reproduce`, the runs on :mod:`jaxbn.engine` (:mod:`~jaxbn.reproduce.run`);
:func:`check_claims` (:mod:`~jaxbn.reproduce.claims`); :func:`summarize`,
:func:`format_report`, :func:`format_table` and :func:`write_results`
(:mod:`~jaxbn.reproduce.report`); :func:`write_figures`
(:mod:`~jaxbn.reproduce.figures`, the only one that imports matplotlib).
``jaxbn reproduce`` (:mod:`jaxbn.cli`) chains them.
:mod:`~jaxbn.reproduce.small_batches` holds the design of the companion
small-batch study (``benchmarks/small_batches.py``). Importing this package
loads only the configuration, the claims and the report; the training and
the figures, with optax, flax and matplotlib, load on first use.

References:
  Ioffe & Szegedy, "Batch Normalization", ICML 2015, arXiv:1502.03167,
  Sec. 4.1 and Figure 1.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING
from typing import Any

from jaxbn.reproduce.claims import check_claims
from jaxbn.reproduce.config import PERCENTILES
from jaxbn.reproduce.config import Config
from jaxbn.reproduce.config import Network
from jaxbn.reproduce.config import load_data
from jaxbn.reproduce.report import format_report
from jaxbn.reproduce.report import format_table
from jaxbn.reproduce.report import summarize
from jaxbn.reproduce.report import write_results

# The lazy names below (_LAZY), for type checkers; at run time __getattr__ imports them.
if TYPE_CHECKING:
  from jaxbn.reproduce.figures import write_figures as write_figures
  from jaxbn.reproduce.run import reproduce as reproduce

# Loaded on first use: they import optax and flax (run) or matplotlib (figures).
_LAZY = {"reproduce": "jaxbn.reproduce.run", "write_figures": "jaxbn.reproduce.figures"}


def __getattr__(name: str) -> Any:
  if name not in _LAZY:
    raise AttributeError(f"module 'jaxbn.reproduce' has no attribute {name!r}")
  value = getattr(importlib.import_module(_LAZY[name]), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_LAZY))


__all__ = (
  "PERCENTILES",
  "Config",
  "Network",
  "check_claims",
  "format_report",
  "format_table",
  "load_data",
  "reproduce",
  "summarize",
  "write_figures",
  "write_results",
)
