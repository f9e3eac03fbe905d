"""Data sets that run offline, and a shuffling batch iterator.

The default is scikit-learn's bundled 8x8 handwritten digits (1,797 images,
no download). Real MNIST is read only from files the user provides (see
:func:`load_mnist`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING
from typing import NamedTuple

import numpy as np

if TYPE_CHECKING:
  import os
  import pathlib

__all__ = ("Dataset", "batches", "epoch_order", "load_digits", "load_mnist")


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
    """One more than the largest label of either split."""
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
  from jaxbn.extras import require

  digits = require("sklearn.datasets", "jaxbn.data.load_digits").load_digits()
  train_test_split = require("sklearn.model_selection", "jaxbn.data.load_digits").train_test_split
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = train_test_split(
    x, y, test_size=test_fraction, random_state=seed, stratify=y
  )
  return Dataset(x_tr, y_tr, x_te, y_te)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order in which epoch ``epoch`` visits ``n`` examples.

  A pure function of ``(seed, epoch)``, so a run resumed from a checkpoint,
  or one trained elsewhere with the same seed, sees the same data.

  Examples:
    >>> from jaxbn import data
    >>> (data.epoch_order(0, 1, 5) == data.epoch_order(0, 1, 5)).all()
    np.True_
    >>> sorted(data.epoch_order(0, 1, 5).tolist())
    [0, 1, 2, 3, 4]
  """
  return np.random.default_rng([seed, epoch]).permutation(n)


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


# --------------------------------------------------------------------------
# Real MNIST, from files the user provides (nothing is downloaded).

_MNIST_KEYS = ("x_train", "y_train", "x_test", "y_test")
_IDX_FILES = {
  "x_train": "train-images-idx3-ubyte",
  "y_train": "train-labels-idx1-ubyte",
  "x_test": "t10k-images-idx3-ubyte",
  "y_test": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def load_mnist(path: str | os.PathLike[str]) -> Dataset:
  """Real MNIST from a local file: a Keras ``mnist.npz`` or the four IDX files.

  ``path`` is either

  * an ``.npz`` archive with the arrays ``x_train``, ``y_train``, ``x_test``,
    ``y_test`` (the layout of ``keras.datasets.mnist``), or
  * a directory holding ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte`` (LeCun's names; each may end in ``.gz``, and
    ``train-images.idx3-ubyte`` spellings are accepted too).

  Images are ``(n, 28, 28)`` (or ``(n, 28, 28, 1)``) bytes, scaled by 1/255;
  labels are integers in [0, 9]. The paper's Section 4.1 trains on these
  28x28 images.

  Args:
    path: a ``str`` or ``os.PathLike``.

  Returns:
    A :class:`Dataset` of ``(n, 28, 28, 1)`` float32 images in [0, 1] and
    int32 labels.

  Raises:
    FileNotFoundError: ``path``, or one of the IDX files, does not exist.
    ValueError: a file is not what is described above (the message names the
      file and what was expected).

  Examples:
    >>> import os, tempfile
    >>> import numpy as np
    >>> from jaxbn import data
    >>> rng = np.random.default_rng(0)
    >>> arrays = dict(
    ...   x_train=rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
    ...   y_train=np.arange(6, dtype=np.uint8),
    ...   x_test=rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
    ...   y_test=np.arange(4, dtype=np.uint8),
    ... )
    >>> with tempfile.TemporaryDirectory() as d:
    ...   np.savez(os.path.join(d, "mnist.npz"), **arrays)
    ...   ds = data.load_mnist(os.path.join(d, "mnist.npz"))
    >>> ds.x_train.shape, ds.x_train.dtype, ds.y_test.tolist()
    ((6, 28, 28, 1), dtype('float32'), [0, 1, 2, 3])

  References:
    LeCun, Cortes & Burges, the MNIST database (IDX format).
    Ioffe & Szegedy 2015, arXiv:1502.03167, Sec. 4.1.
  """
  import os
  import pathlib

  p = pathlib.Path(os.fspath(path)).expanduser()
  if not p.exists():
    raise FileNotFoundError(
      f"load_mnist: {str(p)!r} does not exist; expected a Keras-layout mnist.npz "
      f"(arrays {', '.join(_MNIST_KEYS)}) or a directory with the four IDX files "
      f"({', '.join(_IDX_FILES.values())}, optionally .gz)."
    )
  if p.is_dir():
    arrays = {key: _read_idx(_find_idx(p, name)) for key, name in _IDX_FILES.items()}
  else:
    arrays = _read_npz(p)
  return Dataset(
    _mnist_images(arrays["x_train"], p, "x_train"),
    _mnist_labels(arrays["y_train"], p, "y_train", len(arrays["x_train"])),
    _mnist_images(arrays["x_test"], p, "x_test"),
    _mnist_labels(arrays["y_test"], p, "y_test", len(arrays["x_test"])),
  )


def _read_npz(p: pathlib.Path) -> dict[str, np.ndarray]:
  import zipfile
  import zlib

  expected = (
    f"expected a Keras-layout mnist.npz (arrays {', '.join(_MNIST_KEYS)}) or a directory "
    f"with the four IDX files."
  )
  # What a file that is not a readable archive raises, on opening or on reading a member.
  unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
  try:
    f = np.load(p, allow_pickle=False)
  except unreadable as e:
    raise ValueError(
      f"load_mnist: cannot read {str(p)!r} as an .npz archive ({e}); {expected}"
    ) from None
  if not isinstance(f, np.lib.npyio.NpzFile):
    # np.load reads a .npy file as the one array it holds.
    raise ValueError(
      f"load_mnist: {str(p)!r} is a single .npy array of shape {np.shape(f)}, not an .npz "
      f"archive; {expected}"
    )
  with f:
    missing = [k for k in _MNIST_KEYS if k not in f.files]
    if missing:
      raise ValueError(
        f"load_mnist: {str(p)!r} lacks the arrays {missing} (it has {sorted(f.files)}); "
        f"expected the Keras mnist.npz layout with {', '.join(_MNIST_KEYS)}."
      )
    try:
      return {k: f[k] for k in _MNIST_KEYS}
    except unreadable as e:
      raise ValueError(
        f"load_mnist: cannot read {str(p)!r} as an .npz archive ({e}); {expected}"
      ) from None


def _find_idx(directory: pathlib.Path, name: str) -> pathlib.Path:
  dotted = name.replace("-idx", ".idx")
  candidates = [name, name + ".gz", dotted, dotted + ".gz"]
  for c in candidates:
    if (directory / c).is_file():
      return directory / c
  raise FileNotFoundError(
    f"load_mnist: {str(directory)!r} has no {name} (looked for {', '.join(candidates)}); "
    f"expected the four IDX files {', '.join(_IDX_FILES.values())} (optionally .gz)."
  )


def _read_idx(p: pathlib.Path) -> np.ndarray:
  """Parses one IDX file: magic ``0, 0, dtype, ndim``, big-endian int32 dims, data."""
  import gzip
  import zlib

  try:
    with gzip.open(p, "rb") if p.name.endswith(".gz") else open(p, "rb") as f:
      raw = f.read()
  # gzip.BadGzipFile is an OSError; a truncated .gz raises EOFError, corrupt data zlib.error.
  except (OSError, EOFError, zlib.error) as e:
    raise ValueError(f"load_mnist: cannot read {str(p)!r} ({e}).") from None
  if not raw:
    raise ValueError(f"load_mnist: {str(p)!r} is empty; expected an IDX file.")
  expected = "an IDX file: bytes 0, 0, a type code, the number of dimensions, then sizes and data"
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
    raise ValueError(f"load_mnist: {str(p)!r} has a bad header {raw[:4]!r}; expected {expected}.")
  ndim = raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"load_mnist: {str(p)!r} is truncated in its header; expected {expected}.")
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
  dtype = np.dtype(_IDX_DTYPES[raw[2]])
  size = int(np.prod(shape)) * dtype.itemsize
  if len(raw) - header != size:
    raise ValueError(
      f"load_mnist: {str(p)!r} holds {len(raw) - header} bytes of data, but its header "
      f"announces shape {shape} of {dtype.name} ({size} bytes); the file is truncated or corrupt."
    )
  return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def _mnist_images(x: np.ndarray, p: pathlib.Path, key: str) -> np.ndarray:
  x = np.asarray(x)
  if x.ndim == 4 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim != 3 or x.shape[1:] != (28, 28) or len(x) == 0:
    raise ValueError(
      f"load_mnist: {key} in {str(p)!r} has shape {x.shape}; expected (n, 28, 28) "
      f"or (n, 28, 28, 1) images with n >= 1."
    )
  if np.issubdtype(x.dtype, np.integer):
    if x.min() < 0 or x.max() > 255:
      raise ValueError(
        f"load_mnist: {key} in {str(p)!r} has values in [{x.min()}, {x.max()}]; "
        f"expected bytes in [0, 255]."
      )
    return (x.astype(np.float32) / np.float32(255.0))[..., None]
  if np.issubdtype(x.dtype, np.floating):
    if not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1:
      raise ValueError(
        f"load_mnist: {key} in {str(p)!r} holds floats outside [0, 1] or non-finite "
        f"values; expected bytes in [0, 255] or floats in [0, 1]."
      )
    return x.astype(np.float32)[..., None]
  raise ValueError(f"load_mnist: {key} in {str(p)!r} has dtype {x.dtype}; expected uint8 images.")


def _mnist_labels(y: np.ndarray, p: pathlib.Path, key: str, n: int) -> np.ndarray:
  y = np.asarray(y)
  if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(
      f"load_mnist: {key} in {str(p)!r} has shape {y.shape} and dtype {y.dtype}; "
      f"expected ({n},) integer labels, one per image."
    )
  if y.min() < 0 or y.max() > 9:
    raise ValueError(
      f"load_mnist: {key} in {str(p)!r} has labels in [{y.min()}, {y.max()}]; "
      f"expected digits 0 to 9."
    )
  return y.astype(np.int32)
