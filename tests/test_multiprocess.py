"""Data-parallel training over two processes (jax.distributed on 127.0.0.1, 4 CPU devices each).

tests/multiprocess_worker.py runs in two subprocesses; each trains on its half of
every global batch with data_parallel_train_step over the default mesh (all 8
devices of both processes). This process computes the reference on the whole
batches with the single-device train_step (synchronized batch norm) or with the
model applied to each device's shard on its own (per-device batch norm).
"""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from jaxbn import engine
from jaxbn import training
from tests import multiprocess_worker as worker

pytestmark = pytest.mark.slow  # end-to-end: the full suite runs it, -m 'not slow' skips it

NUM_PROCESSES = 2
TIMEOUT_S = 120  # for the whole run of both workers; it takes about 15 s


def _free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _child_env():
  env = dict(os.environ)
  # tests/conftest.py asks for 8 host devices through XLA_FLAGS; each worker has 4.
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = flags.strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
    [str(Path(__file__).resolve().parents[1]), *filter(None, [env.get("PYTHONPATH")])]
  )
  return env


def _launch(out_dir):
  """Runs the workers to the end or to the deadline; returns ``(procs, outputs, timed_out)``."""
  port = _free_port()
  script = Path(worker.__file__).resolve()
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), str(i), str(NUM_PROCESSES), str(port), str(out_dir)],
      env=_child_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(NUM_PROCESSES)
  ]
  deadline = time.monotonic() + TIMEOUT_S
  outputs, timed_out = [], False
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
      timed_out = True
      for q in procs:
        q.kill()
      outputs.append(p.communicate())
  return procs, outputs, timed_out


def _run_workers(out_dir):
  for attempt in range(2):
    procs, outputs, timed_out = _launch(out_dir)
    if not timed_out and all(p.returncode == 0 for p in procs):
      return [dict(np.load(out_dir / f"worker{i}.npz")) for i in range(NUM_PROCESSES)]
    # The free port found may have been taken in the meantime: try another once.
    if attempt or timed_out or not any("already in use" in err for _, err in outputs):
      break
  report = [f"workers timed out after {TIMEOUT_S} s" if timed_out else "a worker failed"]
  for i, (p, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
    report.append(f"--- worker {i}: exit code {p.returncode}\nstdout:\n{out[-3000:]}")
    report.append(f"stderr:\n{err[-6000:]}")
  pytest.fail("\n".join(report), pytrace=False)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  return _run_workers(tmp_path_factory.mktemp("multiprocess"))


def _initial_state(axis_name=None):
  return training.create_train_state(
    worker.make_model(axis_name),
    worker.make_optimizer(),
    np.zeros((1, worker.FEATURES), np.float32),
  )


def _summary(state, losses, accuracies):
  return {
    **worker.flat(state.params, "params"),
    **worker.flat(state.batch_stats, "batch_stats"),
    "loss": np.asarray(losses),
    "accuracy": np.asarray(accuracies),
    "step": np.asarray(state.step),
  }


def _synchronized_reference():
  state, losses, accuracies = _initial_state(), [], []
  for batch in worker.batches():
    state, metrics = training.train_step(state, batch)
    losses.append(float(metrics["loss"]))
    accuracies.append(float(metrics["accuracy"]))
  return _summary(state, losses, accuracies)


@jax.jit
def _per_device_loss(params, state, xs, ys):
  """Mean loss of the model applied to each device's shard alone; mean statistics."""
  out = []
  for x, y in zip(xs, ys, strict=True):
    variables = {"params": params, "batch_stats": state.batch_stats}
    logits, upd = state.apply_fn(variables, x, train=True, mutable=["batch_stats"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    out.append((ce, upd["batch_stats"], engine.accuracy(logits, y)))
  n = len(out)
  stats = jax.tree.map(lambda *s: sum(s) / n, *(o[1] for o in out))
  return sum(o[0] for o in out) / n, (stats, sum(o[2] for o in out) / n)


def _per_device_reference():
  n_devices = NUM_PROCESSES * worker.LOCAL_DEVICES
  state, losses, accuracies = _initial_state(), [], []
  for batch in worker.batches():
    xs, ys = (np.split(a, n_devices) for a in batch)
    grad_fn = jax.value_and_grad(_per_device_loss, has_aux=True)
    (loss, (stats, acc)), grads = grad_fn(state.params, state, xs, ys)
    state = state.apply_gradients(grads=grads, batch_stats=stats)
    losses.append(float(loss))
    accuracies.append(float(acc))
  return _summary(state, losses, accuracies)


def _compare(results, prefix, reference):
  for i, got in enumerate(results):
    assert int(got["process_index"]) == i
    assert int(got["device_count"]) == NUM_PROCESSES * worker.LOCAL_DEVICES
    assert sorted(k[len(prefix) :] for k in got if k.startswith(prefix)) == sorted(reference)
    for key, want in reference.items():
      np.testing.assert_allclose(
        got[prefix + key], want, rtol=2e-5, atol=1e-6, err_msg=f"worker {i}: {key}"
      )
  # Both processes hold the same replicated state, bit for bit.
  for key in reference:
    np.testing.assert_array_equal(results[0][prefix + key], results[1][prefix + key], err_msg=key)


def test_synchronized_batch_norm_over_two_processes_equals_one_process(results):
  reference = _synchronized_reference()
  assert int(reference["step"]) == worker.STEPS
  _compare(results, "sync/", reference)


def test_per_device_batch_norm_over_two_processes(results):
  for i, got in enumerate(results):
    if "per_device_error" in got:
      pytest.fail(
        f"worker {i}, model without axis_name:\n...{str(got['per_device_error'])[-4000:]}"
      )
  _compare(results, "per_device/", _per_device_reference())
