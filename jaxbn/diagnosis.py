"""Why a model is good in training mode and bad in evaluation mode: :func:`diagnose`.

In training mode a batch norm normalizes with the statistics of the batch in
hand; in evaluation mode with the running statistics (Ioffe & Szegedy 2015,
Sec. 3.1). When the two disagree, the model's evaluation-mode output
departs from the one it was trained to produce. The causes are few:

- ``"batch_of_one"``: a training-mode forward on batches of one example: a
  layer sees one value per feature, its variance is 0 and its output is
  ``bias`` whatever the input (evaluate in evaluation mode);
- ``"never_updated"``: running statistics still at their initial values
  (``mean = 0``, ``var = 1``): the state returned by the training step was not
  threaded back, or updates were turned off;
- ``"wrong_axis"``: the feature axis is not the one the data's features live
  on (channel-first images with the default channel-last ``axis=-1``):
  statistics per position instead of per channel;
- ``"ema_not_settled"``: a moving average still far from the data after too
  few updates for its window ``1 / (1 - momentum)`` (``momentum=0.999`` over a
  few hundred steps);
- ``"small_batches"``: batch statistics from few values per feature, noisy
  enough that the model learned to depend on the noise;
- ``"stale_statistics"``: a settled moving average that differs from the
  statistics the model now produces on the batches given: the weights moved
  faster than the average's window (it still averages statistics of older
  weights), or the batches differ from the training data (other data,
  other preprocessing);
- ``"dead_features"`` (a note): features constant over every batch given.

:func:`diagnose` runs the model three ways on the batches given, all through
the core (:func:`jaxbn.bn_train` with explicit overrides, the contract of
:func:`jaxbn.population_stats`): in training mode, recording the exact
moments of every batch norm's input; in evaluation mode, recording them
again (the running statistics are applied through batch renormalization with
unbounded limits, ``r = sigma_B / sigma``, ``d = (mu_B - mu) / sigma``, which is
exactly ``(x - mu) / sigma``); and, with labels, with the population
statistics of those batches. Per layer it reports the distance of the batch
statistics from the running ones, the running average's progress, constant
features, the feature axis, and how far the evaluation-mode output departs
from the training-mode one; then a ranked verdict with the fix as code.

The departure of one feature is the 2-Wasserstein distance between the
Gaussians with the moments of the training-mode and the evaluation-mode
normalized outputs, in units of the training-mode standard deviation::

    W = sqrt((m_e - m_t)^2 + (s_e - s_t)^2)

averaged over features (root mean square, weighted by ``scale^2``: a feature
with ``scale = 0`` does not matter). ``local`` compares the two modes on the
same input (the layer's input in training mode), so it names the layer whose
own statistics are wrong; ``in_eval`` compares the layer's output in the
evaluation-mode forward with its output in the training-mode forward, so it
includes what the layers before it passed on.

References:
  Ioffe & Szegedy, "Batch Normalization", ICML 2015, arXiv:1502.03167, Sec. 3.1.
  Ioffe, "Batch Renormalization", NeurIPS 2017, arXiv:1702.03275.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import warnings
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from typing import Any
from typing import NamedTuple
from typing import cast

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from jaxbn import core
from jaxbn import numerics
from jaxbn import population
from jaxbn.core import BNOptions
from jaxbn.core import BNState
from jaxbn.core import Renorm
from jaxbn.core import SingleValueWarning
from jaxbn.layer import BNLayer

__all__ = (
  "CAUSES",
  "DEPARTURE",
  "Finding",
  "LayerReport",
  "Report",
  "diagnose",
  "observed_options",
  "observing",
  "unsettled",
)

CAUSES = (
  "batch_of_one",
  "never_updated",
  "wrong_axis",
  "ema_not_settled",
  "small_batches",
  "stale_statistics",
  "dead_features",
)
"""Every cause :func:`diagnose` names, most specific first (the order of its ranking)."""

DEPARTURE = 0.3
"""The departure (in training-mode standard deviations) above which a layer is flagged."""

# A moving average that has covered less than this fraction of the way from its initial
# values to the data's has not settled.
_SETTLED = 0.9
# At most this many values per feature per batch: batch statistics noisy enough to matter.
_SMALL = 32
# Neighbouring features this correlated are positions, not channels.
_SMOOTH = 0.3

_TRAIN = {"momentum": None, "renorm": None}
# Batch renormalization with unbounded limits is the running statistics' affine map.
_EVAL = {"momentum": None, "renorm": Renorm(rmax=math.inf, dmax=math.inf)}
# A probe's step: observed in bn_train, it says which layer is calling.
_TAG = 1 << 24


class Finding(NamedTuple):
  """One cause found, with the layer where it first shows and the fix.

  Attributes:
    cause: one of :data:`CAUSES`.
    layer: the first layer showing it.
    layers: every layer showing it.
    message: what was measured, in words.
    fix: the fix, as code to run (names as in the :func:`diagnose` call:
      ``model``, ``variables``, ``state``, ``params``, ``forward``, ``batches``).
    note: True for an observation that does not explain a gap by itself.
  """

  cause: str
  layer: str
  layers: tuple[str, ...]
  message: str
  fix: str
  note: bool = False


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """What :func:`diagnose` measured at one batch norm.

  Attributes:
    name: the layer's name (its path in the model, or its key in ``state``).
    input_shape: the shape of its input on the first batch (None when the
      forward is compiled or vmapped outside :func:`diagnose`).
    options: its :class:`jaxbn.BNOptions` (None when not observed).
    values_per_batch: the fewest values per feature in one batch.
    updates: the updates its running statistics have seen (``state.step``,
      or ``steps`` given to :func:`diagnose`), None when not known.
    running_mean: the running mean, per feature.
    running_var: the running variance, per feature.
    batch_mean: the mean over every batch given (training-mode forward).
    batch_var: the variance over every batch given.
    mean_shift: root mean square over features of
      ``(batch_mean - running_mean) / sqrt(running_var + epsilon)``.
    log_var_ratio: root mean square of ``log((batch_var + eps) / (running_var + eps))``.
    spread: root mean square over features of the standard deviation of the
      per-batch means, in running standard deviations (0 with one batch).
    ema_progress: the fraction of the way from the initial ``(0, 1)`` to the
      batch statistics that the running ones have covered (a fit over
      features; about ``1 - momentum^t`` after ``t`` updates); None where the
      data are too close to ``(0, 1)`` to tell.
    never_updated: the running statistics are exactly the initial ones.
    constant: features (nearly) constant over every batch given (variance
      below ``epsilon``): ``bias`` in both modes, left out of the departures.
    axis_smoothness: the correlation of neighbouring entries along each axis
      but the batch axis, on the first batch (positions correlate, channels
      do not: a smooth feature axis beside an unordered axis is the wrong one).
    local: the departure of the evaluation-mode output from the
      training-mode one on the same input (see the module docstring).
    in_eval: the departure in the evaluation-mode forward.
  """

  name: str
  input_shape: tuple[int, ...] | None
  options: BNOptions | None
  values_per_batch: int
  updates: int | None
  running_mean: np.ndarray
  running_var: np.ndarray
  batch_mean: np.ndarray
  batch_var: np.ndarray
  mean_shift: float
  log_var_ratio: float
  spread: float
  ema_progress: float | None
  never_updated: bool
  constant: int
  axis_smoothness: dict[int, float] | None
  local: float
  in_eval: float

  @property
  def window(self) -> float | None:
    """The moving average's window ``1 / (1 - momentum)`` in calls (None: not a plain EMA)."""
    return None if self.options is None else window(self.options)

  @property
  def effective_batches(self) -> float | None:
    """The number of batches the moving average weighs, effectively (Kish's count).

    After ``t`` updates with momentum ``m`` the batches weigh ``(1 - m) m^k``,
    ``k < t``; their effective number is ``(sum w)^2 / sum w^2 =
    (1 - m^t)(1 + m) / ((1 - m)(1 + m^t))``: about ``t`` early on, and at most
    ``(1 + m) / (1 - m)``. ``t`` is :attr:`updates` where known, else the
    updates that :attr:`ema_progress` implies (``1 - m^t``). None for a layer
    that is not a plain moving average, or when ``t`` is not known.
    """
    o = self.options
    if self.window is None or o is None or not isinstance(o.momentum, (int, float)):
      return None
    m = float(o.momentum)
    if m <= 0:
      return 1.0
    if self.updates is not None:
      t = self.updates / o.accumulate_steps
    elif self.ema_progress is not None and 0 < self.ema_progress < 1:
      t = math.log(1 - self.ema_progress) / math.log(m)
    else:
      return None
    mt = m**t
    return (1 - mt) * (1 + m) / ((1 - m) * (1 + mt))


@dataclasses.dataclass(frozen=True)
class Report:
  """The result of :func:`diagnose`: per-layer measurements and a ranked verdict.

  ``str(report)`` is a table and the verdict; :meth:`plot` draws the
  per-layer measurements.

  Attributes:
    layers: one :class:`LayerReport` per batch norm, in the model's order.
    findings: the causes found, most likely first (notes last).
    first_departure: the first layer whose evaluation-mode output departs
      from the training-mode one by more than :data:`DEPARTURE` (None: none).
    accuracy: with labels, the accuracy over the batches given in training
      mode (``'train_mode'``), evaluation mode (``'eval_mode'``) and evaluation
      mode with the population statistics of those batches (``'population'``);
      empty without labels.
    batches: the number of batches.
  """

  layers: tuple[LayerReport, ...]
  findings: tuple[Finding, ...]
  first_departure: str | None
  accuracy: dict[str, float]
  batches: int

  @property
  def ok(self) -> bool:
    """No finding other than notes."""
    return not any(not f.note for f in self.findings)

  @property
  def cause(self) -> str | None:
    """The most likely cause (the first finding that is not a note), or None."""
    return next((f.cause for f in self.findings if not f.note), None)

  def __str__(self) -> str:
    head = (
      "layer",
      "values/feat",
      "updates",
      "window",
      "mean shift",
      "log var",
      "EMA done",
      "const",
      "local",
      "in eval",
    )
    rows: list[tuple[str, ...]] = [head]
    for r in self.layers:
      window = r.window
      rows.append(
        (
          r.name,
          str(r.values_per_batch),
          "?" if r.updates is None else str(r.updates),
          "-" if window is None else ("inf" if math.isinf(window) else f"{window:.0f}"),
          f"{r.mean_shift:.2f}",
          f"{r.log_var_ratio:.2f}",
          "-" if r.ema_progress is None else f"{r.ema_progress:.2f}",
          str(r.constant),
          f"{r.local:.2f}" + (" !" if r.local > DEPARTURE else ""),
          f"{r.in_eval:.2f}" + (" !" if r.in_eval > DEPARTURE else ""),
        )
      )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
      "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w)
        for i, (c, w) in enumerate(zip(row, widths, strict=True))
      )
      for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    if self.accuracy:
      lines.append("accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in self.accuracy.items()))
    if self.first_departure is not None:
      lines.append(f"first departure over {DEPARTURE}: {self.first_departure}")
    if self.ok:
      lines.append("verdict: no batch-norm problem found")
    for i, f in enumerate(self.findings, 1):
      kind = "note" if f.note else f"{i}."
      lines.append(f"{kind} {f.cause} at {f.layer}: {f.message}")
      lines.extend("     " + line for line in f.fix.splitlines())
    return "\n".join(lines)

  def plot(self, path: Any = None) -> Any:
    """Per-layer bars of the measurements, with the alarm threshold; needs matplotlib.

    Args:
      path: where to save the figure (PNG, PDF...), or None.

    Returns:
      The ``matplotlib.figure.Figure``.
    """
    from jaxbn.extras import require

    plt = require("matplotlib.pyplot", "jaxbn.diagnosis.Report.plot")
    names = [r.name for r in self.layers]
    at = np.arange(len(names))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 0.8 * len(names) + 5), 6))
    width = 0.4
    top.bar(at - width / 2, [r.local for r in self.layers], width, label="local")
    top.bar(at + width / 2, [r.in_eval for r in self.layers], width, label="in eval forward")
    top.axhline(DEPARTURE, color="k", ls="--", lw=1, label=f"alarm ({DEPARTURE})")
    top.set_ylabel("departure (train std)")
    top.set_title("evaluation mode against training mode, per batch norm")
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    shift = [r.mean_shift for r in self.layers]
    bottom.bar(at - width / 2, shift, width, label="mean shift (running std)")
    ratio = [r.log_var_ratio for r in self.layers]
    bottom.bar(at + width / 2, ratio, width, label="log variance ratio")
    bottom.set_ylabel("batch vs running (RMS)")
    bottom.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for ax in (top, bottom):
      ax.set_xticks(at)
      ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    verdict = (
      "no problem found" if self.ok else f"{self.findings[0].cause} at {self.findings[0].layer}"
    )
    fig.suptitle(f"jaxbn.diagnose: {verdict}")
    fig.tight_layout()
    if path is not None:
      fig.savefig(path, dpi=100)
    return fig


# --------------------------------------------------------------------------
# Observing the bn_train calls of a forward pass


@contextlib.contextmanager
def observing(callback: Callable[..., None]) -> Iterator[None]:
  """Calls ``callback(fn, params, state, x, mask, options)`` at every core call while active.

  ``fn`` is ``'bn_train'`` or ``'bn_infer'``; the call happens when the core
  function runs or is traced (never inside a compiled program), so it costs
  nothing in a compiled step.
  """
  core._OBSERVERS.append(callback)
  try:
    yield
  finally:
    core._OBSERVERS.remove(callback)


def _axis_smoothness(x: np.ndarray, options: BNOptions) -> dict[int, float] | None:
  """The correlation of neighbours along each axis but the batch axis (lag 1).

  Positions along a spatial or time axis are smooth (neighbours correlate,
  0.5 to 0.8 in a conv net's activations); channels have no order
  (neighbouring channels correlate near 0).
  """
  axes = (options.axis,) if isinstance(options.axis, int) else tuple(options.axis)
  if x.ndim < 3 or len(axes) != 1 or options.ghost_batch_size is not None:
    return None
  feature = axes[0] % x.ndim
  batch = next(i for i in range(x.ndim) if i != feature)
  x = np.asarray(x, np.float64)
  out = {}
  for a in range(x.ndim):
    n = x.shape[a]
    if a == batch or n < 3:
      continue
    u = np.take(x, range(n - 1), a)
    v = np.take(x, range(1, n), a)
    u, v = u - u.mean(), v - v.mean()
    norm = math.sqrt(float(np.sum(u * u)) * float(np.sum(v * v)))
    out[a] = float(np.sum(u * v)) / norm if norm > 0 else 0.0
  return out


def _suspect_axis(r: LayerReport) -> int | None:
  """The axis the features seem to live on, where it is not the feature axis.

  The feature axis is smooth like positions (neighbour correlation at least
  :data:`_SMOOTH`) while another axis is not (below half of it): that axis,
  the least smooth, holds the channels.
  """
  smooth, options = r.axis_smoothness, r.options
  if not smooth or options is None or r.input_shape is None or not isinstance(options.axis, int):
    return None
  feature = options.axis % len(r.input_shape)
  if feature not in smooth or smooth[feature] < _SMOOTH:
    return None
  others = {a: v for a, v in smooth.items() if a != feature}
  if not others:
    return None
  best = min(others, key=lambda a: others[a])
  return best if others[best] < smooth[feature] / 2 else None


def observed_options(call: Callable[[], Any]) -> list[BNOptions]:
  """The options of every :func:`jaxbn.bn_train` call in ``call()``, traced for shapes only.

  ``call`` takes no argument (close over the model and an input); nothing is
  computed (``jax.eval_shape``).
  """
  got: list[BNOptions] = []

  def observe(kind, params, state, x, mask, options):
    if kind == "bn_train":
      got.append(options)

  with observing(observe), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    jax.eval_shape(call)
  return got


def window(options: BNOptions) -> float | None:
  """The window ``accumulate_steps / (1 - momentum)`` of a plain moving average, in calls.

  None where the running statistics are not one: ``momentum=None`` (the
  cumulative average), ``ema_warmup`` (the average of the batches so far
  until the window takes over), a traced momentum, or ``momentum >= 1`` (they
  never move).
  """
  m = options.momentum
  if not isinstance(m, (int, float)) or options.ema_warmup or not m < 1:
    return None
  return options.accumulate_steps / (1 - float(m))


def unsettled(
  where: str, options: list[BNOptions], updates: int, running: list[tuple[Any, Any]]
) -> str | None:
  """The :class:`jaxbn.RunningStatsWarning` message for an evaluation, or None.

  Says so when the running statistics are still exactly the initial ``(0, 1)``
  after ``updates`` training steps, or when a plain moving average has had
  fewer updates than its :func:`window` and still looks like one started from
  ``(0, 1)``: after ``t`` updates every running variance keeps at least
  ``momentum^t`` of the initial 1, which statistics computed otherwise
  (population statistics, ported or pretrained ones) rarely do.

  Args:
    where: the function evaluating.
    options: the layers' options (:func:`observed_options`).
    updates: the training steps so far.
    running: each layer's running ``(mean, var)``.
  """
  if updates <= 0 or not running:
    return None
  never = all(bool(jnp.all(m == 0)) and bool(jnp.all(v == 1)) for m, v in running)
  fixes = (
    "pass ema_warmup=True (jaxbn.BNOptions) to average the batches seen so far, or compute "
    "the statistics over the training data (jaxbn.training.population_stats, "
    "jaxbn.linen_population_stats, jaxbn.population_stats); jaxbn.diagnose explains a gap "
    "between training-mode and evaluation-mode accuracy."
  )
  if never:
    return (
      f"{where}: evaluating after {updates} training steps with running statistics that were "
      f"never updated (mean 0, variance 1 in every layer): the state the training step "
      f"returns is not kept, or its update is turned off. Keep it; or {fixes}"
    )
  windows = [(w, o) for o in options if (w := window(o)) is not None]
  if not windows:
    return None
  longest, o = max(windows, key=lambda p: p[0])
  if updates >= longest:
    return None
  kept = cast(float, o.momentum) ** (updates / o.accumulate_steps)  # of the initial variance 1
  if min(float(jnp.min(v)) for _, v in running) < kept * (1 - 1e-4):
    return None  # not a moving average started from (0, 1) this many updates ago
  return (
    f"{where}: evaluating with running statistics that have seen {updates} updates, fewer "
    f"than the window of their moving average (1 / (1 - momentum) = {longest:.0f} at momentum "
    f"{o.momentum:g}): they are still mostly their initial values, and evaluation-mode "
    f"accuracy lags. Train longer; or {fixes}"
  )


# --------------------------------------------------------------------------
# The passes


def is_labelled(batch: Any) -> bool:
  """Whether ``batch`` is an ``(x, y)`` pair: two entries, the second integer labels.

  A tuple of floating arrays is the inputs of a model with several (joint
  statistics), not a pair.
  """
  if not isinstance(batch, (tuple, list)) or len(batch) != 2:
    return False
  y = batch[1]
  return hasattr(y, "dtype") and jnp.issubdtype(y.dtype, jnp.integer)


def _pairs(batches: list[Any]) -> bool:
  return is_labelled(batches[0])


def _w2(m_e, v_e, v_t, eps, weight, valid) -> float:
  """Weighted RMS over the valid features of the W2 distance to the training-mode output."""
  s_t = np.sqrt(v_t / (v_t + eps))
  w = np.sqrt(np.square(m_e) + np.square(np.sqrt(np.maximum(v_e, 0)) - s_t)) / np.maximum(s_t, 1e-3)
  weight = np.where(valid & np.isfinite(w), weight, 0)
  if not weight.sum() > 0:
    weight = np.where(valid & np.isfinite(w), 1.0, 0.0)
  if not weight.sum() > 0:
    return 0.0
  return float(np.sqrt(np.sum(weight * np.square(np.where(weight > 0, w, 0))) / weight.sum()))


def _rms(v: np.ndarray, valid: np.ndarray) -> float:
  v = v[valid & np.isfinite(v)]
  return float(np.sqrt(np.mean(np.square(v)))) if v.size else 0.0


def _ema_progress(run: BNState, mean: np.ndarray, var: np.ndarray, valid) -> float | None:
  a = np.concatenate([mean[valid], var[valid] - 1])
  b = np.concatenate([np.asarray(run.mean)[valid], np.asarray(run.var)[valid] - 1])
  if not a.size:
    return None
  if not np.sqrt(np.mean(np.square(a))) > 0.1:
    return None  # the data's statistics are too close to the initial ones to tell
  return float(np.clip(np.dot(a, b) / np.dot(a, a), 0.0, 1.5))


class _Face(NamedTuple):
  """How one kind of model is run, and the fixes written in its terms."""

  name: str
  forward: Callable[..., Any]
  params: Any
  states: dict[str, Any]  # name -> BNState (or BNAccState)
  steps_always: bool  # every state's step is real (else only where the layer stores one)
  population: str  # code; {xs} is the batches' inputs
  eval_mode: str
  thread: str
  axis: str  # code; {axis} and {name}


def _analyse(fn: str, face: _Face, batches: list[Any], steps: int | None) -> Report:
  labels_given = _pairs(batches)
  xs = [b[0] for b in batches] if labels_given else batches
  names = list(face.states)
  leaves = [BNState(*face.states[k][:4]) for k in names]
  forward = face.forward

  def run(overrides):
    @jax.jit
    def f(params, states, x):
      out, new = forward(params, dict(zip(names, states, strict=True)), x, **overrides)
      return out, [BNState(*new[k][:4]) for k in names]

    return f

  train, evaluate = run(_TRAIN), run(_EVAL)
  probes = [population._probe(s, 1.0) for s in leaves]
  with_running = [s._replace(count=jnp.zeros_like(s.count)) for s in leaves]

  # The layers' own options, and their inputs' shapes and axis shares: one eager forward on
  # the first batch with the running statistics, each state tagged by its step.
  seen: dict[int, tuple[Any, BNOptions, dict[int, float] | None, np.ndarray | None]] = {}

  def observe(kind, params, state, x, mask, options):
    step = getattr(state, "step", None)
    if kind != "bn_train" or step is None or isinstance(step, jax.core.Tracer):
      return
    i = int(step) - _TAG
    if 0 <= i < len(names) and i not in seen:
      # One array, computed here (not traced by a jit or vmap of the caller's own).
      concrete = not isinstance(x, (jax.core.Tracer, tuple, list))
      shares = _axis_smoothness(np.asarray(x), options) if concrete else None
      scale = getattr(params, "scale", None)
      scale = None if scale is None or isinstance(scale, jax.core.Tracer) else np.asarray(scale)
      seen[i] = (tuple(x.shape) if concrete else None, options, shares, scale)

  tagged = [s._replace(step=jnp.asarray(_TAG + i, s.step.dtype)) for i, s in enumerate(leaves)]
  with observing(observe), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    forward(face.params, dict(zip(names, tagged, strict=True)), xs[0])
  if len(seen) < len(names):
    missing = [n for i, n in enumerate(names) if i not in seen]
    warnings.warn(
      f"{fn}: the batch norms {missing} could not be observed in an eager run of the forward "
      f"(it, or a part of it, is jitted or scanned): their options (momentum, window) and "
      f"their feature axis are not checked. Pass the forward without jax.jit.",
      stacklevel=3,
    )

  merged: list[numerics.Moments] = []
  exact: list[numerics.Moments] = []
  spread: list[numerics.Moments] = []
  out_t, out_e = [], []
  singles: dict[Any, bool] = {}  # per input signature: some layer got one value per feature
  min_count = [math.inf] * len(names)
  for b, x in enumerate(xs):
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always", SingleValueWarning)
      o_t, new_t = train(face.params, probes, x)
      o_e, new_e = evaluate(face.params, with_running, x)
    key = population._shapes_and_dtypes(x)
    if key not in singles:  # traced (and warned) on the first batch of each signature
      singles[key] = any(issubclass(w.category, SingleValueWarning) for w in caught)
    single = singles[key]
    if b == 0:
      population._check_forward(
        fn, probes, new_t, train(face.params, [population._probe(s, 2.0) for s in leaves], x)[1]
      )
    m_t = [population._as_moments(s) for s in new_t]
    m_e = [population._as_moments(s) for s in new_e]
    means = [
      numerics.Moments((m.count > 0).astype(m.mean.dtype), m.mean, jnp.zeros_like(m.m2))
      for m in m_t
    ]
    if not merged:
      merged, exact, spread = m_t, m_e, means
    else:
      merged = [numerics.merge(a, m) for a, m in zip(merged, m_t, strict=True)]
      exact = [numerics.merge(a, m) for a, m in zip(exact, m_e, strict=True)]
      spread = [numerics.merge(a, m) for a, m in zip(spread, means, strict=True)]
    for i, m in enumerate(m_t):
      c = np.asarray(m.count)
      # bn_train keeps the state of a layer that got one value per feature (and warns).
      least = float(c.min()) if c.size else 0.0
      min_count[i] = min(min_count[i], 1.0 if single and least == 0 else least)
    out_t.append(o_t)
    out_e.append(o_e)

  accuracy: dict[str, float] = {}
  if labels_given:
    pop = [
      s._replace(
        mean=jnp.where(m.count > 0, m.mean, s.mean).astype(s.mean.dtype),
        var=jnp.where(m.count > 0, numerics.variance(m), s.var).astype(s.var.dtype),
      )
      for s, m in zip(with_running, merged, strict=True)
    ]
    out_p = [evaluate(face.params, pop, x)[0] for x in xs]
    accuracy = {
      "train_mode": _accuracy(out_t, batches),
      "eval_mode": _accuracy(out_e, batches),
      "population": _accuracy(out_p, batches),
    }

  layers = []
  for i, name in enumerate(names):
    run_state = leaves[i]
    shape, options, shares, scale = seen.get(i, (None, None, None, None))
    eps = (options or core.DEFAULTS).epsilon
    mean_b = np.asarray(merged[i].mean, np.float64)
    var_b = np.asarray(numerics.variance(merged[i]), np.float64)
    mean_r = np.asarray(run_state.mean, np.float64)
    var_r = np.asarray(run_state.var, np.float64)
    sigma_r = np.sqrt(var_r + eps)
    mean_e = np.asarray(exact[i].mean, np.float64)
    var_e = np.asarray(numerics.variance(exact[i]), np.float64)
    weight = np.ones_like(mean_r) if scale is None else np.square(scale).reshape(mean_r.shape)
    # Features that got values (not one per batch), and not (nearly) constant: those are
    # `bias` in both modes and counted apart.
    counted = np.asarray(merged[i].count) > 0
    flat = var_b < eps
    valid = counted & ~flat
    local = _w2((mean_b - mean_r) / sigma_r, var_b / np.square(sigma_r), var_b, eps, weight, valid)
    valid_e = valid & (np.asarray(exact[i].count) > 0)
    in_eval = _w2(
      (mean_e - mean_r) / sigma_r, var_e / np.square(sigma_r), var_b, eps, weight, valid_e
    )
    spread_var = np.asarray(numerics.variance(spread[i]), np.float64)
    stores_step = options is not None and BNLayer(None, options).stores_step
    updates = int(run_state.step) if face.steps_always or stores_step else steps
    layers.append(
      LayerReport(
        name=name,
        input_shape=shape,
        options=options,
        values_per_batch=int(min_count[i]) if math.isfinite(min_count[i]) else 0,
        updates=updates,
        running_mean=mean_r,
        running_var=var_r,
        batch_mean=mean_b,
        batch_var=var_b,
        mean_shift=_rms((mean_b - mean_r) / sigma_r, valid),
        log_var_ratio=_rms(np.log((var_b + eps) / (var_r + eps)), valid),
        spread=_rms(np.sqrt(spread_var) / sigma_r, valid),
        ema_progress=_ema_progress(run_state, mean_b, var_b, valid),
        never_updated=bool(np.all(mean_r == 0) and np.all(var_r == 1)),
        constant=int(np.sum(counted & flat)),
        axis_smoothness=shares,
        local=local,
        in_eval=in_eval,
      )
    )
  first = next((r.name for r in layers if r.in_eval > DEPARTURE), None)
  findings = _findings(face, layers, labels_given)
  return Report(tuple(layers), findings, first, accuracy, len(xs))


def _accuracy(outputs: list[Any], batches: list[Any]) -> float:
  correct = total = 0
  for out, (_, y) in zip(outputs, batches, strict=True):
    out, y = np.asarray(out), np.asarray(y)
    if out.ndim != 2 or y.shape != out.shape[:1]:
      raise ValueError(
        f"diagnose: with (x, y) batches the model's output must be logits (N, classes) and y "
        f"int labels (N,), got output {out.shape} and y {y.shape}; pass the inputs alone "
        f"to skip the accuracies."
      )
    correct += int(np.sum(out.argmax(-1) == y))
    total += len(y)
  return correct / total


# --------------------------------------------------------------------------
# The verdict


def _findings(face: _Face, layers: list[LayerReport], pairs: bool) -> tuple[Finding, ...]:
  xs = "(x for x, _ in batches)" if pairs else "batches"
  population_fix = face.population.format(xs=xs)
  found: dict[str, list[LayerReport]] = {}
  for r in layers:
    flagged = r.local > DEPARTURE or r.in_eval > DEPARTURE
    if r.values_per_batch == 1:
      found.setdefault("batch_of_one", []).append(r)
    elif r.never_updated and flagged:
      found.setdefault("never_updated", []).append(r)
    elif _suspect_axis(r) is not None:
      found.setdefault("wrong_axis", []).append(r)
    elif r.local > DEPARTURE:
      w = r.window
      if w is not None and r.updates is not None:  # the count decides where it is known
        young = r.updates < w
      else:
        young = r.ema_progress is not None and r.ema_progress < _SETTLED
      if young:
        found.setdefault("ema_not_settled", []).append(r)
      elif r.values_per_batch <= _SMALL:
        found.setdefault("small_batches", []).append(r)
      else:
        found.setdefault("stale_statistics", []).append(r)
    if r.constant:
      found.setdefault("dead_features", []).append(r)

  out = []
  for cause in CAUSES:
    rs = found.get(cause)
    if not rs:
      continue
    r = rs[0]
    message, fix = _explain(cause, r, rs, face, population_fix)
    out.append(
      Finding(cause, r.name, tuple(x.name for x in rs), message, fix, cause == "dead_features")
    )
  return tuple(out)


def _explain(cause: str, r: LayerReport, rs: list[LayerReport], face: _Face, population_fix: str):
  n = len(rs)
  also = f" (and {n - 1} later layer{'s' if n > 2 else ''})" if n > 1 else ""
  if cause == "batch_of_one":
    return (
      f"a batch of the inputs given gives this layer{also} 1 value per feature in the "
      f"training-mode forward: its variance is 0 and its output is `bias` whatever the input. "
      f"Predict in evaluation mode, with the running statistics.",
      face.eval_mode,
    )
  if cause == "never_updated":
    return (
      f"the running statistics of this layer{also} are still the initial mean 0 and variance 1 "
      f"(the batches' mean shift {r.mean_shift:.2f} running std, evaluation-mode departure "
      f"{r.local:.2f}): the state returned by the training step was never kept. Compute them "
      f"now from training data, and keep the returned state in the training loop.",
      f"{population_fix}\n# and keep the state the training step returns:\n"
      + "\n".join(f"# {line}" for line in face.thread.splitlines()),
    )
  if cause == "wrong_axis":
    smooth = r.axis_smoothness or {}
    axis = _suspect_axis(r)
    o = r.options
    assert axis is not None and o is not None and r.input_shape is not None
    feature = (o.axis if isinstance(o.axis, int) else o.axis[0]) % len(r.input_shape)
    return (
      f"this layer normalizes axis {feature} of its input {r.input_shape}, whose neighbouring "
      f"entries correlate like positions ({smooth[feature]:.2f}), while those along axis "
      f"{axis} do not ({smooth[axis]:.2f}), as channels: the statistics are per position. "
      f"Normalize axis {axis} (channel-first input), and retrain.",
      face.axis.format(axis=axis, name=r.name),
    )
  if cause == "ema_not_settled":
    o = r.options
    window = r.window
    seen = "" if r.updates is None else f" after {r.updates} updates"
    progress = (
      ""
      if r.ema_progress is None
      else (f"; they have covered {r.ema_progress:.0%} of the way from their initial values")
    )
    momentum = "" if o is None or o.momentum is None else f" with momentum {o.momentum}"
    horizon = "" if window is None else f" (its window is {window:.0f} updates)"
    implied = ""
    if r.updates is None and o is not None and isinstance(o.momentum, float) and 0 < o.momentum < 1:
      if r.ema_progress is not None and 0 < r.ema_progress < 1:
        t = math.log(1 - r.ema_progress) / math.log(o.momentum)
        implied = f", as a moving average does after about {t:.0f} updates"
    faster = ""
    if r.updates and o is not None and o.momentum is not None:
      tenth = 1 - 10 / max(r.updates, 20)
      faster = f"\n# or train with a window of a tenth of the steps: momentum={tenth:.4g}"
    return (
      f"the running statistics of this layer{also} are a moving average{momentum}{horizon} that "
      f"has not settled{seen}{progress}{implied} (mean shift {r.mean_shift:.2f} running std, "
      f"departure {r.local:.2f}). Replace them by the training data's statistics, or train with "
      f"ema_warmup=True.",
      f"{population_fix}\n# or train with jaxbn.BNOptions(..., ema_warmup=True){faster}",
    )
  if cause == "small_batches":
    return (
      f"this layer{also} sees {r.values_per_batch} values per feature in a batch; the batch "
      f"means spread by {r.spread:.2f} running std from batch to batch, and the running "
      f"statistics are settled but depart by {r.local:.2f}. Train with larger batches, or "
      f"with batch renormalization; population statistics help where the running average "
      f"is the problem.",
      f"{population_fix}\n# or train with jaxbn.BNOptions(..., renorm=jaxbn.renorm_schedule())",
    )
  if cause == "stale_statistics":
    return (
      f"the running statistics of this layer{also} have seen enough updates but differ from "
      f"the statistics of the batches given (mean shift {r.mean_shift:.2f} running std, log "
      f"variance ratio {r.log_var_ratio:.2f}, departure {r.local:.2f}): either the weights "
      f"moved faster than the moving average's window, which still holds statistics of older "
      f"weights, or these batches differ from the training data (other data, other "
      f"preprocessing). Recompute the statistics over training data with the final weights; "
      f"if that does not close the gap, compare the preprocessing of both data.",
      population_fix,
    )
  return (
    f"{r.constant} feature(s) of this layer{also} are constant over every batch given "
    f"(dead units before it); batch norm maps them to `bias`.",
    "# nothing to fix in batch norm: look at the layer before it",
  )


# --------------------------------------------------------------------------
# The faces and the entry point


def _kwargs(kw: dict[str, Any], flip_train: bool = False) -> str:
  return "".join(
    f", {k}={(not v) if flip_train and k == 'train' and isinstance(v, bool) else v!r}"
    for k, v in kw.items()
  )


def _face(fn: str, model: Any, kw: dict[str, Any], given: dict[str, Any]) -> _Face:
  """The face of ``model``: how to run it, and the fixes in its terms."""
  training = sys.modules.get("jaxbn.training")
  if training is not None and isinstance(model, training.TrainState):
    from jaxbn import linen as jl

    module = training.state.linen_model(fn, model)
    variables = {"params": model.params, "batch_stats": model.batch_stats}
    kw = {"train": True, **kw}
    forward, states = jl._population_forward(fn, module, variables, **kw)
    return _Face(
      "train_state",
      forward,
      variables,
      states,
      False,
      "state = jaxbn.training.population_stats(state, batches)  # batches of training data",
      "metrics = jaxbn.training.eval_step(state, (x, y))  # with the running statistics",
      "state, metrics = jaxbn.training.train_step(state, (x, y))  # returns the new batch_stats",
      "jaxbn.linen.BatchNorm(axis={axis})  # the layer {name}",
    )
  flax = sys.modules.get("flax")
  if flax is not None and isinstance(model, sys.modules["flax.linen"].Module):
    from jaxbn import linen as jl

    variables = _required(fn, "variables", given, "the model's variables (model.init(...))")
    forward, states = jl._population_forward(fn, model, variables, **kw)
    return _Face(
      "linen",
      forward,
      variables,
      states,
      False,
      f"variables = jaxbn.linen_population_stats(model, variables, {{xs}}{_kwargs(kw)})",
      f"logits = model.apply(variables, x{_kwargs(kw, True)})  # use_running_average=True",
      f"logits, updates = model.apply(variables, x{_kwargs(kw)}, mutable=['batch_stats'])\n"
      "variables = {**variables, 'batch_stats': updates['batch_stats']}  # keep the new statistics",
      "jaxbn.linen.BatchNorm(axis={axis})  # the layer {name}",
    )
  if flax is not None and isinstance(model, sys.modules["flax.nnx"].Module):
    from jaxbn import nnx as jn

    forward, nnx_state, states = jn._population_forward(fn, model, **kw)
    return _Face(
      "nnx",
      forward,
      nnx_state,
      states,
      False,
      f"jaxbn.nnx_population_stats(model, {{xs}}{_kwargs(kw)})",
      "model.eval()  # the running statistics, until model.train()",
      "# with jax.jit and nnx.split/nnx.merge, return nnx.state(model) from the step and\n"
      "nnx.update(model, new_state)  # or use nnx.jit, which keeps the updates",
      "jaxbn.nnx.BatchNorm(..., axis={axis})  # the layer {name}",
    )
  eqx = sys.modules.get("equinox")
  if eqx is not None and isinstance(model, eqx.Module):
    from jaxbn import equinox as je

    state = _required(fn, "state", given, "the model's eqx.nn.State")
    run, arrays, states = je._population_forward(fn, model, state, given.get("forward"))
    extra = ", forward=forward" if given.get("forward") is not None else ""
    return _Face(
      "equinox",
      run,
      arrays,
      states,
      False,
      f"state = jaxbn.equinox.equinox_population_stats(model, state, {{xs}}{extra})",
      "model = eqx.nn.inference_mode(model)  # the running statistics",
      "out, state = model(x, state)  # keep the returned state",
      "jaxbn.equinox.BatchNorm(..., axis={axis})  # the layer {name}",
    )
  if callable(model):
    params = _required(fn, "params", given, "the params passed to forward")
    state = _required(fn, "state", given, "the BNState pytree passed to forward")
    leaves, treedef = population._flatten_states(fn, state)
    paths = jax.tree_util.tree_flatten_with_path(state, is_leaf=population._is_state)[0]
    names = [jax.tree_util.keystr(path) or "state" for path, _ in paths]

    user: Callable[..., Any] = model

    def forward(params, states, x, **bn_kwargs):
      out, new = user(
        params, jax.tree.unflatten(treedef, [states[k] for k in names]), x, **bn_kwargs
      )
      return out, dict(zip(names, jax.tree.leaves(new, is_leaf=population._is_state), strict=True))

    return _Face(
      "functional",
      forward,
      params,
      dict(zip(names, leaves, strict=True)),
      True,
      "state = jaxbn.population_stats(forward, params, state, {xs})",
      "y = jaxbn.bn_infer(params, layer_state, x)  # the running statistics",
      "y, layer_state = jaxbn.bn_train(params, layer_state, x)  # keep the returned state",
      "jaxbn.bn_train(params, layer_state, x, axis={axis})  # the layer {name}",
    )
  raise TypeError(
    f"{fn}: model must be a flax.linen or flax.nnx module, an equinox module, a "
    f"jaxbn.training.TrainState or a forward function, got {type(model).__name__}."
  )


def _required(fn: str, name: str, given: dict[str, Any], what: str) -> Any:
  if given.get(name) is None:
    raise TypeError(f"{fn}: this model needs {name}=..., {what}.")
  return given[name]


def diagnose(
  model: Any,
  batches: Iterable[Any],
  *,
  variables: Any = None,
  state: Any = None,
  params: Any = None,
  forward: Callable[..., Any] | None = None,
  steps: int | None = None,
  **kwargs: Any,
) -> Report:
  """Why a model is good in training mode and bad in evaluation mode.

  Runs the model on ``batches`` in training mode and in evaluation mode and
  measures, at every batch norm: the distance of the batches' statistics
  from the running ones; how far the running average has come from its
  initial values against the updates it has seen; constant features; whether
  the feature axis is the one the data's features live on; and how far the
  evaluation-mode output departs from the training-mode one, on the layer's
  own input and in the evaluation-mode forward. Then it names the likely
  causes, most likely first, each with its layer and its fix as code (see
  the module docstring for the causes and the measures). Nothing in the
  model changes.

  Every face of jaxbn:

  - a flax.linen model: ``diagnose(model, batches, variables=variables,
    **apply_kwargs)`` (e.g. ``train=True``);
  - a :class:`jaxbn.training.TrainState`: ``diagnose(state, batches)`` (its
    ``step`` counts the updates);
  - a flax.nnx model: ``diagnose(model, batches, **call_kwargs)``;
  - an equinox model: ``diagnose(model, batches, state=state)``, with
    ``forward=`` for per-example layers (as
    :func:`jaxbn.equinox.equinox_population_stats`);
  - the functional core: ``diagnose(forward, batches, params=params,
    state=states)`` with ``forward(params, states, x, **bn_kwargs) ->
    (output, new_states)`` passing ``bn_kwargs`` on to every
    :func:`jaxbn.bn_train` call (the contract of
    :func:`jaxbn.population_stats`); it should not be jitted itself, so that
    the layers' options and inputs can be observed.

  Args:
    model: the model, train state or forward function.
    batches: inputs ``x``, or ``(x, y)`` pairs with int labels (then the
      report has accuracies in each mode). A handful of batches of the size
      the model is evaluated with; each is run three times.
    variables: a linen model's variables.
    state: an equinox model's state, or the functional core's states.
    params: the functional core's params.
    forward: an equinox model's batched training call (see above).
    steps: training updates so far, where the layers do not store a step
      (flax's default layers); a TrainState gives its own.
    **kwargs: passed to a linen model's ``apply`` or an nnx model's call.

  Returns:
    A :class:`Report`; ``print(report)`` shows the table and the verdict.

  Raises:
    TypeError: a model of another kind, or an argument it needs is missing.
    ValueError: no batch.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxbn
    >>> params, state = jaxbn.bn_init(3)
    >>> def forward(params, state, x, **bn_kwargs):
    ...   return jaxbn.bn_train(params, state, x, **bn_kwargs)
    >>> x = 5 + 2 * jax.random.normal(jax.random.key(0), (64, 3))
    >>> report = jaxbn.diagnose(forward, [x[:32], x[32:]], params=params, state=state)
    >>> report.cause, report.findings[0].layer  # the state was never updated
    ('never_updated', 'state')
  """
  fn = "diagnose"
  batches = list(batches)
  if not batches:
    raise ValueError(f"{fn}: batches is empty; give at least one batch of inputs.")
  if steps is None and type(model).__name__ == "TrainState" and hasattr(model, "step"):
    steps = int(model.step)
  given = {"variables": variables, "state": state, "params": params, "forward": forward}
  face = _face(fn, model, kwargs, given)
  return _analyse(fn, face, batches, steps)
