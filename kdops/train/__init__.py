"""The thin training layer: distill segmentation students with the kdops losses.

* :mod:`kdops.train.recipes` — one declarative recipe per method (``get_recipe("cwd+kd")``);
* :mod:`kdops.train.distiller` — :class:`~kdops.train.distiller.Distiller`: student, frozen
  teacher and the recipe's loss terms;
* :mod:`kdops.train.trainer` — :class:`~kdops.train.trainer.Trainer`: optimisation, AMP,
  evaluation, atomic resumable checkpoints, DistributedDataParallel;
* :mod:`kdops.train.cli` — the ``kdops-train`` and ``kdops-distill`` commands;
* :mod:`kdops.train.data`, :mod:`kdops.train.metrics` — data sets and metrics.

The loss modules themselves are in :mod:`kdops.losses`.
"""
