"""Population statistics: the mean and variance over a whole training set.

The paper gives two ways to get the statistics used at inference: a running
average kept during training, or statistics computed over the training set
after training (Ioffe & Szegedy 2015, Sec. 3.1 and Algorithm 2). This module
computes the second, for every batch-norm layer of a model at once, in one
pass over the data and constant memory.

Two estimators, per feature:

* ``"exact"``: the mean and variance of every value that reached the layer,
  from an exact count-weighted merge of per-batch ``(count, mean, m2)``
  (Chan's formula, :func:`jaxbn.numerics.merge`; "precise BN", Wu & Johnson
  2021). The variance stored is the biased ``m2 / n``, the convention of
  :class:`jaxbn.BNState` (and of ``bn_train(momentum=None)``, flax and
  haiku): the state then holds the training set's own variance, and the
  ``n / (n - 1)`` correction, below 1e-3 relative for the thousands of values a
  data set gives, would only change the convention.
* ``"paper"``: Algorithm 2, ``E_B[mu_B]`` and ``m / (m - 1) * E_B[var_B]``
  averaged with equal weight over the mini-batches (each batch corrected by
  its own count, see :class:`jaxbn.numerics.BatchAverage`).

References:
  Ioffe & Szegedy, ICML 2015, arXiv:1502.03167, Algorithm 2.
  Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021, arXiv:2105.07576.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jaxbn import numerics
from jaxbn.core import BNState
from jaxbn.core import SingleValueWarning

__all__ = ("ESTIMATORS", "axis_bound", "population_stats")

ESTIMATORS = ("exact", "paper")
"""The estimators of ``population_stats``: the data set's own moments, or Algorithm 2's."""

# What population_stats passes to the forward function, which must hand it
# to every bn_train call: the exact cumulative update, and batch
# renormalization off (its output depends on the running statistics).
_OVERRIDES = {"momentum": None, "renorm": None}


def axis_bound(axis_name: Any) -> bool:
  """Whether every name in ``axis_name`` is bound here (inside vmap, shard_map, pmap).

  The module adapters drop an unbound ``axis_name``: population statistics
  run the model on whole batches, outside the mesh it was trained on, and the
  statistics over all batches need no cross-device sum.
  """
  names = axis_name if isinstance(axis_name, (tuple, list)) else (axis_name,)
  try:
    for name in names:
      jax.lax.axis_size(name)
  except NameError:
    return False
  return True


def _single_value_message(fn: str, x: Any, caught: list[warnings.WarningMessage]) -> str:
  shapes = [jnp.shape(a) for a in jax.tree.leaves(x)]
  size = shapes[0][0] if shapes and shapes[0] else 1
  return (
    f"{fn}: a batch of {size} example(s) (input shape {shapes[0] if shapes else ()}) gives a "
    f"batch-norm layer 1 value per feature in the training-mode forward: its output is "
    f"`bias`, so the layers after it would see other activations than in training, and "
    f"the statistics would not be the model's. Pass batches of the size the model was "
    f"trained with (at least 2 values per feature in every layer), e.g. group the examples "
    f"into batches first. ({str(caught[0].message).split(': the batch variance')[0]}.)"
  )


def _shapes_and_dtypes(tree: Any) -> tuple:
  return tuple((jnp.shape(a), str(jnp.result_type(a))) for a in jax.tree.leaves(tree))


def _is_state(t: Any) -> bool:
  return isinstance(t, BNState)


def _flatten_states(fn: str, states: Any) -> tuple[list[BNState], Any]:
  leaves, treedef = jax.tree.flatten(states, is_leaf=_is_state)
  bad = [type(t).__name__ for t in leaves if not _is_state(t)]
  if bad or not leaves:
    raise TypeError(
      f"{fn}: states must be a pytree whose leaves are jaxbn.BNState (one per "
      f"batch-norm layer), got {'no leaves' if not leaves else f'leaves of type {bad}'}."
    )
  return leaves, treedef


def _probe(state: BNState, var: float) -> BNState:
  """A state that has seen nothing, with a recognisable variance."""
  return state._replace(
    mean=jnp.zeros_like(state.mean),
    var=jnp.full(state.var.shape, var, state.var.dtype),
    count=jnp.zeros_like(state.count),
  )


def _as_moments(state: BNState) -> numerics.Moments:
  # After one momentum=None update from count 0, the state holds the batch's
  # own count, mean and biased variance.
  return numerics.Moments(state.count, state.mean, state.var * state.count)


def _check_forward(fn: str, probes, new_a, new_b) -> None:
  """Fails loudly unless each state was updated once, with momentum=None.

  ``new_a`` and ``new_b`` come from the same batch and probes that differ
  only in their variance, which a ``momentum=None`` update from count 0
  ignores.
  """
  for i, (a, b, p) in enumerate(zip(new_a, new_b, probes, strict=True)):
    if int(a.step) != int(p.step) + 1:
      raise ValueError(
        f"{fn}: the forward function updated batch-norm state #{i} "
        f"{int(a.step) - int(p.step)} times for one batch (expected once). "
        f"population_stats needs the training-mode forward, calling bn_train once "
        f"per state; an inference forward (bn_infer) uses the running averages."
      )
    same = all(
      bool(jnp.array_equal(u, v)) for u, v in zip(_as_moments(a), _as_moments(b), strict=True)
    )
    if not same:
      raise ValueError(
        f"{fn}: the statistics of batch-norm state #{i} depend on the running "
        f"statistics it was given: the forward function did not pass "
        f"{sorted(_OVERRIDES)} on to every bn_train call (a function jitted with a "
        f"fixed momentum keeps its exponential moving average). Define it as "
        f"forward(params, states, x, **bn_kwargs) and call "
        f"bn_train(..., **bn_kwargs)."
      )


@functools.lru_cache(maxsize=32)
def _compiled(forward: Callable[..., Any], treedef: Any):
  """The jitted per-batch functions, cached so repeated calls do not recompile.

  Also returns the set of input signatures whose compiled forward has passed
  :func:`_check_forward`: a compiled program does the same for any values of
  a given shape, so the check runs once per signature, not on every call.
  """
  fn = "population_stats"

  @jax.jit
  def batch_states(params, probes, x):
    _, new = forward(params, jax.tree.unflatten(treedef, probes), x, **_OVERRIDES)
    new_leaves, new_def = jax.tree.flatten(new, is_leaf=_is_state)
    if new_def != treedef:
      raise ValueError(
        f"{fn}: the forward function returned states with structure {new_def}, "
        f"expected the structure of the states given, {treedef}."
      )
    return new_leaves

  @jax.jit
  def accumulate(acc, new_leaves):
    exact, average = acc
    moms = [_as_moments(s) for s in new_leaves]
    exact = [numerics.merge(a, m) for a, m in zip(exact, moms, strict=True)]
    average = [numerics.batch_average_add(a, m) for a, m in zip(average, moms, strict=True)]
    return exact, average

  return batch_states, accumulate, set(), {}


def population_stats(
  forward: Callable[..., tuple[Any, Any]],
  params: Any,
  states: Any,
  batches: Iterable[Any],
  *,
  estimator: str = "exact",
  progress: bool = False,
  total: int | None = None,
) -> Any:
  r"""Statistics over a whole data set for every batch-norm layer of a model.

  Runs the training-mode forward pass over ``batches`` and returns, for each
  :class:`jaxbn.BNState` in ``states``, the statistics of every value that
  reached that layer::

      "exact":  mean = (1/N) sum x,          var = (1/N) sum (x - mean)^2
      "paper":  mean = E_B[mu_B],            var = E_B[m/(m-1) var_B]

  (``N`` all values over all batches, and positions for a convolution;
  ``B`` the mini-batches, Algorithm 2). The exact estimator merges per-batch
  ``(count, mean, m2)`` with Chan's formula, so batches of any sizes give the
  statistics of their concatenation; both keep a constant-size accumulator.

  The mechanism, and why. ``forward(params, states, x, **bn_kwargs)`` must be
  the *training* forward (the one that returns ``(output, new_states)``) and
  pass ``**bn_kwargs`` on to every :func:`jaxbn.bn_train` call. For each
  batch, ``population_stats`` calls it with states that have seen nothing
  (``count = 0``) and ``momentum=None, renorm=None``: each returned state then
  holds exactly that batch's statistics, which are merged here. The options
  travel as explicit arguments, not as a global switch, because ``jax.jit``
  caches a trace: a function jitted before the switch was flipped would keep
  its exponential moving average without a word. On the first batch the
  forward runs twice, from states with different variances (once per forward
  and shapes: a later call with the same forward, parameter shapes and input
  shapes reuses the verdict); if the
  statistics it returns depend on them (the options were ignored, e.g. a
  closure with a fixed ``momentum``), or a state was not updated exactly once
  (e.g. an inference forward calling :func:`jaxbn.bn_infer`), a
  ``ValueError`` says so instead of returning running averages.

  With a device mesh, the batch may be split by ``shard_map`` inside
  ``forward`` (with ``axis_name`` on its bn_train calls, whose statistics are
  then those of the global batch), or by sharding the arrays under ``jit``.

  Args:
    forward: ``forward(params, states, x, **bn_kwargs) -> (output,
      new_states)``, the training forward pass; it may be jitted already.
    params: passed through to ``forward``.
    states: a pytree of :class:`jaxbn.BNState`, one per layer (only the
      structure, shapes and ``step`` are used; ``step`` is kept).
    batches: an iterable of inputs ``x`` (arrays or pytrees; for a data
      iterator that yields ``(x, y)``, pass ``(x for x, _ in it)``).
    estimator: ``"exact"`` or ``"paper"``.
    progress: show a tqdm progress bar (off by default: a library call prints nothing).
    total: number of batches, for the progress bar when ``batches`` has no
      ``len``.

  Returns:
    ``states``' pytree with each state's ``mean`` and ``var`` replaced by the
    population statistics and ``count`` by the number of values they cover.
    A feature that received no value keeps its incoming mean and variance.

  Raises:
    ValueError: unknown ``estimator``, no batch, a ``forward`` that does
      not follow the contract above, a batch so small that some layer gets
      one value per feature (its training-mode output would be ``bias``), or
      an ``axis_name`` that is not bound where the forward runs.
    TypeError: ``states`` has a leaf that is not a ``BNState``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxbn
    >>> params, state = jaxbn.bn_init(1)
    >>> def forward(params, state, x, **bn_kwargs):
    ...   return jaxbn.bn_train(params, state, x, **bn_kwargs)
    >>> batches = [jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [10.0]])]
    >>> s = jaxbn.population_stats(forward, params, state, batches, progress=False)
    >>> s.mean.tolist(), s.var.tolist(), s.count.tolist()  # of [0, 2, 4, 10]
    ([4.0], [14.0], [4.0])
    >>> s = jaxbn.population_stats(
    ...     forward, params, state, batches, estimator="paper", progress=False)
    >>> s.mean.tolist(), s.var.tolist()  # means 1, 7; unbiased variances 2, 18
    ([4.0], [10.0])

  References:
    Ioffe & Szegedy 2015, arXiv:1502.03167, Sec. 3.1 and Algorithm 2.
    Wu & Johnson 2021, arXiv:2105.07576 (precise batch norm).
  """
  fn = "population_stats"
  if estimator not in ESTIMATORS:
    raise ValueError(f"{fn}: estimator must be one of {ESTIMATORS}, got {estimator!r}.")
  leaves, treedef = _flatten_states(fn, states)

  try:
    batch_states, accumulate, checked, small = _compiled(forward, treedef)
  except TypeError:  # an unhashable callable: compile for this call only
    batch_states, accumulate, checked, small = _compiled.__wrapped__(forward, treedef)

  # Shapes and dtypes of what the compiled forward depends on besides x: with
  # x's, the key of its verdicts (one value per feature; the contract check).
  params_signature = _shapes_and_dtypes((params, leaves))

  def run(probes, x):
    """batch_states, refusing a batch that gives some layer one value per feature.

    bn_train warns about that while tracing, so the verdict is kept per input
    signature (the compiled program does not trace again).
    """
    key = (params_signature, _shapes_and_dtypes(x))
    if key in small:
      if small[key] is not None:
        raise ValueError(small[key])
      return batch_states(params, probes, x)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always", SingleValueWarning)
      try:
        new = batch_states(params, probes, x)
      except NameError as e:
        if "unbound axis name" not in str(e):
          raise
        raise ValueError(
          f"{fn}: the forward's bn_train calls carry an axis_name that is not bound here "
          f"({e}). Population statistics run on whole batches: call bn_train with "
          f"axis_name=None in this forward, or run population_stats inside the "
          f"shard_map/vmap that binds it."
        ) from None
    single = [w for w in caught if issubclass(w.category, SingleValueWarning)]
    for w in caught:  # anything else goes on to the caller
      if w not in single:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    small[key] = _single_value_message(fn, x, single) if single else None
    if single:
      raise ValueError(small[key])
    return new

  probes = [_probe(s, 1.0) for s in leaves]
  zero = [numerics.Moments(*(jnp.zeros_like(s.mean) for _ in range(3))) for s in leaves]
  acc = (zero, [numerics.batch_average_init(s.mean.shape) for s in leaves])
  seen = 0
  if progress:
    from jaxbn.extras import require

    tqdm = require("tqdm.auto", "jaxbn.population_stats(progress=True)").tqdm
    batches = tqdm(batches, total=total, desc=fn, leave=False)
  for x in batches:
    try:
      new = run(probes, x)
    except (AttributeError, TypeError) as e:
      if seen == 0 and isinstance(x, (tuple, list)) and len(x) == 2:
        kinds = ", ".join(type(t).__name__ for t in x)
        raise TypeError(
          f"{fn}: the forward failed on the first batch, a pair ({kinds}): "
          f"{type(e).__name__}: {e}. batches should yield the model's input x alone; for a "
          f"loader of (x, y) pairs, pass (x for x, _ in loader)."
        ) from e
      raise
    if seen == 0:
      key = (params_signature, _shapes_and_dtypes(x))
      if key not in checked:
        other = [_probe(s, 2.0) for s in leaves]
        _check_forward(fn, probes, new, run(other, x))
        checked.add(key)
    acc = accumulate(acc, new)
    seen += 1
  if seen == 0:
    raise ValueError(f"{fn}: batches is empty; population statistics need at least one batch.")

  out = []
  for old, m, avg in zip(leaves, *acc, strict=True):
    if estimator == "exact":
      mean, var = m.mean, numerics.variance(m)
    else:
      mean, var = avg.mean, avg.var
    known = (avg.count > 0) if estimator == "paper" else (m.count > 0)
    out.append(
      old._replace(
        mean=jnp.where(known, mean, old.mean).astype(old.mean.dtype),
        var=jnp.where(known, var, old.var).astype(old.var.dtype),
        count=m.count.astype(old.count.dtype),
      )
    )
  return jax.tree.unflatten(treedef, out)


# Flax models: jaxbn.linen.linen_population_stats and
# jaxbn.nnx.nnx_population_stats build the forward from the model.
