"""MLP and CNN classifiers with batch norm: in flax.linen, flax.nnx, and plain JAX.

Every model places batch norm as the paper does, between the affine map and
the nonlinearity, ``z = g(BN(W u))``, and drops the affine bias when batch
norm follows it (``beta`` takes its role). ``use_bn=False`` gives the same
network without batch norm, its affine layers with their bias. The head
returns logits; the softmax lives in the loss
(``optax.softmax_cross_entropy_with_integer_labels``).

Three versions with the same hyper-parameters:

- linen: :class:`MLP`, :class:`CNN`, called as
  ``model.apply(variables, x, train=...)``;
- nnx: :class:`NNXMLP`, :class:`NNXCNN`, switched with ``.train()`` /
  ``.eval()`` or ``model(x, train=...)``;
- plain functions of ``(params, state, x)`` calling :func:`jaxbn.bn_train` /
  :func:`jaxbn.bn_infer` directly: :func:`init_mlp` / :func:`apply_mlp` and
  :func:`init_cnn` / :func:`apply_cnn`.

And ResNets with torchvision's structure and layer names, in linen
(:class:`ResNet`, :func:`resnet18`, :func:`resnet34`, :func:`resnet50`,
:func:`resnet101`; :mod:`jaxbn.models.resnet`), into which
:func:`jaxbn.torch.from_torch_resnet` ports torchvision's and timm's; and
:class:`RepBlock`, a RepVGG/MobileOne block of parallel conv + batch-norm
branches that folds into one convolution (:mod:`jaxbn.models.repvgg`).

Every model takes its batch-norm options as one :class:`jaxbn.BNOptions`
(``bn_options=BNOptions(momentum=0.9, axis_name='batch')``), passed as it is
to every batch-norm layer (``BatchNorm(options=...)``).

Their batch norms fold with :func:`jaxbn.linen.fold_linen`,
:func:`jaxbn.nnx.fold_nnx` (the models say which layers pair through their
``fold_pairs`` and ``without_batch_norm`` methods) and :func:`fold_params`.

The input of the hidden units (after batch norm, before the activation) of
every hidden layer is sown into the ``'intermediates'`` collection under the
name ``'preactivation'``, one entry per hidden layer in order (linen: pass
``mutable=['intermediates']``; nnx: ``nnx.capture(nnx.Intermediate)``); the
functional ``apply_*`` return them when ``return_preactivations=True``. The
last hidden layer's is ``[...]['preactivation'][-1]`` (Fig. 1(b, c) of the
paper plots its percentiles over training).

References:
  Ioffe & Szegedy, "Batch Normalization", ICML 2015, arXiv:1502.03167,
  Sec. 3.2 (placement, convolutions) and Sec. 4.1 (the MNIST network:
  three hidden layers of 100 sigmoid units).
"""

import importlib
import warnings
from typing import Any

from jaxbn.models.common import PREACTIVATION
from jaxbn.models.functional import apply_cnn
from jaxbn.models.functional import apply_mlp
from jaxbn.models.functional import fold_params
from jaxbn.models.functional import init_cnn
from jaxbn.models.functional import init_mlp
from jaxbn.models.linen import CNN
from jaxbn.models.linen import MLP
from jaxbn.models.nnx import NNXCNN
from jaxbn.models.nnx import NNXMLP
from jaxbn.models.repvgg import RepBlock
from jaxbn.models.resnet import ResNet
from jaxbn.models.resnet import resnet18
from jaxbn.models.resnet import resnet34
from jaxbn.models.resnet import resnet50
from jaxbn.models.resnet import resnet101

__all__ = (
  "CNN",
  "MLP",
  "NNXCNN",
  "NNXMLP",
  "PREACTIVATION",
  "RepBlock",
  "ResNet",
  "apply_cnn",
  "apply_mlp",
  "fold_params",
  "init_cnn",
  "init_mlp",
  "resnet18",
  "resnet34",
  "resnet50",
  "resnet101",
)

# 0.2's names of the folds, now in their framework's module: name -> module (one release).
_MOVED = {
  "fold_linen": "jaxbn.linen",
  "FoldedLinen": "jaxbn.linen",
  "fold_nnx": "jaxbn.nnx",
  "FoldedBatchNorm": "jaxbn.nnx",
}


def __getattr__(name: str) -> Any:
  if name not in _MOVED:
    raise AttributeError(f"module 'jaxbn.models' has no attribute {name!r}")
  warnings.warn(
    f"jaxbn.models.{name} is deprecated: use {_MOVED[name]}.{name} (the same object)",
    FutureWarning,
    stacklevel=2,
  )
  return getattr(importlib.import_module(_MOVED[name]), name)
