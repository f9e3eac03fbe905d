"""A drop-in replacement for ``flax.nnx.BatchNorm``, built on the core.

Same constructor, same variables (``mean`` and ``var`` as ``nnx.BatchStat``,
``scale`` and ``bias`` as ``nnx.Param``), same ``.train()`` / ``.eval()`` and
``nnx.view(model, use_running_average=...)``. The module's
:class:`jaxbn.layer.BNLayer` reads its variables, calls :func:`jaxbn.bn_train`
or :func:`jaxbn.bn_infer` and writes the new statistics back.

References:
  Ioffe & Szegedy, "Batch Normalization", ICML 2015, arXiv:1502.03167.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes
from flax.nnx.nn import initializers

from jaxbn.core import DEFAULTS
from jaxbn.core import BNOptions
from jaxbn.core import Renorm
from jaxbn.layer import STAT_NAMES
from jaxbn.layer import BNLayer
from jaxbn.layer import merge_options
from jaxbn.population import axis_bound
from jaxbn.population import population_stats

__all__ = ("BatchNorm", "nnx_population_stats")

_ZEROS = initializers.zeros_init()
_ONES = initializers.ones_init()


class BatchNorm(nnx.Module):
  r"""Batch normalization (Ioffe & Szegedy 2015), a drop-in for ``flax.nnx.BatchNorm``.

  In training (``use_running_average=False``, or after ``.train()``), per
  feature over every other axis, two-pass in at least float32::

      y = (x - mu_B) / sqrt(var_B + epsilon) * scale + bias
      mean <- momentum * mean + (1 - momentum) * mu_B        # likewise var

  In evaluation (``.eval()``) the stored ``mean`` and ``var`` are used.

  Variables: ``mean``, ``var`` (``nnx.BatchStat``, float32, or float64 for
  ``param_dtype=float64`` with x64, shape ``(num_features,)``); ``scale``,
  ``bias`` (``nnx.Param`` in ``param_dtype``, or ``None`` when ``use_scale`` /
  ``use_bias`` is False).
  Only when the configuration needs them: ``count`` (``nnx.BatchStat``,
  float32) with ``momentum=None`` or ``ema_warmup=True``; ``step``
  (``nnx.BatchStat``, int32 scalar) for a ``renorm`` schedule or
  ``accumulate_steps > 1``; with ``accumulate_steps > 1`` also ``acc_count``,
  ``acc_mean``, ``acc_m2`` (the micro-batches' moments since the last update).

  ``use_fast_variance`` and ``promote_dtype`` are accepted for compatibility
  and have no effect: the statistics are always two-pass in at least float32
  (flax's one-pass default is wrong far from zero; results equal flax's with
  ``use_fast_variance=False``), and the output has ``dtype`` if given, else
  the input's dtype.

  The batch-norm options come as flax-style keywords or as one
  :class:`jaxbn.BNOptions` (``options``); with ``options``, a keyword left
  at its default defers to it, and one given otherwise must agree with it.
  Either way the module's attributes (``momentum``, ``epsilon``, ...) hold the
  options it uses.

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

  def __init__(
    self,
    num_features: int | Sequence[int],
    *,
    use_running_average: bool | None = False,
    axis: int | Sequence[int] = DEFAULTS.axis,
    momentum: float | None = DEFAULTS.momentum,
    epsilon: float = DEFAULTS.epsilon,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Any = _ZEROS,
    scale_init: Any = _ONES,
    axis_name: Any = DEFAULTS.axis_name,
    axis_index_groups: Any = DEFAULTS.axis_index_groups,
    use_fast_variance: bool = True,
    promote_dtype: Any = dtypes.promote_dtype,
    rngs: nnx.Rngs,
    bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    scale_metadata: Mapping[str, Any] = MappingProxyType({}),
    ghost_batch_size: int | None = DEFAULTS.ghost_batch_size,
    renorm: Renorm | None = DEFAULTS.renorm,
    ema_warmup: bool = DEFAULTS.ema_warmup,
    running_var: str = DEFAULTS.running_var,
    accumulate_steps: int = DEFAULTS.accumulate_steps,
    options: BNOptions | None = None,
  ):
    given = {k: v for k, v in locals().items() if k in BNOptions._fields}  # first, as given
    options = merge_options("jaxbn.nnx.BatchNorm", options, given)
    layer = BNLayer(num_features, options, param_dtype, use_scale, use_bias)
    try:
      _, state = layer.init()  # bn_init checks num_features and param_dtype
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

  def __call__(
    self,
    x: jax.Array,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
  ) -> jax.Array:
    """Normalizes ``x``; in training, updates ``mean`` and ``var`` in place.

    Args:
      x: floating input; any rank >= 1.
      use_running_average: overrides the attribute (set by ``.train()`` /
        ``.eval()``).
      mask: boolean, True where a value counts toward the statistics (see
        :func:`jaxbn.bn_train`); ignored with the running statistics.

    Returns:
      ``y`` with ``x``'s shape, in ``dtype`` (default ``x``'s dtype).
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
    params, state = layer.read_nnx(self)
    y, new = layer.normalize(
      params,
      state,
      x,
      use_running_average=use_running_average,
      mask=mask,
      where=f"jaxbn.nnx.BatchNorm of feature shape {self.feature_shape}",
    )
    if new is not None:
      layer.write_nnx(self, None, new)
    return y if self.dtype is None else y.astype(self.dtype)

  def set_view(self, use_running_average: bool | None = None):
    """Class method used by ``nnx.view``.

    Args:
      use_running_average: if True, the stored batch statistics will be
        used instead of computing the batch statistics on the input.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


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

  def bn_layers(m):
    return {"/".join(map(str, p)): n for p, n in nnx.iter_graph(m) if isinstance(n, BatchNorm)}

  layers = bn_layers(model)
  if not layers:
    raise ValueError(f"{fn}: the model has no jaxbn.nnx.BatchNorm layer.")
  # The running statistics alone: population_stats updates each once per batch.
  states = {
    k: BNLayer.of(bn).replace(accumulate_steps=1).read_nnx(bn)[1] for k, bn in layers.items()
  }
  graphdef, nnx_state = nnx.split(model)

  def forward(nnx_state, states, x, **bn_kwargs):
    copy = nnx.merge(graphdef, nnx_state)
    copies = bn_layers(copy)
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
    return out, {k: BNLayer.of(bn).read_nnx(bn)[1] for k, bn in copies.items()}

  got = population_stats(
    forward, nnx_state, states, batches, estimator=estimator, progress=progress, total=total
  )
  for k, bn in layers.items():
    bn.mean[...], bn.var[...] = got[k].mean, got[k].var
    if bn.count is not None:
      bn.count[...] = got[k].count
