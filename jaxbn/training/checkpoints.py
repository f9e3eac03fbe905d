"""Saving and restoring a :class:`~jaxbn.training.TrainState` with orbax (imported on use)."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import sys
import traceback
from types import TracebackType
from typing import Any

import jax

from jaxbn.extras import require
from jaxbn.training.state import TrainState


class CheckpointError(ValueError):
  """A checkpoint that cannot be restored: damaged, truncated, incomplete or of another model."""


def _saved(state: TrainState) -> dict:
  return {
    "step": state.step,
    "params": state.params,
    "batch_stats": state.batch_stats,
    "opt_state": state.opt_state,
  }


def _path(directory: str | os.PathLike) -> str:
  # orbax wants absolute paths; a relative one is taken from the working directory, as open() does.
  return os.path.abspath(os.path.expanduser(os.fspath(directory)))


class _DropOrbaxRecords(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" not in record.pathname


def _is_late_tensorstore_callback(
  exc_type: type[BaseException], exc: BaseException | None, tb: TracebackType | None
) -> bool:
  # tensorstore completes the reads of a failed orbax call on its own threads
  # after orbax has closed its event loop; each completion then fails to
  # schedule its callback and is printed through sys.excepthook.
  if exc_type is not RuntimeError or str(exc) != "Event loop is closed":
    return False
  frames = [f.f_code.co_name for f, _ in traceback.walk_tb(tb)]
  return "call_soon_threadsafe" in frames


def _install_excepthook_filter() -> None:
  # Both hooks: tensorstore reports through one or the other depending on the
  # thread state; everything else goes on to the hook that was there before.
  previous = sys.excepthook
  if not getattr(previous, "_jaxbn_filter", False):

    def excepthook(
      exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
    ) -> None:
      if not _is_late_tensorstore_callback(exc_type, exc, tb):
        previous(exc_type, exc, tb)

    excepthook.__dict__["_jaxbn_filter"] = True  # the mark read above
    sys.excepthook = excepthook
  previous_unraisable = sys.unraisablehook
  if not getattr(previous_unraisable, "_jaxbn_filter", False):

    def unraisablehook(u: sys.UnraisableHookArgs) -> None:
      if not _is_late_tensorstore_callback(u.exc_type, u.exc_value, u.exc_traceback):
        previous_unraisable(u)

    unraisablehook.__dict__["_jaxbn_filter"] = True
    sys.unraisablehook = unraisablehook


@contextlib.contextmanager
def _orbax_quiet():
  """Keeps orbax's background-thread logs (tracebacks of a failed save) from the user.

  orbax logs every failure of its worker threads through absl (the ``absl``
  logger) with the whole traceback, and then raises the same error in the
  calling thread. The caller gets that error, with its cause, from us; the
  log lines would only repeat it, a hundred lines long.
  """
  _install_excepthook_filter()
  drop = _DropOrbaxRecords()
  loggers = [logging.getLogger("absl"), logging.getLogger("asyncio")]
  for logger in loggers:
    logger.addFilter(drop)
  try:
    yield
  finally:
    for logger in loggers:
      logger.removeFilter(drop)


def save_checkpoint(directory: str | os.PathLike, state: TrainState) -> None:
  """Saves ``state`` (step, params, batch_stats, opt_state) with orbax.

  Args:
    directory: the checkpoint's directory, created; it must not exist yet. A
      relative path is taken from the working directory.
    state: the :class:`TrainState` (``apply_fn`` and ``tx`` are code, not
      saved: :func:`restore_checkpoint` takes them from a template).

  With several processes every process calls it with the same global state
  and the same directory (each writes the shards it holds).

  Raises:
    FileExistsError: ``directory`` exists already.
    RuntimeError: orbax failed to write; nothing is left behind.
  """
  ocp = require("orbax.checkpoint", "jaxbn.training.save_checkpoint")
  path = _path(directory)
  if os.path.lexists(path):
    raise FileExistsError(
      f"save_checkpoint: {path} exists already; give a new directory (checkpoints are not "
      "overwritten)."
    )
  made = []  # parent directories that orbax will create
  parent = os.path.dirname(path)
  while not os.path.isdir(parent):
    made.append(parent)
    parent = os.path.dirname(parent)
  before = set(glob.glob(glob.escape(path) + ".orbax-checkpoint-tmp*"))
  try:
    with _orbax_quiet(), ocp.StandardCheckpointer() as ckptr:
      ckptr.save(path, _saved(state))
  except Exception as e:
    # orbax writes into a temporary sibling and renames it at the end: remove
    # whatever this call made, so that a failed save leaves nothing behind.
    leftovers = set(glob.glob(glob.escape(path) + ".orbax-checkpoint-tmp*")) - before
    for p in [*sorted(leftovers), path]:
      shutil.rmtree(p, ignore_errors=True)
    for p in made:
      with contextlib.suppress(OSError):
        os.rmdir(p)
    raise RuntimeError(
      f"save_checkpoint: saving to {path} failed ({type(e).__name__}: {e}); nothing was written."
    ) from e


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _leaf_specs(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """Maps each leaf's path (``params/Dense_0/kernel``) to its shape and dtype.

  orbax stores optax's NamedTuples as dicts and tuples as lists: names and
  indices alike become path components, so the two trees compare.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {
    "/".join(_key_name(k) for k in kp): (tuple(leaf.shape), str(leaf.dtype)) for kp, leaf in leaves
  }


def _mismatch(saved: dict, wanted: dict) -> list[str]:
  lines = []
  for key in sorted(saved.keys() | wanted.keys()):
    have, want = saved.get(key), wanted.get(key)
    if have == want:
      continue
    fmt = lambda s: "absent" if s is None else f"{s[1]}{list(s[0])}"
    lines.append(f"  {key}: checkpoint {fmt(have)}, template {fmt(want)}")
  if len(lines) > 12:  # enough to see which layers differ
    lines = [*lines[:10], f"  ... and {len(lines) - 10} more"]
  return lines


def restore_checkpoint(
  directory: str | os.PathLike, template: TrainState, *, sharding: Any = None
) -> TrainState:
  """Restores a state saved by :func:`save_checkpoint`.

  Args:
    directory: the directory given to :func:`save_checkpoint` (a relative
      path is taken from the working directory).
    template: a :class:`TrainState` of the same model and optimizer (e.g. from
      :func:`create_train_state`); gives the structure, shapes and dtypes and
      the ``apply_fn`` and ``tx``.
    sharding: where to put every restored array, e.g.
      ``NamedSharding(mesh, P())`` for a state replicated over a mesh that
      spans several processes (every process calls this then); default: the
      template's own shardings. A checkpoint saved by any number of processes
      restores onto any mesh.

  Returns:
    The restored :class:`TrainState`, bit-identical to the saved one.

  Raises:
    FileNotFoundError: no checkpoint at ``directory``.
    CheckpointError: (a ``ValueError``) the checkpoint is damaged, truncated
      or incomplete, or it holds another model or optimizer than
      ``template``'s (the message lists the arrays that differ).

  Examples:
    >>> import os, tempfile, jax.numpy as jnp, optax
    >>> from jaxbn import models, training
    >>> state = training.create_train_state(
    ...   models.MLP(features=(4,)), optax.adam(1e-3), jnp.ones((1, 3)))
    >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
    >>> training.save_checkpoint(path, state)
    >>> restored = training.restore_checkpoint(path, state)
    >>> bool((restored.params['Dense_0']['kernel'] == state.params['Dense_0']['kernel']).all())
    True
  """
  ocp = require("orbax.checkpoint", "jaxbn.training.restore_checkpoint")
  path = _path(directory)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"restore_checkpoint: no checkpoint at {path}.")
  damaged = f"restore_checkpoint: the checkpoint at {path} is damaged, truncated or incomplete"
  if path.endswith(".orbax-checkpoint-tmp") or ".orbax-checkpoint-tmp-" in os.path.basename(path):
    raise CheckpointError(
      f"{damaged}: it is the temporary directory of a save that never finished."
    )

  def target_of(x):
    t = ocp.utils.to_shape_dtype_struct(x)
    return t if sharding is None else jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=sharding)

  target = _saved(template)
  with _orbax_quiet(), ocp.StandardCheckpointer() as ckptr:
    try:
      metadata = ckptr.metadata(path).item_metadata
    except Exception as e:
      raise CheckpointError(f"{damaged} (its metadata: {type(e).__name__}: {e}).") from e
    if metadata is None:  # orbax could not read it, and says so only in a log line
      raise CheckpointError(f"{damaged}: orbax cannot read its metadata.")
    saved = _leaf_specs(metadata)
    diff = _mismatch(saved, _leaf_specs(target))
    if diff:
      raise CheckpointError(
        f"restore_checkpoint: the checkpoint at {path} holds another model or optimizer than the "
        "template's; the arrays that differ:\n" + "\n".join(diff)
      )
    try:
      restored = ckptr.restore(path, jax.tree.map(target_of, target))
    except Exception as e:
      raise CheckpointError(f"{damaged} ({type(e).__name__}: {e}).") from e
  # orbax gives back plain containers where the template had optax's
  # NamedTuples: put each leaf back at its path in the template's structure.
  by_path = dict(zip(_leaf_specs(restored), jax.tree.leaves(restored), strict=True))
  restored = jax.tree.unflatten(
    jax.tree.structure(target), [by_path[k] for k in _leaf_specs(target)]
  )
  return template.replace(**restored)
