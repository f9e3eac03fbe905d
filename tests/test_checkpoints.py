"""save_checkpoint / restore_checkpoint: relative paths, failed saves, damaged checkpoints."""

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbn import models
from jaxbn import training
from jaxbn.training.checkpoints import CheckpointError


def _state(features=(4,), tx=None):
  return training.create_train_state(
    models.MLP(features=features), tx or optax.adam(1e-3), jnp.ones((1, 3))
  )


def _files(root: pathlib.Path):
  return sorted(p for p in root.rglob("*") if p.is_file())


def _assert_same(a, b):
  # A restore reads back the bytes that were written: the same arrays, bit for bit.
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(u, v)


def _assert_orbax_quiet(caplog, capfd):
  assert not [r for r in caplog.records if f"{os.sep}orbax{os.sep}" in r.pathname]
  err = capfd.readouterr().err
  assert "Traceback" not in err, err


@pytest.fixture(name="saved")
def _saved(tmp_path):
  state = _state()
  path = tmp_path / "ckpt"
  training.save_checkpoint(path, state)
  return state, path


def test_relative_path_is_taken_from_the_working_directory(tmp_path, monkeypatch, caplog, capfd):
  monkeypatch.chdir(tmp_path)
  state = _state()
  training.save_checkpoint("ckpt", state)
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]
  restored = training.restore_checkpoint(pathlib.Path("ckpt"), _state())
  _assert_same(restored.params, state.params)
  _assert_same(restored.opt_state, state.opt_state)
  _assert_orbax_quiet(caplog, capfd)


def test_existing_directory_is_not_overwritten(saved):
  state, path = saved
  before = _files(path)
  with pytest.raises(FileExistsError, match=f"save_checkpoint: {path} exists already"):
    training.save_checkpoint(path, state)
  assert _files(path) == before


def test_failed_save_leaves_nothing_and_prints_no_thread_tracebacks(
  tmp_path, monkeypatch, caplog, capfd
):
  from orbax.checkpoint._src.serialization import tensorstore_utils

  def broken(*args, **kwargs):
    raise OSError("disk full")

  # Fails inside orbax's background writer threads, as a full disk would.
  monkeypatch.setattr(tensorstore_utils, "build_kvstore_tspec", broken)
  path = tmp_path / "sub" / "ckpt"
  with pytest.raises(RuntimeError, match=rf"saving to {path} failed.*disk full.*nothing"):
    training.save_checkpoint(path, _state())
  assert os.listdir(tmp_path) == []
  _assert_orbax_quiet(caplog, capfd)


def _damage_and_restore(path, damage, caplog, capfd):
  damage(path)
  with pytest.raises(CheckpointError, match=f"checkpoint at {path} is damaged, truncated or"):
    training.restore_checkpoint(path, _state())
  _assert_orbax_quiet(caplog, capfd)


def _truncate(files):
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)


@pytest.mark.parametrize(
  "damage",
  [
    pytest.param(lambda p: _truncate(_files(p)), id="every-file-cut-in-half"),
    pytest.param(lambda p: _truncate(_files(p / "d")), id="data-cut-in-half"),
    pytest.param(lambda p: (p / "_METADATA").unlink(), id="metadata-missing"),
    pytest.param(lambda p: (p / "manifest.ocdbt").unlink(), id="manifest-missing"),
    pytest.param(lambda p: [f.unlink() for f in _files(p / "d")], id="data-missing"),
  ],
)
def test_damaged_checkpoint_is_one_clear_error(saved, damage, caplog, capfd):
  _damage_and_restore(saved[1], damage, caplog, capfd)


def test_unfinished_save_is_an_incomplete_checkpoint(saved, caplog, capfd):
  _, path = saved
  tmp = path.with_name(path.name + ".orbax-checkpoint-tmp")
  path.rename(tmp)
  with pytest.raises(CheckpointError, match="temporary directory of a save that never finished"):
    training.restore_checkpoint(tmp, _state())


def test_missing_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"no checkpoint at {tmp_path / 'none'}"):
    training.restore_checkpoint(tmp_path / "none", _state())


@pytest.mark.parametrize(
  "template, differs",
  [
    (
      lambda: _state(features=(5,)),
      r"BatchNorm_0/mean: checkpoint float32\[4\], template float32\[5\]",
    ),
    (lambda: _state(features=(4, 4)), "batch_stats/BatchNorm_1/mean: checkpoint absent"),
    (lambda: _state(tx=optax.sgd(0.1)), "opt_state/0/count: checkpoint int32"),
  ],
  ids=["wider", "deeper", "other-optimizer"],
)
def test_restoring_into_another_model_names_the_arrays(saved, template, differs, caplog, capfd):
  _, path = saved
  with pytest.raises(CheckpointError, match=f"(?s){path} holds another model.*{differs}"):
    training.restore_checkpoint(path, template())
  _assert_orbax_quiet(caplog, capfd)
