"""The functional core of jaxbn: ``bn_init``, ``bn_train`` and ``bn_infer``.

Batch normalization (Ioffe & Szegedy 2015, Algorithm 1), per feature ``k``,
over the ``m`` values of a mini-batch (for a convolution, over the batch and
every position, ``m' = m * p * q``)::

    mu_B   = (1/m) sum_i x_i
    var_B  = (1/m) sum_i (x_i - mu_B)^2
    xhat_i = (x_i - mu_B) / sqrt(var_B + epsilon)
    y_i    = scale * xhat_i + bias

**Data layout** (the one place it is stated; the faces point here). The
feature axis is ``axis`` (default ``-1``: channel-last, flax's ``NHWC`` and
``(N, C)``); every other axis is reduced. Channel-first data (PyTorch's
``NCHW``) takes ``axis=1``, or moves its channels last
(:func:`jaxbn.torch.nchw_to_nhwc`); Equinox's layer sees one example
``(C, *spatial)`` and normalizes its axis 0 (a whole batch: axis 1). A batch
split over devices or vmapped examples names that axis with ``axis_name``.
Ghost batches split the first reduced axis into contiguous groups. Several
inputs may share one set of statistics (``x`` a tuple, :func:`bn_train`):
they agree in the feature axes, and their reduced axes are pooled as if
concatenated, without a concatenation.

Everything here is a pure function of small immutable pytrees: ``params``
(:class:`BNParams`, trained by gradient descent) and ``state``
(:class:`BNState`, the running statistics, float32 whatever the input). The
gradient of ``bn_train`` is analytic (a ``jax.custom_jvp`` whose tangent map
JAX transposes for reverse mode): with
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
import warnings
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any
from typing import Literal
from typing import NamedTuple
from typing import TypeVar
from typing import cast
from typing import overload

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero

from jaxbn import numerics
from jaxbn.numerics import stats_dtype

__all__ = (
  "DEFAULTS",
  "FROM_OPTIONS",
  "MOMENTS_NAME",
  "SHIFT_NAME",
  "BNAccState",
  "BNOptions",
  "BNParams",
  "BNState",
  "Renorm",
  "RunningStatsWarning",
  "SingleValueWarning",
  "StateMismatchError",
  "bn_infer",
  "bn_init",
  "bn_moments",
  "bn_train",
  "bn_update",
  "checkpoint_names",
  "empty_accumulator",
  "merge_options",
  "renorm_schedule",
)

Array = jax.Array
Axis = int | Sequence[int]
Schedule = float | Callable[[Array], Array]

SHIFT_NAME = "jaxbn_shift"
"""The remat name of the shift of ``bn_train``'s shifted moments."""
MOMENTS_NAME = "jaxbn_moments"
"""The remat name of ``bn_train``'s batch moments (count, delta, m2)."""
checkpoint_names: tuple[str, ...] = (SHIFT_NAME, MOMENTS_NAME)
"""The names ``bn_train`` gives its batch statistics (``jax.ad_checkpoint.checkpoint_name``).

``jax.checkpoint(f, policy=jax.checkpoint_policies.save_only_these_names(*checkpoint_names))``
keeps them, so the backward pass does not compute the statistics (and their all-reduces) a
second time.
"""


# Callbacks told of every bn_train and bn_infer call as it runs or is traced
# (jaxbn.diagnosis.observing): at trace time only, so a compiled step pays nothing.
_OBSERVERS: list[Callable[..., None]] = []


def _notify(fn: str, params: Any, state: Any, x: Any, mask: Any, options: Any) -> None:
  for callback in tuple(_OBSERVERS):
    callback(fn, params, state, x, mask, options)


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
    step: number of ``bn_train`` calls, shape ``()``, int32 (schedules of
      batch renormalization read it).
  """

  mean: Array
  var: Array
  # A public field: it shadows the method tuple.count, on purpose (pyright flags the override).
  count: Array  # pyright: ignore[reportIncompatibleMethodOverride]
  step: Array


class BNAccState(NamedTuple):
  """:class:`BNState` with room for gradient accumulation (``accumulate_steps > 1``).

  ``bn_init(..., accumulate_steps=k)`` makes it for ``k > 1``; the default
  :class:`BNState` stays four arrays.

  Attributes:
    mean: as in :class:`BNState`.
    var: as in :class:`BNState`.
    count: as in :class:`BNState`.
    step: number of ``bn_train`` calls; modulo ``k`` it says which micro-batch
      comes next.
    acc: the :class:`numerics.Moments` (count, mean, m2; per feature, the
      statistics dtype) of the micro-batches seen since the last update.
  """

  mean: Array
  var: Array
  # A public field: it shadows the method tuple.count, on purpose (pyright flags the override).
  count: Array  # pyright: ignore[reportIncompatibleMethodOverride]
  step: Array
  acc: numerics.Moments


# A state of either kind, for the functions that return a state of the kind they are given.
StateT = TypeVar("StateT", bound="BNState | BNAccState")


class SingleValueWarning(UserWarning):
  """Training statistics computed from a single value per feature.

  The batch variance of one value is 0, so every output is ``bias``; jaxbn
  leaves the running statistics unchanged in that case (flax would decay the
  running variance toward 0). Raised at trace time, once per shape.
  """


class RunningStatsWarning(UserWarning):
  """Evaluation with running statistics that are not yet the data's.

  jaxbn's training loops (:func:`jaxbn.training.fit`, :func:`jaxbn.engine.train`) and
  evaluation helpers (:func:`jaxbn.training.evaluate`) raise it when they evaluate a model
  whose running statistics were never updated, or have seen fewer updates than the window
  ``1 / (1 - momentum)`` of their moving average (still mostly their initial values). The
  fixes: ``ema_warmup=True``, :func:`jaxbn.population_stats`; :func:`jaxbn.diagnose`
  explains a gap between training-mode and evaluation-mode accuracy.
  """


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


class BNOptions(NamedTuple):
  """Every option of :func:`bn_train` as one value, for models and modules.

  ``bn_train(params, state, x, options)`` trains with them (a keyword such as
  ``momentum=...`` given as well overrides that field); the flax modules,
  :class:`jaxbn.layer.BNLayer` and :mod:`jaxbn.models` take one ``BNOptions``
  instead of repeating each option. The defaults below are the library's
  only copy of them (:data:`DEFAULTS`). See :func:`bn_train` for their
  meaning.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxbn
    >>> opts = jaxbn.BNOptions(momentum=0.9)
    >>> params, state = jaxbn.bn_init(2)
    >>> _, state = jaxbn.bn_train(params, state, jnp.array([[0.0, 1.0], [2.0, 3.0]]), opts)
    >>> [round(m, 4) for m in state.mean.tolist()]  # 0.9 * 0 + 0.1 * batch mean
    [0.1, 0.2]
  """

  momentum: float | None = 0.99
  epsilon: float = 1e-5
  axis: Axis = -1
  axis_name: Any = None
  axis_index_groups: Any = None
  ghost_batch_size: int | None = None
  renorm: Renorm | None = None
  ema_warmup: bool = False
  running_var: str = "biased"
  accumulate_steps: int = 1


DEFAULTS = BNOptions()
"""The default options, read by every signature that needs one of them."""


class _FromOptions:
  """The default of :func:`bn_train`'s option keywords: the field of its ``options``.

  ``None`` cannot play this role: ``momentum=None`` is an option of its own.
  """

  def __repr__(self) -> str:
    return "<from options>"


FROM_OPTIONS: Any = _FromOptions()
"""The default of the modules' option keywords: "take this option from ``options``"."""


def merge_options(fn: str, options: Any, overrides: dict[str, Any]) -> BNOptions:
  """``options`` (default :data:`DEFAULTS`) with the keywords given explicitly.

  The one rule for options in jaxbn, :func:`bn_train`'s and every module's: a
  keyword that is given wins over the same field of ``options``; a keyword
  left at :data:`FROM_OPTIONS` (the default of every option keyword) takes the
  field. ``overrides`` maps option names to the keywords' values.

  Raises:
    TypeError: ``options`` is not a :class:`BNOptions` or None.

  Examples:
    >>> from jaxbn.core import FROM_OPTIONS, BNOptions, merge_options
    >>> given = {"momentum": FROM_OPTIONS, "epsilon": 1e-3}
    >>> opts = merge_options("f", BNOptions(momentum=0.9), given)
    >>> opts.momentum, opts.epsilon
    (0.9, 0.001)
  """
  if options is None:
    options = DEFAULTS
  elif not isinstance(options, BNOptions):
    # bn_train and bn_infer take options 4th, after params, state and x.
    where = " (the 4th positional argument)" if fn in ("bn_train", "bn_infer") else ""
    raise TypeError(
      f"{fn}: options{where} must be a jaxbn.BNOptions or None, got "
      f"{type(options).__name__}; pass the other options as keywords, e.g. momentum=0.9, "
      f"or as jaxbn.BNOptions(momentum=0.9)."
    )
  given = {k: v for k, v in overrides.items() if v is not FROM_OPTIONS}
  return options._replace(**given) if given else options


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


@overload
def bn_init(
  num_features: int | Sequence[int], *, dtype: Any = ..., accumulate_steps: Literal[1] = 1
) -> tuple[BNParams, BNState]: ...
@overload
def bn_init(
  num_features: int | Sequence[int], *, dtype: Any = ..., accumulate_steps: int
) -> tuple[BNParams, BNState | BNAccState]: ...
def bn_init(
  num_features: int | Sequence[int], *, dtype: Any = jnp.float32, accumulate_steps: int = 1
) -> tuple[BNParams, BNState | BNAccState]:
  """Parameters and state of a fresh layer.

  ``scale = 1``, ``bias = 0`` (in ``dtype``); ``mean = 0``, ``var = 1``,
  ``count = 0`` and ``step = 0`` (int32), as in flax and PyTorch. The
  statistics are float64 for a float64 model and float32 otherwise
  (:func:`stats_dtype`).

  Args:
    num_features: the size of the feature axis (a tuple for several feature
      axes).
    dtype: floating dtype of ``params``; also selects the statistics dtype
      (:func:`stats_dtype`).
    accumulate_steps: the ``accumulate_steps`` of the :func:`bn_train` calls
      this state will meet; above 1 the state is a :class:`BNAccState`, with
      room (``acc``, zeros) for the moments of the micro-batches between two
      updates.

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
  _check_accumulate_steps("bn_init", accumulate_steps)
  params = BNParams(scale=jnp.ones(shape, dtype), bias=jnp.zeros(shape, dtype))
  sdt = stats_dtype(dtype)
  state = BNState(
    mean=jnp.zeros(shape, sdt),
    var=jnp.ones(shape, sdt),
    count=jnp.zeros(shape, sdt),
    step=jnp.zeros((), jnp.int32),
  )
  if accumulate_steps > 1:
    state = BNAccState(*state, acc=empty_accumulator(shape, sdt))
  return params, state


def empty_accumulator(shape: Sequence[int], dtype: Any = jnp.float32) -> numerics.Moments:
  """The moments of no value (count, mean and m2 zero): :attr:`BNAccState.acc` after an update."""
  zeros = jnp.zeros(tuple(shape), dtype)
  return numerics.Moments(zeros, zeros, zeros)


def _check_accumulate_steps(fn: str, k: Any) -> None:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(
      f"{fn}: accumulate_steps must be a positive int (the micro-batches per update of the "
      f"running statistics, fixed when the step is compiled), got {k!r}."
    )


# --------------------------------------------------------------------------
# Validation: shapes are static under jit, so every check below runs once, at
# trace time, and costs nothing in the compiled step.


class _Layout(NamedTuple):
  feature_axes: tuple[int, ...]
  reduction_axes: tuple[int, ...]
  bshape: tuple[int, ...]  # feature_shape broadcast against x


def _layout(
  fn: str, x: Array, axis: Axis, feature_shape: tuple[int, ...], name: str = "x"
) -> _Layout:
  if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
    dtype = getattr(x, "dtype", type(x).__name__)
    raise TypeError(
      f"{fn}: {name} must be a floating-point array (float32, bfloat16, ...), got "
      f"dtype {dtype}; cast it first, e.g. x.astype(jnp.float32)."
    )
  if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool):
    axes = (axis,)
  elif isinstance(axis, (tuple, list)):
    axes = tuple(axis)
  else:
    raise TypeError(
      f"{fn}: axis must be an int or a tuple of ints naming the feature axis "
      f"(every other axis is reduced), got {axis!r}."
    )
  if not axes:
    raise ValueError(f"{fn}: axis must name at least one feature axis, got {axis!r}.")
  feature_axes = []
  for a in axes:
    if not isinstance(a, (int, np.integer)) or not -x.ndim <= a < x.ndim:
      raise ValueError(
        f"{fn}: axis {a!r} is out of range for {name} of shape {x.shape} "
        f"(ndim {x.ndim}); expected an int in [{-x.ndim}, {x.ndim - 1}]."
      )
    feature_axes.append(int(a) % x.ndim)
  if len(set(feature_axes)) != len(feature_axes):
    raise ValueError(f"{fn}: axis {axis!r} repeats an axis.")
  feature_axes = tuple(sorted(feature_axes))
  got = tuple(x.shape[a] for a in feature_axes)
  if got != feature_shape:
    raise ValueError(
      f"{fn}: {name} of shape {x.shape} has feature shape {got} along axis "
      f"{axis!r}, but params/state were made for {feature_shape} "
      f"(bn_init({feature_shape[0] if len(feature_shape) == 1 else feature_shape})). "
      f"Check the axis argument (NCHW input needs axis=1)."
    )
  reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
  bshape = tuple(x.shape[i] if i in feature_axes else 1 for i in range(x.ndim))
  return _Layout(feature_axes, reduction_axes, bshape)


class StateMismatchError(ValueError):
  """``params`` and ``state`` of different shapes: they come from different layers."""


def _check_tree(fn: str, params: BNParams | None, state: BNState | BNAccState) -> tuple[int, ...]:
  if isinstance(state, BNParams) or isinstance(params, (BNState, BNAccState)):
    raise TypeError(
      f"{fn}: params and state are swapped (got params: {type(params).__name__}, state: "
      f"{type(state).__name__}); pass them in the order bn_init returns them: "
      f"{fn}(params, state, x)."
    )
  fields: dict[str, tuple[str, ...]] = {"state": ("mean", "var", "count", "step")}
  if params is not None:
    fields["params"] = ("scale", "bias")
  for role, names in fields.items():
    tree = state if role == "state" else params
    if not all(hasattr(tree, n) for n in names):
      want = "BNState (mean, var, count, step)" if role == "state" else "BNParams (scale, bias)"
      raise TypeError(
        f"{fn}: {role} must be a jaxbn.{want}, from bn_init; got {type(tree).__name__}."
      )
  arrays = {f"state.{n}": getattr(state, n) for n in ("mean", "var", "count")}
  if isinstance(state, BNAccState):
    arrays.update({f"state.acc.{n}": v for n, v in state.acc._asdict().items()})
  if params is not None:
    arrays = {"params.scale": params.scale, "params.bias": params.bias, **arrays}
  shapes = {k: tuple(np.shape(v)) for k, v in arrays.items()}
  if len(set(shapes.values())) > 1:
    raise StateMismatchError(
      f"{fn}: params and state must come from one bn_init call (one layer), but their "
      f"shapes differ: " + ", ".join(f"{k} {v}" for k, v in shapes.items()) + "."
    )
  shape = tuple(state.mean.shape)
  dtypes = {jnp.dtype(t.dtype) for t in (state.mean, state.var, state.count)}
  if len(dtypes) != 1 or not dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)}:
    raise TypeError(
      f"{fn}: state.mean, state.var and state.count must share the statistics dtype, "
      f"float32 (float64 for a float64 model), got "
      f"{', '.join(str(jnp.dtype(t.dtype)) for t in (state.mean, state.var, state.count))}; "
      f"make the state with bn_init."
    )
  if not jnp.issubdtype(jnp.result_type(state.step), jnp.integer):
    raise TypeError(f"{fn}: state.step must be an integer (int32), got {state.step.dtype}.")
  return shape


def _check_mask(fn: str, mask: Any, x: Array, name: str = "mask", xname: str = "x") -> Array:
  """The mask, broadcast against ``x`` as NumPy (and flax) do: trailing axes."""
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(f"{fn}: {name} must be boolean, got dtype {mask.dtype}.")
  try:
    fits = np.broadcast_shapes(mask.shape, x.shape) == tuple(x.shape)
  except ValueError:
    fits = False
  if not fits:
    raise ValueError(
      f"{fn}: {name} of shape {mask.shape} does not broadcast to {xname}'s shape {x.shape}; "
      f"it is aligned with {xname}'s trailing axes, as in NumPy (a mask of shape (C,) "
      f"selects features; to mask whole examples of an (N, C) batch use mask[:, None])."
    )
  return mask.reshape((1,) * (x.ndim - mask.ndim) + mask.shape)


def _inputs(
  fn: str, x: Any, axis: Axis, feature_shape: tuple[int, ...]
) -> tuple[tuple[Array, ...], tuple[_Layout, ...]]:
  """``x`` as a tuple of inputs (one for an array) and the layout of each.

  A tuple (or list) ``x`` holds inputs that share one set of statistics:
  each has the feature shape of ``params`` along ``axis`` (taken in each
  input's own rank), its other axes free.
  """
  if not isinstance(x, (tuple, list)):
    x = _input(x)
    return (x,), (_layout(fn, x, axis, feature_shape),)
  if not x:
    raise ValueError(
      f"{fn}: x is an empty {type(x).__name__}; pass an array, or a tuple of arrays that "
      f"share one set of statistics."
    )
  xs = tuple(_input(t) for t in x)
  return xs, tuple(_layout(fn, t, axis, feature_shape, f"x[{i}]") for i, t in enumerate(xs))


def _masks(fn: str, mask: Any, xs: tuple[Array, ...], several: bool) -> tuple[Array | None, ...]:
  """One checked mask (or None) per input."""
  if not several:
    return (None if mask is None else _check_mask(fn, mask, xs[0]),)
  if mask is None:
    return (None,) * len(xs)
  if not isinstance(mask, (tuple, list)):
    raise TypeError(
      f"{fn}: x is a tuple of {len(xs)} inputs, so mask must be None or a tuple of {len(xs)} "
      f"masks, one per input (None for an input without one); got a {type(mask).__name__} "
      f"of shape {np.shape(mask)}."
    )
  if len(mask) != len(xs):
    raise ValueError(
      f"{fn}: x is a tuple of {len(xs)} inputs, so mask must hold {len(xs)} masks, one per "
      f"input (None for an input without one); got {len(mask)}."
    )
  return tuple(
    None if m is None else _check_mask(fn, m, t, f"mask[{i}]", f"x[{i}]")
    for i, (m, t) in enumerate(zip(mask, xs, strict=True))
  )


def _axis_names(axis_name: Any) -> tuple[Any, ...]:
  return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def _group_size(fn: str, axis_name: Any, axis_index_groups: Any) -> int:
  size = 1
  for name in _axis_names(axis_name):
    try:
      size *= jax.lax.axis_size(name)
    except NameError:
      # Still a NameError (equinox's, and what callers catch), with the ways to bind it.
      raise NameError(
        f"{fn}: axis_name={axis_name!r}: unbound axis name {name!r}. Statistics over a named "
        f"axis need it bound where bn_train runs: jax.shard_map over a mesh with that axis "
        f"name, or jax.vmap(..., axis_name={name!r}); or pass axis_name=None, under jax.jit "
        f"with arrays sharded over a mesh (the statistics are then the whole batch's) or on "
        f"one device."
      ) from None
  if axis_index_groups is not None:
    return len(axis_index_groups[0])
  return size


# --------------------------------------------------------------------------
# The training kernel and its derivative.


class _Config(NamedTuple):
  reduction_axes: tuple[tuple[int, ...], ...]  # each input's
  axis_name: Any
  axis_index_groups: Any
  epsilon: float
  renorm: bool


def _is_zero(t: Any) -> bool:
  return isinstance(t, SymbolicZero)


def _keep(x: Array, red: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of ``x`` with the axes ``red`` reduced to size 1 (the layout of its statistics)."""
  return tuple(1 if i in red else s for i, s in enumerate(x.shape))


def _like(t: Array, x: Array, red: tuple[int, ...]) -> Array:
  """A per-feature value of the first input's layout in the layout of another input ``x``.

  Inputs that agree in their feature axes have the same feature sizes in the
  same order, so this is a reshape (free), and none where the layouts agree.
  """
  keep = _keep(x, red)
  return t if t.shape == keep else t.reshape(keep)


@functools.lru_cache(maxsize=256)
def _train_kernel(cfg: _Config):
  """``kernel(xs, scale, bias, masks, shift, ref_mean, ref_var, rmax, dmax)``.

  ``xs`` is a tuple of inputs that share one set of statistics (one input
  for a plain call), ``masks`` one mask (or None) for each; the per-feature
  arguments have the first input's layout. Returns ``(ys, (count, shift,
  delta, m2))``: the normalized outputs, one per input, and the joint
  :class:`numerics.Shifted` moments of all the inputs, in one pass of
  independent sums from a shift provably near the batch's mean (the mean of a
  strided subset, summed from ``shift``, the running mean;
  :func:`numerics.shifted_moments`; the returned ``shift`` is the one used),
  with no conditional. It is a
  ``jax.custom_jvp`` whose tangent map is linear in the tangents, so JAX gets
  forward mode (jvp, jacfwd, linearize) directly and reverse mode by
  transposing it. With ``xhat = (x - mu) r``, sums over the valid values of
  the whole batch (every input, all devices) and ``k = scale r / n``::

      u1    = sum(x_dot),  u2 = sum(xhat x_dot) = r (sum(e x_dot) - delta u1)
      y_dot = scale r x_dot + xhat (scale_dot - k u2) + (bias_dot - k u1)

  with ``e = x - shift`` (so ``xhat = (e - delta) r``). Its transpose, for a
  cotangent ``dy``, is the analytic backward of the paper:
  ``dbias = sum(dy)``, ``dscale = sum(dy xhat) = r (sum(dy e) - delta dbias)``,
  ``dx = scale r dy - k (dbias + xhat dscale)``. The per-feature factors
  multiply before broadcasting, so the transpose has exactly two independent
  reductions (``sum(dy)``, ``sum(dy e)``: one collective across devices) and
  one elementwise pass, per input; each input's sums are added per feature
  before the collective, and each output and each input's gradient is
  computed from that input alone (no full-size array spans two inputs). The
  rule computes its primal outputs by calling the kernel itself, so
  derivatives of every order work.
  """
  red = cfg.reduction_axes

  def like(t, xs, i):
    """A per-feature value (of the first input's layout) in the layout of input ``i``."""
    return t if i == 0 else _like(t, xs[i], red[i])

  def sums(xs, *terms):
    """Independent sums over the batch of every input; across devices, one collective.

    Each of ``terms`` holds one full-size array per input (None: nothing to add).
    """
    out = []
    for per_input in terms:
      total = None
      for i, t in enumerate(per_input):
        if t is not None:
          si = jnp.sum(t, red[i], keepdims=True)
          si = si if i == 0 else si.reshape(_keep(xs[0], red[0]))
          total = si if total is None else total + si
      out.append(total)
    s = tuple(out)
    return s if cfg.axis_name is None else numerics.psum(s, cfg.axis_name, cfg.axis_index_groups)

  def affine(scale, bias, count, shift, delta, m2, ref_mean, ref_var, rmax, dmax):
    """``y = ((x - shift) - delta) * a + b``; also ``rstd`` and renorm's ``r, d``."""
    dt = delta.dtype
    var = numerics.variance(numerics.Moments(count, delta, m2))
    rstd = jax.lax.rsqrt(var + cfg.epsilon)
    g = scale.astype(dt)
    if not cfg.renorm:
      return g * rstd, bias.astype(dt), rstd, None, None
    inv_sigma = jax.lax.rsqrt(ref_var.astype(dt) + cfg.epsilon)
    r = jnp.clip((var + cfg.epsilon) * rstd * inv_sigma, 1 / rmax, rmax)
    d = jnp.clip(((shift - ref_mean.astype(dt)) + delta) * inv_sigma, -dmax, dmax)
    r, d = jax.lax.stop_gradient(r), jax.lax.stop_gradient(d)  # at every order
    return g * rstd * r, g * d + bias.astype(dt), rstd, r, d

  def output(x, mean, a, c):
    """``y = (x - mean) * a + c``.

    The per-feature values get copies of their own, so that XLA broadcasts
    them inside the pass that writes y (a factor computed in a fusion of its
    own is otherwise broadcast to x's size and written to memory first).
    """
    mean, a, c = jax.lax.optimization_barrier((mean, a, c))
    return ((x.astype(mean.dtype) - mean) * a + c).astype(x.dtype)

  def outputs(xs, shift, delta, a, b):
    """One output per input, each from its own input and the joint statistics.

    ``((x - shift) - delta) a + b`` as ``(x - mean) a + (b - residual a)``
    (:func:`numerics.mean_and_residual`): exact far from zero as the first
    form, a constant feature gives exactly ``b``, and each element meets three
    per-feature values, as flax's ``(x - mean) a + b``. (XLA recomputes a
    batch norm's output inside the transposed copies of activations it makes
    for convolutions' kernel gradients; a fourth value made one such copy in
    ResNet-18 three times slower.)
    """
    mean, residual = numerics.mean_and_residual(shift, delta)
    c = b - residual * a
    return tuple(output(x, *(like(t, xs, i) for t in (mean, a, c))) for i, x in enumerate(xs))

  @jax.custom_jvp
  def kernel(xs, scale, bias, masks, shift, ref_mean, ref_var, rmax, dmax):
    dt = shift.dtype
    st = numerics.shifted_moments(
      xs,
      red,
      mask=masks,
      shift=shift,
      axis_name=cfg.axis_name,
      axis_index_groups=cfg.axis_index_groups,
      dtype=dt,
    )
    a, b, *_ = affine(scale, bias, *st, ref_mean, ref_var, rmax, dmax)
    return outputs(xs, st.shift, st.delta, a, b), tuple(st)

  def kernel_jvp(primals, tangents):
    xs, scale, bias, masks, _, ref_mean, ref_var, rmax, dmax = primals
    x_dots, scale_dot, bias_dot = tangents[:3]  # the rest carry no gradient
    _, stats = kernel(*primals)
    count, shift, delta, m2 = checkpoint_name(stats, MOMENTS_NAME)
    dt = shift.dtype
    a, b, rstd, r, d = affine(scale, bias, count, shift, delta, m2, ref_mean, ref_var, rmax, dmax)
    # y from the named statistics rather than the kernel's own output: under
    # jax.checkpoint with save_only_these_names(*checkpoint_names) the backward
    # pass recomputes y elementwise from x and the saved statistics, while the
    # kernel call (its reductions and all-reduces) has no output left to recompute.
    ys = outputs(xs, shift, delta, a, b)
    n = jnp.where(count > 0, count, 1)
    k = a / n

    def shifted(i, s):
      e = xs[i].astype(dt) - like(s, xs, i)
      # Masked-out positions may hold NaN or inf: kept out of every sum.
      return e if masks[i] is None else jnp.where(jnp.isfinite(e), e, 0)

    # The tangent map in terms of e = x - shift (xhat = (e - delta) rstd):
    # sums of e times a full-size array are the cheapest reductions, and the
    # shift of numerics.shifted_moments keeps |delta| within sqrt(SUBSET)
    # standard deviations, so `e2 - delta u1` cancels at most a few digits' worth.
    # e_p meets x_dot (u2; in the transpose, dx), e_q meets the output (in
    # the transpose, dscale): one copy for each full-size pass.
    c_p, c_q = numerics.copies(shift, 2)
    e_p = [shifted(i, c_p) for i in range(len(xs))]
    e_q = [shifted(i, c_q) for i in range(len(xs))]
    zero = jnp.zeros_like(delta)
    v = zero if _is_zero(scale_dot) else scale_dot.astype(dt) * (1 if r is None else r)
    w = zero if _is_zero(bias_dot) else bias_dot.astype(dt)
    if not _is_zero(scale_dot) and d is not None:
      w = w + scale_dot.astype(dt) * d
    delta_dot = m2_dot = zero
    y_dots = [jnp.zeros((), dt) for _ in xs]
    ts = [None if _is_zero(x_dot) else x_dot.astype(dt) for x_dot in x_dots]
    if any(t is not None for t in ts):
      plain, times_e = [], []  # per input: the terms of u1 and of e2
      for i, t in enumerate(ts):
        if t is None:
          plain.append(None)
          times_e.append(None)
        elif masks[i] is None:
          plain.append(t)
          times_e.append(e_p[i] * t)
        else:
          plain.append(jnp.where(masks[i], t, 0))
          times_e.append(jnp.where(masks[i], e_p[i] * t, 0))
      u1, e2 = sums(xs, plain, times_e)
      u2 = rstd * (e2 - delta * u1)  # sum(xhat x_dot)
      v, w = v - k * u2, w - k * u1
      y_dots = [
        y if t is None else like(a, xs, i) * t
        for i, (y, t) in enumerate(zip(y_dots, ts, strict=True))
      ]
      delta_dot, m2_dot = u1 / n, 2 * u2 / rstd
    # xhat v + w = e (rstd v) + (w - delta rstd v)
    rv = rstd * v
    y_dots = tuple(
      (y_dot + e_q[i] * like(rv, xs, i) + like(w - delta * rv, xs, i)).astype(ys[i].dtype)
      for i, y_dot in enumerate(y_dots)
    )
    stats_dot = (jnp.zeros_like(count), jnp.zeros_like(shift), delta_dot, m2_dot)
    return (ys, (count, shift, delta, m2)), (y_dots, stats_dot)

  kernel.defjvp(kernel_jvp, symbolic_zeros=True)
  return kernel


def _update_state(
  state: BNState | BNAccState,
  batch: numerics.Moments,
  momentum: float | Array | None,
  ema_warmup: bool = False,
  running_var: str = "biased",
) -> BNState:
  """New running statistics after a batch with moments ``batch`` (see :func:`bn_update`).

  Differentiable in ``batch``: :func:`bn_train` stops the gradient before it.
  A feature is updated only where the batch's statistics are finite (so a
  loop that skips non-finite steps recovers) and, for the moving average,
  where it had at least 2 values (one value has no variance: averaging its 0
  in would shrink ``var``). Otherwise it keeps its statistics.
  """
  sdt = state.mean.dtype
  batch = jax.tree.map(lambda t: t.astype(sdt), batch)
  ddof = 1 if running_var == "unbiased" else 0
  finite = jnp.isfinite(batch.mean) & jnp.isfinite(batch.m2)
  if momentum is None:
    # Cumulative average: the exact statistics of every value seen so far.
    seen = finite & (batch.count > 0)
    old = numerics.Moments(state.count, state.mean, state.var * jnp.maximum(state.count - ddof, 0))
    merged = numerics.merge(old, batch)
    mean, var = merged.mean, numerics.variance(merged, ddof)
    var = jnp.where(merged.count > ddof, var, state.var)
  else:
    seen = finite & (batch.count > 1)
    weight = 1 - jnp.asarray(momentum, sdt)
    if ema_warmup:
      # Count-aware: a cumulative average until it would weigh the new batch
      # less than the EMA does. At count 0 the weight is 1 (no division by 0:
      # a batch with no values is kept out by `seen` below).
      weight = jnp.maximum(weight, batch.count / jnp.maximum(state.count + batch.count, 1))
    mean = (1 - weight) * state.mean + weight * batch.mean
    var = (1 - weight) * state.var + weight * numerics.variance(batch, ddof)
  return BNState(
    mean=jnp.where(seen, mean, state.mean).astype(sdt),
    var=jnp.where(seen, var, state.var).astype(sdt),
    count=jnp.where(seen, state.count + batch.count, state.count).astype(sdt),
    step=(state.step + 1).astype(state.step.dtype),
  )


def _schedule_value(v: Schedule, step: Array, dtype: Any) -> Array:
  return jnp.asarray(v(step) if callable(v) else v).astype(dtype)


def _check_options(fn: str, momentum: Any, epsilon: Any, running_var: str) -> None:
  """Trace-time checks of the scalar options (skipped for traced values)."""
  try:
    eps = float(epsilon)
  except TypeError:
    raise TypeError(
      f"{fn}: epsilon must be a concrete number (it is fixed when the step is "
      f"compiled), got {epsilon!r}."
    ) from None
  if not eps > 0:
    raise ValueError(
      f"{fn}: epsilon must be > 0 (it keeps 1/sqrt(var + epsilon) finite for a "
      f"constant feature), got {epsilon!r}."
    )
  if momentum is not None and not isinstance(momentum, jax.core.Tracer):
    m = np.asarray(momentum)
    if m.ndim or not 0 <= float(m) <= 1:
      raise ValueError(
        f"{fn}: momentum must be a number in [0, 1] (the weight of the old running "
        f"value; PyTorch's momentum=0.1 is 0.9 here), or None for the cumulative "
        f"average; got {momentum!r}."
      )
  if running_var not in ("biased", "unbiased"):
    raise ValueError(f"{fn}: running_var must be 'biased' or 'unbiased', got {running_var!r}.")


def _input(x: Any) -> Any:
  """A NumPy input as a JAX array, cast once at the boundary as flax does.

  NumPy's default float64 becomes float32 unless x64 is enabled, without the
  truncation warnings that each later ``astype`` would print.
  """
  return jnp.asarray(x) if isinstance(x, (np.ndarray, np.generic)) else x


def _compute_dtype(xs: Sequence[Array], state: BNState | BNAccState) -> jnp.dtype:
  """The widest of the inputs' statistics dtypes and the state's."""
  dtypes = [stats_dtype(t.dtype) for t in xs]
  return max((*dtypes, jnp.dtype(state.mean.dtype)), key=lambda d: jnp.finfo(d).bits)


def _static_size(dims: Iterable[Any]) -> int | None:
  """The product of ``dims``, or None when one is symbolic (``jax.export``)."""
  n = 1
  for d in dims:
    if not isinstance(d, (int, np.integer)):
      return None
    n *= int(d)
  return n


# Several inputs (a tuple or list) that share one set of statistics: a tuple of outputs.
Inputs = tuple[Array, ...] | list[Array]


@overload
def bn_train(
  params: BNParams,
  state: StateT,
  x: Array,
  options: BNOptions | None = None,
  *,
  mask: Array | None = None,
  momentum: float | Array | None = ...,
  epsilon: float = ...,
  axis: Axis = ...,
  axis_name: Any = ...,
  axis_index_groups: Any = ...,
  ghost_batch_size: int | None = ...,
  renorm: Renorm | None = ...,
  ema_warmup: bool = ...,
  running_var: str = ...,
  accumulate_steps: int = ...,
) -> tuple[Array, StateT]: ...
@overload
def bn_train(
  params: BNParams,
  state: StateT,
  x: Inputs,
  options: BNOptions | None = None,
  *,
  mask: Sequence[Array | None] | None = None,
  momentum: float | Array | None = ...,
  epsilon: float = ...,
  axis: Axis = ...,
  axis_name: Any = ...,
  axis_index_groups: Any = ...,
  ghost_batch_size: int | None = ...,
  renorm: Renorm | None = ...,
  ema_warmup: bool = ...,
  running_var: str = ...,
  accumulate_steps: int = ...,
) -> tuple[tuple[Array, ...], StateT]: ...
def bn_train(
  params: BNParams,
  state: StateT,
  x: Array | Inputs,
  options: BNOptions | None = None,
  *,
  mask: Array | Sequence[Array | None] | None = None,
  momentum: float | Array | None = FROM_OPTIONS,
  epsilon: float = FROM_OPTIONS,
  axis: Axis = FROM_OPTIONS,
  axis_name: Any = FROM_OPTIONS,
  axis_index_groups: Any = FROM_OPTIONS,
  ghost_batch_size: int | None = FROM_OPTIONS,
  renorm: Renorm | None = FROM_OPTIONS,
  ema_warmup: bool = FROM_OPTIONS,
  running_var: str = FROM_OPTIONS,
  accumulate_steps: int = FROM_OPTIONS,
) -> tuple[Array | tuple[Array, ...], StateT]:
  r"""Normalizes ``x`` with its mini-batch statistics and updates the running ones.

  Per feature, over every other axis (Algorithm 1 of the paper)::

      mu_B  = mean(x),   var_B = mean((x - mu_B)^2)        # biased, exact, float32
      y     = (x - mu_B) / sqrt(var_B + epsilon) * scale + bias

  and the running statistics move toward the batch's::

      mean <- momentum * mean + (1 - momentum) * mu_B       # likewise var
                                                            # (flax's convention;
                                                            # PyTorch's 0.1 is 0.9 here)

  With ``momentum=None`` the state is instead the exact cumulative mean and
  (biased) variance of every value seen since ``bn_init`` (Chan's merge): after
  one pass over a data set it holds that data set's statistics.

  The options come as one :class:`BNOptions` (``options``, default
  :data:`DEFAULTS`) or as keywords; a keyword given overrides that field of
  ``options``, and a keyword left out takes it from ``options``. The
  defaults below are :class:`BNOptions`'. The options fix the compiled step:
  under ``jax.jit`` close over them (or mark ``options`` static) rather than
  pass them as traced arguments.

  Args:
    params: :class:`BNParams` (``scale``, ``bias``).
    state: :class:`BNState` (float32 running statistics).
    x: floating input; any rank >= 1. ``(N, C)`` normalizes each neuron over
      the mini-batch; ``(N, H, W, C)`` each feature map over batch and
      positions. The output has ``x``'s shape and dtype. Or a tuple (or
      list) of inputs that share one set of statistics (joint statistics,
      e.g. a critic's ``(s, a)`` and ``(s', a')``): each has the feature
      shape of ``params`` along ``axis`` (taken in its own rank); its other
      axes are free (batch sizes, positions, even rank, as ``(N, C)`` and
      ``(N, L, C)`` with ``axis=-1``), and its dtype its own. The statistics
      are those of every input's values together: for inputs that differ
      only in the batch axis, ``bn_train`` of their concatenation along it,
      to float32 rounding, with the same state update. The inputs are not
      concatenated: each input's sums are added per feature (one collective
      for all of them under ``axis_name``), and each output is computed from
      its own input. ``y`` is then a tuple of outputs of the inputs' shapes
      and dtypes.
    options: a :class:`BNOptions`, or ``None`` for the defaults.
    mask: boolean, aligned with ``x``'s trailing axes as in NumPy
      broadcasting (a mask of ``x``'s shape, or one that broadcasts to it);
      only True positions count toward the statistics and ``state.count``.
      To mask whole examples of an ``(N, C)`` batch pass ``mask[:, None]``
      (shape ``(N, 1)``): an ``(N,)`` mask aligns with the last axis, the
      features, and raises where ``N != C``. Masked positions of ``y`` hold
      the same affine map applied to their ``x`` (normalized with the valid
      positions' statistics); their gradient flows through that map only. A
      feature with no valid position keeps its running statistics and is
      normalized with its running mean and variance 0. For a tuple ``x``, a
      tuple with one mask (or None) per input.
    momentum: weight of the old running value, or ``None`` for the cumulative
      average.
    epsilon: added to the variance before the square root.
    axis: the feature axis (int or tuple); every other axis is reduced. Use
      ``axis=1`` for NCHW.
    axis_name: a named axis (``vmap``, ``pmap``, ``shard_map``) the batch is
      split over; statistics are those of the whole batch, merged exactly by
      count (unequal and masked shards included).
    axis_index_groups: subgroups of ``axis_name`` normalized independently.
    ghost_batch_size: split the batch (the first non-feature axis) into
      contiguous virtual batches of this size, each normalized with its own
      statistics (Hoffer et al. 2017). The running statistics are updated with
      the whole batch's statistics, so inference is unchanged. Under ``jit``
      with the batch sharded over devices, the per-device batch size gives
      per-device statistics that need no collective. Not with a tuple ``x``
      (each ghost batch would lie within one input: nothing to share).
    renorm: a :class:`Renorm` for batch renormalization (Ioffe 2017).
    ema_warmup: count-aware running average. The initial ``mean = 0, var = 1``
      is wrong for the first hundreds of steps of an EMA; with this flag the
      new batch weighs ``max(1 - momentum, n / (count + n))`` (``n`` its
      count), so the state is the average of the batches seen so far until
      the EMA's own horizon takes over. Safe at ``count = 0``.
    running_var: ``"biased"`` or ``"unbiased"`` (PyTorch's running variance,
      ``n / (n - 1)`` times the batch's).
    accumulate_steps: ``k`` micro-batches per update of the running
      statistics, for gradient accumulation (e.g. ``optax.MultiSteps(opt,
      every_k_schedule=k)``). Each call normalizes its micro-batch with the
      micro-batch's own statistics and merges its moments into ``state.acc``
      (a :class:`BNAccState`, from ``bn_init(..., accumulate_steps=k)``); the
      running statistics stay as they are for ``k - 1`` calls, and the
      ``k``-th call updates them once with the count-weighted (Chan) merge of
      the ``k`` micro-batches' moments: exactly the statistics of the ``k``
      micro-batches concatenated. ``state.step`` counts calls; ``step % k``
      is the position in the cycle. ``1`` (the default) updates on every call.

  Returns:
    ``(y, new_state)``; ``y`` a tuple of outputs for a tuple ``x``.

  Raises:
    TypeError: ``x`` (an input of a tuple ``x``: ``x[i]``) is not floating,
      or ``mask`` is not boolean (for a tuple ``x``, not a tuple of masks).
    ValueError: the feature shape does not match ``params``; ``axis`` is out of
      range; the statistics would come from a single value per feature; the
      mask does not broadcast; ``ghost_batch_size`` does not divide the batch
      (or is given with a tuple ``x``); a tuple ``x`` is empty or has another
      number of masks.

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

    Options as one value; a keyword overrides its field. Whole examples are
    masked with an ``(N, 1)`` mask:

    >>> opts = jaxbn.BNOptions(momentum=0.9, epsilon=1e-3)
    >>> _, s = jaxbn.bn_train(params, state, x, opts, momentum=0.5)
    >>> [round(v, 4) for v in s.mean.tolist()]  # 0.5 * 0.02 + 0.5 * 2, ...
    [1.01, 10.1]
    >>> x3 = jnp.array([[1.0, 10.0], [3.0, 30.0], [5.0, 50.0]])
    >>> keep = jnp.array([True, True, False])  # the last example is padding
    >>> _, s = jaxbn.bn_train(params, jaxbn.bn_init(2)[1], x3, mask=keep[:, None], momentum=None)
    >>> s.mean.tolist(), s.count.tolist()
    ([2.0, 20.0], [2.0, 2.0])

    Several inputs with one set of statistics (those of their concatenation,
    which is never formed); batch sizes may differ:

    >>> a, b = jnp.array([[1.0, 10.0]]), jnp.array([[2.0, 20.0], [6.0, 60.0]])
    >>> (ya, yb), s = jaxbn.bn_train(params, jaxbn.bn_init(2)[1], (a, b), momentum=None)
    >>> [[round(v, 3) for v in y[:, 0].tolist()] for y in (ya, yb)]  # (x - 3) / sqrt(14 / 3)
    [[-0.926], [-0.463, 1.389]]
    >>> s.mean.tolist(), s.count.tolist()  # of 1, 2, 6 and 10, 20, 60
    ([3.0, 30.0], [3.0, 3.0])

  References:
    Ioffe & Szegedy 2015, arXiv:1502.03167, Algorithm 1.
  """
  # Every option as given (the sentinel FROM_OPTIONS where not), before any other local.
  given = {k: v for k, v in locals().items() if k in BNOptions._fields}
  fn = "bn_train"
  opts = merge_options(fn, options, given)
  momentum, epsilon, axis, axis_name, axis_index_groups = opts[:5]
  ghost_batch_size, renorm, ema_warmup, running_var, accumulate_steps = opts[5:]
  several = isinstance(x, (tuple, list))  # inputs that share one set of statistics
  feature_shape = _check_tree(fn, params, state)
  xs, lays = _inputs(fn, x, axis, feature_shape)
  _check_options(fn, momentum, epsilon, running_var)
  masks = _masks(fn, mask, xs, several)
  _check_accumulate_steps(fn, accumulate_steps)
  _notify(fn, params, state, x, mask, opts)
  if accumulate_steps > 1 and not isinstance(state, BNAccState):
    raise ValueError(
      f"{fn}: accumulate_steps={accumulate_steps} keeps the micro-batches' moments in the "
      f"state, but it is a {type(state).__name__} without them; make the state with "
      f"bn_init(..., accumulate_steps={accumulate_steps})."
    )

  ghost_axis = None
  if ghost_batch_size is not None:
    if several:
      raise ValueError(
        f"{fn}: ghost_batch_size={ghost_batch_size} with {len(xs)} inputs in x: ghost batches "
        f"are groups of rows of one input, each normalized with its own statistics, so "
        f"nothing would be shared between the inputs. Call bn_train on each input with "
        f"ghost_batch_size, or on their concatenation (whose ghost batches may span two "
        f"inputs), or drop ghost_batch_size to normalize them jointly."
      )
    ghost_axis = lays[0].reduction_axes[0]  # after the split: one entry per ghost batch
    x0, m0, lay0 = _split_ghost(fn, xs[0], masks[0], lays[0], ghost_batch_size)
    xs, masks, lays = (x0,), (m0,), (lay0,)
  lay = lays[0]  # the per-feature values and statistics take the first input's layout

  group = 1 if axis_name is None else _group_size(fn, axis_name, axis_index_groups)
  sizes = [
    _static_size(t.shape[i] for i in la.reduction_axes) for t, la in zip(xs, lays, strict=True)
  ]
  local = None if None in sizes else sum(cast("list[int]", sizes))
  total = None if local is None else local * group  # None: symbolic (jax.export)
  reduced = tuple(la.reduction_axes for la in lays) if several else lay.reduction_axes
  where = f"reduced axes {reduced}" + ("" if axis_name is None else f" and axis_name {axis_name!r}")
  what = f"x of shapes {tuple(t.shape for t in xs)}" if several else f"x of shape {xs[0].shape}"
  if total == 0:
    raise ValueError(
      f"{fn}: {what} gives no value per feature to compute batch "
      f"statistics over ({where}); training needs at least 2."
    )
  single = total == 1
  if single:
    warnings.warn(
      f"{fn}: {what} gives 1 value per feature ({where}): the batch "
      f"variance is 0, every output is `bias`, and the running statistics are left "
      f"unchanged. To predict, use evaluation mode, which normalizes with the "
      f"running statistics: model.eval() in flax.nnx, use_running_average=True in "
      f"flax.linen, eqx.nn.inference_mode in equinox, bn_infer in the core. To train, "
      f"use batches of at least 2 values per feature; for per-example calls under vmap, "
      f"pass axis_name so that the statistics are those of the whole batch.",
      SingleValueWarning,
      stacklevel=2,
    )

  cdt = _compute_dtype(xs, state)
  scale = params.scale.reshape(lay.bshape)
  bias = params.bias.reshape(lay.bshape)
  ref_mean = state.mean.reshape(lay.bshape)
  ref_var = state.var.reshape(lay.bshape)
  if renorm is not None:
    rmax = _schedule_value(renorm.rmax, state.step, cdt)
    dmax = _schedule_value(renorm.dmax, state.step, cdt)
  else:
    rmax = dmax = jnp.zeros((), cdt)
  groups = None if axis_index_groups is None else tuple(tuple(g) for g in axis_index_groups)
  axis_name = tuple(axis_name) if isinstance(axis_name, list) else axis_name
  # The base of the shift's own sums: the running mean, which every device
  # holds; the kernel's shift is a strided subset's mean from it
  # (numerics.reference_shift), near the batch's mean whatever the data.
  shift = checkpoint_name(jax.lax.stop_gradient(ref_mean.astype(cdt)), SHIFT_NAME)
  cfg = _Config(
    tuple(la.reduction_axes for la in lays),
    axis_name,
    groups,
    float(epsilon),
    renorm is not None,
  )
  ys, (count, shift, delta, m2) = _train_kernel(cfg)(
    xs, scale, bias, masks, shift, ref_mean, ref_var, rmax, dmax
  )

  y = tuple(ys) if several else ys[0]
  if ghost_batch_size is not None:
    y = ys[0].reshape(_unsplit_shape(ys[0].shape, lay))
  if single and accumulate_steps == 1:
    return y, state._replace(step=(state.step + 1).astype(state.step.dtype))
  m = jax.lax.stop_gradient(numerics.Shifted(count, shift, delta, m2).moments())
  if ghost_axis is not None:  # ghost batches first, even where a feature axis comes before
    m = numerics.Moments(*(jnp.moveaxis(t, ghost_axis, 0) for t in m))
  batch = numerics.Moments(*(t.reshape(-1, *feature_shape) for t in m))
  if batch.count.shape[0] > 1:  # ghost batches: the whole batch's moments
    batch = numerics.merge_stacked(batch, 0)
  else:
    batch = numerics.Moments(*(t[0] for t in batch))
  batch = jax.tree.map(lambda t: _sharded_like(t, state.mean), batch)
  if accumulate_steps > 1:  # state is a BNAccState (checked above)
    acc_state = cast(BNAccState, state)
    new = _accumulate(acc_state, batch, accumulate_steps, momentum, ema_warmup, running_var)
    return y, cast(StateT, new)
  new = _update_state(state, batch, momentum, ema_warmup, running_var)
  if isinstance(state, BNAccState):  # the kind given (a scan carry keeps its structure)
    new = BNAccState(*new, acc=state.acc)
  return y, cast(StateT, new)


def _accumulate(
  state: BNAccState,
  batch: numerics.Moments,
  k: int,
  momentum: float | Array | None,
  ema_warmup: bool,
  running_var: str,
) -> BNAccState:
  """Merges ``batch`` into ``state.acc``; on the ``k``-th call, one update with the merge.

  Chan's merge is exact, so after ``k`` calls ``acc`` holds the count, mean
  and ``m2`` of the ``k`` micro-batches concatenated, and the update is the one
  a single call on that concatenation would make.
  """
  sdt = state.mean.dtype
  batch = jax.tree.map(lambda t: jax.lax.stop_gradient(t).astype(sdt), batch)
  acc = numerics.merge(state.acc, batch)
  last = state.step % k == k - 1
  updated = _update_state(BNState(*state[:4]), acc, momentum, ema_warmup, running_var)
  updated = BNAccState(*updated, acc=empty_accumulator(state.mean.shape, sdt))
  kept = state._replace(step=updated.step, acc=acc)  # the running statistics stay
  return jax.tree.map(lambda u, s: jnp.where(last, u, s).astype(s.dtype), updated, kept)


def _sharded_like(t: Array, ref: Array) -> Array:
  """``t`` with ``ref``'s sharding where shardings are explicit (in the types).

  The batch's statistics are sharded like ``x``'s feature axes; the running
  statistics keep the state's own sharding (replicated by ``bn_init``), as in
  flax. Without an explicit mesh this is ``t`` itself.
  """
  have, want = jax.typeof(t).sharding, jax.typeof(ref).sharding
  if want.mesh.empty or have.spec == want.spec:
    return t
  return jax.sharding.reshard(t, want.spec)


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


@overload
def bn_infer(
  params: BNParams,
  state: BNState | BNAccState,
  x: Array,
  options: BNOptions | None = None,
  *,
  epsilon: float = ...,
  axis: Axis = ...,
) -> Array: ...
@overload
def bn_infer(
  params: BNParams,
  state: BNState | BNAccState,
  x: Inputs,
  options: BNOptions | None = None,
  *,
  epsilon: float = ...,
  axis: Axis = ...,
) -> tuple[Array, ...]: ...
def bn_infer(
  params: BNParams,
  state: BNState | BNAccState,
  x: Array | Inputs,
  options: BNOptions | None = None,
  *,
  epsilon: float = FROM_OPTIONS,
  axis: Axis = FROM_OPTIONS,
) -> Array | tuple[Array, ...]:
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
    x: floating input; the output has its shape and dtype. A tuple of inputs
      (as :func:`bn_train` takes) gives a tuple of outputs, each input
      normalized as alone.
    options: a :class:`BNOptions` (only ``epsilon`` and ``axis`` are read),
      or ``None`` for the defaults; the same options as :func:`bn_train`'s.
    epsilon: added to the variance before the square root; overrides
      ``options.epsilon``.
    axis: the feature axis (int or tuple); overrides ``options.axis``.

  Returns:
    ``y``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxbn
    >>> params, state = jaxbn.bn_init(2)
    >>> state = state._replace(mean=jnp.array([1.0, 2.0]), var=jnp.array([4.0, 1.0]))
    >>> jaxbn.bn_infer(params, state, jnp.array([[3.0, 2.0]])).round(4)
    Array([[1., 0.]], dtype=float32)

  References:
    Ioffe & Szegedy 2015, arXiv:1502.03167, Algorithm 2.
  """
  fn = "bn_infer"
  opts = merge_options(fn, options, {"epsilon": epsilon, "axis": axis})
  epsilon, axis = opts.epsilon, opts.axis
  feature_shape = _check_tree(fn, params, state)
  xs, lays = _inputs(fn, x, axis, feature_shape)
  _check_options(fn, None, epsilon, "biased")
  _notify(fn, params, state, x, None, opts)
  ys = []
  for x1, lay in zip(xs, lays, strict=True):
    cdt = _compute_dtype((x1,), state)
    a = params.scale.astype(cdt) * jax.lax.rsqrt(state.var.astype(cdt) + epsilon)
    mean = state.mean.astype(cdt).reshape(lay.bshape)
    b = params.bias.astype(cdt)
    y = (x1.astype(cdt) - mean) * a.reshape(lay.bshape) + b.reshape(lay.bshape)
    ys.append(y.astype(x1.dtype))
  return tuple(ys) if isinstance(x, (tuple, list)) else ys[0]


def bn_moments(
  state: BNState | BNAccState,
  x: Array | Inputs,
  options: BNOptions | None = None,
  *,
  mask: Array | Sequence[Array | None] | None = None,
  axis: Axis = FROM_OPTIONS,
  axis_name: Any = FROM_OPTIONS,
  axis_index_groups: Any = FROM_OPTIONS,
) -> numerics.Moments:
  """The batch statistics :func:`bn_train` would compute, differentiable, per feature.

  ``(count, mean, m2)`` of ``x`` over every axis but the feature axes (and
  over ``axis_name``), restricted to ``mask``, exact far from zero
  (:func:`jaxbn.numerics.batch_moments`), with the state's feature shape.
  With :func:`bn_update` and :func:`bn_infer` it composes variants that
  normalize with something other than the batch's own statistics, e.g.
  Equinox's ``mode="ema"``, which normalizes with the running statistics
  just updated (:mod:`jaxbn.equinox`). Unlike :func:`bn_train`, gradients
  flow into the returned moments.

  Args:
    state: the layer's :class:`BNState` (its shape and dtype are checked).
    x: floating input, or a tuple of inputs (their joint moments), as
      :func:`bn_train`'s.
    options: a :class:`BNOptions` (``axis``, ``axis_name`` and
      ``axis_index_groups`` are read), or ``None`` for the defaults.
    mask: boolean, as :func:`bn_train`'s (a tuple for a tuple of inputs).
    axis: overrides ``options.axis``.
    axis_name: overrides ``options.axis_name``.
    axis_index_groups: overrides ``options.axis_index_groups``.

  Returns:
    :class:`jaxbn.numerics.Moments` of the feature shape, in the statistics dtype.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxbn
    >>> from jaxbn import numerics
    >>> _, state = jaxbn.bn_init(1)
    >>> m = jaxbn.bn_moments(state, jnp.array([[1.0], [3.0]]))
    >>> m.count.tolist(), m.mean.tolist(), numerics.variance(m).tolist()
    ([2.0], [2.0], [1.0])
  """
  fn = "bn_moments"
  given = {"axis": axis, "axis_name": axis_name, "axis_index_groups": axis_index_groups}
  opts = merge_options(fn, options, given)
  several = isinstance(x, (tuple, list))
  feature_shape = _check_tree(fn, None, state)
  xs, lays = _inputs(fn, x, opts.axis, feature_shape)
  masks = _masks(fn, mask, xs, several)
  groups = opts.axis_index_groups
  groups = None if groups is None else tuple(tuple(g) for g in groups)
  cdt = _compute_dtype(xs, state)
  m = numerics.batch_moments(
    tuple(t.astype(cdt) for t in xs) if several else xs[0].astype(cdt),
    tuple(la.reduction_axes for la in lays) if several else lays[0].reduction_axes,
    mask=masks if several else masks[0],
    axis_name=opts.axis_name,
    axis_index_groups=groups,
  )
  return numerics.Moments(*(t.reshape(feature_shape) for t in m))


def bn_update(
  state: BNState | BNAccState,
  batch: numerics.Moments,
  options: BNOptions | None = None,
  *,
  momentum: float | Array | None = FROM_OPTIONS,
  ema_warmup: bool = FROM_OPTIONS,
  running_var: str = FROM_OPTIONS,
) -> BNState:
  """The running statistics after a batch with moments ``batch``: :func:`bn_train`'s update.

  ``mean <- momentum * mean + (1 - momentum) * batch mean`` (likewise ``var``;
  ``momentum=None``: the exact cumulative statistics; ``ema_warmup``,
  ``running_var``: as in :func:`bn_train`), ``count`` and ``step`` advanced.
  A feature whose batch statistics are not finite, or (moving average) come
  from fewer than 2 values, keeps its statistics. Differentiable in
  ``batch``; ``momentum`` may be a traced array.

  Args:
    state: a :class:`BNState`.
    batch: :class:`jaxbn.numerics.Moments` of the feature shape (e.g. from
      :func:`bn_moments`).
    options: a :class:`BNOptions` (``momentum``, ``ema_warmup`` and
      ``running_var`` are read), or ``None`` for the defaults.
    momentum: overrides ``options.momentum``.
    ema_warmup: overrides ``options.ema_warmup``.
    running_var: overrides ``options.running_var``.

  Returns:
    The new :class:`BNState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxbn
    >>> _, state = jaxbn.bn_init(1)
    >>> m = jaxbn.bn_moments(state, jnp.array([[1.0], [3.0]]))
    >>> new = jaxbn.bn_update(state, m, momentum=0.5)
    >>> new.mean.tolist(), new.var.tolist(), int(new.step)  # 0.5 * (0, 1) + 0.5 * (2, 1)
    ([1.0], [1.0], 1)
  """
  fn = "bn_update"
  given = {"momentum": momentum, "ema_warmup": ema_warmup, "running_var": running_var}
  opts = merge_options(fn, options, given)
  _check_tree(fn, None, state)
  _check_options(fn, opts.momentum, DEFAULTS.epsilon, opts.running_var)
  plain = BNState(*state[:4])
  return _update_state(plain, batch, opts.momentum, opts.ema_warmup, opts.running_var)


# Exported (``jax.export``) functions that take or return params and state
# serialize them under these names.
jax.export.register_namedtuple_serialization(BNParams, serialized_name="jaxbn.BNParams")
jax.export.register_namedtuple_serialization(BNState, serialized_name="jaxbn.BNState")
jax.export.register_namedtuple_serialization(BNAccState, serialized_name="jaxbn.BNAccState")
