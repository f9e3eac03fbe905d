"""Strict JAX configuration for every test, and several CPU devices.

The device count must be set before JAX initialises its backend.
"""

import os
import pathlib
import shutil

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# A persistent compilation cache: a second run of the suite loads most of its XLA programs
# from disk instead of compiling them again (the key covers jax's version, the backend, the
# XLA flags and the program, so a changed function compiles anew). JAXBN_TEST_CACHE=off
# compiles everything; another path moves the cache. A folder past 2 GiB starts afresh. The
# entries are for this machine's CPU: do not copy the folder to another.
_cache = os.environ.get("JAXBN_TEST_CACHE", str(pathlib.Path(__file__).parents[1] / ".jax_cache"))


def _write_entries_whole() -> bool:
  """Makes jax write each cache entry whole (a temporary file, then a rename).

  jax writes an entry in place, so one xdist worker could read an entry the other is still
  writing (and warn; tests that turn warnings into errors would then fail). Its size limit
  locks, but rescans the whole folder at every write. This wraps its (private) writer; if
  jax has changed it, each worker keeps a folder of its own instead (fewer hits).
  """
  try:
    from jax._src import lru_cache
  except ImportError:
    return False
  suffix = getattr(lru_cache, "_CACHE_SUFFIX", None)
  put = getattr(getattr(lru_cache, "LRUCache", None), "put", None)
  if not isinstance(suffix, str) or put is None:
    return False

  def whole_put(self, key: str, value: bytes) -> None:
    if getattr(self, "eviction_enabled", True) or not key:
      return put(self, key, value)
    path = os.path.join(str(self.path), f"{key}{suffix}")
    if os.path.exists(path):
      return None
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
      f.write(value)
    os.replace(tmp, path)
    return None

  lru_cache.LRUCache.put = whole_put
  return True


if _cache != "off":
  _dir = pathlib.Path(_cache)
  if not _write_entries_whole():
    _dir = _dir / os.environ.get("PYTEST_XDIST_WORKER", "main")
  if _dir.is_dir() and sum(f.stat().st_size for f in _dir.rglob("*") if f.is_file()) > 2 << 30:
    shutil.rmtree(_dir, ignore_errors=True)
  jax.config.update("jax_compilation_cache_dir", str(_dir))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# Property tests: a fixed, derandomized budget by default (the same examples on
# every run and machine); JAXBN_HYPOTHESIS_EXAMPLES=N draws N fresh examples
# per property. No example database is written.
from hypothesis import HealthCheck  # noqa: E402
from hypothesis import settings  # noqa: E402

_slow_ok = (HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large)
settings.register_profile(
  "ci", max_examples=100, derandomize=True, database=None, deadline=None,
  suppress_health_check=_slow_ok, print_blob=True,
)  # fmt: skip
settings.register_profile(
  "thorough",
  max_examples=int(os.environ.get("JAXBN_HYPOTHESIS_EXAMPLES") or 0) or 1,
  database=None, deadline=None, suppress_health_check=_slow_ok, print_blob=True,
)  # fmt: skip
settings.load_profile("thorough" if os.environ.get("JAXBN_HYPOTHESIS_EXAMPLES") else "ci")
