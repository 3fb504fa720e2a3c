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
# pick up the thin lanes (measured on synthetic_lanes: 0.01 stays at background only; 0.05
# leaves the background-only plateau after ~250 steps, 0.1 learns the lanes in 600 steps:
# kdops.train.cli.DEFAULT_LANE_STEPS).
LANE_DEFAULTS = {"dataset": "synthetic_lanes", "student": "erfnet", "lr": 0.1}


def _channels(ctx: RecipeContext, key: str) -> tuple[int, int]:
    return ctx.student_channels[key], ctx.teacher_channels[key]


def kd() -> Recipe:
    """Pixel-wise KD of the logits: ``PixelKD(tau=1)``, weight 1.

    Defaults: temperature 1 and weight 1 from CIRKD's training scripts (``--lambda-kd 1.``,
    winycg/CIRKD ``scripts/train_kd/*.sh``; CIRKD's ``CriterionKD`` default temperature 1).
    """
    return Recipe(
        "kd",
        (Term("kd/logits", lambda c: losses.PixelKD(tau=1.0, backend=c.backend),
              student=("logits",), teacher=("logits",), weight=1.0),),
        description="pixel-wise KD on the logits (CIRKD: tau 1, weight 1)",
    )


def cwd() -> Recipe:
    """Channel-wise distillation of the logits: ``ChannelWiseDivergence(tau=4)``, weight 3.

    Defaults: tau 4 from the CWD paper (Shu et al., 2021, semantic segmentation); weight 3
    from CIRKD's scripts (``--lambda-cwd-logit 3.``). On the synthetic scenes this is the main
    job's recipe (README, "The main job on its default").
    """
    return Recipe(
        "cwd",
        (Term("cwd/logits", lambda c: losses.ChannelWiseDivergence(tau=4.0, backend=c.backend),
              student=("logits",), teacher=("logits",), weight=3.0),),
        description="channel-wise distillation of the logits (CWD paper / CIRKD: tau 4, weight 3)",
    )


def skd() -> Recipe:
    """SKD pair-wise affinity of the fusion features, weight 10.

    Defaults: weight 10 from CIRKD's scripts (``--lambda-skd 10``, ``train_skd.sh``); SKD's
    detached pixel norm (``detach_norm=True``). Features at full resolution (no pooling).
    """
    return Recipe(
        "skd",
        (Term("skd/pairwise", lambda c: losses.PairwiseAffinity(backend=c.backend),
              student=("fusion",), teacher=("fusion",), weight=10.0),),
        description="SKD pair-wise affinity of the fusion features at full resolution (CIRKD weight 10)",
    )


def ifvd() -> Recipe:
    """IFVD intra-class feature variation of the fusion features, weight 20.

    Defaults: weight 20 as in CIRKD-based training scripts (``--lambda-ifv 20``), which train
    IFVD together with KD and an adversarial term; kdops's recipe is the IFV term alone.
    """
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
    """Attention transfer on the fusion features, weight 1e4 at 64×128 maps.

    Defaults: weight 1e4 from CIRKD's scripts (``--lambda-at 10000.``) for Cityscapes 512×1024
    crops (fusion maps 64×128 at output stride 8); ``reference_positions`` rescales it with the
    map size, so the term has the same strength at the synthetic sets' 6×6 maps.
    """
    return Recipe(
        "at",
        (Term("at/fusion",
              lambda c: losses.AttentionTransfer(p=2.0, reference_positions=CIRKD_FUSION_POSITIONS, backend=c.backend),
              student=("fusion",), teacher=("fusion",), resize_teacher=False, weight=1e4),),
        description="attention transfer on the fusion features (CIRKD weight 1e4 at 64x128 fusion maps, "
                    "scaled with the map size)",
    )


def ickd() -> Recipe:
    """Inter-channel correlation of the fusion features, weight 1.

    Defaults: weight 1, this library's choice (ICKD's segmentation code is not public in a
    form kdops follows); a Conv1×1 + BatchNorm embed when the widths differ, as ICKD's.
    """
    return Recipe(
        "ickd",
        (Term("ickd/fusion", lambda c: losses.ICKD(*_channels(c, "fusion"), backend=c.backend),
              student=("fusion",), teacher=("fusion",), weight=1.0),),
        description="inter-channel correlation of the fusion features (1x1 adapter when widths differ; weight 1)",
    )


# SAD / MAD / LGAD. The published form ("-upstream" recipes): ENet-SAD's ``at_gen`` (spatial
# softmax of Σ_c x², MSELoss averaged over the pixels; InhwanBae/ENet-SAD_Pytorch, the PyTorch
# port of the official code: ``nn.MSELoss(reduction='mean')``, ``scale_sad_distill = 0.1``),
# between consecutive stages, switched on in the later part of training (the SAD paper adds it
# after the network has been trained for a while; here from half of the steps), the deeper
# map not detached (both maps belong to the network being trained).
#
# This library's defaults ("sad", "mad", "lgad"): the same maps normalised by their L2 norm
# over the positions instead of a softmax, the squared differences summed over the positions
# (2 - 2 cos per pair), weight ATTENTION_WEIGHT. Why (benchmarks/attention_scale.py, ERFNet on
# the synthetic lanes): the softmax of Σ_c x² is saturated on every stage (one position holds
# > 90% of the mass), so the upstream maps are argmax indicators, and the upstream term is
# about 1% of the task loss; the L2 form gives scale-free maps whose term is a few to ~20% of
# the task loss at weight 0.1. The weight and switch-on point come from this library's
# measurements (README, "Gains over the plain student"; the per-variant screen is listed in
# benchmarks/attention_scale.py's docstring).
UPSTREAM_SAD = {"norm": "softmax", "positions": "mean"}
ATTENTION_FORM = {"norm": "l2", "positions": "sum"}
UPSTREAM_WEIGHT, UPSTREAM_START = 0.1, 0.5
ATTENTION_WEIGHT, ATTENTION_START = 0.1, 0.5
# MAD sums 6 stage pairs where SAD sums 3: at weight 0.1 its term is ~69% of the task loss
# (SAD's ~27%) and its lane F1 gain was within noise (+0.2 ± 0.5 over 3 seeds); 0.05 gave
# +0.3 ± 0.3, 0.03 gave +0.5 ± 0.3 (F1) and +0.3 ± 0.3 (mIoU) on the same seeds.
MAD_WEIGHT = 0.03
LGAD_START = 0.0


def _self_attention(name: str, pairs: str, form: dict, weight: float, start: float, description: str) -> Recipe:
    return Recipe(
        name,
        (Term(f"{name.split('-')[0]}/stages",
              lambda c: losses.SelfAttentionDistillation(pairs=pairs, backend=c.backend, **form),
              student=STAGES, grouped=True, resize_teacher=False, weight=weight, start=start),),
        teacher=None,
        description=description,
        defaults=LANE_DEFAULTS,
    )


def sad() -> Recipe:
    """SAD between consecutive stages, this library's form: L2-normalised maps, squared
    differences summed over the positions, weight :data:`ATTENTION_WEIGHT`, on from
    :data:`ATTENTION_START` of training.

    Sources: the pairs (consecutive stages, the deeper map upsampled, not detached) are
    ENet-SAD's; the map form, the weight and the switch-on point are this library's, chosen
    by measurement on the synthetic lanes (``benchmarks.attention_scale`` for the scale,
    ``benchmarks.gains`` for the effect). ``sad-upstream`` is the published form.
    """
    return _self_attention(
        "sad", "consecutive", ATTENTION_FORM, ATTENTION_WEIGHT, ATTENTION_START,
        f"self attention distillation between consecutive stages, L2-normalised maps, squared "
        f"differences summed over positions (this library's form: the upstream softmax maps saturate), "
        f"weight {ATTENTION_WEIGHT} and on from {ATTENTION_START:.0%} of training (this benchmark); "
        f"the published form is sad-upstream")


def sad_upstream() -> Recipe:
    """SAD as published: spatial softmax maps, MSE averaged over the pixels, weight 0.1
    (ENet-SAD's PyTorch code: ``nn.MSELoss(reduction='mean')``, ``scale_sad_distill = 0.1``),
    on from half of training (the SAD paper adds SAD late in training; the fraction is this
    library's)."""
    return _self_attention(
        "sad-upstream", "consecutive", UPSTREAM_SAD, UPSTREAM_WEIGHT, UPSTREAM_START,
        f"SAD as published: spatial softmax maps, MSE averaged over pixels, weight {UPSTREAM_WEIGHT} "
        f"(ENet-SAD code), on from {UPSTREAM_START:.0%} of training (the paper adds SAD late in training)")


def mad() -> Recipe:
    """MAD (multi-level: every stage from every deeper one), this library's map form as
    :func:`sad`, weight :data:`MAD_WEIGHT` (0.03: twice SAD's pairs, a third of its weight;
    chosen on the synthetic lanes among 0.1, 0.05, 0.03, see the comment at the constant);
    ``mad-upstream`` keeps SAD's published map loss and weight."""
    return _self_attention(
        "mad", "all", ATTENTION_FORM, MAD_WEIGHT, ATTENTION_START,
        f"multi-level attention distillation: each stage from every deeper one, L2-normalised maps "
        f"summed over positions (this library's form), weight {MAD_WEIGHT}, on from "
        f"{ATTENTION_START:.0%} of training (this benchmark); the published form is mad-upstream")


def mad_upstream() -> Recipe:
    """MAD with SAD's published map loss (spatial softmax, MSE averaged over the pixels) and
    weight 0.1 (SAD's), on from half of training."""
    return _self_attention(
        "mad-upstream", "all", UPSTREAM_SAD, UPSTREAM_WEIGHT, UPSTREAM_START,
        f"MAD with SAD's published map loss: spatial softmax maps, MSE averaged over pixels, weight "
        f"{UPSTREAM_WEIGHT} (SAD's), on from {UPSTREAM_START:.0%} of training")


def _label_guided(name: str, form: dict, weight: float, start: float, description: str) -> Recipe:
    return Recipe(
        name,
        (Term("lgad/stages", lambda c: losses.LabelGuidedAttention(backend=c.backend, **form),
              student=STAGES, teacher=STAGES, grouped=True, resize_teacher=False, weight=weight, start=start),),
        teacher="labels",
        description=description,
        defaults=LANE_DEFAULTS,
    )


def lgad() -> Recipe:
    """LGAD: the label teacher's stage maps supervise the student's, this library's map form
    (L2 maps summed over positions), weight :data:`ATTENTION_WEIGHT`, on from
    :data:`LGAD_START` of training (the teacher's maps are meaningful from the first step).
    No official code exists; the form and numbers are this library's, from the gains
    benchmark."""
    return _label_guided(
        "lgad", ATTENTION_FORM, ATTENTION_WEIGHT, LGAD_START,
        f"label-guided attention: a teacher trained on the label maps supervises the student's stage "
        f"attention maps; L2-normalised maps summed over positions (this library's form), weight "
        f"{ATTENTION_WEIGHT}, on from {LGAD_START:.0%} of training (this benchmark); no official code")


def lgad_upstream() -> Recipe:
    """LGAD with SAD's published map loss and weight 0.1, on from the start: the form kdops
    first shipped (no official LGAD code)."""
    return _label_guided(
        "lgad-upstream", UPSTREAM_SAD, UPSTREAM_WEIGHT, 0.0,
        f"LGAD with SAD's map loss (spatial softmax, MSE averaged over pixels, weight {UPSTREAM_WEIGHT}), "
        f"on from the start; LGAD has no official code, this is the form kdops shipped first")


def _classifier_weights(student, teacher) -> dict:
    return {"student_weight": student.classifier.weight, "teacher_weight": teacher.classifier.weight}


def camd() -> Recipe:
    """Class attention map distillation of the fusion feature and layer4, weight 100 each.

    Defaults: no official code or weights exist; 100 each is this library's choice, set so the
    terms are of the order of the task loss on the synthetic scenes.
    """
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
    """Adaptive perspective distillation: observation KL, prototype alignment and logit KL.

    Defaults from the APD configuration (as published with its code): weights 10 / 10 / 10, prototype temperature 0.1
    (``1 / kmeans_temp``), the teacher projection trained by its own Adam (lr 1e-5,
    betas 0.9 / 0.99).
    """
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
    """Adaptive channel feature distillation: attention-weighted layer4 features, fusion channel
    correlations and the logits' channel KL.

    Defaults: weights 1 / 1 / 3 and tau 4 are this library's choice (no official code); the
    logit term follows CWD's tau 4, weight 3.
    """
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


BUILTIN = (kd, cwd, skd, ifvd, at, ickd, sad, sad_upstream, mad, mad_upstream, lgad, lgad_upstream, camd, apd,
           acfd)
