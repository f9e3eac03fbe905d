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
* The variance is never ``E[x^2] - E[x]^2`` of the raw values, which cancels
  catastrophically far from zero. The sums are taken of values shifted by a
  per-feature reference near the data (``S1 = sum(x - K)``,
  ``S2 = sum((x - K)^2)``, one pass of independent reductions,
  :func:`shifted_sums`). ``K`` is the mean of a strided ``1 / SUBSET`` of the
  values (:func:`reference_shift`), within ``sqrt(SUBSET)`` standard deviations
  of the mean whatever the data, so one pass is exact to float32 rounding with
  no predicate and no conditional (:func:`shifted_moments`).
* A count of zero is safe: its mean and variance are 0 and it merges as a
  no-op; nothing divides by zero.
* Across devices (:func:`batch_moments` with ``axis_name``), the reference's
  sums cross devices first (one collective of per-feature values, so that it
  is the same on every device), then the count and both sums in one more: the
  statistics of the whole batch, so unequal or masked shards are weighed by
  their counts (an equal-weight mean of per-shard means is not).
* Several inputs that share one set of statistics (``x`` a tuple of arrays
  with the same features, :func:`shifted_sums`) are never concatenated: each
  input's sums are taken over its own reduced axes and added per feature, so
  the count and the sums of all of them cross devices together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple
from typing import cast

import jax
import jax.numpy as jnp

__all__ = (
  "REFINE_RATIO",
  "SUBSET",
  "BatchAverage",
  "Moments",
  "Shifted",
  "batch_average_add",
  "batch_average_init",
  "batch_moments",
  "copies",
  "mean_and_residual",
  "merge",
  "merge_stacked",
  "moments",
  "needs_refinement",
  "psum",
  "reference_shift",
  "shifted_moments",
  "shifted_sums",
  "stats_dtype",
  "variance",
)

Array = jax.Array


class Moments(NamedTuple):
  """Sufficient statistics of a set of values, per feature.

  Attributes:
    count: number of values (float32; a masked count need not be an integer
      power of anything, and float32 keeps the tree one dtype).
    mean: their mean (float32).
    m2: the sum of their squared deviations from ``mean`` (float32, >= 0).
  """

  # A public field: it shadows the method tuple.count, on purpose (pyright flags the override).
  count: Array  # pyright: ignore[reportIncompatibleMethodOverride]
  mean: Array
  m2: Array


def stats_dtype(dtype: Any) -> jnp.dtype:
  """The dtype of statistics for values (or a model's parameters) of ``dtype``.

  float64 for float64 (with ``jax_enable_x64``; without it JAX has no
  float64 arrays), float32 for every other floating dtype: reductions run in
  at least float32, and a bfloat16 or float16 model keeps float32 running
  statistics (in half precision an average with a momentum near 1 cannot move).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbn import stats_dtype
    >>> stats_dtype(jnp.bfloat16)
    dtype('float32')
  """
  if jnp.dtype(dtype) == jnp.float64 and jax.config.read("jax_enable_x64"):
    return jnp.dtype(jnp.float64)
  return jnp.dtype(jnp.float32)


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

  # A public field: it shadows the method tuple.count, on purpose (pyright flags the override).
  count: Array  # pyright: ignore[reportIncompatibleMethodOverride]
  shift: Array
  delta: Array
  m2: Array

  def moments(self) -> Moments:
    """The plain :class:`Moments` (``mean = shift + delta``, rounded once)."""
    return Moments(self.count, self.shift + self.delta, self.m2)


def mean_and_residual(shift: Array, delta: Array) -> tuple[Array, Array]:
  """``shift + delta`` rounded once, and what the rounding left out, exactly.

  Knuth's TwoSum: ``mean = fl(shift + delta)`` and ``residual = (shift +
  delta) - mean`` with no error (round-to-nearest, no reassociation), so
  ``x - shift - delta = (x - mean) - residual`` keeps every digit far from zero
  (``x - mean`` is exact near the mean; ``residual`` is below half a spacing
  of ``mean``). When the values are all equal to ``mean``, ``residual`` is 0.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbn import numerics
    >>> m, r = numerics.mean_and_residual(jnp.float32(1e6), jnp.float32(0.01))
    >>> float(m), float(r)  # 1e6 + 0.01 is not a float32; r holds the rest
    (1000000.0, 0.009999999776482582)
  """
  mean = shift + delta
  d = mean - shift
  s = mean - d
  return mean, (shift - s) + (delta - d)


def copies(tree: Any, k: int) -> list[Any]:
  """``k`` copies of small per-feature values that XLA may not merge.

  XLA stores an elementwise expression of ``x`` that feeds several full-size
  consumers instead of recomputing it in each; written from separate copies
  of the per-feature values, each consumer computes its own from ``x`` in the
  same pass, and no full-size intermediate is written.
  """
  return list(jax.lax.optimization_barrier((tree,) * k))


def _inputs(
  x: Any, axes: Any, mask: Any
) -> tuple[tuple[Array, ...], tuple[tuple[int, ...], ...], tuple[Array | None, ...]]:
  """``(inputs, axes of each, mask of each)`` of one array or a tuple of them."""
  if not isinstance(x, (tuple, list)):
    return (x,), (tuple(axes),), (mask,)
  xs = tuple(x)
  if not xs:
    raise ValueError("numerics: x is an empty tuple; give at least one array.")
  axes = tuple(axes)
  nested = any(isinstance(a, (tuple, list)) for a in axes)
  per = tuple(map(tuple, axes)) if nested else (axes,) * len(xs)
  if mask is not None and not isinstance(mask, (tuple, list)):
    raise TypeError(
      f"numerics: x is a tuple of {len(xs)} inputs but mask is one array; give a tuple of "
      f"one mask (or None) per input."
    )
  masks = (None,) * len(xs) if mask is None else tuple(mask)
  if len(per) != len(xs) or len(masks) != len(xs):
    raise ValueError(
      f"numerics: {len(xs)} inputs, but {len(per)} tuples of axes and {len(masks)} masks; "
      f"give one of each per input."
    )
  kept = {
    tuple(s for i, s in enumerate(t.shape) if i not in a) for t, a in zip(xs, per, strict=True)
  }
  if len(kept) > 1:
    raise ValueError(
      f"numerics: the inputs' kept (feature) axes differ in size: {sorted(kept)}; joint "
      f"moments need the same features in every input."
    )
  return xs, per, masks


def _dtype_of(xs: Sequence[Array]) -> jnp.dtype:
  """:func:`stats_dtype` of the widest of the inputs' dtypes."""
  return max((stats_dtype(t.dtype) for t in xs), key=lambda d: jnp.finfo(d).bits)


def _like(t: Array, keep: tuple[int, ...]) -> Array:
  """A per-feature value in the layout ``keep`` (the same features, other axes of size 1)."""
  return t if t.shape == keep else t.reshape(keep)


def _add(total: Array | None, t: Array) -> Array:
  return t if total is None else total + t


# The one-pass variance's relative error is about ``eps * (1 + delta^2 / var)``
# (``eps`` the float32 spacing, 1.2e-7): a shift farther from the mean than
# ``sqrt(REFINE_RATIO)`` standard deviations loses more than ``33 eps`` (4e-6).
# shifted_moments' shift stays within sqrt(SUBSET) (SUBSET < REFINE_RATIO).
REFINE_RATIO = 32.0
"""``delta^2 / var`` beyond which one pass loses digits (:func:`needs_refinement`)."""


def shifted_sums(
  x: Array | Sequence[Array],
  axes: Sequence[int] | Sequence[Sequence[int]],
  shift: Array,
  *,
  mask: Array | Sequence[Array | None] | None = None,
  axis_name: Any = None,
  axis_index_groups: Any = None,
  dtype: Any = None,
) -> Shifted:
  """One-pass moments of ``x`` over ``axes`` from values shifted by ``shift``.

  With ``d = x - shift`` over the valid values, ``S1 = sum(d)``,
  ``S2 = sum(d^2)`` and their count ``n`` (independent reductions of one
  pass, and, with ``axis_name``, one collective for all three)::

      delta = S1 / n,   m2 = max(S2 - S1 * delta, 0)

  This is the shifted-data algorithm (Chan, Golub & LeVeque 1983): its
  relative error in ``m2`` is about ``eps * (1 + delta^2 / var)``, exact to
  rounding when ``shift`` is within a few standard deviations of the mean
  (:func:`reference_shift` gives one that is). Masked-out positions enter
  no sum (selected away, not multiplied by 0: NaN or inf there stay out).

  ``x`` may be a tuple of arrays whose kept (feature) axes agree in size and
  order: their joint moments, as of their values concatenated, with no
  concatenation. Each input's ``n``, ``S1`` and ``S2`` are taken over its
  own axes and added per feature, before the collective.

  Args:
    x: floating array, or a tuple of them.
    axes: the axes to reduce; for a tuple ``x``, the same axes for every
      input or a tuple with each input's.
    shift: per-feature reference broadcastable against ``x`` (the first
      input) with the reduced axes of size 1, the same on every device under
      ``axis_name``.
    mask: optional array broadcastable to ``x``; nonzero entries count. For
      a tuple ``x``, None or a tuple of one mask (or None) per input.
    axis_name: optional named axis the values are split over.
    axis_index_groups: optional subgroups of ``axis_name``.
    dtype: the dtype to compute in (default ``stats_dtype`` of the widest
      input dtype).

  Returns:
    :class:`Shifted` with the reduced axes kept (the first input's layout).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbn import numerics
    >>> a, b = jnp.array([[1.0], [2.0]]), jnp.array([[3.0], [4.0], [5.0]])
    >>> st = numerics.shifted_sums((a, b), (0,), jnp.zeros((1, 1)))
    >>> st.count.tolist(), st.moments().mean.tolist(), st.m2.tolist()  # of 1, 2, 3, 4, 5
    ([[5.0]], [[3.0]], [[10.0]])
  """
  xs, per_axes, masks = _inputs(x, axes, mask)
  dtype = _dtype_of(xs) if dtype is None else jnp.dtype(dtype)
  keeps = [
    tuple(1 if i in a else s for i, s in enumerate(t.shape))
    for t, a in zip(xs, per_axes, strict=True)
  ]
  keep = keeps[0]  # the layout of the results
  shift = jnp.broadcast_to(jax.lax.stop_gradient(shift).astype(dtype), keep)
  s1 = s2 = count = None
  n = None  # values of the inputs without a mask (a constant)
  for t, a, m, k in zip(xs, per_axes, masks, keeps, strict=True):
    valid = None if m is None else (m if m.dtype == jnp.bool_ else m != 0)

    # Each sum subtracts the shift itself, from a copy of its own, so that no
    # full-size `x - shift` is written: both read x. A shared `x - shift`
    # would be written once and read twice (ResNet-18's batch norms: 767 MiB
    # accessed against 617; one core, the same time within the noise). The
    # copies come from a barrier of three, which XLA cannot merge with the
    # backward pass's barrier of two copies of the same shift.
    _, s_a, s_b = copies(_like(shift, k), 3)
    d_a, d_b = t.astype(dtype) - s_a, t.astype(dtype) - s_b
    if valid is not None:
      d_a, d_b = jnp.where(valid, d_a, 0), jnp.where(valid, d_b, 0)
    # Each input's per-feature sums, in the first input's layout, added: the
    # joint sums of every input, and no full-size array spans two inputs.
    s1 = _add(s1, _like(jnp.sum(d_a, a, keepdims=True), keep))
    s2 = _add(s2, _like(jnp.sum(d_b * d_b, a, keepdims=True), keep))
    if valid is None:
      size = 1
      for i in a:
        size *= t.shape[i]
      n = size if n is None else n + size
    else:
      c = jnp.sum(jnp.broadcast_to(valid, t.shape), a, keepdims=True, dtype=dtype)
      count = _add(count, _like(c, keep))
  assert s1 is not None and s2 is not None  # _inputs gives at least one input
  if count is None:  # no input has a mask: n counts every value
    count = jnp.full(keep, cast(int, n), dtype)
  elif n is not None:
    count = count + n
  if axis_name is not None:
    # One collective: a constant count is not varying over the axis, and
    # psum of it is a multiplication, not a transfer.
    count, s1, s2 = psum((count, s1, s2), axis_name, axis_index_groups)
  # Both sums complete before either is used: XLA would otherwise fuse the
  # per-feature arithmetic below into one reduction's loop, which then waits
  # for the other reduction instead of running beside it.
  s1, s2 = jax.lax.optimization_barrier((s1, s2))
  delta = s1 / jnp.where(count > 0, count, 1)
  m2 = jnp.maximum(s2 - s1 * delta, 0)
  return Shifted(count, shift, delta, m2)


def needs_refinement(st: Shifted, floor: Any = 0.0) -> Array:
  """Whether any feature's shift is too far from its mean for one pass (a diagnostic).

  :func:`shifted_moments` never needs it (its shift is near the mean by
  construction); it tells whether a pass of :func:`shifted_sums` from a shift
  of one's own lost digits.

  True where ``delta^2 > REFINE_RATIO * (var + floor)`` for a finite
  ``delta`` and ``m2`` (a non-finite batch is not made finite by a second
  pass), reduced over every feature to one replicated scalar. ``floor`` is
  the smallest variance that matters to the caller (batch norm's
  ``epsilon``: the output depends on ``var + epsilon``); to it is added the
  square of 4 float spacings of the shift, a variance below the resolution of
  the data themselves. So a constant feature does not refine on every step
  when the shift sits a few spacings away from it (a running mean that
  stalled next to the value), where one pass is exact anyway.
  """
  var = variance(st.moments())
  resolution = 4 * jnp.finfo(st.shift.dtype).eps * jnp.abs(st.shift)
  ok = jnp.isfinite(st.delta) & jnp.isfinite(st.m2)
  limit = REFINE_RATIO * (var + floor + jnp.square(resolution))
  return jnp.any(ok & (jnp.square(st.delta) > limit))


SUBSET = 32
"""The shift of :func:`shifted_moments` is the mean of at least ``1 / SUBSET`` of the values."""


def _strides(t: Array, axes: tuple[int, ...]) -> dict[int, int]:
  """A stride per reduced axis, their product at most ``SUBSET`` (as close to it as sizes allow).

  The longest reduced axes first, and the first reduced axis (the batch's, the one
  split over devices) last: entries along another axis are on every device, and no
  data moves. Not the batch's axis when it is explicitly sharded (a strided slice of
  it would move data between devices). Every ``s``-th entry along axes of sizes ``L``
  keeps ``prod ceil(L / s)`` of the values, at least ``1 / prod s`` of them.
  """
  # A symbolic size (jax.export) is taken as large: every s-th entry still keeps at least
  # 1 / s of the values, however many there are.
  size = {a: t.shape[a] if isinstance(t.shape[a], int) else SUBSET for a in axes}
  order = sorted((a for a in axes[1:] if size[a] > 1), key=lambda a: -size[a])
  spec = getattr(getattr(jax.typeof(t), "sharding", None), "spec", None)
  sharded = spec is not None and len(spec) > axes[0] and spec[axes[0]] is not None
  if not sharded:
    order.append(axes[0])
  budget, strides = SUBSET, {}
  for a in order:
    step = min(budget, size[a])
    if step < 2:
      continue
    strides[a] = step
    budget //= step
  return strides


def reference_shift(
  x: Array | Sequence[Array],
  axes: Sequence[int] | Sequence[Sequence[int]],
  base: Array,
  *,
  mask: Array | Sequence[Array | None] | None = None,
  axis_name: Any = None,
  axis_index_groups: Any = None,
  dtype: Any = None,
) -> Array:
  """A per-feature shift provably near the mean, for one pass of :func:`shifted_sums`.

  Without a mask: the mean of a strided grid of the entries, every ``s_a``-th
  along reduced axes ``a`` with ``prod s_a <= SUBSET`` (about ``1 / SUBSET`` of
  ``x`` is read; every entry where no axis can be strided without moving data
  between devices). The mean ``K`` of any ``k``
  of ``n`` values satisfies ``(K - mean)^2 <= (1/k) sum_subset (x - mean)^2 <=
  (n / k) var``, so ``delta^2 <= SUBSET * var``, and one pass from ``K`` has a
  relative error of about ``(1 + SUBSET) eps`` in its variance, whatever the
  data and however far from zero. With a mask (a subset could hold no valid
  value) it is the mean of every valid value. Either is taken from values
  shifted by ``base`` (the running mean: the sums stay on the data's scale) and,
  with ``axis_name``, summed across devices in one collective of per-feature
  values, so that it is the same on every device. Features with no valid value
  keep ``base``.

  Args:
    x: floating array, or a tuple of them (as :func:`shifted_sums`).
    axes: the axes to reduce.
    base: per-feature reference, broadcastable against ``x`` (the first input)
      with the reduced axes of size 1, the same on every device.
    mask: optional mask(s), as :func:`shifted_sums`.
    axis_name: optional named axis the values are split over.
    axis_index_groups: optional subgroups of ``axis_name``.
    dtype: the dtype to compute in.

  Returns:
    The shift, in the first input's layout with the reduced axes of size 1.
  """
  xs, per_axes, masks = _inputs(x, axes, mask)
  dtype = _dtype_of(xs) if dtype is None else jnp.dtype(dtype)
  keep = tuple(1 if i in per_axes[0] else n for i, n in enumerate(xs[0].shape))
  base = jnp.broadcast_to(jax.lax.stop_gradient(base).astype(dtype), keep)
  total = count = None
  masked = any(m is not None for m in masks)
  for t, a, m in zip(xs, per_axes, masks, strict=True):
    k = tuple(1 if i in a else n for i, n in enumerate(t.shape))
    if masked:
      valid = jnp.ones((), bool) if m is None else (m if m.dtype == jnp.bool_ else m != 0)
      d = jnp.where(valid, t.astype(dtype) - _like(base, k), 0)
      c = jnp.sum(jnp.broadcast_to(valid, t.shape), a, keepdims=True, dtype=dtype)
    else:
      # Sliced before it is converted or shifted: only the subset is read (and
      # XLA's cost analysis, which counts a fusion's operands whole, sees that).
      # No axis: an example under vmap, whose values are all taken.
      for b, step in (_strides(t, a) if a else {}).items():
        t = jax.lax.slice_in_dim(t, 0, t.shape[b], step, axis=b)
      d = t.astype(dtype) - _like(base, k)
      c = jnp.full(k, math.prod(d.shape[i] for i in a), dtype)
    total = _add(total, _like(jnp.sum(d, a, keepdims=True), keep))
    count = _add(count, _like(c, keep))
  assert total is not None and count is not None
  if axis_name is not None:
    total, count = psum((total, count), axis_name, axis_index_groups)
  step = total / jnp.where(count > 0, count, 1)
  return base + jnp.where(jnp.isfinite(step), step, 0)


def shifted_moments(
  x: Array | Sequence[Array],
  axes: Sequence[int] | Sequence[Sequence[int]],
  *,
  mask: Array | Sequence[Array | None] | None = None,
  shift: Array | None = None,
  axis_name: Any = None,
  axis_index_groups: Any = None,
  dtype: Any = None,
) -> Shifted:
  """Moments of ``x`` over ``axes``, exact to float32 rounding wherever the data lie.

  :func:`shifted_sums` from :func:`reference_shift`: a shift within
  ``sqrt(SUBSET)`` standard deviations of the mean whatever the data, taken
  from a strided ``1 / SUBSET`` of the values (every valid value under a
  mask). No predicate and no conditional: the same program on every step,
  the first ones far from zero and after a jump in the data included. With
  ``axis_name``, two collectives of per-feature values: the shift's (so that
  it is the same on every device) and the sums'.

  Args:
    x: floating array (computed in ``stats_dtype(x.dtype)``), or a tuple of
      arrays with the same features: their joint moments (see
      :func:`shifted_sums`).
    axes: the axes to reduce (for a tuple ``x``, as :func:`shifted_sums`).
    mask: optional array broadcastable to ``x``; nonzero entries count (for a
      tuple ``x``, one per input or None).
    shift: per-feature base of the shift's own sums, broadcastable against
      ``x`` (the first input) with the reduced axes of size 1 (same on every
      device; a running mean keeps them on the data's scale); default 0.
      Non-finite entries are replaced by 0.
    axis_name: optional named axis the values are split over.
    axis_index_groups: optional subgroups of ``axis_name``.
    dtype: the dtype to compute in (default ``stats_dtype(x.dtype)``).

  Returns:
    :class:`Shifted` with the reduced axes kept; ``shift`` is the reference
    the returned ``delta`` and ``m2`` were computed from.
  """
  dtype = _dtype_of(_inputs(x, axes, mask)[0]) if dtype is None else jnp.dtype(dtype)
  base = jnp.zeros((), dtype) if shift is None else jax.lax.stop_gradient(shift).astype(dtype)
  base = jnp.where(jnp.isfinite(base), base, 0)
  collective = {"axis_name": axis_name, "axis_index_groups": axis_index_groups}
  ref = reference_shift(x, axes, base, mask=mask, dtype=dtype, **collective)
  return shifted_sums(x, axes, ref, mask=mask, dtype=dtype, **collective)


def batch_moments(
  x: Array | Sequence[Array],
  axes: Sequence[int] | Sequence[Sequence[int]],
  *,
  mask: Array | Sequence[Array | None] | None = None,
  axis_name: Any = None,
  axis_index_groups: Any = None,
) -> Moments:
  """Moments of ``x`` over ``axes``, kept with size 1.

  :func:`shifted_moments` from 0 with its mean rounded once: exact to rounding far
  from zero, NaN-safe in masked-out positions; with ``axis_name`` the
  statistics of every shard together.

  Args:
    x: floating array, or a tuple of arrays with the same features (their
      joint moments, see :func:`shifted_sums`).
    axes: the axes to reduce (for a tuple ``x``, as :func:`shifted_sums`).
    mask: optional array broadcastable to ``x``; only nonzero entries count
      (for a tuple ``x``, one per input or None).
    axis_name: optional named axis the values are split over.
    axis_index_groups: optional subgroups of ``axis_name``.

  Returns:
    :class:`Moments` with the reduced axes kept (the first input's layout),
    in at least float32.
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
  """Exact moments of ``x`` over ``axes``, restricted to ``mask``.

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

  # A public field: it shadows the method tuple.count, on purpose (pyright flags the override).
  count: Array  # pyright: ignore[reportIncompatibleMethodOverride]
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
