"""The functional core of jaxbn: ``bn_init``, ``bn_train`` and ``bn_infer``.

Batch normalization (Ioffe & Szegedy 2015, Algorithm 1), per feature ``k``,
over the ``m`` values of a mini-batch (for a convolution, over the batch and
every position, ``m' = m * p * q``)::

    mu_B   = (1/m) sum_i x_i
    var_B  = (1/m) sum_i (x_i - mu_B)^2
    xhat_i = (x_i - mu_B) / sqrt(var_B + epsilon)
    y_i    = scale * xhat_i + bias

Everything here is a pure function of small immutable pytrees: ``params``
(:class:`BNParams`, trained by gradient descent) and ``state``
(:class:`BNState`, the running statistics, float32 whatever the input). The
gradient of ``bn_train`` is analytic (``jax.custom_vjp``): with
``N`` reduced elements and ``r = 1 / sqrt(var_B + epsilon)``::

    dbias  = sum dy
    dscale = sum dy * xhat
    dx     = scale * r * (dy - dbias / N - xhat * dscale / N)

References:
  Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training
  by Reducing Internal Covariate Shift", ICML 2015, arXiv:1502.03167.
  Ioffe, "Batch Renormalization", NeurIPS 2017, arXiv:1702.03275.
  Hoffer, Hubara & Soudry, "Train longer, generalize better", NeurIPS 2017,
  arXiv:1705.08741 (ghost batch normalization).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import numerics

Array = jax.Array
Axis = int | Sequence[int]
Schedule = float | Callable[[Array], Array]


class BNParams(NamedTuple):
  """Trainable parameters of a batch-norm layer.

  Attributes:
    scale: gamma, shape ``feature_shape``, the params dtype.
    bias: beta, shape ``feature_shape``, the params dtype.
  """

  scale: Array
  bias: Array


class BNState(NamedTuple):
  """Running statistics of a batch-norm layer (never trained by gradients).

  Attributes:
    mean: running mean, shape ``feature_shape``, float32.
    var: running biased variance, shape ``feature_shape``, float32.
    count: number of values that entered the statistics so far, per feature
      (masked values excluded), shape ``feature_shape``, float32.
    step: number of ``bn_train`` updates, shape ``()``, int32 (schedules of
      batch renormalization read it).
  """

  mean: Array
  var: Array
  count: Array
  step: Array


class Renorm(NamedTuple):
  """Batch renormalization limits (Ioffe 2017).

  ``r = clip(sigma_B / sigma, 1/rmax, rmax)`` and
  ``d = clip((mu_B - mu) / sigma, -dmax, dmax)``, both under ``stop_gradient``,
  with the running ``mu`` and ``sigma = sqrt(var + epsilon)``; then
  ``y = scale * (xhat * r + d) + bias``. ``rmax = 1, dmax = 0`` is plain batch
  norm. Each limit is a number or a function of ``state.step`` (see
  :func:`renorm_schedule`).

  Attributes:
    rmax: upper limit of ``r`` (>= 1).
    dmax: upper limit of ``|d|`` (>= 0).
  """

  rmax: Schedule = 3.0
  dmax: Schedule = 5.0


def renorm_schedule(
  rmax: float = 3.0,
  dmax: float = 5.0,
  *,
  warmup_steps: int = 5_000,
  rmax_steps: int = 40_000,
  dmax_steps: int = 25_000,
) -> Renorm:
  """The paper's schedule: plain batch norm, then limits that ramp linearly.

  ``rmax`` stays 1 and ``dmax`` 0 for ``warmup_steps`` updates, then they rise
  linearly to ``rmax`` at step ``rmax_steps`` and to ``dmax`` at ``dmax_steps``
  (Ioffe 2017, Sec. 4: 5k, 40k and 25k steps).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbn import renorm_schedule
    >>> s = renorm_schedule(warmup_steps=10, rmax_steps=20, dmax_steps=30)
    >>> [float(s.rmax(jnp.int32(t))) for t in (0, 10, 15, 20, 99)]
    [1.0, 1.0, 2.0, 3.0, 3.0]
  """

  def ramp(start: float, end: float, end_step: int):
    span = max(end_step - warmup_steps, 1)

    def value(step: Array) -> Array:
      t = (jnp.asarray(step, jnp.float32) - warmup_steps) / span
      return start + (end - start) * jnp.clip(t, 0.0, 1.0)

    return value

  return Renorm(rmax=ramp(1.0, rmax, rmax_steps), dmax=ramp(0.0, dmax, dmax_steps))


def bn_init(
  num_features: int | Sequence[int], *, dtype: Any = jnp.float32
) -> tuple[BNParams, BNState]:
  """Parameters and state of a fresh layer.

  ``scale = 1``, ``bias = 0`` (in ``dtype``); ``mean = 0``, ``var = 1``,
  ``count = 0`` (float32) and ``step = 0`` (int32), as in flax and PyTorch.

  Args:
    num_features: the size of the feature axis (a tuple for several feature
      axes).
    dtype: floating dtype of ``params``. ``state`` is always float32.

  Returns:
    ``(params, state)``.

  Examples:
    >>> import jaxbn
    >>> params, state = jaxbn.bn_init(3)
    >>> params.scale, state.var
    (Array([1., 1., 1.], dtype=float32), Array([1., 1., 1.], dtype=float32))
  """
  if isinstance(num_features, (int, np.integer)):
    shape = (int(num_features),)
  elif isinstance(num_features, (tuple, list)):
    shape = tuple(num_features)
  else:
    shape = ()
  if not shape or not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape):
    raise ValueError(
      f"bn_init: num_features must be a positive int or a tuple of them, got {num_features!r}."
    )
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"bn_init: dtype must be a floating dtype, got {dtype}.")
  params = BNParams(scale=jnp.ones(shape, dtype), bias=jnp.zeros(shape, dtype))
  f32 = jnp.float32
  state = BNState(
    mean=jnp.zeros(shape, f32),
    var=jnp.ones(shape, f32),
    count=jnp.zeros(shape, f32),
    step=jnp.zeros((), jnp.int32),
  )
  return params, state


# --------------------------------------------------------------------------
# Validation: shapes are static under jit, so every check below runs once, at
# trace time, and costs nothing in the compiled step.


class _Layout(NamedTuple):
  feature_axes: tuple[int, ...]
  reduction_axes: tuple[int, ...]
  bshape: tuple[int, ...]  # feature_shape broadcast against x


def _layout(fn: str, x: Array, axis: Axis, feature_shape: tuple[int, ...]) -> _Layout:
  if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
    dtype = getattr(x, "dtype", type(x).__name__)
    raise TypeError(
      f"{fn}: x must be a floating-point array (float32, bfloat16, ...), got "
      f"dtype {dtype}; cast it first, e.g. x.astype(jnp.float32)."
    )
  axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
  if not axes:
    raise ValueError(f"{fn}: axis must name at least one feature axis, got {axis!r}.")
  feature_axes = []
  for a in axes:
    if not isinstance(a, (int, np.integer)) or not -x.ndim <= a < x.ndim:
      raise ValueError(
        f"{fn}: axis {a!r} is out of range for x of shape {x.shape} "
        f"(ndim {x.ndim}); expected an int in [{-x.ndim}, {x.ndim - 1}]."
      )
    feature_axes.append(int(a) % x.ndim)
  if len(set(feature_axes)) != len(feature_axes):
    raise ValueError(f"{fn}: axis {axis!r} repeats an axis.")
  feature_axes = tuple(sorted(feature_axes))
  got = tuple(x.shape[a] for a in feature_axes)
  if got != feature_shape:
    raise ValueError(
      f"{fn}: x of shape {x.shape} has feature shape {got} along axis "
      f"{axis!r}, but params/state were made for {feature_shape} "
      f"(bn_init({feature_shape[0] if len(feature_shape) == 1 else feature_shape})). "
      f"Check the axis argument (NCHW input needs axis=1)."
    )
  reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
  bshape = tuple(x.shape[i] if i in feature_axes else 1 for i in range(x.ndim))
  return _Layout(feature_axes, reduction_axes, bshape)


def _check_tree(fn: str, params: BNParams | None, state: BNState) -> tuple[int, ...]:
  shape = tuple(state.mean.shape)
  msg = f"{fn}: params and state must come from one bn_init call"
  chex.assert_equal_shape([state.mean, state.var, state.count], custom_message=msg)
  if params is not None:
    chex.assert_equal_shape([params.scale, params.bias, state.mean], custom_message=msg)
  return shape


def _mask_weights(fn: str, mask: Array, x: Array, lay: _Layout) -> Array:
  """The mask as weights broadcastable to ``x`` (feature axes of size 1 or C)."""
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(f"{fn}: mask must be boolean, got dtype {mask.dtype}.")
  n_red = len(lay.reduction_axes)
  if mask.ndim < x.ndim:
    if mask.ndim > n_red:
      raise ValueError(
        f"{fn}: mask of shape {mask.shape} has more axes than x's non-feature "
        f"axes {tuple(x.shape[i] for i in lay.reduction_axes)}."
      )
    # Leading axes of x without its features (a mask of shape (N,) masks whole
    # examples); then size-1 feature axes.
    mask = mask.reshape(mask.shape + (1,) * (n_red - mask.ndim))
    mask = jnp.expand_dims(mask, lay.feature_axes)
  expected = (
    f"a boolean array whose shape is a prefix of, or broadcasts to, x's shape "
    f"without its feature axes {tuple(x.shape[i] for i in lay.reduction_axes)}; "
    f"or broadcasts to x's shape {x.shape}"
  )
  if mask.ndim > x.ndim:
    raise ValueError(f"{fn}: mask of shape {mask.shape} does not fit; expected {expected}.")
  try:
    np.broadcast_shapes(mask.shape, x.shape)
  except ValueError:
    raise ValueError(
      f"{fn}: mask of shape {mask.shape} does not broadcast; expected {expected}."
    ) from None
  return mask.astype(numerics.stat_dtype(x.dtype))


def _axis_names(axis_name: Any) -> tuple[Any, ...]:
  return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def _group_size(axis_name: Any, axis_index_groups: Any) -> int:
  if axis_index_groups is not None:
    return len(axis_index_groups[0])
  size = 1
  for name in _axis_names(axis_name):
    size *= jax.lax.axis_size(name)
  return size


def _varying_like(x: Array, t: Array, axis_name: Any) -> Array:
  """Under ``shard_map``, marks ``t`` as varying over the axes ``x`` varies on.

  A replicated parameter must be cast before entering the custom VJP so that
  JAX sums its cotangent over devices, as autodiff would.
  """
  try:
    varying = jax.typeof(x).manual_axis_type.varying
    t_varying = jax.typeof(t).manual_axis_type.varying
  except AttributeError:
    return t
  missing = tuple(n for n in _axis_names(axis_name) if n in varying and n not in t_varying)
  return jax.lax.pcast(t, missing, to="varying") if missing else t


# --------------------------------------------------------------------------
# The fused training kernel with its analytic backward.


class _Config(NamedTuple):
  reduction_axes: tuple[int, ...]
  axis_name: Any
  axis_index_groups: Any
  epsilon: float
  renorm: bool


def _sum_to(t: Array, shape: tuple[int, ...]) -> Array:
  axes = tuple(i for i, (a, b) in enumerate(zip(t.shape, shape, strict=False)) if b == 1 and a != 1)
  return jnp.sum(t, axes, keepdims=True) if axes else t


@functools.lru_cache(maxsize=256)
def _train_kernel(cfg: _Config):
  red = cfg.reduction_axes

  def forward(x, scale, bias, w, ref_mean, ref_var, rmax, dmax):
    m = numerics.batch_moments(
      x, red, mask=w, axis_name=cfg.axis_name, axis_index_groups=cfg.axis_index_groups
    )
    f32 = m.mean.dtype
    var = numerics.variance(m)
    rstd = jax.lax.rsqrt(var + cfg.epsilon)
    g = scale.astype(f32)
    if cfg.renorm:
      inv_sigma = jax.lax.rsqrt(ref_var + cfg.epsilon)
      r = jnp.clip((var + cfg.epsilon) * rstd * inv_sigma, 1 / rmax, rmax)
      d = jnp.clip((m.mean - ref_mean) * inv_sigma, -dmax, dmax)
      r, d = jax.lax.stop_gradient(r), jax.lax.stop_gradient(d)
      a = g * rstd * r
      shift = g * d + bias.astype(f32)
    else:
      r = d = None
      a = g * rstd
      shift = bias.astype(f32)
    # A copy of the mean of its own (see bwd) keeps x - mean out of memory.
    mean_y = jax.lax.optimization_barrier(m.mean)
    y = ((x.astype(f32) - mean_y) * a + shift).astype(x.dtype)
    return y, m, (x, w, m.mean, m.count, rstd, a, r, d, scale, bias)

  @jax.custom_vjp
  def kernel(x, scale, bias, w, ref_mean, ref_var, rmax, dmax):
    y, m, _ = forward(x, scale, bias, w, ref_mean, ref_var, rmax, dmax)
    return y, m

  def fwd(x, scale, bias, w, ref_mean, ref_var, rmax, dmax):
    y, m, res = forward(x, scale, bias, w, ref_mean, ref_var, rmax, dmax)
    return (y, m), res

  def bwd(res, cts):
    saved, w, mean, n, rstd, a, r, d, scale, bias = res
    dy = cts[0]  # the statistics carry no gradient (the state update is stop_gradient)
    f32 = mean.dtype
    dy32 = dy.astype(f32)
    # Each full-size consumer of x - mean gets its own copy of the mean (a
    # barrier stops XLA merging them), so every reduction fuses its own
    # subtraction instead of reading x - mean back from memory: a full-size
    # write costs several reads.
    mean_s, mean_x = jax.lax.optimization_barrier((mean, mean))
    x32 = saved.astype(f32)
    sdy = jnp.sum(dy32, red, keepdims=True)
    sdyx = jnp.sum(dy32 * (x32 - mean_s), red, keepdims=True) * rstd  # sum dy * xhat
    if cfg.renorm:
      dscale = r * sdyx + d * sdy
    else:
      dscale = sdyx
    dscale = _sum_to(dscale, scale.shape).astype(scale.dtype)
    dbias = _sum_to(sdy, bias.shape).astype(bias.dtype)
    if cfg.axis_name is not None:
      # dx needs the sums over the whole batch; dscale, dbias stay per shard
      # (JAX sums them over devices, as it sums any replicated input's).
      sdy, sdyx = numerics.psum((sdy, sdyx), cfg.axis_name, cfg.axis_index_groups)
    coef = (1.0 if w is None else w) / jnp.where(n > 0, n, 1)
    dx = a * (dy32 - coef * (sdy + (x32 - mean_x) * (rstd * sdyx)))
    return dx.astype(dy.dtype), dscale, dbias, None, None, None, None, None

  kernel.defvjp(fwd, bwd)
  return kernel


def _update_state(
  state: BNState,
  batch: numerics.Moments,
  momentum: float | Array | None,
  ema_warmup: bool = False,
) -> BNState:
  """New running statistics after a batch with moments ``batch``."""
  f32 = state.mean.dtype
  batch = jax.tree.map(lambda t: jax.lax.stop_gradient(t).astype(f32), batch)
  seen = batch.count > 0  # a fully masked feature keeps its statistics
  if momentum is None:
    # Cumulative average: the exact statistics of every value seen so far.
    old = numerics.Moments(state.count, state.mean, state.var * state.count)
    merged = numerics.merge(old, batch)
    mean, var = merged.mean, numerics.variance(merged)
  else:
    weight = 1 - jnp.asarray(momentum, f32)
    if ema_warmup:
      # Count-aware: a cumulative average until it would weigh the new batch
      # less than the EMA does. At count 0 the weight is 1 (no division by 0:
      # a batch with no values is kept out by `seen` below).
      weight = jnp.maximum(weight, batch.count / jnp.maximum(state.count + batch.count, 1))
    mean = (1 - weight) * state.mean + weight * batch.mean
    var = (1 - weight) * state.var + weight * numerics.variance(batch)
  return BNState(
    mean=jnp.where(seen, mean, state.mean).astype(state.mean.dtype),
    var=jnp.where(seen, var, state.var).astype(state.var.dtype),
    count=(state.count + batch.count).astype(state.count.dtype),
    step=(state.step + 1).astype(state.step.dtype),
  )


def _schedule_value(v: Schedule, step: Array) -> Array:
  return jnp.asarray(v(step) if callable(v) else v, jnp.float32)


def bn_train(
  params: BNParams,
  state: BNState,
  x: Array,
  *,
  momentum: float | Array | None = 0.99,
  epsilon: float = 1e-5,
  axis: Axis = -1,
  axis_name: Any = None,
  axis_index_groups: Any = None,
  mask: Array | None = None,
  ghost_batch_size: int | None = None,
  renorm: Renorm | None = None,
  ema_warmup: bool = False,
) -> tuple[Array, BNState]:
  r"""Normalizes ``x`` with its mini-batch statistics and updates the running ones.

  Per feature, over every other axis (Algorithm 1 of the paper)::

      mu_B  = mean(x),   var_B = mean((x - mu_B)^2)        # biased, two-pass, float32
      y     = (x - mu_B) / sqrt(var_B + epsilon) * scale + bias

  and the running statistics move toward the batch's::

      mean <- momentum * mean + (1 - momentum) * mu_B       # likewise var
                                                            # (flax's convention;
                                                            # PyTorch's 0.1 is 0.9 here)

  With ``momentum=None`` the state is instead the exact cumulative mean and
  (biased) variance of every value seen since ``bn_init`` (Chan's merge): after
  one pass over a data set it holds that data set's statistics.

  Args:
    params: :class:`BNParams` (``scale``, ``bias``).
    state: :class:`BNState` (float32 running statistics).
    x: floating input; any rank >= 1. ``(N, C)`` normalizes each neuron over
      the mini-batch; ``(N, H, W, C)`` each feature map over batch and
      positions. The output has ``x``'s shape and dtype.
    momentum: weight of the old running value, or ``None`` for the cumulative
      average.
    epsilon: added to the variance before the square root.
    axis: the feature axis (int or tuple); every other axis is reduced. Use
      ``axis=1`` for NCHW.
    axis_name: a named axis (``vmap``, ``pmap``, ``shard_map``) the batch is
      split over; statistics are those of the whole batch, merged exactly by
      count (unequal and masked shards included).
    axis_index_groups: subgroups of ``axis_name`` normalized independently.
    mask: boolean, with the shape of ``x`` without its feature axes (a prefix
      of it, such as ``(N,)`` to mask whole examples, or any shape that
      broadcasts to it), or broadcastable to ``x``; only True positions
      count toward the statistics and
      ``state.count``. Masked positions of ``y`` hold the same affine map
      applied to their ``x`` (normalized with the valid positions'
      statistics); their gradient flows through that map only. A feature with
      no valid position keeps its running statistics and is normalized with
      mean 0 and variance 0.
    ghost_batch_size: split the batch (the first non-feature axis) into
      contiguous virtual batches of this size, each normalized with its own
      statistics (Hoffer et al. 2017). The running statistics are updated with
      the whole batch's statistics, so inference is unchanged.
    renorm: a :class:`Renorm` for batch renormalization (Ioffe 2017).
    ema_warmup: count-aware running average. The initial ``mean = 0, var = 1``
      is wrong for the first hundreds of steps of an EMA; with this flag the
      new batch weighs ``max(1 - momentum, n / (count + n))`` (``n`` its
      count), so the state is the average of the batches seen so far until
      the EMA's own horizon takes over. Safe at ``count = 0``.

  Returns:
    ``(y, new_state)``.

  Raises:
    TypeError: ``x`` is not floating, or ``mask`` is not boolean.
    ValueError: the feature shape does not match ``params``; ``axis`` is out of
      range; the statistics would come from a single value per feature; the
      mask does not broadcast; ``ghost_batch_size`` does not divide the batch.

  Value checks (finite input) belong to the caller; under
  ``jax.experimental.checkify`` non-finite statistics are caught:

  >>> import jax, jax.numpy as jnp
  >>> from jax.experimental import checkify
  >>> import jaxbn
  >>> params, state = jaxbn.bn_init(2)
  >>> step = checkify.checkify(jaxbn.bn_train, errors=checkify.float_checks)
  >>> err, _ = step(params, state, jnp.array([[1.0, jnp.inf], [2.0, 3.0]]))
  >>> err.get() is not None
  True

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxbn
    >>> params, state = jaxbn.bn_init(2)
    >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
    >>> y, state = jaxbn.bn_train(params, state, x)
    >>> y.round(3)
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> [round(v, 4) for v in state.mean.tolist()]  # 0.99 * 0 + 0.01 * batch mean
    [0.02, 0.2]
    >>> [round(v, 4) for v in state.var.tolist()]   # 0.99 * 1 + 0.01 * batch var
    [1.0, 1.99]

  References:
    Ioffe & Szegedy 2015, arXiv:1502.03167, Algorithm 1.
  """
  fn = "bn_train"
  feature_shape = _check_tree(fn, params, state)
  lay = _layout(fn, x, axis, feature_shape)
  w = None if mask is None else _mask_weights(fn, mask, x, lay)

  if ghost_batch_size is not None:
    x, w, lay = _split_ghost(fn, x, w, lay, ghost_batch_size)

  local = 1
  for i in lay.reduction_axes:
    local *= x.shape[i]
  total = local * (1 if axis_name is None else _group_size(axis_name, axis_index_groups))
  if total < 2:
    raise ValueError(
      f"{fn}: x of shape {x.shape} gives {total} value per feature to compute "
      f"batch statistics over (reduced axes {lay.reduction_axes}"
      f"{'' if axis_name is None else f' and axis_name {axis_name!r}'}); "
      f"training needs more than 1. Use a larger batch, or bn_infer."
    )

  f32 = jnp.float32
  scale = params.scale.reshape(lay.bshape)
  bias = params.bias.reshape(lay.bshape)
  ref_mean = state.mean.reshape(lay.bshape)
  ref_var = state.var.reshape(lay.bshape)
  if renorm is not None:
    rmax = _schedule_value(renorm.rmax, state.step)
    dmax = _schedule_value(renorm.dmax, state.step)
  else:
    rmax = dmax = jnp.zeros((), f32)
  if axis_name is not None:
    scale, bias, ref_mean, ref_var, rmax, dmax = (
      _varying_like(x, t, axis_name) for t in (scale, bias, ref_mean, ref_var, rmax, dmax)
    )
    if w is not None:
      w = _varying_like(x, w, axis_name)

  cfg = _Config(
    reduction_axes=lay.reduction_axes,
    axis_name=tuple(axis_name) if isinstance(axis_name, list) else axis_name,
    axis_index_groups=None
    if axis_index_groups is None
    else tuple(tuple(g) for g in axis_index_groups),
    epsilon=float(epsilon),
    renorm=renorm is not None,
  )
  y, m = _train_kernel(cfg)(x, scale, bias, w, ref_mean, ref_var, rmax, dmax)

  if ghost_batch_size is not None:
    y = y.reshape(_unsplit_shape(y.shape, lay))
  batch = numerics.Moments(*(t.reshape(-1, *feature_shape) for t in jax.lax.stop_gradient(m)))
  if batch.count.shape[0] > 1:  # ghost batches: the whole batch's moments
    batch = numerics.merge_stacked(batch, 0)
  else:
    batch = numerics.Moments(*(t[0] for t in batch))
  return y, _update_state(state, batch, momentum, ema_warmup)


def _split_ghost(fn: str, x: Array, w: Array | None, lay: _Layout, size: int):
  """Reshapes the batch axis ``b`` into ``(b // size, size)``; the first stays."""
  if not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f"{fn}: ghost_batch_size must be a positive int, got {size!r}.")
  b = lay.reduction_axes[0]
  n = x.shape[b]
  if n % size:
    raise ValueError(
      f"{fn}: ghost_batch_size={size} does not divide the batch of {n} along "
      f"axis {b} of x with shape {x.shape}; use a divisor of {n}."
    )
  split = (*x.shape[:b], n // size, size, *x.shape[b + 1 :])
  x = x.reshape(split)
  if w is not None:
    # A mask of size 1 along the batch axis stays broadcastable as (1, 1).
    k = (n // size, size) if w.shape[b] == n else (1, 1)
    w = w.reshape(w.shape[:b] + k + w.shape[b + 1 :])
  feature_axes = tuple(a + 1 if a > b else a for a in lay.feature_axes)
  reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes and i != b)
  bshape = tuple(x.shape[i] if i in feature_axes else 1 for i in range(x.ndim))
  return x, w, _Layout(feature_axes, reduction_axes, bshape)


def _unsplit_shape(shape: tuple[int, ...], lay: _Layout) -> tuple[int, ...]:
  b = lay.reduction_axes[0] - 1
  return (*shape[:b], shape[b] * shape[b + 1], *shape[b + 2 :])


def bn_infer(
  params: BNParams,
  state: BNState,
  x: Array,
  *,
  epsilon: float = 1e-5,
  axis: Axis = -1,
) -> Array:
  """Normalizes ``x`` with the running statistics (Algorithm 2 of the paper).

  One affine map per feature, the same for every example, so the output of
  one example does not depend on the rest of the batch::

      a = scale / sqrt(var + epsilon)
      y = (x - mean) * a + bias

  computed in float32 as a single fused elementwise pass (the form above,
  rather than ``x * a + (bias - mean * a)``, keeps its accuracy far from zero).

  Args:
    params: :class:`BNParams`.
    state: :class:`BNState`.
    x: floating input; the output has its shape and dtype.
    epsilon: added to the variance before the square root.
    axis: the feature axis (int or tuple).

  Returns:
    ``y``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxbn
    >>> params, state = jaxbn.bn_init(2)
    >>> state = state._replace(mean=jnp.array([1.0, 2.0]), var=jnp.array([4.0, 1.0]))
    >>> jaxbn.bn_infer(params, state, jnp.array([[3.0, 2.0]]), epsilon=0.0)
    Array([[1., 0.]], dtype=float32)

  References:
    Ioffe & Szegedy 2015, arXiv:1502.03167, Algorithm 2.
  """
  fn = "bn_infer"
  feature_shape = _check_tree(fn, params, state)
  lay = _layout(fn, x, axis, feature_shape)
  f32 = numerics.stat_dtype(x.dtype)
  a = params.scale.astype(f32) * jax.lax.rsqrt(state.var.astype(f32) + epsilon)
  mean = state.mean.astype(f32).reshape(lay.bshape)
  y = (x.astype(f32) - mean) * a.reshape(lay.bshape) + params.bias.astype(f32).reshape(lay.bshape)
  return y.astype(x.dtype)
