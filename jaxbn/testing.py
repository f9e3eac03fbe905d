"""Assertions for tests of models with batch normalization, built on chex.

Call them in your own tests, on your own model's layers; jaxbn's tests use them too.
Each computes its reference on the host in float64 NumPy, independently of jaxbn's
kernels, and fails with a chex ``AssertionError`` that names what was wrong.

- :func:`assert_normalized`: a training-mode output has, per feature, mean ``bias``
  and standard deviation ``|scale|`` over the batch (and positions), counting only the
  values a mask keeps (Ioffe & Szegedy 2015, Algorithm 1).
- :func:`assert_valid_state`: params and running statistics have one feature shape,
  the dtypes :func:`jaxbn.bn_init` gives, finite values and a variance that is not
  negative; what a diverged or badly restored layer fails.
- :func:`assert_running_stats_close`: running statistics are close to a population's
  (the paper's Algorithm 2, step 10), in units of the population's standard deviation:
  the first question to ask of a model that is good in training and bad in evaluation.

A framework's layer gives its ``(params, state)`` through its face:
:func:`jaxbn.linen.read_variables`, :func:`jaxbn.nnx.read_module`,
:meth:`jaxbn.equinox.BatchNorm.read`.

Examples:
  >>> import jax
  >>> import jaxbn
  >>> from jaxbn import testing
  >>> x = 5.0 + 3.0 * jax.random.normal(jax.random.key(0), (128, 4))
  >>> params, state = jaxbn.bn_init(4)
  >>> y, state = jaxbn.bn_train(params, state, x)
  >>> testing.assert_normalized(y)
  >>> testing.assert_valid_state(params, state)
  >>> testing.assert_running_stats_close(state, (x.mean(0), x.var(0)))  # after one step
  Traceback (most recent call last):
  ...
  AssertionError: assert_running_stats_close: feature ...'s running mean is 1.8 population
  standard deviations from the population's mean (0.05... against 5.2...; tol=0.1); 4 of 4
  features are off
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex
import numpy as np

from jaxbn.core import BNAccState
from jaxbn.core import BNParams
from jaxbn.core import BNState
from jaxbn.numerics import stats_dtype

__all__ = ("assert_normalized", "assert_running_stats_close", "assert_valid_state")


def _feature_axes(ndim: int, axis: int | Sequence[int], arg: str) -> tuple[int, ...]:
  axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
  out = []
  for a in axes:
    if not -ndim <= int(a) < ndim:
      raise ValueError(f"{arg}: axis {a} is out of range for an array of rank {ndim}")
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{arg}: axis {axis} names an axis twice")
  return tuple(sorted(out))


def assert_normalized(
  y: Any,
  *,
  axis: int | Sequence[int] = -1,
  mask: Any = None,
  params: BNParams | None = None,
  atol: float = 1e-3,
  rtol: float = 1e-2,
) -> None:
  """Asserts that a training-mode output is normalized per feature.

  For each feature ``j``, over the values ``y_i`` that ``mask`` keeps (all of
  the batch and positions by default),

      |mean(y_j) - beta_j| <= atol * max(1, |gamma_j|)
      |std(y_j) - |gamma_j|| <= rtol * |gamma_j| + atol

  with ``gamma = params.scale`` and ``beta = params.bias`` (1 and 0 without
  ``params``). The standard deviation is the biased one that batch norm
  divides by; ``epsilon`` makes it ``|gamma| sqrt(var / (var + eps))``, within
  the default ``rtol`` unless a feature's variance is below ``100 eps``.
  Features with fewer than two kept values are not checked (they have no
  spread); a feature that was constant in the batch comes out as ``beta``
  with no spread, and fails, as it should in a test of normalization.

  Args:
    y: the output of ``bn_train`` (or of a module in training mode).
    axis: the feature axis or axes, as in :class:`jaxbn.BNOptions`.
    mask: ``True`` where a value counts, broadcastable to ``y``'s shape
      (e.g. ``(batch, 1)`` for padded examples).
    params: the layer's :class:`jaxbn.BNParams`, for the expected mean and
      spread; default ``scale = 1``, ``bias = 0``.
    atol: absolute tolerance, in units of ``max(1, |gamma|)`` for the mean.
    rtol: relative tolerance of the standard deviation.

  Raises:
    AssertionError: a feature's mean or spread is off, or ``y`` is not
      finite where the mask keeps it.
    ValueError: ``axis``, ``mask`` or ``params`` does not fit ``y``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbn.testing import assert_normalized
    >>> y = jnp.array([[1.0, -1.0], [-1.0, 1.0], [0.0, 9.0]])
    >>> assert_normalized(y[:2])
    >>> assert_normalized(y)
    Traceback (most recent call last):
    ...
    AssertionError: [Chex] Assertion assert_trees_all_close failed: ...
    Mismatch at index:
     [1]: 3.0 (ACTUAL), 0.0 (DESIRED)
    ...
    >>> assert_normalized(y, mask=jnp.array([[True], [True], [False]]))
  """
  y64 = np.asarray(y, np.float64)
  feat = _feature_axes(y64.ndim, axis, "axis")
  reduce = tuple(a for a in range(y64.ndim) if a not in feat)
  fshape = tuple(y64.shape[a] for a in feat)
  if mask is None:
    keep = np.ones(y64.shape, bool)
  else:
    m = np.asarray(mask)
    if m.dtype != np.bool_:
      raise ValueError(f"mask: expected booleans, got dtype {m.dtype}")
    try:
      keep = np.broadcast_to(m, y64.shape)
    except ValueError:
      raise ValueError(
        f"mask: shape {m.shape} does not broadcast to the output's shape {y64.shape}"
      ) from None
  if params is None:
    gamma, beta = np.ones(fshape), np.zeros(fshape)
  else:
    gamma = np.asarray(params.scale, np.float64)
    beta = np.asarray(params.bias, np.float64)
    if gamma.shape != fshape or beta.shape != fshape:
      raise ValueError(
        f"params: scale {gamma.shape} and bias {beta.shape} should have the feature shape "
        f"{fshape} of axis={axis} in an output of shape {y64.shape}"
      )
  chex.assert_tree_all_finite(
    np.where(keep, y64, 0.0), custom_message="the output is not finite where the mask keeps it"
  )
  n = keep.sum(axis=reduce)
  few = np.argwhere(n < 2)
  if few.size and n.size == few.shape[0]:
    j = tuple(few[0])
    raise AssertionError(
      f"assert_normalized: feature {j[0] if len(j) == 1 else j} has {int(n[j])} kept value"
      f"{'' if n[j] == 1 else 's'}, and so does every other: nothing to check"
    )
  n_safe = np.maximum(n, 1)
  mean = np.where(keep, y64, 0.0).sum(axis=reduce) / n_safe
  centered = np.where(keep, y64 - np.expand_dims(mean, reduce), 0.0)
  std = np.sqrt((centered**2).sum(axis=reduce) / n_safe)
  checked = n >= 2
  expected_mean = np.where(checked, beta, mean)
  expected_std = np.where(checked, np.abs(gamma), std)
  scale_units = np.maximum(1.0, np.abs(gamma))
  chex.assert_trees_all_close(
    mean / scale_units,
    expected_mean / scale_units,
    atol=atol,
    rtol=0.0,
    custom_message=f"per-feature mean of the output against params.bias (axis={axis})",
  )
  chex.assert_trees_all_close(
    std,
    expected_std,
    atol=atol,
    rtol=rtol,
    custom_message=f"per-feature standard deviation against |params.scale| (axis={axis})",
  )


def assert_valid_state(params: BNParams | None, state: BNState | BNAccState) -> None:
  """Asserts that a layer's params and running statistics are usable.

  Checks, with chex: ``state`` is a :class:`jaxbn.BNState` or
  :class:`jaxbn.BNAccState`; ``mean``, ``var`` and ``count`` (and ``scale``,
  ``bias``) share one feature shape; the statistics have the dtype
  :func:`jaxbn.stats_dtype` gives for the params (float32 below float64),
  ``count`` too, ``step`` is an int32 scalar; every value is finite; ``var``
  and ``count`` are not negative. A layer that trained on a bad batch, or a
  checkpoint restored into the wrong shapes, fails here before it fails
  somewhere less clear.

  Args:
    params: the layer's :class:`jaxbn.BNParams`, or None to check the state
      alone (its dtype against float32 and float64).
    state: the layer's running statistics.

  Raises:
    AssertionError: naming the first entry that is wrong.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxbn
    >>> from jaxbn.testing import assert_valid_state
    >>> params, state = jaxbn.bn_init(3)
    >>> assert_valid_state(params, state)
    >>> assert_valid_state(params, state._replace(var=jnp.array([1.0, jnp.nan, 1.0])))
    Traceback (most recent call last):
    ...
    AssertionError: [Chex] Assertion assert_tree_all_finite failed: ... [state.var]
  """
  if not isinstance(state, (BNState, BNAccState)):
    raise AssertionError(
      f"assert_valid_state: state should be a jaxbn.BNState or BNAccState, got "
      f"{type(state).__name__}"
    )
  entries = {"state.mean": state.mean, "state.var": state.var, "state.count": state.count}
  if params is not None:
    if not isinstance(params, BNParams):
      raise AssertionError(
        f"assert_valid_state: params should be a jaxbn.BNParams, got {type(params).__name__}"
      )
    entries = {"params.scale": params.scale, "params.bias": params.bias, **entries}
    want = np.dtype(stats_dtype(params.scale.dtype))
    chex.assert_type(params.bias, params.scale.dtype, custom_message="params.bias")
  else:
    want = np.dtype(state.mean.dtype)
    if want not in (np.float32, np.float64):
      raise AssertionError(f"assert_valid_state: state.mean has dtype {want}, not float32/64")
  shapes = {name: np.shape(value) for name, value in entries.items()}
  if len(set(shapes.values())) > 1:
    raise AssertionError(
      "assert_valid_state: "
      + ", ".join(f"{name} {shape}" for name, shape in shapes.items())
      + " should share one feature shape"
    )
  fshape = np.shape(state.mean)
  for name, value in entries.items():
    chex.assert_tree_all_finite(value, custom_message=name)
  for name in ("state.mean", "state.var", "state.count"):
    chex.assert_type(entries[name], want, custom_message=name)
  chex.assert_shape(state.step, (), custom_message="state.step")
  chex.assert_type(state.step, np.int32, custom_message="state.step")
  for name in ("state.var", "state.count"):
    low = float(np.min(np.asarray(entries[name]), initial=0.0))
    if low < 0:
      raise AssertionError(f"assert_valid_state: {name} has a negative entry ({low:g})")
  if isinstance(state, BNAccState):
    for field in ("count", "mean", "m2"):
      value = getattr(state.acc, field)
      chex.assert_shape(value, fshape, custom_message=f"state.acc.{field}")
      chex.assert_tree_all_finite(value, custom_message=f"state.acc.{field}")


def assert_running_stats_close(
  state: BNState | BNAccState, population: Any, *, tol: float = 0.1
) -> None:
  """Asserts that running statistics are close to a population's.

  With ``m, v`` the running mean and variance and ``mu, s2`` the
  population's, per feature:

      |m - mu| / sqrt(s2) <= tol      and      |v / s2 - 1| <= tol,

  the mean in units of the population's standard deviation (the scale
  normalization works in), the variance as a ratio. A model that is good in
  training mode and bad in evaluation mode usually fails this: its running
  statistics never moved, lag far behind (``momentum`` too slow for the steps
  taken) or describe other data.

  Args:
    state: the layer's running statistics.
    population: the population's statistics: a state from
      :func:`jaxbn.population_stats`, or a ``(mean, var)`` pair.
    tol: the tolerance of both comparisons (default 0.1: a tenth of a standard
      deviation, 10% of the variance).

  Raises:
    AssertionError: naming the worst feature, its value and the population's.
    ValueError: the two have different feature shapes.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxbn
    >>> from jaxbn.testing import assert_running_stats_close
    >>> _, state = jaxbn.bn_init(2)
    >>> assert_running_stats_close(state, (jnp.array([0.05, 0.0]), jnp.array([1.0, 1.05])))
  """
  if isinstance(population, (BNState, BNAccState)):
    mu, s2 = population.mean, population.var
  else:
    mu, s2 = population
  m = np.asarray(state.mean, np.float64)
  v = np.asarray(state.var, np.float64)
  mu = np.asarray(mu, np.float64)
  s2 = np.asarray(s2, np.float64)
  if not m.shape == v.shape == mu.shape == s2.shape:
    raise ValueError(
      f"population: mean {mu.shape} and var {s2.shape} should have the state's feature "
      f"shape {m.shape}"
    )
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(s2)) and np.all(s2 >= 0)):
    raise ValueError("population: its mean and var should be finite, and its var not negative")
  chex.assert_tree_all_finite((m, v), custom_message="the running statistics")
  with np.errstate(divide="ignore", invalid="ignore"):
    shift = np.abs(m - mu) / np.sqrt(s2)
    ratio = np.abs(v / s2 - 1.0)
  # A population without spread: any difference is infinitely many deviations, none is 0.
  shift = np.where(m == mu, 0.0, shift)
  ratio = np.where(v == s2, 0.0, ratio)
  for name, dev, what in (
    ("mean", shift, "population standard deviations from the population's mean"),
    ("var", ratio, "relative error from the population's variance"),
  ):
    worst = np.unravel_index(np.argmax(dev), dev.shape) if dev.size else None
    if worst is not None and dev[worst] > tol:
      j = worst if len(worst) != 1 else worst[0]
      ours = m[worst] if name == "mean" else v[worst]
      theirs = mu[worst] if name == "mean" else s2[worst]
      raise AssertionError(
        f"assert_running_stats_close: feature {j}'s running {name} is {dev[worst]:.2g} "
        f"{what} ({ours:.6g} against {theirs:.6g}; tol={tol}); "
        f"{int(np.sum(dev > tol))} of {dev.size} features are off"
      )
