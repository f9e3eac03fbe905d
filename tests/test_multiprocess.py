"""Data-parallel training over two processes (jax.distributed on 127.0.0.1, 4 CPU devices each).

tests/multiprocess_worker.py runs in two subprocesses; each trains on its half of
every global batch over the default mesh (all 8 devices of both processes):
the model written for one device under data_parallel_train_step (jit on global
arrays), and under shard_map_train_step (per-device batch norm). This process
computes the reference on the whole batches with the single-device train_step,
or with the model applied to each device's shard on its own (per-device batch
norm). Checkpoints cross over: the workers save one that this process restores
and resumes, and restore and resume one this process saved.
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


def _one_process_run():
  """train_step on the whole batches; the state after SAVE_AFTER steps, saved, and the last."""
  state, losses, accuracies, saved = worker.initial_state(), [], [], None
  for t, batch in enumerate(worker.batches()):
    state, metrics = training.train_step(state, batch)
    losses.append(float(metrics["loss"]))
    accuracies.append(float(metrics["accuracy"]))
    if t + 1 == worker.SAVE_AFTER:
      saved = state
  return saved, state, worker.summary(state, losses, accuracies)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("multiprocess")
  saved, final, summary = _one_process_run()
  training.save_checkpoint(out_dir / "ckpt_1p", saved)
  return {
    "results": _run_workers(out_dir),
    "out_dir": out_dir,
    "saved": saved,
    "final": final,
    "summary": summary,
  }


@pytest.fixture(scope="module")
def results(run):
  return run["results"]


def _initial_state():
  return worker.initial_state()


def _summary(state, losses, accuracies):
  return worker.summary(state, losses, accuracies)


def _synchronized_reference(run):
  return run["summary"]


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


def _compare(results, prefix, reference, **tol):
  tol = tol or dict(rtol=2e-5, atol=1e-6)
  for i, got in enumerate(results):
    assert int(got["process_index"]) == i
    assert int(got["device_count"]) == NUM_PROCESSES * worker.LOCAL_DEVICES
    assert not [k for k in reference if prefix + k not in got], sorted(got)
    for key, want in reference.items():
      np.testing.assert_allclose(got[prefix + key], want, **tol, err_msg=f"worker {i}: {key}")
  # Both processes hold the same replicated state, bit for bit.
  for key in reference:
    np.testing.assert_array_equal(results[0][prefix + key], results[1][prefix + key], err_msg=key)


def _check_no_error(results, name):
  for i, got in enumerate(results):
    if f"{name}_error" in got:
      pytest.fail(f"worker {i}, {name}:\n...{str(got[f'{name}_error'])[-4000:]}")


def test_global_arrays_under_jit_over_two_processes_equal_one_process(run, results):
  reference = _synchronized_reference(run)
  assert int(reference["step"]) == worker.STEPS
  _compare(results, "sync/", reference)


def test_per_device_batch_norm_over_two_processes(results):
  _check_no_error(results, "per_device")
  _compare(results, "per_device/", _per_device_reference())


def _without_history(summary):
  return {k: v for k, v in summary.items() if k not in ("loss", "accuracy")}


def test_checkpoint_of_two_processes_restores_into_one_and_resumes_exactly(run, results):
  """Saved by the 2-process run after SAVE_AFTER steps; restored here, on one device."""
  saved = {k[len("sync/saved/") :]: v for k, v in results[0].items() if k.startswith("sync/saved/")}
  template = _initial_state()
  restored = training.restore_checkpoint(run["out_dir"] / "ckpt_2p", template)
  got = _without_history(worker.summary(restored))
  assert sorted(got) == sorted(_without_history(saved))
  for key, value in got.items():  # bit for bit what the two processes held
    np.testing.assert_array_equal(value, saved[key], err_msg=key)
  assert int(restored.step) == worker.SAVE_AFTER

  # Resuming from it is resuming from those values: the same steps, bit for bit.
  a, b = restored, jax.tree.map(lambda v: jax.numpy.asarray(np.asarray(v)), restored)
  for batch in worker.batches()[worker.SAVE_AFTER :]:
    a, _ = training.train_step(a, batch)
    b, _ = training.train_step(b, batch)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # ... and it ends where the 2-process run ended, and where one process ends.
  want = _without_history(worker.summary(a))
  _compare(results, "sync/", want)
  for key, value in _without_history(run["summary"]).items():
    np.testing.assert_allclose(want[key], value, rtol=2e-5, atol=1e-6, err_msg=key)


def test_checkpoint_of_one_process_restores_into_two_and_resumes(run, results):
  """Saved here after SAVE_AFTER steps; restored by both workers onto the global mesh."""
  _check_no_error(results, "ckpt_1p")
  saved = _without_history(worker.summary(run["saved"]))
  for i, got in enumerate(results):
    for key, value in saved.items():  # bit for bit in every process
      np.testing.assert_array_equal(got["ckpt_1p/restored/" + key], value, err_msg=f"{i}: {key}")
  final = _without_history(worker.summary(run["final"]))
  _compare(results, "ckpt_1p/resumed/", final)


def test_checkpoint_of_two_processes_resumes_in_two_exactly(results):
  """The workers' own checkpoint, restored and resumed there: the run that never stopped."""
  _check_no_error(results, "ckpt_2p")
  for i, got in enumerate(results):
    for key in _without_history(worker.summary(_initial_state())):
      np.testing.assert_array_equal(
        got["ckpt_2p/restored/" + key], got["sync/saved/" + key], err_msg=f"{i}: {key}"
      )
      np.testing.assert_array_equal(
        got["ckpt_2p/resumed/" + key], got["sync/" + key], err_msg=f"{i}: {key}"
      )
