"""Data sets that run offline, and a shuffling batch iterator.

The default is scikit-learn's bundled 8x8 handwritten digits (1,797 images,
no download). Real MNIST is read only from files the user provides (see
:func:`load_mnist`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
  """A train/test split as NumPy arrays.

  Attributes:
    x_train: float32 images, ``(n, H, W, 1)`` scaled to [0, 1].
    y_train: int32 labels, ``(n,)``.
    x_test: float32 images, ``(m, H, W, 1)``.
    y_test: int32 labels, ``(m,)``.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray

  @property
  def num_classes(self) -> int:
    return int(max(self.y_train.max(), self.y_test.max())) + 1

  def flat(self) -> Dataset:
    """The same split with each image flattened to a vector (for an MLP)."""
    return Dataset(
      self.x_train.reshape(len(self.x_train), -1),
      self.y_train,
      self.x_test.reshape(len(self.x_test), -1),
      self.y_test,
    )


def load_digits(*, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
  """scikit-learn's bundled 8x8 digits, shuffled and split (stratified).

  Args:
    test_fraction: share of the 1,797 images held out for testing.
    seed: seed of the shuffle.

  Returns:
    A :class:`Dataset` of ``(n, 8, 8, 1)`` float32 images in [0, 1].

  Examples:
    >>> from jaxbn import data
    >>> ds = data.load_digits()
    >>> ds.x_train.shape, ds.x_test.shape, ds.num_classes
    ((1347, 8, 8, 1), (450, 8, 8, 1), 10)
  """
  from sklearn.datasets import load_digits as _sk_load_digits
  from sklearn.model_selection import train_test_split

  digits = _sk_load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = train_test_split(
    x, y, test_size=test_fraction, random_state=seed, stratify=y
  )
  return Dataset(x_tr, y_tr, x_te, y_te)


def batches(
  x: np.ndarray,
  y: np.ndarray,
  batch_size: int,
  *,
  rng: np.random.Generator | None = None,
  drop_remainder: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One epoch of mini-batches, shuffled when ``rng`` is given.

  Examples:
    >>> import numpy as np
    >>> from jaxbn import data
    >>> x, y = np.arange(10.0)[:, None], np.arange(10)
    >>> [len(b) for b, _ in data.batches(x, y, 4)]
    [4, 4]
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  if len(x) != len(y):
    raise ValueError(f"x and y differ in length: {len(x)} and {len(y)}.")
  order = rng.permutation(len(x)) if rng is not None else np.arange(len(x))
  stop = len(x) - len(x) % batch_size if drop_remainder else len(x)
  for start in range(0, stop, batch_size):
    idx = order[start : start + batch_size]
    yield x[idx], y[idx]
