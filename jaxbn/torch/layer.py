"""One torch batch norm as ``(BNParams, BNState)`` and back, and the settings that match torch's.

The exact copies of one layer's parameters and running statistics between a
torch batch norm (or its state dict) and ``(BNParams, BNState)``, the jaxbn
arguments that reproduce torch's updates (:class:`TorchSettings`), and the
helpers the other modules of :mod:`jaxbn.torch` share (torch imported on first
use, tensors to JAX arrays).

The batch norms ported: ``torch.nn.BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and
every other subclass of torch's ``_BatchNorm`` (timm's ``BatchNormAct2d``,
whose activation :attr:`TorchSettings.activation` carries, and
``SplitBatchNorm2d``, whose auxiliary batch norms ``aux_bn.<i>`` port as
layers of their own), and the frozen ones: torchvision's (and timm's)
``FrozenBatchNorm2d`` and timm's ``FrozenBatchNormAct2d``, whose statistics
and affine parameters are buffers that never change
(:attr:`TorchSettings.frozen`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple
from typing import cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn.core import BNAccState
from jaxbn.core import BNParams
from jaxbn.core import BNState
from jaxbn.layer import PORTED_COUNT
from jaxbn.layer import BNLayer
from jaxbn.numerics import stats_dtype

Array = jax.Array

__all__ = (
  "PORTED_COUNT",
  "TorchSettings",
  "from_torch",
  "to_torch",
  "torch_settings",
)


def _torch():
  """Imports torch on first use, so that ``import jaxbn`` does not need it."""
  from jaxbn.extras import require

  return require("torch", "jaxbn.torch")


# The frozen batch norms: name of the module that defines them -> class names. Read from
# sys.modules only: a model holding one has imported its module, and jaxbn imports neither.
_FROZEN = {
  "torchvision.ops.misc": ("FrozenBatchNorm2d",),
  "timm.layers.norm_act": ("FrozenBatchNormAct2d",),
}


def _is_frozen(module: Any) -> bool:
  """A frozen batch norm: torchvision's or timm's ``FrozenBatchNorm2d``, timm's ``...Act2d``."""
  for where, names in _FROZEN.items():
    mod = sys.modules.get(where)
    if mod is not None and isinstance(module, tuple(getattr(mod, n) for n in names)):
      return True
  return False


def _is_batch_norm(module: Any) -> bool:
  """A batch norm jaxbn ports: a subclass of torch's ``_BatchNorm``, or a frozen one."""
  return isinstance(module, _torch().nn.modules.batchnorm._BatchNorm) or _is_frozen(module)


def _torch_activations() -> dict[type, Callable[[Any], Callable[[Array], Array] | None]]:
  """torch activation module type -> its JAX function (given the module, for its arguments)."""
  nn = _torch().nn
  return {
    nn.Identity: lambda m: None,
    nn.ReLU: lambda m: jax.nn.relu,
    nn.ReLU6: lambda m: jax.nn.relu6,
    nn.SiLU: lambda m: jax.nn.silu,
    nn.Sigmoid: lambda m: jax.nn.sigmoid,
    nn.Tanh: lambda m: jnp.tanh,
    nn.Hardswish: lambda m: jax.nn.hard_swish,
    nn.Hardsigmoid: lambda m: jax.nn.hard_sigmoid,
    nn.Mish: lambda m: jax.nn.mish,
    nn.GELU: lambda m: functools.partial(jax.nn.gelu, approximate=m.approximate == "tanh"),
    nn.LeakyReLU: lambda m: functools.partial(jax.nn.leaky_relu, negative_slope=m.negative_slope),
    nn.ELU: lambda m: functools.partial(jax.nn.elu, alpha=m.alpha),
  }


def _activation(fn: str, module: Any) -> Callable[[Array], Array] | None:
  """The JAX function of a fused batch norm's ``act`` (timm's ``BatchNormAct2d``), or ``None``."""
  act = getattr(module, "act", None)
  if act is None:
    return None
  table = _torch_activations()
  if type(act) not in table:
    raise ValueError(
      f"{fn}: {type(module).__name__} applies the activation {type(act).__name__}, which "
      f"jaxbn does not map to a JAX function (it maps {sorted(t.__name__ for t in table)}); "
      f"port the batch norm with from_torch and apply that activation to its output yourself."
    )
  return table[type(act)](act)


# --------------------------------------------------------------------------
# Settings


class TorchSettings(NamedTuple):
  """The jaxbn arguments that reproduce a torch batch norm's behaviour.

  Attributes:
    momentum: jaxbn's momentum (weight of the old value): ``1 - m`` for
      torch's ``momentum=m``; ``None`` for torch's ``momentum=None`` (see
      :meth:`train_kwargs` and :meth:`module_kwargs` for what that maps to).
    epsilon: torch's ``eps``.
    running_var: ``"unbiased"``: torch updates the running variance with
      ``n/(n-1) var_B``.
    affine: torch's ``affine``: False means scale 1 and bias 0, not trained.
    track_running_stats: torch's ``track_running_stats``: False means the
      batch statistics are used in evaluation too (call ``bn_train``, or the
      modules with ``use_running_average=False``, and ignore the new state).
    frozen: a frozen batch norm (``FrozenBatchNorm2d``): it normalizes with
      its running statistics in training too (:func:`jaxbn.bn_infer`, the
      modules with ``use_running_average=True``), and its scale and bias are
      buffers, not trained (:func:`jaxbn.training.freeze_bn_affine`).
      ``momentum`` is then 1: the statistics never move. An nnx module's
      ``.train()`` sets ``use_running_average=False``: call a frozen layer
      with ``use_running_average=True``, or keep it out of ``.train()``.
    activation: the JAX function of the activation a fused batch norm
      applies to its output (timm's ``BatchNormAct2d``: ``jax.nn.relu`` for
      ``act_layer=nn.ReLU``), or ``None`` (no activation, or ``nn.Identity``).
      Apply it after the batch norm: ``activation(bn_infer(...))``. A
      ``drop`` layer is a training-time regularizer and is not carried over.
  """

  momentum: float | None
  epsilon: float
  running_var: str
  affine: bool
  track_running_stats: bool
  frozen: bool = False
  activation: Callable[[Array], Array] | None = None

  def train_kwargs(self, state: BNState | BNAccState | None = None) -> dict[str, Any]:
    """Keyword arguments of :func:`jaxbn.bn_train` giving torch's update.

    ``{"momentum", "epsilon", "running_var"}``. For torch's
    ``momentum=None`` (a cumulative average with equal weight per batch: the
    new batch weighs ``1 / num_batches_tracked`` after the increment), the
    momentum is ``state.step / (state.step + 1)``, an array that gives
    torch's update at every step (to rounding), under ``jit`` too.

    Args:
      state: the state about to be updated; needed only for torch's
        ``momentum=None``.

    Returns:
      A dict to pass as ``**kwargs`` to ``bn_train``.

    Raises:
      ValueError: torch's ``momentum=None`` and no ``state``; a frozen batch
        norm (it has no training update: call ``bn_infer``).
    """
    if self.frozen:
      raise ValueError(
        "TorchSettings.train_kwargs: a frozen batch norm (FrozenBatchNorm2d) normalizes with "
        "its running statistics in training too and never updates them; call jaxbn.bn_infer "
        "(a module: use_running_average=True)."
      )
    momentum = self.momentum
    if momentum is None:
      if state is None:
        raise ValueError(
          "TorchSettings.train_kwargs: torch's momentum=None weighs the new batch by "
          "1 / (num_batches_tracked + 1); pass the state about to be updated "
          "(train_kwargs(state)) so that its step gives that weight."
        )
      step = jnp.asarray(state.step).astype(state.mean.dtype)
      momentum = step / (step + 1)
    return {"momentum": momentum, "epsilon": self.epsilon, "running_var": self.running_var}

  def module_kwargs(self) -> dict[str, Any]:
    """Constructor arguments of :class:`jaxbn.linen.BatchNorm` / :class:`jaxbn.nnx.BatchNorm`.

    ``{"momentum", "epsilon", "running_var", "use_scale", "use_bias"}``, and
    ``use_running_average=True`` for a frozen batch norm. A
    module's momentum is a constant, so torch's ``momentum=None`` maps to
    jaxbn's ``momentum=None``: the exact statistics of every value seen
    (Chan's merge, weighted by ``count``), where torch averages per-batch
    means and unbiased variances with equal weight per batch. With
    ``count = num_batches_tracked * n`` (``from_torch(..., batch_values=n)``)
    and batches of ``n`` values, the new batch's mean gets torch's weight
    ``1 / (num_batches_tracked + 1)``; the variance differs from torch's by
    the spread of the batch means (pooled, not averaged). For torch's exact
    update use :func:`jaxbn.bn_train` with :meth:`train_kwargs`.

    With ``track_running_stats=False``, call the module with
    ``use_running_average=False`` in evaluation too.
    """
    kwargs: dict[str, Any] = {
      "momentum": self.momentum,
      "epsilon": self.epsilon,
      "running_var": self.running_var,
      "use_scale": self.affine,
      "use_bias": self.affine,
    }
    if self.frozen:
      kwargs["use_running_average"] = True
    return kwargs


def _check_bn_module(fn: str, module: Any) -> None:
  torch = _torch()
  if not _is_batch_norm(module):
    raise TypeError(
      f"{fn}: expected a torch batch norm (BatchNorm1d/2d/3d, SyncBatchNorm, another "
      f"_BatchNorm such as timm's BatchNormAct2d, or a FrozenBatchNorm2d), got "
      f"{type(module).__name__}."
    )
  for t in (module.weight, module.running_mean):
    if isinstance(t, torch.nn.parameter.UninitializedTensorMixin):
      raise ValueError(f"{fn}: {type(module).__name__} is not initialized yet; run it once first.")


def torch_settings(module: Any) -> TorchSettings:
  """The jaxbn settings equivalent to a torch batch norm's.

  Args:
    module: a torch batch norm (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``,
      timm's ``BatchNormAct2d``, a ``FrozenBatchNorm2d``; a state dict does
      not hold these settings: torch's defaults map to ``momentum=0.9,
      epsilon=1e-5, running_var="unbiased"``).

  Returns:
    :class:`TorchSettings`.

  Raises:
    TypeError: ``module`` is not a torch batch norm.
    ValueError: a fused activation jaxbn does not map to a JAX function.

  Examples:
    >>> import torch
    >>> import jaxbn
    >>> s = jaxbn.torch_settings(torch.nn.BatchNorm2d(8))
    >>> s.momentum, s.epsilon, s.running_var, s.affine, s.track_running_stats
    (0.9, 1e-05, 'unbiased', True, True)
    >>> jaxbn.torch_settings(torch.nn.BatchNorm1d(8, momentum=None, affine=False)).momentum is None
    True
    >>> from torchvision.ops import FrozenBatchNorm2d
    >>> s = jaxbn.torch_settings(FrozenBatchNorm2d(8, eps=1e-3))
    >>> s.frozen, s.momentum, s.epsilon, s.module_kwargs()["use_running_average"]
    (True, 1.0, 0.001, True)
  """
  fn = "torch_settings"
  _check_bn_module(fn, module)
  frozen = _is_frozen(module)  # buffers only: always affine and tracking, never updated
  return TorchSettings(
    momentum=_momentum(module),
    epsilon=float(module.eps),
    running_var="unbiased",
    affine=frozen or bool(module.affine),
    track_running_stats=frozen or bool(module.track_running_stats),
    frozen=frozen,
    activation=_activation(fn, module),
  )


def _momentum(module: Any) -> float | None:
  """jaxbn's momentum for a torch batch norm: ``1 - torch's``; 1 for a frozen one (no update).

  ``None`` for torch's ``momentum=None``; torch's default 0.1 for ``module=None`` (a state dict).
  """
  if module is not None and _is_frozen(module):
    return 1.0
  m = 0.1 if module is None else module.momentum
  return None if m is None else 1.0 - float(m)


# --------------------------------------------------------------------------
# Batch norm: torch -> jaxbn


def _to_numpy(t: Any) -> np.ndarray:
  """A torch tensor's values as a NumPy array of the same dtype (bfloat16 included)."""
  torch = _torch()
  if isinstance(t, torch.Tensor):
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: widen exactly, narrow in _to_jax
      return t.float().numpy().astype(jnp.bfloat16)
    return t.numpy()
  return np.asarray(t)


def _to_jax(t: Any, dtype: Any = None) -> Array:
  a = _to_numpy(t)
  # A copy: jnp.asarray with an explicit dtype can alias the NumPy buffer, i.e. the torch
  # tensor's memory, which torch may later update in place. The explicit dtype makes JAX
  # warn when float64 is truncated (x64 disabled).
  return jnp.array(a, dtype=a.dtype if dtype is None else dtype, copy=True)


class _Tensors(NamedTuple):
  weight: Any
  bias: Any
  running_mean: Any
  running_var: Any
  num_batches_tracked: Any
  num_features: int


def _tensors(fn: str, source: Any, prefix: str) -> _Tensors:
  """The batch-norm tensors of a module or a state dict (``None`` where absent)."""
  torch = _torch()
  if isinstance(source, torch.nn.Module):
    if prefix:
      source = source.get_submodule(prefix.rstrip("."))
    _check_bn_module(fn, source)
    frozen = _is_frozen(source)  # buffers only; no num_batches_tracked, no num_features
    return _Tensors(
      source.weight,
      source.bias,
      source.running_mean,
      source.running_var,
      None if frozen else source.num_batches_tracked,
      int(source.weight.shape[0] if frozen else source.num_features),
    )
  if not isinstance(source, Mapping):
    raise TypeError(
      f"{fn}: expected a torch batch-norm module or its state dict, got {type(source).__name__}."
    )
  names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
  got = {k: source.get(prefix + k) for k in names}
  if (got["weight"] is None) != (got["bias"] is None):
    raise ValueError(f"{fn}: the state dict has only one of {prefix}weight and {prefix}bias.")
  if (got["running_mean"] is None) != (got["running_var"] is None):
    raise ValueError(
      f"{fn}: the state dict has only one of {prefix}running_mean and {prefix}running_var."
    )
  first = got["weight"] if got["weight"] is not None else got["running_mean"]
  if first is None:
    raise ValueError(
      f"{fn}: no {prefix}weight or {prefix}running_mean in the state dict (keys: "
      f"{sorted(source)[:8]}...); pass prefix= for a layer of a whole model's state dict, "
      f"or the module itself for affine=False, track_running_stats=False."
    )
  return _Tensors(*got.values(), num_features=int(np.shape(first)[0]))


def from_torch(
  source: Any, *, prefix: str = "", batch_values: float | None = None
) -> tuple[BNParams, BNState]:
  r"""A torch batch norm's parameters and running statistics as ``(BNParams, BNState)``.

  Exact copies, in the tensors' dtypes (state at least float32)::

      scale = weight          (1 when affine=False)
      bias  = bias            (0 when affine=False)
      mean  = running_mean    (0 when track_running_stats=False)
      var   = running_var     (1 when track_running_stats=False; torch's, unbiased)
      step  = num_batches_tracked                     (int32)
      count = num_batches_tracked * batch_values      (or PORTED_COUNT)

  (``PORTED_COUNT`` also when ``num_batches_tracked`` is absent, as in a
  frozen batch norm.)

  ``count`` is the number of values per feature behind the statistics, which
  torch does not store. Given ``batch_values`` (the values per feature in each
  of torch's training batches: ``N`` for ``(N, C)`` input, ``N*H*W`` for
  ``(N, C, H, W)``), it is that number, and ``momentum=None`` goes on
  weighting batches as torch did. Without it the count is
  :data:`PORTED_COUNT`, so that ``ema_warmup=True`` and ``momentum=None``
  keep the ported statistics instead of replacing them with the first
  batch's (a count of 0 would).

  Use the result with the arguments of :func:`torch_settings`; torch's layout
  is channel-first, so ``axis=1`` (or move the channels last first)::

      params, state = jaxbn.from_torch(module)
      kw = jaxbn.torch_settings(module).train_kwargs(state)
      y, state = jaxbn.bn_train(params, state, x, axis=1, **kw)

  A frozen batch norm (``FrozenBatchNorm2d``) has no ``num_batches_tracked``:
  its step is 0 and its count :data:`PORTED_COUNT`.

  Args:
    source: a torch batch norm (see :mod:`jaxbn.torch.layer`), a model
      containing one (with ``prefix``), or a state dict.
    prefix: the layer's name in a whole model (``"layer1.0.bn1"``) or its
      key prefix in a state dict (``"layer1.0.bn1."``).
    batch_values: values per feature in each torch training batch (see above).

  Returns:
    ``(params, state)``.

  Raises:
    TypeError: ``source`` is neither a batch norm nor a mapping.
    ValueError: a state dict without the layer's tensors; a lazy module not
      initialized yet; ``num_batches_tracked`` beyond int32.

  Examples:
    >>> import jax.numpy as jnp, numpy as np, torch
    >>> import jaxbn
    >>> bn = torch.nn.BatchNorm1d(3)
    >>> _ = bn(torch.arange(12.0).reshape(4, 3))  # one training step in torch
    >>> params, state = jaxbn.from_torch(bn)
    >>> [round(v, 4) for v in state.mean.tolist()], state.step  # 0.1 of the batch mean
    ([0.45, 0.55, 0.65], Array(1, dtype=int32))
    >>> x = torch.arange(6.0).reshape(2, 3)
    >>> y = jaxbn.bn_infer(params, state, jnp.asarray(x.numpy()), epsilon=bn.eps)
    >>> np.allclose(y, bn.eval()(x).detach().numpy(), rtol=1e-6)
    True
  """
  fn = "from_torch"
  t = _tensors(fn, source, prefix)
  c = t.num_features
  ref = next((v for v in t[:4] if v is not None), None)
  dtype = jnp.dtype(_to_numpy(ref).dtype) if ref is not None else _default_dtype()
  params = {} if t.weight is None else {"scale": _to_jax(t.weight), "bias": _to_jax(t.bias)}
  sdtype = stats_dtype(dtype if t.running_mean is None else _to_numpy(t.running_mean).dtype)
  if t.running_mean is None:
    mean, var = jnp.zeros((c,), sdtype), jnp.ones((c,), sdtype)
    steps = 0
  else:
    mean, var = _to_jax(t.running_mean, sdtype), _to_jax(t.running_var, sdtype)
    steps = 0 if t.num_batches_tracked is None else int(_to_numpy(t.num_batches_tracked))
  if not 0 <= steps < 2**31:
    raise ValueError(f"{fn}: num_batches_tracked={steps} does not fit BNState.step (int32).")
  if t.running_mean is None:
    count = 0.0
  elif batch_values is None or t.num_batches_tracked is None:
    count = PORTED_COUNT  # a frozen layer's (or a state dict's without the step) statistics
  else:
    count = float(steps) * float(batch_values)
  stats = {
    "mean": mean,
    "var": var,
    "count": jnp.full((c,), count, sdtype),
    "step": jnp.asarray(steps, jnp.int32),
  }
  # Without affine parameters, scale 1 and bias 0 in the tensors' dtype.
  p, s = BNLayer(param_dtype=dtype).from_entries(params, stats, fn=fn)
  return p, cast(BNState, s)  # a default layer (accumulate_steps=1) makes a BNState


def _default_dtype() -> Any:
  return jnp.dtype(str(_torch().get_default_dtype()).removeprefix("torch."))


# --------------------------------------------------------------------------
# Batch norm: jaxbn -> torch


def to_torch(params: BNParams, state: BNState | BNAccState | None, module: Any) -> Any:
  """Writes ``(params, state)`` into a torch batch norm, in place.

  The inverse of :func:`from_torch`: ``weight``, ``bias``, ``running_mean``,
  ``running_var`` and ``num_batches_tracked`` (from ``state.step``) take the
  values, converted to the module's dtypes and device; ``state.count`` has
  no torch counterpart and is dropped; a ``state.step`` of ``None`` leaves
  ``num_batches_tracked`` as it is. A module with
  ``track_running_stats=False`` has no running statistics: ``state`` is
  ignored. Pass ``state=None`` to write the parameters only.

  Args:
    params: :class:`jaxbn.BNParams` of shape ``(num_features,)``.
    state: :class:`jaxbn.BNState` of the same shape, or ``None``.
    module: a torch batch norm (see :mod:`jaxbn.torch.layer`); a frozen one
      takes the values into its buffers (``state.step`` is dropped).

  Returns:
    ``module``.

  Raises:
    TypeError: ``module`` is not a torch batch norm.
    ValueError: the shapes differ from ``(num_features,)``; or the module has
      ``affine=False`` and ``params`` are not exactly scale 1, bias 0 (torch
      could not represent them).

  Examples:
    >>> import torch
    >>> import jaxbn
    >>> params, state = jaxbn.bn_init(2)
    >>> bn = jaxbn.to_torch(params._replace(scale=params.scale * 3), state, torch.nn.BatchNorm1d(2))
    >>> bn.weight
    Parameter containing:
    tensor([3., 3.], requires_grad=True)
  """
  fn = "to_torch"
  torch = _torch()
  _check_bn_module(fn, module)
  frozen = _is_frozen(module)  # buffers only, always affine and tracking
  c = int(module.weight.shape[0] if frozen else module.num_features)
  for name, a in (("params.scale", params.scale), ("params.bias", params.bias)) + (
    () if state is None else (("state.mean", state.mean), ("state.var", state.var))
  ):
    if tuple(np.shape(a)) != (c,):
      raise ValueError(
        f"{fn}: {name} has shape {tuple(np.shape(a))}, but the module has {c} features."
      )

  def put(dst: Any, src: Any) -> None:
    # No torch.from_numpy: JAX's host buffers are read-only and may be bfloat16.
    a = np.asarray(jax.device_get(src))
    if a.dtype == jnp.bfloat16:
      a = a.astype(np.float32)  # exact; copy_ narrows back to the module's dtype
    dst.copy_(torch.as_tensor(a.copy()))

  with torch.no_grad():
    if frozen or module.affine:
      put(module.weight, params.scale)
      put(module.bias, params.bias)
    else:
      scale, bias = np.asarray(params.scale), np.asarray(params.bias)
      if not (np.all(scale == 1) and np.all(bias == 0)):
        raise ValueError(
          f"{fn}: the module has affine=False (scale 1, bias 0), but params are not; "
          f"make it with affine=True, or keep scale and bias fixed when training."
        )
    if state is not None and (frozen or module.track_running_stats):
      put(module.running_mean, state.mean)
      put(module.running_var, state.var)
      if state.step is not None and not frozen:
        module.num_batches_tracked.fill_(int(np.asarray(state.step)))
  return module
