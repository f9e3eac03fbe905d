"""Joint statistics: several inputs normalized with one set of batch statistics.

``bn_train(params, state, (x1, x2))`` is specified by the concatenation: its outputs and its
state update are those of ``bn_train`` on the inputs concatenated along the batch axis (within
float32 rounding; the differences, in ulps, print with ``-s``), and float64 NumPy agrees with
both. The concatenation is never formed: the compiled step has no buffer of the joint size, and
across devices the forward keeps its one all-reduce.
"""

import functools
import re
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.equinox
import jaxbn.linen
import jaxbn.nnx
from tests.reference import bn_train_ref
from tests.test_core_autodiff import plain_bn
from tests.test_sharding import _collectives

F32 = float(np.finfo(np.float32).eps)
STATS = dict(rtol=32 * F32)  # statistics against the concatenation's: sums in another order


def _ulps(got, want, floor=0.0):
  """Largest ``|got - want|`` in float32 spacings of ``max(|want|, floor)``.

  Outputs take as floor their largest magnitude: their rounding is that of statistics shared
  by every value, so it scales with the output's range, not with each value.
  """
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  spacing = np.spacing(np.maximum(np.abs(want), floor).astype(np.float32)).astype(np.float64)
  return float(np.max(np.abs(got - want) / spacing))


def _assert_like(ys, y, ulps=16):
  """Outputs within ``ulps`` of the output's range of ``y``, the concatenation's (rounding)."""
  got = np.concatenate([np.asarray(t, np.float32).reshape(-1, y.shape[-1]) for t in ys])
  assert _ulps(got, np.asarray(y).reshape(-1, y.shape[-1]), float(jnp.max(jnp.abs(y)))) <= ulps


def _setup(features=(4,), seed=0):
  """Non-trivial params and a state whose running mean is far from the data (a refined pass)."""
  rng = np.random.default_rng(seed)
  params = jaxbn.BNParams(
    jnp.asarray(rng.uniform(0.5, 2.0, features), jnp.float32),
    jnp.asarray(rng.normal(size=features), jnp.float32),
  )
  _, state = jaxbn.bn_init(features)
  state = state._replace(
    mean=jnp.asarray(rng.normal(size=features), jnp.float32),
    var=jnp.asarray(rng.uniform(0.5, 2.0, features), jnp.float32),
  )
  return params, state


def _data(shape, seed, offset=3.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=shape) * 2 + offset, jnp.float32)


# name -> (shapes, axis, options, masked). Inputs differ in batch size, positions and rank.
CASES = {
  "dense": (((16, 4), (24, 4)), -1, {}, False),
  "masked": (((16, 4), (24, 4)), -1, {}, True),
  "three_inputs": (((8, 4), (5, 4), (12, 4)), -1, {"momentum": None}, False),
  "nhwc": (((4, 3, 5, 4), (2, 3, 5, 4)), -1, {}, True),
  "nchw": (((4, 4, 3, 5), (6, 4, 3, 5)), 1, {}, False),
  "ranks": (((16, 4), (3, 5, 4)), -1, {}, False),
  "far_from_zero": (((64, 4), (32, 4)), -1, {"offset": 1e6}, False),
  "renorm": (((16, 4), (24, 4)), -1, {"renorm": jaxbn.Renorm(1.5, 0.5)}, False),
}
FAST = ("masked", "nhwc", "ranks", "far_from_zero")  # the others in the full tier


def _case(name):
  shapes, axis, options, masked = CASES[name]
  options = dict(options)
  offset = options.pop("offset", 3.0)
  xs = tuple(_data(s, i, offset) for i, s in enumerate(shapes))
  masks = None
  if masked:
    # Whole examples out of the first input; single values out of the second.
    shape0 = (shapes[0][0],) + (1,) * (len(shapes[0]) - 1)
    m0 = jnp.asarray(np.arange(shape0[0]) % 3 != 0).reshape(shape0)
    m1 = jnp.asarray(np.random.default_rng(9).random(shapes[1]) < 0.7)
    masks = (m0, m1) + (None,) * (len(shapes) - 2)
  return xs, masks, axis, options


def _flat(x, axis):
  """``x`` as rows of features, float64 (a bool mask: as 0 and 1)."""
  x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
  return x.reshape(-1, x.shape[-1])


def _full_masks(xs, masks):
  if masks is None:
    return None
  return [
    np.ones(x.shape, bool) if m is None else np.broadcast_to(np.asarray(m), x.shape)
    for m, x in zip(masks, xs, strict=True)
  ]


def _concatenation(xs, masks, axis):
  """``(x, mask, axis)``: the inputs concatenated along the batch axis (axis 0).

  Inputs of different ranks are first made rows of features (their reduced axes pooled).
  """
  full = _full_masks(xs, masks)
  if len({x.ndim for x in xs}) == 1:
    return jnp.concatenate(xs), None if full is None else jnp.asarray(np.concatenate(full)), axis
  x = jnp.asarray(np.concatenate([_flat(x, axis) for x in xs]), jnp.float32)  # exact
  mask = None if full is None else jnp.asarray(np.concatenate([_flat(m, axis) for m in full]) > 0)
  return x, mask, -1


def _split(y, xs, axis):
  """The concatenation's output cut back into the inputs' shapes."""
  if len({x.ndim for x in xs}) == 1:
    return np.split(np.asarray(y), np.cumsum([x.shape[0] for x in xs])[:-1])
  out, start = [], 0
  for x in xs:
    moved = np.moveaxis(np.asarray(x), axis, -1).shape
    rows = int(np.prod(moved[:-1]))
    out.append(np.moveaxis(np.asarray(y)[start : start + rows].reshape(moved), -1, axis))
    start += rows
  return out


@pytest.mark.parametrize(
  "name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in CASES]
)
def test_outputs_and_state_are_those_of_the_concatenation(name):
  xs, masks, axis, options = _case(name)
  params, state = _setup()
  step = jax.jit(lambda p, s, xs, m: jaxbn.bn_train(p, s, xs, mask=m, axis=axis, **options))
  ys, new = step(params, state, xs, masks)
  assert isinstance(ys, tuple) and len(ys) == len(xs)
  assert [(y.shape, y.dtype) for y in ys] == [(x.shape, x.dtype) for x in xs]

  cat, cat_mask, cat_axis = _concatenation(xs, masks, axis)
  y_cat, want = jax.jit(
    lambda p, s, x, m: jaxbn.bn_train(p, s, x, mask=m, axis=cat_axis, **options)
  )(params, state, cat, cat_mask)
  top = float(jnp.max(jnp.abs(y_cat)))
  y_ulps = max(_ulps(y, c, top) for y, c in zip(ys, _split(y_cat, xs, axis), strict=True))
  np.testing.assert_array_equal(new.count, want.count)
  assert int(new.step) == int(want.step) == 1
  scale = float(jnp.sqrt(jnp.max(want.var)))
  mean_ulps, var_ulps = _ulps(new.mean, want.mean, scale), _ulps(new.var, want.var)
  print(f"\n{name}: outputs {y_ulps:.1f} ulps, mean {mean_ulps:.1f}, var {var_ulps:.1f}")
  assert y_ulps <= 16 and mean_ulps <= 4 and var_ulps <= 8

  if options:  # renorm and momentum=None: the concatenation is the reference
    return
  # float64 NumPy (Algorithm 1) on the valid values of every input together.
  flat = np.concatenate([_flat(x, axis) for x in xs])
  full = _full_masks(xs, masks)
  valid = None if full is None else np.concatenate([_flat(m, axis) for m in full]) > 0
  momentum = float(np.float32(0.99))  # the running averages weigh in float32
  y_ref, mean_ref, var_ref = bn_train_ref(
    flat, params.scale, params.bias, state.mean, state.var, momentum=momentum, mask=valid
  )
  got = np.concatenate([_flat(y, axis) for y in ys])
  valid = np.ones(got.shape, bool) if valid is None else valid
  ref_ulps = _ulps(got[valid], y_ref[valid], top)
  print(f"{name}: outputs {ref_ulps:.1f} ulps from float64 NumPy")
  assert ref_ulps <= 8
  np.testing.assert_allclose(new.mean, mean_ref, rtol=4 * F32, atol=4 * F32 * scale)
  np.testing.assert_allclose(new.var, var_ref, rtol=8 * F32)


def test_a_single_array_and_a_one_tuple_agree():
  params, state = _setup()
  x = _data((16, 4), 0)
  y, s = jax.jit(lambda x: jaxbn.bn_train(params, state, x))(x)
  (y1,), s1 = jax.jit(lambda x: jaxbn.bn_train(params, state, [x]))(x)
  np.testing.assert_array_equal(y1, y)
  jax.tree.map(np.testing.assert_array_equal, s1, s)


def test_dtypes_are_kept_and_statistics_are_float32():
  params, state = _setup()
  a, b = _data((16, 4), 0).astype(jnp.bfloat16), _data((8, 4), 1)
  (ya, yb), new = jaxbn.bn_train(params, state, (a, b))
  assert (ya.dtype, yb.dtype, new.mean.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)
  y, want = jaxbn.bn_train(params, state, jnp.concatenate([a.astype(jnp.float32), b]))
  np.testing.assert_allclose(new.var, want.var, **STATS)
  _assert_like((yb,), y[16:])
  np.testing.assert_allclose(ya.astype(jnp.float32), y[:16], rtol=2**-8, atol=2**-8)


def test_accumulated_micro_batches_of_pairs_update_as_their_concatenation():
  params, _ = _setup()
  _, acc = jaxbn.bn_init(4, accumulate_steps=2)
  pairs = [(_data((8, 4), 2 * i), _data((6, 4), 2 * i + 1)) for i in range(2)]
  step = jax.jit(lambda s, xs: jaxbn.bn_train(params, s, xs, accumulate_steps=2, momentum=0.5))
  for xs in pairs:
    _, acc = step(acc, xs)
  _, plain = jaxbn.bn_init(4)
  _, want = jaxbn.bn_train(
    params, plain, jnp.concatenate([x for xs in pairs for x in xs]), momentum=0.5
  )
  np.testing.assert_allclose(acc.mean, want.mean, **STATS)
  np.testing.assert_allclose(acc.var, want.var, **STATS)
  np.testing.assert_array_equal(acc.count, want.count)
  assert int(acc.step) == 2


def test_vmap_with_axis_name_is_the_whole_batch_of_both():
  params, state = _setup()
  a, b = _data((8, 4), 0), _data((8, 4), 1)

  def one(a, b):
    return jaxbn.bn_train(params, state, (a, b), axis_name="batch")

  (ya, yb), new = jax.vmap(one, out_axes=((0, 0), None), axis_name="batch")(a, b)
  y, want = jaxbn.bn_train(params, state, jnp.concatenate([a, b]))
  _assert_like((ya, yb), y)
  np.testing.assert_allclose(new.mean, want.mean, **STATS)
  np.testing.assert_allclose(new.var, want.var, **STATS)


def test_vmap_over_groups_gives_each_group_its_joint_statistics():
  """Without axis_name, vmap maps independent problems: MoCo's per-group statistics."""
  params, state = _setup()
  a, b = _data((3, 8, 4), 0), _data((3, 5, 4), 1)
  ys, new = jax.jit(jax.vmap(lambda a, b: jaxbn.bn_train(params, state, (a, b))))(a, b)
  one = jax.jit(lambda x: jaxbn.bn_train(params, state, x))
  for g in range(3):
    y, want = one(jnp.concatenate([a[g], b[g]]))
    _assert_like((ys[0][g], ys[1][g]), y)
    np.testing.assert_allclose(new.mean[g], want.mean, **STATS)


# ------------------------------------------------------------------ gradients


def test_gradients_equal_the_concatenations_and_the_analytic_formulas():
  params, state = _setup()
  a, b = _data((16, 4), 0), _data((24, 4), 1)
  ga, gb = _data((16, 4), 2, 0.0), _data((24, 4), 3, 0.0)

  def joint(p, a, b):
    (ya, yb), _ = jaxbn.bn_train(p, state, (a, b))
    return jnp.sum(ya * ga) + jnp.sum(yb * gb)

  def concatenated(p, a, b):
    y, _ = jaxbn.bn_train(p, state, jnp.concatenate([a, b]))
    return jnp.sum(y * jnp.concatenate([ga, gb]))

  got = jax.jit(jax.grad(joint, (0, 1, 2)))(params, a, b)
  cat = jax.jit(jax.grad(concatenated, (0, 1, 2)))(params, a, b)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5), got, cat)

  # The paper's backward in float64 over both inputs together.
  x = np.concatenate([a, b]).astype(np.float64)
  dy = np.concatenate([ga, gb]).astype(np.float64)
  r = 1 / np.sqrt(x.var(0) + 1e-5)
  xhat = (x - x.mean(0)) * r
  dscale, dbias = (dy * xhat).sum(0), dy.sum(0)
  dx = np.asarray(params.scale, np.float64) * r * (dy - dbias / len(x) - xhat * dscale / len(x))
  np.testing.assert_allclose(got[0].scale, dscale, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got[0].bias, dbias, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.concatenate(got[1:]), dx, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("masked", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_reverse_and_forward_modes_match_plain_autodiff_in_float64(masked):
  """Against Algorithm 1 in plain jnp on the concatenation (tests/test_core_autodiff.py)."""
  with jax.enable_x64(True):
    params, state = jaxbn.bn_init(3, dtype=jnp.float64)
    keys = jax.random.split(jax.random.key(0), 5)
    a = jax.random.normal(keys[0], (5, 3), jnp.float64) * 2 + 1
    b = jax.random.normal(keys[1], (2, 2, 3), jnp.float64) - 1
    s, c = params.scale * 1.5, params.bias + 0.25
    ma = jnp.array([True, False, True, True, True])[:, None] if masked else None
    mb = (jax.random.uniform(keys[2], b.shape) < 0.7) if masked else None
    mask = (
      None if not masked else jnp.concatenate([jnp.broadcast_to(ma, a.shape), mb.reshape(-1, 3)])
    )

    def ours(s, c, a, b):
      ya, yb = jaxbn.bn_train(jaxbn.BNParams(s, c), state, (a, b), mask=(ma, mb))[0]
      return jnp.concatenate([ya, yb.reshape(-1, 3)])

    def ref(s, c, a, b):
      return plain_bn(s, c, jnp.concatenate([a, b.reshape(-1, 3)]), mask=mask)

    ct = jax.random.normal(keys[3], (9, 3), jnp.float64)
    args = (s, c, a, b)
    tangents = tuple(jax.random.normal(keys[4], t.shape, jnp.float64) for t in args)

    @functools.partial(jax.jit, static_argnums=0)
    def derivatives(f, args, tangents):
      loss = lambda *args: jnp.sum(jnp.tanh(f(*args)) * ct)
      grads = jax.grad(loss, (0, 1, 2, 3))(*args)
      # Only b's tangent (the others symbolic zeros): it still meets the joint statistics.
      only_b = jax.jvp(lambda b: f(*args[:3], b), (args[3],), (tangents[3],))[1]
      return grads, jax.jvp(f, args, tangents), only_b

    jax.tree.map(
      lambda p, q: np.testing.assert_allclose(p, q, atol=1e-9),
      derivatives(ours, args, tangents),
      derivatives(ref, args, tangents),
    )


def test_checkpoint_names_save_one_set_of_statistics(capsys):
  params, state = _setup()
  a, b = _data((16, 4), 0), _data((8, 4), 1)
  policy = jax.checkpoint_policies.save_only_these_names(*jaxbn.checkpoint_names)

  def loss(p, a, b):
    (ya, yb), _ = jaxbn.bn_train(p, state, (a, b))
    return jnp.sum(jnp.tanh(ya) ** 2) + jnp.sum(jnp.tanh(yb))

  f = jax.checkpoint(loss, policy=policy)
  jax.ad_checkpoint.print_saved_residuals(f, params, a, b)
  named = [line for line in capsys.readouterr().out.splitlines() if " named " in line]
  assert len(named) == 4 and all(line.startswith("f32[1,4] named 'jaxbn_") for line in named)
  jax.tree.map(
    lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6),
    jax.jit(jax.grad(f, (0, 1, 2)))(params, a, b),
    jax.jit(jax.grad(loss, (0, 1, 2)))(params, a, b),
  )


# ------------------------------------------------------------------ across devices


def _sharded():
  """A mesh of the 8 devices and two inputs split over it (8 and 4 rows per device)."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  a, b = _data((64, 4, 16), 0, 1e4), _data((32, 4, 16), 1, 1e4)
  mb = jnp.asarray(np.arange(32) % 4 != 1)[:, None, None]
  return mesh, jax.device_put((a, b, mb), NamedSharding(mesh, P("data")))


def test_shard_map_collectives_shared_by_both_inputs_and_the_concatenations_statistics():
  mesh, (a, b, mb) = _sharded()
  params, state = _setup((16,))

  def joint(a, b, mb):
    return jaxbn.bn_train(params, state, (a, b), mask=(None, mb), axis_name="data", momentum=0.0)

  def one(a):
    return jaxbn.bn_train(params, state, a, axis_name="data")

  spec = P("data")
  f = jax.shard_map(joint, mesh=mesh, in_specs=(spec,) * 3, out_specs=((spec, spec), P()))
  g = jax.shard_map(one, mesh=mesh, in_specs=spec, out_specs=(spec, P()))
  # Both inputs share the shift's all-reduce and the sums': as many as one input, no
  # conditional.
  assert _collectives(f, a, b, mb) == _collectives(g, a) == (2, 0, [])

  (ya, yb), new = jax.jit(f)(a, b, mb)
  cat = np.concatenate([a, b])
  cat_mask = np.concatenate([np.ones((64, 1, 1), bool), mb])
  y, want = jax.jit(lambda x, m: jaxbn.bn_train(params, state, x, mask=m, momentum=0.0))(
    cat, cat_mask
  )
  top = float(jnp.max(jnp.abs(y)))
  print(f"\nshard_map, 1e4 offset: outputs {_ulps(np.concatenate([ya, yb]), y, top):.1f} ulps")
  _assert_like((ya, yb), y)
  np.testing.assert_allclose(new.mean, want.mean, **STATS)
  np.testing.assert_allclose(new.var, want.var, **STATS)


@pytest.mark.slow
def test_shard_map_gradient_has_the_all_reduces_of_one_input():
  mesh, (a, b, _) = _sharded()
  params, state = _setup((16,))
  spec = P("data")

  def joint_grad(p, a, b):
    def loss(p, a, b):
      (ya, yb), new = jaxbn.bn_train(p, state, (a, b), axis_name="data")
      return jnp.sum(jnp.tanh(ya)) + jnp.sum(yb * yb), new

    return jax.grad(loss, has_aux=True)(p, a, b)

  def one_grad(p, a):
    def loss(p, a):
      y, new = jaxbn.bn_train(p, state, a, axis_name="data")
      return jnp.sum(jnp.tanh(y)), new

    return jax.grad(loss, has_aux=True)(p, a)

  fg = jax.shard_map(joint_grad, mesh=mesh, in_specs=(P(), spec, spec), out_specs=P())
  gg = jax.shard_map(one_grad, mesh=mesh, in_specs=(P(), spec), out_specs=P())
  assert _collectives(fg, params, a, b) == _collectives(gg, params, a)


@pytest.mark.slow
def test_gspmd_jit_over_sharded_inputs_keeps_one_all_reduce():
  """No axis_name, inputs sharded over the batch: XLA sums both inputs in one all-reduce."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  params, state = _setup((16,))
  a, b = jax.device_put((_data((64, 16), 0), _data((32, 16), 1)), NamedSharding(mesh, P("data")))
  f = lambda a, b: jaxbn.bn_train(params, state, (a, b))
  assert _collectives(f, a, b) == _collectives(lambda a: jaxbn.bn_train(params, state, a), a)
  (ya, yb), new = jax.jit(f)(a, b)
  y, want = jaxbn.bn_train(params, state, jnp.concatenate([a, b]))
  _assert_like((ya, yb), y)
  np.testing.assert_allclose(new.var, want.var, **STATS)


# ------------------------------------------------------------------ no concatenation


SHAPE = re.compile(r"\b(f32|bf16|f16|f64|s32|pred)\[([0-9,]*)\]")
BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "pred": 1}


def _buffers(text):
  """``(bytes, shape)`` of every array an instruction of the optimized HLO produces."""
  out = []
  for line in text.splitlines():
    if " = " not in line:
      continue
    rhs = line.split(" = ", 1)[1]
    result = rhs[: rhs.index(")") + 1] if rhs.startswith("(") else rhs.split(" ", 1)[0]  # a tuple
    for dtype, dims in SHAPE.findall(result):
      shape = tuple(int(d) for d in dims.split(",") if d)
      out.append((BYTES[dtype] * int(np.prod(shape)), f"{dtype}[{dims}]"))
  return out


def test_the_compiled_step_holds_no_buffer_of_the_joint_size():
  """A training step (forward and backward) of two (B, F) inputs: nothing of shape (2B, F)."""
  n, f = 256, 64
  params, state = _setup((f,))
  a, b = _data((n, f), 0), _data((n, f), 1)
  ga, gb = _data((n, f), 2, 0.0), _data((n, f), 3, 0.0)

  def joint(p, a, b):
    def loss(p, a, b):
      (ya, yb), new = jaxbn.bn_train(p, state, (a, b))
      return jnp.sum(jnp.tanh(ya) * ga) + jnp.sum(jnp.tanh(yb) * gb), new

    return jax.grad(loss, (0, 1, 2), has_aux=True)(p, a, b)

  def concatenated(p, a, b):
    def loss(p, a, b):
      y, new = jaxbn.bn_train(p, state, jnp.concatenate([a, b]))
      return jnp.sum(jnp.tanh(y[:n]) * ga) + jnp.sum(jnp.tanh(y[n:]) * gb), new

    return jax.grad(loss, (0, 1, 2), has_aux=True)(p, a, b)

  found = {}
  for name, step in (("joint", joint), ("concatenated", concatenated)):
    compiled = jax.jit(step).lower(params, a, b).compile()
    found[name] = sorted(set(_buffers(compiled.as_text())), reverse=True)
    temp = compiled.memory_analysis().temp_size_in_bytes
    print(f"\n{name}: largest buffers {found[name][:3]}; temporaries {temp} bytes")
  joint_bytes = 4 * 2 * n * f
  assert found["joint"][0][0] < joint_bytes, found["joint"][:3]  # nor stacked, (2, B, F)
  assert found["concatenated"][0] == (joint_bytes, f"f32[{2 * n},{f}]")
  grads, _ = jax.jit(joint)(params, a, b)
  want, _ = jax.jit(concatenated)(params, a, b)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5), grads, want)


# ------------------------------------------------------------------ the modules


def test_linen_module_trains_on_a_tuple_and_evaluates_each():
  params, state = _setup()
  a, b = _data((16, 4), 0), _data((8, 4), 1)
  bn = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.5)
  variables = bn.init(jax.random.key(0), (a, b))
  variables = {"params": params._asdict(), "batch_stats": {"mean": state.mean, "var": state.var}}
  (ya, yb), upd = bn.apply(variables, (a, b), mask=(None, b[:, :1] > 2), mutable=["batch_stats"])
  cat_mask = jnp.concatenate([jnp.ones((16, 1), bool), b[:, :1] > 2])
  y, want = jaxbn.bn_train(params, state, jnp.concatenate([a, b]), mask=cat_mask, momentum=0.5)
  _assert_like((ya, yb), y)
  np.testing.assert_allclose(upd["batch_stats"]["var"], want.var, **STATS)
  evaluated = jaxbn.linen.BatchNorm(use_running_average=True).apply(variables, [a, b])
  np.testing.assert_array_equal(evaluated[1], jaxbn.bn_infer(params, state, b))
  half = jaxbn.linen.BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
  assert [y.dtype for y in half.apply(variables, (a, b), mutable=["batch_stats"])[0]] == [
    jnp.bfloat16
  ] * 2


def test_nnx_module_trains_on_a_tuple_and_evaluates_each():
  params, state = _setup()
  a, b = _data((16, 4), 0), _data((3, 2, 4), 1)
  bn = jaxbn.nnx.BatchNorm(4, momentum=0.5, rngs=nnx.Rngs(0))
  jaxbn.nnx.write_module(bn, params, state)
  ya, yb = bn((a, b))
  y, want = jaxbn.bn_train(params, state, jnp.concatenate([a, b.reshape(-1, 4)]), momentum=0.5)
  _assert_like((ya, yb.reshape(-1, 4)), y)
  np.testing.assert_allclose(bn.var[...], want.var, **STATS)
  bn.eval()
  _, eb = bn((a, b))
  np.testing.assert_array_equal(eb, jaxbn.bn_infer(*jaxbn.nnx.read_module(bn), b))


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_equinox_module_trains_on_a_tuple_and_evaluates_each(mode):
  a, b = _data((16, 3, 5), 0), _data((8, 3, 5), 1)
  make = lambda: eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(3, mode=mode, momentum=0.5)
  bn, state = make()
  call = eqx.filter_jit(lambda bn, x, state, inference: bn(x, state, inference=inference))
  (ya, yb), state = call(bn, (a, b), state, False)
  _, plain = make()
  y, want = call(bn, jnp.concatenate([a, b]), plain, False)
  _assert_like((ya, yb), y)
  jax.tree.map(
    lambda u, v: np.testing.assert_allclose(u, v, **STATS), bn.read(state)[1], bn.read(want)[1]
  )
  (_, eb), _ = call(bn, (a, b), state, True)
  np.testing.assert_array_equal(eb, call(bn, b, state, True)[0])
  # Under vmap with axis_name: one example of each input per call (batches of one size).
  vbn, vstate = eqx.nn.make_with_state(jaxbn.equinox.BatchNorm)(3, "batch", mode=mode, momentum=0.5)
  each = eqx.filter_jit(
    lambda m, x, s: jax.vmap(m, ((0, 0), None), ((0, 0), None), axis_name="batch")(x, s)
  )
  (va, vb), vstate = each(vbn, (a[8:], b), vstate)
  _assert_like((va, vb), call(bn, jnp.concatenate([a[8:], b]), make()[1], False)[0])


# ------------------------------------------------------------------ bad inputs


def test_bad_joint_inputs_name_x_and_mask():
  params, state = jaxbn.bn_init(4)
  a, b = _data((8, 4), 0), _data((6, 4), 1)
  cases = [
    ((), {}, ValueError, r"x is an empty tuple"),
    ((a, b.astype(jnp.int32)), {}, TypeError, r"x\[1\] must be a floating-point array"),
    ((a, _data((6, 3), 1)), {}, ValueError, r"x\[1\] of shape \(6, 3\) has feature shape \(3,\)"),
    ((a, b), {"mask": a > 0}, TypeError, r"mask must be None or a tuple of 2 masks"),
    ((a, b), {"mask": (None,)}, ValueError, r"mask must hold 2 masks, one per input.*got 1"),
    (
      (a, b),
      {"mask": (None, a > 0)},
      ValueError,
      r"mask\[1\] of shape \(8, 4\) does not broadcast",
    ),
    ((a, b), {"mask": (a, None)}, TypeError, r"mask\[0\] must be boolean"),
    ((a, b), {"ghost_batch_size": 2}, ValueError, r"ghost_batch_size=2 with 2 inputs"),
  ]
  for x, kw, error, message in cases:
    with pytest.raises(error, match=message):
      jaxbn.bn_train(params, state, x, **kw)
  with pytest.raises(ValueError, match=r"x\[1\] of shape \(6, 3\)"):
    jaxbn.bn_infer(params, state, (a, _data((6, 3), 1)))
  with pytest.warns(jaxbn.SingleValueWarning, match=r"x of shapes \(\(1, 4\), \(0, 4\)\)"):
    jaxbn.bn_train(params, state, (a[:1], a[:0]))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jaxbn.bn_train(params, state, (a[:1], b[:1]))  # two values per feature in all
