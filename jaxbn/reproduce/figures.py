"""The figures of a reproduction: Figure 1 (a, b, c) analogues, the learning-rate sweep, the CNN.

The only module of :mod:`jaxbn.reproduce` that imports matplotlib. It draws on
``matplotlib.figure.Figure`` objects, without pyplot, so it neither needs nor
changes a global backend.

Conventions, the same in every figure: one colour per network (sigmoid MLP,
ReLU MLP, CNN), a solid line with batch norm and a dashed one without; a
line is the mean over seeds and its band one standard deviation either side
(the spread the tables give as ±); every panel has its legend; panels that
are compared share their scales.
"""

from __future__ import annotations

import os

import numpy as np

from jaxbn.extras import require
from jaxbn.reproduce.claims import PAPER_NETWORK
from jaxbn.reproduce.config import PERCENTILES
from jaxbn.reproduce.config import Config
from jaxbn.reproduce.config import Network

Figure = require("matplotlib.figure", "jaxbn.reproduce.write_figures").Figure

_COLOURS = {"sigmoid MLP": "tab:blue", "ReLU MLP": "tab:orange", "tanh MLP": "tab:purple"}


def _colour(name: str) -> str:
  return _COLOURS.get(Network.parse(name).title, "tab:green")


def _label(net: dict) -> str:
  return f"{Network.parse(net['name']).title}, {'with' if net['use_bn'] else 'without'} BN"


def _style(net: dict) -> str:
  return "-" if net["use_bn"] else "--"


def _network(results: dict, name: str) -> dict | None:
  return next((n for n in results["networks"] if n["name"] == name), None)


def _curves(net: dict, lr: float, key: str) -> np.ndarray:
  """``(seeds, evals, ...)``: one run's curve ``key`` per seed at ``lr`` (None as NaN)."""
  return np.array([r[key] for r in net["runs"] if r["lr"] == lr], float)


def _band(ax, steps, curves: np.ndarray, *, colour: str, style: str, label: str, **kw) -> None:
  """The mean over seeds, and a band of one standard deviation either side."""
  with np.errstate(invalid="ignore"):
    mean, std = np.nanmean(curves, 0), np.nanstd(curves, 0)
  ax.plot(steps, mean, style, color=colour, label=label, **{"lw": 1.6, **kw})
  ax.fill_between(steps, mean - std, mean + std, color=colour, alpha=0.15, lw=0)


def _seeds(results: dict) -> int:
  return len(results["config"]["seeds"])


def write_figures(results: dict, out: str | os.PathLike) -> list[str]:
  """Writes the PNG figures of ``results`` to ``out`` (created); returns their paths.

  Figures, each line a mean over seeds with a band of one standard deviation:

  * ``fig1a.png``: test accuracy against steps of the sigmoid MLP at
    ``fig1_lr``, without and with BN;
  * ``fig1b.png``, ``fig1c.png``: the 15th, 50th and 85th percentiles of the
    input to one sigmoid of the last hidden layer, without and with BN, on
    one scale; ``fig1.png``: the three side by side;
  * ``inference.png``: test accuracy of the BN sigmoid MLP at ``fig1_lr``
    with running averages and with whole-training-set statistics;
  * ``lr_sweep.png``: final accuracy against learning rate, every network;
  * ``cnn.png`` when the CNN ran: its accuracy against steps, one panel per rate.
  """
  os.makedirs(out, exist_ok=True)
  paths = []

  def save(fig, name):
    path = os.path.join(out, name)
    fig.savefig(path, dpi=90)
    paths.append(path)

  lr = results["config"]["fig1_lr"]
  plain, bn = (
    _network(results, PAPER_NETWORK.name),
    _network(results, PAPER_NETWORK.with_bn(True).name),
  )
  if plain is not None and bn is not None:
    # (b) and (c) on one scale, as in the paper, in fig1.png and in their own files.
    pct = np.concatenate([_curves(plain, lr, "percentiles"), _curves(bn, lr, "percentiles")])
    finite = pct[np.isfinite(pct)]
    pad = 0.05 * (finite.max() - finite.min() + 1e-6) if finite.size else 0.1
    ylim = (finite.min() - pad, finite.max() + pad) if finite.size else None
    panels = [
      ("fig1a.png", lambda ax: _plot_accuracy(ax, results, (plain, bn), lr)),
      ("fig1b.png", lambda ax: _plot_percentiles(ax, results, plain, lr, ylim)),
      ("fig1c.png", lambda ax: _plot_percentiles(ax, results, bn, lr, ylim)),
    ]
    for name, draw in panels:
      fig = Figure(figsize=(4.6, 3.6), layout="constrained")
      draw(fig.subplots())
      save(fig, name)
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    for ax, (_, draw) in zip(fig.subplots(1, 3), panels, strict=True):
      draw(ax)
    save(fig, "fig1.png")

  if bn is not None:
    fig = Figure(figsize=(5.6, 3.8), layout="constrained")
    _plot_inference(fig.subplots(), results, bn, lr)
    save(fig, "inference.png")

  fig = Figure(figsize=(7.4, 4.0), layout="constrained")
  _plot_sweep(fig.subplots(), results)
  save(fig, "lr_sweep.png")

  cnns = [n for n in results["networks"] if Network.parse(n["name"]).kind == "cnn"]
  if cnns:
    lrs = list(dict.fromkeys(run["lr"] for run in cnns[0]["runs"]))
    fig = Figure(figsize=(4.6 * len(lrs), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(lrs), sharey=True))
    for ax, r in zip(axes, lrs, strict=True):
      for net in cnns:
        _band(
          ax,
          net["eval_steps"],
          _curves(net, r, "test_accuracy"),
          colour=_colour(net["name"]),
          style=_style(net),
          label=_label(net),
        )
      ax.set_ylim(0, 1.02)
      ax.set_xlabel("steps")
      ax.set_title(f"CNN, lr {r:g}")
      ax.legend(title=f"mean ± std, {_seeds(results)} seeds", fontsize=8, loc="best")
    axes[0].set_ylabel("test accuracy (running averages)")
    save(fig, "cnn.png")
  return paths


def _plot_accuracy(ax, results: dict, nets: tuple[dict, dict], lr: float) -> None:
  for net in nets:
    curves = _curves(net, lr, "test_accuracy")
    _band(
      ax,
      net["eval_steps"],
      curves,
      colour=_colour(net["name"]),
      style=_style(net),
      label=_label(net),
    )
  ax.set_xlabel("steps")
  ax.set_ylabel("test accuracy")
  ax.set_ylim(0, 1.02)
  ax.legend(title=f"mean ± std, {_seeds(results)} seeds", fontsize=8, loc="best")
  ax.set_title(f"(a) test accuracy, lr {lr:g}")


def _plot_percentiles(ax, results: dict, net: dict, lr: float, ylim) -> None:
  curves = _curves(net, lr, "percentiles")  # (seeds, evals, 3)
  every = max(1, len(net["eval_steps"]) // 10)
  for j, (q, marker) in enumerate(zip(PERCENTILES, "v o ^".split(), strict=True)):
    _band(
      ax,
      net["eval_steps"],
      curves[..., j],
      colour=_colour(net["name"]),
      style=_style(net),
      label=f"{q:.0f}th percentile",
      marker=marker,
      ms=4,
      markevery=every,
    )
  ax.set_xlabel("steps")
  ax.set_ylabel("input to a last-layer sigmoid")
  if ylim is not None:
    ax.set_ylim(*ylim)
  which = "(c) with BN" if net["use_bn"] else "(b) without BN"
  ax.set_title(f"{which}, lr {lr:g}")
  ax.legend(title=f"mean ± std, {_seeds(results)} seeds", fontsize=8, loc="best")


def _plot_inference(ax, results: dict, net: dict, lr: float) -> None:
  steps = net["eval_steps"]
  _band(
    ax,
    steps,
    _curves(net, lr, "test_accuracy"),
    colour=_colour(net["name"]),
    style="-",
    label=f"running averages (momentum {Config.from_record(results['config']).momentum:g})",
  )
  _band(
    ax,
    steps,
    _curves(net, lr, "population_accuracy"),
    colour="k",
    style=":",
    label="whole-training-set statistics",
  )
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("steps")
  ax.set_ylabel("test accuracy")
  ax.set_title(f"sigmoid MLP with BN, lr {lr:g}: statistics at inference")
  ax.legend(title=f"mean ± std, {_seeds(results)} seeds", fontsize=8, loc="best")


def _plot_sweep(ax, results: dict) -> None:
  config = Config.from_record(results["config"])
  budgets = {config.steps_of(n["name"]) for n in results["networks"]}
  for net in results["networks"]:
    rows = [r for r in results["summary"] if r["network"] == net["name"]]
    x = [r["lr"] for r in rows]
    y = np.array([np.nan if r["accuracy"] is None else r["accuracy"] for r in rows])
    e = np.array([0.0 if r["accuracy_std"] is None else r["accuracy_std"] for r in rows])
    budget = f" ({config.steps_of(net['name'])} steps)" if len(budgets) > 1 else ""
    ax.errorbar(
      x,
      y,
      yerr=e,
      fmt=_style(net),
      marker="o" if net["use_bn"] else "s",
      color=_colour(net["name"]),
      capsize=3,
      ms=4,
      label=_label(net) + budget,
    )
  ax.set_xscale("log")
  ax.set_xlabel("learning rate")
  ax.set_ylabel("final test accuracy")
  ax.set_ylim(0, 1.02)
  ax.set_title(
    f"final accuracy (mean of the last {config.final_evals} evaluations)\n"
    f"mean ± std over {_seeds(results)} seeds"
    + (f", {budgets.pop()} steps" if len(budgets) == 1 else "")
  )
  ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
