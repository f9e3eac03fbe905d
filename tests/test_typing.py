"""Type checking from a user's side: the documented code passes pyright, wrong calls do not.

One run of basedpyright (pyright's "standard" rules, as editors apply them) over a
temporary project that imports jaxbn: every python block of README.md and
docs/*.md, each its own file (padded so that a diagnostic's line is the page's
line), and small scripts that each make one wrong call, which must be flagged
on that line.
"""

import importlib.util
import json
import pathlib
import re
import subprocess
import sys

import pytest

from tests.test_readme import ROOT
from tests.test_readme import SNIPPETS

pytestmark = pytest.mark.slow  # one basedpyright run over jaxbn and the docs (seconds)

BASEDPYRIGHT = pathlib.Path(sys.executable).with_name("basedpyright")

_PRELUDE = """import jax.numpy as jnp
import jaxbn

params, state = jaxbn.bn_init(4)
x = jnp.ones((8, 4))
"""

# name -> the wrong call, the line after _PRELUDE.
WRONG = {
  "momentum_a_string": 'y, state = jaxbn.bn_train(params, state, x, momentum="fast")',
  "params_as_state": "y, state = jaxbn.bn_train(params, params, x)",
}
WRONG_LINE = _PRELUDE.count("\n") + 1


def _snippet_files():
  """File name -> (page, code) of each documented python block, on the page's lines.

  As in test_readme, a block that imports PyTorch is left out where it is not installed.
  """
  files = {}
  no_torch = importlib.util.find_spec("torch") is None
  for param in SNIPPETS:
    page, line, code = param.values
    if no_torch and re.search(r"^import torch|^from torch", code, re.M):
      continue
    page = page.relative_to(ROOT).as_posix()
    files[f"{re.sub(r'[^A-Za-z0-9]', '_', page)}_{line}.py"] = (page, "\n" * (line - 1) + code)
  return files


@pytest.fixture(scope="module")
def diagnostics(tmp_path_factory):
  """File name -> ``(1-based line, message)`` of each error basedpyright reports in it."""
  if not BASEDPYRIGHT.exists():
    pytest.skip(f"no basedpyright next to {sys.executable} (pip install basedpyright)")
  project = tmp_path_factory.mktemp("typing")
  wrong = {f"wrong_{k}.py": (f"wrong_{k}.py", f"{_PRELUDE}{call}\n") for k, call in WRONG.items()}
  files = {**_snippet_files(), **wrong}
  for name, (_, code) in files.items():
    (project / name).write_text(code)
  config = {
    "typeCheckingMode": "standard",
    "pythonVersion": "3.11",
    "include": ["."],
    "extraPaths": [str(ROOT)],  # this checkout's jaxbn, whatever is installed
  }
  (project / "pyrightconfig.json").write_text(json.dumps(config))
  proc = subprocess.run(
    [str(BASEDPYRIGHT), "--outputjson", "--pythonpath", sys.executable, "-p", str(project)],
    cwd=project,
    capture_output=True,
    text=True,
    timeout=600,
  )
  try:
    report = json.loads(proc.stdout)
  except json.JSONDecodeError:
    pytest.fail(f"basedpyright gave no JSON report (exit {proc.returncode}):\n{proc.stderr}")
  assert report["summary"]["filesAnalyzed"] >= len(files), report["summary"]
  # Where each error is: the page (or wrong_*.py) and its line there.
  found: dict[str, list[tuple[str, int, str]]] = {name: [] for name in files}
  for d in report["generalDiagnostics"]:
    if d["severity"] == "error":
      name = pathlib.Path(d["file"]).name
      where = files[name][0] if name in files else d["file"]
      found.setdefault(name, []).append((where, d["range"]["start"]["line"] + 1, d["message"]))
  return found


def test_the_documented_code_type_checks(diagnostics):
  errors = [
    f"{where}:{line}: {message}"
    for name, found in sorted(diagnostics.items())
    if not name.startswith("wrong_")
    for where, line, message in found
  ]
  assert not errors, "basedpyright errors in the docs' python blocks:\n" + "\n".join(errors)


@pytest.mark.parametrize("name", sorted(WRONG))
def test_a_wrong_call_is_an_error_on_its_line(diagnostics, name):
  found = [(line, message) for _, line, message in diagnostics[f"wrong_{name}.py"]]
  assert [m for at, m in found if at == WRONG_LINE], (
    f"wrong_{name}.py: no error on line {WRONG_LINE} ({WRONG[name]}); basedpyright: {found}"
  )
  assert all(at == WRONG_LINE for at, _ in found), f"wrong_{name}.py: errors elsewhere: {found}"
