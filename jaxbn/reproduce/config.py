"""What ``jaxbn reproduce`` runs: :class:`Config`, its :class:`Network` s, and the data set."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple
from typing import cast

from jaxbn import BNOptions
from jaxbn import data as data_lib

PERCENTILES = (15.0, 50.0, 85.0)
"""The percentiles of the watched sigmoid input recorded at each evaluation (Fig. 1(b, c))."""

# What --quick changes (Config.quick): a smaller budget, the same claims.
QUICK = {"steps": 600, "eval_every": 25, "model": "mlp"}

_ACTIVATION_TITLES = {"relu": "ReLU"}


class Network(NamedTuple):
  """One network of a reproduction; records and tables name it by :attr:`name`.

  Attributes:
    kind: ``'mlp'`` or ``'cnn'``.
    activation: the hidden activation (``'sigmoid'``, ``'relu'``, ``'tanh'``).
    bn: whether it has batch norm.

  Examples:
    >>> from jaxbn.reproduce.config import Network
    >>> net = Network.parse("mlp-sigmoid-BN")
    >>> net.bn, net.name, net.family, net.title, net.with_bn(False).name
    (True, 'mlp-sigmoid-BN', 'mlp-sigmoid', 'sigmoid MLP', 'mlp-sigmoid-plain')
    >>> Network("cnn", "relu", False).title
    'CNN'
  """

  kind: str
  activation: str
  bn: bool

  @classmethod
  def parse(cls, name: str) -> Network:
    """The network a record names, e.g. ``'mlp-relu-plain'``; ``ValueError`` otherwise."""
    parts = name.split("-")
    if len(parts) != 3 or parts[0] not in ("mlp", "cnn") or parts[2] not in ("BN", "plain"):
      raise ValueError(f"not a network name of the form 'mlp-sigmoid-BN': {name!r}.")
    return cls(parts[0], parts[1], parts[2] == "BN")

  @property
  def name(self) -> str:
    """``kind-activation-BN`` or ``kind-activation-plain``."""
    return f"{self.family}-{'BN' if self.bn else 'plain'}"

  @property
  def family(self) -> str:
    """The name without its batch norm, ``kind-activation``: a row of the report's table."""
    return f"{self.kind}-{self.activation}"

  @property
  def title(self) -> str:
    """What figures and the report call it: ``'sigmoid MLP'``, ``'ReLU MLP'``, ``'CNN'``."""
    if self.kind == "cnn":
      return "CNN"
    return f"{_ACTIVATION_TITLES.get(self.activation, self.activation)} MLP"

  def with_bn(self, bn: bool) -> Network:
    """The same network with (True) or without (False) batch norm."""
    return self._replace(bn=bn)


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
    momentum: batch norm's momentum of the running averages, in ``[0, 1)``
      (default: :class:`jaxbn.BNOptions`'s).
    epsilon: batch norm's epsilon, positive (default: :class:`jaxbn.BNOptions`'s).
    eval_every: when to evaluate: at step 0, after every ``eval_every``-th
      step and after the last (:func:`jaxbn.engine.eval_points`).
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
  momentum: float = cast(float, BNOptions().momentum)  # BNOptions' default, a number
  epsilon: float = BNOptions().epsilon
  eval_every: int = 50
  target: float = 0.9
  final_evals: int = 5
  progress: bool = False

  @classmethod
  def quick(cls, **changes: Any) -> Config:
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

    def given(field: str, value: Any) -> str:
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
    if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
      raise ValueError(f"{name('momentum')} must be a number in [0, 1), got {self.momentum}.")
    if not (isinstance(self.epsilon, (int, float)) and 0 < self.epsilon < math.inf):
      raise ValueError(f"{name('epsilon')} must be a positive number, got {self.epsilon}.")
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

  def steps_of(self, network: Network | str) -> int:
    """The SGD steps of ``network``'s runs: ``cnn_steps`` for a CNN if set, else ``steps``.

    Examples:
      >>> from jaxbn.reproduce import Config
      >>> Config(steps=10).steps_of("cnn-relu-BN"), Config(cnn_steps=5).steps_of("cnn-relu-BN")
      (10, 5)
    """
    if isinstance(network, str):
      network = Network.parse(network)
    if network.kind == "cnn" and self.cnn_steps is not None:
      return self.cnn_steps
    return self.steps

  @property
  def bn_options(self) -> BNOptions:
    """The batch-norm options of every network with batch norm."""
    return BNOptions(momentum=self.momentum, epsilon=self.epsilon)

  @classmethod
  def from_record(cls, record: Mapping[str, Any]) -> Config:
    """The configuration a ``results.json`` holds (lists as tuples).

    Fields a record lacks take their defaults: a record written before the
    command line took ``--momentum`` and ``--epsilon`` ran with
    :class:`jaxbn.BNOptions`'s, which are the defaults.

    Examples:
      >>> import dataclasses, json
      >>> from jaxbn.reproduce import Config
      >>> record = json.loads(json.dumps(dataclasses.asdict(Config.quick())))
      >>> del record["momentum"]
      >>> Config.from_record(record) == Config.quick()
      True
    """
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {
      k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in names
    }
    return cls(**kwargs)


def load_data(config: Config) -> tuple[data_lib.Dataset, str]:
  """The data set named by ``config`` and a short name for it.

  Raises:
    FileNotFoundError: ``config.data`` does not exist (see :func:`jaxbn.data.load_mnist`).
    ValueError: the file is not MNIST, or holds fewer training examples than
      one mini-batch (``config.batch_size``).
  """
  if config.dataset == "mnist":
    # Config.validate requires data for mnist.
    ds, name = data_lib.load_mnist(cast(str, config.data)), "mnist"
  else:
    ds, name = data_lib.load_digits(), "digits"
  if len(ds.x_train) < config.batch_size:
    source = repr(str(config.data)) if config.dataset == "mnist" else name
    raise ValueError(
      f"{source} holds {len(ds.x_train)} training examples, fewer than one mini-batch of "
      f"{config.batch_size}; at least {config.batch_size} are needed."
    )
  return ds, name
