"""A RepVGG/MobileOne block in flax.linen, trained with branches, deployed as one convolution.

:class:`RepBlock` sums parallel branches, each a convolution and a batch norm
(``num_conv_branches`` of size ``kernel_size``, a ``1x1`` one, and an identity
branch that is a batch norm alone), then applies the activation. In inference
the batch norms are affine maps, so the sum folds into one convolution with a
bias (:func:`jaxbn.fold_branches`); :meth:`RepBlock.reparameterize` gives that
block (``deploy=True``) and its variables.

References:
  Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", CVPR 2021,
  arXiv:2101.03697; Vasu et al., "MobileOne: An Improved One millisecond
  Mobile Backbone", CVPR 2023, arXiv:2206.04040.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from jaxbn import linen as jbn_linen
from jaxbn.core import DEFAULTS
from jaxbn.core import BNOptions
from jaxbn.folding import fold_branches
from jaxbn.layer import BNLayer
from jaxbn.linen import read_variables
from jaxbn.models.common import Activation
from jaxbn.models.common import activation_fn

__all__ = ("RepBlock",)


class RepBlock(nn.Module):
  """Parallel conv + batch-norm branches summed, foldable into one convolution.

  Branches (each without a convolution bias): ``num_conv_branches``
  convolutions of ``kernel_size`` (``conv_<i>``, ``bn_<i>``), a ``1x1``
  convolution (``scale_conv``, ``scale_bn``) when ``scale_branch``, and a
  batch norm alone (``identity_bn``) when ``identity_branch`` and the block
  keeps its shape (``features`` = input channels, stride 1). Input and
  output NHWC. With ``deploy=True`` the block is one convolution with a bias
  (``reparam``) followed by the activation: :meth:`reparameterize`.

  Attributes:
    features: output channels.
    strides: the convolutions' stride.
    kernel_size: the size of the main branches' square kernels (odd).
    num_conv_branches: how many main branches (RepVGG: 1; MobileOne: k).
    scale_branch: add the ``1x1`` branch.
    identity_branch: add the batch-norm-only branch where shapes allow.
    groups: ``feature_group_count`` of every convolution (depthwise:
      ``groups = features``).
    activation: applied to the sum (``'relu'``, ``'sigmoid'``, ``'tanh'``, a
      callable).
    bn_options: the options of every batch norm.
    deploy: one convolution with a bias instead of the branches.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbn.models import RepBlock
    >>> block = RepBlock(features=4)
    >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    >>> variables = block.init(jax.random.key(1), x, train=False)
    >>> sorted(variables["params"])
    ['bn_0', 'conv_0', 'identity_bn', 'scale_bn', 'scale_conv']
    >>> deployed, folded = block.reparameterize(variables)
    >>> jax.tree.map(jnp.shape, folded)
    {'params': {'reparam': {'bias': (4,), 'kernel': (3, 3, 4, 4)}}}
    >>> y = block.apply(variables, x, train=False)
    >>> bool(jnp.allclose(deployed.apply(folded, x, train=False), y, atol=1e-5))
    True
  """

  features: int
  strides: int = 1
  kernel_size: int = 3
  num_conv_branches: int = 1
  scale_branch: bool = True
  identity_branch: bool = True
  groups: int = 1
  activation: Activation = "relu"
  bn_options: BNOptions = DEFAULTS
  deploy: bool = False

  def _conv(self, k: int, name: str, use_bias: bool = False) -> nn.Conv:
    p = k // 2
    return nn.Conv(
      self.features,
      (k, k),
      strides=self.strides,
      padding=((p, p), (p, p)),
      use_bias=use_bias,
      feature_group_count=self.groups,
      name=name,
    )

  def _has_identity(self, in_features: int) -> bool:
    return self.identity_branch and self.strides == 1 and in_features == self.features

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """The block's output: ``activation(sum of branches)``."""
    if self.kernel_size % 2 != 1:
      raise ValueError(f"RepBlock: kernel_size must be odd, got {self.kernel_size}.")
    act = activation_fn(self.activation)
    if self.deploy:
      return act(self._conv(self.kernel_size, "reparam", use_bias=True)(x))
    bn = lambda name: jbn_linen.BatchNorm(
      use_running_average=not train, options=self.bn_options, name=name
    )
    k = self.kernel_size
    y = [bn(f"bn_{i}")(self._conv(k, f"conv_{i}")(x)) for i in range(self.num_conv_branches)]
    if self.scale_branch:
      y.append(bn("scale_bn")(self._conv(1, "scale_conv")(x)))
    if self._has_identity(x.shape[-1]):
      y.append(bn("identity_bn")(x))
    return act(sum(y[1:], y[0]))

  def reparameterize(self, variables: Any) -> tuple[RepBlock, dict[str, Any]]:
    """The deployed block (one convolution with a bias) and its variables.

    Folds every branch with its running (or population) statistics by
    :func:`jaxbn.fold_branches`; the deployed block's output equals this
    block's in inference (``train=False``) to float32 rounding.

    Args:
      variables: this block's ``{"params": ..., "batch_stats": ...}``.

    Returns:
      ``(block, {"params": {"reparam": {"kernel", "bias"}}})``.
    """
    if self.deploy:
      raise ValueError("RepBlock.reparameterize: the block is already deployed (deploy=True).")
    params, stats = variables["params"], variables["batch_stats"]

    def bn(name):
      layer = BNLayer(stats[name]["mean"].shape, self.bn_options)
      return read_variables({"params": params[name], "batch_stats": stats[name]}, layer)

    branches = [
      (params[f"conv_{i}"]["kernel"], None, *bn(f"bn_{i}")) for i in range(self.num_conv_branches)
    ]
    if self.scale_branch:
      branches.append((params["scale_conv"]["kernel"], None, *bn("scale_bn")))
    if "identity_bn" in params:
      branches.append((None, None, *bn("identity_bn")))
    epsilon = self.bn_options.epsilon
    kernel, bias = fold_branches(branches, groups=self.groups, epsilon=epsilon)
    return self.clone(deploy=True), {"params": {"reparam": {"kernel": kernel, "bias": bias}}}
