"""What ``jaxbn reproduce`` runs: :class:`Config`, and the data set it names."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from jaxbn import data as data_lib

# The percentiles of the watched sigmoid input recorded at each evaluation (Fig. 1(b, c)).
PERCENTILES = (15.0, 50.0, 85.0)

# What --quick changes (Config.quick): a smaller budget, the same claims.
QUICK = {"steps": 600, "eval_every": 25, "model": "mlp"}


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything :func:`jaxbn.reproduce.reproduce` needs; the defaults are the documented run.

  Attributes:
    steps: SGD steps of each MLP run.
    cnn_steps: SGD steps of each CNN run (None: ``steps``, so that every
      network has the same budget).
    seeds: seeds (weights and data order); runs are vectorized over them.
    lrs: learning rates of the MLP sweep.
    cnn_lrs: learning rates of the CNN runs.
    fig1_lr: the rate of the Figure 1 analogues (one of ``lrs``; by default
      2.0 if it is one, else the largest).
    activations: hidden activations of the MLP sweep (``'sigmoid'`` is the
      paper's, and the Figure 1 plots need it; ``'relu'`` shows the plain
      network failing at high rates).
    model: ``'mlp'``, ``'cnn'`` or ``'both'``.
    dataset: ``'digits'`` (bundled 8x8, offline) or ``'mnist'`` (from ``data``).
    data: path of ``mnist.npz`` or of the IDX directory.
    batch_size: examples per step (the paper's 60).
    init_std: std of the Gaussian initial weights of the MLP.
    cnn_features: channels of the CNN's convolution blocks.
    eval_every: steps between evaluations.
    target: test accuracy whose first crossing is reported.
    final_evals: a run's final accuracy is the mean over its last
      ``final_evals`` evaluations (one evaluation is a noisy snapshot: at
      high rates the accuracy jumps from one evaluation to the next).
    progress: show tqdm progress bars (the command line does, unless
      ``--no-progress``).

  Examples:
    >>> from jaxbn.reproduce import Config
    >>> config = Config(steps=10, seeds=(0,), lrs=(0.5,), model="mlp",
    ...                 activations=("sigmoid",), eval_every=5)
    >>> config.validate().fig1_lr is None  # resolved by reproduce: the largest rate
    True
    >>> Config(lrs=(0.1,), fig1_lr=2.0).validate()
    Traceback (most recent call last):
    ...
    ValueError: fig1_lr=2.0 must be one of lrs=[0.1].
  """

  steps: int = 2000
  cnn_steps: int | None = None
  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  lrs: tuple[float, ...] = (0.01, 0.1, 0.5, 2.0, 5.0)
  cnn_lrs: tuple[float, ...] = (0.1, 1.0)
  fig1_lr: float | None = None
  activations: tuple[str, ...] = ("sigmoid", "relu")
  model: str = "both"
  dataset: str = "digits"
  data: str | None = None
  batch_size: int = 60
  init_std: float = 0.05
  cnn_features: tuple[int, ...] = (8, 16)
  eval_every: int = 50
  target: float = 0.9
  final_evals: int = 5
  progress: bool = False

  @classmethod
  def quick(cls, **changes) -> Config:
    """The configuration of ``jaxbn reproduce --quick``, with ``changes`` applied.

    The MLPs only (no CNN), for 600 steps instead of 2,000, evaluated every
    25 steps; the same seeds, rates and claims as the full run.

    Examples:
      >>> from jaxbn.reproduce import Config
      >>> Config.quick().steps, Config.quick().model, Config.quick(seeds=(0,)).seeds
      (600, 'mlp', (0,))
    """
    return dataclasses.replace(cls(**QUICK), **changes)

  def validate(self, *, flags: Mapping[str, str] | None = None) -> Config:
    """Raises ``ValueError`` naming the first bad field; returns ``self``.

    Args:
      flags: what to call a field in the messages, e.g. ``{'fig1_lr': '--fig1-lr'}``
        (the command line passes its flags); fields not in it go by their names.

    Returns:
      ``self``.

    Examples:
      >>> from jaxbn.reproduce import Config
      >>> Config(steps=0).validate(flags={"steps": "--steps"})
      Traceback (most recent call last):
      ...
      ValueError: --steps must be a positive integer, got 0.
    """
    flags = dict(flags or {})

    def name(field: str) -> str:
      return flags.get(field, field)

    def given(field: str, value) -> str:
      return f"{flags[field]} {value}" if field in flags else f"{field}={value}"

    ints = {
      "steps": self.steps,
      "batch_size": self.batch_size,
      "eval_every": self.eval_every,
      "final_evals": self.final_evals,
    }
    if self.cnn_steps is not None:
      ints["cnn_steps"] = self.cnn_steps
    for field, v in ints.items():
      if not isinstance(v, int) or v < 1:
        raise ValueError(f"{name(field)} must be a positive integer, got {v!r}.")
    for field in ("seeds", "lrs", "cnn_lrs", "activations"):
      if not getattr(self, field):
        raise ValueError(f"{name(field)} must not be empty.")
    bad = [s for s in self.seeds if not isinstance(s, int) or s < 0]
    if bad:  # they seed NumPy's generator of the data order, which takes no negative seed
      raise ValueError(f"{name('seeds')} must be non-negative integers, got {bad}.")
    for field in ("lrs", "cnn_lrs"):
      bad = [v for v in getattr(self, field) if not (math.isfinite(v) and v > 0)]
      if bad:
        raise ValueError(f"{name(field)} must be positive finite learning rates, got {bad}.")
    if self.model not in ("mlp", "cnn", "both"):
      raise ValueError(f"{name('model')} must be 'mlp', 'cnn' or 'both', got {self.model!r}.")
    if self.dataset not in ("digits", "mnist"):
      raise ValueError(f"{name('dataset')} must be 'digits' or 'mnist', got {self.dataset!r}.")
    if self.dataset == "mnist" and not self.data:
      mnist = "--dataset mnist" if "dataset" in flags else "dataset 'mnist'"
      raise ValueError(
        f"{mnist} needs {given('data', 'PATH')}: a Keras-layout mnist.npz or a directory "
        "with the four IDX files (nothing is downloaded)."
      )
    if self.fig1_lr is not None and self.fig1_lr not in self.lrs:
      raise ValueError(
        f"{given('fig1_lr', self.fig1_lr)} must be one of {given('lrs', list(self.lrs))}."
      )
    if not 0 < self.target <= 1:
      raise ValueError(f"{name('target')} must be an accuracy in (0, 1], got {self.target}.")
    if self.init_std <= 0:
      raise ValueError(f"{name('init_std')} must be positive, got {self.init_std}.")
    return self

  def resolved(self) -> Config:
    """``self`` with ``fig1_lr`` chosen when None: 2.0 if it is one of ``lrs``, else the largest.

    Examples:
      >>> from jaxbn.reproduce import Config
      >>> Config().resolved().fig1_lr, Config(lrs=(0.1, 0.5)).resolved().fig1_lr
      (2.0, 0.5)
    """
    if self.fig1_lr is not None:
      return self
    return dataclasses.replace(self, fig1_lr=2.0 if 2.0 in self.lrs else max(self.lrs))

  @property
  def cnn_steps_(self) -> int:
    return self.cnn_steps if self.cnn_steps is not None else self.steps


def load_data(config: Config) -> tuple[data_lib.Dataset, str]:
  """The data set named by ``config`` and a short name for it.

  Raises:
    FileNotFoundError: ``config.data`` does not exist (see :func:`jaxbn.data.load_mnist`).
    ValueError: the file is not MNIST, or holds fewer training examples than
      one mini-batch (``config.batch_size``).
  """
  if config.dataset == "mnist":
    ds, name = data_lib.load_mnist(config.data), "mnist"
  else:
    ds, name = data_lib.load_digits(), "digits"
  if len(ds.x_train) < config.batch_size:
    source = repr(str(config.data)) if config.dataset == "mnist" else name
    raise ValueError(
      f"{source} holds {len(ds.x_train)} training examples, fewer than one mini-batch of "
      f"{config.batch_size}; at least {config.batch_size} are needed."
    )
  return ds, name
