"""The figures of a reproduction: Figure 1 (a, b, c) analogues, the learning-rate sweep, the CNN.

The only module of :mod:`jaxbn.reproduce` that imports matplotlib. It draws on
``matplotlib.figure.Figure`` objects, without pyplot, so it neither needs nor
changes a global backend.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
from matplotlib.figure import Figure

from jaxbn.reproduce.config import PERCENTILES
from jaxbn.reproduce.report import _nan


def _network(results: dict, name: str) -> dict | None:
  return next((n for n in results["networks"] if n["name"] == name), None)


def write_figures(results: dict, out: str | os.PathLike) -> list[str]:
  """Writes the PNG figures of ``results`` to ``out`` (created); returns their paths.

  Figures: ``fig1a.png`` (test accuracy against steps of the sigmoid MLP at
  ``fig1_lr``, without and with BN, mean and range over seeds),
  ``fig1b.png`` and ``fig1c.png`` (15th/50th/85th percentiles of the input to
  one sigmoid of the last hidden layer, without and with BN, first seed),
  ``fig1.png`` (the three side by side), ``lr_sweep.png`` (final accuracy
  against learning rate); ``cnn.png`` when the CNN ran.
  """
  os.makedirs(out, exist_ok=True)
  paths = []

  def save(fig, name):
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
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
      fig = Figure(figsize=(4.2, 3.2))
      draw(fig.subplots())
      save(fig, name)
    fig = Figure(figsize=(12, 3.4))
    axes = fig.subplots(1, 3)
    for ax, (_, draw) in zip(axes, panels, strict=True):
      draw(ax)
    y0 = min(ax.get_ylim()[0] for ax in axes[1:])
    y1 = max(ax.get_ylim()[1] for ax in axes[1:])
    for ax in axes[1:]:
      ax.set_ylim(y0, y1)  # (b) and (c) on one scale, as in the paper
    save(fig, "fig1.png")

  fig = Figure(figsize=(5.5, 3.8))
  ax = fig.subplots()
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
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
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
