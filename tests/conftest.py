"""Strict JAX configuration for every test, and several CPU devices.

The device count must be set before JAX initialises its backend.
"""

import os
import pathlib

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# A persistent compilation cache: a second run of the suite loads most of its XLA programs
# from disk instead of compiling them again (the key covers jax's version, the backend, the
# XLA flags and the program, so a changed function compiles anew). JAXBN_TEST_CACHE=off
# compiles everything; another path moves the cache.
_cache = os.environ.get("JAXBN_TEST_CACHE", str(pathlib.Path(__file__).parents[1] / ".jax_cache"))
if _cache != "off":
  jax.config.update("jax_compilation_cache_dir", _cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  # A size limit turns on jax's file lock (the filelock package): xdist's workers then never
  # read an entry the other is still writing, and the oldest entries go past 2 GiB.
  jax.config.update("jax_compilation_cache_max_size", 2 * 1024**3)

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
