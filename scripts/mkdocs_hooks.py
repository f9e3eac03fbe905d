"""mkdocs hooks for jaxbn's site (mkdocs.yml names this file).

1. The pages that live outside ``docs/`` join the site: README.md as the home page,
   CHANGELOG.md, benchmarks/README.md, LICENSE, an index of the notebooks (which
   ``docs/notebooks``, a link to ``notebooks/``, brings in), and a copy of any other
   repository file a page links to (e.g. a benchmark script). The Markdown files stay the
   source; their repository-relative links are rewritten to the site's paths, so a link that
   works in the repository works on the site, and one that points nowhere is left as it is
   for mkdocs' strict link check to fail.
2. After the build, every public symbol of jaxbn must have an entry in the API reference
   (the inventory mkdocstrings writes), or the build fails naming it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pathlib
import pkgutil
import posixpath
import re
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File
from mkdocs.structure.files import Files

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Repository files that become pages, and where.
PAGES = {
  "README.md": "index.md",
  "CHANGELOG.md": "changelog.md",
  "benchmarks/README.md": "benchmarks.md",
}
NOTEBOOK_INDEX = "notebooks/index.md"

# Modules with a page in the API reference. Every module of the package is one of these, a
# submodule of one of these packages (its names reach users through the package's __all__),
# or in INTERNAL.
PUBLIC_MODULES = (
  "jaxbn",
  "jaxbn.core",
  "jaxbn.numerics",
  "jaxbn.layer",
  "jaxbn.population",
  "jaxbn.diagnosis",
  "jaxbn.folding",
  "jaxbn.deploy",
  "jaxbn.linen",
  "jaxbn.nnx",
  "jaxbn.equinox",
  "jaxbn.torch",
  "jaxbn.models",
  "jaxbn.training",
  "jaxbn.engine",
  "jaxbn.testing",
  "jaxbn.data",
  "jaxbn.reproduce",
  "jaxbn.cli",
  "jaxbn.extras",
)
INTERNAL = {
  "jaxbn.__main__": "the `python -m jaxbn` entry point (jaxbn.cli.main)",
  "jaxbn.torch_port": "jaxbn.torch's deprecated old name",
}

_LINK = re.compile(r"(\]\()([^)\s]+)(\))")
_EXTERNAL = re.compile(r"^([a-z][a-z0-9+.-]*:|#|/)")

# Site path of each page that came from the repository, by its site path: the repository
# path its links are relative to.
_origin: dict[str, str] = {}


def _site_path(repo_path: str) -> str | None:
  """Where a repository file or folder lives on the site, or None if it has no place."""
  if repo_path in PAGES:
    return PAGES[repo_path]
  if repo_path == "LICENSE":
    return "license.md"
  if repo_path == "notebooks":
    return NOTEBOOK_INDEX
  module = re.fullmatch(r"jaxbn/(\w+)(?:/__init__)?\.py", repo_path)
  if module and (ROOT / "docs" / "api" / f"{module.group(1)}.md").is_file():
    return f"api/{module.group(1)}.md"  # a module's source: its API page
  if repo_path.startswith("docs/notebooks/"):
    return None  # the same files as notebooks/
  if repo_path.startswith("docs/"):
    return repo_path.removeprefix("docs/")
  if repo_path.startswith("notebooks/") and repo_path.endswith(".ipynb"):
    return repo_path
  return None


def _links(text: str, origin: str) -> list[tuple[str, str]]:
  """(link as written, repository path it resolves to) for each relative link in text."""
  out = []
  for m in _LINK.finditer(text):
    target = m.group(2)
    if _EXTERNAL.match(target):
      continue
    path = target.split("#", 1)[0]
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(origin), path))
    out.append((target, resolved))
  return out


def _notebook_index() -> str:
  lines = [
    "# Notebooks",
    "",
    "Each notebook runs top to bottom in the test suite; the pages below show the outputs",
    "stored with it (`scripts/run_notebooks.py` stores them again after a change).",
    "",
  ]
  for nb_path in sorted((ROOT / "notebooks").glob("*.ipynb")):
    cells = json.loads(nb_path.read_text())["cells"]
    title = next(
      line.lstrip("# ").strip()
      for c in cells
      if c["cell_type"] == "markdown"
      for line in "".join(c["source"]).splitlines()
      if line.startswith("# ")
    )
    lines.append(f"- [{title}]({nb_path.name})")
  return "\n".join(lines) + "\n"


@event_priority(100)  # before mkdocs-jupyter turns notebooks into pages
def on_files(files: Files, config: Any) -> Files:
  sources = {repo: text for repo, text in _page_sources(files).items()}
  for repo, site in PAGES.items():
    files.append(File.generated(config, site, abs_src_path=str(ROOT / repo)))
    _origin[site] = repo
  license_page = f"# License\n\n```text\n{(ROOT / 'LICENSE').read_text()}```\n"
  files.append(File.generated(config, "license.md", content=license_page))
  files.append(File.generated(config, NOTEBOOK_INDEX, content=_notebook_index()))
  # Any other repository file a page links to is copied to the same path on the site.
  copied = set()
  for origin, text in sources.items():
    for _, repo in _links(text, origin):
      if _site_path(repo) is None and (ROOT / repo).is_file() and repo not in copied:
        files.append(File.generated(config, repo, abs_src_path=str(ROOT / repo)))
        copied.add(repo)
  return files


def _page_sources(files: Files) -> dict[str, str]:
  out = {repo: (ROOT / repo).read_text() for repo in PAGES}
  for f in files.documentation_pages():
    out[f"docs/{f.src_uri}"] = pathlib.Path(f.abs_src_path).read_text()
    _origin.setdefault(f.src_uri, f"docs/{f.src_uri}")
  return out


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
  origin = _origin.get(page.file.src_uri)
  if origin is None:  # generated pages: links already in site form
    return markdown

  def rewrite(m: re.Match) -> str:
    target = m.group(2)
    if _EXTERNAL.match(target):
      return m.group(0)
    path, _, fragment = target.partition("#")
    repo = posixpath.normpath(posixpath.join(posixpath.dirname(origin), path))
    site = _site_path(repo) or repo
    rel = posixpath.relpath(site, posixpath.dirname(page.file.src_uri) or ".")
    return f"{m.group(1)}{rel}{'#' + fragment if fragment else ''}{m.group(3)}"

  return _LINK.sub(rewrite, markdown)


def _all_modules() -> list[str]:
  import jaxbn

  names = ["jaxbn"]
  for info in pkgutil.walk_packages(jaxbn.__path__, "jaxbn."):
    names.append(info.name)
  return names


def undocumented(documented: set[str]) -> list[str]:
  """Public names of jaxbn with no entry among ``documented`` (inventory names)."""
  problems = []
  for name in _all_modules():
    if name in INTERNAL or name in PUBLIC_MODULES:
      continue
    parent = name.rpartition(".")[0]
    if parent not in PUBLIC_MODULES or parent == "jaxbn":
      problems.append(f"{name}: a module neither in the API reference nor declared internal")
  for modname in PUBLIC_MODULES:
    module = importlib.import_module(modname)
    if modname not in documented:
      problems.append(f"{modname}: no page in the API reference")
    exported = getattr(module, "__all__", None)
    if exported is None:
      problems.append(f"{modname}: no __all__ to say what is public")
      continue
    for attr in exported:
      obj = getattr(module, attr)
      paths = {f"{modname}.{attr}"}
      if hasattr(obj, "__qualname__") and hasattr(obj, "__module__"):
        paths.add(f"{obj.__module__}.{obj.__qualname__}")
      if hasattr(obj, "__path__") or type(obj).__name__ == "module":
        paths.add(obj.__name__)
      if not paths & documented:
        problems.append(f"{modname}.{attr}: no entry in the API reference")
      elif isinstance(obj, type) and obj.__module__.startswith("jaxbn"):
        # Its public methods and properties (those it defines), each with an entry too.
        owner = f"{obj.__module__}.{obj.__qualname__}"
        for name, member in vars(obj).items():
          func = member.fget if isinstance(member, property) else member
          func = getattr(func, "__func__", func)  # classmethod, staticmethod
          # Its own code: not a generated dataclass method or a default from another library.
          method = inspect.isfunction(func) and func.__module__.startswith("jaxbn")
          if method and not name.startswith("_") and f"{owner}.{name}" not in documented:
            problems.append(f"{owner}.{name}: no entry in the API reference")
  return sorted(set(problems), key=problems.index)


def on_post_build(config: Any) -> None:
  from mkdocstrings import Inventory

  with open(pathlib.Path(config["site_dir"]) / "objects.inv", "rb") as f:
    inventory = Inventory.parse_sphinx(f)
  problems = undocumented(set(inventory))
  if problems:
    raise PluginError("undocumented public symbols:\n  " + "\n  ".join(problems))
