"""What a reproduction reports: the summary over seeds, the Markdown table, ``results.json``."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np


def _clean(a: Any) -> Any:
  """NumPy to JSON: floats rounded to 4 digits, non-finite values as None."""
  a = np.asarray(a, np.float64)
  if a.ndim == 0:
    return round(float(a), 4) if np.isfinite(a) else None
  return [_clean(t) for t in a]


def _nan(v: float | None) -> float:
  return math.nan if v is None else v


def summarize(results: dict) -> list[dict]:
  """One row per network and learning rate, over seeds.

  Each row has ``network``, ``lr``, ``runs``, ``diverged`` (how many),
  ``accuracy`` and ``accuracy_std`` (final test accuracy with running
  averages; diverged runs count as their chance-level accuracy),
  ``reached_target`` (how many runs), ``steps_to_target`` (median over the
  runs that reached it, or None) and ``accuracy_population`` (mean, with
  whole-training-set statistics; None without batch norm).

  Examples:
    >>> from jaxbn.reproduce import summarize
    >>> run = lambda seed, acc, hit: {
    ...   "lr": 0.5, "seed": seed, "diverged": False, "accuracy_running_average": acc,
    ...   "steps_to_target": hit, "accuracy_population": acc}
    >>> net = {"name": "mlp-sigmoid-BN", "use_bn": True,
    ...        "runs": [run(0, 0.9, 100), run(1, 0.8, None)]}
    >>> row, = summarize({"networks": [net]})
    >>> row["accuracy"], row["accuracy_std"], row["reached_target"], row["steps_to_target"]
    (0.85, 0.05, 1, 100)
  """
  rows = []
  for net in results["networks"]:
    for lr in dict.fromkeys(r["lr"] for r in net["runs"]):
      runs = [r for r in net["runs"] if r["lr"] == lr]
      final = np.array([_nan(r["accuracy_running_average"]) for r in runs])
      steps = [r["steps_to_target"] for r in runs if r["steps_to_target"] is not None]
      pop = [_nan(r["accuracy_population"]) for r in runs]
      rows.append(
        {
          "network": net["name"],
          "lr": lr,
          "runs": len(runs),
          "diverged": sum(r["diverged"] for r in runs),
          "accuracy": _clean(np.nanmean(final)) if np.isfinite(final).any() else None,
          "accuracy_std": _clean(np.nanstd(final)) if np.isfinite(final).any() else None,
          "reached_target": len(steps),
          "steps_to_target": int(np.median(steps)) if steps else None,
          "accuracy_population": _clean(np.nanmean(pop)) if net["use_bn"] else None,
        }
      )
  return rows


def format_table(results: dict) -> str:
  """The summary as a Markdown table: each network and rate, without and with BN."""
  target = results["config"]["target"]
  rows = {(r["network"], r["lr"]): r for r in results["summary"]}
  header = (
    "| network | lr | accuracy, plain | accuracy, BN | "
    f"steps to {target:.0%}, plain | steps to {target:.0%}, BN | BN, population stats |"
  )
  lines = [header, "|" + "---|" * 7]
  for (name, lr), plain in rows.items():
    if not name.endswith("-plain"):
      continue
    base = name[: -len("-plain")]
    bn = rows.get((base + "-BN", lr))
    lines.append(
      f"| {base} | {lr:g} | {_acc(plain)} | {_acc(bn)} | {_steps(plain)} | {_steps(bn)} | "
      f"{_fmt(bn and bn['accuracy_population'])} |"
    )
  return "\n".join(lines)


def _fmt(v: float | None) -> str:
  return "-" if v is None else f"{v:.3f}"


def _acc(row: dict | None) -> str:
  if row is None:
    return "-"
  text = f"{_fmt(row['accuracy'])} ± {_fmt(row['accuracy_std'])}"
  if row["diverged"]:
    text += f" ({row['diverged']}/{row['runs']} diverged)"
  return text


def _steps(row: dict | None) -> str:
  if row is None or row["steps_to_target"] is None:
    return "never" if row is not None else "-"
  if row["reached_target"] < row["runs"]:
    return f"{row['steps_to_target']} ({row['reached_target']}/{row['runs']} runs)"
  return str(row["steps_to_target"])


def write_results(results: dict, out: str | os.PathLike) -> str:
  """Writes ``results`` to ``out/results.json`` (``out`` created); returns its path."""
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "results.json")
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  return path
