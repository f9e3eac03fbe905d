"""pytest plugin of scripts/eqx_suite.py (loaded with ``-p eqx_suite_plugin``).

Environment:
  EQX_SUITE_MODE: ``control`` (equinox's own ``equinox.nn.BatchNorm``,
    instrumented) or ``jaxbn`` (``jaxbn.equinox.BatchNorm`` in place of
    equinox's, wherever a module holds equinox's class).
  EQX_SUITE_SELECT: a JSON file: a list of test node ids, or ``{file:
    [qualname]}``, the test functions to run (with all their parametrized
    variants).
  EQX_SUITE_OUT: the JSON file written at the end: ``{"tests": {nodeid:
    {"outcome", "message", "where", "batchnorm"}}, "collection_errors": {file:
    message}, "substituted": [...], "error": message or null}``, where
    ``batchnorm`` lists which BatchNorm classes (``equinox``, ``jaxbn``) the
    test constructed, ``where`` the file and line a failure was raised at
    (the path relative to the tests' root or jaxbn's checkout, or within
    site-packages), and ``error`` says why the run could not start (e.g.
    ``jaxbn.equinox`` does not import).
"""

import functools
import json
import os
import sys
import traceback

import pytest
from suite_common import keep_selected

MODE = os.environ.get("EQX_SUITE_MODE", "control")
_current = None  # the test item running in this process
_results: dict = {}
_collection_errors: dict = {}
_substituted: list = []
_error = None
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _note(kind):
  item = _current
  if item is not None and ("batchnorm", kind) not in item.user_properties:
    # user_properties travel with the reports, also from xdist workers.
    item.user_properties.append(("batchnorm", kind))


def _instrument(cls, kind):
  """Wraps ``cls.__init__`` so that constructing ``cls`` is noted for the running test.

  Only instances of ``cls`` itself count: a subclass calling ``super().__init__``
  (jaxbn's class, if it derives from equinox's) notes its own kind alone.
  equinox's ``Module`` metaclass calls ``cls.__init__`` at each construction, so
  the wrapper set here is the one used.
  """
  original = cls.__init__

  @functools.wraps(original)
  def __init__(self, *args, **kwargs):
    if type(self) is cls:
      _note(kind)
    original(self, *args, **kwargs)

  cls.__init__ = __init__


def _substitute(original, replacement):
  """Replaces equinox's BatchNorm by jaxbn's in every loaded module that holds it."""
  for name, module in list(sys.modules.items()):
    if module is None or name.startswith("jaxbn"):
      continue
    for attr, value in list(getattr(module, "__dict__", {}).items()):
      if value is original:
        setattr(module, attr, replacement)
        _substituted.append(f"{name}.{attr}")


def _jaxbn_batchnorm():
  try:
    import jaxbn.equinox

    return jaxbn.equinox.BatchNorm
  except Exception as e:
    global _error
    _error = (
      "jaxbn.equinox.BatchNorm cannot be imported: "
      + "".join(traceback.format_exception_only(e)).strip()
    )
    _write()
    raise pytest.UsageError(f"eqx_suite_plugin: {_error}") from e


def pytest_configure(config):
  import equinox.nn
  import equinox.nn._batch_norm

  original = equinox.nn.BatchNorm
  if MODE == "jaxbn":
    replacement = _jaxbn_batchnorm()
    _instrument(original, "equinox")  # a construction here means the substitution missed
    _instrument(replacement, "jaxbn")
    _substitute(original, replacement)
    assert equinox.nn.BatchNorm is replacement
    assert equinox.nn._batch_norm.BatchNorm is replacement
  elif MODE == "control":
    _instrument(original, "equinox")
  else:
    raise pytest.UsageError(f"eqx_suite_plugin: unknown EQX_SUITE_MODE {MODE!r}")
  config._eqx_suite_batchnorm = (original, equinox.nn.BatchNorm)


def pytest_collection_modifyitems(session, config, items):
  keep_selected(config, items, os.environ["EQX_SUITE_SELECT"])


def pytest_collection_finish(session):
  original, replacement = session.config._eqx_suite_batchnorm
  if replacement is not original:
    # Test modules are imported now: catch any that kept a reference of their own.
    _substitute(original, replacement)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
  global _current
  _current = item
  try:
    return (yield)
  finally:
    _current = None


def _where(report):
  """``path:line`` where the failure was raised, the path shortened."""
  crash = getattr(report.longrepr, "reprcrash", None)
  if crash is None:
    return ""
  path = str(crash.path)
  for base in (os.getcwd(), _REPO):  # the tests' root, jaxbn's checkout
    if path.startswith(base + os.sep):
      path = os.path.relpath(path, base)
      break
  else:
    path = path.split("site-packages" + os.sep)[-1]
  return f"{path}:{crash.lineno}"


def _message(report):
  crash = getattr(report.longrepr, "reprcrash", None)
  if crash is not None:
    return crash.message
  if isinstance(report.longrepr, tuple):
    return str(report.longrepr[2])
  text = str(report.longrepr or "").strip()
  return text.splitlines()[-1] if text else ""


def pytest_runtest_logreport(report):
  r = _results.setdefault(
    report.nodeid,
    {"outcome": "passed", "message": "", "where": "", "batchnorm": [], "seconds": 0.0},
  )
  r["seconds"] += report.duration
  for key, value in report.user_properties:
    if key == "batchnorm" and value not in r["batchnorm"]:
      r["batchnorm"].append(value)
  if report.failed and r["outcome"] != "failed":
    r["outcome"], r["message"] = "failed", f"[{report.when}] {_message(report)}"
    r["where"] = _where(report)
  elif report.skipped and r["outcome"] == "passed":
    r["outcome"], r["message"] = "skipped", _message(report)


def pytest_collectreport(report):
  if report.failed:
    _collection_errors[report.nodeid] = _message(report)


def _write():
  with open(os.environ["EQX_SUITE_OUT"], "w") as f:
    json.dump(
      {
        "tests": _results,
        "collection_errors": _collection_errors,
        "substituted": sorted(set(_substituted)),
        "error": _error,
      },
      f,
      indent=1,
    )


def pytest_sessionfinish(session, exitstatus):
  if hasattr(session.config, "workerinput"):
    return  # an xdist worker: the controller saw every report and writes the file
  _write()
