"""Batch norm with the batch split over devices: collectives and data-parallel steps.

Runs on virtual CPU devices (``--devices``, default 8, set before JAX starts).
Two tables:

- Collectives per BN layer: the compiled train step (``value_and_grad`` of
  ``sum(y * ct)`` with respect to scale, bias and ``x``, running statistics
  threaded out) of one layer, ``x`` of shape ``--shape``, for jaxbn and
  ``flax.linen.BatchNorm()``, under ``jax.jit`` with the batch sharded by a
  ``NamedSharding`` (GSPMD, no ``axis_name``) and under ``jax.shard_map``
  with ``axis_name``. Counted in the optimized HLO: all-reduces (and their
  bytes) outside any conditional, those inside a conditional branch (jaxbn's
  second statistics pass, which runs only when the running mean is far from
  the batch's mean), all-gathers. The loss's own scalar sum and, under
  ``shard_map``, the parameter gradients' psum are the same for both and
  are counted too (XLA combines independent all-reduces into one).
- ResNet-18 (the model of ``bench_models.py``) data-parallel train step over
  the devices (batch sharded, GSPMD): jaxbn, flax and the identity norm,
  interleaved, median step time and BN overhead (step minus identity step of
  the same round) with its spread over blocks, and the step's collectives.

Usage:
  python benchmarks/bench_sharded.py [--devices 8] [--reps 10] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time


def _parse():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--shape", default="256,8,8,64", help="the BN layer's input, N,H,W,C")
  ap.add_argument("--reps", type=int, default=10, help="rounds of the ResNet-18 steps")
  ap.add_argument("--blocks", type=int, default=2)
  ap.add_argument("--batch", type=int, default=64, help="ResNet-18 global batch")
  ap.add_argument("--no-resnet", action="store_true", help="only the collectives table")
  return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ARGS.devices}"
  )

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_models  # noqa: E402

import jaxbn  # noqa: E402

_BYTES = {"f32": 4, "f64": 8, "bf16": 2, "f16": 2, "s32": 4, "pred": 1}


def _shape_bytes(text: str) -> int:
  """Bytes of an HLO result type such as ``(f32[64]{0}, f32[])``."""
  total = 0
  for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _BYTES.get(dt, 4)
  return total


def collectives(compiled_text: str) -> dict:
  """All-reduces outside/inside conditionals (count, bytes) and all-gathers."""
  branches, comp = set(), None
  lines = compiled_text.splitlines()
  for line in lines:
    if " conditional(" in line and "branch_computations={" in line:
      names = line.split("branch_computations={")[1].split("}")[0]
      branches |= {n.strip() for n in names.split(",")}
  out = {"main": [0, 0], "cond": [0, 0], "gather": [0, 0]}
  for line in lines:
    if line and not line.startswith(" ") and "{" in line:
      comp = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
    kind = None
    if " all-reduce(" in line or " all-reduce-start(" in line:
      kind = "cond" if comp in branches else "main"
    elif " all-gather(" in line or " all-gather-start(" in line:
      kind = "gather"
    if kind:
      result = line.split("=", 1)[1].split(" all-")[0]
      out[kind][0] += 1
      out[kind][1] += _shape_bytes(result)
  return out


def _layer_steps(shape, mesh):
  c = shape[-1]
  x = jax.random.normal(jax.random.key(0), shape)
  ct = jax.random.normal(jax.random.key(1), shape)
  params, state = jaxbn.bn_init(c)
  bn = nn.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), jnp.zeros((2, c)))
  bn_named = nn.BatchNorm(use_running_average=False, axis_name="data")

  # The running statistics are arguments (replicated), as in a model's train
  # step: closed over, XLA would fold jaxbn's shift by the running mean.
  def ours(axis_name):
    def loss(p, x, ct, state):
      y, new = jaxbn.bn_train(p, state, x, axis_name=axis_name)
      return jnp.sum(y * ct), new

    return loss, params, state

  def theirs(module):
    def loss(p, x, ct, stats):
      y, upd = module.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])
      return jnp.sum(y * ct), upd

    return loss, variables["params"], variables["batch_stats"]

  sharded = NamedSharding(mesh, P("data"))
  xs, cts = jax.device_put((x, ct), sharded)
  rows = []
  for name, (loss, p, st) in (("jaxbn", ours(None)), ("flax", theirs(bn))):
    f = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))
    rows.append(("jit, batch-sharded NamedSharding", name, f.lower(p, xs, cts, st)))
  for name, (loss, p, st) in (("jaxbn", ours("data")), ("flax", theirs(bn_named))):

    def step(p, x, ct, st, loss=loss):
      (v, aux), g = jax.value_and_grad(loss, (0, 1), has_aux=True)(p, x, ct, st)
      return jax.lax.psum(v, "data"), aux, g

    f = jax.jit(
      jax.shard_map(
        step,
        mesh=mesh,
        in_specs=(P(), P("data"), P("data"), P()),
        out_specs=(P(), P(), (P(), P("data"))),
      )
    )
    rows.append(("shard_map, axis_name", name, f.lower(p, xs, cts, st)))
  return [(mode, name, collectives(low.compile().as_text())) for mode, name, low in rows]


def _resnet(batch, mesh, reps, blocks):
  sharded = NamedSharding(mesh, P("data"))
  names = ["jaxbn", "flax", "identity"]
  steps, inputs, texts = {}, {}, {}
  for name in names:
    spec = bench_models.MODELS["resnet18"]
    model = spec.cls(norm=bench_models.NORMS[name])
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.device_put(jax.random.normal(kx, (batch, *spec.shape)), sharded)
    labels = jax.device_put(jax.random.randint(ky, (batch,), 0, 10), sharded)
    variables = model.init(kp, x[:2], train=False)
    params, stats = variables["params"], variables.get("batch_stats", {})
    tx = optax.sgd(0.1, momentum=0.9)
    args = (params, stats, tx.init(params), x, labels)
    compiled = jax.jit(bench_models.make_train_step(model, tx)).lower(*args).compile()
    steps[name], texts[name], inputs[name] = compiled, compiled.as_text(), args
  times = bench_models.interleaved_times(steps, inputs, reps)
  diff = {
    n: [(a - b) * 1e3 for a, b in zip(times[n], times["identity"], strict=True)] for n in names
  }
  size = max(reps // blocks, 1)
  blk = {
    n: [statistics.median(d[b : b + size]) for b in range(0, reps - size + 1, size)]
    for n, d in diff.items()
  }
  return {
    n: {
      "step": statistics.median(times[n]) * 1e3,
      "over": statistics.median(diff[n]),
      "range": (min(blk[n]), max(blk[n])),
      "coll": collectives(texts[n]),
    }
    for n in names
  }


def main():
  args = ARGS
  shape = tuple(int(s) for s in args.shape.split(","))
  mesh = jax.make_mesh((args.devices,), ("data",), axis_types=(AxisType.Auto,))
  print(
    f"jax {jax.__version__}, {args.devices} virtual CPU devices on {os.cpu_count()} cores, "
    f"float32; one BN layer {shape}"
  )
  print(
    "\n| mode | norm | all-reduces (bytes) | in a conditional branch (bytes) | all-gathers |"
    "\n|---|---|---|---|---|"
  )
  for mode, name, c in _layer_steps(shape, mesh):
    print(
      f"| {mode} | {name} | {c['main'][0]} ({c['main'][1]} B) | "
      f"{c['cond'][0]} ({c['cond'][1]} B) | {c['gather'][0]} |"
    )
  if args.no_resnet:
    return
  t0 = time.perf_counter()
  r = _resnet(args.batch, mesh, args.reps, args.blocks)
  print(
    f"\nResNet-18 32x32x3, global batch {args.batch} over {args.devices} devices (GSPMD), "
    f"median of {args.reps} interleaved rounds, {time.perf_counter() - t0:.0f} s"
  )
  print(
    "\n| norm | step (ms) | BN overhead (ms) [blocks] | overhead / flax's | all-reduces "
    "(bytes) | in conditional branches | all-gathers |\n|---|---|---|---|---|---|---|"
  )
  for n in ("jaxbn", "flax", "identity"):
    v, c = r[n], r[n]["coll"]
    ratio = v["over"] / r["flax"]["over"] if r["flax"]["over"] > 0 else float("nan")
    print(
      f"| {n} | {v['step']:.1f} | {v['over']:.1f} [{v['range'][0]:.1f}, {v['range'][1]:.1f}] | "
      f"{ratio:.2f} | {c['main'][0]} ({c['main'][1] / 1024:.1f} KiB) | {c['cond'][0]} "
      f"({c['cond'][1] / 1024:.1f} KiB) | {c['gather'][0]} |"
    )


if __name__ == "__main__":
  main()
