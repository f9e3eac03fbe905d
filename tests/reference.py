"""Independent float64 NumPy references (Algorithms 1 and 2), and a fresh interpreter for tests."""

import os
import pathlib
import subprocess
import sys

import numpy as np

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
