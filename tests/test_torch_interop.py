"""PyTorch interop (jaxbn.torch), checked against torch itself on CPU.

torch is the independent reference here: every expected value is what a torch
module computes, in float64 and float32. Tolerances are in units of the dtype's
machine epsilon (``eps``, 2.2e-16 and 1.2e-7), relative to ``max(1, |want|)``:
one layer (output, running statistics, gradients) within ``LAYER_EPS`` eps; the
end-to-end CNN trained in both for 13 steps within ``CNN_EPS`` eps, absolute
(its logits are below 1.5).
"""

import contextlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxbn
from jaxbn import linen as jbn
from jaxbn import nnx as jbnx
from jaxbn import torch as jtorch  # `torch` is PyTorch itself

pytestmark = pytest.mark.slow  # end-to-end: the full suite runs it, -m 'not slow' skips it

torch.set_num_threads(1)  # the test machines are small and shared

# The largest differences measured against torch 2.13 on AVX-512 (no larger
# under --xla_cpu_max_isa=AVX2): one layer 6 eps (float32 training output) and
# 11 eps (float32 dscale, a sum over the batch); the CNN 13 eps (float64 running
# mean, 2.9e-15) and 6 eps (float32 logits after fine-tuning, 7.2e-7).
LAYER_EPS = 16
CNN_EPS = 32
EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)
# dtype name -> (torch dtype, tolerance for one layer, for the trained CNN)
PRECISIONS = {
  name: (getattr(torch, name), LAYER_EPS * eps, CNN_EPS * eps)
  for name, eps in (("float64", EPS64), ("float32", EPS32))
}


@contextlib.contextmanager
def precision(name):
  """float64 needs jax_enable_x64; float32 runs in JAX's default mode."""
  with jax.enable_x64(name == "float64"):
    yield PRECISIONS[name]


def _np(t):
  return t.detach().cpu().numpy()


def _trained_bn(cls, c, shape, dtype, steps=3, seed=0, **kwargs):
  """A torch batch norm with random affine parameters after `steps` training steps."""
  torch.manual_seed(seed)
  bn = cls(c, **kwargs).to(dtype)
  with torch.no_grad():
    if bn.affine:
      bn.weight.uniform_(0.5, 2.0)
      bn.bias.normal_()
  bn.train()
  for _ in range(steps):
    bn(torch.randn(shape, dtype=dtype) * 3 + 2)
  return bn


def _assert_close(got, want, atol, what=""):
  got, want = np.asarray(got), np.asarray(want)
  err = np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)), initial=0.0)
  scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
  assert err <= atol * scale, f"{what}: max abs difference {err:.3e} > {atol * scale:.1e}"
  return err


# --------------------------------------------------------------------- import


def test_import_jaxbn_does_not_import_torch():
  code = "import sys, jaxbn, jaxbn.torch; assert 'torch' not in sys.modules, 'torch imported'"
  subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_torch_port_is_a_deprecated_alias_of_jaxbn_torch(monkeypatch):
  # Imported afresh whether or not an earlier test imported it; sys.modules and the package's
  # attribute are put back as they were after the test.
  for namespace, key in ((sys.modules, "jaxbn.torch_port"), (vars(jaxbn), "torch_port")):
    monkeypatch.setitem(namespace, key, None)  # records the entry (or its absence) to restore
    monkeypatch.delitem(namespace, key)
  message = r"jaxbn\.torch_port is deprecated: use jaxbn\.torch \(same names\)"
  with pytest.warns(FutureWarning, match=message) as w:
    import jaxbn.torch_port as old
  assert [r.filename for r in w] == [__file__]  # stacklevel: the warning points at the import
  # `from jaxbn import torch_port` (0.2's spelling) warns too, shown by default.
  monkeypatch.delitem(sys.modules, "jaxbn.torch_port")
  monkeypatch.delitem(vars(jaxbn), "torch_port")
  with pytest.warns(FutureWarning, match=message):
    from jaxbn import torch_port  # noqa: F401
  # 0.2's names, each the same object; names added since live in jaxbn.torch only.
  assert set(old.__all__) <= set(jtorch.__all__) and "from_torch_model" in old.__all__
  assert all(getattr(old, name) is getattr(jtorch, name) for name in old.__all__)


# --------------------------------------------------------------------- evaluation

LAYERS = [
  (torch.nn.BatchNorm1d, (8, 5)),
  (torch.nn.BatchNorm1d, (4, 5, 6)),
  (torch.nn.BatchNorm2d, (4, 5, 3, 3)),
  (torch.nn.BatchNorm3d, (2, 5, 2, 3, 2)),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("cls", "shape"), LAYERS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_eval_output_equals_torch(dtype, cls, shape):
  with precision(dtype) as (tdtype, atol, _):
    bn = _trained_bn(cls, 5, shape, tdtype, eps=1e-3)
    params, state = jaxbn.from_torch(bn)
    assert params.scale.dtype == state.mean.dtype == jnp.dtype(dtype)
    settings = jaxbn.torch_settings(bn)
    x = torch.randn(shape, dtype=tdtype) * 3 + 2
    y = jaxbn.bn_infer(params, state, jnp.asarray(_np(x)), axis=1, epsilon=settings.epsilon)
    assert y.dtype == jnp.dtype(dtype)
    _assert_close(y, _np(bn.eval()(x)), atol, "eval output")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_sync_batch_norm_ports_like_batch_norm(dtype):
  # SyncBatchNorm needs a process group only to train; its state is a BatchNorm's.
  with precision(dtype) as (tdtype, atol, _):
    ref = _trained_bn(torch.nn.BatchNorm2d, 4, (4, 4, 3, 3), tdtype, momentum=0.2)
    sbn = torch.nn.SyncBatchNorm(4, momentum=0.2).to(tdtype)
    sbn.load_state_dict(ref.state_dict())
    assert jaxbn.torch_settings(sbn) == jaxbn.torch_settings(ref)
    assert jaxbn.torch_settings(sbn).momentum == pytest.approx(0.8)
    params, state = jaxbn.from_torch(sbn)
    x = torch.randn(2, 4, 3, 3, dtype=tdtype)
    y = jaxbn.bn_infer(params, state, jnp.asarray(_np(x)), axis=1)
    _assert_close(y, _np(sbn.eval()(x)), atol, "SyncBatchNorm eval")
    fresh = torch.nn.SyncBatchNorm(4, momentum=0.2).to(tdtype)
    jaxbn.to_torch(params, state, fresh)
    for k, v in ref.state_dict().items():
      assert torch.equal(fresh.state_dict()[k], v), k


# --------------------------------------------------------------------- round trip


BN_CLASSES = [torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm]


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize(
  "cls", [torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.SyncBatchNorm]
)
def test_round_trip_is_bitwise(dtype, cls):
  tdtype = getattr(torch, dtype)
  with jax.enable_x64(dtype == "float64"):
    src = _trained_bn(torch.nn.BatchNorm2d, 6, (4, 6, 2, 2), torch.float32, steps=7)
    src = src.to(tdtype)
    with torch.no_grad():  # values that use every bit of the dtype
      src.weight.copy_(torch.rand(6, dtype=tdtype) / 3 + 1)
    params, state = jaxbn.from_torch(src)
    # Half-precision statistics are kept in float32 (exactly), as jaxbn's state is.
    assert state.mean.dtype == (jnp.float32 if dtype == "float16" else jnp.dtype(dtype))
    assert params.scale.dtype == jnp.dtype(dtype) and int(state.step) == 7
    dst = jaxbn.to_torch(params, state, cls(6).to(tdtype))
    for k, v in src.state_dict().items():
      got = dst.state_dict()[k]
      assert got.dtype == v.dtype and torch.equal(got, v), k
    # ... and back again.
    params2, state2 = jaxbn.from_torch(dst)
    for a, b in zip((*params, *state), (*params2, *state2), strict=True):
      assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def test_ported_arrays_do_not_alias_torch_memory():
  # jnp.asarray can wrap a NumPy view of the tensor without copying: then torch's in-place
  # optimizer updates would leak into the "ported" JAX arrays.
  bn = _trained_bn(torch.nn.BatchNorm1d, 64, (4, 64), torch.float32)
  conv = torch.nn.Conv2d(3, 64, 1)
  params, state = jaxbn.from_torch(bn)
  kernel = jtorch.torch_conv_kernel(conv.weight)
  before = [np.array(a) for a in (*params, *state, kernel)]
  with torch.no_grad():
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var, conv.weight):
      t.add_(1)
  for a, b in zip(before, (*params, *state, kernel), strict=True):
    np.testing.assert_array_equal(a, b)


def test_jaxbn_to_torch_to_jaxbn_is_exact():
  params, state = jaxbn.bn_init(3)
  rng = np.random.default_rng(0)
  params = jaxbn.BNParams(*(jnp.asarray(rng.normal(size=3), jnp.float32) for _ in range(2)))
  state = state._replace(
    mean=jnp.asarray(rng.normal(size=3), jnp.float32),
    var=jnp.asarray(rng.uniform(0.1, 3, size=3), jnp.float32),
    step=jnp.asarray(12, jnp.int32),
  )
  back_p, back_s = jaxbn.from_torch(jaxbn.to_torch(params, state, torch.nn.BatchNorm1d(3)))
  want = (*params, state.mean, state.var, state.step)
  for a, b in zip(want, (*back_p, back_s.mean, back_s.var, back_s.step), strict=True):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------- settings, state dicts


def test_settings_mapping():
  s = jaxbn.torch_settings(torch.nn.BatchNorm1d(3))
  assert s == jaxbn.TorchSettings(0.9, 1e-5, "unbiased", True, True)
  s = jaxbn.torch_settings(torch.nn.BatchNorm2d(3, eps=1e-3, momentum=0.25, affine=False))
  assert s == jaxbn.TorchSettings(0.75, 1e-3, "unbiased", False, True)
  assert s.module_kwargs() == {
    "momentum": 0.75,
    "epsilon": 1e-3,
    "running_var": "unbiased",
    "use_scale": False,
    "use_bias": False,
  }
  assert s.train_kwargs() == {"momentum": 0.75, "epsilon": 1e-3, "running_var": "unbiased"}
  s = jaxbn.torch_settings(torch.nn.BatchNorm3d(3, momentum=None, track_running_stats=False))
  assert s.momentum is None and not s.track_running_stats
  with pytest.raises(ValueError, match="pass the state"):
    s.train_kwargs()
  _, state = jaxbn.bn_init(3)
  assert float(s.train_kwargs(state._replace(step=jnp.asarray(3, jnp.int32)))["momentum"]) == 0.75
  with pytest.raises(TypeError, match="BatchNorm1d/2d/3d"):
    jaxbn.torch_settings(torch.nn.InstanceNorm2d(3))
  with pytest.raises(TypeError, match="BatchNorm1d/2d/3d"):
    jaxbn.from_torch(torch.nn.Linear(3, 3))


def test_affine_false_is_scale_one_bias_zero():
  bn = _trained_bn(torch.nn.BatchNorm2d, 3, (4, 3, 2, 2), torch.float32, affine=False)
  params, state = jaxbn.from_torch(bn)
  np.testing.assert_array_equal(params.scale, np.ones(3, np.float32))
  np.testing.assert_array_equal(params.bias, np.zeros(3, np.float32))
  np.testing.assert_array_equal(state.mean, _np(bn.running_mean))
  x = torch.randn(2, 3, 2, 2)
  y = jaxbn.bn_infer(params, state, jnp.asarray(_np(x)), axis=1)
  _assert_close(y, _np(bn.eval()(x)), LAYER_EPS * EPS32)
  jaxbn.to_torch(params, state, bn)  # scale 1, bias 0: representable
  with pytest.raises(ValueError, match="affine=False"):
    jaxbn.to_torch(params._replace(scale=params.scale * 2), state, bn)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_track_running_stats_false_uses_batch_statistics_at_eval(dtype):
  with precision(dtype) as (tdtype, atol, _):
    bn = _trained_bn(torch.nn.BatchNorm1d, 4, (6, 4), tdtype, track_running_stats=False)
    params, state = jaxbn.from_torch(bn)
    settings = jaxbn.torch_settings(bn)
    assert not settings.track_running_stats
    np.testing.assert_array_equal(state.mean, np.zeros(4))
    np.testing.assert_array_equal(state.var, np.ones(4))
    assert float(state.count[0]) == 0 and int(state.step) == 0
    x = torch.randn(6, 4, dtype=tdtype) * 2 + 1
    y, _ = jaxbn.bn_train(params, state, jnp.asarray(_np(x)), **settings.train_kwargs())
    _assert_close(y, _np(bn.eval()(x)), atol, "batch statistics at eval")
    jaxbn.to_torch(params, state, torch.nn.BatchNorm1d(4, track_running_stats=False))


def test_state_dicts_and_prefixes():
  model = torch.nn.Sequential(
    torch.nn.Conv2d(2, 3, 1), _trained_bn(torch.nn.BatchNorm2d, 3, (4, 3, 2, 2), torch.float32)
  )
  want_p, want_s = jaxbn.from_torch(model[1])
  for source, prefix in (
    (model[1].state_dict(), ""),
    (model.state_dict(), "1."),
    (model, "1"),
  ):
    got_p, got_s = jaxbn.from_torch(source, prefix=prefix)
    for a, b in zip((*want_p, *want_s), (*got_p, *got_s), strict=True):
      assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
  # affine=False / no running stats as state dicts.
  sd = torch.nn.BatchNorm1d(3, affine=False).state_dict()
  p, _ = jaxbn.from_torch(sd)
  np.testing.assert_array_equal(p.scale, np.ones(3))
  sd = torch.nn.BatchNorm1d(3, track_running_stats=False).state_dict()
  _, s = jaxbn.from_torch(sd)
  np.testing.assert_array_equal(s.var, np.ones(3))
  with pytest.raises(ValueError, match="prefix="):
    jaxbn.from_torch(model.state_dict())
  with pytest.raises(ValueError, match="only one of"):
    jaxbn.from_torch({"weight": torch.ones(3)})
  with pytest.raises(TypeError, match="state dict"):
    jaxbn.from_torch(np.ones(3))


# --------------------------------------------------------------------- count of ported statistics


def _torch_step(bn, x):
  bn.train()
  with torch.no_grad():
    return bn(x)


def test_ported_statistics_survive_ema_warmup_and_cumulative_average():
  with precision("float64") as (tdtype, atol, _):
    bn = _trained_bn(torch.nn.BatchNorm1d, 3, (4, 3), tdtype, steps=5)
    params, state = jaxbn.from_torch(bn)
    np.testing.assert_array_equal(state.count, np.full(3, jtorch.PORTED_COUNT))
    settings = jaxbn.torch_settings(bn)
    x = torch.randn(64, 3, dtype=tdtype) + 10
    # ema_warmup: the plain EMA, i.e. torch's own update (a count of 0 would
    # have replaced the statistics with the batch's).
    _, new = jaxbn.bn_train(
      params, state, jnp.asarray(_np(x)), ema_warmup=True, **settings.train_kwargs()
    )
    _torch_step(bn, x)
    _assert_close(new.mean, _np(bn.running_mean), atol, "ema_warmup mean")
    _assert_close(new.var, _np(bn.running_var), atol, "ema_warmup var")
    # momentum=None: the ported statistics weigh as PORTED_COUNT values.
    _, new = jaxbn.bn_train(params, state, jnp.asarray(_np(x)), momentum=None)
    n = 64.0
    want = (jtorch.PORTED_COUNT * np.asarray(state.mean) + n * _np(x.mean(0))) / (
      jtorch.PORTED_COUNT + n
    )
    _assert_close(new.mean, want, atol, "momentum=None mean")
    assert np.all(np.abs(np.asarray(new.mean) - np.asarray(state.mean)) < 1e-8)


def test_batch_values_continue_torch_cumulative_average_of_the_mean():
  # torch's momentum=None weighs batch t+1 by 1/(t+1); jaxbn's momentum=None weighs it by
  # n/(count+n): equal for the mean when count = t * n.
  with precision("float64") as (tdtype, atol, _):
    bn = _trained_bn(torch.nn.BatchNorm1d, 3, (4, 3), tdtype, steps=6, momentum=None)
    params, state = jaxbn.from_torch(bn, batch_values=4)
    np.testing.assert_array_equal(state.count, np.full(3, 24.0))
    for _ in range(3):
      x = torch.randn(4, 3, dtype=tdtype) * 2
      _, state = jaxbn.bn_train(params, state, jnp.asarray(_np(x)), momentum=None)
      _torch_step(bn, x)
    _assert_close(state.mean, _np(bn.running_mean), atol, "cumulative mean")


# --------------------------------------------------------------------- training, one layer


def _train_both(bn, xs, dtype, jit):
  """Trains `bn` (torch) and its port (jaxbn) on the batches `xs`; returns the differences."""
  params, state = jaxbn.from_torch(bn)
  settings = jaxbn.torch_settings(bn)
  g = torch.randn(xs[0].shape, dtype=xs[0].dtype)

  def step(params, state, x, g):
    def loss(p):
      y, new = jaxbn.bn_train(p, state, x, axis=1, **settings.train_kwargs(state))
      return jnp.sum(y * g), (y, new)

    (_, (y, new)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return y, new, grads

  step = jax.jit(step) if jit else step
  errs = {}
  for x in xs:
    y, state, grads = step(params, state, jnp.asarray(_np(x)), jnp.asarray(_np(g)))
    bn.train()
    bn.zero_grad()
    yt = bn(x)
    (yt * g).sum().backward()
    _, atol, _ = PRECISIONS[dtype]
    errs["y"] = max(errs.get("y", 0), _assert_close(y, _np(yt), atol, "output"))
    errs["mean"] = max(errs.get("mean", 0), _assert_close(state.mean, _np(bn.running_mean), atol))
    errs["var"] = max(errs.get("var", 0), _assert_close(state.var, _np(bn.running_var), atol))
    _assert_close(grads.scale, _np(bn.weight.grad), atol, "dscale")
    _assert_close(grads.bias, _np(bn.bias.grad), atol, "dbias")
    assert int(state.step) == int(bn.num_batches_tracked)
  return params, state, errs


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_batchnorm1d_batch4_trains_like_torch(dtype, momentum):
  with precision(dtype) as (tdtype, _, _):
    bn = _trained_bn(torch.nn.BatchNorm1d, 5, (4, 5), tdtype, momentum=momentum)
    xs = [torch.randn(4, 5, dtype=tdtype) * 3 + 1 for _ in range(8)]
    _train_both(bn, xs, dtype, jit=momentum is None)


def test_fine_tune_in_jaxbn_then_continue_in_torch():
  # num_batches_tracked travels as BNState.step: torch's cumulative average goes on unchanged.
  with precision("float64") as (tdtype, atol, _):
    a = _trained_bn(torch.nn.BatchNorm1d, 3, (4, 3), tdtype, steps=4, momentum=None)
    params, state = jaxbn.from_torch(a)
    settings = jaxbn.torch_settings(a)
    xs = [torch.randn(5, 3, dtype=tdtype) for _ in range(6)]
    for x in xs[:3]:
      _, state = jaxbn.bn_train(params, state, jnp.asarray(_np(x)), **settings.train_kwargs(state))
    b = jaxbn.to_torch(params, state, torch.nn.BatchNorm1d(3, momentum=None).to(tdtype))
    assert int(b.num_batches_tracked) == 7
    for x in xs[:3]:
      _torch_step(a, x)
    for x in xs[3:]:
      _torch_step(a, x)
      _torch_step(b, x)
    _assert_close(_np(b.running_mean), _np(a.running_mean), atol)
    _assert_close(_np(b.running_var), _np(a.running_var), atol)
    assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 10


# --------------------------------------------------------------------- flax modules


def test_linen_variables_evaluate_with_ema_warmup_and_cumulative():
  bn = _trained_bn(torch.nn.BatchNorm2d, 3, (4, 3, 2, 2), torch.float32)
  x = torch.randn(2, 3, 2, 2)
  want = _np(bn.eval()(x))
  for module in (
    jbn.BatchNorm(axis=1, momentum=0.9),
    jbn.BatchNorm(axis=1, momentum=0.9, ema_warmup=True),
    jbn.BatchNorm(axis=1, momentum=None),
  ):
    variables = jaxbn.from_torch_linen(bn, module)
    ref = module.init(jax.random.key(0), jnp.asarray(_np(x)), use_running_average=True)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, ref)
    y = module.apply(variables, jnp.asarray(_np(x)), use_running_average=True)
    _assert_close(y, want, LAYER_EPS * EPS32, "linen eval")
  plain = jaxbn.from_torch_linen(torch.nn.BatchNorm1d(3, affine=False))
  assert plain["params"] == {} and sorted(plain["batch_stats"]) == ["mean", "var"]
  with pytest.raises(ValueError, match="use_scale=False"):
    jaxbn.from_torch_linen(bn, jbn.BatchNorm(use_scale=False))
  back = jtorch.to_torch_linen(jaxbn.from_torch_linen(bn), torch.nn.BatchNorm2d(3))
  for k in ("weight", "bias", "running_mean", "running_var"):
    assert torch.equal(getattr(back, k), getattr(bn, k)), k
  assert int(back.num_batches_tracked) == 0  # linen keeps no step unless a renorm schedule does


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_linen_module_trains_like_torch(dtype):
  with precision(dtype) as (tdtype, atol, _):
    bn = _trained_bn(torch.nn.BatchNorm2d, 3, (4, 3, 2, 2), tdtype)
    # A float64 port needs a float64 module (its statistics dtype follows param_dtype).
    kwargs = jaxbn.torch_settings(bn).module_kwargs()
    module = jbn.BatchNorm(axis=1, param_dtype=jnp.dtype(dtype), **kwargs)
    variables = jaxbn.from_torch_linen(bn, module)
    for _ in range(3):
      x = torch.randn(4, 3, 2, 2, dtype=tdtype)
      y, upd = module.apply(
        variables, jnp.asarray(_np(x)), use_running_average=False, mutable=["batch_stats"]
      )
      variables = {**variables, **upd}
      _assert_close(y, _np(_torch_step(bn, x)), atol, "linen train output")
    _assert_close(variables["batch_stats"]["var"], _np(bn.running_var), atol, "linen var")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_nnx_module_fill_eval_and_round_trip(dtype):
  with precision(dtype) as (tdtype, atol, _):
    tbn = _trained_bn(torch.nn.BatchNorm1d, 4, (6, 4), tdtype, momentum=None)
    kwargs = jaxbn.torch_settings(tbn).module_kwargs()
    bn = jbnx.BatchNorm(4, rngs=nnx.Rngs(0), param_dtype=jnp.dtype(dtype), **kwargs)
    jaxbn.from_torch_nnx(tbn, bn, batch_values=6)
    np.testing.assert_array_equal(bn.count[...], np.full(4, 18.0))
    bn.eval()
    x = torch.randn(5, 4, dtype=tdtype)
    _assert_close(bn(jnp.asarray(_np(x))), _np(tbn.eval()(x)), atol, "nnx eval")
    back = jtorch.to_torch_nnx(bn, torch.nn.BatchNorm1d(4, momentum=None).to(tdtype))
    for k in ("weight", "bias", "running_mean", "running_var"):
      assert torch.equal(getattr(back, k), getattr(tbn, k)), k
    # momentum=None in a module: jaxbn's count-weighted statistics, whose mean follows
    # torch's cumulative average when count = num_batches_tracked * batch size.
    bn.train()
    x = torch.randn(6, 4, dtype=tdtype) + 3
    _assert_close(bn(jnp.asarray(_np(x))), _np(_torch_step(tbn, x)), atol, "nnx train")
    _assert_close(bn.mean[...], _np(tbn.running_mean), atol, "nnx cumulative mean")
    with pytest.raises(ValueError, match="feature shape"):
      jaxbn.from_torch_nnx(tbn, jbnx.BatchNorm(3, rngs=nnx.Rngs(0)))


# --------------------------------------------------------------------- layouts


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_conv_kernel_layout(dim):
  with jax.enable_x64(True):
    conv = getattr(torch.nn, f"Conv{dim}d")(4, 6, 3, padding=1, groups=2, bias=False).double()
    x = torch.randn(2, 4, *(5,) * dim, dtype=torch.float64)
    spatial = "DHW"[-dim:]
    y = jax.lax.conv_general_dilated(
      jtorch.nchw_to_nhwc(x),
      jtorch.torch_conv_kernel(conv.weight),
      (1,) * dim,
      [(1, 1)] * dim,
      dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
      feature_group_count=2,
    )
    _assert_close(jtorch.nhwc_to_nchw(y), _np(conv(x)), LAYER_EPS * EPS64, "conv")
  x32 = jnp.asarray(_np(x), jnp.float32)
  np.testing.assert_array_equal(jtorch.nhwc_to_nchw(jtorch.nchw_to_nhwc(x32)), x32)
  with pytest.raises(ValueError, match="convolution weight"):
    jtorch.torch_conv_kernel(torch.ones(3, 3))


def test_linear_kernel_layout_after_flatten():
  with jax.enable_x64(True):
    fc = torch.nn.Linear(3 * 2 * 4, 5).double()
    x = torch.randn(7, 3, 2, 4, dtype=torch.float64)
    want = _np(fc(torch.flatten(x, 1)))
    flat = jtorch.nchw_to_nhwc(x).reshape(7, -1)  # (h, w, c) order
    k = jtorch.torch_linear_kernel(fc.weight, input_chw=(3, 2, 4))
    _assert_close(
      flat @ k + jnp.asarray(_np(fc.bias))[None], want, LAYER_EPS * EPS64, "linear after flatten"
    )
    plain = jtorch.torch_linear_kernel(fc.weight)
    _assert_close(
      jnp.asarray(_np(torch.flatten(x, 1))) @ plain, want - _np(fc.bias), LAYER_EPS * EPS64
    )
  with pytest.raises(ValueError, match="input_chw"):
    jtorch.torch_linear_kernel(fc.weight.float(), input_chw=(3, 3))


def test_from_torch_model_rejects_unknown_layers_with_state():
  with pytest.raises(ValueError, match="LayerNorm"):
    jtorch.from_torch_model(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)))


# --------------------------------------------------------------------- a whole CNN, end to end


class TorchCNN(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.conv = torch.nn.Conv2d(3, 6, 3, padding=1, bias=False)
    self.bn = torch.nn.BatchNorm2d(6)
    self.fc = torch.nn.Linear(6 * 4 * 4, 5)

  def forward(self, x):
    x = torch.nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
    return self.fc(torch.flatten(x, 1))


class LinenCNN(nn.Module):
  bn_kwargs: tuple  # (name, value) pairs: module attributes must be hashable
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    pd = self.param_dtype
    x = nn.Conv(6, (3, 3), padding=1, use_bias=False, param_dtype=pd, name="conv")(x)
    kw = dict(self.bn_kwargs)
    bn = jbn.BatchNorm(use_running_average=not train, param_dtype=pd, name="bn", **kw)
    x = nn.max_pool(nn.relu(bn(x)), (2, 2), strides=(2, 2))
    return nn.Dense(5, param_dtype=pd, name="fc")(x.reshape(x.shape[0], -1))


def _cross_entropy(logits, y):
  return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0])


def _cnn_end_to_end(dtype, flavour):
  """Trains a torch CNN, ports it, evaluates and fine-tunes both; returns the differences."""
  tdtype = PRECISIONS[dtype][0]
  torch.manual_seed(0)
  net = TorchCNN().to(tdtype)
  rng = np.random.default_rng(0)
  data = rng.normal(size=(13, 16, 3, 8, 8)) + rng.normal(size=(1, 1, 3, 1, 1))
  labels = rng.integers(0, 5, size=(13, 16))
  xs = [torch.from_numpy(d).to(tdtype) for d in data]
  ys = [torch.from_numpy(lab) for lab in labels]
  opt = torch.optim.SGD(net.parameters(), lr=0.1)

  def torch_step(x, y):
    net.train()
    opt.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()

  for x, y in zip(xs[:3], ys[:3], strict=True):  # "trained a few steps in torch"
    torch_step(x, y)

  test_x = torch.from_numpy(rng.normal(size=(32, 3, 8, 8))).to(tdtype)
  jx = lambda t: jtorch.nchw_to_nhwc(t)
  settings = jaxbn.torch_settings(net.bn)

  if flavour == "linen":
    model = LinenCNN(tuple(settings.module_kwargs().items()), jnp.dtype(dtype))
    variables = jtorch.from_torch_model(net)
    variables["params"]["fc"]["kernel"] = jtorch.torch_linear_kernel(
      net.fc.weight, input_chw=(6, 4, 4)
    )
    ref = model.init(jax.random.key(0), jx(test_x), train=False)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, ref)
    params, stats = variables["params"], variables["batch_stats"]

    def forward(params, stats, x, train):
      v = {"params": params, "batch_stats": stats}
      if not train:
        return model.apply(v, x, train=False), stats
      logits, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
      return logits, upd["batch_stats"]

  else:  # plain JAX functions around the core
    bn_params, stats = jaxbn.from_torch(net.bn)
    params = {
      "conv": jtorch.torch_conv_kernel(net.conv.weight),
      "bn": bn_params,
      "fc": jtorch.torch_linear_kernel(net.fc.weight, input_chw=(6, 4, 4)),
      "fc_bias": jnp.asarray(_np(net.fc.bias)),
    }

    def forward(params, stats, x, train):
      h = jax.lax.conv_general_dilated(
        x, params["conv"], (1, 1), [(1, 1)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
      if train:
        h, stats = jaxbn.bn_train(params["bn"], stats, h, **settings.train_kwargs(stats))
      else:
        h = jaxbn.bn_infer(params["bn"], stats, h, epsilon=settings.epsilon)
      h = jax.lax.reduce_window(
        jax.nn.relu(h), -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
      )
      return h.reshape(h.shape[0], -1) @ params["fc"] + params["fc_bias"][None], stats

  @jax.jit
  def jax_step(params, stats, x, y):
    def loss(p):
      logits, new = forward(p, stats, x, True)
      return _cross_entropy(logits, y), new

    (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), stats

  evaluate = jax.jit(lambda params, stats, x: forward(params, stats, x, False)[0])
  net.eval()
  with torch.no_grad():
    want = _np(net(test_x))
  errs = {"eval": np.max(np.abs(np.asarray(evaluate(params, stats, jx(test_x))) - want))}

  for x, y in zip(xs[3:], ys[3:], strict=True):  # 10 fine-tuning steps in both
    torch_step(x, y)
    params, stats = jax_step(params, stats, jx(x), jnp.asarray(y.numpy()))
  net.eval()
  with torch.no_grad():
    want = _np(net(test_x))
  errs["eval after 10 steps"] = np.max(
    np.abs(np.asarray(evaluate(params, stats, jx(test_x))) - want)
  )
  mean = stats["bn"]["mean"] if flavour == "linen" else stats.mean
  var = stats["bn"]["var"] if flavour == "linen" else stats.var
  errs["running mean"] = np.max(np.abs(np.asarray(mean) - _np(net.bn.running_mean)))
  errs["running var"] = np.max(np.abs(np.asarray(var) - _np(net.bn.running_var)))
  conv_k = params["conv"]["kernel"] if flavour == "linen" else params["conv"]
  errs["conv kernel"] = np.max(
    np.abs(np.asarray(conv_k) - np.asarray(jtorch.torch_conv_kernel(net.conv.weight)))
  )
  if flavour != "linen":
    assert int(stats.step) == int(net.bn.num_batches_tracked) == 13
  return errs, float(np.max(np.abs(want)))


@pytest.mark.parametrize("flavour", ["linen", "jax"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cnn_port_evaluates_and_fine_tunes_like_torch(dtype, flavour):
  with precision(dtype) as (_, _, atol):
    errs, scale = _cnn_end_to_end(dtype, flavour)
  eps = EPS64 if dtype == "float64" else EPS32
  print(f"\n{flavour} {dtype}, largest logit {scale:.2f}: ", end="")
  print(", ".join(f"{k} {v:.2e} ({v / eps:.1f} eps)" for k, v in errs.items()))
  for k, v in errs.items():
    assert v <= atol, f"{k}: {v:.3e} > {CNN_EPS} eps"
