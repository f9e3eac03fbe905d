"""Runs equinox's own BatchNorm tests with jaxbn's module in place of equinox's.

Usage: ``.venv/bin/python scripts/eqx_suite.py [--workers N] [--tests DIR] [--keep DIR]``

1. Copies equinox's tests into a temporary directory: by default the copy in
   scripts/equinox_tests (equinox's ``tests/`` at ``VENDORED_VERSION``,
   unmodified: equinox's source distribution holds no tests), or ``--tests
   DIR``, another checkout's ``tests`` folder. Warns when the installed
   equinox is not ``VENDORED_VERSION``.
2. Keeps the test files that mention ``BatchNorm`` and, by static analysis,
   the test functions that could reach it (``candidate_tests`` of
   scripts/flax_suite.py).
3. Runs those with equinox itself (the control), recording which tests
   construct an ``equinox.nn.BatchNorm`` (scripts/eqx_suite_plugin.py).
4. Runs the tests that construct one and pass in the control again with
   ``jaxbn.equinox.BatchNorm`` substituted for equinox's class in every module
   that holds it (``equinox.nn``, ``equinox.nn._batch_norm``, the test
   modules), before the tests import.
5. Prints both runs' counts, the deliberate differences (``DELIBERATE``
   below) and the failures grouped by cause (message and raising line). Exits
   1 when a test outside ``DELIBERATE`` fails with jaxbn, when a listed one
   passes (so the list stays honest), when ``jaxbn.equinox`` does not import,
   or when the control itself went wrong: it did not run, no test
   that constructs a BatchNorm passed, or (with the vendored tests of the
   installed version) a test failed or a file did not import. With another
   equinox version or ``--tests``, the tests and files that fail in the
   control are left out instead (named in the output).

pytest runs with neither equinox's configuration (it turns every warning into
an error and needs beartype for its jaxtyping checks) nor jaxbn's; equinox's
conftest.py is kept (two CPU devices, strict dtype and rank promotion).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from flax_suite import _cause
from flax_suite import candidate_tests
from suite_common import run_pytest as run_pytest_with_plugin
from suite_common import without_device_count

REPO = Path(__file__).resolve().parents[1]
VENDORED = REPO / "scripts" / "equinox_tests"
VENDORED_VERSION = "0.13.8"
PER_RUN_TIMEOUT_S = 600

# Tests where jaxbn differs from equinox on purpose: node id -> reason.
DELIBERATE: dict[str, str] = {}


# --------------------------------------------------------------------------
# Runs.


def copy_tests(source: Path, work: Path) -> Path:
  """Copies the tests folder ``source`` to ``work/tests``; returns ``work`` (the root)."""
  if not (source / "conftest.py").is_file():
    raise SystemExit(f"eqx_suite: {source} holds no conftest.py: not equinox's tests folder")
  shutil.copytree(
    source, work / "tests", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "README.md")
  )
  return work


def _files(nodeids: list[str]) -> list[str]:
  return sorted({k.split("::")[0] for k in nodeids})


_runs = 0
_timings: list[str] = []


def run_pytest(root: Path, mode: str, files: list[str], select, workers: int) -> dict:
  """Runs pytest on ``files`` under ``root`` with the plugin in ``mode``; returns its JSON.

  Its ``error`` says why the run could not start (``jaxbn.equinox`` does not
  import); a run that wrote no results at all ends the script.
  """
  global _runs
  _runs += 1
  t0 = time.monotonic()
  proc, out_path = run_pytest_with_plugin(
    root,
    plugin="eqx_suite_plugin",
    prefix="EQX_SUITE",
    tag=f"{_runs}-{mode}",
    mode=mode,
    select=select,
    files=files,
    workers=workers,
    # equinox's conftest.py sets jax_num_cpu_devices to 2; a device count in
    # XLA_FLAGS would contradict it.
    env={"XLA_FLAGS": without_device_count(os.environ.get("XLA_FLAGS"))},
    timeout=PER_RUN_TIMEOUT_S,
  )
  _timings.append(f"{mode} {time.monotonic() - t0:.0f} s")
  if out_path.exists():
    return json.loads(out_path.read_text())
  sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
  raise SystemExit(f"eqx_suite: pytest ({mode}) wrote no results, exit code {proc.returncode}")


# --------------------------------------------------------------------------
# Report.


def _counts(outcomes: list[str]) -> str:
  n = {o: outcomes.count(o) for o in ("passed", "skipped")}
  failed = len(outcomes) - n["passed"] - n["skipped"]
  return f"{n['passed']} passed, {failed} failed" + (
    f", {n['skipped']} skipped" if n["skipped"] else ""
  )


def _print_failures(title: str, failures: dict[str, str], runs: dict) -> None:
  """Prints ``failures`` (node id -> message) grouped by cause and the line that raised it."""
  print(f"{title}: {len(failures)}")
  groups = defaultdict(list)
  for k, m in failures.items():
    where = runs.get(k, {}).get("where")
    groups[_cause(m) + (f" (at {where})" if where else "")].append(k)
  for cause, ids in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
    print(f"  [{len(ids)}] {cause}")
    for k in sorted(ids):
      print(f"      {k}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", type=int, default=1, help="pytest-xdist workers (1: none)")
  parser.add_argument(
    "--tests", type=Path, help=f"another checkout's tests folder (default: {VENDORED})"
  )
  parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
  args = parser.parse_args(argv)

  start = time.monotonic()
  version = importlib.metadata.version("equinox")
  source = VENDORED if args.tests is None else args.tests.resolve()
  # Only the vendored tests of the installed version must pass in the control.
  strict = args.tests is None and version == VENDORED_VERSION
  if args.tests is None and version != VENDORED_VERSION:
    print(
      f"warning: equinox {version} is installed but scripts/equinox_tests holds the tests of"
      f" {VENDORED_VERSION}: tests that fail with equinox itself are left out"
      " (scripts/equinox_tests/README.md says how to refresh them)"
    )
  with tempfile.TemporaryDirectory(prefix="eqx_suite_") as tmp:
    work = Path(tmp) if args.keep is None else args.keep.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if (work / "tests").exists():
      shutil.rmtree(work / "tests")
    root = copy_tests(source, work)
    files = sorted(
      str(p.relative_to(root))
      for p in (root / "tests").rglob("test*.py")
      if "BatchNorm" in p.read_text()
    )
    candidates = {f: candidate_tests((root / f).read_text()) for f in files}
    candidates = {f: names for f, names in candidates.items() if names}
    if not candidates:
      raise SystemExit(f"eqx_suite: no test in {source} mentions BatchNorm")
    control = run_pytest(root, "control", sorted(candidates), candidates, args.workers)
    if control["error"]:
      raise SystemExit(f"eqx_suite: the control run could not start: {control['error']}")
    constructs = sorted(k for k, r in control["tests"].items() if "equinox" in r["batchnorm"])
    c_outcome = {k: control["tests"][k]["outcome"] for k in constructs}
    selected = [k for k in constructs if c_outcome[k] == "passed"]
    result = None
    if selected:
      result = run_pytest(root, "jaxbn", _files(selected), selected, args.workers)

  c_failed = {k: control["tests"][k]["message"] for k in constructs if c_outcome[k] == "failed"}
  c_skipped = sorted(k for k in constructs if c_outcome[k] == "skipped")
  jaxbn_error = result["error"] if result else None
  tests = result["tests"] if result and not jaxbn_error else {}
  outcome = {k: tests.get(k, {}).get("outcome", "not run") for k in selected}
  passed = [k for k in selected if outcome[k] == "passed"]
  failed = {k: tests.get(k, {}).get("message") or outcome[k] for k in selected if k not in passed}
  for f, msg in (result or {}).get("collection_errors", {}).items():
    for k in selected:
      if k.startswith(f + "::") and k not in tests:
        failed[k] = f"collection error: {msg}"
  # A selected test that does not build jaxbn's BatchNorm, or still builds
  # equinox's, would mean the substitution missed a place equinox's class
  # comes from.
  unsubstituted = sorted(
    k for k in passed if "jaxbn" not in tests[k]["batchnorm"] or "equinox" in tests[k]["batchnorm"]
  )
  deliberate = {k: DELIBERATE[k] for k in failed if k in DELIBERATE}
  unexpected = {k: m for k, m in failed.items() if k not in DELIBERATE}
  stale = sorted(k for k in DELIBERATE if k not in failed)

  what = (
    f"scripts/equinox_tests (equinox {VENDORED_VERSION}'s tests)"
    if args.tests is None
    else f"the tests in {source}"
  )
  print(f"equinox {version}: {what} with jaxbn.equinox.BatchNorm")
  n_cand = sum(map(len, candidates.values()))
  print(
    f"{len(constructs)} tests construct a BatchNorm ({n_cand} candidate functions in"
    f" {len(candidates)} files)"
  )
  if control["collection_errors"]:
    print(f"{'' if strict else 'left out, '}files that do not import with equinox itself:")
    for f, msg in sorted(control["collection_errors"].items()):
      print(f"  {f}: {msg}")
  print(f"control: {_counts(list(c_outcome.values()))}")
  if c_failed:
    title = "control failures" if strict else "left out, tests that fail with equinox itself"
    _print_failures(title, c_failed, control["tests"])
  if c_skipped:
    print(f"left out, tests that equinox itself skips: {', '.join(c_skipped)}")
  if not selected:
    print("no test that constructs a BatchNorm passes with equinox itself: nothing to compare")
  if jaxbn_error:
    print(f"jaxbn: not run: {jaxbn_error}")
  else:
    print(f"jaxbn: {_counts(list(outcome.values()))}")
    print(f"deliberate differences: {len(deliberate)}")
    for k, reason in sorted(deliberate.items()):
      print(f"  {k}: {reason}")
    _print_failures("failed", unexpected, tests)
    if stale:
      print(f"listed as deliberate but passing now (remove from DELIBERATE): {len(stale)}")
      for k in stale:
        print(f"  {k}")
    if unsubstituted:
      print(f"passed without (only) jaxbn's BatchNorm (substitution missed): {unsubstituted}")
  print(f"({time.monotonic() - start:.0f} s; pytest runs: {', '.join(_timings)})")
  control_ok = bool(selected) and not (strict and (c_failed or control["collection_errors"]))
  ok = control_ok and not jaxbn_error and not unexpected and not stale and not unsubstituted
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
