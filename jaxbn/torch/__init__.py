"""Porting PyTorch batch norms (and the layers around them) to jaxbn, and back.

:func:`from_torch` turns a torch batch norm (``BatchNorm1d/2d/3d``,
``SyncBatchNorm``, timm's ``BatchNormAct2d`` and ``SplitBatchNorm2d``,
torchvision's and timm's ``FrozenBatchNorm2d``), or its state dict, into
``(BNParams, BNState)``; :func:`to_torch` writes them back. Both copy values
exactly: ``weight -> scale``, ``bias -> bias``, ``running_mean -> mean``,
``running_var -> var``, ``num_batches_tracked -> step``, in the tensors' own
dtype (float64 needs ``jax_enable_x64``), so ``torch -> jaxbn -> torch`` is
bitwise the identity.

PyTorch's conventions differ from jaxbn's default (flax's) ones;
:func:`torch_settings` gives the jaxbn arguments that reproduce torch's
training updates::

    torch                                    jaxbn
    momentum m (weight of the NEW value)     momentum = 1 - m (weight of the OLD value)
    running_var += m (n/(n-1) var_B - ...)   running_var="unbiased"
    momentum=None: 1/num_batches_tracked     momentum = step / (step + 1), step = state.step
    eps                                      epsilon
    affine=False                             scale 1, bias 0 (use_scale=use_bias=False)
    track_running_stats=False                batch statistics at evaluation too

The layouts differ too: torch activations are channel-first (NCHW; normalize
them with ``axis=1``, or move the channels last with :func:`nchw_to_nhwc`),
convolution weights ``(O, I, *spatial)`` (flax: ``(*spatial, I, O)``, see
:func:`torch_conv_kernel`) and Linear weights ``(out, in)`` (flax Dense:
``(in, out)``, see :func:`torch_linear_kernel`).

The package re-exports every public name of its modules:

* :mod:`jaxbn.torch.layer`: one layer, :func:`from_torch`, :func:`to_torch`,
  :func:`torch_settings` (:class:`TorchSettings`) and :data:`PORTED_COUNT`;
* :mod:`jaxbn.torch.bridges`: the flax modules, :func:`from_torch_linen`,
  :func:`to_torch_linen`, :func:`from_torch_nnx` and :func:`to_torch_nnx`;
* :mod:`jaxbn.torch.layouts`: :func:`torch_conv_kernel`,
  :func:`torch_linear_kernel`, :func:`nchw_to_nhwc` and :func:`nhwc_to_nchw`;
* :mod:`jaxbn.torch.models`: whole models, :func:`from_torch_model` (any
  model, with a ``rename`` of its layers), :func:`from_torch_resnet` (a
  torchvision or timm ResNet into :class:`jaxbn.models.ResNet`, one call)
  and :func:`resnet_rename`.

PyTorch is needed only to call these functions: neither ``import jaxbn`` nor
``import jaxbn.torch`` imports it. (This package is ``jaxbn.torch``; ``torch``
is always PyTorch itself, as every import in jaxbn is absolute.)
"""

from jaxbn.torch.bridges import from_torch_linen
from jaxbn.torch.bridges import from_torch_nnx
from jaxbn.torch.bridges import to_torch_linen
from jaxbn.torch.bridges import to_torch_nnx
from jaxbn.torch.layer import PORTED_COUNT
from jaxbn.torch.layer import TorchSettings
from jaxbn.torch.layer import from_torch
from jaxbn.torch.layer import to_torch
from jaxbn.torch.layer import torch_settings
from jaxbn.torch.layouts import nchw_to_nhwc
from jaxbn.torch.layouts import nhwc_to_nchw
from jaxbn.torch.layouts import torch_conv_kernel
from jaxbn.torch.layouts import torch_linear_kernel
from jaxbn.torch.models import from_torch_model
from jaxbn.torch.models import from_torch_resnet
from jaxbn.torch.models import resnet_rename

__all__ = (
  "PORTED_COUNT",
  "TorchSettings",
  "from_torch",
  "from_torch_linen",
  "from_torch_model",
  "from_torch_nnx",
  "from_torch_resnet",
  "nchw_to_nhwc",
  "nhwc_to_nchw",
  "resnet_rename",
  "to_torch",
  "to_torch_linen",
  "to_torch_nnx",
  "torch_conv_kernel",
  "torch_linear_kernel",
  "torch_settings",
)
