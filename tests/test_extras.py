"""The optional dependencies: what the core install lacks, and the errors that name the extra."""

import ast
import importlib
import pathlib
import re
import sys
import tomllib

import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import extras
from tests.reference import run_python

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements):
  """Distribution names of requirements ('tqdm>=4.66' -> 'tqdm'); jaxbn[a,b] -> its extras'."""
  names = set()
  for r in requirements:
    m = re.fullmatch(r"jaxbn\[([\w,]+)\]", r)
    if m:
      for extra in m.group(1).split(","):
        names |= _names(PROJECT["optional-dependencies"][extra])
    else:
      names.add(re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower())
  return names


def test_the_core_install_is_the_core_and_each_extra_installs_its_packages():
  extras_table = PROJECT["optional-dependencies"]
  core = _names(PROJECT["dependencies"])
  assert core == {"jax", "jaxlib", "chex", "numpy", "flax", "optax"}
  for module, (distribution, extra) in extras.OPTIONAL.items():
    assert distribution not in core, module
    assert distribution in _names(extras_table[extra]), (module, extra)
    if extra not in ("torch", "deploy"):  # PyTorch and the deployment tools: large installs
      assert distribution in _names(extras_table["all"]), module
    if extra != "torch":  # the test command installs PyTorch with its own pin
      assert distribution in _names(extras_table["test"]), module


def _imports(tree):
  """The modules ``tree`` imports at run time (not those under ``if TYPE_CHECKING:``)."""
  typing_only = {
    id(inner)
    for node in ast.walk(tree)
    if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
    for stmt in node.body
    for inner in ast.walk(stmt)
  }
  for node in ast.walk(tree):
    if id(node) in typing_only:
      continue
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      yield node.module


def test_every_optional_import_goes_through_require():
  files = sorted((ROOT / "jaxbn").rglob("*.py"))
  assert len(files) > 10
  calls = 0
  for path in files:
    if path.name == "extras.py":
      continue
    tree = ast.parse(path.read_text(), str(path))
    direct = [m for m in _imports(tree) if m.partition(".")[0] in extras.OPTIONAL]
    assert not direct, f"{path.relative_to(ROOT)} imports {direct} without jaxbn.extras.require"
    for node in ast.walk(tree):
      if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require":
        # Literals (an f-string's literal start), so that they can be checked here.
        module, what = node.args
        what = what.values[0] if isinstance(what, ast.JoinedStr) else what
        assert module.value.partition(".")[0] in extras.OPTIONAL, (path, module.value)
        assert what.value.startswith("jaxbn."), (path, what.value)
        calls += 1
  assert calls >= 7


def _block(monkeypatch, top):
  """Makes ``top`` and its submodules unimportable, as if not installed (undone after the test)."""
  for name in [n for n in sys.modules if n == top or n.startswith(top + ".")] + [top]:
    monkeypatch.setitem(sys.modules, name, None)


def _message(top, what):
  distribution, extra = extras.OPTIONAL[top]
  return re.escape(f"{what} needs {distribution}: pip install 'jaxbn[{extra}]'")


def test_require_imports_and_names_the_extra(monkeypatch):
  assert extras.require("tqdm.auto", "jaxbn.x").__name__ == "tqdm.auto"
  with pytest.raises(ValueError, match="'numpy' is not an optional dependency"):
    extras.require("numpy", "jaxbn.x")
  _block(monkeypatch, "tqdm")
  with pytest.raises(ImportError, match=_message("tqdm", "jaxbn.x")) as info:
    extras.require("tqdm.auto", "jaxbn.x")
  assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_a_broken_install_is_not_reported_as_missing(tmp_path, monkeypatch):
  # An installed package whose own dependency is missing shows that dependency's error.
  (tmp_path / "jaxbn_fake_optional").mkdir()
  (tmp_path / "jaxbn_fake_optional" / "__init__.py").write_text("import jaxbn_absent_dependency\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setitem(extras.OPTIONAL, "jaxbn_fake_optional", ("fake", "train"))
  with pytest.raises(ModuleNotFoundError, match="jaxbn_absent_dependency"):
    extras.require("jaxbn_fake_optional", "jaxbn.x")
  monkeypatch.setitem(extras.OPTIONAL, "jaxbn_not_installed", ("other", "train"))
  with pytest.raises(
    ImportError, match=re.escape("jaxbn.x needs other: pip install 'jaxbn[train]'")
  ):
    extras.require("jaxbn_not_installed.sub", "jaxbn.x")


def _train_state():
  import optax

  from jaxbn import models
  from jaxbn import training

  return training.create_train_state(models.MLP(features=(4,)), optax.sgd(0.1), jnp.ones((1, 3)))


def _save(tmp_path):
  from jaxbn import training

  training.save_checkpoint(tmp_path / "ckpt", _train_state())


def _restore(tmp_path):
  from jaxbn import training

  state = _train_state()
  training.restore_checkpoint(tmp_path, state)


def _fit(tmp_path):
  from jaxbn import training

  x, y = np.ones((8, 3), np.float32), np.zeros(8, np.int32)
  training.fit(_train_state(), x, y, batch_size=4, steps=1, progress=True)


def _population(tmp_path):
  params, state = jaxbn.bn_init(3)
  batches = [jnp.arange(12.0).reshape(4, 3)]
  jaxbn.population_stats(jaxbn.bn_train, params, state, batches, progress=True)


def _digits(tmp_path):
  from jaxbn import data

  data.load_digits()


def _figures(tmp_path, monkeypatch):
  # The module imports matplotlib when it loads: load it afresh (the old one is put back after).
  monkeypatch.delitem(sys.modules, "jaxbn.reproduce.figures", raising=False)
  importlib.import_module("jaxbn.reproduce.figures")


def _torch(tmp_path):
  from jaxbn import torch as jtorch

  jtorch.nchw_to_nhwc(np.ones((1, 2, 2, 2)))


def _equinox(tmp_path, monkeypatch):
  # The module imports equinox when it loads: load it afresh (the old one is put back after).
  monkeypatch.delitem(sys.modules, "jaxbn.equinox", raising=False)
  importlib.import_module("jaxbn.equinox")


def _qwix(tmp_path):
  import jaxbn.deploy

  jaxbn.deploy.register_qwix()


def _onnx(tmp_path, monkeypatch):
  import jaxbn.deploy

  monkeypatch.setattr(jaxbn.deploy, "_onnx_plugin", None)  # not registered yet
  jaxbn.deploy.register_onnx()


CASES = [
  ("orbax", "jaxbn.training.save_checkpoint", _save),
  ("orbax", "jaxbn.training.restore_checkpoint", _restore),
  ("tqdm", "jaxbn.fit(progress=True)", _fit),
  ("tqdm", "jaxbn.population_stats(progress=True)", _population),
  ("sklearn", "jaxbn.data.load_digits", _digits),
  ("matplotlib", "jaxbn.reproduce.write_figures", _figures),
  ("torch", "jaxbn.torch", _torch),
  ("equinox", "jaxbn.equinox", _equinox),
  ("qwix", "jaxbn.deploy.register_qwix", _qwix),
  ("jax2onnx", "jaxbn.deploy.register_onnx", _onnx),
]


@pytest.mark.parametrize("top, what, call", CASES, ids=[c[1] for c in CASES])
def test_a_missing_extra_is_an_import_error_naming_it(tmp_path, monkeypatch, top, what, call):
  _block(monkeypatch, top)
  args = (tmp_path, monkeypatch) if call in (_figures, _equinox, _onnx) else (tmp_path,)
  with pytest.raises(ImportError, match=_message(top, what)):
    call(*args)


def test_the_core_install_trains_and_converts_without_any_extra():
  # A fresh process where none of the optional packages can be imported: the
  # core, both flax modules, the models and optax training work.
  code = f"""
import sys
for name in {sorted(extras.OPTIONAL)!r}:
  sys.modules[name] = None
import jax.numpy as jnp, numpy as np, optax
import jaxbn
from jaxbn import linen, nnx, models, training
params, state = jaxbn.bn_init(3)
y, state = jaxbn.bn_train(params, state, jnp.arange(12.0).reshape(4, 3))
ts = training.create_train_state(models.MLP(features=(4,)), optax.sgd(0.1), jnp.ones((1, 3)))
ts, hist = training.fit(ts, np.ones((8, 3), np.float32), np.zeros(8, np.int32), batch_size=4,
                        steps=2)
print(len(hist["loss"]), float(y.std(0).mean().round(3)))
"""
  assert run_python(code).split() == ["2", "1.0"]
