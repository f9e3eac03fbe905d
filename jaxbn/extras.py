"""The optional dependencies: which extra installs each, and one import that names it.

``pip install jaxbn`` installs what the core and the flax modules need (jax,
jaxlib, chex, numpy, flax, optax). The rest comes with an extra:

* ``jaxbn[train]``: orbax-checkpoint (:func:`jaxbn.training.save_checkpoint`,
  :func:`~jaxbn.training.restore_checkpoint`) and tqdm (``progress=True``);
* ``jaxbn[reproduce]``: scikit-learn (the digits data set,
  :func:`jaxbn.data.load_digits`), matplotlib (the figures) and tqdm, for
  ``jaxbn reproduce``;
* ``jaxbn[torch]``: PyTorch (:mod:`jaxbn.torch`);
* ``jaxbn[equinox]``: Equinox (:mod:`jaxbn.equinox`);
* ``jaxbn[deploy]``: qwix, jax2onnx and onnxruntime (:mod:`jaxbn.deploy`);
* ``jaxbn[all]``: all of the above but PyTorch and the deployment tools.

Every import of one of these packages in jaxbn goes through :func:`require`,
at the point of use, so that ``import jaxbn`` needs none of them and a missing
one is an ``ImportError`` that names the function, the package and the extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ("OPTIONAL", "MissingExtraError", "require")


class MissingExtraError(ImportError):
  """An optional dependency is not installed; the message names the extra that installs it."""


OPTIONAL: dict[str, tuple[str, str]] = {
  "orbax": ("orbax-checkpoint", "train"),
  "tqdm": ("tqdm", "train"),
  "sklearn": ("scikit-learn", "reproduce"),
  "matplotlib": ("matplotlib", "reproduce"),
  "torch": ("torch", "torch"),
  "equinox": ("equinox", "equinox"),
  "qwix": ("qwix", "deploy"),
  "jax2onnx": ("jax2onnx", "deploy"),
}
"""Each optional top-level module: (the distribution that provides it, the extra installing it)."""


def require(module: str, what: str) -> ModuleType:
  """Imports ``module``, an optional dependency, for ``what``.

  Args:
    module: the module to import, e.g. ``'orbax.checkpoint'``; its top-level
      package must be one of :data:`OPTIONAL`.
    what: the function or feature that needs it, for the error message.

  Returns:
    The imported module.

  Raises:
    MissingExtraError: (an ``ImportError``) the package is not installed;
      the message names ``what``, the distribution and the extra that
      installs it, e.g.
      ``jaxbn.data.load_digits needs scikit-learn: pip install 'jaxbn[reproduce]'``.
      An error raised while importing an installed package propagates as it is.

  Examples:
    >>> from jaxbn.extras import require
    >>> require('tqdm.auto', 'progress=True').__name__
    'tqdm.auto'
  """
  top = module.partition(".")[0]
  if top not in OPTIONAL:
    raise ValueError(f"require: {module!r} is not an optional dependency of jaxbn ({OPTIONAL})")
  distribution, extra = OPTIONAL[top]
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name is None or e.name.partition(".")[0] != top:
      raise  # the package is there but one of its own dependencies is not
    raise MissingExtraError(f"{what} needs {distribution}: pip install 'jaxbn[{extra}]'") from e
