"""Deployment toolchains that see jaxbn's batch norm as they see flax's: qwix and jax2onnx.

Tools that turn a flax model into something deployable recognise batch norm
by flax's class. qwix (quantization) marks ``flax.linen.BatchNorm.__call__``
and ``flax.nnx.BatchNorm.__call__`` as foldable into the convolution or dense
layer before them, so that quantization-aware training inserts no fake
quantization between the two (the deployed model folds them); jax2onnx emits
one ONNX ``BatchNormalization`` node for flax's nnx and linen batch norms.
Without registration, jaxbn's modules are traced through: qwix quantizes the
arithmetic inside them (five extra fake-quantized operands per batch norm in
evaluation, more in training, and a conversion that differs from flax's), and
an ONNX export is a chain of elementwise nodes.

One call each registers :class:`jaxbn.linen.BatchNorm` and
:class:`jaxbn.nnx.BatchNorm` with the same treatment as flax's:

* :func:`register_qwix`: qwix's ODML providers (``OdmlQatProvider``,
  ``OdmlConversionProvider``) made afterwards handle jaxbn's batch norms with
  the handler of flax's; the quantization decisions and statistics keys are
  then flax's.
* :func:`register_onnx`: a jax2onnx plugin that exports an inference-mode
  jaxbn batch norm whose features are on the last axis as one
  ``BatchNormalization`` node (between two transposes for rank > 2, as
  flax's); other axes export as jaxbn's arithmetic. A batch norm in training
  mode is exported in inference mode, with a warning, as flax's plugin does.
  (jax2onnx 0.17.1 cannot export a ResNet with several blocks per stage in
  this form, with flax's batch norm either: see :func:`register_onnx`.)

Both need ``pip install 'jaxbn[deploy]'`` (qwix, jax2onnx, onnxruntime) and
are idempotent. Folding first (:func:`jaxbn.linen.fold_linen`,
:func:`jaxbn.fold_branches`) removes the batch norms altogether.
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Imported for their names: qwix and jax2onnx find the classes they patch in sys.modules.
from jaxbn import linen as jbn_linen  # noqa: F401
from jaxbn import nnx as jbn_nnx  # noqa: F401
from jaxbn.extras import require
from jaxbn.layer import BNLayer
from jaxbn.layer import features_last

__all__ = ("ONNX_PRIMITIVE", "QWIX_NAMES", "register_onnx", "register_qwix")

QWIX_NAMES = {
  "jaxbn.linen.BatchNorm.__call__": "flax.linen.BatchNorm.__call__",
  "jaxbn.nnx.BatchNorm.__call__": "flax.nnx.BatchNorm.__call__",
}
"""The names qwix intercepts for jaxbn's modules -> flax's names whose handler they share."""

ONNX_PRIMITIVE = "jaxbn.batch_norm"
"""The JAX primitive the jax2onnx plugin binds for an inference-mode jaxbn batch norm."""

_log = logging.getLogger(__name__)


def register_qwix() -> None:
  """Makes qwix's ODML providers treat jaxbn's batch norms as flax's.

  Every ``qwix.OdmlQatProvider`` and ``qwix.OdmlConversionProvider`` made
  after this call intercepts ``jaxbn.linen.BatchNorm.__call__`` and
  ``jaxbn.nnx.BatchNorm.__call__`` (:data:`QWIX_NAMES`) with the handler of
  flax's ``BatchNorm``: a batch norm right after a convolution or a dense
  layer folds into it (no fake quantization between them, the previous op's
  rule carried through), elsewhere it is quantized as the op
  ``batch_norm_op``. qwix reads its table of intercepted functions from
  ``qwix._src.providers.odml_ops.get_all_ops`` when a provider is made; this
  adds jaxbn's two names to it (checked with qwix 0.1.8).

  Raises:
    MissingExtraError: qwix is not installed (``pip install 'jaxbn[deploy]'``).
    RuntimeError: this qwix has no such table, or no entry for flax's batch
      norm (a qwix this was not written for).

  Examples:
    >>> import qwix
    >>> import jaxbn.deploy
    >>> jaxbn.deploy.register_qwix()
    >>> provider = qwix.OdmlQatProvider([qwix.QuantizationRule(weight_qtype="int8")])
    >>> sorted(n for n in provider.get_intercept_map() if "BatchNorm" in n)
    ['flax.linen.BatchNorm.__call__', 'flax.nnx.BatchNorm.__call__',
     'jaxbn.linen.BatchNorm.__call__', 'jaxbn.nnx.BatchNorm.__call__']
  """
  require("qwix", "jaxbn.deploy.register_qwix")
  try:
    odml_ops = require("qwix._src.providers.odml_ops", "jaxbn.deploy.register_qwix")
  except ImportError as e:
    raise RuntimeError(f"register_qwix: this qwix has no ODML op table ({e}).") from None
  original = getattr(odml_ops, "get_all_ops", None)
  if original is None:
    raise RuntimeError("register_qwix: this qwix has no odml_ops.get_all_ops (written for 0.1.8).")
  if getattr(original, "_jaxbn", False):
    return
  missing = [flax for flax in QWIX_NAMES.values() if flax not in original()]
  if missing:
    raise RuntimeError(f"register_qwix: this qwix does not intercept {missing}.")

  @functools.wraps(original)
  def get_all_ops():
    ops = original()
    for ours, flax in QWIX_NAMES.items():
      ops.setdefault(ours, ops[flax])
    return ops

  setattr(get_all_ops, "_jaxbn", True)  # noqa: B010 -- marks it registered (idempotence)
  setattr(odml_ops, "get_all_ops", get_all_ops)  # noqa: B010 -- qwix's table, replaced


_onnx_plugin: Any = None


def _onnx_options(module: Any, x: Any) -> tuple[Any, bool]:
  """The module's merged options, and whether one ONNX node fits.

  It fits with the features on the last axis, rank >= 2, and float32 or float64 input: jaxbn
  normalizes half-precision input in float32, which a node of the input's dtype would not.
  """
  options = BNLayer.of(module).options
  ndim = np.ndim(x)
  wide = np.dtype(x.dtype) in (np.dtype(np.float32), np.dtype(np.float64))
  return options, wide and ndim >= 2 and features_last(options.axis, ndim)


def _bind(prim: Any, module: Any, x: Any, options: Any, stats: tuple, training: bool) -> Any:
  """One bind of the plugin's primitive: ``(x - mean) / sqrt(var + eps) * scale + bias``."""
  if training:
    _log.warning(
      "jaxbn BatchNorm exported with use_running_average=False; exporting inference mode "
      "(its running statistics), as jax2onnx does for flax's BatchNorm."
    )
  scale, bias, mean, var = stats
  n = np.shape(mean)[-1]
  scale_default, bias_default = scale is None, bias is None
  scale = np.ones((n,), np.dtype(x.dtype)) if scale is None else scale
  bias = np.zeros((n,), np.dtype(x.dtype)) if bias is None else bias
  # An ONNX BatchNormalization node has one dtype (float32 models: no cast).
  scale, bias, mean, var = (jnp.asarray(a).astype(x.dtype) for a in (scale, bias, mean, var))
  y = prim.bind(
    x,
    scale,
    bias,
    mean,
    var,
    epsilon=float(options.epsilon),
    # An attribute of the ONNX node that inference ignores; jaxbn allows None.
    momentum=0.9 if options.momentum is None else float(options.momentum),
    scale_is_default=scale_default,
    bias_is_default=bias_default,
  )
  return y if module.dtype is None else y.astype(module.dtype)


def register_onnx() -> Any:
  """Registers a jax2onnx plugin: one ``BatchNormalization`` node per jaxbn batch norm.

  After this call, ``jax2onnx.to_onnx`` exports each inference-mode
  :class:`jaxbn.nnx.BatchNorm` and :class:`jaxbn.linen.BatchNorm` (inside
  ``lambda x: model.apply(variables, x)``) with its features on the last axis
  as one ``BatchNormalization`` node, as jax2onnx exports flax's: the plugin
  reuses the lowering of jax2onnx's plugin for ``flax.nnx.BatchNorm``
  (transposes to channel-first around the node for rank > 2). The modules'
  ``__call__`` is replaced only while ``to_onnx`` traces. A batch norm whose
  features are on another axis, or whose input is half precision (which
  jaxbn normalizes in float32), is exported as jaxbn's arithmetic.

  jax2onnx 0.17.1 mis-shapes a residual ``Add`` after such nodes in models
  with more than one block per stage (a ResNet-18; with flax's
  ``BatchNorm`` and jax2onnx's own plugin too): the file does not load in
  onnxruntime. Such models export correctly without this registration, as
  elementwise nodes.

  Returns:
    The plugin class (registered once; later calls return it).

  Raises:
    MissingExtraError: jax2onnx is not installed (``pip install 'jaxbn[deploy]'``).

  Examples:
    >>> import jax, numpy as np
    >>> from flax import nnx
    >>> from jax2onnx import to_onnx
    >>> import jaxbn.deploy
    >>> from jaxbn import nnx as jbn
    >>> _ = jaxbn.deploy.register_onnx()
    >>> bn = jbn.BatchNorm(4, use_running_average=True, rngs=nnx.Rngs(0))
    >>> proto = to_onnx(bn, [(2, 3, 3, 4)], model_name="bn")
    >>> [n.op_type for n in proto.graph.node]
    ['Transpose', 'BatchNormalization', 'Transpose']
  """
  global _onnx_plugin
  if _onnx_plugin is not None:
    return _onnx_plugin
  from jax.extend.core import Primitive

  plugins = require("jax2onnx.plugins", "jaxbn.deploy.register_onnx")
  # Loaded by the package's own plugin discovery, or on first use here.
  importlib.import_module(plugins.__name__ + ".flax.nnx.batch_norm")
  MonkeyPatchSpec = plugins._patching.MonkeyPatchSpec
  BatchNormPlugin = plugins.flax.nnx.batch_norm.BatchNormPlugin
  register_primitive = plugins.plugin_system.register_primitive

  prim = Primitive(ONNX_PRIMITIVE)
  prim.multiple_results = False

  @prim.def_impl
  def _impl(x, scale, bias, mean, var, *, epsilon, **_):
    return ((x - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias).astype(x.dtype)

  def nnx_call(original):
    def call(self, x, use_running_average=None, *, mask=None):
      options, fits = _onnx_options(self, x)
      if not fits:
        return original(self, x, use_running_average, mask=mask)
      running = self.use_running_average if use_running_average is None else use_running_average
      scale = None if self.scale is None else self.scale[...]
      bias = None if self.bias is None else self.bias[...]
      stats = (scale, bias, self.mean[...], self.var[...])
      return _bind(prim, self, x, options, stats, not running)

    return call

  def linen_call(original):
    def call(self, x, use_running_average=None, *, mask=None):
      options, fits = _onnx_options(self, x)
      variables = self.scope.variables() if self.scope is not None else {}
      batch_stats, params = variables.get("batch_stats", {}), variables.get("params", {})
      if not fits or "mean" not in batch_stats or "var" not in batch_stats:
        return original(self, x, use_running_average, mask=mask)
      running = self.use_running_average if use_running_average is None else use_running_average
      stats = (
        params.get("scale") if self.use_scale else None,
        params.get("bias") if self.use_bias else None,
        batch_stats["mean"],
        batch_stats["var"],
      )
      return _bind(prim, self, x, options, stats, not running)

    return call

  @register_primitive(
    jaxpr_primitive=ONNX_PRIMITIVE,
    jax_doc="jaxbn.nnx.BatchNorm and jaxbn.linen.BatchNorm (jaxbn.deploy)",
    onnx=[
      {
        "component": "BatchNormalization",
        "doc": "https://onnx.ai/onnx/operators/onnx__BatchNormalization.html",
      }
    ],
    since="jaxbn",
    context="primitives.jaxbn",
    component="batch_norm",
    testcases=[],
  )
  class JaxbnBatchNormPlugin(BatchNormPlugin):
    """jax2onnx's plugin for ``flax.nnx.BatchNorm`` (its lowering), on jaxbn's modules."""

    _PRIM = prim
    _ABSTRACT_EVAL_BOUND = False

    @classmethod
    def binding_specs(cls):
      return [
        MonkeyPatchSpec(target="jaxbn.nnx.BatchNorm", attr="__call__", make_value=nnx_call),
        MonkeyPatchSpec(target="jaxbn.linen.BatchNorm", attr="__call__", make_value=linen_call),
      ]

  _onnx_plugin = JaxbnBatchNormPlugin
  return _onnx_plugin
