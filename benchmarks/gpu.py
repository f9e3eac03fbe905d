"""jaxbn against flax and against a copy of the same size, on whatever device JAX runs on.

For each activation shape, dtype (float32, bfloat16) and layout (channel-last,
``axis=-1``; channel-first, ``axis=1``), five jitted programs run interleaved,
one of each in turn in a new order every round (``bench_models.round_orders``),
``--reps`` rounds:

- the train step of jaxbn and of ``flax.linen.BatchNorm``: ``(x, dy) -> (y, dx,
  dscale, dbias, new running statistics)`` (``jax.vjp``); at least ``x`` and
  ``dy`` read and ``y`` and ``dx`` written, 4 arrays of ``x``'s size;
- inference of both: ``x -> y`` with the running statistics, 2 arrays;
- a copy, ``x -> x + 0`` (a fresh buffer: 2 arrays), the memory bandwidth the
  others are measured against.

Reported per program: the median time; XLA's bytes accessed per element of
``x`` (its cost analysis; every operand and result counted in full);
and the fraction of the copy's bandwidth the program reaches, counting only
the minimal arrays above (1.0: as fast as moving those bytes can be). The
ratios jaxbn/flax are the headline; absolute times depend on the device.

On a GPU the shapes are ResNet's ``(32, 56, 56, 64)`` and ``(32, 56, 56, 256)``
(under 4 minutes with ``--reps 50``, compilation included). On a CPU
``--small`` (the default there) runs ``(4, 8, 8, 16)`` and ``(4, 8, 8, 32)``,
so the script itself is tested in CI.

Usage:
  python benchmarks/gpu.py [--reps 50] [--small | --full] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import bench_models
import flax.linen as nn
import jax

import jaxbn

FULL = ((32, 56, 56, 64), (32, 56, 56, 256))
SMALL = ((4, 8, 8, 16), (4, 8, 8, 32))
DTYPES = ("float32", "bfloat16")
LAYOUTS = ("last", "first")  # channel-last (axis=-1), channel-first (axis=1)


def programs(shape: tuple[int, ...], dtype: str, layout: str):
  """``{name: (jitted fn, args, minimal arrays moved)}`` for one configuration."""
  n, h, w, c = shape
  axis = -1 if layout == "last" else 1
  full = (n, h, w, c) if layout == "last" else (n, c, h, w)
  x = (2 * jax.random.normal(jax.random.key(0), full) + 0.5).astype(dtype)
  dy = jax.random.normal(jax.random.key(1), full).astype(dtype)
  params, state = jaxbn.bn_init(c)
  # dtype: the output in the input's dtype, as jaxbn's (flax would promote bfloat16 to float32).
  train_mod = nn.BatchNorm(use_running_average=False, axis=axis, dtype=dtype)
  infer_mod = nn.BatchNorm(use_running_average=True, axis=axis, dtype=dtype)
  variables = train_mod.init(jax.random.key(2), x[:2])

  def ours_train(params, state, x, dy):
    y, vjp, new = jax.vjp(
      lambda p, x: jaxbn.bn_train(p, state, x, axis=axis), params, x, has_aux=True
    )
    return y, vjp(dy), new

  def flax_train(variables, x, dy):
    def f(p, x):
      return train_mod.apply(
        {"params": p, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
      )

    y, vjp, new = jax.vjp(f, variables["params"], x, has_aux=True)
    return y, vjp(dy), new

  return x, {
    "jaxbn train": (jax.jit(ours_train), (params, state, x, dy), 4),
    "flax train": (jax.jit(flax_train), (variables, x, dy), 4),
    "jaxbn infer": (
      jax.jit(lambda params, state, x: jaxbn.bn_infer(params, state, x, axis=axis)),
      (params, state, x),
      2,
    ),
    "flax infer": (jax.jit(lambda v, x: infer_mod.apply(v, x)), (variables, x), 2),
    "copy": (jax.jit(lambda x: x + 0), (x,), 2),
  }


def measure(shape: tuple[int, ...], dtype: str, layout: str, reps: int) -> dict:
  """Median times, bytes accessed per element and fractions of the copy's bandwidth."""
  x, progs = programs(shape, dtype, layout)
  per_element = {}
  for name, (fn, args, _) in progs.items():
    jax.block_until_ready(fn(*args))  # compile and warm up
    got = bench_models.bytes_accessed(fn.lower(*args).compile())
    per_element[name] = None if got is None else got / x.size
  times = {name: [] for name in progs}
  for order in bench_models.round_orders(list(progs), reps):
    for name in order:
      fn, args, _ = progs[name]
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t0)
  median = {name: statistics.median(t) for name, t in times.items()}
  size = x.size * x.dtype.itemsize
  copy_bandwidth = 2 * size / median["copy"]
  fraction = {
    name: arrays * size / median[name] / copy_bandwidth for name, (_, _, arrays) in progs.items()
  }
  return {
    "shape": list(x.shape),
    "dtype": dtype,
    "layout": layout,
    "ms": {k: v * 1e3 for k, v in median.items()},
    "bytes_per_element": per_element,
    "copy_fraction": fraction,
    "train_ratio": median["jaxbn train"] / median["flax train"],
    "infer_ratio": median["jaxbn infer"] / median["flax infer"],
    "copy_gbs": copy_bandwidth / 1e9,
  }


def table(rows: list[dict]) -> str:
  """The results as a markdown table."""

  def b(v):
    return "-" if v is None else f"{v:.1f}"

  lines = [
    "| shape | dtype | layout | train ms jaxbn / flax | ratio | bytes/elem jaxbn / flax "
    "| of copy BW jaxbn / flax | infer ms jaxbn / flax | ratio | of copy BW jaxbn / flax "
    "| copy GB/s |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    ms, pe, fr = r["ms"], r["bytes_per_element"], r["copy_fraction"]
    lines.append(
      f"| {tuple(r['shape'])} | {r['dtype']} | {r['layout']} "
      f"| {ms['jaxbn train']:.3f} / {ms['flax train']:.3f} | {r['train_ratio']:.2f} "
      f"| {b(pe['jaxbn train'])} / {b(pe['flax train'])} "
      f"| {fr['jaxbn train']:.2f} / {fr['flax train']:.2f} "
      f"| {ms['jaxbn infer']:.3f} / {ms['flax infer']:.3f} | {r['infer_ratio']:.2f} "
      f"| {fr['jaxbn infer']:.2f} / {fr['flax infer']:.2f} | {r['copy_gbs']:.0f} |"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--reps", type=int, default=50)
  size = parser.add_mutually_exclusive_group()
  size.add_argument("--small", action="store_true", help="small shapes (the default on CPU)")
  size.add_argument("--full", action="store_true", help="ResNet shapes (the default on GPU)")
  parser.add_argument("--json", help="also write the results to this file")
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  small = args.small or (not args.full and device.platform == "cpu")
  shapes = SMALL if small else FULL
  print(
    f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}, "
    f"jaxbn {jaxbn.__version__}, {platform.machine()}; median of {args.reps} interleaved runs"
  )
  rows = []
  start = time.perf_counter()
  for shape in shapes:
    for dtype in DTYPES:
      for layout in LAYOUTS:
        rows.append(measure(shape, dtype, layout, args.reps))
  print(table(rows))
  print(f"total {time.perf_counter() - start:.0f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
