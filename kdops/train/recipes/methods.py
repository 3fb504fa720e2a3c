"""The built-in recipes, one per method, with the defaults of the papers and official code.

Weights are the upstream λ's (CIRKD's training scripts for the baselines, the APD config,
the SAD paper); where no official value exists the choice is said so in the description.
"""
from __future__ import annotations

import torch

from kdops import losses
from kdops.train.recipes.base import OwnOptimizer, Recipe, RecipeContext, Term

STAGES = ("layer1", "layer2", "layer3", "layer4")
# ERFNet trained from scratch with SGD needs a larger step than the PSPNet/DeepLab 0.01 to
# pick up the thin lanes (measured on synthetic_lanes: 0.01 stays at background only).
LANE_DEFAULTS = {"dataset": "synthetic_lanes", "student": "erfnet", "lr": 0.05}


def _channels(ctx: RecipeContext, key: str) -> tuple[int, int]:
    return ctx.student_channels[key], ctx.teacher_channels[key]


def kd() -> Recipe:
    return Recipe(
        "kd",
        (Term("kd/logits", lambda c: losses.PixelKD(tau=1.0, backend=c.backend),
              student=("logits",), teacher=("logits",), weight=1.0),),
        description="pixel-wise KD on the logits (CIRKD: tau 1, weight 1)",
    )


def cwd() -> Recipe:
    return Recipe(
        "cwd",
        (Term("cwd/logits", lambda c: losses.ChannelWiseDivergence(tau=4.0, backend=c.backend),
              student=("logits",), teacher=("logits",), weight=3.0),),
        description="channel-wise distillation of the logits (CWD paper / CIRKD: tau 4, weight 3)",
    )


def skd() -> Recipe:
    return Recipe(
        "skd",
        (Term("skd/pairwise", lambda c: losses.PairwiseAffinity(backend=c.backend),
              student=("fusion",), teacher=("fusion",), weight=10.0),),
        description="SKD pair-wise affinity of the fusion features at full resolution (CIRKD weight 10)",
    )


def ifvd() -> Recipe:
    return Recipe(
        "ifvd",
        (Term("ifvd/fusion",
              lambda c: losses.IntraClassVariation(c.num_classes, ignore_index=c.ignore_index, backend=c.backend),
              student=("fusion",), teacher=("fusion",), labels=True, weight=20.0),),
        description="IFVD intra-class variation of the fusion features (CIRKD weight 20)",
    )


# CIRKD's AT weight 1e4 is tuned on Cityscapes 512x1024 crops, whose fusion features are
# 64x128 at output stride 8.
CIRKD_FUSION_POSITIONS = 64 * 128


def at() -> Recipe:
    return Recipe(
        "at",
        (Term("at/fusion",
              lambda c: losses.AttentionTransfer(p=2.0, reference_positions=CIRKD_FUSION_POSITIONS, backend=c.backend),
              student=("fusion",), teacher=("fusion",), resize_teacher=False, weight=1e4),),
        description="attention transfer on the fusion features (CIRKD weight 1e4 at 64x128 fusion maps, "
                    "scaled with the map size)",
    )


def ickd() -> Recipe:
    return Recipe(
        "ickd",
        (Term("ickd/fusion", lambda c: losses.ICKD(*_channels(c, "fusion"), backend=c.backend),
              student=("fusion",), teacher=("fusion",), weight=1.0),),
        description="inter-channel correlation of the fusion features (1x1 adapter when widths differ; weight 1)",
    )


def sad() -> Recipe:
    return Recipe(
        "sad",
        (Term("sad/stages", lambda c: losses.SelfAttentionDistillation(pairs="consecutive", backend=c.backend),
              student=STAGES, grouped=True, resize_teacher=False, weight=0.1, start=0.5),),
        teacher=None,
        description="self attention distillation between consecutive stages (weight 0.1, on after half of training)",
        defaults=LANE_DEFAULTS,
    )


def mad() -> Recipe:
    return Recipe(
        "mad",
        (Term("mad/stages", lambda c: losses.SelfAttentionDistillation(pairs="all", backend=c.backend),
              student=STAGES, grouped=True, resize_teacher=False, weight=0.1, start=0.5),),
        teacher=None,
        description="multi-level attention distillation: each stage from every deeper one "
                    "(weight 0.1, on after half of training)",
        defaults=LANE_DEFAULTS,
    )


def lgad() -> Recipe:
    return Recipe(
        "lgad",
        (Term("lgad/stages", lambda c: losses.LabelGuidedAttention(backend=c.backend),
              student=STAGES, teacher=STAGES, grouped=True, resize_teacher=False, weight=0.1),),
        teacher="labels",
        description="label-guided attention: a teacher trained on the label maps supervises the "
                    "student's stage attention maps (weight 0.1, as SAD)",
        defaults=LANE_DEFAULTS,
    )


def _classifier_weights(student, teacher) -> dict:
    return {"student_weight": student.classifier.weight, "teacher_weight": teacher.classifier.weight}


def camd() -> Recipe:
    def build(c: RecipeContext):
        return losses.ClassAttentionDistillation(c.num_classes, ignore_index=c.ignore_index, backend=c.backend)

    return Recipe(
        "camd",
        (
            Term("camd/fusion", build, student=("fusion",), teacher=("fusion",), weight=100.0,
                 kwargs=_classifier_weights),
            Term("camd/layer4", build, student=("layer4",), teacher=("layer4",), labels=True, weight=100.0),
        ),
        description="class attention maps: of the fusion feature from the classifiers' weights, of "
                    "layer4 from the batch class prototypes (no official weights; 100 each)",
    )


def apd() -> Recipe:
    def build(c: RecipeContext):
        return losses.AdaptivePerspectiveDistillation(
            *_channels(c, "fusion"), c.num_classes, ignore_index=c.ignore_index, backend=c.backend
        )

    teacher_projection = OwnOptimizer(
        params=lambda m: m.teacher_projection.parameters(),
        loss=lambda m, s, t, labels: m.teacher_projection_loss(t[0], labels),
        make=lambda params: torch.optim.Adam(params, lr=1e-5, betas=(0.9, 0.99)),
    )
    return Recipe(
        "apd",
        (Term("apd", build, student=("fusion", "logits"), teacher=("fusion", "logits"), labels=True,
              resize_teacher=True, own_optimizer=teacher_projection),),
        description="adaptive perspective distillation (APD config: weights 10/10/10, tau 0.1, "
                    "teacher projection trained by Adam lr 1e-5)",
    )


def acfd() -> Recipe:
    def build(c: RecipeContext):
        return losses.AdaptiveChannelFeatureDistillation(
            _channels(c, "layer4"), _channels(c, "fusion"), backend=c.backend
        )

    return Recipe(
        "acfd",
        (Term("acfd", build, student=("layer4", "fusion", "logits"), teacher=("layer4", "fusion", "logits")),),
        description="attention-weighted layer4 features, fusion channel correlations, logit channel KL "
                    "(this library's weights 1/1/3, tau 4)",
    )


BUILTIN = (kd, cwd, skd, ifvd, at, ickd, sad, mad, lgad, camd, apd, acfd)
