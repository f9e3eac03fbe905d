"""Training flax models with optax: a train state that carries the batch statistics.

The pieces, for a linen model whose ``__call__`` takes ``train: bool`` (the
models of :mod:`jaxbn.models`, or any flax model using
:class:`jaxbn.linen.BatchNorm` or ``flax.linen.BatchNorm``):

- :mod:`~jaxbn.training.state`: :class:`TrainState` (``params``,
  ``batch_stats``, ``opt_state``, ``step``) and :func:`create_train_state`;
  :func:`train_step` (``state, batch -> state, metrics``), one jit-compiled
  optimizer step that threads the updated running statistics out of the loss
  as auxiliary output; :func:`eval_step` / :func:`evaluate`, which use the
  running statistics; :func:`fit`, shuffled epochs or a step budget and a
  history of metrics to plot, the data order a function of the step so that a
  run restored from a checkpoint continues exactly;
- :mod:`~jaxbn.training.masks`: :func:`bn_param_mask`,
  :func:`bn_weight_decay_mask` (weight decay that skips batch norm's scale
  and bias) and :func:`freeze_bn_affine` (stop training them);
- :mod:`~jaxbn.training.checkpoints`: :func:`save_checkpoint` /
  :func:`restore_checkpoint` (orbax);
- :mod:`~jaxbn.training.parallel`: :func:`data_parallel_mesh`,
  :func:`global_batch` (the global batch from each process's rows) and
  :func:`data_parallel_train_step`: :func:`train_step` under ``jax.jit``
  with the batch sharded over all devices (of every process); batch norm
  needs no ``axis_name`` for the statistics of the global batch.
  :func:`shard_map_train_step` runs models whose batch norm names the mesh
  axis under ``jax.shard_map``.

Gradient accumulation: ``optax.MultiSteps(opt, every_k_schedule=k)`` as
``tx`` and a model whose batch norm has ``accumulate_steps=k``
(``BNOptions(accumulate_steps=k)`` for :mod:`jaxbn.models`): each call of
:func:`train_step` on a micro-batch normalizes it by its own statistics, and
every ``k``-th call updates the parameters (MultiSteps) and the running
statistics (once, with the statistics of the ``k`` micro-batches together).

Fine-tuning freezes batch norm with three independent switches:
``use_running_average=True`` (normalize with the running statistics),
``update_batch_stats=False`` (normalize with the batch's, keep the running
ones), and :func:`freeze_bn_affine` (scale and bias not trained).

A batch is a tuple ``(x, y)``: inputs and int32 labels. The loss is the mean
softmax cross-entropy of the model's logits. Nothing here prints unless asked
(``fit(..., progress=True)``). Plain-JAX models of ``(params, state, x)``
train with :mod:`jaxbn.engine` instead.
"""

from jaxbn.training.checkpoints import CheckpointError
from jaxbn.training.checkpoints import restore_checkpoint
from jaxbn.training.checkpoints import save_checkpoint
from jaxbn.training.masks import bn_param_mask
from jaxbn.training.masks import bn_weight_decay_mask
from jaxbn.training.masks import freeze_bn_affine
from jaxbn.training.parallel import data_parallel_mesh
from jaxbn.training.parallel import data_parallel_train_step
from jaxbn.training.parallel import global_batch
from jaxbn.training.parallel import shard_map_train_step
from jaxbn.training.state import TrainState
from jaxbn.training.state import create_train_state
from jaxbn.training.state import eval_step
from jaxbn.training.state import evaluate
from jaxbn.training.state import fit
from jaxbn.training.state import population_stats
from jaxbn.training.state import train_step

__all__ = (
  "CheckpointError",
  "TrainState",
  "bn_param_mask",
  "bn_weight_decay_mask",
  "create_train_state",
  "data_parallel_mesh",
  "data_parallel_train_step",
  "eval_step",
  "evaluate",
  "fit",
  "freeze_bn_affine",
  "global_batch",
  "population_stats",
  "restore_checkpoint",
  "save_checkpoint",
  "shard_map_train_step",
  "train_step",
)
