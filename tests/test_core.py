"""The specification of bn_init / bn_train / bn_infer, one behaviour per test."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jaxbn
from tests.reference import bn_infer_ref
from tests.reference import bn_train_ref

LAYOUTS = [
  ((32, 5), -1),  # fully connected: one mean per neuron
  ((4, 3, 5, 6), -1),  # NHWC: one mean per feature map
  ((4, 6, 3, 5), 1),  # NCHW
  ((4, 7, 6), -1),  # 1-D convolution, NWC
  ((2, 3, 4, 2, 6), -1),  # 3-D convolution, NDHWC
  ((6, 4, 3), (1, 2)),  # two feature axes
]


def _random_params(key, shape, x_dtype=jnp.float32):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  params = jaxbn.BNParams(
    scale=1 + 0.3 * jax.random.normal(k1, shape), bias=0.5 * jax.random.normal(k2, shape)
  )
  _, state = jaxbn.bn_init(shape)
  state = state._replace(
    mean=jax.random.normal(k3, shape), var=jnp.exp(jax.random.normal(k4, shape))
  )
  return params, state


def _fshape(shape, axis):
  axes = (axis,) if isinstance(axis, int) else axis
  return tuple(shape[a] for a in sorted(a % len(shape) for a in axes))


# ----------------------------------------------------------------------- init


def test_init_fields_shapes_and_dtypes():
  params, state = jaxbn.bn_init(7, dtype=jnp.bfloat16)
  chex.assert_trees_all_equal(params.scale, jnp.ones(7, jnp.bfloat16))
  chex.assert_trees_all_equal(params.bias, jnp.zeros(7, jnp.bfloat16))
  chex.assert_trees_all_equal(
    state,
    jaxbn.BNState(
      mean=jnp.zeros(7), var=jnp.ones(7), count=jnp.zeros(7), step=jnp.zeros((), jnp.int32)
    ),
  )
  chex.assert_type([state.mean, state.var, state.count], jnp.float32)


@pytest.mark.parametrize("bad", [0, -3, (2, 0), 2.5, ()])
def test_init_rejects_bad_num_features(bad):
  with pytest.raises(ValueError, match="num_features"):
    jaxbn.bn_init(bad)


# ----------------------------------------------------- exactness vs float64


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_train_matches_float64_reference_over_steps(shape, axis):
  fshape = _fshape(shape, axis)
  params, state = _random_params(jax.random.key(0), fshape)
  ref_mean, ref_var = np.asarray(state.mean, np.float64), np.asarray(state.var, np.float64)
  step = jax.jit(functools.partial(jaxbn.bn_train, axis=axis))
  for t in range(3):
    x = 2.0 + 3.0 * jax.random.normal(jax.random.key(t + 1), shape)
    y, state = step(params, state, x)
    y_ref, ref_mean, ref_var = bn_train_ref(
      x, params.scale, params.bias, ref_mean, ref_var, axis=axis
    )
    chex.assert_shape(y, shape)
    chex.assert_type(y, jnp.float32)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.mean, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.var, ref_var, rtol=1e-5, atol=1e-6)
  n = np.prod(shape) // np.prod(fshape)
  np.testing.assert_array_equal(state.count, np.full(fshape, 3 * n))
  assert int(state.step) == 3


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_infer_matches_float64_reference(shape, axis):
  params, state = _random_params(jax.random.key(1), _fshape(shape, axis))
  x = jax.random.normal(jax.random.key(2), shape)
  y = jaxbn.bn_infer(params, state, x, axis=axis)
  ref = bn_infer_ref(x, params.scale, params.bias, state.mean, state.var, axis=axis)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,axis", [(s, a) for s, a in LAYOUTS if isinstance(a, int)])
def test_matches_flax_two_pass_over_steps(shape, axis):
  """Output, running statistics and gradients equal flax.linen (two-pass)."""
  fshape = _fshape(shape, axis)
  module = nn.BatchNorm(use_running_average=False, axis=axis, use_fast_variance=False)
  x0 = jax.random.normal(jax.random.key(0), shape)
  variables = module.init(jax.random.key(1), x0)
  params, state = jaxbn.bn_init(fshape)
  params = params._replace(scale=1 + 0.2 * jax.random.normal(jax.random.key(2), fshape))
  variables = {
    "params": {"scale": params.scale, "bias": params.bias},
    "batch_stats": variables["batch_stats"],
  }

  def flax_loss(p, stats, x):
    y, upd = module.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])
    return jnp.sum(y * jnp.sin(x)), (y, upd["batch_stats"])

  def ours_loss(p, st, x):
    y, st = jaxbn.bn_train(p, st, x, axis=axis)
    return jnp.sum(y * jnp.sin(x)), (y, st)

  flax_grad = jax.jit(jax.grad(flax_loss, argnums=(0, 2), has_aux=True))
  ours_grad = jax.jit(jax.grad(ours_loss, argnums=(0, 2), has_aux=True))
  fp, fs = variables["params"], variables["batch_stats"]
  for t in range(3):
    x = 1.0 + 2.0 * jax.random.normal(jax.random.key(10 + t), shape)
    (gf_p, gf_x), (yf, fs) = flax_grad(fp, fs, x)
    (go_p, go_x), (yo, state) = ours_grad(params, state, x)
    np.testing.assert_allclose(yo, yf, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.mean, fs["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.var, fs["var"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(go_x, gf_x, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(go_p.scale, gf_p["scale"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(go_p.bias, gf_p["bias"], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------- numerics


def test_large_offset_is_exact_where_fast_variance_fails():
  x = 1e4 + jax.random.normal(jax.random.key(0), (256, 8))
  params, state = jaxbn.bn_init(8)
  y, new = jaxbn.bn_train(params, state, x)
  jaxbn.testing.assert_normalized(y, rtol=0.0)  # std within 1e-3
  jaxbn.testing.assert_valid_state(params, new)
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(new.var, 0.99 + 0.01 * x64.var(0), rtol=1e-5)
  # The anchor's default (one-pass E[x^2] - E[x]^2) is far off on the same input.
  yf, _ = nn.BatchNorm(use_running_average=False).init_with_output(jax.random.key(0), x)
  assert abs(float(jnp.std(yf, 0).max()) - 1) > 0.5


def test_variance_never_negative_and_constant_features_are_finite():
  x = jnp.concatenate(
    [
      jnp.full((16, 1), 3.0),
      jnp.full((16, 1), -1e6),
      jax.random.normal(jax.random.key(0), (16, 1)),
    ],
    1,
  )
  params, state = jaxbn.bn_init(3)
  y, new = jaxbn.bn_train(params, state, x)
  chex.assert_tree_all_finite(y)
  jaxbn.testing.assert_valid_state(params, new)  # finite, and no negative variance
  np.testing.assert_allclose(y[:, :2], 0.0, atol=1e-6)  # constant -> xhat = 0


def test_identity_is_representable():
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (64, 4))
  eps = 1e-5
  mean, var = jnp.mean(x, 0), jnp.var(x, 0)
  params = jaxbn.BNParams(scale=jnp.sqrt(var + eps), bias=mean)
  _, state = jaxbn.bn_init(4)
  y, _ = jaxbn.bn_train(params, state, x, epsilon=eps)
  np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(128, 6), (16, 5, 5, 6)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_input(dtype, shape):
  # Half input is computed in float32 and rounded once to x's dtype at the end:
  # the output is the float32 computation on the same values, rounded, and the
  # state is the float32 computation's. That is one computation, not two, so
  # the comparison is exact (under jit and eagerly, on any instruction set).
  x = (5.0 + jax.random.normal(jax.random.key(0), shape)).astype(dtype)
  params = jaxbn.BNParams(
    scale=1 + 0.1 * jax.random.normal(jax.random.key(1), (6,)), bias=jnp.full((6,), 0.3)
  )
  _, state = jaxbn.bn_init(6)
  for train, infer in (
    (jaxbn.bn_train, jaxbn.bn_infer),
    (jax.jit(jaxbn.bn_train), jax.jit(jaxbn.bn_infer)),
  ):
    y, new = train(params, state, x)
    y32, new32 = train(params, state, x.astype(jnp.float32))
    chex.assert_type(y, dtype)
    chex.assert_type([new.mean, new.var, new.count], jnp.float32)
    np.testing.assert_array_equal(y.astype(jnp.float32), y32.astype(dtype).astype(jnp.float32))
    chex.assert_trees_all_equal(new, new32)
    yi = infer(params, new, x)
    chex.assert_type(yi, dtype)
    yi32 = infer(params, new32, x.astype(jnp.float32))
    np.testing.assert_array_equal(yi.astype(jnp.float32), yi32.astype(dtype).astype(jnp.float32))
  # The state stays float32 over many steps (a bf16 EMA would stall at 1.0).
  st = state
  for _ in range(20):
    _, st = jaxbn.bn_train(params, st, x, momentum=0.999)
  jaxbn.testing.assert_valid_state(params, st)  # float32 statistics, finite
  chex.assert_type(st.var, jnp.float32)


def test_cumulative_average_gives_statistics_of_the_concatenation():
  sizes = [3, 17, 64, 5]
  keys = jax.random.split(jax.random.key(0), len(sizes))
  batches = [
    4.0 + (1 + i) * jax.random.normal(k, (n, 3))
    for i, (k, n) in enumerate(zip(keys, sizes, strict=False))
  ]
  params, state = jaxbn.bn_init(3)
  for b in batches:
    _, state = jaxbn.bn_train(params, state, b, momentum=None)
  allx = np.concatenate([np.asarray(b, np.float64) for b in batches])
  np.testing.assert_allclose(state.mean, allx.mean(0), rtol=1e-5)
  np.testing.assert_allclose(state.var, allx.var(0), rtol=1e-5)
  np.testing.assert_array_equal(state.count, np.full(3, sum(sizes)))


def test_momentum_convention_is_weight_of_the_old_value():
  params, state = jaxbn.bn_init(1)
  x = jnp.array([[2.0], [4.0]])  # mean 3, var 1
  _, new = jaxbn.bn_train(params, state, x, momentum=0.9)  # PyTorch's 0.1
  np.testing.assert_allclose(new.mean, [0.3], rtol=1e-6)
  np.testing.assert_allclose(new.var, [0.9 + 0.1], rtol=1e-6)


def test_ema_warmup_averages_batches_then_becomes_the_ema():
  params, state = jaxbn.bn_init(2)
  xs = [jax.random.normal(jax.random.key(t), (8, 2)) * 2 + 5 for t in range(4)]
  st = state
  for x in xs:
    _, st = jaxbn.bn_train(params, st, x, momentum=0.9, ema_warmup=True)
  # weights 1, 1/2, 1/3, 1/4 (all above 0.1): the plain average of batch statistics.
  x64 = [np.asarray(x, np.float64) for x in xs]
  np.testing.assert_allclose(st.mean, np.mean([x.mean(0) for x in x64], 0), rtol=1e-5)
  np.testing.assert_allclose(st.var, np.mean([x.var(0) for x in x64], 0), rtol=1e-5)
  # Once count is large the update is the plain EMA.
  big = st._replace(count=jnp.full(2, 1e6))
  _, a = jaxbn.bn_train(params, big, xs[0], momentum=0.9, ema_warmup=True)
  _, b = jaxbn.bn_train(params, big, xs[0], momentum=0.9)
  chex.assert_trees_all_close(a, b, rtol=1e-6)
  # Fully masked at count 0: unchanged, finite.
  _, c = jaxbn.bn_train(params, state, xs[0], ema_warmup=True, mask=jnp.zeros((8, 1), bool))
  chex.assert_trees_all_equal(c._replace(step=0), state._replace(step=0))


def test_infer_does_not_depend_on_the_batch():
  params, state = _random_params(jax.random.key(3), (5,))
  x = jax.random.normal(jax.random.key(4), (16, 5))
  full = jaxbn.bn_infer(params, state, x)
  # One row and 16 rows compile to different loops (vector widths, fused
  # multiply-adds): the same result to float32 rounding, not bit for bit.
  tol = 4 * np.finfo(np.float32).eps
  for i in (0, 7, 15):
    row = jaxbn.bn_infer(params, state, x[i : i + 1])
    np.testing.assert_allclose(row, full[i : i + 1], rtol=tol, atol=tol)


# ----------------------------------------------------------------------- mask


def test_mask_uses_only_valid_positions():
  x = jax.random.normal(jax.random.key(0), (10, 4)) * 2 + 1
  mask = jnp.array([True] * 6 + [False] * 4)[:, None]  # whole examples
  params, state = _random_params(jax.random.key(1), (4,))
  y, new = jaxbn.bn_train(params, state, x, mask=mask)
  y_ref, m_ref, v_ref = bn_train_ref(
    x, params.scale, params.bias, state.mean, state.var, mask=np.asarray(mask)
  )
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)  # masked rows: same affine map
  np.testing.assert_allclose(new.mean, m_ref, rtol=1e-5)
  np.testing.assert_allclose(new.var, v_ref, rtol=1e-5)
  np.testing.assert_array_equal(new.count, np.full(4, 6.0))
  # The statistics equal those of the valid rows alone.
  y6, new6 = jaxbn.bn_train(params, state, x[:6])
  np.testing.assert_allclose(y[:6], y6, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(new._replace(step=0), new6._replace(step=0), rtol=1e-5)


def test_mask_per_feature_and_conv_layout():
  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 2))
  mask_pos = jax.random.bernoulli(jax.random.key(1), 0.7, (4, 3, 3))
  params, state = _random_params(jax.random.key(2), (2,))
  y, new = jaxbn.bn_train(params, state, x, mask=mask_pos[..., None])
  y_ref, m_ref, v_ref = bn_train_ref(
    x, params.scale, params.bias, state.mean, state.var, mask=np.asarray(mask_pos)[..., None]
  )
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new.var, v_ref, rtol=1e-5)
  # A mask with the feature axis (flax's convention) selects per feature.
  mask_full = jax.random.bernoulli(jax.random.key(3), 0.7, x.shape)
  y, new = jaxbn.bn_train(params, state, x, mask=mask_full)
  y_ref, m_ref, v_ref = bn_train_ref(
    x, params.scale, params.bias, state.mean, state.var, mask=np.asarray(mask_full)
  )
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new.mean, m_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(new.count, np.asarray(mask_full).sum((0, 1, 2)))


def test_fully_masked_feature_keeps_running_statistics_and_stays_finite():
  x = jax.random.normal(jax.random.key(0), (8, 3))
  mask = jnp.ones((8, 3), bool).at[:, 1].set(False)
  params, state = _random_params(jax.random.key(1), (3,))
  for momentum in (0.9, None):
    y, new = jaxbn.bn_train(params, state, x, mask=mask, momentum=momentum)
    chex.assert_tree_all_finite((y, new))
    assert float(new.mean[1]) == float(state.mean[1])
    assert float(new.var[1]) == float(state.var[1])
    assert float(new.count[1]) == 0.0
    g = jax.grad(lambda x: jnp.sum(jaxbn.bn_train(params, state, x, mask=mask)[0] ** 2))(x)
    chex.assert_tree_all_finite(g)


# --------------------------------------------------------------- gradients


def _plain_bn(params, x, axis=-1, mask=None, eps=1e-5):
  """Autodiff reference: statistics written out with jnp, no custom VJP."""
  fa = tuple(sorted(a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)))
  red = tuple(i for i in range(x.ndim) if i not in fa)
  bshape = tuple(x.shape[i] if i in fa else 1 for i in range(x.ndim))
  w = jnp.ones_like(x) if mask is None else jnp.broadcast_to(mask, x.shape).astype(x.dtype)
  n = jnp.sum(w, red, keepdims=True)
  mu = jnp.sum(x * w, red, keepdims=True) / n
  var = jnp.sum((x - mu) ** 2 * w, red, keepdims=True) / n
  return (x - mu) / jnp.sqrt(var + eps) * params.scale.reshape(bshape) + params.bias.reshape(bshape)


@pytest.mark.slow
@pytest.mark.parametrize("shape,axis", LAYOUTS[:4])
@pytest.mark.parametrize("masked", [False, True])
def test_analytic_gradient_equals_autodiff(shape, axis, masked):
  params, state = _random_params(jax.random.key(0), _fshape(shape, axis))
  x = jax.random.normal(jax.random.key(1), shape)
  ct = jax.random.normal(jax.random.key(2), shape)
  mask = None
  if masked:
    mask_shape = tuple(1 if i % len(shape) == axis % len(shape) else s for i, s in enumerate(shape))
    mask = jax.random.bernoulli(jax.random.key(3), 0.6, mask_shape)
  ours = jax.grad(
    lambda p, x: jnp.sum(ct * jaxbn.bn_train(p, state, x, axis=axis, mask=mask)[0]), (0, 1)
  )
  ref = jax.grad(lambda p, x: jnp.sum(ct * _plain_bn(p, x, axis, mask)), (0, 1))
  chex.assert_trees_all_close(ours(params, x), ref(params, x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_check_grads_order_two_float64():
  with jax.enable_x64(True):
    params = jaxbn.BNParams(
      scale=jnp.array([1.5, 0.5], jnp.float64), bias=jnp.array([0.1, -0.2], jnp.float64)
    )
    _, state = jaxbn.bn_init(2)
    x = jax.random.normal(jax.random.key(0), (6, 3, 2), jnp.float64)
    mask = jnp.array([True, True, False, True, True, True])[:, None, None]

    def f(scale, bias, x):
      p = jaxbn.BNParams(scale, bias)
      return jaxbn.bn_train(p, state, x, mask=mask)[0]

    check_grads(f, (params.scale, params.bias, x), order=2, modes=["rev"], eps=1e-4)
    check_grads(
      lambda s, b, x: jaxbn.bn_train(jaxbn.BNParams(s, b), state, x)[0],
      (params.scale, params.bias, x),
      order=2,
      modes=["rev"],
      eps=1e-4,
    )


def test_state_carries_no_gradient():
  params, state = jaxbn.bn_init(3)
  x = jax.random.normal(jax.random.key(0), (8, 3))
  g = jax.grad(lambda x: jnp.sum(jaxbn.bn_train(params, state, x)[1].mean))(x)
  np.testing.assert_array_equal(g, 0.0)


# -------------------------------------------------------------- bad input


@pytest.mark.parametrize("fn", ["train", "infer"])
def test_errors_name_the_problem(fn):
  params, state = jaxbn.bn_init(4)

  def call(x, **kw):
    if fn == "train":
      return jaxbn.bn_train(params, state, x, **kw)
    return jaxbn.bn_infer(params, state, x, **kw)

  with pytest.raises(ValueError, match=r"feature shape \(5,\).*made for \(4,\)"):
    call(jnp.ones((8, 5)))
  with pytest.raises(TypeError, match=r"floating-point.*int32"):
    call(jnp.ones((8, 4), jnp.int32))
  with pytest.raises(ValueError, match="axis 3 is out of range"):
    call(jnp.ones((8, 4)), axis=3)
  with pytest.raises(ValueError, match=r"feature shape \(8,\)"):
    jax.jit(lambda x: call(x, axis=0))(jnp.ones((8, 4)))  # static: raised while tracing


def test_train_errors():
  params, state = jaxbn.bn_init(4)
  with pytest.raises(ValueError, match=r"no value per feature.*at least 2"):
    jaxbn.bn_train(params, state, jnp.ones((0, 4)))
  with pytest.raises(ValueError, match="no value per feature"):
    jax.jit(jaxbn.bn_train)(params, state, jnp.ones((4, 0, 4)))
  with pytest.raises(ValueError, match="mask of shape"):
    jaxbn.bn_train(params, state, jnp.ones((8, 4)), mask=jnp.ones((7,), bool))
  with pytest.raises(TypeError, match="mask must be boolean"):
    jaxbn.bn_train(params, state, jnp.ones((8, 4)), mask=jnp.ones((8,)))
  with pytest.raises(ValueError, match="ghost_batch_size=3 does not divide the batch of 8"):
    jaxbn.bn_train(params, state, jnp.ones((8, 4)), ghost_batch_size=3)
  with pytest.raises(ValueError, match=r"one bn_init call.*params.scale \(4,\).*state.mean \(5,\)"):
    jaxbn.bn_train(params, jaxbn.bn_init(5)[1], jnp.ones((8, 4)))


def test_checkify_catches_non_finite_statistics():
  params, state = jaxbn.bn_init(3)
  step = jax.jit(checkify.checkify(jaxbn.bn_train, errors=checkify.float_checks))
  err, _ = step(params, state, jnp.ones((4, 3)).at[0, 1].set(jnp.inf))
  with pytest.raises(checkify.JaxRuntimeError):
    err.throw()
  err, _ = step(params, state, jnp.arange(12.0).reshape(4, 3))
  assert err.get() is None

  @functools.partial(chex.chexify, async_check=False)
  @jax.jit
  def guarded(x):
    chex.assert_tree_all_finite(x)
    return jaxbn.bn_train(params, state, x)

  guarded(jnp.ones((4, 3)))
  with pytest.raises(AssertionError):
    guarded(jnp.ones((4, 3)).at[2, 2].set(jnp.nan))
  chex.block_until_chexify_assertions_complete()
  # chexify keeps every decorated function's barrier for an exit-time warning
  # that has nothing to report here (checks were synchronous); drop ours.
  from chex._src import asserts_internal

  asserts_internal.CHEXIFY_STORAGE.wait_fns.remove(guarded.wait_checks)


# ---------------------------------------------------------------- transforms


def test_jit_does_not_retrace():
  params, state = jaxbn.bn_init(4)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, x):
    return jaxbn.bn_train(params, state, x)

  x = jax.random.normal(jax.random.key(0), (8, 4))
  _, state = step(params, state, x)
  _, state = step(params, state, x + 1)
  chex.clear_trace_counter()


def test_eval_shape():
  params, state = jaxbn.bn_init(4, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((8, 2, 4), jnp.bfloat16)
  y, new = jax.eval_shape(jaxbn.bn_train, params, state, x)
  assert y.shape == (8, 2, 4) and y.dtype == jnp.bfloat16
  chex.assert_trees_all_equal_shapes_and_dtypes(new, state)


def test_vmap_over_ensemble_equals_loop():
  members = 3
  params, state = jax.vmap(lambda _: jaxbn.bn_init(4))(jnp.arange(members))
  params = params._replace(scale=params.scale * jnp.arange(1.0, 4.0)[:, None])
  x = jax.random.normal(jax.random.key(0), (members, 16, 4))
  y, new = jax.vmap(jaxbn.bn_train)(params, state, x)
  for i in range(members):
    pi, si = jax.tree.map(lambda t, i=i: t[i], (params, state))
    yi, ni = jaxbn.bn_train(pi, si, x[i])
    np.testing.assert_allclose(y[i], yi, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(jax.tree.map(lambda t, i=i: t[i], new), ni, rtol=1e-6)


def test_nested_vmap():
  params, state = jaxbn.bn_init(4)
  x = jax.random.normal(jax.random.key(0), (2, 3, 8, 4))
  f = jax.vmap(jax.vmap(lambda x: jaxbn.bn_train(params, state, x)))
  y, _new = f(x)
  chex.assert_shape(y, (2, 3, 8, 4))
  np.testing.assert_allclose(y[1, 2], jaxbn.bn_train(params, state, x[1, 2])[0], rtol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_vmap_axis_name_is_the_batch(masked):
  params, state = _random_params(jax.random.key(0), (4,))
  x = jax.random.normal(jax.random.key(1), (16, 4)) * 3 + 1
  mask = jnp.arange(16) % 3 != 0 if masked else None
  ct = jax.random.normal(jax.random.key(2), (16, 4))

  def per_example(p, x, m, c):
    y, new = jaxbn.bn_train(p, state, x, axis_name="b", mask=m)
    return jnp.sum(y * c), (y, new)

  def whole(p, x):
    y, new = jaxbn.bn_train(p, state, x, mask=None if mask is None else mask[:, None])
    return jnp.sum(y * ct), (y, new)

  in_axes = (None, 0, None if mask is None else 0, 0)
  (gp, gx), (y, new) = jax.vmap(
    jax.grad(per_example, (0, 1), has_aux=True), in_axes=in_axes, axis_name="b"
  )(params, x, mask, ct)
  (gp_ref, gx_ref), (y_ref, new_ref) = jax.grad(whole, (0, 1), has_aux=True)(params, x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(jax.tree.map(lambda t: t[0], new), new_ref, rtol=1e-5)
  np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-4)
  chex.assert_trees_all_close(jax.tree.map(lambda t: t.sum(0), gp), gp_ref, rtol=1e-4, atol=1e-4)


def test_scan_over_steps_equals_loop():
  params, state = jaxbn.bn_init(4)
  xs = jax.random.normal(jax.random.key(0), (5, 8, 4)) + 2

  def body(state, x):
    y, state = jaxbn.bn_train(params, state, x, momentum=0.9)
    return state, y

  final, ys = jax.lax.scan(body, state, xs)
  st = state
  for t in range(5):
    y, st = jaxbn.bn_train(params, st, xs[t], momentum=0.9)
    np.testing.assert_allclose(ys[t], y, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(final, st, rtol=1e-6)


def _mesh():
  assert jax.device_count() == 8, "tests/conftest.py sets 8 CPU devices"
  return Mesh(np.array(jax.devices()), ("data",))


@pytest.mark.parametrize("masked", [False, True])
def test_shard_map_data_parallel_equals_single_device(masked):
  mesh = _mesh()
  params, state = _random_params(jax.random.key(0), (3,))
  x = jax.random.normal(jax.random.key(1), (32, 2, 3)) * 2 + 5
  ct = jax.random.normal(jax.random.key(2), x.shape)
  if masked:  # unequal valid counts per device: 1, 4, 4, 4, 0, 2, 4, 3
    valid = [1, 4, 4, 4, 0, 2, 4, 3]
    mask = jnp.array([i < v for v in valid for i in range(4)])[:, None, None]
  else:
    mask = jnp.ones((32, 1, 1), bool)

  def loss(p, st, x, m, c):
    y, new = jaxbn.bn_train(p, st, x, axis_name="data", mask=m)
    return jnp.sum(y * c), new

  def sharded(p, st, x, m, c):
    (value, new), (gp, gx) = jax.value_and_grad(loss, (0, 2), has_aux=True)(p, st, x, m, c)
    return jax.lax.psum(value, "data"), new, gp, gx

  f = jax.jit(
    jax.shard_map(
      sharded,
      mesh=mesh,
      in_specs=(P(), P(), P("data"), P("data"), P("data")),
      out_specs=(P(), P(), P(), P("data")),
    )
  )
  total, new, gp, gx = f(params, state, x, mask, ct)

  def single(p, x):
    y, new = jaxbn.bn_train(p, state, x, mask=mask)
    return jnp.sum(y * ct), new

  (l_ref, new_ref), (gp_ref, gx_ref) = jax.value_and_grad(single, (0, 1), has_aux=True)(params, x)
  np.testing.assert_allclose(total, l_ref, rtol=1e-4)
  chex.assert_trees_all_close(new, new_ref, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(gp, gp_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-4)


def test_pmap_axis_name_equals_single_device():
  params, state = _random_params(jax.random.key(0), (3,))
  x = jax.random.normal(jax.random.key(1), (8, 4, 3)) * 2 + 1  # 8 devices, 4 examples each
  y, new = jax.pmap(lambda x: jaxbn.bn_train(params, state, x, axis_name="d"), axis_name="d")(x)
  y_ref, new_ref = jaxbn.bn_train(params, state, x.reshape(32, 3))
  np.testing.assert_allclose(y.reshape(32, 3), y_ref, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(jax.tree.map(lambda t: t[0], new), new_ref, rtol=1e-5)


@pytest.mark.slow
def test_masked_shards_match_numpy_where_flax_mean_of_means_does_not():
  """REFERENCE.md s.5: valid counts 1, 4, 4, 4 on 4 devices."""
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  x = jnp.array([[v] for v in [20.0, 0, 0, 0, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14, 15]])
  valid = jnp.array([i < v for v in (1, 4, 4, 4) for i in range(4)])[:, None]
  params, state = jaxbn.bn_init(1)
  f = jax.shard_map(
    lambda x, m: jaxbn.bn_train(params, state, x, axis_name="data", mask=m, momentum=None)[1],
    mesh=mesh,
    in_specs=(P("data"), P("data")),
    out_specs=P(),
  )
  new = f(x, valid)
  ref = np.asarray(x)[np.asarray(valid)]
  np.testing.assert_allclose(new.mean, ref.mean(0), rtol=1e-6)
  np.testing.assert_allclose(new.var, ref.var(0), rtol=1e-5)


@pytest.mark.slow
def test_axis_index_groups_normalize_groups_independently():
  mesh = _mesh()
  params, state = jaxbn.bn_init(2)
  x = jax.random.normal(jax.random.key(0), (16, 2)) + jnp.repeat(jnp.arange(8.0), 2)[:, None]
  groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
  f = jax.shard_map(
    lambda x: jaxbn.bn_train(params, state, x, axis_name="data", axis_index_groups=groups)[0],
    mesh=mesh,
    in_specs=P("data"),
    out_specs=P("data"),
  )
  y = f(x)
  np.testing.assert_allclose(y[:8], jaxbn.bn_train(params, state, x[:8])[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y[8:], jaxbn.bn_train(params, state, x[8:])[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------- ghost batch and renorm


@pytest.mark.slow
def test_ghost_batches_are_contiguous_and_inference_unchanged():
  params, state = _random_params(jax.random.key(0), (3,))
  x = jax.random.normal(jax.random.key(1), (12, 2, 3)) + jnp.arange(12.0)[:, None, None]
  y, new = jaxbn.bn_train(params, state, x, ghost_batch_size=4, momentum=None)
  for g in range(3):
    yg, _ = jaxbn.bn_train(params, state, x[4 * g : 4 * g + 4])
    np.testing.assert_allclose(y[4 * g : 4 * g + 4], yg, rtol=1e-5, atol=1e-5)
  # Running statistics are those of the whole batch.
  _, whole = jaxbn.bn_train(params, state, x, momentum=None)
  chex.assert_trees_all_close(new, whole, rtol=1e-5)
  # Gradients agree with the per-ghost-batch computation.
  g1 = jax.grad(
    lambda x: jnp.sum(jnp.sin(jaxbn.bn_train(params, state, x, ghost_batch_size=4)[0]))
  )(x)
  g2 = jax.grad(
    lambda x: sum(
      jnp.sum(jnp.sin(jaxbn.bn_train(params, state, x[4 * g : 4 * g + 4])[0])) for g in range(3)
    )
  )(x)
  np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-5)


def test_ghost_batches_nchw_and_masked():
  params, state = jaxbn.bn_init(3)
  x = jax.random.normal(jax.random.key(0), (8, 3, 4))
  mask = (jnp.arange(8) % 4 != 3)[:, None, None]
  y, new = jaxbn.bn_train(params, state, x, axis=1, ghost_batch_size=4, mask=mask)
  y0, _ = jaxbn.bn_train(params, state, x[:4], axis=1, mask=mask[:4])
  np.testing.assert_allclose(y[:4], y0, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(new.count, np.full(3, 6 * 4))


def test_renorm_with_unit_limits_is_plain_bn():
  params, state = _random_params(jax.random.key(0), (4,))
  x = jax.random.normal(jax.random.key(1), (16, 4)) * 3
  plain = jax.value_and_grad(lambda p: jnp.sum(jnp.sin(jaxbn.bn_train(p, state, x)[0])))
  renorm = jax.value_and_grad(
    lambda p: jnp.sum(
      jnp.sin(jaxbn.bn_train(p, state, x, renorm=jaxbn.Renorm(rmax=1.0, dmax=0.0))[0])
    )
  )
  chex.assert_trees_all_close(plain(params), renorm(params), rtol=1e-5)


def test_renorm_closed_form_and_gradient():
  params, state = _random_params(jax.random.key(0), (4,))
  x = jax.random.normal(jax.random.key(1), (16, 4)) * 3 + 1
  eps = 1e-5
  rn = jaxbn.Renorm(rmax=1.5, dmax=0.5)
  y, _new = jaxbn.bn_train(params, state, x, renorm=rn, epsilon=eps)
  x64 = np.asarray(x, np.float64)
  mu, sb = x64.mean(0), np.sqrt(x64.var(0) + eps)
  sigma = np.sqrt(np.asarray(state.var, np.float64) + eps)
  r = np.clip(sb / sigma, 1 / 1.5, 1.5)
  d = np.clip((mu - np.asarray(state.mean)) / sigma, -0.5, 0.5)
  ref = ((x64 - mu) / sb * r + d) * np.asarray(params.scale) + np.asarray(params.bias)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  # r, d are constants for the gradient: autodiff of the same formula with them frozen.
  rj, dj = jnp.asarray(r, jnp.float32), jnp.asarray(d, jnp.float32)
  ref_fn = lambda p, x: jnp.sum(
    jnp.sin(
      (_plain_bn(jaxbn.BNParams(jnp.ones(4), jnp.zeros(4)), x, eps=eps) * rj[None] + dj[None])
      * p.scale[None]
      + p.bias[None]
    )
  )
  ours_fn = lambda p, x: jnp.sum(jnp.sin(jaxbn.bn_train(p, state, x, renorm=rn, epsilon=eps)[0]))
  chex.assert_trees_all_close(
    jax.grad(ours_fn, (0, 1))(params, x), jax.grad(ref_fn, (0, 1))(params, x), rtol=1e-4, atol=1e-4
  )


def test_renorm_schedule_reads_the_step_in_the_state():
  sched = jaxbn.renorm_schedule(warmup_steps=2, rmax_steps=4, dmax_steps=4)
  params, state = _random_params(jax.random.key(0), (4,))
  x = jax.random.normal(jax.random.key(1), (16, 4)) * 3 + 1
  y_plain, _ = jaxbn.bn_train(params, state, x)
  y0, s1 = jaxbn.bn_train(params, state, x, renorm=sched)  # step 0: plain BN
  np.testing.assert_allclose(y0, y_plain, rtol=1e-6, atol=1e-6)
  assert int(s1.step) == 1
  y_late, _ = jaxbn.bn_train(params, state._replace(step=jnp.int32(10)), x, renorm=sched)
  y_ref, _ = jaxbn.bn_train(params, state, x, renorm=jaxbn.Renorm(3.0, 5.0))
  np.testing.assert_allclose(y_late, y_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape, axis", [((3, 8, 2), 0), ((1, 2, 4, 1, 2), (0, 1))])
def test_ghost_batches_after_a_feature_axis_update_the_whole_batch_statistics(shape, axis):
  # The batch is the first non-feature axis, here after a feature axis: each
  # ghost batch's moments must still merge per feature, not across features.
  x = jax.random.normal(jax.random.key(5), shape) * 2 + 1
  fshape = tuple(shape[a] for a in ((axis,) if isinstance(axis, int) else axis))
  params, state = jaxbn.bn_init(fshape)
  _, new = jaxbn.bn_train(params, state, x, axis=axis, momentum=None, ghost_batch_size=2)
  red = tuple(i for i in range(len(shape)) if i not in np.atleast_1d(axis) % len(shape))
  x64 = np.asarray(x, np.float64)
  tol = 16 * np.finfo(np.float32).eps
  np.testing.assert_allclose(new.mean, x64.mean(red).reshape(fshape), rtol=tol, atol=tol)
  np.testing.assert_allclose(new.var, x64.var(red).reshape(fshape), rtol=tol, atol=tol)
