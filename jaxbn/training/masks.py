"""Which parameters belong to batch norm: weight-decay masks and frozen scale and bias."""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from jaxbn.core import BNParams

# flax's default names (BatchNorm_0) and the usual hand-given ones (bn, bn1,
# batch_norm_2, norm_bn).
_BN_NAME = re.compile(r"(^|_)(batch_?norm|bn)(_?\d+)?$", re.IGNORECASE)


def _key_name(k: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def bn_param_mask(params: Any, batch_stats: Any = None) -> Any:
  """A pytree of bools like ``params``: True for batch norm's scale and bias.

  With ``batch_stats``, a batch-norm layer is exactly a ``params`` subtree
  whose path also holds running statistics. Without it, a leaf named
  ``scale`` or ``bias`` belongs to batch norm when a module on its path is
  named like flax's default ``BatchNorm_0`` or ``bn``, ``bn1``,
  ``batch_norm_2``, ``..._bn`` (case-insensitive), or sits in a
  :class:`jaxbn.BNParams`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbn.training import bn_param_mask
    >>> params = {'Dense_0': {'kernel': jnp.ones((2, 2))},
    ...           'BatchNorm_0': {'scale': jnp.ones(2), 'bias': jnp.zeros(2)}}
    >>> bn_param_mask(params)
    {'BatchNorm_0': {'bias': True, 'scale': True}, 'Dense_0': {'kernel': False}}
  """
  if batch_stats is not None:
    layers = {
      tuple(_key_name(k) for k in path[:-1])
      for path, _ in jax.tree_util.tree_leaves_with_path(batch_stats)
    }

    def is_bn(path, _):
      names = tuple(_key_name(k) for k in path)
      return names[-1] in ("scale", "bias") and names[:-1] in layers

    return jax.tree_util.tree_map_with_path(is_bn, params)

  def is_bn_node(x):
    return isinstance(x, BNParams)

  def label(path, leaf):
    if isinstance(leaf, BNParams):
      return BNParams._make((True, True))  # the mask of its two arrays
    names = [_key_name(k) for k in path]
    return bool(
      names and names[-1] in ("scale", "bias") and any(_BN_NAME.search(n) for n in names[:-1])
    )

  return jax.tree_util.tree_map_with_path(label, params, is_leaf=is_bn_node)


def bn_weight_decay_mask(params: Any) -> Any:
  """The mask for ``optax.add_decayed_weights`` / ``optax.adamw``: decay all but batch norm.

  True for every parameter except batch norm's scale and bias (see
  :func:`bn_param_mask` for how they are found): decaying ``gamma`` toward 0
  would shrink the normalized activations, and decaying ``beta`` would undo
  the bias it replaces.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from jaxbn.training import bn_weight_decay_mask
    >>> tx = optax.adamw(1e-3, weight_decay=1e-4, mask=bn_weight_decay_mask)
    >>> params = {'Dense_0': {'kernel': jnp.ones((2, 2))},
    ...           'BatchNorm_0': {'scale': jnp.ones(2), 'bias': jnp.zeros(2)}}
    >>> bn_weight_decay_mask(params)
    {'BatchNorm_0': {'bias': False, 'scale': False}, 'Dense_0': {'kernel': True}}
  """
  return jax.tree.map(lambda b: not b, bn_param_mask(params))


def freeze_bn_affine(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` for every parameter but batch norm's scale and bias, which stay fixed.

  Their updates are zero (``optax.set_to_zero``), weight decay included.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from jaxbn.training import freeze_bn_affine
    >>> params = {'Dense_0': {'kernel': jnp.ones(2)}, 'BatchNorm_0': {'scale': jnp.ones(2)}}
    >>> tx = freeze_bn_affine(optax.sgd(0.5))
    >>> updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    >>> updates['BatchNorm_0']['scale'].tolist(), updates['Dense_0']['kernel'].tolist()
    ([0.0, 0.0], [-0.5, -0.5])
  """

  def labels(params):
    return jax.tree.map(lambda b: "frozen" if b else "train", bn_param_mask(params))

  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
