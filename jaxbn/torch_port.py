"""The old name of :mod:`jaxbn.torch`, kept for one release.

The PyTorch port was this one module before it became the package
:mod:`jaxbn.torch`, which has its public names (and later ones). Importing
``jaxbn.torch_port`` warns with a :class:`FutureWarning` (shown by default,
whichever frame the import machinery charges it to) and re-exports
them: ``from jaxbn.torch_port import from_torch`` becomes
``from jaxbn.torch import from_torch``.
"""

import warnings

from jaxbn.torch import PORTED_COUNT
from jaxbn.torch import TorchSettings
from jaxbn.torch import from_torch
from jaxbn.torch import from_torch_linen
from jaxbn.torch import from_torch_model
from jaxbn.torch import from_torch_nnx
from jaxbn.torch import nchw_to_nhwc
from jaxbn.torch import nhwc_to_nchw
from jaxbn.torch import to_torch
from jaxbn.torch import to_torch_linen
from jaxbn.torch import to_torch_nnx
from jaxbn.torch import torch_conv_kernel
from jaxbn.torch import torch_linear_kernel
from jaxbn.torch import torch_settings

# stacklevel=2: the module that imports this one (the import machinery's frames are skipped).
warnings.warn(
  "jaxbn.torch_port is deprecated: use jaxbn.torch (same names)", FutureWarning, stacklevel=2
)

__all__ = (
  "PORTED_COUNT",
  "TorchSettings",
  "from_torch",
  "from_torch_linen",
  "from_torch_model",
  "from_torch_nnx",
  "nchw_to_nhwc",
  "nhwc_to_nchw",
  "to_torch",
  "to_torch_linen",
  "to_torch_nnx",
  "torch_conv_kernel",
  "torch_linear_kernel",
  "torch_settings",
)
