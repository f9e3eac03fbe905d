"""Batch-norm overhead in whole train steps: ResNet-18 (32x32), the digits MLP and CNN.

Each model is built with four interchangeable norm classes and run as flax's
ImageNet example runs its train step: forward with ``mutable=['batch_stats']``,
the loss returns ``(loss, new_batch_stats)`` (``has_aux``), backward, an
``optax.sgd`` update with momentum, all under one ``jax.jit``, with parameters,
statistics and optimizer state threaded from step to step. The norms:

- ``jaxbn``: ``jaxbn.linen.BatchNorm()``;
- ``flax``: ``flax.linen.BatchNorm()`` (defaults: one-pass variance);
- ``flax-2pass``: ``flax.linen.BatchNorm(use_fast_variance=False)``;
- ``identity``: a module with the same call signature that returns ``x``.

A step minus the identity step is the batch-norm overhead of that step. The
four compiled steps of a model are kept in memory and run interleaved (each
once per repetition, in a new random order every repetition). Reported: median step time; the
overhead, as the median over repetitions of the step minus the identity step
of the same repetition, with its smallest and largest value over ``--blocks``
blocks of consecutive repetitions; overhead ratios; the overhead of the
fastest runs; XLA's cost analysis (bytes accessed) and compiled temporary
memory of each whole step.

``--profile`` instead traces the interleaved steps with ``jax.profiler`` and
reports, per group of ops (convolutions, their kernel gradients, the
transposes XLA inserts for them, batch-norm reductions and elementwise
passes, ...), the sum of each op's fastest time, the critical path of the
step (the costliest chain of ops that depend on each other) and its
batch-norm part. ``--one-core`` runs on one core, where XLA runs one op at a
time and the per-op times add up to the step. ``--reductions`` times the
formulations of the batch statistics alone.

Usage:
  python benchmarks/bench_models.py [--reps 16] [--batch 32 128] [--models resnet18 mlp cnn]
  python benchmarks/bench_models.py --quick          # smoke run, a few repetitions
  python benchmarks/bench_models.py --profile --one-core --models resnet18 --batch 32 --reps 10
  python benchmarks/bench_models.py --reductions --one-core --reps 300
"""

from __future__ import annotations

import argparse
import bisect
import collections
import functools
import glob
import math
import os
import platform
import random
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.profiler import ProfileData

from jaxbn import linen as jbn

# --------------------------------------------------------------------------
# Norms


class IdentityNorm(nn.Module):
  """No normalization: the call signature of a batch norm, returns ``x``.

  Attributes:
    use_running_average: accepted and ignored.
  """

  use_running_average: bool | None = None

  @nn.compact
  def __call__(
    self, x: jax.Array, use_running_average: bool | None = None, *, mask: Any = None
  ) -> jax.Array:
    """Returns ``x`` unchanged."""
    return x


NORMS: dict[str, Callable[..., nn.Module]] = {
  "jaxbn": jbn.BatchNorm,
  "flax": nn.BatchNorm,
  "flax-2pass": functools.partial(nn.BatchNorm, use_fast_variance=False),
  "identity": IdentityNorm,
}

# --------------------------------------------------------------------------
# Models, each with a pluggable norm class


class BasicBlock(nn.Module):
  """ResNet basic block: two 3x3 convolutions, each followed by a norm.

  A projection shortcut (1x1 convolution with the block's stride, then a
  norm) replaces the identity when the shape changes.

  Attributes:
    filters: output channels.
    strides: stride of the first convolution and of the projection.
    norm: norm class, called with ``use_running_average``.
  """

  filters: int
  strides: int
  norm: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """The block's output, ``relu(norm(conv(relu(norm(conv(x))))) + shortcut)``."""
    norm = functools.partial(self.norm, use_running_average=not train)
    conv = functools.partial(nn.Conv, use_bias=False)
    s = (self.strides, self.strides)
    y = conv(self.filters, (3, 3), s)(x)
    y = nn.relu(norm()(y))
    y = conv(self.filters, (3, 3))(y)
    y = norm()(y)
    if x.shape != y.shape:
      x = conv(self.filters, (1, 1), s, name="conv_proj")(x)
      x = norm(name="norm_proj")(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet-18 for 32x32 NHWC images (CIFAR-style: 3x3 stem, no max pool).

  Attributes:
    norm: norm class, called with ``use_running_average``.
    num_classes: number of logits.
  """

  norm: Callable[..., nn.Module]
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Logits of images ``x`` of shape ``(N, 32, 32, 3)``."""
    x = nn.Conv(64, (3, 3), use_bias=False, name="conv_init")(x)
    x = nn.relu(self.norm(use_running_average=not train, name="bn_init")(x))
    for i, filters in enumerate((64, 128, 256, 512)):
      for j in range(2):
        strides = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(filters, strides, self.norm)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class MLP(nn.Module):
  """The digits MLP of :class:`jaxbn.models.MLP`: ``Dense -> norm -> sigmoid`` blocks.

  Attributes:
    norm: norm class, called with ``use_running_average``.
    features: widths of the hidden layers.
    num_classes: number of logits.
  """

  norm: Callable[..., nn.Module]
  features: Sequence[int] = (100, 100, 100)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Logits of ``x`` of shape ``(N, D)``."""
    for width in self.features:
      x = nn.Dense(width, use_bias=False)(x)
      x = jax.nn.sigmoid(self.norm(use_running_average=not train)(x))
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """The digits CNN of :class:`jaxbn.models.CNN`: ``Conv 3x3 -> norm -> relu -> max pool`` blocks.

  Attributes:
    norm: norm class, called with ``use_running_average``.
    features: channels of the convolution blocks.
    num_classes: number of logits.
  """

  norm: Callable[..., nn.Module]
  features: Sequence[int] = (32, 64)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Logits of NHWC images ``x``."""
    for channels in self.features:
      x = nn.Conv(channels, (3, 3), padding="SAME", use_bias=False)(x)
      x = jax.nn.relu(self.norm(use_running_average=not train)(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class ModelSpec(NamedTuple):
  """A benchmarked model: class, input shape without the batch, batch sizes, label.

  ``rep_scale`` multiplies ``--reps`` (the small models take well under a
  millisecond per step and need more runs for a stable median).
  """

  cls: type[nn.Module]
  shape: tuple[int, ...]
  batches: tuple[int, ...]
  label: str
  rep_scale: int = 1


MODELS: dict[str, ModelSpec] = {
  "resnet18": ModelSpec(ResNet18, (32, 32, 3), (32, 128), "ResNet-18, 32x32x3"),
  "mlp": ModelSpec(MLP, (64,), (60,), "MLP 64-100-100-100-10, sigmoid (digits)", 25),
  "cnn": ModelSpec(CNN, (8, 8, 1), (60,), "CNN 32-64 on 8x8x1 (digits)", 25),
}

# --------------------------------------------------------------------------
# The train step


def make_train_step(model: nn.Module, tx: optax.GradientTransformation) -> Callable:
  """The train step of flax's ImageNet example, without the learning-rate schedule.

  Args:
    model: a linen module called as ``model.apply(variables, x, train=True)``.
    tx: the optimizer.

  Returns:
    ``step(params, batch_stats, opt_state, x, labels) -> (params, batch_stats,
    opt_state, loss)``, not yet jitted.
  """

  def step(params, batch_stats, opt_state, x, labels):
    def loss_fn(p):
      logits, updates = model.apply(
        {"params": p, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates.get("batch_stats", {})

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return step


def build(model_name: str, norm: Callable[..., nn.Module], batch: int, seed: int = 0):
  """The compiled step of one model and norm, and its initial arguments.

  Args:
    model_name: a key of :data:`MODELS`.
    norm: a norm class.
    batch: the batch size.
    seed: seed of the parameters and of the (random) batch.

  Returns:
    ``(compiled, args)``: ``compiled(*args)`` runs one step; its first three
    outputs are the next step's first three arguments.
  """
  spec = MODELS[model_name]
  model = spec.cls(norm=norm)
  kx, ky, kp = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (batch, *spec.shape), jnp.float32)
  labels = jax.random.randint(ky, (batch,), 0, 10)
  variables = model.init(kp, x, train=False)
  params, stats = variables["params"], variables.get("batch_stats", {})
  tx = optax.sgd(0.1, momentum=0.9)
  args = (params, stats, tx.init(params), x, labels)
  compiled = jax.jit(make_train_step(model, tx)).lower(*args).compile()
  return compiled, args


def bytes_accessed(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends report no analysis
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return (cost or {}).get("bytes accessed")


def temp_bytes(compiled) -> int | None:
  try:
    return compiled.memory_analysis().temp_size_in_bytes
  except Exception:
    return None


def round_orders(names: Sequence[str], rounds: int):
  """The order of ``names`` in each of ``rounds`` rounds: a new random one every round.

  Seeded, so every run uses the same orders. Each name follows every other about
  equally often, so that none always finds the caches as one neighbour left them
  (a fixed or a rotated order keeps the same neighbours), and all see the same load.
  """
  order, rng = list(names), random.Random(0)
  for _ in range(rounds):
    rng.shuffle(order)
    yield list(order)


def interleaved_times(steps: dict, args: dict, reps: int) -> dict[str, list[float]]:
  """Seconds per call of each compiled train step, run in the orders of :func:`round_orders`.

  ``steps[name]`` is a compiled ``step(params, batch_stats, opt_state, x,
  labels)`` returning the first three updated; ``args[name]`` its initial
  arguments. The first ``2 * len(steps)`` rounds warm up; then every round
  runs each step once.
  """
  names = list(steps)
  state = {n: args[n][:3] for n in names}
  consts = {n: args[n][3:] for n in names}
  times = {n: [] for n in names}
  warm = 2 * len(names)  # the first rounds warm up
  for r, order in enumerate(round_orders(names, warm + reps), -warm):
    for name in order:
      t0 = time.perf_counter()
      out = steps[name](*state[name], *consts[name])
      jax.block_until_ready(out)
      if r >= 0:
        times[name].append(time.perf_counter() - t0)
      state[name] = out[:3]
  return times


def bench(model_name: str, batch: int, reps: int, blocks: int) -> dict:
  """Interleaved timing of the four norms in one model at one batch size."""
  names = list(NORMS)
  steps, args = {}, {}
  for name in names:
    steps[name], args[name] = build(model_name, NORMS[name], batch)
  times = interleaved_times(steps, args, reps)

  med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
  # Overhead: the median over rounds of (step - identity step) in the same
  # round, which cancels the load that both saw.
  diff = {
    n: [(a - b) * 1e3 for a, b in zip(t, times["identity"], strict=True)] for n, t in times.items()
  }
  over = {n: statistics.median(d) for n, d in diff.items()}
  best = {n: (min(t) - min(times["identity"])) * 1e3 for n, t in times.items()}
  size = max(reps // blocks, 1)
  block_over = {
    n: [statistics.median(d[b : b + size]) for b in range(0, reps - size + 1, size)]
    for n, d in diff.items()
  }
  ratio_blocks = {
    ref: [j / f for j, f in zip(block_over["jaxbn"], block_over[ref], strict=True) if f > 0]
    for ref in ("flax", "flax-2pass")
  }
  return {
    "model": model_name,
    "batch": batch,
    "med": med,
    "over": over,
    "best": best,
    "over_range": {n: (min(v), max(v)) for n, v in block_over.items()},
    "ratio_range": {
      k: (min(v), max(v)) if v else (float("nan"),) * 2 for k, v in ratio_blocks.items()
    },
    "bytes": {n: bytes_accessed(steps[n]) for n in names},
    "temp": {n: temp_bytes(steps[n]) for n in names},
  }


def _mib(b) -> str:
  return "n/a" if b is None else f"{b / 2**20:.1f}"


def _ratio(a: float, b: float) -> str:
  return f"{a / b:.2f}" if b > 0 else "n/a"


def _overhead_cell(r: dict, n: str) -> str:
  lo, hi = r["over_range"][n]
  return f"{r['over'][n]:.2f} [{lo:.2f}, {hi:.2f}]"


def _ratio_cell(r: dict, ref: str) -> str:
  lo, hi = r["ratio_range"][ref]
  return f"{_ratio(r['over']['jaxbn'], r['over'][ref])} [{lo:.2f}, {hi:.2f}]"


def print_tables(rows: list[dict]) -> None:
  """Prints the step-time table and the bytes / memory table (Markdown)."""
  hdr = (
    "| model | batch | identity (ms) | jaxbn (ms) | flax (ms) | flax-2pass (ms) | "
    "BN overhead jaxbn (ms) | flax (ms) | flax-2pass (ms) | jaxbn/flax | jaxbn/flax-2pass | "
    "best-of-N overhead (ms) jaxbn / flax / flax-2pass |"
  )
  print(hdr)
  print("|" + "---|" * (hdr.count("|") - 1))
  for r in rows:
    m, best = r["med"], r["best"]
    cells = [
      MODELS[r["model"]].label,
      str(r["batch"]),
      *(f"{m[n]:.2f}" for n in ("identity", "jaxbn", "flax", "flax-2pass")),
      *(_overhead_cell(r, n) for n in ("jaxbn", "flax", "flax-2pass")),
      _ratio_cell(r, "flax"),
      _ratio_cell(r, "flax-2pass"),
      " / ".join(f"{best[n]:.2f}" for n in ("jaxbn", "flax", "flax-2pass")),
    ]
    print("| " + " | ".join(cells) + " |")
  print()
  hdr = (
    "| model | batch | bytes accessed MiB: identity / jaxbn / flax / flax-2pass | "
    "BN bytes (minus identity) MiB: jaxbn / flax / flax-2pass | "
    "temp MiB: identity / jaxbn / flax / flax-2pass |"
  )
  print(hdr)
  print("|" + "---|" * (hdr.count("|") - 1))
  order = ("identity", "jaxbn", "flax", "flax-2pass")
  for r in rows:
    b, t = r["bytes"], r["temp"]
    if all(b[n] is not None for n in order):
      extra = " / ".join(_mib(b[n] - b["identity"]) for n in order[1:])
    else:
      extra = "n/a"
    cells = [
      MODELS[r["model"]].label,
      str(r["batch"]),
      " / ".join(_mib(b[n]) for n in order),
      extra,
      " / ".join(_mib(t[n]) for n in order),
    ]
    print("| " + " | ".join(cells) + " |")


# --------------------------------------------------------------------------
# Profile: per-op times of the compiled steps


class _Op(NamedTuple):
  shape: str  # result shape as XLA prints it
  op_name: str  # JAX source path kept as metadata ("" for ops XLA made up)
  operands: tuple[str, ...]


def hlo_ops(compiled) -> dict[str, _Op]:
  """The instructions of the entry computation of a compiled step, in schedule order."""
  text = compiled.as_text()
  ops = {}
  for line in text[text.index("\nENTRY") :].splitlines():
    m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) [\w-]+\((.*?)\)", line)
    if m:
      meta = re.search(r'op_name="([^"]*)"', line)
      operands = tuple(re.findall(r"%([\w.-]+)", m.group(3)))
      ops[m.group(1)] = _Op(m.group(2), meta.group(1) if meta else "", operands)
  return ops


def _critical_path(ops: dict[str, _Op], cost: dict[str, float]) -> list[str]:
  """The chain of dependent ops with the largest total cost (the entry is in topological order)."""
  dist, pred = {}, {}
  for name, op in ops.items():
    prev = max((o for o in op.operands if o in dist), key=dist.get, default=None)
    dist[name] = (dist[prev] if prev else 0.0) + cost.get(name, 0.0)
    pred[name] = prev
  path, name = [], max(dist, key=dist.get)
  while name:
    path.append(name)
    name = pred[name]
  return path


_BN_LAYERS = ("BatchNorm", "norm_proj", "bn_init")


def op_category(name: str, shape: str, op_name: str) -> str:
  """Groups one thunk of a compiled train step by what it computes.

  ``op_name`` is the JAX source path XLA keeps as metadata; ``transpose(``
  in it marks the backward pass. Fusions without one are those XLA builds
  for the kernel gradients of the convolutions: the gradient convolution
  itself (a YNNPACK fusion) and the transposing copies of its two operands.
  """
  d = "backward" if "transpose(" in op_name else "forward"
  last = op_name.rsplit("/", 1)[-1]
  if not op_name:
    if name.startswith("transpose"):
      kernel = re.match(r"f32\[(1,1|3,3|7,7),", shape) is not None
      return "transposes of kernels" if kernel else "transposes of activations (dW operands)"
    if name.startswith("ynn_fusion") or name.startswith("convolution"):
      return "conv, kernel gradient (dW)"
    return "other"
  if "conv_general_dilated" in op_name:
    return "conv, input gradient (dx)" if d == "backward" else "conv, forward"
  if "dot_general" in op_name:
    return f"matmul, {d}"
  if any(k in op_name for k in _BN_LAYERS):
    return f"BN {'reductions' if last.startswith('reduce') else 'elementwise'}, {d}"
  if any(k in op_name for k in ("relu", "select_n", "add_any", "max", "logistic")) or last == "add":
    return f"activation, residual add, {d}"
  return "other (loss, pooling, optimizer)"


def traced_op_times(runs: dict, ops: dict, reps: int, trace_dir: str) -> tuple[dict, dict]:
  """Times every op of interleaved runs from one ``jax.profiler`` trace.

  Args:
    runs: name -> a callable that runs one step and waits for it.
    ops: name -> the op names of that step's compiled program (:func:`hlo_ops`).
    reps: rounds; each runs every step once (:func:`round_orders`).
    trace_dir: where the trace is written.

  Returns:
    ``(costs, walls)``: ``costs[name]`` maps each op to its fastest time over
    the rounds in ms (a run slowed by another process is never faster);
    ``walls[name]`` lists each run's wall time in ms.
  """
  names = list(runs)
  jax.profiler.start_trace(trace_dir)
  for r, order in enumerate(round_orders(names, reps)):
    for name in order:
      with jax.profiler.TraceAnnotation(f"step|{name}|{r}"):
        runs[name]()
  jax.profiler.stop_trace()

  (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  windows, events = [], []
  for plane in ProfileData.from_file(path).planes:
    for line in plane.lines:
      for ev in line.events:
        if ev.name.startswith("step|"):
          _, name, r = ev.name.split("|")
          windows.append((ev.start_ns, ev.start_ns + ev.duration_ns, name, int(r)))
        else:
          events.append((ev.start_ns, ev.duration_ns, ev.name))
  windows.sort()
  starts = [w[0] for w in windows]
  per_round = collections.defaultdict(collections.Counter)  # (name, round) -> op -> ns
  walls = collections.defaultdict(list)
  for lo, hi, name, _ in windows:
    walls[name].append((hi - lo) / 1e6)
  for t, dur, op in events:
    i = bisect.bisect_right(starts, t) - 1
    if i >= 0 and t <= windows[i][1] and op in ops[windows[i][2]]:
      per_round[windows[i][2], windows[i][3]][op] += dur
  costs = {
    name: {op: min(per_round[name, r].get(op, 0) for r in range(reps)) / 1e6 for op in ops[name]}
    for name in names
  }
  return costs, walls


def profile(model_name: str, batch: int, reps: int, trace_dir: str) -> dict:
  """Per-op times of the four steps from one ``jax.profiler`` trace of interleaved runs.

  Each op's time is its minimum over the ``reps`` rounds (a run slowed by
  another process is never faster), summed per :func:`op_category`.
  """
  names = list(NORMS)
  steps, state, consts, ops = {}, {}, {}, {}

  def run(name):
    out = steps[name](*state[name], *consts[name])
    jax.block_until_ready(out)
    state[name] = out[:3]

  for name in names:
    compiled, args = build(model_name, NORMS[name], batch)
    steps[name], ops[name] = compiled, hlo_ops(compiled)
    state[name], consts[name] = args[:3], args[3:]
    for _ in range(2):
      run(name)
  costs, walls = traced_op_times(
    {name: functools.partial(run, name) for name in names}, ops, reps, trace_dir
  )
  cats = {}
  for name in names:
    cost = costs[name]
    c = collections.Counter()
    for op, o in ops[name].items():
      c[op_category(op, o.shape, o.op_name)] += cost[op]
    path = _critical_path(ops[name], cost)
    c["sum of all ops"] = sum(c.values())
    c["critical path"] = sum(cost[op] for op in path)
    c["critical path: BN ops"] = sum(
      cost[op] for op in path if any(k in ops[name][op].op_name for k in _BN_LAYERS)
    )
    c["step, fastest run"] = min(walls[name])
    cats[name] = c
  return {"model": model_name, "batch": batch, "cats": cats}


def print_profile(p: dict) -> None:
  """Markdown table of one :func:`profile` result, largest categories first.

  "critical path" is the costliest chain of ops that depend on each other:
  the time of the step with unlimited cores (each op costing what it cost
  here); "sum of all ops" is its time on one core.
  """
  names = ["identity", "jaxbn", "flax", "flax-2pass"]
  cats = p["cats"]
  print(f"\n{MODELS[p['model']].label}, batch {p['batch']}: per-op minimum over runs, ms")
  hdr = "| ops | " + " | ".join(names) + " | jaxbn - identity | flax - identity |"
  print(hdr)
  print("|" + "---|" * (hdr.count("|") - 1))
  keys = sorted(set().union(*cats.values()), key=lambda k: -max(c.get(k, 0) for c in cats.values()))
  totals = ["sum of all ops", "critical path", "critical path: BN ops", "step, fastest run"]
  keys = [k for k in keys if k not in totals] + totals
  for k in keys:
    v = {n: cats[n].get(k, 0.0) for n in names}
    if max(v.values()) < 0.005:
      continue
    print(
      f"| {k} | "
      + " | ".join(f"{v[n]:.2f}" for n in names)
      + f" | {v['jaxbn'] - v['identity']:+.2f} | {v['flax'] - v['identity']:+.2f} |"
    )


# --------------------------------------------------------------------------
# Reductions: the statistics' formulations alone

_YNN_REDUCE_OFF = {
  "xla_cpu_experimental_ynn_fusion_type": (
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
  )
}


def reductions(shape: tuple[int, ...], reps: int) -> list[tuple[str, float, float]]:
  """Times per-feature statistics of ``x`` of ``shape`` written in several ways.

  Returns:
    ``(formulation, fastest ms, median ms)`` for each, interleaved run by run.
  """
  axes = tuple(range(len(shape) - 1))
  n = math.prod(shape[:-1])
  x = jax.random.normal(jax.random.key(0), shape) * 2 + 3
  dy = jax.random.normal(jax.random.key(1), shape)
  m = jnp.mean(x, axes, keepdims=True)

  def two_pass(x):
    mu = jnp.sum(x, axes, keepdims=True) / n
    return jnp.sum(jnp.square(x - mu), axes)

  def shifted_two_pass(x):
    k = x[(slice(0, 1),) * len(axes)]
    mu = k + jnp.sum(x - k, axes, keepdims=True) / n
    return jnp.sum(jnp.square(x - mu), axes)

  def sum_sq(x):
    return jnp.sum(x, axes), jnp.sum(x * x, axes)

  cases = [
    ("sum(x)", lambda x: jnp.sum(x, axes), (x,), None),
    ("sum(x * x)", lambda x: jnp.sum(x * x, axes), (x,), None),
    ("sum(x + 1) (any fused elementwise op)", lambda x: jnp.sum(x + 1.0, axes), (x,), None),
    ("sum((x - m)^2), m given", lambda x, m: jnp.sum(jnp.square(x - m), axes), (x, m), None),
    ("sum(dy * x)", lambda d, x: jnp.sum(d * x, axes), (dy, x), None),
    ("sum(dy * (x - m)), m given", lambda d, x, m: jnp.sum(d * (x - m), axes), (dy, x, m), None),
    ("flax one-pass: sum(x), sum(x * x)", sum_sq, (x,), None),
    ("two-pass: mean = sum(x) / n; sum((x - mean)^2)", two_pass, (x,), None),
    ("shifted two-pass: K = x[0]; sum(x - K); sum((x - mean)^2)", shifted_two_pass, (x,), None),
    ("two-pass, YNNPACK reductions off", two_pass, (x,), _YNN_REDUCE_OFF),
  ]
  compiled = []
  for label, fn, args, opts in cases:
    c = jax.jit(fn).lower(*args).compile(compiler_options=opts)
    jax.block_until_ready(c(*args))
    compiled.append((label, c, args))
  times = {label: [] for label, _, _ in compiled}
  for _ in range(reps):
    for label, c, args in compiled:
      t0 = time.perf_counter()
      jax.block_until_ready(c(*args))
      times[label].append(time.perf_counter() - t0)
  return [(k, min(v) * 1e3, statistics.median(v) * 1e3) for k, v in times.items()]


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--reps", type=int, default=16, help="timed steps of each variant")
  ap.add_argument(
    "--batch", type=int, nargs="+", default=None, help="batch sizes (default: each model's own)"
  )
  ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
  ap.add_argument("--blocks", type=int, default=4, help="blocks of repetitions for the spread")
  ap.add_argument("--quick", action="store_true", help="3 repetitions, small batches (smoke run)")
  ap.add_argument(
    "--profile", action="store_true", help="per-op times from a jax.profiler trace instead"
  )
  ap.add_argument(
    "--one-core",
    action="store_true",
    help="run on one core (XLA then runs one op at a time, so per-op times add up)",
  )
  ap.add_argument(
    "--reductions",
    type=str,
    nargs="*",
    default=None,
    metavar="N,H,W,C",
    help="time formulations of the statistics alone on these shapes instead",
  )
  args = ap.parse_args()
  if args.one_core:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before XLA sizes its thread pool
  reps = 3 if args.quick else args.reps
  blocks = 1 if args.quick else args.blocks

  dev = jax.devices()[0]
  print(
    f"{_cpu_model()}, {len(os.sched_getaffinity(0))} of {os.cpu_count()} cores, {dev.platform}; "
    f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
    f"numpy {np.__version__}; float32"
  )
  t0 = time.perf_counter()
  load0 = os.getloadavg()[0]
  if args.reductions is not None:
    for shape in args.reductions or ["32,32,32,64", "128,32,32,64"]:
      shape = tuple(int(d) for d in shape.split(","))
      print(f"\nshape {shape}, fastest and median of {reps} interleaved runs")
      print("| statistics | fastest (ms) | median (ms) |\n|---|---|---|")
      for label, best, med in reductions(shape, reps):
        print(f"| {label} | {best:.3f} | {med:.3f} |")
  elif args.profile:
    print(f"per-op minimum over {reps} interleaved runs of each step")
    with tempfile.TemporaryDirectory() as trace_dir:
      for name in args.models:
        for b in args.batch or MODELS[name].batches:
          print_profile(profile(name, b, reps, os.path.join(trace_dir, f"{name}_{b}")))
  else:
    print(
      f"median of {reps} interleaved steps"
      + ("" if args.quick else f" ({reps * MODELS['mlp'].rep_scale} for the MLP and CNN)")
    )
    print(
      "BN overhead = median over rounds of (step - identity step in the same round) "
      f"[smallest, largest over {blocks} blocks of consecutive rounds]; ratios of the "
      "overheads likewise; best-of-N = fastest step - fastest identity step.\n"
    )
    rows = []
    for name in args.models:
      spec = MODELS[name]
      batches = args.batch or spec.batches
      if args.quick:
        batches = sorted({min(b, 8) for b in batches})
      for b in batches:
        rows.append(bench(name, b, reps * (1 if args.quick else spec.rep_scale), blocks))
    print_tables(rows)
  print(
    f"\n{time.perf_counter() - t0:.0f} s; 1-minute load average {load0:.1f} at the start, "
    f"{os.getloadavg()[0]:.1f} at the end"
  )


if __name__ == "__main__":
  main()
