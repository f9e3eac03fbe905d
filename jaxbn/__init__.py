"""jaxbn: batch normalization for JAX, as pure functions.

The pure core imports only jax, chex and numpy: ``bn_init``, ``bn_train`` and
``bn_infer`` (:mod:`jaxbn.core`), statistics and their exact merges
(:mod:`jaxbn.numerics`), one layer's variables in every form
(:class:`BNLayer`, :mod:`jaxbn.layer`), population statistics
(:mod:`jaxbn.population`) and folding one layer (:mod:`jaxbn.folding`); assertions for
tests built on chex (:mod:`jaxbn.testing`) load on first use.
Everything built on frameworks is imported on first use: the flax shells (:mod:`jaxbn.linen`,
:mod:`jaxbn.nnx`), models (:mod:`jaxbn.models`), optax training
(:mod:`jaxbn.training`), the PyTorch port (:mod:`jaxbn.torch`), the Equinox
module (:mod:`jaxbn.equinox`), so
``import jaxbn`` loads none of flax, optax, orbax, scikit-learn, matplotlib,
tqdm, torch or equinox.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING
from typing import Any

from jaxbn import layer
from jaxbn import numerics
from jaxbn.core import BNAccState
from jaxbn.core import BNOptions
from jaxbn.core import BNParams
from jaxbn.core import BNState
from jaxbn.core import Renorm
from jaxbn.core import RunningStatsWarning
from jaxbn.core import SingleValueWarning
from jaxbn.core import bn_infer
from jaxbn.core import bn_init
from jaxbn.core import bn_moments
from jaxbn.core import bn_train
from jaxbn.core import bn_update
from jaxbn.core import checkpoint_names
from jaxbn.core import renorm_schedule
from jaxbn.folding import fold_bn
from jaxbn.folding import fold_branches
from jaxbn.layer import BNLayer
from jaxbn.numerics import stats_dtype
from jaxbn.population import population_stats

# The lazy names below (_LAZY), for type checkers; at run time __getattr__ imports them.
if TYPE_CHECKING:
  from jaxbn import cli as cli
  from jaxbn import data as data
  from jaxbn import diagnosis as diagnosis
  from jaxbn import engine as engine
  from jaxbn import equinox as equinox
  from jaxbn import linen as linen
  from jaxbn import models as models
  from jaxbn import nnx as nnx
  from jaxbn import reproduce as reproduce
  from jaxbn import testing as testing
  from jaxbn import torch as torch
  from jaxbn import torch_port as torch_port
  from jaxbn import training as training
  from jaxbn.diagnosis import diagnose as diagnose
  from jaxbn.linen import fold_linen as fold_linen
  from jaxbn.linen import linen_population_stats as linen_population_stats
  from jaxbn.models import fold_params as fold_params
  from jaxbn.nnx import fold_nnx as fold_nnx
  from jaxbn.nnx import nnx_population_stats as nnx_population_stats
  from jaxbn.torch import TorchSettings as TorchSettings
  from jaxbn.torch import from_torch as from_torch
  from jaxbn.torch import from_torch_linen as from_torch_linen
  from jaxbn.torch import from_torch_nnx as from_torch_nnx
  from jaxbn.torch import to_torch as to_torch
  from jaxbn.torch import torch_settings as torch_settings
  from jaxbn.training import TrainState as TrainState
  from jaxbn.training import bn_weight_decay_mask as bn_weight_decay_mask
  from jaxbn.training import create_train_state as create_train_state
  from jaxbn.training import eval_step as eval_step
  from jaxbn.training import fit as fit
  from jaxbn.training import train_step as train_step

__version__ = "0.3.0"

# Lazy names reachable as attributes but left out of dir() and `from jaxbn import *`:
# equinox needs its extra to import; torch_port is jaxbn.torch's deprecated old name.
_NOT_STARRED = {"equinox", "torch_port"}

# Public names loaded on first use: name -> (module, attribute or None for the module).
_LAZY: dict[str, tuple[str, str | None]] = {
  "cli": ("jaxbn.cli", None),
  "data": ("jaxbn.data", None),
  "diagnosis": ("jaxbn.diagnosis", None),
  "diagnose": ("jaxbn.diagnosis", "diagnose"),
  "engine": ("jaxbn.engine", None),
  "linen": ("jaxbn.linen", None),
  "models": ("jaxbn.models", None),
  "nnx": ("jaxbn.nnx", None),
  "reproduce": ("jaxbn.reproduce", None),
  "torch": ("jaxbn.torch", None),
  "equinox": ("jaxbn.equinox", None),
  "torch_port": ("jaxbn.torch_port", None),
  "testing": ("jaxbn.testing", None),
  "training": ("jaxbn.training", None),
  "linen_population_stats": ("jaxbn.linen", "linen_population_stats"),
  "nnx_population_stats": ("jaxbn.nnx", "nnx_population_stats"),
  "fold_linen": ("jaxbn.linen", "fold_linen"),
  "fold_nnx": ("jaxbn.nnx", "fold_nnx"),
  "fold_params": ("jaxbn.models", "fold_params"),
  "TrainState": ("jaxbn.training", "TrainState"),
  "bn_weight_decay_mask": ("jaxbn.training", "bn_weight_decay_mask"),
  "create_train_state": ("jaxbn.training", "create_train_state"),
  "eval_step": ("jaxbn.training", "eval_step"),
  "fit": ("jaxbn.training", "fit"),
  "train_step": ("jaxbn.training", "train_step"),
  "TorchSettings": ("jaxbn.torch", "TorchSettings"),
  "from_torch": ("jaxbn.torch", "from_torch"),
  "from_torch_linen": ("jaxbn.torch", "from_torch_linen"),
  "from_torch_nnx": ("jaxbn.torch", "from_torch_nnx"),
  "to_torch": ("jaxbn.torch", "to_torch"),
  "torch_settings": ("jaxbn.torch", "torch_settings"),
}


def __getattr__(name: str) -> Any:
  if name not in _LAZY:
    raise AttributeError(f"module 'jaxbn' has no attribute {name!r}")
  module, attr = _LAZY[name]
  value = importlib.import_module(module)
  if attr is not None:
    value = getattr(value, attr)
  globals()[name] = value  # later lookups skip this function
  return value


def __dir__() -> list[str]:
  # Not the names whose import needs an extra or warns: dir() and inspect.getmembers work
  # on a core install and stay quiet.
  return sorted(set(globals()) | (set(_LAZY) - _NOT_STARRED))


# Every public name: the imports above and _LAZY's, less _NOT_STARRED (tests/test_api.py
# checks that the three agree).
__all__ = (
  "BNAccState",
  "BNLayer",
  "BNOptions",
  "BNParams",
  "BNState",
  "Renorm",
  "RunningStatsWarning",
  "SingleValueWarning",
  "TorchSettings",
  "TrainState",
  "bn_infer",
  "bn_init",
  "bn_moments",
  "bn_train",
  "bn_update",
  "bn_weight_decay_mask",
  "checkpoint_names",
  "cli",
  "create_train_state",
  "data",
  "diagnose",
  "diagnosis",
  "engine",
  "eval_step",
  "fit",
  "fold_bn",
  "fold_branches",
  "fold_linen",
  "fold_nnx",
  "fold_params",
  "from_torch",
  "from_torch_linen",
  "from_torch_nnx",
  "layer",
  "linen",
  "linen_population_stats",
  "models",
  "nnx",
  "nnx_population_stats",
  "numerics",
  "population_stats",
  "renorm_schedule",
  "reproduce",
  "stats_dtype",
  "testing",
  "to_torch",
  "torch",
  "torch_settings",
  "train_step",
  "training",
)
