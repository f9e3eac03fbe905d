"""population_stats: exact and Algorithm-2 statistics over a whole data set."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn import data
from tests.reference import bn_train_ref

EPS = 1e-5


def _params(seed=0, din=5, dh=6, dout=3):
  k1, k2 = jax.random.split(jax.random.key(seed))
  w1 = jax.random.normal(k1, (din, dh)) / np.sqrt(din)
  w2 = jax.random.normal(k2, (dh, dout)) / np.sqrt(dh)
  p1, s1 = jaxbn.bn_init(dh)
  p2, s2 = jaxbn.bn_init(dout)
  p1 = p1._replace(scale=jnp.linspace(0.5, 2.0, dh), bias=jnp.linspace(-1.0, 1.0, dh))
  params = {"w1": w1, "w2": w2, "bn1": p1, "bn2": p2}
  return params, {"bn1": s1, "bn2": s2}


def forward(params, states, x, **bn_kwargs):
  """Dense -> BN -> relu -> Dense -> BN, in training mode."""
  h, s1 = jaxbn.bn_train(params["bn1"], states["bn1"], x @ params["w1"], **bn_kwargs)
  h = jax.nn.relu(h)
  y, s2 = jaxbn.bn_train(params["bn2"], states["bn2"], h @ params["w2"], **bn_kwargs)
  return y, {"bn1": s1, "bn2": s2}


def _activations_ref(params, x):
  """The float64 inputs of both BN layers for one batch (Algorithm 1)."""
  p = jax.tree.map(lambda t: np.asarray(t, np.float64), params)
  h1 = np.asarray(x, np.float64) @ p["w1"]
  zeros = np.zeros(h1.shape[1])
  y1, _, _ = bn_train_ref(h1, p["bn1"].scale, p["bn1"].bias, zeros, zeros + 1, epsilon=EPS)
  h2 = np.maximum(y1, 0) @ p["w2"]
  return {"bn1": h1, "bn2": h2}


def _batches(sizes, din=5, seed=1):
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=(n, din)) * 3 + 2).astype(np.float32) for n in sizes]


@pytest.mark.slow
def test_exact_equals_numpy_on_concatenated_activations():
  params, states = _params()
  batches = _batches([16, 7, 32, 3])  # unequal sizes: a plain mean of means is wrong
  got = jaxbn.population_stats(forward, params, states, batches, progress=False)
  acts = [_activations_ref(params, x) for x in batches]
  for name in ("bn1", "bn2"):
    allx = np.concatenate([a[name] for a in acts])
    np.testing.assert_allclose(got[name].mean, allx.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[name].var, allx.var(0), rtol=1e-5)  # biased
    np.testing.assert_array_equal(got[name].count, np.full(allx.shape[1], len(allx)))
    assert got[name].mean.dtype == jnp.float32 and got[name].step == states[name].step


def test_paper_estimator_is_algorithm_2():
  params, states = _params()
  m = 8
  batches = _batches([m] * 5)
  got = jaxbn.population_stats(forward, params, states, batches, estimator="paper", progress=False)
  acts = [_activations_ref(params, x) for x in batches]
  for name in ("bn1", "bn2"):
    mus = np.stack([a[name].mean(0) for a in acts])
    vars_ = np.stack([a[name].var(0) for a in acts])
    np.testing.assert_allclose(got[name].mean, mus.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[name].var, m / (m - 1) * vars_.mean(0), rtol=1e-5)


def test_paper_estimator_corrects_each_batch_by_its_own_size():
  params, states = _params()
  batches = _batches([8, 8, 3])
  got = jaxbn.population_stats(forward, params, states, batches, estimator="paper", progress=False)
  acts = [_activations_ref(params, x)["bn1"] for x in batches]
  unbiased = np.stack([a.var(0, ddof=1) for a in acts])
  np.testing.assert_allclose(got["bn1"].var, unbiased.mean(0), rtol=1e-5)


def test_convolution_statistics_cover_batch_and_positions():
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 2, 4))
  bn, state = jaxbn.bn_init(4)

  def conv_forward(params, state, x, **bn_kwargs):
    h = jax.lax.conv_general_dilated(
      x, params["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jaxbn.bn_train(params["bn"], state, h, **bn_kwargs)

  params = {"kernel": kernel, "bn": bn}
  rng = np.random.default_rng(0)
  batches = [rng.normal(size=(n, 6, 6, 2)).astype(np.float32) + 1 for n in (4, 2, 5)]
  got = jaxbn.population_stats(conv_forward, params, state, batches, progress=False)
  conv = jax.jit(
    lambda x: jax.lax.conv_general_dilated(
      x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
  )
  allh = np.concatenate([np.asarray(conv(x), np.float64).reshape(-1, 4) for x in batches])
  np.testing.assert_allclose(got.mean, allh.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.var, allh.var(0), rtol=1e-4)
  np.testing.assert_array_equal(got.count, np.full(4, (4 + 2 + 5) * 36))


def test_masked_values_are_left_out_and_unseen_features_keep_their_state():
  _, state = jaxbn.bn_init(3)
  state = state._replace(mean=jnp.array([5.0, 5.0, 5.0]), var=jnp.array([7.0, 7.0, 7.0]))
  params, _ = jaxbn.bn_init(3)

  def masked_forward(params, state, batch, **bn_kwargs):
    x, mask = batch
    return jaxbn.bn_train(params, state, x, mask=mask, **bn_kwargs)

  rng = np.random.default_rng(0)
  batches = []
  for n in (6, 9):
    x = rng.normal(size=(n, 3)).astype(np.float32)
    mask = rng.random((n, 3)) < 0.6
    mask[:2, :2] = True  # features 0 and 1 have values in every batch
    mask[:, 2] = False  # feature 2 never has one
    batches.append((x, mask))
  got = jaxbn.population_stats(masked_forward, params, state, batches, progress=False)
  xs = np.concatenate([x for x, _ in batches]).astype(np.float64)
  ms = np.concatenate([m for _, m in batches])
  for k in (0, 1):
    v = xs[ms[:, k], k]
    np.testing.assert_allclose(got.mean[k], v.mean(), rtol=1e-5)
    np.testing.assert_allclose(got.var[k], v.var(), rtol=1e-5)
  assert float(got.mean[2]) == 5.0 and float(got.var[2]) == 7.0 and float(got.count[2]) == 0


def test_accepts_a_one_shot_generator_and_an_already_jitted_forward(capsys):
  params, states = _params()
  batches = _batches([10] * 30, seed=3)
  want = jaxbn.population_stats(forward, params, states, batches, progress=False)
  gen = (x for x in batches)  # no len, consumed once
  got = jaxbn.population_stats(jax.jit(forward), params, states, gen, total=30, progress=True)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert "population_stats" in capsys.readouterr().err  # the progress bar, when asked
  jaxbn.population_stats(forward, params, states, batches)
  assert capsys.readouterr().err == ""  # silent by default


def test_a_forward_that_ignores_the_options_fails_instead_of_returning_ema():
  params, states = _params()
  batches = _batches([8, 8])
  ema_forward = jax.jit(functools.partial(forward, momentum=0.9))

  def ignores_kwargs(params, states, x, **bn_kwargs):
    return ema_forward(params, states, x)

  with pytest.raises(ValueError, match="momentum"):
    jaxbn.population_stats(ignores_kwargs, params, states, batches, progress=False)


def test_a_forward_with_renorm_baked_in_fails():
  params, states = _params()

  def renorm_forward(params, states, x, **bn_kwargs):
    return forward(params, states, x, momentum=None, renorm=jaxbn.Renorm(1.5, 1.0))

  with pytest.raises(ValueError, match="depend on the running"):
    jaxbn.population_stats(renorm_forward, params, states, _batches([8]), progress=False)


def test_an_inference_forward_fails():
  params, states = _params()

  def infer_forward(params, states, x, **bn_kwargs):
    h = jax.nn.relu(jaxbn.bn_infer(params["bn1"], states["bn1"], x @ params["w1"]))
    return jaxbn.bn_infer(params["bn2"], states["bn2"], h @ params["w2"]), states

  with pytest.raises(ValueError, match="inference forward"):
    jaxbn.population_stats(infer_forward, params, states, _batches([8]), progress=False)


def test_bad_arguments_are_named():
  params, states = _params()
  with pytest.raises(ValueError, match="estimator"):
    jaxbn.population_stats(forward, params, states, _batches([4]), estimator="ema")
  with pytest.raises(ValueError, match="batches is empty"):
    jaxbn.population_stats(forward, params, states, [], progress=False)
  with pytest.raises(TypeError, match="BNState"):
    jaxbn.population_stats(forward, params, {"bn1": states["bn1"], "w": 1.0}, [], progress=False)


@pytest.mark.slow
def test_statistics_over_the_global_batch_of_a_device_mesh():
  params, states = _params()
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

  def sharded_forward(params, states, x, **bn_kwargs):
    local = functools.partial(forward, axis_name="data", **bn_kwargs)
    return jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=(P("data"), P())
    )(params, states, x)

  batches = _batches([16, 32, 8], seed=5)
  got = jaxbn.population_stats(sharded_forward, params, states, batches, progress=False)
  acts = [_activations_ref(params, x) for x in batches]  # whole-batch statistics
  for name in ("bn1", "bn2"):
    allx = np.concatenate([a[name] for a in acts])
    np.testing.assert_allclose(got[name].mean, allx.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[name].var, allx.var(0), rtol=1e-5)
  paper = jaxbn.population_stats(
    sharded_forward, params, states, batches, estimator="paper", progress=False
  )
  mus = np.stack([a["bn2"].mean(0) for a in acts])
  np.testing.assert_allclose(paper["bn2"].mean, mus.mean(0), rtol=1e-5, atol=1e-6)


def test_recalibrated_layer_normalizes_the_training_set():
  params, states = _params()
  batches = _batches([64] * 4, seed=7)
  got = jaxbn.population_stats(forward, params, states, batches, progress=False)
  h = np.concatenate(batches) @ np.asarray(params["w1"])
  y = np.asarray(jaxbn.bn_infer(params["bn1"], got["bn1"], jnp.asarray(h)), np.float64)
  jaxbn.testing.assert_normalized(y, params=params["bn1"], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------
# Models of jaxbn.models (linen, nnx, plain JAX) against a float64 NumPy forward.


def _digits_batches(sizes=(96, 64, 40), image=True):
  ds = data.load_digits()
  x = ds.x_train if image else ds.flat().x_train
  out, start = [], 0
  for n in sizes:
    out.append(x[start : start + n])
    start += n
  return out


def _bn_ref(h, scale, bias):
  c = h.shape[-1]
  y, _, _ = bn_train_ref(h, scale, bias, np.zeros(c), np.ones(c), epsilon=EPS)
  return y


def _mlp_acts_ref(kernels, bns, head_unused, x):
  """Inputs of each BN layer of a sigmoid MLP, one batch, training mode."""
  h, acts = np.asarray(x, np.float64).reshape(len(x), -1), []
  for k, (scale, bias) in zip(kernels, bns, strict=True):
    z = h @ np.asarray(k, np.float64)
    acts.append(z)
    h = 1 / (1 + np.exp(-_bn_ref(z, scale, bias)))
  return acts


def _conv_ref(x, k):
  """3x3 SAME convolution, NHWC / HWIO, float64."""
  n, hh, ww, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((n, hh, ww, k.shape[-1]))
  for i in range(3):
    for j in range(3):
      out += np.einsum("nhwc,cd->nhwd", xp[:, i : i + hh, j : j + ww], k[i, j])
  return out


def _cnn_acts_ref(kernels, bns, x):
  h, acts = np.asarray(x, np.float64), []
  for k, (scale, bias) in zip(kernels, bns, strict=True):
    z = _conv_ref(h, np.asarray(k, np.float64))
    acts.append(z.reshape(-1, z.shape[-1]))
    y = np.maximum(_bn_ref(z, scale, bias), 0)
    n, hh, ww, c = y.shape
    h = y.reshape(n, hh // 2, 2, ww // 2, 2, c).max((2, 4))
  return acts


def _check(got_means, got_vars, acts_per_batch):
  for i, (mean, var) in enumerate(zip(got_means, got_vars, strict=True)):
    allx = np.concatenate([a[i] for a in acts_per_batch])
    np.testing.assert_allclose(mean, allx.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(var, allx.var(0), rtol=1e-4, atol=1e-7)


def _linen_refs(variables, batches, cnn):
  p = variables["params"]
  n = len([k for k in p if k.startswith("BatchNorm_")])
  layer = "Conv" if cnn else "Dense"
  kernels = [p[f"{layer}_{i}"]["kernel"] for i in range(n)]
  bns = [(p[f"BatchNorm_{i}"]["scale"], p[f"BatchNorm_{i}"]["bias"]) for i in range(n)]
  if cnn:
    return n, [_cnn_acts_ref(kernels, bns, x) for x in batches]
  return n, [_mlp_acts_ref(kernels, bns, None, x) for x in batches]


@pytest.mark.slow
@pytest.mark.parametrize("cnn", [False, True], ids=["mlp", "cnn"])
def test_linen_models_get_exact_statistics_for_every_layer(cnn):
  from jaxbn.models import CNN
  from jaxbn.models import MLP

  # A model trained with EMA options: population_stats overrides them.
  opts = jaxbn.BNOptions(momentum=0.9, renorm=jaxbn.renorm_schedule(), ema_warmup=True)
  model = CNN(features=(4, 6), bn_options=opts) if cnn else MLP(features=(16, 12), bn_options=opts)
  batches = _digits_batches(image=True)
  variables = model.init(jax.random.key(0), batches[0], train=False)
  variables["params"] = jax.tree.map(lambda t: t * 1.3, variables["params"])  # not the init
  got = jaxbn.linen_population_stats(model, variables, batches, train=True, progress=False)
  n, acts = _linen_refs(variables, batches, cnn)
  stats = got["batch_stats"]
  _check(
    [stats[f"BatchNorm_{i}"]["mean"] for i in range(n)],
    [stats[f"BatchNorm_{i}"]["var"] for i in range(n)],
    acts,
  )
  assert jax.tree.structure(got) == jax.tree.structure(variables)
  total = sum(len(a[0]) for a in acts)  # examples, times positions for the CNN
  count = stats["BatchNorm_0"]["count"]
  np.testing.assert_array_equal(count, np.full(count.shape, total))
  jax.tree.map(np.testing.assert_array_equal, got["params"], variables["params"])


@pytest.mark.slow
def test_linen_paper_estimator_and_inference_with_the_new_statistics():
  from jaxbn.models import MLP

  model = MLP(features=(16,))
  batches = _digits_batches(sizes=(50, 50, 50), image=False)
  variables = model.init(jax.random.key(0), batches[0], train=False)
  got = jaxbn.linen_population_stats(
    model, variables, batches, estimator="paper", train=False, progress=False
  )
  _, acts = _linen_refs(variables, batches, cnn=False)
  mus = np.stack([a[0].mean(0) for a in acts])
  vs = np.stack([a[0].var(0, ddof=1) for a in acts])
  bs = got["batch_stats"]["BatchNorm_0"]
  np.testing.assert_allclose(bs["mean"], mus.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(bs["var"], vs.mean(0), rtol=1e-4, atol=1e-7)
  assert set(bs) == {"mean", "var"}  # a default layer keeps flax's tree


def test_linen_model_with_flax_batchnorm_is_refused():
  import flax.linen as nn

  class FlaxBN(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      return nn.BatchNorm(use_running_average=not train)(nn.Dense(3)(x))

  model = FlaxBN()
  x = jnp.ones((4, 2))
  variables = model.init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match=r"jaxbn.linen.BatchNorm"):
    jaxbn.linen_population_stats(model, variables, [x], train=True, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("cnn", [False, True], ids=["mlp", "cnn"])
def test_nnx_models_get_exact_statistics_for_every_layer(cnn):
  from flax import nnx

  from jaxbn.models import NNXCNN
  from jaxbn.models import NNXMLP

  rngs = nnx.Rngs(0)
  if cnn:
    model = NNXCNN(1, features=(4, 6), bn_options=jaxbn.BNOptions(momentum=0.9), rngs=rngs)
    layers = model.conv
  else:
    model = NNXMLP(
      64, features=(16, 12), bn_options=jaxbn.BNOptions(momentum=0.9, ema_warmup=True), rngs=rngs
    )
    layers = model.dense
  model.eval()  # the mode the model is left in does not matter
  for bn in model.bn:
    bn.scale[...] = bn.scale[...] * 1.5
  batches = _digits_batches(image=True)
  jaxbn.nnx_population_stats(model, batches, progress=False)
  kernels = [layer.kernel[...] for layer in layers]
  bns = [(bn.scale[...], bn.bias[...]) for bn in model.bn]
  ref = _cnn_acts_ref if cnn else functools.partial(_mlp_acts_ref, head_unused=None)
  acts = [ref(kernels, bns, x=x) for x in batches]
  _check([bn.mean[...] for bn in model.bn], [bn.var[...] for bn in model.bn], acts)
  assert model.bn[0].use_running_average is True  # the model itself was not switched


def test_nnx_forced_evaluation_mode_is_refused():
  from flax import nnx

  from jaxbn.models import NNXMLP

  model = NNXMLP(64, features=(8,), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="inference forward"):
    jaxbn.nnx_population_stats(model, _digits_batches(image=False), train=False, progress=False)


@pytest.mark.slow
def test_plain_jax_models_through_population_stats():
  from jaxbn.models import apply_mlp
  from jaxbn.models import init_mlp

  params, states = init_mlp(jax.random.key(0), 64, (16, 12))

  def forward(params, states, x, **bn_kwargs):
    return apply_mlp(params, states, x, train=True, bn_options=jaxbn.BNOptions(**bn_kwargs))

  batches = _digits_batches(image=False)
  got = jaxbn.population_stats(forward, params, states, batches, progress=False)
  kernels = [layer["kernel"] for layer in params["hidden"]]
  bns = [(layer["bn"].scale, layer["bn"].bias) for layer in params["hidden"]]
  acts = [_mlp_acts_ref(kernels, bns, None, x) for x in batches]
  _check([s.mean for s in got], [s.var for s in got], acts)


def test_repeated_calls_do_not_recompile_the_forward():
  params, states = _params()
  traces = []

  def counting_forward(params, states, x, **bn_kwargs):
    traces.append(1)
    return forward(params, states, x, **bn_kwargs)

  batches = _batches([8, 8, 8])
  for _ in range(3):
    jaxbn.population_stats(counting_forward, params, states, batches, progress=False)
  assert len(traces) == 1


def test_the_forward_is_checked_once_per_shape_and_a_bad_one_on_every_call(monkeypatch):
  from jaxbn import population

  checks = []
  check = population._check_forward
  monkeypatch.setattr(population, "_check_forward", lambda *a: checks.append(1) or check(*a))
  params, states = _params()

  def good(params, states, x, **bn_kwargs):
    return forward(params, states, x, **bn_kwargs)

  first = jaxbn.population_stats(good, params, states, _batches([8, 8]), progress=False)
  again = jaxbn.population_stats(good, params, states, _batches([8, 8]), progress=False)
  assert len(checks) == 1  # the compiled program passed already
  jax.tree.map(np.testing.assert_array_equal, first, again)
  jaxbn.population_stats(good, params, states, _batches([4, 8]), progress=False)
  assert len(checks) == 2  # a new first-batch shape compiles a new program: checked again

  def ignores_kwargs(params, states, x, **bn_kwargs):
    return forward(params, states, x, momentum=0.9)

  for _ in range(2):  # a failed check is not remembered
    with pytest.raises(ValueError, match="momentum"):
      jaxbn.population_stats(ignores_kwargs, params, states, _batches([8]), progress=False)


def test_batches_sharded_over_a_mesh_under_jit():
  from jax.sharding import NamedSharding

  params, states = _params()
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batches = _batches([16, 32], seed=6)
  sharded = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in batches]
  assert len(sharded[0].sharding.device_set) == 8
  got = jaxbn.population_stats(forward, params, states, sharded, progress=False)
  acts = [_activations_ref(params, x) for x in batches]
  for name in ("bn1", "bn2"):
    allx = np.concatenate([a[name] for a in acts])
    np.testing.assert_allclose(got[name].mean, allx.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[name].var, allx.var(0), rtol=1e-5)
