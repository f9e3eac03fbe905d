"""Property-based tests of bn_train against a float64 NumPy reference (hypothesis).

Each example draws a shape of 1-5 axes, one or several feature axes, data at
an offset up to 1e6 (1e4 in float16 and bfloat16) with a spread from 1e-3 to
1e3, a mask of a shape that broadcasts to the input (including masks that
hide a batch's first rows), a ghost batch size that divides the batch, a
dtype (float64 under ``jax.enable_x64``), momentum (or the cumulative
average), ``ema_warmup``, ``running_var``, batch renormalization, and a split
of the batch over a ``vmap`` axis with ``axis_name``. The output, the new
state and the derivatives (reverse and forward mode) must match the paper's
formulas evaluated in float64 on the same (rounded) input, to within
tolerances derived from the dtypes: a small multiple of the compute dtype's
epsilon relative to the size of each term, plus the output dtype's rounding
and the float64 reference's own error far from zero.

The budget is a hypothesis settings profile (tests/conftest.py): a fixed,
derandomized set of examples by default; ``JAXBN_HYPOTHESIS_EXAMPLES=N`` runs
N fresh random examples per property.
"""

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import jaxbn

# Multiple of the compute dtype's epsilon allowed per term: the kernel sums a
# few hundred values at most, in a different order than NumPy.
_ULPS = 64
AXIS = "shards"


def _eps(dtype) -> float:
  return float(jnp.finfo(dtype).eps)


@st.composite
def cases(draw, dtypes=("float32", "bfloat16", "float16", "float64")):
  dtype = draw(st.sampled_from(dtypes))
  ndim = draw(st.integers(1, 5))
  dims = draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim))
  shape = tuple(dims)
  n_feat = draw(st.integers(1, max(1, min(2, ndim - 1))))
  axes = tuple(sorted(draw(st.permutations(range(ndim)))[:n_feat]))
  axis = axes[0] - ndim if len(axes) == 1 and draw(st.booleans()) else axes
  reduced = [i for i in range(ndim) if i not in axes]
  # vmap over `shards` copies with axis_name: the batch is the union of all.
  shards = draw(st.sampled_from([1, 1, 2, 3]))
  per_shard = math.prod(shape[i] for i in reduced)
  ghost = None
  if reduced and draw(st.booleans()):
    n0 = shape[reduced[0]]
    ghost = draw(st.sampled_from([d for d in range(1, n0 + 1) if n0 % d == 0]))
    per_shard = per_shard // n0 * ghost
  assume(per_shard * shards >= 2)  # one value per feature is a warning, tested elsewhere

  # A mask broadcastable to x (trailing axes), possibly of fewer axes.
  mask = None
  if draw(st.booleans()):
    mdim = draw(st.integers(1, ndim))
    mshape = tuple(d if draw(st.booleans()) else 1 for d in shape[ndim - mdim :])
    size = shards * math.prod(mshape)
    bits = draw(st.lists(st.booleans(), min_size=size, max_size=size))
    mask = np.array(bits, bool).reshape((shards, *mshape))
    if draw(st.booleans()):  # hide the leading rows of the batch
      lead = draw(st.integers(1, max(1, mshape[0] if mdim == ndim else 1)))
      if mdim == ndim:
        mask[:, :lead] = False

  scale = 10.0 ** draw(st.integers(-3, 3))
  max_offset = 6 if dtype not in ("float16", "bfloat16") else 4
  if dtype == "float16":
    scale = min(scale, 1e3)
  offset = draw(st.sampled_from([0.0, 1.0] + [10.0**k for k in range(2, max_offset + 1)]))
  offset *= draw(st.sampled_from([1.0, -1.0]))

  momentum = draw(st.sampled_from([None, 0.0, 0.5, 0.9, 0.99]))
  renorm = None
  if draw(st.booleans()):
    renorm = jaxbn.Renorm(
      rmax=draw(st.sampled_from([1.0, 1.5, 3.0])), dmax=draw(st.sampled_from([0.0, 0.5, 5.0]))
    )
  return dict(
    dtype=dtype,
    shape=shape,
    axis=axis,
    axes=axes,
    shards=shards,
    ghost=ghost,
    mask=mask,
    scale=scale,
    offset=offset,
    momentum=momentum,
    ema_warmup=draw(st.booleans()),
    running_var=draw(st.sampled_from(["biased", "unbiased"])),
    renorm=renorm,
    count=draw(st.sampled_from([0.0, 3.0, 1e3])),
    seed=draw(st.integers(0, 2**31 - 1)),
  )


# ------------------------------------------------------------------------------- reference


class _Groups:
  """Data of all shards laid out so that one NumPy reduction gives each group's statistics.

  The layout is (shards, *x.shape) with the first reduced axis split into
  (ghost batches, ghost size) when ghost batches are on; a group is one ghost
  batch (all shards) of one feature.
  """

  def __init__(self, c, x, w):
    shape, axes, shards, ghost = c["shape"], c["axes"], c["shards"], c["ghost"]
    reduced = [i for i in range(len(shape)) if i not in axes]
    full = (shards, *shape)
    keep = [a + 1 for a in axes]
    if ghost is not None:
      b = reduced[0] + 1
      full = (*full[:b], full[b] // ghost, ghost, *full[b + 1 :])
      keep = [a + 1 if a >= b else a for a in keep] + [b]
    self.full, self.orig = full, (shards, *shape)
    self.red = tuple(i for i in range(len(full)) if i not in keep)
    self.feat = tuple(keep[: len(axes)])
    self.x = x.reshape(full)
    self.w = w.reshape(full)

  def sum(self, t):
    return np.sum(t, self.red, keepdims=True)

  def back(self, t):
    return np.broadcast_to(t, self.full).reshape(self.orig)


def _reference_error(g, ref):
  """The float64 reference's own relative error: x - mean loses |x| eps64 far from zero."""
  big = np.max(np.abs(g.x), axis=g.red, keepdims=True)
  return 8 * _eps("float64") * big * ref["r"]


def _reference(c, x, w, params, state):
  """float64 outputs, statistics and the pieces the derivatives use."""
  g = _Groups(c, x, w)
  bshape = tuple(s if i in c["axes"] else 1 for i, s in enumerate(c["shape"]))

  def per_feature(t):  # a feature-shaped array, placed in the group layout
    t = np.asarray(t, np.float64).reshape((1, *bshape))
    if c["ghost"] is not None:
      b = next(i for i in range(len(c["shape"])) if i not in c["axes"]) + 1
      t = t.reshape((*t.shape[:b], 1, 1, *t.shape[b + 1 :]))
    return t

  gamma, beta = per_feature(params.scale), per_feature(params.bias)
  n = g.sum(g.w)
  # A group without valid values: its running mean and variance 0.
  mu = np.where(n > 0, g.sum(g.w * g.x) / np.maximum(n, 1), per_feature(state.mean))
  dev = g.x - mu
  var = g.sum(g.w * dev * dev) / np.maximum(n, 1)
  eps = 1e-5
  r = 1 / np.sqrt(var + eps)
  R, D = np.ones_like(r), np.zeros_like(r)
  if c["renorm"] is not None:
    sig = np.sqrt(per_feature(state.var) + eps)
    R = np.clip(np.sqrt(var + eps) / sig, 1 / c["renorm"].rmax, c["renorm"].rmax)
    D = np.clip((mu - per_feature(state.mean)) / sig, -c["renorm"].dmax, c["renorm"].dmax)
  xhat = dev * r
  y = gamma * (xhat * R + D) + beta

  # Running statistics: from the whole batch (every group) per feature.
  fred = tuple(i for i in range(1 + len(c["shape"])) if i - 1 not in c["axes"])
  fshape = tuple(c["shape"][a] for a in c["axes"])
  ws = w.reshape(g.orig)
  nk = ws.sum(fred, keepdims=True)
  mk = (ws * x.reshape(g.orig)).sum(fred, keepdims=True) / np.maximum(nk, 1)
  m2 = (ws * (x.reshape(g.orig) - mk) ** 2).sum(fred).reshape(fshape)
  nb, mb = nk.reshape(fshape), mk.reshape(fshape)
  old_mean, old_var, old_count = (np.asarray(t, np.float64) for t in state[:3])
  ddof = 1 if c["running_var"] == "unbiased" else 0
  if c["momentum"] is None:
    seen = nb > 0
    cm = old_count + nb
    mean_m = (old_count * old_mean + nb * mb) / np.maximum(cm, 1)
    m2m = (
      old_var * np.maximum(old_count - ddof, 0)
      + m2
      + (mb - old_mean) ** 2 * old_count * nb / np.maximum(cm, 1)
    )
    new_mean = mean_m
    new_var = np.where(cm > ddof, m2m / np.maximum(cm - ddof, 1), old_var)
  else:
    seen = nb > 1
    wgt = np.full(nb.shape, 1 - c["momentum"])
    if c["ema_warmup"]:
      wgt = np.maximum(wgt, nb / np.maximum(old_count + nb, 1))
    new_mean = (1 - wgt) * old_mean + wgt * mb
    new_var = (1 - wgt) * old_var + wgt * m2 / np.maximum(nb - ddof, 1)
  new = dict(
    mean=np.where(seen, new_mean, old_mean),
    var=np.where(seen, new_var, old_var),
    count=np.where(seen, old_count + nb, old_count),
    # sizes for the tolerances
    mean_tol=np.abs(old_mean) + np.abs(mb) + np.sqrt(m2 / np.maximum(nb, 1)),
    var_tol=np.abs(old_var) + m2 / np.maximum(nb - ddof, 1) + (mb - old_mean) ** 2,
  )
  return g, dict(n=n, r=r, R=R, D=D, xhat=xhat, gamma=gamma, y=y), new


# ------------------------------------------------------------------------ the function under test


def _inputs(c):
  rng = np.random.default_rng(c["seed"])
  S, shape = c["shards"], c["shape"]
  fshape = tuple(shape[a] for a in c["axes"])
  x = rng.normal(size=(S, *shape)) * c["scale"] + c["offset"]
  x = np.asarray(jnp.asarray(x, c["dtype"]), np.float64)  # the rounded input is the data
  if c["mask"] is None:
    w = np.ones((S, *shape))
  else:
    m = c["mask"]
    m = m.reshape((S,) + (1,) * (len(shape) + 1 - m.ndim) + m.shape[1:])
    w = np.broadcast_to(m, (S, *shape)).astype(np.float64)
  pdt = "float64" if c["dtype"] == "float64" else "float32"
  params, state = jaxbn.bn_init(fshape, dtype=pdt)
  params = jaxbn.BNParams(
    scale=jnp.asarray(rng.uniform(0.5, 2, fshape) * rng.choice([-1, 1], fshape), pdt),
    bias=jnp.asarray(rng.normal(size=fshape), pdt),
  )
  state = state._replace(
    mean=jnp.asarray(rng.normal(size=fshape), state.mean.dtype),
    var=jnp.asarray(np.exp(rng.normal(size=fshape)), state.var.dtype),
    count=jnp.full(fshape, c["count"], state.count.dtype),
  )
  return rng, x, w, params, state


def _apply(c):
  """bn_train over every shard (vmap with axis_name when there are several)."""
  kw = dict(
    axis=c["axis"],
    momentum=c["momentum"],
    ghost_batch_size=c["ghost"],
    renorm=c["renorm"],
    ema_warmup=c["ema_warmup"],
    running_var=c["running_var"],
  )

  def one(state, x, scale, bias, mask, axis_name=None):
    return jaxbn.bn_train(
      jaxbn.BNParams(scale, bias), state, x, mask=mask, axis_name=axis_name, **kw
    )

  def f(state, x, scale, bias, mask):
    if c["shards"] == 1:
      y, new = one(state, x[0], scale, bias, None if mask is None else mask[0])
      return y[None], new
    fn = functools.partial(one, axis_name=AXIS)
    y, new = jax.vmap(
      fn, (None, 0, None, None, None if mask is None else 0), (0, None), axis_name=AXIS
    )(state, x, scale, bias, mask)
    return y, new

  return f


def _dtype_ctx(c):
  return jax.enable_x64(c["dtype"] == "float64")


def _close(got, want, atol, what, c):
  got = np.asarray(got, np.float64)
  err = np.abs(got - want)
  # A value beyond half the dtype's range may round to inf: float16's range, not an error.
  fits = np.abs(want) <= float(jnp.finfo(c["dtype"]).max) / 2
  bad = ~(err <= atol) & fits
  if bad.any():
    i = np.unravel_index(np.argmax(np.where(bad, err / np.maximum(atol, 1e-300), 0)), err.shape)
    raise AssertionError(
      f"{what}: {bad.sum()} of {bad.size} values off; worst at {i}: got {got[i]!r}, "
      f"want {want[i]!r}, allowed {np.broadcast_to(atol, err.shape)[i]!r}; case {c}"
    )


def _run(c, state, x, params, mask, dy, tx, ts, tb):
  """y, the new state, the gradients of sum(y dy) and the tangent of y: one compiled program."""
  f = _apply(c)

  def run(x, scale, bias, dy, tx, ts, tb):
    def loss(x, scale, bias):
      y, _ = f(state, x, scale, bias, mask)
      return jnp.sum(y.astype(scale.dtype) * dy)

    y, new = f(state, x, scale, bias, mask)
    grads = jax.grad(loss, (0, 1, 2))(x, scale, bias)
    _, y_dot = jax.jvp(lambda *p: f(state, *p, mask)[0], (x, scale, bias), (tx, ts, tb))
    return y, new, grads, y_dot

  pdt = params.scale.dtype
  return jax.jit(run)(
    jnp.asarray(x, c["dtype"]),
    params.scale,
    params.bias,
    jnp.asarray(dy, pdt),
    jnp.asarray(tx, c["dtype"]),
    jnp.asarray(ts, pdt),
    jnp.asarray(tb, pdt),
  )


@pytest.mark.slow  # the fast tier checks a sample of 20 below
@given(cases())
def test_bn_train_matches_the_float64_reference(c):
  """Output, new state, reverse- and forward-mode derivatives, for every drawn case."""
  _check_against_the_reference(c)


@settings(max_examples=20)  # other draws than the full budget's (each program compiles anew)
@given(cases())
def test_bn_train_matches_the_float64_reference_on_a_sample(c):
  _check_against_the_reference(c)


def _check_against_the_reference(c):
  with _dtype_ctx(c), warnings.catch_warnings():
    warnings.simplefilter("error")
    rng, x, w, params, state = _inputs(c)
    mask = None if c["mask"] is None else jnp.asarray(c["mask"])
    dy, tx = rng.normal(size=x.shape), rng.normal(size=x.shape)
    ts, tb = (rng.normal(size=params.scale.shape) for _ in range(2))
    y, new, (gx, gs, gb), y_dot = _run(c, state, x, params, mask, dy, tx, ts, tb)

    g, ref, want = _reference(c, x, w, params, state)
    cdt = "float64" if c["dtype"] == "float64" else "float32"  # bn_train computes in it
    ec, eo = _ULPS * _eps(cdt) + _reference_error(g, ref), _eps(c["dtype"])

    # Output and running statistics.
    size = np.abs(ref["gamma"]) * (ref["R"] * (np.abs(ref["xhat"]) + 1) + np.abs(ref["D"]))
    atol = g.back(ec * (size + np.abs(ref["gamma"]) + 1) + eo * np.abs(ref["y"]))
    _close(y, g.back(ref["y"]), atol, "y", c)
    es = _ULPS * _eps(new.mean.dtype)
    _close(new.mean, want["mean"], es * want["mean_tol"], "new mean", c)
    _close(new.var, want["var"], es * want["var_tol"] + 1e-30, "new var", c)
    np.testing.assert_array_equal(new.count, want["count"])  # integers: exact
    assert int(new.step) == 1

    a = ref["gamma"] * ref["R"] * ref["r"]  # d y / d x at fixed statistics
    n, xhat = np.maximum(ref["n"], 1), ref["xhat"]
    # Cotangent and tangent reach the kernel in x's dtype: the reference takes them rounded so.
    dy_r, tx_r = (np.asarray(jnp.asarray(t, c["dtype"]), np.float64) for t in (dy, tx))
    dyg, txg, wg = dy_r.reshape(g.full), tx_r.reshape(g.full), g.w
    # Reverse: dx = a (dy - w/n (sum(dy) + xhat sum(dy xhat))), sums over every position.
    s1, s2 = g.sum(dyg), g.sum(dyg * xhat)
    want_dx = a * (dyg - wg / n * (s1 + xhat * s2))
    big = np.abs(a) * g.sum(np.abs(dyg)) * (1 + g.sum(np.abs(xhat))) ** 2 / n
    tol_dx = ec * (np.abs(a) * np.abs(dyg) + big) + eo * np.abs(want_dx)
    _close(gx, g.back(want_dx), g.back(tol_dx), "dx", c)
    feat = tuple(i for i in range(len(g.full)) if i not in g.feat)
    # A sum of m terms: rounding grows with the number of terms.
    ec_sum = ec * max(1.0, np.sqrt(np.prod([g.full[i] for i in feat])))
    terms = np.abs(dyg) * (ref["R"] * (np.abs(xhat) + 1) + np.abs(ref["D"]))
    want_ds = (dyg * (xhat * ref["R"] + ref["D"])).sum(feat).reshape(gs.shape)
    _close(gs, want_ds, (ec_sum * terms).sum(feat).reshape(gs.shape), "dscale", c)
    want_db = dyg.sum(feat).reshape(gb.shape)
    _close(gb, want_db, (ec_sum * np.abs(dyg)).sum(feat).reshape(gb.shape), "dbias", c)
    # Forward: y_dot = a (tx - mean_w(tx) - xhat mean_w(xhat tx)) + ts (R xhat + D) + tb.
    u1, u2 = g.sum(wg * txg) / n, g.sum(wg * xhat * txg) / n
    tsg = np.asarray(ts).reshape(np.shape(ref["gamma"]))
    tbg = np.asarray(tb).reshape(np.shape(ref["gamma"]))
    want_yd = a * (txg - u1 - xhat * u2) + tsg * (ref["R"] * xhat + ref["D"]) + tbg
    bigf = np.abs(a) * (np.abs(txg) + g.sum(np.abs(txg)) * (1 + g.sum(np.abs(xhat))) ** 2 / n)
    tol = ec * (
      bigf + np.abs(tsg) * (ref["R"] * (np.abs(xhat) + 1) + np.abs(ref["D"])) + np.abs(tbg)
    )
    _close(y_dot, g.back(want_yd), g.back(tol + eo * np.abs(want_yd)), "y_dot", c)


def test_masked_first_row_far_from_zero():
  # Pinned: a mask that hides the first rows, far from zero (the kernel once
  # shifted by the running mean there and lost 0.07 of every output).
  c = dict(
    dtype="float32", shape=(16, 3), axis=-1, axes=(1,), shards=1, ghost=None,
    mask=np.arange(16)[None, :, None] >= 2, scale=1.0, offset=1e6, momentum=0.9,
    ema_warmup=False, running_var="biased", renorm=None, count=0.0, seed=0,
  )  # fmt: skip
  test_bn_train_matches_the_float64_reference.hypothesis.inner_test(c)
