"""Statistics of a batch split over devices: exactness with masks, collectives in
the compiled step, and explicit sharding (sharding in types).

Runs on the 8 virtual CPU devices of conftest.py. Every exactness check is
against float64 NumPy on the same float32 input; collective counts are read
from the compiled HLO and compared with flax.linen.BatchNorm's.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
import jaxbn.linen
import jaxbn.nnx

F32 = np.finfo(np.float32).eps
EMA = 1e-5  # the float32 weight 1 - 0.99 is itself off by 1e-6


def _ref(x, mask=None):
  """(mean, var, xhat) in float64 over every axis but the last, valid values only."""
  x = np.asarray(x, np.float64)
  w = np.ones(x.shape) if mask is None else np.broadcast_to(np.asarray(mask), x.shape) * 1.0
  red = tuple(range(x.ndim - 1))
  n = w.sum(red)
  mu = (x * w).sum(red) / n
  var = (np.square(x - mu) * w).sum(red) / n
  return mu, var, (x - mu) / np.sqrt(var + 1e-5)


def _check_exact(y, batch, x, mask):
  """y and a state updated with momentum 0 (the batch's statistics) against float64."""
  mu, var, xhat = _ref(x, mask)
  valid = np.broadcast_to(np.asarray(True if mask is None else mask), x.shape)
  err = np.max(np.abs(np.where(valid, np.asarray(y, np.float64) - xhat, 0)))
  assert err < 200 * F32, err  # the masked-first-row bug gave 0.15
  # The mean to float32 rounding of the data's values and of their spread.
  np.testing.assert_allclose(batch.mean, mu, rtol=F32, atol=4 * F32 * np.sqrt(np.max(var)))
  np.testing.assert_allclose(batch.var, var, rtol=50 * F32)


# ------------------------------------------------------------ exactness


@pytest.mark.parametrize("masked", ["first_rows", "per_element", "none"])
def test_far_from_zero_with_masks_over_the_first_training_steps(masked):
  """1e6 + N(0, 1): the running mean lags far behind at steps 1-3 (0, 1e4, 2e4)."""
  x = 1e6 + jax.random.normal(jax.random.key(0), (256, 8))
  if masked == "first_rows":
    mask = (jnp.arange(256) >= 16)[:, None]
  elif masked == "per_element":
    mask = jax.random.bernoulli(jax.random.key(1), 0.7, x.shape).at[0].set(False)
  else:
    mask = None
  dirty = x if mask is None else jnp.where(mask, x, jnp.nan)  # hidden values never count
  params, state = jaxbn.bn_init(8)
  step = jax.jit(lambda s, x, m: jaxbn.bn_train(params, s, x, mask=mask, momentum=m))
  for _ in range(3):  # the running mean far from the data at each step
    y, batch = step(state, dirty, 0.0)
    _check_exact(y, batch, x, mask)
    state = step(state, dirty, 0.99)[1]
  assert 1e4 < float(state.mean[0]) < 1e6


def test_far_from_zero_through_linen_with_a_flax_style_mask():
  x = 1e6 + jax.random.normal(jax.random.key(0), (256, 8))
  mask = jnp.broadcast_to((jnp.arange(256) > 0)[:, None], x.shape)  # first position False
  bn = jaxbn.linen.BatchNorm(use_running_average=False, momentum=0.0)
  variables = bn.init(jax.random.key(0), x[:2])
  y, upd = bn.apply(variables, x, mask=mask, mutable=["batch_stats"])
  _, var, xhat = _ref(x, mask)
  assert np.max(np.abs(np.asarray(y, np.float64) - xhat)[1:]) < 200 * F32
  np.testing.assert_allclose(upd["batch_stats"]["var"], var, rtol=50 * F32)


def test_a_jump_in_the_data_stays_exact_to_float32_rounding():
  """A state trained near 0 meets data at 1e6 (and back): the shift is the data's own."""
  params, state = jaxbn.bn_init(4)
  state = state._replace(mean=jnp.full(4, -3.0), var=jnp.full(4, 2.0))
  for offset in (1e6, 0.0, -5e5):
    x = offset + jax.random.normal(jax.random.key(int(offset) % 7), (128, 4)) * 0.5
    y, batch = jaxbn.bn_train(params, state, x, momentum=0.0)
    _check_exact(y, batch, x, None)
    state = jaxbn.bn_train(params, state, x, momentum=0.5)[1]


def _shard_map_train(mesh, x, mask, state, momentum):
  params, _ = jaxbn.bn_init(x.shape[-1])

  def step(x, m):
    return jaxbn.bn_train(params, state, x, mask=m, axis_name="data", momentum=momentum)

  x, mask = jax.device_put((x, mask), NamedSharding(mesh, P("data")))
  return jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=(P("data"), P()))
  )(x, mask)


@pytest.mark.parametrize("layout", ["first_shard_masked", "uneven"])
def test_masked_and_uneven_shards_under_shard_map(layout):
  """Every shard shifts by the same value; counts weigh the shards."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  x = 1e6 + jax.random.normal(jax.random.key(0), (64, 4, 3)) * 2
  rows = jnp.arange(64)
  if layout == "first_shard_masked":
    mask = jnp.broadcast_to((rows >= 8)[:, None, None], x.shape)  # device 0 holds no value
  else:
    keep = (rows % 8) < (rows // 8) % 8 + 1  # device i keeps i + 1 of its 8 rows
    mask = jnp.broadcast_to(keep[:, None, None], x.shape)
  _, state = jaxbn.bn_init(3)
  for _ in range(2):
    y, batch = _shard_map_train(mesh, x, mask, state, 0.0)
    _check_exact(y, batch, x, mask)
    state = _shard_map_train(mesh, x, mask, state, 0.9)[1]


def test_a_device_with_no_valid_row_and_a_step_with_none_under_jit():
  """GSPMD jit, batch sharded over 8 devices: device 0's rows all masked, then every row.

  With some valid rows the statistics are theirs, exactly. With none, the state is kept
  (step aside), nothing is NaN, and the gradients of scale and bias are 0: a loss that
  counts valid examples only gives masked positions no cotangent.
  """
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  sharded = NamedSharding(mesh, P("data"))
  x = jax.device_put(1e6 + 2 * jax.random.normal(jax.random.key(0), (64, 4, 3)), sharded)
  ct = jax.device_put(jax.random.normal(jax.random.key(1), x.shape), sharded)
  params, state = jaxbn.bn_init(3)
  state = state._replace(mean=jnp.full(3, 1e6), var=jnp.full(3, 4.0), count=jnp.full(3, 64.0))

  def loss(p, x, keep):
    y, new = jaxbn.bn_train(p, state, x, mask=keep[:, None, None], momentum=None)
    return jnp.sum(jnp.where(keep[:, None, None], y * ct, 0)), (y, new)

  step = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))
  rows = jnp.arange(64)
  for keep in (rows >= 8, rows < 0):  # device 0 holds no valid row; then no device does
    keep = jax.device_put(keep, sharded)
    (_, (y, new)), (gp, gx) = step(params, x, keep)
    for t in jax.tree.leaves((y, new, gp, gx)):
      assert np.all(np.isfinite(np.asarray(t, np.float64)))
    assert int(new.step) == 1
    if bool(jnp.any(keep)):
      mask = np.broadcast_to(np.asarray(keep)[:, None, None], x.shape)
      mu, _, _ = _ref(x, mask)
      # momentum=None: the state's 64 values merged with 56 rows of 4 values.
      np.testing.assert_allclose(new.mean, (64 * 1e6 + 224 * mu) / 288, rtol=4 * F32)
      np.testing.assert_allclose(new.count, 288.0)
    else:
      for a, b in zip(new[:3], state[:3], strict=True):
        np.testing.assert_array_equal(a, b)
      np.testing.assert_array_equal(gp.scale, 0.0)
      np.testing.assert_array_equal(gp.bias, 0.0)
      np.testing.assert_array_equal(gx, 0.0)


def test_features_sharded_over_a_second_axis_reduce_their_own_features_only():
  """P('data', 'model') under jit: no all-gather, and the all-reduces over 'data' carry
  each device's features (C / 2 of them), never x."""
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  spec = NamedSharding(mesh, P("data", None, None, "model"))
  x = jax.device_put(1e3 + jax.random.normal(jax.random.key(0), (32, 4, 4, 16)), spec)
  ct = jax.device_put(jax.random.normal(jax.random.key(1), x.shape), spec)
  params, state = jaxbn.bn_init(16)

  def loss(p, x):
    y, new = jaxbn.bn_train(p, state, x)
    return jnp.sum(y * ct), (y, new)

  f = jax.value_and_grad(loss, (0, 1), has_aux=True)
  text = jax.jit(f).lower(params, x).compile().as_text()
  assert " all-gather(" not in text and " all-gather-start(" not in text
  over_data = 0
  for line in text.splitlines():
    if " all-reduce(" not in line and " all-reduce-start(" not in line:
      continue
    result = line.split("=")[1].split("all-reduce")[0]
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d])) for dims in
             re.findall(r"\[([0-9,]*)\]", result)]  # fmt: skip
    groups = line.split("replica_groups=")[1]
    if "{'axis_0'}" in groups:  # the 'data' axis of the mesh (4 devices)
      over_data += 1
      assert max(sizes) <= 8, line  # each device's 8 features
    else:  # over 'model': scalars only (the loss, a predicate)
      assert max(sizes, default=1) <= 1, line
  assert over_data >= 2  # the statistics forward, the two sums backward
  (_, (y, new)), (gp, gx) = jax.jit(f)(params, x)
  mu, var, xhat = _ref(x)
  np.testing.assert_allclose(new.mean, 0.01 * mu, rtol=EMA)
  np.testing.assert_allclose(new.var, 0.99 + 0.01 * var, rtol=EMA)
  assert np.max(np.abs(np.asarray(y, np.float64) - xhat)) < 200 * F32
  dbias = np.asarray(ct, np.float64).sum((0, 1, 2))  # sum(dy), the closed form
  np.testing.assert_allclose(gp.bias, dbias, rtol=1e-4, atol=1e-4)
  assert jax.typeof(gx).sharding.spec == spec.spec or gx.sharding.is_equivalent_to(spec, 4)


# ------------------------------------------------------------ collectives


def _collectives(fn, *args):
  """All-reduces of ``fn``'s compiled step: (outside conditionals, inside), and
  the sizes (elements) of all-gathers."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  branches, comp, main, cond, gathers = set(), None, 0, 0, []
  for line in text.splitlines():
    if " conditional(" in line and "branch_computations={" in line:
      names = line.split("branch_computations={")[1].split("}")[0]
      branches |= {n.strip() for n in names.split(",")}
  for line in text.splitlines():
    if line and not line.startswith(" ") and "{" in line:
      comp = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
    if " all-reduce(" in line or " all-reduce-start(" in line:
      if comp in branches:
        cond += 1
      else:
        main += 1
    if " all-gather(" in line or " all-gather-start(" in line:
      shape = line.split("=")[1].split("all-gather")[0]
      dims = shape[shape.index("[") + 1 : shape.index("]")]
      gathers.append(int(np.prod([int(d) for d in dims.split(",") if d])))
  return main, cond, gathers


def _jaxbn_forward(x):
  params, state = jaxbn.bn_init(x.shape[-1])
  return lambda x: jaxbn.bn_train(params, state, x)


def _jaxbn_grad(x):
  params, state = jaxbn.bn_init(x.shape[-1])
  ct = jnp.ones(x.shape)

  def loss(p, x):
    y, new = jaxbn.bn_train(p, state, x)
    return jnp.sum(y * ct), new

  return lambda p, x: jax.value_and_grad(loss, (0, 1), has_aux=True)(p, x), params


def _flax_fns(x):
  bn = nn.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), jnp.zeros((2, x.shape[-1])))
  ct = jnp.ones(x.shape)

  def fwd(x):
    return bn.apply(variables, x, mutable=["batch_stats"])

  def loss(p, x):
    y, upd = bn.apply({**variables, "params": p}, x, mutable=["batch_stats"])
    return jnp.sum(y * ct), upd

  return fwd, (lambda p, x: jax.value_and_grad(loss, (0, 1), has_aux=True)(p, x)), variables


def test_all_reduces_of_per_feature_values_under_gspmd_jit():
  """A batch-sharded NamedSharding, no axis_name: statistics of the whole batch.

  Forward: the shift's all-reduce and the sums' (flax: one, of its two means); backward:
  one, as flax's; no conditional, no all-gather.
  """
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  for shape in ((256, 8, 8, 64), (256, 64)):
    x = jax.device_put(jnp.ones(shape), NamedSharding(mesh, P("data")))
    fwd = _collectives(_jaxbn_forward(x), x)
    assert fwd == (2, 0, [])
    grad, params = _jaxbn_grad(x)
    total = _collectives(grad, params, x)
    assert total == (3, 0, [])
    flax_fwd, flax_grad, variables = _flax_fns(x)
    assert fwd[0] == _collectives(flax_fwd, x)[0] + 1
    assert total[0] == _collectives(flax_grad, variables["params"], x)[0] + 1


def test_all_reduces_per_direction_with_axis_name():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  x = jax.device_put(jnp.ones((64, 4, 4, 16)), NamedSharding(mesh, P("data")))
  params, state = jaxbn.bn_init(16)
  ct = jnp.ones(x.shape)
  bn = nn.BatchNorm(use_running_average=False, axis_name="data")
  variables = bn.init(jax.random.key(0), jnp.zeros((2, 16)))

  def ours(p, x):
    def loss(p, x):
      y, new = jaxbn.bn_train(p, state, x, axis_name="data")
      return jnp.sum(y * ct[: x.shape[0]]), new

    return jax.grad(loss, has_aux=True)(p, x)

  def theirs(p, x):
    def loss(p, x):
      y, upd = bn.apply({**variables, "params": p}, x, mutable=["batch_stats"])
      return jnp.sum(y * ct[: x.shape[0]]), upd

    return jax.grad(loss, has_aux=True)(p, x)

  def sharded(f, p):
    # The parameters' gradient psum that shard_map adds is the same for both.
    return jax.shard_map(f, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())

  main, cond, gathered = _collectives(sharded(ours, params), params, x)
  flax_main, _, _ = _collectives(sharded(theirs, variables["params"]), variables["params"], x)
  assert (cond, gathered) == (0, [])
  assert main <= flax_main + 1  # at most the shift's more (XLA combines independent ones)
  fwd = jax.shard_map(
    lambda x: jaxbn.bn_train(params, state, x, axis_name="data"),
    mesh=mesh,
    in_specs=P("data"),
    out_specs=(P("data"), P()),
  )
  assert _collectives(fwd, x)[:2] == (2, 0)


# ------------------------------------------------------------ explicit sharding


@pytest.fixture(params=["batch", "batch_and_features"])
def explicit(request):
  """(mesh, spec of x, x) with x sharded explicitly."""
  if request.param == "batch":
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    spec = P("data")
  else:
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    spec = P("data", None, None, "model")
  x = 1e6 + jax.random.normal(jax.random.key(0), (32, 4, 4, 8))
  with jax.set_mesh(mesh):
    yield mesh, spec, jax.device_put(x, spec)


def _assert_x_like(y, x):
  assert jax.typeof(y).sharding.spec == jax.typeof(x).sharding.spec, (jax.typeof(y), jax.typeof(x))


def _assert_replicated(tree):
  for t in jax.tree.leaves(tree):
    assert all(s is None for s in jax.typeof(t).sharding.spec), jax.typeof(t)


@pytest.mark.parametrize("option", ["plain", "mask", "ghost_batches"])
def test_explicit_sharding_core_forward_and_reverse(explicit, option):
  _, spec, x = explicit
  params, state = jaxbn.bn_init(8)
  kw = {
    "plain": {},
    "mask": {"mask": jax.device_put(jnp.arange(32) >= 4, P(spec[0]))[:, None, None, None]},
    # Ghost batches of 4 rows: each lies on one device (a ghost batch across
    # devices would need the batch resharded).
    "ghost_batches": {"ghost_batch_size": 4},
  }[option]
  ct = jnp.ones(x.shape, out_sharding=spec)

  def loss(p, x):
    y, new = jaxbn.bn_train(p, state, x, **kw)
    return jnp.sum(y * ct), (y, new)

  f = jax.value_and_grad(loss, (0, 1), has_aux=True)
  (_, (y, new)), (gp, gx) = jax.jit(f)(params, x)
  _assert_x_like(y, x)
  _assert_x_like(gx, x)
  _assert_replicated((new, gp))
  if option != "ghost_batches":
    np.testing.assert_allclose(new.mean, 0.01 * _ref(x, kw.get("mask"))[0], rtol=EMA)
  gathered = _collectives(f, params, x)[2]
  assert not gathered or max(gathered) <= 8  # per-feature values only, never x
  _, t = jax.jvp(lambda x: jaxbn.bn_train(params, state, x, **kw)[0], (x,), (ct,))
  _assert_x_like(t, x)
  _assert_x_like(jax.jit(lambda x: jaxbn.bn_infer(params, state, x))(x), x)


def test_explicit_sharding_modules_and_population_stats(explicit):
  x = explicit[2]
  bn = jaxbn.linen.BatchNorm(use_running_average=False)
  variables = bn.init(jax.random.key(0), jnp.zeros((2, 8)))
  y, upd = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]))(variables, x)
  _assert_x_like(y, x)
  _assert_replicated(upd)
  mu, _, xhat = _ref(np.asarray(x))
  assert np.max(np.abs(np.asarray(y, np.float64) - xhat)) < 200 * F32

  module = jaxbn.nnx.BatchNorm(8, rngs=nnx.Rngs(0))
  y = nnx.jit(lambda m, x: m(x))(module, x)
  _assert_x_like(y, x)
  np.testing.assert_allclose(module.mean[...], 0.01 * mu, rtol=EMA)

  params, state = jaxbn.bn_init(8)
  got = jaxbn.population_stats(
    lambda p, s, x, **kw: jaxbn.bn_train(p, s, x, **kw), params, state, [x, x + 1.0]
  )
  _assert_replicated(got)
  both = np.concatenate([np.asarray(x), np.asarray(x) + 1.0])
  mu2, var2, _ = _ref(both)
  np.testing.assert_allclose(got.mean, mu2, rtol=4 * F32)
  np.testing.assert_allclose(got.var, var2, rtol=50 * F32)
