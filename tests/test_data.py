"""load_mnist reads the Keras mnist.npz and the four IDX files, and says clearly what is wrong."""

import gzip
import struct

import numpy as np
import pytest

from jaxbn import data


def _arrays(n_train=64, n_test=16, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
    "y_train": rng.integers(0, 10, n_train).astype(np.uint8),
    "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
    "y_test": rng.integers(0, 10, n_test).astype(np.uint8),
  }


def _idx_bytes(a):
  # The IDX format written from its specification: 0, 0, type 0x08 (ubyte), ndim,
  # then each dimension as a big-endian uint32, then the bytes.
  return bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


IDX_NAMES = {
  "x_train": "train-images-idx3-ubyte",
  "y_train": "train-labels-idx1-ubyte",
  "x_test": "t10k-images-idx3-ubyte",
  "y_test": "t10k-labels-idx1-ubyte",
}


def _write_idx(directory, arrays, *, gz=False, dotted=False):
  for key, name in IDX_NAMES.items():
    if dotted:
      name = name.replace("-idx", ".idx")
    raw = _idx_bytes(arrays[key])
    if gz:
      (directory / (name + ".gz")).write_bytes(gzip.compress(raw))
    else:
      (directory / name).write_bytes(raw)


def _check_matches(ds, arrays):
  for key in ("x_train", "x_test"):
    got = getattr(ds, key)
    assert got.shape == (*arrays[key].shape, 1)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got[..., 0], arrays[key].astype(np.float64) / 255, atol=1e-7)
  for key in ("y_train", "y_test"):
    got = getattr(ds, key)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, arrays[key])


def test_keras_npz_loads_as_scaled_images_with_a_channel_axis(tmp_path):
  arrays = _arrays()
  np.savez(tmp_path / "mnist.npz", **arrays)
  ds = data.load_mnist(tmp_path / "mnist.npz")
  _check_matches(ds, arrays)
  assert ds.flat().x_train.shape == (64, 784)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dotted", [False, True])
def test_idx_directory_loads_plain_or_gzipped(tmp_path, gz, dotted):
  arrays = _arrays(seed=1)
  _write_idx(tmp_path, arrays, gz=gz, dotted=dotted)
  _check_matches(data.load_mnist(str(tmp_path)), arrays)


def test_npz_and_idx_give_the_same_dataset(tmp_path):
  arrays = _arrays(seed=2)
  np.savez_compressed(tmp_path / "mnist.npz", **arrays)
  _write_idx(tmp_path, arrays)
  a, b = data.load_mnist(tmp_path / "mnist.npz"), data.load_mnist(tmp_path)
  for u, v in zip(a, b, strict=True):
    np.testing.assert_array_equal(u, v)


def test_missing_path_names_it_and_the_expected_layouts(tmp_path):
  missing = tmp_path / "nowhere" / "mnist.npz"
  with pytest.raises(FileNotFoundError, match=r"nowhere.*does not exist.*mnist\.npz.*IDX"):
    data.load_mnist(missing)


def test_directory_without_idx_files_names_the_missing_file(tmp_path):
  arrays = _arrays()
  _write_idx(tmp_path, arrays)
  (tmp_path / "t10k-labels-idx1-ubyte").unlink()
  with pytest.raises(FileNotFoundError, match=r"no t10k-labels-idx1-ubyte"):
    data.load_mnist(tmp_path)


def test_file_that_is_not_an_npz_is_a_clear_error(tmp_path):
  bad = tmp_path / "mnist.npz"
  bad.write_bytes(b"this is not an archive")
  with pytest.raises(ValueError, match=r"cannot read .*mnist\.npz.* as an \.npz archive"):
    data.load_mnist(bad)


def test_npz_without_the_keras_keys_lists_them(tmp_path):
  arrays = _arrays()
  del arrays["y_test"]
  np.savez(tmp_path / "mnist.npz", **arrays)
  with pytest.raises(ValueError, match=r"lacks the arrays \['y_test'\]"):
    data.load_mnist(tmp_path / "mnist.npz")


def test_images_of_the_wrong_size_are_rejected(tmp_path):
  arrays = _arrays()
  arrays["x_test"] = np.zeros((16, 8, 8), np.uint8)
  np.savez(tmp_path / "mnist.npz", **arrays)
  with pytest.raises(ValueError, match=r"x_test .* has shape \(16, 8, 8\); expected \(n, 28, 28\)"):
    data.load_mnist(tmp_path / "mnist.npz")


def test_labels_must_match_the_images_and_be_digits(tmp_path):
  arrays = _arrays()
  arrays["y_train"] = arrays["y_train"][:10]
  np.savez(tmp_path / "a.npz", **arrays)
  with pytest.raises(ValueError, match=r"y_train .* expected \(64,\) integer labels"):
    data.load_mnist(tmp_path / "a.npz")
  arrays = _arrays()
  arrays["y_test"][0] = 12
  np.savez(tmp_path / "b.npz", **arrays)
  with pytest.raises(ValueError, match=r"labels in \[\d+, 12\]; expected digits 0 to 9"):
    data.load_mnist(tmp_path / "b.npz")


def test_corrupt_idx_header_and_truncated_data_are_named(tmp_path):
  arrays = _arrays()
  _write_idx(tmp_path, arrays)
  images = tmp_path / "train-images-idx3-ubyte"
  raw = images.read_bytes()
  images.write_bytes(raw[:-100])
  with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*truncated or corrupt"):
    data.load_mnist(tmp_path)
  images.write_bytes(b"\x01\x02" + raw[2:])
  with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.* bad header"):
    data.load_mnist(tmp_path)


def test_bad_gzip_is_named(tmp_path):
  _write_idx(tmp_path, _arrays(), gz=True)
  (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
  with pytest.raises(ValueError, match=r"cannot read .*t10k-images-idx3-ubyte\.gz"):
    data.load_mnist(tmp_path)


def test_truncated_or_empty_gzip_is_named(tmp_path):
  _write_idx(tmp_path, _arrays(), gz=True)
  gz = tmp_path / "train-images-idx3-ubyte.gz"
  gz.write_bytes(gz.read_bytes()[:-200])
  with pytest.raises(ValueError, match=r"cannot read .*train-images-idx3-ubyte\.gz.*ended"):
    data.load_mnist(tmp_path)
  gz.write_bytes(b"")
  with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz' is empty"):
    data.load_mnist(tmp_path)


def test_npy_instead_of_npz_is_a_clear_error(tmp_path):
  np.save(tmp_path / "mnist.npy", _arrays()["x_train"])
  with pytest.raises(ValueError, match=r"mnist\.npy' is a single \.npy array .* not an \.npz"):
    data.load_mnist(tmp_path / "mnist.npy")
