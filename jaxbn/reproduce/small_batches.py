"""The small-batch study's design: which runs, with the same examples, and renorm's schedule.

``benchmarks/small_batches.py`` trains the paper's MLP with batch norm on the
bundled digits with the same budget of examples for every run (so a smaller
batch takes more steps), for each normalization size ``g`` in :data:`SIZES`:
plain batch norm on batches of ``g``, batch renormalization (Ioffe 2017) on
batches of ``g`` with :func:`scaled_renorm`, and ghost batch norm (Hoffer et
al. 2017), batches of :data:`GHOST_BATCH` split into ghost batches of ``g``;
plus plain batch norm on batches of :data:`GHOST_BATCH` as the reference.
:func:`configurations` lists those runs; :mod:`jaxbn.engine` trains them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from jaxbn.core import Renorm
from jaxbn.core import renorm_schedule

SIZES = (2, 4, 8)
GHOST_BATCH = 32


def scaled_renorm(total_steps: int) -> Renorm:
  """The paper's schedule (5k / 25k / 40k steps) scaled to a short budget.

  Plain batch norm for the first 5% of the steps, then ``rmax`` ramps to 3
  by 40% and ``dmax`` to 5 by 25%.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbn.reproduce.small_batches import scaled_renorm
    >>> renorm = scaled_renorm(1000)
    >>> float(renorm.rmax(jnp.int32(50))), float(renorm.rmax(jnp.int32(400)))
    (1.0, 3.0)
  """
  return renorm_schedule(
    3.0,
    5.0,
    warmup_steps=max(1, round(0.05 * total_steps)),
    rmax_steps=max(2, round(0.40 * total_steps)),
    dmax_steps=max(2, round(0.25 * total_steps)),
  )


def configurations(epochs: int, n_train: int) -> Iterator[tuple[str, int, int, dict[str, Any]]]:
  """``(method, normalization size, optimizer batch, batch-norm options)`` of every run.

  Every run sees ``epochs`` passes over ``n_train`` examples (less each
  epoch's last partial batch); renorm's schedule is scaled to its steps.

  Examples:
    >>> from jaxbn.reproduce.small_batches import configurations
    >>> [(m, g, b) for m, g, b, _ in configurations(6, 1347)][:3]
    [('plain', 2, 2), ('renorm', 2, 2), ('ghost', 2, 32)]
  """
  for g in SIZES:
    steps = epochs * (n_train // g)
    yield ("plain", g, g, {})
    yield ("renorm", g, g, {"renorm": scaled_renorm(steps)})
    yield ("ghost", g, GHOST_BATCH, {"ghost_batch_size": g})
  yield ("plain", GHOST_BATCH, GHOST_BATCH, {})
