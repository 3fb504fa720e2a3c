"""Distillation losses as ``nn.Module``s: drop-in replacements for the upstream losses.

Each module is a thin layer over the kdops ops (so every fused backend speeds it up), keeps
the upstream defaults, and names in its docstring the upstream loss whose value it equals.
Modules that hold adapters or projections create them in ``__init__``; put the module's
parameters in the student's optimizer. Every module takes ``backend=`` (see
:mod:`kdops.backend`).

========================================  ===============================================
module                                    upstream (values and gradients; see each docstring)
========================================  ===============================================
:class:`PixelKD`                          CIRKD ``CriterionKD``
:class:`ChannelWiseDivergence`            CIRKD ``CriterionCWD('channel', 'kl')`` (any widths);
                                          mmrazor ``ChannelWiseDivergence`` (equal widths)
:class:`AttentionTransfer`                AT (Zagoruyko & Komodakis), CIRKD ``CriterionAT``
:class:`SelfAttentionDistillation`        SAD (ENet-SAD ``at_gen``); MAD with ``pairs="all"``
:class:`LabelGuidedAttention`             LGAD
:class:`ClassAttentionDistillation`       CAMD
:class:`AdaptivePerspectiveDistillation`  APD (dvlab-research/APD)
:class:`AdaptiveChannelFeatureDistillation`  ACFD
:class:`PairwiseAffinity`                 SKD ``CriterionPairWiseforWholeFeatAfterPool``
                                          (``detach_norm=True``, the default)
:class:`IntraClassVariation`              IFVD / CIRKD ``CriterionIFV``
:class:`ICKD`                             ICKD ``ICKDLoss.batch_loss`` (Conv1×1 + BN embed)
========================================  ===============================================

The upstream classes themselves, with their own names and signatures, are in
:mod:`kdops.compat`.
"""
from kdops.losses.attention import (
    AttentionTransfer,
    ClassAttentionDistillation,
    LabelGuidedAttention,
    SelfAttentionDistillation,
)
from kdops.losses.correlation import ICKD, AdaptiveChannelFeatureDistillation, PairwiseAffinity
from kdops.losses.logits import ChannelWiseDivergence, PixelKD
from kdops.losses.prototypes import AdaptivePerspectiveDistillation, IntraClassVariation

__all__ = [
    "AdaptiveChannelFeatureDistillation",
    "AdaptivePerspectiveDistillation",
    "AttentionTransfer",
    "ChannelWiseDivergence",
    "ClassAttentionDistillation",
    "ICKD",
    "IntraClassVariation",
    "LabelGuidedAttention",
    "PairwiseAffinity",
    "PixelKD",
    "SelfAttentionDistillation",
]
