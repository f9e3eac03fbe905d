"""A first look at jaxbn: train a tiny MLP with batch norm on the bundled digits.

Run: python examples/quickstart.py
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import jaxbn


def init(key, sizes):
  params, state = [], []
  for i, (m, n) in enumerate(itertools.pairwise(sizes)):
    w = jax.random.normal(jax.random.fold_in(key, i), (m, n)) * np.sqrt(1 / m)
    if i < len(sizes) - 2:  # hidden layer: W -> BN -> sigmoid (BN's bias replaces b)
      bn_params, bn_state = jaxbn.bn_init(n)
      params.append({"w": w, "bn": bn_params})
      state.append(bn_state)
    else:
      params.append({"w": w, "b": jnp.zeros(n)})
  return params, state


def forward(params, state, x, train):
  new_state = []
  for layer, st in zip(params[:-1], state, strict=True):
    h = x @ layer["w"]
    if train:
      h, st = jaxbn.bn_train(layer["bn"], st, h)
    else:
      h = jaxbn.bn_infer(layer["bn"], st, h)
    new_state.append(st)
    x = jax.nn.sigmoid(h)
  return x @ params[-1]["w"] + params[-1]["b"], new_state


def main():
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target
  rng = np.random.default_rng(0)
  order = rng.permutation(len(x))
  train, test = order[:1400], order[1400:]
  params, state = init(jax.random.key(0), [64, 100, 100, 100, 10])
  opt = optax.sgd(0.5)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, state, opt_state, xb, yb):
    def loss_fn(p):
      logits, new_state = forward(p, state, xb, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), new_state

    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), state, opt_state, loss

  for t in range(600):
    idx = rng.choice(train, 60, replace=False)
    params, state, opt_state, loss = step(params, state, opt_state, x[idx], y[idx])
    if t % 200 == 0:
      print(f"step {t:4d}  loss {float(loss):.3f}")
  logits, _ = forward(params, state, x[test], train=False)
  acc = float(jnp.mean(jnp.argmax(logits, -1) == y[test]))
  print(f"test accuracy with running statistics: {acc:.3f}")


if __name__ == "__main__":
  main()
