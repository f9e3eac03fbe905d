"""The documentation site's checks (scripts/mkdocs_hooks.py): CI builds the site in strict mode;
these tests show that its coverage check fails on a missing entry and that links map right."""

import importlib
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import mkdocs_hooks  # noqa: E402


def _every_entry() -> set[str]:
  """The inventory names of every public symbol: what a complete reference holds."""
  names = set(mkdocs_hooks.PUBLIC_MODULES)
  for modname in mkdocs_hooks.PUBLIC_MODULES:
    module = importlib.import_module(modname)
    for attr in module.__all__:
      obj = getattr(module, attr)
      if type(obj).__name__ == "module":
        names.add(obj.__name__)
      elif hasattr(obj, "__qualname__") and hasattr(obj, "__module__"):
        names.add(f"{obj.__module__}.{obj.__qualname__}")
      else:
        names.add(f"{modname}.{attr}")
  return names


def test_the_coverage_check_passes_a_complete_reference_and_names_each_gap():
  every = _every_entry()
  assert mkdocs_hooks.undocumented(every) == []
  gaps = mkdocs_hooks.undocumented(every - {"jaxbn.core.bn_train", "jaxbn.testing"})
  assert "jaxbn.bn_train: no entry in the API reference" in gaps
  assert "jaxbn.core.bn_train: no entry in the API reference" in gaps
  assert "jaxbn.testing: no page in the API reference" in gaps
  # A constant has no qualified name: its entry is found under each name it is exported as
  # (mkdocstrings writes the re-export's too).
  constant = mkdocs_hooks.undocumented(
    every - {"jaxbn.core.checkpoint_names", "jaxbn.checkpoint_names"}
  )
  assert constant == [
    "jaxbn.checkpoint_names: no entry in the API reference",
    "jaxbn.core.checkpoint_names: no entry in the API reference",
  ]


def test_every_module_of_the_package_is_documented_or_declared_internal():
  # A new top-level module must be added to PUBLIC_MODULES (with a page) or INTERNAL.
  modules = mkdocs_hooks._all_modules()
  assert "jaxbn.testing" in modules and "jaxbn.training.state" in modules
  assert not [m for m in mkdocs_hooks.undocumented(_every_entry()) if "neither" in m]


def test_repository_paths_map_to_site_pages():
  site = mkdocs_hooks._site_path
  assert site("README.md") == "index.md"
  assert site("docs/guide.md") == "guide.md"
  assert site("benchmarks/README.md") == "benchmarks.md"
  assert site("notebooks") == "notebooks/index.md"
  assert site("notebooks/01_algorithm_step_by_step.ipynb") == (
    "notebooks/01_algorithm_step_by_step.ipynb"
  )
  assert site("LICENSE") == "license.md"
  assert site("benchmarks/bench_core.py") is None  # copied to the same path
  links = mkdocs_hooks._links(
    "[a](../benchmarks/README.md#x) [b](https://x.org) [c](#y)", "docs/g.md"
  )
  assert links == [("../benchmarks/README.md#x", "benchmarks/README.md")]
