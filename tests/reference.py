"""Independent float64 NumPy references (Algorithms 1 and 2), and what several tests share.

A fresh interpreter for tests (:func:`run_python`), and non-trivial batch-norm values in a model's
variables (:func:`perturb_bn`).
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn.training.masks import _BN_NAME  # how the optimizer masks recognise a batch norm

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_python(code: str) -> str:
  """Runs ``code`` in a fresh interpreter (this checkout's jaxbn); returns what it printed."""
  proc = subprocess.run(
    [sys.executable, "-c", code],
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)},
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.strip()


def perturb_bn(tree, seed):
  """Non-trivial scale, bias, mean and var for every batch norm of a variables tree.

  A batch norm is a subtree whose name the optimizer masks recognise (``BatchNorm_0``, ``bn``,
  ``bn_1``, ``downsample_bn``), or a leaf named ``mean``/``var`` (the core's state); var and
  scale are drawn in [0.3, 3), the rest from a standard normal, so that a wrong formula shows.
  """
  rng = np.random.default_rng(seed)

  def leaf(path, t):
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    if names[-1] == "value":  # an nnx Variable's
      names.pop()
    in_bn = any(_BN_NAME.search(n) for n in names[:-1]) or names[-1] in ("mean", "var")
    if not in_bn or names[-1] in ("count", "step"):
      return t
    if names[-1] in ("var", "scale"):
      return jnp.asarray(rng.uniform(0.3, 3.0, t.shape), t.dtype)
    return jnp.asarray(rng.normal(size=t.shape), t.dtype)

  return jax.tree_util.tree_map_with_path(leaf, tree)


def feature_axes(ndim, axis):
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(sorted(a % ndim for a in axes))


def bn_train_ref(x, scale, bias, mean, var, *, momentum=0.99, epsilon=1e-5, axis=-1, mask=None):
  """Returns (y, new_mean, new_var) in float64, the paper's Algorithm 1.

  ``mask`` is a boolean array of x's shape (already broadcast).
  """
  x = np.asarray(x, np.float64)
  fa = feature_axes(x.ndim, axis)
  red = tuple(i for i in range(x.ndim) if i not in fa)
  bshape = tuple(x.shape[i] if i in fa else 1 for i in range(x.ndim))
  w = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
  n = w.sum(red, keepdims=True)
  mu = (x * w).sum(red, keepdims=True) / np.maximum(n, 1)
  v = (((x - mu) ** 2) * w).sum(red, keepdims=True) / np.maximum(n, 1)
  y = (x - mu) / np.sqrt(v + epsilon) * np.reshape(scale, bshape) + np.reshape(bias, bshape)
  fshape = np.shape(mean)
  new_mean = momentum * np.asarray(mean, np.float64) + (1 - momentum) * mu.reshape(fshape)
  new_var = momentum * np.asarray(var, np.float64) + (1 - momentum) * v.reshape(fshape)
  return y, new_mean, new_var


def bn_infer_ref(x, scale, bias, mean, var, *, epsilon=1e-5, axis=-1):
  x = np.asarray(x, np.float64)
  fa = feature_axes(x.ndim, axis)
  bshape = tuple(x.shape[i] if i in fa else 1 for i in range(x.ndim))
  r = lambda t: np.reshape(np.asarray(t, np.float64), bshape)
  return (x - r(mean)) / np.sqrt(r(var) + epsilon) * r(scale) + r(bias)
