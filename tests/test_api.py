"""The public API: one list of names, and every name importable as listed."""

import ast
import sys
from pathlib import Path

import jaxbn
from tests.reference import run_python

ROOT = Path(__file__).resolve().parents[1]


def _eager_names():
  """The names jaxbn/__init__.py imports eagerly (its module-level `import` statements)."""
  tree = ast.parse((ROOT / "jaxbn" / "__init__.py").read_text())
  names = set()
  for node in tree.body:
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxbn"):
      names |= {a.asname or a.name for a in node.names}
  return names


def test_all_is_the_eager_imports_and_the_lazy_table():
  # __all__ is written out for readers and type checkers; it cannot drift from the
  # imports and the lazy table, less the names left out of `import *` on purpose.
  assert set(jaxbn.__all__) == _eager_names() | (set(jaxbn._LAZY) - jaxbn._NOT_STARRED)
  assert list(jaxbn.__all__) == sorted(jaxbn.__all__)
  assert jaxbn._NOT_STARRED <= set(jaxbn._LAZY)


def test_type_checkers_see_every_lazy_name_where_it_loads_from():
  # jaxbn/__init__.py's `if TYPE_CHECKING:` imports, one per lazy name: without them a type
  # checker would see __getattr__'s Any for jaxbn.fit, jaxbn.linen, ...
  tree = ast.parse((ROOT / "jaxbn" / "__init__.py").read_text())
  seen = {}
  for node in tree.body:
    if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
      for imp in node.body:
        assert isinstance(imp, ast.ImportFrom) and imp.module, ast.dump(imp)
        for a in imp.names:
          assert a.asname == a.name, f"{a.name} must be re-exported as itself"
          seen[a.name] = (imp.module, a.name)
  want = {
    name: (module, attr) if attr else tuple(module.rsplit(".", 1))
    for name, (module, attr) in jaxbn._LAZY.items()
  }
  assert seen == want


def test_every_lazy_name_resolves_to_what_its_module_exports():
  for name, (module, attr) in jaxbn._LAZY.items():
    if name in jaxbn._NOT_STARRED:
      continue
    value = getattr(jaxbn, name)
    if attr is not None:
      assert value is getattr(sys.modules[module], attr), name
      assert attr in sys.modules[module].__all__, (module, attr)


def test_import_jaxbn_imports_no_framework():
  frameworks = ("flax", "optax", "equinox", "torch", "orbax", "sklearn", "matplotlib", "tqdm")
  code = f"import sys, jaxbn; print([m for m in {frameworks!r} if m in sys.modules])"
  assert run_python(code) == "[]"


def test_star_import_needs_no_optional_package():
  code = """
import sys
for name in ("torch", "equinox", "orbax", "sklearn", "matplotlib", "tqdm"):
  sys.modules[name] = None
from jaxbn import *
print(sorted(k for k in dir() if not k.startswith("_"))[:3])
"""
  run_python(code)
