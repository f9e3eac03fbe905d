"""The teaching notebooks run top to bottom, and carry the outputs of one such run.

The documentation site shows the stored outputs; ``scripts/run_notebooks.py`` stores them.
"""

import pathlib
import sys

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from run_notebooks import run  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end: the full suite runs it, -m 'not slow' skips it

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_five_notebooks_are_there():
  assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_", "04_", "05_"]


def _kinds(cell) -> list[tuple[str, tuple[str, ...]]]:
  """What a code cell showed: each output's type and MIME types (stderr aside: warnings and
  progress bars come and go with the machine; printed text counts once however many
  messages the kernel split it into)."""
  kinds: list[tuple[str, tuple[str, ...]]] = []
  for o in cell.outputs:
    if o.output_type == "stream" and o.name == "stderr":
      continue
    kind = (o.output_type, tuple(sorted(o.get("data", {}))))
    if not (kind == ("stream", ()) and kinds and kinds[-1] == kind):
      kinds.append(kind)
  return kinds


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom_and_stores_that_run(path):
  stored = nbformat.read(path, as_version=4)
  code = [c for c in stored.cells if c.cell_type == "code" and c.source.strip()]
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), (
    f"{path.name}: the stored outputs are not one run from the top: run scripts/run_notebooks.py"
  )
  assert not [o for c in code for o in c.outputs if o.output_type == "error"]

  fresh = run(path)
  fresh_code = [c for c in fresh.cells if c.cell_type == "code" and c.source.strip()]
  assert not [o for c in fresh_code for o in c.outputs if o.output_type == "error"]
  assert any(c.outputs for c in fresh_code)
  # The stored outputs match the current code in kind, not in every number: each cell shows the
  # same kinds of output (text, figures) as a fresh run.
  for old, new in zip(code, fresh_code, strict=True):
    assert _kinds(old) == _kinds(new), (
      f"{path.name}: the cell starting {old.source.splitlines()[0]!r} now shows {_kinds(new)}, "
      f"its stored outputs {_kinds(old)}: run scripts/run_notebooks.py"
    )
