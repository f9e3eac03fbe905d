"""Moments and their exact merges: the one place jaxbn computes statistics.

Every statistic in jaxbn (a mini-batch in ``bn_train``, shards of a batch on
several devices, ghost batches, the population statistics over a whole data
set) is a :class:`Moments` triple ``(count, mean, m2)`` where ``m2`` is the sum
of squared deviations from ``mean``. Triples merge exactly with Chan's formula
(Chan, Golub & LeVeque 1979)::

    n     = n_a + n_b
    delta = mean_b - mean_a
    mean  = mean_a + delta * n_b / n
    m2    = m2_a + m2_b + delta**2 * n_a * n_b / n

Numerical decisions, each deliberate:

* Reductions run in at least float32, whatever the input dtype.
* The variance is two-pass (mean first, then squared deviations from it), never
  ``E[x^2] - E[x]^2``, which cancels catastrophically far from zero.
* A count of zero is safe: its mean and variance are 0 and it merges as a
  no-op; nothing divides by zero.
* Across devices (:func:`batch_moments` with ``axis_name``), counts and sums
  are summed first, then squared deviations from that global mean: the
  two-pass algorithm over the whole batch, so unequal or masked shards give
  the statistics of the whole batch (an equal-weight mean of per-shard means
  does not).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Moments(NamedTuple):
  """Sufficient statistics of a set of values, per feature.

  Attributes:
    count: number of values (float32; a masked count need not be an integer
      power of anything, and float32 keeps the tree one dtype).
    mean: their mean (float32).
    m2: the sum of their squared deviations from ``mean`` (float32, >= 0).
  """

  count: Array
  mean: Array
  m2: Array


def stat_dtype(dtype: Any) -> jnp.dtype:
  """The dtype statistics are computed in: at least float32."""
  dtype = jnp.dtype(dtype)
  return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


class Shifted(NamedTuple):
  """Moments of a batch with the mean kept as ``shift + delta``.

  Far from zero a float32 mean cannot hold the digits that ``x - mean``
  needs (at ``1e6`` its spacing is 0.06); ``x - shift`` is exact for ``shift``
  near the data and ``delta`` is small, so ``(x - shift) - delta`` keeps every
  digit of the deviations. ``mean = shift + delta``.

  Attributes:
    count: number of values (float).
    shift: the reference value each value was shifted by (same on every
      device under ``axis_name``).
    delta: ``mean - shift``.
    m2: sum of squared deviations from the mean (>= 0).
  """

  count: Array
  shift: Array
  delta: Array
  m2: Array

  def moments(self) -> Moments:
    """The plain :class:`Moments` (``mean = shift + delta``, rounded once)."""
    return Moments(self.count, self.shift + self.delta, self.m2)


def _first(x: Array, axes: Sequence[int]) -> Array:
  """``x`` at index 0 along ``axes`` (kept with size 1)."""
  return jax.lax.slice(
    x, (0,) * x.ndim, tuple(1 if i in axes else s for i, s in enumerate(x.shape))
  )


def reference_value(
  x: Array,
  axes: Sequence[int],
  *,
  mask: Array | None = None,
  fallback: Array | None = None,
  axis_name: Any = None,
  axis_index_groups: Any = None,
) -> Array:
  """A per-feature value near the data to shift by: the first valid element.

  The shifted-data algorithm (Chan, Golub & LeVeque 1983) sums ``x - K``
  instead of ``x``; any ``K`` near the data keeps both passes exact to
  rounding, so the first element along ``axes`` serves. Where it is masked out
  or not finite, ``fallback`` (default 0) is used. Across devices the
  elements of all devices are averaged, so that every device shifts by the
  same value. The result carries no gradient.
  """
  axes = tuple(axes)
  k = _first(x, axes)
  ok = jnp.isfinite(k)
  if mask is not None:
    valid = mask if mask.dtype == jnp.bool_ else mask != 0
    ok = ok & _first(jnp.broadcast_to(valid, x.shape), axes)
  other = jnp.zeros((), x.dtype) if fallback is None else fallback.astype(x.dtype)
  if axis_name is None:
    k = jnp.where(ok, k, other)
  else:
    okf = ok.astype(x.dtype)
    total, n = psum((jnp.where(ok, k, 0), okf), axis_name, axis_index_groups)
    k = jnp.where(n > 0, total / jnp.maximum(n, 1), other)
  return jax.lax.stop_gradient(k)


def shifted_moments(
  x: Array,
  axes: Sequence[int],
  *,
  mask: Array | None = None,
  shift: Array | None = None,
  axis_name: Any = None,
  axis_index_groups: Any = None,
  dtype: Any = None,
) -> Shifted:
  """Two-pass moments of ``x`` over ``axes`` from values shifted by ``shift``.

  ``delta = sum(x - shift) / n`` first, then ``m2 = sum(((x - shift) - delta)^2)``.
  Masked-out positions enter neither sum (they are selected away, not
  multiplied by 0, so NaN or inf there stay out). With ``axis_name`` the
  counts and sums are summed over devices before the next pass: the two-pass
  algorithm on the whole batch.

  Args:
    x: floating array (computed in ``stat_dtype(x.dtype)``).
    axes: the axes to reduce.
    mask: optional array broadcastable to ``x``; nonzero entries count.
    shift: per-feature shift broadcastable against ``x`` with the reduced
      axes of size 1; default :func:`reference_value`.
    axis_name: optional named axis the values are split over.
    axis_index_groups: optional subgroups of ``axis_name``.
    dtype: the dtype to compute in (default ``stat_dtype(x.dtype)``).

  Returns:
    :class:`Shifted` with the reduced axes kept.
  """
  axes = tuple(axes)
  dtype = stat_dtype(x.dtype) if dtype is None else jnp.dtype(dtype)
  x = x.astype(dtype)
  if shift is None:
    shift = reference_value(
      x, axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups
    )
  shift = shift.astype(dtype)
  d = x - shift
  keep = tuple(1 if i in axes else s for i, s in enumerate(x.shape))
  if mask is None:
    valid = None
    n = 1
    for a in axes:
      n *= x.shape[a]
    count = jnp.full(keep, n, dtype)
    total = jnp.sum(d, axes, keepdims=True)
  else:
    valid = mask if mask.dtype == jnp.bool_ else mask != 0
    count = jnp.sum(jnp.broadcast_to(valid, x.shape), axes, keepdims=True, dtype=dtype)
    total = jnp.sum(jnp.where(valid, d, 0), axes, keepdims=True)
  if axis_name is not None:
    count, total = psum((count, total), axis_name, axis_index_groups)
  delta = total / jnp.where(count > 0, count, 1)
  # Copies of their own: XLA then recomputes x - shift inside this pass
  # instead of storing it (or a broadcast of delta) from the first.
  shift2, delta2 = jax.lax.optimization_barrier((shift, delta))
  sq = jnp.square((x - shift2) - delta2)
  m2 = jnp.sum(sq if valid is None else jnp.where(valid, sq, 0), axes, keepdims=True)
  if axis_name is not None:
    m2 = psum(m2, axis_name, axis_index_groups)
  return Shifted(count, jnp.broadcast_to(shift, keep), delta, m2)


def batch_moments(
  x: Array,
  axes: Sequence[int],
  *,
  mask: Array | None = None,
  axis_name: Any = None,
  axis_index_groups: Any = None,
) -> Moments:
  """Two-pass moments of ``x`` over ``axes``, kept with size 1.

  :func:`shifted_moments` with its mean rounded once: exact to rounding far
  from zero, NaN-safe in masked-out positions; with ``axis_name`` the
  statistics of every shard together.

  Args:
    x: floating array.
    axes: the axes to reduce.
    mask: optional array broadcastable to ``x``; only nonzero entries count.
    axis_name: optional named axis the values are split over.
    axis_index_groups: optional subgroups of ``axis_name``.

  Returns:
    :class:`Moments` with the reduced axes kept, in at least float32.
  """
  return shifted_moments(
    x, axes, mask=mask, axis_name=axis_name, axis_index_groups=axis_index_groups
  ).moments()


def moments(
  x: Array,
  axes: Sequence[int],
  *,
  mask: Array | None = None,
  keepdims: bool = False,
) -> Moments:
  """Two-pass moments of ``x`` over ``axes``, restricted to ``mask``.

  Args:
    x: floating array.
    axes: the axes to reduce.
    mask: optional boolean array broadcastable to ``x``; only True entries
      count.
    keepdims: keep the reduced axes with size 1.

  Returns:
    :class:`Moments` with the reduced shape, in at least float32.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbn import numerics
    >>> m = numerics.moments(jnp.array([[1.0], [2.0], [6.0]]), (0,))
    >>> m.count, m.mean, numerics.variance(m)
    (Array([3.], dtype=float32), Array([3.], dtype=float32), Array([4.6666665], dtype=float32))
  """
  m = batch_moments(x, axes, mask=mask)
  if keepdims:
    return m
  return Moments(*(jnp.squeeze(t, tuple(axes)) for t in m))


def merge(a: Moments, b: Moments) -> Moments:
  """Chan's exact merge of two sets of moments (elementwise over features).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbn import numerics
    >>> x = jnp.array([1.0, 2.0, 6.0, 7.0])
    >>> m = numerics.merge(numerics.moments(x[:1], (0,)), numerics.moments(x[1:], (0,)))
    >>> float(m.mean), float(numerics.variance(m))
    (4.0, 6.5)
  """
  n = a.count + b.count
  safe = jnp.where(n > 0, n, 1)
  delta = b.mean - a.mean
  mean = a.mean + delta * (b.count / safe)
  m2 = a.m2 + b.m2 + jnp.square(delta) * (a.count * b.count / safe)
  return Moments(n, mean, m2)


def merge_stacked(m: Moments, axis: int = 0) -> Moments:
  """Merges moments stacked along ``axis`` in one step (no Python loop).

  ``mean = sum(n_i mean_i) / N`` and ``m2 = sum(m2_i + n_i (mean_i - mean)^2)``:
  the same result as folding :func:`merge` over the stack.
  """
  n = jnp.sum(m.count, axis)
  safe = jnp.where(n > 0, n, 1)
  mean = jnp.sum(m.count * m.mean, axis) / safe
  dev = m.mean - jnp.expand_dims(mean, axis)
  m2 = jnp.sum(m.m2 + m.count * jnp.square(dev), axis)
  return Moments(n, mean, m2)


def psum(tree: Any, axis_name: Any, axis_index_groups: Any = None) -> Any:
  """Sums a pytree over a named axis (one collective).

  Without groups this is ``lax.psum``, whose result is replicated (invariant)
  under ``shard_map``. With ``axis_index_groups`` it is an ``all_gather``
  followed by a local sum, because ``psum`` does not support groups under
  ``shard_map``.
  """
  if axis_index_groups is None:
    return jax.lax.psum(tree, axis_name)
  gathered = jax.lax.all_gather(tree, axis_name, axis_index_groups=axis_index_groups)
  return jax.tree.map(lambda g: jnp.sum(g, 0), gathered)


def variance(m: Moments, ddof: int = 0) -> Array:
  """``m2 / (count - ddof)``, zero where that count is not positive."""
  d = m.count - ddof
  return jnp.where(d > 0, jnp.maximum(m.m2, 0) / jnp.where(d > 0, d, 1), 0)


class BatchAverage(NamedTuple):
  """Equal-weight averages over mini-batches, per feature (Algorithm 2).

  The inference statistics of Ioffe & Szegedy (2015, Algorithm 2) average the
  statistics of training mini-batches ``B`` of ``m`` values::

      E[x]   = E_B[mu_B]
      Var[x] = m / (m - 1) * E_B[var_B]

  Each batch here contributes its own unbiased variance ``m2 / (n - 1)``, so
  that batches of unequal sizes (a last, smaller batch; masks) are each
  corrected by their own ``n``; with equal sizes this is the formula above.

  Attributes:
    count: number of batches averaged so far (float32); a batch with fewer
      than 2 values of a feature has no unbiased variance and is skipped for
      that feature.
    mean: ``E_B[mu_B]`` (float32).
    var: ``E_B[n / (n - 1) var_B]`` (float32).
  """

  count: Array
  mean: Array
  var: Array


def batch_average_init(shape: Sequence[int], dtype: Any = jnp.float32) -> BatchAverage:
  """An empty :class:`BatchAverage` (no batch yet) of feature shape ``shape``."""
  zeros = jnp.zeros(tuple(shape), dtype)
  return BatchAverage(zeros, zeros, zeros)


def batch_average_add(avg: BatchAverage, m: Moments) -> BatchAverage:
  """Adds one batch, given by its moments, to the running averages.

  Incremental means (``avg += (value - avg) / k``) keep the accumulator
  constant in size and its values on the scale of the data.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbn import numerics
    >>> avg = numerics.batch_average_init((1,))
    >>> for b in (jnp.array([[1.0], [3.0]]), jnp.array([[2.0], [6.0]])):
    ...   avg = numerics.batch_average_add(avg, numerics.moments(b, (0,)))
    >>> avg.mean.tolist(), avg.var.tolist()  # means 2 and 4; unbiased vars 2 and 8
    ([3.0], [5.0])
  """
  take = m.count > 1
  k = avg.count + take.astype(avg.count.dtype)
  step = jnp.where(take, 1 / jnp.maximum(k, 1), 0).astype(avg.mean.dtype)
  mean = avg.mean + step * (m.mean.astype(avg.mean.dtype) - avg.mean)
  var = avg.var + step * (variance(m, ddof=1).astype(avg.var.dtype) - avg.var)
  return BatchAverage(k, mean, var)
