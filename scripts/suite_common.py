"""What scripts/flax_suite.py and scripts/eqx_suite.py share: a pytest run and its selection.

:func:`run_pytest` is the runners' side (one pytest process with a suite's
plugin, neither the upstream project's settings nor jaxbn's);
:func:`keep_selected` is the plugins' side (the tests that run).
"""

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def without_device_count(xla_flags):
  """``XLA_FLAGS`` without a host device count (each suite sets its own, or none)."""
  return re.sub(r"--xla_force_host_platform_device_count=\S+", "", xla_flags or "").strip()


def run_pytest(root, *, plugin, prefix, tag, mode, select, files, workers, env, timeout):
  """Runs pytest on ``files`` under ``root`` with ``plugin`` in ``mode``.

  The plugin reads ``{prefix}_MODE``, ``{prefix}_SELECT`` (the JSON file of
  ``select``) and writes ``{prefix}_OUT``; ``env`` adds to the environment
  (``XLA_FLAGS``, ...). Returns ``(completed process, path of the plugin's
  JSON output)``; the output may be missing when pytest could not start.
  """
  select_path = root / f"select-{tag}.json"
  out_path = root / f"results-{tag}.json"
  select_path.write_text(json.dumps(select))
  env = {
    **os.environ,
    f"{prefix}_MODE": mode,
    f"{prefix}_SELECT": str(select_path),
    f"{prefix}_OUT": str(out_path),
    "JAX_PLATFORMS": "cpu",
    "PYTHONPATH": os.pathsep.join(
      [str(REPO / "scripts"), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    ),
    **env,
  }
  (root / "pytest.ini").write_text("[pytest]\n")  # neither the project's settings nor jaxbn's
  cmd = [
    sys.executable,
    "-m",
    "pytest",
    "-c",
    str(root / "pytest.ini"),
    "--rootdir",
    str(root),
    "-p",
    plugin,
    "-p",
    "no:randomly",
    "-p",
    "no:cacheprovider",
    "-q",
    "--no-header",
    "--tb=no",
    "-rN",
    "--continue-on-collection-errors",
    *(["-n", str(workers)] if workers > 1 else ["-p", "no:xdist"]),
    *files,
  ]
  proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
  return proc, out_path


def _qualname(item):
  fn = getattr(item, "obj", None)
  fn = inspect.unwrap(fn) if callable(fn) else fn
  return getattr(fn, "__qualname__", item.name)


def keep_selected(config, items, select_file):
  """Keeps, in place, the collected ``items`` that ``select_file`` names; deselects the rest.

  ``select_file`` is a JSON file: a list of test node ids, or ``{file:
  [qualname]}``, the test functions to run (with all their parametrized
  variants).
  """
  with open(select_file) as f:
    select = json.load(f)
  if isinstance(select, list):
    wanted = set(select)
    keep = [it for it in items if it.nodeid in wanted]
  else:
    wanted = {(path, q) for path, names in select.items() for q in names}
    keep = [it for it in items if (it.nodeid.split("::")[0], _qualname(it)) in wanted]
  kept = {id(it) for it in keep}
  dropped = [it for it in items if id(it) not in kept]
  if dropped:
    config.hook.pytest_deselected(items=dropped)
  items[:] = keep
