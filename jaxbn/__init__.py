"""jaxbn: batch normalization for JAX, as pure functions.

The core is ``bn_init``, ``bn_train`` and ``bn_infer`` (see :mod:`jaxbn.core`);
statistics and their exact merges live in :mod:`jaxbn.numerics`;
:mod:`jaxbn.torch_port` ports PyTorch batch norms (PyTorch is imported only
when its functions are called).
"""

from jaxbn import linen
from jaxbn import models
from jaxbn import nnx
from jaxbn import numerics
from jaxbn import torch_port
from jaxbn import training
from jaxbn.core import BNParams
from jaxbn.core import BNState
from jaxbn.core import Renorm
from jaxbn.core import SingleValueWarning
from jaxbn.core import bn_infer
from jaxbn.core import bn_init
from jaxbn.core import bn_train
from jaxbn.core import renorm_schedule
from jaxbn.core import stats_dtype
from jaxbn.folding import fold_bn
from jaxbn.folding import fold_linen
from jaxbn.folding import fold_nnx
from jaxbn.folding import fold_params
from jaxbn.population import linen_population_stats
from jaxbn.population import nnx_population_stats
from jaxbn.population import population_stats
from jaxbn.torch_port import TorchSettings
from jaxbn.torch_port import from_torch
from jaxbn.torch_port import from_torch_linen
from jaxbn.torch_port import from_torch_nnx
from jaxbn.torch_port import to_torch
from jaxbn.torch_port import torch_settings
from jaxbn.training import TrainState
from jaxbn.training import bn_weight_decay_mask
from jaxbn.training import create_train_state
from jaxbn.training import eval_step
from jaxbn.training import fit
from jaxbn.training import train_step

__version__ = "0.1.0"

__all__ = (
  "BNParams",
  "BNState",
  "Renorm",
  "SingleValueWarning",
  "TorchSettings",
  "TrainState",
  "bn_infer",
  "bn_init",
  "bn_train",
  "bn_weight_decay_mask",
  "create_train_state",
  "eval_step",
  "fit",
  "fold_bn",
  "fold_linen",
  "fold_nnx",
  "fold_params",
  "from_torch",
  "from_torch_linen",
  "from_torch_nnx",
  "linen",
  "linen_population_stats",
  "models",
  "nnx",
  "nnx_population_stats",
  "numerics",
  "population_stats",
  "renorm_schedule",
  "stats_dtype",
  "to_torch",
  "torch_port",
  "torch_settings",
  "train_step",
  "training",
)
