"""What a reproduction reports: the summary over seeds, the Markdown table, ``results.json``."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from jaxbn import BNOptions
from jaxbn.reproduce.config import Config
from jaxbn.reproduce.config import Network


def to_json(a: Any) -> Any:
  """NumPy to JSON: floats rounded to 4 digits, non-finite values as None; arrays as lists.

  Examples:
    >>> import numpy as np
    >>> from jaxbn.reproduce.report import to_json
    >>> to_json(np.array([0.123456, np.nan])), to_json(np.float32(2))
    ([0.1235, None], 2.0)
  """
  a = np.asarray(a, np.float64)
  if a.ndim == 0:
    return round(float(a), 4) if np.isfinite(a) else None
  return [to_json(t) for t in a]


def format_number(v: float | None) -> str:
  """An accuracy in the report and the claims' evidence: 3 decimals, ``'-'`` for None."""
  return "-" if v is None else f"{v:.3f}"


def _nan(v: float | None) -> float:
  return math.nan if v is None else v


def summarize(results: dict) -> list[dict]:
  """One row per network and learning rate, over seeds.

  Each row has ``network``, ``lr``, ``runs``, ``diverged`` (how many),
  ``accuracy`` and ``accuracy_std`` (mean and standard deviation over seeds
  of each run's final test accuracy with running averages, itself the mean
  of the run's last evaluations; a diverged run counts with the accuracy it
  evaluated to), ``reached_target`` (how many runs), ``steps_to_target``
  (median over seeds of the first evaluation step at the target, a run that
  never reaches it counting as infinitely slow; None when that median is)
  and ``accuracy_population``, ``population_std`` (likewise with
  whole-training-set statistics; None without batch norm).

  Examples:
    >>> from jaxbn.reproduce import summarize
    >>> run = lambda seed, acc, hit: {
    ...   "lr": 0.5, "seed": seed, "diverged": False, "accuracy_running_average": acc,
    ...   "steps_to_target": hit, "accuracy_population": acc}
    >>> net = {"name": "mlp-sigmoid-BN", "use_bn": True,
    ...        "runs": [run(0, 0.9, 100), run(1, 0.8, None), run(2, 0.85, 300)]}
    >>> row, = summarize({"networks": [net]})
    >>> row["accuracy"], row["accuracy_std"], row["reached_target"], row["steps_to_target"]
    (0.85, 0.0408, 2, 300)
  """
  rows = []
  for net in results["networks"]:
    for lr in dict.fromkeys(r["lr"] for r in net["runs"]):
      runs = [r for r in net["runs"] if r["lr"] == lr]
      final = np.array([_nan(r["accuracy_running_average"]) for r in runs])
      steps = [math.inf if r["steps_to_target"] is None else r["steps_to_target"] for r in runs]
      median = float(np.median(steps))
      pop = np.array([_nan(r["accuracy_population"]) for r in runs])
      rows.append(
        {
          "network": net["name"],
          "lr": lr,
          "runs": len(runs),
          "diverged": sum(r["diverged"] for r in runs),
          "accuracy": _mean(final),
          "accuracy_std": _std(final),
          "reached_target": sum(s < math.inf for s in steps),
          "steps_to_target": int(median) if median < math.inf else None,
          "accuracy_population": _mean(pop) if net["use_bn"] else None,
          "population_std": _std(pop) if net["use_bn"] else None,
        }
      )
  return rows


def _mean(a: np.ndarray) -> float | None:
  return to_json(np.nanmean(a)) if np.isfinite(a).any() else None


def _std(a: np.ndarray) -> float | None:
  return to_json(np.nanstd(a)) if np.isfinite(a).any() else None


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
    net = Network.parse(name)
    if net.bn:
      continue
    bn = rows.get((net.with_bn(True).name, lr))
    pop = "-" if bn is None else _mean_std(bn["accuracy_population"], bn["population_std"])
    lines.append(
      f"| {net.family} | {lr:g} | {_acc(plain)} | {_acc(bn)} | {_steps(plain)} | {_steps(bn)} "
      f"| {pop} |"
    )
  return "\n".join(lines)


def run_kind(config: dict) -> str:
  """``'jaxbn reproduce'``, ``'jaxbn reproduce --quick'``, or ``'a custom configuration'``.

  What ran, judged by the configuration (progress bars aside).

  Examples:
    >>> import dataclasses
    >>> from jaxbn.reproduce import Config
    >>> from jaxbn.reproduce.report import run_kind
    >>> run_kind(dataclasses.asdict(Config.quick(progress=True)))
    'jaxbn reproduce --quick'
    >>> run_kind(dataclasses.asdict(Config(seeds=(0,))))
    'a custom configuration'
  """

  def comparable(c: Config) -> dict:
    # A preset's fig1_lr is None; a record holds the one it resolved to.
    c = dataclasses.replace(c.resolved(), progress=False)
    return json.loads(json.dumps(dataclasses.asdict(c)))  # tuples as lists, as in results.json

  given = comparable(Config.from_record(config))
  for preset, command in (
    (Config(), "jaxbn reproduce"),
    (Config.quick(), "jaxbn reproduce --quick"),
  ):
    if comparable(preset) == given:
      return command
  return "a custom configuration"


def format_machine(machine: dict) -> str:
  """One line: CPU, cores, devices, Python and package versions, wall time."""
  packages = ", ".join(f"{k} {v}" for k, v in machine["packages"].items() if v)
  line = (
    f"{machine['cpu']}, {machine['cores']} cores, JAX on {machine['devices']}; Python "
    f"{machine['python']}, {packages}"
  )
  if machine.get("wall_time_s") is not None:
    line += f"; the runs took {machine['wall_time_s']:.0f} s"
  return line


def format_claims(results: dict) -> str:
  """The claims as a Markdown list: verdict, claim, evidence."""
  lines = []
  for i, claim in enumerate(results["claims"], 1):
    verdict = "holds" if claim["holds"] else "DOES NOT HOLD"
    lines.append(f"{i}. **{verdict}**: {claim['name']}. *Evidence:* {claim['evidence']}")
  return "\n".join(lines)


def format_report(results: dict) -> str:
  """The Markdown report of a run: what ran and where, the table, the claims.

  ``jaxbn reproduce`` prints it and writes it to ``report.md``;
  docs/reproduction.md shows this text for the stored runs, unedited. It reads only
  ``config``, ``dataset``, ``summary``, ``claims`` and ``machine``.
  """
  config, ds = Config.from_record(results["config"]), results["dataset"]
  kind = run_kind(results["config"])
  nets = [Network.parse(n) for n in dict.fromkeys(r["network"] for r in results["summary"])]
  networks = list(dict.fromkeys(net.title for net in nets))
  budget = f"{config.steps} steps"
  cnn = next((net for net in nets if net.kind == "cnn"), None)
  if cnn is not None and config.steps_of(cnn) != config.steps:
    budget += f" ({config.steps_of(cnn)} for the CNN)"
  bn = ""
  if config.bn_options != BNOptions():  # said only when not the defaults
    bn = f"; batch norm with momentum {config.momentum:g} and epsilon {config.epsilon:g}"
  what = f"`{kind}`" if kind != "a custom configuration" else "a custom run"
  lines = [
    f"Output of {what} on {format_machine(results['machine'])}.",
    "",
    f"{ds['name']}: {ds['train']} training and {ds['test']} test images; "
    f"{', '.join(networks)}; {len(config.seeds)} seeds, {budget} of SGD on mini-batches "
    f"of {config.batch_size}, evaluated every {config.eval_every} steps{bn}. Accuracy: mean "
    f"± std over seeds of each run's mean over its last {config.final_evals} evaluations; "
    f"steps to {config.target:.0%}: median over seeds (a run that never gets there counts "
    'as never; "3/5 runs" says how many did).',
  ]
  if kind.endswith("--quick"):
    lines += [
      "",
      f"A quick run: {config.steps} steps instead of {Config().steps}, the MLPs only (no "
      f"CNN), evaluations every {config.eval_every} steps instead of {Config().eval_every}. "
      "Accuracies are lower than the full run's, plain "
      "networks that need more steps to leave their initial plateau count as failing, and "
      f"the running averages (momentum {config.momentum:g}) have had less time to settle; "
      "the claims are the same.",
    ]
  lines += ["", format_table(results), "", "Claims, computed from this run's data:", ""]
  lines.append(format_claims(results))
  return "\n".join(lines)


def _acc(row: dict | None) -> str:
  if row is None:
    return "-"
  text = _mean_std(row["accuracy"], row["accuracy_std"])
  if row["diverged"]:
    text += f" ({row['diverged']}/{row['runs']} diverged)"
  return text


def _mean_std(mean: float | None, std: float | None) -> str:
  return "-" if mean is None else f"{format_number(mean)} ± {format_number(std)}"


def _steps(row: dict | None) -> str:
  if row is None:
    return "-"
  text = "never" if row["steps_to_target"] is None else str(row["steps_to_target"])
  if 0 < row["reached_target"] < row["runs"]:
    text += f" ({row['reached_target']}/{row['runs']} runs)"
  return text


def write_results(results: dict, out: str | os.PathLike) -> str:
  """Writes ``results`` to ``out/results.json`` (``out`` created); returns its path."""
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "results.json")
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  return path


def write_report(report: str, out: str | os.PathLike) -> str:
  """Writes the Markdown ``report`` to ``out/report.md`` (``out`` created); returns its path."""
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "report.md")
  with open(path, "w") as f:
    f.write(report + "\n")
  return path


def machine() -> dict:
  """Where a run ran: CPU model, cores, JAX's devices, OS, Python and package versions."""
  import importlib.metadata
  import platform

  import jax

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(
        (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu
      )
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  import jaxbn

  # An editable install's metadata may be stale.
  packages: dict[str, str | None] = {"jaxbn": jaxbn.__version__}
  for name in ("jax", "jaxlib", "flax", "optax", "numpy"):
    try:
      packages[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      packages[name] = None
  device = jax.devices()[0]
  return {
    "cpu": cpu,
    "cores": cores,
    "devices": "CPU"
    if device.platform == "cpu"
    else f"{len(jax.devices())} x {device.device_kind}",
    "os": platform.platform(),
    "python": platform.python_version(),
    "packages": packages,
  }
