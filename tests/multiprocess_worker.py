"""One process of tests/test_multiprocess.py: data-parallel training under jax.distributed.

Run as ``python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR``. Each
process has 4 CPU devices, joins the others through the coordinator on
127.0.0.1:PORT, trains with :func:`jaxbn.training.data_parallel_train_step` over
the default (global) mesh on its own part of each global batch, and writes what it
ends with to ``OUT_DIR/worker{PROCESS_ID}.npz``. The global batches come from
:func:`batches`, which the test also uses for its single-process reference.
"""

import sys
import traceback

import numpy as np

LOCAL_DEVICES = 4
STEPS = 3
GLOBAL_BATCH = 64
FEATURES = 12
CLASSES = 4


def batches():
  """The global batches ``(x, y)`` of the synchronized and the per-device runs."""
  rng = np.random.default_rng(0)
  out = []
  for _ in range(STEPS):
    x = (rng.normal(size=(GLOBAL_BATCH, FEATURES)) * 2 + 1).astype(np.float32)
    y = rng.integers(0, CLASSES, GLOBAL_BATCH).astype(np.int32)
    out.append((x, y))
  return out


def make_model(axis_name=None):
  import jaxbn
  from jaxbn import models

  return models.MLP(
    features=(10, 7),
    num_classes=CLASSES,
    bn_options=jaxbn.BNOptions(momentum=0.7, axis_name=axis_name),
  )


def make_optimizer():
  import optax

  return optax.adam(1e-2)


def flat(tree, prefix):
  """``{prefix/path: array}`` of a pytree's leaves, as NumPy arrays."""
  import jax

  return {
    prefix + jax.tree_util.keystr(path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def train(axis_name, process_id, num_processes):
  """Trains STEPS steps on this process's part of each global batch; returns the results."""
  import jax

  from jaxbn import training

  mesh = training.data_parallel_mesh()
  step = training.data_parallel_train_step(mesh)
  part = GLOBAL_BATCH // num_processes
  rows = slice(process_id * part, (process_id + 1) * part)
  state = training.create_train_state(
    make_model(axis_name), make_optimizer(), np.zeros((1, FEATURES), np.float32)
  )
  losses, accuracies = [], []
  for t, (x, y) in enumerate(batches()):
    local = (x[rows], y[rows])
    if t == 1:
      # A batch that already is a global array is taken as it is.
      split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
      local = jax.make_array_from_process_local_data(split, local)
      assert not local[0].is_fully_addressable and local[0].shape[0] == GLOBAL_BATCH
    state, metrics = step(state, local)
    losses.append(float(metrics["loss"]))
    accuracies.append(float(metrics["accuracy"]))
  return {
    **flat(state.params, "params"),
    **flat(state.batch_stats, "batch_stats"),
    "loss": np.asarray(losses),
    "accuracy": np.asarray(accuracies),
    "step": np.asarray(state.step),
  }


def main(process_id, num_processes, port, out_dir):
  import jax

  jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # The test suite's strict configuration (tests/conftest.py).
  jax.config.update("jax_numpy_rank_promotion", "raise")
  jax.config.update("jax_numpy_dtype_promotion", "strict")
  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=60,
  )
  assert jax.process_count() == num_processes
  assert jax.local_device_count() == LOCAL_DEVICES
  assert jax.device_count() == LOCAL_DEVICES * num_processes

  results = {f"sync/{k}": v for k, v in train("batch", process_id, num_processes).items()}
  # Batch norm without axis_name: per-device statistics. A failure there is
  # recorded, not raised, so that the synchronized results still come back.
  try:
    per_device = train(None, process_id, num_processes)
    results.update({f"per_device/{k}": v for k, v in per_device.items()})
  except Exception:
    results["per_device_error"] = np.asarray(traceback.format_exc())
  results["device_count"] = np.asarray(jax.device_count())
  results["process_index"] = np.asarray(jax.process_index())
  np.savez(f"{out_dir}/worker{process_id}.npz", **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  pid, nproc, port_, out = sys.argv[1:]
  main(int(pid), int(nproc), int(port_), out)
