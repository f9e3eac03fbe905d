"""Speed of the core against flax.linen.BatchNorm, side by side in one process.

Train step: ``jax.jit(jax.value_and_grad(sum(y * ct)))`` with respect to scale,
bias and x, running statistics threaded out, with ``ct`` a fixed random array
independent of ``x`` (in a model the output's cotangent is not the input: with
``sum(y * x)`` XLA would reuse the forward's ``sum(x)`` as the backward's
``sum(dy)``, a saving no model gets). Inference: ``bn_infer`` against a
plain copy of the same array (NumPy, and XLA under jit) and against the
cheapest XLA elementwise op (``x * 1.5 + 0.5`` with scalar constants). Runs
are interleaved (one of each in turn, in a new random order every round, so
that none always finds ``x`` in cache after the same predecessor) and the
median of ``--reps`` is reported, so both sides see the same machine load.
Also reports compiled temporary memory and the output std on
``1e4 + N(0, 1)`` input (exactness far from zero).

Usage:
  python benchmarks/bench_core.py [--reps 30] [--shapes small|all] [--reuse-memory]
  python benchmarks/bench_core.py --bandwidth [--reps 30]
  python benchmarks/bench_core.py --bytes
  python benchmarks/bench_core.py --profile [--reps 30]

``--bytes`` times nothing: it prints XLA's cost analysis of each compiled train
step (``bytes accessed``: every op's operands and results counted in full, as
if each came from memory) for both steps above, in MB and in arrays of ``x``'s
size, and jaxbn's bytes over flax's. ``--profile`` traces the interleaved
train steps with ``jax.profiler`` and gives each op's fastest time over the
runs: each op whose result is one array of ``x``'s shape (a full-size write),
their sum, and the sum of the rest (reductions, per-feature arithmetic, and
fusions with several results).

``--reuse-memory`` runs the same measurement with glibc told to keep freed
memory (``MALLOC_MMAP_THRESHOLD_`` and friends), so that XLA's per-call
buffers are not fresh pages that fault on first touch; it isolates the
computation from the allocator.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import statistics
import sys
import tempfile
import time

import bench_models
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxbn

SHAPES = [(256, 1024), (1024, 4096), (64, 32, 32, 64), (32, 56, 56, 128)]


# The running statistics are arguments of each compiled step, as in a model's
# train step: closed over, they are constants, and XLA folds jaxbn's shift by
# the running mean (zero at initialization) out of the statistics' sums.


def _jaxbn_step(ct):
  def loss(p, x, state):
    y, new_state = jaxbn.bn_train(p, state, x)
    return jnp.sum(y * ct), new_state

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _flax_step(module, ct):
  def loss(p, x, stats):
    y, upd = module.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])
    return jnp.sum(y * ct), upd["batch_stats"]

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _time(fn, *args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def _interleaved(runs: dict, reps: int) -> dict[str, list[float]]:
  """Seconds of each of ``runs`` (callables returning seconds) over ``reps`` rounds.

  Every step reads the same ``x``, so the order matters: each round's is new
  (:func:`bench_models.round_orders`).
  """
  times = {k: [] for k in runs}
  for order in bench_models.round_orders(list(runs), reps):
    for name in order:
      times[name].append(runs[name]())
  return times


def _compiled(fn, *args):
  return fn.lower(*args).compile()


def _output_std_far_from_zero(train_fn, shape_c: int) -> float:
  x = 1e4 + jax.random.normal(jax.random.key(0), (256, shape_c))
  return float(jnp.max(jnp.abs(jnp.std(train_fn(x), 0) - 1))) + 1


def _setup(shape):
  """The input, the output's cotangent, and a fresh jaxbn layer and flax module for it."""
  x = jax.random.normal(jax.random.key(0), shape) * 2 + 0.5
  ct = jax.random.normal(jax.random.key(2), shape)
  params, state = jaxbn.bn_init(shape[-1])
  module = nn.BatchNorm(use_running_average=False)
  return x, ct, params, state, module, module.init(jax.random.key(1), x[:2])


def _train_steps(shape):
  """``x`` and the jitted ``value_and_grad`` train steps of jaxbn and flax, with arguments."""
  x, ct, params, state, module, variables = _setup(shape)
  return x, {
    "jaxbn": (_jaxbn_step(ct), (params, x, state)),
    "flax": (_flax_step(module, ct), (variables["params"], x, variables["batch_stats"])),
  }


def bench(shape, reps: int) -> dict:
  c = shape[-1]
  x, ct, params, state, module, variables = _setup(shape)
  fparams, fstats = variables["params"], variables["batch_stats"]
  ours = _jaxbn_step(ct)
  theirs = _flax_step(module, ct)
  infer = jax.jit(lambda x: jaxbn.bn_infer(params, state, x))
  xla_copy = jax.jit(lambda x: x.copy())
  xla_affine = jax.jit(lambda x: x * 1.5 + 0.5)
  x_np = np.asarray(x)

  warm = (
    (ours, (params, x, state)),
    (theirs, (fparams, x, fstats)),
    (infer, (x,)),
    (xla_copy, (x,)),
    (xla_affine, (x,)),
  )
  for fn, args in warm:
    jax.block_until_ready(fn(*args))  # compile and warm up

  def np_copy():
    t0 = time.perf_counter()
    np.copy(x_np)
    return time.perf_counter() - t0

  runs = {
    "flax": functools.partial(_time, theirs, fparams, x, fstats),
    "jaxbn": functools.partial(_time, ours, params, x, state),
    "infer": functools.partial(_time, infer, x),
    "xla_copy": functools.partial(_time, xla_copy, x),
    "xla_affine": functools.partial(_time, xla_affine, x),
    "np_copy": np_copy,
  }
  times = _interleaved(runs, reps)
  med = {k: statistics.median(v) * 1e3 for k, v in times.items()}

  std_ours = _output_std_far_from_zero(lambda x: jaxbn.bn_train(*jaxbn.bn_init(c), x)[0], c)
  std_flax = _output_std_far_from_zero(
    lambda x: module.apply(variables, x, mutable=["batch_stats"])[0], c
  )
  return {
    "shape": shape,
    **med,
    "ratio": med["jaxbn"] / med["flax"],
    "infer_vs_copy": med["infer"] / med["np_copy"],
    "infer_vs_affine": med["infer"] / med["xla_affine"],
    "temp_jaxbn": bench_models.temp_bytes(_compiled(ours, params, x, state)),
    "temp_flax": bench_models.temp_bytes(_compiled(theirs, fparams, x, fstats)),
    "std_jaxbn": std_ours,
    "std_flax": std_flax,
  }


def bandwidth(shape, reps: int) -> dict:
  """Effective bandwidth of the BN train step against a copy of the same size.

  The step is ``(x, dy) -> (y, dx, dscale, dbias, new_state)`` under one
  ``jax.jit`` (``jax.vjp`` of ``bn_train``, ``dy`` an argument): at least
  ``x`` and ``dy`` read and ``y`` and ``dx`` written, 4 arrays of ``x``'s
  size. The copy is ``jax.jit(lambda x: x + 0)`` (XLA writes a new buffer):
  one read and one write. Effective bandwidth = those minimal bytes / median
  time; the last column is its fraction of the copy's.
  """
  x, fns = _vjp_steps(shape)
  fns["copy"] = (jax.jit(lambda x: x + 0), (x,))
  for fn, a in fns.values():
    jax.block_until_ready(fn(*a))
  times = _interleaved({k: functools.partial(_time, fn, *a) for k, (fn, a) in fns.items()}, reps)
  size = x.size * x.dtype.itemsize
  med = {k: statistics.median(v) for k, v in times.items()}
  gbs = {k: (2 if k == "copy" else 4) * size / med[k] / 1e9 for k in fns}
  return {"shape": shape, "ms": {k: v * 1e3 for k, v in med.items()}, "gbs": gbs}


def _vjp_steps(shape):
  """``x`` and the jitted ``(x, dy) -> (y, grads, state)`` steps of jaxbn and flax."""
  x, dy, params, state, module, variables = _setup(shape)

  def ours(p, x, dy, state):
    y, vjp, new = jax.vjp(lambda p, x: jaxbn.bn_train(p, state, x), p, x, has_aux=True)
    return y, vjp(dy), new

  def theirs(p, x, dy, stats):
    def f(p, x):
      return module.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])

    y, vjp, new = jax.vjp(f, p, x, has_aux=True)
    return y, vjp(dy), new

  return x, {
    "jaxbn": (jax.jit(ours), (params, x, dy, state)),
    "flax": (jax.jit(theirs), (variables["params"], x, dy, variables["batch_stats"])),
  }


def bytes_moved(shape) -> dict:
  """XLA's bytes accessed of the train steps of :func:`bench` and :func:`bandwidth`."""
  out = {}
  for step, steps in (("train", _train_steps), ("vjp", _vjp_steps)):
    x, fns = steps(shape)
    for k, (fn, a) in fns.items():
      out[step, k] = bench_models.bytes_accessed(_compiled(fn, *a))
  return {"shape": shape, "size": x.size * x.dtype.itemsize, "bytes": out}


def op_profile(shape, reps: int, trace_dir: str) -> dict:
  """Per-op times of the train steps of :func:`bench`, from one trace of interleaved runs."""
  x, fns = _train_steps(shape)
  compiled = {k: _compiled(fn, *a) for k, (fn, a) in fns.items()}
  ops = {k: bench_models.hlo_ops(c) for k, c in compiled.items()}
  runs = {k: functools.partial(_time, compiled[k], *a) for k, (_, a) in fns.items()}
  for run in runs.values():
    run()
  costs, walls = bench_models.traced_op_times(runs, ops, reps, trace_dir)
  full = f"[{','.join(map(str, x.shape))}]"
  out = {}
  for k in fns:
    writes = sorted(
      (t for op, t in costs[k].items() if t and ops[k][op].shape.startswith(f"f32{full}")),
      reverse=True,
    )
    out[k] = {
      "writes": writes,
      "rest": sum(costs[k].values()) - sum(writes),
      "all": sum(costs[k].values()),
      "fastest": min(walls[k]),
    }
  return out


def _mib(b):
  return "n/a" if b is None else f"{b / 2**20:.1f}"


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--reps", type=int, default=30)
  ap.add_argument("--shapes", choices=["small", "all"], default="all")
  ap.add_argument("--reuse-memory", action="store_true", help="glibc keeps freed memory")
  ap.add_argument(
    "--bandwidth", action="store_true", help="effective bandwidth against a copy instead"
  )
  ap.add_argument(
    "--bytes", action="store_true", help="XLA's bytes accessed per step instead (no timing)"
  )
  ap.add_argument("--profile", action="store_true", help="per-op times of the train steps instead")
  args = ap.parse_args()
  if args.reuse_memory and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
    env = dict(
      os.environ,
      MALLOC_MMAP_THRESHOLD_=str(2**32),
      MALLOC_TRIM_THRESHOLD_=str(2**32),
      MALLOC_TOP_PAD_=str(2**29),
    )
    os.execve(sys.executable, [sys.executable, *sys.argv], env)  # glibc reads these at start
  shapes = SHAPES if args.shapes == "all" else SHAPES[:1]
  dev = jax.devices()[0]
  if args.profile:
    print(
      f"jax {jax.__version__}, flax {flax.__version__}, {dev.platform} ({os.cpu_count()} cores): "
      f"each op's fastest time over {args.reps} interleaved runs, ms\n"
      "| shape | step | each op whose result is one array of x's shape | their sum | "
      "other ops | all ops | fastest step |\n" + "|---" * 7 + "|"
    )
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as trace_dir:
      for s in shapes:
        p = op_profile(s, args.reps, os.path.join(trace_dir, "x".join(map(str, s))))
        for k, r in p.items():
          print(
            f"| {s} | {k} | {', '.join(f'{t:.2f}' for t in r['writes'])} | "
            f"{sum(r['writes']):.2f} | {r['rest']:.2f} | {r['all']:.2f} | {r['fastest']:.2f} |"
          )
    print(f"1-minute load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    return
  if args.bytes:
    print(
      f"jax {jax.__version__}, flax {flax.__version__}, {dev.platform}: XLA cost analysis, "
      "bytes accessed in MB (arrays of x's size)\n"
      "| shape | train step jaxbn | train step flax | jaxbn / flax | "
      "vjp step jaxbn | vjp step flax | jaxbn / flax |\n" + "|---" * 7 + "|"
    )
    for s in shapes:
      r = bytes_moved(s)
      b, n = r["bytes"], r["size"]
      cells = [
        f"{b[step, k] / 1e6:.0f} ({b[step, k] / n:.1f})"
        for step in ("train", "vjp")
        for k in ("jaxbn", "flax")
      ]
      ratios = [b[step, "jaxbn"] / b[step, "flax"] for step in ("train", "vjp")]
      print(
        f"| {s} | {cells[0]} | {cells[1]} | {ratios[0]:.2f} | "
        f"{cells[2]} | {cells[3]} | {ratios[1]:.2f} |"
      )
    return
  print(
    f"jax {jax.__version__}, flax {flax.__version__}, {dev.platform} "
    f"({platform.machine()}, {os.cpu_count()} cores), median of {args.reps} interleaved runs"
    + (", glibc keeping freed memory" if "MALLOC_MMAP_THRESHOLD_" in os.environ else "")
  )
  if args.bandwidth:
    print(
      "| shape | MiB | copy x+0 (ms) | jaxbn step (ms) | flax step (ms) | copy GB/s | "
      "jaxbn GB/s | flax GB/s | jaxbn / copy | flax / copy |\n" + "|---" * 10 + "|"
    )
    for s in shapes:
      r = bandwidth(s, args.reps)
      ms, g = r["ms"], r["gbs"]
      print(
        f"| {s} | {math.prod(s) * 4 / 2**20:.0f} | {ms['copy']:.2f} | {ms['jaxbn']:.2f} | "
        f"{ms['flax']:.2f} | {g['copy']:.1f} | {g['jaxbn']:.1f} | {g['flax']:.1f} | "
        f"{g['jaxbn'] / g['copy']:.2f} | {g['flax'] / g['copy']:.2f} |"
      )
    return
  rows = [bench(s, args.reps) for s in shapes]
  hdr = (
    "| shape | jaxbn train (ms) | flax train (ms) | jaxbn/flax | bn_infer (ms) | "
    "numpy copy (ms) | infer/copy | XLA x*1.5+0.5 (ms) | infer/that | "
    "temp MiB jaxbn / flax | output std on 1e4+N(0,1): jaxbn / flax |"
  )
  print(hdr)
  print("|" + "---|" * (hdr.count("|") - 1))
  for r in rows:
    print(
      f"| {r['shape']} | {r['jaxbn']:.2f} | {r['flax']:.2f} | {r['ratio']:.2f} | "
      f"{r['infer']:.2f} | {r['np_copy']:.2f} | {r['infer_vs_copy']:.2f} | "
      f"{r['xla_affine']:.2f} | {r['infer_vs_affine']:.2f} | "
      f"{_mib(r['temp_jaxbn'])} / {_mib(r['temp_flax'])} | "
      f"{r['std_jaxbn']:.4f} / {r['std_flax']:.1f} |"
    )
  geo = math.exp(statistics.mean(math.log(r["ratio"]) for r in rows))
  print(f"\ngeometric mean of jaxbn/flax train-step time: {geo:.2f}")


if __name__ == "__main__":
  main()
