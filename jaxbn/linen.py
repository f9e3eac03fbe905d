"""A drop-in replacement for ``flax.linen.BatchNorm``, built on the core.

Change one import and a flax model uses jaxbn::

    from jaxbn import linen as jbn   # instead of: import flax.linen as nn
    ... jbn.BatchNorm(use_running_average=not train, momentum=0.9)(x) ...

The constructor, the ``__call__`` signature and the variable tree are flax's,
so variables made by ``flax.linen.BatchNorm`` load unchanged, and the
reverse. The module is a thin shell: it declares the variables its
:class:`jaxbn.layer.BNLayer` stores and calls :func:`jaxbn.bn_train` (batch
statistics) or :func:`jaxbn.bn_infer` (running statistics).

Everything jaxbn does for linen lives here: the module, one layer's
variables as the core's ``(params, state)`` and back
(:func:`read_variables`, :func:`write_variables`), population statistics
of a model (:func:`linen_population_stats`) and folding a model's batch
norms into the layers before them (:func:`fold_linen`).

References:
  Ioffe & Szegedy, "Batch Normalization", ICML 2015, arXiv:1502.03167.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import overload

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.linen import initializers

from jaxbn.core import FROM_OPTIONS
from jaxbn.core import BNAccState
from jaxbn.core import BNOptions
from jaxbn.core import BNParams
from jaxbn.core import BNState
from jaxbn.core import Inputs
from jaxbn.core import Renorm
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
  "FoldedLinen",
  "fold_linen",
  "linen_population_stats",
  "read_variables",
  "write_variables",
)


class BatchNorm(nn.Module):
  r"""Batch normalization (Ioffe & Szegedy 2015), a drop-in for ``flax.linen.BatchNorm``.

  In training (``use_running_average=False``) it is :func:`jaxbn.bn_train`
  (the formula, its numerics and every option are stated there); in
  evaluation (``use_running_average=True``), :func:`jaxbn.bn_infer` with the
  stored ``mean`` and ``var`` (Algorithm 2 of the paper).

  Variables, identical to flax's: ``'params'``: ``scale`` and ``bias`` of the
  feature shape in ``param_dtype`` (each left out when ``use_scale`` or
  ``use_bias`` is False); ``'batch_stats'``: ``mean`` and ``var``, float32 of
  the feature shape. Two more ``'batch_stats'`` entries exist only when the
  configuration needs them, so that a default module has exactly flax's tree:
  ``count`` (float32, feature shape: values seen) when ``momentum=None`` or
  ``ema_warmup=True``, and ``step`` (int32 scalar: updates so far) when
  ``renorm`` has limits that are functions of the step. As in flax, the
  statistics are not updated during ``init``, and the ``axis_name``
  collective is skipped there (the named axis need not exist yet).

  Called on a tuple of inputs (``mask`` then a tuple too), it returns a
  tuple: in training, the inputs share one set of batch statistics, those of
  all of them together, and ``'batch_stats'`` is updated once
  (:func:`jaxbn.bn_train`'s joint statistics, e.g. a critic's ``(s, a)`` and
  ``(s', a')``); in evaluation each input is normalized as alone.

  Differences from flax, all deliberate:

  - ``use_fast_variance`` and ``force_float32_reductions`` are accepted and
    have no effect: jaxbn always computes the variance two-pass in at least
    float32, because flax's one-pass ``E[x^2] - E[x]^2`` loses every digit far
    from zero (on a ``(256, 1024)`` batch of ``1e4 + N(0, 1)`` its per-feature
    output standard deviations range from 0.2 to 356 instead of 1, as
    docs/numerics.md computes), and
    reduced-precision reductions lose the statistics of long batches. The
    results equal flax's with ``use_fast_variance=False``.
  - The output has ``dtype`` if given, else the input's dtype (flax returns
    float32 for bfloat16 input with float32 parameters).
  - ``axis_name`` merges statistics exactly, weighted by each device's count
    (flax takes an equal-weight mean, wrong with masks or unequal shards).
  - Training on a single value per feature returns ``bias``, as flax does,
    but leaves the running statistics unchanged (flax decays ``var`` toward
    0) and warns at trace time (:class:`jaxbn.SingleValueWarning`); ``init``
    never warns.
  - NaN or inf in masked-out positions stay out of the statistics, as in
    flax; moreover a batch whose statistics are not finite leaves the running
    statistics of those features unchanged.
  - ``param_dtype=float64`` (with ``jax_enable_x64``) keeps float64 running
    statistics; every other ``param_dtype`` keeps float32 ones, as flax does.

  The batch-norm options come either as flax-style attributes (``momentum``,
  ``epsilon``, ``axis``, ...) or as one :class:`jaxbn.BNOptions` in
  ``options`` (as :mod:`jaxbn.models` passes them), by :func:`jaxbn.bn_train`'s
  rule: an option attribute that is given wins over the same field of
  ``options``; one not given (its default, ``jaxbn.core.FROM_OPTIONS``)
  takes the field, or :class:`jaxbn.BNOptions`' default. The formula and
  each option's meaning are :func:`jaxbn.bn_train`'s; the variables stored
  follow :mod:`jaxbn.layer`'s rule.

  Attributes:
    use_running_average: normalize with the stored statistics (evaluation)
      instead of the batch's; may also be given to ``__call__``.
    axis: the feature axis (int or tuple); every other axis is reduced.
    momentum: weight of the old running value (flax's convention; PyTorch's
      ``momentum=0.1`` is ``0.9`` here), or ``None`` for the exact cumulative
      average of every value seen.
    epsilon: added to the variance before the square root.
    dtype: dtype of the output (default: the input's).
    param_dtype: dtype of ``scale`` and ``bias``.
    use_bias: learn ``bias`` (beta); else it is 0.
    use_scale: learn ``scale`` (gamma); else it is 1.
    bias_init: initializer of ``bias``.
    scale_init: initializer of ``scale``.
    axis_name: a named axis (``shard_map``, ``pmap``, ``vmap``) the batch is
      split over; statistics are those of the whole batch.
    axis_index_groups: subgroups of ``axis_name`` normalized independently.
    use_fast_variance: accepted for compatibility; no effect (see above).
    force_float32_reductions: accepted for compatibility; no effect (see above).
    ghost_batch_size: normalize contiguous virtual batches of this size
      separately (Hoffer et al. 2017).
    renorm: a :class:`jaxbn.Renorm` for batch renormalization (Ioffe 2017).
    ema_warmup: count-aware running average for the first steps (see
      :func:`jaxbn.bn_train`).
    running_var: ``"biased"`` (flax's) or ``"unbiased"`` (PyTorch's: the
      running variance moves toward ``n / (n - 1)`` times the batch variance).
    accumulate_steps: micro-batches per update of the running statistics
      (gradient accumulation, see :func:`jaxbn.bn_train`); above 1,
      ``'batch_stats'`` also holds ``step`` and the micro-batches' moments
      ``acc_count``, ``acc_mean``, ``acc_m2``.
    options: a :class:`jaxbn.BNOptions` holding every option above that
      reaches the core (``None``: the attributes hold them).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbn import linen as jbn
    >>> bn = jbn.BatchNorm()
    >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
    >>> variables = bn.init(jax.random.key(0), x, use_running_average=False)
    >>> jax.tree.map(jnp.shape, variables)
    {'batch_stats': {'mean': (2,), 'var': (2,)}, 'params': {'bias': (2,), 'scale': (2,)}}
    >>> y, updates = bn.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
    >>> y.round(3)
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> [round(v, 4) for v in updates['batch_stats']['mean'].tolist()]
    [0.02, 0.2]

    Two inputs, one set of statistics (those of their rows together):

    >>> (ya, yb), _ = bn.apply(variables, (x[:1], x[1:]), use_running_average=False,
    ...                        mutable=['batch_stats'])
    >>> ya.round(3), yb.round(3)
    (Array([[-1., -1.]], dtype=float32), Array([[1., 1.]], dtype=float32))

  References:
    Ioffe & Szegedy 2015, arXiv:1502.03167, Algorithms 1 and 2.
  """

  use_running_average: bool | None = None
  axis: int | Sequence[int] = FROM_OPTIONS
  momentum: float | None = FROM_OPTIONS
  epsilon: float = FROM_OPTIONS
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Any = initializers.zeros
  scale_init: Any = initializers.ones
  axis_name: Any = FROM_OPTIONS
  axis_index_groups: Any = FROM_OPTIONS
  use_fast_variance: bool = True
  force_float32_reductions: bool = True
  ghost_batch_size: int | None = FROM_OPTIONS
  renorm: Renorm | None = FROM_OPTIONS
  ema_warmup: bool = FROM_OPTIONS
  running_var: str = FROM_OPTIONS
  accumulate_steps: int = FROM_OPTIONS
  options: BNOptions | None = None

  @overload
  def __call__(
    self, x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None
  ) -> jax.Array: ...
  @overload
  def __call__(
    self,
    x: Inputs,
    use_running_average: bool | None = None,
    *,
    mask: Sequence[jax.Array | None] | None = None,
  ) -> tuple[jax.Array, ...]: ...
  @nn.compact
  def __call__(
    self,
    x: jax.Array | Inputs,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | Sequence[jax.Array | None] | None = None,
  ) -> jax.Array | tuple[jax.Array, ...]:
    """Normalizes ``x``; updates ``'batch_stats'`` in training (when mutable).

    Args:
      x: floating input; any rank >= 1. Or a tuple of inputs that share one
        set of statistics (:func:`jaxbn.bn_train`'s joint statistics): in
        training, those of all of them together, one update of
        ``'batch_stats'``; with the running statistics, each input
        normalized as alone.
      use_running_average: overrides the attribute of the same name.
      mask: boolean, True where a value counts toward the statistics (see
        :func:`jaxbn.bn_train`); for a tuple ``x``, a tuple of one mask (or
        None) per input; ignored with the running statistics.

    Returns:
      ``y`` with ``x``'s shape, in ``dtype`` (default ``x``'s dtype); for a
      tuple ``x``, a tuple of them.
    """
    use_running_average = nn.merge_param(
      "use_running_average", self.use_running_average, use_running_average
    )
    y = _declare_and_normalize(
      BNLayer.of(self, x=x), self, x, use_running_average=use_running_average, mask=mask
    )
    return y if self.dtype is None else jax.tree.map(lambda t: t.astype(self.dtype), y)


def _declare_and_normalize(
  layer: BNLayer, module: Any, x: Any, *, use_running_average: bool, mask: Any
) -> Any:
  """The module's call: declares the variables ``layer`` stores and normalizes ``x``.

  ``module`` declares ``scale`` / ``bias`` (with its ``scale_init`` /
  ``bias_init``) and the statistics, and keeps the new statistics in training
  when ``'batch_stats'`` is mutable. While it initializes, see
  :meth:`jaxbn.layer.BNLayer.normalize`.
  """
  _, s0 = layer.init()
  params = {
    k: module.param(k, getattr(module, f"{k}_init"), layer.feature_shape, layer.param_dtype)
    for k in layer.param_names
  }
  stats = {
    k: module.variable("batch_stats", k, lambda v=v: v) for k, v in layer.entries(None, s0).items()
  }
  p, s = layer.from_entries(params, {k: v.value for k, v in stats.items()})
  path = "/".join(module.path) or "(top level)"
  y, new = layer.normalize(
    p,
    s,
    x,
    use_running_average=use_running_average,
    mask=mask,
    initializing=module.is_initializing(),
    where=f"{type(module).__module__}.{type(module).__qualname__} at {path!r}",
  )
  if new is not None:
    for k, v in layer.entries(None, new).items():
      stats[k].value = v
  return y


# --------------------------------------------------------------------------
# One layer's variables


def read_variables(
  variables: Mapping[str, Any], layer: BNLayer | None = None
) -> tuple[BNParams, BNState | BNAccState]:
  """``(params, state)`` of the core from one linen batch-norm layer's variables.

  Args:
    variables: ``{'params': {...}, 'batch_stats': {...}}`` of
      :class:`BatchNorm` or ``flax.linen.BatchNorm``, or a bare
      ``batch_stats`` dict (``{'mean', 'var', ...}``; params then 1 and 0).
    layer: the layer's :class:`jaxbn.layer.BNLayer` (its options say which
      entries it stores); default ``BNLayer()``.

  Returns:
    ``(params, state)``; entries the variables lack are filled as
    :func:`jaxbn.bn_init` would (see :mod:`jaxbn.layer`).

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxbn
    >>> from jaxbn.linen import read_variables, write_variables
    >>> flax_vars = {'params': {'scale': jnp.ones(2), 'bias': jnp.zeros(2)},
    ...              'batch_stats': {'mean': jnp.array([1.0, 2.0]), 'var': jnp.array([4.0, 1.0])}}
    >>> params, state = read_variables(flax_vars)
    >>> state.count, state.step
    (Array([0., 0.], dtype=float32), Array(0, dtype=int32))
    >>> layer = jaxbn.BNLayer((2,), jaxbn.BNOptions(momentum=None))
    >>> sorted(write_variables(params, state, layer)['batch_stats'])
    ['count', 'mean', 'var']
  """
  fn = "jaxbn.linen.read_variables"
  layer = BNLayer() if layer is None else layer
  if not isinstance(variables, Mapping):
    raise TypeError(f"{fn}: variables must be a dict, got {type(variables).__name__}.")
  if "batch_stats" in variables:
    return layer.from_entries(variables.get("params", {}), variables["batch_stats"], fn=fn)
  if "mean" in variables:
    return layer.from_entries({}, variables, fn=fn)
  raise ValueError(
    f"{fn}: variables must be {{'params': ..., 'batch_stats': ...}} of one layer or its "
    f"'batch_stats' ({{'mean', 'var', ...}}), got keys {sorted(variables)}."
  )


def write_variables(
  params: BNParams, state: BNState | BNAccState, layer: BNLayer | None = None
) -> dict[str, dict[str, Any]]:
  """The linen variables ``{'params': ..., 'batch_stats': ...}`` that ``layer`` stores.

  Args:
    params: :class:`jaxbn.BNParams`.
    state: :class:`jaxbn.BNState` (or :class:`jaxbn.BNAccState`).
    layer: the layer's :class:`jaxbn.layer.BNLayer`; default ``BNLayer()``.
  """
  stored = (BNLayer() if layer is None else layer).entries(params, state)
  return {
    "params": {k: v for k, v in stored.items() if k in PARAM_NAMES},
    "batch_stats": {k: v for k, v in stored.items() if k in STAT_NAMES},
  }


# --------------------------------------------------------------------------
# Population statistics of a linen model.


def _stats_paths(fn: str, batch_stats: Any) -> dict[tuple[str, ...], dict[str, Any]]:
  """The batch-norm layers in a ``'batch_stats'`` tree: path -> its entries."""
  flat = traverse_util.flatten_dict(dict(batch_stats))
  layers: dict[tuple[str, ...], dict[str, Any]] = {}
  for key, value in flat.items():
    layers.setdefault(tuple(key[:-1]), {})[key[-1]] = value
  layers = {p: e for p, e in layers.items() if "mean" in e and "var" in e}
  if not layers:
    raise ValueError(
      f"{fn}: variables have no 'batch_stats' with 'mean' and 'var': the model has "
      f"no batch-norm layer to compute statistics for."
    )
  return layers


def linen_population_stats(
  model: Any,
  variables: Any,
  batches: Iterable[Any],
  *,
  estimator: str = "exact",
  progress: bool = False,
  total: int | None = None,
  **apply_kwargs: Any,
) -> dict:
  """:func:`population_stats` for a flax.linen model using :class:`jaxbn.linen.BatchNorm`.

  Every :class:`jaxbn.linen.BatchNorm` call in ``model.apply(variables, x,
  **apply_kwargs)`` is intercepted (``flax.linen.intercept_methods``) and
  replaced by :func:`jaxbn.bn_train` with the layer's own ``axis``,
  ``epsilon``, ``axis_name``, ``axis_index_groups``, ``ghost_batch_size`` and
  ``mask``, but with the overrides of :func:`population_stats`
  (``momentum=None, renorm=None``), whatever the module's attributes and its
  ``use_running_average``: the layers see batch-normalized inputs as in
  training (Algorithm 2), and the statistics cannot be running averages.
  An ``axis_name`` that is not bound where this runs (outside the mesh the
  model was trained on) is dropped: each batch is whole, and the statistics
  over all batches need no cross-device sum.

  Args:
    model: a ``flax.linen.Module``, e.g. :class:`jaxbn.models.MLP` or
      :class:`jaxbn.models.CNN`.
    variables: its variables (``'params'`` and ``'batch_stats'``).
    batches: an iterable of inputs ``x``.
    estimator: ``"exact"`` or ``"paper"`` (see :func:`population_stats`).
    progress: show a progress bar.
    total: number of batches, for the progress bar.
    **apply_kwargs: passed to ``model.apply`` (e.g. ``train=True``).

  Returns:
    A copy of ``variables`` whose ``'batch_stats'`` hold the population
    ``mean`` and ``var`` (and ``count`` where the layer keeps one).

  Raises:
    ValueError: a layer with ``'batch_stats'`` is not a
      :class:`jaxbn.linen.BatchNorm` (e.g. ``flax.linen.BatchNorm``: use the
      drop-in) or is called more than once per forward pass.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxbn
    >>> from jaxbn.models import MLP
    >>> model = MLP(features=(4,), num_classes=2)
    >>> x = jax.random.normal(jax.random.key(0), (64, 3)) + 5.0
    >>> variables = model.init(jax.random.key(1), x, train=False)
    >>> variables = jaxbn.linen_population_stats(
    ...     model, variables, [x[:32], x[32:]], train=True, progress=False)
    >>> h = x @ variables['params']['Dense_0']['kernel']
    >>> bool(jnp.allclose(variables['batch_stats']['BatchNorm_0']['mean'], h.mean(0), atol=1e-5))
    True
  """
  fn = "linen_population_stats"
  batch_stats = variables.get("batch_stats", {}) if hasattr(variables, "get") else {}
  layers = _stats_paths(fn, batch_stats)
  forward, states = _population_forward(fn, model, variables, **apply_kwargs)
  got = population_stats(
    forward, variables, states, batches, estimator=estimator, progress=progress, total=total
  )
  new_stats = {}
  for path, entries in layers.items():
    s = got["/".join(path)]
    entries = dict(entries, mean=s.mean, var=s.var)
    if "count" in entries:
      entries["count"] = s.count
    new_stats[path] = entries
  flat = {(*p, k): v for p, e in new_stats.items() for k, v in e.items()}
  full = traverse_util.flatten_dict(dict(batch_stats))
  full.update(flat)
  out = dict(variables)
  out["batch_stats"] = traverse_util.unflatten_dict(full)
  return out


def _population_forward(
  fn: str, model: Any, variables: Any, **apply_kwargs: Any
) -> tuple[Callable[..., Any], dict[str, BNState | BNAccState]]:
  """A linen model's forward in :func:`jaxbn.population_stats`' contract, and its states.

  Returns ``(forward, states)``: ``forward(variables, states, x, **bn_kwargs)``
  runs ``model.apply(variables, x, **apply_kwargs)`` with every
  :class:`BatchNorm` call replaced by :func:`jaxbn.bn_train` on ``states[path]``
  with ``bn_kwargs`` as overrides (one update per batch; an ``axis_name`` not
  bound here dropped); ``states`` maps each layer's path (``'a/b'``) to its
  running statistics. :func:`linen_population_stats` and
  :func:`jaxbn.diagnose` run it.
  """
  batch_stats = variables.get("batch_stats", {}) if hasattr(variables, "get") else {}
  layers = _stats_paths(fn, batch_stats)
  # The running statistics alone: population_stats updates each once per batch.
  states = {"/".join(p): read_variables(e)[1] for p, e in layers.items()}

  def forward(variables, states, x, **bn_kwargs):
    new: dict[str, BNState | BNAccState | None] = {}

    def intercept(next_fun, args, kwargs, context):
      mod = context.module
      if not isinstance(mod, BatchNorm) or context.method_name != "__call__":
        return next_fun(*args, **kwargs)
      key = "/".join(mod.path)
      if key in new:
        raise ValueError(
          f"{fn}: the batch-norm layer {key!r} is called more than once per forward "
          f"pass; its statistics would mix several inputs."
        )
      if key not in states:
        raise ValueError(f"{fn}: the batch-norm layer {key!r} has no 'batch_stats'.")
      # One update per batch, whatever the layer accumulates in training.
      layer = BNLayer.of(mod, states[key].mean.shape).replace(**bn_kwargs, accumulate_steps=1)
      if layer.options.axis_name is not None and not axis_bound(layer.options.axis_name):
        layer = layer.replace(axis_name=None, axis_index_groups=None)
      params, _ = layer.from_entries(mod.variables.get("params", {}), layers[tuple(mod.path)])
      y, new[key] = layer.normalize(
        params, states[key], args[0], use_running_average=False, mask=kwargs.get("mask")
      )
      return y if mod.dtype is None else y.astype(mod.dtype)

    with nn.intercept_methods(intercept):
      out = model.apply(variables, x, mutable=["batch_stats"], **apply_kwargs)
    missing = sorted(set(states) - set(new))
    if missing:
      raise ValueError(
        f"{fn}: the layers {missing} have 'batch_stats' but were not run as "
        f"jaxbn.linen.BatchNorm (flax.linen.BatchNorm? use the drop-in "
        f"jaxbn.linen.BatchNorm, or jaxbn.population_stats with a forward function)."
      )
    return out[0], {k: new[k] for k in states}

  return forward, states


# --------------------------------------------------------------------------
# Folding


_BATCH_NORMS = (BatchNorm, nn.BatchNorm)
_LINEAR = (nn.Dense, nn.Conv)


def _traced_pairs(fn: str, model: Any, variables: Any, args: tuple, kwargs: dict):
  """``(linear, batch norm)`` paths of every batch norm in a call of ``model``.

  Traces ``model.apply(variables, *args, **kwargs)`` (shapes only) and
  follows the data: a batch norm folds when its input is the very output of
  a ``Dense`` or ``Conv`` call.
  """
  trace = FoldTrace("Dense or Conv")

  def intercept(next_fun, a, kw, context):
    mod = context.module
    if context.method_name != "__call__":
      return next_fun(*a, **kw)
    path = "/".join(mod.path)
    if isinstance(mod, _BATCH_NORMS):
      trace.batch_norm(path, mod, a[0] if a else kw.get("x"), BNLayer.of(mod).options.axis)
    out = next_fun(*a, **kw)
    trace.called(path, mod, out, linear=isinstance(mod, _LINEAR))
    return out

  with nn.intercept_methods(intercept):
    jax.eval_shape(lambda v, *a: model.apply(v, *a, **kwargs), variables, *args)
  pairs = trace.result(fn, model)
  return [(linear, bn, BNLayer.of(mod)) for bn, (linear, mod) in pairs.items()]


def _fold_variables(fn: str, variables: Any, pairs: list[tuple[str, str, BNLayer]]) -> dict:
  """``variables`` with each batch norm folded into its linear layer and removed."""
  flat: dict[str, dict[str, Any]] = {
    col: traverse_util.flatten_dict(dict(tree), sep="/") for col, tree in dict(variables).items()
  }
  params, stats = flat.get("params", {}), flat.get("batch_stats", {})
  for linear, bn, layer in pairs:

    def entries(col, prefix):
      return {k[len(prefix) + 1 :]: v for k, v in col.items() if k.startswith(prefix + "/")}

    lin, bn_p, bn_s = entries(params, linear), entries(params, bn), entries(stats, bn)
    if "kernel" not in lin or not bn_s:
      raise ValueError(
        f"{fn}: variables lack {linear!r} in 'params' or {bn!r} in 'batch_stats'; were they "
        f"made by this model's init?"
      )
    p, s = read_variables({"params": bn_p, "batch_stats": bn_s}, layer)
    kernel, bias = fold_bn(lin["kernel"], lin.get("bias"), p, s, epsilon=layer.options.epsilon)
    params[f"{linear}/kernel"], params[f"{linear}/bias"] = kernel, bias
    for col in (params, stats):
      for k in [k for k in col if k.startswith(bn + "/")]:
        del col[k]
  return {col: traverse_util.unflatten_dict(tree, sep="/") for col, tree in flat.items() if tree}


@dataclasses.dataclass(frozen=True)
class FoldedLinen:
  """A linen model whose batch norms are folded into the layers before them.

  ``apply(variables, *args, **kwargs)`` runs ``model.apply`` with every
  folded batch norm skipped and each layer it followed adding its folded
  bias (made by :func:`fold_linen`, with its variables).

  Attributes:
    model: the original model.
    pairs: ``(linear path, batch-norm path)`` of every fold.
  """

  model: Any
  pairs: tuple[tuple[str, str], ...]

  def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
    """``model.apply(variables, *args, **kwargs)`` without the folded batch norms."""
    linear = {lin for lin, _ in self.pairs}
    bns = {bn for _, bn in self.pairs}

    def intercept(next_fun, a, kw, context):
      mod = context.module
      path = "/".join(mod.path)
      if context.method_name != "__call__" or (path not in bns and path not in linear):
        return next_fun(*a, **kw)
      if path in bns:
        x = a[0] if a else kw["x"]
        return x if getattr(mod, "dtype", None) is None else x.astype(mod.dtype)
      y = next_fun(*a, **kw)
      if mod.use_bias:  # the layer adds the folded bias itself
        return y
      bias = mod.get_variable("params", "bias").astype(y.dtype)
      return y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)

    with nn.intercept_methods(intercept):
      return self.model.apply(variables, *args, **kwargs)


def fold_linen(model: Any, variables: Any, *args: Any, **kwargs: Any) -> tuple[Any, dict]:
  """Folds every batch norm of a linen model into the Dense or Conv before it.

  Each batch norm (:class:`jaxbn.linen.BatchNorm` or ``flax.linen.BatchNorm``)
  whose input is the output of a ``Dense`` or ``Conv`` becomes that layer's
  bias, by :func:`jaxbn.fold_bn` with the batch norm's own ``epsilon``; its
  variables leave the tree. The folded model's evaluation output equals the
  original's.

  A model that knows its pairs needs no example call: one with methods
  ``fold_pairs()`` (``(linear path, batch-norm path, BNOptions)`` of each
  fold, e.g. ``('Dense_0', 'BatchNorm_0', options)``) and
  ``without_batch_norm()`` (the same model without them), as
  :class:`jaxbn.models.MLP` and :class:`jaxbn.models.CNN` have, folds into
  the latter. Any other model needs an example call,
  ``fold_linen(model, variables, x, train=False)`` (the arguments after
  ``variables`` of its ``apply``, in evaluation mode; only shapes are used):
  the call is traced to find which layer each batch norm follows, and the
  folded model is a :class:`FoldedLinen`, whose ``apply`` runs the model with
  those batch norms skipped. A batch norm that does not directly follow a
  ``Dense`` or ``Conv`` (an activation between them, say) or normalizes
  another axis than the layer's output features is an error naming it. The
  layer's output must feed only the batch norm (as in ``Dense -> BatchNorm
  -> activation``), which the trace does not check.

  Args:
    model: a linen model.
    variables: its ``'params'`` and ``'batch_stats'`` (running or population
      statistics).
    *args: an example call's arguments (not needed for a model with ``fold_pairs``).
    **kwargs: its keyword arguments (e.g. ``train=False``).

  Returns:
    ``(folded_model, folded_variables)``.

  Raises:
    TypeError: a model without ``fold_pairs`` and without an example call.
    ValueError: a batch norm that cannot be folded (named with its path and
      class), no batch norm, or variables that do not match the model.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxbn
    >>> from jaxbn.models import MLP
    >>> model = MLP(features=(8,), num_classes=3)
    >>> x = jax.random.normal(jax.random.key(0), (4, 5))
    >>> variables = model.init(jax.random.key(1), x, train=False)
    >>> folded, folded_vars = jaxbn.fold_linen(model, variables)
    >>> folded.use_bn, sorted(folded_vars['params']['Dense_0'])
    (False, ['bias', 'kernel'])
    >>> want = model.apply(variables, x, train=False)
    >>> bool(jnp.allclose(folded.apply(folded_vars, x, train=False), want, atol=1e-5))
    True

    A model of one's own, with flax's batch norm:

    >>> import flax.linen as nn
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     x = nn.Dense(8, use_bias=False)(x)
    ...     x = nn.BatchNorm(use_running_average=not train)(x)
    ...     return nn.Dense(3)(nn.relu(x))
    >>> net = Net()
    >>> variables = net.init(jax.random.key(1), x, train=False)
    >>> folded, folded_vars = jaxbn.fold_linen(net, variables, x, train=False)
    >>> sorted(folded_vars)
    ['params']
    >>> want = net.apply(variables, x, train=False)
    >>> bool(jnp.allclose(folded.apply(folded_vars, x, train=False), want, atol=1e-5))
    True
  """
  fn = "fold_linen"
  own = hasattr(model, "fold_pairs") and hasattr(model, "without_batch_norm")
  if own and not args and not kwargs:
    pairs = [(lin, bn, BNLayer(options=opts)) for lin, bn, opts in model.fold_pairs()]
    if not pairs:
      raise ValueError(f"{fn}: {qualified_name(model)} has no batch norm; nothing to fold.")
  elif not args and not kwargs:
    raise TypeError(
      f"{fn}: {qualified_name(model)} has no fold_pairs(); pass an example call after the "
      f"variables, fold_linen(model, variables, x, train=False), so that the layer each batch "
      f"norm follows can be traced."
    )
  else:
    pairs = _traced_pairs(fn, model, variables, args, kwargs)
  folded = _fold_variables(fn, variables, pairs)
  if own and not args and not kwargs:
    return model.without_batch_norm(), {"params": folded["params"]}
  return FoldedLinen(model, tuple((lin, bn) for lin, bn, _ in pairs)), folded
