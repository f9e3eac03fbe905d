"""The paper's claims, checked on a run's own data.

:func:`check_claims` reads the record of :func:`jaxbn.reproduce.reproduce`
(its ``summary`` rows and per-run curves) and returns one entry per claim:
``{"name", "holds", "evidence"}``, the evidence being the numbers the verdict
rests on. Nothing here trains or knows what a previous run gave, so a claim
that does not hold on some machine says so.

Definitions, over the seeds of one network and learning rate (a row of the
summary):

* a network *passes* the target at the median over seeds of the first
  evaluation step whose test accuracy reaches it; a seed that never reaches
  it counts as infinitely slow, so the row passes when more than half of its
  seeds do;
* a network *trains* at a rate when it passes, and *fails* when it does not;
* the *drift* of the watched sigmoid input (the input of one unit of the last
  hidden layer, Figure 1(b, c)) is, for each of its 15th, 50th and 85th
  percentiles over the test set, the range (largest minus smallest value)
  of that percentile over all evaluations of the run, step 0 included;
  averaged over the three percentiles, then over seeds;
* final accuracies are means over each run's last evaluations (see
  :class:`~jaxbn.reproduce.Config` ``final_evals``), then over seeds;
* two final accuracies *match* when they differ by at most two binomial
  standard errors of the test accuracy (:func:`match_tolerance`), the
  resolution of the test set.

References:
  Ioffe & Szegedy, ICML 2015, arXiv:1502.03167: Fig. 1(a) (claim 1),
  Sec. 4.2.1 (claim 2), Fig. 1(b, c) (claim 3), Sec. 3.1 and Algorithm 2
  (claim 4).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jaxbn.reproduce.config import Network
from jaxbn.reproduce.report import format_number

# The paper's network (Sec. 4.1), without batch norm: claims 1 and 3 are about it.
PAPER_NETWORK = Network("mlp", "sigmoid", bn=False)


def match_tolerance(accuracy: float, n_test: int) -> float:
  """Claim 4's largest gap that still counts as a match: two binomial standard errors.

  Two accuracies measured on ``n_test`` test images cannot be told apart when
  they differ by less than about two standard errors of one of them,
  ``2 sqrt(p (1 - p) / n_test)``: 0.016 at 97% on the 450 digits, 0.0034 on
  MNIST's 10,000 test images.

  Examples:
    >>> from jaxbn.reproduce.claims import match_tolerance
    >>> round(match_tolerance(0.97, 450), 4), round(match_tolerance(0.97, 10_000), 4)
    (0.0161, 0.0034)
  """
  return 2 * math.sqrt(accuracy * (1 - accuracy) / n_test)


def _rows(results: dict) -> dict[tuple[str, float], dict]:
  return {(r["network"], r["lr"]): r for r in results["summary"]}


def _pairs(results: dict) -> list[tuple[str, float, dict, dict]]:
  """``(network family, lr, plain row, BN row)`` for every network trained both ways."""
  rows = _rows(results)
  out = []
  for (name, lr), plain in rows.items():
    net = Network.parse(name)
    bn = (net.with_bn(True).name, lr)
    if not net.bn and bn in rows:
      out.append((net.family, lr, plain, rows[bn]))
  return out


def _steps(row: dict) -> float:
  s = row["steps_to_target"]
  return math.inf if s is None else s


def _says_steps(row: dict) -> str:
  s = row["steps_to_target"]
  return f"{s} steps" if s is not None else "never"


def _claim(name: str, holds: bool | np.bool_, evidence: list[str]) -> dict:
  return {"name": name, "holds": bool(holds), "evidence": "; ".join(evidence) + "."}


def faster(results: dict) -> dict:
  """Claim 1: with BN the paper's network passes the target in fewer steps, at every rate."""
  target = results["config"]["target"]
  steps = results["config"]["steps"]
  pairs = [p for p in _pairs(results) if p[0] == PAPER_NETWORK.family]
  compared = [(lr, p, b) for _, lr, p, b in pairs if min(_steps(p), _steps(b)) < math.inf]
  evidence = [
    f"lr {lr:g}: plain {_says_steps(p)}, BN {_says_steps(b)}"
    + (
      " (neither passes)"
      if max(_steps(p), _steps(b)) == math.inf and _steps(b) == _steps(p)
      else ""
    )
    for _, lr, p, b in pairs
  ]
  holds = bool(compared) and all(_steps(b) < _steps(p) for _, p, b in compared)
  if not compared:
    evidence.append("no rate where either network passes")
  name = (
    f"With BN the paper's sigmoid MLP passes {target:.0%} test accuracy in fewer steps, at "
    f"every rate where either network passes it within {steps} steps (a network that never "
    "passes is the slower one)"
  )
  return _claim(
    name, holds, [f"median first step at {target:.0%} over seeds: " + evidence[0], *evidence[1:]]
  )


def higher_rates(results: dict) -> dict:
  """Claim 2: BN trains at rates where the plain network fails, and never the reverse."""
  target = results["config"]["target"]
  rescued, lost = [], []
  for net, lr, p, b in _pairs(results):
    plain_trains, bn_trains = _steps(p) < math.inf, _steps(b) < math.inf
    text = (
      f"{net} at lr {lr:g} (final accuracy plain {format_number(p['accuracy'])}, BN "
      f"{format_number(b['accuracy'])})"
    )
    if bn_trains and not plain_trains:
      rescued.append(text)
    elif plain_trains and not bn_trains:
      lost.append(text)
  evidence = [f"BN trains, plain fails: {', '.join(rescued) or 'none'}"]
  evidence.append(f"plain trains, BN fails: {', '.join(lost) or 'none'}")
  name = (
    "With BN the networks train at learning rates where the plain networks fail (train: more "
    f"than half the seeds reach {target:.0%}), and never the reverse"
  )
  return _claim(name, bool(rescued) and not lost, evidence)


def drift(run: dict) -> float:
  """The drift of one run's watched sigmoid input (see the module's definitions).

  Examples:
    >>> from jaxbn.reproduce.claims import drift
    >>> drift({"percentiles": [[-1, 0, 1], [-3, 0, 2], [-2, 1, 1]]})  # ranges 2, 1, 1
    1.333...
  """
  pct = np.array(run["percentiles"], float)  # None (a non-finite value) becomes NaN
  if not np.isfinite(pct).all():
    return math.nan
  return float(np.mean(pct.max(0) - pct.min(0)))


def _mean_drift(results: dict, name: str, lr: float) -> float:
  net = next(n for n in results["networks"] if n["name"] == name)
  return float(np.mean([drift(r) for r in net["runs"] if r["lr"] == lr]))


def stable_inputs(results: dict) -> dict:
  """Claim 3: with BN the watched sigmoid input drifts less (at the Figure 1 rate)."""
  fig1_lr = results["config"]["fig1_lr"]
  plain, bn = PAPER_NETWORK.name, PAPER_NETWORK.with_bn(True).name
  names = {n["name"] for n in results["networks"]}
  name = (
    "With BN the input to a sigmoid of the last hidden layer drifts less during training: "
    "the range over training of its 15th, 50th and 85th percentiles over the test set, "
    f"averaged over the three and over seeds, is smaller at the Figure 1 rate ({fig1_lr:g})"
  )
  if not {plain, bn} <= names:
    return _claim(name, False, ["the sigmoid MLP did not run"])
  evidence, holds = [], False
  lrs = dict.fromkeys(r["lr"] for n in results["networks"] if n["name"] == bn for r in n["runs"])
  for lr in lrs:
    d_plain, d_bn = _mean_drift(results, plain, lr), _mean_drift(results, bn, lr)
    mark = " (the Figure 1 rate)" if lr == fig1_lr else ""
    evidence.append(f"lr {lr:g}{mark}: plain {d_plain:.2f}, BN {d_bn:.2f}")
    if lr == fig1_lr:
      holds = d_bn < d_plain
  return _claim(
    name, holds, ["drift, in units of the sigmoid's input: " + evidence[0], *evidence[1:]]
  )


def population_statistics(results: dict) -> dict:
  """Claim 4: population statistics match the running averages at the end, beat them early."""
  name = (
    "Statistics over the whole training set (Algorithm 2) match the running averages at the "
    "end of training (final accuracies within two binomial standard errors of the test "
    "accuracy) and beat them early (higher accuracy at the first evaluation after step 0), "
    "for every BN network at every rate where it trains"
  )
  n_test = results["dataset"]["test"]
  rows = _rows(results)
  end, early, holds = [], [], True
  for net in results["networks"]:
    if not net["use_bn"]:
      continue
    first = 1  # index of the first evaluation after step 0
    for lr in dict.fromkeys(r["lr"] for r in net["runs"]):
      row = rows[(net["name"], lr)]
      if _steps(row) == math.inf:
        continue
      runs = [r for r in net["runs"] if r["lr"] == lr]
      gap = row["accuracy_population"] - row["accuracy"]
      run_acc = np.mean([r["test_accuracy"][first] for r in runs])
      pop_acc = np.mean([r["population_accuracy"][first] for r in runs])
      tol = match_tolerance(row["accuracy"], n_test)
      end.append(
        f"{Network.parse(net['name']).family} lr {lr:g}: {row['accuracy_population']:.3f} vs "
        f"{row['accuracy']:.3f} (±{tol:.3f})"
      )
      early.append(f"{Network.parse(net['name']).family} lr {lr:g}: {pop_acc:.3f} vs {run_acc:.3f}")
      holds &= abs(gap) <= tol and pop_acc > run_acc
  if not end:
    return _claim(name, False, ["no BN network trains"])
  step = results["networks"][0]["eval_steps"][1]
  return _claim(
    name,
    holds,
    [
      "final accuracy, population vs running averages: " + ", ".join(end),
      f"at step {step}: " + ", ".join(early),
    ],
  )


def check_claims(results: dict) -> list[dict[str, Any]]:
  """The four claims of the paper's Sec. 4.1 experiment, checked on ``results``.

  Args:
    results: the record of :func:`jaxbn.reproduce.reproduce` (with its ``summary``).

  Returns:
    ``[{"name", "holds", "evidence"}, ...]``: faster training (Fig. 1(a)),
    higher learning rates (Sec. 4.2.1), stable sigmoid inputs (Fig. 1(b, c)),
    population statistics (Algorithm 2).
  """
  return [
    faster(results),
    higher_rates(results),
    stable_inputs(results),
    population_statistics(results),
  ]
