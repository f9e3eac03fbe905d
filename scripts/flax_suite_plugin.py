"""pytest plugin of scripts/flax_suite.py (loaded with ``-p flax_suite_plugin``).

Environment:
  FLAX_SUITE_MODE: ``record`` (flax's own BatchNorm, instrumented) or
    ``substitute`` (``jaxbn.linen.BatchNorm`` and ``jaxbn.nnx.BatchNorm`` in
    place of flax's, wherever a module holds flax's class).
  FLAX_SUITE_SELECT: a JSON file: a list of test node ids, or ``{file:
    [qualname]}``, the test functions to run (``Class.test_name``, with all
    their parametrized variants).
  FLAX_SUITE_STOP: ``1`` ends each test (as skipped) at its first BatchNorm
    in ``record`` mode: enough to learn which tests construct one.
  FLAX_SUITE_OUT: the JSON file written at the end: ``{"tests": {nodeid:
    {"outcome", "message", "batchnorm"}}, "collection_errors": {file:
    message}, "substituted": [...]}``, where ``batchnorm`` lists which
    BatchNorm classes (``linen``, ``nnx``) the test constructed.
"""

import functools
import json
import os
import sys

import pytest
from suite_common import keep_selected

MODE = os.environ.get("FLAX_SUITE_MODE", "record")
STOP_AT_BATCHNORM = MODE == "record" and os.environ.get("FLAX_SUITE_STOP") == "1"
_current = None  # the test item running in this process
_results: dict = {}
_collection_errors: dict = {}
_substituted: list = []


def _note(kind):
  item = _current
  if item is not None and ("batchnorm", kind) not in item.user_properties:
    # user_properties travel with the reports, also from xdist workers.
    item.user_properties.append(("batchnorm", kind))
  if item is not None and STOP_AT_BATCHNORM:
    # Recording needs no more of the test; Skipped is a BaseException, so the
    # test's own except clauses do not catch it.
    pytest.skip(f"constructs {kind} BatchNorm")


def _instrument(cls, kind):
  """Wraps ``cls.__init__`` so that constructing ``cls`` is noted for the running test."""
  original = cls.__init__

  @functools.wraps(original)
  def __init__(self, *args, **kwargs):
    _note(kind)
    original(self, *args, **kwargs)

  cls.__init__ = __init__


def _substitute():
  """Replaces flax's BatchNorm classes by jaxbn's in every loaded module that holds them."""
  import flax.linen
  import flax.nnx

  import jaxbn.linen
  import jaxbn.nnx

  pairs = {
    flax.linen.BatchNorm: jaxbn.linen.BatchNorm,
    flax.nnx.BatchNorm: jaxbn.nnx.BatchNorm,
  }
  originals = set(pairs)
  for name, module in list(sys.modules.items()):
    if module is None or name.startswith("jaxbn"):
      continue
    for attr, value in list(getattr(module, "__dict__", {}).items()):
      if isinstance(value, type) and value in originals:
        setattr(module, attr, pairs[value])
        _substituted.append(f"{name}.{attr}")


# flax.nnx.tabulate overwrites the methods of every class in the model and puts
# them back only when the traced call succeeds: a test that fails inside it
# would leave them overwritten for every later test in the same process. The
# originals are recorded here and put back after each test.
_MISSING = object()
_overwritten: dict = {}


def _guard_tabulate():
  from flax.nnx import summary

  overwrite = summary._overwrite_methods

  @functools.wraps(overwrite)
  def recording_overwrite(env):
    for obj_type, name in env:
      _overwritten.setdefault((obj_type, name), obj_type.__dict__.get(name, _MISSING))
    overwrite(env)

  summary._overwrite_methods = recording_overwrite


def _restore_methods():
  for (obj_type, name), value in _overwritten.items():
    if value is _MISSING:
      if name in obj_type.__dict__:
        delattr(obj_type, name)
    else:
      setattr(obj_type, name, value)
  _overwritten.clear()


def pytest_configure(config):
  import flax.linen
  import flax.nnx

  _guard_tabulate()

  if MODE == "substitute":
    import jaxbn.linen
    import jaxbn.nnx

    _instrument(jaxbn.linen.BatchNorm, "linen")
    _instrument(jaxbn.nnx.BatchNorm, "nnx")
    _substitute()
    assert flax.linen.BatchNorm is jaxbn.linen.BatchNorm
    assert flax.nnx.BatchNorm is jaxbn.nnx.BatchNorm
  else:
    _instrument(flax.linen.BatchNorm, "linen")
    _instrument(flax.nnx.BatchNorm, "nnx")


def pytest_collection_modifyitems(session, config, items):
  keep_selected(config, items, os.environ["FLAX_SUITE_SELECT"])


def pytest_collection_finish(session):
  if MODE == "substitute":
    # Test modules are imported now: catch any that kept a reference of their own.
    _substitute()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
  global _current
  _current = item
  try:
    return (yield)
  finally:
    _current = None
    _restore_methods()


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
    report.nodeid, {"outcome": "passed", "message": "", "batchnorm": [], "seconds": 0.0}
  )
  r["seconds"] += report.duration
  for key, value in report.user_properties:
    if key == "batchnorm" and value not in r["batchnorm"]:
      r["batchnorm"].append(value)
  if report.failed and r["outcome"] != "failed":
    r["outcome"], r["message"] = "failed", f"[{report.when}] {_message(report)}"
  elif report.skipped and r["outcome"] == "passed":
    r["outcome"], r["message"] = "skipped", _message(report)


def pytest_collectreport(report):
  if report.failed:
    _collection_errors[report.nodeid] = _message(report)


def pytest_sessionfinish(session, exitstatus):
  if hasattr(session.config, "workerinput"):
    return  # an xdist worker: the controller saw every report and writes the file
  with open(os.environ["FLAX_SUITE_OUT"], "w") as f:
    json.dump(
      {
        "tests": _results,
        "collection_errors": _collection_errors,
        "substituted": sorted(set(_substituted)),
      },
      f,
      indent=1,
    )
