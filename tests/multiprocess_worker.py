"""One process of tests/test_multiprocess.py: data-parallel training under jax.distributed.

Run as ``python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR``. Each
process has 4 CPU devices, joins the others through the coordinator on
127.0.0.1:PORT and, over the default (global) mesh, on its own part of each
global batch:

- trains the model written for one device with
  :func:`jaxbn.training.data_parallel_train_step` (jit on global arrays), saving an
  orbax checkpoint after ``SAVE_AFTER`` steps to ``OUT_DIR/ckpt_2p``; restores it and
  resumes;
- trains the same model under :func:`jaxbn.training.shard_map_train_step`
  (per-device statistics);
- restores ``OUT_DIR/ckpt_1p``, saved by the test in one process, and resumes.

It writes what it ends with to ``OUT_DIR/worker{PROCESS_ID}.npz``. The global
batches come from :func:`batches`, which the test also uses for its
single-process reference.
"""

import sys
import traceback

import numpy as np

LOCAL_DEVICES = 4
STEPS = 3
SAVE_AFTER = 2
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


def make_model():
  import jaxbn
  from jaxbn import models

  return models.MLP(features=(10, 7), num_classes=CLASSES, bn_options=jaxbn.BNOptions(momentum=0.7))


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


def initial_state():
  from jaxbn import training

  return training.create_train_state(
    make_model(), make_optimizer(), np.zeros((1, FEATURES), np.float32)
  )


def summary(state, losses=(), accuracies=()):
  return {
    **flat(state.params, "params"),
    **flat(state.batch_stats, "batch_stats"),
    **flat(state.opt_state, "opt_state"),
    "loss": np.asarray(losses),
    "accuracy": np.asarray(accuracies),
    "step": np.asarray(state.step),
  }


def _rows(batch, process_id, num_processes):
  part = GLOBAL_BATCH // num_processes
  rows = slice(process_id * part, (process_id + 1) * part)
  return tuple(a[rows] for a in batch)


def train(kind, process_id, num_processes, out_dir):
  """Trains STEPS steps on this process's part of each global batch; returns the results."""

  from jaxbn import training

  mesh = training.data_parallel_mesh()
  if kind == "sync":
    step = training.data_parallel_train_step(mesh)
  else:
    step = training.shard_map_train_step(mesh)
  state = initial_state()
  losses, accuracies, out = [], [], {}
  for t, batch in enumerate(batches()):
    local = _rows(batch, process_id, num_processes)
    if t == 1:
      # A batch that already is a global array is taken as it is.
      local = training.global_batch(local, mesh)
      assert not local[0].is_fully_addressable and local[0].shape[0] == GLOBAL_BATCH
    state, metrics = step(state, local)
    losses.append(float(metrics["loss"]))
    accuracies.append(float(metrics["accuracy"]))
    if kind == "sync" and t + 1 == SAVE_AFTER:
      training.save_checkpoint(f"{out_dir}/ckpt_2p", state)
      out.update({f"saved/{k}": v for k, v in summary(state).items()})
  return {**summary(state, losses, accuracies), **out}


def resume(directory, process_id, num_processes):
  """Restores a checkpoint of SAVE_AFTER steps onto the global mesh and trains the rest."""
  import jax

  from jaxbn import training

  mesh = training.data_parallel_mesh()
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = training.restore_checkpoint(directory, initial_state(), sharding=replicated)
  out = {f"restored/{k}": v for k, v in summary(state).items()}
  step = training.data_parallel_train_step(mesh)
  for batch in batches()[SAVE_AFTER:]:
    state, _ = step(state, _rows(batch, process_id, num_processes))
  return {**out, **{f"resumed/{k}": v for k, v in summary(state).items()}}


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

  sync = train("sync", process_id, num_processes, out_dir)
  results = {f"sync/{k}": v for k, v in sync.items()}
  # The others are recorded as errors, not raised, so that the rest still comes back.
  runs = {
    "per_device": lambda: train("per_device", process_id, num_processes, out_dir),
    "ckpt_2p": lambda: resume(f"{out_dir}/ckpt_2p", process_id, num_processes),
    "ckpt_1p": lambda: resume(f"{out_dir}/ckpt_1p", process_id, num_processes),
  }
  for name, run in runs.items():
    try:
      results.update({f"{name}/{k}": v for k, v in run().items()})
    except Exception:
      results[f"{name}_error"] = np.asarray(traceback.format_exc())
  results["device_count"] = np.asarray(jax.device_count())
  results["process_index"] = np.asarray(jax.process_index())
  np.savez(f"{out_dir}/worker{process_id}.npz", **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  pid, nproc, port_, out = sys.argv[1:]
  main(int(pid), int(nproc), int(port_), out)
