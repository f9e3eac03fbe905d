"""A drop-in replacement for ``flax.nnx.BatchNorm``, built on the core.

Same constructor, same variables (``mean`` and ``var`` as ``nnx.BatchStat``,
``scale`` and ``bias`` as ``nnx.Param``), same ``.train()`` / ``.eval()`` and
``nnx.view(model, use_running_average=...)``. The module reads its variables
(:func:`read_module`), calls :func:`jaxbn.bn_train` or :func:`jaxbn.bn_infer`
and writes the new statistics back (:func:`write_module`).

Everything jaxbn does for nnx lives here: the module, one layer's variables
as the core's ``(params, state)`` and back, population statistics of a
model (:func:`nnx_population_stats`) and folding a model's batch norms into
the layers before them (:func:`fold_nnx`).

References:
  Ioffe & Szegedy, "Batch Normalization", ICML 2015, arXiv:1502.03167.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any
from typing import overload

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes
from flax.nnx.nn import initializers

from jaxbn.core import FROM_OPTIONS
from jaxbn.core import BNAccState
from jaxbn.core import BNOptions
from jaxbn.core import BNParams
from jaxbn.core import BNState
from jaxbn.core import Inputs
from jaxbn.core import Renorm
from jaxbn.core import bn_init
from jaxbn.core import merge_options
from jaxbn.folding import FoldTrace
from jaxbn.folding import fold_bn
from jaxbn.folding import qualified_name
from jaxbn.layer import PARAM_NAMES
from jaxbn.layer import STAT_NAMES
from jaxbn.layer import BNLayer
from jaxbn.population import axis_bound
from jaxbn.population import population_stats

__all__ = (
  "BatchNorm",
  "FoldedBatchNorm",
  "fold_nnx",
  "nnx_population_stats",
  "read_module",
  "write_module",
)

_ZEROS = initializers.zeros_init()
_ONES = initializers.ones_init()


class BatchNorm(nnx.Module):
  r"""Batch normalization (Ioffe & Szegedy 2015), a drop-in for ``flax.nnx.BatchNorm``.

  In training (``use_running_average=False``, or after ``.train()``) it is
  :func:`jaxbn.bn_train` (the formula, its numerics and every option are
  stated there); in evaluation (``.eval()``), :func:`jaxbn.bn_infer` with the
  stored ``mean`` and ``var``.

  Variables: ``mean``, ``var`` (``nnx.BatchStat``, float32, or float64 for
  ``param_dtype=float64`` with x64, shape ``(num_features,)``); ``scale``,
  ``bias`` (``nnx.Param`` in ``param_dtype``, or ``None`` when ``use_scale`` /
  ``use_bias`` is False).
  Only when the configuration needs them: ``count`` (``nnx.BatchStat``,
  float32) with ``momentum=None`` or ``ema_warmup=True``; ``step``
  (``nnx.BatchStat``, int32 scalar) for a ``renorm`` schedule or
  ``accumulate_steps > 1``; with ``accumulate_steps > 1`` also ``acc_count``,
  ``acc_mean``, ``acc_m2`` (the micro-batches' moments since the last update).

  Called on a tuple of inputs (``mask`` then a tuple too), it returns a
  tuple: in training, the inputs share one set of batch statistics, those of
  all of them together, with one update of the running ones
  (:func:`jaxbn.bn_train`'s joint statistics); in evaluation each input is
  normalized as alone.

  ``use_fast_variance`` and ``promote_dtype`` are accepted for compatibility
  and have no effect: the statistics are always two-pass in at least float32
  (flax's one-pass default is wrong far from zero; results equal flax's with
  ``use_fast_variance=False``), and the output has ``dtype`` if given, else
  the input's dtype.

  The batch-norm options come as flax-style keywords or as one
  :class:`jaxbn.BNOptions` (``options``), by :func:`jaxbn.bn_train`'s rule: a
  keyword that is given wins over the same field of ``options``. Either way
  the module's attributes (``momentum``, ``epsilon``, ...) hold the options
  it uses. The formula and each option's meaning are :func:`jaxbn.bn_train`'s;
  the variables stored follow :mod:`jaxbn.layer`'s rule.

  Args:
    num_features: size of the feature axis (a tuple for several axes).
    use_running_average: normalize with the stored statistics.
    axis: the feature axis (int or tuple).
    momentum: weight of the old running value, or ``None`` for the exact
      cumulative average.
    epsilon: added to the variance before the square root.
    dtype: dtype of the output (default: the input's).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: learn ``bias`` (beta).
    use_scale: learn ``scale`` (gamma).
    bias_init: initializer of ``bias``.
    scale_init: initializer of ``scale``.
    axis_name: named axis the batch is split over (exact count-weighted merge).
    axis_index_groups: subgroups of ``axis_name``.
    use_fast_variance: no effect (see above).
    promote_dtype: no effect (see above).
    rngs: :class:`flax.nnx.Rngs` for the initializers.
    bias_metadata: metadata of the ``bias`` Param.
    scale_metadata: metadata of the ``scale`` Param.
    ghost_batch_size: virtual batch size (Hoffer et al. 2017).
    renorm: a :class:`jaxbn.Renorm` (Ioffe 2017).
    ema_warmup: count-aware running average (see :func:`jaxbn.bn_train`).
    running_var: ``"biased"`` (flax's) or ``"unbiased"`` (PyTorch's running
      variance, ``n / (n - 1)`` times the batch variance).
    accumulate_steps: micro-batches per update of the running statistics
      (gradient accumulation, see :func:`jaxbn.bn_train`); above 1 the layer
      also holds ``step`` and the micro-batches' moments ``acc_count``,
      ``acc_mean``, ``acc_m2``.
    options: a :class:`jaxbn.BNOptions` holding every option above that
      reaches the core (``None``: the keywords hold them).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbn import nnx as jbn
    >>> bn = jbn.BatchNorm(2, rngs=nnx.Rngs(0))
    >>> y = bn(jnp.array([[1.0, 10.0], [3.0, 30.0]]))  # training mode by default
    >>> y.round(3)
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> [round(v, 4) for v in bn.mean[...].tolist()]
    [0.02, 0.2]
    >>> bn.eval()
    >>> bn.use_running_average
    True

  References:
    Ioffe & Szegedy 2015, arXiv:1502.03167, Algorithms 1 and 2.
  """

  # Set by name in __init__ (every statistics entry and option): declared for type checkers.
  mean: nnx.BatchStat
  var: nnx.BatchStat
  count: nnx.BatchStat | None
  step: nnx.BatchStat | None
  acc_count: nnx.BatchStat | None
  acc_mean: nnx.BatchStat | None
  acc_m2: nnx.BatchStat | None
  momentum: float | None
  epsilon: float
  axis: int | Sequence[int]
  axis_name: Any
  axis_index_groups: Any
  ghost_batch_size: int | None
  renorm: Renorm | None
  ema_warmup: bool
  running_var: str
  accumulate_steps: int

  def __init__(
    self,
    num_features: int | Sequence[int],
    *,
    use_running_average: bool | None = False,
    axis: int | Sequence[int] = FROM_OPTIONS,
    momentum: float | None = FROM_OPTIONS,
    epsilon: float = FROM_OPTIONS,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Any = _ZEROS,
    scale_init: Any = _ONES,
    axis_name: Any = FROM_OPTIONS,
    axis_index_groups: Any = FROM_OPTIONS,
    use_fast_variance: bool = True,
    promote_dtype: Any = dtypes.promote_dtype,
    rngs: nnx.Rngs,
    bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    scale_metadata: Mapping[str, Any] = MappingProxyType({}),
    ghost_batch_size: int | None = FROM_OPTIONS,
    renorm: Renorm | None = FROM_OPTIONS,
    ema_warmup: bool = FROM_OPTIONS,
    running_var: str = FROM_OPTIONS,
    accumulate_steps: int = FROM_OPTIONS,
    options: BNOptions | None = None,
  ):
    given = {k: v for k, v in locals().items() if k in BNOptions._fields}  # first, as given
    options = merge_options("jaxbn.nnx.BatchNorm", options, given)
    layer = BNLayer(None, options, param_dtype, use_scale, use_bias)
    try:  # bn_init checks num_features and param_dtype
      _, state = bn_init(num_features, dtype=param_dtype, accumulate_steps=options.accumulate_steps)
    except (TypeError, ValueError) as e:
      raise type(e)(f"jaxbn.nnx.BatchNorm: {e}") from None
    shape = tuple(state.mean.shape)
    stored = layer.entries(None, state)
    for name in STAT_NAMES:  # every entry an attribute; None where not stored
      setattr(self, name, nnx.data(nnx.BatchStat(stored[name]) if name in stored else None))
    self.scale: nnx.Param | None
    if use_scale:
      self.scale = nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata)
    else:
      self.scale = nnx.data(None)
    self.bias: nnx.Param | None
    if use_bias:
      self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata)
    else:
      self.bias = nnx.data(None)

    self.num_features = num_features
    self.feature_shape = shape
    self.use_running_average = use_running_average
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.use_fast_variance = use_fast_variance
    self.promote_dtype = promote_dtype
    for name, value in options._asdict().items():  # axis, momentum, epsilon, ...
      setattr(self, name, value)

  @overload
  def __call__(
    self,
    x: jax.Array,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
  ) -> jax.Array: ...
  @overload
  def __call__(
    self,
    x: Inputs,
    use_running_average: bool | None = None,
    *,
    mask: Sequence[jax.Array | None] | None = None,
  ) -> tuple[jax.Array, ...]: ...
  def __call__(
    self,
    x: jax.Array | Inputs,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | Sequence[jax.Array | None] | None = None,
  ) -> jax.Array | tuple[jax.Array, ...]:
    """Normalizes ``x``; in training, updates ``mean`` and ``var`` in place.

    Args:
      x: floating input; any rank >= 1. Or a tuple of inputs that share one
        set of statistics (:func:`jaxbn.bn_train`'s joint statistics): in
        training, those of all of them together, one update; with the
        running statistics, each input normalized as alone.
      use_running_average: overrides the attribute (set by ``.train()`` /
        ``.eval()``).
      mask: boolean, True where a value counts toward the statistics (see
        :func:`jaxbn.bn_train`); for a tuple ``x``, a tuple of one mask (or
        None) per input; ignored with the running statistics.

    Returns:
      ``y`` with ``x``'s shape, in ``dtype`` (default ``x``'s dtype); for a
      tuple ``x``, a tuple of them.
    """
    use_running_average = first_from(
      use_running_average,
      self.use_running_average,
      error_msg=(
        "No use_running_average was given to BatchNorm: pass it to the "
        "constructor or the call, or use model.train() / model.eval()."
      ),
    )
    layer = BNLayer.of(self)
    params, state = read_module(self, layer)
    y, new = layer.normalize(
      params,
      state,
      x,
      use_running_average=use_running_average,
      mask=mask,
      where=f"jaxbn.nnx.BatchNorm of feature shape {self.feature_shape}",
    )
    if new is not None:
      write_module(self, None, new, layer)
    return y if self.dtype is None else jax.tree.map(lambda t: t.astype(self.dtype), y)

  def set_view(self, use_running_average: bool | None = None) -> None:
    """Class method used by ``nnx.view``.

    Args:
      use_running_average: if True, the stored batch statistics will be
        used instead of computing the batch statistics on the input.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


# --------------------------------------------------------------------------
# One layer's variables


def read_module(module: Any, layer: BNLayer | None = None) -> tuple[BNParams, BNState | BNAccState]:
  """``(params, state)`` of the core from an nnx batch norm (:class:`BatchNorm` or flax's).

  Args:
    module: a :class:`BatchNorm` or ``flax.nnx.BatchNorm``.
    layer: its :class:`jaxbn.layer.BNLayer`; default ``BNLayer.of(module)``.

  Returns:
    ``(params, state)``; entries the module does not hold are filled as
    :func:`jaxbn.bn_init` would (see :mod:`jaxbn.layer`).

  Examples:
    >>> from flax import nnx
    >>> from jaxbn.nnx import read_module
    >>> params, state = read_module(nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
    >>> state.var.tolist(), int(state.step)
    ([1.0, 1.0, 1.0], 0)
  """
  layer = BNLayer.of(module) if layer is None else layer
  return layer.from_entries(
    _values(module, PARAM_NAMES), _values(module, STAT_NAMES), fn="jaxbn.nnx.read_module"
  )


def write_module(
  module: Any,
  params: BNParams | None,
  state: BNState | BNAccState | None,
  layer: BNLayer | None = None,
) -> Any:
  """Writes ``params`` and ``state`` into an nnx batch norm, in place; returns ``module``.

  Every entry the module holds is written (it must hold those ``layer``
  stores); ``params`` or ``state`` may be ``None`` (left as they are).

  Args:
    module: a :class:`BatchNorm` or ``flax.nnx.BatchNorm``.
    params: :class:`jaxbn.BNParams` or None.
    state: :class:`jaxbn.BNState` (or :class:`jaxbn.BNAccState`) or None.
    layer: its :class:`jaxbn.layer.BNLayer`; default ``BNLayer.of(module)``.
  """
  layer = BNLayer.of(module) if layer is None else layer
  stored = layer.entries(params, state)
  for k, v in layer._all_entries(params, state).items():
    var = getattr(module, k, None)
    if var is not None:
      var.set_value(v)
    elif k in stored:
      raise ValueError(
        f"jaxbn.nnx.write_module: the layer stores {k!r}, but {type(module).__qualname__} has "
        f"no such variable; make the module with the same options."
      )
  return module


def _values(module: Any, names: Sequence[str]) -> dict[str, Any]:
  """The values of the nnx variables ``names`` that ``module`` holds."""
  out = {}
  for k in names:
    var = getattr(module, k, None)
    if var is not None:
      out[k] = var[...]
  return out


# --------------------------------------------------------------------------
# Population statistics of an nnx model.


def nnx_population_stats(
  model: Any,
  batches: Iterable[Any],
  *,
  estimator: str = "exact",
  progress: bool = False,
  total: int | None = None,
  **call_kwargs: Any,
) -> None:
  """:func:`population_stats` for a flax.nnx model using :class:`jaxbn.nnx.BatchNorm`.

  Updates, in place, the ``mean`` and ``var`` (and ``count`` where kept) of
  every :class:`jaxbn.nnx.BatchNorm` in ``model`` with statistics over
  ``batches``. Each batch runs ``model(x, **call_kwargs)`` on a copy of the
  model (``nnx.split`` / ``nnx.merge`` under ``jax.jit``) whose batch-norm
  layers are put in training mode with the overrides of
  :func:`population_stats` (``momentum=None, renorm=None``) set as
  attributes of the copy; ``model`` itself is only written at the end.
  ``call_kwargs`` must not force the layers into evaluation mode
  (``use_running_average=True``): that is detected and raises.

  Args:
    model: a ``flax.nnx.Module``, e.g. :class:`jaxbn.models.NNXMLP` or
      :class:`jaxbn.models.NNXCNN`.
    batches: an iterable of inputs ``x``.
    estimator: ``"exact"`` or ``"paper"``.
    progress: show a progress bar.
    total: number of batches, for the progress bar.
    **call_kwargs: passed to ``model(x, ...)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxbn
    >>> from jaxbn.models import NNXMLP
    >>> model = NNXMLP(3, features=(4,), num_classes=2, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (64, 3)) + 5.0
    >>> jaxbn.nnx_population_stats(model, [x[:32], x[32:]], progress=False)
    >>> h = x @ model.dense[0].kernel[...]
    >>> bool(jnp.allclose(model.bn[0].mean[...], h.mean(0), atol=1e-5))
    True
  """
  fn = "nnx_population_stats"
  forward, nnx_state, states = _population_forward(fn, model, **call_kwargs)
  layers = _bn_layers(model)
  got = population_stats(
    forward, nnx_state, states, batches, estimator=estimator, progress=progress, total=total
  )
  for k, bn in layers.items():
    bn.mean[...], bn.var[...] = got[k].mean, got[k].var
    if bn.count is not None:
      bn.count[...] = got[k].count


def _bn_layers(model: Any) -> dict[str, BatchNorm]:
  return {"/".join(map(str, p)): n for p, n in nnx.iter_graph(model) if isinstance(n, BatchNorm)}


def _population_forward(
  fn: str, model: Any, **call_kwargs: Any
) -> tuple[Callable[..., Any], Any, dict[str, BNState | BNAccState]]:
  """An nnx model's forward in :func:`jaxbn.population_stats`' contract, its state and states.

  ``forward(nnx_state, states, x, **bn_kwargs)`` runs ``model(x, **call_kwargs)``
  on a copy (``nnx.merge``) whose :class:`BatchNorm` layers hold ``states`` and
  ``bn_kwargs`` as attributes, in training mode, one update per batch.
  :func:`nnx_population_stats` and :func:`jaxbn.diagnose` run it.
  """
  layers = _bn_layers(model)
  if not layers:
    raise ValueError(f"{fn}: the model has no jaxbn.nnx.BatchNorm layer.")
  # The running statistics alone: population_stats updates each once per batch.
  states = {
    k: read_module(bn, BNLayer.of(bn).replace(accumulate_steps=1))[1] for k, bn in layers.items()
  }
  graphdef, nnx_state = nnx.split(model)

  def forward(nnx_state, states, x, **bn_kwargs):
    copy = nnx.merge(graphdef, nnx_state)
    copies = _bn_layers(copy)
    for k, bn in copies.items():
      # The copy holds every entry of the plain state (count and step even where the
      # model does not), whatever BNState's fields are.
      for name, value in states[k]._asdict().items():
        setattr(bn, name, nnx.BatchStat(value))
      bn.use_running_average = False
      bn.accumulate_steps = 1  # one update per batch, whatever the layer accumulates
      for name, value in bn_kwargs.items():
        setattr(bn, name, value)
      if bn.axis_name is not None and not axis_bound(bn.axis_name):
        bn.axis_name = bn.axis_index_groups = None  # whole batches: no cross-device sum
    out = copy(x, **call_kwargs)
    return out, {k: read_module(bn)[1] for k, bn in copies.items()}

  return forward, nnx_state, states


# --------------------------------------------------------------------------
# Folding

_BATCH_NORMS = (BatchNorm, nnx.BatchNorm)
_LINEAR = (nnx.Linear, nnx.Conv)


class FoldedBatchNorm(nnx.Module):
  """A batch norm folded into the layer before it (by :func:`fold_nnx`): the identity.

  Takes the batch norm's call arguments (``use_running_average``, ``mask``)
  and returns ``x``, in ``dtype`` when given.
  """

  def __init__(self, dtype: Any = None):
    self.dtype = dtype

  def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    return x if self.dtype is None else x.astype(self.dtype)


def _nodes(model: Any) -> dict[tuple, Any]:
  return {tuple(p): n for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Module)}


def _path(path: tuple) -> str:
  return "/".join(map(str, path))


def _traced_pairs(fn: str, model: Any, args: tuple, kwargs: dict) -> list[tuple[tuple, tuple]]:
  """``(linear path, batch-norm path)`` of every batch norm in a call of a copy of ``model``.

  While the copy runs, the ``__call__`` of the batch norms, ``Linear`` and
  ``Conv`` record their inputs and outputs: a batch norm folds when its
  input is the very output of a ``Linear`` or ``Conv`` call.
  """
  probe = nnx.clone(model)
  paths = {id(n): p for p, n in _nodes(probe).items()}
  trace = FoldTrace("Linear or Conv", _path)

  def spy(cls: type) -> Any:
    call = cls.__call__

    def spied(self, *a, **kw):
      path = paths.get(id(self), ("?",))
      if isinstance(self, _BATCH_NORMS):
        trace.batch_norm(path, self, a[0] if a else kw.get("x"), BNLayer.of(self).options.axis)
      out = call(self, *a, **kw)
      trace.called(path, self, out, linear=isinstance(self, _LINEAR))
      return out

    return call, spied

  classes = (*_BATCH_NORMS, *_LINEAR)
  saved = {}
  try:
    for cls in classes:
      saved[cls], cls.__call__ = spy(cls)
    probe(*args, **kwargs)
  finally:
    for cls, call in saved.items():
      cls.__call__ = call
  return [(linear, bn) for bn, (linear, _) in trace.result(fn, model).items()]


def _fold_into(layer: Any, bn: Any) -> None:
  """Folds the nnx batch norm ``bn`` into the ``Linear`` or ``Conv`` ``layer``, in place."""
  params, state = read_module(bn)
  old_bias = layer.bias[...] if layer.bias is not None else None
  kernel, bias = fold_bn(layer.kernel[...], old_bias, params, state, epsilon=bn.epsilon)
  layer.kernel.set_value(kernel)
  layer.bias = nnx.Param(bias)
  layer.use_bias = True


def fold_nnx(model: Any, *args: Any, **kwargs: Any) -> Any:
  """Folds every batch norm of an nnx model into the Linear or Conv before it.

  Returns a copy (``nnx.clone``; ``model`` is unchanged) whose ``Linear`` /
  ``Conv`` layers followed by a batch norm (:class:`jaxbn.nnx.BatchNorm` or
  ``flax.nnx.BatchNorm``) carry the folded kernel and bias
  (:func:`jaxbn.fold_bn` with the batch norm's ``epsilon``), in evaluation
  mode. Its output equals the original's in evaluation mode.

  A model that knows its pairs needs no example call: one with methods
  ``fold_pairs()`` (``(linear layer, batch norm)`` of each fold) and
  ``without_batch_norm()`` (drops its batch norms, in place, once folded),
  as :class:`jaxbn.models.NNXMLP` and :class:`jaxbn.models.NNXCNN` have.
  Any other model needs an example call, ``fold_nnx(model, x)`` (its call
  arguments, e.g. ``x, train=False``): a copy runs it to find which layer
  each batch norm follows, and each batch norm of the result is a
  :class:`FoldedBatchNorm` (the identity). A batch norm that does not
  directly follow a ``Linear`` or ``Conv`` (an activation between them, say)
  or normalizes another axis than the layer's output features is an error
  naming it. The layer's output must feed only the batch norm, which the
  call does not check.

  Args:
    model: an nnx model.
    *args: an example call's arguments (not needed for a model with ``fold_pairs``).
    **kwargs: its keyword arguments.

  Returns:
    The folded copy.

  Raises:
    TypeError: a model without ``fold_pairs`` and without an example call.
    ValueError: a batch norm that cannot be folded (named with its path and
      class), or no batch norm.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> import jaxbn
    >>> from jaxbn.models import NNXMLP
    >>> model = NNXMLP(5, features=(8,), num_classes=3, rngs=nnx.Rngs(0))
    >>> folded = jaxbn.fold_nnx(model)
    >>> x = jax.random.normal(jax.random.key(0), (4, 5))
    >>> bool(jnp.allclose(folded(x), model(x, train=False), atol=1e-5))
    True

    A model of one's own:

    >>> from jaxbn import nnx as jbn
    >>> class Net(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.dense = nnx.Linear(5, 8, use_bias=False, rngs=rngs)
    ...     self.bn = jbn.BatchNorm(8, rngs=rngs)
    ...     self.head = nnx.Linear(8, 3, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.head(nnx.relu(self.bn(self.dense(x))))
    >>> net = Net(nnx.Rngs(0))
    >>> _ = net(x)  # one training step moves the running statistics
    >>> net.eval()
    >>> folded = jaxbn.fold_nnx(net, x)
    >>> type(folded.bn).__name__
    'FoldedBatchNorm'
    >>> bool(jnp.allclose(folded(x), net(x), atol=1e-5))
    True
  """
  fn = "fold_nnx"
  own = hasattr(model, "fold_pairs") and hasattr(model, "without_batch_norm")
  if own and not args and not kwargs:
    folded = nnx.clone(model)
    pairs = folded.fold_pairs()
    if not pairs:
      raise ValueError(f"{fn}: {qualified_name(model)} has no batch norm; nothing to fold.")
    for layer, bn in pairs:
      _fold_into(layer, bn)
    folded.without_batch_norm()
    folded.eval()
    return folded
  if not args and not kwargs:
    raise TypeError(
      f"{fn}: {qualified_name(model)} has no fold_pairs(); pass an example call, "
      f"fold_nnx(model, x), so that the layer each batch norm follows can be found."
    )
  pairs = _traced_pairs(fn, model, args, kwargs)
  folded = nnx.clone(model)
  nodes = _nodes(folded)
  for linear, bn in pairs:
    _fold_into(nodes[linear], nodes[bn])
    parent, key = nodes[bn[:-1]], bn[-1]
    identity = FoldedBatchNorm(getattr(nodes[bn], "dtype", None))
    if isinstance(key, int):
      parent[key] = identity
    else:
      setattr(parent, key, identity)
  folded.eval()
  return folded
