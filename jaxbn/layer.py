"""One batch-norm layer: its options, shape and dtypes, and which entries it stores.

A :class:`BNLayer` describes one layer (options, feature shape, params dtype,
which entries it stores) and converts between the core's ``(BNParams,
BNState)`` (:class:`jaxbn.BNAccState` when it accumulates micro-batches) and
entries by name, the form every framework stores. It knows no framework:
each face reads and writes its framework's containers through it
(:func:`jaxbn.linen.read_variables`, :func:`jaxbn.nnx.read_module`,
:meth:`jaxbn.equinox.BatchNorm.read`, :func:`jaxbn.torch.from_torch`), so a
new state entry is added to the core and here, nowhere else.

**The stored-entries rule** (the one place it is stated; the faces point
here). Entries by name, the same in a linen dict, on an nnx module and in an
equinox state:

- ``scale`` and ``bias`` unless ``use_scale`` / ``use_bias`` is False;
- ``mean`` and ``var`` always (flax's tree);
- ``count`` with ``momentum=None`` or ``ema_warmup=True``;
- ``step`` with a renorm schedule or ``accumulate_steps > 1``;
- ``acc_count``, ``acc_mean``, ``acc_m2`` with ``accumulate_steps > 1``.

Reading fills an entry a layer does not store as :func:`jaxbn.bn_init`
would, so flax's own BatchNorm variables (no ``count``, no ``step``) read as
a full state.

Examples:
  >>> import jax.numpy as jnp
  >>> import jaxbn
  >>> from jaxbn.layer import BNLayer
  >>> stats = {'mean': jnp.array([1.0, 2.0]), 'var': jnp.array([4.0, 1.0])}
  >>> params, state = BNLayer().from_entries({}, stats)
  >>> state.count, state.step
  (Array([0., 0.], dtype=float32), Array(0, dtype=int32))
  >>> jaxbn.bn_infer(params, state, jnp.array([[3.0, 2.0]])).round(4)
  Array([[1., 0.]], dtype=float32)
  >>> layer = BNLayer((2,), jaxbn.BNOptions(momentum=None))
  >>> sorted(layer.entries(None, state))
  ['count', 'mean', 'var']
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import cast
from typing import overload

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import numerics
from jaxbn.core import DEFAULTS
from jaxbn.core import BNAccState
from jaxbn.core import BNOptions
from jaxbn.core import BNParams
from jaxbn.core import BNState
from jaxbn.core import Inputs
from jaxbn.core import SingleValueWarning
from jaxbn.core import StateMismatchError
from jaxbn.core import StateT
from jaxbn.core import bn_infer
from jaxbn.core import bn_init
from jaxbn.core import bn_train
from jaxbn.core import merge_options
from jaxbn.numerics import stats_dtype

__all__ = (
  "PARAM_NAMES",
  "PORTED_COUNT",
  "STAT_NAMES",
  "BNLayer",
  "features_last",
  "input_feature_shape",
)

PARAM_NAMES: tuple[str, ...] = BNParams._fields
"""Every params entry a layer can store."""

_ACC = tuple(f"acc_{name}" for name in numerics.Moments._fields)
STAT_NAMES: tuple[str, ...] = (*BNState._fields, *_ACC)
"""Every statistics entry a layer can store (``'batch_stats'`` in linen)."""


PORTED_COUNT = 2.0**40
"""``BNState.count`` given to carried-over statistics when their count is not known.

PyTorch (:mod:`jaxbn.torch`) and Equinox (:func:`jaxbn.equinox.from_equinox`)
do not record how many values entered their running statistics. A
count of 0 would make the first ``ema_warmup`` or ``momentum=None`` update
replace them by the first batch's; this count makes them weigh as the
statistics of a data set far larger than any batch instead: with
``ema_warmup=True`` the update is exactly the plain EMA (torch's) for every
batch of fewer than ``PORTED_COUNT * (1 - momentum) / momentum`` values per
feature (1.2e11 at momentum 0.9), and with ``momentum=None`` a batch of ``n``
values moves them by the weight ``n / (PORTED_COUNT + n)``. It is a power of 2,
exact in float32, and small enough that ``var * count`` stays finite for any
variance below 3e26.
"""


def features_last(axis: int | Sequence[int], ndim: int) -> bool:
  """Whether ``axis`` names exactly the last axis of a rank-``ndim`` input.

  What a batch norm needs to fold into the layer before it (whose output
  features are its last axis) or to be one ONNX ``BatchNormalization`` node.

  Examples:
    >>> from jaxbn.layer import features_last
    >>> features_last(-1, 4), features_last((3,), 4), features_last(1, 4)
    (True, True, False)
  """
  axes: Sequence[int] = (axis,) if isinstance(axis, (int, np.integer)) else axis
  return ndim >= 1 and {int(a) % ndim for a in axes} == {ndim - 1}


def input_feature_shape(x: Any, axis: int | Sequence[int]) -> tuple[int, ...]:
  """Sizes of ``x`` along the (sorted) feature axes, as the core orders them.

  An invalid ``x`` or ``axis`` gives a placeholder shape: the core then raises
  its own clear error when it is called on ``x``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbn.layer import input_feature_shape
    >>> input_feature_shape(jnp.zeros((8, 5, 5, 3)), -1)
    (3,)
    >>> input_feature_shape(jnp.zeros((8, 3, 5)), (1, 2))
    (3, 5)
  """
  shape = tuple(getattr(x, "shape", ()))
  n = len(shape)
  axes = (axis,) if isinstance(axis, (int, np.integer)) else axis
  if not isinstance(axes, (tuple, list)):
    return (1,)
  if not n or not axes or not all(isinstance(a, (int, np.integer)) and -n <= a < n for a in axes):
    return (1,)
  return tuple(shape[a] for a in sorted({int(a) % n for a in axes}))


@dataclasses.dataclass(frozen=True)
class BNLayer:
  """One batch-norm layer: what it computes and which variables it stores.

  Attributes:
    feature_shape: the sizes of its feature axes, or ``None`` to take them
      from the variables read (:meth:`init` needs them).
    options: its :class:`jaxbn.BNOptions`.
    param_dtype: dtype of ``scale`` and ``bias``; the statistics have
      :func:`jaxbn.stats_dtype` of it.
    use_scale: it stores (learns) ``scale``; else ``scale`` is 1.
    use_bias: it stores (learns) ``bias``; else ``bias`` is 0.
  """

  feature_shape: tuple[int, ...] | None = None
  options: BNOptions = DEFAULTS
  param_dtype: Any = jnp.float32
  use_scale: bool = True
  use_bias: bool = True

  @classmethod
  def of(cls, module: Any, feature_shape: Sequence[int] | None = None, *, x: Any = None) -> BNLayer:
    """The layer a batch-norm module describes, from its attributes.

    Works for :class:`jaxbn.linen.BatchNorm`, :class:`jaxbn.nnx.BatchNorm`,
    ``flax.linen.BatchNorm`` and ``flax.nnx.BatchNorm`` (an option a module
    does not have takes the default). A linen module holds no shape: pass
    ``feature_shape``, or its input ``x`` (for a tuple of inputs, the first
    one's); an nnx module's is its own.
    """
    attrs = {k: getattr(module, k) for k in BNOptions._fields if hasattr(module, k)}
    options = merge_options(type(module).__qualname__, getattr(module, "options", None), attrs)
    if isinstance(x, (tuple, list)) and x:  # inputs with one set of statistics: one shape
      x = x[0]
    if feature_shape is None and x is not None:
      feature_shape = input_feature_shape(x, options.axis)
    if feature_shape is None:
      feature_shape = getattr(module, "feature_shape", None)
    if feature_shape is None and getattr(module, "mean", None) is not None:
      feature_shape = np.shape(module.mean[...])
    return cls(
      feature_shape=None if feature_shape is None else tuple(feature_shape),
      options=options,
      param_dtype=getattr(module, "param_dtype", jnp.float32),
      use_scale=bool(getattr(module, "use_scale", True)),
      use_bias=bool(getattr(module, "use_bias", True)),
    )

  def replace(self, **changes: Any) -> BNLayer:
    """A copy with fields changed; :class:`jaxbn.BNOptions` fields change ``options``."""
    opts = {k: changes.pop(k) for k in list(changes) if k in BNOptions._fields}
    if opts:
      changes["options"] = changes.get("options", self.options)._replace(**opts)
    return dataclasses.replace(self, **changes)

  # ------------------------------------------------------------------
  # What it stores

  @property
  def stats_dtype(self) -> jnp.dtype:
    """The dtype of its running statistics."""
    return stats_dtype(self.param_dtype)

  @property
  def stores_count(self) -> bool:
    """It stores the per-feature ``count`` (cumulative or warm-up average)."""
    return self.options.momentum is None or bool(self.options.ema_warmup)

  @property
  def stores_step(self) -> bool:
    """It stores the update ``step`` (renorm limits that follow a schedule; accumulation)."""
    r = self.options.renorm
    schedule = r is not None and (callable(r.rmax) or callable(r.dmax))
    return schedule or self.stores_acc

  @property
  def stores_acc(self) -> bool:
    """It stores the micro-batches' moments (``accumulate_steps > 1``; ``step`` too)."""
    return self.options.accumulate_steps != 1

  @property
  def param_names(self) -> tuple[str, ...]:
    """The params entries it stores."""
    use = {"scale": self.use_scale, "bias": self.use_bias}
    return tuple(k for k in PARAM_NAMES if use[k])

  @property
  def stat_names(self) -> tuple[str, ...]:
    """The statistics entries it stores."""
    use = {"mean": True, "var": True, "count": self.stores_count, "step": self.stores_step}
    use.update(dict.fromkeys(_ACC, self.stores_acc))
    return tuple(k for k in STAT_NAMES if use[k])

  # ------------------------------------------------------------------
  # The core's form

  def init(self) -> tuple[BNParams, BNState | BNAccState]:
    """Fresh ``(params, state)``: :func:`jaxbn.bn_init` of this layer."""
    # feature_shape None (not known yet): bn_init raises the error, naming the value.
    shape = cast("tuple[int, ...]", self.feature_shape)
    return bn_init(shape, dtype=self.param_dtype, accumulate_steps=self.options.accumulate_steps)

  def entries(self, params: BNParams | None, state: BNState | BNAccState | None) -> dict[str, Any]:
    """The stored entries of ``params`` and ``state`` by name (either may be None)."""
    full = self._all_entries(params, state)
    names = (self.param_names if params is not None else ()) + (
      self.stat_names if state is not None else ()
    )
    return {k: full[k] for k in names}

  def _all_entries(
    self, params: BNParams | None, state: BNState | BNAccState | None
  ) -> dict[str, Any]:
    """Every entry of ``params`` and ``state`` by name, stored or not."""
    full: dict[str, Any] = {}
    if params is not None:
      full.update(params._asdict())
    if state is not None:
      full.update({k: getattr(state, k) for k in BNState._fields})
      if isinstance(state, BNAccState):
        full.update(zip(_ACC, state.acc, strict=True))
      elif self.stores_acc:
        raise TypeError(
          f"BNLayer: the layer accumulates micro-batches (accumulate_steps="
          f"{self.options.accumulate_steps}) but the state is a {type(state).__name__}; make "
          f"it with bn_init(..., accumulate_steps={self.options.accumulate_steps})."
        )
    return full

  def from_entries(
    self, params: Mapping[str, Any], stats: Mapping[str, Any], *, fn: str = "BNLayer"
  ) -> tuple[BNParams, BNState | BNAccState]:
    """``(params, state)`` from entries by name; a missing one as :func:`jaxbn.bn_init` makes it.

    The missing entries take the shape of ``mean``, the missing statistics
    its dtype; a missing ``scale`` (``bias``) is 1 (0) in ``param_dtype``.
    Shapes are not compared here: :func:`jaxbn.bn_train` and the other
    consumers name the arrays that differ.
    """
    missing = [k for k in ("mean", "var") if k not in stats]
    if missing:
      raise ValueError(
        f"{fn}: the batch statistics must hold 'mean' and 'var'; {missing} missing (got "
        f"{sorted(stats)})."
      )
    mean = jnp.asarray(stats["mean"])
    # The entries' own shape: the core names arrays of different layers when they meet.
    layer = self.replace(feature_shape=tuple(mean.shape))
    p0, s0 = layer.init()
    p = {**p0._asdict(), **{k: params[k] for k in PARAM_NAMES if k in params}}
    full = dict(zip(BNState._fields, s0[:4], strict=True))
    if isinstance(s0, BNAccState):
      full.update(zip(_ACC, s0.acc, strict=True))
    for k, v in full.items():
      if k in stats:
        full[k] = stats[k]
      elif k != "step":  # filled in the statistics' dtype
        full[k] = v.astype(mean.dtype)
    state = BNState(**{k: full[k] for k in BNState._fields})
    if layer.stores_acc:
      state = BNAccState(*state, acc=numerics.Moments(*(full[k] for k in _ACC)))
    return BNParams(**p), state

  # ------------------------------------------------------------------
  # 0.2's framework methods, now functions of the faces (kept for one release)

  def read_linen(self, variables: Mapping[str, Any]) -> tuple[BNParams, BNState | BNAccState]:
    """Deprecated: :func:`jaxbn.linen.read_variables` ``(variables, layer)``."""
    return _moved("read_linen", "jaxbn.linen", "read_variables")(variables, self)

  def write_linen(self, params: BNParams, state: BNState | BNAccState) -> dict[str, dict[str, Any]]:
    """Deprecated: :func:`jaxbn.linen.write_variables` ``(params, state, layer)``."""
    return _moved("write_linen", "jaxbn.linen", "write_variables")(params, state, self)

  def read_nnx(self, module: Any) -> tuple[BNParams, BNState | BNAccState]:
    """Deprecated: :func:`jaxbn.nnx.read_module` ``(module, layer)``."""
    return _moved("read_nnx", "jaxbn.nnx", "read_module")(module, self)

  def write_nnx(
    self, module: Any, params: BNParams | None, state: BNState | BNAccState | None
  ) -> Any:
    """Deprecated: :func:`jaxbn.nnx.write_module` ``(module, params, state, layer)``."""
    return _moved("write_nnx", "jaxbn.nnx", "write_module")(module, params, state, self)

  # ------------------------------------------------------------------
  # Normalization

  @overload
  def normalize(
    self,
    params: BNParams,
    state: StateT,
    x: jax.Array,
    *,
    use_running_average: bool,
    mask: jax.Array | None = None,
    initializing: bool = False,
    where: str | None = None,
  ) -> tuple[jax.Array, StateT | None]: ...
  @overload
  def normalize(
    self,
    params: BNParams,
    state: StateT,
    x: Inputs,
    *,
    use_running_average: bool,
    mask: Sequence[jax.Array | None] | None = None,
    initializing: bool = False,
    where: str | None = None,
  ) -> tuple[tuple[jax.Array, ...], StateT | None]: ...
  @overload
  def normalize(
    self,
    params: BNParams,
    state: StateT,
    x: jax.Array | Inputs,
    *,
    use_running_average: bool,
    mask: jax.Array | Sequence[jax.Array | None] | None = None,
    initializing: bool = False,
    where: str | None = None,
  ) -> tuple[jax.Array | tuple[jax.Array, ...], StateT | None]: ...
  def normalize(
    self,
    params: BNParams,
    state: StateT,
    x: jax.Array | Inputs,
    *,
    use_running_average: bool,
    mask: jax.Array | Sequence[jax.Array | None] | None = None,
    initializing: bool = False,
    where: str | None = None,
  ) -> tuple[jax.Array | tuple[jax.Array, ...], StateT | None]:
    """``(y, new_state)`` in training, ``(y, None)`` with the running statistics.

    ``x`` may be a tuple of inputs that share one set of statistics
    (:func:`jaxbn.bn_train`'s joint statistics; ``mask`` then a tuple with one
    mask or None per input): ``y`` is then a tuple of outputs, and with the
    running statistics each input is normalized as alone.

    ``where`` names the layer (its path in the model) in the error raised for
    params and state of different shapes.

    While a module initializes, the named-axis collective is skipped (the axis
    need not exist yet) and no one-value-per-feature warning is raised (flax
    idioms initialize on a single example); the state is not updated then.
    """
    # One array or a tuple, with a mask of the same form (as the overloads above tie them).
    inputs: Any = x
    masks: Any = mask
    try:
      if use_running_average:
        return bn_infer(params, state, inputs, self.options), None
      if not initializing:
        return bn_train(params, state, inputs, self.options, mask=masks)
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", SingleValueWarning)
        y, _ = bn_train(
          params, state, inputs, self.options, mask=masks, axis_name=None, axis_index_groups=None
        )
      return y, None
    except StateMismatchError as e:
      if where is None:
        raise
      raise StateMismatchError(f"{where}: {e}") from None


def _moved(method: str, module: str, name: str) -> Any:
  """The face's function that replaces ``BNLayer.method``, with a FutureWarning."""
  warnings.warn(
    f"BNLayer.{method} is deprecated: use {module}.{name}(..., layer) (the framework's own "
    f"module holds its variables' reading and writing)",
    FutureWarning,
    stacklevel=3,
  )
  return getattr(importlib.import_module(module), name)
