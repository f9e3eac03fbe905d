"""Puts the output of `jaxbn reproduce` and `jaxbn reproduce --quick` into docs/reproduction.md.

Usage (after the two runs, on an otherwise idle machine)::

    jaxbn reproduce --out results && jaxbn reproduce --quick --out quick
    python scripts/reproduction_results.py results quick

Copies each run's ``results.json`` to ``docs/reproduce-{full,quick}.json.gz``
and the full run's figures to ``docs/``, and replaces the text between
``docs/reproduction.md``'s ``<!-- jaxbn reproduce full: begin/end -->`` (and
``quick``) markers with the run's ``report.md``, which is
:func:`jaxbn.reproduce.report.format_report` of that record.
``tests/test_reproduce_claims.py`` checks that the page's text is that
function's output for the stored records, and that their claims are those
their data give.
"""

from __future__ import annotations

import gzip
import json
import pathlib
import re
import shutil
import sys

from jaxbn.reproduce.report import format_report
from jaxbn.reproduce.report import run_kind

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reproduction.md"
FIGURES = ("fig1.png", "inference.png", "lr_sweep.png", "cnn.png")


def block(kind: str) -> re.Pattern:
  """The page's text between the markers of ``kind`` (``'full'`` or ``'quick'``)."""
  return re.compile(
    rf"(<!-- jaxbn reproduce {kind}: begin -->\n)(.*?)(\n<!-- jaxbn reproduce {kind}: end -->)",
    re.S,
  )


def main(full: str, quick: str) -> None:
  page = PAGE.read_text()
  runs = (("full", full, "jaxbn reproduce"), ("quick", quick, "jaxbn reproduce --quick"))
  for kind, out, command in runs:
    results = json.loads((pathlib.Path(out) / "results.json").read_text())
    if run_kind(results["config"]) != command:
      sys.exit(f"{out}: not the output of `{command}` (got {run_kind(results['config'])})")
    data = json.dumps(results, separators=(",", ":")).encode()
    (ROOT / "docs" / f"reproduce-{kind}.json.gz").write_bytes(gzip.compress(data, mtime=0))
    report = format_report(results)
    page, n = block(kind).subn(lambda m, r=report: m.group(1) + r + m.group(3), page)
    if n != 1:
      sys.exit(f"{PAGE.name}: expected one block of markers for {kind!r}, found {n}")
  for name in FIGURES:
    shutil.copy(pathlib.Path(full) / name, ROOT / "docs" / name)
  PAGE.write_text(page)


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit(__doc__)
  main(*sys.argv[1:])
