"""Run the notebooks top to bottom and store their outputs (what the documentation site shows).

    .venv/bin/python scripts/run_notebooks.py            # every notebook
    .venv/bin/python scripts/run_notebooks.py notebooks/03_convolutional_bn.ipynb

Run it after a change that alters what a notebook prints or draws, and look at the figures
before committing. tests/test_notebooks.py runs each notebook afresh and checks that the
stored outputs are one run from the top, with the kinds of output (text, figures) a fresh run
shows in each cell.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(path: pathlib.Path, timeout: int = 600) -> nbformat.NotebookNode:
  """The notebook at ``path``, executed in a fresh kernel in its own folder."""
  nb = nbformat.read(path, as_version=4)
  NotebookClient(
    nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
  ).execute()
  for cell in nb.cells:
    cell.metadata.pop("execution", None)  # timestamps: noise in every diff
  return nb


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("paths", nargs="*", type=pathlib.Path)
  args = parser.parse_args(argv)
  paths = args.paths or sorted((ROOT / "notebooks").glob("*.ipynb"))
  for path in paths:
    start = time.perf_counter()
    nb = run(path.resolve())
    errors = [
      o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    if errors:
      print(f"{path}: {errors[0].ename}: {errors[0].evalue}", file=sys.stderr)
      return 1
    nbformat.write(nb, path)
    print(f"{path}: stored ({time.perf_counter() - start:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
