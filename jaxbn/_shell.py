"""The one mapping from a batch-norm module's options to the core.

``jaxbn.linen.BatchNorm`` and ``jaxbn.nnx.BatchNorm`` differ only in how
they store variables; both describe their configuration with
:class:`Options` and call :func:`normalize`, which calls
:func:`jaxbn.bn_train` or :func:`jaxbn.bn_infer`. Which optional state
entries a configuration stores (``count``, ``step``) is decided here too.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn.core import BNAccState
from jaxbn.core import BNOptions
from jaxbn.core import BNParams
from jaxbn.core import BNState
from jaxbn.core import SingleValueWarning
from jaxbn.core import StateMismatchError
from jaxbn.core import bn_infer
from jaxbn.core import bn_train
from jaxbn.core import empty_accumulator
from jaxbn.core import stats_dtype

Options = BNOptions  # every option of the modules that reaches the core


def options_of(module: Any) -> Options:
  """The :class:`Options` of a jaxbn module (read from its attributes of the same names)."""
  return Options(**{k: getattr(module, k) for k in Options._fields})


def needs_count(options: Options) -> bool:
  """Whether the state stores the per-feature ``count`` (cumulative or warm-up EMA)."""
  return options.momentum is None or bool(options.ema_warmup)


def needs_step(options: Options) -> bool:
  """Whether the state stores the update ``step`` (renorm limits that follow a schedule)."""
  r = options.renorm
  schedule = r is not None and (callable(r.rmax) or callable(r.dmax))
  return schedule or needs_accumulator(options)


def needs_accumulator(options: Options) -> bool:
  """Whether the state stores the micro-batches' moments (``accumulate_steps > 1``).

  The position in the cycle of micro-batches is then ``step % accumulate_steps``,
  so such a state stores ``step`` too.
  """
  return options.accumulate_steps != 1


def initial_state(
  shape: tuple[int, ...], param_dtype: Any, accumulate_steps: int = 1
) -> BNState | BNAccState:
  """``mean = 0``, ``var = 1``, ``count = 0``, ``step = 0`` in the statistics dtype.

  With ``accumulate_steps > 1`` a :class:`BNAccState` with an empty accumulator.
  """
  sdt = stats_dtype(param_dtype)
  state = BNState(
    mean=jnp.zeros(shape, sdt),
    var=jnp.ones(shape, sdt),
    count=jnp.zeros(shape, sdt),
    step=jnp.zeros((), jnp.int32),
  )
  return state if accumulate_steps == 1 else BNAccState(*state, acc=empty_accumulator(shape, sdt))


def feature_shape(x: Any, axis: int | Sequence[int]) -> tuple[int, ...]:
  """Sizes of ``x`` along the (sorted) feature axes, as the core orders them.

  An invalid ``x`` or ``axis`` gives a placeholder shape: the core then raises
  its own clear error when it is called on ``x``.
  """
  shape = tuple(getattr(x, "shape", ()))
  n = len(shape)
  axes = (axis,) if isinstance(axis, (int, np.integer)) else axis
  if not isinstance(axes, (tuple, list)):
    return (1,)
  if not n or not axes or not all(isinstance(a, (int, np.integer)) and -n <= a < n for a in axes):
    return (1,)
  return tuple(shape[a] for a in sorted({int(a) % n for a in axes}))


def normalize(
  params: BNParams,
  state: BNState,
  x: jax.Array,
  options: Options,
  *,
  use_running_average: bool,
  mask: jax.Array | None = None,
  initializing: bool = False,
  where: str | None = None,
) -> tuple[jax.Array, BNState | None]:
  """``(y, new_state)`` in training, ``(y, None)`` with the running statistics.

  ``where`` names the layer (its path in the model) in the error raised for
  params and state of different shapes.

  While a module initializes, the named-axis collective is skipped (the axis
  need not exist yet) and no one-value-per-feature warning is raised (flax
  idioms initialize on a single example); the state is not updated then.
  """
  try:
    if use_running_average:
      return bn_infer(params, state, x, epsilon=options.epsilon, axis=options.axis), None
    return _train(params, state, x, options, mask, initializing)
  except StateMismatchError as e:
    if where is None:
      raise
    raise StateMismatchError(f"{where}: {e}") from None


def _train(params, state, x, options, mask, initializing):
  """``bn_train``; while initializing, local and silent, and no new state."""
  kwargs = options._asdict()
  if not initializing:
    return bn_train(params, state, x, mask=mask, **kwargs)
  kwargs.update(axis_name=None, axis_index_groups=None)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", SingleValueWarning)
    y, _ = bn_train(params, state, x, mask=mask, **kwargs)
  return y, None
