"""Runs flax's own BatchNorm tests with jaxbn's modules in place of flax's.

Usage: ``.venv/bin/python scripts/flax_suite.py [--workers N] [--sdist PATH] [--keep DIR]``

1. Downloads the source distribution of the installed flax version
   (``pip download --no-deps --no-binary :all: flax==VERSION``) into a
   temporary directory and extracts its ``tests/linen`` and ``tests/nnx``.
2. Keeps the test files that mention ``BatchNorm`` and, by static analysis,
   the test functions that could reach it (their source, decorators or
   ``setUp``, or a module-level definition they use, mention it).
3. Runs those with flax itself, recording which tests construct a
   ``flax.linen.BatchNorm`` or ``flax.nnx.BatchNorm`` (each test ends at its
   first one; scripts/flax_suite_plugin.py).
4. Runs exactly those tests again with ``jaxbn.linen.BatchNorm`` and
   ``jaxbn.nnx.BatchNorm`` substituted for flax's classes in every module
   that holds them (``flax.linen``, ``flax.linen.normalization``, ``flax.nnx``,
   ``flax.nnx.nn.normalization``, the test modules), before the tests import.
5. Runs the tests that did not pass with flax itself again: one that fails
   there too is left out (named in the output).
6. Prints the tests that pass, the deliberate differences (``DELIBERATE``
   below) and the failures grouped by cause. Exits 1 when a test outside
   ``DELIBERATE`` fails, when a listed one passes (so the list stays
   honest), or when the setup itself went wrong.

Test files that cannot be imported with flax itself are left out and named.
pytest runs with neither flax's configuration (it turns every warning into an
error, jaxbn's documented warnings included) nor jaxbn's.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from suite_common import run_pytest as run_pytest_with_plugin
from suite_common import without_device_count

REPO = Path(__file__).resolve().parents[1]
SUITES = ("tests/linen", "tests/nnx")
PER_RUN_TIMEOUT_S = 900

# Tests where jaxbn differs from flax on purpose: node id -> reason.
_ONE_VALUE = (
  "one value per feature (vmap over (5, 1, 2)): jaxbn warns and keeps the running statistics,"
  " flax moves them toward the lone value"
)
_COMPLEX = (
  "complex input: jaxbn raises a TypeError; flax normalizes by the real variance and its"
  " float32 running mean silently becomes complex64"
)
DELIBERATE: dict[str, str] = {
  "tests/nnx/transforms_test.py::TestVmap::test_state_axes_simple_functional0": _ONE_VALUE,
  "tests/nnx/transforms_test.py::TestVmap::test_state_axes_simple_functional1": _ONE_VALUE,
  "tests/linen/linen_test.py::NormalizationTest::test_batch_norm_complex0": _COMPLEX,
  "tests/linen/linen_test.py::NormalizationTest::test_batch_norm_complex1": _COMPLEX,
}


# --------------------------------------------------------------------------
# Source and selection.


def download_tests(version: str, dest: Path, sdist: Path | None) -> Path:
  """Extracts flax's tests/linen and tests/nnx of ``version`` under ``dest``; returns the root."""
  if sdist is None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    proc = subprocess.run(
      [*cmd, f"flax=={version}", "--dest", str(dest)],
      capture_output=True,
      text=True,
      timeout=300,
    )
    if proc.returncode:
      sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
      raise SystemExit(f"flax_suite: pip could not download flax=={version}'s sources")
    (sdist,) = dest.glob("*.tar.gz")
  root = dest / "src"
  with tarfile.open(sdist) as tar:
    members = []
    for m in tar.getmembers():
      parts = Path(m.name).parts
      rel = Path(*parts[1:]) if len(parts) > 1 else None
      if rel is not None and any(rel.is_relative_to(s) for s in SUITES) and m.isfile():
        m.name = str(rel)
        members.append(m)
    tar.extractall(root, members=members, filter="data")
  return root


def _names(node: ast.AST) -> set[str]:
  out = set()
  for sub in ast.walk(node):
    if isinstance(sub, ast.Name):
      out.add(sub.id)
    elif isinstance(sub, ast.Attribute):
      out.add(sub.attr)
  return out


def candidate_tests(source: str) -> list[str]:
  """Qualified names (``Class.test_x`` or ``test_x``) of tests that may construct a BatchNorm.

  A test qualifies when its text (decorators included) or its class's setUp
  mentions ``BatchNorm``, or uses a name defined in the file (a module-level
  function, class or assignment, or a method) that does, transitively.
  Step 3 then keeps the tests that really construct one.
  """
  tree = ast.parse(source)
  defs: dict[str, list[ast.AST]] = defaultdict(list)
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      defs[node.name].append(node)
      if isinstance(node, ast.ClassDef):
        for m in node.body:
          if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs[m.name].append(m)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      for t in targets:
        if isinstance(t, ast.Name):
          defs[t.id].append(node)

  def text(node):
    parts = [ast.get_source_segment(source, d) or "" for d in getattr(node, "decorator_list", [])]
    return "\n".join([*parts, ast.get_source_segment(source, node) or ""])

  memo: dict[str, bool] = {}

  def name_hits(name, seen):
    if name not in memo:
      if name in seen:
        return False
      seen.add(name)
      memo[name] = any(node_hits(n, seen) for n in defs.get(name, ()))
    return memo[name]

  def node_hits(node, seen):
    if "BatchNorm" in text(node):
      return True
    used = _names(node).union(*(_names(d) for d in getattr(node, "decorator_list", [])))
    return any(name_hits(n, seen) for n in used if n in defs)

  out = []
  for node in tree.body:
    if isinstance(node, ast.ClassDef):
      methods = [m for m in node.body if isinstance(m, ast.FunctionDef)]
      setup = [m for m in methods if m.name in ("setUp", "setUpClass", "setup_method")]
      via_setup = any(node_hits(m, set()) for m in setup)
      for m in methods:
        if m.name.startswith("test") and (via_setup or node_hits(m, set())):
          out.append(f"{node.name}.{m.name}")
    elif isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
      if node_hits(node, set()):
        out.append(node.name)
  return out


# --------------------------------------------------------------------------
# Runs.


def _files(nodeids: list[str]) -> list[str]:
  return sorted({k.split("::")[0] for k in nodeids})


_runs = 0
_timings: list[str] = []


def run_pytest(
  root: Path, mode: str, files: list[str], select, workers: int, stop: bool = False
) -> dict:
  """Runs pytest on ``files`` under ``root`` with the plugin in ``mode``; returns its JSON.

  ``stop``: in ``record`` mode, end each test at its first BatchNorm (all
  that recording needs).
  """
  global _runs
  _runs += 1
  t0 = time.monotonic()
  proc, out_path = run_pytest_with_plugin(
    root,
    plugin="flax_suite_plugin",
    prefix="FLAX_SUITE",
    tag=f"{_runs}-{mode}",
    mode=mode,
    select=select,
    files=files,
    workers=workers,
    # As flax's own CI: 4 host devices for its sharding tests.
    env={
      "FLAX_SUITE_STOP": "1" if stop else "0",
      "XLA_FLAGS": without_device_count(os.environ.get("XLA_FLAGS"))
      + " --xla_force_host_platform_device_count=4",
    },
    timeout=PER_RUN_TIMEOUT_S,
  )
  _timings.append(f"{mode}{' (stop at BatchNorm)' if stop else ''} {time.monotonic() - t0:.0f} s")
  if not out_path.exists():
    sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
    raise SystemExit(f"flax_suite: pytest ({mode}) wrote no results, exit code {proc.returncode}")
  return json.loads(out_path.read_text())


# --------------------------------------------------------------------------
# Report.


def _cause(message: str) -> str:
  """The first line of an error, numbers and arrays blurred, to group like failures."""
  message = re.sub(r"^\[(setup|call|teardown)\] ", "", message.strip())
  lines = [ln.strip() for ln in message.splitlines() if ln.strip()] or ["(no message)"]
  # numpy's assertions put the substance on the lines after "AssertionError:".
  line = " ".join(lines[:3]) if lines[0].endswith(":") else lines[0]
  line = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", line)
  return line[:160]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (1: none)")
  parser.add_argument("--sdist", type=Path, help="a flax source archive to use instead")
  parser.add_argument("--keep", type=Path, help="work in this directory and keep it")
  args = parser.parse_args(argv)

  start = time.monotonic()
  version = importlib.metadata.version("flax")
  with tempfile.TemporaryDirectory(prefix="flax_suite_") as tmp:
    work = Path(tmp) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    root = download_tests(version, work, args.sdist)
    files = sorted(
      str(p.relative_to(root))
      for s in SUITES
      for p in (root / s).rglob("*_test.py")
      if "BatchNorm" in p.read_text()
    )
    candidates = {f: candidate_tests((root / f).read_text()) for f in files}
    candidates = {f: names for f, names in candidates.items() if names}
    recorded = run_pytest(root, "record", sorted(candidates), candidates, args.workers, stop=True)
    selected = sorted(k for k, r in recorded["tests"].items() if r["batchnorm"])
    result = run_pytest(root, "substitute", _files(selected), selected, args.workers)
    # A test that fails with jaxbn is run again with flax itself: if it fails
    # there too, it says nothing about jaxbn and is left out.
    tests = result["tests"]
    not_passed = [k for k in selected if tests.get(k, {}).get("outcome") != "passed"]
    with_flax = {}
    if not_passed:
      again = run_pytest(root, "record", _files(not_passed), not_passed, args.workers)
      with_flax = {k: r for k, r in again["tests"].items() if k in set(not_passed)}
  flax_failures = {k: r for k, r in with_flax.items() if r["outcome"] == "failed"}
  selected = [k for k in selected if k not in flax_failures]

  outcome = {k: tests.get(k, {}).get("outcome", "not run") for k in selected}
  passed = [k for k in selected if outcome[k] == "passed"]
  # Skipped with jaxbn is fine where flax skips too (e.g. too few devices).
  skipped = [
    k
    for k in selected
    if outcome[k] == "skipped" and with_flax.get(k, {}).get("outcome") == "skipped"
  ]
  failed = {
    k: tests.get(k, {}).get("message") or outcome[k]
    for k in selected
    if k not in passed and k not in skipped
  }
  for f, msg in result["collection_errors"].items():
    for k in selected:
      if k.startswith(f + "::") and k not in tests:
        failed[k] = f"collection error: {msg}"
  # A selected test that no longer builds jaxbn's BatchNorm would mean the
  # substitution missed a place flax's class comes from.
  unsubstituted = [k for k in passed if not tests[k]["batchnorm"]]
  deliberate = {k: DELIBERATE[k] for k in failed if k in DELIBERATE}
  unexpected = {k: m for k, m in failed.items() if k not in DELIBERATE}
  stale = sorted(k for k in DELIBERATE if k not in failed)

  print(f"flax {version}: tests/linen and tests/nnx with jaxbn.linen/jaxbn.nnx BatchNorm")
  n_cand = sum(map(len, candidates.values()))
  print(
    f"{len(selected)} tests construct a BatchNorm ({n_cand} candidate functions in"
    f" {len(candidates)} files)"
  )
  if recorded["collection_errors"]:
    print("left out, files that do not import with flax itself:")
    for f, msg in sorted(recorded["collection_errors"].items()):
      print(f"  {f}: {msg}")
  if flax_failures:
    print("left out, tests that fail with flax itself:")
    for k, r in sorted(flax_failures.items()):
      print(f"  {k}: {r['message'][:200]}")
  print(f"passed: {len(passed)}")
  if skipped:
    print(f"skipped: {len(skipped)}")
  print(f"deliberate differences: {len(deliberate)}")
  for k, reason in sorted(deliberate.items()):
    print(f"  {k}: {reason}")
  print(f"failed: {len(unexpected)}")
  groups = defaultdict(list)
  for k, m in unexpected.items():
    groups[_cause(m)].append(k)
  for cause, ids in sorted(groups.items(), key=lambda kv: -len(kv[1])):
    print(f"  [{len(ids)}] {cause}")
    for k in sorted(ids):
      print(f"      {k}")
  if stale:
    print(f"listed as deliberate but passing now (remove from DELIBERATE): {len(stale)}")
    for k in stale:
      print(f"  {k}")
  if unsubstituted:
    print(f"passed without constructing jaxbn's BatchNorm (substitution missed): {unsubstituted}")
  print(f"({time.monotonic() - start:.0f} s; pytest runs: {', '.join(_timings)})")
  ok = selected and not unexpected and not stale and not unsubstituted
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
