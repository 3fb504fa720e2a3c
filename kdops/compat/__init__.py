"""Drop-in replacements for the distillation losses of the upstream projects.

Each module mirrors one project: the same class (or function) names, constructor arguments
and defaults, forward arguments (model-output lists and torchdistill io-dicts where the
upstream takes them), return structure, values and gradients (detaches included) — computed
through the kdops ops, so every fused backend speeds them up. Switching is one import::

    # from losses import CriterionCWD                     (CIRKD)
    from kdops.compat.cirkd import CriterionCWD

Every class also takes a keyword-only ``backend=`` (see :mod:`kdops.backend`).

==============================  =============================================================
module                          names
==============================  =============================================================
:mod:`kdops.compat.cirkd`       ``CriterionKD``, ``CriterionCWD``, ``CriterionAT``,
                                ``CriterionStructuralKD``, ``CriterionIFV``
:mod:`kdops.compat.mmrazor`     ``ChannelWiseDivergence``, ``KLDivergence``, ``ATLoss``,
                                ``register()``
:mod:`kdops.compat.torchdistill`  ``KDLoss``, ``ATLoss``, ``ChSimLoss``, ``register()``
:mod:`kdops.compat.skd`         ``CriterionPairWiseforWholeFeatAfterPool``, ``CriterionPixelWise``
:mod:`kdops.compat.ifvd`        ``CriterionIFV``
:mod:`kdops.compat.ickd`        ``ICKDLoss`` (and its ``Embed``)
:mod:`kdops.compat.apd`         ``CriterionKD``, ``CriterionKmeansInterWhole`` (functions)
==============================  =============================================================

Where an upstream loss fails on some input (CIRKD ``CriterionCWD(divergence='mse')`` never
sets its temperature; mismatched shapes), the drop-in either works as documented in its
docstring or raises a clear error; where both run, both compute the same formula.
"""
from kdops.compat import apd, cirkd, ickd, ifvd, mmrazor, skd, torchdistill

__all__ = ["apd", "cirkd", "ickd", "ifvd", "mmrazor", "skd", "torchdistill"]
