"""Batch normalization for Equinox: a drop-in for ``equinox.nn.BatchNorm``, and its tools.

Everything jaxbn does for an Equinox model lives here:

- :class:`BatchNorm`, an ``eqx.nn.StatefulLayer`` with equinox's constructor,
  call, modes and state layout (``eqx.nn.make_with_state``,
  ``eqx.nn.inference_mode``, ``eqx.nn.Sequential``, ``eqx.filter_vmap(...,
  axis_name=...)``, serialisation), computed by the core
  (:func:`jaxbn.bn_train`, :func:`jaxbn.bn_infer`), with every option of
  :class:`jaxbn.BNOptions`;
- :meth:`BatchNorm.read` / :meth:`BatchNorm.write`: a layer's variables in an
  ``eqx.nn.State`` as the core's ``(BNParams, BNState)`` and back;
- :func:`from_equinox`: a model's trained ``eqx.nn.BatchNorm`` layers and
  their state carried over into :class:`BatchNorm` in one call;
- :func:`equinox_population_stats`: statistics over a whole data set
  (:func:`jaxbn.population_stats`) for every :class:`BatchNorm` of a model;
- :func:`fold_equinox`: each :class:`BatchNorm` folded into the
  ``eqx.nn.Linear`` or ``eqx.nn.Conv`` before it (:func:`jaxbn.fold_bn`).

The formula and options are :func:`jaxbn.bn_train`'s; which entries a layer
stores is :class:`jaxbn.layer.BNLayer`'s rule. Importing this module needs
equinox (``pip install 'jaxbn[equinox]'``); ``import jaxbn`` does not import it.

References:
  Ioffe & Szegedy, "Batch Normalization", ICML 2015, arXiv:1502.03167.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Iterable
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any
from typing import cast
from typing import overload

import jax
import jax.numpy as jnp

from jaxbn.core import DEFAULTS
from jaxbn.core import FROM_OPTIONS
from jaxbn.core import BNAccState
from jaxbn.core import BNOptions
from jaxbn.core import BNParams
from jaxbn.core import BNState
from jaxbn.core import Inputs
from jaxbn.core import StateT
from jaxbn.core import bn_infer
from jaxbn.core import bn_moments
from jaxbn.core import bn_train
from jaxbn.core import bn_update
from jaxbn.core import merge_options
from jaxbn.extras import require
from jaxbn.folding import fold_bn
from jaxbn.layer import PORTED_COUNT
from jaxbn.layer import BNLayer
from jaxbn.population import population_stats

if TYPE_CHECKING:  # the real module for type checkers; at run time, through require
  import equinox as eqx
else:
  eqx = require("equinox", "jaxbn.equinox")

__all__ = ("BatchNorm", "equinox_population_stats", "fold_equinox", "from_equinox")

MODES = ("batch", "ema")
"""Equinox's modes (``"legacy"``, its default, is ``"ema"`` with a warning)."""

# The options equinox's constructor takes one by one: its keyword -> the BNOptions field.
EQUINOX_NAMES = {"eps": "epsilon", "momentum": "momentum", "axis_name": "axis_name"}


class BatchNorm(eqx.nn.StatefulLayer):
  r"""Batch normalization (Ioffe & Szegedy 2015), a drop-in for ``equinox.nn.BatchNorm``.

  The constructor, the call and the state are equinox's: the layer is called
  on one example ``x`` of shape ``(input_size, *spatial)`` inside
  ``jax.vmap`` / ``eqx.filter_vmap`` with a matching ``axis_name`` (a tuple of
  names for nested vmaps), and the statistics are those of the whole mapped
  batch. Beyond equinox, with ``axis_name=None`` (the default when it is not
  given) a plain call takes a whole batch ``(N, input_size, *spatial)``.

  Modes, as equinox defines them:

  - ``"batch"``: training is :func:`jaxbn.bn_train` (the formula, its
    numerics and every option are stated there): batch statistics, and the
    running ones moved from ``mean = 0, var = 1``; inference normalizes with
    them divided by ``1 - momentum**t`` after ``t`` updates (equinox's
    zero-debiasing; ``t = 0``: as stored). The division applies to the initial
    variance 1 as well, as equinox's does: the inference variance is
    ``momentum**t / (1 - momentum**t)`` above the average of the batches'
    (99 after one step at momentum 0.99, 0.58 after 100, 0.007 after 500).
    ``options=BNOptions(ema_warmup=True)`` (or ``momentum=None``) keeps the
    exact average of the batches instead, used as stored.
  - ``"ema"`` (and ``"legacy"``, equinox's default, with equinox's warning):
    training normalizes with the running statistics just updated with the
    batch's (on the first call, the batch's own), gradients flowing through
    the batch's part; inference with the running statistics. Before any
    training they are ``mean = 0, var = 1`` (equinox leaves them
    uninitialized, so its inference then multiplies ``x`` by about 316).

  Called on a tuple of inputs (``mask`` then a tuple too), it returns a
  tuple: in training (either mode) the inputs share one set of batch
  statistics, those of all of them together, with one update of the running
  ones (:func:`jaxbn.bn_train`'s joint statistics); in inference each input
  is normalized as alone.

  State (an ``eqx.nn.State``), as equinox lays it out: ``"batch"`` mode:
  ``batch_state_index`` (running mean, variance) and ``batch_counter``
  (updates, int32); ``"ema"`` mode: ``ema_state_index`` (mean, variance) and
  ``ema_first_time_index`` (bool). ``extra_state_index`` holds the entries
  only some options need (``count``, the accumulator; see
  :class:`jaxbn.layer.BNLayer`), else it is None. Statistics are float32
  (float64 for a float64 layer) whatever ``dtype``.

  Options follow one rule, :func:`jaxbn.bn_train`'s: ``eps`` (jaxbn's
  ``epsilon``), ``momentum`` and ``axis_name``, when given, win over the same
  fields of ``options``; every other option (masks through the call's
  ``mask``, ``ghost_batch_size``, ``renorm``, ``ema_warmup``,
  ``running_var``, ``accumulate_steps``, ``axis_index_groups``: under
  ``pmap``; ``jax.vmap`` has no index groups) comes in
  ``options``. The feature axis is the channel axis, equinox's (the first of
  an example), so ``options.axis`` stays at its default. ``"ema"`` mode
  normalizes with running statistics, so it takes none of ghost batches,
  renorm or accumulation.

  Args:
    input_size: the number of channels.
    axis_name: the vmapped axis (or tuple of axes) the batch is over, static;
      ``None``: the call takes a whole batch.
    eps: added to the variance before the square root (default 1e-5).
    channelwise_affine: learn ``weight`` (gamma) and ``bias`` (beta).
    momentum: weight of the old running value (default 0.99), or ``None`` for
      the exact cumulative average.
    inference: normalize with the running statistics (toggled by
      ``eqx.nn.inference_mode``; the call's ``inference`` overrides it).
    dtype: dtype of ``weight`` and ``bias`` (default float32, float64 with
      x64).
    mode: ``"batch"``, ``"ema"`` or ``"legacy"`` (see above).
    options: a :class:`jaxbn.BNOptions`.

  Examples:
    >>> import equinox as eqx, jax, jax.numpy as jnp
    >>> from jaxbn.equinox import BatchNorm
    >>> bn, state = eqx.nn.make_with_state(BatchNorm)(2, "batch", mode="batch")
    >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
    >>> y, state = jax.vmap(bn, in_axes=(0, None), out_axes=(0, None), axis_name="batch")(
    ...     x, state)
    >>> y.round(3)
    Array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> params, bn_state = bn.read(state)
    >>> [round(v, 4) for v in bn_state.mean.tolist()], int(bn_state.step)
    ([0.02, 0.2], 1)

    Without ``axis_name``, a plain call on a whole batch:

    >>> bn, state = eqx.nn.make_with_state(BatchNorm)(2, mode="batch")
    >>> y, state = bn(x, state)
    >>> y.round(3).tolist()
    [[-1.0, -1.0], [1.0, 1.0]]

  References:
    Ioffe & Szegedy 2015, arXiv:1502.03167, Algorithms 1 and 2.
  """

  weight: jax.Array | None
  bias: jax.Array | None
  ema_first_time_index: eqx.nn.StateIndex | None
  ema_state_index: eqx.nn.StateIndex | None
  batch_counter: eqx.nn.StateIndex | None
  batch_state_index: eqx.nn.StateIndex | None
  extra_state_index: eqx.nn.StateIndex | None
  inference: bool
  input_size: int = eqx.field(static=True)
  channelwise_affine: bool = eqx.field(static=True)
  dtype: Any = eqx.field(static=True)
  mode: str = eqx.field(static=True)
  options: BNOptions = eqx.field(static=True)

  def __init__(
    self,
    input_size: int,
    axis_name: Hashable | Sequence[Hashable] | None = FROM_OPTIONS,
    eps: float = FROM_OPTIONS,
    channelwise_affine: bool = True,
    momentum: float | None = FROM_OPTIONS,
    inference: bool = False,
    dtype: Any = None,
    mode: str = "legacy",
    *,
    options: BNOptions | None = None,
  ):
    fn = "jaxbn.equinox.BatchNorm"
    if mode == "legacy":
      mode = "ema"
      warnings.warn(
        "When `BatchNorm(..., mode=...)` is unspecified it defaults to 'ema', as "
        "equinox.nn.BatchNorm does; for new code mode='batch' is recommended.",
        UserWarning,
        stacklevel=2,
      )
    if mode not in MODES:
      raise ValueError(
        f"{fn}: mode must be 'batch' or 'ema' (or 'legacy', equinox's default, which is "
        f"'ema'), got {mode!r}."
      )
    keywords = {"eps": eps, "momentum": momentum, "axis_name": axis_name}
    opts = merge_options(fn, options, {EQUINOX_NAMES[k]: v for k, v in keywords.items()})
    if opts.axis != DEFAULTS.axis:
      raise ValueError(
        f"{fn}: options.axis={opts.axis!r}: the layer normalizes the channel axis, equinox's "
        f"(the first axis of an example, the second of a batch); leave options.axis at its "
        f"default."
      )
    if isinstance(opts.axis_name, list):
      opts = opts._replace(axis_name=tuple(opts.axis_name))
    if mode == "ema":
      needs_batch = {
        "ghost_batch_size": opts.ghost_batch_size is not None,
        "renorm": opts.renorm is not None,
        "accumulate_steps": opts.accumulate_steps != 1,
      }
      bad = [k for k, v in needs_batch.items() if v]
      if bad:
        raise ValueError(
          f"{fn}: mode='ema' normalizes with the running statistics, so options.{bad[0]} "
          f"has no meaning there; use mode='batch'."
        )
    if dtype is None:
      dtype = jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32
    layer = BNLayer((input_size,), opts, dtype, channelwise_affine, channelwise_affine)
    try:
      params, state = layer.init()  # bn_init checks input_size and dtype
    except (TypeError, ValueError) as e:
      raise type(e)(f"{fn}: {e}") from None
    self.weight = params.scale if channelwise_affine else None
    self.bias = params.bias if channelwise_affine else None
    stored = layer.entries(None, state)
    pair = (stored.pop("mean"), stored.pop("var"))
    if mode == "batch":
      self.batch_state_index = eqx.nn.StateIndex(pair)
      self.batch_counter = eqx.nn.StateIndex(state.step)
      self.ema_first_time_index = self.ema_state_index = None
    else:
      self.ema_first_time_index = eqx.nn.StateIndex(jnp.array(True))
      self.ema_state_index = eqx.nn.StateIndex(pair)
      self.batch_counter = self.batch_state_index = None
    stored.pop("step", None)
    self.extra_state_index = eqx.nn.StateIndex(stored) if stored else None
    self.inference = inference
    self.input_size = input_size
    self.channelwise_affine = channelwise_affine
    self.dtype = dtype
    self.mode = mode
    self.options = opts

  @property
  def axis_name(self) -> Any:
    """The vmapped axis name(s) the batch is over (``None``: a call takes the batch)."""
    return self.options.axis_name

  @property
  def eps(self) -> float:
    """Added to the variance before the square root (``options.epsilon``)."""
    return self.options.epsilon

  @property
  def momentum(self) -> float | None:
    """Weight of the old running value (``options.momentum``)."""
    return self.options.momentum

  # ------------------------------------------------------------------
  # The layer's variables as the core's (params, state)

  def layer(self) -> BNLayer:
    """The :class:`jaxbn.layer.BNLayer` this module describes."""
    use = self.channelwise_affine
    return BNLayer((self.input_size,), self.options, self.dtype, use, use)

  def read(self, state: Any) -> tuple[BNParams, BNState | BNAccState]:
    """``(params, state)`` of the core for this layer, from an ``eqx.nn.State``.

    Entries the layer does not store are filled as :func:`jaxbn.bn_init`
    would (``step`` 0 in ``"ema"`` mode).
    """
    mean, var = state.get(self.batch_state_index or self.ema_state_index)
    stats = {"mean": mean, "var": var}
    if self.batch_counter is not None:
      stats["step"] = state.get(self.batch_counter)
    if self.extra_state_index is not None:
      stats.update(state.get(self.extra_state_index))
    return self.layer().from_entries(
      self.params()._asdict(), stats, fn="jaxbn.equinox.BatchNorm.read"
    )

  def params(self) -> BNParams:
    """The core's :class:`jaxbn.BNParams` of this layer (1 and 0 without ``channelwise_affine``)."""
    if self.weight is None:
      shape = (self.input_size,)
      return BNParams(jnp.ones(shape, self.dtype), jnp.zeros(shape, self.dtype))
    return BNParams(self.weight, cast(jax.Array, self.bias))  # bias is set with weight

  def write(self, state: Any, bn_state: BNState | BNAccState) -> Any:
    """An ``eqx.nn.State`` holding ``bn_state`` for this layer (the rest unchanged)."""
    stored = self.layer().entries(None, bn_state)
    pair = (stored.pop("mean"), stored.pop("var"))
    step = stored.pop("step", bn_state.step)
    if self.batch_counter is not None:
      state = state.set(self.batch_state_index, pair)
      state = state.set(self.batch_counter, step.astype(state.get(self.batch_counter).dtype))
    else:
      state = state.set(self.ema_state_index, pair)
    if self.extra_state_index is not None:
      state = state.set(self.extra_state_index, stored)
    return state

  def running(self, state: Any) -> tuple[BNParams, BNState | BNAccState]:
    """``(params, state)`` with the statistics inference normalizes with.

    In ``"batch"`` mode with a plain moving average (``momentum`` a number,
    no ``ema_warmup``), equinox's zero-debiasing: the stored statistics
    divided by ``1 - momentum**t`` after ``t > 0`` updates.
    """
    params, s = self.read(state)
    o = self.options
    if self.mode == "batch" and o.momentum is not None and not o.ema_warmup:
      t = s.step // o.accumulate_steps
      dt = s.mean.dtype
      factor = _debias_factor(o.momentum, t, dt)
      s = s._replace(mean=s.mean / factor, var=s.var / factor)
    return params, s

  # ------------------------------------------------------------------
  # The call

  def _options_for(self, x: Any) -> BNOptions:
    """The options with the feature axis of ``x``: the first of an example, or of a batch's.

    For a tuple of inputs, every one is checked.
    """
    for i, t in enumerate(x if isinstance(x, (tuple, list)) else (x,)):
      if self.options.axis_name is None and jnp.ndim(t) < 2:
        name = f"x[{i}]" if isinstance(x, (tuple, list)) else "x"
        raise ValueError(
          f"jaxbn.equinox.BatchNorm: without axis_name the call takes a whole batch of shape "
          f"(N, {self.input_size}, *spatial), got {name} of shape {jnp.shape(t)}; to call it "
          f"on one example at a time, give axis_name and vmap over the batch with that "
          f"axis_name."
        )
    return self.options._replace(axis=0 if self.options.axis_name is not None else 1)

  @overload
  def __call__(
    self,
    x: jax.Array,
    state: Any,
    *,
    key: Any = None,
    inference: bool | None = None,
    mask: jax.Array | None = None,
  ) -> tuple[jax.Array, Any]: ...
  @overload
  def __call__(
    self,
    x: Inputs,
    state: Any,
    *,
    key: Any = None,
    inference: bool | None = None,
    mask: Sequence[jax.Array | None] | None = None,
  ) -> tuple[tuple[jax.Array, ...], Any]: ...
  def __call__(
    self,
    x: jax.Array | Inputs,
    state: Any,
    *,
    key: Any = None,
    inference: bool | None = None,
    mask: jax.Array | Sequence[jax.Array | None] | None = None,
  ) -> tuple[jax.Array | tuple[jax.Array, ...], Any]:
    """Normalizes ``x``; in training, returns the state with the new running statistics.

    Args:
      x: one example ``(input_size, *spatial)`` under a vmap with
        ``axis_name``, or a whole batch ``(N, input_size, *spatial)`` when
        ``axis_name`` is None. Or a tuple of such inputs that share one set
        of statistics (:func:`jaxbn.bn_train`'s joint statistics; batches
        of different sizes without ``axis_name``): in training (either
        mode), the statistics of all of them together and one update; in
        inference, each input normalized as alone.
      state: the ``eqx.nn.State`` holding the running statistics.
      key: ignored (equinox's layer signature).
      inference: overrides the ``inference`` attribute.
      mask: boolean, aligned with ``x`` (see :func:`jaxbn.bn_train`): only
        True positions count toward the statistics; ignored in inference.
        For a tuple ``x``, a tuple of one mask (or None) per input.

    Returns:
      ``(y, state)``: ``y`` with ``x``'s shape and dtype (for a tuple ``x``,
      a tuple of them).

    Raises:
      NameError: ``axis_name`` is not bound by an enclosing vmap (equinox's error).
    """
    del key
    if inference is None:
      inference = self.inference
    opts = self._options_for(x)
    layer = self.layer().replace(options=opts)
    if inference:
      params, s = self.running(state)
      return layer.normalize(params, s, x, use_running_average=True)[0], state
    params, s = self.read(state)
    if self.mode == "batch":
      y, new = layer.normalize(params, s, x, use_running_average=False, mask=mask)
      return y, self.write(state, cast("BNState | BNAccState", new))  # training: a new state
    first = state.get(self.ema_first_time_index)
    momentum = opts.momentum
    if momentum is not None:  # the first batch fills the running statistics (equinox)
      momentum = jnp.where(first, 0.0, jnp.asarray(momentum, s.mean.dtype))
    m = bn_moments(s, x, opts, mask=mask)
    new = bn_update(s, m, opts, momentum=momentum)
    y = bn_infer(params, new, x, opts)
    # Filled once every feature had a batch to fill it with (bn_update's own condition).
    filled = jnp.all((m.count > 1) & jnp.isfinite(m.mean) & jnp.isfinite(m.m2))
    state = state.set(self.ema_first_time_index, first & ~filled)
    return y, self.write(state, jax.lax.stop_gradient(new))


def _debias_factor(momentum: float, t: jax.Array, dtype: Any) -> jax.Array:
  """Equinox's zero-debiasing divisor ``1 - momentum**t``; 1 before any update (or momentum 1)."""
  factor = 1 - jnp.power(jnp.asarray(momentum, dtype), t.astype(dtype))
  return jnp.where((t == 0) | (factor <= 0), 1, factor)


def _batch_norms(model: Any, kind: type = BatchNorm) -> dict[str, Any]:
  """``{path: layer}`` of every ``kind`` layer in ``model``, in tree order."""
  leaves = jax.tree_util.tree_flatten_with_path(model, is_leaf=lambda n: isinstance(n, kind))[0]
  return {jax.tree_util.keystr(p): n for p, n in leaves if isinstance(n, kind)}


def _in_order(model: Any, *states: Any) -> Any:
  """One ``eqx.nn.State`` of ``model`` from ``states`` holding its entries, in its order.

  ``eqx.nn.make_with_state`` orders the entries as the model's state indices;
  checkpoints (``eqx.tree_serialise_leaves``) depend on that order. Equinox
  has no public call that joins states, so this goes through the state's
  pytree protocol.
  """
  values: dict = {}
  for state in states:
    v, k = state.tree_flatten()
    values.update(zip(k, v, strict=True))
  keys = tuple(dict.fromkeys(i.marker for i in _state_indices(model)))
  keys += tuple(k for k in values if k not in keys)  # entries of no index in model, last
  return eqx.nn.State.tree_unflatten(keys, tuple(values[k] for k in keys))


def _state_indices(tree: Any) -> list[Any]:
  is_index = lambda n: isinstance(n, eqx.nn.StateIndex)
  return [n for n in jax.tree.leaves(tree, is_leaf=is_index) if is_index(n)]


# --------------------------------------------------------------------------
# From equinox's own BatchNorm


def from_equinox(model: Any, state: Any, *, options: BNOptions | None = None) -> tuple[Any, Any]:
  """``model`` with every ``eqx.nn.BatchNorm`` replaced by :class:`BatchNorm`, and its state.

  Each layer keeps its configuration (``input_size``, ``axis_name``, ``eps``,
  ``channelwise_affine``, ``momentum``, ``inference``, ``mode``) and its
  values: ``weight``, ``bias``, the running mean and variance and, in
  ``"batch"`` mode, the update counter (so inference debiases as equinox's
  did); in ``"ema"`` mode, whether the layer has trained. Every other
  stateful layer keeps its state, and the state keeps the model's order (a
  checkpoint of it loads into ``eqx.nn.make_with_state`` of the new model).
  Inference outputs equal equinox's (to float32 rounding).

  With ``options`` whose layer keeps an average of its own (``ema_warmup``,
  ``momentum=None``), the carried statistics are the ones equinox's
  inference used (debiased), with the count
  :data:`jaxbn.layer.PORTED_COUNT` (their count is not known): inference is
  unchanged and training goes on from them rather than from the next batch.

  Args:
    model: an Equinox model (any pytree) holding ``eqx.nn.BatchNorm`` layers.
    state: its ``eqx.nn.State``.
    options: a :class:`jaxbn.BNOptions` for every new layer (jaxbn's extras);
      ``epsilon``, ``momentum`` and ``axis_name`` come from each equinox
      layer, and ``options`` must leave them at their defaults.

  Returns:
    ``(new_model, new_state)``.

  Raises:
    ValueError: no ``eqx.nn.BatchNorm`` in ``model``, or ``options`` sets
      ``epsilon``, ``momentum`` or ``axis_name``.

  Examples:
    >>> import equinox as eqx, jax, jax.numpy as jnp
    >>> import jaxbn.equinox
    >>> old, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", mode="batch")
    >>> x = jax.random.normal(jax.random.key(0), (8, 3)) * 2 + 1
    >>> vmapped = lambda m: jax.vmap(m, (0, None), (0, None), axis_name="batch")
    >>> _, state = vmapped(old)(x, state)
    >>> new, new_state = jaxbn.equinox.from_equinox(old, state)
    >>> infer = lambda m, s: vmapped(eqx.nn.inference_mode(m))(x, s)[0]
    >>> bool(jnp.allclose(infer(new, new_state), infer(old, state), atol=1e-6))
    True
  """
  fn = "from_equinox"
  olds = _batch_norms(model, eqx.nn.BatchNorm)
  if not olds:
    raise ValueError(f"{fn}: the model holds no equinox.nn.BatchNorm.")
  if options is not None:
    set_ = [k for k in EQUINOX_NAMES.values() if getattr(options, k) != getattr(DEFAULTS, k)]
    if set_:
      raise ValueError(
        f"{fn}: options sets {set_}, which each equinox layer already has (eps, momentum, "
        f"axis_name); leave them at their defaults in options."
      )
  news = []
  for old in olds.values():
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)  # no 'legacy' warning: the mode is known
      new = BatchNorm(
        old.input_size,
        old.axis_name,
        old.eps,
        old.channelwise_affine,
        old.momentum,
        old.inference,
        None if old.weight is None else old.weight.dtype,
        old.mode,
        options=options,
      )
    if old.weight is not None:
      new = eqx.tree_at(lambda b: (b.weight, b.bias), new, (old.weight, old.bias))
    news.append(new)
  new_model = eqx.tree_at(lambda m: list(_batch_norms(m, eqx.nn.BatchNorm).values()), model, news)
  replaced = {i.marker for i in _state_indices(olds)} | {i.marker for i in _state_indices(news)}
  kept = [i for i in _state_indices(new_model) if i.marker not in replaced]
  new_state = _in_order(new_model, state.substate(kept), eqx.nn.State(news))
  for old, new in zip(olds.values(), news, strict=True):
    new_state = new.write(new_state, _carried(old, new, state, new.read(new_state)[1]))
    if old.mode == "ema":
      new_state = new_state.set(new.ema_first_time_index, state.get(old.ema_first_time_index))
  return eqx.nn.delete_init_state(new_model), new_state


def _carried(old: Any, new: BatchNorm, state: Any, fresh: StateT) -> StateT:
  """The core's state of ``new`` holding what the equinox layer ``old`` has learned."""
  sdt = fresh.mean.dtype
  if old.mode == "batch":
    mean, var = state.get(old.batch_state_index)
    t = state.get(old.batch_counter).astype(jnp.int32)
    trained = t > 0
  else:
    mean, var = state.get(old.ema_state_index)
    t = jnp.zeros((), jnp.int32)
    trained = ~state.get(old.ema_first_time_index)
  mean, var = mean.astype(sdt), var.astype(sdt)
  o = new.options
  keeps_average = o.momentum is None or o.ema_warmup
  if old.mode == "batch" and keeps_average:  # store what equinox's inference used
    factor = _debias_factor(old.momentum, t, sdt)
    mean, var, t = mean / factor, var / factor, jnp.zeros_like(t)
  count = jnp.where(trained, jnp.asarray(PORTED_COUNT, sdt), fresh.count)
  return fresh._replace(mean=mean, var=var, count=count, step=t)


# --------------------------------------------------------------------------
# Population statistics


class _PopulationPass(eqx.nn.StatefulLayer):
  """A :class:`BatchNorm` in training mode with option overrides, its state a whole BNState."""

  bn: BatchNorm
  index: eqx.nn.StateIndex
  overrides: tuple = eqx.field(static=True)

  def __call__(
    self,
    x: jax.Array,
    state: Any,
    *,
    key: Any = None,
    inference: bool | None = None,
    mask: jax.Array | None = None,
  ) -> tuple[jax.Array, Any]:
    del key, inference
    params = self.bn.params()
    opts = self.bn._options_for(x)._replace(**dict(self.overrides))
    y, new = bn_train(params, state.get(self.index), x, opts, mask=mask)
    return y, state.set(self.index, new)


def equinox_population_stats(
  model: Any,
  state: Any,
  batches: Iterable[Any],
  *,
  forward: Callable[[Any, Any, Any], tuple[Any, Any]] | None = None,
  estimator: str = "exact",
  progress: bool = False,
  total: int | None = None,
) -> Any:
  """:func:`jaxbn.population_stats` for an Equinox model using :class:`BatchNorm`.

  Each batch runs ``forward(model, state, x)`` with every :class:`BatchNorm`
  in training mode (whatever its ``inference`` and its mode) and with the
  overrides of :func:`jaxbn.population_stats` (``momentum=None``,
  ``renorm=None``, one update per batch); the statistics of all batches are
  merged exactly and written into the returned state. In ``"batch"`` mode
  with a plain moving average the update counter is set to a number of
  updates after which equinox's debiasing divides by 1 in float32
  (1794 at momentum 0.99), so that inference uses them as they are, and
  goes on so after further training steps.

  Args:
    model: an Equinox model holding :class:`BatchNorm` layers.
    state: its ``eqx.nn.State``.
    batches: an iterable of inputs ``x`` (for ``(x, y)`` pairs, pass
      ``(x for x, _ in it)``).
    forward: ``forward(model, state, x) -> (output, state)``, the model's
      training call on a batch; default ``model(x, state)`` (layers with
      ``axis_name=None``). For per-example layers, e.g.
      ``lambda m, s, x: eqx.filter_vmap(m, in_axes=(0, None), out_axes=(0, None),
      axis_name="batch")(x, s)``.
    estimator: ``"exact"`` or ``"paper"`` (see :func:`jaxbn.population_stats`).
    progress: show a progress bar.
    total: number of batches, for the progress bar.

  Returns:
    The new ``eqx.nn.State``.

  Examples:
    >>> import equinox as eqx, jax, jax.numpy as jnp
    >>> import jaxbn.equinox
    >>> bn, state = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(2, mode="batch")
    >>> x = jax.random.normal(jax.random.key(0), (64, 2)) + 5.0
    >>> state = jaxbn.equinox.equinox_population_stats(bn, state, [x[:32], x[32:]])
    >>> _, s = bn.running(state)
    >>> bool(jnp.allclose(s.mean, x.mean(0), atol=1e-5)), bool(jnp.allclose(s.var, x.var(0)))
    (True, True)
  """
  fn = "equinox_population_stats"
  layers = _batch_norms(model)
  run, arrays, states = _population_forward(fn, model, state, forward)
  got = population_stats(
    run, arrays, states, batches, estimator=estimator, progress=progress, total=total
  )
  for k, bn in layers.items():
    _, old = bn.read(state)
    new = old._replace(mean=got[k].mean, var=got[k].var, count=got[k].count)
    o = bn.options
    if bn.mode == "batch" and o.momentum is not None and not o.ema_warmup:
      step = _settled_updates(o.momentum) * o.accumulate_steps
      new = new._replace(step=jnp.full_like(old.step, step))
    state = bn.write(state, new)
  return state


def _population_forward(
  fn: str, model: Any, state: Any, forward: Callable[[Any, Any, Any], tuple[Any, Any]] | None
) -> tuple[Callable[..., Any], Any, dict[str, BNState]]:
  """An equinox model's forward in :func:`jaxbn.population_stats`' contract, its arrays, states.

  ``run(arrays, states, x, **bn_kwargs)`` calls ``forward(model, state, x)``
  (default ``model(x, state)``) with each :class:`BatchNorm` replaced by a
  training-mode pass over ``states[path]`` with ``bn_kwargs`` as overrides.
  :func:`equinox_population_stats` and :func:`jaxbn.diagnose` run it.
  """
  layers = _batch_norms(model)
  if not layers:
    raise ValueError(f"{fn}: the model holds no jaxbn.equinox.BatchNorm.")
  if forward is None:
    per_example = sorted(k for k, bn in layers.items() if bn.axis_name is not None)
    if per_example:
      raise ValueError(
        f"{fn}: the layers {per_example} take one example at a time (axis_name="
        f"{layers[per_example[0]].axis_name!r}); pass the model's batched training call, e.g. "
        f"forward=lambda m, s, x: eqx.filter_vmap(m, in_axes=(0, None), out_axes=(0, None), "
        f"axis_name={layers[per_example[0]].axis_name!r})(x, s)."
      )
    forward = lambda m, s, x: m(x, s)
  # The running statistics alone: population_stats updates each once per batch.
  states = {k: BNState(*bn.read(state)[1][:4]) for k, bn in layers.items()}
  arrays, static = eqx.partition(model, eqx.is_array)

  def run(arrays, bn_states, x, **bn_kwargs):
    m = eqx.combine(arrays, static)
    overrides = tuple(sorted({**bn_kwargs, "accumulate_steps": 1}.items()))
    passes = {
      # pyright counts StatefulLayer's `__call__: AbstractClassVar[...]` as a dataclass field.
      k: _PopulationPass(bn, eqx.nn.StateIndex(bn_states[k]), overrides)  # pyright: ignore[reportCallIssue]
      for k, bn in _batch_norms(m).items()
    }
    m = eqx.tree_at(lambda t: list(_batch_norms(t).values()), m, list(passes.values()))
    s = _in_order(m, state, eqx.nn.State([p.index for p in passes.values()]))
    out, s = forward(m, s, x)
    return out, {k: s.get(p.index) for k, p in passes.items()}

  return run, arrays, states


def _settled_updates(momentum: float) -> int:
  """Updates ``t`` after which ``1 - momentum**t`` is 1 in float32 (``momentum**t < 2**-26``).

  Equinox's debiasing then leaves the statistics as they are, now and after
  further updates (a settled moving average).
  """
  m = float(momentum)
  if m <= 0 or m >= 1:
    return 1  # nothing to debias: 0**t is 0; momentum 1 never updates
  return math.ceil(26 * math.log(2) / -math.log(m))


# --------------------------------------------------------------------------
# Folding


def _fold_pair(linear: Any, bn: BatchNorm, state: Any) -> Any:
  """``linear`` (``eqx.nn.Linear`` or ``Conv``) with ``bn``'s inference map folded in."""
  params, s = bn.running(state)
  w = linear.weight  # (out, in) or (out, in / groups, *kernel)
  kernel = jnp.moveaxis(w, 0, -1)
  bias = None if linear.bias is None else linear.bias.reshape(-1)
  k, b = fold_bn(kernel, bias, params, s, epsilon=bn.eps)
  weight = jnp.moveaxis(k, -1, 0)
  if linear.bias is not None:
    return eqx.tree_at(lambda m: (m.weight, m.bias), linear, (weight, b.reshape(linear.bias.shape)))
  # A layer without a bias gets one: use_bias is a static field, set on a copy.
  shape = (w.shape[0],) + (1,) * (w.ndim - 2) if isinstance(linear, eqx.nn.Conv) else (w.shape[0],)
  folded = copy.copy(linear)
  object.__setattr__(folded, "use_bias", True)
  object.__setattr__(folded, "bias", b.reshape(shape))
  return eqx.tree_at(lambda m: m.weight, folded, weight)


def fold_equinox(model: Any, state: Any) -> Any:
  """``model`` with each :class:`BatchNorm` folded into the ``Linear``/``Conv`` before it.

  Every :class:`BatchNorm` must directly follow an ``eqx.nn.Linear`` or
  ``eqx.nn.Conv`` (any dimension) in an ``eqx.nn.Sequential``; the linear
  layer's weight and bias become :func:`jaxbn.fold_bn`'s (with the
  statistics inference uses, :meth:`BatchNorm.running`) and the batch norm
  becomes ``eqx.nn.Identity``. The folded model computes the inference-mode
  model with one op less per batch norm.

  Args:
    model: an Equinox model.
    state: its ``eqx.nn.State`` (the running or population statistics).

  Returns:
    The folded model (call it as before; its batch norms no longer read the state).

  Raises:
    ValueError: a batch norm that does not directly follow a Linear or Conv
      in a Sequential (named by its path), or a model without batch norm.

  Examples:
    >>> import equinox as eqx, jax, jax.numpy as jnp
    >>> import jaxbn.equinox
    >>> def make(key):
    ...   return eqx.nn.Sequential([eqx.nn.Linear(3, 4, key=key),
    ...                             jaxbn.equinox.BatchNorm(4, "batch", mode="batch")])
    >>> model, state = eqx.nn.make_with_state(make)(jax.random.key(0))
    >>> x = jax.random.normal(jax.random.key(1), (16, 3))
    >>> batched = lambda m: jax.vmap(m, (0, None), (0, None), axis_name="batch")
    >>> _, state = batched(model)(x, state)  # one training step: running statistics move
    >>> folded = jaxbn.equinox.fold_equinox(model, state)
    >>> want, _ = batched(eqx.nn.inference_mode(model))(x, state)
    >>> bool(jnp.allclose(jax.vmap(folded)(x), want, atol=1e-5))
    True
  """
  fn = "fold_equinox"
  if not _batch_norms(model):
    raise ValueError(f"{fn}: the model holds no jaxbn.equinox.BatchNorm; nothing to fold.")
  linear_types = (eqx.nn.Linear, eqx.nn.Conv)
  is_seq = lambda n: isinstance(n, eqx.nn.Sequential)

  def fold(node: Any) -> Any:
    if not is_seq(node):
      return node
    layers = [jax.tree.map(fold, layer, is_leaf=is_seq) for layer in node.layers]
    for i, layer in enumerate(layers):
      if isinstance(layer, BatchNorm) and i > 0 and isinstance(layers[i - 1], linear_types):
        layers[i - 1] = _fold_pair(layers[i - 1], layer, state)
        layers[i] = eqx.nn.Identity()
    return eqx.tree_at(lambda s: s.layers, node, tuple(layers))

  folded = jax.tree.map(fold, model, is_leaf=is_seq)
  left = _batch_norms(folded)
  if left:
    raise ValueError(
      f"{fn}: cannot fold the batch norms at {sorted(left)}: each must directly follow an "
      f"eqx.nn.Linear or eqx.nn.Conv in an eqx.nn.Sequential."
    )
  return folded
