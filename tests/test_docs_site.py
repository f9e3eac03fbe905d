"""The documentation site's checks (scripts/mkdocs_hooks.py): a strict build documents every public
symbol, the coverage check names each missing entry, and repository links map to site pages."""

import os
import pathlib
import subprocess
import sys

import pytest
from mkdocstrings import Inventory

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import mkdocs_hooks  # noqa: E402


@pytest.fixture(scope="module")
def inventory(tmp_path_factory) -> set[str]:
  """The names in the API reference of a strict build of the site (as CI builds it)."""
  site = tmp_path_factory.mktemp("site")
  mkdocs = pathlib.Path(sys.executable).with_name("mkdocs")
  env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
  done = subprocess.run(
    [str(mkdocs), "build", "--strict", "--site-dir", str(site)],
    cwd=ROOT, env=env, capture_output=True, text=True,
  )  # fmt: skip
  assert done.returncode == 0, done.stderr[-3000:]
  with open(site / "objects.inv", "rb") as f:
    return set(Inventory.parse_sphinx(f))


@pytest.mark.slow  # builds the site (about 40 s)
def test_the_coverage_check_passes_the_built_reference_and_names_each_gap(inventory):
  assert mkdocs_hooks.undocumented(inventory) == []
  gaps = mkdocs_hooks.undocumented(
    inventory - {"jaxbn.core.bn_train", "jaxbn.bn_train", "jaxbn.testing", "jaxbn.layer.BNLayer.of"}
  )
  assert "jaxbn.bn_train: no entry in the API reference" in gaps
  assert "jaxbn.core.bn_train: no entry in the API reference" in gaps
  assert "jaxbn.testing: no page in the API reference" in gaps
  assert "jaxbn.layer.BNLayer.of: no entry in the API reference" in gaps
  # A constant has no qualified name: its entry is found under each name it is exported as.
  constant = mkdocs_hooks.undocumented(
    inventory - {"jaxbn.core.checkpoint_names", "jaxbn.checkpoint_names"}
  )
  assert constant == [
    "jaxbn.checkpoint_names: no entry in the API reference",
    "jaxbn.core.checkpoint_names: no entry in the API reference",
  ]


def test_every_module_of_the_package_is_documented_or_declared_internal():
  # A new top-level module must be added to PUBLIC_MODULES (with a page) or INTERNAL.
  modules = mkdocs_hooks._all_modules()
  assert "jaxbn.testing" in modules and "jaxbn.training.state" in modules
  assert not [m for m in mkdocs_hooks.undocumented(set()) if "neither" in m]


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
  assert site("jaxbn/testing.py") == "api/testing.md"
  assert site("benchmarks/bench_core.py") is None  # copied to the same path
  links = mkdocs_hooks._links(
    "[a](../benchmarks/README.md#x) [b](https://x.org) [c](#y)", "docs/g.md"
  )
  assert links == [("../benchmarks/README.md#x", "benchmarks/README.md")]
